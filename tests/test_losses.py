"""The multi-task loss: each term against hand-computed values, OHEM selection and its gradient, device splits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcnn_jax import losses

pytestmark = pytest.mark.timeout(120)

LN3 = math.log(3.0)


def hand_batch():
    """Four samples, one of each label, with outputs whose losses are computed by hand:

    sample  label  logits       box pred / target -> squared distance             landmarks pred / target
    0       1      (0, ln 3)    (.1, .2, .3, .4) / 0 -> .01 + .04 + .09 + .16 = 0.3  ignored
    1       0      (0, ln 3)    (9, 9, 9, 9) / 0: ignored (negative)                 ignored
    2       -1     (5, -5) ign  (0, 0, 0, 0) / (1, -1, .5, 0) -> 1 + 1 + .25 = 2.25  ignored
    3       -2     (5, -5) ign  ignored                                              0 / 0.5 (x10) -> 10 * .25 = 2.5

    cls: p(face) = 3/4 for samples 0 and 1: CE0 = -ln(3/4) = ln(4/3), CE1 = -ln(1/4) = ln 4,
         mean = ln(16/3) / 2 = 0.83698.
    box: (0.3 + 2.25) / 2 = 1.275 (squared distances summed over the 4 values, paper eq. 2).  landmark: 2.5.
    accuracy: sample 0 right (face), sample 1 wrong (face) -> 0.5; recall 1 / 1 = 1.0.
    O-Net weights 1 / 0.5 / 1: total = 0.83698 + 0.6375 + 2.5 = 3.97448.
    """
    outputs = {
        "logits": jnp.array([[0.0, LN3], [0.0, LN3], [5.0, -5.0], [5.0, -5.0]]),
        "box": jnp.array([[0.1, 0.2, 0.3, 0.4], [9.0] * 4, [0.0] * 4, [7.0] * 4]),
        "landmarks": jnp.array([[3.0] * 10, [3.0] * 10, [3.0] * 10, [0.0] * 10]),
    }
    batch = {
        "label": jnp.array([1, 0, -1, -2]),
        "box": jnp.array([[0.0] * 4, [0.0] * 4, [1.0, -1.0, 0.5, 0.0], [0.0] * 4]),
        "landmarks": jnp.array([[0.0] * 10, [0.0] * 10, [0.0] * 10, [0.5] * 10]),
    }
    return outputs, batch


CLS, BOX, LANDMARK = math.log(16 / 3) / 2, 1.275, 2.5


def test_task_masks():
    masks = losses.task_masks(jnp.array([1, 0, -1, -2, -3]))
    np.testing.assert_array_equal(masks["cls"], [True, True, False, False, False])
    np.testing.assert_array_equal(masks["box"], [True, False, True, False, False])
    np.testing.assert_array_equal(masks["landmark"], [False, False, False, True, False])


def test_each_term_by_hand():
    outputs, batch = hand_batch()
    labels = batch["label"]
    assert float(losses.classification_loss(outputs["logits"], labels)) == pytest.approx(CLS, rel=1e-6)
    assert float(losses.box_loss(outputs["box"], batch["box"], labels)) == pytest.approx(BOX, rel=1e-6)
    got = losses.landmark_loss(outputs["landmarks"], batch["landmarks"], labels)
    assert float(got) == pytest.approx(LANDMARK, rel=1e-6)


def test_multitask_loss_by_hand():
    outputs, batch = hand_batch()
    total, metrics = losses.multitask_loss(outputs, batch, losses.STAGE_WEIGHTS["onet"], ohem_ratio=0.7)
    # k = ceil(0.7 * 4) = 3 >= 2 labelled samples: both kept, so OHEM changes nothing here.
    assert float(total) == pytest.approx(CLS + 0.5 * BOX + 1.0 * LANDMARK, rel=1e-6)
    expected = {"cls": CLS, "cls_weighted": CLS, "box": BOX, "box_weighted": 0.5 * BOX, "landmark": LANDMARK,
                "landmark_weighted": LANDMARK, "accuracy": 0.5, "recall": 1.0, "kept_fraction": 1.0}
    for name, value in expected.items():
        assert float(metrics[name]) == pytest.approx(value, rel=1e-6), name
    assert float(metrics["loss"]) == pytest.approx(float(total))


def test_l1_landmark_norm_and_the_point_error_by_hand():
    # sample 3: every coordinate 0.5 off: L1 10 * 0.5 = 5; each point (0.5, 0.5) off: sqrt(0.5) crop widths
    outputs, batch = hand_batch()
    got = losses.landmark_loss(outputs["landmarks"], batch["landmarks"], batch["label"], norm="l1")
    assert float(got) == pytest.approx(5.0, rel=1e-6)
    weights = losses.STAGE_WEIGHTS["onet"]
    total, metrics = losses.multitask_loss(outputs, batch, weights, landmark_norm="l1")
    assert float(total) == pytest.approx(CLS + 0.5 * BOX + 5.0, rel=1e-6)
    assert float(metrics["landmark_point_error"]) == pytest.approx(math.sqrt(0.5), rel=1e-6)
    _, l2_metrics = losses.multitask_loss(outputs, batch, weights)
    assert float(l2_metrics["landmark_point_error"]) == pytest.approx(math.sqrt(0.5), rel=1e-6)  # norm-free
    one_point_off = jnp.zeros((1, 10)).at[0, 2].set(0.3).at[0, 7].set(0.4)  # point 3: (0.3, 0.4), 0.5 away
    assert float(losses.per_sample_point_error(one_point_off, jnp.zeros((1, 10)))[0]) == pytest.approx(0.1)


def test_net_without_landmark_head_and_pnet_maps():
    outputs, batch = hand_batch()
    maps = {"logits": outputs["logits"][:, None, None, :], "box": outputs["box"][:, None, None, :]}
    total, metrics = losses.multitask_loss(maps, batch, losses.STAGE_WEIGHTS["pnet"])
    assert float(metrics["landmark"]) == 0.0
    assert float(total) == pytest.approx(CLS + 0.5 * BOX, rel=1e-6)


def test_empty_tasks_give_zero_loss_and_zero_gradient():
    logits = jnp.array([[1.0, -2.0], [0.5, 0.5]])
    labels = jnp.array([0, 0])  # negatives only: no box or landmark samples
    box = jnp.ones((2, 4))
    loss, grad = jax.value_and_grad(lambda b: losses.box_loss(b, jnp.zeros((2, 4)), labels))(box)
    assert float(loss) == 0.0 and np.all(np.asarray(grad) == 0.0)
    lm_loss, lm_grad = jax.value_and_grad(lambda p: losses.landmark_loss(p, jnp.zeros((2, 10)), labels))(
        jnp.ones((2, 10))
    )
    assert float(lm_loss) == 0.0 and np.all(np.asarray(lm_grad) == 0.0)
    none = jnp.array([-1, -2])  # no class labels at all
    cls, cls_grad = jax.value_and_grad(lambda l: losses.classification_loss(l, none))(logits)
    assert float(cls) == 0.0 and np.all(np.isfinite(cls_grad)) and np.all(np.asarray(cls_grad) == 0.0)


def test_nan_targets_outside_the_task_do_not_reach_the_gradient():
    labels = jnp.array([1, 0])  # the negative's box target is a NaN "no target"
    target = jnp.array([[0.0] * 4, [jnp.nan] * 4])
    loss, grad = jax.value_and_grad(lambda b: losses.box_loss(b, target, labels))(jnp.ones((2, 4)))
    assert float(loss) == 4.0 and np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[1] == 0.0)


def test_ohem_k_convention():
    assert losses.ohem_k(10, 0.7) == 7  # 0.7 * 10 is 7.000000000000001 in floats: not 8
    assert losses.ohem_k(384, 0.7) == 269
    assert losses.ohem_k(4, 0.7) == 3
    assert losses.ohem_k(5, 1.0) == 5


def test_ohem_keeps_top_70_percent_of_labelled_losses():
    loss_B = jnp.array([0.5, 9.0, 0.1, 3.0, 0.7, 2.0, 8.0, 0.2, 4.0, 5.0])
    valid_B = jnp.ones(10, bool)
    keep = np.asarray(losses.ohem_mask(loss_B, valid_B, 0.7))
    assert keep.sum() == 7
    np.testing.assert_array_equal(np.flatnonzero(keep), np.sort(np.argsort(-np.asarray(loss_B))[:7]))
    # Unlabelled samples are never kept, however large their loss: 8 labelled left, ceil(5.6) = 6 kept,
    # the 6 largest of them (losses 5, 4, 3, 2, 0.7, 0.5 at indices 9, 8, 3, 5, 4, 0).
    valid_B = valid_B.at[jnp.array([1, 6])].set(False)
    keep = np.asarray(losses.ohem_mask(loss_B, valid_B, 0.7))
    np.testing.assert_array_equal(np.flatnonzero(keep), [0, 3, 4, 5, 8, 9])
    # 5 labelled: ceil(3.5) = 4 kept, the largest 4 of the losses 0.5, 0.1, 0.7, 8.0, 4.0 (indices 0-8 even).
    valid_B = jnp.array([True, False, True, False, True, False, True, False, True, False])
    np.testing.assert_array_equal(np.flatnonzero(losses.ohem_mask(loss_B, valid_B, 0.7)), [0, 4, 6, 8])


def test_ohem_gradient_is_zero_for_dropped_samples():
    labels_B = jnp.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    logits_Bx2 = jax.random.normal(jax.random.key(0), (10, 2)) * 3.0
    batch = {"label": labels_B, "box": jnp.zeros((10, 4)), "landmarks": jnp.zeros((10, 10))}

    def cls_loss(logits):
        outputs = {"logits": logits, "box": jnp.zeros((10, 4))}
        return losses.multitask_loss(outputs, batch, losses.LossWeights(1.0, 0.0, 0.0), 0.7)[0]

    grad = np.asarray(jax.grad(cls_loss)(logits_Bx2))
    ce = np.asarray(losses.per_sample_cross_entropy(logits_Bx2, labels_B))
    kept = np.argsort(-ce)[:7]
    dropped = np.setdiff1d(np.arange(10), kept)
    assert np.all(grad[dropped] == 0.0)
    assert np.all(np.abs(grad[kept]).sum(axis=1) > 0)
    assert float(cls_loss(logits_Bx2)) == pytest.approx(float(ce[kept].mean()), rel=1e-6)


def test_split_over_a_named_axis_equals_the_global_batch():
    """Under an axis name (here vmap standing in for pmap), the mean of per-device losses and gradients
    equals the global batch's, even with labels spread unevenly and OHEM choosing across devices."""
    rng = np.random.default_rng(0)
    labels = jnp.array([1, 1, 1, 0, 0, 0, -1, 0, 0, -2, -2, 1, 0, -1, 0, 0])
    batch = {"label": labels, "box": jnp.asarray(rng.normal(size=(16, 4)), jnp.float32),
             "landmarks": jnp.asarray(rng.uniform(size=(16, 10)), jnp.float32)}
    outputs = {k: jnp.asarray(rng.normal(size=(16, n)), jnp.float32) for k, n in
               (("logits", 2), ("box", 4), ("landmarks", 10))}
    weights = losses.STAGE_WEIGHTS["onet"]

    def loss(out, b, axis_name=None):
        return losses.multitask_loss(out, b, weights, 0.7, axis_name)

    (total, metrics), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(outputs, batch)
    split = lambda t: jax.tree_util.tree_map(lambda x: x.reshape((4, 4) + x.shape[1:]), t)
    per_device = jax.jit(
        jax.vmap(jax.value_and_grad(lambda o, b: loss(o, b, "batch"), has_aux=True), axis_name="batch")
    )
    (totals, metrics_dev), grads_dev = per_device(split(outputs), split(batch))
    assert float(totals.mean()) == pytest.approx(float(total), rel=1e-5)
    for name in metrics:
        assert float(metrics_dev[name].mean()) == pytest.approx(float(metrics[name]), rel=1e-5, abs=1e-7), name
    for name in grads:  # pmean of per-device gradients = global gradient; per sample, times the 4 devices
        np.testing.assert_allclose(grads_dev[name].reshape(grads[name].shape) / 4, grads[name], rtol=1e-5, atol=1e-7)
