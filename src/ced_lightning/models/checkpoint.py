"""The checkpoint format: what our checkpoints carry, written in one place and read in one place.

A Lightning checkpoint of our training holds, beside Lightning's own keys (`state_dict`, loops, optimiser):
`model_spec` (rebuilds the network: `build_model`), `class_names` (the outputs' names, or None),
`eval_prefix` (`model.` or `ema.`: the `state_dict` prefix of the weights to evaluate), `objective` (how the
outputs read: `multi_label` sigmoids, `single_label` one softmax) and `rng_states` (torch's generators, for
an exact resume); `write_metadata` adds them, `restore_rng_states` reads the last. `save_ced` writes the
released layout (`{'model': state_dict}`) plus `ced_config`, and the class names and objective where given.
`load_checkpoint` reads any of these and the released CED files (`.pt`, the Hub's safetensors) once: model,
class names, objective, sha256.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import fsspec
import torch
from torch import nn

from ced_lightning.core.errors import CedError, MissingInputError
from ced_lightning.core.objective import OBJECTIVES, check_objective
from ced_lightning.models.ced import CED, CEDConfig, FrontEndConfig
from ced_lightning.models.hub import (
    WEIGHTS_FILE,
    from_hub_layout,
    is_hub_folder,
    is_hub_layout,
    read_hub_folder,
)
from ced_lightning.models.released import resolve_checkpoint
from ced_lightning.models.timm_mel import TimmMelClassifier

_HEAD_DIM = 64  # every CED size uses 64-dimensional heads, which lets load_ced infer num_heads.


def read_state_dict(
    path: str | PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """The model state dict in a released CED file, one of ours, or a Lightning checkpoint.

    Accepts `{'model': sd}` (released files), a bare state dict, and Lightning checkpoints whose
    `state_dict` keys are prefixed (e.g. `student.`); local paths and fsspec URLs.
    """
    obj, _ = _read_checkpoint(path, map_location)
    return state_dict_from_checkpoint(obj, source=str(path))


class CheckpointLoadError(CedError, ValueError):
    """A checkpoint file that cannot be read (corrupt, not a checkpoint, or refused by the weights-only
    loader); the message names the file."""


def _read_checkpoint(
    path: str | PathLike, map_location: str | torch.device, sha256: bool = False
) -> tuple[Any, str | None]:
    """`_read_checkpoint_file`, whose errors name the file (`CheckpointLoadError`): torch's UnpicklingError
    and a corrupt file's errors do not say which of several teachers it was."""
    try:
        return _read_checkpoint_file(path, map_location, sha256)
    except CedError:
        raise  # names the path already (and says how to get released weights)
    except FileNotFoundError as err:
        raise MissingInputError(f"{path}: no such checkpoint file ({err.strerror or err})") from err
    except Exception as err:
        lines = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
        raise CheckpointLoadError(
            f"{path}: cannot load this checkpoint ({detail}). Only weights-only checkpoints (tensors and "
            "plain values) are read, never arbitrary pickled objects."
        ) from err


def _read_checkpoint_file(
    path: str | PathLike, map_location: str | torch.device, sha256: bool = False
) -> tuple[Any, str | None]:
    """The loaded checkpoint object and, with `sha256`, the sha256 of the file's bytes: one read of the file.

    `path` may be a released name (`ced_mini`, `ced_mini_mae`: `resolve_checkpoint`). Checkpoints may be
    fsspec URLs on object storage and hundreds of MB: with the hash, one sequential read feeds both it and
    `torch.load` (holding the bytes once in memory); without, the file streams into `torch.load`.
    Safetensors files (the Hub's `model.safetensors`) are recognised by their header: a bare state dict. A
    folder of the Hub port's layout (`models.hub`) reads as `{'model', 'ced_config', 'class_names'}`, its
    sha256 that of its weights file.
    """
    if is_hub_folder(path):
        weights = Path(path) / WEIGHTS_FILE
        digest = hashlib.sha256(weights.read_bytes()).hexdigest() if sha256 else None
        return read_hub_folder(path), digest
    with fsspec.open(resolve_checkpoint(path), "rb") as handle:
        safetensors_file = _is_safetensors(handle.read(9))
        handle.seek(0)
        if not sha256 and not safetensors_file:
            return torch.load(handle, map_location=map_location, weights_only=True), None
        data = handle.read()
    digest = hashlib.sha256(data).hexdigest() if sha256 else None
    if safetensors_file:
        from safetensors.torch import load as load_safetensors

        return {k: v.to(map_location) for k, v in load_safetensors(data).items()}, digest
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True), digest


def _is_safetensors(head: bytes) -> bool:
    # A safetensors file starts with its JSON header's length (8 bytes, little endian), then "{"; torch.save
    # writes a zip archive ("PK") or a pickle (0x80).
    return len(head) == 9 and head[8:9] == b"{"


def state_dict_from_checkpoint(obj: Any, source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointLoadError(f"{source}: expected a dict-like checkpoint, found {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd = dict(obj["state_dict"])
        # Our LightningModules keep the network as `self.model` (and its EMA as `self.ema`, then named by
        # `eval_prefix`); other Lightning checkpoints are searched for a CED key.
        prefix = obj.get("eval_prefix", "model.") if "model_spec" in obj else _model_prefix(sd)
        return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = dict(obj["model"])
    elif any(isinstance(v, torch.Tensor) for v in obj.values()):
        sd = dict(obj)
    else:
        raise CheckpointLoadError(
            f"{source}: found neither 'model', 'state_dict' nor tensors (keys: {list(obj)[:8]})"
        )
    return from_hub_layout(sd) if is_hub_layout(sd) else sd


def _model_prefix(sd: Mapping[str, Any]) -> str:
    """Lightning checkpoints prefix keys with the module attribute (`student.`, `model.`)."""
    for key in sd:
        if key.endswith("patch_embed.proj.weight"):
            return key[: -len("patch_embed.proj.weight")]
    return ""


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> CEDConfig:
    """Infer size, depth, classes, mel bins and target length from a CED state dict's shapes."""
    try:
        embed_dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
        num_classes = sd["outputlayer.1.weight"].shape[0]
        n_mels = sd["init_bn.1.weight"].shape[0]
        time_patches = sd["time_pos_embed"].shape[-1]
        mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointLoadError(f"not a CED state dict: missing {err.args[0]!r}") from err
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    defaults = CEDConfig()
    front_end = defaults.front_end
    if n_mels != front_end.n_mels:
        front_end = type(front_end)(**{**front_end.__dict__, "n_mels": n_mels})
    return CEDConfig(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(1, embed_dim // _HEAD_DIM),
        mlp_ratio=mlp_hidden / embed_dim,
        num_classes=num_classes,
        patch_size=patch,
        patch_stride=patch,
        target_length=_target_length(time_patches, patch, defaults.target_length),
        front_end=front_end,
    )


def _target_length(time_patches: int, patch: int, default: int) -> int:
    # Shapes only fix the length up to a patch: prefer CED's 1012 frames when it fits.
    return default if (default - patch) // patch + 1 == time_patches else time_patches * patch


def load_ced(
    path: str | PathLike,
    map_location: str | torch.device = "cpu",
    config: CEDConfig | None = None,
    eval_mode: bool = True,
) -> CED:
    """Build the right CED size and depth from a checkpoint's shapes and load it with `strict=True`.

    Works with released names (`ced_mini`, `list_released()`), the released `audiotransformer_*_mAP_*.pt`
    files, the Hub's `model.safetensors` and this project's checkpoints (which also store the exact
    `CEDConfig`, e.g. a non-default front end).
    """
    obj, _ = _read_checkpoint(path, map_location)
    model = _ced_from_checkpoint(obj, str(path), config)
    return model.eval() if eval_mode else model


def _ced_from_checkpoint(obj: Any, source: str, config: CEDConfig | None = None) -> CED:
    sd = state_dict_from_checkpoint(obj, source=source)
    if config is None:
        stored = obj.get("ced_config") if isinstance(obj, Mapping) else None
        config = CEDConfig.from_dict(stored) if stored else config_from_state_dict(sd)
    model = CED(config)
    own = model.state_dict()
    front_end = [k for k in own if k.startswith("front_end.")]
    if not any(k in sd for k in front_end):
        # The Hub's files carry no front-end buffers: they follow from the config (window, mel filterbank).
        sd = {**{k: own[k] for k in front_end}, **sd}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise CheckpointLoadError(f"{source}: does not load into {config}: {err}") from err
    return model


def save_ced(
    model: CED,
    path: str | PathLike,
    *,
    class_names: list[str] | None = None,
    objective: str = "multi_label",
) -> None:
    """Save in the released layout (`{'model': state_dict}`) plus our exact config, readable by both; with
    `class_names` and a `single_label` objective those too (`load_checkpoint` reads them back; the original
    code ignores them)."""
    saved: dict[str, Any] = {"model": model.state_dict(), "ced_config": model.config.to_dict()}
    if class_names is not None:
        if len(class_names) != model.config.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model of {model.config.num_classes} outputs"
            )
        saved["class_names"] = list(class_names)
    if check_objective(objective) != "multi_label":
        saved["objective"] = objective
    with fsspec.open(str(path), "wb") as handle:
        torch.save(saved, handle)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """A plain description of a network (`model_spec` in our checkpoints) that `build_model` rebuilds."""
    if isinstance(model, CED):
        return {"arch": "ced", "config": model.config.to_dict()}
    if isinstance(model, TimmMelClassifier):
        return {
            "arch": "timm",
            "backbone": model.backbone_name,
            "num_classes": model.num_classes,
            "front_end": dict(model.front_end.config.__dict__),
        }
    raise TypeError(f"no model_spec for {type(model).__name__}; use CED or TimmMelClassifier")


def build_model(spec: Mapping[str, Any]) -> nn.Module:
    if spec["arch"] == "ced":
        return CED(CEDConfig.from_dict(spec["config"]))
    if spec["arch"] == "timm":
        return TimmMelClassifier(spec["backbone"], spec["num_classes"], FrontEndConfig(**spec["front_end"]))
    raise CheckpointLoadError(f"unknown model arch {spec['arch']!r} in model_spec")


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` read from one checkpoint file."""

    model: nn.Module  # in eval mode
    class_names: list[str] | None  # stored by our training (and `save_ced` where given); None in releases
    sha256: str | None  # of the file's bytes (identifies a teacher in a logit store), when asked for
    source: str
    # How the outputs read (`objective.probabilities_from_logits`): "multi_label", a sigmoid per class (the
    # released models, and anything that records nothing), or "single_label", one softmax over the classes
    # (a model trained with task.objective=single_label).
    objective: str = "multi_label"


def load_checkpoint(
    path: str | PathLike, map_location: str | torch.device = "cpu", sha256: bool = False
) -> LoadedCheckpoint:
    """Any checkpoint this project understands, read once: its model (eval mode), class names, objective and,
    with `sha256`, the file's sha256.

    Reads a released CED file, `save_ced` output, or a Lightning checkpoint of our supervised or distillation
    training (CED or a timm backbone); local paths and fsspec URLs.
    """
    source = str(path)
    obj, digest = _read_checkpoint(path, map_location, sha256)
    return LoadedCheckpoint(
        model=_model_from_checkpoint(obj, source),
        class_names=_stored_class_names(obj),
        sha256=digest,
        source=source,
        objective=_stored_objective(obj, source),
    )


def _model_from_checkpoint(obj: Any, source: str) -> nn.Module:
    spec = obj.get("model_spec") if isinstance(obj, Mapping) else None
    if spec is None:
        return _ced_from_checkpoint(obj, source).eval()
    model = build_model(spec)
    try:
        model.load_state_dict(state_dict_from_checkpoint(obj, source=source), strict=True)
    except RuntimeError as err:
        raise CheckpointLoadError(f"{source}: weights do not match its model_spec: {err}") from err
    return model.eval()


def _stored_class_names(obj: Any) -> list[str] | None:
    names = obj.get("class_names") if isinstance(obj, Mapping) else None
    return list(names) if names else None


def _stored_objective(obj: Any, source: str) -> str:
    objective = obj.get("objective") if isinstance(obj, Mapping) else None
    if objective is None:
        return "multi_label"
    if objective not in OBJECTIVES:
        raise CheckpointLoadError(f"{source}: objective {objective!r} is none of {list(OBJECTIVES)}")
    return str(objective)


def load_model(path: str | PathLike, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model of `load_checkpoint(path)`, in eval mode."""
    return load_checkpoint(path, map_location).model


def write_metadata(
    checkpoint: dict[str, Any], model: nn.Module, class_names: list[str] | None, *, eval_prefix: str
) -> None:
    """Add the format's keys to a Lightning checkpoint being saved (`on_save_checkpoint`): `model_spec`,
    `class_names`, `eval_prefix` (the `state_dict` prefix of the weights to evaluate) and `rng_states`."""
    checkpoint["model_spec"] = model_spec(model)
    checkpoint["class_names"] = class_names
    checkpoint["eval_prefix"] = eval_prefix
    # Dropout and drop-path draw from torch's global generator: restore it for an exact resume.
    checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()


def restore_rng_states(checkpoint: Mapping[str, Any]) -> None:
    """Set torch's generators to a checkpoint's `rng_states` (checkpoints without them: nothing)."""
    states = checkpoint.get("rng_states") or {}
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
