"""A training run as the config says: the task's data and module, the Trainer, fit, test of the chosen
checkpoint, and the metrics sweepers and the layers above read (`train`).

The task is a config group (`conf/task/`): its `datamodule` and `module` are instantiated as written there,
the module with what only the data knows (`build_task`). The `train` command runs it, or the layer the data
group names (`data.entry`, e.g. `engines.comparison.train_and_compare`), which calls it.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig, OmegaConf, open_dict

from ced_lightning.core.errors import CedError, ConfigError
from ced_lightning.engines.fit_checkpoints import (
    best_monitored,
    continue_in_checkpoint_folder,
    keep_better_of_average,
    test_checkpoint,
)
from ced_lightning.engines.inputs import ensure_inputs
from ced_lightning.engines.launch import set_cpu_threads
from ced_lightning.engines.saved_config import record_resolved, resolved_values
from ced_lightning.engines.student_start import TEACHER_START, teacher_start
from ced_lightning.engines.trainer import build_callbacks, build_loggers, build_trainer, log_hyperparameters
from ced_lightning.models import CED, ReleasedWeightsUnavailable, load_matching_weights

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test as `cfg` says; returns the metrics: the monitored one (`val/mAP`) at its best
    validation, the others (`test/mAP`, ...) as last logged."""
    ensure_inputs(cfg)  # a missing store stops the run at once, naming the command that builds it
    threads = set_cpu_threads(cfg.get("num_threads"))
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, module = build_task(cfg)
    callbacks = build_callbacks(cfg)
    if cfg.train:
        continue_in_checkpoint_folder(callbacks, cfg.get("ckpt_path"))
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks=callbacks, loggers=loggers)
    # The saved configs say what the run uses (a student's clip length and recipe come from its logit store).
    used = {**resolved_values(datamodule, module), "num_threads": threads}
    log_hyperparameters(record_resolved(cfg, used), module, trainer)

    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.train:
        averaging = keep_better_of_average(trainer, module, datamodule)
        if averaging is not None:
            metrics["averaging"] = averaging
    if cfg.test:
        ckpt = test_checkpoint(trainer, cfg.test_ckpt) if cfg.train else cfg.get("ckpt_path")
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        metrics["tested_checkpoint"] = ckpt
    # The sweep objective (and what layers above report): the best validation (the monitored one).
    best = best_monitored(trainer)
    if cfg.train and cfg.optimized_metric in metrics and cfg.optimized_metric not in best:
        log.warning(
            "%s: the last validation's value (no checkpoint callback monitors it, so the best is unknown)",
            cfg.optimized_metric,
        )
    metrics.update(best)
    metrics["checkpoint_dir"] = getattr(trainer.checkpoint_callback, "dirpath", None)
    metrics["optimizer_steps"] = int(trainer.global_step)  # what the label-only baseline is matched to
    return metrics


def build_task(cfg: DictConfig) -> tuple[LightningDataModule, LightningModule]:
    """The task group's data module and Lightning module (`task.datamodule`, `task.module`). What the module
    needs from the data is passed as keyword arguments: the network built for the data's class count, the
    class names and the augmentation recipe (a student's from its logit store, a teacher's from `augment`)."""
    datamodule = _instantiate(cfg.task.datamodule)
    # A partial first, so that these objects reach the constructor as they are (instantiate's own keyword
    # arguments would pass through OmegaConf, which turns the recipe dataclass into a config).
    make_module = _instantiate(cfg.task.module, _partial_=True)
    module = make_module(
        model=build_network(cfg, datamodule.num_classes),
        class_names=datamodule.class_names,
        recipe=datamodule.recipe,
    )
    return datamodule, module


def build_network(cfg: DictConfig, num_classes: int) -> Any:
    """The `model` group's network with the data's class count, initialised from `model.init_from`: a path
    or a released name such as `ced_mini` or `ced_mini_mae`, or `teacher` (the strongest teacher of its
    architecture in the logit store: `engines.student_start`); `model.init_strict=false` accepts a partial
    match, `model.init_head=false` starts a new head even where the file's fits."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    init_from = model_cfg.pop("init_from", None)
    init_strict = bool(model_cfg.pop("init_strict", True))
    init_head = bool(model_cfg.pop("init_head", True))
    if model_cfg.get("num_classes") not in (None, num_classes):
        raise ConfigError(
            f"model.num_classes={model_cfg['num_classes']} but the data has {num_classes} classes; "
            "leave model.num_classes unset (null)"
        )
    model_cfg["num_classes"] = num_classes
    network = _instantiate(model_cfg)
    if init_from:
        if not isinstance(network, CED):
            raise ConfigError(
                "model.init_from loads CED or MAE-pretrained CED weights; this model is not CED"
            )
        if init_from == TEACHER_START:
            # A teacher of the student's width, maybe shallower (its missing blocks grow as identities). The
            # run's config records the file, so the label-only row and a resumed run start from the same.
            init_from, init_strict = teacher_start(cfg, network), False
            with open_dict(cfg):
                cfg.model.init_from = init_from
        try:
            load_matching_weights(network, init_from, strict=init_strict, head=init_head)
        except ReleasedWeightsUnavailable as err:
            # data=custom asks for released weights by default: say where the name came from and the way out.
            source = f"model.init_from={init_from}"
            if OmegaConf.select(cfg, "data.init_from", default=None) == init_from:
                source = f"data.init_from={init_from} (data={cfg.data.name}'s start for CED networks)"
            raise ReleasedWeightsUnavailable(
                f"{source}: {err}\nTo train from scratch instead: model.init_from=null"
            ) from err
    return network


def _instantiate(node: Any, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, except that an error a constructor raises on purpose (a `CedError`: a data
    module refusing its stores, say) leaves as itself, so the command prints its one line, not Hydra's
    wrapper and a traceback."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, CedError):
            raise err.__cause__ from None
        raise
