"""Sound events through the commands: `ced-predict --events` and `predict events_output=` write exactly
`detect_events` of the model's frame outputs (`CED.forward_frames`) on the decoded file, readable by
`read_events`; the timeline chart draws them; a model without frame outputs and a foreign file are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_lightning import compose_config
from ced_lightning.api import AudioTagger
from ced_lightning.core.audio import SAMPLE_RATE, load_audio
from ced_lightning.core.errors import CedError
from ced_lightning.core.event_files import event_row, read_events
from ced_lightning.core.events import detect_events
from ced_lightning.engines.config_checks import RULES, check_config
from ced_lightning.engines.inference.events import frame_probabilities
from ced_lightning.models import create_ced, model_spec, save_ced
from ced_lightning.predict import predict

CLASS_NAMES = [f"class_{i}" for i in range(4)]  # a save_ced file holds no names
SETTINGS = dict(median_window=3, fill_gap=1, min_frames=2)


@pytest.fixture(scope="module")
def ced(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = create_ced("ced_tiny", depth=1, num_classes=len(CLASS_NAMES)).eval()
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_ced(model, path)
    return model, path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Noise with a tone burst, 4 s, and 13 s at 44.1 kHz (two of the model's 63-column pieces, resampled)."""
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    short = 0.05 * rng.standard_normal(4 * 16000)
    short[16000:32000] += 0.5 * np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    sf.write(folder / "a.wav", short.astype(np.float32), 16000)
    sf.write(folder / "b.flac", (0.1 * rng.standard_normal(13 * 44100)).astype(np.float32), 44100)
    return [folder / "a.wav", folder / "b.flac"]


def thresholds(model: torch.nn.Module, clips: list[Path]) -> list[float]:
    """Per-class thresholds at each class's median probability over the clips: events in every class."""
    with torch.no_grad():
        probs = torch.cat([model.forward_frames(load_audio(c)[None])[0].sigmoid() for c in clips])
    return [round(float(v), 4) for v in probs.median(0).values]


def expected_rows(model: torch.nn.Module, clips: list[Path], threshold: list[float]) -> list[dict]:
    rows = []
    for clip in clips:
        wave = load_audio(clip)
        with torch.no_grad():
            probs = model.forward_frames(wave[None])[0].sigmoid()
        events = detect_events(
            probs, model.column_seconds, CLASS_NAMES, threshold, duration=len(wave) / SAMPLE_RATE, **SETTINGS
        )
        rows.extend(event_row(str(clip), event) for event in events)
    return rows


@pytest.fixture
def ced_predict(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str]]:
    from ced_lightning.cli import predict_main

    monkeypatch.setattr("torch.set_num_threads", lambda n: None)

    def run(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            status = predict_main([*args, "--quiet"])
        except SystemExit as stopped:
            status = int(stopped.code)
        except CedError as err:
            return err.exit_code, capsys.readouterr().err + str(err)
        return status, capsys.readouterr().err

    return run


def test_ced_predict_events_are_detect_events_of_the_frame_outputs(ced, clips, tmp_path, ced_predict) -> None:
    model, path = ced
    threshold = thresholds(model, clips)
    events = tmp_path / "events.csv"
    status, stderr = ced_predict(*map(str, clips), "--model", str(path), "--events", str(events),
                                 "--event-threshold", ",".join(map(str, threshold)), "--median-window", "3",
                                 "--fill-gap", "1", "--min-frames", "2")  # fmt: skip
    assert status == 0, stderr
    expected = expected_rows(model, clips, threshold)
    assert {row["filename"] for row in expected} == set(map(str, clips))  # events in both files
    assert read_events(events) == expected
    # A rerun replaces the file it wrote.
    status, stderr = ced_predict(str(clips[0]), "--model", str(path), "--events", str(events))
    assert status == 0, stderr


def test_predict_command_writes_jsonl_events_and_draws_them(ced, clips, tmp_path) -> None:
    model, path = ced
    threshold = thresholds(model, clips)
    events, charts = tmp_path / "events.jsonl", tmp_path / "charts"
    cfg = compose_config(
        [f"ckpt={path}", f"inputs=[{clips[0]},{clips[1]}]", f"output={tmp_path / 'tags.jsonl'}",
         "outputs=[tags,windows]", f"windows_output={tmp_path / 'w.csv'}", f"timeline_dir={charts}",
         f"events_output={events}", f"event_threshold=[{','.join(map(str, threshold))}]", "median_window=3",
         "fill_gap=1", "min_frames=2", "segment_seconds=2"],
        config="predict",
    )  # fmt: skip
    assert predict(cfg) == []
    assert read_events(events) == expected_rows(model, clips, threshold)
    assert sorted(p.name for p in charts.iterdir()) == ["0000_a.png", "0001_b.png"]


def test_frames_computed_a_piece_at_a_time_are_the_whole_files(ced, clips) -> None:
    """The 13 s file is two pieces: one per encoder call gives forward_frames' columns (float32 bound)."""
    model, _ = ced
    wave = load_audio(clips[1])
    with torch.no_grad():
        whole = model.forward_frames(wave[None])[0].sigmoid()
    pieced = frame_probabilities(model, wave, pieces_per_call=1)
    assert pieced.shape == whole.shape and whole.shape[0] > model.time_pos_embed.shape[-1]
    assert (pieced - whole).abs().max() < 1e-5


def test_api_events_match_the_command(ced, clips) -> None:
    model, _ = ced
    threshold = thresholds(model, clips)
    tagger = AudioTagger(model, CLASS_NAMES, device="cpu")
    wave = sf.read(clips[0], dtype="float32")[0]
    found = tagger.events(wave, sample_rate=16000, threshold=threshold, **SETTINGS)
    assert [event_row(str(clips[0]), e) for e in found] == expected_rows(model, clips[:1], threshold)


def test_a_model_without_frame_outputs_is_refused_in_one_line(clips, tmp_path, ced_predict) -> None:
    from ced_lightning.models.timm_mel import TimmMelClassifier

    timm_model = TimmMelClassifier("mobilenetv3_small_050", num_classes=len(CLASS_NAMES))
    ckpt = tmp_path / "timm.ckpt"
    torch.save(
        {"model_spec": model_spec(timm_model), "state_dict": timm_model.state_dict(), "eval_prefix": ""}, ckpt
    )
    events = tmp_path / "events.csv"
    status, stderr = ced_predict(str(clips[0]), "--model", str(ckpt), "--events", str(events))
    assert status != 0
    assert (
        "--events (events_output): TimmMelClassifier has no frame outputs; sound events need a CED" in stderr
    )
    assert "Traceback" not in stderr and not events.exists()


def test_a_foreign_file_is_not_overwritten(ced, clips, tmp_path, ced_predict) -> None:
    _, path = ced
    events = tmp_path / "events.csv"
    events.write_text("my own notes\n")
    status, stderr = ced_predict(str(clips[0]), "--model", str(path), "--events", str(events))
    assert status != 0
    assert f"events_output={events} exists and was not written by this command" in stderr
    assert events.read_text() == "my own notes\n"


def test_event_settings_are_checked_before_the_model_is_read(clips, tmp_path, ced_predict) -> None:
    status, stderr = ced_predict(str(clips[0]), "--model", str(tmp_path / "absent.pt"), "--events",
                                 str(tmp_path / "e.csv"), "--median-window", "4")  # fmt: skip
    assert status == 2 and "median_window (--median-window)=4: an odd number of columns" in stderr
    status, stderr = ced_predict(str(clips[0]), "--model", "x", "--events", str(tmp_path / "e.txt"))
    assert (
        status == 2 and "events_output=" in stderr and "e.txt: use a .csv, .tsv, .jsonl file name" in stderr
    )
    cfg = compose_config(["ckpt=x", "fill_gap=-1"], config="predict")
    with pytest.raises(CedError, match=r"fill_gap: expected an integer >= 0, got -1"):
        check_config(cfg, RULES["predict"])
