"""Zarr v3 stores: `AudioStore` (clips) and `LogitStore` (the teachers' top-k per augmentation epoch)."""

from __future__ import annotations

from typing import Any

__all__ = ["AudioStore", "LogitStore", "check_free_for_store", "store_exists", "store_nbytes"]


def store_exists(url: str) -> bool:
    """Whether a Zarr v3 store is at `url` (every one has a root `zarr.json`; local paths and fsspec URLs)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


def check_free_for_store(url: str, what: str, ours: bool) -> None:
    """Refuse to create a store where opening it for writing would delete someone's data.

    zarr's `mode="w"` empties the whole folder or prefix first. So the target must not exist, be an empty
    folder, or be a store the caller may replace (`ours`, judged from its attributes by the caller).
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    path = path.rstrip("/")
    if not fs.exists(path):
        return
    if fs.isfile(path):
        raise FileExistsError(f"{url} is a file; give a folder (or object prefix) for the {what}")
    if store_exists(url):
        if ours:
            return
        raise FileExistsError(
            f"{url} holds another Zarr store, not a {what}; choose another output (it is left as it is)"
        )
    entries = fs.ls(path, detail=False)
    if entries:
        example = str(entries[0]).rstrip("/").rsplit("/", 1)[-1]
        raise FileExistsError(
            f"{url} exists and holds other files (e.g. {example!r}); writing a {what} there would delete "
            "them. Choose a new or empty folder."
        )


def store_nbytes(url: str) -> int:
    """Bytes a store takes on its file system (local path or any fsspec URL)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    try:
        return int(fs.du(path, total=True))
    except NotImplementedError:  # a file system that cannot list sizes (e.g. plain HTTP)
        return 0


def __getattr__(name: str) -> Any:
    # Lazy, so that `ced_lightning.store.audio` loads without the logit store's dependencies and vice versa.
    if name == "AudioStore":
        from ced_lightning.store.audio import AudioStore

        return AudioStore
    if name == "LogitStore":
        from ced_lightning.store.logits import LogitStore

        return LogitStore
    raise AttributeError(name)
