"""Where `predict`'s outputs may go, and what a failed write leaves: outputs lie outside every Zarr store; an
existing file that the command did not write is replaced only when asked (`overwrite`); a file that cannot be
written (read-only folder, full disk) is one error naming it, with nothing empty or half written left behind.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from ced_lightning.core.errors import CedError, OutputExistsError
from ced_lightning.store.files import check_free_for_store, check_outside_stores

log = logging.getLogger(__name__)

# How the two front ends ask to replace a file.
OVERWRITE_HINT = "--overwrite (ced-predict) or overwrite=true (python -m ced_lightning.predict)"


class OutputWriteError(CedError, OSError):
    """An output cannot be written (read-only folder, full disk): the message names it and what was
    removed."""


def first_line(path: Path, limit: int = 1 << 16) -> str:
    """The file's first line (at most `limit` characters), "" when it cannot be read as text."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            return handle.readline(limit).rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return ""


def check_output_file(
    path: str | os.PathLike, key: str, overwrite: bool, ours: Callable[[str], bool]
) -> None:
    """Refuse `path` as the output `key` when it lies inside a Zarr store, is a folder, or is a non-empty file
    whose first line `ours` does not recognise (a file this command did not write) and `overwrite` is off."""
    check_outside_stores(str(path), f"{key} file")
    target = Path(path)
    if target.is_dir():
        raise OutputExistsError(f"{key}={path} is a folder; give a file name")
    if not target.is_file() or target.stat().st_size == 0:
        return
    head = first_line(target)
    if ours(head):
        log.info("%s=%s: replacing the file an earlier run of this command wrote", key, path)
        return
    if overwrite:
        log.warning("%s=%s: replacing an existing file (overwrite asked for)", key, path)
        return
    raise OutputExistsError(
        f"{key}={path} exists and was not written by this command (its first line: {head[:80]!r}); it is "
        f"left as it is. To replace it pass {OVERWRITE_HINT}, or choose another file"
    )


def check_output_folder(path: str | os.PathLike, key: str) -> None:
    """A folder of per-file outputs (npy embeddings, timeline PNGs): outside any Zarr store, not a store, not
    a file."""
    check_outside_stores(str(path), f"{key} folder")
    target = Path(path)
    if target.is_file():
        raise OutputExistsError(f"{key}={path} is a file; give a folder")
    if (target / "zarr.json").exists():
        raise OutputExistsError(f"{key}={path} is a Zarr store; give a folder outside any store")


EMBEDDINGS_STORE_KIND = "ced-predict-embeddings"


def is_embeddings_store(url: str) -> bool:
    try:
        attrs = json.loads((Path(url) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get("kind") == EMBEDDINGS_STORE_KIND


def check_embeddings_store(url: str | os.PathLike, key: str) -> None:
    """The embeddings store's place: new, an empty folder, or a store of embeddings an earlier run wrote
    (its files' groups are replaced); never another store or inside one (`check_free_for_store`)."""
    check_free_for_store(str(url), f"predict embeddings store ({key})", ours=is_embeddings_store(str(url)))


def remove_output(path: Path, key: str, err: OSError, removed: bool) -> OutputWriteError:
    """The one-line error of an output `path` that could not be written, after removing what it held."""
    reason = err.strerror or str(err)
    kept = "the incomplete file was removed" if removed else "nothing was written"
    return OutputWriteError(
        f"{key}={path}: cannot write it ({reason}); {kept}. Free space or choose a writable place, then rerun"
    )


def discard_file(path: Path) -> bool:
    """Remove `path` if it is there; whether it was."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError:  # a read-only folder keeps it: nothing more to do
        return False
    return True
