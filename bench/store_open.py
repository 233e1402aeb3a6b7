"""Open-time cost of the damage checks: `AudioStore.open` and `LogitStore.open` (+ the first `read_epoch`) on
given stores, fastest of N runs, and the two parts that grow with a store: listing the `audio` objects and
the metadata rules (`audio_layout.layout_problem`) at AudioSet scale (31 k shard files, 2 M clips).

    python -m bench.store_open data/demo/train.zarr data/demo/logits.zarr

Run it with the sources before and after a change on the same stores (PYTHONPATH) to compare; results and
their machine go to bench/store_open.md.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def fastest_ms(run: Callable[[], object], repeats: int = 40) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def open_times(url: str) -> str:
    from ced_lightning.store import AudioStore, LogitStore

    if (Path(url) / "block_done").exists():
        opened = fastest_ms(lambda: LogitStore.open(url))
        first = fastest_ms(lambda: LogitStore.open(url).read_epoch(0))
        return f"{url}: LogitStore.open {opened:.1f} ms, with read_epoch(0) {first:.1f} ms"
    clips = len(AudioStore.open(url))
    return f"{url} ({clips} clips): AudioStore.open {fastest_ms(lambda: AudioStore.open(url)):.1f} ms"


def audioset_scale() -> list[str]:
    from ced_lightning.store.audio_layout import layout_problem
    from ced_lightning.store.integrity import list_objects

    lines = []
    with tempfile.TemporaryDirectory() as root:
        shards = Path(root) / "audio" / "c"
        shards.mkdir(parents=True)
        for i in range(31_000):
            (shards / str(i)).touch()
        listed = fastest_ms(lambda: list_objects(root, "audio"), repeats=5)
        lines.append(f"listing 31,000 local shard files: {listed:.0f} ms")
    n = 2_000_000
    lengths = np.full(n, 160_000, np.int64)
    offsets = np.arange(n, dtype=np.int64) * 160_000
    indptr = np.arange(n + 1, dtype=np.int64) * 2
    indices = np.tile(np.array([3, 77], np.int64), n)
    names = [f"Y{i:011d}" for i in range(n)]
    attrs = {"num_clips": n, "num_samples": int(lengths.sum()), "num_classes": 527}
    rules = fastest_ms(
        lambda: layout_problem(attrs, names, lengths, offsets, indptr, indices, n * 160_000), repeats=3
    )
    lines.append(f"metadata rules on 2,000,000 clips: {rules:.0f} ms")
    return lines


if __name__ == "__main__":
    for url in sys.argv[1:]:
        print(open_times(url))
    if importlib.util.find_spec("ced_lightning.store.audio_layout") is not None:  # sources with the checks
        for line in audioset_scale():
            print(line)
