"""Checkpoints through a model that holds the package's modules: run every feature-cloud
module's load checks (each under its prefix) before anything loads; lay out the buffers whose
size the state gives before ``torch.distributed.checkpoint`` loads in place."""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple, cast

import torch
from torch import Tensor, nn

from ._buffers import normal_tensors
from .cloud import FeatureCloud
from .distributed import ShardedLEAPMarginHead
from .heads import LEAPMarginHead
from .statistics import _MEMORY_BUFFERS, ClassStatistics
from .transfer import _VARIABLE_BUFFERS, FeatureTransfer

__all__ = ["check_state_dict", "CheckedBeforeLoading", "prepare_dcp_load"]


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
    for name, module in _checked_modules(model):
        where = prefix + name + "." if name else prefix
        cast(Any, module).check_state_dict(dict(state_dict), where)


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


#: path components that wrappers put into ``named_modules()`` but not into the state dicts that
#: ``torch.distributed.checkpoint.state_dict.get_state_dict`` (or FSDP2's) writes
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def prepare_dcp_load(model: nn.Module, checkpoint: Any, prefix: Optional[str] = None) -> List[str]:
    """Lay out the buffers of ``model`` whose size its state gives as the
    ``torch.distributed.checkpoint`` (DCP) checkpoint ``checkpoint`` holds them, so that
    ``dcp.load`` (which loads in place and cannot resize) fills them; call it on every rank right
    before taking the state dict that ``dcp.load`` fills. Returns the checkpoint keys whose
    buffer it resized.

    Such buffers are a :class:`ClassStatistics`' angle memory (``memory``, ``memory_stamp``,
    ``memory_owner``: ``K_i * P`` slots, of size 0 in a head that counts ``K_i`` online until its
    count ends: ``count_steps``, else the warm-up) and :class:`FeatureTransfer`'s PCA basis and
    sample lists (FTL), wherever they are inside ``model`` (a head, PML's ``LEAPLoss``,
    ``FTLModel``). ``torch.load`` + ``load_state_dict`` needs none of this (the modules resize
    themselves as they load)::

        feature_cloud.prepare_dcp_load(model, path)
        state = {"model": get_model_state_dict(model)}  # or model.state_dict()
        dcp.load(state, checkpoint_id=path)  # torch 2.2: storage_reader=FileSystemReader(path)
        set_model_state_dict(model, state["model"])  # or model.load_state_dict(state["model"])

    The last line runs the modules' load checks (a damaged or edited state); keep it. Without
    it (``dcp.load`` into ``model.state_dict()``, in place), the host-side copies (the cloud's
    step, the statistics' :attr:`~feature_cloud.statistics.ClassStatistics.layout_setting`) are
    re-read once when next needed.

    ``checkpoint``: the checkpoint's folder (read with ``dcp.FileSystemReader``), a DCP
    ``StorageReader`` or the checkpoint's ``Metadata``; only the metadata is read (no tensor, no
    collective). ``prefix``: where ``model``'s entries start among the checkpoint's keys
    (``"model."`` for ``dcp.save({"model": model_state}, ...)``); ``None`` finds it from the
    keys of the resized buffers; one under which the checkpoint holds none of ``model``'s
    entries is refused. Keys match with or without a compiled module's ``_orig_mod.`` (which
    ``get_model_state_dict`` drops and ``model.state_dict()`` keeps). Before anything changes,
    every feature-cloud module's buffers are checked against the checkpoint's shapes
    (:func:`check_state_dict` on the saved shapes; DCP checks the parameters' itself), so a
    checkpoint of another class count or embedding size is refused with the message
    ``load_state_dict`` gives, and ``model`` is left as it was; so is a checkpoint saved before
    its ``K_i`` were known (no angle memory: a head without a cloud, or one still counting) for
    a head built with ``class_counts``, whose layout ``load_state_dict`` keeps for a cloud-less
    source and DCP cannot. The resized buffers hold an empty memory until ``dcp.load`` fills
    them: load right after.
    """
    # the checkpoint's keys as get_state_dict writes them (no wrapper's path component), each
    # with its own: model.state_dict() keeps a compiled child's "_orig_mod."
    own_keys: Dict[str, str] = {}
    saved: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {}
    for key, meta in _saved_tensors(checkpoint).items():
        clean = _unwrapped(key)
        if clean not in saved or clean == key:
            own_keys[clean], saved[clean] = key, meta
    if prefix is not None:  # refused before anything changes
        prefix = _checked_prefix(model, saved, prefix)
    sized = list(_state_sized_buffers(model))
    if not sized:
        return []
    if prefix is None:
        prefix = _find_prefix(saved, [key for key, _, _ in sized])
    # the buffers' saved shapes: a parameter's shape here can be its shard's (FSDP1 with
    # use_orig_params), and DCP checks the parameters' global shapes itself
    buffers = {_clean_name(model, name) for name, _ in model.named_buffers()}
    shapes = {
        key[len(prefix) :]: torch.empty(shape, dtype=dtype, device="meta")
        for key, (shape, dtype) in saved.items()
        if key.startswith(prefix) and key[len(prefix) :] in buffers
    }
    for name, module in _checked_modules(model, clean=True):  # refuses before anything changes
        if isinstance(module, ShardedLEAPMarginHead) and len(module.sizes) > 1:
            raise NotImplementedError(
                f"{name or 'the model'} is a ShardedLEAPMarginHead of {len(module.sizes)} shards: "
                "torch.distributed.checkpoint saves a plain (non-DTensor) tensor once, as a "
                "value every rank holds alike, so one rank's shard would stand for all; save "
                "each rank's head.state_dict() with torch.save (README, 'Sharded classifier')"
            )
        where = name + "." if name else ""
        cast(Any, module).check_state_dict(dict(shapes), where)
    plan = []
    for key, module, name in sized:
        entry = shapes.get(key)
        own = getattr(module, name)
        if entry is None or not isinstance(own, Tensor) or tuple(own.shape) == entry.shape:
            continue
        if (
            isinstance(module, ClassStatistics)
            and module._counts_were_given()  # class_counts given (not counted online)
            and entry.numel() == 0
        ):
            raise ValueError(
                f"the checkpoint's {own_keys[prefix + key]} is empty (its K_i were not known "
                "yet: a head trained without a cloud, or saved during a warm-up that counts K_i "
                "online) and this model's is laid out (class_counts given). load_state_dict "
                "keeps this layout for a head trained without a cloud; dcp.load cannot. Build "
                "the head as the checkpoint's was (class_counts=None) to resume its warm-up, or "
                "load the class weights only to start LEAP from a head trained without a cloud"
            )
        plan.append((key, module, name, own, entry.shape))
    for _, module, name, own, shape in plan:  # every check passed: lay them out
        empty = -1 if name == "memory_stamp" else 0  # as allocate_memory leaves them
        with normal_tensors():  # a load prepared inside torch.inference_mode() too
            setattr(module, name, torch.full(shape, empty, dtype=own.dtype, device=own.device))
    for key, module, name in sized:  # the layout the ranks compare: re-read once it is loaded
        if isinstance(module, ClassStatistics) and name == "memory":
            loaded = key[: -len(name)] + "class_counts"
            if loaded in shapes:
                module._expect_load_in_place()
    return [own_keys[prefix + key] for key, *_ in plan]


def _checked_modules(model: nn.Module, clean: bool = False) -> Iterator[Tuple[str, nn.Module]]:
    """The feature-cloud modules of ``model`` that check their entries themselves, outermost
    first (a head checks its cloud and statistics: those inside it are left out), with their
    names in ``model``'s state dict (``clean``: without the wrappers' path components, as
    ``get_state_dict`` and DCP write them)."""
    checked = _checked_types()
    covered: Tuple[str, ...] = ()
    for name, module in model.named_modules():
        if covered and name.startswith(covered):
            continue  # inside a module checked whole (a head checks its cloud and statistics)
        if isinstance(module, checked):
            yield (_clean_name(model, name) if clean else name), cast(nn.Module, module)
            if not name:
                return
            covered += (name + ".",)


def _clean_name(model: nn.Module, name: str) -> str:
    parts = [p for p in name.split(".") if p and p not in _WRAPPER_NAMES]
    wrapped = isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel))
    if wrapped and parts[:1] == ["module"]:
        parts = parts[1:]
    return ".".join(parts)


def _unwrapped(key: str) -> str:
    """A checkpoint key without the wrappers' path components (``get_state_dict``'s form)."""
    return ".".join(p for p in key.split(".") if p not in _WRAPPER_NAMES)


def _checked_prefix(model: nn.Module, saved: Mapping[str, Any], prefix: str) -> str:
    """``prefix`` without the wrappers' path components, if the checkpoint holds some of
    ``model``'s entries under it; else a ValueError naming the keys' beginnings."""
    clean = _unwrapped(prefix[:-1]) + "." if prefix.endswith(".") else _unwrapped(prefix)
    clean = "" if clean == "." else clean
    names = {_clean_name(model, name) for name, _ in model.named_parameters()}
    names |= {_clean_name(model, name) for name, _ in model.named_buffers()}
    if any(k.startswith(clean) and k[len(clean) :] in names for k in saved):
        return clean
    starts = sorted({k.split(".")[0] + ("." if "." in k else "") for k in saved})
    try:
        found = _find_prefix(saved, [key for key, _, _ in _state_sized_buffers(model)])
        hint = f"; prefix=None finds {found!r}"
    except (ValueError, IndexError):
        hint = ""
    raise ValueError(
        f"prefix={prefix!r}: the checkpoint holds none of the model's entries under it (a "
        "prefix ends with its dot: 'model.' for dcp.save({'model': ...})); its keys begin with "
        + ", ".join(map(repr, starts[:8]))
        + (", ..." if len(starts) > 8 else "")
        + hint
    )


def _state_sized_buffers(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str]]:
    """``(key in the state dict, module, buffer name)`` of every buffer inside ``model`` whose
    size the state gives."""
    for name, module in model.named_modules():
        if isinstance(module, ClassStatistics):
            names: Tuple[str, ...] = _MEMORY_BUFFERS
        elif isinstance(module, FeatureTransfer):
            names = _VARIABLE_BUFFERS
        else:
            continue
        where = _clean_name(model, name)
        for buffer in names:
            if buffer in module._buffers:
                yield (where + "." if where else "") + buffer, module, buffer


def _saved_tensors(checkpoint: Any) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of each tensor in a DCP checkpoint's metadata."""
    metadata = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            from torch.distributed.checkpoint.filesystem import FileSystemReader
        except ImportError as e:  # a torch built without torch.distributed
            raise RuntimeError(
                f"prepare_dcp_load: torch.distributed.checkpoint is not available ({e})"
            ) from e
        metadata = FileSystemReader(os.fspath(checkpoint)).read_metadata()
    elif hasattr(checkpoint, "read_metadata"):  # a StorageReader
        metadata = checkpoint.read_metadata()
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, Mapping):
        raise TypeError(
            "checkpoint must be a torch.distributed.checkpoint folder, StorageReader or Metadata, "
            f"got {type(checkpoint).__name__}"
        )
    found = {}
    for key, entry in entries.items():
        size = getattr(entry, "size", None)  # TensorStorageMetadata; not BytesStorageMetadata
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        if size is not None and isinstance(dtype, torch.dtype):
            found[str(key)] = (tuple(int(n) for n in size), dtype)
    return found


def _find_prefix(saved: Mapping[str, Any], keys: List[str]) -> str:
    """The one prefix under which the checkpoint holds the state-sized buffers' ``keys``."""
    common: Optional[Set[str]] = None
    for key in keys:
        here = {k[: len(k) - len(key)] for k in saved if k == key or k.endswith("." + key)}
        if here:
            common = here if common is None else common & here
    if common is None:
        raise ValueError(
            f"the checkpoint holds no {keys[0]!r} (under any prefix): not a checkpoint of this "
            "model? Pass prefix= (where the model's keys start among the checkpoint's keys)"
        )
    if len(common) != 1:
        raise ValueError(
            f"the checkpoint holds {keys[0]!r} under "
            + ("no common prefix" if not common else f"several prefixes {sorted(common)}")
            + ": pass prefix= (where the model's keys start among the checkpoint's keys)"
        )
    return common.pop()
