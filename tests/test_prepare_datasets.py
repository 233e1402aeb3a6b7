"""`prepare source=hf` and `source=webdataset`: the same clips as FLAC files in a folder with a file list, as
a saved Hugging Face dataset and as WebDataset shards, give the same store."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zarr
from omegaconf import OmegaConf

from ced_lightning.core.errors import InputError
from ced_lightning.data.webdataset_source import expand_braces, from_webdataset, split_member_name
from ced_lightning.prepare import run_prepare

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["Speech", "Dog", "Music, classical", "Rain"]
# (name, sample rate, channels, labels as class indices)
CLIPS = [
    ("clip0", 16000, 1, [0]),
    ("clip1", 44100, 2, [1, 2]),
    ("clip2", 22050, 1, [3]),
    ("clip3", 16000, 2, [2]),
    ("clip4", 48000, 1, [0, 3]),
    ("clip5", 8000, 1, [1]),
]


def flac_bytes(index: int, rate: int, channels: int) -> bytes:
    rng = np.random.default_rng(index)
    seconds = 0.3 + 0.1 * index
    t = np.arange(round(rate * seconds)) / rate
    tone = 0.2 * np.sin(2 * np.pi * (300 + 150 * index) * t) + 0.02 * rng.standard_normal(len(t))
    signal = np.stack([tone / (c + 1) for c in range(channels)], axis=1)
    out = io.BytesIO()
    sf.write(out, signal.astype(np.float32), rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


@pytest.fixture
def clips(tmp_path: Path) -> dict:
    """The clips as FLAC files with a file list, and the class list CSV (mids other than the names)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    encoded = {}
    for index, (name, rate, channels, _) in enumerate(CLIPS):
        encoded[name] = flac_bytes(index, rate, channels)
        (folder / f"{name}.flac").write_bytes(encoded[name])
    rows = [f"{name}.flac,{';'.join(map(str, labels))}" for name, _, _, labels in CLIPS]
    (folder / "list.csv").write_text("filename,labels\n" + "\n".join(rows) + "\n")
    classes = tmp_path / "classes.csv"
    classes.write_text(
        "index,mid,display_name\n" + "".join(f'{i},/m/c{i},"{n}"\n' for i, n in enumerate(CLASSES))
    )
    return {"list": folder / "list.csv", "classes": classes, "encoded": encoded}


def prepare(tmp_path: Path, output: str, **overrides) -> Path:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "prepare.yaml"))
    cfg.pop("defaults")
    cfg.update({"output": str(tmp_path / output), "workers": 0, "chunk_samples": 16000, "shard_chunks": 2})
    cfg.update(overrides)
    run_prepare(OmegaConf.create(cfg))
    return tmp_path / output


def assert_same_store(first: Path, second: Path) -> None:
    a, b = zarr.open_group(str(first), mode="r"), zarr.open_group(str(second), mode="r")
    assert sorted(n for n, _ in a.arrays()) == sorted(n for n, _ in b.arrays())
    for name, array in a.arrays():
        assert np.array_equal(array[:], b[name][:]), name
    assert a["names"].shape == (len(CLIPS),)


def test_webdataset_shards_give_the_store_of_the_same_files(tmp_path, clips):
    wds = pytest.importorskip("webdataset")
    reference = prepare(tmp_path, "files.zarr", input=str(clips["list"]), class_labels=str(clips["classes"]))
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(3):  # two samples per shard; labels by index, mid or display name
        with wds.TarWriter(str(shards / f"train-{shard:06d}.tar")) as sink:
            for name, _, _, labels in CLIPS[2 * shard : 2 * shard + 2]:
                named = [[i, f"/m/c{i}", CLASSES[i]][i % 3] for i in labels]
                sink.write({"__key__": name, "flac": clips["encoded"][name], "json": {"label": named}})
    pattern = str(shards / "train-{000000..000002}.tar")
    args = {
        "source": "webdataset",
        "input": pattern,
        "class_labels": str(clips["classes"]),
        "webdataset": {"audio_key": None, "label_key": "json", "json_field": "label"},
    }
    store = prepare(tmp_path, "wds.zarr", **args)
    assert_same_store(reference, store)
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    assert attrs["source"] == "webdataset"
    # Rerun with the same arguments: the complete store is reused, not written again.
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    prepare(tmp_path, "wds.zarr", **args)
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == before


def test_webdataset_cls_members_and_keys(tmp_path):
    """`.cls` members (WebDataset's integer labels), keys with folders and dots, a sample without audio."""
    wds = pytest.importorskip("webdataset")
    assert split_member_name("a/b/x.seg1.flac") == ("a/b/x", "seg1.flac")
    assert expand_braces("s-{00..02}-{a,b}.tar") == [f"s-{i:02d}-{c}.tar" for i in range(3) for c in "ab"]
    with wds.TarWriter(str(tmp_path / "one.tar")) as sink:
        sink.write({"__key__": "dir/x.part1", "wav": flac_bytes(0, 16000, 1), "cls": 3})
        sink.write({"__key__": "y", "txt": "no audio here"})
    with pytest.raises(InputError, match=r"one\.tar: sample 'y' has no an audio member|one\.tar: sample 'y'"):
        from_webdataset(str(tmp_path / "one.tar"))
    with wds.TarWriter(str(tmp_path / "two.tar")) as sink:
        sink.write({"__key__": "dir/x", "flac": flac_bytes(0, 16000, 1), "cls": 3})
    source = from_webdataset(str(tmp_path / "two.tar"))
    assert [(i.name, i.labels) for i in source.items] == [("dir/x", [3])]
    assert source.items[0].path.endswith("two.tar:dir/x.flac")
    assert source.items[0].blob() == flac_bytes(0, 16000, 1)


def test_hf_saved_dataset_gives_the_store_of_the_same_files(tmp_path, clips):
    datasets = pytest.importorskip("datasets")
    reference = prepare(tmp_path, "files.zarr", input=str(clips["list"]), class_labels=str(clips["classes"]))
    features = datasets.Features(
        {"audio": datasets.Audio(), "tags": datasets.Sequence(datasets.ClassLabel(names=CLASSES))}
    )
    rows = {
        "audio": [{"bytes": clips["encoded"][name], "path": f"{name}.flac"} for name, *_ in CLIPS],
        "tags": [labels for *_, labels in CLIPS],
    }
    # Cast, not encoded row by row: datasets encodes Audio rows through torchcodec, casting keeps the bytes.
    split = datasets.Dataset.from_dict(rows).cast(features)
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "hf"), max_shard_size="20KB")
    assert len(datasets.load_from_disk(str(tmp_path / "hf"))["train"].cache_files) > 1  # rows across files
    store = prepare(
        tmp_path,
        "hf.zarr",
        source="hf",
        input=str(tmp_path / "hf"),
        class_labels=str(clips["classes"]),
        hf={"split": "train", "audio_column": "audio", "label_column": "tags"},
    )
    assert_same_store(reference, store)
    # Without class_labels the ClassLabel names are the store's class list.
    own = prepare(
        tmp_path,
        "hf_own.zarr",
        source="hf",
        input=str(tmp_path / "hf"),
        hf={"split": "train", "audio_column": "audio", "label_column": "tags"},
    )
    group = zarr.open_group(str(own), mode="r")
    assert list(group["class_names"][:]) == CLASSES
    assert np.array_equal(group["label_indices"][:], zarr.open_group(str(store))["label_indices"][:])


def test_hf_dataset_errors_name_the_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    from ced_lightning.core.errors import ConfigError
    from ced_lightning.data.hf_source import from_hf_dataset

    split = datasets.Dataset.from_dict({"sound": [json.dumps([1, 2])], "label": [0]})
    split.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(
        ConfigError, match=r"hf\.audio_column='audio': .* has the columns \['sound', 'label'\]"
    ):
        from_hf_dataset(tmp_path / "plain")
    with pytest.raises(InputError, match=r"hf\.audio_column='sound' .* not an Audio feature"):
        from_hf_dataset(tmp_path / "plain", audio_column="sound")
