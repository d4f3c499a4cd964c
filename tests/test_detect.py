"""detect.py and images.py: image loading, its conversions and errors, batching by bucket, overflow warnings,
params, the API's argument checks, the CLI end to end (the CLI's front end: test_detect_cli.py)."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import mtcnn_jax
from conftest import missing
from mtcnn_jax import buckets, compile_cache, compiled, detect, detect_files, detections, outputs
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.detect import CapacityWarning, Detections
from mtcnn_jax.images import ImageError, list_inputs, load_converted, load_image

def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- bad inputs

def _text_as_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("not an image at all")
    return str(p)


def _truncated_jpeg(tmp_path):
    p = tmp_path / "cut.jpg"
    Image.fromarray(rgb(200, 200)).save(p, quality=95)
    p.write_bytes(p.read_bytes()[:2000])
    return str(p)


def _png(tmp_path, name, img):
    p = tmp_path / name
    img.save(p)
    return str(p)


def _broken_link(tmp_path):
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    return str(tmp_path / "gone.jpg")


def _folder(tmp_path):
    (tmp_path / "folder.jpg").mkdir()
    return str(tmp_path / "folder.jpg")


def png_header(w: int, h: int) -> bytes:
    """A PNG that claims w x h RGB pixels and holds none: PIL's decompression-bomb check reads the header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _bomb(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header(14000, 14000))
    return str(tmp_path / "bomb.png")


# Refused always; those in CONVERTED_UNLESS_STRICT only with strict=True (else converted, below).
BAD_INPUTS = {
    "broken symlink": (_broken_link, "broken symbolic link"),
    "folder named .jpg": (_folder, "is a folder"),
    "14000x14000 png": (_bomb, "too large to decode safely"),
    "text file named .jpg": (_text_as_jpg, "not an image file"),
    "truncated jpeg": (_truncated_jpeg, "truncated"),
    "grayscale png": (lambda t: _png(t, "gray.png", Image.fromarray(rgb(40, 40)[..., 0])), "grayscale"),
    "rgba png": (lambda t: _png(t, "rgba.png", Image.fromarray(rgb(40, 40)).convert("RGBA")), "alpha"),
    "palette png": (lambda t: _png(t, "pal.png", Image.fromarray(rgb(40, 40)).convert("P")), "palette"),
    "16-bit png": (lambda t: _png(t, "deep.png", Image.fromarray(np.full((40, 40), 40000, np.uint16))), "16-bit"),
    "8x8 png": (lambda t: _png(t, "tiny.png", Image.fromarray(rgb(8, 8))), "12-pixel"),
    "missing file": (lambda t: str(t / "nope.jpg"), "no such file"),
    "empty array": (lambda t: np.zeros((0, 0, 3), np.uint8), "empty"),
    "float array with NaN": (lambda t: np.full((40, 40, 3), np.nan, np.float32), "NaN"),
    "float array": (lambda t: np.full((40, 40, 3), 0.5, np.float32), "uint8 0-255 expected"),
    "uint16 array": (lambda t: np.zeros((40, 40, 3), np.uint16), "16-bit"),
    "2-D array": (lambda t: np.zeros((40, 40), np.uint8), "grayscale"),
    "4-channel array": (lambda t: np.zeros((40, 40, 4), np.uint8), "RGBA"),
    "4-D array": (lambda t: np.zeros((2, 40, 40, 3), np.uint8), "4-D"),
    "grayscale PIL": (lambda t: Image.fromarray(rgb(40, 40)[..., 0]), "convert(\"RGB\")"),
    "not an image object": (lambda t: [[1, 2, 3]], "got a list"),
}


CONVERTED_UNLESS_STRICT = {"grayscale png", "rgba png", "palette png", "16-bit png", "uint16 array", "2-D array",
                           "4-channel array", "grayscale PIL"}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_image_error_naming_it(tmp_path, case):
    make, expected = BAD_INPUTS[case]
    source = make(tmp_path)
    for strict in (True,) if case in CONVERTED_UNLESS_STRICT else (True, False):
        with pytest.raises(ImageError) as info:
            load_image(source, None if isinstance(source, str) else "my_input", strict=strict)
        message = str(info.value)
        assert expected in message
        assert (source if isinstance(source, str) else "my_input") in message
        assert "\n" not in message and ";" in message  # one line: the problem, then what to do


def test_load_image_sources_agree_and_exif_orientation_applied(tmp_path):
    a = rgb(30, 50)
    path = tmp_path / "a.png"
    Image.fromarray(a).save(path)
    for source in (a, Image.fromarray(a), path, str(path)):
        np.testing.assert_array_equal(load_image(source), a)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: to be rotated 90 degrees clockwise for display
    jpg = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(jpg, exif=exif, quality=95)
    assert load_image(jpg).shape == (50, 30, 3)


def test_conversions_to_8bit_rgb_are_noted(tmp_path):
    a = rgb(30, 40)
    gray = a[..., 0]
    alpha = np.tile(np.array([0, 128, 255], np.uint8), (30, 14))[:, :40]
    rgba = np.dstack([a, alpha])
    white = lambda c, al: ((c.astype(np.uint32) * al + 255 * (255 - al.astype(np.uint32)) + 127) // 255).astype(np.uint8)  # noqa: E731
    on_white = white(a, alpha[..., None])
    deep = (gray.astype(np.uint16) * 257)  # 16-bit with the same 8-bit values
    cases = {  # source: (expected pixels, words of the note)
        "L": (Image.fromarray(gray), np.dstack([gray] * 3), "L -> RGB"),
        "1": (Image.fromarray(gray > 127), np.dstack([np.where(gray > 127, 255, 0).astype(np.uint8)] * 3), "1 -> RGB"),
        "LA": (Image.fromarray(np.dstack([gray, alpha]), "LA"), np.dstack([white(gray, alpha)] * 3), "LA -> RGB (alpha on white)"),
        "RGBA": (Image.fromarray(rgba, "RGBA"), on_white, "RGBA -> RGB (alpha on white)"),
        "I;16": (Image.fromarray(deep), np.dstack([gray] * 3), "I;16 -> RGB (16-bit scaled to 8)"),
        "CMYK": (Image.fromarray(a).convert("CMYK"), None, "CMYK -> RGB"),
        "2-D": (gray, np.dstack([gray] * 3), "(30, 40) -> RGB (grayscale)"),
        "HxWx1": (gray[..., None], np.dstack([gray] * 3), "grayscale"),
        "HxWx4": (rgba, on_white, "alpha on white"),
        "uint16": (a.astype(np.uint16) * 257, a, "uint16 array of shape (30, 40, 3) -> RGB (16-bit scaled to 8)"),
    }
    for mode, (source, expected, note) in cases.items():
        pixels, converted = load_converted(source)
        assert pixels.dtype == np.uint8 and pixels.shape == (30, 40, 3), mode
        assert note in converted, (mode, converted)
        if expected is not None:
            np.testing.assert_array_equal(pixels, expected, err_msg=mode)
    assert load_converted(a)[1] is None and load_converted(Image.fromarray(a))[1] is None
    # palette with a transparent entry, saved and read back: the transparent pixels become white
    pal = Image.fromarray(a).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    pal.save(tmp_path / "pal.png")
    pixels, converted = load_converted(tmp_path / "pal.png")
    assert converted == "P -> RGB (alpha on white)" and (pixels[0, 0] == 255).all()
    assert load_converted(Image.fromarray(a).convert("P"))[1] == "P -> RGB"
    with pytest.raises(ImageError, match="float"):
        load_converted(Image.fromarray(gray.astype(np.float32)))


def test_lazy_pil_images_that_fail_to_decode_are_image_errors(tmp_path):
    lazy = Image.open(_truncated_jpeg(tmp_path))  # opened, not decoded: decoding fails in load_image
    with pytest.raises(ImageError, match="images\\[1\\]: could not be decoded"):
        load_image(lazy, "images[1]")


def test_decompression_bomb_limit_is_pils(tmp_path, monkeypatch):
    Image.fromarray(rgb(120, 120)).save(tmp_path / "big.png")  # 14400 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10000)  # PIL warns above 10000, raises above 20000
    with pytest.raises(ImageError, match="too large to decode safely.*MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    assert load_image(tmp_path / "big.png").shape == (120, 120, 3)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    Image.fromarray(rgb(20, 20)).save(path)
    if os.geteuid() != 0:  # root reads anything: there the open is made to fail as it would
        path.chmod(0)
    else:
        monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(ImageError, match="locked.png: cannot be read \\(Permission denied\\)"):
        load_image(path)


# ---------------------------------------------------------------------------------------------- fake cascade

def fake_bucket(calls, overflow_for=None):
    """A stand-in for compiled.detect_bucket: per image one face at its top-left quarter, score from its width."""

    def run(params, images_BxHxWx3, sizes_Bx2, config):
        B, Hb, Wb, _ = images_BxHxWx3.shape
        calls.append((B, Hb, Wb))
        assert (Hb, Wb) == buckets.bucket_shape(Hb, Wb, config)  # a bucket of the ladder
        assert (sizes_Bx2 >= 12).all() and (sizes_Bx2[:, 0] <= Hb).all() and (sizes_Bx2[:, 1] <= Wb).all()
        F = 3
        boxes = np.zeros((B, F, 4), np.float32)
        boxes[:, 0, 2], boxes[:, 0, 3] = sizes_Bx2[:, 1] / 2, sizes_Bx2[:, 0] / 2
        scores = np.zeros((B, F), np.float32)
        scores[:, 0] = sizes_Bx2[:, 1] / 1000
        valid = np.zeros((B, F), bool)
        valid[:, 0] = images_BxHxWx3.reshape(B, -1).max(axis=1) > 0  # a black image has no face
        landmarks = np.broadcast_to(np.arange(10, dtype=np.float32).reshape(5, 2), (B, F, 5, 2)).copy()
        rnet = np.zeros(B, np.int32)
        if overflow_for is not None:
            rnet[:] = [7 if w == overflow_for else 0 for w in sizes_Bx2[:, 1]]
        return {"boxes": boxes, "scores": scores, "landmarks": landmarks, "valid": valid,
                "overflow": {"pnet": np.zeros(B, np.int32), "rnet": rnet}}

    return run


FAKE_PARAMS = {"pnet": {}, "rnet": {}, "onet": {}}


def test_detect_batch_keeps_going_past_a_bad_image(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket(calls), raising=False)
    images = [rgb(40, 50), rgb(8, 8), rgb(100, 70), np.zeros((20, 30, 3), np.float32), rgb(45, 60)]
    out = detect.detect_batch(images, FAKE_PARAMS, batch_size=4)
    assert [type(r).__name__ for r in out] == ["Detections", "ImageError", "Detections", "ImageError", "Detections"]
    assert "images[1]" in str(out[1]) and "images[3]" in str(out[3])
    for r, (h, w) in zip([out[0], out[2], out[4]], [(40, 50), (100, 70), (45, 60)]):
        np.testing.assert_allclose(r.boxes, [[0, 0, w / 2, h / 2]])
        np.testing.assert_allclose(r.scores, [w / 1000])
        assert r.landmarks.shape == (1, 5, 2) and r.overflow == {"pnet": 0, "rnet": 0}
    # the three share the 128x128 bucket: a batch of 2, then 1 (no padded slots)
    assert calls == [(2, 128, 128), (1, 128, 128)]


def test_batches_use_fixed_sizes(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket(calls), raising=False)
    out = detect.detect_batch([rgb(30 + i, 40) for i in range(11)], FAKE_PARAMS, batch_size=4)
    assert len(out) == 11 and all(isinstance(r, Detections) for r in out)
    assert calls == [(4, 128, 128)] * 2 + [(2, 128, 128), (1, 128, 128)]  # 11 = 4 + 4 + 2 + 1
    assert [float(r.boxes[0, 3]) for r in out] == [(30 + i) / 2 for i in range(11)]


def test_no_face_gives_empty_arrays_of_the_right_shapes(monkeypatch):
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket([]), raising=False)
    det = detect.detect(np.zeros((40, 40, 3), np.uint8), FAKE_PARAMS)
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.landmarks.shape == (0, 5, 2)
    assert len(det) == 0 and det.to_json() == {"boxes": [], "landmarks": [], "overflow": {"pnet": 0, "rnet": 0}}


def test_overflow_warns_naming_image_and_stage(monkeypatch):
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket([], overflow_for=70), raising=False)
    with pytest.warns(CapacityWarning, match=r"images\[1\]: 7 candidates dropped at stage 'rnet'") as record:
        out = detect.detect_batch([rgb(40, 50), rgb(40, 70)], FAKE_PARAMS)
    assert len(record) == 1 and "raise CascadeConfig.rnet_capacity (--rnet-capacity)" in str(record[0].message)
    assert out[1].overflow == {"pnet": 0, "rnet": 7} and out[0].overflow == {"pnet": 0, "rnet": 0}


def test_image_smaller_than_min_face_size_needs_no_run(monkeypatch):
    calls = []
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket(calls), raising=False)
    det = detect.detect(rgb(30, 30), FAKE_PARAMS, min_face_size=40)
    assert len(det) == 0 and det.boxes.shape == (0, 4) and calls == []


def test_to_json_format():
    det = Detections(np.array([[1, 2, 3, 4]], np.float32), np.array([0.5], np.float32),
                     np.arange(10, dtype=np.float32).reshape(1, 5, 2))
    assert det.to_json() == {"boxes": [[1, 2, 3, 4, 0.5]], "landmarks": [[[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]],
                             "overflow": {}}
    noted = Detections(det.boxes, det.scores, det.landmarks, {"rnet": 3}, "L -> RGB")
    assert noted.to_json() == det.to_json() | {"overflow": {"rnet": 3}, "converted": "L -> RGB"}
    json.dumps(noted.to_json())


def test_batch_names_conversions_and_strict(monkeypatch, tmp_path):
    monkeypatch.setattr(compiled, "detect_bucket", fake_bucket([], overflow_for=70), raising=False)
    gray = rgb(40, 70)[..., 0]
    with pytest.warns(CapacityWarning, match=r"^gray\.png: 7 candidates"):
        out = detect.detect_batch([gray, rgb(40, 50)], FAKE_PARAMS, names=["gray.png", "colour.png"])
    assert out[0].converted == "uint8 array of shape (40, 70) -> RGB (grayscale)" and out[1].converted is None
    strict = detect.detect_batch([gray, rgb(40, 50)], FAKE_PARAMS, names=["gray.png", "b"], strict=True)
    assert isinstance(strict[0], ImageError) and str(strict[0]).startswith("gray.png: grayscale")
    with pytest.raises(ImageError, match="^mine: grayscale"):
        detect.detect(gray, FAKE_PARAMS, name="mine", strict=True)
    assert detect.detect(gray[:, :50], FAKE_PARAMS).converted.endswith("(grayscale)")
    with pytest.raises(ValueError, match="names"):
        detect.detect_batch([gray], FAKE_PARAMS, names=["a", "b"])
    lazy = Image.open(_truncated_jpeg(tmp_path))
    out = detect.detect_batch([rgb(40, 50), lazy], FAKE_PARAMS)
    assert isinstance(out[0], Detections) and isinstance(out[1], ImageError) and "images[1]" in str(out[1])


@pytest.mark.parametrize("keywords, message", [
    ({"min_face_size": float("nan")}, "min_face_size"), ({"min_face_size": 0}, "min_face_size"),
    ({"scale_factor": 1.0}, "scale_factor"), ({"scale_factor": float("inf")}, "scale_factor"),
    ({"thresholds": (0.6, 0.7)}, "thresholds"), ({"thresholds": (0.6, float("nan"), 0.7)}, "thresholds"),
    ({"thresholds": (0.6, 0.7, 1.5)}, "thresholds"), ({"thresholds": (0, 0.7, 0.7)}, "thresholds"),
    ({"batch_size": 0}, "batch_size")])
def test_api_keywords_checked_before_any_work(keywords, message):
    with pytest.raises(ValueError, match=message):
        detect.detect_batch([rgb(40, 40)], {"not": "params"}, **keywords)
    if "batch_size" not in keywords:
        with pytest.raises(ValueError, match=message):
            detect.detect(rgb(40, 40), {"not": "params"}, **keywords)


@pytest.mark.parametrize("field, value", [("max_faces", -1), ("rnet_capacity", 0), ("pnet_capacity", 0),
                                          ("window_capacity", 0), ("net_chunk", 0), ("bucket_multiple", -1),
                                          ("nms_rnet", 0.0), ("max_faces", 1.5), ("mirror_landmarks", "yes")])
def test_config_fields_checked(field, value):
    with pytest.raises(ValueError, match=field):
        CascadeConfig(**{field: value})


def test_config_and_keywords_are_exclusive():
    assert detect.make_config(None, 40, 0.8, (0.5, 0.5, 0.3)) == CascadeConfig(40.0, 0.8, (0.5, 0.5, 0.3))
    cfg = CascadeConfig(max_faces=16)
    assert detect.make_config(cfg, 20, 0.709, (0.6, 0.7, 0.7)) is cfg
    with pytest.raises(ValueError, match="min_face_size"):
        detect.make_config(cfg, 40, 0.709, (0.6, 0.7, 0.7))


# ---------------------------------------------------------------------------------------------- params

def test_resolve_params_from_checkpoint_dict_and_default(tmp_path):
    from mtcnn_jax.checkpoints import save_cascade

    pretrained = mtcnn_jax.load_pretrained()
    save_cascade(tmp_path / "ckpt", pretrained)
    for resolved in (detect.resolve_params(tmp_path / "ckpt"), detect.resolve_params(str(tmp_path / "ckpt")),
                     detect.resolve_params(None), detect.resolve_params(pretrained)):
        assert sorted(resolved) == ["onet", "pnet", "rnet"]
        np.testing.assert_array_equal(resolved["onet"]["cls"]["kernel"], pretrained["onet"]["cls"]["kernel"])
    assert detect.resolve_params(None) is detect.resolve_params(None)  # loaded once
    with pytest.raises(ValueError, match="missing"):
        detect.resolve_params({"pnet": {}, "rnet": {}})
    with pytest.raises(FileNotFoundError):
        detect.resolve_params(tmp_path / "absent")


# ---------------------------------------------------------------------------------------------- drawing

def test_drawing(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from mtcnn_jax.annotate import annotate_image
    from mtcnn_jax.visualize import draw_detections

    img = np.full((60, 80, 3), 128, np.uint8)
    det = Detections(np.array([[10, 10, 40, 50]], np.float32), np.array([0.9], np.float32),
                     np.full((1, 5, 2), 20, np.float32))
    out = annotate_image(img, det)
    assert out.size == (80, 60) and (np.asarray(out) != img).any()
    assert (np.asarray(annotate_image(img, detect.empty_detections({}))) == img).all()
    fig = draw_detections(img, det, path=tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0 and len(fig.axes[0].patches) == 1
    fig2 = draw_detections(img, np.array([[10, 10, 40, 50, 0.8]]))
    assert fig2.axes[0].texts[0].get_text() == "0.80"


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def reference(shared_data):
    folder = shared_data / "reference"
    if not folder.is_dir():
        missing(f"no reference photos at {folder}")
    return folder


def test_end_to_end_batch_with_bad_image_and_flat_grey(reference):
    # a 180x240 crop around the face: the 192x256 bucket of no-faces.jpg, so the CLI test reuses the compile
    face = load_image(reference / "ivan.jpg")[40:220, 200:440]
    grey = np.full(face.shape, 128, np.uint8)
    out = detect.detect_batch([face, np.zeros((5, 5, 3), np.uint8), grey], batch_size=2)
    assert isinstance(out[1], ImageError) and "images[1]" in str(out[1])
    assert len(out[0]) >= 1 and out[0].scores[0] > 0.9 and (np.diff(out[0].scores) <= 0).all()
    assert out[0].landmarks.shape == (len(out[0]), 5, 2)
    x1, y1, x2, y2 = out[0].boxes[0]
    assert (x1 <= out[0].landmarks[0, :, 0]).all() and (out[0].landmarks[0, :, 0] <= x2).all()
    assert out[2].boxes.shape == (0, 4) and out[2].scores.shape == (0,) and out[2].landmarks.shape == (0, 5, 2)
    single = detect.detect(face)  # batch of 1 against the padded batch of 2
    np.testing.assert_allclose(single.boxes, out[0].boxes, atol=1e-2)
    np.testing.assert_allclose(single.scores, out[0].scores, atol=1e-4)


def test_a_small_image_runs_in_a_larger_bucket_when_that_spares_a_compile(reference, tmp_path, monkeypatch):
    """detect_batch runs a 120x120 crop in the 256x256 bucket of the other image (no compile of 128x128),
    with the faces it has in its own bucket."""
    big = np.asarray(Image.open(reference / "ivan.jpg").convert("RGB").resize((250, 250)))
    small = big[:120, 80:200]  # the face
    ran = []
    run = compiled.detect_bucket
    monkeypatch.setattr(compiled, "detect_bucket", lambda params, images, sizes, config, upto="onet":
                        ran.append(images.shape[1:3]) or run(params, images, sizes, config, upto))
    before = compile_cache._state.copy()
    try:
        compile_cache.configure(tmp_path)  # nothing stored yet; a min_face_size no other test compiles
        merged = detect.detect_batch([small, big], min_face_size=23)
        assert ran == [(256, 256), (256, 256)]
        params, cfg = detect.resolve_params(None), detect.make_config(None, 23, detect.SCALE_FACTOR, detect.THRESHOLDS)
        assert compiled.is_compiled(params, (256, 256), 1, cfg) and not compiled.is_compiled(params, (128, 128), 1, cfg)
        alone = detections.detect_loaded([small], ["small"], params, cfg, merged={})[0]
        assert ran[-1] == (128, 128)
    finally:
        compile_cache.configure(before.get("folder", "default"))
    assert len(alone) >= 1 and alone.scores[0] > 0.9
    np.testing.assert_allclose(merged[0].boxes, alone.boxes, atol=1e-3)
    np.testing.assert_allclose(merged[0].scores, alone.scores, atol=1e-5)
    np.testing.assert_allclose(merged[0].landmarks, alone.landmarks, atol=1e-3)


def run_cli(inputs: list[str], tmp_path, capsys) -> tuple[int, dict, str, str]:
    out_json = tmp_path / "out.json"
    code = detect.main([*inputs, "--json", str(out_json), "--draw", str(tmp_path / "drawn")])
    captured = capsys.readouterr()
    return code, json.loads(out_json.read_text()), captured.out, captured.err


def check_cli_json(result: dict) -> None:
    for entry in result.values():
        assert all(len(b) == 5 for b in entry["boxes"])
        assert np.asarray(entry["landmarks"]).reshape(-1, 5, 2).shape[0] == len(entry["boxes"])


def test_cli_end_to_end(reference, tmp_path, capsys):
    more = tmp_path / "more"
    (more / "sub").mkdir(parents=True)
    (more / "broken.jpg").write_text("not a jpeg")
    Image.fromarray(np.full((150, 200, 3), 128, np.uint8)).save(more / "sub" / "grey.bmp")
    (more / "notes.txt").write_text("not an image suffix: never read")
    inputs = [str(reference / "ivan.jpg"), str(reference / "no-faces.jpg"), str(more)]
    code, result, out, err = run_cli(inputs, tmp_path, capsys)
    assert code == 1  # broken.jpg failed; the others were processed
    broken = os.path.join(str(more), "broken.jpg")
    assert sorted(result) == sorted(inputs[:2] + [os.path.join(str(more), "sub", "grey.bmp"), broken])
    assert "not an image" in result.pop(broken)["error"]
    check_cli_json(result)
    assert len(result[inputs[0]]["boxes"]) >= 1 and result[inputs[1]]["boxes"] == []
    assert result[inputs[0]]["overflow"] == {"window": 0, "pnet": 0, "rnet": 0, "faces": 0}
    assert "broken.jpg" in err and "not an image" in err and "skipped 1 file" in err and "notes.txt" in err
    assert "3 images" in out and "1 errors" in out
    drawn = tmp_path / "drawn"  # mirrors the inputs below their deepest common folder
    mirrored = [drawn / p for p in outputs.relative_paths([inputs[0], inputs[1], os.path.join(more, "sub", "grey.png")])]
    assert sorted(drawn.rglob("*.*")) == sorted(mirrored)
    assert Image.open(mirrored[0]).size == Image.open(reference / "ivan.jpg").size


def test_cli_whole_reference_folder(reference, tmp_path, capsys):
    code, result, out, err = run_cli([str(reference)], tmp_path, capsys)
    photos = sorted(p.name for p in reference.iterdir() if p.suffix == ".jpg")
    assert code == 0 and sorted(result) == [os.path.join(str(reference), n) for n in photos]
    check_cli_json(result)
    assert f"{len(photos)} images" in out and "0 errors" in out
    assert sorted(p.name for p in (tmp_path / "drawn").iterdir()) == photos
    assert detect.main([str(reference), "--json", str(tmp_path / "out.json")]) == 2  # exists: not overwritten
    assert "--overwrite" in capsys.readouterr().err


def test_cli_all_inputs_failing_exits_1(tmp_path, capsys):
    (tmp_path / "broken.jpg").write_text("nope")
    assert detect.main([str(tmp_path / "broken.jpg"), str(tmp_path / "missing.png")]) == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "missing.png" in captured.err and "2 errors" in captured.out


def test_cli_bucket_multiple_and_capacities_reach_the_config(tmp_path, monkeypatch, capsys):
    Image.fromarray(np.full((150, 200, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    seen = []
    monkeypatch.setattr(detect, "resolve_params", lambda weights: {})
    monkeypatch.setattr(detections, "detect_loaded", lambda images, names, params, cfg, batch, notes, warn, merged:
                        seen.append(cfg) or
                        [detect.empty_detections({}) for _ in images])
    assert detect.main([str(tmp_path / "grey.png"), "--bucket-multiple", "256"]) == 0
    assert seen[0].bucket_multiple == 256 and seen[0].min_face_size == 20
    assert (seen[0].window_capacity, seen[0].pnet_capacity, seen[0].rnet_capacity) == (None, None, 512)
    assert detect.main([str(tmp_path / "grey.png"), "--window-capacity", "40000", "--pnet-capacity", "8192",
                        "--rnet-capacity", "1024", "--max-faces", "600"]) == 0
    assert (seen[1].window_capacity, seen[1].pnet_capacity, seen[1].rnet_capacity, seen[1].max_faces) == (
        40000, 8192, 1024, 600)
    for flags, message in [(["--rnet-capacity", "1000"], "--rnet-capacity must be a multiple of net_chunk"),
                           (["--bucket-multiple", "-1"], "--bucket-multiple must be >= 0")]:
        with pytest.raises(SystemExit) as exit_info:
            detect.main([str(tmp_path / "grey.png"), *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_cli_work_order_plans_buckets_from_headers_and_keeps_every_file(tmp_path, monkeypatch):
    """The CLI's plan: planned batches by bucket from the headers (a small bucket merged into a larger one
    when that spares a compile), then the files no bucket was planned for (unreadable, too small for a
    face); every file exactly once."""
    sizes = {"a.png": (480, 640), "b.png": (100, 100), "c.png": (470, 700), "d.png": (900, 90), "tiny.png": (8, 8)}
    for name, (h, w) in sizes.items():
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "bad.jpg").write_text("not an image")
    files, skipped = list_inputs([str(tmp_path)])
    names = [os.path.relpath(f, tmp_path) for f in files]
    assert skipped == []
    monkeypatch.setattr(compiled, "is_compiled", lambda *args: False)
    work = detect_files._work_order(files, FAKE_PARAMS, CascadeConfig(), batch_size=2)
    # b's 128x128 fits d's 1024x128 with 114,688 pixels more (a's 512x768: 376,832), under buckets.MERGE_PIXELS
    assert work.merged == {(128, 128): (1024, 128)}
    assert [(bucket, [names[i] for i in chunk]) for bucket, chunk in work.batches] == [
        ((512, 768), ["a.png", "c.png"]), ((1024, 128), ["b.png", "d.png"])]
    assert sorted(i for chunk in work.chunks for i in chunk) == list(range(len(files)))
    assert [names[i] for i in work.chunks[-1]] == ["bad.jpg", "tiny.png"]
    monkeypatch.setattr(compiled, "is_compiled", lambda params, bucket, batch, config: bucket == (128, 128))
    assert detect_files._work_order(files, FAKE_PARAMS, CascadeConfig(), batch_size=2).merged == {}  # nothing to spare


def test_detect_batch_refuses_one_image():
    for one in ("x.jpg", Path("x.jpg"), Image.fromarray(rgb(20, 20)), rgb(20, 20), rgb(20, 20)[..., 0]):
        with pytest.raises(TypeError, match="use detect"):
            detect.detect_batch(one, FAKE_PARAMS)


def test_cli_refuses_bad_output_paths_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(detect, "resolve_params", lambda weights: pytest.fail("work started"))
    (tmp_path / "a_file.png").write_text("x")
    cases = [(["--json", str(tmp_path)], "is a folder"), (["--draw", str(tmp_path / "a_file.png")], "is a file")]
    for flags, message in cases:
        assert detect.main([str(tmp_path), *flags]) == 2
        assert message in capsys.readouterr().err
