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
* The cross-entropy's log-sum-exp is shifted by the per-row maximum (online over class
  chunks), so every row's largest exponential is 1, the sum is ``>= 1`` and ``g / sum`` is at
  most the upstream gradient. **No subnormal floats**: the exponent is floored at
  :data:`EXP_FLOOR` (``exp(-40)``; this raises an exponential below ``4e-18`` of the row's
  largest to that value, a relative change of the sum below ``C * 4e-18``, far under float32
  rounding) and the cloud derivative is flushed to 0 below ``1e-12``, so every exponential,
  derivative and their products in the saved buffer are normal floats (or exactly 0) for class
  weights of norm below ``1e8``. Subnormal operands slow CPU GEMMs down by ~8x (and ``exp``
  writing them by ~30x): with a fixed shift, LEAP at ``s = 64`` wrote several percent of them.
* The one saved ``B x C`` buffer is ``softmax * d cos(theta + alpha) / d c / ||W_j||`` (turned
  in place from the exponentials; ``s`` and ``g / sum`` are applied after the GEMMs); the
  ``- onehot`` of the target column is written into the buffer's ``B`` target entries for the
  two backward GEMMs and the saved values are put back after them (under reduced-precision
  GEMMs, where a folded value would not fit their dtype, a rank-``B`` correction after the
  GEMMs), so the backward makes no
  elementwise pass over ``B x C`` and leaves the saved buffer intact (``retain_graph`` works).
* Under autocast the GEMMs run in the autocast dtype on operands of bounded magnitude: the
  saved buffer is at most ``max d / ||W_j||``, and the per-sample factor ``g / sum`` enters the
  weight-gradient GEMM divided by its maximum, which is multiplied back in float32 afterwards;
  so a ``GradScaler``-sized upstream gradient (``65536``) cannot overflow float16.

The layout is class-major (``C x B``) so that a chunk of classes is a contiguous block. With
``chunk_size`` set, classes are processed in chunks: the forward keeps only ``B``-vectors (online
log-sum-exp) and the backward recomputes each chunk (GEMM, cloud noise, margins), so no ``B x C``
tensor is ever materialised and the extra memory beyond ``W`` and its gradient is
``O(chunk_size * (B + D))``. Loss and gradients equal the dense path to rounding.

The cloud noise is counter-based (:mod:`feature_cloud.noise`): the normal of sample ``n`` and
class ``j`` is a pure function of the noise key and ``(n, j)``, so dense and chunked modes (every
chunk size, every class shard) draw identical clouds and the chunked backward recomputes a chunk's
noise from the key alone. Chunk sizes are rounded up to a multiple of :data:`NOISE_BLOCK`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from . import margins as _margins
from ._validation import as_float, check_reduction, check_values
from .angles import _PI_BELOW, _SQRT_FLOOR, _cloud_cosine_, cloud_cosine
from .functional import common_float, safe_normalize
from .noise import counter_normal, random_key

__all__ = [
    "NOISE_BLOCK",
    "EXP_FLOOR",
    "margin_loss",
    "class_major_noise",
    "cloud_angles",
    "cloud_cosine",
]

#: Chunk sizes are multiples of this many classes.
NOISE_BLOCK = 1024

#: Floor of the log-sum-exp exponent ``z - max`` (float32; float64 uses -300): no subnormal
#: exponentials (see the module docstring).
EXP_FLOOR = -40.0
_EXP_FLOOR = {torch.float32: EXP_FLOOR, torch.float64: -300.0}


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _autocast_by_device() -> bool:
    """Whether this torch has ``is_autocast_enabled(device_type)`` / ``get_autocast_dtype``
    (torch >= 2.4); read once, so that a compiled step branches on a constant (torch 2.2's
    dynamo raised an internal error on the older torch's TypeError it was meant to catch)."""
    try:
        torch.is_autocast_enabled("cpu")
        return hasattr(torch, "get_autocast_dtype")
    except (TypeError, RuntimeError):
        return False


_AUTOCAST_BY_DEVICE = _autocast_by_device()


def _gemm_dtype(device: torch.device, compute: torch.dtype) -> torch.dtype:
    """The autocast dtype when autocast is on for ``device`` (as ``F.linear`` would use)."""
    if compute == torch.float64:
        return compute
    if _AUTOCAST_BY_DEVICE:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return compute
    # older torch: no device argument
    if device.type == "cpu" and torch.is_autocast_cpu_enabled():
        return torch.get_autocast_cpu_dtype()
    if device.type == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return compute


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
    class_start + num_classes`` of a head with ``total_classes`` (default: up to the last row)
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
    std: Tensor,
    num_classes: int,
    key: Optional[Tensor] = None,
    block: Optional[int] = None,
    *,
    class_start: int = 0,
    total_classes: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    r"""Per-logit cloud angles :math:`\alpha` ``(B, C)`` of LEAP Sec. 3.4 as every head draws them.

    :math:`\alpha_{nj} = \mathrm{std}_n z_{jn}` with ``z = class_major_noise(C, B, key, ...)``:
    the same distribution as :func:`~feature_cloud.functional.angle_noise` (i.i.d.
    :math:`N(0, \mathrm{std}_n^2)`), the same numbers in every chunking and class shard
    (``class_start``/``total_classes``). Returned as a transposed view.
    """
    noise = class_major_noise(
        num_classes,
        std.shape[0],
        key,
        std.device,
        block,
        class_start=class_start,
        total_classes=total_classes,
        generator=generator,
    )
    dtype = torch.promote_types(noise.dtype, std.dtype)  # float64 std: float64 angles
    return noise.t().to(dtype) * std.to(dtype).unsqueeze(1)


# ------------------------------------------------------------------------------------------
# The autograd Function
# ------------------------------------------------------------------------------------------


class _Plan:
    """Static configuration of one call (plain Python values, no tensors)."""

    __slots__ = (
        "rule",
        "scale",
        "smoothing",
        "num_classes",
        "reducer",
        "want_pred",
        "margin",
        "reduction",
        "chunk",
        "block",
        "class_start",
        "compute",
        "gemm",
        "exp_floor",
        "pi_below",
        "sqrt_floor",
        "cloud",
        "explicit_noise",
        "target_cloud",
    )

    rule: Any  # margins.Margin
    scale: float
    smoothing: float
    num_classes: int
    reducer: Any
    want_pred: bool
    margin: float
    reduction: str
    chunk: int
    block: int
    class_start: int
    compute: torch.dtype
    gemm: torch.dtype
    exp_floor: float
    pi_below: float
    sqrt_floor: float
    cloud: bool
    explicit_noise: bool
    target_cloud: bool

    def __init__(self, **kw: Any) -> None:
        for k, v in kw.items():
            setattr(self, k, v)


def _target_index(
    labels: Tensor, valid: Tensor, j0: int, j1: int, batch: int
) -> Tuple[Tensor, Tensor]:
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
        self.bufs: Dict[Tuple[str, Optional[torch.dtype]], Tensor] = {}

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
    alpha_t: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Tensor]:
    """Scaled margin logits of classes ``j0 .. j0 + len(Wc)`` (class-major), LEAP Eq. 1-2 / 7-8.

    Returns ``(Z, d, idx, inside, z_y, d_y, pred, c_y)``: logits ``(Cc, B)`` (a workspace buffer,
    target entries included); the elementwise derivative ``d cos(theta + alpha) / d c``
    (``None`` without cloud, meaning 1); the target index and in-chunk mask (``valid``: rows
    with a target in this weight); the target logit (margin applied) and the derivative of its
    cosine; the largest plain cosine over the chunk per sample when ``plan.want_pred``; the
    target's plain cosine.
    ``noise_c`` (when generated) is a workspace buffer and is overwritten. ``alpha_t`` ``(B,)``:
    a target-only cloud (angles added to each row's target angle only, no per-logit cloud).
    """
    B, Cc = xg.shape[0], Wc.shape[0]
    s, m = plan.scale, plan.margin
    Z = ws.get("z", Cc)
    if plan.gemm == plan.compute:
        torch.mm(Wc, xg.t(), out=Z)
    else:
        Z.copy_(torch.mm(Wc.to(plan.gemm), xg.t()))
    idx, inside = _target_index(labels, valid, j0, j0 + Cc, B)
    pred: Optional[Tensor] = None
    if plan.cloud:
        assert sigma is not None and noise_c is not None
        c = Z.mul_(rwc.unsqueeze(1)).clamp_(-1.0, 1.0)
        if plan.want_pred:  # the plain cosine's best (before the cloud destroys c)
            pred = c.amax(0)
        half_sigma = (sigma * 0.5).unsqueeze(0)  # the kernel works on alpha / 2 (exact)
        if plan.explicit_noise or noise_c.dtype != plan.compute:  # never write the caller's
            half = torch.mul(noise_c.to(plan.compute), half_sigma, out=ws.get("n", Cc))
        else:
            half = noise_c.mul_(half_sigma)
        # the target's angle before the clamp: the margin's target clips theta + alpha + m
        # itself, as the reference does (clamping alpha first moved it off 0 when alpha < -pi)
        alpha_y: Optional[Tensor] = half.view(-1).gather(0, idx) * 2.0
        half.clamp_(-0.5 * plan.pi_below, 0.5 * plan.pi_below)
        c_y = c.view(-1).gather(0, idx)
        f, d = _cloud_cosine_(
            c, half, ws.get("f", Cc), ws.get("t", Cc), ws.get("d", Cc), plan.sqrt_floor
        )
        Z = f.mul_(s)
    else:
        d, alpha_y = None, alpha_t
        Z.mul_((rwc * s).unsqueeze(1))
        if plan.want_pred:
            pred = (Z.amax(0) / s).clamp_(-1.0, 1.0)
        c_y = (Z.view(-1).gather(0, idx) / s).clamp_(-1.0, 1.0)
    # the margin's target (LEAP Eq. 1-2 / 7-8) and its derivative, from the registry
    f_y, d_y = plan.rule.fused_target(c_y, alpha_y, m)
    z_y = f_y * s
    flat = Z.view(-1)
    flat.scatter_(0, idx, torch.where(inside, z_y, flat.gather(0, idx)))
    return Z, d, idx, inside, z_y, d_y, pred, c_y


def _shifted_exp_(Z: Tensor, shift: Tensor, plan: _Plan) -> Tensor:
    """``Z -> exp(max(Z - shift, EXP_FLOOR))`` in place (``shift`` per column, ``>=`` its max)."""
    return Z.sub_(shift.unsqueeze(0)).clamp_min_(plan.exp_floor).exp_()


def _lse_update(Z: Tensor, run_max: Tensor, total: Tensor, plan: _Plan) -> Tensor:
    """Turn logits ``Z`` into ``exp(Z - max)`` in place and add them to ``total`` (in place).

    Online log-sum-exp: ``max`` is the running per-sample maximum over the chunks so far,
    ``total`` is rescaled by ``exp(old_max - new_max)``; returns the new maximum.
    """
    if Z.shape[0] == 0 or Z.shape[1] == 0:
        return run_max
    new_max = torch.maximum(run_max, Z.amax(0))
    total.mul_(torch.exp((run_max - new_max).clamp_min_(plan.exp_floor)))  # 0 when -inf
    total.add_(_shifted_exp_(Z, new_max, plan).sum(0))
    return new_max


def _grad_buffer_(
    E: Tensor, d: Optional[Tensor], rwc: Tensor, idx: Tensor, u: Optional[Tensor] = None
) -> Tensor:
    """``E -> G0 = (E - u) * d * rw`` in place (``u`` per sample: the label-smoothing term);
    returns the target entries ``E_y`` read first."""
    e_y = E.view(-1).gather(0, idx)
    if u is not None:
        E.sub_(u.unsqueeze(0))
    if d is not None:
        E.mul_(d)
    E.mul_(rwc.unsqueeze(1))
    return e_y


def _chunk_backward(
    G0: Tensor,
    e_y: Tensor,
    idx: Tensor,
    inside: Tensor,
    d_y: Tensor,
    a: Tensor,
    c: Tensor,
    u: Optional[Tensor],
    rwc: Tensor,
    Wc: Tensor,
    xn: Tensor,
    xs: Tensor,
    post: Optional[Tensor],
    gWc: Tensor,
    rw2c: Tensor,
    plan: _Plan,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Gradients of one chunk; ``G0`` is left as it was (``retain_graph`` and gradcheck work).

    With upstream ``a_n = dL/dS_n`` (``S`` the sum of exponentials, so ``dL/dz_jn = a_n
    E_jn`` plus target and smoothing terms) and ``c_n = dL/dz_{n y_n}``, ``dL/d(W_j . xn_n) =
    s (a_n G_jn + c_n d_y rw_y [j = y_n])`` where ``G0 = (E - u) d rw`` everywhere except at the
    targets, which hold ``(E_y - u) d_y rw_y``. The target terms form one coefficient per sample
    (``corr``), so the backward makes no pass over ``B x C``: they are folded into the ``B``
    target entries of ``G0`` (``+ corr / (s a)``) for the two GEMMs and the entries are written
    back after them; under reduced-precision GEMMs or sharded, entries whose folded value would
    not fit the GEMM's dtype keep a rank-``B`` correction after the GEMMs instead. Returns ``(G0^T @ Wc, corr * W_y or None when folded)`` (the
    caller scales the first by ``s a``) and writes the class-weight gradient into ``gWc``: ``M = s G0 @ (a xn)`` (the GEMM
    operand is ``xs = s a xn``, divided by ``post`` under reduced-precision GEMMs and ``post``
    applied in float32) plus ``corr xn`` on the target rows, then ``grad W_j = M_j - rw_j^2
    (W_j . M_j) W_j`` (the backward of ``W_j / ||W_j||`` done once on ``C x D``).
    """
    B = G0.shape[1]
    local = torch.div(idx, max(B, 1), rounding_mode="floor")
    ey = e_y if u is None else e_y - u
    rw_y = rwc.gather(0, local)
    flat = G0.data.view(-1)  # .data: the fold below restores G0, no autograd version bump
    g_y = flat.gather(0, idx)
    corr = (a * (ey * d_y * rw_y - g_y) + c * d_y * rw_y) * plan.scale
    corr = torch.where(inside, corr, torch.zeros_like(corr))
    # Full-precision GEMMs of one process: fold the target terms into G0's target entries for
    # the GEMMs (corr / (s a), read by both) and put the entries back afterwards, instead of a
    # gather of W_y and a scatter of corr xn (strided in PML's (D, C) layout). Otherwise per
    # sample (below).
    fold = plan.reducer is None and post is None and G0.dtype == plan.gemm == Wc.dtype
    refold = not fold
    if fold:
        sa = a * plan.scale
        flat.scatter_(0, idx, g_y + torch.where(sa != 0, corr / sa, torch.zeros_like(corr)))
    elif refold:
        # Reduced-precision GEMMs (autocast) or sharded: where the target entry ~ p_y and the
        # correction ~ -1 after the GEMM cancel (a converged sample), the gradient of size
        # 1 - p_y was mostly the GEMM's rounding of p_y W_y (2^-8 in bf16). Folded where that
        # happens (the folded entry smaller than the saved one), the GEMM sees the small
        # difference; elsewhere (p_y ~ 0: the exact float32 correction is the larger term) and
        # where the folded entry would not fit the GEMM's dtype (a shard's underflowing local
        # s a) the correction stays apart.
        sa = a * plan.scale
        folded = g_y + corr / torch.where(sa != 0, sa, torch.ones_like(sa))
        # |folded| <= max / 2B: a weight-gradient row (a sum over <= B samples of the folded
        # entry times an operand in [-1, 1]) stays finite in the GEMM's dtype
        fits = (
            (sa != 0)
            & (folded.abs() < g_y.abs())
            & (folded.abs() <= torch.finfo(plan.gemm).max / (2 * max(B, 1)))
        )
        flat.scatter_(0, idx, torch.where(fits, folded, g_y))
        corr = torch.where(fits, torch.zeros_like(corr), corr)
    Gg = G0.to(plan.gemm) if plan.gemm != G0.dtype else G0
    Wg = Wc.to(plan.gemm) if plan.gemm != Wc.dtype else Wc
    gx = torch.mm(Gg.t(), Wg).to(plan.compute)
    gx_corr = None if fold else corr.unsqueeze(1) * _rows_of(Wc, local).to(plan.compute)
    xsg = xs.to(plan.gemm) if plan.gemm != xs.dtype else xs
    if post is None and gWc.dtype == plan.gemm and gWc.is_contiguous():
        torch.mm(Gg, xsg, out=gWc)
    elif post is None and gWc.dtype == plan.gemm and gWc.t().is_contiguous():
        torch.mm(xsg.t(), Gg.t(), out=gWc.t())  # the (D, C) layout of a transposed weight
    else:
        gWc.copy_(torch.mm(Gg, xsg))
        if post is not None:
            gWc.mul_(post)
    if fold or refold:
        flat.scatter_(0, idx, g_y)  # G0 exactly as saved (retain_graph, double backward)
    if not fold:
        rows = (corr.unsqueeze(1) * xn).to(gWc.dtype)
        if _column_major(gWc):  # PML's (D, C) gradient: add along its contiguous dimension
            gWc.t().index_add_(1, local, rows.t())
        else:
            gWc.index_add_(0, local, rows)
    _normalize_backward_(gWc, Wc, rw2c)
    return gx, gx_corr


#: Elements of the temporary of one row block off the CPU (128 MiB in float32).
_DEVICE_BLOCK_ELEMENTS = 1 << 25


def _block_rows(t: Tensor, cpu_rows: int) -> int:
    """Rows per block of the blocked passes over ``t`` ``(R, K)``: ``cpu_rows`` on the CPU (the
    block stays in cache); elsewhere as many rows as a ``_DEVICE_BLOCK_ELEMENTS`` temporary holds
    (a GPU pays a kernel launch per block: at ``B = 256, C = 10k`` the CPU's 256-row blocks were
    most of the fused step's ~500 dispatched ops on an H200)."""
    if t.device.type == "cpu":
        return cpu_rows
    return max(cpu_rows, _DEVICE_BLOCK_ELEMENTS // max(t.shape[1], 1))


def _normalize_backward_(gW: Tensor, W: Tensor, rw2: Tensor, rows: Optional[int] = None) -> None:
    """``gW_j -= rw_j^2 (W_j . gW_j) W_j`` in place, in row blocks that stay in cache (one pass
    over ``C x D`` instead of a row-dot pass and an update pass, no ``C x D`` temporary).
    Weights stored ``(D, C)`` (PML's ``W``, passed as ``W.t()``) are walked in their own layout."""
    if gW.t().is_contiguous() and W.t().is_contiguous() and not gW.is_contiguous():
        gt, wt = gW.t(), W.t().to(gW.dtype)  # (D, C): blocks of D rows, all classes
        coef = (_column_dots(gt, wt, gW.dtype) * rw2.to(gW.dtype)).unsqueeze(0)
        gt.addcmul_(wt, coef, value=-1)
        return
    rows = _block_rows(gW, 256) if rows is None else rows
    tmp = torch.empty(min(rows, gW.shape[0]), gW.shape[1], dtype=gW.dtype, device=gW.device)
    for r0 in range(0, gW.shape[0], rows):
        g, w = gW[r0 : r0 + rows], W[r0 : r0 + rows].to(gW.dtype)
        dot = torch.mul(g, w, out=tmp[: g.shape[0]]).sum(1)
        g.addcmul_(w, (dot * rw2[r0 : r0 + rows]).unsqueeze(1).to(gW.dtype), value=-1)


def _chunk_noise(
    noise: Optional[Tensor],
    j0: int,
    j1: int,
    B: int,
    key: Optional[Tensor],
    plan: _Plan,
) -> Optional[Tensor]:
    if not plan.cloud:
        return None
    if plan.explicit_noise:
        assert noise is not None
        return noise[j0:j1]
    assert key is not None
    c0 = plan.class_start
    return counter_normal(key, B, c0 + j0, c0 + j1, plan.num_classes)


#: ``all_reduce(tensor, op)`` with ``op`` in ``("max", "sum")``, returning the reduced tensor:
#: how a sharded caller combines the per-shard log-sum-exp (Partial FC style).
Reducer = Callable[[Tensor, str], Tensor]


def _transposed(W: Tensor) -> bool:
    """Whether ``W`` ``(C, D)`` is the transpose of a contiguous ``(D, C)`` tensor (PML's ``W``):
    its norms and its gradient are then computed in that layout (no transposing copy)."""
    return W.dim() == 2 and W.shape[0] > 1 and W.stride() == (1, W.shape[0])


def _column_major(W: Tensor) -> bool:
    """Whether the rows of ``W`` ``(C, D)`` are strided columns (a slice of PML's ``W.t()``)."""
    return W.dim() == 2 and W.shape[0] > 1 and W.shape[1] > 1 and W.stride(0) == 1


def _row_norms(W: Tensor, compute: torch.dtype) -> Tensor:
    """``||W_j||`` ``(C,)`` in ``compute``; a transposed weight is walked in its own ``(D, C)``
    layout, in blocks of rows (a strided norm over ``dim=0`` is several times slower)."""
    if not _column_major(W):
        return torch.linalg.vector_norm(W, dim=1, dtype=compute)
    wt = W.t()
    return _column_dots(wt, wt, compute).sqrt_()


def _column_dots(a: Tensor, b: Tensor, dtype: torch.dtype, rows: Optional[int] = None) -> Tensor:
    """``(a * b).sum(0)`` ``(C,)`` of two contiguous ``(D, C)`` tensors in ``dtype``: products
    accumulated into a ``rows x C`` buffer block by block (one fused multiply-add pass, no
    ``D x C`` temporary), reduced once at the end (about 1.7x faster than a sum per block;
    on the CPU 32 rows keep the buffer in cache for ``C`` up to ~10k; elsewhere
    :func:`_block_rows`)."""
    rows = _block_rows(a, 32) if rows is None else rows
    acc = torch.mul(a[:rows].to(dtype), b[:rows].to(dtype))
    for r0 in range(rows, a.shape[0], rows):
        x, y = a[r0 : r0 + rows].to(dtype), b[r0 : r0 + rows].to(dtype)
        acc[: x.shape[0]].addcmul_(x, y)
    return acc.sum(0)


def _rows_of(W: Tensor, index: Tensor) -> Tensor:
    """``W[index]`` (gathered in the layout ``W`` is stored in)."""
    if _column_major(W):
        return W.t().index_select(1, index).t()
    return W.index_select(0, index)


class _FusedMarginCE(torch.autograd.Function):
    """Margin softmax cross-entropy over ``(xn, W)``; see the module docstring.

    ``labels`` index ``W`` (``-1``: the row's target is not in ``W``); ``valid`` marks the rows
    that count (``labels >= 0`` unless the caller holds one shard of the classes). With
    ``plan.reducer`` the per-row maximum, the sum of exponentials and the target logit are
    all-reduced over the shards; the backward needs no communication (each shard's gradients
    are local; the caller sums the embeddings' gradient, e.g. by a reduce-scatter).
    """

    @staticmethod
    def forward(
        ctx: Any,
        xn: Tensor,
        W: Tensor,
        labels: Tensor,
        valid: Tensor,
        sigma: Optional[Tensor],
        noise: Optional[Tensor],
        key: Optional[Tensor],
        plan: _Plan,
        alpha_t: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        B, C = xn.shape[0], W.shape[0]
        compute, device = plan.compute, xn.device
        xg = xn.to(plan.gemm)
        has_target = labels >= 0
        norms = _row_norms(W, compute)
        rw = 1.0 / norms.clamp_min(1e-12)
        total = torch.zeros(B, dtype=compute, device=device)
        run_max = torch.full((B,), -math.inf, dtype=compute, device=device)
        z_target = torch.zeros(B, dtype=compute, device=device)
        z_sum = torch.zeros(B, dtype=compute, device=device) if plan.smoothing else None
        best = torch.full((B,), -math.inf, dtype=compute, device=device)
        c_target = torch.zeros(B, dtype=compute, device=device)
        dense = plan.chunk >= C
        ws = _Workspace(min(plan.chunk, C), B, compute, device)
        saved: Tuple[Any, ...] = ()
        for j0 in range(0, C, plan.chunk):
            j1 = min(j0 + plan.chunk, C)
            noise_c = _chunk_noise(noise, j0, j1, B, key, plan)
            Z, d, idx, inside, z_y, d_y, cmax, c_y = _chunk_logits(
                xg, W[j0:j1], rw[j0:j1], labels, has_target, j0, noise_c, sigma, plan, ws, alpha_t
            )
            z_target.add_(torch.where(inside, z_y, torch.zeros_like(z_y)))
            if cmax is not None:  # top-1: the target's plain cosine against the best one
                best = torch.maximum(best, cmax)
                c_target.add_(torch.where(inside, c_y, torch.zeros_like(c_y)))
            if z_sum is not None:
                z_sum.add_(Z.sum(0))
            run_max = _lse_update(Z, run_max, total, plan)
            if dense:
                saved = (Z, d, idx, inside, d_y)
            del Z, d, noise_c
        del ws
        if plan.reducer is not None:  # Partial FC: global max, sum and target over the shards
            shift = plan.reducer(run_max, "max")
            local_scale = torch.exp((run_max - shift).clamp_min_(plan.exp_floor))
            S = plan.reducer(total * local_scale, "sum")
            z_target = plan.reducer(z_target, "sum")
        else:
            shift, local_scale, S = run_max, torch.ones_like(total), total
        target = z_target
        if z_sum is not None:  # label smoothing: targets 1 - eps + eps / C and eps / C
            eps = plan.smoothing
            target = z_target * (1.0 - eps) + z_sum * (eps / plan.num_classes)
        # (shift - target) first: near-equal logits of about s cancel exactly, and the small
        # log(S) of a converged row keeps its precision (log(S) + shift would round it to
        # the ulp of s, 4e-6 at s = 64)
        per_sample = torch.where(valid, torch.log(S) + (shift - target), torch.zeros_like(S))
        if plan.reduction == "none":
            out = per_sample
        elif plan.reduction == "sum":
            out = per_sample.sum()
        else:
            out = per_sample.sum() / valid.sum().clamp_min(1)
        u = None
        if dense and C > 0:
            if plan.smoothing:
                u = S * (plan.smoothing / plan.num_classes) / local_scale
            Z, d, idx, inside, d_y = saved
            e_y = _grad_buffer_(Z, d, rw, idx, u)
            saved = (Z, e_y, idx, inside, d_y)
        ctx.plan, ctx.dense = plan, dense
        ctx.has_noise = noise is not None
        ctx.save_for_backward(
            xn,
            W,
            labels,
            valid,
            sigma if sigma is not None else xn.new_empty(0),
            noise if noise is not None else xn.new_empty(0),
            key if key is not None else labels.new_empty(0),
            alpha_t if alpha_t is not None else xn.new_empty(0),
            rw,
            norms,
            S,
            local_scale,
            run_max,
            *saved,
        )
        top1 = has_target & valid & (c_target >= best)
        ctx.mark_non_differentiable(labels, top1)
        return out, top1

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_pred: Optional[Tensor]) -> Tuple[Any, ...]:
        if torch.is_grad_enabled():  # backward(create_graph=True): no graph of this backward
            raise RuntimeError(
                "the fused margin loss has no double backward (create_graph=True, e.g. a "
                "gradient penalty): build the head with impl='reference' for that"
            )
        plan: _Plan = ctx.plan
        every = ctx.saved_tensors  # read once: activation checkpointing allows one unpack
        (xn, W, labels, valid, sigma, noise, key, alpha_t, rw, norms, S, local_scale, shift_t) = (
            every[:13]
        )
        saved = every[13:]
        B, C = xn.shape[0], W.shape[0]
        compute, device = plan.compute, xn.device
        has_target = labels >= 0
        g = grad_out.to(compute)
        if plan.reduction == "mean":
            g = g / valid.sum().clamp_min(1)
        g = torch.where(
            valid, g.expand(B) if g.dim() == 0 else g, torch.zeros((), dtype=compute, device=device)
        )
        tiny = torch.finfo(compute).tiny
        a = g * local_scale / S.clamp_min(tiny)  # dL/dS_local, S_local = sum exp(z - local max)
        c = -g * (1.0 - plan.smoothing)  # dL/dz_y
        u = S * (plan.smoothing / plan.num_classes) / local_scale if plan.smoothing else None
        sa = a * plan.scale
        xs = xn.to(compute) * sa.unsqueeze(1)
        post: Optional[Tensor] = None
        if plan.gemm != compute:  # the GEMM operand in [-1, 1]; the scale goes back in float32
            post = sa.abs().amax().clamp_min(tiny)
            xs = xs / post
        xn_c = xn.to(compute)
        rw2 = torch.where(norms > 1e-12, rw * rw, torch.zeros_like(rw))
        grad_W = (
            torch.empty(W.shape[1], C, dtype=W.dtype, device=device).t()
            if _transposed(W)
            else torch.empty(C, W.shape[1], dtype=W.dtype, device=device)
        )
        grad_x = torch.zeros(B, xn.shape[1], dtype=compute, device=device)
        grad_corr = torch.zeros(B, xn.shape[1], dtype=compute, device=device)
        if ctx.dense:
            if C > 0:
                G0, e_y, idx, inside, d_y = saved
                gx, gc = _chunk_backward(
                    G0, e_y, idx, inside, d_y, a, c, u, rw, W, xn_c, xs, post, grad_W, rw2, plan
                )
                grad_x += gx
                if gc is not None:
                    grad_corr += gc
        else:
            xg = xn.to(plan.gemm)
            ws = _Workspace(plan.chunk, B, compute, device)
            for j0 in range(0, C, plan.chunk):
                j1 = min(j0 + plan.chunk, C)
                noise_c = _chunk_noise(noise if ctx.has_noise else None, j0, j1, B, key, plan)
                Z, d, idx, inside, _, d_y, _, _ = _chunk_logits(
                    xg,
                    W[j0:j1],
                    rw[j0:j1],
                    labels,
                    has_target,
                    j0,
                    noise_c,
                    sigma,
                    plan,
                    ws,
                    alpha_t if plan.target_cloud else None,
                )
                e_y = _grad_buffer_(_shifted_exp_(Z, shift_t, plan), d, rw[j0:j1], idx, u)
                gx, gc = _chunk_backward(
                    Z,
                    e_y,
                    idx,
                    inside,
                    d_y,
                    a,
                    c,
                    u,
                    rw[j0:j1],
                    W[j0:j1],
                    xn_c,
                    xs,
                    post,
                    grad_W[j0:j1],
                    rw2[j0:j1],
                    plan,
                )
                grad_x += gx
                if gc is not None:
                    grad_corr += gc
                del Z, d, noise_c
        grad_x.mul_(sa.unsqueeze(1)).add_(grad_corr)
        return grad_x.to(xn.dtype), grad_W, None, None, None, None, None, None, None


def margin_loss(
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    margin_type: Union[str, _margins.Margin] = "cosface",
    scale: Optional[float] = None,
    margin: Optional[float] = None,
    noise_std: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
    noise_key: Optional[Tensor] = None,
    target_angles: Optional[Tensor] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    block: Optional[int] = None,
    validate: bool = True,
    label_smoothing: float = 0.0,
    return_top1: bool = False,
    row_valid: Optional[Tensor] = None,
    reducer: Optional[Reducer] = None,
    num_classes: Optional[int] = None,
    class_start: int = 0,
    sub_centers: Optional[int] = None,
) -> Any:  # the loss, or (loss, top1) with return_top1
    r"""LEAP margin softmax loss (a registered margin, :mod:`feature_cloud.margins`, with an
    optional feature cloud) in one fused op. The margin must implement
    :meth:`~feature_cloud.margins.Margin.fused_target` and use one weight row per class.

    Equals ``margin_cross_entropy(margin_logits(cosine_logits(embeddings, weight), labels,
    alpha=alpha), labels, reduction)`` (LEAP Eq. 1-2 without, Eq. 7-8 with the cloud) in value
    and gradient, where the cloud angles are ``alpha[n, j] = noise[j, n] * noise_std[n]``:

    * ``noise_std=None``: no cloud (plain CosFace/ArcFace).
    * ``noise_std`` ``(B,)`` and ``noise=None``: ``noise`` is the counter-based draw of
      ``noise_key`` (:mod:`feature_cloud.noise`; a key drawn from ``generator``, or the global
      RNG, when ``None``), exactly as :func:`class_major_noise` draws it.
    * ``noise`` ``(C, B)`` given: used as is (standard normal, class-major).
    * ``target_angles`` ``(B,)`` instead: a target-only cloud (``cloud_mode`` ``"target"`` /
      ``"margin"``, :func:`~feature_cloud.functional.target_cloud_angles`): ``alpha`` is
      ``target_angles[n]`` on each row's target logit and 0 elsewhere.

    ``chunk_size``: process the classes in chunks of (a multiple of ``block`` not below) this
    many, with an online log-sum-exp and a recomputing backward, so that no ``B x C`` tensor
    exists; memory beyond ``weight`` and its gradient is ``O(chunk_size * (B + D))``.
    ``None`` processes all classes at once and keeps ``2 B C`` floats for the backward.

    Labels ``< 0`` are ignored (mean over the others; 0 when none). Under autocast the GEMMs run
    in the autocast dtype and everything else in float32. ``validate=True`` rejects labels
    outside ``[0, C)`` other than ``-1`` and non-finite embeddings, like the reference raises
    for out-of-range labels (one host sync, skipped under ``torch.compile``); with
    ``validate=False`` (callers that checked already) there is no host synchronisation.

    ``label_smoothing`` ``eps``: the cross-entropy against targets ``1 - eps + eps / C`` and
    ``eps / C`` (``F.cross_entropy(label_smoothing=eps)``; fastreid's ``CE.EPSILON`` ``e``
    is ``eps = e C / (C - 1)``), at the cost of one sum over the logits.
    ``return_top1``: also return, per sample, whether its target has the largest plain cosine
    (top-1 correct by ``s cos theta``, ties counted correct; for accuracy logging without a
    second GEMM or an arg-max pass).

    Sharded classes (Partial FC; :class:`~feature_cloud.distributed.ShardedLEAPMarginHead`):
    ``weight`` is this process's shard, ``labels`` index it (``-1`` where another shard owns
    the target), ``row_valid`` marks the rows that count, ``reducer(t, "max" | "sum")``
    all-reduces over the shards, ``num_classes`` is the total and ``class_start`` the global
    index of the shard's first class (the cloud noise is indexed by global class). The loss is
    then the global one on every shard; the embeddings' gradient is this shard's part (sum it
    over shards).

    ``sub_centers``: weight rows per class (default: the margin's, 3 for sub-center ArcFace);
    the fused kernels need 1 (a sub-center margin with ``sub_centers=1`` is its base margin).
    ``scale`` / ``margin`` default to the margin's (CosFace 24 / 0.2, ArcFace 16 / 0.2 rad).
    """
    rule = _margins.get(margin_type)
    scale = rule.default_scale if scale is None else scale
    margin = rule.default_margin if margin is None else margin
    label_smoothing = as_float(
        label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0, max_inclusive=False
    )
    if label_smoothing and reducer is not None:
        raise ValueError("label_smoothing is not supported with sharded classes (reducer)")
    k = rule.sub_centers if sub_centers is None else sub_centers
    if not rule.has_fused or k != 1:
        why = "no fused_target" if not rule.has_fused else f"sub_centers={k} weight rows a class"
        raise ValueError(
            f"margin {rule.name!r} has no fused implementation here ({why}); use "
            "feature_cloud.functional (LEAPMarginHead falls back to it automatically)"
        )
    check_reduction(reduction)
    if embeddings.dim() != 2 or weight.dim() != 2 or embeddings.shape[1] != weight.shape[1]:
        raise ValueError(
            f"embeddings (B, D) and weight (C, D) must agree in D, got {tuple(embeddings.shape)} "
            f"and {tuple(weight.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
    B, C = embeddings.shape[0], weight.shape[0]
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    labels = labels.long()
    if row_valid is None:
        row_valid = labels >= 0
    elif tuple(row_valid.shape) != (B,) or row_valid.dtype != torch.bool:
        raise ValueError(f"row_valid must be a bool tensor of shape ({B},)")
    if validate:
        check_values(embeddings, labels, C)
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
            raise ValueError(
                f"noise must be class-major (C, B) = ({C}, {B}), got {tuple(noise.shape)}"
            )
    if noise_std is not None and tuple(noise_std.shape) != (B,):
        raise ValueError(f"noise_std must have shape ({B},), got {tuple(noise_std.shape)}")
    if target_angles is not None:
        if cloud:
            raise ValueError("give noise_std (a per-logit cloud) or target_angles, not both")
        if tuple(target_angles.shape) != (B,):
            raise ValueError(
                f"target_angles must have shape ({B},), got {tuple(target_angles.shape)}"
            )
    # half-precision tensors without autocast are upcast, as the heads do (the GEMM wrote a
    # float16 product into the float32 logits buffer)
    embeddings, weight = common_float(embeddings, weight)
    compute = _compute_dtype(embeddings, weight)
    device = embeddings.device
    key = None
    if cloud and noise is None:
        key = random_key(device, generator) if noise_key is None else noise_key.to(device)
    plan = _Plan(
        rule=rule,
        scale=float(scale),
        margin=float(margin),
        reduction=reduction,
        chunk=chunk,
        block=block,
        class_start=int(class_start),
        compute=compute,
        gemm=_gemm_dtype(device, compute),
        exp_floor=_EXP_FLOOR[compute],
        pi_below=_PI_BELOW[compute],
        sqrt_floor=_SQRT_FLOOR[compute],
        cloud=cloud,
        explicit_noise=noise is not None,
        target_cloud=target_angles is not None,
        smoothing=float(label_smoothing),
        num_classes=int(C + class_start if num_classes is None else num_classes),
        reducer=reducer,
        want_pred=bool(return_top1),
    )
    xn = safe_normalize(embeddings, dim=1)
    sigma = noise_std.to(compute) if noise_std is not None else None
    alpha_t = target_angles.detach().to(compute) if target_angles is not None else None
    with torch.autocast(device_type=device.type, enabled=False):
        loss, top1 = _FusedMarginCE.apply(
            xn, weight, labels, row_valid, sigma, noise, key, plan, alpha_t
        )
    return (loss, top1) if return_top1 else loss
