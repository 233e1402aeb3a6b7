"""How this process was launched and where it stands among the ranks: its rank (torchrun, SLURM's srun,
Lightning's DDP launcher), the re-execution of ranks > 0 under Hydra, how many processes a trainer config
asks for, the guard against a multirun whose jobs would each start DDP processes, and the process's CPU
threads (`set_cpu_threads`). Builds no Trainer."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write


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


def on_gpu(accelerator: str) -> bool:
    """Whether `trainer.accelerator` will run on a CUDA device (`auto`: where one is visible)."""
    return accelerator in {"gpu", "cuda"} or (accelerator == "auto" and torch.cuda.is_available())


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
        raise ValueError(
            f"a multirun (-m, hydra.mode=MULTIRUN, hparams_search) cannot train with trainer.devices="
            f"{cfg.trainer.get('devices')} x trainer.num_nodes={cfg.trainer.get('num_nodes', 1)} "
            f"({processes} processes): Lightning starts the DDP processes of the first job only, and the "
            "second job would wait for them forever. Run one job per launch (one command per setting, "
            "without -m), or a Hydra launcher plugin that starts every job in a fresh process "
            "(e.g. hydra/launcher=submitit_slurm), or train each job on one device (trainer.devices=1)."
        )


def set_cpu_threads(num_threads: int | None) -> int:
    """Pin torch's intra-op CPU threads to `num_threads` (None: leave torch's default, which follows
    OMP_NUM_THREADS and the cores this process may use); returns the count in use.

    On the CPU the count is part of the numbers: convolutions and reductions split their sums over the
    threads, so a MobileNet or CED trained with 1 thread and with 2 differ in every weight, and a MobileNet's
    outputs in their last bits (docs/reliability.md). A config that names it gives the same numbers whatever
    the environment says."""
    if num_threads is not None:
        if int(num_threads) < 1:
            raise ValueError(f"num_threads={num_threads}: give a thread count of at least 1, or null")
        if torch.get_num_threads() != int(num_threads):
            torch.set_num_threads(int(num_threads))
    return torch.get_num_threads()
