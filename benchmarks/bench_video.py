"""Video frames/s, ours against facenet-pytorch, and what re-detection costs in recall (issue 27).

facenet-pytorch's README protocol on this machine: the frames of a clip decoded in memory, detected
batched and one by one, frames/s, at 540x960, 720x1280 and 1080x1920, all in one run. Ours runs the
whole cascade on every frame (one bucket fitted to the frame size, compiled once: its compile is
reported apart) at each --batches size (`detect.detect_stream`; with --workers W also W batches at once
against the default 2), and with re-detection every N frames (`detect_stream(..., redetect_every=N)`),
whose recall is measured against the whole cascade's faces on the same frames (IoU >= 0.5).
The clip: --clip FILE (decoded and resized to each size), else one made by make_clip.py from the shared
photos (no real clip ships with the shared data; the output says which), in shots of --shot frames (2 s:
TV and film shots run a few seconds, camera streams have no cuts; every cut costs re-detection recall).

Usage: PYTHONPATH=. python benchmarks/bench_video.py [--clip FILE] [--frames 120] [--shot 60] [--sizes 540x960,...]
       [--batches 1,4] [--workers 1,2] [--every 5,10] [--no-peers] [--peers-python PY] [--peer-device cuda] [--json OUT]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_clip  # noqa: E402

from mtcnn_jax import boxes as bx  # noqa: E402
from mtcnn_jax.cascade_config import CascadeConfig  # noqa: E402
from mtcnn_jax.detect import detect_stream, resolve_params  # noqa: E402
from mtcnn_jax.video_io import read_frames  # noqa: E402

HERE = Path(__file__).resolve().parent
PEERS_SHIM = "/work/shared/tools/peers/shim"


def decode(path: Path, frame_hw: tuple[int, int], limit: int) -> list[np.ndarray]:
    """The first `limit` frames of a video (`video_io.read_frames`: upright RGB uint8), resized to frame_hw
    when they differ."""
    frames = []
    for frame in itertools.islice(read_frames(path), limit):
        pixels = frame.pixels
        if pixels.shape[:2] != frame_hw:
            pixels = np.asarray(Image.fromarray(pixels).resize((frame_hw[1], frame_hw[0]), Image.BICUBIC))
        frames.append(pixels)
    return frames


def recall(full: list, other: list, iou: float = 0.5) -> tuple[float, int]:
    """The share of the whole cascade's faces that `other` found on the same frame (IoU >= iou), and the
    number of `other`'s faces the whole cascade does not have."""
    found = total = extra = 0
    for a, b in zip(full, other):
        total += len(a)
        if len(a) and len(b):
            m = np.asarray(bx.iou_matrix(a.boxes, b.boxes)) >= iou
            found, extra = found + int(m.any(1).sum()), extra + int((~m.any(0)).sum())
        else:
            extra += len(b)
    return found / max(total, 1), extra


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_size(frames: list[np.ndarray], args: argparse.Namespace, params, workdir: Path) -> dict:
    """Ours (batches, re-detection) and facenet-pytorch on one size's frames."""
    config = CascadeConfig()  # detect_stream fits the bucket to the frames (buckets.STREAM_BUCKET_MULTIPLE)
    n, row = len(frames), {"frames": len(frames), "size": "x".join(map(str, frames[0].shape[:2]))}

    def stream(batch: int, every: int | None = None, upto: int = n, workers: int | None = None) -> list:
        pairs = [("clip", f) for f in frames[:upto]]
        return [d for _, _, d in detect_stream(pairs, params, config=config, batch_size=batch, redetect_every=every,
                                               workers=workers)]

    full = None
    for batch in args.batches:
        row[f"ours_b{batch}_first_s"], _ = timed(lambda: stream(batch, upto=batch))  # the compile
        seconds, dets = timed(lambda: stream(batch))
        row[f"ours_b{batch}_fps"], full = n / seconds, full or dets
        for workers in args.workers:  # the same frames with `workers` batches at once (default: 2)
            seconds, dets = timed(lambda: stream(batch, workers=workers))
            row[f"ours_b{batch}_w{workers}_fps"] = n / seconds
            assert [len(d) for d in dets] == [len(d) for d in full], "another worker count found other faces"
    for every in args.every:
        stream(1, every, upto=2)  # compiles the re-detection program
        seconds, dets = timed(lambda: stream(1, every))
        row[f"redetect{every}_fps"] = n / seconds
        row[f"redetect{every}_recall"], row[f"redetect{every}_extra"] = recall(full, dets)
    row["ours_faces"] = sum(len(d) for d in full)
    if not args.no_peers:
        npy, out = workdir / f"frames_{row['size']}.npy", workdir / f"facenet_{row['size']}.json"
        np.save(npy, np.stack(frames))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PEERS_SHIM, os.environ.get("PYTHONPATH")])))
        subprocess.run([args.peers_python, str(HERE / "peer_video.py"), str(npy), "--batch", str(args.peer_batch),
                        "--device", args.peer_device, "--out", str(out)], env=env, check=True, capture_output=True)
        peer = json.loads(out.read_text())
        row |= {"facenet_batched_fps": n / peer["batched_s"], "facenet_unbatched_fps": n / peer["unbatched_s"],
                "facenet_faces": peer["faces_batched"], "facenet_batch": peer["batch"]}
        npy.unlink()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip", type=Path)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--shot", type=int, default=60, help="frames per photo (a shot: 2 s at 30 frames/s) of the made clip")
    p.add_argument("--sizes", default="540x960,720x1280,1080x1920")
    p.add_argument("--batches", default="1,4", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--every", default="5,10", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--workers", default=[], type=lambda s: [int(v) for v in s.split(",")],
                   help="also time ours with these numbers of batches at once (e.g. 1,2; the default is 2)")
    p.add_argument("--peer-batch", type=int, default=8)
    p.add_argument("--peer-device", default="cpu", help="facenet-pytorch's torch device (cuda on a GPU machine)")
    p.add_argument("--peers-python", default=os.environ.get("PEERS_PYTHON", "/work/peers/bin/python"))
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    params = resolve_params(None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            hw = tuple(int(v) for v in size.split("x"))
            clip = args.clip
            if clip is None:
                clip = Path(tmp) / f"clip_{size}.mp4"
                make_clip.write_clip(clip, hw, args.shot, photos=-(-args.frames // args.shot))
            rows.append(bench_size(decode(clip, hw, args.frames), args, params, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"clip: {args.clip or 'made by make_clip.py from the shared photos (no real clip at hand)'}")
    for r in rows:
        line = f"{r['size']}: ours " + ", ".join(f"batch {b} {r[f'ours_b{b}_fps']:.2f}" for b in args.batches)
        line += "".join(f" (workers {w}: {r[f'ours_b{b}_w{w}_fps']:.2f})" for b in args.batches for w in args.workers)
        line += "".join(f"; re-detect/{e} {r[f'redetect{e}_fps']:.2f} (recall {r[f'redetect{e}_recall']:.3f})"
                        for e in args.every) + " frames/s"
        if "facenet_batched_fps" in r:
            best = max(r[f"ours_b{b}_fps"] for b in args.batches)
            line += (f"; facenet-pytorch batched {r['facenet_batched_fps']:.2f}, unbatched "
                     f"{r['facenet_unbatched_fps']:.2f}; ours / facenet batched {best / r['facenet_batched_fps']:.2f}x")
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
