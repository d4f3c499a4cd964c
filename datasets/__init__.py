"""TFDS builders (array_record, built without TensorFlow) for MTCNN's training data.

`build(WiderFace, manual_dir, data_dir)` then `data_source(builder, "train")` for random access.
"""

from mtcnn_jax.datasets.common import Skipped, build, data_source
from mtcnn_jax.datasets.landmarks import CelebaWild, LfwNet, face_problem, landmark_faces
from mtcnn_jax.datasets.wider_face import WiderFace, read_wider_gt, wider_split

__all__ = ["CelebaWild", "LfwNet", "Skipped", "WiderFace", "build", "data_source", "face_problem",
           "landmark_faces", "read_wider_gt", "wider_split"]
