"""TFDS builders (array_record, built without TensorFlow) for WIDER FACE, LFW+Net and CelebA in the wild."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtcnn_jax import datasets
from mtcnn_jax.datasets import common

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
    Image.new("RGB", (40, 30)).save(root / "WIDER_train/images/e/ok.jpg")
    (root / "WIDER_train/images/e/broken.jpg").write_bytes(b"not a jpeg")
    gt = "e/ok.jpg\n1\n1 1 10 10 0 0 0 0 0 0\ne/broken.jpg\n0\n0 0 0 0 0 0 0 0 0 0\ne/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n"
    (root / "wider_face_split/wider_face_train_bbx_gt.txt").write_text(gt)
    Image.new("RGB", (40, 30)).save(root / "WIDER_val/images/e/ok.jpg")
    (root / "wider_face_split/wider_face_val_bbx_gt.txt").write_text("e/ok.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    with pytest.warns(UserWarning, match="missing images"):
        builder = datasets.build(datasets.WiderFace, root, tmp_path / "out")
    assert len(datasets.data_source(builder, "train")) == 1
    assert builder.skipped["train"].counts == {"unreadable images": 1, "missing images": 1}
    assert "gone.jpg" in builder.skipped["train"].names["missing images"][0]
    assert not builder.skipped["validation"].counts
    again = datasets.WiderFace(data_dir=str(tmp_path / "out"))  # the built dataset keeps what was skipped
    assert again.skipped["train"].counts == builder.skipped["train"].counts


def test_empty_split_is_a_clear_error(tmp_path):
    root = tmp_path / "wider"
    (root / "wider_face_split").mkdir(parents=True)
    for split in ("train", "val"):
        (root / f"wider_face_split/wider_face_{split}_bbx_gt.txt").write_text("e/gone.jpg\n0\n0 0 0 0 0 0 0 0 0 0\n")
    with pytest.raises(ValueError, match="1 missing images"):
        datasets.build(datasets.WiderFace, root, tmp_path / "out")


def test_records_keep_list_order_across_shards_and_absent_splits_are_not_built(shared_data, tmp_path, monkeypatch):
    """Shards are written one after another as the list is read (bounded memory on a full WIDER FACE);
    the records keep the list's order, and a manual directory without WIDER_val builds the train split."""
    root = tmp_path / "wider"
    (root / "wider_face_split").mkdir(parents=True)
    (root / "WIDER_train").symlink_to(shared_data / "wider_face" / "WIDER_train")
    lines = (shared_data / "wider_face/wider_face_split/wider_face_train_bbx_gt.txt").read_text()
    (root / "wider_face_split/wider_face_train_bbx_gt.txt").write_text(lines)
    monkeypatch.setattr(datasets.WiderFace, "SHARD_INPUTS", 3)
    builder = datasets.build(datasets.WiderFace, root, tmp_path / "out", max_images=7)
    assert list(builder.info.splits) == ["train"] and builder.info.splits["train"].shard_lengths == [3, 3, 1]
    _, entries = datasets.wider_split(root, "train")
    train = datasets.data_source(builder, "train", decode_images=False)
    assert [r["image/filename"].decode() for r in train.__getitems__(range(7))] == [e["path"] for e in entries[:7]]
    assert train[0]["image"] == (root / "WIDER_train/images" / entries[0]["path"]).read_bytes()


def test_skipped_counts_merge_and_round_trip():
    a, b = common.Skipped(), common.Skipped()
    for k in range(4):
        a.add("missing images", f"a{k}")
        b.add("missing images", f"b{k}")
    b.add("unreadable images", "x")
    a.merge(b)
    assert a.counts == {"missing images": 8, "unreadable images": 1} and a.names["missing images"] == [
        "a0", "a1", "a2", "a3", "b0"]
    assert common.Skipped.from_dict(a.as_dict()) == a


def test_datasets_import_no_module_that_imports_them_back():
    """No import cycle: the package modules that mtcnn_jax.datasets imports do not import it."""
    code = ("import sys, mtcnn_jax.datasets; print(' '.join(m.__file__ for n, m in sys.modules.items() "
            "if n.startswith('mtcnn_jax.') and not n.startswith('mtcnn_jax.datasets')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    for path in out.stdout.split():
        text = Path(path).read_text()
        assert "mtcnn_jax.datasets" not in text and "from mtcnn_jax import datasets" not in text, path
