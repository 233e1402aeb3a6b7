"""The import engine: the paper's released teacher logits into a logit store (`python -m
ced_lightning.import_logits` is its command).

`source` is a released `chunk_10` folder (`logits_ep{e}_{r}.h5` + `.parquet`, `ced_lightning.release.reader`).
Every stored epoch e becomes the store's epoch e - 1; each (epoch, clip) gets the row of its AudioSet name
(a store row per released span: a clip's later pieces and repeats are rows of their own, and each row reads
the span the original read, `ImportPlan`),
its top-k kept exactly (float16) or quantized as `extract` does (int8), and its seed replayed into the
store's explicit augmentation parameters (`ced_lightning.release.replay`). The student then trains from it
unchanged. Resumable like `extract` (the same command finishes missing blocks); a store made from another
source, audio store or quantization is refused.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from omegaconf import DictConfig

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentParams
from ced_lightning.core.errors import ConfigError
from ced_lightning.core.labels import audioset_classes, class_list_difference, resolve_class_names
from ced_lightning.core.progress import ProgressLog
from ced_lightning.core.quantize import KINDS
from ced_lightning.release.reader import (
    ImportPlan,
    LegacyImportError,
    count_with_examples,
    file_provenance,
    find_legacy_files,
    plan_import,
    read_block_rows,
    source_digest,
    validate_rows,
)
from ced_lightning.release.replay import LEGACY_CHUNK_SAMPLES, LEGACY_RECIPE, legacy_augment_params
from ced_lightning.store import remove_partial_writes, store_exists, store_nbytes, write_store_json
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.lock import store_lock
from ced_lightning.store.logit_layout import LogitStoreLayout
from ced_lightning.store.logits import HAS_TARGETS, LogitStore
from ced_lightning.store.remote import redact_url

log = logging.getLogger(__name__)

# The per (epoch, clip) seeds of the original, kept beside the parameters replayed from them.
LEGACY_SEEDS = "legacy_seeds"
IMPORTED_TEACHER = "ced_released_logits"
STATS_FILE = "import_stats.json"
_EXAMPLES = 5


def check_plan(
    plan: ImportPlan,
    clip_names: list[str],
    allow_unmatched_rows: bool,
    allow_clips_without_rows: bool,
    allow_long_rows: bool = False,
    allow_repeated_rows: bool = False,
) -> None:
    """Refuse, unless allowed, clips of the audio store without rows, rows without a clip, rows longer than
    the teachers' input and a clip's span twice in one epoch; each named with counts and examples."""
    problems = []
    missing = plan.clips_without_rows + plan.clips_with_some_epochs
    if missing and not allow_clips_without_rows:
        shown = ", ".join(clip_names[i] for i in missing[:_EXAMPLES])
        problems.append(
            f"{len(plan.clips_without_rows)} clips of the audio store have no row in any stored epoch and "
            f"{len(plan.clips_with_some_epochs)} have rows in only some epochs (e.g. {shown}"
            f"{' ...' if len(missing) > _EXAMPLES else ''}); the original never extracted clips shorter "
            "than 5 s. Pass allow_clips_without_rows=true to import anyway (the student then leaves each "
            "such clip out of the epochs it has no row in: the store's has_targets), or prepare an audio "
            "store of the clips the release covers"
        )
    if plan.unmatched_rows and not allow_unmatched_rows:
        problems.append(
            f"{plan.unmatched_rows} of {plan.rows} released rows match no clip of the audio store (e.g. "
            f"{'; '.join(plan.unmatched_examples)}). If those clips are missing from your download, pass "
            "allow_unmatched_rows=true to import the others; if none match, check that audio_store is the "
            "one prepared from the same AudioSet subset"
        )
    if plan.long_rows and not allow_long_rows:
        problems.append(
            f"rows spanning more than {LEGACY_CHUNK_SAMPLES / SAMPLE_RATE:g} s: "
            f"{count_with_examples(plan.long_rows)}. "
            "The original trains on the whole span; the student's input is the teachers' 10 s. Pass "
            "allow_long_rows=true to import them with the student hearing each span's first 10 s"
        )
    if plan.repeated_rows and not allow_repeated_rows:
        problems.append(
            "clips with two rows over the same span in one epoch: "
            f"{count_with_examples(plan.repeated_rows)}. The original trains on each (a clip listed "
            "twice). Pass allow_repeated_rows=true to import them so, "
            "or remove the duplicate files if a rank's output was copied twice"
        )
    if problems:
        raise LegacyImportError("cannot import the released logits:\n  " + "\n  ".join(problems))


def length_mismatches(
    plan: ImportPlan, lengths: np.ndarray, clip_names: list[str]
) -> tuple[int, list[str], int]:
    """Clips whose released span (the length the original read and shifted) differs from what the audio
    store's clip holds from the span's start (up to 10 s): (count, examples, how many of them are longer
    here and so cut to the released span). A shorter clip's shifts are the original's draws applied to
    fewer samples."""
    rest = np.asarray(lengths, dtype=np.int64)[plan.clip_of] - plan.start_of
    ours = np.minimum(rest, LEGACY_CHUNK_SAMPLES)[None, :]
    present = plan.file_of >= 0
    differs_rows = ((plan.span_samples != ours) & present).any(0)
    longer_rows = ((plan.span_samples < ours) & present).any(0)
    differs = np.zeros(len(lengths), dtype=bool)
    longer = np.zeros(len(lengths), dtype=bool)
    np.logical_or.at(differs, plan.clip_of, differs_rows)
    np.logical_or.at(longer, plan.clip_of, longer_rows)
    examples = []
    for r in np.flatnonzero(differs_rows)[:_EXAMPLES]:
        released = int(np.where(present[:, r], plan.span_samples[:, r], 0).max())
        at = f" from {plan.start_of[r] / SAMPLE_RATE:g} s" if plan.start_of[r] else ""
        examples.append(f"{clip_names[plan.clip_of[r]]}{at}: {released} released, {int(ours[0, r])} here")
    return int(differs.sum()), examples, int(longer.sum())


def import_block(store: LogitStore, plan: ImportPlan, block: int) -> None:
    """Read, replay and write block `block` (all epochs); pairs without a row get zeros and has_targets 0."""
    start, stop = store.block_range(block)
    indices, values, seeds = read_block_rows(plan, slice(start, stop))
    present = plan.file_of[:, start:stop] >= 0
    spans = plan.span_samples[:, start:stop]
    params = []
    for e in range(plan.epochs):
        replayed = legacy_augment_params(seeds[e, present[e]], spans[e, present[e]])
        epoch_params = {
            name: np.zeros((stop - start, *shape), dtype=dtype)
            for name, (dtype, shape) in AugmentParams.fields(LEGACY_RECIPE).items()
        }
        for name, value in replayed.values.items():
            epoch_params[name][present[e]] = value
        params.append(AugmentParams(epoch_params))
    extra = {LEGACY_SEEDS: seeds, HAS_TARGETS: present.astype(np.uint8)}
    store.write_block(block, indices, values.astype(np.float32), params, extra=extra)


def run_import(cfg: DictConfig) -> LogitStore:
    """Import (or finish importing) `cfg.source` into the logit store `cfg.output`; returns it."""
    for key in ("source", "audio_store", "output"):
        if cfg.get(key) in (None, "", "???"):
            raise ConfigError(f"{key}=... is required (python -m ced_lightning.import_logits --help)")
    quantization = str(cfg.quantization)
    if quantization not in KINDS:
        raise ConfigError(f"quantization must be one of {list(KINDS)}, not {quantization!r}")
    with store_lock(str(cfg.output), "import_logits"):
        return _import(cfg, quantization)


def _import(cfg: DictConfig, quantization: str) -> LogitStore:
    started = time.perf_counter()
    source, output = str(cfg.source), str(cfg.output)
    audio = AudioStore.open(str(cfg.audio_store))
    files = find_legacy_files(source)
    plan = plan_import(files, audio.names, LEGACY_CHUNK_SAMPLES)
    check_plan(
        plan,
        audio.names,
        bool(cfg.allow_unmatched_rows),
        bool(cfg.allow_clips_without_rows),
        bool(cfg.allow_long_rows),
        bool(cfg.allow_repeated_rows),
    )
    if plan.repeated_rows:
        log.warning(
            "%d released rows repeat a clip's span within one epoch (e.g. %s); each is a row of its own, as "
            "the original trains on each",
            len(plan.repeated_rows),
            plan.repeated_rows[0],
        )
    num_classes = int(cfg.num_classes)
    for f in files:
        validate_rows(f, num_classes)
    provenance_files = file_provenance(files)
    released_names = list(audioset_classes().names) if num_classes == len(audioset_classes()) else None
    difference = class_list_difference(audio.class_names, released_names, sources=(audio.url, "AudioSet"))
    if difference is not None and audio.class_names is not None and released_names is not None:
        log.warning(
            "the audio store's class list differs from AudioSet's (the release's: %s); storing AudioSet's",
            difference,
        )
    class_names = resolve_class_names(num_classes, released_names, audio.class_names, placeholders=False)
    if store_exists(output):
        removed = remove_partial_writes(output)  # we hold the lock: these are a killed run's leftovers
        if removed:
            log.info("%s: removed %d partial writes left by an interrupted run", output, removed)
    layout = LogitStoreLayout(
        num_clips=len(audio),
        epochs=plan.epochs,
        topk=plan.topk,
        num_classes=num_classes,
        class_names=class_names,
        quantization=quantization,
        recipe=LEGACY_RECIPE,
        clip_samples=LEGACY_CHUNK_SAMPLES,
        block_clips=int(cfg.block_clips),
        # Each row reads the span the original read: a later piece of a long clip, the released span of a
        # clip longer than it (one row per clip at 0, none cut: a store without positions).
        segments=plan.segment_table(audio.lengths, LEGACY_CHUNK_SAMPLES),
        extra_arrays={LEGACY_SEEDS: "int32", HAS_TARGETS: "uint8"},
    )
    store = LogitStore.create(
        output,
        layout,
        seed=None,  # the parameters come from `legacy_seeds`, not from our counter-based draws
        audio_fingerprint=audio.fingerprint,
        audio_url=audio.url,
        # The release as the store's one 'teacher': identified by its files, so another source is refused.
        teachers=[
            {
                "name": IMPORTED_TEACHER,
                "sha256": source_digest(provenance_files),
                "source": redact_url(source),
            }
        ],
        # The released ensemble averages its members' probabilities (the original's EnsembleModel).
        combine="mean_prob",
        provenance={
            "kind": "ced_legacy_release",
            "source": redact_url(source),
            "files": provenance_files,
            "epoch_map": "stored epoch e (1-based) -> store epoch e - 1; every stored epoch imported",
            "params_from": (
                f"{LEGACY_SEEDS}: torch.manual_seed(seed), torch_audiomentations 0.11 "
                "Shift(-0.5, 0.5, p=0.5) on the clip's released span, then value, min_value = torch.rand(1), "
                "torch.rand(1): masks width long(value*P), start long(min_value*(size - value*P)) on "
                "1001 frames (P=192) and 64 bands (P=24)"
            ),
            "unmatched_rows": plan.unmatched_rows,
            "clip_epochs_without_rows": int((plan.file_of < 0).sum()),
        },
    )
    todo = store.missing_blocks()
    limit = cfg.get("limit_blocks")
    if limit is not None:
        todo = todo[: int(limit)]
    log.info("%s: importing %d of %d blocks (%d epochs)", output, len(todo), store.num_blocks, store.epochs)
    throttle_s = float(cfg.get("throttle_s") or 0.0)
    progress = ProgressLog("import_logits", sum(b - a for a, b in map(store.block_range, todo)), unit="clips")
    for block in todo:
        import_block(store, plan, block)
        if throttle_s:
            time.sleep(throttle_s)
        start, stop = store.block_range(block)
        progress.advance(stop - start)
    progress.close()
    seconds = time.perf_counter() - started
    store = LogitStore.open(store.url)
    mismatched, mismatch_examples, cut = length_mismatches(plan, audio.lengths, audio.names)
    if mismatched:
        log.warning(
            "%d clips are not as long as the release says (e.g. %s); their shifts are the original's draws; "
            "%d of them are longer here and the student hears only the released span",
            mismatched,
            "; ".join(mismatch_examples),
            cut,
        )
    imported = sum(stop - start for start, stop in map(store.block_range, todo))
    stats = {
        "source": redact_url(source),
        "epochs": plan.epochs,
        "ranks_per_epoch": {str(e): r for e, r in plan.ranks_per_epoch().items()},
        "rows": plan.rows,
        "matched_rows": plan.matched_rows,
        "unmatched_rows": plan.unmatched_rows,
        "unmatched_examples": plan.unmatched_examples,
        "clips": store.num_clips,
        "clips_without_rows": len(plan.clips_without_rows),
        "clips_with_rows_in_some_epochs": len(plan.clips_with_some_epochs),
        "clips_without_rows_examples": [
            audio.names[i] for i in (plan.clips_without_rows + plan.clips_with_some_epochs)[:_EXAMPLES]
        ],
        "clip_epochs_without_rows": int((plan.file_of < 0).sum()),
        "length_mismatches": mismatched,
        "length_mismatch_examples": mismatch_examples,
        "clips_cut_to_released_span": cut,
        "store_rows": store.num_rows,
        "rows_starting_after_0s": len(plan.late_rows),
        "rows_longer_than_10s": len(plan.long_rows),
        "repeated_rows": len(plan.repeated_rows),
        "row_examples": (plan.late_rows[:2] + plan.long_rows[:2] + plan.repeated_rows[:2]),
        "clips_imported": imported,
        "seconds": round(seconds, 3),
        "clip_epochs_per_s": round(imported * store.epochs / seconds, 1) if seconds > 0 else None,
        "bytes_per_clip_epoch": round(store.bytes_per_clip_epoch(), 2),
        "store_bytes": store.nbytes_stored(),
        "audio_store_bytes": store_nbytes(audio.url),
        "complete": store.is_complete(),
    }
    report(store, stats)
    return store


def report(store: LogitStore, stats: dict[str, Any]) -> None:
    """Print the figures and keep them in the store (`<output>/import_stats.json`)."""
    lines = [
        f"logit store {redact_url(store.url)}: {store.num_clips} clips x {store.epochs} epochs, "
        f"top-{store.topk}, "
        f"{store.quantization}, imported from the released logits"
    ]
    lines += [f"  {key}: {value}" for key, value in stats.items()]
    print("\n".join(lines))
    write_store_json(store.url, STATS_FILE, stats)
