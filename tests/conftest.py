"""Test-suite settings and the helpers the test modules share (``from conftest import ...``).

One intra-op thread: the models in these tests are tiny; on a 2-core CI machine (or a loaded
one) a second torch thread only adds contention, and a fixed thread count keeps float
reductions reproducible. Tests live by area: ``core/`` (the package), ``integrations/`` (PML,
fastreid, timm, examples), ``demo/`` (the command line tool and the evaluation).
"""

from __future__ import annotations

import copy
import faulthandler
import importlib
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

torch.set_num_threads(1)

#: (major, minor) of the installed torch: tests of behaviour that older releases lack ask for it
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
#: the repository root (examples/, benchmarks/)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: tests/data: checkpoints and pickles written by earlier releases and commits
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def run_fresh_python(script: str, *paths: str, timeout: float = 300) -> None:
    """Run ``script`` in a fresh Python process (one intra-op thread) that imports this
    checkout's package, ``conftest`` and ``tests/data``'s scripts, and ``paths`` (a test's own
    folder, to import the test module); a failure fails the test with the process's output."""
    head = (
        f"import sys\nsys.path[:0] = {[REPO_ROOT, os.path.dirname(DATA_DIR), DATA_DIR, *paths]!r}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", head + script],
        cwd=REPO_ROOT,
        env=env,
        timeout=timeout,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.fail(f"the fresh process failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def make_batch(seed: int = 0, b: int = 32, d: int = 16, c: int = 12) -> Tuple[Tensor, Tensor]:
    """A reproducible batch: ``(b, d)`` standard-normal features and ``(b,)`` labels in ``[0, c)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, c, (b,), generator=g)


def loss_and_grads(
    fn: Callable[..., Tensor], *inputs: Tensor, params: Iterable[Tensor] = ()
) -> Tuple[Tensor, ...]:
    """``(loss, grad of each input, grad of each param)`` of ``fn(*inputs)``; the inputs are
    cloned as fresh leaves, a non-scalar loss is summed for the gradients."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    params = list(params)
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss.sum(), leaves + params)
    return (loss.detach(), *grads)


def state_snapshot(module: torch.nn.Module) -> Dict[str, Any]:
    """Every parameter, buffer and extra state (step, RNG) of ``module``, deep-copied."""
    return copy.deepcopy(module.state_dict())


def assert_same_state(a: Dict[str, Any], b: Dict[str, Any], what: str = "") -> None:
    """Two :func:`state_snapshot` results are bit-identical (tensors: dtype and values)."""
    assert a.keys() == b.keys(), what
    for k in a:
        if isinstance(a[k], Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{what}: {k}"
        else:
            assert repr(a[k]) == repr(b[k]), f"{what}: {k}"


def dynamo_limits(limit: int, **kw: Any) -> Any:
    """``torch._dynamo.config.patch`` with the recompile limit (``recompile_limit`` since torch 2.6,
    ``cache_size_limit`` before)."""
    import torch._dynamo

    key = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    return torch._dynamo.config.patch(**{key: limit}, **kw)


def _gloo_worker(
    rank: int,
    world: int,
    port: int,
    module: str,
    checks: List[str],
    group_timeout: float,
    dump: float,
) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    # a rank still running near the parent's deadline prints where it waits (then is killed)
    faulthandler.dump_traceback_later(dump, exit=False)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=group_timeout),
    )
    mod = importlib.import_module(module)
    try:
        for name in checks:
            getattr(mod, name)(rank, world)
            dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    if TORCH_VERSION < (2, 5):
        # torch 2.3 / 2.4: gloo's destroy_process_group hung for good in about one run in ten
        # once the other ranks had left (a faulthandler dump showed one rank there); every check
        # has passed and synchronised by now, so leave without the teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


def run_gloo_checks(
    module: str, world: int, checks: Iterable[str], timeout: float, group_timeout: float
) -> None:
    """Run ``module``'s functions ``checks`` (each ``(rank, world)``, a barrier after each) in
    ``world`` spawned gloo processes; a failing rank fails the test with its traceback, and the
    whole run is bounded by ``timeout`` seconds (a collective by ``group_timeout``)."""
    args = (world, free_port(), module, list(checks), group_timeout, timeout - 15)
    ctx = mp.start_processes(
        _gloo_worker, args=args, nprocs=world, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{module} checks with {world} processes exceeded {timeout} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a gloo process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ftl_task(task, dataset, stats_loader, opt, until=None, ema=None, record=None) -> None:
    """Algorithm 1 through a timm ``FTLTask`` with its own loaders (the README loop), in train
    mode: to the end of the schedule, or until its ``iteration`` reaches ``until``. ``ema`` is
    updated with the ``FTLModel`` after each step; ``record`` collects ``(stage, loss)``."""
    task.train()
    while not task.finished:
        stage = task.stage
        if task.needs_stats:
            task.update_stats(stats_loader)
        loaders = task.loaders(dataset, batch_size=12)
        for batch in zip(*loaders) if stage == 1 else loaders:
            if stage == 1:
                (xr, yr, _), (xt, yt, _) = batch  # hard batch from h, long-tail batch
                result = task(xr, yr, xt, yt)
            else:
                x, y, _ = batch
                result = task(x, y)
            opt.zero_grad()
            result["loss"].backward()
            opt.step()
            if ema is not None:
                ema.update(task.model)  # the FTLModel itself
            if record is not None:
                record.append((stage, float(result["loss"].detach())))
            if task.step() != stage or (until is not None and task.scheduler.iteration >= until):
                break
        if until is not None and task.scheduler.iteration >= until:
            return


class SyncWatch(TorchDispatchMode):
    """Records ops that force a host sync and the largest tensor any op returns."""

    SYNC = {"_local_scalar_dense", "nonzero", "masked_select", "item", "_assert_async"}

    def __init__(self):
        super().__init__()
        self.syncs, self.largest = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNC:
            self.syncs.append(name)
        if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for i in (args[1] if len(args) > 1 else ())
            if i is not None
        ):
            self.syncs.append(name + "[bool mask]")
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out
