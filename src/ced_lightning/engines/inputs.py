"""What a `train` run needs before anything long starts: a config whose own choices hold (run options, the
optimizer's package, no ignored overrides) and every store its task reads, or the command that builds the
missing one."""

from __future__ import annotations

import importlib.util

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ced_lightning.core.errors import ConfigError, MissingDependencyError, MissingInputError
from ced_lightning.engines.fit_checkpoints import check_run_options
from ced_lightning.store import store_exists
from ced_lightning.store.concat import store_urls


def check_train_config(cfg: DictConfig) -> None:
    """The config's own choices (run options, optimizer, augmentation), checked before anything long
    starts; also by a layer above `train` before it builds inputs (see `train.entry_point`)."""
    check_run_options(cfg)
    _check_optimizer(cfg)
    if not cfg.task.get("reads_augment", True):
        _refuse_augment_overrides(cfg)


def ensure_inputs(cfg: DictConfig) -> None:
    """The config is valid and every store the task reads (`task.stores`, by config key) exists, or the run
    stops at once naming the command that builds the missing one."""
    check_train_config(cfg)
    for key in cfg.task.stores:
        urls = store_urls(OmegaConf.select(cfg, key) or [])
        # A list of stores (read as one): each member is named by its place in it.
        for k, url in enumerate(urls):
            name = key if len(urls) == 1 else f"{key}[{k}]"
            if url and not store_exists(url):
                raise MissingInputError(
                    f"{name}: no store at {url}. Build it with: {_build_command(key, url, cfg)}"
                )


def _refuse_augment_overrides(cfg: DictConfig) -> None:
    """A student replays the augmentation recipe stored in the logit store; the `augment` group would be
    silently ignored, so overriding it on the command line is refused.

    The command line's overrides are read, not the composed `augment` values: those cannot tell what the
    user typed from what the defaults and experiments set (a student's config keeps the group for the
    teachers a layer above trains, e.g. the demo's), and the message quotes the user's own words."""
    if not HydraConfig.initialized():
        return
    overrides = [
        o
        for o in HydraConfig.get().overrides.task
        if o.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("@", 1)[0] == "augment"
    ]
    if overrides:
        raise ConfigError(
            f"task={cfg.task.name} takes its augmentation from the logit store {cfg.data.logits} (the "
            f"teachers' recipe, replayed exactly), so {' '.join(overrides)} would change nothing. Another "
            "augmentation needs another logit store: python -m ced_lightning.extract ... "
            f"{' '.join(overrides)}; distill.consistent=false draws fresh parameters from the stored recipe"
        )


def _build_command(key: str, url: str, cfg: DictConfig) -> str:
    if key == "data.logits":
        train = store_urls(cfg.data.train)
        audio_store = f"'audio_store=[{','.join(train)}]'" if len(train) > 1 else f"audio_store={train[0]}"
        return (
            f"python -m ced_lightning.extract {audio_store} output={url} "
            f"teacher={cfg.teacher.get('name', '<teacher config>')} epochs=..."
        )
    return f"python -m ced_lightning.prepare input=<audio dir, file list or AudioSet CSV> output={url}"


def _check_optimizer(cfg: DictConfig) -> None:
    target = str(cfg.optim.optimizer.get("_target_", ""))
    module = target.split(".", 1)[0]
    if module and importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"optim.optimizer._target_={target} needs {module!r}: pip install {module}"
        )
