"""What a student's run ends with, on any data: its table against the teachers, the label-only baseline and
chance, read out in verdict lines.

`python -m ced_lightning.train` runs the function the data group names in `data.entry`; every data group
names `train_and_compare` (the demo's `run_demo` builds what is missing first, then calls it). It trains as
the config says; for a student (task=distill) with `data.label_only_baseline` it also trains the row users
compare against: the same network, start, recipe and seed with labels on the labeled store
(`data.stores.supervised`), for as many optimizer steps as the student took (`label_only_cfg`); with
`side_by_side` on a CPU both at once, each in a process of its own (`engines.side_by_side`). Then, unless
`+summary=false`, it prints the table: validation and test mAP of each teacher and their ensemble (the
teachers that made the student's logit store, as its `teachers` attribute records them), the student, the
label-only baseline and chance (the mean label frequency), the optimizer steps of the two trained rows, and
the logit store's size against the audio it covers; and the verdict lines (`verdict`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from ced_lightning import compose_inner
from ced_lightning.core.errors import InputError, MissingInputError
from ced_lightning.engines.inputs import ensure_inputs
from ced_lightning.engines.launch import global_rank
from ced_lightning.engines.side_by_side import Run, side_by_side, train_runs
from ced_lightning.engines.training import train
from ced_lightning.store import store_nbytes

log = logging.getLogger(__name__)

# Where a student that is not ahead finds what to change.
NOT_AHEAD = (
    "not ahead: where to start instead in docs/own_data.md, measured alternatives in bench/demo_sizing.md"
)


class StageTimer:
    """Wall seconds per stage of a run, for its closing log line."""

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


def train_and_compare(cfg: DictConfig, timer: StageTimer | None = None) -> dict[str, Any]:
    """`train` as `cfg` says; for a student also its label-only baseline (`data.label_only_baseline`) and the
    closing table and verdict (`+summary=false` skips them). Returns the student's metrics with the
    baseline's as `label_only/<metric>`."""
    timer = timer or StageTimer()
    if cfg.task.name != "distill":
        with timer("training"):
            return train(cfg)
    baseline: dict[str, Any] | None = None
    if cfg.data.get("label_only_baseline") and side_by_side(cfg):
        ensure_inputs(cfg)  # as `train` first does: a missing store named before the baseline reads it
        runs = [Run("student", cfg), Run("label-only baseline", label_only_cfg(cfg))]
        with timer("student and label-only baseline side by side"):
            metrics, baseline = train_runs(runs, together=True)
    else:
        with timer("student"):
            metrics = train(cfg)
        if cfg.data.get("label_only_baseline"):
            with timer("label-only baseline"):
                baseline = train(label_only_cfg(cfg))
    if cfg.get("summary", True) and global_rank() == 0:
        with timer("teachers scored"):
            rows, teacher_test = comparison_rows(cfg, metrics, baseline)
        print_comparison(rows, title=f"CED {cfg.data.name}: mAP")
        lines = verdict(teacher_test, metrics.get("test/mAP"), (baseline or {}).get("test/mAP"))
        for line in lines:
            print(line)
        log.info("verdict: %s", " | ".join(lines))
    if baseline is not None:
        metrics.update(
            {
                f"label_only/{k}": v
                for k, v in baseline.items()
                if k in ("val/mAP", "test/mAP", "optimizer_steps")
            }
        )
    return metrics


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
    """The label-only baseline of the student run `cfg`: the same network, start, optimizer, schedule shape,
    mixup and seed, task=supervised on the labeled store with the teachers' augmentation recipe, for as many
    optimizer steps as the student (`label_only_epochs`); its run folder is `<student's>/label_only`."""
    from ced_lightning.store.concat import open_audio, store_urls

    baseline = copy.deepcopy(cfg)
    with open_dict(baseline):
        # The `task` group's supervised option, composed by Hydra as a command line's task=supervised would
        # (its package, its defaults), its values interpolated from this run's config (data.train then
        # names the labeled store).
        supervised = compose_inner("train", ["task=supervised"]).task
        baseline.task = OmegaConf.to_container(supervised, resolve=False)
        student_clips = len(open_audio(store_urls(cfg.data.train)))  # a list of stores is read as one
        labeled_clips = len(open_audio(store_urls(baseline.data.train)))
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
        "label-only baseline: %s with labels on %s (%d clips) for %d epochs, the student's optimizer "
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


def comparison_rows(
    cfg: DictConfig, student_metrics: dict[str, Any], baseline_metrics: dict[str, Any] | None = None
) -> tuple[list[tuple[str, str, str, str]], dict[str, float]]:
    """Rows (name, optimizer steps, validation mAP, test mAP) of the closing table: each teacher, the
    ensemble, the student and the label-only baseline (each run's best validation and its `test_ckpt`
    checkpoint on test), chance, then the logit store's size as a share of the audio store it covers; and
    the teachers' test mAPs."""
    from ced_lightning.store.concat import audio_nbytes, open_audio, store_urls

    teacher_cfg = store_teachers(str(cfg.data.logits))
    val_maps = teacher_maps(cfg, teacher_cfg, cfg.data.val) if teacher_cfg else {}
    test_maps = teacher_maps(cfg, teacher_cfg, cfg.data.test) if teacher_cfg else {}
    rows = [(f"teacher {name}", "", _fmt(value), _fmt(test_maps[name])) for name, value in val_maps.items()]
    name = cfg.model.get("name", "CED")
    runs = [(f"student {name}, label-free", student_metrics)]
    if baseline_metrics is not None:
        runs.append((f"{name} with labels (train only)", baseline_metrics))
    rows += [
        (label, str(m.get("optimizer_steps", "")), _fmt(m.get("val/mAP")), _fmt(m.get("test/mAP")))
        for label, m in runs
    ]
    rows.append(
        ("chance (mean label frequency)", "", _fmt(chance(cfg.data.val)), _fmt(chance(cfg.data.test)))
    )
    audio_bytes = audio_nbytes(open_audio(store_urls(cfg.data.train)))
    overhead = 100.0 * store_nbytes(cfg.data.logits) / max(audio_bytes, 1)
    rows.append(("logit store / audio store", "", f"{overhead:.2f} %", ""))
    return rows, test_maps


def store_teachers(logits_url: str) -> DictConfig | None:
    """The teacher set that made the logit store at `logits_url`, as its `teachers` attribute records it
    (checkpoints, or `_target_` members) with its `combine` rule; None when it records none that can be
    loaded (an imported release), said in the log."""
    from ced_lightning.store.logits import LogitStore

    store = LogitStore.open(logits_url)
    members = []
    for record in store.teachers:
        if "checkpoint" in record:
            members.append(
                {"name": record["name"], "checkpoint": record["checkpoint"], "sha256": record["sha256"]}
            )
        elif "target" in record:
            members.append({"name": record["name"], **record["target"]})
        else:
            log.info(
                "the table has no row for teacher %s: %s records no checkpoint of it",
                record["name"],
                logits_url,
            )
    if not members:
        return None
    return OmegaConf.create({"members": members, "combine": store.combine})


def teacher_maps(cfg: DictConfig, teacher_cfg: DictConfig, store: str) -> dict[str, float]:
    """mAP on `store` of each teacher of `teacher_cfg` and of their ensemble, combined as the logit store
    combines it: `evaluate`'s teacher-set path (`teachers.load_teachers`, `scoring.evaluate_teachers`), one
    pass. A checkpoint whose weights differ from those the store recorded is scored as it is now, with a
    warning."""
    from ced_lightning.engines.scoring import evaluate_teachers
    from ced_lightning.engines.teachers import load_teachers, teacher_weights

    try:
        models, records, class_names = load_teachers(teacher_cfg)
    except MissingInputError as missing:
        log.warning("the table has no teacher rows: %s", missing)
        return {}
    recorded = {m.name: m.get("sha256") for m in teacher_cfg.members}
    for record in records:
        if recorded.get(record["name"]) not in (None, record["sha256"]):
            log.warning(
                "teacher %s: %s changed since the logit store was made; the table scores it as it is now",
                record["name"],
                record.get("checkpoint"),
            )
    table = evaluate_teachers(
        {record["name"]: model for record, model in zip(records, models, strict=True)},
        store,
        combine=str(teacher_cfg.get("combine", "mean_prob")),
        weights=teacher_weights(records),
        class_names=class_names,
        batch_size=int(cfg.data.eval_batch_size),
        device="cpu" if str(cfg.trainer.get("accelerator", "auto")) == "cpu" else None,
    )
    return {
        **{n: float(r["mAP"]) for n, r in table["teachers"].items()},
        "ensemble": float(table["ensemble"]["mAP"]),
    }


def chance(store: str) -> float:
    """The mAP a ranking without information reaches on `store`: its mean label frequency (`chance_map`)."""
    import torch

    from ced_lightning.core.metrics import chance_map
    from ced_lightning.store.audio import AudioStore

    return chance_map(torch.from_numpy(AudioStore.open(store).label_matrix()))


def verdict(
    teacher_test: dict[str, float], student_test: float | None, baseline_test: float | None
) -> list[str]:
    """The table read out, on test mAP: the student against its best single teacher and against the
    label-only baseline, with the margin; where it is not ahead, where to look (one run's seed: the rows of
    bench/demo_results.md are means over seeds)."""
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
            f"student against {what}: {margin:+.4f} test mAP, " + ("ahead" if margin > 0 else NOT_AHEAD)
        )
    return lines


def _fmt(value: Any) -> str:
    return f"{float(value):.4f}" if value is not None and not math.isnan(float(value)) else "n/a"


def print_comparison(rows: list[tuple[str, str, str, str]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    # Steps first: a table quoted with fewer columns (test mAP alone) is its last ones (bench/readme_check).
    table.add_column("steps", justify="right")
    table.add_column("val", justify="right")
    table.add_column("test", justify="right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    log.info(
        "summary: %s",
        "; ".join(f"{n}: {v} / {t}" if t else f"{n}: {v}" for n, _, v, t in rows),
    )
