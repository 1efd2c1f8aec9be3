"""pytest-benchmark suite: one fwd+bwd step of each margin loss (float32, CPU unless CUDA asked).

    pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results.json
    python -m benchmarks.report benchmarks/results.json

``FC_BENCH_ROUNDS`` (default 5) rounds per case after one warm-up round; ``FC_BENCH_THREADS``
sets ``torch.set_num_threads``; ``FC_BENCH_CLASSES`` / ``FC_BENCH_BATCHES`` (comma lists) narrow
the grid. Ratios against the floor of the same group are computed by ``benchmarks/report.py``;
for ratios robust to machine load use ``python -m benchmarks.interleaved`` (interleaved runs).
"""

import os

import pytest
import torch

from benchmarks.cases import make_case, set_threads

ROUNDS = int(os.environ.get("FC_BENCH_ROUNDS", "5"))
CLASSES = [int(c) for c in os.environ.get("FC_BENCH_CLASSES", "10000,100000").split(",")]
BATCHES = [int(b) for b in os.environ.get("FC_BENCH_BATCHES", "64,256").split(",")]
METHODS = [
    "floor",
    "leap",
    "leap_cloud",
    "leap_reference",
    "leap_cloud_reference",
    "leap_cloud_chunked",
    "pml",
    "fastreid",
]
THREADS = set_threads()


def _skip_missing(method):
    if method == "pml":
        pytest.importorskip("pytorch_metric_learning")
    if method == "fastreid":
        pytest.importorskip("fastreid.layers.any_softmax")


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
@pytest.mark.parametrize("method", METHODS)
def test_loss_step(benchmark, allocator, method, margin_type, classes, batch):
    _skip_missing(method)
    step = make_case(method, batch, classes, 512, margin_type)
    benchmark.group = f"{margin_type} B={batch} C={classes}"
    benchmark.extra_info.update(
        method=method,
        margin_type=margin_type,
        batch=batch,
        classes=classes,
        dim=512,
        threads=THREADS,
        loadavg=os.getloadavg(),
        allocator=allocator,
    )
    loss = benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("classes", CLASSES)
def test_statistics_update(benchmark, allocator, classes):
    """The per-step statistics work of the cloud: centers, angle memory, variance read-out."""
    from feature_cloud import LEAPMarginHead

    batch, dim = 256, 512
    head = LEAPMarginHead(dim, classes, cloud="full", class_counts=[4] * classes, validate=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)

    def stats():
        head.statistics.update(x, y, validate=False)
        return head.statistics.cloud_variance()[y].sqrt()

    benchmark.group = f"statistics B={batch} C={classes}"
    benchmark.extra_info.update(
        method="statistics",
        batch=batch,
        classes=classes,
        dim=dim,
        threads=THREADS,
        allocator=allocator,
    )
    std = benchmark.pedantic(stats, rounds=ROUNDS * 4, warmup_rounds=1, iterations=1)
    assert torch.isfinite(std).all()
