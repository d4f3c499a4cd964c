"""The MTCNN multi-task loss (Zhang et al. 2016, eq. 1-5) as pure functions, one per task.

Labels select the tasks of a sample: positives (1) and negatives (0) train face classification,
positives and part faces (-1) train box regression, landmark samples (-2) train the 5 landmarks.
Any other label (the trainer pads evaluation batches with -3) takes part in no task.

Every term is the mean over the samples of its task, so a batch without samples of a task gives a
zero loss and a zero gradient for it. With `axis_name` (inside `pmap`/`shard_map` over a batch split
across devices) each device divides its own sum by the device-mean of the task's count: the
`pmean` of the per-device losses (and of their gradients) is then exactly the loss (and gradient)
of the whole global batch, whatever the split of labels over devices.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from mtcnn_jax.stages import LANDMARK, NEGATIVE, PART, POSITIVE


class LossWeights(NamedTuple):
    """Weights of the detection, box and landmark terms (the paper's alpha_det for the cls term, alpha_box, alpha_landmark)."""

    cls: float
    box: float
    landmark: float


STAGE_WEIGHTS = {
    "pnet": LossWeights(1.0, 0.5, 0.5),
    "rnet": LossWeights(1.0, 0.5, 0.5),
    "onet": LossWeights(1.0, 0.5, 1.0),
}


def task_masks(labels_B: jax.Array) -> dict[str, jax.Array]:
    """Boolean (B,) masks of the samples that train each task: "cls", "box" and "landmark"."""
    labels_B = jnp.asarray(labels_B)
    return {
        "cls": (labels_B == POSITIVE) | (labels_B == NEGATIVE),
        "box": (labels_B == POSITIVE) | (labels_B == PART),
        "landmark": labels_B == LANDMARK,
    }


def _count(mask_B: jax.Array, axis_name: str | None) -> jax.Array:
    """Samples in the mask; under `axis_name` the mean count per device (so pmean of sums/count is global)."""
    count = jnp.sum(mask_B.astype(jnp.float32))
    return count if axis_name is None else jax.lax.pmean(count, axis_name)


def masked_mean(values_B: jax.Array, mask_B: jax.Array, axis_name: str | None = None) -> jax.Array:
    """Mean of `values_B` over the masked samples; 0 (with zero gradient) when none are masked."""
    count = _count(mask_B, axis_name)
    total = jnp.sum(jnp.where(mask_B, values_B, 0.0))
    return total / jnp.where(count > 0, count, 1.0)


def per_sample_cross_entropy(logits_Bx2: jax.Array, labels_B: jax.Array) -> jax.Array:
    """Softmax cross-entropy of each sample against face (1) / non-face (0); meaningless for other labels."""
    targets_B = jnp.clip(jnp.asarray(labels_B), 0, 1).astype(jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits_Bx2.astype(jnp.float32), targets_B)


def per_sample_l2(pred_BxK: jax.Array, target_BxK: jax.Array) -> jax.Array:
    """Squared Euclidean distance of each sample's K values to its target: the paper's eq. 2 and 3.

    A sum over the K values, as in the paper and the public training pipeline, not a mean: a mean would
    scale the box term down by 4 and the landmark term by 10 against the paper's weights.
    """
    return jnp.sum(jnp.square(pred_BxK.astype(jnp.float32) - target_BxK), axis=-1)


def per_sample_l1(pred_BxK: jax.Array, target_BxK: jax.Array) -> jax.Array:
    """Absolute distance of each sample's K values to its target, summed over the K values. An option for
    the landmark term (not the paper's): L2 lets small errors fade from the gradient, which costs the mean
    point error that landmark precision is measured by (Feng et al., "Wing loss", CVPR 2018)."""
    return jnp.sum(jnp.abs(pred_BxK.astype(jnp.float32) - target_BxK), axis=-1)


LANDMARK_NORMS = {"l2": per_sample_l2, "l1": per_sample_l1}  # "l2": the paper's eq. 3


def per_sample_point_error(landmarks_Bx10: jax.Array, target_Bx10: jax.Array) -> jax.Array:
    """Mean Euclidean distance of the 5 points to their targets, in crop widths (x1..x5, y1..y5 layout):
    what landmark precision is measured by, whichever norm is trained."""
    d_Bx10 = landmarks_Bx10.astype(jnp.float32) - target_Bx10
    return jnp.mean(jnp.sqrt(jnp.square(d_Bx10[:, :5]) + jnp.square(d_Bx10[:, 5:])), axis=-1)


def _only_masked(target_BxK: jax.Array, mask_B: jax.Array) -> jax.Array:
    """Targets of the masked samples, zeros elsewhere: a NaN "no target" elsewhere then cannot reach the gradient."""
    return jnp.where(mask_B[:, None], jnp.asarray(target_BxK, jnp.float32), 0.0)


def classification_loss(
    logits_Bx2: jax.Array, labels_B: jax.Array, mask_B: jax.Array | None = None, axis_name: str | None = None
) -> jax.Array:
    """Cross-entropy averaged over positives and negatives (or over `mask_B`, e.g. the OHEM-kept ones)."""
    mask_B = task_masks(labels_B)["cls"] if mask_B is None else mask_B
    return masked_mean(per_sample_cross_entropy(logits_Bx2, labels_B), mask_B, axis_name)


def box_loss(
    box_Bx4: jax.Array, target_Bx4: jax.Array, labels_B: jax.Array, axis_name: str | None = None
) -> jax.Array:
    """Squared distance of the 4 box offsets to their targets, averaged over positives and part faces."""
    mask_B = task_masks(labels_B)["box"]
    return masked_mean(per_sample_l2(box_Bx4, _only_masked(target_Bx4, mask_B)), mask_B, axis_name)


def _landmark_mean(per_sample, landmarks_Bx10, target_Bx10, labels_B, axis_name) -> jax.Array:
    """`per_sample(landmarks, targets)` averaged over the landmark samples."""
    mask_B = task_masks(labels_B)["landmark"]
    return masked_mean(per_sample(landmarks_Bx10, _only_masked(target_Bx10, mask_B)), mask_B, axis_name)


def landmark_loss(
    landmarks_Bx10: jax.Array, target_Bx10: jax.Array, labels_B: jax.Array, axis_name: str | None = None,
    norm: str = "l2",
) -> jax.Array:
    """Distance of the 10 landmark coordinates to their targets (`LANDMARK_NORMS[norm]`: squared by
    default, as the paper), averaged over the landmark samples."""
    return _landmark_mean(LANDMARK_NORMS[norm], landmarks_Bx10, target_Bx10, labels_B, axis_name)


def landmark_point_error(
    landmarks_Bx10: jax.Array, target_Bx10: jax.Array, labels_B: jax.Array, axis_name: str | None = None
) -> jax.Array:
    """`per_sample_point_error` averaged over the landmark samples, a metric (no gradient)."""
    landmarks_Bx10 = jax.lax.stop_gradient(landmarks_Bx10)
    return _landmark_mean(per_sample_point_error, landmarks_Bx10, target_Bx10, labels_B, axis_name)


def ohem_k(batch_size: int, ratio: float) -> int:
    """k = ceil(ratio * batch_size), from the static batch size (rounded to 6 decimals first, so 0.7 * 10 is 7)."""
    return min(batch_size, max(1, math.ceil(round(ratio * batch_size, 6))))


def ohem_mask(per_sample_loss_B: jax.Array, valid_B: jax.Array, ratio: float = 0.7) -> jax.Array:
    """Online hard sample mining: keep the ceil(ratio * n) largest losses among the n valid
    (class-labelled) samples, as the paper's "top 70 %" of a mini-batch's classification losses.

    `lax.top_k` ranks with the static k = `ohem_k(B, ratio)` (an upper bound, since n <= B); the first
    ceil(ratio * n) ranks are kept. Ties go to the lower index. The selection carries no gradient.
    """
    scores_B = jnp.where(valid_B, jax.lax.stop_gradient(per_sample_loss_B), -jnp.inf)
    k = ohem_k(scores_B.shape[0], ratio)
    _, top_k = jax.lax.top_k(scores_B, k)
    n_keep = jnp.ceil(jnp.round(ratio * jnp.sum(valid_B), 6)).astype(jnp.int32)
    keep_B = jnp.zeros(scores_B.shape, bool).at[top_k].set(jnp.arange(k) < n_keep)
    return jax.lax.stop_gradient(keep_B & valid_B)


def _ohem_mask_global(loss_B: jax.Array, valid_B: jax.Array, ratio: float, axis_name: str | None) -> jax.Array:
    """`ohem_mask` over the global batch (all devices of `axis_name`), returning this device's slice."""
    if axis_name is None:
        return ohem_mask(loss_B, valid_B, ratio)
    loss_DxB = jax.lax.all_gather(jax.lax.stop_gradient(loss_B), axis_name)
    valid_DxB = jax.lax.all_gather(valid_B, axis_name)
    keep_DxB = ohem_mask(loss_DxB.reshape(-1), valid_DxB.reshape(-1), ratio).reshape(valid_DxB.shape)
    return keep_DxB[jax.lax.axis_index(axis_name)]


def _flat(x: jax.Array, batch: int) -> jax.Array:
    """(B, 1, 1, C) P-Net maps (or any (B, ..., C)) to (B, C)."""
    return x.reshape(batch, -1)


def multitask_loss(
    outputs: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    weights: LossWeights,
    ohem_ratio: float = 0.7,
    axis_name: str | None = None,
    landmark_norm: str = "l2",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the three task losses, with OHEM on classification, and its metrics.

    `outputs`: the net's {"logits", "box", ["landmarks"]} (P-Net maps are flattened); `batch`:
    {"label" (B,), "box" (B, 4), "landmarks" (B, 10)}. A net without a landmark head gets a zero
    landmark term. Metrics hold each term raw and weighted, "loss", "accuracy" and "recall" (of the
    face class) over the class-labelled samples, "kept_fraction" (OHEM-kept / class-labelled) and, with
    landmarks, "landmark_point_error" (`per_sample_point_error`'s mean, comparable across norms).
    """
    labels_B = jnp.asarray(batch["label"])
    size = labels_B.shape[0]
    masks = task_masks(labels_B)
    logits_Bx2 = _flat(outputs["logits"], size)
    ce_B = per_sample_cross_entropy(logits_Bx2, labels_B)
    keep_B = _ohem_mask_global(ce_B, masks["cls"], ohem_ratio, axis_name)
    terms = {
        "cls": masked_mean(ce_B, keep_B, axis_name),
        "box": box_loss(_flat(outputs["box"], size), batch["box"], labels_B, axis_name),
        "landmark": jnp.zeros((), jnp.float32),
    }
    metrics = {}
    if "landmarks" in outputs:
        landmarks_Bx10 = _flat(outputs["landmarks"], size)
        terms["landmark"] = landmark_loss(landmarks_Bx10, batch["landmarks"], labels_B, axis_name, landmark_norm)
        metrics["landmark_point_error"] = landmark_point_error(landmarks_Bx10, batch["landmarks"], labels_B, axis_name)
    weighted = {"cls": weights.cls * terms["cls"], "box": weights.box * terms["box"]}
    weighted["landmark"] = weights.landmark * terms["landmark"]
    total = weighted["cls"] + weighted["box"] + weighted["landmark"]
    metrics |= {"loss": total, **terms, **{f"{k}_weighted": v for k, v in weighted.items()}}
    metrics.update(_classification_metrics(logits_Bx2, labels_B, masks["cls"], keep_B, axis_name))
    return total, metrics


def _classification_metrics(
    logits_Bx2: jax.Array, labels_B: jax.Array, cls_B: jax.Array, keep_B: jax.Array, axis_name: str | None
) -> dict[str, jax.Array]:
    """Accuracy and face recall over the class-labelled samples, and the OHEM-kept fraction of them."""
    logits_Bx2 = jax.lax.stop_gradient(logits_Bx2)
    predicted_face_B = logits_Bx2[:, 1] > logits_Bx2[:, 0]
    correct_B = predicted_face_B == (labels_B == POSITIVE)
    positive_B = labels_B == POSITIVE
    return {
        "accuracy": masked_mean(correct_B.astype(jnp.float32), cls_B, axis_name),
        "recall": masked_mean(predicted_face_B.astype(jnp.float32), positive_B, axis_name),
        "kept_fraction": masked_mean(keep_B.astype(jnp.float32), cls_B, axis_name),
    }
