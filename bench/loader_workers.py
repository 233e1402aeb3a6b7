"""DataLoader worker processes against reading in the training process, on a small CPU: the demo's label-only
row (CED-Mini trained with labels on its 400 clips: epochs of 12 steps, so a new loader every 12 steps) and
its student (distilled over 4,800 clips, epochs of 150 steps), timed with `data.num_workers=2` and with
`data.num_workers=0 data.order_workers=2` (the demo's setting: the same batches), in alternating rounds.

    python -m bench.loader_workers [DATA_DIR]   # DATA_DIR: a folder holding the demo (default: data)
    python -m bench.loader_workers --step       # the machine's speed now: one CED-Mini training step

It needs the demo's stores, its CED-Mini teacher and logit store (`python -m ced_lightning.train
experiment=ced_mini` builds them). Each run trains from the teacher's weights in a fresh process, so no run
inherits another's memory; wall time, and the CPU time of the process and its workers. Results and their
machine go to bench/main_command.md.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

from bench.common import CLASSES, cpu_name, distill_batch, distill_step, measure
from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.models import create_ced

READERS = {"2 worker processes": ["data.num_workers=2"], "main process": ["data.num_workers=0"]}
RUNS = {
    # 5 epochs of 12 steps: the label-only row's shape (and its teachers').
    "label-only row, 60 steps": [
        "experiment=teacher_demo_ced_mini",
        "model.depth=12",
        "data.schedule.max_epochs=5",
    ],
    # 2 epochs cut to 50 steps each: the student's.
    "student, 100 steps": [
        "experiment=ced_mini",
        "trainer.limit_train_batches=50",
        "data.schedule.max_epochs=2",
        "data.label_only_baseline=false",
    ],
}


def timed_run(data_dir: str, out: str, overrides: list[str]) -> dict[str, float]:
    """One training run in a fresh process: its wall seconds and the CPU seconds of it and its workers."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    args = [
        *overrides,
        f"paths.data_dir={data_dir}",
        f"paths.log_dir={out}",
        f"++paths.output_dir={out}/run",
        f"model.init_from={data_dir}/demo/teachers/ced_mini_4block.ckpt",
        "data.order_workers=2",
        "data.schedule.val_every=100",
        "data.build_missing=false",
        "test=false",
        "logger=csv",
        "+summary=false",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "ced_lightning.train", *args], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall s": time.perf_counter() - start,
        "user s": after.ru_utime - before.ru_utime,
        "system s": after.ru_stime - before.ru_stime,
    }


def reference_step(repeats: int = 5) -> float:
    """Seconds of one CED-Mini distillation step (`bench.common.distill_step`: batch 32 of 2 s clips, float32,
    2 threads, Adam), the median of `repeats`: a virtual machine's speed drifts, so long measurements are
    bracketed by this one."""
    torch.set_num_threads(2)
    model = create_ced("ced_mini", num_classes=CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    recipe = AugmentRecipe()
    batch = distill_batch(32, 2 * SAMPLE_RATE, recipe)
    return measure(partial(distill_step, model, optimizer, batch, recipe), repeats=repeats, warmup=2)[
        "median"
    ]


def main(data_dir: str = "data", rounds: int = 2) -> dict[str, dict[str, list[dict[str, float]]]]:
    results: dict[str, dict[str, list[dict[str, float]]]] = {r: {k: [] for k in READERS} for r in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for run, overrides in RUNS.items():
                for reader, setting in READERS.items():
                    out = f"{tmp}/{round_}_{len(results[run][reader])}_{reader.replace(' ', '_')}_{run[:5]}"
                    results[run][reader].append(timed_run(data_dir, out, [*overrides, *setting]))
    print(f"CPU: {cpu_name()}")
    print("| run | reading | wall s (each round) | user s | system s | wall, main process / workers |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run, by_reader in results.items():
        walls = {reader: [t["wall s"] for t in times] for reader, times in by_reader.items()}
        ratio = sum(walls["main process"]) / sum(walls["2 worker processes"])
        for reader, times in by_reader.items():
            print(
                f"| {run} | {reader} | {' / '.join(f'{t:.1f}' for t in walls[reader])} | "
                f"{sum(t['user s'] for t in times) / len(times):.1f} | "
                f"{sum(t['system s'] for t in times) / len(times):.1f} | "
                f"{ratio:.2f} |"
            )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--step"]:
        print(f"one CED-Mini training step: {reference_step():.3f} s")
    else:
        main(*sys.argv[1:2])
