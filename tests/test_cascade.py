"""The cascade: the fixed-shape jitted path against the readable path, padding, compiles, overflow, peers."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from mtcnn_jax import boxes as bx
from mtcnn_jax import buckets, cascade_steps, checkpoints, compiled, pyramid
from mtcnn_jax.cascade_config import CascadeConfig

PHOTOS = ["angelina_jolie.jpg", "ivan.jpg", "kate_siegel.jpg", "multiface.jpg", "no-faces.jpg", "paul_rudd.jpg",
          "shea_whigham.jpg"]


@pytest.fixture(scope="module")
def params(original_weights):
    return original_weights


@pytest.fixture(scope="module")
def photos(shared_data):
    return {name: np.asarray(Image.open(shared_data / "reference" / name).convert("RGB")) for name in PHOTOS}


def run_fixed(params, images, bucket, config=CascadeConfig()):
    """Pad images into one bucket (bottom/right zeros) and run the jitted cascade."""
    return compiled.detect_bucket(params, *buckets.pad_to_bucket(images, bucket), config)


def assert_same_detections(fixed, i, steps):
    """Image i of a fixed-path result has the readable path's final detections: the same set, matched
    by IoU; boxes and landmarks within 1.5 px and scores within 2e-3. (P-Net on the packed canvas and on
    each level separately differ by float rounding, ~3e-5 in probability, which can flip a truncation
    to the next pixel, and so a crop.)"""
    v = fixed["valid"][i]
    ours_b, ours_s, ours_l = fixed["boxes"][i][v], fixed["scores"][i][v], fixed["landmarks"][i][v]
    ref_b, ref_s, ref_l = steps["onet"]["boxes"], steps["onet"]["scores"], steps["landmarks"]
    assert len(ours_b) == len(ref_b)
    if not len(ref_b):
        return
    match = bx.iou_matrix(ref_b, ours_b).argmax(axis=1)
    assert sorted(match.tolist()) == list(range(len(ours_b)))  # one-to-one
    np.testing.assert_allclose(ours_b[match], ref_b, atol=1.5)
    np.testing.assert_allclose(ours_s[match], ref_s, atol=2e-3)
    np.testing.assert_allclose(ours_l[match], ref_l, atol=1.5)
    assert np.all(np.diff(ours_s) <= 0)  # valid rows by descending score


@pytest.fixture(scope="module")
def photo_results(params, photos):
    """Every reference photo through both paths; the fixed path in ONE 2048x2048 bucket for all, so
    the small photos also show that padding never creates or changes a detection."""
    fixed = {name: run_fixed(params, [im], (2048, 2048)) for name, im in photos.items()}
    steps = {name: cascade_steps.detect_steps(params, photos[name]) for name in READABLE}
    return fixed, steps


READABLE = ["ivan.jpg", "multiface.jpg", "no-faces.jpg"]  # the readable path compiles P-Net per level size


def test_fixed_path_equals_readable_path_on_photos(photo_results):
    fixed, steps = photo_results
    for name in READABLE:
        assert_same_detections(fixed[name], 0, steps[name])
    for name in PHOTOS:
        assert all(int(o[0]) == 0 for o in fixed[name]["overflow"].values()), name
    assert fixed["no-faces.jpg"]["valid"].sum() == 0
    assert fixed["multiface.jpg"]["valid"].sum() >= 6


def peer_faces(shared_data, min_score=0.9):
    """facenet-pytorch's confident faces on the reference photos (same original weights):
    name -> [(box_4, landmarks_5x2)]."""
    peer = json.loads((shared_data / "reference" / "peer_detections.json").read_text())["facenet_pytorch"]
    return {name: [(box[:4], np.array(points)) for box, points in zip(det["boxes"], det["landmarks"])
                   if box[4] >= min_score] for name, det in peer.items()}


def best_match(box_4, result):
    """Best IoU of a box with image 0's valid detections in a fixed-path result, and that detection's row."""
    iou = bx.iou_matrix(np.array([box_4]), result["boxes"][0][result["valid"][0]])[0]
    return iou.max(initial=0), int(np.argmax(iou)) if iou.size else -1


def test_matches_facenet_pytorch_on_photos(photo_results, shared_data):
    """Every face facenet-pytorch (same weights) reports with score >= 0.9 is found: IoU >= 0.7 and
    landmarks within 5 % of the box size."""
    fixed, _ = photo_results
    checked = 0
    for name, faces in peer_faces(shared_data).items():
        ours = fixed[name]
        for box, points in faces:
            iou, j = best_match(box, ours)
            assert iou >= 0.7, f"{name}: peer face {box} not found (best IoU {iou:.2f})"
            size = max(box[2] - box[0], box[3] - box[1])
            err = np.linalg.norm(ours["landmarks"][0][ours["valid"][0]][j] - points, axis=1).max()
            assert err <= 0.05 * size, f"{name}: landmark error {err:.1f} px > 5 % of {size:.0f}"
            checked += 1
    assert checked == 11  # 1 + 1 + 1 + 6 + 1 + 1 faces at score >= 0.9 on the seven photos


def test_mirrored_landmarks_keep_boxes_and_scores(params, photos, photo_results):
    """mirror_landmarks (the default) changes the landmarks only, and only a little: O-Net's boxes and
    scores are the same with it off (detect_face.m's landmarks exactly)."""
    fixed, _ = photo_results
    name = "multiface.jpg"
    plain = run_fixed(params, [photos[name]], (2048, 2048), CascadeConfig(mirror_landmarks=False))
    v = fixed[name]["valid"][0]
    np.testing.assert_array_equal(plain["valid"][0], v)
    np.testing.assert_array_equal(plain["boxes"][0][v], fixed[name]["boxes"][0][v])
    np.testing.assert_array_equal(plain["scores"][0][v], fixed[name]["scores"][0][v])
    moved = np.linalg.norm(plain["landmarks"][0][v] - fixed[name]["landmarks"][0][v], axis=-1)
    sides = (fixed[name]["boxes"][0][v][:, 2] - fixed[name]["boxes"][0][v][:, 0])[:, None]
    assert 0 < moved.max() and (moved <= 0.05 * sides).all()


def test_committed_trained_cascade_loads_and_finds_the_clear_faces(params, photos, shared_data, photo_results,
                                                                  compiles):
    """checkpoints/wider_subset (README: "The cascade trained here") has the original's param trees, runs in the
    bucket the original weights compiled (params are arguments: no recompile), and finds each of the 11 faces
    the peer reports at score >= 0.9 at IoU >= 0.5 (WIDER's match), with no capacity overflow."""
    trained = checkpoints.load_cascade(Path(__file__).resolve().parents[1] / "checkpoints" / "wider_subset")
    shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
    assert shapes(trained) == shapes(params)
    run_fixed(params, [photos["angelina_jolie.jpg"]], (2048, 2048))  # the original weights in the 2048 bucket
    count = compiles.count
    found = 0
    for name, faces in peer_faces(shared_data).items():
        ours = run_fixed(trained, [photos[name]], (2048, 2048))
        assert all(int(o[0]) == 0 for o in ours["overflow"].values()), name
        for box, _ in faces:
            iou, _ = best_match(box, ours)
            assert iou >= 0.5, f"{name}: face {box} not found (best IoU {iou:.2f})"
            found += 1
    assert found == 11
    assert compiles.count == count


def test_random_images_mixed_sizes_in_one_batch(params):
    """Random images of different sizes in one padded batch: each equals the readable path on its own."""
    rng = np.random.default_rng(0)

    def blocky(h, w):  # 6x6-pixel random blocks: noise with edges P-Net and R-Net respond to
        small = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
        return np.repeat(np.repeat(small, 6, 0), 6, 1)[:h, :w]

    images = [blocky(150, 131), blocky(97, 160), rng.integers(0, 256, (12, 40, 3), dtype=np.uint8)]
    config = CascadeConfig(thresholds=(0.2, 0.1, 0.05))  # let noise through every stage
    fixed = run_fixed(params, images, (192, 192), config)
    reached = np.zeros(3, int)
    for i, im in enumerate(images):
        steps = cascade_steps.detect_steps(params, im, config)
        assert_same_detections(fixed, i, steps)
        reached += [len(steps[s]["scores"]) for s in ("pnet", "rnet", "onet")]
    assert (reached > 0).all()  # every stage had candidates: the comparison is not between empty results


def test_no_recompile_for_a_seen_bucket(params, compiles):
    rng = np.random.default_rng(1)
    before = compiles.count
    run_fixed(params, [rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)], (64, 64))
    after_first = compiles.count
    run_fixed(params, [rng.integers(0, 256, (64, 33, 3), dtype=np.uint8)], (64, 64))
    run_fixed(params, [rng.integers(0, 256, (20, 64, 3), dtype=np.uint8)], (64, 64))
    # its stage programs, fewer when an earlier test compiled this bucket or one sharing programs with it
    assert after_first <= before + len(compiled.stage_chain((64, 64), CascadeConfig(), "onet"))
    assert compiles.count == after_first


def test_overflow_is_counted_not_hidden(params, photos):
    im = photos["multiface.jpg"]
    small = CascadeConfig(window_capacity=256, pnet_capacity=32, rnet_capacity=32, max_faces=4)
    out = run_fixed(params, [im], buckets.bucket_shape(*im.shape[:2]), small)
    steps = cascade_steps.detect_steps(params, im)
    above = sum(level["n_above_threshold"] for level in steps["pnet_levels"])
    assert int(out["overflow"]["window"][0]) == above - 256
    assert int(out["overflow"]["pnet"][0]) > 0 and int(out["overflow"]["faces"][0]) >= 2
    assert out["valid"][0].sum() == 4


def test_bad_bucket_inputs_are_refused(params):
    with pytest.raises(ValueError, match="fit the bucket"):
        compiled.detect_bucket(params, np.zeros((1, 64, 64, 3), np.uint8), np.array([[80, 64]]))
    with pytest.raises(ValueError, match=">= 12"):
        compiled.detect_bucket(params, np.zeros((1, 64, 64, 3), np.uint8), np.array([[11, 64]]))


def test_pyramid_plan_matches_detect_face_m():
    # 561 x 561, minsize 20: m = 0.6, levels while 561 * 0.6 * 0.709^k >= 12 -> k = 0..9
    scales = pyramid.pyramid_scales(561, 561, 20, 0.709)
    assert len(scales) == 10 and scales[0] == pytest.approx(0.6) and scales[-1] == pytest.approx(0.6 * 0.709**9)
    assert pyramid.level_sizes(561, 561, scales)[:2].tolist() == [[337, 337], [239, 239]]  # ceil(336.6), ceil(238.65)
    assert pyramid.pnet_map_size(np.array([12, 13, 14, 337])).tolist() == [1, 2, 2, 164]


def test_resample_taps_area_and_bilinear():
    # Shrinking 4 -> 2: each output averages two source pixels.
    idx, w = pyramid.resample_taps(0.0, 4.0, 2.0, 2, 3)
    np.testing.assert_allclose((w[:, :, None] * (idx[:, :, None] == np.arange(4))).sum(1), [[.5, .5, 0, 0], [0, 0, .5, .5]])
    # Shrinking 3 -> 2: footprints of 1.5 pixels, weights 2/3 and 1/3.
    idx, w = pyramid.resample_taps(0.0, 3.0, 2.0, 2, 3)
    np.testing.assert_allclose((w[:, :, None] * (idx[:, :, None] == np.arange(3))).sum(1), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], atol=1e-6)
    # Enlarging 2 -> 4: half-pixel centres at -0.25, 0.25, 0.75, 1.25, clamped to the interval.
    idx, w = pyramid.resample_taps(0.0, 2.0, 4.0, 4, 3)
    np.testing.assert_allclose((w[:, :, None] * (idx[:, :, None] == np.arange(2))).sum(1), [[1, 0], [.75, .25], [.25, .75], [0, 1]])
    # Past out_len nothing is sampled.
    _, w = pyramid.resample_taps(0.0, 4.0, 2.0, 3, 3)
    assert w[2].sum() == 0
