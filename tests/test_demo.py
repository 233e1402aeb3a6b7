from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ced_lightning.data.demo import DEMO_CLASSES, DEMO_MIDS, build_demo_stores, generate_demo_clip
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.logits import LogitStore


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


@pytest.mark.slow
def test_train_command_runs_the_demo_layer_end_to_end(tmp_path: Path) -> None:
    """`python -m ced_lightning.train` on the demo data goes through the demo layer (`data.entry`): it builds
    the stores, a teacher and the logit store that are missing, distils the student, and prints the demo's
    table. Tiny sizes (one 1-block teacher, 1 s clips, one epoch each); the real command in a subprocess."""
    data, logs = tmp_path / "data", tmp_path / "logs"
    teacher = data / "demo" / "teachers" / "ced.ckpt"
    small = ["data.clip_seconds=1.0", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0"]
    small += ["data.schedule.max_epochs=1", "data.schedule.warmup_steps=1"]
    args = [
        "experiment=ced_mini",
        "model=ced_tiny",
        "+model.depth=1",
        f"paths.data_dir={data}",
        f"paths.log_dir={logs}",
        f"hydra.run.dir={logs}/run",
        "data.demo.clips={train: 24, val: 16, test: 16}",
        "data.extract.epochs=1",
        "data.extract.topk=3",
        *small,
        "data.teacher_overrides=[" + ",".join(f"'{o}'" for o in small) + "]",
        "teacher.members=[{name: ced, checkpoint: '"
        + str(teacher)
        + "', experiment: teacher_demo_ced, overrides: ['model.depth=1']}]",
        "trainer=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "ced_lightning.train", *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "CED demo: validation mAP" in run.stdout, run.stdout[-2000:]
    for row in ("teacher ced", "teacher ensemble", "student ced_tiny (val, best epoch)", "logit store"):
        assert row in run.stdout, run.stdout[-2000:]
    assert teacher.is_file() and teacher.with_suffix(".json").is_file()
    assert LogitStore.open(str(data / "demo" / "logits_demo.zarr")).is_complete()
    assert len(AudioStore.open(str(data / "demo" / "train.zarr"))) == 24
