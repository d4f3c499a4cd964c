"""mtcnn_jax: the reference JAX/Flax implementation of MTCNN (Zhang et al. 2016).

Face detection with five landmarks: three small nets (nets.py) run as a cascade (cascade.py), with
the original released weights (pretrained.py) or your own (checkpoints.py). `import mtcnn_jax` is
light: each submodule, and the names below, load on first use.
"""

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# The TFDS builders live in the repository's datasets/ folder and install as mtcnn_jax/datasets. Run
# from a source checkout (this folder shadowing an installed copy), find them beside this folder.
_HERE = Path(__file__).resolve().parent
if not (_HERE / "datasets").is_dir() and (_HERE.parent / "datasets" / "__init__.py").is_file():
    __path__.append(str(_HERE.parent))  # noqa: F821 (a package's __path__)

_NAMES = {"init_params": "nets", "pnet": "nets", "rnet": "nets", "onet": "nets",
          "load_pretrained": "pretrained"}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    """Submodules (`mtcnn_jax.cascade`) and the names above, imported when first used (PEP 562)."""
    if name in _NAMES:
        return getattr(importlib.import_module(f"mtcnn_jax.{_NAMES[name]}"), name)
    try:
        return importlib.import_module(f"mtcnn_jax.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"mtcnn_jax.{name}":
            raise
        raise AttributeError(f"module 'mtcnn_jax' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_NAMES])
