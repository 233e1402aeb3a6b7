from __future__ import annotations

import numpy as np
import pytest
import torch

from ced_lightning.core.quantize import dequantize, max_abs_error, quantization_attrs, quantize, stored_dtype


def _grid() -> np.ndarray:
    # Dense near 0 (where top-k tails live) and across [0, 1], including the end points.
    return np.unique(np.concatenate([np.linspace(0, 1, 200_001), np.logspace(-9, 0, 20_001)])).astype(
        np.float32
    )


@pytest.mark.parametrize("kind", ["float16", "int8"])
def test_round_trip_within_documented_bound(kind: str) -> None:
    p = _grid()
    stored = quantize(p, kind)
    assert stored.dtype == stored_dtype(kind)
    back = dequantize(stored, kind)
    assert back.dtype == np.float32
    err = np.abs(back.astype(np.float64) - p)
    assert (err <= max_abs_error(p, kind)).all(), f"worst excess {(err - max_abs_error(p, kind)).max()}"


def test_documented_error_figures() -> None:
    p = _grid()
    f16 = np.abs(dequantize(quantize(p, "float16"), "float16") - p)
    i8 = np.abs(dequantize(quantize(p, "int8"), "int8") - p)
    # The figures docs/logit_store.md and quantize.py quote.
    assert f16.max() <= 2.0**-12 + 1e-9
    assert i8.max() <= 0.0040
    small = p <= 0.01
    assert i8[small].max() <= 4.0e-4
    assert f16[small].max() <= 0.01 * 2.0**-11
    # Near zero int8 is far more exact than 1/255 (a linear byte would be off by up to 0.002).
    tiny = p <= 1e-4
    assert i8[tiny].max() <= 5e-5
    # Mean errors (quoted in docs/logit_store.md): uniform p in [0, 1] and log-uniform p in [1e-6, 1].
    uniform = np.linspace(0, 1, 100_001, dtype=np.float32)
    log_uniform = np.logspace(-6, 0, 100_001).astype(np.float32)
    mean_err = lambda q, kind: np.abs(dequantize(quantize(q, kind), kind) - q).mean()
    assert mean_err(uniform, "int8") < 1.4e-3 and mean_err(log_uniform, "int8") < 3e-4
    assert mean_err(uniform, "float16") < 9e-5 and mean_err(log_uniform, "float16") < 1.3e-5


def test_int8_is_monotone_and_exact_at_ends() -> None:
    p = np.linspace(0, 1, 10_001, dtype=np.float32)
    q = quantize(p, "int8")
    assert (np.diff(q.astype(int)) >= 0).all()
    assert dequantize(quantize(np.array([0.0, 1.0]), "int8"), "int8").tolist() == [0.0, 1.0]


def test_torch_input_and_clipping() -> None:
    t = torch.tensor([[-1e-7, 0.5, 1.0 + 1e-6]])
    for kind in ("float16", "int8"):
        back = dequantize(quantize(t, kind), kind)
        assert back.shape == (1, 3)
        assert back[0, 0] == 0.0 and back[0, 2] == 1.0


def test_rejects_unknown_kind_and_nan() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize(np.zeros(3), "int4")
    with pytest.raises(ValueError, match="non-finite"):
        quantize(np.array([np.nan]), "int8")
    with pytest.raises(TypeError, match="uint8"):
        dequantize(np.zeros(3, dtype=np.float32), "int8")


def test_attrs_describe_decoding() -> None:
    assert quantization_attrs("int8")["scale"] == 255
    assert quantization_attrs("int8")["dtype"] == "uint8"
    assert quantization_attrs("float16")["kind"] == "float16"
    # A reader following the recorded recipe gets what dequantize gives.
    q = quantize(np.array([0.3]), "int8")
    assert np.isclose((q[0] / quantization_attrs("int8")["scale"]) ** 2, dequantize(q, "int8")[0])
