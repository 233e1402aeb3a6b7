"""Tagging files: batching by length, formats and rates, a corrupt file among good ones, outputs, timeline."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_lightning.core.audio import load_audio
from ced_lightning.core.labels import audioset_classes, resolve_class_names
from ced_lightning.data.sources import from_directory
from ced_lightning.engines.inference import (
    TagsWriter,
    WindowsWriter,
    expand_inputs,
    segment_starts,
    tag_files,
)
from ced_lightning.models import create_ced, load_checkpoint, model_spec, save_ced
from ced_lightning.models.ced import average_pieces

CLASS_NAMES = ["dog", "cat", "bird", "rain"]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    """Two 1 s mono wavs (same length: one batch), a 44.1 kHz stereo flac, a 12 s wav, and a corrupt file."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    sf.write(folder / "a.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    sf.write(folder / "b.wav", 0.2 * np.sin(np.arange(16000) / 5.0).astype(np.float32), 16000)
    sf.write(folder / "c.flac", 0.1 * rng.standard_normal((44100 * 2, 2)).astype(np.float32), 44100)
    sf.write(folder / "long.wav", 0.1 * rng.standard_normal(16000 * 12).astype(np.float32), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
    (folder / "notes.txt").write_text("not audio, ignored when a folder is searched")
    return folder


def test_segment_starts():
    assert segment_starts(16000 * 3, 16000, 16000) == [0, 16000, 32000]
    assert segment_starts(16000 * 3 + 100, 16000, 16000) == [0, 16000, 32000, 32100]
    assert segment_starts(8000, 16000, 8000) == [0]


def test_expand_inputs(audio_dir):
    found = [p.name for p in expand_inputs([audio_dir])]
    assert found == ["a.wav", "b.wav", "broken.wav", "c.flac", "long.wav"]
    with pytest.raises(FileNotFoundError, match=r"missing\.wav does not exist"):
        expand_inputs([audio_dir / "missing.wav"])


def test_expand_inputs_skips_dotfiles_and_keeps_every_readable_format(tmp_path):
    folder = tmp_path / "copied_from_a_mac"
    (folder / "sub").mkdir(parents=True)
    tone = 0.1 * np.sin(np.arange(16000) / 5.0).astype(np.float32)
    sf.write(folder / "song.wav", tone, 16000)
    sf.write(folder / "sub" / "LOUD.WAV", tone, 16000)
    sf.write(folder / "take.aiff", tone, 16000)
    # AppleDouble metadata: the audio's name and extension, but not audio.
    (folder / "._song.wav").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    (folder / "sub" / ".hidden.flac").write_bytes(b"not audio either")
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    sf.write(linked / "via_link.wav", tone, 16000)
    (folder / "link").symlink_to(linked, target_is_directory=True)

    found = [p.relative_to(folder).as_posix() for p in expand_inputs([folder])]
    assert found == ["link/via_link.wav", "song.wav", "sub/LOUD.WAV", "take.aiff"]
    results, failures = tag_files(
        create_ced("ced_tiny", depth=1, num_classes=4).eval(),
        expand_inputs([folder]),
        class_names=CLASS_NAMES,
        device="cpu",
    )
    assert not failures and len(results) == 4
    # prepare shares the walk, the dotfile rule and the formats (it skipped .aiff before).
    assert [i.name for i in from_directory(folder).items] == ["link/via_link", "song", "sub/LOUD", "take"]


def test_resolve_class_names():
    assert resolve_class_names(4) == ["class_0", "class_1", "class_2", "class_3"]
    assert resolve_class_names(4, placeholders=False) is None
    assert resolve_class_names(4, CLASS_NAMES) == CLASS_NAMES
    assert resolve_class_names(527)[0] == "Speech"
    # The checkpoint's names define the outputs: they win over the store's, and a wrong count is an error.
    assert resolve_class_names(4, CLASS_NAMES, list("abcd")) == CLASS_NAMES
    with pytest.raises(ValueError, match="class_names has 2 entries but the model has 4"):
        resolve_class_names(4, ["x", "y"], CLASS_NAMES)
    # The store's names only where their count fits the model.
    assert resolve_class_names(4, None, list("abcd")) == list("abcd")
    assert resolve_class_names(4, None, list("abc"), placeholders=False) is None
    assert resolve_class_names(527, None, list("abc")) == list(audioset_classes().names)


def test_tag_files_keeps_good_files_and_reports_the_broken_one(tiny_model, audio_dir):
    files = expand_inputs([audio_dir])
    results, failures = tag_files(
        tiny_model, files, topk=3, class_names=CLASS_NAMES, batch_size=4, device="cpu"
    )
    assert [Path(r["file"]).name for r in results] == ["a.wav", "b.wav", "c.flac", "long.wav"]
    assert len(failures) == 1 and failures[0].path.endswith("broken.wav")
    assert "broken.wav" in failures[0].reason
    assert results[2]["duration_s"] == pytest.approx(2.0)
    for result in results:
        probs = [label["probability"] for label in result["labels"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
    # Batched (a.wav with b.wav) equals one file alone, exactly as the model on the whole file (one window).
    with torch.no_grad():
        alone = torch.sigmoid(tiny_model(load_audio(results[0]["file"])[None]))[0]
    assert results[0]["labels"] == [
        {"index": int(i), "name": CLASS_NAMES[int(i)], "probability": round(float(alone[i]), 6)}
        for i in alone.argsort(descending=True)[:3]
    ]
    # The 12 s file is two windows of the model's own piece (161,919 samples: 0-10.12 s, 1.88-12 s),
    # averaged as CED averages a long clip's pieces.
    waveform = load_audio(results[3]["file"])
    with torch.no_grad():
        pieces = tiny_model(torch.stack([waveform[:161919], waveform[192000 - 161919 :]]))
    expected = torch.sigmoid(average_pieces(pieces[:, None], tiny_model.config.piece_average))[0]
    assert results[3]["labels"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-6)


def test_windows_and_csv(tiny_model, audio_dir, tmp_path):
    sinks = [TagsWriter(tmp_path / "tags.csv"), WindowsWriter(tmp_path / "windows.csv", 2, CLASS_NAMES)]
    results, _ = tag_files(
        tiny_model,
        [audio_dir / "long.wav"],
        topk=2,
        class_names=CLASS_NAMES,
        segment_seconds=2.0,
        hop_seconds=1.0,
        sinks=sinks,
        device="cpu",
    )
    for sink in sinks:
        sink.close()
    rows = list(csv.DictReader((tmp_path / "windows.csv").open()))
    assert len(rows) == 11 * 2
    assert [float(r["start_s"]) for r in rows[::2]] == [float(i) for i in range(11)]
    assert rows[-1]["end_s"] == "12.0"
    tags = list(csv.DictReader((tmp_path / "tags.csv").open()))
    assert len(tags) == 2 and tags[0]["start_s"] == "" and tags[0]["name"] == results[0]["labels"][0]["name"]
    with pytest.raises(ValueError, match=r"output=.*tags\.txt: use a \.jsonl or \.csv"):
        TagsWriter(tmp_path / "tags.txt")


def test_command_tags_good_files_and_exits_non_zero(tiny_model, audio_dir, tmp_path, monkeypatch):
    from ced_lightning.predict import main

    # A checkpoint in our Lightning layout, carrying class names.
    ckpt = tmp_path / "tiny.ckpt"
    state = {f"model.{k}": v for k, v in tiny_model.state_dict().items()}
    torch.save({"state_dict": state, "model_spec": model_spec(tiny_model), "class_names": CLASS_NAMES}, ckpt)
    output = tmp_path / "out" / "tags.jsonl"
    argv = [
        "predict",
        f"ckpt={ckpt}",
        f"inputs=[{audio_dir / 'a.wav'},{audio_dir / 'broken.wav'},{audio_dir / 'long.wav'}]",
        "topk=2",
        f"output={output}",
        "outputs=[tags,windows]",
        f"windows_output={tmp_path / 'out' / 'windows.jsonl'}",
        "segment_seconds=5",
        f"timeline_dir={tmp_path / 'timelines'}",
        f"paths.root_dir={tmp_path}",
        "device=cpu",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test's thread count
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["a.wav", "long.wav"]
    assert {label["name"] for label in lines[0]["labels"]} <= set(CLASS_NAMES)
    assert set(lines[1]) == {"file", "duration_s", "labels"}  # today's clip format
    windows = [json.loads(line) for line in (tmp_path / "out" / "windows.jsonl").read_text().splitlines()]
    assert [(Path(w["file"]).name, w["start_s"], w["end_s"]) for w in windows] == [
        ("a.wav", 0.0, 1.0),
        ("long.wav", 0.0, 5.0),
        ("long.wav", 5.0, 10.0),
        ("long.wav", 7.0, 12.0),
    ]
    (log_file,) = (tmp_path / "logs" / "predict" / "runs").glob("*/predict.log")
    assert "cannot tag: " in log_file.read_text() and "broken.wav" in log_file.read_text()
    pngs = sorted(p.name for p in (tmp_path / "timelines").iterdir())
    assert pngs == ["0000_a.png", "0002_long.png"]  # numbered by input position


def test_released_format_checkpoint_uses_audioset_names(audio_dir, tmp_path):
    save_ced(create_ced("ced_tiny", depth=1), tmp_path / "released.pt")
    checkpoint = load_checkpoint(tmp_path / "released.pt")
    model = checkpoint.model
    names = resolve_class_names(model.num_classes, checkpoint.class_names)
    assert names == list(audioset_classes().names)
    results, failures = tag_files(model, [audio_dir / "a.wav"], topk=5, class_names=names, device="cpu")
    assert not failures
    assert all(label["name"] in names for label in results[0]["labels"])


def test_bad_output_name_refused_before_loading_or_tagging(tmp_path):
    from omegaconf import OmegaConf

    from ced_lightning.predict import predict

    cfg = OmegaConf.create(
        {"ckpt": str(tmp_path / "not_read.ckpt"), "inputs": [str(tmp_path)], "topk": 5, "output": "tags.txt"}
    )
    with pytest.raises(ValueError, match=r"output=tags\.txt: use a \.jsonl or \.csv"):
        predict(cfg)  # the checkpoint does not even exist: the name is checked first


def test_clips_shorter_than_one_stft_window_are_tagged(tiny_model, audio_dir, tmp_path):
    """Before: a 200-sample wav raised `RuntimeError: ... Padding size should be less than the corresponding
    input dimension` from the STFT's reflect padding, and no file of the call was tagged."""
    short = tmp_path / "blip.wav"
    sf.write(short, 0.3 * np.sin(np.arange(200) / 3.0).astype(np.float32), 16000)
    results, failures = tag_files(
        tiny_model, [audio_dir / "a.wav", short], class_names=CLASS_NAMES, device="cpu"
    )
    assert not failures and [Path(r["file"]).name for r in results] == ["a.wav", "blip.wav"]
    with pytest.raises(ValueError, match="shorter than one STFT window"):  # windows are one or longer
        tag_files(tiny_model, [short], class_names=CLASS_NAMES, segment_seconds=0.01, device="cpu")
    assert results[1]["duration_s"] == pytest.approx(200 / 16000)
    # The rule is zero-padding at the end to one window (512 samples), as a batch pads its shorter clips.
    with torch.no_grad():
        padded = torch.nn.functional.pad(load_audio(short), (0, 512 - 200))
        expected = torch.sigmoid(tiny_model(padded[None]))[0]
    assert results[1]["labels"][0]["probability"] == pytest.approx(float(expected.max()), abs=1e-5)


class FailsOnLength(torch.nn.Module):
    """The tiny CED, failing (as a CUDA out-of-memory error would) on inputs of one length."""

    def __init__(self, model: torch.nn.Module, bad_samples: int) -> None:
        super().__init__()
        self.model, self.bad_samples, self.num_classes = model, bad_samples, model.num_classes

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.shape[-1] == self.bad_samples:
            raise RuntimeError("CUDA out of memory (simulated)\nsecond line")
        return self.model(waveform)


def test_a_file_the_model_fails_on_costs_only_that_file(tiny_model, audio_dir):
    """Before: the model's exception left `tag_files`, so the good files' tags were lost with it."""
    files = [audio_dir / "a.wav", audio_dir / "c.flac", audio_dir / "b.wav"]
    model = FailsOnLength(tiny_model, bad_samples=32000)  # c.flac: 2 s
    results, failures = tag_files(model, files, class_names=CLASS_NAMES, device="cpu")
    assert [Path(r["file"]).name for r in results] == ["a.wav", "b.wav"]
    assert [Path(f.path).name for f in failures] == ["c.flac"]
    assert failures[0].reason.endswith(
        "the model failed on it (RuntimeError: CUDA out of memory (simulated))"
    )
    # A batch that fails as a whole (padded to the bad length) is retried window by window.
    results, failures = tag_files(
        FailsOnLength(tiny_model, bad_samples=16000 * 10),  # long.wav's 10 s windows
        [audio_dir / "a.wav", audio_dir / "long.wav", audio_dir / "b.wav"],
        class_names=CLASS_NAMES,
        length_tolerance_s=20.0,
        device="cpu",
    )
    assert [Path(r["file"]).name for r in results] == ["a.wav", "b.wav"]
    assert [Path(f.path).name for f in failures] == ["long.wav"]


def test_truncated_wav_is_refused_as_prepare_refuses_it(tiny_model, tmp_path):
    """Before: predict tagged a half-downloaded WAV as a shorter clip, while prepare refused it."""
    whole = tmp_path / "whole.wav"
    sf.write(whole, 0.2 * np.sin(np.arange(16000) / 5.0).astype(np.float32), 16000)
    cut = tmp_path / "cut.wav"
    cut.write_bytes(whole.read_bytes()[:20000])
    results, failures = tag_files(tiny_model, [whole, cut], class_names=CLASS_NAMES, device="cpu")
    assert [Path(r["file"]).name for r in results] == ["whole.wav"]
    assert len(failures) == 1 and "cut.wav: truncated WAV" in failures[0].reason


def test_a_symlink_loop_among_the_inputs_fails_as_such(tiny_model, audio_dir, tmp_path):
    """Before: `inputs: loop.wav does not exist` stopped the whole call, and the cause was hidden."""
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    files = expand_inputs([audio_dir / "a.wav", tmp_path / "loop.wav"])
    results, failures = tag_files(tiny_model, files, class_names=CLASS_NAMES, device="cpu")
    assert [Path(r["file"]).name for r in results] == ["a.wav"]
    assert len(failures) == 1 and failures[0].reason.endswith(
        "loop.wav: symlink loop (a link that points back to itself)"
    )


def test_default_window_is_the_models_own_piece(tiny_model, tmp_path: Path) -> None:
    """A file the model runs as one piece (CED: up to 1012 frames = 161,919 samples) is one window by default,
    so its clip tags are the model's own; with 10 s windows a 160,800-sample file was two overlapping windows
    whose average differed from the model's output by 2e-3."""
    from ced_lightning.engines.inference import model_piece_samples

    piece = model_piece_samples(tiny_model)
    assert piece == 161_919
    assert (
        tiny_model.front_end.num_frames(piece) == 1012 and tiny_model.front_end.num_frames(piece + 1) == 1013
    )
    rng = np.random.default_rng(3)
    for length, windows in ((160_800, 1), (piece, 1), (piece + 1, 2)):
        wave = (0.1 * rng.standard_normal(length)).astype(np.float32)
        path = tmp_path / f"piece_{length}.wav"
        sf.write(path, wave, 16000, subtype="FLOAT")
        spans: list[tuple[float, float]] = []

        class Spans:
            def __init__(self, into: list) -> None:
                self.into = into

            def add_windows(self, batch) -> None:
                self.into.extend(batch.spans)

            def add_file(self, index, result) -> None: ...
            def discard(self, index, file) -> None: ...
            def close(self) -> None: ...

        results, failures = tag_files(
            tiny_model, [path], class_names=CLASS_NAMES, topk=4, device="cpu", sinks=[Spans(spans)]
        )
        assert not failures and len(spans) == windows, (length, spans)
        if windows == 1:
            with torch.no_grad():
                expected = torch.sigmoid(tiny_model(load_audio(path)[None]))[0]
            got = {label["index"]: label["probability"] for label in results[0]["labels"]}
            assert got == pytest.approx({i: float(expected[i]) for i in got}, abs=1e-6)


def test_predict_refuses_removed_keys_and_checks_inputs_before_the_checkpoint(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from ced_lightning.engines.inference import predict_files
    from ced_lightning.predict import predict

    base = {"ckpt": str(tmp_path / "no_such.ckpt"), "inputs": [str(tmp_path / "typo.wav")]}
    with pytest.raises(ValueError, match=r"timeline= is gone: .*outputs=\[tags,windows\]"):
        predict(OmegaConf.create({**base, "timeline": True}))
    with pytest.raises(ValueError, match=r"output=-: .*ced-predict --output -"):
        predict(OmegaConf.create({**base, "output": "-"}))
    # The missing input is named, not the checkpoint (a released name would be downloaded first before).
    with pytest.raises(FileNotFoundError, match=r"inputs: .*typo\.wav does not exist"):
        predict_files(str(tmp_path / "no_such.ckpt"), [tmp_path / "typo.wav"])
    with pytest.raises(ValueError, match="segment_seconds must be > 0"):
        predict_files(str(tmp_path / "no_such.ckpt"), [tmp_path / "typo.wav"], segment_seconds=0)
