"""The embedded demo, end to end: what `python -m ced_lightning.train experiment=ced_mini` builds first.

Each missing artifact is built once, with one log line saying what and why; a second run reuses them all:
  1. the demo audio stores (train/val/test)   `python -m ced_lightning.prepare source=demo`
  2. the demo teachers, trained with labels    `python -m ced_lightning.train experiment=teacher_demo_*`
  3. the teachers' logit store over train.zarr `python -m ced_lightning.extract teacher=demo`
Only the demo does this (`data.build_missing`); a user's missing store stops the run with the command to run.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from ced_lightning.store import store_nbytes

log = logging.getLogger(__name__)


def _exists(url: str) -> bool:
    from ced_lightning.tasks import store_exists

    return store_exists(url)


def build_demo_artifacts(cfg: DictConfig) -> None:
    """Build whatever the demo run `cfg` needs and lacks (stores, teachers, logit store)."""
    data = cfg.data
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if not all(_exists(url) for url in splits.values()):
        from ced_lightning.data.demo import build_demo_stores

        log.info("demo: building the demo audio stores in %s (not there yet; about 20 s)", data.root)
        build_demo_stores(
            str(data.root), seed=data.demo.seed, clip_seconds=data.clip_seconds, **data.demo.clips
        )
    if cfg.task != "distill":
        return
    for member in cfg.teacher.members:
        if not Path(member.checkpoint).is_file():
            log.info(
                "demo: training teacher %s with labels (no checkpoint at %s yet; a few minutes)",
                member.name,
                member.checkpoint,
            )
            train_demo_teacher(cfg, member)
    if not _exists(data.logits):
        log.info(
            "demo: extracting the teachers' top-%d over %d augmentation epochs into %s (not there yet)",
            data.extract.topk,
            data.extract.epochs,
            data.logits,
        )
        extract_demo_logits(cfg)


def train_demo_teacher(cfg: DictConfig, member: DictConfig) -> None:
    """Train one demo teacher through the same entry point as everything else, then keep its averaged
    checkpoint at `member.checkpoint` with its validation mAP beside it."""
    from ced_lightning.train import train

    run_dir = Path(member.checkpoint).with_suffix("")
    overrides = [
        f"experiment={member.experiment}",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.log_dir={cfg.paths.log_dir}",
        f"++paths.output_dir={run_dir}",
        f"data={cfg.data.name}",
        f"seed={cfg.seed}",
        f"trainer.accelerator={cfg.trainer.accelerator}",
        "logger=csv",
        *list(member.get("overrides") or []),
    ]
    teacher_cfg = compose(config_name="train", overrides=overrides)
    metrics = train(teacher_cfg)
    best = Path(str(metrics.get("tested_checkpoint") or ""))
    if not best.is_file():
        raise RuntimeError(f"teacher {member.name}: training produced no checkpoint in {run_dir}")
    shutil.copyfile(best, member.checkpoint)
    summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    Path(member.checkpoint).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    log.info(
        "demo: teacher %s ready: %s (val mAP %.3f)", member.name, member.checkpoint, summary.get("val/mAP", 0)
    )


def extract_demo_logits(cfg: DictConfig) -> None:
    from ced_lightning.extract import run_extract

    overrides = [
        f"audio_store={cfg.data.train}",
        f"output={cfg.data.logits}",
        f"teacher={cfg.teacher.name}",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.log_dir={cfg.paths.log_dir}",
        f"epochs={cfg.data.extract.epochs}",
        f"topk={cfg.data.extract.topk}",
        f"quantization={cfg.data.extract.quantization}",
        f"clip_seconds={cfg.data.clip_seconds}",
        f"seed={cfg.seed}",
        f"trainer.accelerator={cfg.trainer.accelerator}",
    ]
    extract_cfg = compose(config_name="extract", overrides=overrides)
    with open_dict(extract_cfg):
        extract_cfg.augment = OmegaConf.to_container(cfg.augment, resolve=True)
    run_extract(extract_cfg)


def demo_summary(cfg: DictConfig, student_metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the closing table: each teacher's, the ensemble's and the student's validation mAP, and the
    logit store's size as a share of the audio store."""
    rows: list[tuple[str, str]] = []
    for member in cfg.teacher.members:
        info = Path(member.checkpoint).with_suffix(".json")
        mean_ap = json.loads(info.read_text()).get("val/mAP") if info.is_file() else None
        rows.append((f"teacher {member.name}", _fmt(mean_ap)))
    rows.append(("teacher ensemble", _fmt(ensemble_val_map(cfg))))
    rows.append((f"student {cfg.model.get('name', 'CED')} (val)", _fmt(student_metrics.get("val/mAP"))))
    if "test/mAP" in student_metrics:
        rows.append(("student (test, tested checkpoint)", _fmt(student_metrics.get("test/mAP"))))
    overhead = 100.0 * store_nbytes(cfg.data.logits) / max(store_nbytes(cfg.data.train), 1)
    rows.append(("logit store / audio store", f"{overhead:.2f} %"))
    return rows


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None else "n/a"


@torch.no_grad()
def ensemble_val_map(cfg: DictConfig) -> float:
    """The teacher ensemble's validation mAP, combined as the logit store combines it."""
    from ced_lightning.data.labeled import LabeledDataModule
    from ced_lightning.metrics import TaggingMetrics
    from ced_lightning.models import load_model

    teachers = [load_model(m.checkpoint).eval() for m in cfg.teacher.members]
    data = LabeledDataModule(val=cfg.data.val, eval_batch_size=cfg.data.eval_batch_size, num_workers=0)
    metrics = TaggingMetrics(teachers[0].num_classes)
    for batch in data.val_dataloader():
        logits = torch.stack([t(batch["waveform"]).float() for t in teachers])
        if cfg.teacher.get("combine", "mean_prob") == "mean_logit":
            probs = torch.sigmoid(logits.mean(0))
        else:
            probs = torch.sigmoid(logits).mean(0)
        metrics.update(probs, batch["target"])
    return float(metrics.compute()["mAP"])


def print_demo_summary(rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CED demo: validation mAP")
    table.add_column("")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
    log.info("demo summary: %s", "; ".join(f"{n}: {v}" for n, v in rows))
