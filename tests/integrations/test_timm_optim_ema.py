"""LEAPTask / FTLTask with timm's optimizer factory, ``compile_ema`` and EMA validation."""

from __future__ import annotations

import warnings

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("timm.task")
from timm.optim import create_optimizer_v2

from feature_cloud.integrations.timm import FTLTask, LEAPTask, create_ftl_model

C = 4
#: FTL's split (reaching FeatureTransfer too, which refuses one without regular classes)
FTL_COUNTS = [30, 30, 5, 5]
VIT = dict(img_size=32, depth=2)  # a two-block ViT: pos_embed / cls_token, layer groups


def _leap(name="vit_tiny_patch16_224", model_kwargs=VIT, **kwargs):
    torch.manual_seed(0)
    return LEAPTask.from_timm(
        name,
        C,
        model_kwargs=model_kwargs,
        cloud="full",
        class_counts=[5] * C,
        verbose=False,
        **kwargs,
    )


def _ftl(name="vit_tiny_patch16_224", model_kwargs=VIT):
    torch.manual_seed(0)
    return FTLTask.from_timm(
        name,
        C,
        model_kwargs=model_kwargs,
        stage0_iters=2,
        embedding_size=16,
        decoder_shape=(3, 32, 32),
        decoder_channels=(8,),
        cloud="full",
        class_counts=FTL_COUNTS,
        verbose=False,
    )


def _groups(opt, module):
    """``{parameter name: (weight_decay, lr_scale)}`` of a timm optimizer over ``module``."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {
        names[id(p)]: (g["weight_decay"], g.get("lr_scale", 1.0))
        for g in opt.param_groups
        for p in g["params"]
    }


def _timm_reference(layer_decay, name="vit_tiny_patch16_224", model_kwargs=VIT):
    """timm's own grouping of the same model *with* a classifier head (unmatched: a last layer)."""
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=C, **(model_kwargs or {}))
    return _groups(
        create_optimizer_v2(ref, "adamw", weight_decay=0.05, layer_decay=layer_decay), ref
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_leap_trainable_module_forwards_no_weight_decay_and_group_matcher(compiled, caplog):
    task = _leap()
    if compiled:
        task.compile(backend="eager")  # backbone names gain `_orig_mod.`
    module = task.get_trainable_module()
    prefix = "backbone._orig_mod." if compiled else "backbone."
    plain = _groups(create_optimizer_v2(module, "adamw", weight_decay=0.05), module)
    for name in ("pos_embed", "cls_token"):
        assert plain[prefix + name][0] == 0.0, name  # timm's no_weight_decay() of the ViT
    assert plain[prefix + "blocks.0.attn.qkv.weight"][0] == 0.05
    assert plain["head.weight"][0] == 0.05

    with caplog.at_level("WARNING"):
        layered = _groups(
            create_optimizer_v2(module, "adamw", weight_decay=0.05, layer_decay=0.75), module
        )
    assert "no effect" not in caplog.text
    ref = _timm_reference(0.75)
    # the backbone's layers as timm groups them, the LEAP head in a last group like timm's head
    for name, (wd, scale) in layered.items():
        key = name[len(prefix) :] if name.startswith(prefix) else name
        assert key in ref, name
        assert (wd, scale) == pytest.approx(ref[key]), name
    assert layered["head.weight"][1] == 1.0
    assert (
        layered[prefix + "blocks.0.attn.qkv.weight"][1]
        < layered[prefix + "blocks.1.mlp.fc1.weight"][1]
    )
    assert layered[prefix + "norm.weight"][1] < 1.0


def test_backbone_without_timm_hooks_still_builds_an_optimizer():
    task = _leap("test_resnet", model_kwargs=None)
    module = task.get_trainable_module()
    opt = create_optimizer_v2(module, "adamw", weight_decay=0.05, layer_decay=0.75)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(module.parameters()))
    assert _groups(opt, module)["head.weight"][1] == 1.0


def test_ftl_model_forwards_the_encoder_hooks():
    task = _ftl()
    module = task.get_trainable_module()
    plain = _groups(create_optimizer_v2(module, "adamw", weight_decay=0.05), module)
    assert plain["encoder.pos_embed"][0] == 0.0 and plain["encoder.cls_token"][0] == 0.0
    assert plain["classifier.weight"][0] == 0.05
    layered = _groups(
        create_optimizer_v2(module, "adamw", weight_decay=0.05, layer_decay=0.75), module
    )
    ref = _timm_reference(0.75)
    for name, (wd, scale) in layered.items():
        if name.startswith("encoder."):
            assert (wd, scale) == pytest.approx(ref[name[len("encoder.") :]]), name
        else:  # R, FC, Dec: the last group, like timm's classifier head
            assert scale == 1.0, name
    assert layered["encoder.blocks.0.attn.qkv.weight"][1] < layered["encoder.norm.weight"][1] < 1.0


@pytest.mark.parametrize("make, prefix", [(_leap, "backbone."), (_ftl, "encoder.")])
@pytest.mark.parametrize(
    "name, model_kwargs",
    [("convnext_atto", None), ("mobilenetv3_small_050", None), ("resnet10t", None), ("vit", VIT)],
)
def test_layer_decay_scales_the_backbone_as_timm_scales_the_model(make, prefix, name, model_kwargs):
    """ConvNeXt's ``head.norm`` and MobileNetV3's ``conv_head`` are left unmatched by their
    ``group_matcher``: timm puts them in the last group with the classifier; the adapter's
    parameters join that group instead of adding one (an extra x0.75 on every backbone layer)."""
    name = "vit_tiny_patch16_224" if name == "vit" else name
    module = make(name, model_kwargs).get_trainable_module()
    layered = _groups(
        create_optimizer_v2(module, "adamw", weight_decay=0.05, layer_decay=0.75), module
    )
    ref = _timm_reference(0.75, name, model_kwargs)
    backbone = {n[len(prefix) :]: g for n, g in layered.items() if n.startswith(prefix)}
    assert backbone.keys() <= ref.keys() and len(backbone) >= len(ref) - 2  # less fc / head
    for key, (wd, scale) in backbone.items():
        assert (wd, scale) == pytest.approx(ref[key]), key
    assert {scale for n, (_, scale) in layered.items() if not n.startswith(prefix)} == {1.0}


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_head_weight_decay_false_leaves_the_classifier_weight_undecayed(layer_decay):
    """A cosine head's logits ignore ``||W||``: weight decay on ``head.weight`` (timm treats it
    as its ``fc.weight``) only raises its effective lr. The opt-out reaches timm's factory
    through ``no_weight_decay()``; the layer groups stay as they were."""
    kw = dict(weight_decay=0.05, layer_decay=layer_decay)
    leap_on, leap_off = _leap(), _leap(head_weight_decay=False)
    ftl = dict(model_kwargs=VIT, embedding_size=16, class_counts=FTL_COUNTS)
    ftl_on = create_ftl_model("vit_tiny_patch16_224", C, **ftl)
    ftl_off = create_ftl_model("vit_tiny_patch16_224", C, head_weight_decay=False, **ftl)
    for on, off, weight in [
        (leap_on.get_trainable_module(), leap_off.get_trainable_module(), "head.weight"),
        (ftl_on, ftl_off, "classifier.weight"),
    ]:
        default = _groups(create_optimizer_v2(on, "adamw", **kw), on)
        opted = _groups(create_optimizer_v2(off, "adamw", **kw), off)
        assert default[weight][0] == 0.05 and opted[weight] == (0.0, default[weight][1])
        assert {n: g for n, g in opted.items() if n != weight} == {
            n: g for n, g in default.items() if n != weight
        }


def test_head_weight_decay_takes_a_bool_only():
    """``bool("False")`` is True: a flag given as a string (a config file) meant the opposite."""
    with pytest.raises(TypeError, match="head_weight_decay must be True or False, got 'False'"):
        _leap(head_weight_decay="False")
    ftl = dict(model_kwargs=VIT, embedding_size=16, class_counts=FTL_COUNTS)
    with pytest.raises(TypeError, match="head_weight_decay must be True or False"):
        create_ftl_model("vit_tiny_patch16_224", C, head_weight_decay=0, **ftl)


@pytest.mark.parametrize("make", [_leap, _ftl])
def test_compile_ema_gives_the_compiled_ema_eval_model(make):
    task = make("test_resnet", model_kwargs=None)
    task.setup_ema(decay=0.5)
    plain = task.get_eval_model(ema=True)
    compiled = task.compile_ema(backend="eager")
    assert compiled is not None and task.get_eval_model(ema=True) is compiled
    assert task.get_eval_model() is not compiled
    x = torch.randn(2, 3, 32, 32)
    task.eval()
    torch.testing.assert_close(compiled(x), plain(x))
    # a new EMA copy is not scored by the old compiled one
    task.setup_ema(decay=0.5)
    assert task.get_eval_model(ema=True) is not compiled


def _diverged_ema(make):
    task = make("test_resnet", model_kwargs=None)
    task.setup_ema(decay=0.5)
    with torch.no_grad():  # live weights move on, the EMA copy stays
        for p in task.get_trainable_module().parameters():
            p.add_(torch.randn_like(p))
    return task.eval()


def test_ema_evaluator_uses_the_ema_head():
    task = _diverged_ema(_leap)
    ema = task.get_trainable_module(ema=True).module
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % C
    live_ev, ema_ev = task.create_evaluator(), task.create_evaluator(ema=True)
    assert live_ev.head is task.head and ema_ev.head is ema.head
    with torch.no_grad():
        ema_ev.update(task.get_eval_model(ema=True)(x), y)
        expected = torch.nn.functional.cross_entropy(ema(x), y)  # EMA backbone + EMA head
    assert ema_ev.compute()["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_ftl_ema_evaluator_uses_the_ema_classifier():
    task = _diverged_ema(_ftl)
    ema = task.get_trainable_module(ema=True).module
    ev = task.create_evaluator(ema=True)
    assert ev.head is ema and task.create_evaluator().head is task.model
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % C
    with torch.no_grad():
        ev.update(task.get_eval_model(ema=True)(x), y)
        expected = torch.nn.functional.cross_entropy(ema.logits(ema(x)), y)
    assert ev.compute()["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_ema_evaluator_before_setup_ema_is_an_error():
    for task in (_leap("test_resnet", model_kwargs=None), _ftl("test_resnet", model_kwargs=None)):
        with pytest.raises(RuntimeError, match="setup_ema"):
            task.create_evaluator(ema=True)


def test_metric_l2_with_a_margin_head_warns():
    with pytest.warns(UserWarning, match="normalises"):
        _leap("test_resnet", model_kwargs=None, metric_l2=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _leap("test_resnet", model_kwargs=None)
        _leap("test_resnet", model_kwargs=None, metric_l2=0.0)


def test_create_ftl_model_keeps_its_class_contract():
    model = create_ftl_model("test_resnet", C, embedding_size=16, cloud=None)
    assert hasattr(model, "no_weight_decay") and hasattr(model, "group_matcher")


def test_trainable_modules_give_timm_the_backbones_data_config_and_grad_checkpointing():
    """``timm.data.resolve_data_config(model=task.get_trainable_module())`` read no
    ``pretrained_cfg`` and fell back to 224 px (timm's ``test_vit`` is a 160 px model); ``set_grad_checkpointing``
    (train.py ``--grad-checkpointing``) reaches the backbone."""
    from timm.data import resolve_data_config

    for task in (_leap("test_vit", {}), _ftl("test_vit", {})):
        module = task.get_trainable_module()
        backbone = module.backbone if hasattr(module, "backbone") else module.encoder
        want = resolve_data_config(model=backbone)
        assert want["input_size"] == (3, 160, 160)
        assert resolve_data_config(model=module) == want
        module.set_grad_checkpointing(True)
        assert backbone.grad_checkpointing
        module.set_grad_checkpointing(False)
        assert not backbone.grad_checkpointing
