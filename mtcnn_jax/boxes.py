"""Box math shared by the readable (numpy) and the jitted (jax.numpy) paths.

Boxes are rows x1, y1, x2, y2 in pixel coordinates. Every function works on numpy arrays
(returning numpy) and on jax arrays (returning jax arrays, jittable): one implementation of each
idea, used by the study notebooks, the fixed-shape cascade and the evaluators alike.

The original MTCNN (detect_face.m, nms.m) counts pixels inclusively: a box from x1 to x2 is
x2 - x1 + 1 pixels wide. Areas and overlaps here follow that "+1" convention, as does the
official WIDER FACE evaluation.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from mtcnn_jax.stages import FLIP_POINTS

Array = Any  # np.ndarray or jax.Array

# Add to a landmark to get pixel-index coordinates (pixel centres at 0, 1, ...: numpy, OpenCV, skimage).
LANDMARK_INDEX_OFFSET = -0.5


def xp_of(*arrays: Array):
    """The array module for the inputs: jax.numpy if any is a jax array (or tracer), else numpy.
    Only looked up, never imported: numpy-only users (the sample workers) never load JAX."""
    jax = sys.modules.get("jax")
    if jax is not None and any(isinstance(a, jax.Array) for a in arrays):
        return jax.numpy
    return np


def _lax():
    """jax.lax, for jax inputs (JAX is then loaded already)."""
    return sys.modules["jax"].lax


def area(boxes_Nx4: Array) -> Array:
    """Areas with the original's +1 pixel convention: (x2 - x1 + 1) * (y2 - y1 + 1)."""
    xp = xp_of(boxes_Nx4)
    b = xp.asarray(boxes_Nx4)
    return (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)


def iou_matrix(a_Nx4: Array, b_Mx4: Array, mode: str = "union") -> Array:
    """Pairwise overlap (N, M) of two box sets, +1 areas as in nms.m.

    mode "union": intersection / union (IoU); mode "min": intersection / min(area_a, area_b),
    the overlap MTCNN uses for its final NMS after O-Net.
    """
    xp = xp_of(a_Nx4, b_Mx4)
    a, b = xp.asarray(a_Nx4), xp.asarray(b_Mx4)
    w = xp.maximum(0, xp.minimum(a[:, None, 2], b[None, :, 2]) - xp.maximum(a[:, None, 0], b[None, :, 0]) + 1)
    h = xp.maximum(0, xp.minimum(a[:, None, 3], b[None, :, 3]) - xp.maximum(a[:, None, 1], b[None, :, 1]) + 1)
    inter = w * h
    area_a, area_b = area(a)[:, None], area(b)[None, :]
    if mode == "union":
        denom = area_a + area_b - inter
    elif mode == "min":
        denom = xp.minimum(area_a, area_b)
    else:
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    return inter / xp.maximum(denom, 1e-12)


def fix(x: Array) -> Array:
    """MATLAB's fix: round toward zero (the original truncates window and crop coordinates so)."""
    xp = xp_of(x)
    return xp.trunc(xp.asarray(x))


def rank_order(scores_K: Array, valid_K: Array) -> Array:
    """Slot order for greedy NMS and compaction: valid first, then descending score, ties by lower index.

    Ties are those of a stable sort on -score. nms.m instead pops the last entry of an ascending
    stable sort, so among exactly equal scores it takes the HIGHER index first.
    """
    xp = xp_of(scores_K, valid_K)
    invalid_K = (~xp.asarray(valid_K, dtype=bool)).astype(xp.int8)
    return xp.lexsort((-xp.asarray(scores_K), invalid_K))  # last key is the primary one


def nms(boxes_Nx4: Array, scores_N: Array, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy NMS (nms.m), readable numpy path: kept indices in the order they were kept.

    Highest score first, equal scores lower index first (see rank_order); a box is dropped when
    its overlap with an already kept box is > threshold (nms.m keeps `o <= threshold`).
    """
    boxes_Nx4, scores_N = np.asarray(boxes_Nx4), np.asarray(scores_N)
    order = np.argsort(-scores_N, kind="stable")
    kept = []
    while order.size > 0:
        i, order = order[0], order[1:]
        kept.append(i)
        o = iou_matrix(boxes_Nx4[i : i + 1], boxes_Nx4[order], mode)[0]
        order = order[o <= threshold]
    return np.asarray(kept, dtype=np.int64)


def _fixed_point(step, x0: Array, xp) -> Array:
    """Iterate x <- step(x) from x0 until it stops changing (lax.while_loop under jax)."""
    if xp is np:
        prev, x = x0, step(x0)
        while not np.array_equal(prev, x):
            prev, x = x, step(x)
        return x

    def body(carry):
        x, _ = carry
        new = step(x)
        return new, xp.any(new != x)

    return _lax().while_loop(lambda carry: carry[1], body, (x0, xp.asarray(True)))[0]


NMS_BLOCK = 256  # slots per block of `nms_fixed`: its largest intermediate is one block x block matrix


def nms_fixed(
    boxes_Kx4: Array, scores_K: Array, valid_K: Array, threshold: float, mode: str = "union",
    groups_K: Array | None = None, block: int = NMS_BLOCK,
) -> Array:
    """Exact greedy NMS over K fixed slots (jittable): a keep mask equal to `nms` on the valid slots.

    In rank order, greedy keeps slot i iff it is valid and no kept earlier slot j overlaps it > t.
    With `groups_K`, only slots of the same group suppress each other: `nms` run on each group
    separately (MATLAB's per-scale NMS over all pyramid levels in one call). Computed a block of slots
    at a time (`_greedy_blocked`), so memory is bounded by block x block on every backend and the
    work follows the valid slots, not the capacity.
    """
    xp = xp_of(boxes_Kx4, scores_K, valid_K, threshold, groups_K)
    order_K = rank_order(scores_K, valid_K)
    b_Kx4 = xp.asarray(boxes_Kx4)[order_K]
    v_K = xp.asarray(valid_K, dtype=bool)[order_K]
    g_K = xp.zeros(v_K.shape, xp.int32) if groups_K is None else xp.asarray(groups_K)[order_K]
    keep_sorted_K = _greedy_blocked(b_Kx4, v_K, g_K, threshold, mode, min(block, v_K.shape[0]), xp)
    return keep_sorted_K[xp.argsort(order_K)]


def _greedy_blocked(b_Kx4, v_K, g_K, threshold, mode, block, xp):
    """Greedy keep mask of rank-sorted slots (valid first), block by block: block i's keeps, already
    suppressed by the kept slots of the blocks before it, are settled by the Jacobi iteration
    keep <- valid & ~any(S & keep) within the block (greedy fixes keep[i] from keep[:i], so this has
    one fixed point, the greedy result, reached in at most `block` rounds, usually a few); then its kept
    slots suppress each later block. Only blocks holding valid slots are visited."""
    k = v_K.shape[0]
    pad = -k % block
    n = (k + pad) // block
    boxes_NxBx4 = xp.pad(b_Kx4, ((0, pad), (0, 0))).reshape(n, block, 4)
    groups_NxB = xp.pad(g_K, (0, pad)).reshape(n, block)
    before_BxB = xp.triu(xp.ones((block, block), dtype=bool), k=1)  # [j, i]: j ranks before i
    n_used = (xp.sum(v_K) + block - 1) // block

    def overlaps(i, j):  # [a, b]: slot a of block i suppresses slot b of block j if a is kept
        s = iou_matrix(boxes_NxBx4[i], boxes_NxBx4[j], mode) > threshold
        return s & (groups_NxB[i][:, None] == groups_NxB[j][None, :])

    def settle(i, keep_NxB):
        s_BxB = overlaps(i, i) & before_BxB
        first = keep_NxB[i]
        keep_i = _fixed_point(lambda x: first & ~xp.any(s_BxB & x[:, None], axis=0), first, xp)

        def suppress(j, keep):
            return _set_row(keep, j, keep[j] & ~xp.any(overlaps(i, j) & keep_i[:, None], axis=0), xp)

        return _loop(i + 1, n_used, suppress, _set_row(keep_NxB, i, keep_i, xp), xp)

    valid_NxB = xp.pad(v_K, (0, pad)).reshape(n, block)
    return _loop(0, n_used, settle, valid_NxB, xp).reshape(-1)[:k]


def _set_row(a, i, row, xp):
    if xp is np:
        a = a.copy()
        a[i] = row
        return a
    return a.at[i].set(row)


def _loop(lo, hi, body, x, xp):
    """x <- body(i, x) for i in [lo, hi): a Python loop on numpy, lax.fori_loop under jax."""
    if xp is np:
        for i in range(int(lo), int(hi)):
            x = body(i, x)
        return x
    return _lax().fori_loop(lo, hi, body, x)


def _top_slots(mask_K: Array, scores_K: Array, n: int, xp) -> Array:
    """The first n slots of rank_order: under jax a partial sort (lax.top_k keeps the lower index
    first among equal keys), which is far cheaper than a full sort of a large P-Net map."""
    if xp is np:
        return rank_order(scores_K, mask_K)[:n]
    key_K = xp.where(mask_K, xp.asarray(scores_K, dtype=xp.float32), -xp.inf)
    return _lax().top_k(key_K, n)[1]


def compact(mask_K: Array, scores_K: Array, capacity: int, *arrays_K: Array, limit: Array | None = None) -> tuple:
    """Move the masked-in entries to the front, by descending score, into `capacity` fixed slots.

    Returns (*arrays_C, valid_C, overflow) where overflow counts the masked-in entries that did not
    fit, so truncation is never silent. Slots beyond the valid ones are zero-filled. Jittable
    (capacity is static). `limit` (a traced count <= capacity) fills only the first `limit` slots: the
    same entries as `compact` to `limit` slots, in a shape that does not depend on it.
    """
    xp = xp_of(mask_K, scores_K, *arrays_K)
    mask_K = xp.asarray(mask_K, dtype=bool)
    k = mask_K.shape[0]
    order = _top_slots(mask_K, scores_K, min(capacity, k), xp)
    if capacity > k:
        order = xp.concatenate([order, xp.zeros(capacity - k, dtype=order.dtype)])
    idx_C = order[:capacity]
    valid_C = mask_K[idx_C] & (xp.arange(capacity) < (k if limit is None else xp.minimum(k, limit)))
    gathered = []
    for a in arrays_K:
        a_C = xp.asarray(a)[idx_C]
        valid = valid_C.reshape(valid_C.shape + (1,) * (a_C.ndim - 1))
        gathered.append(xp.where(valid, a_C, xp.zeros((), dtype=a_C.dtype)))
    overflow = xp.maximum(xp.sum(mask_K) - (capacity if limit is None else limit), 0)
    return (*gathered, valid_C, overflow)


def regress(boxes_Nx4: Array, reg_Nx4: Array, plus_one: bool) -> Array:
    """Box regression (bbreg.m): boxes + reg * [w, h, w, h].

    w = x2 - x1 (+1 when plus_one). The original calls it with w = x2 - x1 after P-Net
    (detect_face.m inlines that step) and with bbreg.m's +1 widths after R-Net and O-Net.
    """
    xp = xp_of(boxes_Nx4, reg_Nx4)
    b, r = xp.asarray(boxes_Nx4), xp.asarray(reg_Nx4)
    one = 1 if plus_one else 0
    w = b[..., 2] - b[..., 0] + one
    h = b[..., 3] - b[..., 1] + one
    return b + r * xp.stack([w, h, w, h], axis=-1)


def square(boxes_Nx4: Array) -> Array:
    """Square boxes around their centre with side max(w, h), w = x2 - x1 (rerec.m, no +1)."""
    xp = xp_of(boxes_Nx4)
    b = xp.asarray(boxes_Nx4)
    w, h = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
    side = xp.maximum(w, h)
    x1 = b[..., 0] + w * 0.5 - side * 0.5
    y1 = b[..., 1] + h * 0.5 - side * 0.5
    return xp.stack([x1, y1, x1 + side, y1 + side], axis=-1)


def refine(boxes_Nx4: Array, reg_Nx4: Array, plus_one: bool) -> Array:
    """The boxes the next stage crops (detect_face.m after P-Net and after R-Net): regressed (`regress`,
    without +1 after P-Net, with it after R-Net), squared (`square`) and truncated (`fix`)."""
    return fix(square(regress(boxes_Nx4, reg_Nx4, plus_one)))


def pnet_windows(rows: Array, cols: Array, scale: float, stride: int = 2, cell: int = 12) -> Array:
    """Original-image window (..., 4) of P-Net output cells (0-based row i, col j) at a pyramid scale.

    As generateBoundingBox in detect_face.m: x1 = fix((stride*j + 1) / scale), x2 =
    fix((stride*j + cell) / scale), likewise y from i; 1-based inclusive pixel coordinates.
    Pass numpy index grids (they are static per level) to get MATLAB's float64 result: in float32
    (jax's default) about 1% of the windows land one pixel off.
    """
    xp = xp_of(rows, cols, scale)
    i, j = xp.asarray(rows), xp.asarray(cols)
    x1, y1 = fix((stride * j + 1) / scale), fix((stride * i + 1) / scale)
    x2, y2 = fix((stride * j + cell) / scale), fix((stride * i + cell) / scale)
    return xp.stack([x1, y1, x2, y2], axis=-1)


def landmarks_from_relative(boxes_Nx4: Array, rel_Nx10: Array) -> Array:
    """O-Net landmarks (N, 5, 2) as (x, y) from box-relative outputs (x1..x5, y1..y5).

    detect_face.m: x = w * p + x1 - 1 with w = x2 - x1 + 1, using the box BEFORE its O-Net regression: p
    runs over the box's pixel edges, x1 - 1 to x2, so a landmark at pixel index k (0-based) reads k + 0.5
    (`LANDMARK_INDEX_OFFSET`).
    """
    xp = xp_of(boxes_Nx4, rel_Nx10)
    b, p = xp.asarray(boxes_Nx4), xp.asarray(rel_Nx10)
    w = (b[..., 2] - b[..., 0] + 1)[..., None]
    h = (b[..., 3] - b[..., 1] + 1)[..., None]
    xs = w * p[..., :5] + b[..., 0:1] - 1
    ys = h * p[..., 5:] + b[..., 1:2] - 1
    return xp.stack([xs, ys], axis=-1)


def mirror_landmarks(rel_Nx10: Array) -> Array:
    """Box-relative landmarks (N, 10) of the left-right mirrored crop: x becomes 1 - x (the relative frame
    spans the box's pixel edges, so the mirror is exact) and the eyes and mouth corners swap
    (`stages.FLIP_POINTS`). Its own inverse; the training flips use it too."""
    xp = xp_of(rel_Nx10)
    flip = list(FLIP_POINTS)
    m = xp.asarray(rel_Nx10)
    return xp.concatenate([1 - m[..., :5][..., flip], m[..., 5:][..., flip]], axis=-1)


def mirror_average(rel_Nx10: Array, rel_mirrored_Nx10: Array) -> Array:
    """Box-relative landmarks (N, 10) averaged with the net's on the mirrored crops, mirrored back.
    Test-time mirroring of O-Net, from the original's later release; it halves what is asymmetric in the
    net's landmark error."""
    return (xp_of(rel_Nx10, rel_mirrored_Nx10).asarray(rel_Nx10) + mirror_landmarks(rel_mirrored_Nx10)) / 2
