"""Shared by the benchmark sections: timing with repeats, FLOP counting, the result record, and the synthetic
inputs (noise clips, AudioSet-shaped teacher rows, the stores made of them, the distillation step)."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ced_lightning.core.audio import SAMPLE_RATE, int16_to_float
from ced_lightning.core.augment import (
    AugmentParams,
    AugmentRecipe,
    augmented_spectrogram,
    sample_augment_params,
)
from ced_lightning.core.labels import audioset_classes
from ced_lightning.core.losses import distill_loss
from ced_lightning.core.targets import rebuild_targets
from ced_lightning.store import LogitStore
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.audio_writer import write_audio_store
from ced_lightning.store.logit_layout import LogitStoreLayout

CLASSES = len(audioset_classes())  # the released teachers' outputs
TOPK = 20  # the paper's stored top-k
CLIP_SECONDS = 10.0  # an AudioSet clip
CLIP_SAMPLES = round(CLIP_SECONDS * SAMPLE_RATE)
NOISE_RMS = 0.1  # -20 dBFS: a plausible level, far from int16's clipping


def measure(
    fn: Callable[[], Any],
    *,
    repeats: int = 5,
    warmup: int = 1,
    number: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Seconds per call of `fn`: median, min and max over `repeats` timings of `number` calls each.

    `sync` runs before every clock reading (e.g. `torch.cuda.synchronize`, whose kernels run queued)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync()
        times.append((time.perf_counter() - start) / number)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": repeats}


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """`measure` for several functions at once, in rounds: each round times every function once, so a slow
    spell of a shared machine (another process on the core) slows all of them alike and their ratios hold,
    where timing one function's repeats after another's would put the spell on whichever ran then."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median": statistics.median(t), "min": min(t), "max": max(t), "repeats": repeats}
        for name, t in times.items()
    }


def stream_rate(
    make_batches: Callable[[], Iterable[dict[str, Any]]], *, repeats: int = 3, warmup: int = 1
) -> dict[str, dict[str, float]]:
    """Steady-state clips/s of a batch iterable (a DataLoader): from its first batch to its last, so that
    starting worker processes (once per epoch, negligible on a real data set) is reported apart as
    `first batch seconds`. Batches are `{"index", "waveform", ...}`; int16 waveforms are converted to float32
    as the training process does (`Int16Batches.on_after_batch_transfer`, here on the CPU)."""
    seconds, clips, first = [], [], []
    for repeat in range(warmup + repeats):
        start = time.perf_counter()
        batches = iter(make_batches())
        next(batches)
        ready = time.perf_counter()
        count = 0
        for batch in batches:
            if batch["waveform"].dtype == torch.int16:
                int16_to_float(batch["waveform"])
            count += len(batch["index"])
        if repeat >= warmup:
            first.append(ready - start)
            seconds.append(time.perf_counter() - ready)
            clips.append(count)
    rates = [n / s for n, s in zip(clips, seconds)]
    return {
        "clips/s": {
            "median": statistics.median(rates),
            "min": min(rates),
            "max": max(rates),
            "repeats": repeats,
        },
        "first batch seconds": {
            "median": statistics.median(first),
            "min": min(first),
            "max": max(first),
            "repeats": repeats,
        },
    }


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of `fn`: matrix products and convolutions, forward and backward, 2 a multiply-add.

    SDPA runs on its math backend while counting: the fused CPU kernel is not in the counter's table, so
    attention's two matrix products (QKᵀ and AV) would otherwise count as zero."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    layout = LogitStoreLayout(
        num_clips=len(lengths),
        epochs=epochs,
        topk=TOPK,
        num_classes=CLASSES,
        class_names=class_names,
        quantization=quantization,
        recipe=recipe,
        clip_samples=int(np.max(lengths)),
        block_clips=block_clips,
    )
    store = LogitStore.create(
        url,
        layout,
        seed=0,
        audio_fingerprint=audio_fingerprint,
        audio_url=audio_url,
        teachers=[{"name": "synthetic"}],
        combine="mean_prob",
    )
    for b in range(store.num_blocks):
        start, stop = store.block_range(b)
        rows = [audioset_like_topk(rng, stop - start) for _ in range(epochs)]
        index = np.arange(start, stop)
        params = [sample_augment_params(recipe, 0, e, index, lengths[start:stop]) for e in range(epochs)]
        store.write_block(b, np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows]), params)
    return store


def noise(*shape: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise waveforms at `NOISE_RMS`: inputs whose content the figures do not depend on."""
    return torch.randn(*shape, generator=generator) * NOISE_RMS


def write_noise_audio_store(url: str, clips: int, seconds: float) -> AudioStore:
    """An audio store of `clips` noise clips of `seconds`, each labelled with one of `CLASSES` classes."""
    generator = torch.Generator().manual_seed(0)
    samples = round(seconds * SAMPLE_RATE)

    def rows() -> Iterator[tuple[str, torch.Tensor, list[int]]]:
        # one clip at a time: a full-size run (thousands of 10 s clips) would not fit in memory at once
        for i in range(clips):
            yield f"c{i}", noise(samples, generator=generator), [i % CLASSES]

    return write_audio_store(url, rows(), class_names=[f"class{i}" for i in range(CLASSES)])


# waveform [B, T], lengths [B], augmentation parameters, top-k indices and probabilities [B, k]
DistillBatch = tuple[torch.Tensor, torch.Tensor, AugmentParams, torch.Tensor, torch.Tensor]


def distill_batch(
    batch_size: int, samples: int, recipe: AugmentRecipe, device: torch.device | str = "cpu"
) -> DistillBatch:
    """Noise clips, their lengths and augmentation parameters, and stored-like top-k teacher rows."""
    generator = torch.Generator().manual_seed(0)
    wave = noise(batch_size, samples, generator=generator)
    lengths = np.full(batch_size, samples, dtype=np.int64)
    params = sample_augment_params(recipe, 0, 0, np.arange(batch_size), lengths)
    probs, indices = torch.rand(batch_size, CLASSES, generator=generator).topk(TOPK, dim=-1)
    return (
        wave.to(device),
        torch.from_numpy(lengths).to(device),
        params,
        indices.to(device),
        probs.to(device),
    )


def distill_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: DistillBatch,
    recipe: AugmentRecipe,
    dtype: torch.dtype | None = None,
) -> None:
    """One distillation step of a CED student: augmented spectrogram, forward (under autocast to `dtype`,
    if given), dense target rebuilt from the top-k rows, KL loss, backward, optimiser step."""
    wave, lengths, params, indices, probs = batch
    with torch.autocast(wave.device.type, dtype=dtype, enabled=dtype is not None):
        mel = augmented_spectrogram(model.front_end, wave, lengths, params, recipe)
        logits = model.forward_spectrogram(mel)
    target = rebuild_targets(indices, probs, CLASSES, "zero")
    loss = distill_loss("kl", logits, target, 1.0).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
