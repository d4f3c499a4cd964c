"""Landmark precision of our crops against a peer port with the same weights, on the LFW+Net test faces.

On the 800 faces of shared/data/lfw_net/testImageList.txt, in one run with the same settings (min face
20, factor 0.709, thresholds 0.6/0.7/0.7): faces found and missed (a face is found by a detection at
IoU >= 0.5), five-point NME over the inter-ocular distance and over the box diagonal, and the failure
rate (NME > 0.1, missed faces count as failures) for
  - ours: the working tree (exact crops: the area average over each box's footprint in the
    full-resolution image, as detect_face.m's imResample);
  - ours-mip: the package at --baseline (default: the last commit whose crops were resampled from the
    image's 2^-j mips), extracted with `git archive` into a temporary folder;
  - each peer in --peers (mtcnn 1.0.0 by default), in the peers' virtualenv (peer_landmarks.py).
And each one's warm per-image latency (median over the images, each timed once after one warm-up call
per image size), with the ratio to ours. Every variant runs in its own subprocess, one after another.
The NME is given as output and moved into the list's 0-based frame (`FRAME_OFFSET`): ours are the
original's 1-based coordinates, the mtcnn package's 0-based, so as output the two differ by a pixel.

Usage: PYTHONPATH=. python benchmarks/bench_landmarks.py [--limit N] [--baseline REV] [--peers mtcnn,facenet_pytorch]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from mtcnn_jax.landmark_eval import evaluate_landmarks, read_landmark_list

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_SHIM = "/work/shared/tools/peers/shim"
MIP_CROPS_REV = "bcde50b"  # the last commit whose R-/O-Net crops were resampled from 2^-j mips
# What moves each variant's coordinates to 0-based pixel indices (pixel i's centre at i), the frame the
# list's points are in (the best constant shift of ours is about -0.7 px, of mtcnn's +0.2): ours are the
# original's 1-based MATLAB coordinates; mtcnn's P-Net windows start at 0 (x1 = 2 j / scale).
FRAME_OFFSET = {"ours": -1.0, "ours-mip": -1.0, "mtcnn": 0.0}


def lfw_net_folder() -> Path:
    """$MTCNN_JAX_DATA/lfw_net, else shared/data/lfw_net beside the checkout."""
    folder = Path(os.environ.get("MTCNN_JAX_DATA", REPO.parent / "shared" / "data")) / "lfw_net"
    if not (folder / "testImageList.txt").is_file():
        sys.exit(f"no LFW+Net test list at {folder} (set MTCNN_JAX_DATA)")
    return folder


def worker(paths: list[str], out: str) -> None:
    """Our detections and per-image warm latency (run in a subprocess, with the package on PYTHONPATH)."""
    import mtcnn_jax
    from mtcnn_jax import detect
    from mtcnn_jax.cascade_config import CascadeConfig
    from mtcnn_jax.images import load_image

    params, config = detect.resolve_params(None), CascadeConfig()
    ms, detections, warm = {}, {}, set()
    for path in paths:
        img = load_image(path)
        run = lambda: detect.detect_loaded([img], [path], params, config)[0]  # noqa: E731
        if img.shape not in warm:
            warm.add(img.shape)
            run()  # the bucket's compile
        t0 = time.perf_counter()
        det = run()
        ms[path] = 1e3 * (time.perf_counter() - t0)
        detections[path] = det.to_json()
    Path(out).write_text(json.dumps({"module": mtcnn_jax.__file__, "ms": ms, "detections": detections}))


def _run(cmd: list[str], env: dict, out: Path, label: str) -> dict | None:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if result.returncode != 0 or not out.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:] or ["(no output)"]
        print(f"warning: {label} failed: {' / '.join(tail)}", file=sys.stderr)
        return None
    print(f"  {label}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(out.read_text())


def run_ours(paths: list[str], tmp: Path, label: str, package_root: Path) -> dict | None:
    """The worker in a fresh process with `package_root` first on PYTHONPATH."""
    out = tmp / f"{label}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_root), str(REPO)]))
    res = _run([sys.executable, str(Path(__file__).resolve()), "--worker", str(out), *paths], env, out, label)
    if res is not None and not Path(res["module"]).is_relative_to(package_root):
        sys.exit(f"{label}: imported {res['module']}, not the package under {package_root}")
    return res


def baseline_tree(rev: str, tmp: Path) -> Path:
    """The package at git revision `rev`, extracted into tmp (the index and work tree are untouched)."""
    dest = tmp / f"rev-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "mtcnn_jax"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_peer(peer: str, python: str, paths: list[str], tmp: Path) -> dict | None:
    out = tmp / f"{peer}.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if peer == "facenet_pytorch":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [PEERS_SHIM, env.get("PYTHONPATH", "")]))
    cmd = [python, str(HERE / "peer_landmarks.py"), "--peer", peer, "--out", str(out), *paths]
    return _run(cmd, env, out, peer)


def shifted(detections: dict, offset: float) -> dict:
    """Detections with `offset` added to every box and landmark coordinate."""
    return {path: {"boxes": [[*(v + offset for v in b[:4]), b[4]] for b in d["boxes"]],
                   "landmarks": (np.asarray(d["landmarks"], np.float64) + offset).tolist()}
            for path, d in detections.items()}


def summary(res: dict, entries: list[dict], root: Path, offset: float) -> dict[str, Any]:
    """Faces, found, missed, NMEs and failure rate of one variant's detections, and its median ms; the
    NMEs also with its coordinates moved by `offset` into the list's 0-based pixel indices."""
    ev = evaluate_landmarks(res["detections"], entries, root=root)
    ev0 = evaluate_landmarks(shifted(res["detections"], offset), entries, root=root)
    return {"faces": ev["faces"], "found": ev["faces"] - ev["missed"], "missed": ev["missed"],
            "nme_inter_ocular": ev["inter_ocular"]["nme"], "nme_box_diagonal": ev["box_diagonal"]["nme"],
            "failure_rate": ev["inter_ocular"]["failure_rate"], "nme_inter_ocular_0_based": ev0["inter_ocular"]["nme"],
            "failure_rate_0_based": ev0["inter_ocular"]["failure_rate"],
            "median_ms": statistics.median(res["ms"].values())}


def table(rows: dict[str, dict]) -> str:
    head = ["variant", "faces", "found", "missed", "NME inter-ocular", "NME box diagonal", "failure rate",
            "NME inter-ocular, 0-based", "failure rate, 0-based", "median ms", "ms / ours"]
    ours_ms = rows.get("ours", {}).get("median_ms", float("nan"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['faces']} | {r['found']} | {r['missed']} | {r['nme_inter_ocular']:.4f} | "
                     f"{r['nme_box_diagonal']:.4f} | {r['failure_rate']:.4f} | {r['nme_inter_ocular_0_based']:.4f} | "
                     f"{r['failure_rate_0_based']:.4f} | {r['median_ms']:.1f} | "
                     f"{r['median_ms'] / ours_ms:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: run every variant on the same faces, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=None, help="only the first N faces of the list")
    p.add_argument("--baseline", default=MIP_CROPS_REV, help="git revision of the ours-mip package ('' to skip)")
    p.add_argument("--peers", default="mtcnn", help="comma-separated: mtcnn, facenet_pytorch ('' for none)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--detections", default=None, metavar="DIR", help="also write each variant's detections here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.paths, args.worker)
        return 0
    root = lfw_net_folder()
    entries = read_landmark_list(root / "testImageList.txt")[: args.limit]
    paths = list(dict.fromkeys(str(root / e["path"]) for e in entries))
    peers_python = os.environ.get("PEERS_PYTHON", "/work/peers/bin/python")
    print(f"{len(entries)} faces in {len(paths)} images; cpu cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results["ours"] = run_ours(paths, tmp, "ours", REPO)
        if args.baseline:
            results["ours-mip"] = run_ours(paths, tmp, "ours-mip", baseline_tree(args.baseline, tmp))
        for peer in filter(None, args.peers.split(",")):
            if Path(peers_python).is_file():
                results[peer] = run_peer(peer, peers_python, paths, tmp)
    rows = {name: summary(res, entries, root, FRAME_OFFSET.get(name, 0.0))
            for name, res in results.items() if res is not None}
    if args.detections:
        Path(args.detections).mkdir(parents=True, exist_ok=True)
        for name, res in results.items():
            if res is not None:
                (Path(args.detections) / f"{name}.json").write_text(json.dumps(res["detections"]))
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n{table(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "baseline": args.baseline}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
