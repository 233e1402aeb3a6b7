"""Dynamic int8 linear layers: eager (`quantize_dynamic_int8`) and exported (`export quantize=int8`).

Tolerances: int8 weights with one scale per tensor round each weight by at most half a step (max |w| / 254),
and activations are quantized per batch the same way, so a layer's output moves by well under 1 % of its
range; through a CED's blocks this moved the demo teacher's probabilities by at most 0.011 (eager) and
0.008 (ONNX Runtime) over the 300 demo test clips, at a mAP cost under 0.001. The tests allow 0.05 on
random-weight networks, and require a difference above zero, which float32 paths do not show at this scale
(the exported float32 graph matches PyTorch to 1e-6): a quantization that silently did nothing fails.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from ced_lightning.models import apply_quantization, create_ced, model_spec, quantize_dynamic_int8

PROBABILITY_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_ced("ced_tiny", depth=2, num_classes=10).eval()


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return 0.1 * torch.randn(3, 3 * 16000, generator=generator)


def _linear_layers(module: nn.Module) -> int:
    return sum(type(m) is nn.Linear for m in module.modules())


def test_int8_replaces_every_linear_layer_and_stays_close(model, clips):
    linear = _linear_layers(model)
    quantized = quantize_dynamic_int8(model)
    dynamic = [m for m in quantized.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert linear > 0 and len(dynamic) == linear and _linear_layers(quantized) == 0
    assert _linear_layers(model) == linear  # the float model is left as it was
    with torch.inference_mode():
        expected = torch.sigmoid(model(clips))
        got = torch.sigmoid(quantized(clips))
    difference = float((got - expected).abs().max())
    assert 0 < difference < PROBABILITY_TOLERANCE
    # the front end (STFT, mel filterbank, dB) stays float32: its output is unchanged
    with torch.inference_mode():
        assert torch.equal(quantized.front_end(clips), model.front_end(clips))


def test_apply_quantization_names_the_key(model):
    assert apply_quantization(model, None) is model
    with pytest.raises(ValueError, match=r"quantize='int4'.*null.*int8"):
        apply_quantization(model, "int4")


@pytest.mark.slow  # one torch.export: about 10 s on 2 cores
def test_export_quantize_int8_runs_in_onnxruntime_close_to_float(model, clips, tmp_path, monkeypatch, capsys):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from ced_lightning.export import linear_layer_nodes, main, onnx_session, run_onnx

    ckpt = tmp_path / "tiny.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_spec": model_spec(model)}, ckpt)
    output = tmp_path / "tiny_int8.onnx"
    argv = ["export", f"ckpt={ckpt}", f"output={output}", "quantize=int8", f"paths.root_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test's thread count
    main()
    message = capsys.readouterr().out
    assert "linear layers in int8" in message and "max |logits - PyTorch|" in message
    assert "(probabilities: " in message  # what int8 costs on the scale of the tags

    graph = onnx.load(str(output))
    ops = [node.op_type for node in graph.graph.node]
    # every linear layer of the network (4 per block and the head) became an integer product ...
    assert ops.count("MatMulInteger") == 4 * model.config.depth + 1
    assert linear_layer_nodes(graph) == []  # no float linear layer left outside the front end
    # ... and the front end's mel filterbank product stayed float
    assert any(node.op_type == "MatMul" and node.input[1] == "front_end.mel_fb" for node in graph.graph.node)

    logits, probabilities = run_onnx(onnx_session(output, threads=1), clips)
    with torch.inference_mode():
        expected = torch.sigmoid(model(clips)).numpy()
    difference = float(np.abs(probabilities - expected).max())
    assert 0 < difference < PROBABILITY_TOLERANCE
    assert logits.shape == (3, 10)


def test_export_refuses_an_unknown_quantize(tmp_path, monkeypatch, capsys):
    from ced_lightning.export import main

    output = tmp_path / "x.onnx"
    argv = ["export", "ckpt=x.ckpt", f"output={output}", "quantize=fp8", f"paths.root_dir={tmp_path}"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:  # one line, exit status 2: a config value
        main()
    assert exit_info.value.code == 2
    assert "export: error: quantize: expected one of int8 or null, got 'fp8'" in capsys.readouterr().err
    assert not output.exists()


def _checkpoint(model: nn.Module, path, class_names=None):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_spec": model_spec(model), "class_names": class_names}, path)
    return path


def _predict(argv: list[str], monkeypatch) -> None:
    from ced_lightning.predict import main

    monkeypatch.setattr(sys, "argv", ["predict", *argv])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep the test's thread count
    main()


def test_predict_quantize_int8_tags_wavs_close_to_float(model, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    wavs = []
    for name, seconds in (("a", 1.0), ("b", 2.5), ("long", 12.0)):  # 12 s: two 10 s windows
        path = tmp_path / f"{name}.wav"
        sf.write(path, 0.1 * rng.standard_normal(int(seconds * 16000)).astype(np.float32), 16000)
        wavs.append(path)
    ckpt = _checkpoint(model, tmp_path / "tiny.ckpt", [f"class{i}" for i in range(10)])
    tags = {}
    for quantize in ("null", "int8"):
        output = tmp_path / f"tags_{quantize}.jsonl"
        argv = [
            f"ckpt={ckpt}",
            f"inputs=[{','.join(str(w) for w in wavs)}]",
            "topk=10",  # every class: compare all probabilities
            f"output={output}",
            f"quantize={quantize}",
            f"paths.root_dir={tmp_path}",
        ]
        _predict(argv, monkeypatch)
        rows = [json.loads(line) for line in output.read_text().splitlines()]
        tags[quantize] = {
            row["file"]: {label["index"]: label["probability"] for label in row["labels"]} for row in rows
        }
    assert tags["int8"].keys() == tags["null"].keys() == {str(w) for w in wavs}
    differences = [
        abs(tags["int8"][file][c] - tags["null"][file][c]) for file in tags["null"] for c in range(10)
    ]
    assert 0 < max(differences) < PROBABILITY_TOLERANCE


def test_predict_refuses_int8_off_the_cpu_and_unknown_values(model, tmp_path, monkeypatch, capsys):
    ckpt = _checkpoint(model, tmp_path / "tiny.ckpt")
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(16000, dtype=np.float32), 16000)
    for override, message in (
        (
            ["quantize=int8", "device=cuda"],
            "quantize=int8 runs on the CPU only (device=cuda): use device=cpu",
        ),
        (["quantize=int4"], "quantize: expected one of int8 or null, got 'int4'"),
    ):
        with pytest.raises(SystemExit):  # the error in one line, exit status 2
            _predict(
                [f"ckpt={ckpt}", f"inputs=[{wav}]", f"paths.root_dir={tmp_path}", *override], monkeypatch
            )
        assert message in capsys.readouterr().err
