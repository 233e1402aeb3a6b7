"""CED models: shapes and parameter counts of the released sizes, and the original's outputs (within float32
rounding: they were computed by other kernels)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import fsspec
import pytest
import soundfile as sf
import torch
from fsspec.implementations.memory import MemoryFileSystem

from ced_lightning.models import (
    CED,
    TimmMelClassifier,
    average_pieces,
    create_ced,
    list_ced,
    load_ced,
    load_checkpoint,
    load_matching_weights,
    load_model,
    model_spec,
    save_ced,
)
from conftest import CED_TINY_SUMS, FRONT_END_SUMS, float32_bound


def _wav(path) -> torch.Tensor:
    # Read as the reference did: PCM16 / 32768, shape (1, samples).
    data, sr = sf.read(path, dtype="float32")
    assert sr == 16000
    return torch.from_numpy(data)[None]


@pytest.fixture(scope="module")
def expected(ced_reference):
    return torch.load(ced_reference / "expected_outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference_model(ced_reference) -> CED:
    return load_ced(ced_reference / "ced_tiny_depth2_random.pt")


@pytest.mark.parametrize("size", ["tiny", "mini", "small", "base"])
def test_state_dict_and_parameter_count_match_released(size, ced_reference):
    reference = json.loads((ced_reference / "state_dict_shapes.json").read_text())[size]
    model = create_ced(f"ced_{size}")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]


def test_parameter_counts_in_the_issue():
    counts = {name: sum(p.numel() for p in create_ced(name).parameters()) for name in list_ced()}
    assert counts == {
        "ced_tiny": 5_503_183,
        "ced_mini": 9_696_655,
        "ced_small": 21_622_543,
        "ced_base": 85_711_759,
    }


def test_load_infers_depth_and_length(reference_model):
    assert reference_model.config.depth == 2
    assert reference_model.config.embed_dim == 192
    assert reference_model.config.target_length == 1012
    assert not reference_model.training


@pytest.mark.parametrize(
    ("name", "wav", "crop"),
    [
        ("snap_1s", "snap_1s.wav", None),
        ("long_25s", "long_25s.wav", None),  # 2501 frames: split into 1012-frame pieces, averaged
        ("long_25s.first10s", "long_25s.wav", 160_000),
    ],
)
def test_reproduces_reference_logits(expected, ced_reference, name, wav, crop):
    # The reference was made with the original's pooling="logit": long clips average their pieces' logits.
    path = ced_reference / "ced_tiny_depth2_random.pt"
    model = load_ced(path, config=replace(load_ced(path).config, piece_average="logit"))
    audio = _wav(ced_reference / wav)
    if crop:
        audio = audio[:, :crop]
    with torch.no_grad():
        logits = model(audio)
    assert logits.shape == (1, 527)
    assert (logits - expected[name]).abs().max() <= float32_bound(expected[name], CED_TINY_SUMS)


def test_reproduces_reference_batch_and_front_end(reference_model, expected, ced_reference):
    long = _wav(ced_reference / "long_25s.wav")
    batch = torch.cat([long[:, :160_000], long[:, 160_000:320_000]])
    with torch.no_grad():
        bound = float32_bound(expected["batch_two_10s"], CED_TINY_SUMS)
        assert (reference_model(batch) - expected["batch_two_10s"]).abs().max() <= bound
        mel = reference_model.front_end(_wav(ced_reference / "snap_1s.wav"))
    assert mel.shape == expected["snap_1s.mel"].shape
    assert (mel - expected["snap_1s.mel"]).abs().max() <= float32_bound(
        expected["snap_1s.mel"], FRONT_END_SUMS
    )


@pytest.mark.parametrize("wrap", ["model", "bare"])
def test_released_file_layouts_load_strict(tmp_path, ced_reference, reference_model, wrap):
    sd = torch.load(ced_reference / "ced_tiny_depth2_random.pt", weights_only=True)["model"]
    path = tmp_path / "audiotransformer_tiny_mAP_0000.pt"
    torch.save({"model": sd} if wrap == "model" else sd, path)
    model = load_ced(path)
    for key, value in reference_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_save_roundtrip_keeps_exact_config(tmp_path):
    model = create_ced("ced_tiny", depth=1, num_classes=12, target_length=304, front_end={"n_mels": 64})
    save_ced(model, tmp_path / "m.pt")
    loaded = load_ced(tmp_path / "m.pt")
    assert loaded.config == model.config
    # The released layout ({'model': sd}) is kept, so the original code reads our files too.
    assert set(torch.load(tmp_path / "m.pt", weights_only=True)) == {"model", "ced_config"}


def test_load_rejects_a_file_that_is_not_ced(tmp_path):
    torch.save({"model": {"weight": torch.zeros(3)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a CED state dict"):
        load_ced(tmp_path / "x.pt")


def test_init_from_resizes_position_embeddings(tmp_path, ced_reference):
    shutil.copy(ced_reference / "ced_tiny_depth2_random.pt", tmp_path / "ref.pt")
    reference = load_ced(tmp_path / "ref.pt")
    student = create_ced("ced_tiny", depth=2, num_classes=10, target_length=512)
    report = load_matching_weights(student, tmp_path / "ref.pt")
    assert report.head == ["outputlayer.1.weight", "outputlayer.1.bias"] and report.skipped == report.head
    assert report.resized == ["time_pos_embed"]
    assert torch.equal(student.time_pos_embed, reference.time_pos_embed[..., :32])
    assert torch.equal(student.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight)


def test_a_deeper_model_from_a_shallower_file_starts_as_that_network(tmp_path):
    """CED-Mini from a 4-block CED-Mini (the demo's `experiment=ced_mini`): the 8 blocks the file lacks start
    as identities, so the grown model's outputs are the file's model's (same kernels on this machine: equal),
    and they still learn (their output projections get gradients)."""
    torch.manual_seed(0)
    shallow = create_ced("ced_mini", depth=4, num_classes=16).eval()
    save_ced(shallow, tmp_path / "shallow.pt")
    deep = create_ced("ced_mini", depth=12, num_classes=16).eval()
    report = load_matching_weights(deep, tmp_path / "shallow.pt", strict=False)
    assert {key.split(".")[1] for key in report.missing} == {str(i) for i in range(4, 12)}
    wave = torch.randn(2, 16000)
    with torch.no_grad():
        assert torch.equal(deep(wave), shallow(wave))
    deep.train()
    deep(wave).sum().backward()
    assert deep.blocks[11].mlp.fc2.weight.grad.abs().sum() > 0
    # A file that lacks other tensors too (here the first block) is no growth: nothing is zeroed.
    partial = {k: v for k, v in shallow.state_dict().items() if not k.startswith("blocks.0.")}
    torch.save({"model": partial, "ced_config": shallow.config.to_dict()}, tmp_path / "partial.pt")
    other = create_ced("ced_mini", depth=12, num_classes=16)
    load_matching_weights(other, tmp_path / "partial.pt", strict=False)
    assert other.blocks[11].mlp.fc2.weight.abs().sum() > 0


def test_variable_length_and_spectrogram_entry():
    torch.manual_seed(0)
    model = create_ced("ced_tiny", depth=1).eval()
    with torch.no_grad():
        short = model(torch.randn(2, 8000))
        exact_two_pieces = model.forward_spectrogram(torch.randn(1, 64, 2024))
        # Shorter than one 16-frame patch (the original fails): zero-padded after BatchNorm.
        tiny = model(torch.randn(2, 1000))
        tiny_mel = model.forward_spectrogram(model.front_end(torch.randn(1, 1000)))
    assert short.shape == (2, 527) and tiny.shape == (2, 527) and tiny_mel.shape == (1, 527)
    assert exact_two_pieces.shape == (1, 527)
    assert torch.isfinite(tiny).all()


def test_long_clip_pieces_average_probabilities_like_the_released_models(reference_model, ced_reference):
    # The original's default pooling="mean" puts a sigmoid on each piece and averages the probabilities.
    path = ced_reference / "ced_tiny_depth2_random.pt"
    by_logit = load_ced(path, config=replace(reference_model.config, piece_average="logit"))
    mel = torch.randn(2, 64, 2024) * 20 - 40  # two whole pieces, each also a valid input on its own
    with torch.no_grad():
        first, second = (reference_model.forward_spectrogram(mel[..., s : s + 1012]) for s in (0, 1012))
        p = (torch.sigmoid(first) + torch.sigmoid(second)) / 2
        assert (torch.sigmoid(reference_model.forward_spectrogram(mel)) - p).abs().max() < 1e-6
        assert (by_logit.forward_spectrogram(mel) - (first + second) / 2).abs().max() < 1e-5
    assert (first - second).abs().max() > 0.1  # so the two averages differ


def test_embed_is_what_the_head_classifies_and_pieces_are_averaged(reference_model):
    """`embed` (predict's `outputs=[embeddings]`) is the pooled feature before the head: the head on it gives
    `forward`'s logits for a clip of one piece; a clip of two whole pieces embeds as their mean."""
    torch.manual_seed(0)
    wave = torch.randn(2, 16000 * 3)
    with torch.no_grad():
        embedding = reference_model.embed(wave)
        assert embedding.shape == (2, reference_model.config.embed_dim)
        assert (reference_model.outputlayer(embedding) - reference_model(wave)).abs().max() < 1e-5
        mel = torch.randn(1, 64, 2024) * 20 - 40
        halves = [reference_model.embed_spectrogram(mel[..., s : s + 1012]) for s in (0, 1012)]
        assert (reference_model.embed_spectrogram(mel) - (halves[0] + halves[1]) / 2).abs().max() < 1e-5
        assert (halves[0] - halves[1]).abs().max() > 0.01
    timm_model = TimmMelClassifier("mobilenetv3_small_050", num_classes=7).eval()
    with torch.no_grad():
        pooled = timm_model.embed(wave)
        assert (timm_model.backbone.get_classifier()(pooled) - timm_model(wave)).abs().max() < 1e-5
        for model in (reference_model, timm_model):  # one pass gives both, as the separate calls do
            logits, embedding = model.forward_and_embed(wave)
            assert (logits - model(wave)).abs().max() < 1e-5 and (
                embedding - model.embed(wave)
            ).abs().max() == 0
        long_wave = torch.randn(1, 16000 * 25)
        long_logits, long_embedding = reference_model.forward_and_embed(long_wave)
        assert (long_logits - reference_model(long_wave)).abs().max() < 1e-5
        assert long_embedding.shape == (1, reference_model.config.embed_dim)


def test_average_pieces_keeps_extreme_probabilities():
    logits = torch.tensor([[[40.0, -40.0, 0.0, 3.0]], [[30.0, -50.0, 0.0, -1.0]]])
    got = average_pieces(logits, "probability")
    assert torch.isfinite(got).all()
    expected = torch.logit(torch.sigmoid(logits.double()).mean(0))
    assert torch.allclose(got.double()[:, 2:], expected[:, 2:], atol=1e-6)
    # Near 1 a float32 logit(mean p) is inf; in log space it is log(2) - log(e^-40 + e^-30).
    near_one = math.log(2) - torch.logsumexp(torch.tensor([-40.0, -30.0]), 0).item()
    near_zero = torch.logsumexp(torch.tensor([-40.0, -50.0]), 0).item() - math.log(2)
    assert abs(got[0, 0].item() - near_one) < 1e-4 and abs(got[0, 1].item() - near_zero) < 1e-4
    assert average_pieces(logits, "logit").equal(logits.mean(0))
    with pytest.raises(ValueError, match="piece_average"):
        average_pieces(logits, "max")


def test_bf16_autocast_keeps_front_end_in_float32():
    model = create_ced("ced_tiny", depth=1).eval()
    wave = torch.randn(2, 16000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mel = model.front_end(wave)
        logits = model(wave)
    assert mel.dtype == torch.float32
    assert logits.dtype == torch.bfloat16
    with torch.no_grad():
        reference = model(wave)
    assert torch.allclose(logits.float(), reference, atol=0.1)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = create_ced("ced_tiny", depth=1, num_classes=5).eval()
    wave = torch.randn(1, 16000)
    with torch.no_grad():
        eager = model(wave)
        compiled = torch.compile(model)(wave)
    # Inductor's generated kernels against ATen's: the same sums in another order.
    assert (eager - compiled).abs().max() <= float32_bound(eager, CED_TINY_SUMS)


def test_timm_backbone_on_128_mel():
    model = TimmMelClassifier("mobilenetv3_small_050", num_classes=7).eval()
    assert model.front_end.config.n_mels == 128
    with torch.no_grad():
        assert model(torch.randn(2, 16000)).shape == (2, 7)


@pytest.mark.parametrize("arch", ["ced", "timm"])
def test_load_model_from_lightning_style_checkpoint(tmp_path, arch):
    model = (
        create_ced("ced_tiny", depth=1, num_classes=4)
        if arch == "ced"
        else TimmMelClassifier("mobilenetv3_small_050", num_classes=4)
    ).eval()
    checkpoint = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "model_spec": model_spec(model),
        "class_names": ["a", "b", "c", "d"],
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    loaded = load_model(tmp_path / "last.ckpt")
    wave = torch.randn(1, 16000)
    with torch.no_grad():
        assert torch.equal(loaded(wave), model(wave))
    assert load_checkpoint(tmp_path / "last.ckpt").class_names == ["a", "b", "c", "d"]


class CountingMemoryFileSystem(MemoryFileSystem):
    """An in-memory filesystem under its own protocol that records every read of a file, as a stand-in for
    object storage where each read of a checkpoint is a download."""

    protocol = "countingmemory"
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    reads: ClassVar[list[str]] = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix(f"{cls.protocol}://"))

    def _open(self, path, mode="rb", **kwargs):
        if "r" in mode:
            self.reads.append(self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.reads.append(self._strip_protocol(path))
        return super().cat_file(path, start, end, **kwargs)


@pytest.fixture
def counting_fs():
    protocol = CountingMemoryFileSystem.protocol
    fsspec.register_implementation(protocol, CountingMemoryFileSystem, clobber=True)
    fs = fsspec.filesystem(protocol)
    yield fs
    fs.store.clear()
    fs.reads.clear()


@pytest.mark.parametrize("layout", ["released", "save_ced", "lightning"])
def test_load_checkpoint_reads_the_file_once(counting_fs, layout):
    model = create_ced("ced_tiny", depth=1, num_classes=4).eval()
    url = f"{counting_fs.protocol}://checkpoints/{layout}.pt"
    if layout == "save_ced":
        save_ced(model, url)
    else:
        checkpoint = (
            {"model": model.state_dict()}
            if layout == "released"
            else {
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_spec": model_spec(model),
                "class_names": ["a", "b", "c", "d"],
            }
        )
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        counting_fs.pipe(url, buffer.getvalue())

    loaded = load_checkpoint(url, sha256=True)
    assert counting_fs.reads == [f"/checkpoints/{layout}.pt"]
    counting_fs.reads.clear()
    assert load_model(url).num_classes == 4
    assert len(counting_fs.reads) == 1  # released files used to be loaded twice: once to look, once to build

    assert loaded.sha256 == hashlib.sha256(counting_fs.cat(url)).hexdigest()
    assert loaded.source == url
    assert loaded.class_names == (["a", "b", "c", "d"] if layout == "lightning" else None)
    assert not loaded.model.training
    wave = torch.randn(1, 16000)
    with torch.no_grad():
        assert torch.equal(loaded.model(wave), model(wave))


def test_front_end_refuses_int16_samples():
    model = create_ced("ced_tiny", depth=1).eval()
    with pytest.raises(TypeError, match="int16_to_float"):
        model(torch.zeros(1, 8000, dtype=torch.int16))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_load_errors_name_the_file(tmp_path: Path) -> None:
    """Before: torch's `UnpicklingError: Weights only load failed ...` (or a corrupt file's error) did not say
    which checkpoint it was, which matters with several teachers. Malicious pickles stay refused."""
    from ced_lightning.models import read_state_dict
    from ced_lightning.models.checkpoint import CheckpointLoadError

    marker = tmp_path / "code_ran"
    torch.save({"model": _Exploit(marker)}, tmp_path / "teacher_2.ckpt")
    named = rf"{tmp_path / 'teacher_2.ckpt'}: cannot load this checkpoint"
    for read in (load_checkpoint, load_ced, read_state_dict):  # predict/extract, CED files, init_from
        with pytest.raises(CheckpointLoadError, match=named):
            read(tmp_path / "teacher_2.ckpt")
    assert not marker.exists()
    save_ced(create_ced("ced_tiny", depth=1), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:5000])
    with pytest.raises(CheckpointLoadError, match=r"cut\.pt: cannot load this checkpoint \("):
        load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_checkpoint(tmp_path / "missing.pt")
