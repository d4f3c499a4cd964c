"""The detect CLI's front end (a stand-in cascade, so these run in seconds): a folder of every bad input
next to good images in every mode, output targets refused before any image is read, drawings that never
overwrite one another, results written as they come, one `error:` line for every bad flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mtcnn_jax import compiled, detect, detect_flags, images
from mtcnn_jax.align import align
from mtcnn_jax.detections_json import load_detections
from test_detect import FAKE_PARAMS, fake_bucket, png_header, rgb


class NoCompile:
    """compiled.CompileAhead's stand-in: nothing to compile for the fake cascade."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


@pytest.fixture
def fake_cascade(monkeypatch):
    """The cascade replaced by test_detect.fake_bucket (one face per image); returns its calls."""
    calls = []
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket(calls), raising=False)
    monkeypatch.setattr(compiled, "CompileAhead", NoCompile)
    monkeypatch.setattr(detect, "resolve_params", lambda weights: FAKE_PARAMS)
    return calls


def save(path, image: Image.Image, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def good_images(folder) -> dict[str, str | None]:
    """Images that must succeed, {path: the conversion noted}: RGB, grayscale, RGBA, palette with
    transparency, 16-bit, CMYK."""
    a = rgb(120, 150)
    pal = Image.fromarray(a).convert("P")
    pal.info["transparency"] = 0
    return {
        save(folder / "good.png", Image.fromarray(a)): None,
        save(folder / "sub" / "good.bmp", Image.fromarray(rgb(100, 130, seed=1))): None,
        save(folder / "gray.png", Image.fromarray(a[..., 0])): "L -> RGB",
        save(folder / "rgba.png", Image.fromarray(a).convert("RGBA")): "RGBA -> RGB (alpha on white)",
        save(folder / "pal.png", pal): "P -> RGB (alpha on white)",
        save(folder / "deep.png", Image.fromarray(a[..., 0].astype(np.uint16) * 257)): "I;16 -> RGB (16-bit scaled to 8)",
        save(folder / "cmyk.jpg", Image.fromarray(a).convert("CMYK"), quality=95): "CMYK -> RGB",
    }


def bad_images(folder, monkeypatch) -> dict[str, str]:
    """Inputs that must fail, {path: words of the error}."""
    (folder / "notes.jpg").write_text("not an image")
    cut = save(folder / "cut.jpg", Image.fromarray(rgb(150, 150)), quality=95)
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:2000])
    (folder / "bomb.png").write_bytes(png_header(14000, 14000))
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")
    locked = save(folder / "locked.png", Image.fromarray(rgb(100, 100)))
    if os.geteuid() != 0:
        os.chmod(locked, 0)
    else:  # root reads anything: its open is made to fail as a user's would
        real_open = Image.open
        monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (_ for _ in ()).throw(PermissionError(
            13, "Permission denied")) if str(fp) == locked else real_open(fp, *a, **k))
    save(folder / "tiny.png", Image.fromarray(rgb(8, 8)))
    (folder / "zz_link.png").symlink_to(folder / "good.png")  # the same file as good.png
    return {str(folder / "notes.jpg"): "not an image file", cut: "truncated",
            str(folder / "bomb.png"): "too large to decode safely", str(folder / "gone.jpg"): "broken symbolic link",
            locked: "cannot be read (Permission denied)", str(folder / "tiny.png"): "12-pixel window",
            str(folder / "zz_link.png"): f"the same file as {folder / 'good.png'} twice"}


def test_cli_processes_every_good_image_and_lists_every_failure(tmp_path, capsys, monkeypatch, fake_cascade):
    folder = tmp_path / "in"
    good = good_images(folder)
    bad = bad_images(folder, monkeypatch)
    (folder / "readme.txt").write_text("not an image suffix")
    (folder / "empty.jpg").mkdir()  # a folder with an image suffix: searched, holds nothing
    out = tmp_path / "out" / "faces.json"
    given_twice = str(folder / "good.png")
    code = detect.main([str(folder), given_twice, "--json", str(out), "--draw", str(tmp_path / "drawn")])
    captured = capsys.readouterr()
    assert code == 1
    result = json.loads(out.read_text())
    assert sorted(result) == sorted([*good, *bad])
    for path, converted in good.items():
        entry = result[path]
        assert len(entry["boxes"]) == 1 and entry["overflow"] == {"pnet": 0, "rnet": 0}
        assert entry.get("converted") == converted, path
        assert (tmp_path / "drawn" / os.path.relpath(path, folder)).with_suffix(
            ".jpg" if path.endswith(".jpg") else ".png").is_file()
    for path, words in bad.items():
        assert list(result[path]) == ["error"] and words in result[path]["error"], (path, result[path])
        assert f"error: {path}: " in captured.err
    assert f"error: {given_twice}: given twice; its results are under {given_twice}" in captured.err  # one entry
    assert "skipped 1 file without an image or video suffix" in captured.err and ".mp4" in captured.err and "readme.txt" in captured.err
    assert "Traceback" not in captured.err
    assert f"{len(good)} images, {len(good)} faces, {len(bad) + 1} errors" in captured.out
    evaluated = load_detections(out)  # the evaluators read it: a failed image found nothing
    assert all(len(evaluated[p]["boxes"]) == 0 for p in bad) and all(len(evaluated[p]["boxes"]) == 1 for p in good)


def test_cli_all_good_exits_0(tmp_path, capsys, fake_cascade):
    good = good_images(tmp_path)
    assert detect.main([str(tmp_path), "--strict"]) == 1  # converted modes are refused with --strict
    assert "strict" in capsys.readouterr().err
    assert detect.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert f"{len(good)} images, {len(good)} faces, 0 errors" in captured.out
    assert "1 face (0.15) [RGBA -> RGB (alpha on white)]" in captured.out


@pytest.fixture
def no_reading(monkeypatch, fake_cascade):
    """Fails the test if any image (or its header) is read."""
    fail = lambda *a, **k: pytest.fail("an image was read")  # noqa: E731
    monkeypatch.setattr(images, "load_converted", fail)
    monkeypatch.setattr(detect.buckets, "header_hw", fail)
    monkeypatch.setattr(detect, "resolve_params", fail)


def test_bad_output_targets_refused_before_any_image_is_read(tmp_path, capsys, no_reading):
    folder = tmp_path / "in"
    save(folder / "a.png", Image.fromarray(rgb(50, 50)))
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "old.json").write_text("{}")
    drawn = tmp_path / "drawn"
    save(drawn / "a.png", Image.fromarray(rgb(5, 5)))  # an earlier run's drawing
    cases = [(["--json", str(tmp_path)], "is a folder"),
             (["--json", str(tmp_path / "a_file" / "x.json")], "is a file, not a folder"),
             (["--json", str(tmp_path / "old.json")], "pass --overwrite"),
             (["--draw", str(tmp_path / "a_file")], "is a file"),
             (["--draw", str(tmp_path / "a_file" / "sub")], "is a file, not a folder"),
             (["--draw", str(drawn)], "would overwrite")]
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o500)
        cases.append((["--json", str(tmp_path / "ro" / "x.json")], "cannot write"))
    for flags, message in cases:
        assert detect.main([str(folder), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and err.startswith("python -m mtcnn_jax.detect: error:"), err
    assert (tmp_path / "old.json").read_text() == "{}" and Image.open(drawn / "a.png").size == (5, 5)


def test_overwrite_replaces(tmp_path, capsys, fake_cascade):
    save(tmp_path / "in" / "a.png", Image.fromarray(rgb(50, 60)))
    (tmp_path / "old.json").write_text("{}")
    save(tmp_path / "drawn" / "a.png", Image.fromarray(rgb(5, 5)))
    args = [str(tmp_path / "in"), "--json", str(tmp_path / "old.json"), "--draw", str(tmp_path / "drawn")]
    assert detect.main(args + ["--overwrite"]) == 0
    assert list(json.loads((tmp_path / "old.json").read_text())) == [str(tmp_path / "in" / "a.png")]
    assert Image.open(tmp_path / "drawn" / "a.png").size == (60, 50)


def test_same_names_drawn_apart(tmp_path, fake_cascade, capsys):
    inputs = [save(tmp_path / d / n, Image.fromarray(rgb(40, 40 + k))) for k, (d, n) in
              enumerate([("a", "x.jpg"), ("b", "x.jpg"), ("c", "x.png"), ("c", "x.bmp"), ("c", "X.PNG")])]
    assert detect.main([*inputs, "--draw", str(tmp_path / "drawn")]) == 0
    drawn = sorted(str(p.relative_to(tmp_path / "drawn")) for p in (tmp_path / "drawn").rglob("*.*"))
    assert drawn == ["a/x.jpg", "b/x.jpg", "c/X-3.PNG", "c/x-2.png", "c/x.png"]  # names compared without case
    widths = {p: Image.open(tmp_path / "drawn" / p).size[0] for p in drawn}
    assert widths == {"a/x.jpg": 40, "b/x.jpg": 41, "c/x.png": 42, "c/x-2.png": 43, "c/X-3.PNG": 44}


def test_workers_keep_the_order_results_and_warnings(tmp_path, monkeypatch, capsys):
    """Two or three images at once (the first one slowest, so later ones finish first) write the same JSON, in
    the same order, with each capacity warning once, as one at a time."""
    widths = [60, 70, 80, 90, 100]
    inputs = [save(tmp_path / "in" / f"{k}.png", Image.fromarray(rgb(50, w, seed=k))) for k, w in enumerate(widths)]
    bucket = fake_bucket([], overflow_for=80)

    def slow_first(params, images_BxHxWx3, sizes_Bx2, config):
        time.sleep(0.3 if sizes_Bx2[0, 1] == widths[0] else 0.0)
        return bucket(params, images_BxHxWx3, sizes_Bx2, config)

    monkeypatch.setattr(compiled, "detect_bucket", slow_first, raising=False)
    monkeypatch.setattr(compiled, "CompileAhead", NoCompile)
    monkeypatch.setattr(detect, "resolve_params", lambda weights: FAKE_PARAMS)
    written = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}.json"
        assert detect.main([*inputs, "--json", str(out), "--workers", str(workers), "--bucket-multiple", "64"]) == 0
        written[workers] = list(json.loads(out.read_text()).items())
        warned = [line for line in capsys.readouterr().err.splitlines() if "candidates dropped" in line]
        assert warned == [f"warning: {inputs[2]}: 7 candidates dropped at stage 'rnet' (capacity full); raise "
                          f"CascadeConfig.rnet_capacity (--rnet-capacity) to keep them"]
    assert [path for path, _ in written[1]] == inputs
    assert written[2] == written[1] and written[3] == written[1]


def test_json_valid_after_a_crash_mid_run(tmp_path, fake_cascade, monkeypatch, capsys):
    inputs = [save(tmp_path / "in" / f"{k}.png", Image.fromarray(rgb(40, 40, seed=k))) for k in range(5)]
    seen, load = [], images.load_converted

    def crash_at_third(source, name, strict):
        seen.append(name)
        if len(seen) == 3:
            raise error
        return load(source, name, strict=strict)

    monkeypatch.setattr(images, "load_converted", crash_at_third)
    for error, code in [(RuntimeError("disk on fire"), 1), (KeyboardInterrupt(), 130)]:
        seen.clear()
        out = tmp_path / f"{code}.json"
        assert detect.main([*inputs, "--json", str(out)]) == code
        assert sorted(json.loads(out.read_text())) == sorted(seen[:2])  # the two done before the crash
        assert "Traceback" not in capsys.readouterr().err


def test_a_failed_run_is_each_of_its_images_error(tmp_path, fake_cascade, monkeypatch, capsys):
    """The cascade raising on one image's bucket (e.g. out of memory): that image is an error in the JSON, the
    others are written, the exit code is 1."""
    inputs = [save(tmp_path / "in" / f"{k}.png", Image.fromarray(rgb(40, 40 + 30 * k, seed=k))) for k in range(3)]
    bucket = compiled.detect_bucket

    def fails_on_wide(params, images_BxHxWx3, sizes_Bx2, config):
        if sizes_Bx2[0, 1] == 70:
            raise MemoryError("out of memory allocating 9 GB")
        return bucket(params, images_BxHxWx3, sizes_Bx2, config)

    monkeypatch.setattr(compiled, "detect_bucket", fails_on_wide, raising=False)
    out = tmp_path / "out.json"
    assert detect.main([*inputs, "--json", str(out), "--bucket-multiple", "16"]) == 1
    written = json.loads(out.read_text())
    assert list(written) == inputs and len(written[inputs[0]]["boxes"]) == 1 and len(written[inputs[2]]["boxes"]) == 1
    assert written[inputs[1]] == {"error": f"{inputs[1]}: detection failed (MemoryError: out of memory allocating 9 GB); "
                                           "set MTCNN_JAX_TRACEBACK=1 and run it alone to see why"}
    err = capsys.readouterr().err
    assert f"error: {inputs[1]}: detection failed" in err and "Traceback" not in err


BAD_FLAGS = [
    (["--max-faces", "-1"], "--max-faces must be an integer >= 1"),
    (["--rnet-capacity", "0"], "--rnet-capacity must be an integer >= 1"),
    (["--pnet-capacity", "0"], "--pnet-capacity"), (["--window-capacity", "-5"], "--window-capacity"),
    (["--max-faces", "x"], "invalid int value"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--thresholds", "0.6", "0.7"], "expected 3 arguments"),
    (["--thresholds", "0.6", "nan", "0.7"], "--thresholds must be a tuple of 3 numbers in (0, 1]"),
    (["--thresholds", "0.6", "0.7", "1.5"], "--thresholds"), (["--thresholds", "0", "0.7", "0.7"], "--thresholds"),
    (["--thresholds", "0.6", "0.7", "inf"], "--thresholds"),
    (["--min-face-size", "0"], "--min-face-size must be a number > 0"), (["--min-face-size", "nan"], "--min-face-size"),
    (["--scale-factor", "1"], "--scale-factor must be a number in (0, 1)"), (["--scale-factor", "-0.5"], "--scale-factor"),
    (["--bucket-multiple", "-1"], "--bucket-multiple must be >= 0"),
    (["--workers", "0"], "--workers must be >= 1"),
    (["--workers", "2", "--redetect-every", "5"], "--redetect-every runs one batch at a time"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_flags_one_error_line(flags, message, tmp_path, capsys, no_reading):
    with pytest.raises(SystemExit) as exit_info:
        detect.main([str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]


def test_no_images_and_help(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert detect.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "skipped 1 file" in err and "error: no image files in" in err
    with pytest.raises(SystemExit):
        detect.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 20.0)", "(default: 0.709)", "(default: (0.6, 0.7, 0.7))", "(default: 512)",
                    "default: the original weights", "default: from the bucket's area", "default: 1 on CPU"):
        assert default in help_text, default
    assert '{"error": message}' in help_text
    assert "--no-mirror-landmarks" in help_text


def test_mirror_flag_reaches_the_config():
    parser = detect_flags.build_parser()
    assert detect_flags.config_from_args(parser, parser.parse_args(["x.jpg"])).mirror_landmarks is True
    args = parser.parse_args(["x.jpg", "--no-mirror-landmarks"])
    assert detect_flags.config_from_args(parser, args).mirror_landmarks is False


def test_subprocess_bad_flag_no_traceback(tmp_path):
    run = subprocess.run([sys.executable, "-m", "mtcnn_jax.detect", str(tmp_path), "--max-faces", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "python -m mtcnn_jax.detect: error: --max-faces must be an integer >= 1, got -1")


def test_crops_mirror_inputs_are_listed_and_never_overwritten(tmp_path, capsys, fake_cascade):
    inputs = [save(tmp_path / d / "x.jpg", Image.fromarray(rgb(60, 80, seed=k))) for k, d in enumerate("ab")]
    out, crops = tmp_path / "faces.json", tmp_path / "crops"
    assert detect.main([*inputs, "--json", str(out), "--crops", str(crops)]) == 0
    result = json.loads(out.read_text())
    for d, path in zip("ab", inputs):
        written = crops / d / "x_0.png"
        assert result[path]["crops"] == [str(written)] and Image.open(written).size == (112, 112)
        assert np.asarray(result[path]["crop_matrices"]).shape == (1, 2, 3)
    again = [*inputs, "--json", str(tmp_path / "again.json"), "--crops", str(crops)]
    assert detect.main(again) == 2 and "would overwrite" in capsys.readouterr().err
    assert not (tmp_path / "again.json").exists()
    assert detect.main([*again, "--overwrite", "--template", "facenet", "--crop-size", "64", "--margin", "8"]) == 0
    assert sorted(p.name for p in crops.rglob("*.png")) == ["x_0.png", "x_0.png"]
    assert Image.open(crops / "a" / "x_0.png").size == (64, 64)


def test_detect_batch_crops_equal_align(tmp_path, fake_cascade):
    image = rgb(60, 80)
    det, bad = detect.detect_batch([image, np.zeros((4, 4, 3), np.uint8)], crops="sphereface112x96")
    assert isinstance(bad, images.ImageError) and det.aligned.crops.shape == (1, 112, 96, 3)
    np.testing.assert_array_equal(det.aligned.crops, align(image, det, "sphereface112x96").crops)
    with pytest.raises(ValueError, match="unknown template"):
        detect.detect(image, crops="arcface")


@pytest.mark.parametrize("flags, message", [
    (["--template", "facenet"], "--template shape the aligned crops: add --crops"),
    (["--crops", "c", "--crop-size", "0"], "--crop-size must be >= 1"),
    (["--crops", "c", "--template", "facenet", "--margin", "200"], "--margin must be in [0, size)"),
    (["--crops", "c", "--template", "arcface"], "invalid choice"),
])
def test_bad_crop_flags_one_error_line(flags, message, tmp_path, capsys, no_reading):
    with pytest.raises(SystemExit) as exit_info:
        detect.main([str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
