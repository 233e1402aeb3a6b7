"""Scoring against a store's labels, the project's one pass: a checkpoint (`evaluate_checkpoint`), a teacher
set member by member and as its ensemble (`evaluate_teachers`), and the teacher-quality gate `extract` applies
before storing logits (`weak_teachers`, `MIN_GAIN_OVER_CHANCE`) with the table both commands print.

Clips of any length: equal-length clips are batched, each length group runs on its own (CED splits clips
longer than 10.12 s into pieces itself), so a clip's scores do not depend on the batch size.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.device import default_device
from ced_lightning.core.ensemble import check_combine, check_teachers, combine_probabilities
from ced_lightning.core.errors import InputError
from ced_lightning.core.labels import check_same_classes, resolve_class_names
from ced_lightning.core.metrics import (
    chance_map,
    gain_over_chance,
    tagging_scores,
    write_per_class,
)
from ced_lightning.core.objective import probabilities_from_logits
from ced_lightning.core.progress import ProgressLog, output_is_terminal
from ced_lightning.data.batching import batches_by_length, pad_batch

log = logging.getLogger(__name__)


def _open_labelled_store(store_url: str) -> Any:
    from ced_lightning.store.audio import AudioStore

    store = AudioStore.open(store_url)
    if not store.has_labels:
        raise InputError(f"store={store_url}: has no labels; evaluation needs a labelled store")
    return store


def _store_class_names(
    store: Any, store_url: str, what: str, num_classes: int, model_names: list[str] | None
) -> list[str] | None:
    """The class names of the evaluation (None where unnamed), after refusing a store whose classes differ
    from the model's (`what` names the model in the message: `ckpt=PATH`, `teacher=NAME`)."""
    store_classes = store.label_matrix().shape[1]
    if store_classes != num_classes:
        raise InputError(f"store={store_url} has {store_classes} classes but {what} predicts {num_classes}")
    store_names = list(store.class_names) if store.class_names is not None else None
    # Same count, different order or vocabulary: the numbers would be silently wrong.
    check_same_classes(
        model_names or None,
        store_names or None,
        sources=(what, f"store={store_url}"),
        message=f"{what} and store={store_url} list different class names (or orders)",
    )
    # No placeholder names: unnamed classes stay unnamed in the per-class table and chart.
    return resolve_class_names(num_classes, model_names, store_names, placeholders=False)


def _placed(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` on `device`; one already there (`extract` places its teachers once for all its passes) is
    left as it is."""
    if all(t.device == device for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    return model.to(device)


@torch.inference_mode()
def score_store(
    models: Mapping[str, nn.Module],
    store: Any,
    *,
    batch_size: int = 32,
    length_tolerance_s: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    combine: str | None = None,
    stage: str = "evaluate",
    weights: Sequence[float] | None = None,
    leave_one_out: bool = False,
    objective: str = "multi_label",
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor]]:
    """Every model's probabilities `[clips, classes]` (float32, CPU, store order) over every clip of the
    audio store; with `combine` the ensemble's (`combine_probabilities` with the models' `weights`, as
    `extract` combines them), and with `leave_one_out` too, for each model, the ensemble's without it
    (`{name: probabilities}`; empty otherwise, or for one model).

    The project's one evaluation pass: clips grouped by length (`batches_by_length`), each batch read once
    and run through every model, so a clip's scores do not depend on the batch size. Probabilities are
    `objective.probabilities_from_logits` of the models' `objective`, as the Lightning validation and test
    steps score them (an ensemble combines sigmoids: teachers are multi-label). `stage` names the pass in its
    progress lines (`progress.ProgressLog`); `progress` shows a bar on a terminal.
    """
    device = torch.device(device) if device is not None else default_device()
    models = {name: _placed(model, device).eval() for name, model in models.items()}
    num_classes = int(next(iter(models.values())).num_classes)
    lengths = [int(n) for n in store.lengths]
    tolerance = max(0, round(length_tolerance_s * SAMPLE_RATE))
    batches = batches_by_length(lengths, batch_size, tolerance)
    log.info(
        "evaluating %s on %d clips of %s (%d batches)",
        ", ".join(models),
        len(lengths),
        store.url,
        len(batches),
    )
    probabilities = {name: torch.empty(len(lengths), num_classes) for name in models}
    ensemble = torch.empty(len(lengths), num_classes) if combine is not None else None
    left_out = list(models) if ensemble is not None and leave_one_out and len(models) > 1 else []
    without = {name: torch.empty(len(lengths), num_classes) for name in left_out}

    def run(advance: Callable[[int], Any]) -> None:
        for batch in batches:
            waveform = pad_batch([store.read(i) for i in batch])[0].to(device)
            logits = {name: model(waveform) for name, model in models.items()}
            for name, value in logits.items():
                probabilities[name][batch] = probabilities_from_logits(value, objective).cpu()
            if ensemble is not None:
                members = list(logits.values())
                ensemble[batch] = combine_probabilities(members, combine, weights).cpu()
                for i, name in enumerate(left_out):
                    rest = [m for j, m in enumerate(members) if j != i]
                    rest_weights = None if weights is None else [w for j, w in enumerate(weights) if j != i]
                    without[name][batch] = combine_probabilities(rest, combine, rest_weights).cpu()
            advance(len(batch))

    with ProgressLog(stage, len(lengths), unit="clips") as logged:
        if progress and output_is_terminal():
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task("evaluating", total=len(lengths))
                run(lambda n: (bar.advance(task, n), logged.advance(n)))
        else:
            run(logged.advance)
    return probabilities, ensemble, without


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

    Returns `{"mAP", "d_prime", "num_clips", "per_class_ap", "positives", "class_names", "probabilities",
    "objective"}` (floats, int, tensors, list, str; `probabilities` is `[clips, classes]` in store order) and,
    with `output_dir`, the paths `"per_class_csv"` and `"per_class_png"`. A single-label checkpoint (trained
    with task.objective=single_label) is scored on its softmax, as its test step scored it, and adds
    `"acc"` and, with more than 5 classes, `"top5_acc"` (`single_label.single_label_scores`).
    """
    from ced_lightning.models import load_checkpoint

    checkpoint = load_checkpoint(ckpt)
    model = checkpoint.model
    store = _open_labelled_store(store_url)
    num_classes = int(model.num_classes)
    class_names = _store_class_names(store, store_url, f"ckpt={ckpt}", num_classes, checkpoint.class_names)
    labels = torch.from_numpy(store.label_matrix())
    scored, _, _ = score_store(
        {str(ckpt): model},
        store,
        batch_size=batch_size,
        length_tolerance_s=length_tolerance_s,
        device=device,
        progress=progress,
        objective=checkpoint.objective,
    )
    probabilities = scored[str(ckpt)]
    scores = tagging_scores(probabilities, labels)
    result: dict[str, Any] = {
        "mAP": float(scores["mAP"]),
        "d_prime": float(scores["d_prime"]),
        "num_clips": len(store),
        "per_class_ap": scores["per_class_ap"],
        "positives": scores["positives"],
        "class_names": class_names,
        "probabilities": probabilities,
        "objective": checkpoint.objective,
    }
    if checkpoint.objective == "single_label":
        result.update(_single_label_scores(probabilities, labels, store))
    if output_dir is not None:
        result.update(write_per_class(output_dir, scores, class_names))
    return result


def _single_label_scores(probabilities: torch.Tensor, labels: torch.Tensor, store: Any) -> dict[str, float]:
    """Accuracy (and top-5) of a single-label model on a store that gives each clip one class (else none,
    with a warning naming the first clip that has not)."""
    from ced_lightning.core.labels import single_label_problem
    from ced_lightning.core.single_label import single_label_scores

    problem = single_label_problem(labels.sum(1).tolist(), store.names)
    if problem is not None:
        log.warning("store=%s: no accuracy for this single-label model: %s", store.url, problem)
        return {}
    scores = single_label_scores(probabilities, labels)
    return {name: float(value) for name, value in scores.items() if name != "confusion"}


# `teacher_check.min_gain`'s default: a teacher set must close at least this share of the gap from chance
# to a perfect mAP (gain_over_chance) before `extract` stores its logits.
MIN_GAIN_OVER_CHANCE = 0.1


def evaluate_teachers(
    teachers: Mapping[str, nn.Module],
    store_url: str,
    *,
    combine: str = "mean_prob",
    weights: Sequence[float] | None = None,
    class_names: list[str] | None = None,
    batch_size: int = 32,
    length_tolerance_s: float = 0.0,
    device: torch.device | str | None = None,
    progress: bool = False,
    output_dir: str | PathLike | None = None,
    stage: str = "evaluate",
) -> dict[str, Any]:
    """Each teacher's and the ensemble's (combined by `combine` with the teachers' `weights`, as `extract`
    stores it) mAP and d-prime on a labelled store, from one pass, with the chance level (`chance_map`), each
    one's `gain_over_chance`, and each teacher's effect on the ensemble: the ensemble's mAP without it
    (`ensemble_without`, leave-one-out) and `effect`, the ensemble's mAP minus that (below 0: the ensemble
    is better without it).

    Returns a JSON-ready table: `{"store", "num_clips", "classes_with_positives", "num_classes",
    "chance_mAP", "combine", "teachers": {name: {"mAP", "d_prime", "gain_over_chance", "weight",
    "ensemble_without", "effect"}}, "ensemble": {...}, "best_member", "ensemble_over_best"}` (the
    leave-one-out figures None for a single teacher); with `output_dir`, the ensemble's per-class AP table
    and chart are written there too.
    """
    from ced_lightning.store.remote import redact_url

    check_combine(combine)
    num_classes = check_teachers(list(teachers.values()), list(teachers))
    store = _open_labelled_store(store_url)
    what = f"the teachers ({', '.join(teachers)})"
    names = _store_class_names(store, store_url, what, num_classes, class_names)
    labels = torch.from_numpy(store.label_matrix())
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(teachers)
    scored, ensemble, without = score_store(
        teachers,
        store,
        batch_size=batch_size,
        length_tolerance_s=length_tolerance_s,
        device=device,
        progress=progress,
        combine=combine,
        stage=stage,
        weights=weights,
        leave_one_out=True,
    )
    assert ensemble is not None
    chance = chance_map(labels)

    def row(probabilities: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        scores = tagging_scores(probabilities, labels)
        mean_ap = float(scores["mAP"])
        figures = {
            "mAP": _json_float(mean_ap),
            "d_prime": _json_float(float(scores["d_prime"])),  # inf where every class ranks perfectly
            "gain_over_chance": _json_float(gain_over_chance(mean_ap, chance)),
        }
        return figures, scores

    ensemble_row, ensemble_scores = row(ensemble)
    ensemble_map = float(ensemble_scores["mAP"])
    members, maps = {}, {}
    for (name, probabilities), weight in zip(scored.items(), weights, strict=True):
        figures, scores = row(probabilities)
        maps[name] = float(scores["mAP"])
        figures.update(weight=weight, ensemble_without=None, effect=None)
        if name in without:
            without_map = float(tagging_scores(without[name], labels)["mAP"])
            figures["ensemble_without"] = _json_float(without_map)
            figures["effect"] = _json_float(ensemble_map - without_map)
        members[name] = figures
    # NaN (no class with positives) ranks last.
    best = max(maps, key=lambda n: maps[n] if math.isfinite(maps[n]) else -math.inf)
    table: dict[str, Any] = {
        "store": redact_url(store_url),
        "num_clips": len(store),
        "classes_with_positives": int((labels > 0.5).any(0).sum()),
        "num_classes": num_classes,
        "chance_mAP": _json_float(chance),
        "combine": combine,
        "teachers": members,
        "ensemble": ensemble_row,
        "best_member": best,
        "ensemble_over_best": _json_float(ensemble_map - maps[best]),
    }
    if output_dir is not None:
        write_per_class(output_dir, ensemble_scores, names)
    return table


def _json_float(value: float) -> float | None:
    """Rounded for the table; None for NaN and infinities, which strict JSON readers refuse."""
    return round(value, 6) if math.isfinite(value) else None


def weak_teachers(table: dict[str, Any], min_gain: float = MIN_GAIN_OVER_CHANCE) -> list[str]:
    """The rule `extract` refuses by: the teachers, and `ensemble`, whose mAP closes less than `min_gain` of
    the gap from chance to 1.0 (`gain_over_chance`; NaN counts as weak). Each member counts: a teacher near
    chance adds noise to every stored target even when the others carry the ensemble."""
    rows = {**table["teachers"], "ensemble": table["ensemble"]}
    return [
        name
        for name, figures in rows.items()
        if figures["gain_over_chance"] is None or not figures["gain_over_chance"] >= min_gain
    ]


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_teacher_table(table: dict[str, Any], min_gain: float | None = None) -> str:
    """The table `evaluate teacher=...` and `extract teacher_check.store=...` print: each teacher (its weight,
    figures, and the ensemble without it), the ensemble, then the ensemble against its best member and the
    members it would be better without (`ensemble_verdict`)."""
    weak = set(weak_teachers(table, min_gain)) if min_gain is not None else set()
    rows = [*table["teachers"].items(), (f"ensemble ({table['combine']})", table["ensemble"])]
    width = max(len("teacher"), *(len(name) for name, _ in rows))
    lines = [
        f"teachers on {table['store']}: {table['num_clips']} clips, {table['classes_with_positives']} of "
        f"{table['num_classes']} classes with positives; chance mAP {_fmt(table['chance_mAP'], 4)} "
        "(mean class prevalence)",
        f"  {'teacher':<{width}}  {'weight':>6}  {'mAP':>7}  {'d-prime':>7}  {'gain over chance':>16}  "
        f"{'ensemble without':>16}  {'effect':>7}",
    ]
    for name, figures in rows:
        key = "ensemble" if name.startswith("ensemble (") else name
        flag = f"  near chance (gain < {min_gain:g})" if key in weak else ""
        mean_ap, d_prime, gain, without = (
            _fmt(figures.get(field), digits)
            for field, digits in (
                ("mAP", 4),
                ("d_prime", 3),
                ("gain_over_chance", 3),
                ("ensemble_without", 4),
            )
        )
        weight = f"{figures['weight']:g}" if figures.get("weight") is not None else ""
        effect = f"{figures['effect']:+.4f}" if figures.get("effect") is not None else ""
        if key == "ensemble":
            without = ""
        lines.append(
            f"  {name:<{width}}  {weight:>6}  {mean_ap:>7}  {d_prime:>7}  {gain:>16}  {without:>16}  "
            f"{effect:>7}{flag}"
        )
    return "\n".join([*lines, *ensemble_verdict(table)])


def ensemble_verdict(table: dict[str, Any]) -> list[str]:
    """For two teachers or more: the ensemble's mAP against its best member's, and each member without which
    the ensemble scores higher (negative leave-one-out `effect`), with the override that drops it."""
    members = table["teachers"]
    best = table.get("best_member")
    if len(members) < 2 or best is None or table.get("ensemble_over_best") is None:
        return []
    over = table["ensemble_over_best"]
    lines = [
        f"ensemble against its best member ({best}, mAP {_fmt(members[best]['mAP'], 4)}): {over:+.4f}"
        + (" (below it)" if over < 0 else "")
    ]
    weights = [figures.get("weight", 1.0) for figures in members.values()]
    for i, (name, figures) in enumerate(members.items()):
        if figures.get("effect") is not None and figures["effect"] < 0:
            dropped = ",".join(f"{0 if j == i else w:g}" for j, w in enumerate(weights))
            lines.append(
                f"without {name} the ensemble scores {figures['ensemble_without']:.4f} "
                f"({-figures['effect']:+.4f}): lower its weight or drop it (teacher.weights=[{dropped}])"
            )
    return lines
