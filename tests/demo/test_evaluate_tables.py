"""What the report's tables say about the values behind a cell, from crafted ``results.json``
files (no training): ``(n=K)`` in every Markdown table, the counts in the CSV files, the
notes of ``combined.md`` (a statistics audit, s53)."""

import copy
import csv
import json
import math
import os

import pytest

from feature_cloud.evaluate.report import (
    PAIRED_KEYS,
    SUMMARY_KEYS,
    SWEEP_KEYS,
    combine_settings,
    compare_runs,
    paired_rows,
    render_evaluation,
    summary_rows,
    sweep_rows,
)

METHODS = ["cosface", "leap_full_cosface"]
SEEDS = [0, 1, 2]


def _metrics(seed, method):
    """Every metric of the closed-set tables, a value per seed and method (fractions)."""
    lift = 0.05 * (seed + 1) if method == "leap_full_cosface" else 0.0
    out = {k: 0.5 + 0.01 * seed + lift for k, _, s in SUMMARY_KEYS if s == 100.0}
    out.update({k: 0.1 + 0.01 * seed for k, _, s in SUMMARY_KEYS if s != 100.0})
    out["rank1_head"] = out["rank1_tail"]  # the accuracy plot's
    return out


def _results(setting="natural", shots=5, seeds=SEEDS, sweep=False):
    """A closed-set evaluation of ``METHODS`` over ``seeds``, as ``evaluate`` writes it."""
    classes = 4
    runs = []
    for seed in seeds:
        for m in METHODS:
            per_class = {"angle_var_train": [0.1] * classes, "weight_norm": [1.0] * classes}
            run = {"seed": seed, "method": m, "metrics": _metrics(seed, m), "per_class": per_class}
            if sweep and m == "leap_full_cosface":
                run["sweep"] = {
                    kappa: {k: 0.5 + 0.01 * seed + 0.02 * float(kappa) for k, _ in SWEEP_KEYS}
                    for kappa in ("0", "10")
                }
            run["environment"] = {"threads": 1, "device": "cpu"}
            runs.append(run)
    split = {"train_counts": [8, 8, 2, 2], "head": [True, True, False, False]}
    split.update(head_classes=2, tail_classes=2, train=20, test=8)
    return {
        "kind": "evaluate",
        "setting": setting,
        "config": {
            "protocol": "hs" if setting != "natural" else "natural",
            "n_test": 2,
            "threshold": 5,
            "num_head": 2,
            "shots": shots,
            "backbone": "conv4",
            "epochs": 1,
            "methods": list(METHODS),
            "seeds": list(seeds),
            "shrinkage_sweep": [0.0, 10.0] if sweep else [],
            "leap_options": {},
            "out": "x",
        },
        "data": {"name": "toy", "samples": 28, "num_classes": classes, "fingerprint": "f"},
        "splits": {str(s): dict(split) for s in seeds},
        "methods": list(METHODS),
        "labels": {"cosface": "CosFace", "leap_full_cosface": "LEAP full (CosFace)"},
        "baselines": {"leap_full_cosface": "cosface"},
        "runs": runs,
        "environment": {"threads": 1, "device": "cpu"},
        "complete": True,
    }


def _write(folder, results):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as fh:
        json.dump(results, fh)
    return str(folder)


def _na(results, method, seed, key, where="metrics", kappa=None):
    """Make one value n/a (``null``), as a seed without tail test images leaves it."""
    for r in results["runs"]:
        if r["method"] == method and r["seed"] == seed:
            (r[where] if kappa is None else r[where][kappa])[key] = None
    return results


def _csv(file):
    with open(file, newline="") as fh:
        return list(csv.DictReader(fh))


def test_compare_md_marks_a_cell_on_fewer_pairs(tmp_path):
    """``report A B --compare``: a Δ cell of 2 pairs in a row of 3 says ``(n=2)`` as
    ``paired.md`` does (it printed the mean alone; compare.json had n 2)."""
    a = _write(tmp_path / "a", _results())
    b = _write(tmp_path / "b", _na(_results(), "leap_full_cosface", 1, "fc_acc_tail"))
    cmp = compare_runs(a, b, out=str(tmp_path / "cmp"))
    assert cmp["differences"]["leap_full_cosface"]["fc_acc_tail"]["n"] == 2
    row = [ln for ln in (tmp_path / "cmp" / "compare.md").read_text().splitlines() if "LEAP" in ln][
        0
    ]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "3" and cells[4] == "0.0 ± 0.0 (n=2)", row
    assert cells[3] == "0.0 ± 0.0"  # a cell on every pair has no mark


def test_sweep_md_marks_a_cell_on_fewer_pairs():
    """``sweep.md``: a kappa's Δ cell resting on fewer pairs than the row's says ``(n=K)``."""
    res = _na(_results(sweep=True), "leap_full_cosface", 2, "fc_acc_tail", "sweep", "10")
    rows = sweep_rows(res)
    assert rows[0][:4] == ["Method", "vs", "kappa", "pairs"]
    by_kappa = {r[2]: r for r in rows[1:]}
    tail = rows[0].index("Δ FC tail")
    assert by_kappa["10"][3] == "3" and by_kappa["10"][tail].endswith(" (n=2)")
    assert "(n=" not in by_kappa["10"][tail - 1] and "(n=" not in by_kappa["0"][tail]
    numeric = sweep_rows(res, numeric=True)
    row = dict(zip(numeric[0], [r for r in numeric[1:] if r[2] == "10"][0]))
    assert row["Δ FC tail n"] == 2 and row["Δ FC head n"] == 3


def test_csv_files_carry_each_values_count(tmp_path):
    """summary.csv, paired.csv, sweep.csv and the combined CSVs end with a ``<title> n``
    column per metric: the seeds / pairs behind each value (the Markdown's ``(n=K)``), so an
    empty ci95 of one value (n 1) reads apart from an n/a one (n 0). The columns before them
    are those of earlier releases, in the same order."""
    res = _results(sweep=True)
    _na(res, "leap_full_cosface", 1, "fc_acc_tail")
    for seed in (1, 2):  # CosFace's rank-1 tail rests on seed 0 alone: no interval
        _na(res, "cosface", seed, "rank1_tail")
    run = _write(tmp_path / "run", res)
    render_evaluation(run, log=lambda line: None)
    summary = _csv(os.path.join(run, "summary.csv"))
    titles = [t for _, t, _ in SUMMARY_KEYS]
    with open(os.path.join(run, "summary.csv")) as fh:
        header = next(csv.reader(fh))
    before = ["Method", "seeds"] + [c for t in titles for c in (t, f"{t} ci95")]
    assert header == before + [f"{t} n" for t in titles]
    cos, leap = summary
    assert cos["rank-1 tail ci95"] == "" and cos["rank-1 tail n"] == "1"
    assert leap["FC tail n"] == "2" and leap["FC head n"] == "3"
    paired = _csv(os.path.join(run, "paired.csv"))[0]
    assert paired["pairs"] == "3" and paired["Δ FC tail n"] == "2"
    assert paired["Δ rank-1 tail n"] == "1" and paired["Δ rank-1 tail ci95"] == ""
    assert list(paired)[-1] == f"{PAIRED_KEYS[-1][1]} n"
    sweep = _csv(os.path.join(run, "sweep.csv"))
    assert [r["Δ FC tail n"] for r in sweep] == ["3", "3"]
    # the same values as the Markdown (numbers unchanged by the counts)
    md = dict(zip(paired_rows(res)[0], paired_rows(res)[1]))
    assert md["Δ FC tail"] == f"{float(paired['Δ FC tail']):.1f} ± " + (
        f"{float(paired['Δ FC tail ci95']):.1f} (n=2)"
    )


def test_combined_csvs_carry_the_counts(tmp_path):
    """``combined_summary.csv`` keeps the six accuracy columns (mean, ci95) and adds their
    six counts after them; ``combined_paired.csv`` and ``combined_sweep.csv`` every metric's."""
    subs = []
    for shots in (1, 2):
        res = _results(f"H2_S{shots}", shots, sweep=True)
        if shots == 2:
            _na(res, "leap_full_cosface", 0, "fc_acc_tail")
        subs.append(_write(tmp_path / f"H2_S{shots}", res))
    combine_settings(subs, str(tmp_path))
    with open(tmp_path / "combined_summary.csv") as fh:
        header = next(csv.reader(fh))
    acc = [t for _, t, _ in SUMMARY_KEYS[:6]]
    assert header == ["Setting", "Method", "seeds"] + [c for t in acc for c in (t, f"{t} ci95")] + [
        f"{t} n" for t in acc
    ]
    rows = _csv(tmp_path / "combined_summary.csv")
    assert [r["FC tail n"] for r in rows] == ["3", "3", "3", "2"]
    paired = _csv(tmp_path / "combined_paired.csv")
    assert [(r["Setting"], r["Δ FC tail n"]) for r in paired] == [("H2_S1", "3"), ("H2_S2", "2")]
    assert all(r["Δ FC head n"] == "3" for r in _csv(tmp_path / "combined_sweep.csv"))


def test_combined_md_says_a_setting_is_partial_and_environments_mixed(tmp_path):
    """``combined.md`` carries each setting's **Partial** note and its mixed-environments note
    (each setting's summary.md had them, the combined table, the one pasted, did not), and
    names settings trained in different environments."""
    full = _results("H2_S1", 1)
    partial = _results("H2_S2", 2)
    partial["runs"] = [r for r in partial["runs"] if r["seed"] != 2]
    partial["complete"] = False
    subs = [_write(tmp_path / "H2_S1", full), _write(tmp_path / "H2_S2", partial)]
    md = combine_settings(subs, str(tmp_path / "c1"))
    assert "**Partial**: setting H2_S2 stopped after 4 of 6 runs" in md
    assert md.count("Partial") == 1 and "environment" not in md
    assert (tmp_path / "c1" / "combined.md").read_text() == md

    mixed = copy.deepcopy(full)
    for r in mixed["runs"]:
        if r["seed"] == 0 and r["method"] == "cosface":
            r["environment"] = {"threads": 2, "device": "cpu"}
    other = _results("H2_S2", 2)
    for r in other["runs"]:
        r["environment"] = {"threads": 4, "device": "cpu"}
    subs = [_write(tmp_path / "m" / "H2_S1", mixed), _write(tmp_path / "m" / "H2_S2", other)]
    md = combine_settings(subs, str(tmp_path / "c2"))
    assert "Partial" not in md
    assert "**Note** (H2_S1): the runs were trained in more than one environment" in md
    assert "(threads 2 and 1): 1 of 3 paired (method, seed) differences" in md
    line = [ln for ln in md.splitlines() if "H2_S2" in ln and "environment" in ln]
    assert len(line) == 1 and "threads 4 (H2_S2) vs 2 and 1 (H2_S1)" in line[0], md


def test_one_seed_cells_and_na_cells_differ_in_the_csv(tmp_path):
    """A cell of one seed has a mean, an empty ci95 and n 1; an n/a cell no mean and n 0."""
    res = _results(seeds=[0])
    for m in METHODS:
        _na(res, m, 0, "rank1_tail")
    rows = summary_rows(res, numeric=True)
    row = dict(zip(rows[0], rows[1]))
    assert row["FC tail ci95"] == "" and row["FC tail n"] == 1
    assert not math.isnan(row["FC tail"])
    assert row["rank-1 tail"] == "" and row["rank-1 tail n"] == 0


@pytest.mark.parametrize("numeric", [False, True])
def test_paired_rows_cells_unchanged_by_the_counts(numeric):
    """The counts are added columns: every earlier cell keeps its value and place."""
    res = _results()
    rows = paired_rows(res, numeric=numeric)
    width = 3 + len(PAIRED_KEYS) * (2 if numeric else 1)
    assert len(rows[0]) == width + (len(PAIRED_KEYS) if numeric else 0)
    assert rows[1][:3] == ["LEAP full (CosFace)", "CosFace", "3"]
