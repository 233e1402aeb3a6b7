"""Tagging files by path: the inputs (files and folders), the outputs' checks, and `predict_files`, the
whole of the `predict` command and of `ced-predict` below their argument parsing."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from ced_lightning.core.errors import ConfigError, MissingInputError
from ced_lightning.core.labels import resolve_class_names
from ced_lightning.core.progress import ProgressLog
from ced_lightning.data.sources import describe_extensions, scan_audio_files
from ced_lightning.engines.inference.charts import TimelineCharts
from ced_lightning.engines.inference.events import (
    EVENTS_KEY,
    EventSettings,
    EventsWriter,
    check_event_model,
    check_event_suffix,
    is_event_file_we_wrote,
)
from ced_lightning.engines.inference.tagger import Failure, tag_files
from ced_lightning.engines.inference.windows import check_windows, window_samples
from ced_lightning.engines.inference.writers import (
    EMBEDDINGS_FORMATS,
    EmbeddingsWriter,
    PredictionSink,
    TagsWriter,
    WindowsWriter,
    check_table_suffix,
    is_table_we_wrote,
)
from ced_lightning.engines.output_files import check_embeddings_store, check_output_file, check_output_folder

log = logging.getLogger(__name__)

OUTPUTS = ("tags", "windows", "embeddings")


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


@dataclass(frozen=True)
class OutputPlan:
    """The requested `outputs` and where each goes: checked before the model is read, then opened as the
    tagger's sinks. A new kind of output is its writer (a `PredictionSink`) and its lines here."""

    outputs: Sequence[str]
    output: str | PathLike | None = None
    windows_output: str | PathLike | None = None
    embeddings_output: str | PathLike | None = None
    embeddings_format: str = "npy"
    timeline_dir: str | PathLike | None = None
    events_output: str | PathLike | None = None
    event_settings: EventSettings = field(default_factory=EventSettings)

    @property
    def to_stdout(self) -> bool:
        return self.output is not None and str(self.output) == "-"

    @property
    def tags_file(self) -> str | PathLike | None:
        return self.output if "tags" in self.outputs and self.output and not self.to_stdout else None

    def check_settings(self) -> None:
        """Known outputs, each with the setting it needs, in a format it writes."""
        unknown = sorted(set(self.outputs) - set(OUTPUTS))
        if unknown:
            raise ConfigError(f"outputs={list(self.outputs)}: unknown {unknown}; choose from {list(OUTPUTS)}")
        if self.tags_file:
            check_table_suffix(self.tags_file, "output")
        if "windows" in self.outputs:
            if not self.windows_output:
                raise ConfigError("outputs=[...,windows]: set windows_output=FILE.csv (or .jsonl)")
            check_table_suffix(self.windows_output, "windows_output")
        if "embeddings" in self.outputs:
            if not self.embeddings_output:
                raise ConfigError(
                    "outputs=[...,embeddings]: set embeddings_output=FOLDER (npy) or STORE (zarr)"
                )
            if self.embeddings_format not in EMBEDDINGS_FORMATS:
                raise ConfigError(
                    f"embeddings_format={self.embeddings_format}: use one of {list(EMBEDDINGS_FORMATS)}"
                )
        if self.events_output:
            check_event_suffix(self.events_output)
            self.event_settings.check()

    def check_places(self, overwrite: bool) -> None:
        """Every requested output's place, before the model is read (`output_files`)."""
        if self.tags_file:
            check_output_file(self.tags_file, "output", overwrite, is_table_we_wrote)
        if "windows" in self.outputs:
            check_output_file(self.windows_output, "windows_output", overwrite, is_table_we_wrote)
            if self.timeline_dir:
                check_output_folder(self.timeline_dir, "timeline_dir")
        if "embeddings" in self.outputs:
            if self.embeddings_format == "zarr":
                check_embeddings_store(self.embeddings_output, "embeddings_output")
            else:
                check_output_folder(self.embeddings_output, "embeddings_output")
        if self.events_output:
            check_output_file(self.events_output, EVENTS_KEY, overwrite, is_event_file_we_wrote)

    def check_model(self, model: Any, num_classes: int) -> None:
        """What the loaded model must offer the requested outputs, before any output is opened."""
        if self.events_output:
            check_event_model(model)
            self.event_settings.check(num_classes)

    def open(
        self, topk: int, class_names: Sequence[str], model: Any = None, objective: str = "multi_label"
    ) -> Iterator[PredictionSink]:
        """The writers, each yielded as soon as it is open, so that a later one failing to open still leaves
        the caller every earlier one to abandon."""
        if "tags" in self.outputs and self.output:
            yield TagsWriter(sys.stdout if self.to_stdout else self.output)
        events = None
        if self.events_output:  # before the charts, which draw each file's events
            events = EventsWriter(
                self.events_output, model, class_names, self.event_settings, objective=objective
            )
            yield events
        if "windows" in self.outputs:
            yield WindowsWriter(self.windows_output, topk, class_names)
            if self.timeline_dir:
                yield TimelineCharts(self.timeline_dir, class_names, topk, events)
        if "embeddings" in self.outputs:
            yield EmbeddingsWriter(self.embeddings_output, self.embeddings_format)

    def log_written(self, files: int, sinks: Sequence[PredictionSink]) -> None:
        written = {
            "tags": self.tags_file,
            "windows": self.windows_output if "windows" in self.outputs else None,
            "embeddings": self.embeddings_output if "embeddings" in self.outputs else None,
        }
        for what, where in written.items():
            if where:
                log.info("wrote the %s of %d files to %s", what, files, where)
        for sink in sinks:
            if isinstance(sink, EventsWriter):
                log.info("wrote %d events of %d files to %s", sink.events, sink.files, sink.path)
        charts = [s for s in sinks if isinstance(s, TimelineCharts)]
        if charts:
            log.info("wrote %d timeline charts to %s", charts[0].written, self.timeline_dir)


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
    events_output: str | PathLike | None = None,
    event_settings: EventSettings | None = None,
) -> list[Failure]:
    """Load `ckpt` (a path or a released model's name), tag `inputs` (files and folders) and write the
    requested `outputs`: "tags" to `output` (`.jsonl`, `.csv`, or "-" for JSON lines on stdout), "windows" to
    `windows_output` (`.csv`, `.jsonl`) and PNG charts to `timeline_dir` (when given), "embeddings" to
    `embeddings_output` as `embeddings_format`, and with `events_output` (`.csv`, `.tsv`, `.jsonl`) each
    file's sound events (`EventsWriter`: a CED's frame outputs, post-processed by `event_settings`). Prints
    each file's tags as it is finished; returns the failures. Everything is checked before the checkpoint is
    read. `quantize="int8"` runs the model's linear layers in dynamic int8 (`models.quantize_dynamic_int8`),
    on the CPU. No output goes inside a Zarr store, and an existing file this command did not write is
    replaced only with `overwrite` (`output_files`)."""
    from ced_lightning.models import QUANTIZE_CHOICES, apply_quantization, load_checkpoint

    if not inputs:
        raise ConfigError("inputs=[FILE_OR_DIR,...] is required")
    if topk < 1:
        raise ConfigError(f"topk must be >= 1, got {topk}")
    plan = OutputPlan(
        outputs,
        output,
        windows_output,
        embeddings_output,
        embeddings_format,
        timeline_dir,
        events_output,
        event_settings or EventSettings(),
    )
    plan.check_settings()

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
    plan.check_places(overwrite)
    check_model_argument(ckpt)
    checkpoint = load_checkpoint(ckpt)
    model = apply_quantization(checkpoint.model, quantize)
    class_names = resolve_class_names(int(model.num_classes), checkpoint.class_names)
    window_samples(model, segment_seconds, hop_seconds)  # before any output file is opened
    plan.check_model(model, len(class_names))
    log.info("tagging %d files with %s", len(files), ckpt)

    sinks: list[PredictionSink] = []
    succeeded = False
    try:
        sinks.extend(plan.open(topk, class_names, model, checkpoint.objective))

        def show(result: dict[str, Any]) -> None:
            if print_tags and not plan.to_stdout:
                tags = ", ".join(f"{label['name']} {label['probability']:.3f}" for label in result["labels"])
                print(f"{result['file']}: {tags}", flush=True)

        kwargs: dict[str, Any] = dict(
            topk=topk,
            class_names=class_names,
            objective=checkpoint.objective,
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
                sink.abandon()

    plan.log_written(len(results), sinks)
    if failures:
        log.error("%d of %d files could not be tagged", len(failures), len(files))
    return failures


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
