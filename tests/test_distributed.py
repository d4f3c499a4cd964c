"""Training on several processes (`mtcnn_jax.distributed`): two processes on localhost (CPU collectives) train
the params one process trains with the same global batch, write each checkpoint and metric once, and a run
saved by either resumes on the other; each process reads only its rows of a batch; bad flags are one line.
Sample sets made in shards (`samples --shard I/N`): each image cut in one shard, all N read as one set."""

import dataclasses
import functools
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mtcnn_jax import input_pipeline, sample_geometry, sample_shards, train
from mtcnn_jax import samples as samples_module
from mtcnn_jax.checkpoint_integrity import read_step
from mtcnn_jax.datasets import load_samples
from test_train import BASE, assert_trees_close, assert_trees_equal, synthetic_samples

pytestmark = pytest.mark.timeout(240)

CONFIG = dataclasses.replace(BASE, steps=6, log_interval=3, checkpoint_interval=3, eval_interval=6)

# One process of a run: joins the others (when there are several), then trains CONFIG to `until`.
SCRIPT = textwrap.dedent(
    """
    import dataclasses, sys
    process, count, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    until = int(sys.argv[5])
    from mtcnn_jax import distributed
    if count > 1:
        distributed.initialize(f"localhost:{{port}}", count, process, timeout_s=60)
    import jax
    sys.path.insert(0, {tests!r})
    from test_distributed import CONFIG
    from test_train import synthetic_samples
    from mtcnn_jax import train
    assert jax.device_count() == 2 and jax.process_count() == count, (jax.devices(), count)
    train.train(CONFIG, synthetic_samples(70, 12), workdir, until_step=until)
    print("TRAINED", process)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir: Path, processes: int, until: int) -> list[subprocess.Popen]:
    """A run of CONFIG on 2 CPU devices in all: 2 processes of 1 device, or 1 process of 2."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    if processes == 1:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    script, port = SCRIPT.format(tests=str(Path(__file__).parent)), str(_free_port())
    return [subprocess.Popen([sys.executable, "-c", script, str(i), str(processes), port, str(workdir), str(until)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def finish(runs: list[subprocess.Popen], timeout: float = 150) -> None:
    """Wait for every process; on a timeout kill them (SIGKILL: JAX catches SIGTERM) and fail."""
    outputs = []
    for run in runs:
        try:
            outputs.append(run.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for r in runs:
                r.kill()
            outputs.append(run.communicate())
    for run, (out, err) in zip(runs, outputs):
        assert f"TRAINED {run.args[3]}" in out, f"process {run.args[3]}:\n{out[-2000:]}\n{err[-4000:]}"


def params_at(workdir: Path, step: int):
    return read_step(workdir / "checkpoints" / str(step))[0]["params"]


def metrics(workdir: Path) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_sec"} for r in records]


def test_two_processes_train_what_one_process_trains_and_resume_on_either(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    # Steps 1-3: two processes in `two`, one process in `one`; steps 4-6: the other way round. One run at a
    # time: on a 2-core machine, three processes at once take longer than one after the other.
    for workdir, processes, until in ((two, 2, 3), (one, 1, 3), (two, 1, 6), (one, 2, 6)):
        finish(launch(workdir, processes, until))
    for step in (3, 6):
        assert_trees_equal(params_at(two, step), params_at(one, step))  # bit for bit
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir()) == [3, 6]
    assert metrics(two) == metrics(one)  # each record written once, by process 0
    assert [(r["step"], r["split"]) for r in metrics(two)] == [(3, "train"), (6, "train"), (6, "val")]
    # one process on one device: the same step, up to float rounding (the gradient is averaged in another order)
    alone = train.train(CONFIG, synthetic_samples(70, 12), tmp_path / "alone")
    assert_trees_close(alone.params, params_at(two, 6), rtol=1e-5, atol=1e-6)


def test_each_process_reads_its_rows_of_the_global_batch(monkeypatch):
    config = dataclasses.replace(CONFIG, batch_size=12, color_jitter=0.3, blur_probability=0.5)
    data = input_pipeline.InMemorySamples(input_pipeline.load_arrays(synthetic_samples(40, 12), config))
    train_idx = np.arange(40)
    whole = input_pipeline.training_batch(data, train_idx, config, step=5)
    read = []
    monkeypatch.setattr(data, "read", lambda idx, read_all=data.read: read.append(len(idx)) or read_all(idx))
    parts = [input_pipeline.process_batch(data, train_idx, config, 5, index, 3) for index in range(3)]
    assert read == [4, 4, 4]  # each process reads only its 4 samples
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    assert input_pipeline.process_rows(12, 2, 3) == slice(8, 12)
    with pytest.raises(ValueError, match="batch size 12 does not divide evenly over 5 processes"):
        input_pipeline.process_rows(12, 0, 5)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-processes", "2", "--process-id", "0"], "--num-processes 2 needs --coordinator HOST:PORT"),
        (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
         r"--process-id 2: expected an integer in 0 \.\. 1"),
        (["--coordinator", "localhost:1234", "--num-processes", "0", "--process-id", "0"],
         "--num-processes 0: expected an integer >= 1"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "1"],
         "--coordinator localhost: expected HOST:PORT"),
        (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes N and --process-id I"),
    ],
)
def test_bad_process_flags_are_one_error_line(flags, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--stage", "pnet", "--data", str(tmp_path), "--workdir", str(tmp_path / "run"), *flags])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith(f"{train.PROG}: error: "), error_lines
    assert re.search(message, error_lines[0]), error_lines


# ---------------------------------------------------------------------------------- sample set shards


@pytest.fixture(scope="module")
def sharded(shared_data, tmp_path_factory):
    """A small P-Net set made whole and as 2 shards (by image), from the same 5 images and 8 landmark faces."""
    out = tmp_path_factory.mktemp("shards")
    make = functools.partial(samples_module.make_samples, shared_data / "wider_face", shared_data / "lfw_net",
                             cfg=sample_geometry.SampleConfig(seed=3), max_images=5, max_landmarks=8, workers=1)
    whole = make(out / "whole")
    shards = [make(out / "sharded", shard=(i, 2)) for i in range(2)]
    return out, whole, shards


def test_sample_shards_split_the_images_and_read_as_one_set(sharded):
    out, whole, shards = sharded
    assert [s["shard"] for s in shards] == [[0, 2], [1, 2]]
    # every image (and landmark face) is cut in exactly one shard, exactly as the whole run cuts it
    assert [s["images"] for s in shards] == [3, 2] and [s["landmark_faces"] for s in shards] == [4, 4]
    for kind in whole["generated"]:
        assert sum(s["generated"][kind] for s in shards) == whole["generated"][kind], kind
    folders = sample_shards.shard_folders(out / "sharded")
    assert [f.name for f in folders] == ["shard-0-of-2", "shard-1-of-2"]
    parts = [load_samples(f) for f in folders]
    one = sample_shards.load_sample_set(out / "sharded")
    assert len(one) == sum(len(p) for p in parts) == sum(s["total"] for s in shards)
    sources = [{r["source"] for r in p.__getitems__(range(len(p)))} for p in parts]
    assert not sources[0] & sources[1]  # no image in both shards
    picked = [len(parts[0]) + 1, 0, len(parts[0]) - 1]
    got = one.__getitems__(picked)
    expected = [parts[1][1], parts[0][0], parts[0][len(parts[0]) - 1]]
    for g, e in zip(got, expected):
        assert g["source"] == e["source"] and np.array_equal(g["image"], e["image"]) and g["label"] == e["label"]
    assert len(sample_shards.load_sample_set(out / "whole")) == whole["total"]


def test_a_missing_shard_is_refused_by_name(sharded, tmp_path):
    out, _, _ = sharded
    (tmp_path / "shard-0-of-2").symlink_to(out / "sharded" / "shard-0-of-2")
    with pytest.raises(ValueError, match="lacks shard 1 of 2: make it with --shard I/2"):
        sample_shards.load_sample_set(tmp_path)


@pytest.mark.parametrize("shard", ["2/2", "a/2", "1"])
def test_bad_shard_flag_is_one_error_line(shard, shared_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        samples_module.main(["pnet", "--wider", str(shared_data / "wider_face"), "--out", str(tmp_path / "s"),
                             "--shard", shard])
    assert exit_info.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "--shard" in error_lines[0], error_lines
    assert not (tmp_path / "s").exists()
