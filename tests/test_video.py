"""Videos and streams: the detect CLI on a short clip made here from a shared photo gives, frame by frame, the
detections of the same frames (decoded here independently) run as images; the drawn video keeps the frame
count, size and rate; --every, unreadable videos, refused outputs; detect_stream routing several sources,
and the scheduler's batches across sources and buckets (with a stand-in cascade, so those run in ms)."""

from __future__ import annotations

import itertools
import json
import threading
from fractions import Fraction

import numpy as np
import pytest
from PIL import Image

from conftest import missing
from mtcnn_jax import boxes as bx
from mtcnn_jax import buckets, compile_cache, detect, streams, video
from mtcnn_jax.annotate import annotate_image
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.images import ImageError
from mtcnn_jax.video_io import upright

av = pytest.importorskip("av")  # the `video` extra (in dev)

RATE = 25
FRAMES = 6
H, W = 128, 192  # a bucket of the ladder and of the streams alike: one compile


def write_clip(path, frames, rate=RATE) -> str:
    """Encode RGB frames as H.264 (MPEG-4 part 2 where this FFmpeg lacks x264) at `rate` frames/s."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.height, stream.width, stream.pix_fmt = *frames[0].shape[:2], "yuv420p"
        for frame in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        out.mux(stream.encode())
    return str(path)


def decode(path) -> list[np.ndarray]:
    """A video's frames as RGB, decoded here without mtcnn_jax."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip(shared_data, original_weights, tmp_path_factory):
    """A 6-frame 160x120 clip panning over the shared multiface photo (faces move 8 px a frame), its frames
    decoded independently, and their detections run as images by detect_batch."""
    photo = shared_data / "reference" / "multiface.jpg"
    if not photo.is_file():
        missing(f"{photo} not found")
    wide = np.asarray(Image.open(photo).convert("RGB").resize((W + 8 * FRAMES, H + 6)))
    frames = [np.ascontiguousarray(wide[3 : 3 + H, 8 * k : 8 * k + W]) for k in range(FRAMES)]
    path = write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames)
    decoded = decode(path)
    return path, decoded, detect.detect_batch(decoded)


@pytest.fixture(autouse=True)
def keep_compile_cache(monkeypatch):
    monkeypatch.setattr(compile_cache, "configure", lambda folder="default": None)  # this process's cache


def lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def closer_to(drawn: np.ndarray, this: np.ndarray, than: np.ndarray) -> bool:
    """Whether a decoded (lossy) frame is much nearer `this` than `than` where the two differ."""
    where = (this != than).any(axis=-1)
    error = lambda a: float(np.abs(drawn[where].astype(np.float64) - a[where]).mean())  # noqa: E731
    return where.sum() > 50 and error(this) < error(than) / 2


def test_video_frames_equal_the_frames_run_as_images(clip, tmp_path, capsys):
    path, decoded, expected = clip
    assert len(decoded) == FRAMES and all(len(det) >= 3 for det in expected)  # faces in every frame
    out, drawn = tmp_path / "faces.jsonl", tmp_path / "drawn.mp4"
    assert detect.main([path, "--json", str(out), "--draw", str(drawn)]) == 0
    result = lines(out)
    frames, end = result[:-1], result[-1]
    assert [r["frame"] for r in frames] == list(range(FRAMES))
    for k, (line, det) in enumerate(zip(frames, expected)):
        assert line["video"] == path and line["time"] == pytest.approx(k / RATE)
        assert {key: line[key] for key in ("boxes", "landmarks", "overflow")} == det.to_json()
    assert end == {"video": path, "frames": FRAMES, "detected": FRAMES, "faces": sum(map(len, expected))}
    assert f"1 video, {FRAMES} frames ({FRAMES} detected)" in capsys.readouterr().out
    with av.open(str(drawn)) as container:
        stream = container.streams.video[0]
        assert (stream.height, stream.width) == (H, W) and stream.average_rate == Fraction(RATE)
    drawings = decode(drawn)
    assert len(drawings) == FRAMES
    for frame, det, drawing in zip(decoded, expected, drawings):  # the boxes drawn, not the plain frame
        assert closer_to(drawing, np.asarray(annotate_image(frame, det)), frame)


def test_every_second_frame(clip, tmp_path):
    path, decoded, expected = clip
    out, drawn = tmp_path / "every.jsonl", tmp_path / "every.mp4"
    assert detect.main([path, "--every", "2", "--json", str(out), "--draw", str(drawn)]) == 0
    result = lines(out)
    assert [r["frame"] for r in result[:-1]] == [0, 2, 4]
    assert all(r["boxes"] == expected[r["frame"]].to_json()["boxes"] for r in result[:-1])
    assert result[-1] == {"video": path, "frames": FRAMES, "detected": 3,
                          "faces": sum(len(expected[k]) for k in (0, 2, 4))}
    drawings = decode(drawn)
    assert len(drawings) == FRAMES
    held = np.asarray(annotate_image(decoded[1], expected[0]))  # frame 1: frame 0's boxes held
    own = np.asarray(annotate_image(decoded[1], expected[1]))
    assert closer_to(drawings[1], held, own)


def test_redetection_between_whole_frames(clip, tmp_path):
    path, decoded, expected = clip
    out = tmp_path / "redetect.jsonl"
    assert detect.main([path, "--redetect-every", "3", "--json", str(out)]) == 0
    result = lines(out)[:-1]
    assert [r["frame"] for r in result] == list(range(FRAMES))
    for r in result:  # whole frames (0, 3) exactly; the others the same faces, found around the last ones
        boxes, want = np.array(r["boxes"]).reshape(-1, 5)[:, :4], expected[r["frame"]].boxes
        if r["frame"] % 3 == 0:
            assert r["boxes"] == expected[r["frame"]].to_json()["boxes"]
        assert len(boxes) == len(want) > 0
        assert (np.asarray(bx.iou_matrix(want, boxes)).max(axis=1) > 0.5).all()


def test_redetect_every_needs_videos(tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    with pytest.raises(SystemExit) as exit_:
        detect.main([str(image), "--redetect-every", "2"])
    assert exit_.value.code == 2 and "--redetect-every is for videos" in capsys.readouterr().err


def test_unreadable_videos_are_their_errors(clip, tmp_path, capsys):
    path, decoded, expected = clip
    folder = tmp_path / "in"
    folder.mkdir()
    data = open(path, "rb").read()
    (folder / "a_good.mp4").write_bytes(data)
    (folder / "bad.mp4").write_bytes(b"not a video at all" * 50)
    (folder / "cut.mp4").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("skipped")
    out = tmp_path / "faces.jsonl"
    assert detect.main([str(folder), "--json", str(out)]) == 1
    err = capsys.readouterr().err
    result = lines(out)
    good = str(folder / "a_good.mp4")
    assert [r["frame"] for r in result if r["video"] == good and "frame" in r] == list(range(FRAMES))
    errors = {r["video"]: r["error"] for r in result if "error" in r}
    assert sorted(errors) == [str(folder / "bad.mp4"), str(folder / "cut.mp4")]
    assert all("could not be decoded" in e for e in errors.values()), errors
    assert f"error: {folder / 'bad.mp4'}: " in err and "Traceback" not in err and "notes.txt" in err


def test_detect_stream_routes_two_sources(clip):
    path, decoded, expected = clip
    flipped = [np.ascontiguousarray(f[:, ::-1]) for f in decoded]
    expected_flipped = detect.detect_batch(flipped)
    pairs = [pair for a, b in zip(decoded, flipped) for pair in (("cam0", a), ("cam1", b))]
    for frames in (pairs, {"cam0": iter(decoded), "cam1": iter(flipped)}):  # interleaved; one thread each
        got = {"cam0": [], "cam1": []}
        for source, k, det in detect.detect_stream(frames):
            got[source].append((k, det))
        for source, want in (("cam0", expected), ("cam1", expected_flipped)):
            assert [k for k, _ in got[source]] == list(range(FRAMES))
            assert [det.to_json() for _, det in got[source]] == [det.to_json() for det in want]


# ------------------------------------------------------------------------------------------- the scheduler alone

def fake_detector(calls: list, batch_size: int) -> streams.Detector:
    """A stand-in cascade: each frame's result is (its first pixel value, its size); calls are recorded."""

    def run(frames, bucket, sources):
        calls.append((bucket, [int(f[0, 0, 0]) for f in frames]))
        return [(int(f[0, 0, 0]), f.shape[:2]) for f in frames]

    return streams.Detector(run, CascadeConfig(), batch_size, empty="no level")


def frame(value: int, h: int = 40, w: int = 50) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def test_frames_of_several_sources_share_batches_and_come_back_in_order():
    calls = []
    a = [frame(10 + k) for k in range(4)]
    b = [frame(100 + k, 200, 300) for k in range(2)]  # another bucket
    c = [frame(200), frame(201, 8, 8), frame(202, 15, 15), frame(203)]  # too small: an error; no level
    items = [("a", f) for f in a[:2]] + [("b", b[0]), ("c", c[0]), ("a", a[2]), ("c", c[1]), ("c", c[2]),
                                          ("b", b[1]), ("a", a[3]), ("c", c[3])]
    out = list(streams.detect_frames(streams.numbered(items, 4), fake_detector(calls, batch_size=3)))
    got = {s: [(k, r) for src, k, r in out if src == s] for s in "abc"}
    assert got["a"] == [(k, (10 + k, (40, 50))) for k in range(4)]
    assert got["b"] == [(0, (100, (200, 300))), (1, (101, (200, 300)))]
    assert got["c"][0] == (0, (200, (40, 50))) and isinstance(got["c"][1][1], ImageError)
    assert "'c' frame 1" in str(got["c"][1][1]) and got["c"][2:] == [(2, "no level"), (3, (203, (40, 50)))]
    # a and c fill the 128x128 batches together; the last ones run padded with their last frame
    assert calls == [((128, 128), [10, 11, 200]), ((128, 128), [12, 13, 203]), ((256, 384), [100, 101, 101])]


def test_a_source_that_ends_or_changes_size_runs_its_frames_at_once():
    calls = []
    items = [("d", 0, frame(1)), ("d", 1, frame(2, 200, 300)), ("e", 0, frame(3)), ("e", None, streams.END)]
    out = list(streams.detect_frames(iter(items), fake_detector(calls, batch_size=4)))
    assert sorted(out) == [("d", 0, (1, (40, 50))), ("d", 1, (2, (200, 300))), ("e", 0, (3, (40, 50)))]
    # d's first frame ran alone when d moved to another size (not with e's), e's when e ended (before d's
    # second frame, which waited for the input's end)
    assert calls == [((128, 128), [1] * 4), ((128, 128), [3] * 4), ((256, 384), [2] * 4)]


def test_two_workers_run_two_batches_at_once_and_results_keep_their_order():
    """Batches that finish out of order (each waits until the next one has started) come back in order."""
    started = [threading.Event() for _ in range(6)]
    running, most = [0], [0]
    lock = threading.Lock()

    def run(frames, bucket, sources):
        k = int(frames[0][0, 0, 0])
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started[k].set()
        if k + 1 < len(started):
            assert started[k + 1].wait(timeout=10), "the next batch never started alongside this one"
        with lock:
            running[0] -= 1
        return [(k, f.shape[:2]) for f in frames]

    detector = streams.Detector(run, CascadeConfig(), 1, empty="no level", workers=2)
    out = list(streams.detect_frames(streams.numbered([("s", frame(k)) for k in range(6)], 4), detector))
    assert out == [("s", k, (k, (40, 50))) for k in range(6)] and most[0] == 2
    with pytest.raises(ValueError, match="workers must be >= 1"):
        next(streams.detect_frames(iter([]), streams.Detector(run, CascadeConfig(), 1, None, workers=0)))


def test_the_stateless_cascade_runs_two_batches_re_detection_one(original_weights):
    assert detect.stream_detector(original_weights, CascadeConfig()).workers == buckets.default_workers() == 2
    assert detect.stream_detector(original_weights, CascadeConfig(), redetect_every=5).workers == 1
    assert detect.stream_detector(original_weights, CascadeConfig(), workers=3).workers == 3
    for bad, kwargs in [("workers must be a whole number", {"workers": 0}),
                        ("one batch at a time", {"workers": 2, "redetect_every": 5})]:
        with pytest.raises(ValueError, match=bad):
            detect.stream_detector(original_weights, CascadeConfig(), **kwargs)


def test_merged_sources_keep_their_order_and_stop_when_closed():
    sources = {"x": (frame(k) for k in range(5)), "y": (frame(50 + k) for k in range(5))}
    out = list(streams.detect_frames(streams.numbered(sources, 2), fake_detector([], batch_size=2)))
    assert [r[0] for s, k, r in out if s == "x"] == list(range(5))
    assert [r[0] for s, k, r in out if s == "y"] == list(range(50, 55))
    endless = streams.detect_frames(streams.numbered({"z": itertools.repeat(frame(7))}, 2),
                                    fake_detector([], batch_size=1))
    assert next(endless) == ("z", 0, (7, (40, 50)))
    endless.close()  # a camera that never ends: closing stops its reader
    for reader in [t for t in threading.enumerate() if t.name == "mtcnn-read-z"]:
        reader.join(timeout=5)
        assert not reader.is_alive()


def test_detect_stream_refuses_a_plain_list_of_frames():
    with pytest.raises(TypeError, match="pairs or a"):
        list(streams.numbered([frame(1)], 2))


# ------------------------------------------------------------------------------------ the command line's checks

@pytest.fixture
def no_reading(monkeypatch):
    fail = lambda *a, **k: pytest.fail("a video was read")  # noqa: E731
    monkeypatch.setattr(video, "probe", fail)
    monkeypatch.setattr(detect, "resolve_params", fail)


def test_unclear_outputs_refused_before_any_video_is_read(tmp_path, capsys, no_reading):
    one, two = tmp_path / "in" / "a.mp4", tmp_path / "in" / "sub" / "b.mkv"
    two.parent.mkdir(parents=True)
    one.write_bytes(b"x")
    two.write_bytes(b"x")
    Image.fromarray(frame(5)).save(tmp_path / "in" / "still.png")
    (tmp_path / "outs").mkdir()
    (tmp_path / "outs" / "old.jsonl").write_text("")
    cases = [([str(tmp_path / "in"), "--json", str(tmp_path / "x.jsonl")], "1 image and 2 videos"),
             ([str(one), "--json", str(tmp_path / "x.json")], "name it .jsonl"),
             ([str(one), "--json", str(tmp_path / "outs" / "old.jsonl")], "pass --overwrite"),
             ([str(one), str(two), "--draw", str(tmp_path / "d.mp4")], "2 videos are drawn into a folder"),
             ([str(one), "--draw", str(tmp_path / "d.flv")], "not written"),
             ([str(one), "--draw", str(one), "--overwrite"], "over the input video"),
             ([str(one), "--crops", str(tmp_path / "c")], "--crops makes aligned crops of images")]
    for argv, message in cases:
        assert detect.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "error:" in err, (argv, err)
    for argv, message in [([str(tmp_path / "in" / "still.png"), "--every", "2"], "--every is for videos"),
                          ([str(one), "--every", "0"], "--every must be >= 1")]:
        with pytest.raises(SystemExit) as exit_info:
            detect.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_images_and_videos_together_without_outputs(clip, tmp_path, capsys):
    path, decoded, expected = clip
    still = tmp_path / "still.png"
    Image.fromarray(decoded[0]).save(still)
    assert detect.main([str(still), path]) == 0
    out = capsys.readouterr().out
    assert f"{path}: {FRAMES} frames, {FRAMES} detected, {sum(map(len, expected))} faces" in out
    assert f"{still}: {len(expected[0])} faces" in out and "1 images," in out


def test_upright_turns_by_the_display_matrix():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3, 1).repeat(3, axis=2)
    assert upright(a, 0) is a
    np.testing.assert_array_equal(upright(a, 90)[..., 0], [[2, 5], [1, 4], [0, 3]])  # counterclockwise
    np.testing.assert_array_equal(upright(a, -90)[..., 0], [[3, 0], [4, 1], [5, 2]])
    np.testing.assert_array_equal(upright(a, 180)[..., 0], [[5, 4, 3], [2, 1, 0]])
