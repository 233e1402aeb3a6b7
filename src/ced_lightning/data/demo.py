"""The embedded demo data set: seeded, synthetic, AudioSet-like multi-label clips; nothing to download.

Sixteen sound classes with distinct but partly confusable signatures (tones in neighbouring bands, a tone and
its amplitude-modulated or pulsed cousins, slow clicks and decaying knocks), one to three overlapping events
per clip at random onsets and durations, over coloured background noise at a random SNR. Every clip comes
from its own counter-keyed generator `PCG64([seed, index])`, so a clip does not depend on which others were
made, in which order, or by how many worker processes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from ced_lightning.core.audio import SAMPLE_RATE, float_to_int16
from ced_lightning.core.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_CLASSES: list[str] = [
    "tone_low",
    "tone_mid",
    "tone_high",
    "chirp_up",
    "chirp_down",
    "noise_low",
    "noise_high",
    "clicks_slow",
    "clicks_fast",
    "harmonic_low",
    "harmonic_high",
    "am_tone",
    "fm_tone",
    "knock",
    "beeps",
    "whoosh",
]
DEMO_MIDS: list[str] = [f"/demo/{name}" for name in DEMO_CLASSES]
# Bump when the generator's output changes: stores built by another version are then rebuilt, not reused.
GENERATOR_VERSION = 1
DEMO_CLIP_SECONDS = 2.0  # conf/data/demo.yaml's clip_seconds; `prepare source=demo` builds the same
# Splits draw from disjoint index ranges of the same seed, so growing one split never changes another.
SPLIT_INDEX_BASE = {"train": 0, "val": 1_000_000_000, "test": 2_000_000_000, "unlabeled": 3_000_000_000}

_SR = SAMPLE_RATE
Event = Callable[[np.random.Generator, int], np.ndarray]


def _sine_phase(freq: np.ndarray | float, n: int) -> np.ndarray:
    # Phase of a (possibly time-varying) frequency track: the running sum of instantaneous frequency.
    if np.isscalar(freq):
        return 2 * np.pi * float(freq) * np.arange(n) / _SR
    return 2 * np.pi * np.cumsum(freq) / _SR


def _fft_size(n: int) -> int:
    # Event lengths are arbitrary; a power-of-two FFT (cropped afterwards) keeps pocketfft fast.
    return 1 << max(0, n - 1).bit_length()


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    size = _fft_size(n)
    spectrum = np.fft.rfft(rng.standard_normal(size))
    freqs = np.fft.rfftfreq(size, 1 / _SR)
    spectrum[(freqs < lo) | (freqs > hi)] = 0
    out = np.fft.irfft(spectrum, size)[:n]
    return out / (np.abs(out).max() + 1e-9)


def _tone(lo: float, hi: float) -> Event:
    def make(rng: np.random.Generator, n: int) -> np.ndarray:
        return np.sin(_sine_phase(rng.uniform(lo, hi), n) + rng.uniform(0, 2 * np.pi))

    return make


def _chirp(up: bool) -> Event:
    def make(rng: np.random.Generator, n: int) -> np.ndarray:
        f0 = rng.uniform(300, 900)
        f1 = f0 * rng.uniform(2.0, 4.0)
        track = np.geomspace(f0, f1, n) if up else np.geomspace(f1, f0, n)
        return np.sin(_sine_phase(track, n))

    return make


def _noise(lo: float, hi: float) -> Event:
    def make(rng: np.random.Generator, n: int) -> np.ndarray:
        width = rng.uniform(0.5, 1.0) * (hi - lo)
        start = rng.uniform(lo, hi - width)
        return _band_noise(rng, n, start, start + width)

    return make


def _clicks(rate_lo: float, rate_hi: float) -> Event:
    def make(rng: np.random.Generator, n: int) -> np.ndarray:
        out = np.zeros(n)
        period = int(_SR / rng.uniform(rate_lo, rate_hi))
        click = rng.standard_normal(48) * np.exp(-np.arange(48) / 8.0)
        for at in range(int(rng.integers(0, period)), n - 48, period):
            out[at : at + 48] += click
        return out / (np.abs(out).max() + 1e-9)

    return make


def _harmonic(f0_lo: float, f0_hi: float, k_lo: int, k_hi: int) -> Event:
    def make(rng: np.random.Generator, n: int) -> np.ndarray:
        f0 = rng.uniform(f0_lo, f0_hi)
        phase = _sine_phase(f0, n)
        count = int(rng.integers(k_lo, k_hi + 1))
        out = sum(
            np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k for k in range(1, count + 1) if k * f0 < 7500
        )
        return out / (np.abs(out).max() + 1e-9)

    return make


def _am_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    # Carrier overlaps tone_mid's band: only the modulation tells them apart.
    carrier = np.sin(_sine_phase(rng.uniform(700, 1300), n))
    depth = rng.uniform(0.6, 0.95)
    return carrier * (1 - depth * (0.5 + 0.5 * np.sin(_sine_phase(rng.uniform(3, 12), n))))


def _fm_tone(rng: np.random.Generator, n: int) -> np.ndarray:
    centre = rng.uniform(1000, 2000)
    track = centre * (1 + rng.uniform(0.03, 0.1) * np.sin(_sine_phase(rng.uniform(4, 8), n)))
    return np.sin(_sine_phase(track, n))


def _knock(rng: np.random.Generator, n: int) -> np.ndarray:
    # A few decaying resonant impulses: a sparse cousin of clicks_slow.
    out = np.zeros(n)
    ring = min(n, int(_SR * rng.uniform(0.05, 0.15)))
    t = np.arange(ring)
    shape = np.sin(2 * np.pi * rng.uniform(400, 2500) * t / _SR) * np.exp(-t / (ring / 5))
    for _ in range(int(rng.integers(1, 5))):
        at = int(rng.integers(0, max(1, n - ring)))
        out[at : at + ring] += shape[: n - at] * rng.uniform(0.5, 1.0)
    return out / (np.abs(out).max() + 1e-9)


def _beeps(rng: np.random.Generator, n: int) -> np.ndarray:
    # A pulsed tone whose band overlaps tone_high and fm_tone.
    tone = np.sin(_sine_phase(rng.uniform(1500, 2500), n))
    rate, duty = rng.uniform(2, 6), rng.uniform(0.3, 0.6)
    gate = ((np.arange(n) / _SR * rate + rng.uniform(0, 1)) % 1.0) < duty
    return tone * gate


def _whoosh(rng: np.random.Generator, n: int) -> np.ndarray:
    # Narrow noise moved along a rising or falling sweep: ring-modulated low-pass noise.
    base = _band_noise(rng, n, 0, rng.uniform(100, 300))
    lo, hi = rng.uniform(300, 800), rng.uniform(2000, 4000)
    track = np.geomspace(lo, hi, n) if rng.random() < 0.5 else np.geomspace(hi, lo, n)
    return base * np.sin(_sine_phase(track, n))


_EVENTS: list[Event] = [
    _tone(150, 400),
    _tone(600, 1200),
    _tone(2000, 4000),
    _chirp(up=True),
    _chirp(up=False),
    _noise(80, 600),
    _noise(2500, 6500),
    _clicks(3, 8),
    _clicks(15, 40),
    _harmonic(90, 220, 6, 10),
    _harmonic(350, 700, 3, 6),
    _am_tone,
    _fm_tone,
    _knock,
    _beeps,
    _whoosh,
]
assert len(_EVENTS) == len(DEMO_CLASSES)


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    # White noise through a one-pole low-pass of random strength: from white to nearly brown, so the noise
    # colour varies between clips (cheaper than shaping a spectrum by FFT).
    white = rng.standard_normal(n)
    out = lfilter([1.0], [1.0, -rng.uniform(0.0, 0.98)], white)
    return out / (np.sqrt(np.mean(out**2)) + 1e-12)


def generate_demo_clip(
    seed: int, index: int, clip_seconds: float = DEMO_CLIP_SECONDS, single_label: bool = False
) -> tuple[np.ndarray, list[int]]:
    """Clip `index` of the demo for `seed`: (float32 waveform at 16 kHz, sorted class indices).

    `single_label`: the single-label variant (fine-tuning with task.objective=single_label): one event per
    clip, so exactly one class; the multi-label clips are unchanged by the option's existence."""
    if seed < 0 or index < 0:
        raise ConfigError(f"seed and index must be non-negative, not {seed}, {index}")
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    n = round(clip_seconds * _SR)
    if n < _SR // 4:
        raise ConfigError(f"clip_seconds={clip_seconds}: demo clips need at least 0.25 s")
    count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    if single_label:
        count = 1  # drawn all the same, so that the rest of the clip's draws keep their place in the stream
    classes = sorted(int(c) for c in rng.choice(len(DEMO_CLASSES), size=count, replace=False))
    mix = np.zeros(n)
    for c in classes:
        length = int(n * rng.uniform(0.3, 1.0))
        onset = int(rng.integers(0, n - length + 1))
        event = _EVENTS[c](rng, length)
        fade = min(length // 4, int(0.01 * _SR))
        if fade:
            ramp = np.linspace(0.0, 1.0, fade)
            event[:fade] *= ramp
            event[-fade:] *= ramp[::-1]
        # Loudness varies 15 dB between events, so a quiet event can hide under a loud one.
        gain = 10 ** (rng.uniform(-15, 0) / 20) / (np.sqrt(np.mean(event**2)) + 1e-12)
        mix[onset : onset + length] += gain * event
    signal_rms = np.sqrt(np.mean(mix**2)) + 1e-12
    snr_db = rng.uniform(0, 25)
    mix += _background(rng, n) * signal_rms * 10 ** (-snr_db / 20)
    mix *= rng.uniform(0.3, 0.9) / (np.abs(mix).max() + 1e-12)
    return mix.astype(np.float32), classes


Job = tuple[int, int, float, str, bool]


def _clip_job(job: Job) -> tuple[str, np.ndarray, list[int]]:
    seed, index, clip_seconds, name, single_label = job
    waveform, labels = generate_demo_clip(seed, index, clip_seconds, single_label)
    # int16 halves what crosses the process boundary; the writer stores int16 anyway.
    return name, float_to_int16(waveform), labels


def _split_jobs(
    split: str, seed: int, count: int, clip_seconds: float, single_label: bool = False
) -> list[Job]:
    base = SPLIT_INDEX_BASE[split]
    return [(seed, base + i, clip_seconds, f"demo_{split}_{i:06d}", single_label) for i in range(count)]


def build_demo_stores(
    root: str,
    *,
    seed: int = 0,
    train: int = 1200,
    val: int = 300,
    test: int = 300,
    unlabeled: int | None = None,
    clip_seconds: float = DEMO_CLIP_SECONDS,
    workers: int = 0,
    overwrite: bool = False,
    single_label: bool = False,
) -> dict[str, str]:
    """Write `root/{train,val,test}.zarr` (skipping any already complete with the same config); their URLs.

    With `unlabeled` (a count, 0 included) also `root/distill.zarr`, the student's store: the `train` clips
    (the same clips, names and labels as train.zarr) followed by `unlabeled` more of the same kind (their own
    index range), written without labels, as a pool of unlabeled audio arrives (URL under `"distill"`).
    `single_label`: the variant with one event, so one class, per clip (`generate_demo_clip`)."""
    from ced_lightning.core.progress import ProgressLog
    from ced_lightning.store.audio_writer import AudioStoreWriter
    from ced_lightning.store.lock import store_lock

    root = os.fspath(root).rstrip("/")
    if "://" not in root:
        Path(root).mkdir(parents=True, exist_ok=True)
    if unlabeled is not None and unlabeled < 0:
        raise ConfigError(f"demo.unlabeled={unlabeled}: the unlabeled pool's clip count cannot be negative")
    urls: dict[str, str] = {}
    stores = [("train", train), ("val", val), ("test", test)] + (
        [("distill", train)] if unlabeled is not None else []
    )
    for split, count in stores:
        if count <= 0:
            raise ConfigError(f"demo.{split}={count}: each split needs at least one clip")
        url = f"{root}/{split}.zarr"
        config = {
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed),
            "split": split,
            "clips": int(count),
            "clip_seconds": float(clip_seconds),
        }
        if single_label:  # only where set: stores of the multi-label demo keep their job signature
            config["single_label"] = True
        jobs = _split_jobs(
            "train" if split == "distill" else split, int(seed), int(count), float(clip_seconds), single_label
        )
        if split == "distill":
            config["unlabeled"] = int(unlabeled)
            jobs += _split_jobs("unlabeled", int(seed), int(unlabeled), float(clip_seconds), single_label)
        with store_lock(url, "prepare"):
            writer = AudioStoreWriter(
                url,
                class_names=DEMO_CLASSES,
                class_mids=DEMO_MIDS,
                source="demo",
                config=config,
                overwrite=overwrite,
            )
            if writer.complete_store is None:
                jobs = jobs[writer.skip_items() :]
                log.info("demo: writing %d %s clips to %s", len(jobs), split, url)
                with ProgressLog(f"demo {split} store", len(jobs), unit="clips") as logged:
                    for name, samples, labels in _generate(jobs, workers):
                        # The pool's clips go in without labels: nothing downstream can read them.
                        writer.add(name, samples, None if name.startswith("demo_unlabeled_") else labels)
                        logged.advance()
                writer.finish()
        urls[split] = url
    return urls


def _generate(jobs: list[Job], workers: int) -> Iterator[tuple[str, np.ndarray, list[int]]]:
    if workers <= 0 or len(jobs) < 64:
        yield from map(_clip_job, jobs)
        return
    # fork on Linux (workers start at once; they only run numpy), spawn elsewhere.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    with get_context(method).Pool(workers) as pool:
        yield from pool.imap(_clip_job, jobs, chunksize=16)
