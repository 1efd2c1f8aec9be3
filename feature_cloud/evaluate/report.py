"""Tables (Markdown, CSV, JSON) and PNG plots of an evaluation, from ``results.json`` only."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .._validation import open_text, printable_name, warn_user
from ..demo import plots as demo_plots
from ..demo.report import (
    _markdown,
    check_writable,
    counted,
    csv_cell,
    load_results,
    make_output_dir,
    refuse_no_runs,
    run_subfolders,
    write_json,
    wrote_line,
)
from .environment import (
    environment_differences,
    mixed_environments_note,
    run_environments,
    show_values,
)
from .stats import paired_differences, t_interval, t_quantile

__all__ = [
    "render_evaluation",
    "summary_rows",
    "paired_rows",
    "combine_settings",
    "merge_runs",
    "compare_runs",
    "check_compatible",
    "SUMMARY_KEYS",
    "PAIRED_KEYS",
    "OPEN_SUMMARY_KEYS",
    "OPEN_PAIRED_KEYS",
    "summary_keys",
    "paired_keys",
    "SWEEP_KEYS",
    "sweep",
]

#: training diagnostics per head / tail (angles in rad², norms and cloud std as stored)
_ANGLE_VAR = [
    ("angle_var_train_head", "ang. var train head", 1.0),
    ("angle_var_train_tail", "ang. var train tail", 1.0),
]
_CLOUD_STD = [("cloud_std_head", "cloud std head", 1.0), ("cloud_std_tail", "cloud std tail", 1.0)]

#: (key, title, scale) of the per-method table (mean ± 95% t-interval over seeds).
SUMMARY_KEYS: List[Tuple[str, str, float]] = [
    ("fc_acc_head", "FC head", 100.0),
    ("fc_acc_tail", "FC tail", 100.0),
    ("fcw_acc_head", "FC(W) head", 100.0),
    ("fcw_acc_tail", "FC(W) tail", 100.0),
    ("fc_cross_head", "FC head→tail", 100.0),
    ("fc_cross_tail", "FC tail→head", 100.0),
    ("nn_acc_head", "NN head", 100.0),
    ("nn_acc_tail", "NN tail", 100.0),
    ("rank1_tail", "rank-1 tail", 100.0),
    ("map_tail", "mAP tail", 100.0),
    *_ANGLE_VAR,
    ("weight_norm_head", "‖W‖ head", 1.0),
    ("weight_norm_tail", "‖W‖ tail", 1.0),
    *_CLOUD_STD,
]

#: metrics whose paired differences are reported (points of accuracy).
PAIRED_KEYS: List[Tuple[str, str]] = [
    ("fc_acc_head", "Δ FC head"),
    ("fc_acc_tail", "Δ FC tail"),
    ("fcw_acc_head", "Δ FC(W) head"),
    ("fcw_acc_tail", "Δ FC(W) tail"),
    ("fc_cross_head", "Δ FC head→tail"),
    ("fc_cross_tail", "Δ FC tail→head"),
    ("nn_acc_head", "Δ NN head"),
    ("nn_acc_tail", "Δ NN tail"),
    ("rank1_tail", "Δ rank-1 tail"),
    ("map_tail", "Δ mAP tail"),
]


#: open-set protocol (held-out identities, never classified): its per-method and paired metrics
OPEN_SUMMARY_KEYS: List[Tuple[str, str, float]] = [
    ("rank1_all", "rank-1", 100.0),
    ("map_all", "mAP", 100.0),
    ("tar_far2", "TAR@FAR=1e-2", 100.0),
    ("tar_far3", "TAR@FAR=1e-3", 100.0),
    *_ANGLE_VAR,
    *_CLOUD_STD,
]
OPEN_PAIRED_KEYS: List[Tuple[str, str]] = [
    ("rank1_all", "Δ rank-1"),
    ("map_all", "Δ mAP"),
    ("tar_far2", "Δ TAR@FAR=1e-2"),
    ("tar_far3", "Δ TAR@FAR=1e-3"),
]


def _open(results: Dict[str, Any]) -> bool:
    return bool(results["config"].get("protocol") == "open")


def summary_keys(results: Dict[str, Any]) -> List[Tuple[str, str, float]]:
    """``(key, title, scale)`` of the per-method table of ``results`` (its protocol's)."""
    return OPEN_SUMMARY_KEYS if _open(results) else SUMMARY_KEYS


def paired_keys(results: Dict[str, Any]) -> List[Tuple[str, str]]:
    """``(key, title)`` of the paired differences of ``results`` (its protocol's)."""
    return OPEN_PAIRED_KEYS if _open(results) else PAIRED_KEYS


#: metrics of a run's shrinkage sweep (``run["sweep"][kappa]``) and their titles
SWEEP_KEYS: List[Tuple[str, str]] = [
    ("fc_acc_head", "Δ FC head"),
    ("fc_acc_tail", "Δ FC tail"),
    ("fc_cross_head", "Δ FC head→tail"),
    ("fc_cross_tail", "Δ FC tail→head"),
]


def _fmt(mean: float, half: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    if float(text) == 0.0:  # a small negative mean rounds to "-0.0": no sign
        text = f"{0.0:.{digits}f}"
    if math.isnan(half):
        return text
    return f"{text} ± {half:.{digits}f}"


def _stat(
    mean: float, half: float, digits: int, numeric: bool, n: int = 0, row_n: int = 0
) -> List[Any]:
    """One value column: the Markdown cell ``mean ± half`` (``n/a`` where the mean is NaN; with
    ``(n=K)`` where fewer values than the row's ``row_n`` seeds / pairs stand behind it: n/a
    ones dropped) or, ``numeric``, two CSV cells: the mean and the half-width as numbers (empty
    where NaN)."""
    if not numeric:
        cell = _fmt(mean, half, digits)
        if 0 < n < row_n and not math.isnan(mean):
            cell += f" (n={n})"
        return [cell]
    return ["" if math.isnan(x) else round(x, digits + 3) for x in (mean, half)]


def _titles(titles: Sequence[str], numeric: bool) -> List[str]:
    """The header of :func:`_stat`'s columns: ``numeric`` adds ``"<title> ci95"`` after each
    and, after them all, the columns of :func:`_counts` (``"<title> n"``)."""
    cols = [c for t in titles for c in ((t, f"{t} ci95") if numeric else (t,))]
    return cols + ([f"{t} n" for t in titles] if numeric else [])


def _counts(ns: Sequence[int], numeric: bool) -> List[Any]:
    """The CSV's last columns: how many seeds / pairs stand behind each value (the Markdown's
    ``(n=K)``: 1 where a value has no interval, 0 where it is n/a); none in the Markdown."""
    return [int(n) for n in ns] if numeric else []


def summary_rows(results: Dict[str, Any], numeric: bool = False) -> List[List[Any]]:
    """Per method: mean ± 95% t-interval half-width over seeds (``numeric``: the CSV form, the
    mean and the half-width of each metric in columns of their own)."""
    keys = summary_keys(results)
    header = ["Method", "seeds"] + _titles([t for _, t, _ in keys], numeric)
    rows = [header]
    for m in results["methods"]:
        ms = [r["metrics"] for r in results["runs"] if r["method"] == m]
        if not ms:
            continue
        cells = [results["labels"].get(m, m), str(len(ms))]
        ns = []
        for k, _, s in keys:
            mean, half, n = t_interval([r.get(k, float("nan")) for r in ms])
            cells += _stat(mean * s, half * s, 1 if s == 100.0 else 4, numeric, n, len(ms))
            ns.append(n)
        rows.append(cells + _counts(ns, numeric))
    return rows


def paired(results: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{method: {"baseline": name, metric: {"mean", "ci95", "n", "per_seed"}}}`` in points."""
    out: Dict[str, Dict[str, Any]] = {}
    for m, base in results.get("baselines", {}).items():
        d = paired_differences(
            results["runs"], m, base, [k for k, _ in paired_keys(results)], strict=False
        )
        for v in d.values():
            v["mean"] = 100 * v["mean"]
            v["ci95"] = 100 * v["ci95"]
            v["per_seed"] = {s: 100 * x for s, x in v["per_seed"].items()}
        out[m] = {"baseline": base, **d}
    return out


def _pairs(d: Dict[str, Any], keys: Optional[Sequence[str]] = None) -> int:
    """The number of seed pairs behind the paired differences ``d`` (``{metric: {"n", ...}}``):
    the most any of ``keys`` (default: all of ``d``'s metrics) has; a metric that is n/a in every
    pair (no head identity, say) has none."""
    return max(
        (int(v["n"]) for k, v in d.items() if isinstance(v, dict) and (keys is None or k in keys)),
        default=0,
    )


def sweep(results: Dict[str, Any]) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """The inference-prototype sweep (``--shrinkage-sweep``) against each method's baseline:
    ``{method: {kappa: {metric: {"mean", "ci95", "n", "per_seed"}}}}`` in points, each kappa on
    the seeds whose run has it (the baseline's plain FC is the reference at every kappa)."""
    out: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for m, base in results.get("baselines", {}).items():
        kappas = sorted(
            {k for r in results["runs"] if r["method"] == m for k in r.get("sweep", {})},
            key=float,
        )
        for kappa in kappas:
            runs = [
                {"method": "m", "seed": r["seed"], "metrics": r["sweep"][kappa]}
                for r in results["runs"]
                if r["method"] == m and kappa in r.get("sweep", {})
            ]
            runs += [
                {"method": "b", "seed": r["seed"], "metrics": r["metrics"]}
                for r in results["runs"]
                if r["method"] == base
            ]
            d = paired_differences(runs, "m", "b", [k for k, _ in SWEEP_KEYS], strict=False)
            for v in d.values():
                v["mean"], v["ci95"] = 100 * v["mean"], 100 * v["ci95"]
                v["per_seed"] = {s: 100 * x for s, x in v["per_seed"].items()}
            if _pairs(d):
                out.setdefault(m, {})[kappa] = d
    return out


SweepTable = Dict[str, Dict[str, Dict[str, Any]]]


def sweep_rows(
    results: Dict[str, Any],
    setting: bool = False,
    table: Optional[SweepTable] = None,
    numeric: bool = False,
) -> List[List[Any]]:
    """Per method and kappa of the sweep: paired differences (points) against the baseline's
    plain FC with 95% t-intervals; only the header without a sweep. ``table``: :func:`sweep` of
    ``results``, if already computed; ``numeric``: as in :func:`summary_rows`."""
    header = (
        (["Setting"] if setting else [])
        + ["Method", "vs", "kappa", "pairs"]
        + _titles([t for _, t in SWEEP_KEYS], numeric)
    )
    rows = [header]
    labels = results["labels"]
    for m, by_kappa in (sweep(results) if table is None else table).items():
        base = results["baselines"][m]
        for kappa, d in by_kappa.items():
            n = _pairs(d)
            rows.append(
                ([results["setting"]] if setting else [])
                + [labels.get(m, m), labels.get(base, base), kappa, str(n)]
                + [
                    c
                    for k, _ in SWEEP_KEYS
                    for c in _stat(d[k]["mean"], d[k]["ci95"], 1, numeric, d[k]["n"], n)
                ]
                + _counts([d[k]["n"] for k, _ in SWEEP_KEYS], numeric)
            )
    return rows


_SWEEP_NOTE = (
    "Inference prototypes at each kappa (`--shrinkage-sweep`; 0: the class weights) against the "
    "baseline's plain FC, same trained models: the head/tail trade-off of the prototypes "
    "(points, mean ± 95% t-interval)."
)


def plot_sweep(results: Dict[str, Any], file: str, table: Optional[SweepTable] = None) -> str:
    """Δ FC head against Δ FC tail (points) of each method's sweep, one point per kappa
    (``table``: :func:`sweep` of ``results``, if already computed)."""
    d = sweep(results) if table is None else table
    fig = demo_plots._figure((5.2, 4.0))
    ax = fig.subplots()
    colors = demo_plots._colors(max(len(d), 1))
    for (m, by_kappa), color in zip(d.items(), colors):
        xs = [v["fc_acc_tail"]["mean"] for v in by_kappa.values()]
        ys = [v["fc_acc_head"]["mean"] for v in by_kappa.values()]
        ax.plot(xs, ys, "o-", color=color, label=results["labels"].get(m, m))
        at: Dict[Tuple[float, float], List[str]] = {}  # one label where the tables show one value
        for kappa, x, y in zip(by_kappa, xs, ys):
            at.setdefault((round(x, 1), round(y, 1)), []).append(kappa)
        for (x, y), kappas in at.items():
            ax.annotate(
                f"κ={', '.join(kappas)}",
                (x, y),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(0, color="black", lw=0.8)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("Δ FC tail (points)")
    ax.set_ylabel("Δ FC head (points)")
    ax.set_title(
        f"{data_title(results)} {results['setting']}: prototypes at each kappa vs the baseline",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    return file


def paired_rows(
    results: Dict[str, Any], setting: bool = False, numeric: bool = False
) -> List[List[Any]]:
    """Per method with a baseline: paired differences (points) with 95% t-intervals
    (``numeric``: as in :func:`summary_rows`)."""
    keys = paired_keys(results)
    header = (
        (["Setting"] if setting else [])
        + ["Method", "vs", "pairs"]
        + _titles([t for _, t in keys], numeric)
    )
    rows = [header]
    labels = results["labels"]
    for m, d in paired(results).items():
        n = _pairs(d, [k for k, _ in keys])
        cells = ([results["setting"]] if setting else []) + [
            labels.get(m, m),
            labels.get(d["baseline"], d["baseline"]),
            str(n),
        ]
        cells += [
            c for k, _ in keys for c in _stat(d[k]["mean"], d[k]["ci95"], 1, numeric, d[k]["n"], n)
        ]
        rows.append(cells + _counts([d[k]["n"] for k, _ in keys], numeric))
    return rows


def _write_csv(rows: List[List[Any]], file: str) -> None:
    with open_text(file, newline="") as fh:
        csv.writer(fh).writerows(rows)


def _runs_csv(results: Dict[str, Any], file: str) -> None:
    keys = sorted({k for r in results["runs"] for k in r["metrics"]})
    rows = [["setting", "seed", "method"] + keys]
    for r in results["runs"]:
        rows.append(
            [results["setting"], r["seed"], r["method"]]
            + [csv_cell(r["metrics"].get(k)) for k in keys]
        )
    _write_csv(rows, file)


def plot_paired(results: Dict[str, Any], file: str) -> str:
    """Bars of the paired differences (points) with 95% t-interval error bars."""
    d = paired(results)
    methods = list(d)
    keys = [k for k, _ in paired_keys(results)][:4]
    if not _open(results):
        keys = ["fc_acc_head", "fc_acc_tail", "nn_acc_head", "nn_acc_tail"]
    fig = demo_plots._figure((max(5.0, 1.6 * len(methods) + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / len(keys)
    colors = demo_plots._colors(len(keys))
    for j, k in enumerate(keys):
        means = [d[m][k]["mean"] for m in methods]
        # no interval (one pair): no bar, not a bar of zero width that reads as no uncertainty
        errs = [math.nan if math.isnan(d[m][k]["ci95"]) else d[m][k]["ci95"] for m in methods]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(methods))]
        ax.bar(
            xs,
            means,
            width,
            yerr=errs,
            capsize=3,
            color=colors[j],
            label=dict(paired_keys(results))[k],
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(
        [
            f"{results['labels'].get(m, m)}\nvs {results['labels'].get(d[m]['baseline'])}"
            for m in methods
        ],
        fontsize=7,
    )
    ax.set_ylabel("paired difference (points)")
    ax.set_title(
        f"{data_title(results)} {results['setting']}: paired differences, 95% t-intervals",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    return file


_PAIRED_NOTE = (
    "Paired differences against each method's own baseline (same seed, backbone, "
    "budget and batch order), points, mean ± 95% t-interval."
)


def no_pairs_note(results: Dict[str, Any]) -> str:
    """One line instead of an empty paired table: no method of the run has its baseline run,
    and which baseline each method needs (or which methods a baseline is the baseline of)."""
    from .methods import BASELINES

    needs = []
    for m in results.get("methods", []):
        base = BASELINES.get(m)
        if base is not None:
            needs.append(f"{m} needs {base}")
        else:
            of = [k for k, v in BASELINES.items() if v == m]
            needs.append(
                f"{m} is itself the baseline of {', '.join(of)}" if of else f"{m} has no baseline"
            )
    return (
        "No paired differences: no method in --methods has its baseline run ("
        + "; ".join(needs)
        + "). Add a method together with its baseline (the command line and EvalConfig add "
        "each method's baseline)."
    )


#: The files :func:`render_evaluation` (and ``combine_settings``) write into ``--out``, besides
#: ``results.json``: ``evaluate`` never overwrites a user's files of these names.
OUTPUT_FILES = (
    "summary.md",
    "summary.csv",
    "paired.md",
    "paired.csv",
    "paired.json",
    "runs.csv",
    "sweep.md",
    "sweep.csv",
    "sweep.json",
    "paired.png",
    "sweep.png",
    "accuracy_head_tail.png",
    "angle_variance_vs_class_size.png",
    "weight_norm_vs_class_size.png",
    "combined.md",
)


def render_evaluation(path: str, log: Callable[[str], None] = print) -> Dict[str, str]:
    """Write ``summary.md/.csv``, ``paired.md/.csv/.json`` (paired.md: with a baseline in the
    run), ``runs.csv`` and the PNG plots of the evaluation in ``path``. Returns ``{artifact: file}``."""
    results = load_results(path)
    out = path if os.path.isdir(path) else os.path.dirname(path)
    refuse_no_runs(results, path)
    check_writable(out or ".", "run folder")
    files: Dict[str, str] = {}
    srows, prows = summary_rows(results), paired_rows(results)
    cfg = results["config"]
    text = [
        f"# {data_title(results)}: {results['setting']} ({cfg['backbone']}, "
        f"{counted(cfg['epochs'], 'epoch')}, seeds {cfg['seeds']})",
        "",
        _data_line(results),
        "",
        "Mean ± 95% t-interval half-width over seeds (accuracies in %, angles in rad²).",
        "",
    ]
    partial = _partial_line(results)
    text += [f"**Partial**: the evaluation {partial}.", ""] if partial is not None else []
    note = mixed_environments_note(results)
    text += [f"**Note**: {note}.", ""] if note is not None else []
    text += [
        _markdown(srows),
        "",
    ]
    if len(prows) > 1:
        text += [
            _PAIRED_NOTE,
            "",
            _markdown(prows),
            "",
        ]
    else:
        text += [no_pairs_note(results), ""]
    table = sweep(results)  # once: the Markdown, CSV, JSON and the plot
    wrows = sweep_rows(results, table=table)
    if len(wrows) > 1:
        text += [_SWEEP_NOTE, "", _markdown(wrows), ""]
    pieces = [("summary.md", "\n".join(text))]
    if len(prows) > 1:
        mixed = f"**Note**: {note}.\n\n" if note is not None else ""
        # paired.md alone (eval trial s58: only summary.md said a run was partial)
        mixed = (f"**Partial**: the evaluation {partial}.\n\n" if partial else "") + mixed
        pieces.append(("paired.md", _PAIRED_NOTE + "\n\n" + mixed + _markdown(prows) + "\n"))
    else:  # no method with its baseline: a note, not an empty table (no paired.csv / .json)
        pieces.append(("paired.md", no_pairs_note(results) + "\n"))
    for name, content in pieces:
        files[name] = os.path.join(out, name)
        with open_text(files[name]) as fh:
            fh.write(content)
    files["summary.csv"] = os.path.join(out, "summary.csv")
    _write_csv(summary_rows(results, numeric=True), files["summary.csv"])
    if len(prows) > 1:
        files["paired.csv"] = os.path.join(out, "paired.csv")
        _write_csv(paired_rows(results, numeric=True), files["paired.csv"])
        files["paired.json"] = os.path.join(out, "paired.json")
        write_json(paired(results), files["paired.json"])
    files["runs.csv"] = os.path.join(out, "runs.csv")
    _runs_csv(results, files["runs.csv"])
    if len(wrows) > 1:
        files["sweep.md"] = os.path.join(out, "sweep.md")
        with open_text(files["sweep.md"]) as fh:
            fh.write(_SWEEP_NOTE + "\n\n" + _markdown(wrows) + "\n")
        files["sweep.csv"] = os.path.join(out, "sweep.csv")
        _write_csv(sweep_rows(results, table=table, numeric=True), files["sweep.csv"])
        files["sweep.json"] = os.path.join(out, "sweep.json")
        write_json(table, files["sweep.json"])
    try:
        if len(prows) > 1:
            files["paired.png"] = plot_paired(results, os.path.join(out, "paired.png"))
        if len(wrows) > 1:
            files["sweep.png"] = plot_sweep(results, os.path.join(out, "sweep.png"), table)
        if not _open(results):  # FC and rank-1 per head / tail class: closed set only
            files["accuracy_head_tail.png"] = demo_plots.plot_accuracy(
                results, os.path.join(out, "accuracy_head_tail.png"), t_quantile=t_quantile
            )
        files["angle_variance_vs_class_size.png"] = demo_plots.plot_per_class(
            results,
            "angle_var_train",
            "angle variance (rad²)",
            "Intra-class angular variance of the training features vs class size",
            os.path.join(out, "angle_variance_vs_class_size.png"),
        )
        files["weight_norm_vs_class_size.png"] = demo_plots.plot_per_class(
            results,
            "weight_norm",
            "‖W_c‖ / mean ‖W‖",
            "Classifier weight norm vs class size",
            os.path.join(out, "weight_norm_vs_class_size.png"),
            relative=True,
        )
    except ImportError as exc:  # matplotlib is an optional extra
        log(f"(no plots: {exc})")
    log("")
    if results.get("complete") is False:
        log(
            f"Partial: {len(results['runs'])} of "
            f"{counted(len(cfg['seeds']) * len(cfg['methods']), 'run')} (--resume trains the rest)"
        )
    if note is not None:
        log(f"Note: {note}")
    log(_markdown(prows if len(prows) > 1 else srows))
    if len(prows) <= 1:
        log(no_pairs_note(results))
    log(wrote_line(files, out))
    return files


def _partial_line(results: Dict[str, Any]) -> Optional[str]:
    """How many of its runs a partial evaluation (``complete`` false) finished; ``None`` for a
    complete one (files of earlier releases have no ``complete``: complete)."""
    if results.get("complete") is not False:
        return None
    cfg = results["config"]
    return (
        f"stopped after {len(results['runs'])} of "
        f"{counted(len(cfg['seeds']) * len(cfg['methods']), 'run')} (`--resume` trains the rest)"
    )


def combined_notes(settings: Sequence[Dict[str, Any]]) -> List[str]:
    """The notes of ``combined.md`` over the evaluations ``settings``: each partial setting
    (its ``summary.md`` says so), each setting whose runs mix environments, and each setting
    trained in another environment than the first (their rows differ by that as well)."""
    notes = []
    for res in settings:
        partial = _partial_line(res)
        if partial is not None:
            notes.append(f"**Partial**: setting {res['setting']} {partial}.")
    for res in settings:
        note = mixed_environments_note(res)
        if note is not None:
            notes.append(f"**Note** ({res['setting']}): {note}.")
    first = settings[0]
    for res in settings[1:]:
        diff, _ = environment_differences(run_environments(first), run_environments(res))
        if diff:
            named = "; ".join(
                f"{k} {show_values(v)} ({res['setting']}) vs {show_values(v0)} ({first['setting']})"
                for k, (v, v0) in diff.items()
            )
            notes.append(
                f"**Note**: setting {res['setting']} was trained in another environment than "
                f"{first['setting']} ({named}): differences between their rows include it, not "
                "the settings' alone."
            )
    return notes


def combine_settings(paths: Sequence[str], out: str) -> str:
    """One Markdown/CSV table of the paired differences of several settings (sub-runs); open-set
    settings (other metrics) get tables of their own below the closed-set ones. The runs must
    be of one data set (fingerprint) and configuration except the setting (protocol, ``-S``,
    ``-H``), each setting once: ``ValueError`` before anything is written. ``combined.md``
    opens with :func:`combined_notes` (partial settings, mixed environments)."""
    check_writable(out)
    check_combinable(paths)
    # per protocol kind (open set or not) and form (Markdown, numeric CSV): paired, summary rows
    tables: Dict[Tuple[bool, bool], Tuple[List[List[Any]], List[List[Any]]]] = {}
    sweep_tables: Dict[bool, List[List[Any]]] = {False: [], True: []}
    settings = [load_results(p) for p in paths]
    for res in settings:
        for numeric in (False, True):
            rows, base_rows = tables.setdefault((_open(res), numeric), ([], []))
            pr = paired_rows(res, setting=True, numeric=numeric)
            rows += pr[1:] if rows else pr
            wr = sweep_rows(res, setting=True, numeric=numeric)
            if len(wr) > 1:
                sweep_tables[numeric] = (sweep_tables[numeric] or wr[:1]) + wr[1:]
            sr = summary_rows(res, numeric=numeric)
            values = 4 if _open(res) else 6  # the accuracy columns
            width = 2 + values * (2 if numeric else 1)  # after "Method", "seeds"
            # numeric: and their "<title> n" columns, after all the metrics' mean and ci95
            start = 2 + 2 * len(summary_keys(res))
            ns = slice(start, start + values) if numeric else slice(0)
            base_rows += [] if base_rows else [["Setting"] + sr[0][:width] + sr[0][ns]]
            base_rows += [[res["setting"]] + r[:width] + r[ns] for r in sr[1:]]
    make_output_dir(out)
    notes = combined_notes(settings)
    parts = ["\n\n".join(notes) + "\n"] if notes else []
    for (is_open, numeric), (rows, base_rows) in sorted(tables.items()):
        stem = "combined_open" if is_open else "combined"
        if numeric:
            _write_csv(rows, os.path.join(out, f"{stem}_paired.csv"))
            _write_csv(base_rows, os.path.join(out, f"{stem}_summary.csv"))
            continue
        what = "Open set (held-out identities): p" if is_open else "P"
        parts += [
            f"{what}aired differences (points, mean ± 95% t-interval over seeds)\n\n"
            + (_markdown(rows) if len(rows) > 1 else no_pairs_note(load_results(paths[0])))
            + (
                "\n\nOpen set: absolute values (%, mean ± 95% t-interval)\n\n"
                if is_open
                else "\n\nAbsolute accuracies and head↔tail shares (%, mean ± 95% t-interval)\n\n"
            )
            + _markdown(base_rows)
            + "\n"
        ]
    if sweep_tables[False]:
        parts.append(f"{_SWEEP_NOTE}\n\n{_markdown(sweep_tables[False])}\n")
        _write_csv(sweep_tables[True], os.path.join(out, "combined_sweep.csv"))
    md = "\n".join(parts)
    with open_text(os.path.join(out, "combined.md")) as fh:
        fh.write(md)
    return md


def check_combinable(paths: Sequence[str]) -> None:
    """``ValueError`` unless the runs ``paths`` may share one table of settings: distinct
    folders and setting names, the same data and configuration but for the setting."""
    seen: Dict[str, str] = {}
    settings: Dict[str, str] = {}
    first_path, first = paths[0], load_results(paths[0])
    current = head_defaults()
    for p in paths:
        real = os.path.realpath(p)
        if real in seen:
            raise ValueError(f"{p} and {seen[real]} are the same run: combine each setting once")
        seen[real] = p
        res = load_results(p)
        if res.get("kind") != "evaluate":
            raise ValueError(f"{p} is not a `feature-cloud evaluate` run")
        name = str(res.get("setting"))
        if name in settings:
            raise ValueError(
                f"{p} and {settings[name]} are both setting {name!r}: one table shows each "
                "setting once (pool their seeds with `report A B --out M` first)"
            )
        settings[name] = p
        check_compatible(res, first, p, first_path, current, "combine", other_settings=True)


#: config keys that may differ between runs merged by :func:`merge_runs`
#: (device: checked by --resume; shrinkage_sweep: inference only, each kappa on the runs that have
#: it; save_logits: an output only)
_MERGE_FREE = ("seeds", "methods", "out", "device", "shrinkage_sweep", "save_logits")
#: config keys that define a setting and may differ between the settings of one table
#: (:func:`combine_settings`)
_SETTING_FREE = ("protocol", "shots", "num_head")
#: config fields that only some protocols read
_PROTOCOL_FIELDS = {"n_test": ("natural", "hs"), "test_fraction": ("open",)}


def _setting_field(key: str, a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether ``key`` may differ between the settings ``a`` and ``b`` of one table: a field
    of the setting (:data:`_SETTING_FREE`) or one the protocol of only one of them reads."""
    readers = _PROTOCOL_FIELDS.get(key)
    return key in _SETTING_FREE or (
        readers is not None and not (a.get("protocol") in readers and b.get("protocol") in readers)
    )


#: dataset keys that must agree (its ``info``, e.g. the path it was read from, may differ)
_DATA_KEYS = ("name", "samples", "num_classes", "input_shape", "camids")


def _keyword_defaults(fn: Callable[..., Any]) -> Dict[str, Any]:
    """The keyword defaults of ``fn``'s signature."""
    import inspect

    return {
        name: par.default
        for name, par in inspect.signature(fn).parameters.items()
        if par.default is not inspect.Parameter.empty
    }


def head_defaults() -> Dict[str, Any]:
    """Keyword defaults of ``LEAPMarginHead`` and its ``FeatureCloud`` (what ``leap_options``
    left out resolves to), JSON-safe; every evaluation records them (``head_defaults``)."""
    from ..cloud import FeatureCloud
    from ..heads import LEAPMarginHead

    out = {**_keyword_defaults(FeatureCloud.__init__), **_keyword_defaults(LEAPMarginHead.__init__)}
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]


def _same_setting(
    key: str,
    a: Dict[str, Any],
    b: Dict[str, Any],
    defaults_a: Dict[str, Any],
    defaults_b: Dict[str, Any],
    scope: Optional[Tuple[Set[str], bool]] = None,
) -> bool:
    """Whether configuration field ``key`` is the same in ``a`` and ``b``; ``leap_options`` are
    compared as resolved head options, each against the head defaults of its own run (an option
    spelled out at its default equals leaving it out), within ``scope`` (:func:`_head_scope`)."""
    if key != "leap_options":
        return bool(_config_value(a, key) == _config_value(b, key))
    return not _head_option_diff(a, b, defaults_a, defaults_b, scope)


_ABSENT = "<absent: not an option of that release>"

#: configuration fields added after ``results.json`` files were written, with the value that a
#: file without the field ran with (pooled, resumed and compared as that value)
_ADDED_FIELDS: Dict[str, Any] = {
    "ftl_stage1_share": 0.5,
    "ftl_stage1_fc": "all",
    "ftl_stage1_filter": "trained",
    "test_fraction": 0.5,
    "ftl_energy": 0.95,
    "ftl_filter": "mlp",
    "scale": None,
    "margin": None,
}


def _config_value(cfg: Dict[str, Any], key: str) -> Any:
    """``cfg[key]``; for a field in :data:`_ADDED_FIELDS` that ``cfg`` lacks, the value it ran
    with; otherwise ``None``."""
    return cfg.get(key, _ADDED_FIELDS.get(key))


def _head_scope(
    runs: Sequence[Dict[str, Any]], defaults_a: Dict[str, Any], defaults_b: Dict[str, Any]
) -> Tuple[Set[str], bool]:
    """The head defaults that the methods of the evaluations ``runs`` depend on (every method
    under every run's configuration, :func:`~feature_cloud.evaluate.methods.head_use`), and
    whether ``leap_options`` reach a head: all recorded keys where a method has a cloud, the
    head's own keywords where the heads are cloud-free, none without a margin head."""
    from .methods import head_use

    uses = {
        head_use(m, r["config"])
        for r in runs
        for m in (*r.get("methods", ()), *r["config"].get("methods", ()))
    }
    keys = set(defaults_a) | set(defaults_b)
    if uses & {"leap", "statistics"}:
        return keys, "leap" in uses
    from ..cloud import FeatureCloud  # a cloud-free head's results do not depend on its keywords

    cloud_keys = set(_keyword_defaults(FeatureCloud.__init__))
    return (keys - cloud_keys if "plain" in uses else set()), False


#: the methods that read the ``ftl_*`` configuration fields (FTL and its no-transfer model)
_FTL_METHODS = ("ftl", "ftl_base")


#: the configuration fields that only the margin heads read
_MARGIN_FIELDS = ("scale", "margin")


def _unused_fields(runs: Sequence[Dict[str, Any]]) -> Set[str]:
    """Configuration fields none of the methods of the evaluations ``runs`` reads: the ``ftl_*``
    options where no run has an FTL method (a LEAP-only run pools with one made under another
    FTL option), ``scale`` and ``margin`` where no method has a margin head."""
    from .methods import head_use

    methods = {m for r in runs for m in (*r.get("methods", ()), *r["config"].get("methods", ()))}
    unused: Set[str] = set()
    if not methods & set(_FTL_METHODS):
        unused |= {k for r in runs for k in r["config"] if k.startswith("ftl_")}
    if all(head_use(m, r["config"]) == "none" for r in runs for m in methods):
        unused |= set(_MARGIN_FIELDS)
    return unused


def _head_option_diff(
    a: Dict[str, Any],
    b: Dict[str, Any],
    defaults_a: Dict[str, Any],
    defaults_b: Dict[str, Any],
    scope: Optional[Tuple[Set[str], bool]] = None,
) -> Dict[str, Tuple[Any, Any]]:
    """The head options that resolve differently in the configurations ``a`` and ``b`` (each
    against its own run's head defaults): ``{name: (value in a, value in b)}``; with ``scope``
    (:func:`_head_scope`) only the keys the methods depend on, and ``leap_options`` only where
    they reach a head."""
    oa, ob = a.get("leap_options") or {}, b.get("leap_options") or {}
    if scope is not None and not scope[1]:
        oa, ob = {}, {}
    defaults = set(defaults_a) | set(defaults_b) if scope is None else scope[0]
    keys = set(oa) | set(ob) | defaults
    out: Dict[str, Tuple[Any, Any]] = {}
    for k in sorted(keys):
        va, vb = oa.get(k, defaults_a.get(k, _ABSENT)), ob.get(k, defaults_b.get(k, _ABSENT))
        if va != vb:
            out[k] = (va, vb)
    return out


def same_split(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two recorded splits of one seed are the same split: as recorded, or once the
    identities without a training image are taken out of the head (earlier releases marked an
    identity that ``--n-test`` left out as head where ``-H`` reached it: the same images and
    numbers, so their runs still resume, pool and compare)."""
    return a == b or without_empty_head(a) == without_empty_head(b)


def without_empty_head(split: Dict[str, Any]) -> Dict[str, Any]:
    """A recorded split with no identity of no training image in its head (see
    :func:`same_split`); a split of this release as it is."""
    head, counts = split.get("head"), split.get("train_counts")
    if not isinstance(head, list) or not isinstance(counts, list) or len(head) != len(counts):
        return split
    kept = [bool(h) and int(c) > 0 for h, c in zip(head, counts)]
    return dict(split, head=kept, head_classes=sum(kept)) if kept != head else split


def check_compatible(
    res: Dict[str, Any],
    first: Dict[str, Any],
    path: str,
    first_path: str,
    current: Optional[Dict[str, Any]] = None,
    verb: str = "merge",
    other_settings: bool = False,
) -> None:
    """Raise ``ValueError`` unless the evaluation ``res`` (read from ``path``) may be pooled with
    ``first`` (from ``first_path``): same setting and data, every configuration field equal
    except ``seeds``, ``methods`` and ``out`` and the fields no method of the two runs reads
    (:func:`_unused_fields`) (``leap_options`` as resolved head options; a
    field newer than a run, :data:`_ADDED_FIELDS`, as the value that run had), both
    made by releases that record the head defaults (``current``: the defaults assumed where a
    run recorded none, default this release's). Only the head defaults that the methods of the
    two runs depend on count (:func:`_head_scope`): runs without a margin head need no record.
    ``verb`` names the action in the message. ``other_settings``: the settings may differ (the
    fields :data:`_SETTING_FREE`; the settings of one evaluation's table, ``-S 1 5``)."""
    current = head_defaults() if current is None else current
    if not other_settings and res["setting"] != first["setting"]:
        raise ValueError(
            f"cannot {verb} {path} (setting {res['setting']!r}) with {first_path} "
            f"(setting {first['setting']!r})"
        )
    da, db = res.get("head_defaults", current), first.get("head_defaults", current)
    scope = _head_scope([res, first], da, db)
    if ("head_defaults" in res) != ("head_defaults" in first) and scope[0]:
        old = path if "head_defaults" not in res else first_path
        raise ValueError(
            f"cannot {verb} {path} with {first_path}: {old} was made by an earlier release that "
            "did not record the head's defaults (they have changed since, e.g. "
            "prototype_shrinkage); pool runs of one release"
        )
    unused = _unused_fields([res, first])
    diff = sorted(
        k
        for k in set(res["config"]) | set(first["config"])
        if k not in _MERGE_FREE
        and not (other_settings and _setting_field(k, res["config"], first["config"]))
        and k not in unused
        and not _same_setting(k, res["config"], first["config"], da, db, scope)
    )
    if diff:
        values = [
            _head_option_diff(res["config"], first["config"], da, db, scope)
            if k == "leap_options"
            else (_config_value(res["config"], k), _config_value(first["config"], k))
            for k in diff
        ]
        raise ValueError(
            f"cannot {verb} {path} with {first_path}: configuration differs in {diff} "
            f"({', '.join(f'{k}: {v}' for k, v in zip(diff, values))}; each pair: ({path}, "
            f"{first_path}), leap_options as head options resolved against each run's "
            "recorded defaults)"
        )
    _check_same_data(res, first, path, first_path, verb)


def data_title(results: Dict[str, Any]) -> str:
    """The data's name in titles: a folder's own name (``data.title``; files of earlier
    releases: ``data.name``), its undecodable bytes (a folder name that is not UTF-8) as backslash
    escapes and its control characters escaped too, on one line, as in the files of earlier
    releases (:func:`~feature_cloud._validation.printable_name`)."""
    data = results["data"]
    return printable_name(str(data.get("title") or data["name"]))


def _data_line(results: Dict[str, Any]) -> str:
    """What the evaluation ran on: the data's size and each seed's split (or the range)."""
    data = results["data"]
    splits = list(results.get("splits", {}).values())

    def spread(key: str) -> str:
        values = sorted({int(s[key]) for s in splits if key in s})
        if not values:
            return "?"
        return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"

    return (
        f"Data: {data['samples']} images of {data['num_classes']} identities; split per seed: "
        f"{spread('head_classes')} head / {spread('tail_classes')} tail identities, "
        f"{spread('train')} training and {spread('test')} test images; "
        + retrieval_line(data)
        + "."
    )


def retrieval_line(data: Dict[str, Any]) -> str:
    """How rank-1 / mAP were retrieved, from a results file's ``data``: cross-camera (camera ids
    given) or among all test images (in a folder where only some file names hold a camera id:
    the first that do not)."""
    if not data.get("camids"):
        missing = (data.get("info") or {}).get("camids_missing")
        if not isinstance(missing, dict):
            return "retrieval among all test images (no camera ids)"
        files = [printable_name(str(f)) for f in missing.get("files", [])]
        more = int(missing.get("count", len(files))) - len(files)
        return (
            f"retrieval among all test images (no camera ids: {missing.get('count')} of "
            f"{missing.get('of')} file names hold no _c<digits>: {', '.join(files)}"
            + (f" and {more} more" if more > 0 else "")
            + "; camera ids come from file names only where every one holds _c<digits>)"
        )
    source = (data.get("info") or {}).get("camids_from") or "the data's camids"
    return f"cross-camera retrieval (camera ids from {source})"


def _check_same_data(
    res: Dict[str, Any], first: Dict[str, Any], path: str, first_path: str, verb: str
) -> None:
    data_diff = [k for k in _DATA_KEYS if res["data"].get(k) != first["data"].get(k)]
    a, b = res["data"].get("fingerprint"), first["data"].get("fingerprint")
    if a is not None and b is not None and a != b:  # runs of earlier releases have none
        data_diff.append("fingerprint (the images, labels or camera ids)")
    elif a is not None and a == b:  # the same images and labels: a renamed or copied file
        data_diff = [k for k in data_diff if k != "name"]
    if data_diff:
        raise ValueError(f"cannot {verb} {path} with {first_path}: the data differ in {data_diff}")


def merge_runs(paths: Sequence[str], out: str) -> str:
    """Pool the seeds of several evaluations of one setting into ``out/results.json``.

    For seeds run in separate processes or machines (e.g. ``--seeds 0 1 2`` here and
    ``--seeds 3 4`` there): the runs must share the data, setting and every configuration
    field except ``seeds``, ``methods`` and ``out`` (``leap_options`` compared as resolved head
    options: an option spelled out at its default equals leaving it out); a (method, seed) pair
    may appear in one run only, and a seed's split must be the same wherever it appears.
    Methods are the union (a method's paired differences use the seeds where it and its
    baseline both ran). Returns the path of the merged ``results.json``; render it with
    :func:`render_evaluation`.
    """
    if len(paths) < 2:
        raise ValueError("merge_runs needs at least two run directories")
    _refuse_overwriting_a_run(out, paths)
    check_writable(out)
    where: Dict[str, str] = {}
    for p in paths:  # the same folder (or results.json) twice: said so, not "in both X and X"
        real = os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")
        if real in where:
            raise ValueError(f"{p} is given twice (as {where[real]}): pool different runs")
        where[real] = p
    runs = [(p, load_results(p)) for p in paths]
    for p, res in runs:
        if res.get("kind") != "evaluate":
            raise ValueError(
                f"{p} is not a `feature-cloud evaluate` run (kind={res.get('kind')!r})"
            )
    first_path, first = runs[0]
    current = head_defaults()  # runs of releases that did not record theirs: compared with these
    merged: Dict[str, Any] = copy.deepcopy(first)
    merged["runs"], merged["wall_seconds"] = [], 0.0
    seen: Dict[Tuple[str, int], str] = {}
    for p, res in runs:
        check_compatible(res, first, p, first_path, current)
        for seed, split in res["splits"].items():
            if seed in merged["splits"] and not same_split(merged["splits"][seed], split):
                raise ValueError(f"seed {seed} has a different split in {p} than in an earlier run")
            merged["splits"][seed] = without_empty_head(split)
        for field in ("labels", "baselines"):
            for m, v in res.get(field, {}).items():
                if merged[field].setdefault(m, v) != v:
                    raise ValueError(f"{field} of method {m!r} differ between the runs ({p})")
        for m in res["methods"]:
            if m not in merged["methods"]:
                merged["methods"].append(m)
        for r in res["runs"]:
            pair = (str(r["method"]), int(r["seed"]))
            if pair in seen:
                raise ValueError(
                    f"method {pair[0]!r} seed {pair[1]} is in both {seen[pair]} and {p}: "
                    "merge runs of different seeds"
                )
            seen[pair] = p
            if "environment" not in r and isinstance(res.get("environment"), dict):
                r = dict(r, environment=res["environment"])  # an earlier release: the file's
            merged["runs"].append(r)
        merged["wall_seconds"] += float(res.get("wall_seconds", 0.0))
    merged["complete"] = all(res.get("complete") is not False for _, res in runs)
    merged["config"]["seeds"] = sorted({int(s) for s in merged["splits"]})
    merged["config"]["methods"] = list(merged["methods"])
    merged["config"]["shrinkage_sweep"] = sorted(
        {float(k) for _, res in runs for k in res["config"].get("shrinkage_sweep", [])}
    )
    merged["config"]["out"] = out
    merged["merged_from"] = [os.path.abspath(p) for p, _ in runs]
    note = mixed_environments_note(merged)
    if note is not None:
        warn_user(f"merge_runs: {note}; `report A B --compare` names such differences")
    make_output_dir(out)
    file = os.path.join(out, "results.json")
    write_json(merged, file)
    return file


def _refuse_overwriting_a_run(out: str, paths: Sequence[str]) -> None:
    """``ValueError`` before anything is read or written where ``out`` is one of the merged
    ``paths`` or holds a ``results.json`` that is not an earlier merge (an evaluation's own
    results, which the merge would replace); an earlier merge is rewritten."""
    target = os.path.realpath(out)
    if any(os.path.realpath(p) == target for p in paths):
        raise ValueError(
            f"--out {out!r} is one of the runs being merged: write the merge to another folder "
            "(nothing was written)"
        )
    file = os.path.join(out, "results.json")
    if os.path.isfile(file):
        try:
            with open(file) as fh:
                earlier_merge = "merged_from" in json.load(fh)
        except (OSError, ValueError, TypeError):
            earlier_merge = False
        if not earlier_merge:
            raise ValueError(
                f"--out {out!r} holds an evaluation's own {file!r}, which the merge would "
                "replace: write the merge to another folder (nothing was written)"
            )
    elif os.path.isdir(out):
        refuse_other_contents(out, "write the merge to another folder (nothing was written)")


def refuse_other_contents(out: str, instead: str) -> None:
    """``ValueError`` (ending in ``instead``) where the folder ``out``, holding no
    ``results.json``, holds the settings' folders of an evaluation of several settings
    (`feature-cloud report` of it would show those or the new run, not both) or files of the
    names an evaluation's report writes (a user's own ``summary.md``)."""
    settings = [os.path.basename(d) for d in run_subfolders(out)]
    if settings:
        raise ValueError(
            f"--out {out!r} holds an evaluation of several settings ({', '.join(settings)}), "
            f"which `feature-cloud report` of that folder would show instead: {instead}"
        )
    taken = sorted(set(os.listdir(out)) & set(OUTPUT_FILES))
    if taken:
        raise ValueError(
            f"--out {out!r} holds {', '.join(taken)} but no evaluation (results.json): {instead}"
        )


#: why an environment difference changes the numbers (compare's notes)
_ENVIRONMENT_WHY = {
    "threads": " (another CPU thread count rounds sums differently)",
    "device": " (another device computes in another order and precision)",
    "cpu_capability": " (torch's CPU kernels differ by instruction set)",
    "cuda_matmul_allow_tf32": " (TF32 matmuls round to 10 mantissa bits)",
    "cudnn_allow_tf32": " (TF32 convolutions round to 10 mantissa bits)",
    "float32_matmul_precision": " (TF32 / bf16 matmuls round)",
    "cudnn_benchmark": " (cuDNN picks its algorithms per run)",
}

#: config keys that define the setting: two evaluations compared seed by seed must share them
_SETTING_KEYS = ("protocol", "n_test", "threshold", "num_head", "shots")


def compare_runs(path_a: str, path_b: str, out: Optional[str] = None) -> Dict[str, Any]:
    """Pair two evaluations of one setting seed by seed: for every method run in both, the
    per-seed ``B - A`` of the paired metrics (points) with 95 % t-intervals, on the seeds both
    ran. For a variant against the default (``--leap-option``, ``--imprint-fraction``, another
    epoch count ...) on the same seeds: the same split, initial weights and batch order, so the
    difference is the variant's alone. Refused unless data, setting and the shared seeds' splits
    agree; the configuration differences are listed, every difference between the runs'
    environments (threads, versions, revision, platform, device, numerics flags) is a note and
    in ``environment_b_vs_a``, and a baseline whose metrics differ between the two files is
    named in ``notes``. With
    ``out``: ``compare.md`` and ``compare.json`` there. Returns the comparison."""
    if out is not None:
        _refuse_overwriting_files_of_others(out)
        check_writable(out)
    a, b = load_results(path_a), load_results(path_b)
    for p, res in ((path_a, a), (path_b, b)):
        if res.get("kind") != "evaluate":
            raise ValueError(f"{p} is not a `feature-cloud evaluate` run")
    for k in _SETTING_KEYS:
        if a["config"].get(k) != b["config"].get(k):
            raise ValueError(
                f"cannot compare {path_b} with {path_a}: another setting ({k}: "
                f"{b['config'].get(k)} vs {a['config'].get(k)})"
            )
    _check_same_data(b, a, path_b, path_a, "compare")
    seeds = sorted(set(a["splits"]) & set(b["splits"]), key=int)
    for seed in seeds:
        if not same_split(a["splits"][seed], b["splits"][seed]):
            raise ValueError(f"cannot compare: seed {seed} has another split in {path_b}")
    current = head_defaults()
    da, db = a.get("head_defaults", current), b.get("head_defaults", current)
    scope = _head_scope([a, b], da, db)
    unused = _unused_fields([a, b])
    config: Dict[str, Any] = {}
    for k in sorted(set(a["config"]) | set(b["config"])):
        if (
            k in _MERGE_FREE
            or k in unused
            or _same_setting(k, b["config"], a["config"], db, da, scope)
        ):
            continue
        config[k] = (
            {
                o: list(v)
                for o, v in _head_option_diff(b["config"], a["config"], db, da, scope).items()
            }
            if k == "leap_options"
            else [_config_value(b["config"], k), _config_value(a["config"], k)]
        )
    by_a = {(r["method"], int(r["seed"])): r["metrics"] for r in a["runs"]}
    by_b = {(r["method"], int(r["seed"])): r["metrics"] for r in b["runs"]}
    methods = [m for m in b["methods"] if m in a["methods"]]
    diffs: Dict[str, Dict[str, Any]] = {}
    for m in methods:
        common = [s for s in map(int, seeds) if (m, s) in by_a and (m, s) in by_b]
        if not common:
            continue
        runs = [{"method": "B", "seed": s, "metrics": by_b[(m, s)]} for s in common]
        runs += [{"method": "A", "seed": s, "metrics": by_a[(m, s)]} for s in common]
        d = paired_differences(runs, "B", "A", [k for k, _ in paired_keys(a)], strict=False)
        for v in d.values():
            v["mean"], v["ci95"] = 100 * v["mean"], 100 * v["ci95"]
            v["per_seed"] = {s: 100 * x for s, x in v["per_seed"].items()}
        diffs[m] = d
    if not diffs:
        raise ValueError(f"{path_a} and {path_b} share no (method, seed) run")
    env_diff, unrecorded = environment_differences(run_environments(a), run_environments(b))
    notes = [
        f"the runs' environments differ in {k}: {show_values(vb)} (B) vs {show_values(va)} (A)"
        + _ENVIRONMENT_WHY.get(k, "")
        + "; B - A includes its effect, not the configuration's alone"
        for k, (vb, va) in env_diff.items()
    ]
    if unrecorded:
        notes.append(
            f"only one of the files records {', '.join(unrecorded)} of its runs' environment "
            "(the other is of an earlier release): those cannot be compared"
        )
    for m, base in b.get("baselines", {}).items():
        if (
            m in diffs
            and base in diffs
            and any(
                v["mean"] != 0.0 or any(x != 0.0 for x in v["per_seed"].values())
                for v in diffs[base].values()
                if not math.isnan(v["mean"])
            )
        ):
            causes = [f"the configurations differ in {sorted(config)}"] if config else []
            if env_diff:
                causes.append(f"the environments differ in {list(env_diff)}")
            why = (
                ", ".join(causes) + ("" if env_diff else ", or another release or machine")
                if causes
                else "another release or machine?"
            )
            notes.append(
                f"the baseline {base!r} differs between the files: {m}'s differences include "
                f"the baselines' ({why})"
            )
    result = {
        "a": path_a,
        "b": path_b,
        "setting": a["setting"],
        "protocol": a["config"].get("protocol"),
        "config_b_vs_a": config,
        # every environment key whose values differ (each file: the values of its runs)
        "environment_b_vs_a": {k: [vb, va] for k, (vb, va) in env_diff.items()},
        "labels": {m: b["labels"].get(m, a["labels"].get(m, m)) for m in diffs},
        "differences": diffs,
        "notes": notes,
    }
    if out is not None:
        make_output_dir(out)
        write_json(result, os.path.join(out, "compare.json"))
        with open_text(os.path.join(out, "compare.md")) as fh:
            fh.write(comparison_markdown(result))
    return result


def _refuse_overwriting_files_of_others(out: str) -> None:
    """``ValueError`` where ``out`` holds a ``compare.md`` / ``compare.json`` that no earlier
    comparison wrote (a user's own file of that name); an earlier comparison is rewritten."""
    names = [n for n in ("compare.json", "compare.md") if os.path.exists(os.path.join(out, n))]
    if not names:
        return
    try:
        with open(os.path.join(out, "compare.json")) as fh:
            saved = json.load(fh)
        earlier = isinstance(saved, dict) and "differences" in saved
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        raise ValueError(
            f"--out {out!r} holds {', '.join(names)} that no comparison wrote: write the "
            "comparison to another folder (nothing was written)"
        )


def comparison_markdown(cmp: Dict[str, Any]) -> str:
    """The table of :func:`compare_runs` (B - A, points) with its header lines."""
    labels = cmp.get("labels", {})
    keys = OPEN_PAIRED_KEYS if cmp.get("protocol") == "open" else PAIRED_KEYS
    header = ["Setting", "Method", "pairs"] + [t for _, t in keys]
    rows = [header]
    for m, d in cmp["differences"].items():
        n = _pairs(d, [k for k, _ in keys])
        cells = [cmp["setting"], labels.get(m, m), str(n)]
        rows.append(
            cells
            + [
                c
                for k, _ in keys
                for c in _stat(d[k]["mean"], d[k]["ci95"], 1, False, d[k]["n"], n)
            ]
        )
    conf = "; ".join(f"{k}: {v}" for k, v in cmp["config_b_vs_a"].items()) or "none"
    lines = [
        f"B - A, same seeds (points, mean ± 95% t-interval): B = {cmp['b']}, A = {cmp['a']}",
        "",
        f"Configuration (B, A): {conf}",
        "",
        _markdown(rows),
        "",
    ]
    for m, d in cmp["differences"].items():
        per = {t: d[k]["per_seed"] for k, t in keys[:2]}
        seeds = list(per[keys[0][1]])
        lines.append(
            f"Per seed ({', '.join(seeds)}), {labels.get(m, m)}: "
            + "; ".join(
                f"{t} "
                + ", ".join(f"{v:+.1f}" if math.isfinite(v) else "n/a" for v in vals.values())
                for t, vals in per.items()
            )
        )
    lines += ["", *[f"Note: {n}" for n in cmp["notes"]]] if cmp["notes"] else []
    return "\n".join(lines) + "\n"
