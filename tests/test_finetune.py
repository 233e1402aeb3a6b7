"""Fine-tuning on a new label set: the finetune experiment with both objectives, the single-label loss and
metrics, a frozen encoder (linear probe) and a lower encoder lr, labels from a folder per class, and the
single-label variant of the demo data."""

from __future__ import annotations

import csv
import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from ced_lightning import compose_config
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.labels import single_label_problem
from ced_lightning.core.losses import supervised_loss
from ced_lightning.core.optim import build_optimizer
from ced_lightning.core.single_label import single_label_scores
from ced_lightning.data.demo import build_demo_stores, generate_demo_clip
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.audio_writer import AudioStoreWriter
from conftest import save_tiny_teacher


@pytest.mark.parametrize(("objective", "monitor"), [("multi_label", "val/mAP"), ("single_label", "val/acc")])
def test_finetune_experiment_composes_with_both_objectives(objective: str, monitor: str) -> None:
    cfg = compose_config(
        ["experiment=finetune", "data=custom", "data.root=/somewhere", f"task.objective={objective}"]
    )
    assert cfg.task.name == "supervised"
    assert cfg.task.module.objective == cfg.task.datamodule.objective == objective
    # checkpointing and early stopping follow the objective's metric
    assert cfg.optimized_metric == cfg.callbacks.model_checkpoint.monitor == monitor
    assert cfg.callbacks.early_stopping.monitor == monitor
    # a new head on the released tagger of the model's size, the encoder at a tenth of the head's lr
    assert cfg.model.init_from == cfg.model.name and cfg.model.init_head is False
    assert cfg.task.module.encoder_lr_scale == 0.1 and cfg.task.module.freeze_encoder is False
    probe = compose_config(
        ["experiment=finetune", "data=custom", "data.root=/x", "optim.freeze_encoder=true"]
    )
    assert probe.task.module.freeze_encoder is True


def test_single_label_loss_is_softmax_cross_entropy_and_multi_label_bce() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    by_hand = -(torch.log_softmax(logits, 1) * target).sum(1).mean()
    assert torch.allclose(supervised_loss("single_label", logits, target), by_hand)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert torch.allclose(supervised_loss("multi_label", logits, target), bce)
    with pytest.raises(ConfigError, match=r"task\.objective must be one of"):
        supervised_loss("multilabel", logits, target)  # type: ignore[arg-type]


def test_single_label_scores_count_by_hand() -> None:
    # 7 classes (so top-5 is reported); clip 2 is wrong at top-1 but right at top-5, clip 3 wrong at both
    probs = torch.full((4, 7), 0.01)
    probs[0, 0] = probs[1, 1] = 0.9
    probs[2, 3], probs[2, 2] = 0.9, 0.5  # true class 2 ranks second
    probs[3, 6] = 0.9  # true class 5 ranks among six ties at the bottom
    probs[3, :5] = 0.5
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 5]), 7).float()
    scores = single_label_scores(probs, targets)
    assert float(scores["acc"]) == pytest.approx(0.5)
    assert float(scores["top5_acc"]) == pytest.approx(0.75)
    expected = torch.zeros(7, 7, dtype=torch.long)
    for true, predicted in [(0, 0), (1, 1), (2, 3), (5, 6)]:
        expected[true, predicted] += 1
    assert torch.equal(scores["confusion"], expected)
    assert "top5_acc" not in single_label_scores(probs[:, :5], targets[:, :5])  # k would cover every class


def test_encoder_lr_scale_gives_the_encoder_its_own_groups() -> None:
    from ced_lightning.models import create_ced

    model = create_ced("ced_tiny", depth=1, num_classes=3)
    make = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    optimizer = build_optimizer(make, model, head=model.get_classifier(), encoder_lr_scale=0.1)
    head = {id(p) for p in model.get_classifier().parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1  # no group mixes head and encoder
        assert group["lr"] == pytest.approx(1e-3 if in_head == {True} else 1e-4)
    grouped = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    with pytest.raises(ConfigError, match=r"optim\.encoder_lr_scale"):
        build_optimizer(
            partial(torch.optim.SGD, 0.1), model, head=model.get_classifier(), encoder_lr_scale=0.5
        )


def test_demo_single_label_variant_keeps_one_event_and_leaves_the_multi_label_clips_alone() -> None:
    counts = []
    for index in range(20):
        wave, labels = generate_demo_clip(0, index, 0.5)
        single_wave, single_labels = generate_demo_clip(0, index, 0.5, single_label=True)
        counts.append(len(labels))
        assert len(single_labels) == 1
        if len(labels) == 1:  # the same draws: one-event clips are the same clip in both variants
            assert single_labels == labels and np.array_equal(single_wave, wave)
    assert max(counts) > 1


def _write_store(url: Path, labels: list[list[int]]) -> str:
    writer = AudioStoreWriter(str(url), class_names=["a", "b", "c"], class_mids=["a", "b", "c"], config={})
    for i, clip_labels in enumerate(labels):
        writer.add(
            f"clip_{i}", (np.sin(np.arange(4000) * (0.01 + i / 100)) * 8000).astype(np.int16), clip_labels
        )
    writer.finish()
    return str(url)


@pytest.mark.parametrize(("labels", "count"), [([[0], [1, 2], [2]], 2), ([[0], [], [2]], 0)])
def test_single_label_refuses_a_clip_without_exactly_one_label(
    tmp_path: Path, labels: list[list[int]], count: int
) -> None:
    from ced_lightning.data.labeled import LabeledDataModule

    url = _write_store(tmp_path / "train.zarr", labels)
    LabeledDataModule(train=url, objective="multi_label")  # any number is fine there
    with pytest.raises(InputError) as caught:
        LabeledDataModule(train=url, objective="single_label")
    message = str(caught.value)
    assert "\n" not in message
    assert f"clip 'clip_1' has {count} labels" in message and "task.objective=single_label" in message
    assert url in message
    assert single_label_problem([1, 1], ["x", "y"]) is None


def test_labels_from_a_folder_per_class(tmp_path: Path) -> None:
    from ced_lightning.prepare import run_prepare

    root = tmp_path / "clips"
    rate = 16000
    for path, freq in [("dog/a.wav", 300), ("cat/b.wav", 500), ("cat/indoor/c.wav", 700)]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / path, 0.5 * np.sin(2 * np.pi * freq * np.arange(rate // 4) / rate), rate)
    (root / "bird").mkdir()  # a class without clips in this split still has its index
    out = tmp_path / "train.zarr"
    cfg = compose_config(
        [f"input={root}", "labels=folders", f"output={out}", "workers=0"],
        output_dir=tmp_path / "run",
        config="prepare",
    )
    run_prepare(cfg)
    store = AudioStore.open(out)
    assert store.class_names == ["bird", "cat", "dog"]
    labels = {name: store.labels(i).tolist() for i, name in enumerate(store.names)}
    assert labels == {"cat/b": [1], "cat/indoor/c": [1], "dog/a": [2]}

    sf.write(root / "loose.wav", np.zeros(rate // 4) + 0.1, rate)
    cfg = compose_config(
        [f"input={root}", "labels=folders", f"output={tmp_path / 'other.zarr'}", "workers=0"],
        output_dir=tmp_path / "run2",
        config="prepare",
    )
    with pytest.raises(InputError, match=r"loose\.wav: labels=folders takes each clip's class"):
        run_prepare(cfg)


@pytest.fixture(scope="module")
def single_label_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("single")
    stores = build_demo_stores(
        str(root / "demo"), seed=0, train=16, val=8, test=8, clip_seconds=1.0, single_label=True
    )
    # A pretrained checkpoint with as many classes: init_head=false must still start a new head.
    teacher = save_tiny_teacher(root / "pretrained.pt", AudioStore.open(stores["train"]).num_classes)
    return {**stores, "pretrained": str(teacher)}


def _finetune(demo: dict[str, str], out: Path, *extra: str) -> dict:
    from ced_lightning.train import train

    overrides = [
        "experiment=finetune",
        "model=ced_tiny",
        "+model.depth=1",
        f"model.init_from={demo['pretrained']}",
        f"data.train={demo['train']}",
        f"data.val={demo['val']}",
        f"data.test={demo['test']}",
        "data.build_missing=false",
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.clip_seconds=1.0",
        "data.schedule.warmup_steps=1",
        "trainer=cpu",
        "trainer.max_epochs=1",
        "logger=csv",
        "callbacks.progress_bar=null",
        "callbacks.average_best=null",
        "test_ckpt=last",
        "task.objective=single_label",
        *extra,
    ]
    return train(compose_config(overrides, output_dir=out))


def test_linear_probe_trains_the_head_alone(single_label_demo: dict[str, str], tmp_path: Path) -> None:
    metrics = _finetune(single_label_demo, tmp_path, "optim.freeze_encoder=true")
    start = torch.load(single_label_demo["pretrained"], map_location="cpu", weights_only=False)["model"]
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = {k[len("model.") :]: v for k, v in trained["state_dict"].items() if k.startswith("model.")}
    encoder = [k for k in start if not k.startswith(("outputlayer.", "front_end."))]
    assert encoder and all(torch.equal(weights[k], start[k]) for k in encoder)  # BatchNorm statistics too
    # a new head (not the file's, though its shape fits), and one that trained: its LayerNorm starts at
    # weight 1, bias 0 and moved off it
    assert not torch.equal(weights["outputlayer.1.weight"], start["outputlayer.1.weight"])
    assert not torch.equal(weights["outputlayer.0.bias"], torch.zeros_like(weights["outputlayer.0.bias"]))
    assert trained["objective"] == "single_label"
    assert 0.0 <= metrics["test/acc"] <= 1.0 and math.isfinite(metrics["test/top5_acc"])
    with open(tmp_path / "checkpoints" / "test_confusion_matrix.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert len(rows) == 1 + 16 and sum(int(v) for row in rows[1:] for v in row[1:]) == 8
    assert (tmp_path / "checkpoints" / "test_confusion_matrix.png").stat().st_size > 0


def test_finetuning_moves_the_encoder(single_label_demo: dict[str, str], tmp_path: Path) -> None:
    _finetune(single_label_demo, tmp_path)
    start = torch.load(single_label_demo["pretrained"], map_location="cpu", weights_only=False)["model"]
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not torch.equal(
        trained["state_dict"]["model.blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"]
    )


def test_single_label_training_refuses_multi_label_data(tmp_path: Path) -> None:
    stores = build_demo_stores(str(tmp_path / "multi"), seed=0, train=8, val=4, test=4, clip_seconds=0.5)
    demo = {**stores, "pretrained": str(save_tiny_teacher(tmp_path / "p.pt", 16))}
    with pytest.raises(InputError, match=r"clip 'demo_train_\d+' has [023] labels.*single_label"):
        _finetune(demo, tmp_path / "run")


def test_a_single_label_checkpoint_reads_as_its_softmax_in_every_consumer(
    single_label_demo: dict[str, str], tmp_path: Path
) -> None:
    """A model fine-tuned with task.objective=single_label is scored, tagged and exported on its softmax
    (the checkpoint's `objective`), as its own test step scored it; the Hub port and the teacher ensemble,
    which can only read per-class sigmoids, refuse it."""
    from omegaconf import OmegaConf

    import ced_lightning as ced
    from ced_lightning.core.metrics import tagging_scores
    from ced_lightning.engines.hub_export import export_hub
    from ced_lightning.engines.inference import predict_files
    from ced_lightning.engines.inference.events import frame_probabilities
    from ced_lightning.engines.scoring import evaluate_checkpoint
    from ced_lightning.engines.teachers import load_teachers
    from ced_lightning.evaluate import format_summary
    from ced_lightning.models import load_checkpoint, save_ced

    metrics = _finetune(single_label_demo, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    assert loaded.objective == "single_label"

    # evaluate: the test step's figures. Ranks of the same float32 logits, batched alike (8 clips of 1 s).
    result = evaluate_checkpoint(ckpt, single_label_demo["test"], batch_size=8, device="cpu")
    assert result["objective"] == "single_label"
    assert result["mAP"] == pytest.approx(metrics["test/mAP"], abs=1e-6)
    assert result["acc"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert torch.allclose(result["probabilities"].sum(1), torch.ones(8), atol=1e-6)
    # ... which the sigmoids of the same logits do not give: the check above can fail
    store = AudioStore.open(single_label_demo["test"])
    with torch.no_grad():
        logits = loaded.model(torch.stack([store.read(i) for i in range(len(store))]))
    sigmoid_map = float(tagging_scores(torch.sigmoid(logits), torch.from_numpy(store.label_matrix()))["mAP"])
    assert abs(sigmoid_map - metrics["test/mAP"]) > 1e-3

    # tag (the Python API and ced-predict's engine), events, and the ONNX file: probabilities sum to 1
    tagger = ced.load(ckpt, device="cpu")
    assert tagger.objective == "single_label"
    wave = store.read(0)
    tags = tagger.tag(wave, sample_rate=16000, top_k=None)
    with torch.no_grad():
        expected = torch.softmax(loaded.model(wave[None]), -1)[0]
    assert sum(tags.scores) == pytest.approx(1.0, abs=1e-5)
    assert tags.scores[0] == pytest.approx(float(expected.max()), abs=1e-6)
    sf.write(tmp_path / "clip.wav", wave.numpy(), 16000, subtype="FLOAT")
    (from_file,) = tagger.tag_files([tmp_path / "clip.wav"], top_k=None)
    assert from_file.labels == tags.labels and sum(from_file.scores) == pytest.approx(1.0, abs=1e-5)
    frames = frame_probabilities(tagger.model, wave, objective="single_label")
    assert torch.allclose(frames.sum(-1), torch.ones(len(frames)), atol=1e-5)
    predict_files(
        str(ckpt),
        [tmp_path / "clip.wav"],
        topk=16,
        output=tmp_path / "tags.jsonl",
        device="cpu",
        events_output=tmp_path / "events.jsonl",
    )  # ced-predict's and predict's path
    (row,) = [json.loads(line) for line in (tmp_path / "tags.jsonl").read_text().splitlines()]
    assert [label["name"] for label in row["labels"]] == tags.labels
    assert sum(label["probability"] for label in row["labels"]) == pytest.approx(1.0, abs=1e-5)
    assert "accuracy: " in format_summary(result)  # evaluate's line

    pytest.importorskip("onnxruntime")
    from ced_lightning.export import export_onnx, onnx_session, run_onnx

    session = onnx_session(export_onnx(loaded.model, tmp_path / "m.onnx", objective="single_label"))
    onnx_logits, onnx_probs = run_onnx(session, wave[None])
    assert np.allclose(onnx_probs, torch.softmax(torch.from_numpy(onnx_logits), -1).numpy(), atol=1e-6)
    assert onnx_probs.sum() == pytest.approx(1.0, abs=1e-5)

    # save_ced keeps the class names and the objective
    save_ced(loaded.model, tmp_path / "released.pt", class_names=loaded.class_names, objective="single_label")
    again = load_checkpoint(tmp_path / "released.pt")
    assert (again.objective, again.class_names) == ("single_label", loaded.class_names)

    with pytest.raises(ConfigError, match=r"task\.objective=single_label, which the Hub port cannot express"):
        export_hub(ckpt, tmp_path / "hub")
    teachers = OmegaConf.create({"members": [{"name": "fine", "checkpoint": str(ckpt)}]})
    with pytest.raises(ConfigError, match=r"teacher fine: .* task\.objective=single_label"):
        load_teachers(teachers)
