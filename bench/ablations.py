"""`python -m bench.ablations [seeds=3] [jobs=2] [experiment=student_demo] [epochs=N] [only=0,3] [OVERRIDES]`:
the paper's student ablations on the demo, each row the mean and spread over seeds.

Every row is the demo's student (`experiment=student_demo`: label-free over the labeled clips and the
unlabeled pool, the demo's teachers, schedule and stores) with one thing changed:

- consistent teaching (replay the teachers' augmentation) against inconsistent teaching, as the paper
  defines it (the student hears the clip unshifted, with fresh masks) and as we do (fresh shift and masks);
- the ensemble against its best single teacher (MobileNet, `teacher=demo_mobilenet`);
- top-k (1, 5, every class) and augmentation epochs E (1, 3) of the logit store;
- 8-bit against float16 stored values;
- where the student starts: the demo's stand-in for a pretrained start (its CED teacher's weights) against
  none (from scratch) and against the paper's released CED-Tiny (`model.init_from=ced_tiny`, the file's first
  4 blocks: the start `data=custom` uses by default); a row whose released file is in no cache and cannot be
  downloaded is listed as not run, with the reason;
and, as the reference users compare against, the same network with labels on the labeled clips alone for the
same number of optimizer steps (`ced_lightning.engines.comparison.label_only_cfg`).

What the rows need (stores, teachers, each row's logit store) is built first, one at a time, through the
demo's own builders; then the runs go `jobs` at a time, each process with its share of the cores.
Writes `bench/ablations.json` (every run) and `bench/ablations.md`, the table bench/demo_results.md
quotes with its findings. `only=` reruns the listed rows (their index) and keeps the other rows of the
last run. Each finished run is saved at once: run again the same way, a stopped invocation runs only what it
had not finished (`fresh=true` starts over). Each run records its row's fingerprint (`row_fingerprint`: the
sha256 of its teachers' weights and of the student's start): a kept run whose teachers were other weights (a
rebuilt teacher) is run again, with a line naming the row, the seeds and what changed, so rows from two
teacher pairs never share a table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
LABEL_ONLY = "same network with labels, labeled clips only (the baseline)"
CONDITIONS: dict[str, list[str]] = {
    "consistent, ensemble, top-5, E=3, int8 (the demo's student)": [],
    "inconsistent as the paper: no shift, fresh masks": [
        "distill.consistent=false",
        "distill.inconsistent_shift=none",
    ],
    "inconsistent as ours: fresh shift and masks": ["distill.consistent=false"],
    "single teacher (MobileNet, the best one)": ["teacher=demo_mobilenet"],
    "top-1": ["data.extract.topk=1", "data.logits=${data.root}/logits_${teacher.name}_top1.zarr"],
    "top-16 (every class)": [
        "data.extract.topk=16",
        "data.logits=${data.root}/logits_${teacher.name}_top16.zarr",
    ],
    "E=1": ["data.extract.epochs=1", "data.logits=${data.root}/logits_${teacher.name}_e1.zarr"],
    "float16 store": [
        "data.extract.quantization=float16",
        "data.logits=${data.root}/logits_${teacher.name}_float16.zarr",
    ],
    LABEL_ONLY: [],
    # Where the student starts (issue 16): the demo's stand-in for a pretrained start (its CED teacher, above)
    # against none, and against the paper's released CED-Tiny (the file's first 4 blocks), the start
    # data=custom uses by default. The released row runs where the file is cached or can be downloaded.
    "student from scratch (no pretrained start)": ["model.init_from=null"],
    "student from the released CED-Tiny (its first 4 blocks)": ["model.init_from=ced_tiny"],
}
# The rows' store-quality figures compare these two conditions' stores (same teachers, clips and draws).
INT8_ROW, FLOAT16_ROW = next(iter(CONDITIONS)), "float16 store"


def compose_cfg(overrides: list[str], output_dir: Path | None = None) -> Any:
    from ced_lightning import compose_config

    return compose_config(overrides, output_dir)


def build_inputs(overrides: list[str]) -> None:
    """The stores, teachers and logit store of one row, built once before any run starts."""
    from ced_lightning.demo import build_demo_artifacts

    build_demo_artifacts(compose_cfg([*overrides, "data.build_missing=true"]))


def build_teachers(overrides: list[str]) -> None:
    """The stores and teachers of one row (what its fingerprint hashes), built when missing."""
    from ced_lightning.demo import ensure_demo_stores, ensure_demo_teachers

    cfg = compose_cfg([*overrides, "data.build_missing=true"])
    ensure_demo_stores(cfg)
    ensure_demo_teachers(cfg)


def row_fingerprint(overrides: list[str]) -> dict[str, str]:
    """What a row's runs learn from and start from, by the sha256 of their weights (`state_dict_sha256`, so a
    checkpoint saved again with the same weights keeps it): `teacher NAME` per teacher of the row's teacher
    set, and `start`, the student's `model.init_from` (a checkpoint's weights, a released name as such, or
    `none`). Runs of one row with another fingerprint were trained on other teachers."""
    from ced_lightning.engines.teachers import load_teachers, state_dict_sha256
    from ced_lightning.models import load_checkpoint

    cfg = compose_cfg(overrides)
    models, records, _ = load_teachers(cfg.teacher)
    out = {f"teacher {r['name']}": state_dict_sha256(m) for r, m in zip(records, models, strict=True)}
    start = cfg.model.get("init_from")
    if start is None:
        out["start"] = "none"
    elif Path(str(start)).is_file():
        out["start"] = state_dict_sha256(load_checkpoint(str(start)).model)
    else:
        out["start"] = f"released {start}"
    return out


def same_teachers(
    kept: dict[str, dict[str, Any]], fingerprints: dict[str, dict[str, str]]
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The kept runs whose recorded fingerprint is their row's now, and one line per row whose other runs
    are dropped (to run again) with what differs: rows of two teacher pairs never share a table."""
    same: dict[str, dict[str, Any]] = {}
    dropped = []
    for name, seeds in kept.items():
        now = fingerprints.get(name)
        same[name] = {s: r for s, r in seeds.items() if now is not None and r.get("fingerprint") == now}
        other = sorted((s for s in seeds if s not in same[name]), key=int)
        if not other:
            continue
        recorded = [seeds[s].get("fingerprint") for s in other]
        if any(r is None for r in recorded) or now is None:
            why = "no fingerprint of their teachers was recorded"
        else:
            changed = sorted({k for r in recorded for k in {*r, *now} if r.get(k) != now.get(k)})
            then = {k: ", ".join(sorted({_short(r.get(k)) for r in recorded})) for k in changed}
            why = "; ".join(f"{k}: {then[k]} then, {_short(now.get(k))} now" for k in changed)
        dropped.append(f"{name}: seeds {', '.join(other)} ran on other weights ({why}); running them again")
    return {n: s for n, s in same.items() if s}, dropped


def _short(digest: str | None) -> str:
    return "absent" if digest is None else digest[:12] if len(digest) == 64 else digest


def unavailable_start(overrides: list[str]) -> str | None:
    """Why a row cannot run here, or None: the released weights it starts from are in no cache and cannot be
    downloaded (fetched once here, so that no run starts without them)."""
    from ced_lightning.models import RELEASED, ReleasedWeightsUnavailable, fetch_released

    name = compose_cfg(overrides).model.get("init_from")
    if name not in RELEASED:
        return None
    try:
        fetch_released(name)
    except ReleasedWeightsUnavailable:
        return f"released weights {name!r} in no cache and no download here (docs/using_models.md)"
    return None


def run_one(condition: str, overrides: list[str], output_dir: str) -> dict[str, float]:
    """One row's run in its own process: the student (or, for the baseline row, the same network with
    labels), its best validation mAP and its tested checkpoint's test mAP."""
    from ced_lightning.demo import run_demo
    from ced_lightning.engines.comparison import label_only_cfg
    from ced_lightning.engines.training import train

    cfg = compose_cfg([*overrides, "data.build_missing=false"], Path(output_dir))
    start = time.perf_counter()
    metrics = train(label_only_cfg(cfg)) if condition == LABEL_ONLY else run_demo(cfg)
    out = {k: float(v) for k, v in metrics.items() if k in ("val/mAP", "test/mAP")}
    out["minutes"] = (time.perf_counter() - start) / 60
    return out


def quantization_error(int8_url: str, float16_url: str) -> dict[str, float]:
    """8-bit against float16 values of the same teachers, parameters and clips: the 8-bit reconstruction
    error, to within float16's own (at most 2.4e-4)."""
    import numpy as np

    from ced_lightning.store import LogitStore

    int8, fp16 = LogitStore.open(int8_url), LogitStore.open(float16_url)
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


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    return {
        name: {
            metric: {
                "mean": statistics.mean(r[metric] for r in results),
                "std": statistics.stdev(r[metric] for r in results) if len(results) > 1 else 0.0,
                "runs": [r[metric] for r in results],
            }
            for metric in ("val/mAP", "test/mAP", "minutes")
        }
        for name, results in runs.items()
    }


def markdown(out: dict[str, Any]) -> str:
    config = out["config"]
    lines = [
        f"The demo's student ({config['experiment']}, {config['epochs']} epochs), one thing changed per row; "
        f"mean ± std over seeds {config['seeds']} (`{config['command']}`, {out['minutes']} min with "
        f"{config['jobs']} runs at a time):",
        "",
        "| row | val mAP | test mAP |",
        "|---|---|---|",
    ]
    for name, metrics in out["results"].items():
        val, test = metrics["val/mAP"], metrics["test/mAP"]
        count = len(val["runs"])
        row = name if count == len(config["seeds"]) else f"{name} ({count} of {len(config['seeds'])} seeds)"
        lines.append(
            f"| {row} | {val['mean']:.4f} ± {val['std']:.4f} | {test['mean']:.4f} ± {test['std']:.4f} |"
        )
    teachers = sorted(
        {
            (key.removeprefix("teacher "), digest)
            for seeds in out.get("runs", {}).values()
            for run in seeds.values()
            for key, digest in (run.get("fingerprint") or {}).items()
            if key.startswith("teacher ")
        }
    )
    if teachers:
        listing = ", ".join(f"{name} {_short(digest)}" for name, digest in teachers)
        lines += ["", f"Teachers of every row (sha256 of their weights): {listing}."]
    if out.get("not_run"):
        lines += ["", "Not run here:"]
        lines += [f"- {name}: {reason}" for name, reason in out["not_run"].items()]
    q = out.get("quantization_on_demo")
    if q:
        lines += [
            "",
            "8-bit store values against float16 on the demo's top-k: max |Δp| "
            f"{q['max_abs_prob_error_int8_vs_float16']:.4f}, "
            f"mean {q['mean_abs_prob_error_int8_vs_float16']:.5f}; "
            f"{q['bytes_per_clip_epoch_int8']:.1f} against "
            f"{q['bytes_per_clip_epoch_float16']:.1f} bytes per clip-epoch on disk.",
        ]
    return "\n".join(lines) + "\n"


OPTIONS = ("seeds", "jobs", "experiment", "epochs", "only", "fresh")


def previous_runs(path: Path, common: list[str], names: list[str], fresh: bool) -> dict[str, dict[str, Any]]:
    """The runs a previous (possibly stopped) invocation finished, row -> seed -> result, kept when it ran
    the same common overrides: `only=` rows are run again, `fresh=true` keeps nothing. A file from before
    per-run results (no "runs") is kept row by row, its seeds in order."""
    if fresh or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get("config", {}).get("common_overrides") != common:
        return {}
    if "runs" in saved:
        kept = saved["runs"]
    else:
        kept = {
            name: {
                str(k): {m: v["runs"][k] for m, v in result.items()}
                for k in range(len(result["val/mAP"]["runs"]))
            }
            for name, result in saved["results"].items()
        }
    return {name: dict(seeds) for name, seeds in kept.items() if name in CONDITIONS and name not in names}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = dict(a.split("=", 1) for a in argv)
    seeds = list(range(int(args.get("seeds", 3))))
    jobs = int(args.get("jobs", 2))
    experiment = args.get("experiment", "student_demo")
    common = [f"experiment={experiment}", "logger=csv", "callbacks.progress_bar=null", "+summary=false"]
    common.append("data.label_only_baseline=false")  # the baseline is a row of its own
    if "epochs" in args:
        common.append(f"data.schedule.max_epochs={args['epochs']}")
    # Any other key=value is a Hydra override of every run (e.g. paths.data_dir=... for stores elsewhere).
    common += [f"{k}={v}" for k, v in args.items() if k not in OPTIONS]
    only = {int(i) for i in args["only"].split(",")} if args.get("only") else set()
    rerun = [n for i, n in enumerate(CONDITIONS) if i in only]
    path = HERE / "ablations.json"
    # Every finished run is saved at once: a stopped invocation, run again the same way, runs only what is
    # missing (about two hours in all on a 2-core CPU).
    runs = previous_runs(path, common, rerun, args.get("fresh", "false").lower() == "true")

    def missing() -> list[tuple[str, int]]:
        return [
            (n, s)
            for n in CONDITIONS
            for s in seeds
            if (not only or n in rerun) and str(s) not in runs.get(n, {})
        ]

    # Kept runs count only where their row's teachers and start are the weights they are now (rebuilt
    # teachers change every row's numbers): the rows' teachers are built first, then fingerprinted.
    rows = list(dict.fromkeys([*runs, *(n for n, _ in missing())]))
    for name in rows:
        build_teachers([*common, *CONDITIONS[name]])
    fingerprints = {name: row_fingerprint([*common, *CONDITIONS[name]]) for name in rows}
    runs, dropped = same_teachers(runs, fingerprints)
    for line in dropped:
        print(f"== {line}", flush=True)
    todo = missing()
    if runs:
        print(f"== kept from {path}: {sum(map(len, runs.values()))} runs; to run: {len(todo)}", flush=True)

    epochs_cfg = compose_cfg(common)
    # Minutes in all, over a stopped invocation and the one that finished it.
    before = json.loads(path.read_text()).get("minutes", 0.0) if runs else 0.0
    start = time.perf_counter()
    out: dict[str, Any] = {
        "config": {
            "experiment": experiment,
            "epochs": int(epochs_cfg.data.schedule.max_epochs),
            "seeds": seeds,
            "jobs": jobs,
            "common_overrides": common,
            "command": "python -m bench.ablations " + " ".join(argv) if argv else "python -m bench.ablations",
        },
    }

    def save() -> None:
        ordered = {n: runs[n] for n in CONDITIONS if runs.get(n)}
        out["runs"] = ordered
        out["results"] = summarize({n: [r[k] for k in sorted(r, key=int)] for n, r in ordered.items()})
        out["minutes"] = round(before + (time.perf_counter() - start) / 60, 1)
        out["complete"] = all(str(s) in runs.get(n, {}) for n in CONDITIONS for s in seeds)
        path.write_text(json.dumps(out, indent=2))
        (HERE / "ablations.md").write_text(markdown(out))

    out["not_run"] = {}
    for name in dict.fromkeys(n for n, _ in todo):
        reason = unavailable_start([*common, *CONDITIONS[name]])
        if reason:
            print(f"== not run: {name}: {reason}", flush=True)
            out["not_run"][name] = reason
            continue
        print(f"== inputs of: {name}", flush=True)
        build_inputs([*common, *CONDITIONS[name]])
    todo = [(n, s) for n, s in todo if n not in out["not_run"]]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    root = HERE / "ablation_runs"
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {
            (name, seed): pool.submit(
                run_one,
                name,
                # Each process its share of the cores (the demo's own count is for one run at a time).
                [*common, *CONDITIONS[name], f"seed={seed}", f"num_threads={threads}"],
                str(root / f"{list(CONDITIONS).index(name)}_{seed}"),
            )
            for name, seed in todo
        }
        for (name, seed), future in futures.items():
            result = {**future.result(), "fingerprint": fingerprints[name]}
            print(f"== {name}, seed {seed}: {result}", flush=True)
            runs.setdefault(name, {})[str(seed)] = result
            save()

    if INT8_ROW in runs and FLOAT16_ROW in runs:
        urls = [str(compose_cfg([*common, *CONDITIONS[n]]).data.logits) for n in (INT8_ROW, FLOAT16_ROW)]
        out["quantization_on_demo"] = quantization_error(*urls)
    save()
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
