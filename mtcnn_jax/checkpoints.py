"""Orbax checkpoints of MTCNN params: the three stages together (a "cascade"), as the detector reads them.

A cascade checkpoint is an Orbax StandardCheckpointer directory holding the tree
{"pnet": ..., "rnet": ..., "onet": ...} of plain arrays, the same trees `nets.init_params` and
`pretrained.load_pretrained` give. Restored leaves are numpy arrays: no training objects needed.

`load_params` also reads one stage's params from a training run (`mtcnn_jax.train`): a WORKDIR with
config.json and checkpoints/ (an Orbax CheckpointManager directory of steps, each holding
{"params", "opt_state", "step", "rng"}).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from mtcnn_jax.stages import STAGES



def save_cascade(directory: str | Path, params: dict[str, Any], *, force: bool = False) -> Path:
    """Write the three stages' params as one Orbax checkpoint in `directory` (must not exist unless force)."""
    missing = [s for s in STAGES if s not in params]
    if missing:
        raise ValueError(f"save_cascade needs params for {STAGES}; missing {missing}")
    path = Path(directory).resolve()
    tree = {s: jax.tree_util.tree_map(np.asarray, params[s]) for s in STAGES}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree, force=force)
        ckptr.wait_until_finished()
    return path


def load_cascade(directory: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `save_cascade` (or `python -m mtcnn_jax.pretrained --out`)."""
    path = Path(directory).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        tree = ckptr.restore(path)
    missing = [s for s in STAGES if s not in tree]
    if missing:
        raise ValueError(f"{path} is not a cascade checkpoint: it has {sorted(tree)}, missing {missing}")
    return {s: jax.tree_util.tree_map(np.asarray, tree[s]) for s in STAGES}


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _latest_step_dir(checkpoints: Path) -> Path | None:
    """The newest step folder of a CheckpointManager directory, or None if it holds no steps."""
    with ocp.CheckpointManager(checkpoints.resolve(), options=ocp.CheckpointManagerOptions(create=False)) as manager:
        step = manager.latest_step()
    return None if step is None else checkpoints / str(step)


def _restore_standard(path: Path) -> dict[str, Any]:
    """An Orbax StandardCheckpointer tree (a step's "default" item or a cascade checkpoint), as saved."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path.resolve())


def load_params(path: str | Path, stage: str | None = None) -> Any:
    """One stage's params as plain numpy dicts, from a training WORKDIR (its latest step; the stage comes
    from its config.json), its checkpoints/ folder, one step folder, or a cascade checkpoint (needs `stage`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint or training directory at {path}")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
    config = path / "config.json"
    if config.is_file():
        trained = json.loads(config.read_text()).get("stage")
        if stage is not None and stage != trained:
            raise ValueError(f"{path} is a {trained} training run, not {stage}")
        path = path / "checkpoints"
    if path.is_dir() and any(p.name.isdigit() for p in path.iterdir()):
        latest = _latest_step_dir(path)
        if latest is None:
            raise FileNotFoundError(f"{path} holds no finished checkpoint")
        path = latest
    if (path / "default").is_dir():
        path = path / "default"
    tree = _restore_standard(path)
    if "params" in tree:
        return _numpy(tree["params"])
    if stage is None:
        raise ValueError(f"{path} is a cascade checkpoint ({sorted(tree)}): pass stage= to pick one")
    if stage not in tree:
        raise ValueError(f"{path} has no {stage} params (it has {sorted(tree)})")
    return _numpy(tree[stage])


def average_params(trees: Sequence[Any]) -> Any:
    """The leaf-wise mean of several param trees of one stage (a uniform "model soup", Wortsman et al. 2022).

    Meaningful for runs fine-tuned from the same params (one loss basin), where the mean often generalises
    better than any one of them; trees of different structure or shapes are refused."""
    trees = list(trees)
    if not trees:
        raise ValueError("no params to average")
    shapes = [jax.tree_util.tree_map(np.shape, tree) for tree in trees]  # as train.initial_params checks trees
    if any(other != shapes[0] for other in shapes[1:]):
        raise ValueError("cannot average params of different structures or shapes")
    return jax.tree_util.tree_map(lambda *leaves: np.mean(np.stack(leaves), axis=0).astype(leaves[0].dtype), *trees)


def assemble_cascade(out: str | Path, stages: dict[str, Any], *, force: bool = False) -> Path:
    """A cascade checkpoint at `out` from trained stages ({stage: training WORKDIR or checkpoint, or a list of
    them, whose params are averaged}) and the original released weights for the stages not given: what mining
    the next stage and `detect` read."""
    from mtcnn_jax.pretrained import load_pretrained

    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {STAGES}")
    params = load_pretrained() if len(stages) < len(STAGES) else {}
    for stage, paths in stages.items():
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        params[stage] = average_params([load_params(path, stage) for path in paths])
    return save_cascade(out, params, force=force)


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m mtcnn_jax.checkpoints --out DIR [--pnet RUN ...] [--rnet RUN ...] [--onet RUN ...] [--force]."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m mtcnn_jax.checkpoints",
        description="Assemble a cascade checkpoint (the format detect --weights and samples --weights read) "
                    "from training runs; stages not given keep the original released weights.")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    for stage in STAGES:
        p.add_argument(f"--{stage}", nargs="+", metavar="RUN",
                       help=f"{stage} training WORKDIR (latest step) or checkpoint directory; several: their mean")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    args = p.parse_args(argv)
    stages = {s: getattr(args, s) for s in STAGES if getattr(args, s)}
    try:
        path = assemble_cascade(args.out, stages, force=args.force)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    sources = {s: " + ".join(map(str, v)) + (" (mean)" if len(v) > 1 else "") for s, v in stages.items()}
    print(f"wrote {path}: " + ", ".join(f"{s} from {sources.get(s, 'the original weights')}" for s in STAGES))


if __name__ == "__main__":
    main()
