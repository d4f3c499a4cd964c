"""WIDER FACE (Yang et al. 2016) as a TFDS dataset, read from the official layout in a manual directory.

Manual directory: `WIDER_{train,val}/images/<event>/<file>.jpg` and
`wider_face_split/wider_face_{train,val}_bbx_gt.txt`. Boxes become x1, y1, x2 = x + w, y2 = y + h (as the
official evaluation's get_gt_boxes); all six attributes are kept. Built without TensorFlow (array_record),
records in the order of the ground-truth list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mtcnn_jax.datasets.common import ManualBuilder, Skipped, image_readable

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


def image_dir(manual_dir: str | Path, split: str) -> Path:
    """The image folder of one split ("train" or "val") of the official layout."""
    return Path(manual_dir) / f"WIDER_{split}" / "images"


def gt_path(manual_dir: str | Path, split: str) -> Path:
    """The ground-truth list of one split ("train" or "val") of the official layout."""
    return Path(manual_dir) / "wider_face_split" / f"wider_face_{split}_bbx_gt.txt"


def wider_split(manual_dir: str | Path, split: str) -> tuple[Path, list[dict]]:
    """The image folder and ground truth of one split ("train" or "val") of the official layout."""
    return image_dir(manual_dir, split), read_wider_gt(gt_path(manual_dir, split))


class WiderFace(ManualBuilder):
    """WIDER FACE train and validation splits, each built when its ground-truth list is in the manual
    directory (training needs WIDER_train only); `max_images` keeps the first N images of each (tests)."""

    name = "mtcnn_wider_face"  # TFDS's own "wider_face" downloads; this one reads the manual layout
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records in list order, written shard by shard; skipped inputs in the metadata.",
                     "1.0.0": "Records shuffled by TFDS."}
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
            homepage="http://shuoyang1213.me/WIDERFACE/", disable_shuffling=True, metadata=tfds.core.MetadataDict())

    def _inputs(self, manual_dir: Path) -> dict[str, tuple[Path, list[dict]]]:
        present = {name: split for name, split in SPLITS.items() if gt_path(manual_dir, split).is_file()}
        if not present:
            raise FileNotFoundError(f"no WIDER FACE ground truth in {manual_dir}: expected "
                                    f"{gt_path(manual_dir, 'train')} (official layout)")
        return {name: wider_split(manual_dir, split) for name, split in present.items()}

    def _example(self, image_dir: Path, entry: dict, skipped: Skipped) -> dict | None:
        path = image_dir / entry["path"]
        if not image_readable(path, skipped):
            return None
        faces = {"box": entry["boxes"], **{a: entry[a] for a in ATTRIBUTES}}
        return {"image": path, "image/filename": entry["path"], "faces": faces}
