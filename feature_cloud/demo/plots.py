"""PNG plots of a demo run: matplotlib figures drawn by the Agg canvas, without pyplot, so
no display is needed and the process's backend (a notebook's inline plots) stays as it was."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import numpy as np

from .._validation import printable_name
from .metrics import aggregate

__all__ = [
    "plot_accuracy",
    "plot_per_class",
    "plot_projection",
    "render_all",
    "pca_2d",
]


def _figure(figsize: Tuple[float, float]) -> Any:
    """A ``matplotlib.figure.Figure`` on its own Agg canvas: outside pyplot (nothing to close,
    never shown) and without ``matplotlib.use`` (the process's backend is left alone)."""
    from .._extras import need

    need("matplotlib", "drawing the PNG plots", "matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _colors(n: int) -> List[Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _label(results: Dict[str, Any], method: str) -> str:
    return results.get("labels", {}).get(method, method)


def plot_accuracy(
    results: Dict[str, Any], file: str, t_quantile: Optional[Callable[[int], float]] = None
) -> str:
    """Grouped bars: head and tail accuracy per method (FC classifier and rank-1), mean +- std;
    with ``t_quantile`` (``df -> t_0.975``) mean +- the 95% t-interval's half-width, as in the
    evaluation tool's tables."""
    agg = aggregate(results)
    methods = [m for m in results["methods"] if m in agg]
    panels = [("fc_acc", "closed-set classifier (FC) accuracy"), ("rank1", "retrieval rank-1")]
    fig = _figure((11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    x = np.arange(len(methods))
    for ax, (key, title) in zip(axes, panels):
        for j, (part, color) in enumerate((("head", "#4C72B0"), ("tail", "#DD8452"))):
            means = [100 * agg[m][f"{key}_{part}"][0] for m in methods]
            stds = [_spread(agg[m][f"{key}_{part}"], t_quantile) for m in methods]
            bars = ax.bar(
                x + (j - 0.5) * 0.38,
                means,
                0.38,
                yerr=stds,
                capsize=3,
                color=color,
                label=f"{part} classes",
            )
            for b, v in zip(bars, means):  # the value at the foot of its bar, readable on it
                if not math.isnan(v):  # or above a bar too short to hold it
                    inside = v >= 12
                    ax.text(
                        b.get_x() + b.get_width() / 2,
                        1 if inside else v + 1,
                        f"{v:.0f}",
                        ha="center",
                        va="bottom",
                        fontsize=7,
                        color="white" if inside else "black",
                    )
        ax.set_xticks(x)
        ax.set_xticklabels(
            [_label(results, m) for m in methods], rotation=30, ha="right", fontsize=8
        )
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 105)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", fontsize=8, ncol=2, frameon=False)
    # the runs behind the bars (one per seed): a partial or pooled file can hold fewer runs of
    # a method than its configured seeds
    runs = sorted({sum(r["method"] == m for r in results["runs"]) for m in methods} or {0})
    n = runs[-1]
    spread = "std" if t_quantile is None else "95% t-interval"
    seeds = f"{runs[0]}-{n} seeds per method" if len(runs) > 1 else f"{n} seeds"
    over = f"mean ± {spread} over {seeds}" if n > 1 else "1 seed"
    where = printable_name(str(results["data"].get("title") or results["data"]["name"])) + (
        f" {results['setting']}" if "setting" in results else ""
    )
    fig.suptitle(f"{where}: head vs tail accuracy ({over})", fontsize=11, x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(file, dpi=110)
    return file


def _spread(stat: Tuple[float, float, int], t_quantile: Optional[Callable[[int], float]]) -> float:
    """The error bar of one ``aggregate`` entry ``(mean, std, n)``, in points."""
    _, std, n = stat
    if t_quantile is None:
        return 100 * std
    # one seed has no interval: no bar (a bar of zero reads as no uncertainty)
    return 100 * t_quantile(n - 1) * std / math.sqrt(n) if n > 1 else math.nan


def plot_per_class(
    results: Dict[str, Any], key: str, ylabel: str, title: str, file: str, relative: bool = False
) -> str:
    """One panel per method: per-class ``key`` against the class's training size (every seed;
    head classes as dots, tail classes as triangles). ``relative`` divides each run's values by
    their mean (weight norms of different heads live on different scales)."""
    methods = [m for m in results["methods"] if any(r["method"] == m for r in results["runs"])]
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = _figure((3.3 * cols, 2.9 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    rng = np.random.default_rng(0)
    labelled: Set[str] = set()  # one legend entry per group that has points
    plotted = False
    for i, method in enumerate(methods):
        ax = axes[i // cols][i % cols]
        points = 0
        for r in results["runs"]:
            if r["method"] != method:
                continue
            split = results["splits"][str(r["seed"])]
            counts = np.array(split["train_counts"], dtype=float)
            head = np.array(split["head"], dtype=bool)
            vals = np.array([np.nan if v is None else v for v in r["per_class"][key]], dtype=float)
            # rounding noise is 0: the two samples of a 2-image class lie at one angle from their
            # mean, so its angle variance is ~1e-30, which would set the axis' scale
            vals[np.abs(vals) < 1e-12] = 0.0
            shown = np.isfinite(vals) & (counts > 0)  # n/a (e.g. one training image) left out
            if relative and shown.any():
                vals = vals / np.mean(vals[shown])
            jitter = counts * np.exp(rng.uniform(-0.06, 0.06, counts.size))
            for group, mask, color, marker, size in (
                ("head", head & shown, "#4C72B0", "o", 14),
                ("tail", ~head & shown, "#DD8452", "^", 16),
            ):
                if not mask.any():
                    continue
                ax.scatter(
                    jitter[mask],
                    vals[mask],
                    s=size,
                    c=color,
                    marker=marker,
                    alpha=0.7,
                    label=None if group in labelled else group,
                )
                labelled.add(group)
                points += int(mask.sum())
        if points:
            plotted = True
        else:  # nothing to show (no class with a value): say so instead of an empty log axis
            ax.text(
                0.5,
                0.5,
                "n/a for every class",
                ha="center",
                va="center",
                fontsize=8,
                transform=ax.transAxes,
            )
        ax.set_title(_label(results, method), fontsize=9)
        ax.grid(alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for i in range(len(methods)):
        if i // cols == rows - 1 or i + cols >= len(methods):  # the lowest panel of its column
            xlabel = "training samples of the class" + (" (log)" if plotted else "")
            axes[i // cols][i % cols].set_xlabel(xlabel, fontsize=8)
    if plotted:  # log x only with points: an axis without data cannot be log-scaled
        from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

        for i in range(len(methods)):
            ax = axes[i // cols][i % cols]
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
    for j in range(len(methods), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles: List[Any] = []
    names: List[str] = []
    for a in axes.flat:
        h, n = a.get_legend_handles_labels()
        handles, names = handles + h, names + n
    if handles:
        axes[0][0].legend(handles, names, fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(file, dpi=110)
    return file


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` onto their two principal directions (sign fixed for stability)."""
    centered = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    comps = vt[:2]
    comps *= np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])[:, None]
    out = centered @ comps.T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def plot_projection(results: Dict[str, Any], projection: Dict[str, np.ndarray], file: str) -> str:
    """PCA of the L2-normalised embeddings of a few head and tail classes, one panel per method.

    Filled markers: training features (tail classes as triangles); small crosses: the held-out
    evaluation features of the same classes. Shows how narrow the tail classes' training cloud
    is and whether held-out tail samples fall inside it.
    """
    classes = [int(c) for c in projection["classes"]]
    is_head = [bool(h) for h in projection["is_head"]]
    methods = [m for m in results["methods"] if f"{m}/train_features" in projection]
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig = _figure((3.4 * cols, 3.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    colors = _colors(len(classes))
    names = results["data"].get("class_names")
    for i, method in enumerate(methods):
        ax = axes[i // cols][i % cols]
        ftr, ytr = projection[f"{method}/train_features"], projection[f"{method}/train_labels"]
        fev, yev = projection[f"{method}/eval_features"], projection[f"{method}/eval_labels"]
        both = np.concatenate([ftr, fev]).astype(np.float64)
        both /= np.linalg.norm(both, axis=1, keepdims=True).clip(1e-12)
        xy = pca_2d(both)
        xy_tr, xy_ev = xy[: len(ftr)], xy[len(ftr) :]
        for c, head, color in zip(classes, is_head, colors):
            name = printable_name(str(names[c])) if names else str(c)  # a folder name not UTF-8
            ax.scatter(
                xy_ev[yev == c, 0],
                xy_ev[yev == c, 1],
                s=10,
                marker="x",
                color=color,
                alpha=0.35,
                linewidths=0.8,
            )
            ax.scatter(
                xy_tr[ytr == c, 0],
                xy_tr[ytr == c, 1],
                s=22 if head else 46,
                marker="o" if head else "^",
                color=color,
                alpha=0.8 if head else 1.0,
                edgecolors="none" if head else "black",
                linewidths=0.6,
                label=f"{name} ({'head' if head else 'tail'})",
            )
        ax.set_title(_label(results, method), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(len(methods), rows * cols):
        axes[j // cols][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="lower center", ncol=min(len(classes), 6), fontsize=8, frameon=False
    )
    seed = results["config"]["seeds"][0]
    fig.suptitle(
        f"Feature clouds (PCA of normalised embeddings, seed {seed}): dots = head training "
        "samples, triangles = tail training samples, x = held-out samples",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(file, dpi=110)
    return file


def render_all(
    results: Dict[str, Any], projection: Optional[Dict[str, np.ndarray]], out: str
) -> Dict[str, str]:
    """Every plot of a run into ``out``; returns ``{name: path}``."""
    files = {
        "accuracy_head_tail.png": plot_accuracy(
            results, os.path.join(out, "accuracy_head_tail.png")
        ),
        "angle_variance_vs_class_size.png": plot_per_class(
            results,
            "angle_var_train",
            "angle variance (rad²)",
            "Intra-class angular variance of the training features vs class size",
            os.path.join(out, "angle_variance_vs_class_size.png"),
        ),
        "angle_variance_test_vs_class_size.png": plot_per_class(
            results,
            "angle_var_test",
            "angle variance (rad²)",
            "Intra-class angular variance of the held-out features vs training class size",
            os.path.join(out, "angle_variance_test_vs_class_size.png"),
        ),
        "weight_norm_vs_class_size.png": plot_per_class(
            results,
            "weight_norm",
            "‖W_c‖ / mean ‖W‖",
            "Classifier weight norm (relative to the method's mean) vs class size",
            os.path.join(out, "weight_norm_vs_class_size.png"),
            relative=True,
        ),
    }
    if projection is not None and "classes" in projection:
        files["feature_cloud_2d.png"] = plot_projection(
            results, projection, os.path.join(out, "feature_cloud_2d.png")
        )
    return files
