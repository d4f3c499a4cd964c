"""What the dataset builders share: counting skipped inputs, building without TensorFlow, reading back."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import tensorflow_datasets as tfds


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

    def report(self) -> str:
        return "; ".join(f"{n} {r} (first: {', '.join(self.names[r])})" for r, n in self.counts.items())


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that reads files from a manual directory into array_record (no TensorFlow needed);
    `max_images` keeps the first N images of each split (tests), `skipped` counts the bad entries."""

    def __init__(self, *, max_images: int | None = None, **kwargs):
        self.max_images = max_images
        self.skipped = Skipped()
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)


def image_readable(path: Path, skipped: Skipped) -> bool:
    """Whether the annotation's image exists and PIL can decode it; else it is counted as skipped."""
    from PIL import Image

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


def build(builder_cls: type, manual_dir: str | Path, data_dir: str | Path, **kwargs) -> tfds.core.DatasetBuilder:
    """Build a dataset of this package from its manual directory into data_dir (array_record, no TensorFlow)."""
    builder = builder_cls(data_dir=str(data_dir), **kwargs)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    except AssertionError as err:  # TFDS's "No examples were yielded": say what was skipped
        skipped = getattr(builder, "skipped", Skipped())
        raise ValueError(f"{builder.name}: {err} (skipped: {skipped.report() or 'nothing'})") from None
    if getattr(builder, "skipped", None) and builder.skipped.counts:
        warnings.warn(f"{builder.name}: skipped {builder.skipped.report()}", stacklevel=2)
    return builder


def data_source(builder: tfds.core.DatasetBuilder, split: str):
    """Random access (len, [i]) to a built split through tfds.data_source, numpy records."""
    return tfds.data_source(builder.name, split=split, data_dir=builder.data_dir_root, try_gcs=False,
                            builder_kwargs={"file_format": "array_record"})
