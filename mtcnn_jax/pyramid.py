"""The image pyramid (paper Sec. 2.1, "resized to different scales"): scales, level sizes, and the levels
themselves, resampled as detect_face.m does and packed for P-Net.

Scales and level sizes follow detect_face.m. Resizing follows imResample, which detect_face.m calls: an
exact area average when shrinking, bilinear with half-pixel centres when enlarging (`resample_taps`; the
crops, `crops.py`, compute the same from the image itself). One shortcut keeps it cheap, documented in the
README: a level is area-resampled from the exact 2^j x 2^j mip of the image just larger than it
(`mip_pyramid`), not from the image itself.
All levels live in stacked canvases (`PyramidPlan`: the four largest levels one each, the rest together),
so P-Net runs five times. Every function works on numpy (the readable path) and jax arrays (the jitted one).
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
        window = INPUT_SIZE["pnet"]
        return PyramidPlan(tuple(scales), tuple(bufs), tuple(offsets),
                           (max(row - 2, window), max([b[1] for b in bufs], default=window)), n_mips,
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


def image_plan(sizes_Bx2: np.ndarray, bucket_hw: tuple[int, int], config: CascadeConfig):
    """Per-image runtime inputs of the jitted cascade for a bucket: real level sizes (B, L, 2), which levels each image uses,
    and the levels' resampling taps (`level_taps`, each with a leading B)."""
    plan = PyramidPlan.of(*bucket_hw, config)
    n = len(plan.scales)
    level_hw = np.stack([level_sizes(int(h), int(w), list(plan.scales)) for h, w in sizes_Bx2]).reshape(-1, n, 2)
    used = [len(pyramid_scales(int(h), int(w), config.min_face_size, config.scale_factor)) for h, w in sizes_Bx2]
    taps = [level_taps(np.asarray(hw), lhw, plan) for hw, lhw in zip(sizes_Bx2, level_hw)]
    return level_hw, np.arange(n)[None, :] < np.array(used)[:, None], tuple(np.stack(t) for t in zip(*taps))

