"""A run's saved configs say what it used: where the config says something else or less (a student's clip
length and augmentation come from its logit store; a teacher's masks are scaled to its clip length), the
values used replace the config's in the logged hyperparameters and the run folder's `.hydra/config.yaml`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import LightningDataModule, LightningModule
from omegaconf import DictConfig, OmegaConf

from ced_lightning.engines.launch import global_rank

log = logging.getLogger(__name__)


def resolved_values(datamodule: LightningDataModule, module: LightningModule) -> dict[str, Any]:
    """What the run uses where its config says something else or less: config key -> value.

    The clip length is the data module's (a student's is its logit store's, whatever the `data` group
    says); the recipe is the module's (a student replays its store's, a teacher applies the `augment` group
    scaled to its clip length: `AugmentRecipe.for_clip`). The recipe is recorded with absolute sizes
    (`scale_to_clip: false`), so a config saved with these values gives the same recipe again."""
    values: dict[str, Any] = {"data.clip_seconds": datamodule.clip_seconds}
    values.update({f"augment.{key}": value for key, value in module.recipe.to_dict().items()})
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
