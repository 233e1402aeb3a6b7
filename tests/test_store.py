from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from ced_lightning.store.audio import FORMAT_VERSION, AudioStore
from ced_lightning.store.audio_writer import DEFAULT_CHUNK_SAMPLES, AudioStoreWriter, write_audio_store

CHUNK, SHARD = 256, 4  # a 1024-sample shard: tiny clips still span several shards


def make_clips(n: int = 40, seed: int = 0) -> list[tuple[str, np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        length = int(rng.integers(50, 1500))
        labels = sorted({int(x) for x in rng.integers(0, 5, size=int(rng.integers(0, 3)))})
        clips.append((f"clip_{i:03d}", rng.uniform(-0.9, 0.9, length).astype(np.float32), labels))
    return clips


def expected_int16(waveform: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(waveform.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def write(url, clips, **kwargs) -> AudioStore:
    kwargs.setdefault("class_names", [f"c{k}" for k in range(5)])
    return write_audio_store(url, clips, chunk_samples=CHUNK, shard_chunks=SHARD, **kwargs)


def store_arrays(url: str) -> dict[str, np.ndarray]:
    group = zarr.open_group(url, mode="r")
    return {name: np.asarray(arr[:]) for name, arr in group.arrays()}


def assert_same_store(a: str, b: str) -> None:
    arrays_a, arrays_b = store_arrays(a), store_arrays(b)
    assert sorted(arrays_a) == sorted(arrays_b)
    for name in arrays_a:
        assert arrays_a[name].shape == arrays_b[name].shape, name
        assert np.array_equal(arrays_a[name], arrays_b[name]), name
    assert dict(zarr.open_group(a, mode="r").attrs) == dict(zarr.open_group(b, mode="r").attrs)


def test_roundtrip_read_span_labels(tmp_path: Path) -> None:
    clips = make_clips()
    store = write(tmp_path / "s.zarr", clips, class_mids=[f"/m/{k}" for k in range(5)])
    assert len(store) == len(clips) and store.sample_rate == 16000
    assert store.names == [c[0] for c in clips]
    assert store.lengths.dtype == np.int64 and store.offsets.dtype == np.int64
    assert np.array_equal(store.lengths, [len(c[1]) for c in clips])
    # Back to back, except that a clip which would cross a chunk boundary starts at the next chunk.
    ends = store.offsets + store.lengths
    assert store.offsets[0] == 0 and (store.offsets[1:] >= ends[:-1]).all()
    gaps = store.offsets[1:] != ends[:-1]
    assert gaps.any() and (store.offsets[1:][gaps] % store.chunk_samples == 0).all()
    fits = store.lengths <= store.chunk_samples  # longer clips necessarily span several chunks
    assert fits.any()
    assert (store.offsets // store.chunk_samples == (ends - 1) // store.chunk_samples)[fits].all()
    spans = store.chunk_spans()
    assert spans[0] == 0 and spans[-1] == len(store)
    assert len(spans) == len(np.unique(store.offsets // store.chunk_samples)) + 1
    for i, (_, wave, _) in enumerate(clips):
        got = store.read(i)
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy(), expected_int16(wave) / np.float32(32768))
    flat, offsets = store.read_span(5, 21)
    assert flat.dtype == np.int16 and offsets.dtype == np.int64 and len(offsets) == 17
    for k, i in enumerate(range(5, 21)):
        assert np.array_equal(flat[offsets[k] : offsets[k + 1]], expected_int16(clips[i][1]))
    assert offsets[-1] == len(flat)
    empty, rel = store.read_span(3, 3)
    assert len(empty) == 0 and list(rel) == [0]
    with pytest.raises(IndexError):
        store.read_span(0, len(clips) + 1)
    with pytest.raises(IndexError):
        store.read(len(clips))

    assert store.has_labels and store.num_classes == 5
    assert store.class_names == [f"c{k}" for k in range(5)] and store.class_mids == [
        f"/m/{k}" for k in range(5)
    ]
    matrix = store.label_matrix()
    assert matrix.dtype == np.uint8 and matrix.shape == (len(clips), 5)
    for i, (_, _, labels) in enumerate(clips):
        assert list(store.labels(i)) == labels
        assert sorted(np.flatnonzero(matrix[i])) == labels
    attrs = store.attrs
    assert attrs["format_version"] == FORMAT_VERSION and attrs["num_clips"] == len(clips)
    assert attrs["source"] == "memory" and store.failures() == []
    assert store.chunk_samples == CHUNK


def test_int16_and_tensor_input_and_no_labels(tmp_path: Path) -> None:
    ints = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    clips = [("a", ints, None), ("b", torch.tensor([1.0, -1.0, 0.5]), None)]
    store = write_audio_store(tmp_path / "s.zarr", clips)
    assert not store.has_labels and store.num_classes is None and store.class_names is None
    assert np.array_equal(store.read_span(0, 1)[0], ints)
    # +1.0 saturates one LSB below full scale; -1.0 is exact.
    assert store.read(1).tolist() == [32767 / 32768, -1.0, 0.5]
    assert len(store.labels(0)) == 0
    with pytest.raises(ValueError, match="no class list"):
        store.label_matrix()


def test_default_layout_chunk_and_shard(tmp_path: Path) -> None:
    store = write_audio_store(
        tmp_path / "s.zarr", [("a", np.full(1000, 0.1, np.float32), [0])], class_names=["x"]
    )
    audio = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")["audio"]
    assert store.chunk_samples == DEFAULT_CHUNK_SAMPLES == 16 * 160_000  # 16 AudioSet clips per chunk
    assert audio.chunks == (16 * 160_000,) and audio.shards == (4 * 16 * 160_000,) and audio.dtype == np.int16
    assert audio.compressors == () and store.attrs["compression"] == "none"
    zstd = write_audio_store(
        tmp_path / "z.zarr",
        [("a", np.full(1000, 0.1, np.float32), [0])],
        class_names=["x"],
        compression="zstd",
    )
    assert zarr.open_group(str(tmp_path / "z.zarr"), mode="r")["audio"].compressors
    assert torch.equal(zstd.read(0), store.read(0))
    assert audio.shape == (1000,)


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    clips = make_clips(10)
    a = write(tmp_path / "a.zarr", clips)
    b = write_audio_store(tmp_path / "b.zarr", clips)  # other layout, same names and lengths
    renamed = [(f"x{name}", wave, labels) for name, wave, labels in clips]
    c = write(tmp_path / "c.zarr", renamed)
    shorter = [*clips[:-1], (clips[-1][0], clips[-1][1][:-1], clips[-1][2])]
    d = write(tmp_path / "d.zarr", shorter)
    assert len(a.fingerprint) >= 16 and a.fingerprint == b.fingerprint
    assert a.fingerprint == AudioStore.open(tmp_path / "a.zarr").fingerprint
    assert len({a.fingerprint, c.fingerprint, d.fingerprint}) == 3


def test_pickle_reopens_lazily(tmp_path: Path) -> None:
    clips = make_clips(8)
    store = write(tmp_path / "s.zarr", clips)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._audio is None  # no zarr handle crosses the process boundary
    assert np.array_equal(clone.read(3).numpy(), store.read(3).numpy())
    assert clone.names == store.names and clone.fingerprint == store.fingerprint


def _read_in_child(store: AudioStore, queue) -> None:
    queue.put(store.read_span(2, 5)[0])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_worker_processes_read(tmp_path: Path, method: str) -> None:
    import multiprocessing

    if method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {method} start method here")
    store = write(tmp_path / "s.zarr", make_clips(8))
    store.read(0)  # the parent's handle is open before the child starts, as in a DataLoader
    ctx = multiprocessing.get_context(method)
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(store, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and np.array_equal(got, store.read_span(2, 5)[0])


def test_fsspec_urls(tmp_path: Path) -> None:
    clips = make_clips(6)
    memory = write("memory://ced-test/s.zarr", clips)
    assert np.array_equal(AudioStore.open("memory://ced-test/s.zarr").read(2).numpy(), memory.read(2).numpy())
    write(tmp_path / "f.zarr", clips)
    via_url = AudioStore.open(f"file://{tmp_path}/f.zarr")
    assert np.array_equal(via_url.read_span(0, 6)[0], memory.read_span(0, 6)[0])


def test_open_errors_name_the_url(tmp_path: Path) -> None:
    missing = tmp_path / "nope.zarr"
    with pytest.raises(FileNotFoundError, match=r"nope\.zarr"):
        AudioStore.open(missing)
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(FileNotFoundError, match="not an audio store"):
        AudioStore.open(tmp_path / "other.zarr")


def test_existing_store_reused_refused_or_overwritten(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    clips = make_clips(5)
    first = write(url, clips, config={"v": 1})
    # Same arguments: the complete store is returned without consuming the clips.
    again = write(url, iter(()), config={"v": 1})
    assert again.fingerprint == first.fingerprint
    with pytest.raises(FileExistsError, match="overwrite"):
        write(url, clips[:2], config={"v": 2})
    replaced = write(url, clips[:2], config={"v": 2}, overwrite=True)
    assert len(replaced) == 2
    with pytest.raises(ValueError, match="duplicate clip name"):
        write(tmp_path / "dup.zarr", [clips[0], clips[0]])
    with pytest.raises(ValueError, match="outside"):
        write(tmp_path / "bad.zarr", [("a", np.ones(10, np.float32) * 0.1, [7])])


class Interrupt(Exception):
    pass


def interrupted(clips, stop_after: int):
    for k, clip in enumerate(clips):
        if k == stop_after:
            raise Interrupt  # what Ctrl-C does to a loop feeding the writer
        yield clip


@pytest.mark.parametrize("stop_after", [1, 9, 39])
def test_resume_after_interrupt_matches_uninterrupted(tmp_path: Path, stop_after: int) -> None:
    clips = make_clips(40)
    write(tmp_path / "ref.zarr", clips, config={"run": 1})
    url = str(tmp_path / "resumed.zarr")
    with pytest.raises(Interrupt):
        write(url, interrupted(clips, stop_after), config={"run": 1})
    with pytest.raises(FileNotFoundError, match="incomplete"):
        AudioStore.open(url)
    progress = dict(zarr.open_group(url, mode="r").attrs)["progress"]
    committed = progress["clips"] if progress else 0
    assert committed <= stop_after
    if stop_after >= 7:
        assert committed > 0, "several shards were full: some clips must be committed"
    # The rerun must not re-add committed clips; feeding them again would raise "duplicate clip name".
    write(url, clips, config={"run": 1})
    assert_same_store(str(tmp_path / "ref.zarr"), url)


def test_resume_with_failures_keeps_report(tmp_path: Path) -> None:
    clips = make_clips(30)
    bad = {4, 11, 12, 25}

    def feed(writer: AudioStoreWriter, stop: int | None) -> AudioStore | None:
        for k in range(writer.skip_items(), len(clips)):
            if k == stop:
                return None
            if k in bad:
                writer.add_failure({"name": clips[k][0], "reason": f"bad {k}"})
            else:
                writer.add(*clips[k])
        return writer.finish()

    def new_writer(url: Path) -> AudioStoreWriter:
        return AudioStoreWriter(
            url, class_names=[f"c{k}" for k in range(5)], chunk_samples=CHUNK, shard_chunks=SHARD
        )

    ref = feed(new_writer(tmp_path / "ref.zarr"), None)
    assert ref is not None and [f["reason"] for f in ref.failures()] == [f"bad {k}" for k in sorted(bad)]
    assert feed(new_writer(tmp_path / "r.zarr"), 20) is None
    resumed_writer = new_writer(tmp_path / "r.zarr")
    assert 0 < resumed_writer.skip_items() <= 20
    # The committed failures came back from the store's `failures` array, in order.
    committed = [f["reason"] for f in resumed_writer.failures]
    assert committed == [f"bad {k}" for k in sorted(bad) if k < resumed_writer.skip_items()]
    feed(resumed_writer, None)
    assert_same_store(str(tmp_path / "ref.zarr"), str(tmp_path / "r.zarr"))
    resumed = AudioStore.open(str(tmp_path / "r.zarr"))
    assert resumed.failures() == ref.failures() and resumed.attrs["num_failures"] == len(bad)
    # Kept out of the attributes, which every open of the store parses.
    assert "failures" not in resumed.attrs


def _zarr_reference(url: str) -> np.ndarray:
    return np.asarray(AudioStore.open(url).audio[:])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_raw_shard_reads_equal_zarr_on_every_range(tmp_path: Path, where: str) -> None:
    url = str(tmp_path / "s.zarr") if where == "local" else "memory://ced-test/raw.zarr"
    store = write(url, make_clips(30), overwrite=True)
    reference = _zarr_reference(url)
    assert len(reference) % (CHUNK * SHARD)  # the last shard is a partial one
    rng = np.random.default_rng(0)
    bounds = [
        *rng.integers(0, len(reference) + 1, size=(200, 2)),
        (0, len(reference)),
        (CHUNK - 1, CHUNK + 2),
    ]
    for a, b in bounds:
        start, stop = sorted((int(a), int(b)))
        assert np.array_equal(store.samples(start, stop), reference[start:stop]), (start, stop)
    assert store._raw is not None and store._raw._local == (where == "local")
    with pytest.raises(IndexError):
        store.samples(0, len(reference) + 1)


def test_raw_shard_reader_fill_value_chunks_and_partial_last_chunk(tmp_path: Path) -> None:
    from ced_lightning.store.shards import RawShardReader

    array = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(1000,),
        chunks=(40,),
        shards=(160,),
        dtype="int16",
        fill_value=7,
        compressors=None,
    )
    data = np.random.default_rng(0).integers(-30000, 30000, 1000).astype(np.int16)
    data[160:320] = 7  # a whole shard of fill value: zarr writes no object for it
    data[400:440] = 7  # one inner chunk of fill value: an empty index entry
    array[:] = data
    array.resize((1003,))  # a partial last chunk; the new tail reads as fill value
    reader = RawShardReader.for_array(zarr.open_array(str(tmp_path / "a.zarr"), mode="r"), str(tmp_path))
    assert reader is not None
    expected = np.concatenate([data, np.full(3, 7, np.int16)])
    for start, stop in [(0, 1003), (150, 330), (399, 441), (990, 1003), (500, 500)]:
        assert np.array_equal(reader.read(start, stop), expected[start:stop]), (start, stop)
    assert reader._indexes[1] is None  # the fill-value shard has no object


def test_raw_shard_reader_refuses_compressed_and_detects_corruption(tmp_path: Path) -> None:
    from ced_lightning.store.shards import RawShardReader

    zstd = write(tmp_path / "z.zarr", make_clips(6), compression="zstd")
    assert RawShardReader.for_array(zstd.audio, zstd.url) is None
    assert np.array_equal(zstd.samples(0, 900), _zarr_reference(zstd.url)[:900])  # zarr reads it

    store = write(tmp_path / "s.zarr", make_clips(6))
    shard = tmp_path / "s.zarr" / "audio" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # a bit flip in the shard index
    shard.write_bytes(bytes(raw))
    with pytest.raises(OSError, match=r"\(audio/c/0\) does not decode \(the shard index fails its CRC32C"):
        AudioStore.open(tmp_path / "s.zarr").samples(0, 10)
    shard.write_bytes(bytes(raw[: CHUNK // 2]))  # truncated object
    with pytest.raises(OSError, match=r"c/0"):
        AudioStore.open(tmp_path / "s.zarr").samples(0, 10)
    assert store.url.endswith("s.zarr")


def test_raw_shard_reads_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The positional-read fallback of systems without preadv (one copy more), same samples.
    store = write(tmp_path / "s.zarr", make_clips(10))
    reference = _zarr_reference(store.url)
    monkeypatch.delattr("os.preadv")
    fresh = AudioStore.open(store.url)
    assert np.array_equal(fresh.samples(0, len(reference)), reference)
    assert fresh._raw is not None


def test_raw_shard_reads_from_many_threads(tmp_path: Path) -> None:
    # More shards than open files are kept: threads evict each other's files while they read.
    from concurrent.futures import ThreadPoolExecutor

    from ced_lightning.store import shards

    store = write(tmp_path / "s.zarr", make_clips(60))
    reference = _zarr_reference(store.url)
    assert len(reference) // (CHUNK * SHARD) > 2 * shards._OPEN_FILES
    ranges = [sorted(map(int, r)) for r in np.random.default_rng(1).integers(0, len(reference), (400, 2))]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda r: store.samples(*r), ranges))
    assert all(np.array_equal(got, reference[a:b]) for got, (a, b) in zip(results, ranges))


def test_read_clips_are_views_of_one_read_across_chunks(tmp_path: Path) -> None:
    store = write(tmp_path / "s.zarr", make_clips(30))
    clips = store.read_clips(3, 27)  # crosses several chunk boundaries (gaps between clips)
    assert len(clips) == 24 and store.read_clips(5, 5) == []
    for i, clip in zip(range(3, 27), clips, strict=True):
        assert np.array_equal(clip, store.read_samples(i))
    assert all(c.base is clips[0].base is not None for c in clips)  # slices of one array: no copies
    with pytest.raises(IndexError, match="out of range"):
        store.read_clips(0, 31)


def test_failures_of_a_store_from_before_the_failures_array(tmp_path: Path) -> None:
    # Earlier versions kept the report as a list attribute; such stores still read.
    url = str(tmp_path / "old.zarr")
    write_audio_store(url, make_clips(3))
    group = zarr.open_group(url, mode="r+")
    record = {"name": "x", "path": "/a/x.wav", "kind": "failed", "reason": "cannot decode"}
    group.attrs.update({"failures": [record]})
    del group.attrs["num_failures"]
    assert AudioStore.open(url).failures() == [record]


def test_writer_never_deletes_data_that_is_not_an_audio_store(tmp_path: Path) -> None:
    # zarr's mode="w" empties the folder: `prepare input=/data/wavs output=/data/wavs` must keep the audio.
    folder = tmp_path / "wavs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.wav").write_bytes(b"RIFF")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="holds other files"):
            write_audio_store(folder, make_clips(2), overwrite=overwrite)
    assert (folder / "sub" / "a.wav").read_bytes() == b"RIFF"
    other = tmp_path / "other.zarr"
    zarr.open_group(str(other), mode="w").attrs["kind"] = "someone-else"
    with pytest.raises(FileExistsError, match="another Zarr store"):
        write_audio_store(other, make_clips(2), overwrite=True)
    assert zarr.open_group(str(other), mode="r").attrs["kind"] == "someone-else"
    # An empty folder is fine, and overwrite=true still replaces an audio store.
    (tmp_path / "empty").mkdir()
    write_audio_store(tmp_path / "empty", make_clips(2))
    assert len(write_audio_store(tmp_path / "empty", make_clips(3), overwrite=True)) == 3


def test_resume_rewrites_the_shard_where_an_uncommitted_clip_began(tmp_path: Path) -> None:
    # Clip x began in committed shards but was not committed itself; on the rerun it fails to decode, and the
    # next clip takes its place. The shards holding x's head must be written again, not kept.
    def writer() -> AudioStoreWriter:
        return AudioStoreWriter(tmp_path / "s.zarr", chunk_samples=100, shard_chunks=1)

    first = writer()
    first.add("a", np.full(50, 1, np.int16), None)
    first.add("x", np.full(230, 7, np.int16), None)  # samples 50..280: shards [0, 100) and [100, 200) commit
    assert first.committed_clips == 1  # killed here
    resumed = writer()
    assert resumed.skip_items() == 1
    resumed.add_failure({"name": "x", "reason": "cannot decode any more"})
    resumed.add("y", np.full(240, 3, np.int16), None)
    store = resumed.finish()
    assert store.names == ["a", "y"]
    np.testing.assert_array_equal(store.read_samples(0), np.full(50, 1))
    np.testing.assert_array_equal(store.read_samples(1), np.full(240, 3))


def test_a_missing_shard_is_reported_not_read_as_silence(tmp_path: Path) -> None:
    url = tmp_path / "s.zarr"
    clips = [
        (f"c{i}", np.zeros(150, np.float32) if i == 2 else np.full(150, 0.5, np.float32), None)
        for i in range(6)
    ]
    store = write_audio_store(url, clips, chunk_samples=100, shard_chunks=2)
    np.testing.assert_array_equal(store.read_samples(2), np.zeros(150, np.int16))  # zeros are stored too
    shard = next(p for p in sorted((url / "audio" / "c").iterdir()) if p.name == "1")
    shard.unlink()  # a failed upload, an incomplete copy
    # Found when the store opens (one listing of `audio`), before anything reads samples 150..300.
    with pytest.raises(OSError, match=r"\(audio/c/1\) is missing, though the store records it as written"):
        AudioStore.open(str(url))


def test_read_clips_heads_of_long_recordings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    clips = [
        (f"c{i}", rng.uniform(-0.5, 0.5, n).astype(np.float32), None)
        for i, n in enumerate([50, 5000, 80, 9000])
    ]
    store = write_audio_store(tmp_path / "s.zarr", clips, chunk_samples=100, shard_chunks=4)
    whole = store.read_clips(0, 4)
    for max_samples in (10, 60, 100_000):  # per-clip heads (the span is mostly unused), then one read
        heads = store.read_clips(0, 4, max_samples=max_samples)
        assert [len(h) for h in heads] == [min(n, max_samples) for n in (50, 5000, 80, 9000)]
        for head, clip in zip(heads, whole, strict=True):
            np.testing.assert_array_equal(head, clip[:max_samples])
