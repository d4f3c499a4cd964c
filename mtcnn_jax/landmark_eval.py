"""Five-point landmark evaluation: ground-truth lists (LFW+Net, CelebA) and the normalised mean error.

The paper's Section III.E measure: point error over the inter-ocular distance (and, as often reported
too, over the box diagonal), with a missed face counted as a failure.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from mtcnn_jax.boxes import iou_matrix
from mtcnn_jax.detections_json import EvaluationError, path_parts, validate_detections


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
    root_parts = path_parts(str(Path(root).resolve())) if root is not None else []
    out = {}
    for name in pred:
        parts = path_parts(name)
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
