#!/usr/bin/env python
"""Draw detections (or a data set's annotations) on images.

    python tools/visualize.py --config CFG --weights CKPT --input PATH --output DIR [--score-thresh 0.5]
    python tools/visualize.py --config CFG --gt --output DIR [--limit 20]          # inspect a data set
    python tools/visualize.py --config CFG --weights CKPT --compare --output DIR    # ground truth | predictions
    python tools/visualize.py --weights CKPT --input 'imgs/**/*' --output DIR --no-draw   # detections.jsonl only
    python tools/visualize.py --config CFG --train-batches 4 --output DIR          # what training sees
    python tools/visualize.py --weights CKPT --input clip.mp4 --output DIR          # a video, frame by frame
    python tools/visualize.py --config CFG --results output/run/inference --compare --output DIR  # saved results

--results PATH draws the detections eval.py saved (what `eval.py --results` takes: a results
folder, a test set's folder in it, a coco_results.json or a folder of comp4 files) on the data set's
images (the config's first test set, or --dataset NAME), alone or with --compare beside the ground
truth: no model is run (Detectron2's visualize_json_results.py). Its boxes are drawn as saved, at
--score-thresh; a results file whose image ids are none of the set's is refused (made on another set).

--train-batches N draws the first N batches the training loader gives (datasets.train, as
iterations 1..N of a new one-process run get them: resized, flipped and colour-jittered as input.* says,
with the config's seed and solver.ims_per_batch images each) with their target boxes: the
boxes the model learns from, after dataloader.filter_empty / use_difficult and the readers'
clipping (Detectron2's visualize_data.py --source dataloader).

PATH is an image, a folder of images (not its subfolders': a note names one) or a glob
("imgs/*.jpg"; "imgs/**/*" reaches into subfolders), or a video (a file named .mp4, .mov, ...:
DIR/<stem>.mp4 gets its frames drawn, at its rate and size; detections.jsonl a line per frame,
with "frame" and "time"). With --gt / --compare the
images come from the config's first test data set (or --dataset NAME). An image that cannot
be read (corrupt, cut short) or whose drawing cannot be written is not drawn: a warning names
it as it happens, the others are drawn, and the run ends with one error listing what was not
drawn (exit 2).

Output files, in every mode: DIR/NNNNN_STEM.jpg, NNNNN the image's position from 00000 in
the input list (a folder's images sorted by name, a glob's matches sorted, or the data set's
order) and STEM its file name without the extension (its first 200 bytes): two inputs of the
same name in different folders never overwrite each other. DIR may not be a folder the images
drawn are in (a drawing could replace a photo of its name). Drawings already in DIR that this
run does not draw over (an earlier run's, with more images) are left in place: a note names them.

With a model, DIR/detections.jsonl lists what was drawn, one JSON line per input image in the
order above, written as each is done (a killed run keeps the finished ones): {"image", "drawing"
(null with --no-draw), "width", "height", "detections": [{"label", "class", "score", "box":
[x1, y1, x2, y2] in the image's pixels}]} for detections at least --score-thresh, or {"image",
"error"} for an image not read or not drawn. --no-draw writes only that list and its
detections.source.json (a batch of unlabelled images for another program); --resume goes on
from a killed run's list (the images it holds without an error, and drawn, are not done again; a
list made with other weights or settings, as DIR/detections.source.json records them, or of
relative paths from another folder, is refused). The model itself keeps
model.roi_heads.score_thresh_test (0.05 in base.yaml) and detections_per_image (100):
--score-thresh filters what it gives.

In the ground truth, what the metrics ignore is drawn dashed and tagged: VOC `difficult`
objects ("difficult") and COCO crowd regions ("crowd"). Predictions are drawn with the model's
class names (the checkpoint's, else model.class_names; else the data set's, whose number must
then be model.num_classes), the ground truth with the data set's.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detection.cli import (add_config_args, config_from_args, dataset_entry, override_keys, parse_command_line,
                           resolve_config_beside_weights, run_tool)
from detection.config import ConfigError
from detection.data import DataError
from detection.data.pseudo_labels import SOURCE_FILE
from detection.data.video import VIDEO_EXTS, is_video
from detection.utils.files import OutputFolderError, WriteError, atomic_write
from detection.utils.text import counted, first_few

if TYPE_CHECKING:
    from detection.config import Config

logger = logging.getLogger("visualize")
# what a folder or a glob draws (OpenCV reads them all); a file given by name is read whatever its extension
IMAGE_EXTS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
              ".pgm", ".ppm", ".pnm")  # the last three: industrial cameras' (OpenCV reads them)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, beside_weights=True)
    parser.add_argument("--weights", metavar="CKPT", help="detector checkpoint")
    parser.add_argument("--input", metavar="PATH", help="image, folder or glob")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the drawn images")
    parser.add_argument("--score-thresh", type=float, default=0.5,
                        help="draw (and list in detections.jsonl) detections at least this score")
    parser.add_argument("--no-draw", action="store_true",
                        help="with a model: write only DIR/detections.jsonl, no drawings")
    parser.add_argument("--gt", action="store_true", help="draw a data set's annotations, no model")
    parser.add_argument("--compare", action="store_true", help="ground truth and predictions side by side")
    parser.add_argument("--dataset", help="data set for --gt/--compare/--results: a known name, the name of one of "
                        "datasets.test or datasets.train (as eval.py and training print it), or an entry as YAML "
                        "('{type: coco, ann_file: ..., image_root: ...}'); default: the first test set")
    parser.add_argument("--results", metavar="PATH",
                        help="draw the detections eval.py saved (a results folder, a test set's folder, a "
                             "coco_results.json or a folder of comp4 files) on the data set's images: no model")
    parser.add_argument("--no-labels", action="store_true",
                        help="boxes only, in their class colours (dense scenes: hundreds of labels hide the boxes)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many images (0 = all)")
    parser.add_argument("--resume", action="store_true",
                        help="--input's images already listed in DIR/detections.jsonl (and drawn) by an earlier run "
                             "with the same weights and settings are taken from it, the others done")
    parser.add_argument("--train-batches", type=int, default=0, metavar="N",
                        help="draw the first N training batches as the loader gives them (no model)")
    args = parse_command_line(parser, argv)
    if args.train_batches:
        others = [flag for flag, given in (("--weights", args.weights), ("--input", args.input), ("--gt", args.gt),
                                           ("--compare", args.compare), ("--dataset", args.dataset)) if given]
        if others or args.train_batches < 0:
            parser.error(f"--train-batches draws the training loader's batches alone: "
                         f"{'not with ' + ', '.join(others) if others else 'give a number of batches >= 1'}")
        return args
    if args.results:
        others = [flag for flag, given in (("--weights", args.weights), ("--input", args.input), ("--gt", args.gt),
                                           ("--no-draw", args.no_draw), ("--resume", args.resume)) if given]
        if others:
            parser.error(f"--results draws saved detections on the data set's images (with --compare, beside its "
                         f"ground truth): not with {', '.join(others)}")
        if not args.config:
            parser.error("--results needs --config: the config the results were evaluated with (its datasets.test "
                         "has the images; --dataset NAME picks another set)")
    elif not args.gt and not args.weights:
        parser.error("--weights is required unless --gt or --results is given")
    if args.no_draw and args.gt:
        parser.error("--no-draw writes a model's detections (detections.jsonl): not with --gt")
    if args.resume and (args.gt or args.compare or not args.input or is_video(args.input)):
        parser.error("--resume goes on with --input's images (a batch of them): not with --gt, --compare or a video")
    if args.limit < 0:  # a slice's end: -1 drew all but the last image
        parser.error("--limit is a number of images, 0 for all")
    if not 0.0 <= args.score_thresh <= 1.0:  # nan or 2 drew nothing, exit 0
        parser.error(f"--score-thresh {args.score_thresh}: a score in [0, 1]")
    given = [flag for flag, on in (("--gt", args.gt), ("--compare", args.compare), ("--input", args.input)) if on]
    if len(given) > 1:  # one was ignored without a word (--gt --input drew the test set)
        parser.error(f"{' and '.join(given)}: give one (--gt a data set's annotations, --compare them beside a "
                     "model's detections, --input images of your own)")
    if not (args.gt or args.compare or args.results) and not args.input:
        parser.error("--input is required unless --gt, --compare or --results is given")
    resolve_config_beside_weights(parser, args)
    return args


def find_images(pattern: str) -> list[Path]:
    """An image file, every image in a folder (sorted; its subfolders' images not, and a note
    says so), or the images a glob matches ("**" reaches into subfolders). A folder and a glob
    take the same entries: files (a broken link too: it is then reported as not drawn) named
    with an image's extension (IMAGE_EXTS); a note names the files left out for their extension."""
    path = Path(pattern).expanduser()
    nested = None
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if not p.is_dir())
        nested = _image_in_subfolders(path)
    elif path.is_file():
        return [path]
    else:
        entries = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if not p.is_dir())
    # a folder link in a "**" glob lists its images again (a link back up: ~40 times, to the kernel's
    # limit): each file once, under its shortest path
    by_file: dict[str, list[Path]] = {}
    for p in entries:
        by_file.setdefault(os.path.realpath(p), []).append(p)
    names = [sorted(paths, key=lambda p: (len(p.parts), str(p))) for paths in by_file.values()]  # shortest first
    once = sorted(paths[0] for paths in names)
    files = [p for p in once if p.suffix.lower() in IMAGE_EXTS]
    repeated = [p for paths in names for p in paths[1:] if p.suffix.lower() in IMAGE_EXTS]
    left_out = [str(p) for p in once if p.suffix.lower() not in IMAGE_EXTS]
    hint = (f"its subfolders hold images (e.g. {nested}), which a folder does not include; "
            f"--input '{Path(glob.escape(str(path))) / '**' / '*'}' draws those too") if nested else ""
    videos = [p for p in left_out if Path(p).suffix.lower() in VIDEO_EXTS]
    skipped = (f"{len(left_out)} file{'s' if len(left_out) > 1 else ''} left out, not named as images "
               f"({first_few(left_out, 3)}); drawn: {' '.join(IMAGE_EXTS)} (a file given by name is read whatever "
               "its extension" + (f"; a video is drawn when --input names it: --input {videos[0]}" if videos else "")
               + ")") if left_out else ""
    if not files:
        raise DataError(f"--input {pattern}: no images found (expected an image, a folder or a glob)"
                        + "".join(f"; {text}" for text in (hint, skipped) if text))
    if repeated:
        print(f"note: --input {pattern}: {len(repeated)} paths name images already listed (through links to "
              f"folders: {first_few([str(p) for p in repeated], 2)}), each drawn once")
    for text in (hint, skipped):
        if text:
            print(f"note: --input {pattern}: {text}")
    return files


def _image_in_subfolders(folder: Path) -> Path | None:
    """The first image file found below `folder`'s own level (a walk that stops there), or None."""
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        for found in sub.rglob("*"):
            if found.suffix.lower() in IMAGE_EXTS and found.is_file():
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_tool(lambda: draw(args))


def draw(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    if args.train_batches:
        draw_training_batches(cfg, args.train_batches, args.output, labelled=not args.no_labels)
        return
    if args.input and is_video(args.input) and Path(args.input).expanduser().is_file():
        frames, drawn, video, listed = run_video(cfg, args)
        said = f"{frames} frame{'' if frames == 1 else 's'}"
        print(f"listed the detections of {said} in {listed}{drawn_text(drawn, args, cfg)}" if video is None else
              f"wrote {video} ({said}){drawn_text(drawn, args, cfg)}; their detections in {listed}")
        return
    count, drawn, unreadable, (unwritten, write_errno) = run(cfg, args)
    listed = Path(args.output) / DETECTIONS_FILE
    if args.no_draw:
        wrote = f"listed the detections of {counted(count, 'image')} in {listed}{drawn_text(drawn, args, cfg)}"
    else:
        wrote = f"wrote {counted(count, 'image')} to {args.output}{drawn_text(drawn, args, cfg)}" + (
            "" if args.gt or args.results else f"; their detections in {listed}")
    total = count + len(unreadable) + len(unwritten)
    if unwritten:  # the output's fault, not an input's: skip_bad_images does not make it exit 0 (a file-system trial)
        raise WriteError(f"{wrote}; {len(unwritten)} of the {total} images were not drawn: could not write "
                         f"{first_few(unwritten, 3)} (the folder is not writable, or the disk is full)"
                         + (f"; and {len(unreadable)} could not be read: {'; '.join(unreadable[:3])}"
                            if unreadable else ""), write_errno)
    if unreadable:  # the others are drawn first: one bad file in a folder does not stop the run
        not_drawn = (f"{len(unreadable)} of the {total} images were not {'read' if args.no_draw else 'drawn'}: "
                     f"{'; '.join(unreadable[:3])}{'; ...' if len(unreadable) > 3 else ''}")
        if not cfg.dataloader.skip_bad_images:
            raise DataError(f"{wrote}; {not_drawn} (dataloader.skip_bad_images=true skips them, as eval.py does)")
        wrote += f"; {not_drawn} (skipped: dataloader.skip_bad_images)"  # asked for: exit 0, as eval.py
    print(wrote)


def drawn_text(drawn: int, args: argparse.Namespace, cfg: Config) -> str:
    """What the images show: with a model, how many detections (and at which score) were drawn,
    so that empty pictures read as a threshold to lower, not as a broken tool."""
    if args.gt:
        return ""
    done = "listed" if getattr(args, "no_draw", False) else "drawn"
    text = f": {drawn} detection{'' if drawn == 1 else 's'} {done} (score >= {args.score_thresh:g}"
    if drawn:
        return text + ")"
    model_thresh = cfg.model.roi_heads.score_thresh_test
    if model_thresh >= args.score_thresh and not args.results:  # a lower --score-thresh alone would draw no more
        return text + f"; the model itself drops scores <= model.roi_heads.score_thresh_test={model_thresh:g}: " \
            "lower both to see weaker detections)"
    return text + ", --score-thresh sets it)"


def run(cfg, args: argparse.Namespace) -> tuple[int, int, list[str], list[str]]:
    """Draws every input it can read; returns the number of images written, of detections drawn,
    why each input that could not be read was not, and the drawings that could not be written
    (each also a warning as it happens)."""
    from detection.engine.distributed import select_device
    from detection.evaluation.classes import model_class_names
    from detection.utils.progress import ProgressLines
    from detection.visualization.draw import write_drawing

    device = select_device(cfg.device, cfg.tf32)
    # --input's images are found before the model loads: a wrong folder or glob says so at once
    files = None if args.gt or args.compare or args.results else find_images(args.input)[: args.limit or None]
    model, weights = None, None
    if args.weights:  # read once: the weights and the class names training saved with them
        from detection.engine.inference_model import build_inference_model

        model, weights = build_inference_model(cfg, args.weights, device, override_keys(args))
    items, class_names, crowd, dataset = _inputs(cfg, args, weights, files)
    predict = None if args.gt else _saved_predictor(dataset, args.results) if args.results else \
        _model_predictor(model, args.score_thresh)
    # predictions carry the model's labels: drawn with its names when known (a test set may list
    # them in another order, or a subset: its ground truth keeps its own)
    predicted_names = (model_class_names(weights, cfg.model.class_names)[0] or class_names) if model else class_names
    out = output_folder(args.output, [] if args.no_draw else [path for path, _ in items])  # nothing drawn: any folder
    drawn, unreadable, unwritten = [], [], []  # detections each image shows; images not read; drawings not written
    written = set()  # the drawings' file names
    source = _list_source(cfg, args) if model is not None and not args.gt else None
    if source is not None:  # what the labels mean and where relative paths start (tools/pseudo_labels.py reads
        # them; --resume refuses another folder when the list's paths are relative)
        source.update(class_names=list(predicted_names or []), cwd=os.getcwd())
    done = done_before(out, source, args) if args.resume else {}
    # "finished" once every image is listed: pseudo_labels.py refuses a list a stop cut short (a trial:
    # no word); said before the old list is replaced, so that a failed write leaves no "finished" beside it
    if source is not None:
        _write_source(out, {**source, "images": len(items), "finished": False})
    listed = DetectionsFile(out / DETECTIONS_FILE, predicted_names) if source is not None else None
    progress = ProgressLines("visualize", len(items), say=lambda line: print(line, flush=True))  # a line a minute
    resumed = 0  # images taken from the earlier run's list (--resume)
    write_errno = None  # why the last drawing not written was not (ENOSPC: exit 75, try again)
    try:
        for i, (path, record) in enumerate(items):
            if i:
                progress.step()  # the images before this one are done
            earlier = done.get(str(path))
            # its drawing's name is the image's position in the input: another list (a new image sorting
            # first, a wider glob) gives it another, and another image the old one (a review)
            if earlier is not None and (args.no_draw or earlier["drawing"] == output_name(i, path)):
                # --resume: listed (and drawn) by the run this one goes on from
                listed.add_line(earlier)
                drawn.append(len(earlier["detections"]))
                written.add(earlier["drawing"] or str(path))
                resumed += 1
                continue
            shown = len(drawn)
            try:
                canvas, kept = _draw(path, record, crowd, predict, (class_names, predicted_names), args, drawn,
                                     exif_orientation=cfg.input.exif_orientation)
            except DataError as err:
                logger.warning("not drawn: %s", err)
                unreadable.append(str(err))
                if listed is not None:
                    listed.add(path, error=str(err))
                continue
            target = None if args.no_draw else out / output_name(i, path)
            try:
                if target is not None:
                    write_drawing(target, canvas)
            except WriteError as err:
                logger.warning("not written: %s (%s)", target, err.strerror or err)
                unwritten.append(str(target))
                write_errno = err.errno
                del drawn[shown:]  # "N detections drawn" counts those in the images written
                if listed is not None:
                    listed.add(path, error=f"its drawing {target} could not be written")
                continue
            if listed is not None:
                listed.add(path, drawing=target, detections=kept)
            written.add(target.name if target is not None else str(path))
    finally:
        if listed is not None:
            listed.close()
    if source is not None:
        _write_source(out, {**source, "images": len(items), "finished": True})
    if not args.no_draw:
        note_earlier_drawings(out, args.output, written)
    if args.resume:
        print(f"--resume: {resumed} of the {len(items)} images taken from the earlier run's {out / DETECTIONS_FILE}")
    if isinstance(predict, _ModelPredictions):
        predict.note()
    return len(written), sum(drawn), unreadable, (unwritten, write_errno)


def _write_source(out: Path, source: dict) -> None:
    """DIR/detections.source.json: how DIR/detections.jsonl was made (--resume compares it)."""
    with atomic_write(out / SOURCE_FILE, durable=False) as f:
        f.write(json.dumps(source, indent=1) + "\n")


def _list_source(cfg, args: argparse.Namespace) -> dict:
    """What the detections listed depend on: the checkpoint (path, size, time), --score-thresh,
    whether drawings are made, and the config's model, input and test sections."""
    from detection.config import config_to_dict
    from detection.evaluation.outputs import ResultsSource

    weights = ResultsSource.of("weights", args.weights)
    config = config_to_dict(cfg)
    source = {"weights": {"path": weights.path, "size": weights.size, "mtime": weights.mtime},
              "score_thresh": args.score_thresh, "drawn": not args.no_draw,
              "settings": {key: config[key] for key in ("model", "input", "test")}}
    return json.loads(json.dumps(source))  # as read back: lists, not tuples


def done_before(out: Path, source: dict, args: argparse.Namespace) -> dict[str, dict]:
    """--resume: image path -> its line in the earlier run's DIR/detections.jsonl, for the images
    listed there without an error (and drawn, their drawing still there); those with errors are
    done again. OutputFolderError when that list was made with other weights or settings (the
    lines would mix two models' detections) or its record of them is missing."""
    list_path, source_path = out / DETECTIONS_FILE, out / SOURCE_FILE
    if not list_path.is_file():
        print(f"note: --resume: {list_path} does not exist: every image is done")
        return {}
    try:
        earlier = json.loads(source_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise OutputFolderError(f"--resume: {source_path} (how {list_path} was made) is missing or unreadable: "
                                "cannot tell its weights and settings; run without --resume to replace it") from None
    differ = [key for key in ("weights", "score_thresh", "drawn") if earlier.get(key) != source[key]]
    settings = earlier.get("settings") if isinstance(earlier.get("settings"), dict) else {}
    differ += [f"{section} settings" for section, value in source["settings"].items() if settings.get(section) != value]
    if differ:
        raise OutputFolderError(f"--resume: {list_path} was made with other {', '.join(differ)} than this run's "
                                f"({source_path}): run without --resume to replace it, or give another --output")
    done = {}
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise OutputFolderError(f"--resume: cannot read {list_path}: {err}") from None
    for text in lines:
        try:
            line = json.loads(text)
        except ValueError:  # a line cut short by a kill: that image is done again
            continue
        if isinstance(line, dict) and "error" not in line and "detections" in line and (
                args.no_draw or (line.get("drawing") and (out / line["drawing"]).is_file())):
            done[line["image"]] = line
    began = earlier.get("cwd")  # relative paths name other files from another folder (a review)
    relative = [image for image in done if isinstance(image, str) and not os.path.isabs(image)]
    if relative and began is not None and began != source.get("cwd"):
        raise OutputFolderError(f"--resume: {list_path} was begun in {began}, and its relative image paths "
                                f"({first_few(relative, 2)}) name other files from {os.getcwd()}: resume it from "
                                f"{began}, or run without --resume to replace it")
    return done


def run_video(cfg, args: argparse.Namespace) -> tuple[int, int, Path | None, Path]:
    """--input a video: each frame's detections drawn into DIR/<stem>.mp4 (or --output X.mp4 itself;
    the video's frame rate and frame size; with --no-draw none) and listed in detections.jsonl (or
    X.jsonl), a line per frame with its index and time. A stop (Ctrl-C, SIGTERM) keeps the frames
    drawn so far as the video. -> (frames, detections drawn, the video written or None, the list)."""
    from detection.data.video import VideoFrames
    from detection.engine.distributed import select_device
    from detection.engine.inference_model import build_inference_model
    from detection.utils.progress import ProgressLines
    from detection.visualization.video import DrawnVideo

    frames = VideoFrames(Path(args.input).expanduser(), limit=args.limit)  # an unreadable video says so first
    model, weights = build_inference_model(cfg, args.weights, select_device(cfg.device, cfg.tf32), override_keys(args))
    names = class_names_to_draw(cfg, weights)
    predict = _model_predictor(model, args.score_thresh)
    given = Path(args.output).expanduser()
    if given.suffix.lower() == ".mp4" and not given.is_dir():  # a file, as Detectron2's demo --output takes one
        if os.path.realpath(given) == os.path.realpath(args.input):
            raise OutputFolderError(f"--output {args.output} is the input video: give another name")
        out, target, listed_path = output_folder(str(given.parent), []), given, given.with_suffix(".jsonl")
    else:
        out = output_folder(args.output, [] if args.no_draw else [args.input], what="the video drawn is")
        target = out / f"{output_name(0, args.input)[len('00000_'):-len('.jpg')]}.mp4"
        listed_path = out / DETECTIONS_FILE
    target = None if args.no_draw else target
    total = min(frames.frame_count, args.limit) if args.limit and frames.frame_count else frames.frame_count
    progress = ProgressLines("visualize", total or None, unit="frames", say=lambda line: print(line, flush=True))
    drawn: list[int] = []
    listed = DetectionsFile(listed_path, names)
    # a stop (Ctrl-C; SIGTERM: run_tool's StoppedBySignal is one) keeps the frames drawn so far
    video = DrawnVideo(target, frames.fps, keep_on=(KeyboardInterrupt,)) if target else None
    try:
        with video if video is not None else contextlib.nullcontext():
            for frame in frames:
                canvas, kept = _draw_image(frame.image, None, {}, predict, (names, names), args, drawn)
                if video is not None:
                    video.write(canvas)
                listed.add(args.input, drawing=target, detections=kept, frame=(frame.index, frame.time_s))
                progress.step()
    except KeyboardInterrupt:
        if video is not None and video.frames:
            print(f"note: stopped: {target} holds the first {video.frames} frames drawn", flush=True)
        raise
    finally:
        listed.close()
    predict.note("frames")
    if not frames.fps_given:
        print(f"note: --input {args.input} gives no frame rate: the times in {listed_path} count {frames.fps:g} "
              f"frames a second" + (f", and {target} is written at that rate" if target else ""))
    if frames.frame_count and frames.read < frames.frame_count and not (args.limit and frames.read == args.limit):
        print(f"note: --input {args.input}: {frames.read} of the {frames.frame_count} frames its header counts could "
              "be read (cut short, or damaged?)")
    if video is not None and video.padded:
        print(f"note: {target} is {video.size[0]}x{video.size[1]}, the frames' {video.frame_size[0]}x"
              f"{video.frame_size[1]} with a black pixel row or column added at the bottom or right (its codec takes "
              "even sizes only)")
    return frames.read, sum(drawn), target, listed_path


DETECTIONS_FILE = "detections.jsonl"


class DetectionsFile:
    """DIR/detections.jsonl: one JSON line per input image, in the order drawn, written as each is
    done (a killed run keeps the lines of the images it finished): {"image": its path, "drawing":
    the drawing's file name (null with --no-draw), "width", "height" (as viewed), "detections":
    [{"label": 1..K, "class", "score", "box": [x1, y1, x2, y2] in the image's pixels}]}, those
    drawn (score >= --score-thresh); an image not read or not drawn is {"image", "error"}. The
    machine-readable output of a batch of unlabelled images (mmdetection's --pred-out-dir;
    Detectron2's demo writes drawings only)."""

    def __init__(self, path: Path, class_names: list[str]) -> None:
        self.path, self.class_names = path, class_names
        try:
            path.unlink(missing_ok=True)  # an earlier run's (or a link put there): replaced, not written through
            # backslashreplace: a file name that is not UTF-8 (a lone surrogate) becomes its JSON escape
            # "\udce9", which json.loads gives back and os.fsencode turns into the name's bytes
            self.file = open(path, "x", encoding="utf-8", errors="backslashreplace")
        except OSError as err:  # a read-only folder: one line, not a traceback (a trial)
            raise self._error(err, "create") from None

    def _error(self, err: OSError, what: str) -> WriteError:
        return WriteError(f"could not {what} {self.path}: {err.strerror or err} (the folder is not writable, or the "
                          "disk is full); the lines written before are kept", err.errno, err.strerror)

    def add(self, image: Any, *, error: str | None = None, drawing: Path | None = None,
            detections: dict | None = None, frame: tuple[int, float] | None = None) -> None:
        """`frame`: (index, time in seconds) of a video's frame, written as "frame" and "time"."""
        if error is not None:
            entry = {"image": str(image), "error": error}
        else:
            height, width = detections["size"]
            entry = {"image": str(image), **({"frame": frame[0], "time": round(frame[1], 4)} if frame else {}),
                     "drawing": drawing.name if drawing is not None else None,
                     "width": width, "height": height, "detections": [
                         {"label": int(k), "class": self.class_names[int(k) - 1] if 0 < k <= len(self.class_names)
                          else str(int(k)), "score": round(float(s), 6), "box": [round(float(v), 2) for v in box]}
                         for box, s, k in zip(detections["boxes"], detections["scores"], detections["labels"])]}
        self.add_line(entry)

    def add_line(self, entry: dict) -> None:
        """One line as it is (an earlier run's, for --resume)."""
        try:
            self.file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self.file.flush()
        except OSError as err:
            raise self._error(err, "write to") from None

    def close(self) -> None:
        try:
            self.file.close()
        except OSError as err:  # the buffer's last bytes, on a full disk
            raise self._error(err, "write to") from None


def draw_training_batches(cfg: Config, batches: int, output: str, labelled: bool = True) -> None:
    """The first `batches` training batches, each image with its target boxes, as
    DIR/NNNNN_STEM.jpg (NNNNN: the image's place in the training stream)."""
    from detection.data.loader import training_samples
    from detection.engine.startup import build_train_data_loader, build_train_datasets
    from detection.visualization.draw import draw_detections, write_drawing

    datasets = build_train_datasets(cfg)
    names = datasets[0].class_names  # the training classes (every set's, matched by name)
    loader = build_train_data_loader(cfg, datasets)
    one_per_folder = {Path(r["file_name"]).parent: r["file_name"] for d in datasets for r in d.records}
    out = output_folder(output, list(one_per_folder.values()))
    count, boxes, written = 0, 0, set()
    for count, (_, image, target, record) in enumerate(training_samples(loader, batches), start=1):
        canvas = draw_detections(image.permute(1, 2, 0).numpy(), target["boxes"], target["labels"], None, names, 0.0,
                                 labelled=labelled)
        path = out / output_name(count - 1, record["file_name"])
        write_drawing(path, canvas)  # WriteError naming it (a full disk: exit 75)
        boxes += len(target["boxes"])
        written.add(path.name)
    note_earlier_drawings(out, output, written)
    print(f"wrote {counted(count, 'image')} to {output}: the first "
          f"{counted(batches, 'training batch', 'training batches')} of {cfg.solver.ims_per_batch} "
          f"(iterations 1..{batches} of a new one-process run, seed {cfg.seed}: input.min_size_train "
          f"{cfg.input.min_size_train}{' (range)' if cfg.input.min_size_train_sampling == 'range' else ''}, "
          f"max_size_train {cfg.input.max_size_train}, hflip_prob {cfg.input.hflip_prob:g}, jitter "
          f"{'on' if cfg.input.jitter else 'off'}), {boxes} target boxes drawn")


def output_folder(output: str, inputs: list[str], what: str = "the images drawn are") -> Path:
    """--output, created; refused when it is a folder the input images are in (the drawings,
    NNNNN_STEM.jpg, would sit among the photos and could replace one of that name)."""
    out = Path(output).expanduser()
    # realpath, not resolve(): a link loop among the inputs raised RuntimeError (a traceback) there
    if os.path.realpath(out) in {os.path.dirname(os.path.realpath(p)) for p in inputs}:
        raise OutputFolderError(f"--output {output}: {what} in that folder, and the drawings could replace them: give "
                                "another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"--output {output}: cannot create the folder ({err.strerror or err})") from None
    return out


# a drawing's name as output_name writes it
DRAWING_NAME = re.compile(r"\d{5}_.*\.jpg")


def note_earlier_drawings(out: Path, output: str, names: set[str]) -> None:
    """A note naming the drawings in `out` that this run did not draw (`names`: those it drew): an
    earlier run's with other weights or more images would otherwise sit among the new ones,
    unmarked. They are left in place (Detectron2's demo too leaves them): the user's files are not
    removed; the note says how to start clean."""
    earlier = sorted(p.name for p in out.iterdir() if DRAWING_NAME.fullmatch(p.name) and p.name not in names)
    if earlier:
        print(f"note: --output {output} already holds {len(earlier)} drawing{'s' if len(earlier) > 1 else ''} "
              f"this run did not draw over ({first_few(earlier, 3)}): an earlier run's, left in place; "
              "give an empty folder to keep only this run's")


def output_name(index: int, path: str) -> str:
    """NNNNN_STEM.jpg in every mode: the position makes it unique, the stem recognisable (cut to
    200 bytes: a file name has at most 255). A name that is not UTF-8 (an old archive's Latin-1
    café.jpg: its byte comes as a lone surrogate) gets U+FFFD for that byte (it stopped the run)."""
    raw = Path(path).stem.encode("utf-8", "surrogateescape")
    stem = raw[:200].decode("utf-8", errors="replace")
    if len(raw) > 200:
        stem = stem.rstrip("\ufffd")  # a character the cut split: dropped
    return f"{index:05d}_{stem}.jpg"


def _draw(path: str, record: dict | None, crowd: dict, predict, names: tuple[list[str], list[str]],
          args: argparse.Namespace, drawn: list[int], exif_orientation: bool = True):
    """The image (as viewed: turned by its EXIF orientation tag unless exif_orientation is
    False) with its ground truth, its predictions, or both side by side. `names`: the ground
    truth's class names and the predictions'."""
    from detection.data.image_io import read_image

    return _draw_image(read_image(path, exif_orientation=exif_orientation), record, crowd, predict, names, args, drawn)


def _draw_image(image, record: dict | None, crowd: dict, predict, names: tuple[list[str], list[str]],
                args: argparse.Namespace, drawn: list[int]):
    """_draw on an image in memory (RGB): a file's, or a video's frame. `predict(image, record)`:
    its detections, {"boxes" XYXY in the image's pixels, "scores", "labels"} as arrays (None: none
    drawn); the record's ground truth is drawn with --gt and --compare."""
    import numpy as np

    from detection.visualization.draw import draw_detections, ground_truth_boxes, side_by_side

    panels, kept = [], None
    if record is not None and (args.gt or args.compare):
        boxes, labels, tags = ground_truth_boxes(record, crowd.get(record["image_id"]))
        panels.append(draw_detections(image, boxes, labels, None, names[0], 0.0, tags=tags,
                                      labelled=not args.no_labels))
    if predict is not None:
        pred = predict(image, record)
        panels.append(draw_detections(image, pred["boxes"], pred["labels"], pred["scores"], names[1],
                                      args.score_thresh, labelled=not args.no_labels))
        keep = np.asarray(pred["scores"]) >= args.score_thresh  # draw_detections' own rule
        drawn.append(int(keep.sum()))
        kept = {key: np.asarray(pred[key])[keep] for key in ("boxes", "scores", "labels")}
        kept["size"] = image.shape[:2]
    canvas = panels[0] if len(panels) == 1 else side_by_side(panels[0], panels[1], ("ground truth", "predictions"))
    return canvas, kept


class _ModelPredictions:
    """predict(image, record) for _draw_image: the model's detections on the image. `capped`
    counts the images whose detections reached the model's cap (model.roi_heads.detections_per_image)
    all at --score-thresh or more: more objects may be there than drawn (a dense-scene trial's
    shelf of 343 objects drew exactly 100, the lowest at 0.81, without a word)."""

    def __init__(self, model, score_thresh: float) -> None:
        from detection.modeling.tiles import inner_detector

        heads = getattr(inner_detector(model), "roi_heads", None)  # inside tiles and test-time augmentation
        self.model, self.score_thresh = model, score_thresh
        self.cap = getattr(heads, "detections_per_image", None)
        self.capped = 0

    def __call__(self, image, record):
        import torch

        with torch.inference_mode():
            pred = self.model([torch.from_numpy(image).permute(2, 0, 1)])[0]  # the model resizes, then moves it
        out = {key: pred[key].cpu().numpy() for key in ("boxes", "scores", "labels")}
        if isinstance(self.cap, int) and len(out["scores"]) >= self.cap and out["scores"].min() >= self.score_thresh:
            self.capped += 1
        return out

    def note(self, what: str = "images") -> None:
        """A line when some images reached the cap."""
        if self.capped:
            print(f"note: {self.capped} {what} gave the model's cap of detections (model.roi_heads."
                  f"detections_per_image={self.cap}), every one scoring at least {self.score_thresh:g}: they may hold "
                  "more objects than drawn; raise it (and model.rpn.post_nms_topk_test, the proposals they come "
                  "from) for crowded images", flush=True)


def _model_predictor(model, score_thresh: float) -> _ModelPredictions | None:
    return _ModelPredictions(model, score_thresh) if model is not None else None


def _saved_predictor(dataset, results: str):
    """predict(image, record) for _draw_image: the detections --results saved for the record's
    image (none when it has none). Refused (DataError) when the results name none of the set's
    images (made on another test set); a note counts the images they hold that the set has not."""
    import numpy as np

    from detection.evaluation.outputs import results_for_test_set, results_subfolder
    from detection.evaluation.report import read_detections

    path = results_for_test_set(results, results_subfolder(dataset.name), dataset.kind)
    saved = read_detections(dataset, path)
    ids = {r["image_id"] for r in dataset.records}
    others = [image_id for image_id in saved if image_id not in ids]
    if saved and len(others) == len(saved):
        raise DataError(f"--results {path}: its detections are of {len(saved)} image{'s' * (len(saved) > 1)}, "
                        f"none of data set {dataset.name}'s (ids {first_few([str(i) for i in others], 3)}): results of "
                        "another test set? --dataset NAME names the set they were made on")
    held = sum(1 for image_id in saved if image_id in ids)
    print(f"--results {path}: detections of {held} of data set {dataset.name}'s {len(ids)} images"
          + (f"; {len(others)} image{' in the results is' if len(others) == 1 else 's in the results are'} not in "
             "it (not drawn)" if others else ""))
    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    return lambda image, record: saved.get(record["image_id"], empty)


def _inputs(cfg, args: argparse.Namespace, weights, files: list[Path] | None):
    """(image path, record or None) pairs, the class names to print, the crowd regions (image id
    -> boxes, labels, tags) of a COCO-type data set and the data set drawn (None for `files`,
    --input's images)."""
    import dataclasses

    from detection.data.catalog import check_image_files, get_dataset
    from detection.data.orientation import check_image_sizes
    from detection.evaluation.classes import check_class_names, model_class_names
    from detection.visualization.draw import read_crowd_regions

    if args.gt or args.compare or args.results:
        mode = "--gt" if args.gt else "--compare" if args.compare else "--results"
        if not args.dataset and not cfg.datasets.test:  # an IndexError
            raise ConfigError(f"{mode} draws the first of datasets.test, which is empty: "
                              "give --dataset NAME or datasets.test=[...]")
        entry = dataset_entry(args.dataset, [*cfg.datasets.test, *cfg.datasets.train]) if args.dataset \
            else cfg.datasets.test[0]
        skip = cfg.dataloader.skip_bad_images
        dataset = get_dataset(entry, cfg.datasets.root, skip_bad_images=skip, check_images=False,
                              exif_orientation=cfg.input.exif_orientation)
        if not dataset.has_annotations and (args.gt or args.compare):  # drawn empty, as if no object were there
            raise DataError(f"{mode}: data set {dataset.name} has no annotations (a "
                            "test set for an evaluation server): no ground truth to draw; "
                            + ("--results without --compare draws the saved detections alone" if args.results else
                               "--input with its images draws the model's detections"))
        if args.weights:  # the model's names, when known, draw its predictions; else the data set's must fit
            names, source = model_class_names(weights, cfg.model.class_names)
            if names is None:
                check_class_names(dataset.name, dataset.class_names, names, cfg.model.num_classes, source)
        # only the images drawn are checked (their files and sizes): --limit 5 on COCO's 118k train
        # images no longer waits for every header
        drawn = dataclasses.replace(dataset, records=dataset.records[: args.limit or None])
        check_image_files(drawn, skip=skip)
        check_image_sizes(drawn, skip=skip)
        records = drawn.records
        crowd = read_crowd_regions(dataset.ann_file, dataset.label_to_category_id) \
            if dataset.kind == "coco" and dataset.ann_file else {}
        return [(r["file_name"], r) for r in records], dataset.class_names, crowd, dataset
    return [(str(f), None) for f in files], class_names_to_draw(cfg, weights), {}, None


def class_names_to_draw(cfg: Config, weights: Any) -> list[str]:
    """Names saved in the checkpoint by training, else the config's model.class_names, else
    those of the first test data set when it can be read, else "class 1".."class K".
    `weights`: the loaded checkpoint (DetectorWeights) or None."""
    from detection.data.catalog import get_dataset
    from detection.evaluation.classes import model_class_names

    names, _ = model_class_names(weights, cfg.model.class_names)
    if names:
        return names
    try:
        return get_dataset(cfg.datasets.test[0], cfg.datasets.root, check_images=False).class_names
    except (ValueError, IndexError, OSError):
        return [f"class {i}" for i in range(1, cfg.model.num_classes + 1)]


if __name__ == "__main__":
    sys.exit(main())
