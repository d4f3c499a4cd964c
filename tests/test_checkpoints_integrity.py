"""Checkpoints that are never poisoned and say where they came from: a diverging run saves nothing non-finite
and names its last good step; Ctrl-C saves the step and resumes bit for bit; a flipped byte is caught by the
checksums (the resume falls back to the step before, load_params and the checkpoints CLI refuse); torn
metrics lines, damaged config.json and changed configs; provenance from a step to the assembled cascade."""

import dataclasses
import json
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import BASE, assert_trees_equal, interrupt_at, read_metrics, synthetic_samples

from mtcnn_jax import __version__, checkpoints, input_pipeline, run_dir, train
from mtcnn_jax.checkpoint_integrity import (CheckpointWarning, DamagedCheckpointError, NonFiniteParamsError,
                                            array_checksums, verify_checksums)
from mtcnn_jax.stages import STAGES
from mtcnn_jax.train_config import config_changes

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
# BASE as CLI flags: the same TrainConfig, so the step compiled for it is reused.
FLAGS = ["--stage", "pnet", "--steps", "12", "--batch-size", "16", "--learning-rate", "0.01",
         "--lr-decay-fractions", "0.5", "--log-interval", "3", "--eval-interval", "6", "--checkpoint-interval", "3",
         "--val-fraction", "0.1"]


@pytest.fixture(scope="module")
def samples():
    return synthetic_samples(70, 12)


@pytest.fixture(scope="module")
def run(samples, tmp_path_factory):
    """An uninterrupted 12-step run (checkpoints 6, 9, 12) and its final state; copy it before damaging it."""
    workdir = tmp_path_factory.mktemp("run")
    return workdir, train.train(BASE, samples, workdir)


@pytest.fixture(scope="module")
def cascade(run, tmp_path_factory):
    """A cascade checkpoint holding the run's P-Net params in all three stages (no original weights needed)."""
    return checkpoints.save_cascade(tmp_path_factory.mktemp("cascade") / "c", {s: run[1].params for s in STAGES})


def steps_in(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir())


def cli(capsys, main, argv):
    """A CLI main's exit code and stderr lines, in-process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


# ------------------------------------------------------------------------------------ never poisoned


def test_huge_learning_rate_saves_nothing_non_finite_and_names_the_good_step(samples, tmp_path, capsys,
                                                                              monkeypatch):
    with pytest.raises(ValueError, match=r"--learning-rate 1e\+39: beyond float32"):  # inf in the step: refused
        dataclasses.replace(BASE, learning_rate=1e39)
    train.train(BASE, samples, tmp_path, until_step=3)
    # The largest float32 step size, and a weight decay that overflows the update while the loss is still finite.
    huge = dataclasses.replace(BASE, learning_rate=3e38, weight_decay=10.0)
    with pytest.raises(ValueError, match=r"another config \(--learning-rate 0.01 -> 3e\+38, --weight-decay 0.0005 -> "
                       r"10.0\): pass --allow-config-change"):
        train.train(huge, samples, tmp_path)
    with pytest.raises(train.NonFiniteLossError, match=r"parameters are not finite after step 4 \(loss 0.5.*the last "
                       r"checkpoint, step 3 \(all finite\)") as err:
        train.train(huge, samples, tmp_path, allow_config_change=True)
    assert err.value.last_good_step == 3 and steps_in(tmp_path) == [3]
    params = checkpoints.load_params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
    # From the command line, from scratch: one error line, nothing saved.
    monkeypatch.setattr(train, "load_samples", lambda path: samples)
    code, lines = cli(capsys, train.main, FLAGS + ["--learning-rate", "3e38", "--weight-decay", "10", "--data", tmp_path,
                                                   "--workdir", tmp_path / "cli"])
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m mtcnn_jax.train: error: pnet: the parameters are not finite after step 1 ")
    assert lines[0].endswith("; stopped, no checkpoint was saved before it")
    assert steps_in(tmp_path / "cli") == []


def test_param_norm_bound_stops_the_run(samples, tmp_path):
    with pytest.raises(train.NonFiniteLossError, match=r"norm .* exceeds --max-param-norm 1 after step 1"):
        train.train(dataclasses.replace(BASE, max_param_norm=1.0), samples, tmp_path)


def test_ctrl_c_saves_the_step_and_the_resume_is_bit_for_bit(samples, run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_samples", lambda path: samples)
    argv = FLAGS + ["--data", tmp_path, "--workdir", tmp_path / "w"]
    assert train.config_from_args(train.build_parser().parse_args(map(str, argv))) == BASE
    interrupt_at(monkeypatch, 8, error=KeyboardInterrupt)  # Ctrl-C while step 8 runs
    code, lines = cli(capsys, train.main, argv)
    assert code == 130, lines
    assert lines[-1] == (f"python -m mtcnn_jax.train: interrupted: stopped after step 8, saved step 8 in "
                         f"{tmp_path / 'w' / 'checkpoints'}; run the same command again to resume")
    assert steps_in(tmp_path / "w") == [3, 6, 8]
    monkeypatch.undo()
    monkeypatch.setattr(train, "load_samples", lambda path: samples)
    code, lines = cli(capsys, train.main, argv)
    assert code == 0 and f"train pnet: resumed from step 8 of {tmp_path / 'w' / 'checkpoints'}" in lines, lines
    assert_trees_equal(checkpoints.load_params(tmp_path / "w"), run[1].params)
    restored = train.restore_or_init(tmp_path / "w", BASE)
    assert_trees_equal(restored.opt_state, run[1].opt_state)
    assert [r["step"] for r in read_metrics(tmp_path / "w") if r["split"] == "val"] == [6, 12]


def test_a_real_sigint_stops_after_the_step_and_saves_it(samples, run, tmp_path, capsys, monkeypatch):
    write = run_dir.write_metrics

    def write_then_press_ctrl_c(workdir, record):  # in the main thread, as the terminal's SIGINT arrives
        write(workdir, record)
        if record == {**record, "step": 6, "split": "train"}:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(run_dir, "write_metrics", write_then_press_ctrl_c)
    # train stops after the step only over Python's own handler (a library's own is left alone): make sure
    # it is in place (one full CI run failed here once; the handler found is printed in a failure's output)
    print(f"SIGINT handler at the start: {signal.getsignal(signal.SIGINT)!r}")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(train.TrainingInterrupted, match="stopped after step 6, saved step 6 in") as err:
        train.train(BASE, samples, tmp_path)
    assert err.value.saved_step == 6 and steps_in(tmp_path) == [3, 6]
    assert "train pnet: Ctrl-C: stopping after this step and saving it" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    monkeypatch.undo()
    assert_trees_equal(train.train(BASE, samples, tmp_path).params, run[1].params)


def test_nothing_non_finite_is_ever_written(tmp_path):
    tree = {"pnet": {"w": np.array([1.0, np.inf], np.float32)}, "rnet": {}, "onet": {}}  # checked before writing
    with pytest.raises(NonFiniteParamsError, match="pnet params holds non-finite values .* in w"):
        checkpoints.save_cascade(tmp_path / "c", tree)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------- checksums


def flip_a_byte(step_dir):
    """Flip one byte of the largest array file of a checkpoint, at the first of a few positions where it
    changes what is read (a byte of padding changes nothing); the damaged step's error message."""
    data = max((p for p in Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    original = data.read_bytes()
    for position in np.linspace(len(original) // 2, len(original) - 1, 6).astype(int):
        flipped = bytearray(original)
        flipped[position] ^= 0x01
        data.write_bytes(bytes(flipped))
        try:
            checkpoints.load_params(step_dir)
        except DamagedCheckpointError as err:
            return str(err)
    raise AssertionError(f"no flipped byte of {data} was detected")


def test_flipped_byte_is_detected_and_the_resume_falls_back(samples, run, cascade, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    message = flip_a_byte(workdir / "checkpoints" / "12")
    assert message.startswith(f"{workdir / 'checkpoints' / '12'} is damaged"), message
    with pytest.raises(DamagedCheckpointError, match=r"checkpoints/12 is damaged.*the newest intact step is "
                       r".*checkpoints/9: pass it instead"):
        checkpoints.load_params(workdir)
    code, lines = cli(capsys, checkpoints.main, ["--out", tmp_path / "cascade", "--pnet", workdir, "--rnet", cascade,
                                                 "--onet", cascade])
    assert code == 2 and len(lines) == 1 and "error: pnet from" in lines[0] and "is damaged" in lines[0], lines
    assert not (tmp_path / "cascade").exists()
    with pytest.warns(CheckpointWarning, match=r"checkpoints/12 is damaged.*moved to .*damaged_checkpoints/12, "
                      "resuming from the step before it"):
        state = train.train(BASE, samples, workdir)
    assert "train pnet: resumed from step 9" in capsys.readouterr().err
    assert_trees_equal(state.params, run[1].params)
    assert steps_in(workdir) == [6, 9, 12] and (workdir / "damaged_checkpoints" / "12").is_dir()


def test_checksums_catch_a_changed_value_and_legacy_checkpoints_load():
    tree = {"params": {"w": np.arange(4, dtype=np.float32)}, "step": np.int32(3)}
    custom = {"checksums": array_checksums(tree)}
    assert verify_checksums(tree, custom, "ckpt") is True
    assert verify_checksums(tree, {}, "ckpt") is False  # legacy: nothing recorded, nothing checked
    changed = {"params": {"w": np.array([0, 1, 2, 3.0000002], np.float32)}, "step": np.int32(3)}
    with pytest.raises(DamagedCheckpointError, match="ckpt is damaged: params/w do not match"):
        verify_checksums(changed, custom, "ckpt")
    with pytest.raises(DamagedCheckpointError, match="params/w"):  # same bytes, another dtype
        verify_checksums({**tree, "params": {"w": tree["params"]["w"].view(np.int32)}}, custom, "ckpt")


def write_legacy_cascade(path, params):
    """A cascade as written before checksums (no custom metadata), whatever its values."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path.resolve(), {s: params for s in STAGES})
        ckptr.wait_until_finished()


def test_checkpoints_cli_refuses_non_finite_and_bad_checksum_stages(run, cascade, tmp_path, capsys):
    workdir, state = run
    poisoned = jax.tree_util.tree_map(lambda x: np.full_like(np.asarray(x), np.nan), state.params)
    write_legacy_cascade(tmp_path / "nan", poisoned)
    code, lines = cli(capsys, checkpoints.main, ["--out", tmp_path / "a", "--pnet", workdir, "--rnet", tmp_path / "nan",
                                                 "--onet", cascade])
    assert code == 2 and len(lines) == 1 and "rnet from" in lines[0] and "non-finite values" in lines[0], lines
    with pytest.raises(NonFiniteParamsError):  # what detect --weights reads
        checkpoints.load_cascade(tmp_path / "nan")
    shutil.copytree(cascade, tmp_path / "good")
    meta_file = tmp_path / "good" / "_CHECKPOINT_METADATA"
    meta = json.loads(meta_file.read_text())
    name = next(k for k in meta["custom_metadata"]["checksums"]["arrays"] if k.startswith("onet/"))
    meta["custom_metadata"]["checksums"]["arrays"][name] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    code, lines = cli(capsys, checkpoints.main, ["--out", tmp_path / "b", "--pnet", workdir, "--rnet", cascade,
                                                 "--onet", tmp_path / "good"])
    assert code == 2 and len(lines) == 1 and f"onet from {tmp_path / 'good'}" in lines[0], lines
    assert f"{name} do not match their recorded checksums" in lines[0]
    with pytest.raises(DamagedCheckpointError, match=name):
        checkpoints.load_cascade(tmp_path / "good")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------- a run's other files


def test_torn_metrics_line_is_dropped_and_a_damaged_one_refused(samples, run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    metrics = workdir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 12, "split": "tra')  # killed while writing a line
    with pytest.warns(CheckpointWarning, match=r"metrics.jsonl: dropped its torn last line"):
        train.train(BASE, samples, workdir)  # at step 12 already: nothing to redo
    assert metrics.read_text() == good
    lines = good.splitlines()
    metrics.write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 3 is damaged"):
        train.train(BASE, samples, workdir)


@pytest.mark.parametrize("text, what", [("", "empty"), ('{"stage": "pn', "not valid JSON")])
def test_damaged_config_is_refused_naming_it(samples, tmp_path, capsys, monkeypatch, text, what):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"config.json is damaged: {what}"):
        train.train(BASE, samples, tmp_path / "w")
    monkeypatch.setattr(train, "load_samples", lambda path: samples)
    code, lines = cli(capsys, train.main, FLAGS + ["--data", tmp_path, "--workdir", tmp_path / "w"])
    assert code == 2 and len(lines) == 1 and "config.json is damaged" in lines[0], lines
    assert (tmp_path / "w" / "config.json").read_text() == text  # left as it was


def test_config_changes_allowed_and_refused(samples, run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(run[0], workdir)
    with pytest.raises(ValueError, match=r"--batch-size 16 -> 32, --seed 0 -> 1\): pass --allow-config-change"):
        train.train(dataclasses.replace(BASE, batch_size=32, seed=1), samples, workdir)
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16  # not rewritten
    train.train(dataclasses.replace(BASE, log_interval=4), samples, workdir)  # how it logs: no flag needed
    assert "resumed from step 12" in capsys.readouterr().err
    old = {k: v for k, v in dataclasses.asdict(BASE).items() if k != "max_param_norm"}  # before the field
    assert config_changes(json.loads(json.dumps(old)), BASE) == []
    assert config_changes({**old, "lr_decay_fractions": [0.5, 0.8]}, BASE) == [("lr_decay_fractions", [0.5, 0.8],
                                                                              [0.5])]


# ------------------------------------------------------------------------------------------ provenance


def test_provenance_from_the_step_to_the_cascade(run, cascade, tmp_path, capsys):
    workdir, state = run
    params, where = checkpoints.load_stage(workdir)
    assert where["step"] == 12 and where["version"] == __version__
    assert where["config"] == json.loads(json.dumps(dataclasses.asdict(BASE)))
    assert where["samples"] == {"count": 70, "train": 63, "val": 7}
    code, _ = cli(capsys, checkpoints.main, ["--out", tmp_path / "cascade", "--pnet", workdir, workdir,
                                             "--rnet", cascade, "--onet", cascade])
    assert code == 0
    assembled, provenance = checkpoints.load_cascade(tmp_path / "cascade", with_provenance=True)
    assert provenance["version"] == __version__
    pnet = provenance["stages"]["pnet"]
    assert pnet["averaged"] and [s["checkpoint"] for s in pnet["sources"]] == [str(workdir / "checkpoints" / "12")] * 2
    assert pnet["sources"][0]["samples"]["count"] == 70 and pnet["sources"][0]["config"]["stage"] == "pnet"
    assert provenance["stages"]["rnet"]["sources"] == [{"checkpoint": str(cascade)}]  # a cascade that records none
    assert not provenance["stages"]["onet"]["averaged"]
    assert_trees_equal(assembled["pnet"], state.params)


def test_samples_summary_counts_types_in_memory_and_reads_the_set_summary(samples, tmp_path):
    data = input_pipeline.open_samples(samples, BASE, in_memory=True)
    (tmp_path / "summary.json").write_text(json.dumps({"stage": "pnet", "kept": {"positive": 20}, "total": 70,
                                                       "skipped": {"huge": 1}}))
    summary = train.samples_summary(data, np.arange(63), np.arange(7), tmp_path)
    labels = [s["label"] for s in samples]
    assert summary["types"] == {"negative": labels.count(0), "positive": labels.count(1), "part": labels.count(-1),
                                "landmark": labels.count(-2)}
    assert summary["path"] == str(tmp_path.resolve())
    assert summary["sample_set"] == {"stage": "pnet", "kept": {"positive": 20}, "total": 70}


def test_the_committed_cascade_is_checksummed_and_says_where_it_came_from():
    path = REPO / "checkpoints" / "wider_subset"
    params, provenance = checkpoints.load_cascade(path, with_provenance=True)  # its checksums verified
    assert set(params) == set(STAGES) and set(provenance["stages"]) == set(STAGES)
    onet = provenance["stages"]["onet"]["sources"][0]
    assert onet["config"]["stage"] == "onet" and onet["step"] == onet["config"]["steps"]


def test_a_legacy_cascade_loads_unverified(run, tmp_path):
    _, state = run
    write_legacy_cascade(tmp_path / "legacy", state.params)
    params, provenance = checkpoints.load_cascade(tmp_path / "legacy", with_provenance=True)
    assert provenance == {} and set(params) == set(STAGES)
    assert_trees_equal(params["pnet"], state.params)
