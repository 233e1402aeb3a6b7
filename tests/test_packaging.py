"""The Hydra configs ship inside the wheel, so a non-editable install works like a checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ced_lightning

REPO = Path(__file__).resolve().parents[1]


def test_checkout_resolves_top_level_conf():
    assert ced_lightning.conf_dir() == REPO / "conf"
    assert (ced_lightning.conf_dir() / "train.yaml").is_file()
    assert (ced_lightning.resources_dir() / "class_labels_indices.csv").is_file()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
    )
    (path,) = out.glob("ced_lightning-*.whl")
    return path


def test_wheel_ships_every_config_and_resource(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert configs, "no configs found"
    missing = {c for c in configs if f"ced_lightning/conf/{c}" not in names}
    assert not missing
    assert "ced_lightning/resources/class_labels_indices.csv" in names
    packages = {p.parent.relative_to(REPO / "src").as_posix() for p in (REPO / "src").rglob("__init__.py")}
    assert all(f"{pkg}/__init__.py" in names for pkg in packages)


def test_installed_wheel_composes_from_packaged_conf(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    code = (
        "import ced_lightning, hydra\n"
        "conf = ced_lightning.conf_dir()\n"
        "assert conf.parts[-2:] == ('ced_lightning', 'conf'), conf\n"
        "with hydra.initialize_config_dir(str(conf), version_base='1.3'):\n"
        "    cfg = hydra.compose('train')\n"
        "print(conf)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert str(target) in result.stdout
