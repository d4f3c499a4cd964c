"""A training run's folder (WORKDIR, `mtcnn_jax.train`): its files, and the checks that let a run start,
resume or stop there without losing or mixing work.

WORKDIR holds config.json (the run's TrainConfig), metrics.jsonl (one JSON object per logged step; "split":
"train" or "val") and checkpoints/ (an Orbax CheckpointManager directory of steps, each holding {"params",
"opt_state", "step", "rng"}, the checksums of its arrays and its provenance: the run config, the samples'
summary, the package version). The latest intact step is resumed; a damaged one is moved to
damaged_checkpoints/ with a warning (`checkpoint_integrity`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mtcnn_jax.checkpoint_integrity import CheckpointWarning, array_checksums, check_finite, restore_newest
from mtcnn_jax.stages import STAGES

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # where a resume moves the steps it cannot trust (kept, never deleted)


def run_stage(path: Path) -> str | None:
    """The stage of the training run in `path` (its config.json), None if it is not a run's folder."""
    fields = read_config(path)
    if fields is None:
        return None
    stage = fields.get("stage")
    if stage not in STAGES:
        raise ValueError(f"{path / CONFIG_FILE} is not a training run's config (stage {stage!r})")
    return stage


def read_config(workdir: str | Path) -> dict[str, Any] | None:
    """WORKDIR/config.json's fields, None if there is none; ValueError naming the file if it is damaged."""
    config = Path(workdir) / CONFIG_FILE
    if not config.is_file():
        return None
    text = config.read_text()
    try:
        fields = json.loads(text)
    except ValueError as err:
        what = "empty" if not text.strip() else f"not valid JSON ({err})"
        raise ValueError(f"{config} is damaged: {what}. Its checkpoints cannot be resumed without it: restore "
                         f"the file (each checkpoint's metadata records the run config) or use a new workdir") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{config} is not a training run's config (a JSON {type(fields).__name__})")
    return fields


def check_workdir(workdir: str | Path, stage: str, optimizer: str) -> Path:
    """`workdir` as a Path if a run of `stage` with `optimizer` can start or resume there (a new folder, or one
    holding such a run); else ValueError."""
    workdir = Path(workdir)
    checkpoints = workdir / CHECKPOINT_DIR
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f"--workdir {workdir} is a file, not a run's folder")
    previous = read_config(workdir)  # a damaged config.json: refused, naming it
    if previous is not None:
        run_stage(workdir)  # a config.json that is no run's: refused
        if previous.get("stage") != stage:
            raise ValueError(f"{workdir} holds a {previous.get('stage')} run ({CONFIG_FILE}); refusing to train "
                             f"{stage} there")
        previous_optimizer = previous.get("optimizer", "sgd")  # runs from before the flag were SGD
        if previous_optimizer != optimizer:
            raise ValueError(f"{workdir} holds a run with optimizer {previous_optimizer}: its checkpoints cannot "
                             f"resume with {optimizer}")
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise ValueError(f"{checkpoints} exists without {CONFIG_FILE}: cannot tell which stage it holds")
    return workdir


def write_config(workdir: Path, config: dict[str, Any]) -> None:
    """Save the run config as WORKDIR/config.json (rewritten on resume, e.g. with more steps), atomically:
    a crash leaves the old file or the new one, never a torn one."""
    workdir.mkdir(parents=True, exist_ok=True)
    partial = workdir / f".{CONFIG_FILE}.partial"
    partial.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(partial, workdir / CONFIG_FILE)


def checkpoint_manager(workdir: Path, max_to_keep: int) -> ocp.CheckpointManager:
    """Orbax manager of WORKDIR/checkpoints, keeping the last `max_to_keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager((Path(workdir) / CHECKPOINT_DIR).resolve(), options=options)


def state_tree(step: Any, params: Any, opt_state: Any, seed: int) -> dict[str, Any]:
    """The tree a training checkpoint holds: params, opt_state, step and the run's base rng key data."""
    rng = jax.random.key_data(jax.random.key(seed))
    return {"params": params, "opt_state": opt_state, "step": step, "rng": rng}


def save_state(manager: ocp.CheckpointManager, tree: dict[str, Any], provenance: dict[str, Any] | None = None) -> int:
    """Save a `state_tree` as the checkpoint of its step (written in the background; the manager waits on
    close), with its checksums and `provenance`; return the step. A tree with a non-finite value is never
    written (NonFiniteParamsError)."""
    host = jax.device_get(tree)
    step = int(host["step"])
    check_finite(host, f"the state at step {step}")
    metadata = {"checksums": array_checksums(host), "provenance": {**(provenance or {}), "step": step}}
    manager.save(step, args=ocp.args.StandardSave(host), custom_metadata=metadata)
    return step


def restore_state(workdir: Path, like: dict[str, Any]) -> dict[str, Any] | None:
    """The newest intact checkpoint's `state_tree` in WORKDIR/checkpoints, restored into the structure and
    dtypes of `like`; None if there is none. A damaged or non-finite step is moved to WORKDIR/damaged_checkpoints/
    with a one-line CheckpointWarning, and the step before it is tried."""
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, like)
    return restore_newest(Path(workdir) / CHECKPOINT_DIR, Path(workdir) / DAMAGED_DIR, target)


def write_metrics(workdir: Path, record: dict[str, Any]) -> None:
    """Append one JSON object (one line) to WORKDIR/metrics.jsonl."""
    with open(Path(workdir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(workdir: Path, step: int) -> None:
    """Drop the records logged after `step` (a run killed between checkpoints redoes those steps on resume),
    and a torn last line (a crash while it was written) with a CheckpointWarning; a damaged line before the
    last is refused (ValueError naming the file and line)."""
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept, torn = [], None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError) as err:
            if number < len(lines):
                raise ValueError(f"{path} line {number} is damaged ({type(err).__name__}: {err}): fix or remove "
                                 f"that line to resume") from None
            torn = line
            continue
        if record_step <= step:
            kept.append(line)
    if torn is not None:
        shown = torn if len(torn) <= 40 else torn[:37] + "..."
        warnings.warn(f"{path}: dropped its torn last line ({len(torn)} characters: {shown})", CheckpointWarning,
                      stacklevel=2)
    if len(kept) < len(lines) or torn is not None:
        partial = path.with_name(f".{METRICS_FILE}.partial")
        partial.write_text("".join(line + "\n" for line in kept))
        os.replace(partial, path)
