"""Ranks fail together (issue 15, item 3): 2 gloo processes on 127.0.0.1.

A bad batch on one rank (NaN, float labels, wrong shape, a batch above ``pad_to``, embeddings of
another dtype) raises the *same* exception on every rank within seconds, before any state
changes, and training continues in step afterwards; integer label dtypes may differ per rank.
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional

import pytest
import torch
import torch.distributed as dist

from conftest import assert_same_state, make_batch, run_gloo_checks, state_snapshot
from feature_cloud import ClassStatistics, LEAPMarginHead
from feature_cloud.distributed import ShardedLEAPMarginHead, SyncedClassStatistics, synchronize

C, D, B = 6, 4, 5
COUNTS = [3, 2, 4, 1, 2, 3]
SPAWN_TIMEOUT = 120.0


def _batch(step: int, rank: int):
    return make_batch(100 * step + rank, B, D, C)


def _fails_together(rank: int, call: Callable[[], object], exc: type, match: str) -> None:
    """``call`` raises ``exc`` on every rank with the same message, within seconds."""
    start = time.monotonic()
    message: Optional[str] = None
    with pytest.raises(exc, match=match) as info:
        call()
    message = str(info.value)
    assert time.monotonic() - start < 10.0
    messages: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    assert len(set(messages)) == 1, messages


def check_synced_head(rank: int, world: int) -> None:
    torch.manual_seed(0)
    head = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=1))
    ref = ClassStatistics(C, D, class_counts=COUNTS)
    x, y = _batch(0, rank)
    head(x, y).backward()
    ref.update(*[torch.cat(t) for t in zip(*[_batch(0, r) for r in range(world)])])

    before = state_snapshot(head)
    bad_x, bad_y = _batch(1, rank)
    if rank == 1:
        bad_x[2, 1] = float("nan")
    _fails_together(rank, lambda: head(bad_x, bad_y), ValueError, r"NaN.*rank 1 of 2")
    if rank == 0:
        bad_y = bad_y.float()
    _fails_together(rank, lambda: head(bad_x, bad_y), TypeError, r"integer tensor.*rank 0")
    if rank == 1:
        bad_x = bad_x[:, :3]
    _fails_together(rank, lambda: head(bad_x, _batch(1, rank)[1]), ValueError, "shape")
    # the forward's other arguments: checked on one rank only, that rank raised while the
    # other waited in the agreement's all-reduce until the group's timeout
    x, y = _batch(1, rank)
    none = None if rank == 1 else y
    _fails_together(rank, lambda: head(x, none), TypeError, r"needs labels.*rank 1 of 2")
    bad = "avg" if rank == 0 else "mean"
    _fails_together(
        rank, lambda: head(x, y, reduction=bad), ValueError, r"reduction.*'avg' \(rank 0 of 2"
    )
    eps = 1.5 if rank == 1 else 0.0
    _fails_together(
        rank, lambda: head(x, y, label_smoothing=eps), ValueError, r"label_smoothing.*rank 1 of 2"
    )
    # the same bad argument on every rank: raised as it is, as one process raises it (s59; it
    # was blamed on rank 0); in a subgroup the failing rank is named by its global rank too
    _fails_together(rank, lambda: head(x, y, reduction="avg"), ValueError, r"'avg'[^(]*$")
    group = dist.new_group([0, 1])
    in_group = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=1), group)
    bad_x = x.clone()
    if rank == 1:
        bad_x[0, 0] = float("nan")
    where = r"\(global rank 1, rank 1 of 2 in its group; raised on every rank\)$"
    _fails_together(rank, lambda: in_group(bad_x, y), ValueError, where)
    assert_same_state(state_snapshot(head), before, f"rank {rank} after rejected batches")

    # still in step: int32 labels on rank 0, int64 on rank 1 (the label-dtype policy)
    x, y = _batch(2, rank)
    head(x, y.int() if rank == 0 else y).backward()
    ref.update(*[torch.cat(t) for t in zip(*[_batch(2, r) for r in range(world)])])
    assert head.step == 2
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(head.statistics.state_dict()[name], value, msg=name)


def check_synced_statistics_pad_to(rank: int, world: int) -> None:
    stats = SyncedClassStatistics(C, D, class_counts=COUNTS, pad_to=B)
    before = state_snapshot(stats)
    x, y = _batch(0, rank)
    if rank == 0:
        x, y = torch.randn(B + 2, D), torch.zeros(B + 2, dtype=torch.long)
    _fails_together(
        rank,
        lambda: stats.update(x, y),
        ValueError,
        r"more than pad_to=5 samples \(rank 0 of 2; raised on every rank\)",
    )
    assert_same_state(state_snapshot(stats), before, "statistics after a rejected batch")
    x, y = _batch(0, rank)
    stats.update(x.double(), y.to(torch.int16))  # other float / int dtypes on every rank: fine


def check_sharded_head(rank: int, world: int) -> None:
    torch.manual_seed(0)
    head = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=2)
    before = state_snapshot(head)
    x, y = _batch(0, rank)
    if rank == 1:
        x[0, 0] = float("inf")
    _fails_together(rank, lambda: head(x, y), ValueError, r"NaN or Inf.*rank 1 of 2")
    x, y = _batch(0, rank)
    if rank == 1:
        y[3] = C  # out of range
    _fails_together(rank, lambda: head(x, y), ValueError, r"labels must lie in \[0, 6\)")
    x, y = _batch(0, rank)
    _fails_together(
        rank, lambda: head(x.half() if rank == 0 else x, y), TypeError, "different dtypes"
    )
    assert_same_state(state_snapshot(head), before, f"sharded rank {rank} after rejected batches")
    loss = head(x, y.int() if rank == 1 else y)
    loss.backward()
    assert head.step == 1 and torch.isfinite(loss)


def check_pml_loss(rank: int, world: int) -> None:
    """PML's ``LEAPLoss`` under synchronised statistics: a batch that PML's own shape checks
    refuse on one rank (labels of another length, 2-D labels) raises on every rank (that rank
    raised PML's error while the other waited in the statistics' collective), and NaN too."""
    pytest.importorskip("pytorch_metric_learning")
    from feature_cloud.integrations.pml import LEAPLoss

    torch.manual_seed(0)
    loss = LEAPLoss(C, D, class_counts=COUNTS, seed=1)
    x, y = _batch(0, rank)
    loss(x, y).backward()
    before = state_snapshot(loss)
    bad_x, bad_y = _batch(1, rank)
    short = bad_y[:-1] if rank == 1 else bad_y
    _fails_together(rank, lambda: loss(bad_x, short), ValueError, r"one label per.*rank 1 of 2")
    two_d = bad_y[:, None] if rank == 0 else bad_y
    _fails_together(rank, lambda: loss(bad_x, two_d), ValueError, r"rank 0 of 2")
    none = None if rank == 1 else bad_y  # PML's labels_required would raise on rank 1 alone
    _fails_together(rank, lambda: loss(bad_x, none), TypeError, r"integer tensor.*rank 1 of 2")
    ints = bad_x.long() if rank == 1 else bad_x  # were promoted to float silently
    _fails_together(rank, lambda: loss(ints, bad_y), TypeError, r"floating point.*rank 1 of 2")
    # PML trial: a miner's indices_tuple outside the batch on one rank raised there alone
    # (PML's convert_to_weights), while the other waited in the statistics' collective
    pairs = torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([2, 99 if rank == 1 else 3])
    _fails_together(
        rank, lambda: loss(bad_x, bad_y, pairs), ValueError, r"indices_tuple.*rank 1 of 2"
    )
    pairs = torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([2, -1 if rank == 0 else 3])
    _fails_together(
        rank, lambda: loss(bad_x, bad_y, pairs), ValueError, r"negative index.*rank 0 of 2"
    )
    if rank == 1:
        bad_x[0, 0] = float("nan")
    _fails_together(rank, lambda: loss(bad_x, bad_y), ValueError, r"NaN.*rank 1 of 2")
    assert_same_state(state_snapshot(loss), before, f"rank {rank} after rejected batches")
    x, y = _batch(2, rank)
    loss(x, y).backward()  # still in step
    assert loss.feature_cloud.steps_taken == 2


class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that read a device value on the host (a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def check_no_agreement_with_pad_to_and_validate_off(rank: int, world: int) -> None:
    """``validate=False`` with ``pad_to``: no agreement, no host read in a training step of
    the synced head, the sharded head and PML's loss (the statistics as agreed ones); the
    type / shape / ``pad_to`` checks still raise, on the rank that has the problem (here
    both), naming the mode."""
    pytest.importorskip("pytorch_metric_learning")
    from feature_cloud.integrations.pml import LEAPLoss

    torch.manual_seed(0)
    agreed = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=1), pad_to=B)
    local = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=1, validate=False), pad_to=B)
    sharded = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=2, pad_to=B, validate=False)
    pml = LEAPLoss(C, D, class_counts=COUNTS, seed=1, validate=False)
    synchronize(pml, pad_to=B)
    reads = []
    tolist = torch.Tensor.tolist

    def counted(self):
        reads.append(1)
        return tolist(self)

    def step_reads(module, x, y):
        """Host reads in one step: the dispatcher's, and ``tolist`` (the agreement's verdict,
        which never reaches the dispatcher)."""
        syncs = _HostSyncs()
        reads.clear()
        torch.Tensor.tolist = counted
        try:
            with syncs:
                module(x, y)
        finally:
            torch.Tensor.tolist = tolist
        return syncs.count + len(reads)

    for step in range(3):
        x, y = _batch(step, rank)
        agreed(x, y)
        for module in (local, sharded, pml):
            # at most the first step after train() re-reads the host step count (documented)
            n = step_reads(module, x, y)
            assert n <= int(step == 0), (type(module).__name__, step, n)
    assert_same_state(
        state_snapshot(local.feature_cloud),
        state_snapshot(agreed.feature_cloud),
        "validate=False, pad_to",
    )
    before = state_snapshot(local)
    x, y = _batch(3, rank)
    with pytest.raises(ValueError, match=r"shape.*raised on this rank only"):
        local(x[:, :3], y)
    with pytest.raises(ValueError, match=r"more than pad_to=5.*raised on this rank only"):
        local(torch.randn(B + 1, D), torch.zeros(B + 1, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer tensor.*raised on this rank only"):
        sharded(x, y.float())
    assert_same_state(state_snapshot(local), before, "after the refused batches")
    assert step_reads(agreed, x, y) >= 1  # the agreed head's verdict is counted


def _assigned_on_rank_1(rank, module, name, value, target=None):
    """Assign ``name = value`` on rank 1 only; returns a function that undoes it."""
    target = module if target is None else target
    old = getattr(target, name)
    if rank == 1:
        setattr(target, name, value)
    return old, lambda: setattr(target, name, old)


def check_settings_agree(rank: int, world: int) -> None:
    """s51 finding 10: a setting assigned on one rank only (a schedule driven by a rank-local
    metric) made the ranks' statistics (or losses) differ without a word, and ``cloud = None``
    on one rank left the other waiting in the agreement until the group's timeout. Now every
    rank raises at the next training step, naming the setting and its value on every rank,
    before any state changes; assigned on every rank, training goes on in step."""
    torch.manual_seed(0)
    head = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=1, imprint_step=5))
    x, y = _batch(0, rank)
    head(x, y).backward()
    before = state_snapshot(head)
    cloud = head.feature_cloud
    cases = [  # (where, name, value, the name the error gives)
        (head, "gamma", 0.9, "gamma"),
        (head, "center_rate", "paper", "center_rate"),
        (head, "tail_threshold", 7, "tail_threshold"),
        (head, "unknown_variance", "pooled", "unknown_variance"),
        (head, "angle_max_age", 3, "angle_max_age"),
        (head, "cloud_scale", 0.5, "cloud_scale"),
        (head, "cloud_mode", "paper", "cloud_mode"),
        (head, "cloud", "vanilla", "cloud"),
        (head, "margin", 0.3, "margin"),
        (head, "scale", 20.0, "scale"),
        (head, "imprint_step", 7, "imprint_step"),
        (head, "prototype_shrinkage", 3.0, "prototype_shrinkage"),
        (head.statistics, "gamma", 0.5, "gamma"),
        (cloud, "scale", 4.0, "cloud_scale"),
    ]
    x, y = _batch(1, rank)
    for target, name, value, shown in cases:
        old, undo = _assigned_on_rank_1(rank, head, name, value, target)
        pattern = rf"{shown}: {old!r} on rank 0, {value!r} on rank 1"
        _fails_together(rank, lambda: head(x, y), ValueError, pattern)
        assert_same_state(state_snapshot(head), before, f"rank {rank} after {name}={value!r}")
        undo()
    # the cloud turned off on one rank (the cloud-off rank agrees once more: no hang); a head
    # with an imprint ahead refuses cloud = None itself, so the imprint goes on every rank first
    head.imprint_step = None
    old, undo = _assigned_on_rank_1(rank, head, "cloud", None)
    _fails_together(
        rank,
        lambda: head(x, y),
        ValueError,
        # not also statistics.rule (the same rule, under a name that cannot be assigned)
        rf"cloud: {old!r} on rank 0, None on rank 1(?!.*statistics\.rule)",
    )
    assert_same_state(state_snapshot(head), before, f"rank {rank} after cloud=None")
    undo()
    head(x, y).backward()  # in step again, and the statistics identical on every rank
    assert head.step == 2
    centers = [torch.empty_like(head.statistics.centers) for _ in range(world)]
    dist.all_gather(centers, head.statistics.centers)
    assert torch.equal(centers[0], centers[1])

    # the same setting assigned on every rank: no error
    head.gamma = 0.5
    head(*_batch(2, rank)).backward()
    # the cloud turned off on every rank: one more agreement (the first cloud-off step), then
    # none: a cloud-off head has no collective
    head.cloud = None
    reduces = []
    all_reduce = dist.all_reduce

    def counted(*args, **kwargs):
        reduces.append(1)
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counted
    try:
        for step in range(3, 6):
            head(*_batch(step, rank)).backward()
            assert len(reduces) == 1, (step, len(reduces))  # cumulative: the first step only
    finally:
        dist.all_reduce = all_reduce

    # the sharded head (which agrees at every step) and PML's loss
    sharded = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=2)
    before = state_snapshot(sharded)
    for name, value in [("gamma", 0.9), ("cloud", None), ("reduction", "sum")]:
        old, undo = _assigned_on_rank_1(rank, sharded, name, value)
        pattern = rf"{name}: {old!r} on rank 0, {value!r} on rank 1"
        _fails_together(rank, lambda: sharded(x, y), ValueError, pattern)
        undo()
    assert_same_state(state_snapshot(sharded), before, f"sharded rank {rank}")
    sharded(x, y).backward()
    pytest.importorskip("pytorch_metric_learning")
    from feature_cloud.integrations.pml import LEAPLoss

    loss = LEAPLoss(C, D, class_counts=COUNTS, seed=1)
    old, undo = _assigned_on_rank_1(rank, loss, "center_rate", "paper")
    _fails_together(rank, lambda: loss(x, y), ValueError, r"center_rate: 'adaptive' on rank 0")
    undo()
    loss(x, y).backward()
    old, undo = _assigned_on_rank_1(rank, loss, "cloud", None)
    _fails_together(rank, lambda: loss(x, y), ValueError, r"cloud: 'full' on rank 0, None on")
    undo()
    loss(x, y).backward()


def check_class_counts_agree(rank: int, world: int) -> None:
    """s52 ddp finding 1: class_counts that differ between ranks (each rank counting K_i on
    its own data shard) were not compared: the ranks' statistics drifted apart without a word
    (or, under DDP's buffer broadcast, a rank kept a memory its broadcast layout did not fit).
    Now the layout is one of the agreed settings (a host summary set where the memory is laid
    out: construction, allocate_memory, a load, the end of online counting), so the next
    training step raises on every rank naming class_counts, before any state changes."""
    mine = COUNTS if rank == 0 else [k + 1 for k in COUNTS]  # counted on each rank's shard
    head = synchronize(LEAPMarginHead(D, C, class_counts=mine, seed=1))
    x, y = _batch(0, rank)
    differ = (
        r"class_counts: '\[3, 2, 4, 1, 2, 3\] \(sum 15, digest \w+\)' on rank 0, "
        r"'\[4, 3, 5, 2, 3, 4\] \(sum 21, digest \w+\)' on rank 1\..*whole training set"
    )
    before = state_snapshot(head)
    _fails_together(rank, lambda: head(x, y), ValueError, differ)
    assert_same_state(state_snapshot(head), before, f"rank {rank} after differing class_counts")
    head.statistics.allocate_memory(COUNTS)  # laid out alike on every rank: in step
    head(x, y).backward()
    # laid out anew on one rank only
    if rank == 1:
        head.statistics.allocate_memory(mine)
    _fails_together(rank, lambda: head(*_batch(1, rank)), ValueError, differ)
    head.statistics.allocate_memory(COUNTS)
    head(*_batch(1, rank)).backward()
    # a checkpoint with other counts loaded on one rank (the load warns that they differ)
    other = LEAPMarginHead(D, C, class_counts=[k + 1 for k in COUNTS], seed=1).state_dict()
    if rank == 1:
        with pytest.warns(UserWarning, match="class_counts differ"):
            head.load_state_dict(other)
    _fails_together(rank, lambda: head(*_batch(2, rank)), ValueError, differ)

    # counted online: every rank counts the gathered batches, so the layouts agree
    online = synchronize(LEAPMarginHead(D, C, seed=1, warmup_steps=2, count_steps=2))
    assert online.statistics.layout_setting == "counted online (not laid out yet)"
    for step in range(3):  # steps 0, 1 count; step 2 lays the memory out
        online(*_batch(step, rank)).backward()
    assert online.statistics.memory_allocated
    seen = torch.cat([_batch(step, r)[1] for step in range(2) for r in range(world)])
    assert torch.equal(online.statistics.class_counts, torch.bincount(seen, minlength=C))
    texts: List[Optional[str]] = [None] * world
    dist.all_gather_object(texts, online.statistics.layout_setting)
    assert texts[0] == texts[1] and "sum 20" in str(texts[0]), texts
    online(*_batch(3, rank)).backward()  # in step


def check_settings_agree_compiled(rank: int, world: int) -> None:
    """A setting assigned on one rank of a compiled step: every rank raises the settings
    message too (it was dynamo's internal error about an opaque object on every rank: the
    agreement's all_gather_object ran inside the graph)."""
    torch.manual_seed(0)
    head = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=1))
    step = torch.compile(head, backend="eager")
    x, y = _batch(0, rank)
    step(x, y).backward()
    before = state_snapshot(head)
    _assigned_on_rank_1(rank, head, "gamma", 0.9)
    x, y = _batch(1, rank)
    _fails_together(rank, lambda: step(x, y), ValueError, r"gamma: 0.1 on rank 0, 0.9 on rank 1")
    assert_same_state(state_snapshot(head), before, f"rank {rank} after a compiled refusal")


CHECKS = [
    "check_settings_agree",
    "check_settings_agree_compiled",
    "check_class_counts_agree",
    "check_synced_head",
    "check_synced_statistics_pad_to",
    "check_sharded_head",
    "check_pml_loss",
    "check_no_agreement_with_pad_to_and_validate_off",
]


def test_ranks_fail_together() -> None:
    # a short group timeout: a rank left blocked in a collective would fail the test quickly
    run_gloo_checks(__name__, 2, CHECKS, SPAWN_TIMEOUT, group_timeout=30)
