"""`python -m bench.side_by_side [DATA_DIR] [STEPS] [ROUNDS]`: the main command's student and its label-only
baseline trained one after another against side by side (`side_by_side`, `engines.side_by_side`), on a built
demo (`DATA_DIR/demo`: its stores, teachers and logit store, from one run of the main command).

Each is `engines.side_by_side.train_runs` on the two runs of `experiment=ced_mini`, cut to their first
`STEPS` optimizer steps (the baseline's rounded up to whole 12-step epochs): in this process one after
another (as `side_by_side=false` runs them), or in two child processes at once. The rounds alternate the two
ways, so the drift of a virtual machine's speed falls on both alike. Each way must give the same numbers (the
runs' validation and test mAP): the run fails if not.
Prints the wall times and their ratio (side by side / one after another) as a Markdown table.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import open_dict

from bench.common import cpu_name
from ced_lightning import compose_config
from ced_lightning.engines.comparison import label_only_cfg
from ced_lightning.engines.side_by_side import Run, train_runs

WAYS = {"one after another": False, "side by side": True}


def runs(data_dir: str, out: Path, steps: int) -> list[Run]:
    """The main command's student and label-only baseline, each cut to `steps` optimizer steps."""
    overrides = [
        "experiment=ced_mini",
        f"paths.data_dir={data_dir}",
        "data.build_missing=false",
        "logger=csv",
        "data.schedule.max_epochs=1",
        f"trainer.limit_train_batches={steps}",
    ]
    student = compose_config(overrides, out / "student")
    baseline = label_only_cfg(student)
    with open_dict(baseline):  # its epochs are 12 steps over the 400 labeled clips
        epochs = -(-steps // 12)
        baseline.data.schedule.max_epochs = baseline.data.schedule.val_every = epochs
        baseline.trainer.limit_train_batches = 1.0
    return [Run("student", student), Run("label-only baseline", baseline)]


def main(data_dir: str = "data", steps: int = 60, rounds: int = 2) -> dict[str, Any]:
    walls: dict[str, list[float]] = {way: [] for way in WAYS}
    results: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for way, together in WAYS.items():
                out = Path(tmp) / f"{round_}_{'together' if together else 'apart'}"
                pair = runs(data_dir, out, steps)
                start = time.perf_counter()
                metrics = train_runs(pair, together=together)
                walls[way].append(time.perf_counter() - start)
                for run, m in zip(pair, metrics, strict=True):
                    results.setdefault(run.name, []).append((m["val/mAP"], m["test/mAP"]))
    for name, values in results.items():
        if len(set(values)) != 1:
            raise SystemExit(f"{name}: the ways gave different numbers: {values}")
    ratio = sum(walls["side by side"]) / sum(walls["one after another"])
    print(f"CPU: {cpu_name()}; student and label-only baseline of experiment=ced_mini, {steps} steps each")
    print("| way | wall s (each round) | side by side / one after another |")
    print("| --- | --- | --- |")
    for way, times in walls.items():
        print(f"| {way} | {' / '.join(f'{t:.1f}' for t in times)} | {ratio:.2f} |")
    print(
        "val/test mAP, the same both ways: "
        + "; ".join(f"{k} {v[0][0]:.4f}/{v[0][1]:.4f}" for k, v in results.items())
    )
    return {"walls": walls, "ratio": ratio, "results": results}


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*args[:1], *(int(a) for a in args[1:3]))
