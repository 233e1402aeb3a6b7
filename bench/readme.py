"""`python -m bench.readme`: write the README's performance table from `bench/results.json`.

The table sits between `<!-- bench:start -->` and `<!-- bench:end -->` in README.md; only the ratios are
shown there (absolute figures on a shared machine are noise), each with the machine and date it came from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
README = HERE.parent / "README.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def table(results: dict[str, Any]) -> str:
    lines = [
        "Generated from `bench/results.json` by `python -m bench.readme` (run `make bench` to remeasure).",
        "",
        "| section | ratio | value | measured on |",
        "|---|---|---|---|",
    ]
    for name, section in results["sections"].items():
        m = section.get("machine", results["machine"])
        where = f"{m['cpu']}, {m['cores']} cores, {m.get('gpu') or 'no GPU'}, {m['date'][:10]}"
        for key, value in section.get("ratios", {}).items():
            lines.append(f"| {name} | {key} | {value:.3g} | {where} |")
    return "\n".join(lines)


def main() -> None:
    results = json.loads((HERE / "results.json").read_text())
    text = README.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{README}: add the markers {START} and {END} where the table goes")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    README.write_text(pattern.sub(lambda _: f"{START}\n{table(results)}\n{END}", text))
    print(f"updated the performance table in {README}")


if __name__ == "__main__":
    main()
