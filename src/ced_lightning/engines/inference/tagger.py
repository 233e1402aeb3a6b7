"""The streaming tagger: files decoded block by block and cut into windows, windows batched (consecutive
windows of equal length, across files), tagged, and handed to the sinks as they are done; files finished in
input order with their clip tags.

Windows of different lengths are not zero-padded together by default: CED averages over all its time tokens,
so padding would change a window's tags depending on its batch neighbours (`length_tolerance_s` trades that
for speed). A file's clip tags combine its windows' logits by the model's own rule for the pieces of a long
clip (`CEDConfig.piece_average`), so a file of at most one window gets exactly the model's tags for the
whole file.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import Any

import torch
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE, AudioDecodeError, AudioStream
from ced_lightning.core.device import default_device
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.objective import check_objective, probabilities_from_logits
from ced_lightning.engines.inference.windows import (
    DECODE_BLOCK_FRAMES,
    PieceAverage,
    check_windows,
    run_model,
    stream_windows,
    window_samples,
)
from ced_lightning.engines.inference.writers import PredictionSink, WindowBatch, top_labels

log = logging.getLogger(__name__)


def _span_seconds(start: int, end: int) -> tuple[float, float]:
    return round(start / SAMPLE_RATE, 4), round(end / SAMPLE_RATE, 4)


@dataclass
class Failure:
    """A file that could not be tagged: its path, and why (naming the file)."""

    path: str
    reason: str


@dataclass
class _File:
    index: int
    path: str
    average: PieceAverage
    num_samples: int = 0
    queued: int = 0  # windows handed to the batcher
    done: int = 0  # windows tagged
    all_queued: bool = False
    failed: bool = False


@dataclass
class _Window:
    file: _File
    start: int
    samples: torch.Tensor


@dataclass
class _Tagger:
    """The streaming loop's state: windows wait in `pending` (consecutive, of lengths within `tolerance`)
    until a batch is full; files are finished in input order once all their windows are tagged."""

    model: nn.Module
    device: torch.device
    batch_size: int
    tolerance: int
    embeddings: bool
    topk: int
    class_names: Sequence[str]
    objective: str
    sinks: Sequence[PredictionSink]
    on_result: Callable[[dict[str, Any]], None]
    on_failure: Callable[[Failure], None]
    pending: list[_Window] = field(default_factory=list)
    open_files: deque[_File] = field(default_factory=deque)

    def add(self, window: _Window) -> None:
        length = window.samples.shape[-1]
        if self.pending and abs(length - self.pending[0].samples.shape[-1]) > self.tolerance:
            self.flush()
        window.file.queued += 1
        self.pending.append(window)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = [w for w in self.pending if not w.file.failed], []
        if not batch:
            return
        try:
            outputs = [run_model(self.model, [w.samples for w in batch], self.device, self.embeddings)]
            groups = [batch]
        except Exception as err:  # one file (or its batch) failing must not cost the others their tags
            if len(batch) > 1:
                log.warning("a batch of %d windows failed (%s); tagging them one by one", len(batch), err)
            outputs, groups = [], []
            for window in batch:
                if window.file.failed:
                    continue
                try:
                    outputs.append(run_model(self.model, [window.samples], self.device, self.embeddings))
                    groups.append([window])
                except Exception as single_err:
                    reason = f"{window.file.path}: the model failed on it ({_first_line(single_err)})"
                    self.fail(window.file, reason)
        for (logits, embedded), windows in zip(outputs, groups, strict=True):
            self._dispatch(windows, logits, embedded)
        self.finish_ready()

    def _dispatch(self, windows: list[_Window], logits: torch.Tensor, embedded: torch.Tensor | None) -> None:
        row = 0
        while row < len(windows):  # runs of one file's windows
            file, end = windows[row].file, row
            while end < len(windows) and windows[end].file is file:
                end += 1
            if not file.failed:
                file.average.add(logits[row:end])
                file.done += end - row
                spans = [_span_seconds(w.start, w.start + w.samples.shape[-1]) for w in windows[row:end]]
                tagged = WindowBatch(
                    file.index,
                    file.path,
                    spans,
                    probabilities_from_logits(logits[row:end], self.objective),
                    None if embedded is None else embedded[row:end],
                )
                for sink in self.sinks:
                    sink.add_windows(tagged)
            row = end

    def finish_ready(self) -> None:
        while self.open_files and (self.open_files[0].failed or self._complete(self.open_files[0])):
            file = self.open_files.popleft()
            if file.failed:
                continue
            result = {
                "file": file.path,
                "duration_s": round(file.num_samples / SAMPLE_RATE, 4),
                "labels": top_labels(
                    probabilities_from_logits(file.average.logits(), self.objective),
                    self.topk,
                    self.class_names,
                ),
            }
            for sink in self.sinks:
                sink.add_file(file.index, result)
            self.on_result(result)

    @staticmethod
    def _complete(file: _File) -> bool:
        return file.all_queued and file.done == file.queued

    def fail(self, file: _File, reason: str) -> None:
        if file.failed:
            return
        file.failed = True
        log.error("cannot tag: %s", reason)
        for sink in self.sinks:
            sink.discard(file.index, file.path)
        self.on_failure(Failure(file.path, reason))


def tag_files(
    model: nn.Module,
    paths: Sequence[str | PathLike],
    *,
    topk: int = 5,
    class_names: Sequence[str],
    objective: str = "multi_label",
    batch_size: int = 8,
    length_tolerance_s: float = 0.0,
    segment_seconds: float | None = None,
    hop_seconds: float | None = None,
    embeddings: bool = False,
    sinks: Sequence[PredictionSink] = (),
    device: torch.device | str | None = None,
    on_progress: Callable[[int], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Tag `paths`, streamed; returns (clip results in input order, failures). A file that cannot be decoded,
    or on which the model fails (a failed batch is retried window by window), is a failure, never an
    exception, so one bad file does not stop the others.

    Each file is cut into windows of `segment_seconds` (default: the model's own piece,
    `model_piece_samples`) every `hop_seconds` (default: the window length);
    windows are tagged in batches and handed to `sinks` (`TagsWriter`, `WindowsWriter`, `EmbeddingsWriter`,
    `TimelineCharts`) as they are done, with embeddings when `embeddings` (the model's `forward_and_embed`).
    Each clip result: `{"file", "duration_s", "labels": [{"index", "name", "probability"}, ...]}`, its logits
    the windows' combined by the model's `piece_average` rule (`PieceAverage`); `on_result` sees each as its
    file is finished. Probabilities are the model's `objective`'s (`objective.probabilities_from_logits`:
    sigmoids, or one softmax for a single-label model, the checkpoint's `objective`).
    """
    if len(class_names) != int(model.num_classes):
        raise InputError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    check_windows(segment_seconds, hop_seconds, batch_size)
    if embeddings and not hasattr(model, "forward_and_embed"):
        raise ConfigError(
            f"outputs=embeddings: {type(model).__name__} has no forward_and_embed (CED and timm taggers do)"
        )
    segment, hop = window_samples(model, segment_seconds, hop_seconds)
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    piece_average = getattr(getattr(model, "config", None), "piece_average", "probability")
    results: list[dict[str, Any]] = []
    failures: list[Failure] = []

    def finished(result: dict[str, Any]) -> None:
        results.append(result)
        if on_result:
            on_result(result)
        if on_progress:
            on_progress(1)

    def failed(failure: Failure) -> None:
        failures.append(failure)
        if on_progress:
            on_progress(1)

    tagger = _Tagger(
        model=model,
        device=device,
        batch_size=batch_size,
        tolerance=max(0, round(length_tolerance_s * SAMPLE_RATE)),
        embeddings=embeddings,
        topk=topk,
        class_names=class_names,
        objective=check_objective(objective),
        sinks=sinks,
        on_result=finished,
        on_failure=failed,
    )
    for index, path in enumerate(paths):
        file = _File(index, str(path), PieceAverage(piece_average))
        tagger.open_files.append(file)
        try:
            with AudioStream(path, block_frames=DECODE_BLOCK_FRAMES) as stream:
                for start, samples in stream_windows(stream, segment, hop):
                    file.num_samples = max(file.num_samples, start + len(samples))
                    tagger.add(_Window(file, start, torch.from_numpy(samples.copy())))
                    if file.failed:  # the model failed on one of its windows
                        break
        except AudioDecodeError as err:
            tagger.fail(file, str(err))
        file.all_queued = True
        tagger.finish_ready()
    tagger.flush()
    tagger.finish_ready()
    return results, failures


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
