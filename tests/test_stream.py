"""The training read path: plans, worker/rank splits, exact resume, and what the batches hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ced_lightning.core.audio import int16_to_float
from ced_lightning.data.labeled import EqualLengthBatches, LabeledDataModule
from ced_lightning.data.stream import ClipBatchStream, ResumableLoader, loader_order, plan_epoch
from ced_lightning.store.audio_writer import write_audio_store


@pytest.fixture(scope="module")
def store_url(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    clips = []
    for i in range(53):
        length = int(rng.integers(800, 2400))
        clips.append((f"clip{i:03d}", rng.uniform(-0.5, 0.5, length).astype(np.float32), [i % 3]))
    url = str(tmp_path_factory.mktemp("stream") / "s.zarr")
    write_audio_store(url, clips, class_names=["a", "b", "c"], chunk_samples=16000, shard_chunks=2)
    return url


def _flat(plan) -> np.ndarray:
    return np.concatenate([b for window in plan.windows for b in window])


def test_plan_visits_each_clip_once_and_ranks_are_disjoint() -> None:
    plans = [plan_epoch(103, 8, seed=1, epoch=2, rank=r, world_size=3, span_clips=4) for r in range(3)]
    counts = {p.num_batches for p in plans}
    # 103 clips in 26 spans over 3 ranks (~34 clips each): every rank gets the same number of full batches.
    assert len(counts) == 1 and counts.pop() in (3, 4)
    seen = np.concatenate([_flat(p) for p in plans])
    assert len(seen) == len(np.unique(seen)) == 3 * plans[0].num_batches * 8
    assert all(len(b) == 8 for p in plans for w in p.windows for b in w)


def test_plan_is_deterministic_and_changes_per_epoch() -> None:
    a = _flat(plan_epoch(200, 16, seed=3, epoch=0))
    assert np.array_equal(a, _flat(plan_epoch(200, 16, seed=3, epoch=0)))
    assert not np.array_equal(a, _flat(plan_epoch(200, 16, seed=3, epoch=1)))
    assert not np.array_equal(a, _flat(plan_epoch(200, 16, seed=4, epoch=0)))
    unshuffled = _flat(plan_epoch(200, 16, seed=3, epoch=0, shuffle=False))
    assert np.array_equal(unshuffled, np.arange(192))


def test_chunk_spans_are_the_default_spans(store_url: str) -> None:
    from ced_lightning.store import AudioStore

    store = AudioStore.open(store_url)
    bounds = store.chunk_spans()
    stream = ClipBatchStream(store, 4, epoch=0, seed=0, shuffle_window=4)
    by_chunks = plan_epoch(len(store), 4, seed=0, epoch=0, shuffle_window=4, span_bounds=bounds)
    assert np.array_equal(_flat(stream.plan), _flat(by_chunks))
    assert np.array_equal(
        np.sort(_flat(plan_epoch(len(store), 1, seed=0, epoch=0, span_bounds=bounds))), np.arange(len(store))
    )


def test_short_clips_sorted_by_class_still_mix_in_batches(tmp_path) -> None:
    # 1 s keyword-like clips from class folders: 40 clips per chunk, the store sorted by class (one class per
    # chunk). A window of `shuffle_window=16` clips would be one chunk, so every batch one class; windows
    # hold at least `MIN_WINDOW_SPANS` spans instead.
    from ced_lightning.store import AudioStore

    clips = [(f"c{k:02d}/{i:03d}", np.full(100, 0.1, np.float32), [k]) for k in range(16) for i in range(40)]
    url = str(tmp_path / "sorted.zarr")
    write_audio_store(url, clips, class_names=[str(k) for k in range(16)], chunk_samples=4000)
    store = AudioStore.open(url)
    assert np.array_equal(store.chunk_spans(), np.arange(0, 641, 40))
    stream = ClipBatchStream(store, 8, epoch=0, seed=0, shuffle_window=16)
    classes = [len(np.unique(b // 40)) for w in stream.plan.windows for b in w]
    assert np.mean(classes) > 5, classes  # 8 clips drawn from 16 classes: 6.5 on average
    assert len(stream.plan.windows) == 1  # MIN_WINDOW_SPANS chunks: here all of them


def test_loader_order_round_robin_skips_exhausted_workers() -> None:
    assert loader_order([2, 1]) == [(0, 0), (1, 0), (0, 1)]
    assert loader_order([1, 3]) == [(0, 0), (1, 0), (1, 1), (1, 2)]


def _batches(loader) -> list[tuple[np.ndarray, torch.Tensor]]:
    return [(b["index"].numpy().copy(), b["waveform"].clone()) for b in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_hold_the_clips_cropped_or_padded(store_url: str, workers: int) -> None:
    from ced_lightning.store import AudioStore

    store = AudioStore.open(store_url)
    stream = ClipBatchStream(
        store_url, 5, epoch=1, seed=0, clip_samples=1600, span_clips=4, shuffle_window=10
    )
    batches = _batches(ResumableLoader(stream, num_workers=workers))
    assert len(batches) == len(stream) == 10
    seen = np.concatenate([index for index, _ in batches])
    assert sorted(seen) == sorted(_flat(stream.plan))
    for index, waveform in batches[:3]:
        assert waveform.shape == (5, 1600) and waveform.dtype == torch.int16  # int16 until the device
        for row, i in enumerate(index):
            clip = torch.from_numpy(store.read_samples(int(i))[:1600])
            assert torch.equal(waveform[row, : len(clip)], clip)
            assert torch.equal(int16_to_float(waveform[row, : len(clip)]), store.read(int(i))[:1600])
            assert not waveform[row, len(clip) :].any()


def test_random_crop_is_keyed_by_clip(store_url: str) -> None:
    a = ClipBatchStream(store_url, 4, epoch=0, seed=0, clip_samples=700, random_crop=True)
    b = ClipBatchStream(store_url, 4, epoch=0, seed=0, clip_samples=700, random_crop=True, span_clips=1)
    rows_a = {int(i): w for batch in a for i, w in zip(batch["index"], batch["waveform"])}
    rows_b = {int(i): w for batch in b for i, w in zip(batch["index"], batch["waveform"])}
    common = set(rows_a) & set(rows_b)
    assert common and all(torch.equal(rows_a[i], rows_b[i]) for i in common)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_consumed_batches_exactly(store_url: str, workers: int) -> None:
    def loader() -> ResumableLoader:
        stream = ClipBatchStream(
            store_url, 4, epoch=3, seed=7, clip_samples=1000, span_clips=2, shuffle_window=8
        )
        return ResumableLoader(stream, num_workers=workers)

    full = _batches(loader())
    first = loader()
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    assert state == {
        "epoch": 3,
        "batches": 5,
        "epoch_batches": len(full),
        "num_workers": max(1, workers),
        "world_size": 1,
    }
    resumed = loader()
    resumed.load_state_dict(state)
    rest = _batches(resumed)
    assert len(rest) == len(full) - 5
    for (i_full, w_full), (i_rest, w_rest) in zip(full[5:], rest):
        assert np.array_equal(i_full, i_rest) and torch.equal(w_full, w_rest)
    # Another epoch's state does not apply.
    other = loader()
    other.load_state_dict({"epoch": 2, "batches": 5})
    assert len(_batches(other)) == len(full)
    # A state saved before the worker and rank counts were recorded resumes as before.
    legacy = loader()
    legacy.load_state_dict({"epoch": 3, "batches": 5})
    assert [i.tolist() for i, _ in _batches(legacy)] == [i.tolist() for i, _ in full[5:]]


def _small_window_loader(store_url: str, workers: int, skip_from: dict | None = None) -> ResumableLoader:
    # One clip per span and 16-clip windows: 13 batches in 4 windows (4, 4, 4, 1), so the worker count
    # changes the order.
    stream = ClipBatchStream(store_url, 4, epoch=2, seed=5, clip_samples=900, span_clips=1, shuffle_window=16)
    loader = ResumableLoader(stream, num_workers=workers)
    if skip_from is not None:
        loader.load_state_dict(skip_from)
    return loader


def state_after(store_url: str, workers: int, consumed: int) -> dict[str, int]:
    loader = _small_window_loader(store_url, workers)
    iterator = iter(loader)
    for _ in range(consumed):
        next(iterator)
    return loader.state_dict()


@pytest.mark.parametrize(("before", "after"), [(2, 0), (0, 2), (2, 3)])
def test_resume_with_another_worker_count_continues_the_interrupted_order(
    store_url: str, before: int, after: int
) -> None:
    """Moved to a machine with another `data.num_workers`: the rest of the epoch is exactly the batches the
    interrupted run had left, in its order (what `limit_train_batches` cuts short stays the same too)."""
    full = _batches(_small_window_loader(store_url, before))
    assert len(full) == 13
    other_order = [i for i, _ in _batches(_small_window_loader(store_url, after))]
    assert [i.tolist() for i, _ in full] != [i.tolist() for i in other_order]  # the count matters
    for consumed in (1, 5, 12):
        state = state_after(store_url, before, consumed)
        rest = _batches(_small_window_loader(store_url, after, skip_from=state))
        assert len(rest) == len(full) - consumed
        for (i_full, w_full), (i_rest, w_rest) in zip(full[consumed:], rest):
            assert np.array_equal(i_full, i_rest) and torch.equal(w_full, w_rest)
    # Interrupted again in that epoch: the second resume continues the same (first run's) order.
    resumed = _small_window_loader(store_url, after, skip_from=state_after(store_url, before, 5))
    iterator = iter(resumed)
    for _ in range(3):
        next(iterator)
    state = resumed.state_dict()
    del iterator
    assert state["batches"] == 8 and state["num_workers"] == max(1, before)
    again = [i.tolist() for i, _ in _batches(_small_window_loader(store_url, after, skip_from=state))]
    assert again == [i.tolist() for i, _ in full[8:]]


@pytest.mark.parametrize(("order", "readers"), [(2, 0), (2, 3), (3, 1)])
def test_order_workers_gives_that_worker_counts_batches_read_by_any(
    store_url: str, order: int, readers: int
) -> None:
    """`data.order_workers`: the batches (clips, samples, order) of `order` DataLoader workers, read by
    `readers` of them (0: the main process, as the demo reads); a resume records that order and keeps it."""

    def loader(
        workers: int, order_workers: int | None = None, skip_from: dict | None = None
    ) -> ResumableLoader:
        stream = ClipBatchStream(
            store_url,
            4,
            epoch=2,
            seed=5,
            clip_samples=900,
            span_clips=1,
            shuffle_window=16,
            order_workers=order_workers,
        )
        resumable = ResumableLoader(stream, num_workers=workers)
        if skip_from is not None:
            resumable.load_state_dict(skip_from)
        return resumable

    reference = _batches(loader(order))
    assert [i.tolist() for i, _ in reference] != [i.tolist() for i, _ in _batches(loader(readers))]
    ordered = _batches(loader(readers, order))
    assert len(ordered) == len(reference) == 13
    for (i_ref, w_ref), (i_got, w_got) in zip(reference, ordered):
        assert np.array_equal(i_ref, i_got) and torch.equal(w_ref, w_got)

    interrupted = loader(readers, order)
    iterator = iter(interrupted)
    for _ in range(5):
        next(iterator)
    state = interrupted.state_dict()
    del iterator
    assert state["num_workers"] == order and state["batches"] == 5
    rest = _batches(loader(readers, order, skip_from=state))
    assert [i.tolist() for i, _ in rest] == [i.tolist() for i, _ in reference[5:]]
    with pytest.raises(ValueError, match="order_workers=0"):
        ClipBatchStream(store_url, 4, order_workers=0)


def test_resume_on_another_rank_count_names_the_setting(store_url: str) -> None:
    def loader(world_size: int, epoch: int = 0) -> ResumableLoader:
        stream = ClipBatchStream(store_url, 4, epoch=epoch, seed=0, span_clips=1, world_size=world_size)
        return ResumableLoader(stream)

    two_ranks = loader(2)
    iterator = iter(two_ranks)
    next(iterator)
    state = two_ranks.state_dict()
    assert state["world_size"] == 2 and state["batches"] == 1
    one_rank = loader(1)
    # Loading alone does not fail: Lightning also hands the state of an epoch that ended early under
    # `limit_train_batches` to that epoch's loader, which it then replaces unread with the next epoch's.
    one_rank.load_state_dict(state)
    with pytest.raises(ValueError, match=r"trainer\.devices x trainer\.num_nodes.*Resume with 2 ranks"):
        next(iter(one_rank))
    # A finished epoch, or another epoch's state, resumes on any rank count.
    finished = loader(1)
    finished.load_state_dict({**state, "batches": state["epoch_batches"]})
    assert _batches(finished) == []
    next_epoch = loader(1, epoch=1)
    next_epoch.load_state_dict(state)
    assert len(_batches(next_epoch)) == len(next_epoch.dataset)


def test_equal_length_batches_never_mix_lengths() -> None:
    lengths = np.array([5, 3, 5, 5, 3, 7, 5])
    batches = list(EqualLengthBatches(lengths, 2))
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len(set(lengths[b])) == 1 for b in batches)
    split = [list(EqualLengthBatches(lengths, 2, rank=r, world_size=2)) for r in range(2)]
    assert sorted(i for part in split for b in part for i in b) == list(range(7))


def test_labeled_datamodule_train_and_eval(store_url: str) -> None:
    data = LabeledDataModule(train=store_url, val=store_url, batch_size=8, num_workers=0, clip_seconds=0.1)
    assert data.num_classes == 3 and data.class_names == ["a", "b", "c"]
    batch = next(iter(data.train_dataloader()))
    assert batch["waveform"].shape == (8, 1600) and batch["target"].shape == (8, 3)
    assert torch.equal(batch["target"].argmax(1), batch["index"] % 3)
    total = 0
    for batch in data.val_dataloader():
        total += len(batch["index"])
        assert (batch["length"] == batch["waveform"].shape[1]).all()
        assert torch.equal(batch["target"].argmax(1), batch["index"] % 3)
    assert total == 53


def test_one_chunk_store_still_feeds_every_rank() -> None:
    bounds = np.array([0, 40])  # a tiny store: all clips in one chunk
    plans = [plan_epoch(40, 4, seed=0, epoch=0, rank=r, world_size=2, span_bounds=bounds) for r in range(2)]
    assert plans[0].num_batches == plans[1].num_batches >= 4
    assert not set(_flat(plans[0])) & set(_flat(plans[1]))
