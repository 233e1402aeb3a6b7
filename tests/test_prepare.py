from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import zarr
from omegaconf import OmegaConf

from ced_lightning.core.labels import audioset_classes
from ced_lightning.data.sources import (
    SourceItem,
    from_directory,
    from_file_list,
    from_segment_csv,
    read_segment_csv,
    read_source,
)
from ced_lightning.prepare import PrepareError, prepare_store, run_prepare, summarize
from ced_lightning.store.audio import AudioStore
from conftest import command, command_env, run_command

SEGMENTS = Path(__file__).parent / "data" / "prepare" / "balanced_train_segments_excerpt.csv"
REPO = Path(__file__).resolve().parents[1]


def tone(freq: float, seconds: float, sr: int, channels: int = 1, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wave = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([wave] * channels, axis=1) if channels > 1 else wave


def write_wav(path: Path, seconds: float = 0.25, freq: float = 440.0, sr: int = 16000, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(freq, seconds, sr, **kw), sr)
    return path


def small(store_kw: dict | None = None) -> dict:
    return {"chunk_samples": 1024, "shard_chunks": 2, **(store_kw or {})}


# -- sources ---------------------------------------------------------------------------------------------
def test_directory_source_recursive_sorted(tmp_path: Path) -> None:
    write_wav(tmp_path / "b" / "two.wav")
    write_wav(tmp_path / "a.flac")
    write_wav(tmp_path / "b" / "c" / "three.ogg")
    (tmp_path / "notes.txt").write_text("not audio")
    sources = from_directory(tmp_path)
    assert [i.name for i in sources.items] == ["a", "b/c/three", "b/two"]
    assert all(Path(i.path).is_file() and i.labels is None for i in sources.items)
    assert sources.class_list is None
    with pytest.raises(FileNotFoundError, match="not a directory"):
        from_directory(tmp_path / "b" / "c" / "three.ogg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no audio files"):
        from_directory(empty)


def test_directory_source_survives_symlink_loops(tmp_path: Path) -> None:
    # os.walk(followlinks=True) alone never ends on a loop; a folder linked twice is also read once.
    write_wav(tmp_path / "a" / "one.wav")
    (tmp_path / "a" / "back").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "z_again").symlink_to(tmp_path / "a", target_is_directory=True)
    assert [i.name for i in from_directory(tmp_path).items] == ["a/one"]


def test_file_list_tsv_csv_labels(tmp_path: Path) -> None:
    write_wav(tmp_path / "clips" / "x.wav")
    absolute = write_wav(tmp_path / "elsewhere" / "y.flac")
    tsv = tmp_path / "list.tsv"
    tsv.write_text(f"filename\tlabels\nclips/x.wav\t/m/09x0r;/m/05zppz\n{absolute}\t3\n")
    sources = from_file_list(tsv)
    assert sources.items[0].name == "clips/x"
    assert sources.items[0].labels == [0, 1] and sources.items[1].labels == [3]
    assert sources.items[0].path == str(tmp_path / "clips" / "x.wav") and sources.items[1].path == str(
        absolute
    )
    assert len(sources.class_list) == 527

    csv_list = tmp_path / "list.csv"
    csv_list.write_text('filename,labels\nclips/x.wav,"0,2"\n')
    assert from_file_list(csv_list).items[0].labels == [0, 2]
    unquoted = tmp_path / "unquoted.csv"  # labels last and not quoted: every one of them is kept
    unquoted.write_text("filename,labels\nclips/x.wav,/m/09x0r,/m/05zppz,3\n")
    assert from_file_list(unquoted).items[0].labels == [0, 1, 3]
    extra = tmp_path / "extra.csv"  # extra fields with labels not last: refused, naming the line
    extra.write_text("labels,filename\n0,clips/x.wav,oops\n")
    with pytest.raises(ValueError, match=r"extra\.csv:2: 3 fields for 2 columns"):
        from_file_list(extra)
    plain = tmp_path / "plain.csv"
    plain.write_text("filename\nclips/x.wav\n")
    assert read_source(plain).items[0].labels is None
    bad = tmp_path / "bad.csv"
    bad.write_text("file,labels\nclips/x.wav,0\n")
    with pytest.raises(ValueError, match="filename"):
        from_file_list(bad)
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("filename,labels\nclips/x.wav,/m/nope\n")
    with pytest.raises(ValueError, match=r"unknown\.csv:2.*/m/nope"):
        from_file_list(unknown)


def test_file_list_labels_by_display_name(tmp_path: Path) -> None:
    """Before: a display name was refused with the hint "pass class_labels=", also when class_labels was
    passed. Display names are read whole, a comma inside one included."""
    write_wav(tmp_path / "clips" / "x.wav")
    names = tmp_path / "names.csv"
    names.write_text('filename,labels\nclips/x.wav,"Speech;Male speech, man speaking;/m/09x0r"\n')
    speech, male = (
        audioset_classes().names.index("Speech"),
        audioset_classes().names.index("Male speech, man speaking"),
    )
    assert from_file_list(names).items[0].labels == [speech, male, speech]
    own = tmp_path / "own_classes.csv"
    own.write_text('index,mid,display_name\n0,/x/dog,Dog\n1,/x/cat,"Cat, house"\n')
    mine = tmp_path / "mine.csv"
    mine.write_text('filename,labels\nclips/x.wav,"Cat, house,Dog"\n')
    source = read_source(str(mine), class_labels=str(own))
    assert source.items[0].labels == [1, 0]
    mine.write_text("filename,labels\nclips/x.wav,Horse\n")
    with pytest.raises(ValueError) as refused:
        read_source(str(mine), class_labels=str(own))
    assert str(refused.value).endswith(
        "mine.csv:2: unknown class 'Horse': not an index, mid or display name of the class_labels list"
    )


def test_segment_csv_matches_download_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = read_segment_csv(SEGMENTS)
    assert len(rows) == 30 and rows[0][1:4] == ("--PJHxphWEs", "30.000", "40.000")
    assert rows[0][4] == ["/m/09x0r", "/t/dd00088"]
    audio = tmp_path / "audio"
    names = {
        "--PJHxphWEs": audio / "Y--PJHxphWEs.wav",
        "--ZhevVpy1s": audio / "sub" / "--ZhevVpy1s_50.000.flac",
        "--aE2O5G5WE": audio / "--aE2O5G5WE_0.000_10.000.wav",
        "--aO5cdqSAg": audio / "--aO5cdqSAg_30.wav",
        "--aaILOrkII": audio / "Y--aaILOrkII_200_210.ogg",
    }
    for path in names.values():
        write_wav(path)
    write_wav(audio / "unrelated.wav")
    mids = audioset_classes().index_of_mid()
    with caplog.at_level(logging.WARNING):
        sources = read_source(SEGMENTS, audio_dir=audio)
    assert sources.kind == "audioset_segments"
    assert [i.name for i in sources.items] == list(names)
    assert [i.path for i in sources.items] == [str(p) for p in names.values()]
    assert sources.items[0].labels == [mids["/m/09x0r"], mids["/t/dd00088"]]
    assert len(sources.unmatched) == 25
    assert "25 of 30 segment rows have no audio file" in caplog.text and "--cB2ZVjpnA" in caplog.text

    bad = tmp_path / "bad_segments.csv"
    bad.write_text(
        '# YTID, start_seconds, end_seconds, positive_labels\nabc, 0.000, 10.000, "/m/09x0r,/m/zzz"\n'
    )
    with pytest.raises(ValueError, match=r"bad_segments\.csv:2 \(abc\).*'/m/zzz'"):
        from_segment_csv(bad, audio)
    with pytest.raises(ValueError, match="audio_dir"):
        read_source(SEGMENTS)


# -- decoding and writing --------------------------------------------------------------------------------
def make_bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bad = {}
    bad["garbage"] = folder / "garbage.wav"
    bad["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    bad["empty"] = folder / "empty.wav"
    bad["empty"].write_bytes(b"")
    whole = write_wav(folder / "whole.tmp.wav", seconds=0.5).read_bytes()
    (folder / "whole.tmp.wav").unlink()
    bad["truncated"] = folder / "truncated.wav"
    bad["truncated"].write_bytes(whole[: len(whole) // 2])
    bad["text"] = folder / "text.wav"
    bad["text"].write_text("this is not audio\n" * 20)
    nan = tone(440, 0.2, 16000)
    nan[100] = np.nan
    bad["nan"] = folder / "nan.wav"
    sf.write(bad["nan"], nan, 16000, subtype="FLOAT")
    inf = tone(440, 0.2, 16000)
    inf[5] = np.inf
    bad["inf"] = folder / "inf.wav"
    sf.write(bad["inf"], inf, 16000, subtype="FLOAT")
    bad["zero"] = folder / "zero.wav"
    sf.write(bad["zero"], np.zeros(3200, np.float32), 16000)
    return bad


def test_bad_files_are_skipped_and_reported(tmp_path: Path) -> None:
    bad = make_bad_files(tmp_path / "in")
    good = [write_wav(tmp_path / "in" / f"good{k}.wav", freq=300 + 100 * k) for k in range(3)]
    sources = from_directory(tmp_path / "in")
    store = prepare_store(sources.items, tmp_path / "s.zarr", workers=0, **small())
    assert sorted(store.names) == [p.stem for p in good]
    reasons = {Path(f["path"]).stem: f["reason"] for f in store.failures()}
    assert set(reasons) == set(bad)
    assert "truncated" in reasons["truncated"] and "NaN or inf" in reasons["nan"]
    assert "NaN or inf" in reasons["inf"] and "all zeros" in reasons["zero"]
    assert all(str(bad[k]) in reasons[k] for k in bad)
    summary = summarize(store)
    assert summary["clips_written"] == 3 and summary["failed"] == len(bad) and summary["skipped"] == 0
    assert summary["size_bytes"] > 0 and summary["hours"] == pytest.approx(3 * 0.25 / 3600)

    with pytest.raises(PrepareError, match="strict"):
        prepare_store(sources.items, tmp_path / "strict.zarr", strict=True, **small())
    assert len(AudioStore.open(tmp_path / "strict.zarr")) == 3  # still written, with its report
    only_bad = [SourceItem(k, str(p)) for k, p in bad.items()]
    with pytest.raises(ValueError, match="no clip could be written"):
        prepare_store(only_bad, tmp_path / "none.zarr", **small())


def test_duplicates_skipped_and_workers_match_inline(tmp_path: Path) -> None:
    paths = [
        write_wav(tmp_path / "in" / f"c{k}.wav", seconds=0.1 + 0.05 * k, freq=200 + 50 * k) for k in range(6)
    ]
    items = [SourceItem(f"c{k}", str(p), [k % 3]) for k, p in enumerate(paths)]
    items.append(SourceItem("c1", str(paths[2]), [0]))
    classes = audioset_classes()
    inline = prepare_store(items, tmp_path / "a.zarr", class_list=classes, workers=0, **small())
    pooled = prepare_store(items, tmp_path / "b.zarr", class_list=classes, workers=2, **small())
    assert inline.names == [f"c{k}" for k in range(6)]
    assert [f["kind"] for f in inline.failures()] == ["skipped"]
    assert inline.fingerprint == pooled.fingerprint
    assert np.array_equal(inline.read_span(0, 6)[0], pooled.read_span(0, 6)[0])
    assert list(inline.labels(4)) == [1] and inline.num_classes == 527


@pytest.mark.parametrize(("sr", "channels"), [(8000, 1), (22050, 1), (44100, 2)])
def test_resampling_keeps_length_and_pitch(tmp_path: Path, sr: int, channels: int) -> None:
    freq, seconds = 1000.0, 1.0
    path = write_wav(tmp_path / "in" / "tone.wav", seconds=seconds, freq=freq, sr=sr, channels=channels)
    store = prepare_store([SourceItem("tone", str(path))], tmp_path / "s.zarr")
    wave = store.read(0).numpy()
    assert abs(len(wave) - 16000 * seconds) <= 1
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    peak = np.fft.rfftfreq(len(wave), 1 / 16000)[spectrum.argmax()]
    assert abs(peak - freq) <= 2.0
    assert np.abs(wave).max() == pytest.approx(0.5, abs=0.03)


# -- the command -----------------------------------------------------------------------------------------
def cli_config(tmp_path: Path, **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "prepare.yaml"))
    cfg.pop("defaults")
    cfg.update(overrides)
    return cfg


def test_kill_and_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    for k in range(24):
        write_wav(tmp_path / "in" / f"clip{k:02d}.wav", seconds=0.2 + 0.01 * k, freq=200 + 30 * k)
    args = {"input": str(tmp_path / "in"), "workers": 0, "chunk_samples": 1024, "shard_chunks": 2}
    reference = tmp_path / "reference.zarr"
    run_prepare(OmegaConf.create(cli_config(tmp_path, output=str(reference), **args)))

    out = tmp_path / "resumed.zarr"
    overrides = [f"{k}={v}" for k, v in args.items()] + [
        f"output={out}",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    proc = subprocess.Popen(
        command("prepare", *overrides, "throttle_s=0.1"),
        cwd=tmp_path,
        env=command_env(),
        stderr=subprocess.PIPE,
        text=True,
    )
    committed, deadline = 0, time.monotonic() + 90
    try:
        while committed < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:
                progress = dict(zarr.open_group(str(out), mode="r").attrs).get("progress")
            except Exception:  # the store is not there yet, or its metadata is being written
                continue
            committed = progress["clips"] if progress else 0
    finally:
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate()
    assert committed >= 4, f"no shard committed before the deadline; stderr:\n{stderr[-2000:]}"
    assert not dict(zarr.open_group(str(out), mode="r").attrs)["complete"]

    done = run_command("prepare", *overrides, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after" in done.stdout + done.stderr
    ref_group, out_group = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(out), mode="r")
    assert sorted(n for n, _ in ref_group.arrays()) == sorted(n for n, _ in out_group.arrays())
    for name, array in ref_group.arrays():
        assert np.array_equal(array[:], out_group[name][:]), name
    assert dict(ref_group.attrs) == dict(out_group.attrs)
    assert len(AudioStore.open(out)) == 24


def test_run_prepare_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input"):
        run_prepare(OmegaConf.create(cli_config(tmp_path, output=str(tmp_path / "s.zarr"))))
    with pytest.raises(ValueError, match="output"):
        run_prepare(OmegaConf.create(cli_config(tmp_path, input=str(tmp_path))))
    with pytest.raises(FileNotFoundError, match="missing"):
        run_prepare(OmegaConf.create(cli_config(tmp_path, input=str(tmp_path / "missing"), output="x.zarr")))


# -- dead decoding processes -----------------------------------------------------------------------------
# Runs `prepare` in a child Python whose decoder SIGKILLs its own process (as the out-of-memory killer would)
# on one named file: always, or only the first time (a marker file remembers). Only decoding processes die:
# the guard on the parent's pid keeps the command itself alive.
_KILLING_PREPARE = """
import os, signal, sys
from pathlib import Path
import ced_lightning.prepare as prepare

victim, marker, mode, parent = sys.argv[1], Path(sys.argv[2]), sys.argv[3], os.getpid()
real_load_audio = prepare.load_audio

def load_audio_or_die(path, *args, **kwargs):
    if os.getpid() != parent and Path(path).name == victim and not marker.exists():
        if mode == "once":
            marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_load_audio(path, *args, **kwargs)

prepare.load_audio = load_audio_or_die
sys.argv = ["prepare", *sys.argv[4:]]
prepare.main()
"""


def _assert_same_store(reference: Path, other: Path) -> None:
    ref_group, out_group = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(other), mode="r")
    assert sorted(n for n, _ in ref_group.arrays()) == sorted(n for n, _ in out_group.arrays())
    for name, array in ref_group.arrays():
        assert np.array_equal(array[:], out_group[name][:]), name
    assert dict(ref_group.attrs) == dict(out_group.attrs)


@pytest.fixture
def twenty_clips(tmp_path: Path) -> tuple[list[str], Path]:
    for k in range(20):
        write_wav(tmp_path / "in" / f"clip{k:02d}.wav", seconds=0.2 + 0.01 * k, freq=200 + 30 * k)
    args = {"input": str(tmp_path / "in"), "workers": 2, "chunk_samples": 1024, "shard_chunks": 2}
    reference = tmp_path / "reference.zarr"
    run_prepare(OmegaConf.create(cli_config(tmp_path, output=str(reference), **args)))
    return [f"{k}={v}" for k, v in args.items()] + [f"paths.log_dir={tmp_path / 'logs'}"], reference


def test_dead_decoder_names_the_file_and_the_rerun_resumes(tmp_path: Path, twenty_clips) -> None:
    """Before: `Pool.imap` waited forever for the killed worker's item (the run hung, nothing logged)."""
    overrides, reference = twenty_clips
    out = tmp_path / "out.zarr"
    killing = [sys.executable, "-c", _KILLING_PREPARE, "clip13.wav", str(tmp_path / "marker")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    died = subprocess.run(
        [*killing, "always", *overrides, f"output={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert died.returncode == 1, died.stderr[-3000:]
    log_text = died.stdout + died.stderr
    victim = tmp_path / "in" / "clip13.wav"
    assert (
        f"{victim}: a decoding process died with this file in flight, and again decoding it alone" in log_text
    )
    assert not dict(zarr.open_group(str(out), mode="r").attrs)["complete"]

    done = run_command("prepare", *overrides, f"output={out}", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after" in done.stdout + done.stderr  # the clips before clip13 were committed, and kept
    _assert_same_store(reference, out)


def test_decoder_killed_once_is_retried_and_the_store_completes(tmp_path: Path, twenty_clips) -> None:
    """Before: the same hang. A worker killed once (memory pressure) costs a retry, not the run."""
    overrides, reference = twenty_clips
    out = tmp_path / "out.zarr"
    killing = [sys.executable, "-c", _KILLING_PREPARE, "clip07.wav", str(tmp_path / "marker")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*killing, "once", *overrides, f"output={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "marker").exists()  # the kill did happen
    assert "a decoding process died" in done.stdout + done.stderr
    _assert_same_store(reference, out)


def test_decoded_clips_in_flight_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: `Pool.imap` decoded every file ahead of a slow consumer (all 40 here), holding their clips."""
    from ced_lightning import prepare

    paths = [write_wav(tmp_path / "in" / f"c{k:02d}.wav", seconds=0.05, freq=300 + 10 * k) for k in range(40)]
    marks = tmp_path / "marks"
    marks.mkdir()
    real_load_audio = prepare.load_audio

    def load_and_mark(path, *args, **kwargs):
        (marks / Path(path).name).touch()
        return real_load_audio(path, *args, **kwargs)

    monkeypatch.setattr(prepare, "load_audio", load_and_mark)  # inherited by the forked workers
    decoded = prepare._decoded([SourceItem(p.stem, str(p)) for p in paths], workers=2)
    first_samples, _ = next(decoded)
    time.sleep(1.0)  # a slow writer: the workers would keep decoding if nothing bounded them
    assert first_samples is not None
    assert len(list(marks.iterdir())) <= 1 + 2 * 2
    assert sum(1 for _ in decoded) == 39
    assert len(list(marks.iterdir())) == 40


# -- one decoder, one list of formats, nothing skipped without a word --------------------------------------
def test_short_clips_are_stored_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The short-clip rule at prepare time: stored as they are (models zero-pad them), counted and named.
    Before, a 200-sample clip was stored without a word (and crashed evaluation later)."""
    write_wav(tmp_path / "in" / "blip.wav", seconds=200 / 16000)
    write_wav(tmp_path / "in" / "tone.wav", seconds=0.5)
    with caplog.at_level(logging.WARNING, logger="ced_lightning.prepare"):
        store = prepare_store(from_directory(tmp_path / "in").items, tmp_path / "s.zarr", **small())
    assert store.names == ["blip", "tone"] and list(store.lengths) == [200, 8000]
    assert summarize(store)["short_clips"] == 1
    assert "1 clips are shorter than 1024 samples (64 ms), e.g. blip (200 samples)" in caplog.text


def test_every_format_predict_reads_is_prepared_and_skipped_files_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: `.aiff` (and every libsndfile format but four) was skipped silently; so were other files."""
    write_wav(tmp_path / "in" / "a.wav")
    sf.write(tmp_path / "in" / "b.aiff", tone(300.0, 0.25, 16000), 16000)
    sf.write(tmp_path / "in" / "c.caf", tone(500.0, 0.25, 16000), 16000)
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    (tmp_path / "in" / "._a.wav").write_bytes(b"AppleDouble")
    with caplog.at_level(logging.WARNING, logger="ced_lightning.data.sources"):
        items = from_directory(tmp_path / "in").items
    assert [i.name for i in items] == ["a", "b", "c"]
    assert "2 files are not audio files by their extension (or are dotfiles) and were skipped" in caplog.text
    assert str(tmp_path / "in" / "notes.txt") in caplog.text
    store = prepare_store(items, tmp_path / "s.zarr", **small())
    assert store.names == ["a", "b", "c"] and not store.failures()


def test_unreadable_folders_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: `os.walk` without `onerror` dropped a folder it could not list without a word. Tests run as
    root here, which reads any folder whatever its mode, so the folder is one whose path is longer than the
    system's limit (ENAMETOOLONG): a real listing error, reported by the same path as a permission error."""
    root = tmp_path / "in"
    write_wav(root / "a.wav")
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(20):  # 20 x 250 characters: past PATH_MAX (4096)
            os.mkdir("d" * 250, dir_fd=fd)
            next_fd = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    finally:
        os.close(fd)
    with caplog.at_level(logging.WARNING, logger="ced_lightning.data.sources"):
        items = from_directory(root).items
    assert [i.name for i in items] == ["a"]
    assert "1 folders could not be read and were skipped, e.g." in caplog.text
    assert "File name too long" in caplog.text


# -- decoding processes end with the command ---------------------------------------------------------------
def _children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is `pid`, read from /proc (psutil may not be installed)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended while we looked
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")
def test_decoding_workers_die_with_a_killed_prepare(tmp_path: Path) -> None:
    """Before: kill -9 of `prepare workers=2` left both decoding processes alive, reparented to pid 1."""
    for k in range(24):
        write_wav(tmp_path / "in" / f"clip{k:02d}.wav", seconds=0.2, freq=200 + 30 * k)
    overrides = [
        f"input={tmp_path / 'in'}", f"output={tmp_path / 'out.zarr'}", "workers=2", "chunk_samples=1024",
        "shard_chunks=2", "throttle_s=0.5", f"paths.log_dir={tmp_path / 'logs'}",
    ]  # fmt: skip
    # stderr to a file, not a pipe: surviving workers would hold a pipe open and hang the read.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            command("prepare", *overrides), cwd=tmp_path, env=command_env(), stderr=stderr
        )
    workers: set[int] = set()
    deadline = time.monotonic() + 90
    try:
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            workers = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stderr_text = (tmp_path / "stderr.txt").read_text()
    assert len(workers) >= 2, f"the decoding processes never started; stderr:\n{stderr_text[-2000:]}"
    gone_by = time.monotonic() + 5
    while any(map(_alive, workers)) and time.monotonic() < gone_by:
        time.sleep(0.05)
    survivors = [pid for pid in workers if _alive(pid)]
    for pid in survivors:  # do not leave them behind for the rest of the suite
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"decoding processes {survivors} outlived their killed parent"
