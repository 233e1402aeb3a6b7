"""`ced-predict`: tag audio files from the shell with plain arguments, without a run folder.

    ced-predict clip.wav folder/ --model ced_mini --top-k 3
    ced-predict long.flac --model model.ckpt --outputs tags windows --windows-output w.csv --hop-seconds 5
    ced-predict *.wav --model ced_tiny --output - > tags.jsonl
    ced-predict street.wav --model ced_mini --events events.csv --event-threshold 0.3 --median-window 5

Tags are printed to stdout (or written as JSON lines to stdout with `--output -`), logs go to stderr, and
nothing is written anywhere else unless asked for. The exit status is 1 when any file could not be tagged
(the others are still tagged and written), 2 for bad arguments. The same work as
`python -m ced_lightning.predict` (`engines.inference.predict_files`); the Hydra commands stay for everything
configurable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ced_lightning.engines.inference import EMBEDDINGS_FORMATS, OUTPUTS
from ced_lightning.engines.inference.events import EventSettings, parse_thresholds
from ced_lightning.models import QUANTIZE_CHOICES


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ced-predict",
        description="Tag audio files (any format libsndfile reads; folders searched recursively) with a "
        "checkpoint of this project or a released CED, in windows, memory bounded.",
    )
    parser.add_argument("files", nargs="+", help="audio files and folders")
    parser.add_argument(
        "--model",
        "-m",
        required=True,
        help="a checkpoint (.ckpt of ours, save_ced file, released .pt or Hub model.safetensors) or a "
        "released model's name: ced_tiny, ced_mini, ced_small, ced_base (downloaded once, then cached)",
    )
    parser.add_argument("--top-k", "-k", type=int, default=5, help="classes per file and window (default 5)")
    parser.add_argument(
        "--segment-seconds",
        type=float,
        default=None,
        help="window length (default: the model's own piece, 10.12 s for CED)",
    )
    parser.add_argument("--hop-seconds", type=float, default=None, help="window step (default: the length)")
    parser.add_argument(
        "--outputs",
        nargs="+",
        choices=OUTPUTS,
        default=["tags"],
        help="tags: one row per file; windows: per-window tags (a timeline); embeddings: per window",
    )
    parser.add_argument(
        "--output",
        "-o",
        default=None,
        help="clip tags to FILE.jsonl or FILE.csv, or - for JSON lines on stdout (default: printed as text)",
    )
    parser.add_argument(
        "--windows-output", default=None, help="with --outputs windows: FILE.csv or FILE.jsonl"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --output or --windows-output file that ced-predict did not write (its own "
        "earlier output is replaced without it)",
    )
    parser.add_argument("--timeline-dir", default=None, help="with --outputs windows: one PNG per file here")
    parser.add_argument(
        "--embeddings-output", default=None, help="with --outputs embeddings: a folder (npy) or a Zarr store"
    )
    parser.add_argument("--embeddings-format", choices=EMBEDDINGS_FORMATS, default="npy")
    parser.add_argument(
        "--events",
        default=None,
        metavar="FILE",
        help="sound events (onset, offset, label, score) of every file from a CED's 160 ms frame outputs to "
        "FILE.csv, .tsv or .jsonl",
    )
    parser.add_argument(
        "--event-threshold",
        type=parse_thresholds,
        default=0.5,
        help="with --events: probability above which a frame is active, one value or one per class as a "
        "comma list (default 0.5)",
    )
    parser.add_argument(
        "--median-window", type=int, default=1, help="with --events: median filter length in frames (odd)"
    )
    parser.add_argument(
        "--fill-gap", type=int, default=0, help="with --events: bridge gaps of up to this many frames"
    )
    parser.add_argument(
        "--min-frames", type=int, default=1, help="with --events: drop events shorter than this many frames"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per model call (default 8)")
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    parser.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, default=None, help="int8: linear layers in dynamic int8 (CPU)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="log only errors")
    return parser


def predict_main(argv: Sequence[str] | None = None) -> int:
    """`ced-predict`: returns the exit status (0 all tagged, 1 some files failed or an input cannot be used,
    2 bad arguments)."""
    parser = predict_parser()
    args = parser.parse_args(argv)
    if "windows" in args.outputs and not args.windows_output:
        parser.error("--outputs windows: give --windows-output FILE.csv (or .jsonl)")
    if "embeddings" in args.outputs and not args.embeddings_output:
        parser.error("--outputs embeddings: give --embeddings-output FOLDER (npy) or STORE (zarr)")
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO,
        format="[%(levelname)s] %(message)s",
        stream=sys.stderr,
    )
    import torch

    from ced_lightning.core.errors import CedError
    from ced_lightning.engines.inference import predict_files
    from ced_lightning.engines.launch import error_line, full_errors_wanted

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    try:
        failures = predict_files(
            args.model,
            args.files,
            topk=args.top_k,
            outputs=args.outputs,
            output=args.output,
            windows_output=args.windows_output,
            embeddings_output=args.embeddings_output,
            embeddings_format=args.embeddings_format,
            timeline_dir=args.timeline_dir,
            segment_seconds=args.segment_seconds,
            hop_seconds=args.hop_seconds,
            batch_size=args.batch_size,
            device=args.device,
            quantize=args.quantize,
            progress_min_files=20 if sys.stderr.isatty() else sys.maxsize,
            overwrite=args.overwrite,
            events_output=args.events,
            event_settings=EventSettings(
                args.event_threshold, args.median_window, args.fill_gap, args.min_frames
            ),
        )
    except CedError as err:  # raised on purpose: one line, no traceback (HYDRA_FULL_ERROR=1 shows it)
        if full_errors_wanted():
            raise
        print(error_line(parser.prog, err), file=sys.stderr)
        return err.exit_code
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(predict_main())
