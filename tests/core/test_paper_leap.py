"""``feature_cloud.PAPER_LEAP``: a head built with it is the LEAP paper's, checked against an
independent NumPy reading of Eq. 3, 4 (constant ``gamma``), 5 and 9 (s53 paper trial, finding 2:
the documented recipe ``cloud_mode="paper", cloud_scale=1.0, prototype_shrinkage=None`` kept the
adaptive center rate and the tail-prior variance, so its centers and clouds were not the paper's)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import feature_cloud
from feature_cloud import PAPER_LEAP, FeatureCloud, LEAPMarginHead

C, D, B, GAMMA = 12, 64, 32, 0.1
COUNTS = np.array([40] * 4 + [5] * 8)
#: what the docstrings and README gave as the paper's LEAP before PAPER_LEAP
OLD_RECIPE = {"cloud_mode": "paper", "cloud_scale": 1.0, "prototype_shrinkage": None}
CHECKED_AT = (0, 1, 2, 59)  # early steps: classes seen once (one angle); the last step


def _paper_run(options: Dict[str, Any]) -> List[Tuple[float, float]]:
    """Train a full-rule CosFace head (s=64, m=0.35) 60 steps on a long tail; after the steps of
    :data:`CHECKED_AT`, the largest angle between its centers and Eq. 4's, and the largest
    difference between its cloud std and Eq. 9's (NumPy, float64)."""
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the full rule's and the warm-up's notes
        head = LEAPMarginHead(
            D,
            C,
            "cosface",
            scale=64.0,
            margin=0.35,
            cloud="full",
            class_counts=COUNTS.tolist(),
            seed=1,
            **options,
        )
    means = rng.normal(size=(C, D))
    centers, initialised = np.zeros((C, D)), np.zeros(C, bool)
    memory: List[List[float]] = [[] for _ in range(C)]
    out = []
    for step in range(max(CHECKED_AT) + 1):
        y = rng.choice(C, size=B, p=COUNTS / COUNTS.sum())
        x = means[y] + rng.normal(size=(B, D))
        head(torch.tensor(x, dtype=torch.float32), torch.tensor(y))
        for c in np.unique(y):  # Eq. 4: constant gamma on the batch mean, first batch initialises
            batch_mean = x[y == c].mean(0)
            centers[c] = (
                (1 - GAMMA) * centers[c] + GAMMA * batch_mean if initialised[c] else batch_mean
            )
            initialised[c] = True
        for n in range(B):  # Eq. 3, and the ring memory of Eq. 5 (P = 1: K_i angles)
            c = y[n]
            cos = x[n] @ centers[c] / np.linalg.norm(x[n]) / np.linalg.norm(centers[c])
            memory[c] = (memory[c] + [math.acos(float(np.clip(cos, -1, 1)))])[-COUNTS[c] :]
        if step not in CHECKED_AT:
            continue
        # Eq. 9: variance pooled over the classes with a variance, weights K_i - 1; a class with
        # fewer than two angles has no observed spread (sigma_i^2 = 0) and takes the whole pool
        known = np.array([len(m) >= 2 for m in memory])
        var = np.array([np.var(m, ddof=1) if len(m) >= 2 else 0.0 for m in memory])
        weight = (COUNTS - 1) * known
        pooled = (weight * var).sum() / weight.sum() if weight.sum() > 0 else 0.0
        cloud_std = np.sqrt(np.maximum(pooled - var, 0.0))
        stats = head.feature_cloud.statistics
        got, want = stats.centers.double().numpy()[initialised], centers[initialised]
        cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
        center_err = float(np.arccos(np.clip(cos, -1, 1)).max())
        std_err = float(np.abs(np.sqrt(stats.cloud_variance().double().numpy()) - cloud_std).max())
        out.append((center_err, std_err))
    return out


def test_paper_leap_reproduces_eq4_centers_and_eq9_clouds():
    for step, (center_err, std_err) in zip(CHECKED_AT, _paper_run(dict(PAPER_LEAP))):
        assert center_err < 1e-4, (step, center_err)
        assert std_err < 1e-5, (step, std_err)


@pytest.mark.parametrize(
    "options, what",
    [
        (OLD_RECIPE, "center"),  # the recipe the docs gave: adaptive centers
        ({**PAPER_LEAP, "center_rate": "adaptive"}, "center"),
        ({**PAPER_LEAP, "unknown_variance": "tail_prior"}, "std"),  # a class seen once: no cloud
    ],
)
def test_an_incomplete_recipe_is_not_the_paper(options, what):
    """The check above sees each setting: without it the head is off Eq. 4 / Eq. 9."""
    errors = _paper_run(options)
    worst = max(e[0] if what == "center" else e[1] for e in errors)
    assert worst > (2e-2 if what == "center" else 1e-2), errors


def test_paper_leap_is_one_mapping_for_every_head_and_off_the_defaults():
    """Every key is a FeatureCloud keyword, each one is reachable from the head, and each of
    the differing settings is off the default (else the mapping would name no difference)."""
    assert feature_cloud.PAPER_LEAP is PAPER_LEAP and "PAPER_LEAP" in feature_cloud.__all__
    import inspect

    params = inspect.signature(FeatureCloud.__init__).parameters
    assert set(PAPER_LEAP) <= set(params)
    differs = {k for k, v in PAPER_LEAP.items() if params[k].default != v}
    assert differs == {
        "cloud_mode",
        "cloud_scale",
        "prototype_shrinkage",
        "center_rate",
        "unknown_variance",
    }
    head = LEAPMarginHead(D, C, "cosface", class_counts=COUNTS.tolist(), **PAPER_LEAP)
    cloud, stats = head.feature_cloud, head.feature_cloud.statistics
    assert (cloud.mode, cloud.scale, cloud.prototype_shrinkage, cloud.imprint_step) == (
        "paper",
        1.0,
        None,
        None,
    )
    assert (stats.center_rate, stats.unknown_variance, stats.max_age) == ("paper", "pooled", None)
    # eval logits: s cos against the weights (no prototypes), as in the paper
    x = torch.randn(5, D)
    head(torch.randn(B, D), torch.randint(0, C, (B,)))  # centers exist: prototypes would differ
    head.eval()
    expected = 24.0 * F.normalize(x) @ F.normalize(head.weight).T
    torch.testing.assert_close(head.logits(x), expected)


def test_paper_leap_goes_into_configs_checkpoints_and_yaml():
    """``PAPER_LEAP`` (a ``MappingProxyType``, then a read-only dict subclass) could not be
    deep-copied, pickled or written to JSON, then not loaded by ``torch.load``'s default
    ``weights_only=True`` nor written by ``yaml.safe_dump`` (reviews of s53): a plain dict."""
    import copy
    import io
    import json
    import pickle

    assert type(PAPER_LEAP) is dict
    config = {"head": {"cloud": "full", **PAPER_LEAP}, "cloud": PAPER_LEAP}
    assert copy.deepcopy(config) == config == pickle.loads(pickle.dumps(config))
    assert json.loads(json.dumps(config))["cloud"] == PAPER_LEAP
    buffer = io.BytesIO()
    torch.save({"config": config, "step": torch.tensor(3)}, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["config"] == config
    # fastreid's YAML form (the extra; make test-oldest has neither fastreid nor PyYAML)
    pytest.importorskip("fastreid")
    yaml = pytest.importorskip("yaml")
    from feature_cloud.integrations.fastreid import PAPER_LEAP_YAML

    assert type(PAPER_LEAP_YAML) is dict
    assert yaml.safe_load(yaml.safe_dump({"FEATURE_CLOUD": PAPER_LEAP_YAML})) == {
        "FEATURE_CLOUD": PAPER_LEAP_YAML
    }
