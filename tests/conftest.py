"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real-data folder: $MTCNN_JAX_DATA, else shared/data beside the repository root."""
    path = Path(os.environ.get("MTCNN_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set MTCNN_JAX_DATA)")
    return path


class CompileCounter:
    """Counts XLA compile requests (JAX's own monitoring events; a persistent-cache hit counts too, so a
    count of 0 means nothing was even looked up)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax

        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == self.EVENT:
            self.count += 1


@pytest.fixture(scope="session")
def compiles() -> CompileCounter:
    """The session's compile counter: compare `compiles.count` before and after."""
    return CompileCounter()
