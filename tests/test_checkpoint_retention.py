"""solver.keep_checkpoints N: the last N periodic checkpoints kept as model_{iter:07d}.pth
beside last.pth and model_final.pth (Detectron2's PeriodicCheckpointer); old ones deleted only
once the new one is written; a resumed run keeps counting its own."""
import dataclasses
import errno
import shutil
from pathlib import Path

import pytest
import torch

from detection.data.shapes import generate_shapes
from detection.engine import loop_checkpoints
from detection.engine.checkpoint import CheckpointError, load_checkpoint, load_resume_checkpoint
from detection.engine.trainer import TrainingError, train
from tests.helpers import tiny_cfg

# the tests that train (a few tiny iterations) are slow; those of the rules alone run in test-fast
KEEP_TWO = {"solver.checkpoint_period": 1, "solver.keep_checkpoints": 2, "solver.max_iter": 4}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", num_train=4, num_val=2, seed=0, image_size=(64, 80))
    return root


def periodic(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("model_*.pth") if p.name != "model_final.pth")


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory):
    """A run of 4 iterations with a checkpoint at each, keeping 2: (its folder, its model)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return out, train(tiny_cfg(data_root, out, **KEEP_TWO))


@pytest.mark.slow
def test_keeps_exactly_the_last_n_as_full_training_checkpoints(straight):
    out, _ = straight
    assert periodic(out) == ["model_0000003.pth", "model_0000004.pth"]
    assert (out / "last.pth").is_file() and (out / "model_final.pth").is_file()
    assert not list(out.glob("*.tmp*"))
    assert load_resume_checkpoint(out / "model_0000003.pth")["iteration"] == 3  # one can resume from it
    newest = load_resume_checkpoint(out / "model_0000004.pth")
    assert newest["iteration"] == 4
    assert same_weights(newest["model"], load_checkpoint(out / "last.pth")["model"])


@pytest.mark.slow
def test_a_damaged_last_pth_names_the_kept_checkpoint_to_resume_from(straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    (out / "last.pth").write_bytes((out / "last.pth").read_bytes()[:1000])  # cut short
    with pytest.raises(CheckpointError, match=r"a damaged checkpoint .*; .*model_0000004.pth \(solver.keep_checkpoints\) "
                                              r"is a training checkpoint too: copy it to last.pth to resume from "
                                              r"iteration 4"):
        load_resume_checkpoint(out / "last.pth")


@pytest.mark.slow
def test_zero_keeps_none(data_root, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(data_root, out, **{"solver.checkpoint_period": 1, "solver.max_iter": 2}))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "last.pth", "log.txt", "metrics.jsonl",
                                                      "model_final.pth"]


@pytest.mark.slow
def test_a_failed_save_deletes_no_old_checkpoint_and_the_resume_goes_on(data_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = loop_checkpoints.save_checkpoint

    def save(state, path):  # the disk fills up while model_0000003.pth is written
        if Path(path).name == "model_0000003.pth":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(state, path)

    monkeypatch.setattr(loop_checkpoints, "save_checkpoint", save)
    with pytest.raises(TrainingError, match=r"could not write \S*model_0000003.pth at iteration 3 \(No space left "
                                            r"on device\); training stopped, the last good checkpoint \S*last.pth "
                                            r"\(iteration 2\) is kept"):
        train(tiny_cfg(data_root, out, **KEEP_TWO))
    assert periodic(out) == ["model_0000001.pth", "model_0000002.pth"]  # none deleted
    assert load_resume_checkpoint(out / "last.pth")["iteration"] == 2
    monkeypatch.setattr(loop_checkpoints, "save_checkpoint", real_save)  # the disk has room again
    train(tiny_cfg(data_root, out, **KEEP_TWO), resume=True)
    assert periodic(out) == ["model_0000003.pth", "model_0000004.pth"]  # the run's older ones pruned


@pytest.mark.slow
def test_resume_with_kept_checkpoints_equals_a_straight_run(data_root, tmp_path, straight):
    straight_out, straight_model = straight
    out = tmp_path / "resumed"
    train(tiny_cfg(data_root, out, **{**KEEP_TWO, "solver.keep_checkpoints": 1, "solver.max_iter": 2}))
    assert periodic(out) == ["model_0000002.pth"]
    resumed = train(tiny_cfg(data_root, out, **KEEP_TWO), resume=True)  # now keeping 2
    assert periodic(out) == ["model_0000003.pth", "model_0000004.pth"]
    assert same_weights(straight_model.state_dict(), resumed.state_dict())
    assert same_weights(load_checkpoint(out / "model_0000004.pth")["model"],
                        load_checkpoint(straight_out / "model_0000004.pth")["model"])


@pytest.mark.slow
def test_a_resume_from_an_earlier_checkpoint_sets_the_abandoned_history_aside(straight, data_root, tmp_path, caplog):
    """The README's way back (copy model_0000003.pth to last.pth) left the abandoned run's later
    model_0000004.pth and model_final.pth among the new run's (a long-run trial: four files kept of
    three, one of another history, and eval.py on model_final.pth scored the old run). They move
    into abandoned_after_0000003/, named in a warning; the new run writes its own."""
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    old_final = load_checkpoint(out / "model_final.pth")["model"]
    shutil.copy(out / "model_0000003.pth", out / "last.pth")
    train(tiny_cfg(data_root, out, **{**KEEP_TWO, "solver.base_lr": 0.002}), resume=True)
    aside = out / "abandoned_after_0000003"
    assert sorted(p.name for p in aside.iterdir()) == ["model_0000004.pth", "model_final.pth"]
    assert "resumed at iteration 3: model_0000004.pth, model_final.pth (iteration 4), of this folder's run past it" \
        in caplog.text
    assert same_weights(load_checkpoint(aside / "model_final.pth")["model"], old_final)  # kept, as it was
    assert periodic(out) == ["model_0000003.pth", "model_0000004.pth"]  # the new run's own two
    new_final = load_checkpoint(out / "model_final.pth")
    assert new_final["config"]["solver"]["base_lr"] == 0.002 and not same_weights(new_final["model"], old_final)
    # a resume of a finished run to train on (max_iter raised) keeps its history: nothing is later
    caplog.clear()
    train(tiny_cfg(data_root, out, **{**KEEP_TWO, "solver.base_lr": 0.002, "solver.max_iter": 5}), resume=True)
    assert "of this folder's run past it" not in caplog.text and sorted(p.name for p in out.glob("abandoned_after_*")) == [aside.name]


@pytest.mark.slow
def test_ending_a_run_at_an_earlier_checkpoint_writes_its_model_final(straight, data_root, tmp_path):
    """A review: `cp model_0000003.pth last.pth; --resume solver.max_iter=3` (what the "cannot go back"
    error advises) said the run was finished and left no model_final.pth: the abandoned run's (of
    iteration 4) was found, then moved aside."""
    out = tmp_path / "run"
    shutil.copytree(straight[0], out)
    shutil.copy(out / "model_0000003.pth", out / "last.pth")
    train(tiny_cfg(data_root, out, **{**KEEP_TWO, "solver.max_iter": 3}), resume=True)
    final = load_checkpoint(out / "model_final.pth")
    assert final["iteration"] == 3
    assert same_weights(final["model"], load_checkpoint(out / "model_0000003.pth")["model"])
    assert load_checkpoint(out / "abandoned_after_0000003" / "model_final.pth")["iteration"] == 4


def scripted_evaluation(monkeypatch, values: list):
    """Training's evaluations give AP values[0], values[1], ... in turn (a real evaluation of a
    tiny 4-iteration model gives 0 every time): what test.save_best does with rising, equal,
    falling and NaN values."""
    import detection.engine.trainer

    given = iter(values)
    def evaluate(cfg, model, **kwargs):
        value = next(given)
        return {"AP": value, "AP50": value}  # the same value under either name
    monkeypatch.setattr(detection.engine.trainer, "evaluate", evaluate)


def record(checkpoint: dict) -> dict:
    """model_best.pth's "best" without its "settings" (what the value was measured under)."""
    return {key: checkpoint["best"][key] for key in ("metric", "value", "iteration")}


BEST = {"test.eval_period": 1, "test.save_best": "AP", "solver.checkpoint_period": 1, "solver.max_iter": 4}


@pytest.mark.slow
def test_save_best_keeps_the_weights_of_the_highest_evaluation_and_a_resume_goes_on_from_it(
        data_root, tmp_path, monkeypatch, caplog):
    """MMDetection's save_best / Detectron2's BestCheckpointer: model_best.pth is written when an
    evaluation beats every earlier one (NaN and ties do not), with the weights of that iteration."""
    import logging

    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    scripted_evaluation(monkeypatch, [10.0, 30.0, 30.0, float("nan")])  # at iterations 1, 2, 3, 4
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}))
    best = load_checkpoint(out / "model_best.pth")
    assert record(best) == {"metric": "AP", "value": 30.0, "iteration": 2} and best["iteration"] == 2
    assert same_weights(best["model"], load_checkpoint(out / "model_0000002.pth")["model"])  # iteration 2's weights
    assert set(best) == {"model", "iteration", "config", "class_names", "best"}  # as model_final.pth: eval.py reads it
    assert "AP 30.00 at iteration 2, the best so far (was 10.00 at iteration 1)" in caplog.text
    assert f"the best AP, 30.00, was at iteration 2: {out / 'model_best.pth'} holds those weights" in caplog.text
    # a resume from iteration 3 keeps it (30 at 2 stays the best: 20 does not replace it, 40 does)
    shutil.copy(out / "model_0000003.pth", out / "last.pth")
    scripted_evaluation(monkeypatch, [20.0, 40.0])  # 4, 5 (metrics.jsonl has 3's)
    train(tiny_cfg(data_root, out, **{**BEST, "solver.max_iter": 5}), resume=True)
    assert record(load_checkpoint(out / "model_best.pth")) == {"metric": "AP", "value": 40.0, "iteration": 5}
    # a resume from before the best sets it aside with the rest of that history
    shutil.copy(out / "model_0000001.pth", out / "last.pth")
    scripted_evaluation(monkeypatch, [5.0])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.max_iter": 2}), resume=True)
    assert load_checkpoint(out / "abandoned_after_0000001" / "model_best.pth")["best"]["iteration"] == 5
    # the kept history's best (10 at iteration 1, metrics.jsonl) stays the best: 5 does not beat it
    assert record(load_checkpoint(out / "model_best.pth")) == {"metric": "AP", "value": 10.0, "iteration": 1}


def test_save_best_names_a_metric_the_evaluations_give_before_training(data_root, tmp_path):
    from detection.config import ConfigError
    from detection.engine.loop_checkpoints import best_metric_key
    from detection.engine.startup import build_test_datasets

    cfg = tiny_cfg(data_root, tmp_path / "run", **BEST)
    sets = build_test_datasets(cfg, ["circle", "square", "triangle"])
    assert best_metric_key(cfg, sets) == "AP"
    cfg.test.save_best = "shapes_val/AP-square"  # the one set's name may be given: its keys carry none
    assert best_metric_key(cfg, sets) == "AP-square"
    cfg.test.save_best = "AP_50"
    with pytest.raises(ConfigError, match=r"test.save_best: 'AP_50' is not a metric of this run's evaluations "
                                          r"\(closest: AP50"):
        best_metric_key(cfg, sets)
    two = sets + [dataclasses.replace(sets[0], name="other")]
    cfg.test.save_best = "AP50"
    with pytest.raises(ConfigError, match=r"closest: shapes_val/AP50, other/AP50; with several test sets, "
                                          r"<test set>/<metric>\)"):
        best_metric_key(cfg, two)
    cfg.test.save_best = "other/AP50"
    assert best_metric_key(cfg, two) == "other/AP50"
    server = dataclasses.replace(sets[0], name="server", has_annotations=False)  # test-dev: files, no metric
    cfg.test.save_best = "server/AP"
    with pytest.raises(ConfigError, match=r"'server/AP': test set server has no annotations \(its evaluation"):
        best_metric_key(cfg, [*sets, server])
    cfg.test.save_best = "AP"
    with pytest.raises(ConfigError, match="test set server has no annotations"):
        best_metric_key(cfg, [server])
    # a class the set has no object of: its AP is never defined (a trial's AP-square on circles)
    circles = dataclasses.replace(sets[0], records=[{**r, "boxes": r["boxes"][r["labels"] != 2],
                                                     "labels": r["labels"][r["labels"] != 2]} for r in sets[0].records])
    cfg.test.save_best = "AP50-square"
    with pytest.raises(ConfigError, match="test set shapes_val has no object of class square, so its AP50 is never "
                                          "defined"):
        best_metric_key(cfg, [circles])
    cfg.test.eval_period = 0
    with pytest.raises(ConfigError, match="this run evaluates none: give test.eval_period > 0 and datasets.test"):
        best_metric_key(cfg, sets)
    # and before the first iteration: nothing of the run is written
    with pytest.raises(ConfigError, match="not a metric"):
        train(tiny_cfg(data_root, tmp_path / "bad", **{**BEST, "test.save_best": "APS"}))
    assert not (tmp_path / "bad" / "last.pth").exists()


@pytest.mark.slow
def test_save_best_keeps_an_earlier_best_of_another_metric_or_settings_and_says_when_it_finds_none(
        data_root, tmp_path, monkeypatch, caplog):
    """A review: a resume with another test.save_best metric overwrote model_best.pth at its first
    evaluation (the best AP's weights lost), and a metric never defined (NaN) left no
    model_best.pth without a word."""
    import logging

    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    scripted_evaluation(monkeypatch, [10.0, 30.0, 20.0, 5.0])
    train(tiny_cfg(data_root, out, **BEST))
    kept = load_checkpoint(out / "model_best.pth")["model"]
    scripted_evaluation(monkeypatch, [1.0])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.max_iter": 5, "test.save_best": "AP50"}), resume=True)
    aside = load_checkpoint(out / "model_best_AP_0000002.pth")
    assert aside["best"]["value"] == 30.0 and same_weights(aside["model"], kept)
    assert "keeps the best AP, not test.save_best's AP50: moved to model_best_AP_0000002.pth" in caplog.text
    assert load_checkpoint(out / "model_best.pth")["best"]["metric"] == "AP50"
    # the same metric at another test size is not comparable either
    scripted_evaluation(monkeypatch, [0.5])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.max_iter": 6, "test.save_best": "AP50",
                                      "input.min_size_test": 48}), resume=True)
    assert "keeps the best AP50 under other test sets or test settings than this run's: moved to " \
        "model_best_AP50_0000005.pth" in caplog.text
    assert load_checkpoint(out / "model_best.pth")["best"]["value"] == 0.5
    # never defined: said at the first evaluation and at the end
    caplog.clear()
    scripted_evaluation(monkeypatch, [float("nan")] * 4)
    train(tiny_cfg(data_root, tmp_path / "nan", **BEST))
    assert not (tmp_path / "nan" / "model_best.pth").exists()
    said = [r.getMessage() for r in caplog.records if "test.save_best" in r.getMessage()]
    assert said == ["test.save_best: AP is not defined at iteration 1 (no object of that class or size among the test "
                    "images?): no model_best.pth from it",
                    "test.save_best: AP was not defined at any evaluation of this run: no model_best.pth"]


@pytest.mark.slow
def test_a_resume_from_before_the_best_goes_on_from_the_kept_historys_best(data_root, tmp_path, monkeypatch, caplog):
    """A trial: after the README's way back to an earlier checkpoint (model_best.pth, of a later
    iteration, set aside), the next evaluation of any value became "the best so far". The best of
    metrics.jsonl up to the resumed iteration is the best so far, its weights written as
    model_best.pth when a checkpoint of that iteration is here, else said."""
    import logging

    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    scripted_evaluation(monkeypatch, [30.0, 20.0, 40.0, 5.0])  # the best, 40, at iteration 3
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}))
    shutil.copy(out / "model_0000002.pth", out / "last.pth")  # back to 2: its history's best is 30 at 1
    scripted_evaluation(monkeypatch, [10.0, 25.0])  # at 3 and 4: neither beats 30
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}), resume=True)
    best = load_checkpoint(out / "model_best.pth")
    assert record(best) == {"metric": "AP", "value": 30.0, "iteration": 1} and best["iteration"] == 1
    assert same_weights(best["model"], load_checkpoint(out / "model_0000001.pth")["model"])
    assert "the best AP up to iteration 2, 30.00 at iteration 1 (metrics.jsonl): " in caplog.text
    assert record(load_checkpoint(out / "abandoned_after_0000002" / "model_best.pth"))["value"] == 40.0
    # at the resumed iteration itself: written from last.pth; its weights not kept anywhere: said
    out = tmp_path / "run2"
    scripted_evaluation(monkeypatch, [10.0, 30.0, 40.0, 5.0])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}))
    shutil.copy(out / "model_0000002.pth", out / "last.pth")
    scripted_evaluation(monkeypatch, [1.0, 2.0])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}), resume=True)
    best = load_checkpoint(out / "model_best.pth")
    assert record(best) == {"metric": "AP", "value": 30.0, "iteration": 2}
    assert same_weights(best["model"], load_checkpoint(out / "model_0000002.pth")["model"])
    out = tmp_path / "run3"
    scripted_evaluation(monkeypatch, [30.0, 20.0, 40.0, 5.0])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}))
    shutil.copy(out / "model_0000002.pth", out / "last.pth")
    (out / "model_0000001.pth").unlink()
    scripted_evaluation(monkeypatch, [10.0, 35.0])
    caplog.clear()
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}), resume=True)
    assert "test.save_best: the best AP up to iteration 2, 30.00, was at iteration 1 (metrics.jsonl), whose weights " \
        "are not kept here: model_best.pth is written when an evaluation beats it" in caplog.text
    assert record(load_checkpoint(out / "model_best.pth")) == {"metric": "AP", "value": 35.0, "iteration": 4}
    # a resume at another test size: the history's values were measured otherwise, none is taken
    out = tmp_path / "run4"
    scripted_evaluation(monkeypatch, [30.0, 20.0, 40.0, 5.0])
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4}))
    shutil.copy(out / "model_0000002.pth", out / "last.pth")
    scripted_evaluation(monkeypatch, [1.0, 2.0])
    caplog.clear()
    train(tiny_cfg(data_root, out, **{**BEST, "solver.keep_checkpoints": 4, "input.min_size_test": 48}), resume=True)
    assert "(metrics.jsonl)" not in caplog.text
    assert record(load_checkpoint(out / "model_best.pth")) == {"metric": "AP", "value": 2.0, "iteration": 4}


def test_a_model_best_without_recorded_settings_is_taken_as_comparable(tmp_path):
    """A review: one written before the settings were recorded was moved aside as "other test
    settings", and the next evaluation, however low, became the best."""
    from detection.engine.loop_checkpoints import read_best

    torch.save({"model": {}, "iteration": 1200, "best": {"metric": "AP", "value": 71.5, "iteration": 1200}},
               tmp_path / "model_best.pth")
    assert read_best(tmp_path, "AP", {"test": {}})["value"] == 71.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_best.pth"]


def test_best_from_history_takes_the_first_highest_finite_value_up_to_the_resumed_iteration(tmp_path):
    """A resume rebuilds the best from metrics.jsonl: NaN, null, a line cut short and evaluations
    after the resumed iteration are not it; of equal values the first, as save_best keeps it."""
    from detection.engine.loop_checkpoints import best_from_history

    lines = ['{"iteration": 20, "total_loss": 1.5}', '{"iteration": 100, "AP": 40.0}', '{"iteration": 200, "AP": NaN}',
             '{"iteration": 300, "AP": 52.5}', '{"iteration": 400, "AP": null}', '{"iteration": 500, "AP": 52.5}',
             '{"iteration": 600, "AP": 70.0}', '{"iteration": 700, "AP": 99', '']
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines))
    assert best_from_history(path, "AP", 550) == {"metric": "AP", "value": 52.5, "iteration": 300}
    assert best_from_history(path, "AP", 600)["iteration"] == 600
    assert best_from_history(path, "AP", 250) == {"metric": "AP", "value": 40.0, "iteration": 100}
    assert best_from_history(path, "AP", 99) is None and best_from_history(path, "AP50", 1000) is None
    assert best_from_history(tmp_path / "none.jsonl", "AP", 1000) is None
