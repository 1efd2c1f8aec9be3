"""Property-based contract of LEAPMarginHead (issue 15): for random shapes, feature and label
dtypes, label patterns (-1, repeats, absent classes, out of range), bad values and every
implementation, a training step either raises a clear ``ValueError``/``TypeError`` with every
buffer, the step and the RNG state untouched, or returns a finite loss equal across
implementations (with equal statistics afterwards)."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_same_state, state_snapshot
from feature_cloud import LEAPMarginHead

IMPLS = ("reference", "fused", "chunked")
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
INTS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
BAD = (
    "none",
    "none",
    "none",
    "nan",
    "inf",
    "label_high",
    "label_low",
    "float_labels",
    "bool_labels",
    "short_labels",
    "wide_features",
)


def _heads(d, c, margin_type, cloud, counts):
    out = {}
    for impl in IMPLS:
        torch.manual_seed(0)  # the same weights for every implementation
        out[impl] = LEAPMarginHead(
            d,
            c,
            margin_type,
            cloud=cloud,
            class_counts=counts,
            warmup_steps=1,
            seed=7,
            impl=impl,
            chunk_size=2 if impl == "chunked" else None,
            scale=16.0,
        )
    return out


@st.composite
def _case(draw):
    c = draw(st.integers(1, 9))
    d = draw(st.integers(1, 6))
    b = draw(st.integers(0, 10))
    # label pattern: repeats and absent classes arise from drawing from a subset; -1 ignored
    present = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    labels = draw(st.lists(st.sampled_from(present + [-1]), min_size=b, max_size=b))
    return dict(
        c=c,
        d=d,
        labels=labels,
        margin_type=draw(st.sampled_from(["cosface", "arcface"])),
        cloud=draw(st.sampled_from([None, "full", "vanilla"])),
        counts=draw(st.lists(st.integers(0, 6), min_size=c, max_size=c)),
        fdtype=draw(st.sampled_from(FLOATS)),
        ldtype=draw(st.sampled_from(INTS)),
        bad=draw(st.sampled_from(BAD)),
        seed=draw(st.integers(0, 2**16)),
        steps=draw(st.integers(1, 3)),
    )


def _batch(case, step):
    g = torch.Generator().manual_seed(case["seed"] + step)
    y = torch.tensor(case["labels"], dtype=torch.long)
    x = torch.randn(y.numel(), case["d"], generator=g)
    ldtype = case["ldtype"]
    if ldtype == torch.uint8 or (ldtype == torch.int8 and False):
        y = torch.where(y < 0, torch.zeros_like(y), y)  # unsigned labels cannot say -1
    bad = case["bad"] if step == case["steps"] - 1 else "none"  # the last step may be bad
    if bad in ("nan", "inf") and x.numel():
        x[0, 0] = float(bad)
    if bad == "label_high" and y.numel():
        y[-1] = case["c"]
    if bad == "label_low" and y.numel():
        y[0] = -2
    y = y.to(ldtype) if bad not in ("float_labels", "bool_labels") else y
    if bad == "float_labels":
        y = y.float()
    if bad == "bool_labels":
        y = y > 0
    if bad == "short_labels":
        y = y[:-1] if y.numel() else torch.zeros(1, dtype=torch.long)
    if bad == "wide_features":
        x = torch.randn(x.shape[0], case["d"] + 1, generator=g)
    return x.to(case["fdtype"]), y, bad


def _expect_error(bad, x, y):
    if bad in ("float_labels", "bool_labels", "short_labels", "wide_features"):
        return True
    if bad in ("nan", "inf"):
        return x.numel() > 0
    if bad in ("label_high", "label_low"):
        return y.numel() > 0
    return False


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(_case())
def test_head_step_raises_cleanly_or_agrees_across_implementations(case):
    if case["cloud"] is not None and sum(case["counts"]) == 0:
        case["counts"][0] = 1
    heads = _heads(case["d"], case["c"], case["margin_type"], case["cloud"], case["counts"])
    for step in range(case["steps"]):
        x, y, bad = _batch(case, step)
        if _expect_error(bad, x, y):
            for impl, head in heads.items():
                before = state_snapshot(head)
                with pytest.raises((ValueError, TypeError)) as info:
                    head(x.clone().requires_grad_(True), y)
                assert str(info.value), impl  # a message that names the problem
                assert_same_state(before, state_snapshot(head))
            return
        losses = {}
        for impl, head in heads.items():
            xi = x.clone().requires_grad_(True)
            loss = head(xi, y)
            loss.backward()
            assert torch.isfinite(loss), impl
            assert xi.grad is not None and torch.isfinite(xi.grad).all(), impl
            losses[impl] = loss.detach().double()
        ref = losses["reference"]
        for impl, value in losses.items():
            torch.testing.assert_close(value, ref, rtol=2e-4, atol=2e-4, msg=impl)
        sd = {impl: head.statistics.state_dict() for impl, head in heads.items()}
        for impl in IMPLS[1:]:
            for k, v in sd["reference"].items():
                torch.testing.assert_close(sd[impl][k], v, rtol=1e-5, atol=1e-6, msg=k)
        assert len({head.step for head in heads.values()}) == 1
