"""FTL end to end (Yin et al. 2019): the Enc-Dec-R-FC model and the alternating training of Algorithm 1.

* :class:`FTLModel` composes ``Enc -> g -> Dec`` (reconstruction, Eq. 1) and ``g -> R -> f -> FC``
  (softmax, Eq. 2, with the m-L2 regulariser of Eq. 3) and computes the total loss of Eq. 4. It owns
  the :class:`~feature_cloud.FeatureTransfer` that holds ``C``, ``Q`` and ``h``.
* :class:`AlternatingScheduler` runs Algorithm 1: stage 0 (pre-training), then stage 1 (decision
  boundary reshape) and stage 2 (compact feature learning) alternating every ``stage_iters``
  iterations (stage 2: ``stage2_iters`` when given). It owns which parts are trainable, the
  resumable batch samplers (hard list, long-tail classes, whole dataset) and its own
  checkpointable state.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

from . import functional as FC
from ._buffers import restore_on_error
from ._validation import (
    ClassCounts,
    as_bool,
    as_float,
    as_int,
    check_class_counts,
    check_inputs,
    check_labels,
    check_optional_callable,
    check_values,
    checked_attribute,
    differs,
    migrate_checked,
    warn_user,
)
from .checkpoints import CheckedBeforeLoading
from .heads import LEAPMarginHead
from .regularizers import MetricL2, warn_metric_l2_with_margin
from .sync import agree_on_outcome, collective_device, is_distributed, range_over_ranks
from .transfer import FeatureBatch, FeatureTransfer

__all__ = [
    "FTLModel",
    "AlternatingScheduler",
    "StreamSampler",
    "IndexedDataset",
    "check_tail_split",
    "make_filter",
    "ResidualFilter",
    "FILTERS",
    "ConvDecoder",
    "PARTS",
    "STAGE_TRAINABLE",
    "TAIL_SAMPLING",
    "DEFAULT_TAIL_SAMPLING",
]

#: The four modules of FTL Fig. 2, by the names used for freezing and parameter groups.
PARTS = ("encoder", "decoder", "filter", "classifier")

#: Trainable parts per stage of Algorithm 1.
STAGE_TRAINABLE: Dict[int, Tuple[str, ...]] = {
    0: ("encoder", "decoder", "filter", "classifier"),  # train M with Eq. 4
    1: ("filter", "classifier"),  # fix Enc and Dec, train R and FC
    2: ("encoder", "decoder", "filter"),  # fix FC, train Enc, Dec and R
}


#: the forms of the filtering network ``R`` (:func:`make_filter`)
FILTERS = ("mlp", "residual")


def _filter_layers(
    in_dim: int, hidden: int, out_dim: int
) -> Tuple[nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]:
    """``Linear -> BN -> ReLU -> Linear``, created in that order (the initialisation order)."""
    return (
        nn.Linear(in_dim, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class ResidualFilter(nn.Sequential):
    """A residual filtering network: ``f = g + R(g)`` with ``R`` = ``Linear -> BN -> ReLU ->
    Linear`` whose last layer starts at zero, so ``Enc -> R -> FC`` starts as ``Enc -> FC`` (the
    user's own model) and ``R`` learns only what it adds. Its parameters are named as the plain
    MLP's; the buffer ``residual`` (a constant 1) keeps a checkpoint of one form from loading
    into the other (a missing / unexpected key), so ``f`` never silently changes meaning."""

    residual: Tensor

    def __init__(self, dim: int, hidden: int) -> None:
        layers = _filter_layers(dim, hidden, dim)
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        super().__init__(*layers)
        self.register_buffer("residual", torch.ones(()))

    def forward(self, g: Tensor) -> Tensor:
        r = g
        for module in self:
            r = module(r)
        return g + r


def make_filter(
    in_dim: int = 320, out_dim: int = 320, hidden: int = 640, form: str = "mlp"
) -> nn.Sequential:
    """Filtering network ``R`` (FTL Fig. 2) for a vector feature ``g``.

    ``form="mlp"`` (default, the paper's role): ``Linear -> BN -> ReLU -> Linear``. The paper's
    ``R`` (appendix Table 5: FC, two full convolutions, two convolutions, average pooling) works on
    a 6x6 map; an MLP is its counterpart for any backbone. ``form="residual"``:
    :class:`ResidualFilter`, ``f = g + R(g)`` starting at ``f = g`` (needs ``in_dim ==
    out_dim``); on real faces the plain MLP between backbone and FC cost the Enc/R/FC model
    tail accuracy against the backbone + FC alone (README, "Real faces", FTL).

    ``in_dim``: the size of ``g``; ``out_dim``: the embedding size of ``f``; ``hidden``: the
    hidden layer's width (``"mlp"``) or the residual branch's (``"residual"``).
    """
    if form not in FILTERS:
        raise ValueError(f"form must be one of {FILTERS}, got {form!r}")
    if form == "residual":
        if int(in_dim) != int(out_dim):
            raise ValueError(
                f"a residual filter maps g to f of the same size: in_dim={in_dim} and "
                f"out_dim={out_dim} differ (set the embedding size to the feature size, or use "
                "form='mlp')"
            )
        return ResidualFilter(int(in_dim), int(hidden))
    return nn.Sequential(*_filter_layers(in_dim, hidden, out_dim))


class ConvDecoder(nn.Module):
    """Default decoder ``Dec`` (FTL Eq. 1, appendix Table 5): ``g -> FC -> 6x6 map -> upsampling
    full convolutions -> image``.

    Each stage doubles the resolution (``ConvTranspose2d`` 4x4/2 + BN + ReLU); the last layer is a
    plain 3x3 convolution (no BN/ReLU, like "FCv11"); a final bilinear resize gives exactly
    ``out_shape`` (100x100 in the paper). Defaults are sized for the paper's 320-D ``g``.

    ``feature_dim``: the size of ``g``; ``out_shape``: ``(channels, height, width)`` of the
    reconstructed input; ``channels``: the FC map's channels, then each upsampling stage's;
    ``base``: the side of the FC's square map (6: 6x6).
    """

    def __init__(
        self,
        feature_dim: int = 320,
        out_shape: Sequence[int] = (3, 100, 100),
        channels: Sequence[int] = (256, 192, 128, 64),
        base: int = 6,
    ) -> None:
        super().__init__()
        if len(out_shape) != 3:
            raise ValueError(f"out_shape must be (channels, height, width), got {tuple(out_shape)}")
        if not channels:
            raise ValueError("channels must name at least one upsampling stage")
        self.out_shape = tuple(int(v) for v in out_shape)
        self.base = int(base)
        self.fc = nn.Linear(feature_dim, channels[0] * base * base)
        layers: List[nn.Module] = []
        prev = channels[0]
        for ch in list(channels[1:]) + [channels[-1]]:
            layers += [
                nn.ConvTranspose2d(prev, ch, 4, 2, 1),
                nn.BatchNorm2d(ch),
                nn.ReLU(inplace=True),
            ]
            prev = ch
        layers.append(nn.Conv2d(prev, self.out_shape[0], 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        """What the layers do not show: the output shape (a final resize) and the base map."""
        return f"out_shape={self.out_shape}, base={self.base}"

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(self, g: Tensor) -> Tensor: ...

    def forward(self, g: Tensor) -> Tensor:
        x = self.fc(g).view(g.shape[0], -1, self.base, self.base)
        x = self.body(x)
        if tuple(x.shape[-2:]) != self.out_shape[1:]:
            x = F.interpolate(x, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return x


#: what a whole-module pickle of an :class:`FTLModel` of an earlier release may lack: attribute
#: -> its value for such pickles (``_pending_frozen`` is read with a fallback)
_PICKLE_PREDATES: Dict[str, Any] = {
    # before validate: a linear FC's batch was left to cross_entropy; the checks change no
    # valid batch's loss, only refuse a bad one before Enc (this release's default)
    "_validate": True,
    # before recon_reduction: Eq. 1 as the mean per element (this release's default)
    "_recon_reduction": "mean",
}


def _raw_linear_logits(model: FTLModel, logits: Tensor) -> Optional[Tensor]:
    """``W f`` (FTL Eq. 3's m-L2 input) from a bias-free ``nn.Linear`` classifier's output
    (the paper's FC, Eq. 2), which saves m-L2 its own forward GEMM and two backward ones. None
    for any other classifier, a bias (``W f + b - b`` loses ``W f``'s precision when ``b`` is
    large: 4x the m-L2 gradient error under bf16 autocast), an overridden ``forward`` or a
    forward hook (its output need not be ``W f``): :class:`MetricL2` computes ``W f`` then."""
    fc = model.classifier
    if (
        not isinstance(fc, nn.Linear)
        or fc.bias is not None
        or type(fc).forward is not nn.Linear.forward
        or fc._forward_hooks
        or fc._forward_pre_hooks
        or nn.modules.module._global_forward_hooks
        or nn.modules.module._global_forward_pre_hooks
    ):
        return None
    return logits


def _check_alpha_recon(model: FTLModel, value: Any) -> float:
    """``FTLModel.alpha_recon``: finite, ``>= 0``, and ``0`` without a decoder (as built)."""
    alpha = as_float(value, "alpha_recon", minimum=0.0)
    if alpha > 0 and model.decoder is None:
        raise ValueError(
            f"alpha_recon={alpha} needs a decoder (FTL Eq. 1): this FTLModel has none (the "
            "reconstruction term would be 0 silently); set model.decoder first"
        )
    return alpha


def _check_alpha_reg(model: FTLModel, value: Any) -> float:
    """``FTLModel.alpha_reg``: finite, ``>= 0``; with a margin head, the constructor's warning."""
    alpha = as_float(value, "alpha_reg", minimum=0.0)
    if model.is_margin_head:
        warn_metric_l2_with_margin("LEAPMarginHead", "alpha_reg", alpha)
    return alpha


class FTLModel(CheckedBeforeLoading, nn.Module):
    r"""FTL's network (Fig. 2) and its total loss, Eq. 4:

    .. math:: \mathcal{L} = \alpha_{sfmx}\mathcal{L}_{sfmx} + \alpha_{recon}\mathcal{L}_{recon}
              + \alpha_{reg}\mathcal{L}_{reg}

    with :math:`\mathcal{L}_{recon}` Eq. 1 (``Dec(Enc(x))`` vs ``x``, by default the mean squared
    error per element, i.e. Eq. 1 divided by the number of pixels: ``recon_reduction``),
    :math:`\mathcal{L}_{sfmx}` the softmax
    cross-entropy of ``FC(R(g))`` (Eq. 2) and :math:`\mathcal{L}_{reg}` the m-L2 regulariser of
    Eq. 3 (:class:`~feature_cloud.MetricL2` on the FC weight). Paper: all weights 1 but
    ``alpha_reg = 0.25``.

    Args:
        encoder: ``Enc``, any backbone mapping inputs to a ``(B, feature_dim)`` rich feature ``g``
            (a timm model with ``num_classes=0``, a fastreid backbone + pooling, ...).
        classifier: ``FC``: an ``nn.Linear(embedding_size, num_classes, bias=False)`` (the paper's
            plain softmax classifier, Eq. 2: ``w_j^T f``, no bias) or a
            :class:`~feature_cloud.LEAPMarginHead` (its own margin loss then replaces the softmax;
            it normalises ``W`` and ``f``, so m-L2 only shrinks norms there: pass
            ``alpha_reg=0`` with it — a warning says so otherwise). Any other module with a
            ``(num_classes, embedding_size)`` ``.weight`` whose ``classifier(f)`` gives logits
            works as the plain classifier (the type hint is ``nn.Module``).
        feature_dim: size of ``g`` (paper: 320).
        filter_net: ``R``; default :func:`make_filter` (``feature_dim -> embedding_size``).
        decoder: ``Dec`` producing the input's shape from ``g`` (e.g. :class:`ConvDecoder`).
            **Reconstruction is optional:** with ``decoder=None`` you must pass ``alpha_recon=0``
            (Eq. 4 without Eq. 1) — for backbones where reconstruction makes no sense, e.g. a
            pretrained classifier backbone; then ``g`` keeps only the variation the softmax needs,
            which makes the transferred variance less rich (the paper's motivation for Dec).
        alpha_sfmx, alpha_recon, alpha_reg: the weights of Eq. 4.
        recon_reduction: how :math:`\mathcal{L}_{recon}` reduces
            (:func:`~feature_cloud.functional.reconstruction_loss`): ``"mean"`` (default), the
            mean over every element, Eq. 1 divided by the elements of a sample (``C * H * W``:
            30000 for the paper's 3x100x100 images), so that the paper's ``alpha_recon = 1``
            does not drown Eq. 2-3; ``"paper"``, Eq. 1 as printed, the squared error summed over
            each sample and averaged over the batch (as Eq. 2-3 are); ``alpha_recon=1`` with it
            is the paper's balance of Eq. 4. Settable, checked.
        transfer: the :class:`~feature_cloud.FeatureTransfer`; default
            ``FeatureTransfer(feature_dim, num_classes)`` (95% energy, long-tail ``<= 20`` images).
        head_cloud_when_frozen: with a :class:`~feature_cloud.LEAPMarginHead` as ``FC``: keep the
            head in train mode while it is frozen (stage 2 of Algorithm 1), so that its class
            statistics follow the features that ``Enc``/``R`` are still learning from normal
            batches and the LEAP cloud keeps acting on ``f`` (the weights stay fixed either way).
            ``False``: the frozen head is in eval mode (no statistics, no cloud in stage 2).
            Ignored for a linear ``FC``.
        validate: for a linear ``FC``, check the labels' values (in ``[0, C)`` or ``-1``) and
            the features' finiteness before the loss (one host sync per step, as a
            :class:`~feature_cloud.LEAPMarginHead` does with its own ``validate``); ``False``
            leaves them to ``cross_entropy`` (an ``IndexError``, or a device-side assert on CUDA).

    **LEAP head statistics in stage 1.** :meth:`AlternatingScheduler.stage1_loss` passes
    ``stats_rows`` = the real long-tail batch: only those rows update the head's class statistics
    and get the cloud; the hard-only regular batch (a biased sample: the samples farthest from
    their centers) and the transferred features (already spread by Eq. 6; counting them would make
    tail classes look like head classes) get the plain margin loss and leave the statistics alone.
    """

    #: ``FC``: any module with a 2-D ``weight`` (checked at construction); typed as the two
    #: built-in kinds so that ``model.classifier.weight`` is a ``Tensor`` to a type checker
    classifier: Union[nn.Linear, LEAPMarginHead]

    def __init__(
        self,
        encoder: nn.Module,
        classifier: nn.Module,
        *,
        feature_dim: int = 320,
        filter_net: Optional[nn.Module] = None,
        decoder: Optional[nn.Module] = None,
        alpha_sfmx: float = 1.0,
        alpha_recon: float = 1.0,
        alpha_reg: float = 0.25,
        transfer: Optional[FeatureTransfer] = None,
        head_cloud_when_frozen: bool = True,
        validate: bool = True,
        recon_reduction: str = FC.DEFAULT_RECON_REDUCTION,
    ) -> None:
        super().__init__()
        self.validate = validate  # checked (as_bool): "no" validated
        self.recon_reduction = recon_reduction  # checked: one of RECON_REDUCTIONS
        weight = getattr(classifier, "weight", None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(
                "classifier must be an nn.Linear or a LEAPMarginHead (a module with a "
                f"(num_classes, embedding_size) .weight), got {type(classifier).__name__}"
            )
        for name, value in (
            ("alpha_sfmx", alpha_sfmx),
            ("alpha_recon", alpha_recon),
            ("alpha_reg", alpha_reg),
        ):
            as_float(value, name, minimum=0.0)  # finite, >= 0 (NaN / inf: a NaN loss)
        # an integer, as FeatureTransfer's (8.9, "8", True are refused, not truncated)
        feature_dim = as_int(feature_dim, "feature_dim", 1)
        if decoder is None and float(alpha_recon) > 0:
            raise ValueError(
                "alpha_recon > 0 needs a decoder (FTL Eq. 1): pass decoder=..., or alpha_recon=0 "
                "to train without reconstruction"
            )
        self.is_margin_head = isinstance(classifier, LEAPMarginHead)
        if self.is_margin_head:
            warn_metric_l2_with_margin("LEAPMarginHead", "alpha_reg", float(alpha_reg))
        # a margin head's weight may hold several rows a class (sub-centers): its own count
        rows, self.embedding_size = int(weight.shape[0]), int(weight.shape[1])
        self.num_classes = (
            cast(LEAPMarginHead, classifier).num_classes if self.is_margin_head else rows
        )
        self.feature_dim = feature_dim
        self.encoder = encoder
        self.decoder = decoder
        self.filter = (
            filter_net
            if filter_net is not None
            else make_filter(self.feature_dim, self.embedding_size)
        )
        self.classifier = cast(Union[nn.Linear, LEAPMarginHead], classifier)
        # checked above (the alpha_reg warning said once): set without the assignment's checks
        self._alpha_sfmx, self._alpha_recon, self._alpha_reg = (
            float(alpha_sfmx),
            float(alpha_recon),
            float(alpha_reg),
        )
        self.metric_l2 = MetricL2(alpha=1.0)  # weighted by alpha_reg in Eq. 4
        if transfer is None:
            transfer = FeatureTransfer(self.feature_dim, self.num_classes)
        if transfer.feature_dim != self.feature_dim or transfer.num_classes != self.num_classes:
            raise ValueError(
                f"transfer has feature_dim={transfer.feature_dim}, num_classes={transfer.num_classes}; "
                f"the model has {self.feature_dim}, {self.num_classes}"
            )
        self.feature_transfer = transfer
        self.head_cloud_when_frozen = bool(head_cloud_when_frozen)
        self.frozen: Tuple[str, ...] = ()
        self._pending_frozen: Optional[Tuple[str, ...]] = None  # see defer_freeze
        self._base_requires_grad: Optional[Dict[str, bool]] = None

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases lack what :data:`_PICKLE_PREDATES` fills."""
        state = migrate_checked(
            state,
            ("validate", "alpha_sfmx", "alpha_recon", "alpha_reg"),
            predating=_PICKLE_PREDATES,
        )
        super().__setstate__(state)  # type: ignore[no-untyped-call]

    validate = checked_attribute(
        "validate",
        lambda _, value: as_bool(value, "validate"),
        "Whether each step checks the labels and the input's finiteness; settable (a flag: "
        '``bool("no")`` validated).',
    )

    alpha_sfmx = checked_attribute(
        "alpha_sfmx",
        lambda _, value: as_float(value, "alpha_sfmx", minimum=0.0),
        "The weight of Eq. 2 in Eq. 4; settable, checked (finite, ``>= 0``).",
    )
    alpha_recon = checked_attribute(
        "alpha_recon",
        lambda owner, value: _check_alpha_recon(owner, value),
        "The weight of Eq. 1 in Eq. 4; settable, checked (finite, ``>= 0``; ``> 0`` needs a "
        "decoder).",
    )
    alpha_reg = checked_attribute(
        "alpha_reg",
        lambda owner, value: _check_alpha_reg(owner, value),
        "The weight of Eq. 3 (m-L2) in Eq. 4; settable, checked (finite, ``>= 0``).",
    )

    recon_reduction = checked_attribute(
        "recon_reduction",
        lambda _, value: FC.check_recon_reduction(value),
        'How Eq. 1 reduces: ``"mean"`` (per element) or ``"paper"`` (per sample, summed); '
        "settable, checked.",
    )

    def extra_repr(self) -> str:
        """The loss weights of Eq. 4 (the ``metric_l2`` child is weighted by ``alpha_reg``)."""
        reduction = self.recon_reduction
        return (
            f"feature_dim={self.feature_dim}, embedding_size={self.embedding_size}, "
            f"num_classes={self.num_classes}, alpha_sfmx={self.alpha_sfmx}, "
            f"alpha_recon={self.alpha_recon}, alpha_reg={self.alpha_reg}"
            + (
                ""
                if reduction == FC.DEFAULT_RECON_REDUCTION
                else f", recon_reduction={reduction!r}"
            )
            + ("" if self.head_cloud_when_frozen else ", head_cloud_when_frozen=False")
            + ("" if self.validate else ", validate=False")
        )

    # ------------------------------------------------------------------ forward pieces
    def part(self, name: str) -> Optional[nn.Module]:
        """The module of one of :data:`PARTS` (``None`` for an absent decoder)."""
        if name not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {name!r}")
        return getattr(self, name)

    def encode(self, x: Tensor) -> Tensor:
        """Rich feature ``g = Enc(x)`` ``(B, feature_dim)``."""
        return check_encoded(self.encoder(x), self.feature_dim)

    def embed(self, g: Tensor) -> Tensor:
        """Identity feature ``f = R(g)``."""
        return self.filter(g)

    if TYPE_CHECKING:  # the call's type (nn.Module's __call__ is Any); nn.Module's runs

        def __call__(self, x: Tensor) -> Tensor: ...

    def forward(self, x: Tensor) -> Tensor:
        """The identity feature ``f = R(Enc(x))`` (the embedding used at test time)."""
        return self.embed(self.encode(x))

    def logits(self, f: Tensor) -> Tensor:
        """Classifier logits of ``f``: ``W f + b`` for a linear FC, ``s cos`` for a margin head."""
        if self.is_margin_head:
            return self.classifier.logits(f)  # type: ignore[operator]
        return self.classifier(f)

    def classification_loss(
        self, f: Tensor, labels: Tensor, stats_rows: Optional[slice] = None
    ) -> Dict[str, Tensor]:
        r""":math:`\alpha_{sfmx}\mathcal{L}_{sfmx} + \alpha_{reg}\mathcal{L}_{reg}` on identity
        features ``f`` (Eq. 2-3); labels ``< 0`` ignored (in both terms). Returns ``loss``,
        ``sfmx``, ``reg``.

        ``stats_rows`` (a contiguous slice of the batch) matters only for a
        :class:`~feature_cloud.LEAPMarginHead` in train mode: only those rows update its class
        statistics and draw the cloud; the other rows get the plain margin loss (the head in
        eval mode). The loss is the same mean over all valid rows either way.
        """
        self.apply_pending_freeze()
        labels = check_labels(labels, f.shape[0])  # any integer dtype, as int64
        logits: Optional[Tensor] = None
        if self.is_margin_head and stats_rows is not None and self.classifier.training:
            sfmx = self._split_margin_loss(f, labels, stats_rows)
        elif self.is_margin_head:
            sfmx = self.classifier(f, labels)
        else:
            if self.validate:
                check_values(f, labels, self.num_classes)
            logits = self.classifier(f)
            sfmx = FC.margin_cross_entropy(logits, labels)
        raw = None if logits is None or self.alpha_reg == 0 else _raw_linear_logits(self, logits)
        if raw is not None:  # W f from the classifier's logits: no GEMM of its own
            reg = self.metric_l2.from_logits(raw, labels)
        elif self.alpha_reg > 0:
            reg = self.metric_l2(f, self.classifier, labels)
        else:  # the loss's dtype (float32 under autocast, as the linear FC's m-L2 term)
            reg = sfmx.new_zeros(())
        return {"loss": self.alpha_sfmx * sfmx + self.alpha_reg * reg, "sfmx": sfmx, "reg": reg}

    def _split_margin_loss(self, f: Tensor, labels: Tensor, rows: slice) -> Tensor:
        head = self.classifier
        assert isinstance(head, LEAPMarginHead)  # is_margin_head
        start, stop, stride = rows.indices(f.shape[0])
        if stride != 1:
            raise ValueError("stats_rows must be a contiguous slice (step 1)")
        segments = [(a, b) for a, b in ((0, start), (start, stop), (stop, f.shape[0])) if b > a]
        # the whole batch first, on this process: a bad row after the statistics' segment
        # raised once that segment had updated them. The statistics' segment keeps its own
        # check where it is collective (the ranks agree on it: pad_to is per segment)
        head.feature_cloud.check(f, labels, validate=head.validate, train=False)
        collective = head.feature_cloud.collective and torch.is_grad_enabled()
        losses: List[Tensor] = []
        validate, head.validate = head.validate, False
        try:
            for a, b in segments:
                if (a, b) == (start, stop):
                    head.validate = validate and collective
                    losses.append(head(f[a:b], labels[a:b]))  # train mode: statistics + cloud
                    head.validate = False
                    continue
                # the head's own flag (eval: the plain margin loss, statistics untouched);
                # head.train() would also make the cloud re-read its step: a host sync a step
                head.training = False
                try:
                    losses.append(head(f[a:b], labels[a:b]))
                finally:
                    head.training = True
        finally:
            head.validate = validate
        if head.reduction == "none":
            return torch.cat(losses)
        if head.reduction == "sum":
            return torch.stack(losses).sum()
        # "mean": the per-segment means over valid rows, recombined into the mean over all of them
        total, count = losses[0].new_zeros(()), losses[0].new_zeros(())
        for (a, b), part in zip(segments, losses):
            n = (labels[a:b] >= 0).sum().to(part.dtype)
            total = total + torch.where(n > 0, part * n, part.new_zeros(()))
            count = count + n
        return total / count.clamp_min(1)

    def feature_loss(
        self, g: Tensor, labels: Tensor, stats_rows: Optional[slice] = None
    ) -> Dict[str, Tensor]:
        """Loss of a batch given as rich features ``g`` (stage 1 of Algorithm 1: ``R`` and ``FC``);
        ``stats_rows`` as in :meth:`classification_loss`. The batch is checked before ``R``
        (its BatchNorm), the features after it again."""
        labels = check_inputs(g, labels, self.num_classes, self.validate)
        return self.classification_loss(self.embed(g), labels, stats_rows)

    def loss(self, x: Tensor, labels: Tensor) -> Dict[str, Tensor]:
        """The total loss of Eq. 4 on an input batch; returns ``loss``, ``sfmx``, ``recon``, ``reg``.

        ``Dec`` runs only when ``alpha_recon > 0`` and the decoder is not frozen (in stage 1 it
        is fixed and Eq. 1 has no trainable parameter left).
        """
        self.apply_pending_freeze()
        labels = check_inputs(x, labels, self.num_classes, self.validate)  # before Enc's BN
        g = self.encode(x)
        out = self.classification_loss(self.embed(g), labels)
        recon = self.reconstruction_loss(x, g)
        out["recon"] = recon
        out["loss"] = out["loss"] + self.alpha_recon * recon
        return out

    def reconstruction_loss(self, x: Tensor, g: Tensor) -> Tensor:
        """Eq. 1 (unweighted) of ``Dec(g)`` against ``x``, reduced by ``recon_reduction``; zero
        when ``alpha_recon == 0``, without a decoder or while it is frozen."""
        if self.alpha_recon > 0 and self.decoder is not None and "decoder" not in self.frozen:
            return FC.reconstruction_loss(self.decoder(g), x, self.recon_reduction)
        return g.new_zeros((), dtype=torch.float32)

    # ------------------------------------------------------------------ freezing
    def set_frozen(self, parts: Iterable[str]) -> None:
        """Freeze ``parts`` (a subset of :data:`PARTS`) and unfreeze the others.

        Frozen: ``requires_grad=False``, gradients cleared to ``None`` (so optimisers skip them
        and momentum cannot move them) and eval mode (BatchNorm statistics stay fixed); a frozen
        :class:`LEAPMarginHead` stays in train mode (statistics and cloud live, weights fixed)
        unless ``head_cloud_when_frozen=False``. Unfrozen parameters get back
        the ``requires_grad`` they had when they were last unfrozen here (a backbone's own
        frozen stages stay frozen, also ones frozen after the model was built).
        """
        parts = tuple(parts)
        for p in parts:
            if p not in PARTS:
                raise ValueError(f"unknown part {p!r}; parts are {PARTS}")
        self._pending_frozen = None
        if self._base_requires_grad is None:
            self._base_requires_grad = {n: q.requires_grad for n, q in self.named_parameters()}
        base = self._base_requires_grad
        for name in PARTS:  # the parts not frozen here: the user's own freezing since
            module = getattr(self, name)
            if module is not None and name not in self.frozen:
                base.update({n: q.requires_grad for n, q in module.named_parameters(prefix=name)})
        for name in PARTS:
            module = getattr(self, name)
            if module is None:
                continue
            frozen = name in parts
            for pname, q in module.named_parameters(prefix=name):
                if frozen:
                    q.requires_grad_(False)
                    q.grad = None
                else:
                    q.requires_grad_(base.get(pname, True))
        self.frozen = parts
        self.train(self.training)

    def defer_freeze(self) -> None:
        """Unfreeze the frozen parts until the next training computation (:meth:`loss`,
        :meth:`classification_loss` / :meth:`feature_loss` or stage 1's batches in train mode),
        which freezes them again: an optimiser built in between sees every part (timm's
        ``create_optimizer_v2`` leaves out parameters with ``requires_grad=False``, which would
        never train them when they are unfrozen later)."""
        pending = self.frozen
        if pending:
            self.set_frozen(())
            self._pending_frozen = pending

    def apply_pending_freeze(self) -> None:
        """Freeze what :meth:`defer_freeze` left pending (in train mode; a no-op otherwise)."""
        pending = getattr(self, "_pending_frozen", None)
        if pending is not None and self.training:
            self.set_frozen(pending)

    def train(self, mode: bool = True) -> FTLModel:
        """Like ``nn.Module.train``, but frozen parts stay in eval mode."""
        super().train(mode)
        for name in self.frozen:
            module = getattr(self, name)
            if module is None:
                continue
            if name == "classifier" and self.is_margin_head and self.head_cloud_when_frozen:
                continue  # fixed weights, live statistics and cloud (see head_cloud_when_frozen)
            module.eval()
        return self

    def param_groups(self) -> List[Dict[str, Any]]:
        """One optimiser parameter group per part (``{"params": [...], "name": part}``).

        Build the optimiser over all groups once; freezing leaves frozen groups without
        gradients, which ``torch.optim`` optimisers skip.
        """
        groups = []
        for name in PARTS:
            module = getattr(self, name)
            if module is not None:
                params = list(module.parameters())
                if params:
                    groups.append({"params": params, "name": name})
        return groups


class IndexedDataset(Dataset[Tuple[Any, ...]]):
    """Wrap a dataset of ``(x, y)`` items so that item ``i`` is ``(x, y, i)`` (the dataset index
    that :meth:`AlternatingScheduler.update_stats` stores in the hard list)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @property
    def transform(self) -> Any:
        """The wrapped dataset's ``transform`` (timm's ``create_loader`` sets it on the dataset
        it is given: it reaches the images)."""
        return getattr(self.dataset, "transform", None)

    @transform.setter
    def transform(self, value: Any) -> None:
        self.dataset.transform = value

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[Any, ...]:
        item = self.dataset[index]
        if not isinstance(item, (tuple, list)):
            raise TypeError("IndexedDataset expects (x, y) items")
        return (*item, index)


#: :class:`AlternatingScheduler` ``tail_sampling`` values.
TAIL_SAMPLING = ("samples", "classes")
#: the default :data:`TAIL_SAMPLING` (Algorithm 1's uniform draw over the long-tail samples)
DEFAULT_TAIL_SAMPLING = "samples"


def class_balanced_pool(indices: Tensor, labels: Tensor) -> Tensor:
    """``indices`` repeated so that every label holds as many entries as the largest class (a
    class's samples cyclically): a uniform draw from the result picks each class equally often,
    then one of its samples (nearly uniformly). ``indices`` and ``labels``: ``(N,)``."""
    if indices.shape != labels.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and labels {tuple(labels.shape)} differ")
    if indices.numel() == 0:
        return indices
    order = torch.argsort(labels, stable=True)
    idx = indices[order]
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    cycle = torch.arange(int(counts.max()), device=counts.device)
    return idx[(starts[:, None] + cycle[None, :] % counts[:, None]).flatten()]


def warn_given_counts_disagree(transfer: FeatureTransfer, counted: Tensor) -> None:
    """Warn where ``transfer``'s given ``class_counts`` put a class with images on the other side
    of ``tail_threshold`` than the ``counted`` images of UpdateStats' first pass do: the given
    counts decide which classes are regular (their variance is transferred; the hard list)
    and which long-tail, so counts of another data set (or swapped ones) change Algorithm 1
    silently. An explicit ``regular_mask`` is the caller's choice: nothing is said."""
    if not transfer._counts_given or getattr(transfer, "_mask_given", False):  # older pickles
        return
    counted = counted.detach().cpu()
    t = transfer.tail_threshold
    given = FC.ftl_regular_classes(transfer.class_counts.cpu(), t)
    read = FC.ftl_regular_classes(counted, t)
    differ = torch.nonzero((counted > 0) & (given != read)).flatten().tolist()
    if not differ:
        return
    first = ", ".join(
        f"{c} (given {int(transfer.class_counts[c])}, read {int(counted[c])})" for c in differ[:5]
    )
    warn_user(
        f"FeatureTransfer's class_counts disagree with the images UpdateStats read for "
        f"{len(differ)} of {int((counted > 0).sum())} classes: regular (K_i > tail_threshold="
        f"{t}) by one and long-tail by the other, e.g. class {first}. The given counts decide "
        "(the variance transferred, the hard list, the long-tail pool): pass the training "
        "set's counts (torch.bincount(labels, minlength=C)), or none to count them in "
        "UpdateStats"
    )


def check_tail_split(transfer: FeatureTransfer, class_counts: ClassCounts) -> None:
    """Raise ``ValueError`` unless a training set with ``class_counts`` images per class has both
    regular classes (their intra-class variance is what FTL transfers) and long-tail ones (stage 1
    trains on them) for ``transfer`` (its ``regular_mask`` / ``class_counts`` when given, else
    ``count > tail_threshold``); classes without images count as neither. Changes nothing."""
    counts = check_class_counts(class_counts, transfer.num_classes).cpu()
    t = transfer.tail_threshold
    regular = (
        transfer.regular.cpu()
        if transfer._regular_fixed
        else FC.ftl_regular_classes(counts, transfer.tail_threshold)
    )
    present = counts > 0
    sizes = counts[present]
    lo, hi = (int(sizes.min()), int(sizes.max())) if sizes.numel() else (0, 0)
    if lo == hi and not transfer._regular_fixed:  # no threshold can split the classes
        fix = (
            f"every class has {lo} training images, so no tail_threshold splits them: FTL needs "
            "classes of different sizes (a long tail), e.g. fewer images for some identities"
        )
    else:
        fix = ""
    if not bool((regular & present).any()):
        raise ValueError(
            f"no regular class: no class has more than tail_threshold={t} training images (or is "
            "marked regular), so there is no intra-class variance to transfer: "
            + (fix or f"lower tail_threshold (the classes have {lo}..{hi} training images)")
        )
    if not bool((~regular & present).any()):
        raise ValueError(
            f"no long-tail class: no class has <= tail_threshold={t} training images (or is marked "
            "long-tail), so stage 1 has nothing to transfer to: FTL needs long-tail classes; "
            + (fix or f"raise tail_threshold (the classes have {lo}..{hi} training images)")
        )


def _draw_seed() -> int:
    """A sampler seed from torch's global RNG (``torch.manual_seed`` sets it), as
    ``RandomSampler`` draws its generator's seed."""
    return int(torch.randint(0, 2**62, (), device="cpu").item())


def data_parallel_shard(
    process_group: Any = None, rank: Optional[int] = None, world_size: Optional[int] = None
) -> Tuple[int, int]:
    """``(rank, world_size)`` of this process for :class:`AlternatingScheduler`'s data-parallel
    samplers: ``rank`` and ``world_size`` when given (both, and then no ``process_group``), else
    ``process_group``'s (default: the world group) when ``torch.distributed`` is initialised,
    else ``(0, 1)``: one process."""
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is not None and world_size is not None:
        if process_group is not None:
            raise ValueError("give either process_group or rank and world_size, not both")
        world_size = as_int(world_size, "world_size", 1)
        rank = as_int(rank, "rank", 0)
        if rank >= world_size:
            raise ValueError(f"rank={rank} is not below world_size={world_size}")
        return rank, world_size
    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise ValueError("process_group given, but torch.distributed is not initialised")
        return 0, 1
    r, w = dist.get_rank(process_group), dist.get_world_size(process_group)
    if r < 0:
        raise ValueError("this process is not a member of process_group")
    return r, w


class _PeerFailed(Exception):
    """Another rank's UpdateStats pass failed (its error follows, agreed on by every rank)."""


def _check_same_data(summary: Tensor, group: Any, failed: bool = False) -> None:
    """Raise ``ValueError`` on every rank unless ``summary`` (what a rank's UpdateStats pass
    read: per-class counts, then sample count and index checksums) is the same on every rank;
    :class:`_PeerFailed` where some rank's pass ``failed`` before it (that rank: nothing)."""
    flag = summary.new_tensor([int(failed)])
    lows, highs = range_over_ranks(torch.cat([summary, flag]), group)
    if failed:
        return
    if highs[-1]:
        raise _PeerFailed()
    if lows == highs:
        return
    lo, hi = lows[-4], highs[-4]  # the sample count: 4th from the end (then 2 sums, the flag)
    raise ValueError(
        "update_stats(): the ranks read different samples (between "
        f"{lo} and {hi} samples a rank, or other indices or labels): a sharded loader "
        "(DistributedSampler)? Data parallel, every rank reads the whole training set for "
        "UpdateStats (a plain DataLoader), so that the statistics C, Q, h are those of the "
        "whole set, the same on every rank"
    )


def _held_summary(ft: FeatureTransfer, counts: Tensor) -> Dict[str, Any]:
    """:meth:`FeatureTransfer.update_stats`' summary of the statistics ``ft`` holds (data
    parallel: rank 0's, after the broadcast), ``counts`` the per-class image counts of the pass
    (the same on every rank: :func:`_check_same_data`)."""
    regular, has = ft.regular, ft.has_center
    return {
        "num_components": ft.num_components,
        "explained_energy": ft.explained_energy,
        "num_hard": int(ft.hard_indices.numel()),
        "num_regular_classes": int((regular & has).sum()),
        "num_tail_classes": int((has & ~regular).sum()),
        "num_regular_samples": int(counts[regular.to(counts.device)].sum()),
    }


def _broadcast_own_buffers(module: nn.Module, group: Any) -> None:
    """Broadcast ``module``'s own buffers from the group's rank 0 (those of another size on a
    rank, like the hard list, are reallocated there first)."""
    bufs: List[Tuple[str, Tensor]] = [(n, b) for n, b in module._buffers.items() if b is not None]
    if not bufs:
        return
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dev = collective_device(bufs[0][1], group)
    shapes = torch.tensor([s for _, b in bufs for s in b.shape], dtype=torch.long, device=dev)
    dist.broadcast(shapes, src, group=group)
    flat = [int(s) for s in shapes.tolist()]
    for name, b in bufs:
        shape, flat = tuple(flat[: b.dim()]), flat[b.dim() :]
        if tuple(b.shape) != shape:
            b = torch.empty(shape, dtype=b.dtype, device=b.device)
            module._buffers[name] = b
        if b.numel() == 0:
            continue
        t = b.to(dev).contiguous()
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src, group=group)
        if t is not b:
            b.copy_(t)


class StreamSampler(Sampler[int]):
    """A resumable stream of dataset indices drawn from a pool, for a normal ``DataLoader``.

    The stream is a concatenation of random permutations of the pool (epochs without
    replacement), seeded by ``seed``; it yields positions ``start .. start + num_samples - 1`` of
    that stream, so a resumed run can continue exactly where it stopped. ``seed=None`` draws one
    from torch's global RNG when the sampler is built (as ``RandomSampler`` does per epoch: runs
    under another ``torch.manual_seed`` draw other streams); it is then fixed in ``seed``, and a
    resume (``start > 0``) must give it. ``pool`` is a tensor of
    dataset indices or a callable returning one, read when iteration starts (the hard list and
    the long-tail pool change at every UpdateStats).

    Data parallel (``world_size > 1``): ``start`` and ``num_samples`` are positions of the one
    *global* stream, which every rank draws alike from the shared ``seed``; it is cut into global
    batches of ``world_size * batch_size`` consecutive positions, and rank ``r`` yields positions
    ``r * batch_size .. (r + 1) * batch_size - 1`` of each (``num_samples // world_size`` indices
    in all). The ranks' batches are disjoint slices of the global stream, and concatenated in rank
    order they are the batches of one process reading that stream with batch size
    ``world_size * batch_size``. ``start`` and ``num_samples`` must then be multiples of the
    global batch. ``world_size=1`` (default) is the plain stream.
    """

    def __init__(
        self,
        pool: Union[Tensor, Callable[[], Tensor]],
        num_samples: int,
        seed: Optional[int] = None,
        start: int = 0,
        name: str = "pool",
        *,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        # checked, not truncated: int() took 2.7 as 2, "3" as 3 and start=0.5 as 0
        num_samples = as_int(num_samples, "num_samples", 0)
        start = as_int(start, "start", 0)
        batch_size = as_int(batch_size, "batch_size", 1)
        world_size = as_int(world_size, "world_size", 1)
        rank = as_int(rank, "rank", 0)
        if rank >= world_size:
            raise ValueError(f"rank={rank} is not below world_size={world_size}")
        step = world_size * batch_size
        if world_size > 1 and (start % step or num_samples % step):
            raise ValueError(
                f"start={start} and num_samples={num_samples} must be multiples of the global "
                f"batch world_size * batch_size = {step}"
            )
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        if seed is None and start > 0:  # a resume: the stream it continues has a seed
            raise ValueError(
                f"start={start} continues a stream, but seed=None draws a new one: pass the "
                "seed of the stream being resumed (the sampler's .seed; before this release "
                "the default was 0)"
            )
        self.pool = pool
        self.num_samples, self.seed, self.start, self.name = (
            num_samples,
            _draw_seed() if seed is None else as_int(seed, "seed"),
            start,
            name,
        )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """A pickle of an earlier release: one process (no ``rank`` / ``world_size``)."""
        self.__dict__.update({"batch_size": 1, "rank": 0, "world_size": 1, **state})

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        pool = self.pool() if callable(self.pool) else self.pool
        pool = pool.detach().to("cpu", torch.long).flatten()
        if pool.numel() == 0:
            raise RuntimeError(
                f"the {self.name} is empty: has AlternatingScheduler.update_stats() run before "
                "the stage-1 loaders were iterated?"
            )
        gen = torch.Generator().manual_seed(self.seed)
        n, end = pool.numel(), self.start + self.num_samples
        first_epoch = self.start // n
        for _ in range(first_epoch):  # advance the generator to the epoch holding `start`
            torch.randperm(n, generator=gen)
        chunks, pos = [], first_epoch * n
        while pos < end:
            perm = torch.randperm(n, generator=gen)
            lo, hi = max(self.start - pos, 0), min(end - pos, n)
            chunks.append(perm[lo:hi])
            pos += n
        order = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)
        if self.world_size > 1:  # this rank's slice of each global batch
            order = order.view(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1)
        return iter(pool[order].tolist())


# ------------------------------------------------------------------ per-item augmentation seeds
# A DataLoader worker's RNGs run on from item to item, and a loader built mid-stage on resume
# starts its workers afresh (and deals the batches to its workers from worker 0 again), so the
# draws of a dataset's random augmentation depend on where the loader started. Seeding every item
# from its position in the (resumable) stream makes them depend on the position alone: a resumed
# run draws what the uninterrupted run drew, in the main process or in any worker. Used by
# AlternatingScheduler.loaders() and by the fastreid FTL adapter's stage-1 loaders.
def _item_seed(stream_seed: int, position: int) -> int:
    """The seed of the item at ``position`` of the stream of seed ``stream_seed`` (64 bits)."""
    digest = hashlib.blake2b(f"{stream_seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _seed_rngs(seed: int) -> None:
    """Seed torch's CPU RNG, Python's ``random`` and NumPy's global RNG (what torchvision's,
    fastreid's and most hand-written transforms draw from) with ``seed``."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextlib.contextmanager
def _rngs_kept() -> Iterator[None]:
    """In the main process, put torch's CPU RNG, ``random`` and NumPy's global RNG back after
    the block (the training step draws from them too); a loader worker's RNGs are its own and
    every item reseeds them, so a worker skips that (NumPy's state alone took ~0.2 ms to save
    and restore). The CUDA RNG is not touched (transforms run on the CPU)."""
    if torch.utils.data.get_worker_info() is not None:
        yield
        return
    saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    try:
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


@contextlib.contextmanager
def _drawing_from(seed: int) -> Iterator[None]:
    """The block draws from torch's CPU RNG, ``random`` and NumPy's global RNG seeded with
    ``seed``; in the main process their states are put back afterwards (:func:`_rngs_kept`)."""
    with _rngs_kept():
        _seed_rngs(seed)
        yield


class _SeededPositions(Sampler[Tuple[int, int]]):
    """A :class:`StreamSampler`'s indices, each with the seed of its position in the stream:
    ``(index, seed)``. The position is where a resumed sampler continues, so a resumed stage
    gives every item the seed the uninterrupted run gave it; a rank's share of a data-parallel
    stream numbers its items by their positions in the one global stream (rank ``r``'s ``j``-th
    item of global batch ``k``: ``start + k * world * b + r * b + j``), so the ranks' items get
    different seeds."""

    def __init__(self, sampler: StreamSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        s = self.sampler
        seed, start = s.seed, s.start
        b, rank, world = s.batch_size, s.rank, s.world_size
        for i, index in enumerate(s):
            position = start + i if world == 1 else start + (i // b) * world * b + rank * b + i % b
            yield index, _item_seed(seed, position)


class _SeededItems(Dataset[Any]):
    """The dataset of a loader over :class:`_SeededPositions`: item ``(index, seed)`` is
    ``dataset[index]`` with its random draws from ``seed`` (:func:`_drawing_from`), in the main
    process or a worker. A batch (``__getitems__``, what ``DataLoader`` calls) saves and puts
    back the main process's RNGs once."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]) -> Any:
        index, seed = key
        with _drawing_from(seed):
            return self.dataset[index]

    def __getitems__(self, keys: Sequence[Tuple[int, int]]) -> List[Any]:
        items = []
        with _rngs_kept():
            for index, seed in keys:
                _seed_rngs(seed)
                items.append(self.dataset[index])
        return items


def check_encoded(g: Tensor, feature_dim: int, what: str = "encoder must return") -> Tensor:
    """``g`` unless it is not ``(batch, feature_dim)``: a ``ValueError`` starting ``what``
    (compared with :func:`differs`: no tracer warning when exported)."""
    if g.dim() != 2 or differs(g.shape[1], feature_dim):
        raise ValueError(f"{what} (batch, feature_dim={feature_dim}), got {tuple(g.shape)}")
    return g


def check_update_stats_callables(flip: Any, quality: Any) -> None:
    """``TypeError`` naming the argument unless ``flip`` / ``quality`` are callables or ``None``.
    They are first called by UpdateStats after stage 0 (the paper: 10K iterations), so a wrong
    value (``flip=True``, the meaning of fastreid's ``FTLHook(flip=)`` / YAML ``FLIP``) is refused
    when the scheduler or task is built."""
    check_optional_callable(flip, "flip", "a callable x -> flipped x (e.g. lambda x: x.flip(-1))")
    check_optional_callable(quality, "quality", "a callable (x, g) -> bool keep mask (B,)")


class AlternatingScheduler:
    r"""The alternating training scheme of FTL, Algorithm 1.

    * **Stage 0** (``stage0_iters`` iterations; 0 for an already trained model): train all of
      ``Enc, Dec, R, FC`` with Eq. 4 on normal batches.
    * **Stage 1** (``stage_iters``, paper 5K): ``Enc`` and ``Dec`` fixed; :meth:`update_stats`
      (UpdateStats) first, then each iteration trains ``R`` and ``FC`` on three batches: a hard
      regular batch from ``h``, a long-tail batch, and the long-tail batch's labels carried by the
      hard batch's features transferred with Eq. 6 (:meth:`stage1_loss`).
    * **Stage 2** (``stage2_iters``; default ``stage_iters``, the paper's equal lengths): ``FC``
      fixed, train ``Enc``, ``Dec`` and ``R`` with Eq. 4 on normal batches.
    * Stages 1 and 2 alternate until ``max_alternations`` pairs are done (paper: 10-15; ``None``:
      until the caller stops, e.g. on a validation criterion).

    The scheduler freezes and unfreezes the model's parts (:meth:`FTLModel.set_frozen`) at every
    stage change; one optimiser over ``model.param_groups()`` (or ``model.parameters()``) serves
    all stages (paper: Adam, lr 2e-4 in stage 0, 1e-5 afterwards: the caller owns the lr).
    Call :meth:`step` after each optimiser step; it returns the stage of the next iteration.

    Batches are ``(x, y)`` or ``(x, y, index[, keep])`` tuples; :meth:`loaders` builds
    ``DataLoader``\ s over resumable :class:`StreamSampler`\ s (hard list, long-tail samples, or the
    whole dataset) that start at the current position of the stage, so a run restored with
    :meth:`load_state_dict` continues identically.

    **Data parallel** (``torch.distributed``; DDP): build the scheduler with the same ``seed`` on
    every rank (:meth:`loaders` refuses ranks whose seed, position or batch size differ, on
    every rank) and wrap what computes the stage's loss in DDP (``find_unused_parameters=True``:
    the frozen parts change with the stage). When ``torch.distributed`` is initialised with
    more than one rank (or :meth:`loaders` is given ``process_group`` or ``rank`` and
    ``world_size``), every stage's stream is the *global* stream of batch size ``world_size *
    batch_size``, drawn alike on every rank, and rank ``r`` gets positions ``r * batch_size ..
    (r + 1) * batch_size - 1`` of each global batch (:class:`StreamSampler`). So the
    ``batch_size`` of :meth:`loaders` is the per-rank batch; the ranks' batches of an iteration
    are disjoint shares of the stream and, concatenated in rank order, are the batch of one
    process calling ``loaders(dataset, world_size * batch_size)``: with DDP's gradient average
    of the per-rank batch means the step is that process's step (up to float rounding, and
    as long as nothing in the model sees the batch as a whole: BatchNorm in ``Enc`` or ``R``
    normalises per rank unless converted to ``SyncBatchNorm``). A resume continues every rank
    where it stopped (the position is ``stage_iteration`` global batches; no rank is saved, so
    the same ``world_size * batch_size`` continues the same stream). :meth:`update_stats`
    reads the whole training set on every rank (a sharded loader is refused) and leaves rank
    0's statistics on every rank. One process is unchanged (the same streams, bit for bit).

    Args:
        model: the :class:`FTLModel`.
        stage0_iters: iterations of stage 0.
        stage_iters: iterations of each stage 1 (paper: 5000), and of each stage 2 unless
            ``stage2_iters`` is given.
        stage2_iters: iterations of each stage 2; ``None`` (default): ``stage_iters``.
        max_alternations: number of (stage 1, stage 2) pairs, or ``None``.
        seed: seed of the samplers; ``None`` (default) draws one from torch's global RNG (as
            ``torch.utils.data.RandomSampler`` does: ``torch.manual_seed`` sets it, so runs
            under other seeds sample other batches). It is in :meth:`state_dict`: a scheduler
            built with ``seed=None`` takes the checkpoint's on :meth:`load_state_dict` (an
            explicit one must match it), so a resumed run continues identically.
        flip: ``x -> flipped x`` for the flipped-image centers of Eq. 5 (e.g.
            ``lambda x: x.flip(-1)`` for images); ``None``: plain means.
        quality: ``(x, g) -> bool (B,)`` quality filter :math:`\Omega` of Eq. 5 (paper: yaw below
            ``tau``); a 4th batch element ``keep`` is used when given instead.
        tail_sampling: how stage 1's long-tail batch is drawn from the long-tail classes:
            ``"samples"`` (default; uniform over their samples, so a class is drawn in proportion
            to its size) or ``"classes"`` (every long-tail class equally often, then one of its
            samples: :func:`class_balanced_pool`). The paper says "sampled from long-tail classes".
    """

    def __init__(
        self,
        model: FTLModel,
        *,
        stage0_iters: int,
        stage_iters: int = 5000,
        stage2_iters: Optional[int] = None,
        max_alternations: Optional[int] = None,
        seed: Optional[int] = None,
        flip: Optional[Callable[[Tensor], Tensor]] = None,
        quality: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        tail_sampling: str = DEFAULT_TAIL_SAMPLING,
    ) -> None:
        if not isinstance(model, FTLModel):
            raise TypeError(f"model must be an FTLModel, got {type(model).__name__}")
        check_update_stats_callables(flip, quality)
        if tail_sampling not in TAIL_SAMPLING:
            raise ValueError(f"tail_sampling must be one of {TAIL_SAMPLING}, got {tail_sampling!r}")
        # integers (2.5, "3", True, NaN are refused, not truncated)
        stage0_iters = as_int(stage0_iters, "stage0_iters", 0)
        stage_iters = as_int(stage_iters, "stage_iters", 1)
        if stage2_iters is not None:
            stage2_iters = as_int(stage2_iters, "stage2_iters", 1)
        if max_alternations is not None:
            max_alternations = as_int(max_alternations, "max_alternations", 1)
        self.model = model
        self.stage0_iters = stage0_iters
        self.stage_iters = stage_iters
        self.stage2_iters = self.stage_iters if stage2_iters is None else stage2_iters
        self.max_alternations = max_alternations
        #: whether ``seed`` was given (a checkpoint must then match it) or drawn (the
        #: checkpoint's is taken on load)
        self.seed_given = seed is not None
        self.seed = _draw_seed() if seed is None else as_int(seed, "seed")
        self.flip = flip
        self.quality = quality
        self.tail_sampling = tail_sampling
        self.iteration = 0  # iterations done in total
        self.stage_iteration = 0  # iterations done in the current stage
        self.alternation = 0  # (stage 1, stage 2) pairs completed
        self._stage = 0 if self.stage0_iters > 0 else 1
        self.needs_stats = self._stage == 1
        transfer = model.feature_transfer
        if transfer._regular_fixed:  # the split is known now: refuse it before training
            given = transfer._counts_given
            self.check_class_counts(
                transfer.class_counts
                if given
                else torch.ones(transfer.num_classes, dtype=torch.long)
            )
        self.apply()

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """A pickle of an earlier release: before ``stage2_iters`` stage 2 was as long as stage
        1; before ``tail_sampling`` the long-tail batch was drawn from the samples."""
        predating = {
            "stage2_iters": state.get("stage_iters"),
            "tail_sampling": "samples",
            "seed_given": True,  # before seed=None: the seed (default 0) was always fixed
        }
        self.__dict__.update(migrate_checked(state, predating=predating))

    def check_class_counts(self, class_counts: ClassCounts) -> None:
        """:func:`check_tail_split` for the model's :class:`FeatureTransfer`: called when the
        scheduler is built (split given to the transfer) and at the end of :meth:`update_stats`'
        first pass; adapters that know the training set call it before training starts."""
        check_tail_split(self.model.feature_transfer, class_counts)

    # ------------------------------------------------------------------ state
    @property
    def stage(self) -> int:
        """The stage of the next iteration (0, 1 or 2). Once :attr:`finished`, no iteration
        follows (``step`` and the stage-1 calls refuse): it reads the stage a further pair would
        start with (1)."""
        return self._stage

    @property
    def finished(self) -> bool:
        """Whether ``max_alternations`` (stage 1, stage 2) pairs are done."""
        return self.max_alternations is not None and self.alternation >= self.max_alternations

    @property
    def stage_length(self) -> int:
        """Iterations of the current stage."""
        return self._length(self._stage)

    def _length(self, stage: int) -> int:
        return (self.stage0_iters, self.stage_iters, self.stage2_iters)[stage]

    @property
    def total_iters(self) -> Optional[int]:
        """Iterations of the whole schedule (``None`` without ``max_alternations``)."""
        if self.max_alternations is None:
            return None
        return self.stage0_iters + self.max_alternations * (self.stage_iters + self.stage2_iters)

    @property
    def remaining(self) -> int:
        """Iterations left in the current stage."""
        return self.stage_length - self.stage_iteration

    def apply(self) -> None:
        """Freeze the parts that the current stage keeps fixed (idempotent)."""
        trainable = STAGE_TRAINABLE[self._stage]
        self.model.set_frozen(p for p in PARTS if p not in trainable)

    def step(self) -> int:
        """Count one finished iteration (call after ``optimizer.step()``); switch stage at the end
        of one (re-freezing the parts, and flagging :attr:`needs_stats` on entering stage 1).
        Returns the stage of the next iteration."""
        if self.finished:
            raise RuntimeError("the schedule is finished (max_alternations reached)")
        if self._stage == 1 and self.needs_stats:
            raise RuntimeError("stage 1 started without update_stats(): call it before training")
        self.iteration += 1
        self.stage_iteration += 1
        if self.stage_iteration >= self.stage_length:
            self.stage_iteration = 0
            if self._stage == 2:
                self.alternation += 1
            self._stage = 2 if self._stage == 1 else 1
            self.needs_stats = self._stage == 1 and not self.finished  # no stage 1 follows
            self.apply()
        return self._stage

    def state_dict(self) -> Dict[str, Any]:
        """Stage, counters and settings (the statistics ``C``, ``Q``, ``h`` are model buffers)."""
        return {
            "stage": self._stage,
            "iteration": self.iteration,
            "stage_iteration": self.stage_iteration,
            "alternation": self.alternation,
            "needs_stats": self.needs_stats,
            "stage0_iters": self.stage0_iters,
            "stage_iters": self.stage_iters,
            "stage2_iters": self.stage2_iters,
            "max_alternations": self.max_alternations,
            "seed": self.seed,
            "tail_sampling": self.tail_sampling,
        }

    @contextlib.contextmanager
    def restoring(self, *modules: nn.Module) -> Iterator[None]:
        """Undo the block if it raises: the schedule's position (and freezing) and the state of
        ``modules`` (copied on entry). Checkpoint loaders load a schedule and the statistics and
        weights that go with it inside it, so a refused part leaves nothing half loaded::

            with scheduler.restoring(model.classifier, model.feature_transfer):
                scheduler.load_state_dict(state["scheduler"])  # checks the settings first
                model.classifier.load_state_dict(state["classifier"])
                model.feature_transfer.load_state_dict(state["feature_transfer"])
        """
        schedule = self.state_dict()
        try:
            with restore_on_error(*modules):
                yield
        except BaseException:
            self.load_state_dict(schedule)
            raise

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raise if :meth:`load_state_dict` would refuse ``state``; changes nothing. A checkpoint
        whose ``stage0_iters``, ``stage_iters``, ``stage2_iters``, ``seed`` or ``tail_sampling``
        differ from this scheduler's is refused (one without ``tail_sampling`` predates the
        option and counts as ``"samples"``; one without ``stage2_iters`` predates unequal stages
        and counts as its ``stage_iters``), as is one with invalid counters."""
        missing = {"stage", "iteration", "stage_iteration", "alternation", "needs_stats"} - set(
            state
        )
        if missing:
            raise ValueError(f"scheduler state lacks {sorted(missing)}")
        if int(state["stage"]) not in STAGE_TRAINABLE:
            raise ValueError(f"invalid stage {state['stage']!r}")
        keys = (
            ("stage0_iters", "stage_iters", "seed")
            if self.seed_given
            else ("stage0_iters", "stage_iters")
        )
        for key in keys:
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"checkpoint has {key}={state[key]} but this scheduler has {getattr(self, key)}"
                )
        # checkpoints from before the option had stage 2 as long as stage 1
        saved_stage2 = state.get("stage2_iters", state.get("stage_iters"))
        if saved_stage2 is not None and int(saved_stage2) != self.stage2_iters:
            raise ValueError(
                f"checkpoint has stage2_iters={saved_stage2} but this scheduler has "
                f"{self.stage2_iters}"
                + ("" if "stage2_iters" in state else " (the checkpoint predates stage2_iters)")
            )
        # checkpoints from before the option drew the long-tail batch from the samples
        saved_sampling = state.get("tail_sampling", "samples")
        if saved_sampling != self.tail_sampling:
            raise ValueError(
                f"checkpoint has tail_sampling={saved_sampling!r} but this scheduler has "
                f"{self.tail_sampling!r} (the long-tail batch stream would change on resume)"
            )
        stage = int(state["stage"])
        length = self._length(stage)
        for key in ("stage", "iteration", "stage_iteration", "alternation"):
            as_int(state[key], f"scheduler state's {key}", 0)  # integers, >= 0
        saved_max = state.get("max_alternations")
        if saved_max is not None:
            as_int(saved_max, "scheduler state's max_alternations", 1)
        if int(state["stage_iteration"]) >= length:
            raise ValueError(
                f"scheduler state has stage_iteration={state['stage_iteration']} but stage {stage} "
                f"lasts {length} iterations (stage_iteration must be in [0, {length}))"
            )

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-apply the stage's freezing; a state that
        :meth:`check_state_dict` refuses is refused before anything changes. The constructed
        ``max_alternations`` is kept (a run resumed to be extended), with a warning where the
        checkpoint's differs (it replaced the constructed one silently)."""
        self.check_state_dict(state)
        self._stage = int(state["stage"])
        self.iteration = int(state["iteration"])
        self.stage_iteration = int(state["stage_iteration"])
        self.alternation = int(state["alternation"])
        self.needs_stats = bool(state["needs_stats"])
        saved = state.get("max_alternations", self.max_alternations)
        if (
            saved is not None
            and self.alternation >= int(saved)
            and not self.finished
            and self._stage == 1
            and self.stage_iteration == 0
        ):  # a finished run extended: its stage 1 starts with UpdateStats, as an unbroken run's
            self.needs_stats = True
        if not self.seed_given:  # drawn: continue the checkpoint's streams (0 before the key)
            self.seed = int(state.get("seed", 0))
        if saved != self.max_alternations:  # the run's length is the constructed one
            warn_user(
                f"the checkpoint's schedule was built with max_alternations={saved}; this "
                f"scheduler's max_alternations={self.max_alternations} is kept ("
                + (
                    "None: the alternation does not end by itself)"
                    if self.max_alternations is None
                    else "the run ends after that many (stage 1, stage 2) pairs)"
                )
            )
        self.apply()

    # ------------------------------------------------------------------ data
    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return self.model.feature_transfer.centers.device

    def _split(self, batch: Any) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
        if not isinstance(batch, (tuple, list)) or not 2 <= len(batch) <= 4:
            raise ValueError("a batch must be (x, y), (x, y, index) or (x, y, index, keep)")
        x, y = batch[0], batch[1]
        idx = batch[2] if len(batch) > 2 else None
        keep = batch[3] if len(batch) > 3 else None
        dev = self._device()
        return (
            x.to(dev),
            torch.as_tensor(y).to(dev),
            None if idx is None else torch.as_tensor(idx).to(dev),
            None if keep is None else torch.as_tensor(keep).to(dev),
        )

    @torch.no_grad()
    def update_stats(self, loader: Iterable[Any], *, process_group: Any = None) -> Dict[str, Any]:
        """UpdateStats() of Algorithm 1: encode the whole training set (twice: see
        :meth:`FeatureTransfer.update_stats`) with ``Enc`` in eval mode and refresh ``C``, ``Q``,
        ``h`` and the long-tail pool. ``loader`` must be re-iterable (a ``DataLoader``) and yield
        ``(x, y, index[, keep])``; without ``index`` the positions in the loader are used, so it
        must not shuffle. Returns the :meth:`FeatureTransfer.update_stats` summary (data
        parallel: of the broadcast statistics, the same on every rank). A training
        set without regular or without long-tail classes (:func:`check_tail_split`) is refused
        at the end of the first pass, before the statistics change.

        Data parallel (``torch.distributed`` initialised, ``process_group`` or the world group
        spanning several ranks): every rank must read the *whole* training set, as one process
        does (a plain ``DataLoader``, not a ``DistributedSampler`` shard). At the end of the
        first pass the ranks compare what they read (per-class image counts and a checksum of
        the indices); ranks that read different samples (a sharded loader) are refused with a
        ``ValueError`` on every rank, before the statistics change; an error of one rank's pass
        (its copy of the data, its encoder) is raised on every rank too, naming that rank
        (:func:`~feature_cloud.sync.agree_on_outcome`), and no rank's statistics change. After
        the second pass rank 0's statistics are broadcast, so they are bit-identical on every
        rank (the hard list and long-tail pool that the loaders share out included) even where
        the ranks' encoders differ slightly (BatchNorm running statistics of the last step,
        non-deterministic kernels).
        """
        model = self.model
        was_training = model.encoder.training
        ft = model.feature_transfer
        c = ft.num_classes
        passes: List[Tensor] = []  # the first pass's image counts
        group = process_group
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("process_group given, but torch.distributed is not initialised")
        parallel = is_distributed(group)
        checked: List[bool] = []  # data parallel: this rank took part in the first pass's check

        def features() -> Iterator[FeatureBatch]:
            counts = None if passes else torch.zeros(c, dtype=torch.long, device=self._device())
            # what this rank read (data parallel: the ranks must agree): index checksums
            digest = torch.zeros(3, dtype=torch.long, device=self._device())
            position = 0
            for batch in loader:
                x, y, idx, keep = self._split(batch)
                if counts is not None:  # out-of-range labels are FeatureTransfer's to refuse
                    counts += torch.bincount(y[(y >= 0) & (y < c)], minlength=c)
                    if parallel:
                        i = (
                            idx.reshape(-1).to(torch.long)
                            if idx is not None
                            else torch.arange(position, position + y.shape[0], device=y.device)
                        )
                        position += y.shape[0]
                        # int64 sums wrap alike on every rank
                        digest += torch.stack(
                            [i.numel() + i.new_zeros(()), i.sum(), (i * (i % 1_000_003)).sum()]
                        ).to(digest.device)
                g = model.encode(x)
                flipped = model.encode(self.flip(x)) if self.flip is not None else None
                if keep is None and self.quality is not None:
                    keep = self.quality(x, g)
                yield FeatureBatch(g, y, idx, flipped, keep)
            if counts is not None:
                passes.append(counts)
                if parallel:  # every rank the same samples, before the statistics change
                    checked.append(True)
                    _check_same_data(torch.cat([counts, digest]), group)
                if bool(counts.sum() > 0):  # before the statistics change
                    self.check_class_counts(counts)
                    warn_given_counts_disagree(ft, counts)

        model.encoder.eval()
        try:
            if not parallel:
                summary = ft.update_stats(features)
            else:
                # a pass that fails on some ranks only (a NaN image, a bad label, a shuffling
                # loader in that rank's copy of the data) is raised on every rank, before any
                # rank's statistics change: the ranks agree on the outcome before the commit
                problem: Optional[Exception] = None
                try:
                    stats = ft.compute_stats(features)
                except _PeerFailed:  # another rank's error: raised below with its message
                    pass
                except Exception as exc:
                    problem = exc
                    if not checked:  # failed in the first pass: the others wait in its check
                        empty = torch.zeros(c + 3, dtype=torch.long, device=self._device())
                        _check_same_data(empty, group, failed=True)
                agree_on_outcome(problem, self._device(), group)
                summary = ft.commit_stats(stats)
        finally:
            model.encoder.train(was_training and "encoder" not in model.frozen)
        if parallel:  # the summary of what this rank now holds: rank 0's, on every rank
            _broadcast_own_buffers(ft, group)
            summary = _held_summary(ft, passes[0])
        self.needs_stats = False
        return summary

    def hard_sampler(
        self,
        batch_size: int,
        *,
        process_group: Any = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> StreamSampler:
        """Sampler over the hard list ``h`` for the rest of the current (or next) stage 1; data
        parallel, this rank's share of it (``process_group``, ``rank``, ``world_size``: as
        :meth:`loaders`)."""
        shard = data_parallel_shard(process_group, rank, world_size)
        return self._sampler(self._hard_pool, batch_size, 1, "hard list", shard)

    def _hard_pool(self) -> Tensor:
        ft = self.model.feature_transfer
        if ft.ready and ft.hard_indices.numel() == 0:
            raise ValueError(
                "the hard list is empty although update_stats() has run: no regular-class sample "
                "lies farther from its class center than the class's mean distance"
            )
        return ft.hard_indices

    def tail_sampler(
        self,
        batch_size: int,
        *,
        process_group: Any = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> StreamSampler:
        """Sampler over the samples of the long-tail classes (``D_lt``), same schedule."""
        shard = data_parallel_shard(process_group, rank, world_size)
        return self._sampler(self.tail_pool, batch_size, 2, "long-tail pool", shard)

    def tail_pool(self) -> Tensor:
        """The dataset indices the long-tail batch is drawn from (uniformly): the long-tail
        samples, or with ``tail_sampling="classes"`` the :func:`class_balanced_pool` of them."""
        ft = self.model.feature_transfer
        if ft.ready and ft.tail_indices.numel() == 0:
            raise ValueError(
                "the long-tail pool is empty although update_stats() has run: no long-tail sample "
                f"(no class has <= tail_threshold={ft.tail_threshold} training images); FTL needs "
                "long-tail classes: raise tail_threshold"
            )
        if self.tail_sampling == "classes":
            return class_balanced_pool(ft.tail_indices, ft.tail_labels)
        return ft.tail_indices

    def data_sampler(
        self,
        dataset_size: int,
        batch_size: int,
        *,
        process_group: Any = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
    ) -> StreamSampler:
        """Sampler over the whole dataset for the rest of the current stage 0 or 2 (Eq. 4)."""
        pool = torch.arange(int(dataset_size))
        shard = data_parallel_shard(process_group, rank, world_size)
        return self._sampler(pool, batch_size, 0, "dataset", shard)

    def _sampler(
        self, pool: Any, batch_size: int, which: int, name: str, shard: Tuple[int, int]
    ) -> StreamSampler:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        b = int(batch_size)
        rank, world = shard
        # one independent stream per (stage run, sampler kind): stage 0 is run 0, then stage 1
        # and stage 2 of alternation a are runs 2a+1 and 2a+2; data parallel: the global stream
        # of batch world * b, of which this rank takes its slice of every global batch
        start = self.stage_iteration * b * world
        seed = self._stream_seed(which)
        return StreamSampler(
            pool,
            self.remaining * b * world,
            seed=seed,
            start=start,
            name=name,
            batch_size=b,
            rank=rank,
            world_size=world,
        )

    def _stream_seed(self, which: int) -> int:
        """One independent stream per (stage run, kind): stage 0 is run 0, then stage 1 and stage
        2 of alternation ``a`` are runs ``2a+1`` and ``2a+2``; kinds 0-2 are the samplers (dataset,
        hard list, long-tail pool), 3-5 their loaders' generators."""
        run = 0 if self._stage == 0 else 2 * self.alternation + self._stage
        return (self.seed * 1_000_003 + run * 7 + which) % (2**63)

    def _loader(
        self, dataset: Any, batch_size: int, sampler: StreamSampler, which: int, kw: Dict[str, Any]
    ) -> DataLoader[Any]:
        if "generator" in kw or isinstance(dataset, IterableDataset):
            # the caller's generator: the items draw from the RNGs as they stand (as DataLoader)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kw)
        # the stage run's own generator (the workers' base seed: no draw from torch's global
        # RNG), and every item's random draws seeded from its position in the stream
        seed = self._stream_seed(3 + which)
        if sampler.world_size > 1:  # every rank's workers their own base seed
            seed = (seed * 1_000_003 + sampler.rank + 1) % (2**63)
        return DataLoader(
            _SeededItems(dataset),
            batch_size=batch_size,
            sampler=_SeededPositions(sampler),
            drop_last=True,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )

    def loaders(
        self,
        dataset: Any,
        batch_size: int,
        *,
        process_group: Any = None,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        **loader_kwargs: Any,
    ) -> Union[DataLoader[Any], Tuple[DataLoader[Any], DataLoader[Any]]]:
        """``DataLoader``\\ s for the rest of the current stage: ``(hard_loader, tail_loader)`` in
        stage 1, one loader over the whole dataset in stages 0 and 2. Each yields exactly
        :attr:`remaining` batches (``drop_last``); extra keyword arguments go to ``DataLoader``.
        Create them after :meth:`update_stats` in stage 1. The return is typed as either (the
        stage is known at run time only): ``isinstance(loaders, tuple)`` narrows it for a type
        checker (``for batches in zip(*loaders) if isinstance(loaders, tuple) else loaders``).

        Randomness and resuming: unless ``generator`` is given, each loader has its own
        generator seeded from the stage run (its workers' base seed), so iterating it leaves
        torch's global RNG alone, and every item's random draws in ``dataset[i]`` (a random
        augmentation drawing from torch's CPU RNG, Python's ``random`` or NumPy's global RNG,
        as torchvision's transforms do) are seeded from the item's position in the stage's
        stream, in the main process (whose RNGs are put back after each batch) or in a worker.
        So a run resumed mid-stage draws the augmentations the uninterrupted run drew, with any
        ``num_workers`` (0 and more draw the same), and, with torch's RNG state restored,
        continues bit-identically with dropout in the model too. Not covered: draws outside
        ``dataset[i]`` (a random ``collate_fn``), from a CUDA RNG or from a generator the
        dataset holds. The loader then wraps both (``loader.dataset.dataset`` is ``dataset``,
        ``loader.sampler.sampler`` the :class:`StreamSampler`; a batch calls ``dataset[i]``
        per item; the seeding costs about 15 us an item). Before this release the items drew
        from the RNGs as they ran on (other augmentations; with workers a mid-stage resume drew
        others than the uninterrupted run).
        ``generator`` given: the plain ``DataLoader`` with it, the items drawing from the RNGs
        as they stand, as before (a mid-stage resume is then exact only with ``num_workers=0``,
        the global RNG restored and a ``torch.Generator``; ``generator=None``, the global RNG
        as ``DataLoader``'s default, draws each loader's base seed from that RNG).

        Data parallel (the class docs): ``batch_size`` is the *per-rank* batch, and each
        rank's loaders yield its share of every global batch of ``world_size * batch_size``.
        The rank and world size are ``torch.distributed``'s (``process_group``'s; default: the
        world group) when it is initialised, else one process; ``rank`` and ``world_size``
        (both) override them. With several ranks the loaders' own generators differ per rank
        (their workers' base seeds), and every item's draws are seeded from its position in the
        global stream: the ranks draw other augmentations, and together the ones one process
        with the global batch draws.
        """
        if self.finished:
            raise RuntimeError(
                "loaders(): the schedule is finished (max_alternations reached): no stage is left "
                "to load batches for"
            )
        kw = dict(loader_kwargs)
        for bad in ("sampler", "batch_sampler", "shuffle", "batch_size", "drop_last"):
            if bad in kw:
                raise ValueError(
                    f"loaders() sets {bad!r} itself"
                    + (
                        " (its resumable stream; under torch.distributed every rank gets its "
                        "own share of it: no DistributedSampler is needed)"
                        if bad in ("sampler", "batch_sampler")
                        else ""
                    )
                )
        shard: Dict[str, Any] = {
            "process_group": process_group,
            "rank": rank,
            "world_size": world_size,
        }
        if rank is None and data_parallel_shard(process_group)[1] > 1:
            self._check_ranks_agree(process_group, batch_size, dataset)
        if self._stage == 1:
            return (
                self._loader(dataset, batch_size, self.hard_sampler(batch_size, **shard), 1, kw),
                self._loader(dataset, batch_size, self.tail_sampler(batch_size, **shard), 2, kw),
            )
        sampler = self.data_sampler(len(dataset), batch_size, **shard)
        return self._loader(dataset, batch_size, sampler, 0, kw)

    def _check_ranks_agree(self, group: Any, batch_size: int, dataset: Any) -> None:
        """Raise ``ValueError`` on every rank unless the ranks share the stream (``seed``), its
        position, the schedule (stage lengths, alternations, tail sampling), the per-rank batch
        size and the dataset length (-1 without ``len``): otherwise their shares would overlap
        or miss samples silently, or their stages part."""
        keys = (
            *("seed", "stage", "alternation", "stage_iteration", "batch_size", "len(dataset)"),
            *("stage0_iters", "stage_iters", "stage2_iters", "max_alternations"),
            "tail_sampling (0: samples, 1: classes)",
        )
        try:
            size = len(dataset)
        except TypeError:  # stage 1 indexes it only: the hard list and pool are rank 0's
            size = -1
        # the schedule too: ranks whose stages end at other iterations would run other stages
        # (different parts frozen, different loaders) in the same DDP step
        alternations = -1 if self.max_alternations is None else self.max_alternations
        local = torch.tensor(
            [self.seed, self._stage, self.alternation, self.stage_iteration, int(batch_size), size]
            + [self.stage0_iters, self.stage_iters, self.stage2_iters, alternations]
            + [TAIL_SAMPLING.index(self.tail_sampling)],
            dtype=torch.long,
        )
        lows, highs = range_over_ranks(local, group)
        bad = [f"{k} from {lo} to {hi}" for k, lo, hi in zip(keys, lows, highs) if lo != hi]
        if bad:
            raise ValueError(
                "loaders(): the ranks' schedulers or datasets differ ("
                + ", ".join(bad)
                + "): data "
                "parallel, every rank draws its share of one stream, so every rank needs the same "
                "seed (pass seed=, or the same torch.manual_seed before building the scheduler), "
                "the same position (the same checkpoint) and schedule, the same per-rank "
                "batch_size and the same dataset (each rank the whole training set, not a shard)"
            )

    # ------------------------------------------------------------------ stage 1
    def stage1_batches(
        self, hard_batch: Any, tail_batch: Any
    ) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
        """The three stage-1 batches of Algorithm 1 as rich features ``(g, y)``:

        ``(g_r, y_r)`` the hard regular batch, ``(g_t, y_t)`` the long-tail batch and
        ``(g~, y_t')`` the transferred batch, ``g~ = C[y_t] + QQ^T(g_r - C[y_r])`` (Eq. 6), pairing
        row ``k`` of both batches (the first ``min(B_r, B_t)`` rows). ``Enc`` is fixed in stage 1,
        so ``g`` is computed without gradient.
        """
        if self.finished or self._stage != 1:  # before Enc (train mode: BatchNorm) encodes
            where = "the schedule is finished" if self.finished else f"stage {self._stage}"
            raise RuntimeError(
                f"stage1_batches() / stage1_loss() in {where}: Algorithm 1's stage-1 batches "
                "(hard regular, long-tail, transferred) train R and FC in stage 1 only; in "
                "stages 0 and 2 train with model.loss(x, y) (scheduler.stage is the stage of the "
                "next iteration)"
            )
        if self.needs_stats:
            raise RuntimeError(
                "call update_stats() at the start of stage 1 (UpdateStats of Algorithm 1)"
            )
        self.model.apply_pending_freeze()  # Enc in eval mode before it encodes
        xr, yr, _, _ = self._split(hard_batch)
        xt, yt, _, _ = self._split(tail_batch)
        with torch.no_grad():
            gr = self.model.encode(xr)
            gt = self.model.encode(xt)
        n = min(gr.shape[0], gt.shape[0])
        g_tr = self.model.feature_transfer.transfer(gr[:n], yr[:n], yt[:n])
        return (gr, yr), (gt, yt), (g_tr, yt[:n])

    def stage1_loss(self, hard_batch: Any, tail_batch: Any) -> Dict[str, Tensor]:
        """The ``R``/``FC`` loss (Eq. 2-3) of the three stage-1 batches, concatenated into one
        forward pass (one BatchNorm statistic, one optimiser step): the mean over all their
        samples. Returns ``loss``, ``sfmx``, ``reg`` as :meth:`FTLModel.classification_loss`."""
        (gr, yr), (gt, yt), (gx, yx) = self.stage1_batches(hard_batch, tail_batch)
        g = torch.cat([gr, gt.to(gr.dtype), gx.to(gr.dtype)])
        y = torch.cat([yr, yt, yx])
        # only the real long-tail rows feed a LEAP head's statistics and cloud (FTLModel docs)
        return self.model.feature_loss(
            g, y, stats_rows=slice(gr.shape[0], gr.shape[0] + gt.shape[0])
        )

    def __repr__(self) -> str:
        return (
            f"AlternatingScheduler(stage={self._stage}, iteration={self.iteration}, "
            f"stage_iteration={self.stage_iteration}/{self.stage_length}, "
            f"alternation={self.alternation}/{self.max_alternations}"
            + (", finished)" if self.finished else ")")
        )
