"""Training supply and demand: a CED-Mini distillation step (forward, backward, optimiser) in clips/s at batch
32 on the CPU, against what `DistillDataModule` delivers for the same clips (audio read, logit target
rebuilt, augmentation parameters replayed) with 0 and 2 workers."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    CLASSES,
    CLIP_SECONDS,
    TOPK,
    distill_batch,
    distill_step,
    measure,
    rate,
    stream_rate,
    write_noise_audio_store,
    write_synthetic_logit_store,
)
from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.data.distill import DistillDataModule
from ced_lightning.models import create_ced

EPOCHS = 2


def build_stores(root: Path, clips: int, seconds: float) -> tuple[str, str]:
    """An audio store of noise clips and a logit store of AudioSet-shaped top-k rows for it."""
    audio_url, logits_url = str(root / "audio.zarr"), str(root / "logits.zarr")
    audio = write_noise_audio_store(audio_url, clips, seconds)
    write_synthetic_logit_store(
        logits_url,
        audio.lengths,
        epochs=EPOCHS,
        quantization="int8",
        audio_fingerprint=audio.fingerprint,
        audio_url=audio_url,
        block_clips=256,
        class_names=audio.class_names,
    )
    return audio_url, logits_url


def delivery_rate(
    audio_url: str, logits_url: str, workers: int, batch_size: int
) -> dict[str, dict[str, float]]:
    data = DistillDataModule(
        train=audio_url, logits=logits_url, batch_size=batch_size, num_workers=workers, mixup=0.5
    )
    return stream_rate(data.train_dataloader, repeats=3, warmup=1)


def step_rate(batch_size: int, seconds: float) -> dict[str, float]:
    model = create_ced("ced_mini", num_classes=CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    recipe = AugmentRecipe()
    batch = distill_batch(batch_size, round(seconds * SAMPLE_RATE), recipe)
    # no autocast: float32, what `trainer.precision=auto` resolves to on the CPU
    step = partial(distill_step, model, optimizer, batch, recipe)
    return rate(measure(step, repeats=3, warmup=1), batch_size)


def run(quick: bool = True) -> dict[str, Any]:
    batch_size = 32
    seconds = CLIP_SECONDS
    clips = 512 if quick else 4096
    with tempfile.TemporaryDirectory() as tmp:
        audio_url, logits_url = build_stores(Path(tmp), clips, seconds)
        step = step_rate(batch_size, seconds)
        delivery = {w: delivery_rate(audio_url, logits_url, w, batch_size) for w in (0, 2)}
    return {
        "config": {"batch_size": batch_size, "clip_seconds": seconds, "clips": clips, "topk": TOPK},
        "ced_mini step clips/s": step,
        **{f"delivery, {w} workers": delivery[w] for w in (0, 2)},
        "ratios": {
            f"delivery / step, {w} workers": delivery[w]["clips/s"]["median"] / step["median"] for w in (0, 2)
        },
    }
