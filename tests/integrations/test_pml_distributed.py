"""PML's ``LEAPLoss`` refusals under ``torch.distributed`` (2 gloo processes on 127.0.0.1):
every rank raises PML's own error, before any state changes, and training goes on in step."""

from __future__ import annotations

import time
from typing import Callable, List, Optional

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("pytorch_metric_learning")

from conftest import assert_same_state, make_batch, run_gloo_checks, state_snapshot

C, D, B = 6, 4, 5
COUNTS = [3, 2, 4, 1, 2, 3]
SPAWN_TIMEOUT = 120.0


def _fails_together(call: Callable[[], object], exc: type, match: str) -> None:
    """``call`` raises ``exc`` on every rank with the same message, within seconds (not after
    one rank waited in a collective until the group's timeout)."""
    start = time.monotonic()
    with pytest.raises(exc, match=match) as info:
        call()
    assert time.monotonic() - start < 10.0
    messages: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, str(info.value))
    assert len(set(messages)) == 1, messages


def check_ref_emb_is_refused_on_every_rank(rank: int, world: int) -> None:
    """``DistributedLossWrapper(LEAPLoss(...), efficient=True)`` passes a ``ref_emb`` and an
    ``indices_tuple`` over the global batch: PML's "ref_emb is not supported" on every rank, as
    for ``CosFaceLoss`` (the agreement converted the miner indices first and blamed them: "index
    ... out of bounds"); a ``ref_emb`` on one rank of a direct call raises on both (it raised on
    that rank alone, after the agreement, the other waiting in the statistics' gather)."""
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from feature_cloud.integrations.pml import LEAPLoss

    torch.manual_seed(0)
    loss = LEAPLoss(C, D, class_counts=COUNTS, seed=1)
    x, y = make_batch(rank, B, D, C)
    loss(x, y).backward()
    before = state_snapshot(loss)
    x, y = make_batch(10 + rank, B, D, C)
    efficient = DistributedLossWrapper(loss, efficient=True)
    _fails_together(lambda: efficient(x, y), ValueError, "^ref_emb is not supported")
    ref = x.clone() if rank == 1 else None
    _fails_together(
        lambda: loss(x, y, ref_emb=ref), ValueError, r"^ref_emb is not supported.*rank 1 of 2"
    )
    assert_same_state(state_snapshot(loss), before, f"rank {rank} after the refusals")
    DistributedLossWrapper(loss)(x, y).backward()  # still in step
    loss(x, y).backward()
    assert loss.feature_cloud.steps_taken == 3


def test_pml_refusals_fail_together() -> None:
    # a short group timeout: a rank left blocked in a collective would fail the test quickly
    run_gloo_checks(
        __name__, 2, ["check_ref_emb_is_refused_on_every_rank"], SPAWN_TIMEOUT, group_timeout=30
    )
