"""Per-stage training samples: labels by IoU, targets, flips, mixing, provenance, determinism, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtcnn_jax import datasets
from mtcnn_jax import boxes as bx
from mtcnn_jax import samples

FIXTURES = Path(__file__).parent / "fixtures"
POINTS_5x2 = np.array([[30, 40], [60, 42], [45, 55], [33, 70], [58, 71]], np.float64)


def test_targets_are_normalised_by_the_crop():
    crops = np.array([[10, 20, 110, 120]], np.float64)
    np.testing.assert_allclose(samples.box_targets(crops, np.array([[20, 30, 100, 140]])), [[0.1, 0.1, -0.1, 0.2]])
    lmk = samples.landmark_targets(crops, (POINTS_5x2 + [10, 20])[None])
    np.testing.assert_allclose(lmk[0, :5], POINTS_5x2[:, 0] / 100, rtol=1e-6)
    np.testing.assert_allclose(lmk[0, 5:], POINTS_5x2[:, 1] / 100, rtol=1e-6)


def test_flip_mirrors_targets_and_swaps_left_right():
    crop = np.array([[0, 0, 100, 100]], np.float64)
    gt = np.array([[10, 20, 70, 90]], np.float64)
    box, lmk = samples.flip_targets(samples.box_targets(crop, gt), samples.landmark_targets(crop, POINTS_5x2[None]))
    mirrored_gt = np.array([[100 - 70, 20, 100 - 10, 90]])
    mirrored_pts = np.stack([100 - POINTS_5x2[:, 0], POINTS_5x2[:, 1]], 1)[[1, 0, 2, 4, 3]]
    np.testing.assert_allclose(box, samples.box_targets(crop, mirrored_gt), atol=1e-6)
    np.testing.assert_allclose(lmk, samples.landmark_targets(crop, mirrored_pts[None]), atol=1e-6)
    twice = samples.flip_targets(box, lmk)
    np.testing.assert_allclose(twice[1], samples.landmark_targets(crop, POINTS_5x2[None]), atol=1e-6)


def test_labels_follow_iou_thresholds():
    cfg = samples.SampleConfig()
    np.testing.assert_array_equal(samples.iou_labels(np.array([0.1, 0.35, 0.5, 0.65, 0.7]), cfg),
                                  [0, samples.UNUSED, -1, -1, 1])


def test_square_faces_label_by_iou_with_the_squared_face():
    """A 10x20 face (1-based 16..25 x 11..30: pixels 15-24 x 10-29) and the 20x20 crop of pixels 10-29 square
    around it: IoU 0.5 (a part face), or 1 with its square (a positive); the box targets stay those of the
    real face either way, (0.25, 0, -0.25, 0) of the crop's side."""
    face, crop = np.array([[16.0, 11.0, 25.0, 30.0]]), np.array([[10.0, 10.0, 30.0, 30.0]])
    for square, label in ((False, -1), (True, 1)):
        table = samples.label_crops(crop, face, samples.SampleConfig(square_faces=square))
        assert table["label"].tolist() == [label]
        np.testing.assert_allclose(table["box"], [[0.25, 0.0, -0.25, 0.0]])
    assert samples.build_parser().parse_args(["onet", "--wider", "w", "--out", "o", "--square-faces"]).square_faces


def test_targets_of_a_detection_crop_regress_back_to_the_face():
    """The cascade decodes R-/O-Net targets with bx.regress(box, targets, plus_one=True) on its 1-based boxes, and
    WIDER's ground truth is compared with its output as it is: so the targets of a detection's crop must give
    back the face box exactly, and a detection equal to the face zero targets (not x1, y1 one pixel off)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        x1, y1 = rng.integers(1, 200, 2).astype(np.float64)
        side = float(rng.integers(12, 100))
        face_1x4 = np.array([[x1 + rng.integers(-3, 4), y1 + rng.integers(-3, 4), x1 + side - 1 + rng.integers(-3, 4),
                              y1 + side - 1 + rng.integers(-3, 4)]])
        det_1x4 = np.array([[x1, y1, x1 + side - 1, y1 + side - 1]])  # a square 1-based box, `side` pixels across
        table = samples.label_crops(samples.detection_crops(det_1x4), face_1x4, samples.SampleConfig(square_faces=True))
        if table["label"][0] == samples.LABEL["negative"]:
            continue
        np.testing.assert_allclose(bx.regress(det_1x4, table["box"], plus_one=True), face_1x4, atol=1e-4)
    box = np.array([[31.0, 41.0, 70.0, 80.0]])
    table = samples.label_crops(samples.detection_crops(box), box, samples.SampleConfig())
    assert table["label"].tolist() == [samples.LABEL["positive"]]
    np.testing.assert_allclose(table["box"], 0, atol=1e-7)


def test_mix_subsamples_larger_types_to_the_ratio():
    kept = samples.mix_counts({"negative": 1000, "positive": 50, "part": 400, "landmark": 300}, (3, 1, 1, 2))
    assert kept == {"negative": 150, "positive": 50, "part": 50, "landmark": 100}
    assert samples.mix_counts({"negative": 9, "positive": 5, "part": 5, "landmark": 0}, (3, 1, 1, 2))["negative"] == 9


@pytest.fixture(scope="module")
def pnet_set(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pnet")
    summary = samples.make_samples(shared_data / "wider_face", shared_data / "lfw_net", out,
                                   samples.SampleConfig(seed=3), max_images=20, max_landmarks=60, workers=2)
    return out, summary, samples.load(out)


def _face_spans(shared_data: Path) -> dict[str, np.ndarray]:
    """Each training image's faces as the pixel spans its crops are labelled against."""
    image_dir, entries = datasets.wider_split(shared_data / "wider_face", "train")
    return {str((image_dir / e["path"]).resolve()): samples.pixel_spans(e["boxes"]) for e in entries}


def test_pnet_labels_agree_with_recomputed_iou(pnet_set, shared_data):
    _, summary, s = pnet_set
    gt = _face_spans(shared_data)
    cfg, labels = samples.SampleConfig(), []
    for i in range(len(s)):
        r = s[i]
        labels.append(r["label"])
        assert r["image"].shape == (12, 12, 3) and r["image"].dtype == np.uint8
        if r["label"] == samples.LABEL["landmark"]:
            assert ((r["landmarks"] >= 0) & (r["landmarks"] <= 1)).all()
            continue
        iou = bx.iou_matrix(r["crop"][None].astype(np.float64), gt[r["source"]]).max()
        assert samples.iou_labels(np.array([iou]), cfg)[0] == r["label"], (i, iou, r["label"])
    counts = {t: labels.count(samples.LABEL[t]) for t in samples.TYPES}
    assert counts == summary["kept"] and len(s) == summary["total"]
    assert counts["negative"] >= 2.9 * counts["positive"] and min(counts.values()) > 0


def test_summary_is_written_beside_the_dataset(pnet_set):
    out, summary, _ = pnet_set
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["images"] == 20 and summary["landmark_faces"] == 60 and not (out / ".work").exists()
    for t in samples.TYPES:
        assert summary["generated"][t] == summary["kept"][t] + summary["dropped_by_ratio"][t]


def test_flipped_sample_is_the_mirrored_crop_of_its_source(pnet_set):
    from mtcnn_jax.detect import load_image

    _, _, s = pnet_set
    flipped = [s[i] for i in range(len(s)) if s[i]["flipped"]][:3]
    assert flipped
    for r in flipped:
        again = samples.cut(load_image(r["source"]), r["crop"][None], 12)[0][:, ::-1]
        np.testing.assert_array_equal(again, r["image"])


def test_same_seed_same_samples_whatever_the_workers(shared_data, tmp_path):
    sets = []
    for workers in (1, 2):
        out = tmp_path / str(workers)
        samples.make_samples(shared_data / "wider_face", shared_data / "lfw_net", out, max_images=3,
                             max_landmarks=8, workers=workers)
        s = samples.load(out)
        sets.append([s[i] for i in range(len(s))])
    assert len(sets[0]) == len(sets[1]) > 0
    for a, b in zip(*sets):
        assert a["source"] == b["source"] and a["label"] == b["label"]
        np.testing.assert_array_equal(a["crop"], b["crop"])
        np.testing.assert_array_equal(a["image"], b["image"])


def _bad_wider(root: Path) -> Path:
    from PIL import Image

    (root / "WIDER_train/images/e").mkdir(parents=True)
    (root / "wider_face_split").mkdir()
    Image.new("RGB", (200, 160), (90, 90, 90)).save(root / "WIDER_train/images/e/ok.jpg")
    (root / "WIDER_train/images/e/broken.jpg").write_bytes(b"not a jpeg")
    gt = ("e/ok.jpg\n3\n40 30 60 70 0 0 0 0 0 0\n10 10 0 5 0 0 0 0 0 0\n500 500 9 9 0 0 0 0 0 0\n"
          "e/broken.jpg\n0\n0 0 0 0 0 0 0 0 0 0\ne/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    (root / "wider_face_split/wider_face_train_bbx_gt.txt").write_text(gt)
    return root


def test_bad_input_is_skipped_and_reported(tmp_path):
    wider = _bad_wider(tmp_path / "wider")
    lfw = tmp_path / "lfw"
    lfw.mkdir()
    (lfw / "trainImageList.txt").write_text("missing.jpg 0 50 0 50 1 1 2 2 3 3 4 4 5 5\n"
                                            "../wider/WIDER_train/images/e/ok.jpg 40 100 30 100 "
                                            "50 50 80 50 65 65 55 80 300 300\n")
    summary = samples.make_samples(wider, lfw, tmp_path / "out", workers=1)
    skipped = {k: v["count"] for k, v in summary["skipped"].items()}
    assert skipped == {"faces with a zero-size box": 1, "faces outside their image": 1, "unreadable images": 1,
                       "missing images": 2, "landmarks outside their box": 1}
    assert summary["skipped"]["unreadable images"]["first"][0].endswith("broken.jpg")
    assert summary["total"] > 0


def test_empty_result_is_an_error_with_exit_code_2(tmp_path):
    root = tmp_path / "wider"
    (root / "wider_face_split").mkdir(parents=True)
    (root / "wider_face_split/wider_face_train_bbx_gt.txt").write_text("e/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    with pytest.raises(samples.SamplesError, match="missing images"):
        samples.make_samples(root, None, tmp_path / "a", workers=1)
    assert samples.main(["pnet", "--wider", str(root), "--out", str(tmp_path / "b"), "--workers", "1"]) == 2


def test_celeba_landmarks_feed_the_samples(shared_data, tmp_path):
    summary = samples.make_samples(shared_data / "wider_face", FIXTURES / "celeba", tmp_path, max_images=1,
                                   workers=1)
    assert summary["landmark_faces"] == 4 and summary["generated"]["landmark"] >= 4


def test_rnet_hard_examples_label_by_iou(shared_data, tmp_path):
    summary = samples.make_samples(shared_data / "wider_face", shared_data / "lfw_net", tmp_path,
                                   samples.SampleConfig(stage="rnet"), max_images=5, max_landmarks=20, workers=1)
    s, gt = samples.load(tmp_path), _face_spans(shared_data)
    assert len(s) == summary["total"] > 0 and s[0]["image"].shape == (24, 24, 3)
    for i in range(len(s)):
        r = s[i]
        if r["label"] != samples.LABEL["landmark"]:
            iou = bx.iou_matrix(r["crop"][None].astype(np.float64), gt[r["source"]]).max()
            assert samples.iou_labels(np.array([iou]), samples.SampleConfig())[0] == r["label"]


def test_hard_face_jitters_add_labelled_crops_around_each_face():
    gt = np.array([[100, 100, 160, 170], [10, 10, 18, 18]], np.float64)  # the second is under min_face
    dets = np.array([[101, 101, 160, 170]], np.float64)  # 1-based inclusive, as the cascade gives
    plain = samples.hard_specs((400, 400), gt, dets, np.random.default_rng(0), samples.SampleConfig(stage="rnet"))
    assert len(plain["label"]) == 1 and plain["label"][0] == samples.LABEL["positive"]
    cfg = samples.SampleConfig(stage="rnet", hard_face_jitters=30, flip_prob=0.0)
    table = samples.hard_specs((400, 400), gt, dets, np.random.default_rng(0), cfg)
    assert len(table["label"]) > 1 and set(table["label"]) >= {samples.LABEL["positive"], samples.LABEL["part"]}
    spans = samples.pixel_spans(gt)
    iou = bx.iou_matrix(table["crop"].astype(np.float64), spans).max(axis=1)
    np.testing.assert_array_equal(samples.iou_labels(iou, cfg), table["label"])
    assert (samples.sides(table["crop"]) >= 0.8 * 60 - 1).all()  # none around the 8-pixel face
    best_gt = spans[np.argmax(bx.iou_matrix(table["crop"].astype(np.float64), spans), axis=1)]
    face = table["label"] != samples.LABEL["negative"]  # negatives carry zero box targets
    np.testing.assert_allclose(table["box"][face], samples.box_targets(table["crop"], best_gt)[face], atol=1e-6)


def test_sets_over_the_shuffle_buffer_are_written_without_tensorflow(shared_data, tmp_path, monkeypatch):
    """TFDS spills a shuffle buffer over 1 GB to files through TensorFlow (not installed): a larger set must
    still be written. The buffer is shrunk here so that a small set crosses it."""
    from tensorflow_datasets.core import shuffle

    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1_000)
    summary = samples.make_samples(shared_data / "wider_face", None, tmp_path, samples.SampleConfig(seed=1),
                                   max_images=2, workers=1)
    assert len(samples.load(tmp_path)) == summary["total"] > 1_000 // (3 * 12 * 12)
    assert shuffle.MAX_MEM_BUFFER_SIZE == 1_000
