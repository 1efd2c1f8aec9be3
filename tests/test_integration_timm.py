"""LEAPTask against the real timm ``TrainingTask`` API (timm >= 1.0 ``timm.task``)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("timm.task")
from timm.task import TrainingTask, resume_task_checkpoint  # noqa: E402

from feature_cloud import LEAPMarginHead  # noqa: E402
from feature_cloud.integrations.timm import LEAPEvaluator, LEAPTask, create_backbone_and_head  # noqa: E402

C = 6
COUNTS = [24, 24, 6, 6, 6, 6]


def _images(n_per_class, seed):
    """Class-dependent colour blocks plus noise, 3x32x32."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(C, 3, 1, 1, generator=torch.Generator().manual_seed(99)) * 2 - 1
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = colours[labels].expand(-1, 3, 32, 32).clone()
    x[:, :, : 16] *= -1 * (labels.view(-1, 1, 1, 1) % 2 * 2 - 1)  # a label-dependent pattern
    x += 0.3 * torch.randn(x.shape, generator=g)
    return x, labels


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


def test_training_steps_decrease_loss_and_update_statistics(one_thread):
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


def test_task_state_round_trips_through_a_timm_checkpoint(tmp_path, one_thread):
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
    assert "statistics.memory" in state["task_state"]["head"]
    path = os.path.join(str(tmp_path), "checkpoint.pth.tar")
    torch.save(dict(state, epoch=3, version=2), path)

    restored = _task(seed=7)
    epoch = resume_task_checkpoint(restored, path, log_info=False)  # timm's own loader, weights_only
    assert epoch == 4
    for (ka, va), (kb, vb) in zip(task.head.state_dict().items(), restored.head.state_dict().items()):
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


def test_ema_copy_carries_the_head(one_thread):
    task = _task(seed=2)
    task.setup_ema(decay=0.5)
    assert task.has_ema()
    ema_backbone = task.get_eval_model(ema=True)
    assert ema_backbone is not task.backbone
    state = task.get_task_state(ema=True)
    assert set(state) == {"head"}
    copy.deepcopy(task)  # tasks are deep-copyable (timm EMA relies on it)
