"""Errors raised on purpose end every command in one line on stderr and a non-zero exit status (2 for a
config value, 1 otherwise); config values are checked for type and range at start-up, naming the key; a bug
keeps its traceback, and HYDRA_FULL_ERROR=1 shows the traceback of every error.

Before: a config or input error, a held store lock, `topk=abc`, all ended in 20-70-line tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ced_lightning.core.errors import CedError, CheckFailedError, ConfigError, InputError, MissingInputError
from ced_lightning.engines.config_checks import RULES, Rule, check_config
from ced_lightning.engines.launch import error_line
from ced_lightning.models import CheckpointLoadError
from ced_lightning.store.lock import StoreLockedError, store_lock
from conftest import command_env, run_command


def _one_error_line(done: subprocess.CompletedProcess[str], command: str) -> str:
    """The command's single stderr line that reports the error (stderr may hold warnings of libraries too,
    never a traceback)."""
    said = done.stdout[-2000:] + done.stderr[-4000:]
    assert "Traceback" not in done.stderr, said
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1, said
    assert errors[0].startswith(f"{command}: error: "), said
    return errors[0]


@pytest.fixture(scope="module")
def garbage_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "broken.ckpt"
    path.write_bytes(b"not a checkpoint at all")
    return path


def test_extract_refuses_a_held_store_in_one_line(tmp_path: Path) -> None:
    """Two extract runs on one output: the second says who writes it, in one line (before: 2 tracebacks)."""
    out = tmp_path / "logits.zarr"
    with store_lock(str(out), "test"):
        done = run_command(
            "extract", f"output={out}", "audio_store=unused.zarr", f"hydra.run.dir={tmp_path / 'run'}"
        )
    line = _one_error_line(done, "extract")
    assert done.returncode == 1
    assert f"{out} is being written by another run" in line and f"lock file {out}.lock" in line
    assert line in (tmp_path / "run" / "extract.log").read_text()  # the run's log records it too


def test_predict_names_the_key_of_a_value_of_the_wrong_type(tmp_path: Path) -> None:
    done = run_command("predict", "ckpt=x.ckpt", "inputs=[a.wav]", "topk=abc", f"hydra.run.dir={tmp_path}")
    assert _one_error_line(done, "predict") == "predict: error: topk: expected an integer >= 1, got 'abc'"
    assert done.returncode == 2


def test_prepare_names_the_missing_input(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    done = run_command(
        "prepare", f"input={missing}", f"output={tmp_path / 'a.zarr'}", f"hydra.run.dir={tmp_path}"
    )
    assert f"input={missing}: no such file or directory" in _one_error_line(done, "prepare")
    assert done.returncode == 1


def test_train_names_the_missing_store(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    done = run_command(
        "train", f"data.root={root}", "data.build_missing=false", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert f"data.train: no store at {root}/distill.zarr" in _one_error_line(done, "train")
    assert done.returncode == 1


def test_the_demo_through_train_checks_its_clip_counts_before_building(tmp_path: Path) -> None:
    done = run_command(
        "train",
        f"data.root={tmp_path / 'demo'}",
        "data.demo.clips.train=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    line = _one_error_line(done, "train")
    assert line == "train: error: data.demo.clips.train: expected an integer >= 1, got 0"
    assert done.returncode == 2 and not (tmp_path / "demo").exists()


def test_evaluate_names_the_checkpoint_that_does_not_load(tmp_path: Path, garbage_checkpoint: Path) -> None:
    done = run_command(
        "evaluate", f"ckpt={garbage_checkpoint}", f"store={tmp_path / 's.zarr'}", f"hydra.run.dir={tmp_path}"
    )
    assert f"{garbage_checkpoint}: cannot load this checkpoint" in _one_error_line(done, "evaluate")
    assert done.returncode == 1


def test_export_names_the_checkpoint_that_does_not_load(tmp_path: Path, garbage_checkpoint: Path) -> None:
    done = run_command(
        "export", f"ckpt={garbage_checkpoint}", f"output={tmp_path / 'm.onnx'}", f"hydra.run.dir={tmp_path}"
    )
    assert f"{garbage_checkpoint}: cannot load this checkpoint" in _one_error_line(done, "export")
    assert done.returncode == 1


def test_import_logits_names_the_missing_store(tmp_path: Path) -> None:
    store = tmp_path / "balanced_train.zarr"
    done = run_command(
        "import_logits",
        f"source={tmp_path / 'chunk_10'}",
        f"audio_store={store}",
        f"output={tmp_path / 'l.zarr'}",
        f"hydra.run.dir={tmp_path}",
    )
    assert f"{store}: no audio store there" in _one_error_line(done, "import_logits")
    assert done.returncode == 1


def test_ced_predict_names_the_missing_input(tmp_path: Path, garbage_checkpoint: Path) -> None:
    missing = tmp_path / "missing.wav"
    done = run_command(
        "cli", "--model", str(garbage_checkpoint), str(missing), "--output", str(tmp_path / "t.jsonl")
    )
    line = _one_error_line(done, "ced-predict")
    assert str(missing) in line or str(garbage_checkpoint) in line
    assert done.returncode == 1


def test_a_multirun_prints_each_failed_job_in_one_line_and_runs_the_others(tmp_path: Path) -> None:
    done = run_command(
        "predict", "-m", "ckpt=x.ckpt", "inputs=[a.wav]", "topk=abc,0", f"hydra.sweep.dir={tmp_path}"
    )
    said = done.stdout[-2000:] + done.stderr[-4000:]
    assert "Traceback" not in done.stderr and done.returncode == 1, said
    errors = [line for line in done.stderr.splitlines() if ": error: " in line]
    job = "ckpt=x.ckpt inputs=[a.wav] topk="
    assert errors[0] == f"predict: error: topk: expected an integer >= 1, got 'abc' [job 0: {job}abc]", said
    assert errors[1] == f"predict: error: topk: expected an integer >= 1, got 0 [job 1: {job}0]", said
    assert errors[2] == "predict: error: job 0 of the multirun failed (above)", said
    assert len(errors) == 3, said


def test_hydra_full_error_shows_the_traceback(tmp_path: Path) -> None:
    done = run_command(
        "predict",
        "ckpt=x.ckpt",
        "inputs=[a.wav]",
        "topk=abc",
        f"hydra.run.dir={tmp_path}",
        HYDRA_FULL_ERROR="1",
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ConfigError: topk: expected an integer >= 1" in done.stderr


_BUG = """
import sys
import ced_lightning.predict as command

def broken(cfg):
    raise KeyError("an internal slip")

command.predict = broken
sys.argv = ["predict", "ckpt=x.ckpt", "inputs=[a.wav]", "hydra.run.dir=" + sys.argv[1]]
command.main()
"""


def test_a_bug_keeps_its_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _BUG, str(tmp_path)],
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "KeyError: 'an internal slip'" in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("topk", "abc", "topk: expected an integer >= 1 or null, got 'abc'"),
        ("topk", 0, "topk: expected an integer >= 1 or null, got 0"),
        ("topk", 2.5, "topk: expected an integer >= 1 or null, got 2.5"),
        ("quantization", "int4", "quantization: expected one of float16, int8, got 'int4'"),
        ("clip_seconds", 0, "clip_seconds: expected a number > 0, got 0"),
        ("segment_seconds", -1.0, "segment_seconds: expected a number > 0 or null, got -1.0"),
        ("allow_weak_teachers", "yes", "allow_weak_teachers: expected true or false, got 'yes'"),
        ("teacher_check.batch_size", None, "teacher_check.batch_size: expected an integer >= 1, got None"),
    ],
)
def test_config_values_are_checked_by_type_and_range(key: str, value: object, message: str) -> None:
    from ced_lightning import compose_config

    cfg = compose_config([], config="extract")
    check_config(cfg, RULES["extract"])  # the shipped defaults pass
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ConfigError) as refused:
        check_config(cfg, RULES["extract"])
    assert str(refused.value) == message


def test_shipped_configs_pass_their_checks() -> None:
    from ced_lightning import compose_config

    for command in ("prepare", "train", "extract", "import_logits", "evaluate", "predict", "export"):
        check_config(compose_config([], config=command), RULES[command])
    check_config(compose_config(["experiment=teacher_demo_ced"], config="train"), RULES["train"])


def test_rules_accept_what_they_describe() -> None:
    assert Rule(float, low=0, high=1).accepts(1) and not Rule(float, low=0, high=1).accepts(1.5)
    assert Rule(float, low=0, high=1).describe() == "a number in [0, 1]"
    assert not Rule(int, low=0).accepts(True)  # a bool is no count
    assert Rule(int, low=1, null=True).accepts(None) and not Rule(int, low=1).accepts(None)


def test_the_project_errors_share_one_base_and_keep_their_builtin_bases(monkeypatch) -> None:
    for error, builtin in [
        (ConfigError, ValueError),
        (InputError, ValueError),
        (MissingInputError, FileNotFoundError),
        (CheckpointLoadError, ValueError),
        (StoreLockedError, FileExistsError),
        (CheckFailedError, RuntimeError),
    ]:
        assert issubclass(error, CedError) and issubclass(error, builtin)
    assert ConfigError.exit_code == 2 and InputError.exit_code == 1
    many = InputError("cannot import the released logits:\n  a.h5: truncated\n  b.h5: truncated")
    assert error_line("import_logits", many) == (
        "import_logits: error: cannot import the released logits: a.h5: truncated; b.h5: truncated"
    )
    monkeypatch.setenv("RANK", "1")
    secret = MissingInputError("s3://KEY:SECRET@bucket/a.zarr: no audio store there")
    assert (
        error_line("train", secret) == "train (rank 1): error: s3://***@bucket/a.zarr: no audio store there"
    )
