"""Layers only point down, and no module imports itself round a cycle.

foundation (errors, limits, io) -> ops, data -> models -> engine (+ config) ->
reproduce, export, viz -> cli (+ train). Every ``import`` in ``bcnn/``, at module level or
inside a function, is read from the source and checked against that order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "bcnn"
# Layer of each top-level part of bcnn; a module may import its own part and lower layers.
LAYERS = {
    "bcnn": 0,
    "bcnn.errors": 0,
    "bcnn.limits": 0,
    "bcnn.io": 0,
    "bcnn.ops": 1,
    "bcnn.data": 1,
    "bcnn.models": 2,
    "bcnn.engine": 3,
    "bcnn.config": 3,
    "bcnn.reproduce": 4,
    "bcnn.export": 4,
    "bcnn.viz": 4,
    "bcnn.cli": 5,
    "bcnn.train": 5,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Parts that share a layer and may import each other.
SAME_PART = {"bcnn.config": "bcnn.engine", "bcnn.train": "bcnn.cli"}


def _part(module: str) -> str:
    """The key of ``LAYERS`` a module belongs to (``bcnn.models.pooling`` -> ``bcnn.models``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in LAYERS else "bcnn"


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every bcnn import of a file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # bcnn imports absolutely
            names = [node.module or ""]
        else:
            continue
        for name in names:
            if name == "bcnn" or name.startswith("bcnn."):
                found.append((name, node.lineno, id(node) in top_level))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_point_down(path: Path) -> None:
    here = _module_name(path)
    level = LAYERS[_part(here)]
    upward = [
        f"{path.relative_to(REPO_ROOT)}:{line} imports {name} (layer {LAYERS[_part(name)]})"
        for name, line, _ in _imports(path)
        if LAYERS[_part(name)] > level
        or (
            LAYERS[_part(name)] == level
            and level > 0
            and SAME_PART.get(_part(name), _part(name)) != SAME_PART.get(_part(here), _part(here))
        )
    ]
    assert not upward, f"{here} is in layer {level}:\n" + "\n".join(upward)


def test_no_module_imports_itself_round_a_cycle() -> None:
    modules = {_module_name(p): p for p in FILES}
    graph = {
        name: sorted({m for m, _, top in _imports(path) if top and m in modules and m != name})
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                return [*trail, node, nxt]
            if nxt not in state:
                cycle = visit(nxt, [*trail, node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for name in graph:
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle)
