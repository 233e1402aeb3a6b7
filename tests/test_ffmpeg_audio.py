"""The FFmpeg decoder (PyAV, the `ffmpeg` extra): used only where libsndfile refuses a file, with the same
checks, channel average and resampler, so formats both read give the same samples."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.signal
import soundfile as sf
import torch

av = pytest.importorskip("av")

from ced_lightning.core.audio import (  # noqa: E402
    AUDIO_EXTENSIONS,
    AudioDecodeError,
    AudioStream,
    load_audio,
    resample,
)
from ced_lightning.core.ffmpeg_audio import FfmpegReader  # noqa: E402
from ced_lightning.data.sources import scan_audio_files  # noqa: E402


def tones(rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    """A chord of three tones, `[frames, channels]` float32 (channel c at amplitude 1 / (c + 1))."""
    t = np.arange(round(rate * seconds)) / rate
    chord = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t + 1.0)
    chord += 0.05 * np.sin(2 * np.pi * 3100 * t)
    return np.stack([chord / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def encode(signal: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    """`signal` `[frames, channels]` encoded by FFmpeg (through PyAV) into `container` with `codec`."""
    out = io.BytesIO()
    layout = "mono" if signal.shape[1] == 1 else "stereo"
    with av.open(out, "w", format=container) as muxer:
        stream = muxer.add_stream(codec, rate=rate, layout=layout)
        step = 960 if codec == "libopus" else 1024
        for start in range(0, len(signal), step):
            piece = np.ascontiguousarray(signal[start : start + step].T)
            frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                muxer.mux(packet)
        for packet in stream.encode(None):
            muxer.mux(packet)
    return out.getvalue()


def best_aligned_error(
    decoded: np.ndarray, reference: np.ndarray, max_shift: int = 2400
) -> tuple[int, float]:
    """(shift, RMS error relative to the reference's RMS) at the shift of `decoded` against `reference` that
    correlates best: lossy codecs may add priming samples."""
    n = min(len(reference), len(decoded)) - 2 * max_shift
    middle = reference[max_shift : max_shift + n]
    correlation = scipy.signal.correlate(decoded[: n + 2 * max_shift], middle, mode="valid")
    shift = int(np.argmax(correlation)) - max_shift
    aligned = decoded[max_shift + shift : max_shift + shift + n]
    return shift, float(np.sqrt(np.mean((aligned - middle) ** 2)) / np.sqrt(np.mean(middle**2)))


def test_ffmpeg_decodes_flac_to_the_samples_libsndfile_gives(tmp_path):
    """The same float32 samples, bit for bit, from both decoders: 16-bit stereo at 44.1 kHz, 24-bit mono."""
    for name, signal, rate, subtype in [
        ("stereo16.flac", tones(44100, 1.3, 2), 44100, "PCM_16"),
        ("mono24.flac", tones(22050, 0.7, 1), 22050, "PCM_24"),
    ]:
        sf.write(tmp_path / name, signal, rate, subtype=subtype)
        expected = sf.read(tmp_path / name, dtype="float32", always_2d=True)[0]
        reader = FfmpegReader(str(tmp_path / name), keep_frames=1 << 22)
        assert reader.samplerate == rate and reader.frames == len(signal)
        np.testing.assert_array_equal(reader.read(), expected)
        np.testing.assert_array_equal(np.concatenate(list(reader.blocks(1000))), expected)


def test_flac_through_the_loader_is_unchanged(tmp_path):
    """libsndfile still decodes what it reads: the loader's output for a FLAC is today's computation."""
    sf.write(tmp_path / "a.flac", tones(44100, 1.3, 2), 44100, subtype="PCM_16")
    decoded = sf.read(tmp_path / "a.flac", dtype="float32", always_2d=True)[0].mean(axis=1)
    expected = resample(torch.from_numpy(decoded), 44100)
    assert torch.equal(load_audio(tmp_path / "a.flac"), expected)


@pytest.mark.parametrize(
    ("name", "container", "codec", "rate", "bound"),
    [("memo.m4a", "mp4", "aac", 44100, 0.05), ("talk.webm", "webm", "libopus", 48000, 0.05)],
)
def test_lossy_containers_decode_close_to_the_flac_of_the_same_signal(
    tmp_path, name, container, codec, rate, bound
):
    """AAC in M4A and Opus in WebM (libsndfile reads neither) against the FLAC of the same stereo signal,
    both through `load_audio`: the same length within the codec's padding, and within `bound` relative RMS
    error at the best alignment (measured: AAC 0.6 %, Opus 1.4 %)."""
    signal = tones(rate, 2.0, 2)
    sf.write(tmp_path / "ref.flac", signal, rate, subtype="PCM_16")
    (tmp_path / name).write_bytes(encode(signal, rate, container, codec))
    with pytest.raises(sf.LibsndfileError):
        sf.info(tmp_path / name)
    reference = load_audio(tmp_path / "ref.flac").numpy()
    decoded = load_audio(tmp_path / name).numpy()
    assert abs(len(decoded) - len(reference)) < 0.05 * 16000
    shift, error = best_aligned_error(decoded, reference)
    assert error < bound, (shift, error)
    # From the bytes (a tar member, a dataset row): the same samples as from the file.
    data = (tmp_path / name).read_bytes()
    assert torch.equal(load_audio(f"shard.tar:{name}", data=data), torch.from_numpy(decoded))


def test_a_long_m4a_streams_in_blocks_as_it_decodes_whole(tmp_path):
    """Past `block_frames`, FFmpeg's file is decoded again block by block through the streaming resampler:
    the same samples as the whole decode (within float32 rounding of the convolution's pieces), and
    `num_samples` exact on opening."""
    (tmp_path / "long.m4a").write_bytes(encode(tones(44100, 1.0, 1), 44100, "mp4", "aac"))
    whole = load_audio(tmp_path / "long.m4a").numpy()
    with AudioStream(tmp_path / "long.m4a", block_frames=5000) as stream:
        assert stream.num_samples == len(whole)
        pieces = list(stream)
    assert len(pieces) > 5
    np.testing.assert_allclose(np.concatenate(pieces), whole, atol=1e-6)


def test_truncated_and_garbage_m4a_fail_with_one_line_naming_the_file(tmp_path):
    data = encode(tones(44100, 3.0, 1), 44100, "mp4", "aac")
    # FFmpeg's MP4 muxer writes the index (moov) last: a file cut anywhere has no index at all.
    (tmp_path / "cut.m4a").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.m4a").write_bytes(np.random.default_rng(0).bytes(3000))
    for name in ("cut.m4a", "noise.m4a"):
        with pytest.raises(AudioDecodeError) as caught:
            load_audio(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name}: cannot decode audio (neither libsndfile nor FFmpeg")
        assert "\n" not in message


def test_an_m4a_whose_audio_ends_before_its_index_says_is_truncated(tmp_path):
    """An index (moov, first) that promises 3 s, audio data cut after half of it: refused as cut off, not
    kept as a short clip, whether the cut falls between two packets (FFmpeg stops without a word) or inside
    one (FFmpeg reports bad data)."""
    full = encode(tones(44100, 3.0, 1), 44100, "mp4", "aac")
    remuxed = tmp_path / "faststart.m4a"
    with (
        av.open(io.BytesIO(full)) as source,
        av.open(str(remuxed), "w", format="mp4", options={"movflags": "faststart"}) as out,
    ):
        stream = out.add_stream_from_template(source.streams.audio[0])
        for packet in source.demux(source.streams.audio[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = remuxed.read_bytes()
    with av.open(str(remuxed)) as container:
        positions = [p.pos for p in container.demux(container.streams.audio[0]) if p.pos is not None]
    between_packets = positions[len(positions) // 2]
    for name, cut, expected in [
        ("clean_cut.m4a", between_packets, r"truncated \(the container declares 3\.0\d\d s, 1\.\d+ s could"),
        (
            "mid_packet.m4a",
            between_packets + 7,
            r"truncated or damaged: FFmpeg: .* after 1\.\d+ s of the 3\.0",
        ),
    ]:
        (tmp_path / name).write_bytes(data[:cut])
        with pytest.raises(AudioDecodeError, match=rf"{name}: cannot decode audio .*{expected}"):
            load_audio(tmp_path / name)


def test_silent_and_videos_without_sound_are_refused_as_libsndfile_files_are(tmp_path):
    (tmp_path / "silent.m4a").write_bytes(encode(np.zeros((44100, 1), np.float32), 44100, "mp4", "aac"))
    with pytest.raises(AudioDecodeError, match=r"silent\.m4a: audio is all zeros"):
        load_audio(tmp_path / "silent.m4a")
    video = io.BytesIO()
    with av.open(video, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    (tmp_path / "mute.mp4").write_bytes(video.getvalue())
    with pytest.raises(AudioDecodeError, match=r"mute\.mp4: cannot decode audio .*no audio stream"):
        load_audio(tmp_path / "mute.mp4")


def test_folder_scans_pick_up_ffmpeg_containers_when_pyav_is_installed(tmp_path):
    for name in ("a.wav", "b.m4a", "c.webm", "d.mp4", "e.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert {".m4a", ".webm", ".mp4", ".mkv"} <= set(AUDIO_EXTENSIONS)
    assert [p.name for p in scan_audio_files(tmp_path)] == ["a.wav", "b.m4a", "c.webm", "d.mp4"]


def test_without_pyav_m4a_is_skipped_and_refused_with_the_install_hint(tmp_path):
    """PyAV not importable (as where the extra is not installed): scans leave M4A out, saying what to do,
    and decoding one says to install the extra or convert."""
    (tmp_path / "memo.m4a").write_bytes(encode(tones(44100, 0.5, 1), 44100, "mp4", "aac"))
    (tmp_path / "a.wav").write_bytes(b"x")
    child = textwrap.dedent(
        f"""
        import logging, sys
        sys.modules["av"] = None  # `import av` raises ImportError, as when it is not installed
        logging.basicConfig(level=logging.WARNING)
        from ced_lightning.core.audio import AUDIO_EXTENSIONS, AudioDecodeError, load_audio
        from ced_lightning.data.sources import scan_audio_files
        assert ".m4a" not in AUDIO_EXTENSIONS
        print([p.name for p in scan_audio_files({str(tmp_path)!r})])
        try:
            load_audio({str(tmp_path / "memo.m4a")!r})
        except AudioDecodeError as err:
            print(err)
        """
    )
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "['a.wav']" in run.stdout
    assert "memo.m4a: cannot decode audio (AAC in MP4 is not a format libsndfile" in run.stdout
    assert "pip install 'ced-lightning[ffmpeg]'" in run.stdout
    assert "1 .m4a files are audio libsndfile cannot decode" in run.stderr
