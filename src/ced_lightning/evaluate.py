"""Evaluate a checkpoint on a labelled audio store: mAP, d-prime, per-class AP table and chart.

    python -m ced_lightning.evaluate ckpt=logs/train/runs/.../best.ckpt store=data/audioset_eval.zarr

Clips of any length: equal-length clips are batched, each length group runs on its own (CED splits clips
longer than 10.12 s into pieces itself), so a clip's scores do not depend on the batch size.
"""

from __future__ import annotations

import logging
import math
import os
from os import PathLike
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import ced_lightning
from ced_lightning.audio import SAMPLE_RATE
from ced_lightning.labels import resolve_class_names
from ced_lightning.metrics import TaggingMetrics, plot_per_class_ap, write_per_class_csv
from ced_lightning.predict import batches_by_length, default_device, run_model

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    ckpt: str | PathLike,
    store_url: str,
    *,
    batch_size: int = 32,
    output_dir: str | PathLike | None = None,
    length_tolerance_s: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every clip of the store with the checkpoint's model and compare with the store's labels.

    Returns `{"mAP", "d_prime", "num_clips", "per_class_ap", "positives", "class_names", "probabilities"}`
    (floats, int, tensors, list; `probabilities` is `[clips, classes]` in store order) and, with `output_dir`,
    the paths `"per_class_csv"` and `"per_class_png"`.
    """
    from ced_lightning.models import load_checkpoint
    from ced_lightning.store.audio import AudioStore

    checkpoint = load_checkpoint(ckpt)
    model = checkpoint.model
    store = AudioStore.open(store_url)
    if not store.has_labels:
        raise ValueError(f"store={store_url}: has no labels; evaluation needs a labelled store")
    labels = torch.from_numpy(store.label_matrix())
    num_classes = int(model.num_classes)
    if labels.shape[1] != num_classes:
        raise ValueError(
            f"store={store_url} has {labels.shape[1]} classes but ckpt={ckpt} predicts {num_classes}"
        )
    store_names = list(store.class_names) if store.class_names is not None else None
    ckpt_names = checkpoint.class_names
    if ckpt_names and store_names and ckpt_names != store_names:
        # Same count, different order or vocabulary: the numbers would be silently wrong.
        raise ValueError(f"ckpt={ckpt} and store={store_url} list different class names (or orders)")
    # No placeholder names: unnamed classes stay unnamed in the per-class table and chart.
    class_names = resolve_class_names(num_classes, ckpt_names, store_names, placeholders=False)

    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    lengths = [int(n) for n in store.lengths]
    tolerance = max(0, round(length_tolerance_s * SAMPLE_RATE))
    batches = batches_by_length(lengths, batch_size, tolerance)
    metric = TaggingMetrics(num_classes)
    log.info("evaluating %s on %d clips of %s (%d batches)", ckpt, len(lengths), store_url, len(batches))

    probabilities = torch.empty(len(lengths), num_classes)

    def run(advance) -> None:
        for batch in batches:
            probabilities[batch] = run_model(model, [store.read(i) for i in batch], device)
            advance(len(batch))

    if progress:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("evaluating", total=len(lengths))
            run(lambda n: bar.advance(task, n))
    else:
        run(lambda n: None)

    metric.update(probabilities, labels)
    scores = metric.compute()
    result: dict[str, Any] = {
        "mAP": float(scores["mAP"]),
        "d_prime": float(scores["d_prime"]),
        "num_clips": len(lengths),
        "per_class_ap": scores["per_class_ap"],
        "positives": scores["positives"],
        "class_names": class_names,
        "probabilities": probabilities,
    }
    if output_dir is not None:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        result["per_class_csv"] = folder / "per_class_ap.csv"
        result["per_class_png"] = folder / "per_class_ap.png"
        write_per_class_csv(result["per_class_csv"], scores["per_class_ap"], class_names, scores["positives"])
        plot_per_class_ap(result["per_class_png"], scores["per_class_ap"], class_names, scores["mAP"])
    return result


def format_summary(result: dict[str, Any]) -> str:
    with_positives = int((result["positives"] > 0).sum())
    d_prime = result["d_prime"]
    d_text = f"{d_prime:.4f}" if math.isfinite(d_prime) else str(d_prime)
    return (
        f"clips: {result['num_clips']}  mAP: {result['mAP']:.4f}  d-prime: {d_text}  "
        f"(classes with positives: {with_positives} of {len(result['positives'])})"
    )


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    for key in ("ckpt", "store"):
        if OmegaConf.is_missing(cfg, key) or not cfg.get(key):
            raise ValueError(f"{key}= is required: python -m ced_lightning.evaluate ckpt=PATH store=STORE")
    torch.set_num_threads(os.cpu_count() or 1)
    result = evaluate_checkpoint(
        cfg.ckpt,
        str(cfg.store),
        batch_size=int(cfg.batch_size),
        output_dir=cfg.output_dir,
        length_tolerance_s=float(cfg.length_tolerance_s),
        device=None if cfg.device == "auto" else cfg.device,
        progress=bool(cfg.progress),
    )
    print(format_summary(result))
    if "per_class_csv" in result:  # output_dir=null writes no files
        print(f"per-class AP: {result['per_class_csv']}  chart: {result['per_class_png']}")


if __name__ == "__main__":
    main()
