"""TeacherEnsembleModule: runs a teacher ensemble over an audio store and fills a logit store, block by block.

One DataLoader item is one block of the logit store (`ced_lightning.data.blocks`: `BlockDataset` reads it,
`BlockSampler` hands each rank a contiguous share of the blocks still missing, so every block is written by
exactly one process; never Lightning's interleaved DistributedSampler: set `use_distributed_sampler=False`).
For every augmentation epoch the module draws the block's parameters from (seed, epoch, row index), runs every
teacher on the augmented spectrograms in micro-batches, combines them, keeps the top-k and writes the block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ced_lightning.core.audio import int16_to_float
from ced_lightning.core.augment import AugmentParams, AugmentRecipe, front_end_sources, sample_augment_params
from ced_lightning.core.device import reduced_precision
from ced_lightning.core.ensemble import (
    NonFiniteTeacherOutput,
    check_combine,
    check_teachers,
    ensemble_probabilities,
)
from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.core.progress import ProgressLog
from ced_lightning.data.blocks import BlockDataset, BlockSampler
from ced_lightning.store.logits import LogitStore

log = logging.getLogger(__name__)


class TeacherEnsembleModule(pl.LightningModule):
    """Fills the logit store at `store_url` (created beforehand by `LogitStore.create`) in `predict_step`.

    `recipe`, `seed`, `epochs`, `topk`, `combine` and `weights` are the store's, validated where it was
    created. The teachers must already be on the device the trainer runs on (its `strategy.root_device`), in
    its precision."""

    def __init__(
        self,
        teachers: Sequence[nn.Module],
        store_url: str,
        recipe: AugmentRecipe,
        seed: int,
        epochs: int,
        topk: int,
        combine: str = "mean_prob",
        micro_batch_size: int = 64,
        audio_url: str | list[str] | None = None,
        num_workers: int = 1,
        limit_blocks: int | None = None,
        throttle_s: float = 0.0,
        teacher_names: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_combine(combine)
        if micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.num_classes = check_teachers(teachers, teacher_names)
        self.teacher_names = list(teacher_names or (f"#{i}" for i in range(len(teachers))))
        # A tuple, not submodules: the teachers run where the caller placed them (`engines.extraction` places
        # them once for the check, the extraction and verification), and Lightning's moves of this module (to
        # the device at the start, back to the CPU at the end) leave them there.
        self.teachers = tuple(teacher.eval().requires_grad_(False) for teacher in teachers)
        # Which teachers share a spectrogram: worked out once, not for every micro-batch.
        self.mel_sources = front_end_sources([t.front_end for t in teachers])
        # Lightning refuses a rank whose predict loader is empty (fewer missing blocks than ranks, e.g. at the
        # end of a resumed run): that rank skips its loop instead, and `finish` still meets the others.
        self.allow_zero_length_dataloader_with_multiple_devices = True
        self.store_url = str(store_url)
        self.audio_url = audio_url
        self.recipe = recipe
        self.seed = int(seed)
        self.epochs = int(epochs)
        self.topk = int(topk)
        self.combine = combine
        self.weights = list(weights) if weights is not None else None
        self.micro_batch_size = int(micro_batch_size)
        self.num_workers = int(num_workers)
        self.limit_blocks = limit_blocks
        self.throttle_s = throttle_s
        self.store: LogitStore | None = None
        self.clips_done = 0
        # (time a block was written, clips done by then) of this rank's first and latest block
        self._first_end: tuple[float, int] | None = None
        self._last_end: tuple[float, int] | None = None
        self.steady_clips_per_s: float | None = None
        self.progress: ProgressLog | None = None  # this rank's share, set with its blocks

    def _open_store(self) -> LogitStore:
        if self.store is None:
            store = LogitStore.open(self.store_url)
            # epochs, topk, recipe, seed and combine are the store's own (extract passes them from it, and
            # `LogitStore.create` validated them); the teachers are not: their class count must fit it.
            if store.num_classes != self.num_classes:
                raise InputError(
                    f"{self.store_url}: store has num_classes={store.num_classes}, the teachers predict "
                    f"{self.num_classes}"
                )
            self.store = store
        return self.store

    def blocks_to_do(self) -> list[int]:
        """Missing blocks, cut to `limit_blocks` (a debugging aid: interrupt after that many)."""
        missing = self._open_store().missing_blocks()
        return missing[: self.limit_blocks] if self.limit_blocks is not None else missing

    def predict_dataloader(self) -> DataLoader:
        store = self._open_store()
        strategy = self.trainer.strategy if self._trainer is not None else None
        # Every rank must split the same list: read it after all ranks opened the store and before any
        # rank writes (the second barrier).
        if strategy is not None:
            strategy.barrier("ced_extract_missing_read")
        todo = self.blocks_to_do()
        if strategy is not None:
            strategy.barrier("ced_extract_missing_split")
        world, rank = (
            (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        )
        sampler = BlockSampler(todo, num_replicas=world, rank=rank)
        log.info("rank %d/%d: %d of %d missing blocks", rank, world, len(sampler.blocks), len(todo))
        rows = sum(stop - start for start, stop in map(store.block_range, sampler.blocks))
        self.progress = ProgressLog("extract", rows * self.epochs, unit="segment-epochs")
        audio_url = self.audio_url or store.audio_url
        dataset = BlockDataset(audio_url, store.segments(), store.block_clips, store.clip_samples)
        return DataLoader(
            dataset,
            batch_size=None,  # one item is one whole block
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=False,
            prefetch_factor=1 if self.num_workers > 0 else None,
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A whole block stays in host memory; micro-batches move to the device in predict_step.
        return batch

    @torch.no_grad()
    def block_topk(self, batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, list[AugmentParams]]:
        """One block, all epochs: (indices int64 [E, n, k], probs float32 [E, n, k], params per epoch)."""
        index = batch["index"].cpu().numpy()
        lengths = batch["length"].cpu().numpy()
        n, mb = len(index), self.micro_batch_size
        all_idx = np.empty((self.epochs, n, self.topk), dtype=np.int64)
        all_p = np.empty((self.epochs, n, self.topk), dtype=np.float32)
        params = [
            sample_augment_params(self.recipe, self.seed, e, index, lengths) for e in range(self.epochs)
        ]
        for s in range(0, n, mb):
            rows = slice(s, s + mb)
            # Moved and converted once per micro-batch, for all epochs (augmentation does not modify it).
            wav = int16_to_float(batch["waveform"][rows].to(self.device, non_blocking=True))
            lens = batch["length"][rows].to(self.device)
            for epoch, drawn in enumerate(params):
                try:
                    draws = drawn.subset(rows)
                    probs = ensemble_probabilities(
                        self.teachers,
                        wav,
                        lens,
                        draws,
                        self.recipe,
                        self.combine,
                        self.mel_sources,
                        self.weights,
                    )
                except NonFiniteTeacherOutput as err:
                    clips = index[rows][err.rows].tolist()
                    raise InputError(
                        f"teacher {self.teacher_names[err.teacher]} gave NaN or inf logits for clips {clips} "
                        f"(augmentation epoch {epoch}); nothing of their block ({int(batch['block'])}) was "
                        "written. A model that overflows in 16-bit precision may run with "
                        "trainer.precision=32-true."
                    ) from err
                values, classes = torch.topk(probs, self.topk, dim=-1)
                all_idx[epoch, rows] = classes.cpu().numpy()
                all_p[epoch, rows] = values.float().cpu().numpy()
                if self.progress is not None:
                    self.progress.advance(len(index[rows]))
        return all_idx, all_p, params

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        block = int(batch["block"])
        indices, probs, params = self.block_topk(batch)
        precision = self.trainer.precision if self._trainer is not None else None
        self._open_store().write_block(
            block, indices, probs, params, reduced_precision=reduced_precision(precision, self.device)
        )
        if self.throttle_s:
            time.sleep(self.throttle_s)  # only for testing a kill in the middle of a run
        self.clips_done += len(batch["index"])
        self._last_end = (time.perf_counter(), self.clips_done)
        self._first_end = self._first_end or self._last_end
        return None

    def finish(self, trainer: pl.Trainer) -> None:
        """After `trainer.predict`, on every rank: sums the ranks' steady rates, so also waits for all ranks.

        Not in `on_predict_end`: Lightning skips the whole prediction loop, hooks included, on a rank whose
        share is empty (one missing block, two ranks), and the other ranks would wait for it forever.
        """
        if self.progress is not None:
            self.progress.close()
        # Throughput after each rank's first block (so without starting processes, workers and the first
        # read), summed over ranks that ran at the same time; None when no rank wrote two blocks.
        clips = seconds = 0.0
        if self._first_end is not None and self._last_end is not self._first_end:
            (first_t, first_n), (last_t, last_n) = self._first_end, self._last_end
            clips, seconds = float(last_n - first_n), last_t - first_t
        rate = torch.tensor(
            [clips / seconds if seconds > 0 else 0.0, float(seconds > 0)],
            dtype=torch.float64,
            device=trainer.strategy.root_device,  # NCCL reduces CUDA tensors only (the module is on the CPU)
        )
        if trainer.world_size > 1:
            # Returns on each rank once every rank has contributed, so once all shares are written.
            rate = trainer.strategy.reduce(rate, reduce_op="sum")
        self.steady_clips_per_s = float(rate[0]) if rate[1] > 0 else None
