"""Times the jitted cascade per image on the shared reference photos, beside the peer ports in the same run.

Per image: the first call (for the first image of a bucket: the jit compile) is timed separately, then
the median of N warm calls. If the peers' virtualenv exists ($PEERS_PYTHON, default
/work/peers/bin/python), facenet-pytorch and mtcnn are timed the same way in subprocesses
(peer_runner.py) and the ratios peer / ours printed.

`--throughput` instead measures images/s on batches of 640x480 copies of the photos, end to end from
host uint8 images to host results (padding, transfers and the compiled cascade; not the compile):
the one command to run on a GPU machine.

Usage: PYTHONPATH=. python benchmarks/bench_cascade.py [IMAGES...] [--runs 5] [--no-peers] [--json OUT]
       PYTHONPATH=. python benchmarks/bench_cascade.py --throughput [--batches 1,8,32,64,256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mtcnn_jax import detect, detections
from mtcnn_jax.buckets import bucket_shape
from mtcnn_jax.cascade_config import CascadeConfig
from mtcnn_jax.images import IMAGE_SUFFIXES, load_image

HERE = Path(__file__).resolve().parent
PEERS_SHIM = "/work/shared/tools/peers/shim"
PEER_LABELS = {"facenet_pytorch": "facenet-pytorch", "mtcnn": "mtcnn"}


def reference_images() -> list[str]:
    """The reference photos: $MTCNN_JAX_DATA/reference, else shared/data/reference beside the checkout."""
    data = Path(os.environ.get("MTCNN_JAX_DATA", HERE.parents[1] / "shared" / "data"))
    folder = data / "reference"
    if not folder.is_dir():
        sys.exit(f"no reference photos at {folder} (set MTCNN_JAX_DATA or pass image paths)")
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


def machine() -> dict[str, Any]:
    """CPU model, core count, JAX backend and devices: what the numbers were measured on."""
    import jax

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "backend": jax.default_backend(), "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()]}


def _timed(fn, *args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def time_ours(paths: list[str], params: Any, config: CascadeConfig, runs: int) -> tuple[dict, dict]:
    """Per image {first_ms, median_ms, faces, size, bucket}, and per bucket the first call (compile + run) in s."""
    per_image, compile_s = {}, {}
    for path in paths:
        img = load_image(path)
        bucket = bucket_shape(*img.shape[:2], config)
        run = lambda: detections.detect_loaded([img], [path], params, config)[0]  # noqa: E731
        first, det = _timed(run)
        compile_s.setdefault(f"{bucket[0]}x{bucket[1]}", first)
        times = [_timed(run)[0] for _ in range(runs)]
        per_image[path] = {"first_ms": 1e3 * first, "median_ms": 1e3 * statistics.median(times),
                           "runs_ms": [1e3 * t for t in times], "faces": len(det),
                           "size": f"{img.shape[1]}x{img.shape[0]}", "bucket": f"{bucket[0]}x{bucket[1]}"}
    return per_image, compile_s


def throughput(paths: list[str], params: Any, config: CascadeConfig, runs: int,
               batches: tuple[int, ...] = (1, 8, 32, 64, 256),
               report: Callable[[dict[int, float]], None] = lambda out: None) -> dict[int, float]:
    """Images per second on 640x480 copies of the photos, batched B at a time (one warm-up call per B,
    which compiles; then the median of `runs` calls); `report` gets the results so far after each B (so
    that a run stopped at its time limit keeps them)."""
    from PIL import Image

    photos = [np.asarray(Image.fromarray(load_image(p)).resize((640, 480))) for p in paths]
    out = {}
    for b in batches:
        batch = [photos[i % len(photos)] for i in range(b)]
        run = lambda: detections.detect_loaded(batch, [f"b{i}" for i in range(b)], params, config, batch_size=b)  # noqa: E731
        first = _timed(run)[0]
        out[b] = b / statistics.median(_timed(run)[0] for _ in range(runs))
        print(f"  batch {b}: {out[b]:.1f} images/s (first call, compile included: {first:.1f} s)", flush=True)
        report(out)
    return out


def time_peer(peer: str, python: str, paths: list[str], runs: int, config: CascadeConfig) -> dict | None:
    """Runs peer_runner.py in the peers' virtualenv on the same images; its per-image timings, or None."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if peer == "facenet_pytorch":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PEERS_SHIM, env.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peer.json"
        cmd = [python, str(HERE / "peer_runner.py"), "--peer", peer, "--runs", str(runs), "--out", str(out),
               "--min-face-size", str(config.min_face_size), "--scale-factor", str(config.scale_factor),
               "--thresholds", *map(str, config.thresholds), *paths]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not out.is_file():
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
            print(f"warning: peer {peer} failed: {tail[0]}", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def table(ours: dict, peers: dict[str, dict]) -> str:
    """Markdown table: per image size, bucket, ms and faces for ours and each peer, and peer / ours."""
    head = ["image", "size", "bucket", "ours ms", "faces"]
    for peer in peers:
        head += [f"{PEER_LABELS[peer]} ms", "faces", "ratio"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[str, list[float]] = {p: [] for p in peers}
    for path, o in ours.items():
        cells = [Path(path).name, o["size"], o["bucket"], f"{o['median_ms']:.1f}", str(o["faces"])]
        for peer, res in peers.items():
            p = res["images"][path]
            ratios[peer].append(p["median_ms"] / o["median_ms"])
            cells += [f"{p['median_ms']:.1f}", str(p["faces"]), f"{ratios[peer][-1]:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    if peers:
        geo = ["geometric mean", "", "", "", ""]
        for peer in peers:
            geo += ["", "", f"{float(np.exp(np.mean(np.log(ratios[peer])))):.2f}"]
        rows.append("| " + " | ".join(geo) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI: time ours (and the peers when present), print the tables, optionally write JSON."""
    import jax

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="*", help="default: the shared reference photos")
    p.add_argument("--runs", type=int, default=5, help="warm runs per image (median reported)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--throughput", action="store_true", help="measure batched throughput (only)")
    p.add_argument("--batches", default="1,8,32,64,256", help="batch sizes for --throughput")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args(argv)
    paths = args.images or reference_images()
    config, info = CascadeConfig(), machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, jax {info['jax']} backend {info['backend']}")
    params = detect.resolve_params(None)
    if args.throughput:
        batches = tuple(int(b) for b in args.batches.split(","))
        print(f"throughput, 640x480, median of {args.runs} runs per batch size:")
        def write(out: dict[int, float]) -> None:
            if args.json:
                Path(args.json).write_text(json.dumps({"machine": info, "throughput": out}, indent=1))

        throughput(paths, params, config, args.runs, batches, report=write)
        return 0
    ours, compile_s = time_ours(paths, params, config, args.runs)
    peers_python = os.environ.get("PEERS_PYTHON", "/work/peers/bin/python")
    peers = {}
    if not args.no_peers and Path(peers_python).is_file():
        peers = {k: v for k in PEER_LABELS if (v := time_peer(k, peers_python, paths, args.runs, config))}
    print("\nfirst call per bucket (jit compile + one run):")
    for bucket, s in compile_s.items():
        print(f"  {bucket}: {s:.1f} s")
    print(f"\nper image, median of {args.runs} warm runs (ratio = peer ms / ours ms):\n{table(ours, peers)}")
    result = {"machine": info, "runs": args.runs, "compile_s": compile_s, "ours": ours, "peers": peers}
    if jax.default_backend() != "cpu":
        print("\nthroughput, 640x480:")
        result["throughput"] = throughput(paths, params, config, args.runs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
