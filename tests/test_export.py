"""ONNX export of the reference CED: onnxruntime equals PyTorch on short, long (> 10.12 s), batched input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # two torch.export runs: about 15-30 s on 2 cores

from ced_lightning.export import DftLogMel, ExportableTagger, export_onnx, onnx_session, run_onnx  # noqa: E402
from ced_lightning.models import create_ced, load_ced  # noqa: E402
from conftest import CED_TINY_SUMS, FRONT_END_SUMS, float32_bound  # noqa: E402


def _close(got: np.ndarray, expected: torch.Tensor | np.ndarray) -> bool:
    """onnxruntime's kernels against PyTorch's (or the original's): equal within float32 rounding."""
    return np.abs(got - np.asarray(expected)).max() <= float32_bound(expected, CED_TINY_SUMS)


def _wav(path) -> torch.Tensor:
    data, sr = sf.read(path, dtype="float32")
    assert sr == 16000
    return torch.from_numpy(data)[None]


@pytest.fixture(scope="module")
def reference_model(ced_reference):
    return load_ced(ced_reference / "ced_tiny_depth2_random.pt")


@pytest.fixture(scope="module")
def models(reference_model, ced_reference) -> dict[str, torch.nn.Module]:
    # One export per way of averaging long clips' pieces: the released models' probabilities (default) and
    # the logits the reference vectors were made with.
    logit_pieces = replace(reference_model.config, piece_average="logit")
    return {
        "waveform": reference_model,
        "spectrogram": load_ced(ced_reference / "ced_tiny_depth2_random.pt", config=logit_pieces),
    }


@pytest.fixture(scope="module")
def sessions(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    return {
        kind: onnx_session(export_onnx(model, folder / f"{kind}.onnx", input_kind=kind))
        for kind, model in models.items()
    }


def test_dft_front_end_matches_torchaudio(reference_model, ced_reference):
    loud = _wav(ced_reference / "long_25s.wav")[:, :200_000]
    # A loud and a very quiet clip in one batch: the 120 dB floor must be each clip's own.
    audio = torch.cat([loud, 1e-4 * loud])
    with torch.no_grad():
        expected = reference_model.front_end(audio)
        got = DftLogMel(reference_model.front_end)(audio)
    assert got.shape == expected.shape
    # A DFT matmul against torchaudio's FFT: the same sums in another order (3.9e-3 dB at the quiet clip's
    # 100 dB magnitude), far below anything the network resolves.
    assert (got - expected).abs().max().item() <= float32_bound(expected, FRONT_END_SUMS)


@pytest.mark.parametrize("kind", ["waveform", "spectrogram"])
def test_split_path_equals_model_without_export(models, kind):
    # The branch-free split is the same function as CED's `if`, for short, exact and long inputs.
    model = models[kind]
    wrapper = ExportableTagger(model, "spectrogram").eval()
    for frames in (9, 101, 1012, 1013, 2501):
        mel = torch.randn(2, 64, frames)
        with torch.no_grad():
            expected = model.forward_spectrogram(mel)
            logits, probs = wrapper(mel)
        assert (logits - expected).abs().max().item() < 1e-5
        assert torch.allclose(probs, torch.sigmoid(logits))


@pytest.mark.parametrize("kind", ["waveform", "spectrogram"])
@pytest.mark.parametrize("wav", ["snap_1s.wav", "long_25s.wav"])
def test_onnx_matches_pytorch_on_reference_wavs(sessions, models, ced_reference, kind, wav):
    audio, model = _wav(ced_reference / wav), models[kind]
    expected_outputs = torch.load(ced_reference / "expected_outputs.pt", weights_only=True)
    with torch.no_grad():
        torch_logits = model(audio)
        x = audio if kind == "waveform" else model.front_end(audio)
    logits, probs = run_onnx(sessions[kind], x)
    assert logits.shape == (1, 527)
    assert _close(logits, torch_logits)
    if model.config.piece_average == "logit" or wav == "snap_1s.wav":
        # And the original CED implementation's logits (tests/data/ced_reference, made with pooling="logit").
        assert _close(logits, expected_outputs[wav.removesuffix(".wav")])
    assert _close(probs, torch.sigmoid(torch_logits))


@pytest.mark.parametrize("kind", ["waveform", "spectrogram"])
def test_onnx_batch_of_two_with_another_length(sessions, models, ced_reference, kind):
    # Exported with a 12 s batch of 2; run 2 x 10 s (1001 frames, one piece) and 3 x 20.5 s (three pieces).
    audio = _wav(ced_reference / "long_25s.wav")[0]
    expected_outputs = torch.load(ced_reference / "expected_outputs.pt", weights_only=True)
    for batch in (torch.stack([audio[:160_000], audio[160_000:320_000]]), audio[:328_000].repeat(3, 1)):
        with torch.no_grad():
            torch_logits = models[kind](batch)
            x = batch if kind == "waveform" else models[kind].front_end(batch)
        logits, _ = run_onnx(sessions[kind], x)
        assert logits.shape == (batch.shape[0], 527)
        assert _close(logits, torch_logits)
        if batch.shape[0] == 2:
            assert _close(logits, expected_outputs["batch_two_10s"])


def test_bad_arguments_are_rejected(tmp_path):
    tiny = create_ced("ced_tiny", depth=1, num_classes=4)
    with pytest.raises(ValueError, match="input='mel'"):
        ExportableTagger(tiny, "mel")
    with pytest.raises(ValueError, match="opset=17"):
        export_onnx(tiny, tmp_path / "x.onnx", opset=17)


def test_onnx_takes_clips_shorter_than_one_stft_window(sessions, models):
    """The short-clip rule in the exported front end: zero-padded at the end to one window (512 samples).
    Before, the export's smallest input was 2560 samples and shorter ones failed in the reflect padding."""
    model = models["waveform"]
    for samples in (2, 200, 511, 2000):
        x = 0.1 * torch.randn(2, samples, generator=torch.Generator().manual_seed(samples))
        with torch.no_grad():
            expected = model(x)
        logits, _ = run_onnx(sessions["waveform"], x)
        assert _close(logits, expected), samples
