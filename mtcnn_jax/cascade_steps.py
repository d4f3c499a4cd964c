"""The MTCNN cascade step by step, readable: pyramid -> P-Net -> R-Net -> O-Net (paper Sec. 2.1, Fig. 1)
with dynamic shapes and numpy between the nets, following detect_face.m line by line.

For study (`detect_steps` returns every stage's result) and as the oracle the jitted fixed-shape path
(`cascade.py`) is tested against. Both paths share the pyramid (`pyramid.py`), the crops (`crops.py`) and
the box math (`boxes.py`); only the NMS differs in form (`boxes.nms` here, `boxes.nms_fixed` there).
Coordinates are the original's: 1-based inclusive pixel boxes.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax import nets
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.crops import crop_patches, crop_sources
from mtcnn_jax.pyramid import PyramidPlan, build_levels, level_sizes, level_views
from mtcnn_jax.stages import INPUT_SIZE

Array = Any  # np.ndarray or jax.Array


def _probability(logits: Array) -> np.ndarray:
    return np.asarray(nets.face_probability(logits))


_jitted_nets = {stage: jax.jit(fn) for stage, fn in nets.NETS.items()}


def _run_net(stage: str, params: dict, x_Nx: np.ndarray) -> dict[str, np.ndarray]:
    """A net on a host batch (readable path), jitted, with N padded to a power of two so only a
    handful of shapes ever compile."""
    n = len(x_Nx)
    size = 1 << max(4, (n - 1).bit_length()) if stage != "pnet" else n
    x = np.concatenate([x_Nx, np.zeros((size - n,) + x_Nx.shape[1:], x_Nx.dtype)]) if size > n else x_Nx
    return {k: np.asarray(v)[:n] for k, v in _jitted_nets[stage](params, nets.normalize(x)).items()}


def detect_steps(params: dict, image_HxWx3: np.ndarray, config: CascadeConfig = CascadeConfig()) -> dict:
    """Run the cascade step by step with dynamic shapes and return every stage's result.

    Keys: "scales", "levels" (pixel-unit arrays), "pnet_levels" (per level: windows and scores after the
    level's NMS, and how many windows passed t1), "pnet" / "rnet" / "onet" (boxes_Nx4, scores_N after
    each stage) and "landmarks" (N, 5, 2).
    """
    image = np.asarray(image_HxWx3, np.float32)
    h, w = image.shape[:2]
    plan = PyramidPlan.of(h, w, config)
    if not plan.scales:  # smaller than one 12-pixel window at the first scale: nothing to detect
        none = {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32)}
        return {"scales": [], "levels": [], "pnet_levels": [], "pnet": none, "rnet": none, "onet": none,
                "landmarks": np.zeros((0, 5, 2), np.float32)}
    sizes = level_sizes(h, w, list(plan.scales))
    levels = level_views(np.asarray(build_levels(image, np.array([h, w]), sizes, plan)), sizes, plan)
    found = [_pnet_level_steps(params["pnet"], lvl, s, config) for lvl, s in zip(levels, plan.scales)]
    steps: dict[str, Any] = {"scales": list(plan.scales), "levels": levels, "pnet_levels": [
        {"boxes": f[0], "scores": f[1], "n_above_threshold": f[3]} for f in found]}
    win, score, reg = (np.concatenate([f[i] for f in found] + [np.zeros((0,) + e, np.float32)])
                       for i, e in enumerate([(4,), (), (4,)]))
    keep = bx.nms(win, score, config.nms_pnet)
    b1 = bx.refine(win[keep], reg[keep], plus_one=False)
    steps["pnet"] = {"boxes": b1, "scores": score[keep]}
    src = crop_sources(np.asarray(image_HxWx3), np.array([h, w]))  # as given: 8-bit pixels sum exactly
    out = _run_net("rnet", params["rnet"], crop_patches(src, b1, INPUT_SIZE["rnet"]))
    prob, reg = _probability(out["logits"]), np.asarray(out["box"])
    passed = np.nonzero(prob > config.thresholds[1])[0]
    keep = passed[bx.nms(b1[passed], prob[passed], config.nms_rnet)]
    b2 = bx.refine(b1[keep], reg[keep], plus_one=True)
    steps["rnet"] = {"boxes": b2, "scores": prob[keep]}
    crops = crop_patches(src, b2, INPUT_SIZE["onet"])
    out = _run_net("onet", params["onet"], crops)
    prob, reg, rel = _probability(out["logits"]), np.asarray(out["box"]), np.asarray(out["landmarks"])
    passed = np.nonzero(prob > config.thresholds[2])[0]
    b3 = bx.regress(b2[passed], reg[passed], plus_one=True)
    keep = bx.nms(b3, prob[passed], config.nms_onet, mode="min")
    steps["onet"] = {"boxes": b3[keep], "scores": prob[passed][keep]}
    seen, rel = b2[passed][keep], rel[passed][keep]  # the faces' O-Net boxes (before regression) and outputs
    if config.mirror_landmarks and len(seen):  # O-Net again on the faces' crops mirrored; landmarks averaged
        mirrored = np.asarray(crops)[passed][keep][:, :, ::-1]
        rel = bx.mirror_average(rel, _run_net("onet", params["onet"], mirrored)["landmarks"])
    steps["landmarks"] = bx.landmarks_from_relative(seen, rel)
    return steps


def _pnet_level_steps(params: dict, level_HxWx3: np.ndarray, scale: float, config: CascadeConfig):
    """One level: windows whose face probability >= t1, after the level's own NMS (Union 0.5), and how
    many windows passed the threshold before that NMS."""
    out = _run_net("pnet", params, level_HxWx3[None])
    prob, reg = _probability(out["logits"])[0], out["box"][0]
    rows, cols = np.nonzero(prob >= config.thresholds[0])
    win = bx.pnet_windows(rows, cols, scale).astype(np.float32)
    keep = bx.nms(win, prob[rows, cols], config.nms_level)
    return win[keep], prob[rows, cols][keep], reg[rows, cols][keep], len(rows)


