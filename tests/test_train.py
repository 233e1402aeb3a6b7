"""The `train` entry point: every config composes, teachers and students run, resume is exact, multirun and
offline W&B work. Tiny models and a tiny demo set; the real components throughout."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ced_lightning import compose_config, conf_dir
from ced_lightning.models import create_ced
from conftest import run_command, tiny_student_overrides

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (conf_dir() / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("data", ["demo", "audioset", "audioset_balanced"])
def test_every_experiment_composes(experiment: str, data: str) -> None:
    cfg = compose_config([f"experiment={experiment}", f"data={data}"])
    assert cfg.task.name in {"distill", "supervised"}
    assert cfg.model._target_ and cfg.data.train and cfg.trainer.max_epochs > 0


def test_released_recipe_values() -> None:
    full = compose_config(["experiment=ced_mini", "data=audioset"])
    assert (full.data.batch_size, full.optim.optimizer.lr, full.optim.warmup_steps) == (128, 1e-3, 62500)
    assert full.trainer.limit_train_batches == 6250 and full.trainer.check_val_every_n_epoch == 3
    assert full.callbacks.early_stopping.patience == 10 and full.distill.mixup is None
    assert compose_config(["experiment=ced_small", "data=audioset"]).optim.optimizer.lr == 3e-4
    balanced = compose_config(["experiment=ced_mini", "data=audioset_balanced"])
    assert (balanced.data.batch_size, balanced.distill.mixup, balanced.optim.warmup_steps) == (32, 0.5, 5000)


@pytest.mark.parametrize(
    "group", ["logger", "trainer", "optim", "model", "debug", "hparams_search", "augment"]
)
def test_every_group_option_composes(group: str) -> None:
    for option in sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")):
        compose_config([f"{group}={option}"])


@pytest.mark.parametrize("trainer", sorted(p.stem for p in (conf_dir() / "trainer").glob("*.yaml")))
def test_no_trainer_config_lets_lightning_inject_a_distributed_sampler(trainer: str) -> None:
    # Our loaders shard by rank; Lightning's DistributedSampler breaks `EqualLengthBatches` (a TypeError).
    assert (
        compose_config([f"trainer={trainer}", "trainer.devices=4"]).trainer.use_distributed_sampler is False
    )


def _train_overrides(demo: dict[str, str], *extra: str) -> list[str]:
    return [
        *tiny_student_overrides(demo),
        "data.batch_size=8",
        "data.eval_batch_size=8",
        "data.num_workers=0",
        "data.clip_seconds=1.0",
        "trainer=cpu",
        "logger=csv",
        "callbacks.progress_bar=null",
        *extra,
    ]


def test_distill_fast_dev_run(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    from ced_lightning.engines.training import train

    cfg = compose_config(_train_overrides(tiny_demo, "debug=fdr"), output_dir=tmp_path)
    train(cfg)


def test_teacher_fast_dev_run(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    from ced_lightning.engines.training import train

    overrides = _train_overrides(tiny_demo, "debug=fdr")
    overrides[0] = "experiment=teacher_demo_cnn"
    overrides[1] = "model=timm"
    overrides[2] = "model.backbone=mobilenetv3_small_050"
    cfg = compose_config(overrides, output_dir=tmp_path)
    train(cfg)


def test_missing_user_store_names_the_command(tmp_path: Path) -> None:
    from ced_lightning.engines.inputs import ensure_inputs

    cfg = compose_config(["data=audioset", f"paths.data_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match=r"python -m ced_lightning\.prepare"):
        ensure_inputs(cfg)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def test_resume_continues_identically(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    """Two epochs straight equal one epoch, a checkpoint, and a resumed second epoch, bit for bit."""
    from ced_lightning.engines.training import train

    common = [
        "trainer.max_epochs=2",
        "test=false",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.early_stopping=null",
        "callbacks.average_best=null",
        "data.schedule.warmup_steps=2",
        "distill.mixup=0.5",
    ]
    straight = tmp_path / "straight"
    train(compose_config(_train_overrides(tiny_demo, *common), output_dir=straight))
    # An interrupted run: its folder holds the first epoch's checkpoint, which the resume continues beside.
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoints").mkdir(parents=True)
    first_epoch = interrupted / "checkpoints" / "epoch_000.ckpt"
    shutil.copyfile(straight / "checkpoints" / "epoch_000.ckpt", first_epoch)
    resumed = tmp_path / "resumed"
    train(
        compose_config(_train_overrides(tiny_demo, *common, f"ckpt_path={first_epoch}"), output_dir=resumed)
    )
    a, b = _final_weights(straight), _final_weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _logged(out: Path, key: str) -> list[float]:
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_resume_keeps_the_best_checkpoints_and_the_best_score(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    """`ckpt_path=<run>/checkpoints/last.ckpt` from a new run folder: checkpoints continue in the old folder,
    the best-k of before the resume stay known (averaged.ckpt is built from them too), and the returned
    val/mAP is the best validation of the whole run, not the last one."""
    from ced_lightning.engines.training import train

    # Mixup on (the demo's schedule no longer sets it): this curve's last validation is below its best.
    common = [
        "test=false",
        "callbacks.early_stopping=null",
        "data.schedule.warmup_steps=2",
        "distill.mixup=0.5",
    ]
    first = tmp_path / "first"
    train(compose_config(_train_overrides(tiny_demo, *common, "trainer.max_epochs=2"), output_dir=first))
    folder = first / "checkpoints"
    before = {folder / "epoch_000.ckpt", folder / "epoch_001.ckpt"}
    assert all(p.is_file() for p in before)
    resumed = tmp_path / "resumed"
    metrics = train(
        compose_config(
            _train_overrides(tiny_demo, *common, "trainer.max_epochs=4", f"ckpt_path={folder / 'last.ckpt'}"),
            output_dir=resumed,
        )
    )
    assert metrics["checkpoint_dir"] == os.path.realpath(folder) and not (resumed / "checkpoints").exists()
    state = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)
    (checkpoint_state,) = (v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint"))
    best_k = {Path(p) for p in checkpoint_state["best_k_models"]}
    assert {p.resolve() for p in before} <= {p.resolve() for p in best_k} and len(best_k) == 4
    averaged = torch.load(folder / "averaged.ckpt", map_location="cpu", weights_only=False)
    validations = _logged(first, "val/mAP") + _logged(resumed, "val/mAP")
    # Here the best validation is one from before the resume, and the last one is worse.
    assert len(validations) == 4 and validations[-1] < max(validations[:2])
    assert metrics["val/mAP"] == pytest.approx(max(validations))
    assert {Path(p).resolve() for p in averaged["averaged_from"]} == {p.resolve() for p in best_k}
    # Validated once after the fit: it holds the better of the average and the best single checkpoint.
    kept = averaged["averaging"]
    assert metrics["averaging"] == kept and kept["best_single_score"] == pytest.approx(max(validations))
    if kept["kept"] == "best single":
        best = torch.load(kept["best_single"], map_location="cpu", weights_only=False)
        assert all(torch.equal(v, averaged["state_dict"][k]) for k, v in best["state_dict"].items())
    else:
        assert kept["averaged_score"] >= kept["best_single_score"]


def _run_cli(args: list[str], cwd: Path, wandb_auto: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "CED_ROOT": str(cwd), "OMP_NUM_THREADS": "1"}
    if wandb_auto:  # a user who never ran `wandb login`: no WANDB_MODE, no key, an empty home
        for key in ("WANDB_MODE", "WANDB_API_KEY"):
            env.pop(key, None)
        home = cwd / "home"
        home.mkdir(exist_ok=True)
        env.update(HOME=str(home), NETRC=str(home / ".netrc"))
    result = subprocess.run(
        [sys.executable, "-m", "ced_lightning.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_multirun_two_jobs_and_offline_wandb(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    overrides = _train_overrides(
        tiny_demo, "debug=limit", "trainer.max_epochs=1", "test=false", "logger=default"
    )
    result = _run_cli(["-m", *overrides, "distill.consistent=true,false"], tmp_path, wandb_auto=True)
    jobs = sorted((tmp_path / "logs" / "debug" / "multiruns").glob("*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert list((job / "wandb").glob("offline-run-*")), f"no offline W&B run in {job}"
        # The training curves come from the run itself, whatever the logger (here W&B offline and CSV).
        assert (job / "checkpoints" / "training_curves.png").is_file()
    assert "logging offline (not logged in" in result.stdout + result.stderr


def test_ddp_two_processes_share_one_run_folder(tiny_demo: dict[str, str], tmp_path: Path) -> None:
    """DDP on the CPU (gloo, 2 processes re-executed by Lightning): one run folder, one log, rank-disjoint
    batches, and the test step sees every clip once. Only `trainer.devices=2`, not `trainer=ddp`: Lightning
    picks DDP itself, and must not inject its DistributedSampler into our evaluation batches (the
    `trainer=gpu trainer.devices=4` case, which failed at the first validation)."""
    overrides = _train_overrides(
        tiny_demo,
        "trainer.devices=2",
        "trainer.max_epochs=2",  # two checkpoints: their average is validated on both ranks
        "callbacks.early_stopping=null",
        "hydra.run.dir=logs/ddp_run",
    )
    result = _run_cli(overrides, tmp_path)
    runs = [p for p in (tmp_path / "logs").iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["ddp_run"], runs
    assert len(list((tmp_path / "logs" / "ddp_run").glob("*.log"))) == 1
    assert (tmp_path / "logs" / "ddp_run" / "checkpoints" / "averaged.ckpt").is_file()
    assert (tmp_path / "logs" / "ddp_run" / "checkpoints" / "averaged.json").is_file()
    assert "averaged 2 checkpoints (epochs " in result.stdout + result.stderr
    assert "test/mAP" in result.stdout + result.stderr
    assert "CED demo: mAP" in result.stdout  # the closing table, scored on rank 0 alone


@pytest.mark.parametrize("train_epoch", [0, 3])
def test_student_replays_exactly_what_the_teachers_saw(tiny_demo: dict[str, str], train_epoch: int) -> None:
    """Through the real data path: the student's augmented spectrogram of each clip in a training batch is
    bit-identical to the teacher-side one rebuilt from the audio store and the stored parameters of
    augmentation epoch `train_epoch mod E`, and the targets are the stored top-k."""
    from ced_lightning.core.augment import AugmentParams, augmented_spectrogram
    from ced_lightning.data.distill import DistillDataModule
    from ced_lightning.store import AudioStore, LogitStore

    data = DistillDataModule(
        train=tiny_demo["train"], logits=tiny_demo["logits"], batch_size=6, num_workers=0
    )
    logits, audio = LogitStore.open(tiny_demo["logits"]), AudioStore.open(tiny_demo["train"])

    class _Trainer:  # the two attributes the data module reads from Lightning's Trainer
        current_epoch, global_rank, world_size = train_epoch, 0, 1

    data.trainer = _Trainer()
    student = create_ced("ced_tiny", depth=1, num_classes=logits.num_classes)
    # What Lightning does to a batch before training_step: the data module's after-transfer hook.
    batch = data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)
    params = AugmentParams.from_torch(batch["augment"])
    mel = augmented_spectrogram(student.front_end, batch["waveform"], batch["length"], params, logits.recipe)
    aug_epoch = train_epoch % logits.epochs
    for row, i in enumerate(batch["index"].tolist()):
        indices, probs, stored = logits.read(aug_epoch, i)
        clip = audio.read(i)[: logits.clip_samples]
        wave = torch.zeros(1, logits.clip_samples)
        wave[0, : len(clip)] = clip
        teacher_side = augmented_spectrogram(
            student.front_end, wave, torch.tensor([len(clip)]), stored, logits.recipe
        )
        assert torch.equal(mel[row], teacher_side[0])
        assert params.subset(np.array([row])) == stored
        assert torch.equal(batch["topk_indices"][row], torch.from_numpy(indices.astype(np.int64)))
        assert torch.equal(batch["topk_probs"][row], torch.from_numpy(probs))


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_missing_optimizer_package_stops_before_the_demo_builds_anything(tmp_path: Path) -> None:
    from ced_lightning.engines.inputs import ensure_inputs

    cfg = compose_config(["experiment=ced_mini", "optim=adam8bit", f"paths.data_dir={tmp_path}"])
    with pytest.raises(ImportError, match=r"optim\.optimizer\._target_=bitsandbytes"):
        ensure_inputs(cfg)
    assert not any(tmp_path.iterdir())  # no demo store, teacher or logit store was started


def test_evaluation_store_with_another_class_list_is_refused_up_front(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    from ced_lightning.data.distill import DistillDataModule
    from ced_lightning.store import AudioStore
    from ced_lightning.store.audio_writer import write_audio_store

    names = list(AudioStore.open(tiny_demo["val"]).class_names)
    clips = [(f"c{i}", np.zeros(16000, np.float32), [0]) for i in range(2)]
    reordered = str(tmp_path / "reordered.zarr")
    write_audio_store(reordered, clips, class_names=[names[1], names[0], *names[2:]])
    fewer = str(tmp_path / "fewer.zarr")
    write_audio_store(fewer, clips, class_names=names[:-1])
    common = {"train": tiny_demo["train"], "logits": tiny_demo["logits"], "num_workers": 0}
    with pytest.raises(ValueError, match=rf"data\.val={reordered} names its classes differently.*logits"):
        DistillDataModule(val=reordered, **common)
    with pytest.raises(ValueError, match=rf"data\.test={fewer} has {len(names) - 1} classes.*logit store"):
        DistillDataModule(test=fewer, **common)


@pytest.mark.parametrize("world_size", [1, 4, 8, 23])
def test_every_rank_gets_evaluation_batches_with_every_clip_once(world_size: int) -> None:
    """3 batches of 64 equal-length clips for up to 23 ranks (the demo's 300 val clips on 8 GPUs had 5):
    every rank gets one, and the ranks together hold every clip once (the gathered mAP stays exact)."""
    from ced_lightning.data.labeled import EqualLengthBatches

    lengths = np.array([32000] * 20 + [16000] * 3)
    per_rank = [list(EqualLengthBatches(lengths, 64, rank, world_size)) for rank in range(world_size)]
    assert all(per_rank)
    assert sorted(i for batches in per_rank for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(set(lengths[b])) == 1 for batches in per_rank for b in batches)
    with pytest.raises(ValueError, match="23 clips cannot give each of 24 ranks a batch"):
        EqualLengthBatches(lengths, 64, 0, 24)


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        (["test_ckpt=avg"], r"test_ckpt must be one of best, last, averaged, not 'avg'"),
        (["train=false"], r"train=false test=true .* ckpt_path is null"),
        (["ckpt_path=/nowhere/last.ckpt"], r"ckpt_path=/nowhere/last\.ckpt: no such checkpoint file"),
        (
            ["hydra.mode=MULTIRUN", "trainer=ddp", "trainer.accelerator=cpu"],
            r"multirun .* trainer\.devices=2 x trainer\.num_nodes=1 \(2 processes\).* one job per launch",
        ),
        (
            ["data.schedule.max_epochs=0"],
            r"trainer\.max_epochs=0 \(from data\.schedule\.max_epochs\): train=true would take no optimizer",
        ),
        (["+trainer.max_steps=0"], r"trainer\.max_steps=0: train=true would take no optimizer step"),
        (["trainer.limit_train_batches=0.0"], r"trainer\.limit_train_batches=0\.0: train=true would take no"),
        (["+trainer.max_time=00:00:00:00"], r"trainer\.max_time=00:00:00:00: train=true would take no"),
        (
            ["augment=none", "augment.time_mask_frames=50"],
            r"task=distill takes its augmentation from the logit store .*, so augment=none "
            r"augment\.time_mask_frames=50 would change nothing",
        ),
    ],
    ids=[
        "test_ckpt-typo",
        "test-untrained-weights",
        "missing-ckpt",
        "multirun-ddp",
        "no-epochs",
        "no-steps",
        "no-batches",
        "no-time",
        "distill-augment",
    ],
)
def test_run_options_are_refused_before_anything_starts(
    overrides: list[str], error: str, tmp_path: Path
) -> None:
    from ced_lightning.engines.inputs import ensure_inputs

    cfg = compose_config(["experiment=ced_mini", f"paths.data_dir={tmp_path}", *overrides])
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        ensure_inputs(cfg)
    assert not any(tmp_path.iterdir())  # the demo built nothing


def test_a_fit_without_steps_fails_the_command(tmp_path: Path) -> None:
    """Before: `trainer.max_epochs=0` exited 0 and reported the test mAP of untrained weights."""
    done = run_command(
        "train", "experiment=ced_mini", f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=0",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2  # a config value: the usage exit status
    assert "trainer.max_epochs=0: train=true would take no optimizer step" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # the demo's inputs were not built for nothing


def _store_with_short_clips(source_url: str, url: Path, samples: int = 200) -> str:
    """The clips of `source_url`, every other one cut to `samples`: same classes, labels and names."""
    from ced_lightning.store import AudioStore
    from ced_lightning.store.audio_writer import write_audio_store

    source = AudioStore.open(source_url)
    clips = [
        (
            source.names[i],
            source.read_samples(i)[: samples if i % 2 == 0 else None],
            source.labels(i).tolist(),
        )
        for i in range(len(source))
    ]
    write_audio_store(url, clips, class_names=source.class_names, class_mids=source.class_mids)
    return str(url)


def test_training_validates_on_clips_shorter_than_one_stft_window(
    tiny_demo: dict[str, str], tmp_path: Path
) -> None:
    """Before: the validation batch of 200-sample clips (batched by equal length, so nothing pads them)
    raised `RuntimeError: ... Padding size should be less than the corresponding input dimension`."""
    from ced_lightning.engines.training import train

    val = _store_with_short_clips(tiny_demo["val"], tmp_path / "short_val.zarr")
    overrides = _train_overrides({**tiny_demo, "val": val}, "debug=fdr")
    train(compose_config(overrides, output_dir=tmp_path / "distill"))
    overrides[0:3] = ["experiment=teacher_demo_cnn", "model=timm", "model.backbone=mobilenetv3_small_050"]
    train(
        compose_config(overrides, output_dir=tmp_path / "teacher")
    )  # its 1024-point window: 200 < 512 < 1024
