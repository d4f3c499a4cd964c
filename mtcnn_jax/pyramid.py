"""The image pyramid (paper Sec. 2.1, "resized to different scales"): scales, level sizes, and the levels
themselves, resampled as detect_face.m does and packed for P-Net.

Scales and level sizes follow detect_face.m. Resizing follows imResample, which detect_face.m calls: an
exact area average when shrinking, bilinear with half-pixel centres when enlarging (`resample_taps`; the
crops, `crops.py`, compute the same from the image itself). One shortcut keeps it cheap, documented in the
README: a level is area-resampled from the exact 2^j x 2^j mip of the image just larger than it
(`mip_pyramid`), not from the image itself.
All levels live in one canvas (`PyramidPlan`, packed by `pack_levels`), so P-Net runs once per image, and
the canvas is built from a few whole-array gathers (`build_levels`), so a bucket compiles fast. Every
function works on numpy (the readable path) and jax arrays (the jitted one).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.stages import INPUT_SIZE

Array = Any  # np.ndarray or jax.Array


def pyramid_scales(h: int, w: int, min_face_size: float, scale_factor: float) -> list[float]:
    """detect_face.m's scales: m = 12 / minsize, m * factor^k while min(h, w) * m * factor^k >= 12
    (12: P-Net's input, so the smallest level holds one window)."""
    window = INPUT_SIZE["pnet"]
    m = window / min_face_size
    minl, scales = min(h, w) * m, []
    while minl >= window:
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


GAP = 2  # pixels between packed levels, so that P-Net's ceil pooling never mixes two (nets.pnet's valid_mask)


def _footprint(h: int, w: int) -> tuple[int, int]:
    """A level's room in the canvas: its buffer and the gap, rounded up to even sides (even offsets keep
    P-Net's stride-2 cells aligned with every level)."""
    return h + GAP + h % 2, w + GAP + w % 2


def pack_levels(bufs: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Places (row, col) for the level buffers in one canvas as wide as the widest, and the canvas size:
    guillotine packing, largest first, each level into the smallest free rectangle it fits (the canvas's
    open bottom last), which then splits into the room right of the level and the room below it.
    One canvas means one P-Net shape per bucket: XLA compiles P-Net once instead of once per level group."""
    width = max((_footprint(*b)[1] for b in bufs), default=0)
    free = [(0, 0, width, math.inf)]  # free rectangles (row, col, width, height)
    places = []
    for h, w in bufs:
        fh, fw = _footprint(h, w)
        y, x, rw, rh = min((r for r in free if r[2] >= fw and r[3] >= fh), key=lambda r: (r[2] * r[3], r[:2]))
        free.remove((y, x, rw, rh))
        free += [r for r in ((y, x + fw, rw - fw, fh), (y + fh, x, rw, rh - fh)) if r[2] > 0 and r[3] > 0]
        places.append((y, x))
    window = INPUT_SIZE["pnet"]
    hc = max([y + h for (y, _), (h, _) in zip(places, bufs)], default=0)
    wc = max([x + w for (_, x), (_, w) in zip(places, bufs)], default=0)
    return places, (max(hc, window), max(wc, window))


@dataclass(frozen=True)
class PyramidPlan:
    """The static layout of an h x w (bucket) pyramid: scales, level buffers packed in one canvas
    (`pack_levels`: even offsets, 2-pixel gaps so P-Net never mixes levels), mips and resampling taps."""

    scales: tuple[float, ...]
    bufs: tuple[tuple[int, int], ...]
    places: tuple[tuple[int, int], ...]
    canvas_hw: tuple[int, int]
    mip_hw: tuple[tuple[int, int], ...]
    taps: int

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(h: int, w: int, config: CascadeConfig) -> "PyramidPlan":
        scales = pyramid_scales(h, w, config.min_face_size, config.scale_factor)
        bufs = [tuple(b) for b in level_sizes(h, w, scales).tolist()]
        places, canvas_hw = pack_levels(bufs)
        ratio = 1.0 / min(scales[-1], 1.0) if scales else 1.0
        n_mips = max(1, min(int(math.log2(ratio)), 6) + 1)
        mip_hw = tuple((-(-h // 2**j), -(-w // 2**j)) for j in range(n_mips))  # mip_pyramid's sizes
        return PyramidPlan(tuple(scales), tuple(bufs), tuple(places), canvas_hw, mip_hw,
                           _taps(ratio / 2 ** (n_mips - 1) * 13 / 12))

    @property
    def n_mips(self) -> int:
        return len(self.mip_hw)

    @functools.cached_property
    def mips(self) -> np.ndarray:
        """The mip each level is area-resampled from: the largest 2^-j at least as large as its scale."""
        inv = 1.0 / np.minimum(np.array(self.scales, float), 1.0)
        return np.clip(np.floor(np.log2(inv) + 1e-9), 0, self.n_mips - 1).astype(int)

    @functools.cached_property
    def cells(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the canvas's P-Net map, flattened: windows (M, 4) in float64 as MATLAB computes them, then
        float32; each cell's level (M,) (-1 outside levels) and (row, col) within the level (M, 2).
        Passed to the jitted cascade as arguments: as constants they would slow its compilation."""
        mh, mw = (int(v) for v in pnet_map_size(np.array(self.canvas_hw)))
        level, rc = np.full((mh, mw), -1, np.int32), np.zeros((mh, mw, 2), np.int32)
        for k, ((bh, bw), (oy, ox)) in enumerate(zip(self.bufs, self.places)):
            nh, nw = (max(int(v), 0) for v in pnet_map_size(np.array([bh, bw])))
            level[oy // 2 : oy // 2 + nh, ox // 2 : ox // 2 + nw] = k
            rc[oy // 2 : oy // 2 + nh, ox // 2 : ox // 2 + nw] = np.stack(np.meshgrid(
                np.arange(nh), np.arange(nw), indexing="ij"), -1)
        scale = np.array(self.scales + (1.0,))[level]  # level -1 gets a dummy scale
        windows = bx.pnet_windows(rc[..., 0], rc[..., 1], scale)
        return windows.reshape(-1, 4).astype(np.float32), level.reshape(-1), rc.reshape(-1, 2)


def _sum_pool2(x_HxWxC: Array) -> Array:
    x = x_HxWxC[0::2] + x_HxWxC[1::2]  # strided adds: cheaper than a reshape-sum on XLA:CPU
    return x[:, 0::2] + x[:, 1::2]


def mip_pyramid(image_HxWx3: Array, n_mips: int) -> list[Array]:
    """Mips of the image as block sums: mip j sums each 2^j x 2^j block (mip 0 is the image). The image
    must be zero outside its real h x w, so padding never leaks in; `level_taps` divides by the number of
    real pixels in each block, which makes every mip the exact area average over real pixels."""
    xp = bx.xp_of(image_HxWx3)
    sums = xp.asarray(image_HxWx3, xp.float32)
    mips = [sums]
    for _ in range(1, n_mips):
        odd = ((0, sums.shape[0] % 2), (0, sums.shape[1] % 2), (0, 0))
        sums = _sum_pool2(xp.pad(sums, odd) if odd[0][1] or odd[1][1] else sums)
        mips.append(sums)
    return mips


def level_taps(image_hw: Array, level_hw_Lx2: Array, plan: PyramidPlan) -> tuple[Array, Array, Array, Array]:
    """Resampling taps of every level from its mip, as `build_levels` reads them: rows (R, T), every level's
    rows one after the other (R: the sum of the buffers' heights) indexing its mip's stacked array
    (`_atlases`); columns (L, canvas width, T) indexing its mip. Indices, then weights, which also divide each
    mip block's sum by its real pixels. They depend only on the sizes, so the jitted cascade gets them
    computed on the host (numpy) as arguments."""
    xp = bx.xp_of(image_hw, level_hw_Lx2)
    hw, lhw = xp.asarray(image_hw, xp.float32), xp.asarray(level_hw_Lx2, xp.float32)
    zero, block_L = xp.zeros_like(lhw[:, 0]), xp.asarray(2.0 ** plan.mips, xp.float32)
    iy, wy = resample_taps(zero, hw[0] / block_L, lhw[:, 0], max(b[0] for b in plan.bufs), plan.taps)
    ix, wx = resample_taps(zero, hw[1] / block_L, lhw[:, 1], plan.canvas_hw[1], plan.taps)
    mip_hw, block = np.array(plan.mip_hw)[plan.mips], block_L[:, None, None]  # (L, 2), (L, 1, 1)
    iy, ix = xp.clip(iy, 0, mip_hw[:, 0, None, None] - 1), xp.clip(ix, 0, mip_hw[:, 1, None, None] - 1)
    wy = wy / xp.clip(hw[0] - iy * block, 1, block)  # the real rows in each block row
    wx = wx / xp.clip(hw[1] - ix * block, 1, block)  # the real columns in each block column
    atlas_row = {j: sum(plan.mip_hw[i][0] for i in js[: js.index(j)]) for js in _atlases(plan) for j in js}
    rows = xp.concatenate([atlas_row[j] + iy[k, :h] for k, (j, (h, _)) in enumerate(zip(plan.mips.tolist(),
                                                                                          plan.bufs))])
    return rows, xp.concatenate([wy[k, :h] for k, (h, _) in enumerate(plan.bufs)]), ix, wx


def build_levels(image_HxWx3: Array, image_hw: Array, level_hw_Lx2: Array, plan: PyramidPlan,
                 taps: tuple[Array, Array, Array, Array] | None = None) -> Array:
    """All pyramid levels (pixel units) in the plan's canvas (rows, width, 3): level k at plan.places[k],
    area-resampled to ceil(h * s) x ceil(w * s) from its mip (the 2^-j scale just larger than it); zero
    elsewhere. `taps` are `level_taps(image_hw, level_hw_Lx2, plan)`, computed here when not given.
    Separable, in few ops (XLA compiles each op of a bucket once, so fewer ops compile faster): the rows of
    all levels gathered at once from the image and at once from the smaller mips stacked (`_atlases`), then
    each level's columns from its rows."""
    xp = bx.xp_of(image_HxWx3, image_hw, level_hw_Lx2)
    mips = mip_pyramid(image_HxWx3, plan.n_mips)
    rows_RxT, wy_RxT, ix, wx = level_taps(image_hw, level_hw_Lx2, plan) if taps is None else taps
    canvas, first = xp.zeros((*plan.canvas_hw, 3), xp.float32), 0
    for js in _atlases(plan):  # levels come in order of their mips, so each atlas's rows are consecutive
        ks = [k for k in range(len(plan.bufs)) if plan.mips[k] in js]
        n_rows, width = sum(plan.bufs[k][0] for k in ks), plan.mip_hw[js[0]][1]
        atlas = xp.concatenate([xp.pad(mips[j], ((0, 0), (0, width - mips[j].shape[1]), (0, 0))) for j in js])
        rows_NxT, wy_NxT = rows_RxT[first : first + n_rows], wy_RxT[first : first + n_rows]
        v = sum(wy_NxT[:, t, None, None] * atlas[rows_NxT[:, t]] for t in range(plan.taps))
        # Columns: gather whole columns of each level's rows (transposed, a column is one contiguous row;
        # gathering single pixels is several times slower on XLA:CPU).
        vt, row = xp.swapaxes(v, 0, 1), 0
        for k in ks:
            (bh, bw), cols = plan.bufs[k], ix[k, : plan.bufs[k][1]]
            level = sum(wx[k, :bw, t, None, None] * vt[cols[:, t], row : row + bh] for t in range(plan.taps))
            canvas, row = _placed(canvas, xp.swapaxes(level, 0, 1), plan.places[k], xp), row + bh
        first += n_rows
    return canvas


def _atlases(plan: PyramidPlan) -> list[list[int]]:
    """The mips read together: the image alone, and the smaller mips stacked (each of those levels' rows is
    gathered from one stacked array, so a bucket compiles two vertical passes, not one per mip)."""
    used = set(plan.mips.tolist())
    return [js for js in ([0], list(range(1, plan.n_mips))) if used & set(js)]


def _placed(canvas: Array, level: Array, place: tuple[int, int], xp) -> Array:
    """The canvas with `level` written at `place` (numpy in place, jax functionally)."""
    (y, x), (h, w) = place, level.shape[:2]
    if xp is np:
        canvas[y : y + h, x : x + w] = level
        return canvas
    return canvas.at[y : y + h, x : x + w].set(level)


def level_masks(level_hw_Lx2: Array, plan: PyramidPlan) -> Array:
    """Real pixels (rows, width) of the canvas for one image's level sizes."""
    xp = bx.xp_of(level_hw_Lx2)
    lhw = xp.asarray(level_hw_Lx2)
    rows, cols = xp.arange(plan.canvas_hw[0])[:, None], xp.arange(plan.canvas_hw[1])[None, :]
    real = xp.zeros(plan.canvas_hw, bool)
    for k, (y, x) in enumerate(plan.places):
        real = real | ((rows >= y) & (rows < y + lhw[k, 0]) & (cols >= x) & (cols < x + lhw[k, 1]))
    return real


def level_views(canvas: Array, level_hw_Lx2: np.ndarray, plan: PyramidPlan) -> list[Array]:
    """The levels as separate arrays of their real sizes (readable path, host)."""
    sizes = np.asarray(level_hw_Lx2).tolist()
    return [canvas[oy : oy + h, ox : ox + w] for (h, w), (oy, ox) in zip(sizes, plan.places)]


def image_plan(sizes_Bx2: np.ndarray, bucket_hw: tuple[int, int], config: CascadeConfig):
    """Per-image runtime inputs of the jitted cascade for a bucket: real level sizes (B, L, 2), which levels
    each image uses, and the levels' resampling taps (`level_taps`, each with a leading B). Computed once per
    distinct size: a batch of same-size images (video frames, a camera's photos) costs one."""
    plan = PyramidPlan.of(*bucket_hw, config)
    n = len(plan.scales)
    sizes_Ux2, image_B = np.unique(np.asarray(sizes_Bx2).reshape(-1, 2), axis=0, return_inverse=True)
    level_hw = np.stack([level_sizes(int(h), int(w), list(plan.scales)) for h, w in sizes_Ux2]).reshape(-1, n, 2)
    used = [len(pyramid_scales(int(h), int(w), config.min_face_size, config.scale_factor)) for h, w in sizes_Ux2]
    taps = [level_taps(hw, lhw, plan) for hw, lhw in zip(sizes_Ux2, level_hw)]
    image_B = image_B.reshape(-1)
    level_on = np.arange(n)[None, :] < np.array(used)[:, None]
    return level_hw[image_B], level_on[image_B], tuple(np.stack(t)[image_B] for t in zip(*taps))

