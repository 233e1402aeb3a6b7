"""GPU (only where CUDA is available): bf16 training and extraction speed with model FLOP utilisation.

The card's achievable rate is measured here too (a large bf16 matrix product), so MFU is relative to what
this card does, not to its data sheet. Each figure records the device and date (`machine` in the results).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ced_lightning.augment import AugmentRecipe, augmented_spectrogram, sample_augment_params
from ced_lightning.losses import distill_loss
from ced_lightning.models import create_ced
from ced_lightning.targets import rebuild_targets


def _cuda_time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / _cuda_time(lambda: a @ b, 20) / 1e12


def _model_flops(model: torch.nn.Module, wave: torch.Tensor, backward: bool) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = model(wave)
        if backward:
            out.float().sum().backward()
    return float(counter.get_total_flops())


def run(quick: bool = True) -> dict[str, Any]:
    peak = matmul_tflops()
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "bf16 matmul TFLOP/s": peak}
    ratios = {}
    batch = 128 if quick else 256
    recipe = AugmentRecipe()
    for name in ("ced_mini", "ced_base"):
        model = create_ced(name).cuda()
        wave = torch.randn(batch, 160_000, device="cuda") * 0.1
        lengths = torch.full((batch,), 160_000, device="cuda")
        params = sample_augment_params(recipe, 0, 0, np.arange(batch), np.full(batch, 160_000))
        indices = torch.randint(0, 527, (batch, 20), device="cuda")
        probs = torch.rand(batch, 20, device="cuda")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(
            model=model,
            wave=wave,
            lengths=lengths,
            params=params,
            optimizer=optimizer,
            indices=indices,
            probs=probs,
        ) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                mel = augmented_spectrogram(model.front_end, wave, lengths, params, recipe)
                logits = model.forward_spectrogram(mel)
            loss = distill_loss("kl", logits, rebuild_targets(indices, probs, 527), 1.0).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def infer(model=model, wave=wave) -> None:
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(wave)

        train_s, infer_s = _cuda_time(step, 10), _cuda_time(infer, 10)
        train_flops = _model_flops(model, wave[:8], backward=True) / 8 * batch
        infer_flops = _model_flops(model, wave[:8], backward=False) / 8 * batch
        results[f"{name} bf16 training clips/s (batch {batch}, 10 s)"] = batch / train_s
        results[f"{name} bf16 extraction clips/s per teacher (batch {batch}, 10 s)"] = batch / infer_s
        ratios[f"{name} training MFU"] = train_flops / train_s / 1e12 / peak
        ratios[f"{name} extraction MFU"] = infer_flops / infer_s / 1e12 / peak
    results["ratios"] = ratios
    return results
