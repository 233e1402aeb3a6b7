"""`side_by_side`: a command's independent training runs at the same time, each in a child process. That
their numbers are those of the runs one after another is `test_repeatable.py`'s (the demo built both ways);
here: when runs go side by side, how their children are set up, a failed run, and children that end with the
command that started them (the metrics they return make the demo's table in `test_demo.py`'s end-to-end
run)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ced_lightning import compose_config
from ced_lightning.core.errors import CheckFailedError
from ced_lightning.engines.side_by_side import Run, _child_env, side_by_side, train_runs
from conftest import tiny_student_overrides


def test_side_by_side_where_every_run_is_one_cpu_process() -> None:
    assert side_by_side(compose_config(["experiment=ced_mini"])) is (not torch.cuda.is_available())
    assert side_by_side(compose_config(["experiment=ced_mini", "trainer.accelerator=cpu"]))
    assert not side_by_side(
        compose_config(["experiment=ced_mini", "trainer.accelerator=cpu", "side_by_side=false"])
    )
    assert not side_by_side(compose_config(["experiment=ced_mini", "trainer.accelerator=gpu"]))
    assert not side_by_side(compose_config(["experiment=ced_mini", "trainer=ddp", "trainer.accelerator=cpu"]))
    # Other data groups leave it off; the command line turns it on.
    assert not side_by_side(compose_config(["experiment=ced_mini", "data=custom", "trainer.accelerator=cpu"]))
    assert side_by_side(compose_config(["data=custom", "side_by_side=true", "trainer.accelerator=cpu"]))


def test_children_whose_threads_outnumber_the_cores_sleep_while_they_wait(monkeypatch) -> None:
    cores = os.cpu_count() or 1
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)

    def env(*threads: int | None) -> dict[str, str]:
        cfgs = [compose_config(["data=custom", f"num_threads={'null' if t is None else t}"]) for t in threads]
        return _child_env([Run(str(i), cfg) for i, cfg in enumerate(cfgs)])

    assert env(cores, cores)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert env(None, 1)["OMP_WAIT_POLICY"] == "PASSIVE"  # null: torch's default, every core
    if cores >= 2:
        assert "OMP_WAIT_POLICY" not in env(1, 1)
    assert env(1, 1)["CED_SIDE_BY_SIDE_PARENT"] == str(os.getpid())
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own choice stands
    assert env(cores, cores)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_failed_run_is_named_once_the_other_has_finished(
    tiny_demo: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    common = [
        *tiny_student_overrides(tiny_demo),
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.clip_seconds=1.0",
        "trainer=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
        "data.schedule.max_epochs=1",
        "num_threads=1",
    ]
    good = compose_config(common, output_dir=tmp_path / "good")
    bad = compose_config([*common, f"data.logits={tmp_path / 'nowhere.zarr'}"], output_dir=tmp_path / "bad")
    caplog.set_level(logging.INFO, logger="ced_lightning.engines.side_by_side")
    # The failed run's own error, in one line, is the pair's; the good run finishes first.
    with pytest.raises(CheckFailedError, match=r"^broken run: .*no store at .*nowhere\.zarr") as err:
        train_runs([Run("good run", good), Run("broken run", bad)], together=True)
    assert err.value.exit_code == 1
    assert (tmp_path / "good" / "checkpoints" / "averaged.ckpt").is_file()
    relayed = [r.getMessage() for r in caplog.records]
    # The child's own one-line error, relayed under its name; the good run's epoch line under its own.
    assert any(m.startswith("broken run | train: error: ") and "nowhere.zarr" in m for m in relayed), relayed
    assert any(m.startswith("good run | epoch 0 (1 of 1") for m in relayed), relayed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_ends_with_the_command_that_started_it(tmp_path: Path) -> None:
    """A command killed with SIGKILL (no chance to stop its runs) takes its side-by-side children with it."""
    pid_file = tmp_path / "child.pid"
    child = (
        "from ced_lightning.engines.side_by_side import _end_with_parent; import os, time; "
        f"_end_with_parent(); open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    parent = (
        "import os, subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], env={{**os.environ, 'CED_SIDE_BY_SIDE_PARENT': "
        "str(os.getpid())}); time.sleep(120)"
    )
    command = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child_pid = int(pid_file.read_text())
        os.kill(command.pid, signal.SIGKILL)
        command.wait()
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child_pid), "the child outlived the command that started it"
    finally:
        command.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child reparented to an init that does not reap it lingers as a zombie: dead all the same.
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split(")")[-1].split()[0] == "Z")
