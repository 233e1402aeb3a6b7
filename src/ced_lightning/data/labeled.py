"""LabeledDataModule: supervised training (teachers) and evaluation on labeled audio stores."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.labels import check_same_classes, single_label_problem
from ced_lightning.data.batching import batches_by_length, pad_batch
from ced_lightning.data.draws import ClipDraws
from ced_lightning.data.stream import ClipBatchStream, Int16Batches, ResumableLoader
from ced_lightning.store import AudioStore
from ced_lightning.store.concat import open_audio, store_urls

log = logging.getLogger(__name__)

Batch = dict[str, Any]


class LabelTransform:
    """Adds multi-hot `target` rows to a batch, then the batch's per-clip `draws` (runs in the DataLoader
    worker)."""

    def __init__(self, label_matrix: np.ndarray, draws: ClipDraws) -> None:
        self.label_matrix = label_matrix
        self.draws = draws

    def __call__(self, batch: Batch) -> Batch:
        batch["target"] = torch.from_numpy(self.label_matrix[batch["index"].numpy()].astype(np.float32))
        return self.draws(batch)


class ClipDataset(Dataset):
    """Exact random access to whole clips of one or more stores (evaluation, tooling); int16 waveforms."""

    def __init__(self, stores: Sequence[AudioStore], num_classes: int | None = None) -> None:
        self.stores = list(stores)
        self.bounds = np.cumsum([0] + [len(s) for s in self.stores])
        self.lengths = np.concatenate([s.lengths for s in self.stores]) if self.stores else np.zeros(0)
        self.num_classes = num_classes

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, i: int) -> Batch:
        s = int(np.searchsorted(self.bounds, i, side="right") - 1)
        store, local = self.stores[s], int(i - self.bounds[s])
        item: Batch = {"index": i, "waveform": store.read_samples(local)}
        if self.num_classes is not None:
            target = torch.zeros(self.num_classes)
            target[torch.from_numpy(store.labels(local).astype(np.int64))] = 1.0
            item["target"] = target
        return item


class EqualLengthBatches(Sampler[list[int]]):
    """Batches of clips of exactly equal length (`batches_by_length`), so padding never changes a clip's
    output; rank r of N
    takes every N-th batch (no duplicated clips, unlike a padded DistributedSampler).

    With fewer batches than ranks the largest batches are halved until every rank has one: Lightning
    refuses an evaluation loader that is empty on one rank only, and smaller batches keep every clip in
    exactly one batch of one rank, so the gathered mAP stays exact. Needs at least as many clips as ranks.
    """

    def __init__(self, lengths: np.ndarray, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if len(lengths) < world_size:
            raise InputError(f"{len(lengths)} clips cannot give each of {world_size} ranks a batch")
        batches = batches_by_length([int(n) for n in lengths], batch_size)
        while len(batches) < world_size:
            i = max(range(len(batches)), key=lambda b: len(batches[b]))
            half = len(batches[i]) // 2
            batches[i : i + 1] = [batches[i][:half], batches[i][half:]]
        self.batches = batches[rank::world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate_clips(items: list[Batch]) -> Batch:
    """Pad the int16 waveforms to the longest, with `length`; stack the rest."""
    waveform, lengths = pad_batch([item["waveform"] for item in items])
    batch: Batch = {
        "index": torch.tensor([item["index"] for item in items]),
        "waveform": waveform,
        "length": lengths,
    }
    if "target" in items[0]:
        batch["target"] = torch.stack([item["target"] for item in items])
    return batch


def _as_list(urls: str | Sequence[str] | None) -> list[str]:
    if urls is None:
        return []
    return [str(urls)] if isinstance(urls, str) else [str(u) for u in urls]


class LabeledDataModule(Int16Batches, LightningDataModule):
    """Supervised training on `train` (random crop/pad to `clip_seconds`, fresh order each epoch) and
    evaluation on `val`/`test` (whole clips of any length, batched by equal length). Stores must carry
    labels and agree on their class list, and under `objective="single_label"` give each clip exactly one.
    `recipe`: the augmentation a teacher draws fresh on its training clips (`ClipDraws`, with mixup λ when
    `mixup` is set), the `augment` group (`augment`) sized for `clip_seconds` (`AugmentRecipe.for_clip`), the
    paper's recipe as it is without one."""

    def __init__(
        self,
        train: str | Sequence[str] | None = None,
        val: str | Sequence[str] | None = None,
        test: str | Sequence[str] | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        shuffle_window: int = 256,
        seed: int = 0,
        clip_seconds: float | None = 10.0,
        augment: Any = None,
        mixup: float | None = None,
        drop_last: bool = True,
        objective: str = "multi_label",
        order_workers: int | None = None,
    ) -> None:
        super().__init__()
        # `train`: one audio store, or a list read as one (`store.concat`).
        self.train_url = " + ".join(store_urls(train)) if train else None
        self.val_urls, self.test_urls = _as_list(val), _as_list(test)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.order_workers = order_workers  # the training batch order of that many workers (ClipBatchStream)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.shuffle_window = shuffle_window
        self.seed = seed
        self.clip_seconds = clip_seconds
        self.clip_samples = round(clip_seconds * SAMPLE_RATE) if clip_seconds else None
        self.drop_last = drop_last
        self.recipe = (
            AugmentRecipe.for_clip(augment, clip_seconds) if augment is not None else AugmentRecipe()
        )
        self.mixup = mixup or None
        self.train_store = open_audio(train) if train else None
        self.val_stores = [AudioStore.open(u) for u in self.val_urls]
        self.test_stores = [AudioStore.open(u) for u in self.test_urls]
        self._check_classes()
        if objective == "single_label":
            self._check_single_label()

    def _named_stores(self) -> list[tuple[str, Any]]:
        named = [(u, s) for u, s in zip([self.train_url], [self.train_store]) if s is not None]
        return named + list(zip(self.val_urls, self.val_stores)) + list(zip(self.test_urls, self.test_stores))

    def _check_single_label(self) -> None:
        """task.objective=single_label: every clip of every store carries exactly one label."""
        for url, store in self._named_stores():
            problem = single_label_problem(store.label_counts(), store.names)
            if problem is not None:
                raise InputError(
                    f"{url}: {problem}; task.objective=single_label needs exactly one per clip "
                    "(task.objective=multi_label trains on any number)"
                )

    def _check_classes(self) -> None:
        named = self._named_stores()
        if not named:
            return
        first_url, first = named[0]
        for url, store in named:
            if not store.has_labels:
                raise InputError(f"{url}: this audio store has no labels; training and evaluation need them")
            check_same_classes(
                store.class_names,
                first.class_names,
                sources=(url, first_url),
                counts=(store.num_classes, first.num_classes),
                unnamed_matches=False,
                message=f"{url} has another class list than {first_url}",
                advice="all stores of one run must share it",
            )

    @property
    def _reference(self) -> AudioStore | None:
        return next(
            (s for s in [self.train_store, *self.val_stores, *self.test_stores] if s is not None), None
        )

    @property
    def num_classes(self) -> int:
        ref = self._reference
        if ref is None or ref.num_classes is None:
            raise ConfigError("no labeled store configured (data.train / data.val / data.test)")
        return int(ref.num_classes)

    @property
    def class_names(self) -> list[str] | None:
        ref = self._reference
        return list(ref.class_names) if ref is not None and ref.class_names is not None else None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader_kwargs(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory}

    def train_dataloader(self) -> DataLoader:
        if self.train_store is None:
            raise ConfigError("data.train is not set")
        rank, world = self._rank_world()
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        stream = ClipBatchStream(
            self.train_store,
            self.batch_size,
            epoch=epoch,
            seed=self.seed,
            clip_samples=self.clip_samples,
            random_crop=True,
            shuffle_window=self.shuffle_window,
            rank=rank,
            world_size=world,
            transform=LabelTransform(
                self.train_store.label_matrix(), ClipDraws(self.recipe, self.seed, epoch, mixup=self.mixup)
            ),
            drop_last=self.drop_last,
            order_workers=self.order_workers,
        )
        return ResumableLoader(stream, **self._loader_kwargs())

    def eval_dataloader(self, stores: Sequence[AudioStore]) -> DataLoader:
        dataset = ClipDataset(stores, self.num_classes)
        rank, world = self._rank_world()
        if len(dataset) < world:
            raise InputError(
                f"{', '.join(s.url for s in stores)}: {len(dataset)} evaluation clips for {world} processes "
                "(trainer.devices x trainer.num_nodes); every process needs at least one. Evaluate with "
                "fewer devices or on a larger store"
            )
        sampler = EqualLengthBatches(dataset.lengths, self.eval_batch_size, rank, world)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_clips,
            persistent_workers=self.persistent_workers,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader(self.val_stores) if self.val_stores else []

    def test_dataloader(self) -> DataLoader | list:
        return self.eval_dataloader(self.test_stores) if self.test_stores else []
