"""``MetricL2``: the m-L2 regulariser of FTL (Eq. 3)."""
from __future__ import annotations

from typing import Union

from torch import Tensor, nn

from . import functional as FC
from ._validation import as_float, check_embeddings

__all__ = ["MetricL2"]


class MetricL2(nn.Module):
    r"""m-L2 regulariser, FTL Eq. 3: :math:`\alpha_{reg}\,\|W^T f\|_2^2`, averaged over the batch.

    Regularises features and classifier weights *jointly* through the magnitude of their inner
    products instead of penalising each norm alone. FTL's total loss (Eq. 4) uses
    ``alpha = 0.25``.

    ``forward(embeddings, classifier)`` takes the classifier as a ``(C, D)`` weight tensor or any
    module with such a ``.weight`` (``nn.Linear``, :class:`~feature_cloud.LEAPMarginHead`).
    When the raw logits are already computed, :meth:`from_logits` saves the GEMM.
    """

    def __init__(self, alpha: float = 0.25, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.alpha = as_float(alpha, "alpha", minimum=0.0)
        self.reduction = reduction

    def forward(self, embeddings: Tensor, classifier: Union[Tensor, nn.Module]) -> Tensor:
        weight = classifier if isinstance(classifier, Tensor) else getattr(classifier, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                "classifier must be a (num_classes, embedding_size) tensor or a module with such "
                f"a .weight, got {type(classifier).__name__}"
            )
        check_embeddings(embeddings, weight.shape[1])
        return self.alpha * FC.metric_l2(embeddings, weight, self.reduction)

    def from_logits(self, logits: Tensor) -> Tensor:
        """The regulariser from raw logits :math:`W^T f` ``(B, C)``."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be (batch, num_classes), got {tuple(logits.shape)}")
        return self.alpha * FC.metric_l2_from_logits(logits, self.reduction)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, reduction={self.reduction!r}"
