"""Module state helpers: buffers whose dtype a module cast or a load must not change (statistics
stay float32 / float64 / int), and loads that are all or nothing."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Dict, Iterator, Mapping, Tuple, cast

from torch import Tensor, nn

__all__ = [
    "KeepBufferDtypes",
    "CheckedBeforeLoading",
    "restore_on_error",
    "check_state_dict",
    "keep_loaded_dtypes",
]


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
    """The modules with a ``check_state_dict(state_dict, prefix)`` of the load's checks (imported
    here: they import this module); PML's loss where its adapter is loaded."""
    import sys

    from .cloud import FeatureCloud
    from .distributed import ShardedLEAPMarginHead
    from .heads import LEAPMarginHead
    from .statistics import ClassStatistics
    from .transfer import FeatureTransfer

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


def keep_loaded_dtypes(module: nn.Module, state_dict: Dict[str, Any], prefix: str) -> None:
    """Cast the checkpoint's entries of ``module``'s own buffers to the buffers' dtypes, in the
    state dict a ``_load_from_state_dict`` is given (torch's copy of the user's). A plain load
    copies into the buffer, cast; ``load_state_dict(assign=True)`` (a module built on ``meta``)
    takes the checkpoint's tensor as it is: a half-precision checkpoint left float16 statistics,
    int32 counters, and the next step failed. Complex values are refused before (their imaginary
    part would be dropped)."""
    for name, own in module._buffers.items():
        key = prefix + name
        value = state_dict.get(key)
        if (
            own is not None
            and name not in module._non_persistent_buffers_set
            and isinstance(value, Tensor)
            and value.dtype != own.dtype
            and not value.dtype.is_complex
        ):
            state_dict[key] = value.to(own.dtype)


@contextlib.contextmanager
def restore_on_error(*modules: Any) -> Iterator[None]:
    """Put the ``modules``' state (copied on entry) back if the block raises: checkpoint loaders
    that load several parts in turn leave nothing half loaded when a later part is refused.
    ``modules``: anything with ``state_dict`` / ``load_state_dict`` (an optimizer too); the copy
    is kept in host memory (a resume does not hold a second copy on the device)."""
    saved = [_host_copy(m.state_dict()) for m in modules]
    try:
        yield
    except BaseException:
        for module, state in zip(modules, saved):
            try:
                module.load_state_dict(state)
            except Exception:  # the part that refused the block's state may refuse this too;
                pass  # the others are put back all the same, and the block's error is raised
        raise


def _host_copy(value: Any) -> Any:
    """A deep copy of a state (nested dicts / lists of tensors and plain values) whose tensors
    live in host memory (``meta`` tensors stay: they hold no values)."""
    if isinstance(value, Tensor):
        return value.detach().clone() if value.is_meta else value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        out = type(value)((k, _host_copy(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):  # a state_dict's versions, read by the loaders
            out._metadata = copy.deepcopy(value._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return copy.deepcopy(value)


class KeepBufferDtypes(nn.Module):
    """Mixin: ``.half()``, ``.double()``, ``.bfloat16()``, ``.to(dtype)`` move this module's own
    buffers to the new device but keep their dtype; parameters (weights) follow the cast.

    Statistics accumulated in half precision would lose the small angle differences LEAP is
    about, and a half ``centers`` buffer broke the float32 update (issue 15, item 5). The
    original buffer is converted once (device only), never round-tripped through the new dtype.
    """

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> KeepBufferDtypes:
        before: Dict[str, Tensor] = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        keep_loaded_dtypes(self, state_dict, prefix)  # assign=True too
        super()._load_from_state_dict(state_dict, prefix, *args)


class CheckedBeforeLoading(nn.Module):
    """Mixin of a model that holds heads (a backbone first): ``load_state_dict`` runs
    :func:`check_state_dict` on the whole model before any child loads (torch calls a module's
    ``_load_from_state_dict`` before its children's), so a checkpoint a head refuses leaves the
    backbone as it was too, whatever loader calls ``load_state_dict`` (timm's
    ``load_checkpoint`` / ``resume_checkpoint``, fastreid's ``Checkpointer``)."""

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        check_state_dict(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
