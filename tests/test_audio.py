from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_lightning.core.audio import (
    AudioDecodeError,
    float_to_int16,
    load_audio,
    pad_to_min_length,
    resample,
    resample_blocks,
)
from ced_lightning.core.labels import audioset_classes


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


def test_unopenable_paths_say_why(tmp_path):
    """Before: all of these read `Error opening '...': System error.`"""
    sf.write(tmp_path / "real.wav", np.full(1600, 0.1, np.float32), 16000)
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    (tmp_path / "dangling.wav").symlink_to(tmp_path / "gone.wav")
    (tmp_path / "folder.wav").mkdir()
    cases = {
        "missing.wav": "no such file",
        "loop.wav": "symlink loop",
        "dangling.wav": f"dangling symlink \\(its target {tmp_path / 'gone.wav'} does not exist\\)",
        "folder.wav": "is a folder, not an audio file",
    }
    for name, reason in cases.items():
        with pytest.raises(AudioDecodeError, match=rf"{name}: {reason}"):
            load_audio(tmp_path / name)
    assert load_audio(tmp_path / "real.wav").numel() == 1600


def test_audio_that_rounds_to_silence_is_refused_everywhere(tmp_path):
    """Before: only prepare refused it (after its own int16 conversion); predict tagged it."""
    sf.write(tmp_path / "hiss.wav", np.full(1600, 1e-6, np.float32), 16000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match=r"hiss\.wav: audio is silent at 16-bit resolution"):
        load_audio(tmp_path / "hiss.wav")


@pytest.mark.parametrize(("sr", "channels"), [(44100, 2), (22050, 1), (16000, 1), (48000, 3)])
def test_long_files_decode_in_blocks_like_whole(tmp_path, sr, channels):
    """Block decoding (for recordings longer than `STREAM_BLOCK_FRAMES`) equals the whole-file decode: the
    resampler's windows are the same, only float rounding differs; stored int16 samples agree within 1."""
    rng = np.random.default_rng(sr)
    data = (0.3 * rng.standard_normal((sr * 2 + 123, channels))).astype(np.float32)
    sf.write(tmp_path / "x.wav", data, sr, subtype="FLOAT")
    whole = load_audio(tmp_path / "x.wav")
    for block_frames in (999, 4096, sr):
        blocks = load_audio(tmp_path / "x.wav", block_frames=block_frames)
        assert blocks.shape == whole.shape
        assert (blocks - whole).abs().max().item() < 1e-6
        assert np.abs(float_to_int16(blocks.numpy()).astype(int) - float_to_int16(whole.numpy())).max() <= 1
    sf.write(tmp_path / "zero.wav", np.zeros((sr * 2, channels), np.float32), sr)
    with pytest.raises(AudioDecodeError, match="all zeros"):
        load_audio(tmp_path / "zero.wav", block_frames=999)


def test_resample_blocks_equals_resample_for_any_split():
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(10007).astype(np.float32)
    whole = resample(torch.from_numpy(signal), 44100).numpy()
    for cuts in ([5000], [1, 2, 3, 441], list(range(0, 10007, 1234))):
        blocks = np.split(signal, cuts)
        assert np.abs(resample_blocks(iter(blocks), 44100) - whole).max() < 1e-6


def test_short_clip_rule_pads_at_the_end_to_one_window():
    from ced_lightning.models.ced import FrontEndConfig, LogMelFrontEnd

    front_end = LogMelFrontEnd(FrontEndConfig())
    clip = 0.1 * torch.randn(1, 200)
    assert torch.equal(pad_to_min_length(clip, 512)[:, :200], clip)
    assert pad_to_min_length(clip, 512).shape == (1, 512) and pad_to_min_length(clip, 100) is clip
    mel = front_end(clip)
    assert mel.shape == (1, 64, front_end.num_frames(200)) == (1, 64, 4)
    assert torch.equal(mel, front_end(torch.nn.functional.pad(clip, (0, 312))))


def test_resampled_length_is_torchaudios_cut() -> None:
    """torchaudio cuts at the float32 ceiling of the rate ratio; an exact integer ceiling made some long
    recordings decoded in blocks one sample longer than the same file decoded whole (4,194,307 frames at
    44.1 kHz: 1,521,745 against 1,521,744)."""
    import torchaudio

    from ced_lightning.core.audio import resampled_length

    for frames in (1, 441, 44_100, 4_194_307):
        whole = torchaudio.functional.resample(torch.zeros(frames), 44_100, 16_000)
        assert resampled_length(frames, 44_100) == whole.shape[-1], frames
