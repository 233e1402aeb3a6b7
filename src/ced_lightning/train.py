"""`python -m ced_lightning.train`: distil a student (task=distill) or train a teacher (task=supervised).

Thin in the lightning-hydra-template manner: the run itself (data, module, callbacks, loggers, trainer,
fit, test of the chosen checkpoint) is `engines.training.train`; this command returns its optimised metric
to sweepers. A data group may name a layer above `train` that runs instead and calls it (`data.entry`, see
`entry_point`).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from typing import Any

import hydra
from hydra.utils import get_method
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from ced_lightning import conf_dir
from ced_lightning.core.errors import ConfigError
from ced_lightning.engines.launch import command_errors, prepare_ddp_relaunch, quiet_non_zero_ranks
from ced_lightning.engines.trainer import finish_task
from ced_lightning.engines.training import train

log = logging.getLogger(__name__)


def entry_point(cfg: DictConfig) -> Callable[[DictConfig], dict[str, Any]]:
    """What runs `cfg`: `train`, or the function the data group names in `data.entry` (`module.function`), a
    layer above `train` that calls it (e.g. one that builds the data set's missing inputs first and reports
    on them after). Named in the config, so that this command neither imports nor knows such layers."""
    name = cfg.data.get("entry")
    if not name:
        return train
    try:
        return get_method(name)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"data.entry={name}: not a function this Python can import ({error})") from error


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> float | None:
    quiet_non_zero_ranks()
    prepare_ddp_relaunch()
    with finish_task(cfg):
        try:
            metrics = entry_point(cfg)(cfg)
        except SIGTERMException as stopped:
            # Lightning ends a fit stopped by SIGTERM with a bare SystemExit, i.e. status 0, which a scheduler
            # reads as a finished job; 128 + 15 is what a process killed by the signal reports.
            log.warning(
                "stopped by SIGTERM; the checkpoints written so far are kept (averaged.ckpt included)"
            )
            raise SystemExit(128 + signal.SIGTERM) from stopped
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
