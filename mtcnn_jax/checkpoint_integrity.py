"""Checkpoints that can be trusted: a checksum of every array written with each checkpoint and verified when
it is read, parameters that are finite before a save and after a restore, and an Orbax checkpoint that
cannot be read said in one line (`DamagedCheckpointError`), never in a TensorStore traceback.

A checkpoint's Orbax custom metadata (its `_CHECKPOINT_METADATA` file, written atomically with the step)
holds {"checksums": {"algorithm": "sha256", "arrays": {"params/conv1/kernel": HEX, ...}}, "provenance":
{...}}; each digest covers an array's dtype, shape and bytes. A checkpoint without checksums (written before
they were, before 2026-12-02) is legacy: it is read unverified, not refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STEP_METADATA_FILE = "_CHECKPOINT_METADATA"  # Orbax's step metadata: where custom metadata lives
ITEM = "default"  # the item folder of a CheckpointManager step
CHECKSUM_ALGORITHM = "sha256"


class DamagedCheckpointError(ValueError):
    """A checkpoint that cannot be read, or whose arrays do not match their recorded checksums."""


class NonFiniteParamsError(ValueError):
    """Parameters (or optimizer state) holding NaN or inf: never saved, and refused when read."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint skipped (set aside) in favour of an older intact one."""


def leaf_name(path: tuple) -> str:
    """"params/conv1/kernel": the same name for a leaf of a tree as saved (tuples, namedtuples) and as Orbax
    restores it without a target (lists, dicts)."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def named_arrays(tree: Any) -> dict[str, np.ndarray]:
    """Every leaf of `tree` as a host numpy array, by `leaf_name`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {leaf_name(path): np.asarray(leaf) for path, leaf in leaves}


def _digest(array: np.ndarray) -> str:
    h = hashlib.new(CHECKSUM_ALGORITHM, f"{array.dtype.str}{array.shape}".encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def array_checksums(tree: Any) -> dict[str, Any]:
    """The checksums record of a tree: {"algorithm", "arrays": {leaf name: hex digest}}."""
    return {"algorithm": CHECKSUM_ALGORITHM, "arrays": {k: _digest(v) for k, v in named_arrays(tree).items()}}


def nonfinite_arrays(tree: Any) -> list[str]:
    """The names of the floating-point leaves of `tree` that hold a NaN or an inf."""
    return [k for k, v in named_arrays(tree).items() if np.issubdtype(v.dtype, np.inexact) and not np.isfinite(v).all()]


def check_finite(tree: Any, where: str) -> None:
    """NonFiniteParamsError naming `where` and the first arrays, unless every value of `tree` is finite."""
    bad = nonfinite_arrays(tree)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteParamsError(f"{where} holds non-finite values (NaN or inf) in {', '.join(bad[:3])}{more}")


def read_custom_metadata(directory: Path) -> dict[str, Any]:
    """The custom metadata of the checkpoint in `directory` ({} if it has none); DamagedCheckpointError if
    its metadata file is unreadable."""
    path = Path(directory) / STEP_METADATA_FILE
    if not path.exists():
        return {}
    try:
        custom = json.loads(path.read_text()).get("custom_metadata") or {}
    except (ValueError, AttributeError, OSError) as err:
        raise DamagedCheckpointError(f"{directory} is damaged: {path.name} is unreadable ({_first_line(err)})") from None
    if not isinstance(custom, dict):
        raise DamagedCheckpointError(f"{directory} is damaged: {path.name} holds no metadata object")
    return custom


def verify_checksums(tree: Any, custom: dict[str, Any], where: str) -> bool:
    """Check `tree` against the checksums in `custom` (a checkpoint's custom metadata): True when they match,
    False when none are recorded (a legacy checkpoint), DamagedCheckpointError naming the arrays otherwise."""
    recorded = custom.get("checksums")
    if not recorded:
        return False
    expected = recorded.get("arrays", {}) if isinstance(recorded, dict) else {}
    if not expected or recorded.get("algorithm") != CHECKSUM_ALGORITHM:
        raise DamagedCheckpointError(f"{where} is damaged: its checksum record is unreadable")
    actual = array_checksums(tree)["arrays"]
    bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise DamagedCheckpointError(f"{where} is damaged: {', '.join(bad[:3])}{more} do not match "
                                     "their recorded checksums")
    return True


def read_checkpoint(directory: Path, target: Any = None, where: str | None = None) -> Any:
    """An Orbax StandardCheckpointer tree from `directory` (into the structure and dtypes of `target`, if
    given); any failure to read it is one DamagedCheckpointError line naming `where` (default: `directory`),
    and TensorStore's late reports of the reads it abandoned stay quiet."""
    _quiet_abandoned_reads()
    reason = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        try:
            with ocp.StandardCheckpointer() as ckptr:
                return ckptr.restore(Path(directory).resolve(), target)
        except Exception as err:  # noqa: BLE001 - TensorStore, JSON, Orbax: all mean the files are damaged
            reason = f"{type(err).__name__}: {_first_line(err)}"
    raise DamagedCheckpointError(f"{where or directory} is damaged: Orbax cannot read it ({reason})")


def restore_verified(step_dir: Path, items_dir: Path, target: Any = None) -> tuple[Any, dict[str, Any]]:
    """The tree in `items_dir` and the custom metadata of `step_dir` (the same folder for a cascade, the
    step for a training checkpoint), checksums verified (legacy: none recorded, none checked) and every
    array finite; DamagedCheckpointError or NonFiniteParamsError otherwise."""
    custom = read_custom_metadata(step_dir)
    tree = read_checkpoint(items_dir, target, str(step_dir))
    verify_checksums(tree, custom, str(step_dir))
    check_finite(tree, str(step_dir))
    return tree, custom


UNUSABLE = (DamagedCheckpointError, NonFiniteParamsError)


def read_step(path: Path) -> tuple[Any, dict[str, Any]]:
    """The tree and custom metadata of a training step folder, its item folder, or a cascade checkpoint,
    verified (`restore_verified`)."""
    path = Path(path)
    if (path / ITEM).is_dir():
        return restore_verified(path, path / ITEM)
    if path.name == ITEM:  # a step's item folder: the step holds the metadata
        return restore_verified(path.parent, path)
    return restore_verified(path, path)


def saved_steps(checkpoints: Path) -> list[int]:
    """The finished steps of a CheckpointManager directory, oldest first ([] if it holds none)."""
    if not Path(checkpoints).is_dir():
        return []
    with ocp.CheckpointManager(Path(checkpoints).resolve(), options=ocp.CheckpointManagerOptions(create=False)) as m:
        return sorted(m.all_steps())


def newest_intact_hint(checkpoints: Path, below: int) -> str:
    """For an error message: the newest step before `below` that reads back intact."""
    for step in reversed([s for s in saved_steps(checkpoints) if s < below]):
        try:
            read_step(checkpoints / str(step))
        except UNUSABLE:
            continue
        return f"; the newest intact step is {checkpoints / str(step)}: pass it instead"
    return "; no older step is intact"


def restore_newest(checkpoints: Path, damaged: Path, target: Any) -> Any:
    """The tree of the newest step in `checkpoints` that reads back verified and finite, into `target`'s
    structure; None if none does. Each newer step that fails is moved into `damaged` (kept, never deleted)
    with a one-line CheckpointWarning (by process 0 alone, when several train together)."""
    for step in reversed(saved_steps(checkpoints)):
        try:
            return restore_verified(checkpoints / str(step), checkpoints / str(step) / ITEM, target)[0]
        except UNUSABLE as err:
            if jax.process_index() == 0:  # one process moves the shared folder; the others go on reading
                moved = _set_aside(checkpoints / str(step), damaged)
                warnings.warn(f"{err}; moved to {moved}, resuming from the step before it", CheckpointWarning,
                              stacklevel=3)
    return None


def _set_aside(step_dir: Path, damaged: Path) -> Path:
    """Move a step folder into `damaged` (a new name if that step was set aside before)."""
    damaged.mkdir(parents=True, exist_ok=True)
    target, k = damaged / step_dir.name, 1
    while target.exists():
        k += 1
        target = damaged / f"{step_dir.name}-{k}"
    os.replace(step_dir, target)
    return target


def _first_line(err: BaseException, limit: int = 160) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quiet_abandoned_reads() -> None:
    """When a read fails, Orbax closes its event loop while TensorStore still completes the reads it started;
    each then reports `RuntimeError: Event loop is closed` as an unraisable exception (a traceback on stderr).
    Those reports, and only those, are dropped: the failure itself is raised as DamagedCheckpointError."""
    if getattr(sys.unraisablehook, "quiets_abandoned_reads", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.quiets_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
