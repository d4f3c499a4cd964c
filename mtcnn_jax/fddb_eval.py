"""FDDB evaluation: ellipse-to-box overlaps and the discrete / continuous ROC (Jain & Learned-Miller 2010).

Follows the original evaluate.cpp (Matching.cpp: pixel-count overlaps and Hungarian matching;
Results.cpp: per-image statistics merged into one ROC over all scores).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy.optimize import linear_sum_assignment

from mtcnn_jax.boxes import iou_matrix
from mtcnn_jax.detections_json import EvaluationError, path_parts, strip_ext, validate_detections


def read_fddb_ellipses(path: str | Path) -> dict[str, np.ndarray]:
    """Parses an FDDB ellipse list: name, count, then "ra rb angle cx cy 1" per face -> name: (G, 5)."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    out, i = {}, 0
    while i < len(lines):
        name = lines[i]
        try:
            n = int(lines[i + 1])
            rows = [[float(v) for v in lines[i + 2 + j].split()[:5]] for j in range(n)]
            ellipses_Gx5 = np.asarray(rows, dtype=np.float64).reshape(n, 5)
        except (IndexError, ValueError) as e:
            raise EvaluationError(f"{path}: malformed ellipse list at image {name} ({e})") from None
        out[name] = ellipses_Gx5
        i += 2 + n
    return out


def load_fddb_folds(folds_dir: str | Path) -> dict[str, np.ndarray]:
    """All FDDB-fold-XX-ellipseList.txt annotations in a folder, keyed by image name (no extension)."""
    files = sorted(Path(folds_dir).glob("FDDB-fold-*-ellipseList.txt"))
    if not files:
        raise EvaluationError(f"{folds_dir}: no FDDB-fold-XX-ellipseList.txt files")
    out: dict[str, np.ndarray] = {}
    for f in files:
        out.update(read_fddb_ellipses(f))
    return out


def _ellipse_extent(e: np.ndarray) -> np.ndarray:
    """Axis-aligned bounds (x1, y1, x2, y2) of an ellipse (ra, rb, angle, cx, cy)."""
    ra, rb, angle, cx, cy = e
    hx = math.hypot(ra * math.cos(angle), rb * math.sin(angle))
    hy = math.hypot(ra * math.sin(angle), rb * math.cos(angle))
    return np.array([cx - hx, cy - hy, cx + hx, cy + hy])


def ellipse_rect_overlap(ellipse: np.ndarray, rect: np.ndarray) -> float:
    """Pixel-count intersection over union of an ellipse and a rectangle (Matching::computeScore).

    Both are rasterised on integer pixel centres over their union bounding box, as the original fills
    image-sized masks (cvEllipse with the major axis at `angle` radians; rectangles inclusive, +1).
    """
    ext = _ellipse_extent(ellipse)
    x0, y0 = math.floor(min(ext[0], rect[0])), math.floor(min(ext[1], rect[1]))
    x1, y1 = math.ceil(max(ext[2], rect[2])), math.ceil(max(ext[3], rect[3]))
    xs, ys = np.arange(x0, x1 + 1, dtype=np.float64), np.arange(y0, y1 + 1, dtype=np.float64)[:, None]
    ra, rb, angle, cx, cy = ellipse
    dx, dy = xs - cx, ys - cy
    u = (dx * math.cos(angle) + dy * math.sin(angle)) / ra
    v = (-dx * math.sin(angle) + dy * math.cos(angle)) / rb
    in_ellipse = u * u + v * v <= 1.0
    in_rect = ((xs >= rect[0]) & (xs <= rect[2])) & ((ys >= rect[1]) & (ys <= rect[3]))
    union = np.count_nonzero(in_ellipse | in_rect)
    return np.count_nonzero(in_ellipse & in_rect) / union if union else 0.0


def fddb_overlaps(ellipses_Gx5: np.ndarray, rects_Dx4: np.ndarray) -> np.ndarray:
    """(G, D) region overlaps; pairs whose bounding boxes do not meet are 0 without rasterising."""
    out_GxD = np.zeros((len(ellipses_Gx5), len(rects_Dx4)))
    if out_GxD.size == 0:
        return out_GxD
    ext_Gx4 = np.stack([_ellipse_extent(e) for e in ellipses_Gx5])
    meets = iou_matrix(ext_Gx4, rects_Dx4) > 0
    for g, d in zip(*np.nonzero(meets), strict=True):
        out_GxD[g, d] = ellipse_rect_overlap(ellipses_Gx5[g], rects_Dx4[d])
    return out_GxD


def fddb_image_results(overlaps_GxD: np.ndarray, scores_D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct score (descending): TP discrete, TP continuous and FP for detections >= it.

    As in evaluate.cpp / Results.cpp: Hungarian matching maximising total overlap among the valid
    detections, pairs with overlap > 0 are matches; TPDisc counts matches with overlap > 0.5,
    TPCont sums the overlaps of all matches, FP = valid detections - TPDisc (one FP for both ROCs).
    """
    thresholds_K = np.unique(scores_D)[::-1]
    stats_Kx3 = np.zeros((len(thresholds_K), 3))
    for k, t in enumerate(thresholds_K):
        valid = overlaps_GxD[:, scores_D >= t]
        rows, cols = linear_sum_assignment(valid, maximize=True)
        matched = valid[rows, cols]
        matched = matched[matched > 0]
        tp_disc = np.count_nonzero(matched > 0.5)
        stats_Kx3[k] = tp_disc, matched.sum(), valid.shape[1] - tp_disc
    return thresholds_K, stats_Kx3


def _match_fddb(pred: dict, gt: dict) -> dict[str, np.ndarray]:
    """Maps predicted paths to FDDB names ("2002/08/11/big/img_591") they end with, any extension."""
    matched = {}
    for name, dets in pred.items():
        parts = path_parts(name)
        parts[-1:] = [strip_ext(parts[-1])] if parts else []
        key = next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in gt), None)
        if key is None:
            raise EvaluationError(f"{name}: image is not in the FDDB fold annotations")
        if key in matched:
            raise EvaluationError(f"{name}: second set of detections for FDDB image {key}")
        matched[key] = dets["boxes"]
    return matched


def _tpr_at(fp_K: np.ndarray, tpr_K: np.ndarray, max_fp: float) -> float:
    """Best true positive rate with at most `max_fp` false positives (0 when none qualifies)."""
    ok = fp_K <= max_fp
    return float(tpr_K[ok].max()) if ok.any() else 0.0


def evaluate_fddb(pred: dict, folds_dir: str | Path, fp_points: Iterable[int] = (1000, 2000)) -> dict:
    """FDDB discrete and continuous ROC over the images present in `pred` (Jain & Learned-Miller 2010).

    Per image statistics at its own distinct scores are merged into one ROC over all distinct scores,
    an image contributing its statistics at the lowest of its thresholds still >= the global one
    (Results::merge). Returns the ROC arrays, TPR at `fp_points` false positives and image counts.
    """
    gt = load_fddb_folds(folds_dir)
    dets = _match_fddb(validate_detections(pred), gt)
    all_scores = np.concatenate([d[:, 4] for d in dets.values()] + [np.zeros(0)])
    thresholds_K = np.unique(all_scores)[::-1]
    increments_Kx3 = np.zeros((len(thresholds_K), 3))
    faces = 0
    for key, d in dets.items():
        faces += len(gt[key])
        if len(d) == 0:
            continue
        own_J, stats_Jx3 = fddb_image_results(fddb_overlaps(gt[key], d[:, :4]), d[:, 4])
        where_J = np.searchsorted(-thresholds_K, -own_J)
        np.add.at(increments_Kx3, where_J, np.diff(stats_Jx3, axis=0, prepend=0))
    tp_disc_K, tp_cont_K, fp_K = np.cumsum(increments_Kx3, axis=0).T
    tpr_disc_K, tpr_cont_K = (
        (tp_disc_K / faces, tp_cont_K / faces) if faces else (tp_disc_K * 0, tp_cont_K * 0)
    )
    result: dict[str, Any] = {"images": len(dets), "split_images": len(gt), "faces": faces}
    for n in fp_points:
        result[f"discrete_tpr_at_{n}fp"] = _tpr_at(fp_K, tpr_disc_K, n)
        result[f"continuous_tpr_at_{n}fp"] = _tpr_at(fp_K, tpr_cont_K, n)
    result["roc"] = {
        "thresholds": thresholds_K,
        "fp": fp_K,
        "tpr_discrete": tpr_disc_K,
        "tpr_continuous": tpr_cont_K,
    }
    return result
