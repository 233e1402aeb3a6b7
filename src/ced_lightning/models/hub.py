"""The Hugging Face Hub port's layout of CED, both directions: its key names, its config and its folder.

The port (github.com/jimbozhang/hf_transformers_custom_model_ced: `ced_model/configuration_ced.py`,
`modeling_ced.py`, `feature_extraction_ced.py`; the `mispeech/ced-*` repositories hold the same code) keeps a
model in a folder of three files, as `save_pretrained` writes them:
- `model.safetensors`: the weights of `CedForAudioClassification`. Its converter
  (`convert_ced_original_to_pytorch.py`) drops the front end's buffers (`front_end.*`), renames `init_bn.1.*`
  to `init_bn.*` and puts everything but the head (`outputlayer.*`) under `encoder.`: `KEY_PREFIXES` below,
  read in either direction (`to_hub_layout`, `from_hub_layout`).
- `config.json`: `CedConfig`'s fields (`hub_config`): the shape (`embed_dim`, `depth`, `num_heads`,
  `mlp_ratio`, `outputdim`, `patch_size`, `patch_stride`, `target_length`, `qkv_bias`, the drop rates), the
  front end (`n_mels`, `n_fft`, `win_size`, `hop_size`, `f_min`, `f_max`, `center`), the head (`pooling`,
  `eval_avg`, `pad_last`, `loss`), `name` (`ced-tiny` ... for the paper's sizes), and the class names
  (`id2label`, `label2id`).
- `preprocessor_config.json`: `CedFeatureExtractor`'s fields (`hub_preprocessor_config`).

`write_hub_folder` writes it; `read_hub_folder` reads it back into this project's state dict, `CEDConfig` and
class names (`load_checkpoint` and `load_ced` take such a folder wherever they take a file).
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from ced_lightning.core.errors import ConfigError, InputError
from ced_lightning.models.ced import CED, CED_SIZES, CEDConfig, FrontEndConfig

# (our prefix, the port's prefix), the first that matches wins in either direction.
KEY_PREFIXES = (("outputlayer.", "outputlayer."), ("init_bn.1.", "encoder.init_bn."), ("", "encoder."))
DROPPED_PREFIX = "front_end."  # buffers the port rebuilds from its config (window, mel filterbank)
WEIGHTS_FILE, CONFIG_FILE, PREPROCESSOR_FILE = "model.safetensors", "config.json", "preprocessor_config.json"
# The port's feature extractor converts to dB with AmplitudeToDB(top_db=120) whatever its config says.
PORT_TOP_DB = 120.0


def _renamed(key: str, source: int) -> str:
    for prefixes in KEY_PREFIXES:
        if key.startswith(prefixes[source]):
            return prefixes[1 - source] + key[len(prefixes[source]) :]
    raise AssertionError("the empty prefix matches every key")


def to_hub_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (= the original's) keys -> the port's, the front end's buffers dropped, tensors contiguous."""
    return {
        _renamed(key, 0): value.contiguous()
        for key, value in state_dict.items()
        if not key.startswith(DROPPED_PREFIX)
    }


def from_hub_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's keys -> ours; the front end's buffers follow from the config (`CED` rebuilds them)."""
    return {_renamed(key, 1): value for key, value in state_dict.items()}


def is_hub_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return "encoder.patch_embed.proj.weight" in state_dict and "patch_embed.proj.weight" not in state_dict


def port_size_name(config: CEDConfig) -> str | None:
    """The port's `name` for a model of one of the paper's sizes (`ced-tiny`, ...), else None: the port's
    config sets `embed_dim` and `num_heads` from the name, so a model of another shape must carry none."""
    for size, shape in CED_SIZES.items():
        if shape == {"embed_dim": config.embed_dim, "num_heads": config.num_heads}:
            return size.replace("_", "-")
    return None


def hub_config(config: CEDConfig, class_names: list[str]) -> dict[str, Any]:
    """`config.json` of the port for a model of `config` whose outputs are `class_names`.

    `pooling` and `eval_avg` are "mean", as the converter writes them (the port's `logits` are then the
    head's sigmoid, as for the released models). Refuses what the port cannot express (a front end with
    another dB floor, class names that are not one per output, or not unique).
    """
    front = config.front_end
    if front.top_db != PORT_TOP_DB:
        raise ConfigError(
            f"front_end.top_db={front.top_db:g}: the Hub port's feature extractor always uses {PORT_TOP_DB:g}"
        )
    if len(class_names) != config.num_classes or len(set(class_names)) != len(class_names):
        raise InputError(
            f"class names: {len(class_names)} ({len(set(class_names))} unique) for {config.num_classes} "
            "outputs; id2label and label2id need one unique name per output"
        )
    return {
        "architectures": ["CedForAudioClassification"],
        "model_type": "ced",
        "name": port_size_name(config),
        "attn_drop_rate": config.attn_drop_rate,
        "center": front.center,
        "depth": config.depth,
        "drop_path_rate": config.drop_path_rate,
        "drop_rate": config.drop_rate,
        "embed_dim": config.embed_dim,
        "eval_avg": "mean",
        "f_max": front.f_max,
        "f_min": front.f_min,
        "hop_size": front.hop_length,
        "loss": "BCE",
        "mlp_ratio": config.mlp_ratio,
        "n_fft": front.n_fft,
        "n_mels": front.n_mels,
        "num_heads": config.num_heads,
        "outputdim": config.num_classes,
        "pad_last": True,
        "patch_size": config.patch_size,
        "patch_stride": config.patch_stride,
        "pooling": "mean",
        "qkv_bias": config.qkv_bias,
        "target_length": config.target_length,
        "win_size": front.win_length,
        "id2label": {str(i): name for i, name in enumerate(class_names)},
        "label2id": {name: i for i, name in enumerate(class_names)},
        "torch_dtype": "float32",
    }


def hub_preprocessor_config(front: FrontEndConfig) -> dict[str, Any]:
    """`preprocessor_config.json` of the port's `CedFeatureExtractor` for our front end."""
    return {
        "feature_extractor_type": "CedFeatureExtractor",
        "feature_size": front.n_mels,
        "sampling_rate": front.sample_rate,
        "f_min": front.f_min,
        "f_max": front.f_max,
        "win_size": front.win_length,
        "n_fft": front.n_fft,
        "hop_size": front.hop_length,
        "center": front.center,
        "padding_value": 0.0,
        "padding_side": "right",
        "return_attention_mask": False,
    }


def config_from_hub(config: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> CEDConfig:
    """Our `CEDConfig` from the port's `config.json` (and `preprocessor_config.json`, for the sample rate)."""
    try:
        front = FrontEndConfig(
            sample_rate=int((preprocessor or {}).get("sampling_rate", FrontEndConfig.sample_rate)),
            n_fft=int(config["n_fft"]),
            win_length=int(config["win_size"]),
            hop_length=int(config["hop_size"]),
            f_min=float(config["f_min"]),
            f_max=float(config["f_max"] if config["f_max"] is not None else FrontEndConfig.f_max),
            n_mels=int(config["n_mels"]),
            center=bool(config["center"]),
            top_db=PORT_TOP_DB,
        )
        return CEDConfig(
            embed_dim=int(config["embed_dim"]),
            depth=int(config["depth"]),
            num_heads=int(config["num_heads"]),
            mlp_ratio=float(config["mlp_ratio"]),
            num_classes=int(config["outputdim"]),
            patch_size=int(config["patch_size"]),
            patch_stride=int(config["patch_stride"]),
            target_length=int(config["target_length"]),
            qkv_bias=bool(config["qkv_bias"]),
            drop_rate=float(config["drop_rate"]),
            attn_drop_rate=float(config["attn_drop_rate"]),
            drop_path_rate=float(config["drop_path_rate"]),
            front_end=front,
        )
    except KeyError as err:
        raise InputError(f"{CONFIG_FILE}: no field {err.args[0]!r} (not the Hub port's CedConfig?)") from err


def class_names_from_hub(config: dict[str, Any]) -> list[str] | None:
    """`id2label` in output order, or None where the config has none."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    return [id2label[str(i)] for i in range(len(id2label))]


def is_hub_folder(path: str | PathLike) -> bool:
    folder = Path(path)
    return folder.is_dir() and (folder / CONFIG_FILE).is_file() and (folder / WEIGHTS_FILE).is_file()


def read_hub_folder(path: str | PathLike) -> dict[str, Any]:
    """A port folder as one of our checkpoints: `{'model': state dict (our keys), 'ced_config',
    'class_names'}` (the front end's buffers are rebuilt from the config by `load_ced`)."""
    from safetensors.torch import load_file

    folder = Path(path)
    config = json.loads((folder / CONFIG_FILE).read_text())
    preprocessor_path = folder / PREPROCESSOR_FILE
    preprocessor = json.loads(preprocessor_path.read_text()) if preprocessor_path.is_file() else None
    return {
        "model": from_hub_layout(load_file(str(folder / WEIGHTS_FILE))),
        "ced_config": config_from_hub(config, preprocessor).to_dict(),
        "class_names": class_names_from_hub(config),
    }


def write_hub_folder(model: CED, class_names: list[str], output: str | PathLike) -> Path:
    """Write `model` as the port's folder (`model.safetensors`, `config.json`, `preprocessor_config.json`)
    into `output` (created); returns it. A student trained here then loads with the port's code
    (`CedForAudioClassification.from_pretrained(output)`) and with ours (`load_checkpoint(output)`)."""
    from safetensors.torch import save_file

    config = hub_config(model.config, class_names)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {key: value.detach().cpu() for key, value in to_hub_layout(model.state_dict()).items()}
    # transformers reads a safetensors file only with its framework in the metadata.
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    preprocessor = hub_preprocessor_config(model.config.front_end)
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(preprocessor, indent=2) + "\n")
    return folder
