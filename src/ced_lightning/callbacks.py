"""Lightning callbacks of this project."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

AVERAGED_CHECKPOINT = "averaged.ckpt"


def average_state_dicts(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point tensors; integer buffers (BatchNorm's counter) from the first."""
    if not state_dicts:
        raise ValueError("nothing to average")
    keys = state_dicts[0].keys()
    for i, sd in enumerate(state_dicts[1:], 1):
        if sd.keys() != keys:
            raise ValueError(f"checkpoint {i} has other keys than checkpoint 0")
    averaged = {}
    for key in keys:
        first = state_dicts[0][key]
        if first.is_floating_point():
            averaged[key] = torch.stack([sd[key].float() for sd in state_dicts]).mean(0).to(first.dtype)
        else:
            averaged[key] = first.clone()
    return averaged


class AverageBestCheckpoints(Callback):
    """At the end of fitting, average the weights of the `top_k` best checkpoints (the paper averages its 4
    best) and save them as `averaged.ckpt` beside them, a full checkpoint that every tool here reads."""

    def __init__(self, top_k: int = 4) -> None:
        self.top_k = top_k
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint_cb = trainer.checkpoint_callback
        if not isinstance(checkpoint_cb, ModelCheckpoint) or not checkpoint_cb.best_k_models:
            return
        reverse = checkpoint_cb.mode == "max"
        ranked = sorted(checkpoint_cb.best_k_models.items(), key=lambda kv: float(kv[1]), reverse=reverse)
        paths = [path for path, _ in ranked[: self.top_k]]
        # Every rank learns the path (all of them test it next); rank 0 alone writes it.
        self.path = Path(paths[0]).parent / AVERAGED_CHECKPOINT
        if trainer.is_global_zero:
            checkpoints = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
            averaged = dict(checkpoints[0])
            averaged["state_dict"] = average_state_dicts([c["state_dict"] for c in checkpoints])
            averaged["averaged_from"] = [str(p) for p in paths]
            torch.save(averaged, self.path)
            log.info("averaged the weights of %d best checkpoints into %s", len(paths), self.path)
        trainer.strategy.barrier("average_best_checkpoints")
