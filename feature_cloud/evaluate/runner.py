"""Train every method on every seed of one protocol setting and evaluate it."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .._validation import as_float, as_int, printable_name, warn_user
from ..cloud import FeatureCloud
from ..demo import metrics as M
from ..demo._progress import progress
from ..demo.data import LabeledData, check_data
from ..demo.methods import (
    FTL_CLASSIFIERS,
    Method,
    MethodConfig,
    check_ftl_options,
    check_margin_options,
    check_training_options,
)
from ..demo.protocol import LongTailSplit
from ..demo.report import (
    check_out_outside_data,
    check_writable,
    counted,
    load_results,
    write_json,
)
from ..demo.runner import _device_of, embed_all, evaluate_method, seed_torch
from ..functional import ftl_regular_classes
from .backbones import build_backbone, check_backbone
from .data import dataset_title
from .environment import environment, environment_differences, run_environments, show_values
from .methods import BASELINES, EVAL_METHODS, METHOD_LABELS, with_baselines
from .protocol import hs_split, natural_split, open_split
from .report import (
    check_compatible,
    head_defaults,
    make_output_dir,
    refuse_other_contents,
    retrieval_line,
    same_split,
)

__all__ = [
    "EvalConfig",
    "PreparedEvaluation",
    "prepare_evaluation",
    "run_evaluation",
    "train_model",
    "setting_name",
    "shrinkage_sweep",
    "save_logits",
    "check_output",
    "check_out_outside_data",
    "check_models",
    "check_data",
    "TrainingDiverged",
    "RESULTS_FILE",
]

RESULTS_FILE = "results.json"

#: evaluation protocols: closed set (test images of the training identities) and open set
PROTOCOLS = ("natural", "hs", "open")


#: the command-line flag of each EvalConfig field its checks name (messages name both)
_FLAGS = {
    "test_fraction": "--test-fraction",
    "n_test": "--n-test",
    "epochs": "--epochs",
    "embedding_size": "--embedding-size",
    "shots": "-S",
    "batch_size": "--batch-size",
    "threshold": "-T",
    "num_head": "-H",
    "seeds": "--seeds",
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "warmup_fraction": "--warmup-fraction",
    "scale": "--scale",
    "margin": "--margin",
    "flip": "--no-flip",
    "ml2_alpha": "--ml2-alpha",
    "ftl_alternations": "--ftl-alternations",
    "ftl_stage0_fraction": "--ftl-stage0-fraction",
    "ftl_stage1_share": "--ftl-stage1-share",
    "ftl_energy": "--ftl-energy",
    "ftl_prototype_shrinkage": "--ftl-prototype-shrinkage",
    "imprint_fraction": "--imprint-fraction",
    "shrinkage_sweep": "--shrinkage-sweep",
    "save_logits": "--save-logits",
    "methods": "--methods",
    "backbone": "--backbone",
    "leap_options": "--leap-option",
    "out": "--out",
    "device": "--device",
}

#: the EvalConfig fields that hold integers, numbers, numbers or None, and booleans
_INT_FIELDS = (
    "n_test",
    "threshold",
    "num_head",
    "shots",
    "epochs",
    "batch_size",
    "embedding_size",
    "ftl_alternations",
)
_FLOAT_FIELDS = (
    "test_fraction",
    "lr",
    "weight_decay",
    "warmup_fraction",
    "ml2_alpha",
    "ftl_stage1_share",
    "ftl_energy",
)
_OPTIONAL_FLOAT_FIELDS = (
    "scale",
    "margin",
    "ftl_stage0_fraction",
    "ftl_prototype_shrinkage",
    "imprint_fraction",
)
_BOOL_FIELDS = ("flip", "save_logits")


def _option(name: str) -> str:
    """``name (flag)``: an :class:`EvalConfig` field as the Python and command-line user
    know it."""
    return f"{name} ({_FLAGS[name]})"


@dataclass
class EvalConfig:
    """One evaluation setting (saved in ``results.json``)."""

    protocol: str = "natural"  # "natural" | "hs" | "open" (held-out identities, retrieval only)
    test_fraction: float = 0.5  # open: share of the retrievable identities held out
    n_test: int = 2  # test images per identity
    threshold: int = 20  # natural: head = more than T training images; also LEAP vanilla's T
    num_head: int = 20  # hs: H
    shots: int = 5  # hs: S
    backbone: str = "conv4"  # "conv4" | "timm:<name>"
    # each method's baseline is added before it where it is missing (validate, as --methods)
    methods: List[str] = field(default_factory=lambda: ["cosface", "leap_full_cosface"])
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (momentum 0.9, Nesterov, one-cycle) | "adam" (cosine)
    lr: float = 0.1
    weight_decay: float = 5e-4
    warmup_fraction: float = 1.0 / 3.0  # LEAP cloud warm-up share of training
    embedding_size: int = 128
    # scale s and margin m of every margin head, a method's and its baseline's alike (CosFace /
    # ArcFace, LEAP, FTL's cosine FC); None: the margin's default (CosFace s=24, m=0.2; ArcFace
    # s=16, m=0.2 rad); face recognition usually trains CosFace at s=64, m=0.35
    scale: Optional[float] = None
    margin: Optional[float] = None
    flip: bool = True  # random horizontal flips
    ml2_alpha: float = 0.01
    ftl_alternations: int = 1  # (stage 1, stage 2) pairs after FTL's stage 0
    ftl_stage0_fraction: Optional[float] = (
        0.7  # FTL stage-0 share; None: warmup_fraction (old rule)
    )
    # FTL's FC: "cosface" (real faces, README "Real faces") | "linear" (paper) | "arcface" |
    # "leap" (the LEAP methods' default head; the baseline gets the plain margin head)
    ftl_classifier: str = "cosface"
    # FTL after stage 0: "alternating" (Algorithm 1) | "joint" (normal + transferred batch each step)
    ftl_schedule: str = "alternating"
    # FTL "alternating": stage 1's share of each (stage 1, stage 2) pair; 0.5: equal (the paper)
    ftl_stage1_share: float = 0.5
    # FTL stage 1's long-tail batch: "samples" (uniform over long-tail samples) | "classes"
    ftl_tail_sampling: str = "samples"
    # FTL stage 1: train every FC row ("all", Algorithm 1) or the long-tail classes' only ("tail")
    ftl_stage1_fc: str = "all"
    # FTL stage 1: R trained with FC ("trained", Algorithm 1) or fixed ("fixed": FC only)
    ftl_stage1_filter: str = "trained"
    # FTL's PCA basis: the share of the regular classes' intra-class variance kept (paper: 0.95)
    ftl_energy: float = 0.95
    # FTL's filter R, FTL's and its baseline's: "residual" (f = g + R(g) starting at f = g; on real
    # faces the plain MLP cost the Enc/R/FC model 8.1 tail points against CosFace, docs) |
    # "mlp" (Linear-BN-ReLU-Linear, the paper's role)
    ftl_filter: str = "residual"
    # FTL's cosine FC: inference prototypes (kappa; None: plain weights). Off by default: on real
    # faces they cost head accuracy at S = 1-3 (README, FTL results); "leap": the head's own default
    ftl_prototype_shrinkage: Optional[float] = None
    # LEAP methods: the class weights are imprinted with the inference prototypes at this share of
    # training (FeatureCloud ``imprint_step``); None: never (the paper)
    imprint_fraction: Optional[float] = None
    leap_options: Dict[str, Any] = field(default_factory=dict)  # extra LEAPMarginHead kwargs
    # inference only: each trained model with a feature cloud is also scored against its
    # prototypes at these kappa values (0: the weights), the head/tail trade-off of the
    # prototypes on the user's data ("sweep" of a run, sweep.md); recorded, not part of the
    # setting (runs with other sweeps pool)
    shrinkage_sweep: List[float] = field(default_factory=list)
    # inference output only: each closed-set run writes its test logits (the FC's), labels and
    # head-class mask to <out>/logits/<method>_seed<seed>.npz, for analyses of the user's own
    # (calibration, offsets, other metrics); recorded, not part of the setting
    save_logits: bool = False
    out: str = "outputs/evaluate"
    # where models train and embed ("cpu", "cuda", "cuda:1"); recorded, not part of the setting:
    # runs on different devices pool (each seed's pair on one device), --resume needs the same
    device: str = "cpu"

    def validate(self) -> None:
        """``ValueError`` / ``TypeError`` naming the first bad field (and its flag); the fields
        are stored as the command line's types: integer and number fields as ``int`` /
        ``float`` (``2.0`` epochs: 2), ``seeds`` / ``methods`` / ``shrinkage_sweep`` (any
        iterable but a string) as lists, ``out`` (``os.PathLike``) and ``device``
        (``torch.device``) as ``str``, ``leap_options`` (``None``: none) as a ``dict``. As
        ``--methods``, each method's baseline is added before it where it is missing
        (:func:`~feature_cloud.evaluate.methods.with_baselines`)."""
        _types_of(self)
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 0.0 < float(self.test_fraction) < 1.0:
            raise ValueError(
                f"{_option('test_fraction')} must be in (0, 1), got {self.test_fraction}"
            )
        unknown = [m for m in self.methods if m not in EVAL_METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {list(EVAL_METHODS)}")
        if not self.methods:
            raise ValueError("need at least one method (--methods)")
        self.methods = with_baselines(self.methods)  # as --methods: every method paired
        repeated = sorted(int(s) for s, n in Counter(self.seeds).items() if n > 1)
        if not self.seeds or repeated:
            raise ValueError(
                f"need distinct seeds (--seeds), got {list(self.seeds)}"
                + (f": {repeated} repeated" if repeated else "")
            )
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        for name in ("n_test", "epochs", "embedding_size", "shots"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{_option(name)} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"{_option('batch_size')} must be >= 2 (BatchNorm)")
        for name in ("threshold", "num_head"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{_option(name)} must be >= 0, got {getattr(self, name)}")
        bad_seeds = [s for s in self.seeds if not 0 <= int(s) < 2**32]
        if bad_seeds:
            raise ValueError(f"seeds must be in [0, 2**32), got {bad_seeds}")
        check_training_options(self)
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        check_ftl_options(self)
        check_margin_options(self)
        check_backbone(self.backbone)
        if self.ftl_classifier not in FTL_CLASSIFIERS:
            raise ValueError(
                f"ftl_classifier must be one of {FTL_CLASSIFIERS}, got {self.ftl_classifier!r}"
            )
        f = self.imprint_fraction
        if f is not None and not 0.0 <= float(f) < 1.0:
            raise ValueError(f"imprint_fraction must be in [0, 1) or None, got {f}")
        sweep = [float(k) for k in self.shrinkage_sweep]
        if any(not k >= 0.0 or math.isinf(k) for k in sweep) or len(set(sweep)) != len(sweep):
            raise ValueError(
                f"shrinkage_sweep must hold distinct finite values >= 0, got {self.shrinkage_sweep}"
            )
        if self.save_logits and self.protocol == "open":
            raise ValueError(
                "save_logits: the open protocol scores retrieval only; it has no closed-set logits"
            )
        kappa = self.ftl_prototype_shrinkage
        if kappa is not None and not float(kappa) >= 0.0:
            raise ValueError(f"ftl_prototype_shrinkage must be >= 0 or None, got {kappa}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device must name a torch device, got {self.device!r}") from err
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: CUDA is not available on this machine")
        if device.type == "meta":
            raise ValueError(f"device {self.device!r} holds no data: training needs cpu, cuda, ...")
        try:  # mps / xpu / ... without support in this torch build, a missing GPU index
            torch.zeros(1, device=device)
        except (RuntimeError, AssertionError, AttributeError) as err:
            text = str(err).strip()
            reason = text.splitlines()[0].split(". ")[0][:160] if text else type(err).__name__
            raise ValueError(f"device {self.device!r} is not usable here: {reason}") from None


def _number(value: Any, label: str) -> Any:
    """``value`` as a ``float`` (:func:`as_float`'s ``TypeError`` for strings, bools, ...); a
    non-finite number is returned as it is, for the field's range check to name its bounds."""
    try:
        return as_float(value, label)
    except ValueError:
        return value


def _types_of(cfg: EvalConfig) -> None:
    """The integer, number and boolean fields of ``cfg`` checked by type and converted in place
    (``epochs=2.0`` -> ``2``, as :func:`as_int`; ``"2"``, ``1.5`` epochs: ``TypeError``)."""
    for name in _INT_FIELDS:
        setattr(cfg, name, as_int(getattr(cfg, name), _option(name)))
    for name in _FLOAT_FIELDS + _OPTIONAL_FLOAT_FIELDS:
        value = getattr(cfg, name)
        if value is not None or name in _FLOAT_FIELDS:
            setattr(cfg, name, _number(value, _option(name)))
    for name in _BOOL_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{_option(name)} must be True or False, got {value!r}")
        setattr(cfg, name, bool(value))
    for name, convert in (("seeds", as_int), ("shrinkage_sweep", _number)):
        values = _sequence(getattr(cfg, name), name, "numbers")
        setattr(cfg, name, [convert(v, f"each of {_option(name)}") for v in values])
    methods = _sequence(cfg.methods, "methods", "method names")
    odd = [m for m in methods if not isinstance(m, str)]
    if odd:
        raise TypeError(f"each of {_option('methods')} must be a str, got {odd[0]!r}")
    cfg.methods = [str(m) for m in methods]
    if isinstance(cfg.out, os.PathLike):
        cfg.out = os.fspath(cfg.out)
    if isinstance(cfg.device, torch.device):
        cfg.device = str(cfg.device)
    for name, what in (
        ("backbone", "a str ('conv4', 'timm:<name>')"),
        ("out", "a folder path (str or os.PathLike)"),
        ("device", "a device name ('cpu', 'cuda:1') or a torch.device"),
    ):
        value = getattr(cfg, name)
        if not isinstance(value, str):
            raise TypeError(f"{_option(name)} must be {what}, got {value!r}")
        setattr(cfg, name, str(value))  # np.str_ -> str
    if not cfg.out.strip():
        raise ValueError(f"{_option('out')} must name a folder, got {cfg.out!r}")
    cfg.leap_options = _leap_options(cfg.leap_options)


def _sequence(values: Any, name: str, what: str) -> List[Any]:
    """The items of ``values`` (a list, tuple, ``range``, NumPy array, ...) as a list;
    ``TypeError`` naming field ``name`` for a string, a mapping or a non-iterable."""
    if not isinstance(values, (str, bytes, Mapping)):
        try:
            return list(values)
        except TypeError:
            pass
    raise TypeError(
        f"{_option(name)} must be a list (or another iterable) of {what}, got {values!r}"
    )


def _leap_options(options: Any) -> Dict[str, Any]:
    """``leap_options`` as a new ``dict`` (``None``: no options) with NumPy scalar values as
    Python numbers (``results.json`` stores them); ``TypeError`` for other types or a key
    that is not a str."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"{_option('leap_options')} must be a dict of LEAPMarginHead keywords, got {options!r}"
        )
    odd = [k for k in options if not isinstance(k, str)]
    if odd:
        raise TypeError(f"{_option('leap_options')} keys must be str, got {odd[0]!r}")
    return {str(k): v.item() if isinstance(v, np.generic) else v for k, v in options.items()}


def data_fingerprint(data: LabeledData, camids: Optional[Tensor] = None) -> str:
    """A hash of the loaded images, labels and camera ids: ``--resume`` and pooling refuse runs
    on a data file whose contents changed (same name, counts and shapes)."""
    h = hashlib.blake2b(digest_size=16)
    for t in (data.x, data.y, camids):
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _first_names(names: List[str], shown: int = 5) -> str:
    """``"a, b, c"`` or ``"a, b, c, d, e and 7 more"``."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def setting_name(cfg: EvalConfig) -> str:
    if cfg.protocol == "hs":
        return f"H{cfg.num_head}_S{cfg.shots}"
    return cfg.protocol


def make_split(cfg: EvalConfig, data: LabeledData, seed: int) -> LongTailSplit:
    if cfg.protocol == "natural":
        return natural_split(data.y, data.num_classes, cfg.n_test, cfg.threshold, seed)
    if cfg.protocol == "open":
        camids = getattr(data, "camids", None)
        return open_split(data.y, data.num_classes, cfg.test_fraction, cfg.threshold, seed, camids)
    return hs_split(data.y, data.num_classes, cfg.num_head, cfg.shots, cfg.n_test, seed)


def _steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or (full == 0 and rest > 0) else 0)


def _method_config(
    cfg: EvalConfig, total: int, seed: int, threshold: Optional[int] = None
) -> MethodConfig:
    """The methods' :class:`MethodConfig` for ``total`` training steps of ``cfg``."""
    return MethodConfig(
        embedding_size=cfg.embedding_size,
        scale=cfg.scale,
        margin=cfg.margin,
        tail_threshold=cfg.threshold if threshold is None else int(threshold),
        warmup_steps=int(round(cfg.warmup_fraction * total)),
        ml2_alpha=cfg.ml2_alpha,
        ftl_alternations=cfg.ftl_alternations,
        ftl_stage0_fraction=cfg.ftl_stage0_fraction,
        ftl_classifier=cfg.ftl_classifier,
        ftl_schedule=cfg.ftl_schedule,
        ftl_stage1_share=cfg.ftl_stage1_share,
        ftl_tail_sampling=cfg.ftl_tail_sampling,
        ftl_stage1_fc=cfg.ftl_stage1_fc,
        ftl_stage1_filter=cfg.ftl_stage1_filter,
        ftl_energy=cfg.ftl_energy,
        ftl_filter=cfg.ftl_filter,
        ftl_prototype_shrinkage=cfg.ftl_prototype_shrinkage,
        imprint_step=None
        if cfg.imprint_fraction is None
        else int(round(cfg.imprint_fraction * total)),
        seed=seed,
        leap_options=dict(cfg.leap_options),
    )


class TrainingDiverged(ValueError):
    """A model's training loss or parameters became non-finite (NaN or inf)."""


def train_model(
    name: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    counts: Tensor,
    cfg: EvalConfig,
    seed: int,
    desc: str = "",
    threshold: Optional[int] = None,
) -> Method:
    """A fresh backbone (seeded by ``seed``: identical for every method) + method ``name``,
    trained for ``cfg.epochs`` epochs in the batch order of ``seed``; ``threshold``: the methods'
    ``T`` (default ``cfg.threshold``; :func:`method_threshold`). Re-seeds torch's global RNG
    of the CPU and ``cfg.device`` (:func:`run_evaluation` restores the caller's)."""
    steps = _steps_per_epoch(x.shape[0], cfg.batch_size)
    total = cfg.epochs * steps
    mcfg = _method_config(cfg, total, seed, threshold)
    device = torch.device(cfg.device)
    seed_torch(seed, device)
    backbone = build_backbone(cfg.backbone, tuple(x.shape[1:]), cfg.embedding_size)
    model = EVAL_METHODS[name](backbone, num_classes, counts.to(device), mcfg).to(device)
    x, y = x.to(device), y.to(device)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(),
            lr=cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
        )
        sched: Any = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total, 2), pct_start=0.15
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
    gen = torch.Generator().manual_seed(seed)
    bar = progress(total=total, desc=desc or name, unit="step")
    done = [0]
    finite = torch.ones((), dtype=torch.bool, device=device)  # every loss so far finite

    def diverged(where: str) -> TrainingDiverged:
        bar.close()
        return TrainingDiverged(
            f"training diverged: {desc or name + f', seed {seed}'}: {where} became non-finite (NaN "
            f"or inf) by step {done[0]} of {total}; lower --lr (now {cfg.lr}) or check the data"
        )

    def step(loss: Tensor) -> None:
        finite.logical_and_(torch.isfinite(loss.detach()))  # on the device: no host sync
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if done[0] < total:  # the one-cycle schedule has exactly `total` steps
            sched.step()
        done[0] += 1
        bar.update(1)
        if done[0] % steps == 0 and not bool(finite):  # one check an epoch
            raise diverged("the training loss")

    def augment(xb: Tensor) -> Tensor:
        if not cfg.flip:
            return xb
        flip = (torch.rand(xb.shape[0], generator=gen) < 0.5).to(xb.device)
        return torch.where(flip[:, None, None, None], xb.flip(3), xb)

    model.train()
    fit = getattr(model, "fit", None)
    if fit is not None:  # FTL's own schedule (Algorithm 1) within the same budget
        seed_torch(seed, device)
        fit(x, y, total, cfg.batch_size, step, augment=augment)  # fresh flips per batch, as below
    else:
        for _ in range(cfg.epochs):
            perm = torch.randperm(x.shape[0], generator=gen)
            chunks = list(perm.split(cfg.batch_size))
            if len(chunks) > 1 and chunks[-1].numel() < 2:
                chunks.pop()
            for idx in chunks:
                idx = idx.to(device)
                step(model.loss(augment(x[idx]), y[idx]))
    bar.close()  # the last step checked the loss (``total`` is whole epochs)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise diverged("the model's parameters")
    model.eval()
    return model


def camera_retrieval(
    features: Tensor, labels: Tensor, camids: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """Leave-one-out retrieval where a query never matches images of its own identity taken by
    its own camera (the re-ID convention): ``(rank1, AP, valid)`` per query as
    :func:`feature_cloud.demo.metrics.retrieval_per_query`."""
    f = F.normalize(features.double(), dim=1)
    sim = f @ f.T
    same = (labels[:, None] == labels[None, :]) & (camids[:, None] == camids[None, :])
    sim = sim.masked_fill(same, float("-inf"))  # includes the diagonal
    order = torch.sort(-sim, dim=1, stable=True).indices
    usable = torch.gather(~same, 1, order)
    match = (labels[order] == labels[:, None]).double() * usable
    positives = match.sum(1)
    valid = positives > 0
    ranks = usable.double().cumsum(1).clamp_min(1)
    precision = match.cumsum(1) / ranks
    ap = (precision * match).sum(1) / positives.clamp_min(1)
    first = torch.argmax(usable.to(torch.uint8), dim=1)
    rank1 = match.gather(1, first[:, None]).squeeze(1)
    return rank1.float() * valid, ap.float() * valid, valid


#: false accept rates of the open-set verification metrics (``tar_far2``, ``tar_far3``)
OPEN_FARS = {"tar_far2": 1e-2, "tar_far3": 1e-3}


def evaluate_open(
    model: Method,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    label_map: Tensor,
    head: Tensor,
    camids: Optional[Tensor] = None,
) -> Tuple[Dict[str, float], Dict[str, List[Optional[float]]], Tensor]:
    """Open-set metrics of a model trained on ``label_map``'s identities (``train_y`` its class
    indices) on the held-out identities ``test_y`` (never classified): leave-one-out retrieval
    rank-1 and mAP (cross-camera with ``camids``) and 1:1 verification TAR at the FARs of
    :data:`OPEN_FARS`, all as ``<metric>_all``; per identity the training diagnostics of the
    closed-set evaluation (angle variance, weight norm, cloud), ``None`` for held-out ones, and
    their head / tail means (``head``: per identity, as the split's).
    Returns ``(scalars, per_class, test_embeddings)``."""
    f_train = embed_all(model, train_x)
    f_test = embed_all(model, test_x)
    if camids is None:
        r1, ap, valid = M.retrieval_per_query(f_test, test_y)
    else:
        r1, ap, valid = camera_retrieval(f_test, test_y, camids)
    scalars = {
        "rank1_all": M.group_mean(r1, valid),
        "map_all": M.group_mean(ap, valid),
        "queries_all": float(valid.sum()),
    }
    tar = M.verification_tar(f_test, test_y, list(OPEN_FARS.values()), camids)
    scalars.update({k: tar[far] for k, far in OPEN_FARS.items()})
    num_train = int(label_map.max()) + 1
    _, var_tr = M.angle_spread(f_train, train_y, num_train)
    per_train = {
        "angle_var_train": var_tr,
        "weight_norm": M.weight_norms(model.class_weight().detach().cpu()),
    }
    per_train.update({k: v.cpu().float() for k, v in model.per_class_diagnostics().items()})
    rows = {k: v.numel() for k, v in per_train.items()}
    if any(n != num_train for n in rows.values()):  # trained on the kept identities only
        raise RuntimeError(f"open set: {num_train} training classes, per-class values {rows}")
    kept = label_map >= 0
    per_class: Dict[str, List[Optional[float]]] = {}
    for key, values in per_train.items():
        for part, val in M.head_tail(values, head[kept]).items():  # training classes only
            scalars[f"{key}_{part}"] = val
        full = torch.full((label_map.numel(),), math.nan, dtype=torch.float64)
        full[kept] = values.double()[label_map[kept]]
        per_class[key] = [None if math.isnan(v) else float(v) for v in full.tolist()]
    return scalars, per_class, f_test


def sweep_keys(kappas: Sequence[float]) -> List[str]:
    """The keys of ``kappas`` in a run's ``sweep`` (and the sweep tables' kappa column): ``%g``
    (``"0"``, ``"10"``, ``"3.33333"``, ``"1e+06"``, as earlier releases wrote, so that runs
    of earlier files pool with new ones kappa by kappa), except where two different kappas of
    the sweep print alike (``1234567`` and ``1234568``: one kappa's results overwrote the
    other's): those get ``repr`` (``"1234567.0"``). Distinct kappas never share a key."""
    values = [float(k) + 0.0 for k in kappas]  # -0.0: "0"
    short = [f"{v:g}" for v in values]
    alike: Dict[str, set] = {}
    for key, value in zip(short, values):
        alike.setdefault(key, set()).add(value)
    return [key if len(alike[key]) == 1 else repr(v) for key, v in zip(short, values)]


def shrinkage_sweep(
    model: Method, emb: Tensor, labels: Tensor, head: Tensor, kappas: List[float]
) -> Dict[str, Dict[str, float]]:
    """FC accuracy (head / tail) and the shares of head test samples given to a tail class and
    the reverse of a trained ``model`` scored against its inference prototypes at each
    ``kappa`` (:func:`~feature_cloud.functional.center_prototypes`; 0: the weights), on the
    embeddings ``emb`` of the test samples: ``{key: {"fc_acc_head", "fc_acc_tail",
    "fc_cross_head", "fc_cross_tail"}}`` (keys: :func:`sweep_keys`). Empty for a model without a feature cloud keeping
    class centers (the baselines) or without ``kappas``; the model is left as it was."""
    clouds = [m for m in model.modules() if isinstance(m, FeatureCloud) and m.rule is not None]
    if not kappas or len(clouds) != 1:
        return {}
    cloud, saved = clouds[0], clouds[0].prototype_shrinkage
    is_head = head[labels]
    out: Dict[str, Dict[str, float]] = {}
    try:
        with torch.no_grad():
            for kappa, key in zip(kappas, sweep_keys(kappas)):
                cloud.prototype_shrinkage = float(kappa)
                logits = model.classify(emb).cpu()
                acc = M.head_tail(M.correct_predictions(logits, labels), is_head)
                cross = M.head_tail(M.cross_group_predictions(logits, labels, head), is_head)
                out[key] = {
                    "fc_acc_head": acc["head"],
                    "fc_acc_tail": acc["tail"],
                    "fc_cross_head": cross["head"],
                    "fc_cross_tail": cross["tail"],
                }
    finally:
        cloud.prototype_shrinkage = saved
    return out


#: folder of ``--save-logits`` files inside an evaluation's output directory
LOGITS_DIR = "logits"


def save_logits(
    model: Any, emb: Tensor, labels: Tensor, head: Tensor, out: str, method: str, seed: int
) -> str:
    """Write the closed-set test logits of ``model`` (``classify`` of the test embeddings
    ``emb``: the logits the FC accuracy is computed from), the test ``labels`` and the head-class
    mask ``head`` (``(C,)``) to ``<out>/logits/<method>_seed<seed>.npz``; returns the path."""
    with torch.no_grad():
        logits = model.classify(emb).float().cpu().numpy()
    folder = os.path.join(out, LOGITS_DIR)
    make_output_dir(folder)
    path = os.path.join(folder, f"{method}_seed{seed}.npz")
    np.savez(
        path,
        logits=logits,
        labels=labels.cpu().numpy().astype(np.int64),
        head_classes=head.cpu().numpy().astype(bool),
    )
    return path


def _normalise(x: Tensor, train: Tensor) -> Tensor:
    mean = x[train].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (x - mean) / std


def _previous_runs(
    cfg: EvalConfig, results: Dict[str, Any]
) -> Tuple[Dict[Tuple[int, str], Dict[str, Any]], float]:
    """The finished ``(seed, method)`` runs of ``cfg.out/results.json`` that ``results`` (this
    run's header and splits) may reuse, and that file's ``wall_seconds``; ``({}, 0.0)`` without a
    file. Raises ``ValueError`` naming the difference when that file is another evaluation
    (setting, configuration other than seeds / methods, data, a seed's split) or holds runs this
    one does not ask for."""
    file = os.path.join(cfg.out, RESULTS_FILE)
    if not os.path.exists(file):
        return {}, 0.0
    prev = load_results(file)
    if prev.get("kind") != "evaluate":
        raise ValueError(f"--resume: {file} is not a `feature-cloud evaluate` run")
    check_compatible(prev, results, file, "this run", verb="resume")
    before = str(prev["config"].get("device", "cpu"))
    if torch.device(before) != torch.device(cfg.device):
        raise ValueError(
            f"--resume: {file} was trained on device {before!r}, this run asks for "
            f"{cfg.device!r}; a seed's method and baseline must share a device"
        )
    for seed, split in prev["splits"].items():
        if seed in results["splits"] and not same_split(results["splits"][seed], split):
            raise ValueError(f"--resume: seed {seed} has a different split in {file}")
    done = {(int(r["seed"]), str(r["method"])): r for r in prev["runs"]}
    _check_resumed_environment(prev, results, file)
    if isinstance(prev.get("environment"), dict):  # runs of earlier releases: the file's
        for r in done.values():
            r.setdefault("environment", prev["environment"])
    if "argv" in prev:  # the command lines of the processes that wrote the file before
        results["earlier_argv"] = list(prev.get("earlier_argv", [])) + [prev["argv"]]
    extra = sorted(k for k in done if k[0] not in cfg.seeds or k[1] not in cfg.methods)
    if extra:
        raise ValueError(
            f"--resume: {file} holds runs (seed, method) {extra} outside --seeds {cfg.seeds} / "
            f"--methods {cfg.methods}; ask for them too, or write to another --out"
        )
    return done, float(prev.get("wall_seconds", 0.0))


def _check_resumed_environment(prev: Dict[str, Any], results: Dict[str, Any], file: str) -> None:
    """``--resume``: refuse where this process's thread count is not the one ``prev``'s runs
    trained with (CPU sums round differently: the runs trained now would not be those of an
    uninterrupted run, and a seed's method and baseline could differ by rounding alone; the
    count is the user's to set), and warn naming every other difference of the environment
    (versions, revision, platform, device name, numerics flags), which the user may not be
    able to undo; each run keeps its own environment in ``results.json``."""
    envs = run_environments(prev)
    if not envs:
        return
    now = results["environment"]
    diff, _ = environment_differences([now], envs)  # (file's values, this process's)
    if "threads" in diff:
        before = diff.pop("threads")[0]
        hint = (
            f"rerun with --threads {before[0]} (torch.set_num_threads({before[0]}) in Python)"
            if len(before) == 1
            else "its runs already mix thread counts; write to another --out"
        )
        raise ValueError(
            f"--resume: the runs in {file} trained with {show_values(before)} CPU thread(s) "
            f"(environment.threads), this process has {now['threads']}: {hint}. Another thread "
            "count rounds sums differently, so the runs trained now would not be those of an "
            "uninterrupted run (and a seed's method and baseline could differ by rounding alone)"
        )
    if diff:
        named = "; ".join(
            f"{k} {show_values(before)} (file) vs {show_values(after)} (now)"
            for k, (before, after) in diff.items()
        )
        warn_user(
            f"--resume: the runs in {file} were trained in another environment: {named}. The "
            "runs trained now may differ from those an uninterrupted run would give; each run's "
            "environment is recorded in results.json (report A B --compare names such "
            "differences)"
        )


def method_threshold(cfg: EvalConfig, split: LongTailSplit) -> int:
    """``T`` of the methods (FTL's regular classes ``K_i > T``, LEAP vanilla's rule) on ``split``:
    ``cfg.threshold``, except in the ``hs`` protocol when a head identity has ``T`` or fewer
    training images (a balanced set: ten images a person, ``-T 20``): then the largest training
    count of a tail identity, so that the ``H`` head identities are the regular classes (tail
    identities keep at most ``S``). Unchanged wherever every head identity has more than ``T``."""
    t = int(cfg.threshold)
    if cfg.protocol != "hs":
        return t
    counts, head = split.train_counts, split.head
    tail = ~head & (counts > 0)
    if not bool(head.any()) or bool((counts[head] > t).all()) or not bool(tail.any()):
        return t
    return min(t, int(counts[tail].max()))


def _check_split_groups(
    cfg: EvalConfig, splits: Dict[int, LongTailSplit], thresholds: Dict[int, int]
) -> None:
    """Before anything trains: warn (once) when a seed's split has no head or no tail identity
    (the head or tail columns of every table are then n/a, easy to miss on a balanced set), and
    refuse FTL where a split leaves it no regular (``K_i > T``, ``thresholds[seed]`` of
    :func:`method_threshold`) or no long-tail identity (it transfers from the one to the other)."""
    warned = False
    for seed, split in splits.items():
        s = split.summary()
        where = f"the split of seed {seed} ({setting_name(cfg)})"
        empty = [g for g in ("head", "tail") if s[f"{g}_classes"] == 0]
        if cfg.protocol == "hs":
            identities = s["head_classes"] + s["tail_classes"]  # those left out are neither
            hint = f"choose -H in (0, {identities}) (the identities split), now {cfg.num_head}"
        else:
            kept = split.train_counts[split.train_counts > 0]
            most, fewest = int(kept.max()), int(kept.min())
            if most == fewest:  # re-ID data (VIPeR: 2 images an identity): no -T splits them
                hint = (
                    f"every identity trains on {counted(most, 'image', 'images')}, so no -T "
                    "splits them into head and tail (the data has no long tail)"
                )
                if cfg.protocol != "open":
                    hint += (
                        "; --protocol open evaluates retrieval on held-out identities instead "
                        "(its accuracy columns are not split into head and tail)"
                    )
            else:
                hint = f"head = more than -T {cfg.threshold} training images; choose -T " + (
                    f"at most {most - 1} (the largest identity trains on {most})"
                    if "head" in empty
                    else f"at least {fewest} (the smallest identity trains on {fewest})"
                )
                if cfg.protocol != "open":
                    hint += " (or --protocol hs -H N -S K)"
        if "ftl" in cfg.methods:
            t, counts = thresholds[seed], split.train_counts
            is_regular = ftl_regular_classes(counts, t)  # FeatureTransfer's own rule
            regular = int(is_regular.sum())
            long_tail = int(((counts > 0) & ~is_regular).sum())
            if not regular or not long_tail:
                raise ValueError(
                    f"FTL needs regular identities (more than T = {t} training images) and "
                    f"long-tail ones (1 to {t}): {where} has {regular} and {long_tail}"
                    + (
                        f". {hint}"
                        if empty
                        else f"; choose -T between the tail's and the head's training images (now -T {cfg.threshold})"
                    )
                )
        # the open-set accuracy columns have no head / tail (a vanilla head's zero cloud: the
        # head's own warning)
        if empty and not warned and cfg.protocol != "open":
            warn_user(
                f"{where}: no {' and no '.join(empty)} identities ({s['head_classes']} head, "
                f"{s['tail_classes']} tail); the {'/'.join(empty)} columns will be n/a. {hint}"
            )
            warned = True


def _percent(value: float) -> str:
    """A metric in % for the per-run log line; ``n/a`` (as in the tables) where it is NaN (no
    head or no tail test image)."""
    return "  n/a" if math.isnan(value) else f"{100 * value:5.1f}"


def check_output(cfg: EvalConfig, resume: bool = False) -> None:
    """Before anything is trained or written: ``cfg.out`` must hold no evaluation
    (``results.json``) unless ``resume`` continues it: a finished evaluation is never
    overwritten (a file in the way of ``cfg.out``: :func:`make_output_dir`), and it must be
    writable (:func:`~feature_cloud.demo.report.check_writable`). ``ValueError``."""
    file = os.path.join(cfg.out, RESULTS_FILE)
    if not resume and os.path.exists(file):
        raise ValueError(
            f"--out {cfg.out!r} already holds an evaluation ({file}); continue it with --resume "
            "(run_evaluation(..., resume=True) in Python), or remove it or choose another --out "
            "(nothing is overwritten)"
        )
    if os.path.isdir(cfg.out) and not os.path.exists(file):
        refuse_other_contents(cfg.out, "choose another --out (nothing is overwritten)")
    check_writable(cfg.out)


def check_settings_root(out: str, settings: int) -> None:
    """Before anything is trained or written: the ``--out`` of an evaluation of several
    settings (one folder each, then ``combined.md``) must not hold the evaluation of one
    setting, which `feature-cloud report` of that folder would show instead of them."""
    file = os.path.join(out, RESULTS_FILE)
    if os.path.exists(file):
        raise ValueError(
            f"--out {out!r} holds an evaluation of one setting ({file}): the {settings} "
            "settings' folders would sit beside it and `feature-cloud report` of that folder "
            "would show only it; choose another --out (nothing is overwritten)"
        )
    check_writable(out)


def _check_training_sets(
    cfg: EvalConfig, data: LabeledData, splits: Dict[int, LongTailSplit]
) -> None:
    """Before anything trains: every seed's split must train at least 2 identities and, closed
    set, test some images; in the ``hs`` protocol warn (once) when no tail identity has ``S``
    training images (the setting is then the natural tail of those identities), and, closed
    set, when no query can retrieve an image of its identity (``--n-test 1``, or camids of one
    camera): rank-1 / mAP n/a."""
    counts = torch.bincount(data.y, minlength=data.num_classes)
    if cfg.protocol == "hs" and cfg.num_head > data.num_classes:
        kept = int((counts > cfg.n_test).sum())  # the others are left out: neither head nor tail
        more = (
            f", {kept} of them with more than --n-test {cfg.n_test} images (the others are left "
            "out)"
            if kept < data.num_classes
            else ""
        )
        raise ValueError(
            f"-H {cfg.num_head}: {dataset_title(data)} has {data.num_classes} identities{more}; "
            f"choose -H in (0, {kept}) (below {kept}, so that some identities are the tail)"
        )
    for seed, split in splits.items():
        trained = int((split.train_counts > 0).sum())
        where = f"the split of seed {seed} ({setting_name(cfg)})"
        if trained < 2 or (split.label_map is None and split.test.numel() == 0):
            if split.label_map is None:
                more = int((counts > cfg.n_test).sum())
                hint = (
                    f"each identity gives --n-test {cfg.n_test} test images first and trains on "
                    f"the rest: {more} of {data.num_classes} identities have more than "
                    f"{cfg.n_test} images; lower --n-test or add images, or use --protocol "
                    "open (held-out identities: each identity is trained or tested whole, "
                    "retrieval among the test identities' images; re-ID data with 2 images an "
                    "identity runs there)"
                )
            else:
                hint = "lower --test-fraction"
            raise ValueError(
                f"{where} trains {counted(trained, 'identity', 'identities')}: need at least 2 "
                f"({hint})"
            )
    first = next(iter(splits.values()))
    camids: Optional[Tensor] = getattr(data, "camids", None)
    single = first.label_map is None and not bool((torch.bincount(data.y[first.test]) > 1).any())
    if single:  # --n-test 1: every query is its identity's only test image
        warn_user(
            f"no identity has two test images (--n-test {cfg.n_test}): no query has an image "
            "of its identity to retrieve among the test images, so the rank-1 / mAP columns "
            "will be n/a (--n-test 2 or more for them; the FC and NN accuracies are unaffected)"
        )
    elif camids is not None and first.label_map is None:
        # a query has a match when its identity was also taken by another camera: an identity
        # with two or more cameras among the test images (no n x n similarity needed)
        pairs = torch.unique(torch.stack([data.y[first.test], camids[first.test]]), dim=1)
        if not bool((torch.bincount(pairs[0]) > 1).any()):
            cams = torch.unique(camids[first.test]).numel()
            warn_user(
                f"no test image has an image of its identity from another camera among the test "
                f"images ({cams} camera{'s' if cams != 1 else ''} in them): the cross-camera "
                "rank-1 / mAP columns will be n/a (for retrieval among all test images leave "
                "camids out of the .npz; in a folder, camera ids come from file names that all "
                "hold _c<digits>)"
            )
    if first.label_map is None:  # closed set: the same identities are left out in every seed
        left = torch.nonzero((counts > 0) & (counts <= cfg.n_test)).flatten().tolist()
        if left:
            one = len(left) == 1
            names = _first_names([printable_name(str(data.class_names[i])) for i in left])
            warn_user(
                f"{len(left)} of {data.num_classes} identities {'has' if one else 'have'} at most "
                f"--n-test {cfg.n_test} images ({names}): {'it is' if one else 'they are'} left "
                f"out (no training or test image; {'its classifier row stays' if one else 'their classifier rows stay'}, "
                f"untrained, and {'its' if one else 'their'} per-class values are n/a)"
            )
    if cfg.protocol == "hs":
        split = next(iter(splits.values()))
        tail = ~split.head & (split.train_counts > 0)
        most = int(split.train_counts[tail].max()) if bool(tail.any()) else cfg.shots
        if most < cfg.shots:
            warn_user(
                f"-S {cfg.shots}: no tail identity has {cfg.shots} training images (the most: "
                f"{most}), so every tail identity keeps all it "
                "has: the setting is the natural tail of those identities"
            )


def check_models(
    cfg: EvalConfig, data: LabeledData, splits: Dict[int, LongTailSplit], thresholds: Dict[int, int]
) -> None:
    """Before anything is written or trained: build every method of ``cfg`` for the data's
    image size and identities (the heads check their own options, ``leap_options`` included)
    and embed and classify two training images in eval mode, on the CPU, the global RNG left as
    it was. ``ValueError`` naming the method, instead of a failure after the runs before it."""
    seed = cfg.seeds[0]
    split = splits[seed]
    idx = split.train[:2]
    classes, counts = data.num_classes, split.train_counts
    if split.label_map is not None:
        classes = int(split.label_map.max()) + 1
        counts = split.train_counts[split.label_map >= 0]
    steps = _steps_per_epoch(int(split.train.numel()), cfg.batch_size)
    mcfg = _method_config(cfg, cfg.epochs * steps, seed, thresholds[seed])
    shape = tuple(data.x.shape[1:])
    with torch.random.fork_rng(devices=[]):
        for name in cfg.methods:
            try:
                backbone = build_backbone(cfg.backbone, shape, cfg.embedding_size)
                model = EVAL_METHODS[name](backbone, classes, counts, mcfg).eval()
                with torch.no_grad():
                    model.classify(model.embed(data.x[idx]))
            # AssertionError: timm's torch._assert, a model of a fixed input size (a ViT)
            except (TypeError, ValueError, RuntimeError, AssertionError) as err:
                hint = (
                    " (--leap-option keys and values are LEAPMarginHead keywords)"
                    if cfg.leap_options and name.startswith("leap")
                    else ""
                )
                if isinstance(err, AssertionError):
                    hint = f" ({cfg.backbone} may take one input size: set it with --image-size)"
                raise ValueError(
                    f"method {name!r} cannot be built or run on these images {list(shape)} "
                    f"with these options{hint}: {err}"
                ) from None


def _data_header(data: LabeledData) -> Dict[str, Any]:
    """``results["data"]``: what an evaluation records of its data."""
    camids: Optional[Tensor] = getattr(data, "camids", None)
    return {
        # name: what runs compare to pool / resume ("imagefolder" for any folder: the same
        # images in folders of other names pool); title: what titles and messages show
        "name": data.name,
        "title": dataset_title(data),
        "samples": int(data.x.shape[0]),
        "num_classes": data.num_classes,
        "input_shape": list(data.x.shape[1:]),
        "camids": camids is not None,
        "fingerprint": data_fingerprint(data, camids),
        # the identity of each per-class value (class order: sorted folder / label names)
        "class_names": [str(n) for n in data.class_names],
        "info": json.loads(json.dumps(data.info, default=str)),
    }


def _check_prepared(
    prepared: PreparedEvaluation, cfg: EvalConfig, data: LabeledData, write: bool, resume: bool
) -> None:
    """``ValueError`` unless ``prepared`` is an unused :func:`prepare_evaluation` of this
    ``cfg`` (as it is now: its fields unchanged since), this ``data`` (its contents), ``write``
    and ``resume``."""
    if prepared.used:
        raise ValueError(
            "prepared: this PreparedEvaluation was already used by a run_evaluation call (one "
            "run per preparation: a second would train every run again into the same results); "
            "call prepare_evaluation again (resume=True continues the folder the first wrote)"
        )
    if prepared.cfg is not cfg or (prepared.write, prepared.resume) != (write, resume):
        raise ValueError("prepared: prepare_evaluation of another configuration or mode")
    was, now = prepared.results["config"], asdict(cfg)
    changed = [k for k in now if now[k] != was.get(k)]
    if changed:
        shown = "; ".join(f"{k} {was.get(k)!r} -> {now[k]!r}" for k in changed)
        raise ValueError(
            f"prepared: cfg changed after prepare_evaluation ({shown}): results.json would "
            "record the prepared configuration for runs trained with another; call "
            "prepare_evaluation again with the changed cfg"
        )
    check_data(data)
    was, now = prepared.results["data"], _data_header(data)
    changed = [k for k in now if now[k] != was.get(k)]
    if changed:
        if "name" in changed and "title" in changed:  # the title follows the name
            changed.remove("title")
        shown = ", ".join(
            k
            if k in ("fingerprint", "class_names", "info")
            else f"{k} {was.get(k)!r} -> {now[k]!r}"
            for k in changed
        )
        raise ValueError(
            f"prepared: data differ from the data prepare_evaluation checked ({shown}): its "
            "splits and results.json are of those data; call prepare_evaluation again with "
            "these"
        )


@dataclass
class PreparedEvaluation:
    """What :func:`prepare_evaluation` checked and decided before anything trains or is
    written: each seed's split and methods' ``T``, the results header and, with ``resume``, the
    runs to reuse (and the wall time they took). One :func:`run_evaluation` uses it: a second
    is refused (prepare again, with ``resume=True`` to continue the folder the first wrote)."""

    cfg: EvalConfig
    splits: Dict[int, LongTailSplit]
    thresholds: Dict[int, int]
    results: Dict[str, Any]
    done: Dict[Tuple[int, str], Dict[str, Any]]
    earlier: float
    write: bool
    resume: bool
    #: set by the :func:`run_evaluation` that used it: one preparation serves one run
    used: bool = False


def prepare_evaluation(
    cfg: EvalConfig,
    data: LabeledData,
    write: bool = True,
    resume: bool = False,
    argv: Optional[Sequence[str]] = None,
) -> PreparedEvaluation:
    """Every check of an evaluation of ``cfg`` on ``data`` that needs no training: the
    configuration, the output folder, each seed's split (its errors and warnings), every method
    built on the data, and what ``--resume`` would reuse (refused where this process's thread
    count differs from the one the file's runs trained with; a warning naming every other
    difference of the environment). Nothing is written or trained: several settings
    (``-S 1 2 5``) are all prepared before the first trains. ``argv``: the command line
    ``results.json`` records (default ``sys.argv``)."""
    cfg.validate()
    check_data(data)
    if write:
        check_output(cfg, resume)
        check_out_outside_data(cfg.out, str(data.info.get("root") or ""))
    splits = {seed: make_split(cfg, data, seed) for seed in cfg.seeds}
    thresholds = {seed: method_threshold(cfg, split) for seed, split in splits.items()}
    results: Dict[str, Any] = {
        "version": 1,
        "kind": "evaluate",
        "setting": setting_name(cfg),
        "config": asdict(cfg),
        "head_defaults": head_defaults(),  # what leap_options left out resolved to (report merge)
        "data": _data_header(data),
        "splits": {
            str(seed): dict(
                split.summary(),
                train_counts=split.train_counts.tolist(),
                head=split.head.tolist(),
                # only where it is not cfg.threshold (runs of earlier releases still pool)
                **(
                    {}
                    if thresholds[seed] == cfg.threshold
                    else {"method_threshold": thresholds[seed]}
                ),
            )
            for seed, split in splits.items()
        },
        "methods": list(cfg.methods),
        "labels": {m: METHOD_LABELS[m] for m in cfg.methods},
        "baselines": {
            m: BASELINES[m]
            for m in cfg.methods
            if BASELINES[m] is not None and BASELINES[m] in cfg.methods
        },
        "runs": [],
        # the process that writes the file: its command line and what trains its runs (each run
        # records its own environment: a --resume may continue in another process)
        "argv": [str(a) for a in (sys.argv if argv is None else argv)],
        "environment": environment(cfg.device),
        "complete": False,
        "wall_seconds": 0.0,
    }
    _check_training_sets(cfg, data, splits)
    _check_split_groups(cfg, splits, thresholds)
    check_models(cfg, data, splits, thresholds)
    done, earlier = _previous_runs(cfg, results) if resume else ({}, 0.0)
    return PreparedEvaluation(cfg, splits, thresholds, results, done, earlier, write, resume)


def run_evaluation(
    cfg: EvalConfig,
    data: LabeledData,
    log: Callable[[str], None] = print,
    write: bool = True,
    resume: bool = False,
    prepared: Optional[PreparedEvaluation] = None,
) -> Dict[str, Any]:
    """Train and evaluate every method on every seed; write ``results.json`` and the report to
    ``cfg.out`` (if ``write``). Returns the results dictionary.

    With ``write``, ``results.json`` is rewritten after every (seed, method) run with
    ``"complete": false`` until the last one, so a killed evaluation keeps what it finished;
    ``resume`` reuses those runs (the file must be of this setting, configuration, data and
    splits) and trains only the missing ones. ``prepared``: :func:`prepare_evaluation` of the
    same ``cfg``, ``data``, ``write`` and ``resume`` (its checks are then not repeated), used
    once: a second use, or a ``cfg`` or ``data`` changed since, is a ``ValueError`` before
    anything trains or is written.

    Every run starts from its seed (:func:`train_model`); the caller's torch RNG state (CPU, and
    ``cfg.device``'s GPU) is restored afterwards. A failed evaluation (e.g.
    :class:`TrainingDiverged`) removes the output folders it created while they are empty."""
    if prepared is None:
        prepared = prepare_evaluation(cfg, data, write, resume)
    else:
        _check_prepared(prepared, cfg, data, write, resume)
    prepared.used = True  # from here on it trains (and writes): never a second time
    created = _missing_folders(cfg.out) if write else []
    try:
        with torch.random.fork_rng(devices=_rng_devices(cfg.device)):
            return _run_prepared(prepared, data, log)
    except BaseException as err:
        _remove_empty(created)
        file = os.path.join(cfg.out, RESULTS_FILE)
        if isinstance(err, TrainingDiverged) and write and os.path.isfile(file):
            kept = len(load_results(file).get("runs", []))
            err.args = (
                f"{err}; the {counted(kept, 'run')} finished before it "
                f"{'is' if kept == 1 else 'are'} saved in {file}",
            )
        raise


def _rng_devices(device: str) -> List[int]:
    """The CUDA devices whose RNG state an evaluation on ``device`` changes (none on the CPU)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return []
    return [torch.cuda.current_device() if dev.index is None else dev.index]


def _missing_folders(path: str) -> List[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing: List[str] = []
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _remove_empty(folders: List[str]) -> None:
    """Remove ``folders`` (deepest first) while they exist and are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty (runs it kept), or already gone: leave the rest
            if os.path.exists(folder):
                return


def _run_prepared(
    prepared: PreparedEvaluation, data: LabeledData, log: Callable[[str], None]
) -> Dict[str, Any]:
    """:func:`run_evaluation` after its checks."""
    cfg, write = prepared.cfg, prepared.write
    camids: Optional[Tensor] = getattr(data, "camids", None)
    splits, thresholds = prepared.splits, prepared.thresholds
    results = dict(prepared.results, runs=[])  # the returned dict: this call's alone
    done = prepared.done
    start = time.perf_counter() - prepared.earlier  # wall_seconds: summed over the processes
    file = os.path.join(cfg.out, RESULTS_FILE)
    if write:
        make_output_dir(cfg.out)
    log(
        f"feature-cloud evaluate: {dataset_title(data)} ({data.x.shape[0]} images, "
        f"{counted(data.num_classes, 'identity', 'identities')}), {setting_name(cfg)}, "
        f"backbone {cfg.backbone}, {counted(cfg.epochs, 'epoch')}, seeds {cfg.seeds}, methods "
        f"{cfg.methods}; {retrieval_line(results['data'])}"
        + (f"; {counted(len(done), 'run')} reused from {file}" if done else "")
    )
    runs: List[Dict[str, Any]] = results["runs"]
    for seed, split in splits.items():
        x = _normalise(data.x, split.train)
        tx, ty = x[split.train], data.y[split.train]
        ex, ey = x[split.test], data.y[split.test]
        label_map = split.label_map  # open set: training classes are the kept identities
        classes, counts = data.num_classes, split.train_counts
        if label_map is not None:
            ty, classes = label_map[ty], int(label_map.max()) + 1
            counts = split.train_counts[label_map >= 0]
        for name in cfg.methods:
            if (seed, name) in done:
                runs.append(done[(seed, name)])
                continue
            t0 = time.perf_counter()
            model = train_model(
                name,
                tx,
                ty,
                classes,
                counts,
                cfg,
                seed,
                desc=f"{setting_name(cfg)} seed {seed} {name}",
                threshold=thresholds[seed],
            )
            seconds = time.perf_counter() - t0
            sweep: Dict[str, Dict[str, float]] = {}
            if label_map is not None:
                cams = None if camids is None else camids[split.test]
                scalars, per_class, _ = evaluate_open(
                    model, tx, ty, ex, ey, label_map, split.head, cams
                )
                pct = {k: _percent(v) for k, v in scalars.items()}
                line = (
                    f"open set: rank-1 {pct['rank1_all']} mAP {pct['map_all']} "
                    f"TAR@FAR=1e-2 {pct['tar_far2']}"
                )
            else:
                scalars, per_class, _, f_ev = evaluate_method(model, tx, ty, ex, ey, split.head)
                if camids is not None:
                    r1, ap, valid = camera_retrieval(f_ev, ey, camids[split.test])
                    is_head = split.head[ey]
                    for k, v in (("rank1", r1), ("map", ap)):
                        for part, val in M.head_tail(v, is_head, valid).items():
                            scalars[f"{k}_{part}"] = val
                emb = f_ev.to(_device_of(model))
                if cfg.save_logits and write:
                    save_logits(model, emb, ey, split.head, cfg.out, name, seed)
                sweep = shrinkage_sweep(model, emb, ey, split.head, cfg.shrinkage_sweep)
                pct = {k: _percent(v) for k, v in scalars.items()}
                fc = (pct["fc_acc_head"], pct["fc_acc_tail"])
                # the class weights' FC beside the prototypes' where they differ: a short-trained
                # LEAP head scores its prototypes near 0 on the head (README: inference prototypes)
                fcw = tuple(
                    pct.get(k, fc[i]) for i, k in enumerate(("fcw_acc_head", "fcw_acc_tail"))
                )
                line = (
                    f"FC head {fc[0]} tail {fc[1]}"
                    + ("" if fcw == fc else f" (FC(W) {fcw[0].strip()} / {fcw[1].strip()})")
                    + f" | NN head {pct['nn_acc_head']} tail {pct['nn_acc_tail']}"
                )
            run: Dict[str, Any] = {
                "seed": seed,
                "method": name,
                "metrics": scalars,
                "per_class": per_class,
                "train_seconds": round(seconds, 2),
                "device": cfg.device,
                "environment": dict(results["environment"]),  # what trained this run
            }
            if sweep:
                run["sweep"] = sweep
            runs.append(run)
            if write:  # every finished run on disk (a killed evaluation keeps it: --resume)
                results["wall_seconds"] = round(time.perf_counter() - start, 1)
                write_json(results, file)
            # after the write: a run whose line was shown is saved (a Ctrl-C in a slow log)
            log(f"  seed {seed} {METHOD_LABELS[name]:<26} {line} ({seconds:.0f} s)")
    results["complete"] = True
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    if write:
        from .report import render_evaluation

        write_json(results, file)
        render_evaluation(cfg.out, log=log)
    return results
