"""R-Net / O-Net crops against a slow, obviously correct reference: pad.m's zero-padded crop resized as
imResample (area average when shrinking, bilinear with half-pixel centres when enlarging), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcnn_jax import crops


def axis_weights(start: float, length: float, out: int, first: int, end: int) -> np.ndarray:
    """(out, end - first) weights of output samples over source pixels first..end-1 of one axis, looping
    over pixels: the overlap of pixel [j, j + 1) with the sample's footprint over its length when
    shrinking, the two pixels around the sample's centre (clamped into the interval) when enlarging."""
    weights, ratio = np.zeros((out, end - first)), length / out
    for k in range(out):
        if ratio >= 1:
            lo, hi = start + k * ratio, start + (k + 1) * ratio
            for j in range(int(np.floor(lo)), int(np.ceil(hi))):
                weights[k, j - first] += max(0.0, min(hi, j + 1) - max(lo, j)) / ratio
        else:
            centre = min(max(start + (k + 0.5) * ratio - 0.5, start), start + length - 1)
            j = int(np.floor(centre))
            weights[k, j - first] += 1 - (centre - j)
            weights[k, j + 1 - first] += centre - j
    return weights


def reference_crop(image: np.ndarray, box, out: int) -> np.ndarray:
    """The 1-based box [x1, y1, x2, y2] of the image, zero outside it (pad.m), resized to out x out."""
    x1, y1, x2, y2 = (float(v) for v in box)
    y0, y_end, x0, x_end = int(np.floor(y1)) - 2, int(np.ceil(y2)) + 2, int(np.floor(x1)) - 2, int(np.ceil(x2)) + 2
    region = np.zeros((y_end - y0, x_end - x0, 3))  # pixels y0..y_end-1 (0-based), zero outside the image
    h, w = image.shape[:2]
    ya, yb, xa, xb = max(y0, 0), min(y_end, h), max(x0, 0), min(x_end, w)
    if ya < yb and xa < xb:
        region[ya - y0 : yb - y0, xa - x0 : xb - x0] = image[ya:yb, xa:xb]
    rows = axis_weights(y1 - 1, y2 - y1 + 1, out, y0, y_end)
    cols = axis_weights(x1 - 1, x2 - x1 + 1, out, x0, x_end)
    return np.einsum("yi,ijc,xj->yxc", rows, region, cols, optimize=True)


def random_boxes(rng, h: int, w: int, n: int, integer: bool = True) -> np.ndarray:
    """Square-ish boxes of every size from 1 pixel to 3 times the image, many partly or wholly outside."""
    sides = rng.choice([1, 2, 5, 11, 12, 23, 24, 25, 47, 48, 49, 50, 97, 130, 3 * max(h, w)], n)
    x1 = rng.integers(-sides - 2, w + 2)
    y1 = rng.integers(-sides - 2, h + 2)
    boxes = np.stack([x1, y1, x1 + sides - 1 + rng.integers(0, 3, n), y1 + sides - 1], -1).astype(np.float64)
    if not integer:
        boxes += rng.uniform(-0.5, 0.5, boxes.shape)
    return boxes.astype(np.float32)


def jitted(image, hw, boxes, out):
    fn = jax.jit(lambda im, s, b: crops.crop_patches(crops.crop_sources(im, s), b, out))
    return np.asarray(fn(jnp.asarray(image), jnp.asarray(hw), jnp.asarray(boxes)))


@pytest.mark.parametrize("out", [24, 48])
def test_crops_of_8_bit_images_equal_the_reference(out):
    rng = np.random.default_rng(out)
    image = rng.integers(0, 256, (61, 83, 3), dtype=np.uint8)
    boxes = random_boxes(rng, 61, 83, 120)
    expected = np.stack([reference_crop(image.astype(np.float64), b, out) for b in boxes])
    readable = crops.crop_patches(crops.crop_sources(image, np.array([61, 83])), boxes, out)
    assert isinstance(readable, np.ndarray) and readable.shape == (120, out, out, 3)
    np.testing.assert_allclose(readable, expected, atol=0.01)
    np.testing.assert_allclose(jitted(image, np.array([61, 83]), boxes, out), expected, atol=0.01)


def test_sub_pixel_boxes_of_float_images_equal_the_reference():
    """Non-integer pixels go through the residual table; fractional box edges are area-weighted."""
    rng = np.random.default_rng(7)
    image = rng.uniform(0, 255, (50, 40, 3)).astype(np.float32)
    boxes = random_boxes(rng, 50, 40, 80, integer=False)
    expected = np.stack([reference_crop(image.astype(np.float64), b, 48) for b in boxes])
    np.testing.assert_allclose(crops.crop_patches(crops.crop_sources(image, np.array([50, 40])), boxes, 48),
                               expected, atol=0.01)
    np.testing.assert_allclose(jitted(image, np.array([50, 40]), boxes, 48), expected, atol=0.01)


def test_pixels_past_the_real_size_are_zero():
    """A bucket's padding (or anything past the real h x w) never reaches a crop."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    padded = np.full((64, 64, 3), 200, np.uint8)
    padded[:40, :50] = image
    boxes = random_boxes(rng, 40, 50, 40)
    expected = np.stack([reference_crop(image.astype(np.float64), b, 24) for b in boxes])
    np.testing.assert_allclose(jitted(padded, np.array([40, 50]), boxes, 24), expected, atol=0.01)


def test_crop_patches_reads_the_original_pixels_and_zeros_outside():
    """A fixed 1-based box crops exactly pixels x1-1..x2-1 (pad.m), zero where it leaves the image; a box
    twice the output is the mean of each 2 x 2 block."""
    image = np.random.default_rng(2).integers(0, 256, (60, 50, 3)).astype(np.uint8)
    src = crops.crop_sources(image, np.array([60, 50]))
    inside = crops.crop_patches(src, np.array([[11.0, 21.0, 34.0, 44.0]]), 24)[0]  # 24 x 24 pixels
    np.testing.assert_array_equal(inside, image[20:44, 10:34])
    corner = crops.crop_patches(src, np.array([[-11.0, -11.0, 12.0, 12.0]]), 24)[0]  # 12 px outside
    np.testing.assert_array_equal(corner[:12], 0.0)
    np.testing.assert_array_equal(corner[12:, 12:], image[:12, :12])
    half = crops.crop_patches(src, np.array([[3.0, 5.0, 50.0, 52.0]]), 24)[0]
    np.testing.assert_allclose(half, image[4:52, 2:50].reshape(24, 2, 24, 2, 3).mean(axis=(1, 3)), atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_tables_grown_to_a_larger_size_give_the_same_crops(dtype):
    """Sources whose tables cover a larger size (`table_hw`, as the cascade's table slots) crop exactly what
    the image's own tables crop, boxes past every edge included; a size smaller than the array is refused."""
    rng = np.random.default_rng(5)
    image = (rng.integers(0, 256, (40, 56, 3)) + (0.25 if dtype == np.float32 else 0)).astype(dtype)
    hw = np.array([33, 50])  # real pixels; the rest of the array is padding
    boxes = np.array([[1, 1, 56, 40], [-20, -9, 30, 25], [40, 20, 75, 61], [45, 30, 47.5, 31.5]], np.float32)
    own, grown = crops.crop_sources(image, hw), crops.crop_sources(image, hw, (64, 128))
    assert grown.hw == (64, 128) and (grown.residual is None) == (dtype == np.uint8)
    for out in (24, 48):
        np.testing.assert_array_equal(crops.crop_patches(grown, boxes, out), crops.crop_patches(own, boxes, out))
    jitted = jax.jit(lambda im, b, t: crops.crop_patches(crops.crop_sources(im, hw, t), b, 24), static_argnums=2)
    np.testing.assert_array_equal(jitted(image, boxes, (64, 128)), jitted(image, boxes, None))
    with pytest.raises(ValueError, match="smaller than the image"):
        crops.crop_sources(image, hw, (32, 128))


def test_box_sums_of_a_large_bright_image_stay_exact():
    """The uint32 table wraps past 2^32 on a 4096 x 4096 white image, yet every box sum is exact."""
    image = np.full((4096, 4096, 3), 255, np.uint8)
    image[-7:, -9:] = 3  # inside the last crop pixel of the whole image's box
    src = crops.crop_sources(image, np.array([4096, 4096]))
    whole = crops.crop_patches(src, np.array([[1, 1, 4096, 4096]], np.float32), 48)[0]
    expected = np.full((48, 48, 3), 255.0)
    expected[-1, -1] = 255 - 252 * 63 / (4096 / 48) ** 2
    np.testing.assert_allclose(whole, expected, atol=0.01)
    boxes = np.array([[4088, 4090, 4096, 4096], [4000, 4000, 4095, 4095], [4090, 4090, 4100, 4100]], np.float32)
    expected = np.stack([reference_crop(image[-120:, -120:], b - 3976, 48) for b in boxes])
    np.testing.assert_allclose(crops.crop_patches(src, boxes, 48), expected, atol=0.01)
