"""Is a method's head cost an offset? Head-logit offsets on the test logits of evaluate runs.

Reads the ``--save-logits`` files of ``feature-cloud evaluate`` runs (``DIR/logits/*.npz``) of a
method and its baseline, seed by seed, and asks two questions with the test labels (an oracle: an
upper bound for any calibration a user could fit without them):

1. **Restore the head**: the smallest offset ``delta`` in ``[0, --max-offset]`` added to the
   method's head-class logits at which its head FC accuracy is back at the baseline's; the tail
   difference there. If an offset restored the head while keeping the tail gain, the head cost
   would be a calibration matter.
2. **Shift the baseline**: the smallest ``delta`` subtracted from the baseline's head-class
   logits at which its tail FC accuracy reaches the method's; the baseline's head there. If it
   lost no more head than the method, the method's tail gain would be an offset.

Usage (DIRs: one evaluate output directory per setting, or several of one setting, pooled)::

    python -m feature_cloud evaluate DATA ... --methods ftl --save-logits --out runs/natural
    python benchmarks/head_offset.py runs/natural runs/s5 --method ftl --baseline ftl_base

Prints one Markdown table, a row per setting and a row over all pairs (mean ± 95 % t-interval).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from feature_cloud.evaluate.stats import t_interval


def head_tail_accuracy(
    logits: np.ndarray, labels: np.ndarray, head: np.ndarray, delta: float
) -> Tuple[float, float]:
    """FC accuracy (points) on head / tail test samples with ``delta`` added to the head-class
    logits."""
    pred = (logits + delta * head[None, :].astype(logits.dtype)).argmax(1)
    ok = pred == labels
    is_head = head[labels]
    return 100.0 * float(ok[is_head].mean()), 100.0 * float(ok[~is_head].mean())


def smallest_offset(
    fn: Callable[[float], Tuple[float, float]], target: float, grid: np.ndarray
) -> Optional[Tuple[float, float]]:
    """``fn(delta)`` at the first ``delta`` of ``grid`` whose first value reaches ``target``,
    or ``None``."""
    for d in grid:
        acc = fn(float(d))
        if acc[0] >= target - 1e-9:
            return acc
    return None


def interval(values: List[float]) -> str:
    """``mean ± 95 % t half-width`` of ``values`` (the tool's :func:`t_interval`)."""
    mean, half, n = t_interval(values)
    if n == 0:
        return "-"
    return f"{mean:+.1f}" if n == 1 else f"{mean:+.1f} ± {half:.1f}"


def load_pairs(
    directory: str, method: str, baseline: str
) -> Tuple[str, Dict[int, Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]]]:
    """The setting name and ``{seed: (method file, baseline file)}`` of one evaluate output."""
    with open(os.path.join(directory, "results.json")) as fh:
        setting = json.load(fh)["setting"]
    pairs = {}
    for f in glob.glob(os.path.join(directory, "logits", f"{method}_seed*.npz")):
        seed = int(re.search(r"_seed(\d+)\.npz$", f).group(1))  # type: ignore[union-attr]
        b = os.path.join(directory, "logits", f"{baseline}_seed{seed}.npz")
        if os.path.exists(b):
            pairs[seed] = (dict(np.load(f)), dict(np.load(b)))
    return setting, pairs


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="evaluate output directories (run with --save-logits)")
    ap.add_argument("--method", default="ftl")
    ap.add_argument("--baseline", default="ftl_base")
    ap.add_argument("--max-offset", type=float, default=8.0, help="largest offset, logit units")
    ap.add_argument("--step", type=float, default=0.05)
    args = ap.parse_args(argv)
    grid = np.round(np.arange(0.0, args.max_offset + args.step / 2, args.step), 6)
    rows: Dict[str, List[Dict[str, Any]]] = {}
    for d in args.dirs:
        setting, pairs = load_pairs(d, args.method, args.baseline)
        for seed, (m, b) in sorted(pairs.items()):
            method = partial(head_tail_accuracy, m["logits"], m["labels"], m["head_classes"])
            base = partial(head_tail_accuracy, b["logits"], b["labels"], b["head_classes"])
            (bh, bt), (mh, mt) = base(0.0), method(0.0)
            # (head, tail) once the method's head is back; (tail, head) of the baseline shifted
            # toward the tail until it reaches the method's tail
            restore = smallest_offset(method, bh, grid)
            shift = smallest_offset(lambda x: base(-x)[::-1], mt, grid)
            rows.setdefault(setting, []).append(
                {
                    "seed": seed,
                    "dh": mh - bh,
                    "dt": mt - bt,
                    "restored_tail": None if restore is None else restore[1] - bt,
                    "shifted_head": None if shift is None else shift[1] - bh,
                }
            )
    print(
        f"| setting | pairs | seeds | Δ FC tail | Δ FC head | head kept | head restored by an offset: "
        f"Δ tail there | head not restored at δ = {args.max_offset:g} | shifted baseline: Δ head at "
        f"the method's tail (pairs) | method head − shifted baseline head |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    everything: List[Dict[str, Any]] = []
    for setting in list(rows) + ["all"]:
        v = everything if setting == "all" else rows[setting]
        if setting != "all":
            everything = everything + v
        kept = [x for x in v if x["dh"] >= 0]
        restored = [x["restored_tail"] for x in v if x["dh"] < 0 and x["restored_tail"] is not None]
        lost = [x for x in v if x["restored_tail"] is None]
        shifted = [x for x in v if x["shifted_head"] is not None]
        seeds = "" if setting == "all" else ", ".join(str(x["seed"]) for x in v)
        rest = (
            interval(restored)
            if setting == "all"
            else ", ".join(f"{t:+.1f}" for t in restored) or "-"
        )
        print(
            f"| {setting} | {len(v)} | {seeds} | {interval([x['dt'] for x in v])} | "
            f"{interval([x['dh'] for x in v])} | {len(kept)} | {len(restored)}: {rest} | {len(lost)} | "
            f"{interval([x['shifted_head'] for x in shifted])} ({len(shifted)}) | "
            f"{interval([x['dh'] - x['shifted_head'] for x in shifted])} |"
        )


if __name__ == "__main__":
    main()
