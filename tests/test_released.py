"""Released weights by name (issue 14, item 2): the registry, the caches, the Hub layout, strict init_from.

No test touches the network: caches are pre-populated in tmp_path (HF_HOME, TORCH_HOME) with small CED files
in each layout, and the one download goes through a file:// URL. On the code before this change, a name such
as `ced_tiny` was read as a (missing) file path, a safetensors file failed in `torch.load`, and `init_from`
silently skipped whatever did not match.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ced_lightning.models import (
    RELEASED,
    ReleasedWeights,
    ReleasedWeightsUnavailable,
    create_ced,
    fetch_released,
    list_released,
    load_ced,
    load_checkpoint,
    load_matching_weights,
)
from ced_lightning.models.released import hub_cache_dir
from conftest import CED_TINY_SUMS, float32_bound

# A commit hash as the Hub cache names snapshot folders.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Hub conversion (convert_ced_original_to_pytorch.py) applied to an original state dict, written
    here from its description: front-end buffers dropped, init_bn.1 -> init_bn, all but outputlayer under
    `encoder.`."""
    out = {}
    for key, value in original.items():
        if key.startswith("front_end"):
            continue
        key = key.replace("init_bn.1", "init_bn")
        out[key if key.startswith("outputlayer") else f"encoder.{key}"] = value.contiguous()
    return out


@pytest.fixture
def reference_sd(ced_reference: Path) -> dict[str, torch.Tensor]:
    return torch.load(ced_reference / "ced_tiny_depth2_random.pt", weights_only=True)["model"]


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Empty Hub and torch.hub caches under tmp_path, offline."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {"hub": tmp_path / "hf" / "hub", "torch": tmp_path / "torch" / "hub" / "checkpoints"}


def put_in_hub_cache(hub: Path, repo: str, filename: str, sd: dict[str, torch.Tensor]) -> Path:
    """The layout hf_hub_download leaves: refs/main -> snapshot folder holding the file."""
    folder = hub / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    path = folder / "snapshots" / COMMIT / filename
    path.parent.mkdir(parents=True)
    save_file(sd, str(path))
    return path


def put_in_torch_cache(torch_dir: Path, filename: str, source: Path) -> Path:
    torch_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, torch_dir / filename))


def test_registry_names_the_papers_files() -> None:
    assert list_released() == [
        f"ced_{size}{suffix}" for size in ("tiny", "mini", "small", "base") for suffix in ("", "_mae")
    ]
    mini = RELEASED["ced_mini"]
    assert mini.filename == "audiotransformer_mini_mAP_4896.pt"
    assert mini.zenodo_urls[0] == (
        "https://zenodo.org/records/8275347/files/audiotransformer_mini_mAP_4896.pt?download=1"
    )
    assert mini.hub_repo == "mispeech/ced-mini" and mini.hub_filename == "model.safetensors"
    mae = RELEASED["ced_small_mae"]
    assert mae.filename == "audiotransformer_small_mae_as_10s.pt" and mae.hub_repo is None
    assert mae.size == "ced_small" and mae.kind == "mae" and mae.unused_tensors_ok
    # Every URL ends in the file name, which is what the torch.hub cache file is called.
    for entry in RELEASED.values():
        assert all(url.split("?")[0].endswith("/" + entry.filename) for url in entry.zenodo_urls)


def test_hub_layout_loads_with_the_original_outputs(tmp_path, ced_reference, reference_sd) -> None:
    path = tmp_path / "model.safetensors"
    save_file(hub_layout(reference_sd), str(path))
    from_hub, original = load_ced(path), load_ced(ced_reference / "ced_tiny_depth2_random.pt")
    assert from_hub.config == original.config
    for key, value in original.state_dict().items():
        assert torch.equal(from_hub.state_dict()[key], value), key
    expected = torch.load(ced_reference / "expected_outputs.pt", weights_only=True)
    wav, _ = sf.read(ced_reference / "snap_1s.wav", dtype="float32")
    with torch.no_grad():
        logits = from_hub(torch.from_numpy(wav)[None])
    bound = float32_bound(expected["snap_1s"], CED_TINY_SUMS)  # the original's kernels, not ours
    torch.testing.assert_close(logits, expected["snap_1s"], atol=bound, rtol=0)
    # load_checkpoint (evaluate, predict, export, teachers) and its hash read the same file.
    loaded = load_checkpoint(path, sha256=True)
    assert loaded.sha256 is not None and len(loaded.sha256) == 64


def test_name_loads_from_the_hub_cache_offline(caches, reference_sd) -> None:
    put_in_hub_cache(caches["hub"], "mispeech/ced-tiny", "model.safetensors", hub_layout(reference_sd))
    assert hub_cache_dir() == str(caches["hub"])
    model = load_ced("ced_tiny")
    assert torch.equal(model.blocks[1].attn.qkv.weight, reference_sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.front_end[0].mel_scale.fb, reference_sd["front_end.0.mel_scale.fb"])


def test_name_loads_from_the_torch_hub_cache_offline(caches, ced_reference, reference_sd) -> None:
    put_in_torch_cache(
        caches["torch"], "audiotransformer_tiny_mAP_4814.pt", ced_reference / "ced_tiny_depth2_random.pt"
    )
    loaded = load_checkpoint("ced_tiny")
    assert torch.equal(loaded.model.norm.weight, reference_sd["norm.weight"])
    assert fetch_released("ced_tiny") == caches["torch"] / "audiotransformer_tiny_mAP_4814.pt"


def test_offline_without_cache_names_file_url_and_where_to_put_it(caches) -> None:
    with pytest.raises(ReleasedWeightsUnavailable) as err:
        load_ced("ced_mini")
    message = str(err.value)
    for part in (
        "ced_mini",
        "HF_HUB_OFFLINE=1",
        "audiotransformer_mini_mAP_4896.pt",
        "https://zenodo.org/records/8275347/files/audiotransformer_mini_mAP_4896.pt?download=1",
        str(caches["torch"] / "audiotransformer_mini_mAP_4896.pt"),
        "mispeech/ced-mini",
        "models--mispeech--ced-mini",
        str(caches["hub"]),
    ):
        assert part in message, (part, message)
    # The MAE files exist on Zenodo only.
    with pytest.raises(ReleasedWeightsUnavailable, match=r"audiotransformer_base_mae_as_10s\.pt"):
        fetch_released("ced_base_mae")


def test_download_once_into_the_torch_hub_cache(tmp_path, caches, ced_reference, monkeypatch) -> None:
    # urllib reads file:// URLs, so the real download path runs without a network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    served = tmp_path / "served" / "weights.pt"
    served.parent.mkdir()
    shutil.copy(ced_reference / "ced_tiny_depth2_random.pt", served)
    entry = ReleasedWeights(
        name="test_tiny", size="ced_tiny", kind="audioset", filename="weights.pt",
        zenodo_urls=(served.as_uri(),),
    )  # fmt: skip
    path = fetch_released(entry)
    assert path == caches["torch"] / "weights.pt" and path.read_bytes() == served.read_bytes()
    served.unlink()  # a second call uses the cache
    assert fetch_released(entry) == path

    wrong = ReleasedWeights(
        name="test_hash", size="ced_tiny", kind="audioset", filename="hashed.pt",
        zenodo_urls=((tmp_path / "served" / "hashed.pt").as_uri(),), sha256="00" * 32,
    )  # fmt: skip
    shutil.copy(ced_reference / "ced_tiny_depth2_random.pt", tmp_path / "served" / "hashed.pt")
    with pytest.raises(ReleasedWeightsUnavailable, match="invalid hash value"):
        fetch_released(wrong)
    assert not (caches["torch"] / "hashed.pt").exists()  # nothing half-checked is left in the cache


def test_create_ced_pretrained_and_init_from_by_name(caches, ced_reference, reference_sd) -> None:
    from ced_lightning.engines.training import build_network

    put_in_torch_cache(
        caches["torch"], "audiotransformer_tiny_mAP_4814.pt", ced_reference / "ced_tiny_depth2_random.pt"
    )
    model = create_ced("ced_tiny", pretrained=True, depth=2)
    assert torch.equal(model.outputlayer[1].weight, reference_sd["outputlayer.1.weight"])

    cfg = OmegaConf.create(
        {"model": {"_target_": "ced_lightning.models.create_ced", "name": "ced_tiny", "depth": 2,
                   "num_classes": None, "init_from": "ced_tiny", "init_strict": True}}
    )  # fmt: skip
    student = build_network(cfg, num_classes=7)  # another class count: only the head starts fresh
    assert torch.equal(student.blocks[0].mlp.fc1.weight, reference_sd["blocks.0.mlp.fc1.weight"])
    assert student.outputlayer[1].weight.shape == (7, 192)


def test_init_from_the_mae_name_accepts_its_extra_tensors(caches, reference_sd) -> None:
    # The MAE files' exact contents are not known here (Zenodo only): what the rule allows is an encoder
    # without a head plus tensors the student lacks, which the original loads with strict=False too.
    mae = {k: v for k, v in reference_sd.items() if not k.startswith("outputlayer")}
    mae["decoder_pos_embed"] = torch.zeros(1, 4, 8)
    path = caches["torch"] / "audiotransformer_tiny_mae_as_10s.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": mae}, path)
    student = create_ced("ced_tiny", depth=2, num_classes=5)
    report = load_matching_weights(student, "ced_tiny_mae")
    assert report.unexpected == ["decoder_pos_embed"] and report.unexpected_ok
    assert set(report.head) == {
        "outputlayer.0.weight",
        "outputlayer.0.bias",
        "outputlayer.1.weight",
        "outputlayer.1.bias",
    }
    assert torch.equal(student.patch_embed.proj.weight, reference_sd["patch_embed.proj.weight"])
    # The same file by path (the offline route the docs give: its released file name) is judged alike.
    assert load_matching_weights(create_ced("ced_tiny", depth=2), path).unexpected_ok
    # Under another name nothing says it carries extras: strict refuses it, naming them.
    renamed = path.with_name("my_encoder.pt")
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match=r"in the file, not in the model \(1\): decoder_pos_embed"):
        load_matching_weights(create_ced("ced_tiny", depth=2), renamed)


def test_init_from_matching_only_some_keys_fails_unless_not_strict(tmp_path, ced_reference) -> None:
    from ced_lightning.engines.training import build_network

    ref = ced_reference / "ced_tiny_depth2_random.pt"
    deeper = create_ced("ced_tiny", depth=3)
    before = deeper.blocks[2].attn.qkv.weight.clone()
    with pytest.raises(ValueError) as err:
        load_matching_weights(deeper, ref)
    message = str(err.value)
    assert "missing from the file (12): blocks.2.norm1.weight" in message, message
    assert "model.init_strict=false" in message
    assert torch.equal(deeper.blocks[2].attn.qkv.weight, before)  # nothing loaded on refusal

    cfg = {"_target_": "ced_lightning.models.create_ced", "name": "ced_tiny", "depth": 3,
           "num_classes": None, "init_from": str(ref), "init_strict": True}  # fmt: skip
    with pytest.raises(ValueError, match="missing from the file"):
        build_network(OmegaConf.create({"model": cfg}), num_classes=527)
    partial = build_network(OmegaConf.create({"model": {**cfg, "init_strict": False}}), num_classes=527)
    reference = load_ced(ref)
    assert torch.equal(partial.blocks[1].mlp.fc2.weight, reference.blocks[1].mlp.fc2.weight)

    # Another width: shapes differ everywhere.
    with pytest.raises(
        ValueError,
        match=r"shape differs \(\d+\): .*patch_embed\.proj\.weight: file \[192, 1, 16, 16\] vs model \[256",
    ):
        load_matching_weights(create_ced("ced_mini", depth=2), ref)


def test_init_from_matching_no_keys_fails_even_if_it_names_every_key_missing(tmp_path) -> None:
    torch.save({"model": {"weight": torch.zeros(3), "bias": torch.zeros(3)}}, tmp_path / "other.pt")
    model = create_ced("ced_tiny", depth=1)
    with pytest.raises(
        ValueError, match=r"(?s)0 of the model's \d+ tensors match.*in the file, not in the model \(2\)"
    ):
        load_matching_weights(model, tmp_path / "other.pt")
    report = load_matching_weights(model, tmp_path / "other.pt", strict=False)
    assert report.loaded == [] and len(report.missing) > 0


def test_teacher_members_by_name(caches, ced_reference) -> None:
    from ced_lightning.engines.teachers import load_teachers

    cached = put_in_torch_cache(
        caches["torch"], "audiotransformer_tiny_mAP_4814.pt", ced_reference / "ced_tiny_depth2_random.pt"
    )
    models, records, _ = load_teachers(OmegaConf.create({"checkpoints": ["ced_tiny"]}))
    assert records[0]["name"] == "ced_tiny" and records[0]["checkpoint"] == "ced_tiny"
    import hashlib

    assert records[0]["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()
    assert models[0].config.depth == 2


def test_docs_table_lists_every_name() -> None:
    text = (Path(__file__).parents[1] / "docs" / "using_models.md").read_text()
    for name, entry in RELEASED.items():
        assert f"`{name}`" in text and entry.filename in text, name


# -- released names without network ---------------------------------------------------------------------
# A machine without network, made real on any machine: every download goes through a proxy that refuses
# connections (urllib and huggingface_hub both read the proxy variables), so nothing reaches the internet.
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def through_proxy(monkeypatch: pytest.MonkeyPatch, proxy: str) -> None:
    """Online mode (the Hub library's import-time flag too), every connection through `proxy`."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in PROXY_VARIABLES:
        monkeypatch.setenv(variable, proxy)
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)


def instructions(message: str) -> str:
    """What a message tells the user to do: everything from its first instruction on."""
    return message[message.index("Put the file in place") :]


def unavailable(name: str) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(ReleasedWeightsUnavailable) as err:
        load_ced(name)
    return str(err.value), time.monotonic() - started


def test_no_network_is_noticed_at_once_and_the_error_says_what_exists_and_where_it_goes(
    caches, monkeypatch
) -> None:
    # Before: huggingface_hub retried for about 24 s (1 + 2 + 4 + 8 + 8 s) before Zenodo was tried.
    port = closed_port()
    through_proxy(monkeypatch, f"http://127.0.0.1:{port}")
    message, seconds = unavailable("ced_mini")
    assert seconds < 2.0, (seconds, message)
    for part in (
        f"no network: proxy 127.0.0.1:{port} for huggingface.co unreachable (ConnectionRefusedError",
        f"no network: proxy 127.0.0.1:{port} for zenodo.org unreachable",
        "Released names: ced_tiny, ced_mini, ced_small, ced_base (AudioSet taggers); ced_tiny_mae, "
        "ced_mini_mae, ced_small_mae, ced_base_mae (MAE encoders). Cached on this machine: none.",
        f"at {caches['torch'] / 'audiotransformer_mini_mAP_4896.pt'}",
        f"into {caches['hub']}",
        "models--mispeech--ced-mini",
    ):
        assert part in message, (part, message)

    # HF_HUB_OFFLINE=1: no probe at all, the same instructions.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline, seconds = unavailable("ced_mini")
    assert seconds < 0.5 and "HF_HUB_OFFLINE=1: no download tried" in offline
    assert instructions(offline) == instructions(message)


def test_a_network_that_drops_connections_costs_the_connect_timeout_once(caches, monkeypatch) -> None:
    # A proxy whose backlog is full: the kernel drops further connection attempts, as a firewall does, so a
    # connect waits until its timeout (the case a socket error never reports).
    from ced_lightning.models import released

    monkeypatch.setattr(released, "CONNECT_TIMEOUT_S", 0.5)
    with socket.socket() as blackhole, socket.socket() as queued:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        port = blackhole.getsockname()[1]
        queued.connect(("127.0.0.1", port))  # fills the backlog; never accepted
        through_proxy(monkeypatch, f"http://127.0.0.1:{port}")
        message, seconds = unavailable("ced_small")
    assert 0.4 < seconds < 2.0, (seconds, message)
    assert f"proxy 127.0.0.1:{port} for huggingface.co accepted no connection within 0.5 s" in message


def test_no_proxy_exempts_a_host_from_the_proxy(monkeypatch) -> None:
    from ced_lightning.models.released import _connect_target

    through_proxy(monkeypatch, "http://proxy.example:3128")
    assert _connect_target("https://zenodo.org/records/1/files/x.pt")[:2] == ("proxy.example", 3128)
    monkeypatch.setenv("NO_PROXY", "zenodo.org")
    assert _connect_target("https://zenodo.org/records/1/files/x.pt")[:2] == ("zenodo.org", 443)
    assert _connect_target("file:///tmp/x.pt") is None  # local URLs are never probed


def test_ced_predict_without_network_fails_in_seconds(caches, monkeypatch, ced_reference, capsys) -> None:
    from ced_lightning.cli import predict_main

    put_in_torch_cache(
        caches["torch"], "audiotransformer_tiny_mAP_4814.pt", ced_reference / "ced_tiny_depth2_random.pt"
    )
    through_proxy(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    status = predict_main([str(ced_reference / "snap_1s.wav"), "--model", "ced_mini"])
    assert status == 1 and time.monotonic() - started < 2.0
    stderr = capsys.readouterr().err
    assert "no network" in stderr and "Cached on this machine: ced_tiny." in stderr, stderr
    assert stderr.startswith("ced-predict: error: ") and "Traceback" not in stderr


def test_a_near_miss_of_a_name_suggests_it(caches, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for typo in ("ced-mini", "ced_minii", "CED_mini"):
        with pytest.raises(FileNotFoundError, match=r"did you mean 'ced_mini'\? Released names: ced_tiny"):
            load_ced(typo)
    (tmp_path / "ced-mini").write_bytes(b"")  # an existing file of that name is that file
    with pytest.raises(ValueError, match="cannot load this checkpoint"):
        load_ced("ced-mini")
