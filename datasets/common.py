"""What the dataset builders share: counting skipped inputs, building without TensorFlow, reading back."""

from __future__ import annotations

import functools
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import tensorflow_datasets as tfds
from PIL import Image


@dataclass
class Skipped:
    """Inputs left out, by reason, with the first few names of each: nothing is lost silently."""

    counts: Counter = field(default_factory=Counter)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str, keep: int = 5) -> None:
        self.counts[reason] += 1
        first = self.names.setdefault(reason, [])
        if len(first) < keep:
            first.append(name)

    def merge(self, other: Skipped, keep: int = 5) -> None:
        """Add another count's inputs to this one (the first `keep` names of each reason)."""
        for reason, n in other.counts.items():
            self.counts[reason] += n
            self.names[reason] = (self.names.get(reason, []) + other.names[reason])[:keep]

    def report(self) -> str:
        return "; ".join(f"{n} {r} (first: {', '.join(self.names[r])})" for r, n in self.counts.items())

    def as_dict(self) -> dict[str, dict]:
        return {"counts": dict(self.counts), "names": self.names}

    @classmethod
    def from_dict(cls, d: dict[str, dict]) -> Skipped:
        return cls(Counter(d["counts"]), {r: list(names) for r, names in d["names"].items()})


class ManualBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
    """A builder that reads files from a manual directory into array_record (no TensorFlow needed).

    Records keep the order of the annotation lists (a reader's first N are the first N listed that could
    be read) and are written shard by shard as they are read, so a full WIDER FACE or CelebA never sits in
    memory. `max_images` keeps the first N entries of each split (tests). `skipped[split]` counts the bad
    entries; it is kept in the dataset's metadata, so a builder of an already built dataset has it too.
    Subclasses give `_inputs` (per split: image folder and entries) and `_example` (one entry's record).
    """

    SHARD_INPUTS = 1000  # entries per shard

    def __init__(self, *, max_images: int | None = None, **kwargs):
        self.max_images = max_images
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        built = (self.info.metadata or {}).get("skipped", {})
        self.skipped: dict[str, Skipped] = {split: Skipped.from_dict(d) for split, d in built.items()}

    def _inputs(self, manual_dir: Path) -> dict[str, tuple[Path, list[dict]]]:
        raise NotImplementedError

    def _example(self, image_dir: Path, entry: dict, skipped: Skipped) -> dict | None:
        raise NotImplementedError

    def _shard_iterators_per_split(self, dl_manager):
        shards = {}
        for split, (image_dir, entries) in self._inputs(Path(dl_manager.manual_dir)).items():
            entries, skipped = entries[: self.max_images], self.skipped.setdefault(split, Skipped())
            shards[split] = [functools.partial(self._shard, image_dir, entries[a : a + self.SHARD_INPUTS], a, skipped)
                             for a in range(0, max(len(entries), 1), self.SHARD_INPUTS)]
        return shards

    def _shard(self, image_dir: Path, entries: list[dict], start: int, skipped: Skipped) -> Iterator[tuple[int, dict]]:
        for k, entry in enumerate(entries, start):
            example = self._example(image_dir, entry, skipped)
            if example is not None:
                yield k, example

    def _download_and_prepare(self, dl_manager, download_config=None):
        super()._download_and_prepare(dl_manager, download_config)
        self.info.metadata["skipped"] = {split: s.as_dict() for split, s in self.skipped.items()}


def image_readable(path: Path, skipped: Skipped) -> bool:
    """Whether the annotation's image exists and PIL can decode it; else it is counted as skipped."""
    if not path.is_file():
        skipped.add("missing images", str(path))
        return False
    try:
        with Image.open(path) as img:
            img.load()
    except Exception:  # any decoder failure: the image is unusable, and is counted
        skipped.add("unreadable images", str(path))
        return False
    return True


def skipped_report(builder: tfds.core.DatasetBuilder) -> str:
    """What a builder of this package left out, per split ("" if nothing)."""
    return "; ".join(f"{split}: {s.report()}" for split, s in getattr(builder, "skipped", {}).items() if s.counts)


def build(builder_cls: type, manual_dir: str | Path, data_dir: str | Path, *, allow_empty: bool = False,
          **kwargs) -> tfds.core.DatasetBuilder:
    """Build a dataset of this package from its manual directory into data_dir (array_record, no TensorFlow);
    an already built one is reused. A split left empty is an error that says what was skipped, unless
    `allow_empty` (a reader that reports the skipped inputs itself)."""
    builder = builder_cls(data_dir=str(data_dir), **kwargs)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    empty = [name for name, split in builder.info.splits.items() if split.num_examples == 0]
    if empty and not allow_empty:
        shutil.rmtree(builder.data_dir)  # nothing to reuse: the next call tries again
        raise ValueError(f"{builder.name}: no examples in {', '.join(empty)} "
                         f"(skipped: {skipped_report(builder) or 'nothing'})")
    if skipped_report(builder):
        warnings.warn(f"{builder.name}: skipped {skipped_report(builder)}", stacklevel=2)
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str, *, decode_images: bool = True) -> Any:
    """Random access (len, [i], __getitems__) to a built split, numpy records; with decode_images=False
    the "image" feature is the stored file's bytes, as read from disk (for readers that decode it themselves)."""
    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    return builder.as_data_source(split=split, decoders=decoders)
