"""The package's annotations as a user's type checker sees them (``py.typed``): correct user
code passes ``mypy --strict`` without casts (user trial: ``head.forward(x, y)`` typed a union
of a tensor and a pair, ``margin_type=ArcFace()`` and NumPy class counts were rejected,
``synchronize`` lost the head's type)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import List, Tuple

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


def _package_path(tmp_path: Path) -> Path:
    """A folder holding ``feature_cloud`` as the wheel lays it out: the package's files and
    ``integrations/`` as ``feature_cloud.integrations`` (pyproject's ``package-dir``), as
    symlinks to the checkout, so that the checker sees the adapters as a user's install does."""
    site = tmp_path / "site"
    package = site / "feature_cloud"
    if package.exists():
        return site
    package.mkdir(parents=True)
    for entry in (ROOT / "feature_cloud").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "integrations").symlink_to(ROOT / "integrations")
    return site


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for this file's checks: torch's stubs are read once (about a minute),
    not once per check."""
    return tmp_path_factory.mktemp("mypy_cache")


def _mypy(tmp_path: Path, code: str, cache: Path) -> Tuple[int, str]:
    """``mypy --strict`` on ``code`` as a user's module against the package (its own
    strictness is the repo's mypy run), with the module's shared ``cache``."""
    pytest.importorskip("mypy")
    (tmp_path / "user.py").write_text(code)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--follow-imports=silent",
            "--cache-dir",
            str(cache),
            "--config-file",
            os.devnull,
            "user.py",
        ],
        cwd=tmp_path,
        env=dict(os.environ, MYPYPATH=str(_package_path(tmp_path))),
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc.returncode, proc.stdout + proc.stderr


def _revealed(out: str) -> List[str]:
    """The revealed types (``builtins.`` left out: mypy versions differ in writing it)."""
    return [
        line.split("Revealed type is ")[1].replace("builtins.", "")
        for line in out.splitlines()
        if "Revealed" in line
    ]


def test_user_code_type_checks_strictly_against_the_package(
    tmp_path: Path, mypy_cache: Path
) -> None:
    rc, out = _mypy(tmp_path, USER_CODE, mypy_cache)
    assert rc == 0, out
    revealed = [
        line.split("Revealed type is ")[1] for line in out.splitlines() if "Revealed" in line
    ]
    assert revealed == [
        '"torch._tensor.Tensor"',
        '"tuple[torch._tensor.Tensor, torch._tensor.Tensor]"',
    ], out


# Typing trial s55: calling any module but the head, and reading any setting, was ``Any``; the
# head's typed call reached mypy only (pyright / Pylance kept nn.Module's ``Callable[..., Any]``).
CALLS_AND_SETTINGS = """
from typing import Optional, Tuple

import torch
from torch import Tensor

from feature_cloud import FeatureTransfer, FTLModel, LEAPMarginHead, MetricL2

head = LEAPMarginHead(8, 4, class_counts=[5, 5, 5, 5])
x, y = torch.randn(2, 8), torch.tensor([0, 1])
reg = MetricL2(0.1)
model = FTLModel(torch.nn.Linear(3, 8), head, feature_dim=8, alpha_recon=0.0)
ft = FeatureTransfer(8, 4)


def reg_term(f: Tensor) -> Tensor:
    return reg(f, head)  # was: Returning Any from function declared to return "Tensor"


def embed(z: Tensor) -> Tensor:
    return model(z)


def transferred(g: Tensor, yr: Tensor, yt: Tensor) -> Tensor:
    return ft(g, yr, yt)


pair: Tuple[Tensor, Tensor] = head(x, y, return_top1=True)
scale: float = head.scale
margin: float = head.margin
reduction: str = head.reduction
impl: str = head.impl
chunk: Optional[int] = head.chunk_size
shrinkage: Optional[float] = head.prototype_shrinkage
warmup: int = head.warmup_steps
head.scale = 30.0
head.cloud_scale = 1.5
reveal_type(head.scale)
reveal_type(head.prototype_shrinkage)
reveal_type(head.reduction)
reveal_type(head.warmup_steps)
reveal_type(head.class_counts)
reveal_type(head.feature_cloud.statistics.tail_threshold)
reveal_type(reg(x, head))
reveal_type(model(torch.randn(2, 3)))

# the cloud options as keywords of the heads (CloudOptions / ShardedCloudOptions), a dict of
# them, and PAPER_LEAP (a plain dict) type-check
import numpy as np  # noqa: E402

from feature_cloud import PAPER_LEAP  # noqa: E402
from feature_cloud.cloud import CloudOptions  # noqa: E402
from feature_cloud.distributed import ShardedLEAPMarginHead  # noqa: E402

opts: CloudOptions = {"warmup_steps": 10, "class_counts": [5, 5, 1, 1], "sync": "off"}
h1 = LEAPMarginHead(8, 4, **opts)
h2 = LEAPMarginHead(8, 4, "arcface", 64.0, 0.5, "vanilla", tail_threshold=3, **PAPER_LEAP)
h3 = LEAPMarginHead(8, 4, prototype_shrinkage=None, seed=3, class_counts=np.ones(4))
h4 = ShardedLEAPMarginHead(8, 4, warmup_steps=10, process_group=None, pad_to=8, gamma=0.2)
"""

WRONG = """
import torch
from torch import Tensor

from feature_cloud import FTLModel, LEAPMarginHead, MetricL2
from feature_cloud.distributed import ShardedLEAPMarginHead
head = LEAPMarginHead(8, 4, class_counts=[5, 5, 5, 5])
x, y = torch.randn(2, 8), torch.tensor([0, 1])
model = FTLModel(torch.nn.Linear(3, 8), head, feature_dim=8, alpha_recon=0.0)
wrong_call: str = MetricL2()(x, head)  # line 10
wrong_model: str = model(x)  # line 11
wrong_setting: str = head.scale  # line 12
head.scale = "64"  # line 13
head.reduction = 2  # line 14
wrong_pair: Tensor = head(x, y, return_top1=True)  # line 15
misspelt = LEAPMarginHead(8, 4, warmup_step=10)  # line 16: the cloud options are typed
wrong_option = LEAPMarginHead(8, 4, gamma="0.1")  # line 17
wrong_sharded = ShardedLEAPMarginHead(8, 4, imprint_step="3")  # line 18
"""


def test_module_calls_and_settings_are_typed(tmp_path: Path, mypy_cache: Path) -> None:
    rc, out = _mypy(tmp_path, CALLS_AND_SETTINGS, mypy_cache)
    assert rc == 0, out
    assert _revealed(out) == [
        '"float"',
        '"float | None"',
        '"str"',
        '"int"',
        '"torch._tensor.Tensor"',
        '"int"',
        '"torch._tensor.Tensor"',
        '"torch._tensor.Tensor"',
    ], out
    rc, out = _mypy(tmp_path, WRONG, mypy_cache)
    lines = sorted(
        {int(line.split(":")[1]) for line in out.splitlines() if line.startswith("user.py:")}
    )
    assert rc == 1 and lines == [10, 11, 12, 13, 14, 15, 16, 17, 18], out


#: README "FTL: Usage", reduced: ``loaders()`` is typed as the stage-0/2 loader or the stage-1
#: pair (the stage is known at run time only); ``isinstance`` narrows it (typing trial s55: the
#: README's ``if stage == 1`` gave ``batches[0]`` on a ``DataLoader``, an error in mypy and pyright)
README_FTL_LOOP = """
import torch
from torch import nn
from torch.utils.data import TensorDataset

from feature_cloud import AlternatingScheduler, FeatureTransfer, FTLModel
from feature_cloud.ftl import IndexedDataset

x, y = torch.randn(60, 12), torch.arange(60) % 6
dataset = IndexedDataset(TensorDataset(x, y))
model = FTLModel(
    nn.Linear(12, 8), nn.Linear(8, 6, bias=False), feature_dim=8, alpha_recon=0.0,
    transfer=FeatureTransfer(8, 6, tail_threshold=20),
)
sched = AlternatingScheduler(model, stage0_iters=2, stage_iters=2, max_alternations=1)
stage = sched.stage
loaders = sched.loaders(dataset, batch_size=16)
for batches in zip(*loaders) if isinstance(loaders, tuple) else loaders:
    if stage == 1:
        out = sched.stage1_loss(*batches)
    else:
        out = model.loss(batches[0], batches[1])
"""


def test_the_readme_ftl_loop_type_checks(tmp_path: Path, mypy_cache: Path) -> None:
    rc, out = _mypy(tmp_path, README_FTL_LOOP, mypy_cache)
    assert rc == 0, out
    readme = (ROOT / "README.md").read_text()
    assert "for batches in zip(*loaders) if isinstance(loaders, tuple) else loaders:" in readme


ADAPTERS = """
from typing import Dict

import torch
from torch import Tensor

from feature_cloud.integrations.pml import LEAPLoss
from feature_cloud.integrations.timm import FTLTask, LEAPTask

loss_func = LEAPLoss(4, 8, class_counts=[5, 5, 5, 5])
emb, labels = torch.randn(2, 8), torch.tensor([0, 1])
value: Tensor = loss_func(emb, labels)
margin: float = loss_func.margin
task = LEAPTask.from_timm("test_resnet", 4, class_counts=[5, 5, 5, 5])
x = torch.randn(2, 3, 32, 32)
out: Dict[str, Tensor] = task(x, labels)
params = list(task.get_trainable_module().parameters())  # README / examples/timm_train.py
served: Tensor = task.get_eval_model()(x)
ema = task.get_eval_model(ema=True)
reveal_type(ema)
reveal_type(task.head(emb, labels))
ftl = FTLTask.from_timm("test_resnet", 4, stage0_iters=1, class_counts=[5, 5, 5, 5])
result: Dict[str, Tensor] = ftl(x, labels)
f: Tensor = ftl.get_eval_model()(x)
from feature_cloud import PAPER_LEAP  # noqa: E402

typed = LEAPLoss(4, 8, reducer=None, weight_reg_weight=0.5, warmup_steps=2, **PAPER_LEAP)
"""

#: LEAPLoss's ``**kwargs`` (PML's and the cloud's keywords, ``LEAPLossOptions``) are typed
ADAPTERS_WRONG = """
from feature_cloud.integrations.pml import LEAPLoss

misspelt = LEAPLoss(4, 8, warmup_step=3)  # line 4
wrong = LEAPLoss(4, 8, embedding_reg_weight="1")  # line 5
from feature_cloud.integrations.timm import FTLTask, LEAPTask, create_ftl_model  # noqa: E402

task = LEAPTask.from_timm("test_resnet", 4, warmup_step=3)  # line 8
model = create_ftl_model("test_resnet", 4, scale="30")  # line 9
ftl = FTLTask.from_timm("test_resnet", 4, stage0_iters=1, seed=3, filter="residual")
"""


def test_adapter_calls_are_typed(tmp_path: Path, mypy_cache: Path) -> None:
    """The README's / examples' timm calls (``get_trainable_module().parameters()``,
    ``get_eval_model()(x)``) were rejected (``Module | None``); adapter calls were ``Any``."""
    pytest.importorskip("timm")
    pytest.importorskip("pytorch_metric_learning")
    rc, out = _mypy(tmp_path, ADAPTERS, mypy_cache)
    assert rc == 0, out
    assert _revealed(out) == [
        '"torch.nn.modules.module.Module | None"',
        '"torch._tensor.Tensor"',
    ], out
    rc, out = _mypy(tmp_path, ADAPTERS_WRONG, mypy_cache)
    lines = sorted(
        {int(line.split(":")[1]) for line in out.splitlines() if line.startswith("user.py:")}
    )
    assert rc == 1 and lines == [4, 5, 8, 9], out
    assert out.count('did you mean "warmup_steps"') == 2, out


def test_pml_loss_options_are_pmls_keywords_and_the_clouds() -> None:
    """``LEAPLossOptions`` types exactly the keywords ``LEAPLoss`` hands to PML's base classes
    and every cloud option, so neither list can drift from the other."""
    pytest.importorskip("pytorch_metric_learning")
    from feature_cloud.cloud import CloudOptions
    from feature_cloud.integrations.pml import LEAPLoss, LEAPLossOptions

    pml = set(LEAPLossOptions.__optional_keys__) - set(CloudOptions.__optional_keys__)
    assert pml == set(LEAPLoss._PML_KWARGS)
    assert set(CloudOptions.__optional_keys__) <= set(LEAPLossOptions.__optional_keys__)


def test_head_and_timm_options_are_the_keywords_they_pass_on() -> None:
    """``HeadOptions`` is every keyword of ``LEAPMarginHead`` but its sizes, with the
    annotations of its signature; timm's ``TimmHeadOptions`` adds the refused-unless-equal
    ``embedding_size``. None of them names a keyword of the function it types (mypy reads such
    an overlap as an error in the definition and the keywords as ``Any``)."""
    import inspect

    from feature_cloud.cloud import CloudOptions
    from feature_cloud.heads import HeadOptions, LEAPMarginHead

    hints = typing.get_type_hints(LEAPMarginHead.__init__)
    own = inspect.signature(LEAPMarginHead.__init__).parameters.values()
    named = {p.name for p in own if p.kind is not inspect.Parameter.VAR_KEYWORD}
    named -= {"self", "embedding_size", "num_classes"}
    declared = typing.get_type_hints(HeadOptions)
    assert set(HeadOptions.__optional_keys__) == named | set(CloudOptions.__optional_keys__)
    for k in named:  # Python < 3.11 reads a None default as Optional[hint]
        assert declared[k] == hints[k] or typing.Optional[declared[k]] == hints[k], k
    pytest.importorskip("timm")
    pytest.importorskip("pytorch_metric_learning")
    from feature_cloud.integrations import pml, timm
    from feature_cloud.integrations.timm import TimmHeadOptions

    assert set(TimmHeadOptions.__optional_keys__) == {"embedding_size"} | named | set(
        CloudOptions.__optional_keys__
    )
    from feature_cloud.cloud import ShardedCloudOptions
    from feature_cloud.distributed import ShardedLEAPMarginHead

    for function, options in (
        (LEAPMarginHead.__init__, CloudOptions),
        (ShardedLEAPMarginHead.__init__, ShardedCloudOptions),
        (pml.LEAPLoss.__init__, pml.LEAPLossOptions),
        (timm.create_backbone_and_head, TimmHeadOptions),
        (timm.LEAPTask.from_timm, TimmHeadOptions),
        (timm.create_ftl_model, HeadOptions),
    ):
        params = set(inspect.signature(function).parameters)
        assert not params & set(options.__optional_keys__), (function, options)


PYRIGHT_CONFIG = """{
  "typeCheckingMode": "strict", "reportMissingTypeStubs": false,
  "reportUnknownMemberType": false, "reportUnknownVariableType": false,
  "reportUnknownArgumentType": false, "reportUnknownParameterType": false,
  "reportUnknownLambdaType": false
}"""


def test_calls_and_settings_are_typed_for_pyright(tmp_path: Path) -> None:
    """pyright (Pylance) read ``head(x, y)`` as ``Any`` (it keeps nn.Module's declared
    ``__call__`` over an assignment ``__call__ = forward``). Optional: runs where ``pyright``
    is on the PATH (it is no dependency of the package)."""
    pyright = shutil.which("pyright")
    if pyright is None:
        pytest.skip("pyright is not installed")
    code = CALLS_AND_SETTINGS + "reveal_type(head(x, y))\n"
    (tmp_path / "user.py").write_text(code)
    (tmp_path / "wrong.py").write_text(WRONG)
    (tmp_path / "pyrightconfig.json").write_text(PYRIGHT_CONFIG)
    site = _package_path(tmp_path)
    proc = subprocess.run(
        [pyright, "--pythonpath", sys.executable, "user.py", "wrong.py"],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(site)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    revealed = [
        line.split('Type of "')[1].split('" is ')[1].strip('"')
        for line in out.splitlines()
        if "user.py" in line and "Type of" in line
    ]
    assert revealed == [
        "float",
        "float | None",
        "str",
        "int",
        "Tensor",
        "int",
        "Tensor",
        "Tensor",
        "Tensor",
    ], out
    errors = sorted(
        {
            int(line.split("wrong.py:")[1].split(":")[0])
            for line in out.splitlines()
            if "wrong.py:" in line and "- error" in line
        }
    )
    assert errors == [10, 11, 12, 13, 14, 15], out


def test_cloud_options_type_every_keyword_of_the_feature_cloud() -> None:
    """``CloudOptions`` (the heads' ``**cloud_options``) names each keyword of
    ``FeatureCloud.__init__`` with its annotation, so a new option cannot be left untyped;
    ``ShardedCloudOptions`` leaves out the two the sharded head takes as its own."""
    import inspect

    from feature_cloud.cloud import CloudOptions, FeatureCloud, ShardedCloudOptions
    from feature_cloud.distributed import ShardedLEAPMarginHead

    params = inspect.signature(FeatureCloud.__init__).parameters.values()
    hints = typing.get_type_hints(FeatureCloud.__init__)
    options = {p.name: hints[p.name] for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    declared = typing.get_type_hints(CloudOptions)
    assert (
        set(CloudOptions.__optional_keys__) == set(options) and not CloudOptions.__required_keys__
    )
    for name, hint in options.items():  # Python < 3.11 reads a None default as Optional[hint]
        assert declared[name] in (hint, typing.Optional[hint]) or (
            typing.Optional[declared[name]] == hint
        ), (name, declared[name], hint)
    own = set(inspect.signature(ShardedLEAPMarginHead.__init__).parameters)
    assert set(ShardedCloudOptions.__optional_keys__) == set(options) - own
    assert own & set(options) == {"process_group", "pad_to"}
