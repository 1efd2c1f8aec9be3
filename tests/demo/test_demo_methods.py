"""The demo's methods: every one trains on the same budget from the same initial backbone."""

import pytest
import torch

from feature_cloud.demo.data import SyntheticConfig, make_synthetic
from feature_cloud.demo.methods import METHODS, MethodConfig, build_method
from feature_cloud.demo.protocol import long_tail_split
from feature_cloud.demo.runner import DemoConfig, steps_per_epoch, train_method


@pytest.fixture(scope="module")
def tiny():
    data = make_synthetic(SyntheticConfig(num_classes=6, max_per_class=30, min_per_class=10))
    split = long_tail_split(data.y, 6, 2, 3, seed=0)
    return data.x[split.train], data.y[split.train], split.train_counts


def test_same_initial_backbone_for_every_method(tiny):
    x, y, counts = tiny
    firsts = []
    for name in METHODS:
        torch.manual_seed(0)
        model = build_method(name, (x.shape[1],), 6, counts, MethodConfig())
        firsts.append(next(model.backbone.parameters()).detach().clone())
    for w in firsts[1:]:
        assert torch.equal(w, firsts[0])


def test_ftl_runs_algorithm_1_within_the_budget(tiny):
    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(warmup_steps=4, ftl_alternations=2, tail_threshold=3)
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    before = model.ftl.classifier.weight.detach().clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = []

    def step(loss):
        calls.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    model.fit(x, y, 13, 8, step)
    assert len(calls) == 13
    # stage 1 ran: the transfer statistics exist and the classifier moved
    assert model.ftl.feature_transfer.ready
    assert not torch.equal(before, model.ftl.classifier.weight)
    assert model.ftl.frozen == ()  # left unfrozen for evaluation
    model.eval()
    with torch.no_grad():
        emb = model.embed(x[:5])
    assert emb.shape == (5, 64) and model.classify(emb).shape == (5, 6)


@pytest.mark.parametrize("name", ["cosface", "ftl"])
def test_train_method_step_count(tiny, name, monkeypatch):
    x, y, counts = tiny
    cfg = DemoConfig(data="synthetic", epochs=2, batch_size=8, seeds=[0]).resolved()
    steps = []
    real_step = torch.optim.Adam.step

    def counting(self, *a, **k):
        steps.append(1)
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    train_method(name, x, y, 6, counts, cfg, seed=0)
    assert len(steps) == 2 * steps_per_epoch(x.shape[0], 8)


@pytest.mark.parametrize("fraction, warmup, expected_stage0", [(0.5, 4, 6), (None, 4, 4)])
def test_ftl_stage0_share_and_per_batch_augmentation(tiny, fraction, warmup, expected_stage0):
    """Stage 0 takes ``ftl_stage0_fraction`` of the budget (``None``: ``warmup_steps``, the old
    rule); ``augment`` is applied to every training batch of every stage."""
    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(
        warmup_steps=warmup, ftl_alternations=1, tail_threshold=3, ftl_stage0_fraction=fraction
    )
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    stages, seen = [], []
    import feature_cloud.demo.methods as methods_module

    real = methods_module.AlternatingScheduler.step

    def spy(self):
        stages.append(self.stage)
        return real(self)

    def augment(xb):
        seen.append(xb.shape[0])
        return -xb

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    try:
        methods_module.AlternatingScheduler.step = spy
        model.fit(x, y, 12, 8, step, augment=augment)
    finally:
        methods_module.AlternatingScheduler.step = real
    assert stages.count(0) == expected_stage0 and len(stages) == 12
    assert stages[expected_stage0] == 1 and stages[-1] == 2
    n1 = stages.count(1)
    assert len(seen) == 12 + n1  # stage 1 augments both its hard and its long-tail batch
    with pytest.raises(ValueError, match="ftl_stage0_fraction"):
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_stage0_fraction=1.0))


def _count_update_stats(monkeypatch):
    """A list that gets one entry per ``FeatureTransfer.update_stats`` call (UpdateStats)."""
    from feature_cloud.transfer import FeatureTransfer

    calls, real_update = [], FeatureTransfer.update_stats

    def update(self, source):
        calls.append(1)
        return real_update(self, source)

    monkeypatch.setattr(FeatureTransfer, "update_stats", update)
    return calls


def _sgd_step_tracking_the_encoder(model):
    """An SGD ``step(loss)`` for ``FTLMethod.fit`` and the list of whether each step moved Enc."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    enc = next(model.ftl.encoder.parameters())
    enc_moved = []

    def step(loss_value):
        before = enc.detach().clone()
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        enc_moved.append(not torch.equal(before, enc))

    return step, enc_moved


def test_ftl_joint_schedule_trains_every_part_on_normal_plus_transferred_batches(tiny, monkeypatch):
    """``ftl_schedule="joint"``: after stage 0 nothing is frozen; every step's R/FC pass holds the
    normal batch (whose rows alone feed a LEAP head's statistics) and as many transferred rows
    labelled with long-tail classes; UpdateStats once an epoch of the joint phase; the budget is
    exact; an unknown schedule is refused."""
    from feature_cloud import FTLModel

    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(
        tail_threshold=3, ftl_stage0_fraction=0.5, ftl_schedule="joint", ftl_classifier="cosface"
    )
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    refreshes, seen = _count_update_stats(monkeypatch), []
    real_loss = FTLModel.classification_loss

    def loss(self, f, labels, stats_rows=None):
        seen.append((labels.clone(), stats_rows))
        return real_loss(self, f, labels, stats_rows)

    monkeypatch.setattr(FTLModel, "classification_loss", loss)
    step, enc_moved = _sgd_step_tracking_the_encoder(model)

    total, batch = 24, 8
    model.train()
    model.fit(x, y, total, batch, step)
    assert len(enc_moved) == total and all(enc_moved)  # Enc trains in every step
    joint = seen[total // 2 :]
    assert len(seen) == total and len(joint) == total // 2
    tail = set(torch.nonzero(counts <= 3).flatten().tolist())
    assert tail and len(tail) < 6
    for labels, rows in joint:
        assert labels.shape[0] == 2 * batch and rows == slice(0, batch)
        assert set(labels[batch:].tolist()) <= tail  # the transferred rows carry tail labels
    per_epoch = x.shape[0] // batch
    assert len(refreshes) == -(-(total // 2) // per_epoch)
    assert model.ftl.frozen == () and model.ftl.feature_transfer.ready
    with pytest.raises(ValueError, match="ftl_schedule"):
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_schedule="paired"))


def _record_stages(monkeypatch):
    """The stage of every ``AlternatingScheduler.step`` call (the step just trained), in order."""
    import feature_cloud.demo.methods as methods_module

    stages = []
    real_step = methods_module.AlternatingScheduler.step

    def spy(self):
        stages.append(self.stage)
        return real_step(self)

    monkeypatch.setattr(methods_module.AlternatingScheduler, "step", spy)
    return stages


def test_ftl_retrain_schedule_is_one_stage_1_after_stage_0(tiny, monkeypatch):
    """``ftl_schedule="retrain"``: stage 0 for ``ftl_stage0_fraction`` of the budget, then one
    stage 1 (Enc and Dec fixed, R/FC on hard + long-tail + transferred batches) to the end: no
    stage 2, one UpdateStats, the budget exact, the encoder untouched after stage 0."""
    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(
        tail_threshold=3, ftl_stage0_fraction=0.5, ftl_schedule="retrain", ftl_classifier="cosface"
    )
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    stages, refreshes = _record_stages(monkeypatch), _count_update_stats(monkeypatch)
    step, enc_moved = _sgd_step_tracking_the_encoder(model)

    total = 20
    model.train()
    model.fit(x, y, total, 8, step)
    assert stages == [0] * (total // 2) + [1] * (total // 2)
    assert len(refreshes) == 1
    assert all(enc_moved[: total // 2]) and not any(enc_moved[total // 2 :])
    assert model.ftl.frozen == ()  # fit() unfreezes at the end


@pytest.mark.parametrize("total", [32, 35])
def test_ftl_stage1_share_splits_each_pair_unequally(tiny, monkeypatch, total):
    """``ftl_stage1_share=0.75``: after stage 0, each of the ``ftl_alternations`` (stage 1,
    stage 2) pairs gives stage 1 three quarters of its steps (UpdateStats at each stage 1, Enc
    fixed there and trained in stages 0 and 2); stage 0 takes what the pairs leave; the budget is
    exact."""
    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(
        tail_threshold=3, ftl_stage0_fraction=0.5, ftl_alternations=2, ftl_stage1_share=0.75
    )
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    stages, refreshes = _record_stages(monkeypatch), _count_update_stats(monkeypatch)
    step, enc_moved = _sgd_step_tracking_the_encoder(model)
    model.train()
    model.fit(x, y, total, 8, step)
    # 32: stage 0 = 16, pairs of 8 = 6 + 2; 35: round(17.5) = 18 warm-up steps leave 17, pairs of
    # 8 = 6 + 2, stage 0 the remaining 19
    s0 = {32: 16, 35: 19}[total]
    s1, s2 = 6, 2
    assert stages == [0] * s0 + ([1] * s1 + [2] * s2) * 2
    assert len(stages) == len(enc_moved) == total
    assert len(refreshes) == 2
    assert enc_moved == [stage != 1 for stage in stages]
    assert model.ftl.frozen == ()


class _Lengths(Exception):
    pass


def _fit_lengths(model, x, total):
    """``(stage0_iters, stage_iters, stage2_iters)`` that ``FTLMethod.fit`` gives its scheduler
    (with ``AlternatingScheduler`` patched to raise them, so nothing trains)."""
    with pytest.raises(_Lengths) as stop:
        model.fit(x, torch.zeros(x.shape[0], dtype=torch.long), total, 8, lambda loss: None)
    return stop.value.args


def test_ftl_stage1_share_default_keeps_the_equal_stage_lengths(tiny, monkeypatch):
    """The default ``ftl_stage1_share=0.5`` gives exactly the stage lengths of the releases before
    the option, for every budget (odd pair lengths included, where rounding half of them would
    not), stage 0 fraction and number of pairs; 0.75 follows the documented split."""
    import feature_cloud.demo.methods as methods_module

    class Capture(methods_module.AlternatingScheduler):
        def __init__(self, model, **kw):
            raise _Lengths(kw["stage0_iters"], kw["stage_iters"], kw["stage2_iters"])

    monkeypatch.setattr(methods_module, "AlternatingScheduler", Capture)
    x, _, counts = tiny
    for fraction, warmup in ((0.7, 0), (0.5, 0), (None, 7), (None, 40)):
        for pairs in (1, 2, 3):
            cfg = MethodConfig(
                tail_threshold=3,
                warmup_steps=warmup,
                ftl_stage0_fraction=fraction,
                ftl_alternations=pairs,
            )
            equal = build_method("ftl", (x.shape[1],), 6, counts, cfg)
            cfg.ftl_stage1_share = 0.75
            unequal = build_method("ftl", (x.shape[1],), 6, counts, cfg)
            for total in range(1, 61):
                warm = warmup if fraction is None else int(round(fraction * total))
                old = max(1, (total - warm) // (2 * pairs))
                expected = (max(0, total - 2 * pairs * old), old, old)
                assert _fit_lengths(equal, x, total) == expected
                pair = (total - warm) // pairs
                s1 = max(1, round(0.75 * pair))
                s2 = max(1, pair - s1)
                expected = (max(0, total - pairs * (s1 + s2)), s1, s2)
                assert _fit_lengths(unequal, x, total) == expected


def test_ftl_stage1_share_is_validated(tiny):
    """``ftl_stage1_share`` must be in (0, 1), and only the alternating schedule has stage 2 to
    share with: another share with ``joint`` / ``retrain`` is refused (0.5 is fine there)."""
    x, _, counts = tiny
    for share in (0.0, 1.0, -0.25, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ftl_stage1_share must be in"):
            build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_stage1_share=share))
    for schedule in ("joint", "retrain"):
        cfg = MethodConfig(ftl_schedule=schedule, ftl_stage1_share=0.7)
        with pytest.raises(ValueError, match="only applies to ftl_schedule='alternating'"):
            build_method("ftl", (x.shape[1],), 6, counts, cfg)
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_schedule=schedule))
    build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_stage1_share=0.7))


@pytest.mark.parametrize("kind", ["cosface", "arcface"])
def test_ftl_with_a_cosine_margin_classifier_trains_and_drops_ml2(tiny, kind):
    """``ftl_classifier`` gives FTL (and its no-transfer baseline) a cloud-free margin head as
    ``FC``: no m-L2 (the head normalises W and f), Algorithm 1 runs, logits are ``s cos``."""
    from feature_cloud import LEAPMarginHead
    from feature_cloud.evaluate.methods import EVAL_METHODS

    x, y, counts = tiny
    cfg = MethodConfig(warmup_steps=4, tail_threshold=3, ftl_classifier=kind, ml2_alpha=0.5)
    for name in ("ftl", "ftl_base"):
        torch.manual_seed(0)
        backbone = build_method("cosface", (x.shape[1],), 6, counts, cfg).backbone
        model = EVAL_METHODS[name](backbone, 6, counts, cfg)
        head = model.ftl.classifier
        assert isinstance(head, LEAPMarginHead) and head.cloud is None
        assert head.margin_type == kind and model.ftl.alpha_reg == 0.0

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    torch.manual_seed(0)
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    before = model.ftl.classifier.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    model.fit(x, y, 10, 8, step)
    assert model.ftl.feature_transfer.ready
    assert not torch.equal(before, model.ftl.classifier.weight)
    model.eval()
    with torch.no_grad():
        logits = model.classify(model.embed(x[:5]))
    assert logits.shape == (5, 6) and float(logits.abs().max()) <= head.scale + 1e-4
    with pytest.raises(ValueError, match="ftl_classifier"):
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_classifier="svm"))


def test_ftl_cosine_fc_prototypes_train_the_same_and_score_against_the_centers(tiny):
    """``ftl_prototype_shrinkage``: FTL's cosine FC keeps class centers of ``f`` (a cloud of scale
    0) and classifies with the inference prototypes in eval mode; training is bit-identical to
    the plain head (the same weights after Algorithm 1), ``classify_weights`` gives the plain
    logits, and the no-transfer baseline never gets centers."""
    import feature_cloud.functional as FC
    from feature_cloud.evaluate.methods import EVAL_METHODS

    x, y, counts = tiny

    def trained(name, kappa):
        cfg = MethodConfig(warmup_steps=4, tail_threshold=3, ftl_classifier="cosface")
        cfg.ftl_prototype_shrinkage = kappa
        torch.manual_seed(0)
        backbone = build_method("cosface", (x.shape[1],), 6, counts, cfg).backbone
        model = EVAL_METHODS[name](backbone, 6, counts, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)

        def step(loss):
            opt.zero_grad()
            loss.backward()
            opt.step()

        model.train()
        if name == "ftl":
            model.fit(x, y, 12, 8, step)
        else:
            for i in range(0, 48, 8):
                step(model.loss(x[i : i + 8], y[i : i + 8]))
        return model.eval()

    plain, proto = trained("ftl", None), trained("ftl", 10.0)
    assert plain.ftl.classifier.cloud is None
    head = proto.ftl.classifier
    assert head.cloud == "full" and head.feature_cloud.scale == 0.0
    assert head.feature_cloud.prototype_shrinkage == 10.0
    assert torch.equal(plain.ftl.classifier.weight, head.weight)  # the same training
    stats = head.statistics
    assert bool(stats.center_initialized.all())  # every class's centers, stage 0 to 2
    with torch.no_grad():
        f = proto.embed(x[:16])
        assert torch.equal(f, plain.embed(x[:16]))
        expected = FC.center_prototypes(
            head.weight, stats.centers, stats.center_initialized, stats.class_counts, 10.0
        )
        want = FC.cosine_logits(f, expected) * head.scale
        torch.testing.assert_close(proto.classify(f), want)
        torch.testing.assert_close(proto.classify_weights(f), plain.classify(f))
        assert not torch.allclose(proto.classify(f), plain.classify(f))
    base = trained("ftl_base", 10.0)  # the baseline: plain FC whatever the option says
    assert base.ftl.classifier.cloud is None
    with pytest.raises(ValueError, match="ftl_prototype_shrinkage"):
        from feature_cloud.evaluate.runner import EvalConfig

        EvalConfig(ftl_prototype_shrinkage=-1.0).validate()


def test_ftl_with_the_leap_head_as_fc_and_its_plain_baseline(tiny):
    """``ftl_classifier="leap"``: FTL's FC is the LEAP methods' default head (full cloud, warm-up,
    class counts, prototypes; ``leap_options`` apply), its no-transfer baseline the plain margin
    head of the same margin; both start from the same initial weights (R, FC, decoder)."""
    from feature_cloud.evaluate.methods import EVAL_METHODS

    x, y, counts = tiny
    cfg = MethodConfig(warmup_steps=4, tail_threshold=3, ftl_classifier="leap")
    cfg.leap_options = {"cloud_scale": 2.0}
    models = {}
    for name in ("ftl", "ftl_base"):
        torch.manual_seed(0)
        backbone = build_method("cosface", (x.shape[1],), 6, counts, cfg).backbone
        models[name] = EVAL_METHODS[name](backbone, 6, counts, cfg)
    head, base = models["ftl"].ftl.classifier, models["ftl_base"].ftl.classifier
    assert head.cloud == "full" and base.cloud is None
    assert head.margin_type == base.margin_type == cfg.leap_margin
    cloud = head.feature_cloud
    assert cloud.scale == 2.0 and cloud.warmup_steps == 4 and cloud.prototype_shrinkage == 10.0
    assert torch.equal(cloud.statistics.class_counts, counts)
    for a, b in zip(models["ftl"].ftl.parameters(), models["ftl_base"].ftl.parameters()):
        assert torch.equal(a, b)
    opt = torch.optim.SGD(models["ftl"].parameters(), lr=1e-2)

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()

    model = models["ftl"].train()
    model.fit(x, y, 12, 8, step)
    assert int(cloud.step) > 0 and bool(cloud.statistics.center_initialized.any())
    model.eval()
    with torch.no_grad():
        f = model.embed(x[:5])
        assert not torch.allclose(model.classify(f), model.classify_weights(f))
    # the FC's cloud std is reported per class (as for the LEAP methods); the baseline has none
    std = model.per_class_diagnostics()["cloud_std"]
    assert std.shape == (6,) and bool(torch.isfinite(std).all()) and float(std.max()) > 0
    torch.testing.assert_close(std, cloud.statistics.cloud_variance().sqrt())
    assert models["ftl_base"].per_class_diagnostics() == {}


@pytest.mark.parametrize("schedule", ["alternating", "joint"])
def test_ftl_tail_sampling_classes_reaches_the_long_tail_batches(tiny, monkeypatch, schedule):
    """``ftl_tail_sampling="classes"``: FTL's long-tail labels (stage 1's long-tail batch, or the
    joint phase's transferred labels) come from the class-balanced pool; "samples" (default) from
    the long-tail samples themselves; an unknown value is refused."""
    from feature_cloud import ftl as ftl_module

    x, y, counts = tiny
    pools = {}
    for mode in ("samples", "classes"):
        calls = []
        real = ftl_module.class_balanced_pool

        def balanced(indices, labels, calls=calls, real=real):
            calls.append(indices.numel())
            return real(indices, labels)

        monkeypatch.setattr(ftl_module, "class_balanced_pool", balanced)
        torch.manual_seed(0)
        cfg = MethodConfig(
            tail_threshold=3,
            ftl_stage0_fraction=0.5,
            ftl_schedule=schedule,
            ftl_classifier="cosface",
            ftl_tail_sampling=mode,
        )
        model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)

        def step(loss_value):
            opt.zero_grad()
            loss_value.backward()
            opt.step()

        model.train()
        model.fit(x, y, 24, 8, step)
        pools[mode] = len(calls)
    assert pools["samples"] == 0 and pools["classes"] > 0
    with pytest.raises(ValueError, match="ftl_tail_sampling"):
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_tail_sampling="uniform"))


def test_ftl_energy_sets_the_transfer_basis(tiny):
    """``ftl_energy``: FTL's PCA basis keeps the fewest components reaching that share of the
    regular classes' intra-class variance (1.0: all of it); a lower share keeps fewer components
    and transfers a shorter residual; values outside (0, 1] are refused before anything is built."""
    x, y, counts = tiny
    kept, shifts = {}, {}
    for energy in (0.5, 0.95, 1.0):
        torch.manual_seed(0)
        cfg = MethodConfig(tail_threshold=3, ftl_stage0_fraction=0.5, ftl_energy=energy)
        model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)

        def step(loss_value, opt=opt):
            opt.zero_grad()
            loss_value.backward()
            opt.step()

        model.train()
        model.fit(x, y, 24, 8, step)
        transfer = model.ftl.feature_transfer
        assert transfer.energy == energy and transfer.explained_energy >= energy - 1e-6
        kept[energy] = transfer.num_components
        lam = transfer.eigenvalues.clamp_min(0)
        if kept[energy] > 1:  # the fewest components: one less misses the share
            assert float(lam[: kept[energy] - 1].sum() / lam.sum()) < energy
        reg = int(transfer.hard_labels[0])
        tail = int(transfer.tail_labels[0])
        g = transfer.centers[reg : reg + 1] + torch.randn(1, transfer.feature_dim)
        out = transfer.transfer(g, torch.tensor([reg]), torch.tensor([tail]))
        shifts[energy] = float((out - transfer.centers[tail]).norm())
    assert kept[0.5] < kept[0.95] <= kept[1.0]
    assert shifts[0.5] < shifts[1.0]
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="ftl_energy"):
            build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_energy=bad))


@pytest.mark.parametrize("rows", ["all", "tail", "none"])
def test_ftl_stage1_fc_tail_keeps_the_regular_rows(tiny, monkeypatch, rows):
    """``ftl_stage1_fc="tail"``: every stage-1 step leaves the regular classes' FC rows exactly
    as they were (SGD with momentum and weight decay: no gradient, no drift) and moves the
    long-tail rows; ``"none"`` leaves every row (R still trains); ``"all"`` (Algorithm 1) moves
    both; stages 0 and 2 are untouched by it."""
    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(
        tail_threshold=3, ftl_stage0_fraction=0.5, ftl_classifier="cosface", ftl_stage1_fc=rows
    )
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    stages = _record_stages(monkeypatch)
    regular = counts > 3
    assert regular.any() and (~regular).any()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    weight = model.ftl.classifier.weight
    snaps = []  # FC at the start of every step (and at the end)
    filters = []  # R's parameters, likewise

    def snap():
        snaps.append(weight.detach().clone())
        filters.append(torch.cat([p.detach().flatten() for p in model.ftl.filter.parameters()]))

    def step(loss):
        snap()
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    model.fit(x, y, 20, 8, step)
    snap()
    r_steps = [bool((b != a).any()) for a, b in zip(filters, filters[1:])]
    r_moved = [all(m for m, s in zip(r_steps, stages) if s == st) for st in (0, 1)]
    changed = [(b != a).any(dim=1) for a, b in zip(snaps, snaps[1:])]
    moved = [(bool(c[regular].any()), bool(c[~regular].any())) for c in changed]
    stage1 = [m for m, s in zip(moved, stages) if s == 1]
    assert len(stage1) == 5 and all(tail == (rows != "none") for _, tail in stage1)
    assert all(reg == (rows == "all") for reg, _ in stage1)
    assert all(reg and tail for (reg, tail), s in zip(moved, stages) if s == 0)
    assert r_moved[1] and r_moved[0]  # R trains in stage 1 whatever FC does
    with pytest.raises(ValueError, match="ftl_stage1_fc"):
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_stage1_fc="head"))
    with pytest.raises(ValueError, match="joint"):
        build_method(
            "ftl",
            (x.shape[1],),
            6,
            counts,
            MethodConfig(ftl_stage1_fc=rows if rows != "all" else "tail", ftl_schedule="joint"),
        )
    with pytest.raises(ValueError, match="nothing to train in stage 1"):
        build_method(
            "ftl",
            (x.shape[1],),
            6,
            counts,
            MethodConfig(ftl_stage1_fc="none", ftl_stage1_filter="fixed"),
        )


@pytest.mark.parametrize("filt", ["trained", "fixed"])
def test_ftl_stage1_filter_fixed_trains_fc_alone(tiny, monkeypatch, filt):
    """``ftl_stage1_filter="fixed"``: in stage 1 R (parameters and BatchNorm statistics) stays as
    stage 0 left it and FC alone trains (with the retrain schedule: to the end); ``"trained"``
    (Algorithm 1) trains both; stage 0 trains R either way."""
    x, y, counts = tiny
    torch.manual_seed(0)
    cfg = MethodConfig(
        tail_threshold=3,
        ftl_stage0_fraction=0.5,
        ftl_classifier="cosface",
        ftl_schedule="retrain",
        ftl_stage1_filter=filt,
    )
    model = build_method("ftl", (x.shape[1],), 6, counts, cfg)
    stages = _record_stages(monkeypatch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    snaps = []  # (R state, FC) at the start of every step (and at the end)

    def state():
        r = {k: v.detach().clone() for k, v in model.ftl.filter.state_dict().items()}
        return r, model.ftl.classifier.weight.detach().clone()

    def step(loss):
        snaps.append(state())
        opt.zero_grad()
        loss.backward()
        opt.step()

    model.train()
    model.fit(x, y, 20, 8, step)
    snaps.append(state())
    moved = [
        (any(not torch.equal(a[0][k], b[0][k]) for k in a[0]), not torch.equal(a[1], b[1]))
        for a, b in zip(snaps, snaps[1:])
    ]
    assert stages == [0] * 10 + [1] * 10
    assert all(r and fc for (r, fc), s in zip(moved, stages) if s == 0)
    assert all(fc and r == (filt == "trained") for (r, fc), s in zip(moved, stages) if s == 1)
    assert model.ftl.frozen == ()
    with pytest.raises(ValueError, match="ftl_stage1_filter"):
        build_method("ftl", (x.shape[1],), 6, counts, MethodConfig(ftl_stage1_filter="frozen"))
