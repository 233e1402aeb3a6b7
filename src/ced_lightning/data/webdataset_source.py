"""`prepare source=webdataset`: a WebDataset tar shard set as `prepare` input.

    python -m ced_lightning.prepare source=webdataset 'input=shards/train-{000000..000099}.tar' output=STORE

WebDataset's layout: each sample is the tar members sharing a key (the member's path up to the first dot of
its file name), one member per field named by the rest (`clip7.flac`, `clip7.cls`, `clip7.json`). The audio
member is the sample's first member whose extension is audio (or `webdataset.audio_key`); labels come from a
`.cls` member (class indices as text: WebDataset's convention) or a field of the `.json` member. Shards are
indexed once (member offsets); each decoding process reads its member's bytes at their offset, so a sample is
never extracted to disk. Names are the keys, labels go through the file list's rules (indices, mids or display
names of `class_labels`, else AudioSet's).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ced_lightning.core.audio import AUDIO_EXTENSIONS
from ced_lightning.core.errors import ConfigError, InputError, MissingInputError
from ced_lightning.core.labels import ClassList, audioset_classes
from ced_lightning.data.sources import SourceItem, SourceList, parse_labels

LABEL_KEYS = ("cls", "json")


@dataclass(frozen=True)
class TarMember:
    """The bytes of one member of a tar file (read in the decoding process; picklable)."""

    shard: str
    offset: int
    size: int

    def __call__(self) -> bytes:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise InputError(f"{self.shard}: member at byte {self.offset} cut short (the shard is truncated)")
        return data


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """Shard names of a WebDataset pattern: `{000000..000003}` ranges (zero-padded to the first bound's
    width) and `{a,b}` alternatives, in order, any number of each."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numbers = _RANGE.fullmatch(match.group(0))
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    return [name for choice in choices for name in expand_braces(f"{head}{choice}{tail}")]


def split_member_name(name: str) -> tuple[str, str]:
    """(key, field) of a member name as WebDataset splits it: the folder and the file name up to its first
    dot are the key, the rest is the field (`a/b/x.seg1.flac` -> (`a/b/x`, `seg1.flac`))."""
    folder, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (field if dot else "")


def _samples(shard: str) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """The shard's samples in order: (key, {field: member}); members of one key must be consecutive."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile() or Path(member.name).name.startswith("."):
                    continue
                key, field = split_member_name(member.name)
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][field.lower()] = member
    except (tarfile.TarError, OSError) as err:
        raise InputError(f"{shard}: not a readable tar shard ({err})") from err
    return samples


def _read_member(shard: str, member: tarfile.TarInfo) -> bytes:
    return TarMember(shard, member.offset_data, member.size)()


def _label_text(
    shard: str, key: str, fields: dict[str, tarfile.TarInfo], label_key: str, json_field: str
) -> str | None:
    """The sample's labels as text for `parse_labels`, or None when it has no label member."""
    member = fields.get(label_key)
    if member is None:
        return None
    text = _read_member(shard, member).decode("utf-8").strip()
    if label_key == "cls":
        return text
    try:
        value = json.loads(text)[json_field]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise InputError(
            f"{shard}:{key}.json: no `{json_field}` field in its JSON object (webdataset.json_field)"
        ) from err
    values = value if isinstance(value, list) else [value]
    return ";".join(str(v) for v in values)


def from_webdataset(
    pattern: str | os.PathLike,
    class_list: ClassList | None = None,
    *,
    audio_key: str | None = None,
    label_key: str | None = "cls",
    json_field: str = "label",
) -> SourceList:
    """Every sample of the shards `pattern` names (brace ranges expanded), in shard and member order."""
    if label_key is not None and label_key not in LABEL_KEYS:
        raise ConfigError(f"webdataset.label_key={label_key!r}: expected one of {LABEL_KEYS} or null")
    shards = expand_braces(str(pattern))
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise MissingInputError(
            f"input={pattern}: {len(missing)} of {len(shards)} shards do not exist, e.g. {missing[0]}"
        )
    audio_fields = {e.lstrip(".") for e in AUDIO_EXTENSIONS}
    items: list[SourceItem] = []
    texts: list[str | None] = []
    for shard in shards:
        for key, fields in _samples(shard):
            if audio_key is not None:
                field = audio_key if audio_key in fields else None
            else:
                field = next((f for f in fields if f.rsplit(".", 1)[-1] in audio_fields), None)
            if field is None:
                wanted = f"`{audio_key}`" if audio_key else "an audio"
                raise InputError(
                    f"{shard}: sample {key!r} has no {wanted} member (members: {sorted(fields)})"
                )
            member = fields[field]
            texts.append(_label_text(shard, key, fields, label_key, json_field) if label_key else None)
            items.append(
                SourceItem(
                    name=key,
                    path=f"{shard}:{member.name}",
                    blob=TarMember(shard, member.offset_data, member.size),
                )
            )
    if not items:
        raise MissingInputError(f"input={pattern}: the shards hold no samples")
    labelled = [t is not None for t in texts]
    if any(labelled) and not all(labelled):
        first = items[labelled.index(False)]
        raise InputError(f"{first.path}: sample {first.name!r} has no .{label_key} member, others have")
    if not any(labelled):
        return SourceList(items=items, class_list=None, kind="webdataset")
    classes = class_list if class_list is not None else audioset_classes()
    items = [
        SourceItem(
            name=item.name,
            path=item.path,
            labels=parse_labels(text or "", classes, class_list is not None, item.path),
            blob=item.blob,
        )
        for item, text in zip(items, texts)
    ]
    return SourceList(items=items, class_list=classes, kind="webdataset")
