"""Per-clip training draws (augmentation parameters, mixup λ) pinned: both tasks give today's values.

tests/data/clip_draws/draws.pt holds what a training batch of each task carried for rows `ROWS` (lengths
`LENGTHS`) at seed `SEED`, epochs `EPOCHS`, written once by `python tests/test_clip_draws.py` from the code
where the distill draws were made in `DistillBatchTransform` and the supervised ones in
`SupervisedModule.training_step` (`sample_augment_params(recipe, seed, epoch, ...)`, `sample_mixup_lambda`).
A student's run replays the teachers' stored parameters or draws fresh ones; a changed draw would change
every run, so the values are compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ced_lightning.core.augment import AugmentRecipe, sample_augment_params

PINNED = Path(__file__).parent / "data" / "clip_draws" / "draws.pt"
RECIPE = AugmentRecipe(shift_prob=0.7, time_masks=2, time_mask_frames=40, freq_masks=2, gain_db=3.0)
SEED, EPOCHS, MIXUP = 3, (0, 2), 0.5
ROWS = np.array([7, 0, 31, 12, 5, 19])
LENGTHS = np.array([32000, 16000, 8000, 32000, 24000, 1600])
STORE_ROWS, K = 32, 3


def _batch() -> dict[str, torch.Tensor]:
    return {"index": torch.from_numpy(ROWS), "length": torch.from_numpy(LENGTHS)}


def _stored():
    """The logit store's parameters of one augmentation epoch, by row (drawn under another seed)."""
    return sample_augment_params(RECIPE, 42, 0, np.arange(STORE_ROWS), np.full(STORE_ROWS, 32000))


def _flat(prefix: str, batch: dict) -> dict[str, torch.Tensor]:
    out = {f"{prefix}/augment/{name}": value for name, value in batch["augment"].items()}
    if "mixup_lambda" in batch:
        out[f"{prefix}/mixup_lambda"] = batch["mixup_lambda"]
    return out


def distill_draws() -> dict[str, torch.Tensor]:
    """What `DistillBatchTransform` adds, for each teaching mode and epoch."""
    from ced_lightning.data.distill import DistillBatchTransform

    rng = np.random.default_rng(0)
    topk = rng.integers(0, 16, size=(STORE_ROWS, K)).astype(np.uint16)
    probs = rng.random((STORE_ROWS, K)).astype(np.float16)
    modes = {"consistent": {"consistent": True}, "fresh": {"consistent": False}}
    modes["paper"] = {"consistent": False, "fresh_shift": False}
    out: dict[str, torch.Tensor] = {}
    for epoch in EPOCHS:
        for mode, kwargs in modes.items():
            transform = DistillBatchTransform(
                topk, probs, _stored(), recipe=RECIPE, seed=SEED, epoch=epoch, mixup=MIXUP, **kwargs
            )
            out.update(_flat(f"distill/{mode}/{epoch}", transform(_batch())))
    return out


def test_distill_draws_are_todays() -> None:
    pinned = torch.load(PINNED)
    drawn = distill_draws()
    assert set(drawn) == {k for k in pinned if k.startswith("distill/")}
    for key, value in drawn.items():
        assert value.dtype == pinned[key].dtype and torch.equal(value, pinned[key]), key


def test_supervised_draws_are_todays(tmp_path: Path) -> None:
    """A teacher's training batch gets its draws from `LabeledDataModule` as a student's does (`ClipDraws`),
    the same values `SupervisedModule.training_step` drew itself: seed and epoch, no seed offset."""
    from ced_lightning.data.draws import ClipDraws
    from ced_lightning.data.labeled import LabeledDataModule
    from ced_lightning.store.audio_writer import write_audio_store

    url = str(tmp_path / "train.zarr")
    clips = [(f"c{i}", np.zeros(1600, np.float32), [i % 2]) for i in range(STORE_ROWS)]
    write_audio_store(url, clips, class_names=["a", "b"], chunk_samples=16000)
    augment = {**RECIPE.to_dict(), "scale_to_clip": False}
    data = LabeledDataModule(
        train=url, seed=SEED, clip_seconds=0.1, augment=augment, mixup=MIXUP, num_workers=0
    )
    pinned = torch.load(PINNED)

    def check(batch: dict, epoch: int) -> None:
        drawn = _flat(f"supervised/{epoch}", batch)
        assert set(drawn) == {k for k in pinned if k.startswith(f"supervised/{epoch}/")}
        for key, value in drawn.items():
            assert value.dtype == pinned[key].dtype and torch.equal(value, pinned[key]), key

    transform = data.train_dataloader().dataset.transform  # epoch 0: no trainer yet
    batch = transform(_batch())
    assert torch.equal(batch["target"][:, 1], torch.from_numpy(ROWS % 2).float())
    check(batch, 0)
    for epoch in EPOCHS:
        check(ClipDraws(data.recipe, SEED, epoch, mixup=MIXUP)(_batch()), epoch)


def _write_pinned() -> None:
    """The supervised draws as `SupervisedModule.training_step` made them, and the distill ones."""
    from ced_lightning.core.losses import sample_mixup_lambda

    pinned = distill_draws()
    for epoch in EPOCHS:
        params = sample_augment_params(RECIPE, SEED, epoch, ROWS, LENGTHS).to_torch()
        lam = torch.from_numpy(sample_mixup_lambda(SEED, epoch, ROWS, MIXUP))
        pinned.update(_flat(f"supervised/{epoch}", {"augment": params, "mixup_lambda": lam}))
    PINNED.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pinned, PINNED)


if __name__ == "__main__":
    _write_pinned()
