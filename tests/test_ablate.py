"""tools/ablate.py and detection/study/ablation.py: the paper's Table 9 rows for a checkpoint
(and a global-context one), cumulative as the paper built them."""
import json

import pytest
import torch

from detection.config import load_config
from detection.data.catalog import get_datasets
from detection.data.shapes import generate_shapes
from detection.engine.inference_model import build_inference_model
from detection.engine.trainer import train
from detection.evaluation import evaluate_test_sets
from detection.study.ablation import APART, TABLE9, select_rows
from tests.helpers import ROOT, load_tool, run_main, tiny_overrides

TABLE9_NAMES = ["baseline", "+ box refinement", "+ context", "+ multi-scale testing"]
APART_NAMES = ["context alone", "multi-scale testing alone", "box refinement + multi-scale testing, no context"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny baseline and a tiny global-context model, trained a few iterations on shapes."""
    root = tmp_path_factory.mktemp("ablate")
    generate_shapes(root / "data" / "shapes", num_train=6, num_val=3, seed=2, image_size=(64, 80))
    extra = {"solver.max_iter": 2, "model.roi_heads.score_thresh_test": 0.0,
             "test.multi_scale.sizes": [48, 64, 96], "test.multi_scale.max_size": 160}
    base = tiny_overrides(root / "data", root / "base", **extra)
    train(load_config(None, base))
    context = tiny_overrides(root / "data", root / "context", **extra, **{"model.roi_heads.global_context": True})
    train(load_config(None, context))
    return root, base


@pytest.fixture
def ablate(capsys, restore_logging):
    """ablate(root, overrides, *args): tools/ablate.py's command line with the baseline run's
    config, run by its main() in this process -> (exit code, stdout, stderr)."""
    tool = load_tool("ablate")
    return lambda root, overrides, *args: run_main(tool, ["--config", root / "base" / "config.yaml", *args], capsys)


@pytest.mark.slow  # trains two tiny models, runs the tool
def test_ablation_rows_and_the_baseline_equals_plain_evaluation(runs, ablate):
    root, overrides = runs
    out = root / "table"
    code, _, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"),
                          "--context-weights", str(root / "context" / "model_final.pth"), "--output-dir", str(out))
    assert code == 0, err
    saved = json.loads((out / "ablation.json").read_text())
    names = [row["row"] for row in saved["rows"]]
    assert names == TABLE9_NAMES + APART_NAMES
    assert [row["weights"].endswith(("context/model_final.pth",)) for row in saved["rows"]] == \
        [False, False, True, True, True, False, False]
    for row in saved["rows"]:
        assert 0 <= row["AP"] <= 100 and row["seconds_per_image"] > 0
    assert "| baseline |" in (out / "ablation.md").read_text()
    # the baseline row is what evaluating the checkpoint without any switch gives
    cfg = load_config(root / "base" / "config.yaml")
    model, _ = build_inference_model(cfg, root / "base" / "model_final.pth", torch.device("cpu"))
    datasets = get_datasets(cfg.datasets.test, cfg.datasets.root)
    plain = evaluate_test_sets(datasets, model=model)[datasets[0].name]
    assert saved["rows"][0]["AP"] == pytest.approx(plain["AP"], abs=1e-9)
    assert saved["rows"][0]["AP50"] == pytest.approx(plain["AP50"], abs=1e-9)
    # each row kept its evaluation files
    assert (out / "multi_scale_testing" / "shapes_val" / "metrics.json").is_file()


@pytest.mark.slow  # runs the tool
def test_a_test_set_numbering_the_classes_otherwise_is_scored_by_name(runs, tmp_path, ablate):
    """As eval.py scores it: the baseline row's detections keep their classes under the set's
    category ids (ablate passed no class names, so label 1 was scored as category 1)."""
    root, overrides = runs
    data = json.loads((root / "data" / "shapes" / "annotations" / "instances_val.json").read_text())
    renumber = {1: 3, 2: 1, 3: 2}
    for item in data["categories"]:
        item["id"] = renumber[item["id"]]
    for item in data["annotations"]:
        item["category_id"] = renumber[item["category_id"]]
    (tmp_path / "renumbered.json").write_text(json.dumps(data))
    entry = {"type": "coco", "ann_file": str(tmp_path / "renumbered.json"),
             "image_root": str(root / "data" / "shapes" / "val"), "name": "renumbered"}
    code, _, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"), "--output-dir",
                          str(tmp_path / "t"), f"datasets.test={json.dumps([entry])}")
    assert code == 0, err
    ours = json.loads(next((tmp_path / "t").glob("baseline*/renumbered/coco_results.json")).read_text())
    cfg = load_config(root / "base" / "config.yaml")
    model, _ = build_inference_model(cfg, root / "base" / "model_final.pth", torch.device("cpu"))
    evaluate_test_sets(get_datasets(cfg.datasets.test, cfg.datasets.root), model=model, output_dir=tmp_path / "plain")
    plain = json.loads(next((tmp_path / "plain").glob("*/coco_results.json")).read_text())
    key = lambda r: (r["image_id"], r["category_id"], tuple(r["bbox"]), r["score"])  # noqa: E731
    assert ours and sorted(map(key, ours)) == sorted(key({**r, "category_id": renumber[r["category_id"]]})
                                                     for r in plain)


def test_without_context_weights_the_context_rows_are_left_out():
    assert [row.name for row in select_rows(False)] == ["baseline", "+ box refinement", "multi-scale testing alone",
                                                        "box refinement + multi-scale testing, no context"]
    assert [row.name for row in select_rows(True)] == TABLE9_NAMES + APART_NAMES


@pytest.mark.slow
def test_another_checkpoints_ablation_is_not_overwritten(runs, tmp_path, ablate):
    root, overrides = runs
    out = tmp_path / "t"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps({"sources": {"weights": "/elsewhere/model_final.pth"}}))
    code, _, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"),
                          "--output-dir", str(out))
    assert code == 2
    assert err.startswith("error: ") and "--overwrite" in err
    assert "holds the ablation of /elsewhere/model_final.pth without --context-weights" in err  # not a dict
    assert len(err.strip().splitlines()) == 1
    # --overwrite: no row folder of the replaced ablation stays beside the new table (here its context rows)
    (out / "context").mkdir()
    (out / "context" / "metrics.json").write_text("{}")
    code, _, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"),
                          "--output-dir", str(out), "--overwrite")
    assert code == 0, err
    assert not (out / "context").exists() and (out / "baseline").is_dir()
    # --tta with a config without test-time augmentation: said, and not recorded as if it ran
    code, printed, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"),
                                "--output-dir", str(out), "--tta", "test.aug.enabled=false")
    assert code == 0, err
    assert "--tta: the config has no test-time augmentation" in printed
    assert json.loads((out / "ablation.json").read_text())["tta"] is False
    # an output folder that cannot be made: one line, before any row
    (tmp_path / "a_file").write_text("x")
    code, printed, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"),
                                "--output-dir", str(tmp_path / "a_file"))
    assert code == 2 and "cannot create the ablation's folder" in err and "baseline (" not in printed


@pytest.mark.slow
def test_a_context_checkpoint_as_the_baseline_is_one_clear_line(runs, tmp_path, ablate):
    root, overrides = runs
    code, _, err = ablate(root, overrides, "--weights", str(root / "context" / "model_final.pth"),
                          "--output-dir", str(tmp_path / "t"))
    assert code == 2
    assert "global context" in err and len(err.strip().splitlines()) == 1
    assert "give a checkpoint trained without global context as --weights (and this one as --context-weights)" in err
    # the other way round, found before the first row (on COCO the rows before it take hours)
    code, out, err = ablate(root, overrides, "--weights", str(root / "base" / "model_final.pth"), "--context-weights",
                            str(root / "base" / "model_final.pth"), "--output-dir", str(tmp_path / "u"))
    assert code == 2 and "was trained without global context" in err and "baseline (" not in out


def test_table9_rows_are_cumulative_with_the_papers_numbers_beside_them(tmp_path, monkeypatch, capsys):
    """A fake evaluator with a known AP per switch set: each Table 9 row must get the AP of the
    paper's switch set (+ context on top of box refinement, + multi-scale on top of both), the
    context rows the context checkpoint, and the table the paper's numbers on the same line."""
    generate_shapes(tmp_path / "data" / "shapes", num_train=1, num_val=2, seed=0, image_size=(64, 80))
    (tmp_path / "base.pth").write_bytes(b"x")
    (tmp_path / "context.pth").write_bytes(b"x")
    tool = load_tool("ablate")
    seen = []

    def fake_evaluate(cfg, weights, datasets, device, where, explicit):
        refine, context, multi = (cfg.test.box_refinement.enabled, cfg.model.roi_heads.global_context,
                                  cfg.test.multi_scale.enabled)
        assert weights.endswith("context.pth") == context  # the context switch needs its own checkpoint
        assert not cfg.test.aug.enabled
        seen.append((refine, context, multi))
        ap = 1 + 10 * refine + 20 * context + 40 * multi  # distinct per switch set
        return {"AP": ap, "AP50": ap + 50, "AP75": ap + 0.5, "seconds_per_image": 0.25}

    monkeypatch.setattr(tool, "evaluate_row", fake_evaluate)
    monkeypatch.setattr(tool, "check_context", lambda *files: None)  # the files are stand-ins
    out = tmp_path / "table"
    assert tool.main(["--config", str(ROOT / "configs" / "shapes_r18.yaml"), f"datasets.root={tmp_path / 'data'}",
                      "datasets.test=[shapes_val]", "test.aug.enabled=true", "--weights", str(tmp_path / "base.pth"),
                      "--context-weights", str(tmp_path / "context.pth"), "--output-dir", str(out)]) == 0
    assert seen == [(False, False, False), (True, False, False), (True, True, False), (True, True, True),
                    (False, True, False), (False, False, True), (True, False, True)]
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert [(r["row"], r["group"], r["AP"]) for r in rows] == [
        ("baseline", TABLE9, 1), ("+ box refinement", TABLE9, 11), ("+ context", TABLE9, 31),
        ("+ multi-scale testing", TABLE9, 71), ("context alone", APART, 21),
        ("multi-scale testing alone", APART, 41), ("box refinement + multi-scale testing, no context", APART, 51)]
    assert [(r["paper_AP50"], r["paper_AP"]) for r in rows] == \
        [(48.4, 27.2), (49.9, 29.9), (51.1, 30.0), (53.8, 32.5), (None, None), (None, None), (None, None)]
    table = (out / "ablation.md").read_text()
    assert table in capsys.readouterr().out
    lines = table.splitlines()
    # AP50 | AP | AP75 | paper mAP@.5 | paper mAP@[.5, .95] | s / image, the paper's rows first
    expected = ["| baseline | 51.0 | 1.0 | 1.5 | 48.4 | 27.2 | 0.250 |",
                "| + box refinement | 61.0 | 11.0 | 11.5 | 49.9 | 29.9 | 0.250 |",
                "| + context | 81.0 | 31.0 | 31.5 | 51.1 | 30.0 | 0.250 |",
                "| + multi-scale testing | 121.0 | 71.0 | 71.5 | 53.8 | 32.5 | 0.250 |",
                "| context alone | 71.0 | 21.0 | 21.5 | 0.250 |",
                "| multi-scale testing alone | 91.0 | 41.0 | 41.5 | 0.250 |",
                "| box refinement + multi-scale testing, no context | 101.0 | 51.0 | 51.5 | 0.250 |"]
    assert [line for line in lines if line.startswith("| ") and "AP50" not in line] == expected
    header = lines.index(next(line for line in lines if line.startswith("Not in Table 9")))
    assert lines.index(expected[3]) < header < lines.index(expected[4])  # the rows apart come after, labelled


def test_without_context_weights_the_table_says_which_table9_rows_are_missing(tmp_path):
    from detection.config import load_config
    from detection.study.ablation import format_table, run_ablation

    cfg = load_config(ROOT / "configs" / "shapes_r18.yaml")
    results = run_ablation(select_rows(False), lambda row: {"AP": 1.0, "AP50": 2.0, "AP75": 3.0,
                                                            "seconds_per_image": 0.1})
    table = format_table(results, cfg, "shapes_val", tta=False)
    # the test settings the numbers come from (a trial: the table named neither, and its
    # --config's test size was not the run's)
    assert (f"Test size {cfg.input.min_size_test} (max {cfg.input.max_size_test}), score threshold "
            f"{cfg.model.roi_heads.score_thresh_test}, 100 detections per image, test.amp true.") in table
    results[0]["weights"] = "/runs/a/model_final.pth"
    assert "test.amp true; checkpoint /runs/a/model_final.pth." in format_table(results, cfg, "shapes_val", False)
    assert "Not evaluated (they need --context-weights): + context, + multi-scale testing." in table
    assert "| baseline | 2.0 | 1.0 | 3.0 | 48.4 | 27.2 | 0.100 |" in table


def test_the_code_version_changes_with_any_source_file(tmp_path):
    tool = load_tool("ablate")
    package = tmp_path / "detection"
    (package / "modeling").mkdir(parents=True)
    (package / "modeling" / "rpn.py").write_text("NMS = 0.7\n")
    (package / "notes.txt").write_text("not code")
    first = tool.code_version((package,))
    (package / "notes.txt").write_text("changed, still not code")
    assert tool.code_version((package,)) == first
    (package / "modeling" / "rpn.py").write_text("NMS = 0.6\n")
    assert tool.code_version((package,)) != first
    (package / "modeling" / "rpn.py").write_text("NMS = 0.7\n")
    (package / "modeling" / "rpn.py").rename(package / "rpn.py")  # the same bytes in another module
    assert tool.code_version((package,)) != first
    assert len(tool.code_version()) == 64  # the installed packages' own


def test_an_ablation_goes_on_where_it_stopped_and_adds_the_context_rows_alone(tmp_path, monkeypatch, capsys):
    """Rows saved by an earlier run of the same checkpoint and settings are kept, not evaluated
    again (hours each on COCO): after an interruption, and when --context-weights is added to a
    finished ablation; a changed checkpoint or setting evaluates them again."""
    import os

    generate_shapes(tmp_path / "data" / "shapes", num_train=1, num_val=2, seed=0, image_size=(64, 80))
    for name in ("base.pth", "context.pth", "other_context.pth"):
        (tmp_path / name).write_bytes(b"x")
    tool = load_tool("ablate")
    seen, stop_at = [], []

    def fake_evaluate(cfg, weights, datasets, device, where, explicit):
        if len(seen) in stop_at:
            raise KeyboardInterrupt
        seen.append(cfg.test.box_refinement.enabled + 2 * cfg.model.roi_heads.global_context
                    + 4 * cfg.test.multi_scale.enabled)
        where.mkdir(parents=True)
        (where / "metrics.json").write_text("{}")
        ap = 1 + 10 * cfg.test.box_refinement.enabled + 20 * cfg.model.roi_heads.global_context \
            + 40 * cfg.test.multi_scale.enabled + cfg.test.box_refinement.nms_thresh
        return {"AP": ap, "AP50": ap, "AP75": ap, "seconds_per_image": 0.25}

    monkeypatch.setattr(tool, "evaluate_row", fake_evaluate)
    monkeypatch.setattr(tool, "check_context", lambda *files: None)  # the files are stand-ins
    out = tmp_path / "table"
    common = ["--config", str(ROOT / "configs" / "shapes_r18.yaml"), f"datasets.root={tmp_path / 'data'}",
              "datasets.test=[shapes_val]", "--weights", str(tmp_path / "base.pth"), "--output-dir", str(out)]
    with_context = ["--context-weights", str(tmp_path / "context.pth")]
    saved = lambda: json.loads((out / "ablation.json").read_text())  # noqa: E731

    # interrupted at the third row: the two rows done are saved, and the next run goes on from there
    stop_at.append(2)
    assert tool.main(common) == 130
    assert "the same command goes on from there" in capsys.readouterr().err
    assert [r["row"] for r in saved()["rows"]] == ["baseline", "+ box refinement"] and not saved()["complete"]
    stop_at.clear()
    seen.clear()
    assert tool.main(common) == 0
    assert seen == [4, 5]  # multi-scale alone, refinement + multi-scale: the rows the interrupted run had not made
    assert "kept from the earlier run" in capsys.readouterr().out and saved()["complete"]

    # --context-weights added: only the three context rows are evaluated, the others' folders stay
    seen.clear()
    assert tool.main(common + with_context) == 0
    assert seen == [3, 7, 2]
    rows = saved()["rows"]
    assert [r["row"] for r in rows] == TABLE9_NAMES + APART_NAMES
    assert [r["AP"] for r in rows] == pytest.approx([1.3, 11.3, 31.3, 71.3, 21.3, 41.3, 51.3])
    assert (out / "baseline" / "metrics.json").is_file() and (out / "context" / "metrics.json").is_file()
    assert "| + context | 31.3 |" in (out / "ablation.md").read_text()

    # the same again: nothing to evaluate; another setting, or the checkpoint written again: every row it touches
    seen.clear()
    assert tool.main(common + with_context) == 0 and seen == []
    assert tool.main(common + with_context + ["test.box_refinement.nms_thresh=0.4"]) == 0
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 7]
    assert saved()["rows"][0]["AP"] == pytest.approx(1.4)
    seen.clear()
    stat = (tmp_path / "context.pth").stat()
    os.utime(tmp_path / "context.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert tool.main(common + with_context + ["test.box_refinement.nms_thresh=0.4"]) == 0
    assert seen == [3, 7, 2]  # the context checkpoint changed: its rows only

    # another version of this toolkit's code: every row again (a fix of the evaluation kept its old figures)
    seen.clear()
    monkeypatch.setattr(tool, "code_version", lambda: "another commit")
    assert tool.main(common + with_context + ["test.box_refinement.nms_thresh=0.4"]) == 0
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 7]
    monkeypatch.undo()
    monkeypatch.setattr(tool, "evaluate_row", fake_evaluate)
    monkeypatch.setattr(tool, "check_context", lambda *files: None)

    # the context rows of another context checkpoint, or of one against none, are not replaced
    for other in (["--context-weights", str(tmp_path / "other_context.pth")], []):
        seen.clear()
        with pytest.raises(SystemExit) as refused:
            tool.main(common + other)
        assert refused.value.code == 2 and seen == []
    assert "--overwrite" in capsys.readouterr().err
