"""Face detection on real images: `detect`, `detect_batch` and their `Detections`, and the command line.

`detect(image)` and `detect_batch(images)` run the fixed-shape cascade (`compiled.detect_bucket`):
images are grouped by their padded bucket and run at a few fixed batch sizes, so only a few shapes
are ever compiled. Inputs are read by `images.load_converted` (grayscale, alpha, palette and 16-bit
images converted to 8-bit RGB, noted in `Detections.converted`; `strict=True` refuses them); a bad input
raises (or, in a batch, yields in its slot) an `ImageError` that names the image.

`detect_stream(frames)` runs the frames of one or more streams (videos, cameras), batched across them
(`streams`); `video_io.read_frames` decodes videos.

Command line: `python -m mtcnn_jax.detect IMAGE_OR_DIR... [--json OUT.json] [--draw OUT_DIR]` (`main`: its flags
and their checks in `detect_flags`, image files in `detect_files`, how it writes them in `outputs`, videos in
`video`). Detection on loaded images, under both, is `detections.detect_loaded`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Hashable, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from mtcnn_jax import buckets, checkpoints, cli, detect_files, pretrained, redetection, streams, video
from mtcnn_jax.align import crop_geometry
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detections import (CapacityWarning, Detections, detect_loaded, empty_detections, run_batch,
                                  warn_overflow, with_crops)
from mtcnn_jax.detect_flags import PROG, build_parser, check_crops, config_from_args
from mtcnn_jax.images import (IMAGE_SUFFIXES, ImageError, ImageSource, list_inputs, load_converted, skipped_line,
                              try_load)
from mtcnn_jax.stages import MIN_FACE_SIZE, SCALE_FACTOR, STAGES, THRESHOLDS

__all__ = ["CapacityWarning", "Detections", "ImageError", "detect", "detect_batch", "detect_stream", "main",
           "make_config", "resolve_params", "stream_detector"]


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
    loaded, converted = zip(*[try_load(s, n, strict) for s, n in zip(sources, names)]) if sources else ((), ())
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
                            lambda det, note: dataclasses.replace(det, converted=note), warn_overflow, params,
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


# ---------------------------------------------------------------------------------------------- command line

@cli.entry(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """CLI: detect faces in images, videos and folders (`detect_flags.EPILOG` says what it checks and writes;
    videos run first, in `video.main`, then the images, in `detect_files.run`). Exit code 1 if any input failed."""
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
    images_failed = detect_files.run(parser, args, cfg, files, resolve_params) if files else 0
    return 1 if images_failed or videos_failed else 0


if __name__ == "__main__":
    sys.exit(main())
