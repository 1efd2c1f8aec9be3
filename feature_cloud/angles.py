r"""Angle arithmetic of the margins (LEAP Eq. 7-8): pure elementwise functions.

The lowest layer of the package: :mod:`feature_cloud.margins` builds every margin's target
logit from these, :mod:`feature_cloud.functional` (the reference pipeline, which re-exports
:func:`safe_acos` and :func:`shifted_cosine`) and :mod:`feature_cloud.fused` (which re-exports
:func:`cloud_cosine`) call them. Nothing here imports the rest of the package.

* :func:`safe_acos` / :func:`shifted_cosine`: autograd-differentiable (the reference path);
* :func:`cloud_cosine`: the same clipped :math:`\cos(\theta + \alpha)` and its derivative
  w.r.t. :math:`\cos\theta` as plain tensors, without ``acos`` (the fused paths).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["safe_acos", "shifted_cosine", "cloud_cosine"]

# Floor for 1 - x^2 in the acos derivative: keeps the gradient finite (|grad| <= ~2.9e3) where the
# true derivative -1/sqrt(1 - x^2) is infinite, i.e. at x = +-1 exactly (a feature equal to a class
# weight). Everywhere with 1 - x^2 >= this floor the gradient is exact.
_ACOS_GRAD_FLOOR = float(torch.finfo(torch.float32).eps)


# d cos(theta + alpha)/dc is flushed to 0 below this (the sin(theta + alpha) factor), so that
# exponential * derivative stays a normal float: exp(-40) * 1e-12 = 4e-30 (float64: 5e-231).
_SIN_FLOOR = {torch.float32: 1e-12, torch.float64: 1e-100}

# Largest float below pi per dtype: clamping alpha there keeps |alpha| < pi, where "clipped" is
# exactly sin(theta + alpha) < 0 (see cloud_cosine). float64(math.pi) is already below pi.
_PI_BELOW = {
    torch.float32: 3.141592502593994,
    torch.float64: math.pi,
}
# sqrt of the floor on 1 - c^2 used by safe_acos (float32 eps; 1e-30 in float64)
_SQRT_FLOOR = {
    torch.float32: math.sqrt(float(torch.finfo(torch.float32).eps)),
    torch.float64: 1e-15,
}


class _SafeAcos(torch.autograd.Function):
    """``acos`` with inputs clamped to ``[-1, 1]`` and a finite derivative at ``+-1``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)  # the input itself: its graph makes the backward differentiable
        return torch.acos(x.clamp(-1.0, 1.0))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        # torch ops on the saved input: backward(create_graph=True) records them, so a gradient
        # penalty gets the true second derivative (a detached clamp gave it as zero)
        (x,) = ctx.saved_tensors
        x = x.clamp(-1.0, 1.0)
        floor = _ACOS_GRAD_FLOOR if x.dtype != torch.float64 else 1e-30
        return -grad * torch.rsqrt((1.0 - x * x).clamp_min(floor))


def safe_acos(x: Tensor) -> Tensor:
    r"""Numerically safe :math:`\arccos` (the target angle of every margin).

    The input is clamped to ``[-1, 1]`` (rounding can push a cosine of normalised vectors past 1)
    and the derivative :math:`-1/\sqrt{1-x^2}` uses ``max(1 - x^2, eps)`` so that it stays finite
    at ``x = +-1``; elsewhere it is the exact derivative (no straight-through approximation).
    Half-precision inputs should be upcast first;
    :func:`~feature_cloud.functional.margin_logits` does that.
    """
    return _SafeAcos.apply(x)


def shifted_cosine(cos: Tensor, shift: Union[Tensor, float]) -> Tensor:
    r""":math:`\cos(\mathrm{clip}(\theta + \delta, 0, \pi))` with :math:`\theta = \arccos(\cos)`.

    The clipped angle sum of LEAP Eq. 7-8: ``shift`` is the cloud angle :math:`\alpha` (plus the
    ArcFace margin :math:`m_a` on the target). Clipping to ``[0, pi]`` keeps ``cos`` monotone in
    the angle, so noise or margin never *raise* a logit by wrapping around ``pi``.
    """
    theta = safe_acos(cos)
    return torch.cos((theta + shift).clamp(0.0, math.pi))


def _cloud_cosine_(
    c: Tensor, half: Tensor, out_f: Tensor, work: Tensor, out_d: Tensor, sqrt_floor: float
) -> Tuple[Tensor, Tensor]:
    """In-place kernel of :func:`cloud_cosine` from the half angle ``half = alpha / 2``.

    Destroys ``c`` and ``half``; ``f`` is written to ``out_f`` and the derivative to ``out_d``
    (flushed to 0 where ``sin(theta + alpha) <= 1e-12``: no subnormal products downstream);
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
    sin_floor = _SIN_FLOOR[torch.float64 if c.dtype == torch.float64 else torch.float32]
    d = torch.nn.functional.threshold_(sn, sin_floor, 0.0).div_(t.clamp_min_(sqrt_floor))  # type: ignore[attr-defined]
    return f, d


def cloud_cosine(
    c: Tensor, alpha: Tensor, sqrt_floor: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
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
    return _cloud_cosine_(
        c, half, torch.empty_like(c), torch.empty_like(c), torch.empty_like(c), sqrt_floor
    )
