"""Whole-module pickles (``torch.save(module)``) written by an earlier commit's code, for
``tests/integrations/test_old_pickles.py``, which loads them with this checkout's code.

How the fixtures ``tests/data/pickles_<commit>.pt.gz`` were made (from the repository root)::

    git worktree add --detach /tmp/wt_old_<commit> <commit>
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/wt_old_<commit> \\
        python tests/data/make_pickle_fixtures.py <commit> tests/data/pickles_<commit>.pt.gz
    git worktree remove /tmp/wt_old_<commit>

for the commits 5cd394c (the head of 0.1.0: statistics and generator on the head), 271091d
(FTL, the adapters; generator state) and 44b6d06 (FeatureCloud, counter-based noise). Whatever
``PYTHONPATH`` names is the code that pickles (the script checks that it did not import this
checkout); a module that commit lacks, or cannot pickle, is left out with the reason.

The file (gzip of a ``torch.save`` of plain data: ``weights_only=True`` reads it) holds the inputs
and, per module, its pickle as bytes, the protocol that runs it (``kind``) and what the old code
computed on the pickled module right after pickling it: its eval-mode output and one
training-mode loss with its gradient. The cloud is in its warm-up (``warmup_steps=50``; the
modules took two steps before pickling): the loss is the plain margin loss, which every release
computes alike (the cloud's random draws changed between releases, the margin loss did not).
"""

from __future__ import annotations

import gzip
import io
import os
import sys
import traceback
from typing import Any, Callable, Dict, Tuple

import torch
from torch import Tensor, nn

torch.set_num_threads(1)

D, C, IN = 8, 5, 6
COUNTS = [3, 1, 2, 4, 1]
CLOUD = dict(cloud="full", class_counts=COUNTS, warmup_steps=50, seed=11)
IMAGE = (3, 8, 8)


def inputs() -> Dict[str, Tensor]:
    """The fixed inputs (saved in the fixture as well)."""
    g = torch.Generator().manual_seed(2026)
    return {
        "f": torch.randn(6, D, generator=g),  # embeddings for heads and losses
        "x": torch.randn(6, IN, generator=g),  # FTL's encoder input
        "img": torch.randn(6, *IMAGE, generator=g),  # the timm backbone's images
        "fmap": torch.randn(6, D, 1, 1, generator=g),  # fastreid's backbone feature maps
        "y": torch.tensor([0, 1, 2, 3, 4, 0]),
    }


# ------------------------------------------------------------------ the protocols (kind -> run)
# Each returns (eval output, training loss, the gradient of the classifier weight); the test
# runs the same functions (it imports this file) on the unpickled module.
def _weight(module: nn.Module) -> Tensor:
    for name in ("weight", "W", "margin_head.weight", "head.weight", "classifier.weight"):
        try:
            return module.get_parameter(name)
        except AttributeError:
            continue
    raise AttributeError(f"{type(module).__name__} has no classifier weight")


def _grad(module: nn.Module, loss: Tensor) -> Tensor:
    weight = _weight(module)
    return torch.autograd.grad(loss, weight)[0]


def run_head(m: Any, t: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Eval logits (the head's ``logits``, PML's ``get_logits``), then one training loss."""
    m.eval()
    with torch.no_grad():
        out = (m.get_logits if hasattr(m, "get_logits") else m.logits)(t["f"])
    m.train()
    loss = m(t["f"], t["y"])
    return out, loss.detach(), _grad(m, loss)


def run_ftl(m: Any, t: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    m.eval()
    with torch.no_grad():
        out = m.logits(m(t["x"]))
    m.train()
    loss = m.loss(t["x"], t["y"])["loss"]
    return out, loss.detach(), _grad(m, loss)


def run_scheduler(s: Any, t: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    out, loss, grad = run_ftl(s.model, t)
    stages = [s.stage]
    for _ in range(2):  # stage 0 has stage0_iters=4 iterations, two taken before pickling
        s.step()
        stages.append(s.stage)
    return torch.cat([out.flatten(), torch.tensor(stages, dtype=out.dtype)]), loss, grad


def run_timm(m: Any, t: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    m.eval()
    with torch.no_grad():
        out = m(t["img"])
    m.train()
    loss = m(t["img"], t["y"])[0]
    return out, loss.detach(), _grad(m, loss)


def run_fastreid(m: Any, t: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    m.eval()
    with torch.no_grad():
        out = m(t["fmap"])
    m.train()
    loss = nn.functional.cross_entropy(m(t["fmap"], t["y"])["cls_outputs"], t["y"])
    return out, loss.detach(), _grad(m, loss)


RUN: Dict[str, Callable[[Any, Dict[str, Tensor]], Tuple[Tensor, Tensor, Tensor]]] = {
    "head": run_head,
    "pml": run_head,
    "ftl": run_ftl,
    "scheduler": run_scheduler,
    "timm": run_timm,
    "fastreid": run_fastreid,
}


# ------------------------------------------------------------------ the modules (old code)
def _head() -> nn.Module:
    from feature_cloud import LEAPMarginHead

    return LEAPMarginHead(D, C, **CLOUD)


def _pml() -> nn.Module:
    from feature_cloud.integrations.pml import LEAPLoss

    return LEAPLoss(C, D, **CLOUD)


def _ftl_model() -> nn.Module:
    from feature_cloud import FTLModel, LEAPMarginHead
    from feature_cloud.transfer import FeatureTransfer

    return FTLModel(
        nn.Linear(IN, D),
        LEAPMarginHead(D, C, **CLOUD),
        feature_dim=D,
        filter_net=nn.Linear(D, D),
        alpha_recon=0.0,
        alpha_reg=0.0,
        transfer=FeatureTransfer(D, C, class_counts=COUNTS, tail_threshold=2),
    )


def _scheduler() -> Any:
    from feature_cloud.ftl import AlternatingScheduler

    return AlternatingScheduler(_ftl_model(), stage0_iters=4, stage_iters=2, seed=5)


def _timm() -> nn.Module:
    from feature_cloud import LEAPMarginHead
    from feature_cloud.integrations.timm import LEAPTrainableModule

    # a convolution, BatchNorm and pooling: a timm ResNet's pickle (timm's own classes, which
    # these commits did not change) is ten times the size of the adapter's part
    backbone = nn.Sequential(
        nn.Conv2d(3, D, 3), nn.BatchNorm2d(D), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    )
    return LEAPTrainableModule(backbone, LEAPMarginHead(D, C, **CLOUD))


def _fastreid() -> nn.Module:
    from feature_cloud.integrations.fastreid import LEAPHead

    return LEAPHead(
        feat_dim=D,
        embedding_dim=0,
        num_classes=C,
        neck_feat="before",
        pool_type="GlobalAvgPool",
        margin_type="cosface",
        scale=24.0,
        margin=0.2,
        with_bnneck=False,
        norm_type="BN",
        **CLOUD,
    )


BUILD: Dict[str, Tuple[str, Callable[[], Any]]] = {
    "head": ("head", _head),
    "pml": ("pml", _pml),
    "ftl": ("ftl", _ftl_model),
    "scheduler": ("scheduler", _scheduler),
    "timm": ("timm", _timm),
    "fastreid": ("fastreid", _fastreid),
}


def _warm(kind: str, obj: Any, t: Dict[str, Tensor]) -> None:
    """Two training steps before pickling: class statistics, step counter and weights moved."""
    model = obj.model if kind == "scheduler" else obj
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model.train()
        if kind in ("ftl", "scheduler"):
            loss = model.loss(t["x"], t["y"])["loss"]
        elif kind == "timm":
            loss = model(t["img"], t["y"])[0]
        elif kind == "fastreid":
            loss = nn.functional.cross_entropy(model(t["fmap"], t["y"])["cls_outputs"], t["y"])
        else:
            loss = model(t["f"], t["y"])
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    if kind == "scheduler":
        obj.step()
        obj.step()


def make(commit: str) -> Dict[str, Any]:
    import feature_cloud

    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.dirname(os.path.dirname(os.path.abspath(feature_cloud.__file__))) == here:
        raise SystemExit("this imported the checkout's own feature_cloud: set PYTHONPATH")
    t = inputs()
    fixture: Dict[str, Any] = {"commit": commit, "torch": str(torch.__version__), "inputs": t}
    modules: Dict[str, Any] = {}
    for name, (kind, build) in BUILD.items():
        torch.manual_seed(0)
        try:
            obj = build()
            _warm(kind, obj, t)
            buf = io.BytesIO()
            torch.save(obj, buf)
            out, loss, grad = RUN[kind](obj, t)
        except Exception as err:  # this commit lacks it, or cannot pickle it
            modules[name] = {"left_out": f"{type(err).__name__}: {err}"}
            traceback.print_exc()
            continue
        modules[name] = {
            "kind": kind,
            "pickle": torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8),
            "eval": out,
            "loss": loss,
            "grad": grad,
        }
        print(f"{commit} {name}: {len(buf.getvalue())} bytes pickled", file=sys.stderr)
    fixture["modules"] = modules
    return fixture


if __name__ == "__main__":
    commit, path = sys.argv[1], sys.argv[2]
    buf = io.BytesIO()
    torch.save(make(commit), buf)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))
    print(f"wrote {path}: {os.path.getsize(path)} bytes", file=sys.stderr)
