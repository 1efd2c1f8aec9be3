"""Settings assigned after construction: every constructor keyword of the cloud is an attribute
of the same name on the cloud and on the heads holding it, forwarded and checked where a run may
change it (a cloud-scale schedule), refused with the reason where it cannot change. A plain
attribute of that name (``nn.Module`` creates one silently) changed nothing: API review s50."""

from __future__ import annotations

import inspect
import pickle
import re

import pytest
import torch

from conftest import make_batch
from feature_cloud import ClassStatistics, FeatureCloud, LEAPMarginHead

D, C = 16, 12
COUNTS = [3, 40, 2, 30, 1, 25, 4, 50, 2, 35, 3, 45]

#: keyword -> (a new value, where the cloud holds it)
SETTABLE = {
    "cloud_mode": ("paper", lambda fc: fc.mode),
    "cloud_scale": (0.5, lambda fc: fc.scale),
    "prototype_shrinkage": (3.0, lambda fc: fc.prototype_shrinkage),
    "prototype_min_count": (5, lambda fc: fc.prototype_min_count),
    "gamma": (0.5, lambda fc: fc.statistics.gamma),
    "tail_threshold": (3, lambda fc: fc.statistics.tail_threshold),
    "center_rate": ("paper", lambda fc: fc.statistics.center_rate),
    "unknown_variance": ("pooled", lambda fc: fc.statistics.unknown_variance),
    "angle_max_age": (7, lambda fc: fc.statistics.max_age),
    "imprint_step": (9, lambda fc: fc.imprint_step),
}
#: keyword -> a new value (refused after construction)
FIXED = {
    "warmup_steps": 50,
    "memory_per_sample": 3,
    "count_steps": 4,
    "class_counts": [1] * C,
    "sync": "off",
}
#: a bad value of each settable keyword, and the words of its refusal
BAD = {
    "cloud_mode": ("x", "cloud_mode must be one of"),
    "cloud_scale": (-1.0, "cloud_scale must be in"),
    "prototype_min_count": (0, "prototype_min_count must be >= 1"),
    "gamma": (0.0, "gamma must be in"),
    "tail_threshold": (-1, "tail_threshold must be >= 0"),
    "center_rate": ("fast", "center_rate must be one of"),
    "unknown_variance": ("x", "unknown_variance must be one of"),
    "angle_max_age": (0, "angle_max_age must be >= 1"),
    "imprint_step": (-1, "imprint_step must be >= 0"),
}


def _holders():
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    return [("head", head, head.feature_cloud), ("cloud", head.feature_cloud, head.feature_cloud)]


@pytest.mark.parametrize("name", sorted(SETTABLE))
def test_a_settable_cloud_setting_reaches_the_cloud(name):
    value, where = SETTABLE[name]
    for what, owner, cloud in _holders():
        setattr(owner, name, value)
        assert where(cloud) == value, (what, name)
        assert getattr(owner, name) == value, (what, name)


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_settable_cloud_setting_is_checked(name):
    value, words = BAD[name]
    for what, owner, cloud in _holders():
        before = SETTABLE[name][1](cloud)
        with pytest.raises((TypeError, ValueError), match=re.escape(words)):
            setattr(owner, name, value)
        assert SETTABLE[name][1](cloud) == before, (what, name)


@pytest.mark.parametrize("name", sorted(FIXED))
def test_a_fixed_cloud_setting_refuses_an_assignment_saying_why(name):
    for what, owner, _cloud in _holders():
        before = getattr(owner, name)
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction \\(.+\\); "):
            setattr(owner, name, FIXED[name])
        after = getattr(owner, name)
        same = torch.equal(after, before) if isinstance(before, torch.Tensor) else after == before
        assert same, (what, name)
    with pytest.raises(AttributeError, match="synchronize"):
        _holders()[1][1].process_group = None


def test_every_cloud_keyword_is_an_attribute_of_the_cloud_and_of_the_head():
    """The repr prints the keywords: each is an attribute of that name, forwarded or refused
    (``seed``: the buffer on the cloud, an int on the head)."""
    keywords = set(inspect.signature(FeatureCloud.__init__).parameters) - {"self"}
    assert keywords - {"num_classes", "embedding_size", "process_group", "pad_to"} <= (
        set(SETTABLE) | set(FIXED) | {"rule", "seed"}
    )
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    for name in keywords:
        descriptor = inspect.getattr_static(FeatureCloud, name, None)
        assert isinstance(descriptor, property) or name in ("seed",), name
        getattr(head.feature_cloud, name)
    for name in set(SETTABLE) | set(FIXED) | {"seed", "process_group", "pad_to"}:
        assert isinstance(inspect.getattr_static(type(head), name, None), property), name


def test_the_statistics_group_is_refused_on_the_head_and_the_way_out_named_works():
    """``head.pad_to = 8`` / ``head.process_group = ...`` (dense head, PML's loss) were plain
    attributes that changed nothing (the cloud refused them); the refusal named
    ``feature_cloud.synchronize(...)``, which does not exist (s52 docs audit)."""
    pml = pytest.importorskip("feature_cloud.integrations.pml")
    import feature_cloud
    import feature_cloud.distributed

    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    loss = pml.LEAPLoss(num_classes=C, embedding_size=D, class_counts=COUNTS, seed=0)
    for owner in (head, loss, head.feature_cloud):
        for name, value in (("pad_to", 8), ("process_group", None)):
            with pytest.raises(AttributeError, match=f"^{name} is fixed at construction") as err:
                setattr(owner, name, value)
            assert name not in vars(owner)
            # the way out the message names exists
            call = re.search(r"call (feature_cloud\.[\w.]+)\(", str(err.value)).group(1)
            assert callable(eval(call, {"feature_cloud": feature_cloud})), call
        assert owner.pad_to is None and owner.process_group is None
    for owner in (head, loss):
        assert feature_cloud.distributed.synchronize(owner, None, pad_to=8) is owner
        assert owner.pad_to == 8 == owner.feature_cloud.statistics.pad_to


def test_the_reprs_name_attributes_with_the_values_shown():
    """``FeatureCloud`` printed ``cloud_mode=`` / ``cloud_scale=`` for attributes called
    ``mode`` / ``scale``, ``ClassStatistics`` ``cloud=`` for ``rule``: assigning the printed
    name did nothing and the repr kept the old value."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0, angle_max_age=3, imprint_step=5)
    for module in (head.feature_cloud, head.statistics):
        for name, shown in re.findall(r"(\w+)=('[^']*'|[^,]+)", module.extra_repr()):
            if name == "steps_taken":
                continue
            value = getattr(module, name)
            value = int(value) if isinstance(value, torch.Tensor) else value
            assert (repr(value) if isinstance(value, str) else str(value)) == shown, name
    head.feature_cloud.cloud_scale = 1.0
    assert "cloud_scale=1.0" in repr(head.feature_cloud)
    # the statistics' rule is their cloud's: set on the statistics alone it split the head's
    # state (head.cloud and the cloud's rule still said 'full'); refused, naming the way
    with pytest.raises(
        AttributeError, match=re.escape("head.cloud = ... (PML's LEAPLoss: loss.cloud")
    ):
        head.statistics.cloud = "vanilla"
    head.cloud = "vanilla"
    assert head.statistics.rule == "vanilla" == head.feature_cloud.rule
    assert "cloud='vanilla'" in repr(head.statistics)


def test_settings_assigned_on_the_statistics_are_checked_as_on_the_head():
    """``head.gamma = 5`` was refused while ``head.statistics.gamma = 5`` (and ``center_rate =
    "bogus"``, which then trained as ``"paper"``) was taken."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    for name, bad in (
        ("gamma", 5.0),
        ("center_rate", "bogus"),
        ("unknown_variance", "x"),
        ("tail_threshold", -1),
        ("max_age", 0),
    ):
        before = getattr(head.statistics, name)
        with pytest.raises(ValueError, match=name):
            setattr(head.statistics, name, bad)
        assert getattr(head.statistics, name) == before
    head.statistics.gamma = 0.25
    assert head.gamma == 0.25
    restored = pickle.loads(pickle.dumps(head))
    assert restored.statistics.gamma == 0.25 and restored.gamma == 0.25


def test_a_cloud_scale_schedule_changes_the_training_loss():
    """``head.cloud_scale = 0`` trains as a head built with ``cloud_scale=0`` (it used to keep
    the constructed scale, silently)."""
    x, y = make_batch(0, 48, D, C)
    built = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0, cloud_scale=0.0)
    scheduled = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    scheduled.load_state_dict(built.state_dict())
    scheduled.cloud_scale = 0.0
    torch.testing.assert_close(scheduled(x, y), built(x, y), rtol=0, atol=0)


def test_the_rule_errors_name_the_argument_given():
    """``FeatureCloud(rule="ful")`` was told ``cloud must be one of``."""
    with pytest.raises(ValueError, match="^rule must be one of"):
        FeatureCloud(C, D, rule="ful", class_counts=COUNTS)
    with pytest.raises(ValueError, match="^cloud must be one of"):
        LEAPMarginHead(D, C, cloud="ful", class_counts=COUNTS)
    head = LEAPMarginHead(D, C, class_counts=COUNTS)
    with pytest.raises(ValueError, match="^cloud must be one of"):
        head.cloud = "ful"
    with pytest.raises(ValueError, match="^rule must be one of"):
        head.feature_cloud.rule = "ful"
    head.feature_cloud.rule = "vanilla"  # through set_rule: the statistics follow
    assert head.cloud == "vanilla" and head.statistics.rule == "vanilla"
    with pytest.raises(ValueError, match="^cloud must be one of"):
        ClassStatistics(C, D, cloud="ful")


def test_the_head_seed_is_settable_and_reseeds_the_cloud():
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    head.seed = 7
    assert head.seed == 7 and int(head.feature_cloud.seed) == 7
    with pytest.raises(TypeError, match="seed must be an integer"):
        head.seed = 1.5


def test_a_cloud_scale_far_above_the_evaluated_range_warns():
    """``cloud_scale=32`` (the logit scale given to the cloud, e.g. fastreid's
    ``FEATURE_CLOUD.SCALE``) was accepted silently: above 8 (twice the largest the evaluations
    tried) it warns, at construction and on assignment; the tried range says nothing."""
    import warnings

    with pytest.warns(UserWarning, match=r"cloud_scale=32.0 multiplies the cloud's standard"):
        LEAPMarginHead(D, C, class_counts=COUNTS, cloud_scale=32.0)
    head = LEAPMarginHead(D, C, class_counts=COUNTS)
    with pytest.warns(UserWarning, match="MODEL.HEADS.SCALE"):
        head.cloud_scale = 16.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (0.0, 1.0, 2.0, 4.0, 8.0):
            head.cloud_scale = scale


def test_a_small_scale_leaves_the_margins_unit_check_to_run():
    """A scale too small to train (not swapped with the margin) warned alone: an ArcFace margin
    of 28.6 (degrees, 1639 degrees as radians) went unnamed beside it."""
    with pytest.warns(UserWarning) as caught:
        LEAPMarginHead(D, 751, "arcface", 4.0, 28.6, class_counts=torch.full((751,), 5))
    texts = [str(w.message) for w in caught]
    assert any("too small to train" in t for t in texts), texts
    assert any("degrees" in t for t in texts), texts


def test_an_in_place_op_on_a_fixed_tensor_setting_leaves_the_state_as_it_was():
    """``head.class_counts += 1`` changed ``K_i`` in place (the getter returned the buffer)
    before the assignment was refused: counts ``[4, 41, ...]`` against a memory laid out for
    ``[3, 40, ...]``; ``*= 0`` zeroed them and training went on (s51 trial)."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    for owner in (head, head.feature_cloud):
        with pytest.raises(AttributeError, match="class_counts is fixed at construction"):
            owner.class_counts += 1
        with pytest.raises(AttributeError, match="class_counts is fixed at construction"):
            owner.class_counts *= 0
        assert head.statistics.class_counts.tolist() == COUNTS
    assert head.class_counts.tolist() == COUNTS == head.feature_cloud.class_counts.tolist()


def test_a_fixed_setting_refusal_names_the_class_it_was_assigned_on():
    """The head's refusal said ``build a new FeatureCloud with memory_per_sample=3``: the user
    holds a LEAPMarginHead (the head forwards to its cloud)."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    with pytest.raises(AttributeError, match="build a new LEAPMarginHead with memory_per_sample=3"):
        head.memory_per_sample = 3
    with pytest.raises(AttributeError, match="build a new FeatureCloud with warmup_steps=5"):
        head.feature_cloud.warmup_steps = 5
    with pytest.raises(AttributeError, match="build a new LEAPMarginHead with count_steps=2"):
        head.count_steps = 2
    error = pickle.loads(pickle.dumps(AttributeError("x")))  # (the refusal pickles, too)
    try:
        head.warmup_steps = 5
    except AttributeError as exc:
        error = pickle.loads(pickle.dumps(exc))
    assert "LEAPMarginHead with warmup_steps=5" in str(error)


@pytest.mark.parametrize(
    "name, value",
    [
        ("rule", "vanilla"),
        ("rule", "bogus"),
        ("memory_per_sample", 3),
        ("count_updates", 4),
        ("num_classes", 3),
        ("embedding_size", 8),
    ],
)
def test_statistics_settings_that_split_the_state_or_size_buffers_are_refused(name, value):
    """``head.statistics.rule = "vanilla"`` was taken while ``statistics.cloud`` was refused: the
    head reported ``'full'`` and trained the vanilla rule; ``memory_per_sample = 3`` read 3 with
    the memory laid out for 1; ``count_updates`` changed the window ``head.count_steps``
    refuses (s51 trial)."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    stats = head.statistics
    before = getattr(stats, name)
    with pytest.raises(AttributeError, match=f"^{name} is fixed at construction"):
        setattr(stats, name, value)
    assert getattr(stats, name) == before
    assert head.cloud == stats.rule == stats.cloud == "full"
    if name in ("num_classes", "embedding_size"):  # the cloud's read its statistics'
        with pytest.raises(AttributeError, match=f"^{name} is fixed at construction"):
            setattr(head.feature_cloud, name, value)


def test_the_statistics_rule_follows_the_owner_and_survives_pickles():
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    with pytest.raises(AttributeError, match=re.escape("head.cloud = ... (PML's LEAPLoss")):
        head.statistics.rule = "vanilla"
    head.cloud = "vanilla"
    assert head.statistics.rule == "vanilla" == head.statistics.cloud
    # the ranks' settings name the rule once, as cloud: a mismatch listed statistics.rule too
    names = [name for name, _ in head.feature_cloud.agreed_settings()]
    assert names.count("cloud") == 1 and not any("rule" in name for name in names)
    restored = pickle.loads(pickle.dumps(head))
    assert restored.statistics.rule == "vanilla" and restored.statistics.memory_per_sample == 1
    # a whole-module pickle of an earlier release held them as plain attributes
    state = head.statistics.__getstate__()
    for name in ("rule", "memory_per_sample", "count_updates", "num_classes", "embedding_size"):
        state[name] = state.pop("_" + name)
    old = ClassStatistics.__new__(ClassStatistics)
    old.__setstate__(state)
    assert (old.rule, old.memory_per_sample, old.num_classes, old.embedding_size) == (
        "vanilla",
        1,
        C,
        D,
    )


def test_the_layout_the_ranks_compare_follows_every_layout():
    """s52 ddp finding 1: ``class_counts`` are among the agreed settings, as a host summary
    (``statistics.layout_setting``) kept where the memory is laid out; it must follow each such
    place (or two ranks with the same counts would refuse each other, or differing counts
    pass). tests/core/test_rank_agreement.py runs the ranks."""
    text = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0).statistics.layout_setting
    assert text.startswith("[3, 40, 2, 30, 1, 25, ...] (sum 240, digest ")
    head = LEAPMarginHead(D, C, seed=0, warmup_steps=2, count_steps=2)
    stats = head.statistics
    assert ("class_counts", stats.layout_setting) in head.feature_cloud.agreed_settings()
    assert stats.layout_setting == "counted online (not laid out yet)"
    stats.allocate_memory(COUNTS)
    assert stats.layout_setting == text
    stats.reset_parameters()  # no constructor counts: counted online again
    assert stats.layout_setting == "counted online (not laid out yet)"
    head.load_state_dict(LEAPMarginHead(D, C, class_counts=COUNTS, seed=0).state_dict())
    assert stats.layout_setting == text
    with torch.device("meta"):  # host counts: no read of the meta buffer
        meta = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    assert meta.statistics.layout_setting == text
    # a whole-module pickle of an earlier release has no summary: read from its buffers once
    state = stats.__getstate__()
    del state["_layout_text"]
    old = ClassStatistics.__new__(ClassStatistics)
    old.__setstate__(state)
    assert old.layout_setting == text
    assert pickle.loads(pickle.dumps(head)).statistics.layout_setting == text


@pytest.mark.parametrize(
    "name, value", [("num_classes", 9), ("embedding_size", 8), ("sub_centers", 3)]
)
def test_the_heads_sizes_are_refused_on_assignment(name, value):
    """``head.sub_centers = 3`` was taken, and the next step raised ``index 5 is out of
    bounds`` after the statistics had moved; ``head.num_classes = 9`` made the repr say 9 with
    6 weight rows (s51 trial)."""
    x, y = make_batch(0, 24, D, C)
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    head(x, y)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    before = getattr(head, name)
    with pytest.raises(AttributeError, match=f"^{name} is fixed at construction .+ weight"):
        setattr(head, name, value)
    assert getattr(head, name) == before
    with pytest.raises(AttributeError, match=f"build a new LEAPMarginHead with {name}={value}"):
        setattr(head, name, value)
    assert all(torch.equal(v, state[k]) for k, v in head.state_dict().items())
    head(x, y)  # trains on
    restored = pickle.loads(pickle.dumps(head))
    assert getattr(restored, name) == before


def test_the_margin_rule_is_fixed_like_the_margin_type():
    """``margin_type = "arcface"`` was refused while ``margin_rule = <arcface>`` was taken:
    the loss changed to ArcFace and the repr read ``margin_type='arcface'``."""
    from feature_cloud import margins

    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    with pytest.raises(AttributeError, match="margin_rule is fixed at construction"):
        head.margin_rule = margins.get("arcface")
    assert head.margin_type == "cosface"


def test_validate_and_reduction_are_checked_on_assignment():
    """``head.validate = "no"`` kept validating (a truthy string), ``head.reduction = "avg"``
    was taken and raised only in the next forward."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    for value in ("no", 0, None):
        with pytest.raises(TypeError, match="validate must be True or False"):
            head.validate = value
    with pytest.raises(TypeError, match="validate must be True or False"):
        LEAPMarginHead(D, C, class_counts=COUNTS, validate="no")
    assert head.validate is True
    head.validate = False
    assert head.validate is False
    for value in ("avg", None):
        with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'"):
            head.reduction = value
    assert head.reduction == "mean"
    head.reduction = "sum"
    assert "reduction='sum'" in repr(head)


def test_a_module_assigned_to_a_setting_is_refused_not_registered():
    """``nn.Module.__setattr__`` registers a Module before a property sees it:
    ``head.statistics = ClassStatistics(gamma=0.9)`` and ``head.cloud = FeatureCloud(...)``
    registered a second child (the head kept the old settings, its state dict gained
    ``statistics.*`` / ``cloud.*`` keys), ``head.scale = nn.Identity()`` a child ``scale``,
    ``head.cloud_scale = nn.Identity()`` a child of the cloud (s51 trial)."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    keys = list(head.state_dict())
    with pytest.raises(AttributeError, match="statistics are the feature cloud's"):
        head.statistics = ClassStatistics(C, D, gamma=0.9, class_counts=COUNTS)
    with pytest.raises(TypeError, match="head.cloud takes a rule .+ head.feature_cloud ="):
        head.cloud = FeatureCloud(C, D, "vanilla", class_counts=COUNTS)
    with pytest.raises(TypeError, match="scale must be a real number"):
        head.scale = torch.nn.Identity()
    with pytest.raises(TypeError, match="cloud_scale must be a real number"):
        head.cloud_scale = torch.nn.Identity()
    with pytest.raises(TypeError, match="imprint_step must be an integer"):
        head.imprint_step = torch.nn.Identity()
    assert list(head.state_dict()) == keys
    assert [name for name, _ in head.named_modules()] == [
        "",
        "feature_cloud",
        "feature_cloud.statistics",
    ]
    assert (head.gamma, head.cloud, head.scale, head.cloud_scale) == (0.1, "full", 24.0, 2.0)
    # a Parameter (an attempt at a learned setting) is refused: it was read as the number 0.5
    # and never learned (s51 review); a plain 0-d tensor is a number
    for name in ("gamma", "scale", "margin", "cloud_scale"):
        with pytest.raises(TypeError, match=rf"LEAPMarginHead.{name} is a setting.+not learned"):
            setattr(head, name, torch.nn.Parameter(torch.tensor(0.5)))
    with pytest.raises(TypeError, match="a tensor that requires grad .+ not learned"):
        head.scale = torch.tensor(30.0, requires_grad=True)
    assert (head.gamma, head.scale, head.cloud_scale) == (0.1, 24.0, 2.0)
    head.gamma = torch.tensor(0.5)
    assert head.gamma == 0.5 and [name for name, _ in head.named_parameters()] == ["weight"]


def test_a_feature_cloud_of_another_size_is_refused_as_at_construction():
    """``head.feature_cloud = FeatureCloud(9, D)`` on a 6-class head was taken and trained,
    while ``cloud=FeatureCloud(9, D)`` is refused at construction. A cloud the constructor
    would take may replace the head's (e.g. one built with another fixed setting)."""
    x, y = make_batch(0, 24, D, C)
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    cloud = head.feature_cloud
    for other in (
        FeatureCloud(C + 3, D, seed=1, class_counts=[5] * (C + 3)),
        FeatureCloud(C, 8, seed=1, class_counts=COUNTS),
    ):
        with pytest.raises(ValueError, match="the FeatureCloud is for num_classes="):
            head.feature_cloud = other
    with pytest.raises(TypeError, match="feature_cloud must be a FeatureCloud"):
        head.feature_cloud = ClassStatistics(C, D)
    with pytest.raises(TypeError, match="head.cloud = None"):
        head.feature_cloud = None
    assert head.feature_cloud is cloud
    wider = FeatureCloud(C, D, class_counts=COUNTS, seed=0, memory_per_sample=3)
    with pytest.warns(UserWarning, match="another memory_per_sample"):
        wider.load_state_dict(cloud.state_dict())
    wider.statistics.allocate_memory()  # P slots a sample
    head.feature_cloud = wider
    assert head.memory_per_sample == 3 and head.feature_cloud is wider
    head(x, y)


def test_a_vanilla_threshold_that_leaves_no_head_class_warns_when_assigned_too():
    """The constructor warns that ``cloud='vanilla', tail_threshold=100`` leaves no head class
    (every cloud zero); ``head.tail_threshold = 100`` said nothing, nor did ``head.cloud =
    "vanilla"`` under such a threshold (s51 trial). A threshold between the sizes is quiet."""
    import warnings

    head = LEAPMarginHead(D, C, cloud="vanilla", class_counts=COUNTS, seed=0)
    with pytest.warns(UserWarning, match="tail_threshold T=100: no head class"):
        head.tail_threshold = 100
    with pytest.warns(UserWarning, match="tail_threshold T=0: no tail class"):
        head.statistics.tail_threshold = 0
    full = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head.tail_threshold = 10
        full.tail_threshold = 100  # the full rule has no threshold
        off = LEAPMarginHead(D, C, cloud=None, class_counts=COUNTS, seed=0)
        off.tail_threshold = 100  # no cloud
    with pytest.warns(UserWarning, match="tail_threshold T=100: no head class"):
        full.cloud = "vanilla"


def test_given_class_counts_that_are_all_zero_warn_at_construction():
    """PML trial s57: ``class_counts=[0] * C`` (a count keyed by the wrong labels, a tensor never
    filled) trained silently with no angle memory and every class tail. It warns, attributed to
    the user's line, for the core head and PML's loss; no cloud (inference loading) and real
    counts stay quiet."""
    import warnings

    from feature_cloud.integrations.pml import LEAPLoss

    for build in (
        lambda counts: LEAPMarginHead(D, C, class_counts=counts, seed=0),
        lambda counts: FeatureCloud(C, D, class_counts=counts, seed=0),
        lambda counts: LEAPLoss(C, D, class_counts=counts, seed=0),
    ):
        with pytest.warns(UserWarning, match="class_counts are all 0: no class has an angle") as w:
            build(torch.zeros(C, dtype=torch.long))
        assert w[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build(COUNTS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LEAPMarginHead(D, C, cloud=None, class_counts=[0] * C, seed=0)


def test_the_synchronised_statistics_check_pad_to_and_batch_on_assignment():
    """``head.statistics.batch = "bogus"`` (the statistics of ``sync="auto"``) and ``pad_to =
    "x"`` were taken; ``FeatureCloud.pad_to`` refused while the statistics' own was plain."""
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    stats = head.statistics
    with pytest.raises(ValueError, match="batch must be one of"):
        stats.batch = "bogus"
    with pytest.raises(TypeError, match="pad_to must be an integer"):
        stats.pad_to = "x"
    assert (stats.batch, stats.pad_to) == ("local", None)
    stats.pad_to = 64
    assert head.feature_cloud.pad_to == 64
    restored = pickle.loads(pickle.dumps(head))
    assert restored.statistics.pad_to == 64 and restored.statistics.batch == "local"
