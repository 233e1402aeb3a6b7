"""The inference benchmark section's code path with tiny sizes: real models, every runtime and precision but
torch.compile, ONNX export and int8 quantization, the front end alone, the demo-style int8 cost on a store."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ced_lightning.models import create_ced, model_spec
from ced_lightning.store.audio_writer import write_audio_store

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow  # five small ONNX exports: about 30 s on 2 cores

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["dog", "cat", "bird", "rain"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> tuple[Path, str]:
    """A depth-1 CED checkpoint of 4 classes and a labelled store of 12 one-second clips."""
    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model = create_ced("ced_tiny", depth=1, num_classes=len(CLASSES)).eval()
    ckpt = folder / "tiny.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_spec": model_spec(model), "class_names": CLASSES}, ckpt)
    rng = np.random.default_rng(0)
    clips = [(f"c{i}", 0.1 * rng.standard_normal(16000).astype(np.float32), [i % 4]) for i in range(12)]
    store = folder / "test.zarr"
    write_audio_store(store, clips, class_names=CLASSES)
    return ckpt, str(store)


def test_inference_section_runs_every_runtime_and_precision(monkeypatch, labelled):
    monkeypatch.syspath_prepend(str(REPO))  # `bench` is a top-level package beside `tests`, not installed
    inference = importlib.import_module("bench.inference")
    SMOKE = inference.SMOKE
    ckpt, store = labelled
    results = inference.run(**SMOKE, demo_ckpt=ckpt, demo_store=store)

    (ced,) = SMOKE["ceds"]
    cnn = SMOKE["cnn"]
    for name in (ced, cnn):
        for mode in SMOKE["modes"]:
            seconds = results["timings"][f"{name} {mode}, 1 thread(s)"]["seconds"]
            assert math.isfinite(seconds["median"]) and seconds["median"] > 0, (name, mode)
    shares = results["front end share of the time"]
    assert set(shares) == {
        f"{ced} front end / whole, eager float32, 1 thread(s)",
        f"{ced} front end / whole, onnxruntime float32, 1 thread(s)",
    }
    assert all(share > 0 for share in shares.values()), shares

    demo = results["int8 cost on the demo test set"]
    assert demo["clips"] == 12
    modes = ("eager float32", "eager int8", "onnxruntime float32", "onnxruntime int8")
    assert set(demo["mAP"]) == set(modes)
    assert all(0.0 <= value <= 1.0 for value in demo["mAP"].values())
    # ONNX float32 is the same network: equal up to float rounding; int8 differs, but not by much.
    assert demo["max |p - eager float32|"]["onnxruntime float32"] < 1e-4
    for mode in ("eager int8", "onnxruntime int8"):
        assert 0 < demo["max |p - eager float32|"][mode] < 0.05, demo

    ratios = results["ratios"]
    (goal,) = [key for key in ratios if key.startswith(f"{ced} fastest path: ")]
    assert goal.endswith(f"/ {cnn} eager float32 time, 1 thread(s)")
    assert "demo test mAP" in goal
    assert ratios[goal] > 0
    assert f"{ced} / {cnn} time, onnxruntime int8, 1 thread(s)" in ratios

    # bench/performance.md's side-by-side table: both models, every runtime and precision, demo mAP beside
    relative = results[f"time / {cnn} eager float32"]
    assert relative[f"{cnn} eager float32, 1 thread(s)"] == 1.0
    assert len(relative) == 2 * len(SMOKE["modes"])
    lines = importlib.import_module("bench.readme").inference_table({"sections": {"inference": results}})
    header = next(line for line in lines if line.startswith("| threads |"))
    assert f"| {ced} | {cnn} | demo mAP |" in header
    int8_row = next(line for line in lines if line.startswith("| 1 thread(s) | onnxruntime int8 |"))
    assert f"{demo['mAP']['onnxruntime int8']:.4f}" in int8_row


def test_inference_section_without_a_demo_checkpoint_says_how_to_make_one(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO))
    inference = importlib.import_module("bench.inference")
    smoke = {**inference.SMOKE, "modes": ("eager float32", "eager int8")}
    results = inference.run(**smoke, demo_ckpt=tmp_path / "missing.ckpt", demo_store=str(tmp_path / "x.zarr"))
    assert "make demo" in results["int8 cost on the demo test set"]["not measured"]
    assert results["front end share of the time"].keys() == {
        "ced_tiny front end / whole, eager float32, 1 thread(s)"
    }
