"""Zarr v3 stores: `AudioStore` (clips) and `LogitStore` (the teachers' top-k per augmentation epoch), and
the file-level helpers every store shares (`ced_lightning.store.files`)."""

from __future__ import annotations

from typing import Any

from ced_lightning.store.files import (
    check_free_for_store,
    check_outside_stores,
    remove_partial_writes,
    store_exists,
    store_nbytes,
    write_store_json,
)

__all__ = [
    "AudioStore",
    "LogitStore",
    "check_free_for_store",
    "check_outside_stores",
    "remove_partial_writes",
    "store_exists",
    "store_nbytes",
    "write_store_json",
]


def __getattr__(name: str) -> Any:
    # Lazy, so that `ced_lightning.store.audio` loads without the logit store's dependencies and vice versa.
    if name == "AudioStore":
        from ced_lightning.store.audio import AudioStore

        return AudioStore
    if name == "LogitStore":
        from ced_lightning.store.logits import LogitStore

        return LogitStore
    raise AttributeError(name)
