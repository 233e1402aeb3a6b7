"""The package's structure: its import graph has no cycle, and no block of six or more identical lines
stands twice in `src/`.

Imports: every module's imports, at module level and inside functions, read with `ast` (nothing is
imported). A lazy import inside a function hides a cycle from Python until the call, so it counts here as
much as a module-level one. An edge goes to the most specific module an import names: `from
ced_lightning.store import LogitStore` is an edge to `ced_lightning.store` (its `__init__`), `from
ced_lightning.data import demo` one to `ced_lightning.data.demo`. Parent packages are not added as edges: a
package whose `__init__` re-exports its submodules is not a cycle with them. Before the demo became its own
layer this failed with
`ced_lightning.pipeline -> ced_lightning.train -> ced_lightning.tasks -> ced_lightning.pipeline`.

Repeated blocks: lines are compared stripped of indentation, blank lines skipped (a copy re-indented or
re-spaced is still a copy). A block made only of lines that carry no logic of their own (imports, brackets
and commas, docstring quotes, `else:`/`try:`/`return`...) is not counted: two modules that import the same
six names share no code. Everything else counts, a repeated parameter list included: a wrapper that spells
out another function's eight keyword parameters is copied text that changes with it. Comments count as they
are text that says the same thing twice.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

import ced_lightning

PACKAGE = "ced_lightning"
ROOT = Path(ced_lightning.__file__).resolve().parent


# -- the import graph has no cycle ----------------------------------------------------------------------
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
    assert "ced_lightning.core.audio" in graph["ced_lightning.data.demo"]  # module level
    assert "ced_lightning.store.logits" in graph["ced_lightning.store"]  # inside a function
    assert "ced_lightning.extract" in graph["ced_lightning.demo"]  # the demo layer runs the commands


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
    "command", ["train", "engines.inputs", "extract", "evaluate", "predict", "export", "prepare"]
)
def test_generic_commands_do_not_import_the_demo_layer(command: str) -> None:
    """The demo runs the commands, never the other way: `train` reaches it only through the config
    (`data.entry`), so no command imports `ced_lightning.demo`, directly or through another module."""
    graph = import_graph()
    assert "ced_lightning.demo" not in _reachable(graph, f"ced_lightning.{command}")


# The command modules: `@hydra.main` entry points and the console script `cli`.
COMMANDS = ["prepare", "train", "extract", "evaluate", "predict", "export", "check", "import_logits", "cli"]


@pytest.mark.parametrize("module", ["predict", "cli", "api"])
def test_the_inference_doors_stand_on_the_engine_not_on_a_command(module: str) -> None:
    """`predict`, `ced-predict` and the Python API all tag through `engines.inference`: none of them
    imports a command module, directly or through another module, and the engine is below every command."""
    graph = import_graph()
    commands = {f"{PACKAGE}.{command}" for command in COMMANDS} - {f"{PACKAGE}.{module}"}
    assert not commands & _reachable(graph, f"{PACKAGE}.{module}")
    engine = [name for name in graph if name.startswith(f"{PACKAGE}.engines.inference")]
    assert engine and not any(commands & _reachable(graph, name) for name in engine)


def test_store_imports_nothing_above_it() -> None:
    """`store` is below `data` and the release wing: its modules import only `store` and `core`."""
    graph = import_graph()
    modules = package_modules()
    upward = [
        f"{a} imports {b} ({modules[a].relative_to(ROOT.parent)}:{line})"
        for a in graph
        if a.startswith(f"{PACKAGE}.store")
        for b, line in graph[a].items()
        if not b.startswith((f"{PACKAGE}.store", f"{PACKAGE}.core"))
    ]
    assert not upward, "\n".join(upward)


# -- the layers (docs/DESIGN.md): imports point down, commands side by side, rooms of a readable size ----
# Each top-level name of the package and its layer, highest first. A module may import its own layer or
# lower ones; command modules never import each other (only the demo layer above them runs them).
LAYERS = {
    "demo": 6,
    **dict.fromkeys([*COMMANDS, "api", "hear"], 5),
    **dict.fromkeys(["engines", "release"], 4),
    "modules": 3,
    "data": 2,
    **dict.fromkeys(["store", "models"], 1),
    **dict.fromkeys(["core", "resources"], 0),
}
MAX_LINES = 600


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_every_module_has_a_layer() -> None:
    """A new top-level module or package must be placed in LAYERS (and in docs/DESIGN.md's picture)."""
    unplaced = [m for m in package_modules() if m != PACKAGE and _layer_of(m) is None]
    assert not unplaced, f"modules without a layer in tests/test_structure.py LAYERS: {unplaced}"


def test_imports_point_down_and_commands_stand_side_by_side() -> None:
    graph = import_graph()
    modules = package_modules()
    wrong = []
    for a, targets in sorted(graph.items()):
        for b, line in targets.items():
            low, high = _layer_of(b), _layer_of(a)
            if low is None or high is None:
                continue
            upward = low > high
            sideways = low == high == LAYERS["train"] and a.split(".")[1] != b.split(".")[1]
            if upward or sideways:
                wrong.append(f"{a} imports {b} ({modules[a].relative_to(ROOT.parent)}:{line})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_test_sees_a_command_importing_a_command() -> None:
    """The rule above is not vacuous: the demo layer imports commands (allowed, it is above them)."""
    graph = import_graph()
    demo_imports = [b for b in graph[f"{PACKAGE}.demo"] if _layer_of(b) == LAYERS["train"]]
    assert demo_imports and _layer_of(f"{PACKAGE}.demo") > LAYERS["train"]


def test_no_module_is_over_the_size_limit() -> None:
    """A module a reader can hold in mind: at most MAX_LINES lines (split by concern beyond that)."""
    long = {
        str(path.relative_to(ROOT.parent)): n
        for path in package_modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


# -- no block of six or more identical lines twice in src/ --------------------------------------------
BLOCK = 6
# A line that is only an import, only brackets/commas/colons/quotes, a bare keyword or a return annotation.
TRIVIAL = re.compile(
    r"(?:from\s+\S+\s+)?import\s.*"
    r"|[\[\](){},:\"'\s]*"
    r'|"""|\'\'\''
    r"|\)\s*->\s*[^:]+:"
    r"|(?:else|try|finally):|return|pass|continue|break"
)

Place = tuple[Path, int]  # a file and the index of a line among its non-blank lines


def source_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the file's non-blank lines."""
    return [(no, line.strip()) for no, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]


def repeated_blocks(root: Path, block: int = BLOCK) -> list[tuple[str, str, int]]:
    """Every maximal run of `block` or more identical lines standing at two places under `root`, as
    (`file:first-last`, `file:first-last`, number of lines); overlapping places in one file (a run of
    repeated lines within itself) do not count."""
    files = {path: source_lines(path) for path in sorted(root.rglob("*.py"))}
    windows: dict[tuple[str, ...], list[Place]] = defaultdict(list)
    for path, lines in files.items():
        for i in range(len(lines) - block + 1):
            window = tuple(text for _, text in lines[i : i + block])
            if not all(TRIVIAL.fullmatch(text) for text in window):
                windows[window].append((path, i))
    # Windows that repeat at the same distance belong to one repeated block: group them by the two files
    # and the shift between the places, then join consecutive windows.
    starts: dict[tuple[Path, Path, int], set[int]] = defaultdict(set)
    for places in windows.values():
        for k, (path_a, a) in enumerate(places):
            for path_b, b in places[k + 1 :]:
                if path_a != path_b or b - a >= block:
                    starts[(path_a, path_b, b - a)].add(a)

    def place(path: Path, first: int, last: int) -> str:
        lines = files[path]
        return f"{path.relative_to(root.parent)}:{lines[first][0]}-{lines[last][0]}"

    found = []
    for (path_a, path_b, shift), first_lines in starts.items():
        run: list[int] = []
        for a in [*sorted(first_lines), None]:
            if run and (a is None or a != run[-1] + 1):
                first, last = run[0], run[-1] + block - 1
                found.append(
                    (place(path_a, first, last), place(path_b, first + shift, last + shift), last - first + 1)
                )
                run = []
            if a is not None:
                run.append(a)
    return sorted(found)


def test_the_search_finds_a_copied_block_and_ignores_imports(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    body = "\n".join(f"    total += {i} * value  # step {i}" for i in range(7))
    imports = "\n".join(f"import module{i}" for i in range(8))
    (package / "a.py").write_text(f"{imports}\n\ndef f(value):\n    total = 0\n{body}\n    return total\n")
    (package / "b.py").write_text(f"{imports}\n\n\nclass C:\n    def g(self, value):\n{body}\n")
    (package / "c.py").write_text("x = 1\n" + "\n".join(f"y{i} = {i}" for i in range(5)) + "\nx = 1\n")
    assert repeated_blocks(tmp_path / "pkg") == [("pkg/a.py:12-18", "pkg/b.py:13-19", 7)]
    # Five lines are not a block; six are, also within one file.
    (package / "b.py").write_text("\n".join(body.splitlines()[:5]))
    assert repeated_blocks(tmp_path / "pkg") == []
    (package / "d.py").write_text(f"def h(value):\n{body}\n\n\ndef k(value):\n{body}\n")
    assert ("pkg/d.py:2-8", "pkg/d.py:12-18", 7) in repeated_blocks(tmp_path / "pkg")


def test_no_block_of_six_lines_stands_twice_in_src() -> None:
    found = repeated_blocks(ROOT)
    message = [f"{a} and {b}: {n} identical lines (move the code to one owner)" for a, b, n in found]
    assert not found, "\n".join(message)
