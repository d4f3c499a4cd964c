"""The trainer end to end, streaming its samples vs holding them in memory: steps/s and peak memory.

    PYTHONPATH=. python benchmarks/bench_train.py [--stages rnet onet] [--sizes 60000 240000]
        [--memory-stage onet] [--steps N] [--batch-size 384] [--data DIR] [--json OUT]

Every number comes from a child process that runs `train.train` (the real loop: input pipeline, prefetch
thread, data-parallel step (shard_map over the devices), logging, a checkpoint at the end) for `--steps` steps (default: about 15 s of warm steps per stage on a 2-core CPU) on a sample set written to disk,
and reports its peak RSS (`resource.getrusage(...).ru_maxrss`) and its per-step times (metrics.jsonl, one
record per step). steps/s is the mean rate after the first two steps (the compile).

1. Throughput: each of `--stages` on the smallest set, streamed (the default) and `--in-memory`.
2. Memory: `--memory-stage` streamed on every size (and in memory on the smallest), to show that streaming's
   peak does not grow with the set.

The sets are synthetic (random pixels, labels in the 3 : 1 : 1 : 2 mix): 4,096 distinct samples written
with the sample-set builder (`datasets.MtcnnSamples`), whose records are then repeated, as written, into
array_record shards of the size asked for (the builder's Python serialisation would take minutes per 100k).
Reading a record costs the same whichever it is. They are written under `--data` (kept and reused) or a
temporary folder (deleted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from array_record.python import array_record_module

from mtcnn_jax import datasets, train
from mtcnn_jax.datasets.sample_sets import SHARD_RECORDS
from mtcnn_jax.stages import INPUT_SIZE
from mtcnn_jax.train_config import CONFIGS

POOL = 4096  # distinct samples per stage
WARMUP = 2  # steps left out of the rate: the first includes the compile
STEPS = {"pnet": 200, "rnet": 30, "onet": 10}  # default steps per run


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------- sample sets


def _pool_parts(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, -1, -2, -2], np.int32)
    for start in range(0, n, 1024):
        m = min(1024, n - start)
        rows = np.arange(start, start + m)
        yield {"keys": [f"synthetic{i:08d}" for i in rows], "source": "synthetic",
               "pixels": rng.integers(0, 256, (m, size, size, 3), np.uint8),
               "table": {"label": labels[rows % 7], "box": rng.normal(0, 0.1, (m, 4)).astype(np.float32),
                         "landmarks": rng.uniform(0, 1, (m, 10)).astype(np.float32),
                         "crop": np.zeros((m, 4), np.float32), "flipped": np.zeros(m, bool)}}


def _set_dir(directory: Path) -> Path:
    """The folder holding dataset_info.json under `directory`."""
    return next(directory.glob("**/dataset_info.json")).parent


def pool_set(root: Path, stage: str) -> Path:
    """POOL synthetic samples of `stage` written by the sample-set builder (cached under root)."""
    directory = root / f"{stage}_pool"
    if not list(directory.glob("**/dataset_info.json")):
        manual = root / f"{stage}_pool_manual"
        datasets.stage_samples(manual, INPUT_SIZE[stage], POOL, _pool_parts(POOL, INPUT_SIZE[stage]))
        datasets.build(datasets.MtcnnSamples, manual, directory, config=stage)
        shutil.rmtree(manual)
    return _set_dir(directory)


def synthetic_set(root: Path, stage: str, n: int) -> Path:
    """A sample set of n records (the pool's, repeated) readable by `datasets.load_samples` (cached under root)."""
    directory = root / f"{stage}_{n}"
    if list(directory.glob("**/dataset_info.json")):
        return directory
    pool = pool_set(root, stage)
    info = json.loads((pool / "dataset_info.json").read_text())
    [split] = info["splits"]
    records = []
    for shard in sorted(pool.glob("*.array_record-*")):
        reader = array_record_module.ArrayRecordReader(str(shard))
        records += reader.read_all()
        reader.close()
    target = directory / pool.relative_to(root / f"{stage}_pool")
    target.mkdir(parents=True)
    shard_size, lengths, total_bytes = SHARD_RECORDS, [], 0
    shards = -(-n // shard_size)
    for k in range(shards):
        count = min(shard_size, n - k * shard_size)
        path = target / f"mtcnn_samples-train.array_record-{k:05d}-of-{shards:05d}"
        writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")  # as TFDS writes them
        for i in range(k * shard_size, k * shard_size + count):
            writer.write(records[i % len(records)])
        writer.close()
        lengths.append(str(count))
        total_bytes += path.stat().st_size
    split.update(shardLengths=lengths, numBytes=str(total_bytes))
    (target / "dataset_info.json").write_text(json.dumps(info, indent=2))
    shutil.copy(pool / "features.json", target / "features.json")
    return directory


# ------------------------------------------------------------------------------------------ one child


def child(args: argparse.Namespace) -> None:
    """Train for --steps steps on --child-data and print one JSON line: peak RSS and the per-step seconds."""
    config = dataclasses.replace(CONFIGS[args.child_stage], steps=args.steps, batch_size=args.batch_size,
                                 log_interval=1, eval_interval=10**9, checkpoint_interval=10**9, val_fraction=0.0)
    workdir = Path(tempfile.mkdtemp(prefix="bench_train_run_"))
    start = time.perf_counter()
    try:
        train.train(config, datasets.load_samples(args.child_data), workdir, in_memory=args.child_in_memory)
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    step_s = [args.batch_size / r["samples_per_sec"] for r in records]
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.perf_counter() - start, "step_s": step_s}))


def run_child(stage: str, n: int, data: Path, in_memory: bool, args: argparse.Namespace) -> dict:
    """steps/s (after WARMUP steps), first-step seconds and peak RSS of one training child."""
    steps = args.steps or STEPS[stage]
    cmd = [sys.executable, __file__, "--child-stage", stage, "--child-data", str(data), "--steps", str(steps),
           "--batch-size", str(args.batch_size)] + (["--child-in-memory"] if in_memory else [])
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    warm = out["step_s"][WARMUP:]
    return {"stage": stage, "mode": "in memory" if in_memory else "streamed", "set_size": n,
            "steps_per_s": len(warm) / sum(warm), "median_step_ms": 1e3 * statistics.median(warm),
            "first_step_s": out["step_s"][0], "peak_rss_mb": out["peak_rss_mb"], "child_seconds": out["seconds"]}


# ----------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=["rnet", "onet"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[60_000, 240_000])
    parser.add_argument("--memory-stage", default="onet")
    parser.add_argument("--steps", type=int, help=f"steps per run (default {STEPS})")
    parser.add_argument("--batch-size", type=int, default=384)
    parser.add_argument("--data", help="folder for the synthetic sets (kept and reused); default: a temporary one")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child-stage", help=argparse.SUPPRESS)
    parser.add_argument("--child-data", help=argparse.SUPPRESS)
    parser.add_argument("--child-in-memory", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stage:
        return child(args)
    print(f"{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.local_device_count()} x {jax.devices()[0].device_kind}; batch {args.batch_size}, "
          f"{args.steps or STEPS} steps per run, rate over all but the first {WARMUP}", flush=True)
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench_train_sets_"))
    try:
        sizes = sorted(args.sizes)
        start = time.perf_counter()
        sets = {(stage, n): synthetic_set(root, stage, n) for stage in args.stages for n in sizes[:1]}
        sets.update({(args.memory_stage, n): synthetic_set(root, args.memory_stage, n) for n in sizes})
        print(f"sample sets written in {time.perf_counter() - start:.0f} s under {root}", flush=True)
        runs = {}
        print("| stage | set | mode | steps/s | median step ms | first step s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|")
        plan = [(stage, sizes[0], mode) for stage in args.stages for mode in (False, True)]
        plan += [(args.memory_stage, n, False) for n in sizes[1:]]
        for stage, n, in_memory in plan:
            r = runs[(stage, n, in_memory)] = run_child(stage, n, sets[(stage, n)], in_memory, args)
            print(f"| {stage} | {n:,} | {r['mode']} | {r['steps_per_s']:.2f} | {r['median_step_ms']:.0f} | "
                  f"{r['first_step_s']:.1f} | {r['peak_rss_mb']:.0f} |", flush=True)
        print()
        for stage in args.stages:
            streamed, in_memory = runs[(stage, sizes[0], False)], runs[(stage, sizes[0], True)]
            print(f"{stage}: streaming runs at {streamed['steps_per_s'] / in_memory['steps_per_s']:.1%} of the "
                  f"in-memory steps/s")
        peaks = [runs[(args.memory_stage, n, False)]["peak_rss_mb"] for n in sizes]
        print(f"{args.memory_stage} streamed peak RSS: " + ", ".join(f"{p:.0f} MB at {n:,}" for p, n in zip(peaks, sizes))
              + f"; growth {peaks[-1] - peaks[0]:+.0f} MB from {sizes[0]:,} to {sizes[-1]:,} samples")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"backend": jax.default_backend(), "results": list(runs.values())}, f, indent=2)
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
