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
then `ced_lightning.train.train` distils the student label-free over distill.zarr, trains the row users
compare against (the same student with labels on train.zarr alone, as many optimizer steps: `label_only_cfg`),
and ends with the demo's table: validation and test mAP of every teacher, the ensemble, the student and the
label-only baseline, and the store overhead. A user's data names no entry: `train` runs alone, and a missing
store stops it with the command to run (`ced_lightning.inputs.ensure_inputs`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ced_lightning import compose_inner, conf_dir
from ced_lightning.data.demo import build_demo_stores
from ced_lightning.errors import CheckFailedError, InputError
from ced_lightning.extract import run_extract
from ced_lightning.inputs import check_train_config
from ced_lightning.launch import global_rank
from ced_lightning.store import store_exists, store_nbytes
from ced_lightning.train import train

log = logging.getLogger(__name__)


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    """The demo's `train`: build what is missing, train as `cfg` says, then print the demo's table (for a
    student; `+summary=false` skips it). Returns `train`'s metrics."""
    check_train_config(cfg)  # a typo is reported before minutes of teachers and a logit store
    build_missing = bool(cfg.data.get("build_missing"))
    timer = StageTimer()
    if build_missing:
        build_demo_artifacts(cfg, timer)
    with timer("student"):
        metrics = train(cfg)
    baseline: dict[str, Any] | None = None
    if cfg.task.name == "distill" and cfg.data.get("label_only_baseline"):
        with timer("label-only baseline"):
            baseline = train(label_only_cfg(cfg))
    if build_missing and cfg.task.name == "distill" and cfg.get("summary", True) and global_rank() == 0:
        with timer("teachers scored"):
            rows, teacher_test = demo_summary(cfg, metrics, baseline)
        print_demo_summary(rows)
        verdict = demo_verdict(teacher_test, metrics.get("test/mAP"), (baseline or {}).get("test/mAP"))
        for line in verdict:
            print(line)
        log.info("demo verdict: %s", " | ".join(verdict))
        log.info("demo: wall time per stage: %s", timer.report())
    if baseline is not None:
        metrics.update({f"label_only/{k}": v for k, v in baseline.items() if k in ("val/mAP", "test/mAP")})
    return metrics


class StageTimer:
    """Wall seconds per stage of a demo run, for its closing log line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def report(self) -> str:
        total = sum(self.seconds.values())
        parts = [f"{name} {value:.0f} s" for name, value in self.seconds.items()]
        return ", ".join([*parts, f"total {total:.0f} s"])


def label_only_epochs(student_epochs: int, student_clips: int, labeled_clips: int, batch_size: int) -> int:
    """Epochs over the labeled clips that give the label-only baseline at least the optimizer steps of the
    student's `student_epochs` over its store (full batches per epoch, as the training stream cuts them)."""
    student_steps = student_epochs * (student_clips // batch_size)
    labeled_batches = labeled_clips // batch_size
    if labeled_batches == 0:
        raise InputError(f"the labeled store has {labeled_clips} clips, fewer than one batch of {batch_size}")
    return max(1, math.ceil(student_steps / labeled_batches))


def label_only_validations(
    baseline_epochs: int, student_epochs: int, student_val_every: int
) -> tuple[int, int]:
    """(epochs, val_every) of the label-only baseline: as many validations as the student has, the last at
    its last epoch, so both runs' best validation and averaged checkpoint pick among equally many points.
    The epochs round up to a multiple of `val_every` (a few steps more for the baseline, never fewer)."""
    validations = max(1, student_epochs // max(1, student_val_every))
    val_every = max(1, math.ceil(baseline_epochs / validations))
    return val_every * validations, val_every


def label_only_cfg(cfg: DictConfig) -> DictConfig:
    """The label-only baseline of the student run `cfg`: the same network, optimizer, schedule shape, mixup
    and seed, task=supervised on the labeled store with the teachers' augmentation recipe, for as many
    optimizer steps as the student (`label_only_epochs`); its run folder is `<student's>/label_only`."""
    from ced_lightning.store.audio import AudioStore

    baseline = copy.deepcopy(cfg)
    with open_dict(baseline):
        # The `task` group's supervised option, its values interpolated from this run's config as a
        # command line's task=supervised would (data.train then names the labeled store).
        baseline.task = OmegaConf.load(conf_dir() / "task" / "supervised.yaml")
        student_clips = len(AudioStore.open(str(cfg.data.train)))
        labeled_clips = len(AudioStore.open(str(baseline.data.train)))
        student_epochs = int(cfg.data.schedule.max_epochs)
        epochs = label_only_epochs(student_epochs, student_clips, labeled_clips, int(cfg.data.batch_size))
        baseline.data.schedule.max_epochs, baseline.data.schedule.val_every = label_only_validations(
            epochs, student_epochs, int(cfg.data.schedule.val_every)
        )
        baseline.paths.output_dir = str(Path(cfg.paths.output_dir) / "label_only")
        baseline.tags = [*list(cfg.get("tags") or []), "label_only"]
        # The student replays the teachers' augmentation from the logit store; trained with labels, the same
        # network gets that recipe drawn fresh, as the teachers did.
        baseline.augment = OmegaConf.merge(baseline.augment, cfg.data.get("augment") or {})
    log.info(
        "demo: label-only baseline: %s with labels on %s (%d clips) for %d epochs, the student's optimizer "
        "steps (%d epochs over %d clips), validated every %d epochs as often as the student",
        cfg.model.get("name", "the student"),
        baseline.data.train,
        labeled_clips,
        baseline.data.schedule.max_epochs,
        cfg.data.schedule.max_epochs,
        student_clips,
        baseline.data.schedule.val_every,
    )
    return baseline


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
            "demo: extracting the teachers' top-%d over %d augmentation epochs of %s into %s (not there yet)",
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
        f"topk={cfg.data.extract.topk}",
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


def demo_summary(
    cfg: DictConfig, student_metrics: dict[str, Any], baseline_metrics: dict[str, Any] | None = None
) -> tuple[list[tuple[str, str, str]], dict[str, float]]:
    """Rows (name, validation mAP, test mAP) of the closing table: each teacher, the ensemble, the student
    and the label-only baseline (each run's best validation epoch and its `test_ckpt` checkpoint on test),
    then the logit store's size as a share of the audio store it covers; and the teachers' test mAPs."""
    val_maps, test_maps = teacher_maps(cfg, cfg.data.val), teacher_maps(cfg, cfg.data.test)
    rows = [(f"teacher {name}", _fmt(value), _fmt(test_maps[name])) for name, value in val_maps.items()]
    name = cfg.model.get("name", "CED")
    runs = [(f"student {name}, label-free", student_metrics)]
    if baseline_metrics is not None:
        runs.append((f"{name} with labels (train only)", baseline_metrics))
    rows += [(label, _fmt(m.get("val/mAP")), _fmt(m.get("test/mAP"))) for label, m in runs]
    overhead = 100.0 * store_nbytes(cfg.data.logits) / max(store_nbytes(cfg.data.train), 1)
    rows.append(("logit store / audio store", f"{overhead:.2f} %", ""))
    return rows, test_maps


def demo_verdict(
    teacher_test: dict[str, float], student_test: float | None, baseline_test: float | None
) -> list[str]:
    """The table read out, on test mAP: the student against its best single teacher and against the
    label-only baseline, with the margin; where it is not ahead, where the measured alternatives are (one
    run's seed: the rows of bench/demo_results.md are means over seeds)."""
    if student_test is None:
        return []
    singles = {name: value for name, value in teacher_test.items() if name != "ensemble"}
    against = []
    if singles:
        best = max(singles, key=singles.__getitem__)
        against.append((f"its best single teacher ({best}, {singles[best]:.4f})", singles[best]))
    if baseline_test is not None:
        against.append((f"the label-only baseline ({baseline_test:.4f})", baseline_test))
    lines = []
    for what, value in against:
        margin = float(student_test) - value
        lines.append(
            f"student against {what}: {margin:+.4f} test mAP, "
            + ("ahead" if margin > 0 else "not ahead: measured alternatives in bench/demo_sizing.md")
        )
    return lines


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None else "n/a"


def teacher_maps(cfg: DictConfig, store: str) -> dict[str, float]:
    """mAP on `store` of each teacher checkpoint and of the ensemble, combined as the logit store combines it
    (`teacher.combine`): `evaluate`'s teacher-set path (`teachers.load_teachers`,
    `evaluate.evaluate_teachers`), one pass."""
    from ced_lightning.evaluate import evaluate_teachers
    from ced_lightning.teachers import load_teachers, teacher_weights

    models, records, class_names = load_teachers(cfg.teacher)  # as extract and evaluate teacher=... load them
    table = evaluate_teachers(
        {record["name"]: model for record, model in zip(records, models, strict=True)},
        store,
        combine=str(cfg.teacher.get("combine", "mean_prob")),
        weights=teacher_weights(records),
        class_names=class_names,
        batch_size=int(cfg.data.eval_batch_size),
        device="cpu" if str(cfg.trainer.get("accelerator", "auto")) == "cpu" else None,
    )
    return {
        **{n: float(r["mAP"]) for n, r in table["teachers"].items()},
        "ensemble": float(table["ensemble"]["mAP"]),
    }


def print_demo_summary(rows: list[tuple[str, str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="CED demo: mAP")
    table.add_column("")
    table.add_column("val", justify="right")
    table.add_column("test", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    log.info("demo summary: %s", "; ".join(f"{n}: {v} / {t}" if t else f"{n}: {v}" for n, v, t in rows))
