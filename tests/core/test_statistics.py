"""ClassStatistics: EMA centers, ring angle memory, moments and cloud variances."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from feature_cloud import ClassStatistics, LEAPMarginHead
from feature_cloud import functional as FC


def _features_at_angles(center: torch.Tensor, angles: torch.Tensor, gen) -> torch.Tensor:
    """Unit vectors at exactly ``angles`` from ``center`` in random perpendicular directions."""
    c = F.normalize(center, dim=0)
    u = torch.randn(angles.numel(), c.numel(), generator=gen)
    u = F.normalize(u - (u @ c).unsqueeze(1) * c, dim=1)
    return torch.cos(angles).unsqueeze(1) * c + torch.sin(angles).unsqueeze(1) * u


def test_settled_center_moves_by_exactly_gamma():
    stats = ClassStatistics(3, 4, gamma=0.1, class_counts=[5, 5, 5], center_rate="paper")
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
    return {c: v[-cap[c] :] for c, v in out.items()}


def test_ring_memory_and_running_moments_match_brute_force():
    gen = torch.Generator().manual_seed(0)
    C, D = 6, 8
    counts = [4, 1, 3, 0, 2, 5]
    stats = ClassStatistics(C, D, memory_per_sample=2, class_counts=counts, gamma=0.5)
    history = []
    for _step in range(25):
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
        stored = stats.memory[lo : lo + vals.numel()].double()
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
    stats_van = ClassStatistics(
        C, D, class_counts=counts, cloud="vanilla", tail_threshold=20, gamma=0.05
    )
    for _ in range(60):
        labels = torch.arange(C).repeat_interleave(torch.tensor([20, 20, 20, 5, 5, 5]))
        ang = (mu[labels] + sd[labels] * torch.randn(labels.numel(), generator=gen)).abs()
        feats = torch.cat(
            [_features_at_angles(class_dirs[c], ang[labels == c], gen) for c in range(C)]
        )
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
    torch.testing.assert_close(
        stats_full.cloud_variance(), (pooled - var).clamp_min(0), atol=1e-6, rtol=1e-4
    )
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


def test_class_counts_as_a_mapping_class_to_count():
    """``class_counts=collections.Counter(dataset.targets)``, the obvious way to count, was
    refused ("Could not infer dtype of Counter"). A mapping class -> count is taken now (a class
    it lacks has 0); keys outside the classes, non-integer keys and a Counter over a tensor's
    elements (each element a key of its own) are refused by name."""
    import collections

    import numpy as np

    targets = [0, 0, 2, 2, 2, 0, 3]
    want = [3, 0, 3, 1]
    for counts in (
        collections.Counter(targets),
        dict(collections.Counter(targets)),
        collections.Counter(np.array(targets)),  # numpy integer keys
    ):
        stats = ClassStatistics(4, 4, class_counts=counts)
        assert stats.class_counts.tolist() == want, counts
    head = LEAPMarginHead(4, 4, cloud="full", class_counts=collections.Counter(targets))
    assert head.statistics.class_counts.tolist() == want
    with pytest.raises(ValueError, match=r"outside the classes \[0, 4\): 4, 7"):
        ClassStatistics(4, 4, class_counts={0: 1, 4: 2, 7: 1})
    with pytest.raises(ValueError, match="outside the classes .*: -1"):
        ClassStatistics(4, 4, class_counts={-1: 1, 0: 2})
    with pytest.raises(TypeError, match="integer class indices, got 'cat'"):
        ClassStatistics(4, 4, class_counts={"cat": 3})
    with pytest.raises(ValueError, match="class 0 appears twice"):
        ClassStatistics(4, 4, class_counts=collections.Counter(torch.tensor(targets)))
    with pytest.raises(TypeError, match="must hold integers"):
        ClassStatistics(4, 4, class_counts={0: 1.5})
    with pytest.raises(ValueError, match="non-negative"):
        ClassStatistics(4, 4, class_counts={0: -1})


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

    # a checkpoint whose floats were cast (a user's .half() of the state dict): the memory of
    # the new layout keeps the module's float32, and the next update runs
    half = {k: v.half() if v.is_floating_point() else v for k, v in a.state_dict().items()}
    c = ClassStatistics(3, 4)
    c.load_state_dict(half)
    assert c.memory.dtype == torch.float32 and c.memory.shape == a.memory.shape
    c.update(torch.randn(2, 4), torch.tensor([1, 2]))
    assert torch.isfinite(c.memory).all()


def test_loading_other_known_counts_warns_once_and_loads_them():
    """Both the module and the checkpoint know K_i and they differ (fine-tuning on another
    dataset): the checkpoint's counts load, with a warning saying how to lay out one's own;
    the same counts (a resume) load silently."""
    a = ClassStatistics(3, 4, class_counts=[5, 1, 2])
    b = ClassStatistics(3, 4, class_counts=[5, 3, 3])
    with pytest.warns(UserWarning, match="differ from this module's for 2 of 3 classes"):
        b.load_state_dict(a.state_dict())
    assert b.class_counts.tolist() == [5, 1, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClassStatistics(3, 4, class_counts=[5, 1, 2]).load_state_dict(a.state_dict())
        ClassStatistics(3, 4).load_state_dict(a.state_dict())  # counting online: nothing to say
        pending = ClassStatistics(3, 4)  # counts still to come, memory sized to the checkpoint's
        pending.memory = torch.empty(a.memory.shape)  # first (fastreid's loader does this)
        pending.load_state_dict(a.state_dict())


def test_adaptive_center_rate_is_running_mean_then_gamma():
    """Rate max(gamma, 1/n): the n-th appearance weighs 1/n until 1/n < gamma."""
    stats = ClassStatistics(1, 3, gamma=0.25, class_counts=[8])
    gen = torch.Generator().manual_seed(0)
    means = []
    for n in range(1, 7):
        x = torch.randn(1, 3, generator=gen)
        means.append(x[0])
        before = stats.centers[0].clone()
        stats.update(x, torch.tensor([0]))
        if n <= 4:  # 1/n >= gamma: the running mean of the batch means
            torch.testing.assert_close(stats.centers[0], torch.stack(means).mean(0))
        else:
            torch.testing.assert_close(stats.centers[0], before + 0.25 * (x[0] - before))
    assert stats.center_updates.tolist() == [6]


def _tail_center_bias(center_rate: str, appearances: int, trials: int = 400) -> float:
    """Mean angle (rad) between a tail class's center and its true mean direction after
    ``appearances`` one-sample batches (the class is seen once at a time, as a tail class is)."""
    gen = torch.Generator().manual_seed(5)
    D = 32
    stats = ClassStatistics(
        trials, D, gamma=0.1, class_counts=[appearances] * trials, center_rate=center_rate
    )
    true = F.normalize(torch.randn(trials, D, generator=gen), dim=1)
    labels = torch.arange(trials)
    for _ in range(appearances):
        feats = true + 0.35 * torch.randn(trials, D, generator=gen)  # per-sample spread ~63 deg
        stats.update(feats, labels)
    return FC.angles_to_centers(stats.centers, true).mean().item()


def test_adaptive_center_rate_removes_tail_center_bias():
    """Measured: after 5 appearances the paper EMA keeps 66% of the first sample's weight, so a
    tail center sits far from the class mean; the adaptive rate is the sample mean of all 5."""
    paper = _tail_center_bias("paper", 5)
    adaptive = _tail_center_bias("adaptive", 5)
    # expected angles: noise norm 0.35*sqrt(32)=1.98 per sample; mean of 5 -> 0.89, while the
    # paper's weights (0.656, 0.073, 0.081, 0.09, 0.1) give an effective 1/sum(w^2) ~ 2.2 samples
    w = [0.9**4] + [0.1 * 0.9**k for k in (3, 2, 1, 0)]
    noise = 0.35 * math.sqrt(32)
    assert paper == pytest.approx(math.atan(noise * math.sqrt(sum(v * v for v in w))), rel=0.05)
    assert adaptive == pytest.approx(math.atan(noise / math.sqrt(5)), rel=0.05)
    assert adaptive < 0.8 * paper, (paper, adaptive)


def test_online_count_stops_after_count_updates():
    """A warm-up of several epochs must not multiply K_i by the number of epochs."""
    stats = ClassStatistics(3, 4, count_updates=2)
    epoch = [torch.tensor([0, 0, 1]), torch.tensor([2, 0])]
    for _ in range(3):  # three epochs of warm-up
        for y in epoch:
            stats.update(torch.randn(y.numel(), 4), y)
    assert stats.class_counts.tolist() == [3, 1, 1]
    stats.allocate_memory()
    assert stats.memory_capacity.tolist() == [3, 1, 1]
    # without a limit the counts are inflated (the old behaviour, documented)
    old = ClassStatistics(3, 4)
    for _ in range(3):
        for y in epoch:
            old.update(torch.randn(y.numel(), 4), y)
    assert old.class_counts.tolist() == [9, 3, 3]


def test_unknown_variance_is_not_the_pooled_variance():
    """A class with < 2 stored angles: no cloud until known, except a class whose memory can
    never hold two angles (one-shot, K_i * P < 2), which takes the pooled prior."""
    gen = torch.Generator().manual_seed(2)
    counts = [50, 50, 4, 1]
    stats = ClassStatistics(4, 16, class_counts=counts)
    # classes 0, 1 (head) and 3 (one-shot) are seen; class 2 appears once (1 angle)
    for _ in range(6):
        y = torch.tensor([0] * 6 + [1] * 6 + [3])
        stats.update(torch.randn(13, 16, generator=gen) + 3 * F.one_hot(y, 16), y)
    stats.update(torch.randn(1, 16, generator=gen), torch.tensor([2]))
    _, var, has = stats.angle_moments()
    assert has.tolist() == [True, True, False, False]
    w = torch.tensor([49.0, 49.0])
    pooled = (w * var[:2]).sum() / w.sum()
    v = stats.cloud_variance()
    assert v[2].item() == 0.0  # K_i = 4: unknown until a second angle -> no cloud yet
    assert v[3].item() == pytest.approx(pooled.item(), rel=1e-5)  # one-shot: the prior
    old = ClassStatistics(4, 16, class_counts=counts, unknown_variance="pooled")
    old.load_state_dict(stats.state_dict())
    assert old.cloud_variance()[2].item() == pytest.approx(pooled.item(), rel=1e-5)
    none = ClassStatistics(4, 16, class_counts=counts, unknown_variance="none")
    none.load_state_dict(stats.state_dict())
    assert none.cloud_variance()[2:].tolist() == [0.0, 0.0]
    # a head class right after allocation (no angles yet) gets no cloud either
    fresh = ClassStatistics(4, 16, class_counts=counts)
    fresh.update(torch.randn(1, 16, generator=gen), torch.tensor([0]))
    assert fresh.cloud_variance()[0].item() == 0.0


def test_max_age_drops_stale_angles():
    """Angles older than max_age updates leave the moments; the rest match a brute force."""
    gen = torch.Generator().manual_seed(3)
    stats = ClassStatistics(2, 8, class_counts=[4, 4], max_age=3, gamma=1.0)
    history = []
    for t in range(8):
        y = torch.tensor([0, 0]) if t < 2 else torch.tensor([1, 1])  # class 0 seen early only
        x = torch.randn(2, 8, generator=gen)
        stats.update(x, y)
        history.append((t, y, FC.angles_to_centers(x, stats.centers[y])))
    mean, var, has = stats.angle_moments()
    assert not has[0]  # class 0's angles are 6-7 updates old
    recent = torch.cat([a for t, y, a in history if y[0] == 1][-2:])  # capacity 4 = last 2 updates
    assert has[1]
    torch.testing.assert_close(mean[1], recent.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var[1], recent.var(), rtol=1e-4, atol=1e-6)
    keep = ClassStatistics(2, 8, class_counts=[4, 4], gamma=1.0)
    keep.load_state_dict(stats.state_dict())
    assert keep.angle_moments()[2].tolist() == [True, True]


def test_old_checkpoint_without_new_buffers_loads():
    a = ClassStatistics(2, 4, class_counts=[3, 2])
    a.update(torch.randn(4, 4), torch.tensor([0, 0, 1, 1]))
    sd = {
        k: v
        for k, v in a.state_dict().items()
        if k not in ("num_updates", "center_updates", "memory_stamp", "memory_owner")
    }
    b = ClassStatistics(2, 4, class_counts=[3, 2], max_age=10)
    b.load_state_dict(sd)
    torch.testing.assert_close(b.angle_moments()[1], a.angle_moments()[1])
    assert b.center_updates.tolist() == [10, 10]


def test_vanilla_rule_warns_when_the_counts_leave_no_head_or_no_tail_class():
    """LEAP Eq. 6 moves the head classes' mean variance to the tail: with every class on one
    side of T every cloud is zero, which is said once when the counts are laid out (all-zero
    counts get their own warning instead)."""
    import warnings

    from feature_cloud import LEAPMarginHead

    for counts, missing in (([2, 3, 2, 5], "no head class"), ([30, 25, 40, 21], "no tail class")):
        with pytest.warns(
            UserWarning, match=f"cloud='vanilla' with tail_threshold T=20: {missing}"
        ):
            head = LEAPMarginHead(
                8, 4, cloud="vanilla", tail_threshold=20, class_counts=counts, warmup_steps=0
            )
        x = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
        for _ in range(3):
            head(x, torch.arange(16) % 4)
        assert float(head.statistics.cloud_variance().max()) == 0.0  # what the warning says
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LEAPMarginHead(8, 4, cloud="vanilla", tail_threshold=20, class_counts=[30, 2, 3, 40])
        LEAPMarginHead(8, 4, cloud="full", class_counts=[2, 2, 2, 2])  # no threshold: no warning
    with pytest.warns(UserWarning) as said:  # all-zero counts: that warning, not the rule's
        LEAPMarginHead(8, 4, cloud="vanilla", class_counts=[0, 0, 0, 0])
    assert [str(w.message)[:24] for w in said] == ["class_counts are all 0: "]


def test_equal_class_sizes_get_advice_that_works_and_full_at_one_image_a_class_warns():
    """Every class the same size (VIPeR: 2 images an identity): the vanilla warning advised
    "choose T between the class sizes" (there is one size). It now says no T splits them, what
    cloud='full' does there and to train them as a tail with a head set. At K_i = 1 everywhere
    the full rule's cloud was zero for every class without a word (Eq. 9's weights K_i - 1 are
    all 0): it warns once now, at the user's line, built with counts or counting online."""
    import warnings

    from feature_cloud import LEAPMarginHead

    for k, full in ((2, "only evens the angle variance out"), (1, "cloud='full' is zero too")):
        with pytest.warns(UserWarning) as record:
            LEAPMarginHead(8, 4, cloud="vanilla", class_counts=[k] * 4)
        (message,) = [str(w.message) for w in record]
        assert "all 4 classes have K_i = " + str(k) in message and full in message, message
        assert "no T splits them" in message and "between the class sizes" not in message
        assert "as a tail together with a head set" in message
        assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="no tail to transfer to") as record:
        LEAPMarginHead(8, 4, cloud="vanilla", class_counts=[30] * 4)
    assert "head set" not in str(record[0].message)

    with pytest.warns(
        UserWarning, match="every one of the 3 classes with images has K_i = 1"
    ) as record:
        head = LEAPMarginHead(8, 4, cloud="full", class_counts=[1, 1, 0, 1])
    assert len(record) == 1 and record[0].filename == __file__
    x = torch.nn.functional.normalize(torch.randn(8, 8), dim=1)
    for _ in range(3):
        head(x, torch.arange(8) % 4)
    assert float(head.statistics.cloud_variance().max()) == 0.0  # what the warning says
    online = LEAPMarginHead(8, 4, cloud="full", warmup_steps=1, count_steps=1)
    online(x[:4], torch.arange(4))  # counting: one image a class
    with pytest.warns(UserWarning, match="every one of the 4 classes with images has") as record:
        online(x[:4], torch.arange(4))  # warm-up over: laid out
    assert len(record) == 1 and record[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LEAPMarginHead(8, 4, cloud=None, class_counts=[1] * 4)  # no cloud: nothing to say
        LEAPMarginHead(8, 4, cloud="full", class_counts=[1, 2, 1, 1])  # one class pools
        ClassStatistics(4, 8, class_counts=[1] * 4)  # a cloud's owner says it


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0])
def test_rows_without_a_direction_are_skipped_not_folded_in(bad):
    """An unchecked batch (``validate=False``, or under torch.compile, where the checks do not
    run) with a non-finite row (an fp16 overflow) or an all-zero row: the statistics are those
    of the batch with that row ignored, and stay finite; the head trains on afterwards."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=gen)
    y = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    poisoned = x.clone()
    poisoned[3] = bad if bad == 0.0 else poisoned[3]
    poisoned[3, 1] = bad
    a = ClassStatistics(3, 4, class_counts=[5, 5, 2])
    b = ClassStatistics(3, 4, class_counts=[5, 5, 2])
    for s in (a, b):
        s.update(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), y[:6])
    a.update(poisoned, y, validate=False)
    b.update(x, torch.where(torch.arange(8) == 3, -1, y))
    for k, v in b.state_dict().items():
        assert torch.equal(a.state_dict()[k], v), k

    head = LEAPMarginHead(
        4,
        3,
        "cosface",
        scale=64.0,
        margin=0.35,
        cloud="full",
        class_counts=[5, 5, 2],
        validate=False,
    )
    head(poisoned, y)
    assert all(torch.isfinite(v).all() for v in head.state_dict().values())
    loss = head(x, y)
    assert torch.isfinite(loss) and torch.isfinite(head.eval().logits(x)).all()


@pytest.mark.parametrize("online", [True, False])
def test_a_state_with_an_empty_memory_that_says_it_holds_angles_is_refused(online):
    """s54 ecosystem 6: a state whose angle memory is empty (0 slots) while memory_fill and the
    sums of angles say it holds angles (a torch.func.functional_call loop that carried its state
    through the end of online counting; an edited checkpoint) loaded without a word, and the
    next step laid the memory out afresh, dropping the history. Refused before anything loads;
    a state whose memory was never laid out (online counting, a cloud-less head) still loads."""
    C, D = 10, 8
    gen = torch.Generator().manual_seed(0)
    kw = dict(warmup_steps=2, count_steps=2) if online else dict(class_counts=[6] * C)
    trained = LEAPMarginHead(D, C, scale=24.0, seed=1, **kw)
    y = torch.arange(16) % C
    for _ in range(4):
        trained(torch.randn(16, D, generator=gen), y)
    state = {k: v.clone() for k, v in trained.state_dict().items()}
    p = "feature_cloud.statistics."
    assert int(state[p + "memory_fill"].sum()) > 0
    for k in ("memory", "memory_stamp", "memory_owner"):
        state[p + k] = state[p + k][:0]
    head = LEAPMarginHead(D, C, scale=24.0, seed=1, **kw)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"memory is empty \(0 slots\) but .*memory_fill.*angle_sum"
    ):
        head.load_state_dict(state)
    after = head.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # not laid out yet: empty memory, nothing stored (the warm-up of online counting)
    counting = LEAPMarginHead(D, C, scale=24.0, seed=1, warmup_steps=3, count_steps=3)
    counting(torch.randn(16, D, generator=gen), y)
    assert counting.statistics.memory.numel() == 0
    LEAPMarginHead(D, C, scale=24.0, seed=1, warmup_steps=3, count_steps=3).load_state_dict(
        counting.state_dict()
    )
