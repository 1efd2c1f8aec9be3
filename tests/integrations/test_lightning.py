"""examples/lightning_train.py: a LEAPMarginHead in a LightningModule trains, checkpoints with
``ModelCheckpoint``, resumes with ``Trainer.fit(ckpt_path=...)`` in a fresh process exactly where
an uninterrupted run is (weights, statistics, step), and loads with ``load_from_checkpoint``."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("sklearn")
import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lightning_train.py"


def _run(out: Path, *args: str) -> str:
    """The example in a fresh process (one thread), as a user runs it."""
    cmd = [sys.executable, str(EXAMPLE), "--out", str(out), "--warmup-epochs", "1", *args]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(EXAMPLE.parents[1])}
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _example():
    spec = importlib.util.spec_from_file_location("lightning_train_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _state(out: Path) -> dict:
    return torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_lightning_resume_in_a_fresh_process_is_the_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "a", "--epochs", "3")
    _run(tmp_path / "b", "--epochs", "2")
    resumed = _run(tmp_path / "b", "--epochs", "3", "--resume")
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert set(a) == set(b)
    batches = -(-len(_example().long_tailed_digits(5, 0)["train"]) // _example().BATCH)
    assert int(a["head.feature_cloud.step"]) == 3 * batches  # the cloud on from the 2nd epoch
    stats = [k for k in a if k.startswith("head.feature_cloud.statistics.")]
    assert stats and any(bool(a[k].float().abs().sum()) for k in stats if a[k].is_floating_point())
    for key in a:  # every weight and statistic, bit for bit
        assert torch.equal(a[key], b[key]), key
    accuracies = [out.splitlines()[-1].split("(head step")[0] for out in (straight, resumed)]
    assert accuracies[0] == accuracies[1] and "tail accuracy" in accuracies[0]

    # load_from_checkpoint rebuilds the module from its hyper-parameters and loads it strictly
    module = _example()
    model = module.LEAPDigits.load_from_checkpoint(tmp_path / "b" / "last.ckpt").eval()
    assert model.head.step == 3 * batches
    x = torch.randn(5, 64)
    with torch.no_grad():
        logits = model.head.logits(model.backbone(x))
    fresh = module.LEAPDigits(**model.hparams)
    fresh.load_state_dict(a)
    with torch.no_grad():
        assert torch.equal(logits, fresh.eval().head.logits(fresh.backbone(x)))
