"""Device and precision policy, one place for every command: where a run computes and in which precision."""

from __future__ import annotations

from typing import Any

import torch


def default_device() -> torch.device:
    """A CUDA device where one is visible, else the CPU (predict, evaluate, the Python API)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu(accelerator: str) -> bool:
    """Whether `trainer.accelerator` will run on a CUDA device (`auto`: where one is visible)."""
    return accelerator in {"gpu", "cuda"} or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: Any, accelerator: str) -> Any:
    """`auto`: bf16-mixed where a CUDA device will be used, full 32-bit on the CPU."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if on_gpu(accelerator) and torch.cuda.is_bf16_supported() else "32-true"


def reduced_precision(precision: str | None, device: torch.device | str) -> bool:
    """Whether teachers run at `precision` (Lightning's string) on `device` compute below float32: 16-bit
    formats, or float32 matmuls in TF32 on CUDA (`torch.set_float32_matmul_precision`). A replay can then
    differ by about 1% of a probability instead of float round-off."""
    precision = str(precision or "32-true")
    if not any(bits in precision for bits in ("32", "64")):
        return True
    return torch.device(device).type == "cuda" and torch.get_float32_matmul_precision() != "highest"
