"""Damaged stores are refused by name: a lost or truncated chunk object of any array of an audio or logit
store is an error naming the store, the array and the chunk key, raised before training or scoring uses it
(zarr alone reads a lost chunk as zeros: a store without `lengths/c/0` scored mAP 0.12, one without
`label_indices/c/0` trained on class 0 everywhere, one without a `topk_values` shard trained on zero targets).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from ced_lightning.store import AudioStore, LogitStore
from conftest import run_command, tiny_student_overrides

AUDIO_ARRAYS = [
    "audio",
    "lengths",
    "offsets",
    "names",
    "label_indptr",
    "label_indices",
    "class_names",
    "class_mids",
]
# The tiny demo's logit store: one block, so each data array has one shard (`c/0/0[/0]`).
LOGIT_ARRAYS = [
    "topk_indices",
    "topk_values",
    "params/shift",
    "params/time_start",
    "params/time_width",
    "params/freq_start",
    "params/freq_width",
]


def _copy(source: str, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def _first_object(store: Path, array: str) -> tuple[Path, str]:
    """The first chunk object of `array` and its key (`c/0`, `c/0/0/0`)."""
    root = store / array / "c"
    path = min(p for p in root.rglob("*") if p.is_file())
    return path, "c/" + path.relative_to(root).as_posix()


def _drop_attr(store: Path, key: str) -> None:
    """What a store written before the chunk records looks like: the same arrays, no record attribute."""
    group = zarr.open_group(str(store), mode="r+")
    attrs = dict(group.attrs)
    attrs.pop(key)
    group.attrs.put(attrs)


@pytest.mark.parametrize("array", AUDIO_ARRAYS)
def test_missing_chunk_of_each_audio_array_is_named_at_open(
    array: str, tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    from ced_lightning.store.integrity import StoreDamagedError

    store = _copy(tiny_demo["test"], tmp_path, "test.zarr")
    path, key = _first_object(store, array)
    path.unlink()
    with pytest.raises(StoreDamagedError, match=rf"{store}.*array '{array}' \({array}/{key}\) is missing"):
        AudioStore.open(store)


@pytest.mark.parametrize("array", LOGIT_ARRAYS)
def test_missing_chunk_of_each_logit_array_is_named_at_first_read(
    array: str, tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    from ced_lightning.store.integrity import StoreDamagedError

    store = _copy(tiny_demo["logits"], tmp_path, "logits.zarr")
    path, key = _first_object(store, array)
    path.unlink()
    opened = LogitStore.open(str(store))
    assert opened.missing_blocks() == []  # the commit record is whole: the data object is what was lost
    named = rf"{store}.*array '{array}' \({array}/{key}\) is missing"
    with pytest.raises(StoreDamagedError, match=named):
        opened.read_epoch(1)
    with pytest.raises(StoreDamagedError, match=named):
        opened.read(0, 3)


@pytest.mark.parametrize(
    ("which", "array"),
    [("test", "lengths"), ("test", "label_indices"), ("test", "audio"), ("logits", "topk_values")],
)
def test_truncated_chunk_is_named(which: str, array: str, tiny_demo: dict[str, str], tmp_path: Path) -> None:
    from ced_lightning.store.integrity import StoreDamagedError

    store = _copy(tiny_demo[which], tmp_path, f"{which}.zarr")
    path, key = _first_object(store, array)
    with open(path, "r+b") as handle:  # truncate -s 10
        handle.truncate(10)
    named = rf"{store}.*array '{array}' \({array}/{key}\) does not decode"
    with pytest.raises(StoreDamagedError, match=named):
        if which == "logits":
            LogitStore.open(str(store)).read_epoch(0)
        else:
            AudioStore.open(store).read_clips(0, 16)


def test_stores_without_chunk_records_still_open_and_name_lost_chunks(tmp_path: Path) -> None:
    """An audio store written before `chunks_written`: zarr skipped all-zero chunks (an unlabeled store's
    `label_indptr`), so such a chunk's absence is no damage; a lost `lengths` chunk still is."""
    from ced_lightning.store.audio_writer import write_audio_store
    from ced_lightning.store.integrity import StoreDamagedError

    clips = [(f"c{i}", np.full(300, 0.25, np.float32), None) for i in range(5)]
    url = tmp_path / "unlabeled.zarr"
    write_audio_store(url, clips)
    _drop_attr(url, "chunks_written")
    (url / "label_indptr" / "c" / "0").unlink()  # all zeros: what the old writer never stored
    assert AudioStore.open(url).labels(3).size == 0
    (url / "lengths" / "c" / "0").unlink()
    with pytest.raises(StoreDamagedError, match=r"array 'lengths' \(lengths/c/0\) is missing"):
        AudioStore.open(url)


def test_old_labelled_store_names_a_lost_label_chunk(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    """Without the record the label arrays are checked by their rules: zeros where a clip has several labels
    repeat within it, so the lost chunk is found and named."""
    from ced_lightning.store.integrity import StoreDamagedError

    store = _copy(tiny_demo["train"], tmp_path, "train.zarr")
    _drop_attr(store, "chunks_written")
    assert len(AudioStore.open(store)) == 40  # opens as before
    (store / "label_indices" / "c" / "0").unlink()
    with pytest.raises(StoreDamagedError, match=r"\(label_indices/c/0\) is missing, and read as fill values"):
        AudioStore.open(store)


def test_old_logit_store_reads_absent_parameters_but_names_lost_top_k(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    """A logit store without `all_chunks_written` may lack an all-zero parameter shard; its top-k shards of
    done blocks are never all zero and must be there."""
    from ced_lightning.store.integrity import StoreDamagedError

    store = _copy(tiny_demo["logits"], tmp_path, "logits.zarr")
    _drop_attr(store, "all_chunks_written")
    _first_object(store, "params/shift")[0].unlink()
    assert len(LogitStore.open(str(store)).read_epoch(0)) == 40
    _first_object(store, "topk_indices")[0].unlink()
    with pytest.raises(StoreDamagedError, match=r"\(topk_indices/c/0/0/0\) is missing"):
        LogitStore.open(str(store)).read_epoch(0)


def test_evaluate_on_a_damaged_store_exits_non_zero_naming_the_chunk(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    test = _copy(tiny_demo["test"], tmp_path, "test.zarr")
    (test / "label_indices" / "c" / "0").unlink()
    teacher = Path(tiny_demo["root"]) / "teacher.pt"
    done = run_command(
        "evaluate", f"ckpt={teacher}", f"store={test}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path
    )
    assert done.returncode != 0, done.stdout[-2000:]
    assert "(label_indices/c/0) is missing" in done.stderr, done.stderr[-3000:]
    assert "mAP" not in done.stdout


def test_train_on_a_damaged_logit_store_exits_non_zero_naming_the_chunk(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    logits = _copy(tiny_demo["logits"], tmp_path, "logits.zarr")
    _first_object(logits, "topk_values")[0].unlink()
    done = run_command(
        "train",
        *tiny_student_overrides(tiny_demo, logits),
        "data.num_workers=0",
        "data.clip_seconds=1.0",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=csv",
        f"hydra.run.dir={tmp_path / 'train'}",
        cwd=tmp_path,
    )
    assert done.returncode != 0, done.stdout[-2000:]
    assert "(topk_values/c/0/0/0) is missing" in done.stderr, done.stderr[-3000:]
    # The student wrote no checkpoint; its label-only row, side by side and reading no logit store, may.
    assert not list((tmp_path / "train" / "checkpoints").glob("*.ckpt"))


def test_check_command_reports_a_good_store_and_names_each_problem(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    good = run_command(
        "check", f"store={tiny_demo['logits']}", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path
    )
    assert good.returncode == 0, good.stderr[-3000:]
    assert "logit store" in good.stdout and "OK (clips 40, epochs 2, topk 4" in good.stdout
    assert "bytes" in good.stdout

    audio = _copy(tiny_demo["test"], tmp_path, "test.zarr")
    (audio / "lengths" / "c" / "0").unlink()
    (audio / "label_indices" / "c" / "0").unlink()
    with open(audio / "audio" / "c" / "0", "r+b") as handle:
        handle.truncate(10)
    bad = run_command("check", f"store={audio}", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path)
    assert bad.returncode == 1, bad.stdout[-2000:]
    problems = [line for line in bad.stderr.splitlines() if "is damaged" in line]
    assert len(problems) == 3, bad.stderr[-3000:]
    for key in ("(lengths/c/0) is missing", "(label_indices/c/0) is missing", "(audio/c/0) does not decode"):
        assert sum(key in line for line in problems) == 1, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr


def test_check_passes_every_demo_store_in_process(tiny_demo: dict[str, str]) -> None:
    from ced_lightning.store.scan import scan_store

    for which in ("train", "val", "test", "logits"):
        result = scan_store(tiny_demo[which])
        assert result.ok and not result.notes, (which, result.problems, result.notes)


def test_verify_names_the_missing_chunk(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    """`extract verify=N` on a store that lost a parameter shard: the chunk is named, not the teachers."""
    from ced_lightning import compose_config
    from ced_lightning.extract import run_extract
    from ced_lightning.store.integrity import StoreDamagedError

    logits = _copy(tiny_demo["logits"], tmp_path, "logits.zarr")
    _first_object(logits, "params/time_start")[0].unlink()
    overrides = [
        f"audio_store={tiny_demo['train']}",
        f"output={logits}",
        "teacher=ced",
        f"teacher.checkpoints=[{Path(tiny_demo['root']) / 'teacher.pt'}]",
        "epochs=2",
        "topk=4",
        "clip_seconds=1.0",
        "verify=4",
        "trainer.enable_progress_bar=false",
    ]
    cfg = compose_config(overrides, output_dir=tmp_path / "run", config="extract")
    with pytest.raises(StoreDamagedError, match=r"\(params/time_start/c/0/0/0\) is missing"):
        run_extract(cfg)


def test_a_lost_chunk_of_an_object_store_is_named(tiny_demo: dict[str, str]) -> None:
    """The same through fsspec (an in-memory file system standing for a bucket): the `audio` objects are
    listed at open, the logit store's shards checked where zarr fetches them."""
    import fsspec

    from ced_lightning.store.integrity import StoreDamagedError

    fs = fsspec.filesystem("memory")
    try:
        for which in ("test", "logits"):
            fs.put(tiny_demo[which], f"/damage/{which}.zarr", recursive=True)
        fs.rm("/damage/test.zarr/audio/c/0")
        with pytest.raises(StoreDamagedError, match=r"memory://damage/test\.zarr.*\(audio/c/0\) is missing"):
            AudioStore.open("memory://damage/test.zarr")
        fs.rm("/damage/logits.zarr/topk_values/c/0/0/0")
        with pytest.raises(StoreDamagedError, match=r"\(topk_values/c/0/0/0\) is missing"):
            LogitStore.open("memory://damage/logits.zarr").read_epoch(0)
    finally:
        fs.rm("/damage", recursive=True)
