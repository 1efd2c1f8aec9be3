"""Inference prototypes: class weights shrunk towards the LEAP centers (``prototype_shrinkage``)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TORCH_VERSION, make_batch
from feature_cloud import LEAPMarginHead
from feature_cloud import functional as FC
from feature_cloud.cloud import DEFAULT_PROTOTYPE_SHRINKAGE

D, C = 16, 6


def _manual(weight, centers, initialized, counts, kappa):
    lam = torch.where(initialized, kappa / (kappa + counts.double()), torch.zeros(len(counts)))
    mix = (1 - lam[:, None]) * F.normalize(weight.double(), dim=1) + lam[:, None] * F.normalize(
        centers.double(), dim=1
    )
    return F.normalize(mix, dim=1)


def test_center_prototypes_formula_edges_dtype_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    w, c = torch.randn(C, D, generator=g), torch.randn(C, D, generator=g)
    counts = torch.tensor([1, 3, 10, 40, 500, 0])
    init = torch.tensor([True, True, True, True, True, False])
    p = FC.center_prototypes(w, c, init, counts, 10.0)
    torch.testing.assert_close(p.double(), _manual(w, c, init, counts, 10.0), atol=1e-6, rtol=0)
    # a class without a center keeps its weight's direction; kappa = 0 gives the weights
    torch.testing.assert_close(p[5], F.normalize(w, dim=1)[5])
    torch.testing.assert_close(FC.center_prototypes(w, c, init, counts, 0.0), F.normalize(w, dim=1))
    # the fewer samples, the closer to the center
    cos_to_center = (p * F.normalize(c, dim=1)).sum(1)[:5]
    lam = 10.0 / (10.0 + counts[:5].double())
    assert torch.all(lam[:-1] > lam[1:])
    assert cos_to_center[0] > 0.99 * (F.normalize(w, dim=1)[0] @ F.normalize(c, dim=1)[0])
    # sub-centers: every row of class j leans towards center j
    k = 3
    wk = torch.randn(k * C, D, generator=g)
    pk = FC.center_prototypes(wk, c, init, counts, 10.0, sub_centers=k)
    rows = _manual(
        wk, c.repeat_interleave(k, 0), init.repeat_interleave(k), counts.repeat_interleave(k), 10.0
    )
    torch.testing.assert_close(pk.double(), rows, atol=1e-6, rtol=0)
    # half-precision weights: computed in float32, returned in the weight's dtype
    pb = FC.center_prototypes(w.bfloat16(), c, init, counts, 10.0)
    assert pb.dtype == torch.bfloat16
    ref = FC.center_prototypes(w.bfloat16().float(), c, init, counts, 10.0)
    torch.testing.assert_close(pb.float(), ref, atol=8e-3, rtol=0)
    # differentiable in the weight (float64 gradcheck)
    wd = w.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: FC.center_prototypes(x, c.double(), init, counts, 10.0), (wd,)
    )


def test_min_count_keeps_the_weights_of_classes_with_fewer_samples():
    """``min_count``: a class with fewer samples keeps its weight's direction exactly; the
    others get the same prototypes as without it."""
    g = torch.Generator().manual_seed(1)
    w, c = torch.randn(C, D, generator=g), torch.randn(C, D, generator=g)
    counts = torch.tensor([1, 2, 3, 1, 40, 0])
    init = torch.ones(C, dtype=torch.bool)
    every = FC.center_prototypes(w, c, init, counts, 10.0)
    for m in (2, 3):
        p = FC.center_prototypes(w, c, init, counts, 10.0, min_count=m)
        few = counts < m
        torch.testing.assert_close(p[few], F.normalize(w, dim=1)[few])
        torch.testing.assert_close(p[~few], every[~few])
        assert (p[0] - every[0]).abs().max() > 0.1  # the one-shot class leaned before
    assert torch.equal(FC.center_prototypes(w, c, init, counts, 10.0, min_count=1), every)


def test_one_shot_classes_keep_their_weights_in_the_head_by_default():
    """The default ``prototype_min_count=2``: a head's eval logits of a class seen once per epoch
    use its weight, every other class its prototype; ``prototype_min_count=1`` (the previous
    rule) leans the one-shot class too; values below 1 are refused by name."""
    from feature_cloud.cloud import DEFAULT_PROTOTYPE_MIN_COUNT

    assert DEFAULT_PROTOTYPE_MIN_COUNT == 2
    torch.manual_seed(0)
    counts = torch.tensor([1, 1, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0)
    every = LEAPMarginHead(D, C, class_counts=counts, seed=0, prototype_min_count=1)
    assert "prototype_min_count=1" in repr(every) and "prototype_min_count" not in repr(head)
    for step in range(3):
        x, y = make_batch(step, 48, D, C)
        head(x, y)
    every.load_state_dict(head.state_dict())
    head.eval(), every.eval()
    x, _ = make_batch(9, 32, D, C)
    weights = head.scale * FC.cosine_logits(x, head.weight)
    assert bool(head.statistics.center_initialized[:2].all())
    with torch.no_grad():
        ours, prev = head.logits(x), every.logits(x)
    torch.testing.assert_close(ours[:, :2], weights[:, :2])
    torch.testing.assert_close(ours[:, 2:], prev[:, 2:])
    assert (prev[:, :2] - weights[:, :2]).abs().max() > 0.1
    with pytest.raises(ValueError, match="prototype_min_count"):
        LEAPMarginHead(D, C, class_counts=counts, prototype_min_count=0)


def test_head_logits_use_the_prototypes_after_training_steps():
    torch.manual_seed(0)
    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0)
    assert head.feature_cloud.prototype_shrinkage == DEFAULT_PROTOTYPE_SHRINKAGE
    x, y = make_batch(0, 48, D, C)
    plain = head.scale * F.normalize(x) @ F.normalize(head.weight).t()
    # before any training step no center exists: the weights (to rounding)
    torch.testing.assert_close(head.logits(x), plain)
    head(x, y)
    # train mode: the weights (training accuracy monitors the classifier being trained)
    torch.testing.assert_close(
        head.logits(x), head.scale * FC.cosine_logits(x, head.weight), rtol=0, atol=0
    )
    head.eval()
    stats = head.statistics
    expected = (
        head.scale
        * F.normalize(x)
        @ FC.center_prototypes(
            head.weight, stats.centers, stats.center_initialized, stats.class_counts, 10.0
        ).t()
    )
    torch.testing.assert_close(head.logits(x), expected)
    assert (
        head.logits(x) - head.scale * F.normalize(x) @ F.normalize(head.weight).t()
    ).abs().max() > 0.1
    # the paper's inference logits on request, exactly
    paper = LEAPMarginHead(D, C, class_counts=counts, seed=0, prototype_shrinkage=None)
    paper.load_state_dict(head.state_dict())
    paper.eval()
    torch.testing.assert_close(
        paper.logits(x), paper.scale * FC.cosine_logits(x, paper.weight), rtol=0, atol=0
    )
    # a head without cloud updates no center: plain CosFace logits
    off = LEAPMarginHead(D, C, cloud=None)
    off(x, y)
    off.eval()
    assert not off.statistics.center_initialized.any()
    torch.testing.assert_close(
        off.logits(x), off.scale * F.normalize(x) @ F.normalize(off.weight).t()
    )
    # the prototypes travel with the state: a fresh head loaded strictly gives the same logits
    fresh = LEAPMarginHead(D, C, class_counts=counts)
    fresh.load_state_dict(head.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval().logits(x), head.logits(x), rtol=0, atol=0)


def test_prototype_shrinkage_is_checked_by_name():
    with pytest.raises(ValueError, match="prototype_shrinkage"):
        LEAPMarginHead(D, C, class_counts=[3] * C, prototype_shrinkage=-1.0)
    with pytest.raises((TypeError, ValueError), match="prototype_shrinkage"):
        LEAPMarginHead(D, C, class_counts=[3] * C, prototype_shrinkage="big")


def _long_tail(seed, per_class):
    """Gaussian classes around random unit means (spread 0.35 per dimension), 32-d."""
    g = torch.Generator().manual_seed(100)
    mu = F.normalize(torch.randn(len(per_class), 32, generator=g), dim=1)
    g.manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(per_class)), per_class)
    return mu[y] + 0.35 * torch.randn(len(y), 32, generator=g), y


def test_prototypes_lift_tail_accuracy_of_a_trained_long_tailed_head():
    """The mechanism on a trained head: 10 classes x 60 samples, 30 x 3; held-out 20 a class.
    The tail weights drift off their features (negative gradients from every other class's
    samples); the centers do not, and the prototypes classify the held-out tail samples better."""
    counts = torch.tensor([60] * 10 + [3] * 30)
    x, y = _long_tail(1, counts)
    xt, yt = _long_tail(2, torch.full((40,), 20))
    torch.manual_seed(0)
    head = LEAPMarginHead(32, 40, class_counts=counts, seed=0)
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            b = perm[i : i + 32]
            opt.zero_grad()
            head(x[b], y[b]).backward()
            opt.step()
    tail = yt >= 10
    with torch.no_grad():
        proto = head.eval().logits(xt).argmax(1) == yt
        head.feature_cloud.prototype_shrinkage = None
        weights = head.logits(xt).argmax(1) == yt
    tail_gain = proto[tail].float().mean() - weights[tail].float().mean()
    balanced_gain = (proto[tail].float().mean() + proto[~tail].float().mean()) - (
        weights[tail].float().mean() + weights[~tail].float().mean()
    )
    assert tail_gain > 0.05, tail_gain
    assert balanced_gain > 0.0, balanced_gain


def test_imprint_step_replaces_the_weights_by_the_prototypes_once():
    """Before training step ``imprint_step`` the weights become the inference prototypes (row
    norms kept), exactly once; eval mode, no-grad and other steps leave them alone; PML's
    ``(D, C)`` weight gets the same rows."""
    from feature_cloud.integrations.pml import LEAPLoss

    torch.manual_seed(0)
    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0, warmup_steps=1, imprint_step=3)
    assert "imprint_step=3" in repr(head)
    pml = LEAPLoss(C, D, class_counts=counts, seed=0, warmup_steps=1, imprint_step=3)
    pml.W.data.copy_(head.weight.detach().t())
    for step in range(6):
        x, y = make_batch(step, 24, D, C)
        before = head.weight.detach().clone()
        stats = head.statistics
        want = FC.center_prototypes(
            before, stats.centers, stats.center_initialized, stats.class_counts, 10.0
        ) * before.norm(dim=1, keepdim=True)
        head.eval()
        head(x, y)  # eval mode: never
        with torch.no_grad():
            head.train()(x, y)  # no training step either
        assert torch.equal(head.weight, before)
        head(x, y)
        pml(x, y)
        if step == 3:
            torch.testing.assert_close(head.weight.detach(), want)
            assert (head.weight - before).abs().max() > 0.1
        else:
            assert torch.equal(head.weight, before), step
        torch.testing.assert_close(pml.W.detach().t(), head.weight.detach())


def test_imprint_step_sets_a_parametrized_weight_through_its_right_inverse():
    """With ``weight_norm`` (a parametrization with a right_inverse) the imprint reaches the
    weight as without it (it went into a computed tensor and was lost); a parametrization
    without a right_inverse is refused at the first training step, before any state changes."""
    from torch import nn
    from torch.nn.utils.parametrizations import weight_norm

    counts = torch.tensor([2, 3, 5, 20, 40, 80])

    def run(parametrization, imprint_step=2):
        torch.manual_seed(0)
        head = LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=imprint_step)
        if parametrization is not None:
            parametrization(head)
        for step in range(3):
            head(*make_batch(step, 24, D, C))
        return head

    plain, normed = run(None), run(lambda h: weight_norm(h, "weight", dim=0))
    torch.testing.assert_close(normed.weight, plain.weight, atol=1e-5, rtol=1e-5)
    unchanged = run(None, imprint_step=None)
    assert (plain.weight - unchanged.weight).abs().max() > 0.1  # an imprint happened

    class Scale(nn.Module):
        def forward(self, w):
            return 2.0 * w

    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=2)
    torch.nn.utils.parametrize.register_parametrization(head, "weight", Scale())
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="parametrized without a right_inverse"):
        head(*make_batch(0, 24, D, C))
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    head.eval()
    head(*make_batch(0, 24, D, C))  # no imprint in eval mode: no refusal
    # parametrized after its imprint step (a fine-tune): nothing left to imprint, trains
    done = run(None)
    torch.nn.utils.parametrize.register_parametrization(done, "weight", Scale())
    done(*make_batch(3, 24, D, C))
    # parametrize.cached(): the imprint would write into the cached weight in place
    cached = run(lambda h: weight_norm(h, "weight", dim=0), imprint_step=5)
    with torch.nn.utils.parametrize.cached():
        with pytest.raises(RuntimeError, match=r"cached \(parametrize.cached\(\)\)"):
            cached(*make_batch(3, 24, D, C))


def test_a_state_from_before_the_imprint_step_loaded_after_it_imprints_again():
    """Train past ``imprint_step``, load the state of step 0 and train again: the imprint
    happens at its step as in a fresh run (the host note of the imprint done was kept and the
    step skipped; under compile it would skip it too)."""
    import copy

    counts = torch.tensor([2, 3, 5, 20, 40, 80])

    def head():
        torch.manual_seed(0)
        return LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=2)

    def train(h, start, stop):
        for step in range(start, stop):
            h(*make_batch(step, 24, D, C))

    reloaded, fresh = head(), head()
    start = copy.deepcopy(reloaded.state_dict())
    train(reloaded, 0, 4)
    assert reloaded.feature_cloud.imprint_behind
    reloaded.load_state_dict(start)
    assert not reloaded.feature_cloud.imprint_behind
    train(reloaded, 0, 3)
    train(fresh, 0, 3)
    torch.testing.assert_close(reloaded.weight, fresh.weight)


def test_imprint_step_refuses_the_hook_based_weight_norm_and_spectral_norm():
    """Reliability trial: with the hook-based ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` the imprint went into the ``weight`` that the hook recomputes before the
    next forward, and was lost without a word; refused at the first training step."""
    import warnings

    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    for wrap in (torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm):
        torch.manual_seed(0)
        head = LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm: deprecated
            wrap(head, "weight")
        # all but spectral_norm's power-iteration vectors (its own hook moves them first)
        power = ("weight_u", "weight_v") if wrap is torch.nn.utils.spectral_norm else ()
        before = {k: v.clone() for k, v in head.state_dict().items() if k not in power}
        with pytest.raises(ValueError, match="hook-based .*parametrizations.weight_norm"):
            head(*make_batch(0, 24, D, C))
        assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items() if k in before)


@pytest.mark.skipif(
    TORCH_VERSION < (2, 4),
    reason="torch 2.2 / 2.3 cannot compile a head with a parametrized weight at all (torch's "
    "bugs: 2.2 traces weight_norm into _weight_norm_interface() without 'dim'; 2.3 guards "
    "torch's parametrization property through its value, 'Tensor' object has no attribute "
    "'__closure__'); docs/compatibility.md",
)
def test_compiled_head_imprints_a_parametrized_weight_as_eager_and_refuses_the_hook():
    """Compile trial: under ``torch.compile`` the imprint of a ``weight_norm``-parametrized
    weight went into the weight the parametrization recomputes (lost, no error), and the
    hook-based ``weight_norm``, refused eagerly, was accepted (its imprint lasted one step).
    Compiled with ``fullgraph=False`` the imprint now runs eagerly (a graph break until it is
    behind): the weights equal eager's; the hook is refused before any state changes;
    ``fullgraph=True`` stops and names the way out."""
    import copy
    import inspect
    import warnings

    import torch._dynamo
    from torch.nn.utils.parametrizations import weight_norm

    counts = torch.tensor([2, 3, 5, 20, 40, 80])

    def head():
        torch.manual_seed(0)
        return LEAPMarginHead(
            D, C, class_counts=counts, seed=0, warmup_steps=1, imprint_step=2, validate=False
        )

    def steps(fn, module, start, stop):
        for step in range(start, stop):
            fn(*make_batch(step, 24, D, C)).backward()
            with torch.no_grad():
                for p in module.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None

    torch._dynamo.reset()
    eager = head()
    weight_norm(eager, "weight", dim=0)
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, backend="aot_eager")
    for step in range(4):
        steps(eager, eager, step, step + 1)
        steps(fn, compiled, step, step + 1)
        torch.testing.assert_close(compiled.weight, eager.weight, atol=1e-5, rtol=1e-5)
    assert compiled.feature_cloud.imprint_behind and int(compiled.feature_cloud.step) == 4

    hooked = head()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm: deprecated
        torch.nn.utils.weight_norm(hooked, "weight")
    before = {k: v.clone() for k, v in hooked.state_dict().items()}
    with pytest.raises(ValueError, match="hook-based .*parametrizations.weight_norm"):
        torch.compile(hooked, backend="aot_eager")(*make_batch(0, 24, D, C))
    assert all(torch.equal(v, before[k]) for k, v in hooked.state_dict().items())

    torch._dynamo.reset()
    full = head()
    weight_norm(full, "weight", dim=0)
    with pytest.raises(Exception) as err:
        torch.compile(full, backend="aot_eager", fullgraph=True)(*make_batch(0, 24, D, C))
    if "reason" in inspect.signature(torch.compiler.disable).parameters:  # named in the error
        assert "compile afterwards" in str(err.value)
    steps(full, full, 0, 3)  # the steps up to the imprint eagerly, then compile
    steps(torch.compile(full, backend="aot_eager", fullgraph=True), full, 3, 5)
    assert int(full.feature_cloud.step) == 5


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_gradient_accumulation_over_the_imprint_step_is_refused_before_the_step(impl):
    """Reliability trial: two forwards and one backward, the second forward at
    ``imprint_step``: the imprint overwrote the weight the first graph had saved, and torch
    raised in the backward after the step had been taken. Refused at the forward, nothing
    changed; after that backward the imprint runs. A forward whose graph was dropped without
    a backward (a logged loss) does not hold it up; an accumulation cycle that starts at the
    imprint step runs as without accumulation."""
    from feature_cloud.integrations.pml import LEAPLoss

    counts = torch.tensor([2, 3, 5, 20, 40, 80])

    def build(cls=LEAPMarginHead):
        torch.manual_seed(0)
        if cls is LEAPLoss:
            return LEAPLoss(C, D, class_counts=counts, seed=0, imprint_step=3, impl=impl)
        return LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=3, impl=impl)

    for cls in (LEAPMarginHead, LEAPLoss):
        head = build(cls)
        for step in range(2):
            head(*make_batch(step, 24, D, C)).backward()
        pending = head(*make_batch(2, 24, D, C))  # micro-batch 1 of 2
        before = {k: v.clone() for k, v in head.state_dict().items()}
        with pytest.raises(RuntimeError, match="imprint_step=3: a training forward's loss"):
            head(*make_batch(3, 24, D, C))
        assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
        pending.backward()
        head(*make_batch(3, 24, D, C)).backward()  # the imprint step, now allowed
        assert head.feature_cloud._imprinted == 3

    head = build()
    for step in range(5):
        x, y = make_batch(step, 24, D, C)
        if step == 2:
            head(x, y)  # a loss computed and never backpropagated: its graph is freed
            head.eval()
            kept = head(x, y)  # review: an eval-mode loss kept for logging (grad on) is no step
            head.train()
        head(x, y).backward()
    assert head.feature_cloud._imprinted == 3 and kept.requires_grad


def test_imprint_step_is_checked_by_name():
    for kwargs in (
        dict(imprint_step=-1),
        dict(imprint_step=2, cloud=None),
        dict(imprint_step=2, prototype_shrinkage=None),
    ):
        with pytest.raises(ValueError, match="imprint_step"):
            LEAPMarginHead(D, C, class_counts=[3] * C, **kwargs)


def test_an_imprint_step_assigned_behind_the_current_step_is_refused():
    """At step 5, ``head.imprint_step = 2`` was taken and never imprinted (s51 trial); refused
    now, naming the current step. The current step and later ones imprint as before."""
    head = LEAPMarginHead(D, C, class_counts=[3] * C, seed=0)
    for step in range(5):
        head(*make_batch(step, 12, D, C))
    with pytest.raises(ValueError, match="imprint_step=2 is behind the current step 5"):
        head.imprint_step = 2
    assert head.imprint_step is None
    head.imprint_step = 5
    before = head.weight.detach().clone()
    head(*make_batch(5, 12, D, C))
    assert not torch.equal(head.weight, before)  # no optimiser: the imprint moved it
    head.imprint_step = 5  # (the value it holds: unchanged, taken)


def test_the_cloud_turned_off_under_an_imprint_step_is_refused_as_at_construction():
    """``imprint_step=2`` then ``head.cloud = None`` was taken (and nothing imprinted), while
    the constructor refuses the two together; refused now, naming both (the other order was
    refused already)."""
    head = LEAPMarginHead(D, C, class_counts=[3] * C, seed=0, imprint_step=2)
    with pytest.raises(ValueError, match=r"cloud=None \(rule=None\) with imprint_step=2"):
        head.cloud = None
    with pytest.raises(ValueError, match="imprint_step=2"):
        head.feature_cloud.rule = None
    assert head.cloud == "full"
    head.imprint_step = None
    head.cloud = None
    with pytest.raises(ValueError, match="it needs a cloud rule"):
        head.imprint_step = 2


def test_imprint_resumes_from_a_checkpoint_like_an_uninterrupted_run():
    """Training with SGD through the imprint step, stopped before it and resumed from
    ``state_dict``s into fresh modules, ends bit-identical to the run that never stopped (the
    step counter travels with the state, so the imprint happens once, at the same step)."""
    counts = torch.tensor([2, 3, 5, 20, 40, 80])

    def build():
        torch.manual_seed(0)
        head = LEAPMarginHead(D, C, class_counts=counts, seed=1, warmup_steps=1, imprint_step=4)
        return head, torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)

    def train(head, opt, steps):
        for step in steps:
            x, y = make_batch(step, 24, D, C)
            opt.zero_grad()
            head(x, y).backward()
            opt.step()

    whole, opt = build()
    train(whole, opt, range(8))
    first, opt = build()
    train(first, opt, range(3))
    state = {"head": first.state_dict(), "opt": opt.state_dict()}
    resumed, opt = build()
    resumed.load_state_dict(state["head"])
    opt.load_state_dict(state["opt"])
    train(resumed, opt, range(3, 8))
    assert torch.equal(resumed.weight, whole.weight)
    never, opt = build()
    never.feature_cloud.imprint_step = None
    train(never, opt, range(8))
    assert not torch.allclose(never.weight, whole.weight)


@pytest.mark.parametrize("sub_centers", [1, 3])
def test_as_linear_is_the_eval_logits_in_any_mode_and_a_copy(sub_centers):
    """``head.as_linear()`` on normalised embeddings gives the eval-mode ``head.logits`` (the
    prototypes, not the raw weights a train-mode head scores), from a train-mode head too, and
    stays as exported while the head trains on; ``prototype_shrinkage=None``: the weights."""
    torch.manual_seed(0)
    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0, sub_centers=sub_centers)
    x, y = make_batch(0, 48, D, C)
    for _ in range(3):
        head(x, y)
    assert head.training
    linear = head.as_linear()
    assert head.training and linear.bias is None
    assert linear.weight.shape == (C * sub_centers, D)
    out = linear(F.normalize(x))
    served = out if sub_centers == 1 else out.view(len(x), C, sub_centers).amax(-1)
    train_logits = head.logits(x)
    head.eval()
    torch.testing.assert_close(served, head.logits(x), rtol=1e-5, atol=1e-5)
    assert (served - train_logits).abs().max() > 0.1  # not the raw weights' logits
    head.train()
    head(x, y)
    torch.testing.assert_close(linear(F.normalize(x)), out, rtol=0, atol=0)
    paper = LEAPMarginHead(
        D, C, class_counts=counts, sub_centers=sub_centers, prototype_shrinkage=None
    )
    paper.load_state_dict(head.state_dict())
    torch.testing.assert_close(
        paper.as_linear().weight,
        paper.scale * F.normalize(paper.weight.detach(), dim=1),
        rtol=0,
        atol=0,
    )


def test_the_head_forwards_prototype_shrinkage_to_its_cloud():
    """``head.prototype_shrinkage = None`` (as a reader of the cloud's keyword would write it)
    scores the weights, checked as the keyword; PML's loss forwards it alike."""
    from feature_cloud.integrations.pml import LEAPLoss

    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0)
    x, y = make_batch(0, 48, D, C)
    head(x, y)
    head.eval()
    assert head.prototype_shrinkage == DEFAULT_PROTOTYPE_SHRINKAGE
    head.prototype_shrinkage = None
    assert head.feature_cloud.prototype_shrinkage is None and "prototype_shrinkage" not in vars(
        head
    )
    torch.testing.assert_close(
        head.logits(x), head.scale * FC.cosine_logits(x, head.weight), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="prototype_shrinkage"):
        head.prototype_shrinkage = -1.0
    loss = LEAPLoss(num_classes=C, embedding_size=D, class_counts=counts)
    loss.prototype_shrinkage = 3.0
    assert loss.feature_cloud.prototype_shrinkage == 3.0


@pytest.mark.parametrize("sub_centers", [1, 3])
def test_eval_logits_normalise_the_prototypes_once(monkeypatch, sub_centers):
    """s53 perf: eval-mode ``head.logits`` normalised the prototypes (already unit rows from
    ``center_prototypes``) a second time in ``cosine_logits``, a ``C x D`` pass and its
    temporaries on every call. Now ``cosine_logits(..., unit_weight=True)`` scores them as they
    are: the same logits to rounding. Train mode, ``prototype_shrinkage=None`` and a cloud
    subclass with its own ``prototypes`` still normalise."""
    from feature_cloud import heads
    from feature_cloud.cloud import FeatureCloud

    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0, sub_centers=sub_centers)
    x, y = make_batch(0, 48, D, C)
    for _ in range(3):
        head(x, y)
    head.eval()
    proto = head.feature_cloud.prototypes(head.weight, sub_centers)
    torch.testing.assert_close(proto.norm(dim=1), torch.ones(len(proto)))
    before = FC.cosine_logits(x, proto, sub_centers) * head.scale  # normalised twice
    seen = []
    cosine = FC.cosine_logits

    def spy(*args, **kwargs):
        seen.append(kwargs.get("unit_weight", False))
        return cosine(*args, **kwargs)

    monkeypatch.setattr(heads.FC, "cosine_logits", spy)
    after = head.logits(x)
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-5)
    assert seen == [True]
    head.train()
    head.logits(x)
    head.eval()
    head.prototype_shrinkage = None
    torch.testing.assert_close(
        head.logits(x), head.scale * cosine(x, head.weight, sub_centers), rtol=0, atol=0
    )
    assert seen == [True, False, False]
    head.prototype_shrinkage = 10.0

    class Doubled(FeatureCloud):  # not unit rows: must be normalised
        def prototypes(self, weight, sub_centers=1, class_start=0, *, inference=False):
            return 2.0 * super().prototypes(weight, sub_centers, class_start, inference=inference)

    cloud = Doubled(C, D, "full", class_counts=counts)
    cloud.load_state_dict(head.feature_cloud.state_dict())
    assert heads.scoring_weight(cloud.eval(), head.weight, sub_centers)[1] is False
    # unit_weight=True takes the rows as they are (a non-unit weight is not normalised)
    w = torch.randn(C, D)
    torch.testing.assert_close(
        FC.cosine_logits(x, 3.0 * F.normalize(w, dim=1), unit_weight=True),
        3.0 * FC.cosine_logits(x, w),
    )
    # the export skips the second normalisation too and still equals the eval logits
    linear = head.as_linear()
    out = linear(F.normalize(x))
    out = out if sub_centers == 1 else out.view(len(x), C, sub_centers).amax(-1)
    torch.testing.assert_close(out, head.logits(x), rtol=1e-5, atol=1e-5)


def test_imprint_step_refuses_a_pruned_weight():
    """s54 ecosystem 3: torch.nn.utils.prune recomputes weight = weight_orig * weight_mask in a
    forward pre-hook, so the imprint was lost without a word (the weight did not change at
    imprint_step); refused at the first training step, before any state changes."""
    from torch.nn.utils import prune

    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=2)
    prune.l1_unstructured(head, "weight", amount=0.3)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError, match="L1Unstructured .*prune.*prune.remove"):
        head(*make_batch(0, 24, D, C))
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    prune.remove(head, "weight")  # the way out the message names: the imprint reaches it
    head(*make_batch(0, 24, D, C))
    head(*make_batch(1, 24, D, C))
    weight = head.weight.detach().clone()
    head(*make_batch(2, 24, D, C))  # the imprint step
    assert not torch.equal(head.weight, weight)


@pytest.mark.parametrize("hook", ["prune", "weight_norm"])
def test_eval_scoring_reads_the_weight_a_forward_pre_hook_computes(hook):
    """s54 ecosystem 2: with torch.nn.utils.prune (or the hook-based weight_norm) ``weight`` is
    recomputed only in forward, so logits / as_linear scored the weight of the last forward,
    before the optimiser's step (up to 21 logits off at s=64), and after a load the fresh
    module's random one. They score the weight forward would compute."""
    import warnings

    from torch.nn.utils import prune

    def wrap(module):
        if hook == "prune":
            prune.l1_unstructured(module, "weight", amount=0.3)
            return lambda m: m.weight_orig * m.weight_mask
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm: deprecated
            torch.nn.utils.weight_norm(module, "weight")
        return lambda m: m.weight_g * m.weight_v / m.weight_v.norm(dim=1, keepdim=True)

    torch.manual_seed(0)
    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, scale=64.0, class_counts=counts, prototype_shrinkage=None)
    current = wrap(head)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        head(*make_batch(step, 24, D, C)).backward()
        opt.step()
    q = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    want = 64.0 * F.normalize(q) @ F.normalize(current(head).detach()).t()
    torch.testing.assert_close(head.eval().logits(q), want)
    torch.testing.assert_close(head.as_linear()(F.normalize(q)), want)
    fresh = LEAPMarginHead(D, C, scale=64.0, class_counts=counts, prototype_shrinkage=None)
    if hook == "prune":
        prune.identity(fresh, "weight")
    else:
        wrap(fresh)
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh.eval().logits(q), want)
    torch.testing.assert_close(fresh.as_linear()(F.normalize(q)), want)


@pytest.mark.parametrize("hook", ["prune", "weight_norm"])
def test_sharded_shard_logits_read_the_weight_a_forward_pre_hook_computes(hook):
    """s54 review 2, finding 2 (a): the sharded head scored ``self.weight`` in
    ``shard_logits`` / ``logits``, which prune and the hook-based weight_norm recompute only in
    forward: the weight before the optimiser's last step (up to 23 logits off at s=64). It
    scores the weight forward would compute, as the dense head does."""
    import warnings

    from torch.nn.utils import prune

    from feature_cloud.distributed import ShardedLEAPMarginHead

    torch.manual_seed(0)
    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = ShardedLEAPMarginHead(
        D, C, scale=64.0, class_counts=counts, seed=0, prototype_shrinkage=None
    )
    if hook == "prune":
        prune.l1_unstructured(head, "weight", amount=0.3)
        current = lambda m: m.weight_orig * m.weight_mask
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm: deprecated
            torch.nn.utils.weight_norm(head, "weight")
        current = lambda m: m.weight_g * m.weight_v / m.weight_v.norm(dim=1, keepdim=True)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for step in range(3):
        opt.zero_grad()
        head(*make_batch(step, 24, D, C)).backward()
        opt.step()
    q = torch.randn(7, D, generator=torch.Generator().manual_seed(5))
    want = 64.0 * F.normalize(q) @ F.normalize(current(head).detach()).t()
    head.eval()
    torch.testing.assert_close(head.shard_logits(q), want)
    torch.testing.assert_close(head.logits(q), want)


def test_sharded_imprint_refuses_a_recomputed_weight_and_reaches_a_parametrized_one():
    """s54 review 2, finding 2 (b): the sharded head imprinted into ``self.weight`` with
    neither of the dense head's checks: under prune / the hook-based weight_norm the next
    forward recomputed the weight and, under ``parametrizations.weight_norm``, the imprint went
    into a computed tensor: lost, without a word, each time. Refused as the dense head refuses
    them, at the first training step before any state changes; a parametrization's
    ``right_inverse`` sets it."""
    import warnings

    from torch.nn.utils import prune
    from torch.nn.utils.parametrizations import weight_norm

    from feature_cloud.distributed import ShardedLEAPMarginHead, consolidate_state_dicts

    counts = torch.tensor([2, 3, 5, 20, 40, 80])

    def build(imprint_step=2):
        torch.manual_seed(0)
        return ShardedLEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=imprint_step)

    for wrap, match in (
        (lambda h: prune.l1_unstructured(h, "weight", amount=0.3), "L1Unstructured .*prune"),
        (torch.nn.utils.weight_norm, "hook-based WeightNorm"),
    ):
        head = build()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # weight_norm: deprecated
            wrap(head)
        before = {k: v.clone() for k, v in head.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            head(*make_batch(0, 24, D, C))
        assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
        head.eval()
        head(*make_batch(0, 24, D, C))  # no imprint in eval mode: no refusal

    def run(parametrization, imprint_step=2):
        head = build(imprint_step)
        if parametrization is not None:
            parametrization(head)
        for step in range(3):
            head(*make_batch(step, 24, D, C))
        return head

    plain, normed = run(None), run(lambda h: weight_norm(h, "weight", dim=0))
    torch.testing.assert_close(normed.weight, plain.weight, atol=1e-5, rtol=1e-5)
    assert (plain.weight - run(None, imprint_step=None).weight).abs().max() > 0.1  # imprinted
    dense = LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=2)
    dense.load_state_dict(consolidate_state_dicts([build().state_dict()]))  # the same start
    for step in range(3):
        dense(*make_batch(step, 24, D, C))
    torch.testing.assert_close(plain.weight, dense.weight)


def test_a_plain_weight_reads_no_step_while_the_imprint_is_ahead():
    """A plain weight (no parametrization, no recomputing hook) needs no check of the step
    before the imprint: the training steps before, at and after ``imprint_step`` dispatch no
    host read (the first step reads the step once, as every head does), in the core head and
    in the sharded head (one rank) and in PML's loss; the imprint still happens at its step.
    (s54 left it: the plain weight paid one host read a step until the imprint.)"""
    from conftest import SyncWatch
    from feature_cloud.distributed import ShardedLEAPMarginHead
    from feature_cloud.integrations.pml import LEAPLoss

    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    kw = dict(class_counts=counts, seed=0, warmup_steps=1, imprint_step=3, validate=False)
    head = LEAPMarginHead(D, C, **kw)
    sharded = ShardedLEAPMarginHead(D, C, **kw)
    pml = LEAPLoss(C, D, **kw)
    for module, weight in (
        (head, lambda: head.weight),
        (sharded, lambda: sharded.weight),
        (pml, lambda: pml.W.t()),
    ):
        x, y = make_batch(0, 24, D, C)
        module(x, y)  # the first training step reads the step once
        for step in range(1, 6):
            x, y = make_batch(step, 24, D, C)
            before = weight().detach().clone()
            with SyncWatch() as watch:
                module(x, y).backward()
            assert watch.syncs == [], (type(module).__name__, step, watch.syncs)
            assert torch.equal(weight(), before) != (step == 3), step


def test_an_interrupted_step_names_the_interpreters_traceback_and_how_to_drop_it(monkeypatch):
    """s55 notebook finding 5: a Ctrl-C between forward and backward, in an interpreter that
    keeps the last traceback (python -i, IPython, Jupyter: ``sys.last_traceback``), left that
    step's loss alive in the traceback's frame, and the imprint step refused with a message
    about gradient accumulation and ``del`` of a loss the user had no name for. The message
    now names the kept traceback and how to drop it; doing so lets training continue."""
    import gc
    import sys

    torch.manual_seed(0)
    counts = torch.tensor([2, 3, 5, 20, 40, 80])
    head = LEAPMarginHead(D, C, class_counts=counts, seed=0, imprint_step=3)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)

    def train(steps, interrupt_at=None):
        for i in range(steps):
            loss = head(*make_batch(i, 24, D, C))
            if i == interrupt_at:
                raise KeyboardInterrupt  # Ctrl-C lands between forward and backward
            opt.zero_grad()
            loss.backward()
            opt.step()

    try:
        train(5, interrupt_at=2)
    except KeyboardInterrupt:
        kind, value, tb = sys.exc_info()
    monkeypatch.setattr(sys, "last_type", kind, raising=False)  # what the interpreter does
    monkeypatch.setattr(sys, "last_value", value, raising=False)
    monkeypatch.setattr(sys, "last_traceback", tb, raising=False)
    monkeypatch.setattr(sys, "last_exc", value, raising=False)  # Python 3.12+
    del kind, value, tb  # the traceback's only holder: sys
    with pytest.raises(RuntimeError, match="a training forward's loss still waits") as info:
        train(2)
    message = str(info.value)
    assert "interrupted between its forward and backward" in message
    assert "as this one keeps one" in message
    assert "sys.last_exc = sys.last_value = sys.last_traceback = None; gc.collect()" in message
    del info
    sys.last_exc = sys.last_value = sys.last_traceback = None  # as the message says
    gc.collect()
    train(2)
    assert head.feature_cloud._imprinted == 3
