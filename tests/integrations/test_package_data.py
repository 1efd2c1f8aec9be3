"""The wheel ships the example fastreid YAMLs that ``config_path`` returns."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mkdir(path):
    path.mkdir()
    return path


@pytest.mark.slow
def test_wheel_contains_the_fastreid_configs(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # setuptools builds in the source tree: build a copy
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name if src.exists() else _mkdir(src) / name)
    for package in ("feature_cloud", "integrations"):
        shutil.copytree(
            os.path.join(ROOT, package), src / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {
        os.path.relpath(p, os.path.join(ROOT, "integrations")).replace(os.sep, "/")
        for p in glob.glob(
            os.path.join(ROOT, "integrations", "fastreid_configs", "**", "*.yml"), recursive=True
        )
    }
    assert len(shipped) == 4
    for name in shipped:
        assert "feature_cloud/integrations/" + name in names, name
    assert "feature_cloud/integrations/fastreid.py" in names
