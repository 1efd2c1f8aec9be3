"""The issue-14 grid in one interleaved run: what users run, against the floor and the GEMM limit.

Settings: CosFace re-ID (s=24, m=0.2) and face (s=64, m=0.35); ``random`` and ``trained``-like
data (:mod:`benchmarks.cases`); 1 and 2 torch threads. Every repetition runs one step of every
method of every setting in turn (threads switched inside the repetition), so machine load hits
all alike; the methods run in a fresh random order each repetition, so that none always follows
the same one (cache contents and allocator state depend on the previous step). A ratio is the
median over repetitions of ``time / time of the reference method in the same repetition and
setting`` (``floor``, ``gemm3``, or the bare fused head for the adapters).

    python -m benchmarks.suite --reps 7 --out benchmarks/results/suite.json

On a GPU (``--device cuda``) a timing is ``--inner`` back-to-back steps between two device
synchronisations (a single step of these sizes is mostly launch latency); ``--autocast bf16``
(or ``fp16``) runs every method's step under ``torch.autocast``, as mixed-precision training does.

    python -m benchmarks.suite --device cuda --threads 1 --inner 20 --classes 100000 --reps 15
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from benchmarks.cases import make_case, pin_allocator

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = {"reid": (24.0, 0.2), "face": (64.0, 0.35)}
METHODS = (
    "floor",
    "gemm3",
    "leap",
    "leap_cloud",
    "leap_cloud_margin",
    "leap_cloud_nostats",
    "pml",
    "fastreid",
    "pml_leap",
    "pml_leap_cloud",
    "fastreid_leap",
    "fastreid_leap_cloud",
)
#: adapter -> the bare fused head it wraps (the adapters' overhead ratio)
BARE = {
    "pml_leap": "leap",
    "pml_leap_cloud": "leap_cloud",
    "fastreid_leap": "leap",
    "fastreid_leap_cloud": "leap_cloud",
}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _ratio(ts: Sequence[float], ref: Sequence[float]) -> float:
    return statistics.median(t / r for t, r in zip(ts, ref))


def run(
    methods: Sequence[str],
    settings: Sequence[str],
    data: Sequence[str],
    threads: Sequence[int],
    batch: int,
    classes: int,
    dim: int,
    reps: int,
    warmup: int = 1,
    device: str = "cpu",
    autocast: Optional[torch.dtype] = None,
    inner: int = 1,
) -> Dict:
    cases: Dict[Tuple[str, str], Dict[str, object]] = {}
    for st in settings:
        s, m = SETTINGS[st]
        for kind in data:
            built: Dict[str, object] = {}
            for meth in methods:
                t0 = time.perf_counter()
                built[meth] = make_case(
                    meth,
                    batch,
                    classes,
                    dim,
                    "cosface",
                    scale=s,
                    margin=m,
                    data=kind,
                    device=device,
                    autocast=autocast,
                )
                _progress(f"built {st}/{kind}/{meth} in {time.perf_counter() - t0:.1f} s")
            cases[(st, kind)] = built
    cuda = torch.device(device).type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    times: Dict[Tuple[int, str, str, str], List[float]] = {}
    order = random.Random(0)
    for r in range(warmup + reps):
        for n in threads:
            torch.set_num_threads(n)
            for (st, kind), steps in cases.items():
                # a fresh order every repetition: no method always runs after the same one
                # (cache contents and allocator state depend on the previous step)
                names = list(steps)
                order.shuffle(names)
                for meth in names:
                    step = steps[meth]
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        step()  # type: ignore[operator]
                    sync()
                    dt = (time.perf_counter() - t0) / inner
                    if r >= warmup:
                        times.setdefault((n, st, kind, meth), []).append(dt)
        _progress(f"repetition {r + 1}/{warmup + reps} done")
    out: Dict = {}
    for (n, st, kind, meth), ts in times.items():
        floor = times[(n, st, kind, "floor")]
        row = {"median_ms": 1e3 * statistics.median(ts), "x_floor": _ratio(ts, floor)}
        if (n, st, kind, "gemm3") in times:
            row["x_gemm3"] = _ratio(ts, times[(n, st, kind, "gemm3")])
        if meth in BARE and (n, st, kind, BARE[meth]) in times:
            row["x_bare"] = _ratio(ts, times[(n, st, kind, BARE[meth])])
        out.setdefault(str(n), {}).setdefault(st, {}).setdefault(kind, {})[meth] = row
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--settings", default="reid,face")
    p.add_argument("--data", default="random,trained")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--autocast", default="none", choices=sorted(AUTOCAST))
    p.add_argument("--inner", type=int, default=1, help="steps per timing (GPU: 10-50)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    allocator = pin_allocator()  # before any case allocates (cases.pin_allocator: why)
    methods = [m for m in a.methods.split(",") if m]
    for need in ("floor", "gemm3"):
        if need not in methods:
            methods.insert(0, need)
    load = os.getloadavg()
    t0 = time.time()
    results = run(
        methods,
        a.settings.split(","),
        a.data.split(","),
        [int(t) for t in a.threads.split(",")],
        a.batch,
        a.classes,
        a.dim,
        a.reps,
        device=a.device,
        autocast=AUTOCAST[a.autocast],
        inner=a.inner,
    )
    result = {
        "suite": "issue14",
        "batch": a.batch,
        "classes": a.classes,
        "dim": a.dim,
        "reps": a.reps,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else "cpu",
        "autocast": a.autocast,
        "inner": a.inner,
        "settings": {k: SETTINGS[k] for k in a.settings.split(",")},
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "allocator": allocator,
        "wall_s": time.time() - t0,
        "results": results,
    }
    for n, per in results.items():
        for st, per_kind in per.items():
            for kind, rows in per_kind.items():
                print(f"[threads={n} {st} s={SETTINGS[st][0]:g} m={SETTINGS[st][1]:g} {kind}]")
                for meth, row in rows.items():
                    extra = "".join(
                        f"  x{row[k]:.2f} {k[2:]}" for k in ("x_gemm3", "x_bare") if k in row
                    )
                    print(
                        f"  {meth:22s} {row['median_ms']:8.1f} ms  x{row['x_floor']:.2f} floor{extra}"
                    )
    print("load average before/after:", load, result["loadavg_after"])
    print("allocator:", allocator)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
