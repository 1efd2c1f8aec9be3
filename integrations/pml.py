"""pytorch-metric-learning adapter: :class:`LEAPLoss`, a drop-in for ``CosFaceLoss`` / ``ArcFaceLoss``.

The swap is one line::

    loss_func = losses.CosFaceLoss(num_classes, embedding_size, margin=0.35, scale=64)
    loss_func = LEAPLoss(num_classes, embedding_size, margin=0.35, scale=64, cloud="full",
                         class_counts=counts)

Every keyword follows PML's own convention: the ArcFace margin is in **degrees** (PML's default
28.6), the CosFace margin is a cosine; ``W`` is a ``(embedding_size, num_classes)`` parameter
initialised by ``weight_init_func`` and regularised by ``weight_regularizer`` exactly like PML's
``CosFaceLoss.W``; ``reducer``, ``distance`` (cosine only), miners' ``indices_tuple``,
``get_logits`` and ``utils.distributed.DistributedLossWrapper`` work as for the PML losses.

No math lives here: the cloud (statistics update, LEAP Eq. 3-6/9; noise, Sec. 3.4) and the margin
logits (Eq. 1-2, 7-8) come from :class:`feature_cloud.LEAPMarginHead`, the cross-entropy and the
m-L2 term (FTL Eq. 3) from :mod:`feature_cloud.functional` / :class:`feature_cloud.MetricL2`.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from feature_cloud import functional as FC
from feature_cloud.heads import LEAPMarginHead
from feature_cloud.regularizers import MetricL2

__all__ = ["LEAPLoss", "PML_DEFAULT_MARGIN", "PML_DEFAULT_SCALE"]

#: PML's defaults: ``CosFaceLoss(margin=0.35, scale=64)``, ``ArcFaceLoss(margin=28.6 deg, scale=64)``.
PML_DEFAULT_MARGIN = {"cosface": 0.35, "arcface": 28.6}
PML_DEFAULT_SCALE = {"cosface": 64.0, "arcface": 64.0}


class LEAPLoss(WeightRegularizerMixin, BaseMetricLossFunction):
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
            ``"arcface"`` (default 28.6).
        scale: ``s`` (PML default 64).
        margin_type: ``"cosface"`` or ``"arcface"``.
        cloud: ``"full"`` (LEAP Eq. 9), ``"vanilla"`` (Eq. 6) or ``None`` (plain CosFace/ArcFace).
        tail_threshold, gamma, memory_per_sample, warmup_steps, class_counts, seed, validate:
            as in :class:`feature_cloud.LEAPMarginHead` (``class_counts`` are the per-class sample
            counts ``K_i`` of the training set; without them ``warmup_steps`` must cover an epoch
            so they can be counted online).
        metric_l2: ``None``, an ``alpha`` (float) or a :class:`feature_cloud.MetricL2`. Adds the
            m-L2 regulariser of FTL Eq. 3, :math:`\alpha\|W^T f\|^2`, as a second sub-loss
            ``"metric_l2_loss"`` (per element, so PML reducers apply). PML's regularisers see
            either the embeddings or the weights; m-L2 needs both, so it lives in the loss.
        **kwargs: PML's ``weight_regularizer``, ``weight_reg_weight``, ``weight_init_func``,
            ``embedding_regularizer``, ``embedding_reg_weight``, ``reducer``, ``distance``,
            ``collect_stats``.

    The class statistics are buffers of ``self.head`` (saved in ``state_dict()`` with ``W``).
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: Optional[float] = None,
        scale: Optional[float] = None,
        margin_type: str = "cosface",
        cloud: Optional[str] = "full",
        tail_threshold: int = 20,
        gamma: float = 0.1,
        memory_per_sample: int = 1,
        warmup_steps: int = 0,
        class_counts: Optional[Union[Tensor, Sequence[int]]] = None,
        seed: Optional[int] = None,
        validate: bool = True,
        metric_l2: Union[None, float, MetricL2] = None,
        **kwargs: Any,
    ) -> None:
        if margin_type not in FC.MARGIN_TYPES:
            raise ValueError(f"margin_type must be one of {FC.MARGIN_TYPES}, got {margin_type!r}")
        if metric_l2 is not None and not isinstance(metric_l2, (MetricL2, int, float)):
            raise TypeError(
                f"metric_l2 must be None, a float alpha or a MetricL2, got {type(metric_l2).__name__}"
            )
        # read by sub_loss_names() while the PML base classes build the reducer
        self._with_metric_l2 = metric_l2 is not None
        super().__init__(**kwargs)
        c_f.assert_distance_type(self, CosineSimilarity)
        self.num_classes = int(num_classes)
        self.margin_type = margin_type
        self.margin = float(PML_DEFAULT_MARGIN[margin_type] if margin is None else margin)
        self.scale = float(PML_DEFAULT_SCALE[margin_type] if scale is None else scale)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "margin", "scale"], is_stat=False
        )
        # W first, so that under the same seed it equals PML's CosFaceLoss/ArcFaceLoss W
        self.W = torch.nn.Parameter(torch.empty(int(embedding_size), self.num_classes))
        self.weight_init_func(self.W)
        self.head = LEAPMarginHead(
            int(embedding_size),
            self.num_classes,
            margin_type=margin_type,
            scale=self.scale,
            margin=math.radians(self.margin) if margin_type == "arcface" else self.margin,
            cloud=cloud,
            tail_threshold=tail_threshold,
            gamma=gamma,
            memory_per_sample=memory_per_sample,
            warmup_steps=warmup_steps,
            class_counts=class_counts,
            reduction="none",
            seed=seed,
            validate=validate,
        )
        # PML's W (D, C) is the single class-weight parameter: the head reads it, transposed,
        # through _bound_weight() (the head keeps its statistics, step counter and cloud RNG).
        del self.head.weight
        if metric_l2 is None:
            self.metric_l2: Optional[MetricL2] = None
        elif isinstance(metric_l2, MetricL2):
            self.metric_l2 = MetricL2(metric_l2.alpha, reduction="none")
        else:
            self.metric_l2 = MetricL2(float(metric_l2), reduction="none")

    # ------------------------------------------------------------------ PML hooks
    def _sub_loss_names(self) -> List[str]:
        return ["loss", "metric_l2_loss"] if self._with_metric_l2 else ["loss"]

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def cast_types(self, dtype: torch.dtype, device: torch.device) -> None:
        """PML convention: ``W`` follows the embeddings' device and dtype; statistics follow the
        device (they stay float32)."""
        self.W.data = c_f.to_device(self.W.data, device=device, dtype=dtype)
        if self.head.statistics.centers.device != device:
            self.head.to(device)

    @contextlib.contextmanager
    def _bound_weight(self) -> Iterator[None]:
        self.head.weight = self.W.t()
        try:
            yield
        finally:
            del self.head.weight

    @property
    def statistics(self):
        """The :class:`feature_cloud.ClassStatistics` of the cloud (buffers)."""
        return self.head.statistics

    @property
    def cloud(self) -> Optional[str]:
        return self.head.cloud

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
        self.cast_types(dtype, device)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        with self._bound_weight():
            logits = self.head.margin_logits(embeddings, labels)
        losses = FC.margin_cross_entropy(logits, labels.long(), reduction="none")  # any int dtype
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
                "losses": self.metric_l2(embeddings, self.W.t()).to(dtype),
                "indices": indices,
                "reduction_type": "element",
            }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.W.t())
        return loss_dict

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``s cos(theta)`` for every class ``(B, C)``, as PML's ``CosFaceLoss.get_logits``."""
        self.cast_types(embeddings.dtype, embeddings.device)
        with self._bound_weight():
            return self.head.logits(embeddings)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, margin={self.margin}, scale={self.scale}, "
            f"margin_type={self.margin_type!r}, cloud={self.head.cloud!r}"
        )
