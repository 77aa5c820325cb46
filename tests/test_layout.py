"""The package's layout holds: roles import only what they may, one module per foreign runtime, no cycles.

Every import is read from the source (relative ones resolved, imports inside functions included),
so a lazy import cannot hide a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "pipeinfer_cpu"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, as absolute dotted names (`from a import b` counts a.b when it is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: {imp for imp in imports_of(path) if imp in MODULES and imp != name} for name, path in MODULES.items()}


ROLES = ("head", "rank", "wire", "llama", "modelfiles", "app", "plan")


def role(name: str) -> str:
    """The package a module belongs to; top-level modules are "shared" (the `python -m pipeinfer_cpu` entry is the app's)."""
    parts = name.split(".")
    if name == "pipeinfer_cpu.__main__":
        return "app"
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else "shared"


def importers_of(foreign: str) -> set[str]:
    return {name for name, path in MODULES.items()
            if any(imp == foreign or imp.startswith(foreign + ".") for imp in imports_of(path))}


def test_the_head_and_the_ranks_do_not_import_each_other():
    crossing = [(a, b) for a, deps in GRAPH.items() for b in deps
                if {role(a), role(b)} == {"head", "rank"}]
    assert crossing == []


@pytest.mark.parametrize("lower", ["wire", "llama", "modelfiles", "shared"])
def test_shared_layers_import_no_role(lower):
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps
              if role(a) == lower and role(b) in ("head", "rank", "app", "plan")]
    assert upward == []


def test_the_plan_drives_the_head_and_only_the_app_imports_it():
    """plan/ (the performance model) runs the head's loops on a simulated cluster: it may import the
    head and the shared layers, never a rank or the app; of the roles only the app imports it."""
    plan_imports = {role(b) for a, deps in GRAPH.items() if role(a) == "plan" for b in deps}
    assert plan_imports <= {"plan", "head", "wire", "llama", "modelfiles", "shared"}
    importers = {role(a) for a, deps in GRAPH.items() for b in deps if role(b) == "plan"}
    assert importers <= {"plan", "app"}


def test_only_the_llama_layer_imports_llama_cpp():
    assert importers_of("llama_cpp") == {"pipeinfer_cpu.llama.runtime"}


def test_only_the_transport_imports_mpi4py():
    assert importers_of("mpi4py") == {"pipeinfer_cpu.wire.transport"}


def test_no_import_cycles():
    """Tarjan-free check: a depth-first search that meets a module on its own path has found a cycle."""
    cycles = []
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(GRAPH[name]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert cycles == []
