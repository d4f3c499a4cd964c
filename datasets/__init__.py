"""TFDS builders (array_record, built without TensorFlow) for MTCNN's training data: the sources
(WIDER FACE, LFW+Net, CelebA in the wild) and the per-stage sample sets made from them.

`build(WiderFace, manual_dir, data_dir)` then `data_source(builder, "train")` for random access;
`load_samples(directory)` reads a sample set back.
"""

from mtcnn_jax.datasets.common import Skipped, build, data_source, skipped_report
from mtcnn_jax.datasets.landmarks import CelebaWild, LfwNet, face_problem, landmark_faces
from mtcnn_jax.datasets.landmarks import image_dir as landmark_image_dir
from mtcnn_jax.datasets.sample_sets import MtcnnSamples, Samples, load_samples, stage_samples
from mtcnn_jax.datasets.wider_face import WiderFace, read_wider_gt, wider_split
from mtcnn_jax.datasets.wider_face import image_dir as wider_image_dir

__all__ = ["CelebaWild", "LfwNet", "MtcnnSamples", "Samples", "Skipped", "WiderFace", "build", "data_source",
           "face_problem", "landmark_faces", "landmark_image_dir", "load_samples", "read_wider_gt",
           "skipped_report", "stage_samples", "wider_image_dir", "wider_split"]
