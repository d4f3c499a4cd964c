"""WIDER FACE (Yang et al. 2016) as a TFDS dataset, read from the official layout in a manual directory.

Manual directory: `WIDER_{train,val}/images/<event>/<file>.jpg` and
`wider_face_split/wider_face_{train,val}_bbx_gt.txt`. Boxes become x1, y1, x2 = x + w, y2 = y + h (as the
official evaluation's get_gt_boxes); all six attributes are kept. Built without TensorFlow (array_record).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mtcnn_jax.datasets.common import ManualBuilder, image_readable

ATTRIBUTES = ("blur", "expression", "illumination", "invalid", "occlusion", "pose")
SPLITS = {"train": "train", "validation": "val"}


def read_wider_gt(path: str | Path) -> list[dict]:
    """The faces of a wider_face_*_bbx_gt.txt: [{"path", "boxes" (N, 4) x1 y1 x2 y2, attribute: (N,)}].

    A 0-face image is followed by one all-zero line, which is consumed and yields no face.
    """
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    entries, i = [], 0
    while i < len(lines):
        if not lines[i]:
            i += 1
            continue
        name, n = lines[i].replace("\\", "/"), int(lines[i + 1])
        rows = np.array([[float(v) for v in ln.split()[:10]] for ln in lines[i + 2 : i + 2 + max(n, 1)]],
                        np.float32).reshape(-1, 10)[:n]
        boxes = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1)
        entries.append({"path": name, "boxes": boxes,
                        **{a: rows[:, 4 + k].astype(np.int32) for k, a in enumerate(ATTRIBUTES)}})
        i += 2 + max(n, 1)
    return entries


def wider_split(manual_dir: str | Path, split: str) -> tuple[Path, list[dict]]:
    """The image folder and ground truth of one split ("train" or "val") of the official layout."""
    root = Path(manual_dir)
    return root / f"WIDER_{split}" / "images", read_wider_gt(root / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt")


class WiderFace(ManualBuilder):
    """WIDER FACE train and validation splits; `max_images` keeps the first N images of each (tests)."""

    name = "mtcnn_wider_face"  # TFDS's own "wider_face" downloads; this one reads the manual layout
    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Place WIDER_train/, WIDER_val/ and wider_face_split/ (official layout) "
                                    "in the manual directory.")

    def _info(self) -> tfds.core.DatasetInfo:
        face = {"box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                **{a: tfds.features.Tensor(shape=(), dtype=np.int32) for a in ATTRIBUTES}}
        return tfds.core.DatasetInfo(
            builder=self, description="WIDER FACE faces: boxes x1, y1, x2, y2 in pixels and their attributes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "faces": tfds.features.Sequence(face),
            }),
            homepage="http://shuoyang1213.me/WIDERFACE/")

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(*wider_split(dl_manager.manual_dir, split))
                for name, split in SPLITS.items()}

    def _generate_examples(self, image_dir: Path, entries: list[dict]) -> Iterator[tuple[str, dict]]:
        for entry in entries[: self.max_images]:
            path = image_dir / entry["path"]
            if not image_readable(path, self.skipped):
                continue
            faces = {"box": entry["boxes"], **{a: entry[a] for a in ATTRIBUTES}}
            yield entry["path"], {"image": path, "image/filename": entry["path"], "faces": faces}
