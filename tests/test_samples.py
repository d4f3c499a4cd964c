"""Per-stage training samples: labels by IoU, targets, flips, mixing, provenance, determinism, bad input,
the TFDS source datasets they are read from and the sample sets they are written to, light workers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.core import hashing  # TFDS's key hash: only to check the record order's claim

from mtcnn_jax import boxes as bx
from mtcnn_jax import datasets, sample_worker, samples
from mtcnn_jax import sample_geometry as geo
from mtcnn_jax.datasets import load_samples, sample_sets
from mtcnn_jax.images import load_image
from mtcnn_jax.stages import LABEL, SAMPLE_TYPES

FIXTURES = Path(__file__).parent / "fixtures"
POINTS_5x2 = np.array([[30, 40], [60, 42], [45, 55], [33, 70], [58, 71]], np.float64)


def test_targets_are_normalised_by_the_crop():
    crops = np.array([[10, 20, 110, 120]], np.float64)
    np.testing.assert_allclose(geo.box_targets(crops, np.array([[20, 30, 100, 140]])), [[0.1, 0.1, -0.1, 0.2]])
    lmk = geo.landmark_targets(crops, (POINTS_5x2 + [10, 20])[None])
    np.testing.assert_allclose(lmk[0, :5], POINTS_5x2[:, 0] / 100, rtol=1e-6)
    np.testing.assert_allclose(lmk[0, 5:], POINTS_5x2[:, 1] / 100, rtol=1e-6)


def test_flip_mirrors_targets_and_swaps_left_right():
    crop = np.array([[0, 0, 100, 100]], np.float64)
    gt = np.array([[10, 20, 70, 90]], np.float64)
    box, lmk = geo.flip_targets(geo.box_targets(crop, gt), geo.landmark_targets(crop, POINTS_5x2[None]))
    mirrored_gt = np.array([[100 - 70, 20, 100 - 10, 90]])
    mirrored_pts = np.stack([100 - POINTS_5x2[:, 0], POINTS_5x2[:, 1]], 1)[[1, 0, 2, 4, 3]]
    np.testing.assert_allclose(box, geo.box_targets(crop, mirrored_gt), atol=1e-6)
    np.testing.assert_allclose(lmk, geo.landmark_targets(crop, mirrored_pts[None]), atol=1e-6)
    twice = geo.flip_targets(box, lmk)
    np.testing.assert_allclose(twice[1], geo.landmark_targets(crop, POINTS_5x2[None]), atol=1e-6)


def test_labels_follow_iou_thresholds():
    cfg = geo.SampleConfig()
    np.testing.assert_array_equal(geo.iou_labels(np.array([0.1, 0.35, 0.5, 0.65, 0.7]), cfg),
                                  [0, geo.UNUSED, -1, -1, 1])


def _pixel_mask(span_4, size: int = 40) -> np.ndarray:
    """The pixels of an integer span x1, y1 .. x2, y2 (end exclusive) on a size x size grid offset by -size/2."""
    x1, y1, x2, y2 = (int(v) + size // 2 for v in span_4)
    mask = np.zeros((size, size), bool)
    mask[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
    return mask


def test_span_iou_counts_pixels():
    """span_iou against pixels counted on a grid: no +1 anywhere; disjoint, touching and empty spans give 0."""
    rng = np.random.default_rng(0)
    corners = [rng.integers(-15, 8, (n, 2)) for n in (40, 30)]
    a_Nx4, b_Mx4 = (np.concatenate([xy, xy + rng.integers(0, 12, xy.shape)], axis=1) for xy in corners)  # some empty
    counted = np.zeros((len(a_Nx4), len(b_Mx4)))
    for i, a in enumerate(a_Nx4):
        for j, b in enumerate(b_Mx4):
            ma, mb = _pixel_mask(a), _pixel_mask(b)
            counted[i, j] = (ma & mb).sum() / max((ma | mb).sum(), 1)
    np.testing.assert_allclose(geo.span_iou(a_Nx4, b_Mx4), counted, rtol=1e-12)
    np.testing.assert_array_equal(geo.span_areas(a_Nx4), [_pixel_mask(a).sum() for a in a_Nx4])
    touching = geo.span_iou([[0, 0, 10, 10]], [[10, 0, 20, 10], [0, 0, 0, 0]])
    np.testing.assert_array_equal(touching, [[0, 0]])
    assert geo.span_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)


# Crops (pixel spans) at the band edges, with their pixel counts (intersection, union) worked out by hand, the
# label these give, and the label the old +1 IoU on the same spans gave. Faces are 1-based boxes: (1, 1, 20, 20)
# is the span 0..20 x 0..20 (400 pixels), (1, 1, 16, 17) the span 0..16 x 0..17 (272 pixels).
FACE_20, FACE_16x17 = (1, 1, 20, 20), (1, 1, 16, 17)
BAND_EDGES = [  # face, crop span, intersection, union, label, the +1 IoU's label
    (FACE_20, (-9, -9, 15, 15), 15 * 15, 400 + 24 * 24 - 225, "negative", "unused"),  # 0.2996 (+1: 0.316)
    (FACE_20, (-10, -5, 12, 17), 12 * 17, 400 + 22 * 22 - 204, "unused", "unused"),  # 0.3 exactly
    (FACE_20, (-8, -3, 11, 16), 11 * 16, 400 + 19 * 19 - 176, "unused", "unused"),  # 0.3009
    (FACE_20, (-1, 0, 12, 13), 12 * 13, 400 + 13 * 13 - 156, "unused", "part"),  # 0.3777 (+1: 0.4 exactly)
    (FACE_20, (-9, -1, 12, 20), 12 * 20, 400 + 21 * 21 - 240, "unused", "part"),  # 0.3993 (+1: 0.419)
    (FACE_16x17, (-8, -4, 12, 16), 12 * 16, 272 + 20 * 20 - 192, "part", "part"),  # 0.4 exactly
    (FACE_20, (-10, -8, 17, 19), 17 * 19, 400 + 27 * 27 - 323, "part", "part"),  # 0.4007
    (FACE_20, (0, 0, 16, 16), 16 * 16, 400 + 16 * 16 - 256, "part", "positive"),  # 0.64 (+1: 0.655)
    (FACE_16x17, (0, -3, 16, 13), 16 * 13, 272 + 16 * 16 - 208, "part", "positive"),  # 0.65 exactly (+1: 0.667)
    (FACE_20, (-1, 0, 16, 17), 16 * 17, 400 + 17 * 17 - 272, "positive", "positive"),  # 0.6523
]


@pytest.mark.parametrize("face, crop, inter, union, label, plus_one_label", BAND_EDGES)
def test_labels_at_the_band_edges_use_span_areas(face, crop, inter, union, label, plus_one_label):
    """Crops just below, at and just above 0.3 / 0.4 / 0.65 get the label of their exact pixel IoU (an unused
    one is not written); where the +1 areas of the cascade's IoU would move the crop into the next band, the
    label is the span one."""
    cfg, crop_1x4, face_1x4 = geo.SampleConfig(), np.array([crop], np.float64), np.array([face], np.float64)
    iou = geo.span_iou(crop_1x4, geo.pixel_spans(face_1x4))[0, 0]
    assert iou == inter / union
    name = {v: k for k, v in LABEL.items()} | {geo.UNUSED: "unused"}
    assert name[geo.iou_labels(np.array([iou]), cfg)[0]] == label
    table = geo.label_crops(crop_1x4, face_1x4, cfg)
    assert [name[v] for v in table["label"]] == ([] if label == "unused" else [label])
    plus_one = bx.iou_matrix(crop_1x4, geo.pixel_spans(face_1x4))[0, 0]  # the old labels, for the record
    assert name[geo.iou_labels(np.array([plus_one]), cfg)[0]] == plus_one_label


def test_landmark_crops_are_kept_by_span_iou():
    """A landmark face's own square crop is kept when its span IoU with the box is > 0.65: a 16x25 box in its
    25x25 square is 400 / 625 = 0.64 (dropped; the +1 IoU said 0.654), a 17x25 box 0.68 (kept)."""
    points_5x2 = np.array([[4, 6], [12, 6], [8, 12], [5, 18], [11, 18]], np.float64)
    cfg = geo.SampleConfig(landmark_jitters=0, flip_prob=0.0)
    for width, kept in ((16, 0), (17, 1)):
        box_4 = np.array([0.0, 0.0, width, 25.0])
        table = geo.landmark_specs((100, 100), box_4, points_5x2, np.random.default_rng(0), cfg)
        assert len(table["label"]) == kept
    np.testing.assert_allclose(geo.span_iou([[0, 0, 25, 25]], [[0, 0, 16, 25]]), [[0.64]])


def test_landmark_frame_moves_the_box_before_the_crops_are_cut():
    """--landmark-frame 1.1,1.4,-0.1 on a 20x20 box at (10, 20): 22 wide, 28 tall, centre (20, 28), i.e.
    (9, 14, 31, 42); its own crop is the 28-pixel square at (9, 14), the points' targets relative to it."""
    np.testing.assert_allclose(geo.framed_box(np.array([10.0, 20, 30, 40]), (1.1, 1.4, -0.1)), [9, 14, 31, 42])
    np.testing.assert_allclose(geo.framed_box(np.array([10.0, 20, 30, 40]), (1, 1, 0)), [10, 20, 30, 40])
    points_5x2 = np.array([[15, 25], [25, 25], [20, 30], [16, 35], [24, 35]], np.float64)
    cfg = geo.SampleConfig(landmark_jitters=0, flip_prob=0.0, landmark_frame=(1.1, 1.4, -0.1))
    table = geo.landmark_specs((100, 100), np.array([10.0, 20, 30, 40]), points_5x2, np.random.default_rng(0), cfg)
    np.testing.assert_allclose(table["crop"], [[9, 14, 37, 42]])
    want = np.concatenate([(points_5x2[:, 0] - 9) / 28, (points_5x2[:, 1] - 14) / 28])
    np.testing.assert_allclose(table["landmarks"][0], want, rtol=1e-6)
    args = samples.build_parser().parse_args(["onet", "--wider", "w", "--out", "o", "--landmark-frame", "1.1,1.4,-0.1"])
    assert args.landmark_frame == (1.1, 1.4, -0.1)
    with pytest.raises(ValueError, match="landmark-frame"):
        geo.SampleConfig(landmark_frame=(0.0, 1.4, 0.0))


def test_square_faces_label_by_iou_with_the_squared_face():
    """A 10x20 face (1-based 16..25 x 11..30: pixels 15-24 x 10-29) and the 20x20 crop of pixels 10-29 square
    around it: IoU 0.5 (a part face), or 1 with its square (a positive); the box targets stay those of the
    real face either way, (0.25, 0, -0.25, 0) of the crop's side."""
    face, crop = np.array([[16.0, 11.0, 25.0, 30.0]]), np.array([[10.0, 10.0, 30.0, 30.0]])
    for square, label in ((False, -1), (True, 1)):
        table = geo.label_crops(crop, face, geo.SampleConfig(square_faces=square))
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
        table = geo.label_crops(geo.detection_crops(det_1x4), face_1x4, geo.SampleConfig(square_faces=True))
        if table["label"][0] == LABEL["negative"]:
            continue
        np.testing.assert_allclose(bx.regress(det_1x4, table["box"], plus_one=True), face_1x4, atol=1e-4)
    box = np.array([[31.0, 41.0, 70.0, 80.0]])
    table = geo.label_crops(geo.detection_crops(box), box, geo.SampleConfig())
    assert table["label"].tolist() == [LABEL["positive"]]
    np.testing.assert_allclose(table["box"], 0, atol=1e-7)


def test_mix_subsamples_larger_types_to_the_ratio():
    kept = samples.mix_counts({"negative": 1000, "positive": 50, "part": 400, "landmark": 300}, (3, 1, 1, 2))
    assert kept == {"negative": 150, "positive": 50, "part": 50, "landmark": 100}
    assert samples.mix_counts({"negative": 9, "positive": 5, "part": 5, "landmark": 0}, (3, 1, 1, 2))["negative"] == 9


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    """The TFDS data_dir root the module's source datasets are built into once (not the user cache)."""
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def pnet_set(shared_data, tfds_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pnet")
    summary = samples.make_samples(shared_data / "wider_face", shared_data / "lfw_net", out,
                                   geo.SampleConfig(seed=3), max_images=20, max_landmarks=60, workers=2,
                                   tfds_dir=tfds_dir)
    return out, summary, load_samples(out)


def _face_spans(shared_data: Path) -> dict[str, np.ndarray]:
    """Each training image's faces as the pixel spans its crops are labelled against."""
    image_dir, entries = datasets.wider_split(shared_data / "wider_face", "train")
    return {str((image_dir / e["path"]).resolve()): geo.pixel_spans(e["boxes"]) for e in entries}


def test_pnet_labels_agree_with_recomputed_iou(pnet_set, shared_data):
    _, summary, s = pnet_set
    gt = _face_spans(shared_data)
    cfg, labels = geo.SampleConfig(), []
    for i in range(len(s)):
        r = s[i]
        labels.append(r["label"])
        assert r["image"].shape == (12, 12, 3) and r["image"].dtype == np.uint8
        if r["label"] == LABEL["landmark"]:
            assert ((r["landmarks"] >= 0) & (r["landmarks"] <= 1)).all()
            continue
        iou = geo.span_iou(r["crop"][None], gt[r["source"]]).max()
        assert geo.iou_labels(np.array([iou]), cfg)[0] == r["label"], (i, iou, r["label"])
    counts = {t: labels.count(LABEL[t]) for t in SAMPLE_TYPES}
    assert counts == summary["kept"] and len(s) == summary["total"]
    assert counts["negative"] >= 2.9 * counts["positive"] and min(counts.values()) > 0


def test_summary_is_written_beside_the_dataset(pnet_set):
    out, summary, _ = pnet_set
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["images"] == 20 and summary["landmark_faces"] == 60 and not (out / ".work").exists()
    for t in SAMPLE_TYPES:
        assert summary["generated"][t] == summary["kept"][t] + summary["dropped_by_ratio"][t]


def test_flipped_sample_is_the_mirrored_crop_of_its_source(pnet_set):
    _, _, s = pnet_set
    flipped = [s[i] for i in range(len(s)) if s[i]["flipped"]][:3]
    assert flipped
    for r in flipped:
        again = sample_worker.cut(load_image(r["source"]), r["crop"][None], 12)[0][:, ::-1]
        np.testing.assert_array_equal(again, r["image"])


def test_same_seed_same_samples_whatever_the_workers(shared_data, tfds_dir, tmp_path):
    sets = []
    for workers in (1, 2):
        out = tmp_path / str(workers)
        samples.make_samples(shared_data / "wider_face", shared_data / "lfw_net", out, max_images=3,
                             max_landmarks=8, workers=workers, tfds_dir=tfds_dir)
        s = load_samples(out)
        sets.append([s[i] for i in range(len(s))])
    assert len(sets[0]) == len(sets[1]) > 0
    for a, b in zip(*sets):
        assert a["source"] == b["source"] and a["label"] == b["label"]
        np.testing.assert_array_equal(a["crop"], b["crop"])
        np.testing.assert_array_equal(a["image"], b["image"])


def _bad_wider(root: Path) -> Path:
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
    with pytest.warns(UserWarning, match="skipped train"):  # the source builders say so too
        summary = samples.make_samples(wider, lfw, tmp_path / "out", workers=1, tfds_dir=tmp_path / "tfds")
    skipped = {k: v["count"] for k, v in summary["skipped"].items()}
    assert skipped == {"faces with a zero-size box": 1, "faces outside their image": 1, "unreadable images": 1,
                       "missing images": 2, "landmarks outside their box": 1}
    assert summary["skipped"]["unreadable images"]["first"][0].endswith("broken.jpg")
    assert summary["total"] > 0


def test_empty_result_is_an_error_with_exit_code_2(tmp_path):
    root = tmp_path / "wider"
    (root / "wider_face_split").mkdir(parents=True)
    (root / "wider_face_split/wider_face_train_bbx_gt.txt").write_text("e/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    with pytest.raises(samples.SamplesError, match="missing images"), pytest.warns(UserWarning, match="missing"):
        samples.make_samples(root, None, tmp_path / "a", workers=1, tfds_dir=tmp_path / "tfds")
    with pytest.warns(UserWarning, match="missing"):
        assert samples.main(["pnet", "--wider", str(root), "--out", str(tmp_path / "b"), "--workers", "1",
                             "--tfds-dir", str(tmp_path / "tfds")]) == 2


def test_celeba_landmarks_feed_the_samples(shared_data, tfds_dir, tmp_path):
    summary = samples.make_samples(shared_data / "wider_face", FIXTURES / "celeba", tmp_path, max_images=1,
                                   workers=1, tfds_dir=tfds_dir)
    assert summary["landmark_faces"] == 4 and summary["generated"]["landmark"] >= 4


def test_rnet_hard_examples_label_by_iou(shared_data, tfds_dir, tmp_path):
    summary = samples.make_samples(shared_data / "wider_face", shared_data / "lfw_net", tmp_path,
                                   geo.SampleConfig(stage="rnet"), max_images=5, max_landmarks=20, workers=1,
                                   tfds_dir=tfds_dir)
    s, gt = load_samples(tmp_path), _face_spans(shared_data)
    assert len(s) == summary["total"] > 0 and s[0]["image"].shape == (24, 24, 3)
    for i in range(len(s)):
        r = s[i]
        if r["label"] != LABEL["landmark"]:
            iou = geo.span_iou(r["crop"][None], gt[r["source"]]).max()
            assert geo.iou_labels(np.array([iou]), geo.SampleConfig())[0] == r["label"]


def test_hard_face_jitters_add_labelled_crops_around_each_face():
    gt = np.array([[100, 100, 160, 170], [10, 10, 18, 18]], np.float64)  # the second is under min_face
    dets = np.array([[101, 101, 160, 170]], np.float64)  # 1-based inclusive, as the cascade gives
    plain = geo.hard_specs((400, 400), gt, dets, np.random.default_rng(0), geo.SampleConfig(stage="rnet"))
    assert len(plain["label"]) == 1 and plain["label"][0] == LABEL["positive"]
    cfg = geo.SampleConfig(stage="rnet", hard_face_jitters=30, flip_prob=0.0)
    table = geo.hard_specs((400, 400), gt, dets, np.random.default_rng(0), cfg)
    assert len(table["label"]) > 1 and set(table["label"]) >= {LABEL["positive"], LABEL["part"]}
    spans = geo.pixel_spans(gt)
    iou = geo.span_iou(table["crop"], spans).max(axis=1)
    np.testing.assert_array_equal(geo.iou_labels(iou, cfg), table["label"])
    assert (geo.sides(table["crop"]) >= 0.8 * 60 - 1).all()  # none around the 8-pixel face
    best_gt = spans[np.argmax(geo.span_iou(table["crop"], spans), axis=1)]
    face = table["label"] != LABEL["negative"]  # negatives carry zero box targets
    np.testing.assert_allclose(table["box"][face], geo.box_targets(table["crop"], best_gt)[face], atol=1e-6)




def test_source_datasets_are_built_once_per_folder_in_list_order(pnet_set, shared_data, tfds_dir):
    """make_samples reads WIDER FACE through its TFDS dataset, built under tfds_dir in a folder of its own
    (keyed by the source folder) with every training image, in the order of the ground-truth list."""
    wider = shared_data / "wider_face"
    data_dir = samples.source_data_dir(tfds_dir, wider)
    assert data_dir != samples.source_data_dir(tfds_dir, shared_data / "lfw_net")
    assert (data_dir / "mtcnn_wider_face").is_dir()
    builder = samples.source_dataset(datasets.WiderFace, wider, tfds_dir)  # reused, not rebuilt
    train = datasets.data_source(builder, "train", decode_images=False)
    _, entries = datasets.wider_split(wider, "train")
    assert len(train) == len(entries)
    assert [r["image/filename"].decode() for r in train.__getitems__(range(20))] == [e["path"] for e in entries[:20]]
    assert isinstance(train[0]["image"], bytes)


def _random_parts(n: int, per_image: int, rng: np.random.Generator) -> tuple[list[str], dict, np.ndarray, list[dict]]:
    keys = [f"wider{i // per_image:08d}_{i % per_image:05d}" for i in range(n)]
    table = {"label": rng.choice([0, 1, -1, -2], n).astype(np.int32), "box": rng.normal(size=(n, 4)).astype(np.float32),
             "landmarks": rng.random((n, 10), np.float32), "crop": rng.normal(size=(n, 4)).astype(np.float32),
             "flipped": rng.random(n) < 0.5}
    pixels = rng.integers(0, 256, (n, 12, 12, 3), np.uint8)
    parts = [{"keys": keys[a : a + per_image], "source": f"image{a // per_image}.jpg",
              "table": {k: v[a : a + per_image] for k, v in table.items()}, "pixels": pixels[a : a + per_image]}
             for a in range(0, n, per_image)]
    return keys, table, pixels, parts


def test_sample_sets_are_written_shard_by_shard_in_key_hash_order(tmp_path, monkeypatch):
    """The sample set builder writes bounded shards itself (no TFDS shuffle buffer), in the order of the
    keys' salted MD5: the order TFDS's shuffling writer gave before, so earlier sets are the same."""
    n, per_image = 250, 25
    keys, table, pixels, parts = _random_parts(n, per_image, np.random.default_rng(0))
    staged = datasets.stage_samples(tmp_path / "staged", 12, n, iter(parts))
    monkeypatch.setattr(sample_sets, "SHARD_RECORDS", 100)
    builder = datasets.build(datasets.MtcnnSamples, staged, tmp_path / "out", config="pnet")
    assert builder.info.splits["train"].shard_lengths == [100, 100, 50]
    order = sample_sets.record_order(keys)
    hasher = hashing.Hasher("train")
    assert order.tolist() == sorted(range(n), key=lambda i: hasher.hash_key(keys[i]))
    s = load_samples(tmp_path / "out")
    assert len(s) == n
    for j, r in enumerate(s.__getitems__(range(n))):
        i = order[j]
        assert r["source"] == f"image{i // per_image}.jpg" and r["label"] == table["label"][i]
        assert r["flipped"] == table["flipped"][i]
        for k in ("box", "landmarks", "crop"):
            np.testing.assert_array_equal(r[k], table[k][i])
        np.testing.assert_array_equal(r["image"], pixels[i])


def test_sample_sets_read_as_tfds_decodes_them(tmp_path):
    """`Samples` parses the records itself (fast, a batch at a time): every field of every record is what
    TFDS's own decode gives (label/flipped as python int/bool, source as str), dtypes and shapes included."""
    n = 60
    *_, parts = _random_parts(n, 7, np.random.default_rng(1))  # pixels 0-255, labels 1, 0, -1, -2
    staged = datasets.stage_samples(tmp_path / "staged", 12, n, iter(parts))
    builder = datasets.build(datasets.MtcnnSamples, staged, tmp_path / "out", config="pnet")
    plain = {"label": int, "flipped": bool, "source": bytes.decode}
    expected = [{k: plain.get(k, lambda v: v)(v) for k, v in r.items()}
                for r in builder.as_data_source(split="train").__getitems__(list(range(n)))]
    s = load_samples(tmp_path / "out")
    order = [5, 0, 59, 5, 31]
    for got, want in zip([*s.__getitems__(range(n)), *s.__getitems__(np.array(order)), *(s[i] for i in order)],
                         [*expected, *(expected[i] for i in order), *(expected[i] for i in order)]):
        assert list(got) == list(want)
        for k, v in want.items():
            assert type(got[k]) is type(v), k
            if isinstance(v, np.ndarray):
                assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
                np.testing.assert_array_equal(got[k], v)
            else:
                assert got[k] == v, k
    assert s.__getitems__([]) == [] and len(s) == n


def test_sample_workers_import_neither_jax_nor_tfds(tmp_path):
    """A spawned worker imports the worker module and, as its __main__, the script that started it: under
    the console script or `python -m mtcnn_jax.samples` that is the samples module. Neither may pull in
    JAX or TFDS, checked inside a real spawned worker of a script that imports samples like the CLI."""
    script = tmp_path / "cli_like.py"
    script.write_text(textwrap.dedent("""
        import multiprocessing as mp
        import sys

        from mtcnn_jax import samples  # what the console script and python -m import
        from mtcnn_jax import sample_worker

        def heavy_modules():
            return [m for m in ("jax", "tensorflow_datasets", "tensorflow") if m in sys.modules]

        if __name__ == "__main__":
            assert "mtcnn_jax.sample_worker" in sys.modules
            with mp.get_context("spawn").Pool(1) as pool:
                print("worker:", pool.apply(heavy_modules))
            print("main:", heavy_modules())
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "worker: []" in out.stdout and "main: []" in out.stdout, out.stdout
