"""The callbacks' pure parts: `average_state_dicts`, the weight averaging behind `averaged.ckpt`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ced_lightning.engines.callbacks import average_state_dicts


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_average_state_dicts_is_the_element_wise_mean_of_float_tensors() -> None:
    nets = [_net(seed) for seed in range(3)]
    for steps, net in enumerate(nets, 1):  # BatchNorm's running statistics and counters differ too
        net.train()
        for _ in range(steps):
            net(torch.randn(5, 3))
    states = [net.state_dict() for net in nets]
    averaged = average_state_dicts(states)
    assert list(averaged) == list(states[0])  # every key, in the model's order
    for key, value in averaged.items():
        if key.endswith("num_batches_tracked"):  # an integer buffer: the first checkpoint's, not a mean
            assert value.dtype == torch.long and value.item() == 1
        else:
            expected = (states[0][key] + states[1][key] + states[2][key]) / 3
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    net = _net(9)
    net.load_state_dict(averaged)  # a state dict the model loads as it is


def test_average_state_dicts_keeps_dtypes_and_means_in_float32() -> None:
    """A float16 mean taken in float16 overflows (60000 + 60000 is inf there); the mean is taken in float32
    and stored back in the checkpoint's dtype."""
    a = {
        "w": torch.full((2,), 60000.0, dtype=torch.float16),
        "b": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
    }
    b = {
        "w": torch.full((2,), 60000.0, dtype=torch.float16),
        "b": torch.tensor([3.0, 6.0], dtype=torch.bfloat16),
    }
    averaged = average_state_dicts([a, b])
    assert averaged["w"].dtype == torch.float16 and averaged["b"].dtype == torch.bfloat16
    assert averaged["w"].tolist() == [60000.0, 60000.0] and averaged["b"].tolist() == [2.0, 4.0]


def test_average_state_dicts_of_one_is_a_copy() -> None:
    state = {"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(7)}
    averaged = average_state_dicts([state])
    assert torch.equal(averaged["w"], state["w"]) and averaged["count"].item() == 7
    averaged["w"].add_(1)
    averaged["count"].add_(1)
    assert state["w"].tolist() == [1.0, 2.0] and state["count"].item() == 7  # the input is untouched


def test_average_state_dicts_refuses_nothing_and_other_keys() -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        average_state_dicts([])
    a, b = {"w": torch.zeros(2)}, {"w": torch.zeros(2), "extra": torch.zeros(1)}
    with pytest.raises(ValueError, match="checkpoint 1 has other keys than checkpoint 0"):
        average_state_dicts([a, a, b][1:])
    with pytest.raises(ValueError, match="checkpoint 2 has other keys than checkpoint 0"):
        average_state_dicts([a, a, b])
