"""Building CED models in the manner of timm: sizes by name (`create_ced`) and initialisation from another
model's weights (`load_matching_weights`: crop or stretch position embeddings, a fresh head). Reading and
writing checkpoint files is `models.checkpoint`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import nn

from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.models.ced import CED, CED_SIZES, CEDConfig
from ced_lightning.models.checkpoint import read_state_dict
from ced_lightning.models.released import released_entry, released_entry_by_filename

log = logging.getLogger(__name__)


def list_ced() -> list[str]:
    return list(CED_SIZES)


def create_ced(name: str = "ced_mini", pretrained: bool | str = False, **overrides: Any) -> CED:
    """Build a CED model by size name (`ced_tiny`, `ced_mini`, `ced_small`, `ced_base`).

    `overrides` are `CEDConfig` fields, e.g. `depth=2`, `num_classes=12`, `drop_path_rate=0.1`.
    `pretrained=True` starts from the paper's released AudioSet model of that size (`name`'s entry in
    `list_released()`); a string names another released file (e.g. `"ced_mini_mae"`) or a checkpoint path.
    Loaded as `load_matching_weights(strict=True)`: a head for another number of classes starts fresh.
    """
    if name not in CED_SIZES:
        raise ConfigError(f"unknown CED model {name!r}; choose one of {list_ced()}")
    model = CED(CEDConfig(**CED_SIZES[name]), **overrides)
    if pretrained:
        load_matching_weights(model, name if pretrained is True else pretrained)
    return model


def resize_pos_embed(pos_embed: torch.Tensor, size: int, dim: int) -> torch.Tensor:
    """Crop or bilinearly stretch a position embedding along `dim` (-1 time, -2 frequency)."""
    if pos_embed.shape[dim] >= size:
        return pos_embed.narrow(dim, 0, size).clone()
    target = list(pos_embed.shape[-2:])
    target[dim] = size
    return nn.functional.interpolate(pos_embed, size=tuple(target), mode="bilinear", align_corners=False)


_HEAD_PREFIX = "outputlayer."  # the classifier: fine-tuning for other classes, or an MAE encoder without it


@dataclass(frozen=True)
class InitReport:
    """How `load_matching_weights` initialised a model from a checkpoint (keys in the model's order)."""

    source: str
    loaded: list[str]  # tensors taken from the file (position embeddings possibly resized)
    resized: list[str]  # position embeddings cropped or stretched to the model's length
    head: list[str]  # classifier tensors kept at their own initialisation (other classes, or not in file)
    missing: list[str]  # other model tensors the file lacks
    mismatched: list[str]  # other tensors in both, shapes differ ("key: file [..] vs model [..]")
    unexpected: list[str]  # file tensors the model has no place for
    unexpected_ok: bool = False  # the file is known to carry extra tensors (released MAE files)

    @property
    def skipped(self) -> list[str]:
        """Every model tensor (front end aside) that kept its own initialisation."""
        return [*self.head, *self.missing, *(m.split(":")[0] for m in self.mismatched)]

    @property
    def complete(self) -> bool:
        """The whole model but its head comes from the file, and the file has nothing the model leaves out."""
        return not self.missing and not self.mismatched and (self.unexpected_ok or not self.unexpected)

    def describe(self) -> str:
        total = len(self.loaded) + len(self.skipped)
        lines = [f"init_from {self.source}: {len(self.loaded)} of the model's {total} tensors match"]
        for what, keys in (
            ("missing from the file", self.missing),
            ("shape differs", self.mismatched),
            ("in the file, not in the model", self.unexpected),
            ("head kept at its own initialisation", self.head),
            ("position embeddings resized", self.resized),
        ):
            if keys:
                more = f", ... ({len(keys) - _EXAMPLES} more)" if len(keys) > _EXAMPLES else ""
                lines.append(f"  {what} ({len(keys)}): {', '.join(keys[:_EXAMPLES])}{more}")
        return "\n".join(lines)


_EXAMPLES = 4


def grow_as_identity(model: CED, missing: list[str]) -> list[int]:
    """A deeper model started from a shallower file (the file's blocks are the model's first ones): the
    blocks the file lacks get zero output projections (attention and MLP), so each adds nothing to its
    residual stream and the model computes exactly the file's network. Their other weights keep their
    initialisation, so they learn from the first step on (the output projections' gradients are not zero).
    Returns the indices of the blocks grown, or [] when `missing` is not only whole trailing blocks."""
    depth = len(model.blocks)
    missing_blocks = {int(key.split(".")[1]) for key in missing if key.startswith("blocks.")}
    if not missing_blocks or any(not key.startswith("blocks.") for key in missing):
        return []
    first = min(missing_blocks)
    block_keys = {k for k in model.state_dict() if k.startswith("blocks.")}
    whole = {k for k in block_keys if int(k.split(".")[1]) >= first}
    if first == 0 or missing_blocks != set(range(first, depth)) or set(missing) != whole:
        return []
    with torch.no_grad():
        for block in model.blocks[first:]:
            for layer in (block.attn.proj, block.mlp.fc2):
                layer.weight.zero_()
                layer.bias.zero_()
    return list(range(first, depth))


def load_matching_weights(
    model: CED, path: str | PathLike, strict: bool = True, head: bool = True
) -> InitReport:
    """Initialise `model` from a CED or MAE-pretrained checkpoint (a path or a released name).

    Position embeddings of another length are cropped or stretched, and the classifier head may differ (other
    classes) or be absent (MAE encoders): those start from the model's own initialisation. The front end is
    never loaded (its buffers follow from the model's config). Anything else that does not match (tensors
    missing from the file or of other shapes, tensors in the file the model has no place for) raises a
    ValueError listing them, unless `strict=False`, which loads what matches and logs the rest.
    `head=False` keeps the model's own freshly initialised head even where the file's fits (fine-tuning on a
    new label set that happens to have as many classes).
    """
    source = str(path)
    sd = {k: v for k, v in read_state_dict(path).items() if not k.startswith("front_end.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("front_end.")}
    resized = []
    for key, dim in (("time_pos_embed", -1), ("freq_pos_embed", -2)):
        # Same embedding size, only the length differs: crop or stretch.
        if (
            key in sd
            and key in own
            and sd[key].shape != own[key].shape
            and sd[key].shape[:2] == own[key].shape[:2]
        ):
            sd[key] = resize_pos_embed(sd[key], own[key].shape[dim], dim)
            resized.append(key)
    usable = {
        k: v
        for k, v in sd.items()
        if k in own and v.shape == own[k].shape and (head or not k.startswith(_HEAD_PREFIX))
    }
    # Each head layer is taken whole or not at all: a classifier's bias without its weight is noise.
    for key in [k for k in own if k.startswith(_HEAD_PREFIX) and k not in usable]:
        layer = key.rsplit(".", 1)[0] + "."
        usable = {k: v for k, v in usable.items() if not k.startswith(layer)}
    head, missing, mismatched = [], [], []
    for key, tensor in own.items():
        if key in usable:
            continue
        if key.startswith(_HEAD_PREFIX):
            head.append(key)
        elif key not in sd:
            missing.append(key)
        else:
            mismatched.append(f"{key}: file {list(sd[key].shape)} vs model {list(tensor.shape)}")
    # A released file given by path (the offline route the docs name) is judged as by its name.
    entry = released_entry(path) or released_entry_by_filename(path)
    report = InitReport(
        source=source,
        loaded=[k for k in own if k in usable],
        resized=resized,
        head=head,
        missing=missing,
        mismatched=mismatched,
        unexpected=[k for k in sd if k not in own],
        unexpected_ok=entry is not None and entry.unused_tensors_ok,
    )
    if strict and (not report.complete or not report.loaded):
        raise InputError(
            report.describe()
            + "\nThe checkpoint does not fit this model. Choose one of this size and depth, or accept a "
            "partial start with model.init_strict=false (load_matching_weights(strict=False))."
        )
    model.load_state_dict(usable, strict=False)
    grown = grow_as_identity(model, missing)
    if grown:
        log.info(
            "init_from %s: blocks %d-%d are not in the file and start as identities (the model starts as "
            "the file's %d-block network)",
            source,
            grown[0],
            grown[-1],
            grown[0],
        )
    if not report.complete:
        log.warning("%s", report.describe())
    else:
        log.info("%s", report.describe())
    return report
