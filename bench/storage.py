"""Storage: bytes per clip-epoch of a logit store, ours and the paper's layout side by side, raw and on disk,
on real demo logits: the demo teachers' top-k over demo training clips under the demo's augmentation.

The teachers are the demo's own (`data/demo/teachers`, trained with labels by `ced_lightning.demo` if missing:
a few minutes once, then reused, also by `make demo`). Their logit store over every demo training clip is
extracted twice, same clips and augmentation draws, through the demo's extraction
(`ced_lightning.demo.extract_demo_logits`, its epochs and top-k: 5 of 16 classes): with float16 and with
8-bit values. (All clips in quick mode too: fewer rows would inflate the HDF5 files' fixed metadata per row.)

- ours, raw: the arrays' item sizes per clip-epoch (indices, values, every augmentation parameter); on disk:
  the data arrays' chunk files (`LogitStore.bytes_per_clip_epoch`), and the whole store with its metadata.
- the paper's layout, as the original `save_logits.py` writes it: per augmentation epoch one HDF5 file with
  `topk_values` float16 `[N, k]`, `topk_indexes` int16 `[N, k]` and `seeds` int32 `[N]`, resizable
  (chunked) datasets filled batch by batch (128 clips), h5py's defaults: no compression. Raw: 4k + 4 bytes
  (84 at the paper's k = 20). Written here from the float16 store's rows. Not counted: the original also
  keeps, per epoch, a parquet index of file names and start/end times (one row per clip).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ced_lightning import conf_dir
from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.augment import AugmentParams
from ced_lightning.core.quantize import stored_dtype
from ced_lightning.data.demo import build_demo_stores
from ced_lightning.demo import ensure_demo_stores, ensure_demo_teachers, extract_demo_logits
from ced_lightning.store import LogitStore, store_nbytes

PAPER_TOPK = 20
PAPER_BATCH = 128  # save_logits.py's batch_size: the HDF5 datasets grow by this many rows
KINDS = ("float16", "int8")


def paper_raw_bytes(topk: int) -> int:
    """The paper's record per clip-epoch: k float16 values, k int16 indices, one int32 seed."""
    return 2 * topk + 2 * topk + 4


def raw_bytes_per_clip_epoch(store: LogitStore) -> int:
    """Our record per clip-epoch before compression: k class indices, k values in the store's dtype, and
    every augmentation parameter of its recipe, each at its item size."""
    index_bytes = store.read_epoch(0).indices.dtype.itemsize
    params = sum(
        np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        for dtype, shape in AugmentParams.fields(store.recipe).values()
    )
    return store.topk * (index_bytes + stored_dtype(store.quantization).itemsize) + params


def write_paper_layout(store: LogitStore, folder: Path) -> tuple[int, int]:
    """The store's rows in the original's HDF5 layout, one file per augmentation epoch, written as
    `save_logits.py` writes them; returns the files' total bytes on disk and, of those, the bytes of the
    datasets' allocated chunks (the rest is HDF5's own metadata)."""
    import h5py

    folder.mkdir(parents=True, exist_ok=True)
    k, total, allocated = store.topk, 0, 0
    for epoch in range(store.epochs):
        rows = store.read_epoch(epoch)
        path = folder / f"logits_ep{epoch + 1}_0.h5"
        with h5py.File(path, "w") as handle:
            values = handle.create_dataset(
                "topk_values", dtype="float16", maxshape=(None, k), shape=(PAPER_BATCH, k)
            )
            indexes = handle.create_dataset(
                "topk_indexes", dtype="int16", maxshape=(None, k), shape=(PAPER_BATCH, k)
            )
            seeds = handle.create_dataset("seeds", dtype="int32", maxshape=(None,), shape=(PAPER_BATCH,))
            written = 0
            for start in range(0, len(rows.indices), PAPER_BATCH):
                end = min(start + PAPER_BATCH, len(rows.indices))
                if end > values.shape[0]:
                    for dataset in (values, indexes):
                        dataset.resize((end, k))
                    seeds.resize((end,))
                values[start:end] = rows.probs[start:end].astype(np.float16)
                indexes[start:end] = rows.indices[start:end].astype(np.int16)
                # One draw per row as the original stores it; the value does not change an uncompressed size.
                seeds[start:end] = np.arange(start, end, dtype=np.int32) + epoch * len(rows.indices)
                written = end
            for dataset in (values, indexes):
                dataset.resize((written, k))
            seeds.resize((written,))
            allocated += sum(d.id.get_storage_size() for d in (values, indexes, seeds))
        total += path.stat().st_size
    return total, allocated


def demo_logit_stores(root: Path, clips: int | None = None) -> tuple[dict[str, LogitStore], dict[str, Any]]:
    """The demo teachers' float16 and 8-bit logit stores over the first `clips` demo training clips (all when
    None), under `root`; the demo's stores and teachers are built first if missing."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=ced_mini"], return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(root / "run")
        ensure_demo_stores(cfg)
        ensure_demo_teachers(cfg)
        data = cfg.data
        clips = clips or int(data.demo.clips.train)
        # The generator keys each clip by (seed, index), train split first: these are the demo's first clips.
        audio = build_demo_stores(
            str(root / "audio"),
            seed=data.demo.seed,
            clip_seconds=data.clip_seconds,
            train=clips,
            val=1,
            test=1,
        )["train"]
        stores = {}
        for kind in KINDS:
            url = str(root / f"logits_{kind}.zarr")
            with open_dict(cfg):
                cfg.data.train, cfg.data.logits, cfg.data.extract.quantization = audio, url, kind
            extract_demo_logits(cfg)
            stores[kind] = LogitStore.open(url)
    config = {
        "clips": clips,
        "epochs": int(data.extract.epochs),
        "topk": int(data.extract.topk),
        "classes": stores["int8"].num_classes,
        "clip_seconds": float(data.clip_seconds),
        "teachers": [str(m.checkpoint) for m in cfg.teacher.members],
        "rows": "real: the demo teachers' ensemble over demo clips, demo augmentation",
    }
    return stores, config


def run(quick: bool = True) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stores, config = demo_logit_stores(root, None)
        clip_epochs = config["clips"] * config["epochs"]
        k = config["topk"]
        paper_files, paper_chunks = write_paper_layout(stores["float16"], root / "paper")
        # Data against data (our arrays' chunk files, their datasets' chunks), files against whole stores.
        paper_data = paper_chunks / clip_epochs
        figures: dict[str, Any] = {"config": config}
        figures[f"paper's layout, raw (4k + 4, k = {k})"] = paper_raw_bytes(k)
        figures["paper's layout, on disk (datasets' allocated chunks)"] = paper_data
        figures["paper's layout, on disk (whole HDF5 files, one per epoch)"] = paper_files / clip_epochs
        figures[f"paper's layout, raw at its own k = {PAPER_TOPK}"] = paper_raw_bytes(PAPER_TOPK)
        ratios = {}
        audio_bytes = 2 * round(config["clip_seconds"] * SAMPLE_RATE)  # one int16 clip
        for kind, store in stores.items():
            raw = raw_bytes_per_clip_epoch(store)
            disk = store.bytes_per_clip_epoch()
            figures[f"ours {kind}, raw (indices, values, augmentation parameters)"] = raw
            figures[f"ours {kind}, on disk (data arrays)"] = disk
            figures[f"ours {kind}, on disk (whole store, with metadata)"] = (
                store_nbytes(store.url) / clip_epochs
            )
            ratios[f"{kind} on disk / paper's layout on disk (data, demo logits, top-{k})"] = (
                disk / paper_data
            )
            ratios[f"{kind} whole store / paper's whole HDF5 files (demo logits, top-{k})"] = (
                store_nbytes(store.url) / paper_files
            )
            ratios[f"{kind} raw / paper's layout raw (demo logits, top-{k})"] = raw / paper_raw_bytes(k)
            ratios[f"{kind} on disk: % of the demo's int16 clip, per augmentation epoch"] = (
                100 * disk / audio_bytes
            )
    figures["ratios"] = ratios
    return figures
