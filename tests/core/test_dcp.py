"""torch.distributed.checkpoint (DCP) of models holding the package's modules.

DCP loads in place and cannot resize a tensor, while a head that counts K_i online has an angle
memory of size 0 until its warm-up ends (and FeatureTransfer's PCA basis has no columns before
UpdateStats): :func:`feature_cloud.prepare_dcp_load` lays those buffers out as the checkpoint
holds them. Single process (no process group: DCP's single-process mode) and, where FSDP2's
``fully_shard`` exists, two gloo processes.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from conftest import assert_same_state, run_gloo_checks, state_snapshot
from feature_cloud import FeatureTransfer, LEAPMarginHead, prepare_dcp_load
from feature_cloud.distributed import ShardedLEAPMarginHead

dcp = pytest.importorskip("torch.distributed.checkpoint")
try:
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
except ImportError:  # pragma: no cover - torch without the state_dict helpers
    get_state_dict = set_state_dict = None  # type: ignore[assignment]
try:
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6
except ImportError:  # pragma: no cover - older torch
    try:
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]
    except ImportError:
        fully_shard = None  # type: ignore[assignment]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP's single-process notice


def _single_process_dcp() -> bool:
    """Whether this torch's DCP (and its state_dict helpers) run without a process group (torch
    2.2's gathered the keys over the default group; torch 2.3 dropped that)."""
    try:
        with tempfile.TemporaryDirectory() as path:
            dcp.save({"x": torch.ones(2)}, checkpoint_id=path)
            state = {"x": torch.zeros(2)}
            dcp.load(state, checkpoint_id=path)
            linear = nn.Linear(1, 1)
            if get_state_dict is not None:
                get_state_dict(linear, torch.optim.SGD(linear.parameters(), lr=0.1))
        return bool(state["x"].eq(1).all())
    except (Exception, getattr(dcp, "CheckpointException", Exception)):
        return False


one_process = pytest.mark.skipif(
    not _single_process_dcp(), reason="this torch's DCP needs a process group"
)

C, D, IN, B = 12, 16, 20, 6
COUNTS = [5, 1, 3, 2, 8, 1, 4, 2, 6, 1, 3, 2]
MEMORY = "model.head.feature_cloud.statistics.memory"


class Net(nn.Module):
    def __init__(self, classes: int = C, **head: Any) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(IN, 32), nn.ReLU(), nn.Linear(32, D))
        self.head = LEAPMarginHead(
            D, classes, margin_type="cosface", scale=24.0, margin=0.2, seed=9, **head
        )

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.head(self.backbone(x), y)


def _build(classes: int = C, counts: bool = False) -> Tuple[Net, torch.optim.Optimizer]:
    torch.manual_seed(0)
    head = dict(class_counts=COUNTS) if counts else dict(warmup_steps=2, count_steps=2)
    model = Net(classes, **head)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _batch(step: int, rank: int = 0) -> Tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    y = torch.randint(0, C, (B,), generator=g)
    return torch.randn(B, IN, generator=g) + nn.functional.one_hot(y, IN).float() * 2, y


def _train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0
) -> List[float]:
    losses = []
    for step in steps:
        loss = model(*_batch(step, rank))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _save(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def _resume(model: nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    """The flow of torch's DCP recipe, after the package's layout step."""
    prepare_dcp_load(model, path)
    msd, osd = get_state_dict(model, opt)
    state: Dict[str, Any] = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _head_state(model: nn.Module) -> Dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


needs_state_dict_api = pytest.mark.skipif(
    get_state_dict is None, reason="torch.distributed.checkpoint.state_dict is unavailable"
)


# --------------------------------------------------------------------------------------------
# one process
# --------------------------------------------------------------------------------------------


@one_process
@needs_state_dict_api
@pytest.mark.parametrize("counts", [False, True], ids=["online", "class_counts"])
def test_dcp_resume_continues_bit_identically(counts: bool) -> None:
    model, opt = _build(counts=counts)
    _train(model, opt, range(3))
    with tempfile.TemporaryDirectory() as path:
        _save(model, opt, path)
        expected = _train(model, opt, range(3, 6))
        after = _head_state(model)

        fresh, fresh_opt = _build(counts=counts)
        if not counts:  # the memory is laid out at the end of the warm-up: size 0 here
            assert fresh.head.feature_cloud.statistics.memory.numel() == 0
            with pytest.raises(dcp.CheckpointException, match="Size mismatch"):  # in place
                dcp.load({"model": get_state_dict(fresh, fresh_opt)[0]}, checkpoint_id=path)
            fresh, fresh_opt = _build(counts=counts)
        resized = prepare_dcp_load(fresh, path)
        assert resized == ([] if counts else [MEMORY, MEMORY + "_stamp", MEMORY + "_owner"])
        _resume(fresh, fresh_opt, path)  # prepare_dcp_load again: nothing left to resize
        assert fresh.head.feature_cloud.steps_taken == 3
        assert _train(fresh, fresh_opt, range(3, 6)) == expected  # bit-identical losses
        assert_same_state(_head_state(fresh), after, "resumed head")


@one_process
def test_dcp_in_place_load_without_load_state_dict() -> None:
    """``dcp.load(model.state_dict())`` fills the module's own tensors: after the layout step,
    that alone resumes (the host copies of the step and of the layout the ranks compare are
    re-read from the loaded buffers)."""
    model, opt = _build()
    _train(model, opt, range(3))
    stats = model.head.feature_cloud.statistics
    with tempfile.TemporaryDirectory() as path:
        dcp.save({"model": model.state_dict()}, checkpoint_id=path)
        reference = state_snapshot(model)
        fresh, _ = _build()
        prepare_dcp_load(fresh, path)
        layout = fresh.head.feature_cloud.statistics
        assert layout.layout_setting.startswith("counted online")  # not loaded yet
        dcp.load({"model": fresh.state_dict()}, checkpoint_id=path)
    assert_same_state(state_snapshot(fresh), reference, "in place")
    assert layout.layout_setting == stats.layout_setting != fresh_text()
    assert fresh.head.feature_cloud.agreed_settings() == model.head.feature_cloud.agreed_settings()
    fresh.train()
    x, y = _batch(3)
    assert fresh(x, y).item() == model(x, y).item()


@one_process
def test_cloudless_load_after_an_in_place_dcp_load_keeps_the_loaded_counts() -> None:
    """s54 review 3, finding 2: a cloud-less checkpoint loaded after ``dcp.load`` in place keeps
    the counts that dcp.load wrote (its host copy read again, as ``layout_setting`` reads it),
    not the counts the head was built with, whether or not ``layout_setting`` was read."""
    d, c = 8, 6
    built, saved = [3, 2, 4, 1, 2, 3], [9, 9, 1, 1, 5, 5]
    cloudless = LEAPMarginHead(d, c, cloud=None, seed=2).state_dict()
    reference = LEAPMarginHead(d, c, class_counts=saved, seed=1).statistics
    with tempfile.TemporaryDirectory() as path:
        dcp.save(
            {"model": LEAPMarginHead(d, c, class_counts=saved, seed=1).state_dict()},
            checkpoint_id=path,
        )
        for read in (False, True):
            head = LEAPMarginHead(d, c, class_counts=built, seed=1)
            prepare_dcp_load(head, path)
            dcp.load({"model": head.state_dict()}, checkpoint_id=path)
            stats = head.statistics
            if read:
                assert stats.layout_setting.startswith("[9, 9, 1, 1, 5, 5]")
            head.load_state_dict(cloudless)
            assert stats.class_counts.tolist() == saved, f"layout_setting read: {read}"
            assert stats.layout_setting.startswith("[9, 9, 1, 1, 5, 5]")
            for name in ("memory_capacity", "memory_offsets", "memory"):  # laid out for them
                assert getattr(stats, name).shape == getattr(reference, name).shape, name
            assert torch.equal(stats.memory_capacity, reference.memory_capacity)


def fresh_text() -> str:
    """``layout_setting`` of a head still counting its ``K_i`` online."""
    return _build()[0].head.feature_cloud.statistics.layout_setting


@one_process
@needs_state_dict_api
@pytest.mark.parametrize("saved_compiled", [True, False], ids=["state_dict", "get_state_dict"])
def test_dcp_layout_of_a_compiled_child(saved_compiled: bool) -> None:
    """A torch.compile'd head: ``model.state_dict()`` keys hold its ``_orig_mod.``,
    ``get_model_state_dict``'s do not; the layout step matches either, found or given."""
    model, opt = _build()
    _train(model, opt, range(3))
    if saved_compiled:
        model.head = torch.compile(model.head, backend="eager")  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as path:
        dcp.save({"model": model.state_dict()}, checkpoint_id=path)
        mid = "head._orig_mod." if saved_compiled else "head."
        memory = "model." + mid + "feature_cloud.statistics.memory"
        for prefix in (None, "model."):
            fresh, _ = _build()
            fresh.head = torch.compile(fresh.head, backend="eager")  # type: ignore[assignment]
            resized = prepare_dcp_load(fresh, path, prefix=prefix)
            assert resized == [memory, memory + "_stamp", memory + "_owner"]
        fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
        state = {
            "model": fresh.state_dict() if saved_compiled else get_state_dict(fresh, fresh_opt)[0]
        }
        dcp.load(state, checkpoint_id=path)
    head = fresh.head._orig_mod  # type: ignore[attr-defined]
    assert_same_state(
        state_snapshot(head),
        state_snapshot(getattr(model.head, "_orig_mod", model.head)),
        "compiled",
    )
    # a compiled root: its "_orig_mod." is part of the prefix, given or found
    root = torch.compile(_build()[0], backend="eager")
    with tempfile.TemporaryDirectory() as path:
        dcp.save({"model": root.state_dict()}, checkpoint_id=path)
        for prefix in (None, "model.", "model._orig_mod."):
            fresh = torch.compile(_build()[0], backend="eager")
            assert prepare_dcp_load(fresh, path, prefix=prefix) == []  # nothing to resize


@one_process
def test_dcp_layout_refuses_another_class_count_before_anything_changes() -> None:
    model, opt = _build()
    _train(model, opt, range(3))
    with tempfile.TemporaryDirectory() as path:
        dcp.save({"model": model.state_dict()}, checkpoint_id=path)
        other, _ = _build(classes=C + 1)
        before = state_snapshot(other)
        with pytest.raises(ValueError, match="num_classes=13"):
            prepare_dcp_load(other, path)
        assert_same_state(state_snapshot(other), before, "refused")
        # the prefix: found from the keys, or given; the metadata or a reader do as the folder
        fresh, _ = _build()
        reader = dcp.FileSystemReader(path)
        with pytest.raises(ValueError, match="holds no 'backbone.head"):
            prepare_dcp_load(nn.ModuleDict({"backbone": fresh}), path)
        for wrong in ("other.", "model", "model.head."):  # refused, naming the keys' beginnings
            with pytest.raises(ValueError, match=f"prefix='{wrong}'.*begin with 'model.'"):
                prepare_dcp_load(fresh, reader.read_metadata(), prefix=wrong)
            assert fresh.head.feature_cloud.statistics.memory.numel() == 0  # nothing changed
        with pytest.raises(ValueError, match="prefix='nope.'.*begin with 'model.'"):
            prepare_dcp_load(nn.Linear(2, 2), path, prefix="nope.")  # nothing state-sized
        assert len(prepare_dcp_load(fresh, reader, prefix="model.")) == 3
        assert prepare_dcp_load(nn.Linear(2, 2), path) == []  # nothing state-sized: no-op
        with pytest.raises(TypeError, match="StorageReader or Metadata"):
            prepare_dcp_load(fresh, {"model": 1})

    # saved during the warm-up (no angle memory yet) into a head built with class_counts:
    # load_state_dict takes the checkpoint's partial counts (or keeps a cloud-less source's
    # layout), which DCP cannot; refused, nothing changed
    model, opt = _build()
    _train(model, opt, range(1))
    with tempfile.TemporaryDirectory() as path:
        dcp.save({"model": model.state_dict()}, checkpoint_id=path)
        given, _ = _build(counts=True)
        before = state_snapshot(given)
        with pytest.raises(ValueError, match="statistics.memory is empty"):
            prepare_dcp_load(given, path)
        assert_same_state(state_snapshot(given), before, "refused: empty memory")


@one_process
def test_dcp_resizes_feature_transfers_basis_and_sample_lists() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate([30, 30, 2, 3])])
    x = torch.randn(len(y), 8, generator=g) + nn.functional.one_hot(y, 8).float() * 3
    ft = FeatureTransfer(8, 4, num_components=3, class_counts=[30, 30, 2, 3])
    ft.update_stats([(x, y)])
    assert ft.ready
    with tempfile.TemporaryDirectory() as path:
        dcp.save({"ftl": ft.state_dict()}, checkpoint_id=path)
        fresh = FeatureTransfer(8, 4, num_components=3, class_counts=[30, 30, 2, 3])
        assert "ftl.basis" in prepare_dcp_load(fresh, path)
        state = {"ftl": fresh.state_dict()}
        dcp.load(state, checkpoint_id=path)
        fresh.load_state_dict(state["ftl"])
    assert_same_state(state_snapshot(fresh), state_snapshot(ft), "FeatureTransfer")


# --------------------------------------------------------------------------------------------
# two processes: FSDP2
# --------------------------------------------------------------------------------------------


def check_fsdp2_dcp_resume(rank: int, world: int) -> None:
    assert fully_shard is not None

    def build() -> Tuple[nn.Module, torch.optim.Optimizer]:
        model, _ = _build()
        fully_shard(model.backbone)
        fully_shard(model)
        return model, torch.optim.Adam(model.parameters(), lr=1e-2)

    _check_resume(rank, build, "fsdp2")


def check_fsdp1_dcp_resume(rank: int, world: int) -> None:
    """FSDP1 with ``use_orig_params``: the head's weight attribute is a view of this rank's
    shard, whose shape is not the checkpoint's (the layout step checks buffers only)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def build() -> Tuple[nn.Module, torch.optim.Optimizer]:
        model, _ = _build()
        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        return wrapped, torch.optim.Adam(wrapped.parameters(), lr=1e-2)

    _check_resume(rank, build, "fsdp1")


def _check_resume(rank: int, build: Any, name: str) -> None:
    path = os.path.join(os.environ["FC_TEST_DCP_DIR"], name)
    model, opt = build()
    _train(model, opt, range(3), rank)
    _save(model, opt, path)
    expected = _train(model, opt, range(3, 5), rank)
    after = _head_state(model)
    fresh, fresh_opt = build()
    _resume(fresh, fresh_opt, path)
    assert _train(fresh, fresh_opt, range(3, 5), rank) == expected
    assert_same_state(_head_state(fresh), after, f"rank {rank}")
    dist.barrier()


def check_in_place_and_set_state_dict_resumes_agree(rank: int, world: int) -> None:
    """One rank resumes in place (``dcp.load`` into ``model.state_dict()``), the other with
    ``set_state_dict``: their synchronised clouds agree on the loaded layout and train on."""
    path = os.path.join(os.environ["FC_TEST_DCP_DIR"], "flows")
    model, opt = _build()
    _train(model, opt, range(3), rank)
    _save(model, opt, path)
    fresh, fresh_opt = _build()
    if rank == 0:
        prepare_dcp_load(fresh, path)
        dcp.load({"model": fresh.state_dict()}, checkpoint_id=path)
    else:
        _resume(fresh, fresh_opt, path)
    _train(fresh, fresh_opt, range(3, 4), rank)  # refused on both ranks if they disagreed
    assert fresh.head.feature_cloud.statistics.layout_setting == (
        model.head.feature_cloud.statistics.layout_setting
    )
    dist.barrier()


def check_sharded_head_is_refused(rank: int, world: int) -> None:
    """DCP saves a plain tensor once, as a value all ranks hold alike: a shard of a
    ShardedLEAPMarginHead would come back as another rank's, so the layout step refuses it."""
    path = os.path.join(os.environ["FC_TEST_DCP_DIR"], "sharded")
    head = ShardedLEAPMarginHead(D, C, class_counts=COUNTS, seed=3)
    dcp.save({"head": head.state_dict()}, checkpoint_id=path)
    with pytest.raises(NotImplementedError, match="ShardedLEAPMarginHead of 2 shards"):
        prepare_dcp_load(head, path)


@needs_state_dict_api
@pytest.mark.skipif(fully_shard is None, reason="FSDP2 fully_shard is unavailable")
def test_fsdp2_dcp_resume_on_two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as path:
        monkeypatch.setenv("FC_TEST_DCP_DIR", path)  # the spawned ranks inherit it
        checks = [
            "check_fsdp2_dcp_resume",
            "check_fsdp1_dcp_resume",
            "check_in_place_and_set_state_dict_resumes_agree",
            "check_sharded_head_is_refused",
        ]
        run_gloo_checks(__name__, 2, checks, 120.0, 60)
