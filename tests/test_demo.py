from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ced_lightning.data.demo import DEMO_CLASSES, DEMO_MIDS, build_demo_stores, generate_demo_clip
from ced_lightning.store.audio import AudioStore


def test_clip_is_deterministic_and_keyed_by_seed_and_index() -> None:
    wave, labels = generate_demo_clip(0, 7, 1.0)
    again, labels_again = generate_demo_clip(0, 7, 1.0)
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert wave.tobytes() == again.tobytes() and labels == labels_again
    assert generate_demo_clip(1, 7, 1.0)[0].tobytes() != wave.tobytes()
    assert generate_demo_clip(0, 8, 1.0)[0].tobytes() != wave.tobytes()
    with pytest.raises(ValueError):
        generate_demo_clip(-1, 0)


def test_labels_valid_and_every_class_appears() -> None:
    assert len(DEMO_CLASSES) >= 12 and len(set(DEMO_CLASSES)) == len(DEMO_CLASSES)
    counts = np.zeros(len(DEMO_CLASSES), dtype=int)
    sizes = set()
    for index in range(240):
        wave, labels = generate_demo_clip(3, index, 0.5)
        assert labels == sorted(set(labels)) and 1 <= len(labels) <= 3
        assert all(0 <= c < len(DEMO_CLASSES) for c in labels)
        assert np.isfinite(wave).all() and 0.2 < np.abs(wave).max() < 1.0
        counts[labels] += 1
        sizes.add(len(labels))
    assert counts.min() > 0, dict(zip(DEMO_CLASSES, counts, strict=True))
    assert sizes == {1, 2, 3}  # overlapping events are part of the task


def test_build_demo_stores_split_reuse_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    urls = build_demo_stores(str(root), seed=5, train=12, val=4, test=4, clip_seconds=0.5)
    assert set(urls) == {"train", "val", "test"}
    stores = {split: AudioStore.open(url) for split, url in urls.items()}
    assert [len(stores[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    train = stores["train"]
    assert train.class_names == DEMO_CLASSES and train.class_mids == DEMO_MIDS and train.num_classes == 16
    assert train.attrs["source"] == "demo" and train.attrs["config"]["seed"] == 5
    for i in (0, 11):
        wave, labels = generate_demo_clip(5, i, 0.5)
        assert list(train.labels(i)) == labels
        assert np.abs(train.read(i).numpy() - wave).max() <= 1 / 32768
    # Splits come from disjoint index ranges.
    assert set(train.names).isdisjoint(stores["val"].names)
    assert not np.array_equal(train.read(0).numpy(), stores["val"].read(0).numpy())
    assert len({s.fingerprint for s in stores.values()}) == 3

    first_clip = train.read(0).numpy()
    marker = root / "train.zarr" / "zarr.json"
    before = marker.stat().st_mtime_ns
    assert build_demo_stores(str(root), seed=5, train=12, val=4, test=4, clip_seconds=0.5) == urls
    assert marker.stat().st_mtime_ns == before  # complete with the same config: not rewritten
    with pytest.raises(FileExistsError, match="overwrite"):
        build_demo_stores(str(root), seed=6, train=12, val=4, test=4, clip_seconds=0.5)
    build_demo_stores(str(root), seed=6, train=12, val=4, test=4, clip_seconds=0.5, overwrite=True)
    assert AudioStore.open(urls["train"]).fingerprint == train.fingerprint  # same names and lengths
    assert not np.array_equal(AudioStore.open(urls["train"]).read(0).numpy(), first_clip)


def test_worker_processes_give_the_same_store(tmp_path: Path) -> None:
    kwargs = {"seed": 1, "train": 64, "val": 1, "test": 1, "clip_seconds": 0.25}
    inline = build_demo_stores(str(tmp_path / "a"), workers=0, **kwargs)
    pooled = build_demo_stores(str(tmp_path / "b"), workers=2, **kwargs)
    a, b = AudioStore.open(inline["train"]), AudioStore.open(pooled["train"])
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.read_span(0, 64)[0], b.read_span(0, 64)[0])
    assert np.array_equal(a.label_matrix(), b.label_matrix())
