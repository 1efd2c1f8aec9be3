"""Every demo metric against a brute-force computation with Python loops."""

import math

import numpy as np
import pytest
import torch

from feature_cloud.demo import metrics as M


def _data(seed=0, n=40, d=6, c=5):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    return f, y


def _cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_correct_predictions():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert M.correct_predictions(logits, torch.tensor([1, 1, 1])).tolist() == [1.0, 0.0, 1.0]


def test_cross_group_predictions():
    head = torch.tensor([True, True, False, False])  # classes 0, 1 head; 2, 3 tail
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],  # head sample, right
            [0.0, 0.9, 0.0, 0.0],  # head sample (label 0) given to head class 1: not cross
            [0.0, 0.0, 0.0, 0.9],  # head sample given to tail class 3
            [0.0, 0.9, 0.0, 0.0],  # tail sample given to head class 1
            [0.0, 0.0, 0.9, 0.0],  # tail sample (label 3) given to tail class 2: not cross
        ]
    )
    labels = torch.tensor([0, 0, 1, 2, 3])
    got = M.cross_group_predictions(logits, labels, head)
    assert got.tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert M.head_tail(got, head[labels]) == {"all": 0.4, "head": 1 / 3, "tail": 0.5}


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_against_brute_force(seed):
    f, y = _data(seed)
    y[0] = 4
    y[1:] = torch.where(y[1:] == 4, torch.zeros_like(y[1:]), y[1:])  # class 4 has one sample
    r1, ap, valid = M.retrieval_per_query(f, y)
    fn, yn = f.numpy().astype(np.float64), y.numpy()
    for q in range(len(yn)):
        others = [j for j in range(len(yn)) if j != q]
        sims = [_cos(fn[q], fn[j]) for j in others]
        ranked = [
            others[k] for k in sorted(range(len(others)), key=lambda k: (-sims[k], others[k]))
        ]
        rel = [int(yn[j] == yn[q]) for j in ranked]
        if sum(rel) == 0:
            assert not valid[q] and r1[q] == 0 and ap[q] == 0
            continue
        hits, precisions = 0, []
        for k, r in enumerate(rel, start=1):
            if r:
                hits += 1
                precisions.append(hits / k)
        assert valid[q]
        assert r1[q] == rel[0]
        assert ap[q] == pytest.approx(sum(precisions) / len(precisions), abs=1e-6)
    assert not valid[0]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("with_cams", [False, True])
def test_verification_tar_against_brute_force(seed, with_cams):
    f, y = _data(seed, n=30)
    cams = torch.arange(30) % 3 if with_cams else None
    fars = [0.01, 0.1, 0.5]
    got = M.verification_tar(f, y, fars, cams)
    fn, yn = f.numpy().astype(np.float64), y.numpy()
    pos, neg = [], []
    for i in range(len(yn)):
        for j in range(i + 1, len(yn)):
            s = _cos(fn[i], fn[j])
            if yn[i] != yn[j]:
                neg.append(s)
            elif not with_cams or cams[i] != cams[j]:
                pos.append(s)
    neg.sort(reverse=True)
    for far in fars:
        threshold = neg[max(1, math.ceil(far * len(neg))) - 1]  # accepts `far` of the negatives
        want = sum(p > threshold for p in pos) / len(pos)
        assert got[far] == pytest.approx(want), far
        assert sum(n > threshold for n in neg) <= far * len(neg)
    assert math.isnan(M.verification_tar(f[:3], torch.tensor([0, 1, 2]), [0.1])[0.1])  # no positive
    with pytest.raises(ValueError, match="far"):
        M.verification_tar(f, y, [0.0])


def test_retrieval_ties_break_by_index():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 0, 1])
    r1, ap, valid = M.retrieval_per_query(f, y)
    # query 0: samples 1 and 2 tie at cos 1; lower index (1, wrong class) comes first
    assert r1[0] == 0 and ap[0] == pytest.approx(0.5)
    # query 2: samples 0 (same class) and 1 tie; 0 comes first
    assert r1[2] == 1
    # query 1: both ties are wrong, its only match (3) is orthogonal and ranks third
    assert r1[1] == 0 and ap[1] == pytest.approx(1 / 3)
    assert valid.all()


def test_nearest_center_against_brute_force():
    f, y = _data(2, n=30)
    q, _ = _data(3, n=12)
    y[y == 3] = 0  # class 3 has no gallery sample and must never win
    pred = M.nearest_center_predictions(q, f, y, 5)
    fn = f.numpy().astype(np.float64)
    fn /= np.linalg.norm(fn, axis=1, keepdims=True)
    for i, row in enumerate(q.numpy().astype(np.float64)):
        best, best_c = -math.inf, None
        for c in range(5):
            members = fn[y.numpy() == c]
            if len(members) == 0:
                continue
            s = _cos(row, members.mean(axis=0))
            if s > best:
                best, best_c = s, c
        assert pred[i] == best_c


def test_test_angle_spread_against_training_centers():
    """Two test images per class are equidistant from their own center (variance 0 always);
    against the training centers the spread is the brute-force one and not 0."""
    f, y = _data(4, n=40, c=4)
    g, z = _data(5, n=12, c=4)
    own = M.angle_spread(g, z, 4)[1]
    assert torch.all(own[~torch.isnan(own)] >= 0)
    centers = M.class_centers(f, y, 4)
    mean, var = M.angle_spread(g, z, 4, centers=centers)
    fn, yn, gn, zn = (t.numpy().astype(np.float64) for t in (f, y, g, z))
    for c in range(4):
        if (zn == c).sum() < 2:
            continue
        unit = fn[yn == c] / np.linalg.norm(fn[yn == c], axis=1, keepdims=True)
        center = unit.mean(axis=0)
        center /= np.linalg.norm(center)
        members = gn[zn == c] / np.linalg.norm(gn[zn == c], axis=1, keepdims=True)
        angles = np.arccos(np.clip(members @ center, -1, 1))
        assert mean[c] == pytest.approx(angles.mean(), abs=1e-5)
        assert var[c] == pytest.approx(angles.var(ddof=1), abs=1e-5)
        assert var[c] > 0
    two = torch.tensor([0, 0])  # exactly two test images: own center gives 0, training center not
    pair = g[:2]
    assert float(M.angle_spread(pair, two, 1)[1][0]) == pytest.approx(0.0, abs=1e-10)
    assert float(M.angle_spread(pair, two, 1, centers=centers[:1])[1][0]) > 0


def test_angle_spread_against_brute_force():
    f, y = _data(4, n=50)
    y[y == 2] = 1
    y[0] = 2  # class 2: a single sample -> NaN
    mean, var = M.angle_spread(f, y, 5)
    fn, yn = f.numpy().astype(np.float64), y.numpy()
    for c in range(5):
        members = fn[yn == c]
        if len(members) < 2:
            assert math.isnan(mean[c]) and math.isnan(var[c])
            continue
        unit = members / np.linalg.norm(members, axis=1, keepdims=True)
        center = unit.mean(axis=0)
        angles = [math.acos(max(-1.0, min(1.0, _cos(u, center)))) for u in unit]
        mu = sum(angles) / len(angles)
        v = sum((a - mu) ** 2 for a in angles) / (len(angles) - 1)
        assert mean[c] == pytest.approx(mu, abs=1e-5)
        assert var[c] == pytest.approx(v, abs=1e-5)


def test_weight_norms_and_group_means():
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0]])
    assert M.weight_norms(w).tolist() == pytest.approx([5.0, 1.0, math.sqrt(2)])
    values = torch.tensor([1.0, 2.0, float("nan"), 4.0])
    head = torch.tensor([True, False, False, True])
    out = M.head_tail(values, head)
    assert out == {
        "all": pytest.approx(7 / 3),
        "head": pytest.approx(2.5),
        "tail": pytest.approx(2.0),
    }
    valid = torch.tensor([True, False, True, True])
    assert math.isnan(M.head_tail(values, head, valid)["tail"])


def test_accuracy_plot_error_bars_std_or_t_interval(tmp_path, monkeypatch):
    """The demo's bars show the sample std over seeds; the evaluation tool's, given its
    ``t_quantile``, the 95% t-interval's half-width, as its tables do."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    from feature_cloud.demo import plots
    from feature_cloud.evaluate.stats import t_interval, t_quantile

    heads = [0.50, 0.60, 0.70]
    runs = [
        {
            "method": "m",
            "metrics": {"fc_acc_head": h, "fc_acc_tail": 0.2, "rank1_head": h, "rank1_tail": 0.1},
        }
        for h in heads
    ]
    results = {
        "methods": ["m"],
        "runs": runs,
        "config": {"seeds": [0, 1, 2]},
        "data": {"name": "toy"},
    }
    seen = []
    bar = Axes.bar

    def record(self, x, height, *args, yerr=None, **kwargs):
        seen.append(list(yerr))
        return bar(self, x, height, *args, yerr=yerr, **kwargs)

    monkeypatch.setattr(Axes, "bar", record)
    plots.plot_accuracy(results, str(tmp_path / "a.png"))
    assert seen[0] == pytest.approx([100 * float(np.std(heads, ddof=1))])
    seen.clear()
    plots.plot_accuracy(results, str(tmp_path / "b.png"), t_quantile=t_quantile)
    assert seen[0] == pytest.approx([100 * t_interval(heads)[1]])
    assert seen[1] == pytest.approx([0.0], abs=1e-9)  # the same tail accuracy every seed
    assert (tmp_path / "b.png").stat().st_size > 0


def test_accuracy_plot_title_counts_the_runs_not_the_configured_seeds(tmp_path, monkeypatch):
    """A partial or pooled evaluation's bars stand on the runs it has: the title said "over
    {len(config.seeds)} seeds" (a statistics audit, s53)."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from feature_cloud.demo import plots

    metrics = {"fc_acc_head": 0.5, "fc_acc_tail": 0.2, "rank1_head": 0.5, "rank1_tail": 0.1}
    titles = []
    title = Figure.suptitle

    def record(self, text, *args, **kwargs):
        titles.append(text)
        return title(self, text, *args, **kwargs)

    monkeypatch.setattr(Figure, "suptitle", record)
    for runs, want in (({"a": 2, "b": 2}, "over 2 seeds)"), ({"a": 3, "b": 2}, "over 2-3 seeds")):
        results = {
            "methods": ["a", "b"],
            "runs": [{"method": m, "metrics": metrics} for m, n in runs.items() for _ in range(n)],
            "config": {"seeds": [0, 1, 2, 3, 4]},
            "data": {"name": "toy"},
        }
        plots.plot_accuracy(results, str(tmp_path / "a.png"))
        assert want in titles[-1], titles[-1]
        assert "5 seeds" not in titles[-1]


def test_per_class_plot_shows_rounding_noise_as_zero(tmp_path, monkeypatch):
    """Classes of two training images: both lie at one angle from their mean, so the angle
    variance is rounding noise (~1e-30); the plot's axis spanned that noise (a 1e-29 scale, found
    in a re-ID trial) where the tables show 0.0000. Real values keep their place."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from feature_cloud.demo import plots

    figures = []
    savefig = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    split = {"train_counts": [2, 2, 2, 9], "head": [False, False, False, True]}
    for values, top in (([3e-30, -1e-31, 7e-29, None], 0.1), ([3e-30, 0.02, 0.5, 0.01], 0.6)):
        results = {
            "methods": ["m"],
            "runs": [{"method": "m", "seed": 0, "per_class": {"angle_var_train": values}}],
            "splits": {"0": split},
        }
        plots.plot_per_class(results, "angle_var_train", "v", "t", str(tmp_path / "p.png"))
        low, high = figures[-1].axes[0].get_ylim()
        assert -0.1 <= low < 0.0 < high <= top, (values, low, high)
        ys = np.concatenate([c.get_offsets()[:, 1] for c in figures[-1].axes[0].collections])
        assert sorted(ys) == sorted(0.0 if abs(v) < 1e-12 else v for v in values if v is not None)


def test_counted_nouns_agree_with_their_number():
    from feature_cloud.demo.report import counted

    assert [counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]


def test_wrote_line_names_the_runs_own_files_too(tmp_path):
    from feature_cloud.demo.report import wrote_line

    (tmp_path / "results.json").write_text("{}")
    line = wrote_line({"summary.md": str(tmp_path / "summary.md")}, str(tmp_path))
    assert line == f"wrote results.json, summary.md to {tmp_path}"


def test_verification_tar_accepts_as_many_impostors_as_the_far_allows():
    """The threshold accepted one impostor fewer than the FAR allows where ``far * n_neg`` is a
    whole number (``ceil``), and with fewer than ``1 / far`` impostor pairs it reported the TAR
    at FAR 0. Scores built by hand: 1 genuine pair at 0.5, 10 impostor pairs at 0.9, 0.8, 0.4,
    ... (four images of identities 0, 0, 1, 2 plus more singletons)."""
    import torch

    from feature_cloud.demo.metrics import verification_tar

    # 2-D features at chosen angles: genuine pair (0, 1) cosine 0.5
    angles = torch.tensor([0.0, 1.0471976, 0.4510268, 2.0, 2.6, 3.1])
    f = torch.stack([angles.cos(), angles.sin()], dim=1)
    y = torch.tensor([0, 0, 1, 2, 3, 4])
    sim = f @ f.T
    i, j = torch.triu_indices(6, 6, offset=1)
    neg = sim[i, j][y[i] != y[j]]
    n_neg = neg.numel()  # 14
    genuine = float(sim[0, 1])
    above = int((neg > genuine).sum())  # impostors scoring above the genuine pair
    assert above >= 1
    far = above / n_neg  # exactly `above` impostors allowed: the genuine pair is accepted
    assert verification_tar(f, y, [far])[far] == 1.0
    tighter = (above - 0.5) / n_neg  # one impostor fewer allowed: rejected
    assert verification_tar(f, y, [tighter])[tighter] == 0.0
    tiny = 0.5 / n_neg  # not one impostor allowed: cannot be measured
    assert math.isnan(verification_tar(f, y, [tiny])[tiny])
