"""`export format=hf`: a checkpoint -> the Hugging Face Hub port's folder (`models.hub`), read back to check,
and uploaded where asked."""

from __future__ import annotations

from os import PathLike

import torch

from ced_lightning.core.errors import ConfigError
from ced_lightning.core.labels import resolve_class_names
from ced_lightning.models.ced import CED
from ced_lightning.models.checkpoint import load_checkpoint
from ced_lightning.models.hub import (
    CONFIG_FILE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    port_size_name,
    write_hub_folder,
)


def push_hub_folder(folder: str | PathLike, repo_id: str, private: bool = True) -> str:
    """Upload a written folder to the Hub repository `repo_id` (created if missing, private unless told)
    with huggingface_hub's `upload_folder`, as the account `hf auth login` (or `HF_TOKEN`) names; returns
    the commit's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload CED")
    return str(commit)


def export_hub(
    ckpt: str | PathLike, output: str | PathLike, *, verify: bool = True, push_to_hub: str | None = None
) -> str:
    """`export format=hf`: a checkpoint this project reads -> the port's folder at `output`; with `verify`,
    read back by `load_checkpoint` and run on a random 3 s clip against the original; with `push_to_hub`,
    uploaded to that repository. Returns the line the command prints. The class names are the checkpoint's,
    else AudioSet's for 527 outputs, else `class_<i>` (`resolve_class_names`)."""
    loaded = load_checkpoint(ckpt)
    if not isinstance(loaded.model, CED):
        raise ConfigError(f"{ckpt}: format=hf writes CED models; this is a {type(loaded.model).__name__}")
    if loaded.objective != "multi_label":
        # The port's outputs are per-class sigmoids: a softmax model's tags would read wrong there.
        raise ConfigError(
            f"{ckpt}: trained with task.objective={loaded.objective}, which the Hub port cannot express (its "
            "outputs are per-class sigmoids); export it with format=onnx, whose probabilities are its softmax"
        )
    names = resolve_class_names(loaded.model.num_classes, loaded.class_names)
    folder = write_hub_folder(loaded.model, names, output)
    size_mb = (folder / WEIGHTS_FILE).stat().st_size / 1e6
    config = loaded.model.config
    message = (
        f"wrote {folder}/ ({WEIGHTS_FILE} {size_mb:.1f} MB, {CONFIG_FILE}, {PREPROCESSOR_FILE}; "
        f"name={port_size_name(config)}, depth {config.depth}, {len(names)} classes)"
    )
    if verify:
        message += "; " + verify_hub_folder(loaded.model, folder)
    if push_to_hub:
        message += f"; pushed to {push_hub_folder(folder, push_to_hub)}"
    return message


def verify_hub_folder(model: CED, folder: str | PathLike) -> str:
    """Read `folder` back with `load_checkpoint`; compare its logits with `model`'s on a random 3 s clip."""
    waveform = 0.1 * torch.randn(
        1, 3 * model.config.front_end.sample_rate, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        difference = (load_checkpoint(folder).model(waveform) - model.eval()(waveform)).abs().max().item()
    return f"read back: max |logits - original| on a 3 s clip: {difference:.2e}"
