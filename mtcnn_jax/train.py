"""Train one MTCNN stage (P-, R- or O-Net) on prepared samples: the training loop and its command line.

    python -m mtcnn_jax.train --stage pnet --data SAMPLES_DIR --workdir DIR [--steps N] [--batch-size B] ...

Every other flag is a field of `train_config.TrainConfig` (`--learning-rate`, `--lr-decay-fractions
0.2,0.5,0.7`, `--no-...` for booleans; `--init-from RUN_OR_CHECKPOINT|original` fine-tunes). The samples are
read from the set as each step needs them (bounded memory, `input_pipeline`); `--in-memory` reads the whole
set once at start-up instead, for sets that fit. The data order, the flips and the dropout keys of step s are
a pure function of (seed, s), so a run resumed from a checkpoint ends exactly where an uninterrupted one does,
and streaming and in-memory runs give the same params.

WORKDIR holds config.json, metrics.jsonl and checkpoints/ (the layout is `run_dir`'s). Run again, the
latest intact step is resumed ("resumed from step N"; a damaged step is set aside with a warning, a torn
last metrics line dropped) and the metrics of the steps it redoes are dropped; a changed config field
(other than `train_config.RESUME_FREE_FIELDS`) is refused unless `--allow-config-change`. No checkpoint
holds a NaN or an inf: each step checks the updated state (and `--max-param-norm`) before it can be saved,
and a run that diverges stops naming the last step saved. Ctrl-C saves the current step and exits 130.
Each checkpoint records its run config, the samples' summary and the package version (its provenance).
`checkpoints.load_params(WORKDIR)` reads the trained params back.

On several processes or hosts (`--coordinator HOST:PORT --num-processes N --process-id I`, one command per
process, WORKDIR shared) each process reads its share of every batch and the step runs over all their
devices: the same params as one process with the same --batch-size (`distributed`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from tqdm import tqdm

from mtcnn_jax import __version__, checkpoints, cli, distributed, input_pipeline, run_dir
from mtcnn_jax.checkpoint_integrity import CheckpointWarning, saved_steps
from mtcnn_jax.sample_shards import load_sample_set as load_samples  # a sample set, or the N shards of one
from mtcnn_jax.provenance import samples_summary
from mtcnn_jax.train_config import CONFIGS, RESUME_FREE_FIELDS, TrainConfig, check_config, config_changes
from mtcnn_jax.train_step import (STATE_FINITE, TrainState, compiled_step, evaluate, global_batch, init_state,
                                  make_optimizer, replicate)



class NonFiniteLossError(FloatingPointError):
    """The loss, the gradient or the updated state became NaN/inf (or the params' norm passed
    `max_param_norm`): the run stops before that state can be saved. `last_good_step` is the newest
    checkpoint on disk (all finite), None if none was saved."""

    def __init__(self, message: str, last_good_step: int | None = None) -> None:
        super().__init__(message)
        self.last_good_step = last_good_step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised once the last checked state is saved: `saved_step` is on disk."""

    def __init__(self, message: str, saved_step: int | None) -> None:
        super().__init__(message)
        self.saved_step = saved_step


def restore_or_init(workdir: str | Path, config: TrainConfig) -> TrainState:
    """The newest intact checkpoint's state in `workdir` if there is one, else a fresh state (from
    `config.init_from` if set)."""
    fresh = init_state(config)
    like = run_dir.state_tree(fresh.step, fresh.params, fresh.opt_state, config.seed)
    tree = run_dir.restore_state(Path(workdir), like)
    if tree is not None:
        return TrainState(jnp.asarray(tree["step"]), tree["params"], tree["opt_state"])
    if config.init_from:
        params = checkpoints.initial_params(config.init_from, config.stage, fresh.params)
        return TrainState(fresh.step, params, make_optimizer(config).init(params))
    return fresh


def check_resume(workdir: str | Path, config: TrainConfig, allow_config_change: bool = False) -> list[tuple]:
    """The (field, old, new) changes from the config of the run `workdir` holds to `config` ([] when there
    is no checkpoint to resume); ValueError naming each change outside RESUME_FREE_FIELDS unless allowed."""
    previous = run_dir.read_config(workdir)
    if previous is None or not saved_steps(Path(workdir) / run_dir.CHECKPOINT_DIR):
        return []
    changes = config_changes(previous, config)
    guarded = [c for c in changes if c[0] not in RESUME_FREE_FIELDS]
    if guarded and not allow_config_change:
        raise ValueError(f"{workdir} holds a run with another config ({_changes_text(guarded)}): pass "
                         "--allow-config-change to resume it with the new values, or use a new --workdir")
    return changes


def _changes_text(changes: list[tuple]) -> str:
    return ", ".join(f"--{name.replace('_', '-')} {old} -> {new}" for name, old, new in changes)


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
        run_dir.write_metrics(self.workdir, record)
        shown = dict(loss=f"{record['loss']:.4f}", cls=f"{record['cls']:.4f}", box=f"{record['box']:.4f}",
                     acc=f"{record['accuracy']:.3f}")
        bar.set_postfix(shown)
        if bar.disable:  # not a terminal (a log file, a notebook's captured output): one line per logged step
            line = " ".join(f"{k} {v}" for k, v in shown.items())
            print(f"{self.desc} step {step}/{self.total}: {line}, {record['samples_per_sec']:.0f} samples/s",
                  file=sys.stderr, flush=True)
        self.sums, self.count, self.start = {}, 0, time.perf_counter()


def _unsafe(metrics: dict[str, float], step: int, config: TrainConfig) -> str | None:
    """Why the state after `step` must not be kept (a non-finite loss, gradient or state, a norm past the
    bound), or None."""
    loss, grad, norm = metrics["loss"], metrics["grad_norm"], metrics["param_norm"]
    if not (math.isfinite(loss) and math.isfinite(grad)):
        return f"loss is {loss} at step {step} (gradient norm {grad})"
    if metrics[STATE_FINITE] != 1.0:
        return (f"the parameters are not finite after step {step} (loss {loss:.4g}, gradient norm {grad:.4g}, "
                f"learning rate {metrics['learning_rate']:.3g})")
    if config.max_param_norm and not norm <= config.max_param_norm:
        return f"the parameters' norm {norm:.4g} exceeds --max-param-norm {config.max_param_norm:g} after step {step}"
    return None


def _saved_line(saved: int | None, workdir: Path) -> str:
    if saved is None:
        return "no checkpoint was saved before it"
    return f"the last checkpoint, step {saved} (all finite), is in {workdir / run_dir.CHECKPOINT_DIR}"


@contextlib.contextmanager
def _stop_after_step(desc: str) -> Any:
    """Yield `asked()`: True once Ctrl-C (SIGINT) was pressed. The first Ctrl-C only asks the loop to stop
    after the current step (an interrupt inside an XLA compile can crash the interpreter as it exits); a
    second one interrupts at once. Only in the main thread, over Python's own SIGINT handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    asked = threading.Event()

    def first_interrupt(signum: int, frame: Any) -> None:
        asked.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(f"{desc}: Ctrl-C: stopping after this step and saving it (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, first_interrupt)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train(config: TrainConfig, source: Any, workdir: str | Path, *, until_step: int | None = None,
          in_memory: bool = False, allow_config_change: bool = False,
          samples_path: str | Path | None = None) -> TrainState:
    """Train `config.stage` on `source` in `workdir`, resuming from its newest intact checkpoint; return the
    final state.

    Runs to `config.steps` (or stops early, with a checkpoint, after `until_step`). `source` is streamed, or
    read into memory first with `in_memory` (the same batches either way); `samples_path`, the folder it was
    read from, goes into each checkpoint's provenance. Raises ValueError on bad input (before training for
    the config, the workdir, a config change not allowed and the first batch's worth of samples; a bad sample
    further on when its batch is read); `NonFiniteLossError` when the loss, the gradient or the updated state
    is not finite, or the params' norm passes `max_param_norm` (that state unsaved, so no checkpoint ever
    holds non-finite params); `TrainingInterrupted` on Ctrl-C, once the last checked step is saved. On
    several processes (`distributed`) every process calls it alike; process 0 writes the run's files.
    """
    error = None
    try:  # every process's checks, then all start or all stop
        check_config(config, jax.device_count())
        distributed.check_devices()
        workdir = run_dir.check_workdir(workdir, config.stage, config.optimizer)
        checkpoints.check_init_from(config.init_from, config.stage)
        changes = check_resume(workdir, config, allow_config_change)
        samples = input_pipeline.open_samples(source, config, in_memory=in_memory)
    except (ValueError, OSError) as err:
        error = err
    distributed.agree_to_start(error)
    with _stop_after_step(f"train {config.stage}") as stop_asked:
        return _run(config, samples, workdir, changes, stop_asked, until_step=until_step, samples_path=samples_path)


def _run(config: TrainConfig, samples: Any, workdir: Path, changes: list[tuple], stop_asked: Any, *,
         until_step: int | None, samples_path: str | Path | None) -> TrainState:
    """`train` once its checks are done: the loop, with Ctrl-C (`stop_asked` on any process, or a
    KeyboardInterrupt) saving the last checked step. Process 0 alone writes config.json and metrics and shows
    the progress; every process takes part in the step and in Orbax's saves and restores."""
    index, count = distributed.process()
    primary = distributed.is_primary()
    train_idx, val_idx = input_pipeline.split_indices(len(samples), config.val_fraction)
    provenance = {"config": dataclasses.asdict(config), "version": __version__,
                  "samples": samples_summary(samples, train_idx, val_idx, samples_path)}
    if count > 1:
        provenance["processes"] = count
    if primary:
        run_dir.write_config(workdir, dataclasses.asdict(config))
    last = config.steps if until_step is None else min(until_step, config.steps)
    step_fn, log = compiled_step(config), _MetricLog(workdir, config)

    def batch_of(step: int) -> dict:  # this process's rows of the step's batch
        return input_pipeline.process_batch(samples, train_idx, config, step, index, count)

    def stop() -> bool:
        return distributed.any_process(stop_asked()) if count > 1 else stop_asked()

    state = restore_or_init(workdir, config)
    distributed.barrier("mtcnn_jax.train: restored")  # no process lists checkpoints/ while another creates it
    first = int(state.step)
    if first and primary:
        note = f"; config changed: {_changes_text(changes)}" if changes else ""
        print(f"{log.desc}: resumed from step {first} of {workdir / run_dir.CHECKPOINT_DIR}{note}",
              file=sys.stderr, flush=True)
    if primary:
        run_dir.trim_metrics(workdir, first)
    with run_dir.checkpoint_manager(workdir, config.max_checkpoints) as manager:
        saved = manager.latest_step()
        good = replicate(state)  # the newest state checked finite: the only one ever saved
        bar = tqdm(range(first, last), initial=first, total=log.total, desc=log.desc,
                   disable=None if primary else True, dynamic_ncols=True)
        try:
            if stop():
                raise KeyboardInterrupt
            with input_pipeline.Prefetch(batch_of, range(first, last)) as batches:  # prepared while a step runs
                for step, batch in zip(bar, batches):
                    replicated, metrics = step_fn(good, global_batch(batch, config.batch_size))
                    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for the step
                    unsafe = _unsafe(metrics, step + 1, config)
                    if unsafe:
                        raise NonFiniteLossError(f"{config.stage}: {unsafe}; stopped, {_saved_line(saved, workdir)}",
                                                 saved)
                    good, done = replicated, step + 1
                    del metrics[STATE_FINITE]
                    log.add(metrics)
                    if primary and (done % config.log_interval == 0 or done == last):
                        log.flush(done, bar)
                    if primary and len(val_idx) and (done % config.eval_interval == 0 or done == config.steps):
                        params = jax.device_get(good.params)  # host copies: process 0 evaluates alone
                        val = evaluate(params, input_pipeline.eval_batches(samples, val_idx, config.batch_size), config)
                        run_dir.write_metrics(workdir, {"step": done, "split": "val", **val})
                    if done % config.checkpoint_interval == 0 or done == last:
                        saved = _save(manager, good, config, provenance)
                    if stop():
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            at = int(jax.device_get(good.step))
            if at and at != manager.latest_step():
                saved = _save(manager, good, config, provenance)
            manager.wait_until_finished()
            where = f"saved step {saved} in {workdir / run_dir.CHECKPOINT_DIR}" if saved else "nothing saved"
            raise TrainingInterrupted(f"stopped after step {at}, {where}; run the same command again to resume",
                                      saved) from None
        bar.close()
        manager.wait_until_finished()
    return jax.device_get(good)


def _save(manager: Any, replicated: TrainState, config: TrainConfig, provenance: dict[str, Any]) -> int:
    state = jax.device_get(replicated)  # the same host values on every process; Orbax writes them once
    tree = run_dir.state_tree(state.step, state.params, state.opt_state, config.seed)
    return run_dir.save_state(manager, tree, provenance)


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
    """--stage, --data, --workdir, --in-memory, --allow-config-change, plus one flag per TrainConfig field
    (default: the stage's config)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, choices=sorted(CONFIGS))
    parser.add_argument("--data", required=True, help="samples directory (read with mtcnn_jax.sample_shards.load_sample_set: "
                                                      "one set, or the N shards of one)")
    parser.add_argument("--workdir", required=True, help="run directory: config.json, metrics.jsonl, checkpoints/")
    parser.add_argument("--in-memory", action="store_true",
                        help="read the whole sample set into memory at start-up instead of streaming it")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run whose config.json differs in a field that changes how it learns "
                             "(the changes are listed on resume)")
    distributed.add_flags(parser)
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


@contextlib.contextmanager
def _one_line_warnings() -> Any:
    """CheckpointWarnings (a damaged step set aside, a torn metrics line dropped) as `PROG: warning: ...` lines."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", CheckpointWarning)
        warnings.showwarning = lambda message, *_, **__: print(f"{PROG}: warning: {message}", file=sys.stderr)
        yield


@cli.entry(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: train the stage on `--data`. Every flag, the data folder, the workdir and a resume's config
    changes are checked before the samples are read; bad input and a diverged run end in one `error:` line,
    Ctrl-C in one line naming the step saved (exit 130)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
        processes = distributed.check_flags(args.coordinator, args.num_processes, args.process_id)
    except ValueError as err:
        parser.error(str(err))
    if processes is not None:
        distributed.initialize(*processes)
    data = cli.existing_dir(args.data, "--data")
    cli.output_dir(args.workdir, "--workdir")
    run_dir.check_workdir(args.workdir, config.stage, config.optimizer)
    checkpoints.check_init_from(config.init_from, config.stage)
    check_resume(args.workdir, config, args.allow_config_change)
    try:
        with _one_line_warnings():
            train(config, load_samples(data), args.workdir, in_memory=args.in_memory,
                  allow_config_change=args.allow_config_change, samples_path=data)
    except NonFiniteLossError as err:  # the run's fault, not a bug: said in one line
        raise cli.CliError(str(err)) from err
    except TrainingInterrupted as err:
        print(f"{PROG}: interrupted: {err}", file=sys.stderr)
        return cli.INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
