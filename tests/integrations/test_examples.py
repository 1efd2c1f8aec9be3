"""Smoke tests: every script in examples/ runs end to end (small settings, CPU, no download)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _python(args, timeout=240, cwd=ROOT):
    """``python *args`` in a fresh process, at the repository root unless ``cwd`` (one
    thread)."""
    env = dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _run(args, timeout=240, cwd=ROOT):
    proc = _python(args, timeout, cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return ast.literal_eval(last.replace("np.float32(", "(").replace("np.float64(", "("))


def test_pml_example():
    pytest.importorskip("pytorch_metric_learning")
    pytest.importorskip("faiss")  # PML's tester; without it the example says so (below)
    result = _run(["examples/pml_train.py", "--epochs", "1", "--classes", "12"])
    assert 0.0 <= result["precision_at_1_level0"] <= 1.0


def test_timm_example():
    pytest.importorskip("timm.task")
    result = _run(
        ["examples/timm_train.py", "--steps", "6", "--classes", "4", "--batch-size", "16"]
    )
    assert result["last_loss"] < result["first_loss"]
    assert result["checkpoint_keys"] == ["state_dict", "task_state"]


def test_fastreid_example(tmp_path):
    pytest.importorskip("fastreid")
    result = _run(
        [
            os.path.join(ROOT, "examples", "fastreid_train.py"),
            "--synthetic",
            str(tmp_path / "data"),
            "--tiny",
            "INPUT.SIZE_TRAIN",
            "[32, 16]",
            "INPUT.SIZE_TEST",
            "[32, 16]",
            "SOLVER.MAX_EPOCH",
            "1",
            "TEST.EVAL_PERIOD",
            "1",
        ],
        cwd=tmp_path,
    )
    assert set(result) >= {"Rank-1", "mAP"}
    # a smoke run writes under outputs/ (user trial: 257 MB in ./logs/market1501/leap_R50, the
    # real-data run's OUTPUT_DIR, where its --resume looks)
    assert os.path.isfile(tmp_path / "outputs" / "fastreid_tiny" / "leap_R50" / "model_final.pth")
    assert not os.path.exists(tmp_path / "logs")


def test_pml_example_without_faiss_names_it_before_training():
    """Without faiss (PML's tester needs it; the ``pml`` extra does not install it) the example
    stops at once with the pip command instead of PML's NameError after training."""
    pytest.importorskip("pytorch_metric_learning")
    hide = (
        "import runpy, sys; sys.modules['faiss'] = None; sys.argv = [sys.argv[1], '--epochs', '1'];"
        " runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    proc = _python(["-c", hide, "examples/pml_train.py"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "needs faiss: pip install faiss-cpu" in proc.stderr and "Traceback" not in proc.stderr
