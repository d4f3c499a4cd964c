"""What defines a training run of one stage: `TrainConfig`, the paper's per-stage settings (Zhang et al. 2016,
Sec. III-B: batch 384, loss weights det 1 / box 0.5 / landmark 0.5, or 1 for O-Net's landmarks), the
checks a config must pass before anything is trained or written (each field's range, when it is made) and
which fields a resumed run may change (`config_changes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from numbers import Integral, Real
from typing import Any, Callable

import numpy as np

from mtcnn_jax import losses, stages

OPTIMIZERS = ("sgd", "adam")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # a larger setting is inf inside the (float32) step


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run of one stage; each field is a CLI flag (`--batch-size` ...)."""

    stage: str
    input_size: int
    steps: int
    cls_weight: float
    box_weight: float
    landmark_weight: float
    landmark_norm: str = "l2"  # the landmark term's distance: "l2" (the paper's) or "l1" (losses.LANDMARK_NORMS)
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
    max_param_norm: float = 0.0  # stop when the params' global L2 norm exceeds this (0: no bound)

    def __post_init__(self) -> None:
        """ValueError naming the flag of the first field out of range: the API refuses what the CLI refuses."""
        if self.stage not in stages.INPUT_SIZE:
            raise ValueError(f"--stage {self.stage}: expected one of {', '.join(stages.STAGES)}")
        for name, (ok, expected) in _FIELD_CHECKS.items():
            value = getattr(self, name)
            if _number(value) and not abs(value) <= FLOAT32_MAX:
                raise ValueError(f"--{name.replace('_', '-')} {value}: beyond float32 (training computes in float32, "
                                 f"where it is inf): at most {FLOAT32_MAX:.3g}")
            if not ok(value):
                raise ValueError(f"--{name.replace('_', '-')} {value}: expected {expected}")
        for fraction in self.lr_decay_fractions:
            if not (_number(fraction) and 0 < fraction <= 1):
                raise ValueError(f"--lr-decay-fractions {','.join(map(str, self.lr_decay_fractions))}: expected "
                                 "fractions of the steps in (0, 1], like 0.2,0.5,0.7")
        if not self.cls_weight + self.box_weight + self.landmark_weight > 0:
            raise ValueError("--cls-weight, --box-weight, --landmark-weight: all 0, nothing to learn")
        if self.input_size != stages.INPUT_SIZE[self.stage]:
            raise ValueError(f"{self.stage} takes {stages.INPUT_SIZE[self.stage]}-pixel inputs, not {self.input_size}")

    @property
    def weights(self) -> losses.LossWeights:
        return losses.LossWeights(self.cls_weight, self.box_weight, self.landmark_weight)


def _number(value: Any) -> bool:
    """A finite real number (not a bool)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _count(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, Integral) and not isinstance(v, bool) and v >= low


def _within(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    return lambda v: _number(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


# field: (check, what the message says is expected); every field but stage, input_size and the lr decay.
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (_count(1), "an integer >= 1"),
    "cls_weight": (_within(0, math.inf, high_open=True), "a finite loss weight >= 0"),
    "box_weight": (_within(0, math.inf, high_open=True), "a finite loss weight >= 0"),
    "landmark_weight": (_within(0, math.inf, high_open=True), "a finite loss weight >= 0"),
    "landmark_norm": (lambda v: v in losses.LANDMARK_NORMS, f"one of {', '.join(losses.LANDMARK_NORMS)}"),
    "batch_size": (_count(1), "an integer >= 1"),
    "learning_rate": (_within(0, math.inf, low_open=True, high_open=True), "a finite number > 0"),
    "momentum": (_within(0, 1, high_open=True), "0 <= momentum < 1"),
    "optimizer": (lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    "weight_decay": (_within(0, math.inf, high_open=True), "a finite number >= 0"),
    "ohem_ratio": (_within(0, 1, low_open=True), "the share of samples kept by the loss, in (0, 1]"),
    "flip_probability": (_within(0, 1), "a probability in [0, 1]"),
    "color_jitter": (_within(0, 1, high_open=True), "0 <= j < 1 (factors in [1 - j, 1 + j])"),
    "blur_probability": (_within(0, 1), "a probability in [0, 1]"),
    "blur_sigma": (_within(0, math.inf, low_open=True, high_open=True), "a sigma > 0 (pixels)"),
    "log_interval": (_count(1), "an integer >= 1"),
    "eval_interval": (_count(1), "an integer >= 1"),
    "checkpoint_interval": (_count(1), "an integer >= 1"),
    "max_checkpoints": (_count(1), "an integer >= 1"),
    "seed": (_count(0), "an integer >= 0"),
    "val_fraction": (_within(0, 1, high_open=True), "0 <= fraction < 1"),
    "init_from": (lambda v: isinstance(v, str), "a run, a checkpoint folder or original"),
    "max_param_norm": (_within(0, math.inf, high_open=True), "a finite norm >= 0 (0: no bound)"),
}


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


def check_config(config: TrainConfig, devices: int) -> None:
    """ValueError unless the config can run on `devices`: a batch that divides over them (every field was
    checked when the config was made)."""
    if config.batch_size % devices:
        raise ValueError(f"batch size {config.batch_size} does not divide evenly over {devices} devices")


# What a resumed run may change without --allow-config-change: when it ends, logs and saves, not how it learns
# (more `steps` also moves the lr decay points, which is what extending a run means).
RESUME_FREE_FIELDS = ("steps", "log_interval", "eval_interval", "checkpoint_interval", "max_checkpoints",
                      "max_param_norm")


def config_changes(previous: dict[str, Any], config: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(field, old, new) for each field of `config` that differs from `previous` (a run's config.json); a field
    the old file lacks (written before the field existed) counts as its default, or is skipped if it has none."""
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # as config.json holds it: tuples as lists
    changes = []
    for field in dataclasses.fields(TrainConfig):
        if field.name in previous:
            old = previous[field.name]
        elif field.default is not dataclasses.MISSING:
            old = json.loads(json.dumps(field.default))
        else:
            continue
        if old != new[field.name]:
            changes.append((field.name, old, new[field.name]))
    return changes
