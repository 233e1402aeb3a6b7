"""DistillBatchTransform: what a student's training batch gets from one epoch of the logit store."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ced_lightning.core.augment import AugmentRecipe, sample_augment_params
from ced_lightning.data.distill import DistillBatchTransform
from ced_lightning.data.draws import without_shift

RECIPE = AugmentRecipe(shift_prob=1.0, time_mask_frames=40)
N, K = 12, 3


def _transform(**kwargs) -> DistillBatchTransform:
    lengths = np.full(N, 32000)
    stored = sample_augment_params(RECIPE, 42, 0, np.arange(N), lengths)
    rng = np.random.default_rng(0)
    return DistillBatchTransform(
        rng.integers(0, 16, size=(N, K)).astype(np.uint16),
        rng.random((N, K)).astype(np.float16),
        stored,
        recipe=RECIPE,
        seed=0,
        epoch=0,
        **kwargs,
    )


def _batch(index: list[int]) -> dict:
    return {"index": torch.tensor(index), "length": torch.full((len(index),), 32000)}


def test_consistent_batch_carries_the_stored_rows_of_its_clips():
    transform = _transform(consistent=True)
    index = [5, 0, 7]
    batch = transform(_batch(index))
    assert torch.equal(
        batch["topk_indices"], torch.from_numpy(transform.topk_indices[index].astype(np.int64))
    )
    assert torch.equal(batch["topk_probs"], torch.from_numpy(transform.topk_probs[index].astype(np.float32)))
    for name, value in transform.params.subset(np.array(index)).to_torch().items():
        assert torch.equal(batch["augment"][name], value), name


def test_fresh_draws_differ_from_the_stored_ones():
    index = list(range(N))
    stored = _transform(consistent=True)(_batch(index))["augment"]
    fresh = _transform(consistent=False)(_batch(index))["augment"]
    assert not torch.equal(stored["shift"], fresh["shift"])
    assert not torch.equal(stored["time_start"], fresh["time_start"])


def test_paper_inconsistency_keeps_fresh_masks_and_drops_the_shift():
    index = list(range(N))
    ours = _transform(consistent=False)(_batch(index))["augment"]
    paper = _transform(consistent=False, fresh_shift=False)(_batch(index))["augment"]
    assert ours["shift"].abs().sum() > 0 and paper["shift"].abs().sum() == 0
    for name in ("time_start", "time_width", "freq_start", "freq_width"):
        assert torch.equal(ours[name], paper[name]), name


def test_without_shift_leaves_the_other_fields():
    params = sample_augment_params(RECIPE, 1, 0, np.arange(4), np.full(4, 16000))
    out = without_shift(params)
    assert not out.values["shift"].any()
    assert set(out.values) == set(params.values)
    assert all(np.array_equal(out.values[k], params.values[k]) for k in params.values if k != "shift")


def test_unknown_inconsistent_shift_is_refused_with_its_key(tmp_path):
    from ced_lightning.data.distill import DistillDataModule

    with pytest.raises(ValueError, match=r"distill\.inconsistent_shift"):
        DistillDataModule(
            train=str(tmp_path / "a.zarr"), logits=str(tmp_path / "b.zarr"), inconsistent_shift="x"
        )
