"""The package's module-level imports form no cycle (data -> io -> preprocess -> data was one)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "kernel_distill"


def module_level_imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name.endswith("__init__"):
            continue  # the package's re-exports
        graph[name] = set()
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside functions are fine
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kernel_distill."):
                graph[name].add(node.module.removeprefix("kernel_distill."))
            elif isinstance(node, ast.Import):
                graph[name].update(a.name.removeprefix("kernel_distill.") for a in node.names
                                   if a.name.startswith("kernel_distill."))
    return graph


def test_no_import_cycle():
    graph = module_level_imports()
    state = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join([*trail, node])
        state[node] = "open"
        for child in graph.get(node, ()):
            visit(child, [*trail, node])
        state[node] = "done"

    for module in graph:
        visit(module, [])
    assert "io" not in graph["preprocess"] and "data" not in graph["preprocess"] and "io" not in graph["data"]
