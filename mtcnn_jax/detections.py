"""What a detection is: the `Detections` of one image, and a batch of one bucket run into them.

`run_batch` (the whole cascade) and `redetect_batch` (R-Net and O-Net around faces seen before, for video:
`redetection.py`) pad their images into the bucket, run the compiled program (`compiled.py`) and take
each image's valid rows (`detect_slice`). `detect.py` builds the public API and the command line on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mtcnn_jax import buckets, compiled
from mtcnn_jax.align import Aligned
from mtcnn_jax.cascade_config import CascadeConfig


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
