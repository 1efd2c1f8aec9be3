"""Input checks shared by the Modules: clear exceptions before any state changes.

Pure functions, no state. The policies in one place:

* **Labels**: any integer dtype (``uint8``, ``int8``, ``int16``, ``int32``, ``int64``) is accepted
  and converted to ``int64`` after the type/shape check (:func:`check_labels` returns the
  converted tensor); ``bool``, floating and complex labels raise ``TypeError``. ``-1`` marks an
  ignored sample.
* **Features**: any floating dtype; value checks (finite) cost one host sync together with the
  label range check (:func:`check_values`), skipped under ``torch.compile``.
* **Hyper-parameters**: :func:`as_int` / :func:`as_float` reject ``bool``, strings, ``nan`` and
  ``inf`` with a ``TypeError`` / ``ValueError`` naming the argument.
* **Ranks**: :func:`problem_tensor` computes every check as an integer code without raising, so
  that a process group can agree on one verdict (all-reduce of the codes) *before* any collective
  touches the batch; :func:`raise_for_problems` turns the agreed codes into the same exception on
  every rank.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import sys
import unicodedata
import warnings
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    TextIO,
    TypeVar,
    Union,
    cast,
    overload,
)

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from ._compat import is_compiling, is_tracing

#: per-class sample counts as the constructors take them: a tensor, a list of ints, a NumPy
#: integer array (``np.bincount(labels)``) or a mapping class -> count
#: (``collections.Counter(dataset.targets)``; a class it lacks has 0)
ClassCounts = Union[Tensor, Sequence[int], npt.NDArray[Any], Mapping[int, int]]

__all__ = [
    "check_embeddings",
    "check_labels",
    "check_values",
    "check_batch",
    "as_int",
    "as_float",
    "check_class_counts",
    "class_counts_from_mapping",
    "check_reduction",
    "ClassCounts",
    "problem_tensor",
    "raise_for_problems",
    "PROBLEM_SLOTS",
]


# ------------------------------------------------------------------------------------------
# warnings
# ------------------------------------------------------------------------------------------

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
#: code whose frames a warning skips to reach the user's line: this package, its adapters (a
#: sibling folder in a source checkout, inside the package once installed) and torch's Module
#: call machinery (and contextlib's wrappers, which torch 2.4's dynamo runs between its frames and
#: the user's when it warns at trace time)
_SKIPPED = (
    _PACKAGE + os.sep,
    os.path.join(os.path.dirname(_PACKAGE), "integrations") + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
    os.path.abspath(contextlib.__file__),
)


def printable(text: str) -> str:
    """``text`` with every lone surrogate (the undecodable bytes of a file name:
    ``os.fsdecode``'s surrogate escapes, e.g. Latin-1 ``b"\\xe9"`` as ``"\\udce9"``) written as its
    backslash escape ``\\udce9``, as ``repr`` and JSON show it: text any UTF-8 file, terminal or
    plot takes. Text without surrogates is returned unchanged."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def printable_name(name: str) -> str:
    """A name (a file, a folder, a data set's title) on one line: :func:`printable`'s escapes,
    and each control or line-separator character (a newline or tab in a folder name) as its
    backslash escape (``\\n``, ``\\x1b``), as ``repr`` shows it. Other names are unchanged."""
    text = printable(name)
    if not any(unicodedata.category(ch) in _NOT_ON_ONE_LINE for ch in text):
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in _NOT_ON_ONE_LINE
        else ch
        for ch in text
    )


#: Unicode categories :func:`printable_name` escapes: controls, line and paragraph separators
_NOT_ON_ONE_LINE = ("Cc", "Zl", "Zp")


def open_text(file: str, newline: Optional[str] = None) -> TextIO:
    """``file`` opened to write text (Markdown, CSV): UTF-8 whatever the locale, anything UTF-8
    cannot hold (:func:`printable`'s surrogates) as its backslash escape, never an error after
    the work is done."""
    return open(file, "w", encoding="utf-8", errors="backslashreplace", newline=newline)


def warn_user(message: str, category: type = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside this package (and torch's
    ``Module.__call__``): the user's line that built the head, the loss or the task, wherever
    in the package the warning is raised."""
    frame = sys._getframe(1)
    level = 2  # the caller of this function
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _SKIPPED
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def other_rank_message(key: str, saved: Sequence[int], own: Sequence[int]) -> str:
    """The refusal of a checkpoint tensor ``key`` of shape ``saved`` with another number of
    dimensions than the module's ``own`` (flattened, empty, an extra leading dimension): damage,
    not another class count or feature size."""
    return (
        f"checkpoint's {key} has shape {tuple(saved)}, this module's {tuple(own)}: "
        f"{len(saved)}-D, not {len(own)}-D (flattened, emptied or stacked?): the checkpoint is "
        "damaged or was edited"
    )


def refuse_other_shape(
    state_dict: Dict[str, Any], key: str, own: Tensor, message: Callable[..., str]
) -> None:
    """Checkpoints: ``ValueError(message(*saved_shape))`` when ``state_dict[key]`` exists with
    another shape than ``own`` (another class count or feature size), before anything loads;
    ``message`` takes one size a dimension of ``own``. A tensor of another number of dimensions
    is refused by :func:`other_rank_message` instead."""
    saved = state_dict.get(key)
    if saved is None or tuple(saved.shape) == tuple(own.shape):
        return
    if len(saved.shape) != own.dim():
        raise ValueError(other_rank_message(key, saved.shape, own.shape))
    raise ValueError(message(*saved.shape))


#: the floating dtypes ``torch.aminmax`` (and ``isfinite``) has kernels for; the others (the
#: float8 dtypes of a quantised export) are read through float32 by :func:`value_range`
_AMINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: elements of such a tensor upcast at a time (16 MiB of float32, not 4 x the tensor)
_UPCAST_CHUNK = 1 << 22


def value_range(t: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.aminmax(t)`` of a non-empty real tensor (0-d results on its device; a NaN or
    +-inf propagates into them). A floating dtype without an ``aminmax`` kernel (float8) is
    read through float32, :data:`_UPCAST_CHUNK` elements at a time (no float32 copy of the
    whole tensor); torch's ``NotImplementedError`` for one that cannot be cast (float4)."""
    if not t.is_floating_point() or t.dtype in _AMINMAX_DTYPES:
        return torch.aminmax(t)
    flat = t.reshape(-1)
    parts = [
        torch.aminmax(flat[i : i + _UPCAST_CHUNK].float())
        for i in range(0, flat.numel(), _UPCAST_CHUNK)
    ]
    return torch.stack([p[0] for p in parts]).amin(), torch.stack([p[1] for p in parts]).amax()


def raise_for_damage(checks: Dict[str, Tensor], where: str) -> None:
    """The load checks' verdict: ``checks`` maps a problem's name to a 0-d bool tensor (on any
    device); one host read for all of them, and a ``ValueError`` naming each one found in the
    checkpoint's ``where`` (damaged or edited)."""
    flags = torch.stack([c.to("cpu") for c in checks.values()]).tolist() if checks else []
    bad = [name for name, flag in zip(checks, flags) if flag]
    if bad:
        raise ValueError(
            f"checkpoint's {where} holds {', '.join(bad)}: the checkpoint is damaged or was edited"
        )


def any_nonfinite(t: Tensor) -> Tensor:
    """A 0-d bool tensor on ``t``'s device: whether ``t`` holds a NaN or an infinite value. The
    load checks' finiteness test: one ``aminmax`` pass (it propagates NaN and +-inf into its
    results), no temporary of ``t``'s size and no host read (``~isfinite(t).all()`` built about
    1.5 x ``t`` of temporaries a call on CPU); float8 through :func:`value_range`. False for an
    empty tensor and for integer and bool tensors (always finite); a meta tensor gives a meta
    result."""
    if t.is_complex():  # aminmax has no complex kernel (rare: the callers refuse complex)
        return ~torch.isfinite(t).all()
    if not t.is_floating_point() or t.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    lo, hi = value_range(t)
    return ~(torch.isfinite(lo) & torch.isfinite(hi))


def refuse_bad_weight(state_dict: Dict[str, Any], key: str) -> None:
    """Checkpoints: a class weight ``state_dict[key]`` that is not floating point (torch's load
    copies an integer or bool tensor in, cast, without a word) or holds NaN / infinite values
    (every logit of every sample NaN from the first step) is refused, naming the key, before
    anything loads. Run at load only (one host read), never in a step. Used by every head."""
    saved = state_dict.get(key)
    if not isinstance(saved, Tensor) or saved.is_meta:
        return
    if not saved.is_floating_point():  # integers, bool, complex (its imaginary part dropped)
        raise TypeError(
            f"checkpoint's {key} is a {saved.dtype} tensor, not a floating-point class weight: "
            "the checkpoint is damaged or was edited (torch would cast it in silently)"
        )
    try:
        nonfinite = bool(any_nonfinite(saved))  # one pass; the count only when it fails
    except NotImplementedError:  # a dtype torch cannot cast (float4): its own load fails too
        raise TypeError(
            f"checkpoint's {key} is a {saved.dtype} tensor, which torch cannot read as float32 "
            "(no cast kernel): convert it to float32 / bfloat16 before loading"
        ) from None
    if nonfinite:
        readable = saved if saved.dtype in _AMINMAX_DTYPES else saved.float()  # float8
        bad = int((~torch.isfinite(readable)).sum())
        raise ValueError(
            f"checkpoint's {key} holds {bad} NaN / infinite values (of {saved.numel()}): the "
            "checkpoint is damaged (a diverged run saved it?); load an earlier one"
        )


def refuse_bad_weights(
    state_dict: Dict[str, Any], prefix: str, name: str, owner: Optional[torch.nn.Module] = None
) -> None:
    """:func:`refuse_bad_weight` on the class weight ``prefix + name`` and, for a weight under a
    parametrization (``torch.nn.utils.parametrizations.weight_norm``, whose state holds
    ``parametrizations.<name>.original0`` / ``original1`` instead), on every
    ``parametrizations.<name>.original*`` entry: a NaN there loaded without a word. With the
    ``owner`` module, an original of another shape than the owner's own is refused too (torch
    reported it after every other entry had loaded)."""
    refuse_bad_weight(state_dict, prefix + name)
    stem = f"{prefix}parametrizations.{name}.original"
    own = dict(parametrized_originals(owner, name)) if owner is not None else {}
    for key in [k for k in state_dict if k.startswith(stem)]:
        mine = own.get(key[len(prefix) :])
        if mine is not None:
            refuse_other_shape(
                state_dict,
                key,
                mine,
                lambda *shape, key=key, mine=mine: (
                    f"checkpoint's {key} has shape {tuple(shape)}, this module's "
                    f"{tuple(mine.shape)}: a parametrized weight of another class count or "
                    "embedding size"
                ),
            )
        refuse_bad_weight(state_dict, key)


def parametrized_originals(module: torch.nn.Module, name: str) -> List[tuple[str, Tensor]]:
    """The tensors a parametrization (``torch.nn.utils.parametrize``) of ``module.<name>`` keeps,
    under their state-dict names relative to ``module``; empty for a plain weight."""
    lists = getattr(module, "parametrizations", None)
    if not isinstance(lists, torch.nn.ModuleDict) or name not in lists:
        return []
    return [
        (f"parametrizations.{name}.{key}", value)
        for key, value in lists[name].named_parameters(recurse=False)
    ]


# ------------------------------------------------------------------------------------------
# hyper-parameters
# ------------------------------------------------------------------------------------------


def as_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` / ``False`` (numpy's too), else ``TypeError``: ``bool("False")``
    is ``True``, so a flag given as a string would silently mean the opposite."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def as_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    """``value`` as an ``int`` (Python/NumPy integer, integral float such as ``2.0``, 0-d integer
    tensor); ``TypeError`` for ``bool``, strings, fractional or non-finite floats and other
    types, ``ValueError`` below ``minimum``."""
    if (
        isinstance(value, Tensor)
        and value.dim() == 0
        and not value.dtype.is_floating_point
        and value.dtype != torch.bool
        and not value.dtype.is_complex
    ):
        value = int(value.item())
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    out = int(value)
    if minimum is not None and out < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {out}")
    return out


def check_optional_callable(value: Any, name: str, expected: str) -> None:
    """``TypeError`` naming ``name`` unless ``value`` is ``None`` or callable; ``expected``
    describes the callable (``"a callable x -> flipped x"``). A setting used only late in training
    (FTL's ``flip`` / ``quality``, first called by UpdateStats after stage 0) is checked when it is
    given, not when it is first called."""
    if value is not None and not callable(value):
        raise TypeError(
            f"{name} must be {expected} or None, got {value!r} ({type(value).__name__})"
        )


def as_float(
    value: Any,
    name: str,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """``value`` as a finite ``float`` within the given bounds; ``TypeError`` for ``bool``,
    strings and non-numbers, ``ValueError`` for ``nan``/``inf`` or out of bounds."""
    if (
        isinstance(value, Tensor)
        and value.dim() == 0
        and value.dtype != torch.bool
        and not value.dtype.is_complex
    ):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if out != out or abs(out) == math.inf:  # not math.isfinite: dynamo traces a SymFloat here
        raise ValueError(f"{name} must be finite, got {out}")
    low_bad = minimum is not None and (out < minimum if min_inclusive else out <= minimum)
    high_bad = maximum is not None and (out > maximum if max_inclusive else out >= maximum)
    if low_bad or high_bad:
        lo = "(-inf" if minimum is None else ("[" if min_inclusive else "(") + f"{minimum}"
        hi = "inf)" if maximum is None else f"{maximum}" + ("]" if max_inclusive else ")")
        raise ValueError(f"{name} must be in {lo}, {hi}, got {out}")
    return out


#: the reductions of every loss and regulariser (``torch.nn`` losses' own)
REDUCTIONS = ("mean", "sum", "none")


#: the type of a setting's value (what :func:`checked_attribute` / :func:`forwarded` are typed to
#: return, for type checkers: the attribute reads and takes values of its check's result type)
_T = TypeVar("_T")


def checked_attribute(name: str, check: Callable[[Any, Any], _T], doc: str) -> _T:
    """A hyperparameter attribute (a ``property``) that runs ``check(owner, value)`` on every
    assignment, as the constructor checks its keyword: a plain attribute took ``nan`` or
    ``"bogus"`` silently, or failed in the next step after the statistics had moved. The
    value lives in ``_<name>`` (:func:`migrate_checked` reads earlier whole-module pickles).

    Typed as returning the check's result type (a ``property`` at run time): a type checker then
    reads ``head.scale`` as a ``float`` and refuses ``head.scale = "64"``."""
    private = "_" + name

    def fset(owner: Any, value: Any) -> None:
        object.__setattr__(owner, private, check(owner, value))

    return cast(_T, property(_attribute_getter(private), fset, doc=doc))


_NO_DEFAULT = object()


def _attribute_getter(
    path: str, default: Any = _NO_DEFAULT, copy: bool = False
) -> Callable[[Any], Any]:
    """``lambda owner: owner.<path>`` (a dotted path: ``"_impl"``, ``"statistics.gamma"``; with
    ``default``, returned where the path is missing; with ``copy``, a tensor value is cloned)
    as a function with neither closure nor defaults: torch 2.2 - 2.3's dynamo guards a property
    getter's closure cells (and defaults) on the property's *value*
    (``L['self'].impl.__closure__``), so a getter closing over the name failed every
    ``torch.compile`` of a head there (``'str' object has no attribute '__closure__'``). The
    default and the copy are globals of the getter's own namespace."""
    if not all(part.isidentifier() for part in path.split(".")):
        raise ValueError(f"not an attribute path: {path!r}")
    namespace: Dict[str, Any] = {"_default": default, "_copy": _copy}
    value = f"_copy(owner.{path})" if copy else f"owner.{path}"
    if default is _NO_DEFAULT:
        source = f"def fget(owner):\n    return {value}\n"
    else:
        source = (
            f"def fget(owner):\n    try:\n        return {value}\n"
            "    except AttributeError:\n        return _default\n"
        )
    exec(source, namespace)
    return cast(Callable[[Any], Any], namespace["fget"])


def _copy(value: Any) -> Any:
    """A tensor's copy (``value`` itself otherwise): what a fixed tensor setting reads, so that
    ``head.class_counts += 1`` changes the copy, not the state, before its refusal."""
    return value.detach().clone() if isinstance(value, Tensor) else value


def _holder(owner: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        owner = getattr(owner, part)
    return owner


def _is_property(owner: Any, name: str) -> bool:
    return isinstance(getattr(type(owner), name, None), property)


@overload
def forwarded(path: str, check: Callable[[Any, Any], _T], doc: str = "") -> _T: ...


@overload
def forwarded(path: str, check: None = None, doc: str = "") -> Any: ...


def forwarded(path: str, check: Optional[Callable[[Any, Any], Any]] = None, doc: str = "") -> Any:
    """A setting that an object holds in one of its parts (a ``property``): reading it reads
    ``owner.<path>`` (``"feature_cloud.cloud_scale"``, ``"statistics.gamma"``); assigning it
    assigns ``check(owner, value)`` there (the part's own check where it has one), so a
    schedule's ``head.cloud_scale = s`` reaches the cloud (a plain attribute of that name, which
    ``nn.Module`` creates silently, changed nothing). A class attribute: no per-step cost, no
    ``__setattr__`` hook. Typed as the check's result type; without a check, ``Any``: the class
    declares the type (``gamma: float = forwarded("statistics.gamma")``)."""
    *parts, attribute = path.split(".")

    def fset(owner: Any, value: Any) -> None:
        holder = _holder(owner, parts)
        value = value if check is None else check(owner, value)
        # to the holder's property itself: ``nn.Module.__setattr__`` would register a Module
        # (or Parameter) value as a child of that name instead (``head.cloud_scale =
        # nn.Identity()`` gave the cloud a child ``cloud_scale``)
        store = object.__setattr__ if _is_property(holder, attribute) else setattr
        try:
            store(holder, attribute, value)
        except FixedSettingError as exc:  # named for the object the user holds (the head)
            raise exc.held_by(owner) from None

    return property(_attribute_getter(path), fset, doc=doc or f"``{path}``; settable, checked.")


class FixedSettingError(AttributeError):
    """The refusal of an assignment to a setting fixed at construction (:func:`fixed_setting`),
    worded for the class the user assigned it on (``holder``): a head forwarding to its cloud
    names the head (``build a new LEAPMarginHead with ...``), not the cloud it forwards to."""

    def __init__(self, name: str, why: str, how: str, value: Any, holder: str) -> None:
        self.setting = (name, why, how, value)
        self.holder = holder
        super().__init__(
            f"{name} is fixed at construction ({why}); "
            + (
                how.format(holder=holder, name=name, value=value)
                or f"to change it, build a new {holder} with {name}={value!r} and load this "
                "one's state_dict()"
            )
        )

    def held_by(self, owner: Any) -> FixedSettingError:
        """The same refusal, worded for ``owner``'s class."""
        return FixedSettingError(*self.setting, type(owner).__name__)

    def __reduce__(self) -> Any:
        return (FixedSettingError, (*self.setting, self.holder))


def fixed_setting(
    name: str,
    why: str,
    path: Optional[str] = None,
    default: Any = None,
    how: str = "",
    copy: bool = False,
) -> Any:
    """A constructor setting that cannot change after construction (it sizes buffers, or the
    statistics gathered so far depend on it), as a ``property`` that reads ``owner.<path>``
    (``default`` where that part lacks it; ``copy``: a clone of a tensor, so that an in-place
    ``head.class_counts += 1`` cannot reach the state before its refusal) and refuses an
    assignment (:class:`FixedSettingError`) with ``why`` and the way out (``how``, which may
    name ``{holder}`` (the class assigned on), ``{name}`` and ``{value}``; default: build a new
    one with the value and load the old one's ``state_dict()``). Without ``path``
    the value lives in ``_<name>``: the constructor sets it once (any later assignment is
    refused; the class's own code writes ``_<name>``). Typed ``Any``: the class declares the
    value's type (``warmup_steps: int = fixed_setting(...)``)."""
    private = "_" + name
    fget = (
        _attribute_getter(private, copy=copy)
        if path is None
        else _attribute_getter(path, default, copy=copy)
    )

    def fset(owner: Any, value: Any) -> None:
        if path is None and private not in vars(owner):  # the constructor's assignment
            object.__setattr__(owner, private, value)
            return
        raise FixedSettingError(name, why, how, value, type(owner).__name__)

    return property(fget, fset, doc=f"``{name}`` (fixed at construction: {why}).")


def migrate_checked(
    state: Dict[str, Any],
    names: Sequence[str] = (),
    predating: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """A copy of a whole-module pickle's ``state`` of an earlier release: the
    :func:`checked_attribute` ``names`` it held as plain attributes moved to ``_<name>``, and
    each attribute of ``predating`` (``{attribute: value for pickles that predate it}``, the
    value that gives that release's behaviour) filled in where the pickle lacks it."""
    state = dict(state)
    for name in names:
        if name in state:
            state["_" + name] = state.pop(name)
    for name, value in (predating or {}).items():
        state.setdefault(name, value)
    return state


def check_reduction(reduction: Any) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, else ``ValueError`` naming them."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return str(reduction)


def class_counts_from_mapping(
    counts: Mapping[Any, Any], num_classes: int, name: str = "class_counts"
) -> List[Any]:
    """The list ``[counts.get(0, 0), ..., counts.get(C - 1, 0)]`` of a mapping class -> count
    (``collections.Counter(dataset.targets)``): a class the mapping lacks has 0 images.

    ``TypeError`` for a key that is not an integer; ``ValueError`` naming the keys outside
    ``[0, num_classes)`` or a class given twice (a ``Counter`` over a tensor's elements counts
    each element apart). The values are checked by :func:`check_class_counts`.
    """
    out: List[Any] = [0] * num_classes
    seen: Dict[int, int] = {}
    outside: List[Any] = []
    for key, value in counts.items():
        if isinstance(key, Tensor) and key.numel() == 1 and not key.dtype.is_floating_point:
            key = key.item()
        if isinstance(key, (bool, np.bool_)) or not isinstance(key, (numbers.Integral, np.integer)):
            raise TypeError(
                f"{name}: a mapping's keys must be integer class indices, got {key!r} "
                f"({type(key).__name__}); map class names to indices first (e.g. "
                "ImageFolder's class_to_idx) or count the integer targets"
            )
        k = int(key)
        if not 0 <= k < num_classes:
            outside.append(k)
            continue
        if k in seen:
            raise ValueError(
                f"{name}: class {k} appears twice among the mapping's keys (a Counter over a "
                "tensor counts each element apart: use Counter(targets.tolist()) or "
                "torch.bincount(targets, minlength=num_classes))"
            )
        seen[k] = 1
        out[k] = value
    if outside:
        shown = ", ".join(str(k) for k in sorted(outside)[:5]) + (
            ", ..." if len(outside) > 5 else ""
        )
        raise ValueError(
            f"{name}: {len(outside)} key(s) outside the classes [0, {num_classes}): {shown} "
            f"(num_classes={num_classes}; labels must be 0 .. num_classes - 1)"
        )
    return out


def check_class_counts(counts: ClassCounts, num_classes: int, name: str = "class_counts") -> Tensor:
    """Per-class sample counts as an ``int64`` tensor ``(C,)`` (on the input's device).

    A mapping class -> count (``collections.Counter(dataset.targets)``) is taken through
    :func:`class_counts_from_mapping` (a class it lacks has 0 images).
    ``TypeError`` for bool, floating or non-numeric input; ``ValueError`` for a wrong length or
    negative counts (one host read: this runs at construction, not in the training step).
    """
    if isinstance(counts, Mapping):
        counts = class_counts_from_mapping(counts, num_classes, name)
    if isinstance(counts, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D integer sequence or tensor, got a string")
    try:
        # a list becomes a host tensor, also under ``with torch.device("meta")``
        t = counts if isinstance(counts, Tensor) else torch.as_tensor(counts, device="cpu")
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(
            f"{name} must be a 1-D integer sequence or tensor, or a mapping class -> count: {exc}"
        ) from None
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise TypeError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() != num_classes:
        raise ValueError(f"{name} has {t.numel()} entries, expected num_classes={num_classes}")
    if t.is_meta:
        raise ValueError(
            f"{name} is a meta tensor: pass the counts' values (a list, or a CPU tensor)"
        )
    t = t.to(torch.long)
    if t.numel() and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative")
    return t


# ------------------------------------------------------------------------------------------
# batches
# ------------------------------------------------------------------------------------------


def differs(size: Any, expected: int) -> bool:
    """``size != expected`` for a tensor's size, without the tracer's warning ("Converting a
    tensor to a Python boolean"): under ``torch.jit.trace`` and a legacy ONNX export a size is a
    traced tensor; the check still runs on the example inputs."""
    if not is_tracing():  # (under dynamo a SymBool: torch 2.2's could not bool() one)
        return size != expected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit._trace.TracerWarning)
        return bool(size != expected)


def check_embeddings(embeddings: Tensor, embedding_size: int, name: str = "embeddings") -> None:
    """Type and shape of a ``(B, D)`` floating tensor (free: no device sync)."""
    if not isinstance(embeddings, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if not embeddings.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating point tensor, got dtype {embeddings.dtype}")
    if embeddings.dim() != 2:
        raise ValueError(
            f"{name} must have shape (batch, {embedding_size}), got {tuple(embeddings.shape)}"
        )
    if differs(embeddings.shape[1], embedding_size):
        raise ValueError(
            f"{name} has dimension {embeddings.shape[1]} but the module expects "
            f"embedding_size={embedding_size}"
        )


def _label_dtype_ok(labels: Tensor) -> bool:
    return not (
        labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool
    )


def check_labels(
    labels: Tensor, batch_size: int, name: str = "labels", rows: str = "embeddings"
) -> Tensor:
    """Type and shape of ``(B,)`` integer labels (free: no device sync); returns them as int64.

    Every integer dtype is accepted and converted (``uint8`` / ``int16`` / ``int32`` labels index
    the statistics like ``int64`` ones); ``bool``, floating and complex labels raise ``TypeError``.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if not _label_dtype_ok(labels):
        raise TypeError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"batch size mismatch: {batch_size} {rows} but {labels.shape[0]} {name} "
            f"({name} must have shape ({batch_size},))"
        )
    return labels if labels.dtype == torch.long else labels.long()


def check_values(
    embeddings: Tensor,
    labels: Optional[Tensor],
    num_classes: int,
    label_name: str = "labels",
    input_name: str = "embeddings",
) -> None:
    """Value checks: labels in ``[0, C)`` or ``-1`` (ignored), finite embeddings.

    One host sync for all checks together; skipped while ``torch.compile`` traces (the compiled
    step stays sync-free) and when the caller passes ``validate=False`` to its Module. Pass
    labels already converted by :func:`check_labels` (unsigned dtypes cannot hold ``-1``).
    """
    if is_compiling() or embeddings.numel() == 0:
        return
    flags = [~torch.isfinite(embeddings).all()]
    if labels is not None:
        labels = labels.long()
        flags.append(((labels < -1) | (labels >= num_classes)).any())
    bad = torch.stack(flags).tolist()
    if bad[0]:
        raise ValueError(f"{input_name} contain NaN or Inf values")
    if labels is not None and bad[1]:
        lo, hi = int(labels.min()), int(labels.max())
        raise ValueError(
            f"{label_name} must lie in [0, {num_classes}) or be -1 (ignored); "
            f"got values in [{lo}, {hi}]"
        )


def inference_problem(embeddings: Any, state: Tensor) -> Optional[Exception]:
    """In a training step (gradients on, outside ``torch.inference_mode``): the error for
    embeddings computed under ``inference_mode`` (autograd cannot save them for the backward:
    torch raised that after the statistics had moved) or a module state built there (it
    cannot be updated in place outside it), else ``None``. Labels made there are copied
    instead (:func:`trainable_labels`). Skipped while a graph is captured."""
    if is_compiling() or torch.is_inference_mode_enabled():
        return None
    if state.is_inference():
        return ValueError(
            "this module was built under torch.inference_mode, so its state (inference "
            "tensors) cannot be updated in a training step; build it outside inference_mode"
        )
    if isinstance(embeddings, Tensor) and embeddings.is_inference():
        return ValueError(
            "embeddings were computed under torch.inference_mode, so autograd cannot save them "
            "for the backward of a training step: compute them under torch.no_grad() (a frozen "
            "backbone) or pass embeddings.clone()"
        )
    return None


def trainable_labels(labels: Tensor) -> Tensor:
    """Labels made under ``torch.inference_mode`` (cached pseudo-labels), copied for a
    training step: the fused losses save them for the backward."""
    if not is_compiling() and labels.is_inference() and not torch.is_inference_mode_enabled():
        return labels.clone()
    return labels


def check_inputs(
    inputs: Tensor, labels: Tensor, num_classes: int, validate: bool, name: str = "labels"
) -> Tensor:
    """The checks a model runs on its batch *before* its network (whose BatchNorm takes every
    batch it sees: a refused batch, or a NaN image, moved its running statistics): ``labels``
    type and shape against the inputs' batch; with ``validate``, their range and the inputs'
    finiteness in one host read (skipped under a graph capture). Returns int64 labels."""
    labels = check_labels(labels, inputs.shape[0], name, "inputs")
    if validate:
        check_values(inputs, labels, num_classes, name, "inputs")
    return labels


def check_batch(
    embeddings: Tensor,
    labels: Tensor,
    embedding_size: int,
    num_classes: int,
    validate: bool = True,
) -> Tensor:
    """All checks for an ``(embeddings, labels)`` training batch; returns the int64 labels."""
    check_embeddings(embeddings, embedding_size)
    labels = check_labels(labels, embeddings.shape[0])
    if labels.device != embeddings.device:
        raise ValueError(
            f"labels are on {labels.device} and embeddings on {embeddings.device}: put them on "
            "the same device (labels.to(embeddings.device))"
        )
    if validate:
        check_values(embeddings, labels, num_classes)
    return labels


# ------------------------------------------------------------------------------------------
# checks that a process group agrees on
# ------------------------------------------------------------------------------------------

#: The entries of :func:`problem_tensor`, in order (``0`` = fine).
PROBLEM_SLOTS = (
    "embeddings_type",  # 1: not a floating tensor
    "embeddings_shape",  # 1: not (B, D)
    "labels_type",  # 1: not an integer tensor
    "labels_shape",  # 1: not (B,)
    "nonfinite",  # 1: NaN/Inf in the embeddings
    "label_range",  # 1: a label outside [0, C) and != -1
)


def static_problems(embeddings: Any, labels: Any, embedding_size: int) -> List[int]:
    """The type and shape checks of :func:`problem_tensor` (its first four slots), read from
    the host-side attributes only: no device work, no sync."""
    emb_ok = isinstance(embeddings, Tensor) and embeddings.dtype.is_floating_point
    shape_ok = emb_ok and embeddings.dim() == 2 and embeddings.shape[1] == embedding_size
    lab_ok = isinstance(labels, Tensor) and _label_dtype_ok(labels)
    lab_shape_ok = (
        lab_ok and labels.dim() == 1 and (not shape_ok or labels.shape[0] == embeddings.shape[0])
    )
    return [
        int(not emb_ok),
        int(emb_ok and not shape_ok),
        int(not lab_ok),
        int(lab_ok and not lab_shape_ok),
    ]


def problem_tensor(
    embeddings: Any,
    labels: Any,
    embedding_size: int,
    num_classes: int,
    validate: bool,
    device: torch.device,
) -> Tensor:
    """Every batch check as an int64 code vector on ``device`` (see :data:`PROBLEM_SLOTS`;
    ``0`` = fine), never raising and without a host sync of its own: the payload of the one
    all-reduce by which ranks agree on a batch before any collective touches it."""
    static = static_problems(embeddings, labels, embedding_size)
    out = torch.tensor(static + [0, 0], dtype=torch.long, device=device)
    if validate and not any(static) and embeddings.numel() and not is_compiling():
        y = labels.long()
        bad_embeddings = (~torch.isfinite(embeddings.detach())).any().to(device)
        bad_labels = ((y < -1) | (y >= num_classes)).any().to(device)  # labels may live elsewhere
        out[4:] = torch.stack([bad_embeddings, bad_labels]).long()
    return out


def raise_for_problems(
    worst: Sequence[int], embedding_size: int, num_classes: int, where: str = ""
) -> None:
    """Raise the exception that :func:`problem_tensor` codes describe (``worst``: their MAX over
    the ranks, so every rank raises the same). ``where`` says which rank(s) had the problem."""
    suffix = f" ({where})" if where else ""
    if worst[0]:
        raise TypeError(f"embeddings must be a floating point tensor{suffix}")
    if worst[1]:
        raise ValueError(f"embeddings must have shape (batch, {embedding_size}){suffix}")
    if worst[2]:
        raise TypeError(f"labels must be an integer tensor{suffix}")
    if worst[3]:
        raise ValueError(f"labels must be 1-D with one label per embedding{suffix}")
    if worst[4]:
        raise ValueError(f"embeddings contain NaN or Inf values{suffix}")
    if worst[5]:
        raise ValueError(f"labels must lie in [0, {num_classes}) or be -1 (ignored){suffix}")
