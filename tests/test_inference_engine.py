"""The inference engine's plug points: an output is one subclass of `PredictionSink` that overrides only what
it uses, and the writers `OutputPlan` opens are handed back one by one, so a writer that cannot open still
leaves the ones before it to be abandoned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.engines.inference import (
    OutputPlan,
    PredictionSink,
    TagsWriter,
    WindowBatch,
    WindowsWriter,
    segment_starts,
    tag_files,
)
from ced_lightning.engines.output_files import OutputWriteError

CLASS_NAMES = ["dog", "cat", "bird", "rain"]


class WindowCounts(PredictionSink):
    """An output of its own: how many windows each file had. It overrides only `add_windows` and `close`."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.closed = False

    def add_windows(self, windows: WindowBatch) -> None:
        self.counts[windows.file] = self.counts.get(windows.file, 0) + len(windows.spans)

    def close(self) -> None:
        self.closed = True


def test_a_new_output_is_one_subclass_that_overrides_what_it_uses(tmp_path: Path, tiny_model) -> None:
    rng = np.random.default_rng(0)
    lengths = {"short.wav": 3000, "long.wav": 9000}
    for name, samples in lengths.items():
        sf.write(tmp_path / name, (0.1 * rng.standard_normal(samples)).astype(np.float32), SAMPLE_RATE)
    paths = [tmp_path / name for name in lengths]
    counts, windows = WindowCounts(), WindowsWriter(tmp_path / "windows.jsonl", 2, CLASS_NAMES)
    results, failures = tag_files(
        tiny_model,
        paths,
        topk=2,
        class_names=CLASS_NAMES,
        segment_seconds=2000 / SAMPLE_RATE,
        hop_seconds=1000 / SAMPLE_RATE,
        sinks=[counts, windows],
        device="cpu",
    )
    windows.close()
    assert not failures and [r["file"] for r in results] == [str(p) for p in paths]
    expected = {str(tmp_path / n): len(segment_starts(s, 2000, 1000)) for n, s in lengths.items()}
    assert counts.counts == expected == {str(tmp_path / "short.wav"): 2, str(tmp_path / "long.wav"): 8}
    rows = [json.loads(line) for line in (tmp_path / "windows.jsonl").read_text().splitlines()]
    assert len(rows) == sum(expected.values())  # the other writer saw the same windows
    counts.abandon()  # a failed run: the base class closes what it does not know how to remove
    assert counts.closed


def test_a_writer_that_cannot_open_leaves_the_earlier_ones_to_abandon(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the windows file's folder should be")
    plan = OutputPlan(
        ["tags", "windows"], output=tmp_path / "tags.jsonl", windows_output=blocker / "windows.csv"
    )
    opened: list[Any] = []
    with pytest.raises(OutputWriteError, match="windows_output"):
        opened.extend(plan.open(2, CLASS_NAMES))
    assert [type(sink) for sink in opened] == [TagsWriter]
    for sink in opened:
        sink.abandon()
    assert not (tmp_path / "tags.jsonl").exists()  # nothing empty is left behind
