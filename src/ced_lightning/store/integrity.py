"""Damage a store cannot hide: a lost chunk object, or one that no longer decodes, is an error naming the
store, the array and the chunk key.

zarr reads a chunk object that is not there as the array's fill value, which is also how it stores a chunk
holding nothing but the fill value (it skips writing it). So a lost file reads as zeros unless the store
records that the chunk was written. The stores keep that record (`docs/reliability.md` lists what each
guarantee rests on):

- audio store: `chunks_written` (attribute, at `finish`): per array, how many chunk objects the writer left,
  every one written, fill values too. An array whose count is the count its shape implies must have every
  object; `all_chunks_written` says the same of `audio` alone (stores written before `chunks_written`).
- logit store: `block_done` is the commit record of each block, and `all_chunks_written` (attribute, at
  creation) says every data array's shard of a done block was written whole, fill values too.

Stores written before these records hold arrays where zarr skipped all-zero chunks (an unlabeled store's
`label_indptr`, a disabled augmentation's parameters), so there the readers require only the objects that
cannot have been all fill values (see `AudioStore` and `LogitStore`).

Missing objects are caught where the chunk is fetched: `StrictChunkStore` wraps the zarr store and raises for
an expected key that is not there (no request beyond the read itself). Chunks that fail to decode (a
truncated shard fails its CRC32C, a truncated zstd chunk its frame) are named by `read_checked`. The audio
store also lists its `audio` objects at open (one listing; see `missing_objects`), because its samples are
read later, in data loader workers.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

from ced_lightning.core.errors import CedError
from ced_lightning.store.remote import redact_url


class StoreDamagedError(CedError, OSError):
    """A chunk object of a store is missing or does not decode: the store is damaged or incompletely copied.

    `store`, `array` and `key` (the chunk key inside the array, e.g. `c/0`) name the object.
    """

    def __init__(self, message: str, store: str = "", array: str = "", key: str = "") -> None:
        super().__init__(message)
        self.store, self.array, self.key = store, array, key


# What to do: a rerun over the damaged store would reuse or resume it as it is, so it goes first.
REMEDY = "Copy the store again, or delete it and run the command that made it again"


def missing_message(
    store: str, array: str, key: str, what: str = "store", why: str = "though the store records it as written"
) -> str:
    return (
        f"{what} {redact_url(store)} is damaged: chunk {key!r} of array {array!r} ({array}/{key}) is "
        f"missing, {why}: a lost file or an incomplete copy. {REMEDY}"
    )


def undecodable_message(store: str, array: str, key: str, err: BaseException, what: str = "store") -> str:
    reason = " ".join(str(err).split()) or type(err).__name__
    return (
        f"{what} {redact_url(store)} is damaged: chunk {key!r} of array {array!r} ({array}/{key}) does not "
        f"decode ({reason}): a truncated or altered file. {REMEDY}"
    )


def split_key(key: str) -> tuple[str, str] | None:
    """A store key `<array path>/c/<i>/<j>...` as (array path, chunk key `c/i/j`); None for other keys."""
    if key.startswith("c/"):
        return "", key
    array, sep, rest = key.partition("/c/")
    return (array, f"c/{rest}") if sep else None


def zarr_store(url: str, *, read_only: bool) -> Any:
    """A zarr store for a local path or any fsspec URL (`file://` maps to a plain local store: faster)."""
    if url.startswith("file://"):
        return zarr.storage.LocalStore(url[len("file://") :], read_only=read_only)
    if "://" in url:
        return zarr.storage.FsspecStore.from_url(url, read_only=read_only)
    return zarr.storage.LocalStore(url, read_only=read_only)


def base_store(store: Any) -> Any:
    """The store a `StrictChunkStore` wraps (any other store as it is)."""
    return store._store if isinstance(store, StrictChunkStore) else store


class StrictChunkStore(WrapperStore):
    """A zarr store that raises `StoreDamagedError` where an expected chunk object is missing.

    `expected(array path, chunk key)` says which objects the store's record says were written; every other
    key (metadata, chunks a store may lack) reads as the wrapped store reads it.
    """

    def __init__(
        self, store: Any, url: str, expected: Callable[[str, str], bool], what: str = "store"
    ) -> None:
        super().__init__(store)
        self._url, self._expected, self._what = url, expected, what

    def _with_store(self, store: Any) -> StrictChunkStore:
        return type(self)(store, self._url, self._expected, self._what)

    def _check(self, key: str, value: Buffer | None) -> Buffer | None:
        if value is None:
            parts = split_key(key)
            if parts is not None and self._expected(*parts):
                raise StoreDamagedError(missing_message(self._url, *parts, self._what), self._url, *parts)
        return value

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return self._check(key, await self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        return [self._check(key, value) for (key, _), value in zip(key_ranges, values, strict=True)]


def open_strict_group(
    url: str, mode: str, expected: Callable[[str, str], bool], what: str = "store", **kwargs: Any
) -> zarr.Group:
    """`zarr.open_group` at `url` through a `StrictChunkStore`."""
    store = StrictChunkStore(zarr_store(url, read_only=mode == "r"), url, expected, what)
    return zarr.open_group(store=store, mode=mode, **kwargs)


def reopen_strict(group: zarr.Group, url: str, expected: Callable[[str, str], bool], what: str) -> zarr.Group:
    """`group` (opened from `url`) opened again through a `StrictChunkStore`, read-only if it was."""
    store = base_store(group.store)
    strict = StrictChunkStore(store, url, expected, what)
    return zarr.open_group(store=strict, mode="r" if store.read_only else "r+", zarr_format=3)


# -- the objects an array must have ------------------------------------------------------------------------


def object_shape(array: zarr.Array) -> tuple[int, ...]:
    """Chunk objects (shards of a sharded array) along each dimension."""
    return tuple(math.ceil(n / c) for n, c in zip(array.shape, _object_size(array), strict=True))


def object_key(array: zarr.Array, coords: tuple[int, ...]) -> str:
    """The chunk key (relative to the array) of the object at grid position `coords`."""
    return array.metadata.chunk_key_encoding.encode_chunk_key(tuple(int(c) for c in coords))


def object_keys(array: zarr.Array) -> Iterator[str]:
    """Every chunk key the array's shape implies (one per shard of a sharded array)."""
    for coords in itertools.product(*(range(n) for n in object_shape(array))):
        yield object_key(array, coords)


def object_count(array: zarr.Array) -> int:
    return math.prod(object_shape(array))


def list_objects(url: str, array: str) -> set[str]:
    """The chunk keys (`c/...`) stored under array `array` of the store at `url`: one listing (recursive for
    arrays of several dimensions); a local folder is walked, an object store listed by prefix."""
    if "://" not in url or url.startswith("file://"):
        root = os.path.join(url[len("file://") :] if url.startswith("file://") else url, array, "c")
        found = set()
        for folder, _, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            prefix = "c" if rel == "." else f"c/{rel.replace(os.sep, '/')}"
            found.update(f"{prefix}/{name}" for name in files if not name.endswith(".partial"))
        return found
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    root = f"{path.rstrip('/')}/{array}/c" if array else f"{path.rstrip('/')}/c"
    try:
        listed = fs.find(root)
    except FileNotFoundError:
        return set()
    return {"c/" + str(p)[len(root) :].strip("/") for p in listed}


def missing_objects(url: str, name: str, array: zarr.Array, keys: Iterable[str] | None = None) -> list[str]:
    """The chunk keys of `array` (named `name` in the store at `url`) that its shape implies (or `keys`) and
    the store lacks, in grid order."""
    present = list_objects(url, name)
    return [key for key in (object_keys(array) if keys is None else keys) if key not in present]


def missing_block_objects(
    url: str, group: zarr.Group, names: Iterable[str], blocks: Iterable[int]
) -> list[str]:
    """`array/key` of each missing object at grid position `(0, block, 0, ...)` of the arrays `names` of
    `group` (a logit store's shard of a block): one listing per array."""
    blocks = [int(b) for b in blocks]
    absent = []
    for name in names:
        array = group[name]
        keys = [object_key(array, (0, b, *(0,) * (array.ndim - 2))) for b in blocks]
        absent += [f"{name}/{key}" for key in missing_objects(url, name, array, keys)]
    return absent


# -- chunks that do not decode -----------------------------------------------------------------------------


def _object_size(array: zarr.Array) -> tuple[int, ...]:
    return array.shards if array.shards is not None else array.chunks


def _objects_touched(array: zarr.Array, selection: Any) -> list[tuple[int, ...]]:
    """Grid positions of the objects a basic selection (ints and slices) touches; all of them otherwise."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if not all(isinstance(s, int | np.integer | slice) for s in sel):
        sel = ()  # fancy indexing, Ellipsis: every object
    ranges = []
    for d, (n, size) in enumerate(zip(array.shape, _object_size(array), strict=True)):
        s = sel[d] if d < len(sel) else slice(None)
        if isinstance(s, slice):
            start, stop, _ = s.indices(n)
            ranges.append(range(start // size, -(-stop // size)) if stop > start else range(0))
        else:
            i = int(s) % n
            ranges.append(range(i // size, i // size + 1))
    return list(itertools.product(*ranges))


def _object_region(array: zarr.Array, coords: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(
        slice(c * p, min((c + 1) * p, n))
        for c, p, n in zip(coords, _object_size(array), array.shape, strict=True)
    )


def undecodable_object(array: zarr.Array, coords: Iterable[tuple[int, ...]]) -> tuple[str, Exception] | None:
    """The first of the objects at `coords` that fails to read whole, with its error; None if all read."""
    for c in coords:
        try:
            array[_object_region(array, c)]
        except StoreDamagedError:
            raise
        except Exception as err:  # any decoder's failure: the object is named, the cause kept in the message
            return object_key(array, c), err
    return None


def read_checked(array: zarr.Array, selection: Any, url: str, name: str, what: str = "store") -> Any:
    """`array[selection]`, where a chunk that fails to decode raises `StoreDamagedError` naming it.

    A failure is traced to its object by reading the touched objects one by one (only after a failure);
    one that no single object reproduces is raised as it came.
    """
    try:
        return array[selection]
    except StoreDamagedError:
        raise
    except Exception as err:
        found = undecodable_object(array, _objects_touched(array, selection))
        if found is None:
            raise
        key, cause = found
        raise StoreDamagedError(undecodable_message(url, name, key, cause, what), url, name, key) from err
