"""Store verification: replay stored (epoch, row) pairs through the teachers and compare (`extract verify=N`).

A logit store records every row's augmentation parameters, so any of its entries can be computed again from
the audio store and the teachers. `verify_store` replays a random sample of them and bounds the difference by
the store's quantization error plus a slack for arithmetic; `check_verified` turns a failed result into the
`VerificationError` that ends `extract` with exit status 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ced_lightning.core.audio import int16_to_float, pack_clips
from ced_lightning.core.augment import front_end_sources
from ced_lightning.core.ensemble import ensemble_probabilities
from ced_lightning.core.errors import CedError
from ced_lightning.core.progress import ProgressLog
from ced_lightning.core.quantize import max_abs_error
from ced_lightning.store.audio import AudioStore
from ced_lightning.store.logits import BLOCK_REDUCED_PRECISION, LogitStore
from ced_lightning.store.remote import redact_url
from ced_lightning.store.segments import read_segments

# Largest replay difference beyond quantization, by whether either side computed in reduced precision:
# bf16 teachers differ from a float32 replay by about 1% of a probability, float32 ones by round-off.
REPLAY_SLACK = {False: 1e-4, True: 2e-2}


class VerificationError(CedError, RuntimeError):
    """`verify=N` found stored probabilities that the teachers do not reproduce."""


@torch.no_grad()
def verify_store(
    store: LogitStore,
    teachers: Sequence[nn.Module],
    audio_store: AudioStore,
    samples: int,
    seed: int,
    replay_reduced: bool = False,
) -> dict[str, Any]:
    """Replay `samples` random (epoch, row) pairs from the stored parameters through the teachers (a row is
    a segment of a clip: `LogitStore.segments`).

    Compares the teachers' probabilities of the stored classes with the stored values: the largest absolute
    difference must lie within the quantization error plus a slack for arithmetic, `REPLAY_SLACK[True]` where
    the pair's block was extracted in reduced precision (its `block_done` code) or the replay itself runs in
    it (`replay_reduced`), float round-off otherwise. Also reports how often the recomputed top-k has the
    stored classes.
    """
    rng = np.random.default_rng(seed)
    n = min(samples, store.num_rows * store.epochs)
    picks = rng.choice(store.num_rows * store.epochs, size=n, replace=False)
    segments = store.segments()
    device = next(teachers[0].parameters()).device
    codes = store.block_codes()
    mel_sources = front_end_sources([t.front_end for t in teachers])
    pairs = [divmod(int(pick), store.num_rows) for pick in picks]
    # Every sampled entry read before any is compared: a lost or truncated chunk is reported as such
    # (`StoreDamagedError`, naming the store, array and chunk), not as teachers that disagree with the store.
    stored_rows = [store.read(epoch, i) for epoch, i in pairs]
    rows = {i: read_segments(audio_store, segments, np.array([i]))[i] for _, i in pairs}
    diffs, excess, agree, bound_slack = [], [], 0, 0.0
    progress = ProgressLog("verify", n, unit="pairs")
    for (_, i), (classes, stored, params) in zip(pairs, stored_rows, strict=True):
        block_reduced = codes[i // store.block_clips] == BLOCK_REDUCED_PRECISION
        slack = REPLAY_SLACK[bool(block_reduced) or replay_reduced]
        bound_slack = max(bound_slack, slack)
        row = rows[i]
        wav, lengths = pack_clips([row], store.clip_samples)
        wav_t = int16_to_float(torch.from_numpy(wav).to(device))
        lengths_t = torch.from_numpy(lengths).to(device)
        probs = ensemble_probabilities(
            teachers,
            wav_t,
            lengths_t,
            params,
            store.recipe,
            store.combine,
            mel_sources,
            store.teacher_weights,
        )[0]
        probs = probs.cpu().numpy()
        recomputed = probs[classes]
        diff = np.abs(recomputed - stored)
        diffs.append(diff.max())
        excess.append((diff - max_abs_error(recomputed, store.quantization) - slack).max())
        top = np.argsort(-probs, kind="stable")[: store.topk]
        agree += int(set(top.tolist()) == set(classes.tolist()))
        progress.advance()
    progress.close()
    bound = float(max_abs_error(1.0, store.quantization)) + bound_slack
    # Objects of the sampled blocks that a store written before chunk records may lack (all-zero parameters)
    # or may have lost: named in the verdict when the values disagree.
    absent = store.absent_objects(sorted({i // store.block_clips for _, i in pairs}))
    return {
        **({"absent_chunks": absent} if absent else {}),
        "samples": int(n),
        "max_abs_diff": float(max(diffs)),
        "mean_abs_diff": float(np.mean(diffs)),
        "bound": bound,
        "ok": bool(max(excess) <= 0),
        "topk_set_agreement": agree / n,
    }


def check_verified(store_url: str, result: dict[str, Any]) -> None:
    """Raise `VerificationError` naming the store when `result` (from `verify_store`) failed."""
    if result["ok"]:
        return
    raise VerificationError(
        f"{redact_url(store_url)}: verification failed: the teachers' probabilities differ from the "
        f"stored ones by up to {result['max_abs_diff']:.2e} (bound {result['bound']:.2e}) on "
        f"{result['samples']} (epoch, clip) pairs. "
        + (
            f"The store lacks {len(absent)} chunk object(s) of the sampled blocks ({', '.join(absent[:3])}"
            f"{' ...' if len(absent) > 3 else ''}): lost, or all zeros that a store written before chunk "
            "records left out; a lost one explains the difference (`python -m ced_lightning.check "
            "store=...`)."
            if (absent := result.get("absent_chunks"))
            else "The store does not hold what these teachers compute on this audio store: check the teacher "
            "checkpoints and the audio store, or extract into a new output."
        )
    )
