"""Tag audio files with a trained model: top-k labels per file, optionally a timeline per segment.

    python -m ced_lightning.predict ckpt=model.ckpt 'inputs=[clip.wav,folder/]' topk=5 output=tags.jsonl

Files of equal length (after resampling to 16 kHz) run as one batch. Clips of different lengths are not
zero-padded together by default: CED averages over all its time tokens, so padding would change a clip's
tags depending on which other files it was batched with (`length_tolerance_s` trades that for speed).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

import ced_lightning
from ced_lightning.audio import SAMPLE_RATE, AudioDecodeError, load_audio
from ced_lightning.data.sources import describe_extensions, scan_audio_files
from ced_lightning.labels import resolve_class_names

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- batching


def batches_by_length(lengths: Sequence[int], batch_size: int, tolerance: int = 0) -> list[list[int]]:
    """Group item indices into batches of at most `batch_size` whose lengths differ by at most `tolerance`.

    Items are sorted by length (ties keep input order), so with `tolerance=0` a batch only holds clips of
    exactly one length and needs no padding.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and lengths[i] - lengths[current[0]] <= tolerance:
            current.append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(waveforms: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack 1-D waveforms into `[B, max_samples]`, zero-padding the shorter ones at the end."""
    longest = max(w.shape[-1] for w in waveforms)
    return torch.stack([F.pad(w, (0, longest - w.shape[-1])) for w in waveforms])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.inference_mode()
def run_model(model: nn.Module, waveforms: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Probabilities `[B, C]` (float32, CPU) of one batch of 1-D waveforms."""
    batch = pad_batch(waveforms).to(device)
    return torch.sigmoid(model(batch).float()).cpu()


# --------------------------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Iterable[str | PathLike]) -> list[Path]:
    """Files as given, and the audio files found in folders (`scan_audio_files`: recursive, sorted, no
    dotfiles) in every format the installed libsndfile reads (`AUDIO_EXTENSIONS`, as `prepare`).

    A path that does not exist raises `FileNotFoundError` naming it: a typo should not silently tag nothing.
    A symlink that leads nowhere (dangling, or a loop) is kept, and fails as such when it is decoded.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = scan_audio_files(path)
            if not found:
                log.warning("inputs: %s contains no audio files (%s)", path, describe_extensions())
            files.extend(found)
        elif os.path.lexists(path):  # a symlink loop or dangling link too: its failure will say which
            files.append(path)
        else:
            raise FileNotFoundError(f"inputs: {path} does not exist")
    return files


# --------------------------------------------------------------------------------------------- tagging


@dataclass
class Failure:
    path: str
    reason: str


def _top(probs: torch.Tensor, k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
    values, indices = probs.topk(min(k, probs.shape[-1]))
    return [
        {"index": int(i), "name": class_names[int(i)], "probability": round(float(v), 6)}
        for v, i in zip(values, indices, strict=True)
    ]


def segment_starts(num_samples: int, segment: int, hop: int) -> list[int]:
    """Start samples of the timeline's segments: every `hop`, the last one ending at the clip's end.

    A clip shorter than one segment is a single segment (the whole clip).
    """
    if num_samples <= segment:
        return [0]
    starts = list(range(0, num_samples - segment + 1, hop))
    if starts[-1] + segment < num_samples:
        starts.append(num_samples - segment)
    return starts


def timeline(
    model: nn.Module,
    waveform: torch.Tensor,
    *,
    segment_seconds: float,
    hop_seconds: float,
    batch_size: int,
    device: torch.device,
) -> tuple[list[tuple[float, float]], torch.Tensor]:
    """Per-segment probabilities `[segments, C]` of one clip, and each segment's (start, end) in seconds."""
    segment = max(1, round(segment_seconds * SAMPLE_RATE))
    hop = max(1, round(hop_seconds * SAMPLE_RATE))
    starts = segment_starts(waveform.shape[-1], segment, hop)
    pieces = [waveform[s : s + segment] for s in starts]
    probs = torch.cat(
        [run_model(model, pieces[i : i + batch_size], device) for i in range(0, len(pieces), batch_size)]
    )
    spans = [(s / SAMPLE_RATE, (s + p.shape[-1]) / SAMPLE_RATE) for s, p in zip(starts, pieces, strict=True)]
    return spans, probs


def tag_files(
    model: nn.Module,
    paths: Sequence[str | PathLike],
    *,
    topk: int = 5,
    class_names: Sequence[str],
    batch_size: int = 8,
    length_tolerance_s: float = 0.0,
    timeline_segments: bool = False,
    segment_seconds: float = 1.0,
    hop_seconds: float = 1.0,
    device: torch.device | str | None = None,
    chunk_files: int = 256,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, Any]], list[Failure]]:
    """Tag `paths`; returns (results in input order, failures). A file that cannot be decoded, or on which the
    model fails (a failed batch is retried file by file), is a failure, never an exception, so one bad file
    does not stop the others.

    Each result: `{"file", "duration_s", "labels": [{"index", "name", "probability"}, ...]}` and, with
    `timeline_segments`, `"segments": [{"start_s", "end_s", "labels"}]` plus `"_segment_probs"` (tensor
    `[segments, C]`, for plotting; dropped when written out). Files are decoded `chunk_files` at a time
    so memory stays bounded for large folders.
    """
    if len(class_names) != int(model.num_classes):
        raise ValueError(f"{len(class_names)} class names for a model with {model.num_classes} classes")
    if segment_seconds <= 0 or hop_seconds <= 0:
        raise ValueError("segment_seconds and hop_seconds must be > 0")
    device = torch.device(device) if device is not None else default_device()
    model = model.to(device).eval()
    tolerance = max(0, round(length_tolerance_s * SAMPLE_RATE))
    results: list[dict[str, Any] | None] = [None] * len(paths)
    failures: list[Failure] = []
    for chunk_start in range(0, len(paths), chunk_files):
        chunk = range(chunk_start, min(chunk_start + chunk_files, len(paths)))
        loaded: dict[int, torch.Tensor] = {}
        for i in chunk:
            try:
                loaded[i] = load_audio(paths[i])
            except AudioDecodeError as err:
                failures.append(Failure(str(paths[i]), str(err)))
                log.error("cannot tag: %s", err)
                if on_progress:
                    on_progress(1)
        indices = list(loaded)

        def tag_batch(members: list[int], loaded: dict[int, torch.Tensor] = loaded) -> None:
            probs = run_model(model, [loaded[i] for i in members], device)
            tagged: dict[int, dict[str, Any]] = {}
            for i, p in zip(members, probs, strict=True):
                waveform = loaded[i]
                result: dict[str, Any] = {
                    "file": str(paths[i]),
                    "duration_s": round(waveform.shape[-1] / SAMPLE_RATE, 4),
                    "labels": _top(p, topk, class_names),
                }
                if timeline_segments:
                    spans, seg_probs = timeline(
                        model,
                        waveform,
                        segment_seconds=segment_seconds,
                        hop_seconds=hop_seconds,
                        batch_size=batch_size,
                        device=device,
                    )
                    result["segments"] = [
                        {"start_s": round(s, 4), "end_s": round(e, 4), "labels": _top(sp, topk, class_names)}
                        for (s, e), sp in zip(spans, seg_probs, strict=True)
                    ]
                    result["_segment_probs"] = seg_probs
                tagged[i] = result
            for i, result in tagged.items():  # all or none of a batch, so a retry never counts one twice
                results[i] = result
                if on_progress:
                    on_progress(1)

        def fail(i: int, err: Exception) -> None:
            failure = Failure(str(paths[i]), f"{paths[i]}: the model failed on it ({_first_line(err)})")
            failures.append(failure)
            log.error("cannot tag: %s", failure.reason)
            if on_progress:
                on_progress(1)

        for batch in batches_by_length([loaded[i].shape[-1] for i in indices], batch_size, tolerance):
            members = [indices[b] for b in batch]
            try:
                tag_batch(members)
            except Exception as err:  # one file (or its batch) failing must not cost the others their tags
                if len(members) == 1:
                    fail(members[0], err)
                    continue
                log.warning("a batch of %d files failed (%s); tagging them one by one", len(members), err)
                for i in members:
                    try:
                        tag_batch([i])
                    except Exception as single_err:
                        fail(i, single_err)
    return [r for r in results if r is not None], failures


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --------------------------------------------------------------------------------------------- outputs


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_results(path: str | PathLike, results: Sequence[dict[str, Any]]) -> None:
    """JSON lines (`.jsonl`/`.json`) or CSV (`.csv`: `file,start_s,end_s,rank,index,name,probability`,
    clip-level rows with empty start/end, then one block of rows per timeline segment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    _check_output_suffix(path)
    if suffix in (".jsonl", ".json"):
        with path.open("w", encoding="utf-8") as handle:
            for result in results:
                handle.write(json.dumps(_public(result), ensure_ascii=False) + "\n")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "start_s", "end_s", "rank", "index", "name", "probability"])
            for result in results:
                blocks = [("", "", result["labels"])]
                blocks += [(s["start_s"], s["end_s"], s["labels"]) for s in result.get("segments", [])]
                for start, end, labels in blocks:
                    for rank, label in enumerate(labels, start=1):
                        row = [result["file"], start, end, rank, label["index"], label["name"]]
                        writer.writerow([*row, label["probability"]])


def _check_output_suffix(path: Path) -> None:
    if path.suffix.lower() not in (".jsonl", ".json", ".csv"):
        raise ValueError(f"output={path}: use a .jsonl or .csv file name")


def plot_timeline(
    path: str | PathLike, result: dict[str, Any], class_names: Sequence[str], num_classes: int = 5
) -> None:
    """PNG of the clip's top classes' probabilities over time (one line per class, at segment centres)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = result["_segment_probs"]
    centres = [(s["start_s"] + s["end_s"]) / 2 for s in result["segments"]]
    top = [label["index"] for label in result["labels"][:num_classes]]
    fig, axis = plt.subplots(figsize=(max(6.0, min(20.0, 0.3 * len(centres))), 3.5), dpi=100)
    for c in top:
        axis.plot(centres, probs[:, c].tolist(), marker="o", markersize=3, label=class_names[c])
    axis.set_ylim(0.0, 1.0)
    axis.set_xlabel("time (s)")
    axis.set_ylabel("probability")
    axis.set_title(Path(result["file"]).name)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)  # outside: keep lines visible
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def timeline_png_name(index: int, file: str) -> str:
    # The index keeps names unique when two folders hold files of the same name.
    return f"{index:04d}_{Path(file).stem}.png"


# --------------------------------------------------------------------------------------------- entry point


def predict(cfg: DictConfig) -> list[Failure]:
    """The `predict` command without Hydra's wrapper: tag, write, plot; returns the failures."""
    from ced_lightning.models import load_checkpoint

    if OmegaConf.is_missing(cfg, "ckpt") or not cfg.get("ckpt"):
        raise ValueError("ckpt=PATH is required (a .ckpt of ours, a save_ced file or a released CED .pt)")
    inputs = cfg.get("inputs")
    if not inputs:
        raise ValueError("inputs=[FILE_OR_DIR,...] is required")
    if isinstance(inputs, str):
        inputs = [inputs]
    if cfg.topk < 1:
        raise ValueError(f"topk must be >= 1, got {cfg.topk}")
    if cfg.get("output"):
        _check_output_suffix(Path(cfg.output))  # before tagging, not after
    checkpoint = load_checkpoint(cfg.ckpt)
    model = checkpoint.model
    class_names = resolve_class_names(int(model.num_classes), checkpoint.class_names)
    files = expand_inputs(inputs)
    log.info("tagging %d files with %s", len(files), cfg.ckpt)

    kwargs = dict(
        topk=int(cfg.topk),
        class_names=class_names,
        batch_size=int(cfg.batch_size),
        length_tolerance_s=float(cfg.length_tolerance_s),
        timeline_segments=bool(cfg.timeline),
        segment_seconds=float(cfg.segment_seconds),
        hop_seconds=float(cfg.hop_seconds),
        device=None if cfg.device == "auto" else cfg.device,
    )
    if len(files) >= int(cfg.progress_min_files):
        from rich.progress import Progress

        with Progress(transient=True) as progress:
            task = progress.add_task("tagging", total=len(files))
            results, failures = tag_files(
                model, files, on_progress=lambda n: progress.advance(task, n), **kwargs
            )
    else:
        results, failures = tag_files(model, files, **kwargs)

    if cfg.get("output"):
        write_results(cfg.output, results)
        log.info("wrote %d results to %s", len(results), cfg.output)
    if cfg.timeline:
        folder = Path(cfg.timeline_dir)
        for i, result in enumerate(results):
            plot_timeline(folder / timeline_png_name(i, result["file"]), result, class_names, int(cfg.topk))
        log.info("wrote %d timeline charts to %s", len(results), folder)
    for result in results:
        tags = ", ".join(f"{label['name']} {label['probability']:.3f}" for label in result["labels"])
        print(f"{result['file']}: {tags}")
    if failures:
        log.error("%d of %d files could not be tagged", len(failures), len(files))
    return failures


@hydra.main(config_path=str(ced_lightning.conf_dir()), config_name="predict", version_base="1.3")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    if predict(cfg):
        # After every other file was tagged and written: scripts can still tell that something failed.
        raise SystemExit(1)


if __name__ == "__main__":
    main()
