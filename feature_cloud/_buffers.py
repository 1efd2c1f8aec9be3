"""Module state helpers: buffers whose dtype a module cast or a load must not change (statistics
stay float32 / float64 / int), and loads that are all or nothing."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, ContextManager, Dict, Iterator, Sequence

import torch
from torch import Tensor, nn

from ._compat import is_compiling

__all__ = [
    "KeepBufferDtypes",
    "restore_on_error",
    "keep_loaded_dtypes",
    "resized_buffer",
    "normal_tensors",
]


def normal_tensors() -> ContextManager[Any]:
    """``torch.inference_mode(False)`` where inference mode is on: the buffers a module makes
    for itself outside ``forward`` (a memory laid out, a reset, a load prepared) are normal
    tensors even when that runs inside ``torch.inference_mode()`` (an eval or serving helper).
    Made there, they were inference tensors, and the next training step failed with torch's
    "Inplace update to inference tensor outside InferenceMode", naming no buffer. Nothing
    while compiling (the end of online counting lays the memory out inside compiled steps)."""
    if not is_compiling() and torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


def resized_buffer(shape: Sequence[int], like: Tensor) -> Tensor:
    """An empty buffer of ``shape`` with ``like``'s dtype and device, for a load to copy a
    checkpoint's tensor of another length into: a normal tensor even when the load runs inside
    ``torch.inference_mode()`` (an eval or serving helper). Made there, it was an inference
    tensor, and the loaded module's next training step failed with torch's message, naming no
    buffer; torch's own load copies into the existing, normal tensors."""
    with torch.inference_mode(False):
        return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


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
            with torch.inference_mode(False):  # assign=True takes it: a normal tensor
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
