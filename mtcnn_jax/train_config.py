"""What defines a training run of one stage: `TrainConfig`, the paper's per-stage settings (Zhang et al. 2016,
Sec. III-B: batch 384, loss weights det 1 / box 0.5 / landmark 0.5, or 1 for O-Net's landmarks) and the
checks a config must pass before anything is trained or written.
"""

from __future__ import annotations

import dataclasses

from mtcnn_jax import losses, stages

OPTIMIZERS = ("sgd", "adam")


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


def check_config(config: TrainConfig, devices: int) -> None:
    """ValueError unless the config can run: a batch that divides over the devices, a known optimizer,
    augmentations in range, the stage's input size."""
    if config.batch_size % devices:
        raise ValueError(f"batch size {config.batch_size} does not divide evenly over {devices} devices")
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer {config.optimizer}: expected one of {', '.join(OPTIMIZERS)}")
    if not 0 <= config.color_jitter < 1:
        raise ValueError(f"--color-jitter {config.color_jitter}: expected 0 <= j < 1 (factors in [1 - j, 1 + j])")
    if not (0 <= config.blur_probability <= 1 and config.blur_sigma > 0):
        raise ValueError(f"--blur-probability {config.blur_probability} / --blur-sigma {config.blur_sigma}: "
                         "expected a probability in [0, 1] and a sigma > 0")
    if config.input_size != stages.INPUT_SIZE[config.stage]:
        raise ValueError(f"{config.stage} takes {stages.INPUT_SIZE[config.stage]}-pixel inputs, not {config.input_size}")
