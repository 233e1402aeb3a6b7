"""Tag audio files with a trained model, streamed: clip tags, per-window tags (a sound-event timeline) and
per-window embeddings. The `predict` command: its config, checked, handed to `predict_files` (the inference
engine, `ced_lightning.engines.inference`, which `ced-predict` and the Python API use too).

    python -m ced_lightning.predict ckpt=model.ckpt 'inputs=[clip.wav,folder/]' topk=5 output=tags.jsonl
    python -m ced_lightning.predict ckpt=ced_mini 'inputs=[field.flac]' 'outputs=[tags,windows,embeddings]'
    python -m ced_lightning.predict ckpt=ced_mini 'inputs=[street.wav]' events_output=ev.csv median_window=5
"""

from __future__ import annotations

import os

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import ced_lightning
from ced_lightning.core.errors import ConfigError
from ced_lightning.engines.inference import Failure, predict_files
from ced_lightning.engines.inference.events import EventSettings
from ced_lightning.engines.launch import command_errors


def predict(cfg: DictConfig) -> list[Failure]:
    """The `predict` command without Hydra's wrapper: tag, write, plot; returns the failures."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ConfigError(
            "ckpt=PATH is required (a .ckpt of ours, a save_ced file, a released CED .pt or name)"
        )
    inputs = cfg.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    outputs = cfg.get("outputs", ["tags"])
    if isinstance(outputs, str):
        outputs = [outputs]
    if cfg.get("timeline") is not None:
        raise ConfigError(
            "timeline= is gone: per-window tags are outputs=[tags,windows] with windows_output=FILE.csv, "
            "their charts timeline_dir=FOLDER; segment_seconds/hop_seconds set the windows, and the clip "
            "tags now combine them (docs/using_models.md, 'Streaming')"
        )
    if str(cfg.get("output")) == "-":
        raise ConfigError(
            "output=-: this command logs to stdout too; for JSON lines on stdout use ced-predict --output -"
        )
    hop, segment = cfg.get("hop_seconds"), cfg.get("segment_seconds")
    return predict_files(
        cfg.ckpt,
        list(inputs or []),
        topk=int(cfg.get("topk", 5)),
        outputs=list(outputs),
        output=cfg.get("output"),
        windows_output=cfg.get("windows_output"),
        embeddings_output=cfg.get("embeddings_output"),
        embeddings_format=str(cfg.get("embeddings_format", "npy")),
        timeline_dir=cfg.get("timeline_dir"),
        segment_seconds=None if segment is None else float(segment),
        hop_seconds=None if hop is None else float(hop),
        batch_size=int(cfg.get("batch_size", 8)),
        length_tolerance_s=float(cfg.get("length_tolerance_s", 0.0)),
        device=str(cfg.get("device", "auto")),
        quantize=cfg.get("quantize"),
        progress_min_files=int(cfg.get("progress_min_files", 20)),
        overwrite=bool(cfg.get("overwrite", False)),
        events_output=cfg.get("events_output"),
        event_settings=EventSettings(
            event_threshold(cfg.get("event_threshold", 0.5)),
            int(cfg.get("median_window", 1)),
            int(cfg.get("fill_gap", 0)),
            int(cfg.get("min_frames", 1)),
        ),
    )


def event_threshold(value: object) -> float | list[float]:
    """`event_threshold`: one probability, or a list of one per class."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if OmegaConf.is_list(value) or isinstance(value, list):
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            pass
    raise ConfigError(f"event_threshold: expected a probability or a list of one per class, got {value!r}")


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="predict", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    if predict(cfg):
        # After every other file was tagged and written: scripts can still tell that something failed.
        raise SystemExit(1)


if __name__ == "__main__":
    main()
