"""Detections with landmarks of one peer MTCNN port (mtcnn or facenet-pytorch), inside the peers' virtualenv.

Run by bench_landmarks.py as a subprocess (it never imports mtcnn_jax): one untimed warm-up call on the
first image, then each image once, timed (decoding not timed), with the same detector settings as ours.
Writes the shared detections format to --out, {"peer", "version", "threads", "ms": {path: ms},
"detections": {path: {"boxes": [[x1, y1, x2, y2, score]], "landmarks": [[[x, y] x 5]]}}}. The landmarks
are the port's unrounded ones (mtcnn's JSON output rounds them to integers; its numpy output does not).
facenet-pytorch needs PYTHONPATH=/work/shared/tools/peers/shim where torchvision does not load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from typing import Callable

import numpy as np
from PIL import Image

from peer_runner import add_detector_flags, decode  # beside this script

Faces = tuple[np.ndarray, np.ndarray]  # boxes_Kx5 (x1, y1, x2, y2, score), landmarks_Kx5x2


def mtcnn_faces(args: argparse.Namespace) -> Callable[[Image.Image, np.ndarray], Faces]:
    """mtcnn 1.0.0 (TensorFlow, CPU) with our thresholds; its numpy output: [image, x1, y1, x2, y2,
    score, x1..x5, y1..y5] (landmark order: left eye, right eye, nose, mouth left, mouth right)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    from mtcnn import MTCNN

    d = MTCNN(device="CPU:0")
    t1, t2, t3 = args.thresholds
    settings = dict(min_face_size=int(args.min_face_size), scale_factor=args.scale_factor,
                    threshold_pnet=t1, threshold_rnet=t2, threshold_onet=t3)

    def run(pil: Image.Image, rgb: np.ndarray) -> Faces:
        out = np.asarray(d.detect_faces(rgb, box_format="xyxy", output_type="numpy", **settings), np.float64)
        out = out.reshape(-1, 16)
        return out[:, 1:6], np.stack([out[:, 6:11], out[:, 11:16]], axis=-1)

    return run


def facenet_faces(args: argparse.Namespace) -> Callable[[Image.Image, np.ndarray], Faces]:
    """facenet-pytorch's MTCNN (all faces, CPU, `threads` torch threads)."""
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(args.threads)
    m = MTCNN(keep_all=True, device="cpu", min_face_size=args.min_face_size, factor=args.scale_factor,
              thresholds=list(args.thresholds))

    def run(pil: Image.Image, rgb: np.ndarray) -> Faces:
        boxes, probs, points = m.detect(pil, landmarks=True)
        if boxes is None:
            return np.zeros((0, 5)), np.zeros((0, 5, 2))
        return np.column_stack([boxes, probs]), np.asarray(points, np.float64)

    return run


PEERS = {"mtcnn": ("mtcnn", mtcnn_faces), "facenet_pytorch": ("facenet-pytorch", facenet_faces)}


def main(argv: list[str] | None = None) -> int:
    """CLI: detect with one peer on the given images and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_detector_flags(p, PEERS)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    dist, make = PEERS[args.peer]
    run = make(args)
    ms, detections = {}, {}
    for i, path in enumerate(args.images):
        pil, rgb = decode(path)
        if i == 0:
            run(pil, rgb)  # warm-up: graph tracing, first allocations
        t0 = time.perf_counter()
        boxes, points = run(pil, rgb)
        ms[path] = 1e3 * (time.perf_counter() - t0)
        detections[path] = {"boxes": boxes.tolist(), "landmarks": points.tolist()}
    result = {"peer": args.peer, "version": version(dist), "threads": args.threads, "ms": ms,
              "detections": detections}
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
