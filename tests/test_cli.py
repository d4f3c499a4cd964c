"""Every command line refuses bad flags and paths up front with one `error:` line, never a traceback (cli.py).

The mains run in-process over a table of bad argument lists (all fail before any work: no dataset is built,
nothing is trained); one subprocess per entry point checks what a user really sees.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mtcnn_jax import checkpoints, cli, compile_cache, evaluate, pretrained, samples, train
from mtcnn_jax.sample_geometry import SampleConfig
from mtcnn_jax.train_config import CONFIGS

FDDB = Path(__file__).resolve().parent / "fixtures" / "fddb"
PRED = str(FDDB / "detections.json")

# (main, argv); in argv {tmp} is a scratch folder holding: file (a non-empty text file), empty.json,
# bad.json (malformed), list.json (a JSON list), folder/ (empty), run_rnet/ and bad_run/ (an rnet run's and
# a broken config.json), orphan/ (checkpoints/ without config.json), done/mtcnn_samples/pnet/.
SAMPLES = ["pnet", "--wider", "{tmp}/folder", "--out", "{tmp}/out"]
TRAIN = ["--stage", "pnet", "--data", "{tmp}/folder", "--workdir", "{tmp}/w"]
CKPT = ["--out", "{tmp}/cascade"]
CASES = {
    "samples-no-wider": (samples.main, ["pnet", "--wider", "{tmp}/missing", "--out", "{tmp}/out"]),
    "samples-wider-file": (samples.main, ["pnet", "--wider", "{tmp}/file", "--out", "{tmp}/out"]),
    "samples-no-landmarks": (samples.main, SAMPLES + ["--landmarks", "{tmp}/missing"]),
    "samples-max-images-0": (samples.main, SAMPLES + ["--max-images", "0"]),
    "samples-landmark-frame-text": (samples.main, SAMPLES + ["--landmark-frame", "wide"]),
    "samples-landmark-frame-0": (samples.main, SAMPLES + ["--landmark-frame", "0,1.4,0"]),
    "samples-max-images-neg": (samples.main, SAMPLES + ["--max-images", "-1"]),
    "samples-max-landmarks-0": (samples.main, SAMPLES + ["--max-landmarks", "0"]),
    "samples-workers-0": (samples.main, SAMPLES + ["--workers", "0"]),
    "samples-workers-text": (samples.main, SAMPLES + ["--workers", "many"]),
    "samples-ratio-short": (samples.main, SAMPLES + ["--ratio", "1:2"]),
    "samples-ratio-nan": (samples.main, SAMPLES + ["--ratio", "nan:1:1:1"]),
    "samples-ratio-zero": (samples.main, SAMPLES + ["--ratio", "0:0:0:0"]),
    "samples-ratio-negative": (samples.main, SAMPLES + ["--ratio=-1:1:1:1"]),
    "samples-seed-negative": (samples.main, SAMPLES + ["--seed", "-1"]),
    "samples-min-face-0": (samples.main, SAMPLES + ["--min-face", "0"]),
    "samples-flip-prob": (samples.main, SAMPLES + ["--flip-prob", "1.5"]),
    "samples-face-jitters": (samples.main, SAMPLES + ["--face-jitters", "-1"]),
    "samples-out-file": (samples.main, ["pnet", "--wider", "{tmp}/folder", "--out", "{tmp}/file"]),
    "samples-tfds-dir-file": (samples.main, SAMPLES + ["--tfds-dir", "{tmp}/file"]),
    "samples-set-exists": (samples.main, ["pnet", "--wider", "{tmp}/folder", "--out", "{tmp}/done"]),
    "samples-pnet-weights": (samples.main, SAMPLES + ["--weights", "{tmp}/folder"]),
    "samples-weights-missing": (samples.main, ["rnet", *SAMPLES[1:], "--weights", "{tmp}/missing"]),
    "samples-weights-not-checkpoint": (samples.main, ["rnet", *SAMPLES[1:], "--weights", "{tmp}/folder"]),
    "samples-bad-stage": (samples.main, ["qnet", *SAMPLES[1:]]),
    "train-steps-0": (train.main, TRAIN + ["--steps", "0"]),
    "train-batch-size-0": (train.main, TRAIN + ["--batch-size", "0"]),
    "train-lr-nan": (train.main, TRAIN + ["--learning-rate", "nan"]),
    "train-lr-negative": (train.main, TRAIN + ["--learning-rate=-0.1"]),
    "train-lr-inf": (train.main, TRAIN + ["--learning-rate", "inf"]),
    "train-cls-weight-negative": (train.main, TRAIN + ["--cls-weight=-1"]),
    "train-weights-all-0": (train.main, TRAIN + ["--cls-weight", "0", "--box-weight", "0", "--landmark-weight", "0"]),
    "train-lr-decay-outside": (train.main, TRAIN + ["--lr-decay-fractions", "0.5,2"]),
    "train-lr-decay-text": (train.main, TRAIN + ["--lr-decay-fractions", "half"]),
    "train-momentum-1": (train.main, TRAIN + ["--momentum", "1"]),
    "train-optimizer": (train.main, TRAIN + ["--optimizer", "rmsprop"]),
    "train-landmark-norm": (train.main, TRAIN + ["--landmark-norm", "l3"]),
    "train-ohem-0": (train.main, TRAIN + ["--ohem-ratio", "0"]),
    "train-seed-negative": (train.main, TRAIN + ["--seed=-1"]),
    "train-val-fraction-1": (train.main, TRAIN + ["--val-fraction", "1"]),
    "train-input-size": (train.main, TRAIN + ["--input-size", "13"]),
    "train-log-interval-0": (train.main, TRAIN + ["--log-interval", "0"]),
    "train-max-checkpoints-0": (train.main, TRAIN + ["--max-checkpoints", "0"]),
    "train-blur-sigma-0": (train.main, TRAIN + ["--blur-sigma", "0"]),
    "train-color-jitter-1": (train.main, TRAIN + ["--color-jitter", "1"]),
    "train-no-data": (train.main, ["--stage", "pnet", "--data", "{tmp}/missing", "--workdir", "{tmp}/w"]),
    "train-data-file": (train.main, ["--stage", "pnet", "--data", "{tmp}/file", "--workdir", "{tmp}/w"]),
    "train-data-not-samples": (train.main, TRAIN),
    "train-workdir-file": (train.main, ["--stage", "pnet", "--data", "{tmp}/folder", "--workdir", "{tmp}/file"]),
    "train-workdir-other-stage": (train.main, ["--stage", "pnet", "--data", "{tmp}/folder", "--workdir",
                                               "{tmp}/run_rnet"]),
    "train-workdir-bad-config": (train.main, ["--stage", "pnet", "--data", "{tmp}/folder", "--workdir",
                                              "{tmp}/bad_run"]),
    "train-resume-non-run": (train.main, ["--stage", "pnet", "--data", "{tmp}/folder", "--workdir", "{tmp}/orphan"]),
    "train-init-from-missing": (train.main, TRAIN + ["--init-from", "{tmp}/missing"]),
    "train-init-from-folder": (train.main, TRAIN + ["--init-from", "{tmp}/folder"]),
    "train-init-from-other-stage": (train.main, TRAIN + ["--init-from", "{tmp}/run_rnet"]),
    "checkpoints-out-file": (checkpoints.main, ["--out", "{tmp}/file"]),
    "checkpoints-out-exists": (checkpoints.main, ["--out", "{tmp}/folder"]),
    "checkpoints-out-under-file": (checkpoints.main, ["--out", "{tmp}/file/cascade"]),
    "checkpoints-run-missing": (checkpoints.main, CKPT + ["--pnet", "{tmp}/missing"]),
    "checkpoints-run-not-checkpoint": (checkpoints.main, CKPT + ["--pnet", "{tmp}/folder"]),
    "checkpoints-run-other-stage": (checkpoints.main, CKPT + ["--pnet", "{tmp}/run_rnet"]),
    "checkpoints-run-bad-config": (checkpoints.main, CKPT + ["--rnet", "{tmp}/bad_run"]),
    "checkpoints-source-missing": (checkpoints.main, CKPT + ["--source", "{tmp}/missing.whl"]),
    "evaluate-no-command": (evaluate.main, []),
    "evaluate-wider-no-gt": (evaluate.main, ["wider", "--pred", PRED, "--gt-dir", "{tmp}/missing"]),
    "evaluate-wider-empty-gt": (evaluate.main, ["wider", "--pred", PRED, "--gt-dir", "{tmp}/folder"]),
    "evaluate-pred-missing": (evaluate.main, ["fddb", "--pred", "{tmp}/missing.json", "--folds", str(FDDB)]),
    "evaluate-pred-folder": (evaluate.main, ["fddb", "--pred", "{tmp}/folder", "--folds", str(FDDB)]),
    "evaluate-pred-empty": (evaluate.main, ["fddb", "--pred", "{tmp}/empty.json", "--folds", str(FDDB)]),
    "evaluate-pred-malformed": (evaluate.main, ["fddb", "--pred", "{tmp}/bad.json", "--folds", str(FDDB)]),
    "evaluate-pred-list": (evaluate.main, ["fddb", "--pred", "{tmp}/list.json", "--folds", str(FDDB)]),
    "evaluate-folds-empty": (evaluate.main, ["fddb", "--pred", PRED, "--folds", "{tmp}/folder"]),
    "evaluate-json-folder": (evaluate.main, ["fddb", "--pred", PRED, "--folds", str(FDDB), "--json", "{tmp}/folder"]),
    "evaluate-json-under-file": (evaluate.main, ["fddb", "--pred", PRED, "--folds", str(FDDB), "--json",
                                                 "{tmp}/file/x.json"]),
    "evaluate-plot-kind": (evaluate.main, ["fddb", "--pred", PRED, "--folds", str(FDDB), "--plot", "{tmp}/x.foo"]),
    "evaluate-list-missing": (evaluate.main, ["landmarks", "--pred", PRED, "--list", "{tmp}/missing", "--root",
                                              "{tmp}/folder"]),
    "evaluate-root-missing": (evaluate.main, ["landmarks", "--pred", PRED, "--list", "{tmp}/file", "--root",
                                              "{tmp}/missing"]),
    "evaluate-celeba-no-bbox": (evaluate.main, ["landmarks", "--pred", PRED, "--list", "{tmp}/file", "--root",
                                                "{tmp}/folder", "--format", "celeba"]),
    "evaluate-bbox-missing": (evaluate.main, ["landmarks", "--pred", PRED, "--list", "{tmp}/file", "--root",
                                              "{tmp}/folder", "--bbox-list", "{tmp}/missing"]),
    "pretrained-source-missing": (pretrained.main, ["--source", "{tmp}/missing.whl"]),
    "pretrained-source-not-wheel": (pretrained.main, ["--source", "{tmp}/file"]),
    "pretrained-source-empty-folder": (pretrained.main, ["--source", "{tmp}/folder"]),
    "pretrained-unknown-flag": (pretrained.main, ["--fetch-everything"]),
}


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The files and folders the bad argument lists name."""
    (tmp_path / "file").write_text("not what was asked for\n")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "bad.json").write_text("{bad")
    (tmp_path / "list.json").write_text("[1]")
    for folder in ("folder", "run_rnet", "bad_run", "orphan/checkpoints/5", "done/mtcnn_samples/pnet"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "run_rnet" / "config.json").write_text(json.dumps({"stage": "rnet"}))
    (tmp_path / "bad_run" / "config.json").write_text("{")
    return tmp_path


def run_main(main, argv: list[str]) -> int:
    """A CLI main's exit code, in-process (argparse's usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as end:
        return end.code


def assert_one_error_line(code: int, stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert code not in (0, None), stderr
    assert "Traceback" not in stderr, stderr
    assert lines and [line for line in lines if "error:" in line] == [lines[-1]], stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_argument_is_one_error_line(name, scratch, capsys, monkeypatch):
    monkeypatch.setattr(compile_cache, "configure", lambda folder="default": None)  # keep this process's cache
    main, argv = CASES[name]
    code = run_main(main, [a.format(tmp=scratch) for a in argv])
    out, err = capsys.readouterr()
    assert_one_error_line(code, err)
    assert code == 2 and not out
    assert not (scratch / "out").exists() and not (scratch / "w").exists() and not (scratch / "cascade").exists()


@pytest.mark.parametrize("module, argv", [
    ("samples", ["pnet", "--wider", ".", "--out", "o", "--max-images", "0"]),
    ("train", ["--stage", "pnet", "--data", ".", "--workdir", "w", "--learning-rate", "nan"]),
    ("checkpoints", ["--out", "o", "--pnet", "missing"]),
    ("evaluate", ["fddb", "--pred", "missing.json", "--folds", "."]),
    ("pretrained", ["--source", "missing.whl"]),
])
def test_entry_point_says_one_line(module, argv, tmp_path):
    result = subprocess.run([sys.executable, "-m", f"mtcnn_jax.{module}", *argv], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert_one_error_line(result.returncode, result.stderr)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        f"python -m mtcnn_jax.{module}: error: ")
    assert not any(tmp_path.iterdir())  # nothing written


@cli.entry("prog")
def _failing(argv):
    """A main that fails the way argv says."""
    raise {"bug": RuntimeError("unexpected\nsecond line"), "input": ValueError("bad value"),
           "key": KeyError("missing key"), "quiet": FileNotFoundError(), "interrupt": KeyboardInterrupt()}[argv[0]]


def test_a_bug_is_one_line_with_the_hint_and_the_variable_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv(cli.TRACEBACK_VARIABLE, raising=False)
    assert _failing(["bug"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prog: error: RuntimeError: unexpected")
    assert cli.TRACEBACK_VARIABLE in err and "Traceback" not in err
    assert _failing(["input"]) == 2 and capsys.readouterr().err == "prog: error: bad value\n"
    assert _failing(["key"]) == 1 and capsys.readouterr().err.startswith("prog: error: KeyError: missing key (")
    assert _failing(["quiet"]) == 2 and capsys.readouterr().err == "prog: error: FileNotFoundError\n"
    assert _failing(["interrupt"]) == cli.INTERRUPTED
    monkeypatch.setenv(cli.TRACEBACK_VARIABLE, "1")
    with pytest.raises(RuntimeError, match="unexpected"):
        _failing(["bug"])
    with pytest.raises(ValueError, match="bad value"):
        _failing(["input"])


def test_the_configs_refuse_what_the_clis_refuse():
    with pytest.raises(ValueError, match="--learning-rate nan"):
        train.config_from_args(train.build_parser().parse_args(TRAIN[:2] + ["--data", "d", "--workdir", "w",
                                                                            "--learning-rate", "nan"]))
    with pytest.raises(ValueError, match=r"min_face \(--min-face\) 0"):
        SampleConfig(min_face=0)
    with pytest.raises(ValueError, match="--batch-size 0"):
        dataclasses.replace(CONFIGS["rnet"], batch_size=0)
