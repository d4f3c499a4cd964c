"""The released weights: hash pins, locating them, conversion equivalence, Orbax round trip."""

import subprocess
import sys
import zipfile

import jax
import joblib
import numpy as np
import pytest

from conftest import missing
from mtcnn_jax import checkpoints, nets, pretrained


@pytest.fixture(scope="module")
def wheel():
    """The mtcnn 1.0.0 wheel (downloaded once into the user cache if needed)."""
    try:
        location = pretrained.locate()
    except pretrained.WeightsNotFoundError as err:
        missing(f"the released MTCNN weights are not available here: {err}")
    if location.is_dir():
        pytest.skip("weights come from an installed mtcnn folder, not a wheel; wheel-specific tests skipped")
    return location


@pytest.fixture(scope="module")
def release(wheel):
    return pretrained.read_release(wheel)


@pytest.fixture(scope="module")
def params(wheel):
    return pretrained.load_pretrained(wheel)


@pytest.fixture()
def assets(wheel, tmp_path):
    """A folder holding the three released .lz4 files."""
    with zipfile.ZipFile(wheel) as z:
        for stage in ("pnet", "rnet", "onet"):
            (tmp_path / f"{stage}.lz4").write_bytes(z.read(f"mtcnn/assets/weights/{stage}.lz4"))
    return tmp_path


# --- an independent forward pass: plain numpy, the Keras layer order of the `mtcnn` package ---

def np_conv(x, k, b):
    win = np.lib.stride_tricks.sliding_window_view(x, k.shape[:2], axis=(1, 2))  # N,H',W',C,kh,kw
    return np.einsum("nhwcij,ijco->nhwo", win, k, optimize=True) + b


def np_prelu(x, a):
    return np.where(x >= 0, x, a.reshape(-1) * x)


def np_pool(x, k, s, same):
    """TensorFlow max pooling, 'same' (pad split before/after) or 'valid'."""
    n, h, w, c = x.shape
    if same:
        oh, ow = -(-h // s), -(-w // s)
        ph, pw = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - w, 0)
        x = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), constant_values=-np.inf)
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s]
    return win.max(axis=(-1, -2))


def softmax1(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True))[..., 1]


def margin(z):
    """Face logit minus background logit: softmax's only degree of freedom, sharp where prob is ~0."""
    return z[..., 1] - z[..., 0]


def keras_forward(stage, w, x):
    """The released model as Keras runs it (conv kernels as stored, Permute((2,1,3)) before Flatten)."""
    x = x.astype(np.float64)
    w = [a.astype(np.float64) for a in w]
    pools = {"pnet": [(2, 2, True)], "rnet": [(3, 2, True), (3, 2, False)],
             "onet": [(3, 2, True), (3, 2, False), (2, 2, True)]}[stage]
    n_conv = {"pnet": 3, "rnet": 3, "onet": 4}[stage]
    i = 0
    for layer in range(n_conv):
        x = np_prelu(np_conv(x, w[i], w[i + 1]), w[i + 2])
        i += 3
        if layer < len(pools):
            x = np_pool(x, *pools[layer])
    if stage == "pnet":
        z = np_conv(x, w[i + 2], w[i + 3])
        return {"prob": softmax1(z), "margin": margin(z), "box": np_conv(x, w[i], w[i + 1])}
    x = x.transpose(0, 2, 1, 3).reshape(x.shape[0], -1)
    x = np_prelu(x @ w[i] + w[i + 1], w[i + 2])
    i += 3
    out = {"box": x @ w[i] + w[i + 1]}
    if stage == "onet":
        out["landmarks"] = x @ w[i + 2] + w[i + 3]
        i += 2
    z = x @ w[i + 2] + w[i + 3]
    out["prob"], out["margin"] = softmax1(z), margin(z)
    return out


@pytest.mark.parametrize("stage,shape", [
    ("pnet", (3, 12, 12, 3)), ("pnet", (2, 37, 29, 3)), ("pnet", (1, 80, 61, 3)),
    ("rnet", (16, 24, 24, 3)), ("onet", (16, 48, 48, 3)),
])
def test_nets_equal_independent_keras_forward(params, release, stage, shape):
    x = np.random.default_rng(sum(shape)).uniform(-1, 1, shape).astype(np.float32)
    ours = nets.NETS[stage](params[stage], x)
    ref = keras_forward(stage, release[stage], x)
    np.testing.assert_allclose(nets.face_probability(ours["logits"]), ref["prob"], atol=1e-4)
    np.testing.assert_allclose(margin(np.asarray(ours["logits"])), ref["margin"], atol=1e-3)
    np.testing.assert_allclose(ours["box"], ref["box"], atol=1e-4)
    if stage == "onet":
        np.testing.assert_allclose(ours["landmarks"], ref["landmarks"], atol=1e-4)
    assert ref["margin"].std() > 0.1  # the inputs exercise the nets: not a degenerate comparison


def test_converted_trees_match_init_shapes(params):
    fresh = nets.init_params(jax.random.key(0))
    for stage in ("pnet", "rnet", "onet"):
        assert jax.tree_util.tree_map(np.shape, params[stage]) == jax.tree_util.tree_map(np.shape, fresh[stage])


def test_fold_permute_is_the_transpose():
    k = np.arange(2 * 2 * 3 * 1, dtype=np.float32).reshape(12, 1)  # rows indexed (w, h, c)
    folded = pretrained.fold_permute(k, channels=3).reshape(2, 2, 3)  # rows indexed (h, w, c)
    for h in range(2):
        for w in range(2):
            np.testing.assert_array_equal(folded[h, w], k.reshape(2, 2, 3, 1)[w, h, :, 0])


def test_pins_match_the_release(release):
    assert [len(release[s]) for s in ("pnet", "rnet", "onet")] == [13, 16, 21]


def test_tampered_file_is_refused_before_unpickling(assets, monkeypatch):
    data = bytearray((assets / "rnet.lz4").read_bytes())
    data[100] ^= 0xFF
    (assets / "rnet.lz4").write_bytes(bytes(data))

    loads = []
    monkeypatch.setattr(joblib, "load", lambda f: loads.append(1) or [])  # records every unpickling
    with pytest.raises(pretrained.WeightsIntegrityError) as err:
        pretrained.read_release(assets)
    assert "rnet.lz4" in str(err.value) and pretrained.ASSET_SHA256["rnet"] in str(err.value)
    assert loads == [1]  # pnet.lz4 (intact) was read; the tampered rnet.lz4 never was


def test_truncated_wheel_is_a_clear_error(wheel, tmp_path):
    bad = tmp_path / pretrained.WHEEL_NAME
    bad.write_bytes(wheel.read_bytes()[:5000])
    with pytest.raises(pretrained.WeightsIntegrityError, match="not a usable"):
        pretrained.read_release(bad)


def test_offline_without_copy_says_how_to_provide(tmp_path, monkeypatch):
    monkeypatch.delenv(pretrained.ENV_SOURCE, raising=False)
    monkeypatch.setenv(pretrained.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as with no network: nothing can be fetched
    monkeypatch.setattr(pretrained, "_installed_assets", lambda: None)
    with pytest.raises(pretrained.WeightsNotFoundError) as err:
        pretrained.locate()
    assert "pip download --no-deps mtcnn==1.0.0" in str(err.value) and pretrained.ENV_SOURCE in str(err.value)
    with pytest.raises(pretrained.WeightsNotFoundError, match="does not exist"):
        pretrained.locate(tmp_path / "nowhere.whl")


def test_sources_folder_env_and_installed_package(wheel, assets, tmp_path, monkeypatch):
    assert pretrained.locate(assets) == assets
    monkeypatch.setenv(pretrained.ENV_SOURCE, str(wheel.parent))
    assert pretrained.locate() == wheel  # a folder holding the wheel
    monkeypatch.delenv(pretrained.ENV_SOURCE)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    found = pretrained.locate()
    assert found == site / "mtcnn" / "assets" / "weights"
    assert "mtcnn" not in sys.modules  # located, never imported (it would import TensorFlow)
    folder_params = pretrained.convert("onet", pretrained.read_release(found)["onet"])
    np.testing.assert_array_equal(folder_params["fc5"]["kernel"], pretrained.load_pretrained(wheel)["onet"]["fc5"]["kernel"])


def test_orbax_round_trip_is_identical(params, tmp_path):
    path = checkpoints.save_cascade(tmp_path / "ckpt", params)
    back = checkpoints.load_cascade(path)
    flat_a, tree_a = jax.tree_util.tree_flatten(params)
    flat_b, tree_b = jax.tree_util.tree_flatten(back)
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_cli_writes_a_checkpoint(wheel, params, tmp_path):
    """`python -m mtcnn_jax.checkpoints --out DIR` with no trained stage writes the original weights."""
    out = tmp_path / "weights"
    result = subprocess.run([sys.executable, "-m", "mtcnn_jax.checkpoints", "--out", str(out), "--source", str(wheel)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "onet from the original weights" in result.stdout and "pnet 6,632" in result.stdout
    back = checkpoints.load_cascade(out)
    np.testing.assert_array_equal(back["rnet"]["fc4"]["kernel"], params["rnet"]["fc4"]["kernel"])
    bad = subprocess.run([sys.executable, "-m", "mtcnn_jax.checkpoints", "--out", str(tmp_path / "x"),
                          "--source", str(tmp_path / "missing.whl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and not (tmp_path / "x").exists()
