"""MTCNN params on disk: cascade checkpoints, loading one stage's params from a training run or a checkpoint,
and assembling the cascade the detector reads from trained stages and the original weights.

A cascade checkpoint is an Orbax StandardCheckpointer directory holding the tree
{"pnet": ..., "rnet": ..., "onet": ...} of plain arrays, the same trees `nets.init_params` and
`pretrained.load_pretrained` give. Restored leaves are numpy arrays: no training objects needed. Its custom
metadata holds the checksums of its arrays and the provenance of each stage (`load_cascade(...,
with_provenance=True)`); one written before those were recorded loads unverified. A training run's folder
is `run_dir`'s. Every read verifies the checksums (where recorded) and refuses non-finite parameters
(`checkpoint_integrity`).

    python -m mtcnn_jax.checkpoints --out DIR [--pnet RUN ...] [--rnet RUN ...] [--onet RUN ...] [--source WHEEL]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mtcnn_jax import __version__, cli
from mtcnn_jax.checkpoint_integrity import (ITEM, UNUSABLE, array_checksums, check_finite, newest_intact_hint,
                                            read_step, restore_verified, saved_steps)
from mtcnn_jax.nets import param_count
from mtcnn_jax.pretrained import WHEEL_NAME, load_pretrained
from mtcnn_jax.run_dir import CHECKPOINT_DIR, run_stage
from mtcnn_jax.stages import STAGES

METADATA_FILE = "_METADATA"  # what Orbax writes in every checkpoint (a cascade's or a step's "default" item)
PROG = "python -m mtcnn_jax.checkpoints"

# ------------------------------------------------------------------------------------ cascade checkpoints


def save_cascade(directory: str | Path, params: dict[str, Any], *, force: bool = False,
                 provenance: dict[str, Any] | None = None) -> Path:
    """Write the three stages' params as one Orbax checkpoint in `directory` (must not exist unless force),
    with their checksums and `provenance` (as `cascade_params` gives it) in its metadata. Non-finite params
    are refused (NonFiniteParamsError)."""
    missing = [s for s in STAGES if s not in params]
    if missing:
        raise ValueError(f"save_cascade needs params for {STAGES}; missing {missing}")
    path = Path(directory).resolve()
    tree = {s: jax.tree_util.tree_map(np.asarray, params[s]) for s in STAGES}
    for stage in STAGES:
        check_finite(tree[stage], f"{stage} params")
    metadata = {"checksums": array_checksums(tree), "provenance": provenance or {}}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=force, custom_metadata=metadata)
        ckptr.wait_until_finished()
    return path


def load_cascade(directory: str | Path, *, with_provenance: bool = False) -> Any:
    """Read a checkpoint written by `save_cascade` (or `python -m mtcnn_jax.checkpoints --out`): its checksums
    verified (if it records them) and its params finite, else DamagedCheckpointError / NonFiniteParamsError.
    With `with_provenance`, (params, provenance) ({} for a cascade that records none)."""
    path = Path(directory).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not (path / METADATA_FILE).is_file():
        raise ValueError(f"{path} is not a cascade checkpoint (no Orbax {METADATA_FILE}; write one with {PROG} --out)")
    tree, custom = restore_verified(path, path)
    missing = [s for s in STAGES if s not in tree]
    if missing:
        raise ValueError(f"{path} is not a cascade checkpoint: it has {sorted(tree)}, missing {missing}")
    params = {s: _numpy(tree[s]) for s in STAGES}
    return (params, custom.get("provenance") or {}) if with_provenance else params


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def check_params_source(path: str | Path, stage: str, flag: str) -> Path:
    """`path` if it can hold `stage`'s params: a folder that is a run of that stage, a checkpoints/ folder,
    a step or a cascade checkpoint (by its layout; the arrays are read later). ValueError naming `flag`."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{flag} {path}: no training run or checkpoint folder there")
    trained = run_stage(path)
    if trained is not None and trained != stage:
        raise ValueError(f"{path} is a {trained} training run, not {stage}")
    steps = any(p.name.isdigit() for p in path.iterdir())
    if trained is None and not steps and not any((path / d / METADATA_FILE).is_file() for d in (".", ITEM)):
        raise ValueError(f"{flag} {path}: not a training run, a checkpoints folder or an Orbax checkpoint")
    return path


def load_stage(path: str | Path, stage: str | None = None) -> tuple[Any, dict[str, Any]]:
    """`load_params`' params and where they came from: {"checkpoint": the step or cascade folder, "step"
    (a training step's), and the provenance it records (a step's: "config", "samples", "version"; a cascade's:
    that stage's)}."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint or training directory at {path}")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    trained = run_stage(path)
    if trained is not None:
        if stage is not None and stage != trained:
            raise ValueError(f"{path} is a {trained} training run, not {stage}")
        path = path / CHECKPOINT_DIR
    steps = saved_steps(path) if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()) else None
    if steps is not None:
        if not steps:
            raise FileNotFoundError(f"{path} holds no finished checkpoint")
        try:
            tree, custom = read_step(path / str(steps[-1]))
        except UNUSABLE as err:
            raise type(err)(f"{err}{newest_intact_hint(path, steps[-1])}") from None
        path = path / str(steps[-1])
    else:
        tree, custom = read_step(path)
    recorded = custom.get("provenance") or {}
    source = {"checkpoint": str(path.resolve())}
    if "params" in tree:
        return _numpy(tree["params"]), {**source, "step": int(np.asarray(tree["step"])), **recorded}
    if stage is None:
        raise ValueError(f"{path} is a cascade checkpoint ({sorted(tree)}): pass stage= to pick one")
    if stage not in tree:
        raise ValueError(f"{path} has no {stage} params (it has {sorted(tree)})")
    return _numpy(tree[stage]), {**source, **recorded.get("stages", {}).get(stage, {})}


def load_params(path: str | Path, stage: str | None = None) -> Any:
    """One stage's params as plain numpy dicts, from a training WORKDIR (its latest step; the stage comes
    from its config.json), its checkpoints/ folder, one step folder, or a cascade checkpoint (needs `stage`).
    Checksums are verified where recorded and the params must be finite: a damaged or non-finite latest step
    is refused (DamagedCheckpointError / NonFiniteParamsError, naming the newest intact step), never replaced.
    """
    return load_stage(path, stage)[0]


def _shapes(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.shape, tree)


def average_params(trees: Sequence[Any]) -> Any:
    """The leaf-wise mean of several param trees of one stage (a uniform "model soup", Wortsman et al. 2022).

    Meaningful for runs fine-tuned from the same params (one loss basin), where the mean often generalises
    better than any one of them; trees of different structure or shapes are refused."""
    trees = list(trees)
    if not trees:
        raise ValueError("no params to average")
    shapes = [_shapes(tree) for tree in trees]
    if any(other != shapes[0] for other in shapes[1:]):
        raise ValueError("cannot average params of different structures or shapes")
    return jax.tree_util.tree_map(lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(leaves[0].dtype), *trees)


def cascade_with_provenance(stages: dict[str, Any],
                            source: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`cascade_params`' params, and their provenance: {"version", "stages": {stage: {"sources": [...],
    "averaged"}}}, each source a `load_stage` record or {"original": the released weights' wheel}."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {STAGES}")
    params = load_pretrained(source) if len(stages) < len(STAGES) else {}
    provenance = {s: {"sources": [{"original": WHEEL_NAME}], "averaged": False} for s in STAGES if s not in stages}
    for stage, paths in stages.items():
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        loaded = []
        for path in paths:
            try:
                loaded.append(load_stage(path, stage))
            except UNUSABLE as err:
                raise type(err)(f"{stage} from {path}: {err}") from None
        params[stage] = average_params([p for p, _ in loaded])
        provenance[stage] = {"sources": [where for _, where in loaded], "averaged": len(loaded) > 1}
    return params, {"version": __version__, "stages": {s: provenance[s] for s in STAGES}}


def cascade_params(stages: dict[str, Any], source: str | Path | None = None) -> dict[str, Any]:
    """The three stages' params from trained stages ({stage: training WORKDIR or checkpoint, or a list of them,
    whose params are averaged}) and the original released weights (read from `source`, see
    `pretrained.load_pretrained`) for the stages not given."""
    return cascade_with_provenance(stages, source)[0]


def assemble_cascade(out: str | Path, stages: dict[str, Any], *, force: bool = False,
                     source: str | Path | None = None) -> Path:
    """A cascade checkpoint at `out` of `cascade_params(stages, source)`, with its provenance: what mining
    the next stage and `detect` read."""
    params, provenance = cascade_with_provenance(stages, source)
    return save_cascade(out, params, force=force, provenance=provenance)


def initial_params(init_from: str, stage: str, fresh: Any) -> Any:
    """The params `init_from` names (a training WORKDIR, a checkpoint directory, or "original" for the released
    weights), checked against the tree of `fresh` params: the start of a fine-tuning run."""
    params = load_pretrained()[stage] if init_from == "original" else load_params(init_from, stage)
    want, got = _shapes(fresh), _shapes(params)
    if got != want:
        raise ValueError(f"--init-from {init_from}: not {stage} params (shapes {got}, expected {want})")
    return jax.tree_util.tree_map(jnp.asarray, params)


def check_init_from(init_from: str, stage: str) -> None:
    """Refuse an `init_from` that is neither "" (no fine-tuning), "original" nor a folder that can hold `stage`'s
    params (`check_params_source`), before any training starts."""
    if init_from not in ("", "original"):
        check_params_source(init_from, stage, "--init-from")


# ----------------------------------------------------------------------------------------------- CLI


def check_cli_paths(args: argparse.Namespace) -> dict[str, list[str]]:
    """The CLI's stages {stage: [RUN ...]} once every path is checked (before any weights are read):
    each RUN a run of that stage or a checkpoint, --source present, --out a new folder (or --force)."""
    stages = {s: getattr(args, s) for s in STAGES if getattr(args, s)}
    for stage, paths in stages.items():
        for path in paths:
            check_params_source(path, stage, f"--{stage}")
    if args.source is not None and not Path(args.source).expanduser().exists():
        raise cli.CliError(f"--source {args.source} does not exist (a {WHEEL_NAME} or a folder of the .lz4 files)")
    out = cli.output_dir(args.out, "--out")
    if out.exists() and not args.force:
        raise cli.CliError(f"--out {out} exists: pass --force to overwrite it, or pick another folder")
    return stages


@cli.entry(PROG)
def main(argv: list[str] | None = None) -> int:
    """CLI: a cascade checkpoint from training runs and the original weights (all of them when no stage is
    given), with each stage's provenance. A stage whose checkpoint is damaged (checksums) or not finite is
    refused in one `error:` line, before anything is written."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Write a cascade checkpoint (the format detect --weights and samples --weights read) from "
                    "training runs; stages not given keep the original released weights (so with none given, "
                    "it writes the original weights).")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    for stage in STAGES:
        p.add_argument(f"--{stage}", nargs="+", metavar="RUN",
                       help=f"{stage} training WORKDIR (latest step) or checkpoint directory; several: their mean")
    p.add_argument("--source", default=None,
                   help=f"where the original weights are read from: a {WHEEL_NAME} or a folder with the .lz4 files")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    args = p.parse_args(argv)
    stages = check_cli_paths(args)
    params, provenance = cascade_with_provenance(stages, args.source)
    path = save_cascade(args.out, params, force=args.force, provenance=provenance)
    sources = {s: " + ".join(map(str, v)) + (" (mean)" if len(v) > 1 else "") for s, v in stages.items()}
    counts = ", ".join(f"{s} {param_count(params[s]):,}" for s in STAGES)
    print(f"wrote {path}: " + ", ".join(f"{s} from {sources.get(s, 'the original weights')}" for s in STAGES)
          + f" (params: {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
