"""Stores as files: whether one is at a URL, its size, whether a new one may be created there, and the
leftovers of a killed writer. Local paths and any fsspec URL; no Zarr needed. Re-exported by
`ced_lightning.store`; the store modules import it from here, so the package's `__init__` sits above them.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Any

from ced_lightning.core.errors import OutputExistsError

# zarr's LocalStore (>= 3.1.3) writes each object to `<name>.<32 hex digits>.partial` and renames it into
# place, so an object is replaced whole; a writer killed in between leaves the temporary file behind.
_PARTIAL_WRITE = re.compile(r"\.[0-9a-f]{32}\.partial$")


def store_exists(url: str) -> bool:
    """Whether a Zarr v3 store is at `url` (every one has a root `zarr.json`; local paths and fsspec URLs)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def check_free_for_store(url: str, what: str, ours: bool) -> None:
    """Refuse to create a store where opening it for writing would delete someone's data.

    zarr's `mode="w"` empties the whole folder or prefix first. So the target must not exist, be an empty
    folder, or be a store the caller may replace (`ours`, judged from its attributes by the caller). Nor may
    it lie inside another Zarr store or group (`output=<audio store>/logits`): the new store would become a
    member of that one.
    """
    import fsspec

    check_outside_stores(url, what)
    fs, path = fsspec.core.url_to_fs(str(url))
    path = path.rstrip("/")
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise OutputExistsError(f"{url} is a file; give a folder (or object prefix) for the {what}")
    if store_exists(url):
        if ours:
            return
        raise OutputExistsError(
            f"{url} holds another Zarr store, not a {what}; choose another output (it is left as it is)"
        )
    entries = fs.ls(path, detail=False)
    if entries:
        example = str(entries[0]).rstrip("/").rsplit("/", 1)[-1]
        raise OutputExistsError(
            f"{url} exists and holds other files (e.g. {example!r}); writing a {what} there would delete "
            "them. Choose a new or empty folder."
        )


def check_outside_stores(url: str, what: str) -> None:
    """Refuse an output inside another Zarr store or group (any folder above it holds a `zarr.json`)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    enclosing = _enclosing_zarr(fs, path.rstrip("/"))
    if enclosing is not None:
        raise OutputExistsError(
            f"{url} lies inside the Zarr store or group at {enclosing}; a {what} there would become part of "
            "it. Choose an output outside any Zarr store (e.g. next to it)."
        )


def _enclosing_zarr(fs: Any, path: str) -> str | None:
    """The nearest folder above `path` that holds a `zarr.json` (a Zarr v3 store or group), or None."""
    parent = posixpath.dirname(path)
    while parent and parent != path:
        if fs.exists(f"{parent.rstrip('/')}/zarr.json"):
            return parent
        path, parent = parent, posixpath.dirname(parent)
    return None


def remove_partial_writes(url: str) -> int:
    """Delete the temporary `*.partial` files a killed writer left in a local store; returns how many.

    Only for the store's one writer (see `store.lock`): another writer's files in flight look the same.
    Object stores write each object whole and leave none.
    """
    path = str(url)
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif "://" in path:
        return 0
    removed = 0
    for folder, _, files in os.walk(path):
        for name in files:
            if _PARTIAL_WRITE.search(name):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def store_nbytes(url: str) -> int:
    """Bytes a store takes on its file system (local path or any fsspec URL)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    try:
        return int(fs.du(path, total=True))
    except NotImplementedError:  # a file system that cannot list sizes (e.g. plain HTTP)
        return 0


def write_store_json(url: str, name: str, value: Any) -> None:
    """`value` as JSON in the file `name` inside the store at `url` (a command's figures kept with its
    output, never beside it where a user's file may be)."""
    import json

    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    with fs.open(f"{path.rstrip('/')}/{name}", "w") as handle:
        json.dump(value, handle, indent=2)
