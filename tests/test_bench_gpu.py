"""The GPU benchmark section's code path on the CPU with tiny sizes: real models, augmentation and losses."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _is_rate(value: Any) -> bool:
    return isinstance(value, dict) and all(
        math.isfinite(value[k]) and value[k] > 0 for k in ("median", "min", "max")
    )


def test_gpu_section_runs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))  # `bench` is a top-level package beside `tests`, not installed
    gpu = importlib.import_module("bench.gpu")
    SMOKE = gpu.SMOKE
    results = gpu.run(device="cpu", **SMOKE)
    assert results["device"] and results["date"]
    assert results["config"]["device"] == "cpu" and results["config"]["batch_size"] == SMOKE["batch_size"]
    names = [*SMOKE["models"], "ensemble ced_tiny+ced_mini"]
    figures = {key: value for key, value in results.items() if isinstance(value, dict) and "median" in value}
    assert len(figures) == 1 + 2 * len(SMOKE["models"]) + 1
    assert all(_is_rate(value) for value in figures.values()), figures
    assert any(key.startswith("bf16 matmul TFLOP/s") for key in figures)
    for name in names:
        assert any(key.startswith(f"{name} bf16 extraction clips/s") for key in figures), name
    ratios = results["ratios"]
    assert len(ratios) == 2 * len(SMOKE["models"]) + 1
    assert all(0.0 < mfu < 1.5 for mfu in ratios.values()), ratios
    assert results["replay bit-identical on device"] is True
    assert results["replay clip bit-identical alone and in batch on device"] is True
    assert results["replay max abs diff device vs CPU (dB)"] == 0.0
