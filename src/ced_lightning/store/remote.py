"""Remote stores: credentials stay out of store attributes and logs, and `storage_options` reach fsspec.

A URL may carry a secret (`s3://KEY:SECRET@bucket/x`, `https://user:pass@host/x`, `...?token=...`). Such a
URL still opens the store (it is used as given), but `redact_url` is what gets stored in attributes, printed
and logged. The better way to pass credentials is the commands' `storage_options` (per fsspec protocol, see
`apply_storage_options`) or the variables each file system reads itself (AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import fsspec.config
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ced_lightning.core.errors import ConfigError

__all__ = [
    "RedactSecrets",
    "RemoteStoresCallback",
    "apply_storage_options",
    "redact_config",
    "redact_exception",
    "redact_text",
    "redact_url",
]

REDACTED = "***"

# `scheme://userinfo@`: everything between `//` and `@` of a URL's authority is a user name and/or secret.
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
# The same `user:secret@` as a file system leaves it in a path once it stripped the scheme
# (`/KEY:SECRET@bucket/x` in a zarr or fsspec error): a path segment with a colon before its `@`.
_PATH_USERINFO = re.compile(r"(?P<before>^|[\s'\"(/=,])(?P<userinfo>[^\s/@:'\"(),=]+:[^\s/@'\"(),]+)@")
# Query parameters that carry credentials: tokens, keys, secrets, passwords, signatures (S3/GCS presigned
# URLs, Azure SAS `sig=`), credentials and auth values.
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&;][^=&#\s'\"]*(?:token|key|secret|sig|pass|pwd|cred|auth)[^=&#\s'\"]*=)(?P<value>[^&#\s'\"]+)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """`text` with the secret parts of every URL in it replaced by `***` (user info, secret query values)."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    text = _PATH_USERINFO.sub(lambda m: f"{m['before']}{REDACTED}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['name']}{REDACTED}", text)


def redact_url(url: str | os.PathLike) -> str:
    """A URL or path as it may be stored and logged: without the credentials it may embed."""
    return redact_text(os.fspath(url))


def redact_config(value: Any) -> Any:
    """A JSON-like value (dicts, lists, strings) with every string redacted as `redact_text` does."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {key: redact_config(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_config(item) for item in value]
    return value


class RedactSecrets(logging.Filter):
    """A handler filter (conf/hydra/default.yaml) that redacts URL credentials in every record it passes,
    its traceback included, whichever module logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        return True


def apply_storage_options(options: Mapping[str, Any] | None) -> None:
    """Pass `storage_options` (`{protocol: {option: value}}`, e.g. `{"s3": {"anon": True}}`) to every fsspec
    file system this process and its children open, zarr's stores included.

    They go into fsspec's own configuration (`fsspec.config.conf`, applied whenever a file system of that
    protocol is created) and into the `FSSPEC_<PROTOCOL>` variable that fsspec reads at import in worker
    processes started with `spawn`.
    """
    if OmegaConf.is_config(options):
        options = OmegaConf.to_container(options, resolve=True)
    if not options:
        return
    if not isinstance(options, Mapping):
        raise ConfigError(
            f"storage_options must map an fsspec protocol to its options, e.g. storage_options.s3.anon=true, "
            f"not {options!r}"
        )
    for protocol, values in options.items():
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"storage_options.{protocol} must be a mapping of fsspec options (e.g. "
                f"+storage_options.{protocol}.anon=true), not {values!r}: options are given per protocol"
            )
        merged = fsspec.config.conf.setdefault(str(protocol), {})
        merged.update(dict(values))
        os.environ[f"FSSPEC_{str(protocol).upper()}"] = json.dumps(merged, default=str)


class RemoteStoresCallback(Callback):
    """Registered for every command in conf/hydra/default.yaml (so also for every rank a DDP launcher
    re-executes): applies the job's `storage_options` before the command runs, and keeps URL credentials out
    of what Hydra itself records and prints (the run folder's `.hydra/*.yaml`, the failed job's overrides
    and error)."""

    def on_job_start(self, config: DictConfig, *, task_function: Any, **kwargs: Any) -> None:
        apply_storage_options(config.get("storage_options"))
        output_dir = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        output_subdir = OmegaConf.select(config, "hydra.output_subdir", default=None)
        if output_dir and output_subdir:  # Hydra has saved the job's config there already
            _redact_files(os.path.join(str(output_dir), str(output_subdir)))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if job_return.overrides:
            job_return.overrides = [redact_text(str(o)) for o in job_return.overrides]
        failure = getattr(job_return, "_return_value", None)  # what Hydra prints and re-raises next
        if isinstance(failure, BaseException):
            redact_exception(failure)


def _redact_files(folder: str) -> None:
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError:
            continue
        redacted = redact_text(text)
        if redacted != text:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(redacted)


def redact_exception(err: BaseException) -> None:
    """Redact URL credentials in an exception's message, in place (its causes too), before it is shown."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.args = tuple(redact_text(a) if isinstance(a, str) else a for a in current.args)
        if isinstance(current, OSError):
            for attribute in ("strerror", "filename", "filename2"):
                value = getattr(current, attribute, None)
                if isinstance(value, str):
                    setattr(current, attribute, redact_text(value))
        current = current.__cause__ or current.__context__
