"""The plumbing of Hydra entry points that run a Trainer: loggers (W&B that never hangs), callbacks,
precision, DDP under Hydra, and the task wrapper. Nothing here knows about audio."""

from __future__ import annotations

import contextlib
import logging
import netrc
import os
import socket
import sys
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ced_lightning.callbacks import AverageBestCheckpoints

log = logging.getLogger(__name__)


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


def _slurm_tasks(env: Mapping[str, str]) -> int:
    """Tasks of the SLURM job step (`srun -n`); 1 outside SLURM."""
    return int(env.get("SLURM_NTASKS", "1") or 1)


def requested_processes(trainer_cfg: DictConfig) -> int:
    """How many processes `trainer.devices` x `trainer.num_nodes` asks for (`auto`/-1: every visible GPU
    on a GPU accelerator, one process on the CPU, as Lightning decides)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str) and "," in devices:  # "0,1": GPU ids
        count = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, str | int) and str(devices).strip() in {"auto", "-1"}:
        count = torch.cuda.device_count() if _on_gpu(str(trainer_cfg.get("accelerator", "auto"))) else 1
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


# Values of `test_ckpt`: which checkpoint of the fit `trainer.test` evaluates (see `test_checkpoint`).
TEST_CHECKPOINTS = ("best", "last", "averaged")
# `ckpt_path` values that Lightning resolves itself rather than reading a file.
_LIGHTNING_CKPT_NAMES = {"best", "last", "hpc"}


def check_run_options(cfg: DictConfig) -> None:
    """The train config's own switches, checked before anything long starts (a typo found after a fit of
    hours loses the test of it)."""
    if cfg.test_ckpt not in TEST_CHECKPOINTS:
        raise ValueError(f"test_ckpt must be one of {', '.join(TEST_CHECKPOINTS)}, not {cfg.test_ckpt!r}")
    ckpt_path = cfg.get("ckpt_path")
    if cfg.test and not cfg.train and not ckpt_path:
        raise ValueError(
            "train=false test=true tests the weights of ckpt_path, but ckpt_path is null (that would test "
            "untrained weights): set ckpt_path=<run>/checkpoints/averaged.ckpt (or a best/last checkpoint)"
        )
    if _local_checkpoint_file(ckpt_path) and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    check_multirun_ddp(cfg)


@contextlib.contextmanager
def finish_task(cfg: DictConfig) -> Iterator[None]:
    """Always close the W&B run, also when the job fails, so that the next job of a multirun starts clean."""
    try:
        yield
    except Exception:
        log.exception("task failed; its output folder: %s", cfg.paths.get("output_dir", "?"))
        raise
    finally:
        if "wandb" in sys.modules:
            import wandb

            if wandb.run is not None:
                wandb.finish()


def wandb_offline_reason(timeout: float = 3.0) -> str | None:
    """Why W&B must log offline here (None: online works). Never prompts and never waits long.

    Credentials are looked up where wandb keeps them (WANDB_API_KEY, the netrc file) without calling
    `wandb.login`: with no key that call leaves wandb in a state where even an offline `wandb.init` asks for
    one (wandb 0.31). `WANDB_MODE=online` skips the checks.
    """
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in {"offline", "dryrun", "disabled"}:
        return f"WANDB_MODE={mode}"
    if mode == "online":
        return None
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not _wandb_api_key_present(host):
        return "not logged in (wandb login)"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return f"{host} is unreachable"
    return None


def _wandb_api_key_present(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC") or str(Path.home() / (".netrc" if os.name != "nt" else "_netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def build_loggers(cfg: DictConfig) -> list[Logger]:
    loggers: list[Logger] = []
    for name, logger_cfg in (cfg.get("logger") or {}).items():
        if not isinstance(logger_cfg, DictConfig) or "_target_" not in logger_cfg:
            continue
        if "Wandb" in logger_cfg._target_:
            logger_cfg = _wandb_settings(cfg, logger_cfg)
        loggers.append(instantiate(logger_cfg))
        log.debug("logger %s: %s", name, logger_cfg._target_)
    return loggers


def _wandb_settings(cfg: DictConfig, logger_cfg: DictConfig) -> DictConfig:
    logger_cfg = logger_cfg.copy()
    Path(logger_cfg.save_dir).mkdir(parents=True, exist_ok=True)
    with open_dict(logger_cfg):
        if not logger_cfg.get("offline"):
            reason = wandb_offline_reason()
            if reason:
                logger_cfg.offline = True
                if global_rank() == 0:
                    log.info(
                        "W&B: logging offline (%s); sync later with `wandb sync %s`",
                        reason,
                        logger_cfg.save_dir,
                    )
        if logger_cfg.get("group") is None and HydraConfig.initialized():
            hydra_cfg = HydraConfig.get()
            if hydra_cfg.mode == RunMode.MULTIRUN:
                logger_cfg.group = Path(hydra_cfg.sweep.dir).name  # one W&B group per sweep
    return logger_cfg


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    callbacks = []
    for callback_cfg in (cfg.get("callbacks") or {}).values():
        if isinstance(callback_cfg, DictConfig) and "_target_" in callback_cfg:
            callbacks.append(instantiate(callback_cfg))
    return callbacks


def _on_gpu(accelerator: str) -> bool:
    return accelerator in {"gpu", "cuda"} or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """`auto`: bf16-mixed where a CUDA device will be used, full 32-bit on the CPU."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if _on_gpu(accelerator) and torch.cuda.is_bf16_supported() else "32-true"


# Warnings users can do nothing about, repeated every epoch: our streams give every worker its own windows,
# so their length is exact; Lightning 2.6 calls a pytree API that torch 2.11 deprecated; extraction's
# predict_step writes its blocks and returns None on purpose.
_NOT_ACTIONABLE = (
    r"Your `IterableDataset` has `__len__` defined",
    r"`isinstance\(treespec, LeafSpec\)`",
    r"predict returned None if it was on purpose",
)


class _NoAdvertisements(logging.Filter):
    """Drops Lightning 2.6's "💡 Tip: ... try installing litlogger" line, printed by every Trainer."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> pl.Trainer:
    for message in _NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=message)
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_NoAdvertisements())
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        trainer_cfg.precision = resolve_precision(
            trainer_cfg.get("precision", "auto"), trainer_cfg.accelerator
        )
        if trainer_cfg.get("sync_batchnorm") and not _on_gpu(trainer_cfg.accelerator):
            trainer_cfg.sync_batchnorm = False  # torch's SyncBatchNorm runs on GPUs only (DDP on CPU: gloo)
        trainer_cfg.check_val_every_n_epoch = validation_interval(
            trainer_cfg.get("check_val_every_n_epoch"), trainer_cfg.get("max_epochs")
        )
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)


def validation_interval(val_every: int | None, max_epochs: int | None) -> int | None:
    """Epochs between validations, at most the run's epochs: a run shorter than its recipe's interval (a
    quick look at a teacher validated every 3rd epoch, for 1 epoch) still validates, so it has a best and an
    averaged checkpoint."""
    if val_every is None or max_epochs is None or int(max_epochs) < 1:
        return val_every
    return max(1, min(int(val_every), int(max_epochs)))


def _local_checkpoint_file(ckpt_path: str | None) -> bool:
    """Whether `ckpt_path` names a local file (not Lightning's "best"/"last"/"hpc", nor an fsspec URL)."""
    return bool(ckpt_path) and str(ckpt_path) not in _LIGHTNING_CKPT_NAMES and "://" not in str(ckpt_path)


def continue_in_checkpoint_folder(callbacks: list[Callback], ckpt_path: str | None) -> None:
    """Resuming from `ckpt_path`: checkpoint into its folder, not the new run's. Lightning restores a
    ModelCheckpoint's best-k bookkeeping (`best_k_models`, `best_model_score`) only into the same `dirpath`,
    and the averaged checkpoint and the sweep objective are built from that bookkeeping."""
    if not _local_checkpoint_file(ckpt_path):
        return
    folder = os.path.realpath(Path(ckpt_path).parent)  # as ModelCheckpoint resolves its own dirpath
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.dirpath = folder
            log.info("resuming: checkpoints continue in %s (the folder of ckpt_path)", folder)
    # Expected when resuming into it; Lightning warns about it at every resume otherwise.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def best_monitored(trainer: pl.Trainer) -> dict[str, float]:
    """`{monitor: best value}` of the checkpoint callback over the whole run (a resumed one included): the
    best validation, where the last one is up to `patience` validations past it after early stopping.
    Empty without a monitored checkpoint callback or before any validation."""
    checkpoint_cb = trainer.checkpoint_callback
    if not isinstance(checkpoint_cb, ModelCheckpoint) or checkpoint_cb.best_model_score is None:
        return {}
    return {checkpoint_cb.monitor: float(checkpoint_cb.best_model_score)} if checkpoint_cb.monitor else {}


def test_checkpoint(trainer: pl.Trainer, which: str) -> str | None:
    """The checkpoint to test after fitting: `best`, `last` or `averaged` (falls back to best)."""
    checkpoint_cb = trainer.checkpoint_callback
    if not isinstance(checkpoint_cb, ModelCheckpoint):
        return None
    if which == "averaged":
        averaged = next((cb.path for cb in trainer.callbacks if isinstance(cb, AverageBestCheckpoints)), None)
        if averaged is not None and Path(averaged).is_file():
            return str(averaged)
        which = "best"
    if which not in TEST_CHECKPOINTS:
        raise ValueError(f"test_ckpt must be one of {', '.join(TEST_CHECKPOINTS)}, not {which!r}")
    path = checkpoint_cb.best_model_path if which == "best" else checkpoint_cb.last_model_path
    return path or None


def log_hyperparameters(cfg: DictConfig, module: pl.LightningModule, trainer: pl.Trainer) -> None:
    if not trainer.loggers:
        return
    # storage_options may resolve to credentials (${oc.env:...}): they are not hyperparameters to upload.
    params = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in ("hydra", "storage_options")}
    params = OmegaConf.to_container(OmegaConf.create(params), resolve=True)
    params["model/params_total"] = sum(p.numel() for p in module.model.parameters())
    params["model/params_trainable"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
