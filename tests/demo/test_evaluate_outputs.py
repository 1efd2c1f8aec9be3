"""Where an evaluation writes: an output folder that cannot be written, one inside the data,
and results files that `report` cannot render are named in one line before anything is
trained or written."""

import errno
import json
import os
import re
import shutil
import tempfile

import numpy as np
import pytest

from feature_cloud.cli import main

TINY = ["--image-size", "8", "8", "--epochs", "1", "--seeds", "0", "-T", "5", "--quiet"]


def _npz(path, sizes=(16, 12, 4, 4, 3, 3), seed=0):
    rng = np.random.RandomState(seed)
    y = np.repeat(np.arange(len(sizes)), sizes)
    proto = rng.randint(0, 255, size=(len(sizes), 12, 12, 3))
    noise = rng.randint(-30, 30, size=(y.size, 12, 12, 3))
    np.savez(path, images=np.clip(proto[y] + noise, 0, 255).astype(np.uint8), labels=y)
    return str(path)


def _read_only(monkeypatch):
    """Every new file fails as on a read-only file system (root ignores chmod)."""

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)


def _one_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("feature-cloud: error:") and err.count("\n") == 1, err
    return err


def test_an_unwritable_out_is_refused_before_anything_trains(tmp_path, capsys, monkeypatch):
    data = _npz(tmp_path / "d.npz")
    trained = []
    monkeypatch.setattr(
        "feature_cloud.evaluate.runner.train_model", lambda *a, **k: trained.append(a)
    )
    _read_only(monkeypatch)
    for out in (tmp_path / "ro", tmp_path / "ro" / "sub"):
        assert main(["evaluate", data, *TINY, "--out", str(out)]) == 2
        err = _one_error(capsys)
        assert f"--out {str(out)!r} cannot be written" in err and "Read-only" in err, err
        assert not out.exists() and not trained
    several = ["--protocol", "hs", "-H", "2", "-S", "1", "2"]
    assert main(["evaluate", data, *TINY, *several, "--out", str(tmp_path / "ro")]) == 2
    assert "cannot be written" in _one_error(capsys) and not trained
    assert main(["demo", "--epochs", "1", "--seeds", "0", "--out", str(tmp_path / "d")]) == 2
    assert "cannot be written" in _one_error(capsys)


def test_report_of_an_unwritable_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    data = _npz(tmp_path / "d.npz")
    out = tmp_path / "run"
    assert main(["evaluate", data, *TINY, "--methods", "cosface", "--out", str(out)]) == 0
    before = sorted(os.listdir(out))
    os.remove(out / "summary.md")
    _read_only(monkeypatch)
    assert main(["report", str(out), "--quiet"]) == 2
    err = _one_error(capsys)
    assert f"run folder {str(out)!r} cannot be written" in err, err
    assert sorted(os.listdir(out)) == sorted(set(before) - {"summary.md"})
    assert main(["report", str(out), str(out), "--out", str(tmp_path / "m")]) == 2
    assert "cannot be written" in _one_error(capsys)


def test_an_oserror_while_writing_is_one_line(tmp_path, capsys, monkeypatch):
    """A folder that turns unwritable during a run (a full disk) ends in one line."""
    data = _npz(tmp_path / "d.npz")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "results.json.tmp")

    monkeypatch.setattr("feature_cloud.evaluate.runner.write_json", full)
    out = tmp_path / "out"
    assert main(["evaluate", data, *TINY, "--methods", "cosface", "--out", str(out)]) == 2
    err = _one_error(capsys)
    assert "No space left on device: 'results.json.tmp'" in err, err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores chmod")
def test_a_read_only_folder_by_its_permissions_is_refused(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz")
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        assert main(["evaluate", data, *TINY, "--out", str(ro / "sub")]) == 2
        assert "cannot be written" in _one_error(capsys)
        assert main(["evaluate", data, *TINY, "--out", str(ro)]) == 2
        assert "Permission denied" in _one_error(capsys)
    finally:
        os.chmod(ro, 0o755)


def test_demo_out_that_is_a_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert main(["demo", "--epochs", "1", "--seeds", "0", "--out", str(blocker)]) == 2
    assert "is a file, not a directory" in _one_error(capsys)
    assert json.dumps(blocker.read_text()) == '""'


def test_report_root_combines_only_settings_of_one_data_and_configuration(tmp_path, capsys):
    """`report ROOT` and combine_settings: sub-runs of other data (fingerprint) or another
    configuration, two runs of one setting name and the same run twice are refused before any
    file is written (they showed as identical-looking rows)."""
    from feature_cloud.evaluate.report import combine_settings

    data = _npz(tmp_path / "d.npz")
    _npz(tmp_path / "e.npz", seed=1)
    root = tmp_path / "root"
    hs = ["--protocol", "hs", "-H", "2", "--methods", "cosface"]
    assert main(["evaluate", data, *TINY, *hs, "-S", "1", "2", "--out", str(root)]) == 0
    subs = [str(root / "H2_S1"), str(root / "H2_S2")]
    assert "H2_S2" in combine_settings(subs, str(tmp_path / "ok"))
    os.remove(root / "combined.md")
    cases = {
        "other data": ([*hs, "-S", "3"], data.replace("d.npz", "e.npz"), "data differ in"),
        "other epochs": ([*hs, "-S", "3", "--epochs", "2"], data, r"differs in \['epochs'\]"),
    }
    for name, (args, source, match) in cases.items():
        sub = root / "H2_S3"
        run = ["evaluate", source, *TINY, *args, "--out", str(sub)]
        assert main(run) == 0, name
        capsys.readouterr()
        os.remove(sub / "summary.md")
        assert main(["report", str(root), "--quiet"]) == 2, name
        assert re.search(match, _one_error(capsys)), name
        assert not (root / "combined.md").exists() and not (sub / "summary.md").exists()
        with pytest.raises(ValueError, match=match):
            combine_settings(subs + [str(sub)], str(tmp_path / "c"))
        shutil.rmtree(sub)
    with pytest.raises(ValueError, match="both setting 'H2_S1'"):
        copy = tmp_path / "copy"
        shutil.copytree(subs[0], copy)
        combine_settings([subs[0], str(copy)], str(tmp_path / "c"))
    with pytest.raises(ValueError, match="are the same run"):
        combine_settings([subs[0], subs[0] + os.sep], str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    data, out = _npz(tmp / "d.npz"), tmp / "run"
    assert main(["evaluate", data, *TINY, "--methods", "cosface", "--out", str(out)]) == 0
    with open(out / "results.json") as fh:
        return json.load(fh)


def _edit(results, path, value):
    *head, last = path
    for key in head:
        results = results[key]
    if value is KeyError:
        del results[last]
    else:
        results[last] = value


#: hand edits of a results.json and the field the error names (each crashed `report`)
EDITS = {
    "runs not a list": ([(["runs"], 5)], "runs must be a list"),
    "run not an object": ([(["runs"], [1])], r"runs\[0\] must be an object"),
    "seed as text": ([(["runs", 0, "seed"], "0")], r"runs\[0\]\.seed must be an integer"),
    "metrics null": ([(["runs", 0, "metrics"], None)], r"runs\[0\]\.metrics must be an object"),
    "huge metric": (
        [(["runs", 0, "metrics", "fc_acc_head"], 1e308)],
        r"runs\[0\]\.metrics\['fc_acc_head'\] must be a finite number",
    ),
    "metric a list": (
        [(["runs", 0, "metrics", "fc_acc_head"], [1, 2])],
        r"metrics\['fc_acc_head'\] must be a number or null",
    ),
    "per-class short": (
        [(["runs", 0, "per_class", "weight_norm"], [0.5])],
        r"per_class\['weight_norm'\] must be 6 values",
    ),
    "per_class missing": ([(["runs", 0, "per_class"], KeyError)], r"per_class must be an object"),
    "train counts short": (
        [(["splits", "0", "train_counts"], [1, 2])],
        r"splits\['0'\]\.train_counts must be 6 counts",
    ),
    "no splits": ([(["splits"], {})], "splits must be one split per seed"),
    "seed not in splits": ([(["runs", 0, "seed"], 7)], r"runs\[0\]\.seed must be a seed of splits"),
    "no runs": ([(["runs"], [])], "holds no finished run"),
    "labels missing": ([(["labels"], KeyError)], "labels must be an object"),
    "data a list": ([(["data"], [])], "data must be an object"),
    "config a list": ([(["config"], [])], "config must be an object"),
    "sweep a text": ([(["runs", 0, "sweep"], {"3": "x"})], r"sweep\['3'\] must be an object"),
    "no methods": ([(["methods"], [])], "methods must be a non-empty list"),
    "setting missing": ([(["setting"], KeyError)], "setting must be a string"),
    "run twice": ("dup", r"runs\[1\] is a second run of method 'cosface' seed 0"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_report_names_the_field_of_a_hand_edited_results_file(tmp_path, capsys, finished_run, case):
    """A results.json edited into another shape is one error naming the file and the field,
    before any file is written (tracebacks: TypeError, KeyError, ZeroDivisionError in the plots,
    OverflowError; some after 8 files)."""
    import copy

    edits, match = EDITS[case]
    results = copy.deepcopy(finished_run)
    if edits == "dup":
        results["runs"].insert(1, copy.deepcopy(results["runs"][0]))
    else:
        for path, value in edits:
            _edit(results, path, value)
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))
    assert main(["report", str(run), "--quiet"]) == 2
    err = _one_error(capsys)
    assert str(run) in err and re.search(match, err), err
    assert os.listdir(run) == ["results.json"]


def test_report_reads_nan_as_not_available_as_files_before_12_05_wrote_it(
    tmp_path, capsys, finished_run
):
    """Files written before 12-05 stored n/a as NaN (now null): the shape check refused them
    ('must be a finite number'), so report / --resume / pooling of those runs failed."""
    import copy

    results = copy.deepcopy(finished_run)
    results["runs"][0]["metrics"]["fc_acc_head"] = float("nan")
    results["runs"][0]["per_class"]["weight_norm"][0] = float("nan")
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results))  # NaN as JSON's NaN literal
    assert main(["report", str(run), "--quiet"]) == 0, capsys.readouterr().err
    assert (run / "summary.md").exists()
