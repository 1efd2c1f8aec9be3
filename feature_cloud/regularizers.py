"""``MetricL2``: the m-L2 regulariser of FTL (Eq. 3)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import functional as FC
from ._validation import (
    as_float,
    check_embeddings,
    check_labels,
    check_reduction,
    checked_attribute,
    migrate_checked,
    warn_user,
)

__all__ = ["MetricL2", "warn_metric_l2_with_margin"]


class MetricL2(nn.Module):
    r"""m-L2 regulariser, FTL Eq. 3: :math:`\alpha_{reg}\,\|W^T f\|_2^2`, averaged over the batch.

    Regularises features and classifier weights *jointly* through the magnitude of their inner
    products instead of penalising each norm alone. FTL's total loss (Eq. 4) uses
    ``alpha = 0.25``.

    ``forward(embeddings, classifier)`` takes the classifier as a ``(C, D)`` weight tensor or any
    module with such a ``.weight`` (``nn.Linear``, :class:`~feature_cloud.LEAPMarginHead`).
    When the raw logits are already computed, :meth:`from_logits` saves the GEMM.

    With ``labels``, rows labelled ``< 0`` (ignored, as in the classification loss) are left out:
    ``"mean"`` averages over the valid rows only, ``"sum"`` sums them, ``"none"`` gives 0 for the
    ignored rows. Without ``labels`` every row counts.

    Args:
        alpha: :math:`\alpha_{reg}` (FTL: 0.25), finite and ``>= 0``.
        reduction: over the rows: ``"mean"`` (default), ``"sum"`` or ``"none"`` (per row).
    """

    def __init__(self, alpha: float = 0.25, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction  # checked: one of "mean", "sum", "none"
        self.alpha = alpha  # checked: finite, >= 0

    alpha = checked_attribute(
        "alpha",
        lambda _, value: as_float(value, "alpha", minimum=0.0),
        r":math:`\alpha_{reg}`; settable, checked (finite, ``>= 0``: NaN gave a NaN loss).",
    )
    reduction = checked_attribute(
        "reduction",
        lambda _, value: check_reduction(value),
        'Over the rows: ``"mean"``, ``"sum"`` or ``"none"``; settable, checked (another value '
        'acted as ``"mean"``).',
    )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases held the settings as plain attributes."""
        super().__setstate__(migrate_checked(state, ("alpha", "reduction")))  # type: ignore[no-untyped-call]

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(
            self,
            embeddings: Tensor,
            classifier: Union[Tensor, nn.Module],
            labels: Optional[Tensor] = None,
        ) -> Tensor: ...

    def forward(
        self,
        embeddings: Tensor,
        classifier: Union[Tensor, nn.Module],
        labels: Optional[Tensor] = None,
    ) -> Tensor:
        """``alpha * ||W^T f||^2`` of ``embeddings`` ``(B, D)`` against the classifier's
        ``(C, D)`` weight (or the weight itself), reduced over the rows (labels ``< 0`` left
        out)."""
        weight = (
            classifier if isinstance(classifier, Tensor) else getattr(classifier, "weight", None)
        )
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                "classifier must be a (num_classes, embedding_size) tensor or a module with such "
                f"a .weight, got {type(classifier).__name__}"
            )
        check_embeddings(embeddings, weight.shape[1])
        if embeddings.dtype != weight.dtype:
            # half embeddings against a float32 W outside autocast: in the wider dtype, not
            # torch's "expected m1 and m2 to have the same dtype" (autocast's GEMM casts anyway)
            common = torch.promote_types(embeddings.dtype, weight.dtype)
            embeddings, weight = embeddings.to(common), weight.to(common)
        if labels is None:
            return self.alpha * FC.metric_l2(embeddings, weight, self.reduction)
        self._check_labels(labels, embeddings.shape[0])
        return self.alpha * self._masked(FC.metric_l2(embeddings, weight, "none"), labels)

    def from_logits(self, logits: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """The regulariser from raw logits :math:`W^T f` ``(B, C)``."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (batch, num_classes), got {tuple(logits.shape)}")
        if not logits.is_floating_point():
            raise TypeError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
        if labels is None:
            return self.alpha * FC.metric_l2_from_logits(logits, self.reduction)
        self._check_labels(labels, logits.shape[0])
        return self.alpha * self._masked(FC.metric_l2_from_logits(logits, "none"), labels)

    @staticmethod
    def _check_labels(labels: Tensor, batch: int) -> None:
        """The package's one label policy (:func:`~feature_cloud._validation.check_labels`):
        an integer tensor of shape ``(batch,)`` (bool labels refused, as everywhere else)."""
        check_labels(labels, batch)

    def _masked(self, per_sample: Tensor, labels: Tensor) -> Tensor:
        valid = (labels >= 0).to(per_sample.device)
        per_sample = per_sample.masked_fill(
            ~valid, 0.0
        )  # ignored rows contribute exactly 0 (even if not finite)
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        # mean over the valid rows (no host sync: the count stays on the device)
        return per_sample.sum() / valid.sum().clamp_min(1).to(per_sample.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"


def as_metric_l2(
    value: Union[None, float, MetricL2], reduction: str = "mean", name: str = "metric_l2"
) -> Optional[MetricL2]:
    """An adapter's ``metric_l2`` option: ``None`` (off), an ``alpha`` or a :class:`MetricL2`
    (its ``alpha``), as a :class:`MetricL2` of the adapter's ``reduction``."""
    if value is None:
        return None
    if isinstance(value, MetricL2):
        return MetricL2(value.alpha, reduction=reduction)
    alpha: Optional[float] = None
    if not isinstance(value, (bool, str, bytes)):
        try:  # any real number: numpy scalars, one-element tensors (hyper-parameter sweeps)
            alpha = float(value)
        except (TypeError, ValueError):
            alpha = None
    if alpha is None:
        raise TypeError(
            f"{name} must be None, a float alpha or a MetricL2, got {type(value).__name__}"
        )
    return MetricL2(alpha, reduction=reduction)


def warn_metric_l2_with_margin(owner: str, option: str, alpha: float) -> None:
    """Warn when m-L2 (``option`` = ``alpha`` > 0) is on with a cosine-margin loss (``owner``
    normalises ``W`` and ``f``): FTL's term is for a linear softmax; here it only shrinks the
    norms and, at the raw features' scale (e.g. PML's default ``W`` init), can outweigh the
    margin loss by orders of magnitude."""
    if alpha > 0:
        warn_user(
            f"{owner} normalises W and f, so the m-L2 term ({option} > 0, FTL Eq. 3 on the raw "
            "||W^T f||^2) only shrinks their norms and, at the raw features' scale, can outweigh "
            f"the margin loss; consider {option}=0 with a margin head"
        )
