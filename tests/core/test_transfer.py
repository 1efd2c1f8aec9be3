"""FeatureTransfer and the FTL functions: Eq. 5 centers, streaming covariance / PCA, hard list, Eq. 6."""

from __future__ import annotations

import warnings

import pytest
import torch

import feature_cloud.functional as FC
from feature_cloud import FeatureBatch, FeatureTransfer


def _batches(g, y, sizes, idx=None, flipped=None, keep=None):
    out, pos = [], 0
    for b in sizes:
        sl = slice(pos, pos + b)
        out.append(
            FeatureBatch(
                g[sl],
                y[sl],
                None if idx is None else idx[sl],
                None if flipped is None else flipped[sl],
                None if keep is None else keep[sl],
            )
        )
        pos += b
    assert pos == g.shape[0]
    return out


def _random_longtail(seed=0, d=8, n_reg=5, n_tail=4, per_reg=40, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    counts = [per_reg + 3 * i for i in range(n_reg)] + [2 + (i % 4) for i in range(n_tail)]
    mu = torch.randn(n_reg + n_tail, d, generator=gen, dtype=torch.float64) * 4
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64)
    g = torch.cat(
        [
            mu[c] + torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix
            for c, n in enumerate(counts)
        ]
    )
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    perm = torch.randperm(len(y), generator=gen)
    return g[perm].to(dtype), y[perm], torch.tensor(counts)


# ----------------------------------------------------------------------------- Eq. 6
def test_transfer_eq6_hand_made():
    # regular class 0: residuals only along e1 -> Q = e1; tail class 1 center (5, 5, 6)
    g = torch.tensor([[0.0, 1, 0], [2, 1, 0], [0, 1, 0], [2, 1, 0], [5, 5, 5], [5, 5, 7]])
    y = torch.tensor([0, 0, 0, 0, 1, 1])
    ft = FeatureTransfer(3, 2, num_components=1, regular_mask=torch.tensor([True, False]))
    ft.update_stats([(g, y)])
    torch.testing.assert_close(ft.centers, torch.tensor([[1.0, 1, 0], [5, 5, 6]]))
    torch.testing.assert_close(ft.basis.abs(), torch.tensor([[1.0], [0], [0]]))
    g_r = torch.tensor([[2.0, 1, 0], [2, 3, -4], [-1, 1, 0]])
    y_r = torch.tensor([0, 0, 0])
    y_t = torch.tensor([1, 1, 1])
    out = ft.transfer(g_r, y_r, y_t)
    # c_tail + QQ^T (g - c_reg): only the e1 part of the residual (1, 0, 0), (1, 2, -4), (-2, 0, 0)
    expected = torch.tensor([[6.0, 5, 6], [6, 5, 6], [3, 5, 6]])
    torch.testing.assert_close(out, expected)
    # the Algorithm-1 Transfer() box (indices swapped) would land near the regular center instead
    swapped = ft.centers[y_r] + (g_r - ft.centers[y_t]) @ ft.basis @ ft.basis.T
    assert not torch.allclose(swapped, expected)


def test_transfer_keeps_tail_center_and_carries_projected_residual():
    g, y, counts = _random_longtail(seed=1, d=6)
    ft = FeatureTransfer(6, len(counts), num_components=3, class_counts=counts, tail_threshold=20)
    ft.update_stats(_batches(g, y, [50, 50, len(y) - 100]))
    reg = ft.regular[y]
    g_r, y_r = g[reg], y[reg]
    y_t = torch.full_like(y_r, int((~ft.regular).nonzero()[0]))
    out = ft.transfer(g_r, y_r, y_t)
    q = ft.basis
    # residual w.r.t. the tail center equals the projected regular residual
    torch.testing.assert_close(
        out - ft.centers[y_t], (g_r - ft.centers[y_r]) @ q @ q.T, rtol=1e-5, atol=1e-5
    )
    # the transferred residual lies in span(Q): projecting again changes nothing
    res = out - ft.centers[y_t]
    torch.testing.assert_close(res @ q @ q.T, res, rtol=1e-5, atol=1e-5)
    # residuals of each regular class average to zero, so the transferred cloud is centred on c_tail
    per_class = torch.stack([out[y_r == c].mean(0) for c in y_r.unique()])
    torch.testing.assert_close(
        per_class, ft.centers[y_t[0]].expand_as(per_class), rtol=1e-4, atol=1e-4
    )


def test_transfer_is_differentiable_wrt_g():
    g, y, counts = _random_longtail(seed=2, d=5, dtype=torch.float64)
    ft = FeatureTransfer(5, len(counts), num_components=2, class_counts=counts).double()
    ft.update_stats([(g, y)])
    reg = ft.regular[y]
    g_r = g[reg][:7].clone().requires_grad_(True)
    y_r = y[reg][:7]
    y_t = torch.full_like(y_r, int((~ft.regular).nonzero()[0]))
    assert torch.autograd.gradcheck(lambda x: ft.transfer(x, y_r, y_t), (g_r,))
    ft.transfer(g_r, y_r, y_t).sum().backward()
    q = ft.basis.double()
    torch.testing.assert_close(g_r.grad, (torch.ones(7, 5, dtype=torch.float64) @ q @ q.T))


def test_transfer_under_bf16_autocast_computes_in_float32():
    """FTL trial: a bf16 ``g`` (autocast or a bf16 model) cast the centers and ``Q`` down to
    bf16 for Eq. 6 (0.9 % of the residual); computed in float32, returned in ``g``'s dtype
    (only its rounding left)."""
    g, y, counts = _random_longtail(seed=3, d=16)
    ft = FeatureTransfer(16, len(counts), num_components=6, class_counts=counts)
    ft.update_stats([(g, y)])
    reg = ft.regular[y]
    g_r, y_r = g[reg][:32], y[reg][:32]
    y_t = torch.full_like(y_r, int((~ft.regular).nonzero()[0]))
    exact = FC.feature_transfer(g_r.double(), y_r, y_t, ft.centers.double(), ft.basis.double())
    residual = (exact - ft.centers.double()[y_t]).norm()
    for g_in, ctx in ((g_r.bfloat16(), torch.no_grad()), (g_r, torch.autocast("cpu"))):
        with ctx:
            out = ft.transfer(g_in, y_r, y_t)
        assert out.dtype == g_in.dtype
        rounding = (exact.to(out.dtype).double() - exact).norm() / residual  # the dtype's own
        err = (out.double() - exact).norm() / residual  # bf16 math: 0.0050 for 0.0026 here
        assert err <= 1.3 * rounding + 1e-6, (err, rounding)


def test_more_components_than_the_regular_classes_rank_warns():
    """FTL trial: ``num_components`` above the rank of the regular classes' centred features
    (fewer samples than ``D``) was accepted silently: the extra components are arbitrary."""
    g, y, counts = _random_longtail(seed=4, d=16, n_reg=2, per_reg=6)  # 6 + 9 regular samples
    kw = dict(class_counts=counts, tail_threshold=5)
    ft = FeatureTransfer(16, len(counts), num_components=16, **kw)
    with pytest.warns(UserWarning, match=r"num_components=16 exceeds the rank .*at most 13"):
        ft.update_stats([(g, y)])
    fine = FeatureTransfer(16, len(counts), energy=0.95, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fine.update_stats([(g, y)])


# ----------------------------------------------------------------------------- Eq. 5 centers
def test_centers_use_flip_and_quality_filter():
    g = torch.tensor([[1.0, 0], [3, 0], [100, 100], [0, 2], [0, 4]])
    flipped = torch.tensor([[1.0, 2], [3, 2], [100, 100], [0, 0], [0, 0]])
    keep = torch.tensor([True, True, False, False, False])
    y = torch.tensor([0, 0, 0, 1, 1])
    ft = FeatureTransfer(2, 2, num_components=1, regular_mask=torch.tensor([True, False]))
    ft.update_stats([FeatureBatch(g, y, None, flipped, keep)])
    # class 0: (1/(2*2)) * sum over the 2 kept samples of (g + g_flip)
    torch.testing.assert_close(ft.centers[0], torch.tensor([2.0, 1.0]))
    # class 1: no sample passes Omega -> falls back to Eq. 5 over all its samples
    torch.testing.assert_close(ft.centers[1], torch.tensor([0.0, 1.5]))
    # the counts are images (before the filter), not flip views
    assert ft.class_counts.tolist() == [3, 2]


def test_center_functions_match_plain_means():
    g, y, counts = _random_longtail(seed=3)
    sums, w = FC.ftl_center_sums(g, y, len(counts))
    c, has = FC.ftl_centers(sums, w)
    assert has.all()
    ref = torch.stack([g[y == k].double().mean(0) for k in range(len(counts))])
    torch.testing.assert_close(c, ref)


# ----------------------------------------------------------------------------- streaming V and Q
@pytest.mark.parametrize("head", [[7, 13, 1, 60], []])
def test_streaming_pca_equals_eigh_on_full_residual_matrix(head):
    g, y, counts = _random_longtail(seed=4, d=10, n_reg=6, n_tail=5, per_reg=30)
    sizes = head + [len(y) - sum(head)]  # uneven batches, or the whole set at once
    ft = FeatureTransfer(10, len(counts), num_components=4, class_counts=counts, tail_threshold=20)
    ft.update_stats(_batches(g, y, sizes))
    # brute force: the full residual matrix of the regular classes
    g64 = g.double()
    centers = torch.stack([g64[y == k].mean(0) for k in range(len(counts))])
    reg = counts[y] > 20
    r = g64[reg] - centers[y[reg]]
    cov = r.T @ r / r.shape[0]
    torch.testing.assert_close(ft.covariance, cov)
    evals, evecs = torch.linalg.eigh(cov)
    q_ref = evecs.flip(1)[:, :4]
    torch.testing.assert_close(ft.eigenvalues, evals.flip(0))
    # same subspace and same vectors up to sign
    torch.testing.assert_close(
        (ft.basis.double() @ ft.basis.double().T), q_ref @ q_ref.T, rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        (ft.basis.double() * q_ref).sum(0).abs(),
        torch.ones(4, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )
    # the numpy route agrees as well
    np_evals = torch.from_numpy(__import__("numpy").linalg.eigvalsh(cov.numpy()))
    torch.testing.assert_close(ft.eigenvalues, np_evals.flip(0))


def test_energy_selection_is_smallest_k_reaching_fraction():
    g, y, counts = _random_longtail(seed=5, d=12, n_reg=6, per_reg=40)
    ft = FeatureTransfer(12, len(counts), energy=0.9, class_counts=counts)
    ft.update_stats([(g, y)])
    lam = ft.eigenvalues
    frac = torch.cumsum(lam, 0) / lam.sum()
    k_ref = int((frac < 0.9).sum()) + 1
    assert ft.num_components == k_ref
    assert ft.explained_energy >= 0.9 > float(frac[k_ref - 2])
    assert FC.ftl_num_components(torch.tensor([3.0, 1.0, 0.0]), 1.0) == 2


def test_streaming_covariance_is_sound_for_large_offsets():
    # features with a huge common offset: a sum(gg^T) - n cc^T one-pass formula loses every digit
    gen = torch.Generator().manual_seed(6)
    y = torch.arange(3).repeat_interleave(500)
    g = 1e6 + torch.randn(1500, 4, generator=gen, dtype=torch.float64) * torch.tensor(
        [1.0, 0.5, 0.1, 0.01], dtype=torch.float64
    )
    ft = FeatureTransfer(
        4, 3, num_components=2, class_counts=torch.tensor([500, 500, 500])
    ).double()
    ft.update_stats(_batches(g, y, [100] * 15))
    centers = torch.stack([g[y == k].mean(0) for k in range(3)])
    r = g - centers[y]
    torch.testing.assert_close(ft.covariance, r.T @ r / 1500, rtol=1e-6, atol=1e-12)


# ----------------------------------------------------------------------------- hard list
def test_hard_list_equals_brute_force_definition():
    g, y, counts = _random_longtail(seed=7, d=6, n_reg=5, n_tail=6, per_reg=35)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randperm(10_000, generator=gen)[: len(y)]  # arbitrary dataset indices
    ft = FeatureTransfer(6, len(counts), num_components=3, class_counts=counts)
    ft.update_stats(_batches(g, y, [33, 1, 100, len(y) - 134], idx=idx))
    g64 = g.double()
    centers = torch.stack([g64[y == k].mean(0) for k in range(len(counts))])
    expected = set()
    for k in range(len(counts)):
        if counts[k] <= 20:
            continue
        members = (y == k).nonzero().flatten()
        dist = (g64[members] - centers[k]).norm(dim=1)
        d_k = dist.mean()
        expected |= {int(idx[m]) for m, dd in zip(members, dist) if dd > d_k}
    assert set(ft.hard_indices.tolist()) == expected
    assert len(ft.hard_indices) == len(expected)
    lab = dict(zip(idx.tolist(), y.tolist()))
    assert [lab[i] for i in ft.hard_indices.tolist()] == ft.hard_labels.tolist()
    # the long-tail pool: every sample of a class with <= 20 images, nothing else
    assert set(ft.tail_indices.tolist()) == {
        int(idx[m]) for m in range(len(y)) if counts[y[m]] <= 20
    }
    assert all(counts[c] <= 20 for c in ft.tail_labels.tolist())


def test_stream_positions_are_indices_when_not_given():
    g, y, counts = _random_longtail(seed=8)
    a = FeatureTransfer(8, len(counts), num_components=2, class_counts=counts)
    a.update_stats(_batches(g, y, [10, len(y) - 10]))
    b = FeatureTransfer(8, len(counts), num_components=2, class_counts=counts)
    b.update_stats(_batches(g, y, [10, len(y) - 10], idx=torch.arange(len(y))))
    assert torch.equal(a.hard_indices, b.hard_indices)


# ----------------------------------------------------------------------------- split, state, errors
def test_regular_split_by_threshold_counts_or_mask():
    g, y, counts = _random_longtail(seed=9)
    ft = FeatureTransfer(8, len(counts), num_components=2)  # counted online
    ft.update_stats([(g, y)])
    assert torch.equal(ft.class_counts, counts)
    assert torch.equal(ft.regular, counts > 20)
    ft2 = FeatureTransfer(8, len(counts), num_components=2, class_counts=counts, tail_threshold=44)
    assert ft2.regular.tolist() == (counts > 44).tolist()
    mask = torch.zeros(len(counts), dtype=torch.bool)
    mask[0] = True
    ft3 = FeatureTransfer(8, len(counts), num_components=2, regular_mask=mask)
    ft3.update_stats([(g, y)])
    assert ft3.regular.tolist() == mask.tolist()
    assert set(ft3.hard_labels.tolist()) == {0}


def test_state_dict_round_trip():
    g, y, counts = _random_longtail(seed=10)
    ft = FeatureTransfer(8, len(counts), energy=0.8, class_counts=counts)
    ft.update_stats([(g, y)])
    state = ft.state_dict()
    for key in (
        "centers",
        "covariance",
        "basis",
        "hard_indices",
        "tail_indices",
        "regular",
        "eigenvalues",
    ):
        assert key in state
    fresh = FeatureTransfer(8, len(counts), energy=0.8, class_counts=counts)
    assert not fresh.ready
    fresh.load_state_dict(state)
    assert fresh.ready and fresh.num_components == ft.num_components
    assert torch.equal(fresh.hard_indices, ft.hard_indices)
    reg = ft.regular[y]
    y_t = torch.full((int(reg.sum()),), int((~ft.regular).nonzero()[0]))
    torch.testing.assert_close(
        fresh.transfer(g[reg], y[reg], y_t), ft.transfer(g[reg], y[reg], y_t)
    )
    with pytest.raises(ValueError, match="feature_dim"):
        FeatureTransfer(9, len(counts)).load_state_dict(state)
    # statistics of another number of classes are refused before a data-sized buffer changes
    other = FeatureTransfer(8, len(counts) + 1, energy=0.8, class_counts=list(counts) + [3])
    other.update_stats([(g, y)])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint class_counts has shape .*num_classes="):
        other.load_state_dict(state)
    after = other.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda s: s["centers"].fill_(float("nan")), "non-finite centers"),
        (lambda s: s["basis"].fill_(float("inf")), "non-finite basis"),
        (lambda s: s["hard_labels"].fill_(99), r"hard_labels outside \[0, "),
        (lambda s: s["hard_indices"].fill_(-5), "negative hard_indices"),
        (lambda s: s.update(hard_labels=s["hard_labels"][:1]), "hard_indices and hard_labels"),
        (lambda s: s["class_counts"].fill_(-3), "negative class_counts"),
        (lambda s: s.update(basis=torch.randn(8, 11)), "basis has 11 components"),
    ],
    ids=["nan-centers", "inf-basis", "labels", "indices", "lengths", "counts", "k>D"],
)
def test_a_damaged_checkpoint_is_refused_before_anything_changes(edit, match):
    """Attack trial s58: FeatureTransfer checked shapes only: NaN centers (every transferred
    feature NaN), an inf basis, hard labels outside the classes, negative indices, lists of
    unequal lengths, negative counts and a basis wider than D loaded silently (the head's
    statistics refuse theirs). Refused by name, the module left as it was, as the head's."""
    g, y, counts = _random_longtail(seed=10)
    ft = FeatureTransfer(8, len(counts), energy=0.8, class_counts=counts)
    ft.update_stats([(g, y)])
    state = {k: v.clone() for k, v in ft.state_dict().items()}
    edit(state)
    other = FeatureTransfer(8, len(counts), energy=0.9, class_counts=counts)
    other.update_stats([(g[: len(g) // 2], y[: len(y) // 2])])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=f"{match}.*damaged or was edited"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert all(after[k].shape == v.shape and torch.equal(after[k], v) for k, v in before.items())
    FeatureTransfer(8, len(counts), energy=0.8, class_counts=counts).load_state_dict(
        ft.state_dict()
    )  # the undamaged one loads


def test_bad_configuration_fails_clearly():
    with pytest.raises(ValueError, match="k > D"):
        FeatureTransfer(4, 3, num_components=5)
    with pytest.raises(ValueError, match="not both"):
        FeatureTransfer(4, 3, num_components=2, energy=0.9)
    with pytest.raises(ValueError, match="energy"):
        FeatureTransfer(4, 3, energy=1.5)
    with pytest.raises(ValueError, match="no regular class"):
        FeatureTransfer(4, 3, class_counts=[5, 20, 3])
    with pytest.raises(ValueError, match="class_counts"):
        FeatureTransfer(4, 3, class_counts=[5, 20])


def test_update_stats_errors_leave_state_untouched():
    g, y, counts = _random_longtail(seed=11)
    ft = FeatureTransfer(8, len(counts), num_components=3)
    ft.update_stats([(g, y)])
    before = {k: v.clone() for k, v in ft.state_dict().items()}

    def unchanged():
        after = ft.state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)

    small = y >= 5  # only tail classes -> empty regular set
    with pytest.raises(ValueError, match="empty regular set"):
        ft.update_stats([(g[small], y[small])])
    unchanged()
    bad = y.clone()
    bad[3] = len(counts)
    with pytest.raises(ValueError, match="labels must lie"):
        ft.update_stats([(g, y), (g, bad)])
    unchanged()
    with pytest.raises(ValueError, match="shape"):
        ft.update_stats([(g[:, :5], y)])
    unchanged()
    with pytest.raises(TypeError, match="twice"):
        ft.update_stats(iter([(g, y)]))
    with pytest.raises(TypeError, match="twice"):
        ft.update_stats(b for b in [(g, y)])
    unchanged()
    passes = iter([[(g, y)], [(g[:-1], y[:-1])]])
    with pytest.raises(ValueError, match="same samples"):
        ft.update_stats(lambda: next(passes))
    unchanged()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    passes = iter([[(g, y)], [(g[perm], y[perm])]])  # a shuffling loader, no indices
    with pytest.raises(ValueError, match="shuffling loader"):
        ft.update_stats(lambda: next(passes))
    unchanged()
    idx = torch.arange(len(y))  # with dataset indices a shuffled second pass is fine
    passes = iter([[(g, y, idx)], [(g[perm], y[perm], idx[perm])]])
    fresh = FeatureTransfer(8, len(counts), num_components=3)
    fresh.update_stats(lambda: next(passes))
    assert torch.equal(y[fresh.hard_indices], fresh.hard_labels)
    nan = g.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ft.update_stats([(nan, y)])
    unchanged()
    with pytest.raises(ValueError, match="empty stream"):
        ft.update_stats([])
    unchanged()


def test_compute_stats_changes_nothing_and_commit_takes_them_all():
    """update_stats = commit_stats(compute_stats(...)): the passes alone change no buffer (data
    parallel, the ranks agree in between), the commit gives update_stats' state and summary."""
    g, y, counts = _random_longtail(seed=12)
    ft = FeatureTransfer(8, len(counts), energy=0.9)
    before = {k: v.clone() for k, v in ft.state_dict().items()}
    stats = ft.compute_stats([(g, y)])
    assert all(torch.equal(before[k], v) for k, v in ft.state_dict().items())
    assert not ft.ready
    summary = ft.commit_stats(stats)
    ref = FeatureTransfer(8, len(counts), energy=0.9)
    assert ref.update_stats([(g, y)]) == summary
    assert summary["num_regular_classes"] == 5 and summary["num_tail_classes"] == 4
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ft.state_dict()[k]), k


def test_transfer_label_errors():
    g, y, counts = _random_longtail(seed=12)
    ft = FeatureTransfer(8, len(counts) + 1, num_components=2)  # the last class is never seen
    with pytest.raises(RuntimeError, match="update_stats"):
        ft.transfer(g[:2], y[:2], y[:2])
    ft.update_stats([(g, y)])
    reg_class = int(ft.regular.nonzero()[0])
    tail_class = int((~ft.regular & ft.has_center).nonzero()[0])
    g2 = g[:2]
    with pytest.raises(ValueError, match="lie in"):
        ft.transfer(g2, torch.tensor([reg_class, 99]), torch.tensor([tail_class, tail_class]))
    with pytest.raises(ValueError, match="y_regular must be regular"):
        ft.transfer(g2, torch.tensor([tail_class, reg_class]), torch.tensor([reg_class, reg_class]))
    with pytest.raises(ValueError, match="no center"):
        ft.transfer(
            g2, torch.tensor([reg_class, reg_class]), torch.tensor([tail_class, len(counts)])
        )
    with pytest.raises(ValueError, match="shape"):
        ft.transfer(g2, torch.tensor([reg_class]), torch.tensor([tail_class]))
    with pytest.raises(ValueError, match="shape"):
        ft.transfer(g[:2, :3], torch.tensor([reg_class] * 2), torch.tensor([tail_class] * 2))
    with pytest.raises(TypeError, match="integer"):
        ft.transfer(g2, torch.tensor([0.0, 1.0]), torch.tensor([tail_class] * 2))
    out = ft.transfer(g2[:0], y[:0], y[:0])
    assert out.shape == (0, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    g, y, counts = _random_longtail(seed=13)
    cpu = FeatureTransfer(8, len(counts), num_components=3, class_counts=counts)
    cpu.update_stats([(g, y)])
    gpu = FeatureTransfer(8, len(counts), num_components=3, class_counts=counts).cuda()
    gpu.update_stats([(g.cuda(), y.cuda())])
    torch.testing.assert_close(gpu.covariance.cpu(), cpu.covariance)
    assert torch.equal(gpu.hard_indices.cpu(), cpu.hard_indices)
    reg = cpu.regular[y]
    y_t = torch.full((int(reg.sum()),), int((~cpu.regular).nonzero()[0]))
    torch.testing.assert_close(
        gpu.transfer(g[reg].cuda(), y[reg].cuda(), y_t.cuda()).cpu(),
        cpu.transfer(g[reg], y[reg], y_t),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("where", ["load", "update_stats"])
def test_statistics_loaded_or_computed_in_inference_mode_train_outside_it(where):
    """s54 ecosystem 7: a load inside ``torch.inference_mode()`` (an eval or serving helper)
    made the resized buffers (basis, hard / tail lists) inference tensors, and the stage-1
    transfer's backward failed with torch's message, naming no buffer; statistics computed
    there (update_stats) did the same. They are normal tensors, as torch's own loads leave."""
    g, y, counts = _random_longtail()
    source = FeatureTransfer(8, len(counts), class_counts=counts, num_components=2)
    source.update_stats([(g, y)])
    ft = FeatureTransfer(8, len(counts), class_counts=counts, num_components=2)
    with torch.inference_mode():
        if where == "load":
            ft.load_state_dict(source.state_dict())
        else:
            ft.update_stats([(g, y)])
    assert [n for n, b in ft.named_buffers() if b.is_inference()] == []
    g_r = g[y == 0][:4].clone().requires_grad_()
    out = ft.transfer(g_r, y[y == 0][:4], torch.full((4,), len(counts) - 1))
    out.sum().backward()
    assert g_r.grad is not None
    torch.testing.assert_close(out, source.transfer(g_r, y[y == 0][:4], torch.full((4,), 8)))
