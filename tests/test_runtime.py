"""`ced_lightning.engines.trainer`: W&B that never prompts (netrc probing), logger overrides reaching the
logger, and the Trainer's validation interval. (`test_train.py::test_multirun_two_jobs_and_offline_wandb`
runs the offline W&B fallback end to end.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.loggers import WandbLogger

from ced_lightning import compose_config
from ced_lightning.engines.trainer import (
    build_loggers,
    build_trainer,
    validation_interval,
    wandb_offline_reason,
)


def test_wandb_offline_reason_finds_the_netrc_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.invalid")
    netrc = tmp_path / ".netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert wandb_offline_reason(timeout=0.5) == "not logged in (wandb login)"
    netrc.write_text("machine wandb.invalid\n  login user\n  password " + "0" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_offline_reason(timeout=0.5) == "wandb.invalid is unreachable"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_offline_reason() == "WANDB_MODE=offline"


def test_documented_wandb_resume_overrides_reach_the_logger(tmp_path: Path) -> None:
    cfg = compose_config(["+logger.wandb.id=abc123", "+logger.wandb.resume=allow"], output_dir=tmp_path)
    (wandb_logger,) = (lg for lg in build_loggers(cfg) if isinstance(lg, WandbLogger))
    assert wandb_logger.version == "abc123"  # the run W&B continues; `resume` goes to wandb.init


def test_a_run_shorter_than_its_validation_interval_still_validates() -> None:
    """The demo's CED teacher validates every 3rd epoch; trained for 1 epoch (a quick look, or a test) it must
    still validate once, or it ends without a best or averaged checkpoint."""
    assert (
        validation_interval(3, 1) == 1 and validation_interval(3, 60) == 3 and validation_interval(1, 5) == 1
    )
    assert validation_interval(None, 4) is None and validation_interval(5, None) == 5
    cfg = compose_config(["experiment=teacher_demo_ced", "data.schedule.max_epochs=1", "trainer=cpu"])
    assert cfg.trainer.check_val_every_n_epoch == 3
    assert build_trainer(cfg, callbacks=[], loggers=[]).check_val_every_n_epoch == 1


def test_no_progress_bar_where_the_output_is_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under pytest stdout is captured (not a terminal), as in `> run.log`: the rich bar, which would redraw
    in a thread of its own for nobody, is left out and Lightning adds none; EpochLog's lines stay."""
    from lightning.pytorch.callbacks import RichProgressBar

    from ced_lightning.engines.callbacks import EpochLog
    from ced_lightning.engines.trainer import build_callbacks

    cfg = compose_config(["experiment=teacher_demo_ced", "trainer=cpu"])
    callbacks = build_callbacks(cfg)
    assert any(isinstance(c, RichProgressBar) for c in callbacks)
    trainer = build_trainer(cfg, callbacks=callbacks, loggers=[])
    assert trainer.progress_bar_callback is None
    assert any(isinstance(c, EpochLog) for c in trainer.callbacks)
    monkeypatch.setattr("ced_lightning.engines.trainer.output_is_terminal", lambda: True)
    trainer = build_trainer(cfg, callbacks=build_callbacks(cfg), loggers=[])
    assert isinstance(trainer.progress_bar_callback, RichProgressBar)
