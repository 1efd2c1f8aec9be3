"""``feature_cloud.evaluate`` from Python, as a hyperparameter search or a notebook calls it: the
caller's RNG and matplotlib backend are left alone, the configuration's numbers are checked by
type, and a diverged trial is one importable exception that leaves no empty folder behind."""

import json
import os

import numpy as np
import pytest
import torch

from feature_cloud.demo.data import LabeledData
from feature_cloud.evaluate import EvalConfig, TrainingDiverged, run_evaluation


def _data(sizes=(16, 12, 4, 4, 3, 3), seed=0):
    """Six identities of 8x8 RGB images: a prototype each plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    proto = torch.rand(len(sizes), 3, 8, 8, generator=g)
    x = (proto[y] + 0.1 * torch.randn(y.numel(), 3, 8, 8, generator=g)).clamp(0, 1)
    return LabeledData(x, y, [f"id{i}" for i in range(len(sizes))], "toy")


def _cfg(**kw):
    base = dict(threshold=5, epochs=1, batch_size=8, seeds=[0], embedding_size=8)
    return EvalConfig(**{**base, "methods": ["cosface"], **kw})


def _quiet(_line):
    pass


def test_writing_the_plots_leaves_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    """A notebook's backend stays its own: the plots are drawn on Agg canvases of their own
    (no ``matplotlib.use``, no pyplot figure left open)."""
    matplotlib = pytest.importorskip("matplotlib")
    from feature_cloud.demo import plots

    before = matplotlib.get_backend()
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    figures = pyplot.get_fignums() if pyplot is not None else []
    matplotlib.use("svg")  # stands in for the user's (inline) backend
    try:
        cfg = _cfg(
            methods=["cosface", "leap_full_cosface"], shrinkage_sweep=[0.0, 10.0], out=str(tmp_path)
        )
        run_evaluation(cfg, _data(), log=_quiet)  # paired, sweep, accuracy, per-class plots
        projection = {
            "classes": np.array([0, 1]),
            "is_head": np.array([True, False]),
            "m/train_features": np.random.RandomState(0).randn(6, 4),
            "m/train_labels": np.array([0, 0, 0, 1, 1, 1]),
            "m/eval_features": np.random.RandomState(1).randn(2, 4),
            "m/eval_labels": np.array([0, 1]),
        }
        results = {"methods": ["m"], "config": {"seeds": [0]}, "data": {"name": "toy"}}
        plots.plot_projection(results, projection, str(tmp_path / "projection.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    pngs = sorted(f for f in os.listdir(tmp_path) if f.endswith(".png"))
    assert {"paired.png", "sweep.png", "accuracy_head_tail.png", "projection.png"} <= set(pngs)
    pyplot = __import__("sys").modules.get("matplotlib.pyplot")
    assert pyplot is None or pyplot.get_fignums() == figures  # no figure left open


def test_run_evaluation_restores_the_callers_torch_rng():
    """A search drawing its next trial from torch gets its own stream back after each trial
    (the runs still start from their seeds: the results do not depend on the caller's state)."""
    data = _data()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    first = run_evaluation(_cfg(methods=["leap_full_cosface"]), data, log=_quiet, write=False)
    assert torch.equal(torch.rand(4), expected)
    torch.manual_seed(7)
    again = run_evaluation(_cfg(methods=["leap_full_cosface"]), data, log=_quiet, write=False)
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in first["runs"]]
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    with pytest.raises(TrainingDiverged):  # a failed trial restores it too
        run_evaluation(_cfg(lr=1e12), data, log=_quiet, write=False)
    assert torch.equal(torch.rand(4), expected)


def test_run_demo_restores_the_callers_torch_rng(tmp_path):
    from feature_cloud.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        data="synthetic",
        synthetic={"num_classes": 6, "max_per_class": 12, "min_per_class": 6, "dim": 8},
        num_head=2,
        tail_shots=2,
        epochs=1,
        batch_size=8,
        embedding_size=4,
        seeds=[0],
        methods=["softmax", "leap_full"],
        out=str(tmp_path),
    )
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    run_demo(cfg, log=_quiet)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.parametrize(
    "fields, error, match",
    [
        (dict(epochs="2"), TypeError, r"epochs \(--epochs\) must be an integer, got '2'"),
        (dict(epochs=1.5), TypeError, r"epochs \(--epochs\) must be an integer, got 1.5"),
        (dict(batch_size=True), TypeError, r"batch_size \(--batch-size\) must be an integer"),
        (dict(embedding_size=None), TypeError, r"embedding_size \(--embedding-size\)"),
        (dict(threshold="10"), TypeError, r"threshold \(-T\) must be an integer"),
        (dict(seeds=[0.5]), TypeError, r"each of seeds \(--seeds\) must be an integer"),
        (dict(seeds=3), TypeError, r"seeds \(--seeds\) must be a list .*, got 3"),
        (dict(seeds="012"), TypeError, r"seeds \(--seeds\) must be a list .*, got '012'"),
        (dict(methods="cosface"), TypeError, r"methods \(--methods\) must be a list .*'cosface'"),
        (dict(methods=["cosface", 1]), TypeError, r"each of methods \(--methods\) must be a str"),
        (dict(backbone=None), TypeError, r"backbone \(--backbone\) must be a str"),
        (dict(out=None), TypeError, r"out \(--out\) must be a folder path"),
        (dict(device=None), TypeError, r"device \(--device\) must be a device name"),
        (dict(leap_options=[("cloud_scale", 2.0)]), TypeError, r"leap_options \(--leap-option\)"),
        (dict(leap_options={1: 2.0}), TypeError, r"leap_options \(--leap-option\) keys must"),
        (dict(lr="0.1"), TypeError, r"lr \(--lr\) must be a real number, got '0.1'"),
        (dict(scale="64"), TypeError, r"scale \(--scale\) must be a real number"),
        (dict(shrinkage_sweep=["3"]), TypeError, r"shrinkage_sweep \(--shrinkage-sweep\)"),
        (dict(flip="no"), TypeError, r"flip \(--no-flip\) must be True or False, got 'no'"),
        (dict(lr=float("nan")), ValueError, "lr must be a finite number > 0"),  # as before
        (dict(epochs=0.0), ValueError, r"epochs \(--epochs\) must be >= 1, got 0"),
    ],
)
def test_validate_checks_the_fields_by_type(fields, error, match):
    with pytest.raises(error, match=match):
        _cfg(**fields).validate()


def test_validate_takes_integral_floats_as_integers_and_they_run():
    """``2.0`` epochs is 2 (as :func:`feature_cloud._validation.as_int` takes it): stored as an
    int, so the run is the one of the integer configuration."""
    cfg = _cfg(epochs=1.0, batch_size=8.0, embedding_size=8.0, threshold=5.0, seeds=[0.0], lr=1)
    cfg.validate()
    assert (cfg.epochs, cfg.batch_size, cfg.embedding_size, cfg.threshold) == (1, 8, 8, 5)
    assert all(type(v) is int for v in (cfg.epochs, cfg.batch_size, cfg.seeds[0]))
    assert type(cfg.lr) is float and cfg.lr == 1.0
    data = _data()
    got = run_evaluation(cfg, data, log=_quiet, write=False)["runs"]
    want = run_evaluation(_cfg(lr=1.0), data, log=_quiet, write=False)["runs"]
    assert [r["metrics"] for r in got] == [r["metrics"] for r in want]


def test_validate_stores_the_types_a_notebook_hands_in_as_results_json_does(tmp_path):
    """A ``pathlib.Path`` out, a NumPy array or tuple of methods, a ``torch.device``, ``range`` /
    ``np.arange`` seeds, an array sweep, ``leap_options=None`` or with NumPy values: stored as
    the command line's str / list / dict (they used to pass validate and fail writing
    ``results.json`` after the first trained model, leaving ``results.json.tmp``)."""
    cfg = _cfg(
        out=tmp_path / "run",
        methods=np.array(["cosface", "leap_full_cosface"]),
        device=torch.device("cpu"),
        seeds=range(2),
        shrinkage_sweep=np.array([0.0, 10.0]),
        leap_options={"cloud_scale": np.float64(2.0)},
    )
    cfg.validate()
    assert cfg.out == str(tmp_path / "run") and cfg.device == "cpu"
    assert cfg.methods == ["cosface", "leap_full_cosface"] and cfg.seeds == [0, 1]
    assert cfg.shrinkage_sweep == [0.0, 10.0] and type(cfg.leap_options["cloud_scale"]) is float
    assert all(type(m) is str for m in cfg.methods)
    assert _cfg(leap_options=None, seeds=np.arange(1)).validate() is None
    cfg = _cfg(
        out=tmp_path / "path", methods=("cosface",), device=torch.device("cpu"), leap_options=None
    )
    run_evaluation(cfg, _data(), log=_quiet)
    files = os.listdir(tmp_path / "path")
    assert "results.json" in files and "summary.md" in files and "results.json.tmp" not in files
    with open(tmp_path / "path" / "results.json") as fh:
        saved = json.load(fh)["config"]
    assert (saved["out"], saved["methods"], saved["device"]) == (cfg.out, ["cosface"], "cpu")


def test_python_adds_each_methods_baseline_as_the_command_line_does():
    """``methods=["cosface", "leap_full_cosface", "ftl"]`` used to train FTL without its
    baseline (no paired differences, no warning) where ``--methods`` adds ``ftl_base``: both now
    take the list of :func:`with_baselines`, each baseline right before its method."""
    from feature_cloud.evaluate.methods import with_baselines

    cfg = _cfg(methods=["cosface", "leap_full_cosface", "ftl"])
    cfg.validate()
    assert cfg.methods == ["cosface", "leap_full_cosface", "ftl_base", "ftl"]
    cfg = _cfg(methods=["ml2", "leap_full_arcface", "softmax"])
    cfg.validate()
    assert cfg.methods == ["softmax", "ml2", "arcface", "leap_full_arcface"]
    assert with_baselines(["cosface", "leap_full_cosface"]) == ["cosface", "leap_full_cosface"]
    cfg.validate()  # again: unchanged
    assert cfg.methods == ["softmax", "ml2", "arcface", "leap_full_arcface"]
    from feature_cloud.cli import build_parser

    args = build_parser().parse_args(["evaluate", "x.npz", "--methods", "ftl", "ml2"])
    assert with_baselines(args.methods) == ["ftl_base", "ftl", "softmax", "ml2"]


def test_resuming_a_run_saved_without_its_baseline_trains_the_baseline(tmp_path):
    """A ``results.json`` of an earlier release's Python run of a method alone (no baseline)
    pools with a run that has the baseline (``methods`` may differ) and resumes: its runs are
    reused and the baseline trains; compared with a fresh run, every difference is 0."""
    from feature_cloud.evaluate.report import compare_runs, merge_runs

    data = _data()
    old, new, fresh = (str(tmp_path / name) for name in ("old", "new", "fresh"))
    run_evaluation(_cfg(methods=["cosface", "leap_full_cosface"], out=old), data, log=_quiet)
    file = os.path.join(old, "results.json")
    with open(file) as fh:
        res = json.load(fh)  # made as the earlier release wrote methods=["leap_full_cosface"]
    res["runs"] = [r for r in res["runs"] if r["method"] == "leap_full_cosface"]
    res["methods"] = res["config"]["methods"] = ["leap_full_cosface"]
    res["labels"] = {"leap_full_cosface": res["labels"]["leap_full_cosface"]}
    res["baselines"] = {}
    with open(file, "w") as fh:
        json.dump(res, fh)
    run_evaluation(_cfg(methods=["leap_full_cosface"], seeds=[1], out=new), data, log=_quiet)
    with open(merge_runs([old, new], str(tmp_path / "pooled"))) as fh:
        pooled = json.load(fh)
    assert pooled["methods"] == ["leap_full_cosface", "cosface"]
    assert pooled["baselines"] == {"leap_full_cosface": "cosface"}
    assert len(pooled["runs"]) == 3  # leap seeds 0 and 1, cosface seed 1

    cfg = _cfg(methods=["leap_full_cosface"], out=old)
    got = run_evaluation(cfg, data, log=_quiet, resume=True)
    assert got["methods"] == ["cosface", "leap_full_cosface"]
    assert got["baselines"] == {"leap_full_cosface": "cosface"}
    assert [r["method"] for r in got["runs"]] == ["cosface", "leap_full_cosface"]
    saved = res["runs"][0]["metrics"]["fc_acc_tail"]
    assert got["runs"][1]["metrics"]["fc_acc_tail"] == saved  # reused, not trained again
    run_evaluation(_cfg(methods=["leap_full_cosface"], out=fresh), data, log=_quiet)
    cmp = compare_runs(old, fresh)
    assert cmp["config_b_vs_a"] == {} and not cmp["notes"]
    assert set(cmp["differences"]) == {"cosface", "leap_full_cosface"}
    assert all(v["mean"] == 0.0 for d in cmp["differences"].values() for v in d.values())


def test_paired_differences_reads_plain_json_and_names_what_it_does_not_find():
    """``null`` (n/a in a ``results.json`` read by ``json.load``) is NaN (it raised
    ``TypeError``); a method, baseline or metric key no run has is a ``ValueError`` naming what
    the runs have (it returned NaN with ``n`` 0, so a typo looked like a missing head); the
    differences are fractions, keyed by int seeds."""
    from feature_cloud.evaluate import paired_differences

    runs = json.loads(
        json.dumps(
            [
                {"seed": s, "method": m, "metrics": {"fc_acc_tail": v, "fc_acc_head": None}}
                for s, m, v in [(0, "cosface", 0.5), (0, "leap", 0.53), (1, "cosface", 0.4)]
                + [(1, "leap", 0.45)]
            ]
        )
    )
    d = paired_differences(runs, "leap", "cosface", ["fc_acc_tail", "fc_acc_head"])
    assert d["fc_acc_tail"]["n"] == 2 and d["fc_acc_tail"]["mean"] == pytest.approx(0.04)
    assert list(d["fc_acc_tail"]["per_seed"]) == ["0", "1"]  # as compare_runs and paired.json
    assert d["fc_acc_head"]["n"] == 0 and np.isnan(d["fc_acc_head"]["mean"])  # n/a: no head
    with pytest.raises(ValueError, match=r"no run of method 'leap_ful'.*\['cosface', 'leap'\]"):
        paired_differences(runs, "leap_ful", "cosface", ["fc_acc_tail"])
    with pytest.raises(ValueError, match=r"'cosfce'"):
        paired_differences(runs, "leap", "cosfce", ["fc_acc_tail"])
    with pytest.raises(ValueError, match=r"metric 'fc_tail_acc'; available: \['fc_acc_head'"):
        paired_differences(runs, "leap", "cosface", ["fc_tail_acc"])
    lenient = paired_differences(runs, "x", "cosface", ["y"], strict=False)  # the report's use
    assert lenient["y"]["n"] == 0


def test_paired_differences_refuses_a_method_and_seed_given_twice():
    """``a["runs"] + b["runs"]`` of two evaluations with the same seeds: each (method, seed)
    twice. It kept the last file's runs and dropped the others without a word (n 3 of 6 pairs,
    a statistics audit); now a ``ValueError`` naming the pair and ``merge_runs``, with or
    without ``strict``."""
    from feature_cloud.evaluate import paired_differences

    def runs(tail):
        return [
            {"seed": s, "method": m, "metrics": {"fc_acc_tail": v}}
            for s in (0, 1, 2)
            for m, v in (("cosface", 0.5), ("leap", 0.5 + tail * (s + 1)))
        ]

    a, b = runs(0.01), runs(0.02)
    assert paired_differences(a, "leap", "cosface", ["fc_acc_tail"])["fc_acc_tail"]["n"] == 3
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"method 'cosface' seed 0 .*merge_runs"):
            paired_differences(a + b, "leap", "cosface", ["fc_acc_tail"], strict=strict)
    again = dict(a[3], seed="1")  # leap, seed 1 as a string: the same seed
    with pytest.raises(ValueError, match=r"method 'leap' seed 1 appears in more than one run"):
        paired_differences(a + [again], "leap", "cosface", ["fc_acc_tail"])


def test_warnings_of_an_evaluation_name_the_callers_line(tmp_path):
    """A warning of ``run_evaluation`` (no head identities) and of ``load_dataset`` (a folder's
    files it does not read) is attributed to the caller's line, as the core modules' warnings
    are (it named an internal line of runner.py / demo/data.py, whose once-per-location
    registry then hid it from every later call site)."""
    import inspect
    import warnings

    from feature_cloud.evaluate import load_dataset

    Image = pytest.importorskip("PIL.Image")

    for ident in ("a", "b"):
        (tmp_path / ident).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / ident / "0.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    for _ in range(2):  # a loop of trials: attributed to the same (the caller's) line each time
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            run_evaluation(_cfg(threshold=50), _data(), log=_quiet, write=False)
        (w,) = caught
        assert "no head identities" in str(w.message)
        assert (w.filename, w.lineno) == (__file__, line)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        load_dataset(tmp_path, image_size=(4, 4))
    (w,) = caught
    assert "notes.txt" in str(w.message) and (w.filename, w.lineno) == (__file__, line)


def test_the_reports_python_equivalents_are_exported():
    """``report A B --compare``, pooling, several ``-S`` and ``--quiet``'s bars from
    ``feature_cloud.evaluate`` (README "From Python"; they were in its ``report`` module only)."""
    import feature_cloud.evaluate as E
    from feature_cloud.demo import _progress
    from feature_cloud.evaluate import report

    for name in ("compare_runs", "merge_runs", "combine_settings"):
        assert name in E.__all__ and getattr(E, name) is getattr(report, name)
    assert "set_progress" in E.__all__ and E.set_progress is _progress.set_progress
    assert E.with_baselines(["ftl"]) == ["ftl_base", "ftl"]


def test_load_dataset_takes_a_pathlib_path(tmp_path):
    """``load_dataset(Path("faces.npz"))`` as ``load_dataset("faces.npz")`` (it raised
    ``AttributeError: 'PosixPath' object has no attribute 'lower'``)."""
    from feature_cloud.evaluate import load_dataset

    images = (np.arange(12 * 4 * 4 * 3) % 256).astype(np.uint8).reshape(12, 4, 4, 3)
    np.savez(tmp_path / "faces.npz", images=images, labels=np.repeat(np.arange(3), 4))
    data = load_dataset(tmp_path / "faces.npz", image_size=(2, 2))
    assert data.x.shape == (12, 3, 2, 2) and data.num_classes == 3
    assert data.info["path"] == str(tmp_path / "faces.npz")


def test_a_diverged_trial_is_importable_and_leaves_no_empty_folder(tmp_path, monkeypatch):
    """``TrainingDiverged`` (a ``ValueError``) from ``feature_cloud.evaluate``; the output folders
    the evaluation created are removed while empty; one that holds finished runs is kept and the
    message says so; a folder that was there before stays."""
    import feature_cloud.evaluate as E
    import feature_cloud.evaluate.runner as R

    assert "TrainingDiverged" in E.__all__ and issubclass(TrainingDiverged, ValueError)
    data = _data()
    out = tmp_path / "trials" / "lr1e12"
    with pytest.raises(TrainingDiverged, match="training diverged: natural seed 0 cosface"):
        run_evaluation(_cfg(lr=1e12, out=str(out)), data, log=_quiet)
    assert os.listdir(tmp_path) == []  # trials/ and lr1e12/ were this run's, and empty
    mine = tmp_path / "mine"
    mine.mkdir()
    with pytest.raises(TrainingDiverged):
        run_evaluation(_cfg(lr=1e12, out=str(mine)), data, log=_quiet)
    assert mine.is_dir()  # the caller's folder stays

    train = R.train_model

    def second_seed_diverges(name, *args, **kw):
        if args[5] == 1:  # the seed
            raise TrainingDiverged("training diverged: seed 1")
        return train(name, *args, **kw)

    monkeypatch.setattr(R, "train_model", second_seed_diverges)
    out = tmp_path / "kept"
    with pytest.raises(TrainingDiverged) as info:
        run_evaluation(_cfg(seeds=[0, 1], out=str(out)), data, log=_quiet)
    assert str(info.value).startswith("training diverged: seed 1; the 1 run finished before it ")
    assert f"is saved in {out / 'results.json'}" in str(info.value)
    assert os.listdir(out) == ["results.json"]  # --resume / resume=True continues it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_run_evaluation_on_cuda_restores_the_gpu_rng_and_seeds_as_manual_seed():
    """On a GPU the fork covers the training device's generator too; seeding the CPU and that
    device only draws what ``torch.manual_seed`` (every device) drew there."""
    from feature_cloud.demo.runner import seed_torch

    cfg = _cfg(methods=["cosface", "leap_full_cosface"], device="cuda")
    torch.manual_seed(3)
    expected = (torch.rand(2), torch.rand(2, device="cuda"))
    torch.manual_seed(3)
    run_evaluation(cfg, _data(), log=_quiet, write=False)
    assert torch.equal(torch.rand(2), expected[0])
    assert torch.equal(torch.rand(2, device="cuda"), expected[1])
    seed_torch(5, torch.device("cuda"))
    ours = (torch.rand(2), torch.rand(2, device="cuda"))
    torch.manual_seed(5)
    assert torch.equal(torch.rand(2), ours[0])
    assert torch.equal(torch.rand(2, device="cuda"), ours[1])


def test_the_python_api_names_wrong_types_before_anything_is_written(tmp_path):
    """load_dataset's path and image_size, run_evaluation's data (a path instead of a
    LabeledData) and a hand-built LabeledData (float labels, float64 or non-finite inputs,
    camids of another length or dtype) are named in a TypeError / ValueError, before the
    output folder exists (they were torch's messages, an AttributeError or an IndexError)."""
    from feature_cloud.evaluate import load_dataset

    data = _data()
    path = tmp_path / "d.npz"
    np.savez(
        path,
        images=(data.x.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8),
        labels=data.y.numpy(),
    )
    for size, error, match in (
        ((8.5, 8), TypeError, "each of image_size"),
        (("8", "8"), TypeError, "each of image_size"),
        (8, TypeError, "two sizes"),
        ((8, 8, 3), ValueError, "two sizes"),
    ):
        with pytest.raises(error, match=match):
            load_dataset(path, image_size=size)
    assert load_dataset(path, image_size=np.array([6, 6])).x.shape[2:] == (6, 6)
    for bad in (b"d.npz", None):
        with pytest.raises(TypeError, match="path must be a str or pathlib.Path"):
            load_dataset(bad)

    def hand(x=data.x, y=data.y, camids=None):
        d = LabeledData(x, y, data.class_names, "hand")
        d.camids = camids
        return d

    out = tmp_path / "out"
    cases = [
        (str(path), TypeError, "data must be a LabeledData .* got str"),
        (hand(y=data.y.float()), TypeError, r"data.y must be a 1-D int64 \(or int32\) tensor"),
        (hand(x=data.x.double()), TypeError, "data.x must be a float32 tensor"),
        (hand(x=data.x * float("nan")), ValueError, "non-finite"),
        (hand(camids=torch.zeros(5, dtype=torch.long)), ValueError, "data.camids must be"),
        (hand(camids=torch.zeros(data.y.numel())), ValueError, "data.camids must be"),
    ]
    for given, error, match in cases:
        with pytest.raises(error, match=match):
            run_evaluation(_cfg(out=str(out)), given, log=_quiet)
        assert not out.exists()


def test_re_id_data_of_two_images_an_identity_is_pointed_to_the_open_protocol():
    """VIPeR (2 images an identity): the natural / hs error said "lower --n-test or add images"
    and not that ``--protocol open`` runs; with ``--n-test 1`` the warning advised "-T at most 0"
    (every identity head) or ``--protocol hs`` (as useless on one size); under ``--protocol
    open``, whose accuracy columns are not split, it warned the head columns would be n/a."""
    import warnings

    from feature_cloud.evaluate.runner import prepare_evaluation

    data = _data(sizes=(2,) * 12)
    for protocol in ("natural", "hs"):
        with pytest.raises(ValueError, match="need at least 2") as info:
            prepare_evaluation(_cfg(protocol=protocol, num_head=4), data, write=False)
        assert "--protocol open" in str(info.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_evaluation(_cfg(protocol="natural", n_test=1), data, write=False)
    (message,) = [str(w.message) for w in caught if "no head identities" in str(w.message)]
    assert "every identity trains on 1 image, so no -T splits them" in message, message
    assert "--protocol open" in message
    assert "-T at most 0" not in message and "--protocol hs" not in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_evaluation(_cfg(protocol="open"), data, write=False)  # runs on such data
    assert not [w for w in caught if "identities" in str(w.message)], [
        str(w.message) for w in caught
    ]


def test_the_per_seed_line_shows_the_class_weights_fc_where_it_differs(monkeypatch):
    """The per-seed console line showed only the prototypes' FC: after short training a LEAP
    head reads 0.0 on the head there while its class weights (FC(W), in every table) score
    well, read as "LEAP destroys the head". FC(W) stands beside it now where they differ."""
    from feature_cloud.evaluate import runner

    real = runner.evaluate_method

    def fake(model, *args, **kwargs):
        scalars, *rest = real(model, *args, **kwargs)
        scalars = dict(scalars)
        if fake.calls % 2:  # every second model: prototypes far below the weights
            scalars.update(fc_acc_head=0.0, fcw_acc_head=0.25, fcw_acc_tail=scalars["fc_acc_tail"])
        fake.calls += 1
        return (scalars, *rest)

    fake.calls = 0
    monkeypatch.setattr(runner, "evaluate_method", fake)
    lines = []
    run_evaluation(_cfg(methods=["cosface"], seeds=[0, 1]), _data(), log=lines.append, write=False)
    runs = [ln for ln in lines if ln.startswith("  seed ")]
    assert len(runs) == 2, lines
    assert "(FC(W)" not in runs[0], runs[0]  # the same numbers: said once
    import re

    assert re.search(r"FC head   0\.0 tail +([\d.]+) \(FC\(W\) 25\.0 / \1\) \| NN head", runs[1]), (
        runs[1]
    )


def test_a_prepared_evaluation_is_used_once(tmp_path):
    """s55 notebook finding 1: a second ``run_evaluation(..., prepared=p)`` (a re-run notebook
    cell) skipped the check of the output folder, trained every run again and appended them to
    the first call's results: results.json held each run twice (unreadable afterwards), and the
    dict the first call returned grew. Now it is refused before anything trains or is written."""
    from feature_cloud.evaluate.runner import prepare_evaluation

    data, out = _data(), tmp_path / "x"
    cfg = _cfg(out=str(out))
    p = prepare_evaluation(cfg, data, argv=["notebook"])
    first = run_evaluation(cfg, data, log=_quiet, prepared=p)
    assert first is not p.results and len(first["runs"]) == 1
    before = (out / "results.json").read_bytes()
    with pytest.raises(ValueError, match="already used by a run_evaluation call"):
        run_evaluation(cfg, data, log=_quiet, prepared=p)
    assert (out / "results.json").read_bytes() == before and len(first["runs"]) == 1
    quiet_cfg = _cfg()
    p = prepare_evaluation(quiet_cfg, data, write=False)
    a = run_evaluation(quiet_cfg, data, log=_quiet, write=False, prepared=p)
    with pytest.raises(ValueError, match="already used"):
        run_evaluation(quiet_cfg, data, log=_quiet, write=False, prepared=p)
    assert len(a["runs"]) == 1
    again = run_evaluation(quiet_cfg, data, log=_quiet, write=False)  # a fresh call: a new dict
    assert again is not a and len(a["runs"]) == 1
    assert json.dumps(again["runs"][0]["metrics"]) == json.dumps(a["runs"][0]["metrics"])


def test_a_cfg_or_data_changed_after_prepare_is_refused(tmp_path):
    """s55 notebook finding 2: ``cfg.epochs = 6`` after ``prepare_evaluation`` trained 6 epochs
    while results.json recorded the prepared 2; other data of the same size trained under the
    prepared data's name and fingerprint (of another size: an IndexError). Refused before
    anything is written, naming what changed; equal data in other tensors pass."""
    from feature_cloud.evaluate.runner import prepare_evaluation

    data, out = _data(), tmp_path / "x"
    cfg = _cfg(out=str(out))
    p = prepare_evaluation(cfg, data)
    cfg.epochs, cfg.lr = 2, 0.05
    with pytest.raises(ValueError, match=r"cfg changed .*epochs 1 -> 2; lr 0\.1 -> 0\.05"):
        run_evaluation(cfg, data, log=_quiet, prepared=p)
    cfg.epochs, cfg.lr = 1, 0.1
    cfg.seeds.append(1)  # a list field changed in place
    with pytest.raises(ValueError, match=r"seeds \[0\] -> \[0, 1\]"):
        run_evaluation(cfg, data, log=_quiet, prepared=p)
    cfg.seeds.pop()
    other = LabeledData(1.0 - data.x, data.y, data.class_names, "inverted")
    with pytest.raises(ValueError, match=r"data differ .*name 'toy' -> 'inverted', fingerprint"):
        run_evaluation(cfg, other, log=_quiet, prepared=p)
    with pytest.raises(ValueError, match=r"data differ .*samples 42 -> 45"):
        run_evaluation(cfg, _data(sizes=(16, 12, 4, 4, 3, 6)), log=_quiet, prepared=p)
    inplace = LabeledData(data.x.clone(), data.y, data.class_names, "toy")
    inplace.x[0, 0, 0, 0] += 0.5
    with pytest.raises(ValueError, match=r"data differ .*\(fingerprint\)"):
        run_evaluation(cfg, inplace, log=_quiet, prepared=p)
    assert not out.exists()  # nothing written by a refused call
    same = LabeledData(data.x.clone(), data.y.clone(), list(data.class_names), "toy")
    results = run_evaluation(cfg, same, log=_quiet, prepared=p)  # the prepared cfg and data
    assert results["config"]["epochs"] == 1 and len(results["runs"]) == 1


def test_hand_built_data_channels_last_small_int_labels_and_numpy(tmp_path):
    """s55 notebook findings 3, 4, 8: channels-last float32 images (N, H, W, C) trained
    silently as C = H channels; uint8 labels were read as a boolean mask and int16 ones
    refused by torch, each after the first model trained (an IndexError); a NumPy array was an
    AttributeError; ``run_demo`` checked nothing (uint8 images: torch's "expected scalar type
    Byte", empty output folders left). Now: labels of a small integer type become int64, the
    rest is refused before anything is written or trained, by both."""
    from feature_cloud.demo import DemoConfig, run_demo

    data, out = _data(), tmp_path / "out"
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got numpy.ndarray.*from_numpy"):
        LabeledData(data.x.numpy(), data.y, data.class_names, "np")
    with pytest.raises(TypeError, match=r"y must be a torch.Tensor, got numpy.ndarray"):
        LabeledData(data.x, data.y.numpy(), data.class_names, "np")
    hwc = LabeledData(data.x.permute(0, 2, 3, 1), data.y, data.class_names, "hwc")
    with pytest.raises(ValueError, match=r"\(42, 8, 8, 3\).*channels-last.*permute\(0, 3, 1, 2\)"):
        run_evaluation(_cfg(out=str(out)), hwc, log=_quiet)
    assert not out.exists()
    want = run_evaluation(_cfg(), data, log=_quiet, write=False)["runs"][0]["metrics"]
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        small = LabeledData(data.x, data.y.to(dtype), data.class_names, "toy")
        assert small.y.dtype == (torch.int32 if dtype == torch.int32 else torch.int64)
        got = run_evaluation(_cfg(), small, log=_quiet, write=False)["runs"][0]["metrics"]
        assert json.dumps(got) == json.dumps(want), dtype
    late = LabeledData(data.x, data.y, data.class_names, "toy")
    late.y = data.y.to(torch.uint8)  # set after construction: refused, not converted
    with pytest.raises(TypeError, match=r"int64 \(or int32\).*got torch.uint8.*boolean mask"):
        run_evaluation(_cfg(out=str(out)), late, log=_quiet)
    assert not out.exists()
    cfg = DemoConfig(
        data="imagefolder", num_head=2, tail_shots=2, epochs=1, batch_size=8, seeds=[0],
        methods=["cosface"], out=str(out / "run"),
    )  # fmt: skip
    u8 = LabeledData((data.x * 255).round().to(torch.uint8), data.y, data.class_names, "u8")
    for bad, error, match in (
        (u8, TypeError, "data.x must be a float32 tensor"),
        (hwc, ValueError, "channels-last"),
        (late, TypeError, "boolean mask"),
    ):
        with pytest.raises(error, match=match):
            run_demo(cfg, bad, log=_quiet)
        assert not out.exists()


def test_channels_first_data_with_a_narrow_width_is_not_taken_for_channels_last():
    """s56 review: the channels-last check refused channels-first data of 2 or 4 channels (or
    more) whose width is 1, 3 or 4 ((N, 2, 8, 3), (N, 4, 4, 4)) with no way around; those pass
    now, channels-last images (a larger second axis) are still refused."""
    from feature_cloud.demo.data import check_data

    y = torch.arange(6) % 3
    for shape in ((6, 2, 8, 3), (6, 4, 4, 4), (6, 4, 8, 1), (6, 1, 8, 3), (6, 3, 3, 3)):
        check_data(LabeledData(torch.rand(shape), y, ["a", "b", "c"], "chw"))
    for shape in ((6, 8, 8, 3), (6, 64, 56, 1), (6, 32, 32, 4)):
        with pytest.raises(ValueError, match="channels-last"):
            check_data(LabeledData(torch.rand(shape), y, ["a", "b", "c"], "hwc"))


def test_int32_labels_train_the_softmax_methods(tmp_path):
    """s56 review: check_data accepts int32 labels (and LabeledData keeps them), but softmax /
    ml2 (the plain linear classifier) passed them to ``F.cross_entropy``, which takes int64
    only: "expected target dtype to be Long", after the earlier methods trained, in
    ``run_evaluation`` (closed set) and ``run_demo`` (empty output folder left). They train as
    with int64 labels."""
    from feature_cloud.demo import DemoConfig, run_demo

    data = _data()
    int32 = LabeledData(data.x, data.y.int(), data.class_names, "toy")
    cfg = _cfg(methods=["ml2"])  # softmax added as its baseline
    want = run_evaluation(cfg, data, log=_quiet, write=False)["runs"]
    got = run_evaluation(_cfg(methods=["ml2"]), int32, log=_quiet, write=False)["runs"]
    assert [r["method"] for r in got] == ["softmax", "ml2"]
    assert json.dumps([r["metrics"] for r in got]) == json.dumps([r["metrics"] for r in want])
    demo = DemoConfig(
        data="imagefolder", num_head=2, tail_shots=2, epochs=1, batch_size=8, seeds=[0],
        methods=["softmax"], out=str(tmp_path / "demo"),
    )  # fmt: skip
    run_demo(demo, int32, log=_quiet)
    assert (tmp_path / "demo" / "results.json").is_file()


def test_a_run_whose_line_was_shown_is_on_disk(tmp_path):
    """s55 notebook finding 6: the run's line was logged before results.json was rewritten, so
    a Ctrl-C in a slow log (a notebook widget) lost a run the user had seen finish."""
    from feature_cloud.demo.report import load_results

    def log(line):
        if line.lstrip().startswith("seed"):
            raise KeyboardInterrupt  # Ctrl-C while the first run's line is shown

    out = tmp_path / "x"
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(_cfg(out=str(out), seeds=[0, 1]), _data(), log=log)
    saved = load_results(str(out / "results.json"))
    assert [(r["seed"], r["method"]) for r in saved["runs"]] == [(0, "cosface")]
    assert saved["complete"] is False


def test_the_returned_results_hold_json_types_and_per_seed_keys_match(tmp_path):
    """s55 notebook finding 9: ``environment.torch`` was a ``TorchVersion`` (a pickle of the
    results needed torch to load), and ``per_seed`` was keyed by int in
    ``paired_differences`` but by str in ``compare_runs`` (``per_seed[0]``: a KeyError in one
    of them). The returned dict holds JSON's own types; both key the seeds as str."""
    from feature_cloud.evaluate import compare_runs, paired_differences

    out = tmp_path / "x"
    cfg = _cfg(methods=["leap_full_cosface"], seeds=[0, 1], out=str(out))
    results = run_evaluation(cfg, _data(), log=_quiet)

    def walk(value, path="results"):
        assert type(value) in (dict, list, str, int, float, bool, type(None)), (path, type(value))
        if isinstance(value, (dict, list)):
            for k, v in value.items() if isinstance(value, dict) else enumerate(value):
                walk(v, f"{path}[{k!r}]")

    walk(results)
    assert type(results["environment"]["torch"]) is str
    paired = paired_differences(results["runs"], "leap_full_cosface", "cosface", ["fc_acc_tail"])
    cmp = compare_runs(str(out), str(out))
    assert list(paired["fc_acc_tail"]["per_seed"]) == ["0", "1"]
    assert list(cmp["differences"]["leap_full_cosface"]["fc_acc_tail"]["per_seed"]) == ["0", "1"]
