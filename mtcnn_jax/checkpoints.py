"""Orbax checkpoints of MTCNN params: the three stages together (a "cascade"), as the detector reads them.

A cascade checkpoint is an Orbax StandardCheckpointer directory holding the tree
{"pnet": ..., "rnet": ..., "onet": ...} of plain arrays, the same trees `nets.init_params` and
`pretrained.load_pretrained` give. Restored leaves are numpy arrays: no training objects needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

STAGES = ("pnet", "rnet", "onet")


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
