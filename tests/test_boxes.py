"""Tests of mtcnn_jax.boxes: hand-computed cases, and greedy-NMS properties with hypothesis."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtcnn_jax import boxes as B

K = 12  # fixed slot count of the jitted NMS: one compilation per mode for all examples
SETTINGS = settings(deadline=None, max_examples=150, derandomize=True)

nms_fixed_jit = jax.jit(B.nms_fixed, static_argnames=("mode", "block"))
BLOCKS = (B.NMS_BLOCK, 5, 1)  # one block (K < NMS_BLOCK), blocks that do not divide K, one slot per block
compact_jit = jax.jit(B.compact, static_argnums=2)


# ---- iou_matrix --------------------------------------------------------------------------------


def test_area_plus_one():
    np.testing.assert_array_equal(B.area(np.array([[0, 0, 9, 4], [3, 3, 3, 3]])), [50, 1])


def test_iou_matrix_hand_computed():
    a = np.array([[0, 0, 9, 9]], float)  # 10x10 = 100
    b = np.array(
        [
            [0, 0, 9, 9],  # identical
            [5, 0, 14, 9],  # half shifted: inter 5x10 = 50
            [2, 2, 5, 5],  # contained 4x4 = 16
            [10, 0, 19, 9],  # touching edge, disjoint with +1 areas
            [30, 30, 40, 40],  # far away
        ],
        float,
    )
    union = B.iou_matrix(a, b, "union")[0]
    np.testing.assert_allclose(union, [1.0, 50 / 150, 16 / 100, 0.0, 0.0])
    mn = B.iou_matrix(a, b, "min")[0]
    np.testing.assert_allclose(mn, [1.0, 0.5, 1.0, 0.0, 0.0])
    assert B.iou_matrix(a, b).shape == (1, 5)


def test_iou_matrix_bad_mode():
    with pytest.raises(ValueError):
        B.iou_matrix(np.zeros((1, 4)), np.zeros((1, 4)), "max")


# ---- nms (readable) -----------------------------------------------------------------------------


def test_nms_hand_made():
    boxes = np.array(
        [
            [0, 0, 9, 9],  # 0: score .8
            [1, 1, 10, 10],  # 1: score .9, IoU with 0 = 81/119 = .68
            [20, 20, 29, 29],  # 2: alone
            [5, 0, 14, 9],  # 3: IoU with 1 = 54/146 = .37, min-overlap .54
            [2, 2, 5, 5],  # 4: inside 0 and 1: IoU with 1 = .16, min-overlap 1
        ],
        float,
    )
    scores = np.array([0.8, 0.9, 0.7, 0.6, 0.5])
    np.testing.assert_array_equal(B.nms(boxes, scores, 0.5), [1, 2, 3, 4])
    np.testing.assert_array_equal(B.nms(boxes, scores, 0.3), [1, 2, 4])
    np.testing.assert_array_equal(B.nms(boxes, scores, 0.1), [1, 2])
    np.testing.assert_array_equal(B.nms(boxes, scores, 0.7, "min"), [1, 2, 3])
    np.testing.assert_array_equal(B.nms(boxes, scores, 1.0), [1, 0, 2, 3, 4])


def test_nms_overlap_equal_to_threshold_is_kept_and_ties_by_index():
    boxes = np.array([[0, 0, 9, 9], [5, 0, 14, 9], [0, 0, 9, 9]], float)  # IoU(0, 1) = 1/3
    np.testing.assert_array_equal(B.nms(boxes, np.ones(3), 1 / 3), [0, 1])
    np.testing.assert_array_equal(B.nms(boxes, np.ones(3), 0.3), [0])
    np.testing.assert_array_equal(B.nms(boxes, np.array([1, 2, 2.0]), 0.9), [1, 2])
    assert B.nms(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


# ---- nms_fixed against nms: properties ----------------------------------------------------------


@st.composite
def slot_sets(draw, k=K):
    """K integer boxes crowded into a small area (many overlaps), tied scores, a validity mask."""
    coords = st.integers(0, 24)
    sides = st.integers(0, 14)
    rows = draw(st.lists(st.tuples(coords, coords, sides, sides), min_size=k, max_size=k))
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in rows], float)
    scores = np.array(draw(st.lists(st.integers(0, 4), min_size=k, max_size=k)), float) / 4
    valid = np.array(draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    return boxes, scores, valid


thresholds = st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0])
modes = st.sampled_from(["union", "min"])


def reference_keep(boxes, scores, valid, t, mode):
    idx = np.flatnonzero(valid)
    keep = np.zeros(len(valid), bool)
    keep[idx[B.nms(boxes[idx], scores[idx], t, mode)]] = True
    return keep


@SETTINGS
@given(slot_sets(), thresholds, modes)
def test_nms_fixed_jit_equals_greedy(data, t, mode):
    boxes, scores, valid = data
    want = reference_keep(boxes, scores, valid, t, mode)
    args = jnp.asarray(boxes, jnp.float32), jnp.asarray(scores), jnp.asarray(valid)
    for block in BLOCKS:
        got = nms_fixed_jit(*args, t, mode=mode, block=block)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"block {block}")
        np.testing.assert_array_equal(B.nms_fixed(boxes, scores, valid, t, mode, block=block), want)


@SETTINGS
@given(slot_sets(), thresholds, st.lists(st.integers(0, 2), min_size=K, max_size=K))
def test_nms_fixed_groups_equal_nms_per_group(data, t, groups):
    """With groups, the result is `nms` run on each group on its own (per pyramid level)."""
    boxes, scores, valid = data
    groups = np.array(groups)
    want = np.zeros(K, bool)
    for g in range(3):
        want |= reference_keep(boxes, scores, valid & (groups == g), t, "union")
    args = jnp.asarray(boxes, jnp.float32), jnp.asarray(scores), jnp.asarray(valid)
    for block in BLOCKS:
        got = nms_fixed_jit(*args, t, groups_K=jnp.asarray(groups), block=block)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"block {block}")


@SETTINGS
@given(slot_sets(), thresholds, modes)
def test_nms_greedy_properties(data, t, mode):
    boxes, scores, valid = data
    args = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
    keep = np.asarray(nms_fixed_jit(*args, t, mode=mode))
    assert not (keep & ~valid).any()
    o = B.iou_matrix(boxes, boxes, mode)
    kept = np.flatnonzero(keep)
    off_diagonal = ~np.eye(len(kept), dtype=bool)
    assert (o[np.ix_(kept, kept)][off_diagonal] <= t).all()
    rank = np.empty(K, int)
    rank[B.rank_order(scores, valid)] = np.arange(K)
    for i in np.flatnonzero(valid & ~keep):
        assert (keep & (rank < rank[i]) & (o[:, i] > t)).any(), i


def test_nms_fixed_long_chain():
    # Neighbours overlap .67, next-but-one .43: greedy keeps every other box; the Jacobi iteration
    # within a block needs about a round per slot, and each block settles the next.
    k = 40
    boxes = np.array([[2 * i, 0, 2 * i + 9, 9] for i in range(k)], float)
    scores = np.linspace(1, 0, k)
    want = reference_keep(boxes, scores, np.ones(k, bool), 0.6, "union")
    assert want.sum() == k // 2
    for block in (B.NMS_BLOCK, 16, 3):
        got = nms_fixed_jit(jnp.asarray(boxes), jnp.asarray(scores), jnp.ones(k, bool), 0.6, block=block)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"block {block}")


# ---- compact ------------------------------------------------------------------------------------


@SETTINGS
@given(
    st.lists(st.booleans(), min_size=K, max_size=K),
    st.lists(st.integers(0, 3), min_size=K, max_size=K),
    st.sampled_from([1, 5, K, K + 3]),
)
def test_compact(mask, scores, capacity):
    mask, scores = np.array(mask), np.array(scores, float)
    values = np.arange(K) + 100
    boxes = np.arange(4 * K, dtype=float).reshape(K, 4)
    want_idx = sorted(np.flatnonzero(mask), key=lambda i: (-scores[i], i))[:capacity]
    n = len(want_idx)
    np_args = (mask, scores, values, boxes)
    for xp_args in (np_args, tuple(jnp.asarray(a) for a in np_args)):
        fn = compact_jit if isinstance(xp_args[0], jax.Array) else B.compact
        v, b, valid, overflow = fn(xp_args[0], xp_args[1], capacity, *xp_args[2:])
        assert v.shape == (capacity,) and b.shape == (capacity, 4) and valid.shape == (capacity,)
        np.testing.assert_array_equal(np.asarray(valid), np.arange(capacity) < n)
        np.testing.assert_array_equal(np.asarray(v)[:n], values[want_idx])
        np.testing.assert_array_equal(np.asarray(b)[:n], boxes[want_idx])
        assert (np.asarray(v)[n:] == 0).all() and (np.asarray(b)[n:] == 0).all()
        assert int(overflow) == max(int(mask.sum()) - capacity, 0)


@SETTINGS
@given(
    st.lists(st.booleans(), min_size=K, max_size=K),
    st.lists(st.integers(0, 3), min_size=K, max_size=K),
    st.sampled_from([5, K, K + 3]),
    st.integers(0, 5),
)
def test_compact_with_a_limit_is_compact_to_the_limit(mask, scores, capacity, limit):
    """A traced limit fills the first `limit` of `capacity` slots with what `compact` to `limit` slots
    gives, zeros after them, and the same overflow: a shape that does not depend on the limit."""
    mask, scores = np.array(mask), np.array(scores, float)
    values, boxes = np.arange(K) + 100, np.arange(4 * K, dtype=float).reshape(K, 4)
    want = B.compact(mask, scores, limit, values, boxes)
    for xp, fn in ((np, B.compact), (jnp, compact_jit)):
        got = fn(xp.asarray(mask), xp.asarray(scores), capacity, xp.asarray(values), xp.asarray(boxes),
                 limit=xp.asarray(limit))
        assert got[0].shape == (capacity,) and got[2].shape == (capacity,)
        for g, w in zip(got[:3], want[:3]):
            np.testing.assert_array_equal(np.asarray(g)[:limit], w)
            assert (np.asarray(g)[limit:] == 0).all()
        assert int(got[3]) == int(want[3])


# ---- regress, square, fix -----------------------------------------------------------------------


def test_regress_hand_computed():
    boxes = np.array([[10, 20, 30, 60]], float)  # w 20 (21), h 40 (41)
    reg = np.array([[0.1, -0.1, 0.5, 0.25]])
    np.testing.assert_allclose(B.regress(boxes, reg, plus_one=False), [[12, 16, 40, 70]])
    np.testing.assert_allclose(B.regress(boxes, reg, plus_one=True), [[12.1, 15.9, 40.5, 70.25]])


def test_square_hand_computed():
    np.testing.assert_allclose(B.square(np.array([[10, 20, 30, 60.0]])), [[0, 20, 40, 60]])
    np.testing.assert_allclose(B.square(np.array([[0, 0, 9, 3.0]])), [[0, -3, 9, 6]])


@SETTINGS
@given(st.lists(st.tuples(*[st.floats(-50, 50)] * 2, *[st.floats(0, 80)] * 2), min_size=1, max_size=6))
def test_square_equal_sides_same_centre(rows):
    boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in rows])
    sq = B.square(boxes)
    np.testing.assert_allclose(sq[:, 2] - sq[:, 0], sq[:, 3] - sq[:, 1], atol=1e-9)
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    np.testing.assert_allclose(sq[:, 2] - sq[:, 0], side, atol=1e-9)
    np.testing.assert_allclose(sq[:, :2] + sq[:, 2:], boxes[:, :2] + boxes[:, 2:], atol=1e-9)


def test_fix_truncates_toward_zero():
    np.testing.assert_array_equal(B.fix(np.array([1.7, -1.7, 2.0, -0.2])), [1, -1, 2, 0])


# ---- P-Net windows, landmarks, crops ------------------------------------------------------------


def test_pnet_windows_hand_computed():
    s = 0.5
    w = B.pnet_windows(np.array([0, 1]), np.array([0, 3]), s)
    # j=0: fix(1/.5)=2, fix(12/.5)=24; j=3: fix(7/.5)=14, fix(18/.5)=36; i=1: fix(3/.5)=6, fix(14/.5)=28
    np.testing.assert_array_equal(w, [[2, 2, 24, 24], [14, 6, 36, 28]])
    w = B.pnet_windows(np.array([[2]]), np.array([[1]]), 0.3)  # fix(3/.3)=10 (float64!), fix(14/.3)=46
    np.testing.assert_array_equal(w, [[[10, 16, 46, 53]]])
    assert B.pnet_windows(np.zeros((3, 5)), np.zeros((3, 5)), 1.0).shape == (3, 5, 4)


def test_pnet_windows_jax_within_one_pixel_of_numpy():
    i, j = np.meshgrid(np.arange(60), np.arange(70), indexing="ij")
    for k in range(6):
        s = 0.6 * 0.709**k
        want = B.pnet_windows(i, j, s)
        got = np.asarray(jax.jit(functools.partial(B.pnet_windows, scale=s))(jnp.asarray(i), jnp.asarray(j)))
        assert np.abs(got - want).max() <= 1


def test_landmarks_from_relative():
    boxes = np.array([[11, 21, 30, 60.0]])  # w 20, h 40
    rel = np.array([[0, 0.5, 1, 0.25, 0.75, 0, 0.5, 1, 0.25, 0.75]])
    lm = B.landmarks_from_relative(boxes, rel)
    assert lm.shape == (1, 5, 2)
    np.testing.assert_allclose(lm[0, :, 0], [10, 20, 30, 15, 25])
    np.testing.assert_allclose(lm[0, :, 1], [20, 40, 60, 30, 50])


def test_mirror_average_hand_computed():
    """The left eye at x 0.2, seen on the mirrored crop as its right eye at 0.7 (0.3 unmirrored): 0.25; and
    an output the mirrored crop agrees with exactly is kept as it is."""
    rel = np.array([[0.2, 0.8, 0.5, 0.3, 0.7, 0.3, 0.3, 0.5, 0.7, 0.7]])
    seen = np.array([[0.2 + 0.1, 0.7, 0.5 - 0.1, 0.3, 0.7, 0.32, 0.28, 0.5, 0.7, 0.7]])  # mirrored crop's
    got = B.mirror_average(rel, seen)
    np.testing.assert_allclose(got, [[0.25, 0.75, 0.55, 0.3, 0.7, 0.29, 0.31, 0.5, 0.7, 0.7]], atol=1e-12)
    consistent = np.concatenate([1 - rel[:, [1, 0, 2, 4, 3]], rel[:, 5:][:, [1, 0, 2, 4, 3]]], axis=1)
    np.testing.assert_allclose(B.mirror_average(rel, consistent), rel, atol=1e-12)
    np.testing.assert_allclose(np.asarray(jax.jit(B.mirror_average)(rel, seen)), got, atol=1e-6)


# ---- numpy and jax agree ------------------------------------------------------------------------


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_numpy_and_jax_agree(seed):
    rng = np.random.default_rng(seed)
    xy = rng.integers(-20, 60, (5, 2)).astype(float)
    boxes = np.concatenate([xy, xy + rng.integers(0, 40, (5, 2))], 1)
    reg = rng.uniform(-0.3, 0.3, (5, 4))
    rel = rng.uniform(0, 1, (5, 10))
    j = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-4)
    for mode in ("union", "min"):
        got = B.iou_matrix(j(boxes), j(boxes[::-1]), mode)
        close(np.asarray(got), B.iou_matrix(boxes, boxes[::-1], mode))
    for plus_one in (False, True):
        close(np.asarray(B.regress(j(boxes), j(reg), plus_one)), B.regress(boxes, reg, plus_one))
    close(np.asarray(B.square(j(boxes))), B.square(boxes))
    close(np.asarray(B.landmarks_from_relative(j(boxes), j(rel))), B.landmarks_from_relative(boxes, rel))
    close(np.asarray(B.fix(j(reg * 10))), B.fix((reg * 10).astype(np.float32)))
    assert isinstance(B.square(boxes), np.ndarray) and isinstance(B.square(j(boxes)), jax.Array)
