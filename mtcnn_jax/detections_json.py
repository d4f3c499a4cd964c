"""The detections file every evaluator reads, and the error they raise on bad input.

Detections are JSON mapping an image path to {"boxes": [[x1, y1, x2, y2, score], ...],
"landmarks": [[[x, y] x 5], ...]} ("landmarks" optional; other keys such as "overflow" and "converted"
ignored), as `Detections.to_json()` and the detect CLI write them. An image the detect CLI could not read
is {"error": message}: it counts as an image where nothing was found (its faces are missed, as they
were). The image paths are matched to each benchmark's names by their last components (path_parts,
strip_ext).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


class EvaluationError(ValueError):
    """Bad detections or ground truth: the message names the image at fault."""


def _image_detections(name: str, value: Any) -> dict[str, np.ndarray | None]:
    """One image's {"boxes", "landmarks"} as float arrays (N, 5) and (N, 5, 2) or None, validated; an
    {"error": message} entry (an image the detector could not read) as no boxes."""
    if isinstance(value, dict) and "error" in value and "boxes" not in value:
        return {"boxes": np.zeros((0, 5)), "landmarks": None}
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


def path_parts(path: str) -> list[str]:
    """Path components with either separator; used to match keys whatever the directory prefix."""
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def strip_ext(name: str) -> str:
    """File name without its extension ("img_591.jpg" -> "img_591")."""
    stem, dot, ext = name.rpartition(".")
    return stem if dot and stem and "/" not in ext else name
