"""Training-time augmentation of sample batches (numpy, on the host): left-right flips with their targets
(the paper's training data is mirrored too), and the colour jitter and blur that help a net trained on few
images. Every random draw of step s is seeded by (seed, s), so a batch is a pure function of them.
"""

from __future__ import annotations

import numpy as np

from mtcnn_jax import stages
from mtcnn_jax.sample_geometry import flip_targets
from mtcnn_jax.train_config import TrainConfig

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as PIL's convert("L")


def flip_batch(batch: dict[str, np.ndarray], flip_B: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Mirror the selected samples (all when `flip_B` is None) left-right, targets included (numpy, on host).

    Image columns reverse; box offsets (dx1, dy1, dx2, dy2) become (-dx2, dy1, -dx1, dy2) (offsets are
    relative to the crop edges, so the mirrored left edge is minus the old right offset); landmark x
    (crop-relative, 0..1) becomes 1 - x and the left/right eyes and mouth corners swap. Other keys are
    kept, except a "flipped" key, which is toggled on the flipped samples.
    """
    size = len(batch["image"])
    flip_B = np.ones(size, bool) if flip_B is None else np.asarray(flip_B, bool)
    box_Bx4 = np.asarray(batch["box"], np.float32)
    landmarks_Bx10 = np.asarray(batch["landmarks"], np.float32)
    mirrored_box, mirrored_landmarks = flip_targets(box_Bx4, landmarks_Bx10)
    out = dict(batch)
    out["image"] = np.where(flip_B[:, None, None, None], np.asarray(batch["image"])[:, :, ::-1], batch["image"])
    out["box"] = np.where(flip_B[:, None], mirrored_box, box_Bx4)
    out["landmarks"] = np.where(flip_B[:, None], mirrored_landmarks, landmarks_Bx10)
    if "flipped" in batch:
        out["flipped"] = np.asarray(batch["flipped"], bool) ^ flip_B
    return out


def jitter_colors(images_BxSxSx3: np.ndarray, factors_Bx3: np.ndarray) -> np.ndarray:
    """Scale each image's brightness, then contrast (about its mean grey), then saturation (about its per-pixel
    grey) by the sample's three factors; uint8 in and out (rounded, clipped). Factors of 1 change nothing."""
    x = np.asarray(images_BxSxSx3, np.float32)
    brightness, contrast, saturation = (np.asarray(factors_Bx3, np.float32)[:, k, None, None, None] for k in range(3))
    x = np.clip(x * brightness, 0, 255)
    mean_grey = (x @ GREY_WEIGHTS).mean(axis=(1, 2))[:, None, None, None]
    x = np.clip(mean_grey + (x - mean_grey) * contrast, 0, 255)
    grey = (x @ GREY_WEIGHTS)[..., None]
    return np.clip(np.round(grey + (x - grey) * saturation), 0, 255).astype(np.uint8)


def blur_kernels(sigmas_B: np.ndarray, size: int) -> np.ndarray:
    """(B, size, size) Gaussian kernels as matrices, each row renormalised inside the crop so borders keep
    their brightness: K @ image @ K.T blurs an image by its sigma; a sigma of 0 gives the identity."""
    offsets_SxS = np.arange(size)[:, None] - np.arange(size)[None, :]
    sigmas = np.maximum(np.asarray(sigmas_B, np.float64), 1e-6)[:, None, None]
    k_BxSxS = np.exp(-0.5 * (offsets_SxS / sigmas) ** 2)
    return (k_BxSxS / k_BxSxS.sum(-1, keepdims=True)).astype(np.float32)


def blur_images(images_BxSxSx3: np.ndarray, sigmas_B: np.ndarray) -> np.ndarray:
    """Each image blurred by its own Gaussian sigma (separable: rows, then columns); uint8 in and out.
    Heavily blurred faces are the ones a net trained on few images misses most (WIDER's blur attribute)."""
    k_Bx1xSxS = blur_kernels(sigmas_B, images_BxSxSx3.shape[1])[:, None]
    x_Bx3xSxS = np.asarray(images_BxSxSx3, np.float32).transpose(0, 3, 1, 2)
    x_Bx3xSxS = k_Bx1xSxS @ x_Bx3xSxS @ k_Bx1xSxS.transpose(0, 1, 3, 2)
    return np.clip(np.round(x_Bx3xSxS), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def augment(batch: dict[str, np.ndarray], config: TrainConfig, step: int) -> dict[str, np.ndarray]:
    """The batch of step `step` flipped (positives and landmark samples, each with `config.flip_probability`),
    colour-jittered and blurred when the config asks for it; draws seeded by (config.seed, step)."""
    coin_B = np.random.default_rng([config.seed, step, 1]).random(config.batch_size) < config.flip_probability
    flippable_B = (batch["label"] == stages.POSITIVE) | (batch["label"] == stages.LANDMARK)
    batch = flip_batch(batch, coin_B & flippable_B)
    if config.color_jitter > 0:
        j = config.color_jitter
        factors_Bx3 = np.random.default_rng([config.seed, step, 2]).uniform(1 - j, 1 + j, (config.batch_size, 3))
        batch["image"] = jitter_colors(batch["image"], factors_Bx3)
    if config.blur_probability > 0:
        rng = np.random.default_rng([config.seed, step, 3])
        blurred_B = rng.random(config.batch_size) < config.blur_probability
        sigmas_B = rng.uniform(0, config.blur_sigma, config.batch_size)
        batch["image"][blurred_B] = blur_images(batch["image"][blurred_B], sigmas_B[blurred_B])
    return batch
