"""Augmentation as parameters: deterministic draws, exact application, bit-identical replay across batches.

Batch size and the STFT (measured on CPU with torch 2.11 and 2.13, torchaudio 2.11, 1 and 2 threads):
`torch.stft` and the mel matmul give bit-identical rows for a clip whatever the batch size or neighbours.
What does depend on the batch is torchaudio's `AmplitudeToDB(top_db)`: on a 3-D `[B, n_mels, frames]`
input it takes one `max - top_db` floor over the whole batch, so a clip's zero padding (-100 dB) is clamped
differently next to a loud neighbour (up to ~37 dB difference here). `LogMelFrontEnd` therefore gives each
clip its own floor; `test_front_end_floor_is_per_clip` checks it on a batch with a quiet clip.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ced_lightning import conf_dir
from ced_lightning.core.augment import (
    AugmentParams,
    AugmentRecipe,
    apply_spectrogram_masks,
    apply_waveform,
    augmented_spectrogram,
    augmented_spectrograms,
    sample_augment_params,
)
from ced_lightning.models.ced import FrontEndConfig, LogMelFrontEnd
from ced_lightning.models.timm_mel import TIMM_FRONT_END
from conftest import command_env

RECIPE = AugmentRecipe(gain_db=6.0)  # every field present


def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(8000, 160001, size=n)


# --- drawing -----------------------------------------------------------------------------------------------


def test_params_independent_of_batch_composition() -> None:
    n = 64
    idx = np.arange(1000, 1000 + n)
    lengths = _lengths(n)
    whole = sample_augment_params(RECIPE, 7, 3, idx, lengths)
    order = np.random.default_rng(1).permutation(n)
    parts = [
        sample_augment_params(RECIPE, 7, 3, idx[order[i : i + 7]], lengths[order[i : i + 7]])
        for i in range(0, n, 7)
    ]
    shuffled = AugmentParams.concatenate(parts)
    assert shuffled == whole.subset(order)
    singles = AugmentParams.concatenate(
        [sample_augment_params(RECIPE, 7, 3, idx[i : i + 1], lengths[i : i + 1]) for i in reversed(range(n))]
    )
    assert singles == whole.subset(np.arange(n)[::-1])


def _draw_in_worker(item: int) -> dict[str, torch.Tensor]:
    length = int(_lengths(32)[item])
    params = sample_augment_params(RECIPE, 7, 3, np.array([item]), np.array([length]))
    return params.to_torch()


class _ParamDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 32

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return _draw_in_worker(item)


def test_params_same_in_dataloader_workers() -> None:
    loader = torch.utils.data.DataLoader(
        _ParamDataset(), batch_size=5, num_workers=2, multiprocessing_context="fork", collate_fn=lambda b: b
    )
    drawn = AugmentParams.concatenate([AugmentParams.from_torch(d) for batch in loader for d in batch])
    assert drawn == sample_augment_params(RECIPE, 7, 3, np.arange(32), _lengths(32))


def test_epochs_and_seeds_differ() -> None:
    idx, lengths = np.arange(500), _lengths(500)
    base = sample_augment_params(RECIPE, 1, 0, idx, lengths)
    for other in (
        sample_augment_params(RECIPE, 1, 1, idx, lengths),
        sample_augment_params(RECIPE, 2, 0, idx, lengths),
    ):
        for name in ("time_start", "freq_start", "shift"):
            assert np.mean(other.values[name] == base.values[name]) < 0.6, name


def test_statistics_and_bounds() -> None:
    n = 20000
    idx = np.arange(n)
    lengths = np.random.default_rng(2).integers(1, 160001, size=n)
    params = sample_augment_params(RECIPE, 0, 0, idx, lengths)
    v = params.values
    applied = v["shift"] != 0
    assert abs(applied.mean() - 0.5) < 0.02
    assert np.all(np.abs(v["shift"].astype(np.int64)) <= np.ceil(0.5 * lengths))
    assert abs(v["gain"].mean()) < 0.3 and v["gain"].min() == -24 and v["gain"].max() == 24
    clip_frames = -(-lengths // 160)
    ts, tw = v["time_start"][:, 0].astype(np.int64), v["time_width"][:, 0].astype(np.int64)
    assert tw.max() == 192 and tw.min() == 0
    assert np.all(tw <= np.minimum(192, clip_frames)) and np.all(ts + tw <= clip_frames)
    fs, fw = v["freq_start"][:, 0].astype(np.int64), v["freq_width"][:, 0].astype(np.int64)
    assert fw.max() == 24 and np.all(fs + fw <= 64)
    assert abs(fw.mean() - 12) < 0.3  # uniform in [0, 24]
    # every parameter is its own draw: no correlation between the time and frequency masks
    for a, b in ((ts, fs), (tw, fw), (ts, fw), (tw, fs), (fs, v["shift"]), (fw, v["gain"])):
        assert abs(np.corrcoef(a, b)[0, 1]) < 0.03


def test_several_masks_draw_independently() -> None:
    recipe = AugmentRecipe(time_masks=3, freq_masks=2)
    params = sample_augment_params(recipe, 0, 0, np.arange(5000), np.full(5000, 160000))
    ts, fs = params.values["time_start"].astype(float), params.values["freq_start"].astype(float)
    assert ts.shape == (5000, 3) and fs.shape == (5000, 2)
    assert abs(np.corrcoef(ts[:, 0], ts[:, 1])[0, 1]) < 0.05
    assert abs(np.corrcoef(fs[:, 0], fs[:, 1])[0, 1]) < 0.05


def test_short_clip_clips_width() -> None:
    recipe = AugmentRecipe(time_mask_frames=192, shift_prob=0.0)
    params = sample_augment_params(recipe, 0, 0, np.arange(200), np.full(200, 1000))  # 7 frames of 10 ms
    assert params.values["time_width"].max() <= 7
    assert np.all(params.values["time_start"] + params.values["time_width"] <= 7)
    assert not params.values["shift"].any()


def test_sampling_is_fast() -> None:
    idx, lengths = np.arange(100_000), np.full(100_000, 160000)
    sample_augment_params(RECIPE, 0, 0, idx[:10], lengths[:10])
    # Vectorised: about 0.03 s for 100,000 clips on a loaded 2-core CPU; the best of 3
    # runs, so a moment of load on a shared machine does not decide it.
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        sample_augment_params(RECIPE, 0, 0, idx, lengths)
        seconds.append(time.perf_counter() - start)
    assert min(seconds) < 0.2, seconds


# --- parameters as data -------------------------------------------------------------------------------------


def test_fields_match_drawn_dtypes() -> None:
    for recipe in (
        RECIPE,
        AugmentRecipe(),
        AugmentRecipe(time_masks=2, freq_masks=0),
        AugmentRecipe(0, 0, 0, 0, 0, 0),
    ):
        params = sample_augment_params(recipe, 0, 0, np.arange(4), np.full(4, 16000))
        fields = AugmentParams.fields(recipe)
        assert set(fields) == set(params.values)
        for name, (dtype, shape) in fields.items():
            assert params.values[name].dtype == dtype and params.values[name].shape == (4, *shape), name
    assert "gain" not in AugmentParams.fields(AugmentRecipe())
    assert AugmentParams.fields(RECIPE)["time_start"] == (np.dtype(np.uint16), (1,))


def test_subset_concatenate_torch_round_trip() -> None:
    params = sample_augment_params(AugmentRecipe(gain_db=3, time_masks=2), 5, 1, np.arange(10), _lengths(10))
    assert len(params) == 10
    again = AugmentParams.concatenate([params.subset(slice(0, 3)), params.subset(np.arange(3, 10))])
    assert again == params
    assert len(params.subset(4)) == 1
    tensors = params.to_torch()
    assert all(not t.is_floating_point() for t in tensors.values())
    back = AugmentParams.from_torch(tensors)
    assert back == params and all(back.values[k].dtype == params.values[k].dtype for k in params.values)
    collated = torch.utils.data.default_collate([params.subset(i).to_torch() for i in range(10)])
    assert AugmentParams.from_torch({k: v[:, 0] for k, v in collated.items()}) == params
    with pytest.raises(ValueError, match="fields"):
        AugmentParams.concatenate(
            [params, sample_augment_params(AugmentRecipe(), 0, 0, np.arange(2), np.ones(2))]
        )
    with pytest.raises(ValueError, match="outside uint8"):
        AugmentParams({"shift": np.zeros(2, np.int32), "freq_start": np.array([[300], [0]])})
    with pytest.raises(ValueError, match="unknown augmentation field 'bogus'"):
        AugmentParams({"shift": np.zeros(2, np.int32), "bogus": np.zeros(2)})


def test_recipe_dict_and_config() -> None:
    recipe = AugmentRecipe(gain_db=2.5, time_masks=2)
    assert AugmentRecipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ValueError, match="freq_mask_width"):
        AugmentRecipe.from_dict({"freq_mask_width": 3})
    with pytest.raises(ValueError, match=r"augment\.freq_mask_bins"):
        AugmentRecipe(freq_mask_bins=65)
    ced = AugmentRecipe.from_config(OmegaConf.load(conf_dir() / "augment" / "ced.yaml"))
    assert ced == AugmentRecipe()
    none = AugmentRecipe.from_config(dict(OmegaConf.load(conf_dir() / "augment" / "none.yaml")))
    params = sample_augment_params(none, 0, 0, np.arange(3), np.full(3, 16000))
    assert set(params.values) == {"shift"} and not params.values["shift"].any()


# --- applying -----------------------------------------------------------------------------------------------


def test_apply_waveform_rolls_within_each_clip() -> None:
    lengths = torch.tensor([16000, 9000, 1, 12345])
    wave = torch.zeros(4, 16000)
    for b, length in enumerate(lengths.tolist()):
        wave[b, :length] = torch.randn(length)
    shifts = np.array([4000, -3000, 5, 0], dtype=np.int32)
    params = AugmentParams({"shift": shifts})
    out = apply_waveform(wave, lengths, params)
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(out[b, :length], torch.roll(wave[b, :length], int(shifts[b])))
        assert not out[b, length:].any()
    # gain in 0.25 dB steps, padding still untouched
    gained = apply_waveform(
        wave, lengths, AugmentParams({"shift": shifts, "gain": np.array([24, -24, 0, 4], np.int8)})
    )
    assert torch.allclose(gained[0], out[0] * 10 ** (6 / 20)) and torch.allclose(
        gained[1], out[1] * 10 ** (-6 / 20)
    )
    assert torch.equal(gained[2], out[2]) and not gained[1, 9000:].any()


def _masks_only(time: list[list[int]] | None = None, freq: list[list[int]] | None = None) -> AugmentParams:
    values = {"shift": np.zeros(1, np.int32)}
    if time:
        values["time_start"] = np.array([[s for s, _ in time]], np.uint16)
        values["time_width"] = np.array([[w for _, w in time]], np.uint8)
    if freq:
        values["freq_start"] = np.array([[s for s, _ in freq]], np.uint8)
        values["freq_width"] = np.array([[w for _, w in freq]], np.uint8)
    return AugmentParams(values)


def _masked_cells(config: FrontEndConfig, params: AugmentParams, frames: int = 120) -> torch.Tensor:
    mel = torch.full((1, config.n_mels, frames), -5.0)
    out = apply_spectrogram_masks(mel, params, AugmentRecipe(mask_value=1.0), config)
    return out[0] == 1.0


def test_frequency_mask_maps_to_128_bins() -> None:
    params = _masks_only(freq=[(10, 5)])
    cells = _masked_cells(FrontEndConfig(), params)
    assert cells[10:15].all() and cells.sum() == 5 * 120  # 64 bins: the identity
    cells = _masked_cells(TIMM_FRONT_END, params)
    assert cells[20:30].all() and cells.sum() == 10 * 120  # 128 bins: exactly [2s, 2s + 2w)
    for s in range(64):
        for w in (1, 7, 24):
            if s + w <= 64:
                rows = _masked_cells(TIMM_FRONT_END, _masks_only(freq=[(s, w)]))[:, 0]
                assert torch.equal(rows.nonzero()[:, 0], torch.arange(2 * s, 2 * s + 2 * w)), (s, w)
    assert _masked_cells(TIMM_FRONT_END, _masks_only(freq=[(0, 64)])).all()


def test_time_mask_maps_to_other_hop() -> None:
    params = _masks_only(time=[(10, 7)])
    cells = _masked_cells(FrontEndConfig(), params)
    assert torch.equal(cells[0].nonzero()[:, 0], torch.arange(10, 17))  # 10 ms hop: the identity
    # hop 320 (20 ms): frame j is centred at 20 j ms, inside [100, 170) ms for j = 5..8
    cells = _masked_cells(FrontEndConfig(hop_length=320), params)
    assert torch.equal(cells[0].nonzero()[:, 0], torch.arange(5, 9))
    assert cells.all(0).sum() == 4 and cells.sum() == 4 * 64  # whole columns, nothing else
    # two masks, one of width 0 (a no-op), and both axes at once
    cells = _masked_cells(FrontEndConfig(), _masks_only(time=[(3, 2), (50, 0)], freq=[(60, 4)]))
    expected = torch.zeros(64, 120, dtype=torch.bool)
    expected[:, 3:5] = True
    expected[60:64] = True
    assert torch.equal(cells, expected)


# --- replay -------------------------------------------------------------------------------------------------


def _clips(n: int, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(samples // 4, samples + 1, (n,), generator=gen)
    lengths[0] = samples
    wave = torch.zeros(n, samples)
    for b, length in enumerate(lengths.tolist()):
        # loudness over 60 dB so a batch-wide top_db floor would bite on the quiet clips' padding
        wave[b, :length] = torch.randn(length, generator=gen) * 10 ** (-3 + 3 * b / n)
    return wave, lengths


@pytest.mark.parametrize("config", [FrontEndConfig(), TIMM_FRONT_END], ids=["ced", "timm128"])
def test_replay_is_bit_identical_across_batches(config: FrontEndConfig) -> None:
    front_end = LogMelFrontEnd(config)
    wave, lengths = _clips(8, 32000, seed=3)
    recipe = AugmentRecipe(gain_db=3.0, time_masks=2, time_mask_frames=60, freq_masks=2)
    indices = np.arange(100, 108)
    params = sample_augment_params(recipe, 11, 2, indices, lengths.numpy())
    assert (params.values["shift"] != 0).any()
    batch8 = augmented_spectrogram(front_end, wave, lengths, params, recipe)
    assert batch8.dtype == torch.float32 and batch8.shape[:2] == (8, config.n_mels)
    assert (batch8 == 0.0).any()  # masks were applied
    for i in range(8):
        others = [j for j in (7, 1, 4, 2) if j != i][:2]
        order = [others[0], i, others[1]]  # different neighbours and position, batch of 3
        batch3 = augmented_spectrogram(
            front_end,
            wave[order],
            lengths[order],
            sample_augment_params(recipe, 11, 2, indices[order], lengths[order].numpy()),
            recipe,
        )
        alone = augmented_spectrogram(
            front_end, wave[i : i + 1], lengths[i : i + 1], params.subset(np.array([i])), recipe
        )
        assert torch.equal(batch8[i], batch3[1]), i
        assert torch.equal(batch8[i], alone[0]), i


# Each clip of a batch of 8 against the same clip amid other neighbours and alone: the clips that differ.
_BATCH_INVARIANCE = """
import torch
from ced_lightning.models.ced import LogMelFrontEnd
front_end = LogMelFrontEnd()
wave = torch.randn(8, 32000, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 0, 8)[:, None]
with torch.no_grad():
    batch8 = front_end(wave)
    amid = [front_end(wave[[(i + 1) % 8, i, (i + 5) % 8]])[1] for i in range(8)]
    alone = [front_end(wave[i : i + 1])[0] for i in range(8)]
print([i for i in range(8) if not (torch.equal(batch8[i], amid[i]) and torch.equal(batch8[i], alone[i]))])
"""


@pytest.mark.parametrize("mkl_path", ["AVX2", "COMPATIBLE"])
def test_spectrograms_are_batch_invariant_on_every_mkl_path(mkl_path: str) -> None:
    """MKL picks its kernels by CPU; `MKL_CBWR` forces its AVX2 or most portable path (read when the process
    starts, so a child process each; the CPU's own path is `test_replay_is_bit_identical_across_batches`).
    Before, a batched mel projection differed by an ulp between a batch of 3 and of 8 on both paths on an
    Intel Xeon: a student's spectrogram was not bit for bit its teacher's."""
    env = command_env(MKL_CBWR=mkl_path, OMP_NUM_THREADS="2")
    done = subprocess.run(
        [sys.executable, "-c", _BATCH_INVARIANCE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", (mkl_path, done.stdout)


def test_ensemble_front_ends_share_equal_spectrograms() -> None:
    # Teachers with equal front ends share one spectrogram; each result is what it alone would give.
    ced_a, ced_b, timm = LogMelFrontEnd(), LogMelFrontEnd(), LogMelFrontEnd(TIMM_FRONT_END)
    altered = LogMelFrontEnd()
    altered[0].mel_scale.fb.mul_(1.5)  # same config, other weights: must not be shared
    wave, lengths = _clips(4, 32000, seed=5)
    params = sample_augment_params(RECIPE, 3, 1, np.arange(4), lengths.numpy())
    front_ends = [ced_a, timm, ced_b, altered]
    mels = augmented_spectrograms(front_ends, wave, lengths, params, RECIPE)
    for front_end, mel in zip(front_ends, mels, strict=True):
        assert torch.equal(mel, augmented_spectrogram(front_end, wave, lengths, params, RECIPE))
    assert mels[2] is mels[0]
    assert mels[1] is not mels[0] and mels[3] is not mels[0]
    assert not torch.equal(mels[3], mels[0])


def test_front_end_floor_is_per_clip() -> None:
    # torchaudio's AmplitudeToDB alone takes one floor for a 3-D batch (see the module docstring)
    front_end = LogMelFrontEnd()
    wave, lengths = _clips(8, 32000, seed=3)
    quiet = int(lengths.argmin())
    batch_wide = front_end[1](front_end[0](wave))
    assert not torch.equal(batch_wide[quiet], front_end(wave[quiet : quiet + 1])[0])
    assert torch.equal(front_end(wave)[quiet], front_end(wave[quiet : quiet + 1])[0])


def test_no_compile_needed() -> None:
    # plain eager ops: works on a module that was never compiled, and inside no_grad / inference_mode
    front_end = LogMelFrontEnd()
    wave, lengths = _clips(2, 16000, seed=0)
    params = sample_augment_params(RECIPE, 0, 0, np.arange(2), lengths.numpy())
    with torch.inference_mode():
        out = augmented_spectrogram(front_end, wave, lengths, params, RECIPE)
    assert torch.equal(out, augmented_spectrogram(front_end, wave, lengths, params, RECIPE))
