"""Benchmark evaluators that follow the official protocols: WIDER FACE, FDDB and 5-point landmarks.

Detections are read as JSON mapping an image path to {"boxes": [[x1, y1, x2, y2, score], ...],
"landmarks": [[[x, y] x 5], ...]} ("landmarks" optional). Run `python -m mtcnn_jax.evaluate -h`.

WIDER FACE follows the official eval_tools (wider_eval.m; the Python port wider_face_evaluation:
norm_score, image_eval, img_pr_info, dataset_pr_info, voc_ap), vectorised per image. FDDB follows
Jain & Learned-Miller's evaluate.cpp (Matching.cpp, Results.cpp).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from scipy.io import loadmat
from scipy.optimize import linear_sum_assignment

from mtcnn_jax.boxes import iou_matrix

WIDER_SETTINGS = ("easy", "medium", "hard")


class EvaluationError(ValueError):
    """Bad detections or ground truth: the message names the image at fault."""


# --------------------------------------------------------------------------------------------
# Detections: loading and validation
# --------------------------------------------------------------------------------------------


def _image_detections(name: str, value: Any) -> dict[str, np.ndarray | None]:
    """One image's {"boxes", "landmarks"} as float arrays (N, 5) and (N, 5, 2) or None, validated."""
    if not isinstance(value, dict) or not isinstance(value.get("boxes"), list):
        raise EvaluationError(f"{name}: expected an object with a 'boxes' list, got {type(value).__name__}")
    try:
        boxes_Nx5 = np.asarray(value["boxes"], dtype=np.float64).reshape(-1, 5)
    except (TypeError, ValueError) as e:
        raise EvaluationError(
            f"{name}: boxes must be [x1, y1, x2, y2, score] rows of numbers ({e})"
        ) from None
    if len(boxes_Nx5) != len(value["boxes"]):
        raise EvaluationError(f"{name}: boxes must be [x1, y1, x2, y2, score] rows of numbers")
    if not np.isfinite(boxes_Nx5[:, 4]).all():
        raise EvaluationError(f"{name}: NaN or infinite score")
    if not np.isfinite(boxes_Nx5[:, :4]).all():
        raise EvaluationError(f"{name}: NaN or infinite box coordinate")
    bad = np.flatnonzero((boxes_Nx5[:, 2] < boxes_Nx5[:, 0]) | (boxes_Nx5[:, 3] < boxes_Nx5[:, 1]))
    if len(bad):
        raise EvaluationError(
            f"{name}: box {bad[0]} has x2 < x1 or y2 < y1: {boxes_Nx5[bad[0], :4].tolist()}"
        )
    landmarks = value.get("landmarks")
    if landmarks is None:
        return {"boxes": boxes_Nx5, "landmarks": None}
    try:
        landmarks_Nx5x2 = np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2)
    except (TypeError, ValueError) as e:
        raise EvaluationError(f"{name}: landmarks must be 5 [x, y] points per box ({e})") from None
    if len(landmarks_Nx5x2) != len(boxes_Nx5) or not np.isfinite(landmarks_Nx5x2).all():
        raise EvaluationError(
            f"{name}: landmarks must be finite, 5 [x, y] points for each of the {len(boxes_Nx5)} boxes"
        )
    return {"boxes": boxes_Nx5, "landmarks": landmarks_Nx5x2}


def validate_detections(raw: Any) -> dict[str, dict[str, np.ndarray | None]]:
    """Checks the {image: {"boxes", "landmarks"}} structure and returns it with numpy arrays."""
    if not isinstance(raw, dict):
        raise EvaluationError(
            f"detections must be a JSON object mapping image paths to detections, got {type(raw).__name__}"
        )
    out = {}
    for name, value in raw.items():
        if isinstance(value, dict) and isinstance(value.get("boxes"), np.ndarray):
            value = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in value.items()}
        out[str(name)] = _image_detections(str(name), value)
    return out


def load_detections(path: str | Path) -> dict[str, dict[str, np.ndarray | None]]:
    """Reads and validates a detections JSON file (see the module docstring for the format)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise EvaluationError(f"{path}: malformed JSON ({e})") from None
    return validate_detections(raw)


def _parts(path: str) -> list[str]:
    """Path components with either separator; used to match keys whatever the directory prefix."""
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def _strip_ext(name: str) -> str:
    """File name without its extension ("img_591.jpg" -> "img_591")."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and stem and "/" not in ext else name


# --------------------------------------------------------------------------------------------
# WIDER FACE (official eval_tools protocol)
# --------------------------------------------------------------------------------------------


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
    parts = _parts(path)
    if not parts:
        raise EvaluationError(f"empty image path {path!r}")
    return "/".join(parts[-2:-1] + [_strip_ext(parts[-1])])


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


# --------------------------------------------------------------------------------------------
# FDDB (evaluate.cpp protocol)
# --------------------------------------------------------------------------------------------


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
        parts = _parts(name)
        parts[-1:] = [_strip_ext(parts[-1])] if parts else []
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


# --------------------------------------------------------------------------------------------
# 5-point landmarks (normalised mean error)
# --------------------------------------------------------------------------------------------


def _read_rows(path: str | Path, skip: int, n_values: int) -> list[tuple[str, np.ndarray]]:
    """Whitespace-separated "name v1 .. vn" rows after `skip` header lines."""
    rows = []
    for no, line in enumerate(Path(path).read_text().splitlines()[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        try:
            values = np.asarray([float(v) for v in fields[1 : 1 + n_values]])
        except ValueError as e:
            raise EvaluationError(f"{path}:{no}: {fields[0]}: {e}") from None
        if len(values) != n_values:
            raise EvaluationError(f"{path}:{no}: {fields[0]}: expected {n_values} numbers, got {len(values)}")
        rows.append((fields[0].replace("\\", "/"), values))
    return rows


def read_landmark_list(path: str | Path, fmt: str = "lfw", bbox_path: str | Path | None = None) -> list[dict]:
    """Ground-truth faces as [{"path", "box" (x1, y1, x2, y2), "points" (5, 2)}].

    "lfw": LFW+Net lists "path left right top bottom x1 y1 .. x5 y5". "celeba":
    list_landmarks_celeba.txt plus list_bbox_celeba.txt ("name x_1 y_1 width height"), 2 header lines each.
    """
    if fmt == "lfw":
        return [
            {"path": p, "box": v[[0, 2, 1, 3]], "points": v[4:].reshape(5, 2)}
            for p, v in _read_rows(path, 0, 14)
        ]
    if fmt != "celeba":
        raise EvaluationError(f"unknown landmark list format {fmt!r} (lfw or celeba)")
    if bbox_path is None:
        raise EvaluationError("the celeba format needs --bbox-list (list_bbox_celeba.txt) to match faces")
    boxes = {p: np.array([v[0], v[1], v[0] + v[2], v[1] + v[3]]) for p, v in _read_rows(bbox_path, 2, 4)}
    entries = []
    for p, v in _read_rows(path, 2, 10):
        if p not in boxes:
            raise EvaluationError(f"{p}: no box in {bbox_path}")
        entries.append({"path": p, "box": boxes[p], "points": v.reshape(5, 2)})
    return entries


def _match_landmark_images(pred: dict, entries: list[dict], root: str | Path | None) -> dict[str, str]:
    """Maps each predicted image to a list path: relative to `root`, else by path suffix."""
    paths = {e["path"] for e in entries}
    root_parts = _parts(str(Path(root).resolve())) if root is not None else []
    out = {}
    for name in pred:
        parts = _parts(name)
        if root_parts and parts[: len(root_parts)] == root_parts:
            parts = parts[len(root_parts) :]
        rel = "/".join(parts)
        match = (
            rel
            if rel in paths
            else next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in paths), None)
        )
        if match is None:
            match = next((p for p in paths if p.endswith("/" + rel)), None)
        if match is None:
            raise EvaluationError(f"{name}: image is not in the landmark list")
        out[name] = match
    return out


def landmark_errors(pred_5x2: np.ndarray, gt_5x2: np.ndarray, gt_box: np.ndarray) -> dict[str, np.ndarray]:
    """Per-point errors normalised by inter-ocular distance (eye points) and by the GT box diagonal."""
    dist_5 = np.linalg.norm(pred_5x2 - gt_5x2, axis=1)
    inter_ocular = np.linalg.norm(gt_5x2[0] - gt_5x2[1])
    diagonal = math.hypot(gt_box[2] - gt_box[0], gt_box[3] - gt_box[1])
    return {"inter_ocular": dist_5 / max(inter_ocular, 1e-12), "box_diagonal": dist_5 / max(diagonal, 1e-12)}


def _summarise_nme(per_point_Fx5: np.ndarray, missed: int, threshold: float) -> dict:
    """Mean per-point and overall NME over matched faces; failure rate counts missed faces as failures."""
    nme_F = per_point_Fx5.mean(axis=1) if len(per_point_Fx5) else np.zeros(0)
    total = len(nme_F) + missed
    return {
        "nme": float(nme_F.mean()) if len(nme_F) else float("nan"),
        "per_point": per_point_Fx5.mean(axis=0).tolist() if len(nme_F) else [float("nan")] * 5,
        "failure_rate": float((np.count_nonzero(nme_F > threshold) + missed) / total)
        if total
        else float("nan"),
        "errors": np.concatenate([nme_F, np.full(missed, np.inf)]),
    }


def evaluate_landmarks(
    pred: dict,
    entries: list[dict],
    root: str | Path | None = None,
    iou_thresh: float = 0.5,
    failure_threshold: float = 0.1,
) -> dict:
    """5-point NME of the faces of the predicted images: each GT face takes the best-IoU prediction.

    A GT face with no prediction at IoU >= `iou_thresh` is missed: reported and
    counted as a failure (its error is inf in the CED). Errors normalised by inter-ocular distance and
    by the GT box diagonal; "errors" hold per-face NME for the CED plot.
    """
    dets = validate_detections(pred)
    image_of = _match_landmark_images(dets, entries, root)
    by_path = {}
    for name, path in image_of.items():
        if path in by_path:
            raise EvaluationError(f"{name}: second set of detections for {path}")
        by_path[path] = dets[name]
    per_point = {"inter_ocular": [], "box_diagonal": []}
    missed, faces = [], 0
    for e in entries:
        d = by_path.get(e["path"])
        if d is None:
            continue
        faces += 1
        if d["landmarks"] is None and len(d["boxes"]):
            raise EvaluationError(f"{e['path']}: detections have no 'landmarks' to evaluate")
        ious = iou_matrix(e["box"][None], d["boxes"][:, :4])[0] if len(d["boxes"]) else np.zeros(0)
        if len(ious) == 0 or ious.max() < iou_thresh:
            missed.append(e["path"])
            continue
        for norm, err in landmark_errors(d["landmarks"][ious.argmax()], e["points"], e["box"]).items():
            per_point[norm].append(err)
    result: dict[str, Any] = {
        "images": len(by_path),
        "faces": faces,
        "missed": len(missed),
        "missed_images": missed,
    }
    for norm, errs in per_point.items():
        result[norm] = _summarise_nme(np.asarray(errs).reshape(-1, 5), len(missed), failure_threshold)
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _write_json(path: str | None, summary: dict) -> None:
    """Writes the summary numbers (no arrays) as JSON when a path is given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(summary, indent=2) + "\n")


def _save_plot(plot_fn, data: Any, path: str | None) -> None:
    """Saves a figure with the non-interactive Agg backend (the CLI needs no display)."""
    if not path:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close(plot_fn(data, path=path))


def _cmd_wider(args: argparse.Namespace) -> None:
    """The `wider` subcommand: prints AP per setting, writes --json and --plot."""
    from mtcnn_jax import visualize

    res = evaluate_wider(load_detections(args.pred), args.gt_dir)
    summary = {s: res[s] for s in WIDER_SETTINGS} | {"images": res["images"]}
    print(f"WIDER FACE val, {res['images']} of {res['split_images']} images")
    for s in WIDER_SETTINGS:
        print(f"  {s:<6} AP {res[s]:.4f}")
    _write_json(args.json, summary)
    curves = {s: res["curves"][s] | {"ap": res[s]} for s in WIDER_SETTINGS}
    _save_plot(visualize.plot_pr_curves, curves, args.plot)


def _cmd_fddb(args: argparse.Namespace) -> None:
    """The `fddb` subcommand: prints TPR at 1000 / 2000 false positives, writes --json and --plot."""
    from mtcnn_jax import visualize

    res = evaluate_fddb(load_detections(args.pred), args.folds)
    summary = {k: v for k, v in res.items() if k != "roc"}
    print(f"FDDB, {res['images']} of {res['split_images']} images, {res['faces']} faces")
    for n in (1000, 2000):
        print(
            f"  TPR at {n} FP: discrete {res[f'discrete_tpr_at_{n}fp']:.4f}, "
            f"continuous {res[f'continuous_tpr_at_{n}fp']:.4f}"
        )
    _write_json(args.json, summary)
    _save_plot(visualize.plot_roc, res["roc"], args.plot)


def _cmd_landmarks(args: argparse.Namespace) -> None:
    """The `landmarks` subcommand: prints NME and failure rates, writes --json and --plot (CED)."""
    from mtcnn_jax import visualize

    entries = read_landmark_list(args.list, args.format, args.bbox_list)
    res = evaluate_landmarks(load_detections(args.pred), entries, root=args.root)
    summary = {k: res[k] for k in ("images", "faces", "missed")}
    print(
        f"Landmarks, {res['images']} images, {res['faces']} faces, "
        f"{res['missed']} missed (counted as failures)"
    )
    for norm in ("inter_ocular", "box_diagonal"):
        r = res[norm]
        summary[norm] = {k: r[k] for k in ("nme", "per_point", "failure_rate")}
        points = " ".join(f"{e:.4f}" for e in r["per_point"])
        print(f"  {norm:<12} NME {r['nme']:.4f}  per point {points}  failure@0.1 {r['failure_rate']:.4f}")
    _write_json(args.json, summary)
    _save_plot(visualize.plot_ced, {n: res[n]["errors"] for n in ("inter_ocular", "box_diagonal")}, args.plot)


def build_parser() -> argparse.ArgumentParser:
    """argparse with one subcommand per benchmark."""
    parser = argparse.ArgumentParser(prog="python -m mtcnn_jax.evaluate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wider", help="WIDER FACE val AP (official protocol)")
    p.add_argument("--pred", required=True, help="detections JSON")
    p.add_argument(
        "--gt-dir", required=True, help="folder with wider_face_val.mat and wider_{easy,medium,hard}_val.mat"
    )
    p.set_defaults(run=_cmd_wider)
    p = sub.add_parser("fddb", help="FDDB discrete / continuous ROC")
    p.add_argument("--pred", required=True, help="detections JSON")
    p.add_argument("--folds", required=True, help="folder with FDDB-fold-XX-ellipseList.txt")
    p.set_defaults(run=_cmd_fddb)
    p = sub.add_parser("landmarks", help="5-point normalised mean error")
    p.add_argument("--pred", required=True, help="detections JSON with landmarks")
    p.add_argument("--list", required=True, help="LFW+Net list or list_landmarks_celeba.txt")
    p.add_argument("--root", required=True, help="folder the list paths are relative to")
    p.add_argument("--format", choices=("lfw", "celeba"), default="lfw")
    p.add_argument("--bbox-list", help="list_bbox_celeba.txt (celeba format)")
    p.set_defaults(run=_cmd_landmarks)
    for p in sub.choices.values():
        p.add_argument("--json", help="write the numbers here")
        p.add_argument("--plot", help="save the curves here (PNG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand; bad input becomes a one-line message and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (EvaluationError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
