"""Times one peer MTCNN port (facenet-pytorch or mtcnn) per image, inside the peers' virtualenv.

Run by bench_cascade.py as a subprocess (it never imports mtcnn_jax): per image one untimed warm-up
call, then the median of N timed calls, with the same detector settings as ours. Writes JSON to --out:
{"peer", "version", "threads", "images": {path: {"first_ms", "median_ms", "runs_ms", "faces"}}}.
facenet-pytorch needs PYTHONPATH=/work/shared/tools/peers/shim where torchvision does not load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps


def facenet_detector(args: argparse.Namespace, threads: int) -> Callable[[Image.Image, np.ndarray], int]:
    """facenet-pytorch's MTCNN (all faces, CPU, `threads` torch threads); returns a call giving the face count."""
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(threads)
    m = MTCNN(keep_all=True, device="cpu", min_face_size=args.min_face_size, factor=args.scale_factor,
              thresholds=list(args.thresholds))

    def run(pil: Image.Image, rgb: np.ndarray) -> int:
        boxes, _, _ = m.detect(pil, landmarks=True)
        return 0 if boxes is None else len(boxes)

    return run


def mtcnn_detector(args: argparse.Namespace, threads: int) -> Callable[[Image.Image, np.ndarray], int]:
    """mtcnn 1.0.0 (TensorFlow, CPU) with our thresholds (its O-Net default is 0.8, ours 0.7)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    from mtcnn import MTCNN

    d = MTCNN(device="CPU:0")
    t1, t2, t3 = args.thresholds
    settings = dict(min_face_size=int(args.min_face_size), scale_factor=args.scale_factor,
                    threshold_pnet=t1, threshold_rnet=t2, threshold_onet=t3)

    def run(pil: Image.Image, rgb: np.ndarray) -> int:
        return len(d.detect_faces(rgb, **settings))

    return run


PEERS = {"facenet_pytorch": ("facenet-pytorch", facenet_detector), "mtcnn": ("mtcnn", mtcnn_detector)}


def decode(path: str) -> tuple[Image.Image, np.ndarray]:
    """An image as the peers take it: the EXIF-rotated RGB PIL image and its uint8 array."""
    with Image.open(path) as img:
        pil = ImageOps.exif_transpose(img).convert("RGB")
    return pil, np.asarray(pil)


def add_detector_flags(p: argparse.ArgumentParser, peers: dict) -> None:
    """The images, the peer and the detector settings every peer script takes (ours' defaults)."""
    p.add_argument("images", nargs="+")
    p.add_argument("--peer", choices=sorted(peers), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-face-size", type=float, default=20.0)
    p.add_argument("--scale-factor", type=float, default=0.709)
    p.add_argument("--thresholds", type=float, nargs=3, default=(0.6, 0.7, 0.7))


def time_image(run: Callable[..., int], path: str, runs: int) -> dict[str, Any]:
    """One untimed-for-the-median warm-up call, then `runs` timed calls on one image (decoding not timed)."""
    pil, rgb = decode(path)
    t0 = time.perf_counter()
    faces = run(pil, rgb)
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(pil, rgb)
        times.append(time.perf_counter() - t0)
    return {"first_ms": 1e3 * first, "median_ms": 1e3 * statistics.median(times),
            "runs_ms": [1e3 * t for t in times], "faces": faces}


def detect_once(run: Callable[..., int], path: str) -> dict[str, Any]:
    """Decode and detect one image once, as a user's script would (bench_e2e.py times the whole process)."""
    return {"faces": run(*decode(path))}


def main(argv: list[str] | None = None) -> int:
    """CLI: time one peer on the given images and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_detector_flags(p, PEERS)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--once", action="store_true", help="each image once, untimed (for end-to-end walls)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dist, make = PEERS[args.peer]
    run = make(args, args.threads)
    each = detect_once if args.once else lambda r, path: time_image(r, path, args.runs)
    result = {"peer": args.peer, "version": version(dist), "threads": args.threads,
              "images": {path: each(run, path) for path in args.images}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
