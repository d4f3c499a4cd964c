"""Face detection on real images: `detect`, `detect_batch` and their `Detections`, and the command line.

`detect(image)` and `detect_batch(images)` run the fixed-shape cascade (`compiled.detect_bucket`):
images are grouped by their padded bucket and run at a few fixed batch sizes, so only a few shapes
are ever compiled. Bad inputs (`images.load_image`) raise (or, in a batch, yield) an `ImageError` that
names the image.

Command line: `python -m mtcnn_jax.detect IMAGE_OR_DIR... [--json OUT.json] [--draw OUT_DIR]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from tqdm import tqdm

from mtcnn_jax import buckets, checkpoints, compile_cache, compiled, pretrained
from mtcnn_jax.annotate import annotate_image
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.images import IMAGE_SUFFIXES, ImageError, ImageSource, load_image
from mtcnn_jax.stages import MIN_FACE_SIZE, SCALE_FACTOR, STAGES, THRESHOLDS


class CapacityWarning(UserWarning):
    """A fixed capacity of the jitted cascade was full, so some candidates of an image were dropped."""


@dataclass(frozen=True, eq=False)
class Detections:
    """The faces found in one image: boxes_Kx4 (x1, y1, x2, y2), scores_K, landmarks_Kx5x2 (x, y) and
    the per-stage counts of candidates dropped at a full capacity (0 when none)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    overflow: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self) -> dict[str, list]:
        """The shared detections format: {"boxes": [[x1, y1, x2, y2, score], ...], "landmarks": [[[x, y] x 5], ...]}."""
        boxes = np.column_stack([self.boxes, self.scores]).astype(np.float64)
        return {"boxes": boxes.tolist(), "landmarks": self.landmarks.astype(np.float64).tolist()}


# ---------------------------------------------------------------------------------------------- inputs

def _source_name(source: ImageSource, index: int) -> str:
    """How errors and warnings name an input of a batch: its path, else its index."""
    return str(source) if isinstance(source, (str, os.PathLike)) else f"images[{index}]"


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
    """`config` if given (the keywords must then keep their defaults), else a CascadeConfig of the keywords."""
    keywords = {"min_face_size": float(min_face_size), "scale_factor": float(scale_factor),
                "thresholds": tuple(float(t) for t in thresholds)}
    if config is None:
        return CascadeConfig(**keywords)
    changed = [k for k, v in keywords.items() if v != getattr(CascadeConfig(), k)]
    if changed:
        raise ValueError(f"pass either config or the keywords {changed}, not both")
    return config


def _empty_detections(overflow: dict[str, int]) -> Detections:
    return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                      np.zeros((0, 5, 2), np.float32), overflow)


def _slice(out: dict[str, Any], b: int) -> Detections:
    """Image b's valid rows of a detect_bucket result."""
    keep = np.asarray(out["valid"][b], bool)
    overflow = {stage: int(np.asarray(counts)[b]) for stage, counts in out["overflow"].items()}
    if not keep.any():
        return _empty_detections(overflow)
    return Detections(np.asarray(out["boxes"][b], np.float32)[keep],
                      np.asarray(out["scores"][b], np.float32)[keep],
                      np.asarray(out["landmarks"][b], np.float32)[keep].reshape(-1, 5, 2), overflow)


def _run_batch(params: Any, images: list[np.ndarray], bucket: tuple[int, int],
               config: CascadeConfig) -> list[Detections]:
    """One detect_bucket call on `images` zero-padded into the bucket."""
    images_BxHxWx3, sizes_Bx2 = buckets.pad_to_bucket(images, bucket)
    out = compiled.detect_bucket(params, images_BxHxWx3, sizes_Bx2, config)
    return [_slice(out, b) for b in range(len(images))]


# Which CascadeConfig field bounds each stage that detect_bucket reports overflow for.
CAPACITY_FIELDS = {"window": "window_capacity", "pnet": "pnet_capacity",
                   "rnet": "rnet_capacity", "faces": "max_faces"}


def capacity_flag(field_name: str) -> str:
    """The command-line flag that sets a CascadeConfig capacity field (build_parser adds one per field)."""
    return "--" + field_name.replace("_", "-")


def _warn_overflow(name: str, det: Detections) -> None:
    """One CapacityWarning per stage that dropped candidates of this image, naming the field to raise."""
    for stage, dropped in det.overflow.items():
        if dropped > 0:
            field_name = CAPACITY_FIELDS.get(stage)
            field = (f"CascadeConfig.{field_name} ({capacity_flag(field_name)})" if field_name
                     else "the matching capacity")
            warnings.warn(f"{name}: {dropped} candidates dropped at stage {stage!r} (capacity full); "
                          f"raise {field} to keep them", CapacityWarning, stacklevel=4)


def detect_loaded(images: Sequence[np.ndarray | ImageError], names: Sequence[str], params: Any,
                  config: CascadeConfig, batch_size: int | None = None) -> list[Detections | ImageError]:
    """Detection on already loaded images (errors pass through in their slots), run bucket by bucket in
    the batches of `buckets.plan`."""
    results: list[Detections | ImageError] = [
        img if isinstance(img, ImageError) else _empty_detections({}) for img in images]  # no level: no face
    sizes = [None if isinstance(img, ImageError) else img.shape[:2] for img in images]
    for bucket, chunk in buckets.plan(sizes, config, batch_size or buckets.default_batch_size()):
        for i, det in zip(chunk, _run_batch(params, [images[i] for i in chunk], bucket, config)):
            _warn_overflow(names[i], det)
            results[i] = det
    return results


def _try_load(source: ImageSource, name: str) -> np.ndarray | ImageError:
    """The loaded image, or its ImageError as a value (a batch goes on past it)."""
    try:
        return load_image(source, name)
    except ImageError as err:
        return err


def detect_batch(images: Iterable[ImageSource], params: Any = None, *, min_face_size: float = MIN_FACE_SIZE,
                 scale_factor: float = SCALE_FACTOR, thresholds: Sequence[float] = THRESHOLDS,
                 config: CascadeConfig | None = None,
                 batch_size: int | None = None) -> list[Detections | ImageError]:
    """Faces in many images of any sizes; a bad image yields its ImageError in its slot, the rest still run.

    Images of one bucket run `batch_size` at a time (default `buckets.default_batch_size()`). Warns
    (CapacityWarning) naming the image and stage when a fixed capacity dropped candidates.
    """
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(f"detect_batch takes a list of images, not one path ({images!r}): use detect() for one")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cfg = make_config(config, min_face_size, scale_factor, thresholds)
    sources = list(images)
    names = [_source_name(s, i) for i, s in enumerate(sources)]
    loaded = [_try_load(s, n) for s, n in zip(sources, names)]
    if all(isinstance(x, ImageError) for x in loaded):
        return loaded
    return detect_loaded(loaded, names, resolve_params(params), cfg, batch_size)


def detect(image: ImageSource, params: Any = None, *, min_face_size: float = MIN_FACE_SIZE,
           scale_factor: float = SCALE_FACTOR, thresholds: Sequence[float] = THRESHOLDS,
           config: CascadeConfig | None = None) -> Detections:
    """Faces in one image (a path, PIL image or uint8 H x W x 3 array); raises ImageError for a bad input."""
    cfg = make_config(config, min_face_size, scale_factor, thresholds)
    name = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    img = load_image(image, name)
    return detect_loaded([img], [name], resolve_params(params), cfg)[0]


# ---------------------------------------------------------------------------------------------- command line

def expand_inputs(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """(path as given or dir joined with the relative path, name relative to its given dir) per file;
    directories are searched recursively for image suffixes, sorted."""
    out = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(p.relative_to(path) for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            out += [(os.path.join(given, str(rel)), str(rel)) for rel in found]
        else:
            out.append((given, path.name))
    return out


def _draw_name(rel: str) -> str:
    """The annotated copy's name: the same relative name, as .jpg for JPEGs and .png otherwise."""
    p = Path(rel)
    return str(p) if p.suffix.lower() in (".jpg", ".jpeg", ".png") else str(p.with_suffix(".png"))


def _write_drawing(out_dir: Path, rel: str, img: np.ndarray, det: Detections) -> None:
    target = out_dir / _draw_name(rel)
    target.parent.mkdir(parents=True, exist_ok=True)
    annotate_image(img, det).save(target, quality=92)  # PNG ignores the JPEG quality


def _summary(det: Detections) -> str:
    scores = ", ".join(f"{s:.2f}" for s in det.scores[:8]) + (", ..." if len(det) > 8 else "")
    return f"{len(det)} face{'s' if len(det) != 1 else ''}" + (f" ({scores})" if len(det) else "")


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments."""
    p = argparse.ArgumentParser(prog="python -m mtcnn_jax.detect", description=__doc__.split("\n")[0])
    defaults = CascadeConfig()
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories (recursive)")
    p.add_argument("--weights", default=None, help="an Orbax cascade checkpoint dir (default: the original weights)")
    p.add_argument("--min-face-size", type=float, default=MIN_FACE_SIZE)
    p.add_argument("--scale-factor", type=float, default=SCALE_FACTOR)
    p.add_argument("--thresholds", type=float, nargs=3, default=THRESHOLDS, metavar=("T1", "T2", "T3"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="images of one bucket run together (default: 1 on CPU, where larger batches run "
                        "slower per image, 8 on accelerators)")
    p.add_argument("--bucket-multiple", type=int, default=defaults.bucket_multiple, metavar="N",
                   help="0 (default): pad image sides up to the bucket ladder 128, 192, 256, 384, 512, 768, "
                        "1024, ... (few compiles); N: up to multiples of N (less padding, one compile per "
                        "padded size); detections do not change")
    compile_cache.add_flag(p)
    for field_name in CAPACITY_FIELDS.values():  # a capacity that overflows names its flag in the warning
        default = getattr(defaults, field_name)
        p.add_argument(capacity_flag(field_name), type=int, default=default, metavar="N",
                       help=f"CascadeConfig.{field_name} (default: {default or 'from the image size'})")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write {path: detections} here")
    p.add_argument("--draw", default=None, metavar="OUT_DIR", help="write annotated copies here")
    return p


def _process_chunk(files: list[tuple[str, str]], params: Any, cfg: CascadeConfig, args: argparse.Namespace,
                   report: Any) -> dict[str, Detections]:
    """Load, detect and (optionally) draw one chunk of files; each failure is one reported line."""
    names = [given for given, _ in files]
    loaded = [_try_load(given, given) for given in names]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CapacityWarning)
        results = detect_loaded(loaded, names, params, cfg, args.batch_size)
    for w in caught:
        report(f"warning: {w.message}")
    found = {}
    for (given, rel), img, det in zip(files, loaded, results):
        if isinstance(det, ImageError):
            report(f"error: {det}")
            continue
        found[given] = det
        if args.draw:
            _write_drawing(Path(args.draw), rel, img, det)
        if not args.json:
            report(f"{given}: {_summary(det)}", err=False)
    return found


def _work_order(files: list[tuple[str, str]], cfg: CascadeConfig,
                batch_size: int) -> tuple[list[tuple[tuple[int, int], list[int]]], list[list[int]]]:
    """The batches planned from the files' headers (`buckets.plan`), and every file's index in chunks of
    work: the planned batches in order, then the files no bucket was planned for (unreadable headers,
    images too small for a face) in chunks of `batch_size`."""
    batches = buckets.plan([buckets.header_hw(given) for given, _ in files], cfg, batch_size)
    planned = {i for _, chunk in batches for i in chunk}
    rest = [i for i in range(len(files)) if i not in planned]
    return batches, [chunk for _, chunk in batches] + [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]


def _compiling(n: int) -> str:
    """The progress bar's note on compiling ahead."""
    return f"{n} bucket{'s' if n != 1 else ''} compiling" if n else "all buckets compiled"


def main(argv: list[str] | None = None) -> int:
    """CLI: detect faces in images and directories; 0 when at least one image was processed, else 1.
    The buckets the files need are planned from their headers and compiled on a background thread while
    the buckets already compiled run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = make_config(None, args.min_face_size, args.scale_factor, args.thresholds)
    capacities = {f: getattr(args, f) for f in CAPACITY_FIELDS.values()}
    cfg = dataclasses.replace(cfg, bucket_multiple=args.bucket_multiple, **capacities)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.json and Path(args.json).is_dir():
        parser.error(f"--json {args.json} is a folder: give a file name, e.g. {Path(args.json) / 'faces.json'}")
    if args.draw and Path(args.draw).exists() and not Path(args.draw).is_dir():
        parser.error(f"--draw {args.draw} is a file: give a folder for the annotated copies")
    try:
        compile_cache.configure(args.compile_cache)
    except ValueError as err:
        parser.error(str(err))
    files = expand_inputs(args.inputs)
    params = resolve_params(args.weights)
    args.batch_size = args.batch_size or buckets.default_batch_size()
    batches, order = _work_order(files, cfg, args.batch_size)
    results: dict[str, Detections] = {}
    with tqdm(total=len(files), unit="img", file=sys.stderr, dynamic_ncols=True) as bar, \
            compiled.CompileAhead(params, [(b, len(c)) for b, c in batches], cfg,
                                 on_change=lambda n: bar.set_postfix_str(_compiling(n))):
        def report(line: str, err: bool = True) -> None:
            bar.write(line, file=sys.stderr if err else sys.stdout)

        for chunk in order:
            results.update(_process_chunk([files[i] for i in chunk], params, cfg, args, report))
            bar.update(len(chunk))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({k: d.to_json() for k, d in results.items()}))
    errors = len(files) - len(results)
    print(f"{len(results)} images, {sum(len(d) for d in results.values())} faces, {errors} errors"
          + ("" if files else " (no image files found in the inputs)"))
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
