"""Training losses: the supervised objectives (multi-label BCE, single-label cross-entropy), distillation
losses on multi-label (sigmoid) outputs, and mixup (λ per clip, the mixing of a batch)."""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

from ced_lightning.core.errors import ConfigError
from ced_lightning.core.objective import Objective, check_objective
from ced_lightning.core.rng import counter_uniform, stream_id

DistillLoss = Literal["kl", "bce"]


def supervised_loss(objective: Objective, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The batch mean of the supervised loss on float32 logits `[B, C]` and targets `[B, C]`.

    multi_label: binary cross-entropy per class on multi-hot targets. single_label: cross-entropy of the
    softmax against the target row read as class probabilities (one-hot, or two rows mixed by mixup, which
    still sum to 1).
    """
    logits, target = logits.float(), target.float()
    if check_objective(objective) == "single_label":
        return F.cross_entropy(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def soften(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities at temperature T: `sigmoid(logit(p) / T)`; exact (no epsilon) at T = 1.

    On targets rebuilt from a stored top-k (`targets.rebuild_targets`), T != 1 is not the paper's (it uses
    T = 1) and distorts them: the stored classes move towards 0.5 while the unstored ones stay at their fill
    (0 with `zero` fill stays exactly 0), unlike softening the teachers' full output.
    """
    if temperature == 1.0:
        return probs
    # logit(0) = -inf and logit(1) = inf map back to exactly 0 and 1.
    return torch.sigmoid(torch.logit(probs) / temperature)


def bernoulli_kl(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-class Bernoulli KL(teacher || student) at temperature T, times T², per sample `[B]` (class mean).

    KL = BCE(student, p) - H(p), with p the softened teacher: H(p) does not depend on the student, so the
    gradient w.r.t. the student logits equals soft BCE's at every T; only the value differs, zero when the
    student equals the teacher, so it reads as a distance.
    """
    p = soften(teacher_probs.float(), temperature)
    z = student_logits.float() / temperature
    cross = F.binary_cross_entropy_with_logits(z, p, reduction="none")
    entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
    return (cross - entropy).mean(-1) * temperature**2


def soft_bce(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Binary cross-entropy with soft targets (the paper's loss), per sample `[B]` (class mean)."""
    p = soften(teacher_probs.float(), temperature)
    z = student_logits.float() / temperature
    return F.binary_cross_entropy_with_logits(z, p, reduction="none").mean(-1) * temperature**2


def distill_loss(
    kind: DistillLoss, student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-sample distillation loss `[B]` of kind `kl` or `bce` (config key `distill.loss`)."""
    if kind == "kl":
        return bernoulli_kl(student_logits, teacher_probs, temperature)
    if kind == "bce":
        return soft_bce(student_logits, teacher_probs, temperature)
    raise ConfigError(f"distill.loss must be 'kl' or 'bce', not {kind!r}")


def mixup_lambda(uniform: np.ndarray, alpha: float) -> np.ndarray:
    """λ ~ Beta(α, α) by the exact inverse CDF of uniforms in [0, 1), so that λ is a pure function of
    counter-based uniforms and replays exactly on resume (for α = 0.5 this is sin²(πu/2))."""
    return scipy.special.betaincinv(alpha, alpha, uniform).astype(np.float32)


def mix_with_reversed(x: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mixup's mixing, the one place it is written: `λ·x + (1-λ)·x.flip(0)`, each clip with the batch's
    reverse, λ per clip `[B]` (broadcast over the other dimensions of `x`: spectrograms, targets)."""
    lam = lam.to(x).reshape(-1, *[1] * (x.dim() - 1))
    return lam * x + (1 - lam) * x.flip(0)


def sample_mixup_lambda(seed: int, epoch: int, indices: np.ndarray, alpha: float) -> np.ndarray:
    """Per-clip mixup λ for training epoch `epoch`, keyed by (seed, epoch, clip index)."""
    uniform = counter_uniform(seed, epoch, np.asarray(indices), stream_id("losses.mixup_lambda"))
    return mixup_lambda(uniform, alpha)
