"""The training input pipeline: flips, colour jitter and blur, the order of the samples, streamed and
in-memory batches (the same, bit for bit), and the background prefetch."""

import dataclasses
import threading

import numpy as np
import pytest

from mtcnn_jax import augment, input_pipeline, sample_geometry, train
from test_train import BASE, synthetic_samples

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(70, 12)


class CountingSource:
    """A list of samples that counts the records read (one batched read per `__getitems__`)."""

    def __init__(self, samples):
        self.samples, self.reads = samples, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        self.reads += 1
        return self.samples[i]

    def __getitems__(self, indices):
        self.reads += len(indices)
        return [self.samples[i] for i in indices]


# ------------------------------------------------------------------------------------------- augmentation


def test_flip_batch_mirrors_image_box_and_landmarks():
    image = np.zeros((1, 12, 12, 3), np.uint8)
    image[0, 4, 3] = 255  # a pixel at the left eye: x = 0.3 * 12 = 3.6 -> column 3, y = 0.4 * 12 -> row 4
    landmarks = np.array([[0.3, 0.7, 0.5, 0.35, 0.65, 0.4, 0.45, 0.6, 0.8, 0.85]], np.float32)
    batch = {"image": image, "label": np.array([1]), "box": np.array([[0.1, -0.2, -0.3, 0.05]], np.float32),
             "landmarks": landmarks, "flipped": np.array([False])}
    flipped = augment.flip_batch(batch)
    np.testing.assert_array_equal(flipped["image"][0, 4, 8], [255, 255, 255])  # column 11 - 3 = 8
    np.testing.assert_allclose(flipped["box"], [[0.3, -0.2, -0.1, 0.05]])  # (dx1, dx2) -> (-dx2, -dx1)
    # x -> 1 - x, then left/right eyes and mouth corners swap (y values move with their points).
    np.testing.assert_allclose(flipped["landmarks"], [[0.3, 0.7, 0.5, 0.35, 0.65, 0.45, 0.4, 0.6, 0.85, 0.8]],
                               atol=1e-6)
    # The flipped right eye (index 1) sits on the mirrored pixel: x = 0.7 * 12 = 8.4 -> column 8, y row 4.
    assert int(flipped["landmarks"][0, 1] * 12) == 8 and int(flipped["landmarks"][0, 6] * 12) == 4
    assert flipped["flipped"][0]
    twice = augment.flip_batch(flipped)
    for key in ("image", "box", "landmarks"):
        np.testing.assert_allclose(twice[key], batch[key], atol=1e-6)


def test_flip_batch_only_touches_selected_samples(samples):
    batch = input_pipeline.gather(samples, [0, 1])
    out = augment.flip_batch(batch, np.array([False, True]))
    np.testing.assert_array_equal(out["image"][0], batch["image"][0])
    np.testing.assert_array_equal(out["image"][1], batch["image"][1][:, ::-1])
    np.testing.assert_array_equal(out["box"][0], batch["box"][0])


def test_jitter_colors_against_hand_computed_values():
    images = np.array([[[[100, 50, 20], [200, 100, 40]]]], np.uint8)  # one 1x2 image
    np.testing.assert_array_equal(augment.jitter_colors(images, np.ones((1, 3))), images)  # factors of 1: unchanged
    # Brightness 1.2: (120, 60, 24), (240, 120, 48); greys 73.836 and 147.672, mean 110.754. Contrast 0.5
    # halves each pixel's distance to 110.754, so the greys become 92.295 and 129.213; saturation 0 leaves
    # the greys.
    out = augment.jitter_colors(images, np.array([[1.2, 0.5, 0.0]]))
    np.testing.assert_array_equal(out, [[[[92, 92, 92], [129, 129, 129]]]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(augment.jitter_colors(images, np.array([[2.0, 1, 1]])), [[[[200, 100, 40], [255, 200, 80]]]])


def _images_changed(samples, **augmentation) -> np.ndarray:
    """Which images of a batch an augmentation changes (B,), after checking that it is reproducible for one
    (seed, step) and leaves every other field of the batch as it was."""
    data, idx = input_pipeline.InMemorySamples(input_pipeline.load_arrays(samples, BASE)), np.arange(len(samples))
    augmented = dataclasses.replace(BASE, **augmentation)
    plain, a, b = (input_pipeline.training_batch(data, idx, c, 3) for c in (BASE, augmented, augmented))
    for key in plain:
        np.testing.assert_array_equal(a[key], b[key])
        if key != "image":
            np.testing.assert_array_equal(a[key], plain[key])
    return np.abs(a["image"].astype(int) - plain["image"]).max(axis=(1, 2, 3)) > 0


def test_color_jitter_changes_only_images_and_is_reproducible(samples):
    changed = _images_changed(samples, color_jitter=0.4)
    assert changed.mean() > 0.9  # factors drawn per sample from [0.6, 1.4]: almost never all ~1
    with pytest.raises(ValueError, match="--color-jitter 1.5"):
        train.train(dataclasses.replace(BASE, color_jitter=1.5), samples, "unused")


def test_blur_images_against_hand_computed_values():
    images = np.zeros((3, 9, 9, 3), np.uint8)
    images[:2, 4, 4] = 255  # an impulse in the middle
    images[2] = 77  # flat grey
    out = augment.blur_images(images, np.array([0.0, 1.0, 1.4]))
    np.testing.assert_array_equal(out[0], images[0])  # sigma 0: unchanged
    # sigma 1: output row r weighs input row i by exp(-(r - i)^2 / 2), normalised over the crop's 9 rows
    # (so rows near the border lean inwards); the impulse at (4, 4) becomes 255 * k[r, 4] * k[c, 4].
    k = np.exp(-0.5 * (np.arange(9)[:, None] - np.arange(9)[None, :]) ** 2)
    k /= k.sum(1, keepdims=True)
    np.testing.assert_allclose(out[1][..., 0], 255 * np.outer(k[:, 4], k[:, 4]), atol=0.501)  # rounded to uint8
    assert out[1][4, 4, 0] == 41 and out[1][3, 4, 0] == 25  # 255 * 0.3990^2, 255 * 0.3990 * 0.2420
    np.testing.assert_array_equal(out[2], images[2])  # rows renormalised at the borders: flat stays flat


def test_blur_changes_only_the_chosen_images_and_is_reproducible(samples):
    changed = _images_changed(samples, blur_probability=0.5, blur_sigma=2.0)
    chosen = np.random.default_rng([BASE.seed, 3, 3]).random(BASE.batch_size) < 0.5  # training_batch's draw
    assert 0 < chosen.sum() < BASE.batch_size and not changed[~chosen].any()
    assert changed[chosen].mean() > 0.8  # only a sigma near 0 can leave a crop as it was
    with pytest.raises(ValueError, match="--blur-probability 1.5"):
        train.train(dataclasses.replace(BASE, blur_probability=1.5), samples, "unused")


def test_training_batches_are_a_function_of_seed_and_step(samples):
    train_idx, val_idx = input_pipeline.split_indices(len(samples), 0.1)
    assert len(val_idx) == 7 and not set(train_idx) & set(val_idx) and len(train_idx) + 7 == len(samples)
    data = input_pipeline.InMemorySamples(input_pipeline.load_arrays(samples, BASE))
    a, b = (input_pipeline.training_batch(data, train_idx, BASE, 5) for _ in range(2))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    epoch = np.concatenate([input_pipeline.step_indices(train_idx, 0, s, 9) for s in range(7)])  # 63 = one epoch
    assert sorted(epoch) == sorted(train_idx)


def test_flip_batch_agrees_with_the_sample_writer(samples):
    batch = input_pipeline.gather(samples, range(7))
    box, landmarks = sample_geometry.flip_targets(batch["box"], batch["landmarks"])
    flipped = augment.flip_batch(batch)
    np.testing.assert_allclose(flipped["box"], box, atol=1e-7)
    np.testing.assert_allclose(flipped["landmarks"], landmarks, atol=1e-7)


# ------------------------------------------------------------------------------------- streamed samples


def test_streamed_and_in_memory_batches_are_identical(samples):
    config = dataclasses.replace(BASE, color_jitter=0.3, blur_probability=0.5)
    streamed = input_pipeline.open_samples(samples, config)
    in_memory = input_pipeline.open_samples(samples, config, in_memory=True)
    assert isinstance(streamed, input_pipeline.StreamedSamples) and len(streamed) == len(in_memory) == 70
    train_idx, val_idx = input_pipeline.split_indices(len(samples), config.val_fraction)
    for step in (0, 4, 11):  # 11 crosses into the third epoch of 63 training samples
        a = input_pipeline.training_batch(streamed, train_idx, config, step)
        b = input_pipeline.training_batch(in_memory, train_idx, config, step)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])
    for a, b in zip(input_pipeline.eval_batches(streamed, val_idx, 5), input_pipeline.eval_batches(in_memory, val_idx, 5),
                    strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert (a["label"][2:] == input_pipeline.PAD_LABEL).all()  # 7 val samples: the second batch holds 2


def test_streaming_reads_only_the_batches_it_needs(samples):
    source = CountingSource(list(samples))
    streamed = input_pipeline.open_samples(source, BASE)
    assert source.reads == BASE.batch_size  # the first batch's worth, checked at start-up
    input_pipeline.training_batch(streamed, np.arange(len(source)), BASE, 2)
    assert source.reads == 2 * BASE.batch_size
    input_pipeline.open_samples(source, BASE, in_memory=True)
    assert source.reads == 2 * BASE.batch_size + len(source)


def test_streaming_checks_each_batch_it_reads(samples):
    bad = list(samples)
    bad[60] = {**bad[60], "label": 5}
    streamed = input_pipeline.open_samples(bad, BASE)  # sample 60 is not in the first batch's worth
    with pytest.raises(ValueError, match=r"samples \[60\]: labels \[5\] not in"):
        streamed.read(np.array([3, 60, 7]))
    bad[61] = {**bad[61], "image": np.zeros((5, 5, 3), np.uint8)}
    with pytest.raises(ValueError, match="sample 61: image of shape"):
        streamed.read(np.array([1, 61]))


def test_prefetch_keeps_order_and_raises_where_the_value_was():
    def fn(i):
        if i == 5:
            raise KeyError("five")
        return i * i

    with input_pipeline.Prefetch(fn, range(8), depth=2) as values:
        assert [next(values) for _ in range(5)] == [0, 1, 4, 9, 16]
        with pytest.raises(KeyError, match="five"):
            next(values)
    with input_pipeline.Prefetch(fn, range(3)) as values:
        assert list(values) == [0, 1, 4]


def test_prefetch_close_stops_the_thread_early():
    started = threading.Event()

    def fn(i):
        started.set()
        return i

    values = input_pipeline.Prefetch(fn, range(10**9), depth=3)
    assert next(values) == 0 and started.is_set()
    values.close()
    assert not values._thread.is_alive()
