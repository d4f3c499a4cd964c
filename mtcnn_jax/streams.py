"""Frames of many streams batched through the cascade together, each stream's results handed back in order.

`detect_frames` is the scheduler under `detect.detect_stream` and the video command line. Each frame is
checked (`images.load_converted`) and queued in its bucket (`buckets.bucket_shape`); a bucket's queue runs
as one batch as soon as it holds `batch_size` frames, whichever streams they came from, on `workers`
threads, so that the next batch is read, padded and queued while the device runs the last one (at most
`depth` batches wait), and with two workers two batches run at once (on CPU the cascade's sequential
parts, NMS and the stage loops, leave a core idle that the other batch takes). A batch that cannot fill
(its stream ended, or moved to another bucket; the end of the input) runs padded with copies of its last
frame, so a bucket needs one compiled program whatever the number of frames. Results come back per source
in the order its frames came; the sources' results are interleaved as they are ready.

Items are `(source, tag, frame)`: `tag` comes back with the result (a frame index, the pixels to draw);
`frame` is an image (array, PIL image or path), a `Passed(value)` that is not detected and comes back as
`value` in its place (a frame skipped, a decoding error), or `END`: the source has no more frames, run its
waiting frames now. `background` and `merged` read items or whole sources on threads (decoding, cameras).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping

import numpy as np

from mtcnn_jax import buckets
from mtcnn_jax.buckets import Bucket
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.images import ImageError, load_converted
from mtcnn_jax.in_order import InOrder, failed_images
from mtcnn_jax.pyramid import pyramid_scales

Item = tuple[Hashable, Any, Any]  # (source, tag, frame | Passed | END)


class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # an item's frame: its source has ended


@dataclass(frozen=True)
class Passed:
    """An item's frame that is not detected: `value` is handed back in its place, in the source's order."""

    value: Any = None


@dataclass(frozen=True)
class Detector:
    """What `detect_frames` runs: `run(frames, bucket, sources)` gives the result of each frame of one bucket
    (the frames zero-padded into it and run as one batch, e.g. `detections.run_batch` with its params and config
    bound; `sources`: each frame's source, None for the copies padding the batch, which re-detection needs:
    `redetection.batch_runner`), `empty` is the result of a frame too small for one pyramid level,
    `noted(result, note)` the result with the frame's conversion to RGB noted, `warn(name, result)` reports a
    full capacity; `params` are the weights (for compiling ahead); `workers` batches run at once."""

    run: Callable[[list[np.ndarray], Bucket, list[Hashable | None]], list[Any]]
    config: CascadeConfig
    batch_size: int
    empty: Any
    noted: Callable[[Any, str], Any] = lambda result, note: result
    warn: Callable[[str, Any], None] = lambda name, result: None
    params: Any = None
    workers: int = 1  # batches run at once; 1 for a `run` that keeps state from batch to batch (re-detection)


@dataclass(eq=False)
class _Slot:
    """One item's place in its source's order: its tag, and its result once known."""

    source: Hashable
    tag: Any
    name: str
    note: str | None = None
    result: Any = None
    done: bool = False
    detected: bool = False  # the result is the detector's (not a Passed value)


@dataclass
class _Router:
    """The state of `detect_frames`: the frames waiting per bucket, the batches running, each source's slots."""

    detector: Detector
    depth: int
    strict: bool
    running: InOrder = field(init=False)  # the batches sent, each with its slots
    waiting: dict[Bucket, list[tuple[_Slot, np.ndarray]]] = field(default_factory=dict)
    order: dict[Hashable, deque[_Slot]] = field(default_factory=dict)
    last_bucket: dict[Hashable, Bucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.running = InOrder(self.detector.workers, "mtcnn-stream")

    def put(self, source: Hashable, tag: Any, frame: Any, name: str) -> None:
        """Queue one item: a frame in its bucket (its batch sent when full), a Passed value or an error as done."""
        if frame is END:
            for bucket in [b for b, queued in self.waiting.items() if any(s.source == source for s, _ in queued)]:
                self._send(bucket)
            return
        slot = _Slot(source, tag, name)
        self.order.setdefault(source, deque()).append(slot)
        if isinstance(frame, Passed):
            return self._finish(slot, frame.value)
        slot.detected = True
        try:
            image, slot.note = load_converted(frame, name, strict=self.strict)
        except ImageError as err:
            return self._finish(slot, err)
        cfg = self.detector.config
        if not pyramid_scales(*image.shape[:2], cfg.min_face_size, cfg.scale_factor):
            return self._finish(slot, self.detector.empty)  # no pyramid level: no face, as detect_batch
        if image is frame:
            image = image.copy()  # kept until its batch runs: the caller may reuse its buffer
        bucket = buckets.bucket_shape(*image.shape[:2], cfg)
        before = self.last_bucket.get(source)
        if before not in (None, bucket) and before in self.waiting:
            if any(s.source == source for s, _ in self.waiting[before]):
                self._send(before)  # the source moved on: its frames there would hold back its results
        self.last_bucket[source] = bucket
        self.waiting.setdefault(bucket, []).append((slot, image))
        if len(self.waiting[bucket]) >= self.detector.batch_size:
            self._send(bucket)

    def _send(self, bucket: Bucket) -> None:
        """Run the bucket's waiting frames as one batch on the worker, padded to the batch size."""
        queued = self.waiting.pop(bucket)
        frames, pad = [image for _, image in queued], self.detector.batch_size - len(queued)
        sources = [s.source for s, _ in queued] + [None] * pad
        self.running.submit([s for s, _ in queued], self.detector.run, frames + [frames[-1]] * pad, bucket, sources)

    def _finish(self, slot: _Slot, result: Any) -> None:
        if slot.note and slot.detected and not isinstance(result, Exception):
            result = self.detector.noted(result, slot.note)
        slot.result, slot.done = result, True

    def collect(self, wait: bool) -> None:
        """Take the results of the batches done (in the order sent), waiting while more than `depth` are
        queued, or for all of them when `wait`. A batch that failed is each of its frames' ImageError."""
        for slots, results, err in self.running.done(None if wait else self.depth):
            if err is not None:
                results = failed_images([s.name for s in slots], err)
            for slot, result in zip(slots, results):
                self._finish(slot, result)

    def ready(self) -> Iterator[tuple[Hashable, Any, Any]]:
        """Each source's done results from its first not yet handed back, in its order."""
        for source, slots in list(self.order.items()):
            while slots and slots[0].done:
                slot = slots.popleft()
                if slot.detected and not isinstance(slot.result, Exception):
                    self.detector.warn(slot.name, slot.result)
                yield source, slot.tag, slot.result
            if not slots:
                del self.order[source]  # nothing waits: a source seen again starts a new queue

    def flush(self) -> None:
        for bucket in list(self.waiting):
            self._send(bucket)


def _name(source: Hashable, tag: Any) -> str:
    return f"{source!r} frame {tag!r}"


def detect_frames(items: Iterable[Item], detector: Detector, *, name: Callable[[Hashable, Any], str] = _name,
                  strict: bool = False, depth: int = 2) -> Iterator[tuple[Hashable, Any, Any]]:
    """(source, tag, result) for each (source, tag, frame) item that is not END: the frame's Detections
    (or ImageError, e.g. a frame that is not an image: `name(source, tag)` names it), or a Passed value;
    in each source's order, sources interleaved as their results are ready (see the module docstring)."""
    if detector.batch_size < 1 or depth < 1 or detector.workers < 1:
        raise ValueError(f"batch_size, depth and workers must be >= 1, got {detector.batch_size}, {depth} and "
                         f"{detector.workers}")
    router = _Router(detector, depth, strict)
    try:
        for source, tag, frame in items:
            router.put(source, tag, frame, "" if frame is END or isinstance(frame, Passed) else name(source, tag))
            router.collect(wait=False)
            yield from router.ready()
        router.flush()
        router.collect(wait=True)
        yield from router.ready()
    finally:
        router.running.close()
        close = getattr(items, "close", None)
        if close is not None:
            close()  # e.g. stop the threads reading the sources


# ---------------------------------------------------------------------------------------------- reading on threads

@dataclass(frozen=True)
class _Failed:
    error: BaseException


def _pump(items: Iterable[Any], out: queue.Queue, stop: threading.Event, wrap: Callable[[Any], Any],
          last: Any) -> None:
    """Put each item (wrapped) into `out`, then `last`; an exception is put as _Failed. Stops when told."""

    def put(value: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in items:
            if not put(wrap(item)):
                break
        else:
            put(last)
    except BaseException as err:  # noqa: BLE001 - raised again in the reading thread
        put(_Failed(err))
    finally:
        close = getattr(items, "close", None)
        if close is not None and stop.is_set():
            close()


class _Done:
    pass


def background(items: Iterable[Any], size: int) -> Iterator[Any]:
    """`items` read ahead on a thread into a queue of `size` (e.g. decoding while the device runs); an
    exception of the reader is raised here; closing this iterator stops the reader."""
    out: queue.Queue = queue.Queue(max(size, 1))
    stop, done = threading.Event(), _Done()
    reader = threading.Thread(target=_pump, args=(items, out, stop, lambda x: x, done), daemon=True,
                              name="mtcnn-read")
    reader.start()
    try:
        while (value := out.get()) is not done:
            if isinstance(value, _Failed):
                raise value.error
            yield value
    finally:
        stop.set()


def merged(sources: Mapping[Hashable, Iterable[Any]], size: int) -> Iterator[tuple[Hashable, Any]]:
    """(source, frame) pairs of several sources read on a thread each, as they come (a slow camera does not
    hold up the others), then (source, END) after each source's last; a source's exception is raised here."""
    out: queue.Queue = queue.Queue(max(size, 1))
    stop = threading.Event()
    for key, frames in sources.items():
        threading.Thread(target=_pump, args=(frames, out, stop, lambda f, key=key: (key, f), (key, END)),
                         daemon=True, name=f"mtcnn-read-{key}").start()
    live = len(sources)
    try:
        while live:
            value = out.get()
            if isinstance(value, _Failed):
                raise value.error
            live -= value[1] is END
            yield value
    finally:
        stop.set()


def numbered(frames: Iterable[tuple[Hashable, Any]] | Mapping[Hashable, Iterable[Any]],
             size: int) -> Iterator[Item]:
    """`detect_frames` items (source, k, frame), k counting each source's frames from 0, from (source,
    frame) pairs or from {source: frames} (read by `merged`)."""
    counts: dict[Hashable, int] = {}
    pairs = merged(frames, size) if isinstance(frames, Mapping) else frames
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(f"detect_stream takes (source, frame) pairs or a {{source: frames}} mapping, got an "
                            f"item of type {type(pair).__name__}; for one stream pass {{'name': frames}}")
        source, frame = pair
        if frame is END:
            yield source, None, END
            continue
        k = counts.get(source, 0)
        counts[source] = k + 1
        yield source, k, frame
