"""The detector's input: an image as uint8 (H, W, 3) RGB, upright, from a path, a PIL image or an array.

Grayscale, grayscale+alpha, RGBA, palette (with or without transparency), CMYK and 16-bit images are
converted to 8-bit RGB (alpha composited on white, 16 bits scaled to 8), and the conversion is noted;
`strict=True` refuses them instead. Float arrays, files that are not images, truncated or unreadable
files, folders, broken links, images over PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`,
89 MP by default) and images smaller than one P-Net window raise an `ImageError` that names the image,
says what is wrong and how to fix it. `list_inputs` finds the image files of folders, `first_copies`
the same file given twice.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mtcnn_jax.stages import INPUT_SIZE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ImageSource = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # "I" (32-bit) when its values fit 16 bits
WITH_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


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
STRICT_FIX = "without strict=True (--strict) it is converted; or convert it yourself: `Image.convert(\"RGB\")`"


def _fail(name: str, problem: str, fix: str) -> ImageError:
    """The one-line error: which image, what is wrong with it, what to do."""
    return ImageError(f"{name}: {problem}; {fix}")


# ---------------------------------------------------------------------------------------------- conversion

def on_white(rgba_HxWx4: np.ndarray) -> np.ndarray:
    """uint8 RGBA composited on a white background, rounded to uint8 RGB (what a viewer shows)."""
    rgb, alpha = rgba_HxWx4[..., :3].astype(np.uint32), rgba_HxWx4[..., 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def to_8bit(a_uint16: np.ndarray) -> np.ndarray:
    """16-bit values 0-65535 scaled and rounded to 0-255 (65535 / 257 = 255)."""
    return ((a_uint16.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray.reshape(*gray.shape[:2], 1), 3, axis=-1)


def _pil_pixels(img: Any, name: str, strict: bool) -> tuple[np.ndarray, str | None]:
    """A decoded PIL image's pixels as uint8 RGB and the conversion made (None for RGB)."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img), None
    if strict:
        problem = _MODE_HINTS.get(mode, f"has mode {mode!r}")
        raise _fail(name, f"{problem}, MTCNN needs 8-bit RGB (strict)", STRICT_FIX)
    if mode in SIXTEEN_BIT:
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise _fail(name, f"mode {mode!r} with values outside 0-65535", 'scale it to 8-bit RGB yourself')
        return _gray_to_rgb(to_8bit(a)), f"{mode} -> RGB (16-bit scaled to 8)"
    if mode == "F":
        raise _fail(name, "is 32-bit float (mode 'F'), its range is unknown",
                    "scale it to 0-255 and convert it to 8-bit RGB yourself")
    if mode in WITH_ALPHA or (mode in ("P", "L") and "transparency" in img.info):
        try:
            return on_white(np.asarray(img.convert("RGBA"))), f"{mode} -> RGB (alpha on white)"
        except ValueError:  # a mode PIL cannot convert (La, RGBa): said below
            pass
    try:
        return np.asarray(img.convert("RGB")), f"{mode} -> RGB"
    except ValueError:
        raise _fail(name, f"has mode {mode!r}, which PIL cannot convert to RGB", "save it as 8-bit RGB") from None


def _decoded(img: Any, name: str) -> Any:
    """The PIL image with its pixels loaded (a lazily opened file is decoded here: truncation shows)."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _fail(name, f"could not be decoded ({err})", "the file is truncated or corrupt: re-export it") from None
    return img


def _from_pil(img: Any, name: str, strict: bool) -> tuple[np.ndarray, str | None]:
    """A PIL image as uint8 RGB, upright by its EXIF orientation, and its conversion."""
    img = _decoded(img, name)
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block: keep the pixels as stored
        pass
    pixels, converted = _pil_pixels(img, name, strict)
    return _check_array(pixels, name, strict=True)[0], converted


def _check_file(path: Path, name: str) -> None:
    """Why `path` cannot be opened as an image file, as an ImageError (checked before PIL tries)."""
    if path.is_symlink() and not path.exists():
        raise _fail(name, f"is a broken symbolic link (to {os.readlink(path)})", "fix or remove the link")
    if not path.exists():
        raise _fail(name, "no such file", "check the path")
    if path.is_dir():
        raise _fail(name, "is a folder, not an image file", "pass the image files in it (the CLI searches folders)")
    if not path.is_file():
        raise _fail(name, "is not a regular file", "pass an image file")


def _open_path(path: Path, name: str, strict: bool) -> tuple[np.ndarray, str | None]:
    """Decode an image file fully (so truncation is caught here) into uint8 RGB; a file over PIL's
    decompression-bomb limit (Image.MAX_IMAGE_PIXELS, whose warning counts as the error) is refused."""
    _check_file(path, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _from_pil(img, name, strict)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        limit = Image.MAX_IMAGE_PIXELS
        raise _fail(name, f"is too large to decode safely ({err})",
                    f"downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS (now {limit}) if you trust the file") from None
    except UnidentifiedImageError:
        raise _fail(name, "not an image file PIL can read", "pass a JPEG, PNG, BMP or WebP") from None
    except (PermissionError, IsADirectoryError, FileNotFoundError) as err:
        raise _fail(name, f"cannot be read ({err.strerror or err})", "check the file and its permissions") from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageError):
            raise
        raise _fail(name, f"could not be decoded ({err})", "the file is truncated or corrupt: re-export it") from None


def _check_array(a: np.ndarray, name: str, strict: bool) -> tuple[np.ndarray, str | None]:
    """The array as a usable H x W x 3 uint8 image (grayscale, alpha and uint16 converted unless strict)
    and the conversion made, else an ImageError saying what to do."""
    if a.size == 0:
        raise _fail(name, f"empty array of shape {a.shape}", "pass an H x W x 3 uint8 image")
    gray = a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 1)
    if strict and gray:
        raise _fail(name, f"grayscale array of shape {a.shape}", "stack it to RGB: `np.repeat(a[..., None], 3, -1)`")
    if not gray and a.ndim != 3:
        raise _fail(name, f"{a.ndim}-D array of shape {a.shape}", "pass one H x W x 3 image (use detect_batch for many)")
    if strict and a.shape[-1] == 4:
        raise _fail(name, "4 channels (RGBA)", 'drop the alpha: `a[..., :3]` or `Image.convert("RGB")`')
    if not gray and a.shape[-1] not in (3, 4):
        raise _fail(name, f"{a.shape[-1]} channels (shape {a.shape})", "pass H x W x 3 RGB")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise _fail(name, "contains NaNs", "pass uint8 pixels 0-255")
    if a.dtype != np.uint8 and (strict or a.dtype != np.uint16):
        depth = " (16-bit)" if a.dtype == np.uint16 else ""
        raise _fail(name, f"dtype {a.dtype}{depth}, uint8 0-255 expected",
                    "convert it, e.g. `(a * 255).round().astype(np.uint8)` for floats in 0-1")
    notes = ["16-bit scaled to 8"] if a.dtype == np.uint16 else []
    pixels = to_8bit(a) if a.dtype == np.uint16 else a
    if gray:
        pixels, notes = _gray_to_rgb(pixels), notes + ["grayscale"]
    elif a.shape[-1] == 4:
        pixels, notes = on_white(pixels), notes + ["alpha on white"]
    least = INPUT_SIZE["pnet"]  # P-Net's window: nothing smaller can hold a face
    if min(a.shape[:2]) < least:
        raise _fail(name, f"{a.shape[1]}x{a.shape[0]} pixels is under MTCNN's {least}-pixel window",
                    f"pass an image at least {least} px on each side")
    converted = f"{a.dtype} array of shape {a.shape} -> RGB ({', '.join(notes)})" if notes else None
    return np.ascontiguousarray(pixels), converted


def load_converted(source: ImageSource, name: str | None = None, *,
                   strict: bool = False) -> tuple[np.ndarray, str | None]:
    """An image as uint8 (H, W, 3) RGB and how it was converted (e.g. "RGBA -> RGB (alpha on white)";
    None when it was 8-bit RGB already). See `load_image`."""
    if isinstance(source, (str, os.PathLike)):
        return _open_path(Path(source), name or str(source), strict)
    name = name or "image"
    if isinstance(source, Image.Image):
        return _from_pil(source, name, strict)
    if isinstance(source, np.ndarray):
        return _check_array(source, name, strict)
    raise _fail(name, f"got a {type(source).__name__}", "pass a path, a PIL image or an H x W x 3 uint8 numpy array")


def load_image(source: ImageSource, name: str | None = None, *, strict: bool = False) -> np.ndarray:
    """An image as uint8 (H, W, 3) RGB from a path, a PIL image or a numpy array; JPEGs are turned
    upright by their EXIF orientation, other modes and depths converted (refused when `strict`).
    Anything unusable raises an ImageError naming `name` (or the path)."""
    return load_converted(source, name, strict=strict)[0]


# ---------------------------------------------------------------------------------------------- files

def list_inputs(inputs: Sequence[str], suffixes: Sequence[str] = IMAGE_SUFFIXES) -> tuple[list[str], list[Path]]:
    """The paths to read: a file as given; a folder's entries with one of `suffixes` (default: the image
    ones), recursively, sorted, each joined to the folder as given (a broken link among them is listed:
    loading says why). Also the folders' other files, skipped (their names go in one line, `skipped_line`)."""
    files, skipped = [], []
    for given in inputs:
        if not Path(given).is_dir():
            files.append(given)
            continue
        for p in sorted(Path(given).rglob("*")):
            if p.suffix.lower() in suffixes and not p.is_dir():
                files.append(os.path.join(given, str(p.relative_to(given))))
            elif p.is_file():
                skipped.append(p)
    return files, skipped


def skipped_line(skipped: Sequence[Path], video_suffixes: Sequence[str] = ()) -> str:
    """The one line that says which files of the folders were not read, and why (`video_suffixes`: those
    the caller reads as videos)."""
    names = ", ".join(str(p) for p in skipped[:3]) + (", ..." if len(skipped) > 3 else "")
    kinds, videos = ("an image", "") if not video_suffixes else (
        "an image or video", f"; videos: {' '.join(video_suffixes)}")
    return (f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} without {kinds} suffix "
            f"({' '.join(IMAGE_SUFFIXES)}{videos}; name a file to read it anyway): {names}")


def first_copies(files: Sequence[str]) -> dict[int, int]:
    """{index: index of its first occurrence} for each path that is the same file as an earlier one
    (the same after resolving links and `..`: e.g. a file given alone and through its folder)."""
    seen: dict[str, int] = {}
    copies = {}
    for i, given in enumerate(files):
        key = os.path.normcase(os.path.realpath(given))
        if key in seen:
            copies[i] = seen[key]
        seen.setdefault(key, i)
    return copies


def try_load(source: ImageSource, name: str, strict: bool) -> tuple[np.ndarray | ImageError, str | None]:
    """The loaded image and its conversion, or its ImageError as a value (a batch goes on past it)."""
    try:
        return load_converted(source, name, strict=strict)
    except ImageError as err:
        return err, None
