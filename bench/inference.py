"""Inference: one 10 s clip, batch 1, on 1 thread and on all threads.

CED-Tiny and CED-Mini from the waveform (front end included) against timm's `mobilenetv3_large_100` on a
128 x 1001 log-mel input (front end excluded, which favours the CNN), three ways each: eager PyTorch,
`torch.compile`d, and ONNX Runtime on the file `python -m ced_lightning.export` writes (for the CNN, the same
exporter). Each model's multiply-accumulates (`bench.common.count_flops`, attention's matrix products
included) are recorded too, so the time ratios can be read as "work" x "speed per unit of work".
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

from bench.common import CLASSES, CLIP_SAMPLES, count_flops, measure, noise, ratio
from ced_lightning.export import export_onnx, onnx_session
from ced_lightning.models import create_ced
from ced_lightning.models.ced import LogMelFrontEnd
from ced_lightning.models.timm_mel import TIMM_FRONT_END

CNN = "mobilenetv3_large_100"
CEDS = ("ced_tiny", "ced_mini")
MODES = ("eager", "compiled", "onnxruntime")


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    wave = noise(1, CLIP_SAMPLES, generator=generator)
    # the log-mel a CNN teacher's front end makes of the same clip: 128 bins x 1001 frames
    frames = LogMelFrontEnd(TIMM_FRONT_END).num_frames(CLIP_SAMPLES)
    mel = torch.randn(1, 1, TIMM_FRONT_END.n_mels, frames, generator=generator)
    return wave, mel


def _networks() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    wave, mel = _inputs()
    networks = {name: (create_ced(name).eval(), wave) for name in CEDS}
    cnn = timm.create_model(CNN, pretrained=False, num_classes=CLASSES, in_chans=1).eval()
    networks[CNN] = (cnn, mel)
    return networks


def _macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return count_flops(lambda: model(x)) / 2


def _onnx_runner(name: str, model: torch.nn.Module, x: torch.Tensor, folder: Path, threads: int):
    path = folder / f"{name}.onnx"
    if not path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name in CEDS:
                export_onnx(model, path, input_kind="waveform")
            else:
                program = torch.onnx.export(
                    model, (x,), dynamo=True, input_names=["input"], opset_version=18, verbose=False
                )
                program.save(str(path))
    session = onnx_session(path, threads=threads)
    feed = {session.get_inputs()[0].name: x.numpy().astype(np.float32)}
    return lambda: session.run(None, feed)


def run(quick: bool = True) -> dict[str, Any]:
    repeats = 5 if quick else 20
    timings: dict[str, Any] = {}
    thread_counts = sorted({1, os.cpu_count() or 1})
    previous = torch.get_num_threads()
    networks = _networks()
    compiled = {name: torch.compile(model) for name, (model, _) in networks.items()}
    macs = {name: _macs(model, x) for name, (model, x) in networks.items()}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for name, (model, x) in networks.items():
                    runners = {
                        "eager": lambda m=model, x=x: m(x),
                        "compiled": lambda m=compiled[name], x=x: m(x),
                        "onnxruntime": _onnx_runner(name, model, x, Path(tmp), threads),
                    }
                    for mode, fn in runners.items():
                        with torch.inference_mode():
                            timings[f"{name} {mode}, {threads} thread(s)"] = {
                                "seconds": measure(fn, repeats=repeats, warmup=2)
                            }
    finally:
        torch.set_num_threads(previous)
    ratios, gflops = {}, {}
    for threads in thread_counts:
        for mode in MODES:
            cnn = timings[f"{CNN} {mode}, {threads} thread(s)"]["seconds"]
            for name in CEDS:
                ced = timings[f"{name} {mode}, {threads} thread(s)"]["seconds"]
                ratios[f"{name} / {CNN} time, {mode}, {threads} thread(s)"] = ratio(ced, cnn)
            for name in networks:
                seconds = timings[f"{name} {mode}, {threads} thread(s)"]["seconds"]["median"]
                gflops[f"{name} {mode}, {threads} thread(s)"] = 2 * macs[name] / seconds / 1e9
    for name in CEDS:
        ratios[f"{name} / {CNN} multiply-accumulates"] = macs[name] / macs[CNN]
    return {
        "multiply-accumulates (G)": {name: value / 1e9 for name, value in macs.items()},
        "timings": timings,
        "achieved GFLOP/s": gflops,
        "ratios": ratios,
    }
