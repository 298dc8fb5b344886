"""The demo pipeline end to end through the real commands, at a tiny scale; its target report."""
import filecmp
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from detection.data.shapes import generate_shapes
from tests.helpers import load_tool, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
demo = load_tool("demo")


@pytest.mark.slow  # the demo pipeline through its command lines
def test_demo_generates_trains_evaluates_draws_reuses_and_strict_exits_3(tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    # a data set as an older version wrote it (train and val, no test split), at the demo's seed
    generate_shapes(str(data / "shapes"), num_train=6, num_val=2, seed=0)
    old_files = sorted(os.path.relpath(os.path.join(d, f), data) for d, _, fs in os.walk(data) for f in fs)
    (tmp_path / "before").mkdir()
    for name in old_files:
        (tmp_path / "before" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "before" / name).write_bytes((data / name).read_bytes())
    # tiny_overrides' datasets.test (shapes_val) stays: the demo evaluates shapes_test whatever it says
    overrides = [o for o in tiny_overrides(data, out, **{"solver.max_iter": 2})
                 if not o.startswith(("datasets.root=", "output_dir="))]
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--data", str(data), "--output-dir", str(out),
           "--num-train", "6", "--num-val", "2", "--num-test", "3", "--num-vis", "2", *overrides]
    first = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]  # targets missed, still 0
    assert "does not exist, starting from iteration 0" not in first.stderr  # a first run: no --resume warning
    assert "generate the shapes test split" in first.stdout
    assert len(json.loads((data / "shapes" / "annotations" / "instances_test.json").read_text())["images"]) == 3
    _, mismatch, errors = filecmp.cmpfiles(data, tmp_path / "before", old_files, shallow=False)
    assert mismatch == [] and errors == []  # train and val untouched
    for name in ("model_final.pth", "metrics.jsonl", "config.yaml", "training_curves.png",
                 "inference/shapes_test/metrics.json", "inference/shapes_test/coco_results.json"):
        assert (out / name).is_file(), name
    assert not (out / "inference" / "shapes_val").exists()
    assert sorted(p.name for p in (out / "vis").glob("*.jpg")) == ["00000_test_000000.jpg", "00001_test_000001.jpg"]
    metrics = json.loads((out / "inference" / "shapes_test" / "metrics.json").read_text())
    assert "AP50" in metrics and "AP50" in first.stdout and "target" in first.stdout
    last = first.stdout.strip().splitlines()[-1]
    assert last.startswith("targets: NOT met: AP50 >= 92 (") and "AP >= 68 (" in last, last
    # re-running reuses the data and the finished training (no new iterations logged); --strict: exit 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    again = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 3, again.stdout[-2000:] + again.stderr[-3000:]
    assert "generate the shapes" not in again.stdout
    assert again.stdout.strip().splitlines()[-1].startswith("targets: NOT met: AP50 >= 92")
    assert (out / "metrics.jsonl").read_text().splitlines() == lines
    # the run of other settings (the demo's own max_iter, 1650, not this run's 2): a demo-level hint
    other = subprocess.run([c for c in cmd if not c.startswith("solver.max_iter=")], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)
    assert other.returncode == 2 and "give the demo the KEY=VALUE that differ, e.g. solver.max_iter=N" in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("error: demo: 'train")  # as every tool: exit 2, error:


def test_target_report_says_which_targets_were_met():
    checks = demo.target_checks({"AP50": 92.0, "AP": 67.99, "AP75": 70.0}, minutes=7.5)
    assert [(c.name, c.value, c.met) for c in checks] == [("AP50", 92.0, True), ("AP", 67.99, False),
                                                           ("wall time", 7.5, True)]
    assert demo.target_summary(checks) == ("targets: NOT met: AP >= 68 (67.99); "
                                           "met: AP50 >= 92 (92.00), wall time < 8 min (7.50 min)")
    checks = demo.target_checks({"AP50": 95.5, "AP": 70.25}, minutes=7.999)
    assert demo.target_summary(checks) == ("targets: all met: AP50 >= 92 (95.50), AP >= 68 (70.25), "
                                           "wall time < 8 min (8.00 min)")
    checks = demo.target_checks({}, minutes=8.0)  # no metrics, and exactly 8 minutes: nothing met
    assert [c.met for c in checks] == [False, False, False] and math.isnan(checks[0].value)
    assert demo.target_summary(checks) == ("targets: NOT met: AP50 >= 92 (nan), AP >= 68 (nan), "
                                           "wall time < 8 min (8.00 min); met: none")


def test_demo_adds_only_what_the_data_folder_lacks(tmp_path):
    shapes = tmp_path / "shapes"
    (title, cmd), = demo.data_commands(shapes, 6, 2, 3)
    assert title == "generate the shapes data set"
    assert cmd[cmd.index("--num-test") + 1] == "3" and "--splits" not in cmd and cmd[cmd.index("--seed") + 1] == "0"
    (shapes / "annotations").mkdir(parents=True)
    (shapes / "annotations" / "instances_val.json").write_text("{}")  # an older version's data set
    (title, cmd), = demo.data_commands(shapes, 6, 2, 3)
    assert cmd[cmd.index("--splits") + 1:cmd.index("--splits") + 2] == ["test"] and "--num-train" not in cmd
    (shapes / "annotations" / "instances_test.json").write_text("{}")
    assert demo.data_commands(shapes, 6, 2, 3) == []


def test_strict_exit_status(monkeypatch, tmp_path):
    """--strict turns a missed target into exit status 3; without it the demo exits 0."""
    import detection.visualization.plots as plots

    monkeypatch.setattr(demo, "step", lambda title, *cmd, hint="": 0.0)
    monkeypatch.setattr(plots, "plot_training_curves", lambda metrics, png: None)
    (tmp_path / "inference" / "shapes_test").mkdir(parents=True)
    metrics = tmp_path / "inference" / "shapes_test" / "metrics.json"
    base = ["--data", str(tmp_path), "--output-dir", str(tmp_path)]
    metrics.write_text(json.dumps({"AP50": 50.0, "AP": 30.0, "APl": None, "AP-circle": None}))  # null: undefined
    assert demo.main(base) == 0 and demo.main([*base, "--strict"]) == 3
    metrics.write_text(json.dumps({"AP50": 93.0, "AP": 69.0}))
    assert demo.main(base) == 0 and demo.main([*base, "--strict"]) == 0


def test_relative_paths_are_the_working_directorys_though_the_steps_run_from_the_repository(monkeypatch, tmp_path):
    """A CLI audit: `demo.py --data mydata --output-dir myout` from another folder wrote into the
    repository (its steps run there) and then failed at its end, not finding myout/metrics.jsonl."""
    import detection.visualization.plots as plots

    commands = []
    monkeypatch.setattr(demo, "step", lambda title, *cmd, hint="": commands.append(cmd) or 0.0)
    monkeypatch.setattr(plots, "plot_training_curves", lambda metrics, png: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "myout" / "inference" / "shapes_test").mkdir(parents=True)
    (tmp_path / "myout" / "inference" / "shapes_test" / "metrics.json").write_text(json.dumps({"AP50": 1.0, "AP": 1.0}))
    assert demo.main(["--data", "mydata", "--output-dir", "myout"]) == 0
    flat = [item for cmd in commands for item in cmd]
    assert str(tmp_path / "mydata" / "shapes") in flat and str(tmp_path / "myout") in flat
    assert f"datasets.root={json.dumps(str(tmp_path / 'mydata'))}" in flat
    assert not any(item in ("mydata", "myout") or item.startswith(("mydata/", "myout/")) for item in flat)


def test_a_stop_is_passed_on_to_the_running_step_which_is_waited_for(tmp_path):
    """An automation trial: SIGTERM to demo.py SIGKILLed its training step 0.25 s later
    (subprocess.run on an interrupt), before the trainer's graceful save of last.pth. The signal
    is passed on and the step finishes its stop."""
    import signal
    import threading
    import time

    ready, saved = tmp_path / "ready", tmp_path / "saved"
    script = ("import pathlib, signal, sys, time\n"
              "def stop(signum, frame):\n"
              f"    time.sleep(1.0); pathlib.Path({str(saved)!r}).write_text(str(signum)); sys.exit(130)\n"
              "signal.signal(signal.SIGINT, stop)\n"
              f"pathlib.Path({str(ready)!r}).touch()\n"
              "time.sleep(60)\n")

    def interrupt_once_ready():
        for _ in range(200):
            if ready.exists():
                os.kill(os.getpid(), signal.SIGINT)  # the demo's Ctrl-C, in the main thread
                return
            time.sleep(0.05)

    threading.Thread(target=interrupt_once_ready, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        demo.step("a step", "-c", script)
    assert saved.read_text() == str(int(signal.SIGINT))  # it got the signal, and had time to save


def test_a_step_that_may_succeed_later_keeps_its_exit_code():
    """A step's 75 (a full disk, a folder in use) became the demo's 1, "the run failed" (a review)."""
    with pytest.raises(SystemExit) as exit_:
        demo.step("a step", "-c", "import sys; sys.exit(75)")
    assert exit_.value.code == 75
