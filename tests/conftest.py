"""Shared pytest fixtures, and strict mode: with MTCNN_JAX_STRICT=1 (set by .ci/run) missing data or
weights fail the tests that need them instead of skipping them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NoReturn

import jax
import pytest

from mtcnn_jax import pretrained

STRICT = os.environ.get("MTCNN_JAX_STRICT", "") not in ("", "0")


def missing(what: str) -> NoReturn:
    """Skip a test whose data or weights are absent; in strict mode, fail it."""
    if STRICT:
        pytest.fail(f"{what} (MTCNN_JAX_STRICT is set: missing data or weights are errors)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder: $MTCNN_JAX_DATA, else shared/data beside the repository root."""
    path = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        missing(f"shared data not found at {path} (set MTCNN_JAX_DATA)")
    return path


@pytest.fixture(scope="session")
def original_weights() -> dict[str, Any]:
    """The released MTCNN weights as param trees (fetched once into the user cache if needed)."""
    try:
        return pretrained.load_pretrained()
    except pretrained.WeightsNotFoundError as err:
        missing(f"the released MTCNN weights are not available here: {err}")


class CompileCounter:
    """Counts XLA compile requests (JAX's own monitoring events; a persistent-cache hit counts too, so a
    count of 0 means nothing was even looked up)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1


@pytest.fixture(scope="session")
def compiles() -> CompileCounter:
    """The session's compile counter: compare `compiles.count` before and after."""
    return CompileCounter()
