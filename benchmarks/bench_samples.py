"""Throughput of the P-Net sample generation (source images per second) on the shared WIDER FACE subset.

Usage: PYTHONPATH=. python benchmarks/bench_samples.py [--max-images N] [--workers W] [--landmarks]
(data: $MTCNN_JAX_DATA or ../shared/data). Runs `mtcnn_jax.samples.make_samples` into a temporary folder
and reports the generation time (crops, labels, pixels) and the total with the TFDS write.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from mtcnn_jax import samples


def main() -> None:
    """Prints images per second for generation alone and with the dataset write, and the counts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-images", type=int, help="first N WIDER training images (default: all 954)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--landmarks", action="store_true", help="also the 3,000 LFW+Net landmark faces")
    args = p.parse_args()
    data = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = samples.make_samples(data / "wider_face", data / "lfw_net" if args.landmarks else None, out,
                                       max_images=args.max_images, workers=args.workers)
        total = time.perf_counter() - start
    sources = summary["images"] + summary["landmark_faces"]
    print(json.dumps({"images": summary["images"], "landmark_faces": summary["landmark_faces"],
                      "workers": args.workers, "generation_s": summary["seconds"], "total_s": round(total, 2),
                      "sources_per_s_generation": round(sources / summary["seconds"], 1),
                      "sources_per_s_total": round(sources / total, 1), "kept": summary["kept"]}, indent=2))


if __name__ == "__main__":
    main()
