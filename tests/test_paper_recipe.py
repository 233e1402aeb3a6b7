"""The paper experiments against the original code's training configs (github.com/RicherMans/CED).

Every value below is the original's, with the file it comes from named beside it: `trainconfig/full_*`
and `trainconfig/balanced_mixup_*` (per model size), the defaults of `utils.TrainConfig` for what those files
leave unset, and `logitconfig/*_chunk10s_topk20.yaml` for the teachers' top-k.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ced_lightning import compose_config
from ced_lightning.core.optim import lr_factor, paper_warmup_cosine, warmup_cosine
from ced_lightning.data.stream import plan_epoch

SIZES = ("tiny", "mini", "small", "base")
# optimizer_args.lr of trainconfig/{full_audiotransformer,balanced_mixup}_<size>_*.yaml (the same in both)
LR = {"tiny": 1e-3, "mini": 1e-3, "small": 3e-4, "base": 3e-4}
# Per data group: trainconfig/full_audiotransformer_<size>_T_Ensemble5014_chunk10.yaml (audioset) and
# trainconfig/balanced_mixup_<size>_T_ensemble5014_chunk10.yaml (audioset_balanced), equal for all sizes.
ORIGINAL = {
    "audioset": {
        "batch_size": 128,  # trainconfig/full_*.yaml batch_size
        "warmup_steps": 62_500,  # trainconfig/full_*.yaml warmup_iters
        "epoch_length": 6_250,  # trainconfig/full_*.yaml epoch_length
        "epochs": 300,  # trainconfig/full_*.yaml epochs
        "mixup": None,  # trainconfig/full_*.yaml mixup: null
        "val_every": 3,  # trainconfig/full_*.yaml valid_every
    },
    "audioset_balanced": {
        "batch_size": 32,  # trainconfig/balanced_mixup_*.yaml batch_size
        "warmup_steps": 5_000,  # trainconfig/balanced_mixup_*.yaml warmup_iters
        "epoch_length": None,  # trainconfig/balanced_mixup_*.yaml epoch_length: null (one pass)
        "epochs": 300,  # trainconfig/balanced_mixup_*.yaml epochs
        "mixup": 0.5,  # trainconfig/balanced_mixup_*.yaml mixup
        "val_every": 5,  # trainconfig/balanced_mixup_*.yaml valid_every
    },
}


@pytest.mark.parametrize("data", ["audioset", "audioset_balanced"])
@pytest.mark.parametrize("size", SIZES)
def test_paper_experiments_follow_the_original_training_configs(size: str, data: str) -> None:
    cfg = compose_config([f"experiment=paper_ced_{size}", f"data={data}"])
    want = ORIGINAL[data]
    assert cfg.model.name == f"ced_{size}" and cfg.model.init_from == f"ced_{size}_mae"
    assert cfg.optim.optimizer.lr == LR[size]  # trainconfig/*_<size>_*.yaml optimizer_args.lr
    assert cfg.data.batch_size == want["batch_size"]
    assert cfg.optim.warmup_steps == want["warmup_steps"]
    assert cfg.data.schedule.epoch_length == want["epoch_length"]
    assert cfg.trainer.limit_train_batches == want["epoch_length"]
    assert cfg.data.schedule.max_epochs == cfg.trainer.max_epochs == want["epochs"]
    assert cfg.distill.mixup == cfg.task.datamodule.mixup == want["mixup"]
    assert cfg.data.schedule.val_every == cfg.trainer.check_val_every_n_epoch == want["val_every"]
    # trainconfig/*.yaml optimizer: Adam8bit, optimizer_args without weight_decay: bitsandbytes' default 0
    assert cfg.optim.optimizer._target_ == "ced_lightning.core.optim.adam8bit_or_adam"
    assert cfg.optim.optimizer.weight_decay == 0.0
    # logitconfig/{full,balanced}_base_chunk10s_topk20.yaml topk: 20 (the import takes k from the files;
    # extract, the other way to build the store, defaults to the same for AudioSet's 527 classes)
    from ced_lightning.engines.extraction import default_topk

    assert compose_config([], config="extract").topk is None and default_topk(527) == 20
    # trainconfig/*.yaml loss: BCEWithLogitsLoss on the teachers' top-k, utils.TrainConfig label_type: 'zero'
    assert (cfg.distill.loss, cfg.distill.target_fill, cfg.distill.label_weight) == ("bce", "zero", 0.0)
    # BCEWithLogitsLoss on the raw logits: no temperature, i.e. T = 1
    assert cfg.distill.temperature == 1.0
    assert cfg.distill.consistent is True  # utils.TrainConfig disable_consistency: False
    # trainconfig/*.yaml early_stop: 10 (validations without a better mAP)
    assert cfg.callbacks.early_stopping.patience == 10
    # trainconfig/*.yaml n_saved: 4 and utils.TrainConfig average: True: the mean of the 4 best checkpoints
    assert cfg.callbacks.model_checkpoint.save_top_k == cfg.callbacks.average_best.top_k == 4
    assert cfg.test_ckpt == "averaged"
    # utils.TrainConfig decay_frac: 0.1, use_scheduler: True; run.py's ignite warm-up + cosine
    assert cfg.optim.min_lr_ratio == 0.1
    assert cfg.optim.schedule == cfg.task.module.lr_schedule == "paper"
    # run.py: DataLoader(train_dataset, shuffle=True) without drop_last: the last, shorter batch trains
    assert cfg.data.drop_last is False and cfg.task.datamodule.drop_last is False


def test_other_recipes_keep_our_schedule_and_full_batches() -> None:
    cfg = compose_config(["experiment=ced_small", "data=audioset_balanced"])
    assert cfg.task.module.lr_schedule == "warmup_cosine" and cfg.task.datamodule.drop_last is True


def test_the_original_split_trains_on_every_balanced_clip_and_selects_on_eval() -> None:
    cfg = compose_config(
        ["experiment=paper_ced_mini", "data=audioset_balanced_original", "paths.data_dir=/d"]
    )
    assert cfg.data.train == "/d/balanced_all.zarr" and cfg.data.logits == "/d/logits_balanced_all.zarr"
    # trainconfig/balanced_mixup_*.yaml eval_data: data/eval.tsv, the test set, selects and stops early
    assert cfg.data.val == cfg.data.test == "/d/eval.zarr"
    assert cfg.data.batch_size == 32 and cfg.data.drop_last is False and cfg.optim.warmup_steps == 5000


def ignite_049_lrs(lr: float, warmup: int, cycle: int, steps: int, decay_frac: float = 0.1) -> list[float]:
    """run.py's learning rates, step by step: pytorch-ignite 0.4.9 `create_lr_scheduler_with_warmup(
    CosineAnnealingScheduler(optimizer, 'lr', lr, lr * decay_frac, cycle), warmup_start_value=0.0,
    warmup_duration=warmup)` called at every ITERATION_STARTED, restated from ignite's source."""
    # create_lr_scheduler_with_warmup: the cosine's first value equals the warm-up's end, so the
    # PiecewiseLinear milestones end one step early; the ConcatScheduler hands over after
    # `milestones[-1][0] + 1` events.
    milestones = [(0, 0.0), (warmup - 1, lr)]
    if warmup > 2:
        milestones[-1] = (warmup - 2, lr - lr / (warmup - 1))
    else:
        milestones.pop(-1)
    duration = milestones[-1][0] + 1
    out, warm_index, cos_index = [], 0, 0
    for _ in range(steps):
        if warm_index < duration:
            (m0, v0), (m1, v1) = milestones[0], milestones[-1]
            value = v1 if warm_index >= m1 else v0 + (v1 - v0) * (warm_index - m0) / (m1 - m0)
            warm_index += 1
        else:
            if cos_index != 0 and cos_index % cycle == 0:  # CyclicalScheduler.__call__: a new cycle
                cos_index = 0
            end = lr * decay_frac
            value = lr + (end - lr) / 2 * (1 - math.cos(math.pi * cos_index / cycle))
            cos_index += 1
        out.append(value)
    return out


@pytest.mark.parametrize(
    ("warmup", "epochs", "epoch_length"),
    [
        (5_000, 300, 643),  # AS-20K: trainconfig/balanced_mixup_*.yaml, len(train_dataloader) of ~20,550 rows
        (2, 3, 7),
        (3, 4, 5),
        (10, 2, 40),  # a run longer than the cycle: ignite restarts at lr
    ],
)
def test_paper_schedule_is_the_original_step_for_step(warmup: int, epochs: int, epoch_length: int) -> None:
    lr = 1e-3
    cycle = epochs * epoch_length  # run.py decay_steps
    steps = cycle + (warmup if warmup == 10 else 0)
    factor = lr_factor("paper", warmup, cycle, 0.1)
    ours = np.array([lr * factor(i) for i in range(steps)])
    np.testing.assert_allclose(ours, ignite_049_lrs(lr, warmup, cycle, steps), rtol=1e-12, atol=1e-18)


def test_paper_and_our_schedules_differ_mid_run() -> None:
    """How far apart the two are after the warm-up, in units of the peak lr (docs/reproduce.md quotes these):
    AS-2M; AS-20K at the original's 643 steps per epoch; AS-20K with ours at 623 (held-out split, full
    batches only) against the original's 643."""
    for warmup, paper_total, our_total, gap in (
        (62_500, 300 * 6_250, 300 * 6_250, 0.028),
        (5_000, 300 * 643, 300 * 643, 0.021),
        (5_000, 300 * 643, 300 * 623, 0.048),
    ):
        steps = np.arange(warmup, our_total, 97)
        paper = np.array([paper_warmup_cosine(int(s), warmup, paper_total) for s in steps])
        ours = np.array([warmup_cosine(int(s), warmup, our_total) for s in steps])
        assert abs(float(np.max(np.abs(paper - ours))) - gap) < 0.001
        assert paper_warmup_cosine(0, warmup, paper_total) == 0.0
        assert warmup_cosine(0, warmup, our_total) == pytest.approx(1 / warmup)
        # the original's last step is still above 0.1 (0.1025 AS-2M, 0.1015 AS-20K); ours ends at 0.1
        assert paper_warmup_cosine(paper_total - 1, warmup, paper_total) > 0.1 + 1e-3
        assert warmup_cosine(our_total, warmup, our_total) == pytest.approx(0.1)


def test_unknown_schedule_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"optim\.schedule must be one of"):
        lr_factor("linear", 10, 100, 0.1)


@pytest.mark.parametrize("rows", [20_550, 19_944, 64])
def test_drop_last_false_trains_every_row_once_in_ceil_batches(rows: int) -> None:
    """AS-20K steps per epoch: ceil(rows / 32) as the original's DataLoader (drop_last=False), where ours
    with full batches only trains floor(rows / 32)."""
    plan = plan_epoch(rows, 32, seed=1, epoch=0, drop_last=False)
    batches = [b for window in plan.windows for b in window]
    assert plan.num_batches == len(batches) == math.ceil(rows / 32)
    assert sorted(np.concatenate(batches).tolist()) == list(range(rows))
    assert [len(b) for b in batches[:-1]] == [32] * (len(batches) - 1)
    assert plan_epoch(rows, 32, seed=1, epoch=0).num_batches == rows // 32


def test_drop_last_false_on_two_ranks_steps_together() -> None:
    plans = [plan_epoch(101, 8, seed=3, epoch=1, rank=r, world_size=2, drop_last=False) for r in (0, 1)]
    counts = [[len(b) for w in p.windows for b in w] for p in plans]
    assert len(counts[0]) == len(counts[1]) and sum(counts[0]) == sum(counts[1])
    rows = [i for p in plans for w in p.windows for b in w for i in b.tolist()]
    assert len(rows) == len(set(rows))
    # each rank trains its smaller share whole, the last batch shorter (with full batches only: fewer clips)
    full = [plan_epoch(101, 8, seed=3, epoch=1, rank=r, world_size=2).num_batches * 8 for r in (0, 1)]
    assert sum(counts[0]) % 8 != 0 and sum(counts[0]) > full[0]
