"""The package's import graph has no cycle: every module's imports, at module level and inside functions,
read with `ast` (nothing is imported). A lazy import inside a function hides a cycle from Python until the
call, so it counts here as much as a module-level one.

An edge goes to the most specific module an import names: `from ced_lightning.store import LogitStore` is an
edge to `ced_lightning.store` (its `__init__`), `from ced_lightning.data import demo` one to
`ced_lightning.data.demo`. Parent packages are not added as edges: a package whose `__init__` re-exports its
submodules is not a cycle with them.

Before the demo became its own layer this failed with
`ced_lightning.pipeline -> ced_lightning.train -> ced_lightning.tasks -> ced_lightning.pipeline`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ced_lightning

PACKAGE = "ced_lightning"
ROOT = Path(ced_lightning.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package's modules that `module` imports anywhere in its body, each with the line of one import."""
    found: dict[str, int] = {}
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path.name == "__init__.py", node)
            # `from package import submodule` imports the submodule; `from module import name` the module.
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names
            ]
        else:
            continue
        for target in targets:
            # An unknown tail (a name, not a module: `from a.b import f`) falls back to its module.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != module:
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = package_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_walk_sees_module_and_function_level_imports() -> None:
    graph = import_graph()
    assert len(graph) >= 30
    assert "ced_lightning.audio" in graph["ced_lightning.data.demo"]  # module level
    assert "ced_lightning.store.logits" in graph["ced_lightning.store"]  # inside a function
    assert "ced_lightning.train" in graph["ced_lightning.demo"]  # the demo layer runs the commands


def _reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    return seen


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module: each is one or more cycles."""
    reach = {module: _reachable(graph, module) for module in graph}
    cycles, seen = [], set()
    for module in sorted(graph):
        if module in seen:
            continue
        component = sorted(m for m in reach[module] if module in reach[m])
        seen.update(component)
        if len(component) > 1:
            cycles.append(component)
    return cycles


def test_no_import_cycle() -> None:
    graph = import_graph()
    modules = package_modules()
    lines = []
    for component in import_cycles(graph):
        lines.append("modules in a cycle: " + ", ".join(component))
        lines += [
            f"  {a} imports {b} ({modules[a].relative_to(ROOT.parent)}:{line})"
            for a in component
            for b, line in graph[a].items()
            if b in component
        ]
    assert not lines, "\n".join(lines)


@pytest.mark.parametrize(
    "command", ["train", "inputs", "extract", "evaluate", "predict", "export", "prepare"]
)
def test_generic_commands_do_not_import_the_demo_layer(command: str) -> None:
    """The demo runs the commands, never the other way: `train` reaches it only through the config
    (`data.entry`), so no command imports `ced_lightning.demo`, directly or through another module."""
    graph = import_graph()
    assert "ced_lightning.demo" not in _reachable(graph, f"ced_lightning.{command}")
