"""Storage: logit store bytes per clip-epoch on disk at k = 20 (float16 and 8-bit values, with every
augmentation parameter), beside the paper's 84 bytes, and as a share of the audio it describes.

The top-k rows are synthetic but AudioSet-shaped (`bench.common.audioset_like_topk`: no trained AudioSet
teacher is available here). Sizes of real stores differ by a few bytes; `python -m ced_lightning.extract`
prints the real figure of every store it writes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import CLASSES, CLIP_SAMPLES, TOPK, write_synthetic_logit_store

PAPER_BYTES = 84
AUDIO_BYTES_PER_CLIP = 2 * CLIP_SAMPLES  # int16, before compression


def store_bytes(root: Path, quantization: str, clips: int, epochs: int) -> float:
    store = write_synthetic_logit_store(
        str(root / f"logits_{quantization}.zarr"),
        np.full(clips, CLIP_SAMPLES),
        epochs=epochs,
        quantization=quantization,
        audio_fingerprint="synthetic",
        audio_url="synthetic",
        block_clips=1024,
    )
    return float(store.bytes_per_clip_epoch())


def run(quick: bool = True) -> dict[str, Any]:
    clips, epochs = (4096, 2) if quick else (32768, 4)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = {kind: store_bytes(Path(tmp), kind, clips, epochs) for kind in ("float16", "int8")}
    figures: dict[str, Any] = {"config": {"clips": clips, "epochs": epochs, "topk": TOPK, "classes": CLASSES}}
    ratios = {}
    for kind, size in sizes.items():
        figures[f"bytes per clip-epoch, {kind}"] = size
        ratios[f"{kind} bytes per clip-epoch / paper's 84"] = size / PAPER_BYTES
        ratios[f"{kind}: % of a 10 s int16 clip, per augmentation epoch"] = 100 * size / AUDIO_BYTES_PER_CLIP
    figures["ratios"] = ratios
    return figures
