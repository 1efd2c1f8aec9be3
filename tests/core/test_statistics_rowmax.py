"""The statistics update sharing one per-row max-abs between its usable-row mask and the
angles' normalisation (``safe_normalize`` given that max): the same values and gradients as the
formulation before, on random rows and on zero, -0, NaN, +-inf, huge and tiny rows, in
float32 / float64 / half precision and autocast; and finite second derivatives at zero rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import feature_cloud.functional as FC
from feature_cloud.statistics import ClassStatistics


def _old_safe_normalize(x, dim=1, eps=1e-12):
    """The formulation before (its own max-abs pass)."""
    m = x.detach().abs().amax(dim=dim, keepdim=True)
    zero = m == 0
    unit = torch.where(zero, 1.0, x / torch.where(zero, torch.ones_like(m), m))
    return torch.where(zero, 0.0, F.normalize(unit, dim=dim, eps=eps))


def _rows(dtype, n=24, d=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[1] = 0.0
    x[2] = -0.0
    x[3] *= 1e30 if dtype in (torch.float32, torch.float64) else 1e4
    x[4] *= 1e-30 if dtype in (torch.float32, torch.float64) else 1e-4
    x[5, 3] = float("nan")
    x[6, 0] = float("inf")
    x[7, -1] = -float("inf")
    x[8] = 0.0
    x[8, 5] = 2.5  # one non-zero entry
    return x.to(dtype)


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(torch.nan_to_num(a, 0.0), torch.nan_to_num(b, 0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_safe_normalize_values_and_gradients_unchanged(dtype):
    for dim in (1, 0, -1):
        x = _rows(dtype)
        if dim == 0:
            x = x.t().contiguous()
        a = x.clone().requires_grad_(True)
        b = x.clone().requires_grad_(True)
        new, old = FC.safe_normalize(a, dim=dim), _old_safe_normalize(b, dim=dim)
        _same(new, old)
        g = torch.randn(new.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        new.backward(g)
        old.backward(g)
        _same(a.grad, b.grad)
        finite = torch.isfinite(x).all(dim=dim, keepdim=True)
        zero = (x == 0).all(dim=dim, keepdim=True)
        assert bool((a.grad == 0).logical_or(~zero).all())  # zero rows: a zero gradient
        assert bool(torch.isfinite(a.grad).logical_or(~finite).all())


def test_safe_normalize_under_autocast():
    x = _rows(torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            a = x.clone().requires_grad_(True)
            b = x.clone().requires_grad_(True)
            new = FC.safe_normalize(a.to(dtype))
            old = _old_safe_normalize(b.to(dtype))
        _same(new, old)
        new.float().sum().backward()
        old.float().sum().backward()
        _same(a.grad, b.grad)


class _Before(ClassStatistics):
    """The update before: an ``isfinite`` / ``ne`` mask, then the angles' own normalisation."""

    @torch.no_grad()
    def update(self, features, labels, validate=True):
        from feature_cloud._validation import check_batch

        labels = check_batch(features, labels, self.embedding_size, self.num_classes, validate)
        if features.shape[0] == 0:
            return
        self.has_centers = True
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.detach().float()
            usable = torch.isfinite(x).all(1) & x.ne(0).any(1)
            x = torch.where(usable.unsqueeze(1), x, torch.zeros_like(x))
            self._update(x, torch.where(usable, labels, torch.full_like(labels, -1)))


@pytest.mark.parametrize("counts", [None, [3, 4, 2, 5, 1]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, "autocast"])
def test_statistics_update_identical_to_before(monkeypatch, counts, dtype):
    C, D = 5, 37
    kw = dict(class_counts=counts) if counts else dict(count_updates=3)
    new, old = ClassStatistics(C, D, **kw), _Before(C, D, **kw)
    gen = torch.Generator().manual_seed(2)
    for step in range(8):
        x = _rows(torch.float32, n=24, d=D, seed=step)
        labels = torch.randint(0, C, (24,), generator=gen)
        labels[::7] = -1
        if step == 5:
            labels[:] = -1  # a batch of ignored rows only
        xs = x if dtype in (torch.float32, "autocast") else x.to(dtype)
        if counts is None and step == 4:
            new.allocate_memory()  # the counting epoch ends: angles from here on
            old.allocate_memory()
        if dtype == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                new.update(xs, labels, validate=False)
        else:
            new.update(xs, labels, validate=False)
        with monkeypatch.context() as patched:  # the old normalisation inside _update
            patched.setattr(FC, "safe_normalize", _old_safe_normalize)
            if dtype == "autocast":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    old.update(xs, labels, validate=False)
            else:
                old.update(xs, labels, validate=False)
        for key, value in old.state_dict().items():
            mine = new.state_dict()[key]
            assert mine.dtype == value.dtype and torch.equal(mine, value), (step, key)
    assert int(new.num_updates) > 0 and bool(new.center_initialized.any())
    assert bool(torch.isfinite(new.centers).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_zero_row_keeps_finite_second_derivatives(dtype):
    """A zero (padded) embedding row under a gradient penalty (``create_graph=True``): the
    row's second derivative was NaN when ``safe_normalize`` took the norm of the zero vector
    itself (review of s53's rewrite); it normalises a row of ones there instead."""
    g = torch.Generator().manual_seed(0)
    e = torch.randn(4, 8, generator=g, dtype=dtype)
    e[2] = 0.0
    e.requires_grad_(True)
    w = torch.randn(5, 8, generator=g, dtype=dtype)
    logits = 16.0 * FC.cosine_logits(e, w)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3]))
    (grad,) = torch.autograd.grad(loss, e, create_graph=True)
    grad.pow(2).sum().backward()
    assert torch.isfinite(e.grad).all()
    assert (grad[2] == 0).all()
