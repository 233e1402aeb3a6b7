"""Progress of long stages as log lines, for output that is not a terminal.

Every long stage (prepare, the teacher check and evaluation, extraction and its verification, import_logits,
training and validation batches, predict, the demo's stores) advances a `ProgressLog`. Where stdout or stderr
is a log file or a pipe, it logs `stage: done/total unit (pct), rate, time left` through `logging` at most
every `CED_PROGRESS_SECONDS` seconds (default 30) and once at the end, so a slow run can be told from a hung
one. On a terminal it logs nothing: the rich progress bars are there.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from types import TracebackType

log = logging.getLogger(__name__)

PROGRESS_SECONDS_ENV = "CED_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


def progress_seconds() -> float:
    """The interval between progress lines: `CED_PROGRESS_SECONDS` (0 logs every step), default 30 s."""
    value = os.environ.get(PROGRESS_SECONDS_ENV)
    if value is None or not value.strip():
        return DEFAULT_PROGRESS_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(
            f"{PROGRESS_SECONDS_ENV}={value!r}: give the seconds between progress lines"
        ) from None
    if not seconds >= 0:
        raise ValueError(f"{PROGRESS_SECONDS_ENV}={value!r}: the seconds between progress lines must be >= 0")
    return seconds


def output_is_terminal() -> bool:
    """Whether both stdout (Hydra's log lines) and stderr (the rich bars, ced-predict's log) are terminals."""
    return all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))


def format_duration(seconds: float) -> str:
    """`42 s`, `12 min 5 s`, `3 h 20 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def format_progress(
    stage: str, done: int, total: float | None, unit: str, rate: float | None, took: float | None = None
) -> str:
    """`extract: 1200/4096 clip-epochs (29.3%), 41.2 clip-epochs/s, 1 min 10 s left`; without a total
    (a stream of unknown length) the count and the rate only; with `took` (the closing line) the stage's
    wall time instead of the time left."""
    known = total is not None and math.isfinite(total) and total > 0
    count = f"{done}/{int(total)} {unit} ({100.0 * done / total:.1f}%)" if known else f"{done} {unit}"
    parts = [f"{stage}: {count}"]
    if rate is not None and rate > 0:
        parts.append(f"{rate:.0f} {unit}/s" if rate >= 100 else f"{rate:.3g} {unit}/s")
        if known and took is None:
            parts.append(f"{format_duration(max(0.0, total - done) / rate)} left")
    if took is not None:
        parts.append(f"took {format_duration(took)}")
    return ", ".join(parts)


class ProgressLog:
    """Counts a stage's work and logs it where the output is not a terminal (`format_progress`): at most
    every `seconds` (default `progress_seconds()`), and at `close` (or the end of a `with` block that ended
    without an error) when this run did anything.

    `done` counts work finished before this run (a resumed store): it is in the count, not in the rate.
    `enabled` forces the lines on or off (default: `not output_is_terminal()`)."""

    def __init__(
        self,
        stage: str,
        total: int | float | None,
        *,
        unit: str = "items",
        done: int = 0,
        seconds: float | None = None,
        enabled: bool | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.done = self._start_done = int(done)
        self.seconds = progress_seconds() if seconds is None else float(seconds)
        self.enabled = not output_is_terminal() if enabled is None else bool(enabled)
        self.logger = logger or log
        self._started = self._last = time.monotonic()
        self._logged_done = self.done

    def rate(self) -> float | None:
        """Units per second since this run started (None before any)."""
        elapsed = time.monotonic() - self._started
        work = self.done - self._start_done
        return work / elapsed if work > 0 and elapsed > 0 else None

    def line(self, finished: bool = False) -> str:
        took = time.monotonic() - self._started if finished else None
        return format_progress(self.stage, self.done, self.total, self.unit, self.rate(), took)

    def advance(self, n: int = 1) -> None:
        self.done += int(n)
        if self.enabled and time.monotonic() - self._last >= self.seconds:
            self._log()

    def close(self) -> None:
        """The closing line (count, rate, wall time) when this run did anything."""
        if self.enabled and self.done > self._start_done:
            self._log(finished=True)

    def _log(self, finished: bool = False) -> None:
        self.logger.info(self.line(finished))
        self._last, self._logged_done = time.monotonic(), self.done

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.close()
