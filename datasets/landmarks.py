"""Five-point landmark faces as TFDS datasets: LFW+Net (Sun et al. 2013) and CelebA in the wild.

Each record is one face: its image, box x1, y1, x2, y2 and landmarks (5, 2) as (x, y) in the order left
eye, right eye, nose, left and right mouth corner. Lists are parsed by `mtcnn_jax.evaluate.read_landmark_list`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from mtcnn_jax.datasets.common import ManualBuilder, image_readable
from mtcnn_jax.evaluate import read_landmark_list

CELEBA_LISTS = ("list_landmarks_celeba.txt", "list_bbox_celeba.txt")


def landmark_faces(root: str | Path, list_name: str | None = None) -> tuple[Path, list[dict]]:
    """The image folder and faces [{"path", "box", "points"}] of a landmark set in `root`: LFW+Net when
    `list_name` (trainImageList.txt, testImageList.txt) is given, else CelebA's two lists."""
    root = Path(root)
    if list_name is not None:
        return root, read_landmark_list(root / list_name, "lfw")
    images = root / "img_celeba" if (root / "img_celeba").is_dir() else root
    return images, read_landmark_list(root / CELEBA_LISTS[0], "celeba", bbox_path=root / CELEBA_LISTS[1])


def face_problem(box_4: np.ndarray, points_5x2: np.ndarray) -> str | None:
    """Why an annotated face cannot be used (zero-size box, landmark outside its box), else None."""
    if not (box_4[2] > box_4[0] and box_4[3] > box_4[1]):
        return "zero-size boxes"
    inside = (points_5x2 >= box_4[:2]) & (points_5x2 <= box_4[2:])
    return None if inside.all() else "landmarks outside their box"


class _LandmarkFaces(ManualBuilder):
    """Shared features and generation; subclasses name their splits and lists."""

    VERSION = tfds.core.Version("1.0.0")
    LISTS: dict[str, str | None] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
            }))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*landmark_faces(dl_manager.manual_dir, list_name))
                for split, list_name in self.LISTS.items()}

    def _generate_examples(self, image_dir: Path, faces: list[dict]) -> Iterator[tuple[str, dict]]:
        for k, face in enumerate(faces[: self.max_images]):
            problem = face_problem(face["box"], face["points"])
            if problem:
                self.skipped.add(problem, face["path"])
            elif image_readable(image_dir / face["path"], self.skipped):
                yield f"{k}:{face['path']}", {
                    "image": image_dir / face["path"], "image/filename": face["path"],
                    "box": face["box"].astype(np.float32), "landmarks": face["points"].astype(np.float32)}


class LfwNet(_LandmarkFaces):
    """LFW+Net landmark faces (Sun et al. 2013): trainImageList.txt and testImageList.txt in the manual dir."""

    name = "mtcnn_lfw_net"
    LISTS = {"train": "trainImageList.txt", "test": "testImageList.txt"}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place trainImageList.txt, testImageList.txt and their image folders here."


class CelebaWild(_LandmarkFaces):
    """CelebA in-the-wild faces: list_bbox_celeba.txt and list_landmarks_celeba.txt, images in img_celeba/."""

    name = "mtcnn_celeba_wild"  # TFDS's own "celeb_a" holds the aligned crops, not these
    LISTS = {"train": None}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place list_bbox_celeba.txt, list_landmarks_celeba.txt and img_celeba/ here."
