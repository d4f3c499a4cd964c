"""The three nets alone as ONNX models (jax2onnx), for runtimes that run the cascade themselves (issue 27).

`export_nets(params)` gives pnet (any N x H x W x 3, H, W >= 12), rnet (N x 24 x 24 x 3) and onet
(N x 48 x 48 x 3): the inputs and outputs of `nets.pnet`, `nets.rnet`, `nets.onet` ("images", normalised
by `nets.normalize`; "logits", "box", O-Net's "landmarks"), the weights inside. Three steps make the nets
ONNX-shaped without a second copy of them:

- The nets are traced to a jaxpr once (`jax.make_jaxpr`, batch symbolic) and evaluated for a non-CPU
  platform (`_evaluate`): the `lax.platform_dependent` choice of `nets.conv_valid` takes XLA's plain
  convolution, as a GPU lowering would, instead of the CPU forms, and the custom JVP is inlined. jax2onnx
  converts that evaluation (tracing the nets under jax2onnx would meet its patched `flax.linen.max_pool`,
  which takes no explicit padding).
- Caffe's ceil-mode max pooling (`nets.max_pool_ceil`: explicit end padding with -inf) reaches jax2onnx as a
  4-D `reduce_window_max`, which onnxruntime cannot run; `_ceil_pools` rewrites each into ONNX's own
  `MaxPool(ceil_mode=1)` between NHWC <-> NCHW transposes (the same windows: ceil_mode adds exactly the end
  padding max_pool_ceil adds).
- P-Net is traced at 12 x 12 and its height and width made symbolic (`onnx.tools.update_model_dims`): all
  its layers are size-independent once pooling is ceil_mode.

`tests/test_export.py` checks each model against our nets under onnxruntime (random and real inputs, P-Net
at odd and even sizes) to 1e-4.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from jax.extend import core as jcore
from jax2onnx import to_onnx
from onnx import helper, shape_inference
from onnx.tools.update_model_dims import update_inputs_outputs_dims

from mtcnn_jax import nets
from mtcnn_jax.stages import INPUT_SIZE, STAGES

OPSET = 17  # ONNX opset of the models: MaxPool's ceil_mode since 10; 17 runs on most runtimes
PLATFORM = "cuda"  # the platform whose branches the nets are exported with (XLA's plain convolution)
INLINED = ("custom_jvp_call", "pjit", "jit", "closed_call")  # primitives that only wrap a jaxpr


def _branch(platforms: tuple, platform: str) -> int:
    """`platform_index`'s answer for `platform`: the first branch naming it, else the default (None)."""
    return next(i for i, names in enumerate(platforms) if names is None or platform in names)


def _evaluate(jaxpr: Any, consts: list, args: list, platform: str) -> list:
    """Evaluate a jaxpr as it would run on `platform`: `platform_index` answered, its `cond` reduced to the
    chosen branch, wrapped jaxprs (custom JVP, jit) inlined; every other equation bound as it is."""
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jcore.Literal) else env[v]  # noqa: E731
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        ins, name = [read(v) for v in eqn.invars], eqn.primitive.name
        if name == "platform_index":
            outs = [_branch(eqn.params["platforms"], platform)]
        elif name == "cond" and isinstance(ins[0], int):
            branch = eqn.params["branches"][ins[0]]
            outs = _evaluate(branch.jaxpr, branch.consts, ins[1:], platform)
        elif name in INLINED:
            inner = eqn.params.get("call_jaxpr") or eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, ins, platform)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _ceil_pools(model: onnx.ModelProto) -> onnx.ModelProto:
    """Each NHWC max pool jax2onnx wrote (Unsqueeze, Unsqueeze, 4-D MaxPool over N, H, W, C, Squeeze) as
    Transpose, MaxPool over H, W with ceil_mode=1, Transpose; unused initializers dropped."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    replaced, dropped = {}, set()
    for node in graph.node:
        if node.op_type != "MaxPool":
            continue
        a = _attributes(node)
        kernel, strides, pads = list(a["kernel_shape"]), list(a["strides"]), list(a.get("pads", [0] * 8))
        inner = producer[node.input[0]]
        outer = producer.get(inner.input[0])
        squeeze = consumers[node.output[0]]
        if not (len(kernel) == 4 and kernel[0] == kernel[3] == 1 and strides[0] == strides[3] == 1
                and not any(pads[:4]) and pads[4] == pads[7] == 0 and outer is not None
                and (inner.op_type, outer.op_type) == ("Unsqueeze", "Unsqueeze")
                and len(squeeze) == 1 and squeeze[0].op_type == "Squeeze"):
            raise ValueError(f"unexpected max pool from jax2onnx ({node.name}: {a}); the nets' pools are NHWC, "
                             "end-padded (Caffe's ceil mode)")
        x, y = outer.input[0], squeeze[0].output[0]
        replaced[id(node)] = [
            helper.make_node("Transpose", [x], [f"{y}_nchw_in"], perm=[0, 3, 1, 2]),
            helper.make_node("MaxPool", [f"{y}_nchw_in"], [f"{y}_nchw"], kernel_shape=kernel[1:3],
                             strides=strides[1:3], ceil_mode=1),
            helper.make_node("Transpose", [f"{y}_nchw"], [y], perm=[0, 2, 3, 1])]
        dropped |= {id(inner), id(outer), id(squeeze[0])}
    nodes = [n for node in graph.node if id(node) not in dropped for n in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # shapes of the old nodes; shape inference writes them again
    return model


def net_to_onnx(stage: str, params: dict) -> onnx.ModelProto:
    """One net with its weights as an ONNX model: input "images" (N, H, W, 3) float32 normalised, outputs as
    `nets.NETS[stage]` names them; P-Net's H and W symbolic, R-Net's and O-Net's INPUT_SIZE."""
    size = INPUT_SIZE[stage]
    batch = jax.export.symbolic_shape("N")[0]
    spec = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    net = nets.NETS[stage]
    names = list(net(params, np.zeros((1, size, size, 3), np.float32)))  # the net's own order of its outputs
    closed = jax.make_jaxpr(lambda x: (lambda out: [out[k] for k in names])(net(params, x)))(spec)
    model = to_onnx(lambda x: tuple(_evaluate(closed.jaxpr, closed.consts, [x], PLATFORM)), [spec],
                    model_name=f"mtcnn_{stage}", opset=OPSET, input_names=["images"], output_names=names)
    model = _ceil_pools(model)
    if stage == "pnet":
        channels = {k: int(np.prod(v.shape[3:])) for k, v in zip(names, closed.out_avals)}
        model = update_inputs_outputs_dims(model, {"images": ["N", "H", "W", 3]},
                                           {k: ["N", "map_h", "map_w", c] for k, c in channels.items()})
    model = shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_nets(params: dict) -> dict[str, onnx.ModelProto]:
    """{stage: ONNX model} for the three nets of a param tree {"pnet", "rnet", "onet"}."""
    params = jax.tree_util.tree_map(np.asarray, params)
    return {stage: net_to_onnx(stage, params[stage]) for stage in STAGES}
