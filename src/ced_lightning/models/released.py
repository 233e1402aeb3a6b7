"""The paper's released weights by name: a registry and a download-once cache (the Hub's key layout:
`models.hub`).

Names (`list_released()`): `ced_tiny`, `ced_mini`, `ced_small`, `ced_base` (the AudioSet taggers of the paper,
527 classes) and `ced_tiny_mae` ... `ced_base_mae` (the self-supervised MAE encoders the paper's students
start from). Wherever a checkpoint path is accepted (`load_ced`, `load_checkpoint`, `model.init_from`,
teacher members, `ckpt=` of evaluate / predict / export) a name is accepted too: `resolve_checkpoint`.

Where the files live (the conventions of the libraries that fetch them, so caches are shared with them):
- Hugging Face Hub (`mispeech/ced-*`, `model.safetensors`): `huggingface_hub.hf_hub_download` into the Hub
  cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, default `~/.cache/huggingface/hub`).
- Zenodo (the original `.pt` files): `torch.hub.download_url_to_file` into `torch.hub.get_dir()/checkpoints`
  (`TORCH_HOME/hub/checkpoints`, default `~/.cache/torch/hub/checkpoints`), the file name as in the URL: the
  original code's `torch.hub.load_state_dict_from_url` uses the same place, so its downloads are reused.

A file already in either cache is used without touching the network. `HF_HUB_OFFLINE=1` turns every
download (Hub and Zenodo) into a cache lookup. Otherwise each server (or the proxy the environment names for
it) is probed first with a TCP connection of at most `CONNECT_TIMEOUT_S`, so a machine without network is told
so in seconds instead of after the download libraries' retries. Without a cached file the error lists the
released names, names each file, its URL and the exact path to put it at.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from urllib.parse import urlparse

import torch

from ced_lightning.core.errors import CedError, ConfigError

log = logging.getLogger(__name__)

_ZENODO = "https://zenodo.org/records/{record}/files/{filename}?download=1"
# The paper's code and the Hub conversion script name two versions of the Zenodo record: 8275347 (the
# README's and the conversion script's for tiny, mini, base; every MAE file) and 8275319 (the model code's for
# every tagger, and the only one both name for small). The first listed URL is tried first.
_RECORDS_TAGGER = ("8275347", "8275319")
_RECORDS_SMALL = ("8275319", "8275347")
# How long a download server (or its proxy) may take to accept a TCP connection before the machine counts as
# offline: one lost SYN (resent after 1 s) still fits; a firewall that drops everything costs this once.
CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ReleasedWeights:
    """One released file of the paper, as its code (github.com/RicherMans/CED) and the Hub name it."""

    name: str  # registry key: ced_mini, ced_mini_mae, ...
    size: str  # the CED size it fits (`create_ced(size)`)
    kind: str  # "audioset": the fine-tuned 527-class tagger; "mae": the MAE-pretrained encoder
    filename: str  # the Zenodo file (and the torch.hub cache file name)
    zenodo_urls: tuple[str, ...]
    hub_repo: str | None = None  # Hub repository with the same weights in safetensors (Hub layout)
    hub_filename: str = "model.safetensors"
    # sha256 of the Zenodo file; neither the paper's code nor the Hub conversion publishes one, so None: a
    # Hub download is checked by huggingface_hub against the Hub's own sha256 (its etag) instead.
    sha256: str | None = None
    audioset_map: float | None = None  # mAP on AudioSet's eval set as published (the number in the name)
    approx_mb: float = 0.0  # float32 weights (state-dict sizes of `create_ced(size)`)
    # The original loads its MAE files with strict=False: tensors the student does not have (e.g. an MAE
    # decoder) are reported but do not fail a strict `init_from`.
    unused_tensors_ok: bool = False

    @property
    def torch_cache_path(self) -> Path:
        """Where the Zenodo file is cached (and where to put it by hand)."""
        return Path(torch.hub.get_dir()) / "checkpoints" / self.filename


def _entries() -> dict[str, ReleasedWeights]:
    sizes = {  # size: (tagger file's mAP tag, published mAP, approx. MB of float32 weights)
        "tiny": ("4814", 48.14, 22.1),
        "mini": ("4896", 48.96, 38.9),
        "small": ("4958", 49.58, 86.6),
        "base": ("4999", 49.99, 342.9),
    }
    out: dict[str, ReleasedWeights] = {}
    for size, (tag, map_, mb) in sizes.items():
        tagger = f"audiotransformer_{size}_mAP_{tag}.pt"
        records = _RECORDS_SMALL if size == "small" else _RECORDS_TAGGER
        out[f"ced_{size}"] = ReleasedWeights(
            name=f"ced_{size}",
            size=f"ced_{size}",
            kind="audioset",
            filename=tagger,
            zenodo_urls=tuple(_ZENODO.format(record=r, filename=tagger) for r in records),
            hub_repo=f"mispeech/ced-{size}",
            audioset_map=map_,
            approx_mb=mb,
        )
        mae = f"audiotransformer_{size}_mae_as_10s.pt"
        out[f"ced_{size}_mae"] = ReleasedWeights(
            name=f"ced_{size}_mae",
            size=f"ced_{size}",
            kind="mae",
            filename=mae,
            zenodo_urls=(_ZENODO.format(record="8275347", filename=mae),),
            approx_mb=mb,
            unused_tensors_ok=True,
        )
    return out


RELEASED: dict[str, ReleasedWeights] = _entries()


def list_released() -> list[str]:
    return list(RELEASED)


def released_entry(name_or_path: str | PathLike) -> ReleasedWeights | None:
    """The registry entry a checkpoint argument names, or None for a path or URL.

    A registered name always means the released file: a local file called exactly `ced_mini` is `./ced_mini`.
    """
    return RELEASED.get(str(name_or_path)) if isinstance(name_or_path, str) else None


def released_entry_by_filename(path: str | PathLike) -> ReleasedWeights | None:
    """The registry entry whose released file `path` is, by its file name (as downloaded), or None."""
    name = Path(os.fspath(path)).name
    return next((entry for entry in RELEASED.values() if entry.filename == name), None)


def resolve_checkpoint(name_or_path: str | PathLike) -> str:
    """A registered name -> the local path of its (cached, else downloaded) file; anything else unchanged.

    A bare word that is neither a file nor a registered name but close to one (`ced-mini`, `ced_minii`) raises
    `FileNotFoundError` listing the names, instead of a missing-file error that does not mention them.
    """
    entry = released_entry(name_or_path)
    if entry is not None:
        return str(fetch_released(entry))
    path = str(name_or_path)
    if "/" not in path and os.sep not in path and not os.path.lexists(path):
        close = difflib.get_close_matches(path.lower(), list_released(), n=1, cutoff=0.75)
        if close:
            raise FileNotFoundError(
                f"{path}: no such file, and no released model of that name; did you mean {close[0]!r}? "
                f"{released_names_line()}"
            )
    return path


def released_names_line() -> str:
    """One line listing the released names by kind, and which of them the caches hold now."""
    taggers = ", ".join(n for n, e in RELEASED.items() if e.kind == "audioset")
    encoders = ", ".join(n for n, e in RELEASED.items() if e.kind == "mae")
    cached = [n for n, e in RELEASED.items() if cached_released(e) is not None]
    return (
        f"Released names: {taggers} (AudioSet taggers); {encoders} (MAE encoders). "
        f"Cached on this machine: {', '.join(cached) or 'none'}."
    )


class ReleasedWeightsUnavailable(CedError, FileNotFoundError):
    """A released file is in no cache and could not be downloaded."""


def hub_cache_dir() -> str:
    """The Hub cache as huggingface_hub defines it, read at call time (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    """`HF_HUB_OFFLINE` as set now (huggingface_hub's own flag is read once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cached_released(entry: ReleasedWeights) -> Path | None:
    """The entry's file if either cache holds it (the Hub's first), without any network access."""
    if entry.hub_repo is not None:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(entry.hub_repo, entry.hub_filename, cache_dir=hub_cache_dir())
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    path = entry.torch_cache_path
    return path if path.is_file() else None


def fetch_released(entry: ReleasedWeights | str) -> Path:
    """The local file of a released checkpoint: from a cache, else downloaded once (Hub, then Zenodo)."""
    if isinstance(entry, str):
        if entry not in RELEASED:
            raise ConfigError(f"unknown released weights {entry!r}; choose one of {list_released()}")
        entry = RELEASED[entry]
    cached = cached_released(entry)
    if cached is not None:
        log.info("%s: %s", entry.name, cached)
        return cached
    if hub_offline():
        raise ReleasedWeightsUnavailable(_unavailable_message(entry, ["HF_HUB_OFFLINE=1: no download tried"]))
    hub_url = _hub_endpoint() if entry.hub_repo is not None else None
    unreachable = unreachable_servers([u for u in (hub_url, *entry.zenodo_urls) if u])
    # One line per unreachable server (both Zenodo records are one server), then each download that failed.
    failures = list(dict.fromkeys(unreachable.values()))
    if hub_url is not None and hub_url not in unreachable:
        try:
            return _download_from_hub(entry)
        except Exception as err:  # any failure (proxy, HTTP error, ...) falls back to Zenodo
            failures.append(f"{entry.hub_repo}/{entry.hub_filename}: {type(err).__name__}: {err}")
    for url in entry.zenodo_urls:
        if url in unreachable:
            continue
        try:
            return _download_url(entry, url)
        except Exception as err:
            failures.append(f"{url}: {type(err).__name__}: {err}")
    raise ReleasedWeightsUnavailable(_unavailable_message(entry, failures))


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _connect_target(url: str) -> tuple[str, int, str] | None:
    """(host, port, what) a download of `url` connects to first: the proxy the environment names for its
    scheme (`HTTPS_PROXY`, `ALL_PROXY`, ... as urllib and huggingface_hub read them) unless `NO_PROXY` exempts
    the host, else the host itself; None for URLs that need no network (file://)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return None
    default_port = 443 if parsed.scheme == "https" else 80
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parsed.hostname):
        proxied = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        if proxied.hostname:
            port = proxied.port or {"https": 443, "http": 80}.get(proxied.scheme, 1080)
            return proxied.hostname, port, f"proxy {proxied.hostname}:{port} for {parsed.hostname}"
    port = parsed.port or default_port
    return parsed.hostname, port, f"{parsed.hostname}:{port}"


def unreachable_servers(urls: list[str], timeout: float | None = None) -> dict[str, str]:
    """The `urls` whose server (or proxy) accepts no TCP connection within `timeout` seconds (default
    `CONNECT_TIMEOUT_S`), each with the reason. All are probed at once, each in a daemon thread, so the wait
    is bounded by `timeout` even where name resolution hangs (a socket timeout does not cover it)."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    targets = {url: target for url in urls if (target := _connect_target(url)) is not None}
    outcomes: dict[tuple[str, int], str | None] = {}

    def probe(host: str, port: int) -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcomes[host, port] = None
        except OSError as err:
            outcomes[host, port] = f"{type(err).__name__}: {err}"

    started = time.monotonic()
    threads = []
    for host, port in {(host, port) for host, port, _ in targets.values()}:
        thread = threading.Thread(target=probe, args=(host, port), daemon=True, name=f"probe {host}:{port}")
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(max(0.0, timeout - (time.monotonic() - started)))
    out = {}
    for url, (host, port, what) in targets.items():
        if (host, port) not in outcomes:
            out[url] = f"no network: {what} accepted no connection within {timeout:g} s"
        elif outcomes[host, port] is not None:
            out[url] = f"no network: {what} unreachable ({outcomes[host, port]})"
    return out


def _download_from_hub(entry: ReleasedWeights) -> Path:
    from huggingface_hub import hf_hub_download

    log.info("downloading %s (%s) from the Hugging Face Hub", entry.name, entry.hub_repo)
    return Path(hf_hub_download(entry.hub_repo, entry.hub_filename, cache_dir=hub_cache_dir()))


def _download_url(entry: ReleasedWeights, url: str) -> Path:
    target = entry.torch_cache_path
    if Path(urlparse(url).path).name != entry.filename:
        raise ValueError(f"{entry.name}: URL {url} does not end in its file name {entry.filename}")
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s (about %.0f MB) from %s to %s", entry.name, entry.approx_mb, url, target)
    # Written to a temporary file and moved into place only when complete (and its hash matches, if known),
    # so an interrupted download never leaves a truncated file in the cache.
    torch.hub.download_url_to_file(url, str(target), hash_prefix=entry.sha256, progress=True)
    return target


def _unavailable_message(entry: ReleasedWeights, failures: list[str]) -> str:
    lines = [
        f"released weights {entry.name!r} are in no cache and could not be downloaded:",
        *(f"  {f}" for f in failures),
        "Put the file in place (downloaded on a machine with network) and run again, either:",
        f"  {entry.filename} from {entry.zenodo_urls[0]}",
        f"    at {entry.torch_cache_path}   (torch.hub.get_dir()/checkpoints; TORCH_HOME moves it)",
    ]
    if entry.hub_repo is not None:
        repo_dir = "models--" + entry.hub_repo.replace("/", "--")
        lines += [
            f"  or {entry.hub_filename} of https://huggingface.co/{entry.hub_repo}: `hf download "
            f"{entry.hub_repo} {entry.hub_filename}` there, then copy its cache folder {repo_dir}",
            f"    into {hub_cache_dir()}   (the Hub cache; HF_HOME or HF_HUB_CACHE move it)",
        ]
    lines += [f"or give the file's path instead of the name {entry.name!r}.", released_names_line()]
    return "\n".join(lines)
