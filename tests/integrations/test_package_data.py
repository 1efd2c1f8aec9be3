"""Packaging as a user meets it: the wheel ships every subpackage (the ``feature-cloud`` command
runs from an installed wheel) and the example fastreid YAMLs that ``config_path`` returns; an
adapter whose framework is missing says what to install."""

from __future__ import annotations

import glob
import importlib.util
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
def test_wheel_contains_every_subpackage_and_the_fastreid_configs(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's build-system requires
        pytest.skip(f"--no-build-isolation with setuptools {setuptools.__version__} (needs >=77)")
    src = tmp_path / "src"  # setuptools builds in the source tree: build a copy
    for name in ("pyproject.toml", "README.md", "LICENSE"):
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
            "-v",  # the backend's own messages, warnings included
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # setuptools accepts the configuration as it is (no deprecated license table, no importable
    # data folder left out of `packages`: both are warnings today and build errors later)
    log = proc.stdout + proc.stderr
    for warning in ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "is absent from"):
        assert warning not in log, log[log.index(warning) - 2000 : log.index(warning) + 1000]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    import feature_cloud

    # one version: pyproject.toml reads feature_cloud.__version__
    assert os.path.basename(wheel).startswith(f"feature_cloud-{feature_cloud.__version__}-")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    dist_info = f"feature_cloud-{feature_cloud.__version__}.dist-info"
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
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
    # every subpackage of the source tree is in the wheel (feature_cloud.evaluate was missing)
    packages = {
        os.path.relpath(os.path.dirname(p), ROOT).replace(os.sep, "/")
        for p in glob.glob(os.path.join(ROOT, "feature_cloud", "**", "__init__.py"), recursive=True)
    }
    assert "feature_cloud/evaluate" in packages
    for package in packages:
        assert package + "/__init__.py" in names, package
    # the installed wheel, away from the source tree, runs the command line tool
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    for command in ("evaluate", "report", "demo"):
        proc = subprocess.run(
            [sys.executable, "-m", "feature_cloud", command, "--help"],
            cwd=str(tmp_path),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (command, proc.stderr[-3000:])
        assert f"usage: feature-cloud {command}" in proc.stdout
    # the package and its adapters import from the installed wheel (none from the checkout)
    missing = [
        m
        for m in ("pytorch_metric_learning", "timm", "fastreid")
        if importlib.util.find_spec(m) is None
    ]
    if missing:  # a packager's environment without every extra (make test installs them all)
        pytest.skip(f"the wheel's contents check out; the adapters need {', '.join(missing)}")
    code = (
        "import os, feature_cloud, feature_cloud.evaluate\n"
        "import feature_cloud.integrations.pml as p, feature_cloud.integrations.timm as t\n"
        "import feature_cloud.integrations.fastreid as f, feature_cloud.integrations.fastreid_ftl\n"
        "assert os.path.isfile(f.config_path('Market1501/leap_R50.yml'))\n"
        "for m in (feature_cloud, feature_cloud.evaluate, p, t, f):\n"
        "    print(m.__file__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = proc.stdout.split()
    assert len(files) == 5 and all(f.startswith(str(target)) for f in files), files


_BLOCKED_IMPORT = """
import sys
sys.modules[{framework!r}] = None  # as if it were not installed
try:
    import feature_cloud.integrations.{adapter}
except ModuleNotFoundError as e:  # what `except ModuleNotFoundError` in a user's code catches
    print(e)
    print("missing module:", e.name)
"""


@pytest.mark.parametrize(
    "adapter, framework, install",
    [
        ("pml", "pytorch_metric_learning", "pip install 'feature-cloud[pml]'"),
        ("timm", "timm", "pip install 'feature-cloud[timm]'"),
        ("fastreid", "fastreid", "pip install --no-deps fastreid==1.4.0"),
        ("fastreid_ftl", "fastreid", "pip install --no-deps fastreid==1.4.0"),
    ],
)
def test_an_adapter_without_its_framework_says_what_to_install(adapter, framework, install):
    """Importing an adapter whose framework is not installed raises an ``ImportError`` that
    names the adapter, the package and the ``pip install`` (fresh process: nothing imported)."""
    code = _BLOCKED_IMPORT.format(framework=framework, adapter=adapter)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    wanted = "fastreid" if adapter.startswith("fastreid") else adapter
    assert f"feature_cloud.integrations.{wanted} needs" in proc.stdout, proc.stdout
    assert install in proc.stdout, proc.stdout
    assert f"missing module: {framework}" in proc.stdout, proc.stdout


def test_the_integrations_folder_does_not_import_under_a_second_name():
    """From a source checkout ``import integrations`` would load the adapters a second time
    (user trial: two LEAPLoss classes, fastreid's registry refusing LEAPHead): it says which
    name to use instead."""
    proc = subprocess.run(
        [sys.executable, "-c", "import integrations.pml"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "import the adapters as feature_cloud.integrations" in proc.stderr, proc.stderr
