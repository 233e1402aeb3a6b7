"""A run's set-up around the Trainer, shared by the Hydra entry points that run one (train, extract):
loggers (W&B that never hangs: credentials probed without prompting, offline when it cannot reach its host),
callbacks, precision, warning filters, the Trainer, the hyperparameters it logs, and W&B closed when a task
ends. Nothing here knows about audio; how the process was launched is `launch`'s, which checkpoint a fit
resumes into and tests is `fit_checkpoints`'."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import netrc
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf, open_dict

from ced_lightning.core.device import on_gpu, resolve_precision
from ced_lightning.core.errors import CedError, ConfigError
from ced_lightning.core.progress import output_is_terminal
from ced_lightning.engines.launch import global_rank

log = logging.getLogger(__name__)


@contextlib.contextmanager
def finish_task(cfg: DictConfig) -> Iterator[None]:
    """Always close the W&B run, also when the job fails, so that the next job of a multirun starts clean.
    A bug's traceback goes to the log with the run's folder."""
    try:
        yield
    except CedError:  # raised on purpose: the command reports it in one line (launch.command_errors)
        raise
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
        if "TensorBoard" in logger_cfg._target_ and not _tensorboard_installed():
            raise ConfigError(
                f"logger.{name} ({logger_cfg._target_}) needs the tensorboard package: "
                'pip install "ced-lightning[tensorboard]" (or choose another logger: logger=csv)'
            )
        loggers.append(instantiate(logger_cfg))
        log.debug("logger %s: %s", name, logger_cfg._target_)
    return loggers


def _tensorboard_installed() -> bool:
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


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
    if not output_is_terminal():
        # Where the output is a file, EpochLog's lines are the progress: a rich bar nobody sees still redraws
        # in a thread of its own (about 4% of a 2-core CPU in a demo teacher's run).
        callbacks = [c for c in callbacks if not isinstance(c, RichProgressBar)]
        with open_dict(trainer_cfg):
            trainer_cfg.enable_progress_bar = False
    with open_dict(trainer_cfg):
        trainer_cfg.precision = resolve_precision(
            trainer_cfg.get("precision", "auto"), trainer_cfg.accelerator
        )
        if trainer_cfg.get("sync_batchnorm") and not on_gpu(trainer_cfg.accelerator):
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
