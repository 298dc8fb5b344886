"""The fast path (on by default) gives the reference path's detections for every config shipped.

Each distinct model of configs/**/*.yaml (depth, norm, stride in the 1x1, shortcut, pooler,
the Appendix B switches, ...) is built with random weights made sane, at a small test size,
and run with `model.fast_path: false` (the reference) and through detection.accel.
"""
from __future__ import annotations

import copy

import pytest
import torch

from detection.config import load_config
from detection.accel import optimize_for_inference
from detection.modeling.model import build_model
from detection.testing import make_sane
from tests.helpers import ROOT

SMALL = ["model.backbone.weights=null", "model.weights=null", "input.min_size_test=64", "input.max_size_test=96",
         "model.rpn.pre_nms_topk_test=200", "model.rpn.post_nms_topk_test=24", "test.aug.enabled=false",
         "test.multi_scale.sizes=[48,64,96]", "test.multi_scale.max_size=160",
         "model.roi_heads.score_thresh_test=0.0", "model.roi_heads.detections_per_image=30"]
MODEL_FIELDS = ("backbone.depth", "backbone.norm", "backbone.stride_in_1x1", "backbone.shortcut",
                "backbone.residual", "input_format", "roi_heads.pooler", "roi_heads.pooler_resolution",
                "roi_heads.global_context", "size_divisibility")


def _signature(cfg) -> tuple:
    model = tuple(_get(cfg.model, field) for field in MODEL_FIELDS)
    return model + (cfg.test.box_refinement.enabled, cfg.test.multi_scale.enabled)


def _get(node, dotted):
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _load(path, extra=()):
    """The config at a small size; ResNet-101 as ResNet-50 (the same blocks, half the time)."""
    cfg = load_config(path, SMALL + list(extra))
    if cfg.model.backbone.depth == 101:
        cfg = load_config(path, SMALL + list(extra) + ["model.backbone.depth=50"])
    return cfg


def _distinct_configs() -> list:
    seen, out = set(), []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = _load(path)
        if _signature(cfg) not in seen:
            seen.add(_signature(cfg))
            out.append(pytest.param(path, id=str(path.relative_to(ROOT / "configs"))))
    return out


def test_the_fast_path_is_the_default():
    assert load_config(ROOT / "configs" / "base.yaml").model.fast_path is True
    assert load_config(None).model.fast_path is True


@pytest.mark.slow  # every distinct shipped model at its real size (R50, R101), both paths
@pytest.mark.parametrize("path", _distinct_configs())
def test_fast_path_detections_equal_the_reference_path(path):
    torch.manual_seed(0)
    cfg = _load(path, ["model.fast_path=false"])
    model = make_sane(build_model(cfg)).eval()
    images = [torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8),
              torch.randint(0, 256, (3, 80, 64), dtype=torch.uint8)]
    with torch.inference_mode():
        reference = model(images)
        fast = optimize_for_inference(copy.deepcopy(model))(images)
    for ref, out in zip(reference, fast):
        assert len(ref["boxes"]) > 0
        # random weights give close scores: match detections as sets, not by rank
        _assert_same_detections(ref, out)


def _assert_same_detections(ref: dict, out: dict, atol: float = 1e-2) -> None:
    assert len(out["boxes"]) == len(ref["boxes"])
    order_ref = _order(ref)
    order_out = _order(out)
    assert torch.equal(ref["labels"][order_ref], out["labels"][order_out])
    torch.testing.assert_close(out["boxes"][order_out], ref["boxes"][order_ref], atol=atol, rtol=0)
    torch.testing.assert_close(out["scores"][order_out], ref["scores"][order_ref], atol=1e-4, rtol=0)


def _order(det: dict) -> torch.Tensor:
    """Detections sorted by label, then box corners (rounded): independent of score ties."""
    key = torch.cat([det["labels"][:, None].float() * 1e4, (det["boxes"] * 10).round()], dim=1)
    order = torch.arange(len(key))
    for column in reversed(range(key.shape[1])):
        order = order[torch.sort(key[order, column], stable=True).indices]
    return order
