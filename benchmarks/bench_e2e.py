"""End to end, as a user meets it: the detect CLI on a folder in a fresh process with an empty compile
cache (cold), the same command again (warm cache), and facenet-pytorch on the same files in a fresh
process (model load included), all in one run; prints each wall and the ratios ours / facenet-pytorch.

Usage: PYTHONPATH=. python benchmarks/bench_e2e.py [FOLDER...] [--out DIR]
Default folders: the shared reference photos and the shared WIDER FACE val images. Needs the peers'
virtualenv ($PEERS_PYTHON, default /work/peers/bin/python; ../shared/tools/peers/README.md). The
original weights are fetched beforehand (both sides start with their weights on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mtcnn_jax import buckets
from mtcnn_jax.cascade_config import CascadeConfig

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("MTCNN_JAX_DATA", HERE.parents[1] / "shared" / "data"))
DEFAULT_FOLDERS = [SHARED / "reference", SHARED / "wider_face" / "WIDER_val" / "images"]
PEERS_SHIM = "/work/shared/tools/peers/shim"
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a command, which must succeed."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd[:4])} ...\n{done.stderr[-2000:]}")
    return wall, done


def bucket_plan(files: list[str]) -> dict:
    """The buckets of the ladder for these files, those a cold run compiles (merged where that spares a
    compile, nothing compiled yet; batch 1, the CPU default) and their area over the images' area."""
    cfg, sizes = CascadeConfig(), [buckets.header_hw(f) for f in files]
    merged = buckets.merged_buckets(sizes, cfg, 1, lambda bucket, batch: False)
    run = buckets.plan(sizes, cfg, 1, merged)
    padded = sum(b[0] * b[1] for b, chunk in run for _ in chunk)
    return {"ladder_buckets": len({b for b, _ in buckets.plan(sizes, cfg, 1)}), "buckets": len({b for b, _ in run}),
            "padding": padded / sum(sizes[i][0] * sizes[i][1] for _, chunk in run for i in chunk)}


def bench_folder(folder: Path, out: Path, peers_python: str) -> dict:
    """Cold and warm walls of the detect CLI and facenet-pytorch's wall on the images of one folder."""
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES)
    env = dict(os.environ)
    result: dict = {"folder": str(folder), "images": len(files), **bucket_plan(files)}
    with tempfile.TemporaryDirectory() as cache:
        for run in ("cold", "warm"):
            json_out = out / f"{folder.name}_{run}.json"
            cmd = [sys.executable, "-m", "mtcnn_jax.detect", str(folder), "--json", str(json_out),
                   "--compile-cache", cache]
            result[f"ours_{run}_s"], done = timed(cmd, env)
            result[f"ours_{run}_faces"] = sum(len(d["boxes"]) for d in json.loads(json_out.read_text()).values())
        result["compiled_mb"] = sum(p.stat().st_size for p in Path(cache).rglob("*") if p.is_file()) / 2**20
    peer_env = dict(env, PYTHONPATH=PEERS_SHIM, TF_CPP_MIN_LOG_LEVEL="3")
    peer_out = out / f"{folder.name}_facenet.json"
    cmd = [peers_python, str(HERE / "peer_runner.py"), "--peer", "facenet_pytorch", "--once",
           "--out", str(peer_out), *files]
    result["facenet_s"], _ = timed(cmd, peer_env)
    result["facenet_faces"] = sum(r["faces"] for r in json.loads(peer_out.read_text())["images"].values())
    result["cold_ratio"] = result["ours_cold_s"] / result["facenet_s"]
    result["warm_ratio"] = result["ours_warm_s"] / result["facenet_s"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="*", type=Path, default=DEFAULT_FOLDERS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/e2e"), help="detections and results")
    args = p.parse_args(argv)
    peers_python = os.environ.get("PEERS_PYTHON", "/work/peers/bin/python")
    if not Path(peers_python).is_file():
        sys.exit(f"no peers' virtualenv at {peers_python} (see ../shared/tools/peers/README.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", "import mtcnn_jax; mtcnn_jax.load_pretrained()"], check=True)
    rows = []
    print("| folder | images | ours cold s | ours warm s | facenet-pytorch s | cold / facenet | warm / facenet "
          "| faces ours / facenet | buckets (ladder) | padded area |\n|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        r = bench_folder(folder, args.out, peers_python)
        rows.append(r)
        print(f"| {folder.name} | {r['images']} | {r['ours_cold_s']:.1f} | {r['ours_warm_s']:.1f} | "
              f"{r['facenet_s']:.1f} | {r['cold_ratio']:.2f} | {r['warm_ratio']:.2f} | "
              f"{r['ours_warm_faces']} / {r['facenet_faces']} | {r['buckets']} ({r['ladder_buckets']}) | "
              f"{r['padding']:.2f}x |", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
