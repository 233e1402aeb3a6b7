from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from ced_lightning.core.augment import AugmentParams, AugmentRecipe, sample_augment_params
from ced_lightning.core.quantize import max_abs_error
from ced_lightning.store.logit_layout import LogitStoreLayout
from ced_lightning.store.logits import LogitStore

N, E, K, C, BLOCK = 23, 2, 5, 12, 8
LENGTHS = np.full(N, 16000)


def _settings(**overrides: Any) -> dict[str, Any]:
    settings = {
        "num_clips": N,
        "epochs": E,
        "topk": K,
        "num_classes": C,
        "class_names": [f"c{i}" for i in range(C)],
        "quantization": "float16",
        "recipe": AugmentRecipe(),
        "seed": 3,
        "audio_fingerprint": "abc123",
        "audio_url": "/somewhere/audio.zarr",
        "clip_samples": 16000,
        "teachers": [{"name": "t1", "checkpoint": "/x/t1.ckpt", "sha256": "aa"}],
        "combine": "mean_prob",
        "block_clips": BLOCK,
    }
    settings.update(overrides)
    return settings


def _create(url: str, **overrides: Any) -> LogitStore:
    """`LogitStore.create` of `_settings(**overrides)`: layout fields in the layout, others as keywords."""
    settings = _settings(**overrides)
    layout = {
        f.name: settings.pop(f.name) for f in dataclasses.fields(LogitStoreLayout) if f.name in settings
    }
    return LogitStore.create(url, LogitStoreLayout(**layout), **settings)


def _block_data(store: LogitStore, b: int) -> tuple[np.ndarray, np.ndarray, list[AugmentParams]]:
    start, stop = store.block_range(b)
    rng = np.random.default_rng(b)
    probs = rng.random((E, stop - start, C)).astype(np.float32)
    indices = np.argsort(-probs, axis=-1)[..., :K]
    top = np.take_along_axis(probs, indices, -1)
    # Shuffle each row: the store must reorder rows itself.
    perm = rng.permuted(np.tile(np.arange(K), (E, stop - start, 1)), axis=-1)
    index = np.arange(start, stop)
    params = [
        sample_augment_params(store.recipe, store.seed, e, index, LENGTHS[start:stop]) for e in range(E)
    ]
    return np.take_along_axis(indices, perm, -1), np.take_along_axis(top, perm, -1), params


@pytest.mark.parametrize("quantization", ["float16", "int8"])
def test_write_read_round_trip(tmp_path: Path, quantization: str) -> None:
    url = str(tmp_path / "logits.zarr")
    store = _create(url, quantization=quantization)
    assert store.num_blocks == 3 and store.block_range(2) == (16, 23)
    assert store.missing_blocks() == [0, 1, 2] and not store.is_complete()
    written = {b: _block_data(store, b) for b in range(store.num_blocks)}
    for b in (2, 0, 1):  # any order
        store.write_block(b, *written[b])
    reopened = LogitStore.open(url)
    assert reopened.is_complete() and len(reopened) == N
    assert reopened.recipe == AugmentRecipe() and reopened.quantization == quantization
    assert reopened.class_names == [f"c{i}" for i in range(C)]
    for e in range(E):
        epoch = reopened.read_epoch(e)
        assert epoch.indices.shape == (N, K) and epoch.probs.dtype == np.float32 and len(epoch.params) == N
        for b, (indices, probs, params) in written.items():
            start, stop = reopened.block_range(b)
            # Stored rows are by descending probability; compare as class -> probability maps.
            got_idx, got_p = epoch.indices[start:stop], epoch.probs[start:stop]
            order = np.argsort(-probs[e], axis=-1, kind="stable")
            np.testing.assert_array_equal(got_idx, np.take_along_axis(indices[e], order, -1))
            expected_p = np.take_along_axis(probs[e], order, -1)
            assert (np.abs(got_p - expected_p) <= max_abs_error(expected_p, quantization)).all()
            assert (np.diff(got_p, axis=-1) <= 0).all()
            assert epoch.params.subset(np.arange(start, stop)) == params[e]
        # read() agrees with read_epoch().
        i = 17
        idx, p, params = reopened.read(e, i)
        assert idx.dtype == np.int64 and p.dtype == np.float32 and len(params) == 1
        np.testing.assert_array_equal(idx, epoch.indices[i])
        np.testing.assert_array_equal(p, epoch.probs[i])
        assert params == epoch.params.subset(np.array([i]))


def test_layout_blocks_own_their_shards(tmp_path: Path) -> None:
    url = str(tmp_path / "logits.zarr")
    store = _create(url)
    group = zarr.open_group(url, mode="r")
    for name in ("topk_indices", "topk_values", "params/shift", "params/time_start"):
        array = group[name]
        assert array.shards == (E, BLOCK, *array.shape[2:]), name
        assert array.chunks == (1, BLOCK, *array.shape[2:]), name
    assert group["topk_indices"].dtype == np.uint16 and group["topk_values"].dtype == np.float16
    assert group["block_done"].chunks == (1,) and group["block_done"].shards is None
    assert group.attrs["format_version"] == 1 and group.attrs["topk"] == K
    # Writing block 1 creates block 1's shards only.
    store.write_block(1, *_block_data(store, 1))
    shard_files = sorted(p.name for p in (tmp_path / "logits.zarr" / "topk_values" / "c" / "0").iterdir())
    assert shard_files == ["1"]
    assert store.missing_blocks() == [0, 2]


def test_incomplete_store_is_refused_by_read_epoch(tmp_path: Path) -> None:
    store = _create(str(tmp_path / "s.zarr"))
    store.write_block(0, *_block_data(store, 0))
    with pytest.raises(ValueError, match=r"incomplete: 2 of 3 blocks missing \(1, 2\)"):
        store.read_epoch(0)
    with pytest.raises(ValueError, match="block 2, which is not extracted"):
        store.read(0, 20)
    assert store.read(1, 3)[0].shape == (K,)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"topk": 4}, "topk"),
        ({"quantization": "int8"}, "quantization"),
        ({"recipe": AugmentRecipe(time_masks=2)}, "augment_recipe"),
        ({"teachers": [{"name": "t1", "checkpoint": "/x/t1.ckpt", "sha256": "bb"}]}, "teachers"),
        ({"audio_fingerprint": "other"}, "audio_fingerprint"),
        ({"seed": 4}, "seed"),
        ({"epochs": 3}, "epochs"),
    ],
)
def test_mismatch_is_refused_naming_the_difference(tmp_path: Path, change: dict, named: str) -> None:
    url = str(tmp_path / "s.zarr")
    _create(url)
    with pytest.raises(
        ValueError, match=rf"(?s)other settings:.*{named}: stored .*requested.*another output"
    ):
        _create(url, **change)


def test_same_settings_reopen_and_moved_checkpoint_resumes(tmp_path: Path) -> None:
    url = str(tmp_path / "s.zarr")
    first = _create(url)
    first.write_block(0, *_block_data(first, 0))
    moved = [{"name": "t1", "checkpoint": "/elsewhere/t1.ckpt", "sha256": "aa"}]
    again = _create(url, teachers=moved, audio_url="/moved/audio.zarr")
    assert again.missing_blocks() == [1, 2]


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no logit store at"):
        LogitStore.open(str(tmp_path / "missing.zarr"))
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(ValueError, match="is not a logit store"):
        LogitStore.open(str(tmp_path / "other.zarr"))


def test_creation_killed_midway_is_created_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "s.zarr")
    create_array, made = zarr.Group.create_array, []

    def dies_after_two_arrays(self: zarr.Group, *args: Any, **kwargs: Any) -> Any:
        if len(made) == 2:
            raise KeyboardInterrupt  # the process is killed while creating the store
        made.append(args or kwargs.get("name"))
        return create_array(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(zarr.Group, "create_array", dies_after_two_arrays)
        with pytest.raises(KeyboardInterrupt):
            _create(url)
    with pytest.raises(ValueError, match=r"creation was interrupted.*run again"):
        LogitStore.open(url)
    store = _create(url)  # the same command again
    assert store.missing_blocks() == [0, 1, 2] and "creation_incomplete" not in store.attrs
    store.write_block(0, *_block_data(store, 0))
    assert _create(url).missing_blocks() == [1, 2]

    # A group that is not ours (no mark) is never recreated: refused, left as it was.
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(str(foreign), mode="w").create_array("data", shape=(3,), dtype="int8")
    with pytest.raises(ValueError, match="is not a logit store"):
        _create(str(foreign))
    assert (foreign / "data" / "zarr.json").exists()
    # Nor is a folder of other files: `extract output=` pointed at data is refused, not emptied.
    data = tmp_path / "audioset"
    (data / "train.zarr").mkdir(parents=True)
    (data / "train.zarr" / "zarr.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds other files"):
        _create(str(data))
    assert (data / "train.zarr" / "zarr.json").read_text() == "{}"


def test_write_block_checks_shapes(tmp_path: Path) -> None:
    store = _create(str(tmp_path / "s.zarr"))
    indices, probs, params = _block_data(store, 0)
    with pytest.raises(ValueError, match=r"expected indices and probs of shape \(2, 8, 5\)"):
        store.write_block(0, indices[:, :4], probs[:, :4], params)
    with pytest.raises(ValueError, match="one per epoch"):
        store.write_block(0, indices, probs, params[:1])
    with pytest.raises(ValueError, match="class indices outside"):
        store.write_block(0, indices + C, probs, params)
    assert store.missing_blocks() == [0, 1, 2]


def test_memory_url_and_size(tmp_path: Path) -> None:
    store = _create("memory://ced-test/logits.zarr", quantization="int8")
    for b in range(store.num_blocks):
        store.write_block(b, *_block_data(store, b))
    assert LogitStore.open("memory://ced-test/logits.zarr").is_complete()
    assert store.nbytes_stored() > 0
    assert 0 < store.bytes_per_clip_epoch() < 200


# --- segments: rows that are segments of clips ---------------------------------------------------------
CLIP_LENGTHS = np.array([16000] * 20 + [5 * 16000 + 9000, 4000, 16000])  # clip 20: 5 s + a 0.56 s rest


def test_store_of_segments_round_trip_and_positions(tmp_path: Path) -> None:
    from ced_lightning.store.segments import segment_table

    table = segment_table(CLIP_LENGTHS, 16000)
    assert len(table) == N + 5  # clip 20 has 6 segments: 5 whole, the rest kept (>= half)
    url = str(tmp_path / "segments.zarr")
    store = _create(url, segments=table)
    assert len(store) == store.num_rows == N + 5 and store.num_clips == N and store.num_blocks == 4
    assert store.block_range(3) == (24, 28)
    rng = np.random.default_rng(0)
    for b in range(store.num_blocks):
        start, stop = store.block_range(b)
        rows = np.arange(start, stop)
        probs = rng.random((E, stop - start, K)).astype(np.float32)
        indices = np.tile(np.arange(K), (E, stop - start, 1))
        params = [
            sample_augment_params(store.recipe, 3, e, rows, table.lengths(CLIP_LENGTHS)[rows])
            for e in range(E)
        ]
        store.write_block(b, indices, probs, params)
    reopened = LogitStore.open(url)
    assert reopened.is_complete() and reopened.segment_samples == 16000
    assert reopened.attrs["num_segments"] == N + 5 and reopened.attrs["num_clips"] == N
    got = reopened.segments()
    np.testing.assert_array_equal(got.clip, table.clip)
    np.testing.assert_array_equal(got.start, table.start)
    assert got.start[20:26].tolist() == [0, 16000, 32000, 48000, 64000, 80000]
    group = zarr.open_group(url, mode="r")
    assert group["segment_clip"].dtype == np.int32 and group["segment_start"].dtype == np.int64
    assert reopened.read_epoch(1).indices.shape == (N + 5, K) and reopened.read(0, N + 4)[0].shape == (K,)
    # The same extraction resumes; another segment length is another extraction.
    assert _create(url, segments=table).is_complete()
    with pytest.raises(
        ValueError, match=r"(?s)other settings:.*segment_samples: stored 16000, requested 8000"
    ):
        _create(url, segments=segment_table(CLIP_LENGTHS, 8000))
    # A store of one row per clip (as before segments) is not resumed as one of segments.
    _create(str(tmp_path / "plain.zarr"))
    with pytest.raises(ValueError, match=r"(?s)segment_samples: stored None, requested 16000"):
        _create(str(tmp_path / "plain.zarr"), segments=table)


def test_clips_that_fit_one_segment_make_the_store_of_before(tmp_path: Path) -> None:
    """A table of one segment per clip at the clip length is stored without positions: the same attributes
    and arrays as a store made without segments, and that store reads as one segment per clip at 0."""
    from ced_lightning.store.segments import segment_table

    plain = _create(str(tmp_path / "plain.zarr"))
    table = segment_table(np.full(N, 12000), 16000)
    fits = _create(str(tmp_path / "fits.zarr"), segments=table)
    assert plain.attrs == fits.attrs and "segment_samples" not in fits.attrs
    assert sorted(zarr.open_group(fits.url, mode="r").array_keys()) == sorted(
        zarr.open_group(plain.url, mode="r").array_keys()
    )
    old = LogitStore.open(plain.url).segments()
    assert old.clip.tolist() == list(range(N)) and (old.start == 0).all() and old.segment_samples == 16000


def test_segments_longer_than_the_input_refused(tmp_path: Path) -> None:
    from ced_lightning.store.segments import segment_table

    with pytest.raises(ValueError, match="segment_seconds <= clip_seconds"):
        _create(str(tmp_path / "s.zarr"), segments=segment_table(CLIP_LENGTHS, 32000))
