"""Faults during training and evaluation: SIGTERM / SIGINT stop gracefully and
resume exactly, a resume with two processes equals a straight run bit for bit, messages say
what really exists, a failing disk never corrupts a checkpoint or a results file, one trainer
per output folder, and evaluation memory that grows no faster than the results."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detection.cli import EXIT_TRY_AGAIN, project_error_code
from detection.config import load_config
from detection.data.shapes import generate_shapes
from detection.engine import checkpoint as ckpt_mod
from detection.engine.checkpoint import CheckpointError, load_checkpoint, load_resume_checkpoint, save_checkpoint
from detection.engine.run_folder import LOCK_FILE, RunLock
from detection.engine.trainer import TrainingError, TrainingInterrupted, train
from detection.utils.files import OutputFolderError, atomic_write
from tests.helpers import load_tool, run_forked_processes, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
train_det = load_tool("train_det")
pytestmark = pytest.mark.usefixtures("restore_logging")
SHAPES_IMAGES = (8, 2)  # data_root's training and validation images




def tiny_cfg(data_root, out_dir, **extra):
    return load_config(None, tiny_overrides(data_root, out_dir, **extra))


def run_tool(data_root, out, *flags, **extra) -> int:
    argv = ["--config", str(ROOT / "configs" / "base.yaml"), *flags, *tiny_overrides(data_root, out, **extra)]
    try:
        return train_det.main(argv)
    except SystemExit as err:
        return err.code


def at_forward(monkeypatch, call: int, action) -> None:
    """Run `action()` at the start of the call-th training forward pass."""
    from detection.modeling.model import FasterRCNN

    calls = {"n": 0}
    real_forward = FasterRCNN.forward

    def forward(self, images, targets=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == call:
                action()
        return real_forward(self, images, targets)

    monkeypatch.setattr(FasterRCNN, "forward", forward)


def evaluation_iterations(out: Path) -> list[int]:
    """The iterations metrics.jsonl holds an evaluation of."""
    from detection.engine.metrics import is_evaluation

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in records if is_evaluation(r)]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_TORCH_SAVE = torch.save


def enospc_save(after_bytes: int = 100, error: BaseException | None = None):
    """torch.save itself, into a file whose writes fail after `after_bytes` as a full disk's do
    (OSError ENOSPC; or `error`, e.g. a second Ctrl-C). torch's zip writer then raises its own
    RuntimeError ("enforce fail ... unexpected pos") on closing, as on a real full disk."""
    def save(obj, f):
        written = [0]

        class Failing:
            def write(self, data):
                written[0] += len(data)
                if written[0] > after_bytes:
                    raise error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)

            def flush(self):
                f.flush()

        _TORCH_SAVE(obj, Failing())
    return save


# ----------------------------------------------------------------------------- graceful stop

def test_sigterm_before_the_loop_stops_as_ctrl_c_does(data_root, tmp_path, capsys, monkeypatch):
    """Between the checks and the first iteration (the output folder made, the loader built)
    SIGTERM ended the process without a word (Python's default), leaving config.yaml, log.txt and
    train.lock: now one line, exit 143, and the run's start taken back, as Ctrl-C there."""
    import detection.engine.trainer as trainer_mod

    real = trainer_mod.build_train_data_loader

    def loader_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "build_train_data_loader", loader_then_sigterm)
    out = tmp_path / "run"
    assert run_tool(data_root, out, **{"solver.max_iter": 2}) == 143
    assert "stopped by SIGTERM before training started" in capsys.readouterr().err
    assert not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back


@pytest.mark.slow  # trains through train_det.main
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])  # USR1: Slurm's warning
def test_a_signal_finishes_the_iteration_saves_last_pth_and_resume_is_exact(data_root, tmp_path, capsys,
                                                                           monkeypatch, signum):
    extra = {"solver.max_iter": 5, "solver.checkpoint_period": 100, "input.hflip_prob": 0.5}
    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        at_forward(patch, 3, lambda: os.kill(os.getpid(), signum))
        assert run_tool(data_root, out, **extra) == 128 + signum  # 143 for SIGTERM, 130 for SIGINT, 138 for USR1
    raw = capsys.readouterr().err
    assert "\r" not in raw  # no progress bar off a terminal (a batch job's log got ~200 bytes of it an iteration)
    err = raw.split("\n")
    name = signal.Signals(signum).name
    assert f"stopped by {name} at iteration 3; saved {out / 'last.pth'} (iteration 3): --resume continues " \
           "from there" in err
    assert not any("Traceback" in line for line in err)
    # log.txt ends with it too (the tool prints it after log.txt is closed)
    last = (out / "log.txt").read_text().splitlines()[-1]
    assert f"WARNING detection.engine.trainer: run ended: stopped by {name} at iteration 3; saved " in last
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 3  # the 3rd iteration was finished
    assert not (out / "model_final.pth").exists() and not (out / LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were put back
    if signum != signal.SIGTERM:
        return  # the same stop; the resume is checked once, after SIGTERM
    assert run_tool(data_root, out, "--resume", **extra) == 0
    assert run_tool(data_root, tmp_path / "straight", **extra) == 0
    straight = load_checkpoint(tmp_path / "straight" / "model_final.pth")["model"]
    assert same_weights(load_checkpoint(out / "model_final.pth")["model"], straight)  # bit for bit


@pytest.mark.slow  # trains through train_det.main, three times
def test_a_signal_during_the_evaluation_stops_it_saves_last_pth_and_resume_makes_it(data_root, tmp_path, capsys,
                                                                                    monkeypatch):
    """A scheduler's SIGTERM during training's evaluation (minutes on COCO, longer than its grace
    period) stopped nothing until the evaluation ended; last.pth was then older than the
    iteration. Now the evaluation stops at once, last.pth is saved at the iteration, and
    --resume makes the evaluation first: the end is a straight run's, bit for bit."""
    from detection.modeling.model import FasterRCNN

    extra = {"solver.max_iter": 4, "solver.checkpoint_period": 100, "test.eval_period": 2}
    out, real_forward, evaluated = tmp_path / "stopped", FasterRCNN.forward, []

    def forward(self, images, targets=None):
        if not self.training:
            evaluated.append(len(images))
            if len(evaluated) == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, images, targets)

    with monkeypatch.context() as patch:
        patch.setattr(FasterRCNN, "forward", forward)
        assert run_tool(data_root, out, **extra) == 143
    assert len(evaluated) == 1  # stopped at its first batch, not after every test image
    assert "SIGTERM received during the evaluation: stopping it and saving last.pth" in capsys.readouterr().err
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 2
    assert evaluation_iterations(out) == []
    assert run_tool(data_root, out, "--resume", **extra) == 0
    assert "no evaluation of iteration 2" in capsys.readouterr().err
    assert evaluation_iterations(out) == [2, 4]
    assert run_tool(data_root, tmp_path / "straight", **extra) == 0
    straight = load_checkpoint(tmp_path / "straight" / "model_final.pth")["model"]
    assert same_weights(load_checkpoint(out / "model_final.pth")["model"], straight)  # bit for bit


def test_a_signal_just_before_the_evaluation_stops_it_too():
    """A signal in the iteration (or the checkpoint save) just before an evaluation came before
    the evaluation began: it must not then run to its end."""
    from detection.engine.signals import EvaluationStopped, GracefulStop

    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(EvaluationStopped):
            with stop.evaluation():
                pytest.fail("the evaluation ran")


@pytest.mark.slow  # trains through train_det.main, with a loader worker
def test_a_sigterm_to_the_whole_job_also_reaching_the_loader_workers_still_stops_by_saving(data_root, tmp_path,
                                                                                          capsys, monkeypatch):
    """Slurm's scancel and a pre-emption signal every process of the job, the DataLoader's workers
    too: they died of it, and the run ended with a worker's traceback and exit 1, the iterations
    since the last checkpoint lost (a trial). The workers leave the stop to the main process."""
    import multiprocessing

    def to_the_job():  # from another process (PyTorch's workers take their parent's SIGTERM as a shutdown)
        workers = [str(worker.pid) for worker in multiprocessing.active_children()]
        assert workers
        subprocess.run(["kill", "-TERM", *workers, str(os.getpid())], check=True)

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        at_forward(patch, 3, to_the_job)
        assert run_tool(data_root, out, **{"solver.max_iter": 5, "solver.checkpoint_period": 100,
                                           "dataloader.num_workers": 1}) == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM at iteration 3; saved {out / 'last.pth'} (iteration 3)" in err
    assert "Traceback" not in err and "killed by signal" not in err
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 3

def test_a_signal_passed_on_by_a_launcher_is_the_same_stop(monkeypatch):
    """Slurm signals every process of a job step and torchrun passes its own SIGTERM on, so each
    worker gets two within moments (a review): the second stopped the worker at once, without
    saving last.pth. A second signal within REPEAT_WINDOW_S of the first (or of the ranks'
    agreement) is the same stop; a later one still stops at once, as a second Ctrl-C."""
    from detection.engine import signals

    with signals.GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's, a moment after the scheduler's
        os.kill(os.getpid(), signal.SIGINT)   # a terminal's Ctrl-C reaches torchrun and its workers too
        assert stop.signum == signal.SIGTERM
        monkeypatch.setattr(signals, "REPEAT_WINDOW_S", 0.0)  # the window has passed: a deliberate second stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_a_forked_data_loader_worker_ignores_the_runs_signal_handler():
    """The evaluation's loader workers are forked with the run's handler, and a Ctrl-C reaches the
    whole process group: the handler raised EvaluationStopped in each worker, which died, and the
    loader's 'worker exited unexpectedly' then broke the run's save (a reviewer's repro)."""
    import time

    from detection.engine.signals import GracefulStop

    with GracefulStop() as stop, stop.evaluation():
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs here
                os._exit(0)
            except BaseException:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert stop.signum == 0  # the run's own process got no signal


@pytest.mark.slow  # trains
def test_a_second_signal_during_the_save_does_not_corrupt_it(data_root, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    real_save = ckpt_mod.torch.save

    def save_hit_by_a_signal(obj, f):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, in the middle of the save
        f.write(b"")  # (the handler runs here, between bytecodes)
        real_save(obj, f)

    def first_signal():
        os.kill(os.getpid(), signal.SIGTERM)
        monkeypatch.setattr(ckpt_mod.torch, "save", save_hit_by_a_signal)

    at_forward(monkeypatch, 2, first_signal)
    with pytest.raises(KeyboardInterrupt, match="stopped by SIGTERM at iteration 2"):
        train(tiny_cfg(data_root, out, **{"solver.max_iter": 6, "solver.checkpoint_period": 100}))
    assert "received again while last.pth is being saved: finishing the save first" in caplog.text
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pth", "log.txt", "metrics.jsonl"]


# ----------------------------------------------------------------------------- exact resume, two processes

@contextlib.contextmanager
def gloo_process(rank: int, world: int, init_file: str):
    """One forked process of a `world`-process gloo group, for the block."""
    torch.set_num_threads(1)  # a forked child must not reuse the parent's thread pool
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _ddp_train(rank: int, world: int, init_file: str, overrides: list, out_file: str, resume: bool,
               sigterm_rank_1_at: int = 0) -> None:
    """train() in one of `world` forked gloo processes; the trained weights, or the stop message,
    go to out_file.<rank>. With sigterm_rank_1_at, rank 1 alone gets a SIGTERM in that
    iteration (as when a scheduler signals one process): every rank must stop there."""
    from detection.engine.trainer import TrainingStopped

    with gloo_process(rank, world, init_file):
        if sigterm_rank_1_at and rank == 1:
            at_forward(pytest.MonkeyPatch(), sigterm_rank_1_at, lambda: os.kill(os.getpid(), signal.SIGTERM))
        try:
            model = train(load_config(None, overrides), resume=resume)
        except TrainingStopped as stop:
            Path(f"{out_file}.{rank}.stopped").write_text(str(stop))
            return
        torch.save(model.state_dict(), f"{out_file}.{rank}")


@pytest.mark.slow  # two DDP processes train three times
def test_two_process_resume_equals_a_straight_run_bit_for_bit(data_root, tmp_path):
    """A 2-process run stopped by a SIGTERM (to rank 1 only) at iteration 2 and resumed to 4
    equals a straight 4-iteration run, bit for bit, on both ranks."""
    extra = {"solver.ims_per_batch": 4, "solver.max_iter": 4, "solver.checkpoint_period": 100, "log_period": 1,
             "input.hflip_prob": 0.5}

    def ddp(name: str, resume: bool = False, sigterm_at: int = 0) -> None:
        overrides = tiny_overrides(data_root, tmp_path / name, **extra)
        init = tmp_path / f"init_{name}_{resume}"
        run_forked_processes(_ddp_train, (2, str(init), overrides, str(tmp_path / f"{name}.pt"), resume,
                                          sigterm_at), timeout=240)

    ddp("straight")
    ddp("resumed", sigterm_at=2)
    last = tmp_path / "resumed" / "last.pth"
    for rank in (0, 1):  # both ranks stopped there, though only rank 1 got the signal
        assert (tmp_path / f"resumed.pt.{rank}.stopped").read_text() == \
            f"stopped by SIGTERM at iteration 2; saved {last} (iteration 2): --resume continues from there"
    midway = load_resume_checkpoint(last)
    assert midway["iteration"] == 2
    # every rank's states are saved, and they differ (each rank sampled for its own images)
    assert len(midway["rng_per_rank"]) == 2
    assert not torch.equal(midway["rng_per_rank"][0]["torch"], midway["rng_per_rank"][1]["torch"])
    ddp("resumed", resume=True)
    for rank in (0, 1):
        straight = torch.load(tmp_path / f"straight.pt.{rank}", weights_only=True)
        resumed = torch.load(tmp_path / f"resumed.pt.{rank}", weights_only=True)
        assert same_weights(straight, resumed), rank
    lines = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    keys = ("loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box")
    assert [[x[k] for k in keys] for x in again] == [[x[k] for k in keys] for x in lines]


def _ddp_train_signalled_in_evaluation(rank: int, world: int, init_file: str, overrides: list, out_file: str,
                                       at_batch: int = 1) -> None:
    """train() in one of `world` forked gloo processes; rank 1 alone gets a SIGTERM in its
    `at_batch`-th evaluation batch. The stop message (or "finished") and the number of evaluation
    batches this rank ran go to out_file.<rank>."""
    from detection.engine.trainer import TrainingStopped
    from detection.modeling.model import FasterRCNN

    real_forward, evaluated = FasterRCNN.forward, []

    def forward(self, images, targets=None):
        if not self.training:
            evaluated.append(len(images))
            if rank == 1 and len(evaluated) == at_batch:
                os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(self, images, targets)

    with gloo_process(rank, world, init_file), pytest.MonkeyPatch.context() as patch:
        patch.setattr(FasterRCNN, "forward", forward)
        try:
            train(load_config(None, overrides))
            ended = "finished"
        except TrainingStopped as stop:
            ended = str(stop)
        Path(f"{out_file}.{rank}").write_text(json.dumps({"ended": ended, "batches": len(evaluated)}))


@pytest.mark.slow  # two DDP processes train two iterations and start an evaluation
def test_a_signal_to_one_process_during_the_evaluation_stops_every_process_at_the_next_batch(tmp_path):
    """Under torchrun a scheduler's SIGTERM during training's evaluation let the evaluation run
    to its end (minutes on COCO, past the grace period: then SIGKILL, and last.pth up to
    checkpoint_period iterations old). Now the ranks agree before each batch: both stop at the
    second of their four batches, and last.pth is saved at the evaluation's iteration."""
    generate_shapes(tmp_path / "data" / "shapes", num_train=4, num_val=8, seed=0, image_size=(64, 80))
    out = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "data", out, **{"solver.ims_per_batch": 4, "solver.max_iter": 4,
                                                          "solver.checkpoint_period": 100, "test.eval_period": 2})
    run_forked_processes(_ddp_train_signalled_in_evaluation, (2, str(tmp_path / "init"), overrides,
                                                               str(tmp_path / "ended")), timeout=240)
    last = out / "last.pth"
    for rank in (0, 1):
        ended = json.loads((tmp_path / f"ended.{rank}").read_text())
        assert ended == {"ended": f"stopped by SIGTERM at iteration 2; saved {last} (iteration 2): --resume "
                                  "continues from there", "batches": 1}, rank
    assert load_resume_checkpoint(last)["iteration"] == 2
    assert evaluation_iterations(out) == []


@pytest.mark.slow  # two DDP processes train two iterations and start an evaluation
def test_ranks_with_unequal_shares_of_the_test_images_agree_to_stop_at_the_same_check(tmp_path):
    """7 test images on 2 ranks: 4 batches and 3. The signal comes in the short rank's last batch,
    so its next check is one it makes after its last batch, as many as the long rank makes: without
    those both would wait for ever (the long rank in its fourth check, the short one gathering)."""
    generate_shapes(tmp_path / "data" / "shapes", num_train=4, num_val=7, seed=0, image_size=(64, 80))
    out = tmp_path / "run"
    overrides = tiny_overrides(tmp_path / "data", out, **{"solver.ims_per_batch": 4, "solver.max_iter": 4,
                                                          "solver.checkpoint_period": 100, "test.eval_period": 2})
    run_forked_processes(_ddp_train_signalled_in_evaluation, (2, str(tmp_path / "init"), overrides,
                                                               str(tmp_path / "ended"), 3), timeout=240)
    for rank in (0, 1):
        ended = json.loads((tmp_path / f"ended.{rank}").read_text())
        assert ended["ended"].startswith("stopped by SIGTERM at iteration 2") and ended["batches"] == 3, rank
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 2


@pytest.mark.slow  # trains 4 + 2 iterations, evaluating
def test_an_evaluation_the_run_stopped_in_is_made_on_resume(data_root, tmp_path, monkeypatch, caplog):
    """The evaluation follows the checkpoint of its iteration: a run killed (here: Ctrl-C) while
    it ran resumes from that checkpoint, so --resume makes it before training on; and a run
    stopped in its final evaluation is not taken as finished (Detectron2 evaluates again at the
    end of a resumed run)."""
    import detection.engine.trainer as trainer_mod

    real_evaluate = trainer_mod.evaluate
    calls = []

    def evaluate_stopped_the_first_time(cfg, model, output_dir=None, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the user's Ctrl-C (or a kill) during the evaluation
        return real_evaluate(cfg, model, output_dir, **kwargs)

    def evaluated(out):
        return [x["iteration"] for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "total_loss" not in x]

    for name, max_iter in (("periodic", 4), ("final", 2)):
        out = tmp_path / name
        cfg = tiny_cfg(data_root, out, **{"solver.max_iter": max_iter, "solver.checkpoint_period": 2,
                                          "test.eval_period": 2})
        calls.clear()
        monkeypatch.setattr(trainer_mod, "evaluate", evaluate_stopped_the_first_time)
        with pytest.raises(TrainingInterrupted):
            train(cfg)
        assert load_checkpoint(out / "last.pth")["iteration"] == 2 and evaluated(out) == []
        caplog.clear()
        train(cfg, resume=True)
        assert evaluated(out) == list(range(2, max_iter + 1, 2)), name
        assert "metrics.jsonl has no evaluation of iteration 2 (the run stopped in it" in caplog.text
        assert (out / "model_final.pth").is_file()


def _ddp_train_recording_evaluation(rank: int, world: int, init_file: str, overrides: list, out_file: str) -> None:
    """train() in one of `world` forked gloo processes; the weights and buffers of the model this
    rank evaluates with at test.eval_period go to out_file.<rank>."""
    import detection.engine.trainer as trainer_mod

    real_evaluate = trainer_mod.evaluate

    def evaluate(cfg, model, output_dir=None, **kwargs):
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, f"{out_file}.{rank}")
        return real_evaluate(cfg, model, output_dir, **kwargs)

    with gloo_process(rank, world, init_file), pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer_mod, "evaluate", evaluate)
        train(load_config(None, overrides))


@pytest.mark.slow  # two DDP processes train two iterations and evaluate
def test_every_process_evaluates_the_model_that_is_saved_with_trainable_batchnorm(data_root, tmp_path):
    """DistributedDataParallel copies rank 0's buffers only when a training forward starts, so
    after a step each rank's BatchNorm statistics are its own batch's: the evaluation's other
    ranks scored their share of the images with a model that was neither rank 0's nor the file's."""
    out = tmp_path / "run"
    overrides = tiny_overrides(data_root, out, **{"model.backbone.norm": "bn", "solver.ims_per_batch": 4,
                                                  "solver.max_iter": 2, "test.eval_period": 2})
    run_forked_processes(_ddp_train_recording_evaluation, (2, str(tmp_path / "init"), overrides,
                                                           str(tmp_path / "evaluated.pt")), timeout=240)
    saved = load_checkpoint(out / "model_final.pth")["model"]
    running = [k for k in saved if k.endswith("running_mean")]
    assert running
    for rank in (0, 1):
        evaluated = torch.load(tmp_path / f"evaluated.pt.{rank}", weights_only=True)
        assert evaluated.keys() == saved.keys()
        different = [k for k in saved if not torch.equal(evaluated[k], saved[k])]
        assert different == [], (rank, different[:3])
    # and the run says that its BatchNorm is per process (there is no SyncBN)
    assert "model.backbone.norm: bn under 2 processes: each BatchNorm normalises over its process's 2 images, not " \
        "the global batch of 4" in (out / "log.txt").read_text()


def _ddp_train_failing_on_rank_1(rank: int, world: int, init_file: str, overrides: list, out_file: str) -> None:
    """train() in one of `world` forked gloo processes; rank 1 alone meets an unreadable image
    in its third iteration. What each rank raised goes to out_file.<rank>."""
    from detection.data import DataError

    def unreadable():
        raise DataError("image /data/train/000123.jpg is a truncated JPEG (no end-of-image marker): the file was "
                        "cut short")

    with gloo_process(rank, world, init_file), pytest.MonkeyPatch.context() as patch:
        if rank == 1:
            at_forward(patch, 3, unreadable)
        try:
            train(load_config(None, overrides))
        except Exception as err:  # noqa: BLE001 (the test reads what each rank raised)
            Path(f"{out_file}.{rank}").write_text(f"{type(err).__name__}: {err}")


@pytest.mark.slow  # two DDP processes train two iterations
def test_a_failure_in_one_process_is_named_in_log_txt(data_root, tmp_path):
    """Only rank 0 writes log.txt, and it sees another rank's failure as a lost connection: the
    failing rank adds its own `run ended in process N` line, and rank 0's line says to look there."""
    out = tmp_path / "run"
    overrides = tiny_overrides(data_root, out, **{"solver.ims_per_batch": 4, "solver.max_iter": 6,
                                                  "solver.checkpoint_period": 2})
    run_forked_processes(_ddp_train_failing_on_rank_1, (2, str(tmp_path / "init"), overrides,
                                                         str(tmp_path / "raised")), timeout=240)
    assert (tmp_path / "raised.1").read_text().startswith("DataError: image /data/train/000123.jpg is a truncated")
    ended = [line for line in (out / "log.txt").read_text().splitlines() if "run ended" in line]
    assert len(ended) == 2, ended
    ours = next(line for line in ended if "run ended in process 1:" in line)
    assert " ERROR detection.engine.trainer: run ended in process 1: image /data/train/000123.jpg is a truncated " \
        "JPEG (no end-of-image marker): the file was cut short; training stopped at iteration 2" in ours, ours
    theirs = next(line for line in ended if "run ended:" in line)
    # rank 0 lost its peer: one line naming where to look and what is kept, not gloo's 40-line
    # traceback ending in "Connection closed by peer" (a distributed trial), on the console too
    assert re.search(r"run ended: another process stopped first \(\w+ at iteration 2: .+\): its own error above, "
                     r"or its 'run ended in process N' line in log.txt, says why; the last good checkpoint .*last\.pth "
                     r"\(iteration 2\) is kept: --resume continues it$", theirs), theirs
    assert (tmp_path / "raised.0").read_text().startswith("TrainingError: another process stopped first (")


def _ddp_train_with_rank_1_told_otherwise(rank: int, world: int, init_file: str, overrides: list, extra: list,
                                          out_file: str) -> None:
    with gloo_process(rank, world, init_file):
        try:
            train(load_config(None, overrides + (extra if rank == 1 else [])))
        except Exception as err:  # noqa: BLE001 (the test reads what each rank raised)
            Path(f"{out_file}.{rank}").write_text(f"{type(err).__name__}: {err}")


def test_processes_given_different_configs_are_refused_before_anything_is_written(data_root, tmp_path):
    """A distributed trial: rank 1 alone with test.eval_period=5 hung both processes in the
    evaluation's collective until the process group's timeout (30 min), unstoppable by SIGTERM;
    rank 1 alone with another base_lr trained apart in silence. Every process refuses at once,
    naming the keys and both values; paths (output_dir, datasets.root) may differ."""
    out = tmp_path / "run"
    overrides = tiny_overrides(data_root, out, **{"solver.ims_per_batch": 4, "solver.max_iter": 6,
                                                  "test.eval_period": 0})
    extra = ["test.eval_period=5", "solver.base_lr=0.002", f"datasets.root={data_root}/."]
    run_forked_processes(_ddp_train_with_rank_1_told_otherwise,
                         (2, str(tmp_path / "init"), overrides, extra, str(tmp_path / "raised")), timeout=120)
    for rank in (0, 1):
        assert (tmp_path / f"raised.{rank}").read_text() == (
            "ConfigError: the 2 processes were not given the same config: solver.base_lr (process 0: 0.01, "
            "process 1: 0.002), test.eval_period (process 0: 0, process 1: 5); give every process the same config "
            "file and command line")
    assert not out.exists()  # refused before the folder was made


@pytest.mark.slow  # trains
def test_resuming_with_another_number_of_processes_says_what_is_not_exact(data_root, tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 2, "solver.checkpoint_period": 2}))
    ckpt = load_checkpoint(out / "last.pth")
    ckpt["rng_per_rank"] = [ckpt["rng"], ckpt["rng"]]  # as if two processes had written it
    save_checkpoint(ckpt, out / "last.pth")
    caplog.set_level(logging.WARNING)
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 3}), resume=True)
    lines = [r.getMessage() for r in caplog.records if "is resumed with 1" in r.getMessage()]
    assert lines == [f"{out / 'last.pth'} was written by 2 processes and is resumed with 1: the data order and the "
                     "random sampling of anchors and RoIs differ from an uninterrupted run's from here on, so the "
                     "result is a valid continuation but not bit-identical"]


@pytest.mark.slow  # trains
def test_resuming_with_another_thread_count_says_what_is_not_exact(data_root, tmp_path, caplog, monkeypatch):
    """The CPU's threads split the sums: a resume under another OMP_NUM_THREADS (a machine with
    other cores) continued with other bits than an uninterrupted run, in silence (a
    reproducibility trial). last.pth keeps the count; a resume with another says so; with the
    same count, nothing."""
    out = tmp_path / "run"
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 2, "solver.checkpoint_period": 2}))
    ckpt = load_checkpoint(out / "last.pth")
    assert ckpt["threads"] == torch.get_num_threads() == 1  # conftest's one thread
    caplog.set_level(logging.WARNING)
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 3}), resume=True)
    assert not [r for r in caplog.records if "is resumed with" in r.getMessage()]
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # as if resumed on a 2-thread process
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 4}), resume=True)
    lines = [r.getMessage() for r in caplog.records if "is resumed with" in r.getMessage()]
    assert lines == [f"{out / 'last.pth'} was written by a run with 1 torch thread and is resumed with 2: the CPU's "
                     "sums round otherwise, so the result is a valid continuation but not bit-identical to an "
                     "uninterrupted run's (OMP_NUM_THREADS=1 resumes exactly)"]


# ----------------------------------------------------------------------------- true messages

def after_forward(monkeypatch, call: int, action) -> None:
    """Run `action(model, losses)` after the call-th training forward pass (it may change both)."""
    from detection.modeling.model import FasterRCNN

    calls = {"n": 0}
    real_forward = FasterRCNN.forward

    def forward(self, images, targets=None):
        out = real_forward(self, images, targets)
        calls["n"] += 1
        if self.training and calls["n"] == call:
            action(self, out)
        return out

    monkeypatch.setattr(FasterRCNN, "forward", forward)


def _nan_at(monkeypatch, call: int) -> None:
    after_forward(monkeypatch, call, lambda model, out: out.update(loss_cls=out["loss_cls"] * float("nan")))


@pytest.mark.slow  # trains 1 iteration
def test_a_non_finite_loss_before_any_checkpoint_does_not_claim_one(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(monkeypatch, 2)
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(data_root, out, **{"solver.max_iter": 4, "solver.checkpoint_period": 3}))
    assert "iteration 2: loss is not finite" in str(err.value)
    assert f"no checkpoint was written yet ({out / 'last.pth'} does not exist)" in str(err.value)
    assert "last good checkpoint" not in str(err.value) and not (out / "last.pth").exists()


@pytest.mark.slow  # trains 3 iterations
def test_a_non_finite_loss_names_the_checkpoint_that_is_kept(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _nan_at(monkeypatch, 3)
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(data_root, out, **{"solver.max_iter": 4, "solver.checkpoint_period": 2}))
    # only finite, maybe already diverging (a trial resumed such a one at a lower lr: it diverged again at once)
    assert f"the last checkpoint with finite weights {out / 'last.pth'} (iteration 2) is kept, but it may already " \
        "be diverging (see total_loss in metrics.jsonl up to it): rather than --resume it, start again " \
        "(--overwrite) with a lower solver.base_lr" in str(err.value)
    assert "--resume continues it" not in str(err.value)
    assert "model_" not in str(err.value)  # none kept (solver.keep_checkpoints 0): none named
    _nan_at(monkeypatch, 3)
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(data_root, tmp_path / "kept", **{"solver.max_iter": 4, "solver.checkpoint_period": 1,
                                                        "solver.keep_checkpoints": 3}))
    assert str(err.value).endswith("or resume from an earlier one (model_0000001.pth copied to last.pth).")


@pytest.mark.slow  # trains 3 iterations
def test_a_metrics_line_that_cannot_be_written_says_which_checkpoint_is_kept(data_root, tmp_path, monkeypatch):
    """Storage gone read-only mid-run (a long-run trial): the error named metrics.jsonl, not what
    the run left to resume from, as a failed checkpoint's does."""
    from detection.engine import metrics

    calls = {"n": 0}

    def read_only_from_the_third(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            calls["n"] += 1
            if calls["n"] >= 3:
                raise OSError(errno.EROFS, "Read-only file system")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics, "open", read_only_from_the_third, raising=False)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(data_root, out, **{"solver.max_iter": 4, "solver.checkpoint_period": 2}))
    assert str(err.value) == (f"could not append to {out / 'metrics.jsonl'} at iteration 3 (Read-only file system); "
                              f"training stopped, the last good checkpoint {out / 'last.pth'} (iteration 2) is kept: "
                              "--resume continues it")


@pytest.mark.slow  # builds the model, one forward
def test_a_non_finite_loss_before_any_step_does_not_blame_the_learning_rate(data_root, tmp_path, monkeypatch):
    """model.pixel_std 1e-38 (a trial): the first loss is NaN before any step; the message said to
    lower solver.base_lr, which cannot be the cause there."""
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(data_root, tmp_path / "run", **{"model.pixel_std": [1e-38, 1e-38, 1e-38]}))
    assert "iteration 1: loss is not finite" in str(err.value) and "before any step of this run" in str(err.value)
    assert "model.pixel_mean / pixel_std" in str(err.value) and "lower solver.base_lr" not in str(err.value)


def _weights_overflow_at(monkeypatch, call: int) -> None:
    """After training forward `call`, one weight becomes infinite while that step's loss stays finite
    (as BatchNorm's running variance overflows while batch statistics keep the loss finite)."""
    def overflow(model, out):
        with torch.no_grad():
            model.roi_heads.predictor.cls_score.bias.fill_(float("inf"))

    after_forward(monkeypatch, call, overflow)


@pytest.mark.slow  # trains 4 iterations
def test_weights_that_diverged_under_a_finite_loss_are_never_saved(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _weights_overflow_at(monkeypatch, 4)
    with pytest.raises(TrainingError) as err:
        train(tiny_cfg(data_root, out, **{"solver.max_iter": 4, "solver.checkpoint_period": 2}))
    message = str(err.value)
    assert message.startswith("iteration 4: the weights are no longer finite (1 tensors hold NaN or infinite "
                              "values: roi_heads.predictor.cls_score.bias)"), message
    assert f"the last checkpoint with finite weights {out / 'last.pth'} (iteration 2) is kept" in message
    kept = load_checkpoint(out / "last.pth")
    assert kept["iteration"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values()
                                          if v.is_floating_point())
    assert not (out / "model_final.pth").exists()


@pytest.mark.slow  # trains 3 iterations
def test_weights_that_diverged_are_not_evaluated(data_root, tmp_path, monkeypatch):
    """A trial: weights gone non-finite under a finite loss were evaluated at test.eval_period (AP 0 in
    metrics.jsonl as if a result) until the next checkpoint, up to 5000 iterations later, found out."""
    from detection.engine import trainer

    out = tmp_path / "run"
    _weights_overflow_at(monkeypatch, 2)
    evaluated = []
    monkeypatch.setattr(trainer, "evaluate", lambda *a, **k: evaluated.append(1) or {"AP": 0.0})
    with pytest.raises(TrainingError, match=r"^iteration 2: the weights are no longer finite"):
        train(tiny_cfg(data_root, out, **{"solver.max_iter": 6, "solver.checkpoint_period": 5,
                                          "test.eval_period": 2}))
    assert not evaluated
    assert all("AP" not in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_eval_of_a_diverged_checkpoint_says_the_weights_are_broken_not_the_config(tmp_path):
    from detection.engine.inference_model import build_inference_model
    from detection.modeling.model import build_model

    cfg = load_config(None, ["model.backbone.depth=18", "model.num_classes=3", "model.backbone.norm=bn",
                             "model.backbone.weights=null"])
    state = build_model(cfg).state_dict()
    state["roi_heads.res5.0.norm1.running_var"].fill_(float("inf"))
    path = tmp_path / "model_final.pth"
    save_checkpoint({"model": state, "iteration": 9}, path)
    with pytest.raises(CheckpointError) as err:
        build_inference_model(cfg, str(path), torch.device("cpu"))
    assert str(err.value).startswith(f"{path}: 1 tensors hold NaN or infinite values "
                                     "(roi_heads.res5.0.norm1.running_var): the weights are broken, whatever the "
                                     "config"), str(err.value)
    assert "Is the config" not in str(err.value)


# ----------------------------------------------------------------------------- failing disks

def test_a_checkpoint_write_failing_part_way_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "w": torch.ones(3)}, path)
    monkeypatch.setattr(ckpt_mod.torch, "save", enospc_save())
    with pytest.raises(OSError) as err:
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    assert err.value.errno == errno.ENOSPC
    # a second Ctrl-C during the save is the KeyboardInterrupt it is (the trainer's "interrupted")
    monkeypatch.setattr(ckpt_mod.torch, "save", enospc_save(error=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"iteration": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # no temporary left behind


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"AP": 1.0}\n')
    with pytest.raises(OSError):
        with atomic_write(path) as f:
            f.write('{"AP": 2.')
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == '{"AP": 1.0}\n' and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.slow  # trains 4 iterations
def test_training_stops_with_one_error_when_the_disk_is_full(data_root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = {"n": 0}

    def save(obj, f):  # the first save (iteration 2) works, the second (iteration 4) hits a full disk
        calls["n"] += 1
        (enospc_save() if calls["n"] == 2 else _TORCH_SAVE)(obj, f)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    # 75, try again (an automation trial: a full disk and a bad config shared exit 2, or it was 1 as a failed run)
    assert run_tool(data_root, out, **{"solver.max_iter": 6, "solver.checkpoint_period": 2}) == EXIT_TRY_AGAIN
    errors = [x for x in capsys.readouterr().err.split("\n") if x.startswith("error:")]
    assert errors == [f"error: could not write {out / 'last.pth'} at iteration 4 (No space left on device); "
                      f"training stopped, the last good checkpoint {out / 'last.pth'} (iteration 2) is kept: "
                      "--resume continues it"]
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pth", "log.txt", "metrics.jsonl"]


def test_resume_refuses_a_file_that_is_not_a_training_checkpoint(tmp_path):
    save_checkpoint({"model": {}, "iteration": 3}, tmp_path / "model_final.pth")
    with pytest.raises(CheckpointError, match=r"model_final.pth: cannot resume from it, it lacks optimizer, "
                                              r"scheduler, scaler, rng"):
        load_resume_checkpoint(tmp_path / "model_final.pth")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- one trainer per folder

def test_a_second_trainer_on_a_live_runs_folder_is_refused_naming_it(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    live = RunLock(out).acquire()  # held by this (live) process, as a running trainer holds it
    try:
        assert run_tool(data_root, out, "--resume") == EXIT_TRY_AGAIN  # in use: a wait may settle it
        errors = [x for x in capsys.readouterr().err.split("\n") if x.startswith("error:")]
        assert len(errors) == 1
        assert f"{out} is in use by another training run (pid {os.getpid()} on " in errors[0]
        assert "choose another --output-dir" in errors[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        live.release()
    assert not out.exists() or not any(out.iterdir())


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)  # a process that has ended: its lock (if any) went with it
    (tmp_path / LOCK_FILE).write_text(f"pid {pid} on somehost\n")
    lock = RunLock(tmp_path).acquire()
    assert f"took over a stale lock of pid {pid} on somehost (that process is gone)" in caplog.text
    assert (tmp_path / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_run_killed_with_its_loader_workers_alive_leaves_the_lock_to_an_immediate_resume(tmp_path):
    """A long-run trial: `kill -9` of a trainer, then `--resume` at once, was refused as "in use by
    another training run" naming the dead pid: its forked loader workers held copies of the flock
    for up to 5 s more. A forked child now closes its copy; the folder is free once the run is gone."""
    script = (f"import os, sys, time\nsys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
              "from detection.engine.run_folder import RunLock\n"
              f"RunLock(__import__('pathlib').Path({str(tmp_path)!r})).acquire()\n"
              "child = os.fork()\n"
              "if child == 0:\n    time.sleep(60)\n    os._exit(0)\n"  # a loader worker, still there
              "print(child, flush=True)\ntime.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(trainer.stdout.readline())
    try:
        trainer.kill()
        trainer.wait(10)
        RunLock(tmp_path).acquire().release()  # the worker lives on, and holds nothing
        os.kill(worker, 0)  # (still alive: the check above ran while it was)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_a_folder_gone_read_only_lets_the_lock_go_without_an_error(tmp_path, monkeypatch):
    """Storage that turns read-only mid-run (an I/O error on a cluster): the lock file cannot be
    removed, and its OSError buried the run's own one-line error under a second traceback."""
    lock = RunLock(tmp_path).acquire()

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    lock.release()
    monkeypatch.undo()
    RunLock(tmp_path).acquire().release()  # the flock went with the close


def test_an_output_folder_the_file_system_cannot_have_is_one_error(tmp_path):
    """A folder name past the file system's 255 bytes (ENAMETOOLONG already in exists()), a file
    in the way: one OutputFolderError naming the folder and why, not an OSError traceback."""
    for out, why in ((tmp_path / ("x" * 300), "File name too long"), (tmp_path / "file" / "run", "Not a directory")):
        (tmp_path / "file").touch()
        with pytest.raises(OutputFolderError, match=f"cannot create the output folder {out}: {why}"):
            RunLock(out).acquire()


def test_a_lock_file_the_file_system_refuses_is_one_error_and_no_locks_a_warning(tmp_path, monkeypatch, caplog):
    """A file-system trial: a read-only output folder or a full disk ended in OSError tracebacks
    from the lock file (a folder still to be made was one line); a cluster file system without
    flock (Lustre mounted without it: ENOLCK) could not train at all. The first two are one
    OutputFolderError naming the folder, and the last trains with a warning that the folder is
    not protected (Detectron2 has no lock)."""
    import fcntl

    real_open, real_pwrite = os.open, os.pwrite

    def failing(err, real):
        def call(path, *args):
            if str(path).endswith(LOCK_FILE) or isinstance(path, int):
                raise OSError(err, os.strerror(err))
            return real(path, *args)
        return call

    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(os, "open", failing(errno.EROFS, real_open))
    with pytest.raises(OutputFolderError, match=rf"cannot write in the output folder {out} \(its lock file "
                                                rf"{out / LOCK_FILE}: Read-only file system\): choose another"):
        RunLock(out).acquire()
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "pwrite", failing(errno.ENOSPC, real_pwrite))
    with pytest.raises(OutputFolderError, match=r"its lock file .*: No space left on device\): free space") as err:
        RunLock(out).acquire()
    assert project_error_code(err.value) == EXIT_TRY_AGAIN  # a full disk: try again (a review: it was 2)
    assert not (out / LOCK_FILE).exists()
    monkeypatch.setattr(os, "pwrite", real_pwrite)

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING)
    lock = RunLock(out).acquire()
    assert f"{out / LOCK_FILE}: this file system does not support file locks (No locks available): the folder is " \
        "not protected from a second training run started into it" in caplog.text
    assert (out / LOCK_FILE).read_text().startswith(f"pid {os.getpid()} on ")
    lock.release()
    assert not (out / LOCK_FILE).exists()
    # a lock file left there names its run, which may be live: not "taken over a stale lock"
    (out / LOCK_FILE).write_text("pid 4242 on otherhost\n")
    caplog.clear()
    RunLock(out).acquire().release()
    assert f"{out / LOCK_FILE} names pid 4242 on otherhost: if that run is still going, two runs now write into " \
        "this folder" in caplog.text and "stale" not in caplog.text


@pytest.mark.slow  # trains 3 iterations
def test_partial_checkpoint_files_a_killed_save_left_are_removed_on_resume(data_root, tmp_path, caplog):
    """kill -9 during a save leaves the previous checkpoint whole and atomic_write's temporary
    file (hundreds of MB for ResNet-101) for good: the next run in the folder removes it."""
    out = tmp_path / "run"
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 2, "solver.checkpoint_period": 2}))
    partial = [out / ".last.pth.k9x2ab3q.tmp", out / ".model_final.pth.zz81u0a1.tmp"]
    for path in partial:
        path.write_bytes(b"\0" * 2**20)
    theirs = out / ".notes.txt.tmp"
    theirs.write_text("a user's file")
    caplog.set_level(logging.WARNING)
    train(tiny_cfg(data_root, out, **{"solver.max_iter": 3}), resume=True)
    assert not any(p.exists() for p in partial) and theirs.exists()
    assert (f"removed 2 partial checkpoint files (2 MB) that a killed save left in {out}: "
            ".last.pth.k9x2ab3q.tmp, .model_final.pth.zz81u0a1.tmp") in caplog.text



@pytest.mark.slow  # trains 4 iterations, three times
def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(data_root, tmp_path, caplog):
    """kill -9 (an OOM kill, a lost machine) before the first checkpoint leaves metrics.jsonl, the
    save's temporary file and no last.pth: every --resume was refused, so an "always --resume"
    requeue script stayed stuck (a chaos trial). It starts the run again from iteration 0, as
    Detectron2's --resume does without a checkpoint, and ends as a straight run does; log.txt
    keeps the killed run's lines. A resumed finished run clears a killed final save's file too."""
    extra = {"solver.max_iter": 4, "solver.checkpoint_period": 100}
    train(tiny_cfg(data_root, tmp_path / "straight", **extra))
    out = tmp_path / "killed"
    train(tiny_cfg(data_root, out, **{**extra, "solver.max_iter": 2}))  # stands for the killed run's files
    (out / "last.pth").unlink()
    (out / "model_final.pth").unlink()
    partial = out / ".last.pth.k9x2ab3q.tmp"
    partial.write_bytes(b"\0" * 1000)
    killed_log = (out / "log.txt").read_text()
    caplog.set_level(logging.WARNING)
    train(tiny_cfg(data_root, out, **extra), resume=True)
    assert "starting from iteration 0: the run in the folder stopped before its first checkpoint" in caplog.text
    assert not partial.exists()
    assert [r["iteration"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "total_loss" in r] == [1, 2, 3, 4]
    assert same_weights(load_checkpoint(out / "model_final.pth")["model"],
                        load_checkpoint(tmp_path / "straight" / "model_final.pth")["model"])
    assert (out / "log.txt").read_text().startswith(killed_log)
    final_partial = out / ".model_final.pth.zz81u0a1.tmp"
    final_partial.write_bytes(b"\0" * 1000)
    train(tiny_cfg(data_root, out, **extra), resume=True)  # finished: nothing to train
    assert not final_partial.exists()
    (out / "last.pth").unlink()  # a checkpoint there but no last.pth: still refused
    with pytest.raises(OutputFolderError, match="no last.pth to resume from"):
        train(tiny_cfg(data_root, out, **extra), resume=True)


@pytest.mark.slow  # trains
def test_resume_without_a_last_pth_past_the_first_checkpoint_keeps_the_history(data_root, tmp_path):
    """A file-system trial: last.pth a link into storage that was not mounted (or deleted by a
    clean-up) read as a run killed before its first checkpoint: --resume trained again from 0,
    replaced metrics.jsonl, exit 0, and the link became a file. Both are refused, naming why."""
    out = tmp_path / "run"
    extra = {"solver.max_iter": 4, "solver.checkpoint_period": 2}
    train(tiny_cfg(data_root, out, **extra))
    (out / "model_final.pth").unlink()  # an unfinished run
    history = (out / "metrics.jsonl").read_text()
    (out / "last.pth").unlink()
    (out / "last.pth").symlink_to(tmp_path / "scratch" / "last.pth")
    with pytest.raises(OutputFolderError, match=rf"{out / 'last.pth'} \(a link to {tmp_path / 'scratch'}/last.pth, "
                                                r"which is not there\): nothing to resume from until it is \(storage "
                                                r"not mounted\?\)"):
        train(tiny_cfg(data_root, out, **{**extra, "solver.max_iter": 6}), resume=True)
    assert (out / "last.pth").is_symlink()
    (out / "last.pth").unlink()
    with pytest.raises(OutputFolderError, match=r"its metrics.jsonl goes to iteration 4, past its first checkpoint "
                                                r"\(solver.checkpoint_period 2\), but last.pth is not there"):
        train(tiny_cfg(data_root, out, **{**extra, "solver.max_iter": 6}), resume=True)
    assert (out / "metrics.jsonl").read_text() == history


def test_a_failed_start_leaves_no_folder_and_no_lock(data_root, tmp_path):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="model.num_classes is 5"):
        train(tiny_cfg(data_root, out, **{"model.num_classes": 5}))
    assert not out.exists()
    # nor the parents it made for a nested output folder (they stayed, empty)
    with pytest.raises(ValueError, match="model.num_classes is 5"):
        train(tiny_cfg(data_root, tmp_path / "runs" / "2026" / "new", **{"model.num_classes": 5}))
    assert not (tmp_path / "runs").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there stays
    with pytest.raises(ValueError, match="model.num_classes is 5"):
        train(tiny_cfg(data_root, tmp_path / "kept" / "a" / "b", **{"model.num_classes": 5}))
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


# ----------------------------------------------------------------------------- evaluation: files and memory

def _coco_dataset(tmp_path, num_images: int):
    """A COCO-type DatasetInfo of num_images 640x480 images (3 classes) and its annotation json."""
    import numpy as np

    from detection.data.dataset_info import DatasetInfo

    images = [{"id": i + 1, "file_name": f"{i}.jpg", "height": 480, "width": 640} for i in range(num_images)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 3, "bbox": [10.0, 20.0, 50.0, 60.0],
             "area": 3000.0, "iscrowd": 0} for i in range(num_images)]
    ann_file = tmp_path / f"gt{num_images}.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}))
    records = [{"image_id": i + 1, "file_name": "", "height": 480, "width": 640,
                "boxes": np.array([[10, 20, 60, 80]], np.float32), "labels": np.array([1 + i % 3]),
                "difficult": np.zeros(1, bool)} for i in range(num_images)]
    return DatasetInfo("syn", "coco", ["c1", "c2", "c3"], records, ann_file=str(ann_file),
                       label_to_category_id={1: 1, 2: 2, 3: 3})


class _HundredDetections(torch.nn.Module):
    """100 random detections per image, as a detector's float32 outputs."""

    def forward(self, images):
        out = []
        for _ in images:
            xy = torch.rand(100, 2) * 500
            out.append({"boxes": torch.cat([xy, xy + 20 + torch.rand(100, 2) * 100], 1),
                        "scores": torch.rand(100), "labels": torch.randint(1, 4, (100,))})
        return out


class _Written(Exception):
    """Raised instead of scoring, once coco_results.json is written (COCOeval is not measured)."""


def _held_and_results_bytes(tmp_path, monkeypatch, num_images: int, kind: str) -> tuple[int, int]:
    """Bytes the evaluator holds after inference over num_images (tracemalloc: numpy arrays
    and Python objects), and the size of the results files it then writes."""
    import dataclasses
    import tracemalloc

    from detection.evaluation import COCOEvaluator, VOCEvaluator, coco, inference_on_dataset, voc

    def no_scoring(*args):
        raise _Written

    monkeypatch.setattr(coco, "run_cocoeval", no_scoring)
    monkeypatch.setattr(voc, "match_detections", no_scoring)
    dataset = _coco_dataset(tmp_path, num_images)
    if kind == "voc":
        dataset = dataclasses.replace(dataset, kind="voc", ann_file=None)
    out = tmp_path / f"out_{kind}{num_images}"
    evaluator = (COCOEvaluator if kind == "coco" else VOCEvaluator)(dataset, str(out))
    image = torch.zeros(3, 4, 4, dtype=torch.uint8)
    loader = [([image], [r]) for r in dataset.records]
    held = {}
    score = evaluator.evaluate

    def evaluate():  # measured when inference is over, before the results are written
        held["bytes"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return score()

    evaluator.evaluate = evaluate
    tracemalloc.start()
    try:
        inference_on_dataset(_HundredDetections(), loader, evaluator)
    except _Written:
        pass
    finally:
        tracemalloc.stop()
    return held["bytes"], sum(p.stat().st_size for p in out.iterdir())


@pytest.mark.parametrize("kind", ["coco", "voc"])
def test_evaluation_memory_grows_less_than_the_results_file(tmp_path, monkeypatch, capsys, kind):
    held_small, file_small = _held_and_results_bytes(tmp_path, monkeypatch, 100, kind)
    held_large, file_large = _held_and_results_bytes(tmp_path, monkeypatch, 2000, kind)
    with capsys.disabled():
        print(f"\n{kind} evaluation at 100 detections per image: held after inference {held_small / 2**20:.2f} MB "
              f"(100 images), {held_large / 2**20:.2f} MB (2000); results files {file_small / 2**20:.2f} MB, "
              f"{file_large / 2**20:.2f} MB")
    assert held_large - held_small <= file_large - file_small
    # compact arrays: COCO held Python result dicts (2.6x its file), VOC float64 ones (1.5x its terser lines)
    assert held_large < {"coco": 0.5, "voc": 1.0}[kind] * file_large


@pytest.mark.parametrize("writer", ["coco_results", "metrics_json", "comp4"])
def test_results_files_survive_a_full_disk(tmp_path, monkeypatch, writer):
    import numpy as np

    import detection.utils.files as files
    from detection.data.dataset_info import DatasetInfo
    from detection.evaluation import COCOEvaluator, VOCEvaluator, save_metrics_json

    out = tmp_path / "out"
    out.mkdir()
    if writer == "coco_results":
        target = out / "coco_results.json"
        evaluator = COCOEvaluator(_coco_dataset(tmp_path, 3), str(out))
        evaluator.process(evaluator.dataset.records, [_HundredDetections()([0])[0]] * 3)
        write = evaluator.evaluate
    elif writer == "metrics_json":
        target = out / "metrics.json"
        write = lambda: save_metrics_json({"AP": 2.0}, target)  # noqa: E731
    else:
        target = out / "comp4_det_test_cat.txt"
        record = {"image_id": "a", "file_name": "", "height": 9, "width": 9, "boxes": np.zeros((0, 4), np.float32),
                  "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)}
        evaluator = VOCEvaluator(DatasetInfo("v", "voc", ["cat"], [record]), str(out))
        evaluator.process([record], [{"boxes": torch.tensor([[1.0, 1, 5, 5]]), "scores": torch.tensor([0.5]),
                                      "labels": torch.tensor([1])}])
        write = evaluator.evaluate
    target.write_text("the previous results\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        write()
    assert target.read_text() == "the previous results\n"
    assert sorted(p.name for p in out.iterdir()) == [target.name]  # no temporary file left


@pytest.mark.slow  # tools/eval.py end to end (twice)
def test_eval_on_a_full_disk_ends_in_one_line_and_leaves_no_mixed_results(data_root, tmp_path, monkeypatch, capsys):
    """tools/eval.py --results when writing metrics.json fails: one `error:` line naming the
    file, exit 2, no temporary file. The evaluation replaces the set's earlier results as a whole
    (it said so): none of them is left to pass for the new ones."""
    import detection.visualization.plots
    import detection.utils.files as files

    gt = json.loads((data_root / "shapes" / "annotations" / "instances_val.json").read_text())
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                                    "score": 0.9} for a in gt["annotations"]]))
    out = tmp_path / "inference"
    argv = ["--config", str(ROOT / "configs" / "base.yaml"), "--results", str(results), "--output-dir", str(out),
            f"datasets.root={data_root}", "datasets.test=[shapes_val]", "model.num_classes=3"]
    no_plot = lambda curves, path, metrics=None: None  # noqa: E731 (matplotlib is slow)
    monkeypatch.setattr(detection.visualization.plots, "plot_pr_curves", no_plot)
    eval_tool = load_tool("eval")
    assert eval_tool.main(argv) == 0
    metrics = out / "shapes_val" / "metrics.json"
    before = metrics.read_text()
    real_replace = files.os.replace

    def replace(src, dst):
        if str(dst).endswith("metrics.json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        eval_tool.main(argv)
    assert exit_.value.code == EXIT_TRY_AGAIN  # a full disk: the same command may succeed later
    errors = [x for x in capsys.readouterr().err.split("\n") if x.startswith("error:")]
    assert errors == [f"error: could not write {metrics} (No space left on device); nothing was written"]
    assert before and not metrics.exists() and not (out / "shapes_val" / "report_section.json").exists()
    assert not [p for p in out.rglob("*.tmp")]


def test_data_loader_workers_keep_serving_through_ctrl_c(data_root):
    """Ctrl-C reaches the whole terminal process group: the trainer finishes its iteration
    (GracefulStop), so the loader's workers must not die of it (torch's would, and the next
    batch would then fail with "DataLoader worker exited unexpectedly")."""
    from detection.data.catalog import get_dataset
    from detection.data.loader import build_train_loader
    from detection.data.transforms import build_transforms

    info = get_dataset("shapes_train", str(data_root))
    loader = build_train_loader([info], transform=build_transforms(min_sizes=[32], max_size=64, hflip_prob=0.5),
                                images_per_batch=2, num_workers=1, aspect_ratio_grouping=False, filter_empty=True,
                                seed=0)
    import multiprocessing

    before = set(multiprocessing.active_children())
    batches = iter(loader)
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before  # the loader's one worker process
    os.kill(worker.pid, signal.SIGINT)
    for _ in range(3):
        images, targets = next(batches)
        assert len(images) == 2
    assert worker.is_alive()
    del batches


@pytest.mark.slow  # trains through train_det.main with a loader worker
def test_a_killed_loader_worker_is_one_line_with_its_likely_causes(data_root, tmp_path, capsys, monkeypatch):
    """kill -9 of a worker (the OOM killer; a container's 64 MB /dev/shm): a 40-line traceback
    ending in 'DataLoader worker (pid N) is killed by signal: Killed.', nothing on what to do."""
    import multiprocessing

    def kill_a_worker():
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
        time.sleep(1.0)  # dead before the next batch is asked for

    out = tmp_path / "run"
    at_forward(monkeypatch, 3, kill_a_worker)
    assert run_tool(data_root, out, **{"solver.max_iter": 6, "solver.checkpoint_period": 2,
                                       "dataloader.num_workers": 1}) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "a data loader worker died at iteration" in lines[0], lines
    assert "is killed by signal" in lines[0] and "--shm-size" in lines[0] and "dataloader.num_workers=0" in lines[0]
    assert f"the last good checkpoint {out / 'last.pth'} (iteration 2) is kept" in lines[0]


@pytest.mark.slow  # trains with a loader worker
def test_an_interrupted_train_call_leaves_no_loader_worker_behind(data_root, tmp_path, monkeypatch):
    """A notebook trial: after Ctrl-C in a cell, the run's loader worker lived on (with its
    batches) as long as the traceback did, which IPython keeps in sys.last_traceback."""
    import multiprocessing

    from detection.engine.errors import TrainingStopped
    from detection.engine.trainer import train
    from tests.helpers import tiny_cfg

    at_forward(monkeypatch, 2, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(TrainingStopped) as stopped:
        train(tiny_cfg(data_root, tmp_path / "run", **{"dataloader.num_workers": 1, "datasets.test": []}))
    assert stopped.value.__traceback__ is not None  # kept, as a notebook keeps it
    assert not multiprocessing.active_children()
