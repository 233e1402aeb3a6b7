"""Timeline charts: one PNG per file of its top classes' probabilities over its windows (matplotlib)."""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ced_lightning.core.events import Event
from ced_lightning.engines.inference.writers import PredictionSink, WindowBatch, output_name

if TYPE_CHECKING:
    from ced_lightning.engines.inference.events import EventsWriter


def timeline_png_name(index: int, file: str) -> str:
    return output_name(index, file) + ".png"


class TimelineCharts(PredictionSink):
    """One PNG per file of its top classes' probabilities over its windows (`plot_timeline`). Holds the
    file's windows' probabilities until the file is done (windows x classes float32). With `events` (the
    run's `EventsWriter`, opened before the charts) each file's events are drawn as spans."""

    def __init__(
        self,
        folder: str | PathLike,
        class_names: Sequence[str],
        num_classes: int = 5,
        events: EventsWriter | None = None,
    ) -> None:
        self.folder, self.class_names, self.num_classes = Path(folder), class_names, num_classes
        self.events = events
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
        events = self.events.events_of(index) if self.events is not None else ()
        plot_timeline(png, result["file"], spans, torch.cat(probs), top, self.class_names, events)
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
    events: Sequence[Event] = (),
) -> None:
    """PNG of `classes`' probabilities `probs [windows, C]` over time (a line per class at window centres),
    and `events` as shaded spans labelled with their class (in its line's colour where it has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(start + end) / 2 for start, end in spans]
    fig, axis = plt.subplots(figsize=(max(6.0, min(20.0, 0.3 * len(centres))), 3.5), dpi=100)
    colours = {}
    for c in classes:
        (line,) = axis.plot(centres, probs[:, c].tolist(), marker="o", markersize=3, label=class_names[c])
        colours[class_names[c]] = line.get_color()
    for event in events:
        colour = colours.get(event.label, "grey")
        axis.axvspan(event.onset, event.offset, color=colour, alpha=0.15, linewidth=0)
        axis.text(event.onset, 0.98, event.label, color=colour, fontsize=6, va="top", clip_on=True)
    axis.set_ylim(0.0, 1.0)
    axis.set_xlabel("time (s)")
    axis.set_ylabel("probability")
    axis.set_title(Path(file).name)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: keep lines visible
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
