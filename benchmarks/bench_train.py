"""Training throughput (samples/s) of each stage: the pmapped train step on synthetic batches of the right shapes.

    PYTHONPATH=. python benchmarks/bench_train.py [--stages pnet rnet onet] [--batch-size 384] [--steps 10]
        [--json OUT]

For each stage: the first step (compile + one run) is timed apart, then N warm steps, each waited on
(block_until_ready), give the step's median time and samples/s. "host data" times `train.training_batch`
(indexing the sample arrays `train.load_arrays` holds in memory, + flips) alone, the host-side cost of a
step. Runs on all local devices of the default backend (CPU here, GPU when present).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from mtcnn_jax import train


def synthetic_source(n: int, size: int, seed: int = 0) -> list[dict]:
    """n sample dicts with labels in the paper's 3 : 1 : 1 : 2 mix (neg : pos : part : landmark)."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, -1, -2, -2])
    return [
        {"image": rng.integers(0, 256, (size, size, 3), np.uint8), "label": int(labels[i % 7]),
         "box": rng.normal(0, 0.1, 4).astype(np.float32), "landmarks": rng.uniform(0, 1, 10).astype(np.float32)}
        for i in range(n)
    ]


def bench_stage(stage: str, batch_size: int, steps: int) -> dict:
    """Compile time, median warm step time and samples/s of one stage's training step."""
    config = dataclasses.replace(train.CONFIGS[stage], batch_size=batch_size)
    devices = jax.local_device_count()
    source = train.load_arrays(synthetic_source(max(2 * batch_size, 1000), config.input_size), config)
    indices = np.arange(len(source["label"]))
    state = train.flax.jax_utils.replicate(train.init_state(config))
    step_fn = train.compiled_step(config)
    batches = [train.shard(train.training_batch(source, indices, config, s), devices) for s in range(steps + 1)]
    start = time.perf_counter()
    state, _ = jax.block_until_ready(step_fn(state, batches[0]))
    first = time.perf_counter() - start
    times = []
    for batch in batches[1:]:
        start = time.perf_counter()
        state, _ = jax.block_until_ready(step_fn(state, batch))
        times.append(time.perf_counter() - start)
    host = []
    for s in range(steps):
        start = time.perf_counter()
        train.training_batch(source, indices, config, s)
        host.append(time.perf_counter() - start)
    step_s, host_s = statistics.median(times), statistics.median(host)
    return {"stage": stage, "batch_size": batch_size, "devices": devices, "first_step_s": first,
            "step_ms": 1e3 * step_s, "samples_per_s": batch_size / step_s,
            "host_data_ms": 1e3 * host_s, "samples_per_s_with_data": batch_size / (step_s + host_s)}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else platform's guess."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=["pnet", "rnet", "onet"])
    parser.add_argument("--batch-size", type=int, default=384)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"{cpu_name()}, {os.cpu_count()} cores, jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{jax.local_device_count()} x {device.device_kind}")
    print("| stage | batch | first step s | step ms | samples/s | host data ms | samples/s incl. data |")
    print("|---|---|---|---|---|---|---|")
    results = []
    for stage in args.stages:
        r = bench_stage(stage, args.batch_size, args.steps)
        results.append(r)
        print(f"| {stage} | {r['batch_size']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} | "
              f"{r['samples_per_s']:.0f} | {r['host_data_ms']:.1f} | {r['samples_per_s_with_data']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": jax.default_backend(), "device": device.device_kind, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
