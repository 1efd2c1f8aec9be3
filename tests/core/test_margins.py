"""The margin registry (feature_cloud.margins): plug-ins used by functional and fused alike."""

import math
import warnings

import pytest
import torch

from conftest import make_batch
from feature_cloud import LEAPMarginHead, fused, margins
from feature_cloud import functional as FC

B, D, C = 16, 12, 9


class CombinedMargin(margins.ArcFace):
    r"""A plug-in defined only here: :math:`\cos(\theta_y + \alpha_y + m) - 0.1` (ArcFace + CosFace)."""

    name = "test_combined"

    def target(self, cos_y, alpha_y, margin):
        return super().target(cos_y, alpha_y, margin) - 0.1

    def fused_target(self, c_y, alpha_y, margin):
        f, d = super().fused_target(c_y, alpha_y, margin)
        return f - 0.1, d


class CombinedNoFused(CombinedMargin):
    """The same margin without a fused derivative."""

    name = "test_combined_nofused"
    fused_target = margins.Margin.fused_target


@pytest.fixture
def registered():
    for m in (CombinedMargin(), CombinedNoFused()):
        margins.register(m)
    yield
    for name in ("test_combined", "test_combined_nofused"):
        margins.unregister(name)


def _batch(seed=0):
    return make_batch(seed, B, D, C)


def _run(head, x, y):
    x = x.clone().requires_grad_(True)
    loss = head(x, y)
    loss.backward()
    out = (loss.detach(), x.grad, head.weight.grad.clone())
    head.weight.grad = None
    return out


@pytest.mark.parametrize("cloud", [None, "full"])
def test_a_new_margin_is_one_subclass_and_runs_on_every_backend(registered, cloud):
    x, y = _batch()
    results = {}
    for name, impl in (
        ("test_combined", "reference"),
        ("test_combined", "fused"),
        ("test_combined", "chunked"),
        ("test_combined_nofused", "fused"),
    ):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            head = LEAPMarginHead(
                D,
                C,
                name,
                scale=16.0,
                margin=0.3,
                cloud=cloud,
                class_counts=[5] * C,
                seed=1,
                impl=impl,
                chunk_size=4 if impl == "chunked" else None,
            )
        # an implementation asked for by name that cannot run says so
        said = [str(w.message) for w in caught if "runs the reference path" in str(w.message)]
        assert len(said) == (name == "test_combined_nofused"), said
        if cloud:
            head(x + 0.3, y)  # two angles per class: the cloud is on in the next step
            head(x - 0.3, y)
            head.weight.grad = None
        results[(name, impl)] = (head.backend, _run(head, x, y))
    assert results[("test_combined", "fused")][0] == "fused"
    assert results[("test_combined", "chunked")][0] == "chunked"
    assert results[("test_combined_nofused", "fused")][0] == "reference"  # automatic fallback
    ref = results[("test_combined", "reference")][1]
    for key, (_, got) in results.items():
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5, msg=str(key))
    # and it is not ArcFace: the extra -0.1 changes the loss
    torch.manual_seed(0)
    arc = LEAPMarginHead(D, C, "arcface", scale=16.0, margin=0.3, cloud=None, seed=1)
    assert not torch.allclose(_run(arc, x, y)[0], ref[0])


def test_functional_and_fused_read_the_registry(registered):
    x, y = _batch(1)
    W = torch.randn(C, D)
    cos = FC.cosine_logits(x, W)
    logits = FC.margin_logits(cos, y, margin_type="test_combined", scale=8.0, margin=0.2)
    want = FC.margin_logits(cos, y, margin_type="arcface", scale=8.0, margin=0.2)
    want = want.scatter(1, y[:, None], want.gather(1, y[:, None]) - 0.8)
    torch.testing.assert_close(logits, want)
    got = fused.margin_loss(x, W, y, margin_type="test_combined", scale=8.0, margin=0.2)
    torch.testing.assert_close(got, FC.margin_cross_entropy(logits, y))
    with pytest.raises(ValueError, match="no fused implementation"):
        fused.margin_loss(x, W, y, margin_type="test_combined_nofused")


def test_registry_lookup_and_units():
    assert {"cosface", "arcface", "subcenter_arcface"} <= set(margins.names())
    assert margins.get("arcface").from_pml(28.6) == pytest.approx(math.radians(28.6))
    assert margins.get("cosface").from_pml(0.35) == 0.35
    assert margins.get("subcenter_arcface").sub_centers == 3
    rule = margins.get("cosface")
    assert margins.get(rule) is rule
    assert (rule.default_scale, rule.default_margin) == (24.0, 0.2)
    with pytest.raises(ValueError, match="margin_type must be one of"):
        margins.get("sphereface")
    with pytest.raises(ValueError, match="margin_type must be one of"):
        LEAPMarginHead(D, C, "sphereface", cloud=None)
    with pytest.raises(ValueError, match="already registered"):
        margins.register(margins.CosFace())
    with pytest.raises(TypeError):
        margins.register("cosface")


def test_a_cosine_margin_of_one_or_more_warns_in_every_adapter():
    """A fastreid user typed ``MODEL.HEADS.MARGIN 20`` with CosSoftmax: accepted silently (an
    ArcFace margin above pi/2 warned already). CosFace margins below 1 say nothing."""
    from feature_cloud.integrations.pml import LEAPLoss

    for margin in (1.0, 20.0):
        with pytest.warns(UserWarning, match=rf"cosface margin={margin} is a cosine margin"):
            LEAPMarginHead(D, C, "cosface", margin=margin, cloud=None)
        # each names its own default (PML's is 0.35; the PML adapter said 0.2, a user trial)
        with pytest.warns(UserWarning, match=r"is a cosine margin.*\(default 0\.35\)"):
            LEAPLoss(C, D, margin_type="cosface", margin=margin, cloud=None)
    with pytest.warns(UserWarning, match=r"\(default 0\.2\)"):
        LEAPMarginHead(D, C, "cosface", margin=20.0, cloud=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LEAPMarginHead(D, C, "cosface", margin=0.35, cloud=None)
        LEAPLoss(C, D, margin_type="cosface", margin=0.35, cloud=None)


def test_subcenter_arcface_equals_pml(seed=0):
    """Sub-center ArcFace through the registry and the (K C, D) layout equals PML's
    SubCenterArcFaceLoss (values and gradients, 1e-5)."""
    from pytorch_metric_learning import losses as pml_losses

    torch.manual_seed(seed)
    k, c, d, b = 3, 11, 16, 20
    pml = pml_losses.SubCenterArcFaceLoss(
        num_classes=c, embedding_size=d, margin=28.6, scale=64, sub_centers=k
    )
    rule = margins.get("subcenter_arcface")
    head = LEAPMarginHead(
        d,
        c,
        "subcenter_arcface",
        scale=rule.pml_scale,
        margin=rule.from_pml(rule.pml_margin),
        cloud=None,
    )
    assert head.weight.shape == (k * c, d) and head.backend == "reference"
    head.weight.data.copy_(pml.W.data.t())
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(3):
        x = torch.randn(b, d, generator=g)
        y = torch.randint(0, c, (b,), generator=g)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        want = pml(x1, y)
        want.backward()
        got = head(x2, y)
        got.backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(head.weight.grad, pml.W.grad.t(), atol=1e-5, rtol=1e-5)
        assert head.weight.grad.abs().sum() > 0
        pml.W.grad, head.weight.grad = None, None
    # the max over sub-centers matters: a single-center ArcFace on the first rows differs
    plain = LEAPMarginHead(d, c, "arcface", scale=64.0, margin=math.radians(28.6), cloud=None)
    plain.weight.data.copy_(pml.W.data.t()[::k])
    assert not torch.allclose(plain(x, y), head(x, y))


def test_subcenter_layout_with_the_cloud_trains():
    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, "subcenter_arcface", cloud="full", class_counts=[4] * C, seed=0)
    x, y = _batch(2)
    for shift in (0.0, 0.1, 0.2):
        loss = head(x + shift, y)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(head.weight.grad).all()
    assert head.cloud_active and head.statistics.centers.shape == (C, D)


def test_sharded_head_runs_fused_and_falls_back_like_the_dense_head(registered):
    from unittest import mock

    from feature_cloud import distributed
    from feature_cloud.distributed import ShardedLEAPMarginHead

    x, y = _batch(3)
    for name in ("test_combined", "test_combined_nofused"):
        torch.manual_seed(0)
        dense = LEAPMarginHead(D, C, name, scale=16.0, margin=0.3, cloud=None, impl="reference")
        sharded = ShardedLEAPMarginHead(D, C, name, scale=16.0, margin=0.3, cloud=None)
        sharded.weight.data.copy_(dense.weight.data)
        spy = mock.patch.object(
            distributed, "_sharded_cross_entropy", wraps=distributed._sharded_cross_entropy
        )
        with spy as reference:
            got = _run(sharded, x, y)
        assert reference.called == (name == "test_combined_nofused")  # fused unless it cannot
        for r, g in zip(_run(dense, x, y), got):
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-5)


class OverridesTargetOnly(margins.ArcFace):
    """A subclass of a fused margin that changes the target and not its fused derivative."""

    name = "test_target_only"

    def target(self, cos_y, alpha_y, margin):
        return super().target(cos_y, alpha_y, margin) - 0.5


def test_a_margin_that_overrides_target_alone_runs_its_own_target_not_the_parents():
    """The fused paths would run the inherited ArcFace ``fused_target``: another loss than the
    subclass's ``target`` (user trial: 3.51, plain ArcFace's, for 8.87 at s = 64)."""
    rule = OverridesTargetOnly()
    assert not rule.has_fused
    assert CombinedMargin().has_fused and CombinedNoFused().has_fused is False
    assert margins.get("subcenter_arcface").has_fused  # inherits target and fused_target alike
    margins.register(rule)
    try:
        x, y = _batch(4)
        losses = {}
        for impl in ("auto", "reference"):
            torch.manual_seed(0)
            head = LEAPMarginHead(
                D, C, "test_target_only", scale=64.0, margin=0.5, cloud=None, impl=impl
            )
            assert head.backend == "reference"
            losses[impl] = head(x, y)
        torch.manual_seed(0)
        arc = LEAPMarginHead(D, C, "arcface", scale=64.0, margin=0.5, cloud=None)
        assert torch.equal(losses["auto"], losses["reference"])
        assert losses["auto"] > arc(x, y) + 1.0  # the subclass's margin, not ArcFace's
        with pytest.raises(ValueError, match="no fused implementation"):
            fused.margin_loss(
                x, arc.weight, y, margin_type="test_target_only", scale=64.0, margin=0.5
            )
    finally:
        margins.unregister("test_target_only")


def test_has_fused_is_fixed_at_class_creation_not_looked_up_in_a_forward(monkeypatch):
    """The MRO walk behind ``has_fused`` (``vars`` of each class) runs when a margin class is
    created: inside a forward (``torch.compile(fullgraph=True)`` traces the backend choice)
    torch 2.2 - 2.6's dynamo stopped at ``vars`` / the cache's dict lookup (s50 trial)."""
    monkeypatch.setattr(margins, "_fused_for", lambda cls: pytest.fail("looked up again"))
    assert CombinedMargin().has_fused and not OverridesTargetOnly().has_fused
    for impl, chunk_size, backend in (("auto", None, "fused"), ("chunked", 4, "chunked")):
        head = LEAPMarginHead(D, C, "arcface", cloud=None, impl=impl, chunk_size=chunk_size)
        head(*_batch()).backward()
        assert head.backend == backend


def test_a_sub_center_head_asked_for_fused_warns_that_it_runs_the_reference_path():
    with pytest.warns(UserWarning, match=r"impl='chunked' runs the reference path.*sub_centers=3"):
        head = LEAPMarginHead(D, C, "subcenter_arcface", cloud=None, impl="chunked", chunk_size=4)
    assert head.backend == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LEAPMarginHead(D, C, "subcenter_arcface", cloud=None)  # "auto" chooses, quietly


class FusedOnly(margins.CosFace):
    """Contributor trial: overrides ``fused_target`` alone, so the reference path (the
    inherited ``target``) and the fused paths trained two losses (18.88 vs 21.28)."""

    name = "test_fused_only"

    def fused_target(self, c_y, alpha_y, margin):
        f, d = super().fused_target(c_y, alpha_y, margin)
        return f - 0.1, d


class OneTensor(margins.CosFace):
    """Returns the value alone: with two rows the pair unpacked the rows silently."""

    name = "test_one_tensor"

    def fused_target(self, c_y, alpha_y, margin):
        return super().fused_target(c_y, alpha_y, margin)[0]


class WrongDerivative(margins.CosFace):
    """The right value with the derivative's sign flipped: equal losses, other gradients."""

    name = "test_wrong_derivative"

    def fused_target(self, c_y, alpha_y, margin):
        f, d = super().fused_target(c_y, alpha_y, margin)
        return f, -d


class NoTarget(margins.Margin):
    name = "test_no_target"


class WithParameters(CombinedMargin):
    name = "test_with_parameters"

    def __init__(self, m3: float = 0.1):
        self.m3 = m3


def test_a_margin_is_checked_before_it_runs():
    """``margins.check`` (run by ``register`` and, once, for an instance given to a head):
    ``fused_target`` must be a (value, derivative) pair that agrees with ``target`` and its
    autograd derivative; ``target`` must exist. Each broken margin is named, by the head too,
    before anything is built; ``check=False`` registers one with a deliberate kink."""
    for rule, match in (
        (FusedOnly(), "fused_target's value disagrees"),
        (OneTensor(), r"must return a pair .* got Tensor \(13,\)"),
        (WrongDerivative(), "fused_target's derivative disagrees"),
    ):
        with pytest.raises(ValueError, match=match):
            margins.register(rule)
        assert rule.name not in margins.names()
        with pytest.raises(ValueError, match=type(rule).__name__):
            LEAPMarginHead(D, C, rule, cloud=None)
    with pytest.raises(TypeError, match="does not implement target"):
        margins.register(NoTarget())
    for good in (CombinedMargin(), CombinedNoFused(), *map(margins.get, margins.names())):
        margins.check(good)
    margins.register(WrongDerivative(), check=False)  # the user's responsibility
    try:
        assert margins.get("test_wrong_derivative").has_fused
    finally:
        margins.unregister("test_wrong_derivative")
    # the repr shows a subclass's own parameters (two settings printed alike before)
    assert repr(WithParameters(0.5)) == "WithParameters(name='test_with_parameters', m3=0.5)"
    assert repr(margins.get("cosface")) == "CosFace(name='cosface')"
    assert "unregister" in margins.__all__ and "check" in margins.__all__


def test_the_default_tables_see_a_margin_registered_later(registered):
    """Contributor trial: ``DEFAULT_SCALE`` was a copy made at import, without later margins."""
    from feature_cloud.heads import DEFAULT_MARGIN, DEFAULT_SCALE

    assert DEFAULT_SCALE["test_combined"] == CombinedMargin.default_scale
    assert DEFAULT_MARGIN["cosface"] == 0.2 and "test_combined" in DEFAULT_MARGIN
    assert dict(DEFAULT_SCALE)["arcface"] == 16.0 and len(DEFAULT_SCALE) == len(margins.names())
    with pytest.raises(KeyError):
        DEFAULT_SCALE["no_such_margin"]


def test_a_sub_center_margin_with_one_row_a_class_runs_fused_as_its_base_margin():
    """Option-matrix trial: ``subcenter_arcface`` with ``sub_centers=1`` was accepted, reported
    the fused backend, and every forward raised from the fused kernel (after the step and the
    statistics had moved). It is ArcFace with one row a class: fused, equal to the reference."""
    x, y = _batch(6)
    losses = {}
    for impl in ("auto", "reference"):
        torch.manual_seed(0)
        head = LEAPMarginHead(
            D, C, "subcenter_arcface", sub_centers=1, class_counts=[4] * C, seed=0, impl=impl
        )
        assert head.backend == ("fused" if impl == "auto" else "reference")
        losses[impl] = [head(x + 0.1 * k, y) for k in range(3)]
    for a, b in zip(losses["auto"], losses["reference"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sub_centers=3 weight rows a class"):
        fused.margin_loss(x, torch.randn(3 * C, D), y, margin_type="subcenter_arcface")


def test_the_margin_check_runs_in_any_context_and_on_any_margin_instance():
    """Review of the check: it needed autograd on and CPU tensors, so ``import feature_cloud``,
    a head built under ``no_grad`` / ``inference_mode`` / ``torch.device("meta")`` and the
    first loss of a deep-copied head (an EMA copy) under ``no_grad`` raised; unhashable margins
    (a dataclass) were refused; a ``fused_target`` returning a list was refused."""
    import copy
    import dataclasses
    import pickle
    import subprocess
    import sys

    code = "import torch\nwith torch.no_grad():\n    import feature_cloud\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
    for context in (torch.no_grad, torch.inference_mode, lambda: torch.device("meta")):
        with context():
            LEAPMarginHead(D, C, CombinedMargin(), cloud=None)
    head = LEAPMarginHead(D, C, CombinedMargin(), class_counts=[4] * C, seed=0)
    x, y = _batch(7)
    for twin in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        with torch.no_grad():
            twin(x, y)  # a training-mode forward under no_grad: a plain loss, no check needed

    @dataclasses.dataclass
    class Dataclass(margins.CosFace):  # eq=True: unhashable
        name: str = "test_dataclass"
        shift: float = 0.0

    class ListPair(margins.CosFace):
        name = "test_list_pair"

        def fused_target(self, c_y, alpha_y, margin):
            return list(super().fused_target(c_y, alpha_y, margin))

    for rule in (Dataclass(), ListPair()):
        margins.register(rule)
        try:
            reference = LEAPMarginHead(D, C, rule.name, cloud=None, impl="reference")
            fast = LEAPMarginHead(D, C, rule.name, cloud=None)
            fast.load_state_dict(reference.state_dict())
            torch.testing.assert_close(fast(x, y), reference(x, y), atol=1e-5, rtol=1e-5)
        finally:
            margins.unregister(rule.name)


def test_a_scale_too_small_to_train_warns_with_the_bound():
    """API review s50: ``scale=1`` (fastreid's untouched default) or 0.35 (PML's margin given
    as the head's positional scale) was accepted silently: a cosine softmax over C classes
    cannot reach a target probability of 1/2 below ``(C-1)/C log(C-1)`` (NormFace's bound).
    Warned at construction and assignment, with the bound; the usual scales say nothing."""
    from feature_cloud.integrations.pml import LEAPLoss

    c = 751
    bound = (c - 1) / c * math.log(c - 1)
    assert margins.trainable_scale(c) == pytest.approx(bound)
    assert margins.trainable_scale(2) == 0.0
    for scale in (1.0, 6.5):
        with pytest.warns(UserWarning, match=rf"scale={scale} is too small to train .* 751 cl"):
            LEAPMarginHead(D, c, "cosface", scale=scale, cloud=None)
        with pytest.warns(UserWarning, match=rf"Use scale >= {bound:.1f}"):
            LEAPLoss(c, D, scale=scale, cloud=None)
    head = LEAPMarginHead(D, c, "arcface", cloud=None)
    with pytest.warns(UserWarning, match="scale=2.0 is too small"):
        head.scale = 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (6.7, 16.0, 64.0):
            LEAPMarginHead(D, c, "arcface", scale=scale, cloud=None)
            LEAPLoss(c, D, scale=scale, cloud=None)
        LEAPMarginHead(D, 2, scale=0.1, cloud=None)  # two classes: any scale can train


@pytest.mark.parametrize("margin_type", ["arcface", "cosface"])
def test_a_swapped_scale_and_margin_is_named_as_such(margin_type):
    """``LEAPMarginHead(D, C, "arcface", 0.5, 64)`` (PML's margin, scale order) warned only
    "did you mean margin=1.117?", which kept the unusable scale 0.5; one warning now says the
    two look swapped and gives the call that was meant."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LEAPMarginHead(D, 10, margin_type, 0.5, 64, cloud=None)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "look swapped" in messages[0] and "did you mean scale=64.0, margin=0.5?" in messages[0]
    assert "did you mean margin=" not in messages[0]
