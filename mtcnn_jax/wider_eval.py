"""WIDER FACE evaluation: the official eval_tools protocol (Yang et al. 2016), AP per easy / medium / hard.

Follows wider_eval.m and its Python port wider_face_evaluation (norm_score, image_eval, img_pr_info,
dataset_pr_info, voc_ap), vectorised per image: same matching, precision-recall curves and AP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.io import loadmat

from mtcnn_jax.boxes import iou_matrix
from mtcnn_jax.detections_json import EvaluationError, path_parts, strip_ext, validate_detections

WIDER_SETTINGS = ("easy", "medium", "hard")


def _cell(x: Any) -> list:
    """The entries of a MATLAB cell column as loaded by scipy.io.loadmat."""
    return [row[0] for row in x]


def load_wider_gt(gt_dir: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """WIDER val ground truth per "event/file": boxes_Gx4 (x1, y1, x2, y2) and per-setting counted masks.

    Boxes are x, y, w, h in the .mat and become x2 = x + w, y2 = y + h as in the official get_gt_boxes;
    a face is counted at a setting when its 1-based index is in that setting's gt_list.
    """
    gt_dir = Path(gt_dir)
    gt = loadmat(str(gt_dir / "wider_face_val.mat"))
    settings = {s: _cell(loadmat(str(gt_dir / f"wider_{s}_val.mat"))["gt_list"]) for s in WIDER_SETTINGS}
    images = {}
    for e, (event, files, boxes) in enumerate(
        zip(_cell(gt["event_list"]), _cell(gt["file_list"]), _cell(gt["face_bbx_list"]), strict=True)
    ):
        for i, (file, xywh) in enumerate(zip(_cell(files), _cell(boxes), strict=True)):
            boxes_Gx4 = np.asarray(xywh, dtype=np.float64).reshape(-1, 4).copy()
            boxes_Gx4[:, 2:] += boxes_Gx4[:, :2]
            entry = {"boxes": boxes_Gx4}
            for s, lists in settings.items():
                keep = np.asarray(_cell(lists[e])[i], dtype=np.int64).ravel()
                counted_G = np.zeros(len(boxes_Gx4), dtype=bool)
                counted_G[keep - 1] = True
                entry[s] = counted_G
            images[f"{str(event[0])}/{str(file[0])}"] = entry
    return images


def wider_key(path: str) -> str:
    """The "event/file" key of a WIDER image path, whatever its prefix and extension."""
    parts = path_parts(path)
    if not parts:
        raise EvaluationError(f"empty image path {path!r}")
    return "/".join(parts[-2:-1] + [strip_ext(parts[-1])])


def _match_wider(pred: dict, gt: dict) -> dict[str, np.ndarray]:
    """Maps each predicted image to its GT key; a prediction for an unknown image is an error."""
    by_file = {k.split("/")[1]: k for k in gt}
    matched = {}
    for name, dets in pred.items():
        key = wider_key(name)
        if key not in gt and "/" not in key:
            key = by_file.get(key, key)
        if key not in gt:
            raise EvaluationError(f"{name}: image is not in the WIDER FACE val ground truth")
        if key in matched:
            raise EvaluationError(f"{name}: second set of detections for WIDER image {key}")
        matched[key] = dets["boxes"]
    return matched


def norm_score(dets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Min-max normalises the scores over all detections of all images (official norm_score)."""
    scores = [d[:, 4] for d in dets.values() if len(d)]
    if not scores:
        return dict(dets)
    lo, hi = min(s.min() for s in scores), max(s.max() for s in scores)
    out = {}
    for k, d in dets.items():
        d = d.copy()
        # The official code divides by max - min; with one distinct score every detection is kept.
        d[:, 4] = (d[:, 4] - lo) / (hi - lo) if hi > lo else 1.0
        out[k] = d
    return out


def best_faces(
    pred_Nx5: np.ndarray, gt_Gx4: np.ndarray, iou_thresh: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Each detection's best-IoU face and whether that IoU reaches `iou_thresh` (as in image_eval)."""
    overlaps_NxG = iou_matrix(pred_Nx5[:, :4], gt_Gx4)
    best_N = overlaps_NxG.argmax(axis=1)
    return best_N, overlaps_NxG[np.arange(len(best_N)), best_N] >= iou_thresh


def recall_and_proposals(
    best_N: np.ndarray, hit_N: np.ndarray, counted_G: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Recalled-face count so far and proposal flag per detection, from its best face (image_eval).

    A hit on an ignored face makes the detection no proposal (-1); a counted face is recalled by the
    first detection hitting it, later ones stay proposals (false positives).
    """
    proposal_N = np.where(hit_N & ~counted_G[best_N], -1, 1)
    recall_hit = np.flatnonzero(hit_N & counted_G[best_N])
    _, first = np.unique(best_N[recall_hit], return_index=True)
    new_face_N = np.zeros(len(best_N), dtype=np.int64)
    new_face_N[recall_hit[first]] = 1
    return np.cumsum(new_face_N), proposal_N


def image_eval(
    pred_Nx5: np.ndarray, gt_Gx4: np.ndarray, counted_G: np.ndarray, iou_thresh: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Official image_eval, vectorised: recalled faces so far and proposal flag per (sorted) detection."""
    return recall_and_proposals(*best_faces(pred_Nx5, gt_Gx4, iou_thresh), counted_G)


def wider_thresholds(thresh_num: int = 1000) -> np.ndarray:
    """The official score thresholds 1 - (t + 1) / thresh_num, t = 0 .. thresh_num - 1 (descending)."""
    return np.array([1 - (t + 1) / thresh_num for t in range(thresh_num)])


def img_pr_info(
    scores_N: np.ndarray, proposal_N: np.ndarray, pred_recall_N: np.ndarray, thresholds_T: np.ndarray
) -> np.ndarray:
    """(T, 2) proposals and recalled faces among detections scoring >= each threshold (official img_pr_info).

    The official loop takes the last index with score >= thresh, assuming scores sorted descending;
    one searchsorted replaces its per-threshold loop.
    """
    kept_T = np.searchsorted(-scores_N, -thresholds_T, side="right")
    cum_proposals = np.concatenate([[0], np.cumsum(proposal_N == 1)])
    cum_recall = np.concatenate([[0], pred_recall_N])
    return np.stack([cum_proposals[kept_T], cum_recall[kept_T]], axis=1).astype(np.float64)


def dataset_pr_info(pr_curve_Tx2: np.ndarray, count_face: int) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall per threshold from the summed (proposals, recalled) counts (dataset_pr_info)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        precision_T = pr_curve_Tx2[:, 1] / pr_curve_Tx2[:, 0]
        recall_T = pr_curve_Tx2[:, 1] / count_face if count_face else np.zeros(len(pr_curve_Tx2))
    # 0/0 only happens where nothing is proposed yet (recall 0), so it adds no area to the AP.
    return np.nan_to_num(precision_T), recall_T


def voc_ap(recall_T: np.ndarray, precision_T: np.ndarray) -> float:
    """VOC interpolated AP: area under the precision envelope (official voc_ap / VOCap)."""
    mrec = np.concatenate([[0.0], recall_T, [1.0]])
    mpre = np.concatenate([[0.0], precision_T, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def evaluate_wider(
    pred: dict, gt_dir: str | Path, iou_thresh: float = 0.5, thresh_num: int = 1000, gt: dict | None = None
) -> dict:
    """WIDER FACE AP per setting over the images present in `pred` (official protocol, vectorised).

    Returns {"easy": AP, "medium": AP, "hard": AP, "images": evaluated, "split_images": all val images,
    "curves": {setting: {"precision", "recall", "thresholds"}}}. `gt` may pass a cached load_wider_gt.
    """
    gt = load_wider_gt(gt_dir) if gt is None else gt
    dets = norm_score(_match_wider(validate_detections(pred), gt))
    thresholds_T = wider_thresholds(thresh_num)
    pr_curves = {s: np.zeros((thresh_num, 2)) for s in WIDER_SETTINGS}
    count_face = dict.fromkeys(WIDER_SETTINGS, 0)
    for key, d in dets.items():
        g = gt[key]
        for s in WIDER_SETTINGS:
            count_face[s] += int(g[s].sum())
        # Official: images without GT boxes or without detections add only their faces to count_face.
        if len(g["boxes"]) == 0 or len(d) == 0:
            continue
        d = d[np.argsort(-d[:, 4], kind="stable")]
        best_N, hit_N = best_faces(d, g["boxes"], iou_thresh)
        for s in WIDER_SETTINGS:
            pred_recall_N, proposal_N = recall_and_proposals(best_N, hit_N, g[s])
            pr_curves[s] += img_pr_info(d[:, 4], proposal_N, pred_recall_N, thresholds_T)
    result: dict[str, Any] = {"images": len(dets), "split_images": len(gt), "curves": {}}
    for s in WIDER_SETTINGS:
        precision_T, recall_T = dataset_pr_info(pr_curves[s], count_face[s])
        result[s] = voc_ap(recall_T, precision_T)
        result["curves"][s] = {"precision": precision_T, "recall": recall_T, "thresholds": thresholds_T}
    return result
