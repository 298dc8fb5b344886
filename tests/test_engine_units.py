"""Solver schedule and atomic checkpoints (no model needed)."""
import copy
import os
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


def test_lr_factor_cosine_with_warmup():
    kw = dict(warmup_iters=10, warmup_factor=0.1, schedule="cosine", max_iter=100)
    # half a cosine from 1 to 0 over max_iter, times the warmup ramp in its first 10 iterations
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(5, **kw) == pytest.approx((0.1 * 0.5 + 0.5) * 0.5 * (1 + np.cos(np.pi * 0.05)))
    assert lr_factor(25, **kw) == pytest.approx(0.5 + 0.5 * np.sqrt(0.5))      # cos(pi / 4)
    assert lr_factor(50, **kw) == pytest.approx(0.5)
    assert lr_factor(75, **kw) == pytest.approx(0.5 - 0.5 * np.sqrt(0.5))
    assert lr_factor(100, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(120, **kw) == pytest.approx(0.0, abs=1e-12)                # stays at 0 past max_iter
    # the steps and gamma of a multistep schedule do not apply
    assert lr_factor(50, **kw, steps=[20], gamma=0.1) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="max_iter"):
        lr_factor(5, warmup_iters=0, warmup_factor=1.0, schedule="cosine")


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


def _sgd_run(optimizer: torch.optim.SGD, params: list, grads: list) -> list:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        optimizer.step()
    return [p.detach().clone() for p in params]


def test_fused_sgd_gives_the_default_update_and_survives_an_old_checkpoint():
    """build_optimizer runs the fused update (one kernel: 3x faster on the CPU); its numbers are
    the default SGD's up to float rounding (1 ulp), and resuming from a checkpoint saved without
    it keeps it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    grads = [[torch.randn_like(p) for p in model.parameters()] for _ in range(4)]
    fused_model, plain_model = copy.deepcopy(model), copy.deepcopy(model)
    fused = build_optimizer(fused_model, base_lr=0.02, momentum=0.9, weight_decay=1e-4)
    assert all(group["fused"] for group in fused.param_groups)
    plain = torch.optim.SGD([{"params": list(plain_model[0].parameters()), "weight_decay": 1e-4},
                             {"params": list(plain_model[1].parameters()), "weight_decay": 0.0}],
                            lr=0.02, momentum=0.9)
    got = _sgd_run(fused, list(fused_model.parameters()), grads[:2])
    expected = _sgd_run(plain, list(plain_model.parameters()), grads[:2])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # resume the fused run from the default optimizer's state (an older checkpoint)
    ckpt_mod.load_optimizer_state(fused, copy.deepcopy(plain.state_dict()), "old.pth")
    assert all(group["fused"] for group in fused.param_groups)
    got = _sgd_run(fused, list(fused_model.parameters()), grads[2:])
    expected = _sgd_run(plain, list(plain_model.parameters()), grads[2:])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_fused_sgd_updates_channels_last_weights_in_place_with_torchs_numbers():
    """The fast path trains with channels_last 3x3 weights. build_optimizer's SGD gives exactly
    PyTorch's fused update on them (bit for bit, momentum buffers too, first step included)
    without the copies the fused kernel otherwise makes of every such tensor, and its momentum
    buffers keep the weights' layout (what a checkpoint saves)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.Conv2d(16, 4, 1),
                                torch.nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    ours_model, torch_model = copy.deepcopy(model), copy.deepcopy(model)
    ours = build_optimizer(ours_model, base_lr=0.02, momentum=0.9, weight_decay=1e-4)
    reference = torch.optim.SGD([{"params": list(torch_model[:2].parameters()), "weight_decay": 1e-4},
                                 {"params": list(torch_model[2].parameters()), "weight_decay": 0.0}],
                                lr=0.02, momentum=0.9, fused=True)
    weight = ours_model[0].weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]  # randn_like keeps each layout
        for params in (ours_model.parameters(), torch_model.parameters()):
            for p, g in zip(params, grads):
                p.grad = g.clone()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            ours.step()
        reference.step()
        copies = [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")]
        assert copies == []
        for a, b in zip(ours_model.parameters(), torch_model.parameters()):
            assert torch.equal(a, b)
            assert torch.equal(ours.state[a]["momentum_buffer"], reference.state[b]["momentum_buffer"])
    assert ours.state[weight]["momentum_buffer"].stride() == weight.stride()


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
    # a link into storage that is not mounted says so (a file-system trial: "file not found" alone)
    (tmp_path / "linked.pth").symlink_to(tmp_path / "scratch" / "model_final.pth")
    with pytest.raises(CheckpointError, match=rf"linked.pth: checkpoint file not found \(a link to "
                                              rf"{tmp_path}/scratch/model_final.pth, which is not there\)"):
        load_checkpoint(tmp_path / "linked.pth")
    from detection.engine.loading import read_detector_file

    with pytest.raises(CheckpointError, match=r"linked.pth: weights file not found \(a link to .*, which is not there"):
        read_detector_file(tmp_path / "linked.pth")


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint({"rng": get_rng_states()}, tmp_path / "c.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_states(load_checkpoint(tmp_path / "c.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_training_state_follows_solver_lr_schedule():
    from detection.config import load_config
    from detection.engine.train_state import build_train_state

    cfg = load_config(None, ["model.backbone.depth=18", "solver.lr_schedule=cosine", "solver.max_iter=100",
                             "solver.warmup_iters=0", "solver.base_lr=0.02", "solver.steps=[10]"])
    state = build_train_state(cfg, torch.device("cpu"), backbone_needed=False)
    for _ in range(50):
        state.optimizer.step()
        state.scheduler.step()
    # halfway through the cosine; a multistep schedule would be at 0.002 after step 10
    assert state.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_the_trainers_public_names_still_come_from_the_trainer():
    """Tools, the benchmark, the study and users import these from detection.engine.trainer,
    whichever of its parts defines them; the errors keep their kinds (tools map them to exit codes)."""
    from detection.engine import trainer

    for name in trainer.__all__:
        assert getattr(trainer, name) is not None, name
    assert {"train", "evaluate", "forward_losses", "optimizer_step", "build_train_data_loader", "summary_lines",
            "GracefulStop", "TrainState", "TrainingError", "TrainingStopped"} <= set(trainer.__all__)
    assert issubclass(trainer.TrainingStopped, trainer.TrainingInterrupted)
    assert issubclass(trainer.TrainingInterrupted, KeyboardInterrupt)
    assert issubclass(trainer.TrainingError, RuntimeError)


def test_a_schedule_cut_short_is_warned_of_and_repeated_steps_are_refused():
    """A long config's max_iter cut for a short run leaves steps (and warmup) that never happen:
    the lr is then never lowered, or never reaches base_lr (Detectron2 warns of the steps too). A
    step inside the warmup is said too: this schedule multiplies the ramp by gamma there,
    Detectron2's ramps to the lowered lr (0.0098 against 0.00099 at iteration 49 of warmup 100,
    step 50: a Detectron2 trial)."""
    from detection.config import ConfigError, load_config
    from detection.engine.startup import schedule_warnings

    cut = load_config(None, ["solver.max_iter=100", "solver.steps=[50, 100, 200]", "solver.warmup_iters=100",
                             "solver.base_lr=0.02"])
    assert schedule_warnings(cut) == [
        "solver.steps 100, 200 are not below solver.max_iter 100: the lr is not lowered there (give steps "
        "within the run)",
        "solver.steps 50 is inside the warmup (solver.warmup_iters 100): the warmup ramp is multiplied by gamma "
        "from there (Detectron2 ramps to the lowered lr instead; the two differ until the warmup ends): put the "
        "steps after the warmup",
        "solver.warmup_iters 100 is not below solver.max_iter 100: the whole run is warmup and the lr never "
        "reaches solver.base_lr 0.02"]
    assert schedule_warnings(load_config(None, ["solver.max_iter=100", "solver.steps=[50, 99]",
                                                "solver.warmup_iters=50"])) == []  # a step at the warmup's end
    cosine = ["solver.max_iter=100", "solver.steps=[500]", "solver.warmup_iters=9", "solver.lr_schedule=cosine"]
    assert schedule_warnings(load_config(None, cosine)) == []  # the cosine schedule has no steps
    # a long-run trial: the best AP (evaluated every 4) had no checkpoint (kept every 5)
    between = ["solver.checkpoint_period=5", "solver.keep_checkpoints=3", "test.eval_period=4"]
    assert schedule_warnings(load_config(None, between)) == [
        "test.eval_period 4 is not a multiple of solver.checkpoint_period 5: most evaluated iterations have no "
        "checkpoint kept (solver.keep_checkpoints) to pick by its AP; make the one a multiple of the other, or "
        "test.save_best=AP keeps the best evaluation's weights as model_best.pth"]
    assert schedule_warnings(load_config(None, [*between, "test.eval_period=10"])) == []
    assert schedule_warnings(load_config(None, [*between, "test.save_best=AP"])) == []  # the best one is kept
    assert schedule_warnings(load_config(None, [*between, "solver.keep_checkpoints=0"])) == []  # none kept anyway
    with pytest.raises(ConfigError, match=r"solver\.steps.*increasing positive iterations"):
        load_config(None, ["solver.steps=[1537, 1537]"])


def test_accel_levers_with_the_fast_path_off_are_said_to_do_nothing():
    from detection.config import load_config
    from detection.engine.inference_model import levers_without_fast_path

    off = load_config(None, ["model.fast_path=false", "accel.sync_free_postprocess=true", "accel.compile=default"])
    assert levers_without_fast_path(off) == ("accel.sync_free_postprocess, accel.compile: levers of the fast path, "
                                             "which model.fast_path: false turns off: they do nothing")
    assert levers_without_fast_path(load_config(None, ["model.fast_path=false"])) is None
    assert levers_without_fast_path(load_config(None, ["accel.compile=default"])) is None


def test_gpu_peak_memory_is_each_lines_own_window(monkeypatch):
    """Each line's max_mem_mb is the peak since the previous line (the counter reset after reading,
    as Detectron2's TorchMemoryStats hook does); the peak since the start kept one evaluation's
    peak in every later line."""
    from detection.engine import metrics

    calls = []
    monkeypatch.setattr(metrics.torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(metrics.torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append(device))
    cuda = torch.device("cuda", 0)
    assert metrics.peak_memory(cuda) == {"max_mem_mb": 3.0} and calls == [cuda]
    assert set(metrics.peak_memory(torch.device("cpu"))) == {"max_rss_mb"} and calls == [cuda]


def test_the_test_sets_summary_counts_objects_per_class_and_images_without_any():
    """A curator's trial: a test image whose labels were all deleted was never mentioned."""
    import numpy as np

    from detection.config import load_config
    from detection.data.dataset_info import DatasetInfo
    from detection.engine.startup import summary_of_test_sets

    records = [{"image_id": i, "labels": np.array(labels, np.int64)} for i, labels in enumerate([[1, 2, 2], [], [2]])]
    dataset = DatasetInfo(name="mine", kind="coco", class_names=["cat", "dog", "owl"], records=records)
    assert summary_of_test_sets(load_config(None, []), [dataset]) == [
        "test set mine: 3 images, 3 classes (1 without objects), objects per class: cat 1, dog 3, owl 0"]
    one = DatasetInfo(name="one", kind="coco", class_names=["cat"],
                      records=[{"image_id": 0, "labels": np.array([1, 1], np.int64)}])
    assert summary_of_test_sets(load_config(None, []), [one]) == [  # a first try's "1 images, 1 classes"
        "test set one: 1 image, 1 class, objects per class: cat 2"]


def test_objects_resized_under_half_the_smallest_anchor_are_said():
    """A dense-scene trial: 4000x3000 images shrunk to 640x480 made 8-20 px objects 1-2 px, AP 0 with
    no word. The median object's side (square root of its area) as the model sees it, against half
    the smallest anchor (an IoU under 0.25 with every anchor: below the RPN's background threshold)."""
    from detection.data.dataset_info import DatasetInfo
    from detection.engine.startup import small_objects_line

    boxes = np.array([[0, 0, 10, 10], [100, 100, 110, 120], [200, 200, 240, 240]], np.float32)  # sides 10, 14.1, 40
    record = {"image_id": 1, "file_name": "a.jpg", "height": 3000, "width": 4000, "boxes": boxes,
              "labels": np.ones(3, np.int64)}
    dataset = DatasetInfo(name="aerial", kind="coco", class_names=["car"], records=[record])
    # 3000 -> 480 (0.16): the median 14.14 px becomes 2.26 px, under 16 / 2
    assert small_objects_line(dataset, 480, 640, [32, 64], "input.min_size_test") == (
        "test set aerial: half its objects are under 2.3 px (the square root of their area) at input.min_size_test "
        "480, under half the smallest anchor (model.anchors.sizes: 32): their IoU with every anchor is under 0.25, "
        "below the RPN's background threshold 0.3, so few are proposed; raise input.min_size_test, train with smaller "
        "model.anchors.sizes (not under 16: model.anchors.stride), or cut the images into tiles (test.tiles.size at "
        "test time)")
    # anchors already at the stride: smaller ones would leave objects between their centres (below)
    assert "raise input.min_size_test, or cut the images" in small_objects_line(dataset, 480, 640, [16],
                                                                                  "input.min_size_test")
    assert small_objects_line(dataset, 3000, 4000, [16], "input.min_size_test") is None  # 14.1 px: over 8
    assert small_objects_line(dataset, 3000, 4000, [32], "input.min_size_test") is not None  # under 16
    # run in tiles of 480 (test.tiles.size), each resized as an image: their objects keep their size
    assert small_objects_line(dataset, 480, 640, [16], "input.min_size_test", tile=480) is None


def test_objects_that_can_lie_between_the_anchor_centres_are_said():
    """A small-object trial: following the warning above's advice (anchors of 4 px for 6 px
    cells) left 58% of the objects without any anchor overlapping them (centres every 16 px), so
    without a target, and nothing was said. A 6 px square and an 8 px one overlap when their
    centres are under 7 px apart in x and y: from the nearest anchor centre, within 8 px in
    each, that is (14 / 16)^2 of the places; 23% have no anchor. With 4 px anchors (10 / 16)^2:
    61% have none; one 16 px anchor reaches them all."""
    from detection.config import load_config
    from detection.data.dataset_info import DatasetInfo
    from detection.engine.startup import small_objects_line, small_objects_warnings

    boxes = np.array([[10, 10, 16, 16]] * 5, np.float32)  # 6 x 6 px
    record = {"image_id": 1, "file_name": "a.jpg", "height": 100, "width": 100, "boxes": boxes,
              "labels": np.ones(5, np.int64)}
    cells = DatasetInfo(name="cells", kind="coco", class_names=["cell"], records=[record])
    assert small_objects_line(cells, 100, 1000, [8], "input.min_size_train", "training") == (
        "training set cells: about 23% of its objects, at input.min_size_train 100, lie between the anchor centres "
        "(every 16 px) with no anchor overlapping them (model.anchors.sizes [8]: an object and an anchor whose sides "
        "add up to under 16 px can miss each other), so the RPN has no target for them and few are proposed; anchors "
        "of 10 px or more miss under a tenth of them; or raise input.min_size_train, or cut the images into tiles")
    # ((6 + 10) / 16)^2 = 1: none missed; 9 px: (15 / 16)^2 = 0.88, 12% missed
    assert "about 61% of its objects" in small_objects_line(cells, 100, 1000, [4], "input.min_size_train")
    many = DatasetInfo(name="many", kind="coco", class_names=["cell"], records=[  # a COCO-sized set: a sample of it
        {**record, "boxes": np.array([[10, 10, 16, 16]] * 25000, np.float32)}])
    assert "about 61% of its objects" in small_objects_line(many, 100, 1000, [4], "input.min_size_train")
    assert small_objects_line(cells, 100, 1000, [8, 16], "input.min_size_train") is None
    # thin objects (2 x 40 px): a 4 px anchor reaches them within 3 px in x, everywhere in y: 3 / 8 of the
    # places, 62% missed; (2 + 13) / 2 = 7.5 px of 8 misses 6% (a review: the square root of the area,
    # 8.9 px, made "anchors of 8 px" where 12 px ones still miss 12%)
    thin = DatasetInfo(name="thin", kind="coco", class_names=["cell"], records=[
        {**record, "boxes": np.array([[10, 10, 12, 50]] * 5, np.float32)}])
    line = small_objects_line(thin, 100, 1000, [4], "input.min_size_train")
    assert "about 62% of its objects" in line and "anchors of 13 px or more miss under a tenth of them" in line
    assert small_objects_line(cells, 100, 1000, [12], "input.min_size_train") is None  # 6 + 12 > 16
    # at 200 px the cells are 12 px: an 8 px anchor reaches them everywhere
    assert small_objects_line(cells, 200, 1000, [8], "input.min_size_train") is None
    # a wide and a tall anchor reach farther in x and in y: with ratios 0.5, 1, 2, 5% are missed (under a tenth);
    # 4 px ones cover (4.41 x 5.83 + 0.59 x 5 + 0.83 x 4.41) / 64 of the places: 49.5% missed
    assert small_objects_line(cells, 100, 1000, [8], "input.min_size_train", aspect_ratios=[0.5, 1.0, 2.0]) is None
    assert "about 50% " in small_objects_line(cells, 100, 1000, [4], "input.min_size_train",
                                              aspect_ratios=[0.5, 1.0, 2.0])
    # test-time augmentation runs at test.aug.min_sizes only: those are the sizes checked (a trial: TTA at 24
    # and 32 px was not said, and input.min_size_test 32 was said though never run)
    cfg = load_config(None, ["model.anchors.sizes=[4]", "input.min_size_test=400", "test.aug.enabled=true",
                             "test.aug.min_sizes=[80,100]"])
    assert small_objects_warnings(cfg, [], [cells]) == [small_objects_line(
        cells, 100, 4000, [4], "test.aug.min_sizes' largest", max_key="test.aug.max_size",
        aspect_ratios=[0.5, 1.0, 2.0])] != [None]
    assert "test set cells: about 50% of its objects, at test.aug.min_sizes' largest 100, lie between" in \
        small_objects_warnings(cfg, [], [cells])[0]
    cfg.test.aug.min_sizes, cfg.input.min_size_test = [400], 100
    assert small_objects_warnings(cfg, [], [cells]) == []


def test_a_restored_training_state_has_the_iteration_momentum_lr_and_random_state_of_the_saved_one():
    """A mutation audit: a resume one iteration off, without the optimizer's momentum, or without
    the random states was caught only by a slow training test (resume equals a straight run)."""
    from torch import nn

    from detection.config import load_config
    from detection.engine.loop_checkpoints import training_checkpoint
    from detection.engine.optim import build_lr_scheduler, build_optimizer
    from detection.engine.train_state import TrainState, amp_scaler, restore_train_state

    def state() -> TrainState:
        model = nn.Linear(3, 2)
        optimizer = build_optimizer(model, base_lr=0.1, momentum=0.9, weight_decay=1e-4)
        return TrainState(model, optimizer, build_lr_scheduler(optimizer, warmup_iters=10, warmup_factor=0.1,
                                                               steps=[5], gamma=0.1),
                          amp_scaler(False, torch.device("cpu")))

    torch.manual_seed(0)
    saved = state()
    for _ in range(7):
        saved.model(torch.randn(4, 3)).sum().backward()
        saved.optimizer.step()
        saved.optimizer.zero_grad()
        saved.scheduler.step()
        saved.iteration += 1
    checkpoint = training_checkpoint(saved, load_config(None, []), [get_rng_states()])
    next_draw = torch.rand(3)
    restored = state()
    torch.manual_seed(123)
    restore_train_state(restored, checkpoint)
    assert restored.iteration == 7
    assert torch.equal(torch.rand(3), next_draw)
    for p, q in zip(saved.model.parameters(), restored.model.parameters()):
        assert torch.equal(saved.optimizer.state[p]["momentum_buffer"], restored.optimizer.state[q]["momentum_buffer"])
    assert [g["lr"] for g in restored.optimizer.param_groups] == [g["lr"] for g in saved.optimizer.param_groups]


def test_the_small_objects_warning_names_the_longer_sides_cap_when_it_sets_the_scale():
    """A trial: 3200x800 panoramas at 352 / 640 were told to raise input.min_size_test, which
    changes nothing there: max_size_test caps their scale (0.2: 31 px circles became 6.2 px)."""
    from detection.data.dataset_info import DatasetInfo
    from detection.engine.startup import small_objects_line

    record = {"image_id": 1, "file_name": "p.jpg", "height": 800, "width": 3200,
              "boxes": np.array([[100, 100, 131, 131]], np.float32), "labels": np.ones(1, np.int64)}
    line = small_objects_line(DatasetInfo(name="pano", kind="coco", class_names=["circle"], records=[record]),
                              352, 640, [16], "input.min_size_test")
    assert "half its objects are under 6.2 px (the square root of their area) at input.max_size_test 640, which " \
        "caps most of these images' scale" in line and "; raise input.max_size_test," in line


def test_images_shared_by_training_sets_or_with_a_test_set_are_said(tmp_path):
    """A pseudo-labelling trial: a teacher's json over the labelled images, and the held-out set
    listed as a training set, trained without a word. One set listed twice (to see it twice as
    often) is not warned of; a test set is, whatever its listing."""
    from detection.data import DatasetInfo
    from detection.engine.startup import shared_images_warnings

    def info(name, files, ann_file):
        records = [{"file_name": str(tmp_path / "img" / f), "image_id": i, "height": 8, "width": 8,
                    "boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                    "difficult": np.zeros(0, bool)} for i, f in enumerate(files)]
        return DatasetInfo(name=name, kind="coco", class_names=["x"], records=records,
                           ann_file=str(tmp_path / ann_file))

    labelled = info("labelled", ["a.jpg", "b.jpg", "c.jpg"], "labelled.json")
    pseudo = info("pseudo", ["c.jpg", "d.jpg", "b.jpg"], "pseudo.json")
    held_out = info("held_out", ["e.jpg", "a.jpg"], "held_out.json")
    other = info("other", ["f.jpg"], "other.json")
    assert shared_images_warnings([labelled, labelled, other], [info("t", ["g.jpg"], "t.json")]) == []
    lines = shared_images_warnings([labelled, pseudo, labelled], [held_out])
    img = tmp_path / "img"
    assert lines == [
        f"training sets labelled and pseudo share 2 image files ({img / 'b.jpg'}, {img / 'c.jpg'}): each trains with "
        "both sets' boxes (a teacher's pseudo-labels over labelled images?); list one set twice to see it twice as "
        "often",
        f"test set held_out shares 1 of its 2 image files with training set labelled ({img / 'a.jpg'}): its metrics "
        "are not of held-out images"]
    relative = info("labelled", ["a.jpg"], "labelled.json")
    # one file, spelt otherwise: relative, through a folder and back
    relative.records[0]["file_name"] = os.path.relpath(tmp_path / "img" / "x" / ".." / "a.jpg")
    assert len(shared_images_warnings([relative], [held_out])) == 1
    # a link to a labelled image in the unlabelled folder, and a folder linked to the images (a review)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    (tmp_path / "unl").mkdir()
    (tmp_path / "unl" / "linked.jpg").symlink_to(tmp_path / "img" / "a.jpg")
    (tmp_path / "also").symlink_to(tmp_path / "img", target_is_directory=True)
    for files in (["../unl/linked.jpg"], ["../also/a.jpg"]):  # each alone (a review: with both, one hid the other)
        linked = info("linked", files, "linked.json")
        assert linked.records[0]["file_name"] == str(tmp_path / "img" / files[0])
        lines = shared_images_warnings([linked], [held_out])
        assert lines == [f"test set held_out shares 1 of its 2 image files with training set linked "
                         f"({img / 'a.jpg'}): its metrics are not of held-out images"]  # not as a copy: the file
        assert shared_images_warnings([labelled, linked], [])[0].startswith(
            "training sets labelled and linked share 1 ")


def test_copies_with_the_same_bytes_count_as_shared_images(tmp_path):
    """A split made by copying files: the test set's image saved under another name in the
    training folder is the same image, found by its bytes. Files of the same size that differ
    (where the start, middle and end read first agree too), empty files and files that cannot be
    read, are not."""
    from detection.data import DatasetInfo
    from detection.engine.startup import shared_images_warnings
    from detection.utils.files import same_bytes

    rng = np.random.default_rng(0)
    big, small = rng.bytes(20000), rng.bytes(100)
    middle = big[:6000] + bytes([big[6000] ^ 1]) + big[6001:]  # past the start, middle and end read first
    files = {"train/a.jpg": big, "train/b.jpg": small, "train/c.jpg": middle, "train/empty.jpg": b"",
             "test/x.jpg": big, "test/y.jpg": small[:-1] + bytes([small[-1] ^ 1]), "test/z.jpg": big[:-1] + b"\1",
             "test/v.jpg": big[:7000] + bytes([big[7000] ^ 1]) + big[7001:], "test/empty.jpg": b""}
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    train = {str(tmp_path / "train" / n) for n in ("a.jpg", "b.jpg", "c.jpg", "empty.jpg", "gone.jpg")}
    test = {str(tmp_path / "test" / n) for n in ("x.jpg", "y.jpg", "z.jpg", "v.jpg", "empty.jpg", "gone.jpg")}
    assert same_bytes(test, train) == {str(tmp_path / "test" / "x.jpg"): str(tmp_path / "train" / "a.jpg")}
    (tmp_path / "test" / "w.jpg").write_bytes(middle)  # c.jpg's bytes, which differ from a.jpg's in the gap
    assert same_bytes({str(tmp_path / "test" / "w.jpg")}, train) == {str(tmp_path / "test" / "w.jpg"):
                                                                     str(tmp_path / "train" / "c.jpg")}
    assert same_bytes(train, train) == {}  # a file is not a copy of itself
    assert same_bytes(test | train, train) == same_bytes(test, train)  # nor a file both have of another

    def info(name, paths):
        records = [{"file_name": p, "image_id": i, "height": 8, "width": 8, "boxes": np.zeros((0, 4), np.float32),
                    "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)}
                   for i, p in enumerate(sorted(paths))]
        return DatasetInfo(name=name, kind="coco", class_names=["x"], records=records, ann_file=str(tmp_path / name))

    x, a = tmp_path / "test" / "x.jpg", tmp_path / "train" / "a.jpg"
    assert shared_images_warnings([info("train", train)], [info("test", test | {str(a)})]) == [
        f"test set test shares 2 of its 7 image files with training set train ({a}; a copy with the same bytes under "
        f"another path: {x} = {a}): its metrics are not of held-out images"]
    assert shared_images_warnings([info("train", train), info("more", {str(x)})], []) == [
        f"training sets train and more share 1 image file (a copy with the same bytes under another path: {a} = {x}): "
        "each trains with both sets' boxes (a teacher's pseudo-labels over labelled images?); list one set twice to "
        "see it twice as often"]
