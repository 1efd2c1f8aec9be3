"""Paired table of ``benchmarks/ftl_real.py`` runs: FTL minus its no-transfer baseline, same seed.

    python benchmarks/ftl_real_report.py RUNS.jsonl [--method TAG] [--baseline TAG]

Prints a Markdown table per metric with the baseline mean, the method mean and the mean paired
difference with its 95% t-interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from typing import Dict, List, Tuple

# two-sided 95% Student t quantiles by degrees of freedom
_T95 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
}

SETTINGS = ["natural", "S5", "S3", "S2", "S1"]


def interval(diffs: List[float]) -> Tuple[float, float]:
    """Mean and 95% half-width (t-interval; 0 for one value)."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return mean, _T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+")
    p.add_argument("--method", default="ftl")
    p.add_argument("--baseline", default="base")
    p.add_argument("--metrics", default="fc_tail,fc_head,nn_tail,nn_head")
    a = p.parse_args()
    rows: Dict[Tuple[str, str, int], dict] = {}
    for path in a.runs:
        for line in open(path):
            line = line.strip()
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            rows[(r["tag"], r["setting"], r["seed"])] = r
    for metric in a.metrics.split(","):
        print(f"\n**{metric}** ({a.method} - {a.baseline}, paired by seed)\n")
        print("| setting | seeds | baseline | method | paired diff | 95% CI |")
        print("|---|---|---|---|---|---|")
        by_setting = defaultdict(list)
        for tag, setting, seed in rows:
            if tag == a.method and (a.baseline, setting, seed) in rows:
                by_setting[setting].append(seed)
        for setting in [s for s in SETTINGS if s in by_setting] + sorted(
            set(by_setting) - set(SETTINGS)
        ):
            seeds = sorted(by_setting[setting])
            base = [rows[(a.baseline, setting, s)][metric] for s in seeds]
            meth = [rows[(a.method, setting, s)][metric] for s in seeds]
            mean, half = interval([m - b for m, b in zip(meth, base)])
            print(
                f"| {setting} | {','.join(map(str, seeds))} | {sum(base) / len(base):.1f} | "
                f"{sum(meth) / len(meth):.1f} | {mean:+.1f} | [{mean - half:+.1f}, {mean + half:+.1f}] |"
            )


if __name__ == "__main__":
    main()
