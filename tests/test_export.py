"""The exported detector (`mtcnn_jax.export`): run.py in a fresh process that cannot import mtcnn_jax gives
`detect`'s faces on the reference photos padded into its bucket; the plan computed inside the exported graph
equals `pyramid.image_plan`; the ONNX nets equal ours under onnxruntime; bad flags are one error line."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import missing
from mtcnn_jax import checkpoints, detect, export, export_runner, nets
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.pyramid import PyramidPlan, image_plan
from mtcnn_jax.stages import INPUT_SIZE

ort = pytest.importorskip("onnxruntime", reason="onnxruntime (the onnx extra) runs the exported nets")
logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # jax2onnx's notes on unused shape values

BUCKET, BATCH = (2048, 2048), 2  # holds every reference photo; batch 2 pads the last batch with a copy
# Runs a script with mtcnn_jax unimportable, and fails if anything imported it anyway.
NO_PACKAGE = """\
import runpy, sys
sys.modules["mtcnn_jax"] = None
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    assert sys.modules["mtcnn_jax"] is None and not [m for m in sys.modules if m.startswith("mtcnn_jax.")]
"""


@pytest.fixture(scope="module")
def reference(shared_data) -> list[str]:
    photos = sorted(str(p) for p in (shared_data / "reference").glob("*.jpg"))
    if len(photos) < 7:
        missing(f"the reference photos are not in {shared_data / 'reference'}")
    return photos


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, original_weights) -> Path:
    """The CLI's export of the 2048x2048 bucket at batch 2 for CPU and CUDA, with the ONNX nets."""
    out = tmp_path_factory.mktemp("export") / "detector"
    assert export.main(["--bucket", "2048x2048", "--batch", str(BATCH), "--out", str(out), "--platforms", "cpu,cuda",
                        "--onnx"]) == 0
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, reference) -> dict[str, list[str]]:
    """The reference photos, a grayscale copy of one (converted), a 15x15 image (no pyramid level), and two
    that run.py refuses: wider than the bucket, and not an image."""
    folder = tmp_path_factory.mktemp("inputs")
    gray, tiny, wide, broken = (str(folder / n) for n in ("gray.png", "tiny.png", "wide.png", "broken.jpg"))
    Image.open(reference[1]).convert("L").save(gray)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (15, 15, 3), dtype=np.uint8)).save(tiny)
    Image.new("RGB", (BUCKET[1] + 1, 16)).save(wide)
    Path(broken).write_bytes(b"not a JPEG")
    return {"good": [*reference, gray, tiny], "refused": [wide, broken]}


def test_run_py_without_the_package_equals_detect(artifact, inputs, tmp_path):
    assert {p.name for p in artifact.iterdir()} == {*export.FILES.values(), *export.ONNX_FILES}
    assert json.loads((artifact / "manifest.json").read_text())["onnx"] and "pnet.onnx" in (
        artifact / "README.txt").read_text()
    script = tmp_path / "no_package.py"
    script.write_text(NO_PACKAGE)
    paths = [*inputs["good"][:3], *inputs["refused"], *inputs["good"][3:]]  # 9 good: the last batch is padded
    run = subprocess.Popen([sys.executable, str(script), str(artifact / "run.py"), *paths], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    expected = detect.detect_batch(inputs["good"])  # meanwhile, the package's own detection of the same files
    out, err = run.communicate(timeout=600)
    assert run.returncode == 1, err  # the two refused images
    got = json.loads(out)
    assert sorted(got) == sorted(paths)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "larger than this export's bucket 2048x2048" in errors[0], err
    assert all(set(got[p]) == {"error"} for p in inputs["refused"])
    assert "Traceback" not in err and err.splitlines()[-1] == "9 images, 13 faces, 2 errors"
    for path, det in zip(inputs["good"], expected):
        want, have = det.to_json(), got[path]
        assert set(have) == set(want) and have["overflow"] == want["overflow"] and have.get("converted") == want.get(
            "converted"), path
        boxes, want_boxes = np.array(have["boxes"]).reshape(-1, 5), np.array(want["boxes"]).reshape(-1, 5)
        assert len(boxes) == len(want_boxes), path
        np.testing.assert_allclose(boxes[:, :4], want_boxes[:, :4], atol=1e-3, err_msg=path)
        np.testing.assert_allclose(boxes[:, 4], want_boxes[:, 4], atol=1e-5, err_msg=path)
        np.testing.assert_allclose(np.array(have["landmarks"]), np.array(want["landmarks"]), atol=1e-3, err_msg=path)
    assert got[inputs["good"][-2]]["converted"] == "L -> RGB" and got[inputs["good"][-1]]["overflow"] == {}


def test_the_plan_inside_the_graph_is_image_plan():
    config, bucket = CascadeConfig(), (384, 512)
    plan = PyramidPlan.of(*bucket, config)
    rng = np.random.default_rng(1)
    sizes = np.concatenate([[[12, 12], [19, 400], [20, 20], [21, 29], list(bucket), [384, 12]],
                            rng.integers(12, np.array(bucket) + 1, (26, 2))]).astype(np.int32)
    level_hw, level_on, taps = jax.jit(lambda s, c: export.traced_image_plan(s, c, plan))(
        sizes, export.plan_constants(bucket, config))
    want_hw, want_on, want_taps = image_plan(sizes, bucket, config)
    np.testing.assert_array_equal(level_hw, want_hw)
    np.testing.assert_array_equal(level_on, want_on)
    assert not level_on[0].any() and level_on[2, 0] and not level_on[2, 1:].any()  # 12 px: no level; 20 px: one
    edge = np.spacing(np.float32(max(bucket)))  # float32 rounding of the sample edges, in source pixels
    for got, want in zip(taps, want_taps):
        if want.dtype.kind == "i":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=edge)


def test_params_flatten_and_back(original_weights):
    flat = export.flat_params(original_weights)
    assert "onet/conv1/conv/kernel" in flat and len(flat) == len(jax.tree_util.tree_leaves(original_weights))
    back = export.nested_params(flat)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(original_weights)


def _outputs(session, x: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": x})))


def test_onnx_nets_equal_ours(artifact, original_weights, reference):
    rng = np.random.default_rng(2)
    photo = Image.open(reference[1])  # ivan.jpg: one face
    face = photo.crop((271, 93, 333, 155))  # around its face, found at (277, 93, 327, 155)
    for stage in ("pnet", "rnet", "onet"):
        session = ort.InferenceSession(str(artifact / f"{stage}.onnx"), providers=["CPUExecutionProvider"])
        side = INPUT_SIZE[stage]
        sizes = [(12, 12), (13, 13), (31, 24), (57, 40)] if stage == "pnet" else [(side, side)]
        batches = [rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8) for h, w in sizes]
        real = photo.resize((141, 139)) if stage == "pnet" else face.resize((side, side), Image.BILINEAR)
        for images in [*batches, np.asarray(real)[None]]:
            x = np.asarray(nets.normalize(images))
            got, want = _outputs(session, x), nets.NETS[stage](original_weights[stage], x)
            assert list(got) == list(want)
            for name in want:
                np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=0, atol=1e-4, err_msg=stage)
        if stage != "pnet":
            assert nets.face_probability(got["logits"])[0] > 0.9  # the real crop is a face


def test_runner_stands_alone():
    tree = ast.parse(Path(export_runner.__file__).read_text())
    imported = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert imported <= {"__future__", "argparse", "json", "sys", "warnings", "pathlib", "typing", "jax", "numpy", "PIL"}


def _main(argv: list[str]) -> int:
    try:
        return export.main(argv)
    except SystemExit as stop:  # argparse's errors
        return stop.code


@pytest.mark.parametrize("flags, message", [
    (["--bucket", "0x5"], "each side must be 12 to 8192 pixels"),
    (["--bucket", "640"], "expected HEIGHTxWIDTH"),
    (["--bucket", "16x640"], "holds no face of 20 px"),
    (["--batch", "0"], "--batch must be >= 1, got 0"),
    (["--platforms", "cpu,metal"], "unknown platform metal"),
    (["--weights", "/nonexistent/checkpoint"], "--weights /nonexistent/checkpoint: no such folder"),
])
def test_bad_flags_one_error_line(flags, message, tmp_path, capsys):
    base = {"--bucket": "64x64", "--batch": "1", "--out": str(tmp_path / "out")}
    base |= dict(zip(flags[::2], flags[1::2]))
    assert _main([x for kv in base.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [err.splitlines()[-1]]
    assert not (tmp_path / "out").exists()


def test_checkpoint_weights_and_existing_out_needs_overwrite(tmp_path, capsys, original_weights):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "pnet.onnx").write_text("an earlier export's")
    checkpoint = checkpoints.save_cascade(tmp_path / "cascade", original_weights)  # as mtcnn-checkpoints writes it
    flags = ["--bucket", "64x48", "--batch", "1", "--out", str(out), "--weights", str(checkpoint)]
    assert _main(flags) == 2
    assert "exists and is not empty; add --overwrite" in capsys.readouterr().err
    assert _main([*flags, "--overwrite"]) == 0
    names = {p.name for p in out.iterdir()}
    assert names == {*export.FILES.values(), "notes.txt"}  # the stale ONNX net is gone, the user's file kept
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bucket"] == [64, 48] and manifest["batch"] == 1 and manifest["platforms"] == ["cpu"]
    assert manifest["weights"] == f"the checkpoint {checkpoint}"
    with np.load(out / "weights.npz") as saved:
        want = export.flat_params(original_weights)
        assert set(saved) == set(want) and all(np.array_equal(saved[k], want[k]) for k in want)
