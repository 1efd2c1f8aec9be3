"""The core on a CUDA device (skipped without one): the same training trajectory as on the CPU
at face (s=64) and re-ID (s=24) settings on trained-like features, mixed precision, no host
synchronisation in a training step (CUDA's own sync debug mode), ``torch.compile`` with
Inductor's GPU kernels, and checkpoints that move between a GPU and a CPU-only process."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import dynamo_limits
from feature_cloud import FeatureTransfer, LEAPMarginHead, MetricL2, fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DEV = "cuda"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = {
    "face_cosface": ("cosface", 64.0, 0.35),
    "face_arcface": ("arcface", 64.0, 0.5),
    "reid_cosface": ("cosface", 24.0, 0.2),
}


def _trained(b, c, d, seed, cos=0.66):
    """Features at cosine ``cos`` to their class weight plus orthogonal noise (as after
    training: target logits near ``s * cos``, the others near 0), weights, labels."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (b,), generator=g)
    wd = F.normalize(W, dim=1)[y]
    n = torch.randn(b, d, generator=g)
    n = F.normalize(n - (n * wd).sum(1, keepdim=True) * wd, dim=1)
    return (cos * wd + math.sqrt(1 - cos**2) * n) * math.sqrt(d), W, y


def _counts(c):
    """A long tail: the first quarter of the classes 40 images, the rest 3."""
    return [40 if i < c // 4 else 3 for i in range(c)]


def _head(c, d, setting, impl="auto", **kw):
    margin_type, s, m = SETTINGS[setting]
    kw.setdefault("cloud", "full")
    kw.setdefault("warmup_steps", 0)
    return LEAPMarginHead(
        d,
        c,
        margin_type,
        scale=s,
        margin=m,
        class_counts=_counts(c),
        seed=0,
        impl=impl,
        chunk_size=64 if impl == "chunked" else None,
        **kw,
    )


def _jitter(x, step):
    return x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + step))


@pytest.mark.parametrize("impl", ["fused", "chunked", "reference"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_cuda_training_follows_the_cpu(impl, setting):
    """Five SGD steps with the cloud on: losses, gradients, weights and every statistics buffer
    on the GPU equal the CPU's (the counter-based noise draws the same angles on both)."""
    x, W, y = _trained(96, 200, 32, seed=0)
    cpu = _head(200, 32, setting, impl)
    cpu.weight.data.copy_(W)
    gpu = copy.deepcopy(cpu).to(DEV)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (cpu, gpu)]
    clouded = 0
    for step in range(5):
        xs = _jitter(x, step)
        losses = [cpu(xs, y), gpu(xs.to(DEV), y.to(DEV))]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[1].cpu(), losses[0], rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(gpu.weight.grad.cpu(), cpu.weight.grad, rtol=2e-3, atol=2e-6)
        for opt in opts:
            opt.step()
            opt.zero_grad()
        clouded = int((cpu.feature_cloud.statistics.cloud_variance()[y] > 0).sum())
    assert clouded > 0  # the cloud is on for part of the batch in the last steps
    cpu_state, gpu_state = cpu.state_dict(), gpu.state_dict()
    assert list(cpu_state) == list(gpu_state)
    for k, v in cpu_state.items():
        assert gpu_state[k].device.type == DEV and gpu_state[k].dtype == v.dtype, k
        if v.is_floating_point():
            torch.testing.assert_close(gpu_state[k].cpu(), v, rtol=2e-3, atol=1e-5, msg=k)
        else:
            assert torch.equal(gpu_state[k].cpu(), v), k


@pytest.mark.parametrize("impl", ["fused", "chunked", "reference"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("setting", ["face_cosface", "face_arcface"])
def test_autocast_at_face_settings_is_finite_and_close_to_float32(impl, dtype, setting):
    """s=64 on trained-like features (the target logits far above the rest), 4000 classes, a
    GradScaler-sized upstream gradient: finite loss and gradients under fp16/bf16 autocast,
    within the autocast GEMM's rounding of the float32 step."""
    x, W, y = _trained(128, 4000, 64, seed=1)
    head = _head(4000, 64, setting, impl).to(DEV)
    head.weight.data.copy_(W.to(DEV))
    for step in range(2):  # two angles per class: the cloud is on for the tail rows
        head(_jitter(x, step).to(DEV), y.to(DEV))
    ref = copy.deepcopy(head)
    xc, yc = x.to(DEV).requires_grad_(True), y.to(DEV)
    loss32 = ref(xc, yc)
    (loss32 * 65536.0).backward()
    g32 = (xc.grad.clone(), ref.weight.grad.clone())
    xc.grad = None
    with torch.autocast(DEV, dtype=dtype):
        loss = head(xc, yc)
    assert loss.dtype == torch.float32
    (loss * 65536.0).backward()
    grads = (xc.grad, head.weight.grad)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    rel, cos = (5e-2, 0.98) if dtype == torch.bfloat16 else (1e-2, 0.995)
    assert abs(float(loss.detach() - loss32.detach())) <= rel * abs(float(loss32.detach()))
    for g, r in zip(grads, g32):
        assert F.cosine_similarity(g.flatten().float(), r.flatten(), dim=0) > cos


def test_module_cast_keeps_statistics_float32_and_trains_finite():
    """``head.to(DEV).half()`` / ``.bfloat16()``: the weight takes the dtype, the statistics stay
    float32 (sums of angles), and an fp16 step is finite at s=64."""
    x, W, y = _trained(64, 300, 32, seed=2)
    for dtype in (torch.float16, torch.bfloat16):
        head = _head(300, 32, "face_cosface").to(DEV).to(dtype)
        assert head.weight.dtype == dtype
        for name, buf in head.feature_cloud.statistics.named_buffers():
            assert not buf.is_floating_point() or buf.dtype in (torch.float32, torch.float64), name
        for step in range(3):
            xs = _jitter(x, step).to(DEV).to(dtype).requires_grad_(True)
            loss = head(xs, y.to(DEV))
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(xs.grad).all()
            assert torch.isfinite(head.weight.grad).all()
            head.weight.grad = None


def _no_sync(fn):
    """Run ``fn`` under CUDA's sync debug mode "error": any synchronising call raises."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _count_syncs(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("impl", ["fused", "chunked", "reference"])
def test_training_step_has_no_host_sync_on_cuda(impl):
    """A whole step (statistics update, cloud draw, loss, backward, optimizer) on the GPU
    never waits for the device; ``validate=True`` costs the one documented sync."""
    x, W, y = _trained(128, 500, 32, seed=3)
    xs, yc = x.to(DEV), y.to(DEV)
    head = _head(500, 32, "face_cosface", impl, validate=False).to(DEV)
    head.weight.data.copy_(W.to(DEV))
    reg = MetricL2(0.25)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):  # the first steps create the optimizer state
        head(xs, yc).backward()
        opt.step()
        opt.zero_grad()

    def step():
        feats = xs.clone().requires_grad_(True)
        loss = head(feats, yc) + reg(feats, head.weight, yc)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(3):
        assert _no_sync(step).device.type == DEV
    head.validate = True
    assert _count_syncs(step) <= 1


def test_feature_transfer_step_has_no_host_sync_on_cuda():
    """FTL's per-step Eq. 6 transfer (statistics computed once an epoch) on the GPU."""
    g = torch.randn(400, 16, generator=torch.Generator().manual_seed(4))
    y = torch.cat([torch.arange(10).repeat_interleave(36), torch.arange(10, 30).repeat(2)])
    ft = FeatureTransfer(16, 30, num_components=4, class_counts=torch.bincount(y), validate=False)
    ft = ft.to(DEV)
    ft.update_stats([(g.to(DEV), y.to(DEV))])
    reg = torch.arange(10).repeat(8).to(DEV)
    tail = (torch.arange(80) % 20 + 10).to(DEV)
    feats = g[:80].to(DEV).requires_grad_(True)
    out = _no_sync(lambda: ft.transfer(feats, reg, tail))
    assert out.shape == (80, 16) and torch.isfinite(out).all()


def test_fused_gradcheck_float64_on_cuda():
    x, W, y = _trained(6, 9, 5, seed=5)
    x = x.double().to(DEV).requires_grad_(True)
    W = W.double().to(DEV).requires_grad_(True)
    std = torch.tensor([0.0, 0.3, 0.5, 0.1, 0.2, 0.4], dtype=torch.float64, device=DEV)
    key = torch.tensor([7, 11], dtype=torch.int64, device=DEV)
    for margin_type, chunk in (("cosface", None), ("arcface", 4)):

        def f(a, w):
            return fused.margin_loss(
                a,
                w,
                y.to(DEV),
                margin_type=margin_type,
                scale=16.0,
                margin=0.3,
                noise_std=std,
                noise_key=key,
                chunk_size=chunk,
            )

        assert torch.autograd.gradcheck(f, (x, W), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_compiled_head_on_cuda_equals_eager(impl):
    """``torch.compile(head, fullgraph=True)`` with Inductor's GPU kernels: no graph break (a
    host sync would be one) and one graph for the whole run (through the end of the warm-up
    and past dynamo's recompile limit), the eager head's loss, gradient and statistics, step
    after step."""
    x, W, y = _trained(64, 200, 32, seed=6)
    head = _head(200, 32, "face_cosface", impl, validate=False, warmup_steps=2).to(DEV)
    head.weight.data.copy_(W.to(DEV))
    twin = copy.deepcopy(head)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    yc = y.to(DEV)
    limit = 8  # dynamo's default, fixed (importing timm.optim raises the global one to 1e6)
    for i in range(limit + 4):
        feats = _jitter(x, i).to(DEV)
        with dynamo_limits(limit, error_on_recompile=i > 0):
            got = compiled(feats, yc)
        eager = twin(feats, yc)
        got.backward()
        eager.backward()
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(head.weight.grad, twin.weight.grad, rtol=1e-3, atol=1e-6)
        head.weight.grad = twin.weight.grad = None
    for (k, a), b in zip(head.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


_RESUME = """
import sys, torch
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r}); sys.path.insert(0, {conftest_dir!r})
from test_cuda import _head, _jitter, _trained
assert not torch.cuda.is_available()
x, W, y = _trained(96, 200, 32, seed=7)
head = _head(200, 32, "face_cosface")
head.load_state_dict(torch.load({ckpt!r}, map_location="cpu"))
loss = head(_jitter(x, 3), y)
loss.backward()
print(repr(float(loss)), repr(float(head.weight.grad.norm())))
"""


def test_checkpoint_from_the_gpu_resumes_in_a_cpu_only_process(tmp_path):
    """Train on the GPU, ``torch.save`` the state, resume in a fresh process that sees no GPU
    (``map_location="cpu"``): the next step equals the GPU's next step."""
    x, W, y = _trained(96, 200, 32, seed=7)
    head = _head(200, 32, "face_cosface").to(DEV)
    head.weight.data.copy_(W.to(DEV))
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    for step in range(3):
        head(_jitter(x, step).to(DEV), y.to(DEV)).backward()
        opt.step()
        opt.zero_grad()
    ckpt = tmp_path / "head.pt"
    torch.save(head.state_dict(), ckpt)
    loss = head(_jitter(x, 3).to(DEV), y.to(DEV))
    loss.backward()
    here = os.path.dirname(__file__)
    code = _RESUME.format(root=ROOT, tests=here, conftest_dir=os.path.dirname(here), ckpt=str(ckpt))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu_loss, cpu_grad = (float(v) for v in proc.stdout.split())
    assert math.isclose(cpu_loss, float(loss), rel_tol=2e-4)
    assert math.isclose(cpu_grad, float(head.weight.grad.norm()), rel_tol=2e-3)
    # and back: a CPU state dict loads into a GPU head (load_state_dict copies across devices)
    back = _head(200, 32, "face_cosface").to(DEV)
    back.load_state_dict(torch.load(ckpt, map_location="cpu"))
    assert all(v.device.type == DEV for v in back.state_dict().values())
