"""Train one MTCNN stage (P-, R- or O-Net) on prepared samples: the training loop and its command line.

    python -m mtcnn_jax.train --stage pnet --data SAMPLES_DIR --workdir DIR [--steps N] [--batch-size B] ...

Every other flag is a field of `train_config.TrainConfig` (`--learning-rate`, `--lr-decay-fractions
0.2,0.5,0.7`, `--no-...` for booleans; `--init-from RUN_OR_CHECKPOINT|original` fine-tunes). The samples are
read from the set as each step needs them (bounded memory, `input_pipeline`); `--in-memory` reads the whole
set once at start-up instead, for sets that fit. The data order, the flips and the dropout keys of step s are
a pure function of (seed, s), so a run resumed from a checkpoint ends exactly where an uninterrupted one does,
and streaming and in-memory runs give the same params.

WORKDIR holds config.json, metrics.jsonl and checkpoints/ (the layout is `checkpoints`'; the latest step is
resumed automatically, and a resumed run drops the metrics of the steps it redoes).
`checkpoints.load_params(WORKDIR)` reads the trained params back.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import flax.jax_utils
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from tqdm import tqdm

from mtcnn_jax import checkpoints, cli, input_pipeline
from mtcnn_jax.datasets import load_samples
from mtcnn_jax.train_config import CONFIGS, TrainConfig, check_config
from mtcnn_jax.train_step import TrainState, compiled_step, evaluate, init_state, make_optimizer, shard


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the run stops and the last good checkpoint is left in place."""


def restore_or_init(manager: ocp.CheckpointManager, config: TrainConfig) -> TrainState:
    """The latest checkpoint's state if there is one, else a fresh state (from `config.init_from` if set)."""
    fresh = init_state(config)
    like = checkpoints.state_tree(fresh.step, fresh.params, fresh.opt_state, config.seed)
    tree = checkpoints.restore_state(manager, like)
    if tree is not None:
        return TrainState(jnp.asarray(tree["step"]), tree["params"], tree["opt_state"])
    if config.init_from:
        params = checkpoints.initial_params(config.init_from, config.stage, fresh.params)
        return TrainState(fresh.step, params, make_optimizer(config).init(params))
    return fresh


class _MetricLog:
    """Running means of the train metrics between log steps: metrics.jsonl, and the progress bar or a stderr line."""

    def __init__(self, workdir: Path, config: TrainConfig) -> None:
        self.workdir, self.batch_size = workdir, config.batch_size
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
        checkpoints.write_metrics(self.workdir, record)
        shown = dict(loss=f"{record['loss']:.4f}", cls=f"{record['cls']:.4f}", box=f"{record['box']:.4f}",
                     acc=f"{record['accuracy']:.3f}")
        bar.set_postfix(shown)
        if bar.disable:  # not a terminal (a log file, a notebook's captured output): one line per logged step
            line = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.desc} step {step}/{self.total}: {line}, {record['samples_per_sec']:.0f} samples/s",
                  file=sys.stderr, flush=True)
        self.sums, self.count, self.start = {}, 0, time.perf_counter()


def train(config: TrainConfig, source: Any, workdir: str | Path, *, until_step: int | None = None,
          in_memory: bool = False) -> TrainState:
    """Train `config.stage` on `source` in `workdir`, resuming from its latest checkpoint; return the final state.

    Runs to `config.steps` (or stops early, with a checkpoint, after `until_step`). `source` is streamed, or
    read into memory first with `in_memory` (the same batches either way). Raises ValueError on bad input
    (before training for the config, the workdir and the first batch's worth of samples; a bad sample further
    on when its batch is read) and `NonFiniteLossError` (without saving) when the loss or the gradient norm
    is not finite, so no checkpoint ever holds non-finite params.
    """
    devices = jax.local_device_count()
    check_config(config, devices)
    workdir = checkpoints.check_workdir(workdir, config.stage, config.optimizer, config.init_from)
    samples = input_pipeline.open_samples(source, config, in_memory=in_memory)
    checkpoints.write_config(workdir, dataclasses.asdict(config))
    train_idx, val_idx = input_pipeline.split_indices(len(samples), config.val_fraction)
    last = config.steps if until_step is None else min(until_step, config.steps)
    step_fn, log = compiled_step(config), _MetricLog(workdir, config)

    def batch_of(step: int) -> dict:
        return shard(input_pipeline.training_batch(samples, train_idx, config, step), devices)

    with checkpoints.checkpoint_manager(workdir, config.max_checkpoints) as manager:
        state = restore_or_init(manager, config)
        first = int(state.step)
        checkpoints.trim_metrics(workdir, first)
        replicated = flax.jax_utils.replicate(state)
        bar = tqdm(range(first, last), initial=first, total=log.total, desc=log.desc, disable=None,
                   dynamic_ncols=True)
        with input_pipeline.Prefetch(batch_of, range(first, last)) as batches:  # prepared while the step runs
            for step, batch in zip(bar, batches):
                replicated, metrics = step_fn(replicated, batch)
                metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}  # waits for the step
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise NonFiniteLossError(
                        f"{config.stage}: loss is {metrics['loss']} at step {step + 1} (gradient norm "
                        f"{metrics['grad_norm']}); stopped, the last good checkpoint (step {manager.latest_step()}) "
                        f"is left in {workdir / checkpoints.CHECKPOINT_DIR}"
                    )
                log.add(metrics)
                done = step + 1
                if done % config.log_interval == 0 or done == last:
                    log.flush(done, bar)
                if len(val_idx) and (done % config.eval_interval == 0 or done == config.steps):
                    params = flax.jax_utils.unreplicate(replicated).params
                    val = evaluate(params, input_pipeline.eval_batches(samples, val_idx, config.batch_size), config)
                    checkpoints.write_metrics(workdir, {"step": done, "split": "val", **val})
                if done % config.checkpoint_interval == 0 or done == last:
                    state = flax.jax_utils.unreplicate(replicated)
                    checkpoints.save_state(manager, checkpoints.state_tree(state.step, state.params,
                                                                           state.opt_state, config.seed))
        bar.close()
        manager.wait_until_finished()
    return jax.device_get(flax.jax_utils.unreplicate(replicated))


# ------------------------------------------------------------------------------------------------ CLI


PROG = "python -m mtcnn_jax.train"


def float_list(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated numbers ("0.2,0.5,0.7"; "" for none)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.2,0.5,0.7, got {text!r}") from None


def _flag_type(annotation: Any) -> Any:
    """argparse `type=` for a TrainConfig field annotation (tuples of floats as comma-separated lists)."""
    if annotation in ("tuple[float, ...]", tuple[float, ...]):
        return float_list
    return {"int": int, "float": float, "str": str}.get(annotation, annotation)


def build_parser() -> argparse.ArgumentParser:
    """--stage, --data, --workdir, --in-memory, plus one flag per TrainConfig field (default: the stage's config)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--data", required=True, help="samples directory (read with mtcnn_jax.datasets.load_samples)")
    parser.add_argument("--workdir", required=True, help="run directory: config.json, metrics.jsonl, checkpoints/")
    parser.add_argument("--in-memory", action="store_true",
                        help="read the whole sample set into memory at start-up instead of streaming it")
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


@cli.entry(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: train the stage on `--data`. Every flag, the data folder and the workdir are checked before
    the samples are read; bad input and a non-finite loss end in one `error:` line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        parser.error(str(err))
    data = cli.existing_dir(args.data, "--data")
    cli.output_dir(args.workdir, "--workdir")
    checkpoints.check_workdir(args.workdir, config.stage, config.optimizer, config.init_from)
    try:
        train(config, load_samples(data), args.workdir, in_memory=args.in_memory)
    except NonFiniteLossError as err:  # the run's fault, not a bug: said in one line
        raise cli.CliError(str(err)) from err
    return 0


if __name__ == "__main__":
    sys.exit(main())
