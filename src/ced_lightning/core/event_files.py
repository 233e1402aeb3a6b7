"""Event lists as files, one row or line per event of each audio file, written as the files are processed:
CSV (`.csv`; `.tsv` tab-separated, the layout DCASE's sed_eval and psds_eval read) with the columns
`filename,onset,offset,event_label,score`, or JSON Lines (`.jsonl`), one object per event
`{"filename", "onset", "offset", "event_label", "score"}`. Times in seconds."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import IO

from ced_lightning.core.events import Event

EVENT_COLUMNS = ("filename", "onset", "offset", "event_label", "score")
EVENT_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl")


def event_row(filename: str, event: Event) -> dict[str, str | float]:
    return {
        "filename": filename,
        "onset": event.onset,
        "offset": event.offset,
        "event_label": event.label,
        "score": event.score,
    }


class EventWriter:
    """Writes the events of one audio file after another to `path`, its format chosen by the suffix
    (`EVENT_FILE_SUFFIXES`); a context manager. A file without events writes nothing (its absence from
    the list is the answer)."""

    def __init__(self, path: str | PathLike) -> None:
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in EVENT_FILE_SUFFIXES:
            raise ValueError(
                f"{self.path}: an event list is {', '.join(EVENT_FILE_SUFFIXES)}, not {suffix!r}"
            )
        self.jsonl = suffix == ".jsonl"
        self._handle: IO[str] = self.path.open("w", newline="", encoding="utf-8")
        self._csv = None
        if not self.jsonl:
            self._csv = csv.DictWriter(
                self._handle, fieldnames=EVENT_COLUMNS, delimiter="\t" if suffix == ".tsv" else ","
            )
            self._csv.writeheader()

    def write(self, filename: str, events: Iterable[Event]) -> int:
        """Append `events` of the audio file `filename`; returns how many."""
        count = 0
        for event in events:
            row = event_row(filename, event)
            if self._csv is not None:
                self._csv.writerow(row)
            else:
                self._handle.write(json.dumps(row) + "\n")
            count += 1
        self._handle.flush()
        return count

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> EventWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def read_events(path: str | PathLike) -> list[dict[str, str | float]]:
    """The rows of an event list written by `EventWriter` (onset, offset and score as floats)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        if path.suffix.lower() == ".jsonl":
            rows = [json.loads(line) for line in handle if line.strip()]
        else:
            rows = list(csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    for row in rows:
        for key in ("onset", "offset", "score"):
            row[key] = float(row[key])
    return rows
