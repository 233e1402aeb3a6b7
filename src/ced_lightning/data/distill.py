"""DistillDataModule: audio from the audio store; teachers' top-k and augmentation from the logit store.

A training item is a row of the logit store: a clip, or a segment of a long clip in a store of segments
(`LogitStore.segments`); its audio is read at the row's clip and start, as the teachers read it.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentParams, AugmentRecipe
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.labels import check_same_classes
from ced_lightning.core.rng import FRESH_AUGMENT_SEED_OFFSET
from ced_lightning.data.draws import ClipDraws
from ced_lightning.data.labeled import LabeledDataModule
from ced_lightning.data.stream import ClipBatchStream, Int16Batches, ResumableLoader
from ced_lightning.store import AudioStore, LogitStore
from ced_lightning.store.concat import (
    ConcatAudioStore,
    audio_source,
    describe_source_mismatch,
    open_audio,
    store_urls,
)

log = logging.getLogger(__name__)


class DistillBatchTransform:
    """Runs in DataLoader workers: adds each clip's stored top-k and labels, and its augmentation parameters
    and mixup λ (`ClipDraws`: the stored parameters, or fresh draws when not consistent).

    Holds one augmentation epoch's slice of the logit store, loaded once per epoch in the main process and
    shared with forked workers, so no item ever reads the logit store.
    """

    def __init__(
        self,
        topk_indices: np.ndarray,
        topk_probs: np.ndarray,
        params: AugmentParams,
        *,
        consistent: bool,
        recipe: AugmentRecipe,
        seed: int,
        epoch: int,
        mixup: float | None = None,
        labels: np.ndarray | None = None,
        row_clips: np.ndarray | None = None,
        fresh_shift: bool = True,
    ) -> None:
        self.topk_indices = topk_indices
        self.topk_probs = topk_probs
        self.params = params
        self.labels = labels
        self.row_clips = row_clips  # each row's clip (None: row i is clip i)
        # Fresh draws under their own seed, so that they never coincide with the teachers' stored ones.
        self.draws = ClipDraws(
            recipe,
            seed,
            epoch,
            mixup=mixup,
            replay=params if consistent else None,
            augment_seed_offset=FRESH_AUGMENT_SEED_OFFSET,
            shift=fresh_shift,  # false: the paper's inconsistent teaching, fresh masks on the unshifted clip
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        index = batch["index"].numpy()
        batch["topk_indices"] = torch.from_numpy(self.topk_indices[index].astype(np.int64))
        batch["topk_probs"] = torch.from_numpy(np.ascontiguousarray(self.topk_probs[index], dtype=np.float32))
        if self.labels is not None:  # per clip: a segment has its clip's labels
            clips = index if self.row_clips is None else self.row_clips[index]
            batch["target"] = torch.from_numpy(self.labels[clips].astype(np.float32))
        return self.draws(batch)


class DistillDataModule(Int16Batches, LightningDataModule):
    """Training batches for `StudentDistillModule`; validation/test batches from labeled stores.

    Training epoch n replays augmentation epoch n mod E of the logit store. Needs
    `reload_dataloaders_every_n_epochs=1` in the Trainer (set in `conf/trainer/default.yaml`).
    """

    def __init__(
        self,
        train: str | list[str],
        logits: str,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
        shuffle_window: int = 256,
        seed: int = 0,
        consistent: bool = True,
        mixup: float | None = None,
        with_labels: bool | float = False,
        inconsistent_shift: str = "fresh",
        drop_last: bool = True,
        order_workers: int | None = None,
    ) -> None:
        super().__init__()
        # `train`: one audio store, or a list read as one (`store.concat`: labeled then unlabeled, uncopied).
        self.train_url, self.logits_url = " + ".join(store_urls(train)), str(logits)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.order_workers = order_workers  # the batch order of that many workers (ClipBatchStream)
        self.pin_memory = pin_memory
        self.shuffle_window = shuffle_window
        self.drop_last = drop_last
        self.seed = seed
        self.consistent = consistent
        if inconsistent_shift not in ("fresh", "none"):
            raise ConfigError(
                f"distill.inconsistent_shift must be 'fresh' or 'none', got {inconsistent_shift!r}"
            )
        self.inconsistent_shift = inconsistent_shift
        self.mixup = mixup or None
        # A weight counts as its sign: the task config passes distill.label_weight (labels read when > 0).
        self.with_labels = bool(with_labels and with_labels > 0)
        self.audio = open_audio(train)
        self.logits = LogitStore.open(self.logits_url)
        check_logits_match_audio(self.logits, self.audio, self.logits_url, self.train_url)
        if with_labels and not self.audio.has_labels:
            raise InputError(f"distill.label_weight > 0 needs labels, but {self.train_url} has none")
        self.eval_data = LabeledDataModule(
            train=None,
            val=val,
            test=test,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            seed=seed,
        )
        # Here, not at the first validation hours in: the student predicts the teachers' classes, and mAP
        # compares prediction column c with label column c of the evaluation stores.
        for key, urls, stores in (
            ("data.val", self.eval_data.val_urls, self.eval_data.val_stores),
            ("data.test", self.eval_data.test_urls, self.eval_data.test_stores),
        ):
            for url, store in zip(urls, stores):
                check_eval_classes_match_logits(self.logits, store, self.logits_url, f"{key}={url}")

    @property
    def num_classes(self) -> int:
        return self.logits.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return list(self.logits.class_names) if self.logits.class_names is not None else None

    @property
    def recipe(self) -> AugmentRecipe:
        return self.logits.recipe

    @property
    def clip_seconds(self) -> float:
        """The logit store's clip length (what the teachers heard), whatever `data.clip_seconds` says."""
        return self.logits.clip_samples / SAMPLE_RATE

    def setup(self, stage: str | None = None) -> None:
        self.eval_data.trainer = self.trainer
        self.eval_data.setup(stage)

    def augmentation_epoch(self, epoch: int) -> int:
        return epoch % self.logits.epochs

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        slice_ = self.logits.read_epoch(self.augmentation_epoch(epoch))
        transform = DistillBatchTransform(
            slice_.indices,
            slice_.probs,
            slice_.params,
            consistent=self.consistent,
            recipe=self.recipe,
            seed=self.seed,
            epoch=epoch,
            mixup=self.mixup,
            labels=self.audio.label_matrix() if self.with_labels else None,
            row_clips=self.logits.segments().clip if self.logits.segment_samples is not None else None,
            fresh_shift=self.inconsistent_shift == "fresh",
        )
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        stream = ClipBatchStream(
            self.audio,
            self.batch_size,
            epoch=epoch,
            seed=self.seed,
            clip_samples=self.logits.clip_samples,
            random_crop=False,  # the teachers saw each row from its segment's start
            segments=self.logits.segments(),
            shuffle_window=self.shuffle_window,
            rank=rank,
            world_size=world,
            transform=transform,
            # Rows without the teachers' targets in this epoch (an imported release lacks some) sit out.
            keep=slice_.has_targets,
            drop_last=self.drop_last,
            order_workers=self.order_workers,
        )
        return ResumableLoader(stream, num_workers=self.num_workers, pin_memory=self.pin_memory)

    def val_dataloader(self) -> DataLoader:
        return self.eval_data.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.eval_data.test_dataloader()


def check_logits_match_audio(
    logits: LogitStore, audio: AudioStore | ConcatAudioStore, logits_url: str, audio_url: str
) -> None:
    """Refuse a logit store that was extracted from another audio store (a different clip list), or from
    another list of stores (naming the member that differs)."""
    if logits.audio_fingerprint != audio.fingerprint or logits.num_clips != len(audio):
        source = audio_source(audio)
        listed = f"[{','.join(source)}]" if isinstance(source, list) else None
        argument = f"'audio_store={listed}'" if listed else f"audio_store={source}"
        which = describe_source_mismatch(logits.audio_sources, audio)
        raise InputError(
            f"logit store {logits_url} was made from another audio store than {audio_url} "
            f"(fingerprint {logits.audio_fingerprint}, {logits.num_clips} clips; the audio store has "
            f"{audio.fingerprint}, {len(audio)} clips{'; ' + which if which else ''}). Rebuild it: "
            f"python -m ced_lightning.extract {argument} output={logits_url} teacher=..."
        )


def check_eval_classes_match_logits(
    logits: LogitStore, store: AudioStore, logits_url: str, where: str
) -> None:
    """Refuse an evaluation store whose class list differs from the logit store's (the student's outputs):
    another count, or the same count with other names or another order (which would give a wrong mAP)."""
    check_same_classes(
        store.class_names,
        logits.class_names,
        sources=(where, f"the logit store {logits_url} (the student's outputs)"),
        counts=(store.num_classes, logits.num_classes),
        message=f"{where} names its classes differently from the logit store {logits_url}",
        advice="mAP would compare the wrong columns. Evaluate on a store with the teachers' class list "
        "in the same order",
    )
