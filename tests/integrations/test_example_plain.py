"""Smoke test of examples/plain_pytorch.py (real digits data, a few epochs)."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("sklearn")


def test_plain_pytorch_example_runs_and_learns():
    path = Path(__file__).resolve().parents[2] / "examples" / "plain_pytorch.py"
    spec = importlib.util.spec_from_file_location("plain_pytorch_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--epochs", "4"])
    assert result["head_acc"] > 0.8  # 10 classes: chance is 0.1
    assert result["tail_acc"] > 0.2
