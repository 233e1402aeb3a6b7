"""Inputs of `prepare`: an audio directory, a file list, or AudioSet segment CSVs matched to downloaded audio.

Each becomes a `SourceList`: the clips to decode (`SourceItem`: name, path, class indices or None), the class
list when the input has labels, and the segment-list rows that had no audio file.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ced_lightning.core.audio import AUDIO_EXTENSIONS, NO_LIBSNDFILE_DECODER
from ced_lightning.core.errors import ConfigError, InputError, MissingInputError
from ced_lightning.core.ffmpeg_audio import INSTALL_HINT as FFMPEG_INSTALL_HINT
from ced_lightning.core.labels import ClassList, audioset_classes, read_class_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceItem:
    name: str
    path: str
    labels: list[int] | None = None
    # The file's bytes where it is not a file of its own (a tar member, a dataset row): a picklable callable
    # run in the decoding process, `path` then only names it in messages. None: decode the file at `path`.
    blob: Callable[[], bytes] | None = None


@dataclass
class SourceList:
    items: list[SourceItem]
    class_list: ClassList | None = None
    # Segment-list rows with no audio file, as "file:line YTID" strings.
    unmatched: list[str] = field(default_factory=list)
    kind: str = "directory"


def describe_extensions(extensions: Sequence[str] = AUDIO_EXTENSIONS) -> str:
    """The audio extensions for messages: all of a short list, the common ones of libsndfile's long one."""
    if len(extensions) <= 6:
        return ", ".join(extensions)
    common = [e for e in (".wav", ".flac", ".ogg", ".mp3", ".aiff") if e in extensions]
    return f"any format libsndfile reads: {', '.join(common)}, ... ({len(extensions)} extensions)"


def scan_audio_files(root: str | os.PathLike, extensions: Iterable[str] = AUDIO_EXTENSIONS) -> list[Path]:
    """Files under `root` whose names end in one of `extensions` (any case): recursive, sorted, following
    symlinked folders.

    Dotfiles are skipped: macOS leaves `._name.wav` AppleDouble metadata next to copied audio, which has the
    audio's extension but does not decode. A folder reached a second time through a symlink (a loop, or two
    links to one folder) is scanned once. Folders that cannot be read and files left out (other extensions,
    dotfiles) are logged as warnings with their count and examples.
    """
    suffixes = tuple(e.lower() for e in extensions)
    found: list[Path] = []
    left_out: list[str] = []
    unreadable: list[OSError] = []
    visited: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, onerror=unreadable.append, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in visited:
            log.warning("%s: scanned already through another path (a symlink); skipped", folder)
            dirs[:] = []
            continue
        visited.add((stat.st_dev, stat.st_ino))
        dirs.sort()  # which path of a folder linked twice is kept must not depend on the file system
        for name in files:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                found.append(Path(folder) / name)
            else:
                left_out.append(os.path.join(folder, name))
    if unreadable:
        log.warning(
            "%s: %d folders could not be read and were skipped, e.g. %s",
            root,
            len(unreadable),
            "; ".join(f"{err.filename}: {err.strerror or err}" for err in unreadable[:5]),
        )
    if left_out:
        log.warning(
            "%s: %d files are not audio files by their extension (or are dotfiles) and were skipped, e.g. %s "
            "(audio: %s)",
            root,
            len(left_out),
            ", ".join(sorted(left_out)[:5]),
            describe_extensions(suffixes),
        )
        undecodable: dict[str, int] = {}
        for name in left_out:
            suffix = os.path.splitext(name)[1].lower()
            if suffix in NO_LIBSNDFILE_DECODER and not os.path.basename(name).startswith("."):
                undecodable[suffix] = undecodable.get(suffix, 0) + 1
        if undecodable:  # audio, but in a container libsndfile cannot read: say what to do about it
            log.warning(
                "%s: %s files are audio libsndfile cannot decode (no version reads them); install the "
                "FFmpeg decoder (`%s`) or convert them first, e.g. `ffmpeg -i NAME%s -ac 1 -ar 16000 "
                "NAME.flac`",
                root,
                ", ".join(f"{count} {suffix}" for suffix, count in sorted(undecodable.items())),
                FFMPEG_INSTALL_HINT,
                next(iter(sorted(undecodable))),
            )
    return sorted(found)


def from_directory(root: str | os.PathLike) -> SourceList:
    """Every audio file under `root` (recursively, sorted); name = relative path without extension."""
    base = Path(root)
    if not base.is_dir():
        raise MissingInputError(f"input={root}: not a directory")
    items = [
        SourceItem(name=p.relative_to(base).with_suffix("").as_posix(), path=str(p), labels=None)
        for p in scan_audio_files(base)
    ]
    if not items:
        raise MissingInputError(f"input={root}: no audio files ({describe_extensions()}) under it")
    return SourceList(items=items, class_list=None, kind="directory")


def from_class_folders(root: str | os.PathLike) -> SourceList:
    """A folder per class (`root/<class>/**/<clip>.wav`, torchvision's ImageFolder layout): each clip's one
    label is the folder under `root` that holds it; the classes are those folders' names, sorted (their
    index order), empty ones included. Every audio file must lie inside a class folder."""
    base = Path(root)
    if not base.is_dir():
        raise MissingInputError(f"input={root}: labels=folders needs a directory with a folder per class")
    files = scan_audio_files(base)
    loose = [p for p in files if len(p.relative_to(base).parts) < 2]
    if loose:
        raise InputError(
            f"{loose[0]}: labels=folders takes each clip's class from the folder under input={root} that "
            f"holds it, and this file lies in input itself ({len(loose)} such files); move it into its "
            "class's folder"
        )
    if not files:
        raise MissingInputError(f"input={root}: no audio files ({describe_extensions()}) in class folders")
    # Every class folder counts, an empty one too: splits prepared one by one then share one class list.
    classes = sorted(
        {p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")}
        | {p.relative_to(base).parts[0] for p in files}
    )
    index = {name: i for i, name in enumerate(classes)}
    items = [
        SourceItem(
            name=p.relative_to(base).with_suffix("").as_posix(),
            path=str(p),
            labels=[index[p.relative_to(base).parts[0]]],
        )
        for p in files
    ]
    return SourceList(items=items, class_list=ClassList(tuple(classes), tuple(classes)), kind="class_folders")


def _sniff_delimiter(header: str, path: str | os.PathLike) -> str:
    # The labels column may itself hold "," or ";" separated values, so count on the header line alone.
    for delimiter in ("\t", ",", ";"):
        if delimiter in header:
            return delimiter
    if header.strip():
        return ","  # a single column (filename only)
    raise InputError(f"{path}: empty file list (expected a header with a `filename` column)")


def parse_labels(text: str, classes: ClassList | None, class_labels_given: bool, where: str) -> list[int]:
    """Class indices, mids or display names separated by `;` or `,` (a display name may hold a comma:
    "Male speech, man speaking" is read whole)."""
    known: dict[str, int] = {}
    if classes is not None:
        for i, (mid, name) in enumerate(zip(classes.mids, classes.names, strict=True)):
            known.setdefault(mid, i)
            known.setdefault(name, i)
    labels: list[int] = []
    for group in text.split(";"):
        parts = [p.strip() for p in group.split(",")]
        i = 0
        while i < len(parts):
            if not parts[i]:
                i += 1
                continue
            if parts[i].lstrip("-").isdigit():
                labels.append(_class_index(int(parts[i]), classes, where))
                i += 1
                continue
            # The longest run of comma-separated parts that names a class.
            end = next((j for j in range(len(parts), i, -1) if ", ".join(parts[i:j]) in known), None)
            if end is None:
                source = "the class_labels list" if class_labels_given else "AudioSet's class list"
                hint = "" if class_labels_given else " (pass class_labels=<index,mid,display_name CSV>)"
                raise InputError(
                    f"{where}: unknown class {parts[i]!r}: not an index, mid or display name of "
                    f"{source}{hint}"
                )
            labels.append(known[", ".join(parts[i:end])])
            i = end
    return labels


def _class_index(index: int, classes: ClassList | None, where: str) -> int:
    if classes is not None and not 0 <= index < len(classes):
        raise InputError(f"{where}: class index {index} outside 0..{len(classes) - 1}")
    if index < 0:
        raise InputError(f"{where}: negative class index {index}")
    return index


def from_file_list(path: str | os.PathLike, class_list: ClassList | None = None) -> SourceList:
    """A CSV/TSV with a `filename` column (relative to the list's folder, or absolute) and optional `labels`.

    Labels are class indices, mids or display names, separated by `;` or `,`. Without `class_list`, mids
    and names resolve against AudioSet's classes, and pure indices get AudioSet's class list if they fit.
    """
    list_path = Path(path)
    with open(list_path, encoding="utf-8", newline="") as handle:
        text = handle.read()
    header = text.splitlines()[0] if text else ""
    reader = csv.DictReader(
        text.splitlines(), delimiter=_sniff_delimiter(header, path), skipinitialspace=True
    )
    fields = [f.strip() for f in (reader.fieldnames or [])]
    reader.fieldnames = fields
    if "filename" not in fields:
        raise InputError(f"{path}: no `filename` column (columns: {fields})")
    has_labels = "labels" in fields
    classes = class_list if class_list is not None else (audioset_classes() if has_labels else None)
    items: list[SourceItem] = []
    for line, row in enumerate(reader, start=2):
        filename = (row.get("filename") or "").strip()
        if not filename:
            raise InputError(f"{path}:{line}: empty filename")
        file_path = Path(filename) if Path(filename).is_absolute() else list_path.parent / filename
        name = Path(filename).with_suffix("").as_posix().lstrip("/")
        text_labels = row.get("labels") or ""
        if None in row:  # more fields than columns: csv keeps the extra ones under the key None
            if not (has_labels and fields[-1] == "labels"):
                raise InputError(
                    f"{path}:{line}: {len(fields) + len(row[None])} fields for {len(fields)} columns {fields}"
                )
            # An unquoted "a.wav,/m/01,/m/02" with labels last: the extra fields are more labels.
            text_labels = ",".join([text_labels, *row[None]])
        where = f"{path}:{line}"
        labels = parse_labels(text_labels, classes, class_list is not None, where) if has_labels else None
        items.append(SourceItem(name=name, path=str(file_path), labels=labels))
    if not items:
        raise InputError(f"{path}: the file list has a header but no rows")
    return SourceList(items=items, class_list=classes, kind="file_list")


def _number_variants(text: str) -> dict[str, str]:
    # Per style: "30.000" as written, "30" as an integer, "30.0" as Python prints it, "30000" in milliseconds.
    text = text.strip()
    variants = {"written": text}
    try:
        value = float(text)
    except ValueError:
        return variants
    if value.is_integer():
        variants["integer"] = str(int(value))
    variants["python"] = repr(value)
    variants["ms"] = str(round(value * 1000))
    return variants


def _segment_candidates(ytid: str, start: str, end: str) -> list[str]:
    starts, ends = _number_variants(start), _number_variants(end)
    stems = [ytid]
    stems.extend(f"{ytid}_{s}" for s in starts.values())
    # Start and end written in the same style: `_30_40`, `_30.000_40.000`.
    stems.extend(f"{ytid}_{starts[k]}_{ends[k]}" for k in starts if k in ends)
    stems = list(dict.fromkeys(stems))
    return stems + [f"Y{stem}" for stem in stems]


_YTID_LENGTH = 11
_YTID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_SEGMENT_TIMES = re.compile(r"\d+(\.\d+)?(_\d+(\.\d+)?)?")


def segment_ytid(stem: str) -> str | None:
    """The YouTube id in a file stem named in any convention `_segment_candidates` accepts, or None.

    The inverse of `_segment_candidates`: `YTID`, `YTID_<start>`, `YTID_<start>_<end>` (any number style),
    each with or without a leading `Y`. YouTube ids are 11 characters, which makes the `Y` unambiguous.
    """
    for offset in (0, 1):
        if offset and not stem.startswith("Y"):
            break
        ytid, rest = stem[offset : offset + _YTID_LENGTH], stem[offset + _YTID_LENGTH :]
        if len(ytid) != _YTID_LENGTH or not set(ytid) <= _YTID_CHARS:
            continue
        if not rest or (rest[0] == "_" and _SEGMENT_TIMES.fullmatch(rest[1:])):
            return ytid
    return None


def index_audio_dir(audio_dir: str | os.PathLike) -> dict[str, str]:
    """Stem -> path of every audio file under `audio_dir` (first in sorted order wins on duplicates)."""
    root = Path(audio_dir)
    if not root.is_dir():
        raise MissingInputError(f"audio_dir={audio_dir}: not a directory")
    index: dict[str, str] = {}
    duplicates = 0
    for file in scan_audio_files(root):
        stem = file.name.rsplit(".", 1)[0]
        if stem in index:
            duplicates += 1
            continue
        index[stem] = str(file)
    if duplicates:
        log.warning(
            "audio_dir=%s: %d files share a name with another (kept the first of each)", root, duplicates
        )
    return index


def read_segment_csv(path: str | os.PathLike) -> list[tuple[int, str, str, str, list[str]]]:
    """Rows of an AudioSet segment CSV: (line number, YTID, start, end, [mid, ...])."""
    rows: list[tuple[int, str, str, str, list[str]]] = []
    with open(path, encoding="utf-8", newline="") as handle:
        lines = list(handle)
    for line_no, fields in zip(
        (n for n, text in enumerate(lines, 1) if text.strip() and not text.startswith("#")),
        csv.reader(
            (text for text in lines if text.strip() and not text.startswith("#")),
            skipinitialspace=True,
        ),
        strict=True,
    ):
        if len(fields) < 4:
            raise InputError(
                f'{path}:{line_no}: expected `YTID, start_seconds, end_seconds, "mid,mid"`, got {fields}'
            )
        ytid, start, end = (f.strip() for f in fields[:3])
        mids = [m.strip() for m in ",".join(fields[3:]).split(",") if m.strip()]
        rows.append((line_no, ytid, start, end, mids))
    return rows


def from_segment_csv(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    audio_dir: str | os.PathLike,
    class_list: ClassList | None = None,
) -> SourceList:
    """AudioSet segment CSV rows matched to files in `audio_dir` (indexed once); name = YTID."""
    csv_paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    classes = class_list if class_list is not None else audioset_classes()
    mid_index = classes.index_of_mid()
    files = index_audio_dir(audio_dir)
    items: list[SourceItem] = []
    unmatched: list[str] = []
    for csv_path in csv_paths:
        for line_no, ytid, start, end, mids in read_segment_csv(csv_path):
            labels = []
            for mid in mids:
                if mid not in mid_index:
                    hint = (
                        "class_labels" if class_list is not None else "AudioSet's (pass class_labels=<CSV>)"
                    )
                    raise InputError(
                        f"{csv_path}:{line_no} ({ytid}): unknown class mid {mid!r}; it is not in the class "
                        f"list of {hint}"
                    )
                labels.append(mid_index[mid])
            match = next((files[s] for s in _segment_candidates(ytid, start, end) if s in files), None)
            if match is None:
                unmatched.append(f"{csv_path}:{line_no} {ytid}")
                continue
            items.append(SourceItem(name=ytid, path=match, labels=labels))
    if unmatched:
        example = _segment_candidates("<YTID>", "30.000", "40.000")
        log.warning(
            "%d of %d segment rows have no audio file in audio_dir=%s, e.g. %s. Names tried (any of %s): %s",
            len(unmatched),
            len(unmatched) + len(items),
            audio_dir,
            "; ".join(unmatched[:5]),
            describe_extensions(),
            ", ".join(example),
        )
    return SourceList(items=items, class_list=classes, unmatched=unmatched, kind="audioset_segments")


def _looks_like_segment_csv(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for text in handle:
            if text.startswith("#"):
                if "YTID" in text:
                    return True
                continue
            return False
    return False


def read_source(
    input: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    audio_dir: str | os.PathLike | None = None,
    class_labels: str | os.PathLike | None = None,
) -> SourceList:
    """Dispatch on the input: a directory, AudioSet segment CSV(s) (with `audio_dir`), or a file list."""
    class_list = read_class_labels(class_labels) if class_labels else None
    inputs = [input] if isinstance(input, str | os.PathLike) else list(input)
    if not inputs:
        raise ConfigError("input: nothing given (a directory, a file list or AudioSet segment CSVs)")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise MissingInputError(f"input={p}: no such file or directory")
    if len(paths) == 1 and paths[0].is_dir():
        return from_directory(paths[0])
    if all(p.is_file() and _looks_like_segment_csv(p) for p in paths):
        if audio_dir is None:
            raise ConfigError(
                f"input={inputs[0]} is an AudioSet segment CSV: also pass audio_dir=<downloaded audio>"
            )
        return from_segment_csv(paths, audio_dir, class_list)
    if len(paths) == 1 and paths[0].is_file():
        return from_file_list(paths[0], class_list)
    raise ConfigError(f"input={inputs}: expected one directory, one file list, or AudioSet segment CSVs")
