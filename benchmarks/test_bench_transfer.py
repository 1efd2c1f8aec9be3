"""pytest-benchmark: FTL FeatureTransfer costs (update_stats over 100k x 320 features; transfer
of a 256 batch). Sizes: ``FC_BENCH_FTL_SAMPLES`` (default 100000), 320-d features, 1000 classes
with a long tail, batches of 1024."""

import os

import pytest
import torch

from benchmarks.cases import set_threads

ROUNDS = int(os.environ.get("FC_BENCH_ROUNDS", "5"))
SAMPLES = int(os.environ.get("FC_BENCH_FTL_SAMPLES", "100000"))
THREADS = set_threads()


def make_transfer(samples: int = SAMPLES, dim: int = 320, classes: int = 1000, batch: int = 1024):
    """A FeatureTransfer and its feature stream (long-tailed labels), statistics not yet taken."""
    from feature_cloud.transfer import FeatureBatch, FeatureTransfer

    g = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, classes + 1, dtype=torch.float64)
    labels = torch.multinomial(weights, samples, replacement=True, generator=g)
    centers = torch.randn(classes, dim, generator=g) * 3
    feats = centers[labels] + torch.randn(samples, dim, generator=g)
    counts = torch.bincount(labels, minlength=classes)
    stream = [
        FeatureBatch(
            feats[i : i + batch], labels[i : i + batch], torch.arange(i, min(i + batch, samples))
        )
        for i in range(0, samples, batch)
    ]
    return FeatureTransfer(dim, classes, class_counts=counts, validate=False), stream, counts


def test_update_stats(benchmark, allocator):
    ft, stream, _ = make_transfer()
    benchmark.group = f"FeatureTransfer update_stats {SAMPLES} x 320"
    benchmark.extra_info.update(
        method="update_stats", samples=SAMPLES, dim=320, threads=THREADS, allocator=allocator
    )
    benchmark.pedantic(
        ft.update_stats, args=(stream,), rounds=max(ROUNDS // 2, 1), warmup_rounds=0, iterations=1
    )
    assert ft.ready


def test_transfer_batch(benchmark, allocator):
    ft, stream, counts = make_transfer()
    ft.update_stats(stream)
    regular = torch.nonzero(ft.regular).flatten()
    tail = torch.nonzero(~ft.regular).flatten()
    if tail.numel() == 0 or regular.numel() == 0:
        pytest.skip("no tail or no regular class in the synthetic data")
    g = torch.Generator().manual_seed(1)
    y_r = regular[torch.randint(0, regular.numel(), (256,), generator=g)]
    y_t = tail[torch.randint(0, tail.numel(), (256,), generator=g)]
    x = torch.randn(256, 320, generator=g, requires_grad=True)
    benchmark.group = "FeatureTransfer transfer B=256"
    benchmark.extra_info.update(
        method="transfer", batch=256, dim=320, threads=THREADS, allocator=allocator
    )
    out = benchmark.pedantic(
        ft.transfer, args=(x, y_r, y_t), rounds=ROUNDS * 20, warmup_rounds=2, iterations=1
    )
    assert out.shape == (256, 320)
