"""The Predictor (detection/predictor.py) on a tiny random detector: arrays in either channel
order with an explicit input_format (Detectron2's DefaultPredictor takes cv2.imread's BGR), and
a list of images run as one padded batch."""
import copy
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from detection.config import ConfigError, save_config
from detection.modeling.model import build_model
from detection.predictor import Predictor
from detection.testing import compare_detections, make_sane
from tests.helpers import tiny_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config (64 px test size, padding to 32) and a checkpoint of random sane weights;
    score threshold 0, so that every image gives detections to compare."""
    tmp = tmp_path_factory.mktemp("predictor")
    cfg = tiny_cfg(tmp / "data", tmp / "out", **{"model.roi_heads.score_thresh_test": 0.0})
    torch.manual_seed(0)
    model = make_sane(build_model(cfg))
    torch.save({"model": model.state_dict()}, tmp / "model.pth")
    return cfg, tmp / "model.pth", tmp


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """An RGB uint8 (H, W, 3) image of coloured rectangles whose colours matter: R != B."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), (200, 120, 40), dtype=np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, width - 16), rng.integers(0, height - 16)
        image[y:y + 16 + rng.integers(0, 20), x:x + 16 + rng.integers(0, 20)] = rng.integers(0, 256, 3)
    return image


def assert_same(a: dict, b: dict) -> None:
    assert len(a["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(a[key], b[key]), key


def test_a_bgr_array_with_input_format_bgr_equals_the_rgb_path(setup):
    cfg, weights, tmp = setup
    rgb_predictor = Predictor(cfg, weights, device="cpu")
    bgr_predictor = Predictor(cfg, weights, device="cpu", input_format="BGR")
    assert (rgb_predictor.input_format, bgr_predictor.input_format) == ("RGB", "BGR")
    rgb = photo(70, 90, seed=1)
    cv2.imwrite(str(tmp / "photo.png"), rgb[:, :, ::-1])  # OpenCV writes BGR
    bgr = cv2.imread(str(tmp / "photo.png"))  # what a Detectron2 user passes
    reference = rgb_predictor(rgb)
    assert_same(bgr_predictor(bgr), reference)
    # a file path is decoded to RGB whatever input_format says
    assert_same(bgr_predictor(str(tmp / "photo.png")), reference)
    # the orders differ for this model: without the argument, BGR pixels give other detections
    swapped = rgb_predictor(bgr)
    assert not torch.equal(swapped["scores"], reference["scores"])


def test_input_format_is_checked_and_given_through_from_config(setup, tmp_path):
    cfg, weights, _ = setup
    with pytest.raises(ValueError, match="input_format must be 'RGB' or 'BGR'.*got 'bgr'"):
        Predictor(cfg, weights, device="cpu", input_format="bgr")
    config = tmp_path / "config.yaml"
    save_config(cfg, config)
    assert Predictor.from_config(config, weights, device="cpu", input_format="BGR").input_format == "BGR"
    # Detectron2's upper-case keys, as the tools read them (was: "unknown key MODEL")
    upper = Predictor.from_config(config, weights, overrides=["MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.2"])
    assert upper.cfg.model.roi_heads.score_thresh_test == 0.2
    # a wrong key in `overrides` is named as the Predictor's (it said "command-line overrides")
    with pytest.raises(ConfigError, match=r"config.yaml \(with key=value overrides\): unknown key model.roi_heads.x"):
        Predictor.from_config(config, weights, overrides=["model.roi_heads.x=1"])


def test_the_device_is_the_configs_unless_the_argument_names_one(setup):
    """As Detectron2's DefaultPredictor takes MODEL.DEVICE: a config saying cuda on a machine
    without one is refused (it ran on the CPU in silence, the argument's "auto" winning)."""
    import copy

    from detection.utils.comm import DeviceError

    cfg, weights, _ = setup
    on_cuda = copy.deepcopy(cfg)
    on_cuda.device = "cuda"
    assert Predictor(on_cuda, weights, device="cpu").device == torch.device("cpu")  # the argument wins
    if torch.cuda.is_available():
        assert Predictor(on_cuda, weights).device.type == "cuda"
    else:
        with pytest.raises(DeviceError, match="device 'cuda' was asked for"):
            Predictor(on_cuda, weights)
    # a torch.device, or another string: checked (anything but "cpu" and "auto" was CUDA's first GPU:
    # torch.device("cpu") and "mps" ran on the GPU, "cuda:1" on cuda:0; an API trial)
    assert Predictor(on_cuda, weights, device=torch.device("cpu")).device == torch.device("cpu")
    for wrong in ("mps", "CPU", "gpu", "cpu:1", torch.device("meta")):
        with pytest.raises(ValueError, match=r"Predictor: device must be 'auto', 'cpu', 'cuda', 'cuda:N' or a "
                                             r"torch.device of those, got "):
            Predictor(cfg, weights, device=wrong)
    with pytest.raises(DeviceError):  # no CUDA here, or not that many GPUs
        Predictor(cfg, weights, device=f"cuda:{torch.cuda.device_count()}")
    if not torch.cuda.is_available():  # a machine of one GPU, as far as the check sees (a review)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32  # selecting CUDA sets them
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(torch.cuda, "is_available", lambda: True)
                patch.setattr(torch.cuda, "device_count", lambda: 1)
                with pytest.raises(DeviceError, match=r"Predictor: device 'cuda:1', but this machine has 1 GPU "
                                                      r"\(cuda:0 \.\. cuda:0\)"):
                    Predictor(cfg, weights, device="cuda:1")
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def test_the_predictor_hands_the_model_host_images_whatever_its_device(setup):
    """The model resizes a photo on the host and then moves it (FasterRCNN.preprocess): the
    Predictor leaves its pixels there, so on a GPU a 12-megapixel photo is not sent to the GPU,
    brought back to be resized and sent again. A recording model stands in for one on a GPU."""
    cfg, weights, _ = setup
    predictor = Predictor(cfg, weights)
    given = []

    def model(images):
        given.extend((image.device.type, image.dtype, tuple(image.shape)) for image in images)
        return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64)}
                for _ in images]

    predictor.model, predictor.device = model, torch.device("meta")
    predictor([photo(300, 400, 0), photo(50, 60, 1)])
    assert given == [("cpu", torch.uint8, (3, 300, 400)), ("cpu", torch.uint8, (3, 50, 60))]


def test_a_list_of_images_is_one_padded_batch(setup):
    cfg, weights, _ = setup
    predictor = Predictor(cfg, weights, device="cpu")
    images = [photo(64, 64, seed=2), photo(64, 96, seed=3)]  # padded alone to 64x64 and 64x96
    batched = predictor(images)
    assert isinstance(batched, list) and len(batched) == 2
    pixels = [torch.from_numpy(image).permute(2, 0, 1) for image in images]
    with torch.no_grad():
        model_batch = predictor.model(pixels)  # the model's own batch: the same padding
    for ours, theirs in zip(batched, model_batch):
        assert_same(ours, theirs)
    # the image padded to the batch's size alone equals its single run; the other one's
    # padding grew (64x64 -> 64x96), which may move its scores slightly
    # (equal up to float rounding: a batch of 2 convolves in another order)
    same = compare_detections(predictor(images[1]), batched[1], box_tolerance=1e-3, score_tolerance=1e-5)
    assert same["detections"] > 0 and same["equal"], same
    single = predictor(images[0])
    assert float(batched[0]["boxes"][:, 2].max()) <= 64  # clipped to its own image, not the padded batch
    assert abs(float(batched[0]["scores"][0]) - float(single["scores"][0])) < 0.05
    assert predictor(tuple(images))[1]["scores"].shape == batched[1]["scores"].shape
    assert predictor([]) == []


def readme_predictor_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- predictor:start -->", 1)[1].split("<!-- predictor:end -->", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow  # the Detectron2 fixture checkpoint: ResNet-50, 135 MB, 800 px images
def test_readme_predictor_lines_run_as_written(d2_files, both_cores, tmp_path, monkeypatch):
    """The README's Predictor lines, taken from README.md, with the fixture's Detectron2 file
    (conftest's d2_files) standing in for the model-zoo download and two of its images for the
    user's photos. The lines are what is tested here, at 100 proposals (the config's 1000 made
    their five images 2 minutes of the suite): that the Predictor gives Detectron2's detections
    at its own settings is test_detectron2's."""
    fixture = ROOT / "tests" / "fixtures" / "detectron2_c4"
    from_config = Predictor.from_config.__func__

    def fewer_proposals(cls, *args, overrides=(), **kwargs):
        return from_config(cls, *args, overrides=[*overrides, "model.rpn.post_nms_topk_test=100"], **kwargs)

    monkeypatch.setattr(Predictor, "from_config", classmethod(fewer_proposals))
    (tmp_path / "model_final_721ade.pkl").symlink_to(d2_files[0])
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    for name, source in (("street.jpg", "resize_0.png"), ("park.jpg", "exact_1.png")):
        cv2.imwrite(str(tmp_path / name), cv2.imread(str(fixture / "R_50_C4_coco_seed11" / "images" / source)))
    blocks = readme_predictor_blocks()
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README Predictor", "exec"), namespace)  # noqa: S102 - the README's own lines
    rgb_out = namespace["out"]
    assert namespace["predictor"].cfg.model.rpn.post_nms_topk_test == 100
    assert namespace["predictor"].class_names[int(rgb_out["labels"][0]) - 1] == "zebra"
    exec(compile(blocks[1], "README Predictor", "exec"), namespace)  # noqa: S102
    assert_same(namespace["out"], rgb_out)  # cv2.imread's BGR array with input_format="BGR"
    outs = namespace["outs"]
    assert len(outs) == 2 and len(outs[1]["scores"]) > 0
    # the street image is the smaller one: more padding in the batch, scores within a few hundredths
    assert abs(float(outs[0]["scores"][0]) - float(rgb_out["scores"][0])) < 0.03
    # a BGR array (cv2.imread) given where RGB is expected gives other detections, and no error
    swapped = namespace["predictor"](cv2.imread("street.jpg"))
    assert abs(float(swapped["scores"][0]) - float(rgb_out["scores"][0])) > 1e-3


def test_an_uploads_bytes_are_read_as_its_file(setup, tmp_path):
    """A service receives an upload's bytes: they are decoded as the file would be read, EXIF tag
    included (a phone photo: stored landscape, viewed portrait)."""
    from PIL import Image

    cfg, weights, _ = setup
    predictor = Predictor(cfg, weights, device="cpu")
    exif = Image.Exif()
    exif[0x0112] = 6  # turn 90 degrees clockwise to view
    Image.fromarray(photo(60, 100, seed=4)).save(tmp_path / "phone.png", exif=exif.tobytes())
    data = (tmp_path / "phone.png").read_bytes()
    from_path, from_bytes = predictor(str(tmp_path / "phone.png")), predictor(data)
    assert_same(from_bytes, from_path)
    assert from_path["boxes"][:, 2].max() <= 60  # in the viewed (60 wide) frame
    with pytest.raises(ValueError, match="could not read image given as bytes: unreadable"):
        predictor(b"not an image")


def test_outputs_can_be_changed_in_place_and_the_config_is_found_beside_the_weights(setup, tmp_path):
    """As with Detectron2's DefaultPredictor (no_grad): `out["boxes"] *= s` works (inference_mode's
    tensors refuse it); from_config(None, weights=...) takes the config.yaml training saved
    beside the checkpoint, as eval.py does, and without one says so (it took every default)."""
    from detection.config import ConfigError

    cfg, weights, _ = setup
    out = Predictor(cfg, weights, device="cpu")(photo(64, 64, seed=2))
    out["boxes"] *= 0.5
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_final.pth").write_bytes(weights.read_bytes())
    with pytest.raises(ConfigError, match=r"no config_path, and no .*config.yaml \(the config.yaml training writes"):
        Predictor.from_config(None, weights=run / "model_final.pth", device="cpu")
    save_config(cfg, run / "config.yaml")
    found = Predictor.from_config(None, weights=run / "model_final.pth", device="cpu")
    assert found.cfg.model.backbone.depth == cfg.model.backbone.depth == 18


def test_images_the_predictor_cannot_take_say_how_to_pass_them():
    """A serving user's tensors, PIL images, gray, RGBA, channels-first, batched, float 0..255 and
    empty arrays: one error each that says what to pass instead (an empty one was a
    ZeroDivisionError deep in resizing); a read-only array is taken as it is (torch warned)."""
    import warnings

    from PIL import Image

    from detection.predictor import to_rgb_uint8

    rgb = np.arange(5 * 6 * 3, dtype=np.uint8).reshape(5, 6, 3)
    cases = [
        (torch.zeros(3, 5, 6), TypeError, "got Tensor (a tensor: pass image.numpy() of an (H, W, 3) uint8 image; "
                                          "channels first: image.permute(1, 2, 0).numpy())"),
        # turned by its EXIF tag, as a path is read (without it a phone photo's boxes land elsewhere)
        (Image.fromarray(rgb), TypeError, "(a PIL image: pass np.asarray(ImageOps.exif_transpose(image).convert("),
        (rgb.astype(np.uint16) * 257, ValueError, "got dtype uint16 (a 16-bit image: pass (image / 257 + 0.5)"),
        (cv2.imencode(".png", rgb)[1].reshape(-1), ValueError, "(an image file's encoded bytes: decode them with "
                                                               "detection.data.image_io.decode_image"),
        (rgb.astype(np.float32) / 255, ValueError, "got dtype float32 (a float 0..1 image: pass "
                                                   "(image.clip(0, 1) * 255).round().astype(np.uint8))"),
        (rgb.astype(np.float64), ValueError, "got dtype float64 (a float image of 0..255 values: pass "
                                             "image.round().clip(0, 255).astype(np.uint8))"),
        (rgb[:, :, 0], ValueError, "got (5, 6) (a gray image: pass np.repeat("),
        (rgb[:, :, :1], ValueError, "got (5, 6, 1) (a gray image: pass np.repeat("),
        (np.zeros((5, 6, 4), np.uint8), ValueError, "got (5, 6, 4) (with an alpha channel: pass image[:, :, :3])"),
        (rgb.transpose(2, 0, 1), ValueError, "got (3, 5, 6) (channels first: pass image.transpose(1, 2, 0))"),
        (rgb[None], ValueError, "got (1, 5, 6, 3) (a batch: pass a list of (H, W, 3) images)"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "Predictor: the image is empty, shape (0, 5, 3)"),
        (np.zeros((5, 0, 3), np.uint8), ValueError, "Predictor: the image is empty, shape (5, 0, 3)"),
    ]
    for image, error, text in cases:
        with pytest.raises(error) as err:
            to_rgb_uint8(image)
        assert text in str(err.value), (text, str(err.value))
    gray = rgb[:, :, 0]
    advice = np.repeat(gray.reshape(gray.shape[0], gray.shape[1], 1), 3, axis=2)  # the advice works
    assert to_rgb_uint8(advice).shape == (5, 6, 3)
    frozen = rgb.copy()
    frozen.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        taken = to_rgb_uint8(frozen)
        torch.from_numpy(taken)
    assert np.array_equal(taken, rgb)


def test_weights_in_memory_are_taken_as_a_file_of_them(setup):
    """A torchvision user's first guess, a model or its state dict as `weights`, failed in pathlib
    with "expected str, bytes or os.PathLike object, not OrderedDict" (a helper's trial). A model,
    a state dict or a checkpoint dict now give the file's detections, with the names they carry."""
    cfg, path, _ = setup
    checkpoint = torch.load(path, weights_only=True)
    image = photo(60, 80, 3)
    from_file = Predictor(cfg, weights=path)(image)
    model = build_model(cfg)
    model.load_state_dict(checkpoint["model"])
    model.class_names = ["disc", "box", "cross"]
    for given in (checkpoint["model"], checkpoint, model):
        predictor = Predictor(cfg, weights=given)
        assert_same(predictor(image), from_file)
    assert predictor.class_names == ["disc", "box", "cross"]
    with pytest.raises(TypeError, match="weights: a checkpoint's path, a state dict, a checkpoint dict or a model, "
                                        "got int"):
        Predictor(cfg, weights=3)
    # settings set on the model (torchvision's way) are not the config's: said at the caller's line (an
    # internals trial: 100 detections from 0.12 for a model set to 3 at 0.5, without a word)
    model.roi_heads.score_thresh = 0.5
    model.roi_heads.detections_per_img = 3
    with pytest.warns(UserWarning, match=r"the model given \(the Predictor's weights, evaluate\(\)'s model\): its "
                                         r"weights and class names are taken, and the config's settings, not those "
                                         r"set on the model: model.roi_heads.score_thresh_test 0.5 on the "
                                         r"model, 0.0 in the config; model.roi_heads.detections_per_image 3 on the "
                                         r"model, 100 in the config; set them on the config") as caught:
        assert_same(Predictor(cfg, weights=model)(image), from_file)
    assert caught[0].filename == __file__
    # the config changed deliberately (Detectron2's habit), the model as built: nothing to say
    import warnings

    from detection.modeling.tta import DetectorWithTTA

    built = build_model(cfg)
    built.load_state_dict(checkpoint["model"])
    changed = copy.deepcopy(cfg)
    changed.model.roi_heads.score_thresh_test = 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Predictor(changed, weights=built)
        # a model inside the wrappers (DistributedDataParallel's .module, test-time augmentation's .model)
        wrapped = torch.nn.Module()
        wrapped.module = DetectorWithTTA(built, [64], 128)
        assert_same(Predictor(cfg, weights=wrapped)(image), from_file)
    # a Predictor's own model with the fast path is an inference copy (norms folded): refused as such, where
    # the error blamed the config (and evaluate() failed inside load_state_dict)
    from detection.engine.evaluate import evaluate

    fast = Predictor(cfg, weights=path)
    assert fast.model.inference_only
    for call in (lambda: Predictor(cfg, weights=fast.model), lambda: evaluate(cfg, fast.model, datasets=[])):
        with pytest.raises(ValueError, match=r"an inference copy of a model \(a Predictor's .model, or "
                                             r"optimize_for_inference's: its norms are folded into the convolutions"):
            call()
    with pytest.warns(UserWarning, match=r"evaluate\(\)'s model\): .* model.roi_heads.score_thresh_test 0.5"):
        evaluate(cfg, model, datasets=[])


def test_a_process_forked_after_the_predictor_was_built_runs_it(setup):
    """gunicorn --preload: a Predictor built (and called) in the parent, then used in a forked
    worker. With PyTorch's OpenMP threads started in the parent, the child's first parallel op
    hung forever (a serving trial); the child now runs with one thread and gives the parent's
    detections."""
    import multiprocessing

    cfg, weights, _ = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the parent's OpenMP pool, as on any multi-core machine
    try:
        predictor = Predictor(cfg, weights, device="cpu")
        image = photo(64, 96, seed=5)
        expected = predictor(image)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()

        def worker():
            out = predictor(image)
            queue.put((torch.get_num_threads(), out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy()))

        child = context.Process(target=worker)
        child.start()
        try:
            got = queue.get(timeout=120)  # the old code never answered
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
    finally:
        torch.set_num_threads(threads)
    assert got[0] == 1
    np.testing.assert_array_equal(got[3], expected["labels"].numpy())
    np.testing.assert_allclose(got[1], expected["boxes"].numpy(), atol=1e-3)
    np.testing.assert_allclose(got[2], expected["scores"].numpy(), atol=1e-5)


def test_one_predictor_serves_several_threads_with_each_images_own_detections(setup):
    """A service's threads share one Predictor (the README says it may): no state of one call
    reaches another (the fast path keeps nothing per call on the module)."""
    from concurrent.futures import ThreadPoolExecutor

    cfg, weights, _ = setup
    predictor = Predictor(cfg, weights, device="cpu")
    images = [photo(48 + 8 * i, 96 - 4 * i, seed=i) for i in range(6)]
    alone = [predictor(image) for image in images]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(predictor, images * 2))
    for i, out in enumerate(together):
        assert_same(out, alone[i % len(images)])
