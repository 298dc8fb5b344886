"""The ResNet paper's Table 9 (Appendix B) for a checkpoint: which switch sets to evaluate, in
which order, and the table that sets them beside the paper's numbers (`tools/ablate.py`).

Table 9 is cumulative: each row adds one improvement to the row above (baseline, + box
refinement, + context on top of refinement, + multi-scale testing on top of both), so a row's
gain is over the row above it, not over the baseline. Those four rows come first, in the paper's
order, with its numbers (COCO 2014 val, ResNet-101) beside them. The switch sets the paper did
not measure (context alone, multi-scale testing alone, box refinement with multi-scale testing
but no context) are printed apart and labelled so that nobody compares them with the paper's
rows. Evaluating is the caller's (`evaluate`): this module knows only the switches.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence

if TYPE_CHECKING:
    from detection.config import Config

TABLE9 = "Table 9 (cumulative, the paper's order)"
APART = "not in Table 9"  # single switches on the baseline, and refinement + multi-scale without context
METRICS = ("AP", "AP50", "AP75")  # what each row reports (tools/ablate.py keeps and prints them)


@dataclass(frozen=True)
class AblationRow:
    """One row: its label, its group (TABLE9 or APART), the three switches, and the paper's
    (mAP@.5, mAP@[.5, .95]) for a Table 9 row."""

    name: str
    group: str
    box_refinement: bool
    global_context: bool  # evaluated with the checkpoint trained with global context
    multi_scale: bool
    paper: Optional[tuple[float, float]] = None


ROWS = (AblationRow("baseline", TABLE9, False, False, False, (48.4, 27.2)),
        AblationRow("+ box refinement", TABLE9, True, False, False, (49.9, 29.9)),
        AblationRow("+ context", TABLE9, True, True, False, (51.1, 30.0)),
        AblationRow("+ multi-scale testing", TABLE9, True, True, True, (53.8, 32.5)),
        AblationRow("context alone", APART, False, True, False),
        AblationRow("multi-scale testing alone", APART, False, False, True),
        AblationRow("box refinement + multi-scale testing, no context", APART, True, False, True))


def select_rows(have_context_weights: bool) -> list[AblationRow]:
    """The rows to evaluate, Table 9's first: those with global context only with its checkpoint."""
    return [row for row in ROWS if have_context_weights or not row.global_context]


def row_config(cfg: Config, row: AblationRow, tta: bool) -> Config:
    """The config with the row's switches (test-time augmentation off unless `tta`: the paper's
    rows have none)."""
    out = copy.deepcopy(cfg)
    out.test.box_refinement.enabled = row.box_refinement
    out.test.multi_scale.enabled = row.multi_scale
    out.model.roi_heads.global_context = row.global_context
    if not tta:
        out.test.aug.enabled = False
    return out


def run_ablation(rows: Sequence[AblationRow], evaluate: Callable[[AblationRow], dict],
                 report: Callable[[dict], None] = lambda result: None) -> list[dict]:
    """Each row's switches and paper numbers with what `evaluate(row)` gives (AP, AP50, AP75,
    seconds_per_image, ...); `report` is called after each row (progress)."""
    results = []
    for row in rows:
        result = {"row": row.name, "group": row.group, "box_refinement": row.box_refinement,
                  "global_context": row.global_context, "multi_scale": row.multi_scale,
                  "paper_AP50": row.paper[0] if row.paper else None,
                  "paper_AP": row.paper[1] if row.paper else None, **evaluate(row)}
        results.append(result)
        report(result)
    return results


def format_table(results: Sequence[dict], cfg: Config, test_set: str, tta: bool) -> str:
    """Markdown: the settings, Table 9's rows beside the paper's numbers, then the rows apart."""
    refine, multi = cfg.test.box_refinement, cfg.test.multi_scale
    voting = f"at IoU {refine.voting_iou}" if refine.voting else "off"
    checkpoints = sorted({str(r["weights"]) for r in results if r.get("weights")})
    lines = [f"Test set: {test_set}. Box refinement: NMS {refine.nms_thresh}, voting {voting}. "
             f"Multi-scale: sizes {multi.sizes} (max {multi.max_size}). "
             f"Test-time augmentation: {'as in the config' if tta else 'off'}.", "",
             # what else makes the numbers (a table read beside eval.py's must say its test settings)
             f"Test size {cfg.input.min_size_test} (max {cfg.input.max_size_test}), score threshold "
             f"{cfg.model.roi_heads.score_thresh_test}, {cfg.model.roi_heads.detections_per_image} detections per "
             f"image, test.amp {str(cfg.test.amp).lower()}"
             + (f"; checkpoint{'s' if len(checkpoints) > 1 else ''} {', '.join(checkpoints)}." if checkpoints else "."),
             "",
             f"{TABLE9}: each row adds one improvement to the row above. Paper: ResNet-101 on COCO "
             "2014 val, mAP@.5 (= AP50) and mAP@[.5, .95] (= AP).", "",
             "| Table 9 row | AP50 | AP | AP75 | paper mAP@.5 | paper mAP@[.5, .95] | s / image |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {_metrics(r)} | {r['paper_AP50']:.1f} | {r['paper_AP']:.1f} | "
              f"{r['seconds_per_image']:.3f} |" for r in results if r["group"] == TABLE9]
    missing = [row.name for row in ROWS if row.group == TABLE9 and row.name not in {r["row"] for r in results}]
    if missing:
        lines += ["", f"Not evaluated (they need --context-weights): {', '.join(missing)}."]
    apart = [r for r in results if r["group"] == APART]
    if apart:
        lines += ["", "Not in Table 9 (the paper has no number for these): each switch alone on the baseline "
                  "(box refinement alone is Table 9's second row), and box refinement + multi-scale testing "
                  "without context.", "",
                  "| row | AP50 | AP | AP75 | s / image |", "|---|---|---|---|---|"]
        lines += [f"| {r['row']} | {_metrics(r)} | {r['seconds_per_image']:.3f} |" for r in apart]
    return "\n".join(lines)


def _metrics(result: dict) -> str:
    return " | ".join(f"{result[key]:.1f}" for key in ("AP50", "AP", "AP75"))  # METRICS in the paper's column order
