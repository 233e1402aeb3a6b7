"""The original CED's stored augmentation seeds, replayed into explicit `AugmentParams`.

The paper's code keeps one int32 seed per (augmentation epoch, clip) and replays it with
`torch.manual_seed(seed)`, then
1. torch_audiomentations' `Shift(min_shift=-0.5, max_shift=0.5)` (p = 0.5 per example, rollover): a Bernoulli
   draw, and only when it comes up 1 an integer shift drawn by `torch.randint` in
   `[round(-0.5 * N), round(0.5 * N)]` for the clip's own length N (Python's `round`, halves to even);
2. `value = torch.rand(1)`, `min_value = torch.rand(1)`, shared by the time and the frequency mask: on an axis
   of `size` columns with mask parameter P, the masked columns are `[start, start + width)` with
   `width = long(value * P)` and `start = long(min_value * (size - value * P))`, in float32.

Here the same draws come from a private `torch.Generator` (the same Mersenne Twister as the global one, so
the values are identical without touching global RNG state), and the masks are placed on the 10 s batch
grid the original's AudioSet batches have: 1001 frames of 10 ms and 64 mel bands, which are exactly the
reference grids of `ced_lightning.core.augment` (one CED frame/band per reference frame/band).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import REF_HOP, REF_N_MELS, AugmentParams, AugmentRecipe

# torch_audiomentations 0.11 `Shift` as the released logitconfigs use it, and the masks' parameters.
LEGACY_SHIFT_PROB = 0.5
LEGACY_MIN_SHIFT, LEGACY_MAX_SHIFT = -0.5, 0.5
LEGACY_TIME_MASK_PARAM = 192
LEGACY_FREQ_MASK_PARAM = 24
LEGACY_CHUNK_SAMPLES = 10 * SAMPLE_RATE
# Frames of the front end's log-mel of a batch padded to 10 s (hop 160, centred STFT): 1 + 160000 // 160.
LEGACY_BATCH_FRAMES = 1 + LEGACY_CHUNK_SAMPLES // REF_HOP
LEGACY_MEL_BANDS = REF_N_MELS

# What the imported parameters mean in this project's terms: the paper's recipe (AugmentRecipe's defaults).
LEGACY_RECIPE = AugmentRecipe(
    shift_prob=LEGACY_SHIFT_PROB,
    shift_max=LEGACY_MAX_SHIFT,
    time_masks=1,
    time_mask_frames=LEGACY_TIME_MASK_PARAM,
    freq_masks=1,
    freq_mask_bins=LEGACY_FREQ_MASK_PARAM,
)


@dataclass(frozen=True)
class LegacyDraw:
    """What one seed gives: whether the shift applies, its `torch.roll` amount, and the masks' two draws."""

    shift_applied: bool
    shift_samples: int
    rand_value: float
    rand_min_value: float


def legacy_draw(seed: int, length: int, generator: torch.Generator | None = None) -> LegacyDraw:
    """Replay the draws of `seed` for a clip of `length` samples (the original's per-clip `Shift`)."""
    if length < 0:
        raise ValueError(f"clip length must be >= 0 samples, got {length}")
    generator = generator if generator is not None else torch.Generator()
    generator.manual_seed(int(seed))
    # Bernoulli(0.5).sample((1,)) of torch_audiomentations' per-example mode.
    applied = bool(torch.bernoulli(torch.full((1,), LEGACY_SHIFT_PROB), generator=generator).item())
    shift = 0
    if applied:
        low = round(LEGACY_MIN_SHIFT * length)
        high = round(LEGACY_MAX_SHIFT * length)
        if low != high:  # equal bounds: torch.full, no draw
            shift = int(torch.randint(low, high + 1, (1,), dtype=torch.int32, generator=generator).item())
        else:
            shift = low
    value = float(torch.rand(1, generator=generator).item())
    min_value = float(torch.rand(1, generator=generator).item())
    return LegacyDraw(applied, shift, value, min_value)


def legacy_mask(
    values: np.ndarray, min_values: np.ndarray, size: int, mask_param: int
) -> tuple[np.ndarray, np.ndarray]:
    """(start, width) int64 of the original's mask on an axis of `size` columns, in its float32 maths."""
    value = torch.as_tensor(np.asarray(values, dtype=np.float32)) * mask_param
    min_value = torch.as_tensor(np.asarray(min_values, dtype=np.float32)) * (size - value)
    return min_value.long().numpy(), value.long().numpy()


def legacy_draws(seeds: np.ndarray, lengths: np.ndarray) -> list[LegacyDraw]:
    """`legacy_draw` for every (seed, length) pair."""
    seeds, lengths = np.asarray(seeds), np.asarray(lengths)
    if seeds.shape != lengths.shape or seeds.ndim != 1:
        raise ValueError(f"seeds {list(seeds.shape)} and lengths {list(lengths.shape)} must be equal 1-D")
    generator = torch.Generator()
    return [legacy_draw(int(s), int(n), generator) for s, n in zip(seeds, lengths)]


def legacy_augment_params(seeds: np.ndarray, lengths: np.ndarray) -> AugmentParams:
    """The stored parameters (`LEGACY_RECIPE`'s fields) of clips with these seeds and lengths in samples.

    `shift` is the `torch.roll` amount within the clip's own length; time and frequency masks are placed on
    the 10 s batch grid (1001 frames, 64 bands), so a mask may lie past a short clip's end, in its padding,
    exactly as in the original.
    """
    draws = legacy_draws(seeds, lengths)
    n = len(draws)
    values = np.array([d.rand_value for d in draws], dtype=np.float32)
    min_values = np.array([d.rand_min_value for d in draws], dtype=np.float32)
    time_start, time_width = legacy_mask(values, min_values, LEGACY_BATCH_FRAMES, LEGACY_TIME_MASK_PARAM)
    freq_start, freq_width = legacy_mask(values, min_values, LEGACY_MEL_BANDS, LEGACY_FREQ_MASK_PARAM)
    return AugmentParams(
        {
            "shift": np.array([d.shift_samples for d in draws], dtype=np.int64).reshape(n),
            "time_start": time_start.reshape(n, 1),
            "time_width": time_width.reshape(n, 1),
            "freq_start": freq_start.reshape(n, 1),
            "freq_width": freq_width.reshape(n, 1),
        }
    )
