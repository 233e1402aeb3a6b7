from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict

from ced_lightning import conf_dir
from ced_lightning.data.demo import DEMO_CLASSES, DEMO_MIDS, build_demo_stores, generate_demo_clip
from ced_lightning.engines.comparison import label_only_epochs, label_only_validations, verdict
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.logits import LogitStore
from conftest import run_command


def test_clip_is_deterministic_and_keyed_by_seed_and_index() -> None:
    wave, labels = generate_demo_clip(0, 7, 1.0)
    again, labels_again = generate_demo_clip(0, 7, 1.0)
    assert wave.dtype == np.float32 and wave.shape == (16000,)
    assert wave.tobytes() == again.tobytes() and labels == labels_again
    assert generate_demo_clip(1, 7, 1.0)[0].tobytes() != wave.tobytes()
    assert generate_demo_clip(0, 8, 1.0)[0].tobytes() != wave.tobytes()
    with pytest.raises(ValueError):
        generate_demo_clip(-1, 0)


def test_labels_valid_and_every_class_appears() -> None:
    assert len(DEMO_CLASSES) >= 12 and len(set(DEMO_CLASSES)) == len(DEMO_CLASSES)
    counts = np.zeros(len(DEMO_CLASSES), dtype=int)
    sizes = set()
    for index in range(240):
        wave, labels = generate_demo_clip(3, index, 0.5)
        assert labels == sorted(set(labels)) and 1 <= len(labels) <= 3
        assert all(0 <= c < len(DEMO_CLASSES) for c in labels)
        assert np.isfinite(wave).all() and 0.2 < np.abs(wave).max() < 1.0
        counts[labels] += 1
        sizes.add(len(labels))
    assert counts.min() > 0, dict(zip(DEMO_CLASSES, counts, strict=True))
    assert sizes == {1, 2, 3}  # overlapping events are part of the task


def test_build_demo_stores_split_reuse_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    urls = build_demo_stores(str(root), seed=5, train=12, val=4, test=4, clip_seconds=0.5)
    assert set(urls) == {"train", "val", "test"}
    stores = {split: AudioStore.open(url) for split, url in urls.items()}
    assert [len(stores[s]) for s in ("train", "val", "test")] == [12, 4, 4]
    train = stores["train"]
    assert train.class_names == DEMO_CLASSES and train.class_mids == DEMO_MIDS and train.num_classes == 16
    assert train.attrs["source"] == "demo" and train.attrs["config"]["seed"] == 5
    for i in (0, 11):
        wave, labels = generate_demo_clip(5, i, 0.5)
        assert list(train.labels(i)) == labels
        assert np.abs(train.read(i).numpy() - wave).max() <= 1 / 32768
    # Splits come from disjoint index ranges.
    assert set(train.names).isdisjoint(stores["val"].names)
    assert not np.array_equal(train.read(0).numpy(), stores["val"].read(0).numpy())
    assert len({s.fingerprint for s in stores.values()}) == 3

    first_clip = train.read(0).numpy()
    marker = root / "train.zarr" / "zarr.json"
    before = marker.stat().st_mtime_ns
    assert build_demo_stores(str(root), seed=5, train=12, val=4, test=4, clip_seconds=0.5) == urls
    assert marker.stat().st_mtime_ns == before  # complete with the same config: not rewritten
    with pytest.raises(FileExistsError, match="overwrite"):
        build_demo_stores(str(root), seed=6, train=12, val=4, test=4, clip_seconds=0.5)
    build_demo_stores(str(root), seed=6, train=12, val=4, test=4, clip_seconds=0.5, overwrite=True)
    assert AudioStore.open(urls["train"]).fingerprint == train.fingerprint  # same names and lengths
    assert not np.array_equal(AudioStore.open(urls["train"]).read(0).numpy(), first_clip)


def test_distill_store_is_the_labeled_clips_then_an_unlabeled_pool(tmp_path: Path) -> None:
    """distill.zarr (the student's store) holds the train clips as train.zarr has them, then `unlabeled`
    clips of their own index range written without labels; its config is part of the store's identity.
    (Before: no unlabeled pool, no distill.zarr.)"""
    root = tmp_path / "demo"
    kwargs = {"seed": 2, "train": 6, "val": 2, "test": 2, "clip_seconds": 0.25}
    assert "distill" not in build_demo_stores(str(root), **kwargs)  # `prepare source=demo` as before
    urls = build_demo_stores(str(root), unlabeled=5, **kwargs)
    train, distill = AudioStore.open(urls["train"]), AudioStore.open(urls["distill"])
    assert len(distill) == 11 and distill.names[:6] == train.names
    assert np.array_equal(distill.read_span(0, 6)[0], train.read_span(0, 6)[0])
    assert np.array_equal(distill.label_matrix()[:6], train.label_matrix())
    assert distill.label_matrix()[6:].sum() == 0  # the pool carries no labels
    pool_wave, pool_labels = generate_demo_clip(2, 3_000_000_000 + 4, 0.25)
    assert pool_labels  # the generator knows them; the store does not keep them
    assert np.abs(distill.read(10).numpy() - pool_wave).max() <= 1 / 32768
    others = (
        set(train.names) | set(AudioStore.open(urls["val"]).names) | set(AudioStore.open(urls["test"]).names)
    )
    assert others.isdisjoint(distill.names[6:])
    assert distill.attrs["config"]["unlabeled"] == 5
    with pytest.raises(FileExistsError, match="overwrite"):
        build_demo_stores(str(root), unlabeled=7, **kwargs)
    with pytest.raises(ValueError, match="unlabeled"):
        build_demo_stores(str(tmp_path / "other"), unlabeled=-1, **kwargs)


def test_verdict_reads_the_table_against_the_best_single_teacher_and_the_baseline() -> None:
    teachers = {"ced_tiny": 0.6468, "mobilenet": 0.6618, "ensemble": 0.7}  # the ensemble is no single teacher
    ahead, behind = verdict(teachers, 0.6945, 0.7)
    assert ahead == "student against its best single teacher (mobilenet, 0.6618): +0.0327 test mAP, ahead"
    assert behind.startswith("student against the label-only baseline (0.7000): -0.0055 test mAP, not ahead")
    assert "bench/demo_sizing.md" in behind
    assert len(verdict(teachers, 0.6945, None)) == 1 and verdict(teachers, None, 0.7) == []


def test_label_only_baseline_gets_the_students_optimizer_steps() -> None:
    """The baseline's epochs over the labeled clips give at least the student's steps, less than one of its
    epochs more: full batches per epoch, as the training stream cuts them."""
    assert label_only_epochs(6, 4800, 1200, 32) == 25  # 6 x 150 = 900 steps; 37 per epoch: 24.3 -> 25
    assert label_only_epochs(3, 1200, 1200, 32) == 3  # no pool: the student's own epochs
    for student_epochs, student_clips, labeled_clips in [(4, 3000, 700), (7, 1300, 1200)]:
        epochs = label_only_epochs(student_epochs, student_clips, labeled_clips, 32)
        student_steps, per_epoch = student_epochs * (student_clips // 32), labeled_clips // 32
        assert epochs * per_epoch >= student_steps > (epochs - 1) * per_epoch
    with pytest.raises(ValueError, match="fewer than one batch"):
        label_only_epochs(2, 100, 10, 32)


def test_label_only_baseline_is_validated_as_often_as_the_student() -> None:
    # 75 baseline epochs against a student validated 6 times: every 13 epochs, 78 epochs (never fewer steps).
    assert label_only_validations(75, 6, 1) == (78, 13)
    assert label_only_validations(25, 6, 1) == (30, 5)
    assert label_only_validations(3, 3, 1) == (3, 1)  # no pool: the student's own schedule
    assert label_only_validations(10, 6, 2) == (12, 4)  # a student validated every 2nd epoch: 3 validations
    for baseline_epochs, student_epochs in [(7, 3), (40, 12), (1, 1)]:
        epochs, every = label_only_validations(baseline_epochs, student_epochs, 1)
        assert epochs % every == 0 and epochs // every == student_epochs and epochs >= baseline_epochs


def test_label_only_baseline_is_the_supervised_task_on_the_labeled_clips(tmp_path: Path) -> None:
    """The student's config with the `task` group's supervised option: labels on train.zarr (not the pool),
    the teachers' recipe (the demo's absolute 40 frames) drawn fresh, the student's network and seed."""
    from ced_lightning import compose_config
    from ced_lightning.data.labeled import LabeledDataModule
    from ced_lightning.engines.comparison import label_only_cfg
    from ced_lightning.engines.training import build_task
    from ced_lightning.modules.supervised import SupervisedModule

    stores = build_demo_stores(
        str(tmp_path / "demo"), seed=0, train=16, unlabeled=16, val=2, test=2, clip_seconds=0.25
    )
    overrides = ["experiment=student_demo", f"paths.data_dir={tmp_path}", "model.init_from=null"]
    student = compose_config([*overrides, "data.batch_size=4", "data.num_workers=0"], tmp_path / "run")
    baseline = label_only_cfg(student)
    assert (student.task.name, baseline.task.name) == ("distill", "supervised")
    assert (student.data.train, baseline.data.train) == (stores["distill"], stores["train"])
    datamodule, module = build_task(baseline)
    assert isinstance(datamodule, LabeledDataModule) and isinstance(module, SupervisedModule)
    assert datamodule.train_url == stores["train"] and datamodule.seed == student.seed
    assert module.recipe.time_mask_frames == 40 and module.model.num_classes == len(DEMO_CLASSES)
    # Hydra's group composes the same task as the option's file read as it is (what the baseline ran).
    from_file = copy.deepcopy(baseline)
    with open_dict(from_file):
        from_file.task = OmegaConf.load(conf_dir() / "task" / "supervised.yaml")
    for resolve in (False, True):
        assert OmegaConf.to_container(baseline.task, resolve=resolve) == OmegaConf.to_container(
            from_file.task, resolve=resolve
        )


def test_worker_processes_give_the_same_store(tmp_path: Path) -> None:
    kwargs = {"seed": 1, "train": 64, "val": 1, "test": 1, "clip_seconds": 0.25}
    inline = build_demo_stores(str(tmp_path / "a"), workers=0, **kwargs)
    pooled = build_demo_stores(str(tmp_path / "b"), workers=2, **kwargs)
    a, b = AudioStore.open(inline["train"]), AudioStore.open(pooled["train"])
    assert a.fingerprint == b.fingerprint
    assert np.array_equal(a.read_span(0, 64)[0], b.read_span(0, 64)[0])
    assert np.array_equal(a.label_matrix(), b.label_matrix())


@pytest.mark.slow
def test_train_command_runs_the_demo_layer_end_to_end(tmp_path: Path) -> None:
    """`python -m ced_lightning.train` on the demo data goes through the demo layer (`data.entry`): it builds
    the stores, a teacher and the logit store that are missing, distils the student, and prints the demo's
    table. Tiny sizes (one 1-block teacher, 1 s clips, one epoch each); the real command in a subprocess."""
    data, logs = tmp_path / "data", tmp_path / "logs"
    teacher = data / "demo" / "teachers" / "ced.ckpt"
    small = ["data.clip_seconds=1.0", "data.batch_size=8", "data.eval_batch_size=8", "data.num_workers=0"]
    small += ["data.schedule.max_epochs=1", "data.schedule.warmup_steps=1"]
    args = [
        "experiment=ced_mini",
        "model=ced_tiny",
        "+model.depth=1",
        f"model.init_from={teacher}",  # the demo's start: the student starts as its CED teacher
        f"paths.data_dir={data}",
        f"paths.log_dir={logs}",
        f"hydra.run.dir={logs}/run",
        "data.demo.clips={train: 24, unlabeled: 16, val: 16, test: 16}",
        "data.extract.epochs=1",
        "data.extract.topk=3",
        "data.extract.allow_weak_teachers=true",  # a 1-epoch teacher on 24 clips is near chance
        *small,
        "data.teacher_overrides=[" + ",".join(f"'{o}'" for o in small) + "]",
        "teacher.members=[{name: ced, checkpoint: '"
        + str(teacher)
        + "', experiment: teacher_demo_ced, overrides: ['model.depth=1']}]",
        "trainer=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
    ]
    run = run_command("train", *args, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "CED demo: mAP" in run.stdout, run.stdout[-2000:]
    # The student and its label-only row side by side (the demo's side_by_side), each in its own process.
    said = run.stdout + run.stderr
    assert "training student and label-only baseline side by side" in said, said[-2000:]
    assert "label-only baseline | epoch 1 (2 of 2" in said, said[-2000:]
    rows = ("teacher ced", "teacher ensemble", "student ced_tiny, label-free", "ced_tiny with labels (train")
    for row in (*rows, "logit store"):
        assert row in run.stdout, run.stdout[-2000:]
    # The table read out: the student against its best single teacher and the label-only baseline.
    assert "student against its best single teacher (ced, " in run.stdout, run.stdout[-2000:]
    assert "student against the label-only baseline (" in run.stdout, run.stdout[-2000:]
    assert teacher.is_file() and teacher.with_suffix(".json").is_file()
    # The teachers learnt from the 24 labeled clips; the student's logit store covers those and the pool.
    assert len(AudioStore.open(str(data / "demo" / "train.zarr"))) == 24
    logits = LogitStore.open(
        str(data / "demo" / "logits_demo_mini.zarr")
    )  # experiment=ced_mini: teacher=demo_mini
    assert logits.is_complete() and len(AudioStore.open(str(data / "demo" / "distill.zarr"))) == 40
    assert logits.num_clips == 40
    # The label-only baseline: the student's steps (1 epoch x 40 // 8 = 5) over 24 labeled clips (3 a epoch).
    baseline = logs / "run" / "label_only"
    assert (baseline / "checkpoints").is_dir()
    assert "for 2 epochs, the student's optimizer steps" in run.stderr + run.stdout


def test_the_closing_table_compares_with_a_copy_that_shows_fewer_columns(capsys) -> None:
    """The steps column comes first: a table quoted with its val and test columns, or test alone (the
    README's), still lines up with the printed one (`bench.readme_check.compare_tables`)."""
    from bench.readme_check import compare_tables, table_rows

    from ced_lightning.engines.comparison import print_comparison

    rows = [
        ("teacher mobilenet", "", "0.6404", "0.6618"),
        ("student ced_tiny, label-free", "900", "0.6862", "0.6923"),
        ("chance (mean label frequency)", "", "0.2061", "0.2103"),
        ("logit store / audio store", "", "0.06 %", ""),
    ]
    print_comparison(rows, title="CED demo: mAP")
    measured = table_rows(capsys.readouterr().out.splitlines())
    assert measured["student ced_tiny, label-free"] == ["900", "0.6862", "0.6923"]
    shown = {
        "teacher mobilenet": ["0.6404", "0.6618"],
        "student ced_tiny, label-free": ["0.6923"],
        "logit store / audio store": ["0.06 %", ""],
    }
    assert compare_tables(shown, measured, tolerance=0.0) == []
