"""Where tagged windows and finished files go: one interface (`PredictionSink`) that the streaming tagger
calls, and the writers of `predict`'s outputs: clip tags (`TagsWriter`), per-window tags (`WindowsWriter`) and
per-window embeddings (`EmbeddingsWriter`); the timeline charts are in `charts`. A new kind of output is one
new `PredictionSink` subclass.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ced_lightning.core.errors import ConfigError
from ced_lightning.engines.output_files import EMBEDDINGS_STORE_KIND, discard_file, remove_output

log = logging.getLogger(__name__)

EMBEDDINGS_FORMATS = ("npy", "zarr")


def top_labels(probs: torch.Tensor, k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The `k` most probable classes of `probs [C]`, best first: `{"index", "name", "probability"}` with the
    probability rounded to 6 decimals, as every output writes them."""
    values, indices = probs.topk(min(k, probs.shape[-1]))
    return [
        {"index": int(i), "name": class_names[int(i)], "probability": round(float(v), 6)}
        for v, i in zip(values, indices, strict=True)
    ]


@dataclass
class WindowBatch:
    """Tagged windows of one file, in order: spans in seconds, probabilities `[n, C]`, embeddings `[n, D]`."""

    index: int
    file: str
    spans: list[tuple[float, float]]
    probs: torch.Tensor
    embeddings: torch.Tensor | None


class PredictionSink:
    """Where results go as they are made: the one interface the tagger calls, and the base of every output
    (each method does nothing until a subclass says otherwise). Per file: `add_windows` (any number of times,
    in order), then `add_file` with the clip result, or `discard` when the file failed part-way. At the end of
    the run `close`, or `abandon` when the run failed."""

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


class _TableFile(PredictionSink):
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
            labels = top_labels(probs, self.topk, self.class_names)
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


class EmbeddingsWriter(PredictionSink):
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
