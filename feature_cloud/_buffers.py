"""Buffers whose dtype a module cast must not change (statistics stay float32 / float64 / int)."""

from __future__ import annotations

from typing import Callable, Dict

from torch import Tensor, nn

__all__ = ["KeepBufferDtypes"]


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
