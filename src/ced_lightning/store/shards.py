"""Direct byte-range reads of an uncompressed, sharded 1-D Zarr v3 array.

zarr 3.1 spends ~4 ms of event-loop and copy overhead on one 5 MB chunk of the audio store, ten times the
0.4 ms the operating system needs to hand over the same bytes. For the one layout where the bytes on disk
ARE the samples (the `sharding_indexed` codec around a little-endian `bytes` codec, nothing else) the
samples of any range can be read straight from the shard objects with the shard index the Zarr v3 sharding
specification defines: per inner chunk, (offset, nbytes) as little-endian uint64, the pair (2^64-1, 2^64-1)
for a chunk that was never written (fill value), followed by a CRC32C of the index when `index_codecs`
ends in `crc32c`. Every other layout (compression, other codecs) returns `None` from
`RawShardReader.for_array` and stays with zarr. `tests/test_store.py` checks the two agree on every range.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ced_lightning.store.integrity import StoreDamagedError, base_store, missing_message, undecodable_message

_EMPTY = np.uint64(2**64 - 1)
# Open shard files kept per process: enough for a few concurrent readers' working sets, far below fd limits.
_OPEN_FILES = 16


def _pread_into(fd: int, out: memoryview, offset: int) -> int:
    """Read at `offset` into `out` without moving a shared file position (safe from several threads)."""
    if hasattr(os, "preadv"):  # Linux, BSDs: straight into the output array
        return os.preadv(fd, [out], offset)
    data = os.pread(fd, len(out), offset)  # other POSIX systems: one extra copy
    out[: len(data)] = data
    return len(data)


class RawShardReader:
    """Reads `[start, stop)` of a 1-D sharded, uncompressed zarr array as a numpy array, without zarr.

    Not shared between processes: `AudioStore` builds one per process, like its zarr handle. Threads of one
    process may share it.
    """

    def __init__(
        self,
        *,
        dtype: np.dtype,
        size: int,
        shard_size: int,
        chunk_size: int,
        fill_value: Any,
        index_at_end: bool,
        index_crc32c: bool,
        shard_path: Any,
        local: bool,
        fs: Any = None,
        all_chunks_written: bool = False,
        url: str = "",
        name: str = "",
        chunk_key: Any = None,
        what: str = "store",
    ) -> None:
        self.dtype = dtype
        self.size = size
        self.shard_size = shard_size
        self.chunk_size = chunk_size
        self.chunks_per_shard = shard_size // chunk_size
        self.fill_value = fill_value
        self._index_at_end = index_at_end
        self._index_crc32c = index_crc32c
        self._index_nbytes = 16 * self.chunks_per_shard + (4 if index_crc32c else 0)
        self._shard_path = shard_path  # shard number -> path (local) or fsspec path
        # Written with zarr's write_empty_chunks: a missing shard or chunk is damage, not silence.
        self.all_chunks_written = all_chunks_written
        self._local = local
        self._fs = fs
        # For errors: the store, the array's name in it, shard number -> chunk key, and what the store is.
        self._url, self._name, self._what = url, name, what
        self._chunk_key = chunk_key or (lambda shard: f"c/{shard}")
        self._indexes: dict[int, np.ndarray | None] = {}
        self._files: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_array(
        cls, array: zarr.Array, url: str, all_chunks_written: bool = False, what: str = "store"
    ) -> RawShardReader | None:
        """A reader for `array` (opened from `url`), or None when its layout is not one this reads.

        `all_chunks_written`: the writer stored every chunk, zeros too, so a missing one is an error. Damage
        (a missing or truncated shard, a shard index that fails its CRC32C) raises `StoreDamagedError`
        naming the store (`what` at `url`), the array and the chunk key.
        """
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.codecs.sharding import ShardingCodecIndexLocation

        metadata = array.metadata
        if getattr(metadata, "zarr_format", None) != 3 or len(array.shape) != 1:
            return None
        codecs = metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        inner, index = sharding.codecs, sharding.index_codecs
        if len(inner) != 1 or not isinstance(inner[0], BytesCodec):
            return None
        if not index or not isinstance(index[0], BytesCodec) or len(index) > 2:
            return None
        if len(index) == 2 and not isinstance(index[1], Crc32cCodec):
            return None

        def little(codec: BytesCodec) -> bool:
            return getattr(codec.endian, "value", codec.endian) in (None, "little")

        dtype = np.dtype(array.dtype)
        if not little(index[0]) or not (little(inner[0]) or dtype.itemsize == 1):
            return None
        dtype = dtype.newbyteorder("<")
        shard_size, chunk_size = int(array.shards[0]), int(array.chunks[0])
        if shard_size % chunk_size:
            return None
        encode = metadata.chunk_key_encoding.encode_chunk_key
        store = base_store(array.store)
        prefix = array.path
        if isinstance(store, zarr.storage.LocalStore):
            if not hasattr(os, "pread"):  # Windows: no positional reads, stay with zarr
                return None
            root = Path(store.root) / prefix

            def shard_path(shard: int) -> Any:
                return root / encode((shard,))

            local, fs = True, None
        else:
            import fsspec

            fs, root = fsspec.core.url_to_fs(url)
            base = f"{root.rstrip('/')}/{prefix}"

            def shard_path(shard: int) -> Any:
                return f"{base}/{encode((shard,))}"

            local = False
        return cls(
            dtype=dtype,
            size=int(array.shape[0]),
            shard_size=shard_size,
            chunk_size=chunk_size,
            fill_value=metadata.fill_value,
            index_at_end=sharding.index_location == ShardingCodecIndexLocation.end,
            index_crc32c=len(index) == 2,
            shard_path=shard_path,
            local=local,
            fs=fs,
            all_chunks_written=all_chunks_written,
            url=url,
            name=prefix,
            chunk_key=lambda shard: encode((shard,)),
            what=what,
        )

    # -- damage ------------------------------------------------------------------------------------------

    def _damaged(self, shard: int, what: str) -> StoreDamagedError:
        key = self._chunk_key(shard)
        return StoreDamagedError(
            undecodable_message(self._url, self._name, key, OSError(what), self._what),
            self._url,
            self._name,
            key,
        )

    def _missing(self, shard: int) -> StoreDamagedError:
        key = self._chunk_key(shard)
        return StoreDamagedError(
            missing_message(self._url, self._name, key, self._what), self._url, self._name, key
        )

    # -- bytes -------------------------------------------------------------------------------------------

    def _fd(self, shard: int) -> int:
        fd = self._files.pop(shard, None)
        if fd is None:
            fd = os.open(self._shard_path(shard), os.O_RDONLY | getattr(os, "O_BINARY", 0))
            if len(self._files) >= _OPEN_FILES:
                os.close(self._files.popitem(last=False)[1])
        self._files[shard] = fd
        return fd

    def _read_into(self, shard: int, offset: int, out: memoryview) -> None:
        """Bytes `[offset, offset + len(out))` of a shard object into `out`."""
        if self._local:
            # Under the lock: another thread must not close (evict) this fd while it is read, nor have its
            # number reused by another file in between.
            with self._lock:
                fd, done = self._fd(shard), 0
                while done < len(out):
                    got = _pread_into(fd, out[done:], offset + done)
                    if got <= 0:
                        raise self._damaged(shard, f"the shard ends before byte {offset + len(out)}")
                    done += got
            return
        data = self._fs.cat_file(self._shard_path(shard), start=offset, end=offset + len(out))
        if len(data) != len(out):
            raise self._damaged(shard, f"the shard ends before byte {offset + len(out)}")
        out[:] = data

    def _shard_nbytes(self, shard: int) -> int:
        if self._local:
            with self._lock:
                return os.fstat(self._fd(shard)).st_size
        return int(self._fs.size(self._shard_path(shard)))

    def _index(self, shard: int) -> np.ndarray | None:
        """`[chunks_per_shard, 2]` (offset, nbytes) of a shard, None for a shard never written."""
        if shard in self._indexes:
            return self._indexes[shard]
        try:
            nbytes = self._shard_nbytes(shard)
        except FileNotFoundError:
            if self.all_chunks_written:
                raise self._missing(shard) from None
            self._indexes[shard] = None
            return None
        if nbytes < self._index_nbytes:
            raise self._damaged(shard, f"{nbytes} bytes, less than its {self._index_nbytes}-byte index")
        start = nbytes - self._index_nbytes if self._index_at_end else 0
        raw = bytearray(self._index_nbytes)
        self._read_into(shard, start, memoryview(raw))
        entries = 16 * self.chunks_per_shard
        if self._index_crc32c:
            import google_crc32c

            stored = int.from_bytes(raw[entries:], "little")
            if google_crc32c.value(bytes(raw[:entries])) != stored:
                raise self._damaged(shard, "the shard index fails its CRC32C check")
        index = np.frombuffer(bytes(raw[:entries]), dtype="<u8").reshape(-1, 2)
        self._indexes[shard] = index
        return index

    def read(self, start: int, stop: int) -> np.ndarray:
        """Elements `[start, stop)` (a new array; the fill value where no chunk was written)."""
        if not 0 <= start <= stop <= self.size:
            raise IndexError(f"range [{start}, {stop}) outside the array's {self.size} elements")
        out = np.empty(stop - start, dtype=self.dtype)
        view = memoryview(out).cast("B")
        item = self.dtype.itemsize
        position = start
        while position < stop:
            chunk = position // self.chunk_size
            chunk_end = min((chunk + 1) * self.chunk_size, stop)
            shard, local_chunk = divmod(chunk, self.chunks_per_shard)
            index = self._index(shard)
            target = out[position - start : chunk_end - start]
            entry = None if index is None else index[local_chunk]
            if entry is None or (entry[0] == _EMPTY and entry[1] == _EMPTY):
                if self.all_chunks_written:
                    raise self._damaged(shard, f"inner chunk {local_chunk} was never written")
                target[:] = self.fill_value
            else:
                # Inner chunks are stored whole (the array's last chunk too), so nbytes must match.
                expected = min(self.chunk_size, self.size - chunk * self.chunk_size) * item
                if int(entry[1]) not in (expected, self.chunk_size * item):
                    raise self._damaged(
                        shard,
                        f"inner chunk {local_chunk} holds {int(entry[1])} bytes, not the "
                        f"{self.chunk_size * item} of an uncompressed chunk",
                    )
                offset = int(entry[0]) + (position - chunk * self.chunk_size) * item
                self._read_into(shard, offset, view[(position - start) * item : (chunk_end - start) * item])
            position = chunk_end
        return out

    def close(self) -> None:
        with self._lock:
            while self._files:
                os.close(self._files.popitem()[1])

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown `os` may be gone already
            self.close()
