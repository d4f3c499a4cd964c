"""Train one MTCNN stage (P-, R- or O-Net) on prepared samples: data-parallel SGD on the multi-task loss.

    python -m mtcnn_jax.train --stage pnet --data SAMPLES_DIR --workdir DIR [--steps N] [--batch-size B] ...

Every other flag is a field of `TrainConfig` (`--learning-rate`, `--lr-decay-fractions 0.2,0.5,0.7`,
`--no-...` for booleans; `--init-from RUN_OR_CHECKPOINT|original` fine-tunes). The sample source is
anything with `__len__` and `__getitem__(i)` returning a dict with "image" uint8 (S, S, 3) (S = 12/24/48
for the stage), "label" int (1 positive, 0 negative, -1 part, -2 landmark), "box" float32 (4,) and
"landmarks" float32 (10,) as `mtcnn_jax.samples.load` returns; other keys are ignored. The data order, the
flips and the dropout keys of step s are a pure function of (seed, s), so a run resumed from a checkpoint
ends exactly where an uninterrupted one does.

WORKDIR holds config.json (the run config), metrics.jsonl (one JSON object per logged step; "split":
"train" or "val"; a resumed run drops the records of the steps it redoes) and checkpoints/ (Orbax;
params, optimizer state, step and rng; the latest is resumed automatically). `checkpoints.load_params(WORKDIR)`
reads the trained params back.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
import typing
from pathlib import Path
from typing import Any, Sequence

import flax.jax_utils
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from mtcnn_jax import checkpoints, losses, nets, stages
from mtcnn_jax.samples import flip_targets

AXIS = "batch"  # the named device axis of the data-parallel step
PAD_LABEL = -3  # pads the last evaluation batch: in no task, so it changes no loss or metric
# Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner (x1..x5, y1..y5).
_MIRRORED_POINTS = np.array(stages.FLIP_POINTS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run of one stage; each field is a CLI flag (`--batch-size` ...)."""

    stage: str
    input_size: int
    steps: int
    cls_weight: float
    box_weight: float
    landmark_weight: float
    batch_size: int = 384  # global: split evenly over the local devices
    learning_rate: float = 1e-3
    lr_decay_fractions: tuple[float, ...] = (0.2, 0.5, 0.7)  # lr / 10 at each fraction of `steps`
    momentum: float = 0.9  # SGD only
    optimizer: str = "sgd"  # "sgd" (Caffe's, the paper's) or "adam" (converges in fewer steps on a CPU budget)
    weight_decay: float = 5e-4  # on every parameter, added to the gradient before momentum (Caffe)
    ohem_ratio: float = 0.7
    flip_probability: float = 0.5  # for positives and landmark samples
    color_jitter: float = 0.0  # brightness, contrast and saturation factors drawn from [1 - j, 1 + j] per sample
    blur_probability: float = 0.0  # share of samples blurred (Gaussian, sigma uniform in (0, blur_sigma])
    blur_sigma: float = 1.5  # in pixels of the net's input
    log_interval: int = 100
    eval_interval: int = 2000
    checkpoint_interval: int = 2000
    max_checkpoints: int = 3
    seed: int = 0
    val_fraction: float = 0.02  # held-back samples: an evenly spaced, deterministic set of indices
    init_from: str = ""  # start from these params, not a random init: a run, a checkpoint, or "original"

    @property
    def weights(self) -> losses.LossWeights:
        return losses.LossWeights(self.cls_weight, self.box_weight, self.landmark_weight)


def _stage_config(stage: str, steps: int, doc: str) -> TrainConfig:
    """The paper's setting for `stage`: its input size and loss weights, batch 384, lr 1e-3, momentum 0.9."""
    w = losses.STAGE_WEIGHTS[stage]
    config = TrainConfig(stage, stages.INPUT_SIZE[stage], steps, w.cls, w.box, w.landmark)
    object.__setattr__(config, "__doc__", doc)  # frozen: set the per-config docstring once, here
    return config


CONFIGS: dict[str, TrainConfig] = {
    "pnet": _stage_config(
        "pnet", 100_000,
        "P-Net on 12x12 samples, weights 1/0.5/0.5: "
        "python -m mtcnn_jax.train --stage pnet --data SAMPLES/pnet --workdir runs/pnet",
    ),
    "rnet": _stage_config(
        "rnet", 60_000,
        "R-Net on 24x24 samples (hard negatives from the trained P-Net), weights 1/0.5/0.5: "
        "python -m mtcnn_jax.train --stage rnet --data SAMPLES/rnet --workdir runs/rnet",
    ),
    "onet": _stage_config(
        "onet", 60_000,
        "O-Net on 48x48 samples (from P-Net + R-Net), weights 1/0.5/1, dropout 0.25: "
        "python -m mtcnn_jax.train --stage onet --data SAMPLES/onet --workdir runs/onet",
    ),
}


# ----------------------------------------------------------------------------------------------- data


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


def load_arrays(source: Any, config: TrainConfig, chunk: int = 4096) -> dict[str, np.ndarray]:
    """Every sample of `source` stacked in memory ("image" (N,S,S,3) uint8, "label", "box", "landmarks"),
    checked (label in {1, 0, -1, -2}, image (S, S, 3)); ValueError if bad.

    One read per record at start-up, batched where the source can (`__getitems__`): a random-access read
    per training sample would cost more than the step itself, and the sets are small (O-Net's 60k
    samples are 0.4 GB).
    """
    n = len(source)
    if n == 0:
        raise ValueError("the sample set is empty: nothing to train on")
    want = (config.input_size, config.input_size, 3)
    parts = []
    for start in tqdm(range(0, n, chunk), desc=f"load {config.stage} samples", disable=None, unit="chunk"):
        indices = range(start, min(n, start + chunk))
        try:
            parts.append(gather(source, indices))
            bad = None if parts[-1]["image"].shape[1:] == want else start
        except ValueError:  # np.stack of mixed shapes
            bad = next(i for i in indices if np.shape(source[i]["image"]) != want)
        if bad is not None:
            raise ValueError(f"sample {bad}: image of shape {np.shape(source[bad]['image'])}, "
                             f"{config.stage} needs {want}")
    arrays = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    bad = np.flatnonzero(~np.isin(arrays["label"], stages.LABELS))
    if bad.size:
        found = sorted(set(arrays["label"][bad].tolist()))
        raise ValueError(f"samples {bad[:10].tolist()}: labels {found} not in {stages.LABELS}")
    return arrays


def split_indices(n: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices: round(val_fraction * n) evenly spaced indices are held back (at least 1 train)."""
    n_val = min(int(round(val_fraction * n)), n - 1)
    val = np.unique(np.floor(np.arange(n_val) * (n / max(n_val, 1))).astype(np.int64))
    return np.setdiff1d(np.arange(n), val), val


def step_indices(train_idx: np.ndarray, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The source indices of step `step`: consecutive slices of one seeded permutation per epoch."""
    n = len(train_idx)
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(positions // n):
        in_epoch = positions // n == epoch
        permutation = np.random.default_rng([seed, int(epoch)]).permutation(n)
        out[in_epoch] = train_idx[permutation[positions[in_epoch] % n]]
    return out


def gather(source: Any, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Stack the samples at `indices` into a batch {"image" (B,S,S,3) uint8, "label" (B,), "box", "landmarks"}."""
    indices = [int(i) for i in indices]
    many = getattr(source, "__getitems__", None)  # tfds data sources read a list of records at once
    samples = many(indices) if many is not None else [source[i] for i in indices]
    return {
        "image": np.stack([np.asarray(s["image"], np.uint8) for s in samples]),
        "label": np.array([int(s["label"]) for s in samples], np.int32),
        "box": np.stack([np.asarray(s["box"], np.float32) for s in samples]),
        "landmarks": np.stack([np.asarray(s["landmarks"], np.float32) for s in samples]),
    }


GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma, as PIL's convert("L")


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


def training_batch(arrays: dict[str, np.ndarray], train_idx: np.ndarray, config: TrainConfig,
                   step: int) -> dict[str, np.ndarray]:
    """The augmented batch of step `step` from `load_arrays`' output (flips; colour jitter and blur when
    asked for): a pure function of (data, config.seed, step)."""
    idx = step_indices(train_idx, config.seed, step, config.batch_size)
    batch = {k: v[idx] for k, v in arrays.items()}
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


# ------------------------------------------------------------------------------------------- the step


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


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """SGD with momentum (or Adam), L2 weight decay added to the gradient (as in Caffe), on the step schedule."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {config.optimizer}: expected one of {', '.join(OPTIMIZERS)}")
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adam":
        step = optax.adam(schedule)
    else:
        step = optax.sgd(schedule, momentum=config.momentum)
    return optax.chain(optax.add_decayed_weights(config.weight_decay), step)


def init_state(config: TrainConfig) -> TrainState:
    """Fresh params (seeded by config.seed) and optimizer state at step 0 (jitted: one compile, not one per op)."""
    return _compiled_init(config)(jax.random.key(config.seed))


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
        return losses.multitask_loss(outputs, batch, config.weights, config.ohem_ratio, axis_name)

    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    tx = make_optimizer(config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics["learning_rate"] = learning_rate_schedule(config)(state.step)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), metrics


@functools.lru_cache(maxsize=8)
def compiled_step(config: TrainConfig) -> Any:
    """`train_step` pmapped over all local devices (cached per config, so repeated runs compile once)."""
    return jax.pmap(functools.partial(train_step, config=config, axis_name=AXIS), axis_name=AXIS)


@functools.lru_cache(maxsize=8)
def compiled_forward(stage: str) -> Any:
    """The deterministic (evaluation) forward pass, jitted."""
    return jax.jit(functools.partial(forward, stage))


@functools.lru_cache(maxsize=8)
def compiled_loss(weights: losses.LossWeights, ohem_ratio: float) -> Any:
    """`losses.multitask_loss` with fixed weights and OHEM ratio, jitted."""
    return jax.jit(functools.partial(losses.multitask_loss, weights=weights, ohem_ratio=ohem_ratio))


def shard(batch: dict[str, np.ndarray], devices: int) -> dict[str, np.ndarray]:
    """Split the global batch (B, ...) into (devices, B / devices, ...)."""
    return {k: v.reshape((devices, v.shape[0] // devices) + v.shape[1:]) for k, v in batch.items()}


def evaluate(params: Any, arrays: dict[str, np.ndarray], indices: np.ndarray, config: TrainConfig) -> dict[str, float]:
    """Loss terms and metrics over the samples at `indices` of `load_arrays`' output (no OHEM, no flips,
    no dropout)."""
    forward_fn = compiled_forward(config.stage)
    outs, batches = [], []
    for start in range(0, len(indices), config.batch_size):
        batch = {k: v[indices[start : start + config.batch_size]] for k, v in arrays.items()}
        real = len(batch["label"])
        padded = {k: np.concatenate([v, np.repeat(v[:1], config.batch_size - real, 0)]) for k, v in batch.items()}
        padded["label"][real:] = PAD_LABEL  # same shapes every call: one compile
        outs.append(jax.device_get(forward_fn(params, padded["image"])))
        batches.append(padded)
    outputs = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    batch = {k: np.concatenate([b[k] for b in batches]) for k in ("label", "box", "landmarks")}
    _, metrics = compiled_loss(config.weights, 1.0)(outputs, batch)
    return {k: float(v) for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------- checkpoints


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the run stops and the last good checkpoint is left in place."""


def check_run(workdir: str | Path, config: TrainConfig, devices: int) -> Path:
    """Check the run before any training: a batch that divides over the devices, a known optimizer, a workdir of
    the same stage and optimizer."""
    if config.batch_size % devices:
        raise ValueError(f"batch size {config.batch_size} does not divide evenly over {devices} devices")
    make_optimizer(config)  # an unknown --optimizer fails here, before anything is written
    if not 0 <= config.color_jitter < 1:
        raise ValueError(f"--color-jitter {config.color_jitter}: expected 0 <= j < 1 (factors in [1 - j, 1 + j])")
    if not (0 <= config.blur_probability <= 1 and config.blur_sigma > 0):
        raise ValueError(f"--blur-probability {config.blur_probability} / --blur-sigma {config.blur_sigma}: "
                         "expected a probability in [0, 1] and a sigma > 0")
    if config.input_size != stages.INPUT_SIZE[config.stage]:
        raise ValueError(f"{config.stage} takes {stages.INPUT_SIZE[config.stage]}-pixel inputs, not {config.input_size}")
    workdir = Path(workdir)
    config_path = workdir / "config.json"
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        if previous.get("stage") != config.stage:
            raise ValueError(
                f"{workdir} holds a {previous.get('stage')} run (config.json); refusing to train {config.stage} there"
            )
        previous_optimizer = previous.get("optimizer", "sgd")  # runs from before the flag were SGD
        if previous_optimizer != config.optimizer:
            raise ValueError(
                f"{workdir} holds a run with optimizer {previous_optimizer}: its checkpoints cannot "
                f"resume with {config.optimizer}"
            )
    elif (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
        raise ValueError(f"{workdir}/checkpoints exists without config.json: cannot tell which stage it holds")
    if config.init_from not in ("", "original") and not Path(config.init_from).is_dir():
        raise FileNotFoundError(f"--init-from {config.init_from}: no training run or checkpoint there")
    return workdir


def write_config(workdir: Path, config: TrainConfig) -> None:
    """Save the run config as WORKDIR/config.json (rewritten on resume, e.g. with more steps)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def checkpoint_manager(workdir: Path, config: TrainConfig) -> ocp.CheckpointManager:
    """Orbax manager of WORKDIR/checkpoints, keeping the last `max_checkpoints` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True)
    return ocp.CheckpointManager((workdir / "checkpoints").resolve(), options=options)


def _checkpoint_tree(state: TrainState, config: TrainConfig) -> dict[str, Any]:
    """The saved tree: params, opt_state, step and the run's base rng key data."""
    rng = jax.random.key_data(jax.random.key(config.seed))
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": rng}


def initial_params(config: TrainConfig, fresh: Any) -> Any:
    """The params `config.init_from` names (a training WORKDIR, a checkpoint directory, or "original" for the
    released weights), checked against the tree of `fresh` params: the start of a fine-tuning run."""
    if config.init_from == "original":
        from mtcnn_jax.pretrained import load_pretrained

        params = load_pretrained()[config.stage]
    else:
        params = checkpoints.load_params(config.init_from, config.stage)
    want = jax.tree_util.tree_map(lambda x: x.shape, fresh)
    got = jax.tree_util.tree_map(lambda x: x.shape, params)
    if got != want:
        raise ValueError(f"--init-from {config.init_from}: not {config.stage} params (shapes {got}, expected {want})")
    return jax.tree_util.tree_map(jnp.asarray, params)


def restore_or_init(manager: ocp.CheckpointManager, config: TrainConfig) -> TrainState:
    """The latest checkpoint's state if there is one, else a fresh state (from `config.init_from` if set)."""
    fresh = init_state(config)
    step = manager.latest_step()
    if step is None and config.init_from:
        params = initial_params(config, fresh.params)
        return TrainState(fresh.step, params, make_optimizer(config).init(params))
    if step is None:
        return fresh
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _checkpoint_tree(fresh, config))
    tree = manager.restore(step, args=ocp.args.StandardRestore(target))
    return TrainState(jnp.asarray(tree["step"]), tree["params"], tree["opt_state"])


# ------------------------------------------------------------------------------------------ the loop


class _MetricLog:
    """Running means of the train metrics between log steps: metrics.jsonl, and the progress bar or a stderr line."""

    def __init__(self, path: Path, config: TrainConfig) -> None:
        self.path, self.batch_size = path, config.batch_size
        self.desc, self.total = f"train {config.stage}", config.steps
        self.sums: dict[str, float] = {}
        self.count, self.start = 0, time.perf_counter()

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1

    def flush(self, step: int, bar: tqdm) -> None:
        seconds = time.perf_counter() - self.start
        record = {"step": step, "split": "train", **{k: v / self.count for k, v in self.sums.items()}}
        record["samples_per_sec"] = self.count * self.batch_size / max(seconds, 1e-9)
        write_metrics(self.path, record)
        shown = dict(loss=f"{record['loss']:.4f}", cls=f"{record['cls']:.4f}", box=f"{record['box']:.4f}",
                     acc=f"{record['accuracy']:.3f}")
        bar.set_postfix(shown)
        if bar.disable:  # not a terminal (a log file, a notebook's captured output): one line per logged step
            line = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.desc} step {step}/{self.total}: {line}, {record['samples_per_sec']:.0f} samples/s",
                  file=sys.stderr, flush=True)
        self.sums, self.count, self.start = {}, 0, time.perf_counter()


def trim_metrics(path: Path, step: int) -> None:
    """Drop the records logged after `step`: a run killed between checkpoints redoes those steps on resume."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def write_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON object (one line) to metrics.jsonl."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train(config: TrainConfig, source: Any, workdir: str | Path, *, until_step: int | None = None) -> TrainState:
    """Train `config.stage` on `source` in `workdir`, resuming from its latest checkpoint; return the final state.

    Runs to `config.steps` (or stops early, with a checkpoint, after `until_step`). Raises ValueError on
    bad input before training and `NonFiniteLossError` (without saving) when the loss or the gradient
    norm is not finite, so no checkpoint ever holds non-finite params.
    """
    devices = jax.local_device_count()
    workdir = check_run(workdir, config, devices)
    arrays = load_arrays(source, config)
    write_config(workdir, config)
    train_idx, val_idx = split_indices(len(arrays["label"]), config.val_fraction)
    last = config.steps if until_step is None else min(until_step, config.steps)
    step_fn, log = compiled_step(config), _MetricLog(workdir / "metrics.jsonl", config)
    with checkpoint_manager(workdir, config) as manager:
        state = restore_or_init(manager, config)
        first = int(state.step)
        trim_metrics(log.path, first)
        replicated = flax.jax_utils.replicate(state)
        bar = tqdm(range(first, last), initial=first, total=log.total, desc=log.desc, disable=None,
                   dynamic_ncols=True)
        next_batch = lambda step: shard(training_batch(arrays, train_idx, config, step), devices)  # noqa: E731
        batch = next_batch(first) if first < last else None
        for step in bar:
            replicated, metrics = step_fn(replicated, batch)
            if step + 1 < last:
                batch = next_batch(step + 1)  # on the host while the devices run this step
            metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}  # waits for the step
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                raise NonFiniteLossError(
                    f"{config.stage}: loss is {metrics['loss']} at step {step + 1} (gradient norm "
                    f"{metrics['grad_norm']}); stopped, the last good checkpoint (step {manager.latest_step()}) "
                    f"is left in {workdir / 'checkpoints'}"
                )
            log.add(metrics)
            done = step + 1
            if done % config.log_interval == 0 or done == last:
                log.flush(done, bar)
            if len(val_idx) and (done % config.eval_interval == 0 or done == config.steps):
                params = flax.jax_utils.unreplicate(replicated).params
                write_metrics(log.path, {"step": done, "split": "val", **evaluate(params, arrays, val_idx, config)})
            if done % config.checkpoint_interval == 0 or done == last:
                state = flax.jax_utils.unreplicate(replicated)
                manager.save(done, args=ocp.args.StandardSave(_checkpoint_tree(state, config)))
        bar.close()
        manager.wait_until_finished()
    return jax.device_get(flax.jax_utils.unreplicate(replicated))


# ------------------------------------------------------------------------------------------------ CLI


def _flag_type(annotation: Any) -> Any:
    """argparse `type=` for a TrainConfig field annotation (tuples of floats as comma-separated lists)."""
    if annotation in ("tuple[float, ...]", tuple[float, ...]):
        return lambda text: tuple(float(x) for x in text.split(",") if x.strip())
    return {"int": int, "float": float, "str": str}.get(annotation, annotation)


def build_parser() -> argparse.ArgumentParser:
    """--stage, --data, --workdir, plus one flag per TrainConfig field (default: the stage's config)."""
    parser = argparse.ArgumentParser(prog="python -m mtcnn_jax.train", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--data", required=True, help="samples directory (read with mtcnn_jax.samples.load)")
    parser.add_argument("--workdir", required=True, help="run directory: config.json, metrics.jsonl, checkpoints/")
    for field in dataclasses.fields(TrainConfig):
        if field.name == "stage":
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, type=_flag_type(field.type), default=None, help=f"TrainConfig.{field.name}")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The stage's config from CONFIGS with every given flag replacing its field."""
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"stage"}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return dataclasses.replace(CONFIGS[args.stage], **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: train the stage on `--data`, reporting bad input and non-finite losses without a traceback."""
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    try:
        from mtcnn_jax import samples  # imported here: the trainer itself takes any sample source

        source = samples.load(args.data)
        train(config, source, args.workdir)
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
