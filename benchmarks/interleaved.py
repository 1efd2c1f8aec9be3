"""Side-by-side, interleaved timing of the margin losses: the ratio table of issue 7.

Every repetition runs one step of every method in turn (so machine load hits all of them
alike); the reported ratio of a method is the median over repetitions of its time divided by
the floor's time in the same repetition.

    python -m benchmarks.interleaved --batch 256 --classes 10000 --reps 15 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Dict, List, Sequence

import torch

from benchmarks.cases import make_case, pin_allocator, set_threads

DEFAULT_METHODS = (
    "floor",
    "leap",
    "leap_cloud",
    "leap_cloud_nostats",
    "leap_reference",
    "leap_cloud_reference",
    "pml",
    "fastreid",
)


def measure(
    methods: Sequence[str],
    batch: int,
    classes: int,
    dim: int,
    margin_type: str,
    reps: int,
    warmup: int = 1,
) -> Dict[str, Dict[str, float]]:
    steps = {m: make_case(m, batch, classes, dim, margin_type) for m in methods}
    times: Dict[str, List[float]] = {m: [] for m in methods}
    for r in range(warmup + reps):
        for m, step in steps.items():
            t0 = time.perf_counter()
            step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[m].append(dt)
    floor = times["floor"]
    out = {}
    for m, ts in times.items():
        out[m] = {
            "median_ms": 1e3 * statistics.median(ts),
            "ratio": statistics.median(t / f for t, f in zip(ts, floor)),
            "ratio_q1": statistics.quantiles([t / f for t, f in zip(ts, floor)], n=4)[0]
            if reps > 1
            else float("nan"),
            "ratio_q3": statistics.quantiles([t / f for t, f in zip(ts, floor)], n=4)[2]
            if reps > 1
            else float("nan"),
        }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--margin-types", default="cosface,arcface")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    allocator = pin_allocator()  # before any case allocates (cases.pin_allocator: why)
    threads = set_threads()
    load = os.getloadavg()
    result = {
        "batch": a.batch,
        "classes": a.classes,
        "dim": a.dim,
        "reps": a.reps,
        "threads": threads,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_before": load,
        "allocator": allocator,
        "results": {},
    }
    methods = [m for m in a.methods.split(",") if m]
    if "floor" not in methods:
        methods.insert(0, "floor")
    for mt in a.margin_types.split(","):
        res = measure(methods, a.batch, a.classes, a.dim, mt, a.reps)
        result["results"][mt] = res
        print(f"[{mt}] B={a.batch} C={a.classes} D={a.dim} threads={threads} reps={a.reps}")
        for m, r in res.items():
            print(
                f"  {m:24s} {r['median_ms']:9.1f} ms   x{r['ratio']:.2f} floor "
                f"(IQR {r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"
            )
    result["loadavg_after"] = os.getloadavg()
    print("load average before/after:", load, result["loadavg_after"])
    print("allocator:", allocator)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
