"""The detector's settings: detect_face.m's constants and the fixed capacities of the jitted cascade.

One frozen (hashable) dataclass, so a config can key the compiled cascades (`compiled.compiled_cascade`)
and the pyramid plans (`pyramid.PyramidPlan.of`). Its defaults come from `stages.py`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from mtcnn_jax.stages import MIN_FACE_SIZE, SCALE_FACTOR, THRESHOLDS


@dataclass(frozen=True)
class CascadeConfig:
    """Detector constants (detect_face.m defaults) and the fixed capacities of the jitted path."""

    min_face_size: float = MIN_FACE_SIZE
    scale_factor: float = SCALE_FACTOR
    thresholds: tuple[float, float, float] = THRESHOLDS
    nms_level: float = 0.5  # P-Net, within one pyramid level (Union)
    nms_pnet: float = 0.7  # P-Net, over all levels (Union)
    nms_rnet: float = 0.7  # after R-Net (Union)
    nms_onet: float = 0.7  # after O-Net (Min)
    # None: from the bucket's area (bucket pixels / 128 and / 512 in multiples of 256, from 1024 to
    # 16384 and from 512 to 4096), for the crowd images of WIDER FACE; set a number to fix it. The work
    # of every stage follows its valid candidates, not its capacity (chunked nets, sequential NMS on CPU).
    window_capacity: int | None = None  # P-Net windows >= t1 over all levels, before the NMS
    pnet_capacity: int | None = None  # candidates cropped for R-Net
    rnet_capacity: int = 512  # candidates cropped for O-Net
    max_faces: int = 512  # final detections per image (WIDER FACE crowds hold hundreds)
    net_chunk: int = 16  # R-Net/O-Net run over chunks of this many slots, only while chunks hold candidates
    bucket_multiple: int = 0  # 0: bucket sides from the ladder (`buckets.bucket_side`); N: sides rounded up to N
    # Landmarks averaged with O-Net's on the mirrored crops (the original's later release; boxes and scores
    # are detect_face.m's either way). False: detect_face.m's landmarks exactly.
    mirror_landmarks: bool = True

    def __post_init__(self):
        """Refuse settings the cascade cannot run with, naming the field (the detect CLI names its flag)."""
        if not (_finite(self.min_face_size) and self.min_face_size > 0):
            raise ValueError(f"min_face_size must be a number > 0 (pixels), got {self.min_face_size}")
        if not (_finite(self.scale_factor) and 0 < self.scale_factor < 1):
            raise ValueError(f"scale_factor must be a number in (0, 1), got {self.scale_factor}")
        t = self.thresholds
        if not isinstance(t, tuple) or len(t) != 3 or not all(_finite(x) and 0 < x <= 1 for x in t):
            raise ValueError(f"thresholds must be a tuple of 3 numbers in (0, 1], one per stage, got {t!r}")
        for name in ("nms_level", "nms_pnet", "nms_rnet", "nms_onet"):
            if not (_finite(getattr(self, name)) and 0 < getattr(self, name) <= 1):
                raise ValueError(f"{name} must be an overlap in (0, 1], got {getattr(self, name)}")
        for name in ("window_capacity", "pnet_capacity", "rnet_capacity", "max_faces", "net_chunk"):
            value = getattr(self, name)
            if not (value is None and name in ("window_capacity", "pnet_capacity") or _count(value)):
                raise ValueError(f"{name} must be an integer >= 1, got {value}")
        for name in ("pnet_capacity", "rnet_capacity"):
            if (getattr(self, name) or 0) % self.net_chunk:
                raise ValueError(f"{name} must be a multiple of net_chunk={self.net_chunk}, got {getattr(self, name)}")
        if not (isinstance(self.bucket_multiple, numbers.Integral) and self.bucket_multiple >= 0):
            raise ValueError(f"bucket_multiple must be >= 0 (0: the bucket ladder), got {self.bucket_multiple}")
        if not isinstance(self.mirror_landmarks, bool):
            raise ValueError(f"mirror_landmarks must be True or False, got {self.mirror_landmarks!r}")


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _count(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
