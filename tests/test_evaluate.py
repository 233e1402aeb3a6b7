"""Evaluating a checkpoint on a small labelled audio store with clips of several lengths."""

from __future__ import annotations

import csv
import sys

import numpy as np
import pytest
import torch

from ced_lightning.core.metrics import TaggingMetrics
from ced_lightning.models import create_ced, model_spec, save_ced

store_audio = pytest.importorskip("ced_lightning.store.audio", reason="the audio store is not available")
store_writer = pytest.importorskip("ced_lightning.store.audio_writer", reason="the audio store is not there")

from ced_lightning.engines.scoring import evaluate_checkpoint  # noqa: E402
from ced_lightning.evaluate import format_summary  # noqa: E402

CLASS_NAMES = ["dog", "cat", "bird", "rain"]
# Lengths in samples: two groups of equal length, a 12 s clip (CED's split path) and odd ones.
LENGTHS = [16000, 16000, 8000, 16000 * 12, 16000, 32000, 8000, 20000]
LABELS = [[0], [1, 2], [0], [3], [], [1], [0, 1], [2]]  # class 3 has one positive, clip 4 none


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return create_ced("ced_tiny", depth=1, num_classes=4).eval()


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    clips = [
        (f"clip{i}", (0.1 * rng.standard_normal(n)).astype(np.float32), labels)
        for i, (n, labels) in enumerate(zip(LENGTHS, LABELS, strict=True))
    ]
    url = str(tmp_path_factory.mktemp("store") / "eval.zarr")
    store_writer.write_audio_store(url, clips, class_names=CLASS_NAMES)
    return url


def _expected(model, store_url) -> tuple[torch.Tensor, dict]:
    # Every clip alone, no batching: what evaluation must reproduce.
    store = store_audio.AudioStore.open(store_url)
    metric = TaggingMetrics(4)
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(store.read(i)[None])) for i in range(len(store))])
    metric.update(probs, torch.from_numpy(store.label_matrix()))
    return probs, metric.compute()


def test_evaluate_matches_clip_by_clip_scores(model, store_url, tmp_path):
    ckpt = tmp_path / "tiny.pt"
    save_ced(model, ckpt)
    result = evaluate_checkpoint(ckpt, store_url, batch_size=3, output_dir=tmp_path / "out", device="cpu")
    probs, expected = _expected(model, store_url)
    assert result["num_clips"] == len(LENGTHS)
    # Grouping by length, batching and the split of the 12 s clip leave each clip's scores unchanged.
    assert (result["probabilities"] - probs).abs().max().item() < 1e-5
    assert result["mAP"] == pytest.approx(float(expected["mAP"]), abs=1e-6)
    assert result["d_prime"] == pytest.approx(float(expected["d_prime"]), abs=1e-5)
    assert result["positives"].tolist() == [3, 3, 2, 1]
    # save_ced files carry no class names: the store's are used.
    assert result["class_names"] == CLASS_NAMES
    rows = list(csv.DictReader(result["per_class_csv"].open()))
    assert [r["name"] for r in rows] == CLASS_NAMES
    assert float(rows[3]["ap"]) == pytest.approx(float(expected["per_class_ap"][3]), abs=1e-5)
    assert result["per_class_png"].read_bytes()[:4] == b"\x89PNG"
    assert "clips: 8" in format_summary(result)


def test_errors_name_the_problem(store_url, tmp_path):
    ckpt = tmp_path / "five.pt"
    save_ced(create_ced("ced_tiny", depth=1, num_classes=5), ckpt)
    with pytest.raises(ValueError, match=r"has 4 classes but ckpt=.*predicts 5"):
        evaluate_checkpoint(ckpt, store_url, device="cpu")

    other = create_ced("ced_tiny", depth=1, num_classes=4)
    lightning = tmp_path / "other_names.ckpt"
    state = {f"model.{k}": v for k, v in other.state_dict().items()}
    torch.save({"state_dict": state, "model_spec": model_spec(other), "class_names": list("abcd")}, lightning)
    with pytest.raises(ValueError, match="different class names"):
        evaluate_checkpoint(lightning, store_url, device="cpu")

    unlabeled = str(tmp_path / "unlabeled.zarr")
    store_writer.write_audio_store(unlabeled, [("x", np.full(16000, 0.1, np.float32), None)])
    with pytest.raises(ValueError, match="has no labels"):
        evaluate_checkpoint(ckpt, unlabeled, device="cpu")


def test_command_line(model, store_url, tmp_path, monkeypatch, capsys):
    from ced_lightning.evaluate import main

    ckpt = tmp_path / "tiny.pt"
    save_ced(model, ckpt)
    out = tmp_path / "run"
    argv = ["evaluate", f"ckpt={ckpt}", f"store={store_url}", "batch_size=4", f"output_dir={out}"]
    monkeypatch.setattr(sys, "argv", [*argv, f"paths.root_dir={tmp_path}", "progress=false", "device=cpu"])
    main()
    printed = capsys.readouterr().out
    assert "clips: 8  mAP: " in printed and "d-prime: " in printed
    assert (out / "per_class_ap.csv").exists() and (out / "per_class_ap.png").exists()
    # output_dir=null: the scores only, no files and no error after the whole evaluation.
    monkeypatch.setattr(
        sys, "argv", [*argv[:-1], "output_dir=null", f"paths.root_dir={tmp_path}", "device=cpu"]
    )
    main()
    printed = capsys.readouterr().out
    assert "clips: 8  mAP: " in printed and "per-class AP" not in printed


def test_clips_shorter_than_one_stft_window_are_scored(model, tmp_path):
    """Before: a 200-sample clip (alone in its length group) raised `RuntimeError: ... Padding size should be
    less than the corresponding input dimension` and the evaluation ended without a score."""
    rng = np.random.default_rng(3)
    clips = [
        (f"clip{i}", (0.1 * rng.standard_normal(n)).astype(np.float32), labels)
        for i, (n, labels) in enumerate([(200, [0]), (16000, [1]), (1, [0, 1]), (16000, [2, 3])])
    ]
    url = str(tmp_path / "short.zarr")
    store_writer.write_audio_store(url, clips, class_names=CLASS_NAMES)
    save_ced(model, tmp_path / "tiny.pt")
    result = evaluate_checkpoint(tmp_path / "tiny.pt", url, batch_size=2, device="cpu")
    with torch.no_grad():  # the rule: zero-padded at the end to one STFT window (512 samples)
        padded = torch.nn.functional.pad(torch.from_numpy(clips[0][1]), (0, 512 - 200))
        expected = torch.sigmoid(model(padded[None]))[0]
    assert (result["probabilities"][0] - expected).abs().max().item() < 1e-5
    assert torch.isfinite(result["probabilities"]).all() and np.isfinite(result["mAP"])
