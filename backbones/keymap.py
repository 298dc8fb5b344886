"""Parameter names of other ResNet implementations -> this package's names.

Ours: stem.conv1/norm1, res{2..5}.{block}.conv{1,2,3}/norm{1,2,3}, and
res{2..5}.{block}.shortcut.0 (projection conv) / shortcut.1 (its norm).
Each table is a visible list of (full-match regex, target); a target of None means
"known and deliberately ignored" (the ImageNet classifier, optimizer state).
"""
from __future__ import annotations

import re
from collections.abc import Callable

Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str] | None]


def _rules(table: list[tuple[str, Callable[[re.Match[str]], str] | None]]) -> list[Rule]:
    return [(re.compile(pattern), target) for pattern, target in table]


def _stage(layer: str) -> str:
    return f"res{int(layer) + 1}"  # torchvision's layer1..layer4 are res2..res5


TORCHVISION_RULES = _rules([
    (r"conv1\.weight", lambda m: "stem.conv1.weight"),
    (r"bn1\.(\w+)", lambda m: f"stem.norm1.{m[1]}"),
    (r"layer([1-4])\.(\d+)\.conv([1-3])\.weight", lambda m: f"{_stage(m[1])}.{m[2]}.conv{m[3]}.weight"),
    (r"layer([1-4])\.(\d+)\.bn([1-3])\.(\w+)", lambda m: f"{_stage(m[1])}.{m[2]}.norm{m[3]}.{m[4]}"),
    (r"layer([1-4])\.(\d+)\.downsample\.([01])\.(\w+)",
     lambda m: f"{_stage(m[1])}.{m[2]}.shortcut.{m[3]}.{m[4]}"),
    (r"fc\.(weight|bias)", None),
])

# Caffe2 norm blobs: _s scale, _b shift, and (in some converted files) _rm running
# mean and _riv running variance.
_C2_NORM = {"s": "weight", "b": "bias", "rm": "running_mean", "riv": "running_var"}
_C2_CONV = {"a": "1", "b": "2", "c": "3"}  # branch2a/2b/2c -> conv1/conv2/conv3
_NORM = r"_(?:bn|gn)_(s|b|rm|riv)"

CAFFE2_RULES = _rules([
    (r"conv1_w", lambda m: "stem.conv1.weight"),
    (r"res_conv1" + _NORM, lambda m: f"stem.norm1.{_C2_NORM[m[1]]}"),
    (r"res([2-5])_(\d+)_branch2([abc])_w", lambda m: f"res{m[1]}.{m[2]}.conv{_C2_CONV[m[3]]}.weight"),
    (r"res([2-5])_(\d+)_branch2([abc])" + _NORM,
     lambda m: f"res{m[1]}.{m[2]}.norm{_C2_CONV[m[3]]}.{_C2_NORM[m[4]]}"),
    (r"res([2-5])_(\d+)_branch1_w", lambda m: f"res{m[1]}.{m[2]}.shortcut.0.weight"),
    (r"res([2-5])_(\d+)_branch1" + _NORM, lambda m: f"res{m[1]}.{m[2]}.shortcut.1.{_C2_NORM[m[3]]}"),
    (r"fc\d*_[wb]|pred_[wb]|.*_momentum", None),
])


def map_keys(names: list[str], rules: list[Rule]) -> tuple[dict[str, str], list[str], list[str]]:
    """-> ({our name: source name}, ignored source names, unknown source names)."""
    mapped: dict[str, str] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for name in names:
        for pattern, target in rules:
            match = pattern.fullmatch(name)
            if match:
                if target is None:
                    ignored.append(name)
                else:
                    mapped[target(match)] = name
                break
        else:
            unknown.append(name)
    return mapped, ignored, unknown
