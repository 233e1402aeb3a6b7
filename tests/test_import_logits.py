"""`import_logits`: the paper's released teacher logits become a logit store the student replays exactly.

Contract fixture: tests/data/ced_legacy (a copy of the shared reference, see its README): what the original
code's seeds draw (`legacy_draws.json`), the spectrograms it computes from them (`legacy_replay.pt`), and a
miniature release with what the original `LogitsReader` returns for every (epoch, clip) of it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py  # the `import` extra; the dev extra (`make install`) has it
import numpy as np
import pyarrow
import pyarrow.parquet as parquet
import pytest
import torch
import zarr
from omegaconf import OmegaConf

from ced_lightning import conf_dir
from ced_lightning.core.audio import pack_clips
from ced_lightning.core.augment import AugmentParams, AugmentRecipe, augmented_spectrogram
from ced_lightning.core.quantize import quantize
from ced_lightning.core.targets import rebuild_targets
from ced_lightning.data.sources import _segment_candidates, read_source, segment_ytid
from ced_lightning.models import create_ced
from ced_lightning.prepare import prepare_store
from ced_lightning.release.importer import LEGACY_SEEDS, STATS_FILE, run_import
from ced_lightning.release.reader import LegacyImportError, require_import_extra
from ced_lightning.release.replay import (
    LEGACY_BATCH_FRAMES,
    LEGACY_RECIPE,
    legacy_augment_params,
    legacy_draws,
)
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.lock import StoreLockedError, store_lock
from ced_lightning.store.logit_layout import LogitStoreLayout
from ced_lightning.store.logits import LogitStore
from conftest import FRONT_END_SUMS, command, command_env, float32_bound, run_command

LEGACY = Path(__file__).parent / "data" / "ced_legacy"
RELEASE = LEGACY / "released_layout"
CHUNK = RELEASE / "logits" / "ensemble_fixture" / "balanced" / "chunk_10"
LONG_WAV = Path(__file__).parent / "data" / "ced_reference" / "long_25s.wav"
SHORT_CLIP = "007P6bFgRCU_10.000_20.000"  # the fixture's 7.5 s clip
# A segment list for the fixture's clips: a store prepared from it is named by YouTube id and has labels.
SEGMENTS = """# YTID, start_seconds, end_seconds, positive_labels
--04kMEQOAs, 0.000, 10.000, "/m/09x0r"
-0DdlOuIFUI, 50.000, 60.000, "/m/04rlf"
0-2Onbywljo, 380.000, 390.000, "/m/09x0r,/m/04rlf"
007P6bFgRCU, 10.000, 20.000, "/m/0jbk"
"""


def _prepare(input_path: Path, output: Path, audio_dir: Path | None = None) -> str:
    """An audio store through the project's prepare code (folder of files, or segment CSV + audio)."""
    source = read_source(str(input_path), audio_dir=str(audio_dir) if audio_dir else None)
    prepare_store(source.items, str(output), class_list=source.class_list, workers=0, progress=False)
    return str(output)


def _config(source: Path | str, audio: str, output: Path | str, **overrides) -> object:
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "import_logits.yaml"))
    cfg.pop("defaults")
    cfg.update(source=str(source), audio_store=audio, output=str(output), **overrides)
    return OmegaConf.create(cfg)


def _import(source: Path | str, audio: str, output: Path | str, **overrides) -> LogitStore:
    return run_import(_config(source, audio, output, **overrides))


def _copy_release(tmp_path: Path) -> Path:
    folder = tmp_path / "chunk_10"
    shutil.copytree(CHUNK, folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    return folder


def _edit_parquet(path: Path, column: str, row: int, value: object) -> None:
    table = parquet.read_table(path)
    values = table.column(column).to_pylist()
    values[row] = value
    index = table.column_names.index(column)
    field = table.schema.field(index)
    table = table.set_column(index, field, pyarrow.array(values, type=field.type))
    parquet.write_table(table, path)


def _edit_h5(path: Path, key: str, row: int, value: object) -> None:
    with h5py.File(path, "r+") as h5:
        h5[key][row] = value


def _store_arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    arrays = {}
    for name in ("topk_indices", "topk_values", "block_done", LEGACY_SEEDS):
        arrays[name] = np.asarray(group[name][:])
    for name in group["params"].array_keys():
        arrays[f"params/{name}"] = np.asarray(group["params"][name][:])
    return arrays


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, str]:
    """Audio stores of the fixture's clips named by file (folder) and by YouTube id (segment CSV), and the
    release imported into float16 and int8 logit stores."""
    root = tmp_path_factory.mktemp("legacy")
    by_file = _prepare(RELEASE / "audio", root / "by_file.zarr")
    (root / "segments.csv").write_text(SEGMENTS)
    by_ytid = _prepare(root / "segments.csv", root / "by_ytid.zarr", audio_dir=RELEASE / "audio")
    f16 = str(root / "logits_f16.zarr")
    i8 = str(root / "logits_i8.zarr")
    _import(CHUNK, by_file, f16)
    _import(CHUNK, by_ytid, i8, quantization="int8")
    return {"root": str(root), "by_file": by_file, "by_ytid": by_ytid, "f16": f16, "i8": i8}


# ----------------------------------------------------------------------------------------- the seed replay


def test_replay_gives_every_field_of_the_original_draws() -> None:
    draws = json.loads((LEGACY / "legacy_draws.json").read_text())
    seeds = np.array([d["seed"] for d in draws])
    lengths = np.full(len(draws), 160_000)
    replayed = legacy_draws(seeds, lengths)
    params = legacy_augment_params(seeds, lengths).values
    for i, (want, got) in enumerate(zip(draws, replayed)):
        assert (got.shift_applied, got.shift_samples) == (want["shift_applied"], want["shift_samples"])
        assert (got.rand_value, got.rand_min_value) == (want["rand_value"], want["rand_min_value"])
        assert params["shift"][i] == want["shift_samples"]
        time_start, time_width = int(params["time_start"][i, 0]), int(params["time_width"][i, 0])
        freq_start, freq_width = int(params["freq_start"][i, 0]), int(params["freq_width"][i, 0])
        assert [time_start, time_start + time_width] == want["time_mask"], want["seed"]
        assert [freq_start, freq_start + freq_width] == want["freq_mask"], want["seed"]


def test_replay_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    legacy_augment_params(np.array([0, 1, 42]), np.array([160_000, 120_000, 80_000]))
    assert torch.equal(torch.rand(3), expected)


def test_segment_ytid_reads_every_name_prepare_matches() -> None:
    for ytid in ("--04kMEQOAs", "Yabcdefghi_", "YYYYYYYYYYY", "a_b_c_d_e_f"):
        for stem in _segment_candidates(ytid, "30.000", "40.000"):
            assert segment_ytid(stem) == ytid, stem
    assert segment_ytid("not_a_ytid") is None and segment_ytid("abcdefghijk_x") is None


# ----------------------------------------------------------------------------------- the fixture round trip


def _clip_index(store: AudioStore, filename: str) -> int:
    stem = filename.rsplit(".", 1)[0]
    return next(i for i, name in enumerate(store.names) if name in (stem, segment_ytid(stem)))


def _original_mask(value: float, min_value: float, size: int, param: int) -> tuple[int, int]:
    """The original's `mask_along_axis` (float32 tensors, `.long()`), written out independently."""
    v = torch.tensor([value], dtype=torch.float32) * param
    m = torch.tensor([min_value], dtype=torch.float32) * (size - v)
    return int(m.long()), int(v.long())


@pytest.mark.parametrize("kind", ["f16", "i8"])
def test_every_epoch_and_clip_gives_the_original_readers_target_shift_and_masks(
    stores: dict[str, str], kind: str
) -> None:
    """All 12 (stored epoch, clip) pairs, read back the way the student reads them: the dense zero-filled
    target equals the original reader's exactly (float16; int8 within its rounding), and the shift and
    both masks are the original's."""
    audio = AudioStore.open(stores["by_file" if kind == "f16" else "by_ytid"])
    store = LogitStore.open(stores[kind])
    assert (store.epochs, store.num_clips, store.topk, store.seed) == (3, 4, 20, None)
    expected = torch.load(RELEASE / "original_reader_outputs.pt", weights_only=False)
    assert len(expected) == 12
    for item in expected:
        epoch, clip = item["file_epoch"] - 1, _clip_index(audio, item["filename"])
        epoch_slice = store.read_epoch(epoch)
        target = rebuild_targets(
            torch.from_numpy(epoch_slice.indices[clip : clip + 1].astype(np.int64)),
            torch.from_numpy(epoch_slice.probs[clip : clip + 1]),
            store.num_classes,
            "zero",
        )[0]
        if kind == "f16":
            assert torch.equal(target, item["target"]), item["filename"]
        else:
            assert torch.equal(target > 0, item["target"] > 0)
            assert (target - item["target"]).abs().max() <= 0.004
        params = epoch_slice.params.subset(clip).values
        assert int(params["shift"][0]) == item["shift_samples"], item["filename"]
        # The original's batch of 10 s clips: 1001 frames of its front end (written out, not our constant).
        time_mask = _original_mask(item["rand_value"], item["rand_min_value"], 1001, 192)
        freq_mask = _original_mask(item["rand_value"], item["rand_min_value"], 64, 24)
        assert (int(params["time_start"][0, 0]), int(params["time_width"][0, 0])) == time_mask
        assert (int(params["freq_start"][0, 0]), int(params["freq_width"][0, 0])) == freq_mask


def test_float16_values_are_the_released_bits_and_int8_is_extracts_quantization(
    stores: dict[str, str],
) -> None:
    f16, i8 = LogitStore.open(stores["f16"]), LogitStore.open(stores["i8"])
    audio = AudioStore.open(stores["by_file"])
    f16_values = np.asarray(zarr.open_group(stores["f16"], mode="r")["topk_values"][:])
    i8_values = np.asarray(zarr.open_group(stores["i8"], mode="r")["topk_values"][:])
    seeds = f16.read_extra(LEGACY_SEEDS)
    for h5_path in sorted(CHUNK.glob("*.h5")):
        epoch = int(h5_path.name.split("_ep")[1].split("_")[0]) - 1
        names = parquet.read_table(h5_path.with_suffix(".parquet")).column("filename").to_pylist()
        with h5py.File(h5_path, "r") as h5:
            values, indexes = h5["topk_values"][:], h5["topk_indexes"][:]
            released_seeds = h5["seeds"][:]
        for row, name in enumerate(names):
            clip = _clip_index(audio, name)
            order = np.argsort(-values[row].astype(np.float32), kind="stable")
            assert (
                f16_values[epoch, clip].view(np.uint16).tolist()
                == values[row][order].view(np.uint16).tolist()
            )
            assert np.array_equal(f16.read(epoch, clip)[0], indexes[row][order].astype(np.int64))
            assert np.array_equal(
                i8_values[epoch, clip], quantize(values[row][order].astype(np.float32), "int8")
            )
            assert seeds[epoch, clip] == released_seeds[row]
    assert f16.read_epoch(0).params == i8.read_epoch(0).params
    assert f16.read_extra("has_targets").all() and f16.read_epoch(2).has_targets.all()
    assert AugmentRecipe() == LEGACY_RECIPE  # the paper's recipe is the project's default
    assert f16.recipe == LEGACY_RECIPE and f16.attrs["extra_arrays"] == {
        LEGACY_SEEDS: "int32",
        "has_targets": "uint8",
    }
    provenance = f16.attrs["provenance"]
    assert {f["name"] for f in provenance["files"]} == {p.name for p in CHUNK.iterdir()}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in provenance["files"])


def test_the_students_spectrogram_is_the_originals(stores: dict[str, str]) -> None:
    """`augmented_spectrogram` with the CED front end, fed the imported parameters through the batch path
    (`to_torch`/`from_torch`), equals the original's for the 4 reference seeds.

    The padded two-clip batch also matches here, though the original takes the dB floor (120 dB below the
    maximum) over the whole batch and our front end per clip: row 1 (20-25 s) holds the batch's loudest bin
    (34.68 dB against row 0's 34.03), so both floors are the same. Had row 0 been louder by d dB, the
    original would floor row 1's padding and quiet bins d dB higher than we do; a clip's own spectrogram
    never depends on its neighbours here (a property `extract` and the student rely on).
    """
    reference = torch.load(LEGACY / "legacy_replay.pt", weights_only=False)["mels"]
    front_end = create_ced("ced_tiny", depth=1).front_end
    from ced_lightning.core.audio import load_audio

    audio = load_audio(str(LONG_WAV))
    for seed in (0, 1, 42, 1234):
        params = legacy_augment_params(np.array([seed]), np.array([160_000]))
        params = AugmentParams.from_torch(params.to_torch())
        mel = augmented_spectrogram(
            front_end, audio[None, :160_000], torch.tensor([160_000]), params, LEGACY_RECIPE
        )
        expected = reference[f"seed{seed}.0-10s"]
        difference = (mel[0] - expected).abs().max().item()
        # The original's kernels, not ours: within float32 rounding of the front end's sums (1.95e-3 dB
        # at these spectrograms' 34-38 dB peaks); a wrong shift, mask or floor moves bins by whole dB.
        assert difference <= float32_bound(expected, FRONT_END_SUMS), (seed, difference)

    batch = torch.zeros(2, 160_000)
    batch[0], batch[1, :80_000] = audio[:160_000], audio[-80_000:]
    row0 = {"shift": [0], "time_start": [[0]], "time_width": [[0]], "freq_start": [[0]], "freq_width": [[0]]}
    params = AugmentParams.concatenate(
        [
            AugmentParams({k: np.array(v) for k, v in row0.items()}),
            legacy_augment_params(np.array([42]), np.array([80_000])),
        ]
    )
    mel = augmented_spectrogram(front_end, batch, torch.tensor([160_000, 80_000]), params, LEGACY_RECIPE)
    expected = reference["seed42.20-25s.padded_batch_row1"]
    difference = (mel[1] - expected).abs().max().item()
    assert difference <= float32_bound(expected, FRONT_END_SUMS), difference


def _seed_masking_past(length: int) -> int:
    frames = 1 + length // 160
    return next(
        s
        for s in range(10_000)
        if legacy_augment_params(np.array([s]), np.array([length])).values["time_start"][0, 0] > frames
    )


def test_a_time_mask_past_a_short_clips_end_lands_in_its_padding(
    tmp_path: Path, stores: dict[str, str]
) -> None:
    """The 7.5 s clip with a seed whose time mask starts past its 751 frames: stored as drawn (not clipped to
    the clip) and applied by the student to the zero padding of its 10 s row, as the original does."""
    release = _copy_release(tmp_path)
    seed = _seed_masking_past(120_000)
    names = parquet.read_table(release / "logits_ep1_0.parquet").column("filename").to_pylist()
    _edit_h5(release / "logits_ep1_0.h5", "seeds", names.index(f"{SHORT_CLIP}.wav"), seed)
    store = _import(release, stores["by_file"], tmp_path / "logits.zarr")
    audio = AudioStore.open(stores["by_file"])
    clip = audio.names.index(SHORT_CLIP)
    params = store.read_epoch(0).params.subset(np.array([clip]))
    start, width = int(params.values["time_start"][0, 0]), int(params.values["time_width"][0, 0])
    expected = legacy_augment_params(np.array([seed]), np.array([120_000])).values
    assert (start, width) == (expected["time_start"][0, 0], expected["time_width"][0, 0])
    assert start > 751 and width > 0 and start + width <= LEGACY_BATCH_FRAMES

    # The student's path: the clip packed into a 10 s row, the stored parameters through the batch.
    waveform, lengths = pack_clips(audio.read_clips(clip, clip + 1), store.clip_samples)
    waveform = torch.from_numpy(waveform.astype(np.float32) / 32768.0)
    front_end = create_ced("ced_tiny", depth=1).front_end
    plain = front_end(waveform)
    mel = augmented_spectrogram(
        front_end,
        waveform,
        torch.from_numpy(lengths),
        AugmentParams.from_torch(params.to_torch()),
        store.recipe,
    )
    masked_frames = (mel[0] == 0.0).all(0)
    freq_rows = (mel[0] == 0.0).all(1)
    assert masked_frames[start : start + width].all() and not masked_frames[:start].any()
    assert (plain[0, :, start : start + width] < 0).all()  # the padding's floor, now masked to 0 dB
    assert freq_rows.sum() == int(params.values["freq_width"][0, 0])


# ------------------------------------------------------------------------------------- resume and refusals


def test_an_interrupted_import_finishes_identically(tmp_path: Path, stores: dict[str, str]) -> None:
    """Two blocks imported, a third left half-written as a kill leaves it (data without its flag, a zarr
    temporary file): the rerun gives the store an uninterrupted run gives, bit for bit."""
    straight, resumed = tmp_path / "straight.zarr", tmp_path / "resumed.zarr"
    _import(CHUNK, stores["by_file"], straight, block_clips=1)
    _import(CHUNK, stores["by_file"], resumed, block_clips=1, limit_blocks=2)
    assert LogitStore.open(str(resumed)).missing_blocks() == [2, 3]
    group = zarr.open_group(str(resumed), mode="r+")
    group["topk_indices"][:, 2] = 7
    group[LEGACY_SEEDS][:, 2] = -1
    leftover = resumed / "topk_values" / "c" / ("0.2.0." + "0" * 32 + ".partial")
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"torn")
    _import(CHUNK, stores["by_file"], resumed, block_clips=1)
    assert not leftover.exists()
    a, b = _store_arrays(str(straight)), _store_arrays(str(resumed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    attrs_a = dict(zarr.open_group(str(straight), mode="r").attrs)
    attrs_b = dict(zarr.open_group(str(resumed), mode="r").attrs)
    assert attrs_a == attrs_b
    stats = json.loads((resumed / STATS_FILE).read_text())
    assert stats["clips_imported"] == 2 and stats["complete"]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_equals_uninterrupted(tmp_path: Path, stores: dict[str, str]) -> None:
    """The real command killed with SIGKILL after its first block (the next one possibly half written), then
    run again: the store an uninterrupted run gives."""
    straight, killed = tmp_path / "straight.zarr", tmp_path / "killed.zarr"
    _import(CHUNK, stores["by_file"], straight, block_clips=1)
    args = [
        f"source={CHUNK}",
        f"audio_store={stores['by_file']}",
        f"output={killed}",
        "block_clips=1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    proc = subprocess.Popen(
        command("import_logits", *args, "throttle_s=2.0"),
        env=command_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                if zarr.open_group(str(killed), mode="r")["block_done"][:].sum() >= 1:
                    break
            except Exception:  # the store is not created yet
                continue
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 1 <= 4 - len(LogitStore.open(str(killed)).missing_blocks()) < 4
    rerun = run_command("import_logits", *args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a, b = _store_arrays(str(straight)), _store_arrays(str(killed))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_clip_of_another_length_keeps_the_originals_shift(tmp_path: Path) -> None:
    """A download whose clip is 9 s where the release read 10 s: the shift is still the original's draw
    (made on the 10 s the original read, as the original reader's output says), and the report counts it."""
    import soundfile

    audio_dir = tmp_path / "audio"
    shutil.copytree(RELEASE / "audio", audio_dir)
    clip = "--04kMEQOAs_0.000_10.000"
    samples, rate = soundfile.read(audio_dir / f"{clip}.wav", dtype="int16")
    soundfile.write(audio_dir / f"{clip}.wav", samples[: 9 * rate], rate, subtype="PCM_16")
    audio = _prepare(audio_dir, tmp_path / "audio.zarr")
    store = _import(CHUNK, audio, tmp_path / "logits.zarr")
    stats = json.loads((Path(store.url) / STATS_FILE).read_text())
    assert stats["length_mismatches"] == 1 and stats["length_mismatch_examples"] == [
        f"{clip}: 160000 released, 144000 here"
    ]
    index = AudioStore.open(audio).names.index(clip)
    expected = torch.load(RELEASE / "original_reader_outputs.pt", weights_only=False)
    for item in expected:
        if item["filename"] == f"{clip}.wav":
            shift = store.read_epoch(item["file_epoch"] - 1).params.values["shift"][index]
            assert shift == item["shift_samples"]


def test_other_data_is_refused_naming_what_differs(tmp_path: Path, stores: dict[str, str]) -> None:
    out = tmp_path / "logits.zarr"
    _import(CHUNK, stores["by_file"], out)
    with pytest.raises(ValueError, match=r"quantization: stored"):
        _import(CHUNK, stores["by_file"], out, quantization="int8")
    changed = _copy_release(tmp_path)
    _edit_h5(changed / "logits_ep3_0.h5", "seeds", 0, 12345)
    with pytest.raises(ValueError, match=r"teachers: stored"):
        _import(changed, stores["by_file"], out)
    with pytest.raises(ValueError, match=r"audio_fingerprint: stored"):
        _import(CHUNK, stores["by_ytid"], out)


def test_a_second_writer_is_refused(tmp_path: Path, stores: dict[str, str]) -> None:
    out = tmp_path / "logits.zarr"
    with store_lock(str(out), "extract"), pytest.raises(StoreLockedError):
        _import(CHUNK, stores["by_file"], out)
    assert not out.exists()


def test_unmatched_rows_are_refused_unless_allowed_and_then_reported(tmp_path: Path) -> None:
    audio_dir = tmp_path / "audio"
    shutil.copytree(RELEASE / "audio", audio_dir)
    (audio_dir / f"{SHORT_CLIP}.wav").unlink()
    audio = _prepare(audio_dir, tmp_path / "three.zarr")
    with pytest.raises(LegacyImportError, match=rf"3 of 12 released rows match no clip.*{SHORT_CLIP}"):
        _import(CHUNK, audio, tmp_path / "refused.zarr")
    assert not (tmp_path / "refused.zarr").exists()
    store = _import(CHUNK, audio, tmp_path / "logits.zarr", allow_unmatched_rows=True)
    stats = json.loads((Path(store.url) / STATS_FILE).read_text())
    assert (stats["rows"], stats["matched_rows"], stats["unmatched_rows"]) == (12, 9, 3)
    assert all(SHORT_CLIP in example for example in stats["unmatched_examples"])
    assert store.num_clips == 3 and store.is_complete()


def _drop_row(release: Path, stem: str, filename: str) -> None:
    """Rewrite one rank's h5 and parquet without the row of `filename`."""
    table = parquet.read_table(release / f"{stem}.parquet")
    keep = np.array([name != filename for name in table.column("filename").to_pylist()])
    parquet.write_table(table.filter(pyarrow.array(keep)), release / f"{stem}.parquet")
    with h5py.File(release / f"{stem}.h5", "r") as h5:
        data = {key: h5[key][:][keep] for key in h5}
    with h5py.File(release / f"{stem}.h5", "w") as h5:
        for key, value in data.items():
            h5.create_dataset(key, data=value)


def test_clips_without_rows_are_refused_unless_allowed_and_then_sit_out(tmp_path: Path) -> None:
    """A clip the release never saw and one missing from stored epoch 1: refused by default, naming them;
    with allow_clips_without_rows=true the store marks them (has_targets) and the student's epoch 0 plan
    holds every other clip and not these two."""
    from ced_lightning.data.distill import DistillDataModule

    audio_dir = tmp_path / "audio"
    shutil.copytree(RELEASE / "audio", audio_dir)
    shutil.copyfile(LONG_WAV, audio_dir / "zzzzzzzzzzz_0.000_10.000.wav")
    audio = _prepare(audio_dir, tmp_path / "five.zarr")
    release = _copy_release(tmp_path)
    _drop_row(release, "logits_ep1_0", f"{SHORT_CLIP}.wav")
    with pytest.raises(
        LegacyImportError,
        match=r"1 clips of the audio store have no row .* and 1 have rows in only some epochs",
    ):
        _import(release, audio, tmp_path / "refused.zarr")
    store = _import(release, audio, tmp_path / "logits.zarr", allow_clips_without_rows=True)
    names = AudioStore.open(audio).names
    never, sometimes = names.index("zzzzzzzzzzz_0.000_10.000"), names.index(SHORT_CLIP)
    has_targets = store.read_extra("has_targets")
    assert has_targets[:, never].tolist() == [0, 0, 0] and has_targets[:, sometimes].tolist() == [0, 1, 1]
    assert has_targets.sum() == 15 - 4
    assert store.read_epoch(1).has_targets.tolist() == [i != never for i in range(5)]
    stats = json.loads((Path(store.url) / STATS_FILE).read_text())
    assert (stats["clips_without_rows"], stats["clips_with_rows_in_some_epochs"]) == (1, 1)
    assert stats["clip_epochs_without_rows"] == 4

    data = DistillDataModule(train=audio, logits=store.url, batch_size=1, num_workers=0, shuffle_window=4)
    seen = [int(i) for batch in data.train_dataloader() for i in batch["index"]]
    assert sorted(seen) == sorted(set(range(5)) - {never, sometimes})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("parquet", "end", 0, 10.5),
            r"spanning more than 10 s: 1 \(logits_ep1_0.h5 row 0 -0DdlOuIFUI.*allow_long_rows=true",
        ),
        (
            ("parquet", "filename", 1, "-0DdlOuIFUI_50.000.wav"),
            r"same span in one epoch: 1 \(logits_ep1_0.h5 row 1 -0DdlOuIFUI.*allow_repeated_rows=true",
        ),
        (("h5", "topk_indexes", 2, 527), r"logits_ep1_0.h5 row 2: class indices .* outside 0..526"),
        (("h5", "topk_indexes", 3, -1), r"logits_ep1_0.h5 row 3: class indices .* outside 0..526"),
    ],
)
def test_rows_the_store_cannot_hold_are_refused_naming_them(
    tmp_path: Path, stores: dict[str, str], edit: tuple, message: str
) -> None:
    release = _copy_release(tmp_path)
    kind, key, row, value = edit
    if kind == "parquet":
        _edit_parquet(release / "logits_ep1_0.parquet", key, row, value)
    else:
        with h5py.File(release / "logits_ep1_0.h5", "r+") as h5:
            h5[key][row, 5] = value
    with pytest.raises(LegacyImportError, match=message):
        _import(release, stores["by_file"], tmp_path / "logits.zarr")


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)  # what `import h5py` sees when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'ced-lightning\[import\]'"):
        require_import_extra()


def test_an_incomplete_release_is_refused(tmp_path: Path, stores: dict[str, str]) -> None:
    release = _copy_release(tmp_path)
    (release / "logits_ep2_1.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"logits_ep2_1.h5 has no logits_ep2_1.parquet"):
        _import(release, stores["by_file"], tmp_path / "a.zarr")
    release = _copy_release(tmp_path / "second")
    for name in ("logits_ep2_0", "logits_ep2_1"):
        (release / f"{name}.h5").unlink()
        (release / f"{name}.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing epoch\(s\) \[2\]"):
        _import(release, stores["by_file"], tmp_path / "b.zarr")


# ------------------------------------------------------------------------------------------- the student


def test_the_paper_recipe_trains_an_epoch_from_the_imported_store(
    stores: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`experiment=paper_ced_tiny` through the real train entry point on the CPU, from the imported store
    (named by YouTube id, as prepare names a segment CSV), offline: its MAE start `ced_tiny_mae` comes from
    the torch.hub cache, where a download would have put it (here an encoder without a head, as an MAE
    file is; one block instead of twelve to stay fast)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ced_lightning.engines.training import train
    from ced_lightning.models.released import RELEASED

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = {
        k: v for k, v in create_ced("ced_tiny", depth=1).state_dict().items() if "outputlayer" not in k
    }
    mae_file = RELEASED["ced_tiny_mae"].torch_cache_path
    mae_file.parent.mkdir(parents=True)
    torch.save({"model": encoder}, mae_file)

    overrides = [
        "experiment=paper_ced_tiny",
        "+model.depth=1",
        f"data.train={stores['by_ytid']}",
        f"data.val={stores['by_ytid']}",
        f"data.test={stores['by_ytid']}",
        f"data.logits={stores['i8']}",
        "data.batch_size=2",
        "data.eval_batch_size=2",
        "data.num_workers=0",
        "data.schedule.val_every=1",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.progress_bar=null",
        "callbacks.early_stopping=null",
        "test=false",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    assert (cfg.model.init_from, cfg.distill.loss, cfg.data.name) == ("ced_tiny_mae", "bce", "audioset")
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.warns(UserWarning, match="instead of the paper's 8-bit Adam"):
        metrics = train(cfg)
    assert "val/mAP" in metrics
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # 4 clips in batches of 2: one epoch is two optimiser steps on the imported targets.
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 2)
    # optim=paper's schedule: the original's warm-up from 0, lr·i/(W - 1) at step i (ours: lr·(i + 1)/W)
    assert checkpoint["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(1e-3 * 2 / 62_499, rel=1e-9)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    # The student started from the cached MAE encoder: its first step moved the weights only by lr-sized
    # steps (warm-up: lr 1e-3 / 62,500 per step), so they are still those of the file.
    start = encoder["patch_embed.proj.weight"]
    trained = next(v for k, v in checkpoint["state_dict"].items() if k.endswith("patch_embed.proj.weight"))
    assert torch.allclose(trained, start, atol=1e-5)
    assert not torch.allclose(create_ced("ced_tiny", depth=1).state_dict()["patch_embed.proj.weight"], start)


def test_extra_arrays_are_written_with_their_block_and_checked(tmp_path: Path) -> None:
    """`write_block(extra=)` refuses a missing or misshapen extra array before anything is written, and a
    store without extras (every store written before them) keeps reading as before."""
    common = {
        "audio_fingerprint": "f",
        "audio_url": "a",
        "teachers": [{"name": "t", "sha256": "0"}],
        "combine": "mean_prob",
    }
    layout = LogitStoreLayout(
        num_clips=3,
        epochs=2,
        topk=2,
        num_classes=5,
        quantization="float16",
        recipe=LEGACY_RECIPE,
        clip_samples=160_000,
        block_clips=3,
    )
    seeded = dataclasses.replace(layout, extra_arrays={"legacy_seeds": "int32"})
    store = LogitStore.create(str(tmp_path / "x.zarr"), seeded, seed=None, **common)
    indices = np.tile(np.array([[0, 1]]), (2, 3, 1))
    probs = np.full((2, 3, 2), 0.5, dtype=np.float32)
    params = [legacy_augment_params(np.arange(3), np.full(3, 160_000))] * 2
    with pytest.raises(ValueError, match=r"extra arrays \[\], the store has \['legacy_seeds'\]"):
        store.write_block(0, indices, probs, params)
    with pytest.raises(ValueError, match=r"extra array 'legacy_seeds' of shape \(3,\)"):
        store.write_block(0, indices, probs, params, extra={"legacy_seeds": np.arange(3)})
    assert store.missing_blocks() == [0]
    seeds = np.arange(6).reshape(2, 3)
    store.write_block(0, indices, probs, params, extra={"legacy_seeds": seeds})
    reopened = LogitStore.open(store.url)
    assert np.array_equal(reopened.read_extra("legacy_seeds"), seeds) and reopened.seed is None

    plain = LogitStore.create(str(tmp_path / "plain.zarr"), layout, seed=7, **common)
    plain.write_block(0, indices, probs, params)
    plain = LogitStore.open(plain.url)
    assert plain.extra_arrays == {} and plain.seed == 7 and "provenance" not in plain.attrs
    assert "extra_arrays" not in plain.attrs and plain.is_complete()


def test_plan_epoch_leaves_out_clips_it_is_told_to_and_keeps_ranks_equal() -> None:
    from ced_lightning.data.stream import plan_epoch

    keep = np.ones(100, dtype=bool)
    keep[[3, 17, 18, 64, 99]] = False
    plans = [
        plan_epoch(100, 4, seed=0, epoch=1, rank=r, world_size=2, span_clips=8, shuffle_window=16, keep=keep)
        for r in range(2)
    ]
    clips = [np.concatenate([b for w in p.windows for b in w]) for p in plans]
    assert plans[0].num_batches == plans[1].num_batches
    every = np.concatenate(clips)
    assert len(set(every.tolist())) == len(every) and not (set(every.tolist()) & {3, 17, 18, 64, 99})
    assert len(every) >= 95 - 2 * 4 - 8  # at most a batch per rank and a span's imbalance left out
    with pytest.raises(ValueError, match="keep must be a bool mask of the 100 clips"):
        plan_epoch(100, 4, seed=0, epoch=1, keep=keep[:50])


def test_credentials_in_the_source_url_stay_out_of_the_store_and_the_report(
    tmp_path: Path, stores: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A release read through a URL with credentials: the store's attributes, its stats file and the printed
    report hold it redacted (all three held it verbatim before)."""
    import fsspec

    secret = "s3cretValue"
    fs = fsspec.filesystem("memory")
    fs.put(str(CHUNK), f"/AKIAKEY:{secret}@bucket/chunk_10", recursive=True)
    out = tmp_path / "from_url.zarr"
    _import(f"memory://AKIAKEY:{secret}@bucket/chunk_10", stores["by_file"], out)
    said = capsys.readouterr().out
    kept = (out / "zarr.json").read_text() + (out / STATS_FILE).read_text()
    assert "memory://***@bucket/chunk_10" in kept
    assert secret not in kept and secret not in said


# ------------------------------------------------------------------------------------ damaged source files


@pytest.mark.parametrize("suffix", ["h5", "parquet"])
def test_a_truncated_file_is_named_with_the_epoch_and_rank_it_held(
    tmp_path: Path, stores: dict[str, str], suffix: str
) -> None:
    """Before: a truncated h5 file gave h5py's 'truncated file: eof = ...' naming no file, a truncated parquet
    pyarrow's "'<Buffer>'": in a release of hundreds of files the user could not tell which one."""
    release = _copy_release(tmp_path)
    damaged = release / f"logits_ep2_1.{suffix}"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    with pytest.raises(LegacyImportError) as refused:
        _import(release, stores["by_file"], tmp_path / "refused.zarr")
    message = str(refused.value)
    assert message.startswith(f"{damaged} (epoch 2, rank 1): cannot read it (")
    assert message.endswith("the file is damaged or truncated: copy it again from the release")
    assert "\n" not in message
    assert not (tmp_path / "refused.zarr").exists()


def test_a_truncated_file_fails_the_command_naming_it(tmp_path: Path, stores: dict[str, str]) -> None:
    release = _copy_release(tmp_path)
    damaged = release / "logits_ep3_0.h5"
    damaged.write_bytes(damaged.read_bytes()[:100])
    done = run_command(
        "import_logits", f"source={release}", f"audio_store={stores['by_file']}",
        f"output={tmp_path / 'out.zarr'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"{damaged} (epoch 3, rank 0): cannot read it (OSError: " in done.stdout + done.stderr
