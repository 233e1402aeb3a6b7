"""Storage: logit store bytes per clip-epoch on disk at k = 20 (float16 and 8-bit values, with every
augmentation parameter), beside the paper's 84 bytes, and as a share of the audio it describes.

The top-k rows are synthetic but AudioSet-shaped (no trained AudioSet teacher is available here): Zipf-like
class popularity, 1-3 "present" classes per clip with high logits, a noisy low tail correlated with class
popularity. Sizes of real stores differ by a few bytes; `python -m ced_lightning.extract` prints the real
figure of every store it writes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ced_lightning.augment import AugmentRecipe, sample_augment_params
from ced_lightning.store import LogitStore

CLASSES, TOPK, PAPER_BYTES = 527, 20, 84
CLIP_SAMPLES = 160_000  # 10 s at 16 kHz
AUDIO_BYTES_PER_CLIP = 2 * CLIP_SAMPLES  # int16, before compression


def audioset_like_topk(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    popularity = 1.0 / np.arange(1, CLASSES + 1) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    logits = -7.0 + 2.0 * np.log(popularity * CLASSES)[None, :] * 0.3 + rng.normal(0, 1.2, (n, CLASSES))
    for row in range(n):
        present = rng.choice(CLASSES, size=rng.integers(1, 4), replace=False, p=popularity)
        logits[row, present] += rng.uniform(5, 10, len(present))
    probs = 1 / (1 + np.exp(-logits))
    order = np.argsort(-probs, axis=1)[:, :TOPK]
    return order.astype(np.uint16), np.take_along_axis(probs, order, 1).astype(np.float32)


def store_bytes(root: Path, quantization: str, clips: int, epochs: int) -> float:
    rng = np.random.default_rng(0)
    recipe = AugmentRecipe()
    store = LogitStore.create(
        str(root / f"logits_{quantization}.zarr"),
        num_clips=clips,
        epochs=epochs,
        topk=TOPK,
        num_classes=CLASSES,
        class_names=None,
        quantization=quantization,
        recipe=recipe,
        seed=0,
        audio_fingerprint="synthetic",
        audio_url="synthetic",
        clip_samples=CLIP_SAMPLES,
        teachers=[{"name": "synthetic"}],
        combine="mean_prob",
        block_clips=1024,
    )
    for b in range(store.num_blocks):
        start, stop = store.block_range(b)
        rows = [audioset_like_topk(rng, stop - start) for _ in range(epochs)]
        lengths = np.full(stop - start, CLIP_SAMPLES)
        params = [sample_augment_params(recipe, 0, e, np.arange(start, stop), lengths) for e in range(epochs)]
        store.write_block(b, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), params)
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
