"""From a `train` config to the DataModule and LightningModule of its task (`distill` or `supervised`)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig, ListConfig, OmegaConf

from ced_lightning.audio import SAMPLE_RATE
from ced_lightning.augment import AugmentRecipe
from ced_lightning.fit_checkpoints import check_run_options
from ced_lightning.launch import global_rank
from ced_lightning.models import CED, load_matching_weights
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
    train = store_list(cfg.data.train)
    # A list of training stores (read as one): each member is named by its place in it.
    needed = {
        "data.train" if isinstance(train, str) else f"data.train[{k}]": url
        for k, url in enumerate([train] if isinstance(train, str) else train)
    }
    needed.update({"data.val": cfg.data.val, "data.test": cfg.data.test})
    if cfg.task == "distill":
        needed["data.logits"] = cfg.data.logits
    for key, url in needed.items():
        if url and not store_exists(url):
            raise FileNotFoundError(
                f"{key}: no store at {url}. Build it with: {_build_command(key, url, cfg)}"
            )


def store_list(urls: Any) -> str | list[str]:
    """A store key's value as a plain string, or a plain list where it lists several stores (read as one)."""
    if isinstance(urls, ListConfig | list | tuple):
        names = [str(u) for u in urls]
        return names[0] if len(names) == 1 else names
    return str(urls)


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
        train = store_list(cfg.data.train)
        audio_store = (
            f"'audio_store=[{','.join(train)}]'" if isinstance(train, list) else f"audio_store={train}"
        )
        return (
            f"python -m ced_lightning.extract {audio_store} output={url} "
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
            train=store_list(data.train),
            logits=data.logits,
            consistent=cfg.distill.consistent,
            inconsistent_shift=cfg.distill.get("inconsistent_shift", "fresh"),
            mixup=cfg.distill.mixup,
            with_labels=cfg.distill.label_weight > 0,
            **common,
        )
    from ced_lightning.data.labeled import LabeledDataModule

    return LabeledDataModule(train=store_list(data.train), clip_seconds=data.clip_seconds, **common)


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
        recipe=AugmentRecipe.for_clip(cfg.augment, float(cfg.data.clip_seconds)),  # scaled to the clip
        mixup=cfg.data.schedule.mixup,
        seed=cfg.seed,
        **common,
    )


def resolved_values(
    cfg: DictConfig, datamodule: LightningDataModule, module: LightningModule
) -> dict[str, Any]:
    """What the run uses where its config says something else or less: config key -> value.

    A student trains on its logit store's clip length and replays the store's augmentation recipe whatever
    the `data` and `augment` groups say; a teacher applies the `augment` group scaled to its clip length
    (`AugmentRecipe.for_clip`). The recipe is recorded with absolute sizes (`scale_to_clip: false`), so a
    config saved with these values gives the same recipe again."""
    values: dict[str, Any] = {}
    if _check_task(cfg) == "distill":
        values["data.clip_seconds"] = datamodule.logits.clip_samples / SAMPLE_RATE
        recipe = datamodule.recipe
    else:
        recipe = module.recipe
    values.update({f"augment.{key}": value for key, value in recipe.to_dict().items()})
    values["augment.scale_to_clip"] = False
    return values


def record_resolved(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of `cfg` with `values` (config key -> value used) set, for the run's saved configs (the logged
    hyperparameters, and the run folder's `.hydra/config.yaml` when `cfg` is that folder's run). One log line
    names each key whose config value the run did not use."""
    resolved = cfg.copy()
    changed = []
    for key, value in values.items():
        before = OmegaConf.select(cfg, key, default=None)
        if before != value:
            changed.append(f"{key}={value} (config: {before})")
        OmegaConf.update(resolved, key, value, force_add=True)
    if changed:
        log.info("the run uses %s; its saved configs record these", ", ".join(changed))
    saved = _hydra_config_file(cfg)
    if saved is not None and global_rank() == 0:
        # Interpolations stay as written; only the keys the run resolved otherwise are replaced.
        record = OmegaConf.load(saved)
        for key, value in values.items():
            OmegaConf.update(record, key, value, force_add=True)
        OmegaConf.save(record, saved)
    return resolved


def _hydra_config_file(cfg: DictConfig) -> Path | None:
    """This run's `.hydra/config.yaml` (None outside Hydra, or for a run inside another run's folder, e.g. a
    demo's label-only baseline, whose Hydra record is the outer run's)."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None, throw_on_missing=False)
    subdir = hydra_cfg.get("output_subdir")
    if not output_dir or not subdir:
        return None
    if Path(str(cfg.paths.get("output_dir", ""))).resolve() != Path(output_dir).resolve():
        return None
    path = Path(output_dir) / str(subdir) / "config.yaml"
    return path if path.is_file() else None
