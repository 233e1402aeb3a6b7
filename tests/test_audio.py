from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_lightning.audio import AudioDecodeError, load_audio
from ced_lightning.labels import audioset_classes


def test_audioset_classes_shipped_in_checkpoint_order():
    classes = audioset_classes()
    assert len(classes) == 527
    assert classes.names[0] == "Speech"
    assert classes.names[526] == "Field recording"
    assert classes.index_of_mid()["/m/09x0r"] == 0


@pytest.mark.parametrize(("sr", "channels"), [(8000, 1), (22050, 1), (44100, 2), (16000, 1)])
def test_load_audio_resamples_and_downmixes(tmp_path, sr, channels):
    t = np.arange(sr) / sr
    tone = 0.5 * np.sin(2 * np.pi * 440 * t).astype(np.float32)
    data = np.stack([tone, tone * 0.5], axis=1) if channels == 2 else tone
    sf.write(tmp_path / "x.wav", data, sr)
    wave = load_audio(tmp_path / "x.wav")
    assert wave.dtype == torch.float32 and wave.ndim == 1
    assert abs(wave.numel() - 16000) <= 1
    peak = 0.375 if channels == 2 else 0.5
    assert abs(wave[2000:14000].abs().max().item() - peak) < 0.02


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "cannot decode"), (b"not audio at all" * 10, "cannot decode")],
)
def test_load_audio_names_unreadable_files(tmp_path, content, reason):
    (tmp_path / "bad.wav").write_bytes(content)
    with pytest.raises(AudioDecodeError, match=rf"bad\.wav: {reason}"):
        load_audio(tmp_path / "bad.wav")


def test_load_audio_rejects_silence_and_nan(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros(1600, np.float32), 16000)
    sf.write(tmp_path / "nan.wav", np.full(1600, np.nan, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match="all zeros"):
        load_audio(tmp_path / "zero.wav")
    with pytest.raises(AudioDecodeError, match="NaN"):
        load_audio(tmp_path / "nan.wav")
