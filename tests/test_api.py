"""The one-call Python API (`import ced_lightning as ced; ced.load(...).tag(...)`): files and waveforms get
the tags `ced-predict` gives, at any rate and channel count; failures are visible; batches are batched; a
released name loads from the offline cache; `import ced_lightning` stays light.

The model is the random-weight reference CED-Tiny (tests/data/ced_reference), so the tags are chance: what is
tested is that every route gives the same numbers as the engine of the commands
(`engines.inference.tag_files`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import ced_lightning as ced
from ced_lightning.engines.inference import predict_files
from ced_lightning.engines.inference import tag_files as engine_tag_files


@pytest.fixture(scope="module")
def reference(ced_reference: Path) -> Path:
    return ced_reference / "ced_tiny_depth2_random.pt"


@pytest.fixture(scope="module")
def tagger(reference: Path) -> ced.AudioTagger:
    return ced.load(reference, device="cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 12 s 44.1 kHz stereo wav (two windows), two 1 s mono wavs, a corrupt file and a folder of one wav."""
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    t = np.arange(44100 * 12) / 44100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.1 * rng.standard_normal(len(t))], axis=1)
    sf.write(folder / "stereo_44k.wav", stereo.astype(np.float32), 44100, subtype="FLOAT")
    sf.write(folder / "a.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    sf.write(folder / "b.wav", (0.2 * np.sin(np.arange(16000) / 5.0)).astype(np.float32), 16000)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEthis is not audio")
    (folder / "sub").mkdir()
    shutil.copy(folder / "b.wav", folder / "sub" / "c.wav")
    return {p.stem: p for p in folder.iterdir()}


def test_import_stays_light_and_dir_shows_the_api() -> None:
    code = (
        "import sys, ced_lightning as ced; print('torch' in sys.modules); "
        "print(' '.join(n for n in dir(ced) if not n.startswith('_')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    torch_loaded, names = out.splitlines()
    assert torch_loaded == "False"
    for name in ("load", "tag_files", "AudioTagger", "TagResult", "TaggingError", "list_released"):
        assert name in names.split(), names
    assert "Path" not in names.split()  # the module's own imports are not offered
    assert ced.load is ced.api.load and ced.list_released()[:2] == ["ced_tiny", "ced_tiny_mae"]
    with pytest.raises(AttributeError, match="has no attribute 'lod'"):
        ced.lod  # noqa: B018


def test_a_file_gets_the_tags_ced_predict_prints_and_writes(
    tagger, reference, ced_reference, tmp_path, capsys
):
    files = [ced_reference / "snap_1s.wav", ced_reference / "long_25s.wav"]
    predict_files(str(reference), files, topk=3, output=tmp_path / "tags.jsonl", device="cpu")
    printed = capsys.readouterr().out.splitlines()
    written = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    for file, line, row in zip(files, printed, written, strict=True):
        result = tagger.tag(file, top_k=3)
        assert str(result) == line  # e.g. "snap_1s.wav: Percussion 0.894, Duck 0.881, Oink 0.873"
        assert result.to_dict() == row and json.loads(json.dumps(result.to_dict())) == row
        assert result.ok and result.path == str(file) and len(result.labels) == len(result.scores) == 3
        assert repr(result).startswith(f"<TagResult {file} ({row['duration_s']:g} s) {result.labels[0]} ")


def test_every_class_best_first_with_top_k_none(tagger, ced_reference) -> None:
    result = tagger.tag(ced_reference / "snap_1s.wav", top_k=None)
    assert len(result.labels) == 527 and sorted(result.indices) == list(range(527))
    assert result.scores == sorted(result.scores, reverse=True)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        tagger.tag(ced_reference / "snap_1s.wav", top_k=0)


def test_a_waveform_at_any_rate_and_layout_gets_its_files_tags(tagger, clips) -> None:
    path = clips["stereo_44k"]
    from_file = tagger.tag(path, top_k=None)
    samples, rate = sf.read(path, dtype="float32")  # (samples, channels), as soundfile returns it
    for wave in (samples.T, torch.from_numpy(samples.T.copy())):
        from_wave = tagger.tag(wave, sample_rate=rate, top_k=None)
        assert from_wave.path is None and from_wave.duration_s == from_file.duration_s == 12.0
        assert (from_wave.labels, from_wave.scores) == (from_file.labels, from_file.scores)
    # Embeddings (not rounded like the scores): the same windows give the same numbers.
    embedded = tagger.embed(path)
    assert embedded.shape == (192,) and embedded.dtype == np.float32
    assert np.array_equal(tagger.embed(samples.T, sample_rate=rate), embedded)

    with pytest.raises(ValueError, match=r"expected \(channels, samples\).*pass its transpose, wave\.T"):
        tagger.tag(samples, sample_rate=rate)
    with pytest.raises(ValueError, match="sample_rate= is required"):
        tagger.tag(samples.T)
    with pytest.raises(ValueError, match="NaN or inf"):
        tagger.tag(np.full(16000, np.nan, np.float32), sample_rate=16000)
    with pytest.raises(ValueError, match="dtype int32"):
        tagger.tag(np.ones(16000, np.int32), sample_rate=16000)


def test_int16_samples_are_scaled_as_stored_audio_is(tagger) -> None:
    ints = (8000 * np.sin(np.arange(16000) / 3.0)).astype(np.int16)
    from_ints = tagger.tag(ints, sample_rate=16000, top_k=None)
    from_floats = tagger.tag(ints.astype(np.float32) / 32768, sample_rate=16000, top_k=None)
    assert from_ints.scores == from_floats.scores


def test_embed_of_a_short_clip_is_the_models_embedding(tagger, ced_reference) -> None:
    wave, rate = sf.read(ced_reference / "snap_1s.wav", dtype="float32")
    with torch.inference_mode():
        direct = tagger.model.embed(torch.from_numpy(wave)[None])[0].numpy()
    assert np.array_equal(tagger.embed(wave, sample_rate=rate), direct)
    assert np.array_equal(tagger.embed(ced_reference / "snap_1s.wav"), direct)


def test_tag_files_gives_one_result_per_file_in_order_and_shows_failures(tagger, clips, caplog) -> None:
    given = [clips["a"], clips["broken"], clips["a"].parent / "missing.wav", clips["b"], clips["sub"]]
    results = ced.tag_files(given, model=tagger, top_k=2)
    assert [r.path for r in results] == [str(p) for p in given[:4]] + [str(clips["sub"] / "c.wav")]
    assert [r.ok for r in results] == [True, False, False, True, True]
    broken, missing = results[1], results[2]
    assert broken.labels == [] and "broken.wav" in broken.error and "cannot decode" in broken.error
    assert str(missing) == f"{missing.path}: cannot tag: no such file"
    assert missing.to_dict()["error"] == missing.error and missing.to_dict()["labels"] == []
    assert "cannot tag" in caplog.text  # logged as it happens, too
    # The same tags as one file at a time.
    assert results[3].scores == tagger.tag(clips["b"], top_k=2).scores
    assert results[4].scores == results[3].scores  # c.wav is a copy of b.wav

    with pytest.raises(ced.TaggingError, match=r"broken\.wav") as err:
        ced.tag_files(given, model=tagger, errors="raise")
    assert err.value.path == str(clips["broken"])
    with pytest.raises(ValueError, match="errors='ignore'"):
        tagger.tag_files(given, errors="ignore")
    with pytest.raises(TypeError, match="a list of paths"):
        tagger.tag_files(str(clips["a"]))
    with pytest.raises(ced.TaggingError, match="is a folder"):
        tagger.tag(clips["sub"])
    with pytest.raises(ced.TaggingError, match="cannot decode"):
        tagger.tag(clips["broken"])


def test_files_are_tagged_in_batches(reference, clips) -> None:
    tagger = ced.load(reference, device="cpu", batch_size=8)
    calls = []
    hook = tagger.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        tagger.tag_files([clips["a"], clips["b"], clips["a"], clips["b"]])
        assert calls == [4]  # four 1 s files, one model call
        calls.clear()
        tagger.batch_size = 3
        tagger.tag_files([clips["a"], clips["b"], clips["a"], clips["b"]])
        assert calls == [3, 1]
    finally:
        hook.remove()


def test_class_names_come_from_the_model(tmp_path) -> None:
    from ced_lightning.models import create_ced

    torch.manual_seed(0)
    model = create_ced("ced_tiny", depth=1, num_classes=3)
    names = ["dog bark", "rain", "siren"]
    torch.save({"model": model.state_dict(), "class_names": names}, tmp_path / "three.pt")
    tagger = ced.load(tmp_path / "three.pt", device="cpu")
    assert tagger.class_names == names
    result = tagger.tag(np.sin(np.arange(8000) / 4.0).astype(np.float32), sample_rate=8000, top_k=None)
    assert sorted(result.labels) == sorted(names)
    assert repr(tagger) == f"AudioTagger({str(tmp_path / 'three.pt')!r}, CED, 3 classes, device=cpu)"


def test_a_released_name_loads_from_the_offline_cache(
    tmp_path, monkeypatch, reference, ced_reference
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    # A stand-in under ced_tiny's released file name (the real file is 22 MB and needs the network).
    shutil.copy(reference, checkpoints / "audiotransformer_tiny_mAP_4814.pt")
    by_name = ced.load("ced_tiny", device="cpu")
    assert repr(by_name).startswith("AudioTagger('ced_tiny', CED, 527 classes")
    clip = ced_reference / "snap_1s.wav"
    assert by_name.tag(clip, top_k=None) == ced.load(reference, device="cpu").tag(clip, top_k=None)
    (result,) = ced.tag_files([clip], model="ced_tiny", device="cpu", top_k=3)
    assert str(result) == f"{clip}: Percussion 0.894, Duck 0.881, Oink 0.873"
    with pytest.raises(FileNotFoundError, match="did you mean 'ced_mini'"):
        ced.load("ced-mini")


def test_engine_and_api_agree_on_a_long_clip_window_by_window(tagger, ced_reference) -> None:
    # 25 s: three 10.12 s windows, the last ending at the clip's end, combined as the model combines pieces.
    long = ced_reference / "long_25s.wav"
    rows, failures = engine_tag_files(tagger.model, [long], topk=527, class_names=tagger.class_names)
    assert not failures
    result = tagger.tag(long, top_k=None)
    assert result.to_dict() == rows[0]
    wave, rate = sf.read(long, dtype="float32")
    assert tagger.tag(wave, sample_rate=rate, top_k=None).scores == result.scores


@pytest.mark.skipif(torch.cuda.is_available(), reason="the session shows device=cpu and CPU numbers")
def test_the_python_session_in_the_docs_runs_as_shown(
    tmp_path, monkeypatch, reference, ced_reference, caplog
):
    """docs/using_models.md's Python session, run by doctest in the setting it describes: the random-weight
    stand-in in the torch.hub cache under CED-Tiny's file name, offline, and the files it names."""
    import doctest

    from ced_lightning.core.audio import resample

    text = (Path(__file__).parents[1] / "docs" / "using_models.md").read_text()
    start = text.index('>>> import ced_lightning as ced\n>>> m = ced.load("ced_tiny")')
    session = text[start : text.index("```", start)]
    # What the session shows as logged (stderr, not doctest's stdout) is checked against the log instead.
    logged = [line for line in session.splitlines() if line.startswith("cannot tag: ")]
    session = "\n".join(line for line in session.splitlines() if not line.startswith("cannot tag: "))

    checkpoints = tmp_path / "cache" / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(reference, checkpoints / "audiotransformer_tiny_mAP_4814.pt")
    for name in ("snap_1s.wav", "long_25s.wav"):
        shutil.copy(ced_reference / name, tmp_path / name)
    wave, _ = sf.read(ced_reference / "long_25s.wav", dtype="float32")
    at_44k = resample(torch.from_numpy(wave), 16000, 44100).numpy()
    sf.write(tmp_path / "street_44k.flac", np.stack([at_44k, 0.5 * at_44k], axis=1), 44100)
    (tmp_path / "voice_memo.m4a").write_bytes(np.random.default_rng(0).bytes(3000))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", "cache/torch")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache" / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    example = doctest.DocTestParser().get_doctest(session, {}, "using_models.md", None, 0)
    report = []
    runner = doctest.DocTestRunner(optionflags=doctest.REPORT_NDIFF)
    runner.run(example, out=report.append)
    assert runner.failures == 0 and runner.tries >= 15, "".join(report)
    assert logged and all(line in caplog.text for line in logged), caplog.text
