"""Checkpoints through a model that holds the package's modules: run every feature-cloud
module's load checks (each under its prefix) before anything loads."""

from __future__ import annotations

import sys
from typing import Any, Dict, Mapping, Tuple, cast

from torch import nn

from .cloud import FeatureCloud
from .distributed import ShardedLEAPMarginHead
from .heads import LEAPMarginHead
from .statistics import ClassStatistics
from .transfer import FeatureTransfer

__all__ = ["check_state_dict", "CheckedBeforeLoading"]


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any], prefix: str = "") -> None:
    """Raise what ``model.load_state_dict(state_dict)`` would raise from a feature-cloud module
    inside ``model`` (a head, PML's ``LEAPLoss``, a sharded head, a :class:`FeatureCloud`, its
    :class:`ClassStatistics`, FTL's :class:`FeatureTransfer`), each under its prefix in
    ``model``'s state dict; loads and changes nothing.

    torch loads a model's children in turn, so a head that refuses a damaged checkpoint (a NaN
    weight, an edited angle memory, another class count) does so after the modules before it
    (the backbone) have loaded theirs. Call this first to refuse the checkpoint with the model as
    it was::

        feature_cloud.check_state_dict(model, state)
        model.load_state_dict(state)

    The package's own models that hold a head (the timm adapter's trainable module, FTLModel,
    fastreid's LEAPBaseline / FTLBaseline) run it themselves before any child loads.
    ``prefix``: where ``model``'s entries start in ``state_dict``.
    """
    checked = _checked_types()
    covered: Tuple[str, ...] = ()
    for name, module in model.named_modules():
        if covered and name.startswith(covered):
            continue  # inside a module checked whole (a head checks its cloud and statistics)
        if isinstance(module, checked):
            where = prefix + name + "." if name else prefix
            cast(Any, module).check_state_dict(dict(state_dict), where)
            if not name:
                return
            covered += (name + ".",)


def _checked_types() -> Tuple[type, ...]:
    """The modules with a ``check_state_dict(state_dict, prefix)`` of the load's checks; PML's
    loss where its adapter is loaded."""
    found: Tuple[type, ...] = (
        LEAPMarginHead,
        ShardedLEAPMarginHead,
        FeatureCloud,
        ClassStatistics,
        FeatureTransfer,
    )
    pml = sys.modules.get("feature_cloud.integrations.pml")
    loss = getattr(pml, "LEAPLoss", None)
    return found + ((loss,) if isinstance(loss, type) else ())


class CheckedBeforeLoading(nn.Module):
    """Mixin of a model that holds heads (a backbone first): ``load_state_dict`` runs
    :func:`check_state_dict` on the whole model before any child loads (torch calls a module's
    ``_load_from_state_dict`` before its children's), so a checkpoint a head refuses leaves the
    backbone as it was too, whatever loader calls ``load_state_dict`` (timm's
    ``load_checkpoint`` / ``resume_checkpoint``, fastreid's ``Checkpointer``)."""

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        check_state_dict(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
