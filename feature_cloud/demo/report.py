"""Tables (Markdown, CSV, terminal) and plots of a saved demo run.

Everything here reads only ``results.json`` and ``projection.npz`` from a run directory, so
``feature-cloud report PATH`` re-renders a run without training anything.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._extras import MissingExtra
from .._validation import open_text
from . import plots
from .metrics import aggregate

__all__ = [
    "load_results",
    "check_results",
    "check_writable",
    "check_out_outside_data",
    "make_output_dir",
    "aggregate",
    "results_markdown",
    "compact_table",
    "render_report",
    "MAIN_COLUMNS",
    "DIAG_COLUMNS",
]

#: (metric key, column title, scale) of the main table: accuracies in percent.
MAIN_COLUMNS: List[Tuple[str, str, float]] = [
    ("fc_acc_head", "FC acc head", 100.0),
    ("fc_acc_tail", "FC acc tail", 100.0),
    # the same FC scored against the class weights (a LEAP head's FC uses its prototypes)
    ("fcw_acc_head", "FC(W) head", 100.0),
    ("fcw_acc_tail", "FC(W) tail", 100.0),
    ("nn_acc_tail", "NN acc tail", 100.0),
    ("rank1_head", "rank-1 head", 100.0),
    ("rank1_tail", "rank-1 tail", 100.0),
    ("map_head", "mAP head", 100.0),
    ("map_tail", "mAP tail", 100.0),
]

#: Diagnostics: angles in radians (variance in rad^2), weight norms as stored.
DIAG_COLUMNS: List[Tuple[str, str, float]] = [
    ("angle_mean_train_head", "angle train head", 1.0),
    ("angle_mean_train_tail", "angle train tail", 1.0),
    ("angle_var_train_head", "ang. var train head", 1.0),
    ("angle_var_train_tail", "ang. var train tail", 1.0),
    ("angle_var_test_head", "ang. var test head", 1.0),
    ("angle_var_test_tail", "ang. var test tail", 1.0),
    ("weight_norm_head", "‖W‖ head", 1.0),
    ("weight_norm_tail", "‖W‖ tail", 1.0),
    ("cloud_std_tail", "cloud std tail", 1.0),
]

RESULTS_FILE = "results.json"
PROJECTION_FILE = "projection.npz"


def wrote_line(files: Dict[str, str], out: str) -> str:
    """``"wrote a, b, ... to OUT"``: the rendered ``files`` and the run's own data files."""
    own = [f for f in (RESULTS_FILE, PROJECTION_FILE) if os.path.isfile(os.path.join(out, f))]
    names = sorted(set(own) | {os.path.basename(f) for f in files.values()})
    return f"wrote {', '.join(names)} to {out}"


def counted(n: int, noun: str, plural: Optional[str] = None) -> str:
    """``"1 epoch"``, ``"3 epochs"``: a count with its noun (plural in ``s`` unless given:
    ``counted(3, "identity", "identities")``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float as ``None``: JSON has no NaN (Python and jq read it,
    JavaScript and most other parsers do not), so the files say ``null`` where a table says n/a."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(obj: Any, file: str) -> None:
    """Write ``obj`` to ``file`` as strict JSON (:func:`strict_json`), atomically (through a
    temporary file: a killed run never leaves half a file)."""
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(strict_json(obj), fh, indent=1, allow_nan=False)
    os.replace(tmp, file)


def make_output_dir(path: str) -> None:
    """Create the output directory ``path`` (and its parents); ``ValueError`` naming the file
    in the way where ``path`` or a parent is an existing file."""
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = os.path.abspath(path)
        while not os.path.isfile(blocker) and blocker != os.path.dirname(blocker):
            blocker = os.path.dirname(blocker)
        raise ValueError(
            f"output directory {path!r}: {blocker!r} is a file, not a directory"
        ) from None


def check_writable(path: str, what: str = "--out") -> None:
    """``ValueError`` naming ``path`` where its folder (or, before it exists, the nearest
    existing parent it would be made in) takes no new file: a temporary file is created there
    and removed, before anything is trained or written (a read-only folder or file system, no
    permission), or a file in the way (``path`` or a parent is a file)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{what} {path!r}: {folder!r} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".feature-cloud-", suffix=".tmp", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        where = "" if folder == os.path.abspath(path) else f" (in {folder!r}, where it is made)"
        raise ValueError(
            f"{what} {path!r} cannot be written{where}: {err.strerror or err}; nothing was written"
        ) from None


def check_out_outside_data(out: str, data_path: Optional[str]) -> None:
    """``ValueError`` where ``out`` (its real path) is the image folder ``data_path`` or inside
    it: the next evaluation of that folder would read the run's plots as an identity."""
    if not data_path or not os.path.isdir(data_path):
        return
    root, target = os.path.realpath(data_path), os.path.realpath(out)
    if os.path.commonpath([root, target]) == root:
        raise ValueError(
            f"--out {out!r} is inside the image folder {data_path!r}: a later evaluation of that "
            "folder would read the run's files as an identity; choose an --out outside it"
        )


def csv_cell(value: Any) -> Any:
    """A CSV cell: empty where the value is NaN / missing (the tables' n/a), else the value."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _nan_for_null(values: Dict[str, Any]) -> Dict[str, Any]:
    return {k: math.nan if v is None else v for k, v in values.items()}


def run_subfolders(path: str) -> List[str]:
    """The sub-folders of ``path`` that hold a run (``results.json``), sorted: an evaluation of
    several settings (``-S 1 5``) keeps one run per setting there, e.g. ``H20_S1``."""
    if not os.path.isdir(path):
        return []
    return sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if os.path.isfile(os.path.join(path, name, RESULTS_FILE))
    )


def load_results(path: str) -> Dict[str, Any]:
    """``results.json`` of a run directory (or the file itself)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such run directory or results file: {path!r}")
    file = os.path.join(path, RESULTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        subs = [os.path.basename(p) for p in run_subfolders(path)]
        raise FileNotFoundError(
            f"no {RESULTS_FILE} in {path!r}: not a feature-cloud demo or evaluate run"
            + (f"; its sub-folders {', '.join(subs)} are runs (one per setting)" if subs else "")
        )
    with open(file, encoding="utf-8") as fh:
        try:
            results = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            what = "text" if isinstance(exc, UnicodeDecodeError) else "valid JSON"
            raise ValueError(
                f"{file} is not {what} ({exc}): not a feature-cloud demo or evaluate run "
                f"(give its folder or its {RESULTS_FILE})"
            ) from None
    if not isinstance(results, dict):
        raise ValueError(
            f"{file} holds a JSON {type(results).__name__}, not an object: not a "
            "feature-cloud demo or evaluate run"
        )
    for key in ("config", "data", "methods", "runs", "splits"):
        if key not in results:
            raise ValueError(f"{file} has no {key!r}: not a feature-cloud demo or evaluate run")
    check_results(results, file)
    for run in results["runs"]:  # n/a metrics: null in the file (strict JSON), NaN in the tables
        if isinstance(run, dict) and isinstance(run.get("metrics"), dict):
            run["metrics"] = _nan_for_null(run["metrics"])
            if isinstance(run.get("sweep"), dict):
                run["sweep"] = {k: _nan_for_null(v) for k, v in run["sweep"].items()}
    return results


#: the largest magnitude a metric may have (its squares and sums stay finite)
_LARGEST_METRIC = 1e100


class _Shape:
    """The checks of :func:`check_results`: each names the file and the field."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, field: str, what: str, value: Any) -> ValueError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return ValueError(
            f"{self.file}: {field} must be {what}, got {shown} (not as feature-cloud writes "
            "it: edited by hand?)"
        )

    def mapping(self, value: Any, field: str) -> Dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def sequence(self, value: Any, field: str) -> List[Any]:
        if not isinstance(value, list):
            raise self.fail(field, "a list", value)
        return value

    def integer(self, value: Any, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, "an integer", value)
        return value

    def text(self, value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise self.fail(field, "a string", value)
        return value

    def number(self, value: Any, field: str) -> None:
        """A finite number of a sane size, or ``null`` / ``NaN`` (n/a: files written before
        12-05 wrote NaN)."""
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(field, "a number or null", value)
        if not abs(value) <= _LARGEST_METRIC and value == value:  # NaN: n/a
            raise self.fail(field, f"a finite number of magnitude <= {_LARGEST_METRIC:g}", value)


def check_results(results: Dict[str, Any], file: str) -> None:
    """``ValueError`` naming ``file`` and the field where a ``results.json`` (a demo's or an
    evaluation's) does not have the shape feature-cloud writes: the types of its sections, each
    run's seed, method, metrics and per-class values (one per identity of its seed's split),
    every run's seed in ``splits`` and method in ``methods``, each (seed, method) once. Checked
    when the file is read, before anything is rendered or written."""
    c = _Shape(file)
    c.mapping(results["config"], "config")
    c.mapping(results["data"], "data")
    methods = c.sequence(results["methods"], "methods")
    if not methods:
        raise c.fail("methods", "a non-empty list of method names", methods)
    for i, m in enumerate(methods):
        c.text(m, f"methods[{i}]")
    evaluate = results.get("kind") == "evaluate"
    classes = None
    if evaluate:
        for key in ("samples", "num_classes"):
            c.integer(results["data"].get(key), f"data.{key}")
        classes = results["data"]["num_classes"]
    splits = c.mapping(results["splits"], "splits")
    sizes: Dict[str, int] = {}
    for seed, split in splits.items():
        where = f"splits[{seed!r}]"
        c.mapping(split, where)
        if "train_counts" in split:
            counts = c.sequence(split["train_counts"], f"{where}.train_counts")
            for j, v in enumerate(counts):
                c.integer(v, f"{where}.train_counts[{j}]")
            if classes is not None and len(counts) != classes:
                raise c.fail(
                    f"{where}.train_counts", f"{classes} counts (data.num_classes)", counts
                )
            sizes[seed] = len(counts)
            if "head" in split and len(c.sequence(split["head"], f"{where}.head")) != len(counts):
                raise c.fail(
                    f"{where}.head", f"{len(counts)} flags (one per identity)", split["head"]
                )
    if evaluate:
        c.text(results.get("setting"), "setting")
        cfg = results["config"]
        c.text(cfg.get("backbone"), "config.backbone")
        c.integer(cfg.get("epochs"), "config.epochs")
        for i, seed in enumerate(c.sequence(cfg.get("seeds"), "config.seeds")):
            c.integer(seed, f"config.seeds[{i}]")
        for key in ("labels", "baselines"):
            for m, v in c.mapping(
                results.get(key, {} if key == "baselines" else None), key
            ).items():
                c.text(v, f"{key}[{m!r}]")
        if not splits:
            raise c.fail("splits", "one split per seed", splits)
    seen = set()
    for i, run in enumerate(c.sequence(results["runs"], "runs")):
        where = f"runs[{i}]"
        c.mapping(run, where)
        seed = c.integer(run.get("seed"), f"{where}.seed")
        method = c.text(run.get("method"), f"{where}.method")
        if method not in methods:
            raise c.fail(f"{where}.method", f"one of methods {methods}", method)
        if (seed, method) in seen:
            raise ValueError(
                f"{file}: runs[{i}] is a second run of method {method!r} seed {seed}: each "
                "(seed, method) is run once (pool runs of other seeds with `report A B --out M`)"
            )
        seen.add((seed, method))
        if str(seed) not in splits:
            raise c.fail(f"{where}.seed", f"a seed of splits {sorted(splits, key=str)}", seed)
        for key, value in c.mapping(run.get("metrics"), f"{where}.metrics").items():
            c.number(value, f"{where}.metrics[{key!r}]")
        for kappa, values in c.mapping(run.get("sweep", {}), f"{where}.sweep").items():
            for key, value in c.mapping(values, f"{where}.sweep[{kappa!r}]").items():
                c.number(value, f"{where}.sweep[{kappa!r}][{key!r}]")
        size = sizes.get(str(seed))
        for key, values in c.mapping(run.get("per_class"), f"{where}.per_class").items():
            field = f"{where}.per_class[{key!r}]"
            c.sequence(values, field)
            if size is not None and len(values) != size:
                raise c.fail(field, f"{size} values (one per identity of seed {seed})", values)
            for j, value in enumerate(values):
                c.number(value, f"{field}[{j}]")


def refuse_no_runs(results: Dict[str, Any], path: str) -> None:
    """``ValueError`` where ``results`` (read from ``path``) holds no run: nothing to render."""
    if not results["runs"]:
        raise ValueError(f"{path}: its {RESULTS_FILE} holds no finished run: nothing to report")


def _fmt(stat: Tuple[float, float, int], scale: float, digits: int) -> str:
    mean, std, n = stat
    if math.isnan(mean):
        return "n/a"
    if n > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def _table(
    results: Dict[str, Any], columns: Sequence[Tuple[str, str, float]], digits: int
) -> List[List[str]]:
    agg = aggregate(results)
    rows = [["Method"] + [title for _, title, _ in columns]]
    for method in results["methods"]:
        if method not in agg:
            continue
        label = results.get("labels", {}).get(method, method)
        rows.append(
            [label]
            + [_fmt(agg[method][k], s, digits) if k in agg[method] else "–" for k, _, s in columns]
        )
    return rows


def _markdown(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def compact_table(results: Dict[str, Any]) -> str:
    """The main table as aligned plain text for the terminal."""
    rows = _table(results, MAIN_COLUMNS, 1)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ftl_stage0(cfg: Dict[str, Any]) -> str:
    """Where FTL's stage 0 ends: a share of the steps (``ftl_stage0_fraction``, recorded since
    that default) or, in files without it, the LEAP warm-up (the schedule of those releases)."""
    share = cfg.get("ftl_stage0_fraction")
    if share is None:
        return f"until epoch {cfg['warmup_epochs']}"
    return f"for the first {100 * share:g} % of the steps (to epoch {share * cfg['epochs']:g})"


def _describe(results: Dict[str, Any]) -> str:
    cfg = results["config"]
    data = results["data"]
    seeds = cfg["seeds"]
    split = results["splits"][str(seeds[0])]
    return (
        f"Data: **{data['name']}** ({data['samples']} samples, {data['num_classes']} identities), "
        f"long-tail split <H{cfg['num_head']}, S{cfg['tail_shots']}>: {split['head_classes']} head "
        f"identities keep all their training samples, {split['tail_classes']} tail identities keep "
        f"{cfg['tail_shots']} (train {split['train']} = {split['train_head']} head + "
        f"{split['train_tail']} tail samples; evaluated on the held-out **{cfg['eval_split']}** "
        f"split, {split[cfg['eval_split']]} samples). Seeds {seeds}: mean ± std (sample std over "
        f"seeds). Budget: {counted(cfg['epochs'], 'epoch')}, batch {cfg['batch_size']}, Adam lr {cfg['lr']} "
        f"(cosine decay), embedding {cfg['embedding_size']}-d; LEAP cloud from epoch "
        f"{cfg['warmup_epochs']}, P={cfg['memory_per_sample']}, T={cfg['tail_threshold']}, "
        f"gamma={cfg['gamma']}; m-L2 alpha={cfg['ml2_alpha']}; FTL: stage 0 {_ftl_stage0(cfg)}, "
        f"then {cfg.get('ftl_alternations', 'n/a')} (stage 1, stage 2) pairs. Wall time "
        f"{results.get('wall_seconds', 'n/a')} s."
    )


def results_markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the run description, the accuracy table and the diagnostics table."""
    return (
        "\n\n".join(
            [
                _describe(results),
                "Accuracy (%): FC = closed-set classifier (a LEAP head: against its inference "
                "prototypes), FC(W) = the same against the class weights, NN = nearest class center "
                "of the training features, rank-1 / mAP = leave-one-out cosine retrieval on the "
                "evaluation split.",
                _markdown(_table(results, MAIN_COLUMNS, 1)),
                "Diagnostics: angle (radians) between each feature and its class center, mean and "
                "variance per class averaged over head / tail classes, on the training and the "
                "evaluation features; classifier weight norm per class (cosine heads normalise W, so "
                "their norm does not enter the logits); cloud std = sqrt of the LEAP cloud variance "
                "(Eq. 6 / 9) each tail class received at the end of training.",
                _markdown(_table(results, DIAG_COLUMNS, 3)),
            ]
        )
        + "\n"
    )


def _write_csvs(results: Dict[str, Any], out: str) -> None:
    agg = aggregate(results)
    with open_text(os.path.join(out, "summary.csv"), newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "metric", "mean", "std", "n"])
        for method, stats in agg.items():
            for key, (mean, std, n) in stats.items():
                w.writerow(
                    [method, key, csv_cell(float(f"{mean:.6g}")), csv_cell(float(f"{std:.6g}")), n]
                )
    keys = list(dict.fromkeys(k for r in results["runs"] for k in r["metrics"]))
    with open_text(os.path.join(out, "runs.csv"), newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["seed", "method", "train_seconds"] + keys)
        for r in results["runs"]:
            w.writerow(
                [r["seed"], r["method"], r["train_seconds"]]
                + [csv_cell(r["metrics"].get(k)) for k in keys]
            )
    with open_text(os.path.join(out, "per_class.csv"), newline="") as fh:
        w = csv.writer(fh)
        pc_keys = list(dict.fromkeys(k for r in results["runs"] for k in r["per_class"]))
        w.writerow(["seed", "method", "class", "train_count", "head"] + pc_keys)
        for r in results["runs"]:
            split = results["splits"][str(r["seed"])]
            for c in range(len(split["train_counts"])):
                w.writerow(
                    [r["seed"], r["method"], c, split["train_counts"][c], int(split["head"][c])]
                    + [r["per_class"][k][c] if k in r["per_class"] else None for k in pc_keys]
                )


def render_report(path: str, log: Callable[[str], None] = print) -> Dict[str, str]:
    """Re-render ``results.md``, the CSV files and the PNG plots of the run in ``path``.

    Returns ``{artifact: file path}``.
    """
    results = load_results(path)
    out = path if os.path.isdir(path) else os.path.dirname(path)
    refuse_no_runs(results, path)
    check_writable(out or ".", "run folder")
    try:
        md = results_markdown(results)
    except (KeyError, IndexError, TypeError) as exc:  # a field inside the sections is missing
        raise ValueError(
            f"{path}: results.json lacks an entry the report needs ({exc!r}); was "
            "it written by a feature-cloud demo run?"
        ) from None
    files = {"results.md": os.path.join(out, "results.md")}
    with open_text(files["results.md"]) as fh:
        fh.write(md)
    _write_csvs(results, out)
    for name in ("summary.csv", "runs.csv", "per_class.csv"):
        files[name] = os.path.join(out, name)
    projection = None
    proj_file = os.path.join(out, PROJECTION_FILE)
    if os.path.isfile(proj_file):
        with np.load(proj_file) as npz:
            projection = {k: npz[k] for k in npz.files}
    try:
        files.update(plots.render_all(results, projection, out))
    except MissingExtra as exc:  # matplotlib is an optional extra
        log(f"(no plots: {exc})")
    log("")
    log(compact_table(results))
    log("")
    log(wrote_line(files, out))
    return files
