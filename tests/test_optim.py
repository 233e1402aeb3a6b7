from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from ced_lightning.core.optim import adam8bit_or_adam, build_optimizer, parameter_groups, warmup_cosine


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.pos_embed = nn.Parameter(torch.zeros(1, 2, 3))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def test_parameter_groups_decay_matrices_only() -> None:
    net = _Net()
    decay, no_decay = parameter_groups(net, weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(net.linear.weight)]
    expected = {id(net.linear.bias), id(net.norm.weight), id(net.norm.bias), id(net.pos_embed)}
    assert {id(p) for p in no_decay["params"]} == expected  # the frozen matrix is in neither group


def test_parameter_groups_hold_every_trainable_parameter_once() -> None:
    """On a real model (CED: `no_weight_decay` names its two position embeddings): the groups
    partition the trainable parameters, decay goes to matrices not named there, and a model without 1-d
    parameters or skipped names gets one group."""
    from ced_lightning.models import create_ced

    model = create_ced("ced_tiny", depth=1, num_classes=3)
    model.outputlayer.requires_grad_(False)  # a frozen head: in neither group
    groups = parameter_groups(model, weight_decay=0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p): (name, p) for name, p in model.named_parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    skip = set(model.no_weight_decay())
    assert skip and skip <= {name for name, _ in model.named_parameters()}
    decayed = {trainable[i][0] for i in map(id, groups[0]["params"])}
    assert decayed == {name for name, p in trainable.values() if p.ndim >= 2 and name not in skip}
    assert skip.isdisjoint(decayed) and any(p.ndim >= 2 for name, p in trainable.values() if name in skip)

    only_matrices = nn.Linear(3, 2, bias=False)
    assert [(len(g["params"]), g["weight_decay"]) for g in parameter_groups(only_matrices, 0.05)] == [
        (1, 0.05)
    ]


def test_build_optimizer_applies_the_partials_weight_decay_to_matrices_only() -> None:
    from functools import partial

    net = _Net()
    optimizer = build_optimizer(partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), net)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    plain = build_optimizer(partial(torch.optim.Adam, lr=1e-3), net)
    assert len(plain.param_groups) == 1


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(110, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110) == pytest.approx(0.1)  # held after the schedule


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_paper_optimizer_falls_back_to_adam_with_a_warning_on_the_cpu() -> None:
    net = _Net()
    with pytest.warns(UserWarning, match="instead of the paper's 8-bit Adam: bitsandbytes is not installed"):
        optimizer = adam8bit_or_adam(parameter_groups(net, 0.0), lr=1e-3)
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_optim_paper_config_builds_through_hydra() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ced_lightning import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["optim=paper"])
    make = instantiate(cfg.optim.optimizer)
    with pytest.warns(UserWarning, match="8-bit Adam"):
        optimizer = build_optimizer(make, _Net())
    assert isinstance(optimizer, torch.optim.Optimizer)
