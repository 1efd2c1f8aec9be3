"""Methods of the evaluation and the baseline each one is compared with (paired by seed).

The builders are the demo's (:mod:`feature_cloud.demo.methods`); LEAP is available on both
margins, and FTL gets its own baseline: the same Enc/R/FC model (decoder and m-L2 included)
trained for the same number of steps without feature transfer (stage 0 throughout).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

from torch import Tensor, nn

from ..demo.methods import METHODS, FTLMethod, Method, MethodConfig, _margin

__all__ = [
    "EVAL_METHODS",
    "BASELINES",
    "METHOD_LABELS",
    "FTLWithoutTransfer",
    "head_use",
    "with_baselines",
]


class FTLWithoutTransfer(FTLMethod):
    """FTL's Enc/R/FC model trained by its stage-0 loss only (the FTL baseline)."""

    fit = None  # type: ignore[assignment]
    plain_fc = True  # the user's plain FC: no cloud, no centers, no inference prototypes


def _ftl_base(backbone: nn.Module, num_classes: int, counts: Tensor, cfg: MethodConfig) -> Method:
    return FTLWithoutTransfer(backbone, backbone.input_shape, num_classes, counts, cfg)  # type: ignore[arg-type]


Builder = Callable[[nn.Module, int, Tensor, MethodConfig], Method]

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


def with_baselines(methods: Iterable[str]) -> List[str]:
    """``methods`` with each method's baseline (:data:`BASELINES`) right before it, each name
    once: ``["leap_full_cosface", "ftl"]`` -> ``["cosface", "leap_full_cosface", "ftl_base",
    "ftl"]``. What ``--methods`` and :meth:`~feature_cloud.evaluate.EvalConfig.validate`
    train, so that every method is paired with its baseline. ``KeyError`` for an unknown
    method."""
    out: List[str] = []
    for method in methods:
        base = BASELINES[method]
        for name in ([base] if base else []) + [method]:
            if name not in out:
                out.append(name)
    return out


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


def head_use(method: str, config: Mapping[str, Any]) -> str:
    """Which of ``LEAPMarginHead``'s keyword defaults the model of ``method`` depends on, under an
    evaluation configuration ``config`` (a ``results.json`` ``config``): ``"none"`` (no margin
    head: softmax, m-L2, FTL with the linear FC), ``"plain"`` (a cloud-free head: its own
    keywords, not its ``FeatureCloud``'s), ``"statistics"`` (FTL's cosine FC with inference
    prototypes: a cloud of scale 0, so every keyword, but not ``leap_options``) or ``"leap"``
    (the LEAP methods' head: every keyword, ``leap_options`` applied). A method this release
    does not know, or a configuration without ``ftl_classifier``, counts as ``"leap"``."""
    if method in ("softmax", "ml2"):
        return "none"
    if method in ("cosface", "arcface"):
        return "plain"
    kind = config.get("ftl_classifier")
    if method in ("ftl", "ftl_base") and kind in ("linear", "cosface", "arcface", "leap"):
        if kind == "linear":
            return "none"
        if method == "ftl_base":
            return "plain"
        if kind == "leap":
            return "leap"
        return "plain" if config.get("ftl_prototype_shrinkage") is None else "statistics"
    return "leap"
