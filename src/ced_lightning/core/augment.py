"""Augmentation as parameters: drawing them and applying them are separate, pure functions.

Consistent teaching needs the student to see exactly the spectrograms its teachers saw. So augmentation is
described by small integer parameters per clip (`AugmentParams`), drawn from a counter-based hash of
(seed, epoch, clip index, stream) (`rng.counter_uniform`) and stored beside the teachers' logits; both
sides then call the one function `augmented_spectrogram` with those parameters.

Parameters live on reference grids that do not depend on any model: time masks in 10 ms frames (160 samples
at 16 kHz), frequency masks in the 64 bands of the 0–8000 Hz mel range (torchaudio's default 'htk' scale).
Each front end maps them to its own hop and mel bins by time and by mel frequency, so teachers with other
front ends (128 bins, another hop) mask the same part of the sound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ced_lightning.core.audio import SAMPLE_RATE
from ced_lightning.core.errors import ConfigError
from ced_lightning.core.rng import STREAMS, counter_uniform, stream_id

# Reference grids the stored parameters are expressed on.
REF_HOP = SAMPLE_RATE // 100  # 10 ms frames at 16 kHz
REF_N_MELS = 64
REF_F_MIN = 0.0
REF_F_MAX = 8000.0
GAIN_STEP_DB = 0.25  # gain is stored as int8 multiples of this, so it is exact and replayable

# name -> dtype; fixed per name (not per recipe) so `from_torch` and readers of a store can restore it.
FIELD_DTYPES: dict[str, np.dtype] = {
    "shift": np.dtype(np.int32),  # circular shift in samples, signed
    "gain": np.dtype(np.int8),  # GAIN_STEP_DB units
    "time_start": np.dtype(np.uint16),  # absolute 10 ms frame within the clip
    "time_width": np.dtype(np.uint8),  # 10 ms frames
    "freq_start": np.dtype(np.uint8),  # reference mel band
    "freq_width": np.dtype(np.uint8),  # reference mel bands
}

# Each parameter (and each mask slot) draws from its own stream of rng.STREAMS, so no two draws are shared.
_MAX_MASKS = len(STREAMS["augment.time_width"])


@dataclass(frozen=True)
class AugmentRecipe:
    """What to draw; the defaults are the paper's recipe."""

    shift_prob: float = 0.5
    shift_max: float = 0.5
    time_masks: int = 1
    time_mask_frames: int = 192
    freq_masks: int = 1
    freq_mask_bins: int = 24
    gain_db: float = 0.0
    mask_value: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.shift_prob <= 1.0:
            raise ConfigError(f"augment.shift_prob must be in [0, 1], got {self.shift_prob}")
        if not 0.0 <= self.shift_max <= 1.0:
            raise ConfigError(
                f"augment.shift_max must be in [0, 1] (fraction of the clip), got {self.shift_max}"
            )
        for key in ("time_masks", "freq_masks"):
            value = getattr(self, key)
            if not 0 <= value < _MAX_MASKS:
                raise ConfigError(f"augment.{key} must be in [0, {_MAX_MASKS - 1}], got {value}")
        if not 0 <= self.time_mask_frames <= np.iinfo(np.uint8).max:
            raise ConfigError(
                f"augment.time_mask_frames must be in [0, 255] (stored as uint8), got {self.time_mask_frames}"
            )
        if not 0 <= self.freq_mask_bins <= REF_N_MELS:
            raise ConfigError(
                f"augment.freq_mask_bins must be in [0, {REF_N_MELS}] (bands of the 64-band reference grid), "
                f"got {self.freq_mask_bins}"
            )
        max_gain = np.iinfo(np.int8).max * GAIN_STEP_DB
        if not 0.0 <= self.gain_db <= max_gain:
            raise ConfigError(
                f"augment.gain_db must be in [0, {max_gain}] (stored as int8), got {self.gain_db}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able attributes (stored in the logit store so a student can check what it replays)."""
        return {key: (int(v) if isinstance(v, int) else float(v)) for key, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AugmentRecipe:
        known = {f.name: f.type for f in dataclass_fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ConfigError(f"unknown augment recipe key(s) {unknown}; known keys: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in d.items():
            default = getattr(cls, key)
            if isinstance(default, int):
                if isinstance(value, float) and not value.is_integer():
                    raise ConfigError(f"augment.{key} must be an integer, got {value}")
                values[key] = int(value)
            else:
                values[key] = float(value)
        return cls(**values)

    @classmethod
    def from_config(cls, cfg: Any) -> AugmentRecipe:
        """From the Hydra `augment` group node (DictConfig or dict), as written: its sizes unscaled (see
        `for_clip`); `_target_`, `name` and the scaling switches are not recipe fields."""
        if cfg is None:
            return cls()
        return cls.from_dict({k: v for k, v in _plain(cfg).items() if k not in _CONFIG_ONLY_KEYS})

    @classmethod
    def for_clip(cls, cfg: Any, clip_seconds: float) -> AugmentRecipe:
        """The recipe a run on clips of `clip_seconds` applies: the `augment` group's, with its time sizes
        scaled to the clip (`scale_to_clip`) unless the group says `scale_to_clip: false` (absolute sizes)."""
        recipe = cls.from_config(cfg)
        plain = _plain(cfg) if cfg is not None else {}
        if not plain.get("scale_to_clip", True):
            return recipe
        reference = float(plain.get("reference_seconds", REFERENCE_CLIP_SECONDS))
        return scale_to_clip(recipe, clip_seconds, reference)


# The paper's recipe is sized for AudioSet's 10 s clips (a time mask of up to 192 of 1000 frames).
REFERENCE_CLIP_SECONDS = 10.0
# Keys of the `augment` group that say how to size the recipe; not fields of it (nor of a logit store's).
_CONFIG_ONLY_KEYS = ("_target_", "name", "scale_to_clip", "reference_seconds")


def _plain(cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, Mapping):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def scale_to_clip(
    recipe: AugmentRecipe, clip_seconds: float, reference_seconds: float = REFERENCE_CLIP_SECONDS
) -> AugmentRecipe:
    """The one rule that sizes a recipe for clips of `clip_seconds`: its time sizes are for clips of
    `reference_seconds` and keep their share of the clip, so a 4 s clip gets 4/10 of the paper's 192-frame
    time mask (77 frames), rounded half to even to whole frames (at most 255: the stores' uint8). The shift
    needs no scaling (`shift_max` is already a fraction of each clip's own length), nor do frequency masks and
    gain (no time extent)."""
    if clip_seconds <= 0 or reference_seconds <= 0:
        raise ConfigError(
            f"scaling augment to the clip needs clip_seconds > 0 and augment.reference_seconds > 0, got "
            f"{clip_seconds} and {reference_seconds}"
        )
    frames = round(recipe.time_mask_frames * float(clip_seconds) / float(reference_seconds))
    return replace(recipe, time_mask_frames=min(frames, int(np.iinfo(np.uint8).max)))


class AugmentParams:
    """Per-clip augmentation parameters: `values[name]` is a numpy array with the batch dimension first.

    Always holds `shift`; `time_start`/`time_width` when the recipe has time masks, `freq_start`/`freq_width`
    when it has frequency masks, `gain` when `gain_db > 0`. A missing field means "no such augmentation".
    """

    def __init__(self, values: dict[str, np.ndarray]) -> None:
        if "shift" not in values:
            raise ValueError(f"AugmentParams needs a 'shift' field; got fields {sorted(values)}")
        checked: dict[str, np.ndarray] = {}
        size = None
        for name, array in values.items():
            if name not in FIELD_DTYPES:
                raise ValueError(f"unknown augmentation field {name!r}; known fields: {sorted(FIELD_DTYPES)}")
            array = _as_dtype(np.asarray(array), FIELD_DTYPES[name], name)
            if array.ndim == 0:
                raise ValueError(f"augmentation field {name!r} needs a batch dimension, got a scalar")
            if size is None:
                size = array.shape[0]
            elif array.shape[0] != size:
                raise ValueError(
                    f"augmentation field {name!r} has {array.shape[0]} clips, others have {size}"
                )
            checked[name] = array
        self.values = checked

    @staticmethod
    def fields(recipe: AugmentRecipe) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """name -> (dtype, per-clip shape): what a store must hold for `recipe`."""
        out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {"shift": (FIELD_DTYPES["shift"], ())}
        if recipe.gain_db > 0:
            out["gain"] = (FIELD_DTYPES["gain"], ())
        if recipe.time_masks > 0:
            out["time_start"] = (FIELD_DTYPES["time_start"], (recipe.time_masks,))
            out["time_width"] = (FIELD_DTYPES["time_width"], (recipe.time_masks,))
        if recipe.freq_masks > 0:
            out["freq_start"] = (FIELD_DTYPES["freq_start"], (recipe.freq_masks,))
            out["freq_width"] = (FIELD_DTYPES["freq_width"], (recipe.freq_masks,))
        return out

    def __len__(self) -> int:
        return int(self.values["shift"].shape[0])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" for k, v in self.values.items())
        return f"AugmentParams({shapes})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AugmentParams):
            return NotImplemented
        return self.values.keys() == other.values.keys() and all(
            self.values[k].dtype == other.values[k].dtype and np.array_equal(self.values[k], other.values[k])
            for k in self.values
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def subset(self, index: np.ndarray | slice | int) -> AugmentParams:
        """The clips at `index` (int array, boolean mask or slice); an int keeps the batch dimension."""
        if isinstance(index, (int, np.integer)):
            index = np.array([index])
        return AugmentParams({k: v[index] for k, v in self.values.items()})

    @classmethod
    def concatenate(cls, parts: Sequence[AugmentParams]) -> AugmentParams:
        if not parts:
            raise ValueError("AugmentParams.concatenate needs at least one part")
        names = parts[0].values.keys()
        for part in parts[1:]:
            if part.values.keys() != names:
                raise ValueError(
                    f"cannot concatenate AugmentParams with fields {sorted(names)} and {sorted(part.values)} "
                    "(drawn from different recipes?)"
                )
        return cls({k: np.concatenate([p.values[k] for p in parts], axis=0) for k in names})

    def to_torch(self) -> dict[str, torch.Tensor]:
        """Integer tensors for DataLoader collation (uint16 becomes int32: torch lacks most uint16 ops)."""
        out = {}
        for name, array in self.values.items():
            if array.dtype == np.uint16:
                array = array.astype(np.int32)
            out[name] = torch.from_numpy(np.ascontiguousarray(array))
        return out

    @classmethod
    def from_torch(cls, d: Mapping[str, torch.Tensor]) -> AugmentParams:
        """Exact inverse of `to_torch` (dtypes are restored from the field names)."""
        return cls({name: tensor.detach().cpu().numpy() for name, tensor in d.items()})


def _as_dtype(array: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if array.dtype == dtype:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"augmentation field {name!r} must hold integers ({dtype}), got {array.dtype}")
    info = np.iinfo(dtype)
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(
            f"augmentation field {name!r} has values in [{array.min()}, {array.max()}], outside {dtype}"
        )
    return array.astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------------


def _uniform_int(u: np.ndarray, high: np.ndarray | int) -> np.ndarray:
    """Integers uniform in [0, high] (inclusive) from u in [0, 1); high may differ per clip."""
    high = np.asarray(high, dtype=np.int64)
    return np.minimum(np.floor(u * (high + 1)).astype(np.int64), high)


def sample_augment_params(
    recipe: AugmentRecipe, seed: int, epoch: int, indices: np.ndarray, lengths: np.ndarray
) -> AugmentParams:
    """Draw the parameters of clips `indices` (lengths in samples at 16 kHz) for augmentation epoch `epoch`.

    Every parameter and every mask slot is its own independent draw. Positions are absolute within each clip
    and bounded by the clip's own length, never by a padded batch length.
    """
    indices = np.asarray(indices)
    lengths = np.asarray(lengths).astype(np.int64)
    if indices.shape != lengths.shape or indices.ndim != 1:
        raise ValueError(f"indices {list(indices.shape)} and lengths {list(lengths.shape)} must be equal 1-D")
    if lengths.size and lengths.min() < 0:
        raise ValueError("lengths must be >= 0 samples")
    n = len(indices)
    draw = lambda name, slot=0: counter_uniform(seed, epoch, indices, stream_id(f"augment.{name}", slot))
    values: dict[str, np.ndarray] = {}

    shift = np.zeros(n, dtype=np.int64)
    if recipe.shift_prob > 0 and recipe.shift_max > 0:
        applied = draw("shift_apply") < recipe.shift_prob
        fraction = (2.0 * draw("shift_amount") - 1.0) * recipe.shift_max
        shift = np.where(applied, np.rint(fraction * lengths), 0).astype(np.int64)
    values["shift"] = shift.astype(np.int32)

    if recipe.gain_db > 0:
        steps = int(np.floor(recipe.gain_db / GAIN_STEP_DB + 1e-9))
        values["gain"] = (_uniform_int(draw("gain"), 2 * steps) - steps).astype(np.int8)

    if recipe.time_masks > 0:
        clip_frames = -(-lengths // REF_HOP)  # frames of 10 ms the clip touches
        if n and clip_frames.max() > np.iinfo(np.uint16).max:
            raise ValueError(
                f"a clip of {lengths.max()} samples is too long for uint16 10 ms time-mask positions "
                "(at most ~655 s); cut long recordings into segments"
            )
        starts, widths = [], []
        for m in range(recipe.time_masks):
            width = _uniform_int(draw("time_width", m), recipe.time_mask_frames)
            width = np.minimum(width, clip_frames)
            starts.append(_uniform_int(draw("time_start", m), clip_frames - width))
            widths.append(width)
        values["time_start"] = np.stack(starts, axis=1).astype(np.uint16)
        values["time_width"] = np.stack(widths, axis=1).astype(np.uint8)

    if recipe.freq_masks > 0:
        starts, widths = [], []
        for m in range(recipe.freq_masks):
            width = _uniform_int(draw("freq_width", m), recipe.freq_mask_bins)
            starts.append(_uniform_int(draw("freq_start", m), REF_N_MELS - width))
            widths.append(width)
        values["freq_start"] = np.stack(starts, axis=1).astype(np.uint8)
        values["freq_width"] = np.stack(widths, axis=1).astype(np.uint8)

    return AugmentParams(values)


# ---------------------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------------------


def _field(params: AugmentParams, name: str, device: torch.device) -> torch.Tensor | None:
    array = params.values.get(name)
    if array is None:
        return None
    return torch.from_numpy(array.astype(np.int64)).to(device)


def apply_waveform(waveform: torch.Tensor, lengths: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """`[B, T] -> [B, T]`: circular shift of each clip within its own first `length` samples, then gain.

    Padding past `length` is left untouched. Same result as `torch.roll(clip, shift)` on the unpadded clip.
    """
    if waveform.ndim != 2:
        raise ValueError(f"apply_waveform expects [batch, samples], got {list(waveform.shape)}")
    if len(params) != waveform.shape[0] or lengths.shape != (waveform.shape[0],):
        raise ValueError(
            f"batch mismatch: waveform {list(waveform.shape)}, lengths {list(lengths.shape)}, "
            f"{len(params)} parameter rows"
        )
    device = waveform.device
    out = waveform
    time = torch.arange(waveform.shape[1], device=device)[None, :]
    length = lengths.to(device=device, dtype=torch.int64)[:, None]
    inside = time < length
    shift = _field(params, "shift", device)
    if shift is not None and bool(shift.any()):
        source = torch.remainder(time - shift[:, None], length.clamp(min=1))
        source = torch.where(inside, source, time)
        out = torch.gather(out, 1, source)
    gain = _field(params, "gain", device)
    if gain is not None and bool(gain.any()):
        factor = torch.pow(10.0, gain.to(torch.float64) * (GAIN_STEP_DB / 20.0)).to(out.dtype)
        out = torch.where(inside, out * factor[:, None], out)
    return out


@lru_cache(maxsize=64)
def _reference_bins(n_mels: int, f_min: float, f_max: float) -> tuple[int, ...]:
    """Reference band (0..63, or -1/64 outside 0–8 kHz) that holds the centre of each target mel bin.

    torchaudio's filter i peaks at mel(f_min) + (i + 1) / (n_mels + 1) of the mel range; the 64 reference
    bands split mel(0)..mel(8000) into equal parts. For 128 bins over the same range, band b holds exactly
    bins 2b and 2b + 1.
    """
    mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)
    centres = mel(f_min) + (np.arange(n_mels) + 1.0) / (n_mels + 1) * (mel(f_max) - mel(f_min))
    position = (centres - mel(REF_F_MIN)) / (mel(REF_F_MAX) - mel(REF_F_MIN)) * REF_N_MELS
    return tuple(int(b) for b in np.clip(np.floor(position), -1, REF_N_MELS))


def _reference_frames(
    num_frames: int, hop_length: int, n_fft: int, center: bool, sample_rate: int
) -> torch.Tensor:
    """Reference 10 ms frame that holds the centre of each target frame (exact integer arithmetic)."""
    j = torch.arange(num_frames, dtype=torch.int64)
    twice_centre = 2 * j * hop_length + (0 if center else n_fft)  # in samples, doubled to stay integer
    return torch.div(twice_centre * 100, 2 * sample_rate, rounding_mode="floor")


def _covered(positions: torch.Tensor, start: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """[B, P]: position p lies in any of the ranges [start, start + width) of its row ([B, M])."""
    lo = start[:, :, None]
    return ((positions[None, None, :] >= lo) & (positions[None, None, :] < lo + width[:, :, None])).any(1)


def apply_spectrogram_masks(
    mel: torch.Tensor, params: AugmentParams, recipe: AugmentRecipe, front_end_config: Any
) -> torch.Tensor:
    """`[B, n_mels, frames]` dB -> same, with the time and frequency masks of `params` set to `mask_value`.

    Masks drawn on the reference grids cover the target frames / bins whose centre lies inside them.
    `front_end_config` is a `FrontEndConfig` (or a front end with `.config`).
    """
    config = getattr(front_end_config, "config", front_end_config)
    if mel.ndim != 3 or mel.shape[1] != config.n_mels:
        raise ValueError(f"expected mel [batch, {config.n_mels}, frames], got {list(mel.shape)}")
    if len(params) != mel.shape[0]:
        raise ValueError(f"batch mismatch: mel has {mel.shape[0]} clips, params {len(params)}")
    device = mel.device
    masked = None
    time_start, time_width = _field(params, "time_start", device), _field(params, "time_width", device)
    if time_start is not None and time_width is not None:
        frames = _reference_frames(
            mel.shape[2], config.hop_length, config.n_fft, config.center, config.sample_rate
        ).to(device)
        masked = _covered(frames, time_start, time_width)[:, None, :]
    freq_start, freq_width = _field(params, "freq_start", device), _field(params, "freq_width", device)
    if freq_start is not None and freq_width is not None:
        bands = torch.tensor(_reference_bins(config.n_mels, float(config.f_min), float(config.f_max)))
        freq = _covered(bands.to(device), freq_start, freq_width)[:, :, None]
        masked = freq if masked is None else masked | freq
    if masked is None:
        return mel
    return mel.masked_fill(masked, recipe.mask_value)


def same_front_end(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two front ends compute the same function: same class and config, equal buffers."""
    if a is b:
        return True
    if type(a) is not type(b) or getattr(a, "config", None) != getattr(b, "config", None):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].shape == sb[k].shape and sa[k].device == sb[k].device and torch.equal(sa[k], sb[k]) for k in sa
    )


def front_end_sources(front_ends: Sequence[torch.nn.Module]) -> list[int]:
    """For each front end, the first of `front_ends` that computes the same function (`same_front_end`)."""
    fes = list(front_ends)
    return [next(j for j in range(i + 1) if same_front_end(fes[j], fe)) for i, fe in enumerate(fes)]


def augmented_spectrograms(
    front_ends: Sequence[torch.nn.Module],
    waveform: torch.Tensor,
    lengths: torch.Tensor,
    params: AugmentParams,
    recipe: AugmentRecipe,
    sources: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """`augmented_spectrogram` for several front ends (a teacher ensemble) from one waveform augmentation.

    Front ends that compute the same function (every released CED) share one spectrogram: the same
    computation on the same input, so the result is what each would have produced. `sources` is
    `front_end_sources(front_ends)`, worked out once by callers that run many batches.
    """
    sources = front_end_sources(front_ends) if sources is None else sources
    audio = apply_waveform(waveform, lengths, params).float()
    mels: list[torch.Tensor] = []
    for i, front_end in enumerate(front_ends):
        if sources[i] == i:
            mels.append(apply_spectrogram_masks(front_end(audio), params, recipe, front_end.config))
        else:
            mels.append(mels[sources[i]])
    return mels


def augmented_spectrogram(
    front_end: torch.nn.Module,
    waveform: torch.Tensor,
    lengths: torch.Tensor,
    params: AugmentParams,
    recipe: AugmentRecipe,
) -> torch.Tensor:
    """The one function teachers and the student both call: shift/gain -> front end (float32) -> masks.

    The front end takes each clip's `top_db` floor on its own (`LogMelFrontEnd.forward`), so each clip's
    spectrogram is bit-identical in any batch (checked in the tests).
    """
    return augmented_spectrograms([front_end], waveform, lengths, params, recipe)[0]
