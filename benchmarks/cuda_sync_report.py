"""Where a training step waits for the GPU: CUDA's sync debug mode on one step of each case,
with the Python stack of every synchronising call (the package's and the adapters' frames).

    python -m benchmarks.cuda_sync_report

Cases: the core head (``fused``, ``chunked``, ``reference``; ``validate=False`` and the default
``validate=True``, which documents one sync), ``MetricL2``, ``FeatureTransfer.transfer``, the PML
``LEAPLoss`` and the fastreid ``LEAPHead`` with its meta-architecture's loss.
"""

from __future__ import annotations

import argparse
import traceback
import warnings
from typing import Callable, Dict, List

import torch

from benchmarks.cases import make_case


def _stacks(step: Callable[[], object]) -> List[str]:
    """The package frames of each synchronising call that one ``step()`` makes."""
    found: List[str] = []

    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frames = [
            f"{f.filename.split('/')[-2]}/{f.filename.split('/')[-1]}:{f.lineno} {f.name}"
            for f in traceback.extract_stack()[:-1]
            if ("feature_cloud" in f.filename or "integrations" in f.filename)
            and "benchmarks" not in f.filename
        ]
        found.append(" <- ".join(reversed(frames[-4:])) or "(outside the package)")

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    old = warnings.showwarning
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            step()
    finally:
        warnings.showwarning = old
        torch.cuda.set_sync_debug_mode("default")
    return found


def _report(name: str, found: List[str]) -> None:
    print(f"{name:24s} {len(found)} sync(s)")
    for where in sorted(set(found)):
        print(f"    {found.count(where)} x {where}")


def _transfer_step() -> Callable[[], object]:
    from feature_cloud import FeatureTransfer

    g = torch.randn(400, 16, generator=torch.Generator().manual_seed(4))
    y = torch.cat([torch.arange(10).repeat_interleave(36), torch.arange(10, 30).repeat(2)])
    ft = FeatureTransfer(16, 30, num_components=4, class_counts=torch.bincount(y), validate=False)
    ft = ft.cuda()
    ft.update_stats([(g.cuda(), y.cuda())])
    reg, tail = torch.arange(10).repeat(8).cuda(), (torch.arange(80) % 20 + 10).cuda()
    feats = g[:80].cuda().requires_grad_(True)
    return lambda: ft.transfer(feats, reg, tail).sum().backward()


def _metric_l2_step() -> Callable[[], object]:
    from feature_cloud import MetricL2

    x = torch.randn(256, 512, device="cuda", requires_grad=True)
    W = torch.randn(1000, 512, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (256,), device="cuda")
    reg = MetricL2(0.25)
    return lambda: reg(x, W, y).backward()


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_sync_report: needs a CUDA device (CUDA's sync debug mode)")
    cases: Dict[str, Callable[[], object]] = {}
    for meth in ("leap", "leap_cloud", "leap_cloud_margin", "leap_chunked", "leap_cloud_chunked"):
        cases[meth] = make_case(meth, 256, 20000, 512, scale=64.0, margin=0.35, device="cuda")
    cases["leap_cloud_reference"] = make_case(
        "leap_cloud_reference", 256, 20000, 512, scale=64.0, margin=0.35, device="cuda"
    )
    for meth in ("pml_leap_cloud", "fastreid_leap_cloud"):
        try:
            cases[meth] = make_case(meth, 256, 20000, 512, scale=64.0, margin=0.35, device="cuda")
        except ImportError as e:
            print(f"{meth}: skipped ({e})")
    cases["metric_l2"] = _metric_l2_step()
    cases["feature_transfer"] = _transfer_step()
    for name, step in cases.items():
        for _ in range(2):
            step()
        _report(name, _stacks(step))
    # the default validate=True: the documented one sync per step
    from feature_cloud import LEAPMarginHead

    head = LEAPMarginHead(
        512,
        20000,
        "cosface",
        scale=64.0,
        margin=0.35,
        cloud="full",
        class_counts=[50] * 5000 + [3] * 15000,
        seed=0,
    ).cuda()
    x = torch.randn(256, 512, device="cuda")
    y = torch.randint(0, 20000, (256,), device="cuda")
    for _ in range(2):
        head(x, y).backward()
    _report("leap_cloud validate=True", _stacks(lambda: head(x, y).backward()))


if __name__ == "__main__":
    main()
