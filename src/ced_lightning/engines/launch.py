"""How this process was launched and where it stands among the ranks: its rank (torchrun, SLURM's srun,
Lightning's DDP launcher), the re-execution of ranks > 0 under Hydra, how many processes a trainer config
asks for, the guard against a multirun whose jobs would each start DDP processes, the process's CPU
threads (`set_cpu_threads`), and how a command ends on an error raised on purpose (`command_errors`: one
line, no traceback). Builds no Trainer."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from ced_lightning.core.device import on_gpu
from ced_lightning.core.errors import CedError, ConfigError
from ced_lightning.engines.config_checks import RULES, check_config
from ced_lightning.store.remote import redact_text

T = TypeVar("T")


def global_rank() -> int:
    """This process's rank as the launchers set it (0 before any launch); only `== 0` is relied upon.

    torchrun sets RANK, SLURM's srun SLURM_PROCID (Lightning sets RANK only later, in `trainer.fit`), and
    Lightning's own launcher LOCAL_RANK and NODE_RANK.
    """
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if _slurm_tasks(os.environ) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0))


def _slurm_tasks(env: Mapping[str, str]) -> int:
    """Tasks of the SLURM job step (`srun -n`); 1 outside SLURM."""
    return int(env.get("SLURM_NTASKS", "1") or 1)


def quiet_non_zero_ranks() -> None:
    """Processes of rank > 0 (re-executed by Lightning's DDP launcher) log warnings only and write no log
    file of their own, so a run's folder holds one log, not one per rank."""
    if global_rank() == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def prepare_ddp_relaunch() -> None:
    """Lightning's DDP launcher re-executes `sys.argv` for ranks > 0 with `hydra.run.dir` set to the run
    folder template. Point that at this job's folder, and in a multirun replay only this job's overrides:
    the sweep's own argv would start the whole sweep again on every rank. (That makes the first job of a
    multirun work; `train` refuses multirun DDP anyway, see `check_multirun_ddp`.)

    Runs in every launching process: on a multi-node job, node k's (global rank k x devices) as well.
    """
    if not HydraConfig.initialized() or "LOCAL_RANK" in os.environ:  # a process a launcher started
        return
    hydra_cfg = HydraConfig.instance().cfg
    output_dir = hydra_cfg.hydra.runtime.output_dir
    with read_write(hydra_cfg.hydra.run):
        hydra_cfg.hydra.run.dir = output_dir
    if hydra_cfg.hydra.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.hydra.overrides.task, "hydra.mode=RUN"]


# The environment as this process started. Lightning's DDP launcher leaves LOCAL_RANK/WORLD_SIZE set after a
# fit, so later in the same process they no longer say whether a cluster launcher started us.
_STARTUP_ENV = dict(os.environ)


def launched_externally(environ: dict[str, str] | None = None) -> bool:
    """Whether torchrun, SLURM's srun or a hand launch started this process as one of several ranks (in
    which case Lightning starts no processes of its own). `environ`: the startup environment by default."""
    env = _STARTUP_ENV if environ is None else environ
    return "LOCAL_RANK" in env or "TORCHELASTIC_RUN_ID" in env or _slurm_tasks(env) > 1


def requested_processes(trainer_cfg: DictConfig) -> int:
    """How many processes `trainer.devices` x `trainer.num_nodes` asks for (`auto`/-1: every visible GPU
    on a GPU accelerator, one process on the CPU, as Lightning decides)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and "," in devices:  # "0,1": GPU ids
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, str | int) and str(devices).strip() in {"auto", "-1"}:
        count = torch.cuda.device_count() if on_gpu(str(trainer_cfg.get("accelerator", "auto"))) else 1
    elif isinstance(devices, str | int):
        count = int(devices)
    else:  # a list of GPU ids
        count = len(devices)
    return max(count, 1) * int(trainer_cfg.get("num_nodes", 1) or 1)


def check_multirun_ddp(cfg: DictConfig) -> None:
    """Refuse a Hydra multirun whose jobs would each start DDP processes through Lightning's launcher: the
    launcher leaves LOCAL_RANK/WORLD_SIZE in the environment after the first job, so the second job takes
    itself for an externally launched rank, starts no processes and waits for them forever."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    processes = requested_processes(cfg.trainer)
    if processes > 1 and not launched_externally():
        raise ConfigError(
            f"a multirun (-m, hydra.mode=MULTIRUN, hparams_search) cannot train with trainer.devices="
            f"{cfg.trainer.get('devices')} x trainer.num_nodes={cfg.trainer.get('num_nodes', 1)} "
            f"({processes} processes): Lightning starts the DDP processes of the first job only, and the "
            "second job would wait for them forever. Run one job per launch (one command per setting, "
            "without -m), or a Hydra launcher plugin that starts every job in a fresh process "
            "(e.g. hydra/launcher=submitit_slurm), or train each job on one device (trainer.devices=1)."
        )


def full_errors_wanted() -> bool:
    """HYDRA_FULL_ERROR=1: errors raised on purpose show their traceback too (Hydra's own switch, honoured
    by every command, ced-predict included)."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def error_line(command: str, err: CedError) -> str:
    """`<command>: error: <message>` in one line (a message's further lines joined with "; "), with URL
    credentials redacted; on ranks > 0 of a DDP job the rank is named."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    message = lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")
    message = message.removeprefix(f"{command}: ")  # messages that name their command (store locks)
    rank = global_rank()
    where = f"{command} (rank {rank})" if rank else command
    return redact_text(f"{where}: error: {message}")


def _log_to_files(line: str) -> None:
    """The error line in the run's log file too (the console gets it once, on stderr)."""
    record = logging.LogRecord("ced_lightning", logging.ERROR, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _command_name(task: Callable) -> str:
    """`train` for ced_lightning.train's task, also where it runs as `python -m` (module `__main__`)."""
    module = task.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return module.rsplit(".", 1)[-1]


class MultirunJobFailed(CompactHydraException):
    """What a failed job of a multirun leaves Hydra to report after the sweep: one line, no traceback."""


def command_errors(task: Callable[[DictConfig], T]) -> Callable[[DictConfig], T]:
    """Put between `@hydra.main` and a command's task function. The config's values are checked first
    (`config_checks.RULES` of the command named by the task's module). A `CedError` ends the command with its
    message in one line on stderr and the error's exit status (2: a config value, 1: anything else), not with
    Hydra's traceback. Other exceptions are bugs and keep their traceback; HYDRA_FULL_ERROR=1 shows it for
    every error. In a multirun each failed job prints its line as it fails, the other jobs still run, and
    Hydra ends the sweep with exit status 1 naming the first failed job."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> T:
        command = _command_name(task)
        try:
            check_config(cfg, RULES.get(command, {}))
            return task(cfg)
        except CedError as err:
            if full_errors_wanted():
                raise
            line = error_line(command, err)
            _log_to_files(line)
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                hydra_cfg = HydraConfig.get()
                overrides = redact_text(" ".join(hydra_cfg.overrides.task))
                print(f"{line} [job {hydra_cfg.job.num}: {overrides}]", file=sys.stderr, flush=True)
                # Hydra prints this after the sweep, below the first failed job's overrides.
                raise MultirunJobFailed(
                    f"{command}: error: job {hydra_cfg.job.num} of the multirun failed (above)"
                ) from None
            print(line, file=sys.stderr, flush=True)
            raise SystemExit(err.exit_code) from None

    return run


def set_cpu_threads(num_threads: int | None) -> int:
    """Pin torch's intra-op CPU threads to `num_threads` (None: leave torch's default, which follows
    OMP_NUM_THREADS and the cores this process may use); returns the count in use.

    On the CPU the count is part of the numbers: convolutions and reductions split their sums over the
    threads, so a MobileNet or CED trained with 1 thread and with 2 differ in every weight, and a MobileNet's
    outputs in their last bits (docs/reliability.md). A config that names it gives the same numbers whatever
    the environment says."""
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ConfigError(f"num_threads={num_threads}: give a thread count of at least 1, or null")
        if torch.get_num_threads() != int(num_threads):
            torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()
