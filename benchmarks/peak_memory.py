"""Peak resident memory of one fwd+bwd step, each configuration in its own process.

    python -m benchmarks.peak_memory --classes 1000000 --batch 256 --dim 512 --out mem.json

The parent starts one child per configuration (``--child``). A child optionally caps its address
space (``--cap-gib``, ``RLIMIT_AS``) so that a path that would not fit fails with an
out-of-memory error instead of pushing a shared machine into the OOM killer, allocates ``W``
(``C x D`` float32, touched), records its resident set, runs one step and reads the peak
resident set (``getrusage``). "Extra" is the peak minus the resident set before the step minus
``grad W``: the memory the loss itself needs beyond ``W`` and its gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List

CONFIGS = {
    # name: (impl, cloud)
    "chunked": ("chunked", False),
    "chunked_cloud": ("chunked", True),
    "fused": ("fused", False),
    "fused_cloud": ("fused", True),
    "reference": ("reference", False),
    "floor": ("floor", False),
    "pml": ("pml", False),  # pytorch-metric-learning CosFaceLoss
    "pml_leap": ("pml_leap", False),  # the PML adapter LEAPLoss (cloud off)
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(a: argparse.Namespace) -> Dict:
    if a.cap_gib:
        cap = int(a.cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch
    import torch.nn.functional as F

    from feature_cloud import functional as FC
    from feature_cloud import fused

    if a.threads:
        torch.set_num_threads(a.threads)
    impl, cloud = CONFIGS[a.config]
    g = torch.Generator().manual_seed(0)
    W = torch.empty(a.classes, a.dim)
    W.normal_(generator=g)
    W.requires_grad_(True)
    x = torch.randn(a.batch, a.dim, generator=g, requires_grad=True)
    y = torch.randint(0, a.classes, (a.batch,), generator=g)
    std = torch.full((a.batch,), 0.2) if cloud else None
    mod = None
    if impl in ("pml", "pml_leap"):  # built before the baseline RSS; W (D, C) is a view of ours
        if impl == "pml":
            from pytorch_metric_learning.losses import CosFaceLoss

            mod = CosFaceLoss(num_classes=a.classes, embedding_size=a.dim, margin=0.2, scale=24.0)
        else:
            from feature_cloud.integrations.pml import LEAPLoss

            mod = LEAPLoss(a.classes, a.dim, margin=0.2, scale=24.0, cloud=None, validate=False)
        mod.W = torch.nn.Parameter(W.detach().t())  # shares W's memory: no second copy
        W = mod.W
    base = _rss_bytes()
    t0 = time.perf_counter()
    status = "ok"
    try:
        if impl == "floor":
            loss = F.cross_entropy(F.linear(F.normalize(x), F.normalize(W)) * 24.0, y)
        elif impl == "reference":
            loss = FC.margin_cross_entropy(FC.margin_logits(FC.cosine_logits(x, W), y), y)
        elif mod is not None:
            loss = mod(x, y)
        else:
            loss = fused.margin_loss(
                x,
                W,
                y,
                scale=24.0,
                margin=0.2,
                noise_std=std,
                generator=torch.Generator().manual_seed(1),
                chunk_size=a.chunk_size if impl == "chunked" else None,
            )
        loss.backward()
        value = float(loss)
    except (MemoryError, RuntimeError) as e:  # RLIMIT_AS: allocation failure
        status, value = (
            f"out of memory under the {a.cap_gib} GiB cap: {str(e).splitlines()[0][:120]}",
            None,
        )
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    w_bytes = W.numel() * W.element_size()
    return {
        "config": a.config,
        "classes": a.classes,
        "batch": a.batch,
        "dim": a.dim,
        "chunk_size": a.chunk_size if impl == "chunked" else None,
        "status": status,
        "loss": value,
        "seconds": seconds,
        "rss_before_step": base,
        "peak_rss": peak,
        "w_bytes": w_bytes,
        "extra_bytes": peak - base - (w_bytes if status == "ok" else 0),
        "extra_over_w_and_grad": (peak - base - w_bytes) / (2 * w_bytes)
        if status == "ok"
        else None,
        "cap_gib": a.cap_gib,
    }


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="chunked,chunked_cloud")
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--classes", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk-size", type=int, default=16_384)
    p.add_argument(
        "--cap-gib", type=float, default=0.0, help="address-space cap per child (0: none)"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return
    results = []
    for name in a.configs.split(","):
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.peak_memory",
            "--child",
            "--config",
            name,
            "--classes",
            str(a.classes),
            "--batch",
            str(a.batch),
            "--dim",
            str(a.dim),
            "--chunk-size",
            str(a.chunk_size),
            "--cap-gib",
            str(a.cap_gib),
            "--threads",
            str(a.threads),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            r = {
                "config": name,
                "classes": a.classes,
                "batch": a.batch,
                "dim": a.dim,
                "status": f"child failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}",
            }
        else:
            r = json.loads(lines[-1])
        results.append(r)
        gib = 2**30
        if r.get("peak_rss"):
            extra = r["extra_bytes"] / gib
            frac = r.get("extra_over_w_and_grad")
            print(
                f"{name:14s} C={a.classes} B={a.batch} D={a.dim}: {r['status']}; peak RSS "
                f"{r['peak_rss'] / gib:.2f} GiB, W {r['w_bytes'] / gib:.2f} GiB, extra beyond W "
                f"and grad W {extra:.2f} GiB"
                + (f" = {100 * frac:.1f}% of (W + grad W)" if frac is not None else "")
                + f", {r['seconds']:.1f} s"
            )
        else:
            print(f"{name:14s}: {r['status']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
