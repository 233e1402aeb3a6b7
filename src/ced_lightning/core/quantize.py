"""Quantization of the teachers' top-k probabilities for the logit store.

Two kinds, both pure and vectorised:

- `float16`: IEEE half precision. Relative error <= 2^-11 for p >= 2^-14 (so absolute error <= 2^-12 ≈ 2.4e-4
  at p = 1); below 2^-14 half floats are subnormal and the absolute error is <= 2^-25 ≈ 3e-8.
- `int8`: one byte `q = round(sqrt(p) * 255)`, dequantized as `(q / 255)^2`. A square-root grid is dense where
  probabilities are small, which is where the top-k tail lives: the absolute error is at most
  `(sqrt(p) * 255 + 0.25) / 255^2`, i.e. <= 0.0040 near p = 1, <= 4.0e-4 at p = 0.01 and <= 4e-6 for p -> 0
  (probabilities below 3.8e-6 store as 0). The stored byte is unsigned (`uint8`).

The bounds are checked in `tests/test_quantize.py`; `quantization_attrs(kind)` is what the logit store
records so that any reader can dequantize without this package.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from ced_lightning.core.errors import ConfigError, InputError

QuantizationKind = Literal["float16", "int8"]
KINDS: tuple[str, ...] = ("float16", "int8")

# The sqrt grid's resolution: 255 steps between p = 0 and p = 1.
INT8_LEVELS = 255


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"quantization must be one of {list(KINDS)}, not {kind!r}")


def stored_dtype(kind: str) -> np.dtype:
    """The on-disk dtype of quantized values of `kind`."""
    _check_kind(kind)
    return np.dtype(np.float16) if kind == "float16" else np.dtype(np.uint8)


def quantize(probs: np.ndarray | torch.Tensor, kind: str) -> np.ndarray:
    """Probabilities in [0, 1] (any shape, float) -> stored values (`float16` or `uint8`)."""
    _check_kind(kind)
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().float().cpu().numpy()
    p = np.asarray(probs, dtype=np.float32)
    if p.size and not np.isfinite(p).all():
        raise InputError("cannot quantize non-finite probabilities (did a teacher produce NaN logits?)")
    # Teachers' sigmoid outputs are in [0, 1]; clipping guards against averaging round-off only.
    p = np.clip(p, 0.0, 1.0)
    if kind == "float16":
        return p.astype(np.float16)
    return np.rint(np.sqrt(p) * INT8_LEVELS).astype(np.uint8)


def dequantize(values: np.ndarray | torch.Tensor, kind: str) -> np.ndarray:
    """Stored values -> float32 probabilities (the inverse of `quantize` up to its error bound)."""
    _check_kind(kind)
    if isinstance(values, torch.Tensor):
        values = values.cpu().numpy()
    v = np.asarray(values)
    if kind == "float16":
        return v.astype(np.float32)
    if v.dtype != np.uint8:
        raise TypeError(f"int8 quantized values must be uint8, found {v.dtype}")
    root = v.astype(np.float32) / INT8_LEVELS
    return root * root


def quantization_attrs(kind: str) -> dict[str, Any]:
    """What a reader needs to dequantize: recorded as the logit store's `quantization` attribute."""
    _check_kind(kind)
    if kind == "float16":
        return {"kind": "float16", "dtype": "float16", "decode": "p = float(value)"}
    return {
        "kind": "int8",
        "dtype": "uint8",
        "scale": INT8_LEVELS,
        "decode": f"p = (value / {INT8_LEVELS}) ** 2",
    }


def max_abs_error(p: np.ndarray | float, kind: str) -> np.ndarray:
    """An upper bound of |dequantize(quantize(p)) - p| at probability `p` (used by tests and `verify`)."""
    _check_kind(kind)
    p = np.asarray(p, dtype=np.float64)
    if kind == "float16":
        # Half the float16 spacing: 2^-11 relative for normals, 2^-25 absolute for subnormals.
        return np.maximum(p * 2.0**-11, 2.0**-25)
    return (np.sqrt(p) * INT8_LEVELS + 0.25) / INT8_LEVELS**2 + 1e-7
