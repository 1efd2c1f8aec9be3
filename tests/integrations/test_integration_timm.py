"""LEAPTask against the real timm ``TrainingTask`` API (timm >= 1.0 ``timm.task``)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("timm.task")
from timm.task import TrainingTask, resume_task_checkpoint

from conftest import TORCH_VERSION, run_fresh_python, run_ftl_task
from feature_cloud import LEAPMarginHead
from feature_cloud import functional as FC
from feature_cloud.integrations.timm import (
    LEAPEvaluator,
    LEAPTask,
    create_backbone_and_head,
    create_ftl_model,
)

C = 6
COUNTS = [24, 24, 6, 6, 6, 6]


def _images(n_per_class, seed):
    """Class-dependent colour blocks plus noise, 3x32x32."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(C, 3, 1, 1, generator=torch.Generator().manual_seed(99)) * 2 - 1
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = colours[labels].expand(-1, 3, 32, 32).clone()
    x[:, :, :16] *= -1 * (labels.view(-1, 1, 1, 1) % 2 * 2 - 1)  # a label-dependent pattern
    x += 0.3 * torch.randn(x.shape, generator=g)
    return x, labels


def _task(seed=0, **kwargs):
    torch.manual_seed(seed)
    kw = dict(cloud="full", class_counts=COUNTS, seed=seed, scale=16.0, margin=0.2)
    kw.update(kwargs)
    return LEAPTask.from_timm("test_resnet", C, verbose=False, **kw)


def test_is_a_timm_training_task_and_builds_backbone_and_head():
    backbone, head = create_backbone_and_head("test_resnet", C, cloud=None)
    assert isinstance(head, LEAPMarginHead) and head.embedding_size == backbone.num_features
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, backbone.num_features)
    task = _task()
    assert isinstance(task, TrainingTask)
    assert task.get_eval_model() is task.backbone
    with pytest.raises(ValueError, match="num_features"):
        LEAPTask(backbone, LEAPMarginHead(backbone.num_features + 1, C, cloud=None), verbose=False)
    with pytest.raises(TypeError, match="LEAPMarginHead"):
        LEAPTask(backbone, torch.nn.Linear(backbone.num_features, C), verbose=False)


def test_a_whole_module_pickle_from_before_label_smoothing_trains():
    """A task pickled by the 12-02 / 12-03 / 12-05 releases: its trainable module has no
    ``label_smoothing`` (AttributeError in the first training forward); it trains without."""
    task = _task()
    x, y = _images(COUNTS, 0)
    x, y = x[:8], y[:8]
    pickled = copy.deepcopy(task)
    del vars(pickled.get_trainable_module())["label_smoothing"]
    old = pickle.loads(pickle.dumps(pickled))
    assert old.get_trainable_module().label_smoothing == 0.0
    old.train(), task.train()
    assert torch.equal(old(x, y)["loss"], task(x, y)["loss"])


def test_targets_of_the_wrong_type_or_shape_are_refused_before_the_backbone_runs():
    """A float, 2-D, short or out-of-range target and a NaN image are refused before the
    backbone's forward, so its BatchNorm running statistics do not take the refused batch
    (nothing of the task changes)."""
    from conftest import assert_same_state, state_snapshot

    task = _task()
    task.train()
    x, y = _images(COUNTS, 0)
    x, y = x[:16], y[:16]
    before = state_snapshot(task.get_trainable_module())
    for bad, error in ((y.float(), TypeError), (y[:, None], ValueError), (y[:15], ValueError)):
        with pytest.raises(error, match="target"):
            task(x, bad)
        assert_same_state(before, state_snapshot(task.get_trainable_module()), str(bad.shape))
    # attacker trial: an out-of-range target or a NaN image was refused by the head, after the
    # backbone's BatchNorm had taken the batch (a NaN image: NaN running means, then the EMA)
    nan_image = x.clone()
    nan_image[3, 0, 5, 5] = float("nan")
    for images, target, match in (
        (x, y.clone().fill_(C), r"target must lie in \[0, 6\)"),
        (nan_image, y, "inputs contain NaN"),
    ):
        with pytest.raises(ValueError, match=match):
            task(images, target)
        assert_same_state(before, state_snapshot(task.get_trainable_module()), match)
    task(x, y.int())  # any integer dtype is a target


def test_a_backbone_given_a_classifier_again_is_refused_before_it_runs():
    """``task.backbone.reset_classifier(7)`` made the backbone output 7 logits: the head refused
    them only after the backbone's BatchNorm had taken the batch. Now the classifier is named
    (with ``reset_classifier(0)``) before the backbone runs, for LEAPTask and FTLTask."""
    from conftest import assert_same_state, state_snapshot

    x, y = _images(COUNTS, 0)
    x, y = x[:8], y[:8]
    leap, ftl = _task(), _ftl_task()
    for task, module, path in (
        (leap, leap.backbone, "backbone"),
        (ftl, ftl.model.encoder, "encoder"),
    ):
        module.reset_classifier(7)
        task.train()
        before = state_snapshot(task.get_trainable_module())
        with pytest.raises(ValueError, match=rf"num_classes=7.*{path}\.reset_classifier\(0\)"):
            task(x, y)
        assert_same_state(before, state_snapshot(task.get_trainable_module()), path)
        module.reset_classifier(0)
        task(x, y)["loss"].backward()
    with pytest.raises(ValueError, match="reset_classifier"):
        leap.backbone.reset_classifier(3)
        leap.get_trainable_module()(x)  # the plain logits path too


def test_the_eval_models_refuse_a_backbone_given_a_classifier_again():
    """Training refused a backbone given a classifier again; the eval models did not: LEAP's
    (the backbone) returned (B, 7) logits as embeddings, FTL's failed with a matmul shape
    error. Both now name ``reset_classifier(0)``, FTL's before the encoder runs."""
    from conftest import assert_same_state, state_snapshot

    x = _images(COUNTS, 0)[0][:4]
    leap, ftl = _task(), _ftl_task()
    held = ftl.get_eval_model()  # an eval model fetched before the reset
    leap.backbone.reset_classifier(7)
    ftl.model.encoder.reset_classifier(7)
    with pytest.raises(ValueError, match=r"num_classes=7.*backbone\.reset_classifier\(0\)"):
        leap.get_eval_model()
    with pytest.raises(ValueError, match=r"num_classes=7.*encoder\.reset_classifier\(0\)"):
        ftl.get_eval_model()
    held.train()
    before = state_snapshot(ftl.get_trainable_module())
    with pytest.raises(ValueError, match=r"encoder\.reset_classifier\(0\)"):
        held(x)
    assert_same_state(before, state_snapshot(ftl.get_trainable_module()), "FTL eval model")
    leap.backbone.reset_classifier(0)
    ftl.model.encoder.reset_classifier(0)
    assert leap.get_eval_model()(x).shape == (4, leap.head.embedding_size)
    assert held(x).shape == (4, 32)


def test_an_unpooled_backbone_is_refused_before_it_runs():
    """``model_kwargs=dict(global_pool='')`` built a backbone of feature maps that the head
    refused only after the backbone had run (its BatchNorm took the batch); now refused when
    the task is built, and a backbone reset to ``global_pool=''`` later before it runs."""
    from conftest import assert_same_state, state_snapshot

    x = _images(COUNTS, 0)[0][:3]
    for build in (_task, _ftl_task):
        with pytest.raises(ValueError, match="global_pool=''.*unpooled feature maps"):
            build(model_kwargs=dict(global_pool=""))
    unpooled = timm.create_model("test_resnet", num_classes=0, global_pool="")
    with pytest.raises(ValueError, match="unpooled feature maps"):
        LEAPTask(unpooled, LEAPMarginHead(unpooled.num_features, C, cloud=None), verbose=False)
    x, y = _images(COUNTS, 0)
    x, y = x[:8], y[:8]
    for task, module in ((_task(), "backbone"), (_ftl_task(), "encoder")):
        task.get_trainable_module().get_submodule(module).reset_classifier(0, "")
        task.train()
        before = state_snapshot(task.get_trainable_module())
        with pytest.raises(ValueError, match=rf"{module}\.global_pool=''.*reset_classifier\(0"):
            task(x, y)
        assert_same_state(before, state_snapshot(task.get_trainable_module()), module)
        with pytest.raises(ValueError, match="unpooled"):
            task.get_eval_model()


def test_timm_classifier_methods_of_the_trainable_modules():
    """timm's ``get_classifier`` / ``forward_features`` / ``forward_head`` work on the LEAP
    and FTL modules; ``reset_classifier`` (timm's re-targeting, which would leave the head's class
    statistics sized for the old classes) is refused with what to do instead, for LEAP and FTL;
    nothing changes."""
    task = _task()
    module = task.get_trainable_module()
    assert module.get_classifier() is task.head
    x = _images(COUNTS, 0)[0][:4]
    module.eval()
    features = module.forward_features(x)
    torch.testing.assert_close(module.forward_head(features), module(x))
    torch.testing.assert_close(module.forward_head(features, pre_logits=True), task.backbone(x))
    ftl = _ftl_task().model
    assert ftl.get_classifier() is ftl.classifier
    ftl.eval()  # FTL's model had no forward_features / forward_head (left alone in s50)
    features = ftl.forward_features(x)
    torch.testing.assert_close(ftl.forward_head(features, pre_logits=True), ftl(x))
    torch.testing.assert_close(ftl.forward_head(features), ftl.logits(ftl(x)))
    for model in (module, ftl):
        state = copy.deepcopy(model.state_dict())
        with pytest.raises(NotImplementedError, match=r"reset_classifier\(10\).*get_eval_model"):
            model.reset_classifier(10)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_from_timm_refuses_num_classes_in_model_kwargs_and_forwards_timm_attributes():
    for build in (_task, _ftl_task):
        with pytest.raises(TypeError, match="model_kwargs sets num_classes=10.*num_classes=0"):
            build(model_kwargs=dict(num_classes=10))
    module = _task().get_trainable_module()
    assert module.num_classes == C and module.num_features == module.backbone.num_features
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, module.num_classes)


def test_a_missing_target_and_a_fractional_num_classes_are_refused_before_work():
    """timm trial s58: ``task(x, None)`` ran the backbone (its BatchNorm statistics moved)
    and then unpacked the logits: a batch of 8 failed with "too many values to unpack", a batch
    of 3 returned rows of the logits as the loss silently. ``from_timm(name, 6.7)`` built a
    6-class head (``int()``), ``"6"`` too; the head itself refuses both."""
    from conftest import assert_same_state, state_snapshot

    x = _images(COUNTS, 0)[0][:3]
    for build in (_task, _ftl_task):
        task = build()
        task.train()
        before = state_snapshot(task)
        with pytest.raises(TypeError, match=r"needs the batch's class indices: task\(input, targ"):
            task(x, None)
        assert_same_state(before, state_snapshot(task))
    assert _task().trainable_module(x).shape == (3, C)  # the logits, as the message says
    for bad in (6.7, "6"):
        with pytest.raises(TypeError, match="num_classes"):
            LEAPTask.from_timm("test_resnet", bad, class_counts=COUNTS, verbose=False)
        with pytest.raises(TypeError, match="num_classes"):
            create_ftl_model("test_resnet", bad)


def test_timm_mixup_targets_are_refused_and_label_smoothing_is_the_tasks():
    """timm's train.py with --mixup / --cutmix (Mixup / CutMix give (B, C) soft targets, its
    smoothing folded in): refused with what to do, for LEAPTask and FTLTask alike;
    ``label_smoothing`` is applied inside the margin loss instead."""
    from timm.data import Mixup

    task = _task(cloud=None)
    task.train()
    x, y = _images(COUNTS, 0)
    x, y = x[:16], y[:16]
    soft = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=C)(x, y)[1]
    with pytest.raises(TypeError, match=r"soft target of shape \(16, 6\).*--mixup 0"):
        task(x, soft)
    with pytest.raises(TypeError, match="soft target"):
        _ftl_task()(x, soft)
    smooth = _task(cloud=None, label_smoothing=0.1)
    smooth.trainable_module.load_state_dict(task.trainable_module.state_dict())
    smooth.train()
    emb = task.backbone(x)
    logits = FC.margin_logits(
        FC.cosine_logits(emb, task.head.weight), y, scale=task.head.scale, margin=task.head.margin
    )
    want = torch.nn.functional.cross_entropy(logits, y, label_smoothing=0.1)
    torch.testing.assert_close(smooth(x, y)["loss"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        _task(label_smoothing=1.0)


@pytest.mark.filterwarnings("ignore:LEAPMarginHead normalises W and f")  # test_timm_optim_ema.py
def test_training_steps_decrease_loss_and_update_statistics():
    task = _task(metric_l2=1e-3)
    x, y = _images(COUNTS, 0)
    opt = torch.optim.Adam(task.get_trainable_module().parameters(), lr=3e-3)
    task.train()
    losses = []
    for step in range(8):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(step))[:32]
        result = task(x[idx], y[idx])
        assert set(result) == {"loss", "output", "leap_loss", "metric_l2_loss"}
        assert result["output"].shape == (32, C)
        assert torch.allclose(result["loss"], result["leap_loss"] + result["metric_l2_loss"])
        opt.zero_grad()
        result["loss"].backward()
        opt.step()
        losses.append(float(result["leap_loss"].detach()))
    head = task.head
    assert head.step == 8
    assert int(head.statistics.memory_fill.sum()) > 0
    # a MetricL2 module is accepted as PML's LEAPLoss accepts it (review: TypeError from float())
    from feature_cloud import MetricL2

    assert _task(metric_l2=MetricL2(1e-3)).metric_l2.alpha == 1e-3
    import numpy as np  # numbers of a sweep: numpy scalars, one-element tensors (review)

    for alpha in (np.float32(0.5), np.int64(1), torch.tensor(0.25)):
        assert _task(metric_l2=alpha).metric_l2.alpha == float(alpha)
    with pytest.raises(TypeError, match="metric_l2 must be None, a float alpha or a MetricL2"):
        _task(metric_l2="0.1")
    assert float(head.statistics.cloud_variance().max()) > 0
    # plain margin loss on the full set, eval mode (no cloud, no statistics update)
    task.eval()
    with torch.no_grad():
        emb = task.get_eval_model()(x)
        final = float(head(emb, y))
    assert sum(losses[-2:]) / 2 < losses[0], losses
    assert final < losses[0]
    evaluator = task.create_evaluator()
    assert isinstance(evaluator, LEAPEvaluator)
    evaluator.update(emb, y)
    metrics = evaluator.compute()
    assert metrics["top1"] > 100.0 / C
    # eval mode: timm's evaluator and the trainable module score against the prototypes
    with torch.no_grad():
        plain = head.scale * FC.cosine_logits(emb, head.weight)
        proto = head.logits(emb)
        assert (proto - plain).abs().max() > 1e-3
        torch.testing.assert_close(task.get_trainable_module()(x), proto)

    # timm-real trial: the evaluator's top-1 followed the mode the loop left the head in (a timm
    # loop puts only the backbone in eval mode), and nothing showed the weights' own top-1
    # (the prototypes had moved it 35 head points). Inference logits always; top1_weights too.
    def top1(logits):
        return 100.0 * float(logits.argmax(1).eq(y).float().mean())

    for mode in (True, False):
        head.train(mode)
        ev = task.create_evaluator()
        ev.update(emb, y)
        got = ev.compute()
        assert got["top1"] == pytest.approx(top1(proto)), mode
        assert got["top1_weights"] == pytest.approx(top1(plain)), mode
        assert ev.summary()["top1_weights"] == got["top1_weights"]
        assert head.training is mode  # the loop's mode put back
    assert "top1_weights" in LEAPEvaluator.metric_names
    # a cloud-less head holding a LEAP head's centers (never in eval mode itself) scores the
    # prototypes, and the evaluator enters eval mode once an evaluation, not on every batch
    # (review: train() reads the centers on the host each time)
    from unittest import mock

    from feature_cloud.cloud import FeatureCloud

    plain_head = LEAPMarginHead(head.embedding_size, C, cloud=None, scale=16.0, margin=0.2)
    plain_head.load_state_dict(head.state_dict())
    ev = LEAPEvaluator(plain_head)
    with mock.patch.object(FeatureCloud, "train", autospec=True, wraps=FeatureCloud.train) as tr:
        for part in (slice(0, 40), slice(40, None)):
            ev.update(emb[part], y[part])
    assert tr.call_count == 1 and plain_head.training
    assert ev.compute()["top1"] == pytest.approx(top1(proto))


def test_the_evaluator_refuses_held_out_identities_by_name():
    """realuser: ``task.create_evaluator()`` on a re-ID test split (identities the head never
    trained on) crashed in torch's cross-entropy with "IndexError: Target 316 is out of
    bounds". Refused before anything is counted, naming the label range and retrieval on the
    eval model's embeddings instead."""
    task = _task()
    task.eval()
    with torch.no_grad():
        emb = task.get_eval_model()(torch.randn(4, 3, 32, 32))
    ev = task.create_evaluator()
    with pytest.raises(
        ValueError,
        match=rf"labels 0..{C + 5} reach outside the head's training "
        rf"classes 0..{C - 1}",
    ) as info:
        ev.update(emb, torch.tensor([C, C + 1, C + 5, 0]))  # 0: a training class
    assert "get_eval_model()" in str(info.value) and "retrieval_per_query" in str(info.value)
    with pytest.raises(ValueError, match="labels -1..2"):
        ev.update(emb, torch.tensor([-1, 0, 1, 2]))
    ev.update(emb, torch.tensor([0, 1, 2, 3]))  # nothing counted by the refused batches
    assert ev.num_samples == 4


def test_task_state_round_trips_through_a_timm_checkpoint(tmp_path):
    task = _task(seed=1)
    x, y = _images([8] * C, 1)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    task.train()
    for _ in range(3):
        opt.zero_grad()
        task(x, y)["loss"].backward()
        opt.step()
    state = task.get_checkpoint_state()
    assert set(state) == {"state_dict", "task_state"}
    # the eval model's state_dict is a plain timm backbone checkpoint
    plain = timm.create_model("test_resnet", num_classes=0)
    plain.load_state_dict(state["state_dict"])
    assert "feature_cloud.statistics.memory" in state["task_state"]["head"]
    path = os.path.join(str(tmp_path), "checkpoint.pth.tar")
    torch.save(dict(state, epoch=3, version=2), path)

    restored = _task(seed=7)
    epoch = resume_task_checkpoint(
        restored, path, log_info=False
    )  # timm's own loader, weights_only
    assert epoch == 4
    for (ka, va), (kb, vb) in zip(
        task.head.state_dict().items(), restored.head.state_dict().items()
    ):
        assert ka == kb
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), ka
    assert restored.head.step == task.head.step == 3
    # identical next training step: weights, statistics and the cloud RNG all restored
    restored.train()
    torch.manual_seed(0)
    a = task(x, y)["loss"]
    torch.manual_seed(0)
    b = restored(x, y)["loss"]
    assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="task_state"):
        restored.load_task_state(None)
    with pytest.raises(KeyError, match="head"):
        restored.load_task_state({"projection": {}})
    before = {k: v.clone() for k, v in restored.head.state_dict().items()}
    with pytest.raises(RuntimeError, match="Missing key"):  # attacker trial: a partial head
        restored.load_task_state({"head": {"weight": torch.zeros_like(restored.head.weight)}})
    assert all(torch.equal(v, before[k]) for k, v in restored.head.state_dict().items())


def test_ema_copy_carries_the_head():
    task = _task(seed=2)
    task.setup_ema(decay=0.5)
    assert task.has_ema()
    ema_backbone = task.get_eval_model(ema=True)
    assert ema_backbone is not task.backbone
    state = task.get_task_state(ema=True)
    assert set(state) == {"head"}
    if TORCH_VERSION < (2, 3):  # (s50 trial, timm 1.0.31 on torch 2.2.0)
        pytest.skip(
            "torch < 2.3 cannot deepcopy a torch.Generator, which timm's ModelEmaV3 holds "
            "(trainable_module_ema._sr_generator): timm's and torch's limit, not the head's"
        )
    copy.deepcopy(task)  # tasks are deep-copyable (timm EMA relies on it)


# ---------------------------------------------------------------- FTL option: FTLTask
from torch.utils.data import DataLoader, TensorDataset

from feature_cloud import FTLModel
from feature_cloud.ftl import IndexedDataset
from feature_cloud.integrations.timm import FTLEmbedding, FTLTask, create_ftl_model


def _ftl_task(seed=0, init_seed=None, **kwargs):
    torch.manual_seed(seed if init_seed is None else init_seed)
    kw = dict(
        stage0_iters=3,
        stage_iters=2,
        max_alternations=1,
        seed=seed,
        embedding_size=32,
        filter_hidden=64,
        decoder_shape=(3, 32, 32),
        decoder_channels=(16, 8),
        transfer_kwargs=dict(tail_threshold=10, energy=0.95),
        cloud="full",
        class_counts=COUNTS,
        scale=16.0,
        margin=0.2,  # LEAPMarginHead as FC
        flip=lambda x: x.flip(-1),
        verbose=False,
    )
    kw.update(kwargs)
    if seed is None:  # the task's default
        del kw["seed"]
    return FTLTask.from_timm("test_resnet", C, **kw)


def test_ftl_eval_model_pickles_whole_and_copies_without_the_training_model(tmp_path):
    """s55 deploy 3: ``torch.save(task.get_eval_model())`` failed (a lambda and the model's bound
    ``encode`` stored on ``FTLEmbedding``), and ``copy.deepcopy`` of it dragged the whole
    ``FTLModel`` along, its ``train()`` following the original model's frozen parts. It now
    holds ``Enc`` and ``R``; a copy keeps the parts frozen when it was made."""
    task = _ftl_task()
    model = task.model
    emb = task.get_eval_model().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = emb(x)
    torch.save(emb, tmp_path / "emb.pt")
    torch.save((x, ref), tmp_path / "ref.pt")
    run_fresh_python(
        f"""
import torch
emb = torch.load({str(tmp_path / "emb.pt")!r}, weights_only=False)
x, ref = torch.load({str(tmp_path / "ref.pt")!r})
assert type(emb).__name__ == "FTLEmbedding" and not emb.training
with torch.no_grad():
    assert torch.equal(emb(x), ref)
assert emb.frozen == () and emb.train().encoder.training
"""
    )
    model.set_frozen(["encoder"])
    live = task.get_eval_model()
    twin = copy.deepcopy(live)
    assert set(twin.state_dict()) == set(live.state_dict())
    assert not any(isinstance(v, FTLModel) or callable(v) for v in vars(twin).values())
    assert all(p is not q for p, q in zip(twin.parameters(), live.parameters()))
    model.set_frozen([])
    live.train()
    twin.train()
    assert live.encoder.training  # the eval model follows its training model
    assert not twin.encoder.training and twin.filter.training  # frozen when it was copied
    with torch.no_grad():
        assert torch.equal(twin.eval()(x), live.eval()(x))
    # the checks of FTLModel.encode / TimmFTLModel.encode
    model.encoder.reset_classifier(4)
    with pytest.raises(ValueError, match=r"Call encoder\.reset_classifier\(0\)"):
        FTLEmbedding(model)(x)
    flat = FTLModel(
        torch.nn.Flatten(),
        LEAPMarginHead(32, C, class_counts=COUNTS),
        feature_dim=12,
        alpha_recon=0,
        alpha_reg=0,
    )
    assert FTLEmbedding(flat).eval()(torch.randn(2, 3, 2, 2)).shape == (2, 32)
    with pytest.raises(ValueError, match=r"feature_dim=12\), got \(2, 18\)"):
        FTLEmbedding(flat)(torch.randn(2, 3, 2, 3))


class _PooledFTL(FTLModel):
    """A user's FTLModel whose encode pools a feature-map encoder and normalises g."""

    def encode(self, x):
        return torch.nn.functional.normalize(self.encoder(x).mean((2, 3)), dim=1)


def test_ftl_eval_model_encodes_with_the_models_own_encode_and_a_compiled_one_copies(tmp_path):
    """s55 review of the deploy fix: ``FTLEmbedding`` ran its own checks instead of a user
    subclass's ``encode`` (a feature-map encoder: refused; a normalising one: other embeddings
    without a word), and its ``__getstate__`` kept ``compile()``'s call, bound to the original
    module: a deepcopy ran the original's weights and ``torch.save`` failed. The model's own
    ``encode`` is used, live and in a copy (which then holds a copy of the model); a compiled
    eval model copies and pickles as nn.Module does."""
    torch.manual_seed(0)
    model = _PooledFTL(
        torch.nn.Conv2d(3, 16, 3),
        LEAPMarginHead(16, C, class_counts=COUNTS),
        feature_dim=16,
        alpha_recon=0,
        alpha_reg=0,
    ).eval()
    emb = FTLEmbedding(model).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(emb(x), ref, rtol=0, atol=0)
        torch.testing.assert_close(copy.deepcopy(emb)(x), ref, rtol=0, atol=0)
    torch.save(emb, tmp_path / "own.pt")
    with torch.no_grad():
        loaded = torch.load(tmp_path / "own.pt", weights_only=False)
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=0)
    plain = FTLEmbedding(_ftl_task().model).eval()
    plain.compile()
    twin = copy.deepcopy(plain)
    with torch.no_grad():
        for p in twin.filter.parameters():
            p.zero_()
        y = torch.randn(2, 3, 32, 32)
        assert torch.equal(twin(y), twin.forward(y))  # the copy's own weights
        assert not torch.equal(twin(y), plain.forward(y))
    torch.save(plain, tmp_path / "compiled.pt")


class _NeckFTL(FTLModel):
    """A user's FTLModel whose encode pools the encoder's map through a neck with BatchNorm."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.neck = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.BatchNorm1d(16))

    def encode(self, x):
        return self.neck(self.encoder(x).mean((2, 3)))


def test_ftl_eval_model_holds_the_parts_a_models_own_encode_uses(tmp_path):
    """s56 review: a subclass's encode that uses a part beside Enc (a neck) ran through the eval
    model, but the neck was not the eval model's: missing from its state_dict (a checkpoint of
    the eval model lost the neck's weights, an EMA left it unaveraged), left in train mode by
    ``eval()`` (BatchNorm's batch statistics at evaluation) and behind by ``.to()``. It is a
    submodule of the eval model now (shared with the model); a compiled model encodes too."""
    torch.manual_seed(0)

    def build():
        return _NeckFTL(
            torch.nn.Conv2d(3, 16, 3),
            LEAPMarginHead(16, C, class_counts=COUNTS),
            feature_dim=16,
            alpha_recon=0,
            alpha_reg=0,
        )

    model = build().train()
    emb = FTLEmbedding(model)
    assert emb.neck is model.neck and any(k.startswith("neck.") for k in emb.state_dict())
    assert not any(k.startswith(("classifier.", "decoder.")) for k in emb.state_dict())
    x = torch.randn(4, 3, 8, 8)
    model(x)  # a training step moves the neck's running statistics
    emb.eval()
    assert not model.neck.training
    with torch.no_grad():
        ref = emb(x)
        torch.testing.assert_close(ref, model.filter(model.encode(x)), rtol=0, atol=0)
        one = emb(x[:1])  # eval mode: one image embeds as in the batch
        torch.testing.assert_close(one, ref[:1], rtol=1e-5, atol=1e-6)
    # a user's checkpoint of the eval model carries the neck into a fresh model
    torch.save(emb.state_dict(), tmp_path / "emb.pth")
    fresh = FTLEmbedding(build()).eval()
    fresh.load_state_dict(torch.load(tmp_path / "emb.pth", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=0, atol=0)
    # timm's EMA averages the neck: a zeroed neck in the EMA copy after decay=0 comes back
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(emb, decay=0.0)
    with torch.no_grad():
        for p in ema.module.neck.parameters():
            p.zero_()
    ema.update(emb, step=10)
    with torch.no_grad():
        torch.testing.assert_close(ema.module(x), ref, rtol=0, atol=0)
    twin = copy.deepcopy(emb)  # the copy's neck is its own model's, not the original's
    assert twin.neck is twin.__dict__["_model"].neck and twin.neck is not model.neck
    emb.double()
    assert model.neck[0].weight.dtype == torch.float64
    assert FTLEmbedding(torch.compile(build())).neck is not None  # a compiled model: its class


def test_ftl_task_wraps_a_timm_backbone_and_leap_head():
    task = _ftl_task()
    assert isinstance(task, TrainingTask)
    model = task.model
    assert isinstance(model, FTLModel) and isinstance(model.classifier, LEAPMarginHead)
    backbone = model.encoder
    assert backbone.num_classes == 0 and model.feature_dim == backbone.num_features
    assert (model.alpha_recon, model.alpha_reg) == (
        1.0,
        0.0,
    )  # decoder on, m-L2 off with a margin head
    emb = task.get_eval_model()
    assert isinstance(emb, FTLEmbedding) and emb(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    linear = create_ftl_model("test_resnet", C, classifier="linear")
    assert (
        isinstance(linear.classifier, torch.nn.Linear)
        and linear.alpha_reg == 0.25
        and linear.decoder is None
    )
    with pytest.raises(TypeError, match="linear"):
        create_ftl_model("test_resnet", C, classifier="linear", cloud="full")
    # the paper's FTL (s53 paper trial 1, 4): linear FC, m-L2 0.25, a decoder, Eq. 1 per image
    paper = FTLTask.from_timm(
        "test_resnet",
        C,
        stage0_iters=3,
        classifier="linear",
        decoder_shape=(3, 32, 32),
        decoder_channels=(16, 8),
        recon_reduction="paper",
        transfer_kwargs={"class_counts": COUNTS, "tail_threshold": 10},
        verbose=False,
    ).model
    assert (paper.alpha_sfmx, paper.alpha_recon, paper.alpha_reg) == (1.0, 1.0, 0.25)
    assert paper.recon_reduction == "paper" and paper.classifier.bias is None
    assert task.model.recon_reduction == "mean"
    with pytest.raises(ValueError, match="recon_reduction must be one of"):
        create_ftl_model("test_resnet", C, classifier="linear", recon_reduction="sum")


def test_create_ftl_model_refuses_recon_reduction_before_building_the_backbone(monkeypatch):
    """s54 trial 4: a bad ``recon_reduction`` was refused only after the timm backbone had been
    built (seconds for a ResNet-50, and the global RNG advanced by the refused call)."""
    import feature_cloud.integrations.timm as tint

    def built(*args, **kwargs):
        raise AssertionError("the backbone was built before the refusal")

    monkeypatch.setattr(tint, "_headless_backbone", built)
    rng = torch.get_rng_state()
    for bad in ("sum", "PAPER", None):
        with pytest.raises(ValueError, match="recon_reduction must be one of"):
            create_ftl_model("test_resnet", C, classifier="linear", recon_reduction=bad)
        with pytest.raises(ValueError, match="recon_reduction must be one of"):
            FTLTask.from_timm("test_resnet", C, stage0_iters=1, recon_reduction=bad)
    assert torch.equal(rng, torch.get_rng_state())


def _data(seed=0):
    x, y = _images(COUNTS, seed)
    dataset = IndexedDataset(TensorDataset(x, y))
    return dataset, DataLoader(dataset, batch_size=32)


def test_ftl_task_refuses_a_split_without_long_tail_classes():
    """With the training set's counts the task refuses at build; without them, at the end of
    the first UpdateStats pass, before any statistics change (every class above T here)."""
    with pytest.raises(ValueError, match="no long-tail class"):
        _ftl_task(transfer_kwargs=dict(tail_threshold=5, class_counts=COUNTS))
    with pytest.raises(ValueError, match="no long-tail class"):  # the counts given to FC only
        _ftl_task(transfer_kwargs=dict(tail_threshold=5))
    task = _ftl_task(transfer_kwargs=dict(tail_threshold=5), class_counts=None, cloud=None)
    before = {k: v.clone() for k, v in task.model.feature_transfer.state_dict().items()}
    with pytest.raises(ValueError, match="no long-tail class"):
        task.update_stats(_data()[1])
    after = task.model.feature_transfer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ftl_counts_and_tail_threshold_given_once_reach_the_fc_head_and_feature_transfer():
    """``class_counts`` given with the head's keywords reached only FC (FeatureTransfer's stayed
    0: a split without long-tail classes passed the build); given in ``transfer_kwargs`` only (as
    the README said) FC's cloud failed with "class_counts is required". Now either reaches both,
    as ``tail_threshold`` does, and FC's errors say they are FC's."""

    def parts(**kw):
        model = create_ftl_model("test_resnet", C, **kw)
        return model.classifier.statistics, model.feature_transfer

    for kw in (
        dict(class_counts=COUNTS, tail_threshold=10),
        dict(transfer_kwargs=dict(class_counts=COUNTS, tail_threshold=10)),
        dict(class_counts=COUNTS, transfer_kwargs=dict(tail_threshold=10)),
    ):
        stats, transfer = parts(**kw)
        assert stats.class_counts.tolist() == transfer.class_counts.tolist() == COUNTS, kw
        assert stats.tail_threshold == transfer.tail_threshold == 10, kw
    stats, transfer = parts(class_counts=COUNTS, transfer_kwargs=dict(tail_threshold=10))
    assert transfer.regular.tolist() == [True, True, False, False, False, False]
    # each part's own tail_threshold, set on purpose, stays its own
    stats, transfer = parts(
        class_counts=COUNTS, tail_threshold=3, transfer_kwargs=dict(tail_threshold=10)
    )
    assert (stats.tail_threshold, transfer.tail_threshold) == (3, 10)
    # a mapping class -> count (collections.Counter(dataset.targets)) is the same counts
    counter = dict(enumerate(COUNTS))
    stats, transfer = parts(class_counts=counter, transfer_kwargs=dict(class_counts=COUNTS))
    assert stats.class_counts.tolist() == transfer.class_counts.tolist() == COUNTS
    stats, transfer = parts(class_counts=counter, tail_threshold=10)
    assert stats.class_counts.tolist() == transfer.class_counts.tolist() == COUNTS
    linear = create_ftl_model("test_resnet", C, classifier="linear", class_counts=COUNTS)
    assert linear.feature_transfer.class_counts.tolist() == COUNTS
    with pytest.raises(ValueError, match="differ"):
        parts(class_counts=COUNTS, transfer_kwargs=dict(class_counts=[9] * C))
    with pytest.raises(ValueError, match="FTL's FC .*class_counts is required"):
        parts()  # the cloud's K_i: FC's need, named as FC's
    with pytest.raises(ValueError, match="no long-tail class"):  # refused when built
        FTLTask.from_timm("test_resnet", C, stage0_iters=3, class_counts=[24] * C, verbose=False)


def test_leap_task_embedding_size_is_the_backbones_and_another_is_refused_by_name():
    """``LEAPTask.from_timm(embedding_size=...)`` gave an internal ``TypeError`` (multiple values
    for the head's ``embedding_size``)."""
    import timm

    features = timm.create_model("test_resnet", num_classes=0).num_features
    task = LEAPTask.from_timm("test_resnet", C, embedding_size=features, class_counts=COUNTS)
    assert task.head.embedding_size == features
    with pytest.raises(ValueError, match=f"embedding_size=128: .*num_features={features}"):
        LEAPTask.from_timm("test_resnet", C, embedding_size=128, class_counts=COUNTS)


def test_ftl_task_runs_the_stages(caplog):
    import logging

    caplog.set_level(logging.INFO, logger="feature_cloud.integrations.timm")
    task = _ftl_task(verbose=True)
    model = task.model
    dataset, stats_loader = _data()
    opt = torch.optim.Adam(model.param_groups(), lr=1e-3, weight_decay=1e-4)
    task.train()
    x, y = dataset.dataset.tensors
    with pytest.raises(ValueError, match="only used in stage 1"):
        task(x[:4], y[:4], x[:4], y[:4])
    record, snaps = [], {}

    run_ftl_task(task, dataset, stats_loader, opt, until=3, record=record)  # stage 0
    assert task.stage == 1 and task.needs_stats and model.frozen == ("encoder", "decoder")
    with pytest.raises(ValueError, match="long-tail batch"):
        task(x[:4], y[:4])
    snaps["enc"] = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    snaps["fc"] = model.classifier.weight.detach().clone()
    run_ftl_task(
        task, dataset, stats_loader, opt, until=5, record=record
    )  # stage 1 (UpdateStats first)
    ft = model.feature_transfer
    assert ft.ready and ft.tail_indices.numel() == sum(COUNTS[2:]) and ft.hard_indices.numel() > 0
    assert task.stage == 2 and model.frozen == ("classifier",)
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, snaps["enc"][k]), (
            k
        )  # Enc fixed in stage 1 despite Adam momentum + decay
    assert not torch.equal(snaps["fc"], model.classifier.weight)
    snaps["fc"] = model.classifier.weight.detach().clone()
    run_ftl_task(task, dataset, stats_loader, opt, record=record)  # stage 2
    assert torch.equal(snaps["fc"], model.classifier.weight)  # FC fixed in stage 2
    assert task.finished and [s for s, _ in record] == [0, 0, 0, 1, 1, 2, 2]
    assert all(torch.isfinite(torch.tensor([v for _, v in record])))
    # the stage switches and UpdateStats are logged (timm-real trial: nothing was)
    said = [r.getMessage() for r in caplog.records if r.name == "feature_cloud.integrations.timm"]
    switches = [m.split(" (")[0] for m in said if m.startswith("FTL: stage")]
    assert switches == ["FTL: stage 0 -> 1", "FTL: stage 1 -> 2", "FTL: stage 2 -> finished"]
    assert sum(m.startswith("FTL UpdateStats: ") for m in said) == 1

    task.eval()
    evaluator = task.create_evaluator()
    with torch.no_grad():
        evaluator.update(task.get_eval_model()(x), y)
    assert 0.0 <= evaluator.compute()["top1"] <= 100.0


@pytest.mark.parametrize("start", ["stage0_iters=0", "resume"])
def test_ftl_task_and_timm_optimizer_built_in_stage_1_train_the_encoder_in_stage_2(start, tmp_path):
    """timm's ``create_optimizer_v2`` leaves out parameters with ``requires_grad=False``: a task
    that started in stage 1 (``stage0_iters=0``, or resumed mid-stage-1) had frozen ``Enc``
    already, so an optimiser built then had no encoder parameter and stage 2 never trained it
    (silently). The parts are now frozen at the first training forward. Layers the user froze
    after building the task stay frozen when stage 2 unfreezes ``Enc``."""
    from timm.optim import create_optimizer_v2

    dataset, stats_loader = _data()
    if start == "resume":
        first = _ftl_task()
        run_ftl_task(
            first,
            dataset,
            stats_loader,
            torch.optim.SGD(first.model.param_groups(), lr=0.01),
            until=4,
        )
        assert first.stage == 1
        task = _ftl_task(init_seed=3)
        task.model.load_state_dict(first.model.state_dict())
        task.load_task_state(first.get_task_state())
    else:
        task = _ftl_task(stage0_iters=0)
        task.update_stats(stats_loader)
    model = task.model
    assert task.stage == 1 and model.frozen == ()
    stem = [p for n, p in model.encoder.named_parameters() if n.startswith("conv1")]
    assert stem
    for p in stem:
        p.requires_grad_(False)  # the user's own frozen layers
    opt = create_optimizer_v2(task.get_trainable_module(), opt="adamw", lr=1e-2, weight_decay=0.05)
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = [p for n, p in model.encoder.named_parameters() if not n.startswith("conv1")]
    assert all(id(p) in optimized for p in trainable)
    enc = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    run_ftl_task(
        task, dataset, stats_loader, opt, until=task.scheduler.iteration + task.scheduler.remaining
    )
    assert task.stage == 2 and model.frozen == ("classifier",)
    assert all(torch.equal(v, enc[k]) for k, v in model.encoder.state_dict().items())  # stage 1
    assert all(not p.requires_grad for p in stem) and all(p.requires_grad for p in trainable)
    stem_before = [p.detach().clone() for p in stem]
    run_ftl_task(task, dataset, stats_loader, opt)  # stage 2
    changed = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, enc[k])]
    assert any("layer" in k for k in changed), changed  # Enc trained in stage 2
    assert all(torch.equal(a, b) for a, b in zip(stem, stem_before))  # the user's frozen stem


def test_ftl_task_deferred_freeze_holds_for_loops_that_call_the_scheduler_directly():
    """The parts freeze at the first training computation of the model, not only at the
    task's forward: a loop that calls ``task.scheduler.stage1_loss`` (the README's plain loop)
    had ``Enc`` in train mode, its BatchNorm statistics moving in stage 1 (a review)."""
    dataset, stats_loader = _data()
    task = _ftl_task(stage0_iters=0)
    task.update_stats(stats_loader)
    model = task.model
    task.train()
    assert model.frozen == () and model.encoder.training
    bn = {k: v.clone() for k, v in model.encoder.state_dict().items() if "running" in k}
    hard, tail = task.loaders(dataset, batch_size=12)
    (xr, yr, _), (xt, yt, _) = next(iter(zip(hard, tail)))
    task.scheduler.stage1_loss((xr, yr), (xt, yt))["loss"].backward()
    assert model.frozen == ("encoder", "decoder") and not model.encoder.training
    assert all(torch.equal(v, bn[k]) for k, v in model.encoder.state_dict().items() if k in bn)
    assert all(p.grad is None for p in model.encoder.parameters())


def test_ftl_task_compiles_its_encoder_in_place_and_scores_validation_in_stage_1():
    """``FTLTask.compile()`` returned None and compiled nothing (timm's base); it compiles
    ``Enc`` in place (parameter names and checkpoints unchanged). A validation loss in eval
    mode is Eq. 4 in every stage (stage 1 asked for a long-tail batch)."""
    dataset, stats_loader = _data()
    task = _ftl_task(stage0_iters=0)
    keys = set(task.get_checkpoint_state()["state_dict"])
    eval_model = task.compile(backend="eager")
    assert isinstance(eval_model, FTLEmbedding) and task.get_eval_model() is eval_model
    assert set(task.get_checkpoint_state()["state_dict"]) == keys
    x, y = dataset.dataset.tensors
    task.eval()
    with torch.no_grad():
        assert eval_model(x[:4]).shape == (4, 32)
        before = {k: v.clone() for k, v in task.model.state_dict().items()}
        out = task(x[:8], y[:8])
    assert set(out) >= {"loss", "sfmx_loss"} and torch.isfinite(out["loss"])
    assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())
    task.update_stats(stats_loader)
    run_ftl_task(
        task, dataset, stats_loader, torch.optim.SGD(task.model.param_groups(), lr=0.01), until=1
    )


def test_indexed_dataset_passes_timm_transform_to_the_images():
    """timm's ``create_loader`` sets ``dataset.transform`` on the dataset it is given: on an
    ``IndexedDataset`` it never reached the wrapped dataset (PIL images in the batch)."""

    class Images(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            x = torch.full((3, 4, 4), float(i))
            return (x if self.transform is None else self.transform(x)), i

    ds = IndexedDataset(Images())
    ds.transform = lambda x: x + 1
    assert (
        ds.dataset.transform is ds.transform and float(ds[2][0][0, 0, 0]) == 3.0 and ds[2][2] == 2
    )


def test_ftl_task_gives_stage_2_its_own_length_and_resume_checks_it():
    task = _ftl_task(stage2_iters=1, max_alternations=2)
    assert task.scheduler.total_iters == 3 + 2 * (2 + 1)
    dataset, stats_loader = _data()
    opt = torch.optim.Adam(task.model.param_groups(), lr=1e-3)
    task.train()
    record = []
    run_ftl_task(
        task, dataset, stats_loader, opt, until=7, record=record
    )  # into the second stage 1
    assert [s for s, _ in record] == [0, 0, 0, 1, 1, 2, 1] and task.stage == 1
    state = task.get_checkpoint_state()["task_state"]
    assert state["scheduler"]["stage2_iters"] == 1
    with pytest.raises(ValueError, match="stage2_iters=1 but this scheduler has 2"):
        _ftl_task(max_alternations=2).load_task_state(state)  # equal stages: refused
    restored = _ftl_task(stage2_iters=1, max_alternations=2, init_seed=5)
    restored.load_task_state(state)
    assert restored.scheduler.state_dict() == task.scheduler.state_dict()
    run_ftl_task(task, dataset, stats_loader, opt, record=record)
    assert task.finished and [s for s, _ in record] == [0, 0, 0, 1, 1, 2, 1, 1, 2]


def test_the_trainable_modules_repr_shows_its_own_settings():
    """Typing trial: ``LEAPTrainableModule`` had no settings line (``label_smoothing``,
    ``head_weight_decay`` were invisible)."""
    from feature_cloud import LEAPMarginHead
    from feature_cloud.integrations.timm import LEAPTrainableModule

    head = LEAPMarginHead(4, 3, cloud=None)
    plain = LEAPTrainableModule(torch.nn.Identity(), head)
    assert repr(plain).splitlines()[0] == "LEAPTrainableModule("
    tuned = LEAPTrainableModule(
        torch.nn.Identity(), head, label_smoothing=0.1, head_weight_decay=False
    )
    assert repr(tuned).splitlines()[1].strip() == "label_smoothing=0.1, head_weight_decay=False"


def test_ftl_task_refuses_a_flip_that_is_not_callable_before_building_anything():
    """Typing trial: ``FTLTask.from_timm(flip=True)`` (fastreid's bool meaning) built, trained
    stage 0 and failed in UpdateStats with ``'bool' object is not callable``. It is refused when
    called, naming the argument, before the model is built (no global RNG drawn)."""
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    with pytest.raises(TypeError, match="flip must be a callable x -> flipped x"):
        _ftl_task(flip=True, init_seed=0)
    with pytest.raises(TypeError, match="quality must be a callable"):
        _ftl_task(quality=True, init_seed=0)
    assert torch.equal(torch.get_rng_state(), rng)
    model = _ftl_task().model
    with pytest.raises(TypeError, match="flip must be a callable"):
        FTLTask(model, stage0_iters=1, flip=True, verbose=False)


def test_ftl_task_passes_tail_sampling_and_quality_to_the_scheduler():
    """`FTLTask.from_timm(tail_sampling=..., quality=...)` reach the AlternatingScheduler (stage
    1's long-tail pool is then the class-balanced one); a checkpoint of the other sampling is
    refused by `load_task_state` before anything changes."""
    from feature_cloud.ftl import class_balanced_pool

    quality = lambda x, g: torch.ones(x.shape[0], dtype=torch.bool)
    task = _ftl_task(tail_sampling="classes", quality=quality)
    assert task.scheduler.tail_sampling == "classes" and task.scheduler.quality is quality
    dataset, stats_loader = _data()
    opt = torch.optim.Adam(task.model.param_groups(), lr=1e-3)
    task.train()
    run_ftl_task(
        task, dataset, stats_loader, opt, until=4
    )  # stage 0, UpdateStats, one stage-1 step
    ft = task.model.feature_transfer
    want = class_balanced_pool(ft.tail_indices, ft.tail_labels)
    assert torch.equal(task.scheduler.tail_pool(), want)
    state = task.get_checkpoint_state()["task_state"]
    assert state["scheduler"]["tail_sampling"] == "classes"
    plain = _ftl_task()
    before = plain.scheduler.state_dict()
    with pytest.raises(
        ValueError, match="tail_sampling='classes' but this scheduler has 'samples'"
    ):
        plain.load_task_state(state)
    assert plain.scheduler.state_dict() == before and not plain.model.feature_transfer.ready
    with pytest.raises(ValueError, match="tail_sampling must be one of"):
        _ftl_task(tail_sampling="bogus")


def test_ftl_task_state_round_trips_mid_stage_1(tmp_path):
    dataset, stats_loader = _data(1)
    task = _ftl_task(seed=1)
    opt = torch.optim.Adam(task.model.param_groups(), lr=1e-3)
    task.train()
    run_ftl_task(
        task, dataset, stats_loader, opt, until=4
    )  # stage 0, UpdateStats, one stage-1 step
    assert task.stage == 1 and task.scheduler.stage_iteration == 1
    state = task.get_checkpoint_state()
    assert set(state) == {"state_dict", "task_state"}
    assert set(state["task_state"]) == {"classifier", "decoder", "feature_transfer", "scheduler"}
    assert all(k.startswith(("encoder.", "filter.")) for k in state["state_dict"])
    path = os.path.join(str(tmp_path), "checkpoint.pth.tar")
    torch.save(dict(state, epoch=0, version=2), path)

    restored = _ftl_task(seed=1, init_seed=5)  # other initial weights, same schedule settings
    with pytest.raises(ValueError, match="seed"):
        _ftl_task(seed=2).load_task_state(state["task_state"])  # another sampler seed is refused
    resume_task_checkpoint(restored, path, log_info=False)  # timm's loader, weights_only
    assert restored.scheduler.state_dict() == task.scheduler.state_dict()
    # frozen at the first training forward: an optimiser built now sees every part
    assert restored.model.frozen == () and not restored.needs_stats
    for name, value in task.model.feature_transfer.state_dict().items():
        assert torch.equal(value, restored.model.feature_transfer.state_dict()[name]), name
    # the next stage-1 step is identical: same samplers position, statistics, weights, cloud RNG
    restored.train()
    batches = []
    for t in (task, restored):
        hard, tail = t.loaders(dataset, batch_size=12)
        (xr, yr, ir), (xt, yt, it) = next(iter(hard)), next(iter(tail))
        torch.manual_seed(0)
        batches.append((ir, it, t(xr, yr, xt, yt)["loss"]))
    assert torch.equal(batches[0][0], batches[1][0]) and torch.equal(batches[0][1], batches[1][1])
    assert torch.equal(batches[0][2], batches[1][2])
    assert restored.model.frozen == ("encoder", "decoder")
    with pytest.raises(KeyError, match="scheduler"):
        restored.load_task_state({"classifier": {}, "decoder": {}, "feature_transfer": {}})
    # the load is all or nothing: statistics that do not load leave the schedule, the decoder and
    # the classifier of the task as they were (they load before the statistics)
    other = _ftl_task(seed=1, init_seed=5)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    schedule = other.scheduler.state_dict()
    broken = dict(state["task_state"])
    broken["feature_transfer"] = {**broken["feature_transfer"], "basis": torch.zeros(3)}
    with pytest.raises(ValueError, match="basis"):
        other.load_task_state(broken)
    assert other.scheduler.state_dict() == schedule and other.model.frozen == ()
    for name, value in other.model.state_dict().items():
        assert torch.equal(value, before[name]), name


_OLD_TIMM = """
import sys, types
import timm, timm.task
old = types.ModuleType("timm.task")  # timm 1.0.25 - 1.0.30: no ClassificationEvaluator
old.TrainingTask = timm.task.TrainingTask
sys.modules["timm.task"] = timm.task = old
timm.__version__ = "1.0.29"
try:
    import feature_cloud.integrations.timm
except ImportError as e:
    print(e)
"""


def test_an_older_timm_is_named_in_the_import_error():
    """timm 1.0.29 (e.g. a GPU image's) has ``timm.task`` but not its ``ClassificationEvaluator``:
    the adapter's import says which timm it needs instead of a bare name error."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [sys.executable, "-c", _OLD_TIMM],
        cwd=root,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=root),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "needs timm >= 1.0.31" in proc.stdout and "this is timm 1.0.29" in proc.stdout


def test_ftl_task_sampler_seed_unset_follows_torch_manual_seed_and_resumes():
    """As the core scheduler's: ``FTLTask(seed=None)`` (the default) draws the FTL samplers'
    seed from torch's global RNG (it was fixed at 0: a multi-seed study that varies
    ``torch.manual_seed`` sampled the same FTL batches in every run); a task built without a
    seed takes the checkpoint's from its task state."""
    seeds = []
    for init in (3, 3, 4):
        torch.manual_seed(init)
        seeds.append(_ftl_task(seed=None, init_seed=init).scheduler.seed)
    assert seeds[0] == seeds[1] != seeds[2]
    task = _ftl_task(seed=None, init_seed=3)
    state = task.get_task_state()
    restored = _ftl_task(seed=None, init_seed=4)
    assert restored.scheduler.seed != task.scheduler.seed
    restored.load_task_state(state)
    assert restored.scheduler.seed == task.scheduler.seed


@pytest.mark.parametrize("kind", ["leap", "ftl"])
@pytest.mark.parametrize("damage", ["head weight", "angle memory"])
def test_timm_checkpoint_helpers_leave_the_backbone_as_it_was_when_the_head_refuses(
    kind, damage, tmp_path
):
    """s51 trial: timm's own ``load_checkpoint`` / ``resume_checkpoint`` (train.py's
    ``--initial-checkpoint`` / ``--resume``) on the trainable module loaded the backbone's 14
    entries, then the head refused the checkpoint (an inf weight): a mixed model. The adapter's
    trainable module (and the FTL model) check the whole state before any child loads: the
    backbone's load is never reached."""
    from timm.models import load_checkpoint, resume_checkpoint

    from conftest import assert_same_state, state_snapshot

    def build(seed):
        if kind == "leap":
            module = _task(seed).trainable_module
            return module, module.backbone, "head."
        model = _ftl_task(seed).model
        return model, model.encoder, "classifier."

    source, _, head = build(0)
    state = source.state_dict()
    key = head + ("weight" if damage == "head weight" else "feature_cloud.statistics.memory")
    state[key] = state[key] + float("inf")
    path = str(tmp_path / "damaged.pth")
    torch.save({"state_dict": state, "epoch": 3}, path)
    for load in (
        lambda m: load_checkpoint(m, path),
        lambda m: load_checkpoint(m, path, strict=False),
        lambda m: resume_checkpoint(m, path),
    ):
        model, backbone, _ = build(1)
        reached = []
        backbone.register_load_state_dict_pre_hook(lambda *args: reached.append(True))
        before = state_snapshot(model)
        with pytest.raises(ValueError, match=f"checkpoint's {key.rpartition('.')[0]}"):
            load(model)
        assert reached == []  # refused before the backbone began to load
        assert_same_state(state_snapshot(model), before, "a refused timm checkpoint")
    model, backbone, _ = build(1)
    load_checkpoint(model, _save(source, tmp_path))
    assert_same_state(state_snapshot(model), state_snapshot(source), "a sound checkpoint")


def _save(module, tmp_path):
    path = str(tmp_path / "sound.pth")
    torch.save({"state_dict": module.state_dict()}, path)
    return path


def test_the_evaluator_builds_the_scoring_matrix_once_and_rebuilds_on_any_change(monkeypatch):
    """s53 perf: the evaluator called ``head.logits`` on every batch, which rebuilds the
    prototypes from all ``C x D`` each time (4.5-13x the floor's inference at C=1e5). It now
    builds the eval and train-mode matrices once an evaluation and gives the same logits,
    bit for bit; and builds them again after an optimizer step, a statistics update, a load,
    a dtype change, a setting change and ``reset()``; ``compute()`` drops them."""
    import feature_cloud.integrations.timm as T

    D = 8
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0, scale=16.0, margin=0.2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, D, generator=g), torch.arange(48) % C
    head(x, y)
    builds = []
    real = T.scoring_weight

    def counting(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "scoring_weight", counting)

    def expected(emb, training):
        mode = head.training
        head.train(training)
        with torch.no_grad():
            out = head.logits(emb)
        head.train(mode)
        return out

    def check(ev, emb, rebuilt):
        n = len(builds)
        for training in (False, True):
            with torch.no_grad():
                got = ev._logits(emb, training)
            assert torch.equal(got, expected(emb, training)), training
        assert len(builds) - n == (2 if rebuilt else 0)

    ev = LEAPEvaluator(head)
    emb = torch.randn(5, D, generator=g)
    check(ev, emb, True)
    check(ev, torch.randn(7, D, generator=g), False)  # later batches: no rebuild
    ev.update(emb, y[:5])
    ev.update(emb, y[:5])
    assert len(builds) == 2
    ev.compute()  # the end of an evaluation: no C x D copies held after it
    assert ev._scorings == {}
    check(ev, emb, True)
    # an optimizer step (in-place on the weight)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head(x, y).backward()  # the statistics update alone changes the centers: rebuilt too
    check(ev, emb, True)
    opt.step()
    check(ev, emb, True)
    # a load
    other = LEAPMarginHead(D, C, class_counts=COUNTS, seed=1, scale=16.0, margin=0.2)
    other(torch.randn(48, D, generator=g), y)
    head.load_state_dict(other.state_dict())
    check(ev, emb, True)
    # a setting the prototypes read
    head.prototype_shrinkage = 3.0
    check(ev, emb, True)
    head.prototype_min_count = 5
    check(ev, emb, True)
    # a dtype change, both ways (the parameter keeps its identity; its storage moves)
    head.to(torch.float64)
    check(ev, emb.double(), True)
    head.to(torch.float32)
    check(ev, emb, True)
    check(ev, emb.double(), True)  # embeddings of another dtype: the cast matrix
    # reset(): a new evaluation builds afresh
    ev.reset()
    check(ev, emb, True)
    check(ev, emb, False)
    # a write through .data within one evaluation is not seen (README, the class docstring);
    # compute() / reset() drop the matrices, so the next evaluation sees it
    stale = ev._logits(emb, False)
    head.weight.data.mul_(-1.0)
    assert torch.equal(ev._logits(emb, False), stale)
    ev.compute()
    with torch.no_grad():
        assert torch.equal(ev._logits(emb, False), expected(emb, False))


def test_the_evaluator_calls_a_logits_of_the_users_own():
    """The evaluator's cached scoring stands for ``LEAPMarginHead.logits`` only: an
    ``FTLModel`` subclass with its own ``logits`` (a temperature) or a ``logits`` set on the
    instance was skipped, scoring 4x the model's logits (review of s53's evaluator cache)."""
    from torch import nn

    D = 8

    class Tempered(FTLModel):
        def logits(self, f):
            return super().logits(f) / 4.0

    g = torch.Generator().manual_seed(0)
    f, y = torch.randn(32, D, generator=g), torch.arange(32) % C
    torch.manual_seed(0)
    head = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    head(f, y)
    model = Tempered(nn.Identity(), head, feature_dim=D, alpha_recon=0.0, alpha_reg=0.0)
    plain = LEAPMarginHead(D, C, class_counts=COUNTS, seed=0)
    plain(f, y)
    plain.logits = lambda x: LEAPMarginHead.logits(plain, x) / 4.0  # on the instance

    class OwnScore(LEAPMarginHead):  # a private _score of another signature: called as is
        def _score(self, embeddings):
            return super()._score(embeddings) / 2.0

    scored = OwnScore(D, C, class_counts=COUNTS, seed=0)
    scored(f, y)
    for owner in (model, plain, scored):
        owner.eval()
        with torch.no_grad():
            want = owner.logits(f)
            got = LEAPEvaluator(owner)._logits(f, False)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_tasks_leave_the_model_where_it_is_as_timms_classification_task_does():
    """timm's ClassificationTask keeps its model on the device it was built on (meta included);
    TrainingTask's default device (cpu) must not pull a placed model back (s54 ecosystem 5)."""

    def devices(task):
        return {t.device.type for t in task.get_trainable_module().parameters()}

    with torch.device("meta"):
        leap = _task()
        ftl = _ftl_task()
        backbone, head = create_backbone_and_head("test_resnet", C, class_counts=COUNTS)
    assert devices(leap) == devices(ftl) == {"meta"}
    # built outside the context: a model already placed stays there when no device is given
    placed = LEAPTask(backbone, head, verbose=False)
    assert devices(placed) == {"meta"} and placed.get_trainable_module().head is head
    # a device given is where the model goes
    cpu_backbone, cpu_head = create_backbone_and_head("test_resnet", C, class_counts=COUNTS)
    moved = LEAPTask(cpu_backbone, cpu_head, device=torch.device("meta"), verbose=False)
    assert devices(moved) == {"meta"}
    # the meta-built task's README route: to_empty, then a checkpoint of a real task
    leap.to_empty(device="cpu")
    leap.get_trainable_module().load_state_dict(_task().get_trainable_module().state_dict())
    x, y = _images([2] * C, seed=1)
    assert torch.isfinite(leap(x, y)["loss"])
