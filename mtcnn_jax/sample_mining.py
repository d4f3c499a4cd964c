"""Hard examples for R-Net and O-Net (Zhang et al. 2016, Sec. III-A): the earlier stages' detections.

R-Net is trained on what P-Net lets through and O-Net on what P-Net and R-Net let through, labelled by
IoU with the ground truth like any other crop (sample_geometry.hard_specs). The cascade runs here, in the
main process, one image at a time, before the sample workers start.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from mtcnn_jax.buckets import bucket_shape, header_hw, pad_to_bucket
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.compiled import detect_bucket
from mtcnn_jax.detect import resolve_params
from mtcnn_jax.pyramid import pyramid_scales
from mtcnn_jax.sample_worker import decode_image

# The public pipeline mines with low thresholds (P-Net 0.3, R-Net 0.1) so that many hard negatives pass.
MINING_CONFIG = dict(thresholds=(0.3, 0.1, 0.7), window_capacity=4096, pnet_capacity=1024,
                     rnet_capacity=256)
UPTO = {"rnet": "pnet", "onet": "rnet"}  # the last stage run for each stage's samples


def candidates(params: dict, image_HxWx3: np.ndarray, config: CascadeConfig, upto: str) -> tuple[np.ndarray, dict]:
    """One image's candidates after stage `upto` (boxes_Dx4, 1-based inclusive) and the capacity overflow."""
    h, w = image_HxWx3.shape[:2]
    if not pyramid_scales(h, w, config.min_face_size, config.scale_factor):
        return np.zeros((0, 4)), {}
    batch, sizes = pad_to_bucket([image_HxWx3], bucket_shape(h, w, config))
    out = detect_bucket(params, batch, sizes, config, upto=upto)
    dets_Dx4 = np.asarray(out["boxes"][0])[np.asarray(out["valid"][0], bool)]
    return dets_Dx4, {name: int(np.asarray(c)[0]) for name, c in out["overflow"].items()}


def add_detections(jobs: list[dict], read: Callable[[dict], bytes], params: Any, stage: str,
                   config: CascadeConfig | None = None) -> dict[str, int]:
    """Give each WIDER job the candidates of the stages before `stage` ("dets"): P-Net's for R-Net samples,
    P-Net + R-Net's for O-Net samples. `read(job)` gives the job's image file bytes; `params` is what
    `detect.resolve_params` takes (None: the original weights; a checkpoint dir; a param tree). Images run
    one at a time, ordered by (coarse) bucket so that each bucket compiles once; returns the candidates
    dropped by full capacities, per stage."""
    params, config = resolve_params(params), config or CascadeConfig(**MINING_CONFIG)
    upto, overflow = UPTO[stage], {}
    shapes = [bucket_shape(*(header_hw(io.BytesIO(read(job))) or (0, 0)), config) for job in jobs]
    order = sorted(range(len(jobs)), key=shapes.__getitem__)
    for k in tqdm(order, desc=f"{upto} detections", unit="image", file=sys.stderr):
        job = jobs[k]
        job["dets"] = np.zeros((0, 4))
        image = decode_image(read(job), job["path"])
        if image is None:
            continue  # run_job reports it
        job["dets"], over = candidates(params, image, config, upto)
        for name, n in over.items():
            overflow[name] = overflow.get(name, 0) + n
    return overflow
