"""`python -m bench.ablations [seeds=3] [epochs=5] [model=ced_tiny]`: the student ablations on the demo.

Consistent teaching against fresh augmentations, an 8-bit against a float16 logit store, and KL against
BCE, each averaged over seeds, with everything else fixed (the demo's teachers and stores, built first if
missing). Writes `bench/ablations.json` and `bench/ablations.md`; the README quotes the table.

A reduced schedule by default (CED-Tiny, 5 epochs) so the 12 runs fit a 2-core CPU in about half an hour;
`model=ced_mini epochs=10` is the demo's own student.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ced_lightning import conf_dir

HERE = Path(__file__).parent
CONDITIONS: dict[str, list[str]] = {
    "consistent, int8 store, KL (default)": [],
    "fresh augmentations (consistent=false)": ["distill.consistent=false"],
    "float16 store": [
        "data.extract.quantization=float16",
        "data.logits=${data.root}/logits_${teacher.name}_float16.zarr",
    ],
    "BCE loss": ["distill.loss=bce"],
}


def run_one(overrides: list[str], output_dir: Path) -> dict[str, float]:
    # The demo's own entry: it builds the teachers and stores a condition needs (a float16 store) if missing.
    from ced_lightning.demo import run_demo

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
        metrics = run_demo(cfg)
    return {k: v for k, v in metrics.items() if k in ("val/mAP", "test/mAP")}


def quantization_error() -> dict[str, float]:
    """8-bit against float16 values of the same teachers, parameters and clips (the demo's two stores): the
    8-bit reconstruction error, to within float16's own (at most 2.4e-4)."""
    import numpy as np

    from ced_lightning.store import LogitStore

    root = Path("data/demo")
    int8, fp16 = (
        LogitStore.open(str(root / "logits_demo.zarr")),
        LogitStore.open(str(root / "logits_demo_float16.zarr")),
    )
    diffs = []
    for epoch in range(int8.epochs):
        a, b = int8.read_epoch(epoch), fp16.read_epoch(epoch)
        same = (a.indices == b.indices).all(1)  # rows whose order a rounding tie did not change
        diffs.append(np.abs(a.probs[same] - b.probs[same]).ravel())
    diff = np.concatenate(diffs)
    return {
        "max_abs_prob_error_int8_vs_float16": float(diff.max()),
        "mean_abs_prob_error_int8_vs_float16": float(diff.mean()),
        "bytes_per_clip_epoch_int8": int8.bytes_per_clip_epoch(),
        "bytes_per_clip_epoch_float16": fp16.bytes_per_clip_epoch(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    seeds = range(int(args.get("seeds", 3)))
    epochs = int(args.get("epochs", 5))
    model = args.get("model", "ced_tiny")
    common = [
        f"experiment={model}",
        f"data.schedule.max_epochs={epochs}",
        "logger=csv",
        "callbacks.progress_bar=null",
        "+summary=false",
        # One student per row: the demo's label-only baseline row does not change with these conditions.
        "data.label_only_baseline=false",
    ]
    runs: dict[str, list[dict[str, float]]] = {}
    only = args.get("only")  # rerun one condition (its index), keep the others' results from the last run
    if only is not None and (HERE / "ablations.json").is_file():
        previous = json.loads((HERE / "ablations.json").read_text())["results"]
        runs = {
            n: [{m: v["runs"][k] for m, v in r.items()} for k in range(len(seeds))]
            for n, r in previous.items()
        }
    root = HERE / "ablation_runs"
    start = time.perf_counter()
    for index, (name, extra) in enumerate(CONDITIONS.items()):
        if only is not None and index != int(only):
            continue
        runs[name] = []
        for seed in seeds:
            tag = f"{index}_{seed}"
            print(f"== {name}, seed {seed}", flush=True)
            result = run_one([*common, *extra, f"seed={seed}"], root / tag)
            runs.setdefault(name, []).append(result)
    table = {
        name: {
            metric: {
                "mean": statistics.mean(r[metric] for r in results),
                "std": statistics.stdev(r[metric] for r in results) if len(results) > 1 else 0.0,
                "runs": [r[metric] for r in results],
            }
            for metric in ("val/mAP", "test/mAP")
        }
        for name, results in runs.items()
    }
    out = {
        "quantization_on_demo": quantization_error(),
        "config": {"model": model, "epochs": epochs, "seeds": list(seeds), "common_overrides": common},
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "results": table,
    }
    (HERE / "ablations.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"Student {model}, {epochs} epochs on the demo, mean ± std over seeds {list(seeds)} "
        f"(`python -m bench.ablations seeds={len(seeds)} epochs={epochs} model={model}`):",
        "",
        "| condition | val mAP | test mAP |",
        "|---|---|---|",
    ]
    for name, metrics in table.items():
        val, test = metrics["val/mAP"], metrics["test/mAP"]
        lines.append(
            f"| {name} | {val['mean']:.4f} ± {val['std']:.4f} | {test['mean']:.4f} ± {test['std']:.4f} |"
        )
    q = out["quantization_on_demo"]
    lines += [
        "",
        "8-bit store values against float16 on the demo's top-k: max |Δp| "
        f"{q['max_abs_prob_error_int8_vs_float16']:.4f}, "
        f"mean {q['mean_abs_prob_error_int8_vs_float16']:.5f}; "
        f"{q['bytes_per_clip_epoch_int8']:.1f} against "
        f"{q['bytes_per_clip_epoch_float16']:.1f} bytes per clip-epoch (top-5).",
    ]
    (HERE / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
