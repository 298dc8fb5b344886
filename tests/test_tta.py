"""Test-time augmentation (detection/modeling/tta.py, config test.aug): passes, mirroring, merging."""
from types import SimpleNamespace

import pytest
import torch

from detection.config import load_config
from detection.modeling.tta import DetectorWithTTA, hflip_detections, build_tta

from tests.helpers import IMAGES, make_model


def test_hflip_maps_boxes_back_to_the_original_image():
    det = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 100.0, 5.0]]),
           "scores": torch.tensor([0.9, 0.1]), "labels": torch.tensor([1, 2])}
    out = hflip_detections(det, width=100)
    assert out["boxes"].tolist() == [[70.0, 20.0, 90.0, 40.0], [0.0, 0.0, 100.0, 5.0]]
    assert out["scores"] is det["scores"] and out["labels"] is det["labels"]


class FakeDetector(torch.nn.Module):
    """Answers each pass with fixed boxes; tells a mirrored image by its bright left half."""

    def __init__(self, detections_per_image: int) -> None:
        super().__init__()
        self.roi_heads = SimpleNamespace(nms_thresh_test=0.5, detections_per_image=detections_per_image)
        self.calls = []

    def inference(self, images, min_size=None, max_size=None):
        flipped = [bool(image[0, 0, -1] == 1) for image in images]  # the bright half is on the right
        self.calls.append((min_size, max_size, flipped))
        return [self.detect(f, min_size) for f in flipped]

    @staticmethod
    def detect(flipped, min_size):
        if flipped:  # in the mirrored image's pixels (width 100)
            boxes, scores, labels = [[70, 10, 90, 30], [0, 0, 10, 10]], [0.8, 0.1], [1, 1]
        else:
            boxes, scores, labels = [[10, 10, 30, 30], [60, 10, 80, 30]], [0.3 + min_size / 1000, 0.2], [1, 2]
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.tensor(scores),
                "labels": torch.tensor(labels)}


def test_every_size_and_its_mirror_are_merged_by_per_class_nms():
    image = torch.zeros(3, 50, 100)
    image[:, :, :50] = 1
    fake = FakeDetector(detections_per_image=3)
    tta = DetectorWithTTA(fake, min_sizes=[100, 200], max_size=500, flip=True).eval()
    out = tta([image])[0]
    # one pass per size, the mirrored image batched with the plain one
    assert fake.calls == [(100, 500, [False, True]), (200, 500, [False, True])]
    # four passes found the label-1 box at (10, 10, 30, 30) (two of them mirrored): the best
    # score (0.8, from a mirrored pass) survives; label 2 at the same place is another class;
    # the mirrored pass's corner box maps to the right-hand corner
    assert out["boxes"].tolist() == [[10, 10, 30, 30], [60, 10, 80, 30], [90, 0, 100, 10]]
    assert out["scores"].tolist() == pytest.approx([0.8, 0.2, 0.1])
    assert out["labels"].tolist() == [1, 2, 1]
    fake.roi_heads.detections_per_image = 2
    assert tta([image])[0]["labels"].tolist() == [1, 2]
    fake.calls.clear()
    DetectorWithTTA(fake, min_sizes=[300], max_size=600, flip=False).eval()([image])
    assert fake.calls == [(300, 600, [False])]
    # two images: each gets its own passes back (plain ones first in the batch, then mirrors)
    fake.calls.clear()
    fake.roi_heads.detections_per_image = 3
    two = DetectorWithTTA(fake, min_sizes=[100], max_size=500, flip=True).eval()([image, image.clone()])
    assert fake.calls == [(100, 500, [False, False, True, True])]
    assert [d["labels"].tolist() for d in two] == [[1, 2, 1]] * 2


def test_batched_mirrors_give_the_separate_passes_detections():
    """The mirrored images run in the same batch as the plain ones: the detections are what
    separate passes at each size and mirroring give, merged."""
    torch.manual_seed(0)
    model = make_model(min_size_test=96, max_size_test=256, score_thresh_test=0.0).eval()
    tta = DetectorWithTTA(model, [96, 128], 256, flip=True).eval()
    image = IMAGES[0]
    with torch.no_grad():
        found = tta([image])[0]
        separate = []
        for size in (96, 128):
            separate.append(model.inference([image], min_size=size, max_size=256)[0])
            mirrored = model.inference([image.flip(-1)], min_size=size, max_size=256)[0]
            separate.append(hflip_detections(mirrored, image.shape[-1]))
    expected = tta.merge(separate)
    assert len(found["boxes"]) > 0
    assert torch.equal(found["labels"], expected["labels"])
    torch.testing.assert_close(found["boxes"], expected["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(found["scores"], expected["scores"], atol=1e-5, rtol=0)


def test_one_size_without_flip_is_the_plain_model_and_mirroring_the_input_mirrors_the_output():
    torch.manual_seed(0)
    model = make_model(min_size_test=96, max_size_test=256, score_thresh_test=0.0).eval()
    image = IMAGES[0]
    with torch.no_grad():
        plain = model([image])[0]
        same = DetectorWithTTA(model, [96], 256, flip=False).eval()([image])[0]
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(same[key], plain[key]), key
        # with flip, an image and its mirror image give the same detections, mirrored
        tta = DetectorWithTTA(model, [96, 128], 256, flip=True).eval()
        found, mirrored = tta([image])[0], tta([image.flip(-1)])[0]
    assert len(found["boxes"]) > 0
    back = hflip_detections(mirrored, image.shape[-1])
    assert torch.allclose(back["boxes"], found["boxes"], atol=1e-3)
    assert torch.allclose(back["scores"], found["scores"], atol=1e-6)
    assert torch.equal(back["labels"], found["labels"])


def test_config_turns_it_on_and_checks_its_sizes(tmp_path):
    model = make_model()
    assert build_tta(load_config(None), model) is model  # off by default
    cfg = load_config(None, ["test.aug.enabled=true", "test.aug.min_sizes=[320,384]",
                             "test.aug.max_size=640", "test.aug.flip=false"])
    tta = build_tta(cfg, model)
    assert isinstance(tta, DetectorWithTTA) and tta.model is model
    assert (tta.min_sizes, tta.max_size, tta.flip) == ([320, 384], 640, False)
    with pytest.raises(ValueError, match=r"test\.aug\.min_sizes"):
        load_config(None, ["test.aug.min_sizes=[0]"])
    with pytest.raises(RuntimeError, match="inference"):
        DetectorWithTTA(model.train(), [96], 256)([IMAGES[0]])


@pytest.mark.slow  # trains 2 iterations
def test_training_evaluates_the_model_as_eval_py_runs_its_checkpoint(tmp_path, monkeypatch):
    """test.eval_period's evaluation ran the raw training model: test.aug (and test.amp) were
    ignored there, so metrics.jsonl's numbers were not eval.py's on the same checkpoint."""
    import detection.evaluation as evaluation
    from detection.data.image_io import read_image
    from detection.data.shapes import generate_shapes
    from detection.engine.inference_model import build_inference_model
    from detection.engine.trainer import train
    from tests.helpers import tiny_overrides

    generate_shapes(tmp_path / "data" / "shapes", num_train=4, num_val=2, seed=1, image_size=(64, 80))
    overrides = tiny_overrides(tmp_path / "data", tmp_path / "out", **{
        "solver.max_iter": 2, "test.eval_period": 2, "model.roi_heads.score_thresh_test": 0.0,
        "test.aug.enabled": True, "test.aug.min_sizes": [48, 64], "test.aug.max_size": 96, "test.aug.flip": True})
    evaluated = []
    real = evaluation.evaluate_test_sets

    def recording(datasets, **kwargs):
        evaluated.append(kwargs["model"])
        return real(datasets, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_test_sets", recording)
    cfg = load_config(None, overrides)
    train(cfg)
    (during_training,) = evaluated
    assert isinstance(during_training, DetectorWithTTA)
    as_eval_py, _ = build_inference_model(cfg, str(tmp_path / "out" / "model_final.pth"), torch.device("cpu"))
    image = torch.from_numpy(read_image(str(next((tmp_path / "data" / "shapes" / "val").iterdir()))))
    with torch.inference_mode():
        ours, theirs = (m([image.permute(2, 0, 1)])[0] for m in (during_training, as_eval_py))
    assert len(theirs["scores"]) > 0
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(ours[key], theirs[key]), key
