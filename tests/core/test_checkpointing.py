"""Activation checkpointing (``torch.utils.checkpoint``) around a backbone and the head: the
training step is taken once. Non-reentrant checkpointing recomputes the forward during
backward: the recomputation replays the step's cloud without a second statistics update, so
loss, gradients and state equal the run without checkpointing, bit for bit. Reentrant
checkpointing runs the first forward without gradients (an inference forward for the head:
the logged loss has no cloud) and the training step in the backward's recomputation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import assert_same_state, make_batch, state_snapshot
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


def _run(net: nn.Module, mode, steps: int = 5):
    """Per step: (loss, gradients); and the final state."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = []
    for step in range(steps):
        x, y = make_batch(step, 12, IN, C)
        opt.zero_grad()
        if mode is None:
            loss = net(x, y)
        elif mode:  # reentrant: a segment whose input needs grad, here the head
            loss = checkpoint(net.head, net.backbone(x), y, use_reentrant=True)
        else:  # backbone and head
            loss = checkpoint(net, x, y, use_reentrant=False)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
        opt.step()
    return out, state_snapshot(net)


@pytest.mark.parametrize("impl", ["auto", "reference", "pml"])
def test_non_reentrant_checkpointing_takes_the_step_once(impl):
    torch.manual_seed(0)
    net = _Net(_head(impl))
    plain, plain_state = _run(copy.deepcopy(net), None)
    ckpt, ckpt_state = _run(copy.deepcopy(net), False)
    for step, ((l0, g0), (l1, g1)) in enumerate(zip(plain, ckpt)):
        assert torch.equal(l0, l1), step  # the cloud was drawn (warm-up over at step 2)
        for a, b in zip(g0, g1):
            assert torch.equal(a, b), step
    assert_same_state(plain_state, ckpt_state, "after five checkpointed steps")
    assert int(ckpt_state["head.feature_cloud.step"]) == 5


def test_reentrant_checkpointing_trains_as_without_it():
    torch.manual_seed(0)
    net = _Net(_head("auto"))
    plain, plain_state = _run(copy.deepcopy(net), None)
    ckpt, ckpt_state = _run(copy.deepcopy(net), True)
    for (_, g0), (_, g1) in zip(plain, ckpt):
        for a, b in zip(g0, g1):
            assert torch.equal(a, b)
    assert_same_state(plain_state, ckpt_state, "after five reentrant steps")
    # the logged loss is the first, gradient-free forward's: no cloud once the warm-up is over
    assert not torch.equal(plain[4][0], ckpt[4][0])


def test_checkpointed_imprint_happens_once_before_its_step():
    torch.manual_seed(0)
    net = _Net(_head("auto", imprint_step=3))
    _, plain_state = _run(copy.deepcopy(net), None)
    _, ckpt_state = _run(copy.deepcopy(net), False)
    assert_same_state(plain_state, ckpt_state, "imprint_step=3, checkpointed")
