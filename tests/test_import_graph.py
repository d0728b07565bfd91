"""The package's modules import one another in one direction: no cycle among cliplab's subpackages."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "cliplab"


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def subpackage_imports() -> dict[str, set[str]]:
    """Top-level (import-time) cliplab imports of each subpackage, e.g. cliplab.train -> {cliplab.data, ...}."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = _subpackage(".".join(p for p in parts if p != "__init__"))
        targets = graph.setdefault(source, set())
        for node in ast.parse(path.read_text()).body:
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            targets |= {_subpackage(n) for n in names if n.startswith("cliplab.") and _subpackage(n) != source}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules in order), or [] when the graph has none."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_between_subpackages():
    graph = subpackage_imports()
    assert {"cliplab.train", "cliplab.data", "cliplab.eval"} <= set(graph)
    assert cycle(graph) == [], " -> ".join(cycle(graph))
