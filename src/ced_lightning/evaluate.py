"""Evaluate a checkpoint on a labelled audio store: mAP, d-prime, per-class AP table and chart (a single-label
checkpoint, task.objective=single_label: on its softmax, with accuracy and top-5 accuracy).

    python -m ced_lightning.evaluate ckpt=logs/train/runs/.../best.ckpt store=data/audioset_eval.zarr
    python -m ced_lightning.evaluate teacher=demo store=data/demo/val.zarr     # a teacher set

A teacher set (conf/teacher/<name>.yaml) is scored member by member and as the ensemble `extract` stores
(its `combine` rule), in one pass, with the chance level beside them; `extract` runs the same check before
storing logits (`teacher_check`). The scoring itself is `ced_lightning.engines.scoring`.

The thread count is torch's default (OMP_NUM_THREADS) unless `num_threads=N` says otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import ced_lightning
from ced_lightning.core.errors import ConfigError
from ced_lightning.engines.launch import command_errors, set_cpu_threads
from ced_lightning.engines.scoring import evaluate_checkpoint, evaluate_teachers, format_teacher_table


def format_summary(result: dict[str, Any]) -> str:
    with_positives = int((result["positives"] > 0).sum())
    d_prime = result["d_prime"]
    d_text = f"{d_prime:.4f}" if math.isfinite(d_prime) else str(d_prime)
    # A single-label checkpoint's accuracy (`evaluate_checkpoint`), beside the ranking figures.
    accuracy = "".join(
        f"  {label}: {result[key]:.4f}"
        for key, label in (("acc", "accuracy"), ("top5_acc", "top-5 accuracy"))
        if key in result
    )
    return (
        f"clips: {result['num_clips']}  mAP: {result['mAP']:.4f}  d-prime: {d_text}{accuracy}  "
        f"(classes with positives: {with_positives} of {len(result['positives'])})"
    )


def run_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """`python -m ced_lightning.evaluate` on a composed config: one checkpoint (`ckpt=`) or a teacher set
    (`teacher=NAME`); prints the summary (or the teacher table) and returns the result."""
    teacher_cfg = cfg.get("teacher")
    # "???": also the default's value without a data group (`${oc.select:data.test,???}`).
    if OmegaConf.is_missing(cfg, "store") or cfg.get("store") in (None, "", "???"):
        raise ConfigError(
            "store= is required: python -m ced_lightning.evaluate ckpt=PATH store=STORE "
            "(or teacher=NAME store=STORE for a teacher set, or data=custom data.root=DIR for its test store)"
        )
    if bool(cfg.get("ckpt")) == bool(teacher_cfg):
        raise ConfigError(
            "give either ckpt=PATH (one model) or teacher=NAME (a teacher set, conf/teacher/NAME.yaml, e.g. "
            "teacher=demo, or teacher=ced 'teacher.checkpoints=[a.ckpt,b.ckpt]'), not "
            + ("both" if teacher_cfg else "neither")
        )
    # Left alone by default: torch's own default honours OMP_NUM_THREADS, which launchers set per process.
    set_cpu_threads(cfg.get("num_threads"))
    options = {
        "batch_size": int(cfg.batch_size),
        "output_dir": cfg.output_dir,
        "length_tolerance_s": float(cfg.length_tolerance_s),
        "device": None if cfg.device == "auto" else cfg.device,
        "progress": bool(cfg.progress),
    }
    if teacher_cfg:
        from ced_lightning.engines.teachers import load_teachers, teacher_weights

        models, records, class_names = load_teachers(teacher_cfg)
        table = evaluate_teachers(
            {record["name"]: model for record, model in zip(records, models, strict=True)},
            str(cfg.store),
            combine=str(teacher_cfg.get("combine", "mean_prob")),
            weights=teacher_weights(records),
            class_names=class_names,
            **options,
        )
        print(format_teacher_table(table))
        if cfg.output_dir is not None:
            path = Path(cfg.output_dir) / "teacher_table.json"
            path.write_text(json.dumps(table, indent=2))
            print(f"table: {path}  ensemble per-class AP: {Path(cfg.output_dir) / 'per_class_ap.csv'}")
        return table
    result = evaluate_checkpoint(cfg.ckpt, str(cfg.store), **options)
    print(format_summary(result))
    if "per_class_csv" in result:  # output_dir=null writes no files
        print(f"per-class AP: {result['per_class_csv']}  chart: {result['per_class_png']}")
    return result


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="evaluate", version_base="1.3")
@command_errors
def main(cfg: DictConfig) -> None:
    run_evaluate(cfg)


if __name__ == "__main__":
    main()
