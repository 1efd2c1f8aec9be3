"""Activation checkpointing (``torch.utils.checkpoint``): the backbone checkpointed, the head
outside, trains exactly as without checkpointing. The head's training step is stateful
(statistics, step count, the cloud drawn from it), so a checkpointed head, recomputed during
backward, is refused there with the way out, before a second step is taken."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import TORCH_VERSION, assert_same_state, make_batch, state_snapshot
from feature_cloud import LEAPMarginHead

D, C, IN = 8, 6, 5
COUNTS = [30, 25, 3, 2, 4, 2]


class _Net(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, 16), nn.ReLU(), nn.Linear(16, D))
        self.head = head

    def forward(self, x, y):
        return self.head(self.backbone(x), y)


def _head(impl: str, **kw) -> nn.Module:
    if impl == "pml":
        pytest.importorskip("pytorch_metric_learning")
        from feature_cloud.integrations.pml import LEAPLoss

        return LEAPLoss(C, D, class_counts=COUNTS, warmup_steps=2, seed=3, **kw)
    return LEAPMarginHead(
        D, C, scale=64.0, margin=0.35, class_counts=COUNTS, warmup_steps=2, seed=3, impl=impl, **kw
    )


def _run(net: nn.Module, checkpointed: bool, steps: int = 5):
    """Per step: (loss, gradients); and the final state."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        x, y = make_batch(step, 12, IN, C)
        opt.zero_grad()
        if checkpointed:
            loss = net.head(checkpoint(net.backbone, x, use_reentrant=False), y)
        else:
            loss = net(x, y)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
        opt.step()
    return out, state_snapshot(net)


@pytest.mark.parametrize("impl", ["auto", "reference", "pml"])
def test_a_checkpointed_backbone_trains_as_without_checkpointing(impl):
    torch.manual_seed(0)
    net = _Net(_head(impl))
    plain, plain_state = _run(copy.deepcopy(net), False)
    ckpt, ckpt_state = _run(copy.deepcopy(net), True)
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(plain, ckpt)):
        assert torch.equal(l0, l1), step  # the cloud drawn (warm-up over at step 2)
        for a, b in zip(g0, g1):
            assert torch.equal(a, b), step
    assert_same_state(plain_state, ckpt_state, "after five checkpointed steps")
    assert int(ckpt_state["head.feature_cloud.step"]) == 5


@pytest.mark.parametrize("impl", ["auto", "reference", "pml"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpointed_head_is_refused_during_backward(impl, reentrant):
    """Non-reentrant: the forward took the step, the backward's recomputation is refused (it
    took a second step and drew another cloud); reentrant: the first forward ran without
    gradients (no step), the recomputation is refused. Either way no second step."""
    torch.manual_seed(0)
    net = _Net(_head(impl, imprint_step=1))
    x, y = make_batch(0, 12, IN, C)
    if reentrant:
        loss = checkpoint(net.head, net.backbone(x), y, use_reentrant=True)
    else:
        loss = checkpoint(net, x, y, use_reentrant=False)
    cloud = net.head.feature_cloud
    taken = cloud.steps_taken
    assert taken == int(not reentrant)
    before = state_snapshot(net)
    with pytest.raises(RuntimeError, match="ran during backward.*Checkpoint the backbone only"):
        loss.backward()
    assert cloud.steps_taken == taken
    assert_same_state(state_snapshot(net), before, "after the refused recomputation")


def test_a_head_loaded_inside_inference_mode_trains_outside_it():
    """s54 ecosystem 7: with online counts the load resizes the angle memory; inside
    ``torch.inference_mode()`` (an eval or serving helper) the new buffers were inference tensors
    and the next training step failed ("Inplace update to inference tensor outside InferenceMode"),
    naming nothing. The loaded head is the trained one, as torch's own loads leave a module."""
    C, D = 10, 8
    gen = torch.Generator().manual_seed(0)
    kw = dict(scale=24.0, seed=1, warmup_steps=2, count_steps=2)
    trained = LEAPMarginHead(D, C, **kw)
    y = torch.arange(16) % C
    for _ in range(3):
        trained(torch.randn(16, D, generator=gen), y)
    assert trained.statistics.memory.numel() > 0
    head = LEAPMarginHead(D, C, **kw)
    with torch.inference_mode():
        head.load_state_dict(trained.state_dict())
    assert [n for n, b in head.named_buffers() if b.is_inference()] == []
    x = torch.randn(16, D, generator=gen)
    loss = head(x, y)
    loss.backward()
    assert torch.equal(loss.detach(), trained(x, y).detach())
    assert_same_state(head.state_dict(), trained.state_dict())


@pytest.mark.parametrize("route", ["allocate_memory", "reset_parameters", "dcp", "transfer"])
def test_buffers_made_inside_inference_mode_train_outside_it(route, tmp_path):
    """s54 review 2, finding 4: the loads made normal tensors inside ``torch.inference_mode()``,
    but the README's next step after a load of another dataset's checkpoint
    (``statistics.allocate_memory(class_counts)``), ``reset_parameters()``,
    ``prepare_dcp_load`` + ``dcp.load`` and ``FeatureTransfer.reset_parameters()`` made
    inference tensors there, and the next training step failed with torch's "Inplace update to
    inference tensor outside InferenceMode", naming nothing. They make normal tensors."""
    C, D = 10, 8
    if route == "dcp" and TORCH_VERSION < (2, 3):
        pytest.skip("torch < 2.3's DCP needs a process group (tests/core/test_dcp.py alike)")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(16) % C
    if route == "transfer":
        from feature_cloud import FeatureTransfer

        counts = [30, 30, 30, 30, 30, 2, 2, 2, 2, 2]
        ft = FeatureTransfer(D, C, class_counts=counts, num_components=2)
        with torch.inference_mode():
            ft.reset_parameters()
        assert [n for n, b in ft.named_buffers() if b.is_inference()] == []
        labels = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
        ft.update_stats([(torch.randn(len(labels), D, generator=gen), labels)])
        g = torch.randn(4, D, generator=gen, requires_grad=True)
        ft.transfer(g, torch.zeros(4, dtype=torch.long), torch.full((4,), C - 1)).sum().backward()
        return
    kw = dict(scale=24.0, seed=1, warmup_steps=2, count_steps=2)
    trained = LEAPMarginHead(D, C, **kw)
    for _ in range(3):
        trained(torch.randn(16, D, generator=gen), y)
    head = LEAPMarginHead(D, C, **kw)
    with torch.inference_mode():
        if route == "dcp":
            import torch.distributed.checkpoint as dcp

            from feature_cloud import prepare_dcp_load

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # DCP's single-process notice
                dcp.save({"model": trained.state_dict()}, checkpoint_id=str(tmp_path))
                prepare_dcp_load(head, str(tmp_path))
                dcp.load({"model": head.state_dict()}, checkpoint_id=str(tmp_path))
        else:
            head.load_state_dict(trained.state_dict())
            if route == "allocate_memory":
                head.statistics.allocate_memory(torch.arange(C) + 2)
            else:
                head.reset_parameters()
    assert [n for n, b in head.named_buffers() if b.is_inference()] == []
    head(torch.randn(16, D, generator=gen), y).backward()  # the next training step
