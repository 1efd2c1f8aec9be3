"""FTL's ``AlternatingScheduler`` under torch.distributed data parallelism: CPU, gloo, two
spawned processes (``conftest.run_gloo_checks``). Each rank computes the single-process
reference itself (the data and the model are seeded)."""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from conftest import run_gloo_checks
from feature_cloud import AlternatingScheduler, FeatureTransfer, FTLModel
from feature_cloud.ftl import IndexedDataset

P, D, C = 6, 8, 12  # input size, feature size, classes
B = 4  # per-rank batch
SCHEDULE = {"stage0_iters": 3, "stage_iters": 3, "max_alternations": 2, "seed": 7}


def _dataset() -> IndexedDataset:
    gen = torch.Generator().manual_seed(0)
    counts = [40] * 4 + [3] * 8  # 4 regular classes, 8 long-tail ones
    mu = 3 * torch.randn(C, P, generator=gen)
    x = torch.cat([mu[k] + torch.randn(n, P, generator=gen) for k, n in enumerate(counts)])
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return IndexedDataset(TensorDataset(x, y))


def _model() -> FTLModel:
    torch.manual_seed(1)
    return FTLModel(
        nn.Sequential(nn.Linear(P, 16), nn.ReLU(), nn.Linear(16, D)),
        nn.Linear(D, C, bias=False),
        feature_dim=D,
        decoder=nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, P)),
        # no BatchNorm: its statistics are per rank (SyncBatchNorm makes them global)
        filter_net=nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, D)),
        transfer=FeatureTransfer(D, C, energy=0.95, tail_threshold=20),
    )


class _Step(nn.Module):
    """DDP's forward: the stage's loss (the scheduler freezes parts, hence find_unused)."""

    def __init__(self, model: FTLModel, sched: AlternatingScheduler) -> None:
        super().__init__()
        self.model, self.sched = model, sched

    def forward(self, stage: int, batches: Tuple[Any, ...]) -> Tensor:
        if stage == 1:
            return self.sched.stage1_loss(*batches)["loss"]
        return self.model.loss(batches[0][0], batches[0][1])["loss"]


def _train(
    model: FTLModel,
    sched: AlternatingScheduler,
    opt: torch.optim.Optimizer,
    batch_size: int,
    step_fn: Any,
    until: int = -1,
    **shard: Any,
) -> List[Tuple[int, List[List[int]]]]:
    """Algorithm 1 (the README loop); returns ``(stage, [indices of each loader's batch])`` per
    iteration. Stops after ``until`` iterations (``-1``: at the end)."""
    ds = _dataset()
    log: List[Tuple[int, List[List[int]]]] = []
    while not sched.finished and sched.iteration != until:
        stage = sched.stage
        if sched.needs_stats:
            sched.update_stats(DataLoader(ds, batch_size=50))
        loaders = sched.loaders(ds, batch_size, **shard)
        for batches in zip(*loaders) if stage == 1 else ((b,) for b in loaders):
            log.append((stage, [b[2].tolist() for b in batches]))
            loss = step_fn(stage, batches)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sched.step() != stage or sched.iteration == until:
                break
    return log


def _gather(obj: Any) -> List[Any]:
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _fresh(state: Dict[str, Any]) -> Tuple[FTLModel, AlternatingScheduler, torch.optim.Optimizer]:
    """A model, scheduler and optimiser built anew, loaded with ``state`` (or fresh: ``{}``)."""
    model = _model()
    sched = AlternatingScheduler(model, **SCHEDULE)  # type: ignore[arg-type]
    opt = torch.optim.SGD(model.param_groups(), lr=0.05)
    if state:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    return model, sched, opt


def _state(model: nn.Module, sched: AlternatingScheduler, opt: torch.optim.Optimizer) -> Any:
    return copy.deepcopy(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    )


def check_ddp_ranks_share_the_global_batches(rank: int, world: int) -> None:
    """Each rank trains on its slice of every global batch: in every stage the ranks' batches
    are disjoint slices that together are the batches of one process with batch ``world * B``
    (same state at the stage start), and the DDP-trained weights at the stage end equal that
    process's (float tolerance: DDP averages the ranks' gradients of their batch means)."""
    model, sched, opt = _fresh({})
    ddp = DDP(_Step(model, sched), find_unused_parameters=True)
    stages = []
    while not sched.finished:
        stage = sched.stage
        start = _state(model, sched, opt)  # before UpdateStats: the reference runs it too
        log = _train(model, sched, opt, B, ddp, until=sched.iteration + sched.remaining)
        logs = _gather(log)
        ref_model, ref_sched, ref_opt = _fresh(start)
        ref_log = _train(
            ref_model,
            ref_sched,
            ref_opt,
            world * B,
            _Step(ref_model, ref_sched),
            until=ref_sched.iteration + ref_sched.remaining,
            rank=0,
            world_size=1,
        )
        assert len(ref_log) == len(log) == sched._length(stage)
        assert [s for s, _ in ref_log] == [stage] * len(log)
        for it, (_, ref_batches) in enumerate(ref_log):
            for k, ref in enumerate(ref_batches):  # the data loader, or hard and tail (stage 1)
                parts = [lg[it][1][k] for lg in logs]
                assert all(len(p) == B for p in parts)
                assert sum(parts, []) == ref, (stage, it, k)
                if stage != 1:  # the dataset stream: no sample twice within a global batch
                    assert len(set(ref)) == world * B
        ref = ref_model.state_dict()
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-5, msg=name)
            else:
                assert torch.equal(value, ref[name]), name
        stages.append(stage)
    assert stages == [0, 1, 2, 1, 2]
    # the statistics of UpdateStats are bit-identical on every rank
    ft = model.feature_transfer.state_dict()
    for other in _gather(ft):
        for name, value in ft.items():
            assert torch.equal(value, other[name]), name


def check_ddp_resume_mid_stage(rank: int, world: int) -> None:
    """A run stopped mid-stage 1 and resumed in a fresh model and scheduler continues with the
    batches every rank would have drawn."""
    model, sched, opt = _fresh({})
    full = _train(model, sched, opt, B, _Step(model, sched))
    model, sched, opt = _fresh({})
    head = _train(model, sched, opt, B, _Step(model, sched), until=5)  # stage 1, iteration 2/3
    assert sched.stage == 1 and sched.stage_iteration == 2
    model, sched, opt = _fresh(_state(model, sched, opt))
    tail = _train(model, sched, opt, B, _Step(model, sched))
    assert head + tail == full
    own = [sorted(sum(b, [])) for _, b in full]
    others = _gather(own)
    for it, (stage, _) in enumerate(full):
        if stage != 1:  # disjoint shares of the dataset stream
            assert not set(others[0][it]) & set(others[1][it])


def check_sharded_stats_loader_is_refused(rank: int, world: int) -> None:
    """UpdateStats reads the whole set on every rank: a DistributedSampler shard is refused on
    every rank before the statistics change; ``rank`` / ``world_size`` override the group's."""
    model = _model()
    sched = AlternatingScheduler(model, stage0_iters=0, stage_iters=2, seed=3)
    ds = _dataset()
    sharded = DataLoader(ds, batch_size=16, sampler=DistributedSampler(ds, shuffle=False))
    before = copy.deepcopy(model.feature_transfer.state_dict())
    with pytest.raises(ValueError, match="the ranks read different samples"):
        sched.update_stats(sharded)
    # ranks that read sets of different sizes: the refusal names the smallest and largest
    part = DataLoader(Subset(ds, range(100)) if rank == 1 else ds, batch_size=16)
    with pytest.raises(ValueError, match="between 100 and 184 samples a rank"):
        sched.update_stats(part)
    assert sched.needs_stats
    for name, value in model.feature_transfer.state_dict().items():
        assert torch.equal(value, before[name]), name
    if rank == 1:  # another encoder: other statistics, another hard-list size
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.mul_(1.5).add_(0.3)
    summary = sched.update_stats(DataLoader(ds, batch_size=16))  # the whole set: accepted
    ft = model.feature_transfer.state_dict()  # rank 0's statistics, on every rank
    for name, value in _gather(ft)[0].items():
        assert torch.equal(ft[name], value), name
    # the summary of the statistics held (rank 0's), not of this rank's own pass
    assert all(s == summary for s in _gather(summary)), summary
    held = model.feature_transfer
    assert summary["num_hard"] == held.hard_indices.numel()
    assert summary["num_components"] == held.num_components
    assert summary["explained_energy"] == held.explained_energy
    assert summary["num_regular_samples"] == 160 and summary["num_tail_classes"] == 8
    hard, tail = sched.loaders(ds, B)
    assert len(hard) == len(tail) == 2
    # ranks whose streams differ are refused on every rank: another seed, another batch size
    other = AlternatingScheduler(model, stage0_iters=0, stage_iters=2, seed=3 + rank)
    with pytest.raises(ValueError, match="seed from 3 to 4"):
        other.loaders(ds, B)
    with pytest.raises(ValueError, match="batch_size from 4 to 5"):
        sched.loaders(ds, B + rank)
    with pytest.raises(ValueError, match=r"len\(dataset\) from 183 to 184"):  # another set
        sched.loaders(Subset(ds, range(len(ds) - rank)), B)
    # another schedule on one rank: its stages would end at other iterations (s52 review 7e)
    for key, value in (("stage_iters", 2 + rank), ("max_alternations", 3 - rank)):
        kw = {"stage0_iters": 0, "stage_iters": 2, "seed": 3, key: value}
        with pytest.raises(ValueError, match=f"{key} from 2 to 3"):
            AlternatingScheduler(model, **kw).loaders(ds, B)
    tails = AlternatingScheduler(
        model, stage0_iters=0, stage_iters=2, seed=3, tail_sampling=("samples", "classes")[rank]
    )
    with pytest.raises(ValueError, match=r"tail_sampling \(0: samples, 1: classes\) from 0 to 1"):
        tails.loaders(ds, B)
    # this rank's hard batches: its slice of one process's batches of world * B
    one = sched.loaders(ds, world * B, rank=0, world_size=1)
    mine = [b[2].tolist() for b in hard]
    assert [b[2].tolist()[rank * B : (rank + 1) * B] for b in one[0]] == mine


class _Unreadable(Exception):
    def __str__(self) -> str:
        raise AttributeError("no message")


class _Failing(torch.utils.data.Dataset):
    """``dataset`` whose item 60 raises ``error`` where ``fail``."""

    def __init__(self, dataset: Any, fail: bool, error: Exception) -> None:
        self.dataset, self.fail, self.error = dataset, fail, error

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        if self.fail and i == 60:
            raise self.error
        return self.dataset[i]


def check_update_stats_failing_on_one_rank(rank: int, world: int) -> None:
    """An UpdateStats pass that fails on one rank only (its copy of the data: a NaN image, a
    label out of range, a shuffling loader without indices) raises that rank's error on every
    rank, naming it, and no rank's statistics change; the next UpdateStats runs on every rank
    (the ranks' collectives still line up). It left the others waiting in their next collective
    until the group's timeout (distributed trial s58)."""
    model = _model()
    sched = AlternatingScheduler(model, stage0_iters=0, stage_iters=2, seed=3)
    ds = _dataset()
    x, y = ds.dataset.tensors  # type: ignore[attr-defined]
    before = copy.deepcopy(model.feature_transfer.state_dict())

    def unchanged() -> None:
        assert sched.needs_stats
        for name, value in model.feature_transfer.state_dict().items():
            assert torch.equal(value, before[name]), name

    # first pass, rank 1: a NaN image (its encoder's features are NaN)
    bad_x = x.clone()
    if rank == 1:
        bad_x[100] = float("nan")
    nan = IndexedDataset(TensorDataset(bad_x, y))
    with pytest.raises(ValueError, match=r"NaN or Inf values \(rank 1 of 2; raised on every rank"):
        sched.update_stats(DataLoader(nan, batch_size=16))
    unchanged()
    # first pass, rank 0: a label out of range
    bad_y = y.clone()
    if rank == 0:
        bad_y[7] = C + 3
    label = IndexedDataset(TensorDataset(x, bad_y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\).*\(rank 0 of 2;"):
        sched.update_stats(DataLoader(label, batch_size=16))
    unchanged()
    # second pass, rank 1: no indices and a shuffling loader (both passes of rank 0 succeed)
    plain = TensorDataset(x, y)
    loader = DataLoader(plain, batch_size=16, shuffle=rank == 1)
    with pytest.raises(ValueError, match=r"a shuffling loader\?.*\(rank 1 of 2;"):
        sched.update_stats(loader)
    unchanged()
    # an encoder that fails on one rank (torch's shape error): its RuntimeError stays one
    if rank == 1:
        model.encoder[0] = nn.Linear(P + 1, 16)
    with pytest.raises(RuntimeError, match=r"rank 1 of 2; raised on every rank"):
        sched.update_stats(DataLoader(ds, batch_size=16))
    unchanged()
    if rank == 1:
        model.encoder[0] = _model().encoder[0]
    # its type where it can be made from a message (a KeyError of a missing image file), the
    # global rank named in a subgroup; one without a readable message does not hang the others
    group = dist.new_group([0, 1])
    with pytest.raises(KeyError, match=r"img_0042.jpg.*global rank 1, rank 1 of 2 in its group"):
        sched.update_stats(
            DataLoader(_Failing(ds, rank == 1, KeyError("img_0042.jpg"))), process_group=group
        )
    # a class every rank may not have (its module not imported there): its nearest base that
    # every rank has, the same on every rank, naming the class; one whose str() raises alike
    lazy = type("DecodeError", (ValueError,), {"__module__": "imported_on_one_rank"})
    with pytest.raises(ValueError, match=r"^DecodeError: bad JPEG \(rank 1 of 2;") as info:
        sched.update_stats(DataLoader(_Failing(ds, rank == 1, lazy("bad JPEG")), batch_size=16))
    assert info.type is ValueError
    unreadable = r"_Unreadable: <no message: its str\(\) raised> \(rank 0"
    with pytest.raises(Exception, match=unreadable) as info:
        sched.update_stats(DataLoader(_Failing(ds, rank == 0, _Unreadable()), batch_size=16))
    assert info.type is Exception
    unchanged()
    # the same error on every rank (another class count than the model's) is raised as it is
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 12\) or be -1 \(ignored\)$"):
        sched.update_stats(DataLoader(IndexedDataset(TensorDataset(x, y + 1)), batch_size=16))
    unchanged()
    summary = sched.update_stats(DataLoader(ds, batch_size=16))  # accepted on every rank
    assert not sched.needs_stats
    assert all(s == summary for s in _gather(summary)), summary


CHECKS = [
    "check_ddp_ranks_share_the_global_batches",
    "check_ddp_resume_mid_stage",
    "check_sharded_stats_loader_is_refused",
    "check_update_stats_failing_on_one_rank",
]


def test_ftl_data_parallel_checks() -> None:
    run_gloo_checks(__name__, 2, CHECKS, 120.0, group_timeout=60)
