"""Which bucket and batch size each image runs at: the fixed shapes the jitted cascade is compiled for.

Images are zero-padded into buckets whose sides come from a small ladder (`bucket_side`), and each
bucket's images run in batches of a few fixed sizes (`batch_sizes`), so a folder of mixed sizes compiles
a handful of shapes (`plan`). A bucket's stage capacities grow with its area (`bucket_capacities`).
Compiling and running those shapes is `compiled.py`'s part.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.pyramid import pyramid_scales

Bucket = tuple[int, int]
EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height
BUCKET_BASE = 128  # the smallest bucket side: P-Net's work on a smaller image is negligible
# Video frames and camera streams: one size per stream, so the ladder's coarse steps would only add
# padding; their sides are rounded up to this multiple instead (unless a config sets bucket_multiple).
STREAM_BUCKET_MULTIPLE = 16
# A bucket's images run in a larger bucket when that spares a compile and pads them by at most this many
# pixels more: on CPU a bucket's own programs compile in about as long as detection takes on 20 Mpixel of
# bucket area (benchmarks/README.md, "Fewer compiles" and "Stage programs"), so the padding costs less than
# the compile it spares until the same images have run about 10 times; on accelerators a compile weighs more.
MERGE_PIXELS = 2**21


def bucket_side(n: int, multiple: int = 0) -> int:
    """The padded length of an image side of n pixels. multiple 0: the smallest side of the ladder
    128, 192, 256, 384, 512, 768, 1024, ... (2^k and 1.5 * 2^k) that holds n: steps of 1.5 and 4/3
    bound the padding and the number of shapes (11 sides up to 4096; 4:3 photos fit exactly).
    multiple N > 0: n rounded up to a multiple of N (least padding, one shape per N pixels)."""
    if multiple:
        return max(math.ceil(n / multiple), 1) * multiple
    side = BUCKET_BASE
    while side < n:
        side = side * 3 // 2 if side & (side - 1) == 0 else side * 4 // 3
    return side


def bucket_shape(h: int, w: int, config: CascadeConfig | None = None) -> tuple[int, int]:
    """The padded (height, width) an image of size h x w is run at (`bucket_side` of each side)."""
    multiple = (config or CascadeConfig()).bucket_multiple
    return bucket_side(h, multiple), bucket_side(w, multiple)


def bucket_capacities(config: CascadeConfig, hb: int, wb: int) -> tuple[int, int]:
    """(window_capacity, pnet_capacity) for a bucket: the config's values, or derived from its area."""
    auto = lambda per, least, most: min(max(least, -(-hb * wb // per // 256) * 256), most)  # noqa: E731
    return config.window_capacity or auto(128, 1024, 16384), config.pnet_capacity or auto(512, 512, 4096)


def pad_to_bucket(images: list[np.ndarray], bucket_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWx3 images zero-padded (bottom/right) into one (B, Hb, Wb, 3) batch, and their real sizes
    (B, 2): the inputs of `compiled.detect_bucket`."""
    batch = np.zeros((len(images), *bucket_hw, 3), np.uint8)
    for b, image in enumerate(images):
        batch[b, : image.shape[0], : image.shape[1]] = image
    return batch, np.array([image.shape[:2] for image in images], np.int32).reshape(-1, 2)


def header_hw(path: str) -> tuple[int, int] | None:
    """An image file's (height, width) upright (EXIF orientation applied) from its header alone, without
    decoding the pixels; None when it cannot be opened (loading it later reports why)."""
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


def default_workers() -> int:
    """Batches run at once by `detect_stream` and the detect command line: 2, so that one batch's sequential
    parts (NMS, the stage loops; on an accelerator the host's padding and copying) leave no core idle
    (benchmarks/README.md, "Video")."""
    return 2


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """How n images of one bucket are run: full batches of `batch_size`, then the rest as powers of two
    (its binary digits), so no slot is padding and a bucket compiles at most a few batch shapes."""
    sizes = [batch_size] * (n // batch_size)
    rest = n % batch_size
    while rest:
        sizes.append(1 << (rest.bit_length() - 1))
        rest -= sizes[-1]
    return sizes


def _ladder_groups(sizes_hw: Sequence[tuple[int, int] | None], config: CascadeConfig) -> dict[Bucket, list[int]]:
    """Image indices by ladder bucket, in order of first appearance; None, and images too small for one
    pyramid level, left out."""
    groups: dict[Bucket, list[int]] = {}
    for i, hw in enumerate(sizes_hw):
        if hw is not None and pyramid_scales(*hw, config.min_face_size, config.scale_factor):
            groups.setdefault(bucket_shape(*hw, config), []).append(i)
    return groups


def plan(sizes_hw: Sequence[tuple[int, int] | None], config: CascadeConfig, batch_size: int,
         merged: Mapping[Bucket, Bucket] | None = None) -> list[tuple[Bucket, list[int]]]:
    """The batches (bucket, image indices) that run images of these sizes, bucket by bucket in order of
    first appearance. None, and images too small for one pyramid level, are left out. `merged` (from
    `merged_buckets`) sends the images of a bucket to the larger one it names."""
    groups: dict[Bucket, list[int]] = {}
    for bucket, indices in _ladder_groups(sizes_hw, config).items():
        groups.setdefault((merged or {}).get(bucket, bucket), []).extend(indices)
    batches = []
    for bucket, indices in groups.items():
        indices, start = sorted(indices), 0
        for size in batch_sizes(len(indices), batch_size):
            batches.append((bucket, indices[start : start + size]))
            start += size
    return batches


def merged_buckets(sizes_hw: Sequence[tuple[int, int] | None], config: CascadeConfig, batch_size: int,
                   ready: Callable[[Bucket, int], bool], budget: int = MERGE_PIXELS) -> dict[Bucket, Bucket]:
    """Which ladder buckets of these images run in a larger bucket of theirs instead, to compile fewer shapes.

    `ready(bucket, batch)` says whether a shape needs no compile (compiled, or stored in the compile cache).
    Merges are made one at a time, the least padding first: a bucket's images move into one holding both
    its sides when that leaves fewer shapes to compile and adds at most `budget` pixels of padding to them.
    Padding never changes a detection (and a larger bucket's capacities are no smaller): only the time moves."""
    counts = {bucket: len(indices) for bucket, indices in _ladder_groups(sizes_hw, config).items()}
    ready = functools.cache(ready)  # asked again at every merge; each answer may read the disk
    to_compile = lambda b, n: sum(not ready(b, size) for size in set(batch_sizes(n, batch_size)))  # noqa: E731
    into: dict[Bucket, Bucket] = {}
    while True:
        best = None
        for (source, n), (target, m) in itertools.product(counts.items(), repeat=2):
            extra = n * (target[0] * target[1] - source[0] * source[1])
            if (target != source and target[0] >= source[0] and target[1] >= source[1] and extra <= budget
                    and to_compile(target, n + m) < to_compile(source, n) + to_compile(target, m)
                    and (best is None or extra < best[0])):
                best = (extra, source, target)
        if best is None:
            return into
        _, source, target = best
        counts[target] += counts.pop(source)
        into = {b: target if t == source else t for b, t in into.items()} | {source: target}
