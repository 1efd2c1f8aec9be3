"""The package's annotations as a user's type checker sees them (``py.typed``): correct user
code passes ``mypy --strict`` without casts (user trial: ``head.forward(x, y)`` typed a union
of a tensor and a pair, ``margin_type=ArcFace()`` and NumPy class counts were rejected,
``synchronize`` lost the head's type)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_CODE = """
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from feature_cloud import FTLModel, LEAPMarginHead
from feature_cloud.distributed import synchronize
from feature_cloud.margins import ArcFace

counts = np.bincount(np.array([0, 1, 2, 3, 3]))
head = LEAPMarginHead(8, 4, margin_type=ArcFace(), class_counts=counts)
x, y = torch.randn(2, 8), torch.tensor([0, 1])
loss: Tensor = head.forward(x, y)
pair: Tuple[Tensor, Tensor] = head.forward(x, y, return_top1=True)
same: LEAPMarginHead = synchronize(head)
model = FTLModel(torch.nn.Linear(3, 8), head, feature_dim=8, alpha_recon=0.0)
weight: Tensor = model.classifier.weight.detach()
reveal_type(head(x, y))
reveal_type(head(x, y, return_top1=True))


class MyFC(torch.nn.Module):  # any module with a (C, D) weight is an FC (API review s50)
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 8))

    def forward(self, f: Tensor) -> Tensor:
        return f @ self.weight.t()


own = FTLModel(torch.nn.Linear(3, 8), MyFC(), feature_dim=8, alpha_recon=0.0)
flag: bool = bool(torch.rand(()) > 0.5)
either = head(x, y, return_top1=flag)  # a run-time flag: either
"""


def test_user_code_type_checks_strictly_against_the_package(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(USER_CODE)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",  # the package's own strictness is the repo's mypy run
            "--no-incremental",
            "--config-file",
            os.devnull,
            "user.py",
        ],
        cwd=tmp_path,
        env=dict(os.environ, MYPYPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    revealed = [
        line.split("Revealed type is ")[1] for line in out.splitlines() if "Revealed" in line
    ]
    assert revealed == [
        '"torch._tensor.Tensor"',
        '"tuple[torch._tensor.Tensor, torch._tensor.Tensor]"',
    ], out
