"""`python -m bench.readme`: write the performance table of `bench/performance.md` from `bench/results.json`.

The table sits between `<!-- bench:start -->` and `<!-- bench:end -->` in bench/performance.md (the README
links there, beside a few headline lines); only the ratios are shown (absolute figures on a shared machine
are noise), each with the machine and date it came from, followed by the benchmark's goals, each checked
against its measured ratio.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
PAGE = HERE / "performance.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


# (section, ratio key or the start of several, comparison, threshold, the goal in words)
GOALS: list[tuple[str, str, str, float, str]] = [
    (
        "audio_store",
        "training stream 0 workers / original HDF5 reader",
        ">=",
        3.0,
        "one reading process delivers 10 s float32 clips at 3x the original's rate",
    ),
    (
        "inference",
        "ced_tiny fastest path: ",
        "<=",
        1.0,
        "CED-Tiny's fastest path (any runtime, int8 allowed; its demo mAP beside) at or below "
        "MobileNetV3-large in eager float32 on 1 thread (the paper's setting)",
    ),
    ("training", "delivery / step,", ">=", 5.0, "data delivery at least 5x the CED-Mini step rate"),
    (
        "storage",
        "int8 on disk / paper's layout on disk",
        "<=",
        1.0,
        "8-bit logit store no larger on disk than the paper's layout of the same rows",
    ),
]


def goals(results: dict[str, Any]) -> list[str]:
    lines = ["", "| goal | ratio | target | measured | met |", "|---|---|---|---|---|"]
    for section, prefix, comparison, threshold, words in GOALS:
        ratios = results["sections"].get(section, {}).get("ratios", {})
        for key, value in ratios.items():
            if key.startswith(prefix):
                met = value >= threshold if comparison == ">=" else value <= threshold
                verdict = "yes" if met else "**no**"
                lines.append(f"| {words} | {key} | {comparison} {threshold:g} | {value:.3g} | {verdict} |")
    return lines


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
    return "\n".join(lines + goals(results) + inference_table(results))


def inference_table(results: dict[str, Any]) -> list[str]:
    """Every model in every runtime and precision, as time relative to MobileNetV3-large in eager float32
    at the same thread count (`bench.inference`), with the demo CED-Tiny's test mAP in each."""
    section = results["sections"].get("inference", {})
    relative = next((v for k, v in section.items() if k.startswith("time / ")), None)
    if not relative:
        return []
    demo = section.get("int8 cost on the demo test set", {}).get("mAP", {})
    rows: dict[tuple[str, str], dict[str, float]] = {}  # (threads, mode) -> model -> value
    models: list[str] = []
    for key, value in relative.items():
        head, threads = key.rsplit(", ", 1)
        model, mode = head.split(" ", 1)
        rows.setdefault((threads, mode), {})[model] = value
        models += [model] if model not in models else []
    lines = [
        "",
        "Inference, every runtime and precision: time per 10 s clip relative to "
        "MobileNetV3-large in eager float32 at the same thread count (lower is faster); demo mAP: "
        "the demo's 4-block CED-Tiny teacher on the demo test set in that runtime and precision.",
        "",
        "| threads | runtime and precision | " + " | ".join(models) + " | demo mAP |",
        "|---" * (len(models) + 3) + "|",
    ]
    for (threads, mode), values in rows.items():
        cells = [f"{values[m]:.3g}" if m in values else "" for m in models]
        mean_ap = f"{demo[mode]:.4f}" if mode in demo else ""
        lines.append(f"| {threads} | {mode} | " + " | ".join(cells) + f" | {mean_ap} |")
    return lines


def write_table(results: dict[str, Any], page: Path = PAGE) -> None:
    """Replace what stands between the markers of `page` with the table of `results`."""
    text = page.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{page}: add the markers {START} and {END} where the table goes")
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    page.write_text(pattern.sub(lambda _: f"{START}\n{table(results)}\n{END}", text))


def main() -> None:
    write_table(json.loads((HERE / "results.json").read_text()))
    print(f"updated the performance table in {PAGE}")


if __name__ == "__main__":
    main()
