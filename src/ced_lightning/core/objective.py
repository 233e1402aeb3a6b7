"""How a tagger's outputs read (`task.objective`): a sigmoid per class (`multi_label`: any number of classes
per clip, CED's and AudioSet's case) or one softmax over the classes (`single_label`: one class per clip).
Training, the checkpoints (`objective`) and every reader of a checkpoint (evaluate, predict, the Python API,
export) turn logits into probabilities here. Only torch: the inference path imports it.
"""

from __future__ import annotations

from typing import Literal

import torch

from ced_lightning.core.errors import ConfigError

Objective = Literal["multi_label", "single_label"]
OBJECTIVES: tuple[str, ...] = ("multi_label", "single_label")


def check_objective(objective: str) -> str:
    """`objective` when it is one of OBJECTIVES, else a ConfigError naming `task.objective`."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"task.objective must be one of {list(OBJECTIVES)}, not {objective!r}")
    return objective


def probabilities_from_logits(logits: torch.Tensor, objective: str = "multi_label") -> torch.Tensor:
    """A tagger's logits -> its probabilities, float32: a sigmoid per class (multi_label), a softmax over the
    classes (single_label). The cast comes first: a sigmoid in 16 bits (mixed precision) would round
    probabilities near 0 and 1 into ties that change the ranking AP measures."""
    if objective == "single_label":
        return torch.softmax(logits.float(), dim=-1)
    return torch.sigmoid(logits.float())
