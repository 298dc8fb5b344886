"""The training loop's checkpoints (the file format is checkpoint.py's): last.pth with every rank's
random states, the periodic model_{iter:07d}.pth kept by solver.keep_checkpoints,
model_final.pth, the save after a signal, and what a stopped run leaves to resume from."""
from __future__ import annotations

import difflib
import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from detection.config import Config, ConfigError, config_to_dict
from detection.engine import distributed as du
from detection.engine.checkpoint import (gather_rng_states, non_finite_tensors, periodic_checkpoint_path,
                                         prune_checkpoints, save_checkpoint)
from detection.engine.errors import TrainingError
from detection.engine.inference_model import TEST_KEYS
from detection.engine.signals import GracefulStop
from detection.engine.train_state import TrainState
from detection.utils.files import DISK_FULL
from detection.utils.text import first_few

logger = logging.getLogger(__name__)
BEST_FILE = "model_best.pth"  # test.save_best's


def what_is_kept(state: TrainState, path: Path) -> str:
    """What a stopped run leaves to resume from, as it really is."""
    if state.checkpoint_iteration is None:
        return (f"and no checkpoint was written yet ({path} does not exist): a new run starts from iteration 0 "
                "(--overwrite replaces this one's files)")
    return f"the last good checkpoint {path} (iteration {state.checkpoint_iteration}) is kept: --resume continues it"


def kept_after_divergence(state: TrainState, path: Path) -> str:
    """What a run stopped by a non-finite loss or weights leaves, and what to do: its last
    checkpoint is only finite, and may be on the way there (resumed with a lower lr it
    diverged again at once, in a trial)."""
    if state.checkpoint_iteration is None:
        return what_is_kept(state, path) + ". Try a lower solver.base_lr or solver.clip_grad_norm"
    earlier = [it for it in state.periodic if it < state.checkpoint_iteration]  # solver.keep_checkpoints'
    back = (f", or resume from an earlier one ({periodic_checkpoint_path(path.parent, earlier[-1]).name} copied to "
            f"{path.name})") if earlier else ""
    return (f"the last checkpoint with finite weights {path} (iteration {state.checkpoint_iteration}) is kept, but it "
            "may already be diverging (see total_loss in metrics.jsonl up to it): rather than --resume it, start "
            f"again (--overwrite) with a lower solver.base_lr or solver.clip_grad_norm{back}")


def check_finite_weights(state: TrainState, path: Path) -> None:
    """TrainingError when the weights are no longer finite (before an evaluation: it scored the
    broken model, AP 0 in metrics.jsonl, until the next checkpoint found out)."""
    problem = _diverged(state, kept_after_divergence(state, path))
    if problem:
        raise TrainingError(problem)


def _diverged(state: TrainState, kept: str) -> str | None:
    """Why the model's weights must not be saved (some are NaN or infinite), None if they may.
    A loss can stay finite while weights diverge (BatchNorm normalises with the batch's own
    statistics in training, so running statistics that overflow show only in evaluation); a
    checkpoint is never written with them, so the one kept stays the last good one."""
    bad = non_finite_tensors(state.model.state_dict())
    if not bad:
        return None
    names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
    return (f"iteration {state.iteration}: the weights are no longer finite ({len(bad)} tensors hold NaN or "
            f"infinite values: {names}) though the loss is; training diverged and stopped without saving them, "
            f"{kept}")


def training_checkpoint(state: TrainState, cfg: Config, rng: list) -> dict:
    """Everything --resume needs (checkpoint.RESUME_KEYS), the config and the class names."""
    return {
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "iteration": state.iteration,
        "rng": rng[0],
        "rng_per_rank": rng,
        "data_order": state.data_order,  # how the epochs follow from the seed: a resume goes on in it
        "train_data": state.train_data,  # which images: a resume on other data is said
        "threads": torch.get_num_threads(),  # the CPU's float sums' order: an exact resume needs the same
        "config": config_to_dict(cfg),
        "class_names": list(state.class_names),
    }


def save_last(state: TrainState, cfg: Config, path: Path, periodic: bool = False) -> None:
    """last.pth with every rank's random states (gathered: a collective). A failed write (a
    full disk) leaves the previous last.pth as it was and stops every rank with one error; so
    do weights that are no longer finite (`_diverged`), which are not written.
    A periodic one with solver.keep_checkpoints N is first written as model_{iter:07d}.pth
    too (the same training checkpoint); the oldest beyond N are deleted only once both files
    are written, so a failed save deletes none."""
    rng = gather_rng_states()
    problem = None
    if du.is_main_process():
        diverged = _diverged(state, kept_after_divergence(state, path))
        problem = (diverged, False) if diverged else _write_last(state, cfg, path, rng, periodic)
    problems = [p for p in du.all_gather_object(problem) if p]  # every rank stops, not rank 0 alone
    if problems:
        raise TrainingError(problems[0][0], transient=problems[0][1])
    state.checkpoint_iteration = state.iteration  # after the save: a Ctrl-C inside it keeps the old one


def _write_last(state: TrainState, cfg: Config, path: Path, rng: list, periodic: bool) -> tuple[str, bool] | None:
    """Write last.pth (and the periodic copy); (what went wrong, whether it may pass: a full disk), or None."""
    keep = cfg.solver.keep_checkpoints if periodic else 0
    target = path
    try:
        ckpt = training_checkpoint(state, cfg, rng)
        for target in ([periodic_checkpoint_path(path.parent, state.iteration)] if keep else []) + [path]:
            save_checkpoint(ckpt, target)
    except OSError as err:
        return (f"could not write {target} at iteration {state.iteration} "
                f"({err.strerror or err}); training stopped, {what_is_kept(state, path)}", err.errno in DISK_FULL)
    if keep:
        state.periodic = prune_checkpoints(path.parent, state.periodic + [state.iteration], keep)
    return None


def stop_gracefully(state: TrainState, cfg: Config, path: Path, stop: GracefulStop) -> None:
    """Save last.pth at this iteration (unless it holds it already) and raise TrainingStopped."""
    with stop.saving_last():
        if state.checkpoint_iteration != state.iteration:
            save_last(state, cfg, path)
    raise stop.stopped(path, state.iteration)


def _weights_checkpoint(state: TrainState, cfg: Config) -> dict:
    """What model_final.pth and model_best.pth hold: the weights, iteration, config and class names
    (no optimizer: not resumable, half the size of last.pth)."""
    return {"model": state.model.state_dict(), "iteration": state.iteration, "config": config_to_dict(cfg),
            "class_names": list(state.class_names)}


def save_final(state: TrainState, cfg: Config, out_dir: Path) -> Path:
    """model_final.pth (the weights, iteration, config and class names); returns its path."""
    path = out_dir / "model_final.pth"
    check_finite_weights(state, out_dir / "last.pth")
    try:
        save_checkpoint(_weights_checkpoint(state, cfg), path)
    except OSError as err:
        raise TrainingError(f"could not write {path} ({err.strerror or err}); "
                            f"{what_is_kept(state, out_dir / 'last.pth')}", transient=err.errno in DISK_FULL) from None
    return path



def best_metric_key(cfg: Config, test_sets: Sequence) -> str | None:
    """test.save_best as the run's evaluations name it in metrics.jsonl (a single test set's keys
    have no "<set>/"; "<set>/AP" is taken for it too), None when it is not set. ConfigError, at the
    start, for a metric no evaluation of this run gives (it was found out at the first evaluation)."""
    from detection.evaluation.test_sets import metric_names

    wanted = cfg.test.save_best
    if wanted is None:
        return None
    if not test_sets or cfg.test.eval_period <= 0:
        raise ConfigError(f"test.save_best: {wanted!r} keeps the weights of the best evaluation during training, and "
                          "this run evaluates none: give test.eval_period > 0 and datasets.test")
    max_dets = cfg.test.coco_max_dets  # AR<max_dets>
    scored = [d for d in test_sets if d.has_annotations]  # a set for an evaluation server gives no metric
    if len(test_sets) == 1:
        keys = metric_names(test_sets[0], max_dets) if scored else []
        wanted = wanted.removeprefix(f"{test_sets[0].name}/")
    else:
        keys = [f"{d.name}/{key}" for d in scored for key in metric_names(d, max_dets)]
    if wanted in keys:
        _check_defined(wanted, test_sets)
        return wanted
    unscored = [d.name for d in test_sets if not d.has_annotations]
    if unscored and (len(test_sets) == 1 or wanted.split("/", 1)[0] in unscored):
        raise ConfigError(f"test.save_best: {cfg.test.save_best!r}: test set {unscored[0]} has no annotations (its "
                          "evaluation writes files for its server and gives no metric)")
    close = [key for key in keys if key.endswith(f"/{wanted}")] or difflib.get_close_matches(wanted, keys, n=3)
    raise ConfigError(f"test.save_best: {cfg.test.save_best!r} is not a metric of this run's evaluations ("
                      + (f"closest: {', '.join(close)}" if close else f"they give {first_few(keys, 8)}")
                      + ("; with several test sets, <test set>/<metric>" if len(test_sets) > 1 else "") + ")")


def _check_defined(key: str, test_sets: Sequence) -> None:
    """ConfigError for AP-<class> / AP50-<class> of a test set without an object of that class: never
    defined, so no model_best.pth would be written (a trial's AP-square on a set of circles)."""
    dataset = test_sets[0] if len(test_sets) == 1 else next(d for d in test_sets if key.startswith(f"{d.name}/"))
    metric = key if len(test_sets) == 1 else key[len(dataset.name) + 1:]
    prefix = next((p for p in ("AP-", "AP50-") if metric.startswith(p)), None)
    if prefix is None or metric[len(prefix):] not in dataset.class_names:
        return
    label = dataset.class_names.index(metric[len(prefix):]) + 1
    if not any((np.asarray(r.get("labels", ())) == label).any() for r in dataset.records):
        raise ConfigError(f"test.save_best: {key!r}: test set {dataset.name} has no object of class "
                          f"{metric[len(prefix):]}, so its {prefix[:-1]} is never defined: name another metric")


# what a best value means depends on (a value at another test size, maxDets or test set is not
# comparable): the test sets, the whole `test` section but its training-time keys, and the other
# test-time settings a checkpoint's evaluation is compared by (inference_model.TEST_KEYS)
BEST_KEYS = ("datasets.test", "test", *TEST_KEYS)
NOT_BEST_KEYS = ("test.eval_period", "test.save_best")


def best_settings(cfg: Config) -> dict:
    """The config's values of BEST_KEYS (but NOT_BEST_KEYS), as JSON reads them back."""
    tree = config_to_dict(cfg)
    out = {}
    for key in BEST_KEYS:
        node = tree
        for part in key.split("."):
            node = node[part]
        out[key] = node
    out["test"] = {key: value for key, value in out["test"].items() if f"test.{key}" not in NOT_BEST_KEYS}
    return json.loads(json.dumps(out))


def _in_best_scope(key: str) -> bool:
    """Whether a changed config key changes what a best value means (BEST_KEYS)."""
    return key not in NOT_BEST_KEYS and any(key == k or key.startswith(f"{k}.") for k in BEST_KEYS)


def read_best(out_dir: Path, key: str, settings: dict) -> dict | None:
    """A resumed run's best evaluation so far, from its model_best.pth (the file is the record:
    a later one of an abandoned history was moved aside); None when there is none. One kept by
    another metric, or under other test settings (`settings`: best_settings), is not comparable:
    it is moved to model_best_<its metric>_<its iteration>.pth, with a warning (a review: the
    next evaluation overwrote it, and the weights of the best AP were lost)."""
    path = out_dir / BEST_FILE
    if not path.is_file():
        return None
    try:
        best = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("best")
    except Exception:  # noqa: BLE001 - cut short or not a checkpoint: moved aside, said
        best = None
    if not isinstance(best, dict) or not isinstance(best.get("value"), float):
        why, name = "cannot be read as test.save_best's", "model_best_unreadable.pth"
    elif best.get("metric") != key:
        why = f"keeps the best {best.get('metric')}, not test.save_best's {key}"
        name = f"model_best_{_file_safe(str(best.get('metric')))}_{best.get('iteration', 0):07d}.pth"
    elif "settings" in best and best["settings"] != settings:  # none recorded (written before them): taken
        why = f"keeps the best {key} under other test sets or test settings than this run's"
        name = f"model_best_{_file_safe(key)}_{best.get('iteration', 0):07d}.pth"
    else:
        return best
    target = out_dir / name
    for n in range(2, 1000):
        if not target.exists():
            break
        target = out_dir / f"{Path(name).stem}_{n}.pth"
    path.replace(target)
    logger.warning("%s %s: moved to %s (not comparable); this run keeps its own best", path, why, target.name)
    return None


def restore_best(state: TrainState, cfg: Config, out_dir: Path, key: str, changed: Sequence[str] = ()) -> None:
    """A resumed run's best so far (main process): its model_best.pth (read_best); without one (a
    resume from before it set it aside, or test.save_best newly given), the best `key` of the
    run's metrics.jsonl up to the resumed iteration (a trial: after the README's way back to
    iteration 60, whose 81.93 was the kept history's best, 80.67 at 80 became "the best so far"),
    its weights written as model_best.pth when a checkpoint of that iteration is here (last.pth, a
    kept model_<iter>.pth), else a warning. Not when `changed` (the resume's changed keys) holds a
    test setting: the history's values were measured otherwise."""
    had_file = (out_dir / BEST_FILE).is_file()
    state.best = read_best(out_dir, key, best_settings(cfg))
    if state.best is not None or had_file:
        return
    if any(_in_best_scope(k) for k in changed):
        return
    found = best_from_history(out_dir / "metrics.jsonl", key, state.iteration)
    if found is None:
        return
    found["settings"] = best_settings(cfg)
    state.best = found
    periodic = periodic_checkpoint_path(out_dir, found["iteration"])
    if found["iteration"] == state.iteration:
        weights, source = _weights_checkpoint(state, cfg), out_dir / "last.pth"
    elif periodic.is_file():
        weights = {**_weights_checkpoint(state, cfg), "iteration": found["iteration"],
                   "model": torch.load(periodic, map_location="cpu", weights_only=True)["model"]}
        source = periodic
    else:
        logger.warning("test.save_best: the best %s up to iteration %d, %.2f, was at iteration %d (metrics.jsonl), "
                       "whose weights are not kept here: model_best.pth is written when an evaluation beats it", key,
                       state.iteration, found["value"], found["iteration"])
        return
    save_checkpoint({**weights, "best": found}, out_dir / BEST_FILE)
    logger.info("test.save_best: the best %s up to iteration %d, %.2f at iteration %d (metrics.jsonl): %s written "
                "from %s", key, state.iteration, found["value"], found["iteration"], out_dir / BEST_FILE, source.name)


def best_from_history(metrics_jsonl: Path, key: str, up_to: int) -> dict | None:
    """The highest finite `key` among metrics.jsonl's evaluations up to iteration `up_to` (the
    first of equals, as save_best keeps it), as {"metric", "value", "iteration"}; None if none."""
    from detection.utils.files import read_metrics_lines

    if not metrics_jsonl.is_file():
        return None
    best = None
    for _, record in read_metrics_lines(metrics_jsonl)[0]:
        value = record.get(key)
        if record["iteration"] <= up_to and isinstance(value, (int, float)) and math.isfinite(value) and (
                best is None or value > best["value"]):
            best = {"metric": key, "value": float(value), "iteration": int(record["iteration"])}
    return best


def _file_safe(text: str) -> str:
    """A metric's name as part of a file name ("shapes_val/AP50" -> "shapes_val_AP50")."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def save_best(state: TrainState, cfg: Config, out_dir: Path, metrics: Mapping[str, float], key: str) -> None:
    """model_best.pth when this evaluation's `key` is above the best so far (NaN never is: a set
    without objects of a class); a failed write stops every rank, as last.pth's (a collective)."""
    problem = None
    value = metrics.get(key)
    if du.is_main_process() and (value is None or not math.isfinite(value)) and not state.best_undefined_said:
        state.best_undefined_said = True  # once a run: it may stay so at every evaluation
        logger.warning("test.save_best: %s is not defined at iteration %d (no object of that class or size among "
                       "the test images?): no model_best.pth from it", key, state.iteration)
    if du.is_main_process() and value is not None and math.isfinite(value) and (
            state.best is None or value > state.best["value"]):
        best = {"metric": key, "value": float(value), "iteration": state.iteration, "settings": best_settings(cfg)}
        path = out_dir / BEST_FILE
        try:
            save_checkpoint({**_weights_checkpoint(state, cfg), "best": best}, path)
        except OSError as err:
            problem = (f"could not write {path} at iteration {state.iteration} ({err.strerror or err}); training "
                       f"stopped, {what_is_kept(state, out_dir / 'last.pth')}", err.errno in DISK_FULL)
        else:
            was = state.best
            state.best = best
            logger.info("%s %.2f at iteration %d, the best so far%s: %s", key, value, state.iteration,
                        f" (was {was['value']:.2f} at iteration {was['iteration']})" if was else "", path)
    problems = [p for p in du.all_gather_object(problem) if p]
    if problems:
        raise TrainingError(problems[0][0], transient=problems[0][1])
