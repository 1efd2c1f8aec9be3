"""Class statistics of LEAP (Sec. 3.3): EMA centers, per-class angle memory, cloud variances.

A thin stateful Module: every formula lives in :mod:`feature_cloud.functional`.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import functional as FC
from ._buffers import KeepBufferDtypes, normal_tensors, resized_buffer
from ._compat import disable_compile, is_compiling, materialized
from ._validation import (
    ClassCounts,
    any_nonfinite,
    as_float,
    as_int,
    check_batch,
    check_class_counts,
    checked_attribute,
    fixed_setting,
    migrate_checked,
    raise_for_damage,
    refuse_other_shape,
    value_range,
    warn_user,
)

__all__ = ["ClassStatistics", "CENTER_RATES", "DEFAULT_CENTER_RATE"]

_MEMORY_BUFFERS = ("memory", "memory_stamp", "memory_owner")
#: The buffers whose values a loaded checkpoint must hold within range (``_check_state_values``).
_VALUE_CHECKED = (
    "class_counts",
    "num_updates",
    "center_updates",
    "angle_sum",
    "angle_sqsum",
    "memory_capacity",
    "memory_fill",
    "memory_pointer",
    "centers",
    "memory",
    "memory_stamp",
)
#: the largest angle the memory holds (``acos``'s top, pi, in float32 rounds up a little)
_ANGLE_TOP = math.pi + 1e-5
#: The statistics' buffers with one entry a class.
_PER_CLASS_BUFFERS = (
    "center_initialized",
    "class_counts",
    "memory_offsets",
    "memory_capacity",
    "memory_pointer",
    "memory_fill",
    "angle_sum",
    "angle_sqsum",
    "center_updates",
)
#: What ``class_counts`` lays out (:meth:`ClassStatistics.allocate_memory`).
_LAYOUT_BUFFERS = (
    "class_counts",
    "memory_capacity",
    "memory_offsets",
    "memory_pointer",
    "memory_fill",
    "angle_sum",
    "angle_sqsum",
    *_MEMORY_BUFFERS,
)

#: Center update rules: ``"adaptive"`` rate max(gamma, 1/n), ``"paper"`` constant gamma.
CENTER_RATES = ("adaptive", "paper")
#: the default center rule: ``"adaptive"`` (not the paper's constant ``gamma``: a tail class's
#: center starts at one batch mean and moves only when the class appears; README, "Real faces")
DEFAULT_CENTER_RATE = "adaptive"


def check_gamma(gamma: Any) -> float:
    """The center learning rate ``gamma``, in ``(0, 1]``."""
    return as_float(gamma, "gamma", minimum=0.0, maximum=1.0, min_inclusive=False)


def check_center_rate(rule: Any) -> str:
    """One of :data:`CENTER_RATES`."""
    if rule not in CENTER_RATES:
        raise ValueError(f"center_rate must be one of {CENTER_RATES}, got {rule!r}")
    return str(rule)


def check_unknown_variance(rule: Any) -> str:
    """One of :data:`~feature_cloud.functional.UNKNOWN_VARIANCE`."""
    if rule not in FC.UNKNOWN_VARIANCE:
        raise ValueError(f"unknown_variance must be one of {FC.UNKNOWN_VARIANCE}, got {rule!r}")
    return str(rule)


#: why the settings that cannot change after construction cannot (:func:`fixed_setting`)
_WHY_FIXED = {
    "rule": "the statistics follow their cloud's rule",
    "memory_per_sample": "it sizes the angle memory, K_i * P slots per class (LEAP Eq. 5)",
    "count_updates": "K_i are counted online over the first count_updates updates",
    "size": "it sizes every buffer of the statistics",
}
_SET_RULE_ON_THE_OWNER = (
    "set the rule on what holds them instead: head.cloud = ... (PML's LEAPLoss: "
    "loss.cloud = ...) or FeatureCloud.rule = ... (set_rule), which keeps the cloud and its "
    "statistics in step"
)
#: how to change a size (FixedSettingError's ``how``; the cloud's and heads' sizes too)
_NEW_SIZE = (
    "build a new {holder} with {name}={value!r} (a state_dict of another size does not load "
    "into it)"
)


class ClassStatistics(KeepBufferDtypes):
    r"""EMA class centers (LEAP Eq. 4), angle memory (Eq. 3, 5) and cloud variances (Eq. 6, 9).

    Args:
        num_classes: ``C``.
        embedding_size: ``D``.
        gamma: center learning rate (paper Sec. 4.1: 0.1), the weight of the current batch mean in
            :func:`~feature_cloud.functional.ema_centers` (the printed Eq. 4 swaps the weights).
        memory_per_sample: ``P`` of Eq. 5; class ``i`` keeps its last ``K_i * P`` angles.
        class_counts: ``K_i`` per class, from the dataset (a tensor, list or NumPy array, or a
            mapping class -> count: ``collections.Counter(dataset.targets)``). If ``None`` they
            are counted online while :meth:`counting` is true (the head counts during its
            warm-up, which must then be exactly one epoch, or over ``count_updates``) and the
            memory is laid out by :meth:`allocate_memory`.
        cloud: ``"full"`` (Eq. 9) or ``"vanilla"`` (Eq. 6, head classes have ``K_i > T``).
        tail_threshold: ``T`` of the vanilla rule.
        count_updates: with online counting, count ``K_i`` over the first ``count_updates``
            updates only (one epoch of steps); ``None`` counts every update until
            :meth:`allocate_memory` (correct only if that is exactly one epoch).
        center_rate: ``"adaptive"`` (default) uses rate :math:`\max(\gamma, 1/n)` at a class's
            ``n``-th appearance (:func:`~feature_cloud.functional.center_rate`): unbiased
            running mean while a class is young; ``"paper"`` the constant :math:`\gamma`.
        unknown_variance: cloud of classes with fewer than two stored angles, one of
            :data:`~feature_cloud.functional.UNKNOWN_VARIANCE` (default ``"tail_prior"``).
        max_age: if set, only the angles written in the last ``max_age`` updates count (the
            update that writes an angle is the first of them; stale angles of rarely seen
            classes, computed under an older network); ``None`` keeps every angle until
            overwritten (the paper's ring memory).

    The memory is one flat float32 buffer with per-class ``memory_offsets``, ``memory_capacity``,
    ring ``memory_pointer`` and ``memory_fill``; float64 running sums give the per-class moments
    in ``O(C)`` without reading the memory. Every update is a handful of vectorised gather/scatter
    ops over the batch (no Python loop, no host sync). Statistics are float32 whatever the autocast
    dtype of the features, and :meth:`update` ignores labels ``< 0``.
    """

    centers: Tensor
    center_initialized: Tensor
    class_counts: Tensor
    memory: Tensor
    memory_offsets: Tensor
    memory_capacity: Tensor
    memory_pointer: Tensor
    memory_fill: Tensor
    angle_sum: Tensor
    angle_sqsum: Tensor
    num_updates: Tensor
    center_updates: Tensor
    memory_stamp: Tensor
    memory_owner: Tensor
    _rule: str  # the rule (its owner's set_rule writes it; assigned here alone, refused)

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        gamma: float = 0.1,
        memory_per_sample: int = 1,
        class_counts: Optional[ClassCounts] = None,
        cloud: str = "full",
        tail_threshold: int = 20,
        count_updates: Optional[int] = None,
        center_rate: str = DEFAULT_CENTER_RATE,
        unknown_variance: str = FC.DEFAULT_UNKNOWN_VARIANCE,
        max_age: Optional[int] = None,
    ) -> None:
        super().__init__()
        num_classes = as_int(num_classes, "num_classes", 1)
        embedding_size = as_int(embedding_size, "embedding_size", 1)
        gamma = check_gamma(gamma)
        memory_per_sample = as_int(memory_per_sample, "memory_per_sample (P)", 1)
        tail_threshold = as_int(tail_threshold, "tail_threshold", 0)
        FC.check_cloud_rule(cloud, optional=False)
        check_center_rate(center_rate)
        check_unknown_variance(unknown_variance)
        if count_updates is not None:
            count_updates = as_int(count_updates, "count_updates", 1)
        if max_age is not None:
            max_age = as_int(max_age, "max_age", 1)
        self.count_updates = None if count_updates is None else int(count_updates)
        self.center_rate = center_rate
        self.unknown_variance = unknown_variance
        self.max_age = None if max_age is None else int(max_age)
        self.num_classes = int(num_classes)
        self.embedding_size = int(embedding_size)
        self.gamma = float(gamma)
        self.memory_per_sample = int(memory_per_sample)
        self.rule = cloud
        #: whether a cloud reads the angle memory (its owner's rule is set; see FeatureCloud)
        self.memory_in_use = True
        self.tail_threshold = int(tail_threshold)

        C = self.num_classes
        self.register_buffer("centers", torch.zeros(C, self.embedding_size, dtype=torch.float32))
        self.register_buffer("center_initialized", torch.zeros(C, dtype=torch.bool))
        self.register_buffer("class_counts", torch.zeros(C, dtype=torch.long))
        self.register_buffer("memory_offsets", torch.zeros(C, dtype=torch.long))
        self.register_buffer("memory_capacity", torch.ones(C, dtype=torch.long))
        self.register_buffer("memory_pointer", torch.zeros(C, dtype=torch.long))
        self.register_buffer("memory_fill", torch.zeros(C, dtype=torch.long))
        self.register_buffer("angle_sum", torch.zeros(C, dtype=torch.float64))
        self.register_buffer("angle_sqsum", torch.zeros(C, dtype=torch.float64))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("center_updates", torch.zeros(C, dtype=torch.long))
        self.register_buffer("memory", torch.zeros(0, dtype=torch.float32))
        self.register_buffer("memory_stamp", torch.zeros(0, dtype=torch.long))
        self.register_buffer("memory_owner", torch.zeros(0, dtype=torch.long))
        #: Whether centers were trained (an update) or loaded: a host flag, no device read.
        self.has_centers = False
        #: the constructor's ``class_counts`` on the host (:meth:`reset_parameters` lays the
        #: memory out from them again)
        self._initial_counts: Optional[Tensor] = None
        self._layout_text = _COUNTING
        #: the laid-out ``class_counts`` on the host (set with :attr:`layout_setting`): what a
        #: load compares a checkpoint's with (the buffer holds garbage after ``to_empty``)
        self._layout_counts: Optional[Tensor] = None
        if class_counts is not None:
            counts = check_class_counts(class_counts, C)
            self._building = True  # the owner says whether a cloud reads it (FeatureCloud)
            self.allocate_memory(counts)
            self._building = False
            self._initial_counts = counts.detach().to("cpu", dtype=torch.long, copy=True)

    # the settings a cloud forwards are checked here too (assigned on the statistics directly, a
    # bad value reached the next step); whole-module pickles of earlier releases held them as
    # plain attributes (:meth:`__setstate__`)
    _CHECKED: Tuple[str, ...] = (
        "gamma",
        "center_rate",
        "unknown_variance",
        "tail_threshold",
        "max_age",
    )
    gamma = checked_attribute(
        "gamma", lambda _, v: check_gamma(v), "The center learning rate; settable, checked."
    )
    center_rate = checked_attribute(
        "center_rate", lambda _, v: check_center_rate(v), "The center rule; settable, checked."
    )
    unknown_variance = checked_attribute(
        "unknown_variance",
        lambda _, v: check_unknown_variance(v),
        "The variance of a class with too few angles; settable, checked.",
    )
    tail_threshold: int = checked_attribute(
        "tail_threshold",
        lambda owner, v: owner._checked_tail_threshold(v),
        "Classes with at most this many images are tail classes; settable, checked (under "
        "the vanilla rule a threshold that leaves no head or no tail class warns).",
    )

    def _checked_tail_threshold(self, value: Any) -> int:
        threshold = as_int(value, "tail_threshold", 0)
        if "_tail_threshold" in vars(self):  # assigned (the constructor's: at the layout)
            self.warn_vanilla_without_both_groups(threshold)
        return threshold

    def warn_vanilla_without_both_groups(self, threshold: Optional[int] = None) -> None:
        """Under the vanilla rule with the memory laid out, warn when ``threshold`` (default
        ``tail_threshold``) leaves no head or no tail class (every cloud is zero), as the
        constructor warns when it lays the counts out: an assignment of ``tail_threshold``,
        or of the rule, said nothing (one host read of ``K_i``, at the assignment)."""
        if (
            self.rule != "vanilla"
            or not getattr(self, "memory_in_use", True)  # the owner's cloud is off
            or not self.memory_allocated
            or self.class_counts.is_meta
        ):
            return
        threshold = self.tail_threshold if threshold is None else threshold
        _warn_vanilla_without_both_groups(self.class_counts.cpu(), threshold)

    max_age = checked_attribute(
        "max_age",
        lambda _, v: None if v is None else as_int(v, "max_age", 1),
        "Angles older than this many updates are left out (``None``: never); settable, checked.",
    )
    #: the constructor's keyword ``cloud`` (the repr's name) reads the attribute ``rule``; set it
    #: on the owner, which keeps the cloud and its statistics in step (its set_rule writes
    #: ``_rule``): assigned here alone it split the head's state (the head reported ``'full'``
    #: and trained ``'vanilla'``)
    cloud: str = fixed_setting(
        "cloud", _WHY_FIXED["rule"], path="_rule", how=_SET_RULE_ON_THE_OWNER
    )
    rule: str = fixed_setting("rule", _WHY_FIXED["rule"], how=_SET_RULE_ON_THE_OWNER)
    # the others size the buffers, or K_i are being counted with them: assigned, they were
    # taken without a word (memory_per_sample read 3 with the memory laid out for 1)
    memory_per_sample: int = fixed_setting("memory_per_sample", _WHY_FIXED["memory_per_sample"])
    count_updates: Optional[int] = fixed_setting("count_updates", _WHY_FIXED["count_updates"])
    num_classes: int = fixed_setting("num_classes", _WHY_FIXED["size"], how=_NEW_SIZE)
    embedding_size: int = fixed_setting("embedding_size", _WHY_FIXED["size"], how=_NEW_SIZE)
    #: attributes that were plain in earlier releases (whole-module pickles hold them so)
    _FIXED = ("rule", "memory_per_sample", "count_updates", "num_classes", "embedding_size")

    def __setstate__(self, state: Dict[str, Any]) -> None:
        """A whole-module pickle of an earlier release: its checked and fixed settings as plain
        attributes."""
        state = migrate_checked(state, self._CHECKED + self._FIXED)
        super().__setstate__(state)  # type: ignore[no-untyped-call]

    @property
    def memory_slots(self) -> int:
        """Angle slots of the memory (``K_i * P`` summed; 0 before it is laid out)."""
        return max(self.memory.numel() - 1, 0)

    # ------------------------------------------------------------------ layout
    @property
    def memory_allocated(self) -> bool:
        """Whether the angle memory exists (``class_counts`` known)."""
        return self.memory.numel() > 0

    @property
    def counting(self) -> bool:
        """True while ``class_counts`` are being counted online (memory not yet allocated)."""
        return not self.memory_allocated

    @property
    def layout_setting(self) -> str:
        """``class_counts`` (the memory layout) as the ranks of a synchronised cloud compare
        them (:meth:`FeatureCloud.agreed_settings
        <feature_cloud.cloud.FeatureCloud.agreed_settings>`): their first values, their sum and a
        digest of all of them, or that they are still counted online. A host value, set where the
        memory is laid out (:meth:`allocate_memory`, the end of online counting, a load,
        :meth:`reset_parameters`): no device read in a step. Counts written into the buffer
        in place (``class_counts.copy_``) are not seen: lay them out with
        :meth:`allocate_memory`. After :func:`~feature_cloud.prepare_dcp_load`, the first read
        once ``class_counts`` was written (``dcp.load`` in place) reads the buffers again."""
        text = self.__dict__.get("_layout_text")
        if text is None:  # a whole-module pickle of an earlier release: read once
            text = self._refresh_layout_text()
        elif self.__dict__.get("_layout_mark") is not None:  # prepare_dcp_load: a load to come
            text = _layout_after_load(self)
        return text

    def _expect_load_in_place(self) -> None:
        """Mark :attr:`layout_setting` for a re-read once ``class_counts`` is written (the load
        in place that :func:`~feature_cloud.prepare_dcp_load` prepares)."""
        self._layout_mark = _version_stamp(self.class_counts)

    def _refresh_layout_text(self) -> str:
        """:attr:`layout_setting` from the buffers (one host read; at a load, not in a step)."""
        self.__dict__.pop("_layout_mark", None)
        if not self.memory_allocated:
            text, self._layout_counts = _COUNTING, None
        elif self.class_counts.is_meta:
            text = "unknown (on the meta device)"
        else:
            text, self._layout_counts = _counts_summary(self.class_counts)
        self._layout_text = text
        return text

    #: True in subclasses whose :meth:`update` is a collective call (every process must make it
    #: on every training step, even with an empty batch); the head then never skips the update.
    collective: bool = False

    def draw_order(self, rows: int, device: torch.device) -> Optional[Tensor]:
        """Rows of a batch in the order its cloud is drawn in, if not the batch's (a subclass
        that receives gathered batches); ``None`` here."""
        return None

    @property
    def noise_stream(self) -> int:
        """Index of this process's cloud-noise stream: 0 here; a process-group subclass returns
        the rank, so that ranks draw independent clouds (see :mod:`feature_cloud.distributed`)."""
        return 0

    def allocate_memory(self, class_counts: Optional[ClassCounts] = None) -> None:
        """Lay out the flat angle memory, ``K_i * P`` slots per class (LEAP Eq. 5).

        With ``class_counts=None`` the online counts are used. This reads sizes on the host (one
        sync), so it runs once, outside the steady training step. Existing angles are dropped.
        """
        device = self.centers.device
        if class_counts is None:
            counts = self.class_counts.detach().clone()
        else:
            counts = check_class_counts(class_counts, self.num_classes)
        counts = counts.to(dtype=torch.long)
        if self.rule == "vanilla":
            _warn_vanilla_without_both_groups(counts, self.tail_threshold)
        elif self.memory_in_use and not getattr(self, "_building", False):
            warn_full_without_pairs(counts)
        # sized from the counts where they are (a module built on "meta" gets host counts)
        total = int((counts * self.memory_per_sample).clamp_min(1).sum())
        text, host = _counts_summary(counts)  # as the ranks compare it (layout_setting)
        # the new buffers are normal tensors inside torch.inference_mode() too (after a load
        # there); the existing ones are written in place in the ambient mode (a module built
        # under inference_mode holds inference tensors, written only there)
        with normal_tensors():
            counts = counts.to(device)
            capacity, offsets, owner = _memory_layout(counts, self.memory_per_sample, total)
            # one extra trash slot at the end absorbs writes that must not land
            memory = torch.zeros(total + 1, dtype=torch.float32, device=device)
            # write time of each slot (-1: empty) and its class; the trash slot belongs to
            # class 0 and is never valid
            stamp = torch.full((total + 1,), -1, dtype=torch.long, device=device)
        self.class_counts.copy_(counts)
        self.memory_capacity.copy_(capacity)
        self.memory_offsets.copy_(offsets)
        self.memory_pointer.zero_()
        self.memory_fill.zero_()
        self.angle_sum.zero_()
        self.angle_sqsum.zero_()
        self.memory, self.memory_stamp, self.memory_owner = memory, stamp, owner
        self._layout_text = text
        self._layout_counts = host
        #: whether the layout's counts were given (the constructor, a call with counts) rather
        #: than counted online: a load of a checkpoint without K_i keeps given ones only
        self._layout_given = class_counts is not None

    # ------------------------------------------------------------------ update
    def agree(
        self,
        features: Tensor,
        labels: Tensor,
        validate: bool = True,
        problem: Optional[Exception] = None,
        settings: Sequence[Tuple[str, Any]] = (),
        *,
        keep: bool = True,
    ) -> Tensor:
        """Every check of an :meth:`update` batch, before any state changes; returns the labels
        as int64. ``problem``: an error the caller found in its other arguments, raised first.
        A process-group subclass makes all ranks agree on the verdict first, and on
        ``settings`` (see :meth:`feature_cloud.distributed.SyncedClassStatistics.agree`;
        ``keep``: whether an update follows); here both are unused."""
        if problem is not None:
            raise problem
        return check_batch(features, labels, self.embedding_size, self.num_classes, validate)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor, validate: bool = True) -> None:
        """Fold one batch into the centers, the counts (while counting) and the angle memory.

        Call only with training batches; labels ``< 0`` are skipped, and so are rows without a
        direction (all zero, or non-finite: an fp16 overflow that ``validate=False`` or
        ``torch.compile`` let through, whose step GradScaler skips), so one such batch cannot
        poison the centers and angles for good. ``features`` may be any float dtype; everything
        is computed and stored in float32.
        """
        labels = check_batch(features, labels, self.embedding_size, self.num_classes, validate)
        if features.shape[0] == 0:
            return
        self.has_centers = True
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.detach().float()
            # one row reduction for the mask and the angles' normalisation: a row's max-abs is
            # finite and > 0 exactly when the row is finite and not all zero (amax keeps NaN)
            top = x.abs().amax(dim=1, keepdim=True)
            usable = torch.isfinite(top) & (top > 0)  # a mask: no host sync
            x = torch.where(usable, x, torch.zeros_like(x))
            top = torch.where(usable, top, torch.zeros_like(top))  # the masked rows' max-abs
            usable = usable.squeeze(1)
            self._update(x, torch.where(usable, labels, torch.full_like(labels, -1)), top)

    def _update(self, features: Tensor, labels: Tensor, top: Optional[Tensor] = None) -> None:
        valid = labels >= 0
        y = labels.clamp_min(0)
        # Scatter targets: duplicate indices must carry identical values, so every ignored row
        # (label < 0) writes exactly what the first valid row writes ("donor"); with no valid
        # row at all every write is a no-op rewrite of the current values. Compiled, the
        # values go through a buffer of their own first (materialized): torch 2.2's inductor
        # computed them inside the scatter loop, where a repeated class read its own write
        # (a class seen twice in a batch counted two appearances, and its center moved twice)
        donor = torch.argmax(valid.to(torch.uint8))
        rows = torch.where(valid, torch.arange(labels.numel(), device=labels.device), donor)
        y_w = y[rows]
        staged = materialized if is_compiling() else _unchanged

        batch_mean, _ = FC.batch_class_means(features, labels, features_max=top)
        old_centers = self.centers[y]
        appearances = self.center_updates[y] + 1
        rate = FC.center_rate(self.gamma, appearances, adaptive=self.center_rate == "adaptive")
        new_centers = FC.ema_centers(old_centers, batch_mean, self.center_initialized[y], rate)
        new_centers = torch.where(valid.unsqueeze(1), new_centers, old_centers)
        self.centers.index_copy_(0, y_w, staged(new_centers[rows]))
        self.center_initialized.index_copy_(
            0, y_w, staged((self.center_initialized[y] | valid)[rows])
        )
        self.center_updates.index_copy_(
            0, y_w, staged(torch.where(valid, appearances, self.center_updates[y])[rows])
        )
        now = self.num_updates.clone()
        self.num_updates += valid.any().long()  # a batch of ignored rows changes nothing
        if self.counting:
            if self.count_updates is None:
                self.class_counts.index_add_(0, y, valid.long())
            else:  # count one epoch only: a tensor comparison, no host sync
                self.class_counts.index_add_(0, y, valid.long() * (now < self.count_updates))
            return

        angles = FC.angles_to_centers(features, new_centers, features_max=top)
        slots, keep, count = FC.ring_slots(
            labels,
            self.memory_offsets,
            self.memory_capacity,
            self.memory_pointer,
            trash=self.memory.numel() - 1,
        )
        old = self.memory[slots].double()
        new = angles.double()
        w = keep.double()
        self.angle_sum.index_add_(0, y, w * (new - old))
        self.angle_sqsum.index_add_(0, y, w * (new * new - old * old))
        self.memory.index_copy_(0, slots, staged(torch.where(keep, angles, old.to(angles.dtype))))
        self.memory[-1:].zero_()  # the trash slot; a view: no host-to-device copy
        self.memory_stamp.index_copy_(
            0, slots, staged(torch.where(keep, now.expand_as(slots), self.memory_stamp[slots]))
        )
        self.memory_stamp[-1:].fill_(-1)
        # per-class ring pointer and fill advance once per class present in the batch
        cap = self.memory_capacity[y]
        pointer = torch.where(valid, (self.memory_pointer[y] + count) % cap, self.memory_pointer[y])
        fill = torch.minimum(self.memory_fill[y] + count * valid, cap)
        self.memory_pointer.index_copy_(0, y_w, staged(pointer[rows]))
        self.memory_fill.index_copy_(0, y_w, staged(fill[rows]))

    # ------------------------------------------------------------------ read-out
    def angle_moments(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Per-class ``(mean, variance, has_stats)`` of the angle memory (float32).

        With ``max_age`` only the angles written in the last ``max_age`` updates count.
        """
        if self.max_age is None or not self.memory_allocated:
            return FC.angle_moments(self.angle_sum, self.angle_sqsum, self.memory_fill)
        valid = (self.memory_stamp >= 0) & (self.num_updates - self.memory_stamp <= self.max_age)
        return FC.masked_angle_moments(self.memory, self.memory_owner, valid, self.num_classes)

    def cloud_variance(self) -> Tensor:
        """Per-class cloud variance ``(C,)`` by the configured rule (LEAP Eq. 6 or Eq. 9)."""
        _, var, has_stats = self.angle_moments()
        prior = FC.unknown_variance_prior(
            self.unknown_variance, has_stats, self.memory_capacity, self.class_counts
        )
        return FC.cloud_variance(
            self.rule, var, has_stats, self.class_counts, self.tail_threshold, prior
        )

    def reset(self) -> None:
        """Forget centers and angles (keeps ``class_counts`` and the memory layout)."""
        for name in ("centers", "memory", "angle_sum", "angle_sqsum"):
            getattr(self, name).zero_()
        for name in ("memory_pointer", "memory_fill", "center_updates"):
            getattr(self, name).zero_()
        self.memory_stamp.fill_(-1)
        self.center_initialized.zero_()

    def reset_parameters(self) -> None:
        """Back to the state of construction: no centers, angles or online counts, the memory
        laid out from the constructor's ``class_counts`` (if any). The re-initialisation of a
        module built on the ``meta`` device and moved by ``to_empty`` (whose buffers hold
        whatever the memory held)."""
        if hasattr(self, "_initial_counts"):
            counts = self._initial_counts
        else:  # unpickled from an earlier release: the buffers hold its layout's counts
            counts = self.class_counts.detach().cpu().clone() if self.memory_allocated else None
        for name in ("centers", "angle_sum", "angle_sqsum", "class_counts", "memory_offsets"):
            getattr(self, name).zero_()
        for name in ("memory_pointer", "memory_fill", "num_updates", "center_updates"):
            getattr(self, name).zero_()
        self.center_initialized.zero_()
        self.memory_capacity.fill_(1)
        device = self.centers.device
        with normal_tensors():  # inside torch.inference_mode() too
            self.memory = torch.zeros(0, dtype=torch.float32, device=device)
            self.memory_stamp = torch.zeros(0, dtype=torch.long, device=device)
            self.memory_owner = torch.zeros(0, dtype=torch.long, device=device)
        self.has_centers = False
        self._layout_text = _COUNTING
        self._layout_counts = None
        if counts is not None:
            self.allocate_memory(counts)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"gamma={self.gamma}, memory_per_sample={self.memory_per_sample}, cloud={self.rule!r}, "
            f"tail_threshold={self.tail_threshold}, memory_slots={self.memory_slots}, "
            f"center_rate={self.center_rate!r}, unknown_variance={self.unknown_variance!r}, "
            f"count_updates={self.count_updates}, max_age={self.max_age}"
        )

    # ------------------------------------------------------------------ checkpoints
    def check_state_dict(self, state_dict: Dict[str, Any], prefix: str = "") -> None:
        """Raise if the statistics under ``prefix`` are for another class count or embedding
        size, or are not laid out consistently (an edited or damaged checkpoint: one entry a
        class, one angle memory whose length the capacities give); changes nothing."""
        refuse_other_shape(
            state_dict,
            prefix + "centers",
            self.centers,
            lambda c, d: (
                f"checkpoint statistics are for num_classes={c}, embedding_size={d}; "
                f"this module has num_classes={self.num_classes}, embedding_size={self.embedding_size}"
            ),
        )
        for name in _PER_CLASS_BUFFERS:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor) and tuple(value.shape) != (self.num_classes,):
                raise ValueError(
                    f"checkpoint's {prefix}{name} has shape {tuple(value.shape)}, expected "
                    f"({self.num_classes},) (one entry a class, num_classes={self.num_classes}): "
                    "the checkpoint is damaged or was edited"
                )
        self._check_state_values(state_dict, prefix)
        shapes = {
            name: tuple(state_dict[prefix + name].shape)
            for name in _MEMORY_BUFFERS
            if isinstance(state_dict.get(prefix + name), Tensor)
        }
        capacity = state_dict.get(prefix + "memory_capacity")
        want = None
        if isinstance(capacity, Tensor) and not capacity.is_meta and "memory" in shapes:
            total = int(capacity.sum())  # one read, at load
            want = (total + 1,) if total > 0 else None  # laid out: the slots and a trash slot
        if len(set(shapes.values())) > 1 or (
            want is not None and shapes.get("memory") not in (want, (0,))
        ):
            raise ValueError(
                f"checkpoint's angle memory is inconsistent: {shapes}"
                + ("" if want is None else f", memory_capacity gives {want}")
                + ": the checkpoint is damaged or was edited"
            )
        self._check_empty_memory(state_dict, prefix)
        self._check_memory_layout(state_dict, prefix)

    def _check_empty_memory(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """An empty angle memory (not laid out yet, or emptied) with stored angles said to be in
        it (fills, pointers, sums of angles): the next step lays the memory out afresh and drops
        that history without a word. Read once, at load."""
        memory = state_dict.get(prefix + "memory")
        if not isinstance(memory, Tensor) or memory.is_meta or memory.numel() > 0:
            return
        held = [
            prefix + name
            for name in ("memory_fill", "memory_pointer", "angle_sum", "angle_sqsum")
            if isinstance(t := state_dict.get(prefix + name), Tensor)
            and not t.is_meta
            and bool(t.any())
        ]
        if held:
            raise ValueError(
                f"checkpoint's {prefix}memory is empty (0 slots) but {', '.join(held)} say it "
                "holds angles: the next step would lay the memory out afresh and drop them. The "
                "checkpoint is damaged or was edited, or a loop lost the memory laid out at the "
                "end of online counting (torch.func.functional_call does not write a buffer "
                "that a step replaced back into the state it was given: see the README)"
            )

    def _check_state_values(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Values an edited or damaged checkpoint can hold and training cannot (read once, at
        load): negative or non-finite counts and sums of angles, a memory fill or pointer
        outside its class's capacity, non-finite centers."""
        complex_ = [
            prefix + n
            for n in self._buffers
            if isinstance(t := state_dict.get(prefix + n), Tensor) and t.dtype.is_complex
        ]
        if complex_:  # torch's load would drop the imaginary part without a word
            raise TypeError(
                f"checkpoint's {', '.join(complex_)} hold complex numbers: the checkpoint is "
                "damaged or was edited"
            )
        saved = {n: state_dict.get(prefix + n) for n in _VALUE_CHECKED}
        # a meta tensor (shapes only) has no values: the others are checked all the same (one
        # meta buffer skipped every check, and NaN centers loaded beside it)
        present = {n: t for n, t in saved.items() if isinstance(t, Tensor) and not t.is_meta}
        if not present:
            return
        checks: Dict[str, Tensor] = {}
        for name in ("class_counts", "num_updates", "center_updates", "angle_sum", "angle_sqsum"):
            if name in present:
                value = present[name].double()  # one entry a class; float8 has no compare
                floor = -1e-6 if present[name].is_floating_point() else 0  # a sum's rounding
                ok = torch.isfinite(value) & (value >= floor)
                checks[f"{name} below 0 or not finite"] = ~ok.all()
        cap = present.get("memory_capacity")
        for name, top in (("memory_fill", 0), ("memory_pointer", 1)):  # pointer < capacity
            if name in present and cap is not None:
                value = present[name].to(cap.device)
                limit = (cap - top).clamp_min(0)
                checks[f"{name} outside its class's memory capacity"] = (
                    (value < 0) | (value > limit)
                ).any()
        if "centers" in present:
            checks["non-finite centers"] = any_nonfinite(present["centers"])
        if cap is not None:  # allocate_memory lays out at least one slot a class
            checks["memory_capacity below 1"] = (cap < 1).any()
            for name, power in (("angle_sum", 1), ("angle_sqsum", 2)):  # angles lie in [0, pi]
                if name in present:
                    most = cap.double().to(present[name].device) * math.pi**power
                    checks[f"{name} above capacity x pi^{power}"] = (
                        present[name].double() > most * (1 + 1e-6) + 1e-3
                    ).any()
        memory = present.get("memory")
        if memory is not None and memory.numel() > 0:  # angles to the centers, in [0, pi]
            # (acos); one aminmax pass (no temporaries the memory's size): NaN compares false
            low, high = value_range(memory if memory.dtype != torch.bool else memory.long())
            inside = (low >= 0) & (high <= _ANGLE_TOP)
            checks["memory angles outside [0, pi] or not finite"] = ~inside
        stamp = present.get("memory_stamp")
        if stamp is not None:  # -1: empty; else the update that wrote it, before num_updates
            late = present.get("num_updates")
            outside = stamp < -1
            if late is not None:
                outside = outside | (stamp > late.to(stamp.device))
            checks["memory_stamp outside [-1, num_updates]"] = outside.any()
        raise_for_damage(checks, prefix.rstrip("."))

    def _check_memory_layout(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """A laid-out memory's index buffers as :meth:`allocate_memory` leaves them (an edited
        ``memory_offsets`` or ``memory_owner`` indexed outside the memory, or into another
        class's slots, at the next step): read once, at load."""
        capacity = state_dict.get(prefix + "memory_capacity")
        memory = state_dict.get(prefix + "memory")
        if (
            not isinstance(capacity, Tensor)
            or not isinstance(memory, Tensor)
            or capacity.is_meta
            or memory.numel() == 0
        ):
            return
        cap = capacity.detach().to("cpu", torch.long)
        expected = {
            "memory_offsets": torch.cumsum(cap, 0) - cap,
            "memory_owner": torch.cat(
                [torch.repeat_interleave(torch.arange(cap.numel()), cap), cap.new_zeros(1)]
            ),
        }
        bad = []
        for name, want in expected.items():
            saved = state_dict.get(prefix + name)
            if not isinstance(saved, Tensor) or saved.is_meta:
                continue
            if tuple(saved.shape) != tuple(want.shape) or not torch.equal(
                saved.detach().to("cpu", torch.long), want
            ):
                bad.append(name)
        if bad:
            raise ValueError(
                f"checkpoint's {' and '.join(prefix + n for n in bad)} do not lay out the memory "
                f"that {prefix}memory_capacity gives (offsets: the running sum of the "
                "capacities; owner: each slot's class): the checkpoint is damaged or was edited"
            )

    def _own_counts(self) -> Optional[Tensor]:
        """This module's laid-out ``class_counts`` on the host: the copy kept where they were
        laid out (after ``to_empty`` the buffer holds whatever the memory held), else (a
        whole-module pickle of an earlier release) the buffer's; ``None``: not known (meta).
        After :func:`~feature_cloud.prepare_dcp_load`, the copy is first read again from the
        buffers once ``dcp.load`` wrote them (as :attr:`layout_setting` reads them)."""
        if self.__dict__.get("_layout_mark") is not None:
            _layout_after_load(self)
        host = self.__dict__.get("_layout_counts")
        if host is not None:
            return host
        if self.class_counts.is_meta:
            return None
        return self.class_counts.detach().to("cpu", torch.long)

    def _counts_were_given(self) -> bool:
        """Whether the laid-out ``K_i`` were given (constructor, :meth:`allocate_memory` with
        counts) rather than counted online: a checkpoint that holds none (a head trained without
        a cloud) keeps given ones; a head that counted its own takes the checkpoint's counting
        state (its own state before the count ended: the counting starts again)."""
        given = self.__dict__.get("_layout_given")
        if given is None:  # a pickle of an earlier release: built with counts?
            return self.__dict__.get("_initial_counts") is not None
        return bool(given)

    def _keep_layout(self, state_dict: Dict[str, Any], prefix: str) -> None:
        """Load this module's ``class_counts`` and memory layout instead of the checkpoint's,
        with the memory emptied as :meth:`allocate_memory` leaves it. Built from the host copy
        of the laid-out counts (:meth:`_own_counts`), not from the buffers: after ``to_empty``
        they hold whatever the memory held (that garbage was kept as the layout), and on the
        ``meta`` device (``assign=True``) they hold no values."""
        counts = self._own_counts()
        if counts is None:
            raise ValueError(
                "the checkpoint holds no class sizes K_i (a head trained without a cloud) and "
                "this module's class_counts were built on the meta device, without values: "
                "build the head on a real device, or load and then call "
                "statistics.allocate_memory(class_counts)"
            )
        device = self.class_counts.device
        if device.type == "meta":  # assign=True takes these tensors: the checkpoint's device
            saved = state_dict.get(prefix + "class_counts")
            device = saved.device if isinstance(saved, Tensor) else torch.device("cpu")
        total = int((counts * self.memory_per_sample).clamp_min(1).sum())
        with normal_tensors():  # a load in inference_mode: normal tensors
            counts = counts.to(device, copy=True)
            capacity, offsets, owner = _memory_layout(counts, self.memory_per_sample, total)
            slots = (total + 1,)
            fresh = {
                "class_counts": counts,
                "memory_capacity": capacity,
                "memory_offsets": offsets,
                "memory_owner": owner,
                "memory_stamp": torch.full(slots, -1, dtype=torch.long, device=device),
                "memory": torch.zeros(slots, device=device),
            }
            for name in _LAYOUT_BUFFERS:
                if prefix + name not in state_dict:
                    continue
                own = getattr(self, name)
                value = fresh.get(name)
                if value is None:  # one entry a class, zero
                    value = torch.zeros(self.num_classes, device=device)
                state_dict[prefix + name] = value.to(own.dtype)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        self.check_state_dict(state_dict, prefix)
        # checkpoints written before these buffers existed: fill them from the layout
        if prefix + "memory" in state_dict and prefix + "memory_stamp" not in state_dict:
            mem = state_dict[prefix + "memory"]
            fill = state_dict.get(prefix + "memory_fill")
            cap = state_dict.get(prefix + "memory_capacity")
            stamp = torch.full(mem.shape, -1, dtype=torch.long)
            owner = torch.zeros(mem.shape, dtype=torch.long)
            if mem.numel() > 0 and fill is not None and cap is not None:
                owner[:-1] = torch.repeat_interleave(torch.arange(cap.numel()), cap.cpu())
                offs = torch.cumsum(cap.cpu(), 0) - cap.cpu()
                for c in range(cap.numel()):  # once, at load time
                    stamp[int(offs[c]) : int(offs[c]) + int(fill[c])] = 0
            state_dict[prefix + "memory_stamp"] = stamp
            state_dict[prefix + "memory_owner"] = owner
        if prefix + "centers" in state_dict and prefix + "num_updates" not in state_dict:
            state_dict[prefix + "num_updates"] = torch.zeros((), dtype=torch.long)
        init = state_dict.get(prefix + "center_initialized")
        if init is not None and prefix + "center_updates" not in state_dict:
            # settled centers continue at rate gamma
            state_dict[prefix + "center_updates"] = init.long() * math.ceil(1.0 / self.gamma)
        if isinstance(init, Tensor):
            self.has_centers = bool(init.any())  # one read, at load
        counts, mem = state_dict.get(prefix + "class_counts"), state_dict.get(prefix + "memory")
        if (
            self.memory_allocated
            and self._counts_were_given()  # counted online: the checkpoint's counting state loads
            and isinstance(counts, Tensor)
            and isinstance(mem, Tensor)
            and mem.numel() == 0
            and not bool(counts.any())
        ):  # a checkpoint that never knew K_i (trained with cloud=None): this module's
            self._keep_layout(state_dict, prefix)  # counts stay, with an empty memory
        elif (
            self.memory_allocated
            and isinstance(counts, Tensor)
            and isinstance(mem, Tensor)
            and mem.numel() > 0
            and not counts.is_meta
            and (own := self._own_counts()) is not None
            and bool(own.any())  # this module's are known (not still to come)
            and not torch.equal(counts.detach().to("cpu", torch.long), own)
        ):  # both know K_i and they differ (another dataset?): said once, at load
            changed = int((counts.detach().to("cpu", torch.long) != own).sum())
            warn_user(
                f"the checkpoint's class_counts differ from this module's for {changed} of "
                f"{self.num_classes} classes: the checkpoint's are loaded, with its angle memory "
                "laid out for them. Fine-tuning on other data? Call "
                "statistics.allocate_memory(class_counts) after loading to lay out yours."
            )
        capacity = state_dict.get(prefix + "memory_capacity")
        if (
            getattr(self, "memory_in_use", True)  # a cloud-less head never reads the memory
            and isinstance(counts, Tensor)
            and isinstance(capacity, Tensor)
            and isinstance(mem, Tensor)
            and mem.numel() > 0
            and not counts.is_meta
            and bool(counts.any())
            and not torch.equal(
                capacity.cpu().long(), (counts.cpu().long() * self.memory_per_sample).clamp_min(1)
            )
        ):  # laid out for another memory_per_sample P (a changed setting): said once, at load
            warn_user(
                f"the checkpoint's angle memory is laid out for another memory_per_sample than "
                f"this module's P = {self.memory_per_sample} (LEAP Eq. 5): its layout is "
                "loaded. statistics.allocate_memory() after loading lays out P slots a sample "
                "(the stored angles are dropped, the centers kept; fastreid's trainer does it "
                "itself for CLASS_COUNTS: dataset)."
            )
        # the memory's length depends on class_counts: take the checkpoint's layout
        for name in _MEMORY_BUFFERS:
            src = state_dict.get(prefix + name)
            own = getattr(self, name)
            if src is not None and src.shape != own.shape:  # own dtype: load_state_dict casts
                setattr(self, name, resized_buffer(src.shape, own))  # inference_mode too
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._refresh_layout_text()  # the loaded layout, as the ranks compare it (one read)


def _version_stamp(tensor: Tensor) -> Tuple[int, int]:
    """Which tensor, at which in-place version (-1: none, an inference-mode tensor)."""
    try:
        return id(tensor), tensor._version
    except RuntimeError:
        return id(tensor), -1


def _layout_after_load(stats: ClassStatistics) -> str:
    """:attr:`ClassStatistics.layout_setting` after :func:`~feature_cloud.prepare_dcp_load`:
    read again from the buffers (once) when ``class_counts`` were written or replaced since."""
    mark = stats.__dict__.get("_layout_mark")
    if mark is None or mark[1] < 0 or _version_stamp(stats.class_counts) != mark:
        return stats._refresh_layout_text()
    return str(stats.__dict__["_layout_text"])  # not loaded yet


# a host read of the buffers where they were loaded in place: eagerly, outside a compiled step
_layout_after_load = disable_compile(_layout_after_load, "class_counts' host summary after a load")

#: :attr:`ClassStatistics.layout_setting` while ``K_i`` are counted online (memory not laid out)
_COUNTING = "counted online (not laid out yet)"


def _counts_summary(counts: Tensor) -> Tuple[str, Tensor]:
    """``class_counts`` as :attr:`ClassStatistics.layout_setting` shows them: the first six,
    the sum and a digest of all (the same text in every process for the same counts); and a
    host copy of them (the layout's counts, which ``to_empty`` does not overwrite)."""
    values = counts.detach().to("cpu", torch.long, copy=True).contiguous()
    digest = hashlib.blake2b(values.numpy().astype("<i8").tobytes(), digest_size=6).hexdigest()
    first = ", ".join(map(str, values[:6].tolist())) + (", ..." if values.numel() > 6 else "")
    return f"[{first}] (sum {int(values.sum())}, digest {digest})", values


# host-side text (NumPy bytes, a hash): the end of online counting inside torch.compile
# (fullgraph=False) runs it eagerly, a graph break at the layout, as its host reads are
_counts_summary = disable_compile(_counts_summary, "class_counts' host summary (layout_setting)")


def _memory_layout(counts: Tensor, per_sample: int, total: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The layout :meth:`ClassStatistics.allocate_memory` gives ``counts`` (``total``: the sum
    of the capacities), on their device: each class's capacity ``K_i * P`` (at least 1), its
    offset in the flat memory, and each slot's class (the trash slot at the end: class 0)."""
    capacity = (counts * per_sample).clamp_min(1)
    offsets = torch.cumsum(capacity, 0) - capacity
    owner = torch.repeat_interleave(
        torch.arange(counts.numel(), device=counts.device), capacity, output_size=total
    )
    return capacity, offsets, torch.cat([owner, owner.new_zeros(1)])


def _unchanged(x: Tensor) -> Tensor:
    return x


def _warn_vanilla_without_both_groups(counts: Tensor, threshold: int) -> None:
    """The vanilla rule (LEAP Eq. 6) transfers the head classes' mean variance (``K_i > T``) to
    the tail (``K_i <= T``): without either group every cloud is zero. Said once, when the
    counts are laid out (all-zero placeholder counts, still to come, say nothing)."""
    seen = counts[counts > 0]
    if seen.numel() == 0:
        return
    head = int((seen > threshold).sum())
    smallest, largest = int(seen.min()), int(seen.max())
    if smallest == largest:  # one class size (re-ID: VIPeR's 2 images an identity): no T splits it
        full = (
            "cloud='full' is zero too (no class has two images to estimate a variance from)"
            if largest < 2
            else "cloud='full' only evens the angle variance out among these equally sized "
            "classes (nothing is transferred from a head)"
        )
        missing = "tail to transfer to" if head else "head to transfer from"
        advice = (
            ". LEAP transfers from classes with many images: train these identities as a tail "
            "together with a head set (a dataset with many images per class)"
            if not head
            else ""
        )
        warn_user(
            f"cloud='vanilla' with tail_threshold T={threshold}: all {seen.numel()} classes have "
            f"K_i = {largest}, so no T splits them into head and tail: the vanilla rule has no "
            f"{missing} and every cloud is zero; {full}{advice}"
        )
    elif head == 0 or head == seen.numel():
        missing = "head class (K_i > T)" if head == 0 else "tail class (K_i <= T)"
        warn_user(
            f"cloud='vanilla' with tail_threshold T={threshold}: no {missing} among the "
            f"{seen.numel()} classes (K_i {smallest}..{largest}), so every cloud "
            "is zero; choose T between the class sizes, or use cloud='full' (no threshold)"
        )


def warn_full_without_pairs(counts: ClassCounts) -> None:
    """The full rule (LEAP Eq. 9) pools the class variances with weights ``K_i - 1``: when no
    class has two images every weight is 0 and every cloud is zero. Said once, when the counts
    are laid out (all-zero placeholder counts, still to come, say nothing)."""
    if isinstance(counts, Tensor) and counts.is_meta:
        return
    counts = counts.cpu() if isinstance(counts, Tensor) else torch.as_tensor(counts, device="cpu")
    seen = counts[counts > 0]
    if seen.numel() == 0 or int(seen.max()) > 1:
        return
    warn_user(
        f"cloud='full': every one of the {seen.numel()} classes with images has K_i = 1, so no "
        "class has two "
        "images to estimate an angle variance from (LEAP Eq. 9 weighs class i by K_i - 1 = 0) "
        "and every cloud is zero. LEAP transfers from classes with many images: train these "
        "identities as a tail together with a head set (a dataset with many images per class)"
    )
