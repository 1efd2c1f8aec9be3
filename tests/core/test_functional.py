"""Pure functions: closed forms, float64 gradcheck, numerical safety."""

import math

import pytest
import torch
import torch.nn.functional as F

from feature_cloud import functional as FC
from feature_cloud import margins


def test_safe_acos_gradcheck_float64():
    x = torch.linspace(-0.99, 0.99, 25, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(FC.safe_acos, (x,))


def test_safe_acos_finite_at_boundaries_all_dtypes():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.tensor(
            [-1.0, -1.0 + 1e-7, 0.0, 1.0 - 1e-7, 1.0, 1.0000001], dtype=dtype, requires_grad=True
        )
        y = FC.safe_acos(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all(), dtype
        assert y[0].item() == pytest.approx(math.pi, abs=1e-2)
        assert y[4].item() == 0.0


def test_safe_acos_exact_gradient_in_interior():
    x = torch.tensor([-0.5, 0.1, 0.7], requires_grad=True)
    FC.safe_acos(x).sum().backward()
    torch.testing.assert_close(x.grad, -1 / torch.sqrt(1 - x.detach() ** 2))


def test_shifted_cosine_clips_angle_sum():
    cos = torch.tensor(
        [math.cos(0.3), math.cos(0.3), math.cos(3.0), math.cos(1.0)], dtype=torch.float64
    )
    shift = torch.tensor([-0.5, 0.2, 0.5, 0.0], dtype=torch.float64)
    out = FC.shifted_cosine(cos, shift)
    expected = torch.tensor([1.0, math.cos(0.5), -1.0, math.cos(1.0)], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def _rand_cos(b, c, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, 8, generator=g, dtype=dtype), dim=1)
    w = F.normalize(torch.randn(c, 8, generator=g, dtype=dtype), dim=1)
    return x @ w.t()


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_margin_logits_closed_form(margin_type):
    cos = _rand_cos(6, 5)
    labels = torch.tensor([0, 1, 4, 2, -1, 3])
    alpha = 0.3 * torch.randn(6, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s, m = 10.0, 0.25
    theta = torch.acos(cos)
    ang = (theta + alpha).clamp(0, math.pi)
    expected = s * torch.cos(ang)
    for n, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        if margin_type == "cosface":
            expected[n, y] = s * (torch.cos(ang[n, y]) - m)
        else:
            expected[n, y] = s * torch.cos((theta[n, y] + alpha[n, y] + m).clamp(0, math.pi))
    got = FC.margin_logits(cos, labels, margin_type=margin_type, scale=s, margin=m, alpha=alpha)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_margin_pipeline_gradcheck_float64(margin_type, with_alpha):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, 3, 1, 1, -1])
    # keep angle sums away from the clip points so the function is differentiable there
    alpha = (0.05 * torch.randn(5, 4, dtype=torch.float64, generator=g)) if with_alpha else None

    def loss(x, w):
        cos = FC.cosine_logits(x, w)
        logits = FC.margin_logits(
            cos, labels, margin_type=margin_type, scale=4.0, margin=0.2, alpha=alpha
        )
        return FC.margin_cross_entropy(logits, labels)

    assert torch.autograd.gradcheck(loss, (x, w))


def test_margin_cross_entropy_ignores_and_empty():
    logits = torch.randn(3, 4)
    labels = torch.tensor([1, -1, 2])
    got = FC.margin_cross_entropy(logits, labels)
    ref = F.cross_entropy(logits[[0, 2]], labels[[0, 2]])
    torch.testing.assert_close(got, ref)
    assert FC.margin_cross_entropy(logits, torch.full((3,), -1)).item() == 0.0
    empty = FC.margin_cross_entropy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        FC.margin_cross_entropy(logits, labels, "avg")


def test_metric_l2_matches_definition_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    expected = sum(((w @ f[i]) ** 2).sum() for i in range(7)) / 7
    torch.testing.assert_close(FC.metric_l2(f, w), expected)
    assert torch.autograd.gradcheck(lambda f, w: FC.metric_l2(f, w), (f, w))
    torch.testing.assert_close(FC.metric_l2(f, w, "sum"), expected * 7)


def test_angle_noise_rows_and_distribution():
    std = torch.tensor([0.0, 0.5, 2.0])
    gen = torch.Generator().manual_seed(0)
    a = FC.angle_noise(std.repeat_interleave(2000), 50, gen).view(3, 2000 * 50)
    assert (a[0] == 0).all()
    assert a[1].std().item() == pytest.approx(0.5, rel=0.02)
    assert a[2].std().item() == pytest.approx(2.0, rel=0.02)
    assert abs(a[2].mean().item()) < 0.02


def test_batch_class_means_brute_force():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(9, 4, generator=g)
    y = torch.tensor([2, 0, 2, -1, 1, 2, 0, 5, -1])
    means, counts = FC.batch_class_means(f, y)
    for n in range(9):
        if y[n] < 0:
            assert counts[n] == 0 and (means[n] == 0).all()
            continue
        same = y == y[n]
        assert counts[n] == same.sum()
        torch.testing.assert_close(means[n], f[same].mean(0))


def test_ema_centers_rule():
    old = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    out = FC.ema_centers(old, new, torch.tensor([True, False]), gamma=0.1)
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.1], [1.0, 1.0]]))


def test_ring_slots_vectorised_equals_loop():
    g = torch.Generator().manual_seed(0)
    C = 5
    capacity = torch.tensor([3, 1, 4, 2, 6])
    offsets = torch.cumsum(capacity, 0) - capacity
    pointer = torch.tensor([2, 0, 3, 1, 0])
    trash = int(capacity.sum())
    for _ in range(20):
        labels = torch.randint(-1, C, (12,), generator=g)
        slots, keep, count = FC.ring_slots(labels, offsets, capacity, pointer, trash)
        seen = {}
        for n, y in enumerate(labels.tolist()):
            if y < 0:
                assert not keep[n] and slots[n] == trash
                continue
            r = seen.get(y, 0)
            seen[y] = r + 1
        for n, y in enumerate(labels.tolist()):
            if y < 0:
                continue
            r = sum(1 for m in range(n) if labels[m] == y)
            cnt = seen[y]
            assert count[n] == cnt
            should_keep = r >= cnt - capacity[y]
            assert bool(keep[n]) == bool(should_keep)
            if should_keep:
                assert slots[n] == offsets[y] + (pointer[y] + r) % capacity[y]
        kept = slots[keep]
        assert kept.unique().numel() == kept.numel()


def test_angle_moments_unbiased():
    vals = [
        torch.tensor([0.1, 0.3, 0.2], dtype=torch.float64),
        torch.tensor([0.5], dtype=torch.float64),
    ]
    s = torch.stack([v.sum() for v in vals])
    sq = torch.stack([(v * v).sum() for v in vals])
    fill = torch.tensor([3, 1])
    mean, var, has = FC.angle_moments(s, sq, fill)
    assert mean[0].item() == pytest.approx(0.2)
    assert var[0].item() == pytest.approx(vals[0].var().item())
    assert var[1].item() == 0.0 and has.tolist() == [True, False]


def test_cloud_variance_rules_closed_form():
    var = torch.tensor([0.04, 0.02, 0.01, 0.0, 0.05])
    has = torch.tensor([True, True, True, False, True])
    counts = torch.tensor([50, 30, 4, 1, 5])
    # vanilla, T = 20: head = classes 0, 1 -> sigma_h^2 = 0.03
    van = FC.vanilla_cloud_variance(var, has, counts, 20)
    torch.testing.assert_close(van, torch.tensor([0.0, 0.0, 0.02, 0.03, 0.0]))
    # full: pooled over classes with stats, weights K_i - 1
    w = torch.tensor([49.0, 29.0, 3.0, 0.0, 4.0])
    sigma2 = (w * var).sum() / w.sum()
    full = FC.full_cloud_variance(var, has, counts)
    torch.testing.assert_close(full, (sigma2 - var).clamp_min(0))
    assert full[0] == 0 and full[2] > 0
    with pytest.raises(ValueError, match="^rule must be one of"):  # the argument's name
        FC.cloud_variance("half", var, has, counts)


def test_angles_to_centers():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    torch.testing.assert_close(
        FC.angles_to_centers(f, c), torch.tensor([0.0, math.pi / 2, math.pi])
    )


def test_angles_to_centers_accurate_for_tiny_angles():
    eps = torch.tensor([1e-5, 1e-4, 1e-3])
    f = torch.stack([torch.ones(3), eps, torch.zeros(3)], dim=1)
    c = torch.tensor([[1.0, 0.0, 0.0]]).expand(3, 3)
    torch.testing.assert_close(FC.angles_to_centers(f, c), torch.atan(eps), rtol=1e-4, atol=0)


def test_the_functional_margin_defaults_are_the_heads():
    """API review s50: ``margin_logits(margin_type="arcface")`` and ``fused.margin_loss`` used
    CosFace's s = 24 while the head's (and the README's) ArcFace default is 16."""
    from feature_cloud import fused

    torch.manual_seed(0)
    x, w = torch.randn(6, 8), torch.randn(5, 8)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    cos = FC.cosine_logits(x, w)
    for name in ("cosface", "arcface"):
        rule = margins.get(name)
        given = dict(scale=rule.default_scale, margin=rule.default_margin)
        torch.testing.assert_close(
            FC.margin_logits(cos, y, margin_type=name),
            FC.margin_logits(cos, y, margin_type=name, **given),
        )
        torch.testing.assert_close(
            fused.margin_loss(x, w, y, margin_type=name),
            fused.margin_loss(x, w, y, margin_type=name, **given),
        )
