"""Throughput of the P-Net sample generation (source images per second) on the shared WIDER FACE subset.

Usage: PYTHONPATH=. python benchmarks/bench_samples.py [--max-images N] [--workers W] [--landmarks]
[--tfds-dir DIR] (data: $MTCNN_JAX_DATA or ../shared/data). Builds the source TFDS datasets first (WIDER FACE,
LFW+Net; into a temporary folder unless --tfds-dir names one, where they are built once) and times that
apart, then runs `mtcnn_jax.samples.make_samples` into a temporary folder and reports the generation time
(crops, labels, pixels) and the total with the TFDS write.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from mtcnn_jax import datasets, samples


def main() -> None:
    """Prints images per second for generation alone and with the dataset write, and the counts."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-images", type=int, help="first N WIDER training images (default: all 954)")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--landmarks", action="store_true", help="also the 3,000 LFW+Net landmark faces")
    p.add_argument("--tfds-dir", help="where the source datasets are built (default: a temporary folder)")
    args = p.parse_args()
    data = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    landmarks = data / "lfw_net" if args.landmarks else None
    with tempfile.TemporaryDirectory() as tmp:
        tfds_dir = args.tfds_dir or Path(tmp) / "tfds"
        start = time.perf_counter()
        samples.source_dataset(datasets.WiderFace, data / "wider_face", tfds_dir)
        if landmarks:
            samples.source_dataset(datasets.LfwNet, landmarks, tfds_dir)
        build = time.perf_counter() - start
        start = time.perf_counter()
        summary = samples.make_samples(data / "wider_face", landmarks, Path(tmp) / "out", max_images=args.max_images,
                                       workers=args.workers, tfds_dir=tfds_dir)
        total = time.perf_counter() - start
    sources = summary["images"] + summary["landmark_faces"]
    print(json.dumps({"images": summary["images"], "landmark_faces": summary["landmark_faces"],
                      "workers": args.workers, "source_build_s": round(build, 2),
                      "generation_s": summary["seconds"], "total_s": round(total, 2),
                      "sources_per_s_generation": round(sources / summary["seconds"], 1),
                      "sources_per_s_total": round(sources / total, 1), "kept": summary["kept"]}, indent=2))


if __name__ == "__main__":
    main()
