"""The detector's input: an image as uint8 (H, W, 3) RGB, upright, from a path, a PIL image or an array.

Anything else — grayscale, alpha, 16-bit, float, truncated or non-image files, images smaller than one
P-Net window — raises an `ImageError` that names the image, says what is wrong and how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtcnn_jax.stages import INPUT_SIZE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ImageSource = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray


class ImageError(ValueError):
    """An input that is not a usable 8-bit RGB image; the message names the image and the fix."""


_MODE_HINTS = {
    "1": "is black and white (mode '1')",
    "L": "is grayscale (mode 'L')",
    "LA": "is grayscale with alpha (mode 'LA')",
    "RGBA": "has an alpha channel (mode 'RGBA')",
    "P": "is a palette image (mode 'P')",
    "PA": "is a palette image with alpha (mode 'PA')",
    "I;16": "is 16-bit (mode 'I;16')",
    "I;16B": "is 16-bit (mode 'I;16B')",
    "I;16L": "is 16-bit (mode 'I;16L')",
    "I": "is 32-bit integer (mode 'I')",
    "F": "is 32-bit float (mode 'F')",
}


def _fail(name: str, problem: str, fix: str) -> ImageError:
    """The one-line error: which image, what is wrong with it, what to do."""
    return ImageError(f"{name}: {problem}; {fix}")


def _from_pil(img: Any, name: str) -> np.ndarray:
    """A PIL image as uint8 RGB, upright by its EXIF orientation; any other mode is an error with the fix."""
    if img.mode != "RGB":
        problem = _MODE_HINTS.get(img.mode, f"has mode {img.mode!r}")
        raise _fail(name, f"{problem}, MTCNN needs 8-bit RGB", 'convert it with `Image.convert("RGB")`')
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    return _check_array(np.asarray(img), name)


def _open_path(path: Path, name: str) -> np.ndarray:
    """Decode an image file fully (so truncation is caught here) into uint8 RGB."""
    if not path.is_file():
        raise _fail(name, "no such file", "check the path")
    try:
        with Image.open(path) as img:
            img.load()
            return _from_pil(img, name)
    except UnidentifiedImageError:
        raise _fail(name, "not an image file PIL can read", "pass a JPEG, PNG, BMP or WebP") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise _fail(name, f"could not be decoded ({err})", "the file is truncated or corrupt: re-export it") from None


def _check_array(a: np.ndarray, name: str) -> np.ndarray:
    """The array itself if it is a usable H x W x 3 uint8 image, else an ImageError saying what to do."""
    if a.size == 0:
        raise _fail(name, f"empty array of shape {a.shape}", "pass an H x W x 3 uint8 image")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 1):
        raise _fail(name, f"grayscale array of shape {a.shape}", "stack it to RGB: `np.repeat(a[..., None], 3, -1)`")
    if a.ndim != 3:
        raise _fail(name, f"{a.ndim}-D array of shape {a.shape}", "pass one H x W x 3 image (use detect_batch for many)")
    if a.shape[-1] == 4:
        raise _fail(name, "4 channels (RGBA)", 'drop the alpha: `a[..., :3]` or `Image.convert("RGB")`')
    if a.shape[-1] != 3:
        raise _fail(name, f"{a.shape[-1]} channels (shape {a.shape})", "pass H x W x 3 RGB")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise _fail(name, "contains NaNs", "pass uint8 pixels 0-255")
    if a.dtype != np.uint8:
        depth = " (16-bit)" if a.dtype == np.uint16 else ""
        raise _fail(name, f"dtype {a.dtype}{depth}, uint8 0-255 expected",
                    "convert it, e.g. `(a * 255).round().astype(np.uint8)` for floats in 0-1")
    least = INPUT_SIZE["pnet"]  # P-Net's window: nothing smaller can hold a face
    if min(a.shape[:2]) < least:
        raise _fail(name, f"{a.shape[1]}x{a.shape[0]} pixels is under MTCNN's {least}-pixel window",
                    f"pass an image at least {least} px on each side")
    return np.ascontiguousarray(a)


def load_image(source: ImageSource, name: str | None = None) -> np.ndarray:
    """An image as uint8 (H, W, 3) RGB from a path, a PIL image or a numpy array; JPEGs are turned
    upright by their EXIF orientation. Anything else raises an ImageError naming `name` (or the path)."""
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), name or str(source))
    name = name or "image"
    if isinstance(source, Image.Image):
        return _from_pil(source, name)
    if isinstance(source, np.ndarray):
        return _check_array(source, name)
    raise _fail(name, f"got a {type(source).__name__}", "pass a path, a PIL image or an H x W x 3 uint8 numpy array")
