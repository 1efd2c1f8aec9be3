"""Reliability contract (issue 15): one label-dtype policy, range checks in the fused loss, huge
features, hyper-parameter validation, CLI / report / scheduler errors."""

import copy
import json
import os
import pickle

import pytest
import torch

import feature_cloud.functional as FC
from conftest import assert_same_state, make_batch, state_snapshot
from feature_cloud import FeatureTransfer, LEAPMarginHead, MetricL2, fused
from feature_cloud.statistics import ClassStatistics

B, D, C = 12, 8, 10
COUNTS = [30] * 5 + [3] * 5
INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64]


def _batch(seed=0, b=B, classes=C):
    return make_batch(seed, b, D, classes)


def _head(impl="auto", **kw):
    torch.manual_seed(0)
    kw.setdefault("class_counts", COUNTS)
    return LEAPMarginHead(
        D, C, seed=3, impl=impl, chunk_size=4 if impl == "chunked" else None, **kw
    )


# ------------------------------------------------------------------ item 2: label dtypes


@pytest.mark.parametrize("impl", ["reference", "fused", "chunked"])
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_every_integer_label_dtype_trains_like_int64(impl, dtype):
    ref, other = _head(impl), _head(impl)
    for step in range(3):
        x, y = _batch(step)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        l1, l2 = ref(x1, y), other(x2, y.to(dtype))
        l1.backward()
        l2.backward()
        assert torch.equal(l1.detach(), l2.detach())
        assert torch.equal(x1.grad, x2.grad)
    assert_same_state(state_snapshot(ref), state_snapshot(other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.complex64])
def test_non_integer_labels_raise_type_error_before_any_state_change(dtype):
    for impl in ("reference", "fused"):
        head = _head(impl)
        before = state_snapshot(head)
        x, y = _batch()
        with pytest.raises(TypeError, match="labels must be an integer tensor"):
            head(x, y.to(dtype))
        assert_same_state(before, state_snapshot(head))


def test_statistics_accept_integer_label_dtypes():
    x, y = _batch()
    a = ClassStatistics(C, D, class_counts=COUNTS)
    a.update(x, y)
    for dtype in (torch.uint8, torch.int16, torch.int32):
        b = ClassStatistics(C, D, class_counts=COUNTS)
        b.update(x, y.to(dtype))
        assert_same_state(state_snapshot(a), state_snapshot(b))


def _ftl_stream(label_dtype):
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(4).repeat_interleave(30), torch.arange(4, 8).repeat(3)])
    feats = torch.randn(labels.numel(), D, generator=g) + labels.unsqueeze(1).float()
    idx = torch.arange(labels.numel())
    return [
        (feats[i : i + 32], labels[i : i + 32].to(label_dtype), idx[i : i + 32].to(label_dtype))
        for i in range(0, labels.numel(), 32)
    ]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_feature_transfer_accepts_integer_label_dtypes(dtype):
    ref, other = FeatureTransfer(D, 8, num_components=3), FeatureTransfer(D, 8, num_components=3)
    ref.update_stats(_ftl_stream(torch.int64))
    other.update_stats(_ftl_stream(dtype))
    assert_same_state(state_snapshot(ref), state_snapshot(other))
    g = torch.randn(4, D)
    yr, yt = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    assert torch.equal(ref.transfer(g, yr, yt), other.transfer(g, yr.to(dtype), yt.to(dtype)))
    with pytest.raises(TypeError, match="y_tail must be an integer tensor"):
        other.transfer(g, yr, yt.float())


def test_pml_adapter_accepts_int32_labels():
    pml = pytest.importorskip("feature_cloud.integrations.pml")
    torch.manual_seed(0)
    a = pml.LEAPLoss(C, D, class_counts=COUNTS, seed=1)
    b = copy.deepcopy(a)
    x, y = _batch()
    assert torch.equal(a(x, y), b(x, y.int()))
    assert_same_state(state_snapshot(a), state_snapshot(b))


# ------------------------------------------------------------------ item 4: fused label range


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("bad", [9, 500, -2])
def test_fused_margin_loss_rejects_out_of_range_labels_like_the_reference(bad, chunk_size):
    x = torch.randn(4, D)
    w = torch.randn(5, D)
    y = torch.tensor([0, 1, 2, bad])
    if bad >= 5:
        with pytest.raises((IndexError, RuntimeError)):  # the reference raises
            FC.margin_cross_entropy(FC.margin_logits(FC.cosine_logits(x, w), y), y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        fused.margin_loss(x, w, y, chunk_size=chunk_size)
    # -1 (ignored) stays valid; validate=False (a caller that checked) skips the host sync
    y_ok = torch.tensor([0, 1, 2, -1])
    assert torch.isfinite(fused.margin_loss(x, w, y_ok, chunk_size=chunk_size))
    assert torch.isfinite(fused.margin_loss(x, w, y_ok, chunk_size=chunk_size, validate=False))


# ------------------------------------------------------------------ item 6: huge features


@pytest.mark.parametrize("impl", ["reference", "fused", "chunked"])
@pytest.mark.parametrize(
    "factor", [2.0**66, 2.0**100, 2.0**-100]
)  # exact scalings, ~1e20, 1e30, 1e-30
def test_huge_and_tiny_features_are_normalised_exactly(impl, factor):
    ref, other = _head(impl), _head(impl)
    for step in range(3):  # statistics and the cloud see the same directions
        x, y = _batch(step)
        x1 = x.clone().requires_grad_(True)
        x2 = (x * factor).requires_grad_(True)
        l1, l2 = ref(x1, y), other(x2, y)
        l1.backward()
        l2.backward()
        torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad * factor, x1.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(other.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        other.statistics.angle_sum, ref.statistics.angle_sum, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_features_near_float32s_top_keep_the_statistics_finite(impl):
    """Attack trial s58: rows of norm ~1.5e37 (finite, so validated), 61 of one class in a batch
    of 64, overflowed the batch class mean's sum to inf: NaN loss, inf centers, every later
    batch NaN and the checkpoint refused. Summed at the batch's power-of-two scale, the means are
    the plain ones bit for bit in range and finite up to float32's top."""
    x, y = _batch()
    y = y % 3
    plain = (
        torch.zeros(C, D).index_add_(0, y, x) / torch.bincount(y, minlength=C).clamp_min(1)[:, None]
    )
    means, _ = FC.batch_class_means(x, y)
    assert torch.equal(means, plain[y])
    head = _head(impl, warmup_steps=0)
    big = torch.rand(64, D) + 0.5
    labels = torch.zeros(64, dtype=torch.long)
    labels[-3:] = torch.tensor([1, 2, 3])
    for factor in (1e37, 2e38):
        loss = head(big * factor, labels)
        assert loss.isfinite() and head.statistics.centers.isfinite().all(), factor
        assert head.statistics.cloud_variance().isfinite().all()
    assert head(x, y).isfinite()
    fresh = _head(impl, warmup_steps=0)
    fresh.load_state_dict(head.state_dict())  # finite centers: the checkpoint loads


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_features_of_1e20_give_the_loss_of_their_direction(impl):
    ref, other = _head(impl, cloud=None), _head(impl, cloud=None)
    x, y = _batch()
    torch.testing.assert_close(other(x * 1e20, y), ref(x, y), rtol=1e-5, atol=1e-5)
    big = other(x * 1e20, y).detach()
    zero = other(torch.zeros_like(x), y).detach()  # what an overflowing norm used to give
    assert abs(big.item() - zero.item()) > 0.1


def test_safe_normalize_matches_f_normalize_in_value_and_gradient():
    x = torch.randn(6, 5, dtype=torch.float64)
    x[2] = 0.0
    torch.testing.assert_close(FC.safe_normalize(x), torch.nn.functional.normalize(x, dim=1))
    assert torch.autograd.gradcheck(FC.safe_normalize, (x[[0, 1, 3]].requires_grad_(),))
    big = torch.tensor([[3e20, 4e20]], dtype=torch.float32)
    torch.testing.assert_close(FC.safe_normalize(big), torch.tensor([[0.6, 0.8]]))
    # review: a NaN row stays NaN (the zero-row rule had turned it into a silent zero row)
    nan_row = torch.tensor([[float("nan"), 1.0], [0.0, 0.0], [3.0, 4.0]])
    out = FC.safe_normalize(nan_row)
    assert out[0].isnan().all() and torch.equal(out[1], torch.zeros(2))
    half = torch.zeros(2, 4, dtype=torch.float16)  # float16's eps underflows: 0 / 0 in backward
    half[1] = 1.0
    half.requires_grad_()
    FC.safe_normalize(half).sum().backward()
    assert torch.equal(half.grad[0], torch.zeros(4, dtype=torch.float16))


@pytest.mark.parametrize("impl", ["reference", "fused", "chunked"])
@pytest.mark.parametrize("margin_type", ["cosface", "arcface"])
def test_an_all_zero_feature_row_gets_a_zero_gradient_not_one_over_eps(impl, margin_type):
    """A masked / padded sample (an all-zero row) at s = 64: its gradient was ~1e12
    (``F.normalize``'s ``1 / eps``), ``inf`` in float16, which made the backbone's gradients
    NaN under fp16 autocast even where the mask multiplied it by zero. Now zero; the other
    rows' gradients are those of the batch without the masking."""
    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, margin_type, scale=64.0, cloud=None, impl=impl, chunk_size=4)
    backbone = torch.nn.Linear(3, D)
    img, y = torch.randn(B, 3), make_batch(1, B, D, C)[1]
    mask = torch.ones(B, 1)
    mask[2] = 0.0
    x = backbone(img) * mask
    x.retain_grad()
    head(x, y).backward()
    assert x.grad[2].abs().max() == 0.0
    assert x.grad.abs().max() < 10.0
    assert all(p.grad.isfinite().all() for p in backbone.parameters())
    backbone.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        head(backbone(img) * mask, y).backward()
    assert all(p.grad.isfinite().all() for p in backbone.parameters())


# ------------------------------------------------------------------ item 7: hyper-parameters

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "owner, name, value, exc, match",
    [
        ("head", "scale", NAN, ValueError, "scale must be finite"),
        ("head", "scale", -1.0, ValueError, "scale must be in"),
        ("head", "margin", NAN, ValueError, "margin must be finite"),
        ("head", "margin", "0.2", TypeError, "margin must be a real number"),
        ("head", "impl", "bogus", ValueError, "impl must be one of"),
        ("head", "impl", "chunked", ValueError, "impl='chunked' needs chunk_size"),
        ("head", "chunk_size", -3, ValueError, "chunk_size must be"),
        ("head", "prototype_min_count", 2.5, TypeError, "prototype_min_count"),
        ("head", "margin_type", "arcface", AttributeError, "margin_type is fixed at construction"),
        ("cloud", "mode", "bogus", ValueError, "cloud_mode must be one of"),
        ("cloud", "scale", -1.0, ValueError, "cloud_scale must be in"),
        ("cloud", "scale", NAN, ValueError, "cloud_scale must be finite"),
        ("cloud", "prototype_min_count", None, TypeError, "prototype_min_count"),
        ("cloud", "prototype_min_count", 0, ValueError, "prototype_min_count"),
    ],
)
def test_settings_assigned_after_construction_are_checked_as_the_constructor_checks_them(
    owner, name, value, exc, match
):
    """Reliability trial: ``head.scale = nan`` gave a NaN loss, ``head.impl = "bogus"`` a bare
    KeyError in the next step after the statistics had moved, ``head.margin_type = ...``
    changed the repr and not the loss, and ``head.prototype_min_count`` was a plain attribute
    that changed nothing. Each assignment is checked where it is made; nothing changes."""
    head = _head()
    head(*_batch(0)).backward()
    target = head if owner == "head" else head.feature_cloud
    before, setting = state_snapshot(head), getattr(target, name)
    with pytest.raises(exc, match=match):
        setattr(target, name, value)
    assert getattr(target, name) == setting
    assert_same_state(state_snapshot(head), before, f"after {owner}.{name} = {value!r}")


def test_settings_assigned_after_construction_take_effect():
    """A margin schedule (``head.margin = m``), a new scale, backend or prototype minimum
    act as the same keywords at construction (forwarded to the cloud where they live)."""
    x, y = _batch(1)
    head = _head(cloud=None)
    head.margin, head.scale, head.impl = 0.35, 64.0, "reference"
    built = _head(cloud=None, margin=0.35, scale=64.0, impl="reference")
    torch.testing.assert_close(head(x, y), built(x, y))
    head.chunk_size, head.impl = 4, "chunked"  # chunk_size first: "chunked" needs one
    torch.testing.assert_close(head(x, y), built(x, y), rtol=1e-5, atol=1e-5)
    assert "impl='chunked'" in repr(head) and head.margin_type == "cosface"
    head.prototype_min_count = 5
    assert head.feature_cloud.prototype_min_count == 5 and "prototype_min_count=5" in repr(head)


def test_a_whole_module_pickle_with_plain_setting_attributes_loads():
    """Earlier releases pickled ``scale``, ``margin``, ``impl``, ``chunk_size`` and the
    cloud's ``mode`` / ``scale`` / ``prototype_min_count`` as plain attributes."""
    head = _head()
    x, y = _batch(2)
    state = head.__getstate__()
    for name in ("scale", "margin", "impl", "chunk_size"):
        state[name] = state.pop("_" + name)
    cloud_state = head.feature_cloud.__getstate__()
    for name in ("mode", "scale", "prototype_min_count"):
        cloud_state[name] = cloud_state.pop("_" + name)
    cloud = type(head.feature_cloud).__new__(type(head.feature_cloud))
    cloud.__setstate__(cloud_state)
    state["_modules"] = dict(state["_modules"], feature_cloud=cloud)
    old = LEAPMarginHead.__new__(LEAPMarginHead)
    old.__setstate__(state)
    assert repr(old) == repr(head)
    head.eval(), old.eval()
    torch.testing.assert_close(old.logits(x), head.logits(x))


@pytest.mark.parametrize("prototypes", [False, True])
def test_a_whole_module_pickle_from_before_prototypes_and_imprinting_works(prototypes):
    """Pickles of the releases before the inference prototypes (12-02) or before
    ``prototype_min_count`` and ``imprint_step`` (12-03) lack attributes the cloud reads: they
    loaded, then failed on first use (repr, eval logits, a training step). They get that
    release's behaviour: eval logits on the weights, or every class leaning (one-shot too)."""
    counts = [30] * 5 + [1] * 5  # one-shot classes: prototype_min_count 1 and 2 differ
    head = _head(class_counts=counts)
    x, y = _batch(2)
    head(x, y)  # class centers
    pickled = copy.deepcopy(head)
    cloud, stats = vars(pickled.feature_cloud), vars(pickled.statistics)
    for name in ("_prototype_min_count", "_imprint_step", "_imprinted", "_seed", "_seen"):
        del cloud[name]
    for name in ("_initial_counts", "has_centers", "memory_in_use"):
        del stats[name]
    kappa = cloud.pop("_prototype_shrinkage")
    if prototypes:
        cloud["prototype_shrinkage"] = kappa  # a plain attribute then
    old = pickle.loads(pickle.dumps(pickled))
    then = _head(class_counts=counts, prototype_shrinkage=kappa if prototypes else None)
    then.prototype_min_count = 1
    then.load_state_dict(head.state_dict())
    assert repr(old) == repr(then)
    old.eval(), then.eval(), head.eval()
    torch.testing.assert_close(old.logits(x), then.logits(x), rtol=0, atol=0)
    assert not torch.allclose(old.logits(x), head.logits(x))  # this release's defaults differ
    old.train(), then.train()
    torch.testing.assert_close(old(x, y), then(x, y), rtol=0, atol=0)
    assert old.step == 2


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(scale=NAN), ValueError, "scale must be finite"),
        (dict(scale=INF), ValueError, "scale must be finite"),
        (dict(scale=-1.0), ValueError, "scale must be in"),
        (dict(margin=NAN), ValueError, "margin must be finite"),
        (dict(margin=-INF), ValueError, "margin must be finite"),
        (dict(class_counts=[True] * C), TypeError, "class_counts must hold integers"),
        (dict(class_counts=torch.ones(C, dtype=torch.bool)), TypeError, "class_counts"),
        (dict(class_counts=[1.5] * C), TypeError, "class_counts must hold integers"),
        (dict(class_counts=[3] * (C - 1)), ValueError, "entries"),
        (dict(chunk_size="4"), TypeError, "chunk_size must be an integer"),
        (dict(chunk_size=True), TypeError, "chunk_size must be an integer"),
        (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
        (dict(warmup_steps=NAN), TypeError, "warmup_steps must be an integer"),
        (dict(gamma=NAN), ValueError, "gamma must be finite"),
        (dict(memory_per_sample="2"), TypeError, "memory_per_sample must be an integer"),
        (dict(tail_threshold=-1), ValueError, "tail_threshold must be >= 0"),
        (
            dict(class_counts=None, warmup_steps=4, count_steps="2"),
            TypeError,
            "count_steps must be",
        ),
        (dict(angle_max_age=NAN), TypeError, "max_age must be an integer"),
    ],
)
def test_head_hyper_parameters_are_validated(kwargs, exc, match):
    kwargs.setdefault("class_counts", COUNTS)
    with pytest.raises(exc, match=match):
        LEAPMarginHead(D, C, **kwargs)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((D, -1), ValueError, "num_classes must be >= 1"),
        ((D, 0), ValueError, "num_classes must be >= 1"),
        ((0, C), ValueError, "embedding_size must be >= 1"),
        ((D, "10"), TypeError, "num_classes must be an integer"),
        ((D, 2.5), TypeError, "num_classes must be an integer"),
    ],
)
def test_head_sizes_are_validated(args, exc, match):
    with pytest.raises(exc, match=match):
        LEAPMarginHead(*args, cloud=None)
    with pytest.raises(exc):
        ClassStatistics(args[1], args[0])


@pytest.mark.parametrize(
    "alpha, exc",
    [
        (NAN, ValueError),
        (INF, ValueError),
        (-0.1, ValueError),
        ("0.25", TypeError),
        (True, TypeError),
    ],
)
def test_metric_l2_alpha_is_validated(alpha, exc):
    with pytest.raises(exc, match="alpha"):
        MetricL2(alpha)


def test_other_modules_validate_their_hyper_parameters():
    with pytest.raises(ValueError, match="gamma"):
        ClassStatistics(C, D, gamma=NAN)
    with pytest.raises(TypeError, match="class_counts"):
        ClassStatistics(C, D, class_counts=[False] * C)
    with pytest.raises(TypeError, match="class_counts"):
        FeatureTransfer(D, C, class_counts=[True] * C)
    with pytest.raises(ValueError, match="energy"):
        FeatureTransfer(D, C, energy=NAN)
    with pytest.raises(TypeError, match="num_components"):
        FeatureTransfer(D, C, num_components="3")
    from feature_cloud.distributed import ShardedLEAPMarginHead

    with pytest.raises(ValueError, match="scale"):
        ShardedLEAPMarginHead(D, C, scale=NAN, cloud=None)
    with pytest.raises(ValueError, match="sample_rate"):
        ShardedLEAPMarginHead(D, C, sample_rate=NAN, cloud=None)
    # pad_to is an integer (option-matrix trial: 2.5 was taken and truncated)
    from feature_cloud.sync import SyncedClassStatistics

    with pytest.raises(TypeError, match="pad_to"):
        SyncedClassStatistics(C, D, class_counts=[5] * C, pad_to=2.5)
    with pytest.raises(ValueError, match="pad_to"):
        SyncedClassStatistics(C, D, class_counts=[5] * C, pad_to=-1)
    # named as the user spelt it (review: "max_age must be >= 1", the statistics' own name)
    with pytest.raises(ValueError, match="angle_max_age must be >= 1"):
        LEAPMarginHead(D, C, class_counts=[5] * C, angle_max_age=0)
    with pytest.raises(ValueError, match="num_classes"):
        ShardedLEAPMarginHead(D, -1, cloud=None)


# ------------------------------------------------------------------ item 8: CLI, report, scheduler


def _write(path, text):
    with open(path, "w") as fh:
        fh.write(text)


def test_report_without_data_section_is_a_clear_error(tmp_path, capsys):
    from feature_cloud.cli import main

    results = {"config": {"seeds": [0]}, "methods": [], "runs": [], "splits": {}}
    _write(tmp_path / "results.json", json.dumps(results))
    assert main(["report", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no 'data'" in err and "results.json" in err and "Traceback" not in err


def test_report_json_syntax_error_names_the_file(tmp_path, capsys):
    from feature_cloud.cli import main

    _write(tmp_path / "results.json", '{"config": {"seeds": [0]},')
    assert main(["report", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert os.path.join(str(tmp_path), "results.json") in err and "not valid JSON" in err


def test_report_on_a_binary_file_or_a_multi_setting_folder_says_what_to_give(tmp_path, capsys):
    """``report data.npz`` (a binary file, not a results.json) is one error line, not a codec
    traceback; a folder of setting sub-folders is read as an evaluation of several settings
    (a broken sub-run is named); a folder without any run says so."""
    import numpy as np

    from feature_cloud.cli import main

    np.savez(tmp_path / "data.npz", images=np.full((2, 4, 4, 3), 204, np.uint8))
    assert main(["report", str(tmp_path / "data.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.npz is not text" in err and "not a feature-cloud demo or evaluate run" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    for name in ("H20_S1", "H20_S5"):
        os.makedirs(tmp_path / "ev" / name)
        _write(tmp_path / "ev" / name / "results.json", "{}")
    os.makedirs(tmp_path / "ev" / "logs")  # not a run: not named
    assert main(["report", str(tmp_path / "ev"), "--quiet"]) == 2
    err = capsys.readouterr().err
    # taken as the --out of an evaluation of several settings: the broken run is named
    assert os.path.join("ev", "H20_S1", "results.json") in err and "has no 'config'" in err, err
    assert main(["report", str(tmp_path / "ev" / "logs"), "--quiet"]) == 2
    assert "sub-folders" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "-1"),
        ("--weight-decay", "nan"),
        ("--gamma", "nan"),
        ("--ml2-alpha", "nan"),
        ("--test-fraction", "nan"),
    ],
)
def test_demo_rejects_bad_numbers_before_creating_the_output_folder(
    tmp_path, capsys, option, value
):
    from feature_cloud.cli import main

    out = tmp_path / "never"
    assert main(["demo", "--data", "synthetic", "--quiet", "--out", str(out), option, value]) == 2
    assert not out.exists()
    assert option.lstrip("-").replace("-", "_") in capsys.readouterr().err


def test_demo_rejects_more_head_identities_than_the_data_has_before_creating_the_output(
    tmp_path, capsys
):
    """``-H`` above the identities of the data (the default H = 20 on a 12-identity folder):
    one error naming ``-H`` and the count, and no output folder."""
    from feature_cloud.cli import main

    out = tmp_path / "never"
    args = ["demo", "--data", "synthetic", "--synthetic-classes", "12", "-H", "20", "--quiet"]
    assert main(args + ["--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert "-H 20" in err and "12 identities" in err and "choose -H in [0, 12]" in err, err


def test_scheduler_rejects_stage_iteration_beyond_the_stage():
    from feature_cloud import AlternatingScheduler, FTLModel

    model = FTLModel(
        torch.nn.Linear(4, D),
        torch.nn.Linear(D, C, bias=False),
        feature_dim=D,
        alpha_recon=0,
        transfer=FeatureTransfer(D, C, energy=0.95),
    )
    sched = AlternatingScheduler(model, stage0_iters=3, stage_iters=2)
    good = sched.state_dict()
    for key, value, match in [
        ("stage_iteration", 99, "stage 0 lasts 3"),
        ("stage_iteration", 3, "stage_iteration must be in"),
        ("iteration", -1, "iteration must be >= 0, got -1"),
        ("alternation", -2, "alternation"),
        ("max_alternations", -3, "max_alternations must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            sched.load_state_dict({**good, key: value})
    for key, value in (("stage", 1.7), ("max_alternations", "x"), ("iteration", True)):
        with pytest.raises(TypeError, match=f"{key} must be an integer"):
            sched.load_state_dict({**good, key: value})
    assert sched.state_dict() == good  # refused before anything changed
    # the constructor's lengths are integers too (2.5 was truncated to 2, "3" and True taken)
    for kw in (dict(stage_iters=2.5), dict(stage_iters="3"), dict(stage0_iters=True)):
        with pytest.raises(TypeError, match="must be an integer"):
            AlternatingScheduler(model, **{"stage0_iters": 3, **kw})
    with pytest.raises(ValueError, match="stage 1 lasts 2"):
        sched.load_state_dict({**good, "stage": 1, "stage_iteration": 2})
    sched.load_state_dict({**good, "stage": 2, "stage_iteration": 1})
    assert sched.stage == 2 and sched.remaining == 1


# ------------------------------------------------------------------ item 1: dtypes of the features

STAT_DTYPES = {
    "centers": torch.float32,
    "memory": torch.float32,
    "angle_sum": torch.float64,
    "angle_sqsum": torch.float64,
    "class_counts": torch.int64,
    "memory_pointer": torch.int64,
    "center_initialized": torch.bool,
}


@pytest.mark.parametrize("impl", ["reference", "fused", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_features_of_any_float_dtype_train_without_autocast(impl, dtype):
    """float64 / fp16 / bf16 features (no autocast) train; the loss equals the float32 one to the
    input's rounding, the statistics stay float32 and the gradient comes back in the input dtype."""
    ref, other = _head(impl), _head(impl)
    for step in range(3):
        x, y = _batch(step)
        xd = x.to(dtype).requires_grad_(True)
        l_ref, loss = ref(x.to(dtype).float(), y), other(xd, y)
        loss.backward()
        assert torch.isfinite(loss) and xd.grad.dtype == dtype and torch.isfinite(xd.grad).all()
        tol = 1e-5 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(loss.float(), l_ref.detach(), rtol=tol, atol=tol)
    for name, want in STAT_DTYPES.items():
        assert getattr(other.statistics, name).dtype == want, name
    assert other.step == 3


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("bad", ["nan", "labels_float", "labels_2d", "width", "range", "numpy"])
def test_bad_batch_raises_before_any_state_change(impl, bad):
    head = _head(impl, warmup_steps=1, class_counts=None, count_steps=1)  # online counting
    x, y = _batch(0)
    head(x, y)
    head(x, y)  # memory laid out, cloud active
    before = state_snapshot(head)
    x, y = _batch(1)
    if bad == "nan":
        x[3, 2] = float("nan")
    elif bad == "labels_float":
        y = y.float()
    elif bad == "labels_2d":
        y = y.unsqueeze(1)
    elif bad == "width":
        x = x[:, :-1]
    elif bad == "range":
        y[0] = C
    else:
        x = x.numpy()
    with pytest.raises((TypeError, ValueError)):
        head(x, y)
    assert_same_state(before, state_snapshot(head))


# ------------------------------------------------------------------ item 5: module casts


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double"])
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_module_casts_keep_statistics_dtypes_and_training_works(cast, impl):
    head = _head(impl)
    x, y = _batch(0)
    head(x, y)  # some statistics to keep
    centers = head.statistics.centers.clone()
    getattr(head, cast)()
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}[cast]
    assert head.weight.dtype == dtype  # the weights follow the cast
    for name, want in STAT_DTYPES.items():
        assert getattr(head.statistics, name).dtype == want, name
    assert torch.equal(head.statistics.centers, centers)  # not round-tripped through fp16
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    for step in range(1, 4):
        x, y = _batch(step)
        xd = x.to(dtype).requires_grad_(True)
        loss = head(xd, y)
        loss.backward()
        assert torch.isfinite(loss) and head.weight.grad.dtype == dtype
        assert torch.isfinite(head.weight.grad).all() and torch.isfinite(xd.grad).all()
        opt.step()
        opt.zero_grad()
    assert head.statistics.centers.dtype == torch.float32 and head.step == 4
    head.to(torch.float32)
    assert head.weight.dtype == torch.float32 and head.statistics.angle_sum.dtype == torch.float64


def test_pml_loss_double_keeps_float32_statistics():
    pml = pytest.importorskip("feature_cloud.integrations.pml")
    loss_fn = pml.LEAPLoss(C, D, class_counts=COUNTS, seed=1).double()
    assert loss_fn.W.dtype == torch.float64
    assert loss_fn.statistics.centers.dtype == torch.float32
    for step in range(3):
        x, y = _batch(step)
        x = x.double().requires_grad_(True)
        loss = loss_fn(x, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert loss_fn.statistics.centers.dtype == torch.float32


def test_feature_transfer_cast_keeps_statistics():
    ft = FeatureTransfer(D, 8, num_components=3)
    ft.update_stats(_ftl_stream(torch.int64))
    cov = ft.covariance.clone()
    ft.half()
    assert ft.covariance.dtype == torch.float64 and torch.equal(ft.covariance, cov)
    assert ft.centers.dtype == torch.float32 and ft.basis.dtype == torch.float32
    out = ft.transfer(torch.randn(2, D).half(), torch.tensor([0, 1]), torch.tensor([4, 5]))
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


@pytest.mark.filterwarnings("ignore:.*counts K_i online")
def test_fastreid_head_half_keeps_float32_statistics_and_trains():
    pytest.importorskip("fastreid")
    fr = pytest.importorskip("feature_cloud.integrations.fastreid")
    from fastreid.config import get_cfg
    from fastreid.modeling.heads import build_heads

    from _fastreid_data import LEAP_YAML

    cfg = get_cfg()
    fr.add_feature_cloud_config(cfg)
    cfg.merge_from_file(LEAP_YAML)
    cfg.MODEL.BACKBONE.FEAT_DIM, cfg.MODEL.HEADS.NUM_CLASSES = 32, 5
    cfg.MODEL.HEADS.FEATURE_CLOUD.CLASS_COUNTS = "online"
    cfg.MODEL.HEADS.FEATURE_CLOUD.WARMUP_ITERS = 2
    cfg.MODEL.HEADS.FEATURE_CLOUD.SEED = 0
    torch.manual_seed(0)
    head = build_heads(cfg).half()
    assert head.margin_head.weight.dtype == torch.float16
    feats = torch.randn(8, 32, 4, 2).half()
    labels = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4], dtype=torch.int32)
    for _ in range(4):  # warm-up (online counts), then the cloud
        out = head(feats, labels)
        loss = torch.nn.functional.cross_entropy(out["cls_outputs"].float(), labels.long())
        loss.backward()
        assert torch.isfinite(loss)
    assert head.margin_head.cloud_active and head.margin_head.statistics.memory_allocated
    for name, want in STAT_DTYPES.items():
        assert getattr(head.margin_head.statistics, name).dtype == want, name


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_ftl_model_loss_accepts_integer_label_dtypes(dtype):
    from feature_cloud import FTLModel

    torch.manual_seed(0)
    model = FTLModel(
        torch.nn.Linear(6, D),
        torch.nn.Linear(D, 5, bias=False),
        feature_dim=D,
        decoder=torch.nn.Linear(D, 6),
        transfer=FeatureTransfer(D, 5),
    )
    x, y = torch.randn(10, 6), torch.randint(0, 5, (10,))
    want, got = model.loss(x, y), model.loss(x, y.to(dtype))
    assert torch.equal(want["loss"].detach(), got["loss"].detach())
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        model.loss(x, y.float())


# ------------------------------------------------------------------ session 44: attack trial


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("eps", [1.5, -0.1, float("nan"), 1.0, "0.1"])
def test_label_smoothing_is_checked_before_any_state_change(impl, eps):
    """An invalid ``label_smoothing`` was checked by the fused loss after the cloud step had
    advanced the statistics; the reference path let -0.1, NaN and 1.0 through (another loss)."""
    head = _head(impl)
    x, y = _batch(0)
    before = state_snapshot(head)
    with pytest.raises((TypeError, ValueError), match="label_smoothing"):
        head(x, y, label_smoothing=eps)
    assert_same_state(before, state_snapshot(head))


@pytest.mark.parametrize("cloud", ["full", None])
def test_sub_center_head_takes_an_empty_batch(cloud):
    """An empty batch (allowed: a rank with no samples) gave a reshape error in the sub-center
    head's cosines, in training and in eval ``logits``."""
    head = LEAPMarginHead(D, C, "subcenter_arcface", cloud=cloud, class_counts=COUNTS, seed=0)
    loss = head(torch.randn(0, D), torch.zeros(0, dtype=torch.long))
    assert float(loss.detach()) == 0.0
    assert head.eval().logits(torch.randn(0, D)).shape == (0, C)


def test_fused_head_refuses_double_backward_with_a_clear_error():
    """``create_graph=True`` through the fused loss: a message naming the way out (was torch's
    "mm(): functions with out=... arguments don't support automatic differentiation"); the
    reference path differentiates twice."""
    x, y = _batch(0)
    for impl, ok in (("fused", False), ("reference", True)):
        head = _head(impl)
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(head(xx, y), xx, create_graph=True) if ok else (None,)
        if ok:
            (gg,) = torch.autograd.grad(g.pow(2).sum(), xx)
            assert torch.isfinite(gg).all()
            continue
        with pytest.raises(RuntimeError, match="impl='reference'"):
            torch.autograd.grad(head(xx, y), xx, create_graph=True)


@pytest.mark.parametrize("margin_type, cloud", [("arcface", None), ("cosface", "full")])
def test_reference_double_backward_is_the_true_second_derivative(margin_type, cloud):
    """``gradgradcheck`` (float64) of the reference loss in the weight, the cloud active (the
    same draw each call: the state is restored): the target angle's ``safe_acos`` gave a zero
    second derivative, so a gradient penalty through ArcFace or the cloud was off by a few %."""
    from feature_cloud.functional import safe_acos

    x = torch.tensor([0.3, -0.6, 0.999], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(safe_acos, (x,))
    g = torch.Generator().manual_seed(0)
    head = LEAPMarginHead(
        D, C, margin_type, cloud=cloud, class_counts=COUNTS, seed=1, impl="reference"
    ).double()
    head(torch.randn(16, D, dtype=torch.float64, generator=g), torch.arange(16) % C)
    state = {k: v.clone() for k, v in head.state_dict().items() if k != "weight"}
    f = torch.randn(4, D, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 3, 2])

    def loss(weight):
        head.load_state_dict(state, strict=False)
        return torch.func.functional_call(head, {"weight": weight}, (f, y))

    w = head.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(loss, (w,))


def test_refused_checkpoint_leaves_the_head_as_it_was():
    """torch loads the head's weight before the cloud's statistics: a checkpoint whose
    statistics are refused (another class count behind a weight of the same shape; an edited
    ``class_counts``; an angle memory of the wrong length) had already replaced the weight (and
    step, seed), or loaded and failed at the next step with an IndexError."""
    src = LEAPMarginHead(D, 3 * C, "cosface", class_counts=[4] * (3 * C), seed=1)
    dst = LEAPMarginHead(D, C, "subcenter_arcface", class_counts=COUNTS, seed=0)
    before = state_snapshot(dst)
    with pytest.raises(ValueError, match="num_classes=30"):
        dst.load_state_dict(src.state_dict())
    assert_same_state(before, state_snapshot(dst))
    trained = _head()
    trained(*_batch(0))
    for name, value in (
        ("class_counts", torch.ones(C + 2, dtype=torch.long)),
        ("angle_sum", torch.zeros(C - 1, dtype=torch.float64)),
        ("memory", torch.zeros(3)),
    ):
        state = trained.state_dict()
        state["feature_cloud.statistics." + name] = value
        head = _head()
        before = state_snapshot(head)
        with pytest.raises(ValueError, match="damaged or was edited"):
            head.load_state_dict(state)
        assert_same_state(before, state_snapshot(head))
    head = _head()
    head.load_state_dict(trained.state_dict())  # the untouched checkpoint loads
    head(*_batch(1))


def test_feature_transfer_checks_flipped_features_and_indices():
    """NaN in the flipped features ended in a LinAlgError from the PCA (or a NaN center of a
    tail class, silently); negative dataset indices went into the hard list."""
    torch.manual_seed(0)
    g = torch.randn(40, D)
    y = torch.tensor([0] * 25 + [1] * 10 + [2] * 3 + [3] * 2)
    ft = FeatureTransfer(D, 4, tail_threshold=5, num_components=2)
    flipped = g.clone()
    flipped[-1] = float("nan")
    with pytest.raises(ValueError, match="flipped features contain NaN"):
        ft.update_stats([(g, y, None, flipped)])
    with pytest.raises(ValueError, match="flipped must be a floating point"):
        ft.update_stats([(g, y, None, flipped.long())])
    with pytest.raises(ValueError, match="indices must be dataset indices"):
        ft.update_stats([(g, y, -torch.arange(40) - 1)])
    assert not ft.ready
    ft.update_stats([(g, y, torch.arange(40), g.clone())])
    assert ft.ready
    # rows labelled -1 (padding) may carry index -1: their indices are never used
    pad = torch.full((4,), -1)
    ft.update_stats(
        [(torch.cat([g, g[:4]]), torch.cat([y, pad]), torch.cat([torch.arange(40), pad]))]
    )


def test_pml_loss_checks_its_hyper_parameters_and_embedding_dtype():
    """``LEAPLoss`` took ``scale=0`` (NaN loss), ``scale=-64`` (the objective inverted), NaN /
    inf margins, ``scale="64"``, ``num_classes=5.7`` (5); integer and bool embeddings were
    promoted to float and trained on. The core head refuses all of them."""
    pytest.importorskip("pytorch_metric_learning")
    from feature_cloud.integrations.pml import LEAPLoss

    for kw, exc in (
        (dict(scale=0), ValueError),
        (dict(scale=-64), ValueError),
        (dict(scale=float("nan")), ValueError),
        (dict(margin=float("inf")), ValueError),
        (dict(scale="64"), TypeError),
        (dict(num_classes=5.7), TypeError),
    ):
        args = dict(num_classes=C, embedding_size=D, class_counts=COUNTS)
        args.update(kw)
        with pytest.raises(exc, match=next(iter(kw))):
            LEAPLoss(**args)
    loss = LEAPLoss(C, D, class_counts=COUNTS, seed=0)
    x, y = _batch(0)
    before = state_snapshot(loss)
    for bad in (x.long(), x > 0):
        with pytest.raises(TypeError, match="floating point"):
            loss(bad, y)
    assert_same_state(before, state_snapshot(loss))


def test_ftl_split_loss_checks_the_whole_batch_before_the_statistics_segment():
    """``FTLModel.classification_loss(..., stats_rows=)`` with a LEAP head: a bad row after the
    statistics' rows raised once those rows had updated the head (its step, centers, memory);
    loss weights of NaN / inf were taken (a NaN loss)."""
    from torch import nn

    from feature_cloud import FTLModel

    head = LEAPMarginHead(4, 4, class_counts=[25, 10, 3, 2], seed=0)
    model = FTLModel(
        nn.Linear(5, 6),
        head,
        feature_dim=6,
        alpha_recon=0,
        alpha_reg=0,
        transfer=FeatureTransfer(6, 4, tail_threshold=5, num_components=2),
    )
    torch.manual_seed(0)
    f, y = torch.randn(9, 4), torch.tensor([0, 1, 0, 2, 3, 2, 0, 1, 0])
    bad_f = f.clone()
    bad_f[8] = float("nan")
    bad_y = y.clone()
    bad_y[8] = 7
    before = state_snapshot(head)
    for ff, yy, match in ((bad_f, y, "NaN"), (f, bad_y, r"labels must lie in \[0, 4\)")):
        with pytest.raises(ValueError, match=match):
            model.classification_loss(ff, yy, stats_rows=slice(3, 6))
        assert_same_state(before, state_snapshot(head))
    assert head.validate
    model.classification_loss(f, y, stats_rows=slice(3, 6))
    assert head.step == 1
    for kw in (dict(alpha_sfmx=float("nan")), dict(alpha_reg=float("inf"))):
        with pytest.raises(ValueError, match="must be finite"):
            FTLModel(
                nn.Linear(5, 6), nn.Linear(4, 4, bias=False), feature_dim=6, alpha_recon=0, **kw
            )


def test_labels_on_another_device_than_the_embeddings_are_named():
    """Labels on another device (the meta device stands in for CUDA): a clear error, was
    "Tensor on device meta is not on the expected device cpu!" from the value check."""
    head = _head()
    x, y = _batch(0)
    with pytest.raises(ValueError, match="labels are on meta and embeddings on cpu"):
        head(x, y.to("meta"))


def test_seed_and_sub_centers_are_integers_in_range():
    """``seed=2**70`` ended in "Overflow when unpacking long long" (no name); ``reseed(1.7)``
    was truncated; ``sub_centers=2.5`` became 2 and ``"3"`` was taken."""
    with pytest.raises(ValueError, match="seed must fit in 64 bits"):
        LEAPMarginHead(D, C, cloud=None, seed=2**70)
    head = LEAPMarginHead(D, C, cloud=None, seed=1)
    for bad, exc in ((1.7, TypeError), ("x", TypeError), (2**64, ValueError)):
        with pytest.raises(exc, match="seed"):
            head.feature_cloud.reseed(bad)
    assert int(head.feature_cloud.seed) == 1
    for bad in (2.5, "3", True):
        with pytest.raises(TypeError, match="sub_centers must be an integer"):
            LEAPMarginHead(D, C, "subcenter_arcface", cloud=None, sub_centers=bad)


@pytest.mark.parametrize("impl", ["reference", "fused", "chunked"])
def test_inference_mode_tensors_in_a_training_step(impl):
    """Reliability trial: labels made under ``torch.inference_mode`` (cached pseudo-labels)
    made the fused losses take the step and then raise torch's "Inference tensors cannot be
    saved for backward" (a retry counted the batch twice). They train as other labels do;
    embeddings computed there, and a head built there, are refused before any state changes
    (the first took the step and raised; the second wrote the centers and raised). In eval
    mode, inference tensors are fine."""
    x, y = _batch(4)
    with torch.inference_mode():
        y_inf, x_inf = y.clone(), x.clone()
        built_there = _head(impl)
    head, twin = _head(impl), _head(impl)
    torch.testing.assert_close(head(x, y_inf), twin(x, y))
    assert_same_state(state_snapshot(head), state_snapshot(twin), "inference-mode labels")
    for module, features, match in (
        (head, x_inf, "embeddings were computed under torch.inference_mode"),
        (built_there, x, "built under torch.inference_mode"),
    ):
        before = state_snapshot(module)
        with pytest.raises(ValueError, match=match):
            module(features, y)
        assert_same_state(state_snapshot(module), before, match)
    head.eval()
    with torch.inference_mode():
        head.logits(x_inf)
        head(x_inf, y_inf)


def _edited(key, value):
    def edit(state):
        state[key] = value(state[key]) if callable(value) else value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (_edited("feature_cloud.step", torch.tensor([3, 4])), r"step is a torch.int64 .* \(2,\)"),
        (_edited("feature_cloud.step", torch.tensor(2.7)), "step is a torch.float32 tensor"),
        (_edited("feature_cloud.step", torch.tensor(-5)), "step is -5"),
        (
            _edited("feature_cloud.statistics.class_counts", lambda c: c - 10),
            "class_counts below 0",
        ),
        (_edited("feature_cloud.statistics.memory_fill", lambda f: f + 99), "memory_fill outside"),
        (_edited("feature_cloud.statistics.memory_pointer", lambda p: p - 5), "memory_pointer"),
        (_edited("feature_cloud.statistics.centers", lambda c: c * float("nan")), "non-finite"),
        (_edited("feature_cloud.statistics.num_updates", torch.tensor(-1)), "num_updates below 0"),
        (_edited("feature_cloud.statistics.angle_sqsum", lambda a: a - 1.0), "angle_sqsum below"),
        # s51 trial: a NaN or absurd angle memory loaded, every later loss NaN; out-of-range
        # offsets / owners loaded and failed with an IndexError in the middle of the next step
        (_edited("feature_cloud.statistics.memory", lambda m: m * float("nan")), "memory angles"),
        (_edited("feature_cloud.statistics.memory", lambda m: m + float("inf")), "memory angles"),
        (_edited("feature_cloud.statistics.memory", lambda m: m + 1e30), "memory angles"),
        (_edited("feature_cloud.statistics.memory", lambda m: m - 0.5), "outside \\[0, pi\\]"),
        (_edited("feature_cloud.statistics.angle_sum", lambda a: a + 1e30), "angle_sum above"),
        (_edited("feature_cloud.statistics.angle_sqsum", lambda a: a + 1e6), "angle_sqsum above"),
        (_edited("feature_cloud.statistics.memory_stamp", lambda t: t + 1000), "memory_stamp"),
        (_edited("feature_cloud.statistics.memory_stamp", lambda t: t - 5), "memory_stamp"),
        (_edited("feature_cloud.statistics.memory_capacity", lambda c: c * 0), "capacity below 1"),
        (
            _edited("feature_cloud.statistics.memory_offsets", lambda o: o + 1_000_000),
            "statistics.memory_offsets do not lay out",
        ),
        (
            _edited("feature_cloud.statistics.memory_offsets", lambda o: o.flip(0)),
            "statistics.memory_offsets do not lay out",
        ),
        (
            _edited("feature_cloud.statistics.memory_owner", lambda o: o + C),
            "statistics.memory_owner do not lay out",
        ),
        (
            _edited("feature_cloud.statistics.memory_owner", lambda o: o.flip(0)),
            "statistics.memory_owner do not lay out",
        ),
        (_edited("feature_cloud.statistics.memory", lambda m: m * 1j), "hold complex numbers"),
        # s51 trial: a complex step or seed passed the "0-d integer" check, and torch dropped
        # its imaginary part
        (_edited("feature_cloud.step", torch.tensor(3 + 2j)), "step is a torch.complex64"),
        (_edited("feature_cloud.seed", torch.tensor(5 + 0j)), "seed is a torch.complex64"),
    ],
)
def test_a_damaged_checkpoint_is_refused_before_anything_loads(edit, match):
    """Reliability trials: a ``feature_cloud.step`` of shape ``(2,)`` raised torch's size
    mismatch after every statistic had been overwritten; a float or negative step, negative
    class counts, a memory fill beyond its capacity or NaN centers loaded silently."""
    for max_age in (None, 5):  # the aged read-out reads the memory and its owners directly
        source, head = _head(angle_max_age=max_age), _head(angle_max_age=max_age)
        for seed in range(3):
            source(*_batch(seed)).backward()
        state = source.state_dict()
        edit(state)
        before = state_snapshot(head)
        with pytest.raises((ValueError, TypeError), match=match):
            head.load_state_dict(state)
        assert_same_state(state_snapshot(head), before, "after a refused checkpoint")
        # the public check says the same without loading
        with pytest.raises((ValueError, TypeError), match=match):
            head.feature_cloud.check_state_dict(state, "feature_cloud.")


def test_a_trained_angle_memory_passes_the_load_checks_and_trains_on():
    """The checks above refuse no real state: a long-trained head with a full, wrapped ring
    (every slot written, pointers past the capacity once) and its running sums reloads."""
    source = _head(angle_max_age=3)
    for seed in range(12):
        source(*_batch(seed)).backward()
    assert bool((source.statistics.memory_fill == source.statistics.memory_capacity).any())
    head = _head(angle_max_age=3)
    head.load_state_dict(source.state_dict())
    torch.testing.assert_close(head(*_batch(20)), source(*_batch(20)))
