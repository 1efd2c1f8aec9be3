"""Fused and chunked margin loss (feature_cloud.fused) against the reference functional pipeline."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import SyncWatch, loss_and_grads
from feature_cloud import LEAPMarginHead, fused
from feature_cloud import functional as FC
from feature_cloud.noise import noise_key

B, D, C = 24, 8, 37


def _data(dtype=torch.float32, seed=0, b=B, c=C, ignore=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g, dtype=dtype)
    W = torch.randn(c, D, generator=g, dtype=dtype)
    y = torch.randint(0, c, (b,), generator=g)
    if ignore and b > 3:
        y[3] = -1
    return x, W, y


def _reference(x, W, y, margin_type, scale, margin, alpha, reduction="mean"):
    cos = FC.cosine_logits(x, W)
    logits = FC.margin_logits(
        cos, y, margin_type=margin_type, scale=scale, margin=margin, alpha=alpha
    )
    return FC.margin_cross_entropy(logits, y, reduction)


def _target_only(y, angles, c):
    """``(B, C)`` cloud angles that are ``angles`` on each row's target and 0 elsewhere."""
    alpha = torch.zeros(y.shape[0], c, dtype=angles.dtype)
    return alpha.scatter(1, y.clamp_min(0)[:, None], torch.where(y >= 0, angles, 0.0)[:, None])


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
@pytest.mark.parametrize("cloud", [False, True, "target"])
@pytest.mark.parametrize("chunk_size", [None, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_values_and_grads(margin_type, cloud, chunk_size, dtype):
    """Every cloud: none, the paper's per-logit cloud, a target-only cloud (target_angles)."""
    x, W, y = _data(dtype)
    scale = 24.0 if margin_type == "cosface" else 16.0
    std = noise = alpha = angles = None
    if cloud is True:
        std = torch.rand(B, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.8
        std[1] = 0.0  # a sample whose class has no cloud
        noise = torch.randn(C, B, generator=torch.Generator().manual_seed(2))
        alpha = noise.t().to(dtype) * std.unsqueeze(1)
    elif cloud == "target":
        angles = torch.randn(B, generator=torch.Generator().manual_seed(1), dtype=dtype) * 0.4
        angles[1] = 0.0
        alpha = _target_only(y, angles, C)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    for reduction in ("mean", "sum", "none"):
        ref = loss_and_grads(
            lambda a, w: _reference(a, w, y, margin_type, scale, 0.2, alpha, reduction), x, W
        )
        got = loss_and_grads(
            lambda a, w: fused.margin_loss(
                a,
                w,
                y,
                margin_type=margin_type,
                scale=scale,
                margin=0.2,
                noise_std=std,
                noise=noise,
                target_angles=angles,
                reduction=reduction,
                chunk_size=chunk_size,
                block=4,
            ),
            x,
            W,
        )
        for r, g in zip(ref, got):
            assert r.dtype == g.dtype
            torch.testing.assert_close(g, r, atol=tol * 5, rtol=tol)
        assert torch.all(got[0].reshape(-1)[3:4] == 0) or reduction != "none"


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_large_scale_matches_reference(chunk_size):
    """s = 64 (face setting): the per-row log-sum-exp shift and the exponent floor keep parity."""
    x, W, y = _data()
    std = torch.full((B,), 0.3)
    noise = torch.randn(C, B, generator=torch.Generator().manual_seed(2))
    for mt in ("cosface", "arcface"):
        ref = loss_and_grads(
            lambda a, w: _reference(a, w, y, mt, 64.0, 0.35, noise.t() * std[:, None]), x, W
        )
        got = loss_and_grads(
            lambda a, w: fused.margin_loss(
                a,
                w,
                y,
                margin_type=mt,
                scale=64.0,
                margin=0.35,
                noise_std=std,
                noise=noise,
                chunk_size=chunk_size,
                block=4,
            ),
            x,
            W,
        )
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 256])
def test_converged_rows_keep_their_small_losses_at_face_scale(chunk_size):
    """Rows near their class weight (cosine 0.99-0.9999, s = 64, CosFace m = 0.35) have
    per-sample losses of 1e-7..1e-4: float32 must give them as the reference does, not rounded
    to the ulp of s (4e-6; a sum ``log(S) + shift`` before the shift cancels gave exact zeros)."""
    g = torch.Generator().manual_seed(0)
    b, c, d = 64, 2000, 64
    W = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    wd = torch.nn.functional.normalize(W, dim=1)[y]
    n = torch.randn(b, d, generator=g)
    n = torch.nn.functional.normalize(n - (n * wd).sum(1, keepdim=True) * wd, dim=1)
    cos = torch.empty(b, 1).uniform_(0.99, 0.9999, generator=g)
    x = (cos * wd + (1 - cos**2).sqrt() * n) * 10.0
    kw = dict(margin_type="cosface", scale=64.0, margin=0.35, reduction="none")
    truth = fused.margin_loss(x.double(), W.double(), y, **kw)
    got = fused.margin_loss(x, W, y, chunk_size=chunk_size, **kw)
    ref = _reference(x, W, y, "cosface", 64.0, 0.35, None, reduction="none")
    assert truth.min() < 1e-6 < truth.max()  # the regime: losses below the ulp of s
    err, ref_err = (got.double() - truth).abs(), (ref.double() - truth).abs()
    assert err.max() <= 2 * ref_err.max() + 1e-7, (err.max(), ref_err.max())
    assert ((got == 0) & (truth > 1e-6)).sum() == 0
    mean = fused.margin_loss(x, W, y, chunk_size=chunk_size, **{**kw, "reduction": "mean"})
    torch.testing.assert_close(mean.double(), truth.mean(), rtol=2e-2, atol=0.0)


def _trained_like(b=64, c=2000, d=64, cos_target=0.66, seed=0):
    """Features = class weight direction (cos ~0.66 to the target) + orthogonal noise, as after
    some training; random negatives. Returns ``(x, W, y)``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c, d, generator=g) * 0.05
    y = torch.randint(0, c, (b,), generator=g)
    wd = torch.nn.functional.normalize(W, dim=1)[y]
    n = torch.randn(b, d, generator=g)
    n = torch.nn.functional.normalize(n - (n * wd).sum(1, keepdim=True) * wd, dim=1)
    x = cos_target * wd + (1 - cos_target**2) ** 0.5 * n
    return x * 3.0, W, y


def _random_batch(b=64, c=2000, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, d, generator=g),
        torch.randn(c, d, generator=g) * 0.05,
        torch.randint(0, c, (b,), generator=g),
    )


_DATA = {"trained": _trained_like, "random": _random_batch}


class _Subnormals(TorchDispatchMode):
    """Counts subnormal floats in the output of every op (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.found = {}

    UNINITIALISED = {"empty", "empty_like", "new_empty", "empty_strided", "resize_"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.UNINITIALISED:
            return out
        returns = func._schema.returns
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            alias = returns[i].alias_info if i < len(returns) else None
            if alias is not None and not alias.is_write:  # a view: its base was checked
                continue
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                a = t.detach().abs()
                n = int(((a > 0) & (a < torch.finfo(t.dtype).tiny)).sum())
                if n:
                    name = func.overloadpacket.__name__
                    self.found[name] = self.found.get(name, 0) + n
        return out


def _skip_if_flushing_to_zero():
    """With flush-to-zero on, no op can write a subnormal and the watch would pass vacuously.
    (torch 2.4 / 2.5 turn it on for the process at a CPU ``torch.compile``; 2.14 does not.)"""
    if float(torch.mul(torch.full((1,), 1e-30), 1e-10)) == 0.0:
        pytest.skip("flush-to-zero is on in this process (an earlier CPU torch.compile?)")


@pytest.mark.parametrize("data", sorted(_DATA))
@pytest.mark.parametrize("chunk_size", [None, 512])
def test_no_subnormal_intermediates_at_face_scale(data, chunk_size):
    """s = 64, m = 0.35, cloud std 0.28: no op of the forward or backward writes a subnormal
    float (they slow CPU GEMMs ~8x and exp ~30x); the saved buffer in particular."""
    _skip_if_flushing_to_zero()
    x, W, y = _DATA[data]()
    for margin_type in ("cosface", "arcface"):
        for std in (None, torch.full((x.shape[0],), 0.28)):
            xx, WW = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
            with _Subnormals() as watch:
                loss = fused.margin_loss(
                    xx,
                    WW,
                    y,
                    margin_type=margin_type,
                    scale=64.0,
                    margin=0.35,
                    noise_std=std,
                    chunk_size=chunk_size,
                    generator=torch.Generator().manual_seed(0),
                    block=256,
                )
                loss.backward()
            assert watch.found == {}, (margin_type, std is not None, watch.found)


def test_subnormal_watch_can_fail():
    _skip_if_flushing_to_zero()
    # (a product: torch 2.4's vectorised CPU exp flushes exp(-95) to zero, 2.14's does not)
    with _Subnormals() as watch:
        torch.mul(torch.full((4,), 1e-30), 1e-10)
    assert watch.found == {"mul": 4}


def _upstream_scaled_grads(x, W, y, dtype, scale, std, chunk_size, upstream=65536.0):
    xx, WW = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
    ctx = (
        torch.autocast("cpu", dtype=dtype)
        if dtype is not None
        else torch.autocast("cpu", enabled=False)
    )
    with ctx:
        loss = fused.margin_loss(
            xx,
            WW,
            y,
            scale=scale,
            margin=0.35,
            noise_std=std,
            noise=None
            if std is None
            else torch.randn(W.shape[0], x.shape[0], generator=torch.Generator().manual_seed(3)),
            chunk_size=chunk_size,
            block=256,
        )
    (loss * upstream).backward()  # what GradScaler does
    return loss.detach(), xx.grad / upstream, WW.grad / upstream


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [24.0, 64.0])
@pytest.mark.parametrize("chunk_size", [None, 512])
def test_half_precision_autocast_finite_with_gradscaler_upstream(dtype, scale, chunk_size):
    """fp16 / bf16 autocast with a GradScaler-sized upstream gradient: finite loss and gradients
    close to float32 (not just finite: an underflowed, all-zero gradient fails too)."""
    for data in sorted(_DATA):
        x, W, y = _DATA[data]()
        for std in (None, torch.full((x.shape[0],), 0.28)):
            ref = _upstream_scaled_grads(x, W, y, None, scale, std, chunk_size)
            got = _upstream_scaled_grads(x, W, y, dtype, scale, std, chunk_size)
            for r, g in zip(ref, got):
                assert torch.isfinite(g).all(), (data, std is not None)
                err = (g.float() - r).norm() / r.norm().clamp_min(1e-12)
                assert err < (0.03 if dtype == torch.float16 else 0.1), (
                    data,
                    std is not None,
                    float(err),
                )


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
@pytest.mark.parametrize("cloud", [False, True, "target"])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_gradcheck_float64(margin_type, cloud, chunk_size):
    b, c = 5, 11
    x, W, y = _data(torch.float64, seed=3, b=b, c=c)
    paper = cloud is True
    std = torch.full((b,), 0.5, dtype=torch.float64) if paper else None
    noise = torch.randn(c, b, generator=torch.Generator().manual_seed(4)) if paper else None
    angles = torch.linspace(-0.6, 0.6, b, dtype=torch.float64).abs() if cloud == "target" else None
    x.requires_grad_(True)
    W.requires_grad_(True)

    def fn(a, w):
        return fused.margin_loss(
            a,
            w,
            y,
            margin_type=margin_type,
            scale=4.0,
            margin=0.3,
            noise_std=std,
            noise=noise,
            target_angles=angles,
            chunk_size=chunk_size,
            block=2,
            reduction="none",
        )

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-6)


def test_cloud_cosine_matches_shifted_cosine_including_clip_edges():
    c = torch.tensor(
        [1.0, -1.0, 0.999999, -0.999999, 0.3, -0.7, 0.0, 0.5, 0.5, 0.9, -0.9, 1.0, -1.0]
    )
    a = torch.tensor([-4.0, 4.0, -0.2, 0.2, 2.5, -2.9, 1.0, -1.2, 3.5, -0.5, 0.5, 0.4, -0.4])
    for dtype in (torch.float32, torch.float64):
        cc = c.to(dtype).clone().requires_grad_(True)
        ref = FC.shifted_cosine(cc, a.to(dtype))
        (dref,) = torch.autograd.grad(ref.sum(), cc)
        pi = fused._PI_BELOW[dtype]
        f, d = fused.cloud_cosine(c.to(dtype), a.to(dtype).clamp(-pi, pi))
        torch.testing.assert_close(f, ref.detach(), atol=1e-6, rtol=0)
        # at c = +-1 with |alpha| >= pi the reference derivative is 0, ours <= sin(pi - pi_below)/floor
        torch.testing.assert_close(
            d, dref, atol=5e-4 if dtype == torch.float32 else 1e-12, rtol=1e-5
        )
        assert torch.isfinite(d).all()


def _head(impl, **kw):
    torch.manual_seed(0)
    counts = [40] * (C // 2) + [3] * (C - C // 2)
    return LEAPMarginHead(
        D,
        C,
        kw.pop("margin_type", "cosface"),
        cloud="full",
        class_counts=counts,
        seed=5,
        impl=impl,
        **kw,
    )


def _train(head, steps=3, dtype=torch.float32):
    out = []
    for step in range(steps):
        x, _, y = _data(dtype=dtype, seed=10 + step)
        x.requires_grad_(True)
        loss = head(x, y)
        loss.backward()
        out.append((loss.detach(), x.grad.clone(), head.weight.grad.clone()))
        head.weight.grad = None
    return out


@pytest.mark.parametrize("alpha_y", [-4.0, -3.3, 3.3, 4.0])
def test_a_target_cloud_angle_beyond_pi_gives_the_references_arcface_logit(alpha_y):
    """Numerics trial: with the paper's cloud the fused path clamped the target's angle
    ``alpha`` into ``(-pi, pi)`` before adding ArcFace's margin: at ``theta = pi - 0.1``,
    ``alpha = -4``, ``m = 0.5`` the reference's ``cos(clip(theta + alpha + m, 0, pi)) = 1``
    became ``cos(theta - pi + m)`` (loss 2.0 for 0.04)."""
    theta = math.pi - 0.1
    x = torch.tensor([[math.cos(theta), math.sin(theta), 0.0, 0.0]], dtype=torch.float64)
    w = torch.eye(3, 4, dtype=torch.float64)
    w[1] = 0.95 * x[0] + math.sqrt(1 - 0.95**2) * torch.tensor([0.0, 0.0, 1.0, 0.0])
    y, std = torch.tensor([0]), torch.ones(1, dtype=torch.float64)
    noise = torch.tensor([[alpha_y], [0.0], [0.0]], dtype=torch.float64)
    for chunk_size in (None, 1):
        xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        got = fused.margin_loss(
            xf,
            wf,
            y,
            margin_type="arcface",
            scale=64.0,
            margin=0.5,
            noise_std=std,
            noise=noise,
            chunk_size=chunk_size,
            block=1,
        )
        logits = FC.margin_logits(
            FC.cosine_logits(xr, wr),
            y,
            margin_type="arcface",
            scale=64.0,
            margin=0.5,
            alpha=noise.t(),
        )
        want = FC.margin_cross_entropy(logits, y)
        torch.testing.assert_close(got, want)
        got.backward()
        want.backward()  # the gradients too (review: base's |dx| 27.6 for 0.78)
        torch.testing.assert_close(xf.grad, xr.grad)
        torch.testing.assert_close(wf.grad, wr.grad)


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_every_impl_draws_the_same_cloud_and_agrees(monkeypatch, margin_type):
    """Same seed: reference, fused and chunked heads give the same losses and gradients step by
    step (the cloud is drawn class-major in blocks, so chunking does not change it)."""
    monkeypatch.setattr(fused, "NOISE_BLOCK", 4)
    runs = {
        impl: _train(
            _head(impl, margin_type=margin_type, chunk_size=8 if impl == "chunked" else None)
        )
        for impl in ("reference", "fused", "chunked")
    }
    plain = _train(LEAPMarginHead(D, C, margin_type, cloud=None))
    for step in range(1, 3):  # the cloud is active and changes the loss
        assert abs(runs["fused"][step][0] - plain[step][0]) > 1e-4
    for impl in ("fused", "chunked"):
        for ref, got in zip(runs["reference"], runs[impl]):
            for r, g in zip(ref, got):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cloud_mode", ["margin", "paper"])
def test_float64_heads_agree_to_float64_precision_with_the_cloud_on(cloud_mode):
    """A float64 head: the reference pipeline draws the paper's per-logit angles in float64 as
    the fused kernel does (they were rounded to float32: 1e-7 apart once the cloud was on)."""
    runs = {
        impl: _train(_head(impl, cloud_mode=cloud_mode).double(), dtype=torch.float64)
        for impl in ("reference", "fused")
    }
    plain = _train(LEAPMarginHead(D, C, "cosface", cloud=None).double(), dtype=torch.float64)
    assert abs(runs["fused"][2][0] - plain[2][0]) > 1e-4  # the cloud is on
    for ref, got in zip(runs["reference"], runs["fused"]):
        for r, g in zip(ref, got):
            assert g.dtype == torch.float64
            torch.testing.assert_close(g, r, atol=1e-11, rtol=1e-11)


def test_chunked_and_dense_draw_identical_noise(monkeypatch):
    monkeypatch.setattr(fused, "NOISE_BLOCK", 4)
    dense, chunked = _head("fused"), _head("chunked", chunk_size=5)  # rounded up to 8
    chunked.weight.data.copy_(dense.weight.data)
    _train(dense, 2)
    _train(chunked, 2)
    assert dense.step == chunked.step and dense.seed == chunked.seed
    torch.testing.assert_close(chunked.weight, dense.weight, atol=1e-5, rtol=1e-5)
    # the counter-based draw does not depend on how the classes are split
    key = noise_key(torch.tensor(7), torch.tensor(3))
    full = fused.class_major_noise(C, 6, key)
    parts = [
        fused.class_major_noise(min(5, C - j), 6, key, class_start=j, total_classes=C)
        for j in range(0, C, 5)
    ]
    assert torch.equal(full, torch.cat(parts))


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_bf16_autocast_no_nan_including_feature_equal_to_weight(impl):
    for margin_type in ("cosface", "arcface"):
        head = _head(impl, margin_type=margin_type, chunk_size=8 if impl == "chunked" else None)
        x, _, y = _data(seed=1)
        x[0] = head.weight.detach()[y[0]] * 3.0  # cos = +1
        x[1] = -head.weight.detach()[y[1]]  # cos = -1
        x.requires_grad_(True)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = head(x, y)
            loss.backward()
            assert loss.dtype == torch.float32 and torch.isfinite(loss)
            assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
        # under autocast the value still matches the reference computed the same way
        head.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = FC.margin_cross_entropy(head.margin_logits(x, y), y)
            got = head(x, y)
        assert abs(ref.item() - got.item()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("which", ["both", "weight"])
def test_half_precision_tensors_without_autocast_are_upcast(dtype, which):
    """The public ``fused.margin_loss`` with a float16 / bfloat16 weight and no autocast
    raised in its GEMM (a half product into the float32 logits buffer); it upcasts, as the
    heads do, and the gradients come back in each input's dtype."""
    torch.manual_seed(0)
    x, w, y = torch.randn(8, 16), torch.randn(10, 16), torch.randint(0, 10, (8,))
    xh = (x.to(dtype) if which == "both" else x.clone()).requires_grad_()
    wh = w.to(dtype).requires_grad_()
    loss = fused.margin_loss(xh, wh, y, scale=64.0, margin=0.35)
    loss.backward()
    ref = fused.margin_loss(xh.detach().float(), wh.detach().float(), y, scale=64.0, margin=0.35)
    assert loss.dtype == torch.float32 and wh.grad.dtype == dtype and xh.grad.dtype == xh.dtype
    torch.testing.assert_close(loss, ref)


def test_empty_and_all_ignored_batches():
    for impl in ("fused", "chunked"):
        head = _head(impl, chunk_size=8 if impl == "chunked" else None)
        x = torch.zeros(0, D, requires_grad=True)
        loss = head(x, torch.zeros(0, dtype=torch.long))
        loss.backward()
        assert loss.item() == 0.0
        x, _, y = _data()
        x.requires_grad_(True)
        loss = head(x, torch.full_like(y, -1))
        loss.backward()
        assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
        assert torch.count_nonzero(head.weight.grad) == 0


@pytest.mark.parametrize("impl", ["fused", "chunked"])
def test_training_step_has_no_host_sync(impl):
    """Forward (statistics update, cloud draw, loss) and backward dispatch no op that reads a
    tensor on the host. (``torch.compile(fullgraph=True)`` cannot be used here: dynamo does not
    trace this autograd.Function's non-tensor plan argument; tests/core/test_head.py compiles the
    reference step.)"""
    head = _head(impl, chunk_size=8 if impl == "chunked" else None, validate=False)
    x, _, y = _data()
    head(x, y)  # creates the generator (once)
    x.requires_grad_(True)
    with SyncWatch() as watch:
        loss = head(x, y)
        loss.backward()
    assert watch.syncs == []


def test_step_is_reread_once_after_train_and_after_outside_writes():
    """Mode switches read nothing; the next training step after ``train()`` re-reads the step
    once (a broadcast or ``.data`` write bumps no version counter), later steps read nothing;
    an in-place write to the ``step`` buffer (an EMA copy, ``copy_``) is seen by the next
    training step without ``train()`` (the cloud turns off again before the warm-up's end)."""
    head = _head("fused", validate=False, warmup_steps=2)
    x, _, y = _data()
    for _ in range(3):
        head(x, y)
    assert head.cloud_active
    with SyncWatch() as watch:
        head.train()
        head.eval()
        head.train()
    assert watch.syncs == []
    with SyncWatch() as watch:
        head(x, y)
    assert watch.syncs == ["_local_scalar_dense"]
    with SyncWatch() as watch:
        head(x, y)
    assert watch.syncs == []
    with torch.no_grad():
        head.feature_cloud.step.copy_(torch.tensor(0))  # an EMA / hand-written copy
    assert not head.cloud_active and head.feature_cloud.steps_taken == 0
    cloudless = LEAPMarginHead(D, C, "cosface", cloud=None)
    cloudless.weight.data.copy_(head.weight.data)
    assert torch.equal(head(x, y), cloudless(x, y))  # step 0: no cloud yet
    assert head.feature_cloud.steps_taken == 1


def test_sync_watch_can_fail():
    """The check above sees what .item(), bool() and boolean-mask indexing dispatch."""
    t = torch.randn(5)
    with SyncWatch() as watch:
        t.sum().item()
        bool(t[0] > 0)
        t[t > 0]
    assert watch.syncs == ["_local_scalar_dense", "_local_scalar_dense", "index[bool mask]"]


def test_chunked_never_materialises_a_batch_by_class_tensor():
    b, c, chunk = 64, 4096, 256
    x, W, y = _data(b=b, c=c)
    W.requires_grad_(True)
    std = torch.full((b,), 0.2)
    with SyncWatch() as watch:
        loss = fused.margin_loss(
            x,
            W,
            y,
            noise_std=std,
            generator=torch.Generator().manual_seed(0),
            chunk_size=chunk,
            block=256,
        )
        loss.backward()
    assert watch.largest <= max(c * D, chunk * max(b, D)) < b * c
    with SyncWatch() as dense:
        fused.margin_loss(
            x, W, y, noise_std=std, generator=torch.Generator().manual_seed(0)
        ).backward()
    assert dense.largest >= b * c  # the check can fail


def test_bad_arguments_raise():
    x, W, y = _data()
    with pytest.raises(ValueError, match="margin_type"):
        fused.margin_loss(x, W, y, margin_type="sphere")
    with pytest.raises(ValueError, match="reduction"):
        fused.margin_loss(x, W, y, reduction="avg")
    with pytest.raises(ValueError, match="agree in D"):
        fused.margin_loss(x[:, :3], W, y)
    with pytest.raises(ValueError, match="class-major"):
        fused.margin_loss(x, W, y, noise_std=torch.ones(B), noise=torch.randn(B, C))
    with pytest.raises(ValueError, match="noise_std"):
        fused.margin_loss(x, W, y, noise=torch.randn(C, B))
    with pytest.raises(ValueError, match="chunk_size"):
        fused.margin_loss(x, W, y, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        LEAPMarginHead(D, C, cloud=None, impl="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        LEAPMarginHead(D, C, cloud=None, impl="chunked")
    with pytest.raises(ValueError, match="chunk_size"):
        LEAPMarginHead(D, C, cloud=None, chunk_size=0)
    with pytest.raises(ValueError, match="target_angles"):
        fused.margin_loss(x, W, y, target_angles=torch.zeros(B + 1))
    with pytest.raises(ValueError, match="not both"):
        fused.margin_loss(x, W, y, noise_std=torch.zeros(B), target_angles=torch.zeros(B))


@pytest.mark.parametrize("impl", ["fused", "chunked"])
@pytest.mark.parametrize("cloud_mode", ["margin", "paper"])
def test_gradscaler_never_skips_a_step_under_fp16(impl, cloud_mode):
    """The user's loop: fp16 autocast + torch.amp.GradScaler at s = 64 with the cloud on (the
    default target-only margin cloud and the paper's per-logit one); a non-finite gradient would
    make the scaler skip the step and halve its scale."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler (device-generic, CPU too) needs torch >= 2.3")
    x, W, y = _trained_like(b=32, c=600)
    head = LEAPMarginHead(
        x.shape[1],
        W.shape[0],
        "cosface",
        scale=64.0,
        margin=0.35,
        cloud="full",
        class_counts=[30] * 300 + [3] * 300,
        seed=0,
        impl=impl,
        chunk_size=256 if impl == "chunked" else None,
        cloud_mode=cloud_mode,
    )
    head.weight.data.copy_(W)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)
    for step in range(4):
        xx = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(step))
        with torch.autocast("cpu", dtype=torch.float16):
            loss = head(xx, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        assert torch.isfinite(loss)
    assert head.cloud_active
    assert scaler.get_scale() == 65536.0


@pytest.mark.parametrize("cloud", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 8])
def test_label_smoothing_matches_cross_entropy_with_label_smoothing(cloud, chunk_size):
    x, W, y = _data()
    std = noise = alpha = None
    if cloud:
        std = torch.full((B,), 0.3)
        noise = torch.randn(C, B, generator=torch.Generator().manual_seed(2))
        alpha = noise.t() * std.unsqueeze(1)
    for mt in ("cosface", "arcface"):
        for reduction in ("mean", "none"):

            def ref(a, w):
                logits = FC.margin_logits(
                    FC.cosine_logits(a, w), y, margin_type=mt, scale=30.0, margin=0.3, alpha=alpha
                )
                per = torch.nn.functional.cross_entropy(
                    logits, y.clamp_min(0), label_smoothing=0.1, reduction="none"
                ) * (y >= 0)
                return per if reduction == "none" else per.sum() / (y >= 0).sum()

            want = loss_and_grads(ref, x, W)
            got = loss_and_grads(
                lambda a, w: fused.margin_loss(
                    a,
                    w,
                    y,
                    margin_type=mt,
                    scale=30.0,
                    margin=0.3,
                    noise_std=std,
                    noise=noise,
                    label_smoothing=0.1,
                    reduction=reduction,
                    chunk_size=chunk_size,
                    block=4,
                ),
                x,
                W,
            )
            for r, g in zip(want, got):
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_label_smoothing_gradcheck_float64():
    x, W, y = _data(torch.float64, seed=3, b=5, c=11)
    x.requires_grad_(True)
    W.requires_grad_(True)
    std = torch.full((5,), 0.4, dtype=torch.float64)
    noise = torch.randn(11, 5, generator=torch.Generator().manual_seed(4))
    for chunk in (None, 4):
        assert torch.autograd.gradcheck(
            lambda a, w: fused.margin_loss(
                a,
                w,
                y,
                scale=4.0,
                margin=0.3,
                noise_std=std,
                noise=noise,
                label_smoothing=0.2,
                chunk_size=chunk,
                block=2,
                reduction="none",
            ),
            (x, W),
            eps=1e-6,
            atol=1e-6,
        )


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_top1_is_the_plain_cosine_argmax_hitting_the_label(chunk_size):
    x, W, y = _data(c=29)
    y[:6] = FC.cosine_logits(x[:6], W).argmax(1)  # some hits for sure
    want = (FC.cosine_logits(x, W).argmax(1) == y) & (y >= 0)
    assert 6 <= int(want.sum()) < B
    for std in (None, torch.full((B,), 0.3)):
        loss, top1 = fused.margin_loss(
            x,
            W,
            y,
            noise_std=std,
            chunk_size=chunk_size,
            block=4,
            return_top1=True,
            generator=torch.Generator().manual_seed(0),
        )
        assert torch.equal(top1, want) and loss.dim() == 0


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_transposed_weight_layout_gives_the_same_gradient_without_a_copy(chunk_size):
    """PML stores W as (D, C) and passes W.t(): norms, gradient and the normalisation backward
    run in that layout and the (D, C) parameter gets a contiguous gradient of equal value."""
    x, W, y = _data(c=29)
    std = torch.full((B,), 0.3)
    noise = torch.randn(29, B, generator=torch.Generator().manual_seed(2))
    W_dc = W.t().contiguous().requires_grad_(True)
    W_cd = W.clone().requires_grad_(True)
    for w in (W_dc.t(), W_cd):
        fused.margin_loss(
            x, w, y, noise_std=std, noise=noise, chunk_size=chunk_size, block=4
        ).backward()
    torch.testing.assert_close(W_dc.grad.t(), W_cd.grad, atol=1e-6, rtol=1e-5)
    if chunk_size is None:
        assert W_dc.grad.is_contiguous()


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(chunk_size):
    """The backward folds the target terms into the saved ``(C, B)`` buffer for its GEMMs and
    writes the entries back: a second backward (``retain_graph``) sees the buffer unchanged, at
    face scale with trained-like targets (cos ~0.7) and an ignored row."""
    x, W, y = _data(c=29, ignore=True)
    W = W.detach().clone()
    W[y.clamp_min(0)] += 2.0 * x.detach()  # targets well above the other classes
    x = x.detach().requires_grad_(True)
    W.requires_grad_(True)
    loss = fused.margin_loss(
        x, W, y, scale=64.0, margin=0.35, chunk_size=chunk_size, block=4, reduction="sum"
    )
    first = torch.autograd.grad(loss, (x, W), retain_graph=True)
    second = torch.autograd.grad(loss, (x, W))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    ref = torch.autograd.grad(_reference(x, W, y, "cosface", 64.0, 0.35, None, "sum"), (x, W))
    for a, r in zip(first, ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dim", [5, 32, 33, 70])
def test_column_dots_of_a_d_by_c_weight(dim: int) -> None:
    """Column dots / norms of PML's ``(D, C)`` layout, any ``D`` against the 32-row blocks."""
    from feature_cloud.fused import _column_dots, _row_norms

    g = torch.Generator().manual_seed(dim)
    a, b = torch.randn(dim, 301, generator=g), torch.randn(dim, 301, generator=g)
    ref = (a.double() * b.double()).sum(0)
    torch.testing.assert_close(_column_dots(a, b, torch.float64), ref)
    torch.testing.assert_close(_column_dots(a, b, torch.float32), ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_row_norms(a.t(), torch.float64), a.double().norm(dim=0))


class _Dispatches(TorchDispatchMode):
    """Counts dispatched ops (on a GPU each is a kernel launch)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["rows", "pml_columns"])
def test_off_cpu_blocks_give_the_same_step_in_fewer_dispatches(layout, monkeypatch):
    """Off the CPU the blocked passes over ``C x D`` (the normalisation backward, the column
    dots of PML's ``(D, C)`` weight) take blocks sized by memory instead of cache: the same loss
    and gradients with a fraction of the dispatched ops (on an H200 the CPU's blocks were most
    of a fused step's time)."""
    b, c, d = 32, 10_000, 512  # the CPU's blocks: 40 of 256 classes, 16 of 32 dimensions
    g = torch.Generator().manual_seed(3)
    x, W = torch.randn(b, d, generator=g), torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    if layout == "pml_columns":
        W = W.t().contiguous().t()  # PML stores W as (D, C)

    def step():
        xs, Ws = x.clone().requires_grad_(True), W.clone().requires_grad_(True)
        if layout == "pml_columns":
            Ws = W.t().clone().requires_grad_(True)
        with _Dispatches() as n:
            weight = Ws.t() if layout == "pml_columns" else Ws
            loss = fused.margin_loss(xs, weight, y, scale=64.0, margin=0.35)
            loss.backward()
        return loss.detach(), xs.grad, Ws.grad, n.count

    cpu = step()
    monkeypatch.setattr(
        fused,
        "_block_rows",
        lambda t, cpu_rows: max(cpu_rows, fused._DEVICE_BLOCK_ELEMENTS // max(t.shape[1], 1)),
    )
    device = step()
    for a, b_ in zip(cpu[:3], device[:3]):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-7)
    assert device[3] < 0.7 * cpu[3], (cpu[3], device[3])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["head", "pml"])
def test_autocast_gradients_of_far_samples_keep_the_float32_correction(dtype, layout):
    """Random features at s = 8 (p_y ~ 1 / C, a flat softmax): the target's -1 is the larger
    term, kept out of the half-precision GEMM (exact float32 correction): the fused weight
    gradient stays closer to float64 than the reference pipeline's (a fold of every sample
    made it 20x worse in bf16, a review of this release)."""
    g = torch.Generator().manual_seed(3)
    B, C, D = 128, 2000, 256
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    W = torch.randn(C, D, generator=g) / math.sqrt(D)

    def weight_grad(impl, autocast):
        start = W if autocast else W.double()
        # PML's (D, C) parameter is passed as its transposed view
        w = torch.nn.Parameter(start.t().contiguous() if layout == "pml" else start.clone())
        weight = w.t() if layout == "pml" else w
        xx = x if autocast else x.double()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            if impl == "reference":
                cos = FC.cosine_logits(xx, weight).to(xx.dtype)
                logits = FC.margin_logits(cos, y, scale=8.0, margin=0.35)
                loss = FC.margin_cross_entropy(logits, y)
            else:
                loss = fused.margin_loss(xx, weight, y, scale=8.0, margin=0.35)
        loss.backward()
        grad = w.grad.t() if layout == "pml" else w.grad
        return grad.double()

    exact = weight_grad("fused", False)
    errors = {
        impl: float((weight_grad(impl, True) - exact).norm() / exact.norm())
        for impl in ("fused", "reference")
    }
    assert errors["fused"] <= errors["reference"], errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["head", "pml"])
def test_autocast_gradients_of_converged_samples_match_the_reference(dtype, layout):
    """Trained-like features (cosine 0.6-0.95 to their class weight, CosFace s = 64, m = 0.35,
    cloud off: per-sample losses 1e-13..1e-2) under autocast: the weight gradient of the fused
    path is as close to float64 as the reference path's (PML's layout too). It was mostly
    rounding noise in bf16 (relative error 0.92, cosine 0.74: the target's p_y W_y rounded by
    the bf16 GEMM, then W_y subtracted in float32)."""
    g = torch.Generator().manual_seed(5)
    B, C, D = 64, 2000, 512
    y = torch.randint(0, C, (B,), generator=g)
    W = torch.randn(C, D, generator=g) / math.sqrt(D)
    wd = F.normalize(W, dim=1)[y]
    x = torch.randn(B, D, generator=g)
    n = F.normalize(x - (x * wd).sum(1, keepdim=True) * wd, dim=1)
    cos = 0.6 + 0.35 * torch.rand(B, 1, generator=g)
    x = (cos * wd + (1 - cos**2).sqrt() * n) * math.sqrt(D)

    def weight_grad(impl, autocast):
        h = LEAPMarginHead(D, C, "cosface", scale=64.0, margin=0.35, cloud=None, impl=impl)
        h.weight.data.copy_(W)
        xx = x.clone()
        if not autocast:
            h, xx = h.double(), xx.double()
        if layout == "pml":  # the (D, C) parameter of PML's losses: a transposed view
            wt = torch.nn.Parameter(h.weight.detach().t().contiguous())
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                loss = fused.margin_loss(xx, wt.t(), y, scale=64.0, margin=0.35)
            loss.backward()
            return wt.grad.t().double()
        with torch.autocast("cpu", dtype=dtype, enabled=autocast):
            h(xx, y).backward()
        return h.weight.grad.double()

    exact = weight_grad("auto", False)

    def error(impl):
        got = weight_grad(impl, True)
        assert torch.isfinite(got).all()
        return float((got - exact).norm() / exact.norm())

    fused_err, reference_err = error("auto"), error("reference")
    assert fused_err < 1.5 * reference_err + 1e-3, (fused_err, reference_err)
    assert fused_err < (0.1 if dtype == torch.bfloat16 else 0.02), fused_err
