"""Inference: one 10 s clip, batch 1, on 1 thread and on all threads, every runtime and precision.

CED-Tiny and CED-Mini from the waveform (front end included) against timm's `mobilenetv3_large_100` on a
128 x 1001 log-mel input (front end excluded, which favours the CNN), each run five ways (`MODES`): eager
PyTorch, `torch.compile`d, eager with dynamic int8 linear layers (`models.quantize_dynamic_int8`), ONNX
Runtime on the file `python -m ced_lightning.export` writes (graph optimisation `ORT_ENABLE_ALL`; for the
CNN, the same exporter) and ONNX Runtime on that file's int8 version (`export quantize=int8`). int8 means
the linear layers only, in both runtimes: all of a transformer's weighted products but the patch
embedding, and only the CNN's classifier (its convolutions stay float32).

At each thread count every model, mode and front end is timed in rounds (`bench.common.measure_interleaved`),
so a slow spell of the shared machine falls on all of them alike and their ratios hold.

Recorded beside the times:
- each model's multiply-accumulates (`bench.common.count_flops`, attention's matrix products included), so
  time ratios read as "work" x "speed per unit of work";
- the CED front end's share of the time, eager and in ONNX Runtime (the front end alone, timed the same way:
  the exported front end is a graph of its own, `ced_lightning.export.DftLogMel`);
- what int8 costs in accuracy: the demo's CED-Tiny teacher (`data/demo/teachers/ced_tiny.ckpt`, 4 blocks,
  made by `make demo`) scored on the demo's test store in every runtime and precision: mAP, the largest
  probability difference from eager float32 and top-1 agreement. The timed CED-Tiny is the full 12-block
  network with random weights (speed does not depend on the weights);
- the goal's figure: the fastest CED-Tiny path at 1 thread against MobileNetV3-large in eager float32 (the
  paper's setting), named with its mAP cost on the demo.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from bench.common import CLASSES, CLIP_SAMPLES, count_flops, measure_interleaved, noise, ratio
from ced_lightning.export import DftLogMel, export_onnx, onnx_session, quantize_onnx_int8, run_onnx
from ced_lightning.models import create_ced, quantize_dynamic_int8
from ced_lightning.models.ced import CED, LogMelFrontEnd
from ced_lightning.models.timm_mel import TIMM_FRONT_END
from ced_lightning.store.audio import AudioStore

CNN = "mobilenetv3_large_100"
CEDS = ("ced_tiny", "ced_mini")
MODES = ("eager float32", "compiled float32", "eager int8", "onnxruntime float32", "onnxruntime int8")
PAPER_MODE = "eager float32"  # the paper's MobileNetV3 setting, what the goal compares with
REPO = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO / "data" / "demo" / "teachers" / "ced_tiny.ckpt"
DEMO_TEST = REPO / "data" / "demo" / "test.zarr"

# A smoke test of the code path (tests/test_bench_inference.py): tiny networks, short clips, one repeat,
# no torch.compile (minutes of compiling on 2 cores).
SMOKE: dict[str, Any] = {
    "ceds": ("ced_tiny",),
    "ced_kwargs": {"depth": 1},
    "cnn": "mobilenetv3_small_050",
    "clip_samples": 16000,
    "repeats": 1,
    "warmup": 0,
    "thread_counts": (1,),
    "modes": ("eager float32", "eager int8", "onnxruntime float32", "onnxruntime int8"),
}


def _inputs(clip_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    wave = noise(1, clip_samples, generator=generator)
    # the log-mel a CNN teacher's front end makes of the same clip: 128 bins x 1001 frames for 10 s
    frames = LogMelFrontEnd(TIMM_FRONT_END).num_frames(clip_samples)
    mel = torch.randn(1, 1, TIMM_FRONT_END.n_mels, frames, generator=generator)
    return wave, mel


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return count_flops(lambda: model(x)) / 2


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    """The float32 ONNX file of a network: `export_onnx` for a CED (front end included), the same exporter
    on the bare module otherwise (a CNN on log-mel, or a front end alone)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(model, CED):
            return export_onnx(model, path, input_kind="waveform")
        program = torch.onnx.export(
            model, (x,), dynamo=True, input_names=["input"], opset_version=18, verbose=False
        )
        program.save(str(path))
    return path


class _OnnxTagger(nn.Module):
    """An exported tagger's onnxruntime session as a module, for the project's one scoring pass
    (`scoring.score_store`): `forward(waveform) -> logits`."""

    def __init__(self, session: Any, num_classes: int) -> None:
        super().__init__()
        self.session = session
        self.num_classes = num_classes

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(run_onnx(self.session, waveform.float().cpu())[0])


def demo_int8_cost(ckpt: Path, store_url: str, folder: Path) -> dict[str, Any]:
    """The checkpoint scored on the labelled store in every runtime and precision but `compiled` (the same
    graph as eager): `{"mAP": {mode: value}, "max |p - eager float32|": {...}, "top-1 agreement with eager
    float32": {...}}`."""
    from ced_lightning.core.metrics import tagging_scores
    from ced_lightning.engines.scoring import score_store
    from ced_lightning.models import load_checkpoint

    model = load_checkpoint(ckpt).model.eval()
    onnx_float = _export(model, torch.empty(0), folder / "demo_float32.onnx")
    onnx_int8 = quantize_onnx_int8(onnx_float, folder / "demo_int8.onnx")
    classes = int(model.num_classes)
    runners = {
        "eager float32": model,
        "eager int8": quantize_dynamic_int8(model),
        "onnxruntime float32": _OnnxTagger(onnx_session(onnx_float), classes),
        "onnxruntime int8": _OnnxTagger(onnx_session(onnx_int8), classes),
    }
    store = AudioStore.open(store_url)
    if not store.has_labels:
        raise ValueError(f"{store_url}: has no labels; the int8 cost needs a labelled store")
    labels = torch.from_numpy(store.label_matrix())
    probabilities, _, _ = score_store(runners, store, device="cpu")
    reference = probabilities["eager float32"]
    result: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "store": str(store_url),
        "clips": len(store),
        "mAP": {},
        "max |p - eager float32|": {},
        "top-1 agreement with eager float32": {},
    }
    for mode, probs in probabilities.items():
        result["mAP"][mode] = float(tagging_scores(probs, labels)["mAP"])
        result["max |p - eager float32|"][mode] = float((probs - reference).abs().max())
        agreement = (probs.argmax(1) == reference.argmax(1)).float().mean()
        result["top-1 agreement with eager float32"][mode] = float(agreement)
    return result


def _runner(mode: str, model: nn.Module, x: torch.Tensor, prepared: dict[str, Any]) -> Callable[[], Any]:
    if mode == "eager float32":
        return lambda: model(x)
    if mode == "compiled float32":
        return lambda: prepared["compiled"](x)
    if mode == "eager int8":
        return lambda: prepared["int8"](x)
    session = prepared[mode]
    feed = {session.get_inputs()[0].name: x.numpy().astype(np.float32)}
    return lambda: session.run(None, feed)


def run(
    quick: bool = True,
    *,
    ceds: Sequence[str] = CEDS,
    ced_kwargs: dict[str, Any] | None = None,
    cnn: str = CNN,
    clip_samples: int = CLIP_SAMPLES,
    repeats: int | None = None,
    warmup: int = 2,
    thread_counts: Sequence[int] | None = None,
    modes: Sequence[str] = MODES,
    demo_ckpt: Path | None = DEMO_CKPT,
    demo_store: str | None = str(DEMO_TEST),
) -> dict[str, Any]:
    repeats = repeats if repeats is not None else (9 if quick else 30)
    thread_counts = sorted(set(thread_counts or {1, os.cpu_count() or 1}))
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"modes: unknown {sorted(unknown)}; choose from {MODES}")
    wave, mel = _inputs(clip_samples)
    networks: dict[str, tuple[nn.Module, torch.Tensor]] = {
        name: (create_ced(name, **(ced_kwargs or {})).eval(), wave) for name in ceds
    }
    networks[cnn] = (timm.create_model(cnn, pretrained=False, num_classes=CLASSES, in_chans=1).eval(), mel)
    macs = {name: _macs(model, x) for name, (model, x) in networks.items()}
    timings: dict[str, Any] = {}
    previous = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prepared: dict[str, dict[str, Any]] = {}
        float_files: dict[str, Path] = {}
        for name, (model, x) in networks.items():
            prepared[name] = {}
            if "compiled float32" in modes:
                prepared[name]["compiled"] = torch.compile(model)
            if "eager int8" in modes:
                prepared[name]["int8"] = quantize_dynamic_int8(model)
            if any(mode.startswith("onnxruntime") for mode in modes):
                float_files[name] = _export(model, x, folder / f"{name}.onnx")
        int8_files = {
            name: quantize_onnx_int8(path, folder / f"{name}_int8.onnx") for name, path in float_files.items()
        }
        front_end_files = {
            name: _export(DftLogMel(networks[name][0].front_end).eval(), wave, folder / f"{name}_fe.onnx")
            for name in ceds
            if "onnxruntime float32" in modes
        }
        try:
            for threads in thread_counts:
                torch.set_num_threads(threads)
                fns: dict[str, Callable[[], Any]] = {}
                for name, (model, x) in networks.items():
                    if "onnxruntime float32" in modes:
                        prepared[name]["onnxruntime float32"] = onnx_session(float_files[name], threads)
                    if "onnxruntime int8" in modes:
                        prepared[name]["onnxruntime int8"] = onnx_session(int8_files[name], threads)
                    for mode in modes:
                        fns[f"{name} {mode}, {threads} thread(s)"] = _runner(mode, model, x, prepared[name])
                for name in ceds:
                    front_end = networks[name][0].front_end
                    fns[f"{name} front end only eager float32, {threads} thread(s)"] = lambda fe=front_end: (
                        fe(wave)
                    )
                    if name in front_end_files:
                        session = onnx_session(front_end_files[name], threads)
                        feed = {session.get_inputs()[0].name: wave.numpy()}
                        key = f"{name} front end only onnxruntime float32, {threads} thread(s)"
                        fns[key] = lambda s=session, f=feed: s.run(None, f)
                with torch.inference_mode():
                    measured = measure_interleaved(fns, repeats=repeats, warmup=warmup)
                timings.update({key: {"seconds": value} for key, value in measured.items()})
        finally:
            torch.set_num_threads(previous)
        demo = None
        if demo_ckpt is not None and demo_store is not None and Path(demo_ckpt).is_file():
            demo = demo_int8_cost(Path(demo_ckpt), demo_store, folder)

    def seconds(name: str, mode: str, threads: int) -> dict[str, float]:
        return timings[f"{name} {mode}, {threads} thread(s)"]["seconds"]

    ratios: dict[str, float] = {}
    gflops: dict[str, float] = {}
    shares: dict[str, float] = {}
    for threads in thread_counts:
        for mode in modes:
            for name in ceds:
                ratios[f"{name} / {cnn} time, {mode}, {threads} thread(s)"] = ratio(
                    seconds(name, mode, threads), seconds(cnn, mode, threads)
                )
            for name in networks:
                median = seconds(name, mode, threads)["median"]
                gflops[f"{name} {mode}, {threads} thread(s)"] = 2 * macs[name] / median / 1e9
        for name in ceds:
            for mode in ("eager float32", "onnxruntime float32"):
                key = f"{name} front end only {mode}, {threads} thread(s)"
                if mode in modes and key in timings:
                    shares[f"{name} front end / whole, {mode}, {threads} thread(s)"] = ratio(
                        timings[key]["seconds"], seconds(name, mode, threads)
                    )
    for name in ceds:
        ratios[f"{name} / {cnn} multiply-accumulates"] = macs[name] / macs[cnn]
    # Every model, runtime and precision against the paper's setting at the same thread count: the
    # side-by-side table of bench/performance.md (`bench.readme.inference_table`).
    relative: dict[str, float] = {}
    if PAPER_MODE in modes:
        for threads in thread_counts:
            for mode in modes:
                for name in networks:
                    relative[f"{name} {mode}, {threads} thread(s)"] = ratio(
                        seconds(name, mode, threads), seconds(cnn, PAPER_MODE, threads)
                    )
    if PAPER_MODE in modes and ceds:
        one = min(thread_counts)
        fastest = min(modes, key=lambda mode: seconds(ceds[0], mode, one)["median"])
        ratios[_goal_key(ceds[0], fastest, cnn, one, demo)] = ratio(
            seconds(ceds[0], fastest, one), seconds(cnn, PAPER_MODE, one)
        )
    result: dict[str, Any] = {
        "multiply-accumulates (G)": {name: value / 1e9 for name, value in macs.items()},
        "timings": timings,
        "achieved GFLOP/s": gflops,
        "front end share of the time": shares,
        f"time / {cnn} {PAPER_MODE}": relative,
    }
    result["int8 cost on the demo test set"] = demo or {
        "not measured": f"no {demo_ckpt}: run `make demo` first (it trains the demo's CED-Tiny teacher)"
    }
    result["ratios"] = ratios
    return result


def _goal_key(name: str, mode: str, cnn: str, threads: int, demo: dict[str, Any] | None) -> str:
    """The goal's ratio, named with the path it took and that path's mAP on the demo (float32's beside)."""
    if demo is not None and mode in demo["mAP"]:
        cost = f"demo test mAP {demo['mAP'][mode]:.4f}, eager float32 {demo['mAP']['eager float32']:.4f}"
    elif "int8" in mode:
        cost = "mAP cost not measured: no demo checkpoint"
    else:
        cost = "float32: no mAP cost"
    return f"{name} fastest path: {mode} ({cost}) / {cnn} {PAPER_MODE} time, {threads} thread(s)"
