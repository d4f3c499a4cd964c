"""The MTCNN cascade as ONE jitted, fixed-shape function per bucket: pyramid -> P-Net -> R-Net -> O-Net
(paper Sec. 2.1, Fig. 1), following detect_face.m.

Images are zero-padded into a bucket (`buckets.py`); every stage has a fixed capacity and a validity mask;
the pyramid (`pyramid.py`), NMS (`boxes.py`), crops (`crops.py`) and the nets run on device, with no host
round trip between stages; overflowing capacities are counted, never hidden. `compiled.py` compiles and
runs it (`compiled.detect_bucket`); `cascade_steps.py` is the same cascade step by step with dynamic
shapes, the oracle this path is tested against. Coordinates are the original's: 1-based inclusive pixel
boxes.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from mtcnn_jax import boxes as bx
from mtcnn_jax import nets
from mtcnn_jax.buckets import bucket_capacities
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.crops import CropSources, crop_patches, crop_sources
from mtcnn_jax.pyramid import PyramidPlan, build_levels, level_masks, mip_pyramid, pnet_map_size
from mtcnn_jax.stages import INPUT_SIZE


MIRROR_CHUNK = 4  # faces per mirrored O-Net call: most images hold a few faces


def _per_image(fn: Callable) -> Callable:
    """`jax.vmap(fn)` over the images (the leading axis of every argument); for one image, `fn` on it: the
    same results, without vmap's batched loops (a select in every NMS iteration), so a batch-1 bucket (the
    CPU default) traces and compiles faster."""

    def run(*args):
        if {x.shape[0] for x in jax.tree_util.tree_leaves(args)} == {1}:
            return jax.tree_util.tree_map(lambda x: x[None], fn(*jax.tree_util.tree_map(lambda x: x[0], args)))
        return jax.vmap(fn)(*args)

    return run


def _pnet_candidates(prob_M, reg_Mx4, mask_M, windows_Mx4, level_M, capacities, config: CascadeConfig):
    """One image, all levels' cells at once: windows >= t1 compacted into the window capacity, NMS
    (Union 0.5) within each level, NMS (Union 0.7) over all, then regression without +1, squaring and fix."""
    window_capacity, pnet_capacity = capacities
    win, score, reg, level, valid, over_window = bx.compact(mask_M, prob_M, window_capacity,
                                                            windows_Mx4, prob_M, reg_Mx4, level_M)
    keep = bx.nms_fixed(win, score, valid, config.nms_level, groups_K=level)
    keep = bx.nms_fixed(win, score, keep, config.nms_pnet)
    win, score, reg, valid, over_pnet = bx.compact(keep, score, pnet_capacity, win, score, reg)
    return bx.refine(win, reg, plus_one=False), score, valid, over_window, over_pnet


def _after_rnet(boxes_Px4, valid_P, prob_P, reg_Px4, config: CascadeConfig):
    """One image: score > t2, NMS (Union 0.7) on the input boxes, regression with +1, squaring, fix."""
    keep = bx.nms_fixed(boxes_Px4, prob_P, valid_P & (prob_P > config.thresholds[1]), config.nms_rnet)
    b, s, r, valid, over = bx.compact(keep, prob_P, config.rnet_capacity, boxes_Px4, prob_P, reg_Px4)
    return bx.refine(b, r, plus_one=True), s, valid, over


def _after_onet(boxes_Rx4, valid_R, prob_R, reg_Rx4, rel_Rx10, config: CascadeConfig):
    """One image: score > t3, regression with +1, Min-NMS 0.7; the faces' boxes, scores, pre-regression
    boxes and box-relative landmarks (landmarks come from the box before its regression)."""
    b = bx.regress(boxes_Rx4, reg_Rx4, plus_one=True)
    keep = bx.nms_fixed(b, prob_R, valid_R & (prob_R > config.thresholds[2]), config.nms_onet, mode="min")
    return bx.compact(keep, prob_R, config.max_faces, b, prob_R, boxes_Rx4, rel_Rx10)


def _run_in_chunks(fn: Callable, boxes_BxNx4, valid_BxN, chunk: int, spec: dict) -> dict:
    """fn over slot chunks (B, chunk, 4) -> dict of (B, chunk, ...) (trailing shapes and dtypes in `spec`),
    only while some image still has a valid slot there (valid slots come first): an empty stage costs nothing."""
    b, n = valid_BxN.shape
    n_chunks = (jnp.max(jnp.sum(valid_BxN, axis=1)) + chunk - 1) // chunk
    init = {k: jnp.zeros((b, n) + shape, dtype) for k, (shape, dtype) in spec.items()}

    def body(state):
        c, outs = state
        o = fn(jax.lax.dynamic_slice_in_dim(boxes_BxNx4, c * chunk, chunk, axis=1))
        return c + 1, {k: jax.lax.dynamic_update_slice_in_dim(outs[k], o[k], c * chunk, axis=1) for k in outs}

    return jax.lax.while_loop(lambda s: s[0] < n_chunks, body, (jnp.int32(0), init))[1]


@functools.lru_cache(maxsize=None)
def _stage_spec(stage: str) -> dict:
    """{output: (trailing shape, dtype)} of a stage net per crop, plus "prob" (traced once per process)."""
    size = INPUT_SIZE[stage]
    params = jax.eval_shape(lambda: nets.init_params(jax.random.key(0), [stage])[stage])
    out = jax.eval_shape(nets.NETS[stage], params, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return {**{k: (v.shape[1:], v.dtype) for k, v in out.items()}, "prob": ((), jnp.float32)}


def _stage_net(stage: str, params: dict, srcs: CropSources, mirrored: bool = False) -> Callable:
    """(B, C, 4) boxes -> dict of (B, C, ...) outputs of the stage's net on their crops (mirrored left-right
    if asked), plus the face probability."""

    def fn(boxes_BxCx4):
        crops = _per_image(lambda s, bb: crop_patches(s, bb, INPUT_SIZE[stage]))(srcs, boxes_BxCx4)
        crops = crops[:, :, :, ::-1] if mirrored else crops
        bsz, c = crops.shape[:2]
        o = nets.NETS[stage](params[stage], nets.normalize(crops.reshape((bsz * c,) + crops.shape[2:])))
        o = {k: v.reshape((bsz, c) + v.shape[1:]) for k, v in o.items()}
        return {**o, "prob": nets.face_probability(o["logits"])}

    return fn


def _cell_mask(prob_BxM, level_hw_BxLx2, level_on_BxL, cell_level_M, cell_rc_Mx2, t1: float):
    """Canvas P-Net cells that lie inside their level's real map, on a level the image uses, with p >= t1."""
    lvl = jnp.maximum(cell_level_M, 0)
    maps = pnet_map_size(level_hw_BxLx2)[:, lvl]  # (B, M, 2)
    inside = (cell_rc_Mx2[None, :, 0] < maps[..., 0]) & (cell_rc_Mx2[None, :, 1] < maps[..., 1])
    return (cell_level_M >= 0)[None] & level_on_BxL[:, lvl] & inside & (prob_BxM >= t1)


def cascade_fn(params, images_BxHxWx3, sizes_Bx2, level_hw_BxLx2, level_on_BxL, taps_B, windows_Mx4, cell_level_M,
               cell_rc_Mx2, config: CascadeConfig, upto: str = "onet"):
    """The whole cascade for one bucket, fixed shapes throughout (stopping after `upto`); traced and
    compiled once per bucket by `compiled.compiled_cascade`. The last three arguments are the bucket's
    `PyramidPlan.cells`, the three before them `pyramid.image_plan`'s."""
    bsz, hb, wb, _ = images_BxHxWx3.shape
    plan = PyramidPlan.of(hb, wb, config)
    rows = jnp.arange(hb)[None, :, None] < sizes_Bx2[:, 0, None, None]
    cols = jnp.arange(wb)[None, None, :] < sizes_Bx2[:, 1, None, None]
    images = jnp.where((rows & cols)[..., None], images_BxHxWx3, 0).astype(jnp.float32)  # zero padding
    mips = _per_image(lambda im, hw: mip_pyramid(im, hw, plan.n_mips))(images, sizes_Bx2)
    groups = _per_image(lambda im, hw, lhw, taps, m: build_levels(im, hw, lhw, plan, taps, m))(
        images, sizes_Bx2, level_hw_BxLx2, taps_B, mips)
    masks = _per_image(lambda lhw: level_masks(lhw, plan))(level_hw_BxLx2)
    probs, regs = [], []
    for group, real in zip(groups, masks):
        out = nets.pnet(params["pnet"], nets.normalize(group), valid_mask=real)
        probs.append(nets.face_probability(out["logits"]).reshape(bsz, -1))
        regs.append(out["box"].reshape(bsz, -1, 4))
    prob = jnp.concatenate(probs, axis=1)
    mask = _cell_mask(prob, level_hw_BxLx2, level_on_BxL, cell_level_M, cell_rc_Mx2, config.thresholds[0])
    b1, s1, v1, over_window, over_pnet = _per_image(
        functools.partial(_pnet_candidates, windows_Mx4=windows_Mx4, level_M=cell_level_M,
                          capacities=bucket_capacities(config, hb, wb), config=config))(
        prob, jnp.concatenate(regs, axis=1), mask)
    overflow = {"window": over_window, "pnet": over_pnet}
    if upto == "pnet":
        return {"boxes": b1, "scores": s1, "valid": v1, "overflow": overflow}
    return _rnet_onet(params, images_BxHxWx3, sizes_Bx2, b1, v1, config, upto, overflow)


def _rnet_onet(params, images_BxHxWx3, sizes_Bx2, boxes_BxNx4, valid_BxN, config: CascadeConfig, upto: str,
               overflow: dict):
    """R-Net and O-Net (stopping after `upto`) on square candidate boxes, valid slots first."""
    srcs = _per_image(crop_sources)(images_BxHxWx3, sizes_Bx2)  # from the 8-bit pixels: exact integer sums
    r = _run_in_chunks(_stage_net("rnet", params, srcs), boxes_BxNx4, valid_BxN, config.net_chunk,
                       _stage_spec("rnet"))
    b2, s2, v2, overflow["rnet"] = _per_image(functools.partial(_after_rnet, config=config))(
        boxes_BxNx4, valid_BxN, r["prob"], r["box"])
    if upto == "rnet":
        return {"boxes": b2, "scores": s2, "valid": v2, "overflow": overflow}
    o = _run_in_chunks(_stage_net("onet", params, srcs), b2, v2, config.net_chunk, _stage_spec("onet"))
    b3, s3, seen3, rel3, v3, overflow["faces"] = _per_image(functools.partial(_after_onet, config=config))(
        b2, v2, o["prob"], o["box"], o["landmarks"])
    if config.mirror_landmarks:  # O-Net again on the faces' crops mirrored, in chunks of few: faces are few
        m = _run_in_chunks(_stage_net("onet", params, srcs, mirrored=True), seen3, v3, MIRROR_CHUNK,
                           _stage_spec("onet"))
        rel3 = bx.mirror_average(rel3, m["landmarks"])
    pts = bx.landmarks_from_relative(seen3, rel3)
    return {"boxes": b3, "scores": s3, "landmarks": pts, "valid": v3, "overflow": overflow}


# Where re-detection looks for a face seen in the previous frame, as (dx, dy, scale) of its square box:
# the box itself, shifted a quarter of its side each way, and enlarged a quarter. R-Net's regression
# recovers the rest of the motion, as it does for P-Net's loose windows.
REDETECT_OFFSETS = ((0.0, 0.0, 1.0), (-0.25, 0.0, 1.0), (0.25, 0.0, 1.0), (0.0, -0.25, 1.0), (0.0, 0.25, 1.0),
                    (0.0, 0.0, 1.25))


REDETECT_FACES = 64  # faces re-detection follows per image (a frame with more runs the whole cascade)


def redetect_candidates(boxes_Kx4, valid_K):
    """R-Net's candidates around faces seen before: each box squared, then every REDETECT_OFFSETS variant,
    face by face (K * V slots, valid faces' slots first, as `_run_in_chunks` needs)."""
    sq = bx.square(boxes_Kx4)
    side = (sq[:, 2] - sq[:, 0])[:, None]
    cx, cy = ((sq[:, 0] + sq[:, 2]) * 0.5)[:, None], ((sq[:, 1] + sq[:, 3]) * 0.5)[:, None]
    dx, dy, scale = (jnp.asarray(v, jnp.float32)[None] for v in zip(*REDETECT_OFFSETS))
    half = side * scale * 0.5
    cx, cy = cx + dx * side, cy + dy * side
    cand = jnp.stack([cx - half, cy - half, cx + half, cy + half], axis=-1)  # (K, V, 4)
    return bx.fix(cand.reshape(-1, 4)), jnp.repeat(valid_K, len(REDETECT_OFFSETS))


def redetect_fn(params, images_BxHxWx3, sizes_Bx2, boxes_BxKx4, valid_BxK, config: CascadeConfig):
    """Re-detection for video: R-Net and O-Net on candidates around the faces of a previous frame
    (`redetect_candidates`), no pyramid and no P-Net. Finds those faces where they moved to, never new ones:
    the caller runs the whole cascade every few frames and whenever a face is lost."""
    cand, valid = _per_image(redetect_candidates)(boxes_BxKx4, valid_BxK)
    zeros = jnp.zeros(valid.shape[:1], jnp.int32)
    return _rnet_onet(params, images_BxHxWx3, sizes_Bx2, cand, valid, config, "onet",
                      {"window": zeros, "pnet": zeros})
