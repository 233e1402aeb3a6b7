"""The embedded demo, end to end: a layer above the commands it runs, never imported by them.

`python -m ced_lightning.train` runs the function the data group names in `data.entry`; the demo data
(`data=demo`, the default) names `run_demo`, so `python -m ced_lightning.train experiment=ced_mini` comes
here. With `data.build_missing` (on for the demo) each missing artifact is built once, with one log line
saying what and why, and a second run reuses them all:
  1. the demo audio stores: train (labeled), val, test, and distill = the train clips followed by a larger
     pool of unlabeled clips                   `python -m ced_lightning.prepare source=demo`
  2. the demo teachers, trained with labels on train.zarr
                                               `python -m ced_lightning.train experiment=teacher_demo_*`
  3. the teachers' logit store over distill.zarr `python -m ced_lightning.extract teacher=demo`
then `ced_lightning.engines.comparison.train_and_compare`, as on any data, distils the student label-free over
distill.zarr, trains the label-only baseline (`data.label_only_baseline`, on for the demo) and ends with
the table and verdict lines. A user's data builds nothing: a missing store stops the run with the command to
run (`ced_lightning.engines.inputs.ensure_inputs`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ced_lightning import compose_inner
from ced_lightning.core.errors import CheckFailedError
from ced_lightning.data.demo import build_demo_stores
from ced_lightning.engines.comparison import StageTimer, train_and_compare
from ced_lightning.engines.inputs import check_train_config
from ced_lightning.engines.launch import global_rank
from ced_lightning.engines.training import train
from ced_lightning.extract import run_extract
from ced_lightning.store import store_exists

log = logging.getLogger(__name__)


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """The demo's `train`: build what is missing, then train and compare as on any data
    (`comparison.train_and_compare`: for a student, the label-only baseline and the closing table;
    `+summary=false` skips the table). Returns the student's metrics."""
    check_train_config(cfg)  # a typo is reported before minutes of teachers and a logit store
    timer = StageTimer()
    if cfg.data.get("build_missing"):
        build_demo_artifacts(cfg, timer)
    metrics = train_and_compare(cfg, timer)
    if global_rank() == 0:
        log.info("demo: wall time per stage: %s", timer.report())
    return metrics


def build_demo_artifacts(cfg: DictConfig, timer: StageTimer | None = None) -> None:
    """Build what the demo run `cfg` needs and lacks (stores; for a student also teachers, logit store)."""
    timer = timer or StageTimer()
    with timer("stores"):
        ensure_demo_stores(cfg)
    if cfg.task.name != "distill":
        return
    ensure_demo_teachers(cfg, timer)
    if not store_exists(cfg.data.logits):
        log.info(
            "demo: extracting the teachers' top-%s over %d augmentation epochs of %s into %s (not there yet)",
            cfg.data.extract.topk,
            cfg.data.extract.epochs,
            cfg.data.train,
            cfg.data.logits,
        )
        with timer("extraction"):
            extract_demo_logits(cfg)


def ensure_demo_stores(cfg: DictConfig) -> None:
    data = cfg.data
    urls = [data.stores.supervised, data.stores.distill, data.val, data.test]
    if not all(store_exists(url) for url in urls):
        log.info("demo: building the demo audio stores in %s (not there yet; about a minute)", data.root)
    # Always called: it keeps complete stores of this config, resumes interrupted ones and refuses others.
    clips = {"unlabeled": 0, **data.demo.clips}  # distill.zarr is always built (an empty pool: a copy)
    build_demo_stores(str(data.root), seed=data.demo.seed, clip_seconds=data.clip_seconds, **clips)


def ensure_demo_teachers(cfg: DictConfig, timer: StageTimer | None = None) -> None:
    timer = timer or StageTimer()
    for member in cfg.teacher.members:
        if not Path(member.checkpoint).is_file():
            log.info(
                "demo: training teacher %s with labels (no checkpoint at %s yet; a few minutes)",
                member.name,
                member.checkpoint,
            )
            with timer(f"teacher {member.name}"):
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
        *thread_overrides(cfg),
        "logger=csv",
        *augment_overrides(cfg),
        *list(cfg.data.get("teacher_overrides") or []),
        *list(member.get("overrides") or []),
    ]
    teacher_cfg = compose_inner("train", overrides)
    metrics = train(teacher_cfg)
    best = Path(str(metrics.get("tested_checkpoint") or ""))
    if not best.is_file():
        raise CheckFailedError(f"teacher {member.name}: training produced no checkpoint in {run_dir}")
    shutil.copyfile(best, member.checkpoint)
    summary = {k: v for k, v in metrics.items() if isinstance(v, float)}
    Path(member.checkpoint).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    log.info(
        "demo: teacher %s ready: %s (val mAP %.3f)", member.name, member.checkpoint, summary.get("val/mAP", 0)
    )


def augment_overrides(cfg: DictConfig) -> list[str]:
    """The demo's augmentation (`data.augment`: keys of the `augment` group) as the command-line overrides of
    the commands it starts (its teachers' training, its extraction)."""
    values = OmegaConf.to_container(cfg.data.get("augment") or {}, resolve=True)
    return [f"augment.{key}={json.dumps(value)}" for key, value in values.items()]


def thread_overrides(cfg: DictConfig) -> list[str]:
    """The CPU threads of this run (`num_threads`, the demo's `data.num_threads` unless the command line says
    otherwise) for the commands it starts: the count is part of a CPU run's numbers."""
    return [f"num_threads={json.dumps(cfg.get('num_threads'))}"]


def extract_demo_logits(cfg: DictConfig) -> None:
    """The teachers' logit store over the student's `data.train` (distill.zarr: the labeled clips and the
    unlabeled pool) at `data.logits`, with the demo's extraction settings
    (`data.extract`) and augmentation (`data.augment`)."""
    overrides = [
        f"audio_store={cfg.data.train}",
        f"output={cfg.data.logits}",
        f"teacher={cfg.teacher.name}",
        f"paths.data_dir={cfg.paths.data_dir}",
        f"paths.log_dir={cfg.paths.log_dir}",
        f"epochs={cfg.data.extract.epochs}",
        f"topk={json.dumps(cfg.data.extract.get('topk'))}",  # null: extract's rule (default_topk)
        f"quantization={cfg.data.extract.quantization}",
        f"clip_seconds={cfg.data.clip_seconds}",
        # The store's own seed: the student's training seed must not change what the teachers saw.
        f"seed={cfg.data.extract.seed}",
        # Each teacher and the ensemble scored on the validation store before their logits are stored (the
        # table a user of their own data sees; weak teachers stop the extraction).
        f"teacher_check.store={cfg.data.val}",
        f"allow_weak_teachers={bool(cfg.data.extract.get('allow_weak_teachers', False))}",
        f"trainer.accelerator={cfg.trainer.accelerator}",
        *thread_overrides(cfg),
        *augment_overrides(cfg),
    ]
    extract_cfg = compose_inner("extract", overrides)
    with open_dict(extract_cfg):
        # The teachers this run trained, also when the command line changed the `teacher` group's members.
        extract_cfg.teacher = OmegaConf.to_container(cfg.teacher, resolve=True)
    run_extract(extract_cfg)
