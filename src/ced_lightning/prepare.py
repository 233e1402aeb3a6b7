"""`python -m ced_lightning.prepare`: decode audio files into an audio store (or build the demo's stores).

    python -m ced_lightning.prepare input=PATH output=STORE [audio_dir=DIR] [class_labels=CSV] [workers=N]
    python -m ced_lightning.prepare source=hf input=SAVED_DATASET_DIR output=STORE [hf.label_column=label]
    python -m ced_lightning.prepare source=webdataset "input='shards-{000000..000003}.tar'" output=STORE
    python -m ced_lightning.prepare source=demo output=DIR [demo.train=400 demo.unlabeled=4400 demo.val=300]

`input` is an audio directory, a CSV/TSV file list, or AudioSet segment CSV(s) (with `audio_dir`); with
`source=hf` a Hugging Face `datasets` audio dataset, with `source=webdataset` a tar shard set. Files are
decoded in worker processes and written by this one, in order. Bad files are skipped and listed in the
store's failures report; a killed run resumes from its last committed shard when rerun with the same
arguments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from ced_lightning import conf_dir
from ced_lightning.core.audio import (
    SAMPLE_RATE,
    SHORT_CLIP_SAMPLES,
    AudioDecodeError,
    float_to_int16,
    load_audio,
)
from ced_lightning.core.errors import CedError, ConfigError
from ced_lightning.core.labels import ClassList, read_class_labels
from ced_lightning.core.progress import ProgressLog
from ced_lightning.data.sources import SourceItem, SourceList, from_class_folders, read_source
from ced_lightning.engines.launch import command_errors
from ced_lightning.store import store_nbytes
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.audio_writer import DEFAULT_CHUNK_SAMPLES, DEFAULT_SHARD_CHUNKS, AudioStoreWriter
from ced_lightning.store.lock import store_lock
from ced_lightning.store.remote import apply_storage_options, redact_config, redact_url

log = logging.getLogger(__name__)


class PrepareError(CedError, RuntimeError):
    """`strict=true` and some inputs failed (the store is still complete, with its failures report)."""


def decode_item(item: SourceItem) -> tuple[np.ndarray | None, str | None]:
    """(int16 samples at 16 kHz, None) or (None, reason): never raises for a bad file."""
    try:
        waveform = load_audio(item.path, data=item.blob() if item.blob is not None else None).numpy()
    except AudioDecodeError as err:
        return None, str(err)
    except Exception as err:  # a decoder crash on a hostile file must not stop a million-file run
        return None, f"{item.path}: cannot decode audio ({type(err).__name__}: {err})"
    # load_audio refuses audio that rounds to silence, so the stored clip is never all zeros.
    return float_to_int16(waveform), None


_PARENT_POLL_S = 1.0


def _die_with_parent(parent_pid: int, forked_by_main_thread: bool) -> None:
    """End this worker when the process that started it dies (kill -9 included), instead of living on
    reparented to pid 1 with its decoder's memory.

    On Linux the kernel sends SIGKILL the moment the parent dies (PR_SET_PDEATHSIG). That signal follows the
    *thread* that forked, so it is armed only when the main thread did; elsewhere a daemon thread polls the
    parent's pid once a second and exits the worker when it has changed.
    """
    if forked_by_main_thread and sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (an unusual libc): the watchdog below remains
            pass
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_init(parent_pid: int, forked_by_main_thread: bool) -> None:
    _die_with_parent(parent_pid, forked_by_main_thread)
    # Each worker decodes one file at a time; torch's intra-op threads would only fight over the cores.
    import torch

    torch.set_num_threads(1)


def _decoding_pool(workers: int, context: Any) -> ProcessPoolExecutor:
    """A pool of `workers` decoding processes that end when this process dies."""
    forked_by_main_thread = threading.current_thread() is threading.main_thread()
    return ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_worker_init,
        initargs=(os.getpid(), forked_by_main_thread),
    )


def _pool_context() -> Any:
    # fork starts workers in milliseconds instead of re-importing torch in each; it is safe here for the
    # reason it is in torch's DataLoader: each worker drops to one intra-op thread before any torch work.
    # Elsewhere (macOS, Windows) spawn.
    methods = multiprocessing.get_all_start_methods()
    return get_context("fork" if sys.platform.startswith("linux") and "fork" in methods else "spawn")


class DecoderDiedError(CedError, RuntimeError):
    """A file's decoding process died (killed by a signal, e.g. the out-of-memory killer), also when retried
    alone; the message names the file."""


def _decode_alone(item: SourceItem, context: Any) -> tuple[np.ndarray | None, str | None]:
    # One file in a process of its own, so that a second death points at this file and no other.
    with _decoding_pool(1, context) as alone:
        try:
            return alone.submit(decode_item, item).result()
        except BrokenProcessPool:
            raise DecoderDiedError(
                f"{item.path}: a decoding process died with this file in flight, and again decoding it "
                "alone (killed by a signal, e.g. the out-of-memory killer on a very long or hostile file). "
                "Committed shards are kept: rerun the same command to resume; if this file kills the decoder "
                "again, remove it from the input."
            ) from None


def _decoded(
    items: Sequence[SourceItem], workers: int, window: int | None = None
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """`decode_item` of each item, in order, decoded in `workers` processes.

    At most `window` (default 2 per worker) files are submitted and not yet consumed, so decoded clips do
    not pile up when the writer is slower. When a process dies, the pool is replaced and each file it may
    have held is decoded again alone, once: a second death raises `DecoderDiedError` naming that file.
    """
    if workers <= 0 or len(items) < 2:
        yield from map(decode_item, items)
        return
    window = max(1, window or 2 * workers)
    context = _pool_context()

    def new_pool() -> ProcessPoolExecutor:
        return _decoding_pool(workers, context)

    pool = new_pool()
    in_flight: deque[tuple[SourceItem, Future, ProcessPoolExecutor]] = deque()

    def replace(broken: ProcessPoolExecutor) -> None:
        nonlocal pool
        if broken is pool:  # once per dead pool, whether a result or a new submission noticed it first
            log.warning(
                "a decoding process died (killed by a signal, e.g. the out-of-memory killer); the files "
                "its pool held are decoded again, one at a time"
            )
            pool.shutdown(wait=False, cancel_futures=True)
            pool = new_pool()

    submitted = 0
    try:
        while submitted < len(items) or in_flight:
            while submitted < len(items) and len(in_flight) < window:
                item = items[submitted]
                try:
                    in_flight.append((item, pool.submit(decode_item, item), pool))
                except BrokenProcessPool:
                    replace(pool)
                    continue
                submitted += 1
            item, future, owner = in_flight.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                replace(owner)
                result = _decode_alone(item, context)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _items_digest(items: Sequence[SourceItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(json.dumps([item.name, item.path, item.labels]).encode())
    return digest.hexdigest()[:16]


def _dedupe(items: Sequence[SourceItem]) -> tuple[list[SourceItem], list[dict]]:
    seen: dict[str, str] = {}
    kept: list[SourceItem] = []
    skipped: list[dict] = []
    for item in items:
        if item.name in seen:
            skipped.append(
                {
                    "name": item.name,
                    "path": item.path,
                    "kind": "skipped",
                    "reason": f"duplicate name (kept {seen[item.name]})",
                }
            )
            continue
        seen[item.name] = item.path
        kept.append(item)
    return kept, skipped


def _progress_bar(total: int, completed: int, enabled: bool | None) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    show = sys.stderr.isatty() if enabled is None else enabled
    progress = Progress(
        TextColumn("[bold]prepare"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not show,
        transient=False,
    )
    task = progress.add_task("decode", total=total, completed=completed)
    return progress, task


def prepare_store(
    items: Sequence[SourceItem],
    output: str | os.PathLike,
    *,
    class_list: ClassList | None = None,
    workers: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    source: str = "files",
    config: dict | None = None,
    unmatched: Sequence[str] = (),
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
    shard_chunks: int = DEFAULT_SHARD_CHUNKS,
    compression: str = "none",
    throttle_s: float = 0.0,
    progress: bool | None = None,
) -> AudioStore:
    """Decode `items` (in `workers` processes) into the audio store at `output`; resumes an interrupted run.

    Bad files are skipped and listed in the store's `failures()`; duplicate names keep their first item.
    Raises ValueError when no clip could be written, and PrepareError (after completing the store) when
    `strict` and anything failed. `throttle_s` sleeps after each clip: only for testing kills mid-run.
    """
    kept, skipped = _dedupe(items)
    job_config = {**(config or {}), "items": len(items), "items_sha": _items_digest(items)}
    writer = AudioStoreWriter(
        output,
        class_names=list(class_list.names) if class_list is not None else None,
        class_mids=list(class_list.mids) if class_list is not None else None,
        source=source,
        config=job_config,
        overwrite=overwrite,
        chunk_samples=chunk_samples,
        shard_chunks=shard_chunks,
        compression=compression,
    )
    writer.base_attrs["unmatched_rows"] = len(unmatched)
    writer.base_attrs["unmatched_examples"] = list(unmatched[:20])
    if writer.complete_store is not None:
        store = writer.complete_store
    else:
        if not any(f.get("_item", 0) < 0 for f in writer.failures):
            # Duplicates are known before decoding; recorded once, also across resumes.
            writer.failures.extend({**f, "_item": -1} for f in skipped)
        done = writer.skip_items()
        todo = kept[done:]
        if done:
            log.info("%s: %d of %d inputs were committed by an earlier run", writer.url, done, len(kept))
        bar, task = _progress_bar(len(kept), done, progress)
        with bar, ProgressLog("prepare", len(kept), unit="files", done=done) as logged:
            for item, (samples, reason) in zip(todo, _decoded(todo, workers), strict=True):
                if samples is None:
                    log.debug("skipped %s", reason)
                    writer.add_failure(
                        {"name": item.name, "path": item.path, "kind": "failed", "reason": reason}
                    )
                else:
                    writer.add(item.name, samples, item.labels)
                if throttle_s:
                    time.sleep(throttle_s)
                bar.advance(task)
                logged.advance()
        store = writer.finish()
    failed = [f for f in store.failures() if f.get("kind") == "failed"]
    if failed:
        log.warning(
            "%d files could not be decoded (listed in the store's failures report), e.g. %s",
            len(failed),
            "; ".join(f["reason"] for f in failed[:5]),
        )
    short = np.flatnonzero(store.lengths < SHORT_CLIP_SAMPLES)
    if short.size:
        log.warning(
            "%d clips are shorter than %d samples (%.0f ms), e.g. %s: stored as they are; models zero-pad a "
            "clip shorter than one STFT window to one window",
            short.size,
            SHORT_CLIP_SAMPLES,
            1000 * SHORT_CLIP_SAMPLES / SAMPLE_RATE,
            ", ".join(f"{store.names[i]} ({store.lengths[i]} samples)" for i in short[:5]),
        )
    if strict:
        check_strict(store, unmatched)
    return store


def check_strict(store: AudioStore, unmatched: Sequence[str] = ()) -> None:
    """`strict=true`: refuse a store that skipped or failed inputs, or left segment rows without audio."""
    failures = store.failures()
    if failures or unmatched:
        example = failures[0]["reason"] if failures else f"no audio for segment row {unmatched[0]}"
        raise PrepareError(
            f"strict=true: {len(failures)} inputs were skipped or failed and {len(unmatched)} segment rows "
            f"have no audio (see the store's failures report), e.g. {example}"
        )


def summarize(store: AudioStore) -> dict[str, Any]:
    """Counts for the closing summary: written, skipped, failed, hours, size, unmatched segment rows."""
    failures = store.failures()
    return {
        "store": redact_url(store.url),
        "clips_written": len(store),
        "skipped": sum(1 for f in failures if f.get("kind") == "skipped"),
        "failed": sum(1 for f in failures if f.get("kind") != "skipped"),
        "hours": float(store.lengths.sum()) / store.sample_rate / 3600,
        "size_bytes": store_nbytes(store.url),
        "unmatched_rows": int(store.attrs.get("unmatched_rows", 0)),
        "short_clips": int((store.lengths < SHORT_CLIP_SAMPLES).sum()),
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"prepare: {summary['store']}", show_header=False)
    table.add_row("clips written", str(summary["clips_written"]))
    table.add_row("skipped (duplicate names)", str(summary["skipped"]))
    table.add_row("failed (undecodable)", str(summary["failed"]))
    table.add_row("hours of audio", f"{summary['hours']:.3f}")
    table.add_row("store size on disk", f"{summary['size_bytes'] / 2**20:.1f} MiB")
    table.add_row("segment rows with no audio file", str(summary["unmatched_rows"]))
    table.add_row(f"clips under {SHORT_CLIP_SAMPLES} samples (padded by models)", str(summary["short_clips"]))
    Console(stderr=True).print(table)
    log.info("prepare summary: %s", json.dumps(summary))


def read_dataset_source(cfg: DictConfig, inputs: str | list) -> SourceList:
    """`source=hf` (a Hugging Face dataset) or `source=webdataset` (tar shards): `input` as a SourceList."""
    if not isinstance(inputs, str):
        raise ConfigError(f"input={inputs}: source={cfg.source} takes one dataset or shard pattern")
    class_list = read_class_labels(cfg.class_labels) if cfg.get("class_labels") else None
    if cfg.source == "hf":
        from ced_lightning.data.hf_source import from_hf_dataset

        return from_hf_dataset(inputs, class_list, **OmegaConf.to_container(cfg.hf))
    from ced_lightning.data.webdataset_source import from_webdataset

    return from_webdataset(inputs, class_list, **OmegaConf.to_container(cfg.webdataset))


def run_prepare(cfg: DictConfig) -> list[dict[str, Any]]:
    """The whole command for a config; returns one summary per store written."""
    if not cfg.get("output"):
        raise ConfigError(
            "output: where to write the store (demo: the folder for train/val/test.zarr) is required"
        )
    apply_storage_options(cfg.get("storage_options"))
    workers = int(cfg.workers) if cfg.get("workers") is not None else min(8, os.cpu_count() or 1)
    if cfg.source == "demo":
        from ced_lightning.data.demo import build_demo_stores

        urls = build_demo_stores(
            str(cfg.output),
            seed=int(cfg.demo.seed),
            train=int(cfg.demo.train),
            unlabeled=int(cfg.demo.get("unlabeled", 0)),
            val=int(cfg.demo.val),
            test=int(cfg.demo.test),
            clip_seconds=float(cfg.demo.clip_seconds),
            workers=workers,
            overwrite=bool(cfg.overwrite),
            single_label=bool(cfg.demo.get("single_label", False)),
        )
        summaries = [summarize(AudioStore.open(url)) for url in urls.values()]
        for summary in summaries:
            print_summary(summary)
        return summaries
    if cfg.source not in ("files", "hf", "webdataset"):
        raise ConfigError(
            f"source={cfg.source!r}: expected `files`, `hf` or `webdataset` (with input=...) or `demo`"
        )
    if not cfg.get("input"):
        raise ConfigError(
            "input: an audio directory, a file list, AudioSet segment CSV(s), a Hugging Face dataset "
            "(source=hf) or a WebDataset shard pattern (source=webdataset) is required"
        )
    inputs = OmegaConf.to_container(cfg.input) if OmegaConf.is_list(cfg.input) else str(cfg.input)
    labels = str(cfg.get("labels") or "lists")
    if cfg.source == "files":
        sources = read_labeled_source(cfg, inputs, labels)
    elif labels != "lists":
        raise ConfigError(f"labels={labels}: source={cfg.source} takes its labels from the dataset")
    else:
        sources = read_dataset_source(cfg, inputs)
    log.info("%s input: %d files", sources.kind, len(sources.items))
    # Stored in the store's attributes: without credentials a URL may carry (store.remote).
    config = redact_config(
        {
            "input": inputs,
            "audio_dir": cfg.get("audio_dir"),
            "class_labels": cfg.get("class_labels"),
            "sample_rate": SAMPLE_RATE,
            **({cfg.source: OmegaConf.to_container(cfg[cfg.source])} if cfg.source != "files" else {}),
            # only where set, so that stores written before the option keep their job signature
            **({"labels": labels} if labels != "lists" else {}),
        }
    )
    with store_lock(str(cfg.output), "prepare"):  # one writer per store (store.lock)
        store = prepare_store(
            sources.items,
            str(cfg.output),
            class_list=sources.class_list,
            workers=workers,
            strict=False,
            overwrite=bool(cfg.overwrite),
            source=sources.kind,
            config=config,
            unmatched=sources.unmatched,
            chunk_samples=int(cfg.chunk_samples),
            shard_chunks=int(cfg.shard_chunks),
            compression=str(cfg.get("compression", "none")),
            throttle_s=float(cfg.get("throttle_s") or 0.0),
        )
    summary = summarize(store)
    print_summary(summary)
    if cfg.strict:
        check_strict(store, sources.unmatched)  # after the summary, so that it is printed either way
    return [summary]


def read_labeled_source(cfg: DictConfig, inputs: str | list, labels: str) -> SourceList:
    """The clips of `input` with their labels as `labels=` says: `lists` (those of a file list or segment
    CSVs; none for a directory) or `folders` (each clip's class is its folder under `input`)."""
    if labels == "folders":
        if not isinstance(inputs, str) or cfg.get("class_labels") or cfg.get("audio_dir"):
            raise ConfigError(
                "labels=folders: input is one directory with a folder per class; class_labels and "
                "audio_dir do not apply (the class list is the folders' names)"
            )
        return from_class_folders(inputs)
    if labels != "lists":
        raise ConfigError(f"labels={labels!r}: expected `lists` or `folders`")
    return read_source(inputs, audio_dir=cfg.get("audio_dir"), class_labels=cfg.get("class_labels"))


@hydra.main(config_path=str(conf_dir()), config_name="prepare", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    run_prepare(cfg)


if __name__ == "__main__":
    main()
