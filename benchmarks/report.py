"""Turn benchmark JSON into the ratio tables (and a PNG) of benchmarks/README.md.

    python -m benchmarks.report --bench results.json --interleaved inter.json [more.json ...] \
        --memory mem.json --readme benchmarks/README.md --png benchmarks/ratios.png

``--bench``: a pytest-benchmark JSON (``--benchmark-json``); each group (margin type, B, C) gets
one row per method with the median time and its ratio to the group's floor. ``--interleaved``:
JSON files of ``python -m benchmarks.interleaved`` (median of per-repetition ratios).
``--memory``: JSON of ``python -m benchmarks.peak_memory``. The tables replace the text between
``<!-- results:start -->`` and ``<!-- results:end -->`` in the README.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from typing import Dict, List, Optional

START, END = "<!-- results:start -->", "<!-- results:end -->"
LABELS = {
    "floor": "floor: normalised linear + F.cross_entropy",
    "leap": "LEAPMarginHead, cloud off (fused)",
    "leap_cloud": "LEAPMarginHead, cloud on (fused)",
    "leap_cloud_margin": "LEAPMarginHead, margin cloud on (fused, cloud_mode='margin')",
    "leap_cloud_nostats": "fused cloud loss without the statistics update",
    "leap_reference": "LEAPMarginHead, cloud off, impl='reference'",
    "leap_cloud_reference": "LEAPMarginHead, cloud on, impl='reference'",
    "leap_chunked": "LEAPMarginHead, cloud off, impl='chunked'",
    "leap_cloud_chunked": "LEAPMarginHead, cloud on, impl='chunked'",
    "pml": "PML CosFaceLoss / ArcFaceLoss",
    "fastreid": "fastreid CosSoftmax / ArcSoftmax + CE",
    "statistics": "ClassStatistics update + cloud variance",
    "gemm3": "three GEMMs alone (x W^T, g W, g^T x)",
    "pml_leap": "PML adapter LEAPLoss, cloud off",
    "pml_leap_cloud": "PML adapter LEAPLoss, cloud on",
    "fastreid_leap": "fastreid LEAPHead + its meta-arch loss, cloud off",
    "fastreid_leap_cloud": "fastreid LEAPHead + its meta-arch loss, cloud on",
}
SPEED_START, SPEED_END = "<!-- speed:start -->", "<!-- speed:end -->"
#: columns of the suite's x-floor table (short headers)
SUITE_COLS = (
    ("leap", "LEAP off"),
    ("leap_cloud", "LEAP cloud"),
    ("leap_cloud_margin", "LEAP margin cloud"),
    ("leap_cloud_nostats", "cloud, std 0.28"),
    ("pml", "PML"),
    ("fastreid", "fastreid"),
    ("pml_leap", "PML LEAPLoss off"),
    ("pml_leap_cloud", "PML LEAPLoss cloud"),
    ("fastreid_leap", "fastreid LEAPHead off"),
    ("fastreid_leap_cloud", "fastreid LEAPHead cloud"),
    ("floor_compiled", "floor compiled"),
    ("leap_compiled", "LEAP off compiled"),
    ("leap_cloud_compiled", "LEAP cloud compiled"),
    ("leap_cloud_margin_compiled", "LEAP margin cloud compiled"),
)


def bench_table(data: Dict) -> List[str]:
    groups: Dict[str, Dict[str, float]] = defaultdict(dict)
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        groups[b["group"]][info.get("method", b["name"])] = b["stats"]["median"]
    lines = []
    machine = data.get("machine_info", {})
    lines.append(
        f"pytest-benchmark run of {data.get('datetime', '?')} on "
        f"{machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}; "
        "medians; ratio = median / median of the floor in the same group.\n"
    )
    lines.append("| group | method | median ms | x floor |")
    lines.append("|---|---|---:|---:|")
    for group in sorted(groups):
        meds = groups[group]
        floor = meds.get("floor")
        for method, med in sorted(meds.items(), key=lambda kv: kv[1]):
            ratio = f"{med / floor:.2f}" if floor else "-"
            lines.append(f"| {group} | {LABELS.get(method, method)} | {1e3 * med:.1f} | {ratio} |")
    return lines


def allocator_note(run: Dict) -> str:
    """``"; glibc malloc thresholds pinned (1 GiB)"`` and the like, from a driver's
    ``"allocator"`` record (:func:`benchmarks.cases.pin_allocator`); empty for a run from before
    the drivers recorded it."""
    setting = run.get("allocator")
    if not setting:
        return ""
    if setting.get("pinned"):
        gib = setting.get("mmap_threshold", 0) / 2**30
        return f"; glibc malloc mmap/trim thresholds pinned ({gib:g} GiB)"
    return "; allocator not pinned"


def interleaved_table(runs: List[Dict]) -> List[str]:
    lines = []
    for run in runs:
        lines.append(
            f"\nB={run['batch']}, D={run['dim']}, C={run['classes']}, float32, CPU "
            f"({run['cpus']} cores, {run['threads']} torch threads), {run['reps']} interleaved "
            f"repetitions, torch {run['torch']}; load average {run['loadavg_before'][0]:.1f} before, "
            f"{run['loadavg_after'][0]:.1f} after{allocator_note(run)}. Ratio: median over "
            "repetitions of time / floor's time in the same repetition (IQR in brackets).\n"
        )
        types = list(run["results"])
        lines.append("| method | " + " | ".join(f"{t} ms | {t} x floor" for t in types) + " |")
        lines.append("|---|" + "---:|---:|" * len(types))
        methods = list(run["results"][types[0]])
        for m in methods:
            cells = []
            for t in types:
                r = run["results"][t].get(m)
                cells.append(
                    f"{r['median_ms']:.0f} | **{r['ratio']:.2f}** "
                    f"({r['ratio_q1']:.2f}-{r['ratio_q3']:.2f})"
                    if r
                    else "- | -"
                )
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _ms(v: float) -> str:
    """Milliseconds: whole numbers from 10 ms (the CPU tables), two digits below (a GPU's)."""
    return f"{v:.0f}" if v >= 10 else f"{v:.2f}"


def suite_tables(run: Dict) -> List[str]:
    """The issue-14 grid (``python -m benchmarks.suite``): x floor, x three-GEMM limit, adapters
    x bare head, per thread count and setting (re-ID s=24 m=0.2, face s=64 m=0.35) and data."""
    res = run["results"]
    settings = run.get("settings", {})
    device = run.get("device", "cpu")
    precision = (
        "float32" if run.get("autocast", "none") == "none" else f"{run['autocast']} autocast"
    )
    where = (
        f"CPU ({run['cpus']} cores, shared)"
        if device == "cpu"
        else f"{device} (a time: {run.get('inner', 1)} back-to-back steps between two device "
        "synchronisations, per step)"
    )
    lines = [
        f"B={run['batch']}, D={run['dim']}, C={run['classes']}, CosFace, fwd+bwd {precision}, "
        f"{where}, {run['reps']} interleaved repetitions (all settings "
        f"and torch thread counts {', '.join(res)} inside each), torch {run['torch']}; load average "
        f"{run['loadavg_before'][0]:.1f} before, {run['loadavg_after'][0]:.1f} after"
        f"{allocator_note(run)}. "
        "Ratio: median over repetitions of time / time of the reference in the same "
        "repetition. `trained`: features at cosine 0.66 to their class weight; `random`: "
        "Gaussian features. Cloud from the head's statistics (primed on a long tail): `cloud` "
        "the paper's per-logit cloud (`cloud_mode='paper'`), `margin cloud` the target-only "
        "`cloud_mode='margin'` (`cloud_scale=2`); `std 0.28`: the fused paper cloud loss with "
        "a fixed cloud std of 0.28 rad on every sample.",
        "",
    ]

    def name(st: str, kind: str) -> str:
        s_m = settings.get(st)
        return f"{st} (s={s_m[0]:g}, m={s_m[1]:g}) {kind}" if s_m else f"{st} {kind}"

    lines += ["**Time / floor** (normalised linear + `F.cross_entropy`, same s):", ""]
    cols = [
        (k, h)
        for k, h in SUITE_COLS
        if any(k in rows for per in res.values() for pk in per.values() for rows in pk.values())
    ]
    lines.append("| threads | setting | floor ms | " + " | ".join(h for _, h in cols) + " |")
    lines.append("|---|---|---:|" + "---:|" * len(cols))
    for n, per in res.items():
        for st, per_kind in per.items():
            for kind, rows in per_kind.items():
                cells = [f"{rows[k]['x_floor']:.2f}" if k in rows else "-" for k, _ in cols]
                lines.append(
                    f"| {n} | {name(st, kind)} | {_ms(rows['floor']['median_ms'])} | "
                    + " | ".join(cells)
                    + " |"
                )
    lines += [
        "",
        "**Time / three-GEMM limit** (`x W^T`, `g W`, `g^T x` alone) and "
        "**adapters / bare fused head**:",
        "",
    ]
    lines.append(
        "| threads | setting | gemm3 ms | floor | LEAP off | LEAP cloud | "
        "PML LEAPLoss / head (off, cloud) | fastreid LEAPHead / head (off, cloud) |"
    )
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
    for n, per in res.items():
        for st, per_kind in per.items():
            for kind, rows in per_kind.items():

                def g(k: str, key: str = "x_gemm3", rows: Dict = rows) -> str:
                    return f"{rows[k][key]:.2f}" if k in rows and key in rows[k] else "-"

                lines.append(
                    f"| {n} | {name(st, kind)} | {_ms(rows['gemm3']['median_ms'])} | {g('floor')} | "
                    f"{g('leap')} | {g('leap_cloud')} | {g('pml_leap', 'x_bare')}, "
                    f"{g('pml_leap_cloud', 'x_bare')} | {g('fastreid_leap', 'x_bare')}, "
                    f"{g('fastreid_leap_cloud', 'x_bare')} |"
                )
    return lines


def memory_table(rows: List[Dict]) -> List[str]:
    gib = 2**30
    lines = [
        "| config | C | B | D | status | peak RSS GiB | W GiB | extra beyond W + grad W GiB | extra / (W + grad W) | s |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("peak_rss"):
            frac = r.get("extra_over_w_and_grad")
            lines.append(
                f"| {r['config']}"
                + (f" (chunk {r['chunk_size']})" if r.get("chunk_size") else "")
                + f" | {r['classes']} | {r['batch']} | {r['dim']} | {r['status'].split(': [')[0]} | "
                f"{r['peak_rss'] / gib:.2f} | {r['w_bytes'] / gib:.2f} | "
                + (
                    f"{r['extra_bytes'] / gib:.2f} | {100 * frac:.1f}% |"
                    if frac is not None
                    else "- | - |"
                )
                + f" {r['seconds']:.0f} |"
            )
        else:
            lines.append(
                f"| {r['config']} | {r.get('classes')} | {r.get('batch')} | {r.get('dim')} | "
                f"{r['status'].split(': [')[0]} | - | - | - | - | - |"
            )
    return lines


def plot(runs: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = runs[0]
    types = list(run["results"])
    methods = [m for m in run["results"][types[0]] if m != "leap_cloud_nostats"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(types)
    for i, t in enumerate(types):
        vals = [run["results"][t][m]["ratio"] for m in methods]
        ax.bar([k + i * width for k in range(len(methods))], vals, width, label=t)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.10, color="g", lw=0.8, ls="--", label="target cloud off (1.10)")
    ax.axhline(1.25, color="r", lw=0.8, ls="--", label="target cloud on (1.25)")
    ax.set_xticks([k + width * (len(types) - 1) / 2 for k in range(len(methods))])
    ax.set_xticklabels([m.replace("_", "\n") for m in methods], fontsize=8)
    ax.set_ylabel("time / floor (fwd+bwd)")
    ax.set_title(
        f"B={run['batch']} D={run['dim']} C={run['classes']}, CPU, {run['threads']} thread(s)"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(
    bench: Optional[Dict],
    inter: List[Dict],
    memory: Optional[List[Dict]],
    suite: Optional[List[Dict]] = None,
) -> str:
    out: List[str] = []
    for i, run in enumerate(suite or []):
        title = "What users run: re-ID and face settings, random and trained-like data"
        out += [f"### {title}" if i == 0 else f"#### {run.get('title', 'Another run')}", ""]
        if run.get("note"):
            out += [run["note"], ""]
        out += suite_tables(run) + [""]
    if inter:
        out += ["### Interleaved ratios (the targets of issue 7)"] + interleaved_table(inter)
    if memory:
        out += ["", "### Peak memory (one process per row)", ""] + memory_table(memory)
    if bench:
        out += ["", "### pytest-benchmark grid", ""] + bench_table(bench)
    return "\n".join(out) + "\n"


def update_readme(path: str, text: str, start: str = START, end: str = END) -> None:
    try:
        with open(path) as f:
            readme = f.read()
    except FileNotFoundError:
        readme = f"# Benchmarks\n\n{start}\n{end}\n"
    if start not in readme:
        readme += f"\n{start}\n{end}\n"
    new = re.sub(
        re.escape(start) + ".*?" + re.escape(end),
        lambda _: f"{start}\n{text}{end}",
        readme,
        flags=re.S,
    )
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default=None)
    p.add_argument("--interleaved", nargs="*", default=[])
    p.add_argument("--memory", default=None)
    p.add_argument("--readme", default=None)
    p.add_argument("--png", default=None)
    p.add_argument(
        "--suite",
        nargs="*",
        default=[],
        help="JSON of python -m benchmarks.suite (several: one table set each)",
    )
    p.add_argument(
        "--main-readme",
        default=None,
        help="also write the suite and memory tables between the speed markers here",
    )
    a = p.parse_args(argv)
    bench = json.load(open(a.bench)) if a.bench else None
    inter = [json.load(open(f)) for f in a.interleaved]
    memory = json.load(open(a.memory)) if a.memory else None
    suite = [json.load(open(f)) for f in a.suite]
    text = render(bench, inter, memory, suite)
    print(text)
    if a.readme:
        update_readme(a.readme, text)
    if a.main_readme and (suite or memory):
        update_readme(a.main_readme, render(None, [], memory, suite), SPEED_START, SPEED_END)
    if a.png and inter:
        plot(inter, a.png)


if __name__ == "__main__":
    main()
