"""facenet-pytorch on video frames, batched and unbatched, inside the peers' virtualenv (bench_video.py).

The protocol of facenet-pytorch's README benchmark: the frames of a clip already decoded in memory,
detected in batches (`MTCNN.detect` on a 4-D array) and one by one; one untimed warm-up of each. Reads
the frames from a .npy (N, H, W, 3) uint8 file; writes {"batched_s", "unbatched_s", "frames", "batch",
"faces_batched", "faces_unbatched"} to --out. Never imports mtcnn_jax.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("frames")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device: cpu, or cuda on a GPU machine")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch
    from facenet_pytorch import MTCNN

    torch.set_num_threads(args.threads)
    m = MTCNN(keep_all=True, device=args.device, min_face_size=20, factor=0.709, thresholds=[0.6, 0.7, 0.7])
    frames = np.load(args.frames)
    count = lambda boxes: sum(0 if b is None else len(b) for b in boxes)  # noqa: E731
    m.detect(frames[: args.batch])  # warm-up, untimed
    t0 = time.perf_counter()
    batched = [m.detect(frames[k : k + args.batch])[0] for k in range(0, len(frames), args.batch)]
    batched_s = time.perf_counter() - t0
    m.detect(frames[0])
    t0 = time.perf_counter()
    single = [m.detect(f)[0] for f in frames]
    unbatched_s = time.perf_counter() - t0
    result = {"peer": "facenet_pytorch", "version": version("facenet-pytorch"), "threads": args.threads,
              "frames": len(frames), "batch": args.batch, "batched_s": batched_s, "unbatched_s": unbatched_s,
              "faces_batched": count([b for bs in batched for b in bs]), "faces_unbatched": count(single)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
