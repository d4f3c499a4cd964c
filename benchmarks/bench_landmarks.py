"""Landmark precision of our crops against a peer port with the same weights, on the LFW+Net test faces.

On the 800 faces of shared/data/lfw_net/testImageList.txt (--list train: the 5,849 training faces, where
recipe choices are made), in one run with the same settings (min face 20, factor 0.709, thresholds
0.6/0.7/0.7): faces found and missed (a face is found by a detection at IoU >= 0.5, and at >= 0.4: the
list's tight boxes put many correct detections near 0.5), five-point NME over the inter-ocular distance
and over the box diagonal, and the failure rate (NME > 0.1, missed faces count as failures) for
  - ours: the working tree at its defaults (exact crops, landmarks averaged with O-Net's on the mirrored
    crops);
  - ours-no-mirror: the same with mirror_landmarks=False (detect_face.m's landmarks exactly);
  - ours-mip: with --baseline REV, the package at that revision (e.g. bcde50b, the last one whose crops
    were resampled from the image's 2^-j mips), extracted with `git archive` into a temporary folder;
  - each peer in --peers (mtcnn 1.0.0 by default), in the peers' virtualenv (peer_landmarks.py).
And each one's warm per-image latency (median over the images, each timed once after one warm-up call
per image size), with the ratio to ours. Every variant runs in its own subprocess, one after another.
The NME is given as output and in pixel indices, the list's frame (`FRAME_OFFSET`): ours are the
original's coordinates (1-based boxes; landmarks over pixel edges, `boxes.LANDMARK_INDEX_OFFSET`), the
mtcnn package's are pixel indices already.

Usage: PYTHONPATH=. python benchmarks/bench_landmarks.py [--list test|train] [--limit N] [--baseline REV]
       [--peers mtcnn,facenet_pytorch] [--json OUT]
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

from mtcnn_jax.boxes import LANDMARK_INDEX_OFFSET
from mtcnn_jax.landmark_eval import evaluate_landmarks, read_landmark_list

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PEERS_SHIM = "/work/shared/tools/peers/shim"
# What moves each variant's (box, landmark) coordinates to pixel indices (pixel i's centre at i), the frame
# of the list's points: ours are the original's, 1-based boxes and landmarks over pixel edges; mtcnn's
# P-Net windows start at 0 (x1 = 2 j / scale).
OURS_OFFSET = (-1.0, LANDMARK_INDEX_OFFSET)
FRAME_OFFSET = {"ours": OURS_OFFSET, "ours-no-mirror": OURS_OFFSET, "ours-mip": OURS_OFFSET, "mtcnn": (0.0, 0.0)}
OURS_CONFIG = {"ours": {}, "ours-no-mirror": {"mirror_landmarks": False}, "ours-mip": {}}


def lfw_net_folder() -> Path:
    """$MTCNN_JAX_DATA/lfw_net, else shared/data/lfw_net beside the checkout."""
    folder = Path(os.environ.get("MTCNN_JAX_DATA", REPO.parent / "shared" / "data")) / "lfw_net"
    if not (folder / "testImageList.txt").is_file():
        sys.exit(f"no LFW+Net test list at {folder} (set MTCNN_JAX_DATA)")
    return folder


def worker(paths: list[str], out: str, config_json: str) -> None:
    """Our detections and per-image warm latency (run in a subprocess, with the package on PYTHONPATH)."""
    import mtcnn_jax
    from mtcnn_jax import detect
    from mtcnn_jax.detections import detect_loaded
    from mtcnn_jax.cascade_config import CascadeConfig
    from mtcnn_jax.images import load_image

    params, config = detect.resolve_params(None), CascadeConfig(**json.loads(config_json))
    ms, detections, warm = {}, {}, set()
    for path in paths:
        img = load_image(path)
        run = lambda: detect_loaded([img], [path], params, config)[0]  # noqa: E731
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
    config = json.dumps(OURS_CONFIG[label])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--config", config]
    res = _run(cmd + paths, env, out, label)
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


def shifted(detections: dict, offset: tuple[float, float]) -> dict:
    """Detections with offset[0] added to every box coordinate and offset[1] to every landmark's."""
    return {path: {"boxes": [[*(v + offset[0] for v in b[:4]), b[4]] for b in d["boxes"]],
                   "landmarks": (np.asarray(d["landmarks"], np.float64) + offset[1]).tolist()}
            for path, d in detections.items()}


def summary(res: dict, entries: list[dict], root: Path, offset: tuple[float, float]) -> dict[str, Any]:
    """Faces, found (at IoU 0.5 and 0.4, in the list's frame), missed, NMEs and failure rate of one variant's detections, and its
    median ms; the NMEs also with its coordinates moved by `offset` into the list's pixel indices."""
    ev = evaluate_landmarks(res["detections"], entries, root=root)
    ev0 = evaluate_landmarks(shifted(res["detections"], offset), entries, root=root)
    loose = evaluate_landmarks(shifted(res["detections"], offset), entries, root=root, iou_thresh=0.4)
    return {"faces": ev0["faces"], "found": ev0["faces"] - ev0["missed"], "missed": ev0["missed"],
            "found_iou_0.4": loose["faces"] - loose["missed"],
            "nme_inter_ocular": ev["inter_ocular"]["nme"], "nme_box_diagonal": ev["box_diagonal"]["nme"],
            "failure_rate": ev["inter_ocular"]["failure_rate"], "nme_inter_ocular_0_based": ev0["inter_ocular"]["nme"],
            "failure_rate_0_based": ev0["inter_ocular"]["failure_rate"],
            "median_ms": statistics.median(res["ms"].values())}


def table(rows: dict[str, dict]) -> str:
    head = ["variant", "faces", "found", "found at IoU 0.4", "NME inter-ocular", "NME box diagonal", "failure rate",
            "NME inter-ocular, pixel indices", "failure rate, pixel indices", "median ms", "ms / ours"]
    ours_ms = rows.get("ours", {}).get("median_ms", float("nan"))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['faces']} | {r['found']} | {r['found_iou_0.4']} | {r['nme_inter_ocular']:.4f} | "
                     f"{r['nme_box_diagonal']:.4f} | {r['failure_rate']:.4f} | {r['nme_inter_ocular_0_based']:.4f} | "
                     f"{r['failure_rate_0_based']:.4f} | {r['median_ms']:.1f} | "
                     f"{r['median_ms'] / ours_ms:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI: run every variant on the same faces, print the table, optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--limit", type=int, default=None, help="only the first N faces of the list")
    p.add_argument("--list", choices=["test", "train"], default="test", help="the LFW+Net list's faces")
    p.add_argument("--baseline", default="", help="git revision of an ours-mip package to compare (e.g. bcde50b)")
    p.add_argument("--peers", default="mtcnn", help="comma-separated: mtcnn, facenet_pytorch ('' for none)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--detections", default=None, metavar="DIR", help="also write each variant's detections here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--config", default="{}", help=argparse.SUPPRESS)
    p.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.paths, args.worker, args.config)
        return 0
    root = lfw_net_folder()
    entries = read_landmark_list(root / f"{args.list}ImageList.txt")[: args.limit]
    paths = list(dict.fromkeys(str(root / e["path"]) for e in entries))
    peers_python = os.environ.get("PEERS_PYTHON", "/work/peers/bin/python")
    print(f"{len(entries)} faces in {len(paths)} images; cpu cores {os.cpu_count()}, load {os.getloadavg()[0]:.2f}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results["ours"] = run_ours(paths, tmp, "ours", REPO)
        results["ours-no-mirror"] = run_ours(paths, tmp, "ours-no-mirror", REPO)
        if args.baseline:
            results["ours-mip"] = run_ours(paths, tmp, "ours-mip", baseline_tree(args.baseline, tmp))
        for peer in filter(None, args.peers.split(",")):
            if Path(peers_python).is_file():
                results[peer] = run_peer(peer, peers_python, paths, tmp)
    rows = {name: summary(res, entries, root, FRAME_OFFSET.get(name, (0.0, 0.0)))
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
