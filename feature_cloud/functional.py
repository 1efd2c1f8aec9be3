"""Pure tensor functions: every equation of LEAP and FTL that the package implements.

Nothing here holds state. Modules in :mod:`feature_cloud.heads`, :mod:`feature_cloud.statistics`,
:mod:`feature_cloud.regularizers` and every framework adapter call these functions; none of them
re-implements the math.

Equation numbers refer to

* LEAP: Liu et al., "Deep Representation Learning on Long-tailed Data: A Learnable Embedding
  Augmentation Perspective", CVPR 2020.
* FTL: Yin et al., "Feature Transfer Learning for Face Recognition with Under-Represented Data",
  CVPR 2019.

Shapes: ``B`` batch, ``C`` classes, ``D`` embedding size. Class weights are stored ``(C, D)`` like
``nn.Linear`` (pytorch-metric-learning stores ``(D, C)``; its adapter transposes a view).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import margins as _margins
from ._validation import check_reduction, differs
from .angles import safe_acos, shifted_cosine

__all__ = [
    "MARGIN_TYPES",
    "CLOUD_RULES",
    "check_cloud_rule",
    "CLOUD_MODES",
    "target_cloud_angles",
    "safe_acos",
    "safe_normalize",
    "common_float",
    "cosine_logits",
    "unit_rows",
    "shifted_cosine",
    "margin_logits",
    "margin_cross_entropy",
    "angle_noise",
    "metric_l2",
    "metric_l2_from_logits",
    "batch_class_means",
    "center_rate",
    "ema_centers",
    "angles_to_centers",
    "ring_slots",
    "angle_moments",
    "vanilla_cloud_variance",
    "full_cloud_variance",
    "cloud_variance",
    "UNKNOWN_VARIANCE",
    "DEFAULT_UNKNOWN_VARIANCE",
    "unknown_variance_prior",
    "masked_angle_moments",
    "center_prototypes",
]

#: names of the built-in margins (the registry, :func:`feature_cloud.margins.names`, is authoritative)
MARGIN_TYPES = _margins.names()
CLOUD_RULES = ("full", "vanilla")


def _at_least_float32(x: Tensor) -> Tensor:
    """Upcast half-precision tensors (autocast outputs) to float32; keep float32/float64."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def safe_normalize(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    r"""``F.normalize(x, dim=dim)`` that stays exact for huge and tiny finite vectors.

    The squared norm of a float32 vector overflows above ~1.8e19 (fp16: 256) and underflows
    below ~1e-19, and ``F.normalize`` then returns a zero (or unscaled) vector. Dividing by the
    detached per-row max-abs first keeps :math:`\|x\|` near 1; normalisation is scale-invariant,
    so value and gradient equal those of ``x / ||x||`` (the scale is a constant for autograd).
    Rows that are exactly zero (a masked or padded sample) stay zero, with a zero gradient
    (``F.normalize`` gives them ``1 / eps``, ~1e12: ``inf`` in float16, then NaN in the
    backbone's gradients).
    """
    return _normalize_by_max(x, x.detach().abs().amax(dim=dim, keepdim=True), dim, eps)


def _normalize_by_max(x: Tensor, m: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """:func:`safe_normalize` given ``m``, the detached max-abs of ``x`` along ``dim``
    (``keepdim``): a caller that already has it (the statistics' usable-row test) saves that
    pass. A zero row is normalised as a row of ones and then replaced by zeros, so no norm of
    a zero vector enters autograd (its second derivative would be NaN: gradient penalties)."""
    zero = m == 0  # not ``m > 0``: a NaN row must stay NaN (a non-finite loss, not a silent 0)
    unit = torch.where(zero, 1.0, x / torch.where(zero, torch.ones_like(m), m))
    return torch.where(zero, 0.0, F.normalize(unit, dim=dim, eps=eps))


def common_float(embeddings: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Cast features and class weights to one compute dtype: float64 if either is float64,
    else float32 (half-precision inputs without autocast are upcast, as autocast does for every
    op but the GEMM; under autocast the GEMM still runs in the autocast dtype). No copy when a
    tensor already has that dtype; the casts are differentiable (gradients come back in each
    input's own dtype)."""
    dtype = torch.float64 if torch.float64 in (embeddings.dtype, weight.dtype) else torch.float32
    return embeddings.to(dtype), weight.to(dtype)


def unit_rows(weight: Tensor, unit: bool = False) -> Tensor:
    """``weight`` with L2-normalised rows: itself when ``unit`` says they already are (the
    prototypes of :func:`center_prototypes`), else ``F.normalize(weight, dim=1)``."""
    return weight if unit else F.normalize(weight, dim=1)


def cosine_logits(
    embeddings: Tensor, weight: Tensor, sub_centers: int = 1, *, unit_weight: bool = False
) -> Tensor:
    r"""Cosine of the angle between every embedding and every class weight, :math:`\cos\theta_{nj}`.

    ``embeddings`` ``(B, D)``, ``weight`` ``(C, D)``; both are L2-normalised (LEAP Eq. 1-2).
    With ``sub_centers = K > 1`` the weight is ``(K C, D)`` with rows ``j K .. j K + K - 1`` for
    class ``j`` and the class cosine is the largest over its sub-centers (sub-center ArcFace,
    PML's ``SubCenterArcFaceLoss.get_cosine``). Runs in the input dtype (autocast may make it
    bf16/fp16); callers upcast before margins. Inputs of two dtypes (bf16 features, float32
    weights, without autocast) meet in :func:`common_float`'s.

    ``unit_weight=True``: the rows of ``weight`` are already L2-normalised (the prototypes of
    :func:`center_prototypes`, or ``F.normalize(weight, dim=1)`` cached by a caller that scores
    many batches with fixed weights) and are not normalised again (a ``(C, D)`` pass and its
    temporaries on every call; same numbers to rounding).
    """
    if embeddings.dtype != weight.dtype:  # under autocast the GEMM still runs in its dtype
        embeddings, weight = common_float(embeddings, weight)
    cos = F.linear(safe_normalize(embeddings, dim=1), unit_rows(weight, unit_weight))
    if sub_centers == 1:
        return cos
    if differs(weight.shape[0] % sub_centers, 0):
        raise ValueError(
            f"weight has {weight.shape[0]} rows, not a multiple of sub_centers={sub_centers}"
        )
    # (-1, C, K): a constant shape for exporters (ONNX's Reshape of a traced (B, C, K) refused B = 0)
    return cos.reshape(-1, cos.shape[1] // sub_centers, sub_centers).max(dim=2).values


def margin_logits(
    cos: Tensor,
    labels: Tensor,
    *,
    margin_type: Union[str, _margins.Margin] = "cosface",
    scale: Optional[float] = None,
    margin: Optional[float] = None,
    alpha: Optional[Tensor] = None,
    target_alpha: Optional[Tensor] = None,
) -> Tensor:
    r"""Scaled margin logits (CosFace, ArcFace, ... from :mod:`feature_cloud.margins`) with an
    optional feature cloud.

    ``target_alpha`` ``(B,)`` (exclusive with ``alpha``) shifts the target angle only: the
    cloud of :data:`CLOUD_MODES` ``"target"`` / ``"margin"`` (see :func:`target_cloud_angles`).

    The margin ``margin_type`` (a registered name or a :class:`~feature_cloud.margins.Margin`)
    modifies the target logit only. Without a cloud (``alpha=None``) these are the logits of
    LEAP Eq. 1 (CosFace, :math:`s(\cos\theta_y - m_c)` on the target) and Eq. 2 (ArcFace,
    :math:`s\cos(\theta_y + m_a)`). With a per-logit cloud angle ``alpha`` ``(B, C)`` they are
    LEAP Eq. 7 / Eq. 8:

    .. math::
        z_{ny} = s(\cos(\theta_{ny} + \alpha_{ny}) - m_c) \;\text{or}\;
        s\cos(\theta_{ny} + \alpha_{ny} + m_a), \qquad
        z_{nj} = s\cos(\theta_{nj} + \alpha_{nj}),\ j \ne y,

    every angle sum clipped to ``[0, pi]``. Labels ``< 0`` mark ignored rows (their target logit
    is left unmodified). Computed in float32 at least, whatever the autocast dtype of ``cos``.
    ``scale`` / ``margin`` default to the margin's (:class:`~feature_cloud.LEAPMarginHead`'s:
    CosFace 24 / 0.2, ArcFace 16 / 0.2 rad).
    """
    rule = _margins.get(margin_type)
    scale = rule.default_scale if scale is None else scale
    margin = rule.default_margin if margin is None else margin
    cos = _at_least_float32(cos)
    index = labels.clamp_min(0).unsqueeze(1)
    cos_y = cos.gather(1, index)
    alpha_y = None
    if alpha is not None and target_alpha is not None:
        raise ValueError("pass alpha (every logit) or target_alpha (target only), not both")
    if target_alpha is not None:
        logits = cos * scale
        alpha_y = target_alpha.to(cos.dtype).unsqueeze(1)
    elif alpha is None:
        logits = cos * scale
    else:
        alpha = alpha.to(cos.dtype)
        logits = shifted_cosine(cos, alpha) * scale
        alpha_y = alpha.gather(1, index)
    target = rule.target(cos_y, alpha_y, margin) * scale
    target = torch.where(labels.unsqueeze(1) >= 0, target, logits.gather(1, index))
    return logits.scatter(1, index, target)


#: Where the cloud enters the logits. ``"paper"``: LEAP Eq. 7-8, an independent angle on each
#: of the ``C`` logits. ``"target"``: the same draw on the target logit only. ``"margin"``: the
#: target angle moves *away* by :math:`|\alpha|` (half-normal): the class's missing spread acts as
#: a per-class extra angular margin and no noise reaches the ``C - 1`` other logits.
CLOUD_MODES = ("paper", "target", "margin")


def target_cloud_angles(
    std: Tensor,
    mode: str,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
) -> Tensor:
    r"""``(B,)`` target-only cloud angles: :math:`\mathrm{std}_n z_n` (``"target"``) or
    :math:`\mathrm{std}_n |z_n|` (``"margin"``), :math:`z_n \sim N(0, 1)` (``noise`` when
    given, e.g. the heads' counter-based draw, else from ``generator``)."""
    if mode not in ("target", "margin"):
        raise ValueError(f"target-only cloud mode must be 'target' or 'margin', got {mode!r}")
    z = (
        noise
        if noise is not None
        else torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
    )
    return (z.abs() if mode == "margin" else z) * std


def margin_cross_entropy(
    logits: Tensor, labels: Tensor, reduction: str = "mean", label_smoothing: float = 0.0
) -> Tensor:
    """Softmax cross-entropy over margin logits; labels ``< 0`` are ignored.

    ``"mean"`` averages over the non-ignored rows and returns 0 (not NaN) when every row is
    ignored or the batch is empty. ``label_smoothing`` as in ``F.cross_entropy`` (targets
    ``1 - eps + eps / C`` and ``eps / C``).
    """
    check_reduction(reduction)
    per_sample = F.cross_entropy(
        logits,
        labels.clamp_min(-1),
        ignore_index=-1,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    return total / (labels >= 0).sum().clamp_min(1)


def angle_noise(
    std: Tensor, num_classes: int, generator: Optional[torch.Generator] = None
) -> Tensor:
    r"""Per-logit cloud angles :math:`\alpha_n \in \mathbb{R}^{1\times C}` of LEAP Sec. 3.4.

    Row ``n`` is drawn i.i.d. from :math:`N(0, \mathrm{std}_n^2)`; a row with ``std = 0`` (a class
    without cloud) is exactly zero. ``std`` is ``(B,)`` float32 on the target device.
    """
    noise = torch.randn(
        (std.shape[0], num_classes), generator=generator, device=std.device, dtype=std.dtype
    )
    return noise.mul_(std.unsqueeze(1))


def metric_l2(embeddings: Tensor, weight: Tensor, reduction: str = "mean") -> Tensor:
    r"""m-L2 regulariser of FTL Eq. 3, :math:`\mathcal{L}_{reg} = \|W^T f\|_2^2`.

    ``weight`` is ``(C, D)``; the squared norm of the raw (unnormalised) logit vector of each
    sample, averaged over the batch (``reduction="mean"``) or summed.
    """
    return metric_l2_from_logits(F.linear(embeddings, weight), reduction)


def metric_l2_from_logits(logits: Tensor, reduction: str = "mean") -> Tensor:
    r"""FTL Eq. 3 from already computed raw logits :math:`W^T f` ``(B, C)`` (saves a GEMM)."""
    check_reduction(reduction)
    per_sample = _at_least_float32(logits).pow(2).sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.sum() / max(per_sample.shape[0], 1)


# --------------------------------------------------------------------------------------------
# Class statistics (LEAP Sec. 3.3-3.4)
# --------------------------------------------------------------------------------------------


def batch_class_means(
    features: Tensor, labels: Tensor, features_max: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """For each sample, the mean feature of its class within the batch, and that class's count.

    Returns ``(means (B, D), counts (B,))``. Rows with ``labels < 0`` get count 0 and mean 0.
    Uses a ``B x B`` same-label matrix, so it costs ``O(B^2 D)`` whatever the number of classes.
    ``features_max``: the rows' max-abs ``(B, 1)`` where the caller has it (as
    :func:`angles_to_centers`), spared a second pass over the features.
    """
    valid = labels >= 0
    same = (labels.unsqueeze(0) == labels.unsqueeze(1)) & valid.unsqueeze(0) & valid.unsqueeze(1)
    counts = same.sum(dim=1)
    # summed at the batch's power-of-two scale (exact: the same means bit for bit), so that
    # huge finite features (norm ~1e37 in float32) do not overflow the sum to inf
    # (2**(e - 1) <= max-abs < 2**e: 2**e itself overflows at float32's top exponent)
    top = (features.abs() if features_max is None else features_max).amax()
    scale = torch.exp2(torch.frexp(top).exponent.to(features.dtype) - 1)
    means = same.to(features.dtype) @ (features / scale)
    return means / counts.clamp_min(1).unsqueeze(1).to(features.dtype) * scale, counts


def center_rate(gamma: float, appearances: Tensor, adaptive: bool = True) -> Tensor:
    r"""Per-row center learning rate: :math:`\max(\gamma, 1/n)` at a class's ``n``-th appearance.

    With ``adaptive=False`` the constant :math:`\gamma` of LEAP Sec. 4.1 (the first appearance
    still initialises the center, see :func:`ema_centers`). The adaptive rate makes the center
    the running mean of the class's first :math:`1/\gamma` batch means and an EMA after that: a
    tail class seen a few times an epoch otherwise keeps most of the weight of its first batch
    for many epochs (after ``n`` appearances the first one still weighs :math:`(1-\gamma)^{n-1}`),
    which biases its angles. ``appearances`` ``(N,)`` counts this appearance (``>= 1``).
    Returns float ``(N, 1)``.
    """
    n = appearances.clamp_min(1).to(torch.float32).unsqueeze(1)
    if not adaptive:
        return torch.full_like(n, float(gamma))
    return torch.clamp(1.0 / n, min=float(gamma))


def ema_centers(
    old: Tensor, batch_mean: Tensor, initialized: Tensor, gamma: Union[float, Tensor]
) -> Tensor:
    r"""EMA class-center update of LEAP Eq. 4 with :math:`\gamma` the *center learning rate*.

    .. math:: c_i \leftarrow (1-\gamma)\, c_i + \gamma\, \bar f_i^{\text{batch}}

    The printed Eq. 4 has the two weights swapped; Sec. 4.1 calls :math:`\gamma = 0.1` "the
    learning rate of class center", i.e. the weight of the *current* batch. Read literally, the
    center would be almost the batch mean, defeating its purpose (resisting mislabelled samples)
    and biasing small classes' angles towards zero. A class not yet initialised takes the batch
    mean. All arguments are rows for the same classes (``(N, D)``, ``(N, D)``, ``(N,)`` bool);
    ``gamma`` may be a per-row rate ``(N, 1)`` (:func:`center_rate`).
    """
    if isinstance(gamma, Tensor):
        gamma = gamma.to(old.dtype)
    ema = torch.lerp(old, batch_mean, gamma)
    return torch.where(initialized.unsqueeze(1), ema, batch_mean)


def angles_to_centers(
    features: Tensor, centers: Tensor, features_max: Optional[Tensor] = None
) -> Tensor:
    r"""LEAP Eq. 3: :math:`\beta = \arccos(f \cdot c / \|f\|\|c\|)` row by row (``(N, D)`` each).

    Evaluated as :math:`2\,\mathrm{atan2}(\|\hat f - \hat c\|, \|\hat f + \hat c\|)`, which equals
    the arccos but stays accurate for small angles (``acos`` of a float32 cosine near 1 loses
    ~4e-4 rad, as much as the spread of a tight class). ``features_max``: the features'
    per-row max-abs ``(N, 1)`` where the caller has it (:func:`_normalize_by_max`).
    """
    if features_max is None:
        f = safe_normalize(features, dim=1, eps=1e-12)
    else:
        f = _normalize_by_max(features, features_max, dim=1, eps=1e-12)
    c = safe_normalize(centers, dim=1, eps=1e-12)
    return 2.0 * torch.atan2((f - c).norm(dim=1), (f + c).norm(dim=1))


def ring_slots(
    labels: Tensor, offsets: Tensor, capacity: Tensor, pointer: Tensor, trash: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """Slots of a flat per-class ring memory (LEAP Eq. 5) for one batch, fully vectorised.

    Class ``i`` owns ``memory[offsets[i] : offsets[i] + capacity[i]]`` and writes at
    ``pointer[i]``. Sample ``n`` of class ``y`` with rank ``r`` among its class in the batch goes to
    ``offsets[y] + (pointer[y] + r) % capacity[y]``. When a batch holds more samples of a class than
    its capacity, only the last ``capacity`` of them are written; the others (and ignored labels)
    go to the ``trash`` slot. Returns ``(slots (B,), keep (B,) bool, per-sample class count (B,))``.
    """
    valid = labels >= 0
    y = labels.clamp_min(0)
    # rank of each sample among the samples of its class in the batch, by a stable sort
    key = torch.where(valid, y, torch.full_like(y, -1))
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    first = torch.searchsorted(sorted_key, sorted_key, right=False)
    last = torch.searchsorted(sorted_key, sorted_key, right=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=labels.device) - first
    count = torch.empty_like(order)
    count[order] = last - first
    cap = capacity[y]
    keep = valid & (rank >= count - cap)
    slot = offsets[y] + (pointer[y] + rank) % cap
    slot = torch.where(keep, slot, torch.full_like(slot, trash))
    return slot, keep, count


def angle_moments(
    angle_sum: Tensor, angle_sqsum: Tensor, fill: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Per-class mean :math:`\mu_i` and unbiased variance :math:`\sigma_i^2` of the angle memory.

    From float64 running sums over the ``fill`` valid entries. Returns float32
    ``(mean, var, has_stats)``; classes with fewer than two angles have ``var = 0`` and
    ``has_stats = False``.
    """
    n = fill.to(angle_sum.dtype)
    mean = angle_sum / n.clamp_min(1)
    var = (angle_sqsum - angle_sum * mean) / (n - 1).clamp_min(1)
    has_stats = fill >= 2
    var = torch.where(has_stats, var.clamp_min(0), torch.zeros_like(var))
    return mean.float(), var.float(), has_stats


def masked_angle_moments(
    memory: Tensor, owner: Tensor, valid: Tensor, num_classes: int
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`angle_moments` of the memory slots with ``valid`` set (e.g. not older than an age).

    ``memory``, ``owner`` (class of each slot) and ``valid`` are ``(M,)``; one pass of
    ``index_add`` over the memory (float64 sums), no host sync.
    """
    w = valid.to(torch.float64)
    a = memory.to(torch.float64) * w
    total = torch.zeros(num_classes, dtype=torch.float64, device=memory.device)
    fill = torch.zeros(num_classes, dtype=torch.long, device=memory.device)
    fill.index_add_(0, owner, valid.long())
    s1 = total.index_add(0, owner, a)
    s2 = total.index_add(0, owner, a * memory.to(torch.float64))
    return angle_moments(s1, s2, fill)


#: What a class whose angle variance is not known yet (fewer than two stored angles) gets:
#: ``"tail_prior"`` the pooled variance only if its memory can never hold two angles (a one-shot
#: class with ``K_i * P < 2``: its observed spread is zero, the paper's premise), else no cloud
#: until two angles are stored; ``"pooled"`` the pooled variance for every such class (the
#: behaviour of the 0.1.0 release, head classes included); ``"none"`` never a cloud.
UNKNOWN_VARIANCE = ("tail_prior", "pooled", "none")
#: the default :data:`UNKNOWN_VARIANCE` policy
DEFAULT_UNKNOWN_VARIANCE = "tail_prior"


def unknown_variance_prior(
    policy: str, has_stats: Tensor, capacity: Tensor, class_counts: Tensor
) -> Tensor:
    """``(C,)`` bool: classes without statistics that take the prior (as if ``sigma_i^2 = 0``).

    See :data:`UNKNOWN_VARIANCE` for ``policy``. Classes with ``K_i = 0`` never take it.
    """
    if policy not in UNKNOWN_VARIANCE:
        raise ValueError(f"unknown_variance must be one of {UNKNOWN_VARIANCE}, got {policy!r}")
    unknown = ~has_stats & (class_counts > 0)
    if policy == "pooled":
        return unknown
    if policy == "none":
        return torch.zeros_like(unknown)
    return unknown & (capacity < 2)


def vanilla_cloud_variance(
    var: Tensor,
    has_stats: Tensor,
    class_counts: Tensor,
    threshold: int,
    prior: Optional[Tensor] = None,
) -> Tensor:
    r"""Vanilla LEAP (Sec. 3.4, Eq. 6): head classes have ``K_i > T``.

    :math:`\sigma_h^2` is the mean variance over head classes (with statistics); every tail class
    gets cloud variance :math:`\max(\sigma_h^2 - \sigma_t^2, 0)`, head classes get 0.
    A class without statistics gets a cloud only if ``prior`` marks it (then with
    :math:`\sigma_t^2 = 0`); ``prior=None`` marks every class without statistics.
    """
    head = class_counts > threshold
    use = head & has_stats
    sigma_h2 = (var * use).sum() / use.sum().clamp_min(1)
    prior = ~has_stats if prior is None else prior
    cloud = has_stats | prior
    out = torch.where(head, torch.zeros_like(var), (sigma_h2 - var).clamp_min(0))
    return torch.where(cloud, out, torch.zeros_like(out))


def full_cloud_variance(
    var: Tensor, has_stats: Tensor, class_counts: Tensor, prior: Optional[Tensor] = None
) -> Tensor:
    r"""Full LEAP (Sec. 3.4, Eq. 9): pooled :math:`\sigma^2 = \sum_i (K_i-1)\sigma_i^2 / \sum_i (K_i-1)`.

    A class with :math:`\sigma_i^2 < \sigma^2` gets cloud variance :math:`\sigma^2 - \sigma_i^2`.
    Classes without statistics yet do not enter the pooled sum; they get a cloud only if
    ``prior`` marks them (then :math:`\sigma^2`); ``prior=None`` marks all of them.
    """
    w = (class_counts.to(var.dtype) - 1).clamp_min(0) * has_stats
    sigma2 = (w * var).sum() / w.sum().clamp_min(1e-12)
    prior = ~has_stats if prior is None else prior
    out = (sigma2 - var).clamp_min(0)
    return torch.where(has_stats | prior, out, torch.zeros_like(out))


def check_cloud_rule(
    rule: Optional[str], optional: bool = True, name: str = "cloud"
) -> Optional[str]:
    """``rule`` if it is one of :data:`CLOUD_RULES` (or ``None`` where ``optional``: no cloud),
    else ``ValueError`` naming them and the argument ``name`` (the heads' ``cloud``,
    :class:`~feature_cloud.FeatureCloud`'s and this module's ``rule``)."""
    if (rule is None and optional) or rule in CLOUD_RULES:
        return rule
    choices = f"{CLOUD_RULES} or None" if optional else f"{CLOUD_RULES}"
    raise ValueError(f"{name} must be one of {choices}, got {rule!r}")


def cloud_variance(
    rule: str,
    var: Tensor,
    has_stats: Tensor,
    class_counts: Tensor,
    threshold: int = 20,
    prior: Optional[Tensor] = None,
) -> Tensor:
    """Dispatch to :func:`full_cloud_variance` or :func:`vanilla_cloud_variance` by ``rule``."""
    if check_cloud_rule(rule, optional=False, name="rule") == "full":
        return full_cloud_variance(var, has_stats, class_counts, prior)
    return vanilla_cloud_variance(var, has_stats, class_counts, threshold, prior)


def center_prototypes(
    weight: Tensor,
    centers: Tensor,
    initialized: Tensor,
    class_counts: Tensor,
    shrinkage: float,
    sub_centers: int = 1,
    *,
    min_count: int = 1,
) -> Tensor:
    r"""Inference prototypes shrunk towards the class centers (not in the papers; README, "Real
    faces"):

    .. math:: p_i = \frac{(1-\lambda_i)\,\hat w_i + \lambda_i\,\hat c_i}
              {\|(1-\lambda_i)\,\hat w_i + \lambda_i\,\hat c_i\|},\qquad
              \lambda_i = \frac{\kappa}{\kappa + K_i}\;(K_i \ge \texttt{min\_count}),
              \quad 0 \text{ otherwise}

    with :math:`\hat w_i` the normalised class weight, :math:`\hat c_i` the normalised LEAP center
    (Eq. 4) and :math:`\kappa` = ``shrinkage``. A class seen a few times an epoch gets its weight
    pushed away from every other class's features by the softmax's negative gradients and pulled
    back by its own few samples only, so its weight ends up off its features' mean direction;
    its center is that mean. Classes with many samples keep (nearly) their weight; classes whose
    center is not ``initialized``, or with fewer than ``min_count`` samples (a center of one
    sample is that sample, not a mean), keep it exactly. ``weight`` ``(sub_centers * C, D)`` (every
    sub-center row leans towards its class center), ``centers`` ``(C, D)``, ``initialized``
    ``(C,)`` bool, ``class_counts`` ``(C,)``. Computed in float32 (at least), returned in
    ``weight.dtype``; differentiable in ``weight``.
    """
    w = safe_normalize(_at_least_float32(weight), dim=1)
    c = safe_normalize(centers.to(w.dtype), dim=1)
    k = class_counts.to(w.dtype).clamp_min(0)
    lam = float(shrinkage) / (float(shrinkage) + k).clamp_min(1e-12)  # kappa = 0: the weights
    lam = torch.where(initialized & (k >= min_count), lam, torch.zeros_like(lam))
    if sub_centers > 1:
        lam = lam.repeat_interleave(sub_centers)
        c = c.repeat_interleave(sub_centers, dim=0)
    lam = lam.unsqueeze(1)
    return safe_normalize((1.0 - lam) * w + lam * c, dim=1).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# FTL: feature transfer (Yin et al. 2019)
# --------------------------------------------------------------------------------------------
# The pieces of FTL Sec. 3.3 and of UpdateStats() / Transfer() in Algorithm 1. The stateful side
# (buffers, the two passes over the data) lives in :class:`feature_cloud.FeatureTransfer`.

__all__ += [
    "ftl_regular_classes",
    "ftl_center_sums",
    "ftl_centers",
    "ftl_residual_scatter",
    "ftl_center_distances",
    "ftl_class_mean",
    "ftl_hard_mask",
    "ftl_num_components",
    "ftl_pca_basis",
    "feature_transfer",
    "RECON_REDUCTIONS",
    "DEFAULT_RECON_REDUCTION",
    "check_recon_reduction",
    "reconstruction_loss",
]

#: reductions of FTL's reconstruction loss (:func:`reconstruction_loss`): ``"mean"`` over every
#: element of the batch, or ``"paper"``, Eq. 1 per sample (a sum over its elements), averaged
#: over the batch like Eq. 2-3
RECON_REDUCTIONS = ("mean", "paper")
#: the default :data:`RECON_REDUCTIONS`: ``"mean"``, Eq. 1 divided by the elements of a sample
#: (``C * H * W``), which keeps ``alpha_recon = 1`` from drowning Eq. 2-3 (README, "Defaults
#: that differ from the paper")
DEFAULT_RECON_REDUCTION = "mean"


def ftl_regular_classes(class_counts: Tensor, threshold: int = 20) -> Tensor:
    """Regular-class mask of FTL Sec. 4: a class with no more than ``threshold`` images is long-tail.

    ``class_counts`` ``(C,)`` -> bool ``(C,)``, ``True`` where ``count > threshold`` (paper: 20).
    """
    return class_counts > threshold


def ftl_center_sums(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    flipped: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""One batch's contribution to the class centers of FTL Eq. 5, in float64.

    .. math:: \mathbf{c}_i = \frac{1}{2|\Omega_i|}\sum_{k\in\Omega_i}(\mathbf{g}_{ik} + \bar{\mathbf{g}}_{ik})

    Returns ``(sums (C, D), weights (C,))`` so that ``sums / weights`` summed over batches is the
    center: each kept sample adds ``g + g_flip`` with weight 2 (or ``g`` with weight 1 when
    ``flipped`` is ``None``). ``keep`` ``(B,)`` bool is the quality filter :math:`\Omega` (paper:
    yaw below :math:`\tau`); ``None`` keeps every sample. Labels ``< 0`` are ignored.
    """
    valid = labels >= 0
    if keep is not None:
        valid = valid & keep.to(torch.bool)
    x = features.to(torch.float64)
    weight = 1.0
    if flipped is not None:
        x = x + flipped.to(torch.float64)
        weight = 2.0
    w = valid.to(torch.float64)
    y = labels.clamp_min(0)
    sums = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, y, x * w.unsqueeze(1))
    weights = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    weights.index_add_(0, y, w * weight)
    return sums, weights


def ftl_centers(sums: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
    """Centers ``sums / weights`` (FTL Eq. 5) and the mask of classes that have one (``weights > 0``).

    Classes without any kept sample get a zero center and ``False``.
    """
    has = weights > 0
    centers = sums / weights.clamp_min(1e-300).unsqueeze(1)
    return torch.where(has.unsqueeze(1), centers, torch.zeros_like(centers)), has


def ftl_residual_scatter(
    features: Tensor, labels: Tensor, centers: Tensor, regular: Tensor
) -> Tuple[Tensor, Tensor]:
    r"""One batch's intra-class scatter :math:`\sum_k \mathbf{r}_k\mathbf{r}_k^T`, float64 ``(D, D)``.

    :math:`\mathbf{r}_k = \mathbf{g}_k - \mathbf{c}_{y_k}` over the samples of regular classes (the
    ``V`` of UpdateStats in Algorithm 1); samples of long-tail classes and labels ``< 0`` add
    nothing. Returns ``(scatter, count)``; the covariance is ``sum(scatter) / sum(count)``.
    Residuals are formed from the final centers before squaring, so the float64 sum has no
    catastrophic cancellation (unlike :math:`\sum gg^T - n\,cc^T`).
    """
    y = labels.clamp_min(0)
    use = (labels >= 0) & regular[y]
    r = (features.to(torch.float64) - centers[y].to(torch.float64)) * use.unsqueeze(1)
    return r.T @ r, use.sum()


def ftl_center_distances(features: Tensor, labels: Tensor, centers: Tensor) -> Tensor:
    r""":math:`\|\mathbf{g}_k - \mathbf{c}_{y_k}\|_2` per sample (UpdateStats, Algorithm 1), float64."""
    y = labels.clamp_min(0)
    return torch.linalg.vector_norm(
        features.to(torch.float64) - centers[y].to(torch.float64), dim=1
    )


def ftl_class_mean(
    values: Tensor, labels: Tensor, num_classes: int, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Per-class sums of ``values`` ``(N,)`` and counts, as ``(sums (C,), counts (C,))`` float64.

    Summed over batches and divided, this is the per-class mean (e.g. the mean distance ``d`` of
    UpdateStats). ``mask`` selects samples; labels ``< 0`` are ignored.
    """
    use = labels >= 0
    if mask is not None:
        use = use & mask
    w = use.to(torch.float64)
    y = labels.clamp_min(0)
    sums = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    sums.index_add_(0, y, values.to(torch.float64) * w)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    counts.index_add_(0, y, w)
    return sums, counts


def ftl_hard_mask(
    distances: Tensor, labels: Tensor, mean_distance: Tensor, regular: Tensor
) -> Tensor:
    r"""Hard samples of UpdateStats (Algorithm 1): regular-class samples with
    :math:`\|\mathbf{g}_{ij} - \mathbf{c}_i\|_2 > d_i`, :math:`d_i` the class's mean distance.
    """
    y = labels.clamp_min(0)
    return (labels >= 0) & regular[y] & (distances > mean_distance[y])


def ftl_num_components(eigenvalues: Tensor, energy: float) -> int:
    """Smallest ``k`` whose top-``k`` eigenvalues hold at least ``energy`` of the total (paper:
    150 of 320 components keep 95%). ``eigenvalues`` sorted descending; a one-off host read.
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    lam = eigenvalues.clamp_min(0).to(torch.float64)
    total = lam.sum()
    if float(total) <= 0.0:
        return 1
    cum = torch.cumsum(lam, 0) / total
    # a tiny tolerance so that energy=1.0 does not ask for components of rounding-level variance
    k = int(
        torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype, device=cum.device))
    )
    return min(k + 1, lam.numel())


def ftl_pca_basis(
    covariance: Tensor, num_components: Optional[int] = None, energy: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    r"""PCA basis :math:`\mathbf{Q}` ``(D, k)`` of the regular classes' intra-class covariance (FTL
    Sec. 3.3) and all eigenvalues ``(D,)``, both sorted by decreasing eigenvalue.

    Give exactly one of ``num_components`` (top-``k``) or ``energy`` (smallest ``k`` reaching that
    fraction, :func:`ftl_num_components`). Solved with ``torch.linalg.eigh`` in float64; each
    eigenvector's sign is fixed (largest-magnitude entry positive) so the basis is reproducible.
    """
    if (num_components is None) == (energy is None):
        raise ValueError("give exactly one of num_components or energy")
    d = covariance.shape[0]
    if covariance.dim() != 2 or covariance.shape[1] != d:
        raise ValueError(f"covariance must be square (D, D), got {tuple(covariance.shape)}")
    cov = covariance.to(torch.float64)
    cov = 0.5 * (cov + cov.T)
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0), evecs.flip(1)
    pivot = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs.gather(0, pivot.unsqueeze(0)))
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    if num_components is not None:
        k = int(num_components)
        if not 1 <= k <= d:
            raise ValueError(f"num_components must be in [1, D={d}], got {k}")
    else:
        k = ftl_num_components(evals, float(energy))  # type: ignore[arg-type]
    return evecs[:, :k], evals


def feature_transfer(
    g_regular: Tensor, y_regular: Tensor, y_tail: Tensor, centers: Tensor, basis: Tensor
) -> Tensor:
    r"""Center-based feature transfer, FTL Eq. 6:

    .. math:: \tilde{\mathbf{g}}_{ik} = \mathbf{c}_i + \mathbf{Q}\mathbf{Q}^T(\mathbf{g}_{jk} - \mathbf{c}_j)

    row by row, with :math:`j` = ``y_regular[k]`` (the class of the regular sample
    ``g_regular[k]``) and :math:`i` = ``y_tail[k]`` (the long-tail class that receives it).
    Note: the Transfer() box of Algorithm 1 swaps the two center indices (it adds the *regular*
    center and subtracts the *tail* one); that would produce a regular-class feature, so this
    follows Eq. 6 (and the appendix's ``g_12 = c_2 + QQ^T(g_1 - c_1)``).

    Batched, differentiable w.r.t. ``g_regular``; ``centers`` ``(C, D)``, ``basis`` ``(D, k)``.
    Computed in float32 at least, also under autocast (bf16 centers and basis cost ~1 % of the
    residual), and returned in the dtype of ``g_regular``.
    """
    dtype = g_regular.dtype
    compute = torch.promote_types(dtype, torch.float32)
    with torch.autocast(device_type=g_regular.device.type, enabled=False):
        c = centers.to(compute)
        q = basis.to(compute)
        residual = g_regular.to(compute) - c[y_regular]
        return (c[y_tail] + (residual @ q) @ q.T).to(dtype)


def check_recon_reduction(reduction: Any) -> str:
    """``reduction`` if it is one of :data:`RECON_REDUCTIONS`, else ``ValueError`` naming them."""
    if not isinstance(reduction, str) or reduction not in RECON_REDUCTIONS:
        raise ValueError(
            f"recon_reduction must be one of {RECON_REDUCTIONS} ('mean': per element, the "
            f"default; 'paper': FTL Eq. 1 per sample, averaged over the batch), got {reduction!r}"
        )
    return reduction


def reconstruction_loss(
    reconstruction: Tensor, inputs: Tensor, reduction: str = DEFAULT_RECON_REDUCTION
) -> Tensor:
    r"""Reconstruction loss of FTL Eq. 1, :math:`\mathcal{L}_{recon} = \|\mathbf{x}' - \mathbf{x}\|_2^2`.

    ``reduction="paper"``: the squared norm of each sample's error (summed over its elements),
    averaged over the batch; ``"mean"``: the mean over every element, i.e. the paper's value
    divided by the number of elements of a sample. Computed in float32 (also for float64 or
    half-precision inputs, as ``FTLModel`` always has).
    """
    check_recon_reduction(reduction)
    if reconstruction.shape != inputs.shape:
        raise ValueError(
            f"the reconstruction has shape {tuple(reconstruction.shape)}, the inputs "
            f"{tuple(inputs.shape)}: the decoder must reproduce the input's shape"
        )
    if reduction == "mean":
        return F.mse_loss(reconstruction.float(), inputs.float())
    return (reconstruction.float() - inputs.float()).pow(2).flatten(1).sum(dim=1).mean()
