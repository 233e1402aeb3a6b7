"""Zarr v3 stores: `AudioStore` (clips) and `LogitStore` (the teachers' top-k per augmentation epoch)."""

from __future__ import annotations

from typing import Any

__all__ = ["AudioStore", "LogitStore", "store_exists", "store_nbytes"]


def store_exists(url: str) -> bool:
    """Whether a Zarr v3 store is at `url` (every one has a root `zarr.json`; local paths and fsspec URLs)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(url))
    return fs.exists(f"{path.rstrip('/')}/zarr.json")


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
