"""Shared by the benchmark sections: timing with repeats, and the result record."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ced_lightning.augment import AugmentRecipe, sample_augment_params
from ced_lightning.store import LogitStore

CLASSES, TOPK = 527, 20


def measure(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1, number: int = 1) -> dict[str, float]:
    """Seconds per call of `fn`: median, min and max over `repeats` timings of `number` calls each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - start) / number)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def rate(seconds: dict[str, float], items: float) -> dict[str, float]:
    """Items per second from a `measure` result (min time gives the max rate)."""
    return {
        "median": items / seconds["median"],
        "min": items / seconds["max"],
        "max": items / seconds["min"],
        "repeats": seconds["repeats"],
    }


def ratio(a: dict[str, float], b: dict[str, float]) -> float:
    """Median of a over median of b."""
    return a["median"] / b["median"]


def audioset_like_topk(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows shaped like an AudioSet teacher's: Zipf-like class popularity, 1-3 "present" classes per
    clip with high logits, a noisy low tail correlated with popularity. Sorted by descending probability."""
    popularity = 1.0 / np.arange(1, CLASSES + 1) ** 0.9
    popularity = rng.permutation(popularity / popularity.sum())
    logits = -7.0 + 0.6 * np.log(popularity * CLASSES)[None, :] + rng.normal(0, 1.2, (n, CLASSES))
    for row in range(n):
        present = rng.choice(CLASSES, size=rng.integers(1, 4), replace=False, p=popularity)
        logits[row, present] += rng.uniform(5, 10, len(present))
    probs = 1 / (1 + np.exp(-logits))
    order = np.argsort(-probs, axis=1)[:, :TOPK]
    return order.astype(np.uint16), np.take_along_axis(probs, order, 1).astype(np.float32)


def write_synthetic_logit_store(
    url: str,
    lengths: np.ndarray,
    *,
    epochs: int,
    quantization: str,
    audio_fingerprint: str,
    audio_url: str,
    block_clips: int,
    class_names: list[str] | None = None,
) -> LogitStore:
    """A complete logit store of AudioSet-shaped top-k rows with the paper's augmentation parameters."""
    rng = np.random.default_rng(0)
    recipe = AugmentRecipe()
    store = LogitStore.create(
        url,
        num_clips=len(lengths),
        epochs=epochs,
        topk=TOPK,
        num_classes=CLASSES,
        class_names=class_names,
        quantization=quantization,
        recipe=recipe,
        seed=0,
        audio_fingerprint=audio_fingerprint,
        audio_url=audio_url,
        clip_samples=int(np.max(lengths)),
        teachers=[{"name": "synthetic"}],
        combine="mean_prob",
        block_clips=block_clips,
    )
    for b in range(store.num_blocks):
        start, stop = store.block_range(b)
        rows = [audioset_like_topk(rng, stop - start) for _ in range(epochs)]
        index = np.arange(start, stop)
        params = [sample_augment_params(recipe, 0, e, index, lengths[start:stop]) for e in range(epochs)]
        store.write_block(b, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), params)
    return store
