"""FTL's m-L2 term on a bias-free linear FC (the paper's) takes ``W f`` from the classifier's own
logits instead of a GEMM of its own: the same loss and gradients, ignored rows (label -1)
included; any other classifier, a linear FC with a bias among them (``W f + b - b`` loses
precision under autocast), keeps :class:`MetricL2`'s own ``W f``."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import feature_cloud.functional as FC
from feature_cloud import LEAPMarginHead
from feature_cloud.ftl import FTLModel
from feature_cloud.regularizers import MetricL2

P, D, E, C = 6, 10, 8, 7


def _model(bias=False, alpha_reg=0.25, seed=0, classifier=None, double=False):
    torch.manual_seed(seed)
    fc = classifier if classifier is not None else nn.Linear(E, C, bias=bias)
    if isinstance(fc, nn.Linear) and fc.bias is not None:
        with torch.no_grad():
            fc.bias.normal_()  # a bias far from 0: taking it off must not leak into m-L2
    model = FTLModel(nn.Linear(P, D), fc, feature_dim=D, alpha_recon=0.0, alpha_reg=alpha_reg)
    return model.double() if double else model


def _reference(model, f, labels):
    """The formulation before: Eq. 2 on the classifier's logits, Eq. 3 on its own GEMM."""
    sfmx = FC.margin_cross_entropy(model.classifier(f), labels)
    reg = MetricL2(alpha=1.0)(f, model.classifier, labels)
    return model.alpha_sfmx * sfmx + model.alpha_reg * reg, sfmx, reg


def _grads(model, f, loss):
    params = list(model.classifier.parameters()) + [f]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("bias", [True, False])
def test_metric_l2_from_the_logits_matches_its_own_gemm(bias):
    for seed in range(3):
        model = _model(bias=bias, seed=seed)
        f = (3 * torch.randn(9, E)).requires_grad_(True)
        labels = torch.tensor([0, 1, -1, 2, 6, -1, 3, 3, 5])
        out = model.classification_loss(f, labels)
        loss, sfmx, reg = _reference(model, f, labels)
        assert torch.equal(out["sfmx"], sfmx)
        assert torch.equal(out["reg"], reg) and torch.equal(out["loss"], loss)
        new, old = _grads(model, f, out["loss"]), _grads(model, f, loss)
        for a, b in zip(new, old):
            scale = b.abs().max().clamp_min(1e-3)
            assert float((a - b).abs().max() / scale) < 1e-5
        # an ignored row adds nothing: neither loss nor gradient
        assert float(new[-1][2].abs().max()) == 0.0 and float(new[-1][5].abs().max()) == 0.0


def test_float64_agrees_to_its_rounding():
    model = _model(seed=5, double=True)
    f = torch.randn(5, E, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, -1, 2, 3, 4])
    out = model.classification_loss(f, labels)
    loss, _, reg = _reference(model, f, labels)
    assert torch.equal(out["reg"], reg)
    for a, b in zip(_grads(model, f, out["loss"]), _grads(model, f, loss)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


class _MatmulCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.matmul):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_one_gemm_forward_for_classifier_and_metric_l2():
    model = _model()
    f = torch.randn(4, E)
    with _MatmulCount() as counted:
        model.classification_loss(f, torch.tensor([0, 1, 2, -1]))
    assert counted.count == 1


def test_other_classifiers_keep_metric_l2s_own_product():
    # a bias: m-L2 on its own W f (two GEMMs), not (W f + b) - b
    model = _model(bias=True)
    with _MatmulCount() as counted:
        model.classification_loss(torch.randn(4, E), torch.tensor([0, 1, 2, -1]))
    assert counted.count == 2
    # a forward hook changes the logits: m-L2 stays on W f
    model = _model()
    model.classifier.register_forward_hook(lambda m, i, o: 2 * o)
    f, labels = torch.randn(5, E), torch.tensor([0, 1, 2, -1, 4])
    out = model.classification_loss(f, labels)
    assert torch.equal(out["reg"], MetricL2(alpha=1.0)(f, model.classifier, labels))

    class Scaled(nn.Linear):  # an overridden forward
        def forward(self, x):
            return 3 * super().forward(x)

    model = _model(classifier=Scaled(E, C))
    out = model.classification_loss(f, labels)
    assert torch.equal(out["reg"], MetricL2(alpha=1.0)(f, model.classifier, labels))


def test_leap_head_classifier_with_alpha_reg_0():
    head = LEAPMarginHead(E, C, "cosface", class_counts=[3] * C, warmup_steps=0, seed=0)
    model = _model(alpha_reg=0.0, classifier=head)
    f, labels = torch.randn(6, E), torch.tensor([0, 1, 2, -1, 4, 5])
    out = model.classification_loss(f, labels)
    assert float(out["reg"]) == 0.0
    assert torch.equal(out["loss"], model.alpha_sfmx * out["sfmx"])
