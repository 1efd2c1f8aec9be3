"""Shared helpers of the fastreid integration tests: the tiny generated Market-1501 set, the
CPU-sized config and the one-thread fixture (import the fixtures into a test module to use them)."""

from __future__ import annotations

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "integrations", "fastreid_configs")  # = fastreid.config_path(...)
LEAP_YAML = os.path.join(CONFIGS, "Market1501", "leap_R50.yml")
FTL_YAML = os.path.join(CONFIGS, "Market1501", "ftl_R50.yml")

#: identities, of which the first HEAD_IDS have HEAD_IMAGES training images, the rest TAIL_IMAGES
NUM_IDS, HEAD_IDS, HEAD_IMAGES, TAIL_IMAGES = 12, 3, 16, 4


def _example_module():
    spec = importlib.util.spec_from_file_location(
        "fastreid_train_example", os.path.join(ROOT, "examples", "fastreid_train.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXAMPLE = _example_module()


@pytest.fixture(scope="module")
def market_root(tmp_path_factory):
    """A tiny long-tailed Market-1501-format set (32x16 images), set as fastreid's dataset root."""
    from fastreid.data import build as data_build

    root = str(tmp_path_factory.mktemp("market"))
    EXAMPLE.write_synthetic_market1501(
        root,
        num_ids=NUM_IDS,
        head_ids=HEAD_IDS,
        head_images=HEAD_IMAGES,
        tail_images=TAIL_IMAGES,
        size=(32, 16),
    )
    old = data_build._root
    data_build._root = root
    yield root
    data_build._root = old


def tiny_cfg(yaml, output_dir, *extra):
    """``EXAMPLE.TINY_OPTS`` (ResNet-18 from scratch, CPU) at 32x16, 3 epochs, then ``extra``."""
    opts = (
        list(EXAMPLE.TINY_OPTS)
        + [
            "INPUT.SIZE_TRAIN",
            "[32, 16]",
            "INPUT.SIZE_TEST",
            "[32, 16]",
            "SOLVER.MAX_EPOCH",
            "3",
            "TEST.EVAL_PERIOD",
            "3",
            "OUTPUT_DIR",
            str(output_dir),
        ]
        + list(extra)
    )
    return EXAMPLE.build_cfg(yaml, opts)


def record_checkpoint_loads(module, source, reached):
    """Append to ``reached``, each time ``module`` begins to load, whether it was given the
    checkpoint's (``source``'s) values; the Checkpointer's put-back of the module's own state
    after a refusal gives it its own."""
    import torch

    name, value = next((n, p) for n, p in source.named_parameters() if p.dim() > 1)
    value = value.detach().clone()

    def hook(_, state, prefix, *args):
        given = state.get(prefix + name)
        reached.append(given is not None and torch.equal(given, value))

    module.register_load_state_dict_pre_hook(hook)
