"""From a `train` config to the DataModule and LightningModule of its task (`distill` or `supervised`)."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig, OmegaConf

from ced_lightning.augment import AugmentRecipe
from ced_lightning.models import CED, load_matching_weights
from ced_lightning.runtime import check_run_options
from ced_lightning.store import store_exists

log = logging.getLogger(__name__)

TASKS = ("distill", "supervised")


def _check_task(cfg: DictConfig) -> str:
    if cfg.task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {cfg.task!r}")
    return cfg.task


def check_train_config(cfg: DictConfig) -> None:
    """The config's own choices (task, run options, optimizer, augmentation), checked before anything long
    starts; also by a layer above `train` before it builds inputs (see `train.entry_point`)."""
    task = _check_task(cfg)
    check_run_options(cfg)
    _check_optimizer(cfg)
    if task == "distill":
        _refuse_augment_overrides(cfg)


def ensure_inputs(cfg: DictConfig) -> None:
    """The config is valid and every store the run reads exists, or the run stops at once naming the
    command that builds the missing one."""
    check_train_config(cfg)
    needed = {"data.train": cfg.data.train, "data.val": cfg.data.val, "data.test": cfg.data.test}
    if cfg.task == "distill":
        needed["data.logits"] = cfg.data.logits
    for key, url in needed.items():
        if url and not store_exists(url):
            raise FileNotFoundError(
                f"{key}: no store at {url}. Build it with: {_build_command(key, url, cfg)}"
            )


def _refuse_augment_overrides(cfg: DictConfig) -> None:
    """A student replays the augmentation recipe stored in the logit store; the `augment` group would be
    silently ignored, so overriding it on the command line is refused."""
    if not HydraConfig.initialized():
        return
    overrides = [
        o
        for o in HydraConfig.get().overrides.task
        if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("@", 1)[0] == "augment"
    ]
    if overrides:
        raise ValueError(
            f"task=distill takes its augmentation from the logit store {cfg.data.logits} (the teachers' "
            f"recipe, replayed exactly), so {' '.join(overrides)} would change nothing. Another augmentation "
            "needs another logit store: python -m ced_lightning.extract ... "
            f"{' '.join(overrides)}; distill.consistent=false draws fresh parameters from the stored recipe"
        )


def _build_command(key: str, url: str, cfg: DictConfig) -> str:
    if key == "data.logits":
        return (
            f"python -m ced_lightning.extract audio_store={cfg.data.train} output={url} "
            f"teacher={cfg.teacher.get('name', '<teacher config>')} epochs=... topk=20"
        )
    return f"python -m ced_lightning.prepare input=<audio dir, file list or AudioSet CSV> output={url}"


def build_datamodule(cfg: DictConfig) -> LightningDataModule:
    data = cfg.data
    common: dict[str, Any] = {
        "val": data.val,
        "test": data.test,
        "batch_size": data.batch_size,
        "eval_batch_size": data.eval_batch_size,
        "num_workers": data.num_workers,
        "pin_memory": data.pin_memory,
        "shuffle_window": data.shuffle_window,
        "seed": cfg.seed,
    }
    if _check_task(cfg) == "distill":
        from ced_lightning.data.distill import DistillDataModule

        return DistillDataModule(
            train=data.train,
            logits=data.logits,
            consistent=cfg.distill.consistent,
            inconsistent_shift=cfg.distill.get("inconsistent_shift", "fresh"),
            mixup=cfg.distill.mixup,
            with_labels=cfg.distill.label_weight > 0,
            **common,
        )
    from ced_lightning.data.labeled import LabeledDataModule

    return LabeledDataModule(train=data.train, clip_seconds=data.clip_seconds, **common)


def build_network(cfg: DictConfig, num_classes: int) -> Any:
    """The `model` group's network with the data's class count, initialised from `model.init_from`: a path
    or a released name such as `ced_mini` or `ced_mini_mae` (`model.init_strict=false` accepts a partial
    match)."""
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    init_from = model_cfg.pop("init_from", None)
    init_strict = bool(model_cfg.pop("init_strict", True))
    if model_cfg.get("num_classes") not in (None, num_classes):
        raise ValueError(
            f"model.num_classes={model_cfg['num_classes']} but the data has {num_classes} classes; "
            "leave model.num_classes unset (null)"
        )
    model_cfg["num_classes"] = num_classes
    network = instantiate(model_cfg)
    if init_from:
        if not isinstance(network, CED):
            raise ValueError("model.init_from loads CED or MAE-pretrained CED weights; this model is not CED")
        load_matching_weights(network, init_from, strict=init_strict)
    return network


def _check_optimizer(cfg: DictConfig) -> None:
    target = str(cfg.optim.optimizer.get("_target_", ""))
    module = target.split(".", 1)[0]
    if module and importlib.util.find_spec(module) is None:
        raise ImportError(f"optim.optimizer._target_={target} needs {module!r}: pip install {module}")


def build_module(cfg: DictConfig, datamodule: LightningDataModule) -> LightningModule:
    network = build_network(cfg, datamodule.num_classes)
    common: dict[str, Any] = {
        "model": network,
        "optimizer": instantiate(cfg.optim.optimizer),
        "warmup_steps": cfg.optim.warmup_steps,
        "min_lr_ratio": cfg.optim.min_lr_ratio,
        "ema_decay": cfg.optim.ema_decay,
        "class_names": datamodule.class_names,
    }
    if _check_task(cfg) == "distill":
        from ced_lightning.modules.distill import StudentDistillModule

        return StudentDistillModule(
            recipe=datamodule.recipe,
            loss=cfg.distill.loss,
            temperature=cfg.distill.temperature,
            target_fill=cfg.distill.target_fill,
            label_weight=cfg.distill.label_weight,
            **common,
        )
    from ced_lightning.modules.supervised import SupervisedModule

    return SupervisedModule(
        recipe=AugmentRecipe.from_config(cfg.augment),
        mixup=cfg.data.schedule.mixup,
        seed=cfg.seed,
        **common,
    )
