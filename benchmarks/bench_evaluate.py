"""Times the WIDER FACE evaluation on synthetic detections for all 3,226 val images.

Detections are the official GT boxes jittered (80 % of faces found) plus random false positives,
fixed seed. Usage: python benchmarks/bench_evaluate.py [GT_DIR]
(default: $MTCNN_JAX_DATA or ../shared/data, then wider_face/eval_tools/ground_truth).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from mtcnn_jax.wider_eval import evaluate_wider, load_wider_gt


def synthetic_detections(gt: dict, seed: int = 0, recall: float = 0.8, false_per_image: int = 5) -> dict:
    """Jittered GT boxes (a `recall` share of them) plus random boxes, random scores, per image."""
    rng = np.random.default_rng(seed)
    pred = {}
    for key, g in gt.items():
        boxes = g["boxes"][rng.random(len(g["boxes"])) < recall]
        wh = np.maximum(boxes[:, 2:] - boxes[:, :2], 1.0)
        found = boxes + rng.normal(0, 0.08, boxes.shape) * np.tile(wh, 2)
        xy = rng.uniform(0, 900, (false_per_image, 2))
        false = np.concatenate([xy, xy + rng.uniform(10, 120, (false_per_image, 2))], axis=1)
        b = np.concatenate([found, false])
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2])
        scores = np.concatenate([rng.uniform(0.5, 1.0, len(found)), rng.uniform(0.0, 0.9, false_per_image)])
        pred[f"WIDER_val/images/{key}.jpg"] = {"boxes": np.column_stack([b, scores]).tolist()}
    return pred


def main() -> None:
    """Prints the load time, the evaluation time and images per second."""
    data = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    gt_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else data / "wider_face" / "eval_tools" / "ground_truth"
    t0 = time.perf_counter()
    gt = load_wider_gt(gt_dir)
    t_load = time.perf_counter() - t0
    pred = synthetic_detections(gt)
    n_det = sum(len(p["boxes"]) for p in pred.values())
    t0 = time.perf_counter()
    res = evaluate_wider(pred, gt_dir, gt=gt)
    t_eval = time.perf_counter() - t0
    print(f"ground truth load: {t_load:.2f} s")
    print(
        f"WIDER evaluation: {res['images']} images, {n_det} detections, "
        f"{t_eval:.2f} s, {res['images'] / t_eval:.0f} images/s"
    )
    print("AP easy / medium / hard: " + " / ".join(f"{res[s]:.3f}" for s in ("easy", "medium", "hard")))


if __name__ == "__main__":
    main()
