"""`python -m bench.side_by_side [DATA_DIR] [STEPS] [ROUNDS]`: the main command's student and its label-only
baseline trained one after another against side by side (`side_by_side`, `engines.side_by_side`), on a built
demo (`DATA_DIR/demo`: its stores, teachers and logit store, from one run of the main command).

Each is `engines.side_by_side.train_runs` on the two runs of `experiment=ced_mini`, cut to their first
`STEPS` optimizer steps (the baseline's rounded up to whole 12-step epochs): in this process one after
another (as `side_by_side=false` runs them), or in two child processes at once. The rounds alternate the two
ways, so the drift of a virtual machine's speed falls on both alike. Each way must give the same numbers (the
runs' validation and test mAP): the run fails if not.
Prints the wall times and their ratio (side by side / one after another) as a Markdown table.

`python -m bench.side_by_side --teachers [DATA_DIR] [EPOCHS] [ROUNDS]`: the same for the demo's two teachers
(`teacher=demo_mini`), each cut to its first `EPOCHS` epochs of 12 steps.

`python -m bench.side_by_side --policy`: why the children's threads sleep while they wait, one CED-Mini step
alone and in two processes at once, with OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE.
"""

from __future__ import annotations

import os
import subprocess
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


def teacher_runs(data_dir: str, out: Path, epochs: int) -> list[Run]:
    """The main command's two demo teachers (`teacher=demo_mini`), each cut to `epochs` epochs of 12 steps,
    composed as the demo composes them (its augmentation and threads)."""
    from ced_lightning.demo import augment_overrides, thread_overrides

    student = compose_config(["experiment=ced_mini", f"paths.data_dir={data_dir}"])
    pair = []
    for member in student.teacher.members:
        overrides = [
            f"experiment={member.experiment}",
            f"paths.data_dir={data_dir}",
            "data=demo",
            "logger=csv",
            f"data.schedule.max_epochs={epochs}",
            *thread_overrides(student),
            *augment_overrides(student),
        ]
        pair.append(Run(f"teacher {member.name}", compose_config(overrides, out / member.name)))
    return pair


def main(data_dir: str = "data", steps: int = 60, rounds: int = 2, which: str = "student") -> dict[str, Any]:
    walls: dict[str, list[float]] = {way: [] for way in WAYS}
    results: dict[str, list[tuple[float, float]]] = {}
    make_runs = teacher_runs if which == "teachers" else runs
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for way, together in WAYS.items():
                out = Path(tmp) / f"{round_}_{'together' if together else 'apart'}"
                pair = make_runs(data_dir, out, steps)
                start = time.perf_counter()
                metrics = train_runs(pair, together=together)
                walls[way].append(time.perf_counter() - start)
                for run, m in zip(pair, metrics, strict=True):
                    results.setdefault(run.name, []).append((m["val/mAP"], m["test/mAP"]))
    for name, values in results.items():
        if len(set(values)) != 1:
            raise SystemExit(f"{name}: the ways gave different numbers: {values}")
    ratio = sum(walls["side by side"]) / sum(walls["one after another"])
    what = (
        f"the two teachers of experiment=ced_mini, {steps} epochs each"
        if which == "teachers"
        else f"student and label-only baseline of experiment=ced_mini, {steps} steps each"
    )
    print(f"CPU: {cpu_name()}; {what}")
    print("| way | wall s (each round) | side by side / one after another |")
    print("| --- | --- | --- |")
    for way, times in walls.items():
        print(f"| {way} | {' / '.join(f'{t:.1f}' for t in times)} | {ratio:.2f} |")
    print(
        "val/test mAP, the same both ways: "
        + "; ".join(f"{k} {v[0][0]:.4f}/{v[0][1]:.4f}" for k, v in results.items())
    )
    return {"walls": walls, "ratio": ratio, "results": results}


def wait_policies(repeats: int = 8) -> dict[str, list[float]]:
    """Seconds of one CED-Mini step (`bench.loader_workers.reference_step`, 2 threads) alone and in two
    processes at once, with OpenMP's default wait policy (spinning) and with OMP_WAIT_POLICY=PASSIVE."""
    step = f"from bench.loader_workers import reference_step; print(reference_step({repeats}))"
    results: dict[str, list[float]] = {}
    for policy in ("default", "PASSIVE"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        for count in (1, 2):
            processes = [
                subprocess.Popen([sys.executable, "-c", step], env=env, stdout=subprocess.PIPE, text=True)
                for _ in range(count)
            ]
            seconds = [float(p.communicate()[0].split()[-1]) for p in processes]
            results[f"{policy}, {'alone' if count == 1 else 'two at once'}"] = seconds
    print(f"CPU: {cpu_name()}; one CED-Mini step (2 threads), seconds per process")
    print("| OpenMP wait policy, processes | s per step | steps per s, all processes |")
    print("| --- | --- | --- |")
    for name, seconds in results.items():
        print(f"| {name} | {' / '.join(f'{s:.3f}' for s in seconds)} | {sum(1 / s for s in seconds):.2f} |")
    return results


if __name__ == "__main__":
    args = sys.argv[1:]
    if args == ["--policy"]:
        wait_policies()
    elif args[:1] == ["--teachers"]:
        main(*args[1:2], *(int(a) for a in args[2:4]), which="teachers")
    else:
        main(*args[:1], *(int(a) for a in args[1:3]))
