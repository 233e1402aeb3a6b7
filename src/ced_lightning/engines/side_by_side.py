"""Independent training runs of one command at the same time, each in a process of its own, on the CPU (a
student and its label-only baseline, `comparison.train_and_compare`): `train_runs`.

Why: one training run on a small CPU leaves a core idle through its serial parts (Python, the autograd
engine, the optimizer's per-tensor loops); two runs at once fill it. On the demo's 2-core machine the
main command's student and label-only row side by side took about 0.8x the time of one after the other
(bench/side_by_side.md). Each run keeps its own thread count (`num_threads`), so its numbers are the ones it
gives alone, bit for bit. Where the runs' threads outnumber the cores, OpenMP's waiting threads sleep
(OMP_WAIT_POLICY=PASSIVE) instead of spinning: spinning threads of one run take the cores the other needs (a
CED-Mini step 4.7 s instead of 1.5). Sleeping threads wake more slowly, which costs runs of many small kernels
(the demo's MobileNet teacher) more than they gain, and a run left alone by the other runs slower: the
demo's two teachers, of unequal length, took longer side by side (443 s against 362), so they do not.

A child is `python -m ced_lightning.engines.side_by_side CONFIG METRICS`: it trains the saved config with
`engines.training.train` and writes its metrics. Its output reaches this process's log line by line, after
the run's name; it ends with its parent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ced_lightning.core.device import on_gpu
from ced_lightning.core.errors import CedError, CheckFailedError
from ced_lightning.engines.launch import launched_externally, requested_processes

log = logging.getLogger(__name__)

_PARENT_ENV = "CED_SIDE_BY_SIDE_PARENT"


@dataclass(frozen=True)
class Run:
    """One training run of a command: `name` heads its lines in the log ("label-only baseline")."""

    name: str
    cfg: DictConfig


def side_by_side(cfg: DictConfig) -> bool:
    """Whether `cfg`'s independent runs train side by side: `side_by_side` on and every run a single CPU
    process (on a GPU, or with DDP, they go one after another)."""
    if not cfg.get("side_by_side"):
        return False
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return not on_gpu(accelerator) and requested_processes(cfg.trainer) == 1 and not launched_externally()


def train_runs(runs: Sequence[Run], together: bool) -> list[dict[str, Any]]:
    """The metrics of `engines.training.train` for each run, in order: one after another in this process,
    or with `together` (`side_by_side`) all at once, each in a child process. A failed child ends this with
    a one-line error naming it once every other run has ended (what they finished is kept). A SIGTERM to
    this process reaches every child, which stops as a run alone does (its checkpoints kept); this then
    raises Lightning's SIGTERMException, as a run alone would (`train` exits with status 143)."""
    from ced_lightning.engines.training import train

    if not together or len(runs) < 2:
        return [train(run.cfg) for run in runs]
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    log.info("training %s side by side, each in a process of its own", " and ".join(r.name for r in runs))
    children: list[_Child] = []
    stopped: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        # A scheduler's SIGTERM stops every run as it stops one run alone: each keeps its checkpoints so far.
        stopped.append(signum)
        for child in children:
            child.send(signum)

    with tempfile.TemporaryDirectory(prefix="ced_side_by_side_") as tmp, _handler(signal.SIGTERM, forward):
        try:
            env = _child_env(runs)
            for i, run in enumerate(runs):
                children.append(_Child(run, Path(tmp) / str(i), env))
            for child in children:
                child.wait()
        except BaseException:
            for child in children:
                child.stop()
            raise
        if stopped:
            raise SIGTERMException
        failed = [child for child in children if child.returncode != 0]
        if failed:
            # A run's own error (a damaged store, a bad value) is the command's, with that run's exit status.
            error = CheckFailedError("; ".join(child.failure() for child in failed))
            error.exit_code = failed[0].error().get("exit_code", 1)
            raise error
        return [child.metrics() for child in children]


@contextlib.contextmanager
def _handler(signum: int, handler: Any) -> Iterator[None]:
    """`handler` for `signum` while the block runs (in the main thread; elsewhere signals are not ours)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _child_env(runs: Sequence[Run]) -> dict[str, str]:
    env = dict(os.environ, **{_PARENT_ENV: str(os.getpid())})
    cores = os.cpu_count() or 1
    threads = sum(int(r.cfg.get("num_threads") or cores) for r in runs)
    if threads > cores:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


class _Child:
    """A run in a child process, its output relayed to this process's log as it comes."""

    def __init__(self, run: Run, stem: Path, env: dict[str, str]) -> None:
        self.run = run
        self.config = stem.with_suffix(".yaml")
        self.metrics_file = stem.with_suffix(".json")
        # Resolved here: the child has no Hydra app (the run folder is this command's `${hydra:...}`); a
        # config composed with Hydra's own node (`compose_config`) leaves that node behind.
        own = OmegaConf.masked_copy(run.cfg, [key for key in run.cfg if key != "hydra"])
        OmegaConf.save(OmegaConf.to_container(own, resolve=True), self.config)
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__, str(self.config), str(self.metrics_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
        self.relay = threading.Thread(target=self._relay, name=f"relay {run.name}", daemon=True)
        self.relay.start()

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                log.info("%s | %s", self.run.name, line.rstrip())

    def wait(self) -> None:
        self.process.wait()
        self.relay.join()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def send(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> None:
        """SIGTERM, as a scheduler stops a run (its checkpoints so far are kept), then SIGKILL after 60 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics_file.read_text())

    def error(self) -> dict[str, Any]:
        """The error the run raised on purpose (message, exit status), {} where it wrote none."""
        path = self.metrics_file.with_suffix(".error.json")
        return json.loads(path.read_text()) if path.is_file() else {}

    def failure(self) -> str:
        message = self.error().get("message")
        if message:
            return f"{self.run.name}: {message}"
        name = self.run.name
        return f"{name} ended with exit status {self.returncode} (its lines above start with '{name} |')"


def _end_with_parent() -> None:
    """Linux: SIGTERM this process when the command that started it dies, even by SIGKILL."""
    parent = os.environ.get(_PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != int(parent):  # it died before the line above
        raise SystemExit(128 + signal.SIGTERM)


class _LevelFormatter(logging.Formatter):
    """A child's log line as the parent relays it: the message, after its level where that is not INFO."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname}: {message}"


def _child_main(config: str, metrics_file: str) -> int:
    """Train the saved config; its metrics to `metrics_file`. The parent adds the time and the run's name
    to each line it prints."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ced_lightning.engines.launch import error_line
    from ced_lightning.engines.trainer import finish_task
    from ced_lightning.engines.training import train

    _end_with_parent()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LevelFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    cfg = OmegaConf.load(config)
    assert isinstance(cfg, DictConfig)
    try:
        with finish_task(cfg):
            metrics = train(cfg)
    except CedError as err:
        line = error_line("train", err)
        print(line, flush=True)
        error = {"message": line.split(": error: ", 1)[-1], "exit_code": err.exit_code}
        Path(metrics_file).with_suffix(".error.json").write_text(json.dumps(error))
        return err.exit_code
    except SIGTERMException:
        log.warning("stopped by SIGTERM; the checkpoints written so far are kept (averaged.ckpt included)")
        return 128 + signal.SIGTERM
    Path(metrics_file).write_text(json.dumps(metrics, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(_child_main(*sys.argv[1:3]))
