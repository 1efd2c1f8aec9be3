"""``LEAPMarginHead``: a CosFace/ArcFace classifier head with the LEAP feature cloud."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as FC
from . import fused
from ._validation import check_batch, check_embeddings
from .cloud import FeatureCloud, check_margin_unit, migrate_state_dict
from .statistics import ClassStatistics

__all__ = ["LEAPMarginHead", "DEFAULT_SCALE", "DEFAULT_MARGIN", "IMPLS", "make_cloud", "resolve_margin",
           "cloud_margin_logits"]

#: Loss implementations of :meth:`LEAPMarginHead.forward` (all compute the same loss).
IMPLS = ("auto", "reference", "fused", "chunked")

#: Paper defaults for re-ID (LEAP Sec. 4.1): CosFace s=24, m=0.2; ArcFace s=16, m=0.2 (radians).
DEFAULT_SCALE = {"cosface": 24.0, "arcface": 16.0}
DEFAULT_MARGIN = {"cosface": 0.2, "arcface": 0.2}


def _tracing() -> bool:
    """Whether a graph is being captured (compile, export or TorchScript tracing)."""
    compiler = torch.compiler
    return (compiler.is_compiling() or compiler.is_exporting()) or torch.jit.is_tracing()


def resolve_margin(
    margin_type: str, scale: Optional[float], margin: Optional[float]
) -> Tuple[str, float, float]:
    """Checked ``(margin_type, scale, margin)`` with the paper defaults filled in (radians)."""
    if margin_type not in FC.MARGIN_TYPES:
        raise ValueError(f"margin_type must be one of {FC.MARGIN_TYPES}, got {margin_type!r}")
    scale = float(DEFAULT_SCALE[margin_type] if scale is None else scale)
    margin = float(DEFAULT_MARGIN[margin_type] if margin is None else margin)
    check_margin_unit(margin_type, margin, "radians")
    return margin_type, scale, margin


def make_cloud(
    cloud: Union[None, str, FeatureCloud], num_classes: int, embedding_size: int,
    options: Mapping[str, Any],
) -> FeatureCloud:
    """The :class:`FeatureCloud` of a head: ``cloud`` itself, or one built from the rule and the
    cloud options (the one place the heads and adapters turn their arguments into a cloud)."""
    if isinstance(cloud, FeatureCloud):
        if options:
            raise TypeError(f"cloud options {sorted(options)} given with a ready FeatureCloud")
        if (cloud.num_classes, cloud.embedding_size) != (num_classes, embedding_size):
            raise ValueError(
                f"the FeatureCloud is for num_classes={cloud.num_classes}, embedding_size="
                f"{cloud.embedding_size}; the head has {num_classes}, {embedding_size}")
        return cloud
    return FeatureCloud(num_classes, embedding_size, cloud, **options)


def cloud_margin_logits(
    cloud: FeatureCloud,
    embeddings: Tensor,
    weight: Tensor,
    labels: Tensor,
    draw: Tuple[Optional[Tensor], Optional[Tensor]],
    *,
    margin_type: str,
    scale: float,
    margin: float,
    class_start: int = 0,
) -> Tensor:
    """Margin logits (LEAP Eq. 1-2, or Eq. 7-8 with the cloud ``draw = (std, key)`` of
    :meth:`FeatureCloud.advance`) of ``embeddings`` against ``weight`` ``(C_w, D)``, the classes
    ``class_start ..`` of the cloud's ``C``: the reference pipeline of every head and adapter."""
    std, key = draw
    alpha = None
    if std is not None:
        alpha = fused.cloud_angles(std, weight.shape[0], key, class_start=class_start,
                                   total_classes=cloud.num_classes)
    return FC.margin_logits(FC.cosine_logits(embeddings, weight), labels, margin_type=margin_type,
                            scale=scale, margin=margin, alpha=alpha)


class LEAPMarginHead(nn.Module):
    r"""Margin softmax head with a learnable feature cloud for tail classes (LEAP Eq. 7-8).

    Holds the class weights ``weight`` ``(C, D)`` and a :class:`ClassStatistics`. In a training
    step (module in train mode, gradients enabled) it

    1. folds the detached batch into the class centers and angle memory (LEAP Eq. 3-5),
    2. after ``warmup_steps`` steps, draws per-logit cloud angles
       :math:`\alpha_n \sim N(0, v_{y_n})^{C}` where :math:`v` is the cloud variance of the
       sample's class (Eq. 6 vanilla or Eq. 9 full rule; 0 for classes without cloud),
    3. returns the cross-entropy of the CosFace (Eq. 7) / ArcFace (Eq. 8) logits.

    With ``cloud=None``, during warm-up, in eval mode or under ``torch.no_grad()`` the loss is
    plain CosFace / ArcFace (LEAP Eq. 1-2) and no statistic changes; labels ``< 0`` are ignored.

    Args:
        embedding_size: ``D``.
        num_classes: ``C``.
        margin_type: ``"cosface"`` (cosine margin :math:`m_c`) or ``"arcface"`` (angular margin
            :math:`m_a`, **radians**; a margin above ``pi / 2`` warns: it looks like degrees).
        scale: ``s``; default 24 (CosFace) / 16 (ArcFace), the paper's re-ID setting.
        margin: default 0.2 for both.
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
            else ``"fused"``). Every implementation draws the same counter-based cloud
            (:mod:`feature_cloud.noise`), so a seed gives the same cloud whichever is used.
        chunk_size: classes per chunk of the ``"chunked"`` implementation.
        **cloud_options: the cloud's settings, passed to
            :class:`~feature_cloud.cloud.FeatureCloud`: ``tail_threshold`` (``T`` of the vanilla
            rule), ``gamma`` (center learning rate, paper 0.1), ``memory_per_sample`` (``P`` of
            Eq. 5), ``warmup_steps`` (steps without cloud; with ``class_counts=None`` the counts
            are taken online during warm-up, which should cover an epoch), ``class_counts``
            (``K_i`` per class, recommended), ``seed`` (of the noise stream; default from the
            global RNG) and ``sync`` (``"auto"``: statistics synchronised over an initialised
            process group; ``"off"``: per rank).

    State (tensors only): ``weight``, ``feature_cloud.step``, ``feature_cloud.seed`` and
    ``feature_cloud.statistics.*``; 0.1.0 checkpoints (with an ``_extra_state`` dict) load.
    """

    weight: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin_type: str = "cosface",
        scale: Optional[float] = None,
        margin: Optional[float] = None,
        cloud: Union[None, str, FeatureCloud] = "full",
        *,
        reduction: str = "mean",
        validate: bool = True,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
        **cloud_options: Any,
    ) -> None:
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or int(chunk_size) < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
        if impl == "chunked" and chunk_size is None:
            raise ValueError("impl='chunked' needs chunk_size (classes per chunk)")
        self.margin_type, self.scale, self.margin = resolve_margin(margin_type, scale, margin)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.feature_cloud = make_cloud(cloud, self.num_classes, self.embedding_size, cloud_options)
        self.reduction = reduction
        self.validate = bool(validate)
        self.impl = impl
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.embedding_size))
        nn.init.xavier_normal_(self.weight)

    # ------------------------------------------------------------------ public API
    @property
    def cloud(self) -> Optional[str]:
        """The cloud rule (``"full"``, ``"vanilla"``) or ``None``."""
        return self.feature_cloud.rule

    @property
    def statistics(self) -> ClassStatistics:
        """The class statistics of the cloud (buffers)."""
        return self.feature_cloud.statistics

    @property
    def warmup_steps(self) -> int:
        return self.feature_cloud.warmup_steps

    @property
    def step(self) -> int:
        """Training steps taken (the ``feature_cloud.step`` buffer)."""
        return self.feature_cloud.steps_taken

    @property
    def seed(self) -> int:
        """Seed of the cloud's noise stream (the ``feature_cloud.seed`` buffer)."""
        return int(self.feature_cloud.seed)

    @property
    def cloud_active(self) -> bool:
        """Whether the next training step draws a feature cloud."""
        return self.feature_cloud.active

    def logits(self, embeddings: Tensor) -> Tensor:
        """Plain scaled cosine logits ``s cos(theta)`` ``(B, C)`` for inference (no margin)."""
        check_embeddings(embeddings, self.embedding_size)
        return FC.cosine_logits(embeddings, self.weight) * self.scale

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Margin logits of the training loss (LEAP Eq. 1-2 or, with the cloud, Eq. 7-8).

        Updates the statistics and draws the cloud when training (see the class docstring);
        ``forward`` is the cross-entropy of these logits. Adapters that compute their own
        cross-entropy (fastreid) call this.
        """
        return cloud_margin_logits(
            self.feature_cloud, embeddings, self.weight, labels, self._train_step(embeddings, labels),
            margin_type=self.margin_type, scale=self.scale, margin=self.margin)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """The LEAP margin softmax loss of a batch (reduced by ``reduction``).

        Under ``torch.compile``, ``torch.export`` and ``torch.jit.trace`` the reference pipeline
        is traced whatever ``impl`` (a compiler fuses it; the fused autograd Function is the
        eager-mode optimisation)."""
        if self.impl == "reference" or _tracing():
            return FC.margin_cross_entropy(
                self.margin_logits(embeddings, labels), labels, self.reduction)
        std, key = self._train_step(embeddings, labels)
        chunked = self.impl == "chunked" or (self.impl == "auto" and self.chunk_size is not None)
        return fused.margin_loss(
            embeddings, self.weight, labels, margin_type=self.margin_type, scale=self.scale,
            margin=self.margin, noise_std=std, noise_key=key,
            reduction=self.reduction, chunk_size=self.chunk_size if chunked else None,
        )

    def _train_step(self, embeddings: Tensor, labels: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Check the batch (before any state changes); when training, advance the cloud."""
        check_batch(embeddings, labels, self.embedding_size, self.num_classes, self.validate)
        train = self.training and torch.is_grad_enabled()
        return self.feature_cloud.advance(embeddings.detach(), labels, train=train)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin_type={self.margin_type!r}, scale={self.scale}, margin={self.margin}, "
            f"reduction={self.reduction!r}, impl={self.impl!r}"
            + ("" if self.chunk_size is None else f", chunk_size={self.chunk_size}")
        )

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.weight.shape):
            c, d = state_dict[key].shape
            raise ValueError(
                f"checkpoint head has num_classes={c}, embedding_size={d}; this head has "
                f"num_classes={self.num_classes}, embedding_size={self.embedding_size}"
            )
        migrate_state_dict(state_dict, prefix, prefix + "feature_cloud.")
        super()._load_from_state_dict(state_dict, prefix, *args)
