"""Reading audio files (one decoder for `prepare`, `predict` and the examples), and the int16 <-> float
convention of stored audio.

soundfile decodes (wav, flac, ogg, mp3 with libsndfile >= 1.1), torchaudio resamples, channels are averaged.
Stored audio is int16; batches carry it as int16 (half the bytes of float32 through DataLoader workers'
shared memory and to the GPU) and become float32 on the device (`int16_to_float`), exactly: the scale is a
power of two.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from os import PathLike

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
INT16_SCALE = 32768.0  # int16 sample / INT16_SCALE = float sample in [-1, 1)


class AudioDecodeError(ValueError):
    """A file that cannot become a usable 16 kHz mono waveform; the message names the file and why."""


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig, new)


def resample(waveform: torch.Tensor, orig_sr: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Resample `[..., samples]` float32 audio with torchaudio's windowed-sinc filter (cached per rate)."""
    if orig_sr == sample_rate:
        return waveform
    return _resampler(orig_sr, sample_rate)(waveform)


def load_audio(path: str | PathLike, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Decode `path` to a float32 mono waveform `[samples]` at `sample_rate`.

    Raises `AudioDecodeError` naming the file for unreadable, empty, non-finite or all-zero audio.
    """
    try:
        data, orig_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        raise AudioDecodeError(f"{path}: cannot decode audio ({err})") from err
    if data.shape[0] == 0:
        raise AudioDecodeError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioDecodeError(f"{path}: audio contains NaN or inf samples")
    if not data.any():
        raise AudioDecodeError(f"{path}: audio is all zeros")
    waveform = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    return resample(waveform, int(orig_sr), sample_rate).contiguous()


def int16_to_float(samples: torch.Tensor) -> torch.Tensor:
    """int16 samples (any shape, any device) -> float32 in [-1, 1), bit-identical on every device."""
    return samples.to(torch.float32).mul_(1.0 / INT16_SCALE)


def float_to_int16(waveform: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16, rounded; +1.0 saturates to 32767 (one LSB of clipping at most)."""
    scaled = np.rint(np.asarray(waveform, dtype=np.float64) * INT16_SCALE)
    return np.clip(scaled, -32768, 32767).astype(np.int16)


def pack_clips(
    clips: Sequence[np.ndarray],
    width: int,
    starts: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Clips -> rows `[n, width]` (of `out` if given) and the samples kept per row (int64 `[n]`).

    Row i holds clip i from `starts[i]` (default 0), cut after `width` samples or zero-padded after its
    end. Every batch of clips, the student's and the teachers', is built here, so both see the same rows.
    """
    n = len(clips)
    starts = np.zeros(n, dtype=np.int64) if starts is None else np.asarray(starts, dtype=np.int64)
    lengths = np.array([len(clip) for clip in clips], dtype=np.int64)
    kept = np.clip(lengths - starts, 0, width)
    if out is None:
        out = np.empty((n, width), dtype=clips[0].dtype if n else np.int16)
    for row, (clip, start, k) in enumerate(zip(clips, starts, kept)):
        out[row, :k] = clip[start : start + k]
        out[row, k:] = 0
    return out, kept
