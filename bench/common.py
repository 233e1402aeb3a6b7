"""Shared by the benchmark sections: timing with repeats, and the result record."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


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
