"""Backbones of the evaluation: a small 4-block CNN and any timm model (``pretrained=False``).

Both end in a linear + BatchNorm embedding (LEAP Sec. 4.1), like the demo's backbones.
"""

from __future__ import annotations

from typing import Callable, Dict, Sequence

from torch import Tensor, nn

__all__ = ["ConvNet4", "TimmBackbone", "BACKBONES", "build_backbone"]


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ConvNet4(nn.Module):
    """Four 3x3 conv blocks (strides 1, 2, 2, 2; widths w, 2w, 4w, 8w), global average pooling,
    linear + BN embedding."""

    def __init__(self, in_channels: int, embedding_size: int, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(in_channels, w, 1),
            _block(w, 2 * w, 2),
            _block(2 * w, 4 * w, 2),
            _block(4 * w, 8 * w, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.embedding = nn.Sequential(
            nn.Linear(8 * w, embedding_size), nn.BatchNorm1d(embedding_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.features(x))


class TimmBackbone(nn.Module):
    """``timm.create_model(name, pretrained=False, num_classes=0)`` + linear + BN embedding.
    Nothing is downloaded."""

    def __init__(self, name: str, in_channels: int, embedding_size: int) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_channels)
        self.embedding = nn.Sequential(
            nn.Linear(self.body.num_features, embedding_size), nn.BatchNorm1d(embedding_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.body(x))


BACKBONES: Dict[str, Callable[[int, int], nn.Module]] = {
    "conv4": lambda c, d: ConvNet4(c, d),
}


def check_backbone(name: str) -> None:
    """Raise before anything runs unless ``name`` can be built: ``ValueError`` for an unknown
    name (or timm model), :class:`~feature_cloud._extras.MissingExtra` without timm."""
    if name.startswith("timm:"):
        from .._extras import need

        timm = need("timm", f"--backbone {name}", "timm", extra="timm")
        if not timm.is_model(name[5:]):
            raise ValueError(f"backbone {name!r}: timm has no model {name[5:]!r}")
    elif name not in BACKBONES:
        raise ValueError(
            f"backbone must be one of {list(BACKBONES)} or 'timm:<name>', got {name!r}"
        )


def build_backbone(name: str, input_shape: Sequence[int], embedding_size: int) -> nn.Module:
    """``"conv4"`` or ``"timm:<model name>"`` (e.g. ``timm:resnet18``) for ``(C, H, W)`` inputs."""
    if len(input_shape) != 3:
        raise ValueError(f"evaluate needs images (C, H, W), got input shape {tuple(input_shape)}")
    check_backbone(name)
    c = int(input_shape[0])
    if name.startswith("timm:"):
        net: nn.Module = TimmBackbone(name[5:], c, embedding_size)
    else:
        net = BACKBONES[name](c, embedding_size)
    net.input_shape = tuple(int(v) for v in input_shape)  # type: ignore[assignment]
    return net
