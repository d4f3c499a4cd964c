"""Five-point landmark faces as TFDS datasets: LFW+Net (Sun et al. 2013) and CelebA in the wild.

Each record is one face: its image, box x1, y1, x2, y2 and landmarks (5, 2) as (x, y) in the order left
eye, right eye, nose, left and right mouth corner. Lists are parsed by `mtcnn_jax.landmark_eval.read_landmark_list`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from mtcnn_jax.datasets.common import ManualBuilder, Skipped, image_readable
from mtcnn_jax.landmark_eval import read_landmark_list

CELEBA_LISTS = ("list_landmarks_celeba.txt", "list_bbox_celeba.txt")


def image_dir(root: str | Path, list_name: str | None = None) -> Path:
    """The folder a landmark set's image paths are relative to: LFW+Net's root (`list_name` given), else
    CelebA's img_celeba/ (or the root itself)."""
    root = Path(root)
    return root if list_name is not None or not (root / "img_celeba").is_dir() else root / "img_celeba"


def landmark_faces(root: str | Path, list_name: str | None = None) -> tuple[Path, list[dict]]:
    """The image folder and faces [{"path", "box", "points"}] of a landmark set in `root`: LFW+Net when
    `list_name` (trainImageList.txt, testImageList.txt) is given, else CelebA's two lists."""
    root = Path(root)
    if list_name is not None:
        return image_dir(root, list_name), read_landmark_list(root / list_name, "lfw")
    faces = read_landmark_list(root / CELEBA_LISTS[0], "celeba", bbox_path=root / CELEBA_LISTS[1])
    return image_dir(root), faces


def face_problem(box_4: np.ndarray, points_5x2: np.ndarray) -> str | None:
    """Why an annotated face cannot be used (zero-size box, landmark outside its box), else None."""
    if not (box_4[2] > box_4[0] and box_4[3] > box_4[1]):
        return "zero-size boxes"
    inside = (points_5x2 >= box_4[:2]) & (points_5x2 <= box_4[2:])
    return None if inside.all() else "landmarks outside their box"


class _LandmarkFaces(ManualBuilder):
    """Shared features and generation; subclasses name their splits and lists."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Records in list order, written shard by shard; skipped inputs in the metadata.",
                     "1.0.0": "Records shuffled by TFDS."}
    LISTS: dict[str, str | None] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, disable_shuffling=True, metadata=tfds.core.MetadataDict(),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
            }))

    def _inputs(self, manual_dir: Path) -> dict[str, tuple[Path, list[dict]]]:
        return {split: landmark_faces(manual_dir, list_name) for split, list_name in self.LISTS.items()
                if list_name is None or (manual_dir / list_name).is_file()}

    def _example(self, image_dir: Path, face: dict, skipped: Skipped) -> dict | None:
        problem = face_problem(face["box"], face["points"])
        if problem:
            skipped.add(problem, face["path"])
            return None
        if not image_readable(image_dir / face["path"], skipped):
            return None
        return {"image": image_dir / face["path"], "image/filename": face["path"],
                "box": face["box"].astype(np.float32), "landmarks": face["points"].astype(np.float32)}


class LfwNet(_LandmarkFaces):
    """LFW+Net landmark faces (Sun et al. 2013): trainImageList.txt and testImageList.txt in the manual dir
    (each split built when its list is there)."""

    name = "mtcnn_lfw_net"
    LISTS = {"train": "trainImageList.txt", "test": "testImageList.txt"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place trainImageList.txt, testImageList.txt and their image folders here."


class CelebaWild(_LandmarkFaces):
    """CelebA in-the-wild faces: list_bbox_celeba.txt and list_landmarks_celeba.txt, images in img_celeba/."""

    name = "mtcnn_celeba_wild"  # TFDS's own "celeb_a" holds the aligned crops, not these
    LISTS = {"train": None}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place list_bbox_celeba.txt, list_landmarks_celeba.txt and img_celeba/ here."
