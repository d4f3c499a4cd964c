"""Which bucket and batch size each image runs at, and compiling those ahead of the work.

Images are zero-padded into buckets whose sides come from a small ladder (`cascade.bucket_side`), and
each bucket's images run in batches of a few fixed sizes (`batch_sizes`), so a folder of mixed sizes
compiles a handful of shapes. `CompileAhead` compiles a planned folder's shapes on a background
thread, in the order the work needs them, while the shapes already compiled run.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import jax

from mtcnn_jax import cascade
from mtcnn_jax.cascade import CascadeConfig, bucket_shape

Bucket = tuple[int, int]
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def header_hw(path: str) -> tuple[int, int] | None:
    """An image file's (height, width) upright (EXIF orientation applied) from its header alone, without
    decoding the pixels; None when it cannot be opened (loading it later reports why)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            try:
                transposed = img.getexif().get(EXIF_ORIENTATION) in TRANSPOSED
            except Exception:  # a broken EXIF block: the pixels are used as stored
                transposed = False
    except Exception:  # any failure to open
        return None
    return (w, h) if transposed else (h, w)


def default_batch_size() -> int:
    """Images per batch when none is given: 1 on CPU (a batch of 8 runs about 2x slower per image on the
    2-core benchmark machine, benchmarks/README.md), 8 on accelerators."""
    return 1 if jax.default_backend() == "cpu" else 8


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """How n images of one bucket are run: full batches of `batch_size`, then the rest as powers of two
    (its binary digits), so no slot is padding and a bucket compiles at most a few batch shapes."""
    sizes = [batch_size] * (n // batch_size)
    rest = n % batch_size
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes


def plan(sizes_hw: Sequence[tuple[int, int] | None], config: CascadeConfig,
         batch_size: int) -> list[tuple[Bucket, list[int]]]:
    """The batches (bucket, image indices) that run images of these sizes, bucket by bucket in order of
    first appearance. None, and images too small for one pyramid level, are left out."""
    groups: dict[Bucket, list[int]] = {}
    for i, hw in enumerate(sizes_hw):
        if hw is not None and cascade.pyramid_scales(*hw, config.min_face_size, config.scale_factor):
            groups.setdefault(bucket_shape(*hw, config), []).append(i)
    batches = []
    for bucket, indices in groups.items():
        start = 0
        for size in batch_sizes(len(indices), batch_size):
            batches.append((bucket, indices[start : start + size]))
            start += size
    return batches


class CompileAhead:
    """Compiles (bucket, batch size) shapes one after another on a background thread; `compiled_cascade`
    hands a shape to whoever asks first, so detection waits only for shapes not compiled yet and never
    compiles one twice. Failures are left for the detection of that shape to report. `on_change` gets
    the number of shapes still to compile whenever it changes."""

    def __init__(self, params: dict, shapes: Sequence[tuple[Bucket, int]], config: CascadeConfig,
                 upto: str = "onet", on_change: Callable[[int], Any] | None = None):
        unique = list(dict.fromkeys(shapes))
        self._left, self._on_change = len(unique), on_change or (lambda n: None)
        self._lock = threading.Lock()
        self._on_change(self._left)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtcnn-compile")
        for bucket, batch in unique:
            self._pool.submit(self._compile, params, bucket, batch, config, upto)

    def _compile(self, params: dict, bucket: Bucket, batch: int, config: CascadeConfig, upto: str) -> None:
        try:
            cascade.compiled_cascade(params, bucket, batch, config, upto)
        except Exception:  # the detection that needs this shape compiles it again and reports the error
            pass
        finally:
            with self._lock:
                self._left -= 1
                left = self._left
            self._on_change(left)

    @property
    def pending(self) -> int:
        """Shapes not compiled yet (queued or compiling)."""
        with self._lock:
            return self._left

    def close(self) -> None:
        """Drop the shapes not started; wait for the one compiling."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "CompileAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
