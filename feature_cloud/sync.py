"""Collectives and synchronised class statistics (the process-group side of :class:`FeatureCloud`).

See :mod:`feature_cloud.distributed` for the design (all-gather of the detached batch rather than
an all-reduce of per-class sums). Without an initialised process group everything here is the
single-process behaviour.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import numbers
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import torch
import torch.distributed as dist
from torch import Tensor

from ._compat import disable_compile
from ._validation import (
    PROBLEM_SLOTS,
    as_int,
    check_batch,
    checked_attribute,
    problem_tensor,
    raise_for_problems,
    static_problems,
    warn_user,
)
from .statistics import ClassStatistics

__all__ = [
    "BATCH_MODES",
    "is_distributed",
    "gather_batch",
    "agree_on_batch",
    "shown_setting",
    "SyncedClassStatistics",
]

#: What a synchronised head receives each step: ``"local"`` (this rank's own batch) or
#: ``"pml_gathered"`` (the batch pytorch-metric-learning's ``DistributedLossWrapper`` has
#: already gathered from all ranks, own rank first).
BATCH_MODES = ("local", "pml_gathered")

ProcessGroup = Any  # torch.distributed.ProcessGroup; None means the default (WORLD) group


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when ``torch.distributed`` is initialised and ``group`` spans more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def collective_device(t: Tensor, group: ProcessGroup = None) -> torch.device:
    """Where ``t`` goes for a collective over ``group``: NCCL moves CUDA tensors only, gloo any."""
    if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return t.device


def range_over_ranks(values: Tensor, group: ProcessGroup = None) -> Tuple[List[int], List[int]]:
    """Each slot's smallest and largest value over the ranks of ``group`` (``values``: the same
    length on every rank): one MAX all-reduce of ``[x, -x]``, one host read."""
    local = values.to(collective_device(values, group), torch.long)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    n = local.numel()
    out = both.tolist()
    return [-v for v in out[n:]], out[:n]


def _rank_world(group: ProcessGroup = None) -> Tuple[int, int]:
    if is_distributed(group):
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


# --------------------------------------------------------------------------------------------
# collectives
# --------------------------------------------------------------------------------------------


def _over_pad_to(pad_to: Optional[int], n: Optional[int], where: str = "") -> ValueError:
    """The error for a batch of ``n`` rows (``None``: some rank's, size unknown here) over ``pad_to``."""
    what = f"this rank's batch has {n} samples, more than pad_to={pad_to}"
    if n is None:
        what = f"a rank's batch has more than pad_to={pad_to} samples"
    at = f" ({where})" if where else ""
    return ValueError(
        f"{what}{at}; pass the largest per-rank batch size (the same value on every rank)"
    )


def _common_size(n: int, device: torch.device, group: ProcessGroup, pad_to: Optional[int]) -> int:
    """The per-rank size every rank pads to: ``pad_to``, or the all-reduced maximum."""
    if pad_to is not None:
        if n > pad_to:
            raise _over_pad_to(pad_to, n)
        return int(pad_to)
    size = torch.tensor([n], device=device, dtype=torch.long)
    dist.all_reduce(size, op=dist.ReduceOp.MAX, group=group)
    return int(size.item())  # one host sync per step; pass pad_to to avoid it


def _pad_rows(x: Tensor, rows: int, value: float) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0],) + tuple(x.shape[1:]), value)
    return torch.cat([x, pad], 0)


class _GatherRows(torch.autograd.Function):
    """All-gather equal-sized row blocks; backward sums every rank's gradient of this rank's block.

    The backward is the reduce-scatter of the all-gather (the gradient of rank ``r``'s rows is the
    sum over ranks of the gradient each rank's part of the loss sends to them), times
    ``grad_scale`` (``world_size`` undoes DDP's gradient averaging of the backbone).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup, grad_scale: float) -> Tensor:
        ctx.group, ctx.grad_scale = group, grad_scale
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        grad = grad.contiguous()
        rows = grad.shape[0] // world
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = grad.new_empty((rows,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter: all-reduce and keep this rank's block
            dist.all_reduce(grad, group=ctx.group)
            out = grad[rank * rows : (rank + 1) * rows]
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None


class _ReplicatedSum(torch.autograd.Function):
    """Sum over ranks whose result feeds computation replicated identically on every rank.

    Forward all-reduces; backward is the identity, because every rank then back-propagates the
    same upstream gradient (Megatron's "reduce from the model-parallel region").
    ``torch.distributed.nn.functional.all_reduce`` would instead sum those equal gradients and
    scale them by ``world_size``.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: ProcessGroup) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        return grad, None


class _OwnRows(torch.autograd.Function):
    """This rank's rows ``[rank * rows, rank * rows + n)`` of a per-sample vector computed
    identically-laid-out on every rank (the global, padded batch), whose backward needs every
    rank's upstream gradient: forward slices, backward all-gathers the ranks' upstream
    gradients into the whole vector's (each rank's rows padded to ``rows``). A collective in
    the backward: every rank must back-propagate."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, rank: int, rows: int, n: int, group: ProcessGroup) -> Tensor:
        ctx.rows, ctx.n, ctx.group, ctx.length = rows, n, group, x.shape[0]
        return x[rank * rows : rank * rows + n].clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], None, None, None, None]:
        padded = grad.new_zeros(ctx.rows)
        padded[: ctx.n] = grad
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(ctx.group))]
        dist.all_gather(parts, padded.contiguous(), group=ctx.group)
        return torch.cat(parts)[: ctx.length], None, None, None, None


def own_rows(x: Tensor, rank: int, rows: int, n: int, group: ProcessGroup = None) -> Tensor:
    """:class:`_OwnRows`: this rank's ``n`` rows of a global per-sample vector, with gradients
    for the whole of it (every rank's upstream weights reach every shard)."""
    return cast(Tensor, _OwnRows.apply(x, rank, rows, n, group))


def gather_batch(
    features: Tensor,
    labels: Tensor,
    group: ProcessGroup = None,
    *,
    pad_to: Optional[int] = None,
    differentiable: bool = False,
    grad_scale: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """All-gather ``(B_r, D)`` features and ``(B_r,)`` labels of every rank, in rank order.

    Batches may differ in size (also 0): each rank pads to a common size ``P`` with zero rows
    labelled ``-1`` (ignored by every loss and statistic), so the result is ``(world * P, D)``
    and rank ``r``'s rows start at ``r * P``. ``P`` is ``pad_to`` when given (no host sync: pass
    the loader's batch size, the same on every rank), else the all-reduced maximum batch size
    (one host sync). ``differentiable=True`` lets gradients flow back to this rank's ``features``
    (scaled by ``grad_scale``); otherwise the features are detached. Without a process group
    the inputs are returned unchanged.
    """
    if not is_distributed(group):
        return (features if differentiable else features.detach()), labels
    rows = _common_size(features.shape[0], features.device, group, pad_to)
    x = _pad_rows(features if differentiable else features.detach(), rows, 0.0)
    y = _pad_rows(labels, rows, -1)
    y_parts = [torch.empty_like(y) for _ in range(dist.get_world_size(group))]
    dist.all_gather(y_parts, y.contiguous(), group=group)
    if differentiable:
        x_all = _GatherRows.apply(x, group, float(grad_scale))
    else:
        x_parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(x_parts, x.contiguous(), group=group)
        x_all = torch.cat(x_parts, 0)
    return x_all, torch.cat(y_parts, 0)


# --------------------------------------------------------------------------------------------
# ranks that agree on a batch
# --------------------------------------------------------------------------------------------

# dtype codes compared across ranks (all-reduced with MAX of the code and of its negation)
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}

#: The settings ranks compare in :func:`agree_on_batch`: ``(name, value)`` pairs of host
#: values, the same names in the same order on every rank.
Settings = Sequence[Tuple[str, Any]]


_PLAIN = (type(None), bool, int, float, str)


def shown_setting(value: Any) -> str:
    """A setting's value as text that is the same in every process for the same value (a
    numpy or Python number alike; ``repr`` of a float round-trips exactly)."""
    if type(value) in _PLAIN:  # the usual case, without the slower ABC checks
        return repr(value)
    if isinstance(value, numbers.Integral):
        return repr(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return repr(value)


def _setting_code(text: str) -> int:
    """A 56-bit code of a setting's text (not Python's ``hash``, which differs per process):
    it and its negation fit the agreement's int64 payload."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


@functools.lru_cache(maxsize=64)
def _settings_codes(key: Tuple[Tuple[str, type, Any], ...]) -> Tuple[List[str], List[int]]:
    """Each setting's text and code (cached: settings seldom change between steps; the key
    holds the types, as ``1 == 1.0 == True`` would share an entry)."""
    shown = [shown_setting(value) for _, _, value in key]
    return shown, [_setting_code(text) for text in shown]


def settings_codes(settings: Settings) -> Tuple[List[str], List[int]]:
    """:func:`shown_setting` and the code of each of ``settings``' values."""
    try:
        return _settings_codes(tuple((name, type(value), value) for name, value in settings))
    except TypeError:  # an unhashable value
        shown = [shown_setting(value) for _, value in settings]
        return shown, [_setting_code(text) for text in shown]


def _raise_for_settings(
    settings: Settings, shown: List[str], group: ProcessGroup, world: int
) -> None:
    """Every rank knows that some setting differs (the agreed codes): all take part in one
    more collective (an error path only) and raise the same error, naming each differing
    setting and its value on every rank."""
    per_rank: List[Optional[List[str]]] = [None] * world
    dist.all_gather_object(per_rank, shown, group=group)
    parts, hints = [], []
    for i, (name, _) in enumerate(settings):
        values: Dict[str, List[int]] = {}
        for r, theirs in enumerate(per_rank):
            values.setdefault(theirs[i] if theirs is not None else "?", []).append(r)
        if len(values) > 1:
            on = [
                f"{v} on rank{'s' if len(rs) > 1 else ''} {_ranks(rs)}" for v, rs in values.items()
            ]
            parts.append(f"{name}: {', '.join(on)}")
            if name in _SETTING_HINTS:
                hints.append(_SETTING_HINTS[name])
    raise ValueError(
        "the ranks hold different settings (assigned on some ranks only?): "
        + "; ".join(parts)
        + ". Every rank's statistics are updated from the same gathered batch and must stay "
        "identical, and the loss must be the same function on every rank: assign the setting on "
        f"every rank{''.join('. ' + h for h in hints)} (raised on every rank of {world}, before "
        "any state changed)"
    )


#: What to do about a differing setting whose fix is not "assign it on every rank".
_SETTING_HINTS = {
    "class_counts": "class_counts are the K_i of the whole training set (LEAP Eq. 5): count "
    "them over the full dataset, not a rank's shard (a DistributedSampler's, per-rank data "
    "shards), and pass the same on every rank (or load the same checkpoint on every rank, or "
    "let every rank count them online from the synchronised batches)",
}


def _ranks(ranks: List[int]) -> str:
    """``0``, ``0, 2`` or ``0-5, 7`` (ranks in runs)."""
    runs: List[List[int]] = []
    for r in ranks:
        if runs and runs[-1][1] == r - 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _rank_name(rank: int, world: int, group: ProcessGroup) -> str:
    """``rank 1 of 2``; in a subgroup the global rank first (torch's logs name that one)."""
    if group is None or group is dist.group.WORLD:
        return f"rank {rank} of {world}"
    return f"global rank {dist.get_global_rank(group, rank)}, rank {rank} of {world} in its group"


#: modules whose exception classes every rank has (the others: a lazily imported module, a
#: class unpickled from a DataLoader worker, may be loaded on the failing rank only)
_SHARED_MODULES = ("builtins", "torch")

_Described = Tuple[List[Tuple[str, str]], str]


class _Message(str):
    """A message that ``KeyError`` shows as it is (``str(KeyError(m))`` is ``repr(m)``)."""

    def __repr__(self) -> str:
        return str(self)


def _described(problem: Optional[BaseException]) -> Optional[_Described]:
    """``problem`` for the other ranks: its class and base classes (``(module, qualname)``,
    nearest first) and its message (a ``str()`` that raises is replaced, so that this rank
    still takes part in the gather)."""
    if problem is None:
        return None
    try:
        text = str(problem)
    except Exception:  # any error: this rank must not leave the others waiting
        text = "<no message: its str() raised>"
    return [(c.__module__, c.__qualname__) for c in type(problem).__mro__], text


def _rebuilt(classes: List[Tuple[str, str]], message: str) -> Exception:
    """The exception of the nearest class in ``classes`` (a class and its bases) that every
    rank has (:data:`_SHARED_MODULES`) and that can be made from ``message`` alone: ``KeyError``,
    ``OSError``, ``torch.OutOfMemoryError`` keep their class, a ``json.JSONDecodeError`` becomes
    a ``ValueError``, a class of the user's an ``Exception``; the same on every rank. A message
    of another class than the original's names that class."""
    qualname = classes[0][1]
    for module, name in classes:
        cls: Any = sys.modules.get(module) if module in _SHARED_MODULES else None
        for part in name.split("."):
            cls = getattr(cls, part, None)
        if not (isinstance(cls, type) and issubclass(cls, Exception)):
            continue
        text = _Message(message if name == qualname else f"{qualname}: {message}")
        try:
            exc = cls(text)
        except Exception:  # a class that takes other arguments: its base
            continue
        if exc.args == (text,):
            return exc
    return Exception(f"{qualname}: {message}")


def _raise_agreed_problem(problem: Optional[Exception], group: ProcessGroup, world: int) -> None:
    """Every rank knows that some rank failed (:func:`agree_on_batch`, :func:`agree_on_outcome`):
    all take part in one more collective (an error path only) and raise the lowest failing
    rank's error (:func:`_rebuilt`: its class where every rank can make it from a message, else
    the nearest base class that can), naming the rank, on the failing rank raised from its own.
    Where every rank failed with the same error, each raises its own, as one process would."""
    mine = _described(problem)
    errors: List[Optional[_Described]] = [None] * world
    dist.all_gather_object(errors, mine, group=group)
    if problem is not None and all(e == mine for e in errors):
        raise problem
    first, (classes, message) = next((r, e) for r, e in enumerate(errors) if e)
    where = f"{_rank_name(first, world, group)}; raised on every rank"
    raise _rebuilt(classes, f"{message or classes[0][1]} ({where})") from problem


def agree_on_outcome(
    problem: Optional[Exception], device: torch.device, group: ProcessGroup
) -> None:
    """Every rank of ``group`` says whether its part of a collective operation failed
    (``problem``, this rank's exception, or ``None``) before any rank keeps its result: one MAX
    all-reduce and one host read; where some rank failed, every rank raises that rank's error
    (the lowest such rank's, naming it; :func:`_raise_agreed_problem`), so none is left waiting
    in a later collective. Without a process group, ``problem`` is raised as it is."""
    _, world = _rank_world(group)
    if world == 1:
        if problem is not None:
            raise problem
        return
    flag = torch.tensor([int(problem is not None)], dtype=torch.long, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if flag.item():
        _raise_agreed_problem(problem, group, world)


# eagerly under torch.compile: dynamo does not trace all_gather_object (a problem found while
# compiling, e.g. the sharded head's imprint refusal, and settings that differ between the ranks
# of a compiled step are raised on every rank with their messages, not dynamo's internal error)
_raise_agreed_problem = disable_compile(
    _raise_agreed_problem, "a rank's bad arguments, agreed on by every rank (an error path)"
)
_raise_for_settings = disable_compile(
    _raise_for_settings, "settings that differ between the ranks (an error path)"
)


def agree_on_batch(
    embeddings: Tensor,
    labels: Tensor,
    embedding_size: int,
    num_classes: int,
    *,
    validate: bool = True,
    group: ProcessGroup = None,
    device: Optional[torch.device] = None,
    pad_to: Optional[int] = None,
    same_dtype: bool = False,
    problem: Optional[Exception] = None,
    settings: Settings = (),
) -> Tuple[Tensor, int]:
    """Check this rank's batch and agree with every rank of ``group`` before any collective
    touches it; returns the labels as int64 and the per-rank row count to pad to.

    ``problem``: an error this rank found in the caller's other arguments (``labels=None``, an
    unknown ``reduction``); it is agreed on first: every rank raises the lowest such rank's
    error (its type and message, naming that rank: :func:`_raise_agreed_problem`).

    ``settings``: ``(name, value)`` pairs of the caller's settings that must be the same on
    every rank (the cloud rule, ``gamma``, ``cloud_scale``, the margin, ...: see
    :meth:`FeatureCloud.agreed_settings <feature_cloud.cloud.FeatureCloud.agreed_settings>`),
    the same names in the same order on every rank. Each value's code (a 56-bit hash of its
    text) and its negation ride in the same all-reduce; where they differ, every rank raises
    the same ``ValueError`` naming each differing setting and its value on every rank (one
    more collective, on that error path only), before any state changes.

    All checks (type, shape, finite values, label range, ``pad_to``, and with ``same_dtype``
    the embeddings' dtype) become a small int64 code vector (:func:`problem_tensor`) that is
    all-reduced with ``MAX`` in **one** collective, together with the batch size (which the
    padded gather needs anyway) and the lowest failing rank. Every rank then raises the same
    exception, naming that rank, or none does: no rank is left blocked in a later collective and
    no rank's state moves ahead of the others'. One host sync (the verdict), replacing the
    size all-reduce of :func:`gather_batch` and the value check of a single process. Without a
    process group this is the local check.

    ``validate=False`` with ``pad_to`` (the batch size known, the value checks off) skips the
    agreement and its host sync: the type, shape, ``pad_to`` and argument checks run on this
    rank alone (host-side attributes only) and raise here only, so the other ranks wait in
    their next collective until the process group's timeout; ranks' dtypes are not compared.
    """
    rank, world = _rank_world(group)
    if world > 1 and not validate and pad_to is not None:  # no agreement: settings unchecked
        return _local_batch_checks(
            embeddings, labels, embedding_size, num_classes, pad_to, problem, rank, world
        )
    if device is None:
        device = embeddings.device if isinstance(embeddings, Tensor) else torch.device("cpu")
    codes = problem_tensor(embeddings, labels, embedding_size, num_classes, validate, device)
    n = int(embeddings.shape[0]) if isinstance(embeddings, Tensor) and embeddings.dim() else 0
    too_big = int(pad_to is not None and n > pad_to)
    dtype_code = _DTYPE_CODES.get(embeddings.dtype, 5) if isinstance(embeddings, Tensor) else 0
    bad_args = int(problem is not None)
    shown, codes_s = settings_codes(settings) if world > 1 else ([], [])
    extra = [too_big, n, dtype_code, -dtype_code, bad_args] + codes_s + [-c for c in codes_s] + [0]
    payload = torch.cat([codes, torch.tensor(extra, dtype=torch.long, device=device)])
    k = len(PROBLEM_SLOTS)
    failing = torch.cat([payload[: k + 1], payload[k + 4 : k + 5]]).amax().clamp_max(1)
    payload[-1] = (world - rank) * failing  # MAX: the lowest failing rank
    if world > 1:
        dist.all_reduce(payload, op=dist.ReduceOp.MAX, group=group)
    verdict = payload.tolist()  # the one host sync
    m = len(codes_s)
    if m and verdict[k + 5 : k + 5 + m] != [-c for c in verdict[k + 5 + m : k + 5 + 2 * m]]:
        _raise_for_settings(settings, shown, group, world)
    where = ""
    if world > 1 and verdict[-1]:
        where = f"{_rank_name(world - verdict[-1], world, group)}; raised on every rank"
    if verdict[k + 4]:
        if world == 1 and problem is not None:
            raise problem
        _raise_agreed_problem(problem, group, world)
    raise_for_problems(verdict[:k], embedding_size, num_classes, where)
    if verdict[k]:
        raise _over_pad_to(pad_to, None, where)
    if same_dtype and world > 1 and verdict[k + 2] != -verdict[k + 3]:
        names = {v: str(d).replace("torch.", "") for d, v in _DTYPE_CODES.items()}
        raise TypeError(
            "ranks passed embeddings of different dtypes ("
            f"{names.get(-verdict[k + 3], 'other')} and {names.get(verdict[k + 2], 'other')}); "
            "use the same dtype (or autocast) on every rank"
        )
    rows = int(pad_to) if pad_to is not None else int(verdict[k + 1])
    return labels.long(), rows


def _local_batch_checks(
    embeddings: Tensor,
    labels: Tensor,
    embedding_size: int,
    num_classes: int,
    pad_to: int,
    problem: Optional[Exception],
    rank: int,
    world: int,
) -> Tuple[Tensor, int]:
    """:func:`agree_on_batch` without the agreement (``validate=False`` with ``pad_to``)."""
    where = f"rank {rank} of {world}; validate=False with pad_to: raised on this rank only"
    if problem is not None:
        exc = TypeError if type(problem) is TypeError else ValueError  # as the agreement's
        raise exc(f"{problem} ({where})") from problem
    static = static_problems(embeddings, labels, embedding_size)
    raise_for_problems(
        static + [0] * (len(PROBLEM_SLOTS) - len(static)),  # no value checks: validate=False
        embedding_size,
        num_classes,
        where,
    )
    if int(embeddings.shape[0]) > pad_to:
        raise _over_pad_to(pad_to, int(embeddings.shape[0]), where)
    return labels.long(), int(pad_to)


# --------------------------------------------------------------------------------------------
# synchronised statistics
# --------------------------------------------------------------------------------------------


class HoldsProcessGroup:
    """Mixin for modules with a ``process_group`` attribute, which ``pickle`` cannot hold:
    ``copy.copy`` and ``copy.deepcopy`` (an EMA copy) share the group; ``pickle`` / ``torch.save`` of the whole
    module leaves an explicit group out, and the loaded module (another process) uses the
    default group, with a warning."""

    process_group: ProcessGroup

    def __deepcopy__(self, memo: Dict[int, Any]) -> Any:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        state = super().__getstate__()  # type: ignore[misc]
        group = state.pop("process_group", None)
        state = copy.deepcopy(state, memo)
        state["process_group"] = group
        new.__setstate__(state)
        return new

    def __copy__(self) -> Any:
        new = type(self).__new__(type(self))
        new.__setstate__(super().__getstate__())  # type: ignore[misc]
        return new

    def __getstate__(self) -> Dict[str, Any]:
        state: Dict[str, Any] = super().__getstate__()  # type: ignore[misc]
        if state.get("process_group") is not None:
            state["process_group"] = None
            state["_group_left_out"] = True
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        left_out = state.pop("_group_left_out", False)
        super().__setstate__(state)  # type: ignore[misc]
        if left_out:
            warn_user(
                f"this {type(self).__name__} was pickled with an explicit process_group, which "
                "pickle cannot hold; it uses the default group now (set the group again: "
                "feature_cloud.distributed.synchronize(head, process_group=...) for a replicated "
                "head, the process_group attribute of a ShardedLEAPMarginHead)"
            )


def _check_batch_mode(batch: Any) -> str:
    if batch not in BATCH_MODES:
        raise ValueError(f"batch must be one of {BATCH_MODES}, got {batch!r}")
    return str(batch)


class SyncedClassStatistics(HoldsProcessGroup, ClassStatistics):
    r""":class:`ClassStatistics` updated from the global batch of a process group.

    Every rank calls :meth:`update` with its own batch (``batch="local"``); the detached features
    and labels are all-gathered (padded, see :func:`gather_batch`) and folded in with the
    single-process update, so centers (LEAP Eq. 4), angle memory (Eq. 3, 5) and hence the cloud
    variances (Eq. 6, 9) are identical on all ranks and equal to one process fed the
    concatenation of the ranks' batches in rank order. :attr:`noise_stream` is the rank, so the
    owning head draws an independent, reproducible cloud on each rank.

    With ``batch="pml_gathered"`` the input is already the global batch as arranged by
    pytorch-metric-learning's ``DistributedLossWrapper`` (own rank first, then the others in
    rank order, equal sizes); it is reordered to rank order and no communication happens.

    Without an initialised process group (or with one rank) this is exactly
    :class:`ClassStatistics`. The state dict is the same as the base class's, so checkpoints move
    freely between synchronised and single-process modules.

    Every check (type, shape, finite features, label range, ``pad_to``) is agreed on by all
    ranks in one all-reduce before the gather (:func:`agree_on_batch`), so a bad batch on one
    rank raises the same exception on every rank, before any state changes, instead of leaving
    the others blocked in the collective. Features are gathered in float32 (the statistics'
    dtype) and labels as int64, so ranks may pass different float / integer dtypes.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        process_group: ProcessGroup = None,
        pad_to: Optional[int] = None,
        batch: str = "local",
        **kwargs: Any,
    ) -> None:
        _check_batch_mode(batch)
        if pad_to is not None:
            pad_to = as_int(pad_to, "pad_to", 0)
        super().__init__(num_classes, embedding_size, **kwargs)
        self.process_group = process_group
        self.pad_to = pad_to
        self.batch = batch
        self._agreed: Optional[Tuple[Tensor, Tensor, int]] = None

    # checked on assignment too (PML's adapter sets ``batch`` for each step; ``batch =
    # "bogus"`` or ``pad_to = "x"`` was taken, and changed the next step silently or in it)
    _CHECKED = ClassStatistics._CHECKED + ("pad_to", "batch")
    pad_to = checked_attribute(
        "pad_to",
        lambda _, value: None if value is None else as_int(value, "pad_to", 0),
        "Rows every rank's batch is padded to for the gather (``None``: the largest); checked.",
    )
    batch = checked_attribute(
        "batch",
        lambda _, value: _check_batch_mode(value),
        "Whether a batch is the rank's own (``'local'``) or PML's gathered one; checked.",
    )

    @classmethod
    def from_statistics(cls, stats: ClassStatistics, **kwargs: Any) -> SyncedClassStatistics:
        """A synchronised copy of ``stats`` (same configuration, buffers and device)."""
        new = cls(
            stats.num_classes,
            stats.embedding_size,
            gamma=stats.gamma,
            memory_per_sample=stats.memory_per_sample,
            cloud=stats.rule,
            tail_threshold=stats.tail_threshold,
            count_updates=stats.count_updates,
            center_rate=stats.center_rate,
            unknown_variance=stats.unknown_variance,
            max_age=stats.max_age,
            **kwargs,
        ).to(stats.centers.device)
        new.load_state_dict(stats.state_dict())
        new.train(stats.training)
        new._initial_counts = getattr(stats, "_initial_counts", None)  # reset_parameters' layout
        new._layout_given = stats._counts_were_given()  # where the loaded layout came from
        return new

    @property
    def collective(self) -> bool:  # type: ignore[override]
        """Whether :meth:`update` communicates (every rank must then call it every step)."""
        return self.batch == "local" and is_distributed(self.process_group)

    @property
    def noise_stream(self) -> int:
        """The rank in the process group (0 without one); 0 on every rank for a batch that PML's
        ``DistributedLossWrapper`` gathered (every rank holds the global batch, and draws one
        cloud for it: the same loss on every rank, so ``W`` stays the same without DDP)."""
        return 0 if self.batch == "pml_gathered" else _rank_world(self.process_group)[0]

    def draw_order(self, rows: int, device: torch.device) -> Optional[Tensor]:
        """A batch that ``DistributedLossWrapper`` gathered, in rank order
        (:func:`pml_rank_order`): its cloud is drawn in that order from one stream
        (:attr:`noise_stream`), the same on every rank."""
        if self.batch != "pml_gathered" or not is_distributed(self.process_group):
            return None
        return pml_rank_order(rows, self.process_group, device)

    def _agree_on_batch(
        self,
        features: Tensor,
        labels: Tensor,
        validate: bool,
        problem: Optional[Exception] = None,
        settings: Settings = (),
    ) -> Tuple[Tensor, int]:
        """:func:`agree_on_batch` with this module's sizes, group, device and padding."""
        return agree_on_batch(
            features,
            labels,
            self.embedding_size,
            self.num_classes,
            validate=validate,
            group=self.process_group,
            device=self.centers.device,
            pad_to=self.pad_to,
            problem=problem,
            settings=settings,
        )

    def agree(
        self,
        features: Tensor,
        labels: Tensor,
        validate: bool = True,
        problem: Optional[Exception] = None,
        settings: Settings = (),
        *,
        keep: bool = True,
    ) -> Tensor:
        """All ranks check their batch and agree on the verdict (one all-reduce; a collective
        call when :attr:`collective`); returns the int64 labels. The next :meth:`update` with
        these tensors reuses the verdict instead of agreeing again (``keep=False``: no update
        follows). ``problem``, ``settings``: see :func:`agree_on_batch`."""
        if not self.collective:
            return super().agree(features, labels, validate, problem)
        labels, rows = self._agree_on_batch(features, labels, validate, problem, settings)
        self._agreed = (features, labels, rows) if keep else None
        return labels

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, validate: bool = True) -> None:
        """All-gather the batch (or reorder a PML-gathered one) and fold it into the statistics."""
        if not is_distributed(self.process_group):
            super().update(features, labels, validate)
            return
        if self.batch == "local":
            agreed, self._agreed = self._agreed, None
            if agreed is not None and agreed[0] is features and agreed[1] is labels:
                rows = agreed[2]
            else:
                labels, rows = self._agree_on_batch(features, labels, validate)
            features, labels = gather_batch(
                features.detach().float(), labels, self.process_group, pad_to=rows
            )
            validate = False  # agreed above
        else:  # the same gathered batch on every rank: local checks agree
            labels = check_batch(features, labels, self.embedding_size, self.num_classes, validate)
            features, labels = _pml_to_rank_order(features, labels, self.process_group)
            validate = False
        super().update(features, labels, validate)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", batch={self.batch!r}, pad_to={self.pad_to}"


def pml_rank_order(n: int, group: ProcessGroup, device: torch.device) -> Tensor:
    """Rows of a batch that ``DistributedLossWrapper`` gathered (order ``[own, 0, .., r-1,
    r+1, ..]``, equal blocks) in rank order: ``batch[index]`` is the same on every rank."""
    rank, world = _rank_world(group)
    if n % world:
        raise ValueError(
            f"a batch gathered by DistributedLossWrapper has world_size * B rows; got {n} rows "
            f"for world_size={world}"
        )
    b = n // world
    # block position of rank k in PML's order
    pos = [0 if k == rank else (k + 1 if k < rank else k) for k in range(world)]
    return torch.cat([torch.arange(p * b, (p + 1) * b, device=device) for p in pos])


def _pml_to_rank_order(
    features: Tensor, labels: Tensor, group: ProcessGroup
) -> Tuple[Tensor, Tensor]:
    """Undo ``DistributedLossWrapper``'s order (:func:`pml_rank_order`)."""
    index = pml_rank_order(features.shape[0], group, features.device)
    return features.detach().index_select(0, index), labels.index_select(0, index)
