"""Batches run a few at a time on threads and taken back in the order they were sent.

The detect command line (`detect_files`: chunks of image files) and the stream scheduler (`streams`: batches
of frames) both run `workers` batches at once (on CPU one batch's sequential parts, NMS and the stage
loops, leave a core idle that another batch takes) and hand results back in their input's order. A batch
whose run failed is each of its images' `ImageError` (`failed_images`), never a lost traceback.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

from mtcnn_jax import cli
from mtcnn_jax.images import ImageError


class InOrder:
    """A pool of `workers` threads whose calls are taken back oldest first (`done`)."""

    def __init__(self, workers: int, name: str):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._running: deque[tuple[Any, Future]] = deque()

    def submit(self, tag: Any, fn: Callable, *args: Any) -> None:
        """Run fn(*args) on a worker; `tag` comes back with its result."""
        self._running.append((tag, self._pool.submit(fn, *args)))

    def done(self, depth: int | None = None) -> Iterator[tuple[Any, Any, Exception | None]]:
        """(tag, result, None), or (tag, None, error) for a call that raised, of the calls taken back: oldest
        first, as long as the oldest is finished, or more than `depth` calls are out (None: until all are)."""
        while self._running and (depth is None or len(self._running) > depth or self._running[0][1].done()):
            tag, future = self._running.popleft()
            try:
                result = future.result()
            except Exception as err:  # noqa: BLE001 - the caller reports it per image
                yield tag, None, err
            else:
                yield tag, result, None

    def __len__(self) -> int:
        return len(self._running)

    def close(self) -> None:
        """Drop the calls not started; wait for those running."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "InOrder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def failed_images(names: Sequence[str], err: Exception) -> list[ImageError]:
    """Each image's ImageError when the run of their batch raised `err` (e.g. out of memory on a huge image)."""
    why = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
    return [ImageError(f"{name}: detection failed ({why}); set {cli.TRACEBACK_VARIABLE}=1 and run it alone to see "
                       "why") for name in names]
