"""Runs that log and stop cleanly (issue 16): one log line per epoch and progress lines within it when stdout
is not a terminal (the rich bar writes nothing there), and a run stopped with SIGTERM (a cluster's time limit,
preemption) still leaves `averaged.ckpt`, averaged from the best checkpoints saved before the signal. A real
`train` subprocess on a tiny demo set, its stdout a file, sent a real SIGTERM."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ced_lightning.engines.callbacks import EpochLog, format_epoch_line
from conftest import command, command_env, tiny_student_overrides


def test_epoch_line_format() -> None:
    line = format_epoch_line(2, 40, {"train/loss": 0.12345, "val/mAP": 0.4321}, 1.2e-4, 12.34, step=120)
    assert line == "epoch 2 (3 of 40, step 120): train/loss 0.1235  val/mAP 0.4321  lr 0.00012  12.3 s"
    assert format_epoch_line(0, -1, {}, None, 0.05) == "epoch 0: 0.1 s"
    with pytest.raises(ValueError, match=r"callbacks\.epoch_log\.when must be one of"):
        EpochLog(when="sometimes")


def test_sigterm_mid_training_leaves_averaged_checkpoint_and_epoch_lines(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    """Before: stdout redirected to a file showed no line per epoch, and SIGTERM ended the fit without
    `averaged.ckpt` (AverageBestCheckpoints wrote it in on_fit_end only, which a stopped fit never reaches).
    """
    run_dir = tmp_path / "run"
    args = [
        *tiny_student_overrides(tiny_demo),
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.clip_seconds=1.0",
        "trainer=cpu",
        "trainer.max_epochs=1000",  # runs until the signal
        "logger=csv",
        "callbacks.early_stopping=null",
        "test=false",
        f"hydra.run.dir={run_dir}",
    ]
    # A progress line at every batch (the default is every 30 s).
    env = command_env(WANDB_MODE="offline", CED_ROOT=str(tmp_path), CED_PROGRESS_SECONDS="0")
    checkpoints = run_dir / "checkpoints"
    with open(tmp_path / "stdout.txt", "w") as stdout:  # not a terminal
        process = subprocess.Popen(
            command("train", *args),
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 300
            # Two validated epochs: their checkpoints are the best so far; the third epoch is under way.
            while not (checkpoints / "epoch_001.ckpt").is_file():
                assert process.poll() is None, (tmp_path / "stdout.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no second checkpoint within 300 s"
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    said = (tmp_path / "stdout.txt").read_text()
    assert process.returncode == 128 + signal.SIGTERM, said[-3000:]  # not 0: the job did not finish
    # The demo's student trains beside its label-only row (side_by_side): the signal reached both.
    assert "training student and label-only baseline side by side" in said, said[-3000:]
    assert "label-only baseline | WARNING: stopped by SIGTERM" in said, said[-3000:]
    averaged = checkpoints / "averaged.ckpt"
    assert averaged.is_file(), said[-3000:]
    state = torch.load(averaged, map_location="cpu", weights_only=False)
    sources = [Path(p) for p in state["averaged_from"]]
    assert {checkpoints / "epoch_000.ckpt", checkpoints / "epoch_001.ckpt"} <= set(sources)
    assert all(p.is_file() for p in sources) and "model_spec" in state
    # One line per finished epoch, in the redirected stdout and in the run's log file.
    pattern = (
        r"epoch 1 \(2 of 1000, step \d+\): train/loss \d\.\d{4}  val/d_prime \S+  val/mAP \d\.\d{4}  lr "
    )
    assert re.search(pattern, said), said[-3000:]
    assert re.search(pattern, (run_dir / "train.log").read_text())
    assert re.search(r"epoch 0 \(1 of 1000", said)
    # Within an epoch, its batches: done/total, rate, time left (an epoch of a real student takes minutes).
    assert re.search(
        r"epoch 1 train: 2/\d+ batches \(\d+\.\d%\), \S+ batches/s, \d+ (s|min \d+ s) left", said
    )
    assert re.search(r"epoch 1 validation: 1/\d+ batches", said), said[-3000:]
