"""Detector weights from any file a user has: this project's checkpoints, Detectron2's
trainer `.pth` and model-zoo `.pkl` files, read and loaded into a model (a ready model for
inference from them: detection/engine/inference_model.py).

    weights = read_detector_file("model_final_721ade.pkl")     # DetectorWeights, our names
    load_detector_weights(model, weights)                        # strict: every tensor placed

The format is recognised from the content, not the suffix: a zip archive is read with
torch.load(weights_only=True); any other pickle first with the restricted numpy-only
unpickler (model-zoo files), then with torch.load(weights_only=True) (older torch files).
No file can run code while it is read.

Loading is strict. A tensor of the file with no place in the model, a model tensor the file
lacks, or a shape that differs is an error listing them: silently dropped weights give a
detector that runs and is wrong. The exceptions are deliberate, in a new run only: fine-tuning
on another label set (`allow_new_classes`) re-initialises the class-specific layers, and another
count of anchors per position (`allow_new_anchors`) the RPN's output layers, and each says so.
"""
from __future__ import annotations

import logging
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from backbones.errors import NULL_LOOKALIKES, WeightsError
from detection.engine.checkpoint import CheckpointError, non_finite_tensors, verify_checksums
from detection.engine.detectron2 import convert_detectron2_state, is_detectron2_state
from detection.utils.files import dangling_link
from detection.utils.text import first_few

if TYPE_CHECKING:
    from detection.config import BackboneConfig

logger = logging.getLogger(__name__)

OUR_PREFIXES = ("trunk.", "rpn.", "roi_heads.")
# The layers whose shape follows the number of classes: re-initialised when fine-tuning on new labels.
CLASS_SPECIFIC = ("roi_heads.predictor.cls_score.weight", "roi_heads.predictor.cls_score.bias",
                  "roi_heads.predictor.bbox_pred.weight", "roi_heads.predictor.bbox_pred.bias")
# The RPN's output layers, whose shape follows the anchors per position (sizes x aspect_ratios):
# re-initialised when a new run changes model.anchors' count (Detectron2's checkpointer skips them too).
ANCHOR_SPECIFIC = ("rpn.head.objectness_logits.weight", "rpn.head.objectness_logits.bias",
                   "rpn.head.anchor_deltas.weight", "rpn.head.anchor_deltas.bias")
_ZIP_MAGIC = b"PK\x03\x04"
# files given as weights by mistake, by their first bytes
_NOT_WEIGHTS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"BM", "a BMP image"))


@dataclass
class DetectorWeights:
    """A detector's tensors under this project's names, and what the file says about them."""

    path: str
    format: str  # "c4det" (this project) | "detectron2"
    state: dict[str, Tensor]
    class_names: list[str] | None = None  # saved by this project's training
    config: dict | None = None  # the training config saved by this project's training
    extra: dict[str, Tensor] = field(default_factory=dict)  # Detectron2's pixel_mean/std, cell anchors
    unknown: list[str] = field(default_factory=list)  # file names with no counterpart here
    iteration: int | None = None  # the training iteration it was saved at, when the file says

    @property
    def num_classes(self) -> int:
        """K, from the classifier's K+1 rows."""
        return int(self.state["roi_heads.predictor.cls_score.weight"].shape[0]) - 1


def read_detector_file(path: Union[str, Path]) -> DetectorWeights | None:
    """The detector in `path`, or None when the file holds weights but not a detector's (for
    example ImageNet backbone weights). CheckpointError for a missing or unreadable file."""
    if "://" in str(path):  # detectron2://..., https://...: Path() would also fold the "//"
        raise CheckpointError(f"{path}: a URL; weights are read from local files here (nothing is downloaded): "
                              "download it and give the file's path")
    path = Path(path).expanduser()
    if path.is_dir():  # a run's folder given for its checkpoint
        inside = [path / name for name in ("model_final.pth", "last.pth") if (path / name).is_file()]
        raise CheckpointError(f"{path}: a folder, not a weights file"
                              f"{f' (the checkpoint in it: {inside[0]})' if inside else ''}")
    if not path.is_file():
        null = "; for no weights YAML writes null (model.weights=null)" if str(path) in NULL_LOOKALIKES else ""
        raise CheckpointError(f"{path}: weights file not found{dangling_link(path)}{null}")
    return detector_weights(_read_any(path), str(path))


def detector_weights(loaded: Any, source: str = "the weights in memory") -> DetectorWeights | None:
    """What read_detector_file makes of a file's content, for a checkpoint held in memory: a
    state dict, a checkpoint dict ({"model": state dict, "class_names": [...], "config": {...}},
    as training saves it, or Detectron2's), or a model (its state_dict and class_names). None
    for weights that are not a detector's; CheckpointError for anything else. `source` names it
    in messages (the file's path)."""
    if isinstance(loaded, nn.Module):
        names = getattr(loaded, "class_names", None)
        loaded = {"model": loaded.state_dict(), "class_names": list(names) if names else None}
    state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: holds a {type(loaded).__name__}, not a checkpoint "
                              "(expected a dict with a 'model' state dict)")
    state = {str(k).removeprefix("module."): _tensor(v) for k, v in state.items()
             if isinstance(v, (Tensor, np.ndarray))}
    iteration = loaded.get("iteration") if isinstance(loaded, dict) else None  # ours and Detectron2's write it
    iteration = iteration if isinstance(iteration, int) and not isinstance(iteration, bool) else None
    if is_detectron2_state(state):
        ours, extra, unknown = convert_detectron2_state(state)
        return _checked(DetectorWeights(source, "detectron2", ours, extra=extra, unknown=unknown,
                                        iteration=iteration))
    if any(k.startswith(OUR_PREFIXES) for k in state):
        names = loaded.get("class_names") if isinstance(loaded, dict) else None
        config = loaded.get("config") if isinstance(loaded, dict) else None
        return _checked(DetectorWeights(source, "c4det", state, class_names=list(names) if names else None,
                                        config=config if isinstance(config, dict) else None, iteration=iteration))
    return None


def _read_any(path: Path) -> Any:
    """Unpickle without running code: torch's weights_only loader or the numpy-only one."""
    from backbones.pickle_io import load_numpy_pickle

    with open(path, "rb") as f:
        head = f.read(8)
    zipped = head[:4] == _ZIP_MAGIC
    kind = next((name for magic, name in _NOT_WEIGHTS if head.startswith(magic)), None)
    if kind:  # torch's unpickling error would describe it as a damaged pickle
        raise CheckpointError(f"{path}: {kind}, not a weights file (a checkpoint .pth or a Detectron2 .pkl)")
    errors = []
    if zipped:
        verify_checksums(path)  # torch.load does not check the zip's CRCs: flipped bits would load
    if not zipped:
        try:
            loaded = load_numpy_pickle(path)
            # torch.save's format before torch 1.6 begins with a pickle of its magic number: the
            # numpy-only reader read that one int ("holds a int, not a checkpoint"); torch.load reads it
            if not (isinstance(loaded, int) and loaded == torch.serialization.MAGIC_NUMBER):
                return loaded
        except WeightsError as err:
            errors.append(str(err))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        errors.append(f"torch.load: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    raise CheckpointError(f"{path}: not a readable checkpoint: neither a PyTorch file nor a Detectron2 "
                          f"model-zoo pickle ({'; '.join(errors)[:400]})")


def _tensor(value: Tensor | np.ndarray) -> Tensor:
    return value if isinstance(value, Tensor) else torch.from_numpy(np.ascontiguousarray(value))


def _checked(weights: DetectorWeights) -> DetectorWeights:
    if "roi_heads.predictor.cls_score.weight" not in weights.state:
        raise CheckpointError(f"{weights.path}: a {weights.format} detector without its classifier "
                              "(roi_heads cls_score): the file is incomplete")
    names = weights.class_names
    if names is not None and len(names) != weights.num_classes:
        # each name is a label's meaning: one too many (torchvision's "__background__" first) shifts every
        # class onto its neighbour's name, in evaluation, the report and the Predictor's class_names
        extra = " (the background is no class here: label k is class_names[k - 1])" \
            if any(str(n).strip("_").lower() == "background" for n in names) else ""
        raise CheckpointError(f"{weights.path}: its class_names list {len(names)} names ({first_few(names, 4)}) but "
                              f"its classifier has {weights.num_classes} classes (cls_score's "
                              f"{weights.num_classes + 1} rows, background included){extra}; save one name per "
                              "class, in label order")
    return weights


def load_detector_weights(model: nn.Module, weights: DetectorWeights, *, allow_new_classes: bool = False,
                          fresh_classes: bool = False, allow_new_anchors: bool = False) -> list[str]:
    """Load every tensor of `weights` into `model` (a FasterRCNN), or raise CheckpointError
    listing what does not fit. With allow_new_classes, a class count that differs from the
    model's (or, with fresh_classes, any other label set) leaves the class-specific layers at
    their initial values; with allow_new_anchors (a new run), the model's anchors are taken
    whatever the file's, and another count of them per position leaves the RPN's output layers
    (ANCHOR_SPECIFIC) at their initial values. Returns the names of the layers left so."""
    _check_extra(model, weights, anchors=not allow_new_anchors)
    own = model.state_dict()
    _check_global_context(own, weights)
    # BatchNorm's step counter (num_batches_tracked) is no weight: a BN-trained detector loads into frozen norms
    unexpected = sorted(k for k in set(weights.state) - set(own) if not k.endswith("num_batches_tracked")) \
        + weights.unknown
    missing = sorted(k for k in own if k not in weights.state and not k.endswith("num_batches_tracked"))
    mismatched = [k for k in weights.state if k in own and own[k].shape != weights.state[k].shape]
    skipped = []
    if allow_new_classes and (fresh_classes or weights.num_classes != model.num_classes):
        skipped = [k for k in CLASS_SPECIFIC if k in own]
        mismatched = [k for k in mismatched if k not in skipped]
    fresh_anchors = [k for k in ANCHOR_SPECIFIC if k in mismatched] if allow_new_anchors else []
    if fresh_anchors:
        fresh_anchors = [k for k in ANCHOR_SPECIFIC if k in own]
        mismatched = [k for k in mismatched if k not in fresh_anchors]
    problems = _problems(unexpected, missing, mismatched, own, weights, classes_matter=not skipped) \
        + _bad_values(own, weights)
    if problems:
        hint = "configs/detectron2/ has the configs of Detectron2's models" if weights.format == "detectron2" \
            else "a checkpoint of this project keeps its config.yaml beside it"
        raise CheckpointError(f"{weights.path}: does not fit the config's model: {'; '.join(problems)}. "
                              f"Is the config the one made for these weights? ({hint})")
    broken = non_finite_tensors(weights.state)
    if broken:
        raise CheckpointError(f"{weights.path}: {len(broken)} tensors hold NaN or infinite values "
                              f"({first_few(broken, 6)}): the weights are broken, whatever the config (a training "
                              "run that diverged leaves such values, e.g. in BatchNorm's running statistics); use an "
                              "earlier checkpoint")
    if weights.num_classes != model.num_classes and not skipped:
        raise CheckpointError(f"{weights.path}: a detector of {weights.num_classes} classes, but "
                              f"model.num_classes is {model.num_classes}")
    model.load_state_dict({k: v for k, v in weights.state.items() if k not in skipped + fresh_anchors and k in own},
                          strict=False)
    if not allow_new_classes and weights.class_names and getattr(model, "class_names", None) is None:
        # what its labels mean, as the tools' models have it (a growing-data trial: evaluate(cfg, model) after
        # this call scored by label number a test set listing the classes in another order)
        model.class_names = list(weights.class_names)
    return skipped + fresh_anchors


def trained_with_global_context(path: str) -> bool | None:
    """Whether the detector in `path` was trained with global context (its box predictor reads
    twice res5's features), None when the file holds no detector or no predictor."""
    weights = read_detector_file(path)
    predictor, res5_out = "roi_heads.predictor.cls_score.weight", "roi_heads.res5.0.shortcut.0.weight"
    if weights is None or predictor not in weights.state or res5_out not in weights.state:
        return None  # (shortcut option A has no projection to read res5's width from)
    return int(weights.state[predictor].shape[1]) == 2 * int(weights.state[res5_out].shape[0])


def _check_global_context(own: dict, weights: DetectorWeights) -> None:
    """A predictor reading 2 x C5 (global context) against one reading C5: never a partial load,
    not even when fine-tuning re-initialises the class-specific layers."""
    key = "roi_heads.predictor.cls_score.weight"
    theirs, ours = int(weights.state[key].shape[1]), int(own[key].shape[1])
    if theirs == ours:
        return
    res5_fits = all(k in own and own[k].shape == v.shape for k, v in weights.state.items()
                    if k.startswith("roi_heads.res5."))
    if res5_fits and (theirs == 2 * ours or ours == 2 * theirs):  # else: another backbone, listed below
        with_context = theirs > ours
        raise CheckpointError(f"{weights.path}: was trained {'with' if with_context else 'without'} global "
                              f"context (its box predictor reads {theirs} features, the config's model "
                              f"{ours}): set model.roi_heads.global_context={str(with_context).lower()}")


def _problems(unexpected: list[str], missing: list[str], mismatched: list[str], own: dict,
              weights: DetectorWeights, classes_matter: bool = True) -> list[str]:
    """What does not fit, one phrase each; the class counts only where they matter (not in a
    fine-tune on another label set, whose class-specific layers start fresh)."""
    problems = []
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the file have no place in the model "
                        f"({first_few(unexpected, 6)})")
    if missing:
        problems.append(f"{len(missing)} model tensors are not in the file ({first_few(missing, 6)})")
    if mismatched:
        shapes = [f"{k} {tuple(weights.state[k].shape)} in the file, {tuple(own[k].shape)} in the model"
                  for k in mismatched]
        problems.append(f"{len(mismatched)} shapes differ ({first_few(shapes, 4)})")
    key = ANCHOR_SPECIFIC[1]  # the objectness bias: one value per anchor of a position
    if key in mismatched:  # a small-object trial: the shapes alone did not say that the anchors differ
        problems.append(f"its RPN was trained with {weights.state[key].numel()} anchors per position, the config's "
                        f"model.anchors make {own[key].numel()} (sizes x aspect_ratios); a new run from these "
                        "weights (model.weights) starts the RPN's output layers fresh instead")
    if problems and classes_matter and weights.num_classes != own["roi_heads.predictor.cls_score.weight"].shape[0] - 1:
        problems.append(f"the file has {weights.num_classes} classes, model.num_classes is "
                        f"{own['roi_heads.predictor.cls_score.weight'].shape[0] - 1}")
    return problems


def _bad_values(own: dict, weights: DetectorWeights) -> list[str]:
    """Tensors that would load as wrong numbers: integers where the model holds floats
    (load_state_dict would cast them). Non-finite values are the caller's own error."""
    integers = [k for k, v in weights.state.items()
                if k in own and own[k].is_floating_point() and not v.is_floating_point()]
    if not integers:
        return []
    return [f"{len(integers)} tensors are integers where the model has floats ({first_few(integers, 6)})"]


def _check_extra(model: nn.Module, weights: DetectorWeights, anchors: bool = True) -> None:
    """Detectron2's pixel mean/std and anchors, where the file has them, must be the config's
    (the anchors not in a new run, `anchors` False: the config's are taken, as Detectron2 does)."""
    checks = {"pixel_mean": ("model.pixel_mean", model.pixel_mean),
              "pixel_std": ("model.pixel_std", model.pixel_std)}
    if anchors:
        checks["proposal_generator.anchor_generator.cell_anchors.0"] = (
            "model.anchors (sizes, aspect_ratios)", model.rpn.anchor_generator.cell_anchors)
    for name, (key, ours) in checks.items():
        theirs = weights.extra.get(name)
        if theirs is None:
            continue
        if theirs.numel() != ours.numel() or not torch.allclose(theirs.float().reshape(ours.shape), ours.cpu(),
                                                                rtol=1e-4, atol=1e-3):
            raise CheckpointError(f"{weights.path}: the file's {name} {_values(theirs)} differs from the "
                                  f"config's {key} {_values(ours)}: use the config made for these weights")


def _values(t: Tensor) -> str:
    values = [round(v, 3) for v in t.flatten().tolist()]
    return str(values if len(values) <= 8 else values[:8] + ["..."])


def load_initial_weights(model: nn.Module, path: str, backbone_cfg: BackboneConfig,
                         weights: DetectorWeights | None = None, class_names: Sequence[str] = ()) -> None:
    """Start a new run from a detector (ours or Detectron2's; on another label set the class-
    specific layers start fresh) or from backbone weights (torchvision `.pth`, MSRA `.pkl`,
    `torchvision:NAME`) for trunk and res5. `weights`: the detector, when already read.
    `class_names`: the training data's; a checkpoint that names its classes (this project's)
    is matched to them by name: the same classes in another order are reordered; where some
    names are shared, their rows (and the background's) are kept and the others start fresh;
    with none shared, every class-specific layer starts fresh, as for a file naming no classes
    and another count. The config's anchors are taken (allow_new_anchors)."""
    if weights is None and not str(path).startswith("torchvision:"):
        weights = read_detector_file(path)
    if weights is None:
        _load_backbone_into_detector(model, path, backbone_cfg)
        return
    theirs, ours = list(weights.class_names or []), list(class_names)
    other_names = bool(theirs and ours) and len(theirs) == len(ours) and theirs != ours
    kept = [name for name in ours if name in theirs] if theirs and ours and theirs != ours else []
    if kept and _fits_but_rows(model, weights):
        weights = _merged(model, weights, ours)
        new, dropped = [name for name in ours if name not in theirs], [name for name in theirs if name not in ours]
        if not new and not dropped:
            logger.info("%s was trained on the same classes in another order (%s): its class-specific layers are "
                        "reordered to the data's (%s)", path, ", ".join(theirs), ", ".join(ours))
        else:
            logger.warning("%s was trained on %s, the data has %s: the class-specific rows of %s are kept by name, "
                           "and the background's%s%s", path, first_few(theirs, 6), first_few(ours, 6),
                           first_few(kept, 6), f"; those of {first_few(new, 6)} start from fresh initial values"
                           if new else "", f"; those of {first_few(dropped, 6)} are left out" if dropped else "")
        other_names = False
    skipped = load_detector_weights(model, weights, allow_new_classes=True, fresh_classes=other_names,
                                    allow_new_anchors=True)
    logger.info("loaded the %s detector %s", weights.format, path)
    _say_new_anchors(model, weights, [k for k in skipped if k in ANCHOR_SPECIFIC])
    skipped = [k for k in skipped if k not in ANCHOR_SPECIFIC]
    if ours and not theirs and not skipped:  # a Detectron2 file: what its rows mean is not known here
        logger.info("%s names no classes: its class-specific rows are taken in order as the data's (%s)",
                    path, first_few(ours, 6))
    if other_names:
        logger.warning("%s was trained on other classes (%s) than the data's (%s): %s start from fresh initial "
                       "values", path, first_few(theirs, 6), first_few(ours, 6), ", ".join(skipped))
    elif skipped:
        logger.warning("%s has %d classes, the config %d: %s start from fresh initial values",
                       path, weights.num_classes, model.num_classes, ", ".join(skipped))


def _say_new_anchors(model: nn.Module, weights: DetectorWeights, fresh: list[str]) -> None:
    """A new run whose model.anchors differ from those the file's RPN was trained with (a
    small-object trial: another count was refused, the same count with other sizes said
    nothing): the RPN's output layers start fresh, or keep values trained for other anchors."""
    from detection.modeling.anchors import generate_cell_anchors

    ours = model.rpn.anchor_generator.cell_anchors.cpu()
    if fresh:
        logger.warning("%s: its RPN was trained with %d anchors per position, the config's model.anchors make %d: "
                       "%s start from fresh initial values", weights.path,
                       weights.state[ANCHOR_SPECIFIC[1]].numel(), ours.shape[0], ", ".join(fresh))
        return
    theirs = weights.extra.get("proposal_generator.anchor_generator.cell_anchors.0")
    anchors = ((weights.config or {}).get("model") or {}).get("anchors") or {}
    if theirs is None and anchors.get("sizes") and anchors.get("aspect_ratios"):
        try:
            with torch.device("cpu"):  # beside `ours`, whatever the default device
                theirs = generate_cell_anchors(anchors["sizes"], anchors["aspect_ratios"])
        except (TypeError, ValueError):  # a saved config not of this project's shape: nothing to say
            return
    if theirs is None or (theirs.numel() == ours.numel()
                          and torch.allclose(theirs.float().reshape(ours.shape), ours, rtol=1e-4, atol=1e-3)):
        return
    said = f" (sizes {anchors['sizes']}, aspect_ratios {anchors['aspect_ratios']})" if anchors else ""
    logger.warning("%s: its RPN was trained with other anchors%s than the config's model.anchors, as many per "
                   "position: each of its output channels starts from what it learnt for the file's anchor of "
                   "that place in the order (sizes, then aspect ratios), as Detectron2 does", weights.path, said)


def _fits_but_rows(model: nn.Module, weights: DetectorWeights) -> bool:
    """Whether the file's class-specific layers differ from the model's in their rows only (the
    number of classes), so that rows can be copied between them."""
    own = model.state_dict()
    return all(key in own and key in weights.state and own[key].shape[1:] == weights.state[key].shape[1:]
               for key in CLASS_SPECIFIC)


def _merged(model: nn.Module, weights: DetectorWeights, names: list[str]) -> DetectorWeights:
    """`weights` with class-specific layers of the model's shape for the classes `names`: each
    class the file names too takes the file's rows (the background's first row as well), the
    others the model's initial ones: the same classes in another order are reordered, and a
    class added keeps the known ones' rows (a growing-data trial: they were all dropped;
    Detectron2 drops them all, its files naming no classes)."""
    theirs, own, state = list(weights.class_names), model.state_dict(), dict(weights.state)
    for key in CLASS_SPECIFIC:
        rows = own[key].detach().to("cpu", copy=True)
        file_rows = state[key]
        if ".cls_score." in key:
            rows[0] = file_rows[0]
            pairs = [(k + 1, theirs.index(name) + 1, 1) for k, name in enumerate(names) if name in theirs]
        else:
            pairs = [(4 * k, 4 * theirs.index(name), 4) for k, name in enumerate(names) if name in theirs]
        for at, source, count in pairs:
            rows[at:at + count] = file_rows[source:source + count]
        state[key] = rows
    return dataclasses.replace(weights, state=state, class_names=list(names))


def _load_backbone_into_detector(model: nn.Module, source: str, bb: BackboneConfig) -> None:
    """ImageNet backbone weights into the detector: stem..res4 -> trunk, res5 -> roi_heads.res5."""
    from detection.modeling.model import build_backbone, warn_on_preprocessing_mismatch

    resnet = build_backbone(bb, ("res5",), source)
    # model.weights=R-50.pkl (Detectron2's MODEL.WEIGHTS for ImageNet weights) is checked as
    # model.backbone.weights is: BGR Caffe weights on RGB-normalised input cost accuracy silently
    warn_on_preprocessing_mismatch(getattr(resnet, "weights_info", None),
                                   model.pixel_mean.flatten().tolist(), model.pixel_std.flatten().tolist(),
                                   model.input_format)
    mapped = {(f"roi_heads.{k}" if k.startswith("res5.") else f"trunk.{k}"): v
              for k, v in resnet.state_dict().items()}
    own = model.state_dict()
    missing = [k for k in mapped if k not in own]
    if missing:
        raise WeightsError(f"{source}: backbone key {missing[0]} has no place in the detector")
    model.load_state_dict(mapped, strict=False)
    logger.info("loaded backbone weights %s into trunk and res5", source)
