"""Aligned face crops (align.py) against scikit-image's similarity estimate and warp, facenet-pytorch's
margin crop rule, and the released weights' landmarks on the reference photos."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from mtcnn_jax import align
from mtcnn_jax.boxes import LANDMARK_INDEX_OFFSET
from mtcnn_jax.detect import detect
from mtcnn_jax.images import load_image
from mtcnn_jax.landmark_eval import read_landmark_list

skt = pytest.importorskip("skimage.transform", reason="scikit-image (the dev extra) is the reference")

ARCFACE = np.array(align.TEMPLATES["arcface112"].points, np.float64)
REFERENCE_PHOTOS = ("ivan.jpg", "multiface.jpg")  # 7 faces, two buckets to compile


def skimage_matrices(src_Kx5x2: np.ndarray, dst_5x2: np.ndarray) -> np.ndarray:
    """scikit-image's least-squares similarity for each face, as K x 2 x 3."""
    estimate = getattr(skt.SimilarityTransform, "from_estimate", None)
    out = []
    for src in np.asarray(src_Kx5x2, np.float64):
        if estimate is not None:
            t = estimate(src, dst_5x2)
        else:  # scikit-image < 0.26
            t = skt.SimilarityTransform()
            assert t.estimate(src, dst_5x2)
        out.append(t.params[:2])
    return np.stack(out)


def skimage_warp(image: np.ndarray, inverse_2x3: np.ndarray, out_hw: tuple[int, int], mode: str) -> np.ndarray:
    """The bilinear reference warp of one crop, rounded like align's uint8 output."""
    inverse = skt.AffineTransform(matrix=np.vstack([inverse_2x3, [0, 0, 1]]).astype(np.float64))
    return np.round(skt.warp(image, inverse, output_shape=out_hw, order=1, mode=mode, cval=0, preserve_range=True))


@pytest.fixture(scope="module")
def lfw(shared_data) -> tuple[list[dict], np.ndarray]:
    """The LFW+Net test faces and their ground-truth landmarks (K x 5 x 2)."""
    entries = read_landmark_list(shared_data / "lfw_net" / "testImageList.txt")
    return entries, np.stack([e["points"] for e in entries]).astype(np.float32)


@pytest.fixture(scope="module")
def lfw_image(shared_data, lfw) -> tuple[np.ndarray, np.ndarray]:
    """One LFW+Net test image and its face's landmarks (1 x 5 x 2)."""
    entries, points = lfw
    return load_image(shared_data / "lfw_net" / entries[0]["path"]), points[:1]


@pytest.fixture(scope="module")
def reference_faces(shared_data, original_weights) -> list[tuple[object, object]]:
    """(path, Detections) of a few reference photos with the released weights."""
    paths = [shared_data / "reference" / name for name in REFERENCE_PHOTOS]
    return [(path, detect(path, original_weights)) for path in paths]


def random_landmarks(rng: np.random.Generator, k: int) -> np.ndarray:
    """Landmark sets of three kinds: uniform points, template faces under random similarities with noise,
    and their mirror images (which a similarity without reflection can only fit badly)."""
    uniform = rng.uniform(0, 640, (k, 5, 2))
    angle, scale = rng.uniform(-np.pi, np.pi, k), rng.uniform(0.2, 8, k)
    c, s = scale * np.cos(angle), scale * np.sin(angle)
    rot = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
    faces = np.einsum("kij,nj->kni", rot, ARCFACE) + rng.uniform(0, 600, (k, 1, 2)) + rng.normal(0, 2, (k, 5, 2))
    mirrored = faces * np.array([-1, 1]) + np.array([640, 0])
    return np.concatenate([uniform, faces, mirrored]).astype(np.float32)


# ---------------------------------------------------------------------------------------------- matrices

def test_matrices_equal_skimage_on_random_landmarks():
    points = random_landmarks(np.random.default_rng(0), 100)
    for dst in (ARCFACE, align.template_points("sphereface112x96", 224)[0]):
        ours = np.asarray(align.similarity_matrices(points, dst))
        np.testing.assert_allclose(ours, skimage_matrices(points, dst), atol=1e-4, rtol=1e-4)
        assert (np.linalg.det(ours[:, :, :2]) > 0).all()  # no reflection, even for the mirrored faces


def test_matrices_equal_skimage_on_lfw_net(lfw):
    _, points = lfw
    ours = np.asarray(align.similarity_matrices(points, ARCFACE))
    np.testing.assert_allclose(ours, skimage_matrices(points, ARCFACE), atol=1e-4, rtol=1e-4)


def test_inverses_invert(lfw):
    _, points = lfw
    aligned_points = align.transform_points(np.asarray(align.similarity_matrices(points, ARCFACE)), points)
    inverses = np.asarray(align.invert_affine(align.similarity_matrices(points, ARCFACE)))
    np.testing.assert_allclose(align.transform_points(inverses, aligned_points), points, atol=1e-3)


# ---------------------------------------------------------------------------------------------- warp

@pytest.mark.parametrize("border, mode", [("zeros", "constant"), ("edge", "edge")])
def test_warp_matches_skimage(lfw_image, border, mode):
    image, points = lfw_image
    # the face, the face rotated by 30 degrees about the image centre and shrunk, and one half outside
    c, s = 0.8 * np.cos(np.pi / 6), 0.8 * np.sin(np.pi / 6)
    rotated = (points - 200) @ np.array([[c, s], [-s, c]]) + 200
    faces = np.concatenate([points, rotated, points + np.array([-150, 120])]).astype(np.float32)
    result = align.align(image, faces, "arcface112", size=160, border=border)
    assert result.crops.shape == (3, 160, 160, 3) and result.crops.dtype == np.uint8
    for crop, inverse in zip(result.crops, result.inverses):
        reference = skimage_warp(image, inverse, (160, 160), mode)
        assert np.abs(crop - reference).mean() < 1.0


def test_border_edge_differs_from_zeros_only_outside(lfw_image):
    image, points = lfw_image
    faces = points + np.array([-170.0, 140.0])  # the face's lower left part falls outside the image
    zeros = align.align(image, faces, border="zeros")
    edge = align.align(image, faces, border="edge")
    np.testing.assert_allclose(zeros.matrices, edge.matrices)
    v, u = np.mgrid[:112, :112]
    inv = zeros.inverses[0].astype(np.float64)
    x, y = inv[0, 0] * u + inv[0, 1] * v + inv[0, 2], inv[1, 0] * u + inv[1, 1] * v + inv[1, 2]
    h, w = image.shape[:2]
    inside = (x >= 0.01) & (x <= w - 1.01) & (y >= 0.01) & (y <= h - 1.01)
    outside = (x < -1.01) | (x > w + 0.01) | (y < -1.01) | (y > h + 0.01)
    assert inside.any() and outside.any()
    np.testing.assert_array_equal(zeros.crops[0][inside], edge.crops[0][inside])
    assert (zeros.crops[0][outside] == 0).all()
    assert (edge.crops[0][outside] != 0).any()


def test_reference_photos_put_the_eyes_on_the_template(reference_faces):
    for path, faces in reference_faces:
        assert len(faces) >= 1, path
        result = align.align(path, faces)
        assert result.crops.shape == (len(faces), 112, 112, 3)
        points = faces.landmarks + LANDMARK_INDEX_OFFSET  # the detector's coordinates to pixel indices
        np.testing.assert_allclose(result.matrices, skimage_matrices(points, ARCFACE), atol=1e-4, rtol=1e-4)
        eyes = align.transform_points(result.matrices, points)[:, :2]
        # A 5-point least-squares similarity (insightface's norm_crop is the same fit) spreads the residual
        # over the five points; on these faces each eye lands 0.7-2.6 px from the template's.
        errors = np.linalg.norm(eyes - ARCFACE[:2], axis=-1)
        assert errors.max() < 3.0, (path, errors)


# ---------------------------------------------------------------------------------------------- templates

def facenet_box(box, image_wh, size, margin):
    """facenet-pytorch's extract_face box rule, written out as it is there."""
    m = [margin * (box[2] - box[0]) / (size - margin), margin * (box[3] - box[1]) / (size - margin)]
    return [int(max(box[0] - m[0] / 2, 0)), int(max(box[1] - m[1] / 2, 0)),
            int(min(box[2] + m[0] / 2, image_wh[0])), int(min(box[3] + m[1] / 2, image_wh[1]))]


def test_margin_crop_follows_facenet_pytorch(lfw_image):
    image, _ = lfw_image  # 400 x 400
    boxes = np.array([[120.3, 130.6, 170.2, 178.9], [-5.0, 10.0, 60.0, 80.0]], np.float32)
    # by hand: box 0 widened by 20 * 49.9 / 140 = 7.13 and 20 * 48.3 / 140 = 6.9 -> (116, 127, 173, 182);
    # box 1 by 20 * 65 / 140 = 9.29 and 20 * 70 / 140 = 10 -> clipped at 0 -> (0, 5, 64, 85)
    expected = [[116, 127, 173, 182], [0, 5, 64, 85]]
    assert [facenet_box(b, (400, 400), 160, 20) for b in boxes.tolist()] == expected
    result = align.align(image, SimpleNamespace(boxes=boxes, landmarks=np.zeros((2, 5, 2))), "facenet", margin=20)
    assert result.template == "facenet" and result.crops.shape == (2, 160, 160, 3)
    for (x1, y1, x2, y2), inverse, crop in zip(expected, result.inverses, result.crops):
        sx, sy = (x2 - x1) / 160, (y2 - y1) / 160  # crop pixel u's centre u + 0.5 at x1 + (u + 0.5) * sx
        np.testing.assert_allclose(inverse, [[sx, 0, x1 + sx / 2 - 0.5], [0, sy, y1 + sy / 2 - 0.5]], atol=1e-4)
        pil = np.asarray(Image.fromarray(image).crop((x1, y1, x2, y2)).resize((160, 160), Image.BILINEAR))
        assert np.abs(crop - pil.astype(np.float64)).mean() < 1.0  # upsampled: PIL's bilinear is ours
    np.testing.assert_allclose(align.transform_points(result.matrices, align.transform_points(
        result.inverses, np.array([[[0.0, 0.0], [159.0, 159.0]]] * 2))), [[[0, 0], [159, 159]]] * 2, atol=1e-3)
    boxes_only = align.align(image, boxes, "facenet", size=160, margin=20)  # a K x 4 array works too
    np.testing.assert_array_equal(boxes_only.crops, result.crops)


def test_user_template_scales_to_any_size(lfw_image):
    image, points = lfw_image
    mine = align.Template(tuple(map(tuple, ARCFACE)), (112, 112), "mine")
    dst, out_hw = align.template_points(mine, 224)
    np.testing.assert_allclose(dst, ARCFACE * 2, rtol=1e-6)
    assert out_hw == (224, 224)
    np.testing.assert_allclose(align.template_points((ARCFACE, (112, 112)), 224)[0], ARCFACE * 2, rtol=1e-6)
    big, small = align.align(image, points, mine, size=224), align.align(image, points, "arcface112")
    assert big.template == align.CUSTOM and big.crops.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(big.matrices, small.matrices * 2, rtol=1e-4, atol=1e-3)
    wide, hw = align.template_points("arcface112", (224, 256))  # fitted and centred
    np.testing.assert_allclose(wide, ARCFACE * 2 + [16, 0], rtol=1e-6)
    assert hw == (224, 256)
    sphere, hw = align.template_points("sphereface112x96", 224)
    assert hw == (224, 192)
    np.testing.assert_allclose(sphere, (ARCFACE - [8, 0]) * 2, rtol=1e-5)
    np.testing.assert_allclose(align.template_points(ARCFACE, (112, 112))[0], ARCFACE, rtol=1e-6)


def test_zero_faces_give_empty_arrays(lfw_image):
    image, _ = lfw_image
    empty = SimpleNamespace(boxes=np.zeros((0, 4)), landmarks=np.zeros((0, 5, 2)))
    for template, size, hw in [("arcface112", None, (112, 112)), ("sphereface112x96", None, (112, 96)),
                               ("facenet", 96, (96, 96))]:
        result = align.align(image, empty, template, size=size)
        assert result.crops.shape == (0, *hw, 3) and result.crops.dtype == np.uint8
        assert result.matrices.shape == result.inverses.shape == (0, 2, 3) and len(result) == 0
    assert align.align(image, np.zeros((0, 5, 2))).crops.shape == (0, 112, 112, 3)


def test_clear_errors(lfw_image):
    image, points = lfw_image
    with pytest.raises(ValueError, match="unknown template 'arcface'.*arcface112, sphereface112x96, facenet"):
        align.align(image, points, "arcface")
    for size in (0, -3, 1.5, True, (112,), (112, 0), "112"):
        with pytest.raises(ValueError, match="size must be a positive int"):
            align.align(image, points, size=size)
    with pytest.raises(ValueError, match=r"K x 5 x 2.*landmarks\[None\]"):
        align.align(image, points[0])
    with pytest.raises(ValueError, match="K x 5 x 2"):
        align.align(image, np.zeros((2, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        align.align(image, np.full((1, 5, 2), np.nan))
    with pytest.raises(ValueError, match="border must be one of zeros, edge"):
        align.align(image, points, border="reflect")
    with pytest.raises(ValueError, match="needs boxes"):
        align.align(image, points, "facenet")
    with pytest.raises(ValueError, match="needs landmarks"):
        align.align(image, np.array([[0, 0, 50, 50]]), "arcface112")
    with pytest.raises(ValueError, match="margin must be in"):
        align.align(image, np.array([[0, 0, 50, 50]]), "facenet", size=32, margin=32)
    with pytest.raises(ValueError, match="square"):
        align.align(image, np.array([[0, 0, 50, 50]]), "facenet", size=(160, 128))
    with pytest.raises(ValueError, match="box margin crop"):
        align.template_points("facenet")
    with pytest.raises(ValueError, match="5 x 2"):
        align.template_points(np.zeros((4, 2)), 112)
    with pytest.raises(ValueError, match="need the size"):
        align.template_points(ARCFACE)


def test_one_compile_per_bucket_and_face_count_power(lfw_image, compiles):
    image, points = lfw_image
    faces = np.repeat(points, 3, axis=0)
    align.align(image, faces)  # warm: 400 x 400 pads into the 512 x 512 bucket, 3 faces into 4
    before = compiles.count
    other = np.ascontiguousarray(image[:390, :395])  # another size, the same 512 x 512 bucket
    result = align.align(other, np.repeat(points, 4, axis=0))
    assert compiles.count == before
    assert result.crops.shape == (4, 112, 112, 3)
