"""The ``feature-cloud`` command end to end on tiny configurations, and report re-rendering."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from feature_cloud.cli import main
from feature_cloud.demo.data import SyntheticConfig, make_synthetic
from feature_cloud.demo.methods import METHODS, MethodConfig
from feature_cloud.demo.protocol import long_tail_split

PNGS = [
    "accuracy_head_tail.png",
    "angle_variance_vs_class_size.png",
    "angle_variance_test_vs_class_size.png",
    "weight_norm_vs_class_size.png",
    "feature_cloud_2d.png",
]
TINY = [
    "demo",
    "--data",
    "synthetic",
    "--synthetic-classes",
    "8",
    "--synthetic-max",
    "24",
    "--synthetic-min",
    "8",
    "-H",
    "2",
    "-S",
    "3",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--quiet",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "synthetic")
    assert main(TINY + ["--seeds", "0", "1", "--out", out]) == 0
    return out


def test_demo_writes_every_artifact(tiny_run):
    for name in [
        "results.json",
        "results.md",
        "summary.csv",
        "runs.csv",
        "per_class.csv",
        "projection.npz",
    ] + PNGS:
        path = os.path.join(tiny_run, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    with open(os.path.join(tiny_run, "results.json")) as fh:
        res = json.load(fh)
    assert res["methods"] == list(METHODS)
    assert len(res["runs"]) == 2 * len(METHODS)
    for run in res["runs"]:
        for key in (
            "fc_acc_head",
            "fc_acc_tail",
            "rank1_head",
            "rank1_tail",
            "map_head",
            "map_tail",
            "nn_acc_tail",
        ):
            assert 0.0 <= run["metrics"][key] <= 1.0, key
        assert len(run["per_class"]["weight_norm"]) == 8
    # the saved split is the protocol's split for that seed
    data = make_synthetic(SyntheticConfig(num_classes=8, max_per_class=24, min_per_class=8))
    for seed in (0, 1):
        split = long_tail_split(data.y, 8, 2, 3, test_fraction=0.3, val_fraction=0.1, seed=seed)
        saved = res["splits"][str(seed)]
        assert saved["train_counts"] == split.train_counts.tolist()
        assert saved["head"] == split.head.tolist()
        assert saved["test"] == split.test.numel()
    md = open(os.path.join(tiny_run, "results.md")).read()
    assert "<H2, S3>" in md and "LEAP full" in md and "±" in md
    # FTL's stage 0 as the methods run it (MethodConfig's share of the steps), not the LEAP
    # warm-up it used to be printed as; files without the share keep the warm-up's description
    assert res["config"]["ftl_stage0_fraction"] == MethodConfig.ftl_stage0_fraction == 0.7
    assert "FTL: stage 0 for the first 70 % of the steps (to epoch 1.4), then 1 (stage 1" in md
    from feature_cloud.demo.report import results_markdown

    older = dict(res, config={k: v for k, v in res["config"].items() if k != "ftl_stage0_fraction"})
    assert f"FTL: stage 0 until epoch {res['config']['warmup_epochs']}, then" in results_markdown(
        older
    )
    with open(os.path.join(tiny_run, "summary.csv")) as fh:
        rows = list(csv.DictReader(fh))
    one = [r for r in rows if r["method"] == "cosface" and r["metric"] == "fc_acc_tail"][0]
    vals = [r["metrics"]["fc_acc_tail"] for r in res["runs"] if r["method"] == "cosface"]
    assert float(one["mean"]) == pytest.approx(np.mean(vals), rel=1e-4)
    assert float(one["std"]) == pytest.approx(np.std(vals, ddof=1), rel=1e-4, abs=1e-9)
    with np.load(os.path.join(tiny_run, "projection.npz")) as npz:
        assert npz["classes"].size == 2 + 3  # 2 head + the 3 first-ranked tail classes
        assert npz["cosface/train_features"].shape[1] == 64


def test_demo_results_record_what_a_rerun_needs(tiny_run):
    """As evaluate's: the command line, the versions (numpy, timm, PML too), the package's git
    revision where it is a checkout, the platform and the torch flags that change numerics;
    the load average as before."""
    with open(os.path.join(tiny_run, "results.json")) as fh:
        res = json.load(fh)
    # the command line main() was given (not pytest's sys.argv, which the process has)
    assert res["argv"] == ["feature-cloud", *TINY, "--seeds", "0", "1", "--out", tiny_run]
    env = res["environment"]
    for key in ("feature_cloud", "git_revision", "torch", "numpy", "timm", "platform"):
        assert key in env, key
    assert env["numpy"] == np.__version__ and env["threads"] == 1 and env["device"] == "cpu"
    assert env["deterministic_algorithms"] is False and "cudnn_benchmark" in env
    assert "loadavg_start" in env and "loadavg_end" in env and "cpu_count" in env


def test_report_rerenders_identically(tiny_run, tmp_path):
    before = open(os.path.join(tiny_run, "results.md")).read()
    summary = open(os.path.join(tiny_run, "summary.csv")).read()
    for name in ["results.md", "summary.csv"] + PNGS:
        os.remove(os.path.join(tiny_run, name))
    # through ``python -m feature_cloud`` (the __main__ module)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "feature_cloud", "report", tiny_run],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "FC acc tail" in proc.stdout  # the compact table
    assert open(os.path.join(tiny_run, "results.md")).read() == before
    assert open(os.path.join(tiny_run, "summary.csv")).read() == summary
    for name in PNGS:
        with open(os.path.join(tiny_run, name), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_runs_are_reproducible(tiny_run, tmp_path):
    out = str(tmp_path / "again")
    assert main(TINY + ["--seeds", "0", "--methods", "cosface", "leap_full", "--out", out]) == 0
    with open(os.path.join(tiny_run, "results.json")) as fh:
        first = {(r["seed"], r["method"]): r["metrics"] for r in json.load(fh)["runs"]}
    with open(os.path.join(out, "results.json")) as fh:
        again = {(r["seed"], r["method"]): r["metrics"] for r in json.load(fh)["runs"]}
    for key, metrics in again.items():
        assert metrics == pytest.approx(first[key], nan_ok=True)


def test_digits_end_to_end(tmp_path):
    out = str(tmp_path / "digits")
    assert (
        main(
            [
                "demo",
                "--seeds",
                "0",
                "--epochs",
                "1",
                "--methods",
                "softmax",
                "leap_vanilla",
                "ftl",
                "--ftl-classifier",
                "cosface",
                "--quiet",
                "--out",
                out,
            ]
        )
        == 0
    )
    res = json.load(open(os.path.join(out, "results.json")))
    assert res["data"]["name"] == "digits" and res["config"]["num_head"] == 3
    assert res["splits"]["0"]["train_counts"].count(5) == 7
    assert res["config"]["ftl_classifier"] == "cosface"  # reaches the FTL method (demo: linear)


def test_cli_errors_are_clean(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "results.json" in capsys.readouterr().err
    assert main(["demo", "--data", "imagefolder", "--quiet"]) == 2
    assert "needs a PATH" in capsys.readouterr().err
    assert main(["demo", "--data", "digits", "--synthetic-classes", "5", "--quiet"]) == 2
    assert main(["demo", "--data", "nope", "--quiet"]) == 2
    assert main(["demo", "--seeds", "0", "0", "--quiet"]) == 2
    assert main(["demo", "--epochs", "3", "--warmup-epochs", "4", "--quiet"]) == 2
    with pytest.raises(SystemExit):
        main(["demo", "--methods", "magic"])
    with pytest.raises(SystemExit):
        main(["demo", "--ftl-classifier", "svm"])


def test_every_option_is_explained_in_help(capsys):
    """``feature-cloud <command> --help``: every option has a help text, its default is shown
    once (argparse's, or the help's own words), never as ``None``, and no format escape leaks
    into the text."""
    import argparse

    from feature_cloud.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
            shown = (formatter._get_help_string(action) or "").replace("%(default)s", "")
            assert shown.count("(default") <= 1, (name, action.option_strings, shown)
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert "%%" not in text and "%(" not in text and "(default: None)" not in text, name


def test_tables_show_the_weights_accuracy_beside_the_prototypes(tiny_run):
    """results.md and the printed table carry ``FC(W)`` (the FC against the class weights) as
    ``evaluate`` does: a LEAP head's FC is against its prototypes, which can cost the head much
    on a short run (digits, 2 epochs: head 0.0 against 72.1 on the weights) with nothing in the
    tables to say so."""
    from feature_cloud.demo.report import aggregate, compact_table, load_results

    results = load_results(tiny_run)
    agg = aggregate(results)
    text = open(os.path.join(tiny_run, "results.md")).read()
    accuracy = text.split("Diagnostics:")[0]  # the accuracy table, not the diagnostics'
    lines = [ln for ln in accuracy.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    assert header[:5] == ["Method", "FC acc head", "FC acc tail", "FC(W) head", "FC(W) tail"]
    leap = [ln for ln in lines if ln.startswith("| LEAP full (CosFace) |")]
    assert len(leap) == 1
    cells = [c.strip() for c in leap[0].strip().strip("|").split("|")]
    for column, key in ((3, "fcw_acc_head"), (4, "fcw_acc_tail")):
        mean = agg["leap_full"][key][0]
        assert cells[column].startswith(f"{100 * mean:.1f} ±"), (cells, key, mean)
    assert "FC(W) head" in compact_table(results)
