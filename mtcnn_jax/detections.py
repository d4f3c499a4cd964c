"""What a detection is: the `Detections` of one image, a batch of one bucket run into them, and loaded
images run bucket by bucket.

`run_batch` (the whole cascade) and `redetect_batch` (R-Net and O-Net around faces seen before, for video:
`redetection.py`) pad their images into the bucket, run the compiled program (`compiled.py`) and take
each image's valid rows (`detect_slice`). `detect_loaded` runs loaded images in the batches of
`buckets.plan` (merged where that spares compiles: `merges`), reporting full capacities
(`overflow_messages`). `detect.py` builds the public API and the command line on them, `detect_files.py`
the command line's image files.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mtcnn_jax import buckets, compiled
from mtcnn_jax.align import Aligned, align
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detect_flags import CAPACITY_FIELDS, capacity_flag
from mtcnn_jax.images import ImageError


class CapacityWarning(UserWarning):
    """A fixed capacity of the jitted cascade was full, so some candidates of an image were dropped."""


@dataclass(frozen=True, eq=False)
class Detections:
    """The faces found in one image: boxes_Kx4 (x1, y1, x2, y2), scores_K, landmarks_Kx5x2 (x, y), the
    per-stage counts of candidates dropped at a full capacity (0 when none), how the image was
    converted to 8-bit RGB (e.g. "RGBA -> RGB (alpha on white)"; None when it was RGB) and, when asked
    for (`crops=`), the faces' aligned crops (`align.Aligned`: crops, matrices, inverses)."""

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray
    overflow: dict[str, int] = field(default_factory=dict)
    converted: str | None = None
    aligned: Aligned | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self) -> dict[str, Any]:
        """The shared detections format: {"boxes": [[x1, y1, x2, y2, score], ...], "landmarks": [[[x, y] x 5],
        ...], "overflow": {stage: count}}, "converted": note when the image was converted, and
        "crop_matrices": [2x3 image -> crop matrix per face] when crops were made."""
        boxes = np.column_stack([self.boxes, self.scores]).astype(np.float64)
        out = {"boxes": boxes.tolist(), "landmarks": self.landmarks.astype(np.float64).tolist(),
               "overflow": dict(self.overflow)}
        out |= {"converted": self.converted} if self.converted else {}
        return out | ({"crop_matrices": self.aligned.matrices.astype(np.float64).tolist()} if self.aligned else {})


def empty_detections(overflow: dict[str, int]) -> Detections:
    """No face, with the overflow counts given."""
    return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                      np.zeros((0, 5, 2), np.float32), overflow)


def detect_slice(out: dict[str, Any], b: int) -> Detections:
    """Image b's valid rows of a detect_bucket (or redetect_bucket) result."""
    keep = np.asarray(out["valid"][b], bool)
    overflow = {stage: int(np.asarray(counts)[b]) for stage, counts in out["overflow"].items()}
    if not keep.any():
        return empty_detections(overflow)
    return Detections(np.asarray(out["boxes"][b], np.float32)[keep],
                      np.asarray(out["scores"][b], np.float32)[keep],
                      np.asarray(out["landmarks"][b], np.float32)[keep].reshape(-1, 5, 2), overflow)


def run_batch(params: Any, images: list[np.ndarray], bucket: tuple[int, int],
              config: CascadeConfig) -> list[Detections]:
    """One detect_bucket call on `images` zero-padded into the bucket."""
    images_BxHxWx3, sizes_Bx2 = buckets.pad_to_bucket(images, bucket)
    out = compiled.detect_bucket(params, images_BxHxWx3, sizes_Bx2, config)
    return [detect_slice(out, b) for b in range(len(images))]


def redetect_batch(params: Any, images: list[np.ndarray], bucket: tuple[int, int], boxes: Sequence[np.ndarray],
                   config: CascadeConfig) -> list[Detections]:
    """One redetect_bucket call on `images` zero-padded into the bucket, around `boxes[i]` (K, 4) each."""
    images_BxHxWx3, sizes_Bx2 = buckets.pad_to_bucket(images, bucket)
    out = compiled.redetect_bucket(params, images_BxHxWx3, sizes_Bx2, boxes, config)
    return [detect_slice(out, b) for b in range(len(images))]


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


def warn_overflow(name: str, det: Detections) -> None:
    """One CapacityWarning per stage that dropped candidates of this image (`overflow_messages`)."""
    for line in overflow_messages(name, det):
        warnings.warn(line, CapacityWarning, stacklevel=4)


def detect_loaded(images: Sequence[np.ndarray | ImageError], names: Sequence[str], params: Any,
                  config: CascadeConfig, batch_size: int | None = None,
                  converted: Sequence[str | None] | None = None,
                  warn: Callable[[str, Detections], None] = warn_overflow,
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


def with_crops(image: Any, det: Detections | ImageError, template: Any, size: Any = None,
               margin: float = 0.0) -> Detections | ImageError:
    """`det` with its faces' aligned crops (`align.align` to `template`), or as it is when template is None."""
    if template is None or isinstance(det, ImageError):
        return det
    return dataclasses.replace(det, aligned=align(image, det, template, size, margin=margin))
