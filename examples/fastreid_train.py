"""Train fastreid's ``DefaultTrainer`` with the LEAP head (``MODEL.HEADS.NAME: LEAPHead``)
or with FTL (``MODEL.META_ARCHITECTURE: FTLBaseline``, trained by ``FTLTrainer``).

fastreid's own ``tools/train_net.py`` with a few added lines (the imports, the config nodes,
the trainer choice), and its flags: ``--eval-only`` (with ``MODEL.WEIGHTS``), ``--resume``.
``--config-file`` takes a path or the name of a shipped config
(``feature_cloud.integrations.fastreid.config_path``). Real data::

    FASTREID_DATASETS=/data python examples/fastreid_train.py \
        --config-file Market1501/leap_R50.yml MODEL.DEVICE cuda
    FASTREID_DATASETS=/data python examples/fastreid_train.py \
        --config-file Market1501/ftl_R50.yml MODEL.DEVICE cuda
    FASTREID_DATASETS=/data python examples/fastreid_train.py --eval-only \
        --config-file Market1501/leap_R50.yml MODEL.WEIGHTS logs/market1501/leap_R50/model_final.pth
    FASTREID_DATASETS=/data python examples/fastreid_train.py --resume \
        --config-file Market1501/leap_R50.yml                 # continues from OUTPUT_DIR

CPU smoke run on a generated Market-1501-format set (no download, ~1 min; checkpoints in
``outputs/fastreid_tiny/leap_R50``, about 250 MB, unless ``--output-dir`` says otherwise)::

    python examples/fastreid_train.py --synthetic /tmp/market --tiny
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

import numpy as np

DEFAULT_CONFIG = "Market1501/leap_R50.yml"  # a shipped config (config_path)

#: CPU-sized overrides of ``--tiny`` (ResNet-18 from scratch, 64x32 inputs, 3 epochs).
TINY_OPTS = [
    "MODEL.DEVICE",
    "cpu",
    "MODEL.BACKBONE.DEPTH",
    "18x",
    "MODEL.BACKBONE.FEAT_DIM",
    "512",
    "MODEL.BACKBONE.PRETRAIN",
    "False",
    "INPUT.SIZE_TRAIN",
    "[64, 32]",
    "INPUT.SIZE_TEST",
    "[64, 32]",
    "INPUT.REA.ENABLED",
    "False",
    "INPUT.PADDING.ENABLED",
    "False",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.AMP.ENABLED",
    "False",
    "SOLVER.IMS_PER_BATCH",
    "16",
    "SOLVER.BASE_LR",
    "0.001",
    "SOLVER.MAX_EPOCH",
    "3",
    "SOLVER.WARMUP_ITERS",
    "0",
    "SOLVER.STEPS",
    "[100]",
    "SOLVER.CHECKPOINT_PERIOD",
    "100",
    "TEST.EVAL_PERIOD",
    "3",
    "TEST.IMS_PER_BATCH",
    "32",
    "TEST.PRECISE_BN.ENABLED",
    "True",
    "TEST.PRECISE_BN.NUM_ITER",
    "2",
    "CUDNN_BENCHMARK",
    "False",
]


def write_synthetic_market1501(
    root: str,
    num_ids: int = 12,
    head_ids: int = 3,
    head_images: int = 16,
    tail_images: int = 4,
    size: Sequence[int] = (64, 32),
    seed: int = 0,
) -> str:
    """Write a tiny long-tailed Market-1501-format set: ``{pid:04d}_c{cam}s1_{frame:06d}_00.jpg``.

    Identity ``i`` is a person-like figure with its own upper/lower-body colours and stripe
    pattern, plus per-image noise and shifts. The first ``head_ids`` identities get
    ``head_images`` training images, the others ``tail_images``. Query: one image per identity
    (camera 1); gallery: two per identity (camera 2). Returns the dataset directory.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = os.path.join(root, "Market-1501-v15.09.15")
    h, w = int(size[0]), int(size[1])
    upper = rng.integers(0, 256, size=(num_ids, 3))
    lower = rng.integers(0, 256, size=(num_ids, 3))
    stripes = rng.integers(2, 7, size=num_ids)

    def image(pid: int) -> np.ndarray:
        img = np.zeros((h, w, 3), dtype=np.float32) + 90.0
        dy, dx = rng.integers(-2, 3, size=2)
        top, mid = max(0, 4 + dy), h // 2 + dy
        img[top:mid, 4 + dx : w - 4 + dx] = upper[pid]
        img[mid : h - 2, 6 + dx : w - 6 + dx] = lower[pid]
        img[top : mid : stripes[pid], :] *= 0.5
        img += rng.normal(0.0, 12.0, size=img.shape)
        return np.clip(img, 0, 255).astype(np.uint8)

    frame = 0
    for split, per_id, cam in (
        ("bounding_box_train", None, None),
        ("query", 1, 1),
        ("bounding_box_test", 2, 2),
    ):
        os.makedirs(os.path.join(base, split), exist_ok=True)
        for pid in range(num_ids):
            n = per_id or (head_images if pid < head_ids else tail_images)
            for k in range(n):
                frame += 1
                c = cam or (1 + k % 6)
                name = f"{pid + 1:04d}_c{c}s1_{frame:06d}_00.jpg"
                Image.fromarray(image(pid)).save(os.path.join(base, split, name), quality=95)
    return base


def build_cfg(config_file: str, opts: List[str]):
    # the adapter first: it makes fastreid importable
    # isort: off
    from feature_cloud.integrations.fastreid import add_feature_cloud_config, config_path
    from feature_cloud.integrations.fastreid_ftl import add_ftl_config
    from fastreid.config import get_cfg
    # isort: on

    cfg = get_cfg()
    add_feature_cloud_config(cfg)  # adds MODEL.HEADS.FEATURE_CLOUD (LEAPHead)
    add_ftl_config(cfg)  # adds MODEL.FTL (FTLBaseline)
    cfg.merge_from_file(config_file if os.path.isfile(config_file) else config_path(config_file))
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG)
    parser.add_argument(
        "--synthetic",
        metavar="DIR",
        help="write a tiny generated Market-1501 set to DIR and use it",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU-sized overrides (see TINY_OPTS)")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="OUTPUT_DIR (default: the config's; with --tiny outputs/fastreid_tiny/<config>, "
        "away from the real-data run's checkpoints)",
    )
    parser.add_argument(
        "--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS (fastreid's train_net.py)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in OUTPUT_DIR"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    # isort: off
    import feature_cloud.integrations.fastreid  # noqa: F401  (first: fastreid compat, registers LEAPHead)
    from feature_cloud.integrations.fastreid_ftl import FTLTrainer  # registers FTLBaseline
    from fastreid.data import build as data_build
    from fastreid.engine import DefaultTrainer
    from fastreid.utils import comm
    from fastreid.utils.checkpoint import Checkpointer
    from fastreid.utils.logger import setup_logger
    # isort: on

    if args.synthetic:
        write_synthetic_market1501(args.synthetic)
        data_build._root = args.synthetic  # fastreid reads FASTREID_DATASETS at import time
    opts = (TINY_OPTS if args.tiny else []) + list(args.opts)
    output_dir = args.output_dir
    if output_dir is None and args.tiny:  # a smoke run never lands where --resume looks
        stem = os.path.splitext(os.path.basename(args.config_file))[0]
        output_dir = os.path.join("outputs", "fastreid_tiny", stem)
    if output_dir:
        opts += ["OUTPUT_DIR", output_dir]
    cfg = build_cfg(args.config_file, opts)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    # the logging of train_net.py's default_setup: the console and OUTPUT_DIR/log.txt, with
    # feature-cloud's lines (logger "fastreid.feature_cloud"); without it nothing is saved
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())

    if args.eval_only:  # as fastreid's tools/train_net.py
        cfg.defrost()
        cfg.MODEL.BACKBONE.PRETRAIN = False
        model = DefaultTrainer.build_model(cfg)
        Checkpointer(model).load(cfg.MODEL.WEIGHTS)  # load trained model
        results = DefaultTrainer.test(cfg, model)
        print({k: round(float(v), 2) for k, v in results.items() if k != "dataset"})
        return results

    # FTL: DefaultTrainer + FTLHook (Algorithm 1), optimizer over the parameters themselves
    trainer_cls = FTLTrainer if cfg.MODEL.META_ARCHITECTURE == "FTLBaseline" else DefaultTrainer
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    print({k: round(float(v), 2) for k, v in results.items() if k != "dataset"})
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
