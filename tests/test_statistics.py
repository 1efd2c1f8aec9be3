"""ClassStatistics: EMA centers, ring angle memory, moments and cloud variances."""
import math

import pytest
import torch
import torch.nn.functional as F

from feature_cloud import ClassStatistics
from feature_cloud import functional as FC


def _features_at_angles(center: torch.Tensor, angles: torch.Tensor, gen) -> torch.Tensor:
    """Unit vectors at exactly ``angles`` from ``center`` in random perpendicular directions."""
    c = F.normalize(center, dim=0)
    u = torch.randn(angles.numel(), c.numel(), generator=gen)
    u = F.normalize(u - (u @ c).unsqueeze(1) * c, dim=1)
    return torch.cos(angles).unsqueeze(1) * c + torch.sin(angles).unsqueeze(1) * u


def test_settled_center_moves_by_exactly_gamma():
    stats = ClassStatistics(3, 4, gamma=0.1, class_counts=[5, 5, 5])
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.2, 0.0, 0.0]])
    stats.update(a, torch.tensor([1, 1]))
    settled = stats.centers[1].clone()
    torch.testing.assert_close(settled, a.mean(0))  # unseen class initialises from its batch
    b = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 0.0, 3.0]])
    stats.update(b, torch.tensor([1, 1, 2]))
    batch_mean = b[:2].mean(0)
    moved = stats.centers[1] - settled
    torch.testing.assert_close(moved, 0.1 * (batch_mean - settled))
    torch.testing.assert_close(stats.centers[2], b[2])
    assert (stats.centers[0] == 0).all() and not stats.center_initialized[0]


def _reference_memory(stats: ClassStatistics, history):
    """Brute-force ring memory: the last K_i * P angles of each class, in order."""
    out = {}
    for cls, ang in history:
        out.setdefault(cls, []).append(ang)
    cap = stats.memory_capacity.tolist()
    return {c: v[-cap[c]:] for c, v in out.items()}


def test_ring_memory_and_running_moments_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    C, D = 6, 8
    counts = [4, 1, 3, 0, 2, 5]
    stats = ClassStatistics(C, D, memory_per_sample=2, class_counts=counts, gamma=0.5)
    history = []
    for step in range(25):
        labels = torch.randint(-1, C, (11,), generator=gen)
        labels[labels == 3] = 2  # class 3 has K=0 and never appears
        feats = torch.randn(11, D, generator=gen)
        stats.update(feats, labels)
        centers = stats.centers[labels.clamp_min(0)]
        angles = FC.angles_to_centers(feats, centers)
        for n, y in enumerate(labels.tolist()):
            if y >= 0:
                history.append((y, angles[n].item()))
    ref = _reference_memory(stats, history)
    mean, var, has = stats.angle_moments()
    for c in range(C):
        vals = torch.tensor(ref.get(c, []), dtype=torch.float64)
        assert stats.memory_fill[c] == vals.numel()
        lo = stats.memory_offsets[c]
        stored = stats.memory[lo: lo + vals.numel()].double()
        torch.testing.assert_close(stored.sort().values, vals.sort().values, atol=1e-6, rtol=0)
        if vals.numel() >= 2:
            assert has[c]
            assert mean[c].item() == pytest.approx(vals.mean().item(), abs=1e-5)
            assert var[c].item() == pytest.approx(vals.var().item(), abs=1e-5)
        else:
            assert not has[c] and var[c] == 0


def test_estimated_spread_and_cloud_variance_match_closed_form():
    """Features with known angular spread per class -> sigma_i^2 and cloud variances."""
    gen = torch.Generator().manual_seed(1)
    C, D = 6, 64
    counts = [200, 200, 200, 5, 5, 5]
    mu = torch.tensor([0.5, 0.5, 0.5, 0.3, 0.3, 0.3])
    sd = torch.tensor([0.10, 0.12, 0.14, 0.03, 0.05, 0.00])
    class_dirs = torch.randn(C, D, generator=gen)
    stats_full = ClassStatistics(C, D, class_counts=counts, cloud="full", gamma=0.05)
    stats_van = ClassStatistics(C, D, class_counts=counts, cloud="vanilla", tail_threshold=20,
                                gamma=0.05)
    for _ in range(60):
        labels = torch.arange(C).repeat_interleave(torch.tensor([20, 20, 20, 5, 5, 5]))
        ang = (mu[labels] + sd[labels] * torch.randn(labels.numel(), generator=gen)).abs()
        feats = torch.cat([_features_at_angles(class_dirs[c], ang[labels == c], gen)
                           for c in range(C)])
        stats_full.update(feats, labels)
        stats_van.update(feats, labels)
    _, var, has = stats_full.angle_moments()
    assert has.all()
    # head classes: sigma_i^2 ~ sd^2 (angles of a high-dimensional cloud around the center)
    for c in range(3):
        assert var[c].item() == pytest.approx(sd[c].item() ** 2, rel=0.25)
    for c in range(3, 6):
        assert var[c].item() == pytest.approx(sd[c].item() ** 2, abs=2e-3)
    sigma_h2 = var[:3].mean()
    van = stats_van.cloud_variance()
    torch.testing.assert_close(van[:3], torch.zeros(3))
    torch.testing.assert_close(van[3:], (sigma_h2 - var[3:]).clamp_min(0), atol=1e-6, rtol=1e-4)
    w = torch.tensor(counts, dtype=torch.float32) - 1
    pooled = (w * var).sum() / w.sum()
    torch.testing.assert_close(stats_full.cloud_variance(), (pooled - var).clamp_min(0),
                               atol=1e-6, rtol=1e-4)
    # the transferred variance is what the closed form predicts for the true spreads
    true_h2 = (sd[:3] ** 2).mean()
    assert van[5].item() == pytest.approx(true_h2.item(), rel=0.3)


def test_statistics_float32_under_autocast_and_half_inputs():
    stats = ClassStatistics(4, 8, class_counts=[3, 3, 3, 3])
    x = torch.randn(6, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats.update(x, torch.tensor([0, 0, 1, 1, 2, 3]))
    assert stats.centers.dtype == torch.float32 and stats.memory.dtype == torch.float32
    assert stats.angle_sum.dtype == torch.float64
    assert torch.isfinite(stats.centers).all()


def test_online_counts_then_layout():
    stats = ClassStatistics(3, 4, memory_per_sample=2)
    assert stats.counting
    stats.update(torch.randn(5, 4), torch.tensor([0, 0, 2, -1, 2]))
    stats.update(torch.randn(2, 4), torch.tensor([0, 1]))
    assert stats.class_counts.tolist() == [3, 1, 2]
    stats.allocate_memory()
    assert not stats.counting
    assert stats.memory_capacity.tolist() == [6, 2, 4]
    assert stats.memory.numel() == 12 + 1


def test_bad_class_counts():
    with pytest.raises(ValueError, match="entries"):
        ClassStatistics(3, 4, class_counts=[1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        ClassStatistics(3, 4, class_counts=[1, -2, 3])
    with pytest.raises(TypeError, match="integer"):
        ClassStatistics(3, 4, class_counts=[1.5, 2.0, 3.0])
    with pytest.raises(ValueError, match="gamma"):
        ClassStatistics(3, 4, gamma=0.0)


def test_state_dict_roundtrip_with_different_memory_layout(tmp_path):
    a = ClassStatistics(3, 4, class_counts=[5, 1, 2])
    a.update(torch.randn(6, 4), torch.tensor([0, 0, 1, 2, 2, 0]))
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = ClassStatistics(3, 4)  # online counting, empty memory
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v)
    with pytest.raises(ValueError, match="num_classes=3"):
        ClassStatistics(4, 4).load_state_dict(a.state_dict())
