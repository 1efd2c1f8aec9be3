"""torch.distributed tests: CPU, gloo, processes spawned on 127.0.0.1 with a free port.

One spawn per world size (2 and 3 processes) runs every distributed check in turn, since
starting processes costs far more than the checks. A check failing on any rank fails the test
with that rank's traceback; the whole spawn is bounded by ``SPAWN_TIMEOUT``. Every reference is
computed on each rank from the batches of *all* ranks, which every rank can regenerate.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from conftest import TORCH_VERSION, assert_same_state, run_gloo_checks, state_snapshot
from feature_cloud import ClassStatistics, FeatureCloud, LEAPMarginHead
from feature_cloud import functional as FC
from feature_cloud.distributed import (
    ShardedLEAPMarginHead,
    SyncedClassStatistics,
    consolidate_state_dicts,
    even_shard_sizes,
    gather_batch,
    split_state_dict,
    synchronize,
)
from feature_cloud.fused import cloud_angles
from feature_cloud.noise import noise_key

C, D, IN = 7, 5, 6
COUNTS = [2, 1, 3, 1, 2, 1, 4]  # small ring capacities: the memory wraps within a few steps
SPAWN_TIMEOUT = 150.0

# per-rank batch sizes of each step (cut to the world size): equal, uneven with an empty rank,
# uneven, all empty, equal again
SCHEDULE = [[4, 4, 4], [5, 0, 3], [2, 6, 1], [0, 0, 0], [3, 3, 3]]


# --------------------------------------------------------------------------------------------
# data and comparisons
# --------------------------------------------------------------------------------------------


def _batches(
    step: int,
    sizes: Sequence[int],
    dim: int = D,
    classes: int = C,
    seed: int = 0,
    ignored: float = 0.15,
) -> List[Tuple[Tensor, Tensor]]:
    """The batch of every rank at ``step``; the same on every rank. A share ``ignored`` of the
    labels is -1."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    out = []
    for n in sizes:
        x = torch.randn(n, dim, generator=g)
        y = torch.randint(0, classes, (n,), generator=g)
        y = torch.where(torch.rand(n, generator=g) < ignored, torch.full_like(y, -1), y)
        out.append((x, y))
    return out


def _cat(batches):
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _pad_cat(batches, dim=D):
    """Global batch as the sharded head sees it: every rank padded to the largest size."""
    p = max(b[0].shape[0] for b in batches)
    xs, ys = [], []
    for x, y in batches:
        xs.append(torch.cat([x, x.new_zeros(p - x.shape[0], x.shape[1])]))
        ys.append(torch.cat([y, y.new_full((p - y.shape[0],), -1)]))
    return torch.cat(xs), torch.cat(ys)


def _tensors(state: Dict) -> Dict[str, Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _assert_replicated(state: Dict, what: str) -> None:
    """Bit-identical on every rank."""
    mine = _tensors(state)
    states: List = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    for r, other in enumerate(states):
        for k, v in mine.items():
            assert torch.equal(other[k], v), f"{what}: {k} differs between rank {r} and this rank"


# An angle to a center is acos(cos) with cos near 1 for samples close to their center (a class
# with one sample in the batch): an input rounding of 1 ulp moves it by up to sqrt(2 eps_f32),
# about 5e-4 rad. Where features come from different GEMM shapes (DDP vs one process) the angle
# buffers can therefore only agree to that; centers and weights agree to 1e-5.
_ANGLE_KEYS = ("memory", "angle_sum", "angle_sqsum")
_ACOS_ATOL = 2 * math.sqrt(2 * torch.finfo(torch.float32).eps)


def _assert_close_states(
    got: Dict, want: Dict, what: str, atol: float = 1e-6, angle_atol: float = 0.0
) -> None:
    got, want = _tensors(got), _tensors(want)
    assert got.keys() == want.keys(), what
    for k in want:
        a, b = got[k], want[k]
        if a.is_floating_point():
            tol = max(atol, angle_atol) if k.endswith(_ANGLE_KEYS) else atol
            torch.testing.assert_close(a, b, atol=tol, rtol=1e-5, msg=lambda m: f"{what}: {k}: {m}")
        else:
            assert torch.equal(a, b), f"{what}: {k}"


def _close(a: Tensor, b: Tensor, msg: str, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=msg)


# --------------------------------------------------------------------------------------------
# checks, each run on every rank of the spawned group
# --------------------------------------------------------------------------------------------


def check_synced_statistics(rank: int, world: int) -> None:
    """Identical statistics on all ranks, equal to one process fed the concatenated batches,
    with uneven, empty and class-less per-rank batches, with and without ``pad_to``."""
    for pad_to in (None, 6):
        stats = SyncedClassStatistics(C, D, class_counts=COUNTS, pad_to=pad_to)
        ref = ClassStatistics(C, D, class_counts=COUNTS)
        assert stats.collective and stats.noise_stream == rank
        for step, sizes in enumerate(SCHEDULE):
            batches = _batches(step, sizes[:world])
            stats.update(*batches[rank])
            ref.update(*_cat(batches))
        assert int(ref.memory_fill.sum()) > 0
        _assert_replicated(stats.state_dict(), "synced statistics")
        _assert_close_states(stats.state_dict(), ref.state_dict(), "synced vs single process")

    # a NaN on one rank raises on every rank (no rank left blocked) and changes nothing
    before = copy.deepcopy(stats.state_dict())
    x, y = _batches(9, [3] * world)[rank]
    if rank == world - 1:
        x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        stats.update(x, y)
    _assert_close_states(stats.state_dict(), before, "state after a rejected batch", atol=0)
    with pytest.raises(ValueError, match="pad_to"):
        stats.update(torch.randn(7, D), torch.zeros(7, dtype=torch.long))  # only if all ranks do


def check_synced_head(rank: int, world: int) -> None:
    """A synchronised head inside a training loop: statistics replicated and equal to the
    single-process reference (online class counts during warm-up, uneven and empty batches);
    the cloud differs per rank and is reproducible."""
    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, warmup_steps=2, seed=3)  # synchronised by default (sync="auto")
    ref = ClassStatistics(C, D)
    for step, sizes in enumerate(SCHEDULE):
        batches = _batches(step, sizes[:world])
        x, y = batches[rank]
        x = x.clone().requires_grad_()
        head(x, y).backward()
        assert x.grad is not None and x.grad.shape == x.shape
        if ref.counting and step >= 2:
            ref.allocate_memory()
        ref.update(*_cat(batches))
    assert head.step == len(SCHEDULE) and head.cloud_active
    _assert_replicated(head.statistics.state_dict(), "head statistics")
    _assert_close_states(head.statistics.state_dict(), ref.state_dict(), "head vs reference")
    assert torch.equal(head.statistics.class_counts, ref.class_counts)

    # same batch on every rank: the clouds (hence the losses) differ between ranks, and a second
    # head with the same seed reproduces them
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        h = synchronize(LEAPMarginHead(D, C, class_counts=[6] * C, seed=4))
        x, y = _batches(20, [8])[0]
        y = y.clamp_min(0)
        for _ in range(3):  # fill the memory so that the cloud has a variance
            loss = h(x, y)
        losses.append(loss.detach())
    assert torch.equal(losses[0], losses[1])
    everyone = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(everyone, losses[0])
    assert len({float(v) for v in everyone}) == world, f"ranks drew the same cloud: {everyone}"


def _dense_reference(
    weight: Tensor, x: Tensor, y: Tensor, margin_type: str, scale: float, margin: float, alpha=None
) -> Tensor:
    cos = FC.cosine_logits(x, weight)
    logits = FC.margin_logits(
        cos, y, margin_type=margin_type, scale=scale, margin=margin, alpha=alpha
    )
    return FC.margin_cross_entropy(logits, y)


def check_sharded_head(rank: int, world: int) -> None:
    """Loss and gradients of the sharded head equal the dense LEAPMarginHead (within 1e-5) on
    the concatenated batch, for both margins, even and uneven shards, empty rank batches."""
    custom = [1, C - 1] if world == 2 else [1, 4, 2]
    for margin_type in ("cosface", "arcface"):
        for sizes_cls in (None, custom):
            torch.manual_seed(0)
            dense = LEAPMarginHead(D, C, margin_type, cloud=None, seed=5)
            sharded = ShardedLEAPMarginHead(
                D, C, margin_type, cloud=None, seed=5, shard_sizes=sizes_cls, ddp_backbone=False
            )
            sharded.load_state_dict(split_state_dict(dense.state_dict(), world, sizes_cls)[rank])
            lo, hi = sharded.shard_start, sharded.shard_end
            for step, sizes in enumerate(SCHEDULE):
                batches = _batches(step, sizes[:world])
                xa, ya = _cat(batches)
                xa.requires_grad_()
                loss_d = dense(xa, ya)
                gx_d, gw_d = torch.autograd.grad(loss_d, [xa, dense.weight])
                x, y = batches[rank]
                x = x.clone().requires_grad_()
                loss_s = sharded(x, y)
                gx_s, gw_s = torch.autograd.grad(loss_s, [x, sharded.weight])
                start = sum(sizes[:rank])
                what = f"{margin_type} shards={sizes_cls} step {step}"
                _close(loss_s, loss_d, f"loss {what}")
                _close(gw_s, gw_d[lo:hi], f"weight grad {what}")
                _close(gx_s, gx_d[start : start + x.shape[0]], f"embedding grad {what}")

    # reduction="none": each rank weights its own rows' losses (per-sample weights, mining);
    # every rank's weights must reach every shard's weight gradient (they reached only the own)
    torch.manual_seed(0)
    dense = LEAPMarginHead(D, C, cloud=None, seed=5, reduction="none")
    sharded = ShardedLEAPMarginHead(
        D, C, cloud=None, seed=5, shard_sizes=custom, ddp_backbone=False, reduction="none"
    )
    sharded.load_state_dict(split_state_dict(dense.state_dict(), world, custom)[rank])
    lo, hi = sharded.shard_start, sharded.shard_end
    for step, sizes in enumerate(SCHEDULE):
        batches = _batches(step, sizes[:world])
        xa, ya = _cat(batches)
        u = torch.rand(xa.shape[0], generator=torch.Generator().manual_seed(step))
        xa.requires_grad_()
        gx_d, gw_d = torch.autograd.grad((u * dense(xa, ya)).sum(), [xa, dense.weight])
        x, y = batches[rank]
        x = x.clone().requires_grad_()
        start = sum(sizes[:rank])
        own = sharded(x, y)
        _close(own, dense(xa, ya)[start : start + x.shape[0]].detach(), f"none loss step {step}")
        gx_s, gw_s = torch.autograd.grad(
            (u[start : start + x.shape[0]] * own).sum(), [x, sharded.weight]
        )
        _close(gw_s, gw_d[lo:hi], f"none weight grad step {step}")
        _close(gx_s, gx_d[start : start + x.shape[0]], f"none embedding grad step {step}")

    # ddp_backbone (default) scales the embeddings' gradient by world_size
    torch.manual_seed(0)
    dense = LEAPMarginHead(D, C, cloud=None, seed=5)
    sharded = ShardedLEAPMarginHead(D, C, cloud=None, seed=5, pad_to=4)
    sharded.load_state_dict(split_state_dict(dense.state_dict(), world)[rank])
    batches = _batches(0, [4] * world)
    xa, ya = _cat(batches)
    xa.requires_grad_()
    (gx_d,) = torch.autograd.grad(dense(xa, ya), [xa])
    x = batches[rank][0].clone().requires_grad_()
    (gx_s,) = torch.autograd.grad(sharded(x, batches[rank][1]), [x])
    _close(gx_s, world * gx_d[4 * rank : 4 * rank + 4], "ddp_backbone embedding grad")


def check_sharded_cloud_and_checkpoints(rank: int, world: int) -> None:
    """With the feature cloud: loss and gradients equal the dense computation with the dense
    head's counter-based cloud (every shard draws its columns of it); replicated statistics equal
    the single-process ones.
    Then: consolidate to a LEAPMarginHead checkpoint and split back."""
    torch.manual_seed(0)
    paper = dict(cloud_mode="paper", cloud_scale=1.0)  # the per-logit cloud of the reference
    dense = LEAPMarginHead(D, C, "arcface", class_counts=COUNTS, seed=8, **paper)
    weight = dense.weight.detach().clone().requires_grad_()
    sharded = ShardedLEAPMarginHead(
        D, C, "arcface", class_counts=COUNTS, seed=8, ddp_backbone=False, **paper
    )
    sharded.load_state_dict(split_state_dict(dense.state_dict(), world)[rank])
    lo, hi = sharded.shard_start, sharded.shard_end
    ref = ClassStatistics(C, D, class_counts=COUNTS)
    for step, sizes in enumerate(SCHEDULE):
        batches = _batches(step, sizes[:world])
        ref.update(*_cat(batches))
        xp, yp = _pad_cat(batches)
        xp.requires_grad_()
        std = ref.cloud_variance()[yp.clamp_min(0)].sqrt()
        alpha = cloud_angles(std, C, noise_key(torch.tensor(8), torch.tensor(step)))
        loss_d = _dense_reference(weight, xp, yp, "arcface", dense.scale, dense.margin, alpha)
        gx_d, gw_d = torch.autograd.grad(loss_d, [xp, weight])
        x, y = batches[rank]
        x = x.clone().requires_grad_()
        loss_s = sharded(x, y)
        gx_s, gw_s = torch.autograd.grad(loss_s, [x, sharded.weight])
        p = max(sizes[:world])
        _close(loss_s, loss_d, f"cloud loss step {step}")
        _close(gw_s, gw_d[lo:hi], f"cloud weight grad step {step}")
        _close(gx_s, gx_d[p * rank : p * rank + x.shape[0]], f"cloud embedding grad step {step}")
        with torch.no_grad():
            weight -= 0.5 * gw_d
            sharded.weight -= 0.5 * gw_s
    assert float(ref.cloud_variance().max()) > 0
    _assert_replicated(sharded.statistics.state_dict(), "sharded statistics")
    _assert_close_states(sharded.statistics.state_dict(), ref.state_dict(), "sharded statistics")

    # checkpoints: every rank saves its shard; consolidate, load into the dense head, split back
    shards: List = [None] * world
    dist.all_gather_object(shards, sharded.state_dict())
    full = consolidate_state_dicts(shards)
    single = LEAPMarginHead(D, C, "arcface", class_counts=COUNTS, seed=0, **paper)
    single.load_state_dict(full)
    _close(single.weight.detach(), weight.detach(), "consolidated weight")
    assert single.step == sharded.step and single.seed == 8
    _assert_close_states(single.statistics.state_dict(), ref.state_dict(), "consolidated stats")
    with pytest.raises(ValueError, match="rank order"):
        consolidate_state_dicts(shards[::-1])
    again = ShardedLEAPMarginHead(D, C, "arcface", class_counts=COUNTS, seed=0, **paper)
    again.load_state_dict(split_state_dict(single.state_dict(), world)[rank])
    got, want = again.state_dict(), sharded.state_dict()
    assert int(got["feature_cloud.step"]) == int(want["feature_cloud.step"]) == len(SCHEDULE)
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    _assert_close_states(got, want, "split back", atol=0)
    # inference: the shard's columns and the gathered logits are the consolidated head's, in
    # eval mode against the prototypes (which differ from the weights here), batch sizes uneven
    # and one rank empty; a NaN on one rank raises on every rank
    sharded.eval(), single.eval()
    for step in (1, 2):
        xs = _batches(40 + step, SCHEDULE[step][:world])[rank][0]
        want = single.logits(xs)
        _close(sharded.shard_logits(xs), want[:, lo:hi], f"shard logits {step}")
        _close(sharded.logits(xs), want, f"gathered logits {step}")
    xs = _batches(43, [3] * world)[rank][0]
    plain = FC.cosine_logits(xs, single.weight) * single.scale
    assert not torch.allclose(single.logits(xs), plain, atol=1e-3)  # prototypes are in play
    if rank == world - 1:
        xs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sharded.logits(xs)
    sharded.train(), single.train()
    # a rank resuming from its own shard continues the same counter-based cloud
    resumed = ShardedLEAPMarginHead(D, C, "arcface", class_counts=COUNTS, seed=0, **paper)
    resumed.load_state_dict(shards[rank])
    x, y = _batches(30, [4] * world)[rank]
    torch.testing.assert_close(resumed(x, y), sharded(x, y), rtol=0, atol=0)


def check_negative_sampling(rank: int, world: int) -> None:
    """PartialFC-style sampling: each shard keeps every positive class and k classes in all;
    the loss is exactly the dense softmax restricted to the kept classes."""
    classes = 40
    torch.manual_seed(0)
    dense = LEAPMarginHead(D, classes, cloud=None, seed=2)
    sharded = ShardedLEAPMarginHead(
        D, classes, cloud=None, seed=2, sample_rate=0.5, ddp_backbone=False
    )
    sharded.load_state_dict(split_state_dict(dense.state_dict(), world)[rank])
    batches = _batches(0, [2] * world, classes=classes)
    x, y = batches[rank]
    loss = sharded(x, y)
    (gw,) = torch.autograd.grad(loss, [sharded.weight])
    kept = (gw.abs().sum(1) > 0).nonzero().squeeze(1) + sharded.shard_start
    c_r = sharded.shard_end - sharded.shard_start
    assert kept.numel() == min(c_r, max(math.ceil(0.5 * c_r), 2 * world)) < c_r
    everyone: List = [None] * world
    dist.all_gather_object(everyone, kept)
    kept_all = torch.cat(everyone)
    xa, ya = _cat(batches)
    positives = ya[ya >= 0].unique()
    assert torch.isin(positives, kept_all).all(), "a positive class was not sampled"
    with torch.no_grad():
        cos = FC.cosine_logits(xa, dense.weight)
        logits = FC.margin_logits(cos, ya, scale=dense.scale, margin=dense.margin)[:, kept_all]
        remap = torch.full((classes,), -1, dtype=torch.long)
        remap[kept_all] = torch.arange(kept_all.numel())
        want = FC.margin_cross_entropy(logits, torch.where(ya >= 0, remap[ya.clamp_min(0)], ya))
        exact = dense(xa, ya)
    _close(loss.detach(), want, "sampled loss")
    assert loss < exact
    sharded.eval()  # no sampling outside training
    with torch.no_grad():
        _close(sharded(x, y), exact, "eval loss uses every class")


class _Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Linear(IN, D)
        self.head = head

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(self.backbone(x), y)


def check_ddp_training(rank: int, world: int) -> None:
    """Three SGD steps of a tiny model in DDP (buffers broadcast or not, as fastreid) equal the
    single-process run on the concatenated batches with the ranks' clouds side by side.

    DDP averages the ranks' mean losses, which is the global mean only when every rank has as
    many valid labels: the batches here have no ignored labels."""
    # fastreid's setting (False) at both world sizes, DDP's default (True) at two ranks
    for broadcast_buffers in (False, True) if world == 2 else (False,):
        torch.manual_seed(0)
        paper = dict(cloud_mode="paper", cloud_scale=1.0)  # the reference's per-logit cloud
        net = _Net(LEAPMarginHead(D, C, class_counts=COUNTS, seed=11, **paper))
        ref = copy.deepcopy(net)
        ref.head.feature_cloud.statistics = ClassStatistics(C, D, class_counts=COUNTS)  # 1 process
        model = DDP(_Net(net.head), broadcast_buffers=broadcast_buffers)
        model.module.backbone.load_state_dict(net.backbone.state_dict())
        # no synchronize(): the statistics follow the process group by default (sync="auto")
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
        for step in range(3):
            batches = _batches(step, [4] * world, dim=IN, ignored=0.0)
            x, y = batches[rank]
            opt.zero_grad()
            model(x, y).backward()
            opt.step()
            xa, ya = _cat(batches)
            f = ref.backbone(xa)
            ref.head.statistics.update(f.detach(), ya)
            std = ref.head.statistics.cloud_variance()[ya.clamp_min(0)].sqrt()
            # each rank draws the counter-based cloud of its own stream (the rank)
            alpha = torch.cat(
                [
                    cloud_angles(
                        std[4 * r : 4 * r + 4],
                        C,
                        noise_key(torch.tensor(11), torch.tensor(step), r),
                    )
                    for r in range(world)
                ]
            )
            ref_opt.zero_grad()
            _dense_reference(
                ref.head.weight, f, ya, "cosface", ref.head.scale, ref.head.margin, alpha
            ).backward()
            ref_opt.step()
        what = f"DDP broadcast_buffers={broadcast_buffers}"
        assert float(ref.head.statistics.cloud_variance().max()) > 0
        _assert_replicated(model.module.state_dict(), what)
        assert model.module.head.step == 3
        ref.head.feature_cloud.step.fill_(3)  # the reference never ran the head's forward
        _assert_close_states(
            model.module.state_dict(), ref.state_dict(), what, atol=1e-5, angle_atol=_ACOS_ATOL
        )


def check_sharded_ddp_training(rank: int, world: int) -> None:
    """DDP backbone + sharded head (not in DDP) for three steps equals the single-process dense
    run; the consolidated head equals the reference head."""
    torch.manual_seed(0)
    paper = dict(cloud_mode="paper", cloud_scale=1.0)  # the reference's per-logit cloud
    ref = _Net(LEAPMarginHead(D, C, class_counts=COUNTS, seed=12, sync="off", **paper))
    backbone = DDP(copy.deepcopy(ref.backbone))
    head = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=12, **paper)
    head.load_state_dict(split_state_dict(ref.head.state_dict(), world)[rank])
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(3):
        batches = _batches(step, [4] * world, dim=IN)
        x, y = batches[rank]
        opt.zero_grad()
        head(backbone(x), y).backward()
        opt.step()
        xa, ya = _cat(batches)
        f = ref.backbone(xa)
        ref.head.statistics.update(f.detach(), ya)
        std = ref.head.statistics.cloud_variance()[ya.clamp_min(0)].sqrt()
        alpha = cloud_angles(std, C, noise_key(torch.tensor(12), torch.tensor(step)))
        ref_opt.zero_grad()
        _dense_reference(
            ref.head.weight, f, ya, "cosface", ref.head.scale, ref.head.margin, alpha
        ).backward()
        ref_opt.step()
    _assert_close_states(
        backbone.module.state_dict(), ref.backbone.state_dict(), "backbone", atol=1e-5
    )
    shards: List = [None] * world
    dist.all_gather_object(shards, head.state_dict())
    _close(consolidate_state_dicts(shards)["weight"], ref.head.weight.detach(), "head weight")


def check_pml_wrapper(rank: int, world: int) -> None:
    """Inside PML's
    ``DistributedLossWrapper`` around ``integrations.pml.LEAPLoss`` (the wrapper hands every rank
    the gathered batch, own rank first) the statistics are replicated and equal the reference,
    without any synchronize() call; the same for a LEAPLoss called on each rank's own batch."""
    from pytorch_metric_learning.losses import BaseMetricLossFunction
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from feature_cloud.integrations.pml import LEAPLoss

    class Combined(BaseMetricLossFunction):  # a user's loss holding LEAPLoss (PML's wrapper
        def __init__(self, leap: nn.Module) -> None:  # refuses MultipleLosses)
            super().__init__()
            self.leap = leap

        def forward(self, embeddings, labels, *args, **kwargs):
            return self.leap(embeddings, labels)

    torch.manual_seed(0)
    loss = LEAPLoss(C, D, class_counts=COUNTS, seed=6)
    direct = LEAPLoss(C, D, class_counts=COUNTS, seed=6)  # not wrapped: gathers by itself
    nested = LEAPLoss(C, D, class_counts=COUNTS, seed=6)  # wrapped inside the user's loss
    assert loss.statistics.noise_stream == rank
    loss_fn = DistributedLossWrapper(loss)
    nested_fn = DistributedLossWrapper(Combined(nested))
    ref = ClassStatistics(C, D, class_counts=COUNTS)
    for step in range(4):
        batches = _batches(step, [4] * world, ignored=0.0)
        x, y = batches[rank]
        x = x.clone().requires_grad_()
        loss_fn(x, y).backward()
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())
        assert loss.statistics.batch == "pml_gathered" and not loss.statistics.collective
        direct(x.detach(), y)
        assert direct.statistics.batch == "local"
        nested_fn(x.detach(), y)  # the gathered batch, not gathered again
        assert nested.statistics.batch == "pml_gathered"
        ref.update(*_cat(batches))
    for what, module in (("PML wrapper", loss), ("PML direct", direct), ("nested", nested)):
        assert module.step == 4
        _assert_replicated(module.statistics.state_dict(), what)
        _assert_close_states(module.statistics.state_dict(), ref.state_dict(), what)


def check_pml_wrapper_computes_one_loss_on_every_rank(rank: int, world: int) -> None:
    """PML's ``DistributedLossWrapper`` around the loss alone (its docs' usage: no DDP on the
    loss). Every rank holds the gathered batch; the cloud is drawn once for it, in rank order,
    so every rank computes the loss one process computes on the concatenated batch and ``W``
    stays the same on every rank (user trial: W 2.9e-2 apart after 5 steps, from a cloud drawn
    per rank; CosFaceLoss: 3e-7)."""
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from feature_cloud.integrations.pml import LEAPLoss

    kw = dict(class_counts=COUNTS, seed=8, margin=0.35, scale=64.0)
    torch.manual_seed(0)
    loss = LEAPLoss(C, D, **kw)
    torch.manual_seed(0)
    one = LEAPLoss(C, D, sync="off", **kw)  # one process, the concatenated batch
    wrapped = DistributedLossWrapper(loss)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (loss, one)]
    for step in range(5):
        batches = _batches(step, [4] * world, ignored=0.0)
        x, y = batches[rank]
        got = wrapped(x.clone().requires_grad_(), y) / world  # PML scales by the world size
        want = one(*_cat(batches))
        _close(got.detach(), want.detach(), f"loss at step {step}")
        for value, opt in zip((got, want), opts):
            opt.zero_grad()
            value.backward()
            opt.step()
    # the core head with synchronize(batch="pml_gathered") (a user's PML loss holding it): per
    # sample losses and top-1 flags come back in the gathered batch's own rows
    torch.manual_seed(0)
    head = synchronize(LEAPMarginHead(D, C, class_counts=COUNTS, seed=8), batch="pml_gathered")
    torch.manual_seed(0)
    ref = LEAPMarginHead(D, C, class_counts=COUNTS, seed=8, sync="off")
    for step in range(3):
        batches = _batches(step, [4] * world, ignored=0.0)
        gathered = [batches[rank]] + [b for k, b in enumerate(batches) if k != rank]  # PML's
        x, y = torch.cat([b[0] for b in gathered]), torch.cat([b[1] for b in gathered])
        got, top1 = head(x, y, reduction="none", return_top1=True)
        want, want_top1 = ref(*_cat(batches), reduction="none", return_top1=True)
        order = torch.cat([torch.arange(k * 4, k * 4 + 4) for k in range(world)])
        order = torch.cat(
            [order[rank * 4 : rank * 4 + 4]]
            + [order[k * 4 : k * 4 + 4] for k in range(world) if k != rank]
        )  # rank-order row of each gathered row
        _close(got.detach(), want.detach()[order], f"head per-sample losses at step {step}")
        assert torch.equal(top1, want_top1[order])
    assert head.feature_cloud.active
    assert loss.feature_cloud.active and bool((loss.statistics.cloud_variance() > 0).any())
    _close(loss.W.detach(), one.W.detach(), "W against one process")
    weights: List = [None] * world
    dist.all_gather_object(weights, loss.W.detach())
    for other in weights:  # rounding apart at most (rows summed in another order)
        torch.testing.assert_close(other, loss.W.detach(), atol=1e-6, rtol=1e-6)


def check_gather_batch(rank: int, world: int) -> None:
    """Padding layout and the differentiable gather's backward (sum over ranks, scaled)."""
    sizes = [3, 0, 2][:world]
    x = torch.full((sizes[rank], 2), float(rank + 1), requires_grad=True)
    y = torch.full((sizes[rank],), rank, dtype=torch.long)
    xa, ya = gather_batch(x, y, differentiable=True, grad_scale=2.0)
    assert xa.shape == (3 * world, 2)
    want = torch.cat(
        [torch.cat([torch.full((n,), r), torch.full((3 - n,), -1)]) for r, n in enumerate(sizes)]
    )
    assert torch.equal(ya, want)
    (xa * (rank + 1)).sum().backward()  # every rank's "loss" weights all rows by rank + 1
    total = sum(r + 1 for r in range(world))
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0 * total))


def check_imprint(rank: int, world: int) -> None:
    """``imprint_step`` under a process group: the synchronised head's imprinted weights are
    replicated and equal the single-process head's on the concatenated batches (an empty global
    step included); the sharded head imprints its rows of them; ``sync="off"`` (per-rank
    statistics, per-rank step counts) is refused on every rank when the head is built."""
    torch.manual_seed(0)  # the single-process reference: every rank feeds it all batches
    dense = LEAPMarginHead(D, C, cloud=None)
    dense.feature_cloud = FeatureCloud(
        C, D, class_counts=COUNTS, seed=6, imprint_step=3, sync="off"
    )
    synced = LEAPMarginHead(D, C, class_counts=COUNTS, seed=6, imprint_step=3)
    synced.weight.data.copy_(dense.weight)
    with pytest.raises(ValueError, match="replicas would differ"):  # on every rank
        LEAPMarginHead(D, C, class_counts=COUNTS, seed=6, imprint_step=3, sync="off")
    sharded = ShardedLEAPMarginHead(
        D, C, class_counts=COUNTS, seed=6, ddp_backbone=False, imprint_step=3
    )
    sharded.load_state_dict(split_state_dict(dense.state_dict(), world)[rank])
    lo, hi = sharded.shard_start, sharded.shard_end
    start = dense.weight.detach().clone()
    for step, sizes in enumerate(SCHEDULE):
        batches = _batches(step, sizes[:world])
        dense(*_cat(batches))  # no optimiser: only the imprint moves the weights
        x, y = batches[rank]
        for head in (synced, sharded):
            head(x.clone().requires_grad_(), y).backward()
        if step < 3:
            assert torch.equal(synced.weight, start), step
    assert not torch.allclose(dense.weight, start)
    _close(synced.weight, dense.weight, "synced imprint vs single process")
    _close(sharded.weight, dense.weight[lo:hi], "sharded imprint vs dense rows")
    _assert_replicated({"weight": synced.weight.detach()}, "imprinted weights")


def check_pml_imprint(rank: int, world: int) -> None:
    """``imprint_step`` in PML's ``DistributedLossWrapper`` around ``LEAPLoss`` (replicated
    statistics from the gathered batch, one step count per rank): every rank imprints at the
    same step and the class weights stay replicated, equal to a single-process ``LEAPLoss`` fed
    the concatenated batches."""
    from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

    from feature_cloud.integrations.pml import LEAPLoss

    torch.manual_seed(0)
    loss = LEAPLoss(C, D, class_counts=COUNTS, seed=6, imprint_step=3)
    ref = LEAPLoss(C, D, class_counts=COUNTS, seed=6, imprint_step=3)
    ref.W.data.copy_(loss.W)
    start = loss.W.detach().clone()
    loss_fn = DistributedLossWrapper(loss)
    for step in range(5):  # no optimiser: only the imprint moves the weights
        batches = _batches(step, [4] * world, ignored=0.0)
        x, y = batches[rank]
        loss_fn(x.clone().requires_grad_(), y).backward()
        ref(*_cat(batches))
        if step < 3:
            assert torch.equal(loss.W, start), step
    assert loss.step == 5 and not torch.allclose(loss.W, start)
    _close(loss.W, ref.W, "PML wrapper imprint vs single process")
    _assert_replicated({"W": loss.W.detach()}, "PML imprinted weights")


def check_ddp_broadcasts_a_rank0_checkpoint(rank: int, world: int) -> None:
    """A checkpoint loaded on rank 0 only, then broadcast by DDP's construction: every rank's
    cloud follows the broadcast step (ranks >= 1 kept their host step copy of 0 and trained
    without the cloud: the warm-up was not over for them)."""
    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=11, warmup_steps=4)
    net = _Net(head)
    if rank == 0:
        kw = dict(class_counts=COUNTS, seed=11, warmup_steps=4, sync="off")  # rank 0 alone
        trained = _Net(LEAPMarginHead(D, C, **kw))
        for step in range(5):
            trained(*_batches(step, [4], dim=IN, ignored=0.0)[0])
        net.load_state_dict(trained.state_dict())
    model = DDP(net)  # broadcasts rank 0's parameters and buffers
    assert head.step == 5 and head.cloud_active, f"rank {rank}"
    x, y = _batches(9, [4] * world, dim=IN, ignored=0.0)[rank]
    model(x, y).backward()
    steps: List = [None] * world
    dist.all_gather_object(steps, (head.step, head.cloud_active))
    assert steps == [(6, True)] * world, steps


_LOAD_WHOLE = """
import sys, warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dense, sharded = torch.load(sys.argv[1], weights_only=False)
said = [str(w.message) for w in caught if "explicit process_group" in str(w.message)]
assert len(said) == 2, said  # the statistics' and the sharded head's
x, y = torch.randn(4, {D}), torch.tensor([0, 1, 2, 3])
dense(x, y).backward()  # no process group here: the single-process head
assert dense.statistics.process_group is None and sharded.process_group is None
"""


def check_explicit_group_copies_and_pickles(rank: int, world: int) -> None:
    """A head given ``process_group=`` (user trial: deepcopy and ``torch.save`` of the whole
    module raised "cannot pickle 'ProcessGroup'", so an EMA copy could not be made): a deepcopy
    shares the group and stays synchronised; a pickle leaves the group out and warns at load."""
    import os
    import subprocess
    import sys
    import tempfile

    group = dist.new_group(list(range(world)))
    torch.manual_seed(0)
    dense = LEAPMarginHead(D, C, class_counts=COUNTS, seed=4, process_group=group)
    sharded = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=4, process_group=group)
    ema = copy.deepcopy(dense)
    assert ema.statistics.process_group is group and copy.deepcopy(sharded).process_group is group
    assert copy.copy(dense.statistics).process_group is group  # shallow copies share it too
    assert copy.copy(sharded).process_group is group
    for step in range(2):
        x, y = _batches(step, [4] * world)[rank]
        ema(x, y)
        dense(x, y)
        sharded(x, y)
    _assert_replicated(ema.state_dict(), "deep copy")
    assert all(torch.equal(v, ema.state_dict()[k]) for k, v in dense.state_dict().items())
    if rank == 0 and world == 2:  # a fresh process without a process group loads them
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "heads.pt")
            torch.save((dense, sharded), path)
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
            run = subprocess.run(
                [sys.executable, "-c", _LOAD_WHOLE.format(D=D), path],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 0, run.stderr[-2000:]
    assert dense.statistics.process_group is group  # pickling left the module as it was


CHECKS = [
    "check_explicit_group_copies_and_pickles",
    "check_gather_batch",
    "check_synced_statistics",
    "check_synced_head",
    "check_sharded_head",
    "check_sharded_cloud_and_checkpoints",
    "check_negative_sampling",
    "check_ddp_training",
    "check_sharded_ddp_training",
    "check_ddp_broadcasts_a_rank0_checkpoint",
    "check_imprint",
]
#: PML's DistributedLossWrapper: 2 ranks (the usual setting) and 3, where its rotated order is
#: not trivial
CHECKS_PML = [
    "check_pml_wrapper",
    "check_pml_imprint",
    "check_pml_wrapper_computes_one_loss_on_every_rank",
]


def check_sharded_load_refuses_before_its_weight_loads(rank: int, world: int) -> None:
    """s51 trial: the sharded head loaded its weight, then its cloud refused the checkpoint (a
    negative step, NaN centers, a float seed): a half-loaded module. The dense head and PML
    checked the cloud first; the sharded head does too, and a NaN in a parametrized shard
    weight (``parametrizations.weight_norm``'s ``original1``) is refused as a plain one is."""
    from torch.nn.utils.parametrizations import weight_norm

    def build(seed: int, norm: bool = False) -> ShardedLEAPMarginHead:
        torch.manual_seed(seed)
        head = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=1)
        return weight_norm(head, "weight", dim=0) if norm else head

    for norm in (False, True):
        source = build(0, norm)
        source(*_batches(0, [6] * world, ignored=0.0)[rank])
        key = "parametrizations.weight.original1" if norm else "weight"
        for name, value in (
            ("feature_cloud.step", lambda t: torch.tensor(-4)),
            ("feature_cloud.statistics.centers", lambda t: torch.full_like(t, float("nan"))),
            ("feature_cloud.seed", lambda t: torch.tensor(1.5)),
            ("feature_cloud.statistics.memory", lambda t: t + 10.0),
            (key, lambda t: torch.full_like(t, float("nan"))),
        ):
            state = copy.deepcopy(source.state_dict())
            state[name] = value(state[name])
            head = build(1, norm)
            before = state_snapshot(head)
            with pytest.raises(ValueError, match="damaged"):
                head.load_state_dict(state)
            assert_same_state(state_snapshot(head), before, f"{name} refused (norm={norm})")
            with pytest.raises(ValueError, match="damaged"):  # the same, without loading
                head.check_state_dict(state)
        head = build(1, norm)
        head.load_state_dict(source.state_dict())  # the untouched state loads
        assert_same_state(state_snapshot(head), state_snapshot(source), "loaded")


def check_sharded_imprint_refused_on_every_rank(
    rank: int, world: int, compiled: bool = False
) -> None:
    """s54 review 2, finding 2: an imprint still ahead into a shard weight that prune
    recomputes is refused as the dense head refuses it, on every rank before the gather, also
    where only one rank pruned (the others would wait in the gather); nothing changes. A
    ``parametrizations.weight_norm`` shard takes the imprint through its right_inverse.
    ``compiled`` (s54 review 3, finding 1): the same under ``torch.compile``, where the check
    runs eagerly before the ranks agree on the batch."""
    from torch.nn.utils import prune
    from torch.nn.utils.parametrizations import weight_norm

    def build(imprint_step: int = 1) -> ShardedLEAPMarginHead:
        torch.manual_seed(0)
        return ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=1, imprint_step=imprint_step)

    def step(head: nn.Module) -> Callable[..., Tensor]:
        return torch.compile(head, backend="eager") if compiled else head

    for pruned in ([world - 1], list(range(world))):
        head = build()
        if rank in pruned:
            prune.l1_unstructured(head, "weight", amount=0.3)
        before = state_snapshot(head)
        match = "L1Unstructured" + ("" if rank in pruned else f".*rank {pruned[0]} of {world}")
        with pytest.raises(ValueError, match=match):
            step(head)(*_batches(0, [4] * world)[rank])
        assert_same_state(state_snapshot(head), before, f"pruned on ranks {pruned}")
    plain, normed = build(), weight_norm(build(), "weight", dim=0)
    for i in range(2):
        for head in (plain, normed):
            step(head)(*_batches(i, [4] * world)[rank])
    assert (plain.weight - build().weight).abs().max() > 0.1  # imprinted
    _close(normed.weight, plain.weight, "imprint through right_inverse")


# --------------------------------------------------------------------------------------------
# spawning
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_checks(world: int) -> None:
    run_gloo_checks(__name__, world, CHECKS + CHECKS_PML, SPAWN_TIMEOUT, group_timeout=60)


def check_sharded_imprint_refused_on_every_rank_compiled(rank: int, world: int) -> None:
    check_sharded_imprint_refused_on_every_rank(rank, world, compiled=True)


@pytest.mark.parametrize("compiled", [False, True])
def test_sharded_imprint_into_a_recomputed_weight_is_refused_on_every_rank(compiled: bool) -> None:
    if compiled and TORCH_VERSION < (2, 4):  # as PML's compiled imprint tests
        pytest.skip("torch < 2.4's dynamo fails on a parametrized weight (ParametrizationList)")
    check = "check_sharded_imprint_refused_on_every_rank" + ("_compiled" if compiled else "")
    run_gloo_checks(__name__, 2, [check], 90.0 if compiled else 60.0, 30)


def test_sharded_head_refuses_a_damaged_checkpoint_before_its_weight_loads() -> None:
    run_gloo_checks(__name__, 1, ["check_sharded_load_refuses_before_its_weight_loads"], 60.0, 30)


# --------------------------------------------------------------------------------------------
# no process group
# --------------------------------------------------------------------------------------------


def test_synchronize_without_process_group_is_the_plain_head() -> None:
    torch.manual_seed(0)
    plain = LEAPMarginHead(D, C, class_counts=COUNTS, seed=1)
    synced = synchronize(copy.deepcopy(plain))
    assert isinstance(synced.statistics, SyncedClassStatistics)
    assert not synced.statistics.collective and synced.statistics.noise_stream == 0
    for step, sizes in enumerate(SCHEDULE):
        x, y = _cat(_batches(step, sizes))
        torch.testing.assert_close(synced(x, y), plain(x, y), rtol=0, atol=0)
    _assert_close_states(synced.state_dict(), plain.state_dict(), "no group", atol=0)


@pytest.mark.parametrize("cloud_mode", ["paper", "margin"])
def test_sharded_head_on_one_process_is_the_dense_head(cloud_mode: str) -> None:
    """Every cloud mode (a target-only cloud runs on the fused kernels in both heads)."""
    torch.manual_seed(0)
    kw = dict(class_counts=COUNTS, seed=9, cloud_mode=cloud_mode)
    dense = LEAPMarginHead(D, C, "arcface", **kw)
    sharded = ShardedLEAPMarginHead(D, C, "arcface", **kw)
    assert (sharded.rank, sharded.world_size, sharded.shard_end) == (0, 1, C)
    sharded.load_state_dict(split_state_dict(dense.state_dict(), 1)[0])
    for step, sizes in enumerate(SCHEDULE):
        x, y = _cat(_batches(step, sizes))
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        g1 = torch.autograd.grad(dense(x1, y), [x1, dense.weight])
        g2 = torch.autograd.grad(sharded(x2, y), [x2, sharded.weight])
        for a, b in zip(g1, g2):
            _close(a, b, f"step {step}")
    full = consolidate_state_dicts([sharded.state_dict()])
    _assert_close_states(full, dense.state_dict(), "consolidated", atol=1e-6)
    dense.eval(), sharded.eval()  # inference logits against the same prototypes
    x = _batches(50, [6])[0][0]
    _close(sharded.logits(x), dense.logits(x), "eval logits")
    _close(sharded.shard_logits(x), dense.logits(x), "eval shard logits")


def test_split_and_consolidate_round_trip_with_uneven_shards() -> None:
    torch.manual_seed(0)
    dense = LEAPMarginHead(D, C, class_counts=COUNTS, seed=3)
    dense(*_cat(_batches(0, [6])))  # a step: statistics and step count
    state = {"heads." + k: v for k, v in dense.state_dict().items()}
    state["backbone.weight"] = torch.ones(2)
    shards = split_state_dict(state, 3, shard_sizes=[1, 4, 2], prefix="heads.")
    assert [s["heads.weight"].shape[0] for s in shards] == [1, 4, 2]
    assert [int(s["heads.shard_rank"]) for s in shards] == [0, 1, 2]
    back = consolidate_state_dicts(shards, prefix="heads.")
    restored = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    restored.load_state_dict({k[6:]: v for k, v in back.items() if k.startswith("heads.")})
    _assert_close_states(restored.state_dict(), dense.state_dict(), "round trip", atol=0)
    x, y = _cat(_batches(1, [6]))
    torch.testing.assert_close(restored(x, y), dense(x, y), rtol=0, atol=0)  # same cloud
    key = "heads.feature_cloud.statistics.centers"
    shards[1][key] = shards[1][key] + 1
    with pytest.raises(ValueError, match="replicated"):
        consolidate_state_dicts(shards, prefix="heads.")
    with pytest.raises(ValueError, match="already a shard"):
        split_state_dict(shards[0], 2, prefix="heads.")
    with pytest.raises(ValueError, match="no sharded head"):
        consolidate_state_dicts([dense.state_dict()])
    with pytest.raises(ValueError, match="summing"):
        split_state_dict(dense.state_dict(), 2, shard_sizes=[3, 3])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="batch"):
        SyncedClassStatistics(C, D, batch="global")
    with pytest.raises(TypeError, match="LEAPMarginHead"):
        synchronize(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedLEAPMarginHead(D, C, cloud=None, sample_rate=0.0)
    with pytest.raises(ValueError, match="class_counts"):
        ShardedLEAPMarginHead(D, C)
    with pytest.raises(ValueError, match="every rank"):
        even_shard_sizes(2, 3)
    with pytest.raises(TypeError, match="validate must be True or False"):
        ShardedLEAPMarginHead(D, C, cloud=None, validate="no")  # was taken as True
    head = ShardedLEAPMarginHead(D, C, cloud=None)
    with pytest.raises(TypeError, match="validate must be True or False"):
        head.validate = "no"
    assert head.validate is True
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        head(torch.randn(2, D), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="holds"):
        head.load_state_dict({**head.state_dict(), "weight": torch.zeros(3, D)})
    dense = {k: v for k, v in head.state_dict().items() if k not in ("shard_rank", "shard_sizes")}
    with pytest.raises(ValueError, match=r"a dense state dict \(3 classes .*split_state_dict"):
        head.load_state_dict({**dense, "weight": torch.zeros(3, D)}, strict=False)


def test_dense_states_and_shards_are_refused_at_every_world_size() -> None:
    """s52 ddp finding 4: a dense (or consolidated) state loaded into a ShardedLEAPMarginHead at
    world size 1 raised torch's "Missing key(s): shard_rank, shard_sizes" (at world size 2 the
    layout message), and one rank's shard loaded into a LEAPMarginHead said only that the
    weight rows differ (world size 1: torch's "Unexpected key(s)", after loading). Both now
    name the layout and the function that converts it, before any state changes."""
    import feature_cloud

    dense = LEAPMarginHead(D, C, class_counts=COUNTS, seed=3)
    dense(*_cat(_batches(0, [6])))
    state = dense.state_dict()
    sharded = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=0)  # no process group
    before = state_snapshot(sharded)
    layout = rf"a dense state dict \({C} classes of size {D}, no shard layout: split_state_dict\("
    for strict in (True, False):
        with pytest.raises(ValueError, match=layout + r"state, 1\)"):
            sharded.load_state_dict(state, strict=strict)
    with pytest.raises(ValueError, match=layout):
        feature_cloud.check_state_dict(
            nn.Sequential(sharded), {"0." + k: v for k, v in state.items()}
        )
    assert_same_state(state_snapshot(sharded), before, "sharded head after a dense state")
    sharded.load_state_dict(split_state_dict(state, 1)[0])  # the way: loads
    assert sharded.step == 1

    for world, sizes in ((1, rf"\[{C}\]"), (2, r"\[4, 3\]")):
        shard = split_state_dict(state, world)[0]
        fresh = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
        before = state_snapshot(fresh)
        is_shard = rf"one rank's shard .*\(rank 0 of shard sizes {sizes}.*consolidate_state_dicts"
        for strict in (True, False):
            with pytest.raises(ValueError, match=is_shard):
                fresh.load_state_dict(shard, strict=strict)
        with pytest.raises(ValueError, match=is_shard):
            feature_cloud.check_state_dict(fresh, shard)
        assert_same_state(state_snapshot(fresh), before, f"dense head after a shard of {world}")
        fresh.load_state_dict(consolidate_state_dicts(split_state_dict(state, world)))  # the way
        assert fresh.step == 1


def test_ignored_rows_do_not_change_the_statistics() -> None:
    """The padding rows (label -1) of a gathered batch leave the update unchanged wherever
    they sit (regression: a trailing -1 row used to undo the update of class 0)."""
    x, y = _cat(_batches(3, [9]))
    y = y.clamp_min(0)
    y[:3] = 0
    a = ClassStatistics(C, D, class_counts=COUNTS)
    b = ClassStatistics(C, D, class_counts=COUNTS)
    a.update(x, y)
    pad_x = torch.cat([x[:4], torch.zeros(2, D), x[4:], torch.zeros(1, D)])
    pad_y = torch.cat([y[:4], torch.full((2,), -1), y[4:], torch.full((1,), -1)])
    b.update(pad_x, pad_y)
    _assert_close_states(b.state_dict(), a.state_dict(), "padded update")
