"""Tag audio files with a trained model, streamed: clip tags, per-window tags (a sound-event timeline) and
per-window embeddings.

    python -m ced_lightning.predict ckpt=model.ckpt 'inputs=[clip.wav,folder/]' topk=5 output=tags.jsonl
    python -m ced_lightning.predict ckpt=ced_mini 'inputs=[field.flac]' 'outputs=[tags,windows,embeddings]'

Each file is decoded block by block (`AudioStream`) and cut into `segment_seconds` windows every `hop_seconds`
(the last one ends at the file's end; a file shorter than a window is one window), so a recording of hours
needs the memory of one decoded block and one batch of windows. Windows' rows are written as they are tagged;
a file's clip tags combine its windows' logits by the model's own rule for the pieces of a long clip
(`CEDConfig.piece_average`), so a file of at most one window gets exactly the model's tags for the whole file.

Consecutive windows of equal length (across files) share a batch. Windows of different lengths are not
zero-padded together by default: CED averages over all its time tokens, so padding would change a window's
tags depending on its batch neighbours (`length_tolerance_s` trades that for speed).
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import IO, Any, Protocol

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

import ced_lightning
from ced_lightning.core.audio import SAMPLE_RATE, AudioDecodeError, AudioStream
from ced_lightning.core.errors import ConfigError, InputError, MissingInputError
from ced_lightning.core.labels import resolve_class_names
from ced_lightning.core.progress import ProgressLog
from ced_lightning.data.batching import pad_batch
from ced_lightning.data.sources import describe_extensions, scan_audio_files
from ced_lightning.engines.device import default_device
from ced_lightning.engines.launch import command_errors
from ced_lightning.engines.output_files import (
    EMBEDDINGS_STORE_KIND,
    check_embeddings_store,
    check_output_file,
    check_output_folder,
    discard_file,
    remove_output,
)
from ced_lightning.models.ced import PIECE_AVERAGES

log = logging.getLogger(__name__)

OUTPUTS = ("tags", "windows", "embeddings")
# Files of more frames than this are decoded and resampled in blocks of this many (24 s at 44.1 kHz): windows
# need no more, and a 2-hour file is tagged in about 100 MB above the model's own memory (measured by
# tests/test_predict_stream.py). Shorter files are decoded whole, exactly as `load_audio` decodes them.
DECODE_BLOCK_FRAMES = 1 << 20
EMBEDDINGS_FORMATS = ("npy", "zarr")

# --------------------------------------------------------------------------------------------- batching


@torch.inference_mode()
def run_model(
    model: nn.Module, waveforms: Sequence[torch.Tensor], device: torch.device, embeddings: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits `[B, C]` and, with `embeddings`, the pooled embeddings `[B, D]` (float32, CPU) of one batch."""
    batch = pad_batch(waveforms)[0].to(device)
    if embeddings:
        logits, embedded = model.forward_and_embed(batch)
        return logits.float().cpu(), embedded.float().cpu()
    return model(batch).float().cpu(), None


# --------------------------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Iterable[str | PathLike]) -> list[Path]:
    """Files as given, and the audio files found in folders (`scan_audio_files`: recursive, sorted, no
    dotfiles) in every format the installed libsndfile reads (`AUDIO_EXTENSIONS`, as `prepare`).

    A path that does not exist raises `FileNotFoundError` naming it: a typo should not silently tag nothing.
    A symlink that leads nowhere (dangling, or a loop) is kept, and fails as such when it is decoded.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = scan_audio_files(path)
            if not found:
                log.warning("inputs: %s contains no audio files (%s)", path, describe_extensions())
            files.extend(found)
        elif os.path.lexists(path):  # a symlink loop or dangling link too: its failure will say which
            files.append(path)
        else:
            raise MissingInputError(f"inputs: {path} does not exist")
    return files


# --------------------------------------------------------------------------------------------- windows


def model_piece_samples(model: nn.Module, fallback_seconds: float = 10.0) -> int:
    """The longest input `model` runs as one piece: CED's `target_length` frames (1012 frames of 10 ms:
    161,919 samples, 10.12 s), so a file of that length is tagged whole, as the model tags it; models without
    pieces (timm taggers) `fallback_seconds`."""
    length = getattr(getattr(model, "config", None), "target_length", None)
    front_end = getattr(getattr(model, "front_end", None), "config", None)
    if length is None or front_end is None:
        return round(fallback_seconds * SAMPLE_RATE)
    hop = int(front_end.hop_length)
    if front_end.center:  # frames = n // hop + 1
        return int(length) * hop - 1
    return (int(length) - 1) * hop + int(front_end.n_fft) + hop - 1  # frames = (n - n_fft) // hop + 1


def segment_starts(num_samples: int, segment: int, hop: int) -> list[int]:
    """Start samples of the windows: every `hop`, the last one ending at the clip's end.

    A clip shorter than one segment is a single segment (the whole clip).
    """
    if num_samples <= segment:
        return [0]
    starts = list(range(0, num_samples - segment + 1, hop))
    if starts[-1] + segment < num_samples:
        starts.append(num_samples - segment)
    return starts


def stream_windows(stream: AudioStream, segment: int, hop: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start sample, samples) of each window of `segment_starts`, cut from the stream's pieces as they
    arrive: at most one window and one decoded piece are held. The length comes from the stream (exact once
    its first piece is read); should the decoder deliver less than the header promised, the windows stop at
    the real end, the last one shorter.
    """
    pieces = iter(stream)
    buffered = next(pieces, None)  # samples [position, position + len(buffered)) of the file
    if buffered is None:
        return
    position, total = 0, stream.num_samples

    def drop_before(start: int) -> None:
        nonlocal buffered, position
        cut = min(max(0, start - position), len(buffered))
        buffered, position = buffered[cut:], position + cut

    for start in segment_starts(total, segment, hop):
        end = min(start + segment, total)
        drop_before(start)
        while position + len(buffered) < end:
            piece = next(pieces, None)
            if piece is None:
                break
            buffered = np.concatenate([buffered, piece])
            drop_before(start)  # windows further apart than their length (hop > segment) skip audio
        window = buffered[: end - start]
        if position != start or not len(window):
            return
        yield start, window
        if len(window) < end - start:
            return
    for _ in pieces:  # the stream's checks at its end (all zeros, silence) still run
        pass


class PieceAverage:
    """Running `average_pieces` (models/ced.py) over the logits of a file's windows, in O(classes) memory:
    "probability" keeps log-sum-exps of log p and log (1 - p), "logit" a sum. One window is its own logits,
    bit for bit, so a file of one window gets the model's tags for the whole file."""

    def __init__(self, how: str = "probability") -> None:
        if how not in PIECE_AVERAGES:
            raise ConfigError(f"piece_average must be one of {list(PIECE_AVERAGES)}, not {how!r}")
        self.how, self.count = how, 0
        self.first: torch.Tensor | None = None
        self.positive: torch.Tensor | None = None  # logsumexp log p, or the sum of logits
        self.negative: torch.Tensor | None = None

    def add(self, logits: torch.Tensor) -> None:
        """Add `[windows, classes]` logits."""
        if not len(logits):
            return
        if self.first is None:
            self.first = logits[0].clone()
        self.count += len(logits)
        if self.how == "logit":
            total = logits.double().sum(0)
            self.positive = total if self.positive is None else self.positive + total
            return
        positive = torch.logsumexp(F.logsigmoid(logits), 0)
        negative = torch.logsumexp(F.logsigmoid(-logits), 0)
        self.positive = positive if self.positive is None else torch.logaddexp(self.positive, positive)
        self.negative = negative if self.negative is None else torch.logaddexp(self.negative, negative)

    def logits(self) -> torch.Tensor:
        if self.first is None:
            raise ValueError("no windows were added")
        if self.count == 1:
            return self.first
        if self.how == "logit":
            return (self.positive / self.count).to(self.first.dtype)
        return self.positive - self.negative


# --------------------------------------------------------------------------------------------- outputs


def _top(probs: torch.Tensor, k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.shape[-1]))
    return [
        {"index": int(i), "name": class_names[int(i)], "probability": round(float(v), 6)}
        for v, i in zip(values, indices, strict=True)
    ]


def _span(start: int, end: int) -> tuple[float, float]:
    return round(start / SAMPLE_RATE, 4), round(end / SAMPLE_RATE, 4)


@dataclass
class WindowBatch:
    """Tagged windows of one file, in order: spans in seconds, probabilities `[n, C]`, embeddings `[n, D]`."""

    index: int
    file: str
    spans: list[tuple[float, float]]
    probs: torch.Tensor
    embeddings: torch.Tensor | None


class PredictionSink(Protocol):
    """Where results go as they are made. Per file: `add_windows` (any number of times, in order), then
    `add_file` with the clip result, or `discard` when the file failed part-way."""

    def add_windows(self, windows: WindowBatch) -> None: ...

    def add_file(self, index: int, result: dict[str, Any]) -> None: ...

    def discard(self, index: int, file: str) -> None: ...

    def close(self) -> None: ...


class _Sink:
    def add_windows(self, windows: WindowBatch) -> None:
        pass

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        pass

    def discard(self, index: int, file: str) -> None:
        pass

    def close(self) -> None:
        pass

    def abandon(self) -> None:
        """The run failed: close, and leave no file that holds nothing."""
        self.close()


def check_table_suffix(path: str | PathLike, key: str) -> str:
    """The format of a tags or windows file from its name: "jsonl" (`.jsonl`, `.json`) or "csv"."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    raise ConfigError(f"{key}={path}: use a .jsonl or .csv file name")


CSV_COLUMNS = ["file", "start_s", "end_s", "rank", "index", "name", "probability"]


def is_table_we_wrote(first_line: str) -> bool:
    """Whether a tags or windows file's first line is one this module writes (its CSV header, or a JSON
    line of a file's tags): such a file may be replaced by a rerun."""
    if first_line == ",".join(CSV_COLUMNS):
        return True
    try:
        row = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(row, dict) and {"file", "labels"} <= row.keys()


class _TableFile(_Sink):
    """A tags or windows table, a file or a stream, flushed after each write. A file that cannot be written
    (read-only folder, full disk) is removed and named in one `OutputWriteError`."""

    def __init__(self, path: str | PathLike | IO[str], key: str) -> None:
        self.key, self.rows = key, 0
        self.path = Path(path) if isinstance(path, str | PathLike) else None
        if self.path is None:
            self.handle, self.kind, self.owned = path, "jsonl", False  # a stream (stdout): JSON lines
        else:
            self.kind, self.owned = check_table_suffix(path, key), True
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                newline = "" if self.kind == "csv" else None
                self.handle = open(path, "w", newline=newline, encoding="utf-8")  # noqa: SIM115 (kept open)
            except OSError as err:
                raise remove_output(self.path, key, err, removed=False) from err
        if self.kind == "csv":
            self.writer = csv.writer(self.handle)
            self._write(lambda: self.writer.writerow(CSV_COLUMNS))

    def _write(self, write: Callable[[], Any]) -> None:
        try:
            write()
            self.handle.flush()
        except OSError as err:
            if self.path is None:
                raise
            self._close_quietly()
            raise remove_output(self.path, self.key, err, discard_file(self.path)) from err

    def _close_quietly(self) -> None:
        with contextlib.suppress(OSError):  # the buffered rest cannot be written either (full disk)
            self.handle.close()

    def close(self) -> None:
        if self.owned:
            self.handle.close()

    def abandon(self) -> None:
        if self.owned:
            self._close_quietly()
            if self.rows == 0:
                discard_file(self.path)


class TagsWriter(_TableFile):
    """Clip tags, one file at a time as each is finished: JSON lines (`{"file", "duration_s", "labels"}`) or
    CSV (`file,start_s,end_s,rank,index,name,probability` with empty start and end)."""

    def __init__(self, path: str | PathLike | IO[str]) -> None:
        super().__init__(path, "output")

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        if self.kind == "jsonl":
            self._write(lambda: self.handle.write(json.dumps(result, ensure_ascii=False) + "\n"))
        else:
            rows = [
                [result["file"], "", "", rank, label["index"], label["name"], label["probability"]]
                for rank, label in enumerate(result["labels"], start=1)
            ]
            self._write(lambda: self.writer.writerows(rows))
        self.rows += 1


class WindowsWriter(_TableFile):
    """Per-window top-k tags (the sound-event timeline), appended as windows are tagged: CSV rows
    `file,start_s,end_s,rank,index,name,probability` or JSON lines `{"file", "start_s", "end_s",
    "labels"}`."""

    def __init__(self, path: str | PathLike | IO[str], topk: int, class_names: Sequence[str]) -> None:
        self.topk, self.class_names = topk, class_names
        super().__init__(path, "windows_output")

    def add_windows(self, windows: WindowBatch) -> None:
        lines: list[str] = []
        rows: list[list[Any]] = []
        for (start, end), probs in zip(windows.spans, windows.probs, strict=True):
            labels = _top(probs, self.topk, self.class_names)
            if self.kind == "jsonl":
                row = {"file": windows.file, "start_s": start, "end_s": end, "labels": labels}
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            else:
                rows.extend(
                    [windows.file, start, end, rank, label["index"], label["name"], label["probability"]]
                    for rank, label in enumerate(labels, start=1)
                )
        if self.kind == "jsonl":
            self._write(lambda: self.handle.writelines(lines))
        else:
            self._write(lambda: self.writer.writerows(rows))
        self.rows += len(windows.spans)


def output_name(index: int, file: str) -> str:
    # The index keeps names unique when two folders hold files of the same name.
    return f"{index:04d}_{Path(file).stem}"


def timeline_png_name(index: int, file: str) -> str:
    return output_name(index, file) + ".png"


class _NpyAppender:
    """A `.npy` file `[rows, width]` float32 grown row block by row block: numpy leaves room in the header
    for the row count to grow (`GROWTH_AXIS_MAX_DIGITS`), so it is rewritten in place after each block."""

    def __init__(self, path: Path, width: int) -> None:
        self.path, self.width, self.rows = path, width, 0
        self.handle = path.open("wb")
        self.data_offset = self._write_header()

    def _write_header(self) -> int:
        self.handle.seek(0)
        header = {"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.width)}
        np.lib.format.write_array_header_1_0(self.handle, header)
        return self.handle.tell()

    def append(self, rows: np.ndarray) -> None:
        self.handle.seek(0, os.SEEK_END)
        self.handle.write(np.ascontiguousarray(rows, dtype="<f4").tobytes())
        self.rows += len(rows)
        if self._write_header() != self.data_offset:  # numpy's growth room is 21 digits: never
            raise RuntimeError(f"{self.path}: the .npy header changed size")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


class EmbeddingsWriter(_Sink):
    """Per-window embeddings, appended as windows are tagged. `npy`: `<folder>/<index>_<stem>.npy`
    `[windows, D]` float32 per file, row i the file's i-th window (the spans in the windows output).
    `zarr`: one group per file in the store at `path`, arrays `embedding [windows, D]` and `span_s
    [windows, 2]` (start, end in seconds), attribute `file`. A file that fails part-way is removed."""

    def __init__(self, path: str | PathLike, embeddings_format: str = "npy") -> None:
        if embeddings_format not in EMBEDDINGS_FORMATS:
            raise ConfigError(f"embeddings_format={embeddings_format}: use one of {list(EMBEDDINGS_FORMATS)}")
        self.format, self.path = embeddings_format, str(path)
        self.open: dict[int, Any] = {}
        self.files: dict[int, str] = {}  # of the open targets
        self.created, self.written = not Path(self.path).exists(), 0
        try:
            if embeddings_format == "npy":
                Path(self.path).mkdir(parents=True, exist_ok=True)
                self.root = None
            else:
                import zarr

                self.root = zarr.open_group(self.path, mode="a")
                # The store is this command's: a rerun may replace its groups (`check_embeddings_store`).
                self.root.attrs["kind"] = EMBEDDINGS_STORE_KIND
        except OSError as err:
            raise remove_output(Path(self.path), "embeddings_output", err, removed=False) from err

    def add_windows(self, windows: WindowBatch) -> None:
        try:
            self._add_windows(windows)
        except OSError as err:
            self.discard(windows.index, windows.file)
            where = Path(self.path) / output_name(windows.index, windows.file)
            raise remove_output(where, "embeddings_output", err, removed=True) from err

    def _add_windows(self, windows: WindowBatch) -> None:
        if windows.embeddings is None:
            raise ValueError("outputs=embeddings: the windows were tagged without embeddings")
        rows = windows.embeddings.numpy().astype(np.float32)
        name = output_name(windows.index, windows.file)
        target = self.open.get(windows.index)
        self.files[windows.index] = windows.file
        if self.root is None:
            if target is None:
                target = self.open[windows.index] = _NpyAppender(
                    Path(self.path) / f"{name}.npy", rows.shape[1]
                )
            target.append(rows)
            return
        if target is None:
            if name in self.root:  # left by an earlier run into the same store
                del self.root[name]
            group = self.root.create_group(name, attributes={"file": windows.file})
            width = rows.shape[1]
            embedding = group.create_array(
                "embedding", shape=(0, width), chunks=(256, width), dtype="float32"
            )
            spans = group.create_array("span_s", shape=(0, 2), chunks=(4096, 2), dtype="float64")
            target = self.open[windows.index] = (embedding, spans)
        target[0].append(rows, axis=0)
        target[1].append(np.asarray(windows.spans, dtype=np.float64).reshape(-1, 2), axis=0)

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        target = self.open.pop(index, None)
        if isinstance(target, _NpyAppender):
            target.close()
        self.written += 1

    def discard(self, index: int, file: str) -> None:
        target = self.open.pop(index, None)
        name = output_name(index, file)
        try:
            if isinstance(target, _NpyAppender):
                target.close()
                target.path.unlink(missing_ok=True)
            elif self.root is not None and name in self.root:
                del self.root[name]
        except OSError:  # the file system refuses even this (read-only): the failure itself is reported
            log.warning("embeddings_output: could not remove the incomplete %s", name)

    def abandon(self) -> None:
        for index in list(self.open):
            self.discard(index, self.files[index])
        if self.created and not self.written:
            shutil.rmtree(self.path, ignore_errors=True)

    def close(self) -> None:
        for target in self.open.values():
            if isinstance(target, _NpyAppender):
                target.close()
        self.open.clear()


class TimelineCharts(_Sink):
    """One PNG per file of its top classes' probabilities over its windows (`plot_timeline`). Holds the
    file's windows' probabilities until the file is done (windows x classes float32)."""

    def __init__(self, folder: str | PathLike, class_names: Sequence[str], num_classes: int = 5) -> None:
        self.folder, self.class_names, self.num_classes = Path(folder), class_names, num_classes
        self.pending: dict[int, tuple[list[tuple[float, float]], list[torch.Tensor]]] = {}
        self.written = 0

    def add_windows(self, windows: WindowBatch) -> None:
        spans, probs = self.pending.setdefault(windows.index, ([], []))
        spans.extend(windows.spans)
        probs.append(windows.probs)

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        spans, probs = self.pending.pop(index)
        top = [label["index"] for label in result["labels"][: self.num_classes]]
        png = self.folder / timeline_png_name(index, result["file"])
        plot_timeline(png, result["file"], spans, torch.cat(probs), top, self.class_names)
        self.written += 1

    def discard(self, index: int, file: str) -> None:
        self.pending.pop(index, None)


def plot_timeline(
    path: str | PathLike,
    file: str,
    spans: Sequence[tuple[float, float]],
    probs: torch.Tensor,
    classes: Sequence[int],
    class_names: Sequence[str],
) -> None:
    """PNG of `classes`' probabilities `probs [windows, C]` over time (a line per class at window centres)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(start + end) / 2 for start, end in spans]
    fig, axis = plt.subplots(figsize=(max(6.0, min(20.0, 0.3 * len(centres))), 3.5), dpi=100)
    for c in classes:
        axis.plot(centres, probs[:, c].tolist(), marker="o", markersize=3, label=class_names[c])
    axis.set_ylim(0.0, 1.0)
    axis.set_xlabel("time (s)")
    axis.set_ylabel("probability")
    axis.set_title(Path(file).name)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: keep lines visible
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------- tagging


@dataclass
class Failure:
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
                spans = [_span(w.start, w.start + w.samples.shape[-1]) for w in windows[row:end]]
                tagged = WindowBatch(
                    file.index,
                    file.path,
                    spans,
                    torch.sigmoid(logits[row:end]),
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
                "labels": _top(torch.sigmoid(file.average.logits()), self.topk, self.class_names),
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


def check_windows(segment_seconds: float | None, hop_seconds: float | None, batch_size: int) -> None:
    """The window and batch settings, checked before anything is loaded."""
    for key, value in (("segment_seconds", segment_seconds), ("hop_seconds", hop_seconds)):
        if value is not None and value <= 0:
            raise ConfigError(f"{key} must be > 0 (or null: the default), got {value}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")


def window_samples(
    model: nn.Module, segment_seconds: float | None, hop_seconds: float | None
) -> tuple[int, int]:
    """(window, hop) in samples for `model`. Refused: a window shorter than one of the model's STFT windows
    (a spectrogram of one frame; 1e-5 s asked for 400,000 windows of a 4 s clip), and a hop longer than the
    window (the audio between windows would be tagged by none, without a word)."""
    segment = model_piece_samples(model) if segment_seconds is None else round(segment_seconds * SAMPLE_RATE)
    front_end = getattr(getattr(model, "front_end", None), "config", None)
    shortest = int(getattr(front_end, "n_fft", 1))
    if segment < shortest:
        raise ConfigError(
            f"segment_seconds={segment_seconds}: shorter than one STFT window of the model ({shortest} "
            f"samples, {shortest / SAMPLE_RATE:g} s); use segment_seconds >= {shortest / SAMPLE_RATE:g}"
        )
    hop = segment if hop_seconds is None else max(1, round(hop_seconds * SAMPLE_RATE))
    if hop > segment:
        skipped = (hop - segment) / SAMPLE_RATE
        raise ConfigError(
            f"hop_seconds={hop_seconds} is longer than the window ({segment / SAMPLE_RATE:g} s): "
            f"{skipped:g} s of every {hop / SAMPLE_RATE:g} s ({100 * (hop - segment) / hop:.0f}%) would be "
            "tagged by no window. Use hop_seconds <= segment_seconds"
        )
    return segment, hop


def tag_files(
    model: nn.Module,
    paths: Sequence[str | PathLike],
    *,
    topk: int = 5,
    class_names: Sequence[str],
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
    file is finished.
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


# --------------------------------------------------------------------------------------------- command


def predict_files(
    ckpt: str,
    inputs: Sequence[str | PathLike],
    *,
    topk: int = 5,
    outputs: Sequence[str] = ("tags",),
    output: str | PathLike | None = None,
    windows_output: str | PathLike | None = None,
    embeddings_output: str | PathLike | None = None,
    embeddings_format: str = "npy",
    timeline_dir: str | PathLike | None = None,
    segment_seconds: float | None = None,
    hop_seconds: float | None = None,
    batch_size: int = 8,
    length_tolerance_s: float = 0.0,
    device: str = "auto",
    quantize: str | None = None,
    progress_min_files: int = 20,
    print_tags: bool = True,
    overwrite: bool = False,
) -> list[Failure]:
    """Load `ckpt` (a path or a released model's name), tag `inputs` (files and folders) and write the
    requested `outputs`: "tags" to `output` (`.jsonl`, `.csv`, or "-" for JSON lines on stdout), "windows" to
    `windows_output` (`.csv`, `.jsonl`) and PNG charts to `timeline_dir` (when given), "embeddings" to
    `embeddings_output` as `embeddings_format`. Prints each file's tags as it is finished; returns the
    failures. Everything is checked before the checkpoint is read. `quantize="int8"` runs the model's linear
    layers in dynamic int8 (`models.quantize_dynamic_int8`), on the CPU. No output goes inside a Zarr store,
    and an existing file this command did not write is replaced only with `overwrite` (`output_files`)."""
    from ced_lightning.models import QUANTIZE_CHOICES, apply_quantization, load_checkpoint

    if not inputs:
        raise ConfigError("inputs=[FILE_OR_DIR,...] is required")
    unknown = sorted(set(outputs) - set(OUTPUTS))
    if unknown:
        raise ConfigError(f"outputs={list(outputs)}: unknown {unknown}; choose from {list(OUTPUTS)}")
    if topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    to_stdout = output is not None and str(output) == "-"
    if "tags" in outputs and output and not to_stdout:
        check_table_suffix(output, "output")
    if "windows" in outputs:
        if not windows_output:
            raise ConfigError("outputs=[...,windows]: set windows_output=FILE.csv (or .jsonl)")
        check_table_suffix(windows_output, "windows_output")
    if "embeddings" in outputs:
        if not embeddings_output:
            raise ConfigError("outputs=[...,embeddings]: set embeddings_output=FOLDER (npy) or STORE (zarr)")
        if embeddings_format not in EMBEDDINGS_FORMATS:
            raise ConfigError(f"embeddings_format={embeddings_format}: use one of {list(EMBEDDINGS_FORMATS)}")

    if quantize is not None:
        if quantize not in QUANTIZE_CHOICES:
            raise ConfigError(
                f"quantize={quantize!r}: choose null (float32) or one of {list(QUANTIZE_CHOICES)}"
            )
        if device not in ("auto", "cpu"):
            raise ConfigError(f"quantize={quantize} runs on the CPU only (device={device}): use device=cpu")
        device = "cpu"

    check_windows(segment_seconds, hop_seconds, batch_size)
    files = expand_inputs(inputs)  # a missing input is named before a released model is downloaded
    if not files:
        raise ConfigError(
            f"inputs: no audio files in {', '.join(map(str, inputs))} ({describe_extensions()}); nothing "
            "to tag"
        )
    _check_outputs(outputs, output, windows_output, timeline_dir, embeddings_output, embeddings_format,
                   overwrite)  # fmt: skip
    check_model_argument(ckpt)
    checkpoint = load_checkpoint(ckpt)
    model = apply_quantization(checkpoint.model, quantize)
    class_names = resolve_class_names(int(model.num_classes), checkpoint.class_names)
    window_samples(model, segment_seconds, hop_seconds)  # before any output file is opened
    log.info("tagging %d files with %s", len(files), ckpt)

    sinks: list[PredictionSink] = []
    succeeded = False
    try:
        if "tags" in outputs and output:
            sinks.append(TagsWriter(sys.stdout if to_stdout else output))
        if "windows" in outputs:
            sinks.append(WindowsWriter(windows_output, topk, class_names))
            if timeline_dir:
                sinks.append(TimelineCharts(timeline_dir, class_names, topk))
        if "embeddings" in outputs:
            sinks.append(EmbeddingsWriter(embeddings_output, embeddings_format))

        def show(result: dict[str, Any]) -> None:
            if print_tags and not to_stdout:
                tags = ", ".join(f"{label['name']} {label['probability']:.3f}" for label in result["labels"])
                print(f"{result['file']}: {tags}", flush=True)

        kwargs: dict[str, Any] = dict(
            topk=topk,
            class_names=class_names,
            batch_size=batch_size,
            length_tolerance_s=length_tolerance_s,
            segment_seconds=segment_seconds,
            hop_seconds=hop_seconds,
            embeddings="embeddings" in outputs,
            sinks=sinks,
            device=None if device == "auto" else device,
            on_result=show,
        )
        logged = ProgressLog("predict", len(files), unit="files")
        if len(files) >= progress_min_files:
            from rich.console import Console
            from rich.progress import Progress

            # On stderr: stdout carries the tags (`ced-predict --output -` writes JSON lines there).
            with Progress(transient=True, console=Console(stderr=True)) as progress:
                task = progress.add_task("tagging", total=len(files))
                results, failures = tag_files(
                    model,
                    files,
                    on_progress=lambda n: (progress.advance(task, n), logged.advance(n)),
                    **kwargs,
                )
        else:
            results, failures = tag_files(model, files, on_progress=logged.advance, **kwargs)
        logged.close()
        succeeded = True
    finally:
        for sink in sinks:
            if succeeded:
                sink.close()
            else:  # nothing empty or half written is left behind
                getattr(sink, "abandon", sink.close)()

    written = {
        "tags": output if "tags" in outputs and output and not to_stdout else None,
        "windows": windows_output if "windows" in outputs else None,
        "embeddings": embeddings_output if "embeddings" in outputs else None,
    }
    for what, where in written.items():
        if where:
            log.info("wrote the %s of %d files to %s", what, len(results), where)
    charts = [s for s in sinks if isinstance(s, TimelineCharts)]
    if charts:
        log.info("wrote %d timeline charts to %s", charts[0].written, timeline_dir)
    if failures:
        log.error("%d of %d files could not be tagged", len(failures), len(files))
    return failures


def _check_outputs(
    outputs: Sequence[str],
    output: str | PathLike | None,
    windows_output: str | PathLike | None,
    timeline_dir: str | PathLike | None,
    embeddings_output: str | PathLike | None,
    embeddings_format: str,
    overwrite: bool,
) -> None:
    """Every requested output's place, before the model is read (`output_files`)."""
    if "tags" in outputs and output and str(output) != "-":
        check_output_file(output, "output", overwrite, is_table_we_wrote)
    if "windows" in outputs:
        check_output_file(windows_output, "windows_output", overwrite, is_table_we_wrote)
        if timeline_dir:
            check_output_folder(timeline_dir, "timeline_dir")
    if "embeddings" in outputs:
        if embeddings_format == "zarr":
            check_embeddings_store(embeddings_output, "embeddings_output")
        else:
            check_output_folder(embeddings_output, "embeddings_output")


def check_model_argument(ckpt: str | PathLike) -> None:
    """A local checkpoint argument that is neither a file nor a released model's name: say both."""
    from ced_lightning.models.released import list_released, released_entry

    text = str(ckpt)
    if released_entry(text) is not None or "://" in text or Path(text).exists():
        return
    raise MissingInputError(
        f"{text}: no such checkpoint file, and not a released model's name (released: "
        f"{', '.join(list_released())})"
    )


def predict(cfg: DictConfig) -> list[Failure]:
    """The `predict` command without Hydra's wrapper: tag, write, plot; returns the failures."""
    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ConfigError(
            "ckpt=PATH is required (a .ckpt of ours, a save_ced file, a released CED .pt or name)"
        )
    inputs = cfg.get("inputs")
    if isinstance(inputs, str):
        inputs = [inputs]
    outputs = cfg.get("outputs", ["tags"])
    if isinstance(outputs, str):
        outputs = [outputs]
    if cfg.get("timeline") is not None:
        raise ConfigError(
            "timeline= is gone: per-window tags are outputs=[tags,windows] with windows_output=FILE.csv, "
            "their charts timeline_dir=FOLDER; segment_seconds/hop_seconds set the windows, and the clip "
            "tags now combine them (docs/using_models.md, 'Streaming')"
        )
    if str(cfg.get("output")) == "-":
        raise ConfigError(
            "output=-: this command logs to stdout too; for JSON lines on stdout use ced-predict --output -"
        )
    hop, segment = cfg.get("hop_seconds"), cfg.get("segment_seconds")
    return predict_files(
        cfg.ckpt,
        list(inputs or []),
        topk=int(cfg.get("topk", 5)),
        outputs=list(outputs),
        output=cfg.get("output"),
        windows_output=cfg.get("windows_output"),
        embeddings_output=cfg.get("embeddings_output"),
        embeddings_format=str(cfg.get("embeddings_format", "npy")),
        timeline_dir=cfg.get("timeline_dir"),
        segment_seconds=None if segment is None else float(segment),
        hop_seconds=None if hop is None else float(hop),
        batch_size=int(cfg.get("batch_size", 8)),
        length_tolerance_s=float(cfg.get("length_tolerance_s", 0.0)),
        device=str(cfg.get("device", "auto")),
        quantize=cfg.get("quantize"),
        progress_min_files=int(cfg.get("progress_min_files", 20)),
        overwrite=bool(cfg.get("overwrite", False)),
    )


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="predict", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    if predict(cfg):
        # After every other file was tagged and written: scripts can still tell that something failed.
        raise SystemExit(1)


if __name__ == "__main__":
    main()
