"""The crops of candidate boxes that R-Net and O-Net see (paper Sec. 2.1, stages 2 and 3).

As detect_face.m's pad.m and imResample: a crop of a 1-based box, zero outside the image, resized to the
net's input (24 or 48 pixels) by an area average when shrinking and bilinear when enlarging
(`pyramid.resample_taps`). To keep it cheap, a crop is resampled from the image's 2^-j mip just larger
than it (`CropSources`), reading one small window of that source. Works on numpy and jax arrays alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax.pyramid import mip_pyramid, resample_taps
from mtcnn_jax.stages import INPUT_SIZE

Array = Any  # np.ndarray or jax.Array

# Crops are resampled from the 2^-j mip of the image just larger than them: at most 2 source pixels per
# output pixel, so 3 taps cover every area average (and bilinear enlarging needs 2).
CROP_TAPS = 3


def crop_mips(h: int, w: int) -> int:
    """Mips an h x w image needs as crop sources: a 24-pixel crop (R-Net's, the smaller) of any box up to
    4 times the image's longer side then reads at most 2 mip pixels per output pixel."""
    return max(1, math.ceil(math.log2(2 * max(h, w) / INPUT_SIZE["rnet"]))) + 1


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


jax.tree_util.register_dataclass(CropSources, data_fields=["atlas", "hw_Jx2", "scale_Jx2"], meta_fields=["corners"])


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

