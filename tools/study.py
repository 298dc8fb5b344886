#!/usr/bin/env python
"""The ResNet paper's central experiment on the detector: plain against residual nets (the
degradation problem, Figures 1 and 4) or shortcut options A/B/C (Table 3).

    python tools/study.py --config configs/study/shapes.yaml --study degradation \
        --runs-dir output/study/runs --output-dir output/study/degradation
    python tools/study.py --config configs/study/shapes.yaml --study shortcuts \
        --runs-dir output/study/runs --output-dir output/study/shortcuts
    python tools/study.py --config configs/study/shapes.yaml --study shortcuts --no-train --output-dir DIR

Variants (trained one after another; everything but model.backbone.{depth,residual,shortcut} is
the config's: seed, data, schedule, trainable BN):
  degradation: plain-d and residual-d for each of --depths (default 18 34); the residual nets use
               option A (identity shortcuts, zero-padding where the shape changes) so that they
               have exactly the plain nets' parameters, as in the paper's Figure 4
  shortcuts:   A-d, B-d, C-d at the deepest of --depths

Outputs: one training run per variant (checkpoints, metrics.jsonl, and result.json with the
evaluation on the config's test sets) in a folder named by its settings (plain-34,
residual-34-A, ...) under --runs-dir (default: --output-dir), so that two studies sharing it
train residual-34-A once; in --output-dir, study.json (per variant: the training-loss curves,
the final losses, AP / AP50, backbone parameters and multiply-adds, times), study.md (the
table) and study.png (the training-loss curves). Run it again to resume: a finished variant
(result.json) is not trained again, an unfinished one continues from its last.pth (both only
under the same config), one stopped before its first checkpoint trains again. --no-train
writes only the parameters / multiply-adds table.

Exit codes: 0 done, 1 training failed, 2 bad options, config or output folder, 130 interrupted
(Ctrl-C), 143 stopped by SIGTERM (the variant's last.pth is saved: run again to resume).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detection.cli import add_config_args, parse_command_line, run_tool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--study", required=True, choices=["degradation", "shortcuts"])
    parser.add_argument("--depths", type=int, nargs="+", default=[18, 34],
                        help="backbone depths (default 18 34; shortcuts uses the deepest)")
    parser.add_argument("--max-iter", type=int, help="iterations per variant (the lr steps are scaled with it)")
    parser.add_argument("--output-dir", required=True,
                        help="the study's folder: study.json, study.md, study.png (and the runs, unless --runs-dir)")
    parser.add_argument("--runs-dir", help="where the variants' training runs go (default: --output-dir); "
                        "studies sharing it train a net they share once (residual-34 = A-34)")
    parser.add_argument("--no-train", action="store_true", help="only the parameters / multiply-adds table")
    return parse_command_line(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: run(args), hint="for the study: run the same command again, it resumes this variant")


def run(args: argparse.Namespace) -> None:
    from detection.study import StudyOptions, run_study

    options = StudyOptions(study=args.study, config=args.config, output_dir=Path(args.output_dir),
                           depths=args.depths, overrides=list(args.overrides), max_iter=args.max_iter,
                           train=not args.no_train, runs_dir=Path(args.runs_dir) if args.runs_dir else None)
    run_study(options)
    out = Path(args.output_dir)
    print(f"study written: {out / 'study.json'}, {out / 'study.md'}"
          + ("" if args.no_train else f", {out / 'study.png'}"))
    print((out / "study.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
