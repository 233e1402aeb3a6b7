"""The HEAR API (`ced_lightning.hear`): the HEAR validator's checks, re-stated, on a random-weight CED.

The `hearvalidator` package imports tensorflow at the top of its one module, so it is not installed here;
`validation_errors` applies its checks as written in hear-validator's `hearvalidator/validate.py`
(github.com/hearbenchmark/hear-validator): the module has `load_model`, `get_timestamp_embeddings` and
`get_scene_embeddings`; `load_model` returns a `torch.nn.Module` with `sample_rate` in {16000, 22050, 44100,
48000} and int `scene_embedding_size` / `timestamp_embedding_size`; for 2 sounds of white noise in [-1, 1)
of 1.07, 1.98 and 4.0 s, the timestamp embeddings are float32 `[2, T, timestamp_embedding_size]`, the
timestamps `[2, T]`, evenly spaced (no step more than 1 ms off the mean step), ending no later than the audio
and no earlier than two steps before its end; for 4 sounds of 2.74 s the scene embeddings are float32
`[4, scene_embedding_size]`. Added here, what the validator leaves to the evaluation: timestamps strictly
increasing and the same for every sound, longer audio than the model's window, and batch independence (a
sound's embeddings alone equal its row of a batch).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from ced_lightning import hear
from ced_lightning.models import load_ced
from conftest import float32_bound

ACCEPTABLE_SAMPLE_RATES = (16000, 22050, 44100, 48000)
# A sound's row of a batch against the sound alone: the same kernels on one machine, but a matmul's kernel
# may round differently for another number of rows, so a bound of a few float32 ulps at the embeddings' scale
# per accumulated product (the model's widest sum: the MLP's 768 inputs of CED-Tiny).
BATCH_ACCUMULATED = 768


@pytest.fixture(scope="module")
def hear_model(ced_reference: Path) -> hear.HearCED:
    return hear.load_model(str(ced_reference / "ced_tiny_depth2_random.pt"))


def white_noise(num_audio: int, seconds: float, sample_rate: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(num_audio, int(seconds * sample_rate), generator=generator) * 2 - 1


def validation_errors(module, model) -> list[str]:
    """hear-validator's checks (see the module docstring); an empty list when the model passes."""
    errors = []
    for name in ("load_model", "get_timestamp_embeddings", "get_scene_embeddings"):
        if not callable(getattr(module, name, None)):
            errors.append(f"no function {name}")
    if not isinstance(model, torch.nn.Module):
        return [*errors, f"load_model returned {type(model).__name__}, not a torch.nn.Module"]
    if getattr(model, "sample_rate", None) not in ACCEPTABLE_SAMPLE_RATES:
        errors.append(f"sample_rate {getattr(model, 'sample_rate', None)!r} not in {ACCEPTABLE_SAMPLE_RATES}")
    for size in ("scene_embedding_size", "timestamp_embedding_size"):
        if not isinstance(getattr(model, size, None), int):
            errors.append(f"{size} is not an int")
    if errors:
        return errors
    for seconds in (1.07, 1.98, 4.0):
        audio = white_noise(2, seconds, model.sample_rate)
        embeddings, timestamps = module.get_timestamp_embeddings(audio, model)
        if embeddings.dtype != torch.float32:
            errors.append(f"{seconds} s: timestamp embeddings are {embeddings.dtype}")
        embeddings, timestamps = embeddings.cpu().numpy(), timestamps.cpu().numpy()
        if embeddings.ndim != 3 or timestamps.ndim != 2:
            errors.append(f"{seconds} s: shapes {embeddings.shape} and {timestamps.shape}")
            continue
        if embeddings.shape[0] != 2 or embeddings.shape[:2] != timestamps.shape:
            errors.append(f"{seconds} s: embeddings {embeddings.shape} for timestamps {timestamps.shape}")
        if embeddings.shape[2] != model.timestamp_embedding_size:
            errors.append(f"{seconds} s: embedding size {embeddings.shape[2]}")
        if timestamps.shape[1] > 1:
            steps = np.diff(timestamps)
            mean_step = steps.mean()
            if np.abs(steps - mean_step).max() > 1:
                errors.append(f"{seconds} s: timestamps not evenly spaced ({steps})")
            end = timestamps.max()
            if end < 1000 * seconds - 2 * mean_step or end > 1000 * seconds:
                errors.append(f"{seconds} s: timestamps end at {end} ms for {1000 * seconds} ms of audio")
    scene = module.get_scene_embeddings(white_noise(4, 2.74, model.sample_rate), model)
    if scene.dtype != torch.float32 or tuple(scene.shape) != (4, model.scene_embedding_size):
        errors.append(f"scene embeddings {scene.dtype} {tuple(scene.shape)}")
    return errors


def test_the_restated_checks_catch_a_broken_api(hear_model) -> None:
    """The checks can fail: timestamps in seconds instead of milliseconds, float64 embeddings."""

    class InSeconds:
        load_model = staticmethod(hear.load_model)
        get_scene_embeddings = staticmethod(hear.get_scene_embeddings)

        @staticmethod
        def get_timestamp_embeddings(audio, model):
            embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
            return embeddings.double(), timestamps / 1000

    errors = validation_errors(InSeconds, hear_model)
    assert any("float64" in e for e in errors) and any("end at" in e for e in errors)


def test_hear_validator_checks_pass(hear_model) -> None:
    assert validation_errors(hear, hear_model) == []
    assert (hear_model.sample_rate, hear_model.scene_embedding_size) == (16000, 192)
    assert hear_model.timestamp_embedding_size == 192


@pytest.mark.parametrize("size", ["ced_tiny", "ced_mini", "ced_small", "ced_base"])
def test_each_size_has_its_hear_module(size: str, ced_reference: Path) -> None:
    """`hear-validator ced_lightning.hear.ced_tiny -m FILE`: the per-size modules have the API and load any
    checkpoint given; without one, their own released size (next test)."""
    module = importlib.import_module(f"ced_lightning.hear.{size}")
    assert module.get_scene_embeddings is hear.get_scene_embeddings
    assert module.get_timestamp_embeddings is hear.get_timestamp_embeddings
    model = module.load_model(str(ced_reference / "ced_tiny_depth2_random.pt"))
    assert isinstance(model, hear.HearCED) and model.scene_embedding_size == 192


@pytest.mark.parametrize("seconds", [0.1, 1.07, 4.0, 25.0])
def test_timestamps_are_token_columns_in_milliseconds(hear_model, seconds: float) -> None:
    """One timestamp per 160 ms token column, at the centre of its 16 frames (frame k centred at 10k ms):
    75, 235, 395, ... ms, the same for every sound, strictly increasing, every whole column of a clip longer
    than the model's 10.12 s window included (25 s: 2501 frames, 156 columns)."""
    audio = white_noise(2, seconds, 16000)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, hear_model)
    frames = audio.shape[1] // 160 + 1
    columns = max(1, (frames - 16) // 16 + 1)
    assert embeddings.shape == (2, columns, 192) and timestamps.shape == (2, columns)
    assert timestamps.dtype == torch.float32 and torch.equal(timestamps[0], timestamps[1])
    if frames < 16:  # one column, zero-padded: its timestamp is the clip's middle
        assert timestamps[0].tolist() == [pytest.approx(500 * seconds)]
    else:
        assert timestamps[0].tolist() == [160.0 * k + 75.0 for k in range(columns)]
    assert torch.isfinite(embeddings).all()


def test_a_column_is_its_tokens_mean_over_frequency(hear_model) -> None:
    """Column k of a clip within one window is the mean of the encoder's tokens (f, k) over the 4 frequency
    rows: the tokens are frequency-major (`CED.forward_features` flattens `[dim, freq, time]`)."""
    ced = hear_model.model
    audio = white_noise(1, 3.0, 16000)
    embeddings, _ = hear.get_timestamp_embeddings(audio, hear_model)
    with torch.no_grad():
        tokens = ced.forward_features(ced.init_bn(ced.front_end(audio).unsqueeze(1)))
    columns = embeddings.shape[1]
    for k in (0, 7, columns - 1):
        expected = tokens[0, [f * columns + k for f in range(4)]].mean(0)
        torch.testing.assert_close(embeddings[0, k], expected, atol=float32_bound(expected, 8), rtol=0)


def test_long_audio_runs_in_windows_of_whole_columns(hear_model) -> None:
    """Past the model's window, columns come from windows of 63 whole columns (1008 frames) run on their own,
    their time positions restarting at 0: the second window's columns are those of its frames alone."""
    ced = hear_model.model
    with torch.no_grad():
        mel = ced.front_end(white_noise(1, 25.0, 16000, seed=3))
        whole = hear.column_embeddings(ced, mel)
        second = hear.column_embeddings(ced, mel[..., 1008:2016])
    assert whole.shape[1] == 156 and second.shape[1] == 63
    torch.testing.assert_close(
        whole[:, 63:126], second, atol=float32_bound(second, BATCH_ACCUMULATED), rtol=0
    )


def test_a_sound_embeds_the_same_alone_and_in_a_batch(hear_model) -> None:
    audio = white_noise(3, 12.5, 16000, seed=1)  # two windows: 63 columns and 14
    audio[1] *= 0.01  # a quiet sound beside loud ones: nothing (the dB floor, BatchNorm) is shared
    batch_columns, batch_times = hear.get_timestamp_embeddings(audio, hear_model)
    batch_scene = hear.get_scene_embeddings(audio, hear_model)
    for i in range(3):
        columns, times = hear.get_timestamp_embeddings(audio[i : i + 1], hear_model)
        scene = hear.get_scene_embeddings(audio[i : i + 1], hear_model)
        assert torch.equal(times[0], batch_times[i])
        bound = float32_bound(columns, BATCH_ACCUMULATED)
        torch.testing.assert_close(batch_columns[i : i + 1], columns, atol=bound, rtol=0)
        bound = float32_bound(scene, BATCH_ACCUMULATED)
        torch.testing.assert_close(batch_scene[i : i + 1], scene, atol=bound, rtol=0)


def test_scene_embedding_is_the_models_own_clip_embedding(hear_model, ced_reference: Path) -> None:
    """The scene embedding is `CED.embed` (what the head classifies); for a clip within one window it is
    also the mean of its timestamp embeddings (every token weighs the same)."""
    audio = white_noise(2, 4.0, 16000, seed=2)
    scene = hear.get_scene_embeddings(audio, hear_model)
    ced = load_ced(ced_reference / "ced_tiny_depth2_random.pt")
    with torch.no_grad():
        assert torch.equal(scene, ced.embed(audio))
    columns, _ = hear.get_timestamp_embeddings(audio, hear_model)
    torch.testing.assert_close(columns.mean(1), scene, atol=float32_bound(scene, 64), rtol=0)


def test_no_weights_file_loads_the_released_size(ced_reference: Path, tmp_path: Path, monkeypatch) -> None:
    """HEAR's "no weights file" (`load_model()` or `""`) loads the module's released size; offline here, from
    the torch.hub cache holding the random checkpoint under CED-Tiny's released file name."""
    from ced_lightning.hear import ced_tiny

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "audiotransformer_tiny_mAP_4814.pt").write_bytes(
        (ced_reference / "ced_tiny_depth2_random.pt").read_bytes()
    )
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model in (ced_tiny.load_model(), ced_tiny.load_model(""), hear.load_model("ced_tiny")):
        assert model.scene_embedding_size == 192 and len(model.model.blocks) == 2
    with pytest.raises(FileNotFoundError, match="ced_mini"):
        hear.load_model()  # the package's default, ced_mini, is in no cache: the error names it
