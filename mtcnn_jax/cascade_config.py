"""The detector's settings: detect_face.m's constants and the fixed capacities of the jitted cascade.

One frozen (hashable) dataclass, so a config can key the compiled cascades (`compiled.compiled_cascade`)
and the pyramid plans (`pyramid.PyramidPlan.of`). Its defaults come from `stages.py`.
"""

from __future__ import annotations

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

    def __post_init__(self):
        for name in ("pnet_capacity", "rnet_capacity"):
            if (getattr(self, name) or 0) % self.net_chunk:
                raise ValueError(f"{name} must be a multiple of net_chunk={self.net_chunk}")
        if self.min_face_size <= 0 or not 0 < self.scale_factor < 1:
            raise ValueError("min_face_size must be > 0 and 0 < scale_factor < 1")
        if self.bucket_multiple < 0:
            raise ValueError(f"bucket_multiple must be >= 0 (0: the bucket ladder), got {self.bucket_multiple}")
