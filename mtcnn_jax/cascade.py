"""The MTCNN cascade: image pyramid -> P-Net -> R-Net -> O-Net, in two forms that share all box math.

- `detect_bucket`: ONE jitted, fixed-shape function per (bucket height, bucket width, batch size).
  Images are zero-padded into a bucket; every stage has a fixed capacity and a validity mask;
  NMS, crops and resizing run on device; overflowing capacities are counted, never hidden.
- `detect_steps`: the readable step-by-step path with dynamic shapes (numpy between the nets), for
  study and as the oracle the fixed-shape path is tested against.

Both follow detect_face.m. Coordinates are the original's: 1-based inclusive pixel boxes.
Resizing (pyramid levels and crops) follows imResample, which detect_face.m calls: an exact area
average when shrinking, bilinear with half-pixel centres when enlarging. Two shortcuts keep it cheap,
documented in the README: each pyramid level is resampled from the previous level (not from the
image), and a crop is resampled from the pyramid level just larger than the crop's output size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtcnn_jax import boxes as bx
from mtcnn_jax import nets

Array = Any  # np.ndarray or jax.Array


@dataclass(frozen=True)
class CascadeConfig:
    """Detector constants (detect_face.m defaults) and the fixed capacities of the jitted path."""

    min_face_size: float = 20.0
    scale_factor: float = 0.709
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    nms_level: float = 0.5  # P-Net, within one pyramid level (Union)
    nms_pnet: float = 0.7  # P-Net, over all levels (Union)
    nms_rnet: float = 0.7  # after R-Net (Union)
    nms_onet: float = 0.7  # after O-Net (Min)
    window_capacity: int = 2048  # P-Net windows >= t1 over all levels, before the NMS
    pnet_capacity: int = 512  # candidates cropped for R-Net
    rnet_capacity: int = 128  # candidates cropped for O-Net
    max_faces: int = 128  # final detections per image
    net_chunk: int = 32  # R-Net/O-Net run over chunks of this many slots, only while chunks hold candidates
    bucket_multiple: int = 64  # image sizes are padded up to a multiple of this

    def __post_init__(self):
        for name in ("pnet_capacity", "rnet_capacity"):
            if getattr(self, name) % self.net_chunk:
                raise ValueError(f"{name} must be a multiple of net_chunk={self.net_chunk}")
        if self.min_face_size <= 0 or not 0 < self.scale_factor < 1:
            raise ValueError("min_face_size must be > 0 and 0 < scale_factor < 1")


def bucket_shape(h: int, w: int, multiple: int = 64) -> tuple[int, int]:
    """The padded (height, width) an image of size h x w is run at: each side rounded up to `multiple`."""
    return (math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple)


# ----------------------------------------------------------------------------- pyramid plan (host)

def pyramid_scales(h: int, w: int, min_face_size: float, scale_factor: float) -> list[float]:
    """detect_face.m's scales: m = 12 / minsize, m * factor^k while min(h, w) * m * factor^k >= 12."""
    m = 12.0 / min_face_size
    minl, scales = min(h, w) * m, []
    while minl >= 12:
        scales.append(m * scale_factor ** len(scales))
        minl *= scale_factor
    return scales


def level_sizes(h: int, w: int, scales: list[float]) -> np.ndarray:
    """(L, 2) level sizes, each ceil(h * s) x ceil(w * s) as in detect_face.m."""
    return np.array([(math.ceil(h * s), math.ceil(w * s)) for s in scales], np.int32).reshape(-1, 2)


def pnet_map_size(level_hw: Array) -> Array:
    """P-Net output map size for a level size: conv 3, ceil pool 2/2, two conv 3 -> ceil((n-2)/2) - 4."""
    return (level_hw - 1) // 2 - 4  # == ceil((n - 2) / 2) - 4 for integers


def _taps(ratio: float) -> int:
    """Resampling taps needed for an area average over `ratio` source pixels (at least bilinear's 2)."""
    return max(2, math.ceil(ratio - 1e-9) + 1)


def level_taps(config: CascadeConfig) -> int:
    """Taps for building the pyramid: level 0 from the image (ratio 1/m), then level from level."""
    m = 12.0 / config.min_face_size
    return _taps(max(1.0 / m, 1.0 / config.scale_factor + 1.0 / 12))


def crop_taps(config: CascadeConfig) -> int:
    """Taps for crops taken from the level just larger than the crop (or the image, if none is)."""
    m = 12.0 / config.min_face_size
    first = m * config.scale_factor ** max(0, math.ceil(math.log(m) / -math.log(config.scale_factor)))
    return _taps(max(1.0 / min(first, 1.0), (1.0 / config.scale_factor + 1.0 / 12)))


# ----------------------------------------------------------------------------- resampling (shared)

def resample_taps(start_E: Array, length_E: Array, out_len_E: Array, out_buf: int, taps: int):
    """Indices and weights (E, out_buf, taps) that resample source intervals [start, start + length)
    to out_len samples as imResample does: area average when shrinking, bilinear (half-pixel centres,
    clamped to the interval) when enlarging. Samples at or past out_len get zero weight."""
    xp = bx.xp_of(start_E, length_E, out_len_E)
    start, length, out_len = (xp.asarray(a, dtype=xp.float32)[..., None] for a in (start_E, length_E, out_len_E))
    k, t = xp.arange(out_buf, dtype=xp.float32), xp.arange(taps, dtype=xp.float32)
    ratio = length / out_len
    lo = start + k * ratio
    hi = lo + ratio
    idx_area = xp.floor(lo)[..., None] + t
    cover = xp.clip(xp.minimum(idx_area + 1, hi[..., None]) - xp.maximum(idx_area, lo[..., None]), 0, None)
    w_area = cover / xp.maximum(cover.sum(-1, keepdims=True), 1e-12)
    centre = xp.clip((lo + hi) * 0.5 - 0.5, start, start + length - 1)
    frac = (centre - xp.floor(centre))[..., None]
    idx_bilinear = xp.floor(centre)[..., None] + t
    w_bilinear = xp.where(t == 0, 1 - frac, xp.where(t == 1, frac, 0.0))
    shrink = (ratio >= 1)[..., None]
    weights = xp.where(shrink, w_area, w_bilinear) * (k < out_len)[..., None]
    return xp.where(shrink, idx_area, idx_bilinear).astype(xp.int32), weights.astype(xp.float32)


def _resample_rows(src_HxWxC: Array, idx_OxT: Array, w_OxT: Array, valid_rows: Array) -> Array:
    """Resample along axis 0; taps outside [0, valid_rows) read zero (pad.m's zero padding)."""
    xp = bx.xp_of(src_HxWxC, idx_OxT, valid_rows)
    w = xp.where((idx_OxT >= 0) & (idx_OxT < valid_rows), w_OxT, 0.0)
    rows = src_HxWxC[xp.clip(idx_OxT, 0, src_HxWxC.shape[0] - 1)]  # (O, T, W, C)
    return xp.einsum("ot,otwc->owc", w, rows)


def resample_image(src_HxWxC: Array, in_hw: Array, out_hw: Array, out_buf: tuple[int, int], taps: int) -> Array:
    """The top-left in_hw region of src resized to out_hw, in an out_buf array with zeros beyond out_hw."""
    xp = bx.xp_of(src_HxWxC, in_hw, out_hw)
    iy, wy = resample_taps(0.0, in_hw[0], out_hw[0], out_buf[0], taps)
    ix, wx = resample_taps(0.0, in_hw[1], out_hw[1], out_buf[1], taps)
    rows = _resample_rows(src_HxWxC, iy, wy, in_hw[0])
    return xp.swapaxes(_resample_rows(xp.swapaxes(rows, 0, 1), ix, wx, in_hw[1]), 0, 1)


def build_pyramid(image_HxWx3: Array, image_hw: Array, level_hw_Lx2: Array, bufs: list[tuple[int, int]],
                  config: CascadeConfig) -> list[Array]:
    """Pyramid levels in pixel units: level 0 from the image, each next level from the previous one."""
    levels, src, src_hw, taps = [], image_HxWx3, image_hw, level_taps(config)
    for k, buf in enumerate(bufs):
        src = resample_image(src, src_hw, level_hw_Lx2[k], buf, taps)
        src_hw = level_hw_Lx2[k]
        levels.append(src)
    return levels


# ----------------------------------------------------------------------------- crops (shared)

@dataclass(frozen=True)
class CropSources:
    """Images to crop from, flattened into one (P, 3) atlas: the image, then pyramid levels (scale <= 1).

    offsets/widths are static layout; hw (J, 2) the real sizes and scale (J, 2) = real size / image size.
    """

    atlas_Px3: Array
    offsets: tuple[int, ...]
    widths: tuple[int, ...]
    hw_Jx2: Array
    scale_Jx2: Array


def crop_sources(image_HxWx3: Array, image_hw: Array, levels: list[Array], level_hw_Lx2: Array,
                 scales: list[float]) -> CropSources:
    """Gather the image and its downscaled levels (scale <= 1) as crop sources."""
    xp = bx.xp_of(image_HxWx3, image_hw, level_hw_Lx2, *levels)
    use = [k for k, s in enumerate(scales) if s <= 1.0]
    arrays = [image_HxWx3] + [levels[k] for k in use]
    sizes = [a.shape[0] * a.shape[1] for a in arrays]
    hw = xp.stack([xp.asarray(image_hw, dtype=xp.int32)] + [xp.asarray(level_hw_Lx2[k], dtype=xp.int32) for k in use])
    atlas = xp.concatenate([a.reshape(-1, 3) for a in arrays])
    return CropSources(atlas, tuple(int(o) for o in np.cumsum([0] + sizes[:-1])),
                       tuple(a.shape[1] for a in arrays), hw, hw / xp.asarray(hw[0], dtype=xp.float32))


def crop_patches(src: CropSources, boxes_Nx4: Array, out: int, taps: int) -> Array:
    """Crops (N, out, out, 3) of fixed 1-based boxes, zero outside the image (pad.m), each resampled from
    the smallest source still at least `out` pixels across the box (the image if none)."""
    xp = bx.xp_of(src.atlas_Px3, boxes_Nx4)
    b = xp.asarray(boxes_Nx4, dtype=xp.float32)
    n_h, n_w = b[:, 3] - b[:, 1] + 1, b[:, 2] - b[:, 0] + 1
    ok_NxJ = (n_h[:, None] * src.scale_Jx2[None, :, 0] >= out) & (n_w[:, None] * src.scale_Jx2[None, :, 1] >= out)
    last = ok_NxJ.shape[1] - 1 - xp.argmax(ok_NxJ[:, ::-1], axis=1)
    j_N = xp.where(ok_NxJ.any(axis=1), last, 0)
    sy, sx = src.scale_Jx2[j_N, 0], src.scale_Jx2[j_N, 1]
    iy, wy = resample_taps((b[:, 1] - 1) * sy, n_h * sy, xp.full_like(sy, out), out, taps)
    ix, wx = resample_taps((b[:, 0] - 1) * sx, n_w * sx, xp.full_like(sx, out), out, taps)
    h_N, w_N = src.hw_Jx2[j_N, 0][:, None, None], src.hw_Jx2[j_N, 1][:, None, None]
    wy, wx = xp.where((iy >= 0) & (iy < h_N), wy, 0.0), xp.where((ix >= 0) & (ix < w_N), wx, 0.0)
    iy, ix = xp.clip(iy, 0, h_N - 1), xp.clip(ix, 0, w_N - 1)
    off = xp.asarray(src.offsets)[j_N][:, None, None, None, None]
    width = xp.asarray(src.widths)[j_N][:, None, None, None, None]
    flat = off + iy[:, :, :, None, None] * width + ix[:, None, None, :, :]  # (N, out, T, out, T)
    px = src.atlas_Px3[flat]
    w = wy[:, :, :, None, None] * wx[:, None, None, :, :]
    return sum(w[:, :, t, :, u, None] * px[:, :, t, :, u] for t in range(taps) for u in range(taps))


def _probability(logits: Array) -> np.ndarray:
    return np.asarray(nets.face_probability(logits))


# ----------------------------------------------------------------------------- the readable path

def detect_steps(params: dict, image_HxWx3: np.ndarray, config: CascadeConfig = CascadeConfig()) -> dict:
    """Run the cascade step by step with dynamic shapes and return every stage's result.

    Keys: "scales", "levels" (pixel-unit arrays), "pnet_levels" (per level: windows, scores after the
    level's NMS), "pnet" / "rnet" / "onet" (boxes_Nx4, scores_N after each stage) and "landmarks".
    """
    image = np.asarray(image_HxWx3, np.float32)
    h, w = image.shape[:2]
    scales = pyramid_scales(h, w, config.min_face_size, config.scale_factor)
    sizes = level_sizes(h, w, scales)
    levels = build_pyramid(image, np.array([h, w]), sizes, [tuple(s) for s in sizes], config)
    steps: dict[str, Any] = {"scales": scales, "levels": levels, "pnet_levels": []}
    found = [_pnet_level_steps(params["pnet"], lvl, s, config) for lvl, s in zip(levels, scales)]
    steps["pnet_levels"] = [{"boxes": f[0], "scores": f[1], "n_above_threshold": f[3]} for f in found]
    win, score, reg = (np.concatenate([f[i] for f in found]) for i in range(3))
    keep = bx.nms(win, score, config.nms_pnet)
    b1 = bx.fix(bx.square(bx.regress(win[keep], reg[keep], plus_one=False)))
    steps["pnet"] = {"boxes": b1, "scores": score[keep]}
    src = crop_sources(image, np.array([h, w]), levels, sizes, scales)
    out = nets.rnet(params["rnet"], nets.normalize(crop_patches(src, b1, 24, crop_taps(config))))
    prob, reg = _probability(out["logits"]), np.asarray(out["box"])
    passed = np.nonzero(prob > config.thresholds[1])[0]
    keep = passed[bx.nms(b1[passed], prob[passed], config.nms_rnet)]
    b2 = bx.fix(bx.square(bx.regress(b1[keep], reg[keep], plus_one=True)))
    steps["rnet"] = {"boxes": b2, "scores": prob[keep]}
    out = nets.onet(params["onet"], nets.normalize(crop_patches(src, b2, 48, crop_taps(config))))
    prob, reg, rel = _probability(out["logits"]), np.asarray(out["box"]), np.asarray(out["landmarks"])
    passed = np.nonzero(prob > config.thresholds[2])[0]
    points = bx.landmarks_from_relative(b2[passed], rel[passed])
    b3 = bx.regress(b2[passed], reg[passed], plus_one=True)
    keep = bx.nms(b3, prob[passed], config.nms_onet, mode="min")
    steps["onet"] = {"boxes": b3[keep], "scores": prob[passed][keep]}
    steps["landmarks"] = points[keep]
    return steps


def _pnet_level_steps(params: dict, level_HxWx3: np.ndarray, scale: float, config: CascadeConfig):
    """One level: windows whose face probability >= t1, after the level's own NMS (Union 0.5), and how
    many windows passed the threshold before that NMS."""
    out = nets.pnet(params, nets.normalize(level_HxWx3)[None])
    prob, reg = _probability(out["logits"])[0], np.asarray(out["box"])[0]
    rows, cols = np.nonzero(prob >= config.thresholds[0])
    win = bx.pnet_windows(rows, cols, scale).astype(np.float32)
    keep = bx.nms(win, prob[rows, cols], config.nms_level)
    return win[keep], prob[rows, cols][keep], reg[rows, cols][keep], len(rows)


# ----------------------------------------------------------------------------- the fixed-shape path

@dataclass(frozen=True)
class BucketPlan:
    """What is static for one bucket: its pyramid scales, level buffers and P-Net window tables."""

    scales: tuple[float, ...]
    bufs: tuple[tuple[int, int], ...]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(hb: int, wb: int, config: CascadeConfig) -> "BucketPlan":
        scales = pyramid_scales(hb, wb, config.min_face_size, config.scale_factor)
        return BucketPlan(tuple(scales), tuple(map(tuple, level_sizes(hb, wb, scales).tolist())))

    @functools.cached_property
    def windows(self) -> tuple[np.ndarray, np.ndarray]:
        """All levels' P-Net windows (M, 4) for their buffer-sized maps, row-major per level, and each
        window's level (M,). Computed in float64 as MATLAB does, then stored as float32; passed to the
        jitted cascade as an argument (a constant this large would slow its compilation)."""
        wins, ids = [], []
        for k, buf in enumerate(self.bufs):
            mh, mw = (int(v) for v in pnet_map_size(np.array(buf)))
            rows, cols = np.meshgrid(np.arange(mh), np.arange(mw), indexing="ij")
            wins.append(bx.pnet_windows(rows.reshape(-1), cols.reshape(-1), self.scales[k]))
            ids.append(np.full(mh * mw, k, np.int32))
        return np.concatenate(wins).astype(np.float32), np.concatenate(ids)


def _pnet_candidates(prob_M, reg_Mx4, mask_M, windows_Mx4, level_M, config: CascadeConfig):
    """One image, all levels' cells at once: windows >= t1 compacted into `window_capacity` slots, NMS
    (Union 0.5) within each level, NMS (Union 0.7) over all, then regression without +1, squaring and fix."""
    win, score, reg, level, valid, over_window = bx.compact(mask_M, prob_M, config.window_capacity,
                                                            windows_Mx4, prob_M, reg_Mx4, level_M)
    keep = bx.nms_fixed(win, score, valid, config.nms_level, groups_K=level)
    keep = bx.nms_fixed(win, score, keep, config.nms_pnet)
    win, score, reg, valid, over_pnet = bx.compact(keep, score, config.pnet_capacity, win, score, reg)
    return bx.fix(bx.square(bx.regress(win, reg, plus_one=False))), score, valid, over_window, over_pnet


def _after_rnet(boxes_Px4, valid_P, prob_P, reg_Px4, config: CascadeConfig):
    """One image: score > t2, NMS (Union 0.7) on the input boxes, regression with +1, squaring, fix."""
    keep = bx.nms_fixed(boxes_Px4, prob_P, valid_P & (prob_P > config.thresholds[1]), config.nms_rnet)
    b, s, r, valid, over = bx.compact(keep, prob_P, config.rnet_capacity, boxes_Px4, prob_P, reg_Px4)
    return bx.fix(bx.square(bx.regress(b, r, plus_one=True))), s, valid, over


def _after_onet(boxes_Rx4, valid_R, prob_R, reg_Rx4, rel_Rx10, config: CascadeConfig):
    """One image: score > t3, landmarks from the pre-regression box, regression with +1, Min-NMS 0.7."""
    points = bx.landmarks_from_relative(boxes_Rx4, rel_Rx10)
    b = bx.regress(boxes_Rx4, reg_Rx4, plus_one=True)
    keep = bx.nms_fixed(b, prob_R, valid_R & (prob_R > config.thresholds[2]), config.nms_onet, mode="min")
    return bx.compact(keep, prob_R, config.max_faces, b, prob_R, points)


def _run_in_chunks(fn: Callable, boxes_BxNx4, valid_BxN, chunk: int) -> dict:
    """fn over slot chunks (B, chunk, 4) -> dict of (B, chunk, ...), only while some image still has
    a valid slot there (valid slots come first): an empty stage costs nothing."""
    b, n = valid_BxN.shape
    n_chunks = (jnp.max(jnp.sum(valid_BxN, axis=1)) + chunk - 1) // chunk
    spec = jax.eval_shape(fn, boxes_BxNx4[:, :chunk])
    init = {k: jnp.zeros((b, n) + v.shape[2:], v.dtype) for k, v in spec.items()}

    def body(state):
        c, outs = state
        o = fn(jax.lax.dynamic_slice_in_dim(boxes_BxNx4, c * chunk, chunk, axis=1))
        return c + 1, {k: jax.lax.dynamic_update_slice_in_dim(outs[k], o[k], c * chunk, axis=1) for k in outs}

    return jax.lax.while_loop(lambda s: s[0] < n_chunks, body, (jnp.int32(0), init))[1]


def _stage_net(net: Callable, params: dict, srcs: CropSources, out: int, taps: int) -> Callable:
    """(B, C, 4) boxes -> dict of (B, C, ...) net outputs on their crops, plus the face probability."""

    def fn(boxes_BxCx4):
        crops = jax.vmap(lambda s, bb: crop_patches(s, bb, out, taps))(srcs, boxes_BxCx4)
        bsz, c = crops.shape[:2]
        o = net(params, nets.normalize(crops.reshape((bsz * c,) + crops.shape[2:])))
        o = {k: v.reshape((bsz, c) + v.shape[1:]) for k, v in o.items()}
        return {**o, "prob": nets.face_probability(o["logits"])}

    return fn


jax.tree_util.register_dataclass(CropSources, data_fields=["atlas_Px3", "hw_Jx2", "scale_Jx2"],
                                 meta_fields=["offsets", "widths"])


@functools.partial(jax.jit, static_argnames=("config",))
def _cascade(params, images_BxHxWx3, sizes_Bx2, level_hw_BxLx2, level_on_BxL, windows_Mx4, level_M,
             config: CascadeConfig):
    """The whole cascade for one bucket, fixed shapes throughout."""
    bsz, hb, wb, _ = images_BxHxWx3.shape
    plan = BucketPlan.of(hb, wb, config)
    images = images_BxHxWx3.astype(jnp.float32)
    levels = jax.vmap(lambda im, hw, lhw: build_pyramid(im, hw, lhw, list(plan.bufs), config))(
        images, sizes_Bx2, level_hw_BxLx2)
    probs, regs, masks = [], [], []
    for k, level in enumerate(levels):
        out = nets.pnet(params["pnet"], nets.normalize(level), valid_hw=level_hw_BxLx2[:, k])
        prob = nets.face_probability(out["logits"])
        mh, mw = prob.shape[1:]
        map_hw = jnp.where(level_on_BxL[:, k, None], pnet_map_size(level_hw_BxLx2[:, k]), 0)
        inside = (jnp.arange(mh)[None, :, None] < map_hw[:, 0, None, None]) & (
            jnp.arange(mw)[None, None, :] < map_hw[:, 1, None, None])
        probs.append(prob.reshape(bsz, -1))
        regs.append(out["box"].reshape(bsz, -1, 4))
        masks.append((inside & (prob >= config.thresholds[0])).reshape(bsz, -1))
    b1, s1, v1, over_window, over_pnet = jax.vmap(
        functools.partial(_pnet_candidates, windows_Mx4=windows_Mx4, level_M=level_M, config=config))(
        jnp.concatenate(probs, 1), jnp.concatenate(regs, 1), jnp.concatenate(masks, 1))
    srcs = jax.vmap(lambda im, hw, lv, lhw: crop_sources(im, hw, lv, lhw, list(plan.scales)))(
        images, sizes_Bx2, levels, level_hw_BxLx2)
    r = _run_in_chunks(_stage_net(nets.rnet, params["rnet"], srcs, 24, crop_taps(config)), b1, v1, config.net_chunk)
    b2, s2, v2, over_rnet = jax.vmap(functools.partial(_after_rnet, config=config))(b1, v1, r["prob"], r["box"])
    o = _run_in_chunks(_stage_net(nets.onet, params["onet"], srcs, 48, crop_taps(config)), b2, v2, config.net_chunk)
    b3, s3, pts, v3, over_faces = jax.vmap(functools.partial(_after_onet, config=config))(
        b2, v2, o["prob"], o["box"], o["landmarks"])
    overflow = {"window": over_window, "pnet": over_pnet, "rnet": over_rnet, "faces": over_faces}
    return {"boxes": b3, "scores": s3, "landmarks": pts, "valid": v3, "overflow": overflow}


def image_plan(sizes_Bx2: np.ndarray, bucket_hw: tuple[int, int], config: CascadeConfig):
    """Per-image runtime inputs for a bucket: real level sizes (B, L, 2) and which levels each image uses."""
    plan = BucketPlan.of(*bucket_hw, config)
    level_hw = np.stack([level_sizes(int(h), int(w), list(plan.scales)) for h, w in sizes_Bx2])
    level_on = np.stack([np.arange(len(plan.scales)) < len(pyramid_scales(int(h), int(w), config.min_face_size,
                                                                           config.scale_factor))
                         for h, w in sizes_Bx2])
    return level_hw.reshape(len(sizes_Bx2), len(plan.scales), 2), level_on


def detect_bucket(params: dict, images_BxHxWx3: np.ndarray, sizes_Bx2: np.ndarray,
                  config: CascadeConfig = CascadeConfig()) -> dict:
    """Detect faces in a batch of images zero-padded (bottom/right) into one bucket.

    Returns numpy "boxes" (B, F, 4), "scores" (B, F), "landmarks" (B, F, 5, 2), "valid" (B, F) (valid
    rows first, by score) and "overflow": {stage: (B,) candidates dropped by a full capacity}.
    Compiles once per (bucket height, bucket width, batch size, config).
    """
    images = np.asarray(images_BxHxWx3)
    sizes = np.asarray(sizes_Bx2, np.int32).reshape(-1, 2)
    hb, wb = images.shape[1:3]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(sizes) != len(images):
        raise ValueError("detect_bucket needs uint8 images (B, H, W, 3) and their real sizes (B, 2)")
    if (sizes < 12).any() or (sizes[:, 0] > hb).any() or (sizes[:, 1] > wb).any():
        raise ValueError(f"image sizes {sizes.tolist()} must be >= 12 and fit the bucket {hb}x{wb}")
    if not BucketPlan.of(hb, wb, config).scales:
        raise ValueError(f"bucket {hb}x{wb} is too small for min_face_size={config.min_face_size}")
    level_hw, level_on = image_plan(sizes, (hb, wb), config)
    out = _cascade(params, images, sizes, level_hw, level_on, *BucketPlan.of(hb, wb, config).windows, config)
    return jax.tree_util.tree_map(np.asarray, out)
