"""timm end to end with timm's own tools: ``setup_ema`` + ``ModelEmaV3`` updates,
``CheckpointSaver`` + ``resume_task_checkpoint`` / ``load_task_ema_checkpoint``, the eval model
exported (``torch.jit.trace``, ``torch.onnx.export`` run by onnxruntime), and statistics
synchronised under ``prepare_distributed`` (2 gloo processes started like ``torchrun``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

timm = pytest.importorskip("timm")
pytest.importorskip("timm.task")
from timm.task import load_task_ema_checkpoint, resume_task_checkpoint
from timm.utils import CheckpointSaver

from conftest import run_ftl_task
from feature_cloud.integrations.timm import FTLTask, LEAPTask, ModelEmaV3Following

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
C = 6
COUNTS = [24, 24, 6, 6, 6, 6]


def _images(n_per_class, seed):
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(C, 3, 1, 1, generator=torch.Generator().manual_seed(99)) * 2 - 1
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = colours[labels].expand(-1, 3, 32, 32).clone()
    x[:, :, :16] *= -1
    return x + 0.3 * torch.randn(x.shape, generator=g), labels


def _leap_task(seed=0, **kwargs):
    torch.manual_seed(seed)
    kw = dict(cloud="full", class_counts=COUNTS, seed=seed, scale=16.0, margin=0.2, verbose=False)
    kw.update(kwargs)
    return LEAPTask.from_timm("test_resnet", C, **kw)


def _steps(task, opt, x, y, n, ema=None):
    task.train()
    for _ in range(n):
        opt.zero_grad()
        task(x, y)["loss"].backward()
        opt.step()
        if ema is not None:
            ema.update(task.get_trainable_module())


# ---------------------------------------------------------------- EMA
def test_leap_task_ema_follows_the_model():
    task = _leap_task()
    ema = task.setup_ema(decay=0.5)
    assert isinstance(ema, ModelEmaV3Following) and task.get_trainable_module(ema=True) is ema
    x, y = _images([4] * C, 0)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    _steps(task, opt, x, y, 1)
    ema.update(task.get_trainable_module())  # timm's ModelEmaV3.update, as a user calls it
    live = task.get_trainable_module().state_dict()
    w = "head.weight"
    torch.testing.assert_close(ema.module.state_dict()[w], 0.5 * before[w] + 0.5 * live[w])
    task.update_ema()  # timm's task API
    assert int(ema.module.head.step) == int(task.head.step) == 1
    ema_backbone = task.get_eval_model(ema=True)
    assert ema_backbone is not task.backbone and ema_backbone(x[:2]).shape == (
        2,
        task.head.embedding_size,
    )


def test_ema_follows_online_counting_memory():
    """The angle memory is laid out when the online-count warm-up ends: the EMA copy follows."""
    task = _leap_task(class_counts=None, warmup_steps=2, count_steps=2)
    ema = task.setup_ema(decay=0.9)
    x, y = _images([4] * C, 1)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    _steps(task, opt, x, y, 4, ema=ema)
    assert task.head.statistics.memory.numel() > 0
    assert ema.module.head.statistics.memory.shape == task.head.statistics.memory.shape


def _statistics(module):
    """The buffers of the statistics modules (``FeatureCloud``, ``FeatureTransfer``) in
    ``module``, by name."""
    from feature_cloud import FeatureCloud, FeatureTransfer

    return {
        name: buf
        for owner, m in module.named_modules()
        if isinstance(m, (FeatureCloud, FeatureTransfer))
        for name, buf in m.named_buffers(prefix=owner)
    }


def _assert_statistics_followed(ema_module, live_module):
    live, ema = _statistics(live_module), _statistics(ema_module)
    assert live and live.keys() == ema.keys()
    for name, buf in live.items():
        assert torch.equal(ema[name], buf), name


@pytest.mark.parametrize("with_step", [False, True])
def test_ema_copies_the_statistics_and_averages_the_rest(with_step):
    """The head's statistics are sums, memories, counters and centers of one history: averaged
    against copied counters they were inconsistent (a 25x variance), and the EMA evaluator's
    prototypes are the EMA centers. ``task.update_ema()`` (README) and ``update_ema(step=)``
    (timm's train.py) copy them; weights and BatchNorm statistics are still averaged."""
    task = _leap_task()
    ema = task.setup_ema(decay=0.9)
    x, y = _images([4] * C, 3)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.1)
    task.train()
    for i in range(4):
        before = ema.module.backbone.bn1.running_mean.clone()
        opt.zero_grad()
        task(x[i::2], y[i::2])["loss"].backward()
        opt.step()
        task.update_ema(step=i + 2) if with_step else task.update_ema()
    live = task.get_trainable_module()
    _assert_statistics_followed(ema.module, live)
    stats, ema_stats = task.head.statistics, ema.module.head.statistics
    assert int(stats.memory_fill.sum()) > 0
    torch.testing.assert_close(ema_stats.cloud_variance(), stats.cloud_variance())
    torch.testing.assert_close(  # BatchNorm running statistics: still timm's average
        ema.module.backbone.bn1.running_mean,
        torch.lerp(before, live.backbone.bn1.running_mean, 0.1),
    )
    assert not torch.equal(ema.module.head.weight, task.head.weight)  # weights averaged


def _ftl_task(seed=0, **kwargs):
    torch.manual_seed(seed)
    kw = dict(
        stage0_iters=2,
        stage_iters=1,
        max_alternations=1,
        embedding_size=32,
        filter_hidden=64,
        transfer_kwargs=dict(tail_threshold=10, energy=0.95),
        classifier="linear",
        verbose=False,
    )
    kw.update(kwargs)
    return FTLTask.from_timm("test_resnet", C, **kw)


def _ftl_dataset():
    from torch.utils.data import DataLoader, TensorDataset

    from feature_cloud.ftl import IndexedDataset

    x, y = _images(COUNTS, 2)
    dataset = IndexedDataset(TensorDataset(x, y))
    return x, dataset, DataLoader(dataset, batch_size=32)


def test_ftl_task_ema_through_update_stats():
    task = _ftl_task()
    ema = task.setup_ema(decay=0.5)
    x, dataset, stats_loader = _ftl_dataset()
    opt = torch.optim.SGD(task.model.param_groups(), lr=0.05)
    run_ftl_task(task, dataset, stats_loader, opt, ema=ema)
    ft, ema_ft = task.model.feature_transfer, ema.module.feature_transfer
    assert (
        ft.basis.numel() > 0 and ema_ft.basis.shape == ft.basis.shape
    )  # followed across UpdateStats
    _assert_statistics_followed(ema.module, task.model)  # copied, not averaged
    emb = task.get_eval_model(ema=True)
    assert emb(x[:2]).shape == (2, 32)
    state = task.get_checkpoint_state(ema=True)
    assert (
        set(state) == {"state_dict_ema", "task_state_ema"}
        and "scheduler" not in state["task_state_ema"]
    )


def test_ftl_ema_basis_stays_orthonormal_across_update_stats():
    """A second UpdateStats with the same number of components: an averaged basis ``Q`` was not
    orthonormal (max |Q^T Q - I| = 0.48 in a trial); the copy's is the live one."""
    task = _ftl_task(
        stage_iters=2,
        max_alternations=2,
        classifier="leap",
        cloud="full",
        class_counts=COUNTS,
        transfer_kwargs=dict(tail_threshold=10, num_components=4),
    )
    task.setup_ema(decay=0.9)
    x, dataset, stats_loader = _ftl_dataset()
    opt = torch.optim.SGD(task.model.param_groups(), lr=0.05)
    updates = []
    real = task.scheduler.update_stats
    task.scheduler.update_stats = lambda loader: updates.append(1) or real(loader)
    run_ftl_task(task, dataset, stats_loader, opt, ema=task.get_trainable_module(ema=True))
    assert len(updates) >= 2
    ema = task.get_trainable_module(ema=True).module
    q = ema.feature_transfer.basis.double()
    assert q.shape[1] == 4
    torch.testing.assert_close(q.T @ q, torch.eye(4, dtype=q.dtype), atol=1e-5, rtol=0)
    _assert_statistics_followed(ema, task.model)


# ---------------------------------------------------------------- CheckpointSaver
def _save(task, opt, tmp_path):
    """timm's ``CheckpointSaver`` writes epoch 0 of ``task``; the checkpoint's path."""
    saver = CheckpointSaver(
        task.get_trainable_module(),
        opt,
        task=task,
        checkpoint_dir=str(tmp_path),
        recovery_dir=str(tmp_path),
        max_history=2,
    )
    saver.save_checkpoint(epoch=0, metric=1.0)
    path = os.path.join(str(tmp_path), "checkpoint-0.pth.tar")
    assert os.path.isfile(path)
    return path


@pytest.mark.parametrize("imprint_step", [None, 3])
def test_checkpoint_saver_resume_is_bit_identical(tmp_path, imprint_step):
    """Also with ``imprint_step`` at the first step after the checkpoint: the resumed task
    imprints there exactly like the one that never stopped."""
    task = _leap_task(seed=1, imprint_step=imprint_step)
    ema = task.setup_ema(decay=0.9)
    x, y = _images([6] * C, 3)
    opt = torch.optim.Adam(task.get_trainable_module().parameters(), lr=1e-3)
    _steps(task, opt, x, y, 3, ema=ema)
    path = _save(task, opt, tmp_path)

    restored = _leap_task(seed=7, imprint_step=imprint_step)  # other initial weights
    restored_opt = torch.optim.Adam(restored.get_trainable_module().parameters(), lr=1e-3)
    restored.setup_ema(decay=0.9)
    epoch = resume_task_checkpoint(
        restored, path, optimizer=restored_opt, log_info=False
    )  # weights_only
    load_task_ema_checkpoint(restored, path)
    assert epoch == 1
    for ema in (False, True):
        for (ka, va), (kb, vb) in zip(
            task.get_trainable_module(ema=ema).state_dict().items(),
            restored.get_trainable_module(ema=ema).state_dict().items(),
        ):
            assert ka == kb and torch.equal(va, vb), ka
    # the next two optimiser steps are identical (weights, Adam moments, statistics, cloud noise)
    for t, o in ((task, opt), (restored, restored_opt)):
        torch.manual_seed(0)
        _steps(t, o, x, y, 2)
        if imprint_step is not None:  # it took the imprint, once, at that step
            assert t.get_trainable_module().head.feature_cloud._imprinted == imprint_step
    for (ka, va), (kb, vb) in zip(
        task.get_trainable_module().state_dict().items(),
        restored.get_trainable_module().state_dict().items(),
    ):
        assert ka == kb and torch.equal(va, vb), ka


def test_leap_resume_of_a_refused_head_leaves_the_task_as_it_was(tmp_path):
    """timm's loaders write the backbone, then the task state: a checkpoint whose head does not
    fit (another number of classes) is refused by ``resume_task_checkpoint`` and
    ``load_task_ema_checkpoint`` without leaving the task half loaded."""
    task = _leap_task(seed=1)
    task.setup_ema(decay=0.9)
    x, y = _images([6] * C, 3)
    opt = torch.optim.Adam(task.get_trainable_module().parameters(), lr=1e-3)
    _steps(task, opt, x, y, 2, ema=task.trainable_module_ema)
    path = _save(task, opt, tmp_path)

    torch.manual_seed(7)
    other = LEAPTask.from_timm(  # seven classes, same backbone
        "test_resnet", C + 1, cloud="full", class_counts=COUNTS + [6], seed=7, verbose=False
    )
    other.setup_ema(decay=0.9)
    for ema, load in ((False, resume_task_checkpoint), (True, load_task_ema_checkpoint)):
        before = {k: v.clone() for k, v in other.get_trainable_module(ema=ema).state_dict().items()}
        with pytest.raises(ValueError, match="checkpoint head has 6 weight rows"):
            load(other, path)
        after = other.get_trainable_module(ema=ema).state_dict()
        assert set(after) == set(before)
        for key in before:
            assert torch.equal(after[key], before[key]), (ema, key)


def test_ftl_checkpoint_saver_resume_mid_stage_1_with_class_balanced_tail(tmp_path):
    """FTL with ``tail_sampling="classes"`` saved by timm's ``CheckpointSaver`` in the middle of
    stage 1 and resumed by ``resume_task_checkpoint`` / ``load_task_ema_checkpoint``: the next
    steps (class-balanced long-tail stream, statistics, frozen parts) are the ones the task that
    never stopped takes; a task drawing the other stream refuses the checkpoint unchanged."""
    kw = dict(stage_iters=3, max_alternations=2, tail_sampling="classes")
    task = _ftl_task(seed=1, **kw)
    ema = task.setup_ema(decay=0.5)
    _, dataset, stats_loader = _ftl_dataset()
    opt = torch.optim.SGD(task.model.param_groups(), lr=0.05, momentum=0.9)
    run_ftl_task(task, dataset, stats_loader, opt, until=3, ema=ema)  # stage 0, UpdateStats, 1 step
    assert task.stage == 1 and task.scheduler.stage_iteration == 1
    path = _save(task, opt, tmp_path)

    samples = _ftl_task(seed=1, **dict(kw, tail_sampling="samples"))
    before = {k: v.clone() for k, v in samples.model.state_dict().items()}
    with pytest.raises(ValueError, match="tail_sampling='classes'"):
        resume_task_checkpoint(samples, path, log_info=False)
    assert samples.stage == 0
    assert all(torch.equal(v, before[k]) for k, v in samples.model.state_dict().items())

    restored = _ftl_task(seed=7, **kw)  # other initial weights
    restored.setup_ema(decay=0.5)
    restored_opt = torch.optim.SGD(restored.model.param_groups(), lr=0.05, momentum=0.9)
    assert resume_task_checkpoint(restored, path, optimizer=restored_opt, log_info=False) == 1
    load_task_ema_checkpoint(restored, path)
    assert restored.scheduler.state_dict() == task.scheduler.state_dict()
    # the restored task freezes at its first training forward (an optimiser built after the
    # resume, as timm's create_optimizer_v2 would be, sees every part)
    assert task.model.frozen == ("encoder", "decoder") and restored.model.frozen == ()
    for t, o in ((task, opt), (restored, restored_opt)):
        torch.manual_seed(0)
        # four more steps: into stage 2 and back
        run_ftl_task(t, dataset, stats_loader, o, until=7, ema=t.trainable_module_ema)
    assert restored.scheduler.state_dict() == task.scheduler.state_dict()
    for ema_copy in (False, True):
        a = task.get_trainable_module(ema=ema_copy).state_dict()
        b = restored.get_trainable_module(ema=ema_copy).state_dict()
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), (ema_copy, key)


def test_ftl_residual_filter_through_checkpoint_saver_and_export(tmp_path):
    """``filter="residual"`` (``f = g + R(g)``): the model starts with ``f = g``, trains through
    Algorithm 1 with an EMA, is saved by timm's ``CheckpointSaver`` mid stage 1 and resumed by
    ``resume_task_checkpoint`` into the same next steps; a task built with the plain MLP filter
    refuses the checkpoint (its marker buffer is missing) and keeps its state; the eval model
    exports to ONNX."""
    pytest.importorskip("onnxruntime")
    kw = dict(stage_iters=3, max_alternations=2, filter="residual", embedding_size=None)
    task = _ftl_task(seed=1, **kw)
    x, dataset, stats_loader = _ftl_dataset()
    task.model.eval()
    with torch.no_grad():
        g = task.model.encode(x[:4])
        torch.testing.assert_close(task.model.embed(g), g)  # R starts at zero: f = g
    ema = task.setup_ema(decay=0.5)
    opt = torch.optim.SGD(task.model.param_groups(), lr=0.05, momentum=0.9)
    run_ftl_task(task, dataset, stats_loader, opt, until=3, ema=ema)
    assert task.stage == 1
    path = _save(task, opt, tmp_path)

    with pytest.raises(ValueError, match="filter='residual' maps g to f .* or use filter='mlp'"):
        _ftl_task(seed=1, **dict(kw, embedding_size=24))  # the adapter's keywords, not form=
    mlp = _ftl_task(seed=1, **dict(kw, filter="mlp"))
    before = {k: v.clone() for k, v in mlp.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="filter.residual"):
        resume_task_checkpoint(mlp, path, log_info=False)
    assert all(torch.equal(v, before[k]) for k, v in mlp.model.state_dict().items())

    restored = _ftl_task(seed=7, **kw)
    restored.setup_ema(decay=0.5)
    restored_opt = torch.optim.SGD(restored.model.param_groups(), lr=0.05, momentum=0.9)
    assert resume_task_checkpoint(restored, path, optimizer=restored_opt, log_info=False) == 1
    load_task_ema_checkpoint(restored, path)
    for t, o in ((task, opt), (restored, restored_opt)):
        torch.manual_seed(0)
        run_ftl_task(t, dataset, stats_loader, o, until=7, ema=t.trainable_module_ema)
    a, b = task.model.state_dict(), restored.model.state_dict()
    assert set(a) == set(b) and "filter.residual" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["filter.3.weight"], torch.zeros_like(a["filter.3.weight"]))
    _export_and_compare(task.get_eval_model(), x[:4], tmp_path, "ftl_residual")


# ---------------------------------------------------------------- export for inference
def _export_and_compare(model, x, tmp_path, name):
    import onnxruntime

    model.eval()
    with torch.no_grad():
        want = model(x)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), want)
    path = str(tmp_path / f"{name}.onnx")
    torch.onnx.export(
        model, (x,), path, input_names=["input"], output_names=["output"], dynamo=False
    )
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_eval_models_export_with_jit_trace_and_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    x, y = _images([2] * C, 4)
    task = _leap_task(seed=3)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    _steps(task, opt, x, y, 2)
    _export_and_compare(task.get_eval_model(), x[:4], tmp_path, "leap_backbone")  # embeddings
    ftl = FTLTask.from_timm(
        "test_resnet",
        C,
        stage0_iters=1,
        embedding_size=16,
        filter_hidden=32,
        classifier="linear",
        verbose=False,
    )
    _export_and_compare(ftl.get_eval_model(), x[:4], tmp_path, "ftl_embedding")  # f = R(Enc(x))


def test_model_holding_the_head_exports(tmp_path):
    """The trainable module (backbone + LEAP head: closed-set s cos logits) with its state."""
    pytest.importorskip("onnxruntime")
    x, y = _images([2] * C, 5)
    task = _leap_task(seed=4)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    _steps(task, opt, x, y, 2)
    _export_and_compare(task.get_trainable_module(), x[:4], tmp_path, "leap_logits")


# ---------------------------------------------------------------- distributed: 2 gloo processes
DIST_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
torch.set_num_threads(1)
from feature_cloud.integrations.timm import LEAPTask

dist.init_process_group("gloo")                      # as torchrun-launched timm training does
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
task = LEAPTask.from_timm("test_resnet", 6, cloud="full", class_counts=[30] * 6, seed=0,
                          scale=16.0, margin=0.2, verbose=False)
task.prepare_distributed()                           # timm's task API: DDP; no synchronize() call
opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
g = torch.Generator().manual_seed(100 + rank)        # each rank its own data
task.train()
for step in range(3):
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 6, (8,), generator=g)
    opt.zero_grad()
    task(x, y)["loss"].backward()
    opt.step()
stats = task.head.statistics
torch.save({k: v for k, v in stats.state_dict().items()}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_prepare_distributed_synchronises_statistics_on_two_gloo_ranks(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(DIST_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    print(f"\n2-process gloo timm run: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (
        int(a["memory_fill"].sum()) == 2 * 3 * 8
    )  # both ranks' samples on each rank (capacity 30 per class)


# ---------------------------------------------------------------- a compiled trainable module
def test_tasks_see_through_a_compiled_trainable_module(tmp_path):
    """Compile trial: after ``task.trainable_module = torch.compile(task.trainable_module)``
    (the plain-PyTorch way) training worked but ``task.head``, ``get_task_state``,
    ``get_checkpoint_state``, ``create_evaluator`` and ``FTLTask.model`` raised "cannot find
    ... inside OptimizedModule". They follow ``_orig_mod`` now; timm's ``CheckpointSaver``
    writes keys without ``_orig_mod.``, which an uncompiled task resumes from."""
    import torch._dynamo

    from feature_cloud import FTLModel, LEAPMarginHead

    torch._dynamo.reset()
    task = _leap_task(seed=1)
    task.trainable_module = torch.compile(task.trainable_module, backend="eager")
    x, y = _images([4] * C, 3)
    opt = torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05)
    _steps(task, opt, x, y, 1)
    assert isinstance(task.head, LEAPMarginHead) and task.head.step == 1
    assert "feature_cloud.step" in task.get_task_state()["head"]
    state = task.get_checkpoint_state()
    keys = [*state["state_dict"], *state["task_state"]["head"]]
    assert keys and not any("_orig_mod" in k for k in keys)
    task.create_evaluator()
    path = _save(task, opt, tmp_path)
    saved = torch.load(path, weights_only=True)
    assert not any("_orig_mod" in k for k in saved["state_dict"])

    restored = _leap_task(seed=7)
    resume_task_checkpoint(restored, path, log_info=False)
    for k, v in task.get_trainable_module().state_dict().items():
        assert torch.equal(restored.get_trainable_module().state_dict()[k[len("_orig_mod.") :]], v)

    ftl = _ftl_task()
    ftl.trainable_module = torch.compile(ftl.trainable_module, backend="eager")
    assert isinstance(ftl.model, FTLModel)
    assert set(ftl.get_task_state()) >= {"classifier", "feature_transfer"}


def test_leap_task_compile_keeps_the_head_eager_which_compiles_in_place():
    """``LEAPTask.compile()`` compiles the backbone (the eval model it returns); the head,
    eager, compiles in place with ``task.head.compile(fullgraph=True)`` (the README's advice on
    a GPU): it trains, keeps its names and serves the task state and evaluator."""
    import torch._dynamo

    from feature_cloud import LEAPMarginHead

    torch._dynamo.reset()
    task = _leap_task(seed=1)
    assert task.compile(backend="eager") is task.get_eval_model()
    assert isinstance(task.head, LEAPMarginHead)
    names = list(task.head.state_dict())
    task.head.compile(backend="eager", fullgraph=True)
    x, y = _images([4] * C, 3)
    _steps(task, torch.optim.SGD(task.get_trainable_module().parameters(), lr=0.05), x, y, 2)
    assert task.head.step == 2 and list(task.get_task_state()["head"]) == names
    task.create_evaluator()
