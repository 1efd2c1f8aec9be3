"""The load checks' finiteness test (one ``aminmax`` pass instead of C x D ``isfinite``
temporaries) and the statistics checked once per load (it ran three times: the head's, the
cloud's and the statistics' own ``_load_from_state_dict``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_same_state, state_snapshot
from feature_cloud import LEAPMarginHead
from feature_cloud._validation import any_nonfinite
from feature_cloud.checkpoints import CheckedBeforeLoading
from feature_cloud.statistics import ClassStatistics

C, D = 12, 8


def _reference(t: torch.Tensor) -> bool:
    return not bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_any_nonfinite_gives_isfinites_verdict(dtype):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 64, 1000, 4097):
        clean = torch.randn(n, generator=gen).to(dtype)
        assert not bool(any_nonfinite(clean)) and not _reference(clean)
        for pos in sorted({0, n // 2, n - 1}):
            for bad in (float("nan"), float("inf"), -float("inf")):
                t = clean.clone()
                t[pos] = bad
                assert bool(any_nonfinite(t)) and _reference(t), (dtype, n, pos, bad)
                # 2-d, non-contiguous (a transposed view), 0-d
                wide = t.view(-1, 1).expand(n, 3).t()
                assert bool(any_nonfinite(wide)) == _reference(wide)
        assert bool(any_nonfinite(clean[0].reshape(()))) is False
        assert bool(any_nonfinite(torch.tensor(float("nan"), dtype=dtype))) is True
    big = (
        torch.full((3,), 6e4, dtype=dtype) if dtype == torch.float16 else torch.ones(3, dtype=dtype)
    )
    assert not bool(any_nonfinite(big))  # large finite values are not infinite


def test_any_nonfinite_edge_inputs():
    for t in (
        torch.empty(0),
        torch.empty(0, 5),
        torch.arange(5),
        torch.tensor([True, False]),
        torch.zeros(3, dtype=torch.uint8),
    ):
        assert bool(any_nonfinite(t)) is _reference(t) is False
    flag = any_nonfinite(torch.empty(4, 3, device="meta"))
    assert flag.is_meta and flag.dtype == torch.bool and flag.dim() == 0
    assert bool(any_nonfinite(torch.tensor([1 + 1j, complex(float("nan"), 0)])))
    assert not bool(any_nonfinite(torch.tensor([1 + 1j])))


def _head(seed=0):
    head = LEAPMarginHead(D, C, "cosface", class_counts=[3] * C, warmup_steps=0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        x = torch.randn(2 * C, D, generator=gen)
        y = torch.arange(C).repeat(2)
        head(x, y).backward()
    return head


def test_weight_refusal_still_counts_the_bad_values():
    state = _head().state_dict()
    state["weight"] = state["weight"].clone()
    state["weight"][0, 0] = float("nan")
    state["weight"][3, 1] = float("inf")
    state["weight"][5, 2] = -float("inf")
    fresh = _head(seed=1)
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=rf"weight holds 3 NaN / infinite values \(of {C * D}\)"):
        fresh.load_state_dict(state)
    assert_same_state(state_snapshot(fresh), before, "after a refused weight")


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("centers", float("nan"), "non-finite centers"),
        ("centers", float("inf"), "non-finite centers"),
        ("centers", -float("inf"), "non-finite centers"),
        ("memory", float("nan"), "memory angles outside"),
        ("memory", float("inf"), "memory angles outside"),
        ("memory", -0.5, "memory angles outside"),
        ("memory", 4.0, "memory angles outside"),
    ],
)
def test_damaged_statistics_refused_before_anything_loads(key, value, match):
    state = _head().state_dict()
    name = "feature_cloud.statistics." + key
    assert state[name].numel() > 0
    state[name] = state[name].clone()
    state[name].view(-1)[1] = value
    fresh = _head(seed=1)
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(state)
    assert_same_state(state_snapshot(fresh), before, "after refused statistics")


def _count_checks(monkeypatch):
    calls = []
    original = ClassStatistics._check_state_values

    def counted(self, state_dict, prefix):
        calls.append(prefix)
        return original(self, state_dict, prefix)

    monkeypatch.setattr(ClassStatistics, "_check_state_values", counted)
    return calls


class _Model(CheckedBeforeLoading):
    def __init__(self, seed):
        super().__init__()
        self.backbone = nn.Linear(D, D)
        self.head = _head(seed)


def test_statistics_checked_once_a_load(monkeypatch):
    calls = _count_checks(monkeypatch)
    source, fresh = _head(), _head(seed=1)
    state = source.state_dict()
    fresh.load_state_dict(state)
    assert calls == ["feature_cloud.statistics."]
    assert_same_state(state_snapshot(fresh), state_snapshot(source), "loaded")
    calls.clear()
    fresh.load_state_dict(state)  # a second load of the same tensors checks them again
    assert calls == ["feature_cloud.statistics."]
    # a model that checks every head before any child loads: once too
    calls.clear()
    model, other = _Model(0), _Model(1)
    other.load_state_dict(model.state_dict())
    assert calls == ["head.feature_cloud.statistics."]
    # a check and then a load of another dict (the keys without the prefix): checked twice
    calls.clear()
    fresh.feature_cloud.statistics.check_state_dict(state, "feature_cloud.statistics.")
    fresh.feature_cloud.statistics.load_state_dict(
        {k[len("feature_cloud.statistics.") :]: v for k, v in state.items() if "statistics." in k}
    )
    assert len(calls) == 2  # the load's own dict holds other prefixes: checked again


def test_an_entry_edited_after_a_check_is_checked_again(monkeypatch):
    """The skipped check needs the same tensor objects, unchanged (their version counters):
    an entry written in place, or replaced, after a check that passed is read again."""
    state = _head().state_dict()
    fresh = _head(seed=1)
    stats = fresh.feature_cloud.statistics
    prefix = "feature_cloud.statistics."
    stats.check_state_dict(state, prefix)
    state[prefix + "centers"][2, 3] = float("nan")  # in place: its version moves on
    before = state_snapshot(fresh)
    with pytest.raises(ValueError, match="non-finite centers"):
        fresh.load_state_dict(state)
    assert_same_state(state_snapshot(fresh), before, "after refused statistics")
    state = _head().state_dict()
    stats.check_state_dict(state, prefix)
    state[prefix + "memory"] = state[prefix + "memory"] + 10.0  # replaced
    with pytest.raises(ValueError, match="memory angles outside"):
        fresh.load_state_dict(state)
    # another module of the same shapes does not take the first one's check
    state = _head().state_dict()
    stats.check_state_dict(state, prefix)
    calls = _count_checks(monkeypatch)
    _head(seed=2).feature_cloud.statistics.check_state_dict(state, prefix)
    assert calls == [prefix]


def test_a_module_after_a_passed_check_still_pickles():
    import copy
    import pickle

    head, state = _head(), _head(seed=1).state_dict()
    head.feature_cloud.statistics.check_state_dict(state, "feature_cloud.statistics.")
    pickle.loads(pickle.dumps(head))
    copy.deepcopy(head)
