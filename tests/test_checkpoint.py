"""The checkpoint format (models/checkpoint.py): the metadata our training writes, read back by
`load_checkpoint`; the EMA weights chosen by `eval_prefix`; torch's generator restored for a resume."""

from __future__ import annotations

from pathlib import Path

import torch

from ced_lightning.models import create_ced, load_checkpoint, model_spec
from ced_lightning.models.checkpoint import restore_rng_states, write_metadata


def test_metadata_written_is_what_load_checkpoint_reads(tmp_path: Path) -> None:
    model = create_ced("ced_tiny", depth=1, num_classes=3).eval()
    ema = create_ced("ced_tiny", depth=1, num_classes=3).eval()  # other weights: the ones to evaluate
    checkpoint = {
        "state_dict": {
            **{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"ema.{k}": v for k, v in ema.state_dict().items()},
        }
    }
    write_metadata(checkpoint, model, ["a", "b", "c"], eval_prefix="ema.")
    # the keys and values checkpoints of before carry, so files written either side read the same
    assert checkpoint["model_spec"] == model_spec(model)
    assert checkpoint["class_names"] == ["a", "b", "c"] and checkpoint["eval_prefix"] == "ema."
    assert torch.equal(checkpoint["rng_states"]["torch"], torch.get_rng_state())
    torch.save(checkpoint, tmp_path / "last.ckpt")

    loaded = load_checkpoint(tmp_path / "last.ckpt")
    assert loaded.class_names == ["a", "b", "c"]
    wave = torch.randn(1, 16000)
    with torch.no_grad():
        assert torch.equal(loaded.model(wave), ema(wave))
        assert not torch.equal(loaded.model(wave), model(wave))


def test_rng_states_restore_the_generator() -> None:
    checkpoint: dict = {}
    write_metadata(checkpoint, create_ced("ced_tiny", depth=1, num_classes=2), None, eval_prefix="model.")
    expected = torch.rand(5)
    restore_rng_states(checkpoint)
    assert torch.equal(torch.rand(5), expected)
    restore_rng_states({})  # a checkpoint without them: nothing to restore
