"""feature-cloud evaluate: protocols, paired statistics, camera retrieval and the CLI end to end
on tiny synthetic image arrays (no real data)."""

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from feature_cloud.evaluate import hs_split, natural_split, paired_differences, t_interval
from feature_cloud.evaluate.data import load_npz
from feature_cloud.evaluate.runner import camera_retrieval
from feature_cloud.evaluate.stats import t_quantile


def _labels(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def test_natural_split_n_test_per_identity_and_head_by_threshold():
    y = _labels([30, 12, 5, 3, 2])
    s = natural_split(y, 5, n_test=2, threshold=10, seed=0)
    assert torch.bincount(y[s.test], minlength=5).tolist() == [2, 2, 2, 2, 0]  # class 4: too small
    assert s.train_counts.tolist() == [28, 10, 3, 1, 0]
    assert s.head.tolist() == [True, False, False, False, False]
    assert not set(s.train.tolist()) & set(s.test.tolist())


def test_hs_split_keeps_s_for_tail_and_same_test_set():
    y = _labels([30, 20, 9, 7, 4])
    s = hs_split(y, 5, num_head=2, shots=3, n_test=2, seed=1)
    n = natural_split(y, 5, n_test=2, seed=1)
    assert s.train_counts.tolist() == [28, 18, 3, 3, 2]
    assert s.head.tolist() == [True, True, False, False, False]
    assert torch.equal(s.test, n.test)
    assert set(s.train.tolist()) <= set(n.train.tolist())


def test_hs_split_identities_left_out_are_neither_head_nor_tail():
    """An identity with --n-test or fewer images has no training or test image: it was marked
    head once H reached it (the last in size order), counted in the head and in the -H hint."""
    y = _labels([30, 20, 9, 2, 1])  # n_test 2: identities 3 and 4 are left out
    for h in (3, 4, 5):
        s = hs_split(y, 5, num_head=h, shots=3, n_test=2, seed=0)
        assert s.head.tolist() == [True, True, True, False, False], h
        assert (s.summary()["head_classes"], s.summary()["tail_classes"], s.num_head) == (3, 0, 3)
        assert s.train_counts.tolist() == [28, 18, 7, 0, 0]
    s = hs_split(y, 5, num_head=2, shots=3, n_test=2, seed=0)
    assert s.head.tolist() == [True, True, False, False, False] and s.num_head == 2
    assert (s.summary()["head_classes"], s.summary()["tail_classes"]) == (2, 1)


def test_t_interval_and_paired_differences():
    assert t_quantile(2) == pytest.approx(4.302653)
    # scipy.stats.t.ppf(0.975, df) to 1e-5 at every df (a 3-decimal table was off by 4.7e-4)
    exact = {1: 12.706205, 7: 2.364624, 26: 2.055529, 30: 2.042272, 31: 2.039513, 45: 2.014103}
    exact.update({60: 2.000298, 61: 1.999624, 100: 1.983972, 1000: 1.962339})
    for df, want in exact.items():
        assert t_quantile(df) == pytest.approx(want, abs=2e-5), df
    assert t_quantile(1000) == pytest.approx(1.9623, abs=2e-3)
    mean, half, n = t_interval([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3))
    runs = [
        {"seed": s, "method": m, "metrics": {"acc": v}}
        for s, m, v in [(0, "a", 0.5), (0, "b", 0.6), (1, "a", 0.4), (1, "b", 0.6), (2, "b", 0.9)]
    ]  # seed 2 has no pair: left out
    d = paired_differences(runs, "b", "a", ["acc"])["acc"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.15)
    assert d["ci95"] == pytest.approx(12.706205 * math.sqrt(0.005) / math.sqrt(2))


def test_camera_retrieval_ignores_same_camera_matches():
    f = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    y = torch.tensor([0, 0, 1, 1])
    same_cam = torch.tensor([0, 0, 0, 1])
    r1, ap, valid = camera_retrieval(f, y, same_cam)
    # queries 0 and 1 share identity AND camera: no valid match
    assert valid.tolist() == [False, False, True, True]
    assert r1[2:].tolist() == [1.0, 1.0]


def _tiny_npz(path, camids=False):
    rng = np.random.RandomState(0)
    sizes = [16, 12, 4, 4, 3, 3]
    y = np.repeat(np.arange(len(sizes)), sizes)
    proto = rng.randint(0, 255, size=(len(sizes), 12, 12, 3))
    imgs = np.clip(proto[y] + rng.randint(-30, 30, size=(y.size, 12, 12, 3)), 0, 255).astype(
        np.uint8
    )
    extra = {"camids": (np.arange(y.size) % 2)} if camids else {}
    np.savez(path, images=imgs, labels=y, **extra)


def test_load_npz(tmp_path):
    p = str(tmp_path / "d.npz")
    _tiny_npz(p, camids=True)
    d = load_npz(p, (8, 8))
    assert d.x.shape == (42, 3, 8, 8) and float(d.x.max()) <= 1.0
    assert d.num_classes == 6 and d.camids.shape == (42,)
    np.savez(str(tmp_path / "bad.npz"), pictures=np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="images"):
        load_npz(str(tmp_path / "bad.npz"))


@pytest.mark.slow
def test_cli_evaluate_end_to_end(tmp_path):
    """The subcommand in a fresh process: two <H, S> settings, LEAP and FTL with their baselines
    added automatically, paired tables and plots written."""
    p = str(tmp_path / "d.npz")
    _tiny_npz(p, camids=True)
    out = str(tmp_path / "out")
    cmd = [
        sys.executable,
        "-m",
        "feature_cloud",
        "evaluate",
        p,
        "--protocol",
        "hs",
        "-H",
        "2",
        "-S",
        "1",
        "2",
        "--methods",
        "leap_full_cosface",
        "ftl",
        "--seeds",
        "0",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--embedding-size",
        "8",
        "--quiet",
        "-T",
        "3",
        "--leap-option",
        "center_rate=adaptive",
        "--ftl-classifier",
        "linear",
        "--out",
        out,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for sub in ("H2_S1", "H2_S2"):
        with open(os.path.join(out, sub, "results.json")) as fh:
            r = json.load(fh)
        assert r["methods"] == ["cosface", "leap_full_cosface", "ftl_base", "ftl"]
        assert r["baselines"] == {"leap_full_cosface": "cosface", "ftl": "ftl_base"}
        assert len(r["runs"]) == 8
        assert r["config"]["ftl_classifier"] == "linear"  # the paper's FC (default: cosface)
        for f in (
            "summary.md",
            "paired.csv",
            "paired.json",
            "runs.csv",
            "paired.png",
            "angle_variance_vs_class_size.png",
            "weight_norm_vs_class_size.png",
        ):
            assert os.path.isfile(os.path.join(out, sub, f)), f
        with open(os.path.join(out, sub, "paired.json")) as fh:
            pj = json.load(fh)
        assert pj["ftl"]["fc_acc_tail"]["n"] == 2
        # FC against the class weights as well: the same as FC except for the LEAP head, which
        # classifies with its prototypes (the weights shrunk towards its centers)
        assert "fcw_acc_tail" in pj["leap_full_cosface"]
        for run in r["runs"]:
            m = run["metrics"]
            if run["method"] != "leap_full_cosface":
                assert m["fcw_acc_tail"] == m["fc_acc_tail"], run["method"]
                assert m["fcw_acc_head"] == m["fc_acc_head"], run["method"]
            # a head test image given to a tail class is a head error (and the reverse)
            assert 0.0 <= m["fc_cross_head"] <= 1.0 - m["fc_acc_head"] + 1e-9, run["method"]
            assert 0.0 <= m["fc_cross_tail"] <= 1.0 - m["fc_acc_tail"] + 1e-9, run["method"]
    with open(os.path.join(out, "combined.md")) as fh:
        text = fh.read()
    assert "H2_S1" in text and "H2_S2" in text and "Δ FC tail" in text and "Δ FC(W) tail" in text
    assert "Δ FC head→tail" in text and "Δ FC tail→head" in text
    # the CSV files hold numbers (a column for the mean, one for the half-width), read back equal
    # to paired.json and to the Markdown's rounded cells
    with open(os.path.join(out, "H2_S2", "paired.json")) as fh:
        pj = json.load(fh)
    with open(os.path.join(out, "H2_S2", "paired.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["Method"] for r in rows] == ["LEAP full (CosFace)", "FTL"]
    with open(os.path.join(out, "combined_paired.csv")) as fh:
        comb = [r for r in csv.DictReader(fh) if r["Setting"] == "H2_S2"]
    assert comb == [{"Setting": "H2_S2", **r} for r in rows]
    for row, method in zip(rows, ("leap_full_cosface", "ftl")):
        for key, title in (("fc_acc_tail", "Δ FC tail"), ("fc_cross_head", "Δ FC head→tail")):
            want = pj[method][key]
            assert float(row[title]) == pytest.approx(want["mean"], abs=1e-4), (method, key)
            assert float(row[f"{title} ci95"]) == pytest.approx(want["ci95"], abs=1e-4)
        assert int(row["pairs"]) == 2
    with open(os.path.join(out, "H2_S2", "summary.csv")) as fh:
        summary = list(csv.DictReader(fh))
    with open(os.path.join(out, "H2_S2", "summary.md")) as fh:
        md = fh.read()
    for row in summary:
        cell = f"{float(row['FC tail']):.1f} ± {float(row['FC tail ci95']):.1f}"
        assert f"| {row['Method']} | 2 | {float(row['FC head']):.1f} ± " in md
        assert cell in md, cell
        assert 0.0 <= float(row["FC tail"]) <= 100.0 and float(row["‖W‖ tail ci95"]) >= 0.0
    with open(os.path.join(out, "combined_summary.csv")) as fh:
        header = next(csv.reader(fh))
    assert header[:5] == ["Setting", "Method", "seeds", "FC head", "FC head ci95"]
    # the six accuracies' mean and ci95, then their counts (columns added at the end, s53)
    assert header[2 + 2 * 6] == "FC tail→head ci95" and header[-1] == "FC tail→head n"
    assert len(header) == 3 + 3 * 6
    # report re-renders an evaluation, and the --out of several settings with its combined table
    for report in ([os.path.join(out, "H2_S1"), "--quiet"], [out]):
        if report == [out]:
            os.remove(os.path.join(out, "combined.md"))
            os.remove(os.path.join(out, "H2_S2", "paired.md"))
        res = subprocess.run(
            [sys.executable, "-m", "feature_cloud", "report", *report],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-2000:]
    assert "wrote combined.md and combined_*.csv of 2 settings" in res.stdout
    with open(os.path.join(out, "combined.md")) as fh:
        assert fh.read() == text  # the same combined table as the evaluation wrote
    assert os.path.isfile(os.path.join(out, "H2_S2", "paired.md"))


def test_cli_evaluate_ftl_prototypes_option_and_default(tmp_path):
    """``--ftl-prototype-shrinkage 10``: FTL (cosine FC) scores against its inference prototypes,
    its baseline against plain weights; the default (none) uses the weights (FC = FC(W)). Both
    settings train the same networks, so FC(W) agrees between the two runs."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--methods", "ftl", "--seeds", "0", "--epochs", "3", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1"]
    runs = {}
    for tag, extra in (("proto", ["--ftl-prototype-shrinkage", "10"]), ("none", [])):
        out = str(tmp_path / tag)
        assert main(["evaluate", p, *common, *extra, "--out", out]) == 0
        with open(os.path.join(out, "results.json")) as fh:
            r = json.load(fh)
        assert r["config"]["ftl_prototype_shrinkage"] == (10.0 if tag == "proto" else None)
        runs[tag] = {run["method"]: run["metrics"] for run in r["runs"]}
    for tag in runs:
        base = runs[tag]["ftl_base"]
        assert base["fcw_acc_tail"] == base["fc_acc_tail"]
    plain, proto = runs["none"]["ftl"], runs["proto"]["ftl"]
    assert plain["fcw_acc_tail"] == plain["fc_acc_tail"]
    for key in ("fcw_acc_tail", "fcw_acc_head", "nn_acc_tail"):
        assert proto[key] == plain[key], key  # the same training, the same features
    assert runs["proto"]["ftl_base"] == runs["none"]["ftl_base"]


def test_cli_evaluate_ftl_joint_schedule_keeps_the_baseline(tmp_path):
    """``--ftl-schedule joint`` / ``retrain`` reach FTL (recorded in the configuration, other FTL metrics than
    Algorithm 1's) and leaves its no-transfer baseline bit-identical: the baseline never runs
    FTL's schedule."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--methods", "ftl", "--seeds", "0", "--epochs", "3", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1"]
    runs = {}
    for schedule in ("joint", "alternating", "retrain"):
        out = str(tmp_path / schedule)
        assert main(["evaluate", p, *common, "--ftl-schedule", schedule, "--out", out]) == 0
        with open(os.path.join(out, "results.json")) as fh:
            r = json.load(fh)
        assert r["config"]["ftl_schedule"] == schedule
        runs[schedule] = {run["method"]: run["metrics"] for run in r["runs"]}
    assert runs["joint"]["ftl_base"] == runs["alternating"]["ftl_base"]
    assert runs["joint"]["ftl"] != runs["alternating"]["ftl"]
    assert runs["retrain"]["ftl_base"] == runs["alternating"]["ftl_base"]
    assert runs["retrain"]["ftl"] not in (runs["alternating"]["ftl"], runs["joint"]["ftl"])


def test_cli_evaluate_ftl_stage1_fc_reaches_ftl_and_resume_checks_it(tmp_path, capsys):
    """``--ftl-stage1-fc tail``: recorded, other FTL metrics than the default's, the baseline
    bit-identical; ``--resume`` with the other value is refused; a results file without the field
    (an earlier release) counts as ``all``; ``tail`` with ``--ftl-schedule joint`` is refused."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--methods", "ftl", "--seeds", "0", "--epochs", "3", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1"]
    runs = {}
    for tag, extra in (("tail", ["--ftl-stage1-fc", "tail"]), ("all", [])):
        assert main(["evaluate", p, *common, *extra, "--out", str(tmp_path / tag)]) == 0
        with open(tmp_path / tag / "results.json") as fh:
            r = json.load(fh)
        assert r["config"]["ftl_stage1_fc"] == tag
        runs[tag] = {run["method"]: run["metrics"] for run in r["runs"]}
    assert runs["tail"]["ftl_base"] == runs["all"]["ftl_base"]
    assert runs["tail"]["ftl"] != runs["all"]["ftl"]
    capsys.readouterr()
    assert main(["evaluate", p, *common, "--out", str(tmp_path / "tail"), "--resume"]) == 2
    assert "ftl_stage1_fc: ('tail', 'all')" in capsys.readouterr().err
    path = tmp_path / "all" / "results.json"
    r = json.loads(path.read_text())
    r["config"].pop("ftl_stage1_fc")
    path.write_text(json.dumps(r))
    args = [*common, "--ftl-stage1-fc", "tail", "--out", str(tmp_path / "all"), "--resume"]
    assert main(["evaluate", p, *args]) == 2
    assert "ftl_stage1_fc: ('all', 'tail')" in capsys.readouterr().err
    joint = ["--ftl-stage1-fc", "tail", "--ftl-schedule", "joint"]
    assert main(["evaluate", p, *common, *joint, "--out", str(tmp_path / "bad")]) == 2
    # --ftl-stage1-filter: recorded (absent in an old file = "trained"), refused with joint
    fixed = ["--ftl-stage1-filter", "fixed", "--ftl-schedule", "retrain"]
    assert main(["evaluate", p, *common, *fixed, "--out", str(tmp_path / "fixed")]) == 0
    r = json.loads((tmp_path / "fixed" / "results.json").read_text())
    assert r["config"]["ftl_stage1_filter"] == "fixed"
    joint = ["--ftl-stage1-filter", "fixed", "--ftl-schedule", "joint"]
    assert main(["evaluate", p, *common, *joint, "--out", str(tmp_path / "bad")]) == 2
    nothing = ["--ftl-stage1-fc", "none", "--ftl-stage1-filter", "fixed"]
    capsys.readouterr()
    assert main(["evaluate", p, *common, *nothing, "--out", str(tmp_path / "bad")]) == 2
    assert "nothing to train in stage 1" in capsys.readouterr().err


def test_cli_evaluate_ftl_stage1_share_reaches_ftl_and_resume_checks_it(
    tmp_path, capsys, monkeypatch
):
    """``--ftl-stage1-share 0.75``: recorded in the configuration, other FTL metrics than the
    default's, the no-transfer baseline bit-identical; ``--resume`` with another share is refused
    before anything trains; a results file without the field (an earlier release) counts as 0.5;
    a share other than 0.5 with ``--ftl-schedule joint`` / ``retrain`` or outside (0, 1) is
    refused."""
    import feature_cloud.evaluate.runner as R
    from feature_cloud.cli import main
    from feature_cloud.evaluate.runner import EvalConfig

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--methods", "ftl", "--seeds", "0", "--epochs", "3", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1"]
    runs, files = {}, {}
    for tag, extra in (("share", ["--ftl-stage1-share", "0.75"]), ("default", [])):
        out = str(tmp_path / tag)
        assert main(["evaluate", p, *common, *extra, "--out", out]) == 0
        files[tag] = os.path.join(out, "results.json")
        with open(files[tag]) as fh:
            r = json.load(fh)
        assert r["config"]["ftl_stage1_share"] == (0.75 if tag == "share" else 0.5)
        runs[tag] = {run["method"]: run["metrics"] for run in r["runs"]}
    assert runs["share"]["ftl_base"] == runs["default"]["ftl_base"]
    assert runs["share"]["ftl"] != runs["default"]["ftl"]

    monkeypatch.setattr(R, "train_model", lambda *a, **k: pytest.fail("trained"))
    out = str(tmp_path / "share")
    with open(files["share"]) as fh:
        before = fh.read()
    capsys.readouterr()
    assert main(["evaluate", p, *common, "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "ftl_stage1_share: (0.75, 0.5)" in err
    with open(files["share"]) as fh:
        assert fh.read() == before
    assert (
        main(["evaluate", p, *common, "--ftl-stage1-share", "0.75", "--out", out, "--resume"]) == 0
    )

    # a results file of a release before the option: equal stages
    out = str(tmp_path / "default")
    with open(files["default"]) as fh:
        r = json.load(fh)
    r["config"].pop("ftl_stage1_share")
    with open(files["default"], "w") as fh:
        json.dump(r, fh)
    assert main(["evaluate", p, *common, "--out", out, "--resume"]) == 0
    with open(files["default"], "w") as fh:  # the resume rewrote it with the field
        json.dump(r, fh)
    capsys.readouterr()
    assert (
        main(["evaluate", p, *common, "--ftl-stage1-share", "0.75", "--out", out, "--resume"]) == 2
    )
    assert "ftl_stage1_share: (0.5, 0.75)" in capsys.readouterr().err

    for bad in (["--ftl-stage1-share", "0"], ["--ftl-stage1-share", "1"]):
        assert main(["evaluate", p, *common, *bad, "--out", str(tmp_path / "bad")]) == 2
    for schedule in ("joint", "retrain"):
        extra = ["--ftl-schedule", schedule, "--ftl-stage1-share", "0.7"]
        assert main(["evaluate", p, *common, *extra, "--out", str(tmp_path / "bad")]) == 2
        with pytest.raises(ValueError, match="only applies to ftl_schedule='alternating'"):
            EvalConfig(ftl_schedule=schedule, ftl_stage1_share=0.7).validate()
    assert not os.path.exists(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="ftl_stage1_share must be in"):
        EvalConfig(ftl_stage1_share=1.0).validate()
    assert EvalConfig().ftl_stage1_share == 0.5  # the paper's equal stages


def test_cli_evaluate_device_is_recorded_and_resume_keeps_it(tmp_path, capsys):
    """``--device``: recorded in the configuration, the environment and every run; not part of
    the setting for pooling, but ``--resume`` on another device is refused (a seed's method and
    baseline share a device); a device that is not there is refused before anything trains."""
    from feature_cloud.cli import main
    from feature_cloud.evaluate.runner import EvalConfig

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    out = str(tmp_path / "run")
    common = ["--methods", "cosface", "--seeds", "0", "--epochs", "1", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1", "--out", out]
    assert main(["evaluate", p, *common, "--device", "cpu"]) == 0
    file = os.path.join(out, "results.json")
    with open(file) as fh:
        r = json.load(fh)
    assert r["config"]["device"] == "cpu" and r["environment"]["device"] == "cpu"
    assert [run["device"] for run in r["runs"]] == ["cpu"]
    import feature_cloud

    assert r["environment"]["feature_cloud"] == feature_cloud.__version__  # which release ran
    r["config"]["device"] = "cuda:3"  # as if trained on a GPU
    with open(file, "w") as fh:
        json.dump(r, fh)
    assert main(["evaluate", p, *common, "--resume"]) == 2
    assert "trained on device 'cuda:3'" in capsys.readouterr().err
    r["config"].pop("device")  # a release before --device: the CPU
    with open(file, "w") as fh:
        json.dump(r, fh)
    assert main(["evaluate", p, *common, "--resume"]) == 0
    assert main(["evaluate", p, *common[:-2], "--device", "tpu0", "--out", out + "x"]) == 2
    assert not os.path.exists(out + "x")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            EvalConfig(device="cuda").validate()
    # a device type this torch build has no backend for (a Mac user's "mps" on Linux), or "meta":
    # one error line before anything is written, not a traceback after the output folder exists
    unusable = ["meta"] + ([] if torch.backends.mps.is_available() else ["mps"])
    for device in unusable:
        capsys.readouterr()
        args = ["evaluate", p, *common[:-2], "--device", device, "--out", out + device]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("feature-cloud: error: device") and device in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert not os.path.exists(out + device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cli_evaluate_on_cuda_matches_the_cpu(tmp_path):
    """The LEAP and FTL methods and their baselines train and embed on the GPU (FTL's own
    schedule, UpdateStats and transfer included) and reach the CPU's accuracies up to rounding:
    with TF32 off (cuDNN convolutions use it by default), at most one test image of a split may
    change its prediction (float sums in another order can flip a near tie)."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    rng = np.random.RandomState(0)
    sizes = [14, 12, 12, 5, 5, 4, 4, 4]
    y = np.repeat(np.arange(len(sizes)), sizes)
    proto = rng.randint(0, 255, size=(len(sizes), 12, 12, 3))
    noise = rng.randint(-30, 30, size=(y.size, 12, 12, 3))
    np.savez(p, images=np.clip(proto[y] + noise, 0, 255).astype(np.uint8), labels=y)
    n_test = 2  # head: 3 identities x 2 test images; tail: 5 x 2
    common = ["--methods", "leap_full_cosface", "ftl", "--seeds", "0", "--epochs", "3"]
    common += ["--batch-size", "8", "--embedding-size", "8", "-T", "6", "--quiet"]
    common += ["--n-test", str(n_test)]
    metrics = {}
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for device in ("cpu", "cuda"):
            out = str(tmp_path / device)
            assert main(["evaluate", p, *common, "--device", device, "--out", out]) == 0
            with open(os.path.join(out, "results.json")) as fh:
                r = json.load(fh)
            assert r["complete"] and r["environment"]["device"].startswith(device)
            metrics[device] = {run["method"]: run["metrics"] for run in r["runs"]}
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert set(metrics["cuda"]) == {"leap_full_cosface", "cosface", "ftl", "ftl_base"}
    one_image = {"head": 1 / (3 * n_test), "tail": 1 / (5 * n_test)}
    off = {}
    for method, m in metrics["cuda"].items():
        for key in ("fc_acc_head", "fc_acc_tail", "nn_acc_head", "nn_acc_tail"):
            diff = abs(m[key] - metrics["cpu"][method][key])
            if not math.isfinite(m[key]) or diff > one_image[key[-4:]] + 1e-9:
                off[(method, key)] = (metrics["cpu"][method][key], m[key])
    assert not off, f"CPU vs CUDA accuracies differ by more than one test image: {off}"


def test_cli_evaluate_rejects_bad_arguments(tmp_path):
    from feature_cloud.cli import main
    from feature_cloud.evaluate.runner import EvalConfig

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    assert main(["evaluate", p, "--protocol", "hs", "-S", "0", "--quiet"]) == 2
    assert main(["evaluate", str(tmp_path / "missing.npz"), "--quiet"]) == 2
    assert main(["evaluate", p, "--leap-option", "nokey", "--quiet"]) == 2
    assert main(["evaluate", p, "--ftl-stage0-fraction", "1.0", "--quiet"]) == 2
    assert main(["evaluate", p, "--ftl-prototype-shrinkage", "-1", "--quiet"]) == 2
    assert main(["evaluate", p, "--imprint-fraction", "1.0", "--quiet"]) == 2
    assert main(["evaluate", p, "--ftl-energy", "0", "--quiet"]) == 2
    with pytest.raises(ValueError, match="ftl_energy"):
        EvalConfig(ftl_energy=1.01).validate()
    with pytest.raises(SystemExit):  # argparse choices
        main(["evaluate", p, "--ftl-classifier", "svm", "--quiet"])
    with pytest.raises(ValueError, match="ftl_classifier"):
        EvalConfig(ftl_classifier="svm").validate()
    with pytest.raises(SystemExit):
        main(["evaluate", p, "--ftl-tail-sampling", "uniform", "--quiet"])
    with pytest.raises(ValueError, match="ftl_tail_sampling"):
        EvalConfig(ftl_tail_sampling="uniform").validate()
    with pytest.raises(SystemExit):
        main(["evaluate", p, "--ftl-schedule", "paired", "--quiet"])
    with pytest.raises(ValueError, match="ftl_schedule"):
        EvalConfig(ftl_schedule="paired").validate()
    assert EvalConfig().ftl_schedule == "alternating"  # Algorithm 1
    assert EvalConfig().ftl_classifier == "cosface"  # real faces (README): the evaluate default
    assert EvalConfig().ftl_prototype_shrinkage is None  # off: head cost at S = 1-3 (README)


def test_backbones_conv4_and_timm_without_download():
    from feature_cloud.evaluate import build_backbone

    pytest.importorskip("timm")
    x = torch.randn(2, 3, 32, 32)
    for name in ("conv4", "timm:resnet18"):
        net = build_backbone(name, (3, 32, 32), 16)
        assert net(x).shape == (2, 16)
    with pytest.raises(ValueError, match="backbone"):
        build_backbone("vgg", (3, 32, 32), 16)


def test_leap_screen_script_pairs_variants_with_the_cloud_off_baseline(tmp_path, capsys):
    """benchmarks/leap_screen.py (the exploration behind the LEAP defaults) on a tiny set: one
    JSON line per run, the baseline is deterministic per seed and the summary pairs by seed."""
    from benchmarks import leap_screen

    data = str(tmp_path / "d.npz")
    _tiny_npz(data)
    out = str(tmp_path / "s.jsonl")
    args = [data, "--epochs", "1", "--size", "12", "--seeds", "0", "1", "--out", out]
    variants = [
        "base:none",
        "margin2:full:cloud_mode=margin,cloud_scale=2,cfg.batch_size=8",
        "hyb:hybrid",
    ]
    leap_screen.main([*args, "--variants", *variants])
    leap_screen.main([*args, "--seeds", "0", "--out", out + "2", "--variants", "base:none"])
    rows = [json.loads(line) for line in open(out)]
    assert [(r["seed"], r["variant"]) for r in rows] == [
        (0, "base"),
        (0, "margin2"),
        (0, "hyb"),
        (1, "base"),
        (1, "margin2"),
        (1, "hyb"),
    ]
    again = json.loads(open(out + "2").read())
    assert again["fc_acc_tail"] == rows[0]["fc_acc_tail"]  # same seed, same baseline
    table = leap_screen.summary([out])
    assert "| natural | 1 | margin2 | 2 |" in table
    row = next(line for line in table.splitlines() if "| margin2 |" in line).split("|")
    assert "Δ FC(W) tail" in table and "nan" not in row[7]  # FC(W) tail of the rows' metrics
    capsys.readouterr()
    leap_screen.main(["--summary", out])
    assert "margin2" in capsys.readouterr().out


def test_leap_screen_experimental_rules_are_scoped_and_compute_their_clouds():
    """The not-adopted cloud rules of the screening script: hybrid = vanilla on tail classes and
    full on head classes; the angular-mean shifts; E|alpha|; the package is restored on exit."""
    import math

    import feature_cloud.functional as FC
    from benchmarks import leap_screen
    from feature_cloud.statistics import ClassStatistics

    counts = [40, 30, 4, 3, 5]
    stats = ClassStatistics(5, 8, class_counts=counts, tail_threshold=20)
    gen = torch.Generator().manual_seed(0)
    spread = torch.tensor([1.0, 1.5, 0.3, 0.2, 0.4])
    for _ in range(60):
        y = torch.randint(0, 5, (32,), generator=gen)
        f = torch.randn(32, 8, generator=gen) * spread[y, None] + 3 * torch.eye(8)[y]
        stats.update(f, y)
    mu, var, has = stats.angle_moments()
    assert bool(has.all())
    head = torch.tensor(counts) > 20
    full = stats.cloud_variance()  # the package's rule (full)
    original = ClassStatistics.cloud_variance, FC.target_cloud_angles
    with leap_screen.experimental_rule("hybrid"):
        hybrid = stats.cloud_variance()
        assert FC.target_cloud_angles is original[1]
    vanilla = FC.vanilla_cloud_variance(var, has, stats.class_counts, 20)
    assert torch.equal(hybrid[head], full[head]) and torch.equal(hybrid[~head], vanilla[~head])
    assert float(vanilla[~head].max()) > 0 and not torch.equal(hybrid, full)
    with leap_screen.experimental_rule("mean_head"):
        shift = stats.cloud_variance().sqrt()
        assert torch.equal(FC.target_cloud_angles(shift, "margin"), shift)
    ref = mu[head].mean()
    assert torch.all(shift[head] == 0)
    torch.testing.assert_close(shift[~head], (ref - mu[~head]).clamp_min(0))
    with leap_screen.experimental_rule("mean_pooled"):
        pooled = stats.cloud_variance().sqrt()
    w = torch.tensor(counts, dtype=torch.float32) - 1
    torch.testing.assert_close(pooled, ((w * mu).sum() / w.sum() - mu).clamp_min(0))
    std = torch.tensor([0.1, 0.2])
    with pytest.raises(RuntimeError, match="boom"):
        with leap_screen.experimental_rule("expected"):
            assert ClassStatistics.cloud_variance is original[0]
            torch.testing.assert_close(
                FC.target_cloud_angles(std, "margin"), std * math.sqrt(2 / math.pi)
            )
            raise RuntimeError("boom")
    assert (ClassStatistics.cloud_variance, FC.target_cloud_angles) == original
    with leap_screen.experimental_rule("full"):  # not experimental: nothing replaced
        assert (ClassStatistics.cloud_variance, FC.target_cloud_angles) == original


def test_leap_screen_logit_rules_negative_side_and_logit_adjusted():
    """The negative-side rules: every non-target class j is seen at theta - E|alpha_j| (its
    cloud, from the head's own statistics, in expectation); the target keeps the margin cloud
    (``negative``) or the plain margin (``negative_only``); ``negative_easy`` shifts the other way;
    ``logit_adjusted`` adds log(K_j / N) to the cloud-free logits; outside the block the package's."""
    import copy
    import math

    import torch.nn.functional as F

    import feature_cloud.functional as FC
    import feature_cloud.heads as H
    from benchmarks import leap_screen
    from feature_cloud import LEAPMarginHead

    torch.manual_seed(0)
    counts = [40, 30, 4, 3, 5]
    head = LEAPMarginHead(
        8, 5, "cosface", cloud="full", class_counts=counts, seed=3, impl="reference"
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, 8, generator=gen)
    y = torch.randint(0, 5, (64,), generator=gen)
    head(x, y).backward()  # statistics filled, cloud active (no warm-up)
    original = H.cloud_margin_logits
    rules = (("negative", True, -1), ("negative_only", False, -1), ("negative_easy", True, 1))
    for rule, with_target, sign in rules:
        ours, package = copy.deepcopy(head), copy.deepcopy(head)  # same step, statistics, draw
        with leap_screen.experimental_rule(rule):
            z = ours.margin_logits(x, y)
            assert z.requires_grad
        ref = package.margin_logits(x, y).detach()  # the package: target cloud, plain negatives
        cloud = ours.feature_cloud
        std = (cloud.statistics.cloud_variance().sqrt() * cloud.scale).detach()
        s, cos = ours.scale, FC.cosine_logits(x, ours.weight).detach()
        angle = torch.acos(cos) + sign * std * math.sqrt(2 / math.pi)
        shifted = torch.cos(angle.clamp(0, math.pi)) * s
        other = torch.ones_like(cos, dtype=torch.bool).scatter_(1, y[:, None], False)
        torch.testing.assert_close(z.detach()[other], shifted[other], atol=1e-4, rtol=1e-4)
        zy, refy = z.detach().gather(1, y[:, None]), ref.gather(1, y[:, None])
        plain = (cos.gather(1, y[:, None]) - ours.margin) * s
        torch.testing.assert_close(zy, refy if with_target else plain, atol=1e-4, rtol=1e-4)
        assert bool((refy < plain - 1e-3).any())  # the package draws a target cloud here
        assert float(std.max()) > 0 and cloud.scale == 2.0
    prior = torch.tensor(counts, dtype=torch.float32) / sum(counts)
    for rule, tau in (("logit_adjusted", 1.0), ("logit_adjusted_half", 0.5)):
        ours = copy.deepcopy(head)
        with leap_screen.experimental_rule(rule):  # no cloud, tau * log prior on every logit
            z = ours.margin_logits(x, y).detach()
        cos = FC.cosine_logits(x, ours.weight).detach()
        plain = (cos - ours.margin * F.one_hot(y, 5)) * ours.scale
        torch.testing.assert_close(z, plain + tau * prior.log(), atol=1e-4, rtol=1e-4)
    assert H.cloud_margin_logits is original


def test_report_pools_the_seeds_of_separate_runs(tmp_path, capsys):
    """`report A B --out M` equals one run over all seeds (paired tables, summary); overlapping
    seeds, different settings/configuration and a lone --out are refused with a clear message."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1"]
    common += ["--methods", "leap_full_cosface", "--epochs", "2", "--batch-size", "8"]
    common += ["--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    out = {k: str(tmp_path / k) for k in ("all", "a", "b", "m", "c")}
    assert main(common + ["--seeds", "0", "1", "2", "--out", out["all"]]) == 0
    assert main(common + ["--seeds", "0", "2", "--out", out["a"]]) == 0
    assert main(common + ["--seeds", "1", "--out", out["b"]]) == 0
    assert main(["report", out["a"], out["b"], "--out", out["m"], "--quiet"]) == 0

    def load(d, f):
        with open(os.path.join(d, f)) as fh:
            return json.load(fh) if f.endswith(".json") else fh.read()

    merged, whole = load(out["m"], "results.json"), load(out["all"], "results.json")
    assert merged["config"]["seeds"] == [0, 1, 2] and len(merged["runs"]) == 6
    assert merged["splits"] == whole["splits"]
    assert load(out["m"], "paired.json") == load(out["all"], "paired.json")
    assert load(out["m"], "summary.csv") == load(out["all"], "summary.csv")
    assert load(out["m"], "paired.json")["leap_full_cosface"]["fc_acc_tail"]["n"] == 3

    capsys.readouterr()
    assert main(["report", out["a"], out["all"], "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "seed 0 is in both" in capsys.readouterr().err
    # the same folder twice (eval trial s58: "seed 0 is in both A and A")
    twice = ["report", out["a"], out["a"] + "/", "--out", str(tmp_path / "x"), "--quiet"]
    assert main(twice) == 2
    assert f"{out['a']}/ is given twice (as {out['a']})" in capsys.readouterr().err
    assert main(common + ["--seeds", "3", "--epochs", "1", "--out", out["c"]]) == 0
    capsys.readouterr()
    assert main(["report", out["a"], out["c"], "--out", str(tmp_path / "y"), "--quiet"]) == 2
    assert "configuration differs in ['epochs']" in capsys.readouterr().err
    assert main(["report", out["a"], "--out", str(tmp_path / "z"), "--quiet"]) == 2
    assert "--out is for merging" in capsys.readouterr().err
    # the merge never replaces an evaluation's own results (one of its inputs, or another run's
    # folder); an earlier merge is rewritten
    before = load(out["a"], "results.json")
    for target in (out["a"], out["all"]):
        capsys.readouterr()
        assert main(["report", out["a"], out["b"], "--out", target, "--quiet"]) == 2
        assert "nothing was written" in capsys.readouterr().err
    assert load(out["a"], "results.json") == before
    assert load(out["all"], "results.json") == whole
    assert main(["report", out["a"], out["b"], "--out", out["m"], "--quiet"]) == 0
    # leap options compare as resolved head options: the defaults spelled out pool, others not
    spelled = ["--leap-option", "cloud_mode=margin", "--leap-option", "cloud_scale=2"]
    assert main(common + ["--seeds", "4", *spelled, "--out", str(tmp_path / "d")]) == 0
    assert main(["report", out["a"], str(tmp_path / "d"), "--out", str(tmp_path / "ad")]) == 0
    scale3 = ["--leap-option", "cloud_scale=3"]
    assert main(common + ["--seeds", "5", *scale3, "--out", out["c"] + "5"]) == 0
    capsys.readouterr()
    assert main(["report", out["a"], out["c"] + "5", "--out", str(tmp_path / "w"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "configuration differs in ['leap_options']" in err
    assert "leap_options: {'cloud_scale': (3, 2.0)}" in err, err  # names the option
    # each run resolves against the head defaults it recorded: a run whose release had another
    # default (here prototype_shrinkage) does not pool, nor does one that recorded none
    # a release before an option existed (here imprint_step) does not pool either: the message
    # names the option, absent there
    for name, edit in (("old_default", "change"), ("no_record", "drop"), ("older", "new_option")):
        d = str(tmp_path / name)
        shutil.copytree(str(tmp_path / "d"), d)
        res = load(d, "results.json")
        assert res["head_defaults"]["prototype_shrinkage"] == 10.0
        if edit == "change":
            res["head_defaults"]["prototype_shrinkage"] = None
        elif edit == "new_option":
            del res["head_defaults"]["imprint_step"]
        else:
            del res["head_defaults"]
        with open(os.path.join(d, "results.json"), "w") as fh:
            json.dump(res, fh)
        capsys.readouterr()
        assert main(["report", out["a"], d, "--out", str(tmp_path / f"m_{name}"), "--quiet"]) == 2
        err = capsys.readouterr().err
        want = {
            "change": "prototype_shrinkage': (None, 10.0)",
            "new_option": "imprint_step': ('<absent: not an option of that release>', None)",
            "drop": "earlier release",
        }[edit]
        assert want in err, err
    assert not os.path.exists(str(tmp_path / "x")) and not os.path.exists(str(tmp_path / "y"))


def test_report_compare_pairs_a_variant_with_the_default_seed_by_seed(tmp_path, capsys):
    """`report A B --compare`: B - A per method on the seeds both ran, from the two files'
    per-seed metrics (checked against them), the configuration difference named, the identical
    baseline shown as 0.0 ± 0.0; other settings, splits or data are refused."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1"]
    common += ["--methods", "leap_full_cosface", "--epochs", "2", "--batch-size", "8"]
    common += ["--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    a, b, c = (str(tmp_path / k) for k in ("a", "b", "c"))
    assert main(common + ["--seeds", "0", "1", "2", "--out", a]) == 0
    scale = ["--leap-option", "cloud_scale=4"]
    assert main(common + ["--seeds", "1", "2", "3", *scale, "--out", b]) == 0
    capsys.readouterr()
    out = str(tmp_path / "cmp")
    assert main(["report", a, b, "--compare", "--out", out]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "compare.json")) as fh:
        cmp = json.load(fh)
    assert cmp["config_b_vs_a"] == {"leap_options": {"cloud_scale": [4, 2.0]}}
    assert "leap_options: {'cloud_scale': [4, 2.0]}" in printed
    runs = {}
    for d in (a, b):
        with open(os.path.join(d, "results.json")) as fh:
            runs[d] = {(r["method"], r["seed"]): r["metrics"] for r in json.load(fh)["runs"]}
    tail = cmp["differences"]["leap_full_cosface"]["fc_acc_tail"]
    assert sorted(tail["per_seed"]) == ["1", "2"] and tail["n"] == 2  # the shared seeds
    for s in (1, 2):
        want = 100 * (
            runs[b][("leap_full_cosface", s)]["fc_acc_tail"]
            - runs[a][("leap_full_cosface", s)]["fc_acc_tail"]
        )
        assert tail["per_seed"][str(s)] == pytest.approx(want)
    assert tail["mean"] == pytest.approx(sum(tail["per_seed"].values()) / 2)
    base = cmp["differences"]["cosface"]
    assert all(v["mean"] == 0.0 and v["ci95"] == 0.0 for v in base.values() if v["n"])
    assert cmp["notes"] == [] and "| natural | CosFace | 2 | 0.0 ± 0.0" in printed
    with open(os.path.join(out, "compare.md")) as fh:
        assert "Per seed (1, 2), LEAP full (CosFace)" in fh.read()
    # a baseline that differs between the files (another release / machine) is named
    with open(os.path.join(b, "results.json")) as fh:
        res = json.load(fh)
    next(r for r in res["runs"] if r["method"] == "cosface")["metrics"]["fc_acc_tail"] += 0.01
    with open(os.path.join(b, "results.json"), "w") as fh:
        json.dump(res, fh)
    assert main(["report", a, b, "--compare"]) == 0
    printed = capsys.readouterr().out
    assert "Note: the baseline 'cosface' differs between the files" in printed
    assert "(the configurations differ in ['leap_options'], or another release" in printed
    # refused: another setting; one path
    assert main([*common[:4], "-T", "3", *common[6:], "--seeds", "1", "--out", c]) == 0
    capsys.readouterr()
    assert main(["report", a, c, "--compare", "--quiet"]) == 2
    assert "another setting (threshold: 3 vs 5)" in capsys.readouterr().err
    assert main(["report", a, "--compare", "--quiet"]) == 2
    assert "two run directories" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["linear", "cosface", "arcface", "leap"])
def test_head_use_matches_the_heads_the_methods_build(kind):
    """`head_use` (which head defaults a method's results depend on, used when pooling) agrees
    with the heads the builders really make, for every method, FTL classifier and prototype
    option: no margin head, cloud-free heads, a statistics-only cloud, the LEAP head with
    `leap_options` applied."""
    from feature_cloud import LEAPMarginHead
    from feature_cloud.demo.methods import MethodConfig
    from feature_cloud.evaluate.backbones import build_backbone
    from feature_cloud.evaluate.methods import EVAL_METHODS, head_use

    counts = torch.tensor([16, 12, 4, 4, 3, 3])
    seen = set()
    shipped = sorted(EVAL_METHODS)
    assert len(shipped) == 10, shipped  # a new method needs its head_use case
    for kappa in (None, 10.0):
        cfg = MethodConfig(
            embedding_size=8,
            tail_threshold=5,
            ftl_classifier=kind,
            ftl_prototype_shrinkage=kappa,
            leap_options={"cloud_scale": 3.0},
        )
        record = {"ftl_classifier": kind, "ftl_prototype_shrinkage": kappa}
        for name in shipped:
            model = EVAL_METHODS[name](build_backbone("conv4", (3, 8, 8), 8), 6, counts, cfg)
            clouds = [m.feature_cloud for m in model.modules() if isinstance(m, LEAPMarginHead)]
            use = head_use(name, record)
            seen.add(use)
            rules = [c.rule for c in clouds]
            if use == "none":
                assert not clouds, name
            elif use == "plain":
                assert clouds and rules == [None] * len(clouds), (name, rules)
            elif use == "statistics":
                assert any(r is not None for r in rules), name
                assert all(c.scale == 0.0 for c in clouds if c.rule is not None), name
            else:
                assert any(c.rule is not None and c.scale == 3.0 for c in clouds), (name, rules)
    assert seen == {"none", "plain", "leap"} | (
        {"statistics"} if kind in ("cosface", "arcface") else set()
    )
    assert head_use("ftl", {}) == "leap" and head_use("a_new_method", record) == "leap"


def test_report_pools_cloud_free_runs_across_cloud_defaults(tmp_path, capsys):
    """Pooling compares only the head defaults the runs' methods depend on: cloud-free heads pool
    across releases whose cloud defaults differ and ignore `--leap-option`; a head keyword they
    use (the scale), a LEAP run beside them or an unrecorded default is still refused; a run
    without a margin head pools with one that recorded none; the `ftl_*` options count only
    where a run has an FTL method."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1", "--epochs", "1"]
    common += ["--batch-size", "8", "--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    d = {k: str(tmp_path / k) for k in ("a", "b", "leap", "sa", "sb")}
    assert main(common + ["--methods", "cosface", "--seeds", "0", "--out", d["a"]]) == 0
    opt = ["--leap-option", "cloud_scale=3"]
    assert main(common + ["--methods", "cosface", "--seeds", "1", *opt, "--out", d["b"]]) == 0
    assert (
        main(common + ["--methods", "leap_full_cosface", "--seeds", "2", "--out", d["leap"]]) == 0
    )
    for k, seed in (("sa", "0"), ("sb", "1")):
        assert main(common + ["--methods", "softmax", "--seeds", seed, "--out", d[k]]) == 0

    def edit(src, name, change):
        dst = str(tmp_path / name)
        shutil.copytree(src, dst)
        with open(os.path.join(dst, "results.json")) as fh:
            res = json.load(fh)
        change(res)
        with open(os.path.join(dst, "results.json"), "w") as fh:
            json.dump(res, fh)
        return dst

    def pool(x, y):
        capsys.readouterr()
        rc = main(["report", x, y, "--out", str(tmp_path / "m" / os.path.basename(y)), "--quiet"])
        return rc, capsys.readouterr().err

    assert pool(d["a"], d["b"]) == (0, "")  # leap_options do not reach a cloud-free head
    with open(os.path.join(tmp_path, "m", "b", "results.json")) as fh:
        assert [r["seed"] for r in json.load(fh)["runs"]] == [0, 1]
    old = edit(d["b"], "old", lambda r: r["head_defaults"].update(prototype_min_count=1))
    assert pool(d["a"], old)[0] == 0  # a cloud default: not used by these heads
    scale = edit(d["b"], "scale", lambda r: r["head_defaults"].update(scale=32.0))
    rc, err = pool(d["a"], scale)
    assert rc == 2 and "'scale': (32.0, None)" in err, err
    old_leap = edit(
        d["leap"], "old_leap", lambda r: r["head_defaults"].update(prototype_min_count=1)
    )
    rc, err = pool(d["a"], old_leap)
    assert rc == 2 and "'prototype_min_count': (1, 2)" in err, err
    rc, err = pool(
        d["a"],
        edit(d["leap"], "leap_opt", lambda r: r["config"].update(leap_options={"cloud_scale": 3})),
    )
    assert rc == 2 and "'cloud_scale': (3, 2.0)" in err, err
    unrecorded = edit(d["b"], "unrecorded", lambda r: r.pop("head_defaults"))
    rc, err = pool(d["a"], unrecorded)
    assert rc == 2 and "earlier release" in err, err
    assert pool(d["sa"], edit(d["sb"], "s_unrecorded", lambda r: r.pop("head_defaults")))[0] == 0
    # compare lists no configuration difference for an option that reaches no head: same model
    a_opt = str(tmp_path / "a_opt")
    assert main(common + ["--methods", "cosface", "--seeds", "0", *opt, "--out", a_opt]) == 0
    assert main(["report", d["a"], a_opt, "--compare", "--out", str(tmp_path / "cmp")]) == 0
    with open(os.path.join(tmp_path, "cmp", "compare.json")) as fh:
        cmp = json.load(fh)
    assert cmp["config_b_vs_a"] == {}
    assert cmp["differences"]["cosface"]["fc_acc_tail"]["per_seed"] == {"0": 0.0}
    # the FTL options matter only where a run has an FTL method
    energy = edit(d["b"], "energy", lambda r: r["config"].update(ftl_energy=0.9))
    assert pool(d["a"], energy) == (0, "")
    ftl = edit(energy, "ftl_energy", lambda r: r["config"]["methods"].append("ftl_base"))
    rc, err = pool(d["a"], ftl)
    assert rc == 2 and "['ftl_energy'] (ftl_energy: (0.9, 0.95)" in err, err
    a_energy = edit(d["a"], "a_energy", lambda r: r["config"].update(ftl_energy=0.9))
    assert main(["report", d["a"], a_energy, "--compare", "--out", str(tmp_path / "cmp2")]) == 0
    with open(os.path.join(tmp_path, "cmp2", "compare.json")) as fh:
        assert json.load(fh)["config_b_vs_a"] == {}


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM"), reason="no SIGTERM")
def test_sigterm_stops_an_evaluation_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """Eval trial s58: SIGTERM (``timeout``, Slurm, ``docker stop``) killed the process without a
    word (exit -15) and left an empty ``--out``; Ctrl-C said what was kept and removed it. Now
    SIGTERM stops it the same way (exit 143), and the default action is back afterwards."""
    import signal

    import feature_cloud.evaluate.runner as R
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1", "--quiet"]
    common += ["--methods", "cosface", "--epochs", "1", "--batch-size", "8", "--seeds", "0", "1"]
    common += ["--embedding-size", "8", "--image-size", "8", "8"]
    real, calls = R.train_model, []

    def terminated_at(n):
        def train(*args, **kwargs):
            if len(calls) == n:
                os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread: raises
            calls.append(args[0])
            return real(*args, **kwargs)

        return train

    monkeypatch.setattr(R, "train_model", terminated_at(0))
    first = tmp_path / "first"
    assert main(common + ["--out", str(first)]) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM); no run finished" in err, err
    assert not first.exists()  # the empty folder removed, as on Ctrl-C
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    calls.clear()
    monkeypatch.setattr(R, "train_model", terminated_at(1))
    later = tmp_path / "later"
    assert main(common + ["--out", str(later)]) == 143
    assert "1 finished run saved in" in capsys.readouterr().err
    with open(later / "results.json") as fh:
        assert len(json.load(fh)["runs"]) == 1
    monkeypatch.setattr(R, "train_model", real)
    assert main(common + ["--out", str(later), "--resume"]) == 0


def test_evaluate_writes_every_run_and_resume_trains_only_the_missing_ones(
    tmp_path, capsys, monkeypatch
):
    """A killed evaluation keeps its finished runs (``results.json`` after every run, marked
    partial); ``--resume`` trains only the missing ones and ends where an uninterrupted run
    ends; a results file of another configuration or with runs not asked for is refused
    before anything is trained or written."""
    import feature_cloud.evaluate.runner as R
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1"]
    common += ["--methods", "leap_full_cosface", "--epochs", "2", "--batch-size", "8"]
    common += ["--embedding-size", "8", "--image-size", "8", "8", "--quiet", "--seeds", "0", "1"]
    whole, part = str(tmp_path / "whole"), str(tmp_path / "part")

    def load(d, f):
        with open(os.path.join(d, f)) as fh:
            return json.load(fh) if f.endswith(".json") else fh.read()

    # --resume without a results file: an ordinary run, said where --out does not exist (a
    # mistyped --out retrained everything silently: eval trial s58)
    capsys.readouterr()
    assert main(common + ["--out", whole, "--resume"]) == 0
    said = capsys.readouterr().err
    assert f"--resume: {whole!r} does not exist, so there is nothing to resume" in said, said
    assert load(whole, "results.json")["complete"] is True

    real, calls = R.train_model, []

    def killed_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user's Ctrl-C in the third training run
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "train_model", killed_after_two)
    capsys.readouterr()
    assert main(common + ["--out", part]) == 130  # Ctrl-C: a short message, no traceback
    assert "2 finished runs saved in" in capsys.readouterr().err
    partial = load(part, "results.json")
    assert partial["complete"] is False and partial["wall_seconds"] > 0
    assert [(r["seed"], r["method"]) for r in partial["runs"]] == [
        (0, "cosface"),
        (0, "leap_full_cosface"),
    ]
    assert not os.path.exists(os.path.join(part, "results.json.tmp"))
    assert main(["report", part, "--quiet"]) == 0  # a partial run renders, and says so
    assert "**Partial**: the evaluation stopped after 2 of 4 runs" in load(part, "summary.md")
    assert "**Partial**: the evaluation stopped after 2 of 4 runs" in load(part, "paired.md")
    assert ", 2 epochs, seeds [0, 1])" in load(part, "summary.md").splitlines()[0]

    # refused before training or writing: another configuration; runs outside --seeds
    monkeypatch.setattr(R, "train_model", lambda *a, **k: pytest.fail("trained"))
    before = load(part, "results.json")
    capsys.readouterr()
    assert main([*common, "--epochs", "1", "--out", part, "--resume"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main([*common[:-3], "--seeds", "1", "--out", part, "--resume"]) == 2
    assert "outside --seeds [1]" in capsys.readouterr().err
    assert load(part, "results.json") == before

    trained = []

    def counted(*args, **kwargs):
        trained.append((args[-1], args[0]))  # (seed, method)
        return real(*args, **kwargs)

    monkeypatch.setattr(R, "train_model", counted)
    assert main(common + ["--out", part, "--resume"]) == 0
    assert trained == [(1, "cosface"), (1, "leap_full_cosface")]
    resumed, ref = load(part, "results.json"), load(whole, "results.json")
    assert resumed["complete"] is True
    # the killed process's time counts too: at least its two runs plus the two resumed ones
    resumed_runs = sum(r["train_seconds"] for r in resumed["runs"][2:])
    assert resumed["wall_seconds"] >= partial["wall_seconds"] + resumed_runs - 0.1  # rounding
    assert [r["metrics"] for r in resumed["runs"]] == [r["metrics"] for r in ref["runs"]]
    assert load(part, "paired.json") == load(whole, "paired.json")
    assert "Partial" not in load(part, "summary.md")


def test_resume_and_pooling_refuse_a_data_file_whose_contents_changed(tmp_path, capsys):
    """Same name, counts and shapes, other pixels: the runs would mix two datasets, so resume
    and report refuse (the results record a fingerprint of the loaded data)."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1", "--quiet"]
    common += ["--methods", "cosface", "--epochs", "1", "--batch-size", "8"]
    common += ["--embedding-size", "8", "--image-size", "8", "8"]
    out, other = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--seeds", "0", "--out", out]) == 0
    with np.load(p) as d:
        arrays = dict(d)
    np.savez(p, images=255 - arrays["images"], labels=arrays["labels"])
    capsys.readouterr()
    assert main(common + ["--seeds", "0", "1", "--out", out, "--resume"]) == 2
    assert "the data differ in ['fingerprint" in capsys.readouterr().err
    assert main(common + ["--seeds", "1", "--out", other]) == 0
    assert main(["report", out, other, "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "fingerprint" in capsys.readouterr().err
    # the same contents under another file name (a copy): resumed and pooled (was refused
    # on the name)
    copy = str(tmp_path / "copy.npz")
    np.savez(copy, images=255 - arrays["images"], labels=arrays["labels"])
    renamed = [copy if a == p else a for a in common]
    assert main(renamed + ["--seeds", "1", "2", "--out", other, "--resume"]) == 0
    third = str(tmp_path / "c")
    assert main(common + ["--seeds", "3", "--out", third]) == 0
    assert main(["report", other, third, "--out", str(tmp_path / "m2"), "--quiet"]) == 0


def test_imprint_fraction_reaches_the_leap_heads_only():
    """``--imprint-fraction f`` gives the LEAP methods' heads ``imprint_step = round(f * steps)``
    (FTL's LEAP FC included); baselines without a cloud never imprint."""
    from feature_cloud.evaluate.runner import EvalConfig, _steps_per_epoch, train_model

    torch.manual_seed(0)
    y = torch.repeat_interleave(torch.arange(5), torch.tensor([16, 12, 4, 4, 4]))
    x = torch.randn(40, 3, 8, 8)
    counts = torch.bincount(y, minlength=5)
    cfg = EvalConfig(epochs=2, batch_size=8, embedding_size=8, imprint_fraction=0.5, threshold=5)
    want = round(0.5 * 2 * _steps_per_epoch(40, 8))
    leap = train_model("leap_full_cosface", x, y, 5, counts, cfg, 0)
    assert leap.head.feature_cloud.imprint_step == want
    assert leap.head.feature_cloud.steps_taken > want  # it ran through the imprint
    assert train_model("cosface", x, y, 5, counts, cfg, 0).head.feature_cloud.imprint_step is None
    cfg.ftl_classifier = "leap"
    ftl = train_model("ftl", x, y, 5, counts, cfg, 0).ftl.classifier
    assert ftl.feature_cloud.imprint_step == want
    cfg.imprint_fraction = None
    leap = train_model("leap_full_cosface", x, y, 5, counts, cfg, 0)
    assert leap.head.feature_cloud.imprint_step is None


def test_cli_evaluate_shrinkage_sweep_scores_the_same_models_at_each_kappa(tmp_path, capsys):
    """``--shrinkage-sweep 0 10``: each LEAP model is also scored against its prototypes at
    kappa 0 (its weights: FC(W)) and 10 (the head's default: FC), in one training; the baseline
    gets no sweep; the sweep table pairs every kappa with the baseline's plain FC; runs with
    another sweep (or none) still pool, each kappa on the seeds that have it."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1"]
    common += ["--methods", "leap_full_cosface", "--epochs", "3", "--batch-size", "8"]
    common += ["--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    a, b, m = (str(tmp_path / k) for k in ("a", "b", "m"))
    assert main(common + ["--seeds", "0", "1", "--shrinkage-sweep", "0", "10", "--out", a]) == 0
    assert main(common + ["--seeds", "2", "--out", b]) == 0  # no sweep
    with open(os.path.join(a, "results.json")) as fh:
        res = json.load(fh)
    assert res["config"]["shrinkage_sweep"] == [0.0, 10.0]
    for run in res["runs"]:
        if run["method"] == "cosface":
            assert "sweep" not in run  # no centers: nothing to sweep
            continue
        met, sw = run["metrics"], run["sweep"]
        assert sorted(sw) == ["0", "10"]
        for part in ("head", "tail"):  # the default kappa is the FC, kappa 0 the weights
            assert sw["10"][f"fc_acc_{part}"] == met[f"fc_acc_{part}"]
            assert sw["0"][f"fc_acc_{part}"] == met[f"fcw_acc_{part}"]
        assert sw["10"]["fc_cross_head"] == met["fc_cross_head"]
        assert sw["10"]["fc_cross_tail"] == met["fc_cross_tail"]
    with open(os.path.join(a, "sweep.json")) as fh:
        sj = json.load(fh)["leap_full_cosface"]
    with open(os.path.join(a, "paired.json")) as fh:
        pj = json.load(fh)["leap_full_cosface"]
    assert sj["10"]["fc_acc_tail"]["mean"] == pytest.approx(pj["fc_acc_tail"]["mean"])
    assert sj["0"]["fc_acc_head"]["mean"] == pytest.approx(pj["fcw_acc_head"]["mean"])
    assert sj["0"]["fc_acc_tail"]["n"] == 2
    with open(os.path.join(a, "summary.md")) as fh:
        text = fh.read()
    assert "--shrinkage-sweep" in text and "Δ FC head→tail" in text
    for f in ("sweep.md", "sweep.csv", "sweep.png"):
        assert os.path.isfile(os.path.join(a, f)), f
    with open(os.path.join(a, "sweep.csv")) as fh:
        rows = {r["kappa"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"0", "10"}
    for kappa, row in rows.items():
        assert float(row["Δ FC tail"]) == pytest.approx(sj[kappa]["fc_acc_tail"]["mean"], abs=1e-4)
        ci = sj[kappa]["fc_acc_tail"]["ci95"]
        assert float(row["Δ FC tail ci95"]) == pytest.approx(ci, abs=1e-4, nan_ok=True)
    assert not os.path.exists(os.path.join(b, "sweep.md"))
    assert main(["report", a, b, "--out", m, "--quiet"]) == 0
    with open(os.path.join(m, "results.json")) as fh:
        assert json.load(fh)["config"]["shrinkage_sweep"] == [0.0, 10.0]
    with open(os.path.join(m, "sweep.json")) as fh:
        assert json.load(fh)["leap_full_cosface"]["10"]["fc_acc_tail"]["n"] == 2  # seeds 0, 1
    from feature_cloud.evaluate.report import combine_settings

    assert "--shrinkage-sweep" in combine_settings([a], str(tmp_path / "comb"))
    capsys.readouterr()
    assert main(common + ["--seeds", "0", "--shrinkage-sweep", "-1", "--out", b + "x"]) == 2
    assert "shrinkage_sweep" in capsys.readouterr().err


def test_cli_evaluate_save_logits_reproduces_the_fc_accuracy(tmp_path, capsys):
    """``--save-logits``: every closed-set run writes its test logits, labels and head-class
    mask; their argmax gives the run's FC head / tail accuracy exactly; the option is an output,
    not a setting (runs with and without it pool); the open protocol has no closed-set logits."""
    import numpy as np

    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["evaluate", p, "--protocol", "natural", "-T", "5", "--n-test", "1"]
    common += ["--methods", "leap_full_cosface", "--epochs", "2", "--batch-size", "8"]
    common += ["--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(common + ["--seeds", "0", "1", "--save-logits", "--out", a]) == 0
    assert main(common + ["--seeds", "2", "--out", b]) == 0
    with open(os.path.join(a, "results.json")) as fh:
        res = json.load(fh)
    assert res["config"]["save_logits"] is True
    assert sorted(os.listdir(os.path.join(a, "logits"))) == [
        f"{m}_seed{s}.npz" for m in ("cosface", "leap_full_cosface") for s in (0, 1)
    ]
    for run in res["runs"]:
        got = np.load(os.path.join(a, "logits", f"{run['method']}_seed{run['seed']}.npz"))
        logits, labels, head = got["logits"], got["labels"], got["head_classes"]
        assert logits.shape == (labels.shape[0], head.shape[0]) and head.dtype == bool
        ok = logits.argmax(1) == labels
        is_head = head[labels]
        assert is_head.any() and (~is_head).any()
        assert ok[is_head].mean() == pytest.approx(run["metrics"]["fc_acc_head"], abs=1e-6)
        assert ok[~is_head].mean() == pytest.approx(run["metrics"]["fc_acc_tail"], abs=1e-6)
    assert not os.path.exists(os.path.join(b, "logits"))
    assert main(["report", a, b, "--out", str(tmp_path / "m"), "--quiet"]) == 0
    capsys.readouterr()
    opn = ["evaluate", p, "--protocol", "open", "--seeds", "0", "--save-logits", "--quiet"]
    assert main(opn + ["--out", str(tmp_path / "o")]) == 2
    assert "save_logits" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "o"))


def test_head_offset_script_restores_the_head_and_shifts_the_baseline(tmp_path, capsys):
    """benchmarks/head_offset.py on hand-made logits (head classes 0, 1; one test image each):
    the method trades head image 1 (lost to tail class 2 by 0.22) for tail image 2 (won by 0.1);
    an offset of 0.25 gives the head back and the tail gain with it; the baseline reaches the
    method's tail at 0.35 and loses head image 1 there."""
    import numpy as np

    from benchmarks import head_offset

    d = tmp_path / "run"
    (d / "logits").mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"setting": "natural"}))
    labels, head = np.arange(4), np.array([True, True, False, False])
    base = np.array(
        [[1.0, 0, 0, 0], [0, 1.0, 0, 0.8], [1.0, 0, 0.7, 0], [0, 0, 0, 1.0]], dtype=np.float32
    )
    method = np.array(
        [[1.0, 0, 0, 0], [0, 0.78, 1.0, 0], [0.9, 0, 1.0, 0], [0, 0, 0, 1.0]], dtype=np.float32
    )
    for name, lg in (("ftl_base", base), ("ftl", method)):
        np.savez(d / "logits" / f"{name}_seed0.npz", logits=lg, labels=labels, head_classes=head)
    assert head_offset.head_tail_accuracy(method, labels, head, 0.0) == (50.0, 100.0)
    assert head_offset.head_tail_accuracy(method, labels, head, 0.25) == (100.0, 50.0)
    head_offset.main([str(d)])
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| natural")]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells == [
        "natural",
        "1",
        "0",
        "+50.0",
        "-50.0",
        "0",
        "1: +0.0",
        "0",
        "-50.0 (1)",
        "+0.0",
    ]


class _Classifier(torch.nn.Module):
    """A trained model as ``shrinkage_sweep`` reads it: ``classify`` gives the head's logits."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def classify(self, emb):
        return self.head.logits(emb)


def test_shrinkage_sweep_restores_the_head_and_skips_models_without_centers():
    """The sweep leaves the cloud's ``prototype_shrinkage`` as it was (also when scoring
    fails), and returns nothing for a head that keeps no centers."""

    from feature_cloud import LEAPMarginHead
    from feature_cloud.evaluate.runner import shrinkage_sweep

    torch.manual_seed(0)
    counts = [20, 20, 3, 2]
    head = LEAPMarginHead(8, 4, cloud="full", class_counts=counts, warmup_steps=0, seed=0)
    labels = torch.tensor([0, 1, 2, 3] * 4)
    for _ in range(3):
        head(torch.randn(16, 8), labels)
    head.eval()
    model, emb = _Classifier(head), torch.randn(8, 8)
    ey, is_head = torch.tensor([0, 1, 2, 3] * 2), torch.tensor([True, True, False, False])
    got = shrinkage_sweep(model, emb, ey, is_head, [0.0, 10.0, 1e6])
    assert head.feature_cloud.prototype_shrinkage == 10.0 and sorted(got) == ["0", "10", "1e+06"]
    want = (head.logits(emb).argmax(1) == ey).float()
    assert got["10"]["fc_acc_tail"] == want[is_head[ey].logical_not()].mean().item()
    assert got["10"]["fc_acc_head"] == want[is_head[ey]].mean().item()

    def broken(emb):
        raise RuntimeError("scoring failed")

    model.classify = broken
    with pytest.raises(RuntimeError, match="scoring failed"):
        shrinkage_sweep(model, emb, ey, is_head, [3.0])
    assert head.feature_cloud.prototype_shrinkage == 10.0
    plain = _Classifier(LEAPMarginHead(8, 4, cloud=None))
    assert shrinkage_sweep(plain, emb, ey, is_head, [0.0, 10.0]) == {}
    assert shrinkage_sweep(model, emb, ey, is_head, []) == {}


def test_shrinkage_sweep_keeps_kappas_that_print_alike_apart():
    """``--shrinkage-sweep 0.5 1234567 1234568``: the keys were ``%g``, so the last two shared
    '1.23457e+06' and one kappa's results overwrote the other's (a statistics audit, s53). A
    key is ``%g`` (the keys of earlier files) unless two kappas of the sweep print alike."""

    from feature_cloud import LEAPMarginHead
    from feature_cloud.evaluate.runner import shrinkage_sweep, sweep_keys

    assert sweep_keys([0, -0.0, 0.5, 10, 30.0, 1e6, 1e-7, 0.1 + 0.2]) == [
        "0",
        "0",
        "0.5",
        "10",
        "30",
        "1e+06",
        "1e-07",
        "0.3",
    ]
    # the keys earlier releases wrote, so that their files pool with new ones kappa by kappa
    # (a float32 kappa of the Python API, a kappa %g rounds: reviews, s53)
    assert sweep_keys([float(torch.tensor(0.1))]) == ["0.1"]
    assert sweep_keys([10 / 3, 1234567.0]) == ["3.33333", "1.23457e+06"]
    assert sweep_keys([0.1, float(torch.tensor(0.1))]) == ["0.1", "0.10000000149011612"]
    kappas = [0.5, 1234567.0, 1234568.0, 0.1 + 0.2]
    keys = sweep_keys(kappas)
    assert keys == ["0.5", "1234567.0", "1234568.0", "0.3"]
    assert len(set(keys)) == len(kappas)

    torch.manual_seed(0)
    head = LEAPMarginHead(8, 4, cloud="full", class_counts=[20, 20, 3, 2], warmup_steps=0)
    labels = torch.tensor([0, 1, 2, 3] * 4)
    head(torch.randn(16, 8), labels)
    head.eval()
    ey, is_head = torch.tensor([0, 1, 2, 3] * 2), torch.tensor([True, True, False, False])
    got = shrinkage_sweep(_Classifier(head), torch.randn(8, 8), ey, is_head, kappas)
    assert list(got) == keys


def test_open_split_holds_out_whole_retrievable_identities():
    from feature_cloud.evaluate import open_split

    y = _labels([30, 12, 5, 4, 3, 2, 1, 6])
    s = open_split(y, 8, test_fraction=0.5, threshold=10, seed=3)
    held = (s.label_map < 0).nonzero().flatten().tolist()
    assert len(held) == 4 and 6 not in held  # round(0.5 * 7 retrievable); class 6 has one image
    assert set(y[s.test].tolist()) == set(held)  # every image of a held-out identity tests
    assert (
        set(y[s.train].tolist()).isdisjoint(held) and s.train.numel() + s.test.numel() == y.numel()
    )
    kept = (s.label_map >= 0).nonzero().flatten()
    assert s.label_map[kept].tolist() == list(range(kept.numel()))  # compact, identity order
    assert s.train_counts[held].tolist() == [0] * 4
    assert s.head.tolist() == (s.train_counts > 10).tolist()
    assert s.summary()["test_identities"] == 4
    assert s.summary()["tail_classes"] == int(((s.label_map >= 0) & ~s.head).sum())
    again = open_split(y, 8, test_fraction=0.5, threshold=10, seed=3)
    assert torch.equal(again.test, s.test) and torch.equal(again.label_map, s.label_map)
    other = [open_split(y, 8, 0.5, 10, seed).label_map for seed in range(4, 12)]
    assert any(not torch.equal(m, s.label_map) for m in other)  # the draw depends on the seed
    # re-ID: an identity seen by one camera only cannot be retrieved across cameras
    cams = torch.zeros_like(y)
    cams[y == 0] = torch.arange(30) % 2
    cams[y == 1] = torch.arange(12) % 2
    cams[y == 2] = torch.arange(5) % 2
    r = open_split(y, 8, test_fraction=0.5, seed=0, camids=cams)
    held = (r.label_map < 0).nonzero().flatten().tolist()
    assert len(held) == 2 and set(held) <= {0, 1, 2}  # round(0.5 * 3) of the two-camera ones
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="test_fraction"):
            open_split(y, 8, test_fraction=bad)
    with pytest.raises(ValueError, match="held out"):
        open_split(y, 8, test_fraction=0.5, camids=torch.zeros_like(y))  # nothing retrievable
    # four identities, three held out: one left to train is refused by the split itself, with
    # the number the later check needs (it said "at least 1 identity left to train")
    four = torch.arange(4).repeat_interleave(3)
    with pytest.raises(ValueError, match="at least 2 identities left to train"):
        open_split(four, 4, test_fraction=0.75)
    assert (open_split(four, 4, test_fraction=0.5).label_map >= 0).sum() == 2


def test_cli_evaluate_open_set_trains_on_the_kept_identities_and_reports_retrieval(
    tmp_path, capsys
):
    """``--protocol open``: the models train on the kept identities only (a classifier row per
    kept identity), the held-out ones are retrieved across cameras and verified; the tables carry
    the open-set metrics; open runs pool, compare, and combine beside a closed-set setting."""
    from feature_cloud.cli import main
    from feature_cloud.evaluate.report import combine_settings

    p = str(tmp_path / "d.npz")
    _tiny_npz(p, camids=True)
    common = ["evaluate", p, "-T", "5", "--methods", "leap_full_cosface", "--epochs", "2"]
    common += ["--batch-size", "8", "--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    a, b, m, nat = (str(tmp_path / k) for k in ("a", "b", "m", "nat"))
    assert main(common + ["--protocol", "open", "--seeds", "0", "--out", a]) == 0
    assert main(common + ["--protocol", "open", "--seeds", "1", "--out", b]) == 0
    with open(os.path.join(a, "results.json")) as fh:
        res = json.load(fh)
    assert res["setting"] == "open" and res["config"]["test_fraction"] == 0.5
    split = res["splits"]["0"]
    assert split["test_identities"] == 3  # round(0.5 * 6): every identity has both cameras
    held = [c for c, k in enumerate(split["train_counts"]) if k == 0]
    assert len(held) == 3
    for run in res["runs"]:
        met = run["metrics"]
        for k in ("rank1_all", "map_all"):
            assert 0.0 <= met[k] <= 1.0, (run["method"], k)
        # under a hundred different-identity pairs cannot measure a FAR of 1e-2 (or 1e-3): n/a,
        # not the TAR at FAR 0 it used to report
        assert met["tar_far2"] is None and met["tar_far3"] is None, run["method"]
        assert "fc_acc_tail" not in met  # nothing is classified
        norms = run["per_class"]["weight_norm"]
        assert len(norms) == 6 and [c for c, v in enumerate(norms) if v is None] == held
    with open(os.path.join(a, "summary.md")) as fh:
        text = fh.read()
    assert "Δ TAR@FAR=1e-2" in text and "Δ FC tail" not in text
    assert os.path.isfile(os.path.join(a, "paired.png"))
    assert main(["report", a, b, "--out", m, "--quiet"]) == 0
    with open(os.path.join(m, "paired.json")) as fh:
        assert json.load(fh)["leap_full_cosface"]["rank1_all"]["n"] == 2
    # the same seed again with another cloud scale: compared seed by seed on the open metrics
    c = str(tmp_path / "c")
    scale = ["--leap-option", "cloud_scale=3"]
    assert main(common + ["--protocol", "open", "--seeds", "0", *scale, "--out", c]) == 0
    assert main(["report", a, c, "--compare", "--out", str(tmp_path / "cmp"), "--quiet"]) == 0
    with open(os.path.join(tmp_path, "cmp", "compare.md")) as fh:
        assert "Δ mAP" in fh.read()
    assert (
        main(common + ["--protocol", "natural", "--seeds", "0", "--n-test", "1", "--out", nat]) == 0
    )
    md = combine_settings([nat, m], str(tmp_path / "comb"))
    assert "Δ FC tail" in md and "Open set (held-out identities)" in md and "Δ rank-1 |" in md
    assert os.path.isfile(os.path.join(tmp_path, "comb", "combined_open_paired.csv"))
    capsys.readouterr()
    assert main(common + ["--protocol", "open", "--test-fraction", "1.5", "--out", c + "x"]) == 2
    assert "test_fraction" in capsys.readouterr().err


def test_cli_evaluate_without_head_identities_warns_and_counts_the_pairs(tmp_path, capsys):
    """A natural split with no head identity (``-T`` above every identity's training images, as
    on a balanced set): one ``feature-cloud: warning:`` line on stderr (also with ``--quiet``)
    that names ``-T``; the head columns are n/a, while the paired and sweep tables still count
    the seed pairs from the tail metrics (they used to say 0 pairs and drop the sweep)."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)  # at most 15 training images an identity with --n-test 1
    out = str(tmp_path / "o")
    args = ["evaluate", p, "--protocol", "natural", "-T", "20", "--n-test", "1"]
    args += ["--methods", "leap_full_cosface", "--epochs", "2", "--batch-size", "8"]
    args += ["--embedding-size", "8", "--image-size", "8", "8", "--seeds", "0", "1"]
    args += ["--shrinkage-sweep", "0", "10", "--out", out]
    capsys.readouterr()
    assert main(args) == 0
    std = capsys.readouterr()
    err = std.err
    runs = [ln for ln in std.out.splitlines() if ln.startswith("  seed ")]
    assert len(runs) == 4 and all("FC head   n/a tail " in ln for ln in runs), runs  # not "nan"
    assert not any("nan" in ln for ln in runs), runs
    warned = [ln for ln in err.splitlines() if ln.startswith("feature-cloud: warning:")]
    # and --n-test 1's: rank-1 / mAP n/a (a warning of its own since s53)
    assert len(warned) == 2 and "no head identities" in warned[1] and "-T 20" in warned[1]
    assert "(--n-test 1)" in warned[0], warned

    def strict(name):  # JSON has no NaN: n/a is null in every file (JavaScript parses them)
        with open(os.path.join(out, name)) as fh:
            return json.load(fh, parse_constant=lambda c: pytest.fail(f"{c} in {name}"))

    res = strict("results.json")
    assert res["splits"]["0"]["head_classes"] == 0 and res["splits"]["0"]["tail_classes"] == 6
    assert {r["metrics"]["fc_acc_head"] for r in res["runs"]} == {None}
    assert strict("paired.json")["leap_full_cosface"]["fc_acc_head"]["mean"] is None
    assert strict("sweep.json")["leap_full_cosface"]["10"]["fc_acc_head"]["mean"] is None
    with open(os.path.join(out, "runs.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert {r["fc_acc_head"] for r in rows} == {""} and all(
        float(r["fc_acc_tail"]) >= 0 for r in rows
    )
    with open(os.path.join(out, "paired.csv")) as fh:
        rows = list(csv.reader(fh))
    assert rows[1][rows[0].index("pairs")] == "2" and rows[1][rows[0].index("Δ FC head")] == ""
    assert rows[1][rows[0].index("Δ FC head ci95")] == ""  # n/a: an empty CSV cell
    float(rows[1][rows[0].index("Δ FC tail")])
    with open(os.path.join(out, "sweep.csv")) as fh:
        rows = list(csv.reader(fh))
    assert [r[rows[0].index("pairs")] for r in rows[1:]] == ["2", "2"]
    assert {r[rows[0].index("Δ FC head")] for r in rows[1:]} == {""}
    cmp = main(["report", out, out, "--compare", "--out", str(tmp_path / "cmp"), "--quiet"])
    assert cmp == 0
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert "Δ FC head n/a, n/a" in text and "nan" not in text
    with open(tmp_path / "cmp" / "compare.json") as fh:
        json.load(fh, parse_constant=lambda c: pytest.fail(f"{c} in compare.json"))
    # the nulls read back as n/a: --resume (nothing left to train) re-renders the same tables
    before = (tmp_path / "o" / "paired.md").read_text()
    assert main(args + ["--resume", "--quiet"]) == 0
    assert (tmp_path / "o" / "paired.md").read_text() == before and "n/a" in before
    # a split with both groups: no warning but --n-test 1's
    ok = [a if a != "20" else "5" for a in args[:-1]] + [str(tmp_path / "ok")]
    capsys.readouterr()
    assert main(ok) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "(--n-test 1)" in err, err


def test_hs_split_head_identities_are_the_methods_regular_classes(tmp_path, capsys):
    """``--protocol hs`` on a set whose head identities have ``T`` or fewer training images (a
    balanced face set: ten a person, ``-T 20``): FTL used to stop ("no regular class") and LEAP
    vanilla clouded every class; now the methods' ``T`` is the largest tail count, so the H head
    identities are FTL's regular classes (recorded as ``method_threshold``). Where every head
    identity has more than ``T`` images nothing changes (no record: earlier runs still pool).
    The natural protocol without a head identity is refused for FTL before anything trains."""
    from feature_cloud.cli import main
    from feature_cloud.evaluate.runner import EvalConfig, make_split, method_threshold

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)  # 16, 12, 4, 4, 3, 3 images: 15, 11, 3, 3, 2, 2 train with --n-test 1
    data = load_npz(p)
    hs = EvalConfig(protocol="hs", num_head=2, shots=2, n_test=1, threshold=20)
    split = make_split(hs, data, 0)
    assert split.train_counts.tolist() == [15, 11, 2, 2, 2, 2]
    assert method_threshold(hs, split) == 2
    assert method_threshold(replace(hs, threshold=12), split) == 2  # head 11 <= 12
    assert method_threshold(replace(hs, threshold=10), split) == 10  # every head has more: as given
    assert method_threshold(replace(hs, threshold=1), split) == 1
    natural = replace(hs, protocol="natural", threshold=5)
    assert method_threshold(natural, make_split(natural, data, 0)) == 5
    common = ["evaluate", p, "--n-test", "1", "--methods", "ftl", "--epochs", "2"]
    common += ["--batch-size", "8", "--embedding-size", "8", "--image-size", "8", "8", "--quiet"]
    out = str(tmp_path / "hs")
    assert main(common + ["--protocol", "hs", "-H", "2", "-S", "2", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as fh:
        res = json.load(fh)
    assert res["splits"]["0"]["method_threshold"] == 2
    assert {r["method"] for r in res["runs"]} == {"ftl", "ftl_base"}
    out = str(tmp_path / "hs5")
    assert main(common + ["--protocol", "hs", "-H", "2", "-S", "2", "-T", "5", "--out", out]) == 0
    with open(os.path.join(out, "results.json")) as fh:
        assert "method_threshold" not in json.load(fh)["splits"]["0"]
    for args, says in (
        # no head identity at all: the hint says which way to move -T (the largest has 15)
        (
            ["--protocol", "natural", "-T", "20"],
            "has 0 and 6. head = more than -T 20 training images; choose -T at most 14 (the "
            "largest identity trains on 15)",
        ),
        # no tail identity (every one has more than 1): -T up to the smallest's 2, not down
        (
            ["--protocol", "natural", "-T", "1"],
            "has 6 and 0. head = more than -T 1 training images; choose -T at least 2 (the "
            "smallest identity trains on 2)",
        ),
        (["--protocol", "hs", "-H", "2", "-S", "2", "-T", "1"], "has 6 and 0"),  # T below S
    ):
        capsys.readouterr()
        out = str(tmp_path / "refused")
        assert main(common + args + ["--out", out]) == 2
        err = capsys.readouterr().err
        assert "FTL needs regular identities" in err and says in err, err
        assert f"-T {args[-1]}" in err
        assert not os.path.exists(out)  # refused before anything was written or trained


def test_missing_optional_packages_are_named_not_tracebacks(tmp_path, capsys, monkeypatch):
    """Without an optional package of the tool (``feature-cloud[demo]`` / ``[timm]``) the command
    says which ``pip install`` brings it (before anything trains), or does without: no tqdm, no
    progress bars; no matplotlib, no plots (the tables are still written)."""
    import sys

    from PIL import Image

    import feature_cloud.demo._progress as progress_mod
    from feature_cloud.cli import main

    folder = tmp_path / "faces"
    rng = np.random.RandomState(0)
    for person, n in enumerate([6, 6, 3, 3]):
        (folder / f"p{person}").mkdir(parents=True)
        for i in range(n):
            pixels = rng.randint(0, 255, size=(8, 8, 3)).astype(np.uint8)
            Image.fromarray(pixels).save(str(folder / f"p{person}" / f"{i}.png"))
    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--protocol", "natural", "-T", "5", "--n-test", "1", "--epochs", "1", "--seeds", "0"]
    common += ["--batch-size", "8", "--embedding-size", "8", "--image-size", "8", "8"]

    def run(data, *extra, out):
        capsys.readouterr()
        rc = main(["evaluate", data, *common, *extra, "--out", str(tmp_path / out)])
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    with monkeypatch.context() as m:  # no Pillow: image folders cannot be read
        m.setitem(sys.modules, "PIL", None)
        m.setitem(sys.modules, "PIL.Image", None)
        rc, _, err = run(str(folder), out="no_pil")
        assert rc == 2 and "reading image files needs Pillow" in err, err
        assert "pip install 'feature-cloud[demo]'" in err
    with monkeypatch.context() as m:  # no timm: refused before the data are read
        m.setitem(sys.modules, "timm", None)
        rc, out, err = run(p, "--backbone", "timm:resnet18", out="no_timm")
        assert rc == 2 and "pip install 'feature-cloud[timm]'" in err, err
        assert not os.path.exists(str(tmp_path / "no_timm"))
    if importlib.util.find_spec("timm") is not None:  # (timm installed: an unknown model named)
        rc, _, err = run(p, "--backbone", "timm:no_such_net", out="bad_timm")
        assert rc == 2 and "timm has no model 'no_such_net'" in err, err
    with monkeypatch.context() as m:  # no matplotlib, no tqdm: tables without plots or bars
        m.setitem(sys.modules, "matplotlib", None)
        m.setitem(sys.modules, "matplotlib.pyplot", None)
        m.setattr(progress_mod, "tqdm", None)
        rc, out, err = run(p, out="bare")
        assert rc == 0, err
        assert "(no plots: drawing the PNG plots needs matplotlib" in out
        written = set(os.listdir(str(tmp_path / "bare")))
        assert {"summary.md", "paired.csv", "results.json"} <= written
        assert not any(f.endswith(".png") for f in written), written
    rc, out, err = run(p, out="full")  # and with everything installed, the plots
    assert rc == 0 and any(f.endswith(".png") for f in os.listdir(str(tmp_path / "full")))


def test_timm_model_of_a_fixed_input_size_is_refused_naming_the_image_size(tmp_path, capsys):
    """A timm model with a fixed input size (a ViT: 224 x 224) at another --image-size failed
    in timm's ``torch._assert`` (an ``AssertionError``) with a traceback; it is refused before
    anything is written, naming the method, the size and --image-size."""
    pytest.importorskip("timm")
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    out = tmp_path / "vit"
    rc = main(
        ["evaluate", p, "--backbone", "timm:vit_tiny_patch16_224", "--image-size", "16", "16"]
        + ["--protocol", "natural", "-T", "5", "--n-test", "1", "--epochs", "1", "--seeds", "0"]
        + ["--quiet", "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "cannot be built or run on these images [3, 16, 16]" in err
    assert "doesn't match model (224)" in err and "--image-size" in err, err
    assert not out.exists()


def test_scale_and_margin_reach_every_margin_head_and_its_baseline():
    """``EvalConfig(scale=64, margin=0.35)`` (face recognition's CosFace) builds every margin
    head with them, each method's and its baseline's alike (CosFace, LEAP, FTL's cosine FC and
    the no-transfer model's); ``None`` keeps each margin's default; the linear FC has none."""
    from feature_cloud.evaluate.runner import EvalConfig, train_model
    from feature_cloud.heads import DEFAULT_MARGIN, DEFAULT_SCALE

    torch.manual_seed(0)
    y = torch.repeat_interleave(torch.arange(5), torch.tensor([16, 12, 4, 4, 4]))
    x = torch.randn(40, 3, 8, 8)
    counts = torch.bincount(y, minlength=5)

    def heads(cfg):
        out = {}
        for name in ("cosface", "leap_full_cosface", "arcface", "leap_vanilla_arcface"):
            out[name] = train_model(name, x, y, 5, counts, cfg, 0).head
        for name in ("ftl", "ftl_base"):
            out[name] = train_model(name, x, y, 5, counts, cfg, 0).ftl.classifier
        return out

    cfg = EvalConfig(epochs=1, batch_size=8, embedding_size=8, threshold=5)
    cfg.validate()
    for name, head in heads(cfg).items():
        kind = "arcface" if "arcface" in name else "cosface"
        assert (head.scale, head.margin) == (DEFAULT_SCALE[kind], DEFAULT_MARGIN[kind]), name
    cfg = EvalConfig(epochs=1, batch_size=8, embedding_size=8, threshold=5, scale=64, margin=0.35)
    cfg.validate()
    built = heads(cfg)
    for name, head in built.items():
        assert (head.scale, head.margin) == (64.0, 0.35), name
    assert built["leap_full_cosface"].feature_cloud.rule == "full"
    cfg.ftl_classifier = "linear"  # the paper's FC: no scale or margin to set
    assert isinstance(train_model("ftl", x, y, 5, counts, cfg, 0).ftl.classifier, torch.nn.Linear)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(scale=0.0), "scale must be a finite number > 0"),
        (dict(scale=float("inf")), "scale must be a finite number > 0"),
        (dict(margin=-0.1), "margin must be a finite number >= 0"),
        (dict(margin=float("nan")), "margin must be a finite number >= 0"),
        (dict(scale=64.0, leap_options={"scale": 32}), "scale is given twice"),
        (dict(margin=0.35, leap_options={"margin": 0.2}), "margin is given twice"),
        (dict(leap_options={"scale": 64}), "scale in leap_options .* not their baseline"),
        (dict(leap_options={"margin": 0.35}), "--margin"),
    ],
)
def test_scale_and_margin_are_checked_before_training(fields, match):
    from feature_cloud.evaluate.runner import EvalConfig

    with pytest.raises(ValueError, match=match):
        EvalConfig(**fields).validate()


def test_cli_evaluate_scale_and_margin_are_recorded_resumed_and_pooled(tmp_path, capsys):
    """``--scale 64 --margin 0.35``: recorded, other metrics than the defaults' for the method and
    its baseline; ``--resume`` and ``report`` refuse to mix them with default runs; a results
    file without the fields (an earlier release) counts as the defaults; runs without a margin
    head (softmax, m-L2) pool whatever the fields say."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--methods", "leap_full_cosface", "--epochs", "2", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1"]
    face = ["--scale", "64", "--margin", "0.35"]
    runs = {}
    for tag, extra, seed in (("face", face, "0"), ("default", [], "0"), ("face1", face, "1")):
        args = [*common, *extra, "--seeds", seed, "--out", str(tmp_path / tag)]
        assert main(["evaluate", p, *args]) == 0
        r = json.loads((tmp_path / tag / "results.json").read_text())
        runs[tag] = {run["method"]: run["metrics"] for run in r["runs"]}
        assert (r["config"]["scale"], r["config"]["margin"]) == (
            (64.0, 0.35) if extra else (None, None)
        )
    for method in ("cosface", "leap_full_cosface"):
        assert runs["face"][method] != runs["default"][method], method
    capsys.readouterr()
    resume = [*common, "--seeds", "0", "--out", str(tmp_path / "face"), "--resume"]
    assert main(["evaluate", p, *resume]) == 2
    assert "scale: (64.0, None)" in capsys.readouterr().err
    assert (
        main(
            [
                "report",
                str(tmp_path / "face"),
                str(tmp_path / "face1"),
                "--out",
                str(tmp_path / "pooled"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "report",
                str(tmp_path / "face1"),
                str(tmp_path / "default"),
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
    assert "configuration differs in ['margin', 'scale']" in capsys.readouterr().err
    # a file of an earlier release (no scale / margin fields) resumes as the defaults
    path = tmp_path / "default" / "results.json"
    r = json.loads(path.read_text())
    r["config"].pop("scale"), r["config"].pop("margin")
    path.write_text(json.dumps(r))
    resume = [*common, "--seeds", "0", "--out", str(tmp_path / "default"), "--resume"]
    assert main(["evaluate", p, *resume]) == 0
    # no margin head: the fields do not matter
    soft = ["--methods", "ml2", *common[2:]]
    for tag, extra, seed in (("s0", face, "0"), ("s1", [], "1")):
        assert (
            main(["evaluate", p, *soft, *extra, "--seeds", seed, "--out", str(tmp_path / tag)]) == 0
        )
    assert (
        main(["report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "sp")])
        == 0
    )


def test_cli_evaluate_ftl_filter_reaches_ftl_and_its_baseline(tmp_path, capsys):
    """``--ftl-filter residual`` (the default): FTL's and its baseline's ``R`` are ``f = g +
    R(g)``, both models differ from the plain MLP's (``--ftl-filter mlp``); recorded; ``--resume``
    refuses the other form; a results file without the field (an earlier release) counts as
    ``mlp``."""
    from feature_cloud.cli import main
    from feature_cloud.evaluate.runner import EvalConfig, train_model
    from feature_cloud.ftl import ResidualFilter

    torch.manual_seed(0)
    y = torch.repeat_interleave(torch.arange(5), torch.tensor([16, 12, 4, 4, 4]))
    x, counts = torch.randn(40, 3, 8, 8), torch.bincount(y, minlength=5)
    cfg = EvalConfig(epochs=1, batch_size=8, embedding_size=8, threshold=5)
    assert cfg.ftl_filter == "residual"
    cfg.validate()
    for name in ("ftl", "ftl_base"):
        assert isinstance(train_model(name, x, y, 5, counts, cfg, 0).ftl.filter, ResidualFilter)
    cfg.ftl_filter = "conv"
    with pytest.raises(ValueError, match="ftl_filter must be one of"):
        cfg.validate()

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = ["--methods", "ftl", "--seeds", "0", "--epochs", "3", "--batch-size", "8"]
    common += ["--embedding-size", "8", "-T", "3", "--quiet", "--n-test", "1"]
    runs = {}
    for form in ("residual", "mlp"):
        extra = ["--ftl-filter", form] if form == "mlp" else []
        assert main(["evaluate", p, *common, *extra, "--out", str(tmp_path / form)]) == 0
        r = json.loads((tmp_path / form / "results.json").read_text())
        assert r["config"]["ftl_filter"] == form
        runs[form] = {run["method"]: run["metrics"] for run in r["runs"]}
    for method in ("ftl", "ftl_base"):
        assert runs["residual"][method] != runs["mlp"][method], method
    capsys.readouterr()
    mlp = [*common, "--ftl-filter", "mlp"]
    assert main(["evaluate", p, *mlp, "--out", str(tmp_path / "residual"), "--resume"]) == 2
    assert "ftl_filter: ('residual', 'mlp')" in capsys.readouterr().err
    path = tmp_path / "mlp" / "results.json"
    r = json.loads(path.read_text())
    r["config"].pop("ftl_filter")
    path.write_text(json.dumps(r))
    assert main(["evaluate", p, *common, "--out", str(tmp_path / "mlp"), "--resume"]) == 2
    assert main(["evaluate", p, *mlp, "--out", str(tmp_path / "mlp"), "--resume"]) == 0


def test_cli_evaluate_warns_when_the_camids_leave_no_cross_camera_query(tmp_path, capsys):
    """camids of one camera (a face set saved with a constant camera column): every query's
    same-identity images are on its own camera, so the cross-camera rank-1 / mAP are n/a; one
    warning says so before training (they used to be n/a silently). Two cameras: no warning."""
    from feature_cloud.cli import main

    rng = np.random.RandomState(0)
    y = np.repeat(np.arange(4), [8, 8, 5, 5])
    imgs = rng.randint(0, 255, size=(y.size, 8, 8, 3)).astype(np.uint8)
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    np.savez(one, images=imgs, labels=y, camids=np.zeros(y.size, np.int64))
    np.savez(two, images=imgs, labels=y, camids=np.arange(y.size) % 2)
    args = ["--protocol", "natural", "-T", "4", "--methods", "leap_full_cosface", "--epochs"]
    args += ["1", "--batch-size", "8", "--embedding-size", "8", "--seeds", "0", "--quiet"]
    capsys.readouterr()
    assert main(["evaluate", one, *args, "--out", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if ln.startswith("feature-cloud: warning:")]
    assert len(warned) == 1 and "1 camera in them" in warned[0], err
    res = json.loads((tmp_path / "o1" / "results.json").read_text())
    assert {r["metrics"]["rank1_tail"] for r in res["runs"]} == {None}
    assert main(["evaluate", two, *args, "--out", str(tmp_path / "o2")]) == 0
    assert "warning" not in capsys.readouterr().err


def test_n_test_1_warns_that_rank1_and_map_will_be_n_a():
    """``--n-test 1``: every query is its identity's only test image, so every rank-1 / mAP is
    n/a; one warning says so before training, with or without camids (it was silent; a
    statistics audit, s53). ``--n-test 2``: no warning."""
    import warnings

    from feature_cloud.demo.data import LabeledData
    from feature_cloud.evaluate.runner import EvalConfig, _check_training_sets

    y = torch.tensor(np.repeat(np.arange(4), [8, 8, 5, 5]))
    data = LabeledData(torch.zeros(len(y), 3, 4, 4), y, ["a", "b", "c", "d"], "toy")
    for n_test, camids in ((1, None), (1, torch.arange(len(y)) % 2), (2, None)):
        data.camids = camids
        cfg = EvalConfig(threshold=4, n_test=n_test, methods=["cosface"], seeds=[0])
        splits = {0: natural_split(y, 4, n_test, 4, 0)}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _check_training_sets(cfg, data, splits)
        said = [str(w.message) for w in seen]
        if n_test == 1:
            assert len(said) == 1 and "no identity has two test images (--n-test 1)" in said[0]
            assert "rank-1 / mAP columns will be n/a" in said[0]
        else:
            assert said == []


def test_table_cells_name_a_smaller_n_and_never_print_minus_zero():
    """A cell whose n/a values were dropped stands on fewer seeds / pairs than its row's count:
    it says so (the row said "pairs 3" over cells of 2 pairs); a small negative mean printed as
    "-0.0" (a statistics audit of this release)."""
    from feature_cloud.evaluate.report import _fmt, _stat

    assert _stat(0.9, 1.7, 1, False, n=2, row_n=3) == ["0.9 ± 1.7 (n=2)"]
    assert _stat(0.9, 1.7, 1, False, n=3, row_n=3) == ["0.9 ± 1.7"]
    assert _stat(float("nan"), float("nan"), 1, False, n=0, row_n=3) == ["n/a"]
    assert _stat(0.9, 1.7, 1, True, n=2, row_n=3) == [0.9, 1.7]  # CSV: numbers only
    assert _fmt(-0.04, 0.1, 1) == "0.0 ± 0.1" and _fmt(-0.06, float("nan"), 1) == "-0.1"
