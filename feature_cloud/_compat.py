"""The torch APIs this package calls that are newer than its oldest supported torch (``torch>=2.2``).

``torch.compiler.is_compiling`` arrived in torch 2.3 (``torch._dynamo.is_compiling`` before) and
``torch.compiler.is_exporting`` in 2.5 (``torch.export`` traces through dynamo there, so
``is_compiling`` already answers). The functions are bound, not wrapped, so that dynamo sees the
ones it knows.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

__all__ = [
    "disable_compile",
    "is_compiling",
    "is_exporting",
    "is_tracing",
    "at_trace_time",
    "materialized",
]

is_compiling: Callable[[], bool]
is_exporting: Callable[[], bool]

if hasattr(torch.compiler, "is_compiling"):
    is_compiling = torch.compiler.is_compiling
else:  # torch < 2.3
    from torch._dynamo import is_compiling

if hasattr(torch.compiler, "is_exporting"):
    is_exporting = torch.compiler.is_exporting
else:  # torch < 2.5

    def is_exporting() -> bool:
        return False


def is_tracing() -> bool:
    """Whether ``torch.jit.trace`` (or the legacy ONNX exporter, which traces) is running."""
    return bool(torch._C._get_tracing_state())


_GRAPH_TASK = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (as when activation
    checkpointing, ``torch.utils.checkpoint``, recomputes a forward)."""
    return _GRAPH_TASK is not None and _GRAPH_TASK() != -1


_F = TypeVar("_F", bound=Callable[..., Any])


def disable_compile(fn: _F, reason: str) -> _F:
    """``torch.compiler.disable(fn, reason=reason)``: ``fn`` runs eagerly, a graph break (which
    ``fullgraph=True`` refuses, naming ``reason``; torch < 2.8 takes no reason)."""
    try:
        return torch.compiler.disable(fn, reason=reason)  # type: ignore[no-untyped-call]
    except TypeError:
        return torch.compiler.disable(fn)  # type: ignore[no-untyped-call]


def at_trace_time(fn: Callable[[Any], None]) -> None:
    """``torch._dynamo.comptime(fn)``: ``fn(ctx)`` runs while dynamo traces the caller (once
    per compiled graph, no graph break; ``ctx.get_local(name)`` reads the caller's locals);
    nothing when not compiling."""
    try:
        from torch._dynamo.comptime import comptime
    except ImportError:  # private API: a torch without it gets no trace-time call
        return
    comptime(fn)


def materialized(x: Tensor) -> Tensor:
    """``x`` copied, row by row, into a fresh tensor by an ``index_copy_``: the same values
    (a copy, bit for bit), held in a buffer of its own under ``torch.compile``. Inductor inlines
    a plain copy (``clone``) into the kernels that read it, and recomputes it in the backward
    from the graph's inputs; it does neither through a scatter. Two torch defects need that:
    torch 2.2-2.4's inductor fused ``buf.index_copy_(0, y, f(buf[y]))`` into one loop, so a
    repeated index read the value already written (the statistics' updates, which rely on
    repeated indices writing identical values); torch 2.14's inductor recomputed the compiled imprint
    (:meth:`~feature_cloud.cloud.FeatureCloud.imprint`) in the backward from the statistics
    the forward had updated in place since (a weight gradient 15-19 % off at ``imprint_step``)."""
    rows = torch.arange(x.shape[0], device=x.device)
    return torch.empty_like(x).index_copy_(0, rows, x)
