"""Sound event detection from frame-level probabilities: median filtering along time, thresholds (one for
all classes or one per class), and the event list (onset, offset, label, score) of the active frames.

The frames are the model's token columns (`CED.forward_frames`, `CED.column_seconds` apart, 160 ms for
CED), probabilities `[frames, classes]`. The post-processing is the usual one of DCASE sound event detection
systems: smooth each class's probabilities with a median filter, binarise at a threshold, and turn each run
of consecutive active frames into one event; gaps up to `fill_gap` frames are bridged and runs shorter than
`min_frames` dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Event:
    """One detected event: `onset` and `offset` in seconds from the start of the audio, the class `label`,
    and its `score`, the highest (filtered) probability of the class within the event."""

    onset: float
    offset: float
    label: str
    score: float

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


def per_class(values: float | Sequence[float], num_classes: int, name: str) -> torch.Tensor:
    """One value for every class `[C]` (float64) from one value or a list of `num_classes` values."""
    if isinstance(values, (int, float)):
        return torch.full((num_classes,), float(values), dtype=torch.float64)
    values = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    if values.shape != (num_classes,):
        raise ValueError(f"{name}: expected one value or {num_classes} (one per class), got {len(values)}")
    return values


def median_filter(probs: torch.Tensor, window: int | Sequence[int]) -> torch.Tensor:
    """Median of each class's values over `window` frames centred on each frame, `probs` `[frames,
    classes]` (or `[batch, frames, classes]`); `window` is odd, one for all classes or one per class (1:
    unchanged). The ends repeat the first and last frame (scipy.ndimage's mode="nearest")."""
    squeeze = probs.dim() == 2
    if squeeze:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3:
        raise ValueError(f"median_filter: expected [frames, classes], got shape {tuple(probs.shape)}")
    windows = per_class(window, probs.shape[-1], "median window").long()
    if (windows < 1).any() or (windows % 2 == 0).any():
        raise ValueError(f"median window: odd frame counts >= 1 are needed, got {windows.tolist()}")
    filtered = probs.clone()
    for size in windows.unique().tolist():
        if size == 1:
            continue
        classes = (windows == size).nonzero().flatten()
        selected = probs[..., classes].transpose(1, 2)  # [batch, classes, frames]
        padded = F.pad(selected, (size // 2, size // 2), mode="replicate")
        filtered[..., classes] = padded.unfold(-1, size, 1).median(-1).values.transpose(1, 2)
    return filtered.squeeze(0) if squeeze else filtered


def active_runs(active: torch.Tensor, fill_gap: int = 0, min_frames: int = 1) -> list[tuple[int, int]]:
    """Runs of consecutive True values of a 1-D bool tensor as `(first, last + 1)` frame indices; runs
    separated by at most `fill_gap` inactive frames are merged, runs shorter than `min_frames` dropped."""
    if active.dim() != 1:
        raise ValueError(f"active_runs: expected one class's frames [frames], got {tuple(active.shape)}")
    padded = F.pad(active.to(torch.int8), (1, 1))
    change = padded[1:] - padded[:-1]
    starts = (change == 1).nonzero().flatten().tolist()
    ends = (change == -1).nonzero().flatten().tolist()
    runs: list[tuple[int, int]] = []
    for start, end in zip(starts, ends):
        if runs and start - runs[-1][1] <= fill_gap:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return [(start, end) for start, end in runs if end - start >= min_frames]


def detect_events(
    probs: torch.Tensor,
    frame_seconds: float,
    labels: Sequence[str],
    threshold: float | Sequence[float] = 0.5,
    median_window: int | Sequence[int] = 1,
    fill_gap: int = 0,
    min_frames: int = 1,
    duration: float | None = None,
) -> list[Event]:
    """The events of one recording from its frame probabilities `[frames, classes]`, frame i covering
    [i, i + 1) x `frame_seconds`: median-filtered (`median_window`), active where above `threshold` (one,
    or one per class), consecutive active frames merged into one event (`active_runs`: `fill_gap`,
    `min_frames`). An offset is capped at `duration` (the audio's length in seconds) when given. Events
    are sorted by onset, then label."""
    if probs.dim() != 2 or probs.shape[1] != len(labels):
        raise ValueError(
            f"detect_events: expected probabilities [frames, {len(labels)} classes], got {tuple(probs.shape)}"
        )
    if not frame_seconds > 0:
        raise ValueError(f"detect_events: frame_seconds must be positive, got {frame_seconds}")
    thresholds = per_class(threshold, len(labels), "threshold")
    filtered = median_filter(probs.detach().double().cpu(), median_window)
    active = filtered > thresholds
    events = []
    for c in active.any(0).nonzero().flatten().tolist():
        for start, end in active_runs(active[:, c], fill_gap, min_frames):
            offset = end * frame_seconds
            events.append(
                Event(
                    onset=round(start * frame_seconds, 6),
                    offset=round(min(offset, duration) if duration is not None else offset, 6),
                    label=labels[c],
                    score=round(float(filtered[start:end, c].max()), 6),
                )
            )
    return sorted(events, key=lambda e: (e.onset, e.label))
