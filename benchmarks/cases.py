"""Benchmark cases: one training step (forward + backward) of each margin loss, same data.

Every case returns a zero-argument callable that runs one step and returns the loss. Methods:

* ``floor``: ``F.cross_entropy(s * F.linear(F.normalize(x), F.normalize(W)), y)`` (no margin).
* ``leap`` / ``leap_cloud``: :class:`feature_cloud.LEAPMarginHead`, cloud off / on (default
  ``impl="auto"``, the fused path); ``*_reference``: ``impl="reference"``; ``*_chunked``:
  ``impl="chunked"``.
* ``pml``: pytorch-metric-learning ``CosFaceLoss`` / ``ArcFaceLoss``.
* ``fastreid``: fastreid's ``CosSoftmax`` / ``ArcSoftmax`` layer on normalised-linear logits (as
  its ``EmbeddingHead`` does, ``logits.clone()`` included) followed by ``F.cross_entropy``.
* ``leap_cloud_nostats``: the fused cloud loss alone with a fixed per-sample std (the
  statistics update and variance read-out removed) to price the statistics.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from feature_cloud import LEAPMarginHead, fused

SCALE = {"cosface": 24.0, "arcface": 16.0}
MARGIN = 0.2
METHODS = (
    "floor", "leap", "leap_cloud", "leap_reference", "leap_cloud_reference", "leap_chunked",
    "leap_cloud_chunked", "leap_cloud_nostats", "pml", "fastreid",
)


def set_threads() -> int:
    """``FC_BENCH_THREADS`` (if set) -> ``torch.set_num_threads``; returns the thread count."""
    n = os.environ.get("FC_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def _data(batch: int, classes: int, dim: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g).requires_grad_(True)
    y = torch.randint(0, classes, (batch,), generator=g)
    W = torch.empty(classes, dim)
    torch.nn.init.xavier_normal_(W, generator=g)
    return x, y, W


def _long_tail_counts(classes: int) -> torch.Tensor:
    """Zipf-like K_i from 200 down to 2."""
    ranks = torch.arange(1, classes + 1, dtype=torch.float64)
    return (200.0 / ranks.pow(0.5)).clamp_min(2).round().long()


def _primed_head(classes: int, dim: int, margin_type: str, x, y, W, **kw) -> LEAPMarginHead:
    head = LEAPMarginHead(dim, classes, margin_type, cloud="full",
                          class_counts=_long_tail_counts(classes), seed=0, validate=False, **kw)
    head.weight.data.copy_(W)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two angles for the batch's classes: the cloud is on for most samples
        head(x.detach() + torch.randn(x.shape, generator=g), y)
    head.weight.grad = None
    return head


def make_case(method: str, batch: int, classes: int, dim: int = 512,
              margin_type: str = "cosface", seed: int = 0,
              chunk_size: int = 8192) -> Callable[[], torch.Tensor]:
    """A callable running one fwd+bwd step of ``method`` on fixed random data."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x, y, W0 = _data(batch, classes, dim, seed)
    s = SCALE[margin_type]
    params = []

    if method == "floor":
        W = W0.clone().requires_grad_(True)
        params = [W]

        def loss():
            return F.cross_entropy(F.linear(F.normalize(x), F.normalize(W)) * s, y)

    elif method.startswith("leap"):
        impl = "auto"
        kw: Dict = {}
        if method.endswith("_reference"):
            impl = "reference"
        if method.endswith("_chunked"):
            impl, kw = "chunked", {"chunk_size": chunk_size}
        if method.startswith("leap_cloud"):
            head = _primed_head(classes, dim, margin_type, x, y, W0, impl=impl, **kw)
            if method == "leap_cloud_nostats":
                std = head.statistics.cloud_variance()[y].sqrt()
                gen = torch.Generator().manual_seed(0)

                def loss():
                    return fused.margin_loss(x, head.weight, y, margin_type=margin_type,
                                             scale=s, margin=MARGIN, noise_std=std,
                                             generator=gen)
        else:
            head = LEAPMarginHead(dim, classes, margin_type, cloud=None, validate=False,
                                  impl=impl, **kw)
            head.weight.data.copy_(W0)
        params = [head.weight]
        if method != "leap_cloud_nostats":
            def loss():
                return head(x, y)

    elif method == "pml":
        from pytorch_metric_learning import losses as pml_losses

        if margin_type == "cosface":
            mod = pml_losses.CosFaceLoss(num_classes=classes, embedding_size=dim,
                                         margin=MARGIN, scale=s)
        else:
            mod = pml_losses.ArcFaceLoss(num_classes=classes, embedding_size=dim,
                                         margin=math.degrees(MARGIN), scale=s)
        mod.W.data.copy_(W0.t())
        params = [mod.W]

        def loss():
            return mod(x, y)

    else:  # fastreid: import only its layer module
        from fastreid.layers.any_softmax import ArcSoftmax, CosSoftmax

        layer = (CosSoftmax if margin_type == "cosface" else ArcSoftmax)(classes, s, MARGIN)
        W = W0.clone().requires_grad_(True)
        params = [W]

        def loss():
            logits = F.linear(F.normalize(x), F.normalize(W))
            return F.cross_entropy(layer(logits.clone(), y), y)

    def step() -> torch.Tensor:
        x.grad = None
        for p in params:
            p.grad = None
        out = loss()
        out.backward()
        return out.detach()

    return step
