"""Back to the Hub: `export format=hf` writes the Hugging Face Hub port's folder; our reader reads it back.

The port is github.com/jimbozhang/hf_transformers_custom_model_ced. Its converter
(`convert_ced_original_to_pytorch.py`, `remove_keys` and `rename_key`) turns an original state dict into its
keys: every `front_end*` key dropped, `init_bn.1` replaced by `init_bn`, and every key but `outputlayer*`
prefixed with `encoder.`; its config (`ced_model/configuration_ced.py`, `CedConfig.__init__`) holds the
fields listed in `PORT_CONFIG_FIELDS`, and for a name of the paper's sizes (`ced-tiny` ...) sets
`embed_dim` and `num_heads` from it. `port_converter_keys` is that rule, written here from the converter,
not from our mapping (`models.hub.KEY_PREFIXES`), so the two are compared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.engines.hub_export import export_hub
from ced_lightning.models import create_ced, load_ced, load_checkpoint, save_ced
from ced_lightning.models.hub import (
    from_hub_layout,
    hub_config,
    port_size_name,
    to_hub_layout,
    write_hub_folder,
)
from conftest import run_command

# CedConfig.__init__'s attributes (configuration_ced.py), beside PretrainedConfig's id2label / label2id.
PORT_CONFIG_FIELDS = {
    "name", "attn_drop_rate", "center", "depth", "drop_path_rate", "drop_rate", "embed_dim", "eval_avg",
    "f_max", "f_min", "hop_size", "mlp_ratio", "n_fft", "n_mels", "num_heads", "outputdim", "pad_last",
    "patch_size", "patch_stride", "pooling", "qkv_bias", "target_length", "win_size", "loss",
}  # fmt: skip
# CedFeatureExtractor.__init__'s arguments (feature_extraction_ced.py).
PORT_EXTRACTOR_FIELDS = {
    "f_min", "sampling_rate", "win_size", "center", "n_fft", "f_max", "hop_size", "feature_size",
    "padding_value",
}  # fmt: skip
# The port's CedConfig table of names (configuration_ced.py): name -> (embed_dim, num_heads).
PORT_NAMES = {"ced-tiny": (192, 3), "ced-mini": (256, 4), "ced-small": (384, 6), "ced-base": (768, 12)}


def port_converter_keys(original: dict[str, torch.Tensor]) -> list[str]:
    """The converter's `remove_keys` then `rename_key` on an original state dict's keys."""
    keys = [key for key in original if not key.startswith("front_end")]
    keys = [key.replace("init_bn.1", "init_bn") for key in keys]
    return sorted(key if key.startswith("outputlayer") else f"encoder.{key}" for key in keys)


@pytest.fixture(scope="module")
def tiny(ced_reference: Path):
    return load_ced(ced_reference / "ced_tiny_depth2_random.pt")


def test_keys_are_the_converters(tiny, tmp_path: Path) -> None:
    original = tiny.state_dict()
    folder = write_hub_folder(tiny, [f"c{i}" for i in range(527)], tmp_path / "hf")
    written = load_file(str(folder / "model.safetensors"))
    assert sorted(written) == port_converter_keys(original)
    assert "encoder.init_bn.running_mean" in written and "outputlayer.1.weight" in written
    # The one mapping, read the other way, gives back every tensor but the front end's buffers.
    back = from_hub_layout(to_hub_layout(original))
    assert sorted(back) == sorted(k for k in original if not k.startswith("front_end."))
    assert all(torch.equal(back[key], original[key]) for key in back)


def test_config_fields_are_the_ports(tiny) -> None:
    config = hub_config(tiny.config, [f"c{i}" for i in range(527)])
    assert set(config) - {"architectures", "model_type", "torch_dtype", "id2label", "label2id"} == (
        PORT_CONFIG_FIELDS
    )
    assert config["architectures"] == ["CedForAudioClassification"] and config["model_type"] == "ced"
    # The converter's values for a released size (CedConfig("ced-tiny") with its defaults) where the
    # shapes agree; depth is the checkpoint's (2 here).
    assert config["name"] == "ced-tiny" and PORT_NAMES["ced-tiny"] == (
        config["embed_dim"],
        config["num_heads"],
    )
    port_defaults = {
        "pooling": "mean", "eval_avg": "mean", "outputdim": 527, "patch_size": 16, "patch_stride": 16,
        "target_length": 1012, "mlp_ratio": 4.0, "qkv_bias": True, "n_mels": 64, "n_fft": 512,
        "win_size": 512, "hop_size": 160, "f_min": 0, "f_max": 8000, "center": True, "pad_last": True,
        "loss": "BCE", "depth": 2,
    }  # fmt: skip
    assert {key: config[key] for key in port_defaults} == port_defaults
    assert config["id2label"]["5"] == "c5" and config["label2id"]["c5"] == 5
    # Another shape carries no name: the port would overwrite embed_dim and num_heads from it.
    assert port_size_name(create_ced("ced_tiny", embed_dim=128, num_heads=2, depth=1).config) is None


def test_round_trip_keeps_outputs_names_and_config(tmp_path: Path) -> None:
    """A 5-class student with its own class names: written, read back by `load_checkpoint` (the folder)
    and `load_ced` (its model.safetensors): the same logits, exactly, the same names and config."""
    torch.manual_seed(0)
    model = create_ced("ced_mini", depth=1, num_classes=5, target_length=496).eval()
    names = ["dog", "cat", "siren", "rain", "speech, male"]
    folder = write_hub_folder(model, names, tmp_path / "hf")
    loaded = load_checkpoint(folder)
    assert loaded.class_names == names and loaded.model.config == model.config
    from_file = load_ced(folder / "model.safetensors")  # the shapes alone: target_length up to a patch
    waveform = 0.1 * torch.randn(3, 40000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(waveform)
        assert torch.equal(loaded.model(waveform), expected)
        assert torch.equal(from_file(waveform), expected)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    assert set(preprocessor) - {"feature_extractor_type", "padding_side", "return_attention_mask"} == (
        PORT_EXTRACTOR_FIELDS
    )
    assert preprocessor["feature_extractor_type"] == "CedFeatureExtractor"
    assert (preprocessor["sampling_rate"], preprocessor["feature_size"]) == (16000, 64)


def test_what_the_port_cannot_hold_is_refused(tmp_path: Path) -> None:
    model = create_ced("ced_tiny", depth=1, num_classes=3)
    with pytest.raises(InputError, match="one unique name per output"):
        write_hub_folder(model, ["a", "a", "b"], tmp_path / "dup")
    quiet_floor = create_ced("ced_tiny", depth=1, num_classes=3)
    front = quiet_floor.config.front_end
    with pytest.raises(ConfigError, match="top_db=80"):
        hub_config(
            type(quiet_floor.config)(front_end=type(front)(top_db=80.0), num_classes=3), ["a", "b", "c"]
        )
    assert not (tmp_path / "dup" / "model.safetensors").exists()  # refused before anything is written


def test_export_command_writes_the_folder(tmp_path: Path) -> None:
    """`python -m ced_lightning.export format=hf`: a save_ced checkpoint of 4 classes without stored names
    gets `class_<i>`; the command reads the folder back and prints the logits' difference (0)."""
    torch.manual_seed(0)
    save_ced(create_ced("ced_tiny", depth=1, num_classes=4), tmp_path / "student.pt")
    result = run_command(
        "export",
        "format=hf",
        f"ckpt={tmp_path / 'student.pt'}",
        f"output={tmp_path / 'hf'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr
    assert "name=ced-tiny, depth 1, 4 classes" in result.stdout
    assert "max |logits - original| on a 3 s clip: 0.00e+00" in result.stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["id2label"] == {str(i): f"class_{i}" for i in range(4)}


def test_export_hub_refuses_a_non_ced_model(tmp_path: Path) -> None:
    from ced_lightning.models import TimmMelClassifier
    from ced_lightning.models.checkpoint import model_spec

    model = TimmMelClassifier("resnet18", num_classes=3)
    path = tmp_path / "timm.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "model_spec": model_spec(model)}, path)  # fmt: skip
    with pytest.raises(ConfigError, match="format=hf writes CED models"):
        export_hub(path, tmp_path / "hf", verify=False)
