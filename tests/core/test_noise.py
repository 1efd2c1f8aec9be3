"""The counter-based cloud noise: a pure function of (seed, step, stream, row, class)."""

from __future__ import annotations

import math

import pytest
import torch

from feature_cloud import noise as N
from feature_cloud.fused import cloud_angles


def _key(seed: int = 1234, step: int = 7, stream: int = 0, purpose: int = 0) -> torch.Tensor:
    return N.noise_key(torch.tensor(seed), torch.tensor(step), stream, purpose)


def test_any_class_range_reads_the_same_numbers() -> None:
    key, C, B = _key(), 2051, 5
    full = N.counter_normal(key, B, 0, C, C)
    assert full.shape == (C, B) and full.dtype == torch.float32
    for start, end in [(0, 1), (1, 2), (3, 1000), (1024, 2051), (2050, 2051), (7, 7)]:
        assert torch.equal(N.counter_normal(key, B, start, end, C), full[start:end])
    idx = torch.tensor([2050, 0, 3, 3, 1024, 1])
    assert torch.equal(N.counter_normal_at(key, B, idx, C), full[idx])
    # rows are independent of the batch size (a prefix of a larger batch reads the same rows)
    assert torch.equal(N.counter_normal(key, B + 3, 0, C, C)[:, :B], full)
    with pytest.raises(ValueError, match="outside"):
        N.counter_normal(key, B, 5, C + 1, C)


def test_keys_differ_by_seed_step_stream_and_purpose_and_are_deterministic() -> None:
    base = _key()
    others = [
        _key(seed=1235),
        _key(step=8),
        _key(stream=1),
        _key(purpose=1),
        _key(seed=1234 + 2**32),
        _key(step=7 + 2**32),
        _key(seed=-5),
    ]
    assert torch.equal(base, _key())
    assert len({tuple(k.tolist()) for k in [base, *others]}) == len(others) + 1
    z = [N.counter_normal(k, 16, 0, 64, 64) for k in [base, *others]]
    for other in z[1:]:  # independent draws, not shifted copies
        assert abs(torch.corrcoef(torch.stack([z[0].flatten(), other.flatten()]))[0, 1]) < 0.1


def test_distribution_is_standard_normal_and_uncorrelated() -> None:
    C, B = 4000, 64
    z = N.counter_normal(_key(), B, 0, C, C).double()
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 6 * math.sqrt(2 / n)
    kurt = float(((z - z.mean()) ** 4).mean() / z.var() ** 2)
    assert abs(kurt - 3) < 0.05
    # Kolmogorov-Smirnov distance to N(0, 1)
    s = z.flatten().sort().values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    ks = float(
        torch.maximum(
            (torch.arange(1, n + 1) / n - cdf).abs(), (cdf - torch.arange(0, n) / n).abs()
        ).max()
    )
    assert ks < 1.8 / math.sqrt(n)  # 1.8 / sqrt(n): p ~ 0.003
    # neighbouring classes (the two normals of a pair, and across pairs) and rows
    for a, b in [(z[0::2], z[1::2]), (z[1:-1:2], z[2::2]), (z[:, :-1], z[:, 1:])]:
        r = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
        assert abs(r) < 4 / math.sqrt(a.numel()), r
    u = N.counter_uniform(_key(purpose=1), 0, 100_000)
    assert 0 <= float(u.min()) and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.005


def test_cloud_angles_scale_rows_by_std_and_shard_consistently() -> None:
    key, C, B = _key(), 10, 4
    std = torch.tensor([0.0, 0.1, 0.5, 2.0])
    alpha = cloud_angles(std, C, key)
    assert alpha.shape == (B, C)
    assert torch.equal(alpha[0], torch.zeros(C))
    torch.testing.assert_close(alpha, N.counter_normal(key, B, 0, C, C).t() * std[:, None])
    shards = [
        cloud_angles(std, e - s, key, class_start=s, total_classes=C)
        for s, e in [(0, 3), (3, 7), (7, 10)]
    ]
    assert torch.equal(torch.cat(shards, 1), alpha)


@pytest.mark.parametrize("block", [64, 1000, 1 << 17])
def test_blocked_cpu_path_equals_the_generic_path(monkeypatch, block: int) -> None:
    """The CPU path (cache-sized blocks, transcendental ops on contiguous scratch) draws exactly
    the numbers of the generic path used on other devices and under graph capture."""
    monkeypatch.setattr(N, "_CPU_BLOCK", block)
    key, B, C = _key(seed=99, step=3), 37, 1001
    pairs = torch.arange(0, (C + 1) // 2, dtype=torch.int32)
    generic = N._box_muller(N._pair_counters(key, pairs, B, C), key).view(-1, B)[:C]
    assert torch.equal(N.counter_normal(key, B, 0, C, C), generic)
    assert torch.equal(N.counter_normal(key, B, 11, 700, C), generic[11:700])
