"""Module state helpers: buffers whose dtype a module cast must not change (statistics stay
float32 / float64 / int), and loads that are all or nothing."""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Dict, Iterator

from torch import Tensor, nn

__all__ = ["KeepBufferDtypes", "restore_on_error"]


@contextlib.contextmanager
def restore_on_error(*modules: nn.Module) -> Iterator[None]:
    """Put the ``modules``' state (copied on entry) back if the block raises: checkpoint loaders
    that load several parts in turn leave nothing half loaded when a later part is refused."""
    saved = [copy.deepcopy(m.state_dict()) for m in modules]
    try:
        yield
    except BaseException:
        for module, state in zip(modules, saved):
            module.load_state_dict(state)
        raise


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
