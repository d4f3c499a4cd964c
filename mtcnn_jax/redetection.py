"""Re-detection for video: between full cascades, R-Net and O-Net around the previous frame's faces.

Consecutive frames hold the same faces a few pixels apart, so most of a frame's work, the pyramid and
P-Net, only finds again what the last frame found. `Redetector` runs the whole cascade on a stream's first
frame, every `every` frames after it, and on any frame where re-detection finds fewer faces than the frame
before (a face lost: the frame is run again whole); on the other frames `compiled.redetect_bucket` looks
only around the previous faces (`cascade.redetect_candidates`). Faces that enter between two full frames
are found at the next full one: that, and faces lost without the count dropping, is the recall it costs
(benchmarks/README.md, "Video"). Off by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np

from mtcnn_jax import buckets, compiled
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detect import Detections, detect_slice, run_batch


@dataclass
class _Stream:
    boxes_Kx4: np.ndarray  # the faces of the stream's last frame
    since_full: int  # frames since its last whole cascade


@dataclass
class Redetector:
    """Per-source state of re-detection: the whole cascade every `every` frames (1: always, as without
    re-detection), re-detection around the last faces in between. `full_runs` and `redetect_runs` count
    the frames each way (a lost face's frame counts in both)."""

    every: int
    batch_size: int = field(default_factory=buckets.default_batch_size)
    streams: dict[Hashable, _Stream] = field(default_factory=dict)
    full_runs: int = 0
    redetect_runs: int = 0

    def __post_init__(self):
        if int(self.every) != self.every or self.every < 1:
            raise ValueError(f"every must be a whole number >= 1, got {self.every!r}")

    def needs_full(self, source: Hashable) -> bool:
        """Whether the source's next frame runs the whole cascade."""
        stream = self.streams.get(source)
        return stream is None or stream.since_full + 1 >= self.every or len(stream.boxes_Kx4) == 0

    def detect(self, params: Any, frames: Sequence[np.ndarray], sources: Sequence[Hashable],
               config: CascadeConfig = CascadeConfig()) -> list[Detections]:
        """Detections for one frame of each of `sources` (distinct; frames of one size share a bucket):
        whole cascades where `needs_full` says so, re-detection for the others, whole cascades again
        for those that lost a face."""
        if len(set(sources)) != len(sources) or len(frames) != len(sources):
            raise ValueError("detect takes one frame per source, each source once")
        full = [i for i, s in enumerate(sources) if self.needs_full(s)]
        out: dict[int, Detections] = dict(zip(full, self._full(params, [frames[i] for i in full], config)))
        rest = [i for i in range(len(frames)) if i not in out]
        for i, det in zip(rest, self._redetect(params, [frames[i] for i in rest], [sources[i] for i in rest], config)):
            if len(det) < len(self.streams[sources[i]].boxes_Kx4):
                continue  # a face lost: this frame runs whole below
            out[i] = det
            self.streams[sources[i]].since_full += 1
            self.streams[sources[i]].boxes_Kx4 = det.boxes
        lost = [i for i in range(len(frames)) if i not in out]
        out |= dict(zip(lost, self._full(params, [frames[i] for i in lost], config)))
        for i in full + lost:
            self.streams[sources[i]] = _Stream(out[i].boxes, 0)
        return [out[i] for i in range(len(frames))]

    def _batches(self, frames: Sequence[np.ndarray], config: CascadeConfig) -> list[tuple[tuple, list[int]]]:
        """Frames' indices per bucket, in batches of `buckets.batch_sizes` (few distinct batch shapes)."""
        groups: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            groups.setdefault(buckets.bucket_shape(*frame.shape[:2], config), []).append(i)
        out = []
        for bucket, idx in groups.items():
            starts = np.cumsum([0, *buckets.batch_sizes(len(idx), self.batch_size)])
            out += [(bucket, idx[a:b]) for a, b in zip(starts[:-1], starts[1:])]
        return out

    def _full(self, params: Any, frames: Sequence[np.ndarray], config: CascadeConfig) -> list[Detections]:
        self.full_runs += len(frames)
        out: dict[int, Detections] = {}
        for bucket, idx in self._batches(frames, config):
            out |= dict(zip(idx, run_batch(params, [frames[i] for i in idx], bucket, config)))
        return [out[i] for i in range(len(frames))]

    def _redetect(self, params: Any, frames: Sequence[np.ndarray], sources: Sequence[Hashable],
                  config: CascadeConfig) -> list[Detections]:
        self.redetect_runs += len(frames)
        out: dict[int, Detections] = {}
        for bucket, idx in self._batches(frames, config):
            images_BxHxWx3, sizes_Bx2 = buckets.pad_to_bucket([frames[i] for i in idx], bucket)
            found = compiled.redetect_bucket(params, images_BxHxWx3, sizes_Bx2,
                                             [self.streams[sources[i]].boxes_Kx4 for i in idx], config)
            out |= {i: detect_slice(found, b) for b, i in enumerate(idx)}
        return [out[i] for i in range(len(frames))]
