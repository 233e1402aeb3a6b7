"""Reading audio files: one decoder for `prepare`, `predict` and the examples.

soundfile decodes (wav, flac, ogg, mp3 with libsndfile >= 1.1), torchaudio resamples, channels are averaged.
"""

from __future__ import annotations

from functools import lru_cache
from os import PathLike

import numpy as np
import soundfile as sf
import torch
import torchaudio

SAMPLE_RATE = 16000
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


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
