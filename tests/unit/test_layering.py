"""The import structure of the three packages: one-way layers and no cycles (README "Layout").

Read from the source with ``ast`` (nothing is imported), counting every import: module level, function level
and ``TYPE_CHECKING`` blocks alike, so a function-level import cannot hide a cycle or an upward arrow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("invsr_pl", "datamodules", "callbacks")

# Layers that the library code below them must never import (the entry points and systems sit on top).
UPPER = ("invsr_pl.cli", "invsr_pl.launch", "invsr_pl.systems", "invsr_pl.demo", "callbacks")
# Building blocks: they may import each other (models -> sampling conventions, ...) and utils, never UPPER,
# and never the data pipeline (a test asset's recipe that needs data lives in cli/).
LOWER = ("invsr_pl.models", "invsr_pl.sampling", "invsr_pl.losses", "invsr_pl.metrics", "invsr_pl.pipelines")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """Every project module ``name`` imports (``from a.b import c`` -> ``a.b.c`` when that is a module)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


GRAPH = {name: sorted(set(_imports(name, path))) for name, path in MODULES.items()}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_the_packages() -> None:
    """Guards the test itself: it must find the modules and their imports, or every check below is vacuous."""
    assert "invsr_pl.utils.checkpoint" in MODULES and "datamodules.sr_datamodule" in MODULES
    assert "invsr_pl.utils.atomic" in GRAPH["callbacks.checkpoint"]


def test_utils_is_the_ground_floor() -> None:
    """``invsr_pl/utils`` imports nothing of the project above it."""
    upward = {
        name: [t for t in targets if not _within(t, ("invsr_pl.utils",)) and t != "invsr_pl"]
        for name, targets in GRAPH.items()
        if _within(name, ("invsr_pl.utils",))
    }
    assert not {k: v for k, v in upward.items() if v}


@pytest.mark.parametrize("layer", LOWER)
def test_building_blocks_do_not_reach_up(layer: str) -> None:
    """Models, sampling, losses, metrics and pipelines never import systems, commands, callbacks or data."""
    upward = {
        name: [t for t in targets if _within(t, (*UPPER, "datamodules"))]
        for name, targets in GRAPH.items()
        if _within(name, (layer,))
    }
    assert not {k: v for k, v in upward.items() if v}


def test_datamodules_use_only_utils_of_the_library() -> None:
    upward = {
        name: [t for t in targets if t.startswith("invsr_pl") and not _within(t, ("invsr_pl.utils",))]
        for name, targets in GRAPH.items()
        if _within(name, ("datamodules",))
    }
    assert not {k: v for k, v in upward.items() if v}


def test_no_import_cycles() -> None:
    """No strongly connected component of more than one file (Tarjan's algorithm over GRAPH)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


@pytest.mark.parametrize("layer", ["invsr_pl.demo", "invsr_pl.sweeps", "invsr_pl.systems", "invsr_pl.launch"])
def test_nothing_but_commands_imports_the_commands(layer: str) -> None:
    """``cli/`` is the top floor: the demo engine, the sweep summary, systems and run assembly never reach
    into a command for its names (one default seed, one output naming rule, one SetupError below it)."""
    upward = {
        name: [t for t in targets if _within(t, ("invsr_pl.cli",))]
        for name, targets in GRAPH.items()
        if _within(name, (layer,))
    }
    assert not {k: v for k, v in upward.items() if v}
