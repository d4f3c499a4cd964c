"""Tests of the evaluators (wider_eval, fddb_eval, landmark_eval, detections_json) and the evaluate CLI:
hand-computed cases for the WIDER FACE, FDDB and landmark protocols."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from conftest import missing
from mtcnn_jax import visualize
from mtcnn_jax.boxes import iou_matrix
from mtcnn_jax.detections_json import EvaluationError, load_detections, validate_detections
from mtcnn_jax.fddb_eval import ellipse_rect_overlap, evaluate_fddb, fddb_image_results
from mtcnn_jax.landmark_eval import evaluate_landmarks, read_landmark_list
from mtcnn_jax.wider_eval import (
    WIDER_SETTINGS,
    evaluate_wider,
    image_eval,
    img_pr_info,
    voc_ap,
    wider_key,
    wider_thresholds,
)

REPO = Path(__file__).resolve().parents[1]
FDDB_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "fddb"


def wider_gt(images: dict[str, tuple[list, list[int]]]) -> dict:
    """A load_wider_gt-shaped dict: key -> (boxes x1 y1 x2 y2, counted 0-based indices, all settings)."""
    gt = {}
    for key, (boxes, counted) in images.items():
        mask = np.zeros(len(boxes), dtype=bool)
        mask[counted] = True
        gt[key] = {"boxes": np.asarray(boxes, dtype=float).reshape(-1, 4)} | {
            s: mask for s in WIDER_SETTINGS
        }
    return gt


def official_image_eval(pred, gt, ignore, iou_thresh=0.5):
    """Literal transcription of the official image_eval loop (ignore = 1 for counted faces)."""
    overlaps = iou_matrix(pred[:, :4], gt)
    pred_recall, recall_list, proposal_list = np.zeros(len(pred)), np.zeros(len(gt)), np.ones(len(pred))
    for h in range(len(pred)):
        max_overlap, max_idx = overlaps[h].max(), overlaps[h].argmax()
        if max_overlap >= iou_thresh:
            if ignore[max_idx] == 0:
                recall_list[max_idx] = -1
                proposal_list[h] = -1
            elif recall_list[max_idx] == 0:
                recall_list[max_idx] = 1
        pred_recall[h] = len(np.where(recall_list == 1)[0])
    return pred_recall, proposal_list


def official_img_pr_info(thresh_num, pred_info, proposal_list, pred_recall):
    """Literal transcription of the official img_pr_info loop."""
    pr_info = np.zeros((thresh_num, 2))
    for t in range(thresh_num):
        r_index = np.where(pred_info[:, 4] >= 1 - (t + 1) / thresh_num)[0]
        if len(r_index):
            r_index = r_index[-1]
            pr_info[t, 0] = len(np.where(proposal_list[: r_index + 1] == 1)[0])
            pr_info[t, 1] = pred_recall[r_index]
    return pr_info


# ---------------------------------------------------------------------------------------------
# WIDER FACE
# ---------------------------------------------------------------------------------------------


def test_image_eval_ignored_and_duplicate():
    gt = np.array([[0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9]], float)
    counted = np.array([True, True, False])
    pred = np.array([[0, 0, 9, 9, 0.9], [40, 0, 49, 9, 0.8], [1, 0, 9, 9, 0.7], [20, 0, 29, 9, 0.6]])
    recall, proposal = image_eval(pred, gt, counted)
    # ignored face -> no proposal (-1); duplicate on face 0 stays a proposal without new recall (FP)
    np.testing.assert_array_equal(proposal, [1, -1, 1, 1])
    np.testing.assert_array_equal(recall, [1, 1, 1, 2])


def test_vectorised_matches_official_loops():
    rng = np.random.default_rng(0)
    for _ in range(30):
        xy = rng.uniform(0, 60, (6, 2))
        gt = np.concatenate([xy, xy + rng.uniform(5, 20, (6, 2))], 1)
        counted = rng.random(6) < 0.6
        pxy = rng.uniform(0, 60, (12, 2))
        pred = np.concatenate([pxy, pxy + rng.uniform(5, 20, (12, 2)), rng.random((12, 1)).round(2)], 1)
        pred = np.concatenate([pred, np.column_stack([gt + rng.normal(0, 1, gt.shape), rng.random(6)])])
        pred = pred[np.argsort(-pred[:, 4], kind="stable")]
        want_recall, want_prop = official_image_eval(pred, gt, counted.astype(int))
        recall, prop = image_eval(pred, gt, counted)
        np.testing.assert_array_equal(recall, want_recall)
        np.testing.assert_array_equal(prop, want_prop)
        got = img_pr_info(pred[:, 4], prop, recall, wider_thresholds(1000))
        np.testing.assert_array_equal(got, official_img_pr_info(1000, pred, want_prop, want_recall))


def test_two_image_ap_by_hand():
    # Image A: faces f1, f2 counted, f3 ignored. Detections (scores already span 0..1, so min-max
    # normalisation keeps them): f1 1.0 (TP), f3 0.75 (ignored: neither), f1 again 0.5 (duplicate: FP),
    # f2 0.25 (TP). Image B: one counted face, a far detection 0.0 (FP). Image C: one face, no detections.
    # count_face = 2 + 1 + 1 = 4. Sweeping thresholds: (P, R) = (1, 1/4), (1, 1/4), (1/2, 1/4), (2/3, 2/4),
    # (2/4, 2/4). Envelope: recall 1/4 at precision 1, recall 2/4 at precision 2/3:
    # AP = 1/4 * 1 + 1/4 * 2/3 = 5/12.
    gt = wider_gt(
        {
            "0--A/a": ([[0, 0, 9, 9], [20, 0, 29, 9], [40, 0, 49, 9]], [0, 1]),
            "0--A/b": ([[0, 0, 9, 9]], [0]),
            "0--A/c": ([[0, 0, 9, 9]], [0]),
        }
    )
    pred = {
        "any/prefix/0--A/a.jpg": {
            "boxes": [[20, 0, 29, 9, 0.25], [0, 0, 9, 9, 1.0], [40, 0, 49, 9, 0.75], [1, 0, 9, 9, 0.5]]
        },
        "0--A/b.png": {"boxes": [[100, 100, 109, 109, 0.0]]},
        "0--A\\c": {"boxes": []},
    }
    res = evaluate_wider(pred, None, gt=gt)
    for s in WIDER_SETTINGS:
        assert res[s] == pytest.approx(5 / 12)
    assert res["images"] == 3 and res["split_images"] == 3


def test_score_ties_and_detections_without_gt():
    # Two detections tied at 1.0 on the one face: one TP and one FP at every threshold -> AP 1 * 1/2.
    # The image without faces only takes part in score normalisation (official: skipped), and
    # count_face is restricted to the predicted images (image "unseen" is not counted).
    gt = wider_gt(
        {"1--B/x": ([[0, 0, 19, 19]], [0]), "1--B/empty": ([], []), "1--B/unseen": ([[0, 0, 9, 9]], [0])}
    )
    pred = {
        "1--B/x.jpg": {"boxes": [[0, 0, 19, 19, 1.0], [1, 1, 19, 19, 1.0]]},
        "1--B/empty.jpg": {"boxes": [[0, 0, 5, 5, 0.0]]},
    }
    res = evaluate_wider(pred, None, gt=gt)
    assert res["easy"] == pytest.approx(0.5)
    assert res["images"] == 2


def test_voc_ap_envelope():
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([0.5, 1.0, 0.25])) == pytest.approx(
        0.5 * 1.0 + 0.5 * 0.25
    )


def test_wider_key_matching():
    assert (
        wider_key("/data/WIDER_val/images/0--Parade/0_Parade_Parade_0_102.jpg")
        == "0--Parade/0_Parade_Parade_0_102"
    )
    assert wider_key("x\\0--Parade\\0_Parade_Parade_0_102.JPG") == "0--Parade/0_Parade_Parade_0_102"
    gt = wider_gt({"0--A/a": ([[0, 0, 9, 9]], [0])})
    with pytest.raises(EvaluationError, match="0--A/zzz.jpg"):
        evaluate_wider({"0--A/zzz.jpg": {"boxes": []}}, None, gt=gt)


@pytest.fixture(scope="module")
def wider_gt_dir(shared_data):
    path = shared_data / "wider_face" / "eval_tools" / "ground_truth"
    if not (path / "wider_face_val.mat").exists():
        missing(f"WIDER FACE ground truth not found in {path}")
    return path


def test_wider_facenet_pytorch_reference(shared_data, wider_gt_dir):
    pred = load_detections(shared_data / "reference" / "facenet_pytorch_wider_val.json")
    res = evaluate_wider(pred, wider_gt_dir)
    assert (res["images"], res["split_images"]) == (293, 3226)
    assert res["easy"] == pytest.approx(0.840, abs=0.002)
    assert res["medium"] == pytest.approx(0.791, abs=0.002)
    assert res["hard"] == pytest.approx(0.445, abs=0.002)


# ---------------------------------------------------------------------------------------------
# FDDB
# ---------------------------------------------------------------------------------------------


def test_circle_vs_bounding_square_is_pi_over_4():
    overlap = ellipse_rect_overlap(
        np.array([200.0, 200.0, 0.0, 300.0, 300.0]), np.array([100.0, 100.0, 500.0, 500.0])
    )
    # pixel counting with the inclusive (+1) rectangle: pi r^2 / (2r + 1)^2, within 0.005 of pi / 4 at r = 200
    assert overlap == pytest.approx(math.pi / 4, abs=0.005)


def test_ellipse_angle_rotates_major_axis():
    upright = np.array([50.0, 20.0, math.pi / 2, 100.0, 100.0])
    assert ellipse_rect_overlap(upright, np.array([80.0, 50.0, 120.0, 150.0])) > 0.7
    assert ellipse_rect_overlap(upright, np.array([50.0, 80.0, 150.0, 120.0])) < 0.3


def test_fddb_hungarian_maximises_total_overlap():
    # det 0 overlaps face 0 by 0.6 and face 1 by 0.55; det 1 overlaps only face 0 (0.52). Greedy would
    # take (0, 0) alone; the Hungarian matching takes (1, 0) + (0, 1): total 1.07, two discrete TPs.
    overlaps = np.array([[0.6, 0.52], [0.55, 0.0]])
    thresholds, stats = fddb_image_results(overlaps, np.array([0.9, 0.8]))
    np.testing.assert_array_equal(thresholds, [0.9, 0.8])
    np.testing.assert_allclose(stats, [[1, 0.6, 0], [2, 1.07, 0]])


def test_fddb_continuous_counts_low_overlap_matches():
    # Results.cpp: a match with overlap <= 0.5 adds its overlap to TPCont but is an FP (not TPDisc).
    _, stats = fddb_image_results(np.array([[0.3]]), np.array([0.5]))
    np.testing.assert_allclose(stats, [[0, 0.3, 1]])


def test_fddb_fixture_roc_by_hand():
    res = evaluate_fddb(load_detections(FDDB_FIXTURE / "detections.json"), FDDB_FIXTURE)
    roc = res["roc"]
    np.testing.assert_array_equal(roc["thresholds"], [0.95, 0.9, 0.8, 0.7])
    np.testing.assert_array_equal(roc["fp"], [1, 1, 1, 2])
    np.testing.assert_array_equal(roc["tpr_discrete"], [0, 0.25, 0.5, 0.5])
    assert roc["tpr_continuous"][1] == pytest.approx(math.pi / 4 / 4, abs=0.002)
    assert (res["images"], res["faces"]) == (4, 4)
    assert res["discrete_tpr_at_1000fp"] == 0.5


def test_fddb_unknown_image():
    with pytest.raises(EvaluationError, match="img_999"):
        evaluate_fddb({"2002/08/11/big/img_999.jpg": {"boxes": []}}, FDDB_FIXTURE)


# ---------------------------------------------------------------------------------------------
# Landmarks
# ---------------------------------------------------------------------------------------------


def _entries():
    points = np.array([[10, 10], [30, 10], [20, 20], [12, 30], [28, 30]], float)
    return [
        {"path": "set/a.jpg", "box": np.array([0.0, 0.0, 40.0, 30.0]), "points": points},
        {"path": "set/b.jpg", "box": np.array([0.0, 0.0, 40.0, 30.0]), "points": points},
    ]


def test_landmark_nme_by_hand():
    # a.jpg: every point 1 px off -> NME 1/20 (inter-ocular 20) and 1/50 (box diagonal 50).
    # b.jpg: the only prediction is elsewhere (IoU < 0.5): missed, counted as a failure.
    pts = _entries()[0]["points"] + [1, 0]
    pred = {
        "/root/set/a.jpg": {
            "boxes": [[200, 200, 240, 230, 0.9], [0, 0, 40, 30, 0.8]],
            "landmarks": [np.zeros((5, 2)).tolist(), pts.tolist()],
        },
        "set/b.jpg": {"boxes": [[100, 100, 140, 130, 0.9]], "landmarks": [pts.tolist()]},
    }
    res = evaluate_landmarks(pred, _entries(), root="/root")
    assert (res["faces"], res["missed"], res["missed_images"]) == (2, 1, ["set/b.jpg"])
    assert res["inter_ocular"]["nme"] == pytest.approx(0.05)
    assert res["inter_ocular"]["per_point"] == pytest.approx([0.05] * 5)
    assert res["box_diagonal"]["nme"] == pytest.approx(0.02)
    assert res["inter_ocular"]["failure_rate"] == pytest.approx(0.5)


def test_read_landmark_lists(tmp_path):
    lfw = tmp_path / "list.txt"
    lfw.write_text("lfw_5590\\a.jpg 10 50 20 70 1 2 3 4 5 6 7 8 9 10\n")
    (e,) = read_landmark_list(lfw, "lfw")
    assert e["path"] == "lfw_5590/a.jpg"
    np.testing.assert_array_equal(e["box"], [10, 20, 50, 70])
    np.testing.assert_array_equal(e["points"][1], [3, 4])
    marks, boxes = tmp_path / "marks.txt", tmp_path / "bbox.txt"
    marks.write_text(
        "1\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y"
        " leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n000001.jpg 1 2 3 4 5 6 7 8 9 10\n"
    )
    boxes.write_text("1\nimage_id x_1 y_1 width height\n000001.jpg 95 71 226 313\n")
    (e,) = read_landmark_list(marks, "celeba", boxes)
    np.testing.assert_array_equal(e["box"], [95, 71, 321, 384])
    np.testing.assert_array_equal(e["points"][4], [9, 10])


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"img.jpg": {"boxes": [[0, 0, 10, 10, float("nan")]]}}, "img.jpg: NaN"),
        ({"img.jpg": {"boxes": [[10, 0, 5, 10, 0.9]]}}, "img.jpg: box 0 has x2 < x1"),
        ({"img.jpg": {"boxes": [[0, 0, 10, 10]]}}, "img.jpg"),
        ({"img.jpg": [[0, 0, 10, 10, 0.9]]}, "img.jpg"),
        ({"img.jpg": {"boxes": [[0, 0, 10, 10, 0.9]], "landmarks": [[[1, 2]]]}}, "img.jpg: landmarks"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_detections(raw, message):
    with pytest.raises(EvaluationError, match=message):
        validate_detections(raw)


def test_malformed_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(EvaluationError, match="malformed JSON"):
        load_detections(path)


# ---------------------------------------------------------------------------------------------
# Plots and command line
# ---------------------------------------------------------------------------------------------


def test_plots_return_figures(tmp_path):
    fig = visualize.plot_ced({"nme": [0.01, 0.05, np.inf]}, path=tmp_path / "ced.png")
    assert (tmp_path / "ced.png").stat().st_size > 0 and fig.axes
    plt.close(fig)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "MPLBACKEND": "Agg", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "mtcnn_jax.evaluate", *args], capture_output=True, text=True, env=env, cwd=REPO
    )


def test_cli_wider(shared_data, wider_gt_dir, tmp_path):
    out, plot = tmp_path / "wider.json", tmp_path / "pr.png"
    r = run_cli(
        "wider",
        "--pred",
        str(shared_data / "reference" / "facenet_pytorch_wider_val.json"),
        "--gt-dir",
        str(wider_gt_dir),
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    assert "293 of 3226 images" in r.stdout
    res = json.loads(out.read_text())
    assert [round(res[s], 3) for s in ("easy", "medium", "hard")] == pytest.approx(
        [0.840, 0.791, 0.445], abs=0.002
    )
    assert res["images"] == 293 and plot.stat().st_size > 0


def test_cli_fddb(tmp_path):
    out, plot = tmp_path / "fddb.json", tmp_path / "roc.png"
    r = run_cli(
        "fddb",
        "--pred",
        str(FDDB_FIXTURE / "detections.json"),
        "--folds",
        str(FDDB_FIXTURE),
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["discrete_tpr_at_1000fp"] == 0.5
    assert plot.stat().st_size > 0


def test_cli_landmarks(tmp_path):
    (tmp_path / "list.txt").write_text("imgs\\a.jpg 0 40 0 30 10 10 30 10 20 20 12 30 28 30\n")
    pts = [[12, 10], [32, 10], [22, 20], [14, 30], [30, 30]]  # every point 2 px off: NME 0.1, not > 0.1
    pred = {str(tmp_path / "imgs" / "a.jpg"): {"boxes": [[0, 0, 40, 30, 0.99]], "landmarks": [pts]}}
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    out, plot = tmp_path / "lm.json", tmp_path / "ced.png"
    r = run_cli(
        "landmarks",
        "--pred",
        str(tmp_path / "pred.json"),
        "--list",
        str(tmp_path / "list.txt"),
        "--root",
        str(tmp_path),
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["inter_ocular"]["nme"] == pytest.approx(0.1) and res["inter_ocular"]["failure_rate"] == 0
    assert res["missed"] == 0 and plot.stat().st_size > 0


def test_cli_bad_input_exit_code_2(tmp_path):
    (tmp_path / "pred.json").write_text(
        json.dumps({"2002/08/11/big/img_591.jpg": {"boxes": [[0, 0, 10, 10, None]]}})
    )
    r = run_cli("fddb", "--pred", str(tmp_path / "pred.json"), "--folds", str(FDDB_FIXTURE))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "img_591" in r.stderr
