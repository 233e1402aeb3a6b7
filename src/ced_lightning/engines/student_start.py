"""`model.init_from=teacher`: where no pretrained weights exist, a student (and its label-only row) starts as
the strongest teacher of its own architecture among those that made its logit store (the demo's path, for any
data). "Its own architecture": a CED of the student's width, patching and front end; blocks the teacher lacks
start as identities (`models.factory.grow_as_identity`), so the student computes its teacher's function at
step 0. "Strongest": the highest validation mAP in the teacher check `extract` recorded in the store, or,
where it recorded none, measured on `data.val` here."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import fsspec
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ced_lightning.core.errors import ConfigError
from ced_lightning.models.ced import CED
from ced_lightning.models.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

# The value of `model.init_from` that asks for this start.
TEACHER_START = "teacher"


def misfit(student: CED, teacher: Mapping[str, torch.Tensor]) -> str | None:
    """Why the teacher's state dict cannot start `student` (None when it can): it must hold every tensor
    outside the blocks and the front end in the student's shape (the classifier included: same classes), and
    blocks of the student's shape (fewer blocks grow as identities, more are cut)."""
    own = {k: v for k, v in student.state_dict().items() if not k.startswith("front_end.")}
    if "blocks.0.attn.qkv.weight" not in teacher:
        return "not a CED"
    width, own_width = teacher["blocks.0.attn.qkv.weight"].shape[1], own["blocks.0.attn.qkv.weight"].shape[1]
    if width != own_width:
        return f"width {width}, the student's is {own_width}"
    for key, tensor in own.items():
        if key.startswith("blocks.") and not key.startswith("blocks.0."):
            continue
        if key not in teacher:
            return f"no {key}"
        # Position embeddings of another length are stretched at load; their width must agree.
        compared = tensor.shape[:2] if key.endswith("pos_embed") else tensor.shape
        found = teacher[key].shape[:2] if key.endswith("pos_embed") else teacher[key].shape
        if found != compared:
            return f"{key} {list(teacher[key].shape)}, the student's {list(tensor.shape)}"
    return None


def recorded_maps(logits_url: str) -> dict[str, Any] | None:
    """The teacher check `extract` kept in the store (`extract_stats.json`): {"store", "teachers": {name:
    {"mAP", ...}}}, or None where it ran without one."""
    from ced_lightning.engines.extraction import STATS_FILE

    fs, path = fsspec.core.url_to_fs(f"{logits_url.rstrip('/')}/{STATS_FILE}")
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f).get("teacher_check")


def teacher_start(cfg: DictConfig, student: CED) -> str:
    """The checkpoint of the strongest teacher of `student`'s architecture among those that made the logit
    store `data.logits`; logs the choice and the others with the reason each was passed over."""
    from ced_lightning.store.logits import LogitStore

    url = OmegaConf.select(cfg, "data.logits", default=None)
    if not url:
        raise ConfigError(
            "model.init_from=teacher starts the student as a teacher of its logit store, but data.logits "
            "names none: give a checkpoint path or a released name instead"
        )
    store = LogitStore.open(str(url))
    fitting, passed, models = [], [], {}
    for record in store.teachers:
        if "checkpoint" not in record:
            passed.append(f"{record['name']} (no checkpoint recorded)")
            continue
        # Read once: its weights are judged here and, where the store kept no teacher check, scored below.
        model = load_checkpoint(record["checkpoint"]).model
        reason = misfit(student, model.state_dict())
        if reason is None:
            fitting.append(record)
            models[record["name"]] = model
        else:
            passed.append(f"{record['name']} ({reason})")
    if not fitting:
        raise ConfigError(
            f"model.init_from=teacher: no teacher of the logit store {url} has the student's architecture "
            f"(a CED of its width): {'; '.join(passed)}. Start from a checkpoint path or a released name, "
            "or model.init_from=null (from scratch)"
        )
    maps, where = _validation_maps(cfg, str(url), models)
    chosen = max(fitting, key=lambda r: maps.get(r["name"], float("-inf")))
    others = [
        f"{r['name']} ({maps[r['name']]:.4f})" for r in fitting if r is not chosen and r["name"] in maps
    ]
    log.info(
        "model.init_from=teacher: %s, %s%s%s",
        chosen["checkpoint"],
        f"teacher {chosen['name']}"
        + (f", val mAP {maps[chosen['name']]:.4f} on {where}" if chosen["name"] in maps else ""),
        f"; also of its architecture: {', '.join(others)}" if others else "",
        f"; not of its architecture: {', '.join(passed)}" if passed else "",
    )
    return str(chosen["checkpoint"])


def _validation_maps(cfg: DictConfig, url: str, models: dict[str, nn.Module]) -> tuple[dict[str, float], str]:
    """Each fitting teacher's validation mAP: the store's teacher check, else measured on `data.val` (none
    needed for a single candidate)."""
    check = recorded_maps(url)
    if check and all(name in check["teachers"] for name in models):
        return {name: float(check["teachers"][name]["mAP"]) for name in models}, str(check["store"])
    if len(models) == 1:
        return {}, ""
    from ced_lightning.engines.scoring import evaluate_teachers

    val = cfg.data.val
    store = str(val[0] if OmegaConf.is_list(val) else val)
    table = evaluate_teachers(
        models,
        store,
        batch_size=int(cfg.data.eval_batch_size),
        device="cpu" if str(cfg.trainer.get("accelerator", "auto")) == "cpu" else None,
    )
    return {name: float(row["mAP"]) for name, row in table["teachers"].items()}, store
