"""ced-lightning: Consistent Ensemble Distillation for audio tagging, in PyTorch Lightning and Hydra."""

from pathlib import Path

__version__ = "0.1.0"


def conf_dir() -> Path:
    """Hydra's config folder: `ced_lightning/conf` in an installed wheel, the repo's `conf/` in a checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "conf"


def resources_dir() -> Path:
    """Data shipped with the package (AudioSet's class list)."""
    return Path(__file__).resolve().parent / "resources"
