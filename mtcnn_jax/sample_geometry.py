"""The geometry of the training samples (Zhang et al. 2016, Sec. III-A): crops, IoU labels, targets, flips.

Every crop is a square of source pixels, labelled by its best IoU with the ground truth: negative < 0.3,
part 0.4-0.65, positive > 0.65 (0.3-0.4 unused). P-Net's crops are random negatives, negatives beside each
face and jittered crops around it; R-/O-Net's are the earlier stages' detections; landmark samples are
jittered crops around a landmark set's faces. A sample table (no pixels) holds label_N, crop_Nx4, box_Nx4,
landmarks_Nx10 and flipped_N. Numpy only: the sample workers import this.

One pixel convention for every label and target here: crops, faces and box targets are pixel spans, x1, y1
to x2, y2, 0-based and end exclusive, so a span is x2 - x1 pixels wide (`sides`), its area has no +1
(`span_areas`) and so has its IoU (`span_iou`). The 1-based inclusive boxes of the cascade and of WIDER's
ground truth enter through `pixel_spans`; `boxes.iou_matrix` (+1 areas, detect_face.m's) stays the cascade's.
Where crops are drawn around a face (`jitter_crops`, `near_face_negatives`, the `min_face` test), its numbers
are used as given, as in the public pipeline: that decides which crops are tried, never a label or a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax.stages import INPUT_SIZE, LABEL

UNUSED = 9  # IoU in 0.3-0.4: neither negative nor part, not written


@dataclass(frozen=True)
class SampleConfig:
    """How samples are drawn; the defaults are the most used public pipeline's recipe."""

    stage: str = "pnet"
    ratio: tuple[float, float, float, float] = (3, 1, 1, 2)  # negative : positive : part : landmark
    seed: int = 0
    negatives_per_image: int = 50  # random crops, side in [12, min(w, h) / 2]
    negatives_near_face: int = 5  # per face, overlapping it in x or y
    jitters_per_face: int = 20  # positive / part candidates around each face
    hard_face_jitters: int = 0  # R-/O-Net: as many jittered crops around each face, added to the detections
    landmark_jitters: int = 10  # per landmark face, besides its own box
    min_face: int = 20  # faces (and detections) smaller than this are not cropped around
    flip_prob: float = 0.5  # positives and landmark samples
    iou_negative: float = 0.3
    iou_part: float = 0.4
    iou_positive: float = 0.65
    square_faces: bool = False  # label by IoU with the squared face box (the cascade shows the nets squares)
    # The landmark set's boxes moved into the frame the cascade hands O-Net its faces in, before landmark
    # samples are cut around them: width scale, height scale, centre shift in box heights (+ is down).
    landmark_frame: tuple[float, float, float] = (1.0, 1.0, 0.0)

    def __post_init__(self) -> None:
        """ValueError naming the field (and its samples CLI flag) of the first value out of range."""
        ratio = np.asarray(self.ratio, np.float64)
        counts = ("seed", "negatives_per_image", "negatives_near_face", "jitters_per_face", "hard_face_jitters",
                  "landmark_jitters")
        problems = [
            ("stage", self.stage not in INPUT_SIZE, f"one of {', '.join(INPUT_SIZE)}"),
            ("ratio", ratio.shape != (4,) or not np.isfinite(ratio).all() or (ratio < 0).any() or not ratio.sum() > 0,
             "four finite numbers >= 0, not all 0 (negative:positive:part:landmark)"),
            *((name, not _is_count(getattr(self, name), 0), "an integer >= 0") for name in counts),
            ("min_face", not _is_count(self.min_face, 1), "an integer >= 1 (pixels)"),
            ("flip_prob", not 0 <= self.flip_prob <= 1, "a probability in [0, 1]"),
            ("landmark_frame", not _is_frame(self.landmark_frame),
             "three finite numbers: width scale > 0, height scale > 0, centre shift in heights"),
            ("iou_positive", not 0 <= self.iou_negative <= self.iou_part <= self.iou_positive <= 1,
             "0 <= iou_negative <= iou_part <= iou_positive <= 1"),
        ]
        for name, bad, expected in problems:
            if bad:
                flag = f" (--{_FLAGS[name]})" if name in _FLAGS else ""
                raise ValueError(f"SampleConfig.{name}{flag} {getattr(self, name)!r}: expected {expected}")

    @property
    def size(self) -> int:
        return INPUT_SIZE[self.stage]


_FLAGS = {"ratio": "ratio", "seed": "seed", "hard_face_jitters": "face-jitters",
          "min_face": "min-face", "flip_prob": "flip-prob", "landmark_frame": "landmark-frame"}  # SampleConfig fields set by `mtcnn_jax.samples` flags


def _is_frame(frame: object) -> bool:
    f = np.asarray(frame, np.float64) if isinstance(frame, (tuple, list)) else np.zeros(0)
    return f.shape == (3,) and bool(np.isfinite(f).all()) and f[0] > 0 and f[1] > 0


def _is_count(value: object, low: int) -> bool:
    """An integer (not a bool) >= low."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= low


def sides(crops_Nx4: np.ndarray) -> np.ndarray:
    """Crop sides: crops are square, x1, y1, x2 = x1 + side, y2 = y1 + side in source pixels."""
    return crops_Nx4[:, 2] - crops_Nx4[:, 0]


def pixel_spans(boxes_Nx4: np.ndarray) -> np.ndarray:
    """1-based inclusive boxes (x1..x2 is x2 - x1 + 1 pixels wide) as the pixel spans crops are cut from, x1 - 1
    to x2 (end exclusive). The cascade's boxes are 1-based (detect_face.m) and WIDER's ground truth is compared
    with them as it is (the official evaluation), so faces go through here too: targets from the raw numbers
    teach the nets to put x1 and y1 one pixel right of and below the face."""
    b = np.asarray(boxes_Nx4, np.float64).reshape(-1, 4)
    return np.stack([b[:, 0] - 1, b[:, 1] - 1, b[:, 2], b[:, 3]], axis=1)


def span_areas(spans_Nx4: np.ndarray) -> np.ndarray:
    """Pixel counts of spans: (x2 - x1) * (y2 - y1), no +1 (an end-exclusive span x1..x2 is x2 - x1 wide)."""
    s = np.asarray(spans_Nx4, np.float64).reshape(-1, 4)
    return (s[:, 2] - s[:, 0]) * (s[:, 3] - s[:, 1])


def span_iou(a_Nx4: np.ndarray, b_Mx4: np.ndarray) -> np.ndarray:
    """IoU (N, M) of pixel spans, the one IoU of sample labels: shared pixels over the pixels of either, span
    areas (no +1; `boxes.iou_matrix`'s +1 is for the cascade's 1-based boxes). 0 where both spans are empty."""
    a, b = (np.asarray(v, np.float64).reshape(-1, 4) for v in (a_Nx4, b_Mx4))
    w_NxM = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h_NxM = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter_NxM = w_NxM * h_NxM
    union_NxM = span_areas(a)[:, None] + span_areas(b)[None, :] - inter_NxM
    return np.divide(inter_NxM, union_NxM, out=np.zeros_like(inter_NxM), where=union_NxM > 0)


def box_targets(crops_Nx4: np.ndarray, gt_Nx4: np.ndarray) -> np.ndarray:
    """Box regression targets of spans: offsets normalised by the crop's side, ((gt_x1 - crop_x1) / side, ..)."""
    return ((gt_Nx4 - crops_Nx4) / sides(crops_Nx4)[:, None]).astype(np.float32)


def landmark_targets(crops_Nx4: np.ndarray, points_Nx5x2: np.ndarray) -> np.ndarray:
    """Landmarks relative to the crop, (x - crop_x1) / side and (y - crop_y1) / side, as x1..x5, y1..y5."""
    rel_Nx5x2 = (points_Nx5x2 - crops_Nx4[:, None, :2]) / sides(crops_Nx4)[:, None, None]
    return np.concatenate([rel_Nx5x2[..., 0], rel_Nx5x2[..., 1]], axis=1).astype(np.float32)


def flip_targets(box_Nx4: np.ndarray, landmarks_Nx10: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets of horizontally mirrored crops: dx1' = -dx2, dx2' = -dx1; landmarks `bx.mirror_landmarks`."""
    box = box_Nx4[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32)
    return box, bx.mirror_landmarks(np.asarray(landmarks_Nx10)).astype(np.float32)


def iou_labels(iou_N: np.ndarray, cfg: SampleConfig) -> np.ndarray:
    """Sample labels from the best IoU with any face: 0 negative, 1 positive, -1 part, UNUSED in between."""
    label = np.full(iou_N.shape, UNUSED, np.int32)
    label[iou_N < cfg.iou_negative] = LABEL["negative"]
    label[(iou_N >= cfg.iou_part) & (iou_N <= cfg.iou_positive)] = LABEL["part"]
    label[iou_N > cfg.iou_positive] = LABEL["positive"]
    return label


def specs(label, crop, box, landmarks=None, flipped=None) -> dict[str, np.ndarray]:
    """A table of samples (no pixels): label_N, crop_Nx4, box_Nx4, landmarks_Nx10, flipped_N."""
    n = len(label)
    return {"label": np.asarray(label, np.int32), "crop": np.asarray(crop, np.float32).reshape(n, 4),
            "box": np.asarray(box, np.float32).reshape(n, 4),
            "landmarks": np.zeros((n, 10), np.float32) if landmarks is None else np.asarray(landmarks, np.float32),
            "flipped": np.zeros(n, bool) if flipped is None else np.asarray(flipped, bool)}


def select(table: dict[str, np.ndarray], mask_N: np.ndarray) -> dict[str, np.ndarray]:
    """The rows of a sample table where mask_N is set."""
    return {k: v[mask_N] for k, v in table.items()}


def label_crops(crops_Nx4: np.ndarray, gt_Gx4: np.ndarray, cfg: SampleConfig) -> dict[str, np.ndarray]:
    """Label crops (pixel spans) by their best `span_iou` with the faces (1-based boxes, taken as their
    `pixel_spans`); box targets from that face's span.

    With `cfg.square_faces` the IoU is taken with each face's square (bx.square), the box targets still
    with the face: a square crop's IoU with a face box is at most the box's aspect ratio, so without it a face
    narrower than `iou_positive` of its height can never give a positive.
    """
    crops_Nx4 = np.asarray(crops_Nx4, np.float64).reshape(-1, 4)
    if len(gt_Gx4) == 0:
        return specs(np.zeros(len(crops_Nx4)), crops_Nx4, np.zeros((len(crops_Nx4), 4)))
    faces_Gx4 = pixel_spans(gt_Gx4)
    iou_NxG = span_iou(crops_Nx4, bx.square(faces_Gx4) if cfg.square_faces else faces_Gx4)
    best_N = iou_NxG.argmax(axis=1)
    label_N = iou_labels(iou_NxG.max(axis=1), cfg)
    box_Nx4 = np.where((label_N != LABEL["negative"])[:, None], box_targets(crops_Nx4, faces_Gx4[best_N]), 0)
    return select(specs(label_N, crops_Nx4, box_Nx4), label_N != UNUSED)


def flip_some(table: dict[str, np.ndarray], types: Sequence[str], rng: np.random.Generator,
              prob: float) -> dict[str, np.ndarray]:
    """Mark samples of `types` as mirrored with probability `prob`, and mirror their targets."""
    flip_N = np.isin(table["label"], [LABEL[t] for t in types]) & (rng.random(len(table["label"])) < prob)
    box, lmk = flip_targets(table["box"][flip_N], table["landmarks"][flip_N])
    out = {k: v.copy() for k, v in table.items()}
    out["box"][flip_N], out["landmarks"][flip_N], out["flipped"][flip_N] = box, lmk, True
    return out


def inside(crops_Nx4: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Crops wholly inside an h x w image (the public pipeline drops the others rather than pad them)."""
    return (crops_Nx4[:, 0] >= 0) & (crops_Nx4[:, 1] >= 0) & (crops_Nx4[:, 2] <= hw[1]) & (crops_Nx4[:, 3] <= hw[0])


def square_crops(x1_N: np.ndarray, y1_N: np.ndarray, side_N: np.ndarray) -> np.ndarray:
    x1_N, y1_N, side_N = (np.asarray(v, np.float64) for v in (x1_N, y1_N, side_N))
    return np.stack([x1_N, y1_N, x1_N + side_N, y1_N + side_N], axis=1)


def random_negatives(rng: np.random.Generator, hw: tuple[int, int], n: int) -> np.ndarray:
    """n random square crops with side in [12, min(w, h) / 2] anywhere in the image."""
    h, w = hw
    if min(h, w) / 2 <= 12:
        return np.zeros((0, 4))
    side = rng.integers(12, int(min(h, w) / 2), size=n, endpoint=True)
    return square_crops(rng.integers(0, w - side + 1), rng.integers(0, h - side + 1), side)


def near_face_negatives(rng: np.random.Generator, face_4: np.ndarray, n: int) -> np.ndarray:
    """Crops of side [12, min(w, h) / 2] shifted by up to a face size from the face's corner (hard negatives)."""
    x1, y1, x2, y2 = face_4
    w, h = x2 - x1, y2 - y1
    side = rng.integers(12, max(12, int(min(w, h) / 2)), size=n, endpoint=True)
    dx = rng.integers(np.maximum(-side, -x1), max(w, 1), endpoint=False)
    dy = rng.integers(np.maximum(-side, -y1), max(h, 1), endpoint=False)
    return square_crops(np.floor(x1 + dx), np.floor(y1 + dy), side)


def jitter_crops(rng: np.random.Generator, face_4: np.ndarray, n: int) -> np.ndarray:
    """Crops of side [0.8 min(w, h), 1.25 max(w, h)] around the face centre, shifted by up to 0.2 w, 0.2 h."""
    x1, y1, x2, y2 = face_4
    w, h = x2 - x1, y2 - y1
    side = rng.integers(int(min(w, h) * 0.8), int(np.ceil(1.25 * max(w, h))), size=n, endpoint=True)
    dx = rng.uniform(-0.2, 0.2, n) * w
    dy = rng.uniform(-0.2, 0.2, n) * h
    return square_crops(np.floor(np.maximum(x1 + w / 2 + dx - side / 2, 0)),
                        np.floor(np.maximum(y1 + h / 2 + dy - side / 2, 0)), side)


def check_faces(gt_Gx4: np.ndarray, hw: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """The faces usable as ground truth and a reason per dropped face (zero size, wholly outside the image)."""
    gt_Gx4 = np.asarray(gt_Gx4, np.float64).reshape(-1, 4)
    zero = ~((gt_Gx4[:, 2] > gt_Gx4[:, 0]) & (gt_Gx4[:, 3] > gt_Gx4[:, 1]))
    outside = ~zero & ((gt_Gx4[:, 2] <= 0) | (gt_Gx4[:, 3] <= 0) | (gt_Gx4[:, 0] >= hw[1]) | (gt_Gx4[:, 1] >= hw[0]))
    reasons = ["faces with a zero-size box"] * int(zero.sum()) + ["faces outside their image"] * int(outside.sum())
    return gt_Gx4[~zero & ~outside], reasons


def pnet_specs(hw: tuple[int, int], gt_Gx4: np.ndarray, rng: np.random.Generator, cfg: SampleConfig):
    """P-Net crops of one image: random negatives, and around each face of side >= min_face, hard
    negatives beside it and jittered positive / part candidates; all labelled by IoU, inside the image."""
    faces = [f for f in gt_Gx4 if min(f[2] - f[0], f[3] - f[1]) >= cfg.min_face and f[0] >= 0 and f[1] >= 0]
    crops = [random_negatives(rng, hw, cfg.negatives_per_image)]
    for face in faces:
        crops += [near_face_negatives(rng, face, cfg.negatives_near_face), jitter_crops(rng, face, cfg.jitters_per_face)]
    crops_Nx4 = np.concatenate(crops)
    crops_Nx4 = crops_Nx4[inside(crops_Nx4, hw) & (sides(crops_Nx4) >= 12)]
    return flip_some(label_crops(crops_Nx4, gt_Gx4, cfg), ["positive"], rng, cfg.flip_prob)


def detection_crops(dets_Dx4: np.ndarray) -> np.ndarray:
    """Crops of the cascade's candidates (`pixel_spans` of its boxes), rounded as the public pipeline does."""
    return pixel_spans(np.round(dets_Dx4))


def hard_specs(hw: tuple[int, int], gt_Gx4: np.ndarray, dets_Dx4: np.ndarray, rng: np.random.Generator,
               cfg: SampleConfig):
    """R-Net / O-Net samples of one image: the earlier stages' detections (side >= min_face, inside the
    image), labelled by IoU with the ground truth (hard examples). With `hard_face_jitters`, jittered crops
    around each face are added, so that the positives and part faces are not only those the earlier stages
    found (on a small training set they are few: every face then gives more than one)."""
    crops = [detection_crops(dets_Dx4)]
    if cfg.hard_face_jitters:
        faces = [f for f in gt_Gx4 if min(f[2] - f[0], f[3] - f[1]) >= cfg.min_face]
        crops += [jitter_crops(rng, face, cfg.hard_face_jitters) for face in faces]
    crops_Nx4 = np.concatenate(crops)
    crops_Nx4 = crops_Nx4[inside(crops_Nx4, hw) & (sides(crops_Nx4) >= cfg.min_face)]
    return flip_some(label_crops(crops_Nx4, gt_Gx4, cfg), ["positive"], rng, cfg.flip_prob)


def framed_box(box_4: np.ndarray, frame: tuple[float, float, float]) -> np.ndarray:
    """`box_4` scaled about its centre by frame[0] in width and frame[1] in height, the centre moved down by
    frame[2] of its height: a landmark set's box in the frame the detector gives the same face."""
    x1, y1, x2, y2 = np.asarray(box_4, np.float64)
    w, h = (x2 - x1) * frame[0], (y2 - y1) * frame[1]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2 + frame[2] * (y2 - y1)
    return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def landmark_specs(hw: tuple[int, int], box_4: np.ndarray, points_5x2: np.ndarray, rng: np.random.Generator,
                   cfg: SampleConfig):
    """Landmark samples of one face: its own box and jittered crops, kept when their `span_iou` with the box
    (taken as a span: the landmark sets' boxes are cropped and targeted as given) is > iou_positive and all
    five points lie inside the crop. The box is first moved into `cfg.landmark_frame` (`framed_box`)."""
    box_4 = framed_box(box_4, cfg.landmark_frame)
    own = square_crops([np.floor(box_4[0])], [np.floor(box_4[1])], [np.ceil(max(box_4[2] - box_4[0], box_4[3] - box_4[1]))])
    crops_Nx4 = np.concatenate([own, jitter_crops(rng, box_4, cfg.landmark_jitters)])
    lmk_Nx10 = landmark_targets(crops_Nx4, np.broadcast_to(points_5x2, (len(crops_Nx4), 5, 2)))
    keep = (inside(crops_Nx4, hw) & (sides(crops_Nx4) >= 12)
            & (span_iou(crops_Nx4, box_4[None])[:, 0] > cfg.iou_positive)
            & (lmk_Nx10 >= 0).all(axis=1) & (lmk_Nx10 <= 1).all(axis=1))
    table = specs(np.full(len(crops_Nx4), LABEL["landmark"]), crops_Nx4,
                  box_targets(crops_Nx4, np.broadcast_to(box_4, (len(crops_Nx4), 4))), lmk_Nx10)
    return flip_some(select(table, keep), ["landmark"], rng, cfg.flip_prob)
