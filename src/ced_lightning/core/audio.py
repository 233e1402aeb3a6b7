"""Reading audio files (one decoder and validator for `prepare`, `predict` and the examples), the int16 <->
float convention of stored audio, and the short-clip rule.

soundfile decodes (every format of the installed libsndfile: `AUDIO_EXTENSIONS`); where libsndfile refuses a
file and PyAV is installed (the `ffmpeg` extra), FFmpeg decodes it (`core.ffmpeg_audio`: M4A/AAC, WebM, the
audio of video containers). torchaudio resamples (in blocks for long recordings), channels are averaged.
Stored audio is int16; batches carry it as int16 (half the bytes of float32 through DataLoader workers'
shared memory and to the GPU) and become float32 on the device (`int16_to_float`), exactly: the scale is a
power of two.
"""

from __future__ import annotations

import errno
import io
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from os import PathLike

import numpy as np
import soundfile as sf
import torch
import torchaudio

from ced_lightning.core.errors import CedError
from ced_lightning.core.ffmpeg_audio import (
    FFMPEG_EXTENSIONS,
    INSTALL_HINT,
    FfmpegDecodeError,
    FfmpegReader,
    ffmpeg_available,
)

SAMPLE_RATE = 16000
INT16_SCALE = 32768.0  # int16 sample / INT16_SCALE = float sample in [-1, 1)
# Every format the installed libsndfile decodes (wav, flac, ogg, mp3, aiff, caf, w64, ...), plus common
# aliases, plus FFmpeg's containers where PyAV is installed: one list for every command that scans folders.
# RAW is left out: headerless files cannot be decoded without being told their rate and sample type.
AUDIO_EXTENSIONS: tuple[str, ...] = tuple(
    sorted(
        {f".{name.lower()}" for name in sf.available_formats() if name != "RAW"}
        | {".wav", ".flac", ".ogg", ".mp3", ".opus", ".oga", ".aif", ".aifc"}
        | (set(FFMPEG_EXTENSIONS) if ffmpeg_available() else set())
    )
)
# The project's one minimum-length rule: nothing refuses a short clip. A waveform shorter than one STFT window
# is zero-padded at its end to one window by the models' front end (`pad_to_min_length`), as batches pad their
# shorter clips and CED pads a clip shorter than one patch. `prepare` reports clips shorter than this (the
# longest window of the shipped front ends: CED 512 samples, timm teachers 1024).
SHORT_CLIP_SAMPLES = 1024
# Files of more source frames than this are decoded and resampled in blocks of this many frames (about 95 s at
# 44.1 kHz), so that a recording of hours never exists whole as multi-channel float32 at its own rate.
STREAM_BLOCK_FRAMES = 1 << 22
# The most input samples one resampling convolution call takes (resample_stream).
RESAMPLE_CALL_SAMPLES = 1 << 18


class AudioDecodeError(CedError, ValueError):
    """A file that cannot become a usable 16 kHz mono waveform; the message names the file and why."""


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig, new)


def resample(waveform: torch.Tensor, orig_sr: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Resample `[..., samples]` float32 audio with torchaudio's windowed-sinc filter (cached per rate)."""
    if orig_sr == sample_rate:
        return waveform
    return _resampler(orig_sr, sample_rate)(waveform)


def resample_stream(
    blocks: Iterable[np.ndarray], orig_sr: int, sample_rate: int = SAMPLE_RATE
) -> Iterator[np.ndarray]:
    """`resample` of the concatenation of 1-D float32 `blocks`, yielded piece by piece while holding one block
    (plus the filter's reach): the output of a recording of hours never exists whole.

    torchaudio's resampler is a strided convolution over the signal zero-padded by `width` before and
    `width + orig` after; each output group needs `2 * width + orig` inputs, so a group is computed as soon as
    its inputs have arrived, from the same windows as the whole-signal call.
    """
    if orig_sr == sample_rate:
        for block in blocks:
            yield np.asarray(block, dtype=np.float32)
        return
    res = _resampler(orig_sr, sample_rate)
    orig, new, width = res.orig_freq // res.gcd, res.new_freq // res.gcd, res.width
    kernel_size = res.kernel.shape[-1]
    pending = np.zeros(width, dtype=np.float32)  # the leading zero padding
    length = emitted = 0

    # conv1d's working memory grows with its input (about 300 MB for a 4M-sample block at 8 -> 16 kHz):
    # each call gets at most RESAMPLE_CALL_SAMPLES inputs, which is faster too.
    groups_per_call = max(1, RESAMPLE_CALL_SAMPLES // orig)

    def convolve(signal: np.ndarray) -> np.ndarray:
        groups = (len(signal) - kernel_size) // orig + 1
        if groups <= 0:
            return np.zeros(0, np.float32)
        outs = []
        for first in range(0, groups, groups_per_call):
            count = min(groups_per_call, groups - first)
            used = signal[first * orig : first * orig + (count - 1) * orig + kernel_size]
            out = torch.nn.functional.conv1d(
                torch.from_numpy(np.ascontiguousarray(used))[None, None], res.kernel, stride=orig
            )
            outs.append(out[0].transpose(0, 1).reshape(-1).numpy())
        return np.concatenate(outs)

    for block in blocks:
        length += len(block)
        pending = np.concatenate([pending, block])
        out = convolve(pending)
        if out.size:  # never past the final length: the zero padding after the end is not used yet
            emitted += out.size
            yield out
            pending = pending[out.size // new * orig :]
    target = resampled_length(length, orig, new)
    yield convolve(np.concatenate([pending, np.zeros(width + orig, np.float32)]))[: target - emitted]


def resample_blocks(blocks: Iterable[np.ndarray], orig_sr: int, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """`resample_stream`, concatenated: the resampled recording as one array."""
    return np.concatenate([np.zeros(0, np.float32), *resample_stream(blocks, orig_sr, sample_rate)])


def resampled_length(frames: int, orig_sr: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples at `sample_rate` of `frames` at `orig_sr`, exactly as torchaudio's `resample` cuts them: the
    ceiling of the ratio of the gcd-reduced rates taken in float32 (an exact integer ceiling is one sample
    longer for some long recordings, e.g. 4,194,307 frames at 44.1 kHz)."""
    if orig_sr == sample_rate:
        return frames
    gcd = math.gcd(int(orig_sr), int(sample_rate))
    new, orig = int(sample_rate) // gcd, int(orig_sr) // gcd
    return int(torch.ceil(torch.as_tensor(new * frames / orig)).long())


def check_openable(path: str | PathLike) -> None:
    """Raise `AudioDecodeError` saying why `path` cannot be opened (missing, a symlink loop or a dangling
    link, a folder, no permission): libsndfile reports all of these as `System error.`"""
    if not os.path.lexists(path):
        raise AudioDecodeError(f"{path}: no such file")
    if os.path.isdir(path):
        raise AudioDecodeError(f"{path}: is a folder, not an audio file")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise AudioDecodeError(f"{path}: symlink loop (a link that points back to itself)") from err
        if err.errno == errno.ENOENT:  # lexists, yet no file: a link to nothing
            target = os.readlink(path) if os.path.islink(path) else "?"
            raise AudioDecodeError(f"{path}: dangling symlink (its target {target} does not exist)") from err
        raise AudioDecodeError(f"{path}: cannot open ({err.strerror or err})") from err


def wav_truncation(path: str | PathLike, data: bytes | None = None) -> str | None:
    """Why a WAV file (at `path`, or its bytes `data` named `path`) is cut short (its `data` chunk declares
    more bytes than the file holds), or None.

    libsndfile silently decodes what is there, so a half-downloaded file would pass as a shorter clip.
    """
    path = str(path)
    if not path.lower().endswith((".wav", ".wave")):
        return None
    try:
        size = os.path.getsize(path) if data is None else len(data)
        with open(path, "rb") if data is None else io.BytesIO(data) as handle:
            head = handle.read(12)
            if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
                return None  # not a RIFF WAVE (RF64, or not audio at all): the decoder judges it
            order = "little" if head[:4] == b"RIFF" else "big"
            pos = 12
            while pos + 8 <= size:
                handle.seek(pos)
                chunk = handle.read(8)
                declared = int.from_bytes(chunk[4:8], order)
                if chunk[:4] == b"data":
                    available = size - pos - 8
                    # 0 and 0xFFFFFFFF are placeholders written by streaming encoders: not truncation.
                    if declared not in (0, 0xFFFFFFFF) and declared > available:
                        return (
                            f"{path}: truncated WAV (data chunk declares {declared} bytes, "
                            f"file holds {available})"
                        )
                    return None
                pos += 8 + declared + (declared & 1)
    except OSError:
        return None
    return None


def _mono(data: np.ndarray) -> np.ndarray:
    return data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]


# Containers libsndfile never decodes (its formats are listed by soundfile.available_formats()): the message
# says so and how to convert, instead of libsndfile's "Format not recognised".
NO_LIBSNDFILE_DECODER = {
    ".m4a": "AAC in MP4", ".aac": "AAC", ".mp4": "MP4", ".m4b": "AAC in MP4", ".wma": "WMA", ".webm": "WebM",
    ".amr": "AMR", ".ac3": "AC-3", ".ape": "Monkey's Audio", ".wv": "WavPack",
}  # fmt: skip


def undecodable_format_hint(path: str | PathLike) -> str | None:
    """Why libsndfile cannot read `path` and what to do, for formats it has no decoder for; else None."""
    suffix = os.path.splitext(str(path))[1].lower()
    convert = f"convert it first, e.g. `ffmpeg -i {os.path.basename(str(path))} -ac 1 -ar 16000 out.flac`"
    if suffix in NO_LIBSNDFILE_DECODER and not ffmpeg_available():
        return (
            f"{NO_LIBSNDFILE_DECODER[suffix]} is not a format libsndfile (the decoder of every command, via "
            f"soundfile) reads, in any version: install the FFmpeg decoder (`{INSTALL_HINT}`) or {convert}"
        )
    if suffix == ".mp3" and "MP3" not in sf.available_formats():
        return (
            f"the installed libsndfile {sf.__libsndfile_version__} has no MP3 decoder (1.1.0 and newer "
            f"have one): `pip install --upgrade soundfile` (its wheels from 0.12 on bundle libsndfile 1.2), "
            f"or {convert}"
        )
    return None


class _SoundFileReader:
    """libsndfile's reader with `FfmpegReader`'s interface: `samplerate`, `frames`, `read()`, `blocks(n)`."""

    def __init__(self, source: str | bytes) -> None:
        self._file = sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else source)
        self.samplerate, self.frames = int(self._file.samplerate), int(self._file.frames)

    def read(self) -> np.ndarray:
        return self._file.read(dtype="float32", always_2d=True)

    def blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        return self._file.blocks(block_frames, dtype="float32", always_2d=True)

    def close(self) -> None:
        self._file.close()


def _open_reader(path: str, data: bytes | None, block_frames: int) -> _SoundFileReader | FfmpegReader:
    """libsndfile's reader of the file, else (where it refuses and PyAV is installed) FFmpeg's."""
    source = str(path) if data is None else data
    try:
        return _SoundFileReader(source)
    except Exception as err:  # soundfile raises LibsndfileError, RuntimeError, TypeError...
        libsndfile_error = err
    if ffmpeg_available():
        try:
            return FfmpegReader(source, keep_frames=block_frames)
        except FfmpegDecodeError as err:
            reason = " ".join(str(err).split())  # one line, whatever FFmpeg wrote
            raise AudioDecodeError(
                f"{path}: cannot decode audio (neither libsndfile nor FFmpeg reads it; {reason})"
            ) from err
    hint = undecodable_format_hint(path)
    reason = hint or f"{type(libsndfile_error).__name__}: {libsndfile_error}"
    raise AudioDecodeError(f"{path}: cannot decode audio ({reason})") from libsndfile_error


class AudioStream:
    """`path` (or the file's bytes `data`, named `path` in messages) decoded to float32 mono at
    `sample_rate`, iterated as consecutive numpy pieces: one piece for a file of at most `block_frames` frames
    (decoded and resampled whole, as always), else one piece per block, so a recording of hours is never in
    memory whole. `num_samples` is known on opening (from the header; exact once the first piece is read).

    Checks as `load_audio` (which is this stream, concatenated): opening raises `AudioDecodeError` for
    missing, unopenable, undecodable, truncated (WAV; FFmpeg's containers: shorter than declared) and empty
    files; iterating raises it at the first non-finite block and, at the end, for all-zero audio and audio
    that rounds to silence at 16 bits.
    """

    def __init__(
        self,
        path: str | PathLike,
        sample_rate: int = SAMPLE_RATE,
        block_frames: int = STREAM_BLOCK_FRAMES,
        *,
        data: bytes | None = None,
    ) -> None:
        self.path, self.sample_rate, self.block_frames = str(path), sample_rate, block_frames
        if data is None:
            check_openable(path)
        truncated = wav_truncation(path, data)
        if truncated:
            raise AudioDecodeError(truncated)
        self._file = _open_reader(self.path, data, block_frames)
        self.orig_sr = self._file.samplerate
        if self._file.frames == 0:
            self.close()
            raise AudioDecodeError(f"{path}: empty audio (0 samples)")
        self.num_samples = resampled_length(self._file.frames, self.orig_sr, sample_rate)
        if self.num_samples == 0:
            self.close()
            raise AudioDecodeError(f"{path}: empty audio (0 samples at {sample_rate} Hz)")

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[np.ndarray]:
        path = self.path
        try:
            if self._file.frames <= self.block_frames:  # checked whole before anything is yielded
                (mono,) = _checked_blocks([self._file.read()], path)
                whole = resample(torch.from_numpy(mono), self.orig_sr, self.sample_rate).contiguous()
                # torchaudio rounds the length in float32: the decoded length is the truth.
                self.num_samples = whole.shape[-1]
                pieces: Iterable[np.ndarray] = [_checked_resampled(whole.numpy(), path)]
            else:
                decoded = self._file.blocks(self.block_frames)
                pieces = resample_stream(_checked_blocks(decoded, path), self.orig_sr, self.sample_rate)
            loudest = 0.0
            for piece in pieces:
                if not np.isfinite(piece).all():
                    raise AudioDecodeError(f"{path}: audio contains NaN or inf samples after resampling")
                if piece.size:
                    loudest = max(loudest, float(np.abs(piece).max()))
                    yield piece
        except AudioDecodeError:
            raise
        except Exception as err:
            raise AudioDecodeError(f"{path}: cannot decode audio ({type(err).__name__}: {err})") from err
        _check_loudness(loudest, path)


def _check_loudness(loudest: float, path: str) -> None:
    if not loudest > 0.5 / INT16_SCALE:
        # Rounds to all zeros when stored: nothing a tagger could learn from or tag.
        raise AudioDecodeError(f"{path}: audio is silent at 16-bit resolution")


def _checked_resampled(waveform: np.ndarray, path: str) -> np.ndarray:
    if not np.isfinite(waveform).all():
        raise AudioDecodeError(f"{path}: audio contains NaN or inf samples after resampling")
    _check_loudness(float(np.abs(waveform).max()), path)
    return waveform


def _checked_blocks(blocks: Iterable[np.ndarray], path: str) -> Iterator[np.ndarray]:
    """Multi-channel blocks -> mono blocks, refusing non-finite samples and (at the end) all-zero audio."""
    nonzero = False
    for block in blocks:
        if not np.isfinite(block).all():
            raise AudioDecodeError(f"{path}: audio contains NaN or inf samples")
        nonzero = nonzero or bool(block.any())
        yield _mono(block)
    if not nonzero:
        raise AudioDecodeError(f"{path}: audio is all zeros")


def load_audio(
    path: str | PathLike,
    sample_rate: int = SAMPLE_RATE,
    block_frames: int = STREAM_BLOCK_FRAMES,
    *,
    data: bytes | None = None,
) -> torch.Tensor:
    """Decode `path` to a float32 mono waveform `[samples]` at `sample_rate`: the one decoder and validator of
    every command (`prepare`, `predict`, the examples), so all accept and refuse the same files.

    Raises `AudioDecodeError` naming the file for missing or unopenable paths (saying which), undecodable
    (saying what converts formats libsndfile cannot read, e.g. m4a), truncated (WAV), empty, non-finite,
    all-zero audio, and audio that rounds to silence at 16-bit resolution. Files longer than `block_frames`
    frames are decoded and resampled block by block (`AudioStream`, which `predict` iterates itself). `data`:
    the file's bytes (a tar member, a dataset row), decoded as the file `path` names would be.
    """
    with AudioStream(path, sample_rate, block_frames, data=data) as stream:
        pieces = list(stream)
    return torch.from_numpy(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))


def pad_to_min_length(waveform: torch.Tensor, min_samples: int) -> torch.Tensor:
    """`[..., samples]` zero-padded at its end to `min_samples` when shorter (the short-clip rule)."""
    short = min_samples - waveform.shape[-1]
    return torch.nn.functional.pad(waveform, (0, short)) if short > 0 else waveform


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
