"""FFmpeg decoding through PyAV (the `ffmpeg` extra: `pip install 'ced-lightning[ffmpeg]'`), for what
libsndfile cannot read: AAC in MP4/M4A, Opus or Vorbis in WebM/Matroska, the audio of video containers.

`core.audio.AudioStream` uses it only where libsndfile refuses a file, and only for decoding: the samples
come out as float32 `[frames, channels]` at the file's own rate, exactly as libsndfile gives them (integer
samples scaled by the same power of two), and go through the same channel average, resampler and checks.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

try:
    import av
except ImportError:  # the optional extra is not installed: libsndfile's formats only
    av = None

# Containers FFmpeg decodes and libsndfile does not: folder scans include them only where PyAV is installed.
FFMPEG_EXTENSIONS: tuple[str, ...] = (
    ".3gp", ".aac", ".ac3", ".amr", ".ape", ".avi", ".m4a", ".m4b", ".m4v", ".mka", ".mkv", ".mov", ".mp4",
    ".webm", ".wma", ".wmv", ".wv",
)  # fmt: skip
INSTALL_HINT = "pip install 'ced-lightning[ffmpeg]'"
# A decoded length this much shorter than the container declares is a cut-off file, not codec padding
# (AAC and Opus add at most a few thousand samples of priming and padding).
TRUNCATION_TOLERANCE_S = 0.1
TRUNCATION_TOLERANCE_FRACTION = 0.01


class FfmpegDecodeError(Exception):
    """FFmpeg could not decode the file; the message says why (without the file name: the caller adds it)."""


def ffmpeg_available() -> bool:
    return av is not None


def _integer_scale(dtype: np.dtype) -> float:
    return float(2 ** (8 * dtype.itemsize - 1))


def frame_samples(frame: av.AudioFrame) -> np.ndarray:
    """A decoded frame as float32 `[frames, channels]`: integer formats scaled as libsndfile scales them
    (int16 / 2**15, int32 / 2**31, unsigned 8-bit centred first), floats as they are."""
    data = frame.to_ndarray()
    channels = frame.layout.nb_channels
    data = data.T if frame.format.is_planar else data.reshape(-1, channels)
    if data.dtype == np.uint8:
        return ((data.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if np.issubdtype(data.dtype, np.integer):
        return (data.astype(np.float64) / _integer_scale(data.dtype)).astype(np.float32)
    return np.ascontiguousarray(data, dtype=np.float32)


class FfmpegReader:
    """The first audio stream of `source` (a path, or a file's bytes): `samplerate`, `frames` (exact: counted
    by decoding on opening), `read()` of the whole recording or `blocks(n)`: float32 `[frames, channels]`.

    Opening decodes the file once to count its frames and to find broken or cut-off files before anything is
    used; a recording of at most `keep_frames` frames is kept from that pass, a longer one is decoded again
    block by block, so it is never in memory whole.
    """

    def __init__(self, source: str | bytes, keep_frames: int) -> None:
        if av is None:
            raise FfmpegDecodeError(f"PyAV is not installed ({INSTALL_HINT})")
        self._source = source
        kept: list[np.ndarray] | None = []
        frames = 0
        container, stream = self._open()
        try:
            self.samplerate = int(stream.codec_context.sample_rate or stream.rate or 0)
            declared = _declared_seconds(container, stream)
            try:
                for frame in self._decode(container, stream):
                    samples = frame_samples(frame)
                    frames += len(samples)
                    if kept is not None:
                        kept.append(samples)
                        if frames > keep_frames:
                            kept = None
            except FfmpegDecodeError as err:
                if not frames or not self.samplerate:
                    raise
                of_declared = f" of the {declared:.3f} s the container declares" if declared else ""
                raise FfmpegDecodeError(
                    f"truncated or damaged: {err} after {frames / self.samplerate:.3f} s{of_declared}"
                ) from err
        finally:
            container.close()
        if self.samplerate <= 0:
            raise FfmpegDecodeError("the audio stream has no sample rate")
        if declared is not None:
            missing = declared - frames / self.samplerate
            if missing > TRUNCATION_TOLERANCE_S + TRUNCATION_TOLERANCE_FRACTION * declared:
                raise FfmpegDecodeError(
                    f"truncated (the container declares {declared:.3f} s, {frames / self.samplerate:.3f} s "
                    "could be decoded)"
                )
        self.frames = frames
        self._kept = kept

    def _open(self) -> tuple[av.container.InputContainer, av.audio.stream.AudioStream]:
        source = io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source
        try:
            container = av.open(source, mode="r")
        except (av.FFmpegError, ValueError, OSError) as err:
            raise FfmpegDecodeError(f"FFmpeg: {_reason(err)}") from err
        if not container.streams.audio:
            container.close()
            raise FfmpegDecodeError("FFmpeg: the file has no audio stream")
        return container, container.streams.audio[0]

    @staticmethod
    def _decode(
        container: av.container.InputContainer, stream: av.audio.stream.AudioStream
    ) -> Iterator[av.AudioFrame]:
        try:
            yield from container.decode(stream)
        except (av.FFmpegError, ValueError) as err:
            raise FfmpegDecodeError(f"FFmpeg: {_reason(err)}") from err

    def read(self) -> np.ndarray:
        """The whole recording (kept from the counting pass when it was short enough, else decoded again)."""
        if self._kept is not None:
            return np.concatenate(self._kept)
        return np.concatenate(list(self.blocks(max(1, self.frames))))

    def blocks(self, block_frames: int) -> Iterator[np.ndarray]:
        """Consecutive `[block_frames, channels]` pieces (the last one shorter), decoded from the start."""
        container, stream = self._open()
        try:
            pending: list[np.ndarray] = []
            held = 0
            for frame in self._decode(container, stream):
                samples = frame_samples(frame)
                pending.append(samples)
                held += len(samples)
                while held >= block_frames:
                    joined = np.concatenate(pending)
                    yield joined[:block_frames]
                    pending, held = [joined[block_frames:]], held - block_frames
            if held:
                yield np.concatenate(pending)
        finally:
            container.close()

    def close(self) -> None:
        self._kept = None


def _reason(err: Exception) -> str:
    # FFmpegError's str() carries its errno and the file name (which the caller's message has already).
    return getattr(err, "strerror", None) or str(err)


def _declared_seconds(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> float | None:
    """The audio stream's duration as its container declares it: the stream's own, else the container's when
    the audio is its only stream (a video's may be longer than its sound), else None (not checked)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None
