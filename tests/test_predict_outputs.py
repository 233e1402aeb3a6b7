"""Where predict's outputs may go and what its refusals say: never inside a Zarr store, an existing file the
command did not write kept unless asked, no silent no-op (no audio, windows that skip audio or are shorter
than one STFT window), a model name that is no file and no released name, an output that cannot be written
(one error, nothing empty left behind)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from ced_lightning import compose_config
from ced_lightning.core.errors import CedError
from ced_lightning.engines.inference import predict_files
from ced_lightning.predict import predict
from ced_lightning.store.audio_writer import write_audio_store

REFERENCE = Path(__file__).parent / "data" / "ced_reference" / "ced_tiny_depth2_random.pt"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "noise.wav"
    sf.write(path, 0.1 * np.random.default_rng(0).standard_normal(3 * 16000).astype(np.float32), 16000)
    return path


@pytest.fixture
def ced_predict(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str]]:
    """`ced-predict ARGS` in this process: (exit status, stderr). An error raised on purpose counts with the
    status it carries (`CedError.exit_code`), as the command reports it."""
    from ced_lightning.cli import predict_main

    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # keep the test's thread count

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            status = predict_main([*args, "--quiet"])
        except SystemExit as stopped:  # argparse's usage errors
            status = int(stopped.code)
        except CedError as err:
            return err.exit_code, capsys.readouterr().err + str(err)
        return status, capsys.readouterr().err

    return run


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_never_go_inside_a_store(tmp_path: Path, clip: Path) -> None:
    """Before: embeddings_format=zarr embeddings_output=<an audio store> wrote a group into the user's store,
    and an output file inside a chunk folder was accepted."""
    store = tmp_path / "audio.zarr"
    write_audio_store(str(store), [("a", np.zeros(16000, np.float32), [0])], class_names=["x", "y"])
    before = files_under(store)
    with pytest.raises(
        FileExistsError, match=rf"{store} holds another Zarr store, not a predict embeddings store"
    ):
        predict_files(
            str(REFERENCE), [clip], outputs=["embeddings"], embeddings_output=store, embeddings_format="zarr"
        )
    chunk_folder = next(p.parent for p in store.rglob("*") if p.is_file() and "/c/" in str(p))
    inside = chunk_folder / "tags.jsonl"
    with pytest.raises(FileExistsError, match=rf"{inside} lies inside the Zarr store or group at"):
        predict_files(str(REFERENCE), [clip], output=inside)
    with pytest.raises(FileExistsError, match="lies inside the Zarr store"):
        predict_files(str(REFERENCE), [clip], outputs=["embeddings"], embeddings_output=store / "emb")
    assert files_under(store) == before

    # A store of embeddings this command wrote is its own: a rerun replaces its groups.
    ours = tmp_path / "embeddings.zarr"
    for _ in range(2):
        predict_files(
            str(REFERENCE), [clip], outputs=["embeddings"], embeddings_output=ours, embeddings_format="zarr"
        )
    assert sorted(p.name for p in ours.iterdir() if p.is_dir()) == ["0000_noise"]


def test_an_existing_file_is_replaced_only_when_asked(tmp_path: Path, clip: Path, ced_predict) -> None:
    """Before: `ced-predict --output <a labelled file list>` replaced it without a word."""
    listing = tmp_path / "list.csv"
    listing.write_text("filename,labels\nnoise.wav,Speech\n")
    status, stderr = ced_predict(str(clip), "--model", str(REFERENCE), "--output", str(listing))
    assert status == 1
    assert (
        f"output={listing} exists and was not written by this command (its first line: 'filename,labels'); "
        "it is left as it is. To replace it pass --overwrite (ced-predict) or overwrite=true"
    ) in stderr
    assert listing.read_text() == "filename,labels\nnoise.wav,Speech\n"

    assert ced_predict(str(clip), "--model", str(REFERENCE), "--output", str(listing), "--overwrite")[0] == 0
    ours = listing.read_text()
    assert ours.startswith("file,start_s,end_s,rank,index,name,probability\n")
    # Its own earlier output: replaced by the same command.
    assert ced_predict(str(clip), "--model", str(REFERENCE), "--output", str(listing))[0] == 0
    assert listing.read_text() == ours

    # The Hydra predict: overwrite=false by default, overwrite=true replaces.
    tags = tmp_path / "notes.jsonl"
    tags.write_text("my notes\n")
    cfg = compose_config([f"ckpt={REFERENCE}", f"inputs=[{clip}]", f"output={tags}"], config="predict")
    OmegaConf.update(cfg, "paths.output_dir", str(tmp_path / "run"))
    with pytest.raises(FileExistsError, match=r"notes\.jsonl exists and was not written by this command"):
        predict(cfg)
    OmegaConf.update(cfg, "overwrite", True)
    assert predict(cfg) == []
    assert '"labels"' in tags.read_text()


def test_no_audio_is_a_usage_error(tmp_path: Path, ced_predict) -> None:
    """Before: a folder without audio exited 0 having tagged nothing."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    status, stderr = ced_predict(str(tmp_path / "empty"), "--model", str(REFERENCE))
    assert status == 2
    assert f"inputs: no audio files in {tmp_path / 'empty'} (" in stderr


def test_windows_that_are_too_short_or_skip_audio_are_refused(tmp_path: Path, clip: Path) -> None:
    """Before: segment_seconds=0.00001 ran 400,000 windows of a 4 s clip; a hop longer than the window
    skipped the audio between windows without a word. Both are refused before any output is opened."""
    tags = tmp_path / "tags.jsonl"
    short = tmp_path / "short.wav"  # 0.2 s: the old code's 20 windows of 10 ms end quickly
    sf.write(short, 0.1 * np.random.default_rng(1).standard_normal(3200).astype(np.float32), 16000)
    with pytest.raises(ValueError, match=r"segment_seconds=0\.01: shorter than one STFT window of the model "
                       r"\(512 samples, 0\.032 s\); use segment_seconds >= 0\.032"):  # fmt: skip
        predict_files(str(REFERENCE), [short], output=tags, segment_seconds=0.01)
    skipping = r"hop_seconds=2\.5 is longer than the window \(1 s\): 1\.5 s of every 2\.5 s \(60%\) would be"
    with pytest.raises(ValueError, match=skipping):
        predict_files(str(REFERENCE), [clip], output=tags, segment_seconds=1.0, hop_seconds=2.5)
    assert not tags.exists()
    assert predict_files(str(REFERENCE), [short], output=tags, segment_seconds=0.032) == []  # the bound


def test_a_model_name_that_is_no_file_lists_the_released_names(clip: Path, ced_predict) -> None:
    """Before: `--model ced_large` said "No such file or directory"."""
    status, stderr = ced_predict(str(clip), "--model", "ced_large")
    assert status != 0
    assert (
        "ced_large: no such checkpoint file, and not a released model's name (released: ced_tiny, " in stderr
    )
    assert "ced_mini" in stderr and "ced_base" in stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a device that is always full)")
def test_a_full_disk_is_one_error_and_leaves_no_empty_file(tmp_path: Path, clip: Path, ced_predict) -> None:
    """Before: a full disk or a read-only folder ended in a raw traceback and left empty output files."""
    full = tmp_path / "tags.jsonl"
    full.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    windows = tmp_path / "windows.csv"
    status, stderr = ced_predict(str(clip), "--model", str(REFERENCE), "--output", str(full), "--outputs",
                                 "tags", "windows", "--windows-output", str(windows))  # fmt: skip
    assert status == 1
    assert (
        f"output={full}: cannot write it (No space left on device); the incomplete file was removed. Free "
        "space or choose a writable place, then rerun"
    ) in stderr
    assert not os.path.lexists(full)

    # Windows to a full disk: the tags file, opened first and still without a row, is not left behind.
    tags = tmp_path / "second.jsonl"
    windows.unlink(missing_ok=True)
    windows.symlink_to("/dev/full")
    status, stderr = ced_predict(str(clip), "--model", str(REFERENCE), "--output", str(tags), "--outputs",
                                 "tags", "windows", "--windows-output", str(windows))  # fmt: skip
    assert status == 1
    assert f"windows_output={windows}: cannot write it (No space left on device)" in stderr
    assert not tags.exists() and not os.path.lexists(windows)
