"""fastreid adapter: the ``LEAPHead`` re-ID head, selected from YAML.

Importing this module

1. applies :func:`patch_fastreid_compat` (fastreid 1.4.0 does not import on Python >= 3.10 /
   torch >= 2 without it; every patch is listed in its docstring and is a no-op where the
   environment does not need it). Import this module before ``fastreid.engine`` /
   ``fastreid.data``: on Python >= 3.10 those fail inside fastreid itself
   (``cannot import name 'Mapping' from 'collections'``) until the patches are applied. fastreid
   modules that did import (``fastreid.config``, or all of them on an older Python) are patched
   where they are.
2. registers :class:`LEAPHead` in ``fastreid.modeling.heads.REID_HEADS_REGISTRY``,
3. hooks into fastreid's trainer (:func:`_integrate_trainer`): ``DefaultTrainer.build_hooks``
   adds :class:`FeatureCloudHook` (class counts from the trainer's training set when training
   starts), and ``Checkpointer`` gives data-sized feature-cloud buffers the checkpoint's shape
   before its shape filter, so ``MODEL.WEIGHTS`` / ``--eval-only`` / ``resume_or_load`` restore
   the complete head; fine-tuning from ``MODEL.WEIGHTS`` to another number of classes skips the
   head's whole feature-cloud state (it starts fresh, with one warning), not only the per-class
   tensors that fastreid's shape filter drops.

A training script adds the config node once (fastreid's ``add_*_config`` convention)::

    import feature_cloud.integrations.fastreid as fc_fastreid   # first: patches fastreid
    from fastreid.config import get_cfg
    from fastreid.engine import DefaultTrainer

    cfg = get_cfg()
    fc_fastreid.add_feature_cloud_config(cfg)
    cfg.merge_from_file(fc_fastreid.config_path("Market1501/leap_R50.yml"))  # shipped YAML
    trainer = DefaultTrainer(cfg)

and the YAML switches the head::

    MODEL:
      HEADS:
        NAME: LEAPHead
        CLS_LAYER: CosSoftmax      # or ArcSoftmax (margin in radians, fastreid's convention)
        SCALE: 24
        MARGIN: 0.2
        FEATURE_CLOUD:
          CLOUD: full              # full | vanilla | none
          TAIL_THRESHOLD: 20
          GAMMA: 0.1
          MEMORY_PER_SAMPLE: 1
          WARMUP_ITERS: 0
          CLASS_COUNTS: dataset    # dataset | online

The head's training output feeds fastreid's own meta-arch losses (``cls_outputs`` go to
``MODEL.LOSSES.NAME: CrossEntropyLoss`` with its label smoothing, ``features`` to the triplet
loss). The head holds no math: pooling/neck are fastreid's layers, the margin logits and the
cloud come from :class:`feature_cloud.LEAPMarginHead`. Building it reads no data.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import functools
import importlib
import inspect
import logging
import math
import os
import re
import sys
import types
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

from feature_cloud import margins
from feature_cloud._buffers import restore_on_error
from feature_cloud._extras import missing
from feature_cloud._validation import (
    ClassCounts,
    check_inputs,
    class_counts_from_mapping,
    migrate_checked,
    other_rank_message,
)
from feature_cloud.checkpoints import CheckedBeforeLoading
from feature_cloud.cloud import (
    ALL_ZERO_COUNTS,
    DEFAULT_CLOUD_MODE,
    DEFAULT_CLOUD_SCALE,
    DEFAULT_PROTOTYPE_MIN_COUNT,
    DEFAULT_PROTOTYPE_SHRINKAGE,
    FeatureCloud,
)
from feature_cloud.ftl import FTLModel, ResidualFilter
from feature_cloud.functional import CLOUD_RULES, DEFAULT_UNKNOWN_VARIANCE
from feature_cloud.heads import LEAPMarginHead
from feature_cloud.statistics import DEFAULT_CENTER_RATE

__all__ = [
    "patch_fastreid_compat",
    "add_feature_cloud_config",
    "LEAPHead",
    "LEAPBaseline",
    "class_counts_from_dataset",
    "class_counts_from_config",
    "CLS_LAYER_TO_MARGIN",
    "margin_for_cls_layer",
    "config_path",
    "FeatureCloudHook",
    "PAPER_LEAP_YAML",
]

logger = logging.getLogger("fastreid.feature_cloud")  # under "fastreid": in its log.txt

#: :data:`feature_cloud.PAPER_LEAP` (the LEAP paper's cloud settings) as
#: ``MODEL.HEADS.FEATURE_CLOUD`` keys and values, of the YAML types (``-1``: off)::
#:
#:     for key, value in PAPER_LEAP_YAML.items():
#:         cfg.MODEL.HEADS.FEATURE_CLOUD[key] = value  # after add_feature_cloud_config(cfg)
#:
#: A plain dict, as ``PAPER_LEAP``: copy it for a variant (``dict(PAPER_LEAP_YAML, SCALE=2.0)``).
PAPER_LEAP_YAML: Dict[str, Any] = {
    "MODE": "paper",  # cloud_mode
    "SCALE": 1.0,  # cloud_scale
    "PROTOTYPE_SHRINKAGE": -1.0,  # prototype_shrinkage=None
    "CENTER_RATE": "paper",  # center_rate
    "UNKNOWN_VARIANCE": "pooled",  # unknown_variance
    "ANGLE_MAX_AGE": -1,  # angle_max_age=None
    "IMPRINT_ITERS": -1,  # imprint_step=None
}

#: fastreid's ``MODEL.HEADS.CLS_LAYER`` names and the margin they mean.
CLS_LAYER_TO_MARGIN = {"CosSoftmax": "cosface", "ArcSoftmax": "arcface"}


def margin_for_cls_layer(
    cls_layer: str,
    owner: str = "LEAPHead",
    extra: Sequence[str] = (),
    key: str = "MODEL.HEADS.CLS_LAYER",
) -> str:
    """The margin that ``MODEL.HEADS.CLS_LAYER`` names: fastreid's ``CosSoftmax`` /
    ``ArcSoftmax``, or any margin of the registry by its name (:mod:`feature_cloud.margins`:
    ``subcenter_arcface``, a margin of your own registered before the model is built).
    ``ValueError`` listing both otherwise (``extra``: further names the caller accepts; ``key``:
    the setting's name in the message, ``margin_type`` for a head built from Python)."""
    name = str(cls_layer)
    if name in CLS_LAYER_TO_MARGIN:
        return CLS_LAYER_TO_MARGIN[name]
    if name in margins.names():
        return name
    choices = [*extra, *sorted(CLS_LAYER_TO_MARGIN), *margins.names()]
    raise ValueError(
        f"{owner} needs {key} in {choices} (fastreid's names, or a registered "
        f"margin of feature_cloud.margins), got {cls_layer!r}"
    )


_APPLIED: List[str] = []


def patch_fastreid_compat() -> List[str]:
    """Make fastreid 1.4.0 import and train on Python 3.10+, torch 2, NumPy 2 and CPU-only hosts.

    Idempotent; each patch is applied only where needed and the names of those applied are
    returned (and kept in ``APPLIED_PATCHES``). Exactly these, nothing else:

    1. ``torch._six`` (removed in torch 2.0; ``fastreid.data.build`` imports ``string_classes``
       from it): registers a module ``torch._six`` with ``string_classes = (str, bytes)``,
       ``int_classes = int``, ``inf = math.inf``, ``container_abcs = collections.abc``.
    2. ``collections.Mapping`` (removed in Python 3.10; imported by ``fastreid.data.build`` and
       ``fastreid.evaluation.testing``): sets ``collections.Mapping = collections.abc.Mapping``.
    3. ``np.bool`` (removed in NumPy 1.24, back in 2.0; used by ``fastreid.evaluation.rank``):
       sets ``np.bool = bool`` if missing.
    4. CPU-only hosts (``torch.cuda.is_available()`` false): fastreid's ``DataLoaderX`` creates a
       CUDA stream and moves every batch to ``cuda:<rank>``; ``fastreid.data.build.DataLoaderX``
       is replaced by a plain ``torch.utils.data.DataLoader`` subclass with the same signature.
    5. ``ReidEvaluator._compile_dependencies`` runs ``make`` inside the installed package to
       build a Cython ranking extension and calls ``sys.exit(1)`` when that fails (no Cython):
       it is replaced by a check that logs which implementation is used; without the extension
       fastreid's own pure-Python ``evaluate_rank`` computes CMC/mAP.

    6. ``Optimizer.zero_grad()`` defaults to ``set_to_none=True`` since torch 2.0. fastreid's
       default optimizer (``build_optimizer(..., contiguous=True)``) steps flat
       ``ContiguousParams`` buffers whose ``.grad`` must stay the shared gradient buffer; with
       ``set_to_none=True`` the trainer's ``zero_grad()`` drops it and **no parameter is ever
       updated** (backward still writes into the per-parameter views, the optimizer skips the
       flat buffers). ``build_optimizer`` (in ``fastreid.solver.build``, ``fastreid.solver``
       and ``fastreid.engine.defaults``) is wrapped so that an optimizer over contiguous
       buffers zeroes gradients in place (``set_to_none=False``); nothing else changes.

    7. ``DefaultTrainer`` wraps the model in
       ``DistributedDataParallel(model, device_ids=[local_rank], ...)`` under a process group,
       which torch refuses for a CPU module; ``fastreid.engine.defaults.DistributedDataParallel``
       is replaced by a function that passes ``device_ids=None`` for a CPU module (gloo),
       everything else unchanged (a GPU module gets fastreid's own call).
    8. Hosts with a GPU and ``MODEL.DEVICE: cpu``: fastreid's ``DataLoaderX`` moves every batch
       to ``cuda:<rank>`` whatever ``MODEL.DEVICE`` says, so a CPU model fails on its first batch
       (``Expected all tensors to be on the same device``). ``DefaultTrainer.build_train_loader``
       and ``build_test_loader`` are wrapped: when ``cfg.MODEL.DEVICE`` is a CPU device they
       build the loader with the CPU ``DataLoaderX`` of patch 4; otherwise fastreid's own.

    fastreid's ``solver/optim/lamb.py`` imports ``torch.utils.tensorboard``: that needs the
    ``tensorboard`` package (in the ``fastreid`` extra); it is not patched.
    """
    if "torch._six" not in sys.modules:
        try:
            importlib.import_module("torch._six")  # torch < 2.0 still has it
        except ImportError:
            six = types.ModuleType("torch._six")
            six.string_classes = (str, bytes)  # type: ignore[attr-defined]
            six.int_classes = int  # type: ignore[attr-defined]
            six.inf = math.inf  # type: ignore[attr-defined]
            six.container_abcs = collections.abc  # type: ignore[attr-defined]
            sys.modules["torch._six"] = six
            torch._six = six  # type: ignore[attr-defined]
            _APPLIED.append("torch._six")
    if not hasattr(collections, "Mapping"):
        collections.Mapping = collections.abc.Mapping  # type: ignore[attr-defined]
        _APPLIED.append("collections.Mapping")
    if "bool" not in np.__dict__:
        np.bool = bool  # type: ignore[misc, assignment, unused-ignore]
        _APPLIED.append("np.bool")

    from fastreid.data import build as data_build

    if not torch.cuda.is_available() and not getattr(
        data_build.DataLoaderX, "_feature_cloud_cpu", False
    ):
        data_build.DataLoaderX = _CPUDataLoaderX
        _APPLIED.append("fastreid.data.build.DataLoaderX")

    from fastreid.evaluation import reid_evaluation

    if reid_evaluation.ReidEvaluator._compile_dependencies is not _no_compile_dependencies:
        reid_evaluation.ReidEvaluator._compile_dependencies = _no_compile_dependencies
        _APPLIED.append("fastreid.evaluation.ReidEvaluator._compile_dependencies")

    import fastreid.engine.defaults as engine_defaults

    if not getattr(engine_defaults.DistributedDataParallel, "_feature_cloud_cpu", False):
        engine_defaults.DistributedDataParallel = _cpu_ddp
        _APPLIED.append("fastreid.engine.defaults.DistributedDataParallel")
    trainer = engine_defaults.DefaultTrainer
    for name in ("build_train_loader", "build_test_loader"):
        if not getattr(getattr(trainer, name), "_feature_cloud_cpu", False):
            setattr(trainer, name, classmethod(_loader_for_model_device(getattr(trainer, name))))
            _APPLIED.append(f"fastreid.engine.defaults.DefaultTrainer.{name}")

    zero_grad_default = (
        inspect.signature(torch.optim.Optimizer.zero_grad).parameters["set_to_none"].default
    )
    if zero_grad_default is True:
        import fastreid.engine.defaults as engine_defaults
        import fastreid.solver as solver
        from fastreid.solver import build as solver_build

        for module in (solver_build, solver, engine_defaults):
            if not getattr(module.build_optimizer, "_feature_cloud_keep_grad", False):
                module.build_optimizer = _keep_grad_build_optimizer(solver_build.build_optimizer)
        if "fastreid.solver.build_optimizer" not in _APPLIED:
            _APPLIED.append("fastreid.solver.build_optimizer")
    return list(_APPLIED)


APPLIED_PATCHES = _APPLIED


class _CPUDataLoaderX(torch.utils.data.DataLoader):
    """``DataLoaderX``'s signature (``local_rank`` first) without CUDA streams or device moves."""

    _feature_cloud_cpu = True

    def __init__(self, local_rank: int, **kwargs: Any) -> None:
        kwargs["pin_memory"] = False
        super().__init__(**kwargs)
        self.local_rank = local_rank


def _loader_for_model_device(build: Callable[..., Any]) -> Callable[..., Any]:
    """Patch 8 of :func:`patch_fastreid_compat`: ``build`` (a bound ``DefaultTrainer`` loader
    classmethod) with the CPU ``DataLoaderX`` when ``cfg.MODEL.DEVICE`` is a CPU device."""
    func = build.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapped(cls: Any, cfg: CfgNode, *args: Any, **kwargs: Any) -> Any:
        from fastreid.data import build as data_build

        device = str(cfg.MODEL.DEVICE) if "MODEL" in cfg and "DEVICE" in cfg.MODEL else "cuda"
        if torch.device(device).type != "cpu" or data_build.DataLoaderX is _CPUDataLoaderX:
            return func(cls, cfg, *args, **kwargs)
        gpu_loader = data_build.DataLoaderX
        data_build.DataLoaderX = _CPUDataLoaderX
        try:
            return func(cls, cfg, *args, **kwargs)
        finally:
            data_build.DataLoaderX = gpu_loader

    wrapped._feature_cloud_cpu = True  # type: ignore[attr-defined]
    return wrapped


def _cpu_ddp(
    module: nn.Module, device_ids: Optional[Sequence[int]] = None, **kwargs: Any
) -> nn.Module:
    """Patch 7 of :func:`patch_fastreid_compat`: fastreid's DDP wrapping for a CPU module."""
    from torch.nn.parallel import DistributedDataParallel

    on_cpu = all(p.device.type == "cpu" for p in module.parameters())
    return DistributedDataParallel(module, device_ids=None if on_cpu else device_ids, **kwargs)


_cpu_ddp._feature_cloud_cpu = True  # type: ignore[attr-defined]


def _keep_grad_build_optimizer(build_optimizer: Callable[..., Any]) -> Callable[..., Any]:
    """Patch 6 of :func:`patch_fastreid_compat`: ``build_optimizer`` whose optimizer over
    ``ContiguousParams`` zeroes the shared gradient buffers in place instead of dropping them."""
    if getattr(build_optimizer, "_feature_cloud_keep_grad", False):
        return build_optimizer
    from fastreid.utils.params import ContiguousParams

    @functools.wraps(build_optimizer)
    def wrapped(cfg: Any, model: nn.Module, contiguous: bool = True) -> Any:
        optimizer, params = build_optimizer(cfg, model, contiguous=contiguous)
        if isinstance(params, ContiguousParams):
            base = type(optimizer)

            def zero_grad(self: torch.optim.Optimizer, set_to_none: bool = False) -> None:
                base.zero_grad(self, set_to_none=False)  # the flat .grad buffers must survive

            optimizer.__class__ = type(base.__name__, (base,), {"zero_grad": zero_grad})
        return optimizer, params

    wrapped._feature_cloud_keep_grad = True  # type: ignore[attr-defined]
    return wrapped


def _no_compile_dependencies(self: Any) -> None:
    from fastreid.evaluation import rank

    logger.info(
        "fastreid rank evaluation: %s",
        "Cython extension"
        if rank.IS_CYTHON_AVAI
        else "pure-Python evaluate_rank (no Cython build)",
    )


try:
    import fastreid  # noqa: F401
except ImportError as _err:
    raise missing(
        "feature_cloud.integrations.fastreid",
        "fastreid 1.4.0",
        "pip install 'feature-cloud[fastreid]' && pip install --no-deps fastreid==1.4.0",
        _err,
    ) from _err
patch_fastreid_compat()

from fastreid.config import CfgNode, configurable, get_cfg  # noqa: E402
from fastreid.engine import DefaultTrainer  # noqa: E402
from fastreid.engine.train_loop import HookBase  # noqa: E402
from fastreid.layers import get_norm, pooling  # noqa: E402
from fastreid.layers.weight_init import weights_init_kaiming  # noqa: E402
from fastreid.modeling.heads import REID_HEADS_REGISTRY  # noqa: E402
from fastreid.modeling.meta_arch import META_ARCH_REGISTRY, Baseline  # noqa: E402
from fastreid.utils.checkpoint import Checkpointer, _strip_prefix_if_present  # noqa: E402

from feature_cloud import statistics as _statistics  # noqa: E402
from feature_cloud import transfer as _transfer  # noqa: E402
from feature_cloud.cloud import migrate_state_dict  # noqa: E402

#: the shipped example configs (installed with the package, see :func:`config_path`)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastreid_configs")


def config_path(name: str = "Market1501/leap_R50.yml") -> str:
    """Path of a shipped example config, for ``cfg.merge_from_file(config_path(...))``.

    ``name`` is relative to the config folder: ``"Base-LEAP.yml"``, ``"Base-FTL.yml"``,
    ``"Market1501/leap_R50.yml"``, ``"Market1501/ftl_R50.yml"``. The files are package data, so
    this works from an installed wheel as well as from a checkout.
    """
    path = os.path.normpath(os.path.join(CONFIG_DIR, name))
    if os.path.commonpath([path, CONFIG_DIR]) != CONFIG_DIR or not os.path.isfile(path):
        available = sorted(
            os.path.relpath(os.path.join(d, f), CONFIG_DIR).replace(os.sep, "/")
            for d, _, files in os.walk(CONFIG_DIR)
            for f in files
            if f.endswith(".yml")
        )
        raise FileNotFoundError(f"no shipped fastreid config {name!r}; available: {available}")
    return path


def _register_once(registry: Any) -> Callable[[Any], Any]:
    """``registry.register()`` (a fastreid ``Registry``) that a re-execution of the defining
    module repeats without error (``importlib.reload``, a notebook's autoreload): the earlier
    class of the same module and name is replaced by the new one."""

    def deco(cls: Any) -> Any:
        held = registry._obj_map.get(cls.__name__)  # fastreid 1.4.0's name -> object map
        if held is not None and (held.__module__, held.__qualname__) == (
            cls.__module__,
            cls.__qualname__,
        ):
            # our own earlier registration: the configs build the class the module now defines.
            # Any other object under the name (another package's) stays fastreid's
            # AssertionError: replacing it would silently change what that package's configs build.
            del registry._obj_map[cls.__name__]
        return registry.register()(cls)

    return deco


# ------------------------------------------------------------------ configuration
def add_feature_cloud_config(cfg: CfgNode) -> CfgNode:
    """Add the ``MODEL.HEADS.FEATURE_CLOUD`` node (defaults = :class:`feature_cloud.FeatureCloud`'s).

    The defaults are the core's, not all the paper's: ``MODE: margin``, ``SCALE: 2.0``,
    ``PROTOTYPE_SHRINKAGE: 10.0``, ``CENTER_RATE: adaptive`` and ``UNKNOWN_VARIANCE: tail_prior``
    differ from LEAP (README, "Defaults that differ from the paper"); :data:`PAPER_LEAP_YAML`
    holds the paper's values of these keys (:data:`feature_cloud.PAPER_LEAP` as YAML). ``GAMMA``
    (0.1) is the paper's (Sec. 4.1), and so is the margin of the shipped YAMLs (``CosSoftmax``,
    ``SCALE: 24``, ``MARGIN: 0.2``: its re-ID setting).

    ``CLOUD``: ``full`` (LEAP Eq. 9), ``vanilla`` (Eq. 6) or ``none``; ``TAIL_THRESHOLD``: ``T``
    of the vanilla rule; ``GAMMA``: center learning rate of Eq. 4; ``MEMORY_PER_SAMPLE``: ``P`` of
    Eq. 5; ``WARMUP_ITERS``: iterations without cloud; ``CLASS_COUNTS``: ``dataset`` (``K_i`` of
    the trainer's own training set, taken when training starts; a checkpoint carries them) or
    ``online`` (counted during the warm-up); ``COUNT_ITERS``: with ``online``, count over the
    first ``COUNT_ITERS`` iterations only (one epoch; ``0`` or ``-1``: the whole warm-up); ``SEED``: cloud RNG
    seed (``-1``: from the global RNG); ``VALIDATE``: per-step label/finiteness check (one host
    sync); ``MODE``: where the cloud enters the logits (``paper``, ``target``, ``margin``) and
    ``SCALE``: factor on the cloud's standard deviation (the head's ``cloud_mode`` /
    ``cloud_scale``, defaults those of :class:`feature_cloud.FeatureCloud`);
    ``PROTOTYPE_SHRINKAGE``: ``kappa`` of the classification logits' prototypes (the head's
    ``prototype_shrinkage``; ``-1``: the weights, as in the paper); ``PROTOTYPE_MIN_COUNT``:
    classes with fewer training images keep their weights (the head's ``prototype_min_count``,
    default 2; 1: every class leans); ``IMPRINT_ITERS``: the
    iteration at which the class weights are imprinted with those prototypes (the head's
    ``imprint_step``; ``-1``: never, the default and the paper). Statistics (the head's options
    of the same names, :class:`feature_cloud.ClassStatistics`): ``CENTER_RATE`` (``adaptive``,
    the default, or ``paper``: the constant ``GAMMA`` of Eq. 4), ``UNKNOWN_VARIANCE``
    (``tail_prior``, the default, ``pooled`` or ``none``: the variance of a class with fewer than
    two stored angles), ``ANGLE_MAX_AGE`` (angles older than this many statistics updates leave
    the moments, e.g. under fastreid's identity samplers, which visit a class rarely; ``-1``:
    never, the default and the paper). The margin is fastreid's own ``MODEL.HEADS.CLS_LAYER`` /
    ``SCALE`` / ``MARGIN``.

    Called again on a config that has the node (a re-run notebook cell), it adds only the keys
    the node lacks: values already set (yours) stay.
    """
    node = CfgNode()
    core = inspect.signature(FeatureCloud.__init__).parameters  # the core's defaults, once
    node.CLOUD = "full"
    node.TAIL_THRESHOLD = core["tail_threshold"].default
    node.GAMMA = core["gamma"].default
    node.MEMORY_PER_SAMPLE = core["memory_per_sample"].default
    node.WARMUP_ITERS = 0
    node.CLASS_COUNTS = "dataset"
    node.COUNT_ITERS = 0
    node.SEED = -1
    node.VALIDATE = True
    node.MODE = DEFAULT_CLOUD_MODE
    node.SCALE = DEFAULT_CLOUD_SCALE
    node.PROTOTYPE_SHRINKAGE = DEFAULT_PROTOTYPE_SHRINKAGE
    node.PROTOTYPE_MIN_COUNT = DEFAULT_PROTOTYPE_MIN_COUNT
    node.IMPRINT_ITERS = -1
    node.CENTER_RATE = DEFAULT_CENTER_RATE
    node.UNKNOWN_VARIANCE = DEFAULT_UNKNOWN_VARIANCE
    node.ANGLE_MAX_AGE = -1
    return _add_missing_node(cfg, ("MODEL", "HEADS", "FEATURE_CLOUD"), node)


def _add_missing_node(cfg: CfgNode, path: Sequence[str], defaults: CfgNode) -> CfgNode:
    """``cfg.<path> = defaults``, or where ``cfg`` has that node already, only its missing keys
    from ``defaults`` (the values there stay); a frozen ``cfg`` is frozen again."""
    frozen = cfg.is_frozen()
    cfg.defrost()
    parent = cfg
    for key in path[:-1]:
        parent = parent[key]
    if path[-1] not in parent:
        parent[path[-1]] = defaults
    else:
        node = parent[path[-1]]
        for key, value in defaults.items():
            if key not in node:
                node[key] = value
    if frozen:
        cfg.freeze()
    return cfg


def _max_age(value: Any) -> Any:
    """``ANGLE_MAX_AGE``: a negative integer is the head's ``None`` (never); anything else is
    passed on (the head names the key when it is not a positive integer)."""
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return None
    return value


def _warn_fastreid_margin_defaults(cfg: CfgNode, owner: str = "LEAPHead") -> None:
    """Warn when a margin ``MODEL.HEADS.CLS_LAYER`` (``CosSoftmax``, ``ArcSoftmax``, a registered
    margin) comes with ``MODEL.HEADS.SCALE`` still at fastreid's default, 1 (made for its
    ``Linear`` layer): the logits ``s cos(theta)`` stay in ``[-1, 1]`` and the head cannot fit
    its training set, silently. The warning names the keys left at fastreid's defaults, the
    values of the shipped configs and, where the YAML sets it, ``FEATURE_CLOUD.SCALE`` (the
    cloud's factor, not ``s``). Call it inside :func:`_yaml_warnings` to reach fastreid's log."""
    heads = cfg.MODEL.HEADS
    try:
        margin_type = margin_for_cls_layer(heads.CLS_LAYER)
    except ValueError:
        return  # not a margin: refused (LEAPHead) or a Linear FC (FTLBaseline)
    stock = get_cfg().MODEL.HEADS
    if float(heads.SCALE) != float(stock.SCALE):
        return
    rule = margins.get(margin_type)
    scale = float(heads.SCALE)
    keys = f"MODEL.HEADS.SCALE is {heads.SCALE}"
    if float(heads.MARGIN) == float(stock.MARGIN):
        keys += f" and MODEL.HEADS.MARGIN {heads.MARGIN}, fastreid's defaults"
    else:
        keys += ", fastreid's default"
    cloud = ""
    node = heads.get("FEATURE_CLOUD")
    if node is not None and float(node.get("SCALE", DEFAULT_CLOUD_SCALE)) != DEFAULT_CLOUD_SCALE:
        cloud = f" (yours is {node.SCALE}: meant for MODEL.HEADS.SCALE?)"
    warnings.warn(
        f"{owner}: {keys} (for its Linear CLS_LAYER). With CLS_LAYER: {heads.CLS_LAYER} the "
        f"logits are s cos(theta) in [-{scale:g}, {scale:g}] and the head cannot train (the "
        "head's warning gives the loss floor over MODEL.HEADS.NUM_CLASSES). "
        f"Set MODEL.HEADS.SCALE and MARGIN, e.g. SCALE: {rule.default_scale:g}, MARGIN: "
        f"{rule.default_margin:g} ({margin_type}'s defaults; the shipped Base-LEAP.yml has "
        "CLS_LAYER: CosSoftmax, SCALE: 24, MARGIN: 0.2). MODEL.HEADS.FEATURE_CLOUD.SCALE is "
        f"another setting, the factor on the cloud's standard deviation{cloud}",
        stacklevel=2,
    )


def _shrinkage(value: Any) -> Optional[float]:
    """``MODEL.HEADS.FEATURE_CLOUD.PROTOTYPE_SHRINKAGE``: a negative value means none (the weights)."""
    return None if value is None or float(value) < 0 else float(value)


def class_counts_from_dataset(dataset: Any) -> Tensor:
    """Per-class sample counts ``K_i`` of a fastreid ``CommDataset`` (labels as it relabels them)."""
    pid_dict = getattr(dataset, "pid_dict", None)
    items = getattr(dataset, "img_items", None)
    if pid_dict is None or items is None:
        raise TypeError(
            "expected a fastreid CommDataset built with relabel=True (it has img_items and "
            f"pid_dict), got {type(dataset).__name__}"
        )
    labels = torch.tensor([pid_dict[item[1]] for item in items], dtype=torch.long)
    return torch.bincount(labels, minlength=len(pid_dict))


def class_counts_from_config(cfg: CfgNode) -> Tensor:
    """``K_i`` of the training set that ``DefaultTrainer.build_train_loader(cfg)`` would build.

    Reads the training split; the trainer does not need this (:class:`FeatureCloudHook` takes the
    counts from the dataset it already built). For custom training loops.
    """
    from fastreid.data import build as data_build
    from fastreid.data.common import CommDataset
    from fastreid.data.datasets import DATASET_REGISTRY

    items: List[Any] = []
    for name in cfg.DATASETS.NAMES:
        data = DATASET_REGISTRY.get(name)(root=data_build._root, combineall=cfg.DATASETS.COMBINEALL)
        items.extend(data.train)
    return class_counts_from_dataset(CommDataset(items, None, relabel=True))


#: ``LEAPMarginHead`` argument -> the YAML key it comes from (error messages name the key)
_YAML_KEYS = {
    "warmup_steps": "MODEL.HEADS.FEATURE_CLOUD.WARMUP_ITERS",
    "count_steps": "MODEL.HEADS.FEATURE_CLOUD.COUNT_ITERS",
    "class_counts": "MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS",
    "tail_threshold": "MODEL.HEADS.FEATURE_CLOUD.TAIL_THRESHOLD",
    "memory_per_sample": "MODEL.HEADS.FEATURE_CLOUD.MEMORY_PER_SAMPLE",
    "gamma": "MODEL.HEADS.FEATURE_CLOUD.GAMMA",
    "seed": "MODEL.HEADS.FEATURE_CLOUD.SEED",
    "cloud": "MODEL.HEADS.FEATURE_CLOUD.CLOUD",
    "cloud_mode": "MODEL.HEADS.FEATURE_CLOUD.MODE",
    "cloud_scale": "MODEL.HEADS.FEATURE_CLOUD.SCALE",
    "prototype_shrinkage": "MODEL.HEADS.FEATURE_CLOUD.PROTOTYPE_SHRINKAGE",
    "prototype_min_count": "MODEL.HEADS.FEATURE_CLOUD.PROTOTYPE_MIN_COUNT",
    "imprint_step": "MODEL.HEADS.FEATURE_CLOUD.IMPRINT_ITERS",
    "center_rate": "MODEL.HEADS.FEATURE_CLOUD.CENTER_RATE",
    "unknown_variance": "MODEL.HEADS.FEATURE_CLOUD.UNKNOWN_VARIANCE",
    "angle_max_age": "MODEL.HEADS.FEATURE_CLOUD.ANGLE_MAX_AGE",
    "max_age": "MODEL.HEADS.FEATURE_CLOUD.ANGLE_MAX_AGE",
    "margin_type": "MODEL.HEADS.CLS_LAYER",
    "scale": "MODEL.HEADS.SCALE",
    "margin": "MODEL.HEADS.MARGIN",
    "num_classes": "MODEL.HEADS.NUM_CLASSES",
    "embedding_size": "MODEL.HEADS.EMBEDDING_DIM (or MODEL.BACKBONE.FEAT_DIM)",
    "pool_type": "MODEL.HEADS.POOL_LAYER",
    "neck_feat": "MODEL.HEADS.NECK_FEAT",
}


@contextlib.contextmanager
def _yaml_warnings(keys: Optional[Dict[str, str]] = None, stacklevel: int = 4) -> Iterator[None]:
    """The head's warnings while it is built from the config, with its argument names replaced
    by the YAML keys (as :func:`_yaml_error` does for errors), also in fastreid's log (its
    ``log.txt``). ``keys``: argument name -> YAML key (default: LEAPHead's, :data:`_YAML_KEYS`);
    ``stacklevel``: of the re-emitted warnings, counted from this generator."""
    pattern = _WARNING_PATTERN if keys is None else _warning_pattern(keys)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:  # also when the build then fails: the warnings may say why
        for w in caught:
            text = _to_yaml_keys(str(w.message), pattern, keys)
            logger.warning(text)
            warnings.warn(text, w.category, stacklevel=stacklevel)


def _warning_pattern(keys: Dict[str, str]) -> re.Pattern:
    """The argument names of a message (error or warning). In its prose ("the feature cloud
    needs ..."), a name without an underscore is an argument only as ``name=value`` or as the
    message's first word ("gamma must be ..."); quoted values (group 1: the user's value, the
    allowed choices; ``'margin'`` is a MODE value as well as an argument) are kept."""
    with_underscore = "|".join(k for k in keys if "_" in k) or "(?!)"
    plain = "|".join(k for k in keys if "_" not in k) or "(?!)"
    return re.compile(
        r"""('[^']*'|"[^"]*")|\b("""
        + with_underscore
        + r")\b|\b("
        + plain
        + r")(?==)|^("
        + plain
        + r")\b"
    )


_WARNING_PATTERN = _warning_pattern(_YAML_KEYS)


#: the core's Python advice where YAML takes another form (CLASS_COUNTS is 'dataset' or
#: 'online' in YAML, not the counts themselves)
_YAML_ADVICE = {
    "Pass MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS,": (
        "Set MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS: dataset (K_i from the training set),"
    ),
}


def _to_yaml_keys(text: str, pattern: re.Pattern, keys: Optional[Dict[str, str]] = None) -> str:
    """``text`` with the head's argument names that ``pattern`` finds replaced by the YAML keys
    (``keys``, default :data:`_YAML_KEYS`); quoted values (group 1: the user's value, the allowed
    choices) are left as they are; advice that YAML words otherwise (:data:`_YAML_ADVICE`)."""
    keys = _YAML_KEYS if keys is None else keys
    text = pattern.sub(lambda m: m.group(1) or keys[m.group(m.lastindex or 0)], text)
    for python, yaml in _YAML_ADVICE.items():
        text = text.replace(python, yaml)
    return text


def _yaml_error(error: Exception) -> Exception:
    """The same exception with the head's argument names replaced by the YAML keys."""
    return type(error)(_to_yaml_keys(str(error), _WARNING_PATTERN))


# ------------------------------------------------------------------ checkpoints and the trainer
def _variable_buffers(module: nn.Module) -> Sequence[str]:
    """Buffers whose shape follows the data rather than the configuration (the LEAP angle memory
    is ``sum_i K_i P`` long; FTL's basis and sample lists change at every UpdateStats)."""
    if isinstance(module, _statistics.ClassStatistics):
        return _statistics._MEMORY_BUFFERS
    if isinstance(module, _transfer.FeatureTransfer):
        return _transfer._VARIABLE_BUFFERS
    return ()


#: modules whose checkpoint state loads as a unit: all of it or, when a fixed-size tensor (class
#: count, feature size) differs from the model's, none of it
_STATE_UNITS = (FeatureCloud, _transfer.FeatureTransfer)


def _mismatched_units(
    model: nn.Module, state: Dict[str, Any]
) -> List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]]:
    """``(module name, key, checkpoint shape, model shape)`` of the first mismatched fixed-size
    tensor of every :data:`_STATE_UNITS` module whose checkpoint entries do not fit (a model of
    another number of classes). A tensor of another number of dimensions (flattened, emptied,
    stacked) is damage, not another model: ``ValueError`` naming it, before anything loads
    (a LEAP head's class weight too: fastreid's shape filter skipped a flattened one and loaded
    the trained statistics beside a fresh weight)."""
    found = []
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        units = _fixed_tensors(module) if isinstance(module, _STATE_UNITS) else []
        weight = [("weight", module.weight)] if isinstance(module, LEAPMarginHead) else []
        for key, tensor in weight + units:
            saved = state.get(prefix + key)
            if saved is not None and len(saved.shape) != tensor.dim():
                raise ValueError(other_rank_message(prefix + key, saved.shape, tensor.shape))
        for key, tensor in units:
            saved = state.get(prefix + key)
            if saved is not None and tuple(saved.shape) != tuple(tensor.shape):
                found.append((name, key, tuple(saved.shape), tuple(tensor.shape)))
                break
    return found


def _skip_mismatched_units(
    model: nn.Module, state: Dict[str, Any], mismatched: List[Tuple[str, str, Any, Any]]
) -> None:
    """Drop from ``state`` every entry of a :data:`_STATE_UNITS` module whose fixed-size tensors
    do not all match the checkpoint's (fine-tuning from ``MODEL.WEIGHTS`` to another number of
    classes), with one warning each. fastreid's shape filter would skip only the per-class tensors
    and load the scalars (``step``, ``seed``, ``num_updates``): a new head past its warm-up with
    empty statistics. Without the unit's entries the module keeps its fresh state (step 0)."""
    for name, key, saved, own in mismatched:
        prefix = name + "." if name else ""
        for k in [k for k in state if k.startswith(prefix)]:
            del state[k]
        logger.warning(
            "%s not loaded from the checkpoint: it holds the state of %s (its %s is %s, the "
            "model's %s); it starts fresh (step 0, warm-up, class counts from the new training "
            "set). fastreid skips the class weights itself",
            name or type(model.get_submodule(name)).__name__,
            _other_model(saved, own),
            key,
            saved,
            own,
        )


def _other_model(saved: Tuple[int, ...], own: Tuple[int, ...]) -> str:
    """What differs between a checkpoint tensor's shape and the model's: the class count (the
    first dimension) or, with the same classes, the feature size."""
    if saved and own and saved[0] == own[0] and saved[1:] != own[1:]:
        return (
            f"a model with features of size {'x'.join(map(str, saved[1:]))}, this model's "
            f"are of size {'x'.join(map(str, own[1:]))} (MODEL.HEADS.EMBEDDING_DIM / "
            "MODEL.BACKBONE.FEAT_DIM)"
        )
    return f"a model with {saved[0] if saved else '?'} classes, this model has {own[0] if own else '?'}"


def _fixed_tensors(module: nn.Module) -> List[Tuple[str, Tensor]]:
    """The entries of ``module.state_dict()`` whose shape follows the configuration (class count,
    feature size), the data-sized buffers of its submodules (:func:`_variable_buffers`) left out."""
    variable = {
        (prefix + "." if prefix else "") + buf
        for prefix, sub in module.named_modules()
        for buf in _variable_buffers(sub)
    }
    return [
        (key, tensor)
        for key, tensor in module.state_dict().items()
        if isinstance(tensor, Tensor) and key not in variable and tensor.dim() > 0
    ]


def _size_variable_buffers(model: nn.Module, state: Dict[str, Any]) -> None:
    """Give each data-sized buffer the checkpoint's shape, where the module's fixed-size tensors
    (class count, feature size) all match the checkpoint (a unit of another class count has been
    dropped by :func:`_skip_mismatched_units`); otherwise leave fastreid's rule (skip mismatching
    tensors) in charge."""
    for prefix, module in model.named_modules():
        names = _variable_buffers(module)
        if not names:
            continue
        prefix = prefix + "." if prefix else ""
        fixed = [(n, t) for n, t in module.state_dict().items() if n.split(".")[0] not in names]
        if any(
            prefix + n in state and tuple(state[prefix + n].shape) != tuple(t.shape)
            for n, t in fixed
            if isinstance(t, Tensor)
        ):
            continue
        for name in names:
            src, cur = state.get(prefix + name), getattr(module, name, None)
            if (
                isinstance(src, (Tensor, np.ndarray))
                and isinstance(cur, Tensor)
                and tuple(src.shape) != tuple(cur.shape)
            ):
                setattr(
                    module, name, torch.empty(tuple(src.shape), dtype=cur.dtype, device=cur.device)
                )


def _migrate_legacy_heads(model: nn.Module, state: Dict[str, Any]) -> None:
    """Rewrite the entries of 0.1.0 heads (a dict ``_extra_state``, which fastreid's loader
    rejects) into the tensor-only layout, in place, before fastreid sees them; also those of
    the margin head an inference-only ``LEAPHead`` (``NUM_CLASSES: 0``) lacks, which fastreid
    then reports as unused, as it does this release's. The warning of a 0.1.0 state loaded off
    0.1.0's settings names the YAML keys, also in fastreid's log (:func:`_yaml_warnings`)."""
    with _yaml_warnings():
        for name, module in model.named_modules():
            if isinstance(module, LEAPMarginHead):
                prefix = name + "." if name else ""
                migrate_state_dict(state, prefix, prefix + "feature_cloud.", module.feature_cloud)
            if isinstance(module, LEAPHead) and module.margin_head is None:
                prefix = (name + "." if name else "") + "margin_head."
                migrate_state_dict(state, prefix, prefix + "feature_cloud.")
            if isinstance(module, LEAPHead) and module.margin_head is not None:
                # fastreid's own EmbeddingHead keeps its class weights as `heads.weight` (C, D),
                # the LEAP head's classifier as `heads.margin_head.weight`: the same matrix
                prefix = name + "." if name else ""
                stock, own = prefix + "weight", prefix + "margin_head.weight"
                saved = state.get(stock)
                if (
                    own not in state
                    and isinstance(saved, Tensor)
                    and tuple(saved.shape) == tuple(module.margin_head.weight.shape)
                ):
                    state[own] = state.pop(stock)
                    logger.info(
                        "%s: the class weights of fastreid's EmbeddingHead (%s) load as the LEAP "
                        "head's classifier (%s)",
                        name or "heads",
                        stock,
                        own,
                    )


def _map_baseline_backbone(model: nn.Module, state: Dict[str, Any]) -> None:
    """A stock fastreid checkpoint (``Baseline``, or this module's LEAP head, keeps its backbone
    as ``backbone.*``) loaded into an FTL model (``FTLBaseline`` keeps it in ``Enc``:
    ``ftl.encoder.backbone.*``): the backbone's entries are renamed in place, so starting FTL
    from a trained model (``MODEL.WEIGHTS``, ``MODEL.FTL.STAGE0_ITERS: 0``) loads the backbone
    instead of matching no key. The other entries (the stock head) stay as they are, and
    fastreid's loader reports them as unused."""
    for name, module in model.named_modules():
        if not isinstance(module, FTLModel) or not hasattr(module.encoder, "backbone"):
            continue
        target = (name + "." if name else "") + "encoder.backbone."
        if any(k.startswith(target) for k in state):
            continue  # the model's own layout: nothing to rename
        stock = [k for k in state if k.startswith("backbone.")]
        for key in stock:
            state[target + key[len("backbone.") :]] = state.pop(key)
        if stock:
            logger.info(
                "the checkpoint's backbone (%d entries, backbone.*) loads as FTL's Enc backbone "
                "(%s*)",
                len(stock),
                target,
            )
        return


def _check_filter_forms(model: nn.Module, state: Dict[str, Any]) -> None:
    """Refuse a checkpoint whose FTL filter ``R`` has the other form (plain MLP vs residual,
    ``MODEL.FTL.FILTER``): the parameters share their names, and fastreid's non-strict load
    would only log the marker buffer, silently changing what ``f = R(g)`` means."""
    for name, module in model.named_modules():
        if not isinstance(module, FTLModel):
            continue
        prefix = name + "." if name else ""
        if prefix + "filter.0.weight" not in state:
            continue  # R not in the checkpoint (e.g. a backbone's weights): nothing to mix up
        saved = prefix + "filter.residual" in state
        current = isinstance(module.filter, ResidualFilter)
        if saved != current:
            forms = {True: "residual", False: "mlp"}
            raise ValueError(
                f"the checkpoint's FTL filter R is MODEL.FTL.FILTER: {forms[saved]}, the model's "
                f"is {forms[current]}: the same parameters mean another f = R(g); build the "
                f"model with MODEL.FTL.FILTER: {forms[saved]}"
            )


def _checkpointer_load(load: Callable[..., Any]) -> Callable[..., Any]:
    """``Checkpointer.load`` that tells ``_load_model`` which checkpointables it will load."""

    @functools.wraps(load)
    def wrapped(self: Checkpointer, path: str, checkpointables: Optional[List[str]] = None) -> Any:
        self._feature_cloud_loading = (
            list(self.checkpointables) if checkpointables is None else list(checkpointables)
        )
        parts = [self.model] + [
            self.checkpointables[k]
            for k in self._feature_cloud_loading
            if hasattr(self.checkpointables.get(k), "load_state_dict")
        ]
        model = self.model.module if hasattr(self.model, "module") else self.model
        flags = [(h, h._counts_pending, h._counts_from_checkpoint) for h in _leap_heads(model)]
        try:  # all or nothing: a part refused after the model loaded (a damaged head or FTL
            # statistics state) left the model half loaded
            with restore_on_error(*parts):
                return load(self, path, checkpointables)
        except BaseException:
            for head, pending, loaded in flags:  # set by _counts_loaded of the refused load
                head._counts_pending, head._counts_from_checkpoint = pending, loaded
            raise
        finally:
            del self._feature_cloud_loading

    wrapped._feature_cloud = True  # type: ignore[attr-defined]
    return wrapped


def _check_checkpointables(self: Checkpointer, checkpoint: Dict[str, Any]) -> None:
    """Checkpointables with a ``check_state_dict`` (the FTL hook) refuse their entry before the
    model loads: fastreid loads the model, then each checkpointable, so a late refusal would leave
    the weights (and optimizer) of a checkpoint the trainer does not take."""
    for key in getattr(self, "_feature_cloud_loading", ()):
        check = getattr(self.checkpointables.get(key), "check_state_dict", None)
        if check is not None and key in checkpoint:
            check(checkpoint[key])


def _checkpointer_load_model(load_model: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(load_model)
    def wrapped(self: Checkpointer, checkpoint: Any) -> Any:
        if isinstance(checkpoint, dict):
            _check_checkpointables(self, checkpoint)
        state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        if isinstance(state, dict):
            model = self.model.module if hasattr(self.model, "module") else self.model
            _strip_prefix_if_present(state, "module.")  # what fastreid's loader does first
            _map_baseline_backbone(model, state)
            _check_filter_forms(model, state)
            _migrate_legacy_heads(model, state)
            mismatched = _mismatched_units(model, state)
            loading = getattr(self, "_feature_cloud_loading", ())
            if mismatched and "optimizer" in loading and "optimizer" in checkpoint:
                # resume=True: fastreid would load the optimizer state of the other class count
                # too, and the first step would fail on its shapes
                name, _, saved, own = mismatched[0]
                raise ValueError(
                    f"cannot resume: the checkpoint's {name or 'head'} is of "
                    f"{_other_model(saved, own)} (its optimizer state would not fit); to start "
                    "from its weights on this training set, load it with resume=False "
                    "(MODEL.WEIGHTS, without --resume)"
                )
            _skip_mismatched_units(model, state, mismatched)
            _size_variable_buffers(model, state)
            if "optimizer" not in getattr(self, "_feature_cloud_loading", ()):
                continued = _clouds_in(model, state)  # MODEL.WEIGHTS, --eval-only: no resume
                result = load_model(self, checkpoint)
                _log_continued_clouds(continued)
                return result
        return load_model(self, checkpoint)

    wrapped._feature_cloud = True  # type: ignore[attr-defined]
    return wrapped


def _clouds_in(model: nn.Module, state: Dict[str, Any]) -> List[Tuple[str, LEAPHead]]:
    """The LEAP heads whose feature-cloud state (step, seed, statistics) ``state`` holds."""
    found = []
    for name, head in model.named_modules():
        if isinstance(head, LEAPHead) and head.margin_head is not None:
            prefix = (name + "." if name else "") + "margin_head.feature_cloud."
            if prefix + "step" in state:
                found.append((name or "heads", head))
    return found


def _log_continued_clouds(heads: List[Tuple[str, LEAPHead]]) -> None:
    """Say, after a load without resume (a fine-tune from ``MODEL.WEIGHTS``), which cloud values
    came from the checkpoint: the cloud's state loads as a unit, so its step (the warm-up counts
    from it), seed and class statistics continue; a YAML ``SEED`` >= 0 that differs is named."""
    for name, head in heads:
        cloud = cast(LEAPMarginHead, head.margin_head).feature_cloud
        step, seed, warmup = int(cloud.step), int(cloud.seed), int(cloud.warmup_steps)
        left = "done" if step >= warmup else f"{warmup - step} iterations left"
        logger.info(
            "%s: the checkpoint's feature cloud continues (a load without resume keeps its state "
            "as a unit): step %d (MODEL.HEADS.FEATURE_CLOUD.WARMUP_ITERS %d: %s), seed %d and "
            "the class statistics come from the checkpoint",
            name,
            step,
            warmup,
            left,
            seed,
        )
        given = head.configured_seed
        if given is not None and given != seed:
            logger.warning(
                "%s: MODEL.HEADS.FEATURE_CLOUD.SEED %d is not used: the checkpoint's feature "
                "cloud continues with its own seed %d (and step %d) from MODEL.WEIGHTS",
                name,
                given,
                seed,
                step,
            )


class FeatureCloudHook(HookBase):
    """Gives every :class:`LEAPHead` with ``CLASS_COUNTS: dataset`` the ``K_i`` of the trainer's
    own training set (``trainer.data_loader.dataset``, already read by the trainer) when training
    starts, after ``resume_or_load``. A head restored from a checkpoint keeps its counts when
    they match; when they differ (fine-tuning on another split) the angle memory is laid out
    again for the new counts (centers kept). Added to ``DefaultTrainer.build_hooks`` by this
    module (first in the list) whenever the model holds a ``LEAPHead``.
    """

    def before_train(self) -> None:
        dataset = self.trainer.data_loader.dataset
        counts = None
        sampler = _train_sampler_name(self.trainer.data_loader)
        max_iter = getattr(self.trainer, "max_iter", None)
        for head in _leap_heads(self.trainer.model):
            cloud = None if head.margin_head is None else head.margin_head.feature_cloud
            if cloud is not None and cloud.rule is not None and max_iter is not None:
                start = int(getattr(self.trainer, "start_iter", 0))
                _warn_warmup_past_the_run(head, cloud, int(max_iter), start)
            if head.class_counts_source == "online" and "Identity" in sampler:
                logger.warning(
                    "MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS: online with %s: an identity "
                    "sampler draws DATALOADER.NUM_INSTANCE images of each identity it picks, so "
                    "the online counts are how often each identity was drawn, not its K_i (the "
                    "tail over-counted, the head under-counted). Use CLASS_COUNTS: dataset",
                    sampler,
                )
            if head.class_counts_source != "dataset":
                continue
            counts = class_counts_from_dataset(dataset) if counts is None else counts
            with _yaml_warnings():  # in fastreid's log.txt too (the vanilla rule's, ...)
                head.set_class_counts(counts)
            present = counts[counts > 0]
            logger.info(
                "MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS: dataset: K_i of %d identities from the "
                "training set (%d images; %d-%d an identity)",
                int(present.numel()),
                int(counts.sum()),
                int(present.min()) if present.numel() else 0,
                int(present.max()) if present.numel() else 0,
            )


def _warn_warmup_past_the_run(
    head: LEAPHead, cloud: FeatureCloud, max_iter: int, start_iter: int = 0
) -> None:
    """A warm-up as long as the trainer's run (``SOLVER.MAX_EPOCH`` x iterations per epoch)
    leaves the cloud off for all of it, and online counting unfinished: said at the start (a
    user trial trained 18 iterations with ``WARMUP_ITERS: 5000``, the result the cloud-less one).
    The cloud counts its steps from its own step, which ``MODEL.WEIGHTS`` carries in (s59: a
    run continued from a checkpoint at step 5 was told its cloud never starts): the run ends
    at the cloud's step + the iterations from ``start_iter`` to ``max_iter``."""
    warmup = int(cloud.warmup_steps)
    step = int(cloud.step)  # once, when training starts
    end = step + max(max_iter - start_iter, 0)
    if warmup < end:
        return
    window = cloud.count_steps  # online K_i end there when it is inside the run
    online = (
        head.class_counts_source == "online"
        and cloud.statistics.counting
        and (window is None or window >= end)
    )
    carried = (
        f"; the cloud's step is {step} at iteration {start_iter}" if step != start_iter else ""
    )
    logger.warning(
        "MODEL.HEADS.FEATURE_CLOUD.WARMUP_ITERS is %d, the whole run or more (the trainer stops "
        "at iteration %d, SOLVER.MAX_EPOCH x iterations per epoch%s): the cloud never starts%s; "
        "set WARMUP_ITERS below the run (the LEAP paper: some epochs; a third of training is "
        "this package's evaluation default)",
        warmup,
        max_iter,
        carried,
        " and the online counting of CLASS_COUNTS: online never ends" if online else "",
    )


def _train_sampler_name(loader: Any) -> str:
    """The class name of the sampler behind a training loader (fastreid wraps its identity
    samplers in a ``BatchSampler``); ``""`` when there is none."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None) or getattr(loader, "sampler", None)
    return "" if sampler is None else type(sampler).__name__


def _check_class_count(heads: List[LEAPHead], dataset: Any) -> None:
    """When the trainer is built (``DefaultTrainer(cfg)``): a ``MODEL.HEADS.NUM_CLASSES`` other
    than the training set's identities is refused there, not in the first hook of ``train()``
    (where fastreid's own hooks, not yet started, would bury the message under theirs)."""
    sized = [h for h in heads if h.class_counts_source == "dataset" and h.margin_head is not None]
    if sized:
        counts = class_counts_from_dataset(dataset)
        for head in sized:
            head.check_class_count(counts.numel())


def _leap_heads(model: nn.Module) -> List[LEAPHead]:
    return [m for m in model.modules() if isinstance(m, LEAPHead)]


def _build_hooks_with_feature_cloud(build_hooks: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(build_hooks)
    def wrapped(self: DefaultTrainer) -> List[HookBase]:
        ret = build_hooks(self)
        heads = _leap_heads(self.model)
        if heads and not any(isinstance(h, FeatureCloudHook) for h in ret):
            _check_class_count(heads, self.data_loader.dataset)
            ret.insert(0, FeatureCloudHook())
        return ret

    wrapped._feature_cloud = True  # type: ignore[attr-defined]
    return wrapped


#: fastreid's identity samplers: each adds DATALOADER.NUM_INSTANCE images of an identity to the
#: batch it builds and yields the batch only when it holds exactly the per-rank batch size
_IDENTITY_SAMPLERS = ("NaiveIdentitySampler", "BalancedIdentitySampler")


def _check_identity_batch(cfg: CfgNode) -> None:
    """Refuse a batch that fastreid's identity sampler can never fill. Both samplers build the
    global batch (per-rank batch ``b`` = ``SOLVER.IMS_PER_BATCH`` // ranks, times the ranks) of
    identities with ``K`` = ``DATALOADER.NUM_INSTANCE`` images each and yield it only when it
    holds exactly that many: ``BalancedIdentitySampler`` checks after every identity (the global
    batch must be a multiple of ``K``), ``NaiveIdentitySampler`` after every round of ``b // K``
    identities (a multiple of ``(b // K) * K``: 2 ranks of 10 with 4 instances add 8 a round and
    never reach 20); ``b < K`` picks no identity. Such a batch hung training at full CPU without a
    word (s52 trial: batch 30 with 4 instances ran 7 minutes). Only for models holding this
    package's head (the shipped YAMLs use ``NaiveIdentitySampler``)."""
    model = cfg.MODEL
    ours = model.META_ARCHITECTURE in ("LEAPBaseline", "FTLBaseline") or (
        model.HEADS.NAME == "LEAPHead"
    )
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if not ours or sampler not in _IDENTITY_SAMPLERS:
        return
    from fastreid.utils import comm

    world = comm.get_world_size()
    batch, instances = int(cfg.SOLVER.IMS_PER_BATCH) // world, int(cfg.DATALOADER.NUM_INSTANCE)
    step = (
        instances
        if sampler == "BalancedIdentitySampler"
        else (batch // max(instances, 1)) * instances
    )
    if instances < 1 or batch < instances or (batch * world) % step:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} ({batch} per rank on {world} "
            f"rank(s)) does not fit DATALOADER.NUM_INSTANCE {instances}: fastreid's {sampler} "
            f"adds {step} images at a time and yields a batch only at exactly {batch * world} "
            "images (per-rank batch x ranks), so training would hang without a word; give "
            "every rank a multiple of NUM_INSTANCE (IMS_PER_BATCH = NUM_INSTANCE x k x ranks)"
        )


def _build_train_loader_checked(build: Callable[..., Any]) -> Callable[..., Any]:
    """``DefaultTrainer.build_train_loader`` (a bound classmethod) that first runs
    :func:`_check_identity_batch` (before the loader, whose iterator fastreid starts at once)."""
    func = build.__func__  # type: ignore[attr-defined]

    @functools.wraps(func)
    def wrapped(cls: Any, cfg: CfgNode, *args: Any, **kwargs: Any) -> Any:
        _check_identity_batch(cfg)
        return func(cls, cfg, *args, **kwargs)

    wrapped._feature_cloud = True  # type: ignore[attr-defined]
    return wrapped


def _integrate_trainer() -> None:
    """The trainer integrations this module installs (idempotent): ``Checkpointer`` gives
    data-sized feature-cloud buffers the checkpoint's shape before fastreid's shape filter (which
    would drop them), skips a feature-cloud / FTL statistics state of another class count as a
    whole, and lets checkpointables refuse their entry before the model loads,
    ``DefaultTrainer.build_hooks`` adds :class:`FeatureCloudHook`, and
    ``DefaultTrainer.build_train_loader`` refuses a batch fastreid's identity sampler cannot fill
    (:func:`_check_identity_batch`)."""
    if not getattr(Checkpointer._load_model, "_feature_cloud", False):
        Checkpointer._load_model = _checkpointer_load_model(Checkpointer._load_model)
    if not getattr(Checkpointer.load, "_feature_cloud", False):
        Checkpointer.load = _checkpointer_load(Checkpointer.load)
    if not getattr(DefaultTrainer.build_hooks, "_feature_cloud", False):
        DefaultTrainer.build_hooks = _build_hooks_with_feature_cloud(DefaultTrainer.build_hooks)
    if not getattr(DefaultTrainer.build_train_loader, "_feature_cloud", False):
        DefaultTrainer.build_train_loader = classmethod(  # type: ignore[method-assign]
            _build_train_loader_checked(DefaultTrainer.build_train_loader)
        )


_integrate_trainer()


# ------------------------------------------------------------------ the head
#: what a whole-module pickle of a :class:`LEAPHead` of an earlier release may lack: attribute
#: -> the value that gives that release's behaviour
_PICKLE_PREDATES: Dict[str, Any] = {
    # before the flag: other counts than the held ones were re-laid out with a warning
    "_counts_from_checkpoint": True,
    "_batch_checked": False,  # the head checks its batch itself
    "configured_seed": None,  # not known: a fine-tune's log names no YAML seed
    "_config_keys": True,  # messages named the YAML keys
}


@_register_once(REID_HEADS_REGISTRY)
class LEAPHead(nn.Module):
    """fastreid re-ID head: pooling + BN neck (as ``EmbeddingHead``) + LEAP margin classifier.

    Training returns ``{"cls_outputs", "pred_class_logits", "features"}`` like
    ``EmbeddingHead``: ``cls_outputs`` are the CosFace/ArcFace margin logits with the feature
    cloud (LEAP Eq. 7-8) for fastreid's cross-entropy, ``pred_class_logits`` the plain
    ``s cos(theta)`` (accuracy logging), ``features`` the pooled (``NECK_FEAT: before``) or neck
    (``after``) features. Inference returns the neck features. The class statistics update only
    in training steps with gradients, so fastreid's PreciseBN pass (``no_grad``, dummy labels)
    leaves them untouched.

    Building the head reads no data. ``class_counts="dataset"`` leaves ``K_i`` to
    :meth:`set_class_counts` (:class:`FeatureCloudHook` calls it when fastreid's trainer starts)
    or to a checkpoint; a training step before either raises. With ``num_classes=0`` (the shipped
    YAMLs: fastreid's trainer fills ``NUM_CLASSES`` from the training set) the head has no
    classifier and serves inference only. Under an initialised process group the class
    statistics are synchronised across ranks (the head's ``sync="auto"``).

    Built from Python (without a config), the keywords are ``EmbeddingHead``'s (``feat_dim``,
    ``embedding_dim``, ``num_classes``, ``neck_feat``, ``pool_type``, ``with_bnneck``,
    ``norm_type``), then the margin's and the cloud's as :class:`LEAPMarginHead` names them
    (``pad_to``: ``batch_size_per_rank``; no ``sync``, ``process_group``, ``sub_centers``,
    ``impl``, ``chunk_size``, ``reduction``), with its values (``None``, not the YAML's ``-1``;
    ``margin_type`` also in fastreid's spelling, ``CosSoftmax``) and messages name them; built
    from the config (:meth:`from_config`) they name the YAML keys.
    """

    @configurable
    def __init__(
        self,
        *,
        feat_dim: int,
        embedding_dim: int,
        num_classes: int,
        neck_feat: str,
        pool_type: str,
        margin_type: str,
        scale: float,
        margin: float,
        with_bnneck: bool,
        norm_type: str,
        cloud: Optional[str] = "full",
        tail_threshold: int = 20,
        gamma: float = 0.1,
        memory_per_sample: int = 1,
        warmup_steps: int = 0,
        class_counts: Optional[Union[ClassCounts, str]] = "dataset",
        count_steps: Optional[int] = None,
        seed: Optional[int] = None,
        validate: bool = True,
        batch_size_per_rank: Optional[int] = None,
        cloud_mode: str = DEFAULT_CLOUD_MODE,
        cloud_scale: float = DEFAULT_CLOUD_SCALE,
        prototype_shrinkage: Optional[float] = DEFAULT_PROTOTYPE_SHRINKAGE,
        imprint_step: Optional[int] = None,
        prototype_min_count: int = DEFAULT_PROTOTYPE_MIN_COUNT,
        center_rate: str = DEFAULT_CENTER_RATE,
        unknown_variance: str = DEFAULT_UNKNOWN_VARIANCE,
        angle_max_age: Optional[int] = None,
        _from_config: bool = False,
    ) -> None:
        super().__init__()
        #: messages name the YAML keys (built by :meth:`from_config`) or the Python arguments
        self._config_keys = bool(_from_config)
        with self._naming():  # every message below names the Python arguments
            if not hasattr(pooling, pool_type):
                raise ValueError(
                    f"unknown pool_type {pool_type!r}; expected one of {pooling.__all__}"
                )
            if neck_feat not in ("before", "after"):
                raise ValueError(f"neck_feat must be 'before' or 'after', got {neck_feat!r}")
            if isinstance(class_counts, str) and class_counts not in ("dataset", "online"):
                raise ValueError(
                    "class_counts must be 'dataset', 'online' or the per-class counts, got "
                    f"{class_counts!r}"
                )
            if int(num_classes) < 0:
                raise ValueError(f"num_classes must be >= 0, got {num_classes}")
            margin_type = margin_for_cls_layer(margin_type, key=self._key("margin_type"))
            # an isinstance test first: ``==`` on a NumPy array of counts compares elementwise
            online = class_counts is None or (
                isinstance(class_counts, str) and class_counts == "online"
            )
            if cloud is not None and online and int(warmup_steps) <= 0:
                raise ValueError(
                    f"{self._setting('class_counts', 'online')} counts K_i during "
                    f"{self._key('warmup_steps')}, which is {warmup_steps}: set it to at least "
                    f"one epoch of iterations, or use {self._setting('class_counts', 'dataset')}"
                )
            self.pool_layer = getattr(pooling, pool_type)()
            self.neck_feat = neck_feat
            neck: List[nn.Module] = []
            if embedding_dim > 0:
                neck.append(nn.Conv2d(feat_dim, embedding_dim, 1, 1, bias=False))
                feat_dim = embedding_dim
            if with_bnneck:
                neck.append(get_norm(norm_type, feat_dim, bias_freeze=True))
            self.bottleneck = nn.Sequential(*neck)
            self.bottleneck.apply(weights_init_kaiming)

            #: where ``K_i`` come from: "dataset" (set_class_counts / a checkpoint), "online" or
            #: "given"
            self.class_counts_source = class_counts if isinstance(class_counts, str) else "given"
            if class_counts is None:
                self.class_counts_source = "online"
            self._counts_pending = cloud is not None and self.class_counts_source == "dataset"
            self._counts_from_checkpoint = False  # K_i came with a loaded state dict
            self.margin_head: Optional[LEAPMarginHead] = None
            if int(num_classes) > 0:
                if self._counts_pending:
                    counts: Any = torch.zeros(int(num_classes), dtype=torch.long)  # placeholder
                else:
                    counts = None if isinstance(class_counts, str) else class_counts
                with warnings.catch_warnings():
                    if self._counts_pending:  # set_class_counts lays the placeholder out
                        warnings.filterwarnings("ignore", re.escape(ALL_ZERO_COUNTS))
                    self.margin_head = LEAPMarginHead(
                        feat_dim,
                        int(num_classes),
                        margin_type=margin_type,
                        scale=scale,
                        margin=margin,
                        cloud=cloud,
                        tail_threshold=tail_threshold,
                        gamma=gamma,
                        memory_per_sample=memory_per_sample,
                        warmup_steps=warmup_steps,
                        class_counts=counts,
                        seed=seed,
                        validate=validate,
                        count_steps=count_steps if self.class_counts_source == "online" else None,
                        cloud_mode=cloud_mode,
                        cloud_scale=cloud_scale,
                        prototype_shrinkage=prototype_shrinkage,
                        prototype_min_count=prototype_min_count,
                        imprint_step=imprint_step,
                        center_rate=center_rate,
                        unknown_variance=unknown_variance,
                        angle_max_age=angle_max_age,
                        # statistics identical on every rank under a process group (sync="auto",
                        # the head's default); the per-rank batch size spares a host sync per step
                        pad_to=batch_size_per_rank,
                    )
        #: ``MODEL.HEADS.FEATURE_CLOUD.SEED`` (``None``: -1, from the global RNG); a checkpoint's
        #: cloud keeps its own seed (named in the log when this differs)
        self.configured_seed = seed
        self.register_load_state_dict_post_hook(_counts_loaded)
        #: fastreid's ``CE.EPSILON`` when :class:`LEAPBaseline` runs the cross-entropy inside the
        #: head (fused kernels); ``None``: return margin logits for fastreid's own loss
        self.fused_ce_epsilon: Optional[float] = None
        self._batch_checked = False  # LEAPBaseline checked the step's batch before the backbone

    def _key(self, argument: str) -> str:
        """How this head's messages name a setting: its YAML key when :meth:`from_config` built
        it, else the Python argument."""
        return _YAML_KEYS[argument] if self._config_keys else argument

    def _setting(self, argument: str, value: Any) -> str:
        """A setting with its value, as the caller writes it (``CLASS_COUNTS: online`` in the
        YAML, ``class_counts='online'`` in Python)."""
        return f"{self._key(argument)}: {value}" if self._config_keys else f"{argument}={value!r}"

    @contextlib.contextmanager
    def _naming(self) -> Iterator[None]:
        """The one place where the head's messages get the caller's names: built from the config,
        the errors and warnings inside (the core head's and the head's own, written with the
        Python arguments) name the YAML keys (:func:`_yaml_error`, :func:`_yaml_warnings`: also
        in fastreid's log); built from Python they pass as they are."""
        if not self._config_keys:
            yield
            return
        try:
            with _yaml_warnings(stacklevel=6):  # fastreid's configurable, as before
                yield
        except (TypeError, ValueError) as error:
            raise _yaml_error(error) from error

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases lack what :data:`_PICKLE_PREDATES` fills."""
        super().__setstate__(migrate_checked(state, predating=_PICKLE_PREDATES))

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        heads = cfg.MODEL.HEADS
        if "FEATURE_CLOUD" not in heads:
            raise KeyError(
                "MODEL.HEADS.FEATURE_CLOUD is missing: call "
                "feature_cloud.integrations.fastreid.add_feature_cloud_config(cfg) before "
                "cfg.merge_from_file(...)"
            )
        with _yaml_warnings():  # in fastreid's log.txt too
            _warn_fastreid_margin_defaults(cfg)
        fc = heads.FEATURE_CLOUD
        clouds: Dict[str, Optional[str]] = {**{r: r for r in CLOUD_RULES}, "none": None}
        if str(fc.CLOUD).lower() not in clouds:
            raise ValueError(
                f"MODEL.HEADS.FEATURE_CLOUD.CLOUD must be one of {tuple(clouds)}, got {fc.CLOUD!r}"
            )
        cloud = clouds[str(fc.CLOUD).lower()]
        mode = str(fc.CLASS_COUNTS).lower()
        if mode not in ("dataset", "online"):
            raise ValueError(
                f"MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS must be 'dataset' or 'online', got {fc.CLASS_COUNTS!r}"
            )
        if int(fc.COUNT_ITERS) < -1:
            raise ValueError(
                "MODEL.HEADS.FEATURE_CLOUD.COUNT_ITERS must be the iterations of one epoch, or 0 "
                f"(-1) for the whole warm-up, got {fc.COUNT_ITERS}"
            )
        from fastreid.utils import comm

        world = comm.get_world_size()
        per_rank = (
            int(cfg.SOLVER.IMS_PER_BATCH) // world
            if int(cfg.SOLVER.IMS_PER_BATCH) % world == 0
            else None
        )
        return {
            "feat_dim": cfg.MODEL.BACKBONE.FEAT_DIM,
            "embedding_dim": heads.EMBEDDING_DIM,
            "num_classes": heads.NUM_CLASSES,
            "neck_feat": heads.NECK_FEAT,
            "pool_type": heads.POOL_LAYER,
            "margin_type": heads.CLS_LAYER,
            "scale": float(heads.SCALE),
            "margin": float(heads.MARGIN),
            "with_bnneck": heads.WITH_BNNECK,
            "norm_type": heads.NORM,
            "cloud": cloud,
            "tail_threshold": int(fc.TAIL_THRESHOLD),
            "gamma": float(fc.GAMMA),
            "memory_per_sample": int(fc.MEMORY_PER_SAMPLE),
            "warmup_steps": int(fc.WARMUP_ITERS),
            "class_counts": mode,
            "count_steps": int(fc.COUNT_ITERS) if int(fc.COUNT_ITERS) > 0 else None,
            "seed": None if int(fc.SEED) < 0 else int(fc.SEED),
            "validate": bool(fc.VALIDATE),
            "batch_size_per_rank": per_rank if world > 1 else None,
            "cloud_mode": str(fc.get("MODE", DEFAULT_CLOUD_MODE)).lower(),
            "cloud_scale": fc.get("SCALE", DEFAULT_CLOUD_SCALE),
            "prototype_shrinkage": _shrinkage(
                fc.get("PROTOTYPE_SHRINKAGE", DEFAULT_PROTOTYPE_SHRINKAGE)
            ),
            "imprint_step": None if int(fc.get("IMPRINT_ITERS", -1)) < 0 else int(fc.IMPRINT_ITERS),
            "prototype_min_count": fc.get("PROTOTYPE_MIN_COUNT", DEFAULT_PROTOTYPE_MIN_COUNT),
            "center_rate": str(fc.get("CENTER_RATE", DEFAULT_CENTER_RATE)).lower(),
            "unknown_variance": str(fc.get("UNKNOWN_VARIANCE", DEFAULT_UNKNOWN_VARIANCE)).lower(),
            "angle_max_age": _max_age(fc.get("ANGLE_MAX_AGE", -1)),
            "_from_config": True,  # messages name the YAML keys
        }

    @property
    def statistics(self):
        """The :class:`feature_cloud.ClassStatistics` of the cloud (an inference-only head,
        ``NUM_CLASSES: 0``, has none: ``AttributeError``, so that ``hasattr`` and
        ``torch.jit.trace`` see no attribute)."""
        if self.margin_head is None:
            raise AttributeError(
                f"statistics: LEAPHead was built with {self._setting('num_classes', 0)} "
                "(inference only)"
            )
        return self.margin_head.statistics

    def __getattr__(self, name: str) -> Any:
        if name == "statistics":  # the property raised: say why (nn.Module's message would not)
            raise AttributeError(
                f"statistics: LEAPHead was built with {self._setting('num_classes', 0)} "
                "(inference only): "
                "it has no classifier and no cloud statistics"
            )
        return super().__getattr__(name)

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        """An inference-only head (``NUM_CLASSES: 0``, fastreid's ``--eval-only``) takes a trained
        checkpoint's classifier and cloud state (``margin_head.*``) as not needed, said in one log
        line, instead of fastreid's list of every one as unused (a strict load accepts them)."""
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.margin_head is not None:
            return
        own = prefix + "margin_head."
        skipped = [k for k in unexpected_keys if k.startswith(own)]
        if not skipped:
            return
        unexpected_keys[:] = [k for k in unexpected_keys if not k.startswith(own)]
        weight = state_dict.get(own + "weight")
        classes = f" of {weight.shape[0]} identities" if isinstance(weight, Tensor) else ""
        logger.info(
            "LEAPHead built for inference (NUM_CLASSES: 0): the checkpoint's classifier%s and "
            "feature-cloud state (%d entries %s*) are not loaded; features do not use them",
            classes,
            len(skipped),
            own,
        )

    @property
    def class_counts_pending(self) -> bool:
        """Whether ``K_i`` still have to come from the training set (:meth:`set_class_counts`)."""
        return self._counts_pending

    def set_class_counts(self, counts: ClassCounts) -> None:
        """Give the cloud its ``K_i`` (LEAP Eq. 5), e.g. ``class_counts_from_dataset(dataset)``.

        Lays out the angle memory. Counts equal to those already held (a resumed checkpoint) change
        nothing; different counts re-lay out the memory (centers kept) with a warning.
        """
        head = self._margin_head()
        if isinstance(counts, collections.abc.Mapping):  # Counter(dataset.targets)
            counts = class_counts_from_mapping(counts, head.num_classes)
        counts = torch.as_tensor(counts)
        if counts.dim() != 1:
            raise ValueError(f"class counts must be 1-D, got shape {tuple(counts.shape)}")
        self.check_class_count(counts.numel())
        stats = head.statistics
        if not self._counts_pending:
            if torch.equal(stats.class_counts.cpu(), counts.cpu().long()):
                want = (counts.cpu().long() * stats.memory_per_sample).clamp_min(1)
                if torch.equal(stats.memory_capacity.cpu(), want):
                    return
                logger.warning(
                    "LEAPHead: the loaded checkpoint's angle memory was laid out for another "
                    "MODEL.HEADS.FEATURE_CLOUD.MEMORY_PER_SAMPLE; laid out again for "
                    f"{stats.memory_per_sample} (stored angles dropped, class centers kept)"
                )
                stats.allocate_memory(counts)
                return
            if self._counts_from_checkpoint:
                logger.warning(
                    "LEAPHead: the class counts of the loaded checkpoint differ from the training "
                    "set's; the angle memory is laid out again for the training set (class "
                    "centers kept)"
                )
        stats.allocate_memory(counts)
        self._counts_pending = False

    def check_class_count(self, identities: int) -> None:
        """Raise unless the training set's ``identities`` are this head's classes."""
        head = self._margin_head()
        if identities != head.num_classes:
            hint = " (leave it 0: fastreid's trainer sets it from the data)"
            raise ValueError(
                f"the training set has {identities} identities but {self._key('num_classes')} is "
                f"{head.num_classes}{hint if self._config_keys else ''}"
            )

    def _margin_head(self) -> LEAPMarginHead:
        if self.margin_head is None:
            how = (
                "fastreid's DefaultTrainer sets NUM_CLASSES from the training set; set it in the "
                "config"
                if self._config_keys
                else "build it with the number of classes"
            )
            raise RuntimeError(
                f"LEAPHead was built with {self._setting('num_classes', 0)} (inference only). "
                f"{how} to train or to use the classifier"
            )
        return self.margin_head

    def _check_step(self, features: Tensor, targets: Tensor) -> None:
        """A training step's checks before any of the head's layers runs (the neck's BatchNorm
        took a refused batch): the counts are set; the targets' type, shape and range and the
        features' finiteness (one host read with the head's ``validate``)."""
        head = self._margin_head()
        if self._counts_pending:
            raise RuntimeError(
                f"{self._setting('class_counts', 'dataset')}, but the class counts are not set "
                "yet: fastreid's DefaultTrainer sets them from its training set when training "
                "starts (FeatureCloudHook); in another training loop call "
                "head.set_class_counts(class_counts_from_dataset(train_set)) first, load a "
                f"checkpoint, or use {self._setting('class_counts', 'online')} with "
                f"{self._key('warmup_steps')} covering an epoch"
            )
        check_inputs(features, targets, head.num_classes, head.validate, "targets")

    def forward(
        self, features: Tensor, targets: Optional[Tensor] = None
    ) -> Union[Tensor, Dict[str, Tensor]]:
        """The neck features in eval mode; in training the dict of the class docstring."""
        if self.training and targets is None:
            raise ValueError("LEAPHead needs targets (identity labels) in training mode")
        if self.training and torch.is_grad_enabled() and not self._batch_checked:
            self._check_step(features, cast(Tensor, targets))  # before the neck's BatchNorm
        pool_feat = self.pool_layer(features)
        neck_feat = self.bottleneck(pool_feat)[..., 0, 0]
        if not self.training:
            return neck_feat
        head = self._margin_head()
        feat = pool_feat[..., 0, 0] if self.neck_feat == "before" else neck_feat
        if self.fused_ce_epsilon is not None:  # LEAPBaseline: the loss on the fused kernels
            losses, top1 = head(
                neck_feat,
                targets,
                return_top1=True,
                reduction="none",
                label_smoothing=fastreid_epsilon_to_label_smoothing(
                    self.fused_ce_epsilon, head.num_classes
                ),
            )
            return {"cls_losses": losses, "top1": top1, "features": feat}
        cls_outputs = head.margin_logits(neck_feat, targets)
        with torch.no_grad():
            pred_class_logits = head.logits(neck_feat)
        return {
            "cls_outputs": cls_outputs,
            "pred_class_logits": pred_class_logits,
            "features": feat,
        }


def _counts_loaded(module: nn.Module, incompatible: Any) -> None:
    """After loading a state dict: counts in the checkpoint (a trained head) are the ``K_i``."""
    if not isinstance(module, LEAPHead) or module.margin_head is None:
        return
    if bool(module.margin_head.statistics.class_counts.sum() > 0):
        module._counts_pending = False
        module._counts_from_checkpoint = True


def fastreid_epsilon_to_label_smoothing(epsilon: float, num_classes: int) -> float:
    """fastreid's ``CE.EPSILON`` ``e`` (targets ``1 - e`` and ``e / (C - 1)``) as
    ``F.cross_entropy``'s ``label_smoothing`` (targets ``1 - eps + eps / C`` and ``eps / C``):
    ``eps = e C / (C - 1)``."""
    return float(epsilon) * num_classes / max(num_classes - 1, 1)


class _PredictedClasses:
    """Stands in for ``pred_class_logits`` in fastreid's ``log_accuracy`` (which takes the top-1
    class): the fused loss returns whether each sample's target ranks first, not a ``B x C``
    logit matrix; ``pred`` is the label where it does and ``-1`` elsewhere."""

    def __init__(self, pred: Tensor) -> None:
        self.pred = pred

    def detach(self) -> _PredictedClasses:
        return self

    def size(self, dim: int = 0) -> int:
        return self.pred.shape[0]

    def topk(self, k: int, dim: int = 1, largest: bool = True, sorted: bool = True):
        if k != 1 or dim != 1 or not largest:
            raise ValueError("only the top-1 class is known (fastreid logs top-1 accuracy)")
        return None, self.pred.unsqueeze(1)


@_register_once(META_ARCH_REGISTRY)
class LEAPBaseline(CheckedBeforeLoading, Baseline):
    """fastreid's ``Baseline`` whose cross-entropy runs inside :class:`LEAPHead` on the fused
    kernels (``MODEL.META_ARCHITECTURE: LEAPBaseline``).

    Same configuration and losses as ``Baseline``: ``CrossEntropyLoss`` with ``CE.EPSILON``
    label smoothing (``1 - e`` on the target, ``e / (C - 1)`` elsewhere), normalised like
    fastreid's ``cross_entropy_loss`` (sum over the non-zero losses' count) and scaled by
    ``CE.SCALE``; top-1 accuracy logged as ``cls_accuracy``; triplet, circle and pairwise
    cosface losses computed by ``Baseline.losses`` on the head's features. The head returns
    per-sample losses instead of ``B x C`` margin logits, so the step makes no logit matrix
    outside the fused kernels. With adaptive label smoothing (``CE.EPSILON < 0``), with
    ``CE.EPSILON >= (C - 1) / C`` (no ``label_smoothing`` below 1 means it; a warning) or another
    head it is exactly ``Baseline``.
    """

    @configurable
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        names = self.loss_kwargs["loss_names"]
        eps = float(self.loss_kwargs.get("ce", {}).get("eps", 0.0))
        if isinstance(self.heads, LEAPHead) and "CrossEntropyLoss" in names and eps >= 0:
            head = self.heads.margin_head
            classes = 0 if head is None else head.num_classes
            if classes > 1 and fastreid_epsilon_to_label_smoothing(eps, classes) >= 1.0:
                with _yaml_warnings():  # in fastreid's log.txt too
                    warnings.warn(
                        f"MODEL.LOSSES.CE.EPSILON {eps} is at least (C - 1) / C = "
                        f"{(classes - 1) / classes:.4g} for MODEL.HEADS.NUM_CLASSES {classes}: "
                        "fastreid's targets give the true class no more weight than the others "
                        "(torch's label_smoothing would be >= 1), so LEAPBaseline runs fastreid's "
                        "own cross-entropy on the margin logits, as Baseline does",
                        stacklevel=2,
                    )
            else:
                self.heads.fused_ce_epsilon = eps

    @classmethod
    def from_config(cls, cfg: CfgNode) -> Dict[str, Any]:
        return Baseline.from_config(cfg)

    def forward(self, batched_inputs: Any) -> Any:
        """``Baseline.forward`` with a training batch checked before the backbone (its
        BatchNorm took a refused batch: a NaN image left NaN running means): the targets'
        type, shape and range, finite images (one host read with the head's ``validate``)."""
        heads = self.heads
        images = batched_inputs.get("images") if isinstance(batched_inputs, dict) else None
        targets = batched_inputs.get("targets") if isinstance(batched_inputs, dict) else None
        if not (
            self.training
            and torch.is_grad_enabled()
            and isinstance(heads, LEAPHead)
            and isinstance(images, Tensor)
            and isinstance(targets, Tensor)
        ):
            return super().forward(batched_inputs)
        heads._check_step(images, targets.to(images.device))
        heads._batch_checked = True
        try:
            return super().forward(batched_inputs)
        finally:
            heads._batch_checked = False

    def losses(self, outputs: Dict[str, Any], gt_labels: Tensor) -> Dict[str, Tensor]:
        if "cls_losses" not in outputs:  # margin logits: fastreid's own cross-entropy
            return super().losses(outputs, gt_labels)
        kwargs = self.loss_kwargs
        names = kwargs["loss_names"]
        self.loss_kwargs = dict(kwargs, loss_names=[n for n in names if n != "CrossEntropyLoss"])
        try:  # accuracy and every other loss by Baseline itself
            loss_dict = super().losses(
                {
                    "pred_class_logits": _PredictedClasses(
                        torch.where(outputs["top1"], gt_labels, torch.full_like(gt_labels, -1))
                    ),
                    "cls_outputs": None,
                    "features": outputs["features"],
                },
                gt_labels,
            )
        finally:
            self.loss_kwargs = kwargs
        if "CrossEntropyLoss" in names:
            per_sample = outputs["cls_losses"]
            count = torch.count_nonzero(per_sample).clamp_min(1)  # fastreid's normalisation
            loss_dict["loss_cls"] = per_sample.sum() / count * kwargs["ce"].get("scale", 1.0)
        return loss_dict
