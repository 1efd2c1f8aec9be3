"""``LEAPMarginHead``: a CosFace/ArcFace classifier head with the LEAP feature cloud."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import functional as FC
from . import fused
from . import margins
from ._validation import as_float, as_int, check_batch, check_class_counts, check_embeddings
from ._rng import CloudRNG
from .statistics import ClassStatistics

__all__ = ["LEAPMarginHead", "DEFAULT_SCALE", "DEFAULT_MARGIN", "IMPLS"]

#: Loss implementations of :meth:`LEAPMarginHead.forward` (all compute the same loss).
IMPLS = ("auto", "reference", "fused", "chunked")

#: (impl, margin has a fused path, chunk_size given) -> backend that forward runs.
_BACKENDS = {
    (impl, fusable, chunk): (
        "reference" if impl == "reference" or not fusable
        else "chunked" if impl == "chunked" or (impl == "auto" and chunk) else "fused"
    )
    for impl in IMPLS for fusable in (False, True) for chunk in (False, True)
}

#: Defaults of the built-in margins (paper re-ID setting, LEAP Sec. 4.1: CosFace s=24, m=0.2;
#: ArcFace s=16, m=0.2 rad). The registry (:mod:`feature_cloud.margins`) is authoritative.
DEFAULT_SCALE = {n: margins.get(n).default_scale for n in margins.names()}
DEFAULT_MARGIN = {n: margins.get(n).default_margin for n in margins.names()}


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
        margin_type: a registered margin (:mod:`feature_cloud.margins`): ``"cosface"`` (cosine
            margin :math:`m_c`), ``"arcface"`` (angular margin :math:`m_a`, radians),
            ``"subcenter_arcface"`` (ArcFace over the best of ``sub_centers`` weight rows per
            class), or a :class:`~feature_cloud.margins.Margin` instance.
        scale: ``s``; default from the margin: 24 (CosFace) / 16 (ArcFace), the paper's re-ID
            setting.
        margin: default from the margin (0.2 for both).
        sub_centers: weight rows per class (``weight`` is ``(sub_centers * C, D)``, rows
            ``j K .. j K + K - 1`` for class ``j``); default from the margin (3 for sub-center
            ArcFace, else 1).
        cloud: ``"full"``, ``"vanilla"`` or ``None`` (no cloud).
        tail_threshold: ``T`` of the vanilla rule (classes with ``K_i > T`` are head classes).
        gamma: center learning rate (paper: 0.1).
        memory_per_sample: ``P`` of LEAP Eq. 5.
        warmup_steps: training steps without cloud (the paper starts the cloud after some
            epochs). With ``class_counts=None`` the counts ``K_i`` are taken online during warm-up,
            which must then be ``>= 1`` and should cover an epoch.
        class_counts: ``K_i`` per class from the dataset (recommended).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        seed: seed of the cloud's ``torch.Generator`` (saved with the state); default draws one
            from the global RNG, so ``torch.manual_seed`` makes runs reproducible.
        validate: check label range and finiteness each step (one host sync; skipped under
            ``torch.compile``). Shape/dtype checks are always on.
        impl: how :meth:`forward` computes the loss, all equal to rounding:
            ``"reference"`` (the :mod:`~feature_cloud.functional` pipeline),
            ``"fused"`` (:func:`feature_cloud.fused.margin_loss`, one autograd Function),
            ``"chunked"`` (the same over class chunks of ``chunk_size``: no ``B x C`` tensor,
            for very many classes), ``"auto"`` (``"chunked"`` if ``chunk_size`` is given,
            else ``"fused"``). A margin without a fused derivative, or a sub-center layout,
            runs ``"reference"`` whatever ``impl`` says. The cloud is drawn class-major
            (:func:`feature_cloud.fused.cloud_angles`) by every implementation, so a seed
            gives the same cloud whichever is used.
        chunk_size: classes per chunk of the ``"chunked"`` implementation.
        count_steps: with ``class_counts=None``, the steps of one epoch: ``K_i`` are counted
            online over the first ``count_steps`` steps only (must be ``<= warmup_steps``);
            default ``warmup_steps`` (then the warm-up must be exactly one epoch, else the
            counts are multiplied by the number of epochs: a warning says so).
        cloud_mode: where the cloud enters the logits, one of
            :data:`~feature_cloud.functional.CLOUD_MODES`: ``"paper"`` (LEAP Eq. 7-8, every
            logit), ``"target"`` or ``"margin"`` (target logit only; these run the reference
            implementation whatever ``impl``).
        cloud_scale: factor on the cloud's standard deviation (1: the paper's variance).
        center_rate, unknown_variance, angle_max_age: statistics options, see
            :class:`~feature_cloud.ClassStatistics` (``center_rate``, ``unknown_variance``,
            ``max_age``).
    """

    weight: Tensor

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin_type: str = "cosface",
        scale: Optional[float] = None,
        margin: Optional[float] = None,
        cloud: Optional[str] = "full",
        tail_threshold: int = 20,
        gamma: float = 0.1,
        memory_per_sample: int = 1,
        warmup_steps: int = 0,
        class_counts: Optional[Union[Tensor, Sequence[int]]] = None,
        reduction: str = "mean",
        seed: Optional[int] = None,
        validate: bool = True,
        impl: str = "auto",
        chunk_size: Optional[int] = None,
        count_steps: Optional[int] = None,
        cloud_mode: str = "paper",
        cloud_scale: float = 1.0,
        center_rate: str = "adaptive",
        unknown_variance: str = "tail_prior",
        angle_max_age: Optional[int] = None,
        sub_centers: Optional[int] = None,
    ) -> None:
        super().__init__()
        embedding_size = as_int(embedding_size, "embedding_size", 1)
        num_classes = as_int(num_classes, "num_classes", 1)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if chunk_size is not None:
            chunk_size = as_int(chunk_size, "chunk_size", 1)
        if scale is not None:
            scale = as_float(scale, "scale", minimum=0.0, min_inclusive=False)
        if margin is not None:
            margin = as_float(margin, "margin")
        warmup_steps = as_int(warmup_steps, "warmup_steps", 0)
        tail_threshold = as_int(tail_threshold, "tail_threshold", 0)
        memory_per_sample = as_int(memory_per_sample, "memory_per_sample", 1)
        gamma = as_float(gamma, "gamma", minimum=0.0, maximum=1.0, min_inclusive=False)
        if class_counts is not None:
            class_counts = check_class_counts(class_counts, num_classes)
        if impl == "chunked" and chunk_size is None:
            raise ValueError("impl='chunked' needs chunk_size (classes per chunk)")
        rule = margins.get(margin_type)
        k = rule.sub_centers if sub_centers is None else sub_centers
        if isinstance(k, bool) or int(k) < 1:
            raise ValueError(f"sub_centers must be a positive integer, got {sub_centers!r}")
        if cloud is not None and cloud not in FC.CLOUD_RULES:
            raise ValueError(f"cloud must be one of {FC.CLOUD_RULES} or None, got {cloud!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if int(warmup_steps) < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if cloud is not None and class_counts is None and int(warmup_steps) == 0:
            raise ValueError(
                "class_counts is required when warmup_steps == 0: the cloud needs K_i (LEAP "
                "Eq. 5). Pass the per-class sample counts, or warmup_steps >= 1 epoch to count "
                "them online."
            )
        if cloud_mode not in FC.CLOUD_MODES:
            raise ValueError(f"cloud_mode must be one of {FC.CLOUD_MODES}, got {cloud_mode!r}")
        if not float(cloud_scale) >= 0.0:
            raise ValueError(f"cloud_scale must be >= 0, got {cloud_scale}")
        if count_steps is not None:
            count_steps = as_int(count_steps, "count_steps")
        if count_steps is not None and not 1 <= int(count_steps) <= max(int(warmup_steps), 1):
            raise ValueError(
                f"count_steps must be in [1, warmup_steps={warmup_steps}] (K_i are counted during "
                f"the warm-up), got {count_steps}"
            )
        if cloud is not None and class_counts is None and count_steps is None:
            warnings.warn(
                f"LEAPMarginHead counts K_i online over all warmup_steps={warmup_steps} steps: "
                "correct only if the warm-up is exactly one epoch. Pass class_counts, or "
                "count_steps=<steps per epoch>.", UserWarning, stacklevel=2,
            )
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin_type = rule.name
        self.margin_rule = rule
        self.sub_centers = int(k)
        self.scale = float(rule.default_scale if scale is None else scale)
        self.margin = float(rule.default_margin if margin is None else margin)
        self.cloud = cloud
        self.cloud_mode = cloud_mode
        self.cloud_scale = float(cloud_scale)
        self.warmup_steps = int(warmup_steps)
        self.reduction = reduction
        self.validate = bool(validate)
        self.impl = impl
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.weight = nn.Parameter(
            torch.empty(self.num_classes * self.sub_centers, self.embedding_size))
        nn.init.xavier_normal_(self.weight)
        self.statistics = ClassStatistics(
            self.num_classes,
            self.embedding_size,
            gamma=gamma,
            memory_per_sample=memory_per_sample,
            class_counts=class_counts,
            cloud=cloud or "full",
            tail_threshold=tail_threshold,
            count_updates=count_steps if class_counts is None else None,
            center_rate=center_rate,
            unknown_variance=unknown_variance,
            max_age=angle_max_age,
        )
        self.step = 0  # training steps taken (saved with the state)
        self._rng = CloudRNG(int(torch.randint(0, 2**62, ()).item()) if seed is None else seed)

    # ------------------------------------------------------------------ public API
    @property
    def cloud_active(self) -> bool:
        """Whether the next training step draws a feature cloud."""
        return self.cloud is not None and self.step >= self.warmup_steps

    def logits(self, embeddings: Tensor) -> Tensor:
        """Plain scaled cosine logits ``s cos(theta)`` ``(B, C)`` for inference (no margin)."""
        check_embeddings(embeddings, self.embedding_size)
        return FC.cosine_logits(embeddings, self.weight, self.sub_centers) * self.scale

    def margin_logits(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Margin logits of the training loss (LEAP Eq. 1-2 or, with the cloud, Eq. 7-8).

        Updates the statistics and draws the cloud when training (see the class docstring);
        ``forward`` is the cross-entropy of these logits. Adapters that compute their own
        cross-entropy (fastreid) call this.
        """
        std, labels = self._training_step(embeddings, labels)
        alpha = target_alpha = None
        if std is not None:
            gen = self._generator_for(std.device)
            if self.cloud_mode == "paper":
                alpha = fused.cloud_angles(std, self.num_classes, gen)
            else:
                target_alpha = FC.target_cloud_angles(std, self.cloud_mode, gen)
        cos = FC.cosine_logits(*FC.common_float(embeddings, self.weight), self.sub_centers)
        return FC.margin_logits(
            cos, labels, margin_type=self.margin_rule, scale=self.scale, margin=self.margin,
            alpha=alpha, target_alpha=target_alpha,
        )

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, label_smoothing: float = 0.0,
        return_top1: bool = False, reduction: Optional[str] = None,
    ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        """The LEAP margin softmax loss of a batch (reduced by ``reduction``, default the
        head's).

        ``label_smoothing``: as ``F.cross_entropy``'s (targets ``1 - eps + eps / C``, ``eps / C``).
        ``return_top1``: also return, per sample, whether its target has the largest plain
        cosine (top-1 accuracy logging; the fused path gets it without a second GEMM).
        """
        reduction = self.reduction if reduction is None else reduction
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if self.backend == "reference":
            logits = self.margin_logits(embeddings, labels)
            loss = FC.margin_cross_entropy(logits, labels.long(), reduction, label_smoothing)
            if not return_top1:
                return loss
            with torch.no_grad():
                cos = FC.cosine_logits(*FC.common_float(embeddings, self.weight), self.sub_centers)
                y = labels.long()
                top1 = (y >= 0) & (cos.gather(1, y.clamp_min(0)[:, None])[:, 0] >= cos.amax(1))
            return loss, top1
        std, labels = self._training_step(embeddings, labels)
        x, w = FC.common_float(embeddings, self.weight)
        return fused.margin_loss(
            x, w, labels, margin_type=self.margin_rule, scale=self.scale, validate=False,
            margin=self.margin, noise_std=std,
            generator=None if std is None else self._generator_for(std.device),
            reduction=reduction,
            chunk_size=self.chunk_size if self.backend == "chunked" else None,
            label_smoothing=label_smoothing, return_top1=return_top1,
        )

    @property
    def backend(self) -> str:
        """The implementation :meth:`forward` runs: ``impl`` resolved against the margin."""
        fusable = (self.margin_rule.has_fused and self.sub_centers == 1
                   and (self.cloud is None or self.cloud_mode == "paper"))
        return _BACKENDS[(self.impl, fusable, self.chunk_size is not None)]

    def _training_step(self, embeddings: Tensor, labels: Tensor) -> Tuple[Optional[Tensor], Tensor]:
        """Check the batch; when training, update the statistics and count the step.

        Returns the per-sample cloud standard deviation ``(B,)`` when the cloud is active (else
        ``None``) and the labels as int64.
        """
        train = self.training and torch.is_grad_enabled()
        if train and self.cloud is not None and self.statistics.collective:
            # every rank agrees on the batch (one all-reduce) before anything changes
            labels = self.statistics.agree(embeddings, labels, self.validate)
        else:
            labels = check_batch(embeddings, labels, self.embedding_size, self.num_classes,
                                 self.validate)
        std = None
        # a collective statistics update must run on every rank each step, even for an empty batch
        if self.training and torch.is_grad_enabled() and (
            embeddings.shape[0] > 0 or self.statistics.collective
        ):
            if self.cloud is not None:
                if self.statistics.counting and self.step >= self.warmup_steps:
                    self.statistics.allocate_memory()  # online K_i: lay out the memory once
                self.statistics.update(embeddings, labels, validate=False)
                if self.step >= self.warmup_steps:
                    std = self.statistics.cloud_variance()[labels.clamp_min(0)].sqrt()
                    if self.cloud_scale != 1.0:
                        std = std * self.cloud_scale
                    # a fresh generator is seeded from the step: create it before the count moves
                    self._generator_for(std.device)
            self.step += 1
        return std, labels

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"margin_type={self.margin_type!r}, scale={self.scale}, margin={self.margin}, "
            + (f"sub_centers={self.sub_centers}, " if self.sub_centers != 1 else "")
            + f"cloud={self.cloud!r}, cloud_mode={self.cloud_mode!r}, cloud_scale={self.cloud_scale}, warmup_steps={self.warmup_steps}, reduction={self.reduction!r}, "
            f"impl={self.impl!r}" + ("" if self.chunk_size is None else f", chunk_size={self.chunk_size}")
        )

    # ------------------------------------------------------------------ RNG and checkpoints
    def _noise_stream(self) -> int:
        """This process's noise stream (the rank under synchronised statistics, else 0)."""
        return self.statistics.noise_stream

    def _generator_for(self, device: torch.device) -> torch.Generator:
        return self._rng.generator(device, self.step, self._noise_stream())

    @property
    def seed(self) -> int:
        """Seed of the cloud's noise stream (saved with the state)."""
        return self._rng.seed

    def get_extra_state(self) -> Dict[str, Any]:
        return {"step": self.step, **self._rng.state()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._rng.load(state)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        key = prefix + "weight"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.weight.shape):
            c, d = state_dict[key].shape
            raise ValueError(
                f"checkpoint head has {c} weight rows (num_classes={c // self.sub_centers} x "
                f"sub_centers={self.sub_centers}) of size {d}; this head has "
                f"num_classes={self.num_classes} x sub_centers={self.sub_centers} rows of size "
                f"embedding_size={self.embedding_size}"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)
