"""Fused and memory-exact implementations of the LEAP margin softmax loss (LEAP Eq. 1-2, 7-8).

:func:`margin_loss` computes exactly what the reference pipeline in :mod:`feature_cloud.functional`
computes,

.. code-block:: python

    cos = cosine_logits(embeddings, weight)                       # LEAP Eq. 1-2
    logits = margin_logits(cos, labels, alpha=noise * std[:, None], ...)   # Eq. 7-8, clipped
    loss = margin_cross_entropy(logits, labels, reduction)

with one custom :class:`torch.autograd.Function` instead of a chain of autograd nodes:

* **No** ``acos`` over ``B x C``: with :math:`c = \\cos\\theta`, :math:`t = \\sin\\theta =
  \\sqrt{1 - c^2}`, :math:`\\cos(\\theta + \\alpha) = c\\cos\\alpha - t\\sin\\alpha` and
  :math:`\\sin(\\theta + \\alpha) = t\\cos\\alpha + c\\sin\\alpha`. The clip of Eq. 7-8 to
  ``[0, pi]`` is the condition :math:`\\sin(\\theta + \\alpha) < 0` (for :math:`|\\alpha| < \\pi`),
  and the exact derivative is :math:`\\partial\\cos(\\theta+\\alpha)/\\partial c =
  \\max(\\sin(\\theta+\\alpha), 0) / \\sqrt{\\max(1 - c^2, \\epsilon)}`, the same floor as
  :func:`~feature_cloud.functional.safe_acos`.
* The class weights are normalised implicitly (a per-class factor folded into the logits and the
  backward), so no normalised copy of ``W`` and no ``F.normalize`` backward over ``C x D``.
  ``cos alpha`` and ``sin alpha`` come from one ``sin(alpha / 2)`` (half-angle identities).
* The cross-entropy uses a log-sum-exp with a fixed shift (``scale``, an upper bound of every
  logit, folded into the scaling pass) when that cannot underflow, else an online running
  maximum.
* The one saved ``B x C`` buffer is ``softmax * d logit / d cos`` (turned in place from the
  exponentials); the ``- onehot`` of the target column is a rank-``B`` correction applied after
  the two backward GEMMs, so the backward makes no elementwise pass over ``B x C`` and leaves the
  saved buffer intact (``retain_graph`` works).

The layout is class-major (``C x B``) so that a chunk of classes is a contiguous block. With
``chunk_size`` set, classes are processed in chunks: the forward keeps only ``B``-vectors (online
log-sum-exp) and the backward recomputes each chunk (GEMM, cloud noise, margins), so no ``B x C``
tensor is ever materialised and the extra memory beyond ``W`` and its gradient is
``O(chunk_size * (B + D))``. Loss and gradients equal the dense path to rounding.

The cloud noise is counter-based (:mod:`feature_cloud.noise`): the normal of sample ``n`` and
class ``j`` is a pure function of the noise key and ``(n, j)``, so dense and chunked modes (and
every chunk size) draw identical clouds and the chunked backward recomputes a chunk's noise from
the key alone. Chunk sizes are rounded up to a multiple of :data:`NOISE_BLOCK`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .functional import MARGIN_TYPES
from .noise import counter_normal, random_key

__all__ = ["NOISE_BLOCK", "margin_loss", "class_major_noise", "cloud_angles", "cloud_cosine"]

#: Chunk sizes are multiples of this many classes.
NOISE_BLOCK = 1024

# Largest float below pi per dtype: clamping alpha there keeps |alpha| < pi, where "clipped" is
# exactly sin(theta + alpha) < 0 (see cloud_cosine). float64(math.pi) is already below pi.
_PI_BELOW = {
    torch.float32: 3.141592502593994,
    torch.float64: math.pi,
}
# sqrt of the floor on 1 - c^2 used by functional.safe_acos (float32 eps; 1e-30 in float64)
_SQRT_FLOOR = {
    torch.float32: math.sqrt(float(torch.finfo(torch.float32).eps)),
    torch.float64: 1e-15,
}


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _gemm_dtype(device: torch.device, compute: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device`` (as ``F.linear`` would use)."""
    if compute == torch.float64:
        return compute
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except (TypeError, AttributeError, RuntimeError):  # older torch: no device argument
        if device.type == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if device.type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return compute


# ------------------------------------------------------------------------------------------
# Pure elementwise math
# ------------------------------------------------------------------------------------------


def _cloud_cosine_(
    c: Tensor, half: Tensor, out_f: Tensor, work: Tensor, out_d: Tensor, sqrt_floor: float
) -> Tuple[Tensor, Tensor]:
    """In-place kernel of :func:`cloud_cosine` from the half angle ``half = alpha / 2``.

    Destroys ``c`` and ``half``; ``f`` is written to ``out_f`` and the derivative to ``out_d``;
    ``work`` is scratch: five same-shape buffers, no allocation (fresh pages of big tensors cost
    as much as a transcendental pass). One ``sin`` instead of ``cos`` and ``sin``:
    ``h = sin(alpha/2)``, ``cos alpha = 1 - 2h^2``, ``sin alpha = 2h cos(alpha/2)`` with
    ``cos(alpha/2) = sqrt(1 - h^2) > 0`` (floored at 1e-15 so that ``sin alpha`` keeps the sign of
    ``alpha`` when ``h`` rounds to +-1).
    """
    one = torch.ones((), dtype=c.dtype, device=c.device)
    h = half.sin_()
    ca = torch.addcmul(one, h, h, value=-2, out=out_f)  # cos(alpha)
    sa2 = torch.addcmul(one, h, h, value=-1, out=work).clamp_min_(1e-30).sqrt_().mul_(h)
    # sa2 = sin(alpha) / 2; h is free from here on
    t = torch.addcmul(one, c, c, value=-1, out=half).sqrt_()  # c in [-1, 1]: 1 - c*c >= 0
    sn = torch.mul(t, ca, out=out_d).addcmul_(c, sa2, value=2)  # sin(theta + alpha)
    f = ca.mul_(c).addcmul_(t, sa2, value=-2)  # cos(theta + alpha), unclipped
    clipped = torch.clamp_max(sn, 0.0, out=c).sign_()  # -1 where clipped, else 0
    # where clipped: f + (-(sign(alpha) + f)) = -sign(alpha); elsewhere f + 0
    f.addcmul_(sa2.sign_().add_(f), clipped)
    d = sn.clamp_min_(0.0).div_(t.clamp_min_(sqrt_floor))
    return f, d


def cloud_cosine(c: Tensor, alpha: Tensor, sqrt_floor: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    r""":math:`f = \cos(\mathrm{clip}(\theta + \alpha, 0, \pi))` and :math:`\partial f/\partial c`.

    LEAP Eq. 7-8 without ``acos``: ``c`` is :math:`\cos\theta` clamped to ``[-1, 1]``, ``alpha``
    must lie strictly inside ``(-pi, pi)`` (callers clamp it; any :math:`|\alpha| \ge \pi` clips
    to the same value). With :math:`t = \sqrt{1-c^2}`, :math:`\sin(\theta+\alpha) =
    t\cos\alpha + c\sin\alpha` is negative exactly when the sum leaves ``[0, pi]``; then
    ``f = 1`` (below 0, :math:`\alpha < 0`) or ``-1`` (above pi) and the derivative is 0.
    Otherwise :math:`f = c\cos\alpha - t\sin\alpha` and :math:`f' = \sin(\theta+\alpha) /
    \sqrt{\max(1-c^2, \epsilon)}`, the derivative of ``cos(safe_acos(c) + alpha)``.

    Only arithmetic (no boolean tensors, which are slow on CPU). Inputs are not modified; the
    outputs are plain tensors (the derivative is returned, not tracked by autograd).
    """
    if sqrt_floor is None:
        sqrt_floor = _SQRT_FLOOR[c.dtype if c.dtype in _SQRT_FLOOR else torch.float32]
    pi = _PI_BELOW[c.dtype if c.dtype in _PI_BELOW else torch.float32]
    c, half = c.detach().clone(), alpha.detach().clamp(-pi, pi).mul(0.5)
    return _cloud_cosine_(c, half, torch.empty_like(c), torch.empty_like(c), torch.empty_like(c),
                          sqrt_floor)


# ------------------------------------------------------------------------------------------
# Cloud noise: class-major blocks
# ------------------------------------------------------------------------------------------


def class_major_noise(
    num_classes: int,
    batch_size: int,
    key: Optional[Tensor] = None,
    device: Optional[torch.device] = None,
    block: Optional[int] = None,
    *,
    class_start: int = 0,
    total_classes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """The standard-normal cloud draw ``(C, B)`` that :func:`margin_loss` makes from ``key``.

    ``key``: a noise key (:func:`feature_cloud.noise.noise_key`); ``None`` draws one from
    ``generator`` (the global RNG when ``None``). Rows are the classes ``class_start ..
    class_start + num_classes`` of a head with ``total_classes`` (default ``num_classes``)
    classes. ``block`` is accepted for compatibility and has no effect (the draw does not depend
    on any chunking). ``margin_loss`` with ``noise_std=std`` uses angles
    ``alpha = noise.t() * std[:, None]``; exposed so that tests and users can reproduce a draw
    with the reference functions.
    """
    del block
    if key is None:
        key = random_key(device if device is not None else torch.device("cpu"), generator)
    elif device is not None:
        key = key.to(device)
    total = num_classes + class_start if total_classes is None else int(total_classes)
    return counter_normal(key, batch_size, class_start, class_start + num_classes, total)


def cloud_angles(
    std: Tensor, num_classes: int, key: Optional[Tensor] = None, block: Optional[int] = None,
    *, class_start: int = 0, total_classes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Per-logit cloud angles :math:`\alpha` ``(B, C)`` of LEAP Sec. 3.4 as every head draws them.

    :math:`\alpha_{nj} = \mathrm{std}_n z_{jn}` with ``z = class_major_noise(C, B, key, ...)``:
    the same distribution as :func:`~feature_cloud.functional.angle_noise` (i.i.d.
    :math:`N(0, \mathrm{std}_n^2)`), the same numbers in every chunking and class shard
    (``class_start``/``total_classes``). Returned as a transposed view.
    """
    noise = class_major_noise(num_classes, std.shape[0], key, std.device, block,
                              class_start=class_start, total_classes=total_classes,
                              generator=generator)
    return noise.t() * std.to(noise.dtype).unsqueeze(1)


# ------------------------------------------------------------------------------------------
# The autograd Function
# ------------------------------------------------------------------------------------------


class _Plan:
    """Static configuration of one call (plain Python values, no tensors)."""

    __slots__ = (
        "margin_type", "scale", "margin", "reduction", "chunk", "block", "total",
        "compute", "gemm", "const_shift", "pi_below", "sqrt_floor", "cloud", "explicit_noise",
    )

    def __init__(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


def _target_index(labels: Tensor, valid: Tensor, j0: int, j1: int, batch: int) -> Tuple[Tensor, Tensor]:
    """Flat index of each row's target inside a class-major chunk, and whether it is there.

    Rows whose target is outside the chunk (or ignored) point at ``(0, n)``, a slot no other
    row's target can occupy in column ``n``; writers put back the value read there.
    """
    inside = valid & (labels >= j0) & (labels < j1)
    cols = torch.arange(batch, device=labels.device)
    idx = torch.where(inside, (labels - j0).clamp_min(0) * batch + cols, cols)
    return idx, inside


class _Workspace:
    """Chunk buffers allocated once per call and reused by every chunk."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self.rows, self.cols, self.dtype, self.device = rows, cols, dtype, device
        self.bufs: dict = {}

    def get(self, name: str, rows: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        key = (name, dtype)
        buf = self.bufs.get(key)
        if buf is None:
            buf = torch.empty(self.rows * self.cols, dtype=dtype or self.dtype, device=self.device)
            self.bufs[key] = buf
        return buf[: rows * self.cols].view(rows, self.cols)


def _chunk_logits(
    xg: Tensor,
    Wc: Tensor,
    rwc: Tensor,
    labels: Tensor,
    valid: Tensor,
    j0: int,
    noise_c: Optional[Tensor],
    sigma: Optional[Tensor],
    plan: _Plan,
    ws: _Workspace,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Scaled margin logits of classes ``j0 .. j0 + len(Wc)`` (class-major), LEAP Eq. 1-2 / 7-8.

    Returns ``(Z, d, idx, inside, z_y, d_y)``: logits ``(Cc, B)`` (a workspace buffer; minus
    ``plan.const_shift`` when that is set); the
    elementwise derivative ``d cos(theta + alpha) / d c`` (``None`` without cloud, meaning 1);
    the target index and in-chunk mask; the target logit (margin applied) and the derivative of
    its cosine. ``noise_c`` (when generated) is a workspace buffer and is overwritten.
    """
    B, Cc = xg.shape[0], Wc.shape[0]
    s, m = plan.scale, plan.margin
    # with a fixed log-sum-exp shift the logits are returned already shifted (one pass saved)
    off = plan.const_shift or 0.0
    neg_off = torch.tensor(-off, dtype=plan.compute, device=xg.device)
    Z = ws.get("z", Cc)
    if plan.gemm == plan.compute:
        torch.mm(Wc, xg.t(), out=Z)
    else:
        Z.copy_(torch.mm(Wc.to(plan.gemm), xg.t()))
    idx, inside = _target_index(labels, valid, j0, j0 + Cc, B)
    if plan.cloud:
        c = Z.mul_(rwc.unsqueeze(1)).clamp_(-1.0, 1.0)
        half_sigma = (sigma * 0.5).unsqueeze(0)  # the kernel works on alpha / 2 (exact)
        if plan.explicit_noise or noise_c.dtype != plan.compute:  # never write the caller's
            half = torch.mul(noise_c.to(plan.compute), half_sigma, out=ws.get("n", Cc))
        else:
            half = noise_c.mul_(half_sigma)
        half.clamp_(-0.5 * plan.pi_below, 0.5 * plan.pi_below)
        c_y = c.view(-1).gather(0, idx)
        alpha_y = half.view(-1).gather(0, idx) * 2.0
        f, d = _cloud_cosine_(c, half, ws.get("f", Cc), ws.get("t", Cc), ws.get("d", Cc),
                              plan.sqrt_floor)
        Z = torch.add(neg_off, f, alpha=s, out=f) if off else f.mul_(s)
        if plan.margin_type == "cosface":  # s (cos(theta_y + alpha_y) - m), LEAP Eq. 7
            d_y = d.view(-1).gather(0, idx)
            z_y = Z.view(-1).gather(0, idx) + (off - s * m)
        else:  # s cos(theta_y + alpha_y + m), LEAP Eq. 8
            shift_y = (alpha_y + m).clamp_(-plan.pi_below, plan.pi_below)
            f_y, d_y = cloud_cosine(c_y, shift_y, plan.sqrt_floor)
            z_y = f_y * s
    else:
        d = None
        srw_col = (rwc * s).unsqueeze(1)
        if off:
            torch.addcmul(neg_off, Z, srw_col, out=Z)
        else:
            Z.mul_(srw_col)
        if plan.margin_type == "cosface":  # s (cos theta_y - m), LEAP Eq. 1
            d_y = torch.ones(B, dtype=plan.compute, device=Z.device)
            z_y = Z.view(-1).gather(0, idx) + (off - s * m)
        else:  # s cos(theta_y + m), LEAP Eq. 2
            c_y = ((Z.view(-1).gather(0, idx) + off) / s).clamp_(-1.0, 1.0)
            shift_y = torch.full_like(c_y, min(m, plan.pi_below))
            f_y, d_y = cloud_cosine(c_y, shift_y, plan.sqrt_floor)
            z_y = f_y * s
    flat = Z.view(-1)
    flat.scatter_(0, idx, torch.where(inside, z_y - off, flat.gather(0, idx)))
    return Z, d, idx, inside, z_y, d_y


def _lse_update(
    Z: Tensor, run_max: Optional[Tensor], total: Tensor, plan: _Plan
) -> Optional[Tensor]:
    """Turn logits ``Z`` into ``exp(Z - shift)`` in place and add them to ``total`` (in place).

    Fixed shift: ``plan.const_shift``. Otherwise an online maximum: ``total`` is rescaled by
    ``exp(old_max - new_max)`` (the online log-sum-exp); returns the new running maximum.
    """
    if plan.const_shift is not None:  # _chunk_logits already subtracted it
        Z.exp_()
        total.add_(Z.sum(0))
        return run_max
    if Z.shape[0] == 0 or Z.shape[1] == 0:
        return run_max
    new_max = torch.maximum(run_max, Z.amax(0))
    total.mul_(torch.exp(run_max - new_max))
    Z.sub_(new_max.unsqueeze(0)).exp_()
    total.add_(Z.sum(0))
    return new_max


def _grad_buffer_(E: Tensor, d: Optional[Tensor], srwc: Tensor, idx: Tensor) -> Tensor:
    """``E -> G0 = E * d * s * rw`` in place; returns the target entries ``E_y`` read first."""
    e_y = E.view(-1).gather(0, idx)
    if d is not None:
        E.mul_(d)
    E.mul_(srwc.unsqueeze(1))
    return e_y


def _chunk_backward(
    G0: Tensor,
    e_y: Tensor,
    idx: Tensor,
    inside: Tensor,
    d_y: Tensor,
    total: Tensor,
    srwc: Tensor,
    Wc: Tensor,
    bx: Tensor,
    gWc: Tensor,
    rw2c: Tensor,
    plan: _Plan,
) -> Tensor:
    """Gradients of one chunk; ``G0`` is read only (``retain_graph`` and gradcheck work).

    With ``b_n = g_n / S_n`` folded into the GEMMs, ``b_n G_jn = rw_j dL/dc_jn`` where ``G`` is
    ``G0 = E d s rw`` except at the targets, ``(E_y - S_n) d_y s rw_y``: that difference
    ``delta`` (one entry per sample) is applied as a rank-``B`` correction after the GEMMs, so
    the backward makes no pass over ``B x C``. Returns ``G^T @ Wc`` (the caller scales it by
    ``b``) and writes the class-weight gradient into ``gWc``: ``M = G @ (b * xn)``,
    ``grad W_j = M_j - rw_j^2 (W_j . M_j) W_j`` (the backward of ``W_j / ||W_j||`` done once on
    ``C x D`` instead of through ``F.normalize``).
    """
    B = G0.shape[1]
    local = torch.div(idx, max(B, 1), rounding_mode="floor")
    delta = (e_y - total) * d_y * srwc.gather(0, local) - G0.view(-1).gather(0, idx)
    delta = torch.where(inside, delta, torch.zeros_like(delta))
    Gg = G0.to(plan.gemm) if plan.gemm != G0.dtype else G0
    Wg = Wc.to(plan.gemm) if plan.gemm != Wc.dtype else Wc
    gx = torch.mm(Gg.t(), Wg).to(plan.compute)
    gx.addcmul_(delta.unsqueeze(1), Wc.index_select(0, local).to(plan.compute))
    bxg = bx.to(plan.gemm) if plan.gemm != bx.dtype else bx
    if gWc.dtype == plan.gemm:
        torch.mm(Gg, bxg, out=gWc)
    else:
        gWc.copy_(torch.mm(Gg, bxg))
    gWc.index_add_(0, local, (delta.unsqueeze(1) * bx).to(gWc.dtype))
    coef = rw2c * _rowdot(gWc, Wc)
    gWc.addcmul_(Wc, coef.unsqueeze(1).to(gWc.dtype), value=-1)
    return gx


def _rowdot(a: Tensor, b: Tensor, rows: int = 16384) -> Tensor:
    """``(a * b).sum(1)`` in row blocks (no ``C x D`` temporary)."""
    out = torch.empty(a.shape[0], dtype=a.dtype, device=a.device)
    for r0 in range(0, a.shape[0], rows):
        torch.sum(a[r0:r0 + rows] * b[r0:r0 + rows], dim=1, out=out[r0:r0 + rows])
    return out


def _chunk_noise(
    noise: Optional[Tensor], j0: int, j1: int, B: int, key: Optional[Tensor], plan: _Plan,
) -> Optional[Tensor]:
    if not plan.cloud:
        return None
    if plan.explicit_noise:
        return noise[j0:j1]
    return counter_normal(key, B, j0, j1, plan.total)


class _FusedMarginCE(torch.autograd.Function):
    """Margin softmax cross-entropy over ``(xn, W)``; see the module docstring."""

    @staticmethod
    def forward(ctx, xn, W, labels, sigma, noise, key, plan):  # type: ignore[override]
        B, C = xn.shape[0], W.shape[0]
        compute, device = plan.compute, xn.device
        xg = xn.to(plan.gemm)
        valid = labels >= 0
        norms = torch.linalg.vector_norm(W, dim=1, dtype=compute)
        rw = 1.0 / norms.clamp_min(1e-12)
        total = torch.zeros(B, dtype=compute, device=device)
        run_max = None if plan.const_shift is not None else torch.full(
            (B,), -math.inf, dtype=compute, device=device)
        z_target = torch.zeros(B, dtype=compute, device=device)
        dense = plan.chunk >= C
        ws = _Workspace(min(plan.chunk, C), B, compute, device)
        saved: Tuple[Tensor, ...] = ()
        for j0 in range(0, C, plan.chunk):
            j1 = min(j0 + plan.chunk, C)
            noise_c = _chunk_noise(noise, j0, j1, B, key, plan)
            Z, d, idx, inside, z_y, d_y = _chunk_logits(
                xg, W[j0:j1], rw[j0:j1], labels, valid, j0, noise_c, sigma, plan, ws)
            z_target.add_(torch.where(inside, z_y, torch.zeros_like(z_y)))
            run_max = _lse_update(Z, run_max, total, plan)
            if dense:
                e_y = _grad_buffer_(Z, d, rw * plan.scale, idx)
                saved = (Z, e_y, idx, inside, d_y)
            del Z, d, noise_c
        del ws
        shift = run_max if run_max is not None else plan.const_shift
        per_sample = torch.where(valid, torch.log(total) + shift - z_target,
                                 torch.zeros_like(total))
        if plan.reduction == "none":
            out = per_sample
        elif plan.reduction == "sum":
            out = per_sample.sum()
        else:
            out = per_sample.sum() / valid.sum().clamp_min(1)
        shift_t = run_max if run_max is not None else torch.empty(0, device=device)
        ctx.plan, ctx.dense = plan, dense
        ctx.has_noise = noise is not None
        ctx.save_for_backward(xn, W, labels, sigma if sigma is not None else xn.new_empty(0),
                              noise if noise is not None else xn.new_empty(0),
                              key if key is not None else labels.new_empty(0),
                              rw, norms, total, shift_t, *saved)
        ctx.mark_non_differentiable(labels)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        plan: _Plan = ctx.plan
        xn, W, labels, sigma, noise, key, rw, norms, total, shift_t, *saved = ctx.saved_tensors
        B, C = xn.shape[0], W.shape[0]
        compute, device = plan.compute, xn.device
        valid = labels >= 0
        g = grad_out.to(compute)
        if plan.reduction == "mean":
            g = g / valid.sum().clamp_min(1)
        g = torch.where(valid, g.expand(B) if g.dim() == 0 else g,
                        torch.zeros((), dtype=compute, device=device))
        b = g / total.clamp_min(torch.finfo(compute).tiny)
        bx = xn.to(compute) * b.unsqueeze(1)
        srw = rw * plan.scale
        rw2 = torch.where(norms > 1e-12, rw * rw, torch.zeros_like(rw))
        grad_W = torch.empty(C, W.shape[1], dtype=W.dtype, device=device)
        grad_x = torch.zeros(B, xn.shape[1], dtype=compute, device=device)
        if ctx.dense:
            if C > 0:
                G0, e_y, idx, inside, d_y = saved
                grad_x += _chunk_backward(G0, e_y, idx, inside, d_y, total, srw, W, bx, grad_W,
                                          rw2, plan)
        else:
            xg = xn.to(plan.gemm)
            ws = _Workspace(plan.chunk, B, compute, device)
            for j0 in range(0, C, plan.chunk):
                j1 = min(j0 + plan.chunk, C)
                noise_c = _chunk_noise(noise if ctx.has_noise else None, j0, j1, B, key, plan)
                Z, d, idx, inside, _, d_y = _chunk_logits(
                    xg, W[j0:j1], rw[j0:j1], labels, valid, j0, noise_c, sigma, plan, ws)
                if shift_t.numel():
                    Z.sub_(shift_t.unsqueeze(0)).exp_()
                else:  # already shifted by _chunk_logits
                    Z.exp_()
                e_y = _grad_buffer_(Z, d, srw[j0:j1], idx)
                grad_x += _chunk_backward(Z, e_y, idx, inside, d_y, total, srw[j0:j1], W[j0:j1],
                                          bx, grad_W[j0:j1], rw2[j0:j1], plan)
                del Z, d, noise_c
        grad_x.mul_(b.unsqueeze(1))
        return grad_x.to(xn.dtype), grad_W, None, None, None, None, None


def _lse_shift_is_safe(scale: float, margin: float, dtype: torch.dtype) -> bool:
    """Whether ``exp(z - scale)`` cannot underflow for any logit ``z`` in ``[-s(1+|m|), s]``."""
    limit = -math.log(torch.finfo(dtype).tiny) - 8.0  # keep a margin above the denormals
    return scale * (2.0 + abs(margin)) + 1.0 < limit


def margin_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    margin_type: str = "cosface",
    scale: float = 24.0,
    margin: float = 0.2,
    noise_std: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
    noise_key: Optional[Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    block: Optional[int] = None,
) -> Tensor:
    r"""LEAP margin softmax loss (CosFace/ArcFace with optional feature cloud) in one fused op.

    Equals ``margin_cross_entropy(margin_logits(cosine_logits(embeddings, weight), labels,
    alpha=alpha), labels, reduction)`` (LEAP Eq. 1-2 without, Eq. 7-8 with the cloud) in value
    and gradient, where the cloud angles are ``alpha[n, j] = noise[j, n] * noise_std[n]``:

    * ``noise_std=None``: no cloud (plain CosFace/ArcFace).
    * ``noise_std`` ``(B,)`` and ``noise=None``: ``noise`` is the counter-based draw of
      ``noise_key`` (:mod:`feature_cloud.noise`; a key drawn from ``generator``, or the global
      RNG, when ``None``), exactly as :func:`class_major_noise` draws it.
    * ``noise`` ``(C, B)`` given: used as is (standard normal, class-major).

    ``chunk_size``: process the classes in chunks of (a multiple of ``block`` not below) this
    many, with an online log-sum-exp and a recomputing backward, so that no ``B x C`` tensor
    exists; memory beyond ``weight`` and its gradient is ``O(chunk_size * (B + D))``.
    ``None`` processes all classes at once and keeps ``2 B C`` floats for the backward.

    Labels ``< 0`` are ignored (mean over the others; 0 when none). Under autocast the GEMMs run
    in the autocast dtype and everything else in float32. No host synchronisation.
    """
    if margin_type not in MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {MARGIN_TYPES}, got {margin_type!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings (B, D) and weight (C, D) must agree in D, got {tuple(embeddings.shape)} "
            f"and {tuple(weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    B, C = embeddings.shape[0], weight.shape[0]
    block = NOISE_BLOCK if block is None else int(block)
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if chunk_size is None or int(chunk_size) >= C:
        chunk = max(C, 1)
    else:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        chunk = -(-int(chunk_size) // block) * block
        chunk = max(min(chunk, C), 1)
    cloud = noise_std is not None
    if noise is not None:
        if not cloud:
            raise ValueError("noise needs noise_std (the per-sample cloud standard deviation)")
        if tuple(noise.shape) != (C, B):
            raise ValueError(f"noise must be class-major (C, B) = ({C}, {B}), got {tuple(noise.shape)}")
    if cloud and tuple(noise_std.shape) != (B,):
        raise ValueError(f"noise_std must have shape ({B},), got {tuple(noise_std.shape)}")
    compute = _compute_dtype(embeddings, weight)
    device = embeddings.device
    key = None
    if cloud and noise is None:
        key = random_key(device, generator) if noise_key is None else noise_key.to(device)
    plan = _Plan(
        margin_type=margin_type, scale=float(scale), margin=float(margin), reduction=reduction,
        chunk=chunk, block=block, total=C, compute=compute,
        gemm=_gemm_dtype(device, compute),
        const_shift=float(scale) if _lse_shift_is_safe(float(scale), float(margin), compute) else None,
        pi_below=_PI_BELOW[compute], sqrt_floor=_SQRT_FLOOR[compute], cloud=cloud,
        explicit_noise=noise is not None,
    )
    xn = torch.nn.functional.normalize(embeddings, dim=1)
    sigma = noise_std.to(compute) if cloud else None
    with torch.autocast(device_type=device.type, enabled=False):
        return _FusedMarginCE.apply(xn, weight, labels, sigma, noise, key, plan)
