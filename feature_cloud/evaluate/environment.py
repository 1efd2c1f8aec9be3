"""What trained an evaluation's runs: the package's version and git revision, the versions of
the libraries that build or score the models, the platform, the thread count, the device and
the torch flags that change numerics. ``results.json`` records it per run (``--resume`` and
``report A B --compare`` compare it) and for the process that wrote the file."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import __version__

__all__ = [
    "environment",
    "git_revision",
    "environment_differences",
    "run_environments",
    "mixed_environments",
    "mixed_environments_note",
    "show_values",
    "ENVIRONMENT_KEYS",
]

#: the keys of :func:`environment`, in the order messages and notes name them
ENVIRONMENT_KEYS = (
    "feature_cloud",
    "git_revision",
    "git_dirty",
    "torch",
    "numpy",
    "timm",
    "pytorch_metric_learning",
    "python",
    "platform",
    "cpu_capability",
    "threads",
    "device",
    "cuda_matmul_allow_tf32",
    "cudnn_allow_tf32",
    "float32_matmul_precision",
    "cudnn_benchmark",
    "cudnn_deterministic",
    "deterministic_algorithms",
    "cublas_workspace_config",
)

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _git_dir(root: str) -> Optional[str]:
    """``root/.git`` (a folder, or a worktree's / submodule's ``gitdir:`` file), or ``None``."""
    dot = os.path.join(root, ".git")
    if os.path.isdir(dot):
        return dot
    text = _read(dot) if os.path.isfile(dot) else None
    if text and text.startswith("gitdir:"):
        return os.path.normpath(os.path.join(root, text[len("gitdir:") :].strip()))
    return None


#: git's repository-local environment variables (``git rev-parse --local-env-vars``, less the
#: ``-c`` options): a git hook or a CI job sets them (``GIT_DIR``, ``GIT_WORK_TREE``,
#: ``GIT_INDEX_FILE``, ...), and a ``git status`` inheriting them read another repository,
#: work tree or index than the package's
_GIT_LOCAL_ENV = (
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_CONFIG",
    "GIT_OBJECT_DIRECTORY",
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_GRAFT_FILE",
    "GIT_INDEX_FILE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_REPLACE_REF_BASE",
    "GIT_PREFIX",
    "GIT_INTERNAL_SUPER_PREFIX",
    "GIT_SHALLOW_FILE",
    "GIT_COMMON_DIR",
)


def _git_env() -> Dict[str, str]:
    """The environment of the git commands run here: this process's, without
    :data:`_GIT_LOCAL_ENV` (git then finds the package's checkout from ``-C``)."""
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCAL_ENV}
    env.update(GIT_OPTIONAL_LOCKS="0", GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    return env


def _checkout(root: str) -> Optional[Tuple[str, str]]:
    """``(top, gitdir)`` of the checkout holding ``root``: ``.git`` looked up from ``root``
    upward, as git does (not past a ``GIT_CEILING_DIRECTORIES`` entry, nor onto another
    filesystem unless ``GIT_DISCOVERY_ACROSS_FILESYSTEM`` is set); ``None`` if there is none."""
    path = os.path.abspath(root)
    ceilings = {
        os.path.abspath(c)
        for c in os.environ.get("GIT_CEILING_DIRECTORIES", "").split(os.pathsep)
        if c
    }
    across = os.environ.get("GIT_DISCOVERY_ACROSS_FILESYSTEM", "").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    try:
        device = os.stat(path).st_dev
    except OSError:
        return None
    while True:
        gitdir = _git_dir(path)
        if gitdir is not None:
            return path, gitdir
        parent = os.path.dirname(path)
        if parent == path or parent in ceilings:
            return None
        try:
            if not across and os.stat(parent).st_dev != device:
                return None
        except OSError:
            return None
        path = parent


def _head_commit(gitdir: str) -> Optional[str]:
    """The commit ``HEAD`` names, read from the files (loose ref, ``packed-refs``; a worktree's
    refs in its ``commondir``), without running git."""
    head = _read(os.path.join(gitdir, "HEAD"))
    if not head:
        return None
    if not head.startswith("ref:"):
        return head if _SHA.match(head) else None
    ref = head[len("ref:") :].strip()
    common = _read(os.path.join(gitdir, "commondir"))
    bases = [gitdir] + ([os.path.normpath(os.path.join(gitdir, common))] if common else [])
    for base in bases:
        sha = _read(os.path.join(base, *ref.split("/")))
        if sha and _SHA.match(sha):
            return sha
    for base in bases:
        packed = _read(os.path.join(base, "packed-refs")) or ""
        for line in packed.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] == ref and _SHA.match(parts[0]):
                return parts[0]
    return None


def _git(root: str, *args: str) -> Optional[bytes]:
    """The output of ``git -C root args`` (environment: :func:`_git_env`); ``None`` without
    git, or when it fails or takes over 10 s."""
    git = shutil.which("git")
    if git is None:
        return None
    try:
        done = subprocess.run(
            [git, "-C", root, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            env=_git_env(),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _dirty(root: str) -> Optional[bool]:
    """Whether the package's files differ from ``HEAD`` (``git status`` of ``feature_cloud/``
    and ``integrations/`` under ``root``, the adapters, untracked files included; another
    part of a larger repository does not count); ``None`` without git, or when it fails or
    takes over 10 s."""
    out = _git(root, "status", "--porcelain", "--", "feature_cloud", "integrations")
    return None if out is None else bool(out.strip())


def _tracked(root: str) -> bool:
    """Whether the checkout holding ``root`` tracks the package (``feature_cloud/__init__.py``
    under ``root``): not so for a package installed into a virtual environment inside
    another project's checkout. ``False`` without git."""
    out = _git(root, "ls-files", "--", os.path.join("feature_cloud", "__init__.py"))
    return bool(out and out.strip())


def _revision(root: str) -> Tuple[Optional[str], Optional[bool]]:
    """:func:`git_revision` of a package ``feature_cloud/`` under ``root``."""
    found = _checkout(root)
    if found is not None:
        top, gitdir = found
        commit = _head_commit(gitdir)
        # a .git above root (a package in a subfolder of a larger repository) counts where
        # that repository tracks the package, which needs git to tell
        if commit is not None and (top == os.path.abspath(root) or _tracked(root)):
            return commit, _dirty(root)
    return _installed_commit(), None


def _installed_commit() -> Optional[str]:
    """The commit pip recorded when the package was installed from a git URL (PEP 610)."""
    try:
        text = importlib.metadata.distribution("feature-cloud").read_text("direct_url.json")
        commit = json.loads(text or "{}").get("vcs_info", {}).get("commit_id")
    except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError, OSError):
        return None
    return commit if isinstance(commit, str) else None


def git_revision() -> Tuple[Optional[str], Optional[bool]]:
    """``(commit, dirty)`` of the code this process imported: where ``feature_cloud`` is
    imported from a git checkout, its ``HEAD`` commit (read from ``.git``, no git needed) and
    whether ``feature_cloud/`` or ``integrations/`` differ from it (``git status``, ``None``
    without git); otherwise
    the commit pip recorded for an install from a git URL (dirty ``None``), or ``(None, None)``.
    The checkout's ``.git`` is looked up from the package's folder upward, as git does: a
    package in a subfolder of a larger repository records that repository's commit (where it
    tracks the package: git tells), and dirty for the package's paths only. git runs without
    the repository variables a hook or CI may set (``GIT_DIR``, ``GIT_WORK_TREE``,
    ``GIT_INDEX_FILE``, ...: :data:`_GIT_LOCAL_ENV`), which pointed it at another repository.
    Read on every call (one ``git status``; :func:`environment` once per evaluation), not
    once per process: a notebook that edits the checkout and reloads the code records it."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return _revision(os.path.dirname(package))


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_name(device: str) -> str:
    """``device`` and, for a GPU, its name (``"cuda:0 (NVIDIA H200)"``)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return str(dev)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def environment(device: str = "cpu") -> Dict[str, Any]:
    """What trains a run in this process on ``device`` (:data:`ENVIRONMENT_KEYS`): versions
    (``None``: a library not installed), the git revision (``None``: not a checkout), the
    platform and CPU instruction set torch uses, torch's CPU threads, the device, and the torch
    flags that change numerics (TF32, cuDNN benchmark / deterministic, deterministic
    algorithms, ``CUBLAS_WORKSPACE_CONFIG``)."""
    commit, dirty = git_revision()
    with warnings.catch_warnings():  # newer torch warns on the TF32 flags' old names
        warnings.simplefilter("ignore")
        matmul_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        cudnn_tf32 = bool(torch.backends.cudnn.allow_tf32)
    cpu = getattr(torch.backends, "cpu", None)
    return {
        "feature_cloud": __version__,
        "git_revision": commit,
        "git_dirty": dirty,
        "torch": str(torch.__version__),  # a plain str (TorchVersion pickles with torch)
        "numpy": np.__version__,
        "timm": _version("timm"),
        "pytorch_metric_learning": _version("pytorch-metric-learning"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": cpu.get_cpu_capability() if cpu is not None else None,
        "threads": torch.get_num_threads(),
        "device": _device_name(device),
        "cuda_matmul_allow_tf32": matmul_tf32,
        "cudnn_allow_tf32": cudnn_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def _ordered(keys: Sequence[str]) -> List[str]:
    known = [k for k in ENVIRONMENT_KEYS if k in keys]
    return known + sorted(k for k in keys if k not in ENVIRONMENT_KEYS)


def _distinct(envs: Sequence[Dict[str, Any]], key: str) -> List[Any]:
    values: List[Any] = []
    for e in envs:
        if key in e and e[key] not in values:
            values.append(e[key])
    return values


def show_values(values: Sequence[Any]) -> str:
    """``2`` or ``1 and 2`` (a file whose runs mix them); ``null`` for ``None``."""
    shown = ["null" if v is None else str(v) for v in values]
    return " and ".join(shown) if shown else "n/a"


def environment_differences(
    first: Sequence[Dict[str, Any]], second: Sequence[Dict[str, Any]]
) -> Tuple[Dict[str, Tuple[List[Any], List[Any]]], List[str]]:
    """Between two sets of run environments (each set: the distinct environments of one
    file's runs): ``({key: (second's values, first's values)}, keys only one set records)``
    for every key both record whose values differ (a set mixing values differs from one that
    does not)."""
    keys_a = {k for e in first for k in e}
    keys_b = {k for e in second for k in e}
    diff: Dict[str, Tuple[List[Any], List[Any]]] = {}
    for k in _ordered(list(keys_a & keys_b)):
        va, vb = _distinct(first, k), _distinct(second, k)
        if va != vb:
            diff[k] = (vb, va)
    return diff, _ordered(list(keys_a ^ keys_b))


def run_environments(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The distinct environments of ``results``' runs: each run's own (``environment``), or,
    for a run of an earlier release that recorded none, the file's."""
    top = results.get("environment")
    envs: List[Dict[str, Any]] = []
    for r in results.get("runs", []):
        e = r.get("environment", top)
        if isinstance(e, dict) and e not in envs:
            envs.append(e)
    if not envs and isinstance(top, dict):
        envs.append(top)
    return envs


def mixed_environments(results: Dict[str, Any]) -> Tuple[Dict[str, List[Any]], int, int]:
    """Where ``results``' runs were trained in more than one environment (a merge of runs of
    two machines, a resume after an upgrade): ``({key: its values across the runs}, pairs,
    crossing)``, ``crossing`` of the ``pairs`` (method, seed) with its baseline run being a
    method run and its baseline run of different environments (their paired difference
    includes the environments' difference). ``({}, pairs, 0)`` where every run shares one."""
    top = results.get("environment")
    env_of = {
        (str(r["method"]), int(r["seed"])): r.get("environment", top) for r in results["runs"]
    }
    envs = [e for e in run_environments(results) if isinstance(e, dict)]
    keys = _ordered(list({k for e in envs for k in e}))
    mixed = {k: v for k in keys if len(v := _distinct(envs, k)) > 1}
    pairs = crossing = 0
    for (method, seed), env in env_of.items():
        base = results.get("baselines", {}).get(method)
        if base is None or (base, seed) not in env_of:
            continue
        pairs += 1
        crossing += int(env != env_of[(base, seed)])
    return mixed, pairs, crossing


def mixed_environments_note(results: Dict[str, Any]) -> Optional[str]:
    """One sentence naming the environment keys whose values differ between ``results``'
    runs and how many paired seeds pair runs of different environments; ``None`` where
    every run shares one environment."""
    mixed, pairs, crossing = mixed_environments(results)
    if not mixed:
        return None
    named = "; ".join(f"{k} {show_values(v)}" for k, v in mixed.items())
    return (
        f"the runs were trained in more than one environment ({named}): {crossing} of "
        f"{pairs} paired (method, seed) differences pair a method and its baseline trained in "
        "different environments and include that difference, not the method's alone "
        "(results.json records each run's environment)"
    )
