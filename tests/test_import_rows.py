"""Released rows beyond one 10 s span per clip and epoch, imported as the original code reads them.

The original's `LogitsReader` trains on every row of a stored epoch: it reads `clip[round(start·sr):
round(end·sr)]` and shifts that span under the row's seed (tests/data/ced_legacy/README.md, the contract for
the release's layout). Each test builds a release from the miniature in tests/data/ced_legacy, imports it and
checks what the student's real data module yields for stored epoch 1 against exactly that, row by row.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow
import pyarrow.parquet as parquet
import pytest

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.data.distill import DistillDataModule
from ced_lightning.release.importer import LEGACY_SEEDS, STATS_FILE
from ced_lightning.release.reader import ClipMatcher, LegacyImportError
from ced_lightning.release.replay import LEGACY_CHUNK_SAMPLES, legacy_draw
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.logits import LogitStore
from test_import_logits import LONG_WAV, RELEASE, _copy_release, _edit_parquet, _import, _prepare

LONG_CLIP = "zzlong_recording"  # tests/data/ced_reference/long_25s.wav: 25 s
TEN_S_CLIP = "--04kMEQOAs_0.000_10.000"  # 10.00 s in the audio store; row 1 of logits_ep{1,3}_0, ep2_0


def _audio_with_long_clip(tmp_path: Path) -> str:
    audio_dir = tmp_path / "audio"
    shutil.copytree(RELEASE / "audio", audio_dir)
    shutil.copyfile(LONG_WAV, audio_dir / f"{LONG_CLIP}.wav")
    return _prepare(audio_dir, tmp_path / "audio.zarr")


def _append_rows(release: Path, stem: str, rows: list[tuple[str, float, float, int]]) -> None:
    """Append (filename, start s, end s, seed) rows to one rank's files; each row's top-20 is made up and
    distinct (its first class is the seed mod 527)."""
    table = parquet.read_table(release / f"{stem}.parquet")
    columns = {
        "filename": [r[0] for r in rows],
        "start": [r[1] for r in rows],
        "end": [r[2] for r in rows],
    }
    added = pyarrow.Table.from_pydict(columns, schema=table.schema)
    parquet.write_table(pyarrow.concat_tables([table, added]), release / f"{stem}.parquet")
    with h5py.File(release / f"{stem}.h5", "r") as h5:
        data = {key: h5[key][:] for key in h5}
    seeds = np.array([r[3] for r in rows], dtype=np.int32)
    indexes = np.stack([(np.arange(20) + s) % 527 for s in seeds]).astype(np.int16)
    values = np.tile(np.linspace(0.9, 0.05, 20, dtype=np.float16), (len(rows), 1))
    data["seeds"] = np.concatenate([data["seeds"], seeds])
    data["topk_indexes"] = np.concatenate([data["topk_indexes"], indexes])
    data["topk_values"] = np.concatenate([data["topk_values"], values])
    with h5py.File(release / f"{stem}.h5", "w") as h5:
        for key, value in data.items():
            h5.create_dataset(key, data=value)


def _append_to_every_epoch(release: Path, rows: list[tuple[str, float, float]], seed: int) -> None:
    for e, stem in enumerate(("logits_ep1_0", "logits_ep2_0", "logits_ep3_0")):
        _append_rows(release, stem, [(name, a, b, seed + 100 * e + i) for i, (name, a, b) in enumerate(rows)])


def _released_epoch_1(release: Path) -> list[dict]:
    table = parquet.read_table(release / "logits_ep1_0.parquet").to_pydict()
    with h5py.File(release / "logits_ep1_0.h5", "r") as h5:
        seeds, indexes = h5["seeds"][:], h5["topk_indexes"][:]
    return [
        {
            "filename": table["filename"][i],
            "first": round(np.float32(table["start"][i]) * np.float32(SAMPLE_RATE)),
            "span": round(np.float32(table["end"][i]) * np.float32(SAMPLE_RATE))
            - round(np.float32(table["start"][i]) * np.float32(SAMPLE_RATE)),
            "seed": int(seeds[i]),
            "indexes": indexes[i].astype(np.int64),
        }
        for i in range(len(seeds))
    ]


def _check_student_epoch_0_is_the_originals(
    audio_url: str, store: LogitStore, release: Path
) -> dict[int, int]:
    """Every released row of stored epoch 1 once in the student's epoch 0 (and nothing else): its clip's
    samples `[start, start + span)` (at most 10 s), the shift the row's seed draws on its span, its top-k.
    Returns {store row: samples the student read}."""
    audio = AudioStore.open(audio_url)
    matcher = ClipMatcher(audio.names)
    seeds = store.read_extra(LEGACY_SEEDS)[0]
    data = DistillDataModule(
        train=audio_url, logits=store.url, batch_size=2, num_workers=0, shuffle_window=4, drop_last=False
    )
    seen: dict[int, int] = {}
    by_seed = {row["seed"]: row for row in _released_epoch_1(release)}
    for batch in data.train_dataloader():
        for b, row in enumerate(batch["index"].tolist()):
            released = by_seed.pop(int(seeds[row]))
            clip = matcher(released["filename"])
            length = int(batch["length"][b])
            expected = audio.read_clip_range(clip, released["first"], released["first"] + length)
            assert length == min(
                released["span"], LEGACY_CHUNK_SAMPLES, len(audio.read_clips(clip, clip + 1)[0])
            )
            assert np.array_equal(batch["waveform"][b, :length].numpy(), expected)
            assert not batch["waveform"][b, length:].any()
            assert (
                int(batch["augment"]["shift"][b])
                == legacy_draw(released["seed"], released["span"]).shift_samples
            )
            assert sorted(batch["topk_indices"][b].tolist()) == sorted(released["indexes"].tolist())
            seen[row] = length
    assert by_seed == {}  # every released row of the epoch trained once
    return seen


def _stats(store: LogitStore) -> dict:
    return json.loads((Path(store.url) / STATS_FILE).read_text())


def test_rows_starting_after_0s_are_a_long_clips_later_pieces(tmp_path: Path) -> None:
    """A 25 s recording released as the original's chunk_10 extraction cuts it: 0-10, 10-20, 20-25 s, in
    every stored epoch. Each piece is a store row the student hears exactly as the original did."""
    audio = _audio_with_long_clip(tmp_path)
    release = _copy_release(tmp_path)
    pieces = [
        (f"{LONG_CLIP}.wav", 0.0, 10.0),
        (f"{LONG_CLIP}.wav", 10.0, 20.0),
        (f"{LONG_CLIP}.wav", 20.0, 25.0),
    ]
    _append_to_every_epoch(release, pieces, seed=5000)
    store = _import(release, audio, tmp_path / "logits.zarr")
    stats = _stats(store)
    assert (stats["store_rows"], stats["rows_starting_after_0s"], stats["repeated_rows"]) == (7, 6, 0)
    assert stats["matched_rows"] == stats["rows"] == 12 + 9 and store.is_complete()
    long_index = AudioStore.open(audio).names.index(LONG_CLIP)
    segments = store.segments()
    assert segments.start[segments.clip == long_index].tolist() == [0, 160_000, 320_000]
    seen = _check_student_epoch_0_is_the_originals(audio, store, release)
    assert sorted(seen.values()).count(80_000) == 1 and len(seen) == 7


def test_a_clip_longer_than_its_released_span_is_cut_to_it(tmp_path: Path) -> None:
    """The teachers heard 9.98 s of a clip that is 10.00 s here: the student hears the same 9.98 s (159,680
    samples, the rest zero), shifted within them, and the report counts the clip."""
    audio = _prepare(RELEASE / "audio", tmp_path / "audio.zarr")
    release = _copy_release(tmp_path)
    for stem in ("logits_ep1_0", "logits_ep2_0", "logits_ep3_0"):
        _edit_parquet(release / f"{stem}.parquet", "end", 1, 9.98)
    store = _import(release, audio, tmp_path / "logits.zarr")
    stats = _stats(store)
    assert (stats["clips_cut_to_released_span"], stats["length_mismatches"]) == (1, 1)
    assert stats["length_mismatch_examples"] == [f"{TEN_S_CLIP}: 159680 released, 160000 here"]
    index = AudioStore.open(audio).names.index(TEN_S_CLIP)
    assert store.segments().lengths(AudioStore.open(audio).lengths)[index] == 159_680
    seen = _check_student_epoch_0_is_the_originals(audio, store, release)
    assert seen[index] == 159_680 and sorted(seen.values()) == [120_000, 159_680, 160_000, 160_000]


def test_rows_longer_than_10s_are_refused_unless_allowed_then_heard_for_10s(tmp_path: Path) -> None:
    audio = _audio_with_long_clip(tmp_path)
    release = _copy_release(tmp_path)
    _append_to_every_epoch(release, [(f"{LONG_CLIP}.wav", 0.0, 12.0)], seed=7000)
    with pytest.raises(LegacyImportError, match=r"spanning more than 10 s: 3 .*allow_long_rows=true"):
        _import(release, audio, tmp_path / "refused.zarr")
    store = _import(release, audio, tmp_path / "logits.zarr", allow_long_rows=True)
    stats = _stats(store)
    assert (stats["rows_longer_than_10s"], stats["store_rows"]) == (3, 5)
    seen = _check_student_epoch_0_is_the_originals(audio, store, release)
    # the student hears the span's first 10 s, shifted by the original's draw on its 12 s
    assert seen[AudioStore.open(audio).names.index(LONG_CLIP)] == 160_000


def test_a_clips_span_twice_in_one_epoch_is_refused_unless_allowed_then_trains_twice(tmp_path: Path) -> None:
    audio = _prepare(RELEASE / "audio", tmp_path / "audio.zarr")
    release = _copy_release(tmp_path)
    _append_to_every_epoch(release, [(f"{TEN_S_CLIP}.wav", 0.0, 10.0)], seed=9000)
    with pytest.raises(
        LegacyImportError, match=rf"same span in one epoch: 3 .*{TEN_S_CLIP}.*allow_repeated_rows"
    ):
        _import(release, audio, tmp_path / "refused.zarr")
    store = _import(release, audio, tmp_path / "logits.zarr", allow_repeated_rows=True)
    stats = _stats(store)
    assert (stats["repeated_rows"], stats["store_rows"], stats["rows_starting_after_0s"]) == (3, 5, 0)
    index = AudioStore.open(audio).names.index(TEN_S_CLIP)
    assert (store.segments().clip == index).sum() == 2
    seen = _check_student_epoch_0_is_the_originals(audio, store, release)
    assert len(seen) == 5


def test_a_release_of_one_row_per_clip_keeps_the_store_without_positions(tmp_path: Path) -> None:
    audio = _prepare(RELEASE / "audio", tmp_path / "audio.zarr")
    store = _import(_copy_release(tmp_path), audio, tmp_path / "logits.zarr")
    assert store.segment_samples is None and store.num_rows == store.num_clips == 4
    assert _stats(store)["store_rows"] == 4 and _stats(store)["clips_cut_to_released_span"] == 0
