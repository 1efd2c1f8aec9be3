"""Paired differences over seeds with Student-t 95% intervals."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple

__all__ = ["t_quantile", "t_interval", "paired_differences"]

# two-sided 95% quantiles t_{0.975, df}, df = 1..60 (to 6 decimals; a 3-decimal table moved
# the last printed digit of a few half-widths)
_T975 = [
    12.706205,
    4.302653,
    3.182446,
    2.776445,
    2.570582,
    2.446912,
    2.364624,
    2.306004,
    2.262157,
    2.228139,
    2.200985,
    2.178813,
    2.160369,
    2.144787,
    2.131450,
    2.119905,
    2.109816,
    2.100922,
    2.093024,
    2.085963,
    2.079614,
    2.073873,
    2.068658,
    2.063899,
    2.059539,
    2.055529,
    2.051831,
    2.048407,
    2.045230,
    2.042272,
    2.039513,
    2.036933,
    2.034515,
    2.032245,
    2.030108,
    2.028094,
    2.026192,
    2.024394,
    2.022691,
    2.021075,
    2.019541,
    2.018082,
    2.016692,
    2.015368,
    2.014103,
    2.012896,
    2.011741,
    2.010635,
    2.009575,
    2.008559,
    2.007584,
    2.006647,
    2.005746,
    2.004879,
    2.004045,
    2.003241,
    2.002465,
    2.001717,
    2.000995,
    2.000298,
]


def t_quantile(df: int) -> float:
    """:math:`t_{0.975}` with ``df`` degrees of freedom (table to 60, then a Cornish-Fisher
    expansion around 1.96, accurate to 2e-5)."""
    if df < 1:
        return float("nan")
    if df <= len(_T975):
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


def _value(metrics: Dict[str, Any], key: str) -> float:
    """``metrics[key]`` as a float; NaN where it is missing or ``None`` (n/a: ``null`` in a
    ``results.json`` read by ``json.load``)."""
    value = metrics.get(key)
    return float("nan") if value is None else float(value)


def paired_differences(
    runs: List[Dict[str, Any]],
    method: str,
    baseline: str,
    keys: Sequence[str],
    *,
    strict: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """For each metric key: per-seed ``method - baseline`` (runs matched by seed) and its
    :func:`t_interval`: ``{key: {"mean", "ci95", "n", "per_seed": {str(seed): difference}}}``
    (the seed as a string, ``per_seed["0"]``, as ``compare_runs`` and ``paired.json`` key it).

    ``runs``: dicts with ``seed``, ``method`` and ``metrics``, e.g. ``results["runs"]`` of
    :func:`~feature_cloud.evaluate.run_evaluation` or of its ``results.json`` read by
    ``json.load`` (``null``, n/a, counts as NaN). Units are the metrics': accuracies are
    fractions (``0.031`` = 3.1 points, where the report's tables and ``paired.json`` show
    ``3.1``); a run's ``seed`` is an int. ``ValueError`` when no run has ``method`` or ``baseline`` (naming
    the methods the runs have) or no run of either has a key (naming the keys they have);
    ``strict=False`` skips these checks (NaN, ``n`` 0), for a run in progress or files of
    releases without a newer key.

    Runs are paired by seed number alone, so they must come from one evaluation (one
    setting and configuration): a (method, seed) that appears twice, e.g. in
    ``a["runs"] + b["runs"]`` of two files, is a ``ValueError`` (with or without ``strict``;
    it kept the last run and dropped the others). Pool the seeds of several evaluations with
    :func:`~feature_cloud.evaluate.merge_runs` (``feature-cloud report A B --out M``), which
    checks that they share the setting, data and configuration, and pass the pooled file's
    ``runs``; do not mix one file's method runs with another's baseline runs (they carry no
    setting to check)."""
    if strict:
        present = list(dict.fromkeys(str(r["method"]) for r in runs))
        missing = [m for m in (method, baseline) if m not in present]
        if missing:
            raise ValueError(
                f"no run of method {' or '.join(map(repr, missing))}: the runs have {present}"
            )
        have = {k for r in runs if r["method"] in (method, baseline) for k in r["metrics"]}
        unknown = [k for k in keys if k not in have]
        if unknown:
            raise ValueError(
                f"no run of {method!r} or {baseline!r} has the metric "
                f"{', '.join(map(repr, unknown))}; available: {sorted(have)}"
            )
    by: Dict[Tuple[Any, int], Dict[str, Any]] = {}
    for r in runs:
        pair = (r["method"], int(r["seed"]))
        if pair in by:
            raise ValueError(
                f"method {pair[0]!r} seed {pair[1]} appears in more than one run: "
                "paired_differences pairs the runs of one evaluation by seed; pool the seeds of "
                "several evaluations with merge_runs(paths, out) (`feature-cloud report A B "
                "--out M`, which checks they share the setting and configuration) and pass the "
                "pooled results' runs"
            )
        by[pair] = r["metrics"]
    seeds = sorted({s for (m, s) in by if m == method and (baseline, s) in by})
    out: Dict[str, Dict[str, Any]] = {}
    for k in keys:
        diffs = [_value(by[(method, s)], k) - _value(by[(baseline, s)], k) for s in seeds]
        mean, half, n = t_interval(diffs)
        # seeds as str: the keys results.json's splits and paired.json hold (a JSON round trip
        # keeps them), as compare_runs gives them
        per_seed = {str(s): d for s, d in zip(seeds, diffs)}
        out[k] = {"mean": mean, "ci95": half, "n": n, "per_seed": per_seed}
    return out
