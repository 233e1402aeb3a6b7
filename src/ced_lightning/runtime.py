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
from collections.abc import Iterator
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
    """This process's rank as the launchers set it (0 before any launch); only `== 0` is relied upon."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
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
    the sweep's own argv would start the whole sweep again on every rank."""
    if not HydraConfig.initialized() or global_rank() != 0:
        return
    hydra_cfg = HydraConfig.instance().cfg
    output_dir = hydra_cfg.hydra.runtime.output_dir
    with read_write(hydra_cfg.hydra.run):
        hydra_cfg.hydra.run.dir = output_dir
    if hydra_cfg.hydra.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hydra_cfg.hydra.overrides.task, "hydra.mode=RUN"]


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
# so their length is exact; Lightning 2.6 calls a pytree API that torch 2.11 deprecated.
_NOT_ACTIONABLE = (r"Your `IterableDataset` has `__len__` defined", r"`isinstance\(treespec, LeafSpec\)`")


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> pl.Trainer:
    for message in _NOT_ACTIONABLE:
        warnings.filterwarnings("ignore", message=message)
    trainer_cfg = cfg.trainer.copy()
    with open_dict(trainer_cfg):
        trainer_cfg.precision = resolve_precision(
            trainer_cfg.get("precision", "auto"), trainer_cfg.accelerator
        )
        if trainer_cfg.get("sync_batchnorm") and not _on_gpu(trainer_cfg.accelerator):
            trainer_cfg.sync_batchnorm = False  # torch's SyncBatchNorm runs on GPUs only (DDP on CPU: gloo)
    return instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)


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
    if which not in {"best", "last"}:
        raise ValueError(f"test_ckpt must be best, last or averaged, not {which!r}")
    path = checkpoint_cb.best_model_path if which == "best" else checkpoint_cb.last_model_path
    return path or None


def log_hyperparameters(cfg: DictConfig, module: pl.LightningModule, trainer: pl.Trainer) -> None:
    if not trainer.loggers:
        return
    params = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "hydra"}
    params = OmegaConf.to_container(OmegaConf.create(params), resolve=True)
    params["model/params_total"] = sum(p.numel() for p in module.model.parameters())
    params["model/params_trainable"] = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(params)
