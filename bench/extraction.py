"""Extraction: clips/s of `python -m ced_lightning.extract` for a 1-, 2- and 3-teacher ensemble (CED-Tiny,
CED-Mini and a MobileNetV3 on 128-bin log-mel: three architectures, two front ends), and the scaling from 1 to
2 processes (DDP, gloo on the CPU) for the 1-teacher case. Each figure is the real command in a subprocess,
read from the store's `extract_stats.json`: `steady_clips_per_s`, the rate after each rank's first block
summed over the ranks (so starting processes, the process group and the first read are out), and
`clips_per_s` over the whole of `trainer.predict` for comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import CLASSES, TOPK, write_noise_audio_store
from ced_lightning.models import TimmMelClassifier, create_ced, model_spec, save_ced


def _teachers(root: Path) -> list[Path]:
    torch.manual_seed(0)
    paths = []
    for name in ("ced_tiny", "ced_mini"):
        path = root / f"{name}.pt"
        save_ced(create_ced(name, num_classes=CLASSES), path)
        paths.append(path)
    cnn = TimmMelClassifier("mobilenetv3_large_100", num_classes=CLASSES)
    path = root / "mobilenet.ckpt"
    torch.save(
        {"model_spec": model_spec(cnn), "state_dict": {f"model.{k}": v for k, v in cnn.state_dict().items()}},
        path,
    )
    paths.append(path)
    return paths


def _extract(
    audio: str, out: str, teachers: list[Path], devices: int, clip_seconds: float, block_clips: int
) -> dict[str, Any]:
    members = ",".join(f"{{name:t{i},checkpoint:'{p}'}}" for i, p in enumerate(teachers))
    args = [
        f"audio_store={audio}",
        f"output={out}",
        f"teacher.members=[{members}]",
        "epochs=1",
        f"topk={TOPK}",
        f"clip_seconds={clip_seconds}",
        f"block_clips={block_clips}",
        "trainer.accelerator=cpu",
        f"trainer.devices={devices}",
        f"strategy={'ddp' if devices > 1 else 'auto'}",
        f"hydra.run.dir={Path(out).parent}/hydra_{Path(out).stem}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // devices))}
    subprocess.run(
        [sys.executable, "-m", "ced_lightning.extract", *args], check=True, env=env, capture_output=True
    )
    return json.loads((Path(out) / "extract_stats.json").read_text())


def run(quick: bool = True) -> dict[str, Any]:
    clips, seconds = (128, 3.0) if quick else (1024, 10.0)
    block_clips = clips // 8  # 4 blocks per rank with 2 processes: 3 of them timed in steady state
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        audio = str(root / "audio.zarr")
        write_noise_audio_store(audio, clips, seconds)
        teachers = _teachers(root)
        rates, whole = {}, {}
        for n in (1, 2, 3):
            stats = _extract(audio, str(root / f"t{n}.zarr"), teachers[:n], 1, seconds, block_clips)
            rates[f"{n} teacher(s), 1 process"] = stats["steady_clips_per_s"]
            whole[f"{n} teacher(s), 1 process"] = stats["clips_per_s"]
        stats = _extract(audio, str(root / "ddp.zarr"), teachers[:1], 2, seconds, block_clips)
        rates["1 teacher, 2 processes"] = stats["steady_clips_per_s"]
        whole["1 teacher, 2 processes"] = stats["clips_per_s"]
    one = rates["1 teacher(s), 1 process"]
    return {
        "config": {
            "clips": clips,
            "block_clips": block_clips,
            "clip_seconds": seconds,
            "teachers": ["ced_tiny", "ced_mini", "mobilenet"],
        },
        "steady clips/s (after each rank's first block)": rates,
        "clips/s over the whole run": whole,
        "ratios": {
            "2-teacher / 1-teacher clips/s": rates["2 teacher(s), 1 process"] / one,
            "3-teacher / 1-teacher clips/s": rates["3 teacher(s), 1 process"] / one,
            "2 processes / 1 process steady clips/s (1 teacher)": rates["1 teacher, 2 processes"] / one,
        },
    }
