"""Several audio stores read as one: labeled and unlabeled audio without copying them into one store.

`data.train` and extract's `audio_store` take a list of stores (`open_audio`). The view numbers their clips
one store after the other (clip `i` of the second store is clip `len(first) + i`) and has the read interface
of `AudioStore` that training, extraction and segment reads use. Its fingerprint is derived from the members'
fingerprints in order, so a logit store extracted over the list matches it (and only it); the logit store also
keeps the list itself (`audio_sources`: each member's URL, fingerprint and clip count), which names the member
that differs when a student's stores do not match. A list of one store is that store.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ced_lightning.core.audio import int16_to_float
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.labels import check_same_classes
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.files import store_nbytes
from ced_lightning.store.remote import redact_url


def store_urls(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One URL or a list of them (a config's ListConfig too) as a list of strings."""
    if isinstance(urls, str | os.PathLike):
        return [os.fspath(urls)]
    return [os.fspath(u) for u in urls]


def open_audio(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> AudioStore | ConcatAudioStore:
    """The audio store at `urls`, or with several URLs the view that reads them as one store."""
    names = store_urls(urls)
    if not names:
        raise ConfigError("an empty list of audio stores: give at least one store")
    if len(names) == 1:
        return AudioStore.open(names[0])
    return ConcatAudioStore([AudioStore.open(u) for u in names])


def audio_source(store: AudioStore | ConcatAudioStore) -> str | list[str]:
    """What `open_audio` takes to open `store` again (e.g. in a worker process)."""
    return list(store.urls) if isinstance(store, ConcatAudioStore) else store.url


def audio_nbytes(store: AudioStore | ConcatAudioStore) -> int:
    """Stored bytes of the store, or of every member of a view."""
    return sum(store_nbytes(u) for u in store_urls(audio_source(store)))


def source_records(store: AudioStore | ConcatAudioStore) -> list[dict[str, Any]] | None:
    """The members of a view as a logit store records them (URL without credentials, fingerprint, clips);
    None for a single store (its fingerprint is the logit store's `audio_fingerprint`)."""
    if not isinstance(store, ConcatAudioStore):
        return None
    return [
        {"url": redact_url(s.url), "fingerprint": s.fingerprint, "num_clips": len(s)} for s in store.stores
    ]


def describe_source_mismatch(
    stored: Sequence[dict[str, Any]] | None, store: AudioStore | ConcatAudioStore
) -> str:
    """Which member differs between the sources a logit store records (`audio_sources`; None: one store)
    and `store`; empty when the members agree (or the logit store records none)."""
    if not stored:
        return ""
    have = source_records(store) or [
        {"url": store.url, "fingerprint": store.fingerprint, "num_clips": len(store)}
    ]
    if len(stored) != len(have):
        listed = ", ".join(str(s["url"]) for s in stored)
        return f"the logit store was made over {len(stored)} audio stores ({listed}), not {len(have)}"
    for k, (old, new) in enumerate(zip(stored, have, strict=True)):
        if old["fingerprint"] != new["fingerprint"] or int(old["num_clips"]) != int(new["num_clips"]):
            return (
                f"audio store {k + 1} of {len(have)} differs: the logit store was made over {old['url']} "
                f"({old['num_clips']} clips, fingerprint {old['fingerprint']}), this run reads {new['url']} "
                f"({new['num_clips']} clips, fingerprint {new['fingerprint']})"
            )
    return ""


def concat_fingerprint(fingerprints: Sequence[str]) -> str:
    digest = hashlib.sha256(b"ced-audio-store-list\0")
    for fingerprint in fingerprints:
        digest.update(str(fingerprint).encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


class ConcatAudioStore:
    """Audio stores read as one, one after the other; the read side of `AudioStore` (cheap to pickle: its
    members reopen their arrays in worker processes)."""

    def __init__(self, stores: Sequence[AudioStore]) -> None:
        if not stores:
            raise ValueError("ConcatAudioStore needs at least one audio store")
        self.stores = list(stores)
        self.urls = [s.url for s in self.stores]
        self.url = " + ".join(self.urls)  # for messages; `audio_source` gives what reopens it
        rates = {s.sample_rate for s in self.stores}
        if len(rates) > 1:
            raise InputError(f"{self.url}: the audio stores have different sample rates {sorted(rates)}")
        self.sample_rate = self.stores[0].sample_rate
        # Unlabeled stores (no class list) join any; stores with class lists must share one.
        labeled = [s for s in self.stores if s.num_classes]
        for s in labeled[1:]:
            check_same_classes(
                s.class_names,
                labeled[0].class_names,
                sources=(s.url, labeled[0].url),
                counts=(s.num_classes, labeled[0].num_classes),
                unnamed_matches=False,
                message=f"{s.url} has another class list than {labeled[0].url}",
                advice="stores read as one must share it",
            )
        self.num_classes: int | None = labeled[0].num_classes if labeled else None
        self.class_names: list[str] | None = labeled[0].class_names if labeled else None
        self.class_mids: list[str] | None = labeled[0].class_mids if labeled else None
        self.has_labels = any(s.has_labels for s in self.stores)
        self.fingerprint = concat_fingerprint([s.fingerprint for s in self.stores])
        self.starts = np.concatenate([[0], np.cumsum([len(s) for s in self.stores])]).astype(np.int64)
        self.names: list[str] = [name for s in self.stores for name in s.names]
        self.lengths: np.ndarray = np.concatenate([s.lengths for s in self.stores]).astype(np.int64)
        self._label_matrix: np.ndarray | None = None

    @classmethod
    def open(cls, urls: Sequence[str | os.PathLike]) -> ConcatAudioStore:
        return cls([AudioStore.open(u) for u in store_urls(urls)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        hours = float(self.lengths.sum()) / self.sample_rate / 3600
        classes = self.num_classes
        return f"ConcatAudioStore({self.urls!r}, clips={len(self)}, hours={hours:.2f}, classes={classes})"

    def _locate(self, i: int) -> tuple[AudioStore, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"{self.url}: clip index {i} out of range for {n} clips")
        i %= n
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.stores[k], i - int(self.starts[k])

    def _pieces(self, start: int, stop: int) -> list[tuple[AudioStore, int, int]]:
        """`[start, stop)` as (member, local start, local stop), in order."""
        n = len(self)
        if not 0 <= start <= stop <= n:
            raise IndexError(f"{self.url}: span [{start}, {stop}) out of range for {n} clips")
        pieces = []
        for k, store in enumerate(self.stores):
            lo, hi = max(start, int(self.starts[k])), min(stop, int(self.starts[k + 1]))
            if lo < hi:
                pieces.append((store, lo - int(self.starts[k]), hi - int(self.starts[k])))
        return pieces

    def read(self, i: int) -> torch.Tensor:
        """Clip `i` as float32 `[samples]` in [-1, 1)."""
        return int16_to_float(torch.from_numpy(self.read_samples(i)))

    def read_samples(self, i: int) -> np.ndarray:
        store, j = self._locate(int(i))
        return store.read_samples(j)

    def read_clip_range(self, i: int, begin: int, end: int) -> np.ndarray:
        """Samples `[begin, end)` of clip `i`."""
        store, j = self._locate(int(i))
        return store.read_clip_range(j, begin, end)

    def read_clips(self, start: int, stop: int, max_samples: int | None = None) -> list[np.ndarray]:
        """Clips `[start, stop)` as int16 arrays (one read per member the span touches)."""
        return [
            clip
            for store, lo, hi in self._pieces(start, stop)
            for clip in store.read_clips(lo, hi, max_samples=max_samples)
        ]

    def read_span(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Clips `[start, stop)` in one flat array: (int16 samples, int64 offsets into them)."""
        clips = self.read_clips(start, stop)
        rel = np.concatenate([[0], np.cumsum([len(c) for c in clips])]).astype(np.int64)
        flat = np.concatenate(clips) if clips else np.zeros(0, dtype=np.int16)
        return flat, rel

    def chunk_spans(self) -> np.ndarray:
        """Clip index boundaries of the groups of clips that share a chunk of their member store."""
        spans = [s.chunk_spans()[1:] + int(self.starts[k]) for k, s in enumerate(self.stores)]
        return np.concatenate([[0], *spans]).astype(np.int64)

    def labels(self, i: int) -> np.ndarray:
        store, j = self._locate(int(i))
        return store.labels(j)

    def label_counts(self) -> np.ndarray:
        """Labels per clip, int64 `[N]` (0 for a clip without)."""
        return np.concatenate([s.label_counts() for s in self.stores]).astype(np.int64)

    def label_matrix(self) -> np.ndarray:
        """Multi-hot uint8 `[N, num_classes]`: rows of stores without labels are all zero."""
        if self._label_matrix is None:
            if not self.num_classes:
                raise InputError(f"{self.url}: none of the stores has a class list, so no label matrix")
            parts = [
                s.label_matrix() if s.num_classes else np.zeros((len(s), self.num_classes), dtype=np.uint8)
                for s in self.stores
            ]
            self._label_matrix = np.concatenate(parts)
        return self._label_matrix

    def failures(self) -> list[dict]:
        return [failure for s in self.stores for failure in s.failures()]
