"""Solver schedule and atomic checkpoints (no model needed)."""
import random

import numpy as np
import pytest
import torch

from detection.engine import checkpoint as ckpt_mod
from detection.engine.checkpoint import (CheckpointError, get_rng_states, load_checkpoint,
                                         save_checkpoint, set_rng_states)
from detection.engine.optim import build_lr_scheduler, build_optimizer, lr_factor


def test_lr_factor_warmup_and_steps():
    kw = dict(warmup_iters=10, warmup_factor=0.001, steps=[20, 30], gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.001)
    assert lr_factor(5, **kw) == pytest.approx(0.001 * 0.5 + 0.5)   # halfway through the ramp
    assert lr_factor(10, **kw) == 1.0
    assert lr_factor(19, **kw) == 1.0
    assert lr_factor(20, **kw) == pytest.approx(0.1)
    assert lr_factor(35, **kw) == pytest.approx(0.01)


def test_scheduler_drives_optimizer_lr():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, base_lr=0.02, momentum=0.9, weight_decay=1e-4)
    # norm parameters get no weight decay; the conv's do
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0]
    assert len(opt.param_groups[1]["params"]) == 2
    sched = build_lr_scheduler(opt, warmup_iters=0, warmup_factor=1.0, steps=[2], gamma=0.1)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.02, 0.02, 0.002])


def test_save_interrupted_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]   # no temporary left behind


def test_unreadable_checkpoint_names_the_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"rng": get_rng_states()}, tmp_path / "c.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(load_checkpoint(tmp_path / "c.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
