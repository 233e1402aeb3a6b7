"""One writer per store: `prepare`, `extract` and `import_logits` hold `<store>.lock` while they create or
resume a store.

Two runs on the same new output used to race (one died with zarr's `ContainsArrayError`, and the `mode="w"`
of one could empty the folder the other was writing). The lock is a marker file created with O_CREAT|O_EXCL
(filelock's `MarkerSoftFileLock`), which is atomic on local disks and on shared file systems (NFS, Lustre),
unlike fcntl/flock locks. It records the holder's host, pid and process start time:

- a second run is refused with who holds the lock (host, pid, since when) and which file to delete;
- a lock left by a killed run (kill -9, out of memory) on the same host is taken over by the next run: its
  pid is dead, or belongs to a newer process;
- a lock left by a run on another host cannot be judged from here: the message says which file to delete.

Object stores (s3://, gs://, ...) have no atomic create; there, one writer per store is the user's job.
DDP: the launching process (rank 0) holds the lock for the whole job; the other ranks do not take it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import os
from collections.abc import Iterator

import filelock

from ced_lightning.core.errors import CedError
from ced_lightning.store.files import check_outside_stores
from ced_lightning.store.remote import redact_url

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
# Creating the lock file fails with these where the folder (or the file system) is read-only.
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class StoreLockedError(CedError, FileExistsError):
    """The store's lock file exists: another run holds it (the commands report it like other outputs they
    refuse)."""


def lock_path(url: str | os.PathLike) -> str | None:
    """The lock file of the store at `url`, next to it; None for object stores (no atomic create there)."""
    url = os.fspath(url).rstrip("/")
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        return None
    return url + LOCK_SUFFIX


@contextlib.contextmanager
def store_lock(url: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold the store's lock while the block runs (released on return and on exceptions).

    Raises StoreLockedError when another run holds it. `command` names the writer for messages. An output
    inside another Zarr store is refused first, so that not even the lock file goes there.
    """
    check_outside_stores(os.fspath(url), "store")
    path = lock_path(url)
    if path is None:
        log.info(
            "%s is an object store: no lock there, make sure that only one %s writes to it at a time",
            redact_url(url),
            command,
        )
        yield
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = filelock.MarkerSoftFileLock(path, timeout=0)
    earlier = lock.owner if os.path.exists(path) else None
    try:
        lock.acquire()
    except filelock.Timeout:
        raise StoreLockedError(_held_message(os.fspath(url), path, lock, command)) from None
    except OSError as err:
        if err.errno not in _READ_ONLY:
            raise
        # A complete store in a read-only place is still reused as before; writing it would fail anyway
        # unless only the folder above it is read-only, which the warning covers.
        log.warning(
            "%s: cannot create the lock file %s (%s): going on without it, so make sure that no other run "
            "writes this store",
            redact_url(url),
            path,
            err.strerror,
        )
        yield
        return
    if earlier is not None and earlier.pid != os.getpid():
        log.info(
            "%s: took over the lock of pid %d on %s, which no longer runs (a killed run)",
            redact_url(url),
            earlier.pid,
            earlier.hostname,
        )
    try:
        yield
    finally:
        lock.release()


def _held_message(url: str, path: str, lock: filelock.MarkerSoftFileLock, command: str) -> str:
    owner = lock.owner
    try:
        since = datetime.datetime.fromtimestamp(os.stat(path).st_mtime).isoformat(sep=" ", timespec="seconds")
    except OSError:
        since = "?"
    holder = f"pid {owner.pid} on host {owner.hostname}" if owner else "an unknown process"
    return (
        # The holder may be another command (an import_logits run holding the output an extract names).
        f"{command}: {redact_url(url)} is being written by another run ({holder}, since {since}; lock file "
        f"{path}). Wait for that run to end. If it is gone (a crashed run on another host: a dead run on "
        f"this host is detected and its lock taken over), delete {path} and run the command again."
    )
