"""What a checkpoint records about the samples it was trained on (its provenance): counts, and the summary
`samples.make_samples` wrote beside the sample set (or each of its shards)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mtcnn_jax import input_pipeline
from mtcnn_jax.sample_shards import shard_folders
from mtcnn_jax.stages import LABEL

SAMPLES_SUMMARY = "summary.json"  # what `samples.make_samples` writes beside a sample set
_SUMMARY_KEYS = ("stage", "size", "seed", "ratio", "square_faces", "images", "landmark_faces", "kept", "total",
                 "shard", "unreadable")  # the counts each checkpoint records from it (not its lists of skipped files)


def samples_summary(samples: Any, train_idx: np.ndarray, val_idx: np.ndarray,
                    path: str | Path | None = None) -> dict[str, Any]:
    """What each checkpoint records about its samples: the counts (all, train, val; per sample type when
    read into memory) and, trained from a sample set's folder, its path and its summary.json counts."""
    summary: dict[str, Any] = {"count": len(samples), "train": len(train_idx), "val": len(val_idx)}
    if isinstance(samples, input_pipeline.InMemorySamples):
        labels = samples.arrays["label"]
        summary["types"] = {name: int(np.sum(labels == label)) for name, label in LABEL.items()}
    if path is not None:
        summary["path"] = str(Path(path).resolve())
        shards = shard_folders(path)
        summary["sample_set"] = {"shards": [_written_summary(s) for s in shards]} if shards else _written_summary(path)
    return summary


def _written_summary(folder: str | Path) -> dict[str, Any]:
    """The counts of the summary.json `samples.make_samples` wrote in `folder` ({} if none)."""
    written = Path(folder) / SAMPLES_SUMMARY
    try:
        info = json.loads(written.read_text()) if written.is_file() else {}
    except (OSError, ValueError):
        info = {"unreadable": str(written)}
    return {k: v for k, v in info.items() if k in _SUMMARY_KEYS} if isinstance(info, dict) else {}
