"""The HEAR benchmark's common API for CED: `load_model`, `get_scene_embeddings`, `get_timestamp_embeddings`.

    hear-validator ced_lightning.hear -m ced_mini        # a released name, or any checkpoint path
    hear-validator ced_lightning.hear.ced_tiny           # a module per size: its released weights by default
    python -m heareval.embeddings.runner ced_lightning.hear.ced_base --tasks-dir TASKS

The API (neuralaudio.ai's "HEAR 2021 common API"): `load_model(model_file_path)` returns a `torch.nn.Module`
with `sample_rate`, `scene_embedding_size` and `timestamp_embedding_size`; both embedding functions take
`audio [n_sounds, n_samples]` float32 at `sample_rate`, on the model's device, and return float32 tensors
there.

- Scene embeddings `[n_sounds, embed_dim]`: the model's own clip embedding (`CED.embed`: the mean of the token
  features the head classifies; a clip longer than the model's 10.12 s window is cut into windows whose
  embeddings are averaged, as the model's long-clip path does).
- Timestamp embeddings `[n_sounds, n_columns, embed_dim]`: one per token column (16 frames, 160 ms: the
  model's own time resolution, no pass per hop), the mean of the column's tokens over frequency; timestamps
  in milliseconds at each column's centre (the mean of its 16 frames' centres: 75, 235, 395, ... ms). Audio
  longer than the model's window is cut into windows of whole columns (63 columns, 10.08 s), each window
  run on its own (its time positions restarting at 0, as the model's long-clip path does), so the columns
  of a long clip follow each other every 160 ms without gap. Frames after the last whole column (less
  than 160 ms) are left out, as the model itself leaves them out; a clip shorter than one column is
  zero-padded to one (the model's short-clip rule), its timestamp the clip's middle.

The original CED's HEAR wrapper (github.com/RicherMans/HEAR_CED) also averages all tokens for the scene
and offers 160 ms columns; its default timestamps are overlapping 0.48 s windows every 50 ms instead.
"""

from __future__ import annotations

from collections.abc import Callable
from os import PathLike

import torch
from torch import nn

from ced_lightning.models.ced import CED
from ced_lightning.models.checkpoint import load_ced

__all__ = [
    "DEFAULT_MODEL",
    "HearCED",
    "column_timestamps_ms",
    "get_scene_embeddings",
    "get_timestamp_embeddings",
    "load_model",
    "load_model_of",
]

DEFAULT_MODEL = "ced_mini"


class HearCED(nn.Module):
    """A CED with the attributes HEAR asks for. `forward` is `get_scene_embeddings`."""

    def __init__(self, model: CED) -> None:
        super().__init__()
        self.model = model.eval()
        self.sample_rate: int = model.config.front_end.sample_rate
        self.scene_embedding_size: int = model.config.embed_dim
        self.timestamp_embedding_size: int = model.config.embed_dim

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return self.model.embed(_float_waveforms(audio))


def load_model(model_file_path: str | PathLike = "", device: str | torch.device | None = None) -> HearCED:
    """A CED from a released name (`ced_tiny` ... `ced_base`) or any checkpoint `load_ced` reads; ""
    (HEAR's "no weights file") loads `DEFAULT_MODEL`. On `device` if given (the validator moves it itself)."""
    hear = HearCED(load_ced(model_file_path or DEFAULT_MODEL))
    return hear.to(device) if device is not None else hear


def load_model_of(default: str) -> Callable[..., HearCED]:
    """`load_model` whose "no weights file" means `default`: the per-size modules' entry point."""

    def load_size(model_file_path: str | PathLike = "", device: str | torch.device | None = None) -> HearCED:
        return load_model(model_file_path or default, device)

    load_size.__doc__ = f"`load_model`, loading {default!r} when no weights file is given."
    return load_size


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: HearCED) -> torch.Tensor:
    """`[n_sounds, n_samples]` -> `[n_sounds, scene_embedding_size]` float32 (see the module's docstring)."""
    model.eval()
    return model(audio).float()


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: HearCED) -> tuple[torch.Tensor, torch.Tensor]:
    """`[n_sounds, n_samples]` -> (embeddings `[n_sounds, n_columns, timestamp_embedding_size]` float32,
    timestamps `[n_sounds, n_columns]` in milliseconds), one per 160 ms token column."""
    model.eval()
    ced = model.model
    audio = _float_waveforms(audio)
    columns = column_embeddings(ced, ced.front_end(audio))
    times = column_timestamps_ms(ced, audio.shape[-1], columns.shape[1]).to(audio.device)
    return columns.float(), times.expand(audio.shape[0], -1)


def column_embeddings(model: CED, mel: torch.Tensor) -> torch.Tensor:
    """Log-mel `[batch, n_mels, frames]` -> `[batch, columns, embed_dim]`: each token column's features
    averaged over frequency, windows of whole columns run one after another (see the module's docstring)."""
    config = model.config
    x = model.init_bn(mel.unsqueeze(1))
    patch, stride = config.patch_size, config.patch_stride
    if x.shape[-1] < patch:
        x = nn.functional.pad(x, (0, patch - x.shape[-1]))
    total = (x.shape[-1] - patch) // stride + 1
    per_window = (config.target_length - patch) // stride + 1
    pieces = []
    for first in range(0, total, per_window):
        count = min(per_window, total - first)
        window = x[..., first * stride : (first + count - 1) * stride + patch]
        tokens = model.forward_features(window)  # [batch, freq * count, dim], frequency-major
        pieces.append(tokens.unflatten(1, (-1, count)).mean(1))
    return torch.cat(pieces, dim=1)


def column_timestamps_ms(model: CED, num_samples: int, columns: int) -> torch.Tensor:
    """The centre of each token column in milliseconds: the mean of its frames' centres (a frame's centre is
    at `frame * hop` with a centred STFT, else half a window later); a clip shorter than one column: its
    middle."""
    front = model.config.front_end
    if model.front_end.num_frames(num_samples) < model.config.patch_size:
        return torch.full((1,), 500.0 * num_samples / front.sample_rate, dtype=torch.float32)
    offset = 0.0 if front.center else front.n_fft / 2
    first_frames = torch.arange(columns, dtype=torch.float64) * model.config.patch_stride
    centre = first_frames + (model.config.patch_size - 1) / 2
    return ((centre * front.hop_length + offset) * 1000.0 / front.sample_rate).float()


def _float_waveforms(audio: torch.Tensor) -> torch.Tensor:
    if audio.dim() != 2:
        raise ValueError(f"HEAR audio is [n_sounds, n_samples]; got shape {tuple(audio.shape)}")
    return audio.float()
