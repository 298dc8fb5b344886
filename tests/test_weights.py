"""Weight loading (backbones/weights.py): torchvision names, local .pth files and
Caffe2/Detectron pickles, key mapping, reports and refusals. Nothing is downloaded."""
import functools
import pickle
import re
import struct
import urllib.request

import numpy as np
import pytest
import torch
from torchvision.ops import FrozenBatchNorm2d

from backbones import WeightsError, build_resnet, load_weights
from tests.helpers import random_torchvision_resnet


IMAGENET_MEAN, IMAGENET_STD = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
MSRA_MEAN, MSRA_STD = (103.53, 116.28, 123.675), (1.0, 1.0, 1.0)


@pytest.fixture
def r18_pth(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(random_torchvision_resnet(18).state_dict(), path)
    return path


@functools.cache
def caffe2_blobs(depth: int) -> dict[str, np.ndarray]:
    """Random arrays named and shaped like the MSRA/Detectron ImageNet models (shared: do not modify)."""
    rng = np.random.default_rng(0)
    bottleneck = depth >= 50
    counts = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3)}[depth]
    blobs: dict[str, np.ndarray] = {}

    def conv_norm(conv: str, norm: str, shape: tuple) -> None:
        blobs[f"{conv}_w"] = rng.standard_normal(shape, dtype=np.float32)
        blobs[f"{norm}_bn_s"] = rng.uniform(0.5, 1.5, shape[0]).astype(np.float32)
        blobs[f"{norm}_bn_b"] = rng.standard_normal(shape[0]).astype(np.float32)

    conv_norm("conv1", "res_conv1", (64, 3, 7, 7))
    in_channels = 64
    for stage, count in zip(range(2, 6), counts):
        width = 64 * 2 ** (stage - 2)
        out = 4 * width if bottleneck else width
        for index in range(count):
            name = f"res{stage}_{index}_branch"
            if bottleneck:
                for branch, shape in (("2a", (width, in_channels, 1, 1)), ("2b", (width, width, 3, 3)),
                                      ("2c", (out, width, 1, 1))):
                    conv_norm(name + branch, name + branch, shape)
            else:
                conv_norm(name + "2a", name + "2a", (out, in_channels, 3, 3))
                conv_norm(name + "2b", name + "2b", (out, out, 3, 3))
            if index == 0 and (in_channels != out or stage > 2):
                conv_norm(name + "1", name + "1", (out, in_channels, 1, 1))
            in_channels = out
    blobs["fc1000_w"] = rng.standard_normal((1000, in_channels), dtype=np.float32)
    blobs["fc1000_b"] = np.zeros(1000, np.float32)
    return blobs


def write_pickle(path, obj, protocol=4) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


# ---------------------------------------------------------------- torchvision format

def test_local_torchvision_pth_loads_and_records_preprocessing(r18_pth):
    model = build_resnet(18, weights=str(r18_pth))
    info = model.weights_info
    assert (info.format, info.input_format, info.stride_in_1x1) == ("torchvision", "RGB", False)
    assert info.pixel_mean == pytest.approx(IMAGENET_MEAN) and info.pixel_std == pytest.approx(IMAGENET_STD)
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert sorted(info.ignored_keys) == ["fc.bias", "fc.weight"]
    state = torch.load(r18_pth, weights_only=True)
    assert torch.equal(model.res3[0].shortcut[0].weight, state["layer2.0.downsample.0.weight"])
    assert torch.equal(model.res5[1].norm2.running_var, state["layer4.1.bn2.running_var"])


def test_missing_and_unexpected_keys_are_an_error_naming_both(tmp_path):
    state = random_torchvision_resnet(18).state_dict()
    del state["layer4.1.bn2.running_var"]
    state["layer9.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"partial\.pth does not fit the ResNet-18: 1 tensors of the ResNet-18 "
                       r"are not in the file \(res5\.1\.norm2\.running_var\); 1 tensors of the file have no "
                       r"place in the ResNet-18 \(layer9\.0\.conv1\.weight\).*allow_partial_weights"):
        load_weights(build_resnet(18), path)
    info = load_weights(build_resnet(18), path, allow_partial=True)
    assert info.missing_keys == ["res5.1.norm2.running_var"]
    assert info.unexpected_keys == ["layer9.0.conv1.weight"]


def test_weights_of_a_shallower_net_are_refused_unless_allowed(tmp_path, r18_pth, caplog):
    """The user's mistake: R-50 weights into ResNet-101 (same shapes, fewer res4 blocks);
    here R-18 into ResNet-34, which differ the same way at a fraction of the cost."""
    model = build_resnet(34)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError) as err:
        load_weights(model, r18_pth)
    message = str(err.value)
    assert str(r18_pth) in message and "\n" not in message
    # res2..res5 of ResNet-34 have 3, 4, 6, 3 blocks; ResNet-18's file covers 2 of each
    missing = len([k for k in before if k.split(".")[0] in ("res2", "res3", "res4", "res5")
                   and int(k.split(".")[1]) >= 2 and not k.endswith("num_batches_tracked")])
    assert f"{missing} tensors of the ResNet-34 are not in the file (res2.2.conv1.weight," in message
    assert "model.backbone.allow_partial_weights: true" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # refused: untouched
    with caplog.at_level("WARNING", logger="backbones.weights"):
        allowed = build_resnet(34, weights=str(r18_pth), allow_partial_weights=True)
    assert len(allowed.weights_info.missing_keys) == missing
    assert f"{missing} model tensors not in {r18_pth}" in caplog.text


def test_weights_of_a_deeper_net_list_the_unused_tensors(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(random_torchvision_resnet(34).state_dict(), path)
    with pytest.raises(WeightsError, match=r"resnet34\.pth does not fit the ResNet-18: \d+ tensors of the file have "
                                           r"no place in the ResNet-18 \(layer1\.2\.conv1\.weight, "):
        build_resnet(18, weights=str(path))


def test_caffe2_weights_of_a_shallower_net_are_refused(tmp_path):
    path = tmp_path / "R-18.pkl"
    write_pickle(path, caffe2_blobs(18))
    with pytest.raises(WeightsError, match=r"R-18\.pkl does not fit the ResNet-34: .* \(res2\.2\.conv1\.weight"):
        build_resnet(34, weights=str(path))


def test_option_a_reports_torchvision_projections_as_unexpected(r18_pth):
    with pytest.raises(WeightsError, match=r"have no place in the ResNet-18 \(layer2\.0\.downsample"):
        load_weights(build_resnet(18, shortcut="A"), r18_pth)
    info = load_weights(build_resnet(18, shortcut="A"), r18_pth, allow_partial=True)
    assert sorted(info.unexpected_keys) == sorted(
        f"layer{i}.0.downsample.{j}.{p}" for i in (2, 3, 4) for j, params in
        ((0, ["weight"]), (1, ["weight", "bias", "running_mean", "running_var"])) for p in params)
    # num_batches_tracked is BN bookkeeping, never reported either way.


def test_wrapped_checkpoint_with_dataparallel_prefix_loads(tmp_path):
    reference = random_torchvision_resnet(18).state_dict()
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {f"module.{k}": v for k, v in reference.items()}, "iteration": 5}, path)
    info = load_weights(build_resnet(18), path)
    assert info.missing_keys == [] and info.unexpected_keys == []


def test_shape_mismatch_names_the_key(tmp_path):
    state = random_torchvision_resnet(18).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"layer2\.0\.conv1\.weight.*res3\.0\.conv1\.weight"):
        build_resnet(18, weights=str(path))


def test_weights_of_another_depth_fail_on_shape(r18_pth):
    with pytest.raises(WeightsError, match="shape"):
        load_weights(build_resnet(50), r18_pth)


def test_a_file_that_matches_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match="no tensor"):
        load_weights(build_resnet(18), path)


def test_missing_local_file_names_the_path(tmp_path):
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "nope.pth"))):
        build_resnet(18, weights=str(tmp_path / "nope.pth"))


def test_pth_with_a_callable_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": OpensAFile(str(marker))}, path)
    with pytest.raises(WeightsError, match="weights_only"):
        load_weights(build_resnet(18), path)
    assert not marker.exists()


def test_a_zip_that_inflates_far_past_its_size_is_refused_before_inflating(tmp_path):
    """A 60 KB weights file of one deflated record of 64 MB of zeros (a zip bomb: 2 MB for 2 GiB
    took 17 s of inflating to refuse), and one whose records overlap (a Fifield-style bomb, much
    longer): both refused from the zip's directory, nothing inflated; the detector loaders too."""
    import zipfile

    from detection.engine.loading import read_detector_file

    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(64 << 20))
    assert bomb.stat().st_size < 100_000
    with pytest.raises(WeightsError, match=r"its record archive/data/0 inflates \d+ bytes to 67108864 \(torch.save "
                                           r"stores its records uncompressed\)"):
        load_weights(build_resnet(18), bomb)
    with pytest.raises(ValueError, match="inflates"):
        read_detector_file(bomb)
    overlapping = tmp_path / "overlap.pth"  # two directory entries naming the same record's bytes
    with zipfile.ZipFile(overlapping, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data/0", bytes(4000))
    data = overlapping.read_bytes()
    directory = data.index(b"PK\x01\x02")
    end = data.index(b"PK\x05\x06")
    entry = data[directory:end]
    count = struct.pack("<H", 2)
    tail = data[end:end + 8] + count + count + struct.pack("<I", 2 * len(entry)) + data[end + 16:]
    overlapping.write_bytes(data[:directory] + entry + entry.replace(b"archive/data/0", b"archive/data/1") + tail)
    with pytest.raises(WeightsError, match="its records overlap"):
        load_weights(build_resnet(18), overlapping)


def test_gn_model_refuses_batchnorm_weights(r18_pth):
    with pytest.raises(WeightsError, match="norm='gn'"):
        load_weights(build_resnet(18, norm="gn"), r18_pth)


# ---------------------------------------------------------------- torchvision names

@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path; any download attempt fails the test."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return tmp_path / "hub" / "checkpoints"


def test_missing_torchvision_file_says_what_to_download_and_where(offline_hub):
    with pytest.raises(WeightsError) as error:
        build_resnet(18, weights="torchvision:IMAGENET1K_V1")
    message = str(error.value)
    expected_path = str(offline_hub / "resnet18-f37072fd.pth")
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert expected_path in message
    # One sentence: no line break, no sentence end before the final path.
    assert "\n" not in message and not re.search(r"\.\s", message.replace(expected_path, ""))


def test_torchvision_name_loads_from_the_hub_cache(offline_hub):
    offline_hub.mkdir(parents=True)
    reference = random_torchvision_resnet(18)
    torch.save(reference.state_dict(), offline_hub / "resnet18-f37072fd.pth")
    model = build_resnet(18, weights="torchvision:IMAGENET1K_V1")
    info = model.weights_info
    assert info.path == str(offline_hub / "resnet18-f37072fd.pth")
    assert info.pixel_mean == pytest.approx(IMAGENET_MEAN) and info.pixel_std == pytest.approx(IMAGENET_STD)
    assert info.input_format == "RGB" and info.missing_keys == []
    assert torch.equal(model.stem.conv1.weight, reference.conv1.weight)


def test_torchvision_default_alias_resolves_per_depth(offline_hub):
    with pytest.raises(WeightsError, match="resnet50-11ad3fa6.pth"):  # DEFAULT is V2 for ResNet-50
        build_resnet(50, weights="torchvision:DEFAULT")


def test_unknown_torchvision_name_lists_the_known_ones(offline_hub):
    with pytest.raises(WeightsError, match="IMAGENET1K_V1"):
        build_resnet(18, weights="torchvision:IMAGENET22K")


# ---------------------------------------------------------------- Caffe2 pickles

def test_caffe2_pickle_loads_with_no_missing_keys(tmp_path):
    blobs = caffe2_blobs(50)
    path = tmp_path / "R-50.pkl"
    write_pickle(path, {"blobs": {**blobs, "res2_0_branch2a_w_momentum": np.zeros(1)}, "cfg": "MODEL: ..."})
    model = build_resnet(50, weights=str(path), stride_in_1x1=True, out_features=("res5",)).eval()
    info = model.weights_info
    assert info.missing_keys == [] and info.unexpected_keys == []
    assert sorted(info.ignored_keys) == ["fc1000_b", "fc1000_w", "res2_0_branch2a_w_momentum"]
    assert (info.format, info.input_format, info.stride_in_1x1) == ("caffe2", "BGR", True)
    assert info.pixel_mean == MSRA_MEAN and info.pixel_std == MSRA_STD
    pairs = [("stem.conv1.weight", "conv1_w"), ("stem.norm1.weight", "res_conv1_bn_s"),
             ("res3.0.conv1.weight", "res3_0_branch2a_w"), ("res4.5.conv3.weight", "res4_5_branch2c_w"),
             ("res4.5.norm2.bias", "res4_5_branch2b_bn_b"), ("res5.0.shortcut.0.weight", "res5_0_branch1_w"),
             ("res5.0.shortcut.1.weight", "res5_0_branch1_bn_s")]
    for ours, theirs in pairs:
        assert torch.equal(model.state_dict()[ours], torch.from_numpy(blobs[theirs])), ours


def test_caffe2_norms_compute_exactly_scale_times_x_plus_shift(tmp_path):
    blobs = caffe2_blobs(18)
    path = tmp_path / "R-18.pkl"
    write_pickle(path, blobs)
    model = build_resnet(18, weights=str(path))
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and all(m.eps == 0 for m in norms)
    x = torch.randn(2, 128, 3, 3)
    scale = torch.from_numpy(blobs["res3_1_branch2b_bn_s"]).view(1, -1, 1, 1)
    shift = torch.from_numpy(blobs["res3_1_branch2b_bn_b"]).view(1, -1, 1, 1)
    torch.testing.assert_close(model.res3[1].norm2(x), scale * x + shift, rtol=0, atol=1e-6)


def test_caffe2_into_trainable_bn_compensates_eps(tmp_path):
    blobs = caffe2_blobs(18)
    path = tmp_path / "R-18.pkl"
    write_pickle(path, blobs)
    model = build_resnet(18, weights=str(path), norm="bn", freeze_at=0).eval()
    norm = model.res2[0].norm1
    assert norm.eps > 0 and model.weights_info.missing_keys == []
    x = torch.randn(2, 64, 3, 3)
    expected = torch.from_numpy(blobs["res2_0_branch2a_bn_s"]).view(1, -1, 1, 1) * x + \
        torch.from_numpy(blobs["res2_0_branch2a_bn_b"]).view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_caffe2_pickle_protocols_load(tmp_path, protocol):
    path = tmp_path / "R-18.pkl"
    write_pickle(path, caffe2_blobs(18), protocol=protocol)
    assert build_resnet(18, weights=str(path)).weights_info.missing_keys == []


def test_numpy1_era_pickle_names_load(tmp_path):
    # MSRA's files were written by numpy 1, whose arrays pickle as numpy.core.multiarray.*.
    data = pickle.dumps(caffe2_blobs(18), protocol=2)
    assert b"numpy._core.multiarray" in data
    path = tmp_path / "R-18.pkl"
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert build_resnet(18, weights=str(path)).weights_info.missing_keys == []


def py2_string(data: bytes) -> bytes:
    """A Python 2 `str` as Python 2's pickle writes it (SHORT_BINSTRING / BINSTRING)."""
    return (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data


def py2_pickle(blobs: dict[str, np.ndarray]) -> bytes:
    """The bytes Python 2 + numpy 1 write for a dict of float32 arrays (protocol 2), as in
    MSRA's files: numpy.core globals and array data as a byte string, not _codecs.encode."""
    def array(a: np.ndarray) -> bytes:
        # _reconstruct(ndarray, (0,), "b"), then BUILD with the state
        # (version 1, shape, dtype("f4") + its own state, not fortran, raw data).
        shape = b"".join(b"J" + struct.pack("<i", n) for n in a.shape)
        return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85"
                + py2_string(b"b") + b"\x87R"
                + b"(K\x01(" + shape + b"tcnumpy\ndtype\n" + py2_string(b"f4") + b"K\x00K\x01\x87R"
                + b"(K\x03" + py2_string(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
                + b"\x89" + py2_string(np.ascontiguousarray(a, "<f4").tobytes()) + b"tb")
    return b"\x80\x02}(" + b"".join(py2_string(k.encode()) + array(v) for k, v in blobs.items()) + b"u."


def test_python2_pickle_loads(tmp_path):
    blobs = caffe2_blobs(18)
    path = tmp_path / "R-18.pkl"
    path.write_bytes(py2_pickle(blobs))
    model = build_resnet(18, weights=str(path))
    assert model.weights_info.missing_keys == [] and model.weights_info.unexpected_keys == []
    assert torch.equal(model.res4[1].conv2.weight, torch.from_numpy(blobs["res4_1_branch2b_w"]))


class OpensAFile:
    """Unpickling this calls open(path, "w"): a stand-in for arbitrary code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_with_a_callable_is_refused(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    blobs = {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "x": OpensAFile(str(marker))}
    write_pickle(path, blobs, protocol)
    with pytest.raises(WeightsError) as error:
        build_resnet(18, weights=str(path))
    assert str(path) in str(error.value) and "io.open" in str(error.value)
    assert not marker.exists()


def test_pickle_with_a_class_instance_is_refused(tmp_path):
    path = tmp_path / "evil.pkl"
    write_pickle(path, {"conv1_w": np.zeros((64, 3, 7, 7), np.float32), "x": torch.zeros(1)})
    with pytest.raises(WeightsError, match=r"refusing.*torch"):
        build_resnet(18, weights=str(path))


def test_broken_pickle_names_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(caffe2_blobs(18), protocol=2)[:1000])
    with pytest.raises(WeightsError, match=re.escape(str(path))):
        build_resnet(18, weights=str(path))


def test_backbone_weights_with_flipped_bytes_are_refused_naming_the_record(r18_pth, tmp_path):
    """torch.load does not check the zip's CRC-32s: a bit flipped inside a tensor's bytes loaded as
    a wrong weight. The record is named (as a detector checkpoint's damage is)."""
    import zipfile

    with zipfile.ZipFile(r18_pth) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)  # a tensor's data
    data = bytearray(r18_pth.read_bytes())
    data[record.header_offset + 30 + len(record.filename) + len(record.extra) + 100] ^= 0x01  # one bit
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=rf"damaged.pth: damaged weights \(the bytes of its record "
                                           rf"{re.escape(record.filename)} do not match their stored checksum"):
        build_resnet(18, weights=str(damaged))
    build_resnet(18, weights=str(r18_pth))  # the undamaged file loads


# ---------------------------------------------------------------- through the config

def _detector_config(*overrides):
    from detection.config import load_config

    return load_config(None, ["model.num_classes=2", "model.backbone.depth=34", "model.backbone.norm=bn",
                              "model.backbone.freeze_at=0", *overrides])


def test_config_switch_reaches_build_model_and_model_weights(r18_pth):
    """R-18 weights for a ResNet-34 detector: refused by model.backbone.weights and by
    model.weights (both load paths), accepted with model.backbone.allow_partial_weights."""
    from detection.engine.loading import load_initial_weights
    from detection.modeling.model import build_model

    with pytest.raises(WeightsError, match="does not fit the ResNet-34"):
        build_model(_detector_config(f"model.backbone.weights={r18_pth}"))
    cfg = _detector_config(f"model.backbone.weights={r18_pth}", "model.backbone.allow_partial_weights=true")
    assert cfg.model.backbone.allow_partial_weights is True
    build_model(cfg)
    cfg = _detector_config("model.backbone.weights=null")
    model = build_model(cfg)
    with pytest.raises(WeightsError, match="allow_partial_weights"):
        load_initial_weights(model, str(r18_pth), cfg.model.backbone)
    cfg.model.backbone.allow_partial_weights = True
    load_initial_weights(model, str(r18_pth), cfg.model.backbone)


@pytest.mark.parametrize("config, name", [("voc0712_r101.yaml", "R-101.pkl"), ("coco2014_r50.yaml", "R-50.pkl")])
def test_missing_msra_file_says_relative_to_what_and_where_to_download(tmp_path, monkeypatch, config, name):
    """The paper configs' `pretrained/R-101.pkl` is taken from the working directory; the error
    says so and gives the download address that configs/paper/base.yaml's header names."""
    from pathlib import Path

    from detection.config import load_config

    root = Path(__file__).resolve().parents[1]
    header = (root / "configs" / "paper" / "base.yaml").read_text().split("\n_base_:")[0]
    addresses = re.findall(r"https://\S+?\.pkl", header)
    assert len(addresses) == 2
    relative = load_config(root / "configs" / "paper" / config).model.backbone.weights
    assert relative == f"pretrained/{name}"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WeightsError) as err:
        load_weights(build_resnet(18), relative)
    message = str(err.value)
    assert f"relative path is taken from the working directory: {tmp_path / relative}" in message
    assert [a for a in addresses if a in message] == [a for a in addresses if a.endswith("/" + name)]


def test_caffe2_backbone_given_as_model_weights_warns_of_preprocessing_as_backbone_weights_does(tmp_path):
    """Detectron2's MODEL.WEIGHTS=R-50.pkl: BGR Caffe weights behind the detector's RGB ImageNet
    normalisation cost accuracy silently; model.backbone.weights warned, model.weights did not."""
    import warnings

    from detection.engine.loading import load_initial_weights
    from detection.modeling.model import build_model
    from tests.helpers import tiny_cfg

    path = tmp_path / "R-18.pkl"
    write_pickle(path, {"blobs": caffe2_blobs(18)})
    for overrides, warned in (({}, True), ({"model.input_format": "BGR", "model.pixel_mean": list(MSRA_MEAN),
                                           "model.pixel_std": list(MSRA_STD)}, False)):
        cfg = tiny_cfg(tmp_path / "data", tmp_path / "out", **{"model.backbone.norm": "frozen_bn", **overrides})
        model = build_model(cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_initial_weights(model, str(path), cfg.model.backbone)
        messages = [str(w.message) for w in caught if "differ from what the backbone weights expect" in str(w.message)]
        assert len(messages) == int(warned), (overrides, messages)
        if warned:
            assert "'BGR'" in messages[0] and "'RGB'" in messages[0]
            # at the caller's line, not inside the library (a docs trial)
            assert [w.filename for w in caught if "backbone weights expect" in str(w.message)] == [__file__]
        assert torch.equal(model.trunk.stem.conv1.weight, torch.from_numpy(caffe2_blobs(18)["conv1_w"]))


def test_a_detector_file_given_as_backbone_weights_says_to_give_it_as_model_weights(tmp_path):
    write_pickle(tmp_path / "model_final.pkl", {"model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7),
                                                                                                  np.float32)},
                                                "__author__": "Detectron2 Model Zoo"})
    torch.save({"model": {"trunk.stem.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "model_final.pth")
    for name in ("model_final.pkl", "model_final.pth"):
        with pytest.raises(WeightsError, match="holds a whole detector .*give it as model.weights"):
            build_resnet(18, weights=str(tmp_path / name))
    write_pickle(tmp_path / "other.pkl", {"blobs": {"unrelated": np.zeros(3, np.float32)}})
    with pytest.raises(WeightsError, match="it is not a caffe2-format ResNet"):
        build_resnet(18, weights=str(tmp_path / "other.pkl"))
