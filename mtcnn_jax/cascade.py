"""The MTCNN cascade as fixed-shape stages of one bucket: pyramid -> P-Net -> R-Net -> O-Net (paper Sec. 2.1,
Fig. 1), following detect_face.m.

Images are zero-padded into a bucket (`buckets.py`); every stage has a fixed capacity and a validity mask;
the pyramid (`pyramid.py`), NMS (`boxes.py`), crops (`crops.py`) and the nets run on device, with no host
round trip between stages; overflowing capacities are counted, never hidden. `run_stages` chains the stages:
`cascade_fn` is the whole as one function (exported whole by `export.py`); `compiled.py` compiles each stage
as its own program, so the stages that see only candidates (P-Net's NMS, R-Net, O-Net) serve every bucket
(`compiled.detect_bucket`). `cascade_steps.py` is the same cascade step by step with dynamic shapes, the
oracle this path is tested against. Coordinates are the original's: 1-based inclusive pixel boxes.
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
from mtcnn_jax.pyramid import PyramidPlan, build_levels, level_masks, pnet_map_size
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


def _pnet_windows(prob_M, reg_Mx4, mask_M, windows_Mx4, level_M, window_capacity: int) -> dict:
    """One image, all levels' cells at once: the windows >= t1, compacted into the window capacity (in
    `shared_slots` of it)."""
    win, score, reg, level, valid, over = bx.compact(mask_M, prob_M, shared_slots(window_capacity), windows_Mx4,
                                                     prob_M, reg_Mx4, level_M, limit=window_capacity)
    return {"windows": win, "scores": score, "reg": reg, "level": level, "valid": valid, "overflow": over}


def pnet_nms(windows: dict, config: CascadeConfig, slots: int) -> dict:
    """Stage 1's NMS on `pnet_stage`'s windows: NMS (Union 0.5) within each level, NMS (Union 0.7) over all,
    the best P-Net capacity of them (in `slots` slots), regression without +1, squaring and fix. No image
    and the capacities as data: one program serves every bucket of the same slots."""

    def one_image(w):
        keep = bx.nms_fixed(w["windows"], w["scores"], w["valid"], config.nms_level, groups_K=w["level"])
        keep = bx.nms_fixed(w["windows"], w["scores"], keep, config.nms_pnet)
        win, score, reg, valid, over = bx.compact(keep, w["scores"], slots, w["windows"], w["scores"], w["reg"],
                                                  limit=w["capacity"])
        return bx.refine(win, reg, plus_one=False), score, valid, over

    boxes, scores, valid, over = _per_image(one_image)(windows)
    return {"boxes": boxes, "scores": scores, "valid": valid,
            "overflow": {"window": windows["overflow"], "pnet": over}}


def _after_rnet(boxes_Px4, valid_P, prob_P, reg_Px4, config: CascadeConfig):
    """One image: score > t2, NMS (Union 0.7) on the input boxes, regression with +1, squaring, fix."""
    keep = bx.nms_fixed(boxes_Px4, prob_P, valid_P & (prob_P > config.thresholds[1]), config.nms_rnet)
    b, s, r, valid, over = bx.compact(keep, prob_P, config.rnet_capacity, boxes_Px4, prob_P, reg_Px4)
    return bx.refine(b, r, plus_one=True), s, valid, over


def _after_onet(boxes_Rx4, valid_R, prob_R, reg_Rx4, rel_Rx10, config: CascadeConfig):
    """One image: score > t3, regression with +1, Min-NMS 0.7; the faces' boxes, scores, pre-regression
    boxes, box-relative landmarks (landmarks come from the box before its regression) and slots."""
    b = bx.regress(boxes_Rx4, reg_Rx4, plus_one=True)
    keep = bx.nms_fixed(b, prob_R, valid_R & (prob_R > config.thresholds[2]), config.nms_onet, mode="min")
    return bx.compact(keep, prob_R, config.max_faces, b, prob_R, boxes_Rx4, rel_Rx10,
                      jnp.arange(prob_R.shape[0], dtype=jnp.int32))


def _run_in_chunks(fn: Callable, slots_BxN, valid_BxN, chunk: int, spec: dict) -> dict:
    """fn over slot chunks (B, chunk, ...) of `slots_BxN` -> dict of (B, chunk, ...) (trailing shapes and
    dtypes in `spec`), only while some image still has a valid slot there (valid slots come first): an
    empty stage costs nothing."""
    b, n = valid_BxN.shape
    n_chunks = (jnp.max(jnp.sum(valid_BxN, axis=1)) + chunk - 1) // chunk
    init = {k: jnp.zeros((b, n) + shape, dtype) for k, (shape, dtype) in spec.items()}

    def body(state):
        c, outs = state
        o = fn(jax.lax.dynamic_slice_in_dim(slots_BxN, c * chunk, chunk, axis=1))
        return c + 1, {k: jax.lax.dynamic_update_slice_in_dim(outs[k], o[k], c * chunk, axis=1) for k in outs}

    return jax.lax.while_loop(lambda s: s[0] < n_chunks, body, (jnp.int32(0), init))[1]


@functools.lru_cache(maxsize=None)
def _stage_spec(stage: str) -> dict:
    """{output: (trailing shape, dtype)} of a stage net per crop, plus "prob" (traced once per process)."""
    size = INPUT_SIZE[stage]
    params = jax.eval_shape(lambda: nets.init_params(jax.random.key(0), [stage])[stage])
    out = jax.eval_shape(nets.NETS[stage], params, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    return {**{k: (v.shape[1:], v.dtype) for k, v in out.items()}, "prob": ((), jnp.float32)}


def _stage_net(stage: str, params: dict) -> Callable:
    """(B, C, size, size, 3) crops -> dict of (B, C, ...) outputs of the stage's net, plus the face
    probability."""

    def fn(crops_BxCxSxSx3):
        bsz, c = crops_BxCxSxSx3.shape[:2]
        crops = crops_BxCxSxSx3.reshape((bsz * c,) + crops_BxCxSxSx3.shape[2:])
        o = nets.NETS[stage](params[stage], nets.normalize(crops))
        o = {k: v.reshape((bsz, c) + v.shape[1:]) for k, v in o.items()}
        return {**o, "prob": nets.face_probability(o["logits"])}

    return fn


def _cell_mask(prob_BxM, level_hw_BxLx2, level_on_BxL, cell_level_M, cell_rc_Mx2, t1: float):
    """Canvas P-Net cells that lie inside their level's real map, on a level the image uses, with p >= t1."""
    lvl = jnp.maximum(cell_level_M, 0)
    maps = pnet_map_size(level_hw_BxLx2)[:, lvl]  # (B, M, 2)
    inside = (cell_rc_Mx2[None, :, 0] < maps[..., 0]) & (cell_rc_Mx2[None, :, 1] < maps[..., 1])
    return (cell_level_M >= 0)[None] & level_on_BxL[:, lvl] & inside & (prob_BxM >= t1)


def pnet_stage(params, images_BxHxWx3, sizes_Bx2, level_hw_BxLx2, level_on_BxL, taps_B, windows_Mx4, cell_level_M,
               cell_rc_Mx2, config: CascadeConfig) -> dict:
    """Stage 1 of one bucket up to its NMS (`pnet_nms`): the pyramid, P-Net, and its windows >= t1 (B, W) in
    `shared_slots` of the bucket's window capacity, with the bucket's P-Net capacity. The last three arguments
    are the bucket's `PyramidPlan.cells`, the three before them `pyramid.image_plan`'s."""
    bsz, hb, wb, _ = images_BxHxWx3.shape
    plan = PyramidPlan.of(hb, wb, config)
    rows = jnp.arange(hb)[None, :, None] < sizes_Bx2[:, 0, None, None]
    cols = jnp.arange(wb)[None, None, :] < sizes_Bx2[:, 1, None, None]
    images = jnp.where((rows & cols)[..., None], images_BxHxWx3, 0).astype(jnp.float32)  # zero padding
    canvas = _per_image(lambda im, hw, lhw, taps: build_levels(im, hw, lhw, plan, taps))(
        images, sizes_Bx2, level_hw_BxLx2, taps_B)
    real = _per_image(lambda lhw: level_masks(lhw, plan))(level_hw_BxLx2)
    out = nets.pnet(params["pnet"], nets.normalize(canvas), valid_mask=real)
    prob = nets.face_probability(out["logits"]).reshape(bsz, -1)
    mask = _cell_mask(prob, level_hw_BxLx2, level_on_BxL, cell_level_M, cell_rc_Mx2, config.thresholds[0])
    window_capacity, pnet_capacity = bucket_capacities(config, hb, wb)
    windows = _per_image(functools.partial(_pnet_windows, windows_Mx4=windows_Mx4, level_M=cell_level_M,
                                           window_capacity=window_capacity))(
        prob, out["box"].reshape(bsz, -1, 4), mask)
    return {**windows, "capacity": jnp.full((bsz,), pnet_capacity, jnp.int32)}


def shared_slots(n: int) -> int:
    """The slots of a capacity n in the programs buckets share (P-Net's NMS, R-Net): the next power of two, so
    that buckets of different capacities share a few programs (the padding slots are invalid: they change
    nothing)."""
    return 1 << max(n - 1, 0).bit_length()


def table_slot(bucket_hw: tuple[int, int]) -> tuple[int, int]:
    """The size the crop sources of a bucket cover: each side's next power of two, so that buckets of one slot
    share R-Net's and O-Net's crop programs (`crop_sources`' `table_hw`)."""
    return shared_slots(bucket_hw[0]), shared_slots(bucket_hw[1])


def sources_stage(images_BxHxWx3, sizes_Bx2) -> CropSources:
    """The images' crop sources in their `table_slot`, from the 8-bit pixels (exact integer sums); R-Net's and
    O-Net's crops read them."""
    slot = table_slot(images_BxHxWx3.shape[1:3])
    return _per_image(lambda im, hw: crop_sources(im, hw, slot))(images_BxHxWx3, sizes_Bx2)


def _crops(srcs: CropSources, boxes_BxNx4, valid_BxN, stage: str, chunk: int):
    """The stage net's crops (B, N, size, size, 3) of the valid boxes, zero in the other slots."""
    size = INPUT_SIZE[stage]
    fn = lambda b: {"crops": _per_image(lambda s, bb: crop_patches(s, bb, size))(srcs, b)}  # noqa: E731
    return _run_in_chunks(fn, boxes_BxNx4, valid_BxN, chunk, {"crops": ((size, size, 3), jnp.float32)})["crops"]


def rnet_crops(srcs: CropSources, boxes_BxNx4, valid_BxN, config: CascadeConfig) -> dict:
    """R-Net's 24 x 24 crops of the candidates, with the candidates, in `shared_slots(N)` slots."""
    pad = shared_slots(valid_BxN.shape[1]) - valid_BxN.shape[1]
    boxes = jnp.pad(boxes_BxNx4, ((0, 0), (0, pad), (0, 0)))
    valid = jnp.pad(valid_BxN, ((0, 0), (0, pad)))
    return {"crops": _crops(srcs, boxes, valid, "rnet", config.net_chunk), "boxes": boxes, "valid": valid}


def onet_crops(srcs: CropSources, boxes_BxRx4, valid_BxR, config: CascadeConfig):
    """O-Net's 48 x 48 crops (B, R, 48, 48, 3) of R-Net's boxes."""
    return _crops(srcs, boxes_BxRx4, valid_BxR, "onet", config.net_chunk)


def rnet_stage(params, crops_BxNx24x24x3, boxes_BxNx4, valid_BxN, config: CascadeConfig) -> dict:
    """Stage 2 on cropped candidates (no image: one program serves every bucket of these slots)."""
    r = _run_in_chunks(_stage_net("rnet", params), crops_BxNx24x24x3, valid_BxN, config.net_chunk,
                       _stage_spec("rnet"))
    b2, s2, v2, over = _per_image(functools.partial(_after_rnet, config=config))(
        boxes_BxNx4, valid_BxN, r["prob"], r["box"])
    return {"boxes": b2, "scores": s2, "valid": v2, "overflow": {"rnet": over}}


def onet_stage(params, crops_BxRx48x48x3, boxes_BxRx4, valid_BxR, config: CascadeConfig) -> dict:
    """Stage 3 on cropped candidates: the faces' boxes, scores and landmarks (no image: one program serves
    every bucket). With `config.mirror_landmarks`, O-Net again on the faces' crops mirrored, in chunks of
    few (faces are few)."""
    o = _run_in_chunks(_stage_net("onet", params), crops_BxRx48x48x3, valid_BxR, config.net_chunk,
                       _stage_spec("onet"))
    b3, s3, seen3, rel3, slot3, v3, over = _per_image(functools.partial(_after_onet, config=config))(
        boxes_BxRx4, valid_BxR, o["prob"], o["box"], o["landmarks"])
    if config.mirror_landmarks:
        mirrored = lambda s: _stage_net("onet", params)(  # noqa: E731
            jnp.take_along_axis(crops_BxRx48x48x3, s[:, :, None, None, None], axis=1)[:, :, :, ::-1])
        m = _run_in_chunks(mirrored, slot3, v3, MIRROR_CHUNK, _stage_spec("onet"))
        rel3 = bx.mirror_average(rel3, m["landmarks"])
    pts = bx.landmarks_from_relative(seen3, rel3)
    return {"boxes": b3, "scores": s3, "landmarks": pts, "valid": v3, "overflow": {"faces": over}}


REDETECT = "redetect"  # `run_stages`' first stage for re-detection (video), instead of "pnet"
STAGE_FUNCTIONS = {"pnet": pnet_stage, "pnet_nms": pnet_nms, "sources": sources_stage, "rnet_crops": rnet_crops,
                   "rnet": rnet_stage, "onet_crops": onet_crops, "onet": onet_stage}


def stage_functions(config: CascadeConfig, bucket_hw: tuple[int, int]) -> dict[str, Callable]:
    """`STAGE_FUNCTIONS` for `run_stages` with the config bound, and the P-Net NMS's slots for this bucket;
    REDETECT's `redetect_stage` beside them."""
    fns = {name: fn if fn is sources_stage else functools.partial(fn, config=config)
           for name, fn in STAGE_FUNCTIONS.items()}
    fns["pnet_nms"] = functools.partial(fns["pnet_nms"], slots=shared_slots(bucket_capacities(config, *bucket_hw)[1]))
    return {**fns, REDETECT: redetect_stage}


def run_stages(stages: dict[str, Callable], params, images_BxHxWx3, sizes_Bx2, first_args: tuple, upto: str) -> dict:
    """The cascade through `stages` (`stage_functions`, or their compiled programs), stopping after `upto`:
    the candidates of "pnet" and "pnet_nms" on the images and `first_args` (or of REDETECT on `first_args`),
    then the images' crop sources, R-Net's crops, R-Net, O-Net's crops and O-Net. The overflow counts of every
    stage run are merged."""
    if upto == REDETECT:
        cands = stages[REDETECT](*first_args)
    else:
        cands = stages["pnet_nms"](stages["pnet"](params, images_BxHxWx3, sizes_Bx2, *first_args))
    if upto == "pnet":
        return cands
    srcs = stages["sources"](images_BxHxWx3, sizes_Bx2)
    c = stages["rnet_crops"](srcs, cands["boxes"], cands["valid"])
    r = stages["rnet"](params, c["crops"], c["boxes"], c["valid"])
    overflow = {**cands["overflow"], **r["overflow"]}
    if upto == "rnet":
        return {**r, "overflow": overflow}
    o = stages["onet"](params, stages["onet_crops"](srcs, r["boxes"], r["valid"]), r["boxes"], r["valid"])
    return {**o, "overflow": {**overflow, **o["overflow"]}}


def cascade_fn(params, images_BxHxWx3, sizes_Bx2, level_hw_BxLx2, level_on_BxL, taps_B, windows_Mx4, cell_level_M,
               cell_rc_Mx2, config: CascadeConfig, upto: str = "onet"):
    """The whole cascade for one bucket as one function, fixed shapes throughout (stopping after `upto`).
    `compiled.py` compiles its stages as separate programs instead, so that the image-free ones
    (`rnet_stage`, `onet_stage`) serve every bucket; `export.py` exports it whole."""
    stages = stage_functions(config, images_BxHxWx3.shape[1:3])
    return run_stages(stages, params, images_BxHxWx3, sizes_Bx2,
                      (level_hw_BxLx2, level_on_BxL, taps_B, windows_Mx4, cell_level_M, cell_rc_Mx2), upto)


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


def redetect_stage(boxes_BxKx4, valid_BxK) -> dict:
    """Re-detection's first stage: R-Net's candidates around the faces of a previous frame
    (`redetect_candidates`), in the form `pnet_stage` gives them."""
    cand, valid = _per_image(redetect_candidates)(boxes_BxKx4, valid_BxK)
    zeros = jnp.zeros(valid.shape[:1], jnp.int32)
    return {"boxes": cand, "valid": valid, "overflow": {"window": zeros, "pnet": zeros}}


def redetect_fn(params, images_BxHxWx3, sizes_Bx2, boxes_BxKx4, valid_BxK, config: CascadeConfig):
    """Re-detection for video: R-Net and O-Net on candidates around the faces of a previous frame
    (`redetect_stage`), no pyramid and no P-Net. Finds those faces where they moved to, never new ones:
    the caller runs the whole cascade every few frames and whenever a face is lost."""
    return run_stages(stage_functions(config, images_BxHxWx3.shape[1:3]), params, images_BxHxWx3, sizes_Bx2,
                      (boxes_BxKx4, valid_BxK), REDETECT)
