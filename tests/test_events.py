"""Sound event detection: CED's frame-level outputs (one per 160 ms token column, one pass, long clips cut
on the column grid), the post-processing (median filter, thresholds, runs of active frames -> events), the
event files, and a tiny CED trained here on generated tone bursts finding events at known times within one
token."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import torch

from ced_lightning.core.event_files import EVENT_COLUMNS, EventWriter, read_events
from ced_lightning.core.events import Event, active_runs, detect_events, median_filter
from ced_lightning.models import CED
from conftest import CED_TINY_SUMS, float32_bound

SR = 16000
TOKEN = 0.16  # seconds per token column of CED (16 frames of 10 ms)


def _tiny_ced(**overrides) -> CED:
    torch.manual_seed(0)
    config = {"embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 2, "target_length": 128}
    return CED(**{**config, **overrides}).eval()


# -- frame-level outputs ------------------------------------------------------------------------------------
def test_forward_frames_gives_one_output_per_token_column() -> None:
    model = _tiny_ced()
    assert model.column_seconds == pytest.approx(TOKEN)
    for seconds, columns in [(0.05, 1), (1.0, 6), (1.28, 8), (4.0, 25)]:
        waveform = torch.randn(3, int(seconds * SR))
        assert model.forward_frames(waveform).shape == (3, columns, 2)
        assert model.num_columns(model.front_end.num_frames(waveform.shape[-1])) == columns


def test_frame_embeddings_average_to_the_clip_embedding_of_one_piece() -> None:
    model = _tiny_ced()
    waveform = torch.randn(2, SR)
    with torch.no_grad():
        clip_logits, clip_embedding = model.forward_and_embed(waveform)
        frames = model.embed_frames(waveform)
        pooled = frames.mean(1)
    # The same tokens averaged in another order (bands, then columns): float32 rounding apart.
    assert torch.allclose(pooled, clip_embedding, rtol=0, atol=float32_bound(clip_embedding, CED_TINY_SUMS))
    head = model.outputlayer(pooled)
    assert torch.allclose(head, clip_logits, rtol=0, atol=float32_bound(clip_logits, CED_TINY_SUMS))


def test_long_clip_frames_equal_each_piece_on_its_own() -> None:
    """A clip longer than the model's time positions is cut into pieces of whole columns (8 here, 128
    frames): its frames equal those of each piece's log-mel passed alone (BatchNorm in eval mode is per
    frame), and the last, partial piece's padding adds no column."""
    model = _tiny_ced()
    mel = model.front_end(torch.randn(2, int(3.3 * SR)))  # 331 frames: 20 columns, pieces of 8, 8, 4
    with torch.no_grad():
        frames = model.forward_frames_spectrogram(mel)
        assert frames.shape == (2, 20, 2)
        for start in (0, 8, 16):
            alone = model.forward_frames_spectrogram(mel[..., start * 16 : (start + 8) * 16])
            piece = frames[:, start : start + alone.shape[1]]
            assert alone.shape[1] == (8 if start < 16 else 4)
            assert torch.allclose(piece, alone, rtol=0, atol=float32_bound(alone, CED_TINY_SUMS))


# -- post-processing ----------------------------------------------------------------------------------------
def test_median_filter_equals_scipy_nearest_mode_per_class_windows() -> None:
    probs = torch.rand(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    filtered = median_filter(probs, [1, 3, 7])
    for c, size in enumerate([1, 3, 7]):
        expected = scipy.ndimage.median_filter(probs[:, c].numpy(), size=size, mode="nearest")
        assert np.array_equal(filtered[:, c].numpy(), expected)
    with pytest.raises(ValueError, match="odd"):
        median_filter(probs, 4)
    with pytest.raises(ValueError, match="one per class"):
        median_filter(probs, [3, 3])


def test_active_runs_merge_consecutive_frames_fill_gaps_and_drop_short_runs() -> None:
    active = torch.tensor([0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    assert active_runs(active) == [(1, 3), (4, 5), (8, 11), (12, 13)]
    assert active_runs(active, fill_gap=1) == [(1, 5), (8, 13)]
    assert active_runs(active, min_frames=2) == [(1, 3), (8, 11)]
    assert active_runs(torch.zeros(5, dtype=torch.bool)) == []
    assert active_runs(torch.ones(3, dtype=torch.bool)) == [(0, 3)]


def test_detect_events_from_constructed_probabilities() -> None:
    probs = torch.full((30, 2), 0.05)
    probs[5:12, 0] = 0.9  # dog: frames 5-11
    probs[8, 0] = 0.2  # a one-frame dip that the median filter removes
    probs[20:30, 0] = 0.7  # dog again, to the end
    probs[15:18, 1] = 0.4  # cat: below 0.5, above the per-class 0.3
    probs[25, 1] = 0.95  # a one-frame spike that the median filter removes
    events = detect_events(probs, TOKEN, ["dog", "cat"], threshold=[0.5, 0.3], median_window=3, duration=4.7)
    assert events == [
        Event(onset=round(5 * TOKEN, 6), offset=round(12 * TOKEN, 6), label="dog", score=0.9),
        Event(onset=round(15 * TOKEN, 6), offset=round(18 * TOKEN, 6), label="cat", score=pytest.approx(0.4)),
        Event(onset=round(20 * TOKEN, 6), offset=4.7, label="dog", score=pytest.approx(0.7)),
    ]
    unfiltered = detect_events(probs, TOKEN, ["dog", "cat"], threshold=0.5)
    assert [(e.label, e.onset) for e in unfiltered] == [
        ("dog", round(5 * TOKEN, 6)),
        ("dog", round(9 * TOKEN, 6)),
        ("dog", round(20 * TOKEN, 6)),
        ("cat", 4.0),
    ]
    with pytest.raises(ValueError, match=r"1 classes\], got \(30, 2\)"):
        detect_events(probs, TOKEN, ["dog"])


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_event_files_round_trip(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"events{suffix}"
    with EventWriter(path) as writer:
        assert writer.write("a.wav", [Event(0.32, 1.6, "Dog", 0.91), Event(2.0, 2.48, "Cat, meow", 0.5)]) == 2
        assert writer.write("b.wav", []) == 0
        writer.write("c d.flac", [Event(0.0, 0.16, "Dog", 0.6)])
    rows = read_events(path)
    assert [(r["filename"], r["onset"], r["offset"], r["event_label"], r["score"]) for r in rows] == [
        ("a.wav", 0.32, 1.6, "Dog", 0.91),
        ("a.wav", 2.0, 2.48, "Cat, meow", 0.5),
        ("c d.flac", 0.0, 0.16, "Dog", 0.6),
    ]
    first = path.read_text(encoding="utf-8").splitlines()[0]
    if suffix == ".jsonl":
        assert tuple(json.loads(first)) == EVENT_COLUMNS
    else:
        assert first == ("\t" if suffix == ".tsv" else ",").join(EVENT_COLUMNS)
    with pytest.raises(ValueError, match=r"\.csv, \.tsv, \.jsonl"):
        EventWriter(tmp_path / "events.txt")


# -- end to end: a tiny CED trained on tone bursts ---------------------------------------------------------
TONES = (1000.0, 3000.0)  # class 0 and class 1


def _tone_clip(
    seconds: float, bursts: list[tuple[int, float, float]], rng: np.random.Generator
) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    audio = 0.01 * rng.standard_normal(len(t))
    for label, onset, offset in bursts:
        inside = (t >= onset) & (t < offset)
        audio[inside] += 0.3 * np.sin(2 * math.pi * TONES[label] * t[inside])
    return audio.astype(np.float32)


def _column_targets(columns: int, bursts: list[tuple[int, float, float]]) -> np.ndarray:
    """Class c is active in column j when a burst of c covers the column's centre."""
    centres = (np.arange(columns) + 0.5) * TOKEN
    targets = np.zeros((columns, len(TONES)), np.float32)
    for label, onset, offset in bursts:
        targets[(centres >= onset) & (centres < offset), label] = 1.0
    return targets


def _random_bursts(seconds: float, rng: np.random.Generator) -> list[tuple[int, float, float]]:
    bursts = []
    for label in range(len(TONES)):
        for _ in range(rng.integers(0, 3)):
            onset = rng.uniform(0, seconds - 0.3)
            bursts.append((label, onset, min(seconds, onset + rng.uniform(0.3, 0.8))))
    return bursts


def test_tiny_ced_trained_on_tone_bursts_finds_events_within_one_token() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = _tiny_ced().train()
    model.init_bn[1].momentum = 0.1  # running statistics settle within this short training
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    seconds = 1.28  # one piece: 8 columns
    for _ in range(150):
        bursts = [_random_bursts(seconds, rng) for _ in range(16)]
        waveform = torch.from_numpy(np.stack([_tone_clip(seconds, b, rng) for b in bursts]))
        logits = model.forward_frames(waveform)
        targets = torch.from_numpy(np.stack([_column_targets(logits.shape[1], b) for b in bursts]))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    # A longer recording than the model's 8 columns (4 pieces), events across the piece boundaries.
    truth = [(0, 0.50, 1.30), (1, 1.00, 2.10), (0, 2.60, 3.40), (1, 3.70, 4.60)]
    audio = _tone_clip(5.0, truth, np.random.default_rng(1))
    with torch.no_grad():
        probs = torch.sigmoid(model.forward_frames(torch.from_numpy(audio)[None]))[0]
    events = detect_events(
        probs, model.column_seconds, ["low", "high"], threshold=0.5, median_window=3, duration=5.0
    )
    found = sorted((e.label, e.onset, e.offset) for e in events)
    expected = sorted((["low", "high"][c], onset, offset) for c, onset, offset in truth)
    assert len(found) == len(expected), f"found {found}, expected {expected}"
    for (label, onset, offset), (true_label, true_onset, true_offset) in zip(found, expected):
        assert label == true_label
        assert abs(onset - true_onset) <= TOKEN and abs(offset - true_offset) <= TOKEN, (found, expected)
