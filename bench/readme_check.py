"""`python -m bench.readme_check [only=KEY,...] [list=true]`: run README.md's long commands and compare
their output with what the README shows.

Every command in README.md's ```bash blocks is checked: the cheap ones by tests/test_readme.py (it runs them,
or composes each Hydra command's config to prove its overrides valid), the long ones here. `EXPENSIVE` lists
the long ones; the test fails on a README command that it neither runs nor finds here. For a command whose
output the README shows as a table, each row shown must come back with the same label and values within the
entry's tolerance (mAP of a rerun on another machine: run-to-run spread, not the digits of one run). Writes
`bench/readme_check.md`.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
REPORT = REPO / "bench" / "readme_check.md"
RESULTS = REPO / "bench" / "readme_check.json"


@dataclass(frozen=True)
class Expensive:
    """A README command too long for the test suite, run here."""

    key: str  # for only=
    why: str  # why the test suite does not run it
    table_after: str | None = None  # README text the shown table follows; None: no output shown (exit 0)
    tolerance: float = 0.0  # largest |shown - measured| per table value
    needs: str = ""  # what the machine needs beyond a clone


EXPENSIVE: dict[str, Expensive] = {
    "make install": Expensive(
        "install", "creates .venv and installs from the package index", needs="network"
    ),
    "make test": Expensive("test", "the whole test suite (minutes)"),
    "python -m ced_lightning.train experiment=ced_mini": Expensive(
        "main",
        "trains two teachers, extracts, distils CED-Mini and its label-only row (about 25 min on 2 cores)",
        table_after="`experiment=ced_mini`, seed 42",
        tolerance=0.02,
    ),
    "make demo": Expensive(
        "demo",
        "the demo end to end (about 11 min on 2 cores)",
        table_after="`make demo` from a fresh clone",
        tolerance=0.02,
    ),
    "ced-predict clip.wav recordings/ --model ced_mini --top-k 3": Expensive(
        "predict_released",
        "needs the released ced_mini file (downloaded once; tests never download)",
        needs="network or ced_mini in the Hugging Face or torch.hub cache",
    ),
}

TABLE_ROW = re.compile(r"^\s*[│|](.+)[│|]\s*$")
NUMBER = re.compile(r"^[-+−]?\d+(\.\d+)?( %)?$")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def _logical_lines(body: str) -> list[str]:
    """Lines with backslash continuations joined and shell comments dropped (quotes respected)."""
    lines, current = [], ""
    for raw in body.splitlines():
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        stripped = _strip_comment(current).strip()
        if stripped:
            lines.append(" ".join(stripped.split()))
        current = ""
    return lines


def _strip_comment(line: str) -> str:
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def readme_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks, one string each: `for VAR in A B; do ...; done` expanded per
    value, `a && b` split."""
    commands: list[str] = []
    for language, body in fenced_blocks(text):
        if language != "bash":
            continue
        lines = _logical_lines(body)
        i = 0
        while i < len(lines):
            loop = re.fullmatch(r"for (\w+) in (.+); do", lines[i])
            if loop:
                end = lines.index("done", i)
                for value in loop.group(2).split():
                    for line in lines[i + 1 : end]:
                        commands += _split_and(line.replace(f"${loop.group(1)}", value))
                i = end + 1
                continue
            commands += _split_and(lines[i])
            i += 1
    return commands


def _split_and(line: str) -> list[str]:
    return [part.strip() for part in line.split(" && ")]


def console_examples(text: str) -> list[tuple[str, list[str]]]:
    """(command, the output lines shown under it) of every `$ ` line in ```console blocks."""
    examples: list[tuple[str, list[str]]] = []
    for language, body in fenced_blocks(text):
        if language != "console":
            continue
        for line in body.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:].strip(), []))
            elif examples and line.strip():
                examples[-1][1].append(line)
    return examples


def hydra_command(command: str) -> tuple[str, list[str]] | None:
    """(`ced_lightning` command, its overrides) of `python -m ced_lightning.<command> ...`, else None."""
    words = shlex.split(command)
    if len(words) >= 3 and words[:2] == ["python", "-m"] and words[2].startswith("ced_lightning."):
        return words[2].split(".", 1)[1], words[3:]
    return None


def table_rows(lines: list[str]) -> dict[str, list[str]]:
    """label -> cells of the first table (markdown `| a | b |` or rich `│ a │ b │`) in `lines`; header and
    separator rows (no number in them) are left out."""
    rows: dict[str, list[str]] = {}
    for line in lines:
        match = TABLE_ROW.match(line)
        if not match:
            if rows:
                break
            continue
        cells = [cell.strip() for cell in re.split(r"[│|]", match.group(1))]
        if cells and any(NUMBER.match(cell) for cell in cells[1:]):
            rows[cells[0]] = cells[1:]
    return rows


def shown_table(text: str, after: str) -> dict[str, list[str]]:
    """The first table the README shows after the text `after`."""
    start = text.index(after)
    return table_rows(text[start:].splitlines()[1:])


def _value(cell: str) -> float | None:
    cell = cell.replace("−", "-").removesuffix(" %")
    try:
        return float(cell)
    except ValueError:
        return None


def compare_tables(
    shown: dict[str, list[str]], measured: dict[str, list[str]], tolerance: float
) -> list[str]:
    """What differs: a row shown but not measured, or a value further than `tolerance` from the measured one.
    A shown row with fewer cells is aligned to the measured row's last cells (the README may show test mAP
    alone)."""
    problems = []
    for label, cells in shown.items():
        if label not in measured:
            problems.append(f"row {label!r}: shown, not in the output (rows: {sorted(measured)})")
            continue
        got = measured[label][len(measured[label]) - len(cells) :]
        for want_cell, got_cell in zip(cells, got, strict=True):
            want, value = _value(want_cell), _value(got_cell)
            if want is None and not want_cell:
                continue
            if want is None or value is None or abs(want - value) > tolerance:
                problems.append(
                    f"row {label!r}: shown {want_cell}, measured {got_cell} (tolerance {tolerance:g})"
                )
    return problems


def prepare_inputs(workdir: Path) -> None:
    """The files the README's ced-predict command names: a demo clip and a folder of two."""
    import soundfile as sf

    from ced_lightning.data.demo import generate_demo_clip

    (workdir / "recordings").mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(["clip.wav", "recordings/a.wav", "recordings/b.wav"]):
        waveform, _ = generate_demo_clip(seed=0, index=index, clip_seconds=4.0)
        sf.write(workdir / path, waveform, 16000, subtype="PCM_16")


def run(command: str, entry: Expensive, text: str, workdir: Path) -> dict[str, object]:
    start = time.perf_counter()
    done = subprocess.run(command, shell=True, cwd=workdir, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    problems = [] if done.returncode == 0 else [f"exit status {done.returncode}: {done.stderr[-2000:]}"]
    if entry.table_after and done.returncode == 0:
        shown = shown_table(text, entry.table_after)
        measured = table_rows(done.stdout.splitlines())
        problems += compare_tables(shown, measured, entry.tolerance)
    return {"command": command, "seconds": seconds, "problems": problems}


def report(results: dict[str, dict[str, Any]]) -> str:
    """The page: every command of `EXPENSIVE`, with its last run's result (kept in readme_check.json) or
    'not run yet'."""
    lines = [
        "# README commands, rerun",
        "",
        "Written by `python -m bench.readme_check` (`only=KEY,...` reruns some; `list=true` lists them):",
        "each long command of README.md run as written, its table compared with the README's.",
        "",
        "| command | needs | last run | wall | matches the README |",
        "| --- | --- | --- | --- | --- |",
    ]
    for command, entry in EXPENSIVE.items():
        result = results.get(command)
        if result is None:
            lines.append(f"| `{command}` | {entry.needs or 'a clone'} | not run yet | | |")
            continue
        problems = result["problems"]
        verdict = "yes" if not problems else "**no**: " + "; ".join(map(str, problems)).replace("|", "\\|")
        wall = f"{float(result['seconds']):.0f} s"
        lines.append(
            f"| `{command}` | {entry.needs or 'a clone'} | {result['machine']} | {wall} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    options = dict(arg.split("=", 1) for arg in argv)
    if options.get("list") == "true":
        for command, entry in EXPENSIVE.items():
            print(
                f"{entry.key:18} {command}\n{'':18} {entry.why}"
                + (f"; needs {entry.needs}" if entry.needs else "")
            )
        return 0
    only = set(options["only"].split(",")) if "only" in options else None
    text = README.read_text()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results = {command: result for command, result in results.items() if command in EXPENSIVE}
    inputs = Path(tempfile.mkdtemp(prefix="readme_check_"))
    prepare_inputs(inputs)
    failed = False
    for command, entry in EXPENSIVE.items():
        if only is not None and entry.key not in only:
            continue
        # ced-predict reads the files it names from where it runs; the other commands run from the clone.
        result = run(command, entry, text, inputs if command.startswith("ced-predict") else REPO)
        results[command] = {**result, "machine": machine()}
        failed |= bool(result["problems"])
        print(f"{command}: {result['problems'] or 'matches'}", flush=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    REPORT.write_text(report(results))
    print(f"wrote {REPORT}")
    return 1 if failed else 0


def machine() -> str:
    """The CPU, its cores, the GPU and the day, as bench.run names them."""
    from bench.run import machine as bench_machine

    info = bench_machine()
    return f"{info['cpu']}, {info['cores']} cores, {info['gpu'] or 'no GPU'}, {info['date'][:10]}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
