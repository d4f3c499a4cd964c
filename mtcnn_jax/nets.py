"""P-Net, R-Net and O-Net as in the released MTCNN models, and pure functions to run them.

The Flax modules only describe the layers; users call the pure functions `pnet(params, x)`,
`rnet(params, x)` and `onet(params, x)` with an explicit param tree. Inputs are float32 NHWC
images normalised by `normalize` (RGB, (pixel - 127.5) * 0.0078125). Each net returns a dict with
"logits" (..., 2) (index 1 = face), "box" (..., 4) = (dx1, dy1, dx2, dy2) and, for O-Net,
"landmarks" (..., 10) = (x1..x5, y1..y5), the last two relative to the input window.

The released weights were trained on transposed (MATLAB column-major) images; `pretrained.py`
folds that transpose into the weights, so these nets take ordinary row-major images.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from mtcnn_jax.stages import INPUT_SIZE, STAGES

Params = Any  # a nested dict of arrays, one per net

# Float32 products on every backend, as in the original (Caffe, float32): GPUs would otherwise multiply in
# TF32 (a 10-bit mantissa), which moves a large face's box by pixels against the CPU's detections.
PRECISION = jax.lax.Precision.HIGHEST



def normalize(images_uint8: jax.Array) -> jax.Array:
    """uint8 (or float) RGB pixels to the nets' input range, as in detect_face.m."""
    return (jnp.asarray(images_uint8, jnp.float32) - 127.5) * 0.0078125


def face_probability(logits: jax.Array) -> jax.Array:
    """Softmax probability of the face class (index 1) from (..., 2) logits."""
    return jax.nn.softmax(logits, axis=-1)[..., 1]


class PReLU(nn.Module):
    """PReLU with one learned slope per channel, as in the Caffe models (flax's has one scalar)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],))
        return jnp.where(x >= 0, x, alpha * x)


def max_pool_ceil(x_NxHxWxC: jax.Array, window: int, stride: int) -> jax.Array:
    """Caffe max pooling: ceil((n - k) / s) + 1 outputs, the last window running off the edge.

    Caffe rounds the output size up where most frameworks round down; the windows that overhang
    the bottom/right edge see only real pixels (padding with -inf).
    """
    pads = []
    for n in x_NxHxWxC.shape[-3:-1]:
        out = math.ceil(max(n - window, 0) / stride) + 1
        pads.append((0, max((out - 1) * stride + window - n, 0)))
    return nn.max_pool(x_NxHxWxC, (window, window), (stride, stride), padding=pads)


def _conv_as_matmul(x_NxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array) -> jax.Array:
    """The valid stride-1 convolution as one matrix product over the K*K shifted copies (im2col)."""
    k, _, c, f = kernel_KxKxCxF.shape
    h, w = x_NxHxWxC.shape[-3] - k + 1, x_NxHxWxC.shape[-2] - k + 1
    shifted = [x_NxHxWxC[..., i : i + h, j : j + w, :] for i in range(k) for j in range(k)]
    patches = jnp.concatenate(shifted, axis=-1)  # (i, j, c) order
    return jnp.matmul(patches, kernel_KxKxCxF.reshape(k * k * c, f), precision=PRECISION)


# How `conv_valid` evaluates a layer on CPU. The sums are the same; the speed on XLA:CPU is not, and it
# depends on the layer's shape (measured on the 2-core benchmark machine, benchmarks/README.md):
# - "conv": XLA's convolution, the default.
# - "im2col": one matrix product over the 9 shifted copies: 3x faster for the 3-channel first layers
#   of R-Net and O-Net on batches of crops (but 5x slower on a whole P-Net pyramid level).
# - "conv16": XLA's convolution per group of 16 output channels: 3.8x faster for P-Net's 16 -> 32 conv3
#   on a pyramid level (XLA:CPU's kernel for 32 outputs runs at a third of the speed of the one for 16).
CONV_FORMS = ("conv", "im2col", "conv16")


def _lax_conv(x_NxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x_NxHxWxC, kernel_KxKxCxF, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=PRECISION)


def _conv16(x_NxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array) -> jax.Array:
    f = kernel_KxKxCxF.shape[-1]
    return jnp.concatenate([_lax_conv(x_NxHxWxC, kernel_KxKxCxF[..., i : i + 16]) for i in range(0, f, 16)], -1)


_CPU_FORMS = {"conv": _lax_conv, "im2col": _conv_as_matmul, "conv16": _conv16}


def _on_cpu(form: str, x_NxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array) -> jax.Array:
    """`form` when the computation is lowered for CPU, XLA's convolution on any other platform (the
    forms are XLA:CPU-specific speedups; chosen at lowering, so one export serves every platform)."""
    if form not in _CPU_FORMS:
        raise ValueError(f"form must be one of {CONV_FORMS}, got {form!r}")
    if form == "conv":
        return _lax_conv(x_NxHxWxC, kernel_KxKxCxF)
    return jax.lax.platform_dependent(x_NxHxWxC, kernel_KxKxCxF, cpu=_CPU_FORMS[form], default=_lax_conv)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv_valid(x_NxHxWxC: jax.Array, kernel_KxKxCxF: jax.Array, form: str = "conv") -> jax.Array:
    """A valid (unpadded) stride-1 convolution (NHWC input, HWIO kernel), without bias.

    On CPU evaluated as `form` says (`CONV_FORMS`), and its derivatives (the tangent, and by
    transposition the gradient) with the im2col matrix product: the same sums, but XLA:CPU's
    convolution gradients on the small maps training sees are about 1.5x slower than the matrix
    products. Other platforms get XLA's convolution throughout.
    """
    return _on_cpu(form, x_NxHxWxC, kernel_KxKxCxF)


@functools.partial(conv_valid.defjvp, symbolic_zeros=True)
def _conv_valid_jvp(form, primals, tangents):
    (x, kernel), (dx, dkernel) = primals, tangents
    terms = []
    if not isinstance(dx, SymbolicZero):  # the first layer's input image carries no tangent
        terms.append(_on_cpu("im2col", dx, kernel))
    if not isinstance(dkernel, SymbolicZero):
        terms.append(_on_cpu("im2col", x, dkernel))
    out = conv_valid(x, kernel, form)
    return out, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


Dense = functools.partial(nn.Dense, precision=PRECISION)


class Conv(nn.Module):
    """Parameters "kernel" (K, K, C, F) and "bias" (F,) as in flax's nn.Conv, applied by `conv_valid`."""

    features: int
    kernel: int
    form: str = "conv"  # how conv_valid evaluates it (CONV_FORMS); params and results do not depend on it

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return conv_valid(x, kernel, self.form) + bias


class ConvPReLU(nn.Module):
    """A valid (unpadded) stride-1 convolution followed by a per-channel PReLU."""

    features: int
    kernel: int
    form: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return PReLU(name="prelu")(Conv(self.features, self.kernel, self.form, name="conv")(x))


class PNet(nn.Module):
    """Proposal net: fully convolutional, a 12x12 window every 2 pixels (det1.prototxt)."""

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, valid_mask: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        x = ConvPReLU(10, 3, name="conv1")(x)
        if valid_mask is not None:  # padded inputs: pool only what each unpadded region would have
            m = valid_mask[:, :-2, :-2] & valid_mask[:, 2:, 2:]  # 3x3 windows inside one region
            x = jnp.where(m[..., None], x, -jnp.inf)
        x = max_pool_ceil(x, 2, 2)
        if valid_mask is not None:
            x = jnp.where(jnp.isneginf(x), 0.0, x)
        x = ConvPReLU(16, 3, name="conv2")(x)
        x = ConvPReLU(32, 3, "conv16", name="conv3")(x)
        return {"logits": Conv(2, 1, name="cls")(x), "box": Conv(4, 1, name="box")(x)}


class RNet(nn.Module):
    """Refinement net on 24x24 crops (det2.prototxt)."""

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
        x = max_pool_ceil(ConvPReLU(28, 3, "im2col", name="conv1")(x), 3, 2)
        x = max_pool_ceil(ConvPReLU(48, 3, name="conv2")(x), 3, 2)
        x = ConvPReLU(64, 2, name="conv3")(x)
        x = x.reshape(x.shape[:-3] + (math.prod(x.shape[-3:]),))  # (..., 3*3*64 = 576), row-major (h, w, c)
        x = PReLU(name="prelu4")(Dense(128, name="fc4")(x))
        return {"logits": Dense(2, name="cls")(x), "box": Dense(4, name="box")(x)}


class ONet(nn.Module):
    """Output net on 48x48 crops, with the 5 landmarks (det3.prototxt)."""

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> dict[str, jax.Array]:
        x = max_pool_ceil(ConvPReLU(32, 3, "im2col", name="conv1")(x), 3, 2)
        x = max_pool_ceil(ConvPReLU(64, 3, name="conv2")(x), 3, 2)
        x = max_pool_ceil(ConvPReLU(64, 3, name="conv3")(x), 2, 2)
        x = ConvPReLU(128, 2, name="conv4")(x)
        x = x.reshape(x.shape[:-3] + (math.prod(x.shape[-3:]),))  # (..., 1152), row-major (h, w, c)
        x = Dense(256, name="fc5")(x)
        x = nn.Dropout(0.25, deterministic=deterministic)(x)  # det3.prototxt: drop5 before prelu5
        x = PReLU(name="prelu5")(x)
        return {
            "logits": Dense(2, name="cls")(x),
            "box": Dense(4, name="box")(x),
            "landmarks": Dense(10, name="landmarks")(x),
        }


MODULES = {"pnet": PNet(), "rnet": RNet(), "onet": ONet()}


def _apply(stage: str, params: Params, x: jax.Array, dropout_rng: jax.Array | None, **kw) -> dict[str, jax.Array]:
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return MODULES[stage].apply({"params": params}, x, deterministic=dropout_rng is None, rngs=rngs, **kw)


def pnet(
    params: Params, x: jax.Array, *, dropout_rng: jax.Array | None = None, valid_mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """P-Net on (N, H, W, 3) normalised images, H, W >= 12: maps of (N, H', W', 2|4), one cell
    per 12x12 window at stride 2. `dropout_rng` is accepted for a uniform signature (P-Net has none).

    `valid_mask` (N, H, W) bool marks real pixels when images are zero-padded or several are packed
    into one canvas (rectangles at even offsets, at least 2 pixels apart): every cell whose window lies
    in one rectangle then equals the result on that rectangle alone (Caffe's ceil pooling would
    otherwise let the neighbouring pixels into the last row/column of cells).
    """
    kw = {} if valid_mask is None else {"valid_mask": jnp.asarray(valid_mask, bool)}
    return _apply("pnet", params, x, dropout_rng, **kw)


def rnet(params: Params, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """R-Net on (N, 24, 24, 3) normalised crops: logits (N, 2), box (N, 4). No dropout."""
    return _apply("rnet", params, x, dropout_rng)


def onet(params: Params, x: jax.Array, *, dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
    """O-Net on (N, 48, 48, 3) normalised crops: logits (N, 2), box (N, 4), landmarks (N, 10).
    Dropout (p = 0.25) is on only when a `dropout_rng` is given, i.e. in training."""
    return _apply("onet", params, x, dropout_rng)


NETS: dict[str, Callable[..., dict[str, jax.Array]]] = {"pnet": pnet, "rnet": rnet, "onet": onet}


def init_params(rng: jax.Array, stages: tuple[str, ...] = STAGES) -> dict[str, Params]:
    """Fresh param trees (Flax default initialisers, PReLU slopes 0.25) for training from scratch."""
    out = {}
    for stage, key in zip(stages, jax.random.split(rng, len(stages))):
        size = INPUT_SIZE[stage]
        out[stage] = MODULES[stage].init(key, jnp.zeros((1, size, size, 3), jnp.float32))["params"]
    return out


def param_count(params: Params) -> int:
    """Number of scalars in a param tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
