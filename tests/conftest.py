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
