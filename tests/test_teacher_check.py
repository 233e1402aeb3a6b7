"""Teacher sets checked before their logits are stored (issue 16): `evaluate teacher=...` scores each member
and the ensemble as `extract` combines it, with the chance level; `extract teacher_check.store=...` prints
the same table, keeps it in the store's stats and refuses teachers near chance unless told to; teacher names
from `teacher.checkpoints` must be unique.

The labelled store is built so that teacher `strong` is right by construction: clip i carries class c when
`strong` ranks it among the top quarter of clips for c (so its AP is 1 and chance is 0.25). Teacher `weak`
is another untrained network, whose ranking has nothing to do with those labels (gain over chance about 0).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ced_lightning import conf_dir
from ced_lightning.core.metrics import TaggingMetrics, chance_map, gain_over_chance
from ced_lightning.models import create_ced, save_ced
from ced_lightning.store import store_exists
from ced_lightning.store.audio_writer import write_audio_store

C, N_CLIPS = 6, 48
CLASSES = [f"class{i}" for i in range(C)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teacher_check")
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    waves = [
        (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t) + 0.05 * rng.standard_normal(16000)).astype(np.float32)
        for i in range(N_CLIPS)
    ]
    for name, seed in (("strong", 0), ("weak", 2)):
        torch.manual_seed(seed)
        save_ced(create_ced("ced_tiny", depth=1, num_classes=C).eval(), root / name / "teacher.pt")
    from ced_lightning.models import load_model

    with torch.no_grad():
        scores = torch.sigmoid(load_model(root / "strong" / "teacher.pt")(torch.from_numpy(np.stack(waves))))
    top = [set(torch.argsort(-scores[:, c])[: N_CLIPS // 4].tolist()) for c in range(C)]
    clips = [(f"clip{i:02d}", w, [c for c in range(C) if i in top[c]]) for i, w in enumerate(waves)]
    write_audio_store(root / "val.zarr", clips, class_names=CLASSES)
    write_audio_store(root / "train.zarr", clips[:16], class_names=CLASSES)
    return root


def _members(root: Path, *names: str) -> str:
    entries = ",".join(f"{{name: {n}, checkpoint: {root / n / 'teacher.pt'}}}" for n in names)
    return f"teacher.members=[{entries}]"


def test_chance_is_the_mean_prevalence_of_classes_with_positives() -> None:
    targets = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert chance_map(targets) == pytest.approx((2 / 4 + 1 / 4) / 2)  # class 2 has no positive: left out
    assert gain_over_chance(0.25, 0.25) == 0 and gain_over_chance(1.0, 0.25) == 1
    assert gain_over_chance(0.625, 0.25) == pytest.approx(0.5)


def test_teacher_set_table_is_each_member_and_the_ensemble(workdir: Path) -> None:
    """Each member's figures are `evaluate_checkpoint`'s (the one evaluation pass), the ensemble's are
    TaggingMetrics on the members' probabilities combined by the teacher config's rule."""
    from ced_lightning.core.ensemble import combine_probabilities
    from ced_lightning.engines.scoring import evaluate_checkpoint, evaluate_teachers, weak_teachers
    from ced_lightning.models import load_model
    from ced_lightning.store.audio import AudioStore

    val = str(workdir / "val.zarr")
    singles = {
        n: evaluate_checkpoint(workdir / n / "teacher.pt", val, batch_size=5, device="cpu")
        for n in ("strong", "weak")
    }
    models = {n: load_model(workdir / n / "teacher.pt") for n in ("strong", "weak")}
    table = evaluate_teachers(models, val, combine="mean_logit", batch_size=7, device="cpu")
    for name, single in singles.items():
        assert table["teachers"][name]["mAP"] == pytest.approx(single["mAP"], abs=1e-6)
    labels = torch.from_numpy(AudioStore.open(val).label_matrix())
    probs = [singles[n]["probabilities"].clamp(1e-7, 1 - 1e-7) for n in ("strong", "weak")]
    metric = TaggingMetrics(C)
    metric.update(combine_probabilities([torch.logit(p.double()) for p in probs], "mean_logit"), labels)
    assert table["ensemble"]["mAP"] == pytest.approx(float(metric.compute()["mAP"]), abs=1e-4)
    assert table["chance_mAP"] == pytest.approx(0.25) and table["combine"] == "mean_logit"
    assert table["teachers"]["strong"]["mAP"] == pytest.approx(1.0)
    assert table["teachers"]["weak"]["gain_over_chance"] < 0.05
    assert weak_teachers(table, 0.1) == ["weak"]
    json.dumps(table, allow_nan=False)  # strict JSON: the store's stats file holds it


def test_evaluate_command_takes_a_teacher_set(workdir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    from ced_lightning.evaluate import main

    argv = ["evaluate", "teacher=ced", _members(workdir, "strong", "weak"), f"store={workdir / 'val.zarr'}"]
    common = [f"paths.root_dir={tmp_path}", "progress=false", "device=cpu", "batch_size=16"]
    monkeypatch.setattr(sys, "argv", [*argv, *common, f"output_dir={tmp_path / 'out'}"])
    main()
    printed = capsys.readouterr().out
    assert "chance mAP 0.2500 (mean class prevalence)" in printed, printed
    assert all(f"\n  {row} " in printed for row in ("strong", "weak", "ensemble (mean_prob)")), printed
    saved = json.loads((tmp_path / "out" / "teacher_table.json").read_text())
    assert set(saved["teachers"]) == {"strong", "weak"} and saved["ensemble"]["mAP"] > 0.25
    from ced_lightning.evaluate import run_evaluate

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        both = compose("evaluate", overrides=[*argv[1:], f"ckpt={workdir / 'strong' / 'teacher.pt'}"])
    with pytest.raises(ValueError, match=r"either ckpt=PATH .* or teacher=NAME .*not both"):
        run_evaluate(both)


def test_evaluate_leaves_the_thread_count_alone_unless_told(
    workdir: Path, tmp_path: Path, monkeypatch
) -> None:
    """Before: `evaluate` set one thread per core (os.cpu_count(), 2 on the test machine), also beside a
    training run that was given its own share; now torch's default (OMP_NUM_THREADS) unless num_threads=N."""
    from ced_lightning.evaluate import main

    argv = [
        "evaluate",
        f"ckpt={workdir / 'strong' / 'teacher.pt'}",
        f"store={workdir / 'val.zarr'}",
        f"paths.root_dir={tmp_path}",
        "output_dir=null",
        "progress=false",
        "device=cpu",
    ]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(sys, "argv", argv)
        main()
        assert torch.get_num_threads() == 1
        monkeypatch.setattr(sys, "argv", [*argv, "num_threads=2"])
        main()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _extract_cfg(root: Path, output: Path, *extra: str) -> DictConfig:
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose(
            "extract",
            overrides=[
                f"audio_store={root / 'train.zarr'}",
                f"output={output}",
                f"paths.root_dir={root}",
                "epochs=1",
                "topk=3",
                "clip_seconds=1.0",
                "block_clips=8",
                "num_workers=0",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                *extra,
            ],
        )


def test_extract_refuses_teachers_near_chance(workdir: Path, tmp_path: Path, capsys) -> None:
    """Before: `extract` stored any teachers' logits without a word (and had no teacher_check key)."""
    from ced_lightning.engines.extraction import WeakTeachersError
    from ced_lightning.extract import run_extract

    check = f"teacher_check.store={workdir / 'val.zarr'}"
    refused = tmp_path / "refused.zarr"
    with pytest.raises(WeakTeachersError, match=r"teacher_check: weak near chance") as refused_error:
        run_extract(_extract_cfg(workdir, refused, _members(workdir, "strong", "weak"), check))
    assert not store_exists(str(refused))  # refused before anything was stored
    said = str(refused_error.value)  # the table too: a run logged to a file keeps it with the error
    assert "near chance (gain < 0.1)" in said and "\n  strong " in said and "allow_weak_teachers=true" in said

    allowed = tmp_path / "allowed.zarr"
    run_extract(
        _extract_cfg(workdir, allowed, _members(workdir, "strong", "weak"), check, "allow_weak_teachers=true")
    )
    stats = json.loads((allowed / "extract_stats.json").read_text())
    assert stats["complete"] and stats["teacher_check"]["weak"] == ["weak"]
    assert stats["teacher_check"]["teachers"]["strong"]["mAP"] == pytest.approx(1.0)

    good = tmp_path / "good.zarr"
    run_extract(_extract_cfg(workdir, good, _members(workdir, "strong"), check))
    check_stats = json.loads((good / "extract_stats.json").read_text())["teacher_check"]
    assert check_stats["weak"] == [] and check_stats["ensemble"]["gain_over_chance"] == pytest.approx(1.0)
    assert "near chance: none" in capsys.readouterr().out


class _CountedMoves(torch.nn.Module):
    """A teacher counting the passes over its tensors: `Module._apply` runs for every `.to`, `.cpu`, `.cuda`
    or dtype cast, its own or one reaching it through a module that holds it."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher
        self.num_classes = teacher.num_classes
        self.moves = 0

    @property
    def front_end(self) -> torch.nn.Module:
        return self.teacher.front_end

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> _CountedMoves:
        self.moves += 1
        return super()._apply(fn, *args, **kwargs)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.teacher(waveform)

    def forward_spectrogram(self, mel: torch.Tensor) -> torch.Tensor:
        return self.teacher.forward_spectrogram(mel)


def test_extract_moves_the_teachers_to_the_device_once(workdir: Path, tmp_path: Path) -> None:
    """The check, the extraction and verification run the teachers where `extract_logits` placed them: one
    pass over their tensors in all. Before: the check moved them there and back, Lightning's predict there
    and back (they were the module's submodules), verification there again."""
    from ced_lightning.engines.extraction import extract_logits, extract_settings
    from ced_lightning.engines.teachers import load_teachers
    from ced_lightning.engines.trainer import build_trainer

    output = tmp_path / "once.zarr"
    check = f"teacher_check.store={workdir / 'val.zarr'}"
    cfg = _extract_cfg(workdir, output, _members(workdir, "strong"), check, "verify=8")
    teachers, records, class_names = load_teachers(cfg.teacher)
    counted = [_CountedMoves(teacher) for teacher in teachers]
    trainer = build_trainer(cfg, callbacks=[], loggers=[])
    store = extract_logits(extract_settings(cfg), counted, records, class_names, trainer)
    stats = json.loads((output / "extract_stats.json").read_text())
    assert store.is_complete() and stats["verify"]["ok"] and stats["teacher_check"]["weak"] == []
    assert [teacher.moves for teacher in counted] == [1]


def test_duplicate_teacher_names_from_checkpoints_refused(workdir: Path) -> None:
    """Before: two runs' `averaged.ckpt` both became teacher `averaged`, silently."""
    from ced_lightning.engines.teachers import teacher_members

    a, b = "runs/a/checkpoints/averaged.ckpt", "runs/b/checkpoints/averaged.ckpt"
    with pytest.raises(ValueError, match=r"'averaged' <- runs/a/.*name: a_averaged, checkpoint: runs/a/"):
        teacher_members(OmegaConf.create({"checkpoints": [a, b]}))
    with pytest.raises(ValueError, match="the same checkpoint is listed twice"):
        teacher_members(OmegaConf.create({"checkpoints": [a, a]}))
    with pytest.raises(ValueError, match="teacher names must be unique"):
        teacher_members(OmegaConf.create({"members": [{"checkpoint": a}, {"checkpoint": b}]}))
    named = [{"name": "a", "checkpoint": a}, {"name": "b", "checkpoint": b}]
    assert [m["name"] for m in teacher_members(OmegaConf.create({"members": named}))] == ["a", "b"]


def test_a_member_built_from_its_target_is_recorded_by_its_weights() -> None:
    """Before: the sha256 of a `_target_` member's weights failed on every 0-dim tensor (BatchNorm's batch
    counter), so such a member with BatchNorm could not be loaded at all."""
    from ced_lightning.engines.teachers import load_teachers, state_dict_sha256

    member = {
        "name": "cnn",
        "_target_": "ced_lightning.models.TimmMelClassifier",
        "backbone": "mobilenetv3_small_100",
        "num_classes": 4,
    }
    digests = []
    for _ in range(2):
        torch.manual_seed(0)
        models, records, _ = load_teachers(OmegaConf.create({"members": [member]}))
        assert records[0]["sha256"] == state_dict_sha256(models[0])
        digests.append(records[0]["sha256"])
    assert digests[0] == digests[1]
    models[0].init_bn.num_batches_tracked += 1  # a 0-dim tensor: counted like every other
    assert state_dict_sha256(models[0]) != digests[0]


@pytest.mark.parametrize("combine", ["mean_prob", "mean_logit"])
def test_weights_of_one_combine_bit_for_bit_as_before_and_others_weigh(combine: str) -> None:
    from ced_lightning.core.ensemble import combine_probabilities

    logits = [torch.randn(5, C, generator=torch.Generator().manual_seed(i)) * 4 for i in range(3)]
    plain = combine_probabilities(logits, combine)
    assert torch.equal(combine_probabilities(logits, combine, [1, 1.0, 1]), plain)
    weighted = combine_probabilities(logits, combine, [2.0, 1.0, 1.0])
    stacked = torch.stack(logits).double()
    w = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).view(-1, 1, 1)
    expected = (
        (torch.sigmoid(stacked) * w).sum(0) if combine == "mean_prob" else torch.sigmoid((stacked * w).sum(0))
    )
    assert torch.allclose(weighted.double(), expected, atol=1e-6) and not torch.equal(weighted, plain)
    # A weight of 0 leaves its teacher out exactly.
    assert torch.equal(combine_probabilities(logits[:2], combine, [1.0, 0.0]), torch.sigmoid(logits[0]))


def test_teacher_table_has_each_members_effect_and_the_best_member(workdir: Path) -> None:
    """Before: the table had each member and the ensemble, nothing said the ensemble was below its best
    member nor which member pulled it down. Leave-one-out of two teachers is the other one alone."""
    from ced_lightning.engines.scoring import evaluate_teachers, format_teacher_table
    from ced_lightning.models import load_model

    val = str(workdir / "val.zarr")
    models = {n: load_model(workdir / n / "teacher.pt") for n in ("strong", "weak")}
    table = evaluate_teachers(models, val, batch_size=7, device="cpu")
    strong, weak, ensemble = table["teachers"]["strong"], table["teachers"]["weak"], table["ensemble"]
    assert weak["ensemble_without"] == pytest.approx(strong["mAP"], abs=1e-6) == pytest.approx(1.0)
    assert strong["ensemble_without"] == pytest.approx(weak["mAP"], abs=1e-6)
    assert weak["effect"] == pytest.approx(ensemble["mAP"] - 1.0, abs=1e-6) and weak["effect"] < 0
    assert strong["effect"] == pytest.approx(ensemble["mAP"] - weak["mAP"], abs=1e-6) and strong["effect"] > 0
    assert table["best_member"] == "strong" and strong["weight"] == weak["weight"] == 1.0
    assert table["ensemble_over_best"] == pytest.approx(ensemble["mAP"] - 1.0, abs=1e-6)
    text = format_teacher_table(table)
    assert (
        f"ensemble against its best member (strong, mAP 1.0000): {table['ensemble_over_best']:+.4f} "
        "(below it)" in text
    )
    assert "without weak the ensemble scores 1.0000" in text and "(teacher.weights=[1,0])" in text
    assert "without strong" not in text
    json.dumps(table, allow_nan=False)

    weighted = evaluate_teachers(models, val, weights=[1.0, 0.25], batch_size=7, device="cpu")
    assert weighted["teachers"]["weak"]["weight"] == 0.25
    assert weighted["ensemble"]["mAP"] > ensemble["mAP"]  # less of the weak member
    # Leave-one-out of the weighted ensemble: the other member alone, whatever its weight.
    assert weighted["teachers"]["weak"]["ensemble_without"] == pytest.approx(1.0)
    alone = evaluate_teachers({"strong": models["strong"]}, val, batch_size=7, device="cpu")
    assert alone["teachers"]["strong"]["effect"] is None and "ensemble against" not in format_teacher_table(
        alone
    )


def test_teacher_weights_from_the_config(workdir: Path) -> None:
    from ced_lightning.engines.teachers import teacher_members

    named = [{"name": "a", "checkpoint": "a.pt"}, {"name": "b", "checkpoint": "b.pt"}]
    members = teacher_members(OmegaConf.create({"members": named, "weights": [1, 0.5]}))
    assert [(m["name"], m["weight"]) for m in members] == [("a", 1.0), ("b", 0.5)]
    assert [m["name"] for m in teacher_members(OmegaConf.create({"members": named, "weights": [0, 2]}))] == [
        "b"
    ]
    own = [{**named[0], "weight": 0}, named[1]]
    assert [(m["name"], m["weight"]) for m in teacher_members(OmegaConf.create({"members": own}))] == [
        ("b", 1.0)
    ]
    by_path = teacher_members(OmegaConf.create({"checkpoints": ["x/a.pt", "x/b.pt"], "weights": [1, 0.5]}))
    assert [m["weight"] for m in by_path] == [1.0, 0.5]
    for weights, message in (
        ([1], r"teacher.weights has 1 values for 2 teachers \(a, b\)"),
        ([1, -1], r"teacher b: weight must be a number >= 0 \(0 drops it\), not -1"),
        ([1, "x"], r"teacher b: weight must be a number >= 0"),
        ([0, 0], r"every teacher has weight 0"),
    ):
        with pytest.raises(ValueError, match=message):
            teacher_members(OmegaConf.create({"members": named, "weights": weights}))
    with pytest.raises(ValueError, match=r"teacher.weights or the members' own `weight:`, not both"):
        teacher_members(OmegaConf.create({"members": own, "weights": [1, 1]}))


def test_extract_stores_with_the_weights_it_records(workdir: Path, tmp_path: Path) -> None:
    """The store records each teacher's weight, its rows are the weighted ensemble's (its own replay,
    `verify`, recomputes them with the recorded weights), and a resume with other weights is refused."""
    from ced_lightning.extract import run_extract
    from ced_lightning.store.logits import LogitStore

    members = _members(workdir, "strong", "weak")
    out = tmp_path / "weighted.zarr"
    check = f"teacher_check.store={workdir / 'val.zarr'}"
    weighted = ["teacher.weights=[1,0.25]", check, "allow_weak_teachers=true", "verify=6"]
    run_extract(_extract_cfg(workdir, out, members, *weighted))
    store = LogitStore.open(str(out))
    assert [(t["name"], t["weight"]) for t in store.teachers] == [("strong", 1.0), ("weak", 0.25)]
    assert store.teacher_weights == [1.0, 0.25]
    stats = json.loads((out / "extract_stats.json").read_text())
    assert stats["verify"]["ok"] and stats["teacher_check"]["teachers"]["weak"]["weight"] == 0.25
    with pytest.raises(ValueError, match=r"made with other settings:\n  teachers: .*'weight': 0.25"):
        run_extract(_extract_cfg(workdir, out, members, check, "allow_weak_teachers=true"))
    dropped = tmp_path / "dropped.zarr"
    run_extract(_extract_cfg(workdir, dropped, members, "teacher.weights=[1,0]"))
    assert [t["name"] for t in LogitStore.open(str(dropped)).teachers] == ["strong"]
