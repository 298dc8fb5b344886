"""On --resume the run's saved config (config.yaml in its output folder) is the run's.

A config given now that differs from it is refused with one error listing every differing key,
unless those keys were given on the command line: changed deliberately, e.g. `solver.max_iter`
to extend a run. A resume that changes keys leaves their history beside config.yaml (which
then holds the new values): `config_resumed_<iter>.yaml` names each changed key with its value
before and after, and the iteration from which the new one applies.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from detection.config import Config, ConfigError, config_to_dict, load_config, yaml_dump, yaml_load
from detection.engine import distributed as du
from detection.utils.files import atomic_write

logger = logging.getLogger(__name__)

SAVED_CONFIG = "config.yaml"
RESUMED_CONFIG = "config_resumed_{:07d}.yaml"
# Keys that say where things are or how fast they go, not what is trained: they may differ on
# a resume without a word (a moved output folder or data set, another machine).
NOT_COMPARED = (
    "output_dir",  # where the run is: the folder may have moved
    "datasets.root",  # where the data are (DETECTION_DATASETS may differ between machines)
    "dataloader.num_workers",  # speed only (the loader's batches are the same whatever the count)
    "model.weights",  # not read on a resume: last.pth holds the weights
    "model.backbone.weights",  # idem
)

Change = tuple[str, Any, Any]  # (dotted key, the run's value, the value now)


def config_beside(weights: str | Path) -> Path:
    """Where the config.yaml of the training that wrote `weights` is: beside the checkpoint, or
    beside a link's target (a link to a run's checkpoint). It may not exist."""
    weights = Path(weights).expanduser()
    saved = weights.parent / SAVED_CONFIG
    if not saved.is_file() and weights.is_symlink():
        saved = weights.resolve().parent / SAVED_CONFIG
    return saved


def config_differences(saved: Config | dict, current: Config | dict) -> list[Change]:
    """The leaves (dotted keys) where `current` differs from `saved` (Configs or their dicts),
    NOT_COMPARED left out."""
    old, new = (_leaves(c if isinstance(c, dict) else config_to_dict(c)) for c in (saved, current))
    return [(key, old.get(key), new.get(key)) for key in sorted(old.keys() | new.keys())
            if key not in NOT_COMPARED and old.get(key) != new.get(key)]


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_leaves(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def check_same_config_everywhere(cfg: Config, flags: Sequence[Any] = ()) -> None:
    """Under torchrun, ConfigError in every process when the processes were given different
    configs (NOT_COMPARED aside: paths may differ between machines) or `flags` (--resume,
    --overwrite, --weights): one process evaluating while the others trained hung until the
    process group's timeout, and another learning rate per process trained apart in silence (a
    distributed trial; Detectron2 does not check either). One process: nothing to compare."""
    from detection.engine.distributed import all_gather_object, get_world_size

    world = get_world_size()
    if world == 1:
        return
    everyone = all_gather_object((config_to_dict(cfg), [str(f) for f in flags]))
    for rank, (tree, its_flags) in enumerate(everyone[1:], start=1):
        what = [f"{k} (process 0: {_short(a)}, process {rank}: {_short(b)})"
                for k, a, b in config_differences(everyone[0][0], tree)]
        if its_flags != everyone[0][1]:
            what.append(f"the command line's options (process 0: {' '.join(everyone[0][1])}, process {rank}: "
                        f"{' '.join(its_flags)})")
        if what:
            raise ConfigError(f"the {world} processes were not given the same config: {', '.join(what[:5])}"
                              f"{f', ... ({len(what) - 5} more)' if len(what) > 5 else ''}; give every process the "
                              "same config file and command line")


def check_resume_config(cfg: Config, out_dir: Path, explicit: Optional[Sequence[str]]) -> list[Change]:
    """The keys where `cfg` differs from the run's config.yaml in out_dir; ConfigError listing
    those not in `explicit` (the command line's keys; None: the caller's whole Config is
    deliberate). A run without config.yaml is not checked (a warning says so)."""
    path = Path(out_dir) / SAVED_CONFIG
    if not path.is_file():
        logger.warning("--resume: %s does not exist: the config given now is taken as the run's", path)
        return []
    saved = load_config(path)
    changes = config_differences(saved, cfg)
    now, before = _leaves(config_to_dict(cfg)), _leaves(config_to_dict(saved))
    for key in ("model.weights", "model.backbone.weights"):  # NOT_COMPARED: paths move; but given now, deliberately
        given = now.get(key)
        if explicit is not None and _given(key, explicit) and given != before.get(key):
            logger.warning("--resume: %s=%s is not read: the run continues from %s (its model, optimizer, schedule "
                           "and data order; torchvision's --resume PATH is this); to go on from an older "
                           "model_NNNNNNN.pth, copy it to last.pth; to start from weights, a new run", key, given,
                           Path(out_dir) / "last.pth")
    classes = [c for c in changes if c[0] == "model.num_classes"]
    if classes:  # a growing-data trial: the shapes' error of last.pth followed, which said nothing of what to do
        raise ConfigError(f"--resume: model.num_classes changed from {classes[0][1]} (the run's {path}) to "
                          f"{classes[0][2]}: a resume cannot change the classes (its classifier has "
                          f"{classes[0][1]}); start a new run from its weights, which keeps the classes' rows by name "
                          f"and starts the new ones fresh: model.weights={Path(out_dir) / 'last.pth'} and a new "
                          "output_dir, without --resume")
    anchors = [c for c in changes if c[0].startswith("model.anchors.")]
    before, after = (len(c.model.anchors.sizes) * len(c.model.anchors.aspect_ratios) for c in (saved, cfg))
    if before != after:  # a follow-up trial: it failed on last.pth's shapes, naming neither anchors nor a way
        raise ConfigError(f"--resume: model.anchors changed from {before} anchors per position (the run's {path}) to "
                          f"{after}: the RPN's output layers have one channel per anchor, so a resume cannot change "
                          f"their count; start a new run from its weights, which starts those layers fresh: "
                          f"model.weights={Path(out_dir) / 'last.pth'} and a new output_dir, without --resume")
    if explicit is not None:
        refused = [c for c in changes if not _given(c[0], explicit)]
        if refused:
            raise ConfigError(
                f"--resume: the config given now differs from the run's {path} in {len(refused)} "
                f"key{'s' if len(refused) > 1 else ''}: {_describe(refused)}. Resume with the run's config "
                f"(--config {path}), or give each key on the command line (KEY=VALUE) to change it deliberately")
    if changes and du.is_main_process():  # said once, not by every process (a distributed trial)
        logger.warning("--resume: changed deliberately from the run's %s: %s", path, _describe(changes))
        if anchors:
            logger.warning("--resume: model.anchors changed, as many per position: each of the RPN's output channels "
                           "goes on from what it learnt for the run's anchor of that place in the order (sizes, then "
                           "aspect ratios)")
    return changes


def data_order_change(changes: list[Change], iteration: int) -> Optional[str]:
    """The warning for a resume that changed dataloader.repeat_threshold: the loader's position is
    found in the new threshold's epochs, drawn anew, so the epoch in progress is not the one the
    run was in; and the start line's epoch count is of the whole run at the new threshold (a
    distributed trial read it as the run's). None when it did not change."""
    for key, old, new in changes:
        if key == "dataloader.repeat_threshold":
            return (f"--resume at iteration {iteration}: dataloader.repeat_threshold changed (the run: {old:g}, now: "
                    f"{new:g}): from here the epochs are drawn at the new threshold (the plain order where no "
                    "image's factor is above 1), so images of the epoch in progress may be skipped or seen again, "
                    "and the start line's epochs count the whole run at the new threshold")
    return None


_SCHEDULE = ("max_iter", "steps", "gamma", "lr_schedule", "warmup_iters", "warmup_factor")  # solver.*


def schedule_jump(cfg: Config, changes: list[Change], iteration: int) -> Optional[str]:
    """The warning for a resume whose changed schedule keys (not base_lr: a change of it says
    itself) move the lr at the resumed iteration by more than 1%: `--resume solver.max_iter=N` on a
    cosine run stretches the cosine over N, and the next step's lr jumped 8.6x in a trial (as in
    Detectron2, which also rebuilds its scheduler from the config). None when it does not move."""
    from detection.engine.optim import lr_factor

    before = {key.removeprefix("solver."): old for key, old, _ in changes
              if key.startswith("solver.") and key.removeprefix("solver.") in _SCHEDULE}
    if not before:
        return None

    def factor(values: dict) -> float:
        given = {name: values.get(name, getattr(cfg.solver, name)) for name in _SCHEDULE}
        return lr_factor(iteration, warmup_iters=given["warmup_iters"], warmup_factor=given["warmup_factor"],
                         steps=given["steps"], gamma=given["gamma"], schedule=given["lr_schedule"],
                         max_iter=given["max_iter"])

    old_base = next((old for key, old, _ in changes if key == "solver.base_lr"), cfg.solver.base_lr)
    try:
        old, new = old_base * factor(before), cfg.solver.base_lr * factor({})
    except (TypeError, ValueError):  # a value lr_factor cannot take: the config check says so
        return None
    if abs(new - old) <= 0.01 * max(abs(old), 1e-12):
        return None
    changed = ", ".join("solver." + k for k in [*before, *(["base_lr"] if old_base != cfg.solver.base_lr else [])])
    cosine = " (the cosine is now over the new solver.max_iter)" if cfg.solver.lr_schedule == "cosine" \
        and "max_iter" in before else ""
    return (f"--resume at iteration {iteration}: changing {changed} moves the learning rate at once from {old:.3g} "
            f"(the run's) to {new:.3g}{f' ({new / old:.2g}x)' if old else ''}{cosine}")


def _given(key: str, explicit: Sequence[str]) -> bool:
    """`key` or a section above it was given on the command line."""
    return any(key == e or key.startswith(e + ".") for e in explicit)


def _describe(changes: list[Change]) -> str:
    return ", ".join(f"{key} (the run: {_short(old)}, now: {_short(new)})" for key, old, new in changes)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def record_resume_changes(out_dir: Path, iteration: int, changes: list[Change]) -> Optional[Path]:
    """config_resumed_<iter>.yaml for a resume that changed keys (config.yaml already holds the
    new values): what each was before, from which iteration the new one applies. None if none."""
    if not changes:
        return None
    path = Path(out_dir) / RESUMED_CONFIG.format(iteration)
    changed = {key: {"before": old, "after": new} for key, old, new in changes}
    if path.is_file():  # resumed at this iteration before (that run stopped before its next checkpoint)
        earlier = (yaml_load(path.read_text()) or {}).get("changed") or {}
        changed = {**changed, **{k: {"before": v["before"], "after": changed.get(k, v).get("after")}
                                 for k, v in earlier.items() if isinstance(v, dict) and "before" in v}}
    record = {"resumed_at_iteration": iteration, "changed": changed}
    header = (f"# --resume at iteration {iteration} changed these keys of {SAVED_CONFIG} (which holds the "
              f"values after); iterations 1..{iteration} ran with the values before.\n")
    with atomic_write(path) as f:
        f.write(header + yaml_dump(record, sort_keys=False, default_flow_style=None))
    return path
