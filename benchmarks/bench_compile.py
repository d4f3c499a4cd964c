"""Where a bucket's compile goes: the stage programs of `compiled.stage_chain` compiled bucket after bucket in
one process (compile cache off), each program's XLA seconds, each chain's wall (tracing and export included),
and the whole cascade as one program for comparison.

Usage: PYTHONPATH=. python benchmarks/bench_compile.py [--buckets 768x1024,1024x1024,768x1536] [--batch 1]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax

from mtcnn_jax import compile_cache, compiled, pretrained
from mtcnn_jax.cascade import cascade_fn
from mtcnn_jax.cascade_config import CascadeConfig

XLA_EVENT = "/jax/core/compile/backend_compile_duration"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--buckets", default="768x1024,1024x1024,768x1536", help="HxW,HxW,... in this order")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    compile_cache.configure("off")
    params, config = pretrained.load_pretrained(), CascadeConfig()
    xla: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: xla.append(seconds) if event == XLA_EVENT else None)
    buckets = [tuple(int(v) for v in b.split("x")) for b in args.buckets.split(",")]
    seen: set[tuple] = set()
    print("| bucket | new programs (XLA s) | chain wall s | whole as one program: trace + export s, XLA s |")
    print("|---|---|---|---|")
    for hw in buckets:
        chain = compiled.stage_chain(hw, config, "onet")
        new = [stage for stage, shape in chain if (stage, shape) not in seen]
        seen.update(chain)
        del xla[:]
        t0 = time.perf_counter()
        compiled.compiled_cascade(params, hw, args.batch, config)
        wall = time.perf_counter() - t0
        programs = ", ".join(f"{stage} {s:.2f}" for stage, s in zip(new, xla))
        t0 = time.perf_counter()
        fn = functools.partial(cascade_fn, config=config)
        lowered = jax.jit(fn).lower(*compiled.bucket_arguments(params, hw, args.batch, config))
        t1 = time.perf_counter()
        lowered.compile(compiled.compiler_options())
        print(f"| {hw[0]}x{hw[1]} | {programs} | {wall:.2f} | {t1 - t0:.2f}, {time.perf_counter() - t1:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
