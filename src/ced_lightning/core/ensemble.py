"""The ensemble's rules, pure: which combinations exist, how teachers' logits become the ensemble's
probabilities, and which teacher sets form an ensemble. Shared by extraction (`modules.ensemble`), its replay
(`engines.verify`) and scoring (`engines.scoring`), so all three combine teachers the same way."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ced_lightning.core.augment import AugmentParams, AugmentRecipe, augmented_spectrograms
from ced_lightning.core.errors import ConfigError, InputError

COMBINES = ("mean_prob", "mean_logit")


def check_combine(combine: str) -> None:
    if combine not in COMBINES:
        raise ConfigError(f"teacher.combine must be one of {list(COMBINES)}, not {combine!r}")


def combine_probabilities(
    logits: Sequence[torch.Tensor], combine: str, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Teachers' logits `[B, C]` each -> ensemble probabilities float32 `[B, C]`; with `weights` (one per
    teacher, positive) a weighted mean instead of the plain one. All weights 1 is the plain mean, bit for bit
    (the same operations), so stores extracted before weights existed replay exactly.

    Raises `NonFiniteTeacherOutput` for NaN or inf logits (one check for all teachers: one device sync).
    """
    check_combine(combine)
    stacked = torch.stack([t.float() for t in logits])
    finite = torch.isfinite(stacked).all(-1)
    if not bool(finite.all()):
        teacher = int(torch.nonzero(~finite.all(-1))[0])
        raise NonFiniteTeacherOutput(teacher, torch.nonzero(~finite[teacher]).flatten().tolist())
    if weights is None or all(float(w) == 1.0 for w in weights):
        if combine == "mean_prob":
            return torch.sigmoid(stacked).mean(0)
        return torch.sigmoid(stacked.mean(0))
    if len(weights) != len(logits):
        raise ValueError(f"{len(weights)} weights for {len(logits)} teachers")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=stacked.device)
    w = (w / w.sum()).view(-1, *([1] * (stacked.dim() - 1)))
    if combine == "mean_prob":
        return (torch.sigmoid(stacked) * w).sum(0)
    return torch.sigmoid((stacked * w).sum(0))


def ensemble_probabilities(
    teachers: Sequence[nn.Module],
    waveform: torch.Tensor,
    lengths: torch.Tensor,
    params: AugmentParams,
    recipe: AugmentRecipe,
    combine: str,
    mel_sources: Sequence[int] | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Every teacher on its own augmented spectrogram of the same draws, combined (`combine_probabilities`,
    with the teachers' `weights`): float32 `[B, C]`.

    Each teacher masks its own front end's output (other mel bins or hop), so the same stored parameters
    cover the same part of the sound for all of them. The waveform is augmented once, and teachers with the
    same front end share its spectrogram (`mel_sources`: `front_end_sources` of the teachers' front ends).
    """
    front_ends = [t.front_end for t in teachers]
    mels = augmented_spectrograms(front_ends, waveform, lengths, params, recipe, mel_sources)
    logits = [teacher.forward_spectrogram(mel) for teacher, mel in zip(teachers, mels, strict=True)]
    return combine_probabilities(logits, combine, weights)


class NonFiniteTeacherOutput(ValueError):
    """A teacher gave NaN or inf logits for some rows of a batch (quantizing them fails, or stores junk)."""

    def __init__(self, teacher: int, rows: list[int]) -> None:
        super().__init__(f"teacher {teacher} gave NaN or inf logits for batch rows {rows}")
        self.teacher, self.rows = teacher, rows


def check_teachers(teachers: Sequence[nn.Module], names: Sequence[str] | None = None) -> int:
    """The ensemble's class count; refuses teachers that disagree or lack the model interface."""
    if not teachers:
        raise ConfigError("teacher.members is empty: the ensemble needs at least one teacher")
    names = list(names) if names is not None else [f"teacher {i}" for i in range(len(teachers))]
    for name, teacher in zip(names, teachers, strict=True):
        for attr in ("front_end", "forward_spectrogram", "num_classes"):
            if not hasattr(teacher, attr):
                raise TypeError(f"{name}: a teacher needs .front_end, .forward_spectrogram and .num_classes")
    counts = {name: int(t.num_classes) for name, t in zip(names, teachers, strict=True)}
    if len(set(counts.values())) > 1:
        raise InputError(
            f"teachers predict different numbers of classes: {counts}; an ensemble needs one list"
        )
    return next(iter(counts.values()))
