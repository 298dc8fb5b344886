"""log.tensorboard: the trainer's TensorBoard event files hold exactly metrics.jsonl's numbers
(losses, lr, time, evaluation metrics; step = iteration), read back with TensorBoard's own
EventAccumulator, also across an interrupted and resumed run."""
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from detection.data.shapes import generate_shapes
from detection.engine import trainer
from detection.engine.trainer import train
from tests.helpers import tiny_cfg

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.slow  # trains
TB = {"log.tensorboard": True, "solver.max_iter": 4, "solver.checkpoint_period": 2, "test.eval_period": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", num_train=4, num_val=2, seed=0, image_size=(64, 80))
    return root


def jsonl_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tag -> [(iteration, value)], every number but the iteration."""
    scalars: dict = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                scalars.setdefault(key, []).append((record["iteration"], value))
    return scalars


def event_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})  # 0: keep every value
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same(events: dict, jsonl: dict) -> None:
    assert sorted(events) == sorted(jsonl)
    for tag, expected in jsonl.items():
        assert [step for step, _ in events[tag]] == [step for step, _ in expected], tag
        for (_, got), (_, want) in zip(events[tag], expected):
            # TensorBoard stores float32
            assert (math.isnan(got) and math.isnan(want)) or got == float(np.float32(want)), (tag, got, want)


def test_event_files_hold_the_metrics_jsonl_values(data_root, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(data_root, out, **TB))
    assert list(out.glob("events.out.tfevents.*"))
    jsonl = jsonl_scalars(out)
    assert {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box", "total_loss", "lr", "time", "data_time"} \
        <= set(jsonl)
    assert any("AP" in tag for tag in jsonl)  # the evaluation's metrics (test.eval_period)
    assert [step for step, _ in jsonl["loss_cls"]] == [1, 2, 3, 4]  # log_period 1
    assert_same(event_scalars(out), jsonl)


def test_a_resumed_run_replaces_what_was_logged_after_its_checkpoint(data_root, tmp_path, monkeypatch):
    from detection.modeling.model import FasterRCNN

    out = tmp_path / "run"
    real_forward, calls = FasterRCNN.forward, {"n": 0}

    def forward(self, images, targets=None):  # Ctrl-C in iteration 4: 3 logged, last.pth at 2
        if self.training:
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt
        return real_forward(self, images, targets)

    monkeypatch.setattr(FasterRCNN, "forward", forward)
    with pytest.raises(trainer.TrainingInterrupted):
        train(tiny_cfg(data_root, out, **TB))
    assert [step for step, _ in event_scalars(out)["time"]] == [1, 2, 3]  # the writer was closed (flushed)
    monkeypatch.setattr(FasterRCNN, "forward", real_forward)
    train(tiny_cfg(data_root, out, **TB), resume=True)  # iterations 3 and 4 again, their times differ
    jsonl = jsonl_scalars(out)
    assert [step for step, _ in jsonl["time"]] == [1, 2, 3, 4]
    assert_same(event_scalars(out), jsonl)


def test_off_writes_no_event_file(data_root, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(data_root, out, **{**TB, "log.tensorboard": False, "solver.max_iter": 1, "test.eval_period": 0}))
    assert not list(out.glob("events.out.tfevents.*"))


def test_true_without_the_package_is_one_error_before_anything_is_written(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # its import now fails
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"log.tensorboard is true but TensorBoard cannot be used \(.*\): "
                                         r"pip install -e '.\[tensorboard\]', or set log.tensorboard=false"):
        train(tiny_cfg(data_root, out, **TB))
    assert not out.exists()
    assert trainer.use_tensorboard("auto") is False and trainer.use_tensorboard(False) is False
    monkeypatch.undo()
    assert trainer.use_tensorboard("auto") is True and trainer.use_tensorboard(True) is True


def test_an_event_file_that_cannot_be_written_is_a_warning_not_a_stop(tmp_path, caplog):
    with trainer.MetricsLog(tmp_path, tensorboard=True) as log:
        def full_disk(*args):
            raise OSError(28, "No space left on device")

        log.writer.add_scalar = full_disk
        log.write({"iteration": 1, "loss_cls": 0.5})
        log.write({"iteration": 2, "loss_cls": 0.25})
        assert log.writer is None
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert caplog.text.count("could not be written (No space left on device)") == 1


def test_a_full_disk_when_the_event_file_is_opened_is_the_same_warning(tmp_path, caplog, monkeypatch):
    """A file-system trial: 8 KB free at a run's start gave SummaryWriter's tracebacks."""
    import torch.utils.tensorboard

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.utils.tensorboard, "SummaryWriter", full_disk)
    with trainer.MetricsLog(tmp_path, tensorboard=True) as log:
        assert log.writer is None
        log.write({"iteration": 1, "loss_cls": 0.5})
    assert [json.loads(x)["iteration"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    assert caplog.text.count("could not be written (No space left on device)") == 1


def test_a_metric_that_is_not_a_number_is_null_in_metrics_jsonl_and_not_an_event(tmp_path):
    """APl of a test set without large objects is nan: strict JSON gets null (as eval's
    metrics.json), TensorBoard no point; the other values as they are."""
    from detection.engine.metrics import MetricsLog

    with MetricsLog(tmp_path, tensorboard=True) as log:
        log.write({"iteration": 3, "AP": 50.0, "APl": math.nan, "APs": math.inf})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line == {"iteration": 3, "AP": 50.0, "APl": None, "APs": None}
    assert event_scalars(tmp_path) == {"AP": [(3, 50.0)]}
