"""Aligned face crops: what a face recognizer wants from a detector.

Each face's five landmarks are mapped onto a template's five points by the least-squares similarity
(rotation, uniform scale, translation; Umeyama 1991, no reflection), and the image is warped through that
2x3 matrix with bilinear sampling into a fixed-size crop (`align`). The facenet-pytorch style crop (the
detected box plus a margin, resized to a square) is an axis-aligned affine of the same kind, so both run
through one jitted warp. Coordinates are pixel indices (pixel centres at integers), as in OpenCV's
`warpAffine` and scikit-image's `warp`, so a matrix here is the one insightface's `norm_crop` would use.

The warp never compiles per image: the image is zero-padded into the detector's bucket ladder
(`buckets.bucket_shape`) and the face count to a power of two, so a folder compiles a few shapes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtcnn_jax.boxes import LANDMARK_INDEX_OFFSET
from mtcnn_jax.buckets import bucket_shape, pad_to_bucket
from mtcnn_jax.images import ImageSource, load_image
from mtcnn_jax.nets import PRECISION

BORDERS = ("zeros", "edge")  # outside the image: black, or the nearest edge pixel repeated
CUSTOM = "custom"  # the template name an Aligned of a user template carries
MIN_FACES = 8  # faces are padded to a power of two at least this, so a folder compiles few warps


@dataclass(frozen=True)
class Template:
    """A crop's geometry: five (x, y) points (left eye, right eye, nose, left and right mouth corners, as
    the detector's landmarks) in an output of size_hw (height, width); points None: a box margin crop."""

    points: tuple[tuple[float, float], ...] | None
    size_hw: tuple[int, int]
    source: str


TEMPLATES: dict[str, Template] = {
    # insightface python-package/insightface/utils/face_align.py: `arcface_dst` of `norm_crop`, the
    # 112x112 input of the ArcFace models (the SphereFace points below moved 8 px right).
    "arcface112": Template(
        ((38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041)),
        (112, 112), "insightface norm_crop (ArcFace, Deng et al. 2019)"),
    # sphereface preprocess/code/face_align_demo.m `coord5points`: the 112 (high) x 96 (wide) crop of
    # SphereFace (Liu et al. 2017), reused by CosFace (Wang et al. 2018).
    "sphereface112x96": Template(
        ((30.2946, 51.6963), (65.5318, 51.5014), (48.0252, 71.7366), (33.5493, 92.3655), (62.7299, 92.2041)),
        (112, 96), "SphereFace/CosFace face_align_demo.m"),
    # facenet-pytorch models/utils/detect_face.py `extract_face`: the box widened by `margin` pixels of
    # the output (margin * box side / (size - margin), half on each side), clipped to the image, its
    # corners truncated to integers, resized to size x size (`MTCNN(image_size=160, margin=0)`).
    "facenet": Template(None, (160, 160), "facenet-pytorch extract_face (box + margin, square)"),
}


@dataclass(frozen=True, eq=False)
class Aligned:
    """The aligned crops of one image's K faces: crops_Kxhxwx3 (uint8 RGB), matrices_Kx2x3 mapping image
    (x, y) to crop coordinates, and inverses_Kx2x3 mapping crop to image coordinates (to paste back)."""

    crops: np.ndarray
    matrices: np.ndarray
    inverses: np.ndarray
    template: str

    def __len__(self) -> int:
        return len(self.crops)


# ---------------------------------------------------------------------------------------------- templates

def _check_size(size: Any) -> tuple[int, int] | None:
    """size as (h, w): None stays None, an int n is (n, n) for now, (h, w) as given; positive ints only."""
    if size is None:
        return None
    sides = (size, size) if np.ndim(size) == 0 else tuple(size) if len(size) == 2 else None
    if sides is None or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                                for s in sides):
        raise ValueError(f"size must be a positive int or a (height, width) pair of them, got {size!r}")
    return int(sides[0]), int(sides[1])


def _lookup(name_or_points: Any) -> tuple[np.ndarray | None, tuple[int, int] | None, str]:
    """(points_5x2 or None, native (h, w) or None, name) of a template name, Template, (points, (h, w))
    pair or bare 5x2 points."""
    if isinstance(name_or_points, str):
        if name_or_points not in TEMPLATES:
            raise ValueError(f"unknown template {name_or_points!r}; the templates are {', '.join(TEMPLATES)}, "
                             "or pass your own 5 x 2 points with their (height, width)")
        t = TEMPLATES[name_or_points]
        return (None if t.points is None else np.array(t.points, np.float64)), t.size_hw, name_or_points
    if isinstance(name_or_points, Template):
        t = name_or_points
        return (None if t.points is None else np.array(t.points, np.float64)), _check_size(t.size_hw), CUSTOM
    native = None
    if isinstance(name_or_points, (tuple, list)) and len(name_or_points) == 2 and np.ndim(name_or_points[1]) == 1:
        name_or_points, native = name_or_points[0], _check_size(tuple(name_or_points[1]))
    points = np.asarray(name_or_points, np.float64)
    if points.shape != (5, 2) or not np.isfinite(points).all():
        raise ValueError(f"a template is a name ({', '.join(TEMPLATES)}) or 5 x 2 finite (x, y) points "
                         f"(with their (height, width)), got shape {points.shape}")
    return points, native, CUSTOM


def template_points(name_or_points: Any, size: int | Sequence[int] | None = None
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """A similarity template's points_5x2 (x, y) and output (h, w) at `size`.

    name_or_points: a TEMPLATES name, a Template, a (points_5x2, (h, w)) pair, or bare points_5x2 (then
    `size` is their frame, unscaled). size None: the template's own; an int n: height n, the points and
    width scaled by n / height (arcface112 at 224: points x 2); (h, w): the points scaled uniformly to fit
    and centred in it.
    """
    points, native, _ = _lookup(name_or_points)
    if points is None:
        raise ValueError(f"template {name_or_points!r} is a box margin crop with no points; "
                         "align() builds it from the detected boxes")
    out = _check_size(size)
    if native is None:
        if out is None:
            raise ValueError("bare template points need the size (height, width) of the crop they are in")
        return points.astype(np.float32), out
    h0, w0 = native
    if out is None:
        return points.astype(np.float32), native
    if np.ndim(size) == 0:  # an int: the height; the width follows the template's aspect
        scale = out[0] / h0
        return (points * scale).astype(np.float32), (out[0], max(1, round(w0 * scale)))
    scale = min(out[0] / h0, out[1] / w0)
    offset = (np.array([out[1], out[0]]) - np.array([w0, h0]) * scale) / 2
    return (points * scale + offset).astype(np.float32), out


# ---------------------------------------------------------------------------------------------- matrices

@jax.jit
def similarity_matrices(src_Kx5x2: jax.Array, dst_5x2: jax.Array) -> jax.Array:
    """The least-squares similarities (Umeyama 1991, rotations only) taking each face's landmarks to the
    template points, as K x 2 x 3 matrices [[a, -b, tx], [b, a, ty]] (image -> crop).

    In 2-D Umeyama's SVD solution with det(R) = +1 is the linear least squares over (a, b) of the
    centred points: a = sum(s . d) / sum|s|^2, b = sum(s x d) / sum|s|^2, t = mean_d - R mean_s."""
    src = jnp.asarray(src_Kx5x2, jnp.float32)
    dst = jnp.asarray(dst_5x2, jnp.float32)
    src_mean, dst_mean = src.mean(axis=1), dst.mean(axis=0)
    s, d = src - src_mean[:, None], dst - dst_mean
    var = jnp.maximum((s ** 2).sum(axis=(1, 2)), jnp.finfo(jnp.float32).tiny)
    a = (s[..., 0] * d[..., 0] + s[..., 1] * d[..., 1]).sum(axis=1) / var
    b = (s[..., 0] * d[..., 1] - s[..., 1] * d[..., 0]).sum(axis=1) / var
    rot = jnp.stack([jnp.stack([a, -b], -1), jnp.stack([b, a], -1)], -2)  # K x 2 x 2
    t = dst_mean - jnp.einsum("kij,kj->ki", rot, src_mean, precision=PRECISION)
    return jnp.concatenate([rot, t[..., None]], axis=-1)


@jax.jit
def invert_affine(matrices_Kx2x3: jax.Array) -> jax.Array:
    """The inverses of K 2x3 affine matrices [A | t]: [A^-1 | -A^-1 t]."""
    m = jnp.asarray(matrices_Kx2x3, jnp.float32)
    a, b, c, d = m[:, 0, 0], m[:, 0, 1], m[:, 1, 0], m[:, 1, 1]
    det = a * d - b * c
    inv = jnp.stack([jnp.stack([d, -b], -1), jnp.stack([-c, a], -1)], -2) / det[:, None, None]
    return jnp.concatenate([inv, -jnp.einsum("kij,kj->ki", inv, m[:, :, 2], precision=PRECISION)[..., None]], axis=-1)


@jax.jit
def margin_matrices(boxes_Kx4: jax.Array, image_hw: jax.Array, size: float, margin: float
                    ) -> tuple[jax.Array, jax.Array]:
    """(image -> crop, crop -> image) K x 2 x 3 matrices of facenet-pytorch's `extract_face`: the box
    (x1, y1, x2, y2) widened by margin * side / (size - margin), half each side, clipped to the image,
    truncated to integers, then resized to size x size (crop pixel u's centre u + 0.5 at the image's
    x1' + (u + 0.5) * width / size, as PIL and OpenCV resize)."""
    boxes = jnp.asarray(boxes_Kx4, jnp.float32)
    h, w = image_hw[0].astype(jnp.float32), image_hw[1].astype(jnp.float32)
    mx = margin * (boxes[:, 2] - boxes[:, 0]) / (size - margin)
    my = margin * (boxes[:, 3] - boxes[:, 1]) / (size - margin)
    x1 = jnp.trunc(jnp.maximum(boxes[:, 0] - mx / 2, 0))
    y1 = jnp.trunc(jnp.maximum(boxes[:, 1] - my / 2, 0))
    x2 = jnp.trunc(jnp.minimum(boxes[:, 2] + mx / 2, w))
    y2 = jnp.trunc(jnp.minimum(boxes[:, 3] + my / 2, h))
    sx, sy = jnp.maximum(x2 - x1, 1) / size, jnp.maximum(y2 - y1, 1) / size  # image pixels per crop pixel
    zero = jnp.zeros_like(sx)
    inverses = jnp.stack([jnp.stack([sx, zero, x1 + 0.5 * sx - 0.5], -1),
                          jnp.stack([zero, sy, y1 + 0.5 * sy - 0.5], -1)], -2)
    matrices = jnp.stack([jnp.stack([1 / sx, zero, (0.5 - x1) / sx - 0.5], -1),
                          jnp.stack([zero, 1 / sy, (0.5 - y1) / sy - 0.5], -1)], -2)
    return matrices, inverses


def transform_points(matrices_Kx2x3: np.ndarray, points_KxNx2: np.ndarray) -> np.ndarray:
    """Points (x, y) of each face mapped by its 2x3 matrix: landmarks into their crop (matrices) or crop
    points back into the image (inverses)."""
    m = np.asarray(matrices_Kx2x3, np.float64)
    return np.einsum("kij,knj->kni", m[:, :, :2], np.asarray(points_KxNx2, np.float64)) + m[:, None, :, 2]


# ---------------------------------------------------------------------------------------------- warp

@functools.partial(jax.jit, static_argnames=("out_hw", "border"))
def warp_affine(image_HxWx3: jax.Array, image_hw: jax.Array, inverses_Kx2x3: jax.Array,
                out_hw: tuple[int, int], border: str = "zeros") -> jax.Array:
    """K crops (K x h x w x 3 uint8) of one (possibly padded) image: crop pixel (u, v) is the bilinear
    sample of the image at inverse @ (u, v, 1). Only the image's real image_hw (h, w) top-left part is
    read; taps outside it are 0 ("zeros", as OpenCV's BORDER_CONSTANT) or the nearest edge pixel ("edge")."""
    h_out, w_out = out_hw
    inv = jnp.asarray(inverses_Kx2x3, jnp.float32)[:, :, :, None, None]  # K x 2 x 3 x 1 x 1
    v, u = jnp.meshgrid(jnp.arange(h_out, dtype=jnp.float32), jnp.arange(w_out, dtype=jnp.float32),
                        indexing="ij")
    x = inv[:, 0, 0] * u + inv[:, 0, 1] * v + inv[:, 0, 2]  # K x h x w
    y = inv[:, 1, 0] * u + inv[:, 1, 1] * v + inv[:, 1, 2]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    h, w = image_hw[0], image_hw[1]
    width = image_HxWx3.shape[1]
    flat = image_HxWx3.reshape(-1, 3)

    def tap(yi: jax.Array, xi: jax.Array) -> jax.Array:
        xc = jnp.clip(xi, 0, w - 1).astype(jnp.int32)
        yc = jnp.clip(yi, 0, h - 1).astype(jnp.int32)
        pixel = jnp.take(flat, yc * width + xc, axis=0, mode="clip").astype(jnp.float32)
        if border == "zeros":
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            pixel = jnp.where(inside[..., None], pixel, 0.0)
        return pixel

    out = ((1 - fy) * ((1 - fx) * tap(y0, x0) + fx * tap(y0, x0 + 1))
           + fy * ((1 - fx) * tap(y0 + 1, x0) + fx * tap(y0 + 1, x0 + 1)))
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)


# ---------------------------------------------------------------------------------------------- align

@functools.partial(jax.jit, static_argnames=("out_hw", "border"))
def _similarity_crops(image: jax.Array, image_hw: jax.Array, src_Kx5x2: jax.Array, dst_5x2: jax.Array,
                      out_hw: tuple[int, int], border: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(crops, matrices, inverses) to a point template, as one compiled program."""
    matrices = similarity_matrices(src_Kx5x2, dst_5x2)
    inverses = invert_affine(matrices)
    return warp_affine(image, image_hw, inverses, out_hw, border), matrices, inverses


@functools.partial(jax.jit, static_argnames=("out_hw", "border"))
def _margin_crops(image: jax.Array, image_hw: jax.Array, boxes_Kx4: jax.Array, size: float, margin: float,
                  out_hw: tuple[int, int], border: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(crops, matrices, inverses) of the facenet margin crop, as one compiled program."""
    matrices, inverses = margin_matrices(boxes_Kx4, image_hw, size, margin)
    return warp_affine(image, image_hw, inverses, out_hw, border), matrices, inverses


def _faces(detections_or_landmarks: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(landmarks_Kx5x2 or None, boxes_Kx4 or None) of a Detections-like object (.landmarks, .boxes), a
    landmarks array K x 5 x 2, or a boxes array K x 4 (K x 5 with scores). A Detections' landmarks are moved
    from the detector's coordinates to pixel indices (`boxes.LANDMARK_INDEX_OFFSET`); arrays are pixel indices."""
    obj = detections_or_landmarks
    if hasattr(obj, "landmarks"):
        landmarks = np.asarray(obj.landmarks, np.float32) + np.float32(LANDMARK_INDEX_OFFSET)
        boxes = getattr(obj, "boxes", None)
        boxes = None if boxes is None else np.asarray(boxes, np.float32)
    else:
        a = np.asarray(obj, np.float32)
        is_boxes = a.ndim == 2 and a.shape[1] in (4, 5)
        landmarks, boxes = (None, a[:, :4]) if is_boxes else (a, None)
    if landmarks is not None:
        if landmarks.size == 0:
            landmarks = landmarks.reshape(0, 5, 2)
        if landmarks.ndim != 3 or landmarks.shape[1:] != (5, 2):
            hint = " (one face: add a leading axis, `landmarks[None]`)" if landmarks.shape == (5, 2) else ""
            raise ValueError(f"landmarks must be K x 5 x 2 (x, y) per face, got shape {landmarks.shape}{hint}")
        if not np.isfinite(landmarks).all():
            raise ValueError("landmarks contain NaN or infinite values")
    if boxes is not None:
        boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes[:, :4] if boxes.ndim == 2 else boxes
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.isfinite(boxes).all():
            raise ValueError(f"boxes must be K x 4 finite (x1, y1, x2, y2), got shape {boxes.shape}")
    if landmarks is not None and boxes is not None and len(landmarks) != len(boxes):
        raise ValueError(f"{len(landmarks)} landmark sets but {len(boxes)} boxes")
    return landmarks, boxes


def _pad_faces(a: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """a (K, ...) padded with copies of `fill` to the next power of two rows (at least MIN_FACES), so
    few shapes compile."""
    padded = max(MIN_FACES, 1 << max(len(a) - 1, 0).bit_length())
    return np.concatenate([a, np.broadcast_to(fill, (padded - len(a), *a.shape[1:]))]).astype(np.float32)


def _empty(out_hw: tuple[int, int], name: str) -> Aligned:
    """The Aligned of no faces: arrays of the right shapes with K = 0."""
    m = np.zeros((0, 2, 3), np.float32)
    return Aligned(np.zeros((0, *out_hw, 3), np.uint8), m, m.copy(), name)


def crop_geometry(template: Any = "arcface112", size: int | Sequence[int] | None = None, border: str = "zeros",
                  margin: float = 0.0) -> tuple[np.ndarray | None, tuple[int, int], str]:
    """What `align` crops to, checked before any image is read: (the template's points_5x2 in the crop,
    None for the facenet margin crop; the crop's (h, w); the template's name). ValueError for a bad choice."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {', '.join(BORDERS)}, got {border!r}")
    points, native, name = _lookup(template)
    if points is not None:
        dst, out_hw = template_points(template, size)
        return dst, out_hw, name
    out_hw = _check_size(size) or native
    if out_hw[0] != out_hw[1]:
        raise ValueError(f"the facenet margin crop is square: pass one int size, got {size!r}")
    if not 0 <= margin < out_hw[0]:
        raise ValueError(f"margin must be in [0, size) output pixels, got {margin!r} for size {out_hw[0]}")
    return None, out_hw, name


def align(image: ImageSource, detections_or_landmarks: Any, template: Any = "arcface112",
          size: int | Sequence[int] | None = None, border: str = "zeros", margin: float = 0.0) -> Aligned:
    """The aligned crops of one image's faces.

    image: a path, PIL image or uint8 H x W x 3 array. detections_or_landmarks: `detect.Detections` (or
    anything with .landmarks K x 5 x 2 and .boxes K x 4, in the detector's coordinates), a landmarks array
    K x 5 x 2 in pixel indices (pixel centres at 0, 1, ...; for `det.landmarks` pass `det` itself, or add
    `boxes.LANDMARK_INDEX_OFFSET`), or (the "facenet" margin crop only) a boxes array K x 4 (as the
    detector's, which facenet-pytorch's boxes are too). template: a TEMPLATES name or your own points (see
    `template_points`, which also says what `size` does); "facenet" crops the box plus `margin` output
    pixels to size x size (default 160). border: "zeros" or "edge", what is sampled outside the image.
    """
    points, out_hw, name = crop_geometry(template, size, border, margin)
    landmarks, boxes = _faces(detections_or_landmarks)
    if points is None and boxes is None:
        raise ValueError("the facenet margin crop needs boxes: pass the Detections (or a K x 4 boxes array)")
    if points is not None and landmarks is None:
        raise ValueError(f"template {name!r} needs landmarks: pass the Detections or a K x 5 x 2 array")
    k = len(boxes) if points is None else len(landmarks)
    img = load_image(image)
    if k == 0:
        return _empty(out_hw, name)
    bucket, hw = pad_to_bucket([img], bucket_shape(*img.shape[:2]))
    if points is None:
        result = _margin_crops(bucket[0], hw[0], _pad_faces(boxes, np.array([0, 0, 1, 1])), float(out_hw[0]),
                               float(margin), out_hw=out_hw, border=border)
    else:
        result = _similarity_crops(bucket[0], hw[0], _pad_faces(landmarks, points), points, out_hw=out_hw,
                                   border=border)
    crops, matrices, inverses = jax.device_get(result)
    return Aligned(np.asarray(crops[:k]), np.asarray(matrices[:k]), np.asarray(inverses[:k]), name)
