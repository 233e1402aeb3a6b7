"""Export a trained model to ONNX, with dynamic batch and time axes, or to the Hugging Face Hub port's layout.

    python -m ced_lightning.export ckpt=model.ckpt output=model.onnx [input=waveform|spectrogram] [opset=18]
                                   [quantize=int8]
    python -m ced_lightning.export format=hf ckpt=model.ckpt output=DIR [push_to_hub=USER/REPO]

`format=hf` writes the folder the Hub port of CED reads (`engines.hub_export`, `models.hub`:
model.safetensors, config.json, preprocessor_config.json).

`input=waveform` takes `[batch, samples]` float32 audio at 16 kHz and includes the log-mel front end;
`input=spectrogram` takes the front end's output `[batch, n_mels, frames]`. Both give `logits` and
`probabilities` `[batch, classes]`.

`quantize=int8` writes the network's linear layers in dynamic int8 (`quantize_onnx_int8`, onnxruntime's
`quantize_dynamic`: int8 weights, activations quantized at run time), the front end and attention's
products in float32.

Two things the eager model does are exported differently, computing the same values:
- the STFT: a strided convolution with the windowed DFT basis, then |.|^2, the same mel filterbank and dB
  conversion. ONNX's STFT operator (what the exporter writes for `torch.stft`) ran 1.7x slower in
  onnxruntime 1.32 than this convolution for a 10 s clip (12.2 vs 7.0 ms, 1 thread, 2-core EPYC);
- CED's "split clips longer than 10.12 s into pieces" is a Python `if` on the number of frames, which an
  exporter would freeze at the example's length: here it is branch-free shape arithmetic (piece length
  = min(frames, target_length), pieces = ceil(frames / piece length)), so one graph serves every length.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from os import PathLike
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

import ced_lightning
from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.errors import ConfigError, InputError, MissingDependencyError
from ced_lightning.core.objective import check_objective, probabilities_from_logits
from ced_lightning.engines.launch import command_errors
from ced_lightning.models.ced import CED, LogMelFrontEnd, average_pieces

log = logging.getLogger(__name__)

INPUT_KINDS = ("waveform", "spectrogram")
MIN_OPSET = 18


class DftLogMel(nn.Module):
    """`LogMelFrontEnd` without complex numbers: same window, filterbank and dB conversion (its buffers).

    The 120 dB floor (`top_db`) is taken per clip, as `LogMelFrontEnd` does, so a clip's output does not
    depend on the other clips of its batch.
    """

    def __init__(self, front_end: LogMelFrontEnd) -> None:
        super().__init__()
        config = front_end.config
        mel, to_db = front_end[0], front_end[1]
        spectrogram = mel.spectrogram
        if spectrogram.power != 2.0 or spectrogram.normalized or spectrogram.pad:
            raise InputError("export supports the power-2, unnormalised, unpadded mel spectrogram of CED")
        self.n_fft = config.n_fft
        self.hop_length = config.hop_length
        self.center = config.center
        window = spectrogram.window.double()
        left = (self.n_fft - window.numel()) // 2  # torch.stft centres a shorter window in n_fft
        window = F.pad(window, (left, self.n_fft - window.numel() - left))
        bins = self.n_fft // 2 + 1
        angle = 2 * math.pi * torch.outer(torch.arange(bins).double(), torch.arange(self.n_fft).double())
        angle = angle / self.n_fft
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])
        self.register_buffer("basis", basis.float().unsqueeze(1), persistent=False)
        self.register_buffer("mel_fb", mel.mel_scale.fb.float().clone(), persistent=False)
        self.multiplier = float(to_db.multiplier)
        self.amin = float(to_db.amin)
        self.db_offset = float(to_db.multiplier * to_db.db_multiplier)
        self.top_db = None if to_db.top_db is None else float(to_db.top_db)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # The short-clip rule of `LogMelFrontEnd`: zero-padded at the end to one window, as shape arithmetic.
        samples = waveform.shape[-1]
        x = F.pad(waveform.float(), (0, torch.sym_max(samples, self.n_fft) - samples)).unsqueeze(1)
        if self.center:
            x = F.pad(x, (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        spec = F.conv1d(x, self.basis, stride=self.hop_length)
        real, imag = spec.chunk(2, dim=1)
        power = real * real + imag * imag
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb).transpose(1, 2)
        db = self.multiplier * torch.log10(torch.clamp(mel, min=self.amin)) - self.db_offset
        if self.top_db is not None:
            db = torch.maximum(db, db.amax(dim=(1, 2), keepdim=True) - self.top_db)
        return db


class _SplitCED(nn.Module):
    """CED's `forward_spectrogram` with the long-clip split written as shape arithmetic (no Python `if`)."""

    def __init__(self, model: CED) -> None:
        super().__init__()
        self.model = model
        self.target_length = model.config.target_length

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.model.init_bn(mel.unsqueeze(1))
        patch = self.model.config.patch_size
        x = F.pad(x, (0, torch.sym_max(frames := x.shape[-1], patch) - frames))  # shorter than one patch
        batch, _, n_mels, frames = x.shape
        piece = torch.sym_min(frames, self.target_length)
        pieces = (frames + piece - 1) // piece
        x = F.pad(x, (0, pieces * piece - frames))
        # [b, 1, f, pieces*piece] -> [pieces*b, 1, f, piece], piece-major as in CED.forward_spectrogram.
        x = x.reshape(batch, 1, n_mels, pieces, piece).permute(3, 0, 1, 2, 4).reshape(-1, 1, n_mels, piece)
        logits = self.model.forward_head(self.model.forward_features(x))
        return average_pieces(logits.reshape(pieces, batch, -1), self.model.config.piece_average)


class ExportableTagger(nn.Module):
    """What goes into the ONNX file: (optional front end) -> network -> (logits, probabilities); the
    probabilities are the model's `objective`'s (sigmoids, or one softmax for a single-label model)."""

    def __init__(
        self, model: nn.Module, input_kind: str = "waveform", objective: str = "multi_label"
    ) -> None:
        super().__init__()
        if input_kind not in INPUT_KINDS:
            raise ConfigError(f"input={input_kind!r}: choose one of {list(INPUT_KINDS)}")
        self.input_kind = input_kind
        self.objective = check_objective(objective)
        self.front_end = DftLogMel(model.front_end) if input_kind == "waveform" else None
        self.network = _SplitCED(model) if isinstance(model, CED) else _Spectrogram(model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.front_end is not None:
            x = self.front_end(x)
        logits = self.network(x)
        return logits, probabilities_from_logits(logits, self.objective)


class _Spectrogram(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.forward_spectrogram(mel)


def example_input(model: nn.Module, input_kind: str, batch: int = 2, seconds: float = 12.0) -> torch.Tensor:
    """A random input of the right kind; longer than CED's 10.12 s so the split path is traced."""
    samples = int(seconds * SAMPLE_RATE)
    generator = torch.Generator().manual_seed(0)
    waveform = 0.1 * torch.randn(batch, samples, generator=generator)
    if input_kind == "waveform":
        return waveform
    with torch.no_grad():
        return model.front_end(waveform)


def export_onnx(
    model: nn.Module,
    output: str | PathLike,
    *,
    input_kind: str = "waveform",
    opset: int = 18,
    example_seconds: float = 12.0,
    objective: str = "multi_label",
) -> Path:
    """Write `model` (eval mode, float32, CPU) to `output` as ONNX; returns the path.

    Inputs `waveform [batch, samples]` or `spectrogram [batch, n_mels, frames]`, outputs `logits` and
    `probabilities [batch, classes]` (of the model's `objective`: the checkpoint's); batch and time are
    dynamic axes. `opset` must be >= 18, the oldest torch's exporter writes (onnxruntime has run opset 18
    since 1.14).
    """
    if opset < MIN_OPSET:
        # onnx's down-converter has no adapter for Pad below 18: refuse clearly rather than half-convert.
        raise ConfigError(
            f"opset={opset}: the ONNX exporter writes opset {MIN_OPSET} or newer; use opset={MIN_OPSET}"
        )
    wrapper = ExportableTagger(model.float().cpu().eval(), input_kind, objective).eval()
    example = example_input(model, input_kind, seconds=example_seconds)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1)
    time = torch.export.Dim(
        "samples" if input_kind == "waveform" else "frames", min=_min_time(model, input_kind)
    )
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            input_names=[input_kind],
            output_names=["logits", "probabilities"],
            dynamic_shapes=({0: batch, -1: time},),
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
    program.save(str(output), external_data=False)
    return output


def _min_time(model: nn.Module, input_kind: str) -> int:
    # The shortest input the network takes: one patch of frames (16 for CED). CED's waveforms may be of any
    # length (the front end pads a clip shorter than one window, the network one shorter than a patch);
    # 2 is torch.export's smallest dynamic size. Other networks: enough samples for a patch of frames.
    patch = model.config.patch_size if isinstance(model, CED) else 16
    if input_kind == "spectrogram":
        return patch
    if isinstance(model, CED):
        return 2
    hop = model.front_end.config.hop_length
    return max(patch * hop, model.front_end.config.n_fft // 2 + 1)


def file_opset(path: str | PathLike) -> int:
    """The default-domain opset an ONNX file declares (the exporter may raise a requested one to 18)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise MissingDependencyError(
            "onnxruntime is needed to run exported models: pip install 'ced-lightning[onnx]'"
        ) from err
    return onnxruntime


def onnx_session(path: str | PathLike, threads: int | None = None):
    """An onnxruntime CPU session for an exported file (onnxruntime is the `onnx` extra); `threads` caps
    its intra-op threads (default: onnxruntime's, one per core).

    Graph optimisation at `ORT_ENABLE_ALL` (constant folding, node fusions, the CPU's blocked layouts), set
    explicitly though it is onnxruntime's default: the exported graph is optimised when the session loads
    it, so a file optimised beforehand would only save start-up time and be tied to this CPU."""
    onnxruntime = _onnxruntime()
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def linear_layer_nodes(model) -> list[str]:
    """The names of an exported graph's nodes that multiply by a weight matrix (`MatMul` or `Gemm` with a
    constant second input) outside the front end: the network's linear layers, what `quantize_onnx_int8`
    turns into int8. The front end's mel filterbank (buffer `front_end.mel_fb`) stays float: its input, a
    power spectrum spanning 12 orders of magnitude, would lose its quiet bins to 8 bits, and attention's
    activation-by-activation products stay float, as in `quantize_dynamic_int8`."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {node.output[0] for node in model.graph.node if node.op_type == "Constant"}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and node.input[1] in constants
        and not node.input[1].startswith("front_end.")
    ]


def quantize_onnx_int8(source: str | PathLike, output: str | PathLike) -> Path:
    """Write `source` (an exported float32 file) to `output` with its linear layers (`linear_layer_nodes`)
    in dynamic int8: int8 weights (one scale per tensor), activations quantized per batch at run time by
    onnxruntime's `quantize_dynamic`, the ONNX counterpart of `models.quantize_dynamic_int8`."""
    import onnx

    _onnxruntime()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    graph = model.graph
    linear = set(linear_layer_nodes(model))
    if not linear:
        raise InputError(f"{source}: no linear layers (MatMul or Gemm with constant weights) to quantize")
    # Named by exclusion: the quantizer splits a Gemm (the head) into a MatMul of a new name and an Add, so
    # a list of the nodes to quantize would miss it.
    others = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in linear]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    previous = logging.root.manager.disable
    # The quantizer logs a line per tensor on the root logger, and advises `quant_pre_process`, which gained
    # nothing here (its symbolic shape inference fails on the dynamic graph; without it, CED-Tiny ran 18.7
    # vs 18.3 ms in int8, 1 thread).
    logging.disable(logging.WARNING)
    try:
        quantize_dynamic(
            str(source),
            str(output),
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["MatMul", "Gemm"],
            nodes_to_exclude=others,
        )
    finally:
        logging.disable(previous)
    return output


def run_onnx(session, x: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probabilities) of an exported model for one batch."""
    array = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    name = session.get_inputs()[0].name
    logits, probs = session.run(["logits", "probabilities"], {name: array.astype(np.float32)})
    return logits, probs


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="export", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    from ced_lightning.models import load_checkpoint

    for key in ("ckpt", "output"):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ConfigError(
                f"{key}= is required: python -m ced_lightning.export ckpt=PATH output=model.onnx "
                "(or format=hf output=DIR)"
            )
    torch.set_num_threads(os.cpu_count() or 1)
    if cfg.format == "hf":
        from ced_lightning.engines.hub_export import export_hub

        print(export_hub(cfg.ckpt, cfg.output, verify=bool(cfg.verify), push_to_hub=cfg.push_to_hub))
        return
    if cfg.format != "onnx":
        raise ConfigError(f"format={cfg.format!r}: choose onnx or hf")
    # The exporter's graph passes log every rewrite at INFO under Hydra's root logger: hundreds of lines.
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quantize = cfg.get("quantize")
    if quantize not in (None, "int8"):
        raise ConfigError(f"quantize={quantize!r}: choose null (float32) or int8")
    checkpoint = load_checkpoint(cfg.ckpt)
    model, objective = checkpoint.model, checkpoint.objective
    options = {"input_kind": str(cfg.input), "opset": int(cfg.opset), "objective": objective}
    if quantize is None:
        path = export_onnx(model, cfg.output, **options)
    else:
        with tempfile.TemporaryDirectory() as folder:
            float_path = export_onnx(model, Path(folder) / "float32.onnx", **options)
            path = quantize_onnx_int8(float_path, cfg.output)
    message = (
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, input={cfg.input}, opset={file_opset(path)}"
        f"{', linear layers in int8' if quantize else ''})"
    )
    if cfg.verify:
        message += "; " + verify_export(
            model, path, str(cfg.input), probabilities=quantize is not None, objective=objective
        )
    print(message)


def verify_export(
    model: nn.Module,
    path: str | PathLike,
    input_kind: str,
    probabilities: bool = False,
    objective: str = "multi_label",
) -> str:
    """Compare onnxruntime with PyTorch on a short and a long random clip; returns a one-line summary (with
    the largest probability difference too if `probabilities`: what int8 costs, on the scale of the tags)."""
    session = onnx_session(path)
    worst, worst_probability = 0.0, 0.0
    for seconds in (3.0, 25.0):
        x = example_input(model, input_kind, batch=2, seconds=seconds)
        with torch.no_grad():
            expected = model(x) if input_kind == "waveform" else model.forward_spectrogram(x)
        logits, probs = run_onnx(session, x)
        worst = max(worst, float(np.abs(logits - expected.numpy()).max()))
        expected_probs = probabilities_from_logits(expected, objective).numpy()
        worst_probability = max(worst_probability, float(np.abs(probs - expected_probs).max()))
    summary = f"max |logits - PyTorch| on 3 s and 25 s inputs: {worst:.2e}"
    return summary + (f" (probabilities: {worst_probability:.2e})" if probabilities else "")


if __name__ == "__main__":
    main()
