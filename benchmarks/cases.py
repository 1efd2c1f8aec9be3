"""Benchmark cases: one training step (forward + backward) of each margin loss, same data.

Every case returns a zero-argument callable that runs one step and returns the loss. Methods:

* ``floor``: ``F.cross_entropy(s * F.linear(F.normalize(x), F.normalize(W)), y)`` (no margin).
* ``leap`` / ``leap_cloud``: :class:`feature_cloud.LEAPMarginHead`, cloud off / on (the paper's
  per-logit cloud, ``cloud_mode="paper"``; default ``impl="auto"``, the fused path);
  ``*_reference``: ``impl="reference"``; ``*_chunked``: ``impl="chunked"``.
  ``leap_cloud_margin``: the target-only cloud ``cloud_mode="margin"``, ``cloud_scale=2``.
* ``pml``: pytorch-metric-learning ``CosFaceLoss`` / ``ArcFaceLoss``.
* ``fastreid``: fastreid's ``CosSoftmax`` / ``ArcSoftmax`` layer on normalised-linear logits (as
  its ``EmbeddingHead`` does, ``logits.clone()`` included) followed by ``F.cross_entropy``.
* ``leap_cloud_nostats``: the fused cloud loss alone with a fixed per-sample std
  (``cloud_std``, default 0.28 rad; the statistics update and variance read-out removed).
* ``gemm3``: the three GEMMs of any such step alone (``x W^T``, ``g W``, ``g^T x``), the limit.
* ``<m>_compiled`` for ``m`` in :data:`COMPILABLE`: the same step's loss under
  ``torch.compile(fullgraph=True)`` (a GPU runs Inductor's fused kernels instead of many small
  launches).
* ``pml_leap`` / ``pml_leap_cloud``: the PML adapter ``LEAPLoss`` (cloud off / on, the paper's
  cloud), called as PML calls a loss.
* ``fastreid_leap`` / ``fastreid_leap_cloud``: the fastreid ``LEAPHead`` (BN neck on ``(B, D,
  1, 1)`` features) and the loss of the meta-architecture the adapter pairs it with
  (``CE.EPSILON`` 0.1 label smoothing), as ``forward`` of the meta-architecture runs them
  after the backbone.

Data (``data=``): ``"random"`` (Gaussian features, Xavier weights: cosines near 0) or
``"trained"`` (each feature is its class weight's direction at cosine ``0.66`` plus orthogonal
noise, as after training; the negatives stay near 0). ``scale`` / ``margin`` default to the
re-ID setting (CosFace s=24, ArcFace s=16, m=0.2); the face setting is s=64, m=0.35.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from feature_cloud import LEAPMarginHead, fused

SCALE = {"cosface": 24.0, "arcface": 16.0}
_MARGIN = 0.2
METHODS = (
    "floor",
    "leap",
    "leap_cloud",
    "leap_cloud_margin",
    "leap_reference",
    "leap_cloud_reference",
    "leap_chunked",
    "leap_cloud_chunked",
    "leap_cloud_nostats",
    "pml",
    "fastreid",
    "gemm3",
    "pml_leap",
    "pml_leap_cloud",
    "fastreid_leap",
    "fastreid_leap_cloud",
)
#: methods that also run compiled: ``<method>_compiled`` is ``torch.compile(loss, fullgraph=True)``
#: of the same step (Inductor; the first call compiles)
COMPILABLE = ("floor", "leap", "leap_cloud", "leap_cloud_margin", "leap_reference")
DATA = ("random", "trained")
TARGET_COS = 0.66


#: glibc's malloc thresholds (bytes) that :func:`pin_allocator` pins: 1 GiB (``mallopt``'s
#: value is a C ``int``)
PINNED_MALLOC_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_PINNED: Optional[Dict[str, object]] = None


def pin_allocator() -> Dict[str, object]:
    """Pin glibc malloc's mmap and trim thresholds (``mallopt(M_MMAP_THRESHOLD)`` and
    ``mallopt(M_TRIM_THRESHOLD)`` = :data:`PINNED_MALLOC_THRESHOLD`), as the timing drivers do
    at start-up; returns the setting, which they record in their output (``"allocator"``).

    Why: by default glibc serves an allocation above its *dynamic* mmap threshold (128 KiB at
    start, raised up to 32 MiB by each large ``free``) with fresh ``mmap``-ed pages, zeroed by
    the kernel on first touch. The floor allocates and frees its ``F.normalize(W)`` temporaries
    every step (~6 MB at re-ID C=751, D=2048): in a process where nothing large had been freed
    yet they cost a page-fault pass each step, in one where other methods had already raised
    the threshold they come back from the heap. The same LEAP step then read 0.53x or 1.14x
    the floor depending on which other methods shared the process (s53 perf trial, finding 6).
    With both thresholds pinned every method's temporaries are reused from the heap in every
    process: the ratios no longer depend on the process's history (and match the many-method
    runs the README's tables came from). ``FC_BENCH_MALLOC=default`` leaves the allocator as it
    is (recorded too); elsewhere than glibc nothing is pinned and the setting says so."""
    global _PINNED
    if _PINNED is not None:
        return _PINNED
    import ctypes
    import ctypes.util
    import platform

    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    setting: Dict[str, object] = {"pinned": False, "env": env}
    if os.environ.get("FC_BENCH_MALLOC", "") == "default":
        setting["note"] = "FC_BENCH_MALLOC=default: glibc's dynamic thresholds left as they are"
    elif platform.libc_ver()[0] != "glibc":
        setting["note"] = "not glibc: nothing pinned (ratios may depend on the process history)"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError) as err:  # no C library to load, or no mallopt in it
            setting["note"] = f"glibc's mallopt not found ({err}): nothing pinned"
            _PINNED = setting
            return setting
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = mallopt(_M_MMAP_THRESHOLD, PINNED_MALLOC_THRESHOLD) == 1
        ok = mallopt(_M_TRIM_THRESHOLD, PINNED_MALLOC_THRESHOLD) == 1 and ok
        setting.update(
            pinned=ok,
            how="glibc mallopt",
            mmap_threshold=PINNED_MALLOC_THRESHOLD,
            trim_threshold=PINNED_MALLOC_THRESHOLD,
        )
        if not ok:
            setting["note"] = "mallopt refused the thresholds"
    _PINNED = setting
    return setting


def set_threads() -> int:
    """``FC_BENCH_THREADS`` (if set) -> ``torch.set_num_threads``; returns the thread count."""
    n = os.environ.get("FC_BENCH_THREADS")
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def _data(batch: int, classes: int, dim: int, seed: int, data: str = "random"):
    if data not in DATA:
        raise ValueError(f"data must be one of {DATA}, got {data!r}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    W = torch.empty(classes, dim)
    torch.nn.init.xavier_normal_(W, generator=g)
    if data == "trained":  # feature = class direction (cos 0.66) + orthogonal noise
        wd = F.normalize(W, dim=1)[y]
        n = F.normalize(x - (x * wd).sum(1, keepdim=True) * wd, dim=1)
        x = (TARGET_COS * wd + math.sqrt(1 - TARGET_COS**2) * n) * math.sqrt(dim)
    return x.requires_grad_(True), y, W


def _long_tail_counts(classes: int) -> torch.Tensor:
    """Zipf-like K_i from 200 down to 2."""
    ranks = torch.arange(1, classes + 1, dtype=torch.float64)
    return (200.0 / ranks.pow(0.5)).clamp_min(2).round().long()


def _primed_head(classes: int, dim: int, margin_type: str, x, y, W, **kw) -> LEAPMarginHead:
    head = LEAPMarginHead(
        dim,
        classes,
        margin_type,
        cloud="full",
        class_counts=_long_tail_counts(classes),
        seed=0,
        validate=False,
        **kw,
    )
    head.weight.data.copy_(W)
    head.to(x.device)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):  # two angles for the batch's classes: the cloud is on for most samples
        head(x.detach() + torch.randn(x.shape, generator=g).to(x.device), y)
    head.weight.grad = None
    return head


def _fastreid_leap_case(
    cloud: bool, classes: int, dim: int, margin_type: str, s: float, m: float, x, y, W0
):
    from fastreid.modeling.meta_arch import Baseline
    from fastreid.utils.events import EventStorage

    from feature_cloud.integrations import fastreid as fr

    head = fr.LEAPHead(
        feat_dim=dim,
        embedding_dim=0,
        num_classes=classes,
        neck_feat="before",
        pool_type="Identity",
        margin_type=margin_type,
        scale=s,
        margin=m,
        with_bnneck=True,
        norm_type="BN",
        cloud="full" if cloud else None,
        seed=0,
        validate=False,
        class_counts=_long_tail_counts(classes) if cloud else None,
        cloud_mode="paper",  # the paper's per-logit cloud, whatever the default
        cloud_scale=1.0,
    )
    head.margin_head.weight.data.copy_(W0)
    head.to(x.device)
    arch = getattr(fr, "LEAPBaseline", Baseline)  # the meta-architecture the adapter provides
    model = arch(
        backbone=torch.nn.Identity(),
        heads=head,
        pixel_mean=[0.0] * 3,
        pixel_std=[1.0] * 3,
        loss_kwargs={
            "loss_names": ("CrossEntropyLoss",),
            "ce": {"eps": 0.1, "alpha": 0.2, "scale": 1.0},
        },
    )
    model.to(x.device)
    storage = EventStorage(0)
    feats = x[:, :, None, None]
    if cloud:
        g = torch.Generator().manual_seed(1)
        with storage:
            for _ in range(2):
                noise = torch.randn(feats.shape, generator=g).to(x.device)
                model.losses(model.heads(feats.detach() + noise, y), y)
    model.zero_grad()

    def loss():
        with storage:
            out = model.losses(model.heads(feats, y), y)
        return sum(out.values())

    return loss, list(model.parameters())


def make_case(
    method: str,
    batch: int,
    classes: int,
    dim: int = 512,
    margin_type: str = "cosface",
    seed: int = 0,
    chunk_size: int = 8192,
    *,
    scale: Optional[float] = None,
    margin: Optional[float] = None,
    data: str = "random",
    cloud_std: float = 0.28,
    device: str = "cpu",
    autocast: Optional[torch.dtype] = None,
) -> Callable[[], torch.Tensor]:
    """A callable running one fwd+bwd step of ``method`` on fixed data (see the module doc).

    ``device``: where data, weights and modules live (data drawn on the CPU, then moved: the
    same numbers on every device); ``autocast``: run the step under ``torch.autocast`` of that
    dtype on ``device`` (the GEMMs in it, as mixed-precision training does)."""
    compiled = method.endswith("_compiled") and method[: -len("_compiled")] in COMPILABLE
    if compiled:
        method = method[: -len("_compiled")]
    if method not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS} or <{'|'.join(COMPILABLE)}>_compiled, got {method!r}"
        )
    dev = torch.device(device)
    x, y, W0 = _data(batch, classes, dim, seed, data)
    x, y, W0 = x.detach().to(dev).requires_grad_(True), y.to(dev), W0.to(dev)
    s = SCALE[margin_type] if scale is None else float(scale)
    m = _MARGIN if margin is None else float(margin)
    params = []

    if method == "floor":
        W = W0.clone().requires_grad_(True)
        params = [W]

        def loss():
            return F.cross_entropy(F.linear(F.normalize(x), F.normalize(W)) * s, y)

    elif method == "gemm3":
        W = W0.clone().requires_grad_(True)
        params = [W]
        gz = torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed + 7)).to(dev)
        xd = x.detach()

        def loss():
            z = xd @ W.detach().t()
            gx = gz @ W.detach()
            gw = gz.t() @ xd
            return z[0, 0] + gx[0, 0] + gw[0, 0]

    elif method.startswith("pml_leap"):
        from feature_cloud.integrations.pml import LEAPLoss

        cloud = method.endswith("_cloud")
        pml_margin = math.degrees(m) if margin_type == "arcface" else m
        mod = LEAPLoss(
            classes,
            dim,
            margin=pml_margin,
            scale=s,
            margin_type=margin_type,
            cloud="full" if cloud else None,
            seed=0,
            validate=False,
            class_counts=_long_tail_counts(classes) if cloud else None,
            **({"cloud_mode": "paper", "cloud_scale": 1.0} if cloud else {}),
        )
        mod.W.data.copy_(W0.t())
        mod.to(dev)
        if cloud:
            g = torch.Generator().manual_seed(1)
            for _ in range(2):
                mod(x.detach() + torch.randn(x.shape, generator=g).to(dev), y)
        mod.W.grad = None
        params = [mod.W]

        def loss():
            return mod(x, y)

    elif method.startswith("fastreid_leap"):
        loss, params = _fastreid_leap_case(
            method.endswith("_cloud"), classes, dim, margin_type, s, m, x, y, W0
        )

    elif method.startswith("leap"):
        impl = "auto"
        kw: Dict = {}
        if method.endswith("_reference"):
            impl = "reference"
        if method.endswith("_chunked"):
            impl, kw = "chunked", {"chunk_size": chunk_size}
        if method.startswith("leap_cloud"):
            # the paper's per-logit cloud, or the target-only margin cloud (cloud_mode="margin")
            mode = ("margin", 2.0) if method == "leap_cloud_margin" else ("paper", 1.0)
            head = _primed_head(
                classes,
                dim,
                margin_type,
                x,
                y,
                W0,
                impl=impl,
                scale=s,
                margin=m,
                cloud_mode=mode[0],
                cloud_scale=mode[1],
                **kw,
            )
            if method == "leap_cloud_nostats":
                std = torch.full((batch,), float(cloud_std), device=dev)
                gen = torch.Generator(device=dev).manual_seed(0)

                def loss():
                    return fused.margin_loss(
                        x,
                        head.weight,
                        y,
                        margin_type=margin_type,
                        scale=s,
                        margin=m,
                        noise_std=std,
                        generator=gen,
                    )
        else:
            head = LEAPMarginHead(
                dim,
                classes,
                margin_type,
                cloud=None,
                validate=False,
                impl=impl,
                scale=s,
                margin=m,
                **kw,
            )
            head.weight.data.copy_(W0)
            head.to(dev)
        params = [head.weight]
        if method != "leap_cloud_nostats":

            def loss():
                return head(x, y)

    elif method == "pml":
        from pytorch_metric_learning import losses as pml_losses

        if margin_type == "cosface":
            mod = pml_losses.CosFaceLoss(num_classes=classes, embedding_size=dim, margin=m, scale=s)
        else:
            mod = pml_losses.ArcFaceLoss(
                num_classes=classes, embedding_size=dim, margin=math.degrees(m), scale=s
            )
        mod.W.data.copy_(W0.t())
        mod.to(dev)
        params = [mod.W]

        def loss():
            return mod(x, y)

    else:  # fastreid: import only its layer module
        from fastreid.layers.any_softmax import ArcSoftmax, CosSoftmax

        layer = (CosSoftmax if margin_type == "cosface" else ArcSoftmax)(classes, s, m).to(dev)
        W = W0.clone().requires_grad_(True)
        params = [W]

        def loss():
            logits = F.linear(F.normalize(x), F.normalize(W))
            return F.cross_entropy(layer(logits.clone(), y), y)

    if compiled:
        loss = torch.compile(loss, fullgraph=True)

    def step() -> torch.Tensor:
        x.grad = None
        for p in params:
            p.grad = None
        with torch.autocast(dev.type, dtype=autocast, enabled=autocast is not None):
            out = loss()
        if out.requires_grad:  # gemm3 runs its three GEMMs without autograd
            out.backward()
        return out.detach()

    return step
