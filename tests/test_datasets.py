"""TFDS builders (array_record, built without TensorFlow) for WIDER FACE, LFW+Net and CelebA in the wild."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mtcnn_jax import datasets

FIXTURES = Path(__file__).parent / "fixtures"


def test_read_wider_gt_keeps_attributes_and_skips_zero_face_line(tmp_path):
    gt = tmp_path / "gt.txt"
    gt.write_text("a/1.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \na/2.jpg\n2\n10 20 30 40 2 1 0 0 1 2 \n5 5 8 9 0 0 1 1 0 0 \n")
    first, second = datasets.read_wider_gt(gt)
    assert first["path"] == "a/1.jpg" and first["boxes"].shape == (0, 4)
    np.testing.assert_array_equal(second["boxes"], [[10, 20, 40, 60], [5, 5, 13, 14]])
    np.testing.assert_array_equal(second["pose"], [2, 0])
    np.testing.assert_array_equal(second["invalid"], [0, 1])
    np.testing.assert_array_equal(second["blur"], [2, 0])


def test_wider_face_builds_and_reads_back(shared_data, tmp_path):
    builder = datasets.build(datasets.WiderFace, shared_data / "wider_face", tmp_path, max_images=12)
    _, entries = datasets.wider_split(shared_data / "wider_face", "train")
    train = datasets.data_source(builder, "train")
    assert len(train) == 12 and len(datasets.data_source(builder, "validation")) == 12
    assert "tensorflow" not in sys.modules
    by_name = {e["path"]: e for e in entries[:12]}
    for i in range(len(train)):
        r = train[i]
        entry = by_name[r["image/filename"].decode()]
        np.testing.assert_allclose(np.reshape(r["faces"]["box"], (-1, 4)), entry["boxes"])
        np.testing.assert_array_equal(r["faces"]["occlusion"], entry["occlusion"])
        assert r["image"].ndim == 3 and r["image"].dtype == np.uint8


def test_lfw_net_builds_both_splits(shared_data, tmp_path):
    builder = datasets.build(datasets.LfwNet, shared_data / "lfw_net", tmp_path, max_images=10)
    train, test = datasets.data_source(builder, "train"), datasets.data_source(builder, "test")
    assert len(train) == 10 and len(test) == 10
    r = train[0]
    assert r["landmarks"].shape == (5, 2) and r["box"].shape == (4,)
    assert (r["landmarks"] >= r["box"][:2]).all() and (r["landmarks"] <= r["box"][2:]).all()


def test_celeba_fixture_builds(tmp_path):
    builder = datasets.build(datasets.CelebaWild, FIXTURES / "celeba", tmp_path)
    train = datasets.data_source(builder, "train")
    assert len(train) == 4
    rows = {train[i]["image/filename"].decode(): train[i] for i in range(4)}
    np.testing.assert_allclose(rows["000001.jpg"]["box"], [30, 40, 120, 148])  # x_1, y_1, x_1 + w, y_1 + h
    np.testing.assert_allclose(rows["000001.jpg"]["landmarks"][0], [58, 80])
    assert rows["000002.jpg"]["image"].shape == (200, 180, 3)


def test_bad_images_are_skipped_and_counted(tmp_path):
    root = tmp_path / "wider"
    (root / "WIDER_train/images/e").mkdir(parents=True)
    (root / "WIDER_val/images/e").mkdir(parents=True)
    (root / "wider_face_split").mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30)).save(root / "WIDER_train/images/e/ok.jpg")
    (root / "WIDER_train/images/e/broken.jpg").write_bytes(b"not a jpeg")
    gt = "e/ok.jpg\n1\n1 1 10 10 0 0 0 0 0 0\ne/broken.jpg\n0\n0 0 0 0 0 0 0 0 0 0\ne/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
    (root / "wider_face_split/wider_face_train_bbx_gt.txt").write_text(gt)
    Image.new("RGB", (40, 30)).save(root / "WIDER_val/images/e/ok.jpg")
    (root / "wider_face_split/wider_face_val_bbx_gt.txt").write_text("e/ok.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    with pytest.warns(UserWarning, match="missing images"):
        builder = datasets.build(datasets.WiderFace, root, tmp_path / "out")
    assert len(datasets.data_source(builder, "train")) == 1
    assert builder.skipped.counts == {"unreadable images": 1, "missing images": 1}
    assert "gone.jpg" in builder.skipped.names["missing images"][0]


def test_empty_split_is_a_clear_error(tmp_path):
    root = tmp_path / "wider"
    (root / "wider_face_split").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"wider_face_split/wider_face_{split}_bbx_gt.txt").write_text("e/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    with pytest.raises(ValueError, match="1 missing images"):
        datasets.build(datasets.WiderFace, root, tmp_path / "out")
