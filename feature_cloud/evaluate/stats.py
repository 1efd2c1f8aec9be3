"""Paired differences over seeds with Student-t 95% intervals."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

__all__ = ["t_quantile", "t_interval", "paired_differences"]

# two-sided 95% quantiles t_{0.975, df}, df = 1..30
_T975 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


def t_quantile(df: int) -> float:
    """:math:`t_{0.975}` with ``df`` degrees of freedom (table to 30, then a Cornish-Fisher
    expansion around 1.96, accurate to 1e-3)."""
    if df < 1:
        return float("nan")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> Tuple[float, float, int]:
    """``(mean, half-width of the 95% t-interval, n)``; NaN values are dropped; half-width is
    NaN for fewer than two values."""
    v = [float(x) for x in values if x is not None and not math.isnan(float(x))]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = sum(v) / n
    if n < 2:
        return mean, float("nan"), n
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n), n


def paired_differences(
    runs: List[Dict], method: str, baseline: str, keys: Sequence[str]
) -> Dict[str, Dict[str, object]]:
    """For each metric key: per-seed ``method - baseline`` (runs matched by seed) and its
    :func:`t_interval`. ``runs`` are dicts with ``seed``, ``method`` and ``metrics``."""
    by = {(r["method"], r["seed"]): r["metrics"] for r in runs}
    seeds = sorted({s for (m, s) in by if m == method and (baseline, s) in by})
    out: Dict[str, Dict[str, object]] = {}
    for k in keys:
        diffs = [
            by[(method, s)].get(k, float("nan")) - by[(baseline, s)].get(k, float("nan"))
            for s in seeds
        ]
        mean, half, n = t_interval(diffs)
        out[k] = {"mean": mean, "ci95": half, "n": n, "per_seed": dict(zip(seeds, diffs))}
    return out
