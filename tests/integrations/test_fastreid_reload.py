"""The fastreid adapters under a notebook's re-execution: ``importlib.reload`` (autoreload)
replaces their own registrations, and a re-run ``add_feature_cloud_config`` / ``add_ftl_config``
keeps the values already set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("fastreid")
fr = pytest.importorskip("feature_cloud.integrations.fastreid")
ftl = pytest.importorskip("feature_cloud.integrations.fastreid_ftl")

from fastreid.config import get_cfg
from fastreid.utils.registry import Registry

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _define():
    """A class of this module named ``Head``: each call a new object of the same definition."""

    class Head:
        pass

    return Head


def test_register_once_replaces_its_own_definition_and_refuses_another():
    registry = Registry("TEST")
    first, again = _define(), _define()
    fr._register_once(registry)(first)
    assert fr._register_once(registry)(again) is again  # the module executed again
    assert registry.get("Head") is again
    other = type("Head", (), {"__module__": "another_package.heads"})
    with pytest.raises(AssertionError, match="already registered"):
        fr._register_once(registry)(other)  # another package's Head is not replaced
    assert registry.get("Head") is again


def test_importlib_reload_of_the_fastreid_adapters():
    """In a fresh process (a reload here would swap the classes under the other tests)."""
    script = """
import importlib
import feature_cloud.integrations.fastreid as fr
import feature_cloud.integrations.fastreid_ftl as ftl
from fastreid.modeling.heads import REID_HEADS_REGISTRY
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY
old = fr.LEAPHead
for _ in range(2):
    importlib.reload(fr)
    importlib.reload(ftl)
assert fr.LEAPHead is not old
assert REID_HEADS_REGISTRY.get("LEAPHead") is fr.LEAPHead
assert META_ARCH_REGISTRY.get("LEAPBaseline") is fr.LEAPBaseline
assert META_ARCH_REGISTRY.get("FTLBaseline") is ftl.FTLBaseline
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.parametrize(
    "add, node, key, value",
    [
        (fr.add_feature_cloud_config, ("MODEL", "HEADS", "FEATURE_CLOUD"), "GAMMA", 0.5),
        (ftl.add_ftl_config, ("MODEL", "FTL"), "ENERGY", 0.5),
    ],
)
def test_adding_the_config_node_again_keeps_the_values_set(add, node, key, value):
    def get(cfg):
        for name in node:
            cfg = cfg[name]
        return cfg

    cfg = add(get_cfg())
    default = dict(get(cfg))
    get(cfg)[key] = value
    del get(cfg)["SEED"]  # a key the node lacks (a config of an earlier release)
    cfg.freeze()
    add(cfg)  # the notebook cell run again
    assert get(cfg)[key] == value  # the user's edit stays
    assert get(cfg)["SEED"] == default["SEED"]  # the missing key is added
    assert set(get(cfg)) == set(default) and cfg.is_frozen()
