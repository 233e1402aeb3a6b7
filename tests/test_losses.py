"""Distillation maths: targets from top-k, KL and BCE, mixup λ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ced_lightning.core.losses import (
    bernoulli_kl,
    distill_loss,
    mix_with_reversed,
    mixup_lambda,
    soft_bce,
    soften,
)
from ced_lightning.core.targets import rebuild_targets


def test_rebuild_targets_zero_and_last_mean():
    indices = torch.tensor([[3, 0], [1, 2]])
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.4]])
    zero = rebuild_targets(indices, probs, num_classes=5)
    assert torch.equal(zero[0], torch.tensor([0.2, 0.0, 0.0, 0.9, 0.0]))
    last_mean = rebuild_targets(indices, probs, num_classes=5, fill="last_mean")
    assert torch.allclose(last_mean[0], torch.tensor([0.2, 0.2 / 3, 0.2 / 3, 0.9, 0.2 / 3]))
    assert torch.allclose(last_mean[1], torch.tensor([0.4 / 3, 0.6, 0.4, 0.4 / 3, 0.4 / 3]))
    with pytest.raises(ValueError, match="target_fill"):
        rebuild_targets(indices, probs, 5, fill="mean")


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kl_is_zero_when_student_equals_teacher(temperature):
    logits = torch.randn(8, 11) * 3
    teacher = torch.sigmoid(logits)
    kl = bernoulli_kl(logits, teacher, temperature)
    assert kl.shape == (8,)
    assert kl.abs().max() < 1e-5
    assert (bernoulli_kl(logits + torch.randn_like(logits), teacher, temperature) > 0).all()


def test_kl_handles_hard_zeros_and_ones():
    teacher = torch.tensor([[0.0, 1.0, 0.5]])
    kl = bernoulli_kl(torch.tensor([[-2.0, 2.0, 0.0]]), teacher, temperature=2.0)
    assert torch.isfinite(kl).all()
    assert torch.equal(soften(teacher, 2.0)[0, :2], torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kl_gradient_equals_bce_gradient_at_every_temperature(temperature):
    """KL = BCE - H(softened teacher) and H does not depend on the student, so the two losses give the same
    gradient at every T (not only at T = 1); changing one loss (its scaling, its softening) breaks this."""
    generator = torch.Generator().manual_seed(int(temperature * 10))
    teacher = torch.rand(6, 9, generator=generator)
    teacher[0, :2] = torch.tensor([0.0, 1.0])  # hard targets, as a zero-filled top-k gives
    a = (torch.randn(6, 9, generator=generator) * 3).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    kl, bce = bernoulli_kl(a, teacher, temperature), soft_bce(b, teacher, temperature)
    kl.mean().backward()
    bce.mean().backward()
    assert a.grad.abs().max() > 1e-4  # a real gradient, not two zeros
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)
    # ...and their values differ by exactly the softened teacher's entropy (times T², as both are scaled).
    p = soften(teacher, temperature)
    entropy = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)).mean(-1) * temperature**2
    assert torch.allclose(bce.detach() - kl.detach(), entropy, atol=1e-6)
    assert (entropy > 0).all()


def test_distill_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"distill\.loss"):
        distill_loss("mse", torch.zeros(1, 2), torch.zeros(1, 2))


def test_mixup_lambda_is_beta_half_half():
    u = (np.arange(20000) + 0.5) / 20000
    lam = mixup_lambda(u, 0.5)
    assert np.allclose(lam, np.sin(0.5 * np.pi * u) ** 2, atol=1e-6)
    # Beta(0.5, 0.5): mean 1/2, variance 1/8.
    assert abs(lam.mean() - 0.5) < 1e-3 and abs(lam.var() - 0.125) < 1e-3
    lam2 = mixup_lambda(u, 2.0)
    assert abs(lam2.var() - 0.05) < 1e-3  # Beta(2, 2): variance 1/20


def test_mix_with_reversed_is_the_mixing_line_of_before() -> None:
    torch.manual_seed(0)
    lam = torch.rand(4)
    mel, target = torch.randn(4, 64, 30), torch.rand(4, 7)
    assert torch.equal(
        mix_with_reversed(mel, lam), lam[:, None, None] * mel + (1 - lam[:, None, None]) * mel.flip(0)
    )
    assert torch.equal(
        mix_with_reversed(target, lam), lam[:, None] * target + (1 - lam[:, None]) * target.flip(0)
    )
    # λ = 1 keeps each clip, λ = 0 takes its partner (the reversed batch)
    assert torch.equal(mix_with_reversed(mel, torch.ones(4)), mel)
    assert torch.equal(mix_with_reversed(mel, torch.zeros(4)), mel.flip(0))
