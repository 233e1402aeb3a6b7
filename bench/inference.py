"""Inference: one 10 s clip, batch 1, on 1 thread and on all threads.

CED-Tiny and CED-Mini from the waveform (front end included), eager and `torch.compile`d, against timm's
`mobilenetv3_large_100` on a 128 x 1001 log-mel input (front end excluded, which favours the CNN).
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch

from bench.common import measure, ratio
from ced_lightning.models import create_ced


def _models(compile_: bool) -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    wave = torch.randn(1, 160_000) * 0.1
    mel = torch.randn(1, 1, 128, 1001)
    models: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    for name in ("ced_tiny", "ced_mini"):
        models[f"{name} eager"] = (create_ced(name).eval(), wave)
    models["mobilenetv3_large_100 eager"] = (
        timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=527, in_chans=1).eval(),
        mel,
    )
    if compile_:
        for name in list(models):
            model, x = models[name]
            models[name.replace("eager", "compiled")] = (torch.compile(model), x)
    return models


def run(quick: bool = True) -> dict[str, Any]:
    repeats = 5 if quick else 20
    results: dict[str, Any] = {}
    thread_counts = sorted({1, os.cpu_count() or 1})
    previous = torch.get_num_threads()
    models = _models(compile_=True)
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for name, (model, x) in models.items():
                with torch.inference_mode():
                    results[f"{name}, {threads} thread(s)"] = {
                        "seconds": measure(lambda m=model, x=x: m(x), repeats=repeats, warmup=2)
                    }
    finally:
        torch.set_num_threads(previous)
    ratios = {}
    for threads in thread_counts:
        for mode in ("eager", "compiled"):
            cnn = results[f"mobilenetv3_large_100 {mode}, {threads} thread(s)"]["seconds"]
            for name in ("ced_tiny", "ced_mini"):
                ced = results[f"{name} {mode}, {threads} thread(s)"]["seconds"]
                ratios[f"{name} / mobilenetv3_large_100 time, {mode}, {threads} thread(s)"] = ratio(ced, cnn)
    return {"timings": results, "ratios": ratios}
