"""The trainer: flips, data-parallel equivalence, resume, learning, bad input, NaN stop, load_params."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from mtcnn_jax import checkpoints, train
from mtcnn_jax.stages import STAGES

pytestmark = pytest.mark.timeout(180)


def synthetic_samples(n: int, size: int, seed: int = 0) -> list[dict]:
    """A small learnable sample list: faces (labels 1, -1, -2) are a bright centre square on dark noise,
    negatives are the noise alone; box and landmark targets are random but fixed."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = [1, 0, 0, -1, -2, 0, 1][i % 7]
        image = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
        if label != 0:
            image[size // 4 : size - size // 4, size // 4 : size - size // 4] = 220
        out.append({"image": image, "label": label, "box": rng.normal(0, 0.1, 4).astype(np.float32),
                    "landmarks": rng.uniform(0.2, 0.8, 10).astype(np.float32), "source": f"synthetic/{i}",
                    "crop": np.zeros(4, np.float32), "flipped": False})
    return out


# One config for most runs, so the pmapped step compiles once for the whole file.
BASE = dataclasses.replace(
    train.CONFIGS["pnet"], steps=12, batch_size=16, learning_rate=0.01, lr_decay_fractions=(0.5,),
    log_interval=3, eval_interval=6, checkpoint_interval=3, val_fraction=0.1,
)


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(70, 12)


def interrupt_at(monkeypatch, step, nan=False):
    """From training step `step` on, batch assembly raises (a simulated kill) or yields NaN box targets."""
    original = train.training_batch

    def batch(arrays, train_idx, config, s):
        out = original(arrays, train_idx, config, s)
        if s >= step:
            if not nan:
                raise KeyboardInterrupt("simulated kill")
            out["box"] = np.full_like(out["box"], np.nan)
        return out

    monkeypatch.setattr(train, "training_batch", batch)


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_trees_close(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ------------------------------------------------------------------------------------------------ flips


def test_flip_batch_mirrors_image_box_and_landmarks():
    image = np.zeros((1, 12, 12, 3), np.uint8)
    image[0, 4, 3] = 255  # a pixel at the left eye: x = 0.3 * 12 = 3.6 -> column 3, y = 0.4 * 12 -> row 4
    landmarks = np.array([[0.3, 0.7, 0.5, 0.35, 0.65, 0.4, 0.45, 0.6, 0.8, 0.85]], np.float32)
    batch = {"image": image, "label": np.array([1]), "box": np.array([[0.1, -0.2, -0.3, 0.05]], np.float32),
             "landmarks": landmarks, "flipped": np.array([False])}
    flipped = train.flip_batch(batch)
    np.testing.assert_array_equal(flipped["image"][0, 4, 8], [255, 255, 255])  # column 11 - 3 = 8
    np.testing.assert_allclose(flipped["box"], [[0.3, -0.2, -0.1, 0.05]])  # (dx1, dx2) -> (-dx2, -dx1)
    # x -> 1 - x, then left/right eyes and mouth corners swap (y values move with their points).
    np.testing.assert_allclose(flipped["landmarks"], [[0.3, 0.7, 0.5, 0.35, 0.65, 0.45, 0.4, 0.6, 0.85, 0.8]],
                               atol=1e-6)
    # The flipped right eye (index 1) sits on the mirrored pixel: x = 0.7 * 12 = 8.4 -> column 8, y row 4.
    assert int(flipped["landmarks"][0, 1] * 12) == 8 and int(flipped["landmarks"][0, 6] * 12) == 4
    assert flipped["flipped"][0]
    twice = train.flip_batch(flipped)
    for key in ("image", "box", "landmarks"):
        np.testing.assert_allclose(twice[key], batch[key], atol=1e-6)


def test_flip_batch_only_touches_selected_samples(samples):
    batch = train.gather(samples, [0, 1])
    out = train.flip_batch(batch, np.array([False, True]))
    np.testing.assert_array_equal(out["image"][0], batch["image"][0])
    np.testing.assert_array_equal(out["image"][1], batch["image"][1][:, ::-1])
    np.testing.assert_array_equal(out["box"][0], batch["box"][0])


def test_jitter_colors_against_hand_computed_values():
    images = np.array([[[[100, 50, 20], [200, 100, 40]]]], np.uint8)  # one 1x2 image
    np.testing.assert_array_equal(train.jitter_colors(images, np.ones((1, 3))), images)  # factors of 1: unchanged
    # Brightness 1.2: (120, 60, 24), (240, 120, 48); greys 73.836 and 147.672, mean 110.754. Contrast 0.5
    # halves each pixel's distance to 110.754, so the greys become 92.295 and 129.213; saturation 0 leaves
    # the greys.
    out = train.jitter_colors(images, np.array([[1.2, 0.5, 0.0]]))
    np.testing.assert_array_equal(out, [[[[92, 92, 92], [129, 129, 129]]]])
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(train.jitter_colors(images, np.array([[2.0, 1, 1]])), [[[[200, 100, 40], [255, 200, 80]]]])


def _images_changed(samples, **augmentation) -> np.ndarray:
    """Which images of a batch an augmentation changes (B,), after checking that it is reproducible for one
    (seed, step) and leaves every other field of the batch as it was."""
    arrays, idx = train.load_arrays(samples, BASE), np.arange(len(samples))
    augmented = dataclasses.replace(BASE, **augmentation)
    plain, a, b = (train.training_batch(arrays, idx, c, 3) for c in (BASE, augmented, augmented))
    for key in plain:
        np.testing.assert_array_equal(a[key], b[key])
        if key != "image":
            np.testing.assert_array_equal(a[key], plain[key])
    return np.abs(a["image"].astype(int) - plain["image"]).max(axis=(1, 2, 3)) > 0


def test_color_jitter_changes_only_images_and_is_reproducible(samples):
    changed = _images_changed(samples, color_jitter=0.4)
    assert changed.mean() > 0.9  # factors drawn per sample from [0.6, 1.4]: almost never all ~1
    with pytest.raises(ValueError, match="--color-jitter 1.5"):
        train.train(dataclasses.replace(BASE, color_jitter=1.5), samples, "unused")


def test_blur_images_against_hand_computed_values():
    images = np.zeros((3, 9, 9, 3), np.uint8)
    images[:2, 4, 4] = 255  # an impulse in the middle
    images[2] = 77  # flat grey
    out = train.blur_images(images, np.array([0.0, 1.0, 1.4]))
    np.testing.assert_array_equal(out[0], images[0])  # sigma 0: unchanged
    # sigma 1: output row r weighs input row i by exp(-(r - i)^2 / 2), normalised over the crop's 9 rows
    # (so rows near the border lean inwards); the impulse at (4, 4) becomes 255 * k[r, 4] * k[c, 4].
    k = np.exp(-0.5 * (np.arange(9)[:, None] - np.arange(9)[None, :]) ** 2)
    k /= k.sum(1, keepdims=True)
    np.testing.assert_allclose(out[1][..., 0], 255 * np.outer(k[:, 4], k[:, 4]), atol=0.501)  # rounded to uint8
    assert out[1][4, 4, 0] == 41 and out[1][3, 4, 0] == 25  # 255 * 0.3990^2, 255 * 0.3990 * 0.2420
    np.testing.assert_array_equal(out[2], images[2])  # rows renormalised at the borders: flat stays flat


def test_blur_changes_only_the_chosen_images_and_is_reproducible(samples):
    changed = _images_changed(samples, blur_probability=0.5, blur_sigma=2.0)
    chosen = np.random.default_rng([BASE.seed, 3, 3]).random(BASE.batch_size) < 0.5  # training_batch's draw
    assert 0 < chosen.sum() < BASE.batch_size and not changed[~chosen].any()
    assert changed[chosen].mean() > 0.8  # only a sigma near 0 can leave a crop as it was
    with pytest.raises(ValueError, match="--blur-probability 1.5"):
        train.train(dataclasses.replace(BASE, blur_probability=1.5), samples, "unused")


def test_training_batches_are_a_function_of_seed_and_step(samples):
    train_idx, val_idx = train.split_indices(len(samples), 0.1)
    assert len(val_idx) == 7 and not set(train_idx) & set(val_idx) and len(train_idx) + 7 == len(samples)
    a, b = (train.training_batch(train.load_arrays(samples, BASE), train_idx, BASE, 5) for _ in range(2))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    epoch = np.concatenate([train.step_indices(train_idx, 0, s, 9) for s in range(7)])  # 63 = one epoch
    assert sorted(epoch) == sorted(train_idx)


# ------------------------------------------------------------------------------------ data parallelism

PMAP_SCRIPT = textwrap.dedent(
    """
    import dataclasses, functools, sys
    import jax, numpy as np
    assert jax.local_device_count() == 2, jax.devices()
    sys.path.insert(0, {tests!r})
    from test_train import synthetic_samples
    from mtcnn_jax import train

    config = dataclasses.replace(train.CONFIGS["rnet"], batch_size=16, steps=10, learning_rate=0.05,
                                 ohem_ratio=0.5)
    samples = synthetic_samples(40, 24)
    arrays = train.load_arrays(samples, config)
    idx = np.arange(len(samples))
    single = jax.jit(functools.partial(train.train_step, config=config, axis_name=None))
    state1 = train.init_state(config)
    state2 = train.flax.jax_utils.replicate(state1)
    for step in range(3):
        batch = train.training_batch(arrays, idx, config, step)
        state1, m1 = single(state1, batch)
        state2, m2 = train.compiled_step(config)(state2, train.shard(batch, 2))
        jax.block_until_ready((state1, state2))
        for k in m1:
            np.testing.assert_allclose(m2[k][0], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert float(m1["kept_fraction"]) < 1.0  # OHEM dropped some samples, chosen across both devices
    for a, b in zip(jax.tree_util.tree_leaves(state1.params), jax.tree_util.tree_leaves(state2.params)):
        np.testing.assert_allclose(np.asarray(b)[0], np.asarray(b)[1])
        np.testing.assert_allclose(np.asarray(b)[0], a, rtol=1e-5, atol=1e-6)
    try:
        train.train(dataclasses.replace(config, batch_size=15), samples, {workdir!r})
    except ValueError as e:
        assert "does not divide evenly over 2 devices" in str(e), e
    else:
        raise AssertionError("batch 15 on 2 devices was accepted")
    print("PMAP-OK")
    """
)


def test_pmap_on_two_devices_equals_one_device_step(tmp_path):
    script = PMAP_SCRIPT.format(tests=str(Path(__file__).parent), workdir=str(tmp_path / "odd"))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=170)
    assert "PMAP-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]
    assert not (tmp_path / "odd" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------- resume and checkpoints


@pytest.fixture(scope="module")
def uninterrupted(samples, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, train.train(BASE, samples, workdir)


def test_metrics_checkpoints_and_config(uninterrupted):
    workdir, state = uninterrupted
    assert int(state.step) == 12
    records = read_metrics(workdir)
    train_records = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_records] == [3, 6, 9, 12]
    for key in ("loss", "cls", "cls_weighted", "box", "box_weighted", "landmark", "landmark_weighted",
                "accuracy", "recall", "kept_fraction", "learning_rate", "samples_per_sec"):
        assert key in train_records[0], key
    assert train_records[0]["learning_rate"] == pytest.approx(0.01) and train_records[-1]["learning_rate"] == \
        pytest.approx(0.001)
    assert [r["step"] for r in records if r["split"] == "val"] == [6, 12]
    assert json.loads((workdir / "config.json").read_text())["stage"] == "pnet"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6, 9, 12]  # max_to_keep=3


def test_killed_and_resumed_run_matches_uninterrupted(samples, uninterrupted, tmp_path, monkeypatch):
    # The batch of step 8 is assembled while step 7 runs: the kill lands after the checkpoint at step 6
    # (and the validation there), before the one at step 9.
    interrupt_at(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        train.train(BASE, samples, tmp_path)
    monkeypatch.undo()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
    resumed = train.train(BASE, samples, tmp_path)  # a fresh call resumes from step 6
    assert int(resumed.step) == 12
    assert_trees_close(resumed.params, uninterrupted[1].params, rtol=1e-6, atol=1e-7)
    assert_trees_close(resumed.opt_state, uninterrupted[1].opt_state, rtol=1e-6, atol=1e-7)


def test_resume_drops_metrics_of_redone_steps(samples, tmp_path, monkeypatch):
    # Logged every 3 steps, saved every 6: killed in step 11, the run has logged step 9 but saved only step 6.
    config = dataclasses.replace(BASE, checkpoint_interval=6)
    interrupt_at(monkeypatch, 11)
    with pytest.raises(KeyboardInterrupt):
        train.train(config, samples, tmp_path)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "train"] == [3, 6, 9]
    train.train(config, samples, tmp_path)
    assert [(r["step"], r["split"]) for r in read_metrics(tmp_path)] == [
        (3, "train"), (6, "train"), (6, "val"), (9, "train"), (12, "train"), (12, "val")]


def test_until_step_then_resume(samples, uninterrupted, tmp_path, capsys):
    first = train.train(BASE, samples, tmp_path, until_step=6)
    assert int(first.step) == 6
    # Not a terminal here: the progress bar is off and each logged step is one line on stderr instead.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train pnet step")]
    assert [line.split()[3].rstrip(":") for line in lines] == ["3/12", "6/12"], lines
    assert_trees_close(train.train(BASE, samples, tmp_path).params, uninterrupted[1].params, rtol=1e-6, atol=1e-7)


def test_load_params(uninterrupted, tmp_path):
    workdir, state = uninterrupted
    for path in (workdir, workdir / "checkpoints", workdir / "checkpoints" / "12"):
        params = checkpoints.load_params(path)
        assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
        assert_trees_close(params, state.params)
    with pytest.raises(ValueError, match="pnet training run"):
        checkpoints.load_params(workdir, stage="rnet")
    cascade = {s: p for s, p in zip(("pnet", "rnet", "onet"), (state.params,) * 3)}
    checkpoints.save_cascade(tmp_path / "cascade", cascade)
    assert_trees_close(checkpoints.load_params(tmp_path / "cascade", stage="onet"), state.params)
    with pytest.raises(ValueError, match="pass stage"):
        checkpoints.load_params(tmp_path / "cascade")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(samples, tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 4, nan=True)  # NaN box targets from batch 4 (step 5) on
    with pytest.raises(train.NonFiniteLossError, match="loss is nan at step 5"):
        train.train(BASE, samples, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]
    params = checkpoints.load_params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))


# --------------------------------------------------------------------------------------------- learning


def test_loss_decreases_on_a_learnable_set(tmp_path):
    config = dataclasses.replace(BASE, steps=40, batch_size=32, learning_rate=0.05, lr_decay_fractions=(),
                                 log_interval=10, eval_interval=40, checkpoint_interval=40)
    train.train(config, synthetic_samples(140, 12, seed=1), tmp_path)
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"][-1]
    assert losses[-1] < 0.5 * losses[0], losses
    assert val["accuracy"] > 0.9 and val["recall"] > 0.9, val


def test_adam_matches_optax_adam_and_learns(tmp_path):
    """--optimizer adam: one step equals optax's Adam on the L2-regularised gradient, and a short run learns."""
    config = dataclasses.replace(BASE, optimizer="adam", learning_rate=3e-3, steps=40, batch_size=32,
                                 lr_decay_fractions=(), log_interval=10, eval_interval=40, checkpoint_interval=40)
    state = train.init_state(config)
    grads = jax.tree_util.tree_map(lambda p: np.full(p.shape, 0.5, np.float32), state.params)
    updates, _ = train.make_optimizer(config).update(grads, state.opt_state, state.params)
    # Adam's first step moves every parameter by -lr * sign(g + wd * p) (m / sqrt(v) = +-1 up to eps).
    for u, p in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(state.params), strict=True):
        np.testing.assert_allclose(np.asarray(u), -3e-3 * np.sign(0.5 + 5e-4 * np.asarray(p)), rtol=1e-4)
    train.train(config, synthetic_samples(140, 12, seed=1), tmp_path)
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"] == "adam"


def test_unknown_optimizer_and_optimizer_switch_are_refused(samples, tmp_path):
    with pytest.raises(ValueError, match="--optimizer rmsprop: expected one of sgd, adam"):
        train.train(dataclasses.replace(BASE, optimizer="rmsprop"), samples, tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text(json.dumps({"stage": "pnet", "optimizer": "sgd"}))
    with pytest.raises(ValueError, match="optimizer sgd: its checkpoints cannot resume with adam"):
        train.train(dataclasses.replace(BASE, optimizer="adam"), samples, tmp_path / "b")


def test_real_samples_loss_decreases(shared_data, tmp_path):
    """A short P-Net run on a small real sample set (20 WIDER images, 60 landmark faces) learns."""
    from mtcnn_jax import samples as samples_module

    directory = os.environ.get("MTCNN_JAX_SAMPLES")
    if directory is None:
        directory = tmp_path / "samples"
        samples_module.make_samples(shared_data / "wider_face", shared_data / "lfw_net", directory,
                                    samples_module.SampleConfig(seed=3), max_images=20, max_landmarks=60, workers=1)
    source = samples_module.load(directory)
    config = dataclasses.replace(BASE, steps=60, batch_size=64, learning_rate=0.05, lr_decay_fractions=(),
                                 log_interval=20, eval_interval=60, checkpoint_interval=60)
    train.train(config, source, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < losses[0], losses
    assert [r["step"] for r in records if r["split"] == "val"] == [60]


def test_flip_batch_agrees_with_the_sample_writer(samples):
    from mtcnn_jax import samples as samples_module

    batch = train.gather(samples, range(7))
    box, landmarks = samples_module.flip_targets(batch["box"], batch["landmarks"])
    flipped = train.flip_batch(batch)
    np.testing.assert_allclose(flipped["box"], box, atol=1e-7)
    np.testing.assert_allclose(flipped["landmarks"], landmarks, atol=1e-7)


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: [], "empty"),
        (lambda s: s[:5] + [{**s[5], "label": 2}] + s[6:], r"labels \[2\] not in"),
        (lambda s: s[:3] + [{**s[3], "image": np.zeros((24, 24, 3), np.uint8)}] + s[4:], "sample 3: image of shape"),
    ],
    ids=["empty", "bad-label", "wrong-size"],
)
def test_bad_samples_fail_before_training(samples, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        train.train(BASE, change(list(samples)), tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written: no config.json, metrics or checkpoints


def test_batch_not_divisible_over_devices(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(train.jax, "local_device_count", lambda: 3)
    with pytest.raises(ValueError, match="batch size 16 does not divide evenly over 3 devices"):
        train.train(BASE, samples, tmp_path)


def test_workdir_of_another_stage_is_refused(samples, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"stage": "rnet"}))
    with pytest.raises(ValueError, match="holds a rnet run"):
        train.train(BASE, samples, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"stage": "rnet"}


def test_cli_flags_map_onto_config_fields():
    args = train.build_parser().parse_args(
        ["--stage", "onet", "--data", "d", "--workdir", "w", "--steps", "7", "--batch-size", "8",
         "--learning-rate", "0.5", "--lr-decay-fractions", "0.5,0.9", "--seed", "3"]
    )
    config = train.config_from_args(args)
    assert config == dataclasses.replace(train.CONFIGS["onet"], steps=7, batch_size=8, learning_rate=0.5,
                                         lr_decay_fractions=(0.5, 0.9), seed=3)
    assert config.weights == (1.0, 0.5, 1.0) and config.input_size == 48
    flags = {a.dest for a in train.build_parser()._actions}
    assert {f.name for f in dataclasses.fields(train.TrainConfig)} <= flags
    for stage, c in train.CONFIGS.items():
        assert f"--stage {stage}" in c.__doc__ and c.stage == stage


@pytest.fixture(scope="module")
def original(original_weights):
    return original_weights


def test_assemble_cascade_cli_mixes_trained_and_original_stages(uninterrupted, original, tmp_path):
    workdir, state = uninterrupted
    out = tmp_path / "after_pnet"
    result = subprocess.run([sys.executable, "-m", "mtcnn_jax.checkpoints", "--out", str(out), "--pnet", str(workdir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rnet from the original weights" in result.stdout
    cascade = checkpoints.load_cascade(out)
    assert_trees_close(cascade["pnet"], state.params)
    assert_trees_close(cascade["onet"], original["onet"])
    again = subprocess.run([sys.executable, "-m", "mtcnn_jax.checkpoints", "--out", str(out), "--rnet", str(workdir)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "is a pnet training run, not rnet" in again.stderr


def test_average_params_is_the_leafwise_mean():
    a = {"conv": {"kernel": np.array([1.0, 2.0], np.float32)}, "prelu": np.float32(3.0)}
    b = {"conv": {"kernel": np.array([3.0, 6.0], np.float32)}, "prelu": np.float32(5.0)}
    mean = checkpoints.average_params([a, b])
    np.testing.assert_array_equal(mean["conv"]["kernel"], [2.0, 4.0])
    assert mean["prelu"] == 4.0 and mean["conv"]["kernel"].dtype == np.float32
    with pytest.raises(ValueError, match="different structures or shapes"):
        checkpoints.average_params([a, {**b, "conv": {"kernel": np.zeros(3, np.float32)}}])
    with pytest.raises(ValueError, match="different structures or shapes"):
        checkpoints.average_params([a, {"conv": b["conv"]}])


def test_assemble_cascade_cli_averages_several_runs(uninterrupted, original, tmp_path):
    workdir, state = uninterrupted
    checkpoints.save_cascade(tmp_path / "original", original)
    out = tmp_path / "soup"
    result = subprocess.run([sys.executable, "-m", "mtcnn_jax.checkpoints", "--out", str(out), "--pnet", str(workdir),
                             str(tmp_path / "original")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(mean)" in result.stdout
    expected = jax.tree_util.tree_map(lambda x, y: (np.asarray(x) + np.asarray(y)) / 2, state.params, original["pnet"])
    assert_trees_close(checkpoints.load_cascade(out)["pnet"], expected, rtol=1e-6, atol=1e-7)


def test_init_from_a_run_or_the_original_weights(uninterrupted, original_weights, tmp_path):
    workdir, state = uninterrupted
    config = dataclasses.replace(BASE, init_from=str(workdir))
    with train.checkpoint_manager(tmp_path / "a", config) as manager:
        start = train.restore_or_init(manager, config)
    assert int(start.step) == 0
    assert_trees_close(start.params, state.params)  # the run's latest params, a fresh optimizer state
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(start.opt_state))
    rnet = dataclasses.replace(BASE, stage="rnet", input_size=24, init_from=str(tmp_path / "cascade"))
    checkpoints.save_cascade(tmp_path / "cascade", {s: state.params for s in STAGES})  # P-Net trees
    with pytest.raises(ValueError, match="not rnet params"):
        train.initial_params(rnet, train.init_state(rnet).params)
    with pytest.raises(FileNotFoundError, match="init-from"):
        train.check_run(tmp_path / "c", dataclasses.replace(BASE, init_from=str(tmp_path / "nowhere")), 1)
    released = original_weights
    onet = dataclasses.replace(BASE, stage="onet", input_size=48, init_from="original")
    assert_trees_close(train.initial_params(onet, train.init_state(onet).params), released["onet"])
