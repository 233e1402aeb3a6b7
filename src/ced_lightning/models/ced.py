"""CED audio transformer: a ViT over 16x16 log-mel patches, weight-compatible with the released checkpoints.

State-dict keys and shapes equal those of the paper's `audiotransformer_*` checkpoints, so a released file
loads with `strict=True`. The maths equals the original too (checked against its reference outputs in
`tests/test_models.py`); the implementation is our own: SDPA attention, timm's Mlp/DropPath, no einops.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
import torchaudio
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn

from ced_lightning.core.audio import SAMPLE_RATE, pad_to_min_length
from ced_lightning.core.errors import ConfigError

PIECE_AVERAGES = ("probability", "logit")
# The paper's four sizes (all of depth 12, 64-dimensional heads): `create_ced(name)`.
CED_SIZES: dict[str, dict[str, int]] = {
    "ced_tiny": {"embed_dim": 192, "num_heads": 3},
    "ced_mini": {"embed_dim": 256, "num_heads": 4},
    "ced_small": {"embed_dim": 384, "num_heads": 6},
    "ced_base": {"embed_dim": 768, "num_heads": 12},
}


@dataclass(frozen=True)
class FrontEndConfig:
    """Log-mel front end. Defaults are CED's; teachers may use others (e.g. 128 mel bins)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float = 8000.0
    n_mels: int = 64
    center: bool = True
    top_db: float = 120.0


class LogMelFrontEnd(nn.Sequential):
    """MelSpectrogram then AmplitudeToDB, always computed in float32 (dB of fp16 power underflows)."""

    def __init__(self, config: FrontEndConfig | None = None) -> None:
        config = config or FrontEndConfig()
        super().__init__(
            torchaudio.transforms.MelSpectrogram(
                sample_rate=config.sample_rate,
                n_fft=config.n_fft,
                win_length=config.win_length,
                hop_length=config.hop_length,
                f_min=config.f_min,
                f_max=config.f_max,
                n_mels=config.n_mels,
                center=config.center,
            ),
            torchaudio.transforms.AmplitudeToDB(top_db=config.top_db),
        )
        self.config = config

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[batch, samples]` float waveform at `config.sample_rate` -> `[batch, n_mels, frames]` dB.

        A waveform shorter than one STFT window (`n_fft` samples) is zero-padded at its end to one window.
        """
        if not waveform.is_floating_point():
            # int16 batches scaled by 1 would give plausible-looking spectrograms 90 dB too loud: refuse.
            raise TypeError(
                f"the front end takes float waveforms in [-1, 1), got {waveform.dtype}; convert stored int16 "
                "samples with ced_lightning.core.audio.int16_to_float"
            )
        # The project's short-clip rule: shorter than one STFT window, zero-padded at the end to one (the
        # reflect padding of `center` and the window itself need that many samples).
        waveform = pad_to_min_length(waveform, self.config.n_fft)
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            mel, to_db = self._mel(waveform.float()), self[1]
            # AmplitudeToDB's top_db floor is taken over everything but the first of 4-D input: give every
            # clip its own channel axis so that a clip's output never depends on its batch neighbours.
            if mel.dim() == 3:
                return to_db(mel.unsqueeze(1)).squeeze(1)
            return to_db(mel)

    def _mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """MelSpectrogram, its mel projection one clip at a time: a matmul's kernel, and so its rounding, may
        depend on how many rows it gets (MKL's AVX2 path differs by an ulp between a batch of 3 and of 8),
        and a clip's spectrogram must not depend on its batch. Each clip gets its own buffer, aligned as a
        batch of one's is (MKL's kernels may also depend on alignment). The STFT is batch-invariant as it is.
        """
        transform = self[0]
        power = transform.spectrogram(waveform)
        if power.dim() < 3:
            return transform.mel_scale(power)
        clips = power.reshape(-1, *power.shape[-2:])
        mel = torch.stack([transform.mel_scale(clip.clone()) for clip in clips])
        return mel.reshape(*power.shape[:-2], *mel.shape[-2:])

    def num_frames(self, num_samples: int) -> int:
        """Frames the front end produces for `num_samples` samples (after the short-clip padding)."""
        num_samples = max(num_samples, self.config.n_fft)
        if self.config.center:
            return num_samples // self.config.hop_length + 1
        return (num_samples - self.config.n_fft) // self.config.hop_length + 1


class _SwapMelAndChannel(nn.Module):
    """`[b, 1, mel, t] <-> [b, mel, 1, t]`, so BatchNorm2d normalises each mel bin (key `init_bn.1`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, embed_dim: int, patch_size: int, patch_stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch_size, stride=patch_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass(frozen=True)
class CEDConfig:
    """Everything that defines a CED model's shape. Stored in our checkpoints as plain values."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 527
    patch_size: int = 16
    patch_stride: int = 16
    target_length: int = 1012
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # How the pieces of a clip longer than `target_length` combine: "probability" as the released models do
    # by default (the original's pooling="mean": the mean of the pieces' probabilities), "logit" as its
    # pooling="logit" (the mean logit).
    piece_average: str = "probability"
    front_end: FrontEndConfig = field(default_factory=FrontEndConfig)

    def __post_init__(self) -> None:
        if self.piece_average not in PIECE_AVERAGES:
            raise ConfigError(
                f"piece_average must be one of {list(PIECE_AVERAGES)}, not {self.piece_average!r}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> CEDConfig:
        values = dict(values)
        values["front_end"] = FrontEndConfig(**values.get("front_end", {}))
        return cls(**values)


class CED(nn.Module):
    """CED student/teacher. `forward(waveform [B, samples] @16 kHz) -> logits [B, classes]`.

    Clips longer than `target_length` frames are cut after BatchNorm into `target_length`-frame pieces (the
    last zero-padded) combined by `average_pieces`; shorter clips use the first time positions, and clips
    shorter than one patch (0.15 s) are zero-padded to one after BatchNorm, where the original fails.
    """

    def __init__(self, config: CEDConfig | None = None, **overrides) -> None:
        super().__init__()
        config = config or CEDConfig()
        if overrides:
            config = CEDConfig.from_dict({**config.to_dict(), **overrides})
        self.config = config
        n_mels = config.front_end.n_mels
        self.front_end = LogMelFrontEnd(config.front_end)
        self.init_bn = nn.Sequential(
            _SwapMelAndChannel(), nn.BatchNorm2d(n_mels, momentum=0.01), _SwapMelAndChannel()
        )
        self.patch_embed = PatchEmbed(config.embed_dim, config.patch_size, config.patch_stride)
        freq_patches = (n_mels - config.patch_size) // config.patch_stride + 1
        time_patches = (config.target_length - config.patch_size) // config.patch_stride + 1
        self.time_pos_embed = nn.Parameter(torch.randn(1, config.embed_dim, 1, time_patches) * 0.02)
        self.freq_pos_embed = nn.Parameter(torch.randn(1, config.embed_dim, freq_patches, 1) * 0.02)
        self.pos_drop = nn.Dropout(config.drop_rate)
        drop_path = torch.linspace(0, config.drop_path_rate, config.depth).tolist()
        self.blocks = nn.Sequential(
            *(
                Block(
                    config.embed_dim,
                    config.num_heads,
                    config.mlp_ratio,
                    qkv_bias=config.qkv_bias,
                    drop=config.drop_rate,
                    attn_drop=config.attn_drop_rate,
                    drop_path=drop_path[i],
                )
                for i in range(config.depth)
            )
        )
        self.norm = nn.LayerNorm(config.embed_dim, eps=1e-6)
        self.outputlayer = nn.Sequential(
            nn.LayerNorm(config.embed_dim), nn.Linear(config.embed_dim, config.num_classes)
        )
        self.apply(_init_weights)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def get_classifier(self) -> nn.Module:
        """The head that maps the pooled embedding to class logits (timm's name for it): what fine-tuning
        replaces and a linear probe trains alone."""
        return self.outputlayer

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"time_pos_embed", "freq_pos_embed"}

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.forward_spectrogram(self.front_end(waveform))

    def forward_spectrogram(self, mel: torch.Tensor) -> torch.Tensor:
        """`[batch, n_mels, frames]` log-mel (the front end's output) -> logits `[batch, classes]`."""
        x, pieces = self._normalised_pieces(mel)
        logits = self.forward_head(self.forward_features(x))
        if pieces == 1:
            return logits
        return average_pieces(logits.unflatten(0, (pieces, mel.shape[0])), self.config.piece_average)

    def embed(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[batch, samples]` -> the clip embedding `[batch, embed_dim]`: the token features' mean that the
        head classifies (`forward == outputlayer(embed)` for clips of one piece); a longer clip's pieces'
        embeddings are averaged."""
        return self.forward_and_embed(waveform)[1]

    def embed_spectrogram(self, mel: torch.Tensor) -> torch.Tensor:
        """`embed` of the front end's output `[batch, n_mels, frames]`."""
        return self.forward_and_embed_spectrogram(mel)[1]

    def forward_and_embed(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`forward`, `embed`) of `[batch, samples]` from one pass through the encoder."""
        return self.forward_and_embed_spectrogram(self.front_end(waveform))

    def forward_and_embed_spectrogram(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, pieces = self._normalised_pieces(mel)
        pooled = self.forward_features(x).mean(1)
        logits = self.outputlayer(pooled)
        if pieces == 1:
            return logits, pooled
        batch = mel.shape[0]
        logits = average_pieces(logits.unflatten(0, (pieces, batch)), self.config.piece_average)
        return logits, pooled.unflatten(0, (pieces, batch)).mean(0)

    @property
    def column_seconds(self) -> float:
        """Seconds between the starts of two token columns (`forward_frames`' time step): `patch_stride`
        frames of `hop_length` samples (CED: 16 x 10 ms = 160 ms)."""
        front_end = self.config.front_end
        return self.config.patch_stride * front_end.hop_length / front_end.sample_rate

    def num_columns(self, num_frames: int) -> int:
        """Token columns of a log-mel of `num_frames` frames: whole patches only (as `forward` sees them),
        at least one (shorter clips are padded to one patch)."""
        frames = max(num_frames, self.config.patch_size)
        return (frames - self.config.patch_size) // self.config.patch_stride + 1

    def forward_frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[batch, samples]` -> frame-level logits `[batch, columns, classes]`: one per token column
        (`column_seconds` apart, column j starting at j * `column_seconds`), from one encoder pass.

        Each column's tokens (one per mel band) are averaged and classified by the clip head, so for a clip
        of one piece the mean of the columns' pre-head features is `embed`'s (`embed_frames`). Longer clips
        are cut into pieces of as many whole columns as the model's time positions hold (`target_length`
        frames: 63 columns, 10.08 s), so the columns stay on one 160 ms grid across pieces."""
        return self.outputlayer(self.embed_frames(waveform))

    def forward_frames_spectrogram(self, mel: torch.Tensor) -> torch.Tensor:
        """`forward_frames` of the front end's output `[batch, n_mels, frames]`."""
        return self.outputlayer(self.embed_frames_spectrogram(mel))

    def embed_frames(self, waveform: torch.Tensor) -> torch.Tensor:
        """`[batch, samples]` -> per-column embeddings `[batch, columns, embed_dim]` (`forward_frames`
        before the head): the mean over the mel bands of each token column's features."""
        return self.embed_frames_spectrogram(self.front_end(waveform))

    def embed_frames_spectrogram(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.init_bn(mel.unsqueeze(1))
        batch, frames = x.shape[0], x.shape[-1]
        columns = self.num_columns(frames)
        if frames < self.config.patch_size:
            x = F.pad(x, (0, self.config.patch_size - frames))
        per_piece = self.time_pos_embed.shape[-1]
        pieces = math.ceil(columns / per_piece)
        freq_patches = self.freq_pos_embed.shape[-2]
        mask = None
        if pieces > 1:
            stride, patch = self.config.patch_stride, self.config.patch_size
            piece_frames = (per_piece - 1) * stride + patch
            x = F.pad(x, (0, (pieces * per_piece - 1) * stride + patch - frames))
            # [b, 1, f, frames] -> [pieces*b, 1, f, piece_frames], piece-major as `_normalised_pieces`
            x = x.unfold(-1, piece_frames, per_piece * stride).permute(3, 0, 1, 2, 4).flatten(0, 1)
            if columns % per_piece:
                mask = self._last_piece_mask(pieces, batch, columns % per_piece, freq_patches, x.device)
        tokens = self.forward_features(x, mask)
        # Tokens are ordered band-major (band * time_columns + column): average the bands of each column.
        embeddings = tokens.unflatten(1, (freq_patches, -1)).mean(1)
        if pieces > 1:
            embeddings = embeddings.unflatten(0, (pieces, batch)).transpose(0, 1).flatten(1, 2)
        return embeddings[:, :columns]

    def _last_piece_mask(
        self, pieces: int, batch: int, real_columns: int, freq_patches: int, device: torch.device
    ) -> torch.Tensor:
        """Attention mask `[pieces*batch, 1, 1, tokens]` (True: attend) hiding the padded columns of the
        last, partial piece from its real ones, so that a column's output never depends on padding."""
        per_piece = self.time_pos_embed.shape[-1]
        keep = torch.ones(pieces, batch, freq_patches, per_piece, dtype=torch.bool, device=device)
        keep[-1, :, :, real_columns:] = False
        return keep.flatten(2)[:, :, None, None, :].flatten(0, 1)

    def _normalised_pieces(self, mel: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Log-mel -> BatchNorm'd `[pieces * batch, 1, n_mels, t]` (piece-major like the original) and the
        number of pieces: 1 up to `target_length` frames, else `target_length`-frame pieces (last padded)."""
        x = self.init_bn(mel.unsqueeze(1))
        frames = x.shape[-1]
        length = self.config.target_length
        if frames < self.config.patch_size:
            x = F.pad(x, (0, self.config.patch_size - frames))
        if frames <= length:
            return x, 1
        pieces = math.ceil(frames / length)
        x = F.pad(x, (0, pieces * length - frames))
        # [b, 1, f, pieces*length] -> [pieces*b, 1, f, length]
        return x.unflatten(-1, (pieces, length)).permute(3, 0, 1, 2, 4).flatten(0, 1), pieces

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised `[b, 1, mel, t]` -> token features `[b, tokens, embed_dim]`; `attn_mask` (bool,
        True: attend, broadcast to `[b, heads, tokens, tokens]`) limits what each token attends to."""
        x = self.patch_embed(x)
        x = x + self.time_pos_embed[..., : x.shape[-1]] + self.freq_pos_embed
        x = self.pos_drop(x.flatten(2).transpose(1, 2))
        if attn_mask is None:
            x = self.blocks(x)
        else:
            for block in self.blocks:
                x = block(x, attn_mask)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.outputlayer(features.mean(1))


def average_pieces(logits: torch.Tensor, how: str = "probability") -> torch.Tensor:
    """`[pieces, batch, classes]` logits of a long clip's pieces -> the clip's logits `[batch, classes]`.

    "logit": their mean. "probability": the logit of the pieces' mean probability, from log-sigmoids
    (log mean p - log mean (1 - p)), so that probabilities near 0 or 1 keep their precision.
    """
    if how == "logit":
        return logits.mean(0)
    if how == "probability":
        return torch.logsumexp(F.logsigmoid(logits), 0) - torch.logsumexp(F.logsigmoid(-logits), 0)
    raise ConfigError(f"piece_average must be one of {list(PIECE_AVERAGES)}, not {how!r}")


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
