"""One writer per store, outputs never inside another store, leftovers of killed writers removed, secrets kept
out of attributes and logs, storage_options passed to fsspec (issue 13, items 4, 5, 7 and 8).

Every test here fails on the code before these changes: there was no `store.lock` / `store.remote` module,
a second writer was not refused, nested outputs were accepted, `*.partial` files stayed and URLs were stored
and logged as given."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fsspec
import fsspec.config
import numpy as np
import pytest
import soundfile as sf
import zarr
from fsspec.implementations.memory import MemoryFileSystem
from omegaconf import OmegaConf

from ced_lightning.core.augment import AugmentRecipe
from ced_lightning.data.sources import from_directory
from ced_lightning.prepare import prepare_store, run_prepare
from ced_lightning.store import check_free_for_store, remove_partial_writes
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.audio_writer import AudioStoreWriter, write_audio_store
from ced_lightning.store.lock import StoreLockedError, lock_path, store_lock
from ced_lightning.store.logit_layout import LogitStoreLayout
from ced_lightning.store.logits import LogitStore
from ced_lightning.store.remote import RedactSecrets, apply_storage_options, redact_text, redact_url
from conftest import command, command_env, run_command

REPO = Path(__file__).resolve().parents[1]
SMALL = {"chunk_samples": 1024, "shard_chunks": 2}


def _clips(n: int, seconds: float = 0.1) -> list[tuple[str, np.ndarray, None]]:
    t = np.arange(int(16000 * seconds)) / 16000
    return [
        (f"c{i:02d}", (0.3 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32), None)
        for i in range(n)
    ]


def _wav_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for name, wave, _ in _clips(n, seconds=0.2):
        sf.write(folder / f"{name}.wav", wave, 16000)
    return folder


def _hold_lock_in_child(url: Path) -> subprocess.Popen:
    """A live process on this host that holds the store's lock until killed."""
    code = (
        "import sys, time\n"
        "from ced_lightning.store.lock import store_lock\n"
        f"with store_lock({str(url)!r}, 'prepare'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


# -- one writer per store --------------------------------------------------------------------------------
def test_second_writer_refused_with_holder_then_dead_holder_taken_over(tmp_path: Path) -> None:
    url = tmp_path / "audio.zarr"
    child = _hold_lock_in_child(url)
    try:
        with pytest.raises(StoreLockedError) as refused:
            write_audio_store(url, _clips(3), **SMALL)
        message = str(refused.value)
        assert f"pid {child.pid} on host" in message and "since 20" in message, message
        assert f"delete {url}.lock" in message, message
        assert not url.exists()  # refused before anything was written
    finally:
        child.send_signal(signal.SIGKILL)  # as the out-of-memory killer would: the lock file stays
        child.wait()
    assert Path(f"{url}.lock").exists()
    # The holder's pid is dead on this host: the next writer takes the lock over.
    store = write_audio_store(url, _clips(3), **SMALL)
    assert len(store) == 3 and not Path(f"{url}.lock").exists()


def test_lock_released_after_an_exception(tmp_path: Path) -> None:
    url = tmp_path / "audio.zarr"
    bad = [("stereo", np.zeros((2, 100), np.float32), None)]
    with pytest.raises(ValueError, match="mono"):
        write_audio_store(url, bad, **SMALL)
    assert not Path(f"{url}.lock").exists()
    with store_lock(url, "prepare"):  # free again
        assert Path(f"{url}.lock").exists()
    assert not Path(f"{url}.lock").exists()


def test_lock_in_the_same_process_is_not_reentrant(tmp_path: Path) -> None:
    url = tmp_path / "x.zarr"
    with store_lock(url, "extract"), pytest.raises(StoreLockedError, match=rf"pid {os.getpid()} "):
        write_audio_store(url, _clips(2), **SMALL)


def test_object_stores_have_no_lock_file() -> None:
    assert lock_path("s3://bucket/a.zarr") is None and lock_path("memory://a.zarr") is None
    assert (
        lock_path("file:///data/a.zarr/") == "/data/a.zarr.lock"
        and lock_path("rel/a.zarr") == "rel/a.zarr.lock"
    )


def test_two_prepare_commands_on_one_new_output(tmp_path: Path) -> None:
    """Two real `prepare` processes on the same new output: the second is refused naming the first, whose
    store comes out complete and equal to an undisturbed run (before: ContainsArrayError, or a store that
    the other run's mode='w' had emptied)."""
    inputs = _wav_folder(tmp_path / "in", 16)
    reference = prepare_store(from_directory(inputs).items, tmp_path / "reference.zarr", **SMALL)
    out = tmp_path / "out.zarr"
    args = [f"input={inputs}", f"output={out}", "workers=0", "chunk_samples=1024", "shard_chunks=2"]
    first = subprocess.Popen(
        command("prepare", *args, "throttle_s=0.6", f"hydra.run.dir={tmp_path / 'first'}"),
        env=command_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{out}.lock").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = run_command("prepare", *args, f"hydra.run.dir={tmp_path / 'second'}", timeout=120)
        assert first.poll() is None, "the first run ended before the second tried: the test proves nothing"
        assert second.returncode == 1, second.stdout + second.stderr
        said = second.stdout + second.stderr
        assert f"is being written by another run (pid {first.pid} on host" in said, said
        assert "ContainsArrayError" not in said
        log, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log[-3000:]
    ours = AudioStore.open(out)
    assert ours.names == reference.names
    for i in range(len(ours)):
        np.testing.assert_array_equal(ours.read_samples(i), reference.read_samples(i))
    assert not Path(f"{out}.lock").exists()


# -- outputs inside other stores ----------------------------------------------------------------------------
def test_output_inside_another_store_is_refused(tmp_path: Path) -> None:
    audio = write_audio_store(tmp_path / "audio.zarr", _clips(2), **SMALL)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "audio.zarr").rglob("*"))
    for nested in (tmp_path / "audio.zarr" / "logits", tmp_path / "audio.zarr" / "audio" / "deeper"):
        with pytest.raises(FileExistsError, match=r"lies inside the Zarr store or group at .*audio\.zarr"):
            write_audio_store(nested, _clips(2), **SMALL)
        with pytest.raises(FileExistsError, match="lies inside"):
            check_free_for_store(str(nested), "logit store", ours=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "audio.zarr").rglob("*")) == before
    assert len(AudioStore.open(audio.url)) == 2
    # Next to a store is fine, and so is any folder without zarr.json above it.
    check_free_for_store(str(tmp_path / "logits.zarr"), "logit store", ours=False)


# -- leftovers of a killed zarr write ------------------------------------------------------------------------
def test_resume_removes_partial_writes(tmp_path: Path) -> None:
    url = tmp_path / "audio.zarr"
    writer = AudioStoreWriter(url, **SMALL)
    for name, wave, labels in _clips(8):
        writer.add(name, wave, labels)  # commits shards; no finish: as a killed run leaves it
    assert not dict(zarr.open_group(str(url), mode="r").attrs)["complete"]
    # zarr >= 3.1.3 writes `<key>.<uuid hex>.partial` and renames it; a kill in between leaves it.
    leftover = url / "audio" / "c" / f"7.{'ab' * 16}.partial"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a shard")
    unrelated = url / "audio" / "notes.partial"  # not zarr's name pattern: left alone
    unrelated.write_bytes(b"")
    store = write_audio_store(url, _clips(8), **SMALL)
    assert len(store) == 8 and not leftover.exists() and unrelated.exists()
    assert remove_partial_writes("s3://bucket/x.zarr") == 0  # object stores write objects whole


# -- secrets -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("s3://AKIAKEY:s3cretValue@bucket/x.zarr", "s3://***@bucket/x.zarr"),
        ("https://user:pa55@host:8080/a/b.ckpt", "https://***@host:8080/a/b.ckpt"),
        ("https://host/a.pt?token=abc123&x=1", "https://host/a.pt?token=***&x=1"),
        (
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=ff00&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        ("az://c/blob?sv=2020&sig=S1G%3D", "az://c/blob?sv=2020&sig=***"),
        ("/data/plain/path.zarr", "/data/plain/path.zarr"),
        ("gs://bucket/a@b.zarr", "gs://bucket/a@b.zarr"),  # an @ in the path is no user info
        ("gs://bucket/v1.2@3/x", "gs://bucket/v1.2@3/x"),
        # What a file system leaves of s3://KEY:SECRET@bucket/x once it stripped the scheme (zarr's errors):
        (
            "<FsspecStore(MemoryFileSystem, /KEY:SECRET@bucket/x)>",
            "<FsspecStore(MemoryFileSystem, /***@bucket/x)>",
        ),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
    assert redact_text(f"cannot open '{url}': error") == f"cannot open '{redacted}': error"


def test_log_filter_redacts_messages_and_tracebacks() -> None:
    try:
        raise FileNotFoundError("no store at s3://KEY:SECRET@bucket/a.zarr")
    except FileNotFoundError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "reading %s", ("s3://K:S@b/a",), sys.exc_info()
        )
    assert RedactSecrets().filter(record)
    text = logging.Formatter().format(record)
    assert "SECRET" not in text and ":S@" not in text and "s3://***@b/a" in text and "s3://***@bucket" in text


def test_logit_store_attrs_hold_no_credentials(tmp_path: Path) -> None:
    layout = LogitStoreLayout(
        num_clips=4,
        epochs=1,
        topk=2,
        num_classes=3,
        quantization="float16",
        recipe=AugmentRecipe.from_config(None),
        clip_samples=1600,
        block_clips=2,
    )
    settings = {
        "seed": 0,
        "audio_fingerprint": "f" * 16,
        "audio_url": "s3://AKIAKEY:s3cretValue@bucket/audio.zarr",
        "teachers": [{"name": "t", "sha256": "0" * 64}],
        "combine": "mean_prob",
    }
    store = LogitStore.create(str(tmp_path / "logits.zarr"), layout, **settings)
    assert store.attrs["audio_store"] == "s3://***@bucket/audio.zarr"
    assert "s3cret" not in (tmp_path / "logits.zarr" / "zarr.json").read_text()
    # The same extraction resumes (the redacted URL is compared, not the secret).
    assert LogitStore.create(str(tmp_path / "logits.zarr"), layout, **settings).url == store.url


def test_prepare_command_logs_and_prints_no_credentials(tmp_path: Path) -> None:
    """The real command writing to a URL with credentials: its console, log file and store hold none."""
    inputs = _wav_folder(tmp_path / "in", 3)
    secret = "s3cretValue"
    out = f"memory://AKIAKEY:{secret}@bucket/audio.zarr"
    done = run_command(
        "prepare",
        f"input={inputs}",
        f"output={out}",
        "workers=0",
        f"hydra.run.dir={tmp_path / 'run'}",
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    logged = done.stdout + done.stderr + (tmp_path / "run" / "prepare.log").read_text()
    assert "memory://***@bucket/audio.zarr" in logged, logged
    assert secret not in logged, logged


# -- storage_options ---------------------------------------------------------------------------------------
class TokenMemoryFileSystem(MemoryFileSystem):
    """An in-memory file system that, like a bucket, refuses anyone without the right token."""

    protocol = ("tokenmem",)

    def __init__(self, *args: object, token: str | None = None, **kwargs: object) -> None:
        if token != "let-me-in":
            raise PermissionError(f"tokenmem: access denied (token={token!r})")
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(str(path).removeprefix("tokenmem://"))


@pytest.fixture
def tokenmem(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    fsspec.register_implementation("tokenmem", TokenMemoryFileSystem, clobber=True)
    monkeypatch.setattr(fsspec.config, "conf", {})  # restored afterwards, with the environment below
    monkeypatch.setenv("FSSPEC_TOKENMEM", "{}")
    yield


def test_storage_options_reach_every_store_prepare_opens(tmp_path: Path, tokenmem: None) -> None:
    inputs = _wav_folder(tmp_path / "in", 3)
    cfg = OmegaConf.load(REPO / "conf" / "prepare.yaml")
    cfg.pop("defaults")
    cfg.merge_with({"input": str(inputs), "output": "tokenmem://bucket/audio.zarr", "workers": 0})
    with pytest.raises(PermissionError, match="access denied"):
        run_prepare(cfg)
    cfg.storage_options = {"tokenmem": {"token": "let-me-in"}}
    [summary] = run_prepare(cfg)
    assert summary["clips_written"] == 3
    assert len(AudioStore.open("tokenmem://bucket/audio.zarr").read(0)) == 3200
    assert '"token": "let-me-in"' in os.environ["FSSPEC_TOKENMEM"]  # what spawned workers read at import


def test_storage_options_must_be_given_per_protocol() -> None:
    with pytest.raises(ValueError, match=r"storage_options\.anon must be a mapping .*per protocol"):
        apply_storage_options({"anon": True})


def test_every_command_applies_storage_options_before_it_runs(tokenmem: None) -> None:
    """train, evaluate, predict and export do not call apply_storage_options themselves: the Hydra callback
    registered for every command (conf/hydra/default.yaml) does, before the command's code runs."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ced_lightning import conf_dir

    write_url = "tokenmem://bucket/by_callback.zarr"
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        for command in ("prepare", "extract", "train", "evaluate", "predict", "export"):
            cfg = compose(
                command, overrides=["+storage_options.tokenmem.token=let-me-in"], return_hydra_config=True
            )
            assert "remote_stores" in cfg.hydra.callbacks, command
    callback = instantiate(cfg.hydra.callbacks.remote_stores)
    callback.on_job_start(cfg, task_function=None)
    assert len(write_audio_store(write_url, _clips(2), **SMALL)) == 2
    assert AudioStore.open(write_url).names == ["c00", "c01"]


def test_failed_command_shows_and_keeps_no_credentials(tmp_path: Path) -> None:
    """A command that fails on a URL with credentials: the error Hydra prints, the overrides it echoes and
    the config it saves in the run folder name the URL redacted (all held the secret before)."""
    secret = "s3cretValue"
    run = tmp_path / "run"
    done = run_command(
        "extract",
        f"audio_store=memory://AKIAKEY:{secret}@bucket/missing.zarr",
        f"output={tmp_path / 'logits.zarr'}",
        f"hydra.run.dir={run}",
        timeout=120,
    )
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "memory://***@bucket/missing.zarr: no audio store there" in done.stderr, said
    saved = (
        "".join(p.read_text() for p in (run / ".hydra").glob("*.yaml")) + (run / "extract.log").read_text()
    )
    assert "memory://***@bucket/missing.zarr" in saved
    assert secret not in said + saved, said + saved


@contextlib.contextmanager
def _read_only_folder(folder: Path) -> Iterator[None]:
    """`folder` read-only for this process: chmod for a user, `chattr +i` for root (which ignores modes)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("no way to make a folder read-only for root here (chattr)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_complete_store_in_a_read_only_folder_is_still_reused(tmp_path: Path, caplog) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    write_audio_store(shared / "audio.zarr", _clips(3), **SMALL)
    with _read_only_folder(shared), caplog.at_level(logging.WARNING, logger="ced_lightning.store.lock"):
        assert len(write_audio_store(shared / "audio.zarr", _clips(3), **SMALL)) == 3
    assert "cannot create the lock file" in caplog.text and not (shared / "audio.zarr.lock").exists()
