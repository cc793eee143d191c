"""The package's layering, read from the source: every import counts, those inside functions included.

A lazy import inside a function still makes the two modules depend on each other; counting only the
module-level ones once hid two circles (kip -> distributed -> backend -> kip, and kernels -> finite ->
kernels). docs/ARCHITECTURE.md describes the layers these rules keep.

Also read from the source: every public function is annotated, so that mypy checks its body.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "kernel_distill"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "kernel_distill"


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The absolute ``kernel_distill.X`` name an import refers to (relative imports resolved), else None."""
    if node.level:
        base = module.split(".") if module != "kernel_distill" else []
        base = base if is_package else base[:-1]
        base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
        target = ".".join([*base, node.module] if node.module else base)
        return "kernel_distill." + target if target else "kernel_distill"
    if node.module and (node.module == "kernel_distill" or node.module.startswith("kernel_distill.")):
        return node.module
    return None


def _known(name: str, modules: set[str]) -> str | None:
    """``name`` or its nearest enclosing module of this package (``a.b.c`` -> ``a.b`` if only that exists)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (package ``__init__`` files too,
    named by their package; ``from pkg import sub`` counts as importing ``pkg.sub`` where that is a module)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    names = {("kernel_distill." + n if n != "kernel_distill" else n) for n in paths}
    graph: dict[str, set[str]] = {}
    for short, path in paths.items():
        module = "kernel_distill." + short if short != "kernel_distill" else short
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = _resolve(short, node, path.name == "__init__.py")
                if base is not None:
                    targets = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("kernel_distill")]
            for target in targets:
                known = _known(target, names)
                if known and known != module:
                    edges.add(known)
        graph[module] = edges
    return {k.removeprefix("kernel_distill.") or "kernel_distill": {e.removeprefix("kernel_distill.") for e in v}
            for k, v in graph.items()}


GRAPH = import_graph()


def _within_package(module: str, other: str) -> bool:
    """A package's ``__init__`` re-exporting its own submodules is not a cycle through the package."""
    return other.startswith(module + ".") or module.startswith(other + ".")


def test_no_import_cycle_counting_imports_inside_functions():
    state: dict[str, str] = {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join([*trail, node])
        state[node] = "open"
        for child in sorted(GRAPH.get(node, ())):
            if child in GRAPH and not _within_package(node, child) and child != "kernel_distill":
                visit(child, [*trail, node])
        state[node] = "done"

    for module in sorted(GRAPH):
        visit(module, [])


def _reaches(module: str) -> set[str]:
    """Every package module ``module`` imports, directly or through others (package re-exports skipped)."""
    seen, todo = set(), [module]
    while todo:
        for child in GRAPH.get(todo.pop(), ()):
            if child not in seen and child != "kernel_distill":
                seen.add(child)
                todo.append(child)
    return seen


def _layer(prefix: str) -> list[str]:
    return sorted(m for m in GRAPH if m == prefix or m.startswith(prefix + "."))


# What a layer may never import (directly or through another module): the rules of docs/ARCHITECTURE.md.
NEVER = {
    # The kernel engine is the bottom of the maths: nothing above it, no finite nets, no KRR, no data.
    "kernels": ["finite", "krr", "objective", "kip", "label_solve", "distributed", "data", "results", "zoo",
                "workflows", "cli", "experiments", "report", "export", "plots"],
    # Datasets know no kernel and own their checksums.
    "data": ["kernels", "krr", "objective", "results", "experiments", "workflows", "cli", "zoo", "io"],
    # Preprocessing is maths on arrays (data -> io -> preprocess -> data was once a cycle).
    "preprocess": ["io", "data", "kernels", "workflows", "cli"],
    # The zoo is an index: it measures nothing (reading a set's kernel description, kernels.spec, is not
    # measuring; computing a kernel is).
    "zoo": ["kernels.api", "kernels.exact", "kernels.random_features", "krr", "objective", "experiments",
            "workflows", "cli", "kip", "label_solve", "finite"],
    # Backends run kernel blocks; they know no algorithm.
    "distributed": ["kip", "label_solve", "objective", "experiments", "workflows", "cli", "zoo", "report"],
    # The KRR objective is maths over kernel blocks.
    "objective": ["kip", "data", "experiments", "workflows", "cli", "zoo", "distributed"],
    # KIP is an algorithm: it takes its file hash from a base module, never from the zoo, and never the CLI.
    "kip": ["zoo", "workflows", "cli", "experiments", "report"],
    "label_solve": ["workflows", "cli", "experiments", "zoo", "data"],
    "krr": ["kip", "workflows", "cli", "experiments", "zoo", "data"],
    # Workflows are called by the CLI, never the reverse.
    "workflows": ["cli"],
}


@pytest.mark.parametrize("layer", sorted(NEVER))
def test_layer_never_imports_what_is_above_it(layer):
    modules = _layer(layer)
    assert modules, f"no module named {layer}"
    for module in modules:
        forbidden = [m for m in _reaches(module) for banned in NEVER[layer]
                     if (m == banned or m.startswith(banned + ".")) and not _within_package(module, m)]
        assert not forbidden, f"{module} reaches {sorted(set(forbidden))}"


def test_the_graph_sees_imports_inside_functions():
    # The reader itself: the workflows import the library inside functions, so they must show up.
    assert "kip" in {m.split(".")[0] for m in GRAPH["workflows.kip"]}
    assert GRAPH["cli"], "cli imports the workflows"


def _unannotated(path: pathlib.Path) -> list[str]:
    """``file:line:name`` of each public function of ``path`` (module level, or a method of a module-level class;
    ``__call__`` counts as public) missing a parameter annotation (``self``/``cls`` aside) or its return's."""
    offenders = []
    for node in ast.parse(path.read_text()).body:
        functions = [node] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            functions = [f for f in node.body if isinstance(f, ast.FunctionDef)]
        for f in functions:
            if f.name.startswith("_") and f.name != "__call__":
                continue
            params = [a for a in f.args.posonlyargs + f.args.args + f.args.kwonlyargs if a.arg not in ("self", "cls")]
            params += [a for a in (f.args.vararg, f.args.kwarg) if a is not None]
            if f.returns is None or any(a.annotation is None for a in params):
                offenders.append(f"{path.relative_to(PACKAGE.parents[1])}:{f.lineno}:{f.name}")
    return offenders


def test_public_functions_are_annotated():
    # mypy (the default, non-strict mode) checks only the bodies of annotated functions: an unannotated public
    # function is unchecked, and its callers see Any.
    offenders = [o for path in sorted(PACKAGE.rglob("*.py")) for o in _unannotated(path)]
    assert not offenders, "public functions without full annotations:\n" + "\n".join(offenders)


def test_importing_the_package_turns_off_the_xla_cpu_fusions_that_crash_jaxlib_0_10():
    """kernel_distill._xla_workarounds: the flag is added for jaxlib 0.10 on AMD processors only, a user's own
    setting of it is kept, other user flags are kept, and the opt-out variable leaves XLA_FLAGS alone. (The
    crash itself is guarded by tests/test_kernels.py::test_gradients_are_finite_on_the_diagonal.)"""
    import os
    import subprocess
    import sys
    from importlib import metadata

    def flags_after_import(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KERNEL_DISTILL_KEEP_XLA_FLAGS")}
        code = "import os, kernel_distill; print(repr(os.environ.get('XLA_FLAGS')))"
        out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                             check=True).stdout
        return eval(out)

    from kernel_distill._xla_workarounds import affected_processor

    affected = metadata.version("jaxlib").startswith("0.10.") and affected_processor()
    assert flags_after_import() == ("--xla_cpu_experimental_ynn_fusion_type=" if affected else None)
    assert flags_after_import(XLA_FLAGS="--xla_dump_to=/tmp/x") == \
        ("--xla_cpu_experimental_ynn_fusion_type= --xla_dump_to=/tmp/x" if affected else "--xla_dump_to=/tmp/x")
    own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"
    assert flags_after_import(XLA_FLAGS=own) == own
    assert flags_after_import(KERNEL_DISTILL_KEEP_XLA_FLAGS="1") is None
