"""The package's shape: a light top-level import, no import cycles, imports at the top, short files."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {f"mtcnn_jax.{p.stem}": p for p in sorted((REPO / "mtcnn_jax").glob("*.py")) if p.stem != "__init__"}
MODULES |= {f"mtcnn_jax.datasets.{p.stem}": p for p in sorted((REPO / "datasets").glob("*.py")) if p.stem != "__init__"}
MAX_LINES = 400


def _imported_modules(path: Path) -> set[str]:
    """The package modules `path` imports at its top level (`from mtcnn_jax import x` counts as x)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (a path that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in graph:
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    graph = {name: _imported_modules(path) - {name} for name, path in MODULES.items()}
    assert _cycle(graph) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_at_the_top_and_short_files(name):
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    nested = [f"line {n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in top]
    assert not nested, f"{path.name}: imports inside functions or blocks at {nested}"
    if path.parent.name == "mtcnn_jax":
        assert len(path.read_text().splitlines()) <= MAX_LINES, f"{path.name} holds more than one idea"


def _imported_by(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_import_mtcnn_jax_is_light():
    loaded = _imported_by("import mtcnn_jax")
    assert not loaded & {"jax", "flax", "tensorflow_datasets", "orbax", "matplotlib"}
