"""The pyramid canvas: the packing of the levels, and the levels themselves against an independent resampler."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtcnn_jax import pyramid
from mtcnn_jax.cascade_config import CascadeConfig


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=14))
def test_packed_levels_are_apart_aligned_and_inside(bufs):
    places, (hc, wc) = pyramid.pack_levels(bufs)
    feet = [(h + pyramid.GAP + h % 2, w + pyramid.GAP + w % 2) for h, w in bufs]  # level, gap, even
    assert 12 <= wc <= max(12, max(w for _, w in feet)) and hc >= 12  # as wide as the widest level
    occupied = np.zeros((sum(h for h, _ in feet) + 2, max(w for _, w in feet)), np.int32)
    for (y, x), (h, w), (fh, fw) in zip(places, bufs, feet):
        assert y % 2 == 0 and x % 2 == 0  # P-Net's stride-2 cells line up with every level
        assert y + h <= hc and x + w <= wc
        occupied[y : y + fh, x : x + fw] += 1  # footprints (level + 2-pixel gap) never overlap
    assert occupied.max() == 1


def _block_mean(image, hw, block):
    """The 2^j mip another way: each block's mean over the real pixels only (padding as NaN, ignored)."""
    h, w = hw
    rows, cols = -(-h // block), -(-w // block)
    real = np.full((rows * block, cols * block, 3), np.nan)
    real[:h, :w] = image[:h, :w]
    return np.nanmean(real.reshape(rows, block, cols, block, 3), axis=(1, 3))


def _area_matrix(length, out_len):
    """(out_len, ceil(length)) weights of an exact area average of [0, length) into out_len samples."""
    ratio, src = length / out_len, np.arange(int(np.ceil(length)))
    lo = np.arange(out_len)[:, None] * ratio
    cover = np.clip(np.minimum(src + 1, lo + ratio) - np.maximum(src, lo), 0, None)
    return cover / cover.sum(1, keepdims=True)


@pytest.mark.parametrize("hw, bucket", [((101, 77), (128, 96)), ((250, 333), (256, 384))])
def test_levels_are_area_averages_of_the_real_pixels(hw, bucket):
    """Every level in the canvas equals, within float32, the area average of its mip (the block means of the
    real pixels), computed here with dense matrices; numpy and jax give the same canvas; zero elsewhere."""
    config = CascadeConfig()
    plan = pyramid.PyramidPlan.of(*bucket, config)
    rng = np.random.default_rng(0)
    image = np.zeros((*bucket, 3), np.float32)
    image[: hw[0], : hw[1]] = rng.integers(0, 256, (*hw, 3))
    scales = pyramid.pyramid_scales(*hw, config.min_face_size, config.scale_factor)
    level_hw = pyramid.level_sizes(*hw, list(plan.scales))
    canvas = pyramid.build_levels(image, np.array(hw), level_hw, plan)
    real = pyramid.level_masks(level_hw, plan)
    for k in range(len(scales)):
        block = 2 ** int(plan.mips[k])
        mip = _block_mean(image, hw, block)
        (lh, lw), (y, x) = level_hw[k], plan.places[k]
        want = np.einsum("ay,yxc,bx->abc", _area_matrix(hw[0] / block, lh), mip, _area_matrix(hw[1] / block, lw),
                         optimize=True)
        np.testing.assert_allclose(canvas[y : y + lh, x : x + lw], want, rtol=1e-4, atol=1e-2)
        assert real[y : y + lh, x : x + lw].all()
    assert not canvas[~real].any()
    build = jax.jit(lambda im, hw, lhw, taps: pyramid.build_levels(im, hw, lhw, plan, taps))
    jitted = build(image, jnp.asarray(hw), jnp.asarray(level_hw), pyramid.level_taps(np.array(hw), level_hw, plan))
    np.testing.assert_allclose(np.asarray(jitted), canvas, rtol=1e-5, atol=1e-3)


def test_image_plan_of_a_batch_gives_each_image_its_own_plan():
    """Repeated and distinct sizes in one batch, in any order (the plan is computed once per distinct size):
    each row equals the plan of that image alone, and the levels it uses are those its own size allows."""
    config, bucket = CascadeConfig(), (96, 128)
    sizes = np.array([[90, 120], [40, 64], [90, 120], [96, 128], [40, 64]], np.int32)
    whole = pyramid.image_plan(sizes, bucket, config)
    for i, size in enumerate(sizes):
        alone = pyramid.image_plan(size[None], bucket, config)
        for got, want in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(alone)):
            np.testing.assert_array_equal(got[i], want[0])
    used = [len(pyramid.pyramid_scales(h, w, config.min_face_size, config.scale_factor)) for h, w in sizes]
    np.testing.assert_array_equal(whole[1].sum(axis=1), used)
    assert used[1] < used[0] <= used[3]
