"""The MTCNN cascade: image pyramid -> P-Net -> R-Net -> O-Net, in two forms that share all box math.

- `detect_bucket`: ONE jitted, fixed-shape function per (bucket height, bucket width, batch size).
  Images are zero-padded into a bucket; every stage has a fixed capacity and a validity mask;
  NMS, crops and resizing run on device; overflowing capacities are counted, never hidden.
- `detect_steps`: the readable step-by-step path with dynamic shapes (numpy between the nets), for
  study and as the oracle the fixed-shape path is tested against.

Both follow detect_face.m. Coordinates are the original's: 1-based inclusive pixel boxes.
Resizing (pyramid levels and crops) follows imResample, which detect_face.m calls: an exact area
average when shrinking, bilinear with half-pixel centres when enlarging. One shortcut keeps it cheap,
documented in the README: a level, and a crop, is area-resampled from the exact 2^j x 2^j mip of the
image just larger than it (not from the image itself).
All levels live in stacked canvases (the four largest levels one each, the rest together), so P-Net runs
five times.
"""

from __future__ import annotations

import functools
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax import compile_cache, nets
from mtcnn_jax.stages import INPUT_SIZE, MIN_FACE_SIZE, SCALE_FACTOR, THRESHOLDS

Array = Any  # np.ndarray or jax.Array


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
    bucket_multiple: int = 0  # 0: bucket sides from the ladder (`bucket_side`); N: sides rounded up to N

    def __post_init__(self):
        for name in ("pnet_capacity", "rnet_capacity"):
            if (getattr(self, name) or 0) % self.net_chunk:
                raise ValueError(f"{name} must be a multiple of net_chunk={self.net_chunk}")
        if self.min_face_size <= 0 or not 0 < self.scale_factor < 1:
            raise ValueError("min_face_size must be > 0 and 0 < scale_factor < 1")
        if self.bucket_multiple < 0:
            raise ValueError(f"bucket_multiple must be >= 0 (0: the bucket ladder), got {self.bucket_multiple}")


def bucket_capacities(config: CascadeConfig, hb: int, wb: int) -> tuple[int, int]:
    """(window_capacity, pnet_capacity) for a bucket: the config's values, or derived from its area."""
    auto = lambda per, least, most: min(max(least, -(-hb * wb // per // 256) * 256), most)  # noqa: E731
    return config.window_capacity or auto(128, 1024, 16384), config.pnet_capacity or auto(512, 512, 4096)


BUCKET_BASE = 128  # the smallest bucket side: P-Net's work on a smaller image is negligible


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


# ----------------------------------------------------------------------------- pyramid plan (host)

def pyramid_scales(h: int, w: int, min_face_size: float, scale_factor: float) -> list[float]:
    """detect_face.m's scales: m = 12 / minsize, m * factor^k while min(h, w) * m * factor^k >= 12."""
    m = 12.0 / min_face_size
    minl, scales = min(h, w) * m, []
    while minl >= 12:
        scales.append(m * scale_factor ** len(scales))
        minl *= scale_factor
    return scales


def level_sizes(h: int, w: int, scales: list[float]) -> np.ndarray:
    """(L, 2) level sizes, each ceil(h * s) x ceil(w * s) as in detect_face.m."""
    return np.array([(math.ceil(h * s), math.ceil(w * s)) for s in scales], np.int32).reshape(-1, 2)


def pnet_map_size(level_hw: Array) -> Array:
    """P-Net output map size for a level size: conv 3, ceil pool 2/2, two conv 3 -> ceil((n-2)/2) - 4."""
    return (level_hw - 1) // 2 - 4  # == ceil((n - 2) / 2) - 4 for integers


def _taps(ratio: float) -> int:
    """Resampling taps needed for an area average over `ratio` source pixels (at least bilinear's 2)."""
    return max(2, math.ceil(ratio - 1e-9) + 1)


# Crops are resampled from the 2^-j mip of the image just larger than them: at most 2 source pixels per
# output pixel, so 3 taps cover every area average (and bilinear enlarging needs 2).
CROP_TAPS = 3


def crop_mips(h: int, w: int) -> int:
    """Mips an h x w image needs as crop sources: a 24-pixel crop of any box up to 4 times the image's
    longer side then reads at most 2 mip pixels per output pixel."""
    return max(1, math.ceil(math.log2(2 * max(h, w) / 24))) + 1


# ----------------------------------------------------------------------------- resampling (shared)

def resample_taps(start_E: Array, length_E: Array, out_len_E: Array, out_buf: int, taps: int):
    """Indices and weights (E, out_buf, taps) that resample source intervals [start, start + length)
    to out_len samples as imResample does: area average when shrinking, bilinear (half-pixel centres,
    clamped to the interval) when enlarging. Samples at or past out_len get zero weight."""
    xp = bx.xp_of(start_E, length_E, out_len_E)
    start, length, out_len = (xp.asarray(a, dtype=xp.float32)[..., None] for a in (start_E, length_E, out_len_E))
    k, t = xp.arange(out_buf, dtype=xp.float32), xp.arange(taps, dtype=xp.float32)
    ratio = length / out_len
    lo = start + k * ratio
    hi = lo + ratio
    idx_area = xp.floor(lo)[..., None] + t
    cover = xp.clip(xp.minimum(idx_area + 1, hi[..., None]) - xp.maximum(idx_area, lo[..., None]), 0, None)
    w_area = cover / xp.maximum(cover.sum(-1, keepdims=True), 1e-12)
    centre = xp.clip((lo + hi) * 0.5 - 0.5, start, start + length - 1)
    frac = (centre - xp.floor(centre))[..., None]
    idx_bilinear = xp.floor(centre)[..., None] + t
    w_bilinear = xp.where(t == 0, 1 - frac, xp.where(t == 1, frac, 0.0))
    shrink = (ratio >= 1)[..., None]
    weights = xp.where(shrink, w_area, w_bilinear) * (k < out_len)[..., None]
    return xp.where(shrink, idx_area, idx_bilinear).astype(xp.int32), weights.astype(xp.float32)


SEPARATE_LEVELS = 4  # P-Net runs on each of the 4 largest levels alone, then once on the rest stacked


@dataclass(frozen=True)
class PyramidPlan:
    """The static layout of an h x w (bucket) pyramid: scales, level buffers stacked in one canvas
    (even row offsets, 2-row gaps so P-Net never mixes levels), mips and resampling taps."""

    scales: tuple[float, ...]
    bufs: tuple[tuple[int, int], ...]
    offsets: tuple[int, ...]
    canvas_hw: tuple[int, int]
    n_mips: int
    taps: int

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(h: int, w: int, config: CascadeConfig) -> "PyramidPlan":
        scales = pyramid_scales(h, w, config.min_face_size, config.scale_factor)
        bufs = [tuple(b) for b in level_sizes(h, w, scales).tolist()]
        offsets, row = [], 0
        for bh, _ in bufs:
            offsets.append(row)
            row += bh + 2 + (bh % 2)
        ratio = 1.0 / min(scales[-1], 1.0) if scales else 1.0
        n_mips = max(1, min(int(math.log2(ratio)), 6) + 1)
        return PyramidPlan(tuple(scales), tuple(bufs), tuple(offsets),
                           (max(row - 2, 12), max([b[1] for b in bufs], default=12)), n_mips,
                           _taps(ratio / 2 ** (n_mips - 1) * 13 / 12))

    @functools.cached_property
    def mips(self) -> np.ndarray:
        """The mip each level is area-resampled from: the largest 2^-j at least as large as its scale."""
        inv = 1.0 / np.minimum(np.array(self.scales, float), 1.0)
        return np.clip(np.floor(np.log2(inv) + 1e-9), 0, self.n_mips - 1).astype(int)

    @functools.cached_property
    def rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Each canvas row's level (-1 in gaps) and its row within that level."""
        level, local = np.full(self.canvas_hw[0], -1, np.int32), np.zeros(self.canvas_hw[0], np.int32)
        for k, ((bh, _), oy) in enumerate(zip(self.bufs, self.offsets)):
            level[oy : oy + bh], local[oy : oy + bh] = k, np.arange(bh)
        return level, local

    @functools.cached_property
    def groups(self) -> tuple[tuple[int, int, int], ...]:
        """Canvas slices (first row, end row, width) P-Net runs on: the first SEPARATE_LEVELS levels one
        each, then all smaller levels stacked at the width of the first of them (stacking all levels at
        the full canvas width would waste 70 % on padding; from the fifth level on, the waste is small)."""
        b, o, hc = self.bufs, self.offsets, self.canvas_hw[0]
        if not b:
            return ((0, hc, self.canvas_hw[1]),)
        n = min(SEPARATE_LEVELS, len(b) - 1)
        return tuple((o[k], o[k] + b[k][0], b[k][1]) for k in range(n)) + ((o[n], hc, b[n][1]),)

    @functools.cached_property
    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the P-Net maps of all groups, flattened: windows (M, 4) in float64 as MATLAB computes them,
        then float32; each cell's level (M,) (-1 outside levels) and (row, col) within the level (M, 2).
        Passed to the jitted cascade as arguments: as constants they would slow its compilation."""
        wins, levels, rcs = [], [], []
        for r0, r1, width in self.groups:
            mh, mw = (int(v) for v in pnet_map_size(np.array([r1 - r0, width])))
            level, lrow = np.full(mh, -1, np.int32), np.zeros(mh, np.int32)
            for k, ((bh, _), oy) in enumerate(zip(self.bufs, self.offsets)):
                if r0 <= oy < r1:
                    n = max(int(pnet_map_size(np.array(bh))), 0)
                    level[(oy - r0) // 2 : (oy - r0) // 2 + n], lrow[(oy - r0) // 2 : (oy - r0) // 2 + n] = k, np.arange(n)
            scale = np.array(self.scales + (1.0,))[level]  # level -1 gets a dummy scale
            rows, cols = np.meshgrid(lrow, np.arange(mw), indexing="ij")
            wins.append(bx.pnet_windows(rows, cols, scale[:, None]).reshape(-1, 4))
            levels.append(np.repeat(level, mw))
            rcs.append(np.stack([rows.reshape(-1), cols.reshape(-1)], -1))
        return np.concatenate(wins).astype(np.float32), np.concatenate(levels), np.concatenate(rcs).astype(np.int32)


def _sum_pool2(x_HxWxC: Array) -> Array:
    x = x_HxWxC[0::2] + x_HxWxC[1::2]  # strided adds: cheaper than a reshape-sum on XLA:CPU
    return x[:, 0::2] + x[:, 1::2]


def mip_pyramid(image_HxWx3: Array, image_hw: Array, n_mips: int) -> list[Array]:
    """Mips of the real image region: mip j is the exact 2^j x 2^j area average over REAL pixels only,
    so padding never leaks in. The image must be zero outside its real h x w; mip 0 is the image."""
    xp = bx.xp_of(image_HxWx3, image_hw)
    sums = xp.asarray(image_HxWx3, xp.float32)
    mips = [sums]
    for j in range(1, n_mips):
        odd = ((0, sums.shape[0] % 2), (0, sums.shape[1] % 2), (0, 0))
        sums, size = _sum_pool2(xp.pad(sums, odd) if odd[0][1] or odd[1][1] else sums), 2**j
        rows = xp.clip(image_hw[0] - xp.arange(sums.shape[0]) * size, 0, size)  # real pixels per block row
        cols = xp.clip(image_hw[1] - xp.arange(sums.shape[1]) * size, 0, size)
        mips.append(sums / xp.maximum(rows[:, None] * cols[None, :], 1)[..., None].astype(xp.float32))
    return mips


def _group_source(mips: list[Array], js: list[int], xp) -> tuple[Array, dict[int, int]]:
    """The array a P-Net group's rows are gathered from: its one mip, or its mips stacked (padded to a
    common width) when its levels use several; and each mip's first row in it."""
    if len(js) == 1:
        return mips[js[0]], {js[0]: 0}
    width = max(mips[j].shape[1] for j in js)
    parts = [xp.pad(mips[j], ((0, 0), (0, width - mips[j].shape[1]), (0, 0))) for j in js]
    return xp.concatenate(parts), dict(zip(js, np.cumsum([0] + [p.shape[0] for p in parts[:-1]]).tolist()))


def level_taps(image_hw: Array, level_hw_Lx2: Array, plan: PyramidPlan) -> tuple[Array, Array, Array, Array]:
    """Resampling taps of every level from its mip: rows (L, max level height, T) and columns (L, canvas
    width, T), indices and weights. They depend only on the sizes, so the jitted cascade gets them
    computed on the host (numpy) as arguments."""
    xp = bx.xp_of(image_hw, level_hw_Lx2)
    hw, lhw = xp.asarray(image_hw, xp.float32), xp.asarray(level_hw_Lx2, xp.float32)
    zero, div = xp.zeros_like(lhw[:, 0]), xp.asarray(2.0 ** plan.mips, xp.float32)
    iy, wy = resample_taps(zero, hw[0] / div, lhw[:, 0], max(b[0] for b in plan.bufs), plan.taps)
    ix, wx = resample_taps(zero, hw[1] / div, lhw[:, 1], plan.canvas_hw[1], plan.taps)
    return iy, wy, ix, wx


def build_levels(image_HxWx3: Array, image_hw: Array, level_hw_Lx2: Array, plan: PyramidPlan,
                 taps: tuple[Array, Array, Array, Array] | None = None, mips: list[Array] | None = None) -> list[Array]:
    """All pyramid levels (pixel units) as the plan's P-Net groups, each (rows, width, 3): level k at
    group rows offsets[k] - first row, area-resampled to ceil(h * s) x ceil(w * s) from its mip (the
    2^-j scale just larger than it); zero elsewhere. Per group: one vertical gather, one horizontal per
    level. `taps` are `level_taps(image_hw, level_hw_Lx2, plan)` and `mips` the image's `mip_pyramid` (at
    least plan.n_mips), each computed here when not given."""
    xp = bx.xp_of(image_HxWx3, image_hw, level_hw_Lx2)
    mips = mip_pyramid(image_HxWx3, image_hw, plan.n_mips) if mips is None else mips
    iy, wy, ix, wx = level_taps(image_hw, level_hw_Lx2, plan) if taps is None else taps
    level, local = plan.rows
    groups = []
    for r0, r1, width in plan.groups:
        lvl, loc, on = np.maximum(level[r0:r1], 0), local[r0:r1], (level[r0:r1] >= 0)
        js = sorted({int(plan.mips[k]) for k in set(lvl[on].tolist())})
        src, first = _group_source(mips, js, xp)
        base = np.array([first.get(int(j), 0) for j in plan.mips])[lvl]
        rows_RxT = xp.clip(iy[lvl, loc] + base[:, None], 0, src.shape[0] - 1)
        wy_RxT = xp.where(on[:, None], wy[lvl, loc], 0.0)
        v = sum(wy_RxT[:, t, None, None] * src[rows_RxT[:, t]] for t in range(plan.taps))  # (R, W_src, 3)
        # Columns: gather whole columns of each level's rows (transposed, a column is one contiguous row;
        # gathering single pixels is several times slower on XLA:CPU).
        vt, cols = xp.swapaxes(v, 0, 1), xp.clip(ix, 0, v.shape[1] - 1)  # (W_src, R, 3)
        pieces, row = [], 0
        for k in sorted(set(lvl[on].tolist())):
            a, b = plan.offsets[k] - r0, plan.offsets[k] - r0 + plan.bufs[k][0]
            pieces += [xp.zeros((width, a - row, 3), xp.float32)] if a > row else []
            pieces.append(sum(wx[k, :width, t, None, None] * vt[cols[k, :width, t], a:b] for t in range(plan.taps)))
            row = b
        pieces += [xp.zeros((width, (r1 - r0) - row, 3), xp.float32)] if r1 - r0 > row else []
        groups.append(xp.swapaxes(xp.concatenate(pieces, axis=1), 0, 1))
    return groups


def level_masks(level_hw_Lx2: Array, plan: PyramidPlan) -> list[Array]:
    """Real pixels (rows, width) of each P-Net group for one image's level sizes."""
    xp = bx.xp_of(level_hw_Lx2)
    level, local = plan.rows
    lhw = xp.asarray(level_hw_Lx2)[np.maximum(level, 0)]
    real = ((level >= 0) & (local < lhw[:, 0]))[:, None] & (xp.arange(plan.canvas_hw[1])[None, :] < lhw[:, 1:2])
    return [real[r0:r1, :width] for r0, r1, width in plan.groups]


def _level_place(plan: PyramidPlan, k: int) -> tuple[int, int]:
    """(group index, first row within that group) of level k."""
    oy = plan.offsets[k]
    g = next(i for i, (r0, r1, _) in enumerate(plan.groups) if r0 <= oy < r1)
    return g, oy - plan.groups[g][0]


def level_views(groups: list[Array], level_hw_Lx2: np.ndarray, plan: PyramidPlan) -> list[Array]:
    """The levels as separate arrays of their real sizes (readable path, host)."""
    out = []
    for k, (h, w) in enumerate(np.asarray(level_hw_Lx2).tolist()):
        g, row = _level_place(plan, k)
        out.append(groups[g][row : row + h, :w])
    return out


# ----------------------------------------------------------------------------- crops (shared)

@dataclass(frozen=True)
class CropSources:
    """What crops read: the image and its 2^-j x 2^-j mips (exact area averages over real pixels) side
    by side in one array, `atlas` (rows, cols, 3): the image at the top left, the mips stacked on its right.

    corners (per source: its first row and column in the atlas) are static layout; hw_Jx2 the real sizes,
    scale_Jx2 = 2^-j.
    """

    atlas: Array
    corners: tuple[tuple[int, int], ...]
    hw_Jx2: Array
    scale_Jx2: Array


def crop_sources(image_HxWx3: Array, image_hw: Array, n_mips: int, mips: list[Array] | None = None) -> CropSources:
    """The image (zero outside its real h x w) and `n_mips - 1` mips of it as crop sources (`crop_mips`);
    `mips` is the image's `mip_pyramid` (at least n_mips) when already computed."""
    xp = bx.xp_of(image_HxWx3, image_hw)
    mips = (mip_pyramid(image_HxWx3, image_hw, n_mips) if mips is None else mips)[:n_mips]
    corners = [(0, 0)] + [(sum(m.shape[0] for m in mips[1:j]), mips[0].shape[1]) for j in range(1, n_mips)]
    atlas = mips[0]
    if n_mips > 1:  # the mips' column, zero-padded to mip 1's width, on the image's right
        side = xp.concatenate([xp.pad(m, ((0, 0), (0, mips[1].shape[1] - m.shape[1]), (0, 0))) for m in mips[1:]])
        rows = max(atlas.shape[0], side.shape[0])
        atlas = xp.concatenate([xp.pad(a, ((0, rows - a.shape[0]), (0, 0), (0, 0))) for a in (atlas, side)], axis=1)
    atlas = _pad_to_window(atlas, crop_window(max(INPUT_SIZE.values()), CROP_TAPS))  # tiny images: once
    div = xp.asarray(2 ** np.arange(n_mips), xp.int32)[:, None]
    hw = -(-xp.asarray(image_hw, xp.int32)[None, :] // div)
    return CropSources(atlas, tuple(corners), hw, xp.ones((n_mips, 2), xp.float32) / div.astype(xp.float32))


def _pad_to_window(atlas_HxWx3: Array, win: int) -> Array:
    """The atlas zero-padded at the bottom and right to at least win x win, so a window always fits."""
    pad = ((0, max(win - atlas_HxWx3.shape[0], 0)), (0, max(win - atlas_HxWx3.shape[1], 0)), (0, 0))
    return bx.xp_of(atlas_HxWx3).pad(atlas_HxWx3, pad) if pad[0][1] or pad[1][1] else atlas_HxWx3


def crop_window(out: int, taps: int) -> int:
    """Side of the source window a crop reads: every tap of a box that `taps` can resample (at most
    taps - 1 source pixels per output pixel) lies in it."""
    return out * (taps - 1) + taps + 1


def _windows(array_HxWx3: Array, y0_N: Array, x0_N: Array, win: int) -> Array:
    """(N, win, win, 3) windows of one array at the given top-left corners (inside the array)."""
    if bx.xp_of(array_HxWx3, y0_N) is np:
        return np.array([array_HxWx3[y : y + win, x : x + win] for y, x in zip(y0_N, x0_N)],
                        np.float32).reshape(-1, win, win, 3)
    return jax.vmap(lambda y, x: jax.lax.dynamic_slice(array_HxWx3, (y, x, 0), (win, win, 3)))(y0_N, x0_N)


def _window_weights(idx_NxOxT: Array, w_NxOxT: Array, start_N: Array, win: int) -> Array:
    """The taps as a dense (N, out, win) resampling matrix over a window starting at source index start."""
    xp = bx.xp_of(idx_NxOxT, w_NxOxT, start_N)
    rel = idx_NxOxT - start_N[:, None, None]
    return (w_NxOxT[..., None] * (rel[..., None] == xp.arange(win))).sum(2)


def _read_windows(src: CropSources, j_N: Array, iy0_N: Array, ix0_N: Array, win: int):
    """Each crop's window of the atlas (N, win, win, 3), one contiguous slice (gathering single pixels is
    several times slower), and the window's first row and column in its source's coordinates."""
    xp = bx.xp_of(j_N, iy0_N, ix0_N)
    corner_N = xp.asarray(np.array(src.corners, np.int32).reshape(-1, 2))[j_N]
    atlas = _pad_to_window(src.atlas, win)  # a no-op unless the window is larger than O-Net's
    y = xp.clip(corner_N[:, 0] + xp.maximum(iy0_N, 0), 0, atlas.shape[0] - win).astype(xp.int32)
    x = xp.clip(corner_N[:, 1] + xp.maximum(ix0_N, 0), 0, atlas.shape[1] - win).astype(xp.int32)
    return _windows(atlas, y, x, win), y - corner_N[:, 0], x - corner_N[:, 1]


def crop_patches(src: CropSources, boxes_Nx4: Array, out: int) -> Array:
    """Crops (N, out, out, 3) of fixed 1-based boxes, zero outside the image (pad.m), each resampled from
    the smallest source still at least `out` pixels across the box (the image if none): a window of the
    source, resampled by one small matrix product per axis."""
    taps = CROP_TAPS
    xp = bx.xp_of(src.atlas, boxes_Nx4)
    b = xp.asarray(boxes_Nx4, dtype=xp.float32)
    n_h, n_w = b[:, 3] - b[:, 1] + 1, b[:, 2] - b[:, 0] + 1
    ok_NxJ = (n_h[:, None] * src.scale_Jx2[None, :, 0] >= out) & (n_w[:, None] * src.scale_Jx2[None, :, 1] >= out)
    last = ok_NxJ.shape[1] - 1 - xp.argmax(ok_NxJ[:, ::-1], axis=1)
    j_N = xp.where(ok_NxJ.any(axis=1), last, 0)
    sy, sx = src.scale_Jx2[j_N, 0], src.scale_Jx2[j_N, 1]
    iy, wy = resample_taps((b[:, 1] - 1) * sy, n_h * sy, xp.full_like(sy, out), out, taps)
    ix, wx = resample_taps((b[:, 0] - 1) * sx, n_w * sx, xp.full_like(sx, out), out, taps)
    h_N, w_N = src.hw_Jx2[j_N, 0][:, None, None], src.hw_Jx2[j_N, 1][:, None, None]
    wy, wx = xp.where((iy >= 0) & (iy < h_N), wy, 0.0), xp.where((ix >= 0) & (ix < w_N), wx, 0.0)
    win = crop_window(out, taps)
    pixels, y0, x0 = _read_windows(src, j_N, iy[:, 0, 0], ix[:, 0, 0], win)
    rows_NxOxP, cols_NxOxQ = _window_weights(iy, wy, y0, win), _window_weights(ix, wx, x0, win)
    return xp.einsum("nrq,noqc->norc", cols_NxOxQ, xp.einsum("nop,npqc->noqc", rows_NxOxP, pixels))


def _probability(logits: Array) -> np.ndarray:
    return np.asarray(nets.face_probability(logits))


_jitted_nets = {stage: jax.jit(fn) for stage, fn in nets.NETS.items()}


def _run_net(stage: str, params: dict, x_Nx: np.ndarray) -> dict[str, np.ndarray]:
    """A net on a host batch (readable path), jitted, with N padded to a power of two so only a
    handful of shapes ever compile."""
    n = len(x_Nx)
    size = 1 << max(4, (n - 1).bit_length()) if stage != "pnet" else n
    x = np.concatenate([x_Nx, np.zeros((size - n,) + x_Nx.shape[1:], x_Nx.dtype)]) if size > n else x_Nx
    return {k: np.asarray(v)[:n] for k, v in _jitted_nets[stage](params, nets.normalize(x)).items()}


# ----------------------------------------------------------------------------- the readable path

def detect_steps(params: dict, image_HxWx3: np.ndarray, config: CascadeConfig = CascadeConfig()) -> dict:
    """Run the cascade step by step with dynamic shapes and return every stage's result.

    Keys: "scales", "levels" (pixel-unit arrays), "pnet_levels" (per level: windows and scores after the
    level's NMS, and how many windows passed t1), "pnet" / "rnet" / "onet" (boxes_Nx4, scores_N after
    each stage) and "landmarks" (N, 5, 2).
    """
    image = np.asarray(image_HxWx3, np.float32)
    h, w = image.shape[:2]
    plan = PyramidPlan.of(h, w, config)
    if not plan.scales:  # smaller than one 12-pixel window at the first scale: nothing to detect
        none = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)}
        return {"scales": [], "levels": [], "pnet_levels": [], "pnet": none, "rnet": none, "onet": none,
                "landmarks": np.zeros((0, 5, 2), np.float32)}
    sizes = level_sizes(h, w, list(plan.scales))
    groups = [np.asarray(g) for g in build_levels(image, np.array([h, w]), sizes, plan)]
    levels = level_views(groups, sizes, plan)
    found = [_pnet_level_steps(params["pnet"], lvl, s, config) for lvl, s in zip(levels, plan.scales)]
    steps: dict[str, Any] = {"scales": list(plan.scales), "levels": levels, "pnet_levels": [
        {"boxes": f[0], "scores": f[1], "n_above_threshold": f[3]} for f in found]}
    win, score, reg = (np.concatenate([f[i] for f in found] + [np.zeros((0,) + e, np.float32)])
                       for i, e in enumerate([(4,), (), (4,)]))
    keep = bx.nms(win, score, config.nms_pnet)
    b1 = bx.fix(bx.square(bx.regress(win[keep], reg[keep], plus_one=False)))
    steps["pnet"] = {"boxes": b1, "scores": score[keep]}
    src = crop_sources(image, np.array([h, w]), crop_mips(h, w))
    out = _run_net("rnet", params["rnet"], crop_patches(src, b1, 24))
    prob, reg = _probability(out["logits"]), np.asarray(out["box"])
    passed = np.nonzero(prob > config.thresholds[1])[0]
    keep = passed[bx.nms(b1[passed], prob[passed], config.nms_rnet)]
    b2 = bx.fix(bx.square(bx.regress(b1[keep], reg[keep], plus_one=True)))
    steps["rnet"] = {"boxes": b2, "scores": prob[keep]}
    out = _run_net("onet", params["onet"], crop_patches(src, b2, 48))
    prob, reg, rel = _probability(out["logits"]), np.asarray(out["box"]), np.asarray(out["landmarks"])
    passed = np.nonzero(prob > config.thresholds[2])[0]
    points = bx.landmarks_from_relative(b2[passed], rel[passed])
    b3 = bx.regress(b2[passed], reg[passed], plus_one=True)
    keep = bx.nms(b3, prob[passed], config.nms_onet, mode="min")
    steps["onet"] = {"boxes": b3[keep], "scores": prob[passed][keep]}
    steps["landmarks"] = points[keep]
    return steps


def _pnet_level_steps(params: dict, level_HxWx3: np.ndarray, scale: float, config: CascadeConfig):
    """One level: windows whose face probability >= t1, after the level's own NMS (Union 0.5), and how
    many windows passed the threshold before that NMS."""
    out = _run_net("pnet", params, level_HxWx3[None])
    prob, reg = _probability(out["logits"])[0], out["box"][0]
    rows, cols = np.nonzero(prob >= config.thresholds[0])
    win = bx.pnet_windows(rows, cols, scale).astype(np.float32)
    keep = bx.nms(win, prob[rows, cols], config.nms_level)
    return win[keep], prob[rows, cols][keep], reg[rows, cols][keep], len(rows)


# ----------------------------------------------------------------------------- the fixed-shape path

def _pnet_candidates(prob_M, reg_Mx4, mask_M, windows_Mx4, level_M, capacities, config: CascadeConfig):
    """One image, all levels' cells at once: windows >= t1 compacted into the window capacity, NMS
    (Union 0.5) within each level, NMS (Union 0.7) over all, then regression without +1, squaring and fix."""
    window_capacity, pnet_capacity = capacities
    win, score, reg, level, valid, over_window = bx.compact(mask_M, prob_M, window_capacity,
                                                            windows_Mx4, prob_M, reg_Mx4, level_M)
    keep = bx.nms_fixed(win, score, valid, config.nms_level, groups_K=level)
    keep = bx.nms_fixed(win, score, keep, config.nms_pnet)
    win, score, reg, valid, over_pnet = bx.compact(keep, score, pnet_capacity, win, score, reg)
    return bx.fix(bx.square(bx.regress(win, reg, plus_one=False))), score, valid, over_window, over_pnet


def _after_rnet(boxes_Px4, valid_P, prob_P, reg_Px4, config: CascadeConfig):
    """One image: score > t2, NMS (Union 0.7) on the input boxes, regression with +1, squaring, fix."""
    keep = bx.nms_fixed(boxes_Px4, prob_P, valid_P & (prob_P > config.thresholds[1]), config.nms_rnet)
    b, s, r, valid, over = bx.compact(keep, prob_P, config.rnet_capacity, boxes_Px4, prob_P, reg_Px4)
    return bx.fix(bx.square(bx.regress(b, r, plus_one=True))), s, valid, over


def _after_onet(boxes_Rx4, valid_R, prob_R, reg_Rx4, rel_Rx10, config: CascadeConfig):
    """One image: score > t3, landmarks from the pre-regression box, regression with +1, Min-NMS 0.7."""
    points = bx.landmarks_from_relative(boxes_Rx4, rel_Rx10)
    b = bx.regress(boxes_Rx4, reg_Rx4, plus_one=True)
    keep = bx.nms_fixed(b, prob_R, valid_R & (prob_R > config.thresholds[2]), config.nms_onet, mode="min")
    return bx.compact(keep, prob_R, config.max_faces, b, prob_R, points)


def _run_in_chunks(fn: Callable, boxes_BxNx4, valid_BxN, chunk: int, spec: dict) -> dict:
    """fn over slot chunks (B, chunk, 4) -> dict of (B, chunk, ...) (trailing shapes and dtypes in `spec`),
    only while some image still has a valid slot there (valid slots come first): an empty stage costs nothing."""
    b, n = valid_BxN.shape
    n_chunks = (jnp.max(jnp.sum(valid_BxN, axis=1)) + chunk - 1) // chunk
    init = {k: jnp.zeros((b, n) + shape, dtype) for k, (shape, dtype) in spec.items()}

    def body(state):
        c, outs = state
        o = fn(jax.lax.dynamic_slice_in_dim(boxes_BxNx4, c * chunk, chunk, axis=1))
        return c + 1, {k: jax.lax.dynamic_update_slice_in_dim(outs[k], o[k], c * chunk, axis=1) for k in outs}

    return jax.lax.while_loop(lambda s: s[0] < n_chunks, body, (jnp.int32(0), init))[1]


@functools.lru_cache(maxsize=None)
def _stage_spec(stage: str) -> dict:
    """{output: (trailing shape, dtype)} of a stage net per crop, plus "prob" (traced once per process)."""
    size = INPUT_SIZE[stage]
    params = jax.eval_shape(lambda: nets.init_params(jax.random.key(0), [stage])[stage])
    out = jax.eval_shape(nets.NETS[stage], params, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return {**{k: (v.shape[1:], v.dtype) for k, v in out.items()}, "prob": ((), jnp.float32)}


def _stage_net(net: Callable, params: dict, srcs: CropSources, out: int) -> Callable:
    """(B, C, 4) boxes -> dict of (B, C, ...) net outputs on their crops, plus the face probability."""

    def fn(boxes_BxCx4):
        crops = jax.vmap(lambda s, bb: crop_patches(s, bb, out))(srcs, boxes_BxCx4)
        bsz, c = crops.shape[:2]
        o = net(params, nets.normalize(crops.reshape((bsz * c,) + crops.shape[2:])))
        o = {k: v.reshape((bsz, c) + v.shape[1:]) for k, v in o.items()}
        return {**o, "prob": nets.face_probability(o["logits"])}

    return fn


jax.tree_util.register_dataclass(CropSources, data_fields=["atlas", "hw_Jx2", "scale_Jx2"], meta_fields=["corners"])


def _cell_mask(prob_BxM, level_hw_BxLx2, level_on_BxL, cell_level_M, cell_rc_Mx2, t1: float):
    """Canvas P-Net cells that lie inside their level's real map, on a level the image uses, with p >= t1."""
    lvl = jnp.maximum(cell_level_M, 0)
    maps = pnet_map_size(level_hw_BxLx2)[:, lvl]  # (B, M, 2)
    inside = (cell_rc_Mx2[None, :, 0] < maps[..., 0]) & (cell_rc_Mx2[None, :, 1] < maps[..., 1])
    return (cell_level_M >= 0)[None] & level_on_BxL[:, lvl] & inside & (prob_BxM >= t1)


def cascade_fn(params, images_BxHxWx3, sizes_Bx2, level_hw_BxLx2, level_on_BxL, taps_B, windows_Mx4, cell_level_M,
               cell_rc_Mx2, config: CascadeConfig, upto: str = "onet"):
    """The whole cascade for one bucket, fixed shapes throughout (stopping after `upto`); traced and
    compiled once per bucket by `compiled_cascade`. The last three arguments are the bucket's
    `PyramidPlan.cells`, the three before them `image_plan`'s."""
    bsz, hb, wb, _ = images_BxHxWx3.shape
    plan = PyramidPlan.of(hb, wb, config)
    rows = jnp.arange(hb)[None, :, None] < sizes_Bx2[:, 0, None, None]
    cols = jnp.arange(wb)[None, None, :] < sizes_Bx2[:, 1, None, None]
    images = jnp.where((rows & cols)[..., None], images_BxHxWx3, 0).astype(jnp.float32)  # zero padding
    n_crop = crop_mips(hb, wb)
    mips = jax.vmap(lambda im, hw: mip_pyramid(im, hw, max(plan.n_mips, n_crop)))(images, sizes_Bx2)
    groups = jax.vmap(lambda im, hw, lhw, taps, m: build_levels(im, hw, lhw, plan, taps, m))(
        images, sizes_Bx2, level_hw_BxLx2, taps_B, mips)
    masks = jax.vmap(lambda lhw: level_masks(lhw, plan))(level_hw_BxLx2)
    probs, regs = [], []
    for group, real in zip(groups, masks):
        out = nets.pnet(params["pnet"], nets.normalize(group), valid_mask=real)
        probs.append(nets.face_probability(out["logits"]).reshape(bsz, -1))
        regs.append(out["box"].reshape(bsz, -1, 4))
    prob = jnp.concatenate(probs, axis=1)
    mask = _cell_mask(prob, level_hw_BxLx2, level_on_BxL, cell_level_M, cell_rc_Mx2, config.thresholds[0])
    b1, s1, v1, over_window, over_pnet = jax.vmap(
        functools.partial(_pnet_candidates, windows_Mx4=windows_Mx4, level_M=cell_level_M,
                          capacities=bucket_capacities(config, hb, wb), config=config))(
        prob, jnp.concatenate(regs, axis=1), mask)
    overflow = {"window": over_window, "pnet": over_pnet}
    if upto == "pnet":
        return {"boxes": b1, "scores": s1, "valid": v1, "overflow": overflow}
    srcs = jax.vmap(lambda im, hw, m: crop_sources(im, hw, n_crop, m))(images, sizes_Bx2, mips)
    r = _run_in_chunks(_stage_net(nets.rnet, params["rnet"], srcs, 24), b1, v1, config.net_chunk, _stage_spec("rnet"))
    b2, s2, v2, overflow["rnet"] = jax.vmap(functools.partial(_after_rnet, config=config))(b1, v1, r["prob"], r["box"])
    if upto == "rnet":
        return {"boxes": b2, "scores": s2, "valid": v2, "overflow": overflow}
    o = _run_in_chunks(_stage_net(nets.onet, params["onet"], srcs, 48), b2, v2, config.net_chunk, _stage_spec("onet"))
    b3, s3, pts, v3, overflow["faces"] = jax.vmap(functools.partial(_after_onet, config=config))(
        b2, v2, o["prob"], o["box"], o["landmarks"])
    return {"boxes": b3, "scores": s3, "landmarks": pts, "valid": v3, "overflow": overflow}


def image_plan(sizes_Bx2: np.ndarray, bucket_hw: tuple[int, int], config: CascadeConfig):
    """Per-image runtime inputs for a bucket: real level sizes (B, L, 2), which levels each image uses,
    and the levels' resampling taps (`level_taps`, each with a leading B)."""
    plan = PyramidPlan.of(*bucket_hw, config)
    n = len(plan.scales)
    level_hw = np.stack([level_sizes(int(h), int(w), list(plan.scales)) for h, w in sizes_Bx2]).reshape(-1, n, 2)
    used = [len(pyramid_scales(int(h), int(w), config.min_face_size, config.scale_factor)) for h, w in sizes_Bx2]
    taps = [level_taps(np.asarray(hw), lhw, plan) for hw, lhw in zip(sizes_Bx2, level_hw)]
    return level_hw, np.arange(n)[None, :] < np.array(used)[:, None], tuple(np.stack(t) for t in zip(*taps))


def pad_to_bucket(images: list[np.ndarray], bucket_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 HxWx3 images zero-padded (bottom/right) into one (B, Hb, Wb, 3) batch, and their real sizes
    (B, 2): the inputs of `detect_bucket`."""
    batch = np.zeros((len(images), *bucket_hw, 3), np.uint8)
    for b, image in enumerate(images):
        batch[b, : image.shape[0], : image.shape[1]] = image
    return batch, np.array([image.shape[:2] for image in images], np.int32).reshape(-1, 2)


def _compiler_options() -> dict[str, Any]:
    """XLA:CPU's newer fusion emitters compile this graph about 1.5x slower for no run-time gain
    (benchmarks/README.md); other backends get their defaults."""
    return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else {}


def bucket_arguments(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig) -> tuple:
    """The shapes and dtypes (`jax.ShapeDtypeStruct`s) of `cascade_fn`'s arguments for one bucket."""
    plan = PyramidPlan.of(*bucket_hw, config)
    level_hw, level_on, taps = image_plan(np.tile(np.array(bucket_hw, np.int32), (batch, 1)), bucket_hw, config)
    images, sizes = np.zeros((batch, *bucket_hw, 3), np.uint8), np.zeros((batch, 2), np.int32)
    args = (params, images, sizes, level_hw, level_on, taps, *plan.cells)
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)


def export_cascade(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                   upto: str = "onet", platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The cascade of one bucket and batch size as a `jax.export.Exported` (StableHLO with a stable
    calling convention; params are arguments, so any weights of these shapes run in it), lowered for
    `platforms` (default: this machine's backend)."""
    return _export(bucket_arguments(params, bucket_hw, batch, config), config, upto, platforms)


def _export(arguments: tuple, config: CascadeConfig, upto: str,
            platforms: Sequence[str] | None = None) -> jax.export.Exported:
    fn = jax.jit(functools.partial(cascade_fn, config=config, upto=upto))
    return jax.export.export(fn, platforms=platforms)(*arguments)


_compiled: dict[tuple, Future] = {}
_compiled_lock = threading.Lock()


def _params_signature(params: dict) -> tuple:
    return tuple((jax.tree_util.keystr(path), tuple(a.shape), str(a.dtype))
                 for path, a in jax.tree_util.tree_leaves_with_path(params))


def compiled_cascade(params: dict, bucket_hw: tuple[int, int], batch: int, config: CascadeConfig = CascadeConfig(),
                     upto: str = "onet") -> Callable:
    """The compiled cascade of one (bucket, batch size, config, upto), called as `cascade_fn` without its
    config and upto. Compiled once per process (threads asking for one bucket wait for one compile;
    different buckets compile concurrently) and, through `compile_cache`, once per machine: a later
    process loads the export and XLA's executable from the user's cache folder."""
    bucket_hw = tuple(bucket_hw)
    key = (bucket_hw, batch, config, upto, _params_signature(params))
    with _compiled_lock:
        future, owner = _compiled.get(key), False
        if future is None:
            future, owner = _compiled.setdefault(key, Future()), True
    if owner:
        try:
            future.set_result(_compile(key, bucket_arguments(params, bucket_hw, batch, config)))
        except BaseException as err:
            with _compiled_lock:
                del _compiled[key]
            future.set_exception(err)
    return future.result()


def _compile(key: tuple, arguments: tuple) -> Callable:
    """Export (or load the stored export of) the cascade of `compiled_cascade`'s key and compile it ahead
    of time for these argument shapes."""
    _, _, config, upto, _ = key
    exp, _ = compile_cache.exported(f"cascade|{key!r}", lambda: _export(arguments, config, upto))
    return jax.jit(exp.call, compiler_options=_compiler_options()).lower(*arguments).compile()


def detect_bucket(params: dict, images_BxHxWx3: np.ndarray, sizes_Bx2: np.ndarray,
                  config: CascadeConfig = CascadeConfig(), upto: str = "onet") -> dict:
    """Detect faces in a batch of images zero-padded (bottom/right) into one bucket.

    Returns numpy "boxes" (B, F, 4), "scores" (B, F), "landmarks" (B, F, 5, 2), "valid" (B, F) (valid
    rows first, by score) and "overflow": {stage: (B,) candidates dropped by a full capacity}.
    `upto="pnet"` or `"rnet"` stops after that stage (the candidates hard-example mining needs; no
    landmarks). Compiles once per (bucket height, bucket width, batch size, config, upto): see
    `compiled_cascade`.
    """
    images = np.asarray(images_BxHxWx3)
    sizes = np.asarray(sizes_Bx2, np.int32).reshape(-1, 2)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(sizes) != len(images):
        raise ValueError("detect_bucket needs uint8 images (B, H, W, 3) and their real sizes (B, 2)")
    hb, wb = images.shape[1:3]
    if (sizes < 12).any() or (sizes[:, 0] > hb).any() or (sizes[:, 1] > wb).any():
        raise ValueError(f"image sizes {sizes.tolist()} must be >= 12 and fit the bucket {hb}x{wb}")
    if upto not in ("pnet", "rnet", "onet"):
        raise ValueError(f"upto must be 'pnet', 'rnet' or 'onet', got {upto!r}")
    plan = PyramidPlan.of(hb, wb, config)
    if not plan.scales:
        raise ValueError(f"bucket {hb}x{wb} is too small for min_face_size={config.min_face_size}")
    level_hw, level_on, taps = image_plan(sizes, (hb, wb), config)
    run = compiled_cascade(params, (hb, wb), len(images), config, upto)
    out = run(params, images, sizes, level_hw, level_on, taps, *plan.cells)
    return jax.tree_util.tree_map(np.asarray, out)
