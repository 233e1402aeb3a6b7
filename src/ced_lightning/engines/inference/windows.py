"""Windows: the model's piece length, where a file's windows start, cutting them from a decoded stream, one
batch through the model, and the running combination of a file's windows' logits (`PieceAverage`).

Each file is cut into `segment_seconds` windows every `hop_seconds` (the last one ends at the file's end; a
file shorter than a window is one window), so a recording of hours needs the memory of one decoded block and
one batch of windows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE, AudioStream
from ced_lightning.core.errors import ConfigError
from ced_lightning.data.batching import pad_batch
from ced_lightning.models.ced import PIECE_AVERAGES

# Files of more frames than this are decoded and resampled in blocks of this many (24 s at 44.1 kHz): windows
# need no more, and a 2-hour file is tagged in about 100 MB above the model's own memory (measured by
# tests/test_predict_stream.py). Shorter files are decoded whole, exactly as `load_audio` decodes them.
DECODE_BLOCK_FRAMES = 1 << 20


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
