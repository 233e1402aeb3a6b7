"""Sound events in time as an output of the inference engine: a file's frame probabilities at the model's
own resolution (`CED.forward_frames`, one per 160 ms token column), the event list (`core.events`) and its
file (`core.event_files`), written by `EventsWriter`, one `PredictionSink` beside the others.

The frames of a file come from the whole decoded file on one column grid, not from the tagger's windows:
windows of `segment_seconds` need not start on a column, and the model's own pieces (63 columns) differ
from its 1012-frame tagging windows, so per-window frames would not be the model's frames of the file. The
log-mel of the whole file is computed once and run through the encoder a few pieces at a time
(`frame_probabilities`), which gives exactly the columns of `forward_frames` on the whole file while the
encoder's memory stays that of `pieces_per_call` pieces (the waveform and its log-mel are held: about 16 MB
per minute of audio).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE, load_audio
from ced_lightning.core.errors import ConfigError
from ced_lightning.core.event_files import EVENT_COLUMNS, EVENT_FILE_SUFFIXES, EventWriter
from ced_lightning.core.events import Event, detect_events
from ced_lightning.core.objective import probabilities_from_logits
from ced_lightning.engines.inference.writers import PredictionSink
from ced_lightning.engines.output_files import discard_file, remove_output

EVENTS_KEY = "events_output"


@dataclass(frozen=True)
class EventSettings:
    """The post-processing of `detect_events`: `threshold` (one, or one per class), `median_window`
    (columns, odd; 1: none), `fill_gap` (inactive columns bridged), `min_frames` (shortest event)."""

    threshold: float | Sequence[float] = 0.5
    median_window: int = 1
    fill_gap: int = 0
    min_frames: int = 1

    def check(self, num_classes: int | None = None) -> None:
        values = [self.threshold] if isinstance(self.threshold, int | float) else list(self.threshold)
        if not values or any(not 0.0 <= float(v) <= 1.0 for v in values):
            raise ConfigError(
                f"event_threshold (--event-threshold)={self.threshold}: probabilities in [0, 1], one or one "
                "per class"
            )
        if num_classes is not None and len(values) not in (1, num_classes):
            raise ConfigError(
                f"event_threshold (--event-threshold): {len(values)} values for a model with {num_classes} "
                "classes; give one, or one per class"
            )
        if self.median_window < 1 or self.median_window % 2 == 0:
            raise ConfigError(
                f"median_window (--median-window)={self.median_window}: an odd number of columns (1: none)"
            )
        if self.fill_gap < 0 or self.min_frames < 1:
            raise ConfigError(
                f"fill_gap={self.fill_gap}, min_frames={self.min_frames}: fill_gap >= 0 and min_frames >= 1"
            )


def parse_thresholds(text: str) -> float | list[float]:
    """`--event-threshold`: "0.5" (every class) or "0.3,0.6,..." (one per class)."""
    values = [float(part) for part in text.split(",")]
    return values[0] if len(values) == 1 else values


def check_event_model(model: nn.Module) -> None:
    """Events need frame outputs: CED's token columns; a model without them (a timm teacher) is refused."""
    if not hasattr(model, "forward_frames_spectrogram"):
        raise ConfigError(
            f"--events (events_output): {type(model).__name__} has no frame outputs; sound events need a "
            "CED model"
        )


def is_event_file_we_wrote(first_line: str) -> bool:
    """Whether an event list's first line is one `EventWriter` writes (its CSV or TSV header, or a JSON
    line of one event): such a file may be replaced by a rerun."""
    if first_line in (",".join(EVENT_COLUMNS), "\t".join(EVENT_COLUMNS)):
        return True
    try:
        row = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(row, dict) and set(EVENT_COLUMNS) == row.keys()


def check_event_suffix(path: str | PathLike) -> None:
    if Path(path).suffix.lower() not in EVENT_FILE_SUFFIXES:
        raise ConfigError(f"{EVENTS_KEY}={path}: use a {', '.join(EVENT_FILE_SUFFIXES)} file name")


@torch.inference_mode()
def frame_probabilities(
    model: nn.Module, waveform: torch.Tensor, pieces_per_call: int = 8, objective: str = "multi_label"
) -> torch.Tensor:
    """The probabilities of `model.forward_frames(waveform[None])[0]` (sigmoids; a single-label model's
    `objective`: a softmax per column): `[columns, classes]` float32 on the CPU, for a `[samples]` waveform of
    any length. The log-mel is cut on piece boundaries (whole pieces, plus the frames the last column of a
    chunk reads) so each chunk's columns are the whole file's columns."""
    device = next(model.parameters()).device
    mel = model.front_end(waveform.reshape(1, -1).to(device))
    stride, patch = model.config.patch_stride, model.config.patch_size
    step = model.time_pos_embed.shape[-1] * stride * max(1, pieces_per_call)
    frames, start, chunks = mel.shape[-1], 0, []
    while True:
        chunks.append(model.forward_frames_spectrogram(mel[..., start : start + step + patch - stride])[0])
        if start + step + patch > frames:  # no whole column starts beyond this chunk
            break
        start += step
    return probabilities_from_logits(torch.cat(chunks), objective).cpu()


def file_events(
    model: nn.Module,
    waveform: torch.Tensor,
    class_names: Sequence[str],
    settings: EventSettings,
    pieces_per_call: int = 8,
    objective: str = "multi_label",
) -> list[Event]:
    """The events of one decoded `[samples]` waveform (16 kHz), offsets capped at its end."""
    return detect_events(
        frame_probabilities(model, waveform, pieces_per_call, objective),
        model.column_seconds,
        class_names,
        settings.threshold,
        settings.median_window,
        settings.fill_gap,
        settings.min_frames,
        duration=len(waveform) / SAMPLE_RATE,
    )


class EventsWriter(PredictionSink):
    """The event list of every file, appended as each file is finished (`EventWriter`: .csv, .tsv,
    .jsonl). `latest` holds the last file's events for the timeline chart drawn after it."""

    def __init__(
        self,
        path: str | PathLike,
        model: nn.Module,
        class_names: Sequence[str],
        settings: EventSettings,
        pieces_per_call: int = 8,
        objective: str = "multi_label",
    ) -> None:
        check_event_model(model)
        self.path, self.model, self.class_names = Path(path), model, class_names
        self.settings, self.pieces_per_call, self.objective = settings, pieces_per_call, objective
        self.latest: tuple[int, list[Event]] | None = None
        self.files = self.events = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = EventWriter(self.path)
        except OSError as err:
            raise remove_output(self.path, EVENTS_KEY, err, removed=False) from err

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        waveform = load_audio(result["file"])
        events = file_events(
            self.model, waveform, self.class_names, self.settings, self.pieces_per_call, self.objective
        )
        try:
            self.events += self.writer.write(result["file"], events)
        except OSError as err:
            self.writer.close()
            raise remove_output(self.path, EVENTS_KEY, err, discard_file(self.path)) from err
        self.latest = (index, events)
        self.files += 1

    def events_of(self, index: int) -> list[Event]:
        return self.latest[1] if self.latest is not None and self.latest[0] == index else []

    def close(self) -> None:
        self.writer.close()

    def abandon(self) -> None:
        self.close()
        if self.files == 0:
            discard_file(self.path)
