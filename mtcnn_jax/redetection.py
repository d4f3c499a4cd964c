"""Re-detection for video: between full cascades, R-Net and O-Net around the previous frame's faces.

Consecutive frames hold the same faces a few pixels apart, so most of a frame's work, the pyramid and
P-Net, only finds again what the last frame found. `Redetector` runs the whole cascade on a stream's first
frame, every `every` frames after it, and on any frame where re-detection finds fewer faces than the frame
before (a face lost: the frame is run again whole); on the other frames `compiled.redetect_bucket` looks
only around the previous faces (`cascade.redetect_candidates`; a stream without faces costs nothing until
its next whole frame, one with more than `cascade.REDETECT_FACES` runs whole). Faces that enter between two
whole frames are found at the next one: that, and faces lost without the count dropping, is the recall it
costs (benchmarks/README.md, "Video"). Off by default.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from mtcnn_jax import buckets, cascade
from mtcnn_jax.buckets import Bucket
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detections import Detections, empty_detections, redetect_batch, run_batch


@dataclass
class _Stream:
    boxes_Kx4: np.ndarray  # the faces of the stream's last frame
    since_full: int  # frames since its last whole cascade


@dataclass
class Redetector:
    """Per-source state of re-detection: the whole cascade every `every` frames (1: always, as without
    re-detection), re-detection around the last faces in between. `full(frames, bucket)` and
    `around(frames, bucket, boxes)` run one batch of a bucket each way (`detections.run_batch` and
    `redetect_batch` with their params and config bound: `Redetector.of`). `full_runs` and
    `redetect_runs` count the frames each way (a lost face's frame counts in both)."""

    every: int
    full: Callable[[list[np.ndarray], Bucket], list[Detections]]
    around: Callable[[list[np.ndarray], Bucket, list[np.ndarray]], list[Detections]]
    config: CascadeConfig = CascadeConfig()
    batch_size: int = field(default_factory=buckets.default_batch_size)
    streams: dict[Hashable, _Stream] = field(default_factory=dict)
    full_runs: int = 0
    redetect_runs: int = 0

    @staticmethod
    def of(params: Any, every: int, config: CascadeConfig = CascadeConfig(),
           batch_size: int | None = None) -> "Redetector":
        """A Redetector running the cascade with these params (a device param tree) and config."""
        return Redetector(every, functools.partial(run_batch, params, config=config),
                          functools.partial(redetect_batch, params, config=config), config,
                          batch_size or buckets.default_batch_size())

    def __post_init__(self):
        if int(self.every) != self.every or self.every < 1:
            raise ValueError(f"every must be a whole number >= 1, got {self.every!r}")

    def needs_full(self, source: Hashable) -> bool:
        """Whether the source's next frame runs the whole cascade."""
        stream = self.streams.get(source)
        return (stream is None or stream.since_full + 1 >= self.every
                or len(stream.boxes_Kx4) > cascade.REDETECT_FACES)

    def detect(self, frames: Sequence[np.ndarray], sources: Sequence[Hashable]) -> list[Detections]:
        """Detections for one frame of each of `sources` (distinct; frames of one size share a bucket):
        whole cascades where `needs_full` says so, re-detection for the others, whole cascades again
        for those that lost a face."""
        if len(set(sources)) != len(sources) or len(frames) != len(sources):
            raise ValueError("detect takes one frame per source, each source once")
        full = [i for i, s in enumerate(sources) if self.needs_full(s)]
        out: dict[int, Detections] = dict(zip(full, self._full([frames[i] for i in full])))
        rest = [i for i in range(len(frames)) if i not in out]
        for i, det in zip(rest, self._redetect([frames[i] for i in rest], [sources[i] for i in rest])):
            if len(det) < len(self.streams[sources[i]].boxes_Kx4):
                continue  # a face lost: this frame runs whole below
            out[i] = det
            self.streams[sources[i]].since_full += 1
            self.streams[sources[i]].boxes_Kx4 = det.boxes
        lost = [i for i in range(len(frames)) if i not in out]
        out |= dict(zip(lost, self._full([frames[i] for i in lost])))
        for i in full + lost:
            self.streams[sources[i]] = _Stream(out[i].boxes, 0)
        return [out[i] for i in range(len(frames))]

    def _batches(self, frames: Sequence[np.ndarray]) -> list[tuple[Bucket, list[int]]]:
        """Frames' indices per bucket in batches (`buckets.plan`; frames too small for a face left out)."""
        return buckets.plan([frame.shape[:2] for frame in frames], self.config, self.batch_size)

    def _full(self, frames: Sequence[np.ndarray]) -> list[Detections]:
        self.full_runs += len(frames)
        out = [empty_detections({})] * len(frames)  # a frame too small for one pyramid level: no face
        for bucket, idx in self._batches(frames):
            for i, det in zip(idx, self.full([frames[i] for i in idx], bucket)):
                out[i] = det
        return out

    def _redetect(self, frames: Sequence[np.ndarray], sources: Sequence[Hashable]) -> list[Detections]:
        self.redetect_runs += len(frames)
        looked = [i for i in range(len(frames)) if len(self.streams[sources[i]].boxes_Kx4)]
        out = [empty_detections({})] * len(frames)  # no face to follow (or too small for one): none found
        for bucket, idx in self._batches([frames[i] for i in looked]):
            idx = [looked[k] for k in idx]
            boxes = [self.streams[sources[i]].boxes_Kx4 for i in idx]
            for i, det in zip(idx, self.around([frames[i] for i in idx], bucket, boxes)):
                out[i] = det
        return out


def batch_runner(tracker: Redetector) -> Callable[[list[np.ndarray], Bucket, list[Hashable | None]], list]:
    """`streams.Detector.run` with re-detection: a batch's frames of different sources run together, the
    frames of one source one after another (each needs the faces of the one before); padding (source None)
    gets no result."""

    def run(frames: list[np.ndarray], bucket: Bucket, sources: list[Hashable | None]) -> list:
        out: list = [None] * len(frames)
        left = [i for i, s in enumerate(sources) if s is not None]
        while left:
            firsts = sorted({sources[i]: i for i in reversed(left)}.values())  # each source's earliest
            for i, det in zip(firsts, tracker.detect([frames[i] for i in firsts], [sources[i] for i in firsts])):
                out[i] = det
            left = [i for i in left if out[i] is None]
        return out

    return run
