"""GPU: bf16 training and extraction speed with model FLOP utilisation (MFU), and replay determinism.

The card's achievable rate is measured here too (the best of several large bf16 matrix products), so MFU
(median model rate over that) is relative to what this card does, not to its data sheet. Training is a
distillation step (augmented spectrogram, forward, top-k target rebuilt, KL loss, backward, AdamW);
extraction is what `TeacherEnsembleModule` does per micro-batch (`ensemble_probabilities` on the augmented
clips, then top-k), for each teacher alone and for the ensemble of all of them. FLOPs are counted by
`FlopCounterMode` on the timed call itself, with SDPA on its math backend so that attention is counted on
every device (the CPU's fused SDPA kernel is not in the counter's table). Each section carries the device
name and the date (`device`, `date`, and `machine` from `bench.run`).

`bench.run` runs this only where CUDA is available (default device "cuda"). With `device="cpu"` and
`SMOKE` sizes it is a smoke test of the code path (`tests/test_bench_gpu.py`,
`python -m bench.gpu device=cpu smoke=true`); CPU figures say nothing about a GPU.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from bench.common import (
    CLASSES,
    CLIP_SECONDS,
    TOPK,
    DistillBatch,
    count_flops,
    cpu_name,
    distill_batch,
    distill_step,
    measure,
    noise,
    rate,
)
from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentRecipe, augmented_spectrogram, sample_augment_params
from ced_lightning.core.ensemble import ensemble_probabilities
from ced_lightning.models import create_ced
from ced_lightning.models.ced import LogMelFrontEnd

MODELS = ("ced_mini", "ced_base")
REPLAY_TOLERANCE_DB = 0.01
# Tiny sizes for a smoke run of the whole code path on the CPU (seconds on 2 cores).
SMOKE: dict[str, Any] = {
    "batch_size": 2,
    "clip_seconds": 1.0,
    "models": ("ced_tiny", "ced_mini"),
    "model_overrides": {"depth": 2},
    "repeats": 1,
    "matmul_n": 512,
}


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (CUDA only; CPU calls return when done)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_on(
    fn: Callable[[], Any], device: torch.device, *, repeats: int, number: int = 1
) -> dict[str, float]:
    """`bench.common.measure` with the device synchronised before each clock reading."""
    return measure(fn, repeats=repeats, warmup=2, number=number, sync=partial(synchronize, device))


def matmul_tflops(device: torch.device, n: int, repeats: int) -> dict[str, float]:
    """bf16 `[n, n] @ [n, n]ᵀ` rate in TFLOP/s (median, min, max), as `F.linear`: the models' own kernel.

    On CUDA linear and `torch.mm` are the same cuBLAS GEMM; on a CPU without bf16 instructions (AVX2) the
    bf16 `torch.mm` is a fallback several times slower than bf16 linear, which would put MFU above 1.
    """
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    number = 20 if device.type == "cuda" else 1
    seconds = measure_on(lambda: F.linear(a, b), device, repeats=max(repeats, 5), number=number)
    return rate(seconds, 2 * n**3 / 1e12)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def replay_check(device: torch.device, clip_seconds: float, batch_size: int) -> dict[str, Any]:
    """`augmented_spectrogram` (every augmentation field, clips of different lengths, under bf16 autocast as
    in training and extraction) twice on `device`: bit-identical? Also a clip alone against the same clip in
    the batch, and the device against the CPU (information: the max abs difference in dB)."""
    recipe = AugmentRecipe(gain_db=6.0)
    samples = int(clip_seconds * SAMPLE_RATE)
    n = max(2, min(batch_size, 8))
    wave = noise(n, samples, generator=torch.Generator().manual_seed(1))
    lengths = np.linspace(samples // 2, samples, n).astype(np.int64)
    wave[torch.arange(samples)[None, :] >= torch.from_numpy(lengths)[:, None]] = 0.0  # padded batch
    params = sample_augment_params(recipe, 1, 0, np.arange(n), lengths)

    def spectrogram(on: torch.device, rows: slice) -> torch.Tensor:
        front_end = LogMelFrontEnd().to(on)
        with torch.no_grad(), torch.autocast(on.type, dtype=torch.bfloat16):
            return augmented_spectrogram(
                front_end,
                wave[rows].to(on),
                torch.from_numpy(lengths[rows]).to(on),
                params.subset(rows),
                recipe,
            )

    first, second = spectrogram(device, slice(None)), spectrogram(device, slice(None))
    alone = spectrogram(device, slice(0, 1))
    on_cpu = spectrogram(torch.device("cpu"), slice(None))
    diff = float((first.cpu().double() - on_cpu.double()).abs().max())
    return {
        "replay bit-identical on device": bool(torch.equal(first, second)),
        "replay clip bit-identical alone and in batch on device": bool(torch.equal(alone, first[:1])),
        "replay max abs diff device vs CPU (dB)": diff,
        f"replay device within {REPLAY_TOLERANCE_DB} dB of CPU": diff <= REPLAY_TOLERANCE_DB,
    }


def run(
    quick: bool = True,
    device: str | None = None,
    *,
    batch_size: int | None = None,
    clip_seconds: float = CLIP_SECONDS,
    models: Sequence[str] = MODELS,
    model_overrides: Mapping[str, Any] | None = None,
    repeats: int = 10,
    matmul_n: int | None = None,
) -> dict[str, Any]:
    """Figures on `device` (default "cuda"); batch 128 (quick) or 256 (full) unless `batch_size` is given.

    `models` are `create_ced` names (with `model_overrides`, e.g. `{"depth": 2}`): each is timed as a
    student in training and as a teacher alone in extraction, and all of them together as the ensemble.
    """
    dev = torch.device(device or "cuda")
    batch = batch_size or (128 if quick else 256)
    samples = int(clip_seconds * SAMPLE_RATE)
    n = matmul_n or (8192 if dev.type == "cuda" else 1024)
    figure = f"(batch {batch}, {clip_seconds:g} s)"
    results: dict[str, Any] = {
        "device": device_name(dev),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "device": str(dev),
            "batch_size": batch,
            "clip_seconds": clip_seconds,
            "models": list(models),
            "model_overrides": dict(model_overrides or {}),
            "repeats": repeats,
            "matmul_n": n,
            "topk": TOPK,
        },
    }
    peak = matmul_tflops(dev, n, repeats)
    results[f"bf16 matmul TFLOP/s (n={n})"] = peak
    ratios: dict[str, float] = {}

    def mfu(flops: float, seconds: dict[str, float]) -> float:
        # the model's median rate against the best matrix-product rate seen (the card's achievable peak)
        return flops / seconds["median"] / 1e12 / peak["max"]

    recipe = AugmentRecipe()
    inputs = distill_batch(batch, samples, recipe, dev)
    # FLOPs are linear in the batch: counted on a few clips (less memory: SDPA's math backend keeps the
    # attention matrices) and scaled.
    few = min(batch, 8)
    few_inputs, scale = distill_batch(few, samples, recipe, dev), batch / few

    train = partial(distill_step, recipe=recipe, dtype=torch.bfloat16)

    def extract(teachers: list[torch.nn.Module], inputs: DistillBatch) -> None:
        wave, lengths, params, _, _ = inputs
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            ensemble = ensemble_probabilities(teachers, wave, lengths, params, recipe, "mean_prob")
            torch.topk(ensemble, TOPK, dim=-1)

    teachers = []
    for name in models:
        torch.manual_seed(0)
        model = create_ced(name, num_classes=CLASSES, **(model_overrides or {})).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if dev.type == "cuda" else None)
        train_s = measure_on(partial(train, model, optimizer, inputs), dev, repeats=repeats)
        train_flops = count_flops(partial(train, model, optimizer, few_inputs)) * scale
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        model.eval().requires_grad_(False)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        infer_s = measure_on(partial(extract, [model], inputs), dev, repeats=repeats)
        infer_flops = count_flops(partial(extract, [model], few_inputs)) * scale
        results[f"{name} bf16 training clips/s {figure}"] = rate(train_s, batch)
        results[f"{name} bf16 extraction clips/s, one teacher {figure}"] = rate(infer_s, batch)
        ratios[f"{name} training MFU"] = mfu(train_flops, train_s)
        ratios[f"{name} extraction MFU"] = mfu(infer_flops, infer_s)
        teachers.append(model)

    ensemble = "+".join(models)
    ensemble_s = measure_on(partial(extract, teachers, inputs), dev, repeats=repeats)
    ensemble_flops = count_flops(partial(extract, teachers, few_inputs)) * scale
    results[f"ensemble {ensemble} bf16 extraction clips/s {figure}"] = rate(ensemble_s, batch)
    ratios[f"ensemble {ensemble} extraction MFU"] = mfu(ensemble_flops, ensemble_s)
    results.update(replay_check(dev, clip_seconds, batch))
    results["ratios"] = ratios
    return results


if __name__ == "__main__":
    # python -m bench.gpu [device=cpu] [full=true] [smoke=true]: one section, printed, no results file.
    options = dict(arg.partition("=")[::2] for arg in sys.argv[1:])
    truthy = {"1", "true", "yes"}
    sizes = SMOKE if options.pop("smoke", "").lower() in truthy else {}
    full = options.pop("full", "").lower() in truthy
    device = options.pop("device", None)
    if options:
        raise SystemExit(f"unknown arguments {sorted(options)}: use device=..., full=true, smoke=true")
    print(json.dumps(run(quick=not full, device=device, **sizes), indent=2, default=float))
