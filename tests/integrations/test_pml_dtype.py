"""LEAPLoss under mixed precision (float32 loss, float32 ``W``) and m-L2 with a margin loss."""

from __future__ import annotations

import warnings

import pytest
import torch

losses = pytest.importorskip("pytorch_metric_learning.losses")
from feature_cloud.integrations.pml import LEAPLoss

C, D = 6, 16


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(24, D, generator=g) * 3, torch.arange(24) % C


def _pair(**kwargs):
    torch.manual_seed(0)
    a = LEAPLoss(C, D, margin=0.35, scale=64.0, cloud="full", class_counts=[4] * C, **kwargs)
    b = LEAPLoss(C, D, margin=0.35, scale=64.0, cloud="full", class_counts=[4] * C, **kwargs)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("bf16_embeddings", [True, False])
def test_autocast_loss_is_float32_and_w_stays_float32(bf16_embeddings):
    ref, loss = _pair()
    emb, y = _batch()
    expected = ref(emb, y)
    opt = torch.optim.Adam(loss.parameters(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = emb.bfloat16() if bf16_embeddings else emb
        value = loss(x.detach().requires_grad_(), y)
    assert value.dtype == torch.float32  # as PML's CosFaceLoss: cross-entropy in float32
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=2e-2)
    value.backward()
    opt.step()
    assert loss.W.dtype == torch.float32 and loss.W.grad.dtype == torch.float32
    # the next step in float32 (or an eval) works with the same optimizer
    opt.zero_grad()
    loss(emb, y).backward()
    opt.step()
    assert loss.W.dtype == torch.float32
    assert loss.get_logits(emb.bfloat16()).shape == (24, C) and loss.W.dtype == torch.float32


@pytest.mark.filterwarnings("ignore:LEAPLoss normalises W and f")
def test_autocast_sub_losses_and_miner_weights_are_float32():
    ref, loss = _pair(metric_l2=1e-4)
    emb, y = _batch()
    a = torch.arange(12)
    pairs = (a, a + 6, a, a + 1)  # miner pairs: fractional per-sample weights
    expected = ref(emb, y, pairs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(emb.bfloat16(), y, pairs)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(expected), rel=2e-2)


def test_float64_embeddings_give_a_float64_loss():
    loss, _ = _pair()
    emb, y = _batch()
    assert loss(emb.double(), y).dtype == torch.float64  # W follows them (PML convention)
    assert loss.W.dtype == torch.float64


def test_metric_l2_with_a_cosine_margin_loss_warns():
    with pytest.warns(UserWarning, match="normalises"):
        LEAPLoss(C, D, cloud=None, metric_l2=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LEAPLoss(C, D, cloud=None)
        LEAPLoss(C, D, cloud=None, metric_l2=0.0)


class _Logits(torch.nn.Module):
    """A serving module: ``loss.get_logits`` of a backbone's embeddings."""

    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings):
        return self.loss.get_logits(embeddings)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 0.15), (torch.bfloat16, 1.0)])
def test_inference_after_an_explicit_cast_leaves_w_in_its_dtype_and_exports(dtype, atol):
    """s55 deploy 2: after ``.half()`` / ``.bfloat16()`` for serving, the first ``get_logits``
    turned ``W`` back into float32 for good (its ``state_dict`` too), and ``torch.export`` (and
    the dynamo ONNX exporter) failed on that ``W.data`` assignment. Inference now computes in
    float32 from a local copy; ``W`` stays as the user cast it."""
    ref, loss = _pair()
    emb, y = _batch()
    for seed in range(3):  # some statistics, so the eval prototypes are the cloud's
        e, t = _batch(seed)
        ref(e, t)
        loss(e, t)
    ref.eval()
    loss.eval().to(dtype)
    with torch.no_grad():
        expected = ref.get_logits(emb)
        expected_cosine = ref.get_cosine(emb)
        expected_value = ref(emb, y)
        logits = loss.get_logits(emb.to(dtype))
        cosine = loss.get_cosine(emb.to(dtype))
        value = loss(emb.to(dtype), y)  # an eval-mode loss (validation) too
    assert loss.W.dtype == dtype and loss.state_dict()["W"].dtype == dtype
    assert logits.dtype == torch.float32 and bool(torch.isfinite(logits).all())
    torch.testing.assert_close(logits, expected, atol=atol, rtol=0)
    torch.testing.assert_close(cosine * loss.scale, expected_cosine * ref.scale, atol=atol, rtol=0)
    assert value.dtype == torch.float32  # the loss in float32, as under autocast
    assert float(value) == pytest.approx(float(expected_value), rel=2e-2)
    exported = torch.export.export(_Logits(loss), (emb.to(dtype),))
    assert exported.state_dict["loss.W"].dtype == dtype and loss.W.dtype == dtype
    torch.testing.assert_close(exported.module()(emb.to(dtype)), logits)
    pytest.importorskip("onnxscript")
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        program = torch.onnx.export(_Logits(loss), (emb.to(dtype),), dynamo=True, verbose=False)
    assert program is not None and loss.W.dtype == dtype
