"""Teachers at full precision (issue 14, item 4): extract runs them in float32 unless told otherwise and
records it in the store (`teacher_precision`); a resume at another precision is refused, older stores without
the attribute still resume.

On the code before: conf/extract.yaml had `precision: auto` (bf16-mixed on GPUs) and stores had no
`teacher_precision` attribute, so the first test fails there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ced_lightning import conf_dir
from ced_lightning.models import create_ced, save_ced
from ced_lightning.store.audio_writer import write_audio_store


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("precision")
    rng = np.random.default_rng(0)
    clips = [(f"clip{i}", (0.1 * rng.standard_normal(8000)).astype(np.float32), [i % 3]) for i in range(4)]
    write_audio_store(root / "audio.zarr", clips, class_names=["a", "b", "c"])
    torch.manual_seed(0)
    save_ced(create_ced("ced_tiny", depth=1, num_classes=3).eval(), root / "teacher.pt")
    return root


def _cfg(root: Path, *extra: str) -> DictConfig:
    overrides = [
        f"audio_store={root / 'audio.zarr'}",
        f"output={root / 'logits.zarr'}",
        f"paths.root_dir={root}",
        f"teacher.members=[{{name: t, checkpoint: {root / 'teacher.pt'}}}]",
        "epochs=1",
        "topk=2",
        "quantization=float16",
        "clip_seconds=0.5",
        "block_clips=4",
        "micro_batch_size=4",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *extra,
    ]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("extract", overrides=overrides)


def test_float32_by_default_and_recorded(workdir: Path) -> None:
    from ced_lightning.engines.extraction import teacher_precision
    from ced_lightning.extract import run_extract
    from ced_lightning.store.logits import BLOCK_FULL_PRECISION

    cfg = _cfg(workdir)
    # float32 on GPUs too, not what `auto` picks there (bf16-mixed).
    assert cfg.trainer.precision == "32-true"
    cfg_gpu = cfg.copy()
    cfg_gpu.trainer.accelerator = "gpu"
    assert teacher_precision(cfg_gpu) == "32-true"

    store = run_extract(cfg)
    assert store.attrs["teacher_precision"] == "32-true" == store.teacher_precision
    assert store.block_codes().tolist() == [BLOCK_FULL_PRECISION]


def test_resume_at_another_precision_refused_older_stores_resume(workdir: Path) -> None:
    from ced_lightning.extract import run_extract
    from ced_lightning.store.logits import LogitStore

    url = str(workdir / "logits.zarr")
    if "teacher_precision" not in LogitStore.open(url).attrs:  # run alone: make the store first
        run_extract(_cfg(workdir))
    with pytest.raises(ValueError, match=r"teacher_precision: stored '32-true', requested 'bf16-mixed'"):
        run_extract(_cfg(workdir, "trainer.precision=bf16-mixed"))
    # Lightning's older spelling of the same precision is the same precision.
    assert run_extract(_cfg(workdir, "trainer.precision=32")).is_complete()

    # A store written before the attribute existed: its blocks' codes say how each was computed, so it
    # resumes at any precision, and the attribute is not made up afterwards.
    group = zarr.open_group(url, mode="r+", zarr_format=3)
    attrs = dict(group.attrs)
    del attrs["teacher_precision"]
    group.attrs.put(attrs)
    resumed = run_extract(_cfg(workdir, "trainer.precision=bf16-mixed"))
    assert resumed.is_complete() and resumed.teacher_precision is None
