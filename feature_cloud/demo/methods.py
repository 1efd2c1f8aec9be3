"""The backbone shared by every method and the methods compared by the demo.

Every method wraps the *same* small backbone (a CNN for images, an MLP for feature vectors,
both ending in a BatchNorm embedding as in LEAP Sec. 4.1) and differs only in its classifier
and loss. Each is an ``nn.Module`` with

* ``loss(x, y) -> Tensor``: the training loss of one batch,
* ``embed(x) -> Tensor``: the embedding used for retrieval (eval mode),
* ``classify(emb) -> Tensor``: closed-set logits,
* ``class_weight() -> Tensor``: the ``(C, D)`` classifier weights (for the weight-norm plot).

The heads and losses come from the package (:class:`~feature_cloud.LEAPMarginHead`,
:class:`~feature_cloud.MetricL2`); nothing here re-implements their math.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..heads import LEAPMarginHead
from ..regularizers import MetricL2

__all__ = [
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
            block(in_channels, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 2),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.embedding = nn.Sequential(nn.Linear(4 * width, embedding_size), nn.BatchNorm1d(embedding_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.features(x))


class MLPBackbone(nn.Module):
    """Two hidden layers (Linear-BN-ReLU) and a linear + BN embedding."""

    def __init__(self, in_features: int, embedding_size: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, embedding_size), nn.BatchNorm1d(embedding_size),
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
    tail_threshold: int = 5  # T of vanilla LEAP: classes with K_i > T are head classes
    memory_per_sample: int = 1  # P of LEAP Eq. 5
    gamma: float = 0.1  # center learning rate, LEAP Sec. 4.1
    warmup_steps: int = 0  # steps before the cloud starts
    ml2_alpha: float = 0.01  # FTL Eq. 4 uses 0.25 (too strong for BN-normalised 64-d features)
    seed: int = 0


class _Method(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def embed(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def on_epoch_start(self, epoch: int) -> None:  # hook for schedule-driven methods
        pass

    def per_class_diagnostics(self) -> Dict[str, Tensor]:
        """Extra ``(C,)`` per-class quantities of the method (reported as diagnostics)."""
        return {}


class SoftmaxMethod(_Method):
    """Plain softmax over raw logits ``W f`` (bias-free linear classifier); with ``ml2_alpha > 0``
    plus FTL's m-L2 regulariser (Eq. 3-4 without feature transfer)."""

    def __init__(self, backbone: nn.Module, num_classes: int, cfg: MethodConfig, ml2_alpha: float) -> None:
        super().__init__(backbone)
        self.fc = nn.Linear(cfg.embedding_size, num_classes, bias=False)
        self.reg = MetricL2(ml2_alpha) if ml2_alpha > 0 else None

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self.fc(self.backbone(x))
        loss = F.cross_entropy(logits, y)
        if self.reg is not None:
            loss = loss + self.reg.from_logits(logits)
        return loss

    def classify(self, emb: Tensor) -> Tensor:
        return self.fc(emb)

    def class_weight(self) -> Tensor:
        return self.fc.weight


class MarginMethod(_Method):
    """CosFace / ArcFace (LEAP Eq. 1-2) or LEAP (Eq. 7-8) through :class:`LEAPMarginHead`."""

    def __init__(self, backbone: nn.Module, head: LEAPMarginHead) -> None:
        super().__init__(backbone)
        self.head = head

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(self.backbone(x), y)

    def classify(self, emb: Tensor) -> Tensor:
        return self.head.logits(emb)

    def class_weight(self) -> Tensor:
        return self.head.weight

    def per_class_diagnostics(self) -> Dict[str, Tensor]:
        """The standard deviation of the cloud angles each class received at the end of
        training, ``sqrt`` of LEAP Eq. 6 / Eq. 9 (absent for plain CosFace / ArcFace)."""
        if self.head.cloud is None:
            return {}
        return {"cloud_std": self.head.statistics.cloud_variance().detach().sqrt()}


def _margin(margin_type: str, cloud):
    def build(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> nn.Module:
        head = LEAPMarginHead(
            cfg.embedding_size, num_classes, margin_type=margin_type, cloud=cloud,
            tail_threshold=cfg.tail_threshold, gamma=cfg.gamma,
            memory_per_sample=cfg.memory_per_sample,
            warmup_steps=cfg.warmup_steps if cloud else 0,
            class_counts=counts if cloud else None, seed=cfg.seed, validate=False,
        )
        return MarginMethod(backbone, head)

    return build


def _leap(cloud: str):
    def build(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> nn.Module:
        return _margin(cfg.leap_margin, cloud)(backbone, num_classes, counts, cfg)

    return build


def _softmax(ml2: bool):
    def build(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> nn.Module:
        return SoftmaxMethod(backbone, num_classes, cfg, cfg.ml2_alpha if ml2 else 0.0)

    return build


Builder = Callable[[nn.Module, int, Tensor, MethodConfig], nn.Module]

#: name -> builder, in the order the tables list them.
METHODS: Dict[str, Builder] = {
    "softmax": _softmax(False),
    "ml2": _softmax(True),
    "cosface": _margin("cosface", None),
    "arcface": _margin("arcface", None),
    "leap_vanilla": _leap("vanilla"),
    "leap_full": _leap("full"),
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
) -> nn.Module:
    """A fresh backbone + the classifier/loss of method ``name`` (a key of :data:`METHODS`)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    backbone = build_backbone(input_shape, cfg.embedding_size)
    return METHODS[name](backbone, num_classes, counts, cfg)


def method_label(name: str, cfg: MethodConfig) -> str:
    label = METHOD_LABELS.get(name, name)
    if name.startswith("leap_"):
        label += f" ({'CosFace' if cfg.leap_margin == 'cosface' else 'ArcFace'})"
    return label


def split_input_shape(x: Tensor) -> Tuple[int, ...]:
    return tuple(int(s) for s in x.shape[1:])
