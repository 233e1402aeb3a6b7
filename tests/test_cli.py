"""Console scripts (issue 18, item 3): the installed `ced-predict` gives the Hydra predict's tags without a
run folder; every `[project.scripts]` entry resolves; a Hydra command works as a console script."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from ced_lightning.core.ffmpeg_audio import ffmpeg_available

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "ced_reference" / "ced_tiny_depth2_random.pt"


def script(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{path} is not installed: `pip install -e . --no-deps` writes the console scripts")
    return str(path)


def scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_console_script_names_a_function():
    assert {"ced-predict", "ced-train", "ced-prepare", "ced-extract", "ced-evaluate", "ced-export"} <= set(
        scripts()
    )
    for name, target in scripts().items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("clips")
    rng = np.random.default_rng(0)
    sf.write(folder / "snap.wav", 0.1 * rng.standard_normal(16000).astype(np.float32), 16000)
    sf.write(folder / "long.flac", 0.1 * rng.standard_normal((44100 * 14, 2)).astype(np.float32), 44100)
    return [folder / "snap.wav", folder / "long.flac"]


def test_ced_predict_gives_the_hydra_predicts_tags_and_writes_no_folder(clips, tmp_path, capsys, monkeypatch):
    """The installed script against the installed Hydra script on the same files, one of them an m4a: the
    same JSON lines, both exit 1 for the m4a (after tagging the others), and ced-predict leaves its working
    folder empty (no run folder, no log file)."""
    memo = tmp_path / "memo.m4a"
    memo.write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(100))
    inputs = [*map(str, clips), str(memo)]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    quick = subprocess.run(
        [script("ced-predict"), *inputs, "--model", str(REFERENCE), "-k", "3", "--output", "-"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert quick.returncode == 1, quick.stderr
    assert list(cwd.iterdir()) == []
    if ffmpeg_available():
        assert "memo.m4a: cannot decode audio (neither libsndfile nor FFmpeg reads it" in quick.stderr
    else:
        assert "memo.m4a: cannot decode audio (AAC in MP4 is not a format libsndfile" in quick.stderr
        assert "ffmpeg -i memo.m4a" in quick.stderr
    hydra_out = tmp_path / "hydra" / "tags.jsonl"
    hydra = subprocess.run(
        [
            script("ced-predict-hydra"),
            f"ckpt={REFERENCE}",
            f"inputs=[{','.join(inputs)}]",
            "topk=3",
            f"output={hydra_out}",
            f"paths.root_dir={tmp_path / 'hydra'}",
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert hydra.returncode == 1, hydra.stderr
    lines = [json.loads(line) for line in quick.stdout.splitlines()]
    assert lines == [json.loads(line) for line in hydra_out.read_text().splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["snap.wav", "long.flac"] and len(lines[0]["labels"]) == 3

    # Text on stdout by default, the lines the Hydra command prints; bad arguments exit 2 saying what to add.
    from ced_lightning.cli import predict_main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr("torch.set_num_threads", lambda n: None)  # keep the test's thread count
    assert predict_main([*map(str, clips), "--model", str(REFERENCE), "-k", "3", "--quiet"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [line for line in hydra.stdout.splitlines() if line.startswith(tuple(map(str, clips)))]
    assert list(cwd.iterdir()) == []
    with pytest.raises(SystemExit) as exit_info:
        predict_main([str(clips[0]), "--model", str(REFERENCE), "--outputs", "windows"])
    assert exit_info.value.code == 2
    assert "--outputs windows: give --windows-output" in capsys.readouterr().err


def test_a_hydra_command_works_as_a_console_script():
    run = subprocess.run([script("ced-train"), "--help"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "train is powered by Hydra" in run.stdout or "== Config ==" in run.stdout
