"""One image's training samples, cut out: the work each sample worker process does (Sec. III-A).

A job is one WIDER FACE image (its faces, and for R-/O-Net the earlier stages' detections) or one
landmark face, with the image file's bytes as its dataset stores them. `run_job` decodes the image, draws
and labels its crops (sample_geometry), cuts them to the stage's input size with PIL and saves the pixels.
Its random numbers come from (seed, kind, index) alone, so results do not depend on scheduling. This module
imports numpy, PIL and numpy-only package modules, never JAX or TFDS: worker processes start light.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from mtcnn_jax.images import ImageError, load_image
from mtcnn_jax.sample_geometry import SampleConfig, check_faces, hard_specs, landmark_specs, pnet_specs, specs

KIND_ID = {"wider": 0, "landmark": 1}  # a job's seed is (seed, KIND_ID[kind], index)


def decode_image(encoded: bytes, name: str) -> np.ndarray | None:
    """An image file's bytes as uint8 (H, W, 3) RGB, upright, exactly as `images.load_image` reads the file;
    None when it cannot be used (not decodable, not 8-bit RGB)."""
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            img.load()
            return load_image(img, name, strict=True)  # the samples as before: 8-bit RGB only
    except (ImageError, OSError, SyntaxError, ValueError):
        return None


def cut(image_HxWx3: np.ndarray, crops_Nx4: np.ndarray, size: int) -> np.ndarray:
    """The crops (inside the image, integer) resized to size x size with PIL's bilinear filter."""
    out = np.zeros((len(crops_Nx4), size, size, 3), np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(crops_Nx4, np.int64)):
        patch = Image.fromarray(image_HxWx3[y1:y2, x1:x2])
        out[k] = np.asarray(patch.resize((size, size), Image.BILINEAR))
    return out


def job_table(job: dict, hw: tuple[int, int], rng: np.random.Generator, cfg: SampleConfig):
    """A job's samples (no pixels) and the reasons for whatever of it was dropped."""
    if job["kind"] == "landmark":
        box = np.asarray(job["box"], np.float64)
        problem = next(iter(check_faces(box, hw)[1]), None)
        if problem:
            return specs([], [], []), [problem]
        return landmark_specs(hw, box, np.asarray(job["points"], np.float64), rng, cfg), []
    gt_Gx4, reasons = check_faces(job["gt"], hw)
    if cfg.stage == "pnet":
        return pnet_specs(hw, gt_Gx4, rng, cfg), reasons
    return hard_specs(hw, gt_Gx4, job["dets"], rng, cfg), reasons


def run_job(job: dict, cfg: SampleConfig, work_dir: str) -> dict:
    """Decode one job's image, make its samples, save their pixels to work_dir as <kind>_<index>.npy;
    returns the job's kind, index, path, sample table and skipped reasons (an unusable image is one)."""
    rng = np.random.default_rng([cfg.seed, KIND_ID[job["kind"]], job["index"]])
    result = {"kind": job["kind"], "index": job["index"], "path": job["path"], "table": specs([], [], [])}
    image = decode_image(job["image"], job["path"])
    if image is None:
        result["skipped"] = ["unreadable images"]
        return result
    table, result["skipped"] = job_table(job, image.shape[:2], rng, cfg)
    pixels = cut(image, table["crop"], cfg.size)
    pixels[table["flipped"]] = pixels[table["flipped"]][:, :, ::-1]
    if len(pixels):
        np.save(Path(work_dir) / f"{job['kind']}_{job['index']:08d}.npy", pixels)
    result["table"] = table
    return result
