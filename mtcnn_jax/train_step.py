"""One training step of a stage (Zhang et al. 2016, Sec. III-B): the multi-task loss with OHEM, its gradient
pmean'ed over every device of every process (a `shard_map` over a 1-D mesh of the global devices), and an
SGD-momentum (Caffe's) or Adam update with L2 weight decay on a step learning-rate schedule; also the state
it updates and the evaluation forward pass. Pure functions over explicit pytrees: dropout keys derive from
(seed, step), so a step is a function of its inputs. Each step also reports the updated params' norm and
whether the updated state is all finite, so the trainer never saves a state it has not checked.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mtcnn_jax import losses, nets
from mtcnn_jax.train_config import TrainConfig

AXIS = "batch"  # the named device axis of the data-parallel step
STATE_FINITE = "state_finite"  # the step's metric: 1.0 when the updated params and optimizer state are finite


@flax.struct.dataclass
class TrainState:
    """The whole training state: step, params and optimizer state (dropout keys derive from (seed, step))."""

    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """lr, divided by 10 at each of `config.lr_decay_fractions` of the steps."""
    bounds = {max(1, int(round(f * config.steps))): 0.1 for f in config.lr_decay_fractions}
    return optax.piecewise_constant_schedule(config.learning_rate, bounds)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """SGD with momentum (or Adam), L2 weight decay added to the gradient (as in Caffe), on the step schedule.
    `config.optimizer` is one of train_config.OPTIMIZERS (TrainConfig refuses any other)."""
    schedule = learning_rate_schedule(config)
    step = {"sgd": lambda: optax.sgd(schedule, momentum=config.momentum), "adam": lambda: optax.adam(schedule)}
    return optax.chain(optax.add_decayed_weights(config.weight_decay), step[config.optimizer]())


def init_state(config: TrainConfig) -> TrainState:
    """Fresh params (seeded by config.seed) and optimizer state at step 0 (jitted: one compile, not one per op)."""
    return _compiled_init(_step_config(config))(jax.random.key(config.seed))


# The fields only the loop reads (when it logs, evaluates, saves or stops; where it starts): the compiled init
# and step are cached on the config without them, so changing them compiles nothing.
_LOOP_FIELDS = ("log_interval", "eval_interval", "checkpoint_interval", "max_checkpoints", "max_param_norm",
                "val_fraction", "init_from")


def _step_config(config: TrainConfig) -> TrainConfig:
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.name in _LOOP_FIELDS}
    return dataclasses.replace(config, **defaults)


@functools.lru_cache(maxsize=8)
def _compiled_init(config: TrainConfig) -> Any:
    def init(rng: jax.Array) -> TrainState:
        params = nets.init_params(rng, (config.stage,))[config.stage]
        return TrainState(jnp.zeros((), jnp.int32), params, make_optimizer(config).init(params))

    return jax.jit(init)


def forward(stage: str, params: Any, images_uint8: jax.Array, dropout_rng: jax.Array | None = None) -> dict:
    """The stage's net on uint8 crops, outputs flattened to (B, C) (P-Net gives (B, 1, 1, C) maps)."""
    out = nets.NETS[stage](params, nets.normalize(images_uint8), dropout_rng=dropout_rng)
    return {k: v.reshape(v.shape[0], -1) for k, v in out.items()}


def train_step(
    state: TrainState, batch: dict[str, jax.Array], config: TrainConfig, axis_name: str | None = AXIS
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on this device's share of the batch; gradients and metrics are `pmean`ed over `axis_name`.

    A pure function: with `axis_name` it runs under `pmap`/`shard_map` over a named device axis, and
    the pmean'ed gradient equals the gradient of the loss on the global batch (see `losses`).
    """
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), state.step), 0)
    if axis_name is not None:
        rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    dropout_rng = rng if config.stage == "onet" else None

    def loss_fn(params):
        outputs = forward(config.stage, params, batch["image"], dropout_rng)
        return losses.multitask_loss(outputs, batch, config.weights, config.ohem_ratio, axis_name, config.landmark_norm)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    tx = make_optimizer(config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["learning_rate"] = learning_rate_schedule(config)(state.step)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["param_norm"] = optax.tree.norm(params)
    metrics[STATE_FINITE] = all_finite((params, opt_state))
    return TrainState(state.step + 1, params, opt_state), metrics


def all_finite(tree: Any) -> jax.Array:
    """1.0 if every value of `tree` is finite (no NaN, no inf), else 0.0: the check before a state is saved."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(flags)).astype(jnp.float32)


def data_mesh() -> Mesh:
    """The 1-D mesh (axis AXIS) of every device of every process, ordered by process then device id: process
    p's devices hold one contiguous slice of the global batch (rows p * B / n .. (p + 1) * B / n - 1 when
    each of the n processes has the same number of devices), the slice `input_pipeline.process_rows` reads."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))


def compiled_step(config: TrainConfig) -> Any:
    """`train_step` as a `shard_map` over `data_mesh()`, jitted: (state replicated (`replicate`), batch
    split over the devices (`global_batch`)) -> (state, metrics), both replicated (cached per config, so
    repeated runs compile once). The pmap of the step written as its shard_map form, over the global devices."""
    return _compiled_step(_step_config(config), data_mesh())


@functools.lru_cache(maxsize=8)
def _compiled_step(config: TrainConfig, mesh: Mesh) -> Any:
    step = functools.partial(train_step, config=config, axis_name=AXIS)
    # check_vma=False: pmap's semantics, each device's gradient of its own loss, pmean'ed by train_step (with
    # the check, the gradient of the replicated params would already be psum'ed over the devices: N times it)
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False))


def replicate(tree: Any) -> Any:
    """`tree` (the same host values on every process) as arrays replicated over `data_mesh()`."""
    return jax.device_put(jax.device_get(tree), NamedSharding(data_mesh(), P()))


def global_batch(local_batch: dict[str, np.ndarray], global_size: int) -> dict[str, jax.Array]:
    """This process's rows of a batch (`input_pipeline.process_rows`) as the global batch of `global_size`
    rows split over `data_mesh()`'s devices (one process: the whole batch, split over the local devices)."""
    sharding = NamedSharding(data_mesh(), P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_size,) + v.shape[1:])
            for k, v in local_batch.items()}


@functools.lru_cache(maxsize=8)
def compiled_forward(stage: str) -> Any:
    """The deterministic (evaluation) forward pass, jitted."""
    return jax.jit(functools.partial(forward, stage))


@functools.lru_cache(maxsize=8)
def compiled_loss(weights: losses.LossWeights, ohem_ratio: float, landmark_norm: str = "l2") -> Any:
    """`losses.multitask_loss` with fixed weights, OHEM ratio and landmark norm, jitted."""
    return jax.jit(functools.partial(losses.multitask_loss, weights=weights, ohem_ratio=ohem_ratio,
                                     landmark_norm=landmark_norm))


def evaluate(params: Any, batches: Iterable[dict[str, np.ndarray]], config: TrainConfig) -> dict[str, float]:
    """Loss terms and metrics over `batches` (input_pipeline.eval_batches: padded, unaugmented), all at once:
    no OHEM, no dropout."""
    forward_fn = compiled_forward(config.stage)
    outs, kept = [], []
    for batch in batches:
        outs.append(jax.device_get(forward_fn(params, batch["image"])))
        kept.append({k: batch[k] for k in ("label", "box", "landmarks")})
    outputs = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    targets = {k: np.concatenate([b[k] for b in kept]) for k in kept[0]}
    _, metrics = compiled_loss(config.weights, 1.0, config.landmark_norm)(outputs, targets)
    return {k: float(v) for k, v in metrics.items()}
