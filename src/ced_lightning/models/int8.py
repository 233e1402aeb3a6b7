"""Dynamic int8 linear layers for CPU inference (`predict quantize=int8`, `bench.inference`).

Weights of every `nn.Linear` are stored as int8 (one scale per tensor); activations are quantized per batch
at run time, so no calibration data is needed. In a CED that is every matrix product with weights (patch
embedding excepted, a convolution): attention's projections, the MLPs and the head. The log-mel front end
stays float32: its input spans 12 orders of magnitude of power, which 8 bits cannot hold.

`torch.ao.quantization.quantize_dynamic` is deprecated in favour of torchao's `quantize_`, but torchao's
eager int8 (`Int8DynamicActivationInt8WeightConfig`, torchao 0.18) ran CED-Tiny slower than float32 on
one CPU thread (62 vs 50 ms for a 10 s clip, 2-core EPYC), while this path (fbgemm / oneDNN kernels) ran
it in 21 ms; so this module uses it while torch ships it, and says what to do when it no longer does.
"""

from __future__ import annotations

import warnings
from copy import deepcopy

import torch
from torch import nn

from ced_lightning.core.errors import ConfigError, MissingDependencyError

QUANTIZE_CHOICES = ("int8",)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (eval mode, CPU) whose `nn.Linear` layers run with dynamic int8 quantization.

    The copy runs on the CPU only (the quantized kernels have no CUDA version); `model` is left unchanged.
    """
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as err:  # removed from torch: the deprecation notice says it will be
        raise MissingDependencyError(
            f"quantize=int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
            "no longer has: install a torch that has it (2.11 does) or run without quantize=int8"
        ) from err
    with warnings.catch_warnings():
        # The deprecation notice, once per call, about a path chosen on purpose (see the module docstring).
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=Warning)
        copy = deepcopy(model).cpu().eval()
        return quantize_dynamic(copy, {nn.Linear}, dtype=torch.qint8, inplace=True)


def apply_quantization(model: nn.Module, quantize: str | None, key: str = "quantize") -> nn.Module:
    """`model` as it is for `quantize=None` (float32), its dynamic int8 copy for `"int8"`; `key` names the
    config key in the error for any other value."""
    if quantize is None:
        return model
    if quantize == "int8":
        return quantize_dynamic_int8(model)
    raise ConfigError(f"{key}={quantize!r}: choose null (float32) or one of {list(QUANTIZE_CHOICES)}")
