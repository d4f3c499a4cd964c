"""Detections drawn into a copy of the image with PIL: what the detect CLI's --draw writes.

PIL and numpy only, so that the detector starts without matplotlib (visualize.py draws the same marks
with matplotlib for notebooks). Boxes are rectangles labelled with their score, the five landmarks dots
of five colours (left eye, right eye, nose, left and right mouth corner).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

LANDMARK_NAMES = ("left eye", "right eye", "nose", "left mouth", "right mouth")
LANDMARK_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4")
BOX_COLOUR = "#00e5ff"


def as_arrays(detections_or_boxes: Any, scores: Any = None, landmarks: Any = None):
    """boxes_Kx4, scores_K (or None), landmarks_Kx5x2 (or None) from a Detections-like object, or from
    a (K, 4) / (K, 5) box array (the fifth column read as scores) with optional scores and landmarks."""
    if hasattr(detections_or_boxes, "boxes"):
        d = detections_or_boxes
        boxes, scores, landmarks = d.boxes, getattr(d, "scores", None), getattr(d, "landmarks", None)
    else:
        boxes = detections_or_boxes
    boxes = np.asarray(boxes, np.float64).reshape(-1, np.shape(boxes)[-1] if np.size(boxes) else 4)
    if boxes.shape[1] == 5 and scores is None:
        scores = boxes[:, 4]
    scores = None if scores is None else np.asarray(scores, np.float64).reshape(-1)
    landmarks = None if landmarks is None else np.asarray(landmarks, np.float64).reshape(-1, 5, 2)
    return boxes[:, :4], scores, landmarks



def annotate_image(image_uint8: np.ndarray, detections: Any) -> Any:
    """A PIL copy of the image with boxes, scores and landmarks drawn in (fast; what the CLI's --draw writes)."""
    out = Image.fromarray(np.asarray(image_uint8, np.uint8))
    boxes, scores, landmarks = as_arrays(detections)
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 300))
    for k, box in enumerate(boxes):
        draw.rectangle([float(v) for v in box], outline=BOX_COLOUR, width=width)
        if scores is not None:
            draw.text((float(box[0]) + width, float(box[1]) + width), f"{scores[k]:.2f}", fill=BOX_COLOUR)
        for j, (x, y) in enumerate(landmarks[k] if landmarks is not None else ()):
            r = width + 1
            draw.ellipse([x - r, y - r, x + r, y + r], fill=LANDMARK_COLOURS[j])
    return out
