"""Whole-module pickles (``torch.save(module)``) written by the code of earlier commits, loaded
in a fresh process by this checkout's code (the in-process migration tests delete attributes of
this release's objects; these are the old code's own pickles, with whatever they referenced).

``tests/data/pickles_<commit>.pt.gz`` and how they were made: ``tests/data/make_pickle_fixtures.py``
(its ``RUN`` protocols run here too). What each commit's pickles must do now:

- 5cd394c, 271091d (0.1.0's layout: statistics and the cloud's generator on the head): refused by
  name with the upgrade path (a state dict), for the head and every module holding one.
  271091d's referenced ``feature_cloud._rng``, since removed: ``ModuleNotFoundError`` before.
- 44b6d06 (FeatureCloud, counter-based noise): each module's eval output, training loss and
  weight gradient as the old code computed them right after pickling.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import re
from typing import Any, Dict

import pytest
import torch

from conftest import DATA_DIR, run_fresh_python

#: the framework each module kind's pickle imports
NEEDS = {"pml": "pytorch_metric_learning", "timm": "timm.task", "fastreid": "fastreid"}
REFUSED = r"a whole-module pickle of a feature-cloud 0\.1\.0 LEAPMarginHead.*state_dict\(\)"
COMMITS = {"5cd394c": REFUSED, "271091d": REFUSED, "44b6d06": None}


def _available(kind: str) -> bool:
    module = NEEDS.get(kind)
    if module is None:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _fixture(commit: str) -> Dict[str, Any]:
    with open(os.path.join(DATA_DIR, f"pickles_{commit}.pt.gz"), "rb") as fh:
        return torch.load(io.BytesIO(gzip.decompress(fh.read())), weights_only=True)


# runs in the fresh process: unpickle each module, run its protocol, save what came out
_SCRIPT = """
import gzip, io, torch
torch.set_num_threads(1)
from make_pickle_fixtures import RUN
from test_old_pickles import _fixture
fixture = _fixture({commit!r})
results = {{}}
for name in {names!r}:
    entry = fixture["modules"][name]
    try:
        module = torch.load(io.BytesIO(entry["pickle"].numpy().tobytes()), weights_only=False)
        results[name] = RUN[entry["kind"]](module, fixture["inputs"])
    except Exception as err:
        results[name] = f"{{type(err).__name__}}: {{err}}"
torch.save(results, {out!r})
"""


@pytest.mark.parametrize("commit", sorted(COMMITS))
def test_whole_module_pickles_of_earlier_commits(commit: str, tmp_path) -> None:
    fixture = _fixture(commit)
    assert fixture["commit"] == commit
    modules = fixture["modules"]
    names = [n for n, e in modules.items() if "left_out" not in e and _available(e["kind"])]
    assert names and "head" in names
    if commit != "5cd394c":  # 0.1.0's head of 5cd394c is its only module
        assert {"head", "ftl", "scheduler"} <= set(names), names
    out = str(tmp_path / "results.pt")
    script = _SCRIPT.format(commit=commit, names=names, out=out)
    run_fresh_python(script, os.path.dirname(os.path.abspath(__file__)))
    results = torch.load(out, weights_only=True)
    refused = COMMITS[commit]
    for name in names:
        got = results[name]
        if refused is not None:
            assert isinstance(got, str), f"{commit} {name}: loaded as {type(got).__name__}"
            assert got.startswith("RuntimeError") and re.search(refused, got), (
                f"{commit} {name}: {got}"
            )
            continue
        assert not isinstance(got, str), f"{commit} {name}: {got}"
        entry = modules[name]
        for what, value in zip(("eval", "loss", "grad"), got):
            msg = f"{commit} {name}: {what}"
            torch.testing.assert_close(value, entry[what], rtol=1e-5, atol=1e-6, msg=msg)
