"""What many test files share: the tiny demo inputs built once per session through the real commands, a tiny
untrained teacher, and running a command in a child process as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Tests never reach a network service: W&B runs offline and hubs are off.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

DATA = Path(__file__).parent / "data"
# The longest float32 sums `float32_bound` counts: a log-mel bin of the CED front end sums n_fft = 512
# windowed samples (the mel weighting after it sums non-negative powers, which rounds far less); CED-Tiny's
# widest dot product is its MLP's 4 x 192 = 768 hidden units, the logits' scale of error.
FRONT_END_SUMS = 512
CED_TINY_SUMS = 768
CED_REFERENCE = DATA / "ced_reference"


@pytest.fixture(scope="session")
def ced_reference() -> Path:
    return CED_REFERENCE


def float32_bound(reference: torch.Tensor | np.ndarray, accumulated: int) -> float:
    """The largest max-absolute difference allowed between a float32 result and `reference`, the same
    function computed by other float32 kernels (another CPU, library or implementation): `accumulated`
    roundings, each up to one float32 ulp at the reference's largest magnitude.

    Why this bound: kernels choose their summation order, vector width and fused multiply-adds by CPU (MKL's
    AVX-512, AVX2 and COMPATIBLE paths, onnxruntime's, torchaudio's FFT against a DFT matmul), and a float32
    sum of n terms in another order can differ by up to n ulps of its magnitude. The bound follows from the
    arithmetic, not from one machine's difference, so it holds on any x86-64 CPU; a real error (a wrong
    shift, mask, window, floor or weight) moves values by far more. It is an absolute bound at the array's
    scale, not per value: a dB value is the log of a power, so its error is the same near 0 dB as near the
    peak. Comparisons of our own runs on one machine stay exact instead (`torch.equal`)."""
    magnitude = np.float32(np.abs(np.asarray(reference, dtype=np.float32)).max())
    return float(accumulated * np.spacing(magnitude))


def save_tiny_teacher(path: Path | str, num_classes: int) -> Path:
    """An untrained one-block `ced_tiny` saved as a teacher checkpoint; seeded, so every build is the same."""
    from ced_lightning.models import create_ced, save_ced

    torch.manual_seed(0)
    save_ced(create_ced("ced_tiny", depth=1, num_classes=num_classes), path)
    return Path(path)


def tiny_student_overrides(demo: dict[str, str], logits: str | Path | None = None) -> list[str]:
    """`train` overrides for a 1-block CED-Tiny student on the `tiny_demo` stores (or another logit store of
    them), nothing built: the start every tiny student run shares; tests add their batch sizes and trainer."""
    return [
        "experiment=ced_mini",
        "model=ced_tiny",
        "+model.depth=1",
        "model.init_from=null",  # from scratch: experiment=ced_mini starts from the demo's teacher
        f"data.train={demo['train']}",
        f"data.val={demo['val']}",
        f"data.test={demo['test']}",
        f"data.logits={logits if logits is not None else demo['logits']}",
        "data.build_missing=false",
    ]


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny demo set (1 s clips: 40 train, 16 val, 16 test), an untrained tiny teacher and its logit store
    (E=2, k=4), all through the real commands; built once for the session. Tests only read these stores
    (a test that needs another store writes its own under its tmp_path)."""
    from ced_lightning import compose_config
    from ced_lightning.data.demo import build_demo_stores
    from ced_lightning.extract import run_extract
    from ced_lightning.store import AudioStore

    root = tmp_path_factory.mktemp("demo")
    stores = build_demo_stores(str(root / "demo"), seed=0, train=40, val=16, test=16, clip_seconds=1.0)
    teacher = save_tiny_teacher(root / "teacher.pt", AudioStore.open(stores["train"]).num_classes)
    logits = str(root / "logits.zarr")
    overrides = [
        f"audio_store={stores['train']}",
        f"output={logits}",
        "teacher=ced",
        f"teacher.checkpoints=[{teacher}]",
        "epochs=2",
        "topk=4",
        "clip_seconds=1.0",
        "trainer.enable_progress_bar=false",
    ]
    run_extract(compose_config(overrides, output_dir=root / "extract_run", config="extract"))
    return {**stores, "logits": logits, "root": str(root)}


def command(module: str, *args: str) -> list[str]:
    """The command line of `python -m ced_lightning.<module> ARGS`."""
    return [sys.executable, "-m", f"ced_lightning.{module}", *args]


def command_env(**extra: str) -> dict[str, str]:
    """A child's environment: this one with one OpenMP thread (the suite shares a small CPU, and one thread
    per process makes float sums of a 2-process run agree bit for bit with one process), plus `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_command(
    module: str,
    *args: str,
    cwd: Path | str | None = None,
    timeout: float = 300,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """`python -m ced_lightning.<module> ARGS` run to its end in a child process, as a user runs it, its
    output captured as text (`.stdout`, `.stderr`, `.returncode`: the caller asserts on them). `env` adds
    variables to the environment."""
    return subprocess.run(
        command(module, *args),
        cwd=cwd,
        env=command_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def tiny_model():
    """A 1-block CED-Tiny with random weights and 4 classes, in eval mode (the inference tests' model)."""
    from ced_lightning.models import create_ced

    torch.manual_seed(0)
    return create_ced("ced_tiny", depth=1, num_classes=4).eval()
