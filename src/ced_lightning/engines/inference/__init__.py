"""The inference engine under `predict`, `ced-predict` and the Python API: audio files streamed window by
window through a model, the windows batched, and the results handed to pluggable outputs as they are made.

- `windows`: the model's piece length, window starts, cutting windows from a decoded stream, one batch
  through the model, `PieceAverage` (a file's windows combined by the model's rule for long clips).
- `writers`: `PredictionSink` (the one interface the tagger calls; a new output is one subclass), the clip
  tags, per-window tags and per-window embeddings writers.
- `charts`: the per-file timeline PNGs (matplotlib).
- `events`: sound events from a CED's frame outputs over the whole file (`EventsWriter`).
- `tagger`: `tag_files`, the streaming scheduler over a loaded model.
- `files`: `expand_inputs` and `predict_files`, a checkpoint and paths to written outputs.
"""

from ced_lightning.engines.inference.charts import TimelineCharts, plot_timeline, timeline_png_name
from ced_lightning.engines.inference.events import (
    EventSettings,
    EventsWriter,
    file_events,
    frame_probabilities,
)
from ced_lightning.engines.inference.files import (
    OUTPUTS,
    OutputPlan,
    check_model_argument,
    expand_inputs,
    predict_files,
)
from ced_lightning.engines.inference.tagger import Failure, tag_files
from ced_lightning.engines.inference.windows import (
    DECODE_BLOCK_FRAMES,
    PieceAverage,
    check_windows,
    model_piece_samples,
    run_model,
    segment_starts,
    stream_windows,
    window_samples,
)
from ced_lightning.engines.inference.writers import (
    CSV_COLUMNS,
    EMBEDDINGS_FORMATS,
    EmbeddingsWriter,
    PredictionSink,
    TagsWriter,
    WindowBatch,
    WindowsWriter,
    check_table_suffix,
    is_table_we_wrote,
    output_name,
    top_labels,
)

__all__ = [
    "CSV_COLUMNS",
    "DECODE_BLOCK_FRAMES",
    "EMBEDDINGS_FORMATS",
    "OUTPUTS",
    "EmbeddingsWriter",
    "EventSettings",
    "EventsWriter",
    "Failure",
    "OutputPlan",
    "PieceAverage",
    "PredictionSink",
    "TagsWriter",
    "TimelineCharts",
    "WindowBatch",
    "WindowsWriter",
    "check_model_argument",
    "check_table_suffix",
    "check_windows",
    "expand_inputs",
    "file_events",
    "frame_probabilities",
    "is_table_we_wrote",
    "model_piece_samples",
    "output_name",
    "plot_timeline",
    "predict_files",
    "run_model",
    "segment_starts",
    "stream_windows",
    "tag_files",
    "timeline_png_name",
    "top_labels",
    "window_samples",
]
