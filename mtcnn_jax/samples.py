"""Per-stage training samples (Zhang et al. 2016, Sec. II-C and III-A) written as a TFDS array_record dataset.

P-Net (12 px): random crops of WIDER FACE training images. R-Net (24 px) and O-Net (48 px): the earlier
stages' detections on the same images (hard examples). Every crop is labelled by its best IoU with the
ground truth: negative < 0.3, part 0.4-0.65, positive > 0.65 (0.3-0.4 unused). Landmark samples are
jittered crops around a landmark set's faces. Types are mixed 3 : 1 : 1 : 2 (neg : pos : part : landmark).

Each record keeps its provenance ("source" image, "crop" box in its pixels, "flipped") so that any label
can be audited. Per-image seeds come from (seed, image index), so results do not depend on scheduling.

    python -m mtcnn_jax.samples {pnet,rnet,onet} --wider DIR --landmarks DIR --out DIR [--weights CKPT]
        [--max-images N] [--seed S] [--workers W] [--ratio 3:1:1:2] [--min-face 20] [--face-jitters 0]
        [--square-faces]

`--face-jitters N` adds N jittered crops around every face to the R-/O-Net detections (more positives and
part faces than the earlier stages find on a small set); `--min-face` is the smallest face or detection
cropped (12 lets R-/O-Net see the small candidates they meet at inference); `--square-faces` labels
crops by IoU with each face's square, so that narrow faces can be positives too.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax import stages
from mtcnn_jax.stages import INPUT_SIZE, LABEL
from mtcnn_jax.stages import SAMPLE_TYPES as TYPES

UNUSED = 9  # IoU in 0.3-0.4: neither negative nor part, not written
FLIP_POINTS = np.array(stages.FLIP_POINTS)


class SamplesError(ValueError):
    """No samples could be made (all inputs skipped, or nothing labelled): nothing is written."""


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

    @property
    def size(self) -> int:
        return INPUT_SIZE[self.stage]


# ----------------------------------------------------------------------------------------- targets

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


def box_targets(crops_Nx4: np.ndarray, gt_Nx4: np.ndarray) -> np.ndarray:
    """Box regression targets: offsets normalised by the crop size, ((gt_x1 - crop_x1) / side, ...)."""
    return ((gt_Nx4 - crops_Nx4) / sides(crops_Nx4)[:, None]).astype(np.float32)


def landmark_targets(crops_Nx4: np.ndarray, points_Nx5x2: np.ndarray) -> np.ndarray:
    """Landmarks relative to the crop, (x - crop_x1) / side and (y - crop_y1) / side, as x1..x5, y1..y5."""
    rel_Nx5x2 = (points_Nx5x2 - crops_Nx4[:, None, :2]) / sides(crops_Nx4)[:, None, None]
    return np.concatenate([rel_Nx5x2[..., 0], rel_Nx5x2[..., 1]], axis=1).astype(np.float32)


def flip_targets(box_Nx4: np.ndarray, landmarks_Nx10: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Targets of horizontally mirrored crops: dx1' = -dx2, dx2' = -dx1; x' = 1 - x with left/right swapped."""
    box = box_Nx4[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32)
    xs, ys = 1 - landmarks_Nx10[:, :5], landmarks_Nx10[:, 5:]
    return box, np.concatenate([xs[:, FLIP_POINTS], ys[:, FLIP_POINTS]], axis=1).astype(np.float32)


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
    """Label crops (pixel spans) by their best IoU with the faces (1-based boxes, `pixel_spans`); box targets
    from that face.

    With `cfg.square_faces` the IoU is taken with each face's square (bx.square), the box targets still
    with the face: a square crop's IoU with a face box is at most the box's aspect ratio, so without it a face
    narrower than `iou_positive` of its height can never give a positive.
    """
    crops_Nx4 = np.asarray(crops_Nx4, np.float64).reshape(-1, 4)
    if len(gt_Gx4) == 0:
        return specs(np.zeros(len(crops_Nx4)), crops_Nx4, np.zeros((len(crops_Nx4), 4)))
    faces_Gx4 = pixel_spans(gt_Gx4)
    iou_NxG = bx.iou_matrix(crops_Nx4, bx.square(faces_Gx4) if cfg.square_faces else faces_Gx4)
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


# ----------------------------------------------------------------------------------------- crops

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


def cut(image_HxWx3: np.ndarray, crops_Nx4: np.ndarray, size: int) -> np.ndarray:
    """The crops (inside the image, integer) resized to size x size with PIL's bilinear filter."""
    from PIL import Image

    out = np.zeros((len(crops_Nx4), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(crops_Nx4, np.int64)):
        patch = Image.fromarray(image_HxWx3[y1:y2, x1:x2])
        out[k] = np.asarray(patch.resize((size, size), Image.BILINEAR))
    return out


# ----------------------------------------------------------------------------------------- per image

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


def landmark_specs(hw: tuple[int, int], box_4: np.ndarray, points_5x2: np.ndarray, rng: np.random.Generator,
                   cfg: SampleConfig):
    """Landmark samples of one face: its own box and jittered crops, kept when IoU > 0.65 with the box
    and all five points lie inside the crop."""
    own = square_crops([np.floor(box_4[0])], [np.floor(box_4[1])], [np.ceil(max(box_4[2] - box_4[0], box_4[3] - box_4[1]))])
    crops_Nx4 = np.concatenate([own, jitter_crops(rng, box_4, cfg.landmark_jitters)])
    lmk_Nx10 = landmark_targets(crops_Nx4, np.broadcast_to(points_5x2, (len(crops_Nx4), 5, 2)))
    keep = (inside(crops_Nx4, hw) & (sides(crops_Nx4) >= 12) & (bx.iou_matrix(crops_Nx4, box_4[None])[:, 0] > cfg.iou_positive)
            & (lmk_Nx10 >= 0).all(axis=1) & (lmk_Nx10 <= 1).all(axis=1))
    table = specs(np.full(len(crops_Nx4), LABEL["landmark"]), crops_Nx4,
                  box_targets(crops_Nx4, np.broadcast_to(box_4, (len(crops_Nx4), 4))), lmk_Nx10)
    return flip_some(select(table, keep), ["landmark"], rng, cfg.flip_prob)


# ----------------------------------------------------------------------------------------- jobs

KIND_ID = {"wider": 0, "landmark": 1}


def wider_jobs(wider_dir: str | Path, max_images: int | None = None) -> list[dict]:
    """One job per WIDER FACE training image of the official layout: its path and faces (x1, y1, x2, y2)."""
    from mtcnn_jax.datasets import wider_split

    image_dir, entries = wider_split(wider_dir, "train")
    return [{"kind": "wider", "index": i, "path": str((image_dir / e["path"]).resolve()), "gt": e["boxes"]}
            for i, e in enumerate(entries[:max_images])]


def landmark_jobs(landmarks_dir: str | Path, max_faces: int | None = None) -> list[dict]:
    """One job per landmark face: LFW+Net's trainImageList.txt if present in the folder, else CelebA's lists."""
    from mtcnn_jax.datasets import landmark_faces

    root = Path(landmarks_dir)
    image_dir, faces = landmark_faces(root, "trainImageList.txt" if (root / "trainImageList.txt").is_file() else None)
    return [{"kind": "landmark", "index": i, "path": str((image_dir / f["path"]).resolve()), "box": f["box"],
             "points": f["points"]} for i, f in enumerate(faces[:max_faces])]


def _job_table(job: dict, hw: tuple[int, int], rng: np.random.Generator, cfg: SampleConfig):
    """A job's samples (no pixels) and the reasons for whatever of it was dropped."""
    from mtcnn_jax.datasets import face_problem

    if job["kind"] == "landmark":
        box = np.asarray(job["box"], np.float64)
        problem = face_problem(box, job["points"]) or next(iter(check_faces(box, hw)[1]), None)
        if problem:
            return specs([], [], []), [problem]
        return landmark_specs(hw, box, np.asarray(job["points"], np.float64), rng, cfg), []
    gt_Gx4, reasons = check_faces(job["gt"], hw)
    if cfg.stage == "pnet":
        return pnet_specs(hw, gt_Gx4, rng, cfg), reasons
    return hard_specs(hw, gt_Gx4, job["dets"], rng, cfg), reasons


def run_job(job: dict, cfg: SampleConfig, work_dir: str) -> dict:
    """Load one image, make its samples, save their pixels to work_dir; a bad image is reported, not raised."""
    from mtcnn_jax.detect import ImageError, load_image

    rng = np.random.default_rng([cfg.seed, KIND_ID[job["kind"]], job["index"]])
    result = {"kind": job["kind"], "index": job["index"], "path": job["path"], "table": specs([], [], [])}
    try:
        image = load_image(job["path"])
    except ImageError:
        result["skipped"] = ["missing images" if not Path(job["path"]).is_file() else "unreadable images"]
        return result
    table, result["skipped"] = _job_table(job, image.shape[:2], rng, cfg)
    pixels = cut(image, table["crop"], cfg.size)
    pixels[table["flipped"]] = pixels[table["flipped"]][:, :, ::-1]
    if len(pixels):
        np.save(Path(work_dir) / f"{job['kind']}_{job['index']:08d}.npy", pixels)
    result["table"] = table
    return result


def run_jobs(jobs: list[dict], cfg: SampleConfig, work_dir: Path, workers: int) -> list[dict]:
    """All jobs, in order, over a spawn pool of `workers` processes (in-process for 1), with a progress bar."""
    from tqdm import tqdm

    fn = functools.partial(run_job, cfg=cfg, work_dir=str(work_dir))
    bar = functools.partial(tqdm, total=len(jobs), desc=f"{cfg.stage} samples", unit="image", file=sys.stderr)
    if workers <= 1:
        return list(bar(map(fn, jobs)))
    with mp.get_context("spawn").Pool(workers) as pool:  # spawn: JAX's threads do not survive a fork
        return list(bar(pool.imap(fn, jobs, chunksize=4)))


# ----------------------------------------------------------------------------------------- hard examples

# The public pipeline mines with low thresholds (P-Net 0.3, R-Net 0.1) so that many hard negatives pass.
MINING_CONFIG = dict(thresholds=(0.3, 0.1, 0.7), window_capacity=4096, pnet_capacity=1024,
                     rnet_capacity=256)


def candidates(params: dict, image_HxWx3: np.ndarray, config: Any, upto: str) -> tuple[np.ndarray, dict]:
    """One image's candidates after stage `upto` (boxes_Dx4, 1-based inclusive) and the capacity overflow."""
    from mtcnn_jax import cascade

    h, w = image_HxWx3.shape[:2]
    if not cascade.pyramid_scales(h, w, config.min_face_size, config.scale_factor):
        return np.zeros((0, 4)), {}
    batch, sizes = cascade.pad_to_bucket([image_HxWx3], cascade.bucket_shape(h, w, config))
    out = cascade.detect_bucket(params, batch, sizes, config, upto=upto)
    dets_Dx4 = np.asarray(out["boxes"][0])[np.asarray(out["valid"][0], bool)]
    return dets_Dx4, {name: int(np.asarray(c)[0]) for name, c in out["overflow"].items()}


def add_detections(jobs: list[dict], params: dict, stage: str, config: Any = None) -> dict[str, int]:
    """Give each WIDER job the candidates of the stages before `stage` ("dets"): P-Net's for R-Net samples,
    P-Net + R-Net's for O-Net samples. Images run one at a time, ordered by (coarse) bucket so that each
    bucket compiles once; returns the candidates dropped by full capacities, per stage."""
    from tqdm import tqdm

    from mtcnn_jax import buckets, cascade
    from mtcnn_jax.detect import ImageError, load_image

    config = config or cascade.CascadeConfig(**MINING_CONFIG)
    upto = {"rnet": "pnet", "onet": "rnet"}[stage]
    overflow: dict[str, int] = {}
    order = sorted(jobs, key=lambda j: cascade.bucket_shape(*(buckets.header_hw(j["path"]) or (0, 0)), config))
    for job in tqdm(order, desc=f"{upto} detections", unit="image", file=sys.stderr):
        job["dets"] = np.zeros((0, 4))
        try:
            image = load_image(job["path"])
        except ImageError:
            continue  # run_job reports it
        job["dets"], over = candidates(params, image, config, upto)
        for name, n in over.items():
            overflow[name] = overflow.get(name, 0) + n
    return overflow


# ----------------------------------------------------------------------------------------- mixing

def mix_counts(available: dict[str, int], ratio: Sequence[float]) -> dict[str, int]:
    """How many of each type to keep for negative : positive : part : landmark = ratio: the larger types are
    subsampled to the scarcest one (types with ratio 0 are dropped, types with none available are ignored)."""
    weights = dict(zip(TYPES, ratio))
    units = [available[t] / weights[t] for t in TYPES if weights[t] > 0 and available[t] > 0]
    unit = min(units) if units else 0
    return {t: min(available[t], int(np.floor(unit * weights[t] + 1e-9))) for t in TYPES}


def choose(results: list[dict], ratio: Sequence[float], seed: int) -> tuple[list[np.ndarray], dict, dict]:
    """Per-job keep masks after mixing to the ratio (a seeded random subset of each type), with the counts
    generated and kept per type."""
    labels = np.concatenate([r["table"]["label"] for r in results] or [np.zeros(0, np.int32)])
    available = {t: int((labels == LABEL[t]).sum()) for t in TYPES}
    kept = mix_counts(available, ratio)
    keep = np.zeros(len(labels), bool)
    rng = np.random.default_rng([seed, 2])
    for t in TYPES:
        idx = np.nonzero(labels == LABEL[t])[0]
        keep[np.sort(rng.permutation(idx)[: kept[t]])] = True
    bounds = np.cumsum([0] + [len(r["table"]["label"]) for r in results])
    return [keep[a:b] for a, b in zip(bounds[:-1], bounds[1:])], available, kept


# ----------------------------------------------------------------------------------------- writing

@functools.lru_cache(maxsize=1)
def _builder_class():
    """The TFDS builder of the sample sets (defined lazily: tensorflow_datasets is slow to import)."""
    import tensorflow_datasets as tfds

    class MtcnnSamples(tfds.core.GeneratorBasedBuilder):
        """MTCNN training samples of one stage, with provenance: the source image, the crop, the flip."""

        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=s, description=f"{n}x{n} crops") for s, n in INPUT_SIZE.items()]

        def __init__(self, *, examples=None, **kwargs):
            self._examples = examples
            super().__init__(file_format="array_record", **kwargs)

        def _info(self):
            n, f = INPUT_SIZE[self.builder_config.name], tfds.features
            return tfds.core.DatasetInfo(builder=self, description=self.__doc__, features=f.FeaturesDict({
                "image": f.Tensor(shape=(n, n, 3), dtype=np.uint8), "label": f.Tensor(shape=(), dtype=np.int32),
                "box": f.Tensor(shape=(4,), dtype=np.float32), "landmarks": f.Tensor(shape=(10,), dtype=np.float32),
                "source": f.Text(), "crop": f.Tensor(shape=(4,), dtype=np.float32),
                "flipped": f.Tensor(shape=(), dtype=np.bool_)}))

        def _split_generators(self, dl_manager):
            return {"train": self._examples()}

        def _generate_examples(self):
            raise NotImplementedError  # the examples come from the constructor

    return MtcnnSamples


def examples(results: list[dict], keep: list[np.ndarray], work_dir: Path) -> Iterator[tuple[str, dict]]:
    """The kept samples as TFDS examples, reading each image's pixels back from work_dir."""
    for r, keep_N in zip(results, keep):
        if not keep_N.any():
            continue
        pixels = np.load(work_dir / f"{r['kind']}_{r['index']:08d}.npy")
        for row in np.nonzero(keep_N)[0]:
            t = r["table"]
            yield f"{r['kind']}{r['index']:08d}_{row:05d}", {
                "image": pixels[row], "label": t["label"][row], "box": t["box"][row], "landmarks": t["landmarks"][row],
                "source": r["path"], "crop": t["crop"][row], "flipped": t["flipped"][row]}


def write_dataset(out: Path, stage: str, results: list[dict], keep: list[np.ndarray], work_dir: Path) -> Path:
    """Write the kept samples as the TFDS dataset mtcnn_samples/<stage> under `out` (array_record).

    TFDS shuffles the records in memory up to 1 GB and beyond that spills them to files written with
    TensorFlow, which this package does not install; the buffer is unbounded while writing instead (the set
    is held in memory once, as the trainer holds it anyway)."""
    from tensorflow_datasets.core import shuffle

    builder = _builder_class()(config=stage, data_dir=str(out), examples=lambda: examples(results, keep, work_dir))
    default, shuffle.MAX_MEM_BUFFER_SIZE = shuffle.MAX_MEM_BUFFER_SIZE, sys.maxsize
    try:
        builder.download_and_prepare()
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = default
    return Path(builder.data_dir)


class Samples:
    """Random access to a written sample set: len(s), s[i] -> {"image", "label", "box", "landmarks",
    "source", "crop", "flipped"} with python label/flipped and str source."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self._plain(self.source[i])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Many records in one read (much faster than one by one for array_record)."""
        return [self._plain(r) for r in self.source.__getitems__([int(i) for i in indices])]

    @staticmethod
    def _plain(record: dict) -> dict[str, Any]:
        r, src = dict(record), record["source"]
        r.update(label=int(r["label"]), flipped=bool(r["flipped"]), source=src.decode() if isinstance(src, bytes) else src)
        return r


def load(directory: str | Path) -> Samples:
    """The sample set written under `directory` by `make_samples` (or the CLI), through tfds' data source."""
    import tensorflow_datasets as tfds

    found = sorted(Path(directory).glob("**/dataset_info.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one sample set under {directory}, found {len(found)}")
    return Samples(tfds.builder_from_directory(str(found[0].parent)).as_data_source(split="train"))


# ----------------------------------------------------------------------------------------- pipeline

def summarise(results: list[dict], available: dict, kept: dict, cfg: SampleConfig, extra: dict) -> dict:
    """Counts per type (generated, kept, dropped by the mix), inputs skipped by reason with first names."""
    from mtcnn_jax.datasets import Skipped

    skipped = Skipped()
    for r in results:
        for reason in r.get("skipped", []):
            skipped.add(reason, r["path"])
    return {"stage": cfg.stage, "size": cfg.size, "seed": cfg.seed, "ratio": list(cfg.ratio),
            "square_faces": cfg.square_faces,
            "images": sum(r["kind"] == "wider" for r in results),
            "landmark_faces": sum(r["kind"] == "landmark" for r in results),
            "generated": available, "kept": kept, "dropped_by_ratio": {t: available[t] - kept[t] for t in TYPES},
            "total": sum(kept.values()),
            "skipped": {k: {"count": n, "first": skipped.names[k]} for k, n in skipped.counts.items()}, **extra}


def make_samples(wider: str | Path, landmarks: str | Path | None, out: str | Path, cfg: SampleConfig = SampleConfig(),
                 *, weights: str | Path | None = None, max_images: int | None = None,
                 max_landmarks: int | None = None, workers: int | None = None) -> dict:
    """Make one stage's sample set from WIDER FACE training images and a landmark set, write it to `out` as
    a TFDS dataset with summary.json beside it, and return the summary. Raises SamplesError if empty."""
    out, start = Path(out), time.perf_counter()
    if (out / "mtcnn_samples" / cfg.stage).exists():
        raise FileExistsError(f"{out / 'mtcnn_samples' / cfg.stage} exists: pick a new --out or delete it")
    jobs = wider_jobs(wider, max_images) + (landmark_jobs(landmarks, max_landmarks) if landmarks else [])
    extra: dict[str, Any] = {}
    if cfg.stage != "pnet":
        from mtcnn_jax.detect import resolve_params

        params = resolve_params(str(weights) if weights else None)
        extra["overflow"] = add_detections([j for j in jobs if j["kind"] == "wider"], params, cfg.stage)
    work_dir = out / ".work"
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_jobs(jobs, cfg, work_dir, workers or os.cpu_count() or 1)
        keep, available, kept = choose(results, cfg.ratio, cfg.seed)
        extra["seconds"] = round(time.perf_counter() - start, 2)
        summary = summarise(results, available, kept, cfg, extra)
        if summary["total"] == 0:
            raise SamplesError(f"no samples: {json.dumps(summary)}")
        summary["dataset"] = str(write_dataset(out, cfg.stage, results, keep, work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def parse_ratio(text: str) -> tuple[float, float, float, float]:
    """"3:1:1:2" -> (3, 1, 1, 2): negative : positive : part : landmark."""
    parts = [float(p) for p in text.split(":")]
    if len(parts) != 4 or min(parts) < 0 or max(parts) == 0:
        raise argparse.ArgumentTypeError(f"--ratio needs four non-negative numbers like 3:1:1:2, got {text!r}")
    return tuple(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mtcnn_jax.samples", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(INPUT_SIZE))
    p.add_argument("--wider", required=True, help="WIDER FACE root (WIDER_train/images, wider_face_split/)")
    p.add_argument("--landmarks", help="LFW+Net folder (trainImageList.txt) or CelebA folder (list_*_celeba.txt, img_celeba/)")
    p.add_argument("--out", required=True, help="output folder (the dataset and summary.json)")
    p.add_argument("--weights", help="cascade checkpoint dir for R-Net/O-Net mining (default: the original weights)")
    p.add_argument("--max-images", type=int, help="first N WIDER training images only")
    p.add_argument("--max-landmarks", type=int, help="first N landmark faces only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--ratio", type=parse_ratio, default=(3, 1, 1, 2), help="negative:positive:part:landmark")
    p.add_argument("--flip-prob", type=float, default=0.5, help="mirror positives and landmark samples")
    p.add_argument("--min-face", type=int, default=20,
                   help="faces and R-/O-Net detections smaller than this (pixels) are not cropped around")
    p.add_argument("--face-jitters", type=int, default=0,
                   help="R-/O-Net: also N jittered crops around each face, besides the detections")
    p.add_argument("--square-faces", action="store_true",
                   help="label crops by IoU with each face's square box (narrow faces can be positives)")
    from mtcnn_jax import compile_cache  # imports JAX: kept out of the sample workers' imports

    compile_cache.add_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage != "pnet":  # only R-Net and O-Net samples run the cascade
        from mtcnn_jax import compile_cache

        try:
            compile_cache.configure(args.compile_cache)
        except ValueError as err:
            parser.error(str(err))
    cfg = SampleConfig(stage=args.stage, ratio=args.ratio, seed=args.seed, flip_prob=args.flip_prob,
                       hard_face_jitters=args.face_jitters, min_face=args.min_face, square_faces=args.square_faces)
    try:
        summary = make_samples(args.wider, args.landmarks, args.out, cfg, weights=args.weights,
                               max_images=args.max_images, max_landmarks=args.max_landmarks, workers=args.workers)
    except (SamplesError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
