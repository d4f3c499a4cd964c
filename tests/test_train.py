"""The trainer: data-parallel equivalence, resume, streamed vs in-memory runs, learning, bad input, NaN stop,
the checkpoint layout, load_params and init-from (the input pipeline itself: test_input_pipeline.py; checksums,
divergence, Ctrl-C, damaged files, config changes and provenance: test_checkpoints_integrity.py)."""

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

from mtcnn_jax import checkpoints, input_pipeline, sample_geometry, train, train_step
from mtcnn_jax import samples as samples_module
from mtcnn_jax.datasets import load_samples
from mtcnn_jax.stages import STAGES
from mtcnn_jax.train_config import CONFIGS, TrainConfig

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
    CONFIGS["pnet"], steps=12, batch_size=16, learning_rate=0.01, lr_decay_fractions=(0.5,),
    log_interval=3, eval_interval=6, checkpoint_interval=3, val_fraction=0.1,
)


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(70, 12)


class SimulatedKill(BaseException):
    """A kill -9 in the middle of a run: nothing after it runs (unlike Ctrl-C, which saves the step)."""


def interrupt_at(monkeypatch, step, nan=False, error=SimulatedKill):
    """From training step `step` on, batch assembly raises `error` (a simulated kill, or Ctrl-C with
    KeyboardInterrupt) or yields NaN box targets."""
    original = input_pipeline.training_batch

    def batch(samples, train_idx, config, s):
        out = original(samples, train_idx, config, s)
        if s >= step:
            if not nan:
                raise error("simulated interruption")
            out["box"] = np.full_like(out["box"], np.nan)
        return out

    monkeypatch.setattr(input_pipeline, "training_batch", batch)


def read_metrics(workdir):
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def assert_trees_close(a, b, **kw):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------ data parallelism

PMAP_SCRIPT = textwrap.dedent(
    """
    import dataclasses, functools, sys
    import jax, numpy as np
    assert jax.local_device_count() == 2, jax.devices()
    sys.path.insert(0, {tests!r})
    from test_train import synthetic_samples
    from mtcnn_jax import input_pipeline, train, train_step
    from mtcnn_jax.train_config import CONFIGS

    config = dataclasses.replace(CONFIGS["rnet"], batch_size=16, steps=10, learning_rate=0.05,
                                 ohem_ratio=0.5)
    samples = synthetic_samples(40, 24)
    data = input_pipeline.InMemorySamples(input_pipeline.load_arrays(samples, config))
    idx = np.arange(len(samples))
    single = jax.jit(functools.partial(train_step.train_step, config=config, axis_name=None))
    state1 = train_step.init_state(config)
    state2 = train_step.replicate(state1)
    for step in range(3):
        batch = input_pipeline.training_batch(data, idx, config, step)
        state1, m1 = single(state1, batch)
        split = train_step.global_batch(batch, 16)
        assert [s.data.shape[0] for s in split["image"].addressable_shards] == [8, 8]  # 8 rows per device
        state2, m2 = train_step.compiled_step(config)(state2, split)
        jax.block_until_ready((state1, state2))
        for k in m1:
            np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
        assert float(m1["kept_fraction"]) < 1.0  # OHEM dropped some samples, chosen across both devices
    for a, b in zip(jax.tree_util.tree_leaves(state1.params), jax.tree_util.tree_leaves(state2.params)):
        first, second = (np.asarray(s.data) for s in b.addressable_shards)
        np.testing.assert_array_equal(first, second)
        np.testing.assert_allclose(first, a, rtol=1e-5, atol=1e-6)
    try:
        train.train(dataclasses.replace(config, batch_size=15), samples, {workdir!r})
    except ValueError as e:
        assert "does not divide evenly over 2 devices" in str(e), e
    else:
        raise AssertionError("batch 15 on 2 devices was accepted")
    print("PMAP-OK")
    """
)


def test_two_devices_equal_one_device_step(tmp_path):
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
                "accuracy", "recall", "kept_fraction", "learning_rate", "samples_per_sec", "grad_norm", "param_norm"):
        assert key in train_records[0], key
    assert "state_finite" not in train_records[0]  # the step's own check, not a metric
    assert train_records[0]["learning_rate"] == pytest.approx(0.01) and train_records[-1]["learning_rate"] == \
        pytest.approx(0.001)
    assert [r["step"] for r in records if r["split"] == "val"] == [6, 12]
    assert json.loads((workdir / "config.json").read_text())["stage"] == "pnet"
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [6, 9, 12]  # max_to_keep=3


def test_in_memory_run_equals_the_streamed_one(samples, uninterrupted, tmp_path):
    state = train.train(BASE, samples, tmp_path, in_memory=True)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(uninterrupted[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    timeless = [[{k: v for k, v in r.items() if k != "samples_per_sec"} for r in read_metrics(w)]
                for w in (tmp_path, uninterrupted[0])]
    assert timeless[0] == timeless[1]  # every loss and metric, train and val, bit for bit


def test_killed_and_resumed_run_matches_uninterrupted(samples, uninterrupted, tmp_path, monkeypatch):
    # The batch of step 8 is assembled while step 7 runs: the kill lands after the checkpoint at step 6
    # (and the validation there), before the one at step 9.
    interrupt_at(monkeypatch, 8)
    with pytest.raises(SimulatedKill):
        train.train(BASE, samples, tmp_path)
    monkeypatch.undo()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3, 6]
    resumed = train.train(BASE, samples, tmp_path)  # a fresh call resumes from step 6
    assert int(resumed.step) == 12
    assert_trees_equal(resumed.params, uninterrupted[1].params)  # bit for bit
    assert_trees_equal(resumed.opt_state, uninterrupted[1].opt_state)


def test_resume_drops_metrics_of_redone_steps(samples, tmp_path, monkeypatch):
    # Logged every 3 steps, saved every 6: killed in step 11, the run has logged step 9 but saved only step 6.
    config = dataclasses.replace(BASE, checkpoint_interval=6)
    interrupt_at(monkeypatch, 11)
    with pytest.raises(SimulatedKill):
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
    with pytest.raises(train.NonFiniteLossError, match="loss is nan at step 5.*the last checkpoint, step 3") as err:
        train.train(BASE, samples, tmp_path)
    assert err.value.last_good_step == 3
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
    state = train_step.init_state(config)
    grads = jax.tree_util.tree_map(lambda p: np.full(p.shape, 0.5, np.float32), state.params)
    updates, _ = train_step.make_optimizer(config).update(grads, state.opt_state, state.params)
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
    directory = os.environ.get("MTCNN_JAX_SAMPLES")
    if directory is None:
        directory = tmp_path / "samples"
        samples_module.make_samples(shared_data / "wider_face", shared_data / "lfw_net", directory,
                                    sample_geometry.SampleConfig(seed=3), max_images=20, max_landmarks=60, workers=1)
    source = load_samples(directory)
    config = dataclasses.replace(BASE, steps=60, batch_size=64, learning_rate=0.05, lr_decay_fractions=(),
                                 log_interval=20, eval_interval=60, checkpoint_interval=60)
    train.train(config, source, tmp_path / "run")
    records = read_metrics(tmp_path / "run")
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert losses[-1] < losses[0], losses
    assert [r["step"] for r in records if r["split"] == "val"] == [60]


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
@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_bad_samples_fail_before_training(samples, tmp_path, change, message, in_memory):
    # Streamed, the first batch's worth of samples (16 here) is checked before anything is written.
    with pytest.raises(ValueError, match=message):
        train.train(BASE, change(list(samples)), tmp_path, in_memory=in_memory)
    assert not any(tmp_path.iterdir())  # nothing written: no config.json, metrics or checkpoints


def test_streaming_stops_at_a_bad_sample_keeping_the_checkpoints(samples, tmp_path):
    train_idx, _ = input_pipeline.split_indices(len(samples), BASE.val_fraction)
    # A training sample past the first batch's worth (checked at start-up) that the fourth step (index 3, the
    # last quarter of the first epoch's permutation) reads first: the run stops there, after the checkpoint at 3.
    target = next(int(i) for i in input_pipeline.step_indices(train_idx, BASE.seed, 3, 16) if i >= 16)
    bad = list(samples)
    bad[target] = {**bad[target], "label": 7}
    with pytest.raises(ValueError, match=rf"samples \[{target}\]: labels \[7\] not in"):
        train.train(BASE, bad, tmp_path)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [3]


def test_batch_not_divisible_over_devices(samples, tmp_path, monkeypatch):
    monkeypatch.setattr(train.jax, "device_count", lambda: 3)
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
    assert config == dataclasses.replace(CONFIGS["onet"], steps=7, batch_size=8, learning_rate=0.5,
                                         lr_decay_fractions=(0.5, 0.9), seed=3)
    assert config.weights == (1.0, 0.5, 1.0) and config.input_size == 48
    assert not args.in_memory and train.build_parser().parse_args(["--stage", "onet", "--data", "d", "--workdir", "w",
                                                                   "--in-memory"]).in_memory
    flags = {a.dest for a in train.build_parser()._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags
    for stage, c in CONFIGS.items():
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
    start = train.restore_or_init(tmp_path / "a", config)
    assert int(start.step) == 0
    assert_trees_close(start.params, state.params)  # the run's latest params, a fresh optimizer state
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(start.opt_state))
    rnet = dataclasses.replace(BASE, stage="rnet", input_size=24, init_from=str(tmp_path / "cascade"))
    checkpoints.save_cascade(tmp_path / "cascade", {s: state.params for s in STAGES})  # P-Net trees
    with pytest.raises(ValueError, match="not rnet params"):
        checkpoints.initial_params(rnet.init_from, "rnet", train_step.init_state(rnet).params)
    with pytest.raises(FileNotFoundError, match="init-from"):
        checkpoints.check_init_from(str(tmp_path / "nowhere"), "pnet")
    released = original_weights
    onet = dataclasses.replace(BASE, stage="onet", input_size=48, init_from="original")
    assert_trees_close(checkpoints.initial_params("original", "onet", train_step.init_state(onet).params),
                      released["onet"])


def test_landmark_norm_reaches_the_loss_and_the_point_error_is_logged():
    """--landmark-norm l1: the held-back landmark term is the L1 distance; the point error is norm-free."""
    config = dataclasses.replace(CONFIGS["onet"], steps=1, batch_size=4)
    params = train_step.init_state(config).params
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (4, 48, 48, 3), np.uint8), "label": np.array([1, 0, -2, -2]),
             "box": rng.uniform(-0.2, 0.2, (4, 4)).astype(np.float32),
             "landmarks": rng.uniform(0, 1, (4, 10)).astype(np.float32)}
    pred = np.asarray(train_step.forward("onet", params, batch["image"])["landmarks"])[2:]
    target = batch["landmarks"][2:]
    l1 = train_step.evaluate(params, [batch], dataclasses.replace(config, landmark_norm="l1"))
    l2 = train_step.evaluate(params, [batch], config)
    assert l1["landmark"] == pytest.approx(np.abs(pred - target).sum(1).mean(), rel=1e-5)
    assert l2["landmark"] == pytest.approx(np.square(pred - target).sum(1).mean(), rel=1e-5)
    d = pred - target
    point_error = np.hypot(d[:, :5], d[:, 5:]).mean()
    assert l1["landmark_point_error"] == pytest.approx(point_error, rel=1e-5) == l2["landmark_point_error"]
