"""A test clip made from still photos, for the video benchmarks when no real clip is at hand.

No real video ships with the shared data, so this pans and zooms a virtual camera over photos (the shared
reference photos and a fixed sample of WIDER FACE *train* images, never val) for `--frames-per-photo`
frames each, with a hard cut between photos, and encodes it as H.264 at 30 frames/s with PyAV. Faces
move a few pixels per frame and new ones appear at each cut, which is what re-detection has to cope with;
real footage adds motion blur and faces turning, which this does not. The benchmarks say which clip they ran.

Usage: python benchmarks/make_clip.py OUT.mp4 [--size 720x1280] [--frames-per-photo 24] [--photos N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageOps

SHARED = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FPS = 30


def source_photos(n: int) -> list[Path]:
    """The reference photos, then every 60th WIDER FACE train image (sorted), n in all."""
    reference = sorted((SHARED / "reference").glob("*.jpg"))
    wider = sorted((SHARED / "wider_face" / "WIDER_train" / "images").rglob("*.jpg"))[::60]
    return (reference + wider)[:n]


def camera_path(photo_hw: tuple[int, int], frame_hw: tuple[int, int], frames: int, rng: np.random.Generator):
    """Crop windows (frames, 4) x0 y0 x1 y1 of the frame's aspect ratio: a pan between two random points
    while zooming from the largest window that fits to 80 % of it (or back)."""
    ph, pw = photo_hw
    aspect = frame_hw[1] / frame_hw[0]
    h_max = min(ph, pw / aspect)
    zoom = np.linspace(1.0, 0.8, frames) if rng.random() < 0.5 else np.linspace(0.8, 1.0, frames)
    start, end = rng.random(2), rng.random(2)
    windows = []
    for k, z in enumerate(zoom):
        h, w = h_max * z, h_max * z * aspect
        fx, fy = start + (end - start) * k / max(frames - 1, 1)
        x0, y0 = fx * (pw - w), fy * (ph - h)
        windows.append((x0, y0, x0 + w, y0 + h))
    return np.array(windows)


def clip_frames(frame_hw: tuple[int, int], frames_per_photo: int, photos: int, seed: int = 0):
    """The clip's frames (RGB uint8, frame_hw), photo after photo."""
    rng = np.random.default_rng(seed)
    for path in source_photos(photos):
        with Image.open(path) as img:
            photo = ImageOps.exif_transpose(img).convert("RGB")
        for box in camera_path((photo.height, photo.width), frame_hw, frames_per_photo, rng):
            yield np.asarray(photo.resize((frame_hw[1], frame_hw[0]), Image.BICUBIC, box=tuple(box)))


def write_clip(path: Path, frame_hw: tuple[int, int], frames_per_photo: int = 24, photos: int = 12) -> int:
    """Encode the clip to `path` (H.264, yuv420p, 30 frames/s); returns the frame count."""
    n = 0
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.height, stream.width = frame_hw
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for frame in clip_frames(frame_hw, frames_per_photo, photos):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            n += 1
        out.mux(stream.encode())
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--size", default="720x1280", help="HxW")
    p.add_argument("--frames-per-photo", type=int, default=24)
    p.add_argument("--photos", type=int, default=12)
    args = p.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    n = write_clip(args.out, (h, w), args.frames_per_photo, args.photos)
    print(f"{args.out}: {n} frames of {h}x{w} at {FPS} frames/s")


if __name__ == "__main__":
    main()
