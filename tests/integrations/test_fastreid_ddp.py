"""fastreid's ``DefaultTrainer`` under DDP (2 gloo processes, CPU): the LEAP class statistics are
identical on both ranks with nothing but the YAML (no ``synchronize()`` call)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastreid")

from _fastreid_data import EXAMPLE, HEAD_IDS, HEAD_IMAGES, NUM_IDS, ROOT, TAIL_IMAGES

SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
torch.set_num_threads(1)
sys.path.insert(0, os.path.join(sys.argv[2], "examples"))
import fastreid_train as example
import feature_cloud.integrations.fastreid as fc_fastreid  # first: fastreid compat patches
from fastreid.engine import DefaultTrainer
from fastreid.utils import comm

# what fastreid's launch() does per worker (it needs CUDA/NCCL): the process group and the
# per-machine group; torch.distributed.run provides RANK / WORLD_SIZE / MASTER_ADDR
dist.init_process_group("gloo")
comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(dist.get_world_size())))
out = sys.argv[1]
cfg = example.build_cfg("Market1501/leap_R50.yml", example.TINY_OPTS + [
    "INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]", "SOLVER.MAX_EPOCH", "1",
    "TEST.EVAL_PERIOD", "1", "TEST.PRECISE_BN.ENABLED", "False", "MODEL.HEADS.FEATURE_CLOUD.SEED", "0",
    "OUTPUT_DIR", out])
trainer = DefaultTrainer(cfg)        # wraps the model in DDP (fastreid: broadcast_buffers=False)
assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
trainer.resume_or_load(resume=False)
trainer.train()
head = trainer.model.module.heads.margin_head
state = {k: v for k, v in head.statistics.state_dict().items()}
state["step"] = torch.tensor(int(head.step))
torch.save(state, os.path.join(out, f"stats_rank{dist.get_rank()}.pt"))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_default_trainer_ddp_statistics_identical_on_two_gloo_ranks(tmp_path):
    data = tmp_path / "data"
    EXAMPLE.write_synthetic_market1501(
        str(data),
        num_ids=NUM_IDS,
        head_ids=HEAD_IDS,
        head_images=HEAD_IMAGES,
        tail_images=TAIL_IMAGES,
        size=(32, 16),
    )
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT, FASTREID_DATASETS=str(data), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(out),
            ROOT,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"\n2-process gloo fastreid DefaultTrainer: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    a = torch.load(out / "stats_rank0.pt", weights_only=True)
    b = torch.load(out / "stats_rank1.pt", weights_only=True)
    assert int(a["step"]) == int(b["step"]) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # every sample of the global batches is in each rank's memory (not half of them)
    steps = int(a["step"])
    print("memory fill", int(a["memory_fill"].sum()), "steps", steps)
    assert int(a["memory_fill"].sum()) > steps * 8  # more than one rank's 8 samples per step
