"""The source says each thing once: no block of six or more identical lines stands twice in `src/`.

Lines are compared stripped of indentation, blank lines skipped (a copy re-indented or re-spaced is still a
copy). A block made only of lines that carry no logic of their own (imports, brackets and commas, docstring
quotes, `else:`/`try:`/`return`...) is not counted: two modules that import the same six names share no
code. Everything else counts, a repeated parameter list included: a wrapper that spells out another
function's eight keyword parameters is copied text that changes with it. Comments count as they are text
that says the same thing twice.

The import graph (no cycles, the demo layer reached by no command) is checked in `tests/test_imports.py`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import ced_lightning

SRC = Path(ced_lightning.__file__).resolve().parent.parent
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
    found = repeated_blocks(SRC / "ced_lightning")
    message = [f"{a} and {b}: {n} identical lines (move the code to one owner)" for a, b, n in found]
    assert not found, "\n".join(message)
