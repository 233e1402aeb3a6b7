"""Streaming predict (issue 18, item 2): windows cut from block-decoded audio equal the model on the same
slices in memory, embeddings per window, clip tags combined as the model combines a long clip's pieces, and a
2-hour file tagged in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import zarr

from ced_lightning.core.audio import AudioStream, load_audio
from ced_lightning.core.ffmpeg_audio import ffmpeg_available
from ced_lightning.engines.inference import (
    DECODE_BLOCK_FRAMES,
    EmbeddingsWriter,
    PieceAverage,
    WindowBatch,
    WindowsWriter,
    expand_inputs,
    segment_starts,
    stream_windows,
    tag_files,
)
from ced_lightning.models.ced import average_pieces

CLASS_NAMES = ["dog", "cat", "bird", "rain"]


class Collect:
    """A sink that keeps what it is given (the interface the writers implement)."""

    def __init__(self) -> None:
        self.windows: list[WindowBatch] = []
        self.files: list[tuple[int, dict[str, Any]]] = []

    def add_windows(self, windows: WindowBatch) -> None:
        self.windows.append(windows)

    def add_file(self, index: int, result: dict[str, Any]) -> None:
        self.files.append((index, result))

    def discard(self, index: int, file: str) -> None:
        raise AssertionError(f"{file} discarded")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("how", ["probability", "logit"])
def test_piece_average_equals_the_models_rule(how):
    torch.manual_seed(0)
    logits = torch.randn(7, 5) * 6
    running = PieceAverage(how)
    for chunk in logits.split([3, 1, 3]):
        running.add(chunk)
    assert (running.logits() - average_pieces(logits[:, None], how)[0]).abs().max() < 1e-5
    one = PieceAverage(how)
    one.add(logits[:1])
    assert one.logits().equal(logits[0])  # one window: the model's logits, bit for bit
    with pytest.raises(ValueError, match="piece_average"):
        PieceAverage("max")


@pytest.mark.parametrize(("segment", "hop"), [(1000, 1000), (1000, 300), (700, 1500), (5000, 100)])
def test_stream_windows_equal_slices_of_the_whole_file(tmp_path, segment, hop):
    """Windows cut across many decoded blocks (block_frames=997 at 44.1 kHz) equal the same slices of the
    file decoded whole, for overlapping windows, windows with gaps between them (hop > segment), and a file
    shorter than one window."""
    rng = np.random.default_rng(1)
    sf.write(tmp_path / "x.wav", 0.1 * rng.standard_normal((44100 // 4, 2)).astype(np.float32), 44100)
    whole = load_audio(tmp_path / "x.wav").numpy()
    with AudioStream(tmp_path / "x.wav", block_frames=997) as stream:
        windows = list(stream_windows(stream, segment, hop))
    starts = segment_starts(len(whole), segment, hop)
    assert [start for start, _ in windows] == starts
    for start, samples in windows:
        expected = whole[start : start + segment]
        assert len(samples) == len(expected) and np.abs(samples - expected).max() < 1e-6


def test_streamed_windows_and_embeddings_equal_the_model_on_slices(tiny_model, tmp_path):
    """A 30 s 44.1 kHz stereo file (more frames than DECODE_BLOCK_FRAMES: decoded and resampled in blocks)
    and a 3 s file: each window's probabilities and embedding equal the model on the same slice of the file
    decoded whole; the npy and Zarr embeddings hold the same rows; the clip tags are the windows' piece
    average; the windows' rows are on disk when the first file is finished, before the run ends."""
    rng = np.random.default_rng(0)
    t = np.arange(44100 * 30) / 44100
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) * (t > 15)  # a tone in the second half: windows differ
    stereo = np.stack([tone, tone], 1) + 0.05 * rng.standard_normal((len(t), 2))
    long_path, short_path = tmp_path / "long.wav", tmp_path / "short.wav"
    sf.write(long_path, stereo.astype(np.float32), 44100)
    assert sf.info(long_path).frames > DECODE_BLOCK_FRAMES
    sf.write(short_path, 0.1 * rng.standard_normal(48000).astype(np.float32), 16000)

    collect = Collect()
    windows_file = tmp_path / "windows.jsonl"
    sinks = [
        collect,
        WindowsWriter(windows_file, 4, CLASS_NAMES),
        EmbeddingsWriter(tmp_path / "emb", "npy"),
        EmbeddingsWriter(tmp_path / "emb.zarr", "zarr"),
    ]
    rows_when_first_done: list[int] = []

    def on_result(result: dict[str, Any]) -> None:
        if not rows_when_first_done:
            rows_when_first_done.append(len(windows_file.read_text().splitlines()))

    results, failures = tag_files(
        tiny_model,
        [long_path, short_path],
        class_names=CLASS_NAMES,
        segment_seconds=10.0,
        hop_seconds=4.0,
        batch_size=5,  # batches hold windows of both files
        embeddings=True,
        sinks=sinks,
        device="cpu",
        on_result=on_result,
    )
    for sink in sinks:
        sink.close()
    assert not failures and [r["duration_s"] for r in results] == [30.0, 3.0]
    starts = segment_starts(16000 * 30, 160000, 64000)
    assert rows_when_first_done == [len(starts)]

    for index, path in enumerate([long_path, short_path]):
        whole = load_audio(path)
        file_starts = starts if index == 0 else [0]
        slices = torch.stack([whole[s : s + 160000] for s in file_starts])
        with torch.no_grad():
            logits = tiny_model(slices)
            embedding = tiny_model.embed(slices)
        mine = [w for w in collect.windows if w.index == index]
        spans = [span for w in mine for span in w.spans]
        assert spans == [(s / 16000, (s + slices.shape[-1]) / 16000) for s in file_starts]
        probs = torch.cat([w.probs for w in mine])
        assert (probs - torch.sigmoid(logits)).abs().max() < 1e-5
        assert (torch.cat([w.embeddings for w in mine]) - embedding).abs().max() < 1e-4
        npy = np.load(tmp_path / "emb" / f"{index:04d}_{path.stem}.npy")
        group = zarr.open_group(str(tmp_path / "emb.zarr"), mode="r")[f"{index:04d}_{path.stem}"]
        assert npy.shape == tuple(embedding.shape) and np.array_equal(group["embedding"][:], npy)
        assert np.array_equal(group["span_s"][:], np.array(spans)) and group.attrs["file"] == str(path)
        assert np.abs(npy - embedding.numpy()).max() < 1e-4
        clip = torch.sigmoid(average_pieces(logits[:, None], tiny_model.config.piece_average))[0]
        assert results[index]["labels"][0]["probability"] == pytest.approx(float(clip.max()), abs=1e-5)
    lines = [json.loads(line) for line in windows_file.read_text().splitlines()]
    assert len(lines) == len(starts) + 1 and lines[-1]["end_s"] == 3.0


def test_m4a_and_aac_say_what_converts_them(tiny_model, tmp_path):
    """Before: `cannot decode audio (LibsndfileError: Error opening ...: Format not recognised.)`, with no
    word on why or what to do."""
    paths = [tmp_path / "voice_memo.m4a", tmp_path / "radio.aac"]
    for path in paths:
        path.write_bytes(b"\x00\x00\x00\x20ftypM4A \x00\x00\x00\x00" + bytes(200))
    _, failures = tag_files(tiny_model, paths, class_names=CLASS_NAMES, device="cpu")
    assert [f.path for f in failures] == [str(p) for p in paths]
    if ffmpeg_available():  # the ffmpeg extra tried them too (without it: tests/test_ffmpeg_audio.py)
        assert all(
            "cannot decode audio (neither libsndfile nor FFmpeg reads it" in f.reason for f in failures
        )
        return
    assert "voice_memo.m4a: cannot decode audio (AAC in MP4 is not a format libsndfile" in failures[0].reason
    assert "`ffmpeg -i voice_memo.m4a -ac 1 -ar 16000 out.flac`" in failures[0].reason
    assert "radio.aac: cannot decode audio (AAC is not a format libsndfile" in failures[1].reason


def test_a_folder_of_m4a_files_says_why_they_are_skipped(tmp_path, caplog):
    """Before: only `N files are not audio files by their extension ... were skipped`, as for a .txt."""
    if ffmpeg_available():
        pytest.skip("the ffmpeg extra decodes m4a: tests/test_ffmpeg_audio.py scans without it")
    sf.write(tmp_path / "a.wav", 0.1 * np.ones(1600, np.float32), 16000)
    for name in ("memo_1.m4a", "memo_2.M4A", "radio.aac", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING"):
        assert [p.name for p in expand_inputs([tmp_path])] == ["a.wav"]
    assert "1 .aac, 2 .m4a files are audio libsndfile cannot decode" in caplog.text
    assert "`ffmpeg -i NAME.aac -ac 1 -ar 16000 NAME.flac`" in caplog.text


CHILD = textwrap.dedent(
    """
    import json, sys
    import torch
    from ced_lightning.models import create_ced
    from ced_lightning.engines.inference import WindowsWriter, tag_files

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    warm_path, long_path, windows_path = sys.argv[1:4]
    torch.manual_seed(0)
    # A narrow CED: the test is about memory, and 720 windows through CED-Tiny's width take a while.
    model = create_ced("ced_tiny", depth=1, embed_dim=32, num_heads=2, num_classes=4).eval()
    names = ["dog", "cat", "bird", "rain"]
    tag_files(model, [warm_path], class_names=names, device="cpu")  # one-time allocations happen here
    baseline = status("VmRSS")
    try:  # resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    writer = WindowsWriter(windows_path, 3, names)
    results, failures = tag_files(model, [long_path], class_names=names, sinks=[writer], device="cpu")
    writer.close()
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "results": results,
                      "failures": [f.reason for f in failures]}))
    """
)


@pytest.mark.slow
def test_a_two_hour_file_is_tagged_in_bounded_memory(tmp_path):
    """A 2-hour 8 kHz recording (noise and a few tones, 115 MB as 16-bit WAV) is tagged by a child process
    whose peak RSS grows by less than 300 MB over its baseline after a warm-up. Before streaming, `predict`
    decoded it whole (460 MB as float32 at 16 kHz) and ran the model on all 712 pieces at once."""
    rate, hours = 8000, 2
    long_path = tmp_path / "field_recording.wav"
    rng = np.random.default_rng(0)
    with sf.SoundFile(long_path, "w", samplerate=rate, channels=1, subtype="PCM_16") as out:
        for minute in range(60 * hours):
            block = 0.01 * rng.standard_normal(rate * 60)
            if minute % 17 == 0:  # a tone now and then
                block += 0.3 * np.sin(2 * np.pi * (300 + 10 * minute) * np.arange(rate * 60) / rate)
            out.write(block.astype(np.float32))
    warm_path = tmp_path / "warm.wav"
    sf.write(warm_path, 0.01 * rng.standard_normal(rate * 30).astype(np.float32), rate)
    windows_path = tmp_path / "windows.csv"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(warm_path), str(long_path), str(windows_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert not report["failures"]
    assert report["results"][0]["duration_s"] == 7200.0
    windows = len(segment_starts(7200 * 16000, 161_919, 161_919))  # the model's own piece, 10.12 s
    assert windows == 712 and len(windows_path.read_text().splitlines()) == 1 + windows * 3
    growth_mb = (report["peak"] - report["baseline"]) / 2**20
    print(f"peak RSS growth tagging 2 h: {growth_mb:.0f} MB (baseline {report['baseline'] / 2**20:.0f} MB)")
    assert growth_mb < 300
