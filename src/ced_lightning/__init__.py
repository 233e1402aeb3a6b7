"""ced-lightning: Consistent Ensemble Distillation for audio tagging, in PyTorch Lightning and Hydra.

    import ced_lightning as ced
    m = ced.load("ced_mini")            # a released name or a checkpoint path
    print(m.tag("clip.wav", top_k=5))
    ced.tag_files(["a.wav", "b.wav"], model="ced_mini")

The API (`ced_lightning.api`) is imported on first use, so `import ced_lightning` stays light (no torch).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

__version__ = "0.1.0"

# Names of `ced_lightning.api`, re-exported lazily (PEP 562): the first access imports torch and the models.
# Imported by name: a package re-exporting its own submodule does not depend on it (the modules that import
# `ced_lightning` for `conf_dir` would otherwise form a cycle with it in tests/test_structure.py's graph).
_API = ("AudioTagger", "TagResult", "TaggingError", "list_released", "load", "tag_files")
__all__ = ["__version__", "compose_config", "compose_inner", "conf_dir", "resources_dir", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.api"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    # The API and the submodules already imported, without this module's own imports (Path, Any, ...).
    submodules = [
        name for name, value in globals().items() if isinstance(value, ModuleType) and name != "importlib"
    ]
    return sorted({*__all__, *submodules})


def conf_dir() -> Path:
    """Hydra's config folder: `ced_lightning/conf` in an installed wheel, the repo's `conf/` in a checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def resources_dir() -> Path:
    """Data shipped with the package (AudioSet's class list)."""
    return Path(__file__).resolve().parent / "resources"


def compose_config(overrides: list[str], output_dir: Path | str | None = None, config: str = "train") -> Any:
    """A command's config as `python -m ced_lightning.<config> OVERRIDES` would see it (Hydra's runtime config
    set, so `${hydra:...}` resolves), for code that runs a command in-process: tests, benchmarks. With
    `output_dir`, the run writes there."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name=config, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg


def compose_inner(config: str, overrides: list[str]) -> Any:
    """The config of a command that a running command starts in-process (the demo's teachers and extraction):
    composed in the running Hydra app when there is one, leaving its runtime config (output folder, saved
    configs) the outer run's; else from `conf/`, e.g. under `compose_config` in a benchmark."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config, overrides=overrides)
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name=config, overrides=overrides)
