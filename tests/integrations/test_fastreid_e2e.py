"""fastreid end to end through its own tools, each step in a fresh process (as users run them).

One ``DefaultTrainer`` run on the tiny generated Market-1501 set, then, each in a new process:
``resume_or_load(resume=True)`` from the first checkpoint (bit-identical probe, then training goes
on), ``--eval-only`` with ``MODEL.WEIGHTS`` (``examples/fastreid_train.py``, fastreid's
``train_net.py`` flow) on the shipped YAML with ``NUM_CLASSES: 0``, fine-tuning from
``MODEL.WEIGHTS``, and building for inference with no training data on disk (plus fastreid's
ONNX export path). The same for ``FTLBaseline`` with a ``CosSoftmax`` classifier.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("fastreid")
pytest.importorskip("onnxruntime")
fr = pytest.importorskip("feature_cloud.integrations.fastreid")

from _fastreid_data import EXAMPLE, HEAD_IDS, HEAD_IMAGES, NUM_IDS, ROOT, TAIL_IMAGES

pytestmark = pytest.mark.slow

DRIVER = os.path.join(ROOT, "tests", "_fastreid_driver.py")
EXAMPLE_SCRIPT = os.path.join(ROOT, "examples", "fastreid_train.py")
SIZE = ["INPUT.SIZE_TRAIN", "[32, 16]", "INPUT.SIZE_TEST", "[32, 16]"]
RUN = (
    list(EXAMPLE.TINY_OPTS)
    + SIZE
    + [
        "SOLVER.MAX_EPOCH",
        "2",
        "SOLVER.CHECKPOINT_PERIOD",
        "1",
        "TEST.EVAL_PERIOD",
        "2",
        "TEST.PRECISE_BN.ENABLED",
        "False",
    ]
)
TIMINGS = {}


def _env(data_root):
    return dict(
        os.environ,
        PYTHONPATH=ROOT + os.pathsep + os.path.join(ROOT, "tests"),
        FASTREID_DATASETS=str(data_root),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )


def _run(args, data_root, label):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(data_root),
        capture_output=True,
        text=True,
        timeout=600,
    )
    TIMINGS[label] = time.perf_counter() - start
    print(f"\n{label}: {TIMINGS[label]:.1f} s (fresh process)")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    return proc


def _drive(mode, out_dir, data_root, config, *opts, label=None):
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(str(out_dir), f"{mode}.json")
    proc = _run([DRIVER, mode, out, config, *opts], data_root, label or mode)
    with open(out) as f:
        return json.load(f), os.path.splitext(out)[0], proc


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    EXAMPLE.write_synthetic_market1501(
        str(root),
        num_ids=NUM_IDS,
        head_ids=HEAD_IDS,
        head_images=HEAD_IMAGES,
        tail_images=TAIL_IMAGES,
        size=(32, 16),
    )
    return root


def _resume_dir(train_dir, dst):
    """A run directory holding only the first periodic checkpoint (fastreid's layout)."""
    os.makedirs(dst)
    shutil.copy(os.path.join(train_dir, "model_0000.pth"), dst)
    shutil.copy(os.path.join(train_dir, "config.yaml"), dst)
    with open(os.path.join(dst, "last_checkpoint"), "w") as f:
        f.write("model_0000.pth")
    return str(dst)


# ---------------------------------------------------------------- LEAPHead


def _leap(mode: str, out: str, data_root, *opts: str, label: str):
    """``_drive`` with the shipped LEAP YAML, ``RUN``, the cloud seed and ``OUTPUT_DIR = out``."""
    return _drive(
        mode,
        out,
        data_root,
        "Market1501/leap_R50.yml",
        *RUN,
        "MODEL.HEADS.FEATURE_CLOUD.SEED",
        "0",
        *opts,
        "OUTPUT_DIR",
        out,
        label=label,
    )


def _probe(base: str) -> dict:
    """The training step a run took right after its first checkpoint (written by the driver)."""
    return torch.load(base + ".probe.pt", weights_only=False)


@pytest.fixture(scope="module")
def leap_run(data_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("leap_train"))
    summary, base, _ = _leap("train", out, data_root, label="leap train")
    return out, summary, base


def test_leap_trained_run_and_counts(leap_run):
    out, summary, _ = leap_run
    assert summary["loaded"]["pending"], "counts must not be read while the model is built"
    assert not summary["final"]["pending"]
    assert sorted(summary["final"]["counts"]) == sorted(
        [HEAD_IMAGES] * HEAD_IDS + [TAIL_IMAGES] * (NUM_IDS - HEAD_IDS)
    )
    assert summary["final"]["step"] == summary["max_iter"]
    for name in ("model_0000.pth", "model_final.pth", "config.yaml"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_leap_resume_is_bit_identical(leap_run, data_root, tmp_path):
    out, trained, base = leap_run
    run_dir = _resume_dir(out, tmp_path / "resumed")
    summary, rbase, _ = _leap("resume", run_dir, data_root, label="leap resume")
    assert summary["start_epoch"] == 1
    iters_per_epoch = trained["max_iter"] // 2
    assert summary["loaded"]["step"] == iters_per_epoch and not summary["loaded"]["pending"]
    # every tensor of the checkpoint restored, the angle memory included (data-sized buffer)
    ckpt = torch.load(os.path.join(out, "model_0000.pth"), map_location="cpu", weights_only=False)[
        "model"
    ]
    loaded = torch.load(rbase + ".loaded.pt", weights_only=False)
    assert set(ckpt) == set(loaded)
    for key, value in ckpt.items():
        assert torch.equal(torch.as_tensor(value), loaded[key]), key
    # the next training step is the one the original process would have taken
    a, b = _probe(base), _probe(rbase)
    assert set(a) == set(b) and "loss_cls" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert summary["final"]["step"] == trained["max_iter"]


def test_leap_imprint_iters_through_default_trainer_and_resume(leap_run, data_root, tmp_path):
    """``MODEL.HEADS.FEATURE_CLOUD.IMPRINT_ITERS`` at the first iteration after the first
    checkpoint: DefaultTrainer trains through it, and a new process resumed from that checkpoint
    takes the same imprinting step (bit-identical probe, which differs from the run without it)."""
    _, plain, plain_base = leap_run
    at = str(plain["max_iter"] // 2)  # the first iteration of epoch 1 (model_0000 is before it)
    opts = ["MODEL.HEADS.FEATURE_CLOUD.IMPRINT_ITERS", at]
    out = str(tmp_path / "train")
    trained, base, _ = _leap("train", out, data_root, *opts, label="leap imprint train")
    assert trained["final"]["step"] == trained["max_iter"]
    run_dir = _resume_dir(out, tmp_path / "resumed")
    resumed, rbase, _ = _leap("resume", run_dir, data_root, *opts, label="leap imprint resume")
    assert resumed["loaded"]["step"] == int(at)
    a, b, without = _probe(base), _probe(rbase), _probe(plain_base)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["loss_cls"], without["loss_cls"])  # the imprint changed the step
    assert resumed["final"]["step"] == trained["max_iter"]


def test_leap_statistics_keys_through_default_trainer_and_resume(leap_run, data_root, tmp_path):
    """The statistics YAML keys at their non-default values (``CENTER_RATE: paper``,
    ``UNKNOWN_VARIANCE: pooled``, ``ANGLE_MAX_AGE: 2``): DefaultTrainer builds the head with them
    and trains; fastreid's ``config.yaml`` and checkpoint take a new process back to the same
    training step (bit-identical probe), which is not the default run's."""
    _, plain, plain_base = leap_run
    keys = {"CENTER_RATE": "paper", "UNKNOWN_VARIANCE": "pooled", "ANGLE_MAX_AGE": "2"}
    opts = [x for k, v in keys.items() for x in (f"MODEL.HEADS.FEATURE_CLOUD.{k}", v)]
    out = str(tmp_path / "train")
    trained, base, _ = _leap("train", out, data_root, *opts, label="leap statistics keys train")
    expected = {"center_rate": "paper", "unknown_variance": "pooled", "max_age": 2}
    assert trained["final"]["statistics"] == expected
    assert plain["final"]["statistics"] == {
        "center_rate": "adaptive",
        "unknown_variance": "tail_prior",
        "max_age": None,
    }
    run_dir = _resume_dir(out, tmp_path / "resumed")
    # the resumed process reads the keys from the run's own config.yaml, as fastreid's tools do
    with open(os.path.join(run_dir, "config.yaml")) as f:
        written = f.read()
    assert "CENTER_RATE: paper" in written and "ANGLE_MAX_AGE: 2" in written
    resumed, rbase, _ = _drive(
        "resume",
        run_dir,
        data_root,
        os.path.join(run_dir, "config.yaml"),
        "OUTPUT_DIR",
        run_dir,
        label="leap statistics keys resume",
    )
    assert resumed["loaded"]["statistics"] == expected
    a, b, without = _probe(base), _probe(rbase), _probe(plain_base)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["stats.centers"], without["stats.centers"])  # the paper's rate
    assert resumed["final"]["step"] == trained["max_iter"]


def test_leap_eval_only_with_shipped_yaml(leap_run, data_root):
    out, trained, _ = leap_run
    proc = _run(
        [
            EXAMPLE_SCRIPT,
            "--eval-only",
            "--config-file",
            "Market1501/leap_R50.yml",
            *RUN,
            "MODEL.WEIGHTS",
            os.path.join(out, "model_final.pth"),
            "OUTPUT_DIR",
            os.path.join(out, "eval"),
        ],
        data_root,
        "leap eval-only",
    )
    log = proc.stdout + proc.stderr
    assert "Skip loading parameter" not in log or "margin_head" not in log
    # the example logs as train_net.py does: OUTPUT_DIR/log.txt (fastreid trial s59: none)
    with open(os.path.join(out, "eval", "log.txt")) as f:
        saved = f.read()
    assert "fastreid" in saved and "Rank-1" in saved, saved[-2000:]
    results = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    for key in ("Rank-1", "mAP"):
        assert results[key] == pytest.approx(trained["results"][key], abs=0.01), key


def test_leap_finetune_from_weights(leap_run, data_root, tmp_path):
    out, trained, _ = leap_run
    opts = list(RUN) + [
        "SOLVER.MAX_EPOCH",
        "1",
        "MODEL.WEIGHTS",
        os.path.join(out, "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path / "ft"),
    ]
    summary, _, proc = _drive(
        "finetune",
        tmp_path / "ft",
        data_root,
        "Market1501/leap_R50.yml",
        *opts,
        label="leap finetune",
    )
    log = proc.stdout + proc.stderr
    assert "Skip loading parameter 'heads.margin_head" not in log
    assert summary["loaded"]["step"] == trained["final"]["step"]  # statistics came with the weights
    assert (
        summary["loaded"]["counts"] == trained["final"]["counts"]
        and not summary["loaded"]["pending"]
    )
    assert summary["final"]["step"] == trained["final"]["step"] + summary["max_iter"]


def test_leap_inference_without_training_data(leap_run, tmp_path):
    out, trained, _ = leap_run
    empty = tmp_path / "no_data"
    empty.mkdir()
    weights = os.path.join(out, "model_final.pth")
    shipped, sbase, _ = _drive(
        "infer",
        tmp_path / "a",
        empty,
        "Market1501/leap_R50.yml",
        *RUN,
        "MODEL.WEIGHTS",
        weights,
        label="leap infer (shipped yaml)",
    )
    # the run's own config.yaml (NUM_CLASSES filled): the complete head is restored
    full, fbase, _ = _drive(
        "infer",
        tmp_path / "b",
        empty,
        os.path.join(out, "config.yaml"),
        "MODEL.WEIGHTS",
        weights,
        label="leap infer (run config)",
    )
    a = torch.load(sbase + ".features.pt", weights_only=False)
    b = torch.load(fbase + ".features.pt", weights_only=False)
    assert torch.equal(a["features"], b["features"]) and shipped["feature_shape"] == [8, 512]
    ckpt = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    for key, value in ckpt.items():
        assert torch.equal(torch.as_tensor(value), b["state"][key]), key
    assert shipped["onnx_max_abs_diff"] < 1e-3 and full["onnx_max_abs_diff"] < 1e-3


# ---------------------------------------------------------------- FTLBaseline with a margin classifier
FTL_OPTS = list(RUN) + [
    "MODEL.HEADS.EMBEDDING_DIM",
    "64",
    "MODEL.HEADS.CLS_LAYER",
    "CosSoftmax",
    "MODEL.HEADS.SCALE",
    "24",
    "MODEL.HEADS.MARGIN",
    "0.2",
    "MODEL.FTL.ALPHA_REG",
    "0.0",
    "MODEL.FTL.FILTER_HIDDEN",
    "128",
    "MODEL.FTL.DECODER_CHANNELS",
    "[16, 8]",
    "MODEL.FTL.STAGE0_ITERS",
    "5",
    "MODEL.FTL.STAGE_ITERS",
    "5",
    "MODEL.FTL.STAGE2_ITERS",  # unequal stages: the scheduler state carries stage2_iters
    "3",
    "MODEL.FTL.MAX_ALTERNATIONS",
    "0",
    "MODEL.FTL.TAIL_THRESHOLD",
    "8",
]


def _ftl(mode: str, out: str, data_root, *opts: str, label: str):
    """``_drive`` with the shipped FTL YAML, ``FTL_OPTS`` (then ``opts``) and ``OUTPUT_DIR = out``."""
    return _drive(
        mode,
        out,
        data_root,
        "Market1501/ftl_R50.yml",
        *FTL_OPTS,
        *opts,
        "OUTPUT_DIR",
        out,
        label=label,
    )


def test_ftl_baseline_train_resume_eval_infer(data_root, tmp_path):
    out = str(tmp_path / "ftl")
    trained, base, _ = _ftl("train", out, data_root, label="ftl train")
    # resume from the first checkpoint (end of stage 0, stage 1 next) in a fresh process
    run_dir = _resume_dir(out, tmp_path / "ftl_resumed")
    resumed, rbase, _ = _ftl("resume", run_dir, data_root, label="ftl resume")
    assert resumed["start_epoch"] == 1
    ckpt = torch.load(os.path.join(out, "model_0000.pth"), map_location="cpu", weights_only=False)[
        "model"
    ]
    loaded = torch.load(rbase + ".loaded.pt", weights_only=False)
    for key, value in ckpt.items():
        assert torch.equal(torch.as_tensor(value), loaded[key]), key
    a, b = _probe(base), _probe(rbase)
    assert torch.equal(a["loss"], b["loss"])
    # fine-tuning from MODEL.WEIGHTS: every tensor of the model (the FTL statistics C, Q, h with
    # their data-sized shapes included) comes from the weights; the schedule starts afresh
    final = torch.load(
        os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False
    )["model"]
    ft_dir = str(tmp_path / "ftl_ft")
    finetuned, fbase, _ = _drive(
        "finetune",
        ft_dir,
        data_root,
        "Market1501/ftl_R50.yml",
        *FTL_OPTS,
        "SOLVER.MAX_EPOCH",
        "1",
        "MODEL.WEIGHTS",
        os.path.join(out, "model_final.pth"),
        "OUTPUT_DIR",
        ft_dir,
        label="ftl finetune",
    )
    loaded = torch.load(fbase + ".loaded.pt", weights_only=False)
    assert final["ftl.feature_transfer.basis"].numel() > 0
    for key, value in final.items():
        assert torch.equal(torch.as_tensor(value), loaded[key]), key
    assert finetuned["start_epoch"] == 0
    # --eval-only on the shipped YAML (NUM_CLASSES 0) through the example script
    proc = _run(
        [
            EXAMPLE_SCRIPT,
            "--eval-only",
            "--config-file",
            "Market1501/ftl_R50.yml",
            *FTL_OPTS,
            "MODEL.WEIGHTS",
            os.path.join(out, "model_final.pth"),
            "OUTPUT_DIR",
            os.path.join(out, "eval"),
        ],
        data_root,
        "ftl eval-only",
    )
    results = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    for key in ("Rank-1", "mAP"):
        assert results[key] == pytest.approx(trained["results"][key], abs=0.01), key
    # inference build without any data on disk, and the ONNX export
    empty = tmp_path / "no_data"
    empty.mkdir()
    infer, _, _ = _drive(
        "infer",
        tmp_path / "ftl_infer",
        empty,
        "Market1501/ftl_R50.yml",
        *FTL_OPTS,
        "MODEL.WEIGHTS",
        os.path.join(out, "model_final.pth"),
        label="ftl infer",
    )
    assert infer["feature_shape"] == [8, 64] and infer["onnx_max_abs_diff"] < 1e-3


def test_ftl_residual_filter_through_default_trainer_and_resume(data_root, tmp_path):
    """``MODEL.FTL.FILTER: residual`` (``EMBEDDING_DIM: 0``: f has the backbone's size) trains
    Algorithm 1 in fastreid's trainer; a new process resumes from the first checkpoint with every
    tensor (the filter's marker included) and takes the same next step; the run's config.yaml
    records the key."""
    opts = ["MODEL.HEADS.EMBEDDING_DIM", "0", "MODEL.FTL.FILTER", "residual"]
    out = str(tmp_path / "train")
    trained, base, _ = _ftl("train", out, data_root, *opts, label="ftl residual train")
    with open(os.path.join(out, "config.yaml")) as f:
        assert "FILTER: residual" in f.read()
    ckpt = torch.load(os.path.join(out, "model_0000.pth"), map_location="cpu", weights_only=False)[
        "model"
    ]
    assert "ftl.filter.residual" in ckpt and ckpt["ftl.filter.3.weight"].shape == (512, 128)
    run_dir = _resume_dir(out, tmp_path / "resumed")
    resumed, rbase, _ = _ftl("resume", run_dir, data_root, *opts, label="ftl residual resume")
    assert resumed["start_epoch"] == 1
    loaded = torch.load(rbase + ".loaded.pt", weights_only=False)
    assert set(ckpt) == set(loaded)
    for key, value in ckpt.items():
        assert torch.equal(torch.as_tensor(value), loaded[key]), key
    a, b = _probe(base), _probe(rbase)
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
