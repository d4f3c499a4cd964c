"""Face detection on real images: `detect`, `detect_batch` and their `Detections`, and the command line.

`detect(image)` and `detect_batch(images)` run the fixed-shape cascade (`compiled.detect_bucket`):
images are grouped by their padded bucket and run at a few fixed batch sizes, so only a few shapes
are ever compiled. Inputs are read by `images.load_converted` (grayscale, alpha, palette and 16-bit
images converted to 8-bit RGB, noted in `Detections.converted`; `strict=True` refuses them); a bad input
raises (or, in a batch, yields in its slot) an `ImageError` that names the image.

`detect_stream(frames)` runs the frames of one or more streams (videos, cameras), batched across them
(`streams`); `video_io.read_frames` decodes videos.

Command line: `python -m mtcnn_jax.detect IMAGE_OR_DIR... [--json OUT.json] [--draw OUT_DIR]` (its flags,
their checks and what it does: `detect_flags`; how it writes its files: `outputs`; videos: `video`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from mtcnn_jax import (buckets, checkpoints, cli, compile_cache, compiled, outputs, pretrained, redetection, streams,
                       video)
from mtcnn_jax.align import align, crop_geometry
from mtcnn_jax.annotate import annotate_image
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detections import CapacityWarning, Detections, empty_detections, run_batch
from mtcnn_jax.detect_flags import CAPACITY_FIELDS, PROG, build_parser, capacity_flag, check_crops, config_from_args
from mtcnn_jax.images import (IMAGE_SUFFIXES, ImageError, ImageSource, first_copies, list_inputs, load_converted,
                              skipped_line)
from mtcnn_jax.stages import MIN_FACE_SIZE, SCALE_FACTOR, STAGES, THRESHOLDS


# ---------------------------------------------------------------------------------------------- params

@functools.lru_cache(maxsize=1)
def _pretrained_on_device() -> dict[str, Any]:
    """The original weights, converted and put on the default device once per process."""
    return jax.device_put(pretrained.load_pretrained())


def resolve_params(params: Any = None) -> dict[str, Any]:
    """The {"pnet", "rnet", "onet"} param tree to detect with: None -> the original weights (loaded once),
    a str/Path -> an Orbax cascade checkpoint directory, a dict -> itself (checked)."""
    if params is None:
        return _pretrained_on_device()
    if isinstance(params, (str, os.PathLike)):
        return jax.device_put(checkpoints.load_cascade(params))
    if not isinstance(params, dict):
        raise TypeError(f"params must be None, a checkpoint path or a dict, got {type(params).__name__}")
    missing = [s for s in STAGES if s not in params]
    if missing:
        raise ValueError(f"params need the stages {STAGES}; missing {missing}")
    return {s: params[s] for s in STAGES}


# ---------------------------------------------------------------------------------------------- detection

def make_config(config: CascadeConfig | None, min_face_size: float, scale_factor: float,
                thresholds: Sequence[float]) -> CascadeConfig:
    """`config` if given (the keywords must then keep their defaults), else a CascadeConfig of the keywords
    (a ValueError names the keyword out of range)."""
    keywords = {"min_face_size": float(min_face_size), "scale_factor": float(scale_factor),
                "thresholds": tuple(float(t) for t in thresholds)}
    if config is None:
        return CascadeConfig(**keywords)
    changed = [k for k, v in keywords.items() if v != getattr(CascadeConfig(), k)]
    if changed:
        raise ValueError(f"pass either config or the keywords {changed}, not both")
    return config


def overflow_messages(name: str, det: Detections) -> list[str]:
    """One line per stage that dropped candidates of this image, naming the field (and flag) to raise."""
    lines = []
    for stage, dropped in det.overflow.items():
        if dropped > 0:
            field_name = CAPACITY_FIELDS.get(stage)
            field = (f"CascadeConfig.{field_name} ({capacity_flag(field_name)})" if field_name
                     else "the matching capacity")
            lines.append(f"{name}: {dropped} candidates dropped at stage {stage!r} (capacity full); "
                         f"raise {field} to keep them")
    return lines


def _warn_overflow(name: str, det: Detections) -> None:
    """One CapacityWarning per stage that dropped candidates of this image (`overflow_messages`)."""
    for line in overflow_messages(name, det):
        warnings.warn(line, CapacityWarning, stacklevel=4)


def detect_loaded(images: Sequence[np.ndarray | ImageError], names: Sequence[str], params: Any,
                  config: CascadeConfig, batch_size: int | None = None,
                  converted: Sequence[str | None] | None = None,
                  warn: Callable[[str, Detections], None] = _warn_overflow,
                  merged: Mapping[buckets.Bucket, buckets.Bucket] | None = None) -> list[Detections | ImageError]:
    """Detection on already loaded images (errors pass through in their slots), run bucket by bucket in
    the batches of `buckets.plan`, merged where that spares compiles (`merged`, default `merges` of these
    images); `converted` (one note or None per image) goes into the Detections; `warn(name, detections)`
    for each image (default: CapacityWarnings for a full capacity)."""
    results: list[Detections | ImageError] = [
        img if isinstance(img, ImageError) else empty_detections({}) for img in images]  # no level: no face
    sizes = [None if isinstance(img, ImageError) else img.shape[:2] for img in images]
    batch_size = batch_size or buckets.default_batch_size()
    if merged is None:
        merged = merges(sizes, params, config, batch_size)
    for bucket, chunk in buckets.plan(sizes, config, batch_size, merged):
        for i, det in zip(chunk, run_batch(params, [images[i] for i in chunk], bucket, config)):
            warn(names[i], det)
            results[i] = det
    for i, note in enumerate(converted or ()):
        if note and isinstance(results[i], Detections):
            results[i] = dataclasses.replace(results[i], converted=note)
    return results


def merges(sizes_hw: Sequence[tuple[int, int] | None], params: Any, config: CascadeConfig,
           batch_size: int) -> dict[buckets.Bucket, buckets.Bucket]:
    """`buckets.merged_buckets` of these image sizes, counting the shapes compiled or stored as ready."""
    return buckets.merged_buckets(sizes_hw, config, batch_size,
                                  lambda bucket, batch: compiled.is_compiled(params, bucket, batch, config))


def _try_load(source: ImageSource, name: str, strict: bool) -> tuple[np.ndarray | ImageError, str | None]:
    """The loaded image and its conversion, or its ImageError as a value (a batch goes on past it)."""
    try:
        return load_converted(source, name, strict=strict)
    except ImageError as err:
        return err, None


def _refuse_one_image(images: Any) -> None:
    """TypeError for one image passed where a list of them is expected (it would be iterated over)."""
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"detect_batch takes a list of images, not one path ({images!r}): use detect() for one")
    if isinstance(images, Image.Image):
        raise TypeError("detect_batch takes a list of images, not one PIL image: use detect() for one, "
                        "or pass [image]")
    if hasattr(images, "shape") and len(images.shape) != 4:
        raise TypeError(f"detect_batch takes a list of images or a B x H x W x 3 array, not one array of "
                        f"shape {tuple(images.shape)}: use detect() for one image")


def detect_batch(images: Iterable[ImageSource], params: Any = None, *, min_face_size: float = MIN_FACE_SIZE,
                 scale_factor: float = SCALE_FACTOR, thresholds: Sequence[float] = THRESHOLDS,
                 config: CascadeConfig | None = None, batch_size: int | None = None,
                 names: Sequence[str] | None = None, strict: bool = False, crops: Any = None,
                 crop_size: int | Sequence[int] | None = None,
                 crop_margin: float = 0.0) -> list[Detections | ImageError]:
    """Faces in many images of any sizes; a bad image yields its ImageError in its slot, the rest still run.

    Images of one bucket run `batch_size` at a time (default `buckets.default_batch_size()`). Errors and
    CapacityWarnings name each image by `names[i]`, else its path, else "images[i]". Grayscale, alpha,
    palette and 16-bit images are converted (noted in `Detections.converted`) unless `strict`. crops: a
    template (`align.TEMPLATES` name or your points, at `crop_size`; "facenet" with `crop_margin`) to
    put each face's aligned crop in `Detections.aligned`.
    """
    _refuse_one_image(images)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = make_config(config, min_face_size, scale_factor, thresholds)
    if crops is not None:
        crop_geometry(crops, crop_size, margin=crop_margin)
    sources = list(images)
    if names is None:
        names = [str(s) if isinstance(s, (str, os.PathLike)) else f"images[{i}]" for i, s in enumerate(sources)]
    elif isinstance(names, str) or len(names) != len(sources):
        raise ValueError(f"names must be a list of one name per image ({len(sources)}), got {names!r}")
    loaded, converted = zip(*[_try_load(s, n, strict) for s, n in zip(sources, names)]) if sources else ((), ())
    if all(isinstance(x, ImageError) for x in loaded):
        return list(loaded)
    results = detect_loaded(loaded, names, resolve_params(params), cfg, batch_size, converted)
    return [with_crops(img, det, crops, crop_size, crop_margin) for img, det in zip(loaded, results)]


def detect(image: ImageSource, params: Any = None, *, min_face_size: float = MIN_FACE_SIZE,
           scale_factor: float = SCALE_FACTOR, thresholds: Sequence[float] = THRESHOLDS,
           config: CascadeConfig | None = None, name: str | None = None, strict: bool = False,
           crops: Any = None, crop_size: int | Sequence[int] | None = None, crop_margin: float = 0.0) -> Detections:
    """Faces in one image (a path, PIL image or numpy array; see `detect_batch` for conversions and
    `crops`); raises ImageError naming `name` (default: the path, else "image") for a bad input."""
    cfg = make_config(config, min_face_size, scale_factor, thresholds)
    if crops is not None:
        crop_geometry(crops, crop_size, margin=crop_margin)
    name = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    img, converted = load_converted(image, name, strict=strict)
    det = detect_loaded([img], [name], resolve_params(params), cfg, converted=[converted])[0]
    return with_crops(img, det, crops, crop_size, crop_margin)


def stream_detector(params: Any, config: CascadeConfig, batch_size: int | None = None,
                    redetect_every: int | None = None, workers: int | None = None) -> streams.Detector:
    """The cascade as `streams.detect_frames` runs it: `params` as `resolve_params` takes them, `batch_size`
    frames a batch (default `buckets.default_batch_size()`), buckets fitted to the frames
    (`buckets.STREAM_BUCKET_MULTIPLE` unless config sets bucket_multiple); `redetect_every` N > 1: the whole
    cascade every N frames of a stream, re-detection around its last faces in between (`redetection`), one
    batch at a time; else `workers` batches at once (default `buckets.default_workers()`)."""
    params = resolve_params(params)
    config = dataclasses.replace(config, bucket_multiple=config.bucket_multiple or buckets.STREAM_BUCKET_MULTIPLE)
    batch_size = batch_size or buckets.default_batch_size()
    if redetect_every is not None and (int(redetect_every) != redetect_every or redetect_every < 1):
        raise ValueError(f"redetect_every must be a whole number >= 1, got {redetect_every!r}")
    if workers is not None and (int(workers) != workers or workers < 1):
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    if redetect_every and redetect_every > 1:
        if workers not in (None, 1):  # re-detection follows each stream's faces from batch to batch
            raise ValueError(f"re-detection runs one batch at a time (workers=1), got workers={workers}")
        workers = 1
        run = redetection.batch_runner(redetection.Redetector.of(params, redetect_every, config, batch_size))
    else:
        workers = workers or buckets.default_workers()

        def run(frames: list[np.ndarray], bucket: buckets.Bucket, sources: list) -> list[Detections]:
            return run_batch(params, frames, bucket, config)
    return streams.Detector(run, config, batch_size, empty_detections({}),
                            lambda det, note: dataclasses.replace(det, converted=note), _warn_overflow, params,
                            workers)


def detect_stream(frames: Iterable[tuple[Hashable, ImageSource]] | Mapping[Hashable, Iterable[ImageSource]],
                  params: Any = None, *, min_face_size: float = MIN_FACE_SIZE, scale_factor: float = SCALE_FACTOR,
                  thresholds: Sequence[float] = THRESHOLDS, config: CascadeConfig | None = None,
                  batch_size: int | None = None, redetect_every: int | None = None,
                  strict: bool = False, workers: int | None = None,
                  ) -> Iterator[tuple[Hashable, int, Detections | ImageError]]:
    """Faces in the frames of one or more streams, as they come: `frames` is (source, frame) pairs, or
    {source: iterable of frames} read on a thread per source (cameras that do not wait for one another).
    Yields (source, k, Detections) for each source's k-th frame (from 0), in each source's order; a bad
    frame yields its ImageError. Frames of one bucket run together whatever their source, `batch_size` at
    a time: a frame waits until its batch fills (batch_size=1: never), its source ends or moves to another
    size, or the input ends (see `streams`). `redetect_every` N > 1 (off by default): faster, finding new
    faces only every N frames (`redetection`: its recall cost is in benchmarks/README.md). `workers`: batches
    run at once (default `buckets.default_workers()`; 1 with re-detection)."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    detector = stream_detector(params, make_config(config, min_face_size, scale_factor, thresholds), batch_size,
                               redetect_every, workers)
    return streams.detect_frames(streams.numbered(frames, 4 * detector.batch_size), detector, strict=strict)


def with_crops(image: Any, det: Detections | ImageError, template: Any, size: Any = None,
               margin: float = 0.0) -> Detections | ImageError:
    """`det` with its faces' aligned crops (`align.align` to `template`), or as it is when template is None."""
    if template is None or isinstance(det, ImageError):
        return det
    return dataclasses.replace(det, aligned=align(image, det, template, size, margin=margin))


# ---------------------------------------------------------------------------------------------- command line

def _summary(det: Detections) -> str:
    scores = ", ".join(f"{s:.2f}" for s in det.scores[:8]) + (", ..." if len(det) > 8 else "")
    note = f" [{det.converted}]" if det.converted else ""
    return f"{len(det)} face{'s' if len(det) != 1 else ''}" + (f" ({scores})" if len(det) else "") + note


def _detect_chunk(loaded: list, names: list[str], notes: list, params: Any, cfg: CascadeConfig, batch_size: int,
                  merged: dict) -> tuple[list[Detections | ImageError], list[str]]:
    """detect_loaded on one chunk (on a worker thread, in the folder's `merged` buckets), and its capacity
    warnings as lines; a failure of the run itself (e.g. out of memory on a huge image) is each of the chunk's
    images' ImageError."""
    lines: list[str] = []
    try:
        results = detect_loaded(loaded, names, params, cfg, batch_size, notes,
                                warn=lambda name, det: lines.extend(overflow_messages(name, det)), merged=merged)
    except Exception as err:  # noqa: BLE001 - reported per image, never lost in a traceback
        why = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        return [x if isinstance(x, ImageError) else ImageError(f"{n}: detection failed ({why}); run it alone "
                f"with {cli.TRACEBACK_VARIABLE}=1 to see why") for x, n in zip(loaded, names)], []
    return results, [f"warning: {line}" for line in lines]


class WorkOrder(NamedTuple):
    """The CLI's plan for a folder, from the files' headers: its batches (`buckets.plan`, in the buckets
    `merges` chose), every file's index in chunks of work (the planned batches in order, then the files no
    bucket was planned for: unreadable headers, images too small for a face, in chunks of `batch_size`),
    and the merges, which the chunks run in."""
    batches: list[tuple[buckets.Bucket, list[int]]]
    chunks: list[list[int]]
    merged: dict[buckets.Bucket, buckets.Bucket]


def _work_order(files: Sequence[str], params: Any, cfg: CascadeConfig, batch_size: int) -> WorkOrder:
    """The `WorkOrder` of these files."""
    with warnings.catch_warnings():  # a header over PIL's pixel limit: its load says so, as an error
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        sizes = [buckets.header_hw(f) for f in files]
    merged = merges(sizes, params, cfg, batch_size)
    batches = buckets.plan(sizes, cfg, batch_size, merged)
    planned = {i for _, chunk in batches for i in chunk}
    rest = [i for i in range(len(files)) if i not in planned]
    chunks = [chunk for _, chunk in batches] + [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]
    return WorkOrder(batches, chunks, merged)


def _compiling(n: int) -> str:
    """The progress bar's note on compiling ahead."""
    return f"{n} bucket{'s' if n != 1 else ''} compiling" if n else "all buckets compiled"


@cli.entry(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: detect faces in images, videos and folders (`detect_flags.EPILOG` says what it checks and writes;
    videos run first, in `video.main`, then the images, in `_detect_files`). Exit code 1 if any input failed."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(parser, args)
    check_crops(parser, args)
    listed, skipped = list_inputs(args.inputs, IMAGE_SUFFIXES + video.VIDEO_SUFFIXES)
    files, videos = video.split_inputs(listed)
    if skipped:
        print(skipped_line(skipped, video.VIDEO_SUFFIXES), file=sys.stderr)
    if not files and not videos:
        raise cli.CliError(f"no image files in {' '.join(args.inputs)} (suffixes: {' '.join(IMAGE_SUFFIXES)}; "
                           f"videos: {' '.join(video.VIDEO_SUFFIXES)})")
    for flag in ("every", "redetect_every"):
        if getattr(args, flag) != 1 and not videos:
            parser.error(f"--{flag.replace('_', '-')} is for videos: the inputs hold none")
    detector_of = functools.partial(stream_detector, args.weights, cfg, redetect_every=args.redetect_every,
                                    workers=args.workers)
    videos_failed = video.main(parser, args, videos, files, detector_of) if videos else 0
    images_failed = _detect_files(parser, args, cfg, files) if files else 0
    return 1 if images_failed or videos_failed else 0


def _detect_files(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: CascadeConfig,
                  files: list[str]) -> int:
    """The CLI on image files: targets checked first; chunks loaded here, run `--workers` at a time while the
    next loads (buckets compiled ahead on a thread), written in input order as done. Returns the failures."""
    copies = first_copies(files)
    errors: dict[int, ImageError] = {i: ImageError(
        f"{files[i]}: {'given' if files[i] == files[j] else f'the same file as {files[j]}'} twice; its results "
        f"are under {files[j]}") for i, j in copies.items()}
    todo = [i for i in range(len(files)) if i not in copies]
    drawings = dict(zip(todo, outputs.mirror_paths([files[i] for i in todo], args.draw, outputs.drawing_name))
                    ) if args.draw else {}
    if args.json:
        outputs.check_json_target(args.json, "--json", args.overwrite)
    if args.draw:
        outputs.check_folder_target(args.draw, list(drawings.values()), "--draw", args.overwrite)
    crop_bases = dict(zip(todo, outputs.mirror_paths([files[i] for i in todo], args.crops, outputs.crop_base))
                      ) if args.crops else {}
    if args.crops:
        outputs.check_crops_target(args.crops, list(crop_bases.values()), "--crops", args.overwrite)
    try:
        compile_cache.configure(args.compile_cache)
    except ValueError as err:
        parser.error(str(err))
    params = resolve_params(args.weights)
    batch_size = args.batch_size or buckets.default_batch_size()
    workers = args.workers or buckets.default_workers()
    work = _work_order([files[i] for i in todo], params, cfg, batch_size)
    faces = done = 0
    with outputs.ResultsJson(args.json) as results, \
            tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True) as bar, \
            compiled.CompileAhead(params, [(b, len(c)) for b, c in work.batches], cfg,
                                  on_change=lambda n: bar.set_postfix_str(_compiling(n))):
        def report(line: str, err: bool = True) -> None:
            bar.write(line, file=sys.stderr if err else sys.stdout)

        def failed(i: int, err: ImageError) -> None:
            errors[i] = err
            report(f"error: {err}")
            if i not in copies or files[i] != files[copies[i]]:  # the same string has its entry already
                results.add(files[i], {"error": str(err)})

        def finish(indices: list[int], loaded: list, found: list, lines: list[str]) -> None:
            nonlocal faces, done
            for line in lines:
                report(line)
            for i, img, det in zip(indices, loaded, found):
                if isinstance(det, ImageError):
                    failed(i, det)
                    continue
                if args.draw:
                    outputs.write_drawing(drawings[i], annotate_image(img, det))
                det = with_crops(img, det, args.template if args.crops else None, args.crop_size, args.margin)
                entry = det.to_json()
                if args.crops:
                    entry["crops"] = outputs.write_crops(crop_bases[i], det.aligned.crops)
                results.add(files[i], entry)
                faces, done = faces + len(det), done + 1
                if not args.json:
                    report(f"{files[i]}: {_summary(det)}", err=False)
            bar.update(len(indices))

        for i, err in list(errors.items()):
            failed(i, err)
        bar.update(len(errors))
        running: deque = deque()  # (indices, loaded, future), in the order of `order`: results go out in it
        with ThreadPoolExecutor(workers, thread_name_prefix="mtcnn-detect") as pool:
            try:
                for chunk in work.chunks:
                    indices = [todo[k] for k in chunk]
                    names = [files[i] for i in indices]
                    loaded, notes = map(list, zip(*[_try_load(n, n, args.strict) for n in names]))
                    running.append((indices, loaded, pool.submit(_detect_chunk, loaded, names, notes, params, cfg,
                                                                 batch_size, work.merged)))
                    while len(running) > workers or running and running[0][2].done():
                        indices, loaded, future = running.popleft()
                        finish(indices, loaded, *future.result())
            finally:  # also on Ctrl-C or a crash: the images already sent (at most workers + 1) are kept
                while running:
                    indices, loaded, future = running.popleft()
                    finish(indices, loaded, *future.result())
    print(f"{done} images, {faces} faces, {len(errors)} errors" + (f" (written to {args.json})" if args.json else ""))
    return len(errors)


if __name__ == "__main__":
    sys.exit(main())
