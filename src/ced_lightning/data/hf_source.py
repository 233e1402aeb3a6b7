"""`prepare source=hf`: a Hugging Face `datasets` audio dataset as `prepare` input (the `datasets` extra).

    python -m ced_lightning.prepare source=hf input=DIR output=STORE [hf.split=train hf.label_column=label]
    HF_HUB_OFFLINE=1 python -m ced_lightning.prepare source=hf input=OWNER/NAME output=STORE

`input` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`hf.split` picks the
split of a DatasetDict), or a dataset name for `datasets.load_dataset` (from the local cache with
`HF_HUB_OFFLINE=1`). The audio column (an `Audio` feature) is read undecoded: each decoding process reads its
row's encoded file from the dataset's memory-mapped Arrow file and decodes it with the project's decoder, as
a file of a folder would be. Labels: a `ClassLabel` column (or a list of them) gives its class names as the
store's class list (or maps them onto `class_labels` when given); integer or text columns follow the file
list's rules (indices, mids or display names of `class_labels`, else AudioSet's).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any

from ced_lightning.core.errors import ConfigError, InputError, MissingInputError
from ced_lightning.core.labels import ClassList, audioset_classes
from ced_lightning.data.sources import SourceItem, SourceList, parse_labels

INSTALL_HINT = "pip install 'ced-lightning[datasets]'"


@lru_cache(maxsize=8)
def _arrow_table(filename: str) -> Any:
    import pyarrow as pa

    with pa.memory_map(filename) as source:  # datasets' cache files are Arrow IPC streams
        return pa.ipc.open_stream(source).read_all()


@dataclass(frozen=True)
class ArrowRow:
    """The encoded audio file of one row of a dataset's Arrow file (read in the decoding process)."""

    filename: str
    row: int
    column: str

    def __call__(self) -> bytes:
        value = _arrow_table(self.filename).column(self.column)[self.row].as_py()
        return value["bytes"]


def _load(location: str, split: str | None) -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ConfigError(f"source=hf needs the `datasets` package ({INSTALL_HINT})") from err
    if Path(location).is_dir():
        loaded = datasets.load_from_disk(location)
    else:
        try:
            loaded = datasets.load_dataset(location, split=split)
        except Exception as err:  # datasets raises its own errors for unknown names and missing caches
            raise MissingInputError(
                f"input={location}: neither a saved dataset folder nor a dataset datasets.load_dataset "
                f"finds ({type(err).__name__}: {err})"
            ) from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ConfigError(f"hf.split={split!r}: {location} has the splits {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def _row_files(dataset: Any, location: str) -> list[tuple[str, int]]:
    """(Arrow file, first row) of each file the dataset's rows are stored in, in row order."""
    if getattr(dataset, "_indices", None) is not None:
        raise InputError(
            f"input={location}: the dataset has an indices mapping (select/shuffle): "
            "call `.flatten_indices()` before `save_to_disk`"
        )
    files, first = [], 0
    for cache_file in dataset.cache_files:
        files.append((cache_file["filename"], first))
        first += _arrow_table(cache_file["filename"]).num_rows
    if first != len(dataset):
        raise InputError(f"input={location}: its Arrow files hold {first} rows, the dataset {len(dataset)}")
    return files


def _class_names(feature: Any) -> list[str] | None:
    names = getattr(feature, "names", None)
    if names is None and hasattr(feature, "feature"):  # List / Sequence of ClassLabel
        names = getattr(feature.feature, "names", None)
    return list(names) if names is not None else None


def from_hf_dataset(
    location: str | os.PathLike,
    class_list: ClassList | None = None,
    *,
    split: str | None = "train",
    audio_column: str = "audio",
    label_column: str | None = "label",
) -> SourceList:
    """Every row of the dataset, in order: name = the audio's file name without extension (the row number
    when rows have none or share one), labels from `label_column` (None: no labels)."""
    import datasets

    location = str(location)
    dataset = _load(location, split)
    columns = list(dataset.column_names)
    for key, column in (("audio_column", audio_column), ("label_column", label_column)):
        if column is not None and column not in columns:
            raise ConfigError(f"hf.{key}={column!r}: {location} has the columns {columns}")
    if not isinstance(dataset.features[audio_column], datasets.Audio):
        raise InputError(
            f"hf.audio_column={audio_column!r} of {location} is {dataset.features[audio_column]!r}, not an "
            "Audio feature (`dataset.cast_column(name, datasets.Audio())` encodes arrays and paths)"
        )
    if len(dataset) == 0:
        raise MissingInputError(f"input={location}: the dataset has no rows")
    audio = dataset.data.column(audio_column).combine_chunks()
    paths = audio.field("path").to_pylist()
    has_bytes = audio.field("bytes").is_valid().to_pylist()
    stems = [str(PurePosixPath(p).with_suffix("")).lstrip("/") if p else None for p in paths]
    by_path = None not in stems and len(set(stems)) == len(stems)
    width = len(str(len(dataset) - 1))
    row_files = _row_files(dataset, location)
    items: list[SourceItem] = []
    for row, (path, stored) in enumerate(zip(paths, has_bytes)):
        name = stems[row] if by_path else str(row).zfill(width)
        if stored:
            filename, first = next((f, s) for f, s in reversed(row_files) if s <= row)
            address = f"{location}[{row}]:{PurePosixPath(path).name if path else ''}"
            items.append(SourceItem(name, address, blob=ArrowRow(filename, row - first, audio_column)))
        elif path:  # an Audio feature that stores a path only: the file itself
            items.append(SourceItem(name, path))
        else:
            raise InputError(f"{location}[{row}]: the {audio_column!r} column holds neither bytes nor a path")
    if label_column is None:
        return SourceList(items=items, class_list=None, kind="hf_dataset")
    names = _class_names(dataset.features[label_column])
    values = dataset.data.column(label_column).to_pylist()
    classes = class_list
    if names is not None and class_list is None:
        classes = ClassList(tuple(names), tuple(names))
    elif classes is None:
        classes = audioset_classes()
    labelled = []
    for row, (item, value) in enumerate(zip(items, values)):
        listed = value if isinstance(value, list) else [value]
        if names is not None:
            listed = [names[v] for v in listed]  # ClassLabel integers -> their names
        text = ";".join(str(v) for v in listed if v is not None)
        labels = parse_labels(
            text, classes, class_list is not None or names is not None, f"{location}[{row}]"
        )
        labelled.append(SourceItem(item.name, item.path, labels, item.blob))
    return SourceList(items=labelled, class_list=classes, kind="hf_dataset")
