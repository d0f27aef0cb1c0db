"""The package's modules import one another without a circle, so each can be imported
(and reasoned about) on its own, and nothing imports the worker entry point."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[2] / "python-worker" / "natserve"


def internal_imports() -> Dict[str, Set[str]]:
    """Module name -> the natserve modules it imports at module level or in functions."""
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        name = path.stem
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(alias.name for alias in node.names)
                elif node.module and node.module.startswith("natserve."):
                    deps.add(node.module.split(".")[1])
        graph[name] = {d for d in deps if (PACKAGE / f"{d}.py").exists()}
    return graph


def test_no_import_circle() -> None:
    graph = internal_imports()
    done: Set[str] = set()

    def visit(name: str, path: List[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join([*path, name]))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert {"_stage", "_launcher", "_worker"} <= graph["_server"]


def test_nothing_imports_the_worker_entry_point() -> None:
    # `python -m natserve._worker_main` runs it as __main__; a second import would give
    # the process two copies of it.
    assert [m for m, deps in internal_imports().items() if "_worker_main" in deps] == []
