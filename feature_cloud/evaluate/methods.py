"""Methods of the evaluation and the baseline each one is compared with (paired by seed).

The builders are the demo's (:mod:`feature_cloud.demo.methods`); LEAP is available on both
margins, and FTL gets its own baseline: the same Enc/R/FC model (decoder and m-L2 included)
trained for the same number of steps without feature transfer (stage 0 throughout).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import Tensor, nn

from ..demo.methods import METHODS, FTLMethod, MethodConfig, _margin

__all__ = ["EVAL_METHODS", "BASELINES", "METHOD_LABELS", "FTLWithoutTransfer"]


class FTLWithoutTransfer(FTLMethod):
    """FTL's Enc/R/FC model trained by its stage-0 loss only (the FTL baseline)."""

    fit = None  # type: ignore[assignment]
    plain_fc = True  # the user's plain FC: no cloud, no centers, no inference prototypes


def _ftl_base(
    backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig
) -> nn.Module:
    return FTLWithoutTransfer(backbone, backbone.input_shape, num_classes, counts, cfg)  # type: ignore[arg-type]


Builder = Callable[[nn.Module, int, Tensor, MethodConfig], nn.Module]

EVAL_METHODS: Dict[str, Builder] = {
    "softmax": METHODS["softmax"],
    "ml2": METHODS["ml2"],
    "cosface": METHODS["cosface"],
    "arcface": METHODS["arcface"],
    "leap_vanilla_cosface": _margin("cosface", "vanilla"),
    "leap_full_cosface": _margin("cosface", "full"),
    "leap_vanilla_arcface": _margin("arcface", "vanilla"),
    "leap_full_arcface": _margin("arcface", "full"),
    "ftl_base": _ftl_base,
    "ftl": METHODS["ftl"],
}

#: method -> the method it is compared with (same seed, backbone, budget and batch order).
BASELINES: Dict[str, Optional[str]] = {
    "softmax": None,
    "ml2": "softmax",
    "cosface": None,
    "arcface": None,
    "leap_vanilla_cosface": "cosface",
    "leap_full_cosface": "cosface",
    "leap_vanilla_arcface": "arcface",
    "leap_full_arcface": "arcface",
    "ftl_base": None,
    "ftl": "ftl_base",
}

METHOD_LABELS: Dict[str, str] = {
    "softmax": "Softmax",
    "ml2": "m-L2",
    "cosface": "CosFace",
    "arcface": "ArcFace",
    "leap_vanilla_cosface": "LEAP vanilla (CosFace)",
    "leap_full_cosface": "LEAP full (CosFace)",
    "leap_vanilla_arcface": "LEAP vanilla (ArcFace)",
    "leap_full_arcface": "LEAP full (ArcFace)",
    "ftl_base": "Enc/R/FC without transfer",
    "ftl": "FTL",
}
