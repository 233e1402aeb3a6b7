"""A whole store checked object by object (`python -m ced_lightning.check store=URL`): every chunk object its
record says was written is there and decodes, and the commit records agree with the arrays.

Reads everything once (the audio of an audio store too): the cost of a full read of the store, which is
the point. Problems are collected, not raised, so that one run names each of them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from ced_lightning.store.files import store_exists, store_nbytes
from ced_lightning.store.integrity import (
    StoreDamagedError,
    list_objects,
    missing_message,
    object_shape,
    undecodable_object,
    zarr_store,
)
from ced_lightning.store.remote import redact_url

_UNKNOWN = (
    "cannot tell, in a store written before chunk records, a lost object from one zarr skipped as all zeros"
)


@dataclass
class ScanResult:
    """What `scan_store` found: the store's kind, one line per problem, notes that are not problems, and the
    figures of a short report."""

    url: str
    kind: str = "unknown"
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _arrays(group: zarr.Group, prefix: str = "") -> dict[str, zarr.Array]:
    """Every array of the group, nested groups (the logit store's `params/`) included, by path."""
    found = {}
    with warnings.catch_warnings():  # files a command keeps in the store (extract_stats.json) are no members
        warnings.simplefilter("ignore")
        members = list(group.members())
    for name, member in members:
        path = f"{prefix}{name}"
        if isinstance(member, zarr.Array):
            found[path] = member
        else:
            found.update(_arrays(member, f"{path}/"))
    return found


def _scan_objects(
    result: ScanResult,
    url: str,
    what: str,
    name: str,
    array: zarr.Array,
    keys: list[tuple[int, ...]],
    strict: bool,
) -> None:
    """Missing objects among `keys` (grid positions) of `array`, and each present one read whole."""
    present = list_objects(url, name)
    readable = []
    for coords in keys:
        key = array.metadata.chunk_key_encoding.encode_chunk_key(coords)
        if key in present:
            readable.append(coords)
        elif strict:
            result.problems.append(missing_message(url, name, key, what))
        else:
            result.notes.append(f"{name}/{key} is absent: {_UNKNOWN}")
    for coords in readable:
        found = undecodable_object(array, [coords])
        if found is not None:
            key, err = found
            reason = " ".join(str(err).split()) or type(err).__name__
            result.problems.append(
                f"{what} {redact_url(url)} is damaged: chunk {key!r} of array {name!r} ({name}/{key}) does "
                f"not decode ({reason})"
            )


def scan_store(url: str) -> ScanResult:
    """Check the audio or logit store at `url` (detected from its attributes), every object of it."""
    result = ScanResult(url)
    if not store_exists(url):
        result.problems.append(f"{redact_url(url)}: no Zarr store there (no zarr.json)")
        return result
    group = zarr.open_group(store=zarr_store(url, read_only=True), mode="r")
    attrs = dict(group.attrs)
    if attrs.get("kind") == "ced-audio-store":
        _scan_audio(result, url, group, attrs)
    elif attrs.get("format") == "ced-lightning/logit-store":
        _scan_logits(result, url, group, attrs)
    else:
        result.problems.append(f"{redact_url(url)}: neither an audio store nor a logit store (attributes)")
        return result
    result.figures["bytes"] = store_nbytes(url)
    return result


def _scan_audio(result: ScanResult, url: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
    from ced_lightning.store.audio import AudioStore
    from ced_lightning.store.audio_layout import WHAT, written_arrays

    result.kind = WHAT
    if not attrs.get("complete"):
        result.problems.append(
            f"{WHAT} {redact_url(url)} is incomplete: rerun the prepare command to finish it"
        )
        return
    arrays = _arrays(group)
    strict = written_arrays(attrs, arrays)
    counts = attrs.get("chunks_written")
    if counts is None:
        result.notes.append(
            "written before chunk records (chunks_written): label arrays checked by their rules"
        )
    for name, array in sorted(arrays.items()):
        expected = object_shape(array)
        if isinstance(counts, dict) and name in counts and int(counts[name]) > int(np.prod(expected)):
            result.problems.append(
                f"{WHAT} {redact_url(url)}: array {name!r} records {counts[name]} chunk objects written, its "
                f"shape {array.shape} holds {int(np.prod(expected))}"
            )
        coords = [tuple(int(c) for c in np.unravel_index(i, expected)) for i in range(int(np.prod(expected)))]
        _scan_objects(result, url, WHAT, name, array, coords, name in strict)
    if result.problems:
        return
    try:  # the commit records and layout rules, and every sample read through the direct reader
        store = AudioStore.open(url)
        from ced_lightning.store.audio import _fingerprint

        if _fingerprint(store.names, store.lengths) != store.fingerprint:
            result.problems.append(
                f"{WHAT} {redact_url(url)}: names and lengths do not give the recorded fingerprint "
                f"{store.fingerprint}: the metadata was altered"
            )
        step = store.chunk_samples
        for start in range(0, int(store.audio.shape[0]), step):
            store.samples(start, min(start + step, int(store.audio.shape[0])))
        if int(attrs.get("num_failures") or 0) != len(store.failures()):
            result.problems.append(
                f"{WHAT} {redact_url(url)}: num_failures disagrees with the failures array"
            )
    except (StoreDamagedError, OSError, ValueError) as err:
        result.problems.append(str(err))
        return
    hours = float(store.lengths.sum()) / store.sample_rate / 3600
    result.figures.update(
        {"clips": len(store), "hours": round(hours, 3), "classes": store.num_classes, "arrays": len(arrays)}
    )


def _scan_logits(result: ScanResult, url: str, group: zarr.Group, attrs: dict[str, Any]) -> None:
    from ced_lightning.store.logits import WHAT, LogitStore

    result.kind = WHAT
    try:
        store = LogitStore.open(url)
        codes = store.block_codes()
    except (StoreDamagedError, OSError, ValueError, KeyError) as err:
        result.problems.append(str(err))
        return
    arrays = _arrays(group)
    missing_blocks = [int(b) for b in np.flatnonzero(codes == 0)]
    if missing_blocks:
        shown = ", ".join(map(str, missing_blocks[:10])) + (" ..." if len(missing_blocks) > 10 else "")
        result.problems.append(
            f"{WHAT} {redact_url(url)} is incomplete: {len(missing_blocks)} of {store.num_blocks} blocks not "
            f"extracted ({shown}); run the same extract command again"
        )
    bad_codes = sorted({int(c) for c in codes} - {0, 1, 2})
    if bad_codes:
        result.problems.append(f"{WHAT} {redact_url(url)}: block_done holds unknown codes {bad_codes}")
    rows = (store.epochs, store.num_rows)
    shapes = {"topk_indices": (*rows, store.topk), "topk_values": (*rows, store.topk)}
    shapes.update({f"params/{n}": (*rows, *row) for n, (_, row) in store._fields.items()})
    shapes.update({n: rows for n in store.extra_arrays})
    if store.segment_samples is not None:
        shapes.update({"segment_clip": (store.num_rows,), "segment_start": (store.num_rows,)})
    for name, shape in shapes.items():
        if name not in arrays:
            result.problems.append(
                f"{WHAT} {redact_url(url)}: array {name!r} is missing (its attributes name it)"
            )
        elif tuple(arrays[name].shape) != shape:
            result.problems.append(
                f"{WHAT} {redact_url(url)}: array {name!r} has shape {arrays[name].shape}, its attributes "
                f"say {shape}"
            )
    if tuple(arrays["block_done"].shape) != (store.num_blocks,):
        result.problems.append(
            f"{WHAT} {redact_url(url)}: block_done has {arrays['block_done'].shape[0]} entries, "
            f"not {store.num_blocks}"
        )
    done = [b for b in range(store.num_blocks) if b not in set(missing_blocks)]
    if not store.all_chunks_written:
        result.notes.append(
            "written before chunk records (all_chunks_written): parameters of absent shards are "
            "reported as notes"
        )
    for name in shapes:
        if name not in arrays or tuple(arrays[name].shape) != shapes[name]:
            continue
        array = arrays[name]
        if name.startswith("segment_"):
            coords = [(i,) for i in range(object_shape(array)[0])]
            strict = store.all_chunks_written
        else:
            tail = (0,) * (array.ndim - 2)
            coords = [(0, b, *tail) for b in done]
            strict = name in store.block_arrays
        _scan_objects(result, url, WHAT, name, array, coords, strict)
    if not result.problems and done:
        top = max(int(np.asarray(arrays["topk_indices"][e]).max()) for e in range(store.epochs))
        if top >= store.num_classes:
            result.problems.append(
                f"{WHAT} {redact_url(url)}: class index {top} in topk_indices, {store.num_classes} classes"
            )
    result.figures.update(
        {
            "clips": store.num_clips,
            **({"segments": store.num_rows} if store.segment_samples is not None else {}),
            "epochs": store.epochs,
            "topk": store.topk,
            "blocks done": f"{len(done)}/{store.num_blocks}",
            "arrays": len(arrays),
        }
    )
