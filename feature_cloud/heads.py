"""``LEAPMarginHead``: a CosFace/ArcFace classifier head with the LEAP feature cloud."""

from __future__ import annotations

import difflib
import inspect
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    List,
    Literal,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
    overload,
)

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm
from typing_extensions import Unpack  # torch's dependency (typing.Unpack: Python 3.11+)

from . import functional as FC
from . import fused, margins
from ._compat import at_trace_time, disable_compile, is_compiling
from ._validation import (
    as_bool,
    as_float,
    as_int,
    check_embeddings,
    check_reduction,
    checked_attribute,
    fixed_setting,
    migrate_checked,
    refuse_bad_weights,
    refuse_other_shape,
    warn_user,
)
from .cloud import (
    CloudOptions,
    FeatureCloud,
    WithFeatureCloud,
    WithStatisticsGroup,
    check_cloud_fits,
    migrate_state_dict,
    migrated_for_checking,
)
from .noise import capturing

__all__ = [
    "LEAPMarginHead",
    "HeadOptions",
    "DEFAULT_SCALE",
    "DEFAULT_MARGIN",
    "IMPLS",
    "check_impl",
    "backend_for",
    "resolve_margin",
    "make_cloud",
    "cloud_margin_logits",
    "cloud_margin_loss",
    "fused_cloud",
    "in_draw_order",
]

#: Loss implementations of :meth:`LEAPMarginHead.forward` (all compute the same loss).
IMPLS = ("auto", "reference", "fused", "chunked")

#: (impl, margin has a fused path, chunk_size given) -> backend that forward runs.
_BACKENDS = {
    (impl, fusable, chunk): (
        "reference"
        if impl == "reference" or not fusable
        else "chunked"
        if impl == "chunked" or (impl == "auto" and chunk)
        else "fused"
    )
    for impl in IMPLS
    for fusable in (False, True)
    for chunk in (False, True)
}

#: Defaults of the built-in margins (paper re-ID setting, LEAP Sec. 4.1: CosFace s=24, m=0.2;
#: ArcFace s=16, m=0.2 rad): live views of the registry (:mod:`feature_cloud.margins`), a margin
#: registered later included.
DEFAULT_SCALE = margins.Defaults("default_scale")
DEFAULT_MARGIN = margins.Defaults("default_margin")


def resolve_margin(
    margin_type: Union[str, margins.Margin],
    scale: Optional[float],
    margin: Optional[float],
    num_classes: Optional[int] = None,
) -> Tuple[margins.Margin, float, float]:
    """The checked margin rule, scale and margin (radians for angular margins) of a head, with
    the registry's defaults filled in; an angular margin that looks like degrees warns, and so
    does a scale too small to train over ``num_classes`` classes
    (:func:`~feature_cloud.margins.check_scale`: a scale and margin that look swapped are said
    to be, rather than the margin's unit)."""
    rule = margins.get(margin_type)
    scale = (
        rule.default_scale
        if scale is None
        else as_float(scale, "scale", minimum=0.0, min_inclusive=False)
    )
    margin = rule.default_margin if margin is None else as_float(margin, "margin")
    if not margins.check_scale(rule, scale, num_classes, margin):
        margins.check_unit(rule, margin, "radians")
    return rule, float(scale), float(margin)


def _check_scale(owner: Any, value: Any) -> float:
    scale = as_float(value, "scale", minimum=0.0, min_inclusive=False)
    margins.check_scale(owner.margin_rule, scale, getattr(owner, "num_classes", None))
    return scale


def _check_margin(owner: Any, value: Any) -> float:
    margin = as_float(value, "margin")
    margins.check_unit(owner.margin_rule, margin, "radians")
    return margin


class HeadOptions(CloudOptions, total=False):
    """The keywords of :class:`LEAPMarginHead` but its sizes: the margin, the loss's settings
    and every cloud option (:class:`~feature_cloud.cloud.CloudOptions`). Types the ``**``
    keywords that the timm adapter passes on to the head (``LEAPTask.from_timm(name, C,
    scale=..., class_counts=...)``)."""

    margin_type: Union[str, margins.Margin]
    scale: Optional[float]
    margin: Optional[float]
    cloud: Union[None, str, FeatureCloud]
    reduction: str
    validate: bool
    impl: str
    chunk_size: Optional[int]
    sub_centers: Optional[int]


class MarginSettings:
    """``scale`` and ``margin`` of a margin head, checked on every assignment as the
    constructor checks them (a margin schedule's ``head.margin = m``); ``margin_type`` is the
    rule's name, fixed at construction (an assignment used to change the repr, not the loss)."""

    margin_rule: margins.Margin = fixed_setting(
        "margin_rule",
        "the margin rule sets the weight layout and defaults",
        how="build a {holder} with that margin_type and load this one's weight into it",
    )
    scale = checked_attribute("scale", _check_scale, "``s`` of the logits; settable, checked.")
    margin = checked_attribute(
        "margin", _check_margin, "The margin (radians for angular ones); settable, checked."
    )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases held them as plain attributes."""
        state = migrate_checked(state, ("scale", "margin", "margin_rule"))
        super().__setstate__(state)  # type: ignore[misc]

    def margin_settings(self) -> Tuple[Tuple[str, Any], ...]:
        """The loss's settings that every rank of a synchronised head must share (compared
        with the cloud's at the training step's batch agreement)."""
        return (
            ("margin_type", self.margin_rule.name),
            ("scale", self.scale),
            ("margin", self.margin),
            ("sub_centers", getattr(self, "sub_centers", 1)),
        )

    @property
    def margin_type(self) -> str:
        """The margin rule's registered name."""
        return self.margin_rule.name

    @margin_type.setter
    def margin_type(self, value: Any) -> None:
        raise AttributeError(
            f"margin_type is fixed at construction ({self.margin_rule.name!r}; the margin rule "
            f"sets the weight layout and defaults): build a head with margin_type={value!r} "
            "and load this one's weight into it"
        )


def _check_impl(owner: Any, value: Any) -> str:
    _checked_chunking(value, getattr(owner, "chunk_size", None))
    return str(value)


def _check_chunk_size(owner: Any, value: Any) -> Optional[int]:
    return _checked_chunking(getattr(owner, "impl", "auto"), value)


class ImplSettings:
    """``impl`` and ``chunk_size`` of a head with a fused loss, checked on every assignment
    (a bad one raised in the next step, after the statistics had moved), and its weight layout
    ``sub_centers``, fixed (``head.sub_centers = 3`` was taken, and the next step failed after
    the statistics had moved)."""

    impl = checked_attribute("impl", _check_impl, "The loss implementation; settable, checked.")
    chunk_size = checked_attribute(
        "chunk_size", _check_chunk_size, "Classes per chunk of ``impl='chunked'``; settable."
    )
    sub_centers: int = fixed_setting(
        "sub_centers",
        "it sizes the class weight, num_classes * sub_centers rows",
        how="build a new {holder} with sub_centers={value!r} (a state_dict of another layout "
        "does not load into it)",
    )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases held them as plain attributes (or, before
        ``impl``, not at all: the default backend)."""
        state = migrate_checked(
            state, ("impl", "chunk_size", "sub_centers"), {"_impl": "auto", "_chunk_size": None}
        )
        super().__setstate__(state)  # type: ignore[misc]


def _fusable(rule: margins.Margin, sub_centers: int) -> bool:
    """Whether the fused kernels can run ``rule``: a fused derivative, one weight row per class
    (a graph capture runs the reference path besides: the compiler fuses it)."""
    return rule.has_fused and sub_centers == 1


def _checked_chunking(impl: str, chunk_size: Optional[int]) -> Optional[int]:
    """``impl`` one of :data:`IMPLS` and ``chunk_size`` a positive integer (needed by
    ``"chunked"``); returns ``chunk_size`` as an int (or ``None``)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_size is not None:
        chunk_size = as_int(chunk_size, "chunk_size", 1)
    if impl == "chunked" and chunk_size is None:
        raise ValueError("impl='chunked' needs chunk_size (classes per chunk)")
    return chunk_size


def check_impl(
    impl: str, chunk_size: Optional[int], rule: margins.Margin, sub_centers: int
) -> Optional[int]:
    """Check a loss implementation choice (:data:`IMPLS`; ``"chunked"`` needs ``chunk_size``,
    classes per chunk) and return the checked ``chunk_size``; an ``impl="fused"`` /
    ``"chunked"`` that cannot run (no ``fused_target``, sub-centers) warns that the reference
    path runs instead."""
    chunk_size = _checked_chunking(impl, chunk_size)
    if impl in ("fused", "chunked") and not _fusable(rule, sub_centers):
        why = (
            f"sub_centers={sub_centers}"
            if rule.has_fused
            else f"margin {rule.name!r} has no fused_target"
        )
        warn_user(
            f"impl={impl!r} runs the reference path here ({why}: the fused kernels need a "
            "margin's fused_target and one weight row per class), which holds the B x C "
            "logits"
        )
    return chunk_size


def backend_for(
    impl: str, rule: margins.Margin, sub_centers: int, chunk_size: Optional[int]
) -> str:
    """The loss backend that ``impl`` runs (``"reference"``, ``"fused"`` or ``"chunked"``), from
    the table of :data:`IMPLS` against the margin, the weight layout and ``chunk_size`` (and
    ``"reference"`` while a graph is captured: the compiler fuses it)."""
    fusable = _fusable(rule, sub_centers) and not capturing()
    return _BACKENDS[(impl, fusable, chunk_size is not None)]


def _warn_compiled_impl(impl: str) -> None:
    """Warn that ``impl`` (``"fused"`` / ``"chunked"``, asked for by name) runs the reference
    path under ``torch.compile``: once per compiled graph, at trace time (no graph break)."""
    chunked = ", so chunk_size saves no memory" if impl == "chunked" else ""
    warn_user(
        f"impl={impl!r} runs the reference path under torch.compile (the compiler fuses that "
        f"graph), which holds the B x C logits{chunked}; with very many classes compile the "
        "backbone only and keep the head eager"
    )


def _warn_compiled_impl_now(ctx: Any) -> None:
    """:func:`_warn_compiled_impl` of the ``impl`` of :func:`_margin_loss`, traced by dynamo
    (a torch whose ``comptime`` context reads no caller's locals: the warning without it)."""
    try:
        impl = ctx.get_local("impl", stacklevel=1).as_python_constant()
    except Exception:  # private dynamo API: a warning must never fail the compile
        impl = "fused' or 'chunked"
    _warn_compiled_impl(str(impl))


def in_draw_order(
    cloud: FeatureCloud,
    embeddings: Tensor,
    labels: Tensor,
    draw: Tuple[Optional[Tensor], Optional[Tensor]],
) -> Tuple[Tensor, Tensor, Tuple[Optional[Tensor], Optional[Tensor]], Optional[Tensor]]:
    """The batch and its cloud ``draw`` with rows in the order the cloud is drawn in
    (:meth:`FeatureCloud.draw_order`: a gathered batch in rank order), and the index that puts
    per-sample results back in the batch's rows (``None``: the batch's own order)."""
    order = cloud.draw_order(embeddings, draw[0])
    if order is None:
        return embeddings, labels, draw, None
    draw = (cast(Tensor, draw[0])[order], draw[1])
    return embeddings[order], labels[order], draw, torch.argsort(order)


def _shard_rank(rank: Any) -> Any:
    """A shard checkpoint's ``shard_rank`` as an int (``?`` where it holds none)."""
    return "?" if rank is None else int(rank)


def _listed(sizes: Any) -> Any:
    """A shard checkpoint's ``shard_sizes`` as a list (``?`` where it holds none)."""
    if sizes is None:
        return "?"
    return sizes.tolist() if isinstance(sizes, Tensor) else list(sizes)


def _rows_layout(state_dict: Mapping[str, Any], prefix: str, rows: int) -> str:
    """`` (num_classes=C x sub_centers=K)`` of a checkpoint's weight, read from its statistics'
    class count (empty where it holds none)."""
    counts = state_dict.get(prefix + "feature_cloud.statistics.class_counts")
    classes = counts.numel() if isinstance(counts, Tensor) else 0
    if not classes or rows % classes:
        return ""
    return f" (num_classes={classes} x sub_centers={rows // classes})"


def _check_cloud_options(options: Mapping[str, Any], owner: Tuple[str, Sequence[str]]) -> None:
    """A keyword that is no cloud option (a typo) is named, with the nearest one among the
    cloud's options and ``owner``'s own keywords (``(what, names)``, e.g. PML's base classes')."""
    known = [
        p
        for p in inspect.signature(FeatureCloud.__init__).parameters
        if p not in ("self", "num_classes", "embedding_size", "rule")
    ]
    what, others = owner
    for key in options:
        if key not in known:
            near = {"s": ["scale"], "m": ["margin"]}.get(key) or difflib.get_close_matches(
                key, [*known, *others], n=1
            )
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            also = f"; {what}: {', '.join(others)}" if others else ""
            raise TypeError(
                f"unexpected keyword argument {key!r}{hint}; the feature cloud's options are "
                f"{', '.join(known)}{also}"
            )


def recomputing_hooks(module: nn.Module, name: str = "weight") -> List[str]:
    """The forward pre-hooks that recompute ``module.<name>`` from other tensors before every
    forward (the hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm``,
    ``torch.nn.utils.prune``): their class names. An in-place imprint into the attribute is lost
    at the next forward."""
    return [
        type(h).__name__
        for h in module._forward_pre_hooks.values()
        if (isinstance(h, (WeightNorm, SpectralNorm)) and h.name == name)
        or (isinstance(h, BasePruningMethod) and h._tensor_name == name)
    ]


def hooked_weight(module: nn.Module, name: str = "weight") -> Tensor:
    """``module.<name>`` as its ``forward`` sees it: the hook-based reparametrisations
    (``torch.nn.utils.weight_norm`` / ``spectral_norm``, ``torch.nn.utils.prune``) recompute the
    attribute in a forward pre-hook, so outside ``forward`` (eval scoring, ``as_linear``) it is
    the one computed at the last forward, before the optimiser's last step, or, after a load,
    the fresh module's. Recomputed here as the hook would in eval mode (no power iteration);
    the plain weight and torch's ``parametrizations`` (recomputed on access) as they are."""
    weight = getattr(module, name)
    if not module._forward_pre_hooks:  # the plain path: one dict check
        return cast(Tensor, weight)
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return hook.compute_weight(module, do_power_iteration=False)
        if isinstance(hook, BasePruningMethod) and hook._tensor_name == name:
            return cast(Tensor, hook.apply_mask(module))  # type: ignore[no-untyped-call]
    return cast(Tensor, weight)


def recomputed_weight(module: nn.Module, cloud: FeatureCloud) -> bool:
    """Whether an imprint that may still be ahead would go into a ``module.weight`` recomputed
    from other tensors (a parametrization, the hook-based ``weight_norm`` / ``spectral_norm``,
    ``torch.nn.utils.prune``): Python state only, read while compiling too (where the imprint
    writes in place into the tensor it is given, and would be lost)."""
    if cloud.imprint_step is None or cloud.rule is None or cloud.imprint_behind:
        return False
    return bool(recomputing_hooks(module)) or parametrize.is_parametrized(module, "weight")


def imprint_through_parametrization(module: nn.Module, cloud: FeatureCloud) -> bool:
    """Whether an imprint still ahead (``imprint_step``) has to reach a parametrized
    ``module.weight`` through its ``right_inverse``; refuses, before any state changes, a weight
    that the hook-based ``weight_norm`` / ``spectral_norm`` or ``torch.nn.utils.prune``
    recomputes, a parametrization without a ``right_inverse``, and ``parametrize.cached()`` (its
    cached weight is in the graph the imprint would modify in place). A plain weight: Python
    state only; a recomputed one: the host copy of the step (:meth:`FeatureCloud.imprint_ahead`);
    compiled, only a plain weight or one whose imprint is behind gets here
    (:func:`recomputed_weight`)."""
    recomputed = recomputing_hooks(module)
    parametrized = parametrize.is_parametrized(module, "weight")
    if not (recomputed or parametrized) or not cloud.imprint_ahead():
        return False
    if recomputed:
        raise ValueError(
            f"imprint_step={cloud.imprint_step}: the head's weight is recomputed before "
            f"every forward by the hook-based {recomputed[0]} (torch.nn.utils.weight_norm / "
            "spectral_norm, or torch.nn.utils.prune: weight_orig * weight_mask), which "
            "would discard the imprint; use torch.nn.utils.parametrizations.weight_norm / "
            "spectral_norm (their right_inverse keeps it), prune.remove(head, 'weight') "
            "before the imprint step, or leave imprint_step=None"
        )
    where = f"imprint_step={cloud.imprint_step}: the head's weight is parametrized"
    chain = cast(nn.ModuleDict, module.parametrizations)["weight"].children()
    if not all(hasattr(p, "right_inverse") for p in chain):
        raise ValueError(
            f"{where} without a right_inverse, so the imprinted prototypes could not be "
            "set; give the parametrization a right_inverse or leave imprint_step=None"
        )
    if getattr(parametrize, "_cache_enabled", 0):
        raise RuntimeError(
            f"{where} and cached (parametrize.cached()): the imprint would modify the "
            "cached weight in place; train the imprint step outside the cache"
        )
    return True


def imprint_weight(
    module: nn.Module,
    cloud: FeatureCloud,
    train: bool,
    counted: bool,
    sub_centers: int = 1,
    class_start: int = 0,
    parametrized: Optional[bool] = None,
) -> None:
    """The imprint of a training step into ``module.weight`` (:meth:`FeatureCloud.imprint`;
    its rows are the classes from ``class_start`` on), through a parametrized weight's
    ``right_inverse`` where it has one; a weight that a forward pre-hook recomputes is refused
    (:func:`imprint_through_parametrization`). ``train``: a training step; ``counted``: one that
    the cloud counts (it imprints); ``parametrized``: that check's answer where the caller ran
    it already (the sharded head, before its ranks agree on the batch)."""
    if parametrized is None:
        parametrized = train and imprint_through_parametrization(module, cloud)
    weight = cast(Tensor, module.weight)
    imprinted = cloud.imprint(weight, sub_centers, class_start, train=counted)
    if imprinted and parametrized:
        # the imprint went into the tensor the parametrization computed: set it through
        # its right_inverse (weight_norm keeps it exactly; a projecting right_inverse, e.g.
        # orthogonal's, keeps its nearest weight of that form)
        with torch.no_grad():
            setattr(module, "weight", weight.detach())  # noqa: B010 (a parametrization's setter)


def scoring_weight(
    cloud: FeatureCloud,
    weight: Tensor,
    sub_centers: int = 1,
    class_start: int = 0,
    *,
    inference: bool = False,
) -> Tuple[Tensor, bool]:
    """``(cloud.prototypes(weight, ...), unit)``: the matrix inference logits score against and
    whether its rows are already L2-normalised (the center-shrunk prototypes of
    :func:`~feature_cloud.functional.center_prototypes`), so that ``FC.cosine_logits(...,
    unit_weight=unit)`` does not normalise them a second time. ``unit`` is ``False`` for the
    weight itself and for a cloud subclass with its own ``prototypes``."""
    proto = cloud.prototypes(weight, sub_centers, class_start, inference=inference)
    own = type(cloud).prototypes is FeatureCloud.prototypes
    own = own and type(cloud)._prototypes is FeatureCloud._prototypes
    # from the settings, not ``proto is not weight``: torch 2.2's dynamo (torch.export) refuses
    # an identity test of two tensors
    return proto, own and cloud.blends_prototypes(inference=inference)


def make_cloud(
    cloud: Union[None, str, FeatureCloud],
    num_classes: int,
    embedding_size: int,
    options: Mapping[str, Any],
    *,
    replicated: bool = False,
    owner: Tuple[str, Sequence[str]] = ("", ()),
) -> FeatureCloud:
    """The :class:`FeatureCloud` of a head: ``cloud`` itself, or one built from the rule and the
    cloud options (the one place the heads and adapters turn their arguments into a cloud).
    ``replicated``: the head feeds every rank the same (gathered) batch, so statistics that are
    not synchronised are identical anyway (the sharded head). ``owner``: ``(what, keywords)``
    of the caller's other keywords, offered for a misspelt option."""
    if isinstance(cloud, FeatureCloud):
        if options:
            raise TypeError(f"cloud options {sorted(options)} given with a ready FeatureCloud")
        check_cloud_fits(cloud, num_classes, embedding_size)
    else:
        FC.check_cloud_rule(cloud, name="cloud")  # the heads' keyword (the cloud's is rule)
        _check_cloud_options(options, owner)
        cloud = FeatureCloud(num_classes, embedding_size, cloud, **options)
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if cloud.imprint_step is not None and cloud.sync == "off" and not replicated and world > 1:
        raise ValueError(
            f"imprint_step with sync='off' in a process group of {world} ranks: each rank would "
            "imprint the class weights from its own statistics and the replicas would differ; "
            "use sync='auto' (statistics identical on every rank)"
        )
    return cloud


def cloud_margin_logits(
    cloud: FeatureCloud,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    draw: Tuple[Optional[Tensor], Optional[Tensor]],
    *,
    margin_type: Union[str, margins.Margin],
    scale: float,
    margin: float,
    sub_centers: int = 1,
    class_start: int = 0,
) -> Tensor:
    """Margin logits (LEAP Eq. 1-2, or Eq. 7-8 with the cloud ``draw = (std, key)`` of
    :meth:`FeatureCloud.advance`) of ``embeddings`` against ``weight`` (``sub_centers`` rows per
    class), for the classes ``class_start ..`` of the cloud's ``C``: the reference pipeline of
    every head and adapter."""
    std, key = draw
    columns = weight.shape[0] // sub_centers
    alpha = target_alpha = None
    cos = FC.cosine_logits(*FC.common_float(embeddings, weight), sub_centers)
    if std is not None and cloud.mode == "paper":  # angles in the logits' precision, as the
        std = std.to(torch.promote_types(std.dtype, cos.dtype))  # fused kernel draws them
        alpha = fused.cloud_angles(
            std, columns, key, class_start=class_start, total_classes=cloud.num_classes
        )
    elif std is not None and key is not None:
        target_alpha = FC.target_cloud_angles(std, cloud.mode, noise=cloud.row_noise(key, std))
    return FC.margin_logits(
        cos,
        labels,
        margin_type=margin_type,
        scale=scale,
        margin=margin,
        alpha=alpha,
        target_alpha=target_alpha,
    )


def fused_cloud(
    cloud: FeatureCloud, draw: Tuple[Optional[Tensor], Optional[Tensor]]
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """The cloud of ``draw = (std, key)`` as :func:`feature_cloud.fused.margin_loss` arguments
    ``(noise_std, noise_key, target_angles)``: the paper's per-logit cloud, or a target-only
    cloud (the same draw as :func:`cloud_margin_logits`)."""
    std, key = draw
    if std is None or key is None:
        return None, None, None
    if cloud.mode == "paper":
        return std, key, None
    return None, None, FC.target_cloud_angles(std, cloud.mode, noise=cloud.row_noise(key, std))


def cloud_margin_loss(
    cloud: FeatureCloud,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    draw: Tuple[Optional[Tensor], Optional[Tensor]],
    *,
    margin_type: Union[str, margins.Margin],
    scale: float,
    margin: float,
    sub_centers: int = 1,
    reduction: str = "mean",
    impl: str = "auto",
    chunk_size: Optional[int] = None,
) -> Tensor:
    """The margin softmax loss of :func:`cloud_margin_logits` (same arguments), on the backend
    that ``impl`` runs (:func:`backend_for`, as :class:`LEAPMarginHead`'s ``impl`` /
    ``chunk_size``): by default the fused kernels
    (:func:`feature_cloud.fused.margin_loss`) whenever the margin has a fused derivative, one
    weight row per class and no graph capture (every cloud mode); otherwise the reference
    pipeline. For adapters that hold their own weight (PML's ``W``); ``impl`` and
    ``chunk_size`` are checked here too (no warning: the caller's constructor gives it)."""
    chunk_size = _checked_chunking(impl, chunk_size)
    loss = _margin_loss(
        cloud,
        embeddings,
        weight,
        labels,
        draw,
        margins.get(margin_type),
        scale,
        margin,
        sub_centers,
        reduction,
        impl,
        chunk_size,
    )
    return cast(Tensor, loss)


def _margin_loss(
    cloud: FeatureCloud,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    draw: Tuple[Optional[Tensor], Optional[Tensor]],
    rule: margins.Margin,
    scale: float,
    margin: float,
    sub_centers: int,
    reduction: str,
    impl: str,
    chunk_size: Optional[int],
    label_smoothing: float = 0.0,
    return_top1: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """:func:`cloud_margin_loss` with ``label_smoothing`` and the per-row top-1 flags
    (``return_top1``, :meth:`LEAPMarginHead.forward`'s): the one dispatch over the backends."""
    backend = backend_for(impl, rule, sub_centers, chunk_size)
    if impl in ("fused", "chunked") and is_compiling() and _fusable(rule, sub_centers):
        at_trace_time(_warn_compiled_impl_now)  # (not fusable: the constructor warned)
    if backend != "reference":
        noise_std, noise_key, target_angles = fused_cloud(cloud, draw)
        x, w = FC.common_float(embeddings, weight)
        return fused.margin_loss(
            x,
            w,
            labels,
            margin_type=rule,
            scale=scale,
            margin=margin,
            noise_std=noise_std,
            noise_key=noise_key,
            target_angles=target_angles,
            reduction=reduction,
            chunk_size=chunk_size if backend == "chunked" else None,
            label_smoothing=label_smoothing,
            return_top1=return_top1,
            sub_centers=sub_centers,
            validate=False,
        )
    logits = cloud_margin_logits(
        cloud,
        embeddings,
        weight,
        labels,
        draw,
        margin_type=rule,
        scale=scale,
        margin=margin,
        sub_centers=sub_centers,
    )
    loss = FC.margin_cross_entropy(logits, labels, reduction, label_smoothing)
    if not return_top1:
        return loss
    with torch.no_grad():
        cos = FC.cosine_logits(*FC.common_float(embeddings, weight), sub_centers)
        top1 = (labels >= 0) & (cos.gather(1, labels.clamp_min(0)[:, None])[:, 0] >= cos.amax(1))
    return loss, top1


class LEAPMarginHead(
    WithFeatureCloud, WithStatisticsGroup, MarginSettings, ImplSettings, nn.Module
):
    r"""Margin softmax head with a learnable feature cloud for tail classes (LEAP Eq. 7-8).

    Holds the class weights ``weight`` ``(C, D)`` and a :class:`~feature_cloud.cloud.FeatureCloud`
    (class statistics, step, warm-up, noise stream). In a training
    step (module in train mode, gradients enabled) it

    1. folds the detached batch into the class centers and angle memory (LEAP Eq. 3-5),
    2. after ``warmup_steps`` steps, draws the cloud from the cloud variance :math:`v` of the
       sample's class (Eq. 6 vanilla or Eq. 9 full rule; 0 for classes without cloud), scaled
       by ``cloud_scale``: by default (``cloud_mode="margin"``) one angle per sample,
       :math:`|\alpha_n|` with :math:`\alpha_n \sim N(0, v_{y_n})`, added to its target angle;
       with ``cloud_mode="paper"`` the paper's per-logit angles
       :math:`\alpha_n \sim N(0, v_{y_n})^{C}`,
    3. returns the cross-entropy of the CosFace (Eq. 7) / ArcFace (Eq. 8) logits.

    Paper-exact LEAP: ``LEAPMarginHead(D, C, **feature_cloud.PAPER_LEAP)``
    (:data:`~feature_cloud.cloud.PAPER_LEAP`: ``cloud_mode="paper", cloud_scale=1.0,
    prototype_shrinkage=None, center_rate="paper", unknown_variance="pooled"``, with
    ``angle_max_age`` and ``imprint_step`` off; the defaults differ for real-data reasons:
    README, "Real faces"). The training loss always uses
    ``weight``; :meth:`logits` in eval mode (inference) scores against the weights shrunk towards
    the class centers (``prototype_shrinkage``), in train mode against the weights.

    With ``cloud=None``, during warm-up, in eval mode or under ``torch.no_grad()`` the loss is
    plain CosFace / ArcFace (LEAP Eq. 1-2). No statistic changes with ``cloud=None``, in eval
    mode or under ``torch.no_grad()``; a warm-up step does gather them (centers, angle memory,
    step count: the cloud needs them when it starts). Labels ``-1`` are ignored (left out of
    the statistics and of the mean); other negative labels are refused with ``validate=True``
    and ignored like ``-1`` with ``validate=False`` (no check).

    In eval mode :meth:`forward` (the loss, and ``return_top1``) still scores ``weight``, the
    classifier being trained, while :meth:`logits` scores the prototypes: a validation loss or
    top-1 from ``forward`` describes the weights, ``head.logits(x).argmax(1)`` the served
    classifier (they agree with ``prototype_shrinkage=None``).

    Args:
        embedding_size: ``D``.
        num_classes: ``C``.
        margin_type: a registered margin (:mod:`feature_cloud.margins`): ``"cosface"`` (cosine
            margin :math:`m_c`), ``"arcface"`` (angular margin :math:`m_a`, radians),
            ``"subcenter_arcface"`` (ArcFace over the best of ``sub_centers`` weight rows per
            class), or a :class:`~feature_cloud.margins.Margin` instance.
        scale: ``s``; default from the margin: 24 (CosFace) / 16 (ArcFace), the paper's re-ID
            setting. One below :func:`~feature_cloud.margins.trainable_scale` of ``C``,
            :math:`\frac{C-1}{C}\log(C-1)` (6.6 for 751 classes), warns: there not even a
            perfectly separated sample reaches a target probability of 1/2. Note the order
            ``(margin_type, scale, margin)``; PML's ``LEAPLoss`` takes ``(margin, scale)``.
        margin: default from the margin (0.2 for both).
        sub_centers: weight rows per class (``weight`` is ``(sub_centers * C, D)``, rows
            ``j K .. j K + K - 1`` for class ``j``); default from the margin (3 for sub-center
            ArcFace, else 1).
        cloud: ``"full"``, ``"vanilla"`` or ``None`` (no cloud), or a ready
            :class:`~feature_cloud.cloud.FeatureCloud`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        validate: check label range and finiteness each step (one host sync; skipped under
            ``torch.compile``). Shape/dtype checks are always on.
        impl: how :meth:`forward` computes the loss, all equal to rounding:
            ``"reference"`` (the :mod:`~feature_cloud.functional` pipeline),
            ``"fused"`` (:func:`feature_cloud.fused.margin_loss`, one autograd Function),
            ``"chunked"`` (the same over class chunks of ``chunk_size``: no ``B x C`` tensor,
            for very many classes), ``"auto"`` (``"chunked"`` if ``chunk_size`` is given,
            else ``"fused"``). A margin without a fused derivative, or a sub-center layout,
            runs ``"reference"`` whatever ``impl`` says, and so does a graph capture
            (``torch.compile``, ``torch.export``, ``torch.jit.trace``: the compiler fuses it).
            Every implementation draws the same counter-based cloud
            (:mod:`feature_cloud.noise`), so a seed gives the same cloud whichever is used.
        chunk_size: classes per chunk of the ``"chunked"`` implementation, rounded up to a
            multiple of :data:`feature_cloud.fused.NOISE_BLOCK` (1024 classes): below that
            many classes the chunked loss is one chunk, the fused loss.
        **cloud_options: the cloud's settings, passed to
            :class:`~feature_cloud.cloud.FeatureCloud` (checked there, once for every head and
            adapter): ``tail_threshold`` (``T`` of the vanilla rule), ``gamma`` (center
            learning rate, paper 0.1), ``memory_per_sample`` (``P`` of Eq. 5),
            ``warmup_steps`` (steps without cloud; **default 0**: the cloud starts at the first
            step, on untrained features, where the paper waits some epochs, so set it: the
            ``evaluate`` tool uses a third of training; with ``class_counts=None`` the counts
            are taken online during warm-up, exactly one epoch or ``count_steps``), ``class_counts``
            (``K_i`` per class, recommended), ``count_steps``, ``cloud_mode`` (where the cloud
            enters the logits: ``"margin"`` (default), ``"paper"`` or ``"target"``),
            ``cloud_scale`` (default 2), ``prototype_shrinkage`` (``kappa`` of the
            prototypes :meth:`logits` scores against, default 10; ``None``: the weights, as in
            the paper), ``prototype_min_count`` (classes with fewer ``K_i`` keep their
            weights, default 2), ``imprint_step``, ``center_rate``,
            ``unknown_variance``, ``angle_max_age``, ``seed`` (of the noise stream; default
            from the global RNG), ``sync`` (``"auto"``: statistics synchronised over an
            initialised process group; ``"off"``: per rank), ``process_group`` and
            ``pad_to`` (see :class:`~feature_cloud.cloud.FeatureCloud` for each).

    State (tensors only): ``weight``, ``feature_cloud.step``, ``feature_cloud.seed`` and
    ``feature_cloud.statistics.*``; 0.1.0 checkpoints (with an ``_extra_state`` dict) load.
    """

    weight: Tensor
    reduction = checked_attribute(
        "reduction",
        lambda _, value: check_reduction(value),
        "The default reduction of :meth:`forward`; settable, checked.",
    )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases held ``reduction`` as a plain attribute."""
        super().__setstate__(migrate_checked(state, ("reduction",)))

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin_type: Union[str, margins.Margin] = "cosface",
        scale: Optional[float] = None,
        margin: Optional[float] = None,
        cloud: Union[None, str, FeatureCloud] = "full",
        *,
        reduction: str = "mean",
        validate: bool = True,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
        sub_centers: Optional[int] = None,
        **cloud_options: Unpack[CloudOptions],
    ) -> None:
        super().__init__()
        embedding_size = as_int(embedding_size, "embedding_size", 1)
        num_classes = as_int(num_classes, "num_classes", 1)
        rule, scale, margin = resolve_margin(margin_type, scale, margin, num_classes)
        k = as_int(rule.sub_centers if sub_centers is None else sub_centers, "sub_centers", 1)
        check_reduction(reduction)
        validate = as_bool(validate, "validate")
        chunk_size = check_impl(impl, chunk_size, rule, k)
        self.feature_cloud = make_cloud(cloud, num_classes, embedding_size, cloud_options)
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin_rule = rule
        self.sub_centers = int(k)
        self._scale, self._margin = scale, margin  # checked above (resolve_margin)
        self.reduction = reduction
        self.validate = validate
        self._impl, self._chunk_size = impl, chunk_size  # checked above (check_impl)
        self.weight = nn.Parameter(
            torch.empty(self.num_classes * self.sub_centers, self.embedding_size)
        )
        nn.init.xavier_normal_(self.weight)

    def reset_parameters(self) -> None:
        """Fresh weights (Xavier normal, as at construction) and a fresh cloud
        (:meth:`FeatureCloud.reset_parameters`): the re-initialisation of a head built on the
        ``meta`` device and moved by ``to_empty``."""
        nn.init.xavier_normal_(self.weight)
        self.feature_cloud.reset_parameters()

    # ------------------------------------------------------------------ public API
    def logits(self, embeddings: Tensor) -> Tensor:
        """Scaled cosine logits ``s cos(theta)`` ``(B, C)`` for inference (no margin), in eval
        mode against the cloud's prototypes: the weights shrunk towards the class centers
        (:meth:`FeatureCloud.prototypes <feature_cloud.cloud.FeatureCloud.prototypes>`;
        ``prototype_shrinkage=None``: the weights themselves)."""
        return self._score(embeddings)

    def _score(self, embeddings: Tensor, scoring: Optional[Tuple[Tensor, bool]] = None) -> Tensor:
        """:meth:`logits` against ``scoring = (weight, unit)``: :func:`scoring_weight`'s, built
        here (default) or once by a caller that scores many batches with fixed weights (timm's
        evaluator)."""
        check_embeddings(embeddings, self.embedding_size)
        if scoring is None:
            scoring = scoring_weight(self.feature_cloud, hooked_weight(self), self.sub_centers)
        weight, unit = scoring
        cos = FC.cosine_logits(embeddings, weight, self.sub_centers, unit_weight=unit)
        return cos * self.scale

    @torch.no_grad()
    def as_linear(self) -> nn.Linear:
        """The inference classifier as a plain ``nn.Linear(D, C * sub_centers, bias=False)``
        for a serving stack: on L2-normalised embeddings it gives :meth:`logits` of the head in
        eval mode, whatever mode the head is in now (``s`` times the normalised prototypes;
        ``prototype_shrinkage=None``: the normalised weights). With ``sub_centers = K > 1`` it
        returns every sub-center's logit: ``out.view(B, C, K).amax(-1)`` is :meth:`logits`.
        A copy: later training does not change it."""
        weight, unit = scoring_weight(
            self.feature_cloud, hooked_weight(self).detach(), self.sub_centers, inference=True
        )
        linear = nn.Linear(
            self.embedding_size,
            weight.shape[0],
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(FC.unit_rows(weight, unit) * self.scale)
        return linear

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Margin logits of the training loss (LEAP Eq. 1-2 or, with the cloud, Eq. 7-8).

        Updates the statistics and draws the cloud when training (see the class docstring);
        ``forward`` is the cross-entropy of these logits. Adapters that compute their own
        cross-entropy (fastreid) call this.
        """
        std, key, labels = self._training_step(embeddings, labels)
        logits = cloud_margin_logits(
            self.feature_cloud,
            embeddings,
            self.weight,
            labels,
            (std, key),
            margin_type=self.margin_rule,
            scale=self.scale,
            margin=self.margin,
            sub_centers=self.sub_centers,
        )
        return self.feature_cloud.watch(logits)

    def _forward_arguments(
        self,
        labels: Optional[Tensor],
        reduction: Optional[str],
        label_smoothing: float,
        return_top1: bool = False,
    ) -> Tuple[Optional[Exception], str, float]:
        """:meth:`forward`'s arguments other than the batch, checked: ``(problem, reduction,
        label_smoothing)``. A problem is raised by the batch check, before any state changes
        (with synchronised statistics, on every rank: a rank that raised alone would leave the
        others waiting in the collective)."""
        try:
            if labels is None:
                raise TypeError(
                    f"{type(self).__name__}(embeddings, labels): the forward is the training "
                    "loss and needs labels; for inference scores call head.logits(embeddings) "
                    "(with head.eval(): cosines to the prototypes)"
                )
            reduction = self.reduction if reduction is None else reduction
            check_reduction(reduction)
            smoothing = as_float(
                label_smoothing, "label_smoothing", minimum=0.0, maximum=1.0, max_inclusive=False
            )
            if return_top1 is not True and return_top1 is not False:  # (no numpy test traced)
                as_bool(return_top1, "return_top1")  # "no" returned a (loss, top1) pair
        except (TypeError, ValueError) as exc:
            return exc, "mean", 0.0
        return None, reduction, smoothing

    @overload
    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = ...,
        *,
        label_smoothing: float = ...,
        return_top1: Literal[False] = ...,
        reduction: Optional[str] = ...,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = ...,
        *,
        label_smoothing: float = ...,
        return_top1: Literal[True],
        reduction: Optional[str] = ...,
    ) -> Tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = ...,
        *,
        label_smoothing: float = ...,
        return_top1: bool,
        reduction: Optional[str] = ...,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]: ...

    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = None,
        *,
        label_smoothing: float = 0.0,
        return_top1: bool = False,
        reduction: Optional[str] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The LEAP margin softmax loss of a batch (reduced by ``reduction``, default the
        head's).

        ``label_smoothing``: as ``F.cross_entropy``'s (targets ``1 - eps + eps / C``, ``eps / C``).
        ``return_top1``: also return, per sample, whether its target has the largest plain
        cosine (top-1 accuracy logging; the fused path gets it without a second GEMM).

        Loss and top-1 score ``weight`` in eval mode too (the training loss's classifier);
        :meth:`logits` in eval mode scores the prototypes, so for the accuracy of the served
        classifier use ``head.logits(x).argmax(1)`` (the class docstring).
        """
        problem, reduction, label_smoothing = self._forward_arguments(
            labels, reduction, label_smoothing, return_top1
        )
        std, key, labels = self._training_step(embeddings, cast(Tensor, labels), problem)
        x, y, draw, back = in_draw_order(self.feature_cloud, embeddings, labels, (std, key))
        out = _margin_loss(
            self.feature_cloud,
            x,
            self.weight,
            y,
            draw,
            self.margin_rule,
            self.scale,
            self.margin,
            self.sub_centers,
            reduction,
            self.impl,
            self.chunk_size,
            label_smoothing,
            return_top1,
        )
        watch = self.feature_cloud.watch
        if isinstance(out, tuple):
            loss, top1 = out
            if back is None:
                return watch(loss), top1
            return watch(loss[back] if reduction == "none" else loss), top1[back]
        if back is None:
            return watch(out)
        return watch(out[back] if reduction == "none" else out)

    if TYPE_CHECKING:  # head(x, y) is a Tensor, head(x, y, return_top1=True) a pair
        # a def, not ``__call__ = forward``: pyright (Pylance) keeps nn.Module's declared
        # ``__call__: Callable[..., Any]`` for an assignment; at run time nn.Module's call runs
        @overload
        def __call__(
            self,
            embeddings: Tensor,
            labels: Optional[Tensor] = ...,
            *,
            label_smoothing: float = ...,
            return_top1: Literal[False] = ...,
            reduction: Optional[str] = ...,
        ) -> Tensor: ...

        @overload
        def __call__(
            self,
            embeddings: Tensor,
            labels: Optional[Tensor] = ...,
            *,
            label_smoothing: float = ...,
            return_top1: Literal[True],
            reduction: Optional[str] = ...,
        ) -> Tuple[Tensor, Tensor]: ...

        @overload
        def __call__(
            self,
            embeddings: Tensor,
            labels: Optional[Tensor] = ...,
            *,
            label_smoothing: float = ...,
            return_top1: bool,
            reduction: Optional[str] = ...,
        ) -> Union[Tensor, Tuple[Tensor, Tensor]]: ...

        def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    @property
    def backend(self) -> str:
        """The implementation :meth:`forward` runs: ``impl`` resolved against the margin, the
        weight layout and ``chunk_size`` (:func:`backend_for`; ``"reference"`` while a graph is
        captured)."""
        return backend_for(self.impl, self.margin_rule, self.sub_centers, self.chunk_size)

    def _training_step(
        self, embeddings: Tensor, labels: Tensor, problem: Optional[Exception] = None
    ) -> Tuple[Optional[Tensor], Optional[Tensor], Tensor]:
        """Check the batch (every check before any state changes; ``problem``: one found in
        the caller's other arguments, raised by the check); when training, advance the cloud.
        Returns the cloud draw ``(std, key)`` (``None`` when inactive) and the labels as
        int64."""
        train = self.training and torch.is_grad_enabled()
        cloud = self.feature_cloud
        if not self.training and torch.is_grad_enabled() and not is_compiling():
            self._warn_eval_training()
        labels = cloud.check(
            embeddings,
            labels,
            validate=self.validate,
            train=train,
            problem=problem,
            settings=self.margin_settings(),
        )
        counted = train and cloud.counts_batch(embeddings)
        if train and is_compiling() and recomputed_weight(self, cloud):
            _imprint_outside_the_graph(self, cloud, train, counted, self.sub_centers)
        else:
            self._imprint(cloud, train, counted)
        std, key = cloud.advance(embeddings, labels, train=train)
        return std, key, labels

    def _warn_eval_training(self) -> None:
        """Once: a loss with gradients in eval mode while ``W`` trains is the plain margin loss
        (no cloud, no statistics): LEAP is off silently where a loop's ``backbone.train()``
        after validation does not reach a head kept outside the model (Lightning trial s58).
        A frozen ``W`` (FTL's stage 2, a fixed classifier) says nothing."""
        if (
            self.__dict__.get("_warned_eval")
            or self.feature_cloud.rule is None
            or not self.weight.requires_grad
        ):
            return
        self._warned_eval = True
        warn_user(
            "LEAPMarginHead is in eval mode but computes a loss with gradients while its weight "
            "trains: the plain margin loss, without the cloud or a statistics update (LEAP is "
            "off). Call head.train() with the backbone (a head outside the model is not reached "
            "by model.train()), or compute validation losses under torch.no_grad()."
        )

    def _imprint(self, cloud: FeatureCloud, train: bool, counted: bool) -> None:
        """The imprint of this step (:func:`imprint_weight`)."""
        imprint_weight(self, cloud, train, counted, self.sub_centers)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin_type={self.margin_type!r}, scale={self.scale}, margin={self.margin}, "
            + (f"sub_centers={self.sub_centers}, " if self.sub_centers != 1 else "")
            + f"reduction={self.reduction!r}, impl={self.impl!r}"
            + ("" if self.validate else ", validate=False")
            + ("" if self.chunk_size is None else f", chunk_size={self.chunk_size}")
        )

    # ------------------------------------------------------------------ checkpoints
    def check_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Raise what :meth:`load_state_dict` would refuse in this head's entries under
        ``prefix``: a weight of another class count or sub-center layout, one that is not
        floating point or holds NaN / infinite values (a parametrized weight's ``original*``
        too), a cloud state :meth:`FeatureCloud.check_state_dict` refuses; changes nothing (a
        0.1.0 layout is migrated in a copy). :func:`feature_cloud.check_state_dict` runs it
        for every head inside a model."""
        self._refuse_shard(state_dict, prefix)
        state_dict = migrated_for_checking(state_dict, prefix, prefix + "feature_cloud.")
        self._check_weight(state_dict, prefix)
        self.feature_cloud.check_state_dict(state_dict, prefix + "feature_cloud.")

    def _refuse_shard(self, state_dict: Mapping[str, Any], prefix: str) -> None:
        """One rank's state of a :class:`~feature_cloud.distributed.ShardedLEAPMarginHead`
        (its ``shard_rank`` / ``shard_sizes``, or 0.1.0's ``shard`` extra state) is refused,
        naming ``consolidate_state_dicts``, before anything loads: a shard of another world size
        was refused as a weight of other rows only, and one of world size 1 loaded and then
        raised torch's "Unexpected key(s)" with the state already changed."""
        extra = state_dict.get(prefix + "_extra_state")
        old = extra.get("shard") if isinstance(extra, dict) else None
        sizes = state_dict.get(prefix + "shard_sizes")
        rank = state_dict.get(prefix + "shard_rank")
        if old is None and sizes is None and rank is None:
            return
        if isinstance(old, dict):
            sizes, rank = old.get("sizes"), old.get("rank")
        rows = state_dict.get(prefix + "weight")
        raise ValueError(
            f"the checkpoint is one rank's shard of a ShardedLEAPMarginHead (rank "
            f"{_shard_rank(rank)} of shard sizes {_listed(sizes)}"
            + (f", {rows.shape[0]} weight rows" if isinstance(rows, Tensor) else "")
            + "), not a LEAPMarginHead's state: "
            "feature_cloud.distributed.consolidate_state_dicts(shards) merges every rank's "
            f"shard (in rank order) into this head's state (num_classes={self.num_classes})"
        )

    def _check_weight(self, state_dict: Dict[str, Any], prefix: str) -> None:
        refuse_other_shape(
            state_dict,
            prefix + "weight",
            self.weight,
            lambda c, d: (
                f"checkpoint head has {c} weight rows{_rows_layout(state_dict, prefix, c)} of "
                f"size {d}; this head has num_classes={self.num_classes} x "
                f"sub_centers={self.sub_centers} rows of size embedding_size={self.embedding_size}"
            ),
        )
        refuse_bad_weights(state_dict, prefix, "weight", self)  # parametrized too

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        self._refuse_shard(state_dict, prefix)
        self._check_weight(state_dict, prefix)
        migrate_state_dict(state_dict, prefix, prefix + "feature_cloud.", self.feature_cloud)
        # torch loads the weight before the cloud's statistics, which would refuse theirs with
        # the weight already taken: checked first, a refused checkpoint changes nothing
        self.feature_cloud.check_state_dict(state_dict, prefix + "feature_cloud.")
        super()._load_from_state_dict(state_dict, prefix, *args)


_imprint_outside_the_graph = disable_compile(
    imprint_weight,
    "imprint_step with a parametrized (or hook-recomputed) head weight: the imprint is set "
    "through the parametrization eagerly, a graph break. With fullgraph=True, run the steps "
    "up to imprint_step eagerly (after resuming past it, one eager step) and compile afterwards",
)
