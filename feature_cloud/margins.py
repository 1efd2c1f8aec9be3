"""Margins as small plug-ins of one margin-softmax pipeline, in one registry.

A margin changes only the **target** logit of each sample (LEAP Eq. 1-2 without, Eq. 7-8 with
the feature cloud); every other logit is :math:`s\\cos(\\theta + \\alpha)` whatever the margin.
A :class:`Margin` therefore supplies

* :meth:`Margin.target`: the target's modified cosine from the cosine :math:`\\cos\\theta_y` and
  the cloud angle :math:`\\alpha_y` (``None`` without cloud), differentiable by autograd (the
  reference path, :func:`feature_cloud.functional.margin_logits`);
* :meth:`Margin.fused_target`: the same value **and** its derivative w.r.t. :math:`\\cos\\theta_y`
  (the fused paths, :mod:`feature_cloud.fused`). A margin that returns ``NotImplemented`` there
  (the default) still works: :attr:`Margin.has_fused` is false and the heads fall back to the
  reference path;
* defaults (``scale``, ``margin``), PML's defaults and unit (:meth:`Margin.from_pml`: degrees
  for the angular margins) and the weight layout (:attr:`Margin.sub_centers` rows per class).

Adding a margin is one subclass and one :func:`register` call; ``functional``, ``fused``, the
heads and the adapters look it up by name (:func:`get`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

from ._validation import warn_user
from .angles import cloud_cosine, shifted_cosine

if TYPE_CHECKING:
    from types import NotImplementedType
else:  # types.NotImplementedType is Python 3.10+: typing.get_type_hints resolves this on 3.9
    NotImplementedType = type(NotImplemented)

__all__ = [
    "Margin",
    "CosFace",
    "ArcFace",
    "SubCenterArcFace",
    "register",
    "unregister",
    "check",
    "get",
    "names",
    "check_unit",
    "check_scale",
    "trainable_scale",
    "Defaults",
]


def _defined_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO whose body defines ``name``."""
    return next(k for k in cls.__mro__ if name in vars(k))


def _fused_for(cls: type) -> bool:
    """:attr:`Margin.has_fused` of a margin class, at its creation (``Margin.__init_subclass__``:
    never inside a forward, where ``vars`` and a dict lookup broke older torch's graph capture)."""
    fused = _defined_in(cls, "fused_target")
    own = issubclass(fused, _defined_in(cls, "target"))
    return own and vars(fused)["fused_target"] is not Margin.fused_target


class Margin:
    """Base class: a named margin with its defaults; subclasses implement :meth:`target`."""

    #: registry name (``margin_type`` everywhere)
    name: str = ""
    #: defaults of :class:`~feature_cloud.LEAPMarginHead` (LEAP Sec. 4.1, re-ID)
    default_scale: float = 24.0
    default_margin: float = 0.2
    #: pytorch-metric-learning's defaults (in PML's unit, see :meth:`from_pml`)
    pml_scale: float = 64.0
    pml_margin: float = 0.35
    #: whether PML gives this margin in degrees (converted to radians by :meth:`from_pml`)
    pml_degrees: bool = False
    #: class-weight rows per class (weight layout ``(sub_centers * C, D)``, class-major)
    sub_centers: int = 1
    #: :attr:`has_fused` of the class, set when the class is created (``__init_subclass__``):
    #: a plain attribute, so a graph capture (``torch.compile(fullgraph=True)``) reads a constant
    _has_fused: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._has_fused = _fused_for(cls)

    def target(self, cos_y: Tensor, alpha_y: Optional[Tensor], margin: float) -> Tensor:
        """Modified cosine of the target (before the scale ``s``); autograd-differentiable."""
        raise NotImplementedError

    def fused_target(
        self, c_y: Tensor, alpha_y: Optional[Tensor], margin: float
    ) -> Union[Tuple[Tensor, Tensor], NotImplementedType]:
        """``(value, d value / d c_y)`` for the fused paths (plain tensors, no autograd), or
        ``NotImplemented`` when only :meth:`target` exists (the heads then use the reference
        path). ``c_y`` is clamped to ``[-1, 1]``."""
        return NotImplemented

    @property
    def has_fused(self) -> bool:
        """Whether :meth:`fused_target` is implemented for this margin's :meth:`target` (the
        fused paths can run it): a subclass that overrides :meth:`target` and inherits its
        parent's :meth:`fused_target` has none (that one computes the parent's margin). Fixed
        when the class is created."""
        return type(self)._has_fused

    def from_pml(self, margin: float) -> float:
        """PML's margin value in this package's unit (radians for angular margins)."""
        return math.radians(margin) if self.pml_degrees else float(margin)

    def __repr__(self) -> str:
        """The class, its name and the instance's own settings (a subclass's parameters)."""
        own = "".join(f", {k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}(name={self.name!r}{own})"


class CosFace(Margin):
    r"""Cosine margin: :math:`\cos(\theta_y + \alpha_y) - m_c` (LEAP Eq. 1, 7)."""

    name = "cosface"
    default_scale, default_margin = 24.0, 0.2
    pml_scale, pml_margin, pml_degrees = 64.0, 0.35, False

    def target(self, cos_y: Tensor, alpha_y: Optional[Tensor], margin: float) -> Tensor:
        base = cos_y if alpha_y is None else shifted_cosine(cos_y, alpha_y)
        return base - margin

    def fused_target(
        self, c_y: Tensor, alpha_y: Optional[Tensor], margin: float
    ) -> Tuple[Tensor, Tensor]:
        if alpha_y is None:
            return c_y - margin, torch.ones_like(c_y)
        f, d = cloud_cosine(c_y, alpha_y)
        return f - margin, d


class ArcFace(Margin):
    r"""Additive angular margin: :math:`\cos(\mathrm{clip}(\theta_y + \alpha_y + m_a, 0, \pi))`
    (LEAP Eq. 2, 8; the clip keeps the logit monotone, see :func:`~feature_cloud.functional.shifted_cosine`)."""

    name = "arcface"
    default_scale, default_margin = 16.0, 0.2
    pml_scale, pml_margin, pml_degrees = 64.0, 28.6, True

    def target(self, cos_y: Tensor, alpha_y: Optional[Tensor], margin: float) -> Tensor:
        return shifted_cosine(cos_y, margin if alpha_y is None else alpha_y + margin)

    def fused_target(
        self, c_y: Tensor, alpha_y: Optional[Tensor], margin: float
    ) -> Tuple[Tensor, Tensor]:
        shift = torch.full_like(c_y, margin) if alpha_y is None else alpha_y + margin
        return cloud_cosine(c_y, shift)  # clamps the angle below pi


class SubCenterArcFace(ArcFace):
    r"""Sub-center ArcFace (Deng et al., ECCV 2020): ``K`` weight rows per class and
    :math:`\cos\theta_{nj} = \max_k \cos(x_n, w_{jk})` (PML's ``SubCenterArcFaceLoss``: rows
    ``j K .. j K + K - 1`` of the ``(K C, D)`` weight, i.e. PML's ``W`` columns), then ArcFace.
    The layout is read by :func:`feature_cloud.functional.cosine_logits` (``sub_centers``)."""

    name = "subcenter_arcface"
    sub_centers = 3


def check(margin: Margin, margin_value: Optional[float] = None) -> None:
    """Check a margin's :meth:`~Margin.target` and :meth:`~Margin.fused_target` against each
    other on a grid of float64 cosines, with and without cloud angles, at ``margin_value``
    (default: the margin's ``default_margin``): ``target`` implemented and shaped like its
    input; where the margin has a fused path (:attr:`~Margin.has_fused`), ``fused_target`` a
    ``(value, derivative)`` pair of tensors shaped like ``c_y`` (a list too), its value
    equal to ``target``'s and its derivative to autograd's of ``target`` (to 1e-6, relative
    and absolute). ``TypeError`` / ``ValueError`` naming the margin and the first disagreement
    otherwise. :func:`register` runs it; the heads run it once for a margin passed as an
    instance (a mark in the instance: copies and pickles keep it).

    The grid keeps away from ``cos = +-1`` and from ``theta + alpha + m`` near ``0`` or ``pi``
    (where the built-in margins clip); a margin with a kink elsewhere can be registered with
    ``register(..., check=False)``. Runs on the CPU with autograd on, whatever the caller's
    context (``torch.no_grad()``, ``inference_mode``, a ``torch.device("meta")`` block)."""
    with torch.inference_mode(False), torch.enable_grad(), torch.device("cpu"):
        _check_on_cpu(margin, margin_value)


def _check_on_cpu(margin: Margin, margin_value: Optional[float]) -> None:
    """:func:`check`'s body, in a context with autograd on and CPU tensors."""
    who = f"margin {type(margin).__name__}(name={margin.name!r})"
    m = float(margin.default_margin if margin_value is None else margin_value)
    cos = torch.linspace(-0.6, 0.9, 13, dtype=torch.float64)
    for alpha in (None, torch.linspace(-0.05, 0.05, 13, dtype=torch.float64)):
        c = cos.clone().requires_grad_(True)
        try:
            value = margin.target(c, alpha, m)
        except NotImplementedError:
            raise TypeError(f"{who} does not implement target(cos_y, alpha_y, margin)") from None
        if not isinstance(value, Tensor) or value.shape != c.shape:
            raise ValueError(
                f"{who}: target must return a tensor shaped like cos_y {tuple(c.shape)}, "
                f"got {type(value).__name__} {tuple(getattr(value, 'shape', ()))}"
            )
        if not value.requires_grad:
            raise ValueError(f"{who}: target's value does not depend on cos_y (no gradient)")
        (derivative,) = torch.autograd.grad(value.sum(), c)
        if not margin.has_fused:
            continue
        pair = margin.fused_target(cos.clone(), alpha, m)
        if isinstance(pair, list):  # any pair unpacks in the kernels
            pair = tuple(pair)
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not all(isinstance(t, Tensor) and t.shape == cos.shape for t in pair)
        ):
            raise ValueError(
                f"{who}: fused_target must return a pair (value, d value / d cos_y) of tensors "
                f"shaped like c_y {tuple(cos.shape)}, got {_describe(pair)}"
            )
        cloud = "without" if alpha is None else "with"
        for what, ours, ref in (
            ("value", pair[0].detach().double(), value.detach()),
            ("derivative", pair[1].detach().double(), derivative),
        ):
            bad = ~torch.isclose(ours, ref, rtol=1e-6, atol=1e-6)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"{who}: fused_target's {what} disagrees with target's "
                    f"{'autograd derivative' if what == 'derivative' else 'value'} {cloud} cloud "
                    f"angles at cos_y={float(cos[i]):.3f}, margin={m}: {float(ours[i]):.6g} vs "
                    f"{float(ref[i]):.6g} (the fused paths would train another loss)"
                )


def _describe(value: object) -> str:
    """A short description of what a ``fused_target`` returned."""
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}: " + ", ".join(
            f"{type(v).__name__} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            for v in value
        )
    return f"{type(value).__name__} {tuple(getattr(value, 'shape', ()))}"


_REGISTRY: Dict[str, Margin] = {}


def _mark_checked(margin: Margin) -> None:
    """Mark an instance :func:`check` has passed (in its own ``__dict__``: copies and pickles
    keep the mark; margins need not be hashable)."""
    vars(margin)["_checked"] = True


def register(margin: Margin, *, replace: bool = False, check: bool = True) -> Margin:
    """Add ``margin`` under ``margin.name``; returns it. ``replace=True`` overrides an entry;
    the margin is checked first (:func:`check`; ``check=False`` skips it)."""
    if not isinstance(margin, Margin) or not margin.name:
        raise TypeError(f"register expects a named Margin instance, got {margin!r}")
    if margin.name in _REGISTRY and not replace:
        raise ValueError(f"a margin named {margin.name!r} is already registered")
    if check:
        _check(margin)
    _mark_checked(margin)
    _REGISTRY[margin.name] = margin
    return margin


def unregister(name: str) -> None:
    """Remove a registered margin (tests, plug-in teardown)."""
    _REGISTRY.pop(name, None)


def names() -> Tuple[str, ...]:
    """Registered margin names, in registration order."""
    return tuple(_REGISTRY)


def get(margin_type: Union[str, Margin]) -> Margin:
    """The registered :class:`Margin` named ``margin_type``; a ``Margin`` instance is returned
    as is, once checked (:func:`check`, the first time it is seen)."""
    if isinstance(margin_type, Margin):
        if not getattr(margin_type, "_checked", False):  # (no vars: torch 2.2-2.6 dynamo)
            _check(margin_type)
            _mark_checked(margin_type)
        return margin_type
    try:
        return _REGISTRY[margin_type]
    except (KeyError, TypeError):
        raise ValueError(f"margin_type must be one of {names()}, got {margin_type!r}") from None


class Defaults(Mapping[str, float]):
    """A read-only view ``{margin name: its attribute}`` over the registry, read when looked up:
    a margin registered later is in it (the heads' ``DEFAULT_SCALE``, PML's defaults)."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __getitem__(self, name: str) -> float:
        if name not in _REGISTRY:
            raise KeyError(name)
        return float(getattr(_REGISTRY[name], self.attribute))

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return repr(dict(self))


def check_unit(margin_type: Union[str, Margin], margin: float, unit: str = "radians") -> None:
    """Warn when an angular margin (ArcFace, sub-center ArcFace) looks like the other unit.

    ``unit="radians"`` (the heads, fastreid): a margin above ``pi / 2`` is almost certainly in
    degrees. ``unit="degrees"`` (the PML adapter, as PML's ``ArcFaceLoss``): a non-zero margin
    below 1 is almost certainly in radians. CosFace's cosine margin has no unit: one of 1 or more
    puts every target logit ``s (cos theta - m)`` at or below 0, where no non-target logit can
    fall below ``-s`` (the papers use 0.2-0.35): it warns too.
    """
    if unit not in ("radians", "degrees"):
        raise ValueError(f"unit must be 'radians' or 'degrees', got {unit!r}")
    rule = get(margin_type)
    if isinstance(rule, CosFace) and float(margin) >= 1.0:
        default = rule.pml_margin if unit == "degrees" else rule.default_margin  # PML's: 0.35
        warn_user(
            f"{rule.name} margin={float(margin)} is a cosine margin (no unit): at 1 or more "
            "every target logit s (cos theta - m) is at or below 0; CosFace margins are "
            f"0.1-0.5 (default {default})"
        )
        return
    if not rule.pml_degrees:  # not an angular margin
        return
    m = float(margin)
    if unit == "radians" and abs(m) > math.pi / 2:
        warn_user(
            f"{rule.name} margin={m} is in radians here ({math.degrees(m):.0f} degrees); a margin "
            f"above pi/2 looks like degrees: did you mean margin={math.radians(m):.3f}?"
        )
    elif unit == "degrees" and 0.0 < abs(m) < 1.0:
        warn_user(
            f"{rule.name} margin={m} is in degrees here (PML's convention, default "
            f"{rule.pml_margin}); a margin below 1 looks like radians: did you mean "
            f"margin={math.degrees(m):.1f}?"
        )


#: the target probability below which :func:`check_scale` warns (the loss floor above log 2)
_MIN_TARGET_PROBABILITY = 0.5


def trainable_scale(num_classes: int) -> float:
    r"""The smallest logit scale ``s`` at which a cosine softmax over ``C = num_classes`` classes
    can give a sample's target class a probability of 1/2 (a loss of ``log 2``): the best case
    puts the features on their class weights and the weights as far apart as they can be, a
    regular simplex (cosine :math:`-1/(C-1)` between classes; NormFace, Wang et al. 2017), where
    the target probability is at most :math:`p(s) = 1 / (1 + (C-1) e^{-s C/(C-1)})`. Solving
    :math:`p(s) = 1/2`: :math:`s = \frac{C-1}{C}\log(C-1)` (0 for ``C <= 2``). A margin only
    raises it. CosFace / ArcFace use 16-64."""
    c = int(num_classes)
    return 0.0 if c <= 2 else (c - 1) / c * math.log(c - 1)


def check_scale(
    margin_type: Union[str, Margin],
    scale: float,
    num_classes: Optional[int],
    margin: Optional[float] = None,
) -> bool:
    """Warn when a cosine-softmax ``scale`` is below :func:`trainable_scale` of ``num_classes``:
    the loss cannot train there (not even a perfectly separated sample reaches a target
    probability of 1/2). With the head's ``margin`` given and looking like a scale (``>= 4``)
    while the scale looks like a margin, the warning says the two are swapped (PML's
    ``LEAPLoss(num_classes, embedding_size, margin, scale)`` order ported to
    ``LEAPMarginHead(embedding_size, num_classes, margin_type, scale, margin)``) instead of
    suggesting another margin for the broken scale. Returns whether it said they look swapped
    (the margin's unit is then not the problem; a scale too small alone leaves the margin's own
    checks to run)."""
    if num_classes is None:
        return False
    rule, s, c = get(margin_type), float(scale), int(num_classes)
    floor = trainable_scale(c)
    if s >= floor:
        return False
    best = 1.0 / (1.0 + (c - 1) * math.exp(-s * c / (c - 1)))
    why = (
        f"scale={s} is too small to train a softmax over {c} classes: even with every sample on "
        f"its class weight and the weights as far apart as they can be (NormFace's bound), the "
        f"target's probability stays below {best:.2g}, the loss above {-math.log(best):.2f} "
        f"nats (chance: log C = {math.log(c):.2f}). Use scale >= {floor:.1f} (16-64 are usual; "
        f"{rule.name}'s default {rule.default_scale}"
    )
    if margin is not None and float(margin) >= 4.0 and s < math.pi / 2:
        warn_user(
            f"{why}). scale and margin look swapped (scale={s}, margin={float(margin)}): the "
            "head's order is (embedding_size, num_classes, margin_type, scale, margin), PML's "
            f"LEAPLoss's (num_classes, embedding_size, margin, scale); did you mean "
            f"scale={float(margin)}, margin={s}? Pass them by keyword."
        )
        return True
    warn_user(f"{why}).")
    return False


_check = check  # register's keyword of the same name hides the function there

for _m in (CosFace(), ArcFace(), SubCenterArcFace()):
    register(_m)
del _m
