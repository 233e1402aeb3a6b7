"""Mid-epoch resume through a real Lightning fit on the CPU: a run resumed from a step checkpoint trains
exactly the batches the uninterrupted run trained after that step, with the same learning rates and the same
dropout draws, so it ends with the same weights bit for bit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from ced_lightning.core.optim import warmup_cosine
from ced_lightning.data.labeled import LabeledDataModule
from ced_lightning.models import create_ced
from ced_lightning.modules.supervised import SupervisedModule
from ced_lightning.store.audio_writer import write_audio_store

BATCH, CLIPS, EPOCHS, WARMUP, EVERY = 4, 48, 2, 2, 5
EPOCH_BATCHES = CLIPS // BATCH  # one rank: every clip in full batches


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    clips = [
        (f"clip{i:03d}", rng.uniform(-0.5, 0.5, int(rng.integers(1600, 4000))).astype(np.float32), [i % 3])
        for i in range(CLIPS)
    ]
    url = str(tmp_path_factory.mktemp("resume") / "train.zarr")
    write_audio_store(url, clips, class_names=["a", "b", "c"], chunk_samples=16000)
    return url


class CountingData(LabeledDataModule):
    """The real data module, noting the epoch of every training loader it builds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.built_for: list[int] = []

    def train_dataloader(self) -> DataLoader:
        self.built_for.append(self.trainer.current_epoch)
        return super().train_dataloader()


class Recorder(Callback):
    """(epoch, clip indices, learning rate) of every batch the run trains on."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, tuple[int, ...], float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.batches.append((trainer.current_epoch, tuple(batch["index"].tolist()), lr))


def _fit(
    store_url: str, root: Path, ckpt_path: Path | None = None, num_workers: int = 0
) -> tuple[Recorder, CountingData, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    # Drop-path draws from torch's generator: a resume that shifts it changes the weights.
    model = create_ced("ced_tiny", depth=2, num_classes=3, drop_path_rate=0.2)
    module = SupervisedModule(model, warmup_steps=WARMUP)
    data = CountingData(
        train=store_url, batch_size=BATCH, num_workers=num_workers, clip_seconds=0.25, shuffle_window=8
    )
    recorder = Recorder()
    checkpoints = ModelCheckpoint(
        dirpath=root, filename="{step}", every_n_train_steps=EVERY, save_top_k=-1, save_last=False
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        reload_dataloaders_every_n_epochs=1,  # as conf/trainer/default.yaml
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder, checkpoints],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return recorder, data, {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def straight(
    store_url: str, tmp_path_factory
) -> tuple[Recorder, CountingData, dict[str, torch.Tensor], Path]:
    root = tmp_path_factory.mktemp("straight")
    return (*_fit(store_url, root), root)


def test_uninterrupted_run_keeps_its_schedule_and_builds_one_loader_per_epoch(straight) -> None:
    recorder, data, _, _ = straight
    assert len(recorder.batches) == EPOCHS * EPOCH_BATCHES
    # The cosine schedule spans the whole run (Lightning's estimate of the steps), as before the fix.
    base = 1e-3  # SupervisedModule's default Adam
    total = EPOCHS * EPOCH_BATCHES
    expected = [base * warmup_cosine(i, WARMUP, total, 0.1) for i in range(total)]
    assert [lr for *_, lr in recorder.batches] == pytest.approx(expected, rel=1e-6)
    # Not resuming: the loader the estimate built is the one trained on (no second read of epoch 0).
    assert data.built_for == [0, 1]


@pytest.mark.parametrize(
    ("step", "num_workers"),
    [(EVERY, 0), (3 * EVERY, 0), (EVERY, 2)],
    ids=["epoch0", "epoch1", "epoch0-other-num-workers"],
)
def test_step_checkpoint_resumes_after_its_batches(
    straight, store_url: str, tmp_path: Path, step: int, num_workers: int
) -> None:
    recorder, _, weights, root = straight
    checkpoint = root / f"step={step}.ckpt"
    assert checkpoint.is_file()
    resumed, data, resumed_weights = _fit(store_url, tmp_path, checkpoint, num_workers=num_workers)
    # Exactly the batches after the checkpoint: none trained twice, none left out, at the same learning rates.
    assert [b[:2] for b in resumed.batches] == [b[:2] for b in recorder.batches[step:]]
    assert [b[2] for b in resumed.batches] == pytest.approx([b[2] for b in recorder.batches[step:]], rel=1e-9)
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)
    # The estimate's epoch-0 loader, then the restored epoch's (it gets the saved loader state), then epoch 1.
    epoch = step // EPOCH_BATCHES
    assert data.built_for == ([0, 0, 1] if epoch == 0 else [0, 1])
