#!/usr/bin/env python
"""The CPU demo (`make demo`): synthetic shapes -> train ResNet-18 C4 -> evaluate -> draw.

Runs the real commands one after the other (tools/make_shapes.py, train_det.py, eval.py,
visualize.py), reusing what is already there: the data set is generated only when absent,
training resumes from last.pth (and does nothing once it is complete). Prints where
everything is, the wall time, and whether the targets (AP50 >= 90, AP >= 60, < 10 min) hold.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"AP50": 90.0, "AP": 60.0, "minutes": 10.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes_r18.yaml"))
    parser.add_argument("--data", default=str(ROOT / "data"), help="datasets.root; shapes go to DATA/shapes")
    parser.add_argument("--output-dir", default=str(ROOT / "output" / "shapes_r18"))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-val", type=int, default=100)
    parser.add_argument("--num-vis", type=int, default=8, help="validation images to draw")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for training")
    return parser.parse_args(argv)


def step(title: str, *cmd: str) -> None:
    print(f"\n==> {title}\n    {' '.join(cmd)}", flush=True)
    result = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"demo: '{title}' failed with exit code {result.returncode}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    shapes = Path(args.data) / "shapes"
    out = Path(args.output_dir)
    common = ["--config", args.config, f"datasets.root={args.data}", *args.overrides]
    if not (shapes / "annotations" / "instances_val.json").is_file():
        step("generate the shapes data set", "tools/make_shapes.py", "--output", str(shapes),
             "--num-train", str(args.num_train), "--num-val", str(args.num_val), "--seed", "0")
    step("train (resumes from last.pth if present)", "tools/train_det.py", *common,
         "--output-dir", str(out), "--resume")
    step("evaluate on shapes_val", "tools/eval.py", *common, "--weights", str(out / "model_final.pth"),
         "--output-dir", str(out / "inference"))
    step("draw validation images", "tools/visualize.py", *common, "--weights", str(out / "model_final.pth"),
         "--compare", "--limit", str(args.num_vis), "--output", str(out / "vis"))
    _plot(out)
    minutes = (time.perf_counter() - start) / 60
    return _report(out, minutes)


def _plot(out: Path) -> None:
    try:
        from detection.plots import plot_training_curves

        plot_training_curves(out / "metrics.jsonl", out / "training_curves.png")
    except ImportError as err:
        print(f"note: no training-curve plot ({err})")


def _report(out: Path, minutes: float) -> int:
    # eval.py writes one folder per test set: the demo's one test set, shapes_val
    (metrics_file,) = sorted((out / "inference").glob("*/metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    checks = [("AP50", metrics.get("AP50", 0.0), ">=", TARGETS["AP50"]),
              ("AP", metrics.get("AP", 0.0), ">=", TARGETS["AP"]),
              ("minutes", minutes, "<", TARGETS["minutes"])]
    print("\n==> demo finished")
    print(f"    checkpoints, metrics.jsonl:  {out}")
    print(f"    evaluation (metrics.json):   {metrics_file.parent}")
    print(f"    drawn validation images:     {out / 'vis'}")
    print(f"    training curves:             {out / 'training_curves.png'}")
    for name, value, op, target in checks:
        ok = value >= target if op == ">=" else value < target
        print(f"    {name:8s} {value:7.2f}  (target {op} {target:g}: {'met' if ok else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
