"""The fast path's GPU levers (config group `accel`, detection/accel/levers.py), each off by
default: on the CPU, the sync-free postprocess gives the default path's detections, the CUDA
channels_last layout gives the same detections when applied here, the plan picks it on CUDA only,
and torch.compile (slow) gives the same detections. Their speed is measured on a GPU
(tools/benchmark.py --device cuda --levers)."""
import copy
import importlib.util
import logging
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchvision.ops import batched_nms

from detection.accel import COMPILE_MODES, InferencePlan, Levers, apply_plan, inference_plan, optimize_for_inference
from detection.accel import cudnn, graphs
from detection.accel.graphs import PaddedRes5, bucket
from detection.accel.levers import CompiledModule, compile_runner_head
from detection.accel.plan import ToChannelsLast
from detection.config import ConfigError
from detection.engine.inference_model import accel_levers, prepare_for_inference
from detection.modeling.model import build_model
from detection.modeling import syncfree
from detection.modeling.syncfree import grid_batched_nms
from detection.testing import DeviceWaits, HostReads, UnnamedDeviceCheck
from tests.helpers import IMAGES, TARGETS, make_model, paint, tiny_cfg
from tests.helpers import tiny_c4

ROOT = Path(__file__).resolve().parents[1]

# a third image, of another size, so the batch has three images with different valid regions
IMAGES3 = [*IMAGES, paint(80, 120, [((30, 10, 90, 70), (40, 200, 40))], 60)]


def as_set(det: dict) -> list[tuple]:
    """Detections as a sorted list of (label, score, box): order-free, exact values."""
    return sorted((int(label), float(score), tuple(box.tolist()))
                  for label, score, box in zip(det["labels"], det["scores"], det["boxes"]))


def assert_same_sets(ref: list[dict], other: list[dict]) -> None:
    assert len(ref) == len(other)
    for i, (a, b) in enumerate(zip(ref, other)):
        sa, sb = as_set(a), as_set(b)
        assert len(sa) == len(sb) > 0, f"image {i}: {len(sa)} against {len(sb)} detections"
        for x, y in zip(sa, sb):
            assert x[0] == y[0] and x[1] == pytest.approx(y[1], abs=1e-5), f"image {i}"
            assert x[2] == pytest.approx(y[2], abs=1e-3), f"image {i}"


def detections(model: torch.nn.Module, images=IMAGES3) -> list[dict]:
    with torch.inference_mode():
        return model(images)


def sync_free(model: torch.nn.Module) -> torch.nn.Module:
    model = copy.deepcopy(model)
    model.rpn.sync_free = model.roi_heads.sync_free = True
    return model


VARIANTS = {
    "default": {},
    "multi-scale": {"test.multi_scale.enabled": True, "test.multi_scale.sizes": [48, 64, 96],
                    "test.multi_scale.max_size": 160},
    "refinement without voting": {"test.box_refinement.enabled": True, "test.box_refinement.voting": False},
    "refinement with voting": {"test.box_refinement.enabled": True},  # the per-image path
    "global context": {"model.roi_heads.global_context": True},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sync_free_postprocess_gives_the_same_detections(tmp_path, variant):
    """Three images of different sizes, three classes, score threshold 0: many candidates per
    image and class, so NMS, the per-image top-k (15) and the image boundaries all matter."""
    cfg = tiny_cfg(tmp_path, tmp_path, **{"model.roi_heads.score_thresh_test": 0.0,
                                          "model.roi_heads.detections_per_image": 15, **VARIANTS[variant]})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ref = detections(model)
    assert_same_sets(ref, detections(sync_free(model)))


@pytest.mark.parametrize("post_k", [5, 150, 1000])
def test_sync_free_proposals_equal_the_default_ones_with_boxes_that_are_not_regions(post_k):
    """The RPN's selection over a batch whose top-k holds non-finite scores and deltas, boxes
    outside the image (clipped to nothing) and boxes below min_size: the same proposals, in the
    same order, for each image. NMS on prefixes: post-k of 5 out of 300 (the third image's 40
    best are not regions: its prefixes of 10, 20 and 40 boxes give no survivor, 80 does), of
    150 (NMS of all 300, fewer survivors) and of more than there are boxes."""
    torch.manual_seed(0)
    rpn = make_model().rpn.eval()
    rpn.min_size, rpn.post_nms_topk[False] = 4.0, post_k
    anchors = torch.rand(600, 4) * 200
    anchors[:, 2:] += anchors[:, :2] + 1  # some reach past the images (clipped), some tiny
    logits, deltas = torch.randn(3, 600), torch.randn(3, 600, 4)
    logits[0, :7] = float("nan")
    logits[1, 3] = float("inf")
    logits[2, 100:140] = float("nan")  # topk ranks NaN first
    deltas[2, :40, 2] = float("inf")
    sizes = [(96, 128), (40, 30), (112, 96)]
    ref = rpn.select_proposals(anchors, logits, deltas, sizes)
    rpn.sync_free = True
    got = rpn.select_proposals(anchors, logits, deltas, sizes)
    assert [len(p) for p in got] == [len(p) for p in ref] and all(len(p) for p in ref)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def host_reads(fn) -> int:
    with HostReads() as reads:
        fn()
    return reads.count


def by_function(reads: HostReads) -> Counter:
    """The reads counted per function of the project ("file:line function" -> function)."""
    counts = Counter()
    for place, count in reads.places.items():
        counts[place.split()[-1]] += count
    return counts


def _reads_and_not() -> dict[str, tuple]:
    """Calls that read the device (1) and look-alikes that do not (0)."""
    x = torch.rand(4, 3)
    mask, counts = x > 0.5, torch.tensor([1, 2, 0])
    boxes = torch.rand(5, 4)
    boxes[:, 2:] += 1
    return {"nonzero": (lambda: mask.nonzero(), 1), "nonzero as_tuple": (lambda: mask.nonzero(as_tuple=True), 1),
            "where(mask)": (lambda: torch.where(mask), 1), "where(mask, a, b)": (lambda: torch.where(mask, x, 0.0), 0),
            "argwhere": (lambda: torch.argwhere(mask), 1), "x[mask]": (lambda: x[mask], 1),
            "x[mask] = 0": (lambda: x.__setitem__(mask, 0.0), 0), "item": (lambda: x.sum().item(), 1),
            "bool": (lambda: bool(mask.any()), 1), "int": (lambda: int(counts.sum()), 1),
            "tolist": (lambda: counts.tolist(), 1), "unique": (lambda: torch.unique(counts), 1),
            "unique unsorted": (lambda: torch.unique(counts, sorted=False), 1),
            "repeat_interleave": (lambda: torch.repeat_interleave(x[:3], counts, dim=0), 1),
            "repeat_interleave output_size": (lambda: torch.repeat_interleave(x[:3], counts, dim=0, output_size=3), 0),
            "allclose": (lambda: torch.allclose(x, x), 1), "equal": (lambda: torch.equal(x, x), 1),
            "nms": (lambda: batched_nms(boxes, torch.rand(5), torch.zeros(5, dtype=torch.int64), 0.5), 1),
            "bincount": (lambda: torch.bincount(counts), 1)}


@pytest.mark.parametrize("mode", ["enable_grad", "no_grad", "inference_mode"])
def test_host_reads_counts_each_read_once_in_every_grad_mode(mode):
    """Under inference_mode (the benchmark's and the tools' inference) the dispatcher sees some
    composite ops whole (`.item()` as aten.item, `nonzero(as_tuple=True)` as nonzero_numpy): the
    box head's nonzero and every `.item()` there went uncounted until they were named."""
    with getattr(torch, mode)():
        counted = {name: host_reads(fn) for name, (fn, _) in _reads_and_not().items()}
    assert counted == {name: reads for name, (_, reads) in _reads_and_not().items()}


@torch.library.custom_op("c4det_test::waits", mutates_args=())
def _waiting_op(x: torch.Tensor) -> torch.Tensor:
    """An op whose kernel warns as CUDA's sync debug mode does (from its own frame, not the caller's)."""
    warnings.warn("called a synchronizing CUDA operation")
    return x.clone()


def test_device_waits_places_each_wait_at_the_projects_line(tmp_path):
    """The GPU suite compares CUDA's own waits with HostReads' count, place by place. A wait's
    warning names the frame that called the op: a library's where a Python wrapper called it
    (torch.ops' __call__ under torchvision's nms), HostReads' dispatch while HostReads is active.
    DeviceWaits places each at the project's line, as HostReads does, and keeps the library frames
    between; the mode is switched on and back off, other warnings pass through."""
    library = tmp_path / "library_with_waits.py"
    library.write_text("import warnings\n\ndef nms(x):\n    warnings.warn('synchronizing in nms')\n"
                       "    warnings.warn('synchronizing again in nms')\n")
    spec = importlib.util.spec_from_file_location("library_with_waits", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    project_file = str(ROOT / "detection" / "waits_check.py")  # code the counters take for the project's
    namespace = {}
    exec(compile("import warnings\ndef step(library, op, x):\n    library.nms(x)\n"
                 "    warnings.warn('synchronizing here')\n    warnings.warn('something else')\n"
                 "    return op(x)\n", project_file, "exec"), namespace)
    modes = []
    with warnings.catch_warnings(record=True) as passed:
        warnings.simplefilter("always")
        with DeviceWaits(set_mode=modes.append) as waits, HostReads():
            namespace["step"](module, _waiting_op, torch.ones(2))
    assert modes == ["warn", "default"]
    assert [str(w.message) for w in passed] == ["something else"]
    place = "detection/waits_check.py:{} step".format
    assert [p for p, _ in waits.waits] == [place(3), place(3), place(4), place(6)]
    assert waits.waits[0][1] == (str(library),) and waits.waits[2][1] == ()
    assert str(ROOT / "detection" / "testing.py") not in waits.waits[3][1] and waits.waits[3][1]
    assert waits.places == Counter({place(3): 2, place(4): 1, place(6): 1})
    handler, filters = warnings.showwarning, list(warnings.filters)

    def no_cuda(mode):
        raise RuntimeError("Found no NVIDIA driver on your system")
    with pytest.raises(RuntimeError, match="NVIDIA driver"), DeviceWaits(set_mode=no_cuda):
        pass
    assert warnings.showwarning is handler and warnings.filters == filters  # as they were


def test_sync_free_postprocess_reads_the_device_fewer_times():
    """The box head: one nonzero, one NMS and one read of the per-image counts for the whole
    batch (the default path: a nonzero and an NMS per image); the RPN: one read for the batch
    (how many boxes are not regions) and NMS per image (the default path: one nonzero for all
    its filters and NMS per image)."""
    torch.manual_seed(0)
    model = make_model().eval()
    heads, rpn = model.roi_heads, model.rpn
    xy = [torch.rand(30, 2, 2) * 50 for _ in range(3)]
    boxes, scores = [torch.cat([p, p + 10], -1) for p in xy], [torch.rand(30, 2) for _ in range(3)]
    per_image = host_reads(lambda: [heads.detect_image(b, s, 0.5) for b, s in zip(boxes, scores)])
    batched = host_reads(lambda: syncfree.detect(boxes, scores, score_thresh=0.05, nms_thresh=0.5,
                                                 detections_per_image=100))
    assert (per_image, batched) == (6, 3)
    anchors = torch.rand(600, 4) * 60
    anchors[:, 2:] += anchors[:, :2] + 1
    args = (anchors, torch.randn(3, 600), torch.randn(3, 600, 4), [(96, 128)] * 3)
    default = host_reads(lambda: rpn.select_proposals(*args))
    rpn.sync_free = True
    assert (default, host_reads(lambda: rpn.select_proposals(*args))) == (6, 4)


def test_cuda_levers_on_a_cpu_model_say_they_do_nothing(caplog):
    """A config written for a GPU machine, run on a CPU one: the CUDA levers it sets are named in
    one warning; the CPU's plan is unchanged; sync_free_postprocess (any device) is not named."""
    model = make_model().eval()
    with caplog.at_level(logging.WARNING, logger="detection.accel.levers"):
        optimize_for_inference(model, levers=Levers(cuda_graphs=True, cuda_hoist=True, sync_free_postprocess=True))
    assert [r.getMessage() for r in caplog.records] == [
        "accel.cuda_graphs, accel.cuda_hoist: CUDA levers, and the model is on cpu: they do nothing here"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="detection.accel.levers"):
        optimize_for_inference(model, levers=Levers(sync_free_postprocess=True))
    assert caplog.records == []


def test_a_training_step_reads_the_device_once_per_batch_and_sampler_and_twice_per_image():
    """A training step of two images reads the device 8 times (36 before the loss side was
    written as masks, 10 while the samplers read per image): once for the targets' checks and
    once for the images' 0..1 check (for the batch), per image one nonzero and one NMS for the
    RPN's proposals, and in each of the two samplers (RPN, RoI head) one read of every image's
    positive and negative counts. The losses, the RoI labels and the backward read nothing: a
    boolean mask index there (one more read in the backward) would show here."""
    torch.manual_seed(0)
    model = make_model(global_context=True).train()  # its whole-image boxes and counts: no reads
    images = [image.float() for image in IMAGES]
    with HostReads() as reads:
        sum(model(images, TARGETS).values()).backward()
    assert by_function(reads) == {"validate_targets": 1, "_check_images": 1, "select_proposals": 2,
                                  "first_nms_survivors": 2, "subsample_batch": 2}, reads.places


def test_inference_reads_the_device_per_image_by_default_and_per_batch_sync_free():
    """Inference of three images under torch.inference_mode (as the tools run it), with
    detections in every image: the default path reads per image the RPN's nonzero and NMS and
    the box head's nonzero and NMS, and once per batch for the rescale; the sync-free path reads
    once per batch for the RPN's non-regions, NMS per image, and three times per batch for the
    box head (nonzero, NMS, counts)."""
    torch.manual_seed(0)
    model = make_model(score_thresh_test=0.0).eval()

    def reads_by_function(model) -> Counter:
        with torch.inference_mode(), HostReads() as reads:
            dets = model(IMAGES3)
        assert all(len(d["boxes"]) for d in dets)
        return by_function(reads)

    assert reads_by_function(model) == {"select_proposals": 3, "first_nms_survivors": 3, "detect_image": 6,
                                        "rescale_detections": 1}
    assert reads_by_function(sync_free(model)) == {"select_proposals": 1, "_first_valid_survivors": 3,
                                                   "grid_batched_nms": 1, "detect": 2, "rescale_detections": 1}


def test_the_gather_pooling_plan_reads_the_device_twice_for_both_axes():
    """The Res5Runner's pooling plan (CUDA's training path, the CPU's fast path) reads the most
    samples per bin and the widest window once for both axes (it read each per axis)."""
    from detection.accel.gather import pool_plan

    xy = torch.rand(40, 2) * 200
    rois = torch.cat([torch.zeros(40, 1), xy, xy + torch.rand(40, 2) * 300], dim=1)
    assert host_reads(lambda: pool_plan(rois, (25, 34), 14, 1 / 16, stride=2)) == 2


def test_grid_batched_nms_keeps_what_nms_per_group_keeps():
    torch.manual_seed(1)
    xy = torch.rand(400, 2) * 100
    boxes = torch.cat([xy, xy + torch.rand(400, 2) * 40 + 1], dim=1)
    scores, groups = torch.rand(400), torch.randint(0, 37, (400,))
    got = grid_batched_nms(boxes, scores, groups, 37, 0.5)
    want = batched_nms(boxes, scores, groups, 0.5)
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert torch.all(scores[got][:-1] >= scores[got][1:])  # sorted by score
    assert grid_batched_nms(boxes[:0], scores[:0], groups[:0], 37, 0.5).shape == (0,)


def test_sync_free_with_no_detection_above_the_threshold(tmp_path):
    cfg = tiny_cfg(tmp_path, tmp_path, **{"model.roi_heads.score_thresh_test": 0.999})
    model = build_model(cfg).eval()
    dets = detections(sync_free(model))
    assert [len(d["boxes"]) for d in dets] == [0, 0, 0]
    assert dets[0]["boxes"].shape == (0, 4) and dets[0]["labels"].dtype == torch.int64


def test_the_accel_config_reaches_the_fast_path(tmp_path):
    """accel.* keys -> Levers -> the prepared model; off by default; a wrong mode is one ConfigError."""
    cfg = tiny_cfg(tmp_path, tmp_path)
    assert accel_levers(cfg) == Levers()
    default = prepare_for_inference(cfg, build_model(cfg), torch.device("cpu"))
    assert not default.rpn.sync_free and not default.roi_heads.sync_free
    cfg = tiny_cfg(tmp_path, tmp_path, **{"accel.sync_free_postprocess": True, "accel.compile": "max-autotune"})
    assert accel_levers(cfg) == Levers(sync_free_postprocess=True, compile="max-autotune")
    assert accel_levers(tiny_cfg(tmp_path, tmp_path, **{"accel.compile": True})).compile == "default"
    cfg.accel.compile = False
    prepared = prepare_for_inference(cfg, build_model(cfg), torch.device("cpu"))
    assert prepared.rpn.sync_free and prepared.roi_heads.sync_free
    with pytest.raises(ConfigError, match="accel.compile: 'fastest' is not one of false, true, default, "):
        tiny_cfg(tmp_path, tmp_path, **{"accel.compile": "fastest"})
    for mode in COMPILE_MODES:  # the config accepts every mode the fast path knows
        assert accel_levers(tiny_cfg(tmp_path, tmp_path, **{"accel.compile": mode})).compile == mode


def test_channels_last_lever_is_chosen_on_cuda_only(tmp_path):
    """The plan: NHWC trunk and res5 on CUDA with the lever, not without; the CPU's plan is the
    same with and without it. A model on "meta" (standing in for CUDA) gets NHWC weights and a
    res5 that takes RoIAlign's NCHW output to NHWC, and no CPU kernel."""
    for bf16 in (False, True):
        for small in (False, True):
            cpu = inference_plan("cpu", bf16=bf16, small_maps=small)
            assert inference_plan("cpu", bf16=bf16, small_maps=small, cuda_channels_last=True) == cpu
    on = inference_plan("cuda", bf16=True, small_maps=True, cuda_channels_last=True)
    assert on == InferencePlan(fold_bn=True, channels_last=True, res5_channels_last=True, small_map_taps=False,
                               fuse=False, winograd=False, runner=False, chunked=False)
    assert not inference_plan("cuda").channels_last
    model = build_model(tiny_cfg(tmp_path, tmp_path, **{"model.backbone.norm": "bn"})).eval().to("meta")
    fast = optimize_for_inference(model, levers=Levers(cuda_channels_last=True))
    assert fast.roi_heads.res5_runner is None
    assert isinstance(fast.trunk[0], ToChannelsLast) and isinstance(fast.roi_heads.res5[0], ToChannelsLast)
    assert fast.trunk.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.roi_heads.res5[1].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.rpn.head.conv.weight.is_contiguous(memory_format=torch.channels_last)
    plain_layout = optimize_for_inference(model)
    assert not isinstance(plain_layout.roi_heads.res5[0], ToChannelsLast)


def test_the_cuda_channels_last_layout_gives_the_same_detections_on_the_cpu(tmp_path):
    """The CUDA plan with the lever (folded BN, NHWC trunk, RPN and res5, roi_align pooling)
    applied to a CPU model: the plain path's detections."""
    cfg = tiny_cfg(tmp_path, tmp_path, **{"model.backbone.norm": "bn", "model.roi_heads.score_thresh_test": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    plan = inference_plan("cuda", cuda_channels_last=True)
    nhwc = apply_plan(copy.deepcopy(model).requires_grad_(False), plan)
    assert isinstance(nhwc.roi_heads.res5[0], ToChannelsLast)
    assert_same_sets(detections(model), detections(nhwc))


def test_padded_rois_never_reach_the_detections(tmp_path):
    """cuda_graphs' padding (device-neutral; the capture itself is CUDA's, tests/test_cuda.py):
    res5 on RoI counts padded up to a multiple of 64 with NaN rows gives the same detections
    (rows are independent in eval mode and the padding is cut off), for every image count."""
    assert [bucket(n) for n in (0, 1, 64, 65, 1000, 8000)] == [64, 64, 64, 128, 1024, 8000]
    cfg = tiny_cfg(tmp_path, tmp_path, **{"model.roi_heads.score_thresh_test": 0.0,
                                          "model.roi_heads.global_context": True})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    padded = copy.deepcopy(model)
    padded.roi_heads.res5 = PaddedRes5(padded.roi_heads.res5, graphs=True, fill=float("nan"))  # no CUDA: eager
    pooled = torch.randn(5, 256, 6, 6)
    with torch.inference_mode():
        assert padded.roi_heads.res5(pooled).shape == model.roi_heads.res5(pooled).shape == (5, 512, 3, 3)
    for images in (IMAGES3[:1], IMAGES3):
        assert_same_sets(detections(model, images), detections(padded, images))


class ReplayedOnCpu(PaddedRes5):
    """PaddedRes5's replay bookkeeping on the CPU: a "graph" whose replay recomputes res5 on the
    captured input buffer into the captured output, as a CUDA graph's replay does on the GPU."""

    def replays(self, x):
        return True

    def capture(self, example):
        static_in = {k: t.clone() for k, t in example.items()} if isinstance(example, dict) else example.clone()
        static_out = self.res5(static_in)
        self.captures = getattr(self, "captures", 0) + 1
        return SimpleNamespace(replay=lambda: static_out.copy_(self.res5(static_in))), static_in, static_out


def test_graph_replays_take_each_calls_rois_and_only_them():
    """cuda_graphs' buffers (the capture itself is CUDA's, tests/test_cuda.py): each call's RoIs
    are copied into its bucket's input buffer, the rest of the buffer is the padding (no RoI of an
    earlier, larger call is left in it), the output is a copy the next replay cannot overwrite, one
    capture per bucket (and per inference mode), and at most MAX_GRAPHS are captured (then eager)."""
    torch.manual_seed(0)
    res5 = torch.nn.Conv2d(4, 3, 1)
    graphed = ReplayedOnCpu(res5, graphs=True, granularity=8, fill=float("nan"))
    with torch.inference_mode():
        first = torch.randn(7, 4, 2, 2)
        out_first = graphed(first)
        torch.testing.assert_close(out_first, res5(first))
        second = torch.randn(3, 4, 2, 2)  # the same bucket (8 rows)
        torch.testing.assert_close(graphed(second), res5(second))
        (_, static_in, _), = graphed.graphs.values()
        assert static_in[3:].isnan().all() and graphed.captures == 1
        torch.testing.assert_close(out_first, res5(first))  # not overwritten by the second replay
        assert graphed(torch.randn(9, 4, 2, 2)).shape == (9, 3, 2, 2)
        assert graphed.captures == 2 and sorted(k[0] for k in graphed.graphs) == [8, 16]
    with torch.no_grad():  # outside inference mode: buffers of its own (an inference tensor is read-only here)
        x = torch.randn(5, 4, 2, 2)
        torch.testing.assert_close(graphed(x), res5(x))
    assert graphed.captures == 3
    with torch.inference_mode():
        for count in range(17, 8 * (graphs.MAX_GRAPHS + 3), 8):
            x = torch.randn(count, 4, 2, 2)
            torch.testing.assert_close(graphed(x), res5(x))
    assert graphed.captures == len(graphed.graphs) == graphs.MAX_GRAPHS


def test_threads_sharing_a_graph_get_their_own_rois_results():
    """A graph's input and output buffers are shared by every call: two threads of a service (one
    Predictor) filled them in turn and read each other's results (a serving trial's reading of the
    code). The fill, replay and read are one step now."""
    import threading
    import time

    class SlowReplay(ReplayedOnCpu):
        def capture(self, example):
            graph, static_in, static_out = super().capture(example)
            replay = graph.replay

            def slow():  # a GPU replay returns at once and the host goes on: the window another thread hits
                time.sleep(0.002)
                replay()
            return SimpleNamespace(replay=slow), static_in, static_out

    torch.manual_seed(0)
    res5 = torch.nn.Conv2d(4, 3, 1)
    graphed = SlowReplay(res5, graphs=True, granularity=8, fill=0.0)
    wrong = []

    def serve(seed):
        generator = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            for _ in range(15):
                x = torch.randn(5, 4, 2, 2, generator=generator)
                if not torch.allclose(graphed(x), res5(x)):
                    wrong.append(seed)

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong and graphed.captures == 1


def test_a_graph_captured_with_tf32_is_not_replayed_without_it():
    """A replay runs the kernels its capture chose: the benchmark's check (TF32 off, to compare the
    code and not TF32's rounding) replayed the graph its timed call had captured with TF32, and
    found other detections than the plain path's for a lever that changes none. Each TF32
    setting now gets its own graph."""
    from detection.utils.comm import tf32_set

    res5 = torch.nn.Conv2d(4, 3, 1)
    graphed = ReplayedOnCpu(res5, graphs=True, granularity=8)
    x = torch.randn(5, 4, 2, 2)
    with torch.inference_mode():
        with tf32_set(True):  # the timed call's setting (the config's tf32: true)
            graphed(x)
            with tf32_set(False, matmul=False):  # the check's
                graphed(x)
        with tf32_set(False):
            graphed(x)
        with tf32_set(True):
            graphed(x)  # the first graph again
    assert graphed.captures == len(graphed.graphs) == 3


def test_the_cuda_hoist_lever_is_chosen_on_cuda_only():
    """The plan: on CUDA with cuda_hoist the Res5Runner (hoisted 1x1 convs, gather pooling) with
    no chunks (one res5 call per batch, not one per 64 RoIs) and no CPU kernel; without it none;
    the CPU's plan is the same with and without it. A model on "meta" stands in for CUDA."""
    for bf16 in (False, True):
        for small in (False, True):
            cpu = inference_plan("cpu", bf16=bf16, small_maps=small)
            assert cpu.runner and cpu.chunked
            assert inference_plan("cpu", bf16=bf16, small_maps=small, cuda_hoist=True) == cpu
    assert inference_plan("cuda", bf16=True, cuda_hoist=True) == InferencePlan(
        fold_bn=True, channels_last=False, res5_channels_last=False, small_map_taps=False, fuse=False,
        winograd=False, runner=True, chunked=False)
    assert not inference_plan("cuda").runner
    model = tiny_c4().to("meta")  # bottleneck blocks: 1x1 conv first (ResNet-18's are not hoisted)
    fast = optimize_for_inference(model, levers=Levers(cuda_hoist=True, cuda_channels_last=True))
    runner = fast.roi_heads.res5_runner
    assert runner is not None and runner.hoist and runner.chunk_size is None and runner.channels_last
    assert runner.head_fn is None  # cuda_graphs off; and never off CUDA (below)
    assert type(fast.roi_heads.res5[0]).__name__ == "Bottleneck"  # no oneDNN post-ops
    assert not hasattr(fast.roi_heads.res5[1].conv2, "winograd_weight")
    on_cpu = optimize_for_inference(tiny_c4(), levers=Levers(cuda_hoist=True, cuda_graphs=True))
    assert on_cpu.roi_heads.res5_runner.head_fn is None and on_cpu.roi_heads.res5_runner.chunk_size == 64


@pytest.mark.parametrize("nhwc", [False, True], ids=["nchw", "cuda_channels_last"])
def test_the_cuda_hoist_plan_gives_the_same_detections_on_the_cpu(nhwc):
    """CUDA's plan with cuda_hoist (folded BN, res5's first 1x1 convs on the map, gather pooling,
    all RoIs in one res5 call), applied to a CPU model with bottleneck blocks: the plain path's
    detections; and with its head replayed through cuda_graphs' padded buffers (a CPU stand-in
    for the graph, NaN padding), the same again, one capture for the batch's bucket."""
    model = tiny_c4()
    images = [IMAGES3[0], IMAGES3[2]]
    plan = inference_plan("cuda", cuda_channels_last=nhwc, cuda_hoist=True)
    hoisted = apply_plan(copy.deepcopy(model).requires_grad_(False), plan)
    runner = hoisted.roi_heads.res5_runner
    assert runner.hoist and runner.chunk_size is None and runner.channels_last == nhwc
    ref = detections(model, images)
    assert_same_sets(ref, detections(hoisted, images))
    runner.head_fn = ReplayedOnCpu(runner.head, graphs=True, fill=float("nan"))
    assert_same_sets(ref, detections(hoisted, images))
    (_, static_in, _), = runner.head_fn.graphs.values()
    assert set(static_in) == {"conv1", "shortcut"} and runner.head_fn.captures == 1
    # the buffers keep the pooling's NHWC layout (an NCHW one: a strided copy per call)
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
               for t in static_in.values())


def _conv_relu(x, *, weight, bias, stride, padding, dilation, groups):
    """CPU stand-in of aten::cudnn_convolution_relu (its argument names): relu(conv(x) + bias)."""
    return torch.relu(torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups))


def _conv_add_relu(x, *, weight, z, alpha, bias, stride, padding, dilation, groups):
    """CPU stand-in of aten::cudnn_convolution_add_relu: relu(conv(x) + alpha * z + bias)."""
    return torch.relu(torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups) + alpha * z)


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """The fused blocks' cuDNN path run on the CPU, with the stand-in ops."""
    monkeypatch.setattr(cudnn, "DEVICES", ("cpu",))
    monkeypatch.setattr(cudnn, "OPS", {"relu": _conv_relu, "add_relu": _conv_add_relu})


def test_the_cudnn_calls_bind_to_atens_schemas():
    """The real ops, called as conv_bias_relu calls them, on CPU tensors: the dispatcher gets as
    far as finding no CPU kernel (a wrong argument name or order fails earlier, as a schema error)."""
    conv = torch.nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        for residual in (None, torch.randn(1, 3, 5, 5)):
            with pytest.raises(NotImplementedError, match="from the 'CPU' backend"):
                cudnn.conv_bias_relu(x, conv, relu=True, residual=residual)


def test_cudnn_conv_bias_relu_arithmetic_and_casts(cudnn_on_cpu):
    """conv_bias_relu (stand-in ops): relu(conv + bias [+ residual]) and, without relu, conv +
    bias [+ residual]; strided and grouped geometry passed on; under autocast the input, weight,
    bias and residual in the autocast dtype (the weights cast once and kept, again after a change)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2).requires_grad_(False)
    x, z = torch.randn(2, 8, 9, 9), torch.randn(2, 6, 5, 5)
    plain = conv(x)
    for relu in (True, False):
        for residual in (None, z):
            want = plain + (0 if residual is None else residual)
            got = cudnn.conv_bias_relu(x, conv, relu=relu, residual=residual)
            torch.testing.assert_close(got, want.relu() if relu else want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cudnn.compute_dtype(x) == torch.bfloat16 and cudnn.fusable(x, conv)
        got = cudnn.conv_bias_relu(x, conv, relu=True, residual=z)
        kept = conv._cudnn_cast[1]
        assert got.dtype == kept.dtype == torch.bfloat16
        assert cudnn.conv_bias_relu(x, conv, relu=True) is not None and conv._cudnn_cast[1] is kept
        torch.testing.assert_close(got.float(), (plain + z).relu(), atol=0.1, rtol=0.05)
        conv.weight.mul_(2)  # a changed weight is cast again
        cudnn.conv_bias_relu(x, conv, relu=True)
        assert conv._cudnn_cast[1] is not kept
    assert cudnn.compute_dtype(x) == torch.float32
    assert not cudnn.fusable(x.bfloat16(), conv)  # no autocast: x and the weight must agree
    with torch.inference_mode():  # weights folded under inference_mode keep no version counter
        folded = torch.nn.Conv2d(8, 6, 3, padding=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cudnn.conv_bias_relu(x, folded, relu=True).dtype == torch.bfloat16


def test_a_conv_cudnn_cannot_fuse_runs_unfused_with_one_warning(cudnn_on_cpu, caplog, monkeypatch):
    """cuDNN may find no engine for a fusion (shape, dtype, version): that conv runs the unfused
    ops from then on (the same values), one warning for every conv that fails so; a missing kernel
    (NotImplementedError) or out of memory is raised as it is."""
    calls = []

    def refuses(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore")

    torch.manual_seed(0)
    conv, other = torch.nn.Conv2d(4, 3, 1).requires_grad_(False), torch.nn.Conv2d(4, 3, 1).requires_grad_(False)
    x, z = torch.randn(1, 4, 5, 5), torch.randn(1, 3, 5, 5)
    cudnn.OPS["add_relu"] = refuses
    monkeypatch.setattr(cudnn, "FALLBACKS_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="detection.accel.cudnn"):
        for _ in range(3):
            torch.testing.assert_close(cudnn.conv_bias_relu(x, conv, relu=True, residual=z), (conv(x) + z).relu())
        torch.testing.assert_close(cudnn.conv_bias_relu(x, conv, relu=True), conv(x).relu())  # this conv: unfused
        torch.testing.assert_close(cudnn.conv_bias_relu(x, other, relu=True, residual=z), (other(x) + z).relu())
    assert len(calls) == 2 and len(caplog.records) == 1  # each conv tried once; the same reason said once
    assert "CUDNN_STATUS_NOT_SUPPORTED" in caplog.text and "(3, 4, 1, 1) conv" in caplog.text
    assert "more" not in caplog.text
    for error in (NotImplementedError("no CPU kernel"), torch.cuda.OutOfMemoryError("CUDA out of memory")):
        def raises(*args, _error=error, **kwargs):
            raise _error
        cudnn.OPS["relu"] = raises
        with pytest.raises(type(error)):
            cudnn.conv_bias_relu(x, torch.nn.Conv2d(4, 3, 1).requires_grad_(False), relu=True)


def test_the_cuda_fused_relu_lever_is_chosen_on_cuda_only():
    """The plan: the fused blocks on CUDA with cuda_fused_relu (and folding), never Winograd
    there; the CPU's plan is the same with and without it. A "meta" model stands in for CUDA."""
    for bf16 in (False, True):
        cpu = inference_plan("cpu", bf16=bf16)
        assert inference_plan("cpu", bf16=bf16, cuda_fused_relu=True) == cpu
    on = inference_plan("cuda", cuda_fused_relu=True)
    assert on.fuse and not on.winograd and not on.runner
    assert not inference_plan("cuda").fuse and not inference_plan("cuda", fold_bn=False, cuda_fused_relu=True).fuse
    fast = optimize_for_inference(tiny_c4().to("meta"), levers=Levers(cuda_fused_relu=True, cuda_hoist=True))
    assert type(fast.trunk.stem).__name__ == "FusedStem" and type(fast.rpn.head).__name__ == "FusedRPNHead"
    assert {type(b).__name__ for b in fast.roi_heads.res5} == {"FusedBottleneck"}
    assert not any(hasattr(m, "winograd_weight") for m in fast.modules())


@pytest.mark.parametrize("hoist", [False, True], ids=["res5", "hoisted"])
def test_the_cuda_fused_relu_plan_gives_the_same_detections_through_the_cudnn_path(cudnn_on_cpu, hoist):
    """CUDA's plan with cuda_fused_relu (and NHWC; with cuda_hoist too) applied to a CPU model whose
    fused blocks call the cuDNN path (stand-in ops): the plain path's detections, every conv of
    the stem, the blocks and the RPN head gone through conv_bias_relu."""
    model = tiny_c4()
    images = [IMAGES3[0], IMAGES3[2]]
    plan = inference_plan("cuda", cuda_channels_last=True, cuda_hoist=hoist, cuda_fused_relu=True)
    fused = apply_plan(copy.deepcopy(model).requires_grad_(False), plan)
    calls = []
    for name, op in list(cudnn.OPS.items()):
        cudnn.OPS[name] = lambda *a, _op=op, _name=name, **k: calls.append(_name) or _op(*a, **k)
    assert_same_sets(detections(model, images), detections(fused, images))
    # one batch: the stem's conv and the RPN head's with ReLU; four bottlenecks (res3, res4, two in res5),
    # each conv1 and conv2 with ReLU, conv3 with the shortcut's add (hoisted: res5's first conv1 runs on
    # the map, unfused)
    assert calls.count("add_relu") == 4 and calls.count("relu") == 2 + 4 * 2 - hoist


def test_cudas_plan_with_the_levers_names_every_device(cudnn_on_cpu):
    """CUDA's inference plan with cuda_channels_last, cuda_hoist and cuda_fused_relu (cuDNN's
    ops by CPU stand-ins), its head through cuda_graphs' padding and the sync-free postprocess,
    applied to a CPU model: nothing is made on the default device (tests/test_devices.py's check;
    on a GPU such a tensor would meet CUDA ones)."""
    model = tiny_c4()
    plan = inference_plan("cuda", cuda_channels_last=True, cuda_hoist=True, cuda_fused_relu=True)
    with UnnamedDeviceCheck() as check:
        fast = apply_plan(copy.deepcopy(model).requires_grad_(False), plan)
        fast.rpn.sync_free = fast.roi_heads.sync_free = True
        fast.roi_heads.res5_runner.head_fn = ReplayedOnCpu(fast.roi_heads.res5_runner.head, graphs=True)
        dets = detections(fast, [IMAGES3[0], IMAGES3[2]])
    assert sum(len(d["boxes"]) for d in dets) > 0
    assert check.found == [], f"tensors made without naming their device: {check.found}"


@pytest.mark.parametrize("variant", [*VARIANTS, "RoIPool"])
def test_cudas_plan_with_the_levers_gives_the_same_detections_in_every_variant(tmp_path, cudnn_on_cpu, variant):
    """CUDA's plan with cuda_hoist, cuda_channels_last and cuda_fused_relu (cuDNN's ops by CPU
    stand-ins), its head replayed through cuda_graphs' NaN-padded buffers (the CPU stand-in), on
    trainable-BN ResNet-18 models (the runner pools the C4 map: basic blocks are not hoisted): the
    plain path's detections with multi-scale testing, box refinement, global context and RoIPool."""
    extra = {"model.roi_heads.pooler": "roi_pool"} if variant == "RoIPool" else VARIANTS[variant]
    cfg = tiny_cfg(tmp_path, tmp_path, **{"model.backbone.norm": "bn", "model.roi_heads.score_thresh_test": 0.0,
                                          **extra})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    plan = inference_plan("cuda", cuda_channels_last=True, cuda_hoist=True, cuda_fused_relu=True)
    fast = apply_plan(copy.deepcopy(model).requires_grad_(False), plan)
    runner = fast.roi_heads.res5_runner
    runner.head_fn = ReplayedOnCpu(runner.head, graphs=True, fill=float("nan"))
    assert_same_sets(detections(model), detections(fast))
    assert runner.head_fn.captures >= 1 and type(fast.roi_heads.res5[0]).__name__ == "FusedBasicBlock"


def test_a_copied_runner_runs_its_own_res5_eagerly():
    """A deep copy of a model whose Res5Runner has a head_fn (cuda_graphs' PaddedRes5, compile's
    compiled head) leaves head_fn out: a compiled function would still call the original runner's
    head, the other model's res5, and CUDA graphs cannot be copied. The copy's runner runs the
    copy's res5."""
    model = tiny_c4()
    fast = apply_plan(copy.deepcopy(model).requires_grad_(False), inference_plan("cuda", cuda_hoist=True))
    runner = fast.roi_heads.res5_runner
    runner.head_fn = CompiledModule(runner.head, "default", "res5 head")  # not called: nothing compiles
    clone = copy.deepcopy(fast)
    assert clone.roi_heads.res5_runner.head_fn is None and runner.head_fn is not None
    assert clone.roi_heads.res5_runner.res5 is clone.roi_heads.res5 is not fast.roi_heads.res5
    images = [IMAGES3[0]]
    runner.head_fn = None
    assert_same_sets(detections(fast, images), detections(clone, images))


@pytest.mark.slow  # torch.compile: seconds here
def test_a_compiled_runner_head_gives_the_same_detections(caplog):
    """accel.compile with cuda_hoist off the CPU compiles the Res5Runner's head (res5 after the
    pooling; levers.compile_runner_head): CUDA's plan applied on the CPU with it, bottleneck
    blocks, the plain path's detections, its compile time logged."""
    model = tiny_c4()
    fast = apply_plan(copy.deepcopy(model).requires_grad_(False), inference_plan("cuda", cuda_hoist=True))
    compile_runner_head(fast.roi_heads.res5_runner, "default")
    images = [IMAGES3[0], IMAGES3[2]]
    with caplog.at_level(logging.INFO, logger="detection.accel.levers"):
        assert_same_sets(detections(model, images), detections(fast, images))
    assert "torch.compile (mode default) of the res5 head (the runner's) took" in caplog.text


def test_cuda_graphs_lever_is_cuda_only(tmp_path):
    model = build_model(tiny_cfg(tmp_path, tmp_path)).eval()
    on_cpu = optimize_for_inference(model, levers=Levers(cuda_graphs=True))
    on_meta = optimize_for_inference(model.to("meta"), levers=Levers(cuda_graphs=True))
    assert not any(isinstance(m, PaddedRes5) for m in [*on_cpu.modules(), *on_meta.modules()])


@pytest.mark.slow
def test_compiled_fast_path_gives_the_same_detections_and_logs_its_compile_time(tmp_path, caplog):
    """torch.compile (needs a C++ compiler on the CPU) of the trunk (res5 runs in the CPU's
    Res5Runner here), ResNet-18, one image."""
    cfg = tiny_cfg(tmp_path, tmp_path, **{"model.roi_heads.score_thresh_test": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    fast = optimize_for_inference(model, levers=Levers(compile="default"))
    assert isinstance(fast.trunk, CompiledModule)
    with caplog.at_level(logging.INFO, logger="detection.accel.levers"):
        got = detections(fast, IMAGES[:1])
    assert_same_sets(detections(optimize_for_inference(model), IMAGES[:1]), got)
    assert [r.message for r in caplog.records if "torch.compile" in r.message][0].startswith(
        "accel.compile: torch.compile (mode default) of the trunk took")
