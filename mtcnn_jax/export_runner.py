"""The loader of an exported detector (`mtcnn_jax.export` copies this file beside the artifact as run.py):
faces in images, printed as the JSON of `mtcnn-detect --json`, with the standard library, numpy, jax and
pillow only. It never imports mtcnn_jax: the exported program computes everything the detector does to an
image after decoding (pyramid plan, cascade); this file decodes, pads into the bucket and formats.

    python run.py IMAGE... > faces.json

Each image is decoded to 8-bit RGB upright (EXIF orientation; grayscale, alpha, palette, CMYK and 16-bit
converted as the detect CLI does, noted in "converted"), zero-padded into the bucket and run B at a time
(the last batch filled with copies whose results are dropped). An image that cannot be read, is smaller than
P-Net's window or larger than the bucket is one "error:" line and its {"error": message} entry; the others
still run, and the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from PIL import Image, ImageOps

PROG = "run.py"
# The artifact's files (the exporter writes these names; this loader reads them).
FILES = {"program": "cascade.jax", "weights": "weights.npz", "plan": "plan.npz", "manifest": "manifest.json",
         "runner": "run.py", "readme": "README.txt"}
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageProblem(ValueError):
    """An input this export cannot run: the message names the image and says why."""


# ------------------------------------------------------------------------------------ images


def _on_white(rgba_HxWx4: np.ndarray) -> np.ndarray:
    rgb, alpha = rgba_HxWx4[..., :3].astype(np.uint32), rgba_HxWx4[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _rgb(img: Any, name: str) -> tuple[np.ndarray, str | None]:
    """A decoded PIL image as uint8 RGB pixels, and the conversion made (None for RGB)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), None
    if mode in SIXTEEN_BIT:
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageProblem(f"{name}: mode {mode!r} with values outside 0-65535; scale it to 8-bit RGB yourself")
        gray = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1), f"{mode} -> RGB (16-bit scaled to 8)"
    if mode == "F":
        raise ImageProblem(f"{name}: is 32-bit float (mode 'F'); scale it to 0-255 and convert it to 8-bit RGB")
    if mode in WITH_ALPHA or (mode in ("P", "L") and "transparency" in img.info):
        try:
            return _on_white(np.asarray(img.convert("RGBA"))), f"{mode} -> RGB (alpha on white)"
        except ValueError:
            pass
    try:
        return np.asarray(img.convert("RGB")), f"{mode} -> RGB"
    except ValueError:
        raise ImageProblem(f"{name}: has mode {mode!r}, which PIL cannot convert to RGB") from None


def load_image(path: str) -> tuple[np.ndarray, str | None]:
    """An image file as uint8 (H, W, 3) RGB, upright, and its conversion; ImageProblem when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                try:
                    img = ImageOps.exif_transpose(img)
                except Exception:  # a broken EXIF block: the pixels as stored
                    pass
                pixels, note = _rgb(img, path)
    except ImageProblem:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageProblem(f"{path}: could not be read as an image ({err})") from None
    return np.ascontiguousarray(pixels), note


# ------------------------------------------------------------------------------------ the program


class ExportedDetector:
    """The artifact in `folder`: `run(images)` detects in up to `batch` uint8 RGB images of the bucket."""

    def __init__(self, folder: Path):
        self.manifest = json.loads((folder / FILES["manifest"]).read_text())
        self.bucket, self.batch = tuple(self.manifest["bucket"]), int(self.manifest["batch"])
        self.min_side = int(self.manifest["min_side"])
        exported = jax.export.deserialize(bytearray((folder / FILES["program"]).read_bytes()))
        platform = jax.export.default_export_platform()  # this machine's, named as jax.export names it
        if platform not in exported.platforms:
            raise ValueError(f"this export runs on {', '.join(exported.platforms)}, this machine on {platform}: "
                             f"export again with --platforms {','.join((*exported.platforms, platform))}")
        with np.load(folder / FILES["weights"]) as w, np.load(folder / FILES["plan"]) as p:
            self._weights, self._plan = jax.device_put(dict(w)), jax.device_put(dict(p))
        options = self.manifest.get("compiler_options", {}).get(platform, {})
        self._call = jax.jit(exported.call, compiler_options=options)

    def check(self, name: str, image: np.ndarray) -> None:
        """ImageProblem for an image this export cannot run."""
        (h, w), (hb, wb), least = image.shape[:2], self.bucket, self.min_side
        if min(h, w) < least:
            raise ImageProblem(f"{name}: {w}x{h} pixels is under MTCNN's {least}-pixel window; pass an image at least "
                               f"{least} px on each side")
        if h > hb or w > wb:
            raise ImageProblem(f"{name}: {h}x{w} pixels (height x width) is larger than this export's bucket "
                               f"{hb}x{wb}; export a larger one (python -m mtcnn_jax.export --bucket HxW) or "
                               "downscale the image")

    def run(self, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
        """The JSON entries of up to `batch` images (padded into the bucket; a short batch filled with copies)."""
        batch = np.zeros((self.batch, *self.bucket, 3), np.uint8)
        sizes = np.zeros((self.batch, 2), np.int32)
        for b in range(self.batch):
            image = images[min(b, len(images) - 1)]
            batch[b, : image.shape[0], : image.shape[1]], sizes[b] = image, image.shape[:2]
        out = jax.tree_util.tree_map(np.asarray, self._call(self._weights, self._plan, batch, sizes))
        return [_entry(out, b) for b in range(len(images))]


def _entry(out: dict, b: int) -> dict[str, Any]:
    """Image b's faces as the detect CLI writes them (`Detections.to_json`): valid rows, float64 lists."""
    keep = np.asarray(out["valid"][b], bool)
    boxes = np.column_stack([out["boxes"][b][keep], out["scores"][b][keep]]).astype(np.float64)
    overflow = {stage: int(counts[b]) for stage, counts in out["overflow"].items()} if out["levels"][b] else {}
    landmarks = out["landmarks"][b][keep].reshape(-1, 5, 2).astype(np.float64)
    return {"boxes": boxes.tolist(), "landmarks": landmarks.tolist(), "overflow": overflow}


# ------------------------------------------------------------------------------------ command line


class JsonStream:
    """A JSON object printed one entry at a time, in the layout of the detect CLI's --json file."""

    def __init__(self, file: Any):
        self.file, self.count = file, 0
        file.write("{")

    def add(self, key: str, value: Any) -> None:
        self.file.write((",\n" if self.count else "\n") + f"{json.dumps(key)}: {json.dumps(value)}")
        self.file.flush()
        self.count += 1

    def close(self) -> None:
        self.file.write("\n}\n")
        self.file.flush()


def _batches(paths: Sequence[str], detector: ExportedDetector, failed: Any) -> Iterator[list]:
    """(path, pixels, note) in batches of the export's size; images that cannot run go to `failed`."""
    pending: list = []
    for i, path in enumerate(paths):
        if path in paths[:i]:  # one entry per path, as in the detect CLI
            failed(path, f"{path}: given twice; its results are under {path}", entry=False)
            continue
        try:
            pixels, note = load_image(path)
            detector.check(path, pixels)
        except ImageProblem as err:
            failed(path, str(err))
            continue
        pending.append((path, pixels, note))
        if len(pending) == detector.batch:
            yield pending
            pending = []
    if pending:
        yield pending


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: the faces in IMAGE... as JSON on stdout; one "error:" line on stderr per image that failed."""
    parser = argparse.ArgumentParser(prog=PROG, description="Detect faces with this exported MTCNN cascade and print "
                                     "them as the JSON of mtcnn-detect --json.")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    args = parser.parse_args(argv)
    try:
        detector = ExportedDetector(Path(__file__).resolve().parent)
    except (OSError, ValueError, KeyError) as err:
        print(f"{PROG}: error: cannot load the export beside {PROG}: {err}", file=sys.stderr)
        return 2
    stream, errors, faces, done = JsonStream(sys.stdout), 0, 0, 0

    def failed(path: str, message: str, entry: bool = True) -> None:
        nonlocal errors
        errors += 1
        print(f"error: {message}", file=sys.stderr)
        if entry:
            stream.add(path, {"error": message})

    try:
        for chunk in _batches(args.images, detector, failed):
            try:
                entries = detector.run([pixels for _, pixels, _ in chunk])
            except Exception as err:  # noqa: BLE001 - e.g. out of memory: each image's error, and on to the next
                for path, _, _ in chunk:
                    failed(path, f"{path}: detection failed ({type(err).__name__}: {str(err).strip()[:200]})")
                continue
            for (path, _, note), entry in zip(chunk, entries):
                stream.add(path, entry | ({"converted": note} if note else {}))
                faces, done = faces + len(entry["boxes"]), done + 1
    finally:
        stream.close()
    print(f"{done} images, {faces} faces, {errors} errors", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
