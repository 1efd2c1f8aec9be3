"""What ``results.json`` records about the environment that trained each run, and what
``--resume`` and ``report A B --compare`` do with it (reproducibility trial s50, findings 2-5)."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import TORCH_VERSION

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_npz(path):
    rng = np.random.RandomState(0)
    sizes = [16, 12, 4, 4, 3, 3]
    y = np.repeat(np.arange(len(sizes)), sizes)
    proto = rng.randint(0, 255, size=(len(sizes), 12, 12, 3))
    noise = rng.randint(-30, 30, size=(y.size, 12, 12, 3))
    np.savez(path, images=np.clip(proto[y] + noise, 0, 255).astype(np.uint8), labels=y)


def _common(p):
    args = ["evaluate", p, "-T", "5", "--n-test", "1", "--methods", "cosface", "--epochs", "1"]
    return args + [
        "--batch-size",
        "8",
        "--embedding-size",
        "8",
        "--image-size",
        "8",
        "8",
        "--quiet",
    ]


def _load(out):
    with open(os.path.join(out, "results.json")) as fh:
        return json.load(fh)


def _save(res, out):
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(res, fh)


def _forge(res, **values):
    """Set ``values`` in the file's environment and in every run's (where it has one)."""
    for env in [res["environment"]] + [r["environment"] for r in res["runs"] if "environment" in r]:
        env.update(values)


def test_results_json_records_the_command_versions_revision_and_numerics_flags(
    tmp_path,
):
    """Finding 4: the command line as given, the package's git revision (this checkout's HEAD),
    numpy / timm / PML versions, the platform and the torch flags that change numerics, for the
    file and for every run."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    out = str(tmp_path / "run")
    argv = ["feature-cloud", *_common(p), "--seeds", "0", "--out", out]
    assert main(argv[1:]) == 0  # in this process: pytest's sys.argv is not the command
    res = _load(out)
    assert res["argv"] == argv
    from feature_cloud.evaluate import environment as E

    env = res["environment"]
    assert set(E.ENVIRONMENT_KEYS) <= set(env)
    assert env["numpy"] == np.__version__ and env["torch"] == torch.__version__
    assert env["threads"] == 1 and env["device"] == "cpu"
    assert env["deterministic_algorithms"] is torch.are_deterministic_algorithms_enabled()
    assert env["cudnn_benchmark"] is torch.backends.cudnn.benchmark
    assert isinstance(env["cuda_matmul_allow_tf32"], bool) and env["platform"]
    for dist, key in (("timm", "timm"), ("pytorch_metric_learning", "pytorch_metric_learning")):
        try:
            mod = __import__(dist)
        except ImportError:
            assert env[key] is None
        else:
            assert env[key] == mod.__version__
    git = shutil.which("git")
    if git and os.path.exists(os.path.join(REPO_ROOT, ".git")):
        head = subprocess.run(
            [git, "-C", REPO_ROOT, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        assert env["git_revision"] == head and isinstance(env["git_dirty"], bool)
    assert [r["environment"] for r in res["runs"]] == [env]


def test_git_revision_reads_the_files_of_a_checkout_and_a_worktree(tmp_path):
    """HEAD through a loose ref, ``packed-refs``, a worktree's ``gitdir:`` file and its
    ``commondir``, a detached HEAD; nothing for a folder that is no checkout."""
    from feature_cloud.evaluate import environment as E

    sha, other = "a" * 40, "b" * 40
    main = tmp_path / "repo" / ".git"
    (main / "refs" / "heads").mkdir(parents=True)
    (main / "HEAD").write_text("ref: refs/heads/main\n")
    (main / "refs" / "heads" / "main").write_text(sha + "\n")
    assert E._head_commit(E._git_dir(str(tmp_path / "repo"))) == sha
    (main / "refs" / "heads" / "main").unlink()
    (main / "packed-refs").write_text(f"# pack-refs\n{other} refs/heads/main\n")
    assert E._head_commit(str(main)) == other
    wt = main / "worktrees" / "wt"
    wt.mkdir(parents=True)
    (wt / "HEAD").write_text("ref: refs/heads/main\n")
    (wt / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {wt}\n")
    assert E._head_commit(E._git_dir(str(tmp_path / "wt"))) == other
    (wt / "HEAD").write_text(sha + "\n")  # detached
    assert E._head_commit(str(wt)) == sha
    assert E._git_dir(str(tmp_path)) is None
    assert E._dirty(str(tmp_path)) in (None, False, True)  # no checkout: no hang, no error


def test_resume_refuses_another_thread_count_and_names_every_other_difference(tmp_path, capsys):
    """Finding 2: ``--resume`` in another environment. Another thread count (the user's to set)
    is refused with the flag that matches; other versions are a warning naming each
    difference; the resumed runs keep the environment that trained them (a file of an earlier
    release, without per-run environments: the file's), the new runs record this one."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    out = str(tmp_path / "run")
    assert main([*_common(p), "--seeds", "0", "--out", out]) == 0
    res = _load(out)
    for r in res["runs"]:  # as an earlier release wrote it: one environment for the file
        r.pop("environment", None)
    _forge(res, threads=8)
    _save(res, out)
    capsys.readouterr()
    assert main([*_common(p), "--seeds", "0", "1", "--out", out, "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        "trained with 8 CPU thread(s) (environment.threads), this process has 1" in err
        and "--threads 8" in err
    ), err
    assert _load(out) == res  # nothing trained or written
    _forge(res, threads=1, torch="2.0.0", feature_cloud="0.1.0", python="3.9.0")
    _save(res, out)
    assert main([*_common(p), "--seeds", "0", "1", "--out", out, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "were trained in another environment" in err, err
    for named in ("feature_cloud 0.1.0 (file) vs", "torch 2.0.0 (file) vs", "python 3.9.0"):
        assert named in err, err
    done = _load(out)
    envs = {r["seed"]: r["environment"] for r in done["runs"]}
    assert envs[0]["torch"] == "2.0.0" and envs[1]["torch"] == torch.__version__
    assert done["environment"]["torch"] == torch.__version__  # the process that wrote the file
    assert done["earlier_argv"] == [res["argv"]]


def test_compare_names_every_environment_difference(tmp_path, capsys):
    """Finding 3: two evaluations of one configuration and seeds but another thread count or
    torch: each difference is a note, whatever the baselines show."""
    from feature_cloud.cli import main

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*_common(p)[:7], "leap_full_cosface", *_common(p)[8:], "--seeds", "0"]
    assert main([*common, "--out", a]) == 0
    shutil.copytree(a, b)
    res = _load(b)
    _forge(res, threads=2, torch="9.9.9")
    res["config"]["out"] = b
    _save(res, b)
    capsys.readouterr()
    out = str(tmp_path / "cmp")
    assert main(["report", a, b, "--compare", "--out", out]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "compare.json")) as fh:
        cmp = json.load(fh)
    assert cmp["config_b_vs_a"] == {}
    notes = cmp["notes"]
    assert any("environments differ in threads: 2 (B) vs 1 (A)" in n for n in notes), notes
    assert any(f"torch: 9.9.9 (B) vs {torch.__version__} (A)" in n for n in notes), notes
    assert "Note: the runs' environments differ in threads" in printed
    assert cmp["environment_b_vs_a"]["threads"] == [[2], [1]]
    # identical environments: no note
    assert main(["report", a, a, "--compare"]) == 0
    assert "Note:" not in capsys.readouterr().out


def _backward_ops(t):
    seen, names, todo = set(), set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo += [n for n, _ in fn.next_functions]
    return names


def test_conv_backbones_have_no_backward_without_a_deterministic_cuda_kernel():
    """Finding 5 (conv4): on a (faked) CUDA device the backbones' global average pooling is a
    mean (``AdaptiveAvgPool2d(1)`` dispatches to ``mean``, whose backward is deterministic), not
    ``adaptive_avg_pool2d_backward_cuda``, which deterministic mode refuses."""
    fake = pytest.importorskip("torch._subclasses.fake_tensor")
    if TORCH_VERSION < (2, 3) and not torch.cuda.is_available():
        pytest.skip("torch < 2.3 initialises CUDA for fake CUDA tensors (needs a driver)")
    from feature_cloud.demo.methods import ConvBackbone
    from feature_cloud.evaluate.backbones import ConvNet4

    refused = {"AdaptiveAvgPool2DBackward0", "UpsampleBilinear2DBackward0"}
    with fake.FakeTensorMode(), torch.device("cuda"):
        for net in (ConvNet4(3, 16), ConvBackbone(3, 16)):
            y = net.train()(torch.empty(4, 3, 12, 10))
            assert y.device.type == "cuda"
            ops = _backward_ops(y.sum())
            assert "MeanBackward1" in ops and not ops & refused, sorted(ops)


def test_dirty_sees_the_adapters_too(tmp_path):
    """``git_dirty`` read ``feature_cloud/`` only: an edited adapter (``integrations/``, installed
    as ``feature_cloud.integrations``) was recorded as a clean checkout."""
    from feature_cloud.evaluate import environment as E

    if shutil.which("git") is None:
        pytest.skip("needs git")
    root = str(tmp_path)
    for folder in ("feature_cloud", "integrations"):
        os.makedirs(os.path.join(root, folder))
        with open(os.path.join(root, folder, "a.py"), "w") as fh:
            fh.write("x = 1\n")
    git = ["git", "-C", root, "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    assert E._dirty(root) is False
    with open(os.path.join(root, "integrations", "a.py"), "w") as fh:
        fh.write("x = 2\n")
    assert E._dirty(root) is True


def _git_repo(root, files):
    """A git repository at ``root`` holding ``files`` (``{relative path: text}``), committed;
    returns its HEAD commit."""
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            fh.write(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "c"]):
        subprocess.run([*git, *args], check=True, env=env)
    done = subprocess.run([*git, "rev-parse", "HEAD"], check=True, env=env, capture_output=True)
    return done.stdout.decode().strip()


def _revision_of(monkeypatch, root):
    """``git_revision()`` of a package ``feature_cloud/`` imported from ``root``."""
    from feature_cloud.evaluate import environment as E

    fake = os.path.join(str(root), "feature_cloud", "evaluate", "environment.py")
    with monkeypatch.context() as m:
        m.setattr(E, "__file__", fake)
        return E.git_revision()


PACKAGE = {"feature_cloud/__init__.py": "x = 1\n", "integrations/a.py": "y = 1\n"}


def test_git_status_ignores_the_repository_variables_of_a_hook_or_ci(tmp_path, monkeypatch):
    """s51 finding 13: with ``GIT_DIR`` / ``GIT_WORK_TREE`` / ``GIT_INDEX_FILE`` set (a git hook,
    some CI), ``git status`` read that repository, work tree or index: a clean checkout was
    recorded ``git_dirty: True``."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    head = _git_repo(tmp_path / "pkg", PACKAGE)
    _git_repo(tmp_path / "other", {"feature_cloud/b.py": "z = 1\n"})
    (tmp_path / "other" / "feature_cloud" / "b.py").write_text("z = 2\n")  # other: dirty
    for env in (
        {"GIT_DIR": str(tmp_path / "other" / ".git"), "GIT_WORK_TREE": str(tmp_path / "other")},
        {"GIT_DIR": str(tmp_path / "other" / ".git")},
        {"GIT_INDEX_FILE": str(tmp_path / "no-index")},
    ):
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert _revision_of(monkeypatch, tmp_path / "pkg") == (head, False), env
    (tmp_path / "pkg" / "integrations" / "a.py").write_text("y = 2\n")
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "other" / ".git"))
    assert _revision_of(monkeypatch, tmp_path / "pkg") == (head, True)


def test_a_package_in_a_subfolder_of_a_larger_repository(tmp_path, monkeypatch):
    """s51 finding 13: ``.git`` was looked for in the package's folder only, so a package in
    a subfolder of a larger repository (a monorepo) was recorded ``(None, None)``. Now it is
    looked up upward as git does, and ``git_dirty`` is the package's paths only; a package
    installed into a virtual environment that another project's checkout ignores is not
    recorded as that project's commit."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    from feature_cloud.evaluate import environment as E

    files = {f"libs/pkg/{k}": v for k, v in PACKAGE.items()}
    head = _git_repo(tmp_path / "mono", {**files, "app/main.py": "a = 1\n"})
    pkg = tmp_path / "mono" / "libs" / "pkg"
    assert _revision_of(monkeypatch, pkg) == (head, False)
    (tmp_path / "mono" / "app" / "main.py").write_text("a = 2\n")  # outside the package
    (tmp_path / "mono" / "libs" / "new.py").write_text("n = 1\n")
    assert _revision_of(monkeypatch, pkg) == (head, False)
    (pkg / "feature_cloud" / "__init__.py").write_text("x = 2\n")
    assert _revision_of(monkeypatch, pkg) == (head, True)
    # a package installed into an ignored virtual environment inside another checkout
    _git_repo(tmp_path / "project", {".gitignore": ".venv/\n", "main.py": "m = 1\n"})
    site = tmp_path / "project" / ".venv" / "lib" / "site-packages"
    (site / "feature_cloud").mkdir(parents=True)
    (site / "feature_cloud" / "__init__.py").write_text("x = 1\n")
    assert _revision_of(monkeypatch, site) == (E._installed_commit(), None)


def test_merging_runs_of_two_environments_warns_and_the_report_says_so(tmp_path, capsys):
    """Left alone in s50: runs of two machines (or torch versions) pooled by ``report A B
    --out`` gave one table with no word of it, and a run resumed in another environment can pair
    a method trained there with its baseline trained here. The merge warns naming every
    differing key and the crossing pairs; summary.md and paired.md say it too; one
    environment: silent."""
    import warnings

    from feature_cloud.cli import main
    from feature_cloud.evaluate.report import merge_runs, render_evaluation

    p = str(tmp_path / "d.npz")
    _tiny_npz(p)
    common = _common(p)
    common = [*common[:7], "leap_full_cosface", *common[8:]]
    a, b, b2 = (str(tmp_path / n) for n in ("a", "b", "b2"))
    assert main([*common, "--seeds", "0", "--out", a]) == 0
    assert main([*common, "--seeds", "1", "--out", b]) == 0
    shutil.copytree(b, b2)
    capsys.readouterr()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = merge_runs([a, b], str(tmp_path / "same"))
    files = render_evaluation(merged, log=lambda s: None)
    with open(files["summary.md"]) as fh:
        assert "more than one environment" not in fh.read()

    res = _load(b)  # another machine: every run of b
    _forge(res, threads=2, torch="9.9.9")
    _save(res, b)
    with pytest.warns(UserWarning) as caught:
        merge_runs([a, b], str(tmp_path / "machines"))
    text = " ".join(str(w.message) for w in caught)
    assert f"torch {torch.__version__} and 9.9.9" in text, text
    assert "threads 1 and 2" in text, text
    assert "0 of 2 paired (method, seed) differences" in text, text

    res = _load(b2)  # resumed elsewhere: the method's run only
    [run] = [r for r in res["runs"] if r["method"] == "leap_full_cosface"]
    run["environment"]["torch"] = "9.9.9"
    _save(res, b2)
    with pytest.warns(UserWarning, match="1 of 2 paired"):
        merged = merge_runs([a, b2], str(tmp_path / "resumed"))
    files = render_evaluation(merged, log=lambda s: None)
    for name in ("summary.md", "paired.md"):
        with open(files[name]) as fh:
            text = fh.read()
        assert "1 of 2 paired (method, seed) differences" in text, name
        assert f"torch {torch.__version__} and 9.9.9" in text, name


def test_git_dirty_is_read_again_by_each_evaluation(tmp_path, monkeypatch):
    """s55 notebook finding 7: ``git_revision()`` was cached for the process, so a notebook
    that edited the checkout and reloaded the code recorded ``git_dirty: false`` (and a commit
    made since, the old one) in every later results.json. Each call reads it again."""
    if shutil.which("git") is None:
        pytest.skip("needs git")
    from feature_cloud.evaluate import environment as E

    head = _git_repo(tmp_path / "pkg", PACKAGE)
    fake = os.path.join(str(tmp_path / "pkg"), "feature_cloud", "evaluate", "environment.py")
    monkeypatch.setattr(E, "__file__", fake)
    assert E.environment()["git_dirty"] is False and E.git_revision() == (head, False)
    (tmp_path / "pkg" / "feature_cloud" / "__init__.py").write_text("x = 2\n")  # edited
    assert E.environment()["git_dirty"] is True and E.git_revision() == (head, True)
