"""Progress lines of every long stage where the output is not a terminal (a log file, a pipe): prepare, the
demo's stores, the teacher check, extraction and its verification, import_logits, evaluate and predict run
here for real on tiny inputs with `CED_PROGRESS_SECONDS=0`; training's within-epoch lines are checked on a
real `train` process in test_run_signals.py."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from ced_lightning import compose_config, conf_dir
from ced_lightning.core.progress import (
    PROGRESS_SECONDS_ENV,
    ProgressLog,
    format_duration,
    format_progress,
    output_is_terminal,
    progress_seconds,
)
from conftest import save_tiny_teacher

RELEASE = Path(__file__).parent / "data" / "ced_legacy" / "released_layout"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """stdout a log file (as under `> run.log`) and a progress line at every step."""
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "0")
    monkeypatch.setattr(sys, "stdout", io.StringIO())


def _lines(caplog: pytest.LogCaptureFixture, stage: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "ced_lightning.core.progress" and r.getMessage().startswith(f"{stage}: ")
    ]


def _wavs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"clip{i}.wav" for i in range(count)]
    for path in paths:
        sf.write(path, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
    return paths


def test_a_line_says_done_total_rate_and_time_left() -> None:
    assert format_progress("extract", 1200, 4096, "clip-epochs", 41.2) == (
        "extract: 1200/4096 clip-epochs (29.3%), 41.2 clip-epochs/s, 1 min 10 s left"
    )
    assert (
        format_progress("epoch 3 train", 5, float("inf"), "batches", 2.0)
        == "epoch 3 train: 5 batches, 2 batches/s"
    )
    assert format_progress("prepare", 0, 10, "files", None) == "prepare: 0/10 files (0.0%)"
    assert format_progress("x", 10, None, "clips", 123456.7) == "x: 10 clips, 123457 clips/s"
    assert format_progress("verify", 4, 4, "pairs", 0.5, took=8.2) == (
        "verify: 4/4 pairs (100.0%), 0.5 pairs/s, took 8 s"
    )
    assert [format_duration(s) for s in (0.4, 59, 725, 12_000)] == ["0 s", "59 s", "12 min 5 s", "3 h 20 min"]


def test_lines_come_at_most_every_interval_and_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ced_lightning.core.progress"):
        with ProgressLog("slow", 10, unit="files", seconds=3600, enabled=True) as progress:
            for _ in range(10):
                progress.advance()
        (line,) = _lines(caplog, "slow")
        assert line.startswith("slow: 10/10 files (100.0%), ") and line.endswith(", took 0 s")

        # Resumed work is counted, not in the rate; every step logs at interval 0.
        with ProgressLog("fast", 4, unit="blocks", done=2, seconds=0, enabled=True) as progress:
            progress.advance()
            progress.advance()
        assert [line.split(",")[0] for line in _lines(caplog, "fast")] == [
            "fast: 3/4 blocks (75.0%)",
            "fast: 4/4 blocks (100.0%)",
            "fast: 4/4 blocks (100.0%)",
        ]
        assert "took" in _lines(caplog, "fast")[-1]
        assert progress.rate() is not None and progress.rate() > 0

        with ProgressLog("quiet", 3, seconds=0, enabled=False) as progress:
            progress.advance(3)
        # An error inside the block: no closing line claiming the stage is through.
        with pytest.raises(RuntimeError), ProgressLog("failed", 3, seconds=3600, enabled=True) as progress:
            progress.advance()
            raise RuntimeError
    assert _lines(caplog, "quiet") == [] and _lines(caplog, "failed") == []


def test_on_a_terminal_no_lines_and_the_interval_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Terminal())
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert output_is_terminal() and not ProgressLog("bar", 3).enabled
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # `> run.log`: the log lines go to a file
    assert not output_is_terminal() and ProgressLog("bar", 3).enabled

    monkeypatch.delenv(PROGRESS_SECONDS_ENV, raising=False)
    assert progress_seconds() == 30.0
    monkeypatch.setenv(PROGRESS_SECONDS_ENV, "2.5")
    assert progress_seconds() == 2.5
    for bad in ("soon", "-1"):
        monkeypatch.setenv(PROGRESS_SECONDS_ENV, bad)
        with pytest.raises(ValueError, match=PROGRESS_SECONDS_ENV):
            progress_seconds()


def test_prepare_logs_its_files(
    tmp_path: Path, not_a_terminal: None, caplog: pytest.LogCaptureFixture
) -> None:
    from ced_lightning.data.sources import from_directory
    from ced_lightning.prepare import prepare_store

    _wavs(tmp_path / "in", 3)
    with caplog.at_level(logging.INFO):
        prepare_store(from_directory(tmp_path / "in").items, tmp_path / "s.zarr", chunk_samples=1024)
    lines = _lines(caplog, "prepare")
    assert [line.split(",")[0] for line in lines[:3]] == [
        "prepare: 1/3 files (33.3%)",
        "prepare: 2/3 files (66.7%)",
        "prepare: 3/3 files (100.0%)",
    ]
    assert "files/s" in lines[0] and " left" in lines[0]


def test_the_demo_stores_log_their_clips(
    tmp_path: Path, not_a_terminal: None, caplog: pytest.LogCaptureFixture
) -> None:
    from ced_lightning.data.demo import build_demo_stores

    with caplog.at_level(logging.INFO):
        build_demo_stores(str(tmp_path / "demo"), seed=1, train=3, val=2, test=2, clip_seconds=0.25)
    assert _lines(caplog, "demo train store")[-1].startswith("demo train store: 3/3 clips (100.0%)")
    assert _lines(caplog, "demo test store")[-1].startswith("demo test store: 2/2 clips (100.0%)")


def test_teacher_check_extraction_and_verify_log_their_work(
    tiny_demo: dict[str, str], tmp_path: Path, not_a_terminal: None, caplog: pytest.LogCaptureFixture
) -> None:
    from ced_lightning.extract import run_extract
    from ced_lightning.store import AudioStore

    teacher = save_tiny_teacher(tmp_path / "teacher.pt", AudioStore.open(tiny_demo["val"]).num_classes)
    overrides = [
        f"audio_store={tiny_demo['val']}",  # 16 clips
        f"output={tmp_path / 'logits.zarr'}",
        "teacher=ced",
        f"teacher.checkpoints=[{teacher}]",
        "epochs=2",
        "topk=4",
        "clip_seconds=1.0",
        "block_clips=8",
        "micro_batch_size=8",
        "num_workers=0",
        f"teacher_check.store={tiny_demo['test']}",
        "allow_weak_teachers=true",  # an untrained teacher
        "verify=3",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    with caplog.at_level(logging.INFO):
        run_extract(compose_config(overrides, output_dir=tmp_path / "run", config="extract"))
    assert _lines(caplog, "teacher_check")[-1].startswith("teacher_check: 16/16 clips (100.0%)")
    extracted = _lines(caplog, "extract")
    # 2 blocks x 2 epochs, one micro-batch each: a line per micro-batch, then the closing one.
    assert [line.split(",")[0] for line in extracted[:4]] == [
        f"extract: {n}/32 segment-epochs ({100 * n / 32:.1f}%)" for n in (8, 16, 24, 32)
    ]
    assert "segment-epochs/s" in extracted[0] and " left" in extracted[0] and "took" in extracted[-1]
    assert _lines(caplog, "verify")[-1].startswith("verify: 3/3 pairs (100.0%)")


def test_import_logits_logs_its_clips(
    tmp_path: Path, not_a_terminal: None, caplog: pytest.LogCaptureFixture
) -> None:
    from ced_lightning.data.sources import from_directory
    from ced_lightning.prepare import prepare_store
    from ced_lightning.release.importer import run_import

    audio = str(tmp_path / "audio.zarr")
    prepare_store(from_directory(RELEASE / "audio").items, audio)
    cfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "import_logits.yaml"))
    cfg.pop("defaults")
    chunk = RELEASE / "logits" / "ensemble_fixture" / "balanced" / "chunk_10"
    cfg.update(source=str(chunk), audio_store=audio, output=str(tmp_path / "logits.zarr"))
    with caplog.at_level(logging.INFO):
        run_import(OmegaConf.create(cfg))
    assert _lines(caplog, "import_logits")[-1].startswith("import_logits: 4/4 clips (100.0%)")


def test_evaluate_and_predict_log_their_clips_and_files(
    tiny_demo: dict[str, str], tmp_path: Path, not_a_terminal: None, caplog: pytest.LogCaptureFixture
) -> None:
    from ced_lightning.engines.inference import predict_files
    from ced_lightning.engines.scoring import evaluate_checkpoint
    from ced_lightning.store import AudioStore

    teacher = save_tiny_teacher(tmp_path / "teacher.pt", AudioStore.open(tiny_demo["test"]).num_classes)
    with caplog.at_level(logging.INFO):
        evaluate_checkpoint(teacher, tiny_demo["test"], batch_size=4, device="cpu")
        _wavs(tmp_path / "in", 3)
        predict_files(teacher, [str(tmp_path / "in")], device="cpu", print_tags=False)
    evaluated = _lines(caplog, "evaluate")
    assert [line.split(",")[0] for line in evaluated[:4]] == [
        f"evaluate: {n}/16 clips ({100 * n / 16:.1f}%)" for n in (4, 8, 12, 16)
    ]
    assert _lines(caplog, "predict")[-1].startswith("predict: 3/3 files (100.0%)")
