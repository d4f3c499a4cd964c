"""P-Net's pyramid against the machine's peak: the share of the cascade it takes and the fraction of the
peak float32 throughput its convolutions reach (issue 23, item 6).

The peak is the best of float32 matrix products of a few sizes (XLA:CPU's fastest kernel here), and of
P-Net's own third convolution alone at the largest level (which can beat them). P-Net runs as in the
cascade: on the packed canvas of the image's bucket (`PyramidPlan.canvas_hw`) with its valid mask; its
work is the multiply-adds of its four convolution layers, counted from the shapes. The compiled cascade
(`compiled.detect_bucket`, one image) is timed stopping after each stage, for P-Net's share and what the
rest costs: the P-Net stage (pyramid, P-Net, two NMS), then R-Net's (crops, net, NMS), then O-Net's.

Usage: PYTHONPATH=. python benchmarks/bench_pnet.py [--sizes 480x640,768x1024] [--runs 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtcnn_jax import compiled, detect, nets
from mtcnn_jax.buckets import bucket_shape, pad_to_bucket
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.images import load_image
from mtcnn_jax.pyramid import PyramidPlan, level_masks, level_sizes
from mtcnn_jax.stages import STAGES

PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference" / "multiface.jpg"


def best_ms(fn, *args, runs: int) -> float:
    """The fastest of `runs` calls of a compiled function, in ms (after one call)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def pnet_flops(pnet: dict, h: int, w: int) -> float:
    """2 x the multiply-adds of P-Net's convolutions on an h x w input, from its kernels' shapes (valid
    convolutions; conv1's output pooled 2x2 as `nets.max_pool_ceil` sizes it; the two 1x1 heads)."""
    total = 0.0
    for name in ("conv1", "conv2", "conv3"):
        k, _, c_in, c_out = pnet[name]["conv"]["kernel"].shape
        h, w = h - k + 1, w - k + 1
        total += 2.0 * h * w * k * k * c_in * c_out
        if name == "conv1":
            pooled = jax.eval_shape(lambda x: nets.max_pool_ceil(x, 2, 2), jax.ShapeDtypeStruct((1, h, w, c_out), jnp.float32))
            h, w = pooled.shape[1:3]
    return total + sum(2.0 * h * w * math.prod(pnet[head]["kernel"].shape) for head in ("cls", "box"))


def peak_gflops(runs: int, largest_level_hw: tuple[int, int], conv3_kernel: tuple[int, ...]) -> tuple[float, str]:
    """The best float32 throughput seen here: matrix products, and P-Net's conv3 alone."""
    best, what = 0.0, ""
    rng = np.random.default_rng(0)
    for n in (1024, 2048, 4096):
        a, b = (jnp.asarray(rng.standard_normal((n, n)), jnp.float32) for _ in range(2))
        g = 2 * n**3 / best_ms(jax.jit(jnp.matmul), a, b, runs=max(3, runs // 3)) / 1e6
        if g > best:
            best, what = g, f"{n}x{n} matmul"
    h, w = (s // 2 for s in largest_level_hw)
    size, _, c_in, _ = conv3_kernel
    x = jnp.ones((1, h, w, c_in), jnp.float32)
    k = jnp.ones(conv3_kernel, jnp.float32)
    conv3 = jax.jit(lambda x, k: nets.conv_valid(x, k, "conv16"))
    g = 2.0 * (h - size + 1) * (w - size + 1) * math.prod(conv3_kernel) / best_ms(conv3, x, k, runs=runs) / 1e6
    if g > best:
        best, what = g, f"P-Net conv3 alone on {h}x{w}x{c_in}"
    return best, what


def measure(hw: tuple[int, int], params: dict, config: CascadeConfig, runs: int) -> dict:
    """P-Net over the pyramid of an h x w image (its bucket's canvas) and the whole cascade on it."""
    photo = load_image(PHOTO)  # tiled to the size: real faces at every scale
    reps = (math.ceil(hw[0] / photo.shape[0]), math.ceil(hw[1] / photo.shape[1]), 1)
    image = np.ascontiguousarray(np.tile(photo, reps)[: hw[0], : hw[1]])
    bucket = bucket_shape(*hw, config)
    plan = PyramidPlan.of(*bucket, config)
    level_hw = level_sizes(*hw, list(plan.scales))
    masks = level_masks(level_hw, plan)
    canvas = jnp.zeros((1, *plan.canvas_hw, 3), jnp.float32)
    run = jax.jit(lambda p, c, m: nets.pnet(p, c, valid_mask=m[None]))
    pnet_ms = best_ms(run, params["pnet"], canvas, masks, runs=runs)
    flops = pnet_flops(params["pnet"], *plan.canvas_hw)
    batch = pad_to_bucket([image], bucket)
    upto_ms = {}
    for stage in STAGES:  # the cascade stopping after each stage: what each adds
        run_upto = lambda: compiled.detect_bucket(params, *batch, config, upto=stage)  # noqa: B023, E731
        run_upto()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            run_upto()
            times.append(time.perf_counter() - t)
        upto_ms[stage] = 1000 * min(times)
    return {"image": f"{hw[0]}x{hw[1]}", "bucket": f"{bucket[0]}x{bucket[1]}", "levels": len(plan.scales),
            "pnet_gflop": flops / 1e9, "pnet_ms": pnet_ms, "cascade_ms": upto_ms["onet"],
            "upto_ms": upto_ms}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="480x640,768x1024", help="image sizes HxW")
    p.add_argument("--runs", type=int, default=15, help="timed calls (the fastest is reported)")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    config, params = CascadeConfig(), detect.resolve_params(None)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    rows = [measure(hw, params, config, args.runs) for hw in sizes]
    largest = max((PyramidPlan.of(*bucket_shape(*hw, config), config).bufs[0] for hw in sizes), key=lambda b: b[0] * b[1])
    peak, what = peak_gflops(args.runs, largest, params["pnet"]["conv3"]["conv"]["kernel"].shape)
    print(f"peak: {peak:.0f} GFLOP/s float32 ({what}; {jax.devices()[0].device_kind})")
    print("| image | bucket | levels | P-Net GFLOP | P-Net ms | P-Net stage ms | + R-Net stage | + O-Net stage | "
          "cascade ms | P-Net share | P-Net GFLOP/s | of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["pnet_gflops"] = r["pnet_gflop"] / r["pnet_ms"] * 1000
        r["of_peak"] = r["pnet_gflops"] / peak
        u = r["upto_ms"]
        print(f"| {r['image']} | {r['bucket']} | {r['levels']} | {r['pnet_gflop']:.2f} | {r['pnet_ms']:.1f} | "
              f"{u['pnet']:.1f} | {u['rnet'] - u['pnet']:.1f} | {u['onet'] - u['rnet']:.1f} | {r['cascade_ms']:.1f} | "
              f"{r['pnet_ms'] / r['cascade_ms']:.2f} | {r['pnet_gflops']:.0f} | {r['of_peak']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_gflops": peak, "peak_from": what, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
