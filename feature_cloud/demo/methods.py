"""The backbone shared by every method and the methods compared by the demo.

Every method wraps the *same* small backbone (a CNN for images, an MLP for feature vectors,
both ending in a BatchNorm embedding as in LEAP Sec. 4.1) and differs only in its classifier
and loss. Each is an ``nn.Module`` with

* ``loss(x, y) -> Tensor``: the training loss of one batch,
* ``embed(x) -> Tensor``: the embedding used for retrieval (eval mode),
* ``classify(emb) -> Tensor``: closed-set logits (a LEAP head's: against its prototypes),
* ``classify_weights(emb) -> Tensor``: closed-set logits against the class weights themselves,
* ``class_weight() -> Tensor``: the ``(C, D)`` classifier weights (for the weight-norm plot),
* optionally ``fit(x, y, total_steps, batch_size, step)``: its own schedule (FTL), same budget.

The heads and losses come from the package (:class:`~feature_cloud.LEAPMarginHead`,
:class:`~feature_cloud.MetricL2`); nothing here re-implements their math.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .. import functional as FC
from ..ftl import (
    FILTERS,
    TAIL_SAMPLING,
    AlternatingScheduler,
    ConvDecoder,
    FTLModel,
    IndexedDataset,
    StreamSampler,
    make_filter,
)
from ..heads import LEAPMarginHead
from ..regularizers import MetricL2
from ..transfer import FeatureTransfer

__all__ = [
    "Method",
    "MethodConfig",
    "METHODS",
    "METHOD_LABELS",
    "build_backbone",
    "build_method",
    "ConvBackbone",
    "MLPBackbone",
]


class ConvBackbone(nn.Module):
    """Three 3x3 conv blocks (strides 1, 2, 2), global average pooling, linear + BN embedding."""

    def __init__(self, in_channels: int, embedding_size: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(in_channels, width, 1),
            block(width, 2 * width, 2),
            block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embedding = nn.Sequential(
            nn.Linear(4 * width, embedding_size), nn.BatchNorm1d(embedding_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.features(x))


class MLPBackbone(nn.Module):
    """Two hidden layers (Linear-BN-ReLU) and a linear + BN embedding."""

    def __init__(self, in_features: int, embedding_size: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, width),
            nn.BatchNorm1d(width),
            nn.ReLU(inplace=True),
            nn.Linear(width, embedding_size),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_backbone(input_shape: Sequence[int], embedding_size: int) -> nn.Module:
    """A :class:`ConvBackbone` for ``(C, H, W)`` inputs, an :class:`MLPBackbone` for ``(F,)``."""
    if len(input_shape) == 3:
        return ConvBackbone(int(input_shape[0]), embedding_size)
    if len(input_shape) == 1:
        return MLPBackbone(int(input_shape[0]), embedding_size)
    raise ValueError(f"input shape must be (C, H, W) or (F,), got {tuple(input_shape)}")


@dataclass
class MethodConfig:
    """Hyper-parameters shared by the methods (paper defaults where the paper gives them)."""

    embedding_size: int = 64
    leap_margin: str = "cosface"  # base margin of the LEAP variants (LEAP-CV / LEAP-CF)
    # scale s and margin m of every margin head (CosFace / ArcFace, the LEAP heads, FTL's cosine
    # FC and its baseline's), so that a method and its baseline share them; None: the margin's
    # default (CosFace s=24, m=0.2; ArcFace s=16, m=0.2 rad: the paper's re-ID setting)
    scale: Optional[float] = None
    margin: Optional[float] = None
    tail_threshold: int = 5  # T of vanilla LEAP: classes with K_i > T are head classes
    memory_per_sample: int = 1  # P of LEAP Eq. 5
    gamma: float = 0.1  # center learning rate, LEAP Sec. 4.1
    warmup_steps: int = 0  # steps before the cloud starts
    ml2_alpha: float = 0.01  # FTL Eq. 4 uses 0.25 (too strong for BN-normalised 64-d features)
    ftl_alternations: int = (
        1  # (stage 1, stage 2) pairs of FTL Algorithm 1 after stage 0 (paper: 10-15)
    )
    # FTL stage 0 as a share of the steps; None: ``warmup_steps`` (the LEAP warm-up) as before.
    # Real faces (README, FTL results): a short stage 0 leaves Enc under-trained for the budget.
    ftl_stage0_fraction: Optional[float] = 0.7
    # FTL after stage 0: "alternating" (Algorithm 1: stage 1 / stage 2 pairs) or "joint" (every
    # step trains Enc/Dec/R/FC on a normal batch plus R/FC on a transferred tail batch, Eq. 6,
    # UpdateStats once an epoch; no part frozen) or "retrain" (one stage 1 for the rest of the
    # budget: Enc fixed after stage 0, R/FC re-trained with transfer; no stage 2)
    ftl_schedule: str = "alternating"
    # FTL "alternating" schedule: the share of each (stage 1, stage 2) pair's steps given to
    # stage 1 (the rest to stage 2); 0.5: the paper's equal stages. Only for "alternating".
    ftl_stage1_share: float = 0.5
    # FTL stage 1's long-tail batch: "samples" (uniform over long-tail samples) | "classes"
    ftl_tail_sampling: str = "samples"
    # FC rows that FTL stage 1 trains: "all" (Algorithm 1) | "tail" (the long-tail classes' rows
    # only; the regular classes' rows stay as stage 0 left them) | "none" (FC stays as stage 0
    # left it: stage 1 trains R alone)
    ftl_stage1_fc: str = "all"
    # FTL's PCA basis Q: the smallest number of components reaching this share of the regular
    # classes' intra-class variance (paper: 95 %); 1.0 transfers the whole residual
    ftl_energy: float = 0.95
    # R (the filter) in FTL stage 1: "trained" (Algorithm 1: R and FC) | "fixed" (FC only)
    ftl_stage1_filter: str = "trained"
    # FTL's filter R: "mlp" (Linear-BN-ReLU-Linear, the paper's role) | "residual" (f = g + R(g),
    # R's last layer zero-initialised: Enc/R/FC starts as Enc/FC; feature_cloud.ftl.make_filter)
    ftl_filter: str = "mlp"
    # FTL's FC: "linear" (the paper's softmax + m-L2) or a cosine-margin head, "cosface" /
    # "arcface" (a LEAPMarginHead without cloud; no m-L2: the head normalises W and f), or "leap"
    # (the LEAP methods' default head on ``leap_margin``, ``leap_options`` applied).
    ftl_classifier: str = "linear"
    # Inference prototypes of FTL's cosine-margin FC (LEAPMarginHead ``prototype_shrinkage``): the
    # FC tracks its class centers of ``f`` (Eq. 4 of LEAP, no cloud) and scores tail classes
    # against weights shrunk towards them; None: plain weights. The no-transfer baseline never
    # gets them. No effect with the linear FC.
    ftl_prototype_shrinkage: Optional[float] = None
    # LEAP methods: FeatureCloud ``imprint_step`` (the class weights imprinted with the inference
    # prototypes before this step); None: never
    imprint_step: Optional[int] = None
    seed: int = 0
    leap_options: Dict[str, Any] = field(default_factory=dict)  # extra LEAPMarginHead kwargs


class Method(nn.Module):
    """A demo / evaluation method: a backbone and its classifier, trained by ``loss`` (or its
    own ``fit``), scored by ``classify`` and reported by its diagnostics."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def embed(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def classify(self, emb: Tensor) -> Tensor:
        """Inference logits ``(B, C)`` of the embeddings."""
        raise NotImplementedError

    def class_weight(self) -> Tensor:
        """The ``(C, D)`` class weights."""
        raise NotImplementedError

    def per_class_diagnostics(self) -> Dict[str, Tensor]:
        """Extra ``(C,)`` per-class quantities of the method (reported as diagnostics)."""
        return {}

    def classify_weights(self, emb: Tensor) -> Tensor:
        """Logits against the class weights themselves (a LEAP head's ``logits`` use its
        prototypes; the same as :meth:`classify` for every other method)."""
        return self.classify(emb)


class SoftmaxMethod(Method):
    """Plain softmax over raw logits ``W f`` (bias-free linear classifier); with ``ml2_alpha > 0``
    plus FTL's m-L2 regulariser (Eq. 3-4 without feature transfer)."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, cfg: MethodConfig, ml2_alpha: float
    ) -> None:
        super().__init__(backbone)
        self.fc = nn.Linear(cfg.embedding_size, num_classes, bias=False)
        self.reg = MetricL2(ml2_alpha) if ml2_alpha > 0 else None

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self.fc(self.backbone(x))
        loss = F.cross_entropy(logits, y.long())  # int32 labels too (check_data takes them)
        if self.reg is not None:
            loss = loss + self.reg.from_logits(logits)
        return loss

    def classify(self, emb: Tensor) -> Tensor:
        return self.fc(emb)

    def class_weight(self) -> Tensor:
        return self.fc.weight


def _weight_logits(head: LEAPMarginHead, emb: Tensor) -> Tensor:
    """A margin head's logits against its class weights (not its inference prototypes)."""
    return FC.cosine_logits(emb, head.weight, head.sub_centers) * head.scale


def _cloud_diagnostics(head: nn.Module) -> Dict[str, Tensor]:
    """The standard deviation of the cloud angles each class received at the end of training,
    ``sqrt`` of LEAP Eq. 6 / Eq. 9, for a :class:`LEAPMarginHead` with a cloud (else nothing)."""
    if not isinstance(head, LEAPMarginHead) or head.cloud is None:
        return {}
    return {"cloud_std": head.statistics.cloud_variance().detach().sqrt()}


class MarginMethod(Method):
    """CosFace / ArcFace (LEAP Eq. 1-2) or LEAP (Eq. 7-8) through :class:`LEAPMarginHead`."""

    def __init__(self, backbone: nn.Module, head: LEAPMarginHead) -> None:
        super().__init__(backbone)
        self.head = head

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(self.backbone(x), y)

    def classify(self, emb: Tensor) -> Tensor:
        return self.head.logits(emb)

    def classify_weights(self, emb: Tensor) -> Tensor:
        return _weight_logits(self.head, emb)

    def class_weight(self) -> Tensor:
        return self.head.weight

    def per_class_diagnostics(self) -> Dict[str, Tensor]:
        """The cloud's per-class std (absent for plain CosFace / ArcFace)."""
        return _cloud_diagnostics(self.head)


FTL_CLASSIFIERS = ("linear", "cosface", "arcface", "leap")
FTL_SCHEDULES = ("alternating", "joint", "retrain")
FTL_STAGE1_FC = ("all", "tail", "none")
FTL_STAGE1_FILTER = ("trained", "fixed")


def check_margin_options(cfg: Any) -> None:
    """Check ``scale`` and ``margin`` of a :class:`MethodConfig` or an evaluation config: ``None``
    or a finite number (scale > 0, margin >= 0), and never in ``leap_options`` (they apply to a
    method *and* its baseline; ``leap_options`` only to the LEAP heads, whose cloud-off baseline
    would keep the default); ``ValueError``."""
    for name, bound in (("scale", "> 0"), ("margin", ">= 0")):
        value = getattr(cfg, name)
        if value is None:
            if name in (cfg.leap_options or {}):
                raise ValueError(
                    f"{name} in leap_options ({cfg.leap_options[name]}) would set the LEAP heads "
                    f"only, not their baseline (the same head with the cloud off): give it as "
                    f"--{name} ({name}=...), which sets every margin head"
                )
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (
            number and math.isfinite(value) and (value > 0 or (value == 0 and name == "margin"))
        ):
            raise ValueError(f"{name} must be a finite number {bound} or None, got {value!r}")
        if name in (cfg.leap_options or {}):
            raise ValueError(
                f"{name} is given twice: as the {name} of every margin head ({value}) and in "
                f"leap_options ({cfg.leap_options[name]}, the LEAP heads only); set it once"
            )


def check_training_options(cfg: Any) -> None:
    """Check ``lr`` (finite, > 0), ``weight_decay`` and ``ml2_alpha`` (finite, >= 0) of a demo or
    evaluation config (the same field names); ``ValueError`` names the option."""
    for name, positive in (("lr", True), ("weight_decay", False), ("ml2_alpha", False)):
        value = float(getattr(cfg, name))
        if not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            bound = "> 0" if positive else ">= 0"
            raise ValueError(f"{name} must be a finite number {bound}, got {getattr(cfg, name)}")


def check_ftl_options(cfg: Any) -> None:
    """Check the FTL schedule options of a :class:`MethodConfig` or an evaluation config (the
    same field names), before anything is built; ``ValueError`` names the option."""
    if int(cfg.ftl_alternations) < 1:
        raise ValueError(f"ftl_alternations must be >= 1, got {cfg.ftl_alternations}")
    fraction = cfg.ftl_stage0_fraction
    if fraction is not None and not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"ftl_stage0_fraction must be in [0, 1) or None, got {fraction}")
    schedule = cfg.ftl_schedule
    if schedule not in FTL_SCHEDULES:
        raise ValueError(f"ftl_schedule must be one of {FTL_SCHEDULES}, got {schedule!r}")
    share = float(cfg.ftl_stage1_share)
    if not 0.0 < share < 1.0:
        raise ValueError(f"ftl_stage1_share must be in (0, 1), got {cfg.ftl_stage1_share}")
    if share != 0.5 and schedule != "alternating":
        raise ValueError(
            f"ftl_stage1_share={cfg.ftl_stage1_share} only applies to ftl_schedule="
            f"'alternating' (it splits each (stage 1, stage 2) pair); ftl_schedule="
            f"{schedule!r} has no stage 2: leave ftl_stage1_share at 0.5"
        )
    energy = float(cfg.ftl_energy)
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"ftl_energy must be in (0, 1], got {cfg.ftl_energy}")
    if cfg.ftl_tail_sampling not in TAIL_SAMPLING:
        raise ValueError(
            f"ftl_tail_sampling must be one of {TAIL_SAMPLING}, got {cfg.ftl_tail_sampling!r}"
        )
    if cfg.ftl_filter not in FILTERS:
        raise ValueError(f"ftl_filter must be one of {FILTERS}, got {cfg.ftl_filter!r}")
    for name, choices in (
        ("ftl_stage1_fc", FTL_STAGE1_FC),
        ("ftl_stage1_filter", FTL_STAGE1_FILTER),
    ):
        value = getattr(cfg, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if value != choices[0] and schedule == "joint":
            raise ValueError(f"{name}={value!r} needs a stage 1: not with ftl_schedule='joint'")
    if cfg.ftl_stage1_fc == "none" and cfg.ftl_stage1_filter == "fixed":
        raise ValueError(
            "ftl_stage1_fc='none' with ftl_stage1_filter='fixed' leaves nothing to train in "
            "stage 1 (Enc, R and FC all fixed)"
        )


def _cloud_options(cfg: MethodConfig, counts: Optional[Tensor], cloud: bool) -> Dict[str, Any]:
    """The LEAP methods' cloud keywords of :class:`LEAPMarginHead` from ``cfg`` (``leap_options``
    override them); without a cloud: no warm-up, no class counts, no options."""
    options: Dict[str, Any] = dict(
        tail_threshold=cfg.tail_threshold,
        gamma=cfg.gamma,
        memory_per_sample=cfg.memory_per_sample,
        warmup_steps=cfg.warmup_steps if cloud else 0,
        class_counts=counts if cloud else None,
    )
    if cloud:
        if cfg.imprint_step is not None:
            options["imprint_step"] = cfg.imprint_step
        options.update(cfg.leap_options)
    return options


def ftl_classifier(
    cfg: MethodConfig,
    embedding_size: int,
    num_classes: int,
    counts: Optional[Tensor] = None,
    plain: bool = False,
) -> Tuple[nn.Module, float]:
    """FTL's ``FC`` and its m-L2 weight for ``cfg.ftl_classifier``: a bias-free linear softmax with
    ``cfg.ml2_alpha`` (the paper), or a :class:`LEAPMarginHead` of that margin with no m-L2 (it
    normalises ``W`` and ``f``, so the class weight norms cannot absorb the tail re-balancing of
    stage 1) and no cloud, or (``"leap"``) the LEAP methods' default head (cloud, warm-up, class
    counts, prototypes). With ``cfg.ftl_prototype_shrinkage`` set (and not ``plain``), the head
    keeps class centers of ``f`` (a full-rule cloud of scale 0: statistics, no noise, the same
    training) and its eval-mode logits use the inference prototypes
    (:func:`~feature_cloud.functional.center_prototypes`). With ``plain`` (the no-transfer
    baseline) every cosine kind is the plain, cloud-free head."""
    kind = cfg.ftl_classifier
    check_margin_options(cfg)
    if kind not in FTL_CLASSIFIERS:
        raise ValueError(f"ftl_classifier must be one of {FTL_CLASSIFIERS}, got {kind!r}")
    if kind == "linear":
        return nn.Linear(embedding_size, num_classes, bias=False), cfg.ml2_alpha
    margin = cfg.leap_margin if kind == "leap" else kind
    kappa = cfg.ftl_prototype_shrinkage
    options: Dict[str, Any]
    if plain or (kind != "leap" and kappa is None):
        options = dict(cloud=None)
    elif kind == "leap":  # the default LEAP head of the LEAP methods (cloud, warm-up, prototypes)
        options = dict(cloud="full", **_cloud_options(cfg, counts, True))
        if kappa is not None:
            options["prototype_shrinkage"] = kappa
    else:  # statistics only: class centers for the prototypes, no noise, the same training
        options = dict(
            cloud="full",
            cloud_scale=0.0,
            prototype_shrinkage=kappa,
            gamma=cfg.gamma,
            class_counts=counts,
        )
    # no seed: a cloud draws one from the global RNG as the plain head's does (same init)
    head = LEAPMarginHead(
        embedding_size,
        num_classes,
        margin_type=margin,
        scale=cfg.scale,
        margin=cfg.margin,
        validate=False,
        **options,
    )
    return head, 0.0


class FTLMethod(Method):
    """FTL (Yin et al. 2019) through :class:`~feature_cloud.FTLModel` and
    :class:`~feature_cloud.AlternatingScheduler`: ``Enc`` = the shared backbone (its 64-d output is
    the rich feature ``g``), ``Dec`` reconstructs the input (a :class:`ConvDecoder` for images, an
    MLP for vectors), ``R`` = :func:`make_filter`, ``FC`` = a bias-free linear softmax with m-L2.
    It trains itself (:meth:`fit`): stage 0 for the warm-up, then ``ftl_alternations`` pairs of
    stage 1 (classifier on hard + tail + transferred batches, Eq. 6) and stage 2 (or the joint
    phase of ``ftl_schedule="joint"``), within the same number of optimiser steps as every other
    method.
    """

    #: a plain, cloud-free cosine FC whatever ``cfg`` asks (the no-transfer baseline)
    plain_fc = False

    def __init__(
        self,
        backbone: nn.Module,
        input_shape: Sequence[int],
        num_classes: int,
        counts: Tensor,
        cfg: MethodConfig,
    ) -> None:
        super().__init__(backbone)
        d = cfg.embedding_size
        if len(input_shape) == 3:
            c, h, w = (int(v) for v in input_shape)
            base = max(2, min(h, w) // 4)
            decoder: nn.Module = ConvDecoder(d, (c, h, w), channels=(32, 16), base=base)
        else:
            decoder = nn.Sequential(
                nn.Linear(d, 256),
                nn.BatchNorm1d(256),
                nn.ReLU(inplace=True),
                nn.Linear(256, int(input_shape[0])),
            )
        check_ftl_options(cfg)
        transfer = FeatureTransfer(
            d,
            num_classes,
            energy=float(cfg.ftl_energy),
            tail_threshold=cfg.tail_threshold,
            class_counts=counts,
        )
        classifier, alpha_reg = ftl_classifier(cfg, d, num_classes, counts, self.plain_fc)
        self.ftl = FTLModel(
            backbone,
            classifier,
            feature_dim=d,
            filter_net=make_filter(d, d, 2 * d, form=cfg.ftl_filter),
            decoder=decoder,
            alpha_reg=alpha_reg,
            transfer=transfer,
        )
        self.warmup_steps = cfg.warmup_steps
        self.stage0_fraction = cfg.ftl_stage0_fraction
        self.alternations = cfg.ftl_alternations
        self.schedule = cfg.ftl_schedule
        self.stage1_share = float(cfg.ftl_stage1_share)
        self.tail_sampling = cfg.ftl_tail_sampling
        self.stage1_filter_fixed = cfg.ftl_stage1_filter == "fixed"
        #: FC rows fixed in stage 1: the regular classes' ("tail"), every row ("none")
        self.stage1_fixed_rows: Optional[Tensor] = {
            "all": None,
            "tail": counts > cfg.tail_threshold,
            "none": torch.ones(num_classes, dtype=torch.bool),
        }[cfg.ftl_stage1_fc]
        self.seed = cfg.seed

    def embed(self, x: Tensor) -> Tensor:
        return self.ftl(x)  # f = R(Enc(x))

    def classify(self, emb: Tensor) -> Tensor:
        return self.ftl.logits(emb)

    def classify_weights(self, emb: Tensor) -> Tensor:
        head = self.ftl.classifier
        if isinstance(head, LEAPMarginHead):
            return _weight_logits(head, emb)
        return self.classify(emb)

    def class_weight(self) -> Tensor:
        return self.ftl.classifier.weight

    def per_class_diagnostics(self) -> Dict[str, Tensor]:
        """The cloud's per-class std when ``FC`` is a LEAP head with a cloud
        (``--ftl-classifier leap``)."""
        return _cloud_diagnostics(self.ftl.classifier)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:  # stage 0 / 2 loss, Eq. 4
        return self.ftl.loss(x, y)["loss"]

    def fit(
        self,
        x: Tensor,
        y: Tensor,
        total_steps: int,
        batch_size: int,
        step: Callable[[Tensor], None],
        augment: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        """Algorithm 1 for ``total_steps`` optimiser steps; ``step(loss)`` does backward + update.

        Stage 0 takes ``ftl_stage0_fraction`` of the steps (or ``warmup_steps`` when that is
        ``None``), the rest is split evenly into ``ftl_alternations`` (stage 1, stage 2) pairs,
        stage 1 taking ``ftl_stage1_share`` of each pair (rounded, at least one step each; the
        default 0.5 gives both stages ``rest // (2 * pairs)`` steps, as before the option; stage 0
        also takes the steps the pairs leave over), or, with ``ftl_schedule="joint"``, is one
        joint phase (:meth:`_fit_joint`), or, with ``ftl_schedule="retrain"``, is one stage 1 (no
        stage 2: the encoder stays as stage 0 left it and ``R``/``FC`` are re-trained on the hard,
        long-tail and transferred batches). ``augment`` (e.g. random flips) is applied to every
        training batch, as the caller does for the other methods; UpdateStats reads the
        un-augmented ``x``.
        """
        pairs = self.alternations  # >= 1 (check_ftl_options)
        warm = (
            self.warmup_steps
            if self.stage0_fraction is None
            else int(round(self.stage0_fraction * total_steps))
        )
        if self.schedule in ("joint", "retrain"):  # stage 0, then one phase for the rest
            stage0, stage_iters = warm, max(1, total_steps - warm)
            stage2_iters = stage_iters
        else:
            if self.stage1_share == 0.5:  # equal stages, exactly the lengths before the option
                stage_iters = stage2_iters = max(1, (total_steps - warm) // (2 * pairs))
            else:
                pair = (total_steps - warm) // pairs
                stage_iters = max(1, round(self.stage1_share * pair))
                stage2_iters = max(1, pair - stage_iters)
            stage0 = max(0, total_steps - pairs * (stage_iters + stage2_iters))
        ds = IndexedDataset(torch.utils.data.TensorDataset(x, y))
        stats_loader = torch.utils.data.DataLoader(ds, batch_size=1024)
        sched = AlternatingScheduler(
            self.ftl,
            stage0_iters=stage0,
            stage_iters=stage_iters,
            stage2_iters=stage2_iters,
            seed=self.seed,
            tail_sampling=self.tail_sampling,
        )
        done = 0
        while done < total_steps:
            stage = sched.stage
            if stage != 0 and self.schedule == "joint":
                self._fit_joint(
                    sched, ds, total_steps - done, batch_size, step, augment, stats_loader
                )
                break
            if sched.needs_stats:
                sched.update_stats(stats_loader)
            # the global RNG's base seeds, as before loaders() had their own generators: the
            # tool's runs (and the tables of docs/real-faces.md) keep their bits
            loaders = sched.loaders(ds, batch_size, generator=None)
            if stage == 1 and self.stage1_filter_fixed:  # FC alone in stage 1
                self.ftl.set_frozen((*self.ftl.frozen, "filter"))
            with self._stage1_rows_fixed(stage == 1) as restore_rows:
                for batches in zip(*loaders) if stage == 1 else loaders:
                    if augment is not None:
                        batches = (
                            [(augment(b[0]), *b[1:]) for b in batches]
                            if stage == 1
                            else (augment(batches[0]), *batches[1:])
                        )
                    if stage == 1:
                        loss = sched.stage1_loss(*batches)["loss"]
                    else:
                        loss = self.ftl.loss(batches[0], batches[1])["loss"]
                    step(loss)
                    restore_rows()
                    done += 1
                    if sched.step() != stage or done >= total_steps:
                        break
        self.ftl.set_frozen(())

    @contextlib.contextmanager
    def _stage1_rows_fixed(self, active: bool) -> Iterator[Callable[[], None]]:
        """Around the optimiser steps of one stage-1 pass with ``ftl_stage1_fc="tail"`` or
        ``"none"``: the fixed FC rows (the regular classes' or all) get no gradient (so no
        momentum either), and the yielded ``restore()``, called after each step, puts them back
        as they were when the pass began (weight decay); one snapshot and one hook per pass. A
        no-op otherwise."""
        rows = self.stage1_fixed_rows
        if not active or rows is None:
            yield lambda: None
            return
        weight = self.ftl.classifier.weight
        mask = rows.to(weight.device).unsqueeze(1)
        kept = weight.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                weight.copy_(torch.where(mask, kept, weight))

        hook = weight.register_hook(lambda g: g.masked_fill(mask, 0.0))
        try:
            yield restore
        finally:
            hook.remove()
            restore()

    def _fit_joint(
        self,
        sched: AlternatingScheduler,
        ds: IndexedDataset,
        steps: int,
        batch_size: int,
        step: Callable[[Tensor], None],
        augment: Optional[Callable[[Tensor], Tensor]],
        stats_loader: Any,
    ) -> None:
        """The joint phase (``ftl_schedule="joint"``): nothing frozen; each step's loss is Eq. 4 on
        a normal batch with, in the same ``R``/``FC`` pass, a batch of transferred tail features
        (Eq. 6: hard regular features, encoded without gradient in eval mode, moved to the centers
        of tail labels drawn from the long-tail pool). UpdateStats once an epoch."""
        model, ft = self.ftl, self.ftl.feature_transfer
        model.set_frozen(())
        y_all = ds.dataset.tensors[1]
        per_epoch = max(1, len(ds) // batch_size)
        done, refresh = 0, 0
        while done < steps:
            sched.update_stats(stats_loader)  # Enc in eval mode, back to train (nothing frozen)
            n = min(per_epoch, steps - done)
            seed = (self.seed * 1_000_003 + 7919 * (refresh + 1)) % (2**63)
            loaders = [
                DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=True)
                for sampler in (
                    StreamSampler(torch.arange(len(ds)), n * batch_size, seed, name="dataset"),
                    StreamSampler(ft.hard_indices, n * batch_size, seed + 1, name="hard list"),
                )
            ]
            tail = StreamSampler(sched.tail_pool(), n * batch_size, seed + 2, name="long-tail pool")
            tail_labels = y_all[torch.tensor(list(tail), dtype=torch.long)].view(n, batch_size)
            for k, (normal, hard) in enumerate(zip(*loaders)):
                x, y, xr, yr = normal[0], normal[1], hard[0], hard[1]
                if augment is not None:
                    x, xr = augment(x), augment(xr)
                model.encoder.eval()
                with torch.no_grad():
                    gr = model.encode(xr)
                model.encoder.train()
                gx = ft.transfer(gr, yr, tail_labels[k])
                g = model.encode(x)
                f = model.embed(torch.cat([g, gx.to(g.dtype)]))
                loss = model.classification_loss(
                    f, torch.cat([y, tail_labels[k]]), stats_rows=slice(0, g.shape[0])
                )["loss"]
                step(loss + model.alpha_recon * model.reconstruction_loss(x, g))
                done += 1
            refresh += 1


def _margin(margin_type: str, cloud):
    def build(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> Method:
        check_margin_options(cfg)
        kwargs: Dict[str, Any] = dict(
            margin_type=margin_type,
            scale=cfg.scale,
            margin=cfg.margin,
            cloud=cloud,
            seed=cfg.seed,
            validate=False,
        )
        kwargs.update(_cloud_options(cfg, counts, bool(cloud)))
        head = LEAPMarginHead(cfg.embedding_size, num_classes, **kwargs)
        return MarginMethod(backbone, head)

    return build


def _leap(cloud: str):
    def build(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> Method:
        return _margin(cfg.leap_margin, cloud)(backbone, num_classes, counts, cfg)

    return build


def _softmax(ml2: bool):
    def build(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> Method:
        return SoftmaxMethod(backbone, num_classes, cfg, cfg.ml2_alpha if ml2 else 0.0)

    return build


def _ftl(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> Method:
    return FTLMethod(backbone, backbone.input_shape, num_classes, counts, cfg)  # type: ignore[arg-type]


Builder = Callable[[nn.Module, int, Tensor, MethodConfig], Method]

#: name -> builder, in the order the tables list them.
METHODS: Dict[str, Builder] = {
    "softmax": _softmax(False),
    "ml2": _softmax(True),
    "cosface": _margin("cosface", None),
    "arcface": _margin("arcface", None),
    "leap_vanilla": _leap("vanilla"),
    "leap_full": _leap("full"),
    "ftl": _ftl,
}

METHOD_LABELS: Dict[str, str] = {
    "softmax": "Softmax",
    "ml2": "m-L2 (softmax + FTL Eq. 3)",
    "cosface": "CosFace",
    "arcface": "ArcFace",
    "leap_vanilla": "LEAP vanilla",
    "leap_full": "LEAP full",
    "ftl": "FTL",
}


def build_method(
    name: str, input_shape: Sequence[int], num_classes: int, counts: Tensor, cfg: MethodConfig
) -> Method:
    """A fresh backbone + the classifier/loss of method ``name`` (a key of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    backbone = build_backbone(input_shape, cfg.embedding_size)
    backbone.input_shape = tuple(int(v) for v in input_shape)  # type: ignore[assignment]
    return METHODS[name](backbone, num_classes, counts, cfg)


def method_label(name: str, cfg: MethodConfig) -> str:
    label = METHOD_LABELS.get(name, name)
    if name.startswith("leap_"):
        label += f" ({'CosFace' if cfg.leap_margin == 'cosface' else 'ArcFace'})"
    return label


def split_input_shape(x: Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in x.shape[1:])
