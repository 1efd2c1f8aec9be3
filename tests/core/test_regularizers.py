"""MetricL2 (FTL Eq. 3): ignored rows (label -1) are left out of every reduction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from feature_cloud import FTLModel, MetricL2


def _rows(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, -1, 3, -1, 2, 1])
    return f, w, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_do_not_count(reduction):
    f, w, y = _rows()
    reg = MetricL2(0.25, reduction=reduction)
    valid = y >= 0
    per_row = 0.25 * (f @ w.T).pow(2).sum(1)
    expected = {
        "mean": per_row[valid].mean(),
        "sum": per_row[valid].sum(),
        "none": torch.where(valid, per_row, torch.zeros(())),
    }[reduction]
    torch.testing.assert_close(reg(f, w, y), expected)
    torch.testing.assert_close(reg.from_logits(f @ w.T, y), expected)
    # the ignored rows' values do not matter at all, even non-finite ones
    f2 = f.clone()
    f2[~valid] = float("inf")
    torch.testing.assert_close(reg(f2, w, y), expected)
    # and without labels every row counts (the previous behaviour)
    if reduction == "mean":
        torch.testing.assert_close(reg(f, w), per_row.mean())
        assert not torch.allclose(reg(f, w), expected)


def test_all_rows_ignored_gives_zero_with_zero_gradient():
    f, w, _ = _rows()
    f.requires_grad_(True)
    out = MetricL2(1.0)(f, w, torch.full((6,), -1))
    out.backward()
    assert float(out.detach()) == 0.0 and torch.count_nonzero(f.grad) == 0


def test_gradcheck_masked_mean():
    f, w, y = _rows()
    f.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, w: MetricL2(0.5)(f, w, y), (f, w))


def test_bad_labels_raise():
    f, w, y = _rows()
    with pytest.raises(ValueError, match="labels"):
        MetricL2()(f, w, y[:3])
    with pytest.raises(TypeError, match="integer"):
        MetricL2()(f, w, y.double())


def test_ftl_model_reg_term_ignores_rows():
    torch.manual_seed(0)
    model = FTLModel(
        nn.Linear(7, 8),
        nn.Linear(8, 5, bias=False),
        feature_dim=8,
        filter_net=nn.Linear(8, 8),
        alpha_recon=0.0,
        alpha_reg=1.0,
    )
    x = torch.randn(6, 7)
    y = torch.tensor([0, -1, 1, -1, 2, 3])
    out = model.loss(x, y)
    f = model(x)
    expected = (model.classifier(f[y >= 0]) ** 2).sum(1).mean()
    torch.testing.assert_close(out["reg"], expected)


def test_metric_l2_labels_follow_the_package_label_policy():
    """Bool labels were taken by ``MetricL2`` (the heads refuse them); (B, 1) labels and other
    lengths are named as everywhere else."""

    reg = MetricL2(0.1)
    logits = torch.randn(4, 3)
    with pytest.raises(TypeError, match="integer tensor"):
        reg.from_logits(logits, torch.tensor([True, False, True, True]))
    with pytest.raises(ValueError, match="1-D"):
        reg.from_logits(logits, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size mismatch"):
        reg.from_logits(logits, torch.zeros(3, dtype=torch.long))
    assert torch.isfinite(reg.from_logits(logits, torch.tensor([0, 1, -1, 2], dtype=torch.int32)))
