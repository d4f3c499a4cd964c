"""The study notebooks' data: the shared real-data folder, found as the tests find it, and the photo
that notebooks 02 and 03 walk through (a synthetic stand-in, with no face, when the folder is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# $MTCNN_JAX_DATA, else shared/data beside the repository (../../shared/data from this folder).
DATA = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
# Set by .ci/run: missing shared data is an error, not a fallback.
STRICT = os.environ.get("MTCNN_JAX_STRICT", "") not in ("", "0")


def have_data(*relative: str) -> bool:
    """Whether DATA holds every one of these paths; if not, say what to do (and raise in strict mode)."""
    absent = [r for r in relative if not (DATA / r).exists()]
    if absent and STRICT:
        raise FileNotFoundError(f"MTCNN_JAX_STRICT is set and {DATA.resolve()} lacks {absent}")
    if absent:
        print(f"Shared data not found: {DATA.resolve()} lacks {absent}.\n"
              "Set MTCNN_JAX_DATA to the shared/data folder and rerun; the cells that need it skip their work.")
    return not absent


def study_photo(names: tuple[str, ...] = ("multiface.jpg", "ivan.jpg", "angelina_jolie.jpg")) -> tuple[np.ndarray, Path | None]:
    """The first reference photo found (HxWx3 uint8 RGB) and its path; without the shared data, a
    synthetic image (a skin-coloured oval on a gradient) and None, saying what to do."""
    photo_path = next((p for p in (DATA / "reference" / n for n in names) if p.is_file()), None)
    if photo_path is not None:
        image = np.asarray(Image.open(photo_path).convert("RGB"))
        print(f"using {photo_path}  ({image.shape[1]} x {image.shape[0]} pixels)")
        return image, photo_path
    if STRICT:
        raise FileNotFoundError(f"MTCNN_JAX_STRICT is set and no reference photo is in {DATA / 'reference'}")
    print(f"Shared data not found at {DATA.resolve()}.\n"
          "Set MTCNN_JAX_DATA to the shared/data folder (the one holding reference/ivan.jpg) and rerun.\n"
          "Falling back to a SYNTHETIC image: the notebook runs, but there is no face to find.")
    yy, xx = np.mgrid[0:320, 0:400]
    image = np.stack([(xx * 0.6) % 256, (yy * 0.8) % 256, ((xx + yy) * 0.3) % 256], -1).astype(np.uint8)
    disc = (xx - 200) ** 2 / 60**2 + (yy - 150) ** 2 / 80**2 < 1  # a skin-coloured oval, not a face
    image[disc] = (224, 172, 140)
    return image, None
