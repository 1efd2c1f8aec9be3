"""FTL inside the real fastreid 1.4.0: FTLBaseline from YAML, FTLHook driving Algorithm 1 in the
DefaultTrainer (stage switches, UpdateStats, freezing with fastreid's optimizer, stage-1 batches),
evaluation and the checkpoint."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastreid")
ftlint = pytest.importorskip("feature_cloud.integrations.fastreid_ftl")

from fastreid.config import get_cfg
from fastreid.engine import DefaultTrainer, hooks
from fastreid.modeling import build_model
from fastreid.solver import build as solver_build

from _fastreid_data import (
    FTL_YAML,
    HEAD_IDS,
    HEAD_IMAGES,
    LEAP_YAML,
    NUM_IDS,
    TAIL_IMAGES,
    market_root,  # noqa: F401 (a pytest fixture)
    record_checkpoint_loads,
    tiny_cfg,
)
from feature_cloud import FTLModel

STAGE0, STAGE = 5, 5  # 84 training images / 16 per batch = 5 iterations per epoch, 3 epochs
NUM_TAIL_IDS = NUM_IDS - HEAD_IDS


#: a 7-class FTLBaseline with a CosFace FC (s=16, m=0.2), no decoder and no m-L2 term
_MARGIN_FC_NO_DECODER = (
    "MODEL.HEADS.NUM_CLASSES",
    "7",
    "MODEL.FTL.DECODER_CHANNELS",
    "[]",
    "MODEL.FTL.ALPHA_RECON",
    "0.0",
    "MODEL.FTL.ALPHA_REG",
    "0.0",
    "MODEL.HEADS.CLS_LAYER",
    "CosSoftmax",
    "MODEL.HEADS.SCALE",
    "16",
    "MODEL.HEADS.MARGIN",
    "0.2",
)


def _ftl_cfg(output_dir, *extra):
    return tiny_cfg(
        FTL_YAML,
        output_dir,
        "MODEL.HEADS.EMBEDDING_DIM",
        "64",
        "MODEL.FTL.FILTER_HIDDEN",
        "128",
        "MODEL.FTL.DECODER_CHANNELS",
        "[16, 8]",
        "MODEL.FTL.STAGE0_ITERS",
        str(STAGE0),
        "MODEL.FTL.STAGE_ITERS",
        str(STAGE),
        "MODEL.FTL.MAX_ALTERNATIONS",
        "1",
        "MODEL.FTL.TAIL_THRESHOLD",
        "8",  # 3 regular identities (16 images), 9 long-tail (4)
        *extra,
    )


# ---------------------------------------------------------------- config and model
def test_yaml_needs_the_config_node_and_builds_ftl_baseline(tmp_path):
    cfg = get_cfg()
    with pytest.raises(Exception, match="FTL"):
        cfg.merge_from_file(FTL_YAML)  # yacs rejects MODEL.FTL without add_ftl_config
    cfg = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7")
    assert cfg.MODEL.META_ARCHITECTURE == "FTLBaseline"
    model = build_model(cfg)
    assert isinstance(model, ftlint.FTLBaseline) and isinstance(model.ftl, FTLModel)
    ftl = model.ftl
    assert ftl.feature_dim == 512 and ftl.embedding_size == 64 and ftl.num_classes == 7
    assert isinstance(ftl.classifier, torch.nn.Linear) and ftl.classifier.bias is None
    assert ftl.decoder.out_shape == (3, 32, 16)
    assert (ftl.alpha_sfmx, ftl.alpha_recon, ftl.alpha_reg) == (1.0, 1.0, 0.25)
    assert ftl.recon_reduction == "mean"  # MODEL.FTL.RECON_REDUCTION's default
    paper = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "MODEL.FTL.RECON_REDUCTION", "paper")
    assert build_model(paper).ftl.recon_reduction == "paper"  # Eq. 1 per image (s53 paper 1)
    # the node's string values in any case, as MODEL.HEADS.FEATURE_CLOUD's (s54 trial 4)
    upper = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "MODEL.FTL.RECON_REDUCTION", "PAPER")
    assert build_model(upper).ftl.recon_reduction == "paper"
    bogus = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "MODEL.FTL.RECON_REDUCTION", "sum")
    with pytest.raises(ValueError, match=r"MODEL.FTL.RECON_REDUCTION must be one of"):
        build_model(bogus)
    assert ftl.feature_transfer.tail_threshold == 8 and ftl.feature_transfer.energy == 0.95
    assert model.backbone is ftl.encoder.backbone
    model.eval()
    with torch.no_grad():
        f = model({"images": torch.rand(2, 3, 32, 16) * 255})
    assert f.shape == (2, 64)

    bad = _ftl_cfg(
        tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "MODEL.HEADS.CLS_LAYER", "CircleSoftmax"
    )
    with pytest.raises(ValueError, match="CLS_LAYER"):
        build_model(bad)
    no_dec = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "MODEL.FTL.DECODER_CHANNELS", "[]")
    with pytest.raises(ValueError, match="alpha_recon"):
        build_model(no_dec)  # FTLModel: reconstruction needs a decoder
    margin = _ftl_cfg(tmp_path, *_MARGIN_FC_NO_DECODER)
    ftl = build_model(margin).ftl
    assert ftl.is_margin_head and ftl.decoder is None
    assert (ftl.classifier.margin_type, ftl.classifier.scale, ftl.classifier.cloud) == (
        "cosface",
        16.0,
        None,
    )


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_ftl_baseline_serves_in_half_and_bfloat16(tmp_path, dtype, atol):
    """s55 deploy 1: preprocess_image cast the images to float32 whatever the model's dtype, so an
    FTLBaseline after .half() / .to(torch.bfloat16) crashed in its first conv (LEAPBaseline and
    fastreid's Baseline run). The input now follows the model's dtype; uint8 images still work."""
    import copy

    torch.manual_seed(0)
    model = build_model(_ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7")).eval()
    x = torch.rand(3, 3, 32, 16) * 255
    with torch.no_grad():
        ref = model({"images": x})
        ref8 = model({"images": x.to(torch.uint8)})
        low = copy.deepcopy(model).to(dtype)
        for images, want in ((x.to(dtype), ref), (x.to(torch.uint8), ref8)):
            out = low({"images": images})
            assert out.dtype == dtype and out.shape == ref.shape
            torch.testing.assert_close(out.float(), want, atol=atol, rtol=0)
    assert model.pixel_mean.dtype == torch.float32  # the float32 model is untouched


def test_filter_key_builds_the_residual_filter_and_checkpointer_refuses_the_other_form(tmp_path):
    """``MODEL.FTL.FILTER: residual`` builds ``f = g + R(g)`` (EMBEDDING_DIM = the feature size);
    bad values name the key. fastreid's ``Checkpointer`` (non-strict: it would only log the
    marker buffer) refuses a checkpoint of the other form before it loads anything, and loads
    one of the same form whole."""
    from fastreid.utils.checkpoint import Checkpointer

    from feature_cloud.ftl import ResidualFilter

    def build(form, *opts):
        cfg = _ftl_cfg(
            tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "MODEL.HEADS.EMBEDDING_DIM", "0", *opts
        )
        cfg.defrost()
        cfg.MODEL.FTL.FILTER = form
        return build_model(cfg)

    residual = build("residual")
    assert isinstance(residual.ftl.filter, ResidualFilter)
    assert residual.ftl.embedding_size == residual.ftl.feature_dim == 512
    mlp = build("mlp")
    assert not isinstance(mlp.ftl.filter, ResidualFilter)
    # any case, as the node's other string values (RECON_REDUCTION: PAPER built 'paper')
    assert isinstance(build("Residual").ftl.filter, ResidualFilter)
    assert not isinstance(build("MLP").ftl.filter, ResidualFilter)
    assert _ftl_cfg(tmp_path).MODEL.FTL.FILTER == "mlp"  # the shipped YAML: the paper's form
    with pytest.raises(ValueError, match="MODEL.FTL.FILTER must be one of"):
        build("conv")
    with pytest.raises(ValueError, match=r"EMBEDDING_DIM \(64\) must be"):
        build("residual", "MODEL.HEADS.EMBEDDING_DIM", "64")

    for name, model in (("mlp", mlp), ("residual", residual)):
        Checkpointer(model, str(tmp_path), save_to_disk=True).save(name)
    other = build("residual")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="checkpoint's FTL filter R is MODEL.FTL.FILTER: mlp"):
        Checkpointer(other).load(str(tmp_path / "mlp.pth"))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())
    with pytest.raises(ValueError, match="MODEL.FTL.FILTER: residual, the model's is mlp"):
        Checkpointer(build("mlp")).load(str(tmp_path / "residual.pth"))
    Checkpointer(other).load(str(tmp_path / "residual.pth"))
    for key, value in residual.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key


def test_ftl_trainer_starts_from_a_stock_fastreid_checkpoint(market_root, tmp_path):
    """``MODEL.WEIGHTS`` of a stock fastreid model (``Baseline`` + ``EmbeddingHead``: its
    backbone is ``backbone.*``) loads as FTL's ``Enc`` backbone (``ftl.encoder.backbone.*``)
    through the trainer's own ``resume_or_load``, so ``STAGE0_ITERS: 0`` starts stage 1 on the
    trained backbone; the stock head's entries stay unused, every other FTL part as built."""
    from fastreid.utils.checkpoint import Checkpointer

    stock_cfg = tiny_cfg(
        LEAP_YAML,
        tmp_path / "stock",
        "MODEL.HEADS.NAME",
        "EmbeddingHead",
        "MODEL.HEADS.CLS_LAYER",
        "Linear",
        "MODEL.HEADS.NUM_CLASSES",
        str(NUM_IDS),
    )
    stock = build_model(stock_cfg)
    with torch.no_grad():
        for p in stock.backbone.parameters():
            p.add_(torch.randn_like(p))  # not the initialisation FTLBaseline would draw
    for folder in ("stock", "ftl", "ftl2"):
        os.makedirs(tmp_path / folder)
    Checkpointer(stock, str(tmp_path / "stock"), save_to_disk=True).save("model_final")
    weights = str(tmp_path / "stock" / "model_final.pth")

    trainer = ftlint.FTLTrainer(_ftl_cfg(tmp_path / "ftl", "MODEL.WEIGHTS", weights))
    built = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    loaded = trainer.model.state_dict()
    expected = stock.backbone.state_dict()
    assert expected and all(
        torch.equal(loaded["ftl.encoder.backbone." + k], v) for k, v in expected.items()
    )
    others = [k for k in loaded if not k.startswith("ftl.encoder.backbone.")]
    assert others and all(torch.equal(loaded[k], built[k]) for k in others if "pixel" not in k)

    # an FTL checkpoint keeps its own layout: a resume loads it whole, no renaming
    Checkpointer(trainer.model, str(tmp_path / "ftl"), save_to_disk=True).save("ftl")
    again = ftlint.FTLTrainer(_ftl_cfg(tmp_path / "ftl2"))
    Checkpointer(again.model).load(str(tmp_path / "ftl" / "ftl.pth"))
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in loaded.items())


def test_hook_refuses_fastreid_contiguous_optimizer_and_a_short_schedule(market_root, tmp_path):
    cfg = _ftl_cfg(tmp_path)
    plain = DefaultTrainer(cfg)  # fastreid's optimizer over flat ContiguousParams buffers
    with pytest.raises(ValueError, match="contiguous=False"):
        ftlint.FTLHook.from_trainer(plain)
    trainer = ftlint.FTLTrainer(
        _ftl_cfg(tmp_path, "SOLVER.MAX_EPOCH", "4")
    )  # 20 iterations > 5 + 2 * 5
    hook = trainer.ftl_hook
    trainer.iter = 0
    with pytest.raises(ValueError, match="MAX_ALTERNATIONS"):
        hook.before_train()
    # a shorter stage 2 (MODEL.FTL.STAGE2_ITERS) shortens the schedule: 5 + 5 + 4 < 15 iterations
    short = ftlint.FTLTrainer(
        _ftl_cfg(tmp_path, "SOLVER.MAX_EPOCH", "3", "MODEL.FTL.STAGE2_ITERS", "4")
    )
    sched = short.ftl_hook.scheduler
    assert (sched.stage_iters, sched.stage2_iters, sched.total_iters) == (STAGE, 4, 14)
    short.iter = 0
    with pytest.raises(ValueError, match="ends after 14 iterations"):
        short.ftl_hook.before_train()
    # MODEL.FTL.TAIL_SAMPLING reaches the scheduler (stage 1's long-tail sampler); a bad value
    # is refused with the key's name
    assert short.ftl_hook.scheduler.tail_sampling == "samples"
    classes = ftlint.FTLTrainer(_ftl_cfg(tmp_path, "MODEL.FTL.TAIL_SAMPLING", "classes"))
    assert classes.ftl_hook.scheduler.tail_sampling == "classes"
    upper = _ftl_cfg(tmp_path, "MODEL.FTL.TAIL_SAMPLING", "CLASSES")  # any case (s54 trial 4)
    assert ftlint.FTLHook.from_trainer(classes, upper).scheduler.tail_sampling == "classes"
    bad = _ftl_cfg(tmp_path, "MODEL.FTL.TAIL_SAMPLING", "bogus")
    with pytest.raises(ValueError, match="MODEL.FTL.TAIL_SAMPLING must be one of"):
        ftlint.FTLHook.from_trainer(classes, bad)


@pytest.mark.parametrize(
    "threshold, kind",
    [("2", "no long-tail class"), ("20", "no regular class")],  # 3 x 16 and 9 x 4 images
)
def test_trainer_refuses_a_split_without_long_tail_or_regular_classes_before_training(
    market_root, tmp_path, threshold, kind
):
    """A training set without long-tail classes (every class > MODEL.FTL.TAIL_THRESHOLD images)
    or without regular ones is refused when the trainer is built (its training set read), naming
    the key: not at the first stage-1 batch (no long-tail) or after stage 0 (no regular)."""
    cfg = _ftl_cfg(tmp_path, "MODEL.FTL.TAIL_THRESHOLD", threshold)
    with pytest.raises(ValueError, match=f"{kind}: .*MODEL.FTL.TAIL_THRESHOLD={threshold}"):
        ftlint.FTLTrainer(cfg)
    # the hook on fastreid's own trainer (FTLHook.from_trainer) refuses it the same way
    trainer = DefaultTrainer(cfg)
    with pytest.raises(ValueError, match=f"{kind}: .*MODEL.FTL.TAIL_THRESHOLD={threshold}"):
        ftlint.FTLHook.from_trainer(trainer)
    assert all(p.requires_grad for p in trainer.model.parameters())  # nothing frozen


def test_ftl_trainer_takes_the_quality_filter_from_build_ftl_quality(market_root, tmp_path):
    """Eq. 5's filter, a function (no YAML key), comes from `FTLTrainer.build_ftl_quality` (the
    fastreid way: override a build_* class method) and reaches UpdateStats: the centers are the
    means of the kept images only."""
    calls = []

    def bright_half(x, g):
        calls.append((tuple(x.shape), tuple(g.shape)))
        m = x.flatten(1).mean(1)
        return m >= m.median()

    class Filtered(ftlint.FTLTrainer):
        @classmethod
        def build_ftl_quality(cls, cfg):
            return bright_half

    cfg = _ftl_cfg(tmp_path, "MODEL.FTL.FLIP", "False")
    assert ftlint.FTLTrainer(cfg).ftl_hook.scheduler.quality is None
    torch.manual_seed(0)
    hook = Filtered(cfg).ftl_hook
    assert hook.scheduler.quality is bright_half
    hook.scheduler.update_stats(hook.stats_batches)
    assert calls and all(xs[0] == gs[0] and len(xs) == 4 and len(gs) == 2 for xs, gs in calls)
    ft, enc = hook.ftl.feature_transfer, hook.ftl.encoder
    enc.eval()
    sums = torch.zeros_like(ft.centers)
    n = torch.zeros(ft.centers.shape[0])
    with torch.no_grad():
        for x, y, _ in hook.stats_batches:
            g = enc(x)
            m = x.flatten(1).mean(1)
            keep = m >= m.median()
            sums.index_add_(0, y[keep], g[keep])
            n.index_add_(0, y[keep], torch.ones(int(keep.sum())))
    seen = n > 0
    torch.testing.assert_close(ft.centers[seen], sums[seen] / n[seen, None], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the trainer end to end
class _Recorder(hooks.HookBase):
    """Stage, data source, frozen parts and snapshots at the stage boundaries."""

    def __init__(self, ftl_hook):
        self.ftl_hook = ftl_hook
        self.stages, self.sources, self.frozen, self.losses = [], [], [], []
        self.snap = {}

    def _state(self, *parts):
        ftl = self.ftl_hook.ftl
        return {
            f"{p}.{k}": v.detach().clone()
            for p in parts
            for k, v in getattr(ftl, p).state_dict().items()
        }

    def before_step(self):
        it = self.trainer.iter
        self.stages.append(self.ftl_hook.scheduler.stage)
        source = self.trainer._trainer._data_loader_iter
        self.snap.setdefault("loader_iter", source)
        self.sources.append(
            "stage1"
            if isinstance(source, ftlint._Stage1Stream)
            else "fastreid"
            if source is self.snap["loader_iter"]
            else "other"
        )
        self.frozen.append(self.ftl_hook.ftl.frozen)
        if it == STAGE0:  # stage 1 begins
            self.snap["stage1_start"] = self._state("encoder", "decoder", "filter", "classifier")
            enc = next(self.ftl_hook.ftl.encoder.parameters())
            self.snap["adam_state_enc"] = {
                k: v.clone() for k, v in self.trainer.optimizer.state[enc].items()
            }
        if it == STAGE0 + STAGE:  # stage 2 begins
            self.snap["stage2_start"] = self._state("encoder", "decoder", "filter", "classifier")

    def after_step(self):
        self.losses.append(
            self.trainer.storage.history("total_loss").latest()
        )  # = loss_ftl, the only term


def test_ftl_trainer_runs_algorithm_1(market_root, tmp_path):
    start = time.perf_counter()
    torch.manual_seed(0)
    np.random.seed(0)  # fastreid's TrainingSampler draws its seed from NumPy's global RNG
    cfg = _ftl_cfg(tmp_path)
    trainer = ftlint.FTLTrainer(cfg)
    hook = trainer.ftl_hook
    ftl, sched = hook.ftl, hook.scheduler
    names = [type(h).__name__ for h in trainer._hooks]
    assert names.index("FTLHook") == names.index("LRScheduler") + 1
    assert "ftl_scheduler" in trainer.checkpointer.checkpointables
    assert any(g["weight_decay"] > 0 for g in trainer.optimizer.param_groups)  # Adam + weight decay
    recorder = _Recorder(hook)
    trainer.register_hooks([recorder])

    # train-split loss of FC(R(Enc(x))) in eval mode, before and after
    from fastreid.data.build import fast_batch_collator

    stats_loader = hook.stats_batches.loader
    assert stats_loader.collate_fn is fast_batch_collator

    def train_loss():
        trainer.model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for x, y, _ in hook.stats_batches:
                total += float(ftl.classification_loss(ftl(x), y)["sfmx"]) * len(y)
                n += len(y)
        trainer.model.train()
        return total / n

    loss_before = train_loss()
    results = trainer.train()
    loss_after = train_loss()
    elapsed = time.perf_counter() - start
    iters = trainer.max_iter
    assert iters == STAGE0 + 2 * STAGE

    # stage switches at the right iterations; stage 1 fed by the hook's three-batch stream
    assert recorder.stages == [0] * STAGE0 + [1] * STAGE + [2] * STAGE
    assert recorder.sources == ["fastreid"] * STAGE0 + ["stage1"] * STAGE + ["fastreid"] * STAGE
    assert (
        recorder.frozen
        == [()] * STAGE0 + [("encoder", "decoder")] * STAGE + [("classifier",)] * STAGE
    )
    assert sched.finished and sched.iteration == iters and sched.alternation == 1
    stage_log = [v for v, _ in trainer.storage.history("ftl_stage").values()]
    assert stage_log == recorder.stages

    # UpdateStats ran over the whole training split: C, Q, h and the long-tail pool
    ft = ftl.feature_transfer
    assert hook.last_update is not None and ft.ready
    assert bool(ft.has_center.all())
    assert 1 <= ft.num_components <= 512 and ft.explained_energy >= 0.95
    assert int(ft.regular.sum()) == HEAD_IDS
    assert ft.tail_indices.numel() == NUM_TAIL_IDS * TAIL_IMAGES
    assert 0 < ft.hard_indices.numel() < HEAD_IDS * HEAD_IMAGES
    assert bool(ft.regular[ft.hard_labels].all())
    assert hook.last_update["num_regular_samples"] == HEAD_IDS * HEAD_IMAGES

    # frozen parts did not move during their frozen stage (Adam momentum and weight decay included)
    s1, s2 = recorder.snap["stage1_start"], recorder.snap["stage2_start"]
    assert recorder.snap["adam_state_enc"], "the encoder had Adam moments from stage 0"
    for key in s1:
        changed = not torch.equal(s1[key], s2[key])
        if key.startswith(("encoder.", "decoder.")):
            assert not changed, f"{key} changed in stage 1"
    assert any(not torch.equal(s1[k], s2[k]) for k in s1 if k.startswith("filter."))
    assert not torch.equal(s1["classifier.weight"], s2["classifier.weight"])
    assert torch.equal(s2["classifier.weight"], ftl.classifier.weight)  # FC fixed in stage 2
    enc_w = [k for k in s2 if k.startswith("encoder.") and k.endswith("conv1.weight")][0]
    assert not torch.equal(
        s2[enc_w], ftl.encoder.state_dict()[enc_w[len("encoder.") :]]
    )  # Enc trains in stage 2

    # losses finite, the model learned
    assert len(recorder.losses) == iters and all(torch.isfinite(torch.tensor(recorder.losses)))
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    for key in ("Rank-1", "mAP"):
        assert 0.0 <= results[key] <= 100.0

    # the scheduler state and the statistics are in fastreid's checkpoint ...
    path = os.path.join(str(tmp_path), "model_final.pth")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert ckpt["ftl_scheduler"]["scheduler"] == sched.state_dict()
    assert torch.equal(ckpt["ftl_scheduler"]["feature_transfer"]["basis"], ft.basis)
    assert torch.equal(ckpt["model"]["ftl.classifier.weight"], ftl.classifier.weight)

    # ... and resuming restores them
    resumed = ftlint.FTLTrainer(cfg)
    resumed.resume_or_load(resume=True)
    rhook = resumed.ftl_hook
    assert rhook.scheduler.state_dict() == sched.state_dict()
    for name in ("basis", "centers", "hard_indices", "tail_indices"):
        assert torch.equal(getattr(rhook.ftl.feature_transfer, name), getattr(ft, name)), name
    assert rhook.ftl.frozen == ftl.frozen

    # a checkpoint of another schedule (here MODEL.FTL.TAIL_SAMPLING) is refused on resume, the
    # schedule position left as it was
    other = ftlint.FTLTrainer(_ftl_cfg(tmp_path, "MODEL.FTL.TAIL_SAMPLING", "classes"))
    before = other.ftl_hook.scheduler.state_dict()
    weights = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"cannot resume: .* has MODEL.FTL.TAIL_SAMPLING 'samples' but this config has "
        r"'classes' \(the long-tail batch stream would change on resume\); set "
        r"MODEL.FTL.TAIL_SAMPLING to the checkpoint's 'samples' to resume, or .* resume=False",
    ):
        other.resume_or_load(resume=True)
    assert other.ftl_hook.scheduler.state_dict() == before
    # refused before fastreid's loader wrote the model: the trainer is as it was
    assert all(torch.equal(v, weights[k]) for k, v in other.model.state_dict().items())
    # a fine-tune (weights only, fastreid's resume=False path) does not ask the schedule
    other.checkpointer.load(path, checkpointables=[])
    assert torch.equal(other.model.state_dict()["ftl.classifier.weight"], ftl.classifier.weight)
    assert other.ftl_hook.scheduler.state_dict() == before
    # the hook's own load is all or nothing: a refused schedule loads no statistics, statistics
    # that do not load leave the schedule where it was
    fresh = ftlint.FTLTrainer(_ftl_cfg(tmp_path, "MODEL.FTL.TAIL_SAMPLING", "classes")).ftl_hook
    with pytest.raises(ValueError, match="MODEL.FTL.TAIL_SAMPLING 'samples'"):
        fresh.load_state_dict(ckpt["ftl_scheduler"])
    assert fresh.ftl.feature_transfer.basis.shape[1] == 0 and not fresh.ftl.feature_transfer.ready
    broken = {
        "scheduler": ckpt["ftl_scheduler"]["scheduler"],
        "feature_transfer": {**ckpt["ftl_scheduler"]["feature_transfer"], "basis": torch.zeros(3)},
    }
    fresh = ftlint.FTLTrainer(cfg).ftl_hook
    before = fresh.scheduler.state_dict()
    with pytest.raises(ValueError, match="checkpoint basis has shape"):
        fresh.load_state_dict(broken)
    assert fresh.scheduler.state_dict() == before and fresh.ftl.frozen == ()
    print(
        f"\nfastreid FTL: {iters} iterations (stages 0/1/2) + UpdateStats + PreciseBN + eval in "
        f"{elapsed:.1f} s; train loss {loss_before:.3f} -> {loss_after:.3f}; k={ft.num_components}, "
        f"hard={ft.hard_indices.numel()}; Rank-1 {float(results['Rank-1']):.1f}, mAP {float(results['mAP']):.1f}"
    )


@pytest.mark.parametrize(
    "setting, saved, key",
    [
        ("stage0_iters", 7, "MODEL.FTL.STAGE0_ITERS 7 but this config has 5"),
        ("stage_iters", 7, "MODEL.FTL.STAGE_ITERS 7 but this config has 5"),
        ("stage2_iters", 3, "MODEL.FTL.STAGE2_ITERS 3 but this config has 5 (each stage 2's"),
        ("seed", 4, "MODEL.FTL.SEED 4 but this config has 0"),
        ("tail_sampling", "classes", "MODEL.FTL.TAIL_SAMPLING 'classes' but this config has"),
    ],
)
def test_resume_of_another_schedule_names_the_yaml_key_and_the_way_out(
    market_root, tmp_path, setting, saved, key
):
    """s52 trial: the refusal named AlternatingScheduler's arguments ("checkpoint has
    stage_iters=10 but this scheduler has 12"); the fastreid user set MODEL.FTL keys. A damaged
    state's refusal (not a schedule setting) passes through unchanged."""
    hook = ftlint.FTLTrainer(_ftl_cfg(tmp_path)).ftl_hook
    state = hook.state_dict()
    state["scheduler"][setting] = saved
    with pytest.raises(ValueError) as caught:
        hook.check_state_dict(state)
    message = str(caught.value)
    assert message.startswith("cannot resume: the checkpoint's FTL schedule has " + key), message
    value = repr(saved) if isinstance(saved, str) else str(saved)
    assert f"; set {key.split()[0]} to the checkpoint's {value} to resume, or " in message
    assert "resume=False (MODEL.WEIGHTS, without --resume" in message
    assert f"{setting}=" not in message and "this scheduler" not in message
    with pytest.raises(ValueError) as caught:  # the hook's own load: the same message
        hook.load_state_dict(state)
    assert str(caught.value) == message
    damaged = hook.state_dict()
    damaged["scheduler"]["stage"] = 7
    with pytest.raises(ValueError, match="^invalid stage 7$"):
        hook.check_state_dict(damaged)


def test_stage1_stream_matches_the_scheduler_loss(market_root, tmp_path):
    """The trainer's stage-1 step (hook stream -> FTLBaseline.forward) is AlternatingScheduler.stage1_loss."""
    torch.manual_seed(2)
    trainer = ftlint.FTLTrainer(
        _ftl_cfg(tmp_path, "MODEL.FTL.STAGE0_ITERS", "0", "MODEL.FTL.STAGE1_BATCH_SIZE", "6")
    )
    hook = trainer.ftl_hook
    sched = hook.scheduler
    assert sched.stage == 1 and hook.ftl.frozen == ("encoder", "decoder")
    hook._sync()  # what before_train does: UpdateStats, then the stage-1 stream
    assert not sched.needs_stats and hook._stage1 is not None
    ft = hook.ftl.feature_transfer
    hard, tail = next(hook._stage1._pairs)
    assert bool(torch.isin(hard[2], ft.hard_indices).all()) and bool(
        torch.isin(tail[2], ft.tail_indices).all()
    )
    (gr, yr), (gt, yt), (gx, yx) = sched.stage1_batches(hard, tail)
    data = {"ftl_features": torch.cat([gr, gt, gx]), "targets": torch.cat([yr, yt, yx])}
    assert data["targets"].shape == (18,) and torch.equal(yx, yt)
    assert bool(ft.regular[yr].all()) and not bool(ft.regular[yt].any())
    model = trainer.model
    model.train()
    torch.testing.assert_close(model(data)["loss_ftl"], sched.stage1_loss(hard, tail)["loss"])


# ---------------------------------------------------------------- fastreid's own keys
def test_freeze_layers_backbone_freezes_enc_backbone_across_stage_switches(market_root, tmp_path):
    """``MODEL.FREEZE_LAYERS: [backbone]`` + ``SOLVER.FREEZE_ITERS`` (fastreid's Base-SBS) freeze
    FTL's ``Enc`` backbone as fastreid freezes Baseline's: its parameters and BatchNorm
    statistics do not move for FREEZE_ITERS iterations, also through stage 1 (UpdateStats) and
    stage 2 (FTL sets train mode again), while R trains; afterwards the backbone trains. A name
    that matches no parameter is refused when the trainer is built."""

    def run(iters):
        os.makedirs(tmp_path / f"fz{iters}")
        cfg = _ftl_cfg(
            tmp_path / f"fz{iters}",
            "MODEL.FREEZE_LAYERS",
            "['backbone']",
            "SOLVER.FREEZE_ITERS",
            str(iters),
            "MODEL.FTL.STAGE0_ITERS",
            "1",
            "MODEL.FTL.STAGE_ITERS",
            "1",
            "MODEL.FTL.MAX_ALTERNATIONS",
            "0",
            "SOLVER.MAX_EPOCH",
            "1",
        )  # 5 iterations: stages 0, 1, 2, 1, 2
        trainer = ftlint.FTLTrainer(cfg)
        ftl = trainer.model.ftl
        before = {k: v.clone() for k, v in ftl.encoder.backbone.state_dict().items()}
        r_before = [p.detach().clone() for p in ftl.filter.parameters()]
        trainer.resume_or_load(resume=False)
        trainer.train()
        after = ftl.encoder.backbone.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert any(not torch.equal(a, b) for a, b in zip(r_before, ftl.filter.parameters()))
        return changed, len(before)

    changed, total = run(100)
    assert changed == []  # weights and running statistics
    changed, total = run(2)  # opens before stage 2 (iteration 2): the backbone trains there
    assert any("running_mean" in k for k in changed) and any("conv1.weight" in k for k in changed)

    bad = _ftl_cfg(
        tmp_path, "MODEL.FREEZE_LAYERS", "['ftl.encoder.backbone']", "SOLVER.FREEZE_ITERS", "5"
    )
    with pytest.raises(ValueError, match="MODEL.FREEZE_LAYERS: 'ftl.encoder.backbone' matches no"):
        ftlint.FTLTrainer(bad)
    # `ftl` (the whole model) would put all of it in eval and hold back only Dec's gradients
    whole = _ftl_cfg(tmp_path, "MODEL.FREEZE_LAYERS", "['ftl']", "SOLVER.FREEZE_ITERS", "5")
    with pytest.raises(ValueError, match=r"'ftl' matches no.*decoder\.\* \(Dec\)"):
        ftlint.FTLTrainer(whole)


def test_freeze_follows_the_iteration_after_a_resume(tmp_path):
    """fastreid's freezing optimizer counts its own steps from 0 again after a resume: resumed
    past FREEZE_ITERS it held the backbone's gradients back for FREEZE_ITERS more steps (with
    BatchNorm training). The freeze hook opens the optimizer's groups by the iteration."""
    from types import SimpleNamespace

    cfg = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7")
    hook = ftlint._FTLLayerFreeze(build_model(cfg), ["backbone"], 3)
    groups = [{"freeze_status": "freeze"}, {"freeze_status": "normal"}]
    hook.trainer = SimpleNamespace(iter=2, optimizer=SimpleNamespace(param_groups=groups))
    hook.before_step()  # still frozen at iteration 2
    assert [g["freeze_status"] for g in groups] == ["freeze", "normal"] and hook.is_frozen
    hook.trainer.iter = 5  # a run resumed at iteration 5
    hook.before_step()
    assert [g["freeze_status"] for g in groups] == ["normal", "normal"] and not hook.is_frozen


def test_heads_lr_factor_applies_to_r_and_fc(tmp_path):
    """``SOLVER.HEADS_LR_FACTOR`` (fastreid: the parameters under ``heads.``) scales the learning
    rate of FTL's head, ``R`` and ``FC`` (what fastreid's EmbeddingHead holds: neck/embedding
    and classifier); ``Enc``'s backbone and ``Dec`` keep ``SOLVER.BASE_LR``."""
    cfg = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", "SOLVER.HEADS_LR_FACTOR", "10.0")
    model = build_model(cfg)
    optimizer, _ = ftlint.FTLTrainer.build_optimizer(cfg, model)
    lr = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    ftl = model.ftl
    for part, want in (
        (ftl.filter, 10 * base),
        (ftl.classifier, 10 * base),
        (ftl.encoder.backbone, base),
        (ftl.decoder, base),
    ):
        params = list(part.parameters())
        assert params and all(lr[id(p)] == pytest.approx(want) for p in params)
    assert len(lr) == len(list(model.parameters()))  # every parameter once
    # the groups in the model's parameter order: a checkpoint of the earlier trainer (built over
    # the model itself) resumes with each group's momentum on its own parameter (on the
    # optimizer's names Dec came after R and FC: 19 states on parameters of other shapes)
    groups = [g["params"][0] for g in optimizer.param_groups]
    assert [id(p) for p in groups] == [id(p) for p in model.parameters() if p.requires_grad]
    plain, _ = solver_build.build_optimizer(cfg, model, contiguous=False)
    assert [tuple(g["params"][0].shape) for g in plain.param_groups] == [
        tuple(p.shape) for p in groups
    ]


def test_unused_fastreid_keys_and_the_ml2_warning_name_yaml_keys_in_fastreid_log(tmp_path, caplog):
    """FTLBaseline names, once and in fastreid's log, the fastreid head / loss keys that a YAML
    sets to other than fastreid's defaults and that FTL does not read (its loss is Eq. 4); keys
    it reads (EMBEDDING_DIM, POOL_LAYER, CLS_LAYER; SCALE / MARGIN with a margin CLS_LAYER) are
    not listed. The m-L2 warning of a margin FC names MODEL.FTL.ALPHA_REG, also in the log."""
    import logging

    import feature_cloud.integrations.fastreid as fr

    def warned(*opts):
        cfg = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", "7", *opts)
        caplog.clear()
        fr.logger.addHandler(caplog.handler)  # fastreid's setup_logger stops propagation
        try:
            with caplog.at_level(logging.WARNING, logger=fr.logger.name):
                with warnings_recorded() as caught:
                    build_model(cfg)
        finally:
            fr.logger.removeHandler(caplog.handler)
        logged = sorted({r.getMessage() for r in caplog.records})  # the handler may see it twice
        assert logged == sorted(str(w.message) for w in caught)
        return logged

    assert warned() == []  # the shipped YAML: nothing unused
    (text,) = warned(
        *("MODEL.HEADS.SCALE", "24", "MODEL.HEADS.MARGIN", "0.3", "MODEL.HEADS.NECK_FEAT"),
        *("after", "MODEL.HEADS.WITH_BNNECK", "True", "MODEL.HEADS.NAME", "LEAPHead"),
        *("MODEL.LOSSES.NAME", "('TripletLoss',)", "MODEL.LOSSES.CE.EPSILON", "0.1"),
        *("MODEL.HEADS.POOL_LAYER", "GlobalMaxPool", "MODEL.HEADS.EMBEDDING_DIM", "32"),
    )
    for key in (
        "MODEL.HEADS.SCALE: 24",
        "MODEL.HEADS.MARGIN: 0.3",
        "MODEL.HEADS.NECK_FEAT: 'after'",
        "MODEL.HEADS.WITH_BNNECK: True",
        "MODEL.HEADS.NAME: 'LEAPHead'",
        "MODEL.LOSSES.NAME: ('TripletLoss',)",
        "MODEL.LOSSES.CE.EPSILON: 0.1",
    ):
        assert key in text
    assert "POOL_LAYER:" not in text and "EMBEDDING_DIM:" not in text
    # LEAPHead's cloud node: FTL's FC has none, so a set key is named, not silently dropped
    (text,) = warned(
        *("MODEL.HEADS.FEATURE_CLOUD.CLOUD", "vanilla", "MODEL.HEADS.FEATURE_CLOUD.MODE"),
        *("paper", "MODEL.HEADS.FEATURE_CLOUD.WARMUP_ITERS", "100"),
    )
    for key in ("CLOUD: 'vanilla'", "MODE: 'paper'", "WARMUP_ITERS: 100"):
        assert "MODEL.HEADS.FEATURE_CLOUD." + key in text, text
    assert "its FC has no feature cloud" in text
    margin = warned(
        *("MODEL.HEADS.CLS_LAYER", "CosSoftmax", "MODEL.HEADS.SCALE", "24"),
        *("MODEL.HEADS.MARGIN", "0.3"),
    )
    assert len(margin) == 1 and "MODEL.FTL.ALPHA_REG=0" in margin[0]
    assert "alpha_reg" not in margin[0]  # SCALE / MARGIN are used: not listed
    # a margin FC at fastreid's SCALE 1 (for its Linear layer) cannot train: named
    (scale,) = [
        t
        for t in warned("MODEL.HEADS.CLS_LAYER", "CosSoftmax", "MODEL.FTL.ALPHA_REG", "0.0")
        if "fastreid's default" in t
    ]
    assert scale.startswith("FTLBaseline: MODEL.HEADS.SCALE is 1 and MODEL.HEADS.MARGIN 0.0")
    assert "cannot train" in scale and "SCALE: 24, MARGIN: 0.2" in scale
    # a build that then fails still says which keys it did not use (they may be why)
    with warnings_recorded() as caught, pytest.raises(ValueError, match="CircleSoftmax"):
        build_model(
            _ftl_cfg(
                tmp_path,
                *("MODEL.HEADS.NUM_CLASSES", "7", "MODEL.LOSSES.CE.EPSILON", "0.1"),
                *("MODEL.HEADS.CLS_LAYER", "CircleSoftmax"),
            )
        )
    assert any("MODEL.LOSSES.CE.EPSILON: 0.1" in str(w.message) for w in caught)


def warnings_recorded():
    import warnings

    class _Recorded(warnings.catch_warnings):
        def __enter__(self):
            caught = super().__enter__()
            warnings.simplefilter("always")
            return caught

    return _Recorded(record=True)


@pytest.mark.parametrize("num_classes", ["5", "20"])
def test_trainer_refuses_another_num_classes_naming_the_key(market_root, tmp_path, num_classes):
    """A ``MODEL.HEADS.NUM_CLASSES`` other than the training set's identities is refused when
    the trainer is built, naming the key as LEAPHead does (not FeatureTransfer's arguments)."""
    cfg = _ftl_cfg(tmp_path, "MODEL.HEADS.NUM_CLASSES", num_classes)
    with pytest.raises(
        ValueError,
        match=rf"has {NUM_IDS} identities but MODEL.HEADS.NUM_CLASSES is {num_classes} \(leave",
    ):
        ftlint.FTLTrainer(cfg)


def test_ftl_baseline_refuses_a_damaged_head_state_before_its_encoder_loads(tmp_path):
    """s51 trial: a model holding the head was left half loaded when the head refused (torch
    loads the children in turn). FTLBaseline (and its FTLModel) check the margin FC's state
    before any child loads, through fastreid's Checkpointer and without it: the encoder's load
    is never reached."""
    from fastreid.utils.checkpoint import Checkpointer

    from conftest import assert_same_state, state_snapshot

    def build(seed):
        torch.manual_seed(seed)
        cfg = _ftl_cfg(tmp_path, *_MARGIN_FC_NO_DECODER)
        return build_model(cfg)

    source = build(0)
    state = source.state_dict()
    key = "ftl.classifier.weight"
    state[key] = state[key] * float("nan")
    path = str(tmp_path / "damaged.pth")
    torch.save({"model": state}, path)
    for load in (
        lambda m: Checkpointer(m, str(tmp_path / "o")).load(path),
        lambda m: m.load_state_dict(state),
    ):
        model = build(1)
        reached = []
        record_checkpoint_loads(model.ftl.encoder, source.ftl.encoder, reached)
        before = state_snapshot(model)
        with pytest.raises(ValueError, match="checkpoint's ftl.classifier.weight holds"):
            load(model)
        assert not any(reached)  # refused before the encoder began to load
        assert_same_state(before, state_snapshot(model), "a refused checkpoint")


# ---------------------------------------------------------------- resume in the middle of stage 1
#: 84 training images / 16 a batch: 5 iterations an epoch, 2 epochs; stage 0 = iterations 0-1,
#: stage 1 = 2-9 (the run ends with it), the epoch-0 checkpoint (after iteration 4) lies inside it
_MID_STAGE1 = (
    "SOLVER.MAX_EPOCH",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "1",
    "TEST.EVAL_PERIOD",
    "2",
    "TEST.PRECISE_BN.ENABLED",  # its pass would draw from fastreid's loader (stage 2 is next)
    "False",
    "MODEL.FTL.STAGE0_ITERS",
    "2",
    "MODEL.FTL.STAGE_ITERS",
    "8",
    "MODEL.FTL.MAX_ALTERNATIONS",
    "0",
    # the shipped Base-FTL.yml's random augmentation (TINY_OPTS turns the padding off)
    "INPUT.FLIP.ENABLED",
    "True",
    "INPUT.PADDING.ENABLED",
    "True",
    "INPUT.PADDING.SIZE",
    "4",
)

#: resumes each run directory given on the command line, as fastreid's train_net.py --resume
_RESUME_SCRIPT = """
import torch
import feature_cloud.integrations.fastreid as fc_fastreid
from feature_cloud.integrations.fastreid_ftl import FTLTrainer, add_ftl_config
from fastreid.config import get_cfg

torch.set_num_threads(1)
for run in RUNS:
    cfg = add_ftl_config(fc_fastreid.add_feature_cloud_config(get_cfg()))
    cfg.merge_from_file(run + "/config.yaml")
    cfg.freeze()
    trainer = FTLTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_epoch == 1, trainer.start_epoch  # model_0000.pth: iterations 0-4 done
    trainer.train()
"""


def test_resume_mid_stage1_is_bit_for_bit_with_random_augmentation(
    market_root, tmp_path, monkeypatch
):
    """s52 trial: with the shipped YAML's random flip and padding crop, a run stopped in the
    middle of a stage 1 and resumed in a fresh process (``resume_or_load(resume=True)``) ended
    that stage 1 with other weights than the uninterrupted run: the stage-1 loaders'
    augmentation drew from torch's global RNG (in the main process, or in workers seeded from
    it), which no checkpoint holds. Each stage-1 item now draws from its own seed (the stream's
    seed and its position in the stream), in the main process and in workers alike."""
    import shutil

    from conftest import run_fresh_python

    resumed_dirs = []
    for workers in ("0", "2"):
        full = tmp_path / f"full{workers}"
        full.mkdir()
        cfg = _ftl_cfg(full, *_MID_STAGE1, "DATALOADER.NUM_WORKERS", workers)
        trainer = ftlint.FTLTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()  # uninterrupted
        ckpt = torch.load(full / "model_0000.pth", map_location="cpu", weights_only=False)
        sched = ckpt["ftl_scheduler"]["scheduler"]
        assert (sched["stage"], sched["stage_iteration"]) == (1, 3)  # mid stage 1
        resumed = tmp_path / f"resumed{workers}"  # what a run stopped there leaves
        resumed.mkdir()
        shutil.copy(full / "model_0000.pth", resumed)
        (resumed / "last_checkpoint").write_text("model_0000.pth")
        cfg.defrost()
        cfg.OUTPUT_DIR = str(resumed)
        (resumed / "config.yaml").write_text(cfg.dump())
        resumed_dirs.append((full, resumed, ckpt))
    monkeypatch.setenv("FASTREID_DATASETS", str(market_root))
    runs = [str(r) for _, r, _ in resumed_dirs]
    run_fresh_python(f"RUNS = {runs!r}\n" + _RESUME_SCRIPT)
    for full, resumed, ckpt in resumed_dirs:
        a = torch.load(full / "model_final.pth", map_location="cpu", weights_only=False)
        b = torch.load(resumed / "model_final.pth", map_location="cpu", weights_only=False)
        assert a["ftl_scheduler"]["scheduler"] == b["ftl_scheduler"]["scheduler"]
        assert a["ftl_scheduler"]["scheduler"]["iteration"] == 10
        differ = [k for k, v in a["model"].items() if not torch.equal(v, b["model"][k])]
        assert not differ, (
            f"{full.name}: {len(differ)} tensors differ after the resumed stage 1: {differ[:5]}"
        )
        before, after = ckpt["model"]["ftl.classifier.weight"], a["model"]["ftl.classifier.weight"]
        assert not torch.equal(before, after)  # the rest of stage 1 trained FC


def test_stage1_item_seeds_follow_the_global_stream_position_on_every_rank():
    """A rank's share of a data-parallel stage-1 stream numbered its items ``start + i``: both
    ranks drew the same augmentation seeds for different images (s52 review, round 2; latent
    while FTLHook refuses DDP). The seeds are those of the items' positions in the one global
    stream: the ranks' seeds joined are one process's seeds of the global batches, also after a
    resume."""
    from feature_cloud.ftl import StreamSampler
    from feature_cloud.integrations.fastreid_ftl import _SeededPositions

    pool, b, world = torch.arange(50), 3, 2
    for start in (0, 12):
        one = list(_SeededPositions(StreamSampler(pool, 24, seed=5, start=start)))
        ranks = [
            list(
                _SeededPositions(
                    StreamSampler(
                        pool, 24, seed=5, start=start, batch_size=b, rank=r, world_size=world
                    )
                )
            )
            for r in range(world)
        ]
        joined = [
            item
            for k in range(len(ranks[0]) // b)
            for r in range(world)
            for item in ranks[r][k * b : (k + 1) * b]
        ]
        assert joined == one
        assert not {s for _, s in ranks[0]} & {s for _, s in ranks[1]}
