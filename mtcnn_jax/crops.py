"""The crops of candidate boxes that R-Net and O-Net see (paper Sec. 2.1, stages 2 and 3).

As detect_face.m's pad.m and imResample: a crop of a 1-based box, zero outside the image, resized to the
net's input (24 or 48 pixels) by an area average when shrinking and bilinear (half-pixel centres,
clamped to the box) when enlarging, each axis on its own. Exactly, at a cost independent of the box's
size: with pixels as unit squares, the image's integral up to a point is bilinear inside each pixel, so
every crop pixel, shrunk or enlarged, is a weighted sum of at most 3 x 3 rectangles of whole pixels, and a
rectangle's sum is 4 reads of the image's summed-area table (`CropSources`). Works on numpy and jax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax.nets import PRECISION

Array = Any  # np.ndarray or jax.Array


@dataclass(frozen=True)
class CropSources:
    """What crops read: the image's summed-area table (`_table`), zero outside its real h x w, as uint32
    (`sums`): exact modulo 2^32, so every rectangle's sum under 2^32 is exact (an 8-bit box of up to
    4096 x 4096 pixels; past that a bright box's sum would wrap). For images with non-integer values
    (8-bit images have none) also the float32 table of what rounding to integers left (`residual`)."""

    sums: Array
    residual: Array | None

    @property
    def hw(self) -> tuple[int, int]:
        """The image size (H, W) the tables cover (`cascade.table_slot` of the bucket, in the jitted cascade)."""
        return self.sums.shape[0] - 3, self.sums.shape[1] - 3


jax.tree_util.register_dataclass(CropSources, data_fields=["sums", "residual"], meta_fields=[])
# The cascade's stage programs pass crop sources from one to the next (`compiled.py`), so their exports name it.
jax.export.register_pytree_node_serialization(CropSources, serialized_name="mtcnn_jax.crops.CropSources",
                                              serialize_auxdata=lambda aux: b"", deserialize_auxdata=lambda data: ())


def _prefix(values: Array, axis: int) -> Array:
    """Running sums along an axis, in the array's dtype (uint32 wraps): numpy's cumsum; on XLA:CPU a
    scan over the lines, several times faster than its cumsum."""
    if bx.xp_of(values) is np:
        return np.cumsum(values, axis=axis, dtype=values.dtype)
    lines = jax.numpy.moveaxis(values, axis, 0)
    sums = jax.lax.scan(lambda c, line: (c + line, c + line), jax.numpy.zeros_like(lines[0]), lines)[1]
    return jax.numpy.moveaxis(sums, 0, axis)


def _table(values_HxWxC: Array, dtype) -> Array:
    """The summed-area table (H + 3, W + 3, C) of the values with one zero pixel around them: line L + 1
    of it is line L of the table of the values, and lines 0 and 1 (and the last two) are equal, so a
    pair of lines starting anywhere in 0..H + 1 reads the table of the values clamped to 0..H."""
    xp = bx.xp_of(values_HxWxC)
    padded = xp.pad(values_HxWxC.astype(dtype), ((1, 1), (1, 1), (0, 0)))
    return xp.pad(_prefix(_prefix(padded, 0), 1), ((1, 0), (1, 0), (0, 0)))


def crop_sources(image_HxWx3: Array, image_hw: Array, table_hw: tuple[int, int] | None = None) -> CropSources:
    """The crop sources of an image (any array; pixels non-negative) zero outside its real h x w. With
    `table_hw` (at least the array's H x W) the tables cover that size: past the image they repeat their last
    lines, so every read there equals the clamped read and crops are the same; crops of all arrays up to one
    table size then compile as one program."""
    xp = bx.xp_of(image_HxWx3, image_hw)
    image = xp.asarray(image_HxWx3)
    hw = xp.asarray(image_hw)
    real = (xp.arange(image.shape[0])[:, None] < hw[0]) & (xp.arange(image.shape[1])[None, :] < hw[1])
    image = xp.where(real[..., None], image, xp.zeros((), image.dtype))
    grow = (0, 0) if table_hw is None else (table_hw[0] - image.shape[0], table_hw[1] - image.shape[1])
    if min(grow) < 0:
        raise ValueError(f"table_hw {table_hw} is smaller than the image array {image.shape[:2]}")
    table = lambda v, dtype: xp.pad(_table(v, dtype), ((0, grow[0]), (0, grow[1]), (0, 0)), mode="edge")  # noqa: E731
    if xp.issubdtype(image.dtype, xp.integer):
        return CropSources(table(image, xp.uint32), None)
    whole = xp.rint(image)
    return CropSources(table(whole, xp.uint32), table(image.astype(xp.float32) - whole, xp.float32))


def _axis_weights(start_N: Array, length_N: Array, out: int, size: int) -> tuple[Array, Array]:
    """One axis of N crops of source intervals [start, start + length) resized to `out` samples: a grid of
    out + 1 pairs of adjacent table lines (L, L + 1), as the first line of each pair in `_table`'s
    padded numbering (N, out + 1), and each sample's weights (N, out, G - 1) over the G - 1 runs of whole
    pixels between the G = 2 * out + 2 lines.

    Shrinking (area average over [u_k, u_k+1), u_k = start + k * length / out): the lines are floor(u_k)
    and floor(u_k) + 1 for every k, so sample k is the part of pixel floor(u_k), the whole pixels up to
    floor(u_k+1) and the part of that one. Enlarging (bilinear at the sample's centre c, clamped into the
    interval): the lines are consecutive, each run one pixel, and sample k reads floor(c) and floor(c) + 1."""
    xp = bx.xp_of(start_N, length_N)
    start, length = start_N[:, None], length_N[:, None]
    ratio = length / out
    k, lines = xp.arange(out + 1, dtype=xp.float32), 2 * out + 2
    u = start + k * ratio
    iu = xp.floor(u)
    fu = u - iu
    centre = xp.clip(start + (k[:-1] + 0.5) * ratio - 0.5, start, start + length - 1)
    ic = xp.floor(centre)
    fc = centre - ic
    shrink = ratio >= 1
    pairs = xp.where(shrink, iu, ic[:, :1] + 2 * xp.arange(out + 1))
    first = xp.where(shrink, 2 * xp.arange(out), (ic - ic[:, :1]).astype(xp.int32))  # (N, out): run of the first tap
    taps = xp.where(shrink[..., None], xp.stack([1 - fu[:, :-1], xp.ones_like(fc), fu[:, 1:]], axis=-1) / ratio[..., None],
                    xp.stack([1 - fc, fc, xp.zeros_like(fc)], axis=-1))  # (N, out, 3): runs first .. first + 2
    run = xp.arange(lines - 1)[None, None, :] - first[..., None]  # (N, out, G - 1)
    weights = sum(xp.where(run == t, taps[..., t : t + 1], 0.0) for t in range(3))
    return xp.clip(pairs + 1, 0, size + 1).astype(xp.int32), weights.astype(xp.float32)


def _corners(table: Array, pairs_y: Array, pairs_x: Array) -> Array:
    """(N, P, P, 2, 2, C) reads of the table: for every row pair and column pair its 2 x 2 lines."""
    if bx.xp_of(table, pairs_y) is np:
        y, x = pairs_y[:, :, None] + np.arange(2), pairs_x[:, :, None] + np.arange(2)  # (N, P, 2)
        return table[y[:, :, None, :, None], x[:, None, :, None, :]]
    read = lambda y, x: jax.lax.dynamic_slice(table, (y, x, 0), (2, 2, table.shape[2]))  # noqa: E731
    return jax.vmap(jax.vmap(jax.vmap(read, (None, 0)), (0, None)))(pairs_y, pairs_x)


def _run_sums(table: Array, pairs_y: Array, pairs_x: Array) -> dict[str, Array]:
    """Sums of the rectangles of whole pixels between consecutive grid lines, by kind of run along rows
    and columns: "e" within a pair of lines (even runs), "o" between pairs (odd runs); {"ee": (N, P, P, C),
    "eo": (N, P, P - 1, C), "oe", "oo"}. Differenced along each axis in the table's dtype (exact modulo
    2^32 for uint32), then float32."""
    xp = bx.xp_of(table, pairs_y)
    at = _corners(table, pairs_y, pairs_x)
    rows = {"e": at[:, :, :, 1] - at[:, :, :, 0], "o": at[:, 1:, :, 0] - at[:, :-1, :, 1]}  # (N, Py, Px, 2, C)
    return {r + c: v.astype(xp.float32) for r, v in rows.items() for c, v in
            (("e", v[:, :, :, 1] - v[:, :, :, 0]), ("o", v[:, :, 1:, 0] - v[:, :, :-1, 1]))}


def crop_patches(src: CropSources, boxes_Nx4: Array, out: int) -> Array:
    """Crops (N, out, out, 3) of 1-based boxes (pixels x1..x2, y1..y2; sub-pixel coordinates allowed),
    zero outside the image (pad.m), resized as imResample: exact area averages or bilinear samples."""
    xp = bx.xp_of(src.sums, boxes_Nx4)
    b = xp.asarray(boxes_Nx4, dtype=xp.float32).reshape(-1, 4)
    h, w = src.hw
    gy, wy = _axis_weights(b[:, 1] - 1, b[:, 3] - b[:, 1] + 1, out, h)
    gx, wx = _axis_weights(b[:, 0] - 1, b[:, 2] - b[:, 0] + 1, out, w)
    sums = _run_sums(src.sums, gy, gx)
    if src.residual is not None:
        sums = {k: v + r for (k, v), r in zip(sums.items(), _run_sums(src.residual, gy, gx).values())}
    # The two kinds of runs stay apart, weighted each by its own columns: interleaving them back into one
    # grid is a copy that doubled the crops' time on XLA:CPU.
    wy, wx = {"e": wy[..., 0::2], "o": wy[..., 1::2]}, {"e": wx[..., 0::2], "o": wx[..., 1::2]}
    rows = {c: sum(_einsum(xp, "nyp,npqc->nyqc", wy[r], sums[r + c]) for r in "eo") for c in "eo"}
    return sum(_einsum(xp, "nxq,nyqc->nyxc", wx[c], rows[c]) for c in "eo")


def _einsum(xp: Any, spec: str, *operands: Array) -> Array:
    """`xp.einsum` with float32 products on every backend (`nets.PRECISION`)."""
    return xp.einsum(spec, *operands) if xp is np else xp.einsum(spec, *operands, precision=PRECISION)
