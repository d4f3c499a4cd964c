"""The shards of a sample set (`python -m mtcnn_jax.samples ... --shard I/N`): which images each shard cuts,
where it is written, and the N shards read back as one set for training.

Shard I of N takes the images (and landmark faces) at positions I, I + N, ... of the whole run's lists, each
keeping the index, and so the seed, it has in the whole run; it is written to OUT/shard-I-of-N/.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

# TFDS and the input pipeline are reached through the lazy package: a spawned sample worker imports the
# samples CLI, and so this module, and must start light.
import mtcnn_jax

SHARD_FOLDER = "shard-{index}-of-{count}"  # where --shard I/N writes its part of the set, under --out


def check_shard(shard: tuple[int, int]) -> None:
    """ValueError unless shard is (index, count) with 0 <= index < count."""
    index, count = shard
    if not (isinstance(count, int) and isinstance(index, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"--shard {index}/{count}: expected I/N with 0 <= I < N, like 0/4")


def shard_jobs(jobs: list[dict], index: int, count: int) -> list[dict]:
    """Shard `index` of `count` of the jobs: those at positions index, index + count, ... of the whole run's
    list (its images, then its landmark faces), so that the shards share the images out evenly and
    each job keeps the index, and so the seed, it has in the whole run."""
    return jobs[index::count]


def shard_folders(directory: str | Path) -> list[Path]:
    """The shard folders (shard-I-of-N) under `directory`, in shard order ([] if none); ValueError if any
    of the N is missing or their Ns differ."""
    found = {}
    for path in Path(directory).glob(SHARD_FOLDER.format(index="*", count="*")):
        index, _, count = path.name.removeprefix("shard-").partition("-of-")
        if index.isdigit() and count.isdigit():
            found[int(index), int(count)] = path
    if not found:
        return []
    counts = sorted({count for _, count in found})
    if len(counts) > 1:
        raise ValueError(f"{directory} holds shards of different splits (of {counts}): keep one split per folder")
    missing = sorted(set(range(counts[0])) - {index for index, _ in found})
    if missing:
        raise ValueError(f"{directory} lacks shard {', '.join(map(str, missing))} of {counts[0]}: make it "
                         f"with --shard I/{counts[0]} before training on the set")
    return [found[k] for k in sorted(found)]


def load_sample_set(directory: str | Path) -> Any:
    """The sample set written under `directory` (`mtcnn_jax.datasets.load_samples`), or, if it holds the N
    shards of one (--shard), all of them read as one set in shard order."""
    shards = shard_folders(directory)
    if not shards:
        return mtcnn_jax.datasets.load_samples(directory)
    if (Path(directory) / "mtcnn_samples").exists():
        raise ValueError(f"{directory} holds a whole sample set (mtcnn_samples/) and shards of one: keep one of "
                         "them per folder")
    stages = {json.loads((s / "summary.json").read_text()).get("stage") for s in shards
              if (s / "summary.json").is_file()}
    if len(stages) > 1:
        raise ValueError(f"{directory}: its shards hold samples of different stages ({', '.join(sorted(stages))})")
    return mtcnn_jax.input_pipeline.ConcatSamples([mtcnn_jax.datasets.load_samples(s) for s in shards])


def parse_shard(text: str) -> tuple[int, int]:
    """argparse type: "I/N" -> (I, N)."""
    index, slash, count = text.partition("/")
    if not (slash and index.strip().isdigit() and count.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected I/N like 0/4 (shard I of N), got {text!r}")
    return int(index), int(count)
