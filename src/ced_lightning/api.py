"""The Python API in one call: load a model by name or path, tag and embed files or waveforms.

    import ced_lightning as ced
    m = ced.load("ced_mini")                      # a released name, or a checkpoint this project reads
    print(m.tag("clip.wav", top_k=5))             # clip.wav: Speech 0.912, ...
    m.tag(wave, sample_rate=44100)                # numpy array or torch tensor, mono or (channels, samples)
    m.embed("clip.wav")                           # the clip embedding, a float32 numpy vector
    ced.tag_files(["a.wav", "b.wav"], model="ced_mini")   # one TagResult per file, in order

Files go through `engines.inference.tag_files`, the engine of `ced-predict`: decoded by `AudioStream`, cut
into the model's own windows (10.12 s for CED), windows batched across files, a file's windows combined by the
model's rule for the pieces of a long clip. Waveforms are resampled to 16 kHz by `audio.resample` (the
resampler that decodes files) and cut into the same windows, so a file and its samples get the same tags.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE, _mono, int16_to_float, load_audio, resample
from ced_lightning.core.device import default_device
from ced_lightning.core.events import Event
from ced_lightning.core.labels import resolve_class_names
from ced_lightning.core.objective import check_objective, probabilities_from_logits
from ced_lightning.engines.inference import (
    Failure,
    PieceAverage,
    PredictionSink,
    WindowBatch,
    expand_inputs,
    model_piece_samples,
    run_model,
    segment_starts,
    top_labels,
)
from ced_lightning.engines.inference import tag_files as _tag_paths
from ced_lightning.engines.inference.events import EventSettings, check_event_model, file_events
from ced_lightning.models import apply_quantization, load_checkpoint
from ced_lightning.models.released import list_released

__all__ = ["AudioTagger", "TagResult", "TaggingError", "list_released", "load", "tag_files"]

Audio = str | PathLike | np.ndarray | torch.Tensor
ERRORS = ("keep", "raise")


class TaggingError(ValueError):
    """A file (or waveform) that could not be tagged; `path` and `reason` say which and why."""

    def __init__(self, path: str | None, reason: str) -> None:
        super().__init__(reason)
        self.path, self.reason = path, reason


@dataclass(frozen=True)
class TagResult:
    """The tags of one clip, best first: `labels` (class names), `scores` (probabilities), `indices` (the
    model's output indices). `path` is the file (None for a waveform); a file that could not be tagged has
    `error` (the reason, naming the file) and no labels. `print(result)` gives the line `ced-predict` prints,
    `to_dict()` the JSON line it writes."""

    labels: list[str]
    scores: list[float]
    indices: list[int]
    path: str | None = None
    duration_s: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TagResult:
        """From `engines.inference.tag_files`'s clip result (`{"file", "duration_s", "labels": [{index, name,
        probability}]}`)."""
        labels = row["labels"]
        return cls(
            labels=[label["name"] for label in labels],
            scores=[label["probability"] for label in labels],
            indices=[label["index"] for label in labels],
            path=row.get("file"),
            duration_s=row.get("duration_s"),
        )

    @classmethod
    def failed(cls, path: str, reason: str) -> TagResult:
        return cls(labels=[], scores=[], indices=[], path=path, error=reason)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the row `ced-predict --output tags.jsonl` writes, plus `error` for a failed file."""
        row: dict[str, Any] = {
            "file": self.path,
            "duration_s": self.duration_s,
            "labels": [
                {"index": i, "name": n, "probability": s}
                for i, n, s in zip(self.indices, self.labels, self.scores, strict=True)
            ],
        }
        if self.error is not None:
            row["error"] = self.error
        return row

    def _tags(self) -> str:
        if self.error is not None:  # the reason names the file already
            reason = self.error.removeprefix(f"{self.path}: ") if self.path else self.error
            return f"cannot tag: {reason}"
        return ", ".join(
            f"{label} {score:.3f}" for label, score in zip(self.labels, self.scores, strict=True)
        )

    def __str__(self) -> str:
        return f"{self.path}: {self._tags()}" if self.path is not None else self._tags()

    def __repr__(self) -> str:
        where = "" if self.path is None else f"{self.path} "
        length = "" if self.duration_s is None else f"({self.duration_s:g} s) "
        return f"<TagResult {where}{length}{self._tags()}>"


class _Collector(PredictionSink):
    """A sink that keeps, by input index, each file's clip result or failure and, when asked,
    its windows' embeddings."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.failed: dict[int, str] = {}
        self.embeddings: dict[int, list[torch.Tensor]] = {}

    def add_windows(self, windows: WindowBatch) -> None:
        if windows.embeddings is not None:
            self.embeddings.setdefault(windows.index, []).append(windows.embeddings)

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        self.rows[index] = result

    def discard(self, index: int, file: str) -> None:
        self.failed[index] = file
        self.embeddings.pop(index, None)


class AudioTagger:
    """A loaded model ready to tag: `tag`, `tag_files`, `embed`, `events`. `class_names` are its outputs'
    names (the checkpoint's, else AudioSet's for 527 classes); `model` is the `nn.Module` (eval mode, on
    `device`); `objective` how its outputs read: "multi_label" (a sigmoid per class, the released models)
    or "single_label" (one softmax over the classes, a model trained with task.objective=single_label)."""

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        *,
        source: str = "<model>",
        device: torch.device | str | None = None,
        batch_size: int = 8,
        objective: str = "multi_label",
    ) -> None:
        if len(class_names) != int(model.num_classes):
            raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.class_names = list(class_names)
        self.source, self.batch_size = source, batch_size
        self.objective = check_objective(objective)
        self.sample_rate = SAMPLE_RATE

    def __repr__(self) -> str:
        return (
            f"AudioTagger({self.source!r}, {type(self.model).__name__}, {len(self.class_names)} classes, "
            f"device={self.device})"
        )

    def tag(self, audio: Audio, *, sample_rate: int | None = None, top_k: int | None = 5) -> TagResult:
        """The top `top_k` classes of one clip (`top_k=None`: every class, best first): a file path (any
        format and rate the commands read), or a waveform (`sample_rate` required) as a numpy array or torch
        tensor, mono `[samples]` or `[channels, samples]` (channels averaged), float or int16. Clips longer
        than the model's window are tagged window by window and combined, as `ced-predict` does. Raises
        `TaggingError` when the clip cannot be tagged."""
        if _is_path(audio):
            if Path(audio).is_dir():
                raise TaggingError(
                    str(audio), f"{audio} is a folder: tag one file, or use tag_files([folder])"
                )
            return self.tag_files([audio], top_k=top_k, errors="raise")[0]
        wave = _waveform(audio, sample_rate)
        logits, _ = self._run_windows(wave, embeddings=False)
        probabilities = probabilities_from_logits(logits, self.objective)
        row = {"labels": top_labels(probabilities, self._k(top_k), self.class_names)}
        return TagResult.from_row({**row, "duration_s": round(len(wave) / SAMPLE_RATE, 4)})

    def tag_files(
        self, paths: Sequence[str | PathLike], *, top_k: int | None = 5, errors: str = "keep"
    ) -> list[TagResult]:
        """One `TagResult` per file, in input order (folders are searched for audio files, as by
        `ced-predict`); the windows of all files are batched together. A file that cannot be tagged is a
        result with `error` (logged too) with `errors="keep"`; `errors="raise"` raises `TaggingError` for
        the first one instead."""
        if errors not in ERRORS:
            raise ValueError(f"errors={errors!r}: choose one of {list(ERRORS)}")
        if isinstance(paths, str | PathLike):
            raise TypeError("tag_files takes a list of paths; for one file use tag(path)")
        files = _files(paths)
        collector, failures = self._run_files(files, self._k(top_k), embeddings=False)
        results = []
        for index, file in enumerate(files):
            if index in collector.rows:
                results.append(TagResult.from_row(collector.rows[index]))
                continue
            reason = failures[str(file)].pop(0)
            if errors == "raise":
                raise TaggingError(str(file), reason)
            results.append(TagResult.failed(str(file), reason))
        return results

    def embed(self, audio: Audio, *, sample_rate: int | None = None) -> np.ndarray:
        """The clip embedding `[dim]` (float32): the pooled features the model's head classifies (CED: the
        mean of its token features), averaged over the clip's windows. Takes what `tag` takes. Per-window
        embeddings of long recordings: `ced-predict --outputs embeddings`."""
        if _is_path(audio):
            file = Path(audio)
            collector, failures = self._run_files([file], top_k=1, embeddings=True)
            if 0 not in collector.rows:
                raise TaggingError(str(file), failures[str(file)][0])
            pooled = torch.cat(collector.embeddings[0])
        else:
            _, pooled = self._run_windows(_waveform(audio, sample_rate), embeddings=True)
        return pooled.mean(0).numpy()

    def events(
        self,
        audio: Audio,
        *,
        sample_rate: int | None = None,
        threshold: float | Sequence[float] = 0.5,
        median_window: int = 1,
        fill_gap: int = 0,
        min_frames: int = 1,
    ) -> list[Event]:
        """The sound events of one clip (what `tag` takes), from a CED's frame outputs (one per 160 ms
        token column): `Event(onset, offset, label, score)`, as `ced-predict --events` writes them."""
        wave = load_audio(audio) if _is_path(audio) else _waveform(audio, sample_rate)
        settings = EventSettings(threshold, median_window, fill_gap, min_frames)
        check_event_model(self.model)
        settings.check(len(self.class_names))
        return file_events(self.model, wave, self.class_names, settings, self.batch_size, self.objective)

    def _k(self, top_k: int | None) -> int:
        if top_k is None:
            return len(self.class_names)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None: every class), got {top_k}")
        return top_k

    def _run_files(
        self, files: Sequence[Path], top_k: int, embeddings: bool
    ) -> tuple[_Collector, dict[str, list[str]]]:
        collector = _Collector()
        _, failures = _tag_paths(
            self.model,
            files,
            topk=top_k,
            class_names=self.class_names,
            objective=self.objective,
            batch_size=self.batch_size,
            embeddings=embeddings,
            sinks=[collector],
            device=self.device,
        )
        return collector, _reasons(failures)

    @torch.inference_mode()
    def _run_windows(self, wave: torch.Tensor, embeddings: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The clip's logits (its windows' combined as `predict` combines a file's) and, with `embeddings`,
        its windows' embeddings `[windows, dim]`."""
        segment = model_piece_samples(self.model)
        starts = segment_starts(len(wave), segment, segment)
        average = PieceAverage(getattr(getattr(self.model, "config", None), "piece_average", "probability"))
        pooled = []
        for first in range(0, len(starts), self.batch_size):
            windows = [wave[start : start + segment] for start in starts[first : first + self.batch_size]]
            logits, embedded = run_model(self.model, windows, self.device, embeddings)
            average.add(logits)
            pooled.append(embedded)
        return average.logits(), torch.cat(pooled) if embeddings else None


def load(
    model: str | PathLike,
    *,
    device: str | torch.device = "auto",
    quantize: str | None = None,
    batch_size: int = 8,
) -> AudioTagger:
    """An `AudioTagger` for `model`: a released name (`list_released()`: `ced_tiny` ... `ced_base`, taken from
    the local cache, else downloaded once) or a checkpoint file this project reads (our `.ckpt`, a `save_ced`
    file, a released `.pt`, the Hub's `model.safetensors`). `device="auto"` uses CUDA when available;
    `quantize="int8"` runs the linear layers in dynamic int8 on the CPU. `batch_size`: windows per model
    call."""
    checkpoint = load_checkpoint(model)
    if quantize is not None:
        if str(device) not in ("auto", "cpu"):
            raise ValueError(f"quantize={quantize} runs on the CPU only (device={device}): use device='cpu'")
        device = "cpu"
    network = apply_quantization(checkpoint.model, quantize)
    class_names = resolve_class_names(int(network.num_classes), checkpoint.class_names)
    return AudioTagger(
        network,
        class_names,
        source=str(model),
        device=None if str(device) == "auto" else device,
        batch_size=batch_size,
        objective=checkpoint.objective,
    )


def tag_files(
    paths: Sequence[str | PathLike],
    *,
    model: str | PathLike | AudioTagger,
    top_k: int | None = 5,
    errors: str = "keep",
    device: str | torch.device = "auto",
    batch_size: int = 8,
) -> list[TagResult]:
    """`load(model).tag_files(paths, ...)`: one `TagResult` per file, in order; a file that cannot be tagged
    has `error` (`errors="keep"`) or raises `TaggingError` (`errors="raise"`). `model` may be an
    `AudioTagger` already loaded."""
    tagger = model if isinstance(model, AudioTagger) else load(model, device=device, batch_size=batch_size)
    return tagger.tag_files(paths, top_k=top_k, errors=errors)


def _is_path(audio: Audio) -> bool:
    return isinstance(audio, str | PathLike)


def _files(paths: Sequence[str | PathLike]) -> list[Path]:
    """Files as given (a missing one is a failed result, not an exception) and the audio files of folders."""
    files: list[Path] = []
    for path in paths:
        files.extend(expand_inputs([path]) if Path(path).is_dir() else [Path(path)])
    return files


def _reasons(failures: Sequence[Failure]) -> dict[str, list[str]]:
    """Failure reasons by file, in the order they came (a file given twice fails twice)."""
    reasons: dict[str, list[str]] = {}
    for failure in failures:
        reasons.setdefault(failure.path, []).append(failure.reason)
    return reasons


def _waveform(audio: np.ndarray | torch.Tensor, sample_rate: int | None) -> torch.Tensor:
    """A waveform as the model takes it: float32 mono `[samples]` at 16 kHz, checked."""
    if not isinstance(audio, np.ndarray | torch.Tensor):
        raise TypeError(f"audio: a file path, numpy array or torch tensor, not {type(audio).__name__}")
    if sample_rate is None:
        raise ValueError(
            f"sample_rate= is required with a waveform (the model runs at {SAMPLE_RATE} Hz; it is resampled)"
        )
    array = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
    if array.dtype == np.int16:
        array = int16_to_float(torch.from_numpy(array)).numpy()
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"waveform dtype {array.dtype}: give float samples in [-1, 1] or int16")
    array = array.astype(np.float32, copy=False)
    if array.ndim == 2:
        if array.shape[0] > array.shape[1]:
            raise ValueError(
                f"waveform of shape {tuple(array.shape)}: expected (channels, samples); for the (samples, "
                "channels) that soundfile.read returns pass its transpose, wave.T"
            )
        array = _mono(array.T)
    elif array.ndim != 1:
        raise ValueError(
            f"waveform of shape {tuple(array.shape)}: expected (samples,) or (channels, samples)"
        )
    if array.size == 0:
        raise ValueError("waveform is empty")
    if not np.isfinite(array).all():
        raise ValueError("waveform contains NaN or inf samples")
    return resample(torch.from_numpy(np.ascontiguousarray(array)), int(sample_rate)).contiguous()
