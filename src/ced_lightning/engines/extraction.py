"""Logit extraction, the work behind `python -m ced_lightning.extract`: settings read once from the config
(`ExtractSettings`), the teacher check, the store created or resumed, the teachers run over it
(`modules.ensemble.TeacherEnsembleModule`), verification and the figures kept in the store.

The teachers are placed on the run's device once (`extract_logits`): the check, the extraction and
verification all run them there.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
from omegaconf import DictConfig
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.core.device import reduced_precision, resolve_precision
from ced_lightning.core.ensemble import check_combine
from ced_lightning.core.errors import CedError, CheckFailedError, ConfigError
from ced_lightning.core.labels import class_list_difference, resolve_class_names
from ced_lightning.engines.launch import global_rank
from ced_lightning.engines.scoring import (
    MIN_GAIN_OVER_CHANCE,
    evaluate_teachers,
    format_teacher_table,
    weak_teachers,
)
from ced_lightning.engines.teachers import teacher_weights
from ced_lightning.engines.verify import check_verified, verify_store
from ced_lightning.modules.ensemble import TeacherEnsembleModule
from ced_lightning.store import remove_partial_writes, store_exists, write_store_json
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.concat import audio_nbytes, audio_source, open_audio, source_records, store_urls
from ced_lightning.store.logit_layout import LogitStoreLayout
from ced_lightning.store.logits import FORMAT, LogitStore, read_attrs
from ced_lightning.store.remote import redact_url
from ced_lightning.store.segments import SegmentTable, segment_table

log = logging.getLogger(__name__)

# The extraction's figures, kept inside the store: a name next to it could be a user's file.
STATS_FILE = "extract_stats.json"

# How long ranks > 0 of an externally launched job (torchrun, SLURM) wait for rank 0 to create the store.
_CREATE_WAIT_S = 600.0

# Lightning's older spellings of its precision settings, and what it runs for each.
_PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}

# topk=null keeps every class of a data set with at most this many classes (storing them costs next to
# nothing), and the paper's 20 (of AudioSet's 527) of larger ones.
ALL_CLASSES_UP_TO = 32
LARGE_SET_TOPK = 20


@dataclass(frozen=True)
class ExtractSettings:
    """What one extraction run reads from its config (conf/extract.yaml), read and checked once
    (`extract_settings`)."""

    output: str
    audio_stores: list[str]
    epochs: int
    topk: int | None  # None: `store_topk` decides
    quantization: str
    recipe: AugmentRecipe
    seed: int
    clip_samples: int
    segment_samples: int
    segment_seconds_given: bool
    combine: str
    block_clips: int
    teacher_precision: str
    micro_batch_size: int
    num_workers: int
    limit_blocks: int | None
    throttle_s: float
    verify: int
    check_store: str | None
    check_min_gain: float
    check_batch_size: int
    allow_weak_teachers: bool


def extract_settings(cfg: DictConfig) -> ExtractSettings:
    """The run's settings from its composed config; raises ConfigError for a value the run cannot use."""
    combine = str(cfg.teacher.get("combine", "mean_prob"))
    check_combine(combine)  # before the store exists: a store made with a typo would refuse the fix
    clip = clip_samples(cfg)
    check_cfg = cfg.get("teacher_check") or {}
    return ExtractSettings(
        output=str(cfg.output),
        audio_stores=store_urls(cfg.audio_store),  # a list of stores: read as one (store.concat)
        epochs=int(cfg.epochs),
        topk=int(cfg.topk) if cfg.get("topk") is not None else None,
        quantization=str(cfg.quantization),
        recipe=AugmentRecipe.for_clip(cfg.get("augment"), float(cfg.clip_seconds)),  # scaled to the clip
        seed=int(cfg.seed),
        clip_samples=clip,
        segment_samples=segment_samples(cfg, clip),
        segment_seconds_given=cfg.get("segment_seconds") is not None,
        combine=combine,
        block_clips=int(cfg.block_clips),
        teacher_precision=teacher_precision(cfg),
        micro_batch_size=int(cfg.micro_batch_size),
        num_workers=int(cfg.num_workers),
        limit_blocks=cfg.get("limit_blocks"),
        throttle_s=float(cfg.get("throttle_s") or 0.0),
        verify=int(cfg.get("verify") or 0),
        check_store=str(check_cfg["store"]) if check_cfg.get("store") else None,
        check_min_gain=float(check_cfg.get("min_gain", MIN_GAIN_OVER_CHANCE)),
        check_batch_size=int(check_cfg.get("batch_size", 32)),
        allow_weak_teachers=bool(cfg.get("allow_weak_teachers")),
    )


def teacher_precision(cfg: DictConfig) -> str:
    """The precision the teachers run at (`trainer.precision` resolved as the trainer will: Lightning's name).

    float32 by default (conf/extract.yaml): bf16's error is of the order of the store's own int8 rounding
    (docs/logit_store.md, "Teacher precision"), so it would about double the targets' error.
    """
    precision = str(resolve_precision(cfg.trainer.get("precision", "auto"), str(cfg.trainer.accelerator)))
    return _PRECISION_ALIASES.get(precision, precision)


def clip_samples(cfg: DictConfig) -> int:
    """`clip_seconds` in samples: the teachers' input."""
    samples = round(float(cfg.clip_seconds) * SAMPLE_RATE)
    if samples < 1:
        raise ConfigError(f"clip_seconds must be > 0, got {cfg.clip_seconds}")
    return samples


def segment_samples(cfg: DictConfig, clip: int) -> int:
    """`segment_seconds` in samples (default: `clip`, the samples of `clip_seconds`)."""
    seconds = cfg.get("segment_seconds")
    if seconds is None:
        return clip
    samples = round(float(seconds) * SAMPLE_RATE)
    if not 1 <= samples <= clip:
        raise ConfigError(
            f"segment_seconds must be > 0 and at most clip_seconds ({cfg.clip_seconds}: the teachers' "
            f"input), got {seconds}"
        )
    return samples


def _wait_for_store(url: str, timeout: float = _CREATE_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            LogitStore.open(url)
            return
        except (FileNotFoundError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def create_or_resume(
    settings: ExtractSettings,
    audio: AudioStore,
    records: list[dict],
    class_names: list[str] | None,
    num_classes: int,
) -> LogitStore:
    """Rank 0 creates the store (or checks it matches); other ranks wait for it, then check it too."""
    layout = LogitStoreLayout(
        num_clips=len(audio),
        epochs=settings.epochs,
        topk=store_topk(settings, num_classes),
        num_classes=num_classes,
        class_names=class_names,
        quantization=settings.quantization,
        recipe=settings.recipe,
        clip_samples=settings.clip_samples,
        block_clips=settings.block_clips,
    )
    identity = {
        "seed": settings.seed,
        "audio_fingerprint": audio.fingerprint,
        "audio_url": audio.url,
        "audio_sources": source_records(audio),
        "teachers": records,
        "combine": settings.combine,
        "teacher_precision": settings.teacher_precision,
    }
    if global_rank() != 0:
        _wait_for_store(settings.output)
    elif store_exists(settings.output):
        # Rank 0 holds the store's lock: temporary files are what a killed run left, not writes in flight.
        removed = remove_partial_writes(settings.output)
        if removed:
            log.info("%s: removed %d partial writes left by an interrupted run", settings.output, removed)
    segments = resumed_layout(settings, audio, segment_table(audio.lengths, settings.segment_samples))
    return LogitStore.create(settings.output, dataclasses.replace(layout, segments=segments), **identity)


def resumed_layout(settings: ExtractSettings, audio: AudioStore, segments: SegmentTable) -> SegmentTable:
    """`segments`, or one row per clip where the output is a store of the same audio written before segments
    (no positions) and `segment_seconds` is not given: resuming it keeps its layout (each clip's head)."""
    if settings.segment_seconds_given or segments.is_one_per_clip(len(audio)):
        return segments
    url = settings.output
    if not store_exists(url):
        return segments
    attrs = read_attrs(url)
    if (
        attrs.get("format") != FORMAT
        or attrs.get("creation_incomplete")
        or attrs.get("segment_samples") is not None
        or attrs.get("audio_fingerprint") != audio.fingerprint  # another extraction: refused by create
    ):
        return segments
    log.warning(
        "%s was made before segments: it holds each clip's first %g s, so this run finishes it that way. "
        "Extract into a new output to teach on all %d segments of the %d clips.",
        redact_url(url),
        settings.clip_samples / SAMPLE_RATE,
        len(segments),
        len(audio),
    )
    return SegmentTable.one_per_clip(len(audio), settings.clip_samples)


def default_topk(num_classes: int) -> int:
    """The top-k of `topk=null`: every class up to `ALL_CLASSES_UP_TO` classes, else `LARGE_SET_TOPK`."""
    return num_classes if num_classes <= ALL_CLASSES_UP_TO else LARGE_SET_TOPK


def store_topk(settings: ExtractSettings, num_classes: int) -> int:
    """`topk` as given; where null, the existing output's (a rerun resumes the store as it was made), else
    `default_topk`."""
    if settings.topk is not None:
        return settings.topk
    if store_exists(settings.output) and read_attrs(settings.output).get("topk"):
        return int(read_attrs(settings.output)["topk"])
    return default_topk(num_classes)


def labels_beyond_topk(label_counts: np.ndarray, topk: int, num_classes: int) -> str | None:
    """A warning when labeled clips (`label_counts`: labels per clip, 0 for unlabeled ones) carry more labels
    than a top-`topk` row can hold, with the counts and the top-k that holds them; None when none does."""
    labeled = int((label_counts > 0).sum())
    beyond = int((label_counts > topk).sum())
    if not beyond:
        return None
    most = int(label_counts.max())
    suggested = num_classes if num_classes <= ALL_CLASSES_UP_TO else most
    return (
        f"{beyond:,} of {labeled:,} labeled clips carry more than {topk} labels (up to {most}); topk={topk} "
        f"keeps at most {topk} classes of each (use topk={suggested} to keep all)"
    )


def _store_class_names(
    teacher_names: list[str] | None, audio: AudioStore, num_classes: int
) -> list[str] | None:
    difference = class_list_difference(teacher_names, audio.class_names, sources=("the teachers", audio.url))
    if difference is not None and teacher_names is not None and audio.class_names is not None:
        log.warning(
            "the teachers' class list differs from the audio store's (%s); storing the teachers'", difference
        )
    return resolve_class_names(num_classes, teacher_names, audio.class_names, placeholders=False)


class WeakTeachersError(CedError, RuntimeError):
    """`teacher_check` found teachers near chance on the labelled store, and `allow_weak_teachers` is off."""


def check_teacher_quality(
    settings: ExtractSettings,
    teachers: Sequence[nn.Module],
    names: list[str],
    class_names: list[str] | None,
    weights: Sequence[float] | None = None,
) -> dict[str, Any] | None:
    """Score each teacher and the ensemble on `teacher_check.store` where they are, and print the table
    (None when no store is given). Raises `WeakTeachersError` when any of them is near chance
    (`weak_teachers` with `teacher_check.min_gain`) unless `allow_weak_teachers`; the table (with `weak`)
    goes into the stats."""
    if settings.check_store is None:
        log.warning(
            "the teachers are not checked before their logits are stored: give teacher_check.store=VAL_STORE "
            "(a labelled audio store) to score each of them and their ensemble against chance first"
        )
        return None
    min_gain = settings.check_min_gain
    table = evaluate_teachers(
        dict(zip(names, teachers, strict=True)),
        settings.check_store,
        combine=settings.combine,
        weights=weights,
        class_names=class_names,
        batch_size=settings.check_batch_size,
        device=_device_of(teachers[0]),
        stage="teacher_check",
    )
    weak = weak_teachers(table, min_gain)
    text = format_teacher_table(table, min_gain)
    table.update(min_gain=min_gain, weak=weak)
    if weak and not settings.allow_weak_teachers:
        # The table inside the message: a run logged to a file keeps it with the error.
        raise WeakTeachersError(
            f"teacher_check: {', '.join(weak)} near chance on {table['store']} (mAP closes less than "
            f"{min_gain:g} of the gap from chance to 1.0):\n{text}\nA student distilled from these logits "
            "learns little. Train the teachers longer, or start them from released weights, check the labels "
            "of both stores, or store them anyway with allow_weak_teachers=true (or a lower "
            "teacher_check.min_gain)."
        )
    print(text)
    if weak:
        log.warning("allow_weak_teachers=true: storing the logits of %s, near chance", ", ".join(weak))
    return table


def _device_of(model: nn.Module) -> Any:
    return next(model.parameters()).device


def extract_logits(
    settings: ExtractSettings,
    teachers: Sequence[nn.Module],
    records: list[dict[str, Any]],
    teacher_classes: list[str] | None,
    trainer: pl.Trainer,
    audio: AudioStore | None = None,
) -> LogitStore:
    """Check the teachers (`teacher_check`), create or resume the output, fill its missing blocks with
    `trainer`, verify and report; returns the store (complete on rank 0 unless `limit_blocks`).

    `teachers` (`teachers.load_teachers`, with their `records` and class names) are moved to the trainer's
    device here, once, in the trainer's precision after the check (which scores them in float32). `audio`:
    `settings.audio_stores` opened (opened here when not given)."""
    audio = audio if audio is not None else open_audio(settings.audio_stores)
    device = trainer.strategy.root_device
    teachers = [teacher.to(device) for teacher in teachers]
    quality = None
    if global_rank() == 0:  # before the store exists: weak teachers leave nothing behind
        names = [r["name"] for r in records]
        quality = check_teacher_quality(settings, teachers, names, teacher_classes, teacher_weights(records))
    # What Lightning's precision does to the modules it runs (e.g. bf16-true casts the weights); the
    # ensemble module leaves the teachers where they are, so Lightning's moves never reach them.
    teachers = [trainer.strategy.precision_plugin.convert_module(teacher) for teacher in teachers]
    num_classes = int(teachers[0].num_classes)
    class_names = _store_class_names(teacher_classes, audio, num_classes)
    store = create_or_resume(settings, audio, records, class_names, num_classes)
    beyond = labels_beyond_topk(audio.label_counts(), store.topk, num_classes) if global_rank() == 0 else None
    if beyond:
        log.warning("%s", beyond)

    module = TeacherEnsembleModule(
        teachers,
        store_url=store.url,
        recipe=store.recipe,
        seed=store.seed,
        epochs=store.epochs,
        topk=store.topk,
        combine=store.combine,
        weights=store.teacher_weights,
        micro_batch_size=settings.micro_batch_size,
        audio_url=audio_source(audio),
        num_workers=settings.num_workers,
        limit_blocks=settings.limit_blocks,
        throttle_s=settings.throttle_s,
        teacher_names=[r["name"] for r in records],
    )
    todo = module.blocks_to_do()
    rows = np.concatenate([np.arange(*store.block_range(b)) for b in todo] or [np.zeros(0, np.int64)])
    clips = store.segments().num_clips_in(rows)
    if todo:
        log.info(
            "%s: extracting %d of %d blocks (%d segments of %d clips x %d epochs)",
            store.url,
            len(todo),
            store.num_blocks,
            len(rows),
            clips,
            store.epochs,
        )
        started = time.perf_counter()
        trainer.predict(module, return_predictions=False)
        module.finish(trainer)
        seconds = time.perf_counter() - started
    else:
        seconds = 0.0
        log.info("%s is complete already; nothing to extract", store.url)
    if not trainer.is_global_zero:
        return store

    store = LogitStore.open(store.url)
    if settings.limit_blocks is None and not store.is_complete():
        raise CheckFailedError(
            f"{store.url}: blocks {store.missing_blocks()} are still missing after extraction"
        )
    stats = extraction_stats(store, audio, clips, seconds, trainer, segments=len(rows))
    if quality is not None:
        stats["teacher_check"] = quality
    if todo and module.steady_clips_per_s is not None:
        stats["steady_clips_per_s"] = round(module.steady_clips_per_s, 2)
    if settings.verify > 0 and store.is_complete():
        stats["verify"] = verify_store(
            store,
            teachers,
            audio,
            settings.verify,
            settings.seed,
            replay_reduced=reduced_precision(trainer.precision, device),
        )
    report(store, stats)
    if "verify" in stats:  # after the figures are printed and saved
        check_verified(store.url, stats["verify"])
    return store


def extraction_stats(
    store: LogitStore,
    audio: AudioStore,
    clips: int,
    seconds: float,
    trainer: Any | None = None,
    segments: int | None = None,
) -> dict[str, Any]:
    """The run's figures: `clips` and their `segments` (logit-store rows; default `clips`) extracted in
    `seconds`, and the store's clips and segments. Per-row figures (`clip_epochs_per_s`,
    `bytes_per_clip_epoch`, `steady_clips_per_s`) count segments in a store of segments."""
    segments = clips if segments is None else segments
    stored = store.nbytes_stored()
    audio_bytes = audio_nbytes(audio)
    stats: dict[str, Any] = {
        "clips_extracted": clips,
        "segments_extracted": segments,
        "seconds": round(seconds, 3),
        "clips_per_s": round(clips / seconds, 2) if seconds > 0 else None,
        "segments_per_s": round(segments / seconds, 2) if seconds > 0 else None,
        "clip_epochs_per_s": round(segments * store.epochs / seconds, 2) if seconds > 0 else None,
        "bytes_per_clip_epoch": round(store.bytes_per_clip_epoch(), 2),
        "store_bytes": stored,
        "audio_store_bytes": audio_bytes,
        "percent_of_audio_store": round(100.0 * stored / max(audio_bytes, 1), 3),
        "complete": store.is_complete(),
        "num_clips": store.num_clips,
        "num_segments": store.num_rows,
        "segment_seconds": round((store.segment_samples or store.clip_samples) / SAMPLE_RATE, 6),
    }
    if trainer is not None:
        stats["devices"] = int(trainer.world_size)
        stats["precision"] = str(trainer.precision)
    return stats


def report(store: LogitStore, stats: dict[str, Any]) -> None:
    """Print the figures and keep them in the store (`<output>/extract_stats.json`)."""
    segments = (
        f" ({store.num_rows} segments of {store.segment_samples / SAMPLE_RATE:g} s)"
        if store.segment_samples is not None
        else ""
    )
    lines = [
        f"logit store {redact_url(store.url)}: {store.num_clips} clips{segments} x {store.epochs} epochs, "
        f"top-{store.topk}, {store.quantization}"
    ]
    lines += [f"  {key}: {value}" for key, value in stats.items() if key not in ("verify", "teacher_check")]
    if "teacher_check" in stats:
        check = stats["teacher_check"]
        lines.append(
            f"  teacher_check: ensemble mAP {check['ensemble']['mAP']} on {check['store']} "
            f"(chance {check['chance_mAP']}); near chance: {', '.join(check['weak']) or 'none'}"
        )
    if "verify" in stats:
        v = stats["verify"]
        lines.append(
            f"  verify: {v['samples']} (epoch, clip) pairs, max |diff| {v['max_abs_diff']:.2e} "
            f"(bound {v['bound']:.2e}) -> {'OK' if v['ok'] else 'MISMATCH'}"
        )
    print("\n".join(lines))
    write_store_json(store.url, STATS_FILE, stats)
