"""Runs that repeat: the demo built twice by the same command, in separate processes and folders, gives the
same teachers (a timm MobileNet and a CED), the same logit store, the same student and the same label-only
baseline, bit for bit, also when the environment asks for another CPU thread count (the demo pins its own:
`data.num_threads`), when the runs read their stores in worker processes, and whether the independent runs
train side by side or one after another (`side_by_side`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import run_command

SMALL = [
    "data.clip_seconds=1.0",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "data.schedule.max_epochs=1",
    "data.schedule.warmup_steps=1",
    "callbacks.progress_bar=null",
]


def build_demo(root: Path, omp_threads: str, *overrides: str) -> Path:
    """The demo's stores, both teachers (2 batches each), their logit store, a student (one epoch over 24
    clips) and its label-only baseline from one `python -m ced_lightning.train` run in `root`, with
    OMP_NUM_THREADS=`omp_threads` and `overrides` for every training run of it (teachers and student)."""
    root.mkdir()
    small = [*SMALL, *overrides]
    args = [
        "experiment=student_demo",
        f"paths.root_dir={root}",
        f"hydra.run.dir={root}/run",
        "data.demo.clips={train: 16, unlabeled: 8, val: 8, test: 8}",
        "data.extract.epochs=1",
        "data.extract.topk=4",
        "data.extract.allow_weak_teachers=true",  # teachers of 2 steps are near chance
        "+summary=false",
        *small,
        "data.teacher_overrides=[" + ",".join(f"'{o}'" for o in small) + "]",
        "logger=csv",
    ]
    # The relative default paths (paths.root_dir=.) would also do; the folder differs between the builds.
    run = run_command("train", *args, cwd=root, timeout=300, OMP_NUM_THREADS=omp_threads)
    assert run.returncode == 0, run.stderr[-4000:]
    return root


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    differing = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} of {len(a)} tensors differ, e.g. {differing[:3]}"


def logit_arrays(url: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(url), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()}


@pytest.mark.slow
def test_the_demo_built_twice_gives_the_same_teachers_logits_and_student_bit_for_bit(tmp_path: Path) -> None:
    # One run after another, reading in 2 worker processes, against the demo's own way: its runs side by
    # side, each reading in its main process (data.num_workers=0).
    first = build_demo(tmp_path / "first", "1", "data.num_workers=2", "side_by_side=false")
    second = build_demo(tmp_path / "second", "2")
    assert "side by side" not in (first / "run" / "train.log").read_text()
    assert (
        "training student and label-only baseline side by side" in (second / "run" / "train.log").read_text()
    )
    teachers = [Path("data/demo/teachers") / f"{name}.ckpt" for name in ("ced_tiny", "mobilenet")]
    for teacher in teachers:
        assert_same_tensors(weights(first / teacher), weights(second / teacher), str(teacher))
    logits = Path("data/demo/logits_demo.zarr")
    a, b = logit_arrays(first / logits), logit_arrays(second / logits)
    assert a.keys() == b.keys() and "topk_values" in a
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{logits}/{name}"
    for run in (Path("run/checkpoints"), Path("run/label_only/checkpoints")):
        checkpoints = sorted(p.name for p in (first / run).glob("*.ckpt"))
        assert "averaged.ckpt" in checkpoints
        assert checkpoints == sorted(p.name for p in (second / run).glob("*.ckpt"))
        for name in checkpoints:
            assert_same_tensors(weights(first / run / name), weights(second / run / name), f"{run}/{name}")
