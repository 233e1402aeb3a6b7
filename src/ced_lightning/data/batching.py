"""Batching clips of different lengths: group them by length (`batches_by_length`) and pad a group to its
longest clip (`pad_batch`, on `audio.pack_clips`). Evaluation (`scoring.score_store`, the data modules'
`EqualLengthBatches`) and tagging (`predict`) batch clips this way.

With `tolerance=0` a batch holds clips of exactly one length and needs no padding: CED averages over all its
time tokens, so zeros appended by a neighbour in the batch would change a clip's scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ced_lightning.core.audio import pack_clips
from ced_lightning.core.errors import ConfigError


def batches_by_length(lengths: Sequence[int], batch_size: int, tolerance: int = 0) -> list[list[int]]:
    """Group item indices into batches of at most `batch_size` whose lengths differ by at most `tolerance`.

    Items are sorted by length (ties keep input order), so with `tolerance=0` a batch only holds clips of
    exactly one length and needs no padding.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and lengths[i] - lengths[current[0]] <= tolerance:
            current.append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(clips: Sequence[torch.Tensor | np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D clips (tensors on the CPU or arrays, of one dtype) into `[B, longest]`, zero-padded at the
    end, and the samples of each (int64 `[B]`)."""
    arrays = [clip.numpy() if isinstance(clip, torch.Tensor) else np.asarray(clip) for clip in clips]
    waveform, lengths = pack_clips(arrays, max(len(a) for a in arrays))
    return torch.from_numpy(waveform), torch.from_numpy(lengths)
