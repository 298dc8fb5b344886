"""The data section: training data-loader throughput (decode, augmentation, batching) and the
evaluation loop's time, on a synthetic shapes set written to a temporary folder or on the
--dataset given."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from typing import Any

import torch

from detection.benchmarking.meters import timed
from detection.benchmarking.models import ProposalRecorder, TimedModel, bench_config, build_ours
from detection.config import Config


def datasets(cfg: Config, args: argparse.Namespace, tmp: str) -> tuple[Any, Any]:
    """(training set, validation set): --dataset for both, or shapes sets generated in `tmp`
    at the image size, with enough training images for --loader-batches + 1 batches."""
    from detection.data.catalog import get_dataset
    from detection.data.shapes import generate_shapes

    if args.dataset:
        ds = get_dataset(args.dataset, cfg.datasets.root)
        return ds, ds
    h, w = args.image_size
    generate_shapes(os.path.join(tmp, "shapes"), num_train=cfg.solver.ims_per_batch * (args.loader_batches + 1),
                    num_val=args.eval_images, seed=0, image_size=(min(h, w), max(h, w)))
    return get_dataset("shapes_train", tmp), get_dataset("shapes_val", tmp)


def bench_loader(cfg: Config, train_ds: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s through the training loader (decode + augmentation + batching), after the
    first batch (worker start-up, timed apart)."""
    from detection.engine.trainer import build_train_data_loader

    batches = iter(build_train_data_loader(cfg, [train_ds]))
    first = timed(lambda: next(batches))
    start, images = time.perf_counter(), 0
    for _ in range(args.loader_batches):
        images += len(next(batches)[0])
    elapsed = time.perf_counter() - start
    del batches
    return {"first_batch_s": first, "images": images, "images_per_s": images / elapsed,
            "num_workers": cfg.dataloader.num_workers, "images_per_batch": cfg.solver.ims_per_batch}


def bench_eval(args: argparse.Namespace, val_ds: Any) -> dict[str, Any]:
    """The library's one test-set loop (evaluate_test_sets) on the validation images, with the
    model prepared as tools/eval.py prepares it (detection.engine.inference_model.prepare_for_inference:
    the fast path, test.amp and test-time augmentation as configured) and the config's loader
    workers (decoding overlaps the model): images to metrics and files; then the saved results
    scored again without the model, which is the metrics' share."""
    from detection.engine.inference_model import prepare_for_inference
    from detection.evaluation import evaluate_test_sets
    from detection.modeling.tta import DetectorWithTTA

    cfg = bench_config(args, [f"model.num_classes={len(val_ds.class_names)}"])
    prepared = prepare_for_inference(cfg, build_ours(cfg), torch.device(args.device), chunk_size=args.chunk_size)
    model = TimedModel(prepared)
    detector = prepared.model if isinstance(prepared, DetectorWithTTA) else prepared
    # the images through the detector's inference passes (test-time augmentation runs several)
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()), \
            ProposalRecorder(detector) as passes:  # redirected: the progress bar
        total = timed(lambda: evaluate_test_sets([val_ds], model=model, output_dir=out,
                                                 num_workers=cfg.dataloader.num_workers))
        metrics = timed(lambda: evaluate_test_sets([val_ds], results=out))
    n = len(val_ds.records)
    in_model = model.total_seconds()
    # where the time goes: the model's forward passes; scoring and writing the results files
    # (the re-scoring of the saved results); the rest: reading and decoding images, the loop
    return {"images": n, "total_s": total, "per_image_s": total / max(n, 1), "images_per_s": n / total,
            "model_s": in_model, "metrics_s": metrics, "other_s": max(0.0, total - in_model - metrics),
            "outside_model_share": 1 - in_model / total, "num_workers": cfg.dataloader.num_workers,
            "amp": bool(detector.amp),
            "passes_per_image": passes.images / max(n, 1)}
