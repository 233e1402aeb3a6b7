"""`python -m ced_lightning.extract`: run a teacher ensemble over an audio store into a logit store.

    python -m ced_lightning.extract audio_store=STORE output=LOGIT_STORE teacher=CONFIG epochs=E topk=K \
        [quantization=float16|int8] [trainer.devices=N strategy=ddp] [clip_seconds=10.0] [segment_seconds=S]
        [seed=0] [verify=200]

Every clip is taught on all its audio: one logit-store row per `segment_seconds` segment (default
clip_seconds; the last partial segment kept when at least half a segment, `ced_lightning.store.segments`).
Clips that fit one segment give one row each, as before segments.

Resumable: the same command again finishes the missing blocks; a store made with other settings is refused.
With several devices every rank writes a disjoint, contiguous share of the missing blocks. `verify=N`
re-runs the teachers on N random (epoch, row) pairs from the stored parameters and reports the largest
difference from the stored probabilities (`ced_lightning.engines.verify`); a mismatch ends the command with
exit status 1 (also when only verifying a complete store). One run writes a store at a time (`store.lock`);
the figures are kept in the store, `<output>/extract_stats.json`.

With `teacher_check.store=VAL_STORE` (a labelled store) each teacher and the ensemble are first scored on it
(`scoring.evaluate_teachers`, the table goes into the stats), and teachers near chance are refused before
any logit is stored (`scoring.weak_teachers`) unless `allow_weak_teachers=true`. The work itself is
`ced_lightning.engines.extraction`.
"""

from __future__ import annotations

import contextlib

import hydra
from omegaconf import DictConfig

from ced_lightning import conf_dir
from ced_lightning.core.errors import ConfigError
from ced_lightning.engines.extraction import extract_logits, extract_settings
from ced_lightning.engines.launch import (
    command_errors,
    global_rank,
    prepare_ddp_relaunch,
    quiet_non_zero_ranks,
    set_cpu_threads,
)
from ced_lightning.engines.teachers import load_teachers
from ced_lightning.engines.trainer import build_trainer, finish_task
from ced_lightning.store.concat import open_audio
from ced_lightning.store.lock import store_lock
from ced_lightning.store.logits import LogitStore
from ced_lightning.store.remote import apply_storage_options


def run_extract(cfg: DictConfig) -> LogitStore:
    """Extract (or finish extracting) the logit store `cfg.output`; returns it, complete.

    Raises StoreLockedError when another run writes the store, `verify.VerificationError` when `verify` fails.
    """
    if cfg.get("output") in (None, "", "???"):
        raise ConfigError("output=PATH is required: where the logit store goes")
    apply_storage_options(cfg.get("storage_options"))
    settings = extract_settings(cfg)
    # One writer per store: the launching process (rank 0) holds the lock for the whole job; the ranks it
    # or a cluster launcher started work under it.
    lock = store_lock(settings.output, "extract") if global_rank() == 0 else contextlib.nullcontext()
    with lock:
        set_cpu_threads(cfg.get("num_threads"))  # a CNN teacher's logits depend on it on the CPU
        audio = open_audio(settings.audio_stores)  # a missing store is named before the teachers load
        teachers, records, teacher_classes = load_teachers(cfg.teacher)
        trainer = build_trainer(cfg, callbacks=[], loggers=[])
        return extract_logits(settings, teachers, records, teacher_classes, trainer, audio=audio)


@hydra.main(config_path=str(conf_dir()), config_name="extract", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    quiet_non_zero_ranks()
    prepare_ddp_relaunch()
    with finish_task(cfg):
        run_extract(cfg)


if __name__ == "__main__":
    main()
