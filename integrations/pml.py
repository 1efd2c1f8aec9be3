"""pytorch-metric-learning adapter: :class:`LEAPLoss`, a drop-in for ``CosFaceLoss`` / ``ArcFaceLoss``.

The swap is one line::

    loss_func = losses.CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)
    loss_func = LEAPLoss(num_classes, embedding_size, margin=0.35, scale=64, cloud="full",
                         class_counts=counts)

Every keyword follows PML's own convention: the ArcFace margin is in **degrees** (PML's default
28.6), the CosFace margin is a cosine; ``W`` is a ``(embedding_size, num_classes)`` parameter
initialised by ``weight_init_func`` and regularised by ``weight_regularizer`` exactly like PML's
``CosFaceLoss.W``; ``reducer``, miners' ``indices_tuple``, ``get_logits`` and
``utils.distributed.DistributedLossWrapper`` work as for the PML losses. ``distance`` must be
PML's default, the plain ``CosineSimilarity()``: the loss and the cloud compute the cosine
themselves (LEAP's angles are those of the plain cosine), so a distance that changes the
similarity (another ``p`` or ``power``, a subclass overriding how it computes) is refused when
it is given or assigned, rather than ignored.

No loss math lives here (PML's ``avg_angle`` statistic and ``get_angles`` read the target
angles, as PML's own losses do): the cloud (statistics update, LEAP Eq. 3-6/9; noise, Sec. 3.4) is a
:class:`feature_cloud.FeatureCloud`, the per-sample margin softmax losses (Eq. 1-2, 7-8;
``reduction="none"`` so PML's reducers and miner weights apply) come from
:func:`feature_cloud.heads.cloud_margin_loss` (the heads' own pipeline on ``W.t()``, on the fused
kernels), the margins and their PML units from :mod:`feature_cloud.margins`, the m-L2 term
(FTL Eq. 3) from :class:`feature_cloud.MetricL2`.

Under ``torch.distributed`` the statistics are synchronised by default (``sync="auto"``): inside
PML's ``DistributedLossWrapper`` the loss sees the batch the wrapper has gathered and uses it as
is; called directly on each rank's own batch it all-gathers the batch itself. Either way every
rank holds the same statistics, with no extra call.
"""

from __future__ import annotations

import math
import sys
from types import FrameType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union, cast

import torch

from feature_cloud._extras import missing

try:
    from pytorch_metric_learning.distances import CosineSimilarity
except ImportError as _err:
    raise missing(
        "feature_cloud.integrations.pml",
        "pytorch-metric-learning",
        "pip install 'feature-cloud[pml]'",
        _err,
    ) from _err
from pytorch_metric_learning.losses import BaseMetricLossFunction, SubCenterArcFaceLoss
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor, nn
from torch.nn.utils import parametrize
from typing_extensions import Unpack

from feature_cloud import functional as FC
from feature_cloud import margins
from feature_cloud._compat import disable_compile, is_compiling
from feature_cloud._validation import (
    as_float,
    as_int,
    check_embeddings,
    refuse_bad_weights,
    refuse_other_shape,
    warn_user,
)
from feature_cloud.cloud import (
    CloudOptions,
    FeatureCloud,
    WithFeatureCloud,
    WithStatisticsGroup,
    migrate_state_dict,
    migrated_for_checking,
)
from feature_cloud.heads import (
    ImplSettings,
    MarginSettings,
    backend_for,
    check_impl,
    cloud_margin_loss,
    hooked_weight,
    in_draw_order,
    make_cloud,
    recomputing_hooks,
    scoring_weight,
)
from feature_cloud.regularizers import MetricL2, as_metric_l2, warn_metric_l2_with_margin
from feature_cloud.sync import SyncedClassStatistics, is_distributed

__all__ = ["LEAPLoss", "LEAPLossOptions", "PML_DEFAULT_MARGIN", "PML_DEFAULT_SCALE"]


class LEAPLossOptions(CloudOptions, total=False):
    """The keywords of :class:`LEAPLoss` besides its named ones (``**kwargs``): PML's (its base
    classes' keywords, which PML leaves untyped) and every cloud setting
    (:class:`feature_cloud.cloud.CloudOptions`), so that a type checker checks their names."""

    weight_regularizer: Any
    weight_reg_weight: float
    weight_init_func: Any
    embedding_regularizer: Any
    embedding_reg_weight: float
    reducer: Any
    distance: Any
    collect_stats: Optional[bool]


#: PML's defaults (from the margin registry): ``CosFaceLoss(margin=0.35, scale=64)``,
#: ``ArcFaceLoss(margin=28.6 deg, scale=64)``.
PML_DEFAULT_MARGIN = margins.Defaults("pml_margin")
PML_DEFAULT_SCALE = margins.Defaults("pml_scale")


class _Agreed:
    """The batch ``LEAPLoss.forward`` agreed on with the ranks (embeddings, labels, miner
    weights), for its ``compute_loss``: a plain object written in place, as torch 2.2 / 2.3's
    dynamo traces that (not an assignment on the loss, which goes through
    ``WithFeatureCloud.__setattr__``)."""

    def __init__(self) -> None:
        self.batch: Optional[Tuple[Tensor, Tensor, Optional[Tensor]]] = None


def _refuse_a_lost_imprint_now(
    cloud: FeatureCloud, hooks: List[str], compiled: bool = False
) -> None:
    """Raise :meth:`LEAPLoss._refuse_a_lost_imprint`'s refusal (``hooks``: the recomputing
    hooks' names; none: a parametrization)."""
    how = f"the hook-based {hooks[0]}" if hooks else "a parametrization (parametrize)"
    raise ValueError(
        f"imprint_step={cloud.imprint_step}: LEAPLoss's W is recomputed from other tensors "
        f"by {how}, which would discard the imprint; remove it before the imprint step "
        "(prune.remove(loss, 'W'), parametrize.remove_parametrizations) or leave "
        "imprint_step=None"
        + (
            " (under torch.compile this is decided without reading the step: a run resumed "
            "past imprint_step takes one eager step first)"
            if compiled
            else ""
        )
    )


def _refuse_a_lost_imprint_compiled(cloud: FeatureCloud, hooks: List[str]) -> None:
    _refuse_a_lost_imprint_now(cloud, hooks, compiled=True)


# raised eagerly: raised while dynamo traces, the frames fell back to eager, where the check
# (its step read traced again in a frame of its own) let the step through
_refuse_a_lost_imprint_compiled = disable_compile(
    _refuse_a_lost_imprint_compiled,
    "LEAPLoss: imprint_step with a W recomputed from other tensors (prune, the hook-based "
    "weight_norm / spectral_norm, parametrize) is refused, the imprint would be lost: remove "
    "it before the imprint step or leave imprint_step=None",
)


def _holds(module: Any, loss: nn.Module) -> bool:
    """Whether ``module`` is ``loss`` or holds it as a submodule."""
    if module is loss:
        return True
    return isinstance(module, nn.Module) and any(m is loss for m in module.modules())


def _half_to_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when it is bf16/fp16 (differentiable; float64 stays float64); anything
    else as it is, for the batch check to refuse (integers would be promoted silently)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        return x
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _miner_weights(
    indices_tuple: Any, labels: Any, embeddings: Any
) -> Tuple[Optional[Tensor], Optional[Exception]]:
    """PML's ``convert_to_weights`` of a miner's ``indices_tuple``, taken before the ranks
    agree on the batch, and the error it raised (an index outside the batch: one rank raised it
    after the others had taken the step, or while they waited in the statistics' collective);
    ``(None, None)`` without a miner or where the agreement names the labels' problem."""
    if (
        indices_tuple is None
        or not isinstance(labels, Tensor)
        or not isinstance(embeddings, Tensor)
        or labels.dtype.is_floating_point
        or labels.dtype == torch.bool
        or labels.dim() != 1
    ):
        return None, None
    negative = _negative_index(indices_tuple, labels.shape[0])
    if negative is not None:
        return None, ValueError(str(negative))
    try:
        return lmu.convert_to_weights(indices_tuple, labels.long(), dtype=embeddings.dtype), None
    except (IndexError, ValueError, TypeError, RuntimeError) as exc:
        problem = ValueError(f"indices_tuple does not fit the batch of {labels.shape[0]}: {exc}")
        return None, problem


def _negative_index(indices_tuple: Any, batch: int) -> Optional[IndexError]:
    """The error for a miner's ``indices_tuple`` holding a negative index (PML reads ``-1`` as
    the batch's last row: a wrong pair or triplet, no error; below ``-batch`` it raises), else
    ``None``. One host read of the smallest index."""
    if not isinstance(indices_tuple, (tuple, list)):
        return None
    parts = [t.reshape(-1) for t in indices_tuple if isinstance(t, Tensor) and t.numel()]
    if not parts or bool(torch.cat([p.to(parts[0].device) for p in parts]).min() >= 0):
        return None
    return IndexError(
        f"indices_tuple holds a negative index: a miner's indices are rows 0..{batch - 1} of "
        "the batch (PML would read -1 as the last row)"
    )


def _as_int64(labels: Tensor) -> Tensor:
    """Integer labels (uint8, int16, int32) as int64, the labels PML's reducers (and miners)
    expect (``ClassWeightedReducer`` indexes its weights with them: uint8 labels were a boolean
    mask); float, bool and complex ones as they are, for the batch check to refuse."""
    dtype = labels.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        return labels
    return labels.long()


def _ref_emb_problem(
    embeddings: Any, labels: Any, ref_emb: Any, ref_labels: Any
) -> Optional[Exception]:
    """PML's ``c_f.ref_not_supported`` (after its ``set_ref_emb``) as an error to agree on."""
    if ref_emb is not None and (ref_emb is not embeddings or ref_labels is not labels):
        return ValueError("ref_emb is not supported for this loss function")
    return None


#: the methods through which a ``CosineSimilarity`` (subclass) computes its similarity
_DISTANCE_METHODS = (
    "forward",
    "compute_mat",
    "pairwise_distance",
    "normalize",
    "maybe_normalize",
    "get_norm",
)


def _check_distance(distance: Any) -> None:
    """Refuse a ``distance`` that is not the plain cosine the loss computes itself.

    PML's margin losses score with ``self.distance``; ``LEAPLoss`` computes the plain cosine
    (the fused kernels, the cloud's angles, LEAP Eq. 7-8), so any distance that would give
    other numbers is refused rather than ignored: another type, ``p != 2``, ``power != 1``,
    ``normalize_embeddings`` or ``is_inverted`` turned off, a subclass (or an instance)
    overriding a method the similarity is computed through, forward hooks. A subclass that
    changes none of them computes the same, and is accepted."""
    if not isinstance(distance, CosineSimilarity):
        raise TypeError(
            "LEAPLoss computes the plain cosine similarity: distance must be PML's "
            f"CosineSimilarity() (the default; leave it out), got {type(distance).__name__}"
        )
    name = type(distance).__name__
    problems = [
        f"{attr}={getattr(distance, attr, None)!r} (must be {want!r})"
        for attr, want in (
            ("p", 2),
            ("power", 1),
            ("normalize_embeddings", True),
            ("is_inverted", True),
        )
        if getattr(distance, attr, None) != want
    ]
    problems += [
        f"{name} overrides {method}()"
        for method in _DISTANCE_METHODS
        if getattr(type(distance), method, None) is not getattr(CosineSimilarity, method)
        or method in vars(distance)
    ]
    if getattr(distance, "_forward_hooks", None) or getattr(distance, "_forward_pre_hooks", None):
        problems.append(f"{name} has forward hooks")
    if problems:
        raise ValueError(
            "LEAPLoss computes the plain cosine similarity itself (its fused kernels and the "
            "cloud's angles, LEAP Eq. 7-8) and cannot use another: distance must be PML's "
            "CosineSimilarity() with p=2, power=1 (the default; leave it out), got "
            f"{name} with " + ", ".join(problems)
        )


def _degrees_that_rebuild(rule: margins.Margin, radians: float) -> float:
    """``radians`` in degrees with the fewest digits (12 to 17: 28.6, not 28.599999999999998)
    that the constructor turns back into ``radians`` (``rule.from_pml``); else a double next
    to the degrees that does (0.1 rad: 5.729577951308232, not 5.729577951308233); the degrees
    themselves, within a unit in the last place, where no double does."""
    degrees = math.degrees(radians)
    for digits in range(12, 18):
        text = float(f"{degrees:.{digits}g}")
        if rule.from_pml(text) == radians:
            return text
    for near in (math.nextafter(degrees, math.inf), math.nextafter(degrees, -math.inf)):
        if rule.from_pml(near) == radians:
            return near
    return float(f"{degrees:.17g}")


class LEAPLoss(
    WithFeatureCloud,
    WithStatisticsGroup,
    MarginSettings,
    ImplSettings,
    WeightRegularizerMixin,
    BaseMetricLossFunction,
):
    r"""CosFace / ArcFace loss with the LEAP feature cloud for tail classes (LEAP Eq. 7-8).

    With ``cloud=None`` it computes the same values and gradients as PML's ``CosFaceLoss`` /
    ``ArcFaceLoss`` for the same ``W`` and keywords (one documented difference: for an ArcFace
    target angle :math:`\theta > \pi - m` PML switches to :math:`\cos\theta - m\sin m`, while
    the core clips :math:`\theta + m` to :math:`\pi`; both keep the logit monotone, they differ
    only in that regime).

    Args:
        num_classes: ``C``.
        embedding_size: ``D``.
        margin: PML convention: cosine margin for ``"cosface"`` (default 0.35), **degrees** for
            ``"arcface"`` (default 28.6; a margin below 1 warns: it looks like radians). The
            ``margin`` attribute holds radians for the angular margins, as PML's.
        scale: ``s`` (PML default 64).
        margin_type: a registered margin (:mod:`feature_cloud.margins`): ``"cosface"``,
            ``"arcface"`` or ``"subcenter_arcface"`` (PML's ``SubCenterArcFaceLoss``: ``W`` is
            ``(embedding_size, num_classes * sub_centers)``; ``sub_centers`` default 3).
        cloud: ``"full"`` (LEAP Eq. 9), ``"vanilla"`` (Eq. 6) or ``None`` (plain CosFace/ArcFace),
            or a ready :class:`feature_cloud.FeatureCloud`.
        validate: check label range and finiteness each step (one host sync). ``False``: a
            label ``>= C`` is not caught (the fused / chunked kernels score its row against no
            target; the statistics update and ``impl="reference"`` fail in an index).
        sub_centers: weight columns per class (default from the margin: 3 for
            ``"subcenter_arcface"``, else 1).
        impl, chunk_size: the loss implementation, as :class:`feature_cloud.LEAPMarginHead`'s
            (``"auto"``: the fused kernels where the margin has them; ``"chunked"`` with
            ``chunk_size`` classes per chunk holds no ``B x C`` tensor, for very many classes;
            ``"reference"``: the autograd pipeline; chunks are multiples of 1024 classes).
        metric_l2: ``None``, an ``alpha`` (float) or a :class:`feature_cloud.MetricL2`. Adds the
            m-L2 regulariser of FTL Eq. 3, :math:`\alpha\|W^T f\|^2`, as a second sub-loss
            ``"metric_l2_loss"`` (per element, so PML reducers apply). PML's regularisers see
            either the embeddings or the weights; m-L2 needs both, so it lives in the loss.
        **kwargs: PML's ``weight_regularizer``, ``weight_reg_weight``, ``weight_init_func``,
            ``embedding_regularizer``, ``embedding_reg_weight``, ``reducer``, ``distance``
            (only the plain ``CosineSimilarity()``, the default: another is refused),
            ``collect_stats``; every other keyword is a cloud setting of
            :class:`feature_cloud.FeatureCloud` (all of its keywords; among them
            ``class_counts``, the per-class sample counts ``K_i`` of the training set (a
            tensor or list ``(C,)``, or ``collections.Counter(dataset.targets)``): without them
            the first ``count_steps`` steps (else all ``warmup_steps``) must be exactly one epoch
            so they can be counted online (PML's trainers drop the last partial batch: those
            images go uncounted). Online counting counts what the sampler draws: with PML's
            ``samplers.MPerClassSampler`` (or any class-balanced sampler) that is how often each
            class was drawn, not ``K_i``; pass the dataset's counts,
            ``class_counts=collections.Counter(train_dataset.targets)``; ``cloud_mode`` / ``cloud_scale``,
            default ``"margin"`` / 2, the paper's cloud: ``cloud_mode="paper", cloud_scale=1.0``;
            ``prototype_shrinkage``, ``get_logits``' prototypes, default 10, ``None``: ``W``; and ``tail_threshold``, ``gamma``,
            ``memory_per_sample``, ``warmup_steps``, ``count_steps``, ``prototype_min_count``,
            ``center_rate``, ``unknown_variance``, ``angle_max_age``, ``imprint_step``, ``seed``,
            ``sync``, ``process_group``, ``pad_to``). The paper's LEAP (every cloud default
            that differs from it, set to the paper's): ``LEAPLoss(C, D, **feature_cloud.PAPER_LEAP)``
            (``cloud_mode="paper", cloud_scale=1.0, prototype_shrinkage=None,
            center_rate="paper", unknown_variance="pooled"``; PML's default ``scale`` /
            ``margin`` are the paper's face setting).

    State (tensors only): ``W`` and ``feature_cloud.*`` (statistics, step, seed); 0.1.0
    checkpoints (``head.*``) load.
    """

    #: keywords that belong to PML's base classes; every other keyword configures the cloud
    _PML_KWARGS = (
        "weight_regularizer",
        "weight_reg_weight",
        "weight_init_func",
        "embedding_regularizer",
        "embedding_reg_weight",
        "reducer",
        "distance",
        "collect_stats",
    )
    _called = "loss"  # in messages: loss.cloud = ..., not head.cloud

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Optional[float] = None,
        scale: Optional[float] = None,
        margin_type: Union[str, margins.Margin] = "cosface",
        cloud: Union[None, str, FeatureCloud] = "full",
        validate: bool = True,
        metric_l2: Union[None, float, MetricL2] = None,
        sub_centers: Optional[int] = None,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
        **kwargs: Unpack[LEAPLossOptions],
    ) -> None:
        rule = margins.get(margin_type)
        ml2 = as_metric_l2(metric_l2, reduction="none")  # checked before anything is built
        cloud_options = {k: kwargs.pop(k) for k in list(kwargs) if k not in self._PML_KWARGS}
        # read by sub_loss_names() while the PML base classes build the reducer
        self._with_metric_l2 = metric_l2 is not None
        super().__init__(**kwargs)  # PML's distance: checked as it is assigned (__setattr__)
        self.num_classes = as_int(num_classes, "num_classes", 1)
        self.margin_rule = rule
        margin = as_float(rule.pml_margin if margin is None else margin, "margin")
        margins.check_unit(rule, margin, "degrees")
        #: in this package's unit, as PML's attribute: radians for ArcFace (given in degrees;
        #: an assignment is in radians, checked)
        self._margin = rule.from_pml(margin)
        self._margin_in_radians = True
        self.scale = rule.pml_scale if scale is None else scale
        self.sub_centers = as_int(
            rule.sub_centers if sub_centers is None else sub_centers, "sub_centers", 1
        )
        self._chunk_size = check_impl(impl, chunk_size, rule, self.sub_centers)
        self._impl = impl
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "margin", "scale"], is_stat=False
        )
        self.add_to_recordable_attributes(name="avg_angle", is_stat=True)  # as PML's margins'
        self._warned_eval = False
        # W first, so that under the same seed it equals PML's CosFaceLoss/ArcFaceLoss W
        # (PML's SubCenterArcFaceLoss: D x C K, the K columns of class j side by side)
        self.W = torch.nn.Parameter(
            torch.empty(int(embedding_size), self.num_classes * self.sub_centers)
        )
        self.weight_init_func(self.W)
        self.embedding_size = as_int(embedding_size, "embedding_size", 1)
        self.feature_cloud = make_cloud(
            cloud,
            self.num_classes,
            self.embedding_size,
            cloud_options,
            owner=("PML's loss keywords", self._PML_KWARGS),
        )
        self.validate = validate  # checked (as_bool): "no" validated
        #: (embeddings, labels, miner weights) agreed on in forward, for compute_loss: held in
        #: a holder made here and written in place (an attribute assigned in forward went through
        #: WithFeatureCloud.__setattr__, which torch 2.2 / 2.3's dynamo cannot trace)
        self._agreed = _Agreed()
        self.metric_l2: Optional[MetricL2] = ml2
        if self.metric_l2 is not None:
            warn_metric_l2_with_margin("LEAPLoss", "metric_l2", self.metric_l2.alpha)

    def reset_parameters(self) -> None:
        """A fresh ``W`` (``weight_init_func``, as at construction, from torch's global RNG) and a
        fresh cloud (:meth:`FeatureCloud.reset_parameters`): the re-initialisation of a loss
        built on the ``meta`` device and moved by ``to_empty``, as the head's."""
        with torch.no_grad():
            self.weight_init_func(self.W)
        self.feature_cloud.reset_parameters()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """A whole-module pickle of an earlier release held the ArcFace ``margin`` in degrees
        (PML's keyword); this release holds it in radians, as PML's attribute. Pickles from
        before ``impl`` / ``chunk_size`` run the default backend. A ``distance`` other than the
        plain cosine (taken and ignored before this release) is refused, as when assigned."""
        rule = state.get("margin_rule", state.get("_margin_rule"))  # (fixed: _margin_rule)
        if not state.get("_margin_in_radians", False) and rule is not None:
            state["margin"] = rule.from_pml(state["margin"])
            state["_margin_in_radians"] = True
        if not isinstance(state.get("_agreed"), _Agreed):  # pickles before the holder: None
            state["_agreed"] = _Agreed()
        distance = state.get("_modules", {}).get("distance")
        if distance is not None:  # earlier releases took any CosineSimilarity and ignored it
            _check_distance(distance)
        super().__setstate__(state)

    def __setattr__(self, name: str, value: Any) -> None:
        """``distance`` (set by PML's constructor, or assigned later) is checked before it is
        taken: only the plain cosine the loss computes (see :func:`_check_distance`)."""
        if name == "distance":
            _check_distance(value)
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ PML hooks
    def _sub_loss_names(self) -> List[str]:
        return ["loss", "metric_l2_loss"] if self._with_metric_l2 else ["loss"]

    def get_default_distance(self) -> CosineSimilarity:
        """PML's hook: the plain cosine the loss computes (no other distance is taken)."""
        return CosineSimilarity()

    def cast_types(self, dtype: torch.dtype, device: torch.device) -> None:
        """PML convention: ``W`` follows the embeddings' device and dtype (at least float32:
        see :meth:`forward`); the cloud follows the device (its statistics stay float32). A
        training forward only: eval and inference follow the device and leave ``W``'s dtype
        (see :meth:`_weight_for`)."""
        # only when they differ: the no-op assignment froze W's storage under torch.compile,
        # and the compiled imprint's in-place write into W then failed ("cannot mutate tensors
        # with frozen storage")
        if self.W.dtype != dtype or self.W.device != device:
            self.W.data = c_f.to_device(self.W.data, device=device, dtype=dtype)
        self._cloud_to(device)

    def _weight_for(self, weight: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``weight`` (``W`` as this call sees it) to score a batch of ``dtype`` on ``device`` in
        eval / inference: ``W`` and the cloud follow the device (PML's convention, as in a
        training forward) but ``W`` keeps its dtype, the call computes with a local copy in
        ``dtype`` (s55 deploy 2: an inference call turned a ``.half()`` loss's ``W`` back into
        float32 for good, changing its ``state_dict``, and ``torch.export`` failed on the
        ``W.data`` assignment)."""
        if self.W.device != device:  # only when they differ (see cast_types)
            self.W.data = self.W.data.to(device)
            weight = weight.to(device)
        self._cloud_to(device)
        return weight.to(dtype)

    def _cloud_to(self, device: torch.device) -> None:
        """The cloud's buffers on ``device`` (a no-op once they are)."""
        if self.feature_cloud.step.device != device:
            self.feature_cloud.to(device)

    def _wrapped_by_pml(self) -> bool:
        """Whether this call comes from a ``DistributedLossWrapper`` holding this loss (its
        batch is then the gathered global batch, own rank first)."""
        from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

        frame: Optional[FrameType] = sys._getframe(1)
        for _ in range(40):  # the wrapper may hold this loss inside a user's own loss
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return False
            owner = frame.f_locals.get("self")
            if isinstance(owner, DistributedLossWrapper) and _holds(owner.loss, self):
                return True
        return False

    def _sync_mode(self) -> None:
        """Under ``sync="auto"`` tell the statistics whether the batch is PML-gathered."""
        stats = self.feature_cloud.statistics
        if (
            self.feature_cloud.sync == "auto"
            and isinstance(stats, SyncedClassStatistics)
            and is_distributed()
        ):
            stats.batch = "pml_gathered" if self._wrapped_by_pml() else "local"

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(
            self,
            embeddings: Tensor,
            labels: Optional[Tensor] = None,
            indices_tuple: Any = None,
            ref_emb: Optional[Tensor] = None,
            ref_labels: Optional[Tensor] = None,
        ) -> Tensor: ...

    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = None,
        indices_tuple: Any = None,
        ref_emb: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
    ) -> Tensor:
        """PML's ``forward`` on the embeddings upcast to at least float32 (bf16/fp16 under
        autocast; the core computes in float32 anyway): ``W`` stays float32, and PML's reducers
        (with ``metric_l2`` or a regulariser, ``MultipleReducers`` sums the sub-losses in the
        embeddings' dtype) return a float32 loss, as PML's ``CosFaceLoss`` does."""
        upcast = _half_to_float32(embeddings)
        if ref_emb is not None and ref_emb is embeddings:  # (torch 2.2's dynamo: None is x)
            ref_emb = upcast
        self._agreed.batch = None
        if isinstance(labels, Tensor):  # as PML's forward does, before the ranks' agreement
            moved = _as_int64(c_f.to_device(labels, upcast))
            if ref_labels is not None and ref_labels is labels:
                ref_labels = moved
            labels = moved
        if (
            not self.training
            and torch.is_grad_enabled()
            and not getattr(self, "_warned_eval", True)
        ):
            self._warned_eval = True
            warn_user(
                "LEAPLoss is in eval mode with gradients on (PML's freeze_these puts a frozen "
                "loss in eval mode): no cloud and no statistics update, the plain margin loss. "
                "To train with W fixed, set loss.W.requires_grad_(False) and keep the loss in "
                "train mode."
            )
        if self.training and torch.is_grad_enabled():
            # first: whether the step is collective depends on it (a direct call after a call
            # inside PML's wrapper went past the agreement below: a ref_emb or a miner's index
            # refused on one rank raised there while the others waited in the statistics')
            self._sync_mode()
        if self._collective_step():
            # ranks agree on the batch before PML's own shape checks, which would raise on one
            # rank while the others wait in the statistics' collective: all raise or none
            # (labels=None on a rank is one of the problems agreed on: not an integer tensor)
            if isinstance(upcast, Tensor):
                self._cloud_to(upcast.device)
            # agreed on too: a ref_emb (DistributedLossWrapper(efficient=True) passes one,
            # with an indices_tuple over the global batch), else the miner's indices
            problem = _ref_emb_problem(upcast, labels, ref_emb, ref_labels)
            weights = None
            if problem is None:
                weights, problem = _miner_weights(indices_tuple, labels, upcast)
            checked = self.feature_cloud.check(
                upcast,
                cast(Tensor, labels),
                validate=self.validate,
                problem=problem,
                settings=self.margin_settings(),
            )
            self._agreed.batch = (upcast, checked, weights)
        elif isinstance(upcast, Tensor) and not upcast.is_floating_point():
            raise TypeError(f"embeddings must be a floating point tensor, got dtype {upcast.dtype}")
        elif labels is not None and not isinstance(labels, Tensor):
            # PML's own forward fails on a list / NumPy array in its device move (AttributeError)
            raise TypeError(
                f"labels must be a torch.Tensor of class indices, got {type(labels).__name__} "
                "(torch.as_tensor(labels) converts a list or NumPy array)"
            )
        elif isinstance(labels, Tensor) and labels.dim() != 1:  # PML's check_shapes: IndexError
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        elif isinstance(labels, Tensor):  # PML refuses an index past the batch, not a negative one
            negative = _negative_index(indices_tuple, labels.shape[0])
            if negative is not None:
                raise negative
        try:
            return super().forward(upcast, labels, indices_tuple, ref_emb, ref_labels)
        finally:
            self._agreed.batch = None

    def _collective_step(self) -> bool:
        """Whether this call's training step is a collective (synchronised statistics)."""
        return self.training and torch.is_grad_enabled() and self.feature_cloud.collective

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: Any,
        ref_emb: Optional[Tensor],
        ref_labels: Optional[Tensor],
    ) -> Dict[str, Dict[str, Any]]:
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        dtype, device = embeddings.dtype, embeddings.device
        self._cloud_to(device)  # the checks of a collective update run on the device
        cloud = self.feature_cloud
        train = self.training and torch.is_grad_enabled()
        agreed = self._agreed.batch
        miner_weights = None
        if train and agreed is not None and agreed[0] is embeddings:
            labels, miner_weights = agreed[1], agreed[2]  # agreed on by every rank in forward
        else:
            if train:
                self._sync_mode()
            labels = cloud.check(
                embeddings,
                labels,
                validate=self.validate,
                train=train,
                settings=self.margin_settings(),
            )
        if miner_weights is None:
            miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        if train:
            self._refuse_a_lost_imprint(cloud)
            self.cast_types(dtype, device)  # W follows the batch once the batch is accepted
            weight = self.W
        else:  # eval (or no grad): W keeps its dtype, as in get_logits
            weight = self._weight_for(self.W, dtype, device)
        cloud.imprint(weight.t(), self.sub_centers, train=train)
        draw = cloud.advance(embeddings, labels, train=train)
        if embeddings.shape[0] == 0:  # PML's zero loss (its reducers return 0, not a NaN mean)
            return self.zero_losses()
        # a gathered batch: one cloud over the global batch, drawn in rank order
        x, y, draw, back = in_draw_order(cloud, embeddings, labels, draw)
        # per-sample losses (PML's reducers and miner weights apply) on the fused kernels
        losses = cloud_margin_loss(
            cloud,
            x,
            weight.t(),
            y,
            draw,
            margin_type=self.margin_rule,
            scale=self.scale,
            margin=self.margin,
            sub_centers=self.sub_centers,
            reduction="none",
            impl=self.impl,
            chunk_size=self.chunk_size,
        )
        if back is not None:
            losses = losses[back]  # the wrapper's rows
        losses = cloud.watch(losses)
        if self.collect_stats:  # PML's avg_angle: the target angles of the labelled rows
            with torch.no_grad():  # (0 without any); one host read, as PML's
                valid = labels >= 0
                cos = self.get_cosine(embeddings).gather(1, labels.clamp_min(0).unsqueeze(1))
                angles = torch.acos(cos.squeeze(1).clamp(-1.0, 1.0)) * valid
                self.avg_angle = math.degrees(float(angles.sum() / valid.sum().clamp_min(1)))
        indices = c_f.torch_arange_from_size(embeddings)
        loss_dict: Dict[str, Dict[str, Any]] = {
            "loss": {
                "losses": losses.to(dtype) * miner_weights,
                "indices": indices,
                "reduction_type": "element",
            }
        }
        if self.metric_l2 is not None:
            loss_dict["metric_l2_loss"] = {
                "losses": self.metric_l2(embeddings, weight.t()).to(dtype),
                "indices": indices,
                "reduction_type": "element",
            }
        self.add_weight_regularization_to_loss_dict(loss_dict, weight.t())
        return loss_dict

    def _refuse_a_lost_imprint(self, cloud: FeatureCloud) -> None:
        """An ``imprint_step`` still ahead with a ``W`` recomputed from other tensors (a forward
        pre-hook: ``torch.nn.utils.prune``, the hook-based ``weight_norm`` / ``spectral_norm``;
        or ``parametrize``): the imprint writes in place into the ``W`` computed for this step
        and the next computation drops it. Refused before the statistics change (the plain
        ``W``: one dict check and one attribute test). Compiled, on Python state only, as the
        head decides while compiling (no host read of the step: the imprint counts as ahead
        unless an eager step of this process saw it behind); the compiled imprint is in the
        graph, where nothing moves it out, so it was lost without a word."""
        hooks = recomputing_hooks(self, "W")
        if not hooks and not parametrize.is_parametrized(self, "W"):
            return
        if is_compiling():
            if cloud.imprint_step is not None and cloud.rule is not None:
                if not cloud.imprint_behind:
                    _refuse_a_lost_imprint_compiled(cloud, hooks)
        elif cloud.imprint_ahead():
            _refuse_a_lost_imprint_now(cloud, hooks)

    def _scored(self, embeddings: Tensor) -> Tuple[Tensor, Tensor]:
        """Embeddings to score (at least float32, checked) and ``W`` (as ``forward`` sees it)
        on their device and in their dtype, a local copy: ``W``'s own dtype stays."""
        embeddings = _half_to_float32(embeddings)
        check_embeddings(embeddings, self.embedding_size)  # before W follows them
        weight = self._weight_for(hooked_weight(self, "W"), embeddings.dtype, embeddings.device)
        return embeddings, weight

    def get_cosine(self, embeddings: Tensor) -> Tensor:
        """Cosine to every class ``(B, C)`` (the best sub-center), as PML's margin losses'."""
        embeddings, weight = self._scored(embeddings)
        return FC.cosine_logits(embeddings, weight.t(), self.sub_centers)

    def get_angles(self, cosine_of_target_classes: Tensor) -> Tensor:
        """``acos`` of target cosines (radians), as PML's; sets ``avg_angle`` (degrees) with
        ``collect_stats``."""
        angles = torch.acos(cosine_of_target_classes.clamp(-1.0, 1.0))
        if self.collect_stats:
            with torch.no_grad():
                self.avg_angle = math.degrees(float(angles.mean()))
        return angles

    #: PML's data cleaning of sub-center ArcFace (``SubCenterArcFaceLoss.get_outliers``: samples
    #: whose angle to their class's dominant sub-center exceeds ``threshold`` degrees), on ``W``
    get_outliers = SubCenterArcFaceLoss.get_outliers

    @property
    def backend(self) -> str:
        """The loss implementation ``forward`` runs (``"reference"``, ``"fused"`` or
        ``"chunked"``), as :attr:`feature_cloud.LEAPMarginHead.backend`."""
        return backend_for(self.impl, self.margin_rule, self.sub_centers, self.chunk_size)

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``s cos(theta)`` for every class ``(B, C)``, as PML's ``CosFaceLoss.get_logits``,
        in eval mode against the cloud's prototypes (``prototype_shrinkage``; see
        ``LEAPMarginHead.logits``)."""
        embeddings, weight = self._scored(embeddings)
        weight, unit = scoring_weight(self.feature_cloud, weight.t(), self.sub_centers)
        return FC.cosine_logits(embeddings, weight, self.sub_centers, unit_weight=unit) * self.scale

    def extra_repr(self) -> str:
        """The constructor's keywords that rebuild this loss: ``margin`` in the constructor's
        unit (degrees for ArcFace, as PML's keyword; the attribute ``loss.margin`` is in
        radians), ``sub_centers`` / ``impl`` / ``chunk_size`` / ``validate`` where they are not
        the defaults. The cloud's options are in the ``feature_cloud`` child's line."""
        rule = self.margin_rule
        margin = float(self.margin)
        if rule.pml_degrees:  # the unit LEAPLoss(margin=) takes
            margin = _degrees_that_rebuild(rule, margin)
        subs = self.sub_centers != 1 or rule.sub_centers != 1  # rebuilt, the rule's default
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"margin={margin}, scale={self.scale}, "
            f"margin_type={self.margin_type!r}, cloud={self.cloud!r}"
            + (f", sub_centers={self.sub_centers}" if subs else "")
            + ("" if self.impl == "auto" else f", impl={self.impl!r}")
            + ("" if self.chunk_size is None else f", chunk_size={self.chunk_size}")
            + ("" if self.validate else ", validate=False")
        )

    def check_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Raise what :meth:`load_state_dict` would refuse in this loss's entries under
        ``prefix`` (``W`` of another shape, not floating point or not finite, a parametrized
        ``W``'s ``original*`` too; a cloud state the cloud refuses); changes nothing (a 0.1.0
        layout is migrated in a copy). ``feature_cloud.check_state_dict`` runs it for every
        loss inside a model."""
        state_dict = migrated_for_checking(state_dict, prefix + "head.", prefix + "feature_cloud.")
        self._check_state(state_dict, prefix)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        migrate_state_dict(
            state_dict, prefix + "head.", prefix + "feature_cloud.", self.feature_cloud
        )
        self._check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _check_state(self, state_dict: Dict[str, Any], prefix: str) -> None:
        # refused before anything loads (torch loads W, then the cloud's own buffers, then its
        # statistics, which would refuse another class count with W and the step already taken)
        refuse_other_shape(
            state_dict,
            prefix + "W",
            self.W,
            lambda d, c: (
                f"checkpoint loss has W of shape ({d}, {c}) (embedding_size={d}, "
                f"num_classes={c // self.sub_centers} x sub_centers={self.sub_centers}); this loss "
                f"has {tuple(self.W.shape)}"
            ),
        )
        refuse_bad_weights(state_dict, prefix, "W", self)  # parametrized too
        self.feature_cloud.check_state_dict(state_dict, prefix + "feature_cloud.")
