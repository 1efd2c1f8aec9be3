"""The ``feature-cloud`` command (also ``python -m feature_cloud``).

``feature-cloud demo``
    Train every method on a long-tailed split and report head/tail metrics, diagnostics and
    plots into an output directory (see :mod:`feature_cloud.demo`).
``feature-cloud evaluate DATA``
    Real-data evaluation: every method against its own baseline, paired by seed, on the natural
    long tail or LEAP's ``<H, S>`` splits (see :mod:`feature_cloud.evaluate`).
``feature-cloud report PATH`` (or ``report PATH PATH ... --out DIR``: seeds of several runs pooled)
    Re-render the tables, CSV files and plots of a saved run; ``report A B --compare``: ``B - A``
    per method, seed by seed (a variant against the default on the same seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from types import FrameType
from typing import Callable, Iterator, Optional, Sequence, Set, TextIO, Type, Union

__all__ = ["main", "build_parser"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except for options whose help states the default itself
    (a per-source or derived default) or that default to ``None`` (nothing to show)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        text = action.help or ""
        if "(default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


#: --quiet of the commands that train
QUIET_HELP = (
    "print nothing but warnings and errors (no progress bars, per-run lines or final table; "
    "every file is written)"
)


def build_parser() -> argparse.ArgumentParser:
    """The ``feature-cloud`` command line's parser (its sub-commands and their options)."""
    from .demo.methods import FTL_CLASSIFIERS, METHODS
    from .demo.runner import DATA_DEFAULTS, DemoConfig

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="feature-cloud",
        description="Long-tail representation learning (LEAP feature cloud, FTL): demo and reports.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"feature-cloud {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{demo,evaluate,report}")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="train every method on a long-tailed split; head/tail metrics and plots",
        description="Train every method on the same backbone and budget on a long-tailed split "
        "(LEAP's <H, S> protocol) and write tables (Markdown, CSV, JSON) and PNG plots to --out.",
        formatter_class=_HelpFormatter,
    )
    defaults = ", ".join(
        f"{k}: H{v['num_head']} S{v['tail_shots']} {v['epochs']} epochs"
        for k, v in DATA_DEFAULTS.items()
    )
    demo.add_argument(
        "--data",
        nargs="+",
        default=["digits"],
        metavar=("SOURCE", "PATH"),
        help="digits (sklearn, offline) | synthetic | market1501 PATH | imagefolder PATH",
    )
    demo.add_argument(
        "--out", default=None, help="output directory (default: outputs/demo/<source>)"
    )
    demo.add_argument(
        "-H",
        "--head",
        type=int,
        default=None,
        help=f"number of head identities H (defaults per source: {defaults})",
    )
    demo.add_argument(
        "-S", "--shots", type=int, default=None, help="training samples kept per tail identity S"
    )
    demo.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=d.seeds,
        help="one split, initialisation and batch order per seed, shared by every method",
    )
    demo.add_argument(
        "--methods",
        nargs="+",
        default=d.methods,
        choices=list(METHODS),
        metavar="METHOD",
        help=f"subset of {list(METHODS)}",
    )
    demo.add_argument(
        "--epochs", type=int, default=None, help="training epochs (per-source default)"
    )
    demo.add_argument("--batch-size", type=int, default=d.batch_size, help="training batch size")
    demo.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (cosine decay)")
    demo.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    demo.add_argument(
        "--warmup-epochs",
        type=int,
        default=None,
        help="epochs before the LEAP cloud starts (default: epochs // 3)",
    )
    demo.add_argument(
        "--embedding-size", type=int, default=d.embedding_size, help="embedding dimension D"
    )
    demo.add_argument(
        "--leap-margin",
        choices=("cosface", "arcface"),
        default=d.leap_margin,
        help="base margin of the LEAP variants",
    )
    demo.add_argument(
        "--memory-per-sample",
        "-P",
        type=int,
        default=d.memory_per_sample,
        help="LEAP angle memory P (Eq. 5)",
    )
    demo.add_argument(
        "--tail-threshold",
        "-T",
        type=int,
        default=None,
        help="vanilla LEAP threshold T (default: S)",
    )
    demo.add_argument("--gamma", type=float, default=d.gamma, help="LEAP center learning rate")
    demo.add_argument(
        "--ml2-alpha",
        type=float,
        default=d.ml2_alpha,
        help="weight alpha_reg (FTL Eq. 4) of the m-L2 regulariser (FTL Eq. 3)",
    )
    demo.add_argument(
        "--ftl-alternations",
        type=int,
        default=d.ftl_alternations,
        help="FTL: (stage 1, stage 2) pairs after stage 0 (70 %% of the steps)",
    )
    demo.add_argument(
        "--ftl-classifier",
        choices=FTL_CLASSIFIERS,
        default=d.ftl_classifier,
        help="FTL's FC: the paper's linear softmax + m-L2, a cosine-margin head, or 'leap': the "
        "default LEAP head (its baseline: the plain margin head)",
    )
    demo.add_argument(
        "--test-fraction",
        type=float,
        default=d.test_fraction,
        help="share of each identity's samples held out for testing",
    )
    demo.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="share of each identity's samples held out for validation",
    )
    demo.add_argument(
        "--eval-split",
        choices=("test", "val"),
        default=d.eval_split,
        help="evaluate on the validation split (for tuning) instead of the test split",
    )
    demo.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize for market1501 (default 64 32) / imagefolder (32 32)",
    )
    syn = demo.add_argument_group("synthetic data (--data synthetic)")
    syn.add_argument("--synthetic-classes", type=int, default=None, help="identities (100)")
    syn.add_argument("--synthetic-max", type=int, default=None, help="largest class size (80)")
    syn.add_argument("--synthetic-min", type=int, default=None, help="smallest class size (20)")
    syn.add_argument(
        "--synthetic-spread",
        type=float,
        default=None,
        help="std of the shared nuisance factors: intra-class variance (1.5)",
    )
    syn.add_argument("--synthetic-noise", type=float, default=None, help="isotropic noise (0.1)")
    syn.add_argument("--synthetic-seed", type=int, default=None, help="generator seed (0)")
    demo.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (the models are tiny: one thread is fastest on a "
        "busy machine; 0 keeps torch's default)",
    )
    demo.add_argument(
        "--quiet",
        action="store_true",
        help=QUIET_HELP,
    )

    _add_evaluate(sub)

    report = sub.add_parser(
        "report",
        help="re-render tables and plots of a saved run, or pool the seeds of several "
        "evaluate runs of one setting (PATH PATH ... --out DIR)",
        description="Re-render the tables and plots of a saved demo or evaluate run from its "
        "results.json (nothing is trained), pool the seeds of several evaluate runs of one "
        "setting into a new run (PATH PATH ... --out DIR), or compare two runs seed by seed "
        "(A B --compare).",
    )
    report.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="run directory (holding results.json), or the --out of an evaluation of several "
        "settings (-S 1 5: every setting's sub-folder and the combined table)",
    )
    report.add_argument(
        "--out",
        default=None,
        help="with several PATHs: directory of the merged evaluation (seeds pooled)",
    )
    report.add_argument(
        "--compare",
        action="store_true",
        help="two evaluate runs A B of one setting: B - A per method, seed by seed "
        "(a variant against the default on the same seeds); --out DIR writes compare.md/.json",
    )
    report.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def _add_evaluate(sub) -> None:
    from .demo.methods import FTL_CLASSIFIERS, FTL_SCHEDULES, FTL_STAGE1_FC, FTL_STAGE1_FILTER
    from .evaluate.methods import EVAL_METHODS
    from .evaluate.runner import PROTOCOLS, EvalConfig
    from .ftl import FILTERS, TAIL_SAMPLING

    e = EvalConfig()
    ev = sub.add_parser(
        "evaluate",
        help="real-data evaluation: methods vs their own baselines, paired by seed",
        description="Train each method and its baseline (LEAP vs the same margin head with the "
        "cloud off, FTL vs the same Enc/R/FC model without transfer) on the same backbone, budget "
        "and batch order per seed; report head/tail FC and NN accuracy, rank-1/mAP, per-class "
        "angle variance and weight norm, paired differences with 95% t-intervals (Markdown, CSV, "
        "JSON, PNG) under --out.",
        formatter_class=_HelpFormatter,
    )
    ev.add_argument(
        "data",
        help=".npz (images, labels[, camids]) or a folder with one sub-folder per identity "
        "(camera ids where every file name is <anything>_c<digits>..., Market-1501 / DukeMTMC "
        "style: cross-camera retrieval; otherwise none)",
    )
    ev.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default=e.protocol,
        help="natural long tail, LEAP's <H, S> splits (both closed set: test images of the "
        "training identities), or 'open': --test-fraction of the identities held out whole, "
        "retrieval and verification among them",
    )
    ev.add_argument(
        "--test-fraction",
        type=float,
        default=e.test_fraction,
        help="open: share of the identities with 2+ images (re-ID: 2+ cameras) held out",
    )
    ev.add_argument(
        "--n-test",
        type=int,
        default=e.n_test,
        help="test images per identity (natural and hs; open holds out whole identities)",
    )
    ev.add_argument(
        "-T",
        "--threshold",
        type=int,
        default=e.threshold,
        help="natural / open: head = more than T training images; FTL's regular classes and "
        "LEAP vanilla's T (hs: lowered to the largest tail count where a head identity has T "
        "or fewer, so the H head identities are the regular ones)",
    )
    ev.add_argument("-H", "--head", type=int, default=e.num_head, help="hs: head identities H")
    ev.add_argument(
        "-S",
        "--shots",
        type=int,
        nargs="+",
        default=[e.shots],
        help="hs: training images per tail identity (several: one run each)",
    )
    ev.add_argument(
        "--backbone", default=e.backbone, help="conv4 or timm:<model> (pretrained=False)"
    )
    ev.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="resize the images (area, folders and .npz alike, each image from its own size); "
        "folders default to 64 64",
    )
    ev.add_argument(
        "--methods",
        nargs="+",
        default=e.methods,
        choices=list(EVAL_METHODS),
        metavar="METHOD",
        help=f"from {list(EVAL_METHODS)}; baselines are added",
    )
    ev.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=e.seeds,
        help="one split, initialisation and batch order per seed, shared by a method and its "
        "baseline (3 or more for the intervals)",
    )
    ev.add_argument("--epochs", type=int, default=e.epochs, help="training epochs of every model")
    ev.add_argument("--batch-size", type=int, default=e.batch_size, help="training batch size")
    ev.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default=e.optimizer,
        help="'sgd': momentum 0.9, Nesterov, one-cycle learning rate; 'adam': cosine",
    )
    ev.add_argument("--lr", type=float, default=e.lr, help="peak learning rate")
    ev.add_argument("--weight-decay", type=float, default=e.weight_decay, help="weight decay")
    ev.add_argument(
        "--warmup-fraction",
        type=float,
        default=e.warmup_fraction,
        help="share of training before the LEAP cloud / FTL transfer starts",
    )
    ev.add_argument(
        "--embedding-size", type=int, default=e.embedding_size, help="embedding dimension D"
    )
    ev.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    ev.add_argument(
        "--scale",
        type=float,
        default=e.scale,
        help="scale s of every margin head, each method's and its baseline's (CosFace, ArcFace, "
        "LEAP, FTL's cosine FC); default: the margin's (CosFace 24, ArcFace 16); faces: 64",
    )
    ev.add_argument(
        "--margin",
        type=float,
        default=e.margin,
        help="margin m of every margin head (CosFace: cosine, ArcFace: radians), as --scale; "
        "default: the margin's (0.2); faces: CosFace 0.35, ArcFace 0.5",
    )
    ev.add_argument(
        "--ml2-alpha",
        type=float,
        default=e.ml2_alpha,
        help="weight alpha_reg (FTL Eq. 4) of the m-L2 regulariser (FTL Eq. 3) of the m-L2 "
        "method and FTL's linear FC",
    )
    ev.add_argument(
        "--ftl-alternations",
        type=int,
        default=e.ftl_alternations,
        help="FTL: (stage 1, stage 2) pairs after stage 0",
    )
    ev.add_argument(
        "--ftl-stage0-fraction",
        type=_fraction_or_none,
        default=e.ftl_stage0_fraction,
        help="FTL stage-0 share of the steps; 'none': --warmup-fraction (the old rule)",
    )
    ev.add_argument(
        "--device",
        default=e.device,
        help="train and embed on this torch device (cpu, cuda, cuda:1); results differ from the "
        "CPU's in rounding only; each seed's method and baseline run on the same device",
    )
    ev.add_argument(
        "--ftl-schedule",
        choices=FTL_SCHEDULES,
        default=e.ftl_schedule,
        help="FTL after stage 0: Algorithm 1's (stage 1, stage 2) pairs, or 'joint': every step "
        "trains the whole model on a normal batch plus R/FC on transferred tail features, or "
        "'retrain': one stage 1 for the rest of the budget (no stage 2)",
    )
    ev.add_argument(
        "--ftl-stage1-share",
        type=float,
        default=e.ftl_stage1_share,
        help="FTL --ftl-schedule alternating: stage 1's share of each (stage 1, stage 2) pair "
        "(the rest is stage 2); 0.5: equal stages, as in the paper",
    )
    ev.add_argument(
        "--ftl-stage1-fc",
        choices=FTL_STAGE1_FC,
        default=e.ftl_stage1_fc,
        help="FC rows that FTL stage 1 trains: all (default, Algorithm 1), 'tail': the "
        "long-tail classes' only, the regular classes' rows kept as stage 0 left them, or "
        "'none': FC kept as stage 0 left it (stage 1 trains R alone)",
    )
    ev.add_argument(
        "--ftl-stage1-filter",
        choices=FTL_STAGE1_FILTER,
        default=e.ftl_stage1_filter,
        help="R (the filter) in FTL stage 1: trained with FC (Algorithm 1) or 'fixed': "
        "stage 1 trains FC alone",
    )
    ev.add_argument(
        "--ftl-tail-sampling",
        choices=TAIL_SAMPLING,
        default=e.ftl_tail_sampling,
        help="FTL stage 1's long-tail batch: uniform over the long-tail samples (Algorithm 1) or "
        "'classes': every long-tail class equally often",
    )
    ev.add_argument(
        "--ftl-energy",
        type=float,
        default=e.ftl_energy,
        help="FTL's PCA basis Q keeps the fewest components reaching this share of the regular "
        "classes' intra-class variance (0.95: the paper's; 1: the whole residual)",
    )
    ev.add_argument(
        "--ftl-filter",
        choices=FILTERS,
        default=e.ftl_filter,
        help="FTL's filter R (and its baseline's): 'mlp' (Linear-BN-ReLU-Linear, the paper's "
        "role) or 'residual' (f = g + R(g), starting at f = g)",
    )
    ev.add_argument(
        "--ftl-classifier",
        choices=FTL_CLASSIFIERS,
        default=e.ftl_classifier,
        help="FTL's FC (and its baseline's): the paper's linear softmax + m-L2, a cosine-margin "
        "head, or 'leap': the default LEAP head (its baseline: the plain margin head)",
    )
    ev.add_argument(
        "--ftl-prototype-shrinkage",
        type=_fraction_or_none,
        default=e.ftl_prototype_shrinkage,
        help="FTL's cosine FC scores against inference prototypes with this kappa (never its "
        "baseline); 'none' (default): plain weights (with --ftl-classifier leap: the head's default)",
    )
    ev.add_argument(
        "--imprint-fraction",
        type=_fraction_or_none,
        default=e.imprint_fraction,
        help="LEAP methods: imprint the class weights with the inference prototypes at this "
        "share of training (the head's imprint_step); 'none': never (the paper)",
    )
    ev.add_argument(
        "--shrinkage-sweep",
        type=float,
        nargs="+",
        default=list(e.shrinkage_sweep),
        metavar="KAPPA",
        help="also score each trained LEAP model against its inference prototypes at these "
        "kappa values (0: the weights; inference only): the head/tail trade-off, sweep.md",
    )
    ev.add_argument(
        "--save-logits",
        action="store_true",
        help="write each closed-set run's test logits, labels and head-class mask to "
        "OUT/logits/METHOD_seedSEED.npz (runs reused by --resume keep the files they wrote)",
    )
    ev.add_argument(
        "--leap-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra LEAPMarginHead keyword (repeatable), e.g. cloud_mode=paper",
    )
    ev.add_argument("--out", default="outputs/evaluate", help="output directory")
    ev.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    ev.add_argument(
        "--quiet",
        action="store_true",
        help=QUIET_HELP,
    )
    ev.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished (seed, method) runs of --out's results.json (written after "
        "every run) and train only the missing ones",
    )


def _fraction_or_none(text: str):
    return None if text.strip().lower() == "none" else float(text)


def _parse_value(text: str):
    import ast

    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _ignored_options(args: argparse.Namespace, methods: Sequence[str]) -> list:
    """The evaluate options given away from their defaults that no part of this evaluation
    reads (a protocol's or a method's own), each with what would read it."""
    from .evaluate.runner import EvalConfig

    e, out = EvalConfig(), []
    if args.protocol != "hs" and (args.head != e.num_head or list(args.shots) != [e.shots]):
        out.append("-H / -S (--protocol hs only)")
    if args.protocol != "open" and args.test_fraction != e.test_fraction:
        out.append("--test-fraction (--protocol open only)")
    if args.protocol == "open" and args.n_test != e.n_test:
        out.append("--n-test (the closed-set protocols natural and hs only)")
    if args.protocol == "open" and args.shrinkage_sweep:  # scores closed-set logits
        out.append("--shrinkage-sweep (the closed-set protocols natural and hs only)")
    ftl = "ftl" in methods
    if not ftl:
        changed = [
            "--" + k.replace("_", "-")
            for k, v in vars(args).items()
            if k.startswith("ftl_") and v != getattr(e, k, v)
        ]
        if changed:
            out.append(f"{', '.join(sorted(changed))} (the ftl method only)")
    leap = any(m.startswith("leap_") for m in methods) or (
        ftl and (args.ftl_classifier == "leap" or args.ftl_prototype_shrinkage is not None)
    )
    if not leap:
        changed = [
            flag
            for flag, given in (
                ("--leap-option", bool(args.leap_option)),
                ("--imprint-fraction", args.imprint_fraction is not None),
                ("--shrinkage-sweep", bool(args.shrinkage_sweep) and args.protocol != "open"),
            )
            if given
        ]
        if changed:
            out.append(f"{', '.join(changed)} (the LEAP methods only)")
    return out


def _run_evaluate(args: argparse.Namespace, log) -> None:
    from dataclasses import replace

    from .evaluate.data import load_dataset
    from .evaluate.methods import with_baselines
    from .evaluate.report import combine_settings
    from .evaluate.runner import (
        EvalConfig,
        check_out_outside_data,
        check_output,
        check_settings_root,
        prepare_evaluation,
        run_evaluation,
        setting_name,
    )

    methods = with_baselines(args.methods)  # each method after its baseline
    options = {}
    for item in args.leap_option:
        if "=" not in item:
            raise ValueError(f"--leap-option takes KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        options[k.strip()] = _parse_value(v.strip())
    base = EvalConfig(
        protocol=args.protocol,
        test_fraction=args.test_fraction,
        n_test=args.n_test,
        threshold=args.threshold,
        num_head=args.head,
        backbone=args.backbone,
        methods=methods,
        seeds=list(args.seeds),
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_fraction=args.warmup_fraction,
        embedding_size=args.embedding_size,
        scale=args.scale,
        margin=args.margin,
        flip=not args.no_flip,
        ml2_alpha=args.ml2_alpha,
        ftl_alternations=args.ftl_alternations,
        ftl_stage0_fraction=args.ftl_stage0_fraction,
        ftl_classifier=args.ftl_classifier,
        ftl_schedule=args.ftl_schedule,
        ftl_stage1_share=args.ftl_stage1_share,
        ftl_tail_sampling=args.ftl_tail_sampling,
        ftl_stage1_fc=args.ftl_stage1_fc,
        ftl_stage1_filter=args.ftl_stage1_filter,
        ftl_energy=args.ftl_energy,
        ftl_filter=args.ftl_filter,
        ftl_prototype_shrinkage=args.ftl_prototype_shrinkage,
        imprint_fraction=args.imprint_fraction,
        leap_options=options,
        shrinkage_sweep=list(args.shrinkage_sweep),
        save_logits=args.save_logits,
        out=args.out,
        device=args.device,
    )
    if args.resume and not os.path.exists(args.out):  # a mistyped --out retrained all, silently
        warnings.warn(
            f"--resume: {args.out!r} does not exist, so there is nothing to resume: every run "
            "trains (check the path if you meant to continue an evaluation)",
            UserWarning,
            stacklevel=2,
        )
    ignored = _ignored_options(args, methods)
    if ignored:
        warnings.warn(
            f"ignored in this evaluation: {'; '.join(ignored)}", UserWarning, stacklevel=2
        )
    shots = args.shots if args.protocol == "hs" else [base.shots]
    configs = [replace(base, shots=s) for s in dict.fromkeys(shots)]
    for c in configs:
        c.validate()
    if len(configs) > 1:  # every setting's folder before the first trains
        check_settings_root(args.out, len(configs))
        _refuse_other_settings(args.out, [setting_name(c) for c in configs], shots)
        for c in configs:
            c.out = os.path.join(args.out, setting_name(c))
    check_out_outside_data(args.out, args.data)
    for c in configs:  # before the data are loaded (again in prepare_evaluation)
        check_output(c, args.resume)
    data = load_dataset(args.data, tuple(args.image_size) if args.image_size else None)
    # every setting's (and seed's) split checks, errors and warnings before the first trains
    prepared = [
        prepare_evaluation(c, data, resume=args.resume, argv=args.command_line) for c in configs
    ]
    if len(configs) == 1:
        run_evaluation(configs[0], data, log=log, resume=args.resume, prepared=prepared[0])
        return
    dirs = []
    for c, p in zip(configs, prepared):
        run_evaluation(c, data, log=log, resume=args.resume, prepared=p)
        dirs.append(c.out)
    log("")
    log(combine_settings(dirs, args.out))


def _refuse_other_settings(out: str, names: Sequence[str], shots: Sequence[int]) -> None:
    """``ValueError`` where the ``--out`` of an evaluation of several settings holds settings'
    folders besides ``names`` (a changed ``-S`` list, ``--resume`` or not): ``combined.md``
    would leave them out silently."""
    from .demo.report import run_subfolders

    other = sorted({os.path.basename(d) for d in run_subfolders(out)} - set(names))
    if other:
        raise ValueError(
            f"--out {out!r} holds the settings {', '.join(other)} besides those of -S "
            f"{' '.join(map(str, shots))}: the combined table would leave them out; ask for them "
            "too (the same -S list as before) or choose another --out"
        )


def _demo_config(args: argparse.Namespace):
    from .demo.data import DATA_SOURCES
    from .demo.runner import DemoConfig

    source, *rest = args.data
    if source not in DATA_SOURCES:
        raise ValueError(f"--data must be one of {DATA_SOURCES}, got {source!r}")
    if len(rest) > 1:
        raise ValueError(f"--data takes a source and at most one PATH, got {args.data}")
    synthetic = {
        key: value
        for key, value in (
            ("num_classes", args.synthetic_classes),
            ("max_per_class", args.synthetic_max),
            ("min_per_class", args.synthetic_min),
            ("spread", args.synthetic_spread),
            ("noise", args.synthetic_noise),
            ("seed", args.synthetic_seed),
        )
        if value is not None
    }
    if synthetic and source != "synthetic":
        raise ValueError("--synthetic-* options need --data synthetic")
    return DemoConfig(
        data=source,
        path=rest[0] if rest else None,
        num_head=args.head,
        tail_shots=args.shots,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        eval_split=args.eval_split,
        seeds=list(args.seeds),
        methods=list(dict.fromkeys(args.methods)),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        embedding_size=args.embedding_size,
        leap_margin=args.leap_margin,
        memory_per_sample=args.memory_per_sample,
        gamma=args.gamma,
        tail_threshold=args.tail_threshold,
        ml2_alpha=args.ml2_alpha,
        ftl_alternations=args.ftl_alternations,
        ftl_classifier=args.ftl_classifier,
        image_size=tuple(args.image_size) if args.image_size else None,
        synthetic=synthetic,
        out=args.out or os.path.join("outputs", "demo", source),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``feature-cloud`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    # the command line results.json records: this process's, or the one main() was given
    args.command_line = list(sys.argv) if argv is None else ["feature-cloud", *map(str, argv)]
    import torch

    from ._validation import printable
    from .demo._progress import is_enabled, set_progress

    progress_before, threads_before = is_enabled(), torch.get_num_threads()
    set_progress(not args.quiet)
    # a path's undecodable bytes (a folder name that is not UTF-8) as backslash escapes: a
    # strict stdout never stops a finished evaluation
    log = (lambda *_: None) if args.quiet else (lambda text="": print(printable(str(text))))
    with warnings.catch_warnings(), _terminate_as_interrupt():
        warnings.showwarning = _show_warning  # the package's warnings as one CLI line
        _SHOWN.clear()
        try:
            return _main(args, log, progress_before, threads_before)
        finally:
            _SHOWN.clear()


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Slurm, ``docker stop``) delivered as an interrupt: the command
    stops as on Ctrl-C (finished runs kept, an empty ``--out`` removed, what to do said), with
    exit status 143."""


def _raise_terminated(signum: int, frame: Optional[FrameType]) -> None:
    raise Terminated()


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while a command runs (it killed the process without a
    word and left an empty ``--out`` folder); only in the main thread and where SIGTERM has its
    default action (an embedding program's own handler stays)."""
    import signal
    import threading

    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: the package's warnings :func:`_show_warning` printed in this command: each once, as Python's
#: default filter would show them (checks repeated per setting, ``-S 1 2 5``, warn again where
#: something resets the warnings registry between them, e.g. a ``catch_warnings`` block)
_SHOWN: Set[str] = set()


def _show_warning(
    message: Union[Warning, str],
    category: Type[Warning],
    filename: str,
    lineno: int,
    file: Optional[TextIO] = None,
    line: Optional[str] = None,
) -> None:
    """``warnings.showwarning`` of the CLI: a warning raised from this package's code is one
    ``feature-cloud: warning: ...`` line on stderr, each once a command; any other keeps
    Python's format. The package's warnings name the user's line (``warn_user``: the caller of
    ``main``), so the code that called ``warnings.warn`` decides, not ``filename``."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    if _warned_from(sys._getframe(1)).startswith(package) or os.path.abspath(filename).startswith(
        package
    ):
        from ._validation import printable

        text = f"feature-cloud: warning: {printable(str(message))}"
        if text in _SHOWN:  # the same warning again (another setting's check): said once
            return
        _SHOWN.add(text)
        print(text, file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _warned_from(frame: Optional[FrameType]) -> str:
    """The file of the code that called ``warnings.warn``: the first of ``frame`` and its
    callers outside :mod:`warnings` (whose ``_showwarnmsg`` calls ``showwarning``)."""
    own = os.path.abspath(warnings.__file__)
    while frame is not None and os.path.abspath(frame.f_code.co_filename) == own:
        frame = frame.f_back
    return "" if frame is None else os.path.abspath(frame.f_code.co_filename)


def _interrupted(args: argparse.Namespace) -> str:
    """What an interrupted command kept: for ``evaluate``, the finished runs in ``--out``'s
    ``results.json`` files (one per setting) and how to train the rest."""
    if args.command != "evaluate":
        return "nothing more was written"
    import json

    from .demo.report import counted

    files = [os.path.join(args.out, "results.json")]
    if os.path.isdir(args.out) and not os.path.isfile(files[0]):  # several settings: sub-folders
        files = sorted(
            os.path.join(args.out, sub, "results.json")
            for sub in os.listdir(args.out)
            if os.path.isfile(os.path.join(args.out, sub, "results.json"))
        )
    runs = 0
    for file in files:
        try:
            with open(file) as fh:
                runs += len(json.load(fh).get("runs", []))
        except (OSError, ValueError, AttributeError):
            continue
    if not runs:
        return f"no run finished (nothing saved in {args.out!r})"
    return (
        f"{counted(runs, 'finished run')} saved in {args.out!r}; rerun the same command with "
        "--resume to train the rest (the finished runs are reused)"
    )


def _main(
    args: argparse.Namespace, log: Callable[..., None], progress_before: bool, threads_before: int
) -> int:
    import torch

    from ._extras import MissingExtra
    from .demo._progress import set_progress
    from .demo.runner import run_demo

    try:
        if args.command == "report":
            from .demo.report import RESULTS_FILE, load_results, render_report, run_subfolders

            path = args.paths[0]
            if args.compare:
                from .evaluate.report import compare_runs, comparison_markdown

                if len(args.paths) != 2:
                    raise ValueError("--compare takes two run directories: A (reference) B")
                cmp = compare_runs(args.paths[0], args.paths[1], args.out)
                log(comparison_markdown(cmp))
                return 0
            if len(args.paths) > 1:
                from .evaluate.report import merge_runs

                if args.out is None:
                    raise ValueError("several PATHs are merged: give --out DIR for the result")
                path = merge_runs(args.paths, args.out)
            elif args.out is not None:
                raise ValueError("--out is for merging several PATHs")
            subs = run_subfolders(path)
            if subs and not os.path.isfile(os.path.join(path, RESULTS_FILE)):
                # the --out of an evaluation of several settings: each, then the combined table
                from .evaluate.report import check_combinable, combine_settings, render_evaluation

                for sub in subs:
                    if load_results(sub).get("kind") != "evaluate":
                        raise ValueError(f"{sub!r} is not a feature-cloud evaluate run")
                check_combinable(subs)  # before any file is written
                for sub in subs:
                    render_evaluation(sub, log=log)
                combine_settings(subs, path)
                from .demo.report import counted

                log(
                    f"wrote combined.md and combined_*.csv of {counted(len(subs), 'setting')} to {path}"
                )
                return 0
            if load_results(path).get("kind") == "evaluate":
                from .evaluate.report import render_evaluation

                render_evaluation(path, log=log)
            else:
                render_report(path, log=log)
            return 0
        if args.threads < 0:
            raise ValueError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
        if args.command == "evaluate":
            _run_evaluate(args, log)
            return 0
        run_demo(_demo_config(args).resolved(), log=log, argv=args.command_line)
        return 0
    except (ValueError, FileNotFoundError, MissingExtra) as exc:
        from ._validation import printable

        print(f"feature-cloud: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that became unwritable, a full disk: a line, not a trace
        where = f": {exc.filename!r}" if exc.filename else ""
        print(f"feature-cloud: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # Ctrl-C / SIGTERM: what was kept and how to go on
        what = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
        print(f"\nfeature-cloud: {what}; {_interrupted(args)}", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    finally:  # leave the process as we found it (main() is also called in-process)
        set_progress(progress_before)
        torch.set_num_threads(threads_before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
