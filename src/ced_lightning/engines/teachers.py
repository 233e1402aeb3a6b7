"""Teacher sets from a teacher config (conf/teacher/<name>.yaml): the members, loaded once, for `extract`
(which stores their combined top-k) and `evaluate teacher=...` (which scores each and their ensemble)."""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ced_lightning.core.ensemble import check_teachers
from ced_lightning.core.errors import ConfigError, MissingInputError
from ced_lightning.core.labels import check_same_classes
from ced_lightning.models import load_checkpoint
from ced_lightning.models.released import released_entry
from ced_lightning.store.remote import redact_url

log = logging.getLogger(__name__)


def state_dict_sha256(model: nn.Module) -> str:
    """A checksum of a model's weights (for members built from `_target_` rather than a file)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        # reshape(-1): 0-dim tensors (BatchNorm's counter) cannot be viewed as bytes
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def distinguishing_names(paths: list[str]) -> list[str]:
    """A name per checkpoint path: its stem, or where stems clash, the nearest parent folder that tells the
    clashing paths apart and the stem (`run1/checkpoints/averaged.ckpt`, `run2/checkpoints/averaged.ckpt`
    -> `run1_averaged`, `run2_averaged`). Paths that no folder tells apart keep their stem."""
    parts = [PurePosixPath(str(p).replace("\\", "/")).parts for p in paths]
    stems = [PurePosixPath(p[-1]).stem if p else "" for p in parts]
    names = list(stems)
    for stem in {s for s in stems if stems.count(s) > 1}:
        group = [i for i, s in enumerate(stems) if s == stem]
        for up in range(2, max(len(parts[i]) for i in group) + 1):
            folders = [parts[i][-up] if len(parts[i]) >= up else "" for i in group]
            if len(set(folders)) == len(group):
                for i, folder in zip(group, folders, strict=True):
                    names[i] = f"{folder.strip('/')}_{stem}" if folder.strip("/") else stem
                break
    return names


def check_unique_names(members: list[dict[str, Any]]) -> None:
    """Refuse members that share a name: the store records teachers by name, and two `averaged.ckpt` of two
    runs would otherwise both be `averaged`, one of them silently unnamed (or a file counted twice)."""
    names = [m["name"] for m in members]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if not duplicated:
        return
    clashing = [m for m in members if m["name"] in duplicated]
    listing = ", ".join(f"{m['name']!r} <- {m.get('checkpoint', m.get('_target_'))}" for m in clashing)
    paths = [str(m.get("checkpoint", "")) for m in members]
    if len(set(paths)) < len(paths) and all(paths):
        advice = "the same checkpoint is listed twice: list each teacher once"
    else:
        suggested = distinguishing_names(paths) if all(paths) else [f"teacher{i}" for i in range(len(paths))]
        entries = ",".join(
            f"{{name: {name}, checkpoint: {m.get('checkpoint', '...')}}}"
            for name, m in zip(suggested, members, strict=True)
        )
        advice = f"give each teacher its own name: 'teacher.members=[{entries}]'"
    raise ConfigError(f"teacher names must be unique; {listing}: {advice}")


def teacher_members(teacher_cfg: DictConfig) -> list[dict[str, Any]]:
    """`teacher.members`, or one member per path of `teacher.checkpoints` (named after its file); names must
    be unique (`check_unique_names`). Each comes with its `weight` in the ensemble (`member_weights`);
    members of weight 0 are left out."""
    members = teacher_cfg.get("members")
    if not members and teacher_cfg.get("checkpoints"):
        paths = teacher_cfg.checkpoints
        paths = list(paths) if isinstance(paths, (list, ListConfig)) else [paths]
        out = [{"name": Path(str(p)).stem, "checkpoint": str(p)} for p in paths]
        check_unique_names(out)
        return member_weights(teacher_cfg, out)
    if not members:
        raise ConfigError(
            "the teacher config has neither `members` nor `checkpoints`: give e.g. teacher=ced "
            "'teacher.checkpoints=[a.pt,b.pt]' or a conf/teacher/<name>.yaml with members"
        )
    out = []
    for i, member in enumerate(members):
        member = (
            OmegaConf.to_container(member, resolve=True) if isinstance(member, DictConfig) else dict(member)
        )
        if "checkpoint" not in member and "_target_" not in member:
            raise ConfigError(
                f"teacher.members[{i}] needs `checkpoint: PATH` or `_target_: CLASS` (got {member})"
            )
        member.setdefault("name", Path(str(member.get("checkpoint", f"member{i}"))).stem)
        out.append(member)
    check_unique_names(out)
    return member_weights(teacher_cfg, out)


def member_weights(teacher_cfg: DictConfig, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The members with their `weight` in the ensemble's combine: `teacher.weights` (one per member, in
    order) or each member's own `weight:` (1 where unset). Members of weight 0 are dropped (logged); the
    others keep theirs, recorded in the logit store. Weights must be finite and not negative, one at least
    above 0."""
    listed = teacher_cfg.get("weights")
    names = [m["name"] for m in members]
    if listed is not None:
        listed = list(listed) if isinstance(listed, (list, ListConfig)) else [listed]
        if any("weight" in m for m in members):
            raise ConfigError("give teacher.weights or the members' own `weight:`, not both")
        if len(listed) != len(members):
            raise ConfigError(
                f"teacher.weights has {len(listed)} values for {len(members)} teachers ({', '.join(names)})"
            )
    else:
        listed = [m.get("weight", 1.0) for m in members]
    weights = []
    for name, value in zip(names, listed, strict=True):
        try:
            weight = float(value)
        except (TypeError, ValueError):
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"teacher {name}: weight must be a number >= 0 (0 drops it), not {value!r}")
        weights.append(weight)
    if not any(weights):
        raise ConfigError(f"teacher weights {weights}: every teacher has weight 0; the ensemble needs one")
    dropped = [name for name, weight in zip(names, weights, strict=True) if weight == 0]
    if dropped:
        log.info("teacher weight 0: %s left out of the ensemble", ", ".join(dropped))
    return [
        {**member, "weight": weight} for member, weight in zip(members, weights, strict=True) if weight > 0
    ]


def load_teachers(teacher_cfg: DictConfig) -> tuple[list[nn.Module], list[dict[str, Any]], list[str] | None]:
    """(models in eval mode, their records for the store's `teachers` attribute, their class names). A record
    holds the member's name, checkpoint (or `target`), sha256 and `weight` (`teacher_weights` reads them)."""
    models, records, class_lists = [], [], {}
    for member in teacher_members(teacher_cfg):
        if "checkpoint" in member:
            path = str(member["checkpoint"])
            # A released name (ced_mini, ...) is fetched from the caches or downloaded by load_checkpoint.
            if released_entry(path) is None and not fsspec.core.url_to_fs(path)[0].exists(
                fsspec.core.url_to_fs(path)[1]
            ):
                raise MissingInputError(f"teacher {member['name']}: no checkpoint at {path}")
            loaded = load_checkpoint(path, sha256=True)  # the store records the teacher's weights
            if loaded.objective != "multi_label":
                # The ensemble and the student's targets are per-class sigmoids; a softmax model's logits
                # read that way would be other probabilities than those it was trained to give.
                raise ConfigError(
                    f"teacher {member['name']}: {path} was trained with task.objective={loaded.objective}; "
                    "teachers must be multi-label taggers (per-class sigmoids), as CED distils them"
                )
            model = loaded.model
            if loaded.class_names:
                class_lists[member["name"]] = loaded.class_names
            record = {"name": member["name"], "checkpoint": redact_url(path), "sha256": loaded.sha256}
        else:
            spec = {k: v for k, v in member.items() if k not in ("name", "weight")}
            model = instantiate(spec).eval()
            record = {"name": member["name"], "target": spec, "sha256": state_dict_sha256(model)}
        record["weight"] = member["weight"]
        models.append(model)
        records.append(record)
    check_teachers(models, [r["name"] for r in records])
    named = list(class_lists.items())
    for name, names in named[1:]:
        check_same_classes(
            named[0][1],
            names,
            sources=(f"teacher {named[0][0]}", f"teacher {name}"),
            message=f"teachers were trained on different class lists: {sorted(class_lists)}",
        )
    return models, records, (list(named[0][1]) if named else None)


def teacher_weights(records: list[dict[str, Any]]) -> list[float]:
    """Each loaded member's weight in the ensemble (its record's `weight`)."""
    return [float(r.get("weight", 1.0)) for r in records]
