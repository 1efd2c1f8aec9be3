r"""``FeatureCloud``: the LEAP feature cloud as one component (statistics, step, warm-up, noise).

Every head (:class:`~feature_cloud.heads.LEAPMarginHead`,
:class:`~feature_cloud.distributed.ShardedLEAPMarginHead`) and adapter (PML ``LEAPLoss``,
fastreid, timm) holds one :class:`FeatureCloud` and nothing else of the cloud: its settings,
their checks, the training-step bookkeeping and the checkpoint state live here once.

Module state is tensors only (buffers ``step`` and ``seed`` next to the statistics' buffers):
``state_dict()`` loads with ``strict=True``, copies into EMA models, and the module traces and
exports (``torch.jit.trace``, ``torch.export``, ONNX) and compiles (``torch.compile``) without an
opaque generator. The noise is counter-based (:mod:`feature_cloud.noise`): the cloud of a step is
a pure function of ``(seed, step, stream, row, class)``.
"""

from __future__ import annotations

import sys
import weakref
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    Optional,
    Sequence,
    Tuple,
    TypedDict,
    cast,
)

import torch
from torch import Tensor, nn

from . import functional as FC
from . import noise as N
from ._buffers import keep_loaded_dtypes
from ._compat import in_backward, is_compiling, materialized
from ._validation import (
    ClassCounts,
    FixedSettingError,
    as_bool,
    as_float,
    as_int,
    check_batch,
    check_class_counts,
    checked_attribute,
    fixed_setting,
    forwarded,
    inference_problem,
    migrate_checked,
    trainable_labels,
    warn_user,
)
from .statistics import (
    _NEW_SIZE,
    DEFAULT_CENTER_RATE,
    ClassStatistics,
    check_gamma,
    warn_full_without_pairs,
)
from .sync import BATCH_MODES, SyncedClassStatistics

__all__ = [
    "FeatureCloud",
    "CloudOptions",
    "ShardedCloudOptions",
    "WithFeatureCloud",
    "SYNC_MODES",
    "DEFAULT_CLOUD_MODE",
    "DEFAULT_CLOUD_SCALE",
    "DEFAULT_PROTOTYPE_SHRINKAGE",
    "DEFAULT_PROTOTYPE_MIN_COUNT",
    "PAPER_LEAP",
    "migrate_state_dict",
]

#: where the cloud enters the logits by default (:data:`feature_cloud.functional.CLOUD_MODES`).
#: ``"margin"`` (target logit only, never closer), not the paper's ``"paper"`` (every logit,
#: LEAP Eq. 7-8): on real faces it raised tail accuracy more, at a third of the cloud's cost
#: (README, "Real faces"); ``cloud_mode="paper", cloud_scale=1.0`` is the paper's cloud
#: (:data:`PAPER_LEAP`: the paper's LEAP as a whole).
DEFAULT_CLOUD_MODE = "margin"
#: factor on the cloud's standard deviation by default (1: the paper's variance; see above)
DEFAULT_CLOUD_SCALE = 2.0
#: ``kappa`` of the inference prototypes (:func:`feature_cloud.functional.center_prototypes`):
#: class ``i``'s logit uses its weight shrunk towards its center by ``kappa / (kappa + K_i)``.
#: Not in the paper (``None``: the weights); on real faces it lifted the tail's classification
#: accuracy (README, "Real faces").
DEFAULT_PROTOTYPE_SHRINKAGE = 10.0
#: classes with fewer training samples than this keep their weights as prototypes: a one-shot
#: class's center is its single training image, not a mean, and leaning its prototype onto it
#: took head test images on real faces at one shot per tail class (README, "Real faces");
#: 1: every class leans (the rule of the previous release)
DEFAULT_PROTOTYPE_MIN_COUNT = 2

#: The LEAP paper's behaviour, as the keywords of :class:`FeatureCloud` (and of every head or
#: adapter that passes them on: ``LEAPMarginHead(D, C, **PAPER_LEAP)``, PML
#: ``LEAPLoss(C, D, **PAPER_LEAP)``, timm ``LEAPTask.from_timm(name, C, **PAPER_LEAP)``; fastreid:
#: ``feature_cloud.integrations.fastreid.PAPER_LEAP_YAML``). It sets every cloud default that is
#: not the paper's (README, "Defaults that differ from the paper"), and the opt-in ones to off:
#:
#: * ``cloud_mode="paper"``, ``cloud_scale=1.0``: an angle on every logit (Eq. 7-8) with the
#:   estimated variance (Eq. 6 / 9);
#: * ``prototype_shrinkage=None``: inference logits against the weights;
#: * ``center_rate="paper"``: Eq. 4 with the constant ``gamma`` (the first batch initialises);
#: * ``unknown_variance="pooled"``: a class with fewer than two stored angles has zero observed
#:   spread, so it gets the whole pooled variance (the paper's Eq. 6 / 9 with
#:   :math:`\sigma_i^2 = 0`; it does not discuss the case), as 0.1.0 did;
#: * ``angle_max_age=None`` (the ring memory of Eq. 5) and ``imprint_step=None`` (no weight
#:   imprinting): the defaults, listed so that the mapping stays the paper's.
#:
#: The warning for given ``class_counts`` that are all 0 (a count keyed by the wrong labels, a
#: tensor never filled): no class has an angle memory (LEAP Eq. 5 sizes it by ``K_i``) and every
#: class is tail. A placeholder that a checkpoint or ``allocate_memory`` replaces may ignore it.
ALL_ZERO_COUNTS = (
    "class_counts are all 0: no class has an angle memory (LEAP Eq. 5 sizes it by K_i) and every "
    "class counts as tail, so the cloud has no variance to estimate. Pass the dataset's images "
    "per class (collections.Counter(dataset.targets)), or class_counts=None to count them online; "
    "a placeholder that a checkpoint's state replaces may ignore this."
)

#: What the paper leaves to the data stays the caller's: ``class_counts`` (``K_i``),
#: ``warmup_steps`` (the paper starts the cloud after some epochs), ``tail_threshold``,
#: ``memory_per_sample``, and the margin's ``scale`` / ``margin`` (the heads' defaults are the
#: paper's re-ID setting, PML's its face setting); ``gamma`` defaults to the paper's 0.1. A
#: plain dict (it goes into configs, checkpoints and YAML as one): copy it for a variant,
#: ``dict(PAPER_LEAP, cloud_scale=2.0)``; the heads copy its values when they are built.
PAPER_LEAP: Dict[str, Any] = {
    "cloud_mode": "paper",
    "cloud_scale": 1.0,
    "prototype_shrinkage": None,
    "center_rate": "paper",
    "unknown_variance": "pooled",
    "angle_max_age": None,
    "imprint_step": None,
}

#: ``sync`` settings: ``"auto"`` synchronises the statistics over the default process group
#: whenever one is initialised with more than one rank (every rank all-gathers the detached batch,
#: see :class:`~feature_cloud.sync.SyncedClassStatistics`); ``"pml_gathered"`` expects the batch
#: pytorch-metric-learning's ``DistributedLossWrapper`` has already gathered; ``"off"`` keeps
#: per-rank statistics (explicit opt-out; they then differ between ranks).
SYNC_MODES = ("auto", "pml_gathered", "off")

ProcessGroup = Any


class ShardedCloudOptions(TypedDict, total=False):
    """The keywords of :class:`FeatureCloud` that a head passes on (``**cloud_options`` of
    :class:`~feature_cloud.distributed.ShardedLEAPMarginHead`, which takes ``process_group`` and
    ``pad_to`` as its own): a type checker checks their names and types in the heads' calls, as
    it does for :class:`FeatureCloud` itself. Annotate a dict of options with it (or
    :class:`CloudOptions`) to pass it as ``**options``."""

    tail_threshold: int
    gamma: float
    memory_per_sample: int
    warmup_steps: int
    class_counts: Optional[ClassCounts]
    seed: Optional[int]
    count_steps: Optional[int]
    cloud_mode: str
    cloud_scale: float
    prototype_shrinkage: Optional[float]
    prototype_min_count: int
    center_rate: str
    unknown_variance: str
    angle_max_age: Optional[int]
    imprint_step: Optional[int]
    sync: str


class CloudOptions(ShardedCloudOptions, total=False):
    """Every keyword of :class:`FeatureCloud` (``**cloud_options`` of
    :class:`~feature_cloud.heads.LEAPMarginHead`): :class:`ShardedCloudOptions` with
    ``process_group`` and ``pad_to``."""

    process_group: ProcessGroup
    pad_to: Optional[int]


def _check_seed(seed: Any) -> int:
    """A noise seed: an integer that fits the int64 ``seed`` buffer."""
    seed = as_int(seed, "seed")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in 64 bits, [-2**63, 2**63), got {seed}")
    return seed


def _check_config(
    rule: Optional[str],
    warmup_steps: Any,
    class_counts: Any,
    seed: Any,
    sync: str,
    count_steps: Any,
    gamma: Any,
    memory_per_sample: Any,
    tail_threshold: Any,
    angle_max_age: Any,
) -> Tuple[int, Optional[int]]:
    """The cloud's argument checks, named as the user passed them (the statistics re-check
    their own); returns ``(warmup_steps, count_steps)`` as ints."""
    FC.check_cloud_rule(rule, name="rule")
    as_int(tail_threshold, "tail_threshold", 0)
    as_int(memory_per_sample, "memory_per_sample", 1)
    check_gamma(gamma)
    _check_max_age(None, angle_max_age)
    warmup_steps = as_int(warmup_steps, "warmup_steps", 0)
    if rule is not None and class_counts is None and warmup_steps == 0:
        raise ValueError(
            "class_counts is required when warmup_steps == 0: the cloud needs K_i (LEAP "
            "Eq. 5). Pass the per-class sample counts, or warmup_steps >= 1 epoch to count "
            "them online; to load a trained state for inference only (no training), build it "
            "with cloud=None: the statistics load, nothing updates them."
        )
    if count_steps is not None:
        count_steps = as_int(count_steps, "count_steps")
        if not 1 <= count_steps <= max(warmup_steps, 1):
            raise ValueError(
                f"count_steps must be in [1, warmup_steps={warmup_steps}] (K_i are counted "
                f"during the warm-up), got {count_steps}"
            )
    if seed is not None:
        seed = _check_seed(seed)
    if sync not in SYNC_MODES:
        raise ValueError(f"sync must be one of {SYNC_MODES}, got {sync!r}")
    return warmup_steps, count_steps


def _check_mode(owner: Any, value: Any) -> str:
    if value not in FC.CLOUD_MODES:
        raise ValueError(f"cloud_mode must be one of {FC.CLOUD_MODES}, got {value!r}")
    return str(value)


#: ``cloud_scale`` above this warns: twice the largest the evaluations tried (docs/real-faces.md:
#: 0 to 4, no gain above the default 2)
_CLOUD_SCALE_WARN = 8.0


def _check_cloud_scale(owner: Any, value: Any) -> float:
    scale = as_float(value, "cloud_scale", minimum=0.0)
    if scale > _CLOUD_SCALE_WARN:
        warn_user(
            f"cloud_scale={scale} multiplies the cloud's standard deviation (default "
            f"{DEFAULT_CLOUD_SCALE}, the paper's 1; the evaluations tried 0 to 4): above "
            f"{_CLOUD_SCALE_WARN:g} the cloud's angles dwarf the classes' own spread. The logit "
            "scale s is the head's scale= (fastreid: MODEL.HEADS.SCALE, not "
            "FEATURE_CLOUD.SCALE)"
        )
    return scale


def _check_min_count(owner: Any, value: Any) -> int:
    return as_int(value, "prototype_min_count", 1)


def _check_rule(owner: Any, value: Any) -> Optional[str]:
    return FC.check_cloud_rule(value, name="rule")


def _check_max_age(owner: Any, value: Any) -> Optional[int]:
    return None if value is None else as_int(value, "angle_max_age", 1)


def _check_imprint_step(owner: Any, value: Any) -> Optional[int]:
    if value is None:
        return None
    step = as_int(value, "imprint_step", 0)
    rule, kappa = owner.rule, owner.prototype_shrinkage
    if rule is None or kappa is None:
        raise ValueError(
            f"imprint_step={step} imprints the inference prototypes: it needs a cloud rule (got "
            f"{rule!r}) and prototype_shrinkage (got {kappa!r})"
        )
    counter = getattr(owner, "_buffers", {}).get("step")  # (None while constructing)
    if counter is not None and not counter.is_meta and step != vars(owner).get("_imprint_step"):
        taken = owner._host_count()
        if step < taken:  # assigned mid-training: it would never run
            raise ValueError(
                f"imprint_step={step} is behind the current step {taken} ({taken} training "
                "steps taken): the imprint runs before training step imprint_step, so it would "
                f"never run; choose imprint_step >= {taken}, or None"
            )
    return step


#: why the settings that cannot change after construction cannot (:func:`fixed_setting`)
_WHY_FIXED = {
    "warmup_steps": "the step count, the online count of K_i and the cloud's start are set by it",
    "memory_per_sample": "it sizes the angle memory, K_i * P slots per class (LEAP Eq. 5)",
    "count_steps": "K_i are counted online over the first count_steps steps",
    "class_counts": "they lay out the angle memory (LEAP Eq. 5)",
    "sync": "it chose the statistics' class",
}
_SYNCHRONIZE = (
    "to synchronise the statistics over another group or with another pad_to, call "
    "feature_cloud.distributed.synchronize(the {holder}, process_group, pad_to=...) (on a "
    "FeatureCloud: its synchronize(process_group, pad_to=...)); for sync='off', build a new {holder} with "
    "sync='off' and load this one's state_dict()"
)
_SIZES = "it sizes the statistics"


class _Backward:
    """A training forward's graph, until it is backpropagated (``done``) or freed (then no
    reference is left to it): :meth:`FeatureCloud.watch`."""

    __slots__ = ("done", "__weakref__")

    def __init__(self) -> None:
        self.done = False

    def __call__(self, *_: Any) -> None:  # a hook of the graph's output node: lives with it
        self.done = True


#: the graphs of each cloud's training forwards not yet backpropagated, while an imprint is
#: ahead (weak: a freed graph drops out; outside the module: pickles and copies stay plain)
_UNDONE: weakref.WeakKeyDictionary[FeatureCloud, List[weakref.ref[_Backward]]] = (
    weakref.WeakKeyDictionary()
)


#: what a whole-module pickle (``torch.save(head)``) of an earlier release may lack: attribute
#: -> the value that gives that release's behaviour (the host copies ``_seed`` / ``_seen`` are
#: read with a fallback)
_PICKLE_PREDATES: Dict[str, Any] = {
    # before the inference prototypes (0.2.0.dev0 of 12-02): eval logits scored the weights
    "_prototype_shrinkage": None,
    # before prototype_min_count: every class with a center leaned (1; a class with a center
    # but K_i = 0 leaned fully onto it then, a case only online counting can reach)
    "_prototype_min_count": 1,
    "_imprint_step": None,  # before weight imprinting: never
    "_imprinted": -1,
}


class FeatureCloud(nn.Module):
    r"""Class statistics, step counter, warm-up and noise stream of the LEAP feature cloud.

    Args:
        num_classes: ``C``.
        embedding_size: ``D``.
        rule: ``"full"`` (LEAP Eq. 9), ``"vanilla"`` (Eq. 6) or ``None`` (no cloud: the
            statistics still exist but are not updated and no noise is drawn).
        tail_threshold: ``T`` of the vanilla rule (classes with ``K_i > T`` are head classes).
        gamma: center learning rate (paper: 0.1).
        memory_per_sample: ``P`` of LEAP Eq. 5.
        warmup_steps: training steps without cloud (the paper starts the cloud after some
            epochs; **default 0**: from the first step, on untrained features, so set it: the
            ``evaluate`` tool warms up for a third of training). With ``class_counts=None`` the
            counts ``K_i`` are taken online during warm-up, which must then be ``>= 1`` and
            exactly one epoch (longer: give ``count_steps``).
        class_counts: ``K_i`` per class from the dataset (recommended).
        count_steps: with ``class_counts=None``, the steps of one epoch: ``K_i`` are counted
            online over the first ``count_steps`` steps only (must be ``<= warmup_steps``);
            default ``warmup_steps`` (then the warm-up must be exactly one epoch, else the
            counts are multiplied by the number of epochs: a warning says so).
        cloud_mode: where the cloud enters the logits, one of
            :data:`~feature_cloud.functional.CLOUD_MODES`: ``"margin"`` (default: the target
            angle moves away by ``|alpha|``, a per-sample extra angular margin), ``"paper"``
            (LEAP Eq. 7-8, an angle on every logit) or ``"target"`` (target logit only).
        cloud_scale: factor on the cloud's standard deviation (default 2; 1: the paper's
            variance). The paper's LEAP is ``**``:data:`PAPER_LEAP` (these two, and the
            prototype and statistics settings that differ).
        prototype_shrinkage: ``kappa`` of the inference prototypes (:meth:`prototypes`, used by
            the heads' ``logits`` in eval mode, never by the training loss): class ``i``'s
            weight leans towards its center by ``kappa / (kappa + K_i)`` (default 10; ``None``:
            the weights, as in the paper). Classes whose center was never updated
            (``rule=None``) keep their weights.
        prototype_min_count: classes with fewer than this many samples ``K_i`` keep their
            weights as prototypes (default 2: a one-shot class's center is its one image; 1:
            every class leans, the previous release's rule).
        imprint_step: weight imprinting (not in the papers; README, "Real faces"): before
            training step ``imprint_step`` the owning head's class weights are replaced, once
            and in place, by the inference prototypes (:meth:`imprint`; their row norms kept),
            so the rest of training adapts the other classes and the features to tail weights
            that sit on their class centers. Default ``None`` (never; the paper). Needs a cloud
            rule and ``prototype_shrinkage``; the evaluation tool's ``--imprint-fraction``.
        center_rate, unknown_variance, angle_max_age: statistics options, see
            :class:`~feature_cloud.ClassStatistics` (``center_rate``, ``unknown_variance``,
            ``max_age``).
        seed: seed of the noise stream (a buffer, saved with the state); default draws one from
            the global RNG, so ``torch.manual_seed`` makes runs reproducible.
        sync: one of :data:`SYNC_MODES`; default ``"auto"``: statistics are identical on all
            ranks of an initialised process group without any extra call.
        process_group, pad_to: of the synchronised statistics (see
            :func:`~feature_cloud.sync.gather_batch`).

    State (all buffers): ``step`` (training steps taken), ``seed`` and ``statistics.*``.
    The cloud of a step draws :math:`z(\mathrm{seed}, \mathrm{step}, \mathrm{stream}, n, j)`
    (:mod:`feature_cloud.noise`) with ``stream`` the rank under synchronised statistics (0
    otherwise), so ranks draw independent clouds and a resumed run continues bit-identically.
    """

    step: Tensor
    seed: Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        rule: Optional[str] = "full",
        *,
        tail_threshold: int = 20,
        gamma: float = 0.1,
        memory_per_sample: int = 1,
        warmup_steps: int = 0,
        class_counts: Optional[ClassCounts] = None,
        seed: Optional[int] = None,
        count_steps: Optional[int] = None,
        cloud_mode: str = DEFAULT_CLOUD_MODE,
        cloud_scale: float = DEFAULT_CLOUD_SCALE,
        prototype_shrinkage: Optional[float] = DEFAULT_PROTOTYPE_SHRINKAGE,
        prototype_min_count: int = DEFAULT_PROTOTYPE_MIN_COUNT,
        center_rate: str = DEFAULT_CENTER_RATE,
        unknown_variance: str = FC.DEFAULT_UNKNOWN_VARIANCE,
        angle_max_age: Optional[int] = None,
        imprint_step: Optional[int] = None,
        sync: str = "auto",
        process_group: ProcessGroup = None,
        pad_to: Optional[int] = None,
    ) -> None:
        super().__init__()
        warmup_steps, count_steps = _check_config(
            rule,
            warmup_steps,
            class_counts,
            seed,
            sync,
            count_steps,
            gamma,
            memory_per_sample,
            tail_threshold,
            angle_max_age,
        )
        if class_counts is not None:
            class_counts = check_class_counts(class_counts, as_int(num_classes, "num_classes", 1))
        self._rule = rule  # checked above (_check_config)
        self.mode = cloud_mode  # checked by the properties' setters
        self.scale = cloud_scale
        self.prototype_shrinkage = prototype_shrinkage
        self.prototype_min_count = prototype_min_count
        self.imprint_step = imprint_step
        self.warmup_steps = warmup_steps  # set once (fixed_setting)
        self.sync = sync
        kwargs: Dict[str, Any] = dict(
            gamma=gamma,
            memory_per_sample=memory_per_sample,
            class_counts=class_counts,
            cloud=rule or "full",
            tail_threshold=tail_threshold,
            count_updates=count_steps if class_counts is None else None,
            center_rate=center_rate,
            unknown_variance=unknown_variance,
            max_age=angle_max_age,
        )
        if sync == "off":
            self.statistics: ClassStatistics = ClassStatistics(
                num_classes, embedding_size, **kwargs
            )
        else:
            batch = "pml_gathered" if sync == "pml_gathered" else BATCH_MODES[0]
            self.statistics = SyncedClassStatistics(
                num_classes,
                embedding_size,
                process_group=process_group,
                pad_to=pad_to,
                batch=batch,
                **kwargs,
            )
        self.statistics.memory_in_use = rule is not None
        if rule is not None and class_counts is not None and not class_counts.any():
            warn_user(ALL_ZERO_COUNTS)
        if rule == "full" and class_counts is not None:
            warn_full_without_pairs(class_counts)  # (the vanilla rule's say-so: the statistics)
        if rule is not None and class_counts is None and count_steps is None:
            warn_user(
                f"the feature cloud counts K_i online over all warmup_steps={warmup_steps} "
                "steps: correct only if the warm-up is exactly one epoch. Pass class_counts, or "
                f"count_steps=<steps per epoch> (count_steps={warmup_steps} when the warm-up is "
                "one epoch: no warning)."
            )
        if class_counts is not None and count_steps is not None:
            warn_user(
                f"count_steps={count_steps} has no effect: class_counts are given, so K_i are not "
                "counted online"
            )
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), device="cpu").item())  # also on meta
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("seed", torch.tensor(int(seed), dtype=torch.long))
        self._seed = int(seed)  # host copy for reset_parameters (the buffer may be on meta)
        self._count = 0  # host copy of ``step`` (control flow without a device sync)
        self._seen = self._stamp()  # the ``step`` tensor that ``_count`` was read from
        self._imprinted = -1  # the step imprint() last ran at

    # ------------------------------------------------------------------ state
    # (plain getters, read in the compiled step: a fixed_setting's path getter has a try)
    @property
    def num_classes(self) -> int:
        return self.statistics.num_classes

    @num_classes.setter
    def num_classes(self, value: Any) -> None:
        raise FixedSettingError("num_classes", _SIZES, _NEW_SIZE, value, type(self).__name__)

    @property
    def embedding_size(self) -> int:
        return self.statistics.embedding_size

    @embedding_size.setter
    def embedding_size(self, value: Any) -> None:
        raise FixedSettingError("embedding_size", _SIZES, _NEW_SIZE, value, type(self).__name__)

    @property
    def steps_taken(self) -> int:
        """Training steps taken: the ``step`` buffer (one host read)."""
        return int(self.step)

    def train(self, mode: bool = True) -> FeatureCloud:
        """Also marks the host copy of ``step`` for a re-read at the next training step (one
        host sync then): writes that bump no version counter (``dist.broadcast``, DDP's buffer
        broadcast, ``.data``) are seen at the next ``train()``. Entering eval mode, a cloud-less
        head reads whether its statistics hold centers (loaded or copied: its prototypes)."""
        self._count = -1
        if not mode and self.rule is None:
            self.statistics.has_centers = bool(self.statistics.center_initialized.any())
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FeatureCloud:
        """Also says when the state was just moved to shared host memory (``share_memory()``,
        the Hogwild recipe of ``torch.multiprocessing``): the cloud is not Hogwild-safe."""
        shared = _host_shared(self.step)
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        if not shared and _host_shared(self.step) and self.rule is not None:
            warn_user(
                "the feature cloud's step and class statistics were moved to shared memory "
                "(share_memory(), Hogwild training with torch.multiprocessing): they are not "
                "Hogwild-safe. Each process counts the warm-up on its own host copy of the step "
                "(the cloud may never start), an angle memory laid out by online counting in a "
                "worker stays private, and the workers' statistic updates race. Train the head "
                "in one process, or with DDP (one head a process; README: Distributed)"
            )
        return self

    def _stamp(self) -> Tuple[int, int]:
        """Which ``step`` tensor, at which in-place version: a write from outside (an EMA copy,
        ``copy_``, ``load_state_dict``, ``.to(device)``) changes it."""
        step = self.step
        try:
            return id(step), step._version
        except RuntimeError:  # an inference-mode tensor has no version counter
            return id(step), -1

    def _host_count(self) -> int:
        """The host copy of ``step`` that the training step branches on, re-read (one host
        sync) when the buffer was written in place or replaced (``copy_``, an EMA update,
        ``load_state_dict``, ``.to``), after ``train()`` and after compiled steps, which count
        on the device only (:meth:`_advance_compiled`)."""
        stamp = self._stamp()
        if self._count < 0 or stamp != getattr(self, "_seen", None) or stamp[1] < 0:
            self._count, self._seen = int(self.step), stamp
        return self._count

    @property
    def active(self) -> bool:
        """Whether the next training step draws a feature cloud (rule set, warm-up over)."""
        return self.rule is not None and self._host_count() >= self.warmup_steps

    mode = checked_attribute(
        "mode", _check_mode, "Where the cloud enters the logits (``cloud_mode``); settable."
    )
    scale = checked_attribute(
        "scale", _check_cloud_scale, "The cloud's std factor (``cloud_scale``); settable."
    )
    # Every constructor keyword is an attribute of the same name (the repr's names): a setting
    # a run may change is forwarded to where it lives and checked as the constructor checks
    # it (a cloud-scale schedule's ``cloud.cloud_scale = s``); one that cannot change refuses
    # an assignment, saying why (a plain attribute of that name changed nothing).
    rule = property(
        lambda self: self._rule,
        lambda self, rule: self.set_rule(rule),
        doc='The cloud rule (``"full"``, ``"vanilla"``) or ``None``; settable (:meth:`set_rule`).',
    )
    cloud_mode: str = forwarded("mode", doc="``cloud_mode`` (the attribute ``mode``); settable.")
    cloud_scale: float = forwarded(
        "scale", doc="``cloud_scale`` (the attribute ``scale``); settable."
    )
    # checked by the statistics (their own attributes, under the same names)
    gamma: float = forwarded("statistics.gamma", doc="The center learning rate; settable, checked.")
    tail_threshold: int = forwarded("statistics.tail_threshold", doc="``T``; settable, checked.")
    center_rate: str = forwarded(
        "statistics.center_rate", doc="The center rule; settable, checked."
    )
    unknown_variance: str = forwarded(
        "statistics.unknown_variance", doc="An unknown variance's rule; settable, checked."
    )
    angle_max_age = forwarded("statistics.max_age", _check_max_age)
    imprint_step = checked_attribute(
        "imprint_step",
        _check_imprint_step,
        "The training step that imprints the prototypes (``None``: never); settable, checked.",
    )
    warmup_steps: int = fixed_setting("warmup_steps", _WHY_FIXED["warmup_steps"])
    sync: str = fixed_setting("sync", _WHY_FIXED["sync"], how=_SYNCHRONIZE)
    memory_per_sample: int = fixed_setting(
        "memory_per_sample", _WHY_FIXED["memory_per_sample"], "statistics.memory_per_sample"
    )
    count_steps: Optional[int] = fixed_setting(
        "count_steps", _WHY_FIXED["count_steps"], "statistics.count_updates"
    )
    class_counts: Tensor = fixed_setting(
        "class_counts",
        _WHY_FIXED["class_counts"],
        "statistics.class_counts",
        copy=True,  # a copy: an in-place op on it cannot reach K_i before the refusal
        how="lay the memory out anew with statistics.allocate_memory(class_counts) (the stored "
        "angles are dropped)",
    )
    process_group = fixed_setting(
        "process_group",
        "the statistics' collectives use it",
        "statistics.process_group",
        how=_SYNCHRONIZE,
    )
    pad_to: Optional[int] = fixed_setting(
        "pad_to", "the statistics' gathers use it", "statistics.pad_to", how=_SYNCHRONIZE
    )
    prototype_min_count = checked_attribute(
        "prototype_min_count",
        _check_min_count,
        "Classes with fewer ``K_i`` keep their weights as prototypes; settable.",
    )

    @property
    def prototype_shrinkage(self) -> Optional[float]:
        """``kappa`` of the inference prototypes (``None``: the weights); settable, e.g. to score
        the weights for a comparison, and checked as the constructor's keyword (a ``nan`` or
        negative ``kappa`` gave non-finite or nonsense logits)."""
        return self._prototype_shrinkage

    @prototype_shrinkage.setter
    def prototype_shrinkage(self, value: Optional[float]) -> None:
        kappa = None if value is None else as_float(value, "prototype_shrinkage", minimum=0.0)
        if kappa is None and getattr(self, "imprint_step", None) is not None:
            raise ValueError(
                f"prototype_shrinkage=None: imprint_step={self.imprint_step} imprints the "
                "prototypes, which need a kappa"
            )
        self._prototype_shrinkage = kappa

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """Whole-module pickles of earlier releases held ``prototype_shrinkage`` and the
        checked settings as plain attributes, or lack them (:data:`_PICKLE_PREDATES`)."""
        names = (
            "prototype_shrinkage",
            "mode",
            "scale",
            "prototype_min_count",
            "rule",
            "imprint_step",
            "warmup_steps",
            "sync",
        )
        state = migrate_checked(state, names, _PICKLE_PREDATES)
        super().__setstate__(state)  # type: ignore[no-untyped-call]

    @property
    def noise_stream(self) -> int:
        """This process's noise stream: the rank under synchronised statistics, else 0."""
        return self.statistics.noise_stream

    @property
    def collective(self) -> bool:
        """Whether a training step communicates (every rank must then make it every step)."""
        return self.rule is not None and self.statistics.collective

    def set_rule(self, rule: Optional[str]) -> None:
        """Change the cloud rule (``"full"``, ``"vanilla"``) or turn the cloud off (``None``).

        Turning a cloud on past the warm-up needs ``K_i``: a head built with ``cloud=None`` and
        no ``class_counts`` never counted them, so lay them out first
        (``statistics.allocate_memory(class_counts)``)."""
        FC.check_cloud_rule(rule, name="rule")
        if rule is None and self.imprint_step is not None:  # as the constructor refuses
            raise ValueError(
                f"cloud=None (rule=None) with imprint_step={self.imprint_step}: the imprint needs "
                "a cloud rule (its class centers); set imprint_step = None first"
            )
        stats = self.statistics
        steps = self._host_count()
        if (
            rule is not None
            and stats.counting
            and (steps > 0 or self.warmup_steps == 0)
            and not bool(stats.class_counts.any())
        ):
            why = (
                f"counting them online now would miss the {steps} steps already taken"
                if steps > 0
                else "warmup_steps=0 leaves no warm-up to count them in"
            )
            raise ValueError(
                f"cloud={rule!r}: the class sizes K_i (LEAP Eq. 5) are unknown (a head without "
                f"a cloud does not count them) and {why}. Call "
                "statistics.allocate_memory(class_counts) first (the head's `.statistics`), or "
                "build the head with class_counts."
            )
        before = self._rule
        self._rule = rule
        self.statistics.memory_in_use = rule is not None
        if rule is not None:
            self.statistics._rule = rule  # (refused on the statistics alone: their owner's)
        if rule == "vanilla" and before != "vanilla":  # T may leave no head class (a warning)
            self.statistics.warn_vanilla_without_both_groups()

    def reseed(self, seed: int) -> None:
        """Set the seed of the noise stream."""
        self._seed = _check_seed(seed)
        self.seed.fill_(self._seed)

    def reset_parameters(self) -> None:
        """Back to the state of construction (step 0, the last seed set, fresh statistics:
        :meth:`ClassStatistics.reset_parameters`); for a module built on the ``meta`` device
        and moved by ``to_empty``."""
        self.step.zero_()
        # a pickle of an earlier release has no host copy: its buffer holds the seed
        self.seed.fill_(self._seed if hasattr(self, "_seed") else int(self.seed))
        self.statistics.reset_parameters()
        self._count, self._seen, self._imprinted = 0, self._stamp(), -1

    # ------------------------------------------------------------------ training step
    def check(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        validate: bool = True,
        train: bool = True,
        problem: Optional[Exception] = None,
        settings: Sequence[Tuple[str, Any]] = (),
    ) -> Tensor:
        """Every check of a batch, before any state changes; returns the labels as int64.

        When the training step's update is collective, all ranks agree on the verdict first
        (one all-reduce: every rank raises together, see
        :meth:`~feature_cloud.sync.SyncedClassStatistics.agree`), and on the settings
        (:meth:`agreed_settings` and the caller's ``settings``, e.g. the head's margin: a
        setting assigned on some ranks only raises on every rank, naming it). ``problem``: an
        error the caller found in its other arguments, agreed on like a bad batch (then raised).

        The first training step after the cloud was turned off (``rule=None``) on a rank agrees
        once more (then no more, a cloud-off step has no collective): where the other ranks
        kept the cloud on, every rank raises there, instead of the others waiting in the
        agreement until the process group's timeout. Not with ``validate=False`` and ``pad_to``
        (no agreement runs): the others then wait in the gather until that timeout."""
        if train:
            problem = problem or inference_problem(embeddings, self.step)
        collective = train and self.collective
        farewell = (
            train
            and not collective
            and getattr(self, "_agreed_last", False)
            and self.statistics.collective
        )
        if collective or farewell:
            checked = self.statistics.agree(
                embeddings,
                labels,
                validate,
                problem,
                tuple(settings) + self.agreed_settings(),
                keep=not farewell,  # a cloud-off step updates no statistics
            )
        elif problem is not None:
            raise problem
        else:
            checked = check_batch(
                embeddings, labels, self.embedding_size, self.num_classes, validate
            )
        if train and collective != getattr(self, "_agreed_last", False):
            self._agreed_last = collective  # written on a change only (compiled steps: no guard)
        return trainable_labels(checked) if train else checked

    def agreed_settings(self) -> Tuple[Tuple[str, Any], ...]:
        """The settings every rank of a synchronised cloud must share, compared at every
        training step's batch agreement (:func:`~feature_cloud.sync.agree_on_batch`): what
        changes the gathered statistics (``gamma``, ``center_rate``, ``tail_threshold``,
        ``unknown_variance``, ``angle_max_age``, the rule, the memory layout: ``class_counts``
        as :attr:`ClassStatistics.layout_setting
        <feature_cloud.statistics.ClassStatistics.layout_setting>` gives them, ``memory_per_sample``,
        ``count_steps``; ``pad_to``), the cloud drawn from them (``cloud_mode``, ``cloud_scale``,
        ``warmup_steps``) and, while an imprint is ahead, the imprint (``imprint_step``,
        ``prototype_shrinkage``, ``prototype_min_count``). Host values only (no device read)."""
        stats = self.statistics
        ahead = self.imprint_step is not None and not self.imprint_behind
        return (
            ("cloud", self.rule),  # (the statistics' rule: the same, set_rule keeps them so)
            ("cloud_mode", self.mode),
            ("cloud_scale", self.scale),
            ("gamma", stats.gamma),
            ("center_rate", stats.center_rate),
            ("tail_threshold", stats.tail_threshold),
            ("unknown_variance", stats.unknown_variance),
            ("angle_max_age", stats.max_age),
            ("class_counts", stats.layout_setting),  # K_i counted on each rank's shard?
            ("memory_per_sample", stats.memory_per_sample),
            ("count_steps", stats.count_updates),
            ("pad_to", getattr(stats, "pad_to", None)),
            ("warmup_steps", self.warmup_steps),
            ("imprint_step", self.imprint_step),
            ("prototype_shrinkage", self.prototype_shrinkage if ahead else None),
            ("prototype_min_count", self.prototype_min_count if ahead else None),
        )

    def counts_batch(self, features: Tensor, *, count_empty: bool = False) -> bool:
        """Whether a training :meth:`advance` on ``features`` counts a step: a non-empty batch,
        or any batch when the update is collective or ``count_empty``. A shape test (no sync);
        the heads imprint only on such batches, so a skipped empty batch at ``imprint_step``
        cannot imprint the step twice (once on it, once on the next batch)."""
        return features.shape[0] > 0 or count_empty or self.collective

    def advance(
        self, features: Tensor, labels: Tensor, *, train: bool = True, count_empty: bool = False
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """One training step of the cloud: fold the batch into the statistics, count the step.

        Call after :meth:`check` (with the same tensors: a collective check is reused by the
        update): this mutates state. Does nothing unless ``train``; an empty batch is skipped (not counted) unless the
        update is collective or ``count_empty`` (the caller's step is collective). Returns ``(std, key)``: the per-sample cloud
        standard deviation ``(B,)`` (LEAP Eq. 6 / 9 via the sample's class) and the noise key of
        this step (:func:`feature_cloud.noise.noise_key`) when the cloud is active, else
        ``(None, None)``.
        """
        std = key = None
        if not train or not self.counts_batch(features, count_empty=count_empty):
            return std, key
        if is_compiling():
            return self._advance_compiled(features, labels)
        self._refuse_recomputation()
        if self.rule is not None:
            active = self.active
            stats = self.statistics
            if stats.counting and (active or self._count_window_over()):
                stats.allocate_memory()  # online K_i: lay out the memory once (one host sync)
            stats.update(features, labels, validate=False)
            if active:
                std = stats.cloud_variance()[labels.clamp_min(0)].sqrt()
                if self.scale != 1.0:
                    std = std * self.scale
                key = self.noise_key()
        count = self._host_count()
        self.step.add_(1)
        self._count, self._seen = count + 1, self._stamp()
        return std, key

    def _count_window_over(self) -> bool:
        """Online ``K_i`` over ``count_steps`` shorter than the warm-up: whether the window is
        over, so that the memory is laid out now and the rest of the warm-up fills it (it was
        laid out when the cloud started: an empty memory, no variance, for another epoch). A
        host read of the statistics' update count once the step count reaches the window (the
        update count lags it only where batches held ignored rows alone)."""
        window = self.statistics.count_updates
        return (
            window is not None
            and self._host_count() >= window
            and int(self.statistics.num_updates) >= window
        )

    def _refuse_recomputation(self) -> None:
        """A training step run while autograd runs a backward is activation checkpointing
        recomputing the head (``torch.utils.checkpoint`` around it): the step is stateful (the
        statistics, the step count and the cloud drawn from it), so a recomputation would take
        a second step and draw another cloud than the loss it differentiates. Refused before
        any state changes, with the way out."""
        if not is_compiling() and in_backward():
            raise RuntimeError(
                "the feature cloud's training step ran during backward: activation "
                "checkpointing (torch.utils.checkpoint) recomputes the head, whose step updates "
                "the class statistics and draws the cloud, so it would count twice and draw "
                "another cloud. Checkpoint the backbone only: loss = head(checkpoint(backbone, "
                "x, use_reentrant=False), labels)"
            )

    def _advance_compiled(
        self, features: Tensor, labels: Tensor
    ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """:meth:`advance` inside ``torch.compile``: no branch on the host step count, which the
        compiler would specialise (one graph per step, a failure past its recompile limit under
        ``fullgraph=True``). The cloud is drawn every step and its std multiplied by
        ``step >= warmup_steps`` (a tensor): zero during the warm-up, the same cloud after it.
        The host copy is marked stale and re-read by the next eager step."""
        std = key = None
        if self.rule is not None:
            stats = self.statistics
            if stats.counting:
                raise RuntimeError(
                    "torch.compile of a feature cloud that counts K_i online: the angle memory is "
                    "laid out by the first step after the count (a host-side step). Pass "
                    "class_counts, or run count_steps + 1 steps (else warmup_steps + 1) eagerly "
                    "and compile afterwards."
                )
            stats.update(features, labels, validate=False)
            on = (self.step >= self.warmup_steps).float() * self.scale
            std = stats.cloud_variance()[labels.clamp_min(0)].sqrt() * on
            key = self.noise_key()
        self.step.add_(1)
        self._count = -1
        return std, key

    def draw_order(self, features: Tensor, std: Optional[Tensor]) -> Optional[Tensor]:
        """The rows of a batch in the order this step's cloud (``std`` from :meth:`advance`) is
        drawn in, where that is not the batch's own: a batch that PML's
        ``DistributedLossWrapper`` gathered is drawn in rank order, one cloud for the global
        batch, the same on every rank (:meth:`ClassStatistics.draw_order`). ``None`` otherwise."""
        if std is None:
            return None
        return self.statistics.draw_order(features.shape[0], features.device)

    def noise_key(self, stream: Optional[int] = None, purpose: int = N.PURPOSE_CLOUD) -> Tensor:
        """Key of the current step's draw (before :meth:`advance` counts it)."""
        return N.noise_key(
            self.seed, self.step, self.noise_stream if stream is None else stream, purpose
        )

    @staticmethod
    def row_noise(key: Tensor, std: Tensor) -> Tensor:
        """One standard normal per sample row ``(B,)`` from ``key`` (the target-only cloud modes;
        the paper mode draws ``B x C`` with :func:`feature_cloud.fused.cloud_angles`)."""
        return N.counter_normal(key, std.shape[0], 0, 1, 1)[0].to(std.dtype)

    # ------------------------------------------------------------------ inference
    def prototypes(
        self, weight: Tensor, sub_centers: int = 1, class_start: int = 0, *, inference: bool = False
    ) -> Tensor:
        """The class prototypes of inference logits: in eval mode ``weight`` shrunk towards the
        class centers (:func:`~feature_cloud.functional.center_prototypes`, ``kappa =
        prototype_shrinkage``); ``weight`` itself in train mode (training accuracy monitors the
        classifier being trained, as the fused loss's top-1 does) or with
        ``prototype_shrinkage=None``; and without a cloud (``rule=None``) unless centers were
        trained or loaded (a cloud-less inference head loading a trained LEAP head scores as
        that head did; without centers the blend would only renormalise ``weight``).
        ``weight`` holds the classes ``class_start .. class_start + rows / sub_centers - 1``
        (a shard of a model-parallel head; default: all classes). ``inference=True``: the eval-mode
        prototypes whatever the mode (an export)."""
        if not self.blends_prototypes(inference=inference):
            return weight
        return self._prototypes(weight, sub_centers, class_start)

    def blends_prototypes(self, *, inference: bool = False) -> bool:
        """Whether :meth:`prototypes` blends the weight with the centers (``False``: it returns
        ``weight`` itself); a Python bool of settings, no tensor read (a graph capture traces
        it as a constant)."""
        if self.prototype_shrinkage is None or (self.training and not inference):
            return False
        return self.rule is not None or bool(getattr(self.statistics, "has_centers", False))

    def _prototypes(self, weight: Tensor, sub_centers: int, class_start: int) -> Tensor:
        kappa = self.prototype_shrinkage
        assert kappa is not None, "prototypes() and imprint() need prototype_shrinkage"
        stats = self.statistics
        rows = slice(class_start, class_start + weight.shape[0] // sub_centers)
        return FC.center_prototypes(
            weight,
            stats.centers[rows],
            stats.center_initialized[rows],
            stats.class_counts[rows],
            float(kappa),
            sub_centers,
            min_count=self.prototype_min_count,
        )

    def watch(self, output: Tensor) -> Tensor:
        """A head's training output, marked so that :meth:`imprint` can refuse to overwrite
        the weight while a graph that saved it waits for its backward (gradient accumulation
        over ``imprint_step``: torch raised in that backward, after the step had been taken).
        The output itself while no imprint is ahead (and under a graph capture)."""
        if (
            self.imprint_step is None
            or self.rule is None
            or not self.training
            or is_compiling()
            or output.grad_fn is None
            or self._host_count() > self.imprint_step
        ):
            return output
        token = _Backward()
        output.grad_fn.register_hook(token)  # the node holds the token: freed with the graph
        alive = [r for r in _UNDONE.get(self, []) if (t := r()) is not None and not t.done]
        _UNDONE[self] = alive + [weakref.ref(token)]
        return output

    def _refuse_undone_backward(self) -> None:
        if any((t := r()) is not None and not t.done for r in _UNDONE.get(self, [])):
            kept = any(
                getattr(sys, name, None) is not None
                for name in ("last_exc", "last_value", "last_traceback")
            )
            raise RuntimeError(
                f"imprint_step={self.imprint_step}: a training forward's loss still waits for "
                "its backward (gradient accumulation over the imprint step?), and the imprint "
                "would overwrite the weight that backward needs; imprint_step counts forwards "
                "(micro-batches): choose one that starts an accumulation cycle, call backward "
                "first, or del a loss you will not backpropagate. A step interrupted between "
                "its forward and backward (Ctrl-C, an error) leaves its loss in the traceback "
                "an interactive interpreter keeps (python -i, IPython, Jupyter)"
                + (", as this one keeps one" if kept else "")
                + ": to continue training, drop it (import gc, sys; sys.last_exc = "
                "sys.last_value = sys.last_traceback = None; gc.collect())"
            )

    def imprint(
        self, weight: Tensor, sub_centers: int = 1, class_start: int = 0, *, train: bool = True
    ) -> bool:
        """Weight imprinting (``imprint_step``): before training step ``imprint_step`` (the
        heads call this ahead of :meth:`advance`) replace ``weight`` in place by its inference
        prototypes (:meth:`prototypes`), each row keeping its norm; ``weight`` holds the classes
        from ``class_start`` on (a shard). Once: later steps, eval mode and ``train=False`` do
        nothing. No communication: replicas stay identical where the statistics are (the heads
        refuse ``sync="off"`` with ``imprint_step`` in a process group of several ranks).
        Returns whether it imprinted."""
        if not train or self.rule is None or self.imprint_step is None or self.imprint_behind:
            return False
        self._refuse_recomputation()
        if is_compiling():  # no host count: a select on the device step
            with torch.no_grad():
                new = self._prototypes(weight, sub_centers, class_start).float()
                new = new * weight.float().norm(dim=1, keepdim=True)
                # materialized: the backward reads the imprinted weight as written, where
                # torch 2.14's inductor recomputed it from the statistics that advance()
                # then updates in place (a weight gradient 15-19 % off at imprint_step)
                weight.copy_(
                    materialized(torch.where(self.step == self.imprint_step, new, weight.float()))
                )
            return False
        count = self._host_count()
        if count > self.imprint_step:  # behind us (a resumed run): known without a host read
            self._imprinted = self.imprint_step
        if count != self.imprint_step or self._imprinted == count:  # skipped (empty) steps
            return False
        self._refuse_undone_backward()
        _UNDONE.pop(self, None)
        self._imprinted = count
        with torch.no_grad():
            new = self._prototypes(weight, sub_centers, class_start).float()
            weight.copy_(new * weight.float().norm(dim=1, keepdim=True))
        return True

    @property
    def imprint_behind(self) -> bool:
        """Whether ``imprint_step`` is known to be behind without a host read: an eager
        training step of this process imprinted at it or ran past it (compiled steps count on
        the device only, so while compiling nothing else tells)."""
        return self.imprint_step is not None and self._imprinted == self.imprint_step

    def imprint_ahead(self) -> bool:
        """Whether an eager step may still imprint (``imprint_step`` set, a cloud rule, not
        imprinted, not past it), from the host copy of the step the training step branches on
        (no host read but :meth:`_host_count`'s); ``False`` while compiling (the checks that
        need it run eager only)."""
        if self.imprint_step is None or self.rule is None or self.imprint_behind:
            return False
        return not is_compiling() and self._host_count() <= self.imprint_step

    # ------------------------------------------------------------------ distributed
    def synchronize(
        self,
        process_group: ProcessGroup = None,
        *,
        pad_to: Optional[int] = None,
        batch: str = "local",
    ) -> None:
        """Replace the statistics by :class:`SyncedClassStatistics` holding the same state."""
        self.statistics = SyncedClassStatistics.from_statistics(
            self.statistics, process_group=process_group, pad_to=pad_to, batch=batch
        )
        self._sync = "pml_gathered" if batch == "pml_gathered" else "auto"

    # ------------------------------------------------------------------ checkpoints
    def check_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Raise if the cloud state under ``prefix`` in ``state_dict`` does not fit this cloud
        (another class count or embedding size); changes nothing. Loading checks it before any
        buffer of the cloud loads, so a refused checkpoint leaves step, seed and statistics as
        they were."""
        for name in ("step", "seed"):  # 0-d integer counters (a damaged or edited checkpoint)
            value = state_dict.get(prefix + name)
            if not isinstance(value, Tensor) or value.is_meta:
                continue
            if (
                value.dim() != 0
                or value.dtype.is_floating_point
                or value.dtype.is_complex  # torch's load dropped the imaginary part
                or value.dtype == torch.bool
            ):
                raise ValueError(
                    f"checkpoint's {prefix}{name} is a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)}, expected a 0-d integer tensor: the checkpoint is "
                    "damaged or was edited"
                )
            if name == "step" and int(value) < 0:  # one read, at load
                raise ValueError(
                    f"checkpoint's {prefix}step is {int(value)}: the checkpoint is damaged or "
                    "was edited"
                )
        self.statistics.check_state_dict(state_dict, prefix + "statistics.")

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        self.check_state_dict(state_dict, prefix)  # torch loads step / seed before statistics
        self._warn_cloudless_source(state_dict, prefix)
        keep_loaded_dtypes(self, state_dict, prefix)  # int64 step / seed, assign=True too
        super()._load_from_state_dict(state_dict, prefix, *args)
        if prefix + "step" in state_dict:
            self._count = -1  # re-read when next needed
            self._imprinted = -1  # an earlier state imprints again at its imprint_step

    def _warn_cloudless_source(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """A state of a head trained without a cloud (``cloud=None``: its step counted, no
        center) loaded into a cloud with a warm-up: the step skips the warm-up, so the cloud
        would start at once on empty statistics, with the source's seed. Said once, at load."""
        step = state_dict.get(prefix + "step")
        init = state_dict.get(prefix + "statistics.center_initialized")
        if (
            self.rule is None
            or self.warmup_steps == 0
            or not isinstance(step, Tensor)
            or not isinstance(init, Tensor)
            or step.is_meta
            or init.is_meta
        ):
            return
        steps = int(step)
        if steps >= self.warmup_steps and not bool(init.any()):
            warn_user(
                f"the loaded state has taken {steps} steps (past this cloud's warmup_steps="
                f"{self.warmup_steps}) but holds no class center: a head trained without a "
                "cloud (cloud=None)? Its step, seed and empty statistics are loaded, so the cloud "
                "starts at once, without a warm-up. To start LEAP from such a head, load its "
                "class weights only (e.g. head.load_state_dict({'weight': state['weight']}, "
                "strict=False); PML's LEAPLoss: {'W': ...})"
            )

    def extra_repr(self) -> str:
        """The constructor's keywords (those that are not their defaults, for the optional
        ones) and the steps taken."""
        stats = self.statistics
        parts = [
            f"rule={self.rule!r}",
            f"cloud_mode={self.mode!r}",
            f"cloud_scale={self.scale}",
            f"prototype_shrinkage={self.prototype_shrinkage}",
        ]
        if self.prototype_min_count != DEFAULT_PROTOTYPE_MIN_COUNT:
            parts.append(f"prototype_min_count={self.prototype_min_count}")
        if self.imprint_step is not None:
            parts.append(f"imprint_step={self.imprint_step}")
        parts.append(f"warmup_steps={self.warmup_steps}")
        if stats.count_updates is not None:
            parts.append(f"count_steps={stats.count_updates}")
        if stats.max_age is not None:
            parts.append(f"angle_max_age={stats.max_age}")
        seed = "?" if self.seed.is_meta else int(self.seed)
        parts += [f"seed={seed}", f"sync={self.sync!r}", f"steps_taken={self._host_count()}"]
        return ", ".join(parts)


def check_cloud_fits(cloud: FeatureCloud, num_classes: int, embedding_size: int) -> None:
    """``ValueError`` unless ``cloud`` is for ``num_classes`` classes of ``embedding_size``
    (a ready cloud given to a head, at construction or assigned)."""
    if (cloud.num_classes, cloud.embedding_size) != (num_classes, embedding_size):
        raise ValueError(
            f"the FeatureCloud is for num_classes={cloud.num_classes}, embedding_size="
            f"{cloud.embedding_size}; the head has {num_classes}, {embedding_size}"
        )


class WithFeatureCloud:
    """Read-only views of ``self.feature_cloud`` shared by every head and adapter holding one."""

    feature_cloud: FeatureCloud
    #: what the messages call an instance (``head.gamma = ...``; PML's loss: ``loss.``), beside
    #: its class's name, as :class:`FixedSettingError` names the class assigned on
    _called = "head"

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """A whole-module pickle of 0.1.0 (statistics and a generator on the head, no
        ``FeatureCloud``) is refused by name: it loaded, then failed on ``step``."""
        if "feature_cloud" not in state.get("_modules", {}):
            raise RuntimeError(
                f"a whole-module pickle of a feature-cloud 0.1.0 {type(self).__name__}: this "
                "release cannot rebuild it. Load it with 0.1.0, save its state_dict(), and load "
                "that into a new head (state dicts are the upgrade path; docs/core-head.md, Checkpoints)"
            )
        state = migrate_checked(state, ("num_classes", "embedding_size", "validate"))
        super().__setstate__(state)  # type: ignore[misc]

    def __setattr__(self, name: str, value: Any) -> None:
        """``nn.Module`` registers a Module (or Parameter) value before a class property sees
        it: ``head.statistics = ClassStatistics(...)`` and ``head.cloud = FeatureCloud(...)``
        registered a new child beside the cloud (the head kept the old one's settings, its
        state dict gained keys), ``head.scale = nn.Identity()`` a child named ``scale``. Such a
        value of a setting goes to its property (checked or refused there), and a new
        ``feature_cloud`` is checked as the constructor checks ``cloud=`` (one type test per
        assignment). A Parameter (or a tensor that requires grad) is refused for a setting:
        ``head.scale = nn.Parameter(torch.tensor(30.))`` was read as the number 30.0 and never
        learned. Torch 2.2 / 2.3's dynamo cannot trace this method: an assignment on a head
        inside compiled code breaks the graph there (``fullgraph=True`` fails). The heads and
        PML's ``LEAPLoss`` assign nothing on themselves in a step (the loss keeps its per-call
        batch in a holder); ``FTLModel``'s split step sets the head's ``validate`` and
        ``training`` (a break on those torch versions; torch >= 2.4 traces it)."""
        if isinstance(value, (nn.Module, nn.Parameter)):
            if name in _properties(type(self)):
                if isinstance(value, nn.Parameter):
                    raise _not_learned(self, name, value)
                object.__setattr__(self, name, value)  # the property: checked or refused
                return
            if name == "feature_cloud":
                value = self._checked_feature_cloud(value)
        elif isinstance(value, Tensor) and value.requires_grad and name in _properties(type(self)):
            raise _not_learned(self, name, value)
        elif name == "feature_cloud" and "feature_cloud" in self.__dict__.get("_modules", ()):
            raise TypeError(
                f"feature_cloud must be a FeatureCloud, got {value!r}; to train without the "
                f"cloud set {self._called}.cloud = None"
            )
        super().__setattr__(name, value)

    def _checked_feature_cloud(self, cloud: Any) -> FeatureCloud:
        """A new ``feature_cloud`` replacing the head's: a :class:`FeatureCloud` of the head's
        ``num_classes`` and ``embedding_size``, as its constructor's ``cloud=`` takes
        (``head.feature_cloud = FeatureCloud(9, D)`` on a 6-class head trained a 9-class
        cloud); the constructor's own assignment as it is. (The constructor's refusal of
        ``imprint_step`` with ``sync="off"`` in a process group stays the constructor's: a head
        fed the global batch on every rank, a reference, may take such a cloud.)"""
        if "feature_cloud" not in self.__dict__.get("_modules", ()):
            return cast(FeatureCloud, cloud)
        if not isinstance(cloud, FeatureCloud):
            raise TypeError(f"feature_cloud must be a FeatureCloud, got a {type(cloud).__name__}")
        old = self.feature_cloud
        check_cloud_fits(cloud, old.num_classes, old.embedding_size)
        return cloud

    # The head's own sizes, fixed (they size the class weight and the cloud's statistics:
    # ``head.num_classes = 9`` was taken, the repr said 9 with 6 weight rows), and ``validate``,
    # checked as a flag (``validate = "no"`` kept validating).
    num_classes: int = fixed_setting(
        "num_classes", "it sizes the class weight and the statistics", how=_NEW_SIZE
    )
    embedding_size: int = fixed_setting(
        "embedding_size", "it sizes the class weight and the statistics", how=_NEW_SIZE
    )
    validate = checked_attribute(
        "validate",
        lambda _, value: as_bool(value, "validate"),
        "Whether each step checks label range and finiteness (one host sync); settable.",
    )

    @property
    def cloud(self) -> Optional[str]:
        """The cloud rule (``"full"``, ``"vanilla"``) or ``None``; settable (``None`` turns the
        cloud off: plain CosFace/ArcFace, no statistics update)."""
        return self.feature_cloud.rule

    @cloud.setter
    def cloud(self, rule: Optional[str]) -> None:
        if isinstance(rule, nn.Module):  # the constructor's cloud= takes one; this a rule
            v, holder = self._called, type(self).__name__
            raise TypeError(
                f"{v}.cloud takes a rule ('full', 'vanilla' or None), got a "
                f"{type(rule).__name__}: to replace the {holder}'s FeatureCloud, assign "
                f"{v}.feature_cloud = FeatureCloud(...) (of the {holder}'s num_classes and "
                f"embedding_size), or pass cloud=FeatureCloud(...) to {holder}(...)"
            )
        self.feature_cloud.set_rule(FC.check_cloud_rule(rule, name="cloud"))

    # The cloud's settings under their keywords' names, forwarded to the FeatureCloud (one
    # mechanism, :func:`forwarded`): assignable ones are checked there as its constructor
    # checks them (a cloud-scale schedule's ``head.cloud_scale = s``), fixed ones refuse
    # (:func:`fixed_setting`, saying why); a plain attribute of such a name changed nothing.
    # ``process_group`` / ``pad_to``: :class:`WithStatisticsGroup` (a sharded head holds its own).
    cloud_mode: str = forwarded(
        "feature_cloud.cloud_mode", doc="The cloud's ``cloud_mode``; settable."
    )
    cloud_scale: float = forwarded(
        "feature_cloud.cloud_scale", doc="The cloud's ``cloud_scale``; settable (a schedule)."
    )
    prototype_shrinkage: Optional[float] = forwarded(
        "feature_cloud.prototype_shrinkage",
        doc="``kappa`` of the inference prototypes (the cloud's); settable: ``None`` scores the "
        "weights until set back.",
    )
    prototype_min_count: int = forwarded(
        "feature_cloud.prototype_min_count",
        doc="Classes with fewer ``K_i`` keep their weights as inference prototypes; settable.",
    )
    gamma: float = forwarded("feature_cloud.gamma", doc="The center learning rate; settable.")
    tail_threshold: int = forwarded("feature_cloud.tail_threshold", doc="``T``; settable.")
    center_rate: str = forwarded("feature_cloud.center_rate", doc="The center rule; settable.")
    unknown_variance: str = forwarded(
        "feature_cloud.unknown_variance", doc="The cloud of classes without angles; settable."
    )
    angle_max_age: Optional[int] = forwarded(
        "feature_cloud.angle_max_age", doc="Angle age limit; settable."
    )
    imprint_step: Optional[int] = forwarded(
        "feature_cloud.imprint_step", doc="The imprint's training step (``None``); settable."
    )
    warmup_steps: int = forwarded("feature_cloud.warmup_steps", doc="Steps without cloud; fixed.")
    memory_per_sample: int = forwarded("feature_cloud.memory_per_sample", doc="``P``; fixed.")
    count_steps: Optional[int] = forwarded(
        "feature_cloud.count_steps", doc="The online count window; fixed."
    )
    class_counts: Tensor = forwarded("feature_cloud.class_counts", doc="``K_i`` (a buffer); fixed.")
    sync: str = forwarded("feature_cloud.sync", doc="The statistics' synchronisation; fixed.")

    @property
    def statistics(self) -> ClassStatistics:
        """The class statistics of the cloud (buffers)."""
        return self.feature_cloud.statistics

    @statistics.setter
    def statistics(self, value: Any) -> None:
        v, holder = self._called, type(self).__name__
        raise AttributeError(
            f"statistics are the feature cloud's ({v}.feature_cloud.statistics) and are not "
            f"replaced on the {holder}: set their settings on it ({v}.gamma = ..., "
            f"{v}.cloud = ...), load a state with load_state_dict, or give it another "
            f"cloud ({v}.feature_cloud = FeatureCloud(...), or cloud=FeatureCloud(...) to "
            f"{holder}(...))"
        )

    @property
    def step(self) -> int:
        """Training steps taken (the ``feature_cloud.step`` buffer)."""
        return self.feature_cloud.steps_taken

    @property
    def seed(self) -> int:
        """Seed of the cloud's noise stream (the ``feature_cloud.seed`` buffer; the ranks'
        streams differ by rank). ``seed=None`` draws it from the global RNG: the same on every
        rank only if that RNG is, or once DDP broadcasts the buffers; pass ``seed`` for runs
        that resume exactly on every rank (the sharded head broadcasts rank 0's)."""
        return int(self.feature_cloud.seed)

    @seed.setter
    def seed(self, seed: int) -> None:
        self.feature_cloud.reseed(seed)

    @property
    def cloud_active(self) -> bool:
        """Whether the next training step draws a feature cloud."""
        return self.feature_cloud.active


class WithStatisticsGroup:
    """``process_group`` and ``pad_to`` of the statistics' synchronisation, read from the cloud
    and refused on assignment as the cloud refuses them (the dense head, PML's ``LEAPLoss``;
    the sharded head holds its own): ``head.pad_to = 8`` was a plain attribute that changed
    nothing."""

    process_group = forwarded(
        "feature_cloud.process_group", doc="The statistics' process group; fixed."
    )
    pad_to: Optional[int] = forwarded(
        "feature_cloud.pad_to", doc="The statistics' per-rank padding; fixed."
    )


def _not_learned(owner: Any, name: str, value: Tensor) -> TypeError:
    """The refusal of a Parameter (or a tensor that requires grad) assigned to a setting."""
    kind = "a Parameter" if isinstance(value, nn.Parameter) else "a tensor that requires grad"
    return TypeError(
        f"{type(owner).__name__}.{name} is a setting, a plain number: {kind} assigned to it "
        "would be read as its value and not learned (it is not one of the module's "
        "parameters); assign a plain number instead"
    )


#: the names of the class properties of each holder class (:meth:`WithFeatureCloud.__setattr__`):
#: those of this package's classes (not a parametrization's ``weight``)
_PROPERTIES: weakref.WeakKeyDictionary[type, FrozenSet[str]] = weakref.WeakKeyDictionary()


def _properties(cls: type) -> FrozenSet[str]:
    names = _PROPERTIES.get(cls)
    if names is None:
        names = frozenset(
            name
            for klass in cls.__mro__
            if klass.__module__.split(".")[0] in ("feature_cloud", "integrations")
            for name, value in vars(klass).items()
            if isinstance(value, property)
        )
        _PROPERTIES[cls] = names
    return names


#: the settings 0.1.0 trained and scored with, as this release's keywords: the paper's LEAP
#: (:data:`PAPER_LEAP`; its other keywords did not exist then)
_V0_1_0_SETTINGS: Dict[str, Any] = {
    name: PAPER_LEAP[name]
    for name in (
        "cloud_mode",
        "cloud_scale",
        "prototype_shrinkage",
        "center_rate",
        "unknown_variance",
    )
}


def _warn_off_v0_1_0_settings(cloud: FeatureCloud) -> None:
    """A 0.1.0 checkpoint loaded into a cloud off 0.1.0's settings: its eval logits and cloud
    change, silently (a cloud-less head: only the eval logits' ``prototype_shrinkage``)."""
    stats = cloud.statistics
    own = {
        "cloud_mode": cloud.mode,
        "cloud_scale": cloud.scale,
        "prototype_shrinkage": cloud.prototype_shrinkage,
        "center_rate": stats.center_rate,
        "unknown_variance": stats.unknown_variance,
    }
    names = list(_V0_1_0_SETTINGS) if cloud.rule is not None else ["prototype_shrinkage"]
    off = [name for name in names if own[name] != _V0_1_0_SETTINGS[name]]
    if off:
        noise = (
            " (the cloud's noise still differs: it continues from (seed, step), not from "
            "0.1.0's generator state)"
        )
        warn_user(
            "a 0.1.0 checkpoint (an _extra_state dict) loaded into a head with "
            + ", ".join(f"{n}={own[n]!r}" for n in off)
            + "; 0.1.0 ran "
            + ", ".join(f"{n}={_V0_1_0_SETTINGS[n]!r}" for n in off)
            + (": its eval logits and cloud change" if cloud.rule else ": its eval logits change")
            + ". Build the head with those to continue it as 0.1.0 did"
            + (noise if cloud.rule else "")
        )


def migrate_state_dict(
    state_dict: Dict[str, Any],
    old_prefix: str,
    new_prefix: str,
    cloud: Optional[FeatureCloud] = None,
) -> Dict[str, Any]:
    """Rewrite a 0.1.0 checkpoint's cloud entries in place into the tensor-only layout.

    0.1.0 kept ``{old_prefix}statistics.*`` and a dict ``{old_prefix}_extra_state`` (step, seed,
    generator state). They become ``{new_prefix}statistics.*``, ``{new_prefix}step`` and
    ``{new_prefix}seed``; the generator state is dropped (the noise is counter-based now: a
    resumed run continues from ``(seed, step)``). With the ``cloud`` that will load them, a
    warning names its settings that differ from 0.1.0's (:data:`_V0_1_0_SETTINGS`). Returns the
    0.1.0 extra-state dict (empty when the entries are already in the new layout) for callers
    with more to migrate.
    """
    extra = state_dict.pop(old_prefix + "_extra_state", None)
    if extra is None:
        return {}
    if not isinstance(extra, dict) or "step" not in extra:
        raise ValueError(f"unrecognised extra state under {old_prefix + '_extra_state'!r}")
    if cloud is not None:
        _warn_off_v0_1_0_settings(cloud)
    if old_prefix != new_prefix:
        for key in [k for k in state_dict if k.startswith(old_prefix + "statistics.")]:
            state_dict[new_prefix + key[len(old_prefix) :]] = state_dict.pop(key)
    state_dict.setdefault(new_prefix + "step", torch.tensor(int(extra["step"]), dtype=torch.long))
    state_dict.setdefault(new_prefix + "seed", torch.tensor(int(extra["seed"]), dtype=torch.long))
    return extra


def migrated_for_checking(
    state_dict: Dict[str, Any],
    old_prefix: str,
    new_prefix: str,
    migrate: Callable[[Dict[str, Any], str, str], Any] = migrate_state_dict,
) -> Dict[str, Any]:
    """What a ``check_state_dict`` checks: ``state_dict`` itself, or, where it holds a 0.1.0
    layout (``{old_prefix}_extra_state``), a copy of it migrated by ``migrate(copy, old_prefix,
    new_prefix)`` (:func:`migrate_state_dict` or a holder's own), leaving the caller's dict
    as it was."""
    if old_prefix + "_extra_state" not in state_dict:
        return state_dict
    state_dict = dict(state_dict)
    migrate(state_dict, old_prefix, new_prefix)
    return state_dict


def _host_shared(tensor: Tensor) -> bool:
    """Whether ``tensor`` lies in shared host memory (``share_memory_()``); not meta tensors,
    nor CUDA ones (for which ``is_shared`` is always true)."""
    return tensor.device.type == "cpu" and bool(tensor.is_shared())  # type: ignore[no-untyped-call]
