"""The extraction's reads: one DataLoader item is one block of the logit store (`block_clips` consecutive
rows: clips, or the segments of clips in a store of segments, `ced_lightning.store.segments`), and each rank
gets a contiguous share of the blocks still missing (`rank_share`), so every block is written by exactly one
process (`TeacherEnsembleModule` writes them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ced_lightning.core.audio import pack_clips
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.concat import ConcatAudioStore, open_audio
from ced_lightning.store.segments import SegmentTable, read_segments


class BlockDataset(Dataset):
    """Item `b`: block `b` of the logit store, `{"block", "index" [n], "waveform" int16 [n, T], "length"}`
    (`index`: the block's rows).

    Waveforms stay int16 until a micro-batch reaches the model: a 1024-clip block of 10 s clips is 330 MB
    as int16, twice that as float32.
    """

    def __init__(
        self, audio_url: str | list[str], segments: SegmentTable, block_clips: int, clip_samples: int
    ) -> None:
        self.audio_url = audio_url if isinstance(audio_url, list) else str(audio_url)  # a list: read as one
        self.segments = segments
        self.num_rows = len(segments)
        self.block_clips = block_clips
        self.clip_samples = clip_samples
        self._audio: AudioStore | ConcatAudioStore | None = None

    def __len__(self) -> int:
        return -(-self.num_rows // self.block_clips)

    def __getitem__(self, b: int) -> dict[str, Any]:
        if self._audio is None:  # opened in the worker process that reads
            self._audio = open_audio(self.audio_url)
        start = b * self.block_clips
        stop = min(start + self.block_clips, self.num_rows)
        # Teachers see each row's segment (at most clip_samples): an hour-long recording is not read whole.
        rows = read_segments(self._audio, self.segments, np.arange(start, stop))
        waveform, lengths = pack_clips([rows[r] for r in range(start, stop)], self.clip_samples)
        return {
            "block": b,
            "index": torch.arange(start, stop, dtype=torch.int64),
            "waveform": torch.from_numpy(waveform),
            "length": torch.from_numpy(lengths),
        }


def rank_share(blocks: Sequence[int], num_replicas: int, rank: int) -> list[int]:
    """Rank `rank`'s contiguous share of `blocks` (shares differ in size by at most one block)."""
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} out of range for {num_replicas} processes")
    bounds = np.linspace(0, len(blocks), num_replicas + 1).round().astype(int)
    return [int(b) for b in blocks[bounds[rank] : bounds[rank + 1]]]


class BlockSampler(Sampler[int]):
    """Yields this rank's contiguous share of `blocks`, in order (disjoint across ranks, nothing repeated)."""

    def __init__(self, blocks: Sequence[int], num_replicas: int = 1, rank: int = 0) -> None:
        self.blocks = rank_share(list(blocks), num_replicas, rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)
