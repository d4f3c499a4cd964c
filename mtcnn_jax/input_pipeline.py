"""The training input pipeline: which samples each step trains on, reading them, and preparing batches ahead.

A sample source is anything with `__len__` and `__getitem__(i)` (and, read in one go where it has it,
`__getitems__(indices)`) returning dicts with "image" uint8 (S, S, 3) (S = 12/24/48 for the stage),
"label" (1 positive, 0 negative, -1 part, -2 landmark), "box" (4,) and "landmarks" (10,), as
`mtcnn_jax.datasets.load_samples` gives; other keys are ignored. It is read one of two ways:

- streamed (`StreamedSamples`, the default): each batch is read from the source when it is needed, so
  memory holds a few batches whatever the size of the set;
- in memory (`InMemorySamples`): the whole set read once at start-up into arrays, for sets that fit.

Both give the same batches, bit for bit. The indices of step s are consecutive slices of one seeded
permutation per epoch (`step_indices`), then `augment` flips and perturbs them, so a batch is a pure function
of (data, seed, s) and a resumed run sees what an uninterrupted one would. On several processes each reads
and augments only its own rows of that global batch (`process_batch`): together they train on the batch
one process would. `Prefetch` prepares the next few
batches on a background thread while the devices run the current step.
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from mtcnn_jax import stages
from mtcnn_jax.augment import augment
from mtcnn_jax.train_config import TrainConfig

PAD_LABEL = -3  # pads the last evaluation batch: in no task, so it changes no loss or metric
PREFETCH = 4  # batches the background thread prepares ahead of the step


def gather(source: Any, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Stack the samples at `indices` into a batch {"image" (B,S,S,3) uint8, "label" (B,), "box", "landmarks"}."""
    indices = [int(i) for i in indices]
    many = getattr(source, "__getitems__", None)  # tfds data sources read a list of records at once
    samples = many(indices) if many is not None else [source[i] for i in indices]
    return {
        "image": np.stack([np.asarray(s["image"], np.uint8) for s in samples]),
        "label": np.array([int(s["label"]) for s in samples], np.int32),
        "box": np.stack([np.asarray(s["box"], np.float32) for s in samples]),
        "landmarks": np.stack([np.asarray(s["landmarks"], np.float32) for s in samples]),
    }


def _gather_checked(source: Any, indices: Sequence[int], config: TrainConfig) -> dict[str, np.ndarray]:
    """`gather`, with a ValueError naming the first sample whose image is not the stage's (S, S, 3)."""
    want = (config.input_size, config.input_size, 3)
    try:
        batch = gather(source, indices)
        bad = None if batch["image"].shape[1:] == want else int(indices[0])
    except ValueError:  # np.stack of mixed shapes
        bad = next(int(i) for i in indices if np.shape(source[int(i)]["image"]) != want)
    if bad is not None:
        raise ValueError(f"sample {bad}: image of shape {np.shape(source[bad]['image'])}, "
                         f"{config.stage} needs {want}")
    return batch


def _check_labels(labels_N: np.ndarray, indices_N: np.ndarray) -> None:
    """ValueError naming the samples whose label is none of the four sample types."""
    bad = np.flatnonzero(~np.isin(labels_N, stages.LABELS))
    if bad.size:
        found = sorted(set(labels_N[bad].tolist()))
        raise ValueError(f"samples {np.asarray(indices_N)[bad][:10].tolist()}: labels {found} not in {stages.LABELS}")


def _check_not_empty(source: Any) -> int:
    n = len(source)
    if n == 0:
        raise ValueError("the sample set is empty: nothing to train on")
    return n


class ConcatSamples:
    """Several sample sources read as one (the shards of a sample set, `sample_shards.load_sample_set`): index i
    runs through the first source, then the second, ...; a batch is one batched read per source it touches."""

    def __init__(self, parts: Sequence[Any]) -> None:
        self.parts = list(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Any:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        indices_N = np.asarray(indices, np.int64).reshape(-1)
        if indices_N.size and not (0 <= indices_N.min() and indices_N.max() < len(self)):
            raise IndexError(f"sample index out of range 0 .. {len(self) - 1}")
        part_N = np.searchsorted(self.starts, indices_N, side="right") - 1
        out: list = [None] * len(indices_N)
        for part in np.unique(part_N):
            at = np.flatnonzero(part_N == part)
            local = (indices_N[at] - self.starts[part]).tolist()
            source = self.parts[part]
            many = getattr(source, "__getitems__", None)
            for k, sample in zip(at, many(local) if many is not None else [source[i] for i in local]):
                out[k] = sample
        return out


def load_arrays(source: Any, config: TrainConfig, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Every sample of `source` stacked in memory ("image" (N,S,S,3) uint8, "label", "box", "landmarks"),
    checked (label in {1, 0, -1, -2}, image (S, S, 3)); ValueError if bad. One batched read per chunk."""
    n = _check_not_empty(source)
    parts = [_gather_checked(source, range(start, min(n, start + chunk)), config)
             for start in tqdm(range(0, n, chunk), desc=f"load {config.stage} samples", disable=None, unit="chunk")]
    arrays = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    _check_labels(arrays["label"], np.arange(n))
    return arrays


class InMemorySamples:
    """The whole set held as `load_arrays`' arrays: a batch is an index into them (for sets that fit in RAM)."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def __len__(self) -> int:
        return len(self.arrays["label"])

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[indices] for k, v in self.arrays.items()}


class StreamedSamples:
    """The set left where it is: each batch read from the source when needed (one batched read), checked
    as it is read. Reads take turns (a lock): the source need not be thread-safe."""

    def __init__(self, source: Any, config: TrainConfig) -> None:
        self.source, self.config, self._lock = source, config, threading.Lock()

    def __len__(self) -> int:
        return len(self.source)

    def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        with self._lock:
            batch = _gather_checked(self.source, indices, self.config)
        _check_labels(batch["label"], indices)
        return batch


def open_samples(source: Any, config: TrainConfig, *, in_memory: bool = False) -> InMemorySamples | StreamedSamples:
    """The source read in memory (every sample checked now) or streamed (the first batch's worth checked now,
    each batch as it is read); ValueError on an empty set or a bad sample."""
    if in_memory:
        return InMemorySamples(load_arrays(source, config))
    samples = StreamedSamples(source, config)
    samples.read(np.arange(min(_check_not_empty(source), config.batch_size)))
    return samples


def split_indices(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: round(val_fraction * n) evenly spaced indices are held back (at least 1 train)."""
    n_val = min(int(round(val_fraction * n)), n - 1)
    val = np.unique(np.floor(np.arange(n_val) * (n / max(n_val, 1))).astype(np.int64))
    return np.setdiff1d(np.arange(n), val), val


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    permutation = np.random.default_rng([seed, epoch]).permutation(n)
    permutation.flags.writeable = False  # shared by the steps of the epoch
    return permutation


def step_indices(train_idx: np.ndarray, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The source indices of step `step`: consecutive slices of one seeded permutation per epoch."""
    n = len(train_idx)
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(positions // n):
        in_epoch = positions // n == epoch
        out[in_epoch] = train_idx[_epoch_permutation(n, seed, int(epoch))[positions[in_epoch] % n]]
    return out


def training_batch(samples: InMemorySamples | StreamedSamples, train_idx: np.ndarray, config: TrainConfig,
                   step: int) -> dict[str, np.ndarray]:
    """The augmented batch of step `step` (flips; colour jitter and blur when asked for): a pure function of
    (data, config.seed, step)."""
    return augment(samples.read(step_indices(train_idx, config.seed, step, config.batch_size)), config, step)


def process_rows(batch_size: int, index: int, count: int) -> slice:
    """The rows of the global batch that process `index` of `count` reads: one contiguous slice each, in
    process order (`train_step.data_mesh` puts them on that process's devices)."""
    if batch_size % count:
        raise ValueError(f"batch size {batch_size} does not divide evenly over {count} processes")
    share = batch_size // count
    return slice(index * share, (index + 1) * share)


def process_batch(samples: InMemorySamples | StreamedSamples, train_idx: np.ndarray, config: TrainConfig,
                  step: int, index: int = 0, count: int = 1) -> dict[str, np.ndarray]:
    """Process `index` of `count`'s rows (`process_rows`) of `training_batch(..., step)`, reading only those
    samples; one process: the whole batch."""
    if count == 1:
        return training_batch(samples, train_idx, config, step)
    rows = process_rows(config.batch_size, index, count)
    local = samples.read(step_indices(train_idx, config.seed, step, config.batch_size)[rows])
    # augment draws per row of the global batch, seeded by (seed, step): run it on a full-size batch whose
    # other rows are zeros (the ops are per row), so each row gets the draws it gets on one process.
    full = {k: np.zeros((config.batch_size,) + v.shape[1:], v.dtype) for k, v in local.items()}
    for k, v in local.items():
        full[k][rows] = v
    return {k: v[rows] for k, v in augment(full, config, step).items()}


def eval_batches(samples: InMemorySamples | StreamedSamples, indices: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """The samples at `indices` in batches of `batch_size`, unaugmented; the last one padded (with copies of
    its first sample labelled PAD_LABEL) so that every batch has one shape: one compile."""
    for start in range(0, len(indices), batch_size):
        batch = samples.read(indices[start : start + batch_size])
        real = len(batch["label"])
        padded = {k: np.concatenate([v, np.repeat(v[:1], batch_size - real, 0)]) for k, v in batch.items()}
        padded["label"][real:] = PAD_LABEL
        yield padded


class Prefetch:
    """`fn(item)` for each of `items` in order, computed up to `depth` ahead on a background thread. An
    exception raised by `fn` is raised by the `next()` that would have returned its value; `close()` (or
    leaving the `with` block) stops the thread."""

    _END = object()

    def __init__(self, fn: Callable[[Any], Any], items: Iterable[Any], depth: int = PREFETCH) -> None:
        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, items), daemon=True, name="prefetch")
        self._thread.start()

    def _run(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> None:
        for item in items:
            try:
                entry = (fn(item), None)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
                entry = (None, error)
            if not self._put(entry) or entry[1] is not None:
                return
        self._put((self._END, None))

    def _put(self, entry: tuple[Any, BaseException | None]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetch:
        return self

    def __next__(self) -> Any:
        value, error = self._queue.get()
        if error is not None:
            raise error
        if value is self._END:
            raise StopIteration
        return value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
