"""The three nets: shape traces, parameter counts, Caffe ceil pooling, dropout, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtcnn_jax import nets


@pytest.fixture(scope="module")
def fresh():
    return nets.init_params(jax.random.key(0))


def conv_widths(stage, params, size):
    """Spatial size after each ConvPReLU block, captured from the module's intermediates."""
    x = jnp.zeros((1, size, size, 3))
    _, state = nets.MODULES[stage].apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    return [inter[name]["__call__"][0].shape[1] for name in sorted(k for k in inter if k.startswith("conv"))]


def test_shape_traces(fresh):
    # P 12->10->(pool)5->3->1; R 24->22->(11)->9->(4)->3; O 48->46->(23)->21->(10)->8->(4)->3
    assert conv_widths("pnet", fresh["pnet"], 12) == [10, 3, 1]
    assert conv_widths("rnet", fresh["rnet"], 24) == [22, 9, 3]
    assert conv_widths("onet", fresh["onet"], 48) == [46, 21, 8, 3]


@pytest.mark.parametrize("h,w", [(12, 12), (13, 13), (17, 30), (12, 101), (45, 31), (64, 47)])
def test_pnet_is_fully_convolutional_on_odd_sizes(fresh, h, w):
    out = nets.pnet(fresh["pnet"], jnp.zeros((2, h, w, 3)))
    # conv3 (n-2), ceil pool 2/2 -> ceil((n-2)/2), two conv3 -> -4
    expect = (2, -(-(h - 2) // 2) - 4, -(-(w - 2) // 2) - 4)
    assert out["logits"].shape == expect + (2,)
    assert out["box"].shape == expect + (4,)


def test_rnet_onet_heads(fresh):
    r = nets.rnet(fresh["rnet"], jnp.zeros((5, 24, 24, 3)))
    o = nets.onet(fresh["onet"], jnp.zeros((5, 48, 48, 3)))
    assert {k: v.shape for k, v in r.items()} == {"logits": (5, 2), "box": (5, 4)}
    assert {k: v.shape for k, v in o.items()} == {"logits": (5, 2), "box": (5, 4), "landmarks": (5, 10)}


def test_parameter_counts(fresh):
    # Hand counts: kernel + bias + one PReLU slope per channel for every hidden layer.
    pnet = (27 * 10 + 20) + (90 * 16 + 32) + (144 * 32 + 64) + (32 * 2 + 2) + (32 * 4 + 4)
    rnet = (27 * 28 + 56) + (252 * 48 + 96) + (192 * 64 + 128) + (576 * 128 + 256) + (128 * 2 + 2) + (128 * 4 + 4)
    onet = ((27 * 32 + 64) + (288 * 64 + 128) + (576 * 64 + 128) + (256 * 128 + 256) + (1152 * 256 + 512)
            + (256 * 2 + 2) + (256 * 4 + 4) + (256 * 10 + 10))
    assert (pnet, rnet, onet) == (6632, 100178, 389040)
    assert [nets.param_count(fresh[s]) for s in ("pnet", "rnet", "onet")] == [pnet, rnet, onet]


def test_prelu_has_one_slope_per_channel(fresh):
    assert fresh["onet"]["conv2"]["prelu"]["alpha"].shape == (64,)
    assert fresh["rnet"]["prelu4"]["alpha"].shape == (128,)
    np.testing.assert_allclose(fresh["pnet"]["conv1"]["prelu"]["alpha"], 0.25)
    x = jnp.array([[-2.0, 3.0], [-1.0, -4.0]])
    y = nets.PReLU().apply({"params": {"alpha": jnp.array([0.5, 0.1])}}, x)
    np.testing.assert_allclose(y, [[-1.0, 3.0], [-0.5, -0.4]])


def test_ceil_max_pooling_by_hand():
    x = jnp.arange(25.0).reshape(1, 5, 5, 1)
    y = nets.max_pool_ceil(x, 2, 2)[0, :, :, 0]
    # 5 -> ceil(3/2)+1 = 3 windows per axis; the last window holds only row/col 4.
    np.testing.assert_array_equal(y, [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    z = nets.max_pool_ceil(-jnp.arange(16.0).reshape(1, 4, 4, 1), 3, 2)[0, :, :, 0]
    # 4 -> ceil(1/2)+1 = 2; padding must never win a max, even for negative inputs.
    np.testing.assert_array_equal(z, [[0, -2], [-8, -10]])
    assert nets.max_pool_ceil(jnp.zeros((1, 22, 9, 1)), 3, 2).shape == (1, 11, 4, 1)


def test_onet_dropout_only_with_rng(fresh):
    x = jax.random.normal(jax.random.key(1), (4, 48, 48, 3))
    a = nets.onet(fresh["onet"], x)
    b = nets.onet(fresh["onet"], x)
    np.testing.assert_array_equal(a["logits"], b["logits"])
    d1 = nets.onet(fresh["onet"], x, dropout_rng=jax.random.key(2))
    d2 = nets.onet(fresh["onet"], x, dropout_rng=jax.random.key(3))
    assert not np.allclose(d1["logits"], a["logits"])
    assert not np.allclose(d1["logits"], d2["logits"])


def test_normalize_and_probability():
    np.testing.assert_allclose(nets.normalize(np.array([0, 127.5, 255])), [-0.99609375, 0.0, 0.99609375])
    np.testing.assert_allclose(nets.face_probability(jnp.array([[0.0, np.log(3.0)]])), [0.75], rtol=1e-6)


def test_init_params_differ_per_seed():
    a = nets.init_params(jax.random.key(0), ("rnet",))
    b = nets.init_params(jax.random.key(1), ("rnet",))
    assert set(a) == {"rnet"}
    assert not np.allclose(a["rnet"]["fc4"]["kernel"], b["rnet"]["fc4"]["kernel"])


@pytest.mark.parametrize("shape, k", [((2, 12, 12, 3), 3), ((3, 9, 7, 5), 2), ((1, 80, 70, 4), 3)])
def test_conv_valid_derivatives_equal_lax_conv_autodiff(shape, k):
    # conv_valid's tangent / gradient go through the im2col matrix product; XLA's own convolution
    # transpose rules (plain autodiff of lax.conv) are the independent reference.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, shape[-1], 6)), jnp.float32)
    lax_conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",  # noqa: E731
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
    weights = jnp.asarray(rng.normal(size=lax_conv(x, kernel).shape), jnp.float32)
    for conv in (nets.conv_valid, lax_conv):
        np.testing.assert_allclose(conv(x, kernel), lax_conv(x, kernel), rtol=1e-5, atol=1e-5)
    ours = jax.grad(lambda x, w: jnp.sum(nets.conv_valid(x, w) * weights), argnums=(0, 1))(x, kernel)
    ref = jax.grad(lambda x, w: jnp.sum(lax_conv(x, w) * weights), argnums=(0, 1))(x, kernel)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    dx, dw = jnp.ones_like(x), jnp.full_like(kernel, 0.5)
    np.testing.assert_allclose(jax.jvp(nets.conv_valid, (x, kernel), (dx, dw))[1],
                               jax.jvp(lax_conv, (x, kernel), (dx, dw))[1], rtol=1e-4, atol=1e-3)
    # Only the kernel differentiated (the first layer's image): the symbolic-zero branch.
    g = jax.grad(lambda w: jnp.sum(nets.conv_valid(x, w) * weights))(kernel)
    np.testing.assert_allclose(g, ref[1], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("form", nets.CONV_FORMS)
def test_every_conv_form_equals_lax_conv(form):
    """The evaluation forms are the same sums: each equals XLA's convolution on odd shapes and channels."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 13, 11, 5)).astype(np.float32))
    kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 36)).astype(np.float32))
    expected = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(nets.conv_valid(x, kernel, form), expected, atol=1e-4)
