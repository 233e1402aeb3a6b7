"""The embedded demo, end to end: a layer above the commands it runs, never imported by them.

`python -m ced_lightning.train` runs the function the data group names in `data.entry`; the demo data
(`data=demo`, the default) names `run_demo`, so `python -m ced_lightning.train experiment=ced_mini` comes
here. With `data.build_missing` (on for the demo) each missing artifact is built once, with one log line
saying what and why, and a second run reuses them all:
  1. the demo audio stores (train/val/test)   `python -m ced_lightning.prepare source=demo`
  2. the demo teachers, trained with labels    `python -m ced_lightning.train experiment=teacher_demo_*`
  3. the teachers' logit store over train.zarr `python -m ced_lightning.extract teacher=demo`
then `ced_lightning.train.train` distils the student, and the run ends with the demo's table (teachers,
ensemble, student, store overhead). A user's data names no entry: `train` runs alone, and a missing store
stops it with the command to run (`ced_lightning.tasks.ensure_inputs`).
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

from ced_lightning.data.demo import build_demo_stores
from ced_lightning.extract import run_extract
from ced_lightning.runtime import global_rank
from ced_lightning.store import store_exists, store_nbytes
from ced_lightning.tasks import check_train_config
from ced_lightning.train import train

log = logging.getLogger(__name__)


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """The demo's `train`: build what is missing, train as `cfg` says, then print the demo's table (for a
    student; `+summary=false` skips it). Returns `train`'s metrics."""
    check_train_config(cfg)  # a typo is reported before minutes of teachers and a logit store
    build_missing = bool(cfg.data.get("build_missing"))
    if build_missing:
        build_demo_artifacts(cfg)
    metrics = train(cfg)
    if build_missing and cfg.task == "distill" and cfg.get("summary", True) and global_rank() == 0:
        print_demo_summary(demo_summary(cfg, metrics))
    return metrics


def build_demo_artifacts(cfg: DictConfig) -> None:
    """Build what the demo run `cfg` needs and lacks (stores; for a student also teachers, logit store)."""
    ensure_demo_stores(cfg)
    if cfg.task != "distill":
        return
    ensure_demo_teachers(cfg)
    if not store_exists(cfg.data.logits):
        log.info(
            "demo: extracting the teachers' top-%d over %d augmentation epochs into %s (not there yet)",
            cfg.data.extract.topk,
            cfg.data.extract.epochs,
            cfg.data.logits,
        )
        extract_demo_logits(cfg)


def ensure_demo_stores(cfg: DictConfig) -> None:
    data = cfg.data
    splits = {"train": data.train, "val": data.val, "test": data.test}
    if not all(store_exists(url) for url in splits.values()):
        log.info("demo: building the demo audio stores in %s (not there yet; about 20 s)", data.root)
    # Always called: it keeps complete stores of this config, resumes interrupted ones and refuses others.
    build_demo_stores(str(data.root), seed=data.demo.seed, clip_seconds=data.clip_seconds, **data.demo.clips)


def ensure_demo_teachers(cfg: DictConfig) -> None:
    for member in cfg.teacher.members:
        if not Path(member.checkpoint).is_file():
            log.info(
                "demo: training teacher %s with labels (no checkpoint at %s yet; a few minutes)",
                member.name,
                member.checkpoint,
            )
            train_demo_teacher(cfg, member)


def train_demo_teacher(cfg: DictConfig, member: DictConfig) -> None:
    """Train one demo teacher through the same entry point as everything else, then keep its averaged
    checkpoint at `member.checkpoint` with its validation mAP beside it."""
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
        *list(cfg.data.get("augment_overrides") or []),
        *list(cfg.data.get("teacher_overrides") or []),
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
    """The teachers' logit store over `data.train` at `data.logits`, with the demo's extraction settings
    (`data.extract`) and augmentation (`data.augment_overrides`)."""
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
        # The store's own seed: the student's training seed must not change what the teachers saw.
        f"seed={cfg.data.extract.seed}",
        f"trainer.accelerator={cfg.trainer.accelerator}",
        *list(cfg.data.get("augment_overrides") or []),
    ]
    extract_cfg = compose(config_name="extract", overrides=overrides)
    with open_dict(extract_cfg):
        # The teachers this run trained, also when the command line changed the `teacher` group's members.
        extract_cfg.teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    run_extract(extract_cfg)


def demo_summary(cfg: DictConfig, student_metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the closing table: each teacher's, the ensemble's and the student's validation mAP, and the
    logit store's size as a share of the audio store."""
    teacher_maps = teacher_val_maps(cfg)
    rows = [(f"teacher {name}", _fmt(value)) for name, value in teacher_maps.items()]
    rows.append(
        (f"student {cfg.model.get('name', 'CED')} (val, best epoch)", _fmt(student_metrics.get("val/mAP")))
    )
    if "test/mAP" in student_metrics:
        rows.append((f"student (test, {cfg.test_ckpt} checkpoint)", _fmt(student_metrics.get("test/mAP"))))
    overhead = 100.0 * store_nbytes(cfg.data.logits) / max(store_nbytes(cfg.data.train), 1)
    rows.append(("logit store / audio store", f"{overhead:.2f} %"))
    return rows


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None else "n/a"


@torch.no_grad()
def teacher_val_maps(cfg: DictConfig) -> dict[str, float]:
    """Validation mAP of each teacher checkpoint and of the ensemble, combined as the logit store combines it
    (`teacher.combine`), all from one pass over the validation store."""
    from ced_lightning.data.labeled import LabeledDataModule
    from ced_lightning.metrics import TaggingMetrics
    from ced_lightning.models import load_model
    from ced_lightning.modules.ensemble import combine_probabilities

    teachers = {m.name: load_model(m.checkpoint).eval() for m in cfg.teacher.members}
    num_classes = next(iter(teachers.values())).num_classes
    metrics = {name: TaggingMetrics(num_classes) for name in [*teachers, "ensemble"]}
    data = LabeledDataModule(val=cfg.data.val, eval_batch_size=cfg.data.eval_batch_size, num_workers=0)
    for batch in data.val_dataloader():
        batch = data.on_after_batch_transfer(batch, 0)  # int16 -> float32, as in training
        logits = {name: t(batch["waveform"]).float() for name, t in teachers.items()}
        for name, value in logits.items():
            metrics[name].update(torch.sigmoid(value), batch["target"])
        ensemble = combine_probabilities(list(logits.values()), cfg.teacher.get("combine", "mean_prob"))
        metrics["ensemble"].update(ensemble, batch["target"])
    return {name: float(m.compute()["mAP"]) for name, m in metrics.items()}


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
