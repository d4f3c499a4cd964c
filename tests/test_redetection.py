"""Re-detection for video: candidates around the previous faces, and when the whole cascade runs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mtcnn_jax import boxes as bx
from mtcnn_jax import cascade
from mtcnn_jax.detect import Detections, detect
from mtcnn_jax.redetection import Redetector, batch_runner


def test_candidates_around_a_face_by_hand():
    boxes = np.array([[10.0, 20.0, 30.0, 60.0], [0, 0, 0, 0]], np.float32)  # 20 x 40, squared to 40 x 40
    cand, valid = (np.asarray(a) for a in cascade.redetect_candidates(boxes, np.array([True, False])))
    v = len(cascade.REDETECT_OFFSETS)
    assert cand.shape == (2 * v, 4) and valid.tolist() == [True] * v + [False] * v
    # square: centre (20, 40), side 40 -> (0, 20, 40, 60); shifts of a quarter side are 10 px; 1.25x -> side 50
    expected = [[0, 20, 40, 60], [-10, 20, 30, 60], [10, 20, 50, 60], [0, 10, 40, 50], [0, 30, 40, 70],
                [-5, 15, 45, 65]]
    np.testing.assert_array_equal(cand[:v], expected)


def test_every_must_be_a_whole_number():
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="every"):
            Redetector.of({}, every=bad)


@pytest.fixture(scope="module")
def frames(shared_data):
    """Frames of a face moving a few pixels, then a blank frame (the face lost)."""
    with Image.open(shared_data / "reference" / "ivan.jpg") as img:
        face = np.asarray(img.convert("RGB").resize((160, 160)))
    canvas = np.zeros((4, 200, 240, 3), np.uint8)
    for k, (dy, dx) in enumerate([(10, 20), (13, 24), (16, 28), (19, 32)]):
        canvas[k, dy:dy + 160, dx:dx + 160] = face
    return [*canvas, np.zeros((200, 240, 3), np.uint8)]


def test_redetection_follows_the_face_and_reruns_when_it_is_lost(frames, original_weights):
    tracker = Redetector.of(original_weights, every=3, batch_size=1)
    found = [tracker.detect([f], ["cam"])[0] for f in frames]
    whole = [detect(f, original_weights) for f in frames]
    assert [len(d) for d in whole] == [1, 1, 1, 1, 0]
    assert [len(d) for d in found] == [1, 1, 1, 1, 0]
    for a, b in zip(found[:4], whole[:4]):
        assert float(bx.iou_matrix(a.boxes, b.boxes)[0, 0]) > 0.8
    np.testing.assert_array_equal(found[0].boxes, whole[0].boxes)  # frame 0 and 3: the whole cascade
    np.testing.assert_array_equal(found[3].boxes, whole[3].boxes)
    # frames 0 and 3 whole, 1 and 2 re-detected, 4 re-detected, lost, then whole
    assert (tracker.full_runs, tracker.redetect_runs) == (3, 3)


def test_sources_keep_their_own_state(frames, original_weights):
    tracker = Redetector.of(original_weights, every=10, batch_size=2)
    a = tracker.detect([frames[0], frames[4]], ["a", "b"])
    assert [len(d) for d in a] == [1, 0] and tracker.full_runs == 2
    b = tracker.detect([frames[1], frames[4]], ["a", "b"])  # "b" has no face to look around: nothing runs
    assert [len(d) for d in b] == [1, 0] and (tracker.full_runs, tracker.redetect_runs) == (2, 2)
    with pytest.raises(ValueError, match="each source once"):
        tracker.detect([frames[0], frames[1]], ["a", "a"])


def test_batch_runner_runs_each_sources_frames_in_order_and_skips_padding():
    calls = []

    def full(frames, bucket):
        calls.append(("full", [int(f[0, 0, 0]) for f in frames]))
        return [Detections(np.array([[1, 1, 30, 30]], np.float32), np.ones(1, np.float32),
                           np.zeros((1, 5, 2), np.float32)) for _ in frames]

    def around(frames, bucket, boxes):
        calls.append(("around", [int(f[0, 0, 0]) for f in frames]))
        return [Detections(b, np.ones(len(b), np.float32), np.zeros((len(b), 5, 2), np.float32)) for b in boxes]

    run = batch_runner(Redetector(every=3, full=full, around=around, batch_size=4))
    frame = lambda v: np.full((40, 40, 3), v, np.uint8)  # noqa: E731
    out = run([frame(1), frame(2), frame(10), frame(3), frame(3)], (128, 128), ["a", "a", "b", "a", None])
    assert [len(d) for d in out[:4]] == [1, 1, 1, 1] and out[4] is None  # padding: no result
    # a's frames one after another, b's first with a's first; whole frames are each source's 0, 3, 6, ...
    assert calls == [("full", [1, 10]), ("around", [2]), ("around", [3])]
    out = run([frame(4), frame(11)], (128, 128), ["a", "b"])
    assert calls[3:] == [("full", [4]), ("around", [11])]  # "a" at its frame 3: whole


def test_more_faces_than_followed_run_whole():
    many = cascade.REDETECT_FACES + 1
    full = lambda frames, bucket: [Detections(np.tile([[1.0, 1, 30, 30]], (many, 1)).astype(np.float32),  # noqa: E731
                                              np.ones(many, np.float32), np.zeros((many, 5, 2), np.float32))
                                   for _ in frames]
    tracker = Redetector(every=10, full=full, around=lambda *a: pytest.fail("re-detected"), batch_size=1)
    for _ in range(3):
        tracker.detect([np.zeros((40, 40, 3), np.uint8)], ["crowd"])
    assert (tracker.full_runs, tracker.redetect_runs) == (3, 0)
