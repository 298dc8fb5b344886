"""test.amp: bfloat16 inference on CPUs with bfloat16 instructions, float32 elsewhere (one warning)."""
import warnings

import pytest
import torch

from detection.modeling import precision
from detection.accel import optimize_for_inference
from tests.helpers import IMAGES, make_model


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has (or lacks) bfloat16 instructions (and that no float32 warning was given yet)."""
    monkeypatch.setattr(precision, "WARNED", set())

    def set_flags(*names):
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: tuple(names))
    return set_flags


def test_amp_only_where_the_cpu_has_bfloat16_instructions(flags):
    assert precision.inference_amp(False, "cpu") is False
    flags("amx_bf16")
    assert precision.inference_amp(True, "cpu") is True
    assert precision.training_amp(True, "cpu") is True and precision.training_amp(False, "cpu") is False
    flags()
    with pytest.warns(UserWarning, match="no bfloat16 instructions .* float32"):
        assert precision.inference_amp(True, "cpu") is False
    with warnings.catch_warnings():  # once per process, though catch_warnings resets the warnings registry
        warnings.simplefilter("error")
        assert precision.inference_amp(True, "cpu") is False
    # training too: PyTorch's emulated bfloat16 made the demo's training step 12x slower (AVX2-only AMD EPYC)
    assert precision.training_amp(True, "cpu") is False
    assert precision.inference_amp(True, torch.device("cuda")) is True  # float16 there: no check needed
    assert precision.training_amp(True, torch.device("cuda")) is True


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\n"
                       "flags\t\t: fpu sse avx512f avx512_bf16\n")
    real_path = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: cpuinfo if p == "/proc/cpuinfo" else real_path(p))
    precision.cpu_bf16_flags.cache_clear()
    try:
        assert precision.cpu_bf16_flags() == ("avx512_bf16",)
    finally:
        precision.cpu_bf16_flags.cache_clear()


@pytest.mark.parametrize("fast", [False, True])
def test_amp_runs_the_convolutions_in_bfloat16_and_decodes_in_float32(fast):
    torch.manual_seed(0)
    model = make_model().eval()
    model.amp = True
    if fast:
        model = optimize_for_inference(model)
    seen = []
    model.trunk.res4.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    with torch.inference_mode():
        out = model(IMAGES)
    assert seen == [torch.bfloat16]
    for det in out:
        assert det["boxes"].dtype == det["scores"].dtype == torch.float32 and len(det["boxes"]) > 0
    model.amp = False
    seen.clear()
    with torch.inference_mode():
        model(IMAGES)
    assert seen == [torch.float32]


def test_the_config_switch_reaches_the_model(flags, tmp_path):
    from detection.config import load_config
    from detection.engine.loading import DetectorWeights
    from detection.engine.inference_model import build_inference_model

    flags("avx512_bf16")
    model = make_model()
    weights = DetectorWeights("model_final.pth", "c4det", model.state_dict())
    base = ["model.num_classes=2", "model.backbone.depth=18", "model.backbone.norm=gn",
            "model.backbone.freeze_at=0", "model.anchors.sizes=[16,32,64]", "model.roi_heads.pooler_resolution=6"]
    for amp, fast in ((True, True), (True, False), (False, True)):
        cfg = load_config(None, base + [f"test.amp={amp}", f"model.fast_path={fast}"])
        built, _ = build_inference_model(cfg, weights, torch.device("cpu"))
        assert built.amp is amp
    flags()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        built, _ = build_inference_model(load_config(None, base + ["test.amp=true"]), weights, torch.device("cpu"))
    assert built.amp is False and sum("bfloat16" in str(w.message) for w in caught) == 1
    # shown at the caller's line (filters by module match it), not inside the engine (a docs trial)
    assert [w.filename for w in caught if "bfloat16" in str(w.message)] == [__file__]
