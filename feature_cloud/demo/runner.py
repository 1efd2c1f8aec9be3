"""Run the demo: split, train every method on every seed, evaluate, save the run."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import metrics as M
from ._progress import progress
from .data import LabeledData, SyntheticConfig, check_data, load_data
from .methods import (
    FTL_CLASSIFIERS,
    METHODS,
    MethodConfig,
    build_method,
    check_training_options,
    method_label,
)
from .protocol import LongTailSplit, long_tail_split, rank_classes
from .report import (
    PROJECTION_FILE,
    RESULTS_FILE,
    check_out_outside_data,
    check_writable,
    make_output_dir,
    render_report,
    write_json,
)

__all__ = [
    "DemoConfig",
    "DATA_DEFAULTS",
    "drop_small_classes",
    "train_method",
    "evaluate_method",
    "run_demo",
    "RESULTS_FILE",
    "PROJECTION_FILE",
]


#: Per-source defaults for the <H, S> protocol and the training budget.
DATA_DEFAULTS: Dict[str, Dict[str, Any]] = {
    # 10 identities of ~180 images: 3 head classes keep all their training images, 7 tail
    # classes keep 5 (the paper's S5).
    "digits": {"num_head": 3, "tail_shots": 5, "epochs": 60},
    # 100 identities of 80..20 samples: the paper's H20 S5.
    "synthetic": {"num_head": 20, "tail_shots": 5, "epochs": 30},
    "market1501": {"num_head": 20, "tail_shots": 5, "epochs": 30},
    "imagefolder": {"num_head": 20, "tail_shots": 5, "epochs": 30},
}


@dataclass
class DemoConfig:
    """Everything that defines a demo run (saved in ``results.json``)."""

    data: str = "digits"
    path: Optional[str] = None
    num_head: Optional[int] = None  # H; None: DATA_DEFAULTS
    tail_shots: Optional[int] = None  # S; None: DATA_DEFAULTS
    test_fraction: float = 0.3
    val_fraction: float = 0.1
    eval_split: str = "test"  # "val" to tune without touching the test split
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    methods: List[str] = field(default_factory=lambda: list(METHODS))
    epochs: Optional[int] = None
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    warmup_epochs: Optional[int] = None  # cloud / FTL start; None: epochs // 3
    embedding_size: int = 64
    leap_margin: str = "cosface"
    memory_per_sample: int = 1
    gamma: float = 0.1
    tail_threshold: Optional[int] = None  # T; None: S
    ml2_alpha: float = 0.01  # FTL Eq. 4 uses 0.25; chosen on the validation split, see docs
    ftl_alternations: int = 1  # (stage 1, stage 2) pairs of FTL Algorithm 1; chosen on validation
    ftl_classifier: str = "linear"  # FTL's FC: the paper's linear softmax (+ m-L2) or "cosface"
    image_size: Optional[Tuple[int, int]] = None
    synthetic: Dict[str, Any] = field(default_factory=dict)
    projection_classes: int = 3  # head and tail classes shown in the 2-D plot
    out: str = "outputs/demo/digits"

    def resolved(self) -> DemoConfig:
        """A copy with every ``None`` default filled from :data:`DATA_DEFAULTS`."""
        if self.data not in DATA_DEFAULTS:
            raise ValueError(f"data must be one of {tuple(DATA_DEFAULTS)}, got {self.data!r}")
        d = DATA_DEFAULTS[self.data]
        c = DemoConfig(**{**asdict(self), "seeds": list(self.seeds), "methods": list(self.methods)})
        c.num_head = d["num_head"] if c.num_head is None else c.num_head
        c.tail_shots = d["tail_shots"] if c.tail_shots is None else c.tail_shots
        c.epochs = d["epochs"] if c.epochs is None else c.epochs
        c.warmup_epochs = c.epochs // 3 if c.warmup_epochs is None else c.warmup_epochs
        c.tail_threshold = c.tail_shots if c.tail_threshold is None else c.tail_threshold
        c.validate()
        return c

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; available: {list(METHODS)}")
        if not self.methods:
            raise ValueError("at least one method is needed")
        if not self.seeds:
            raise ValueError("at least one seed is needed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.eval_split not in ("test", "val"):
            raise ValueError(f"eval_split must be 'test' or 'val', got {self.eval_split!r}")
        for name in (
            "epochs",
            "batch_size",
            "embedding_size",
            "memory_per_sample",
            "ftl_alternations",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm)")
        if self.ftl_classifier not in FTL_CLASSIFIERS:
            raise ValueError(
                f"ftl_classifier must be one of {FTL_CLASSIFIERS}, got {self.ftl_classifier!r}"
            )
        if not 0 <= int(self.warmup_epochs) <= int(self.epochs):  # type: ignore[arg-type]
            raise ValueError(f"warmup_epochs must be in [0, epochs], got {self.warmup_epochs}")
        check_training_options(self)
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if not (
            0 < self.test_fraction < 1
            and 0 <= self.val_fraction < 1
            and self.test_fraction + self.val_fraction < 1
        ):  # also rejects nan
            raise ValueError(
                f"test_fraction must be in (0, 1) and val_fraction in [0, 1) with a sum below 1, "
                f"got {self.test_fraction}, {self.val_fraction}"
            )
        if self.leap_margin not in ("cosface", "arcface"):
            raise ValueError(
                f"leap_margin must be 'cosface' or 'arcface', got {self.leap_margin!r}"
            )


def drop_small_classes(data: LabeledData, min_count: int = 2) -> LabeledData:
    """Remove identities with fewer than ``min_count`` samples and renumber the rest."""
    counts = torch.bincount(data.y, minlength=data.num_classes)
    keep = torch.nonzero(counts >= min_count).flatten()
    if keep.numel() == data.num_classes:
        return data
    if keep.numel() < 2:
        raise ValueError(f"fewer than two identities have >= {min_count} samples")
    remap = torch.full((data.num_classes,), -1, dtype=torch.long)
    remap[keep] = torch.arange(keep.numel())
    rows = remap[data.y] >= 0
    info = dict(data.info, dropped_classes=int(data.num_classes - keep.numel()))
    return LabeledData(
        data.x[rows],
        remap[data.y[rows]],
        [data.class_names[i] for i in keep.tolist()],
        data.name,
        info,
    )


# ---------------------------------------------------------------------------------------------
# training and evaluation
# ---------------------------------------------------------------------------------------------


def _batches(n: int, batch_size: int, generator: torch.Generator) -> List[Tensor]:
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < 2:  # BatchNorm needs >= 2 samples
        chunks.pop()
    return chunks


def steps_per_epoch(n: int, batch_size: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 or (full == 0 and rest > 0) else 0)


def seed_torch(seed: int, device: Optional[torch.device] = None) -> None:
    """``torch.manual_seed(seed)`` for the CPU and ``device`` only: not every GPU, so that
    ``torch.random.fork_rng`` over these two restores all that training re-seeded."""
    torch.default_generator.manual_seed(seed)
    if device is None or device.type == "cpu":
        return
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    else:  # other accelerators (mps, xpu, ...): torch's own seeding
        torch.manual_seed(seed)


def train_method(
    name: str,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    counts: Tensor,
    cfg: DemoConfig,
    seed: int,
    desc: str = "",
) -> nn.Module:
    """Train method ``name`` from a fresh backbone seeded by ``seed`` (the same initial backbone
    and batch order for every method): Adam, cosine learning-rate decay, ``cfg.epochs`` epochs."""
    steps = steps_per_epoch(x.shape[0], cfg.batch_size)
    mcfg = MethodConfig(
        embedding_size=cfg.embedding_size,
        leap_margin=cfg.leap_margin,
        tail_threshold=int(cfg.tail_threshold),
        memory_per_sample=cfg.memory_per_sample,  # type: ignore[arg-type]
        gamma=cfg.gamma,
        warmup_steps=int(cfg.warmup_epochs) * steps,
        ml2_alpha=cfg.ml2_alpha,  # type: ignore[arg-type]
        ftl_alternations=cfg.ftl_alternations,
        ftl_classifier=cfg.ftl_classifier,
        seed=seed,
    )
    seed_torch(seed)
    model = build_method(name, tuple(x.shape[1:]), num_classes, counts, mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = int(cfg.epochs) * steps  # type: ignore[arg-type]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / max(total, 1)))
    )
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = progress(total=total, desc=desc or name, unit="step")

    def step(loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.update(1)

    fit = getattr(model, "fit", None)
    if fit is not None:  # methods with their own schedule (FTL's Algorithm 1), same budget
        seed_torch(seed)
        fit(x, y, total, cfg.batch_size, step)
    else:
        for _ in range(int(cfg.epochs)):  # type: ignore[arg-type]
            for idx in _batches(x.shape[0], cfg.batch_size, gen):
                loss = model.loss(x[idx], y[idx])
                step(loss)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")  # once per epoch
    bar.close()
    model.eval()
    return model


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_all(model: nn.Module, x: Tensor, batch_size: int = 1024) -> Tensor:
    """Embeddings of ``x`` in batches, computed on the model's device, returned on the CPU."""
    model.eval()
    dev = _device_of(model)
    return torch.cat(
        [model.embed(x[i : i + batch_size].to(dev)).cpu() for i in range(0, x.shape[0], batch_size)]
    )


@torch.no_grad()
def evaluate_method(
    model: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    eval_x: Tensor,
    eval_y: Tensor,
    head: Tensor,
) -> Tuple[Dict[str, float], Dict[str, List[float]], Tensor, Tensor]:
    """Every metric of :mod:`.metrics` for a trained model, split head/tail.

    Returns ``(scalars, per_class, train_embeddings, eval_embeddings)``.
    """
    num_classes = head.numel()
    f_train = embed_all(model, train_x)
    f_eval = embed_all(model, eval_x)
    dev = _device_of(model)
    logits = model.classify(f_eval.to(dev)).cpu()
    is_head_q = head[eval_y]
    out: Dict[str, float] = {}

    def put(prefix: str, d: Dict[str, float]) -> None:
        for k, v in d.items():
            out[f"{prefix}_{k}"] = v

    fc = M.correct_predictions(logits, eval_y)
    put("fc_acc", M.head_tail(fc, is_head_q))
    # head test samples the FC gives to a tail class ("fc_cross_head") and the reverse
    cross = M.head_tail(M.cross_group_predictions(logits, eval_y, head), is_head_q)
    # without test samples of the other group there is no other group to mistake it for: n/a, as
    # that group's own columns (a 0.0 read as "no confusion")
    if not bool((~is_head_q).any()):
        cross["head"] = math.nan
    if not bool(is_head_q.any()):
        cross["tail"] = math.nan
    put("fc_cross", cross)
    # the same FC against the class weights themselves (a LEAP head classifies with prototypes)
    fcw = M.correct_predictions(model.classify_weights(f_eval.to(dev)).cpu(), eval_y)
    put("fcw_acc", M.head_tail(fcw, is_head_q))
    nn_pred = M.nearest_center_predictions(f_eval, f_train, train_y, num_classes)
    put("nn_acc", M.head_tail((nn_pred == eval_y).float(), is_head_q))
    r1, ap, valid = M.retrieval_per_query(f_eval, eval_y)
    put("rank1", M.head_tail(r1, is_head_q, valid))
    put("map", M.head_tail(ap, is_head_q, valid))
    mean_tr, var_tr = M.angle_spread(f_train, train_y, num_classes)
    # test angles against the training centers (their own center is degenerate for 2 images)
    train_centers = M.class_centers(f_train, train_y, num_classes)
    mean_ev, var_ev = M.angle_spread(f_eval, eval_y, num_classes, centers=train_centers)
    norms = M.weight_norms(model.class_weight().detach().cpu())
    per_class_sets = {
        "angle_mean_train": mean_tr,
        "angle_var_train": var_tr,
        "angle_mean_test": mean_ev,
        "angle_var_test": var_ev,
        "weight_norm": norms,
    }
    per_class_sets.update({k: v.cpu().float() for k, v in model.per_class_diagnostics().items()})
    # a class without training images (an identity the split left out) has an untrained row:
    # no diagnostic of the classes that trained, so n/a here and outside the head / tail means
    trained = torch.bincount(train_y, minlength=num_classes) > 0
    for key, values in per_class_sets.items():
        per_class_sets[key] = values = values.masked_fill(~trained, float("nan"))
        put(key, M.head_tail(values, head))
    tested = torch.bincount(eval_y, minlength=num_classes)
    class_fc = torch.zeros(num_classes).index_add_(0, eval_y, fc) / tested.clamp_min(1)
    class_fc = class_fc.masked_fill(tested == 0, float("nan"))  # n/a without a test image
    per_class = {k: _floats(v) for k, v in per_class_sets.items()}
    per_class["fc_acc"] = _floats(class_fc)
    return out, per_class, f_train, f_eval


def _floats(t: Tensor) -> List[Optional[float]]:
    return [None if math.isnan(v) else float(v) for v in t.double().tolist()]


# ---------------------------------------------------------------------------------------------
# the whole run
# ---------------------------------------------------------------------------------------------


def projection_classes(split: LongTailSplit, k: int) -> List[int]:
    """The ``k`` largest head classes and the ``k`` first-ranked tail classes."""
    order = rank_classes_from_counts(split.total_counts)
    heads = [c for c in order if bool(split.head[c])][:k]
    tails = [c for c in order if not bool(split.head[c])][:k]
    return heads + tails


def rank_classes_from_counts(counts: Tensor) -> List[int]:
    return rank_classes(
        torch.repeat_interleave(torch.arange(counts.numel()), counts), counts.numel()
    ).tolist()


def run_demo(
    cfg: DemoConfig,
    data: Optional[LabeledData] = None,
    log=print,
    argv: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Run every method on every seed, write ``results.json`` (+ projection features) to
    ``cfg.out`` and render the report (tables, CSV, PNG). Returns the results dictionary.
    Every run starts from its seed; the caller's torch RNG state is restored afterwards.
    ``argv``: the command line ``results.json`` records (default ``sys.argv``)."""
    with torch.random.fork_rng(devices=[]):  # the demo trains on the CPU
        return _run_demo(cfg, data, log, sys.argv if argv is None else argv)


def _run_demo(
    cfg: DemoConfig, data: Optional[LabeledData], log, argv: Sequence[str]
) -> Dict[str, Any]:
    """:func:`run_demo` inside its RNG fork."""
    cfg = cfg.resolved()
    if data is not None:  # built by hand: refused before anything is written or trained
        check_data(data)
    check_writable(cfg.out)
    if cfg.data == "imagefolder":  # market1501 reads bounding_box_train/ only
        check_out_outside_data(cfg.out, cfg.path)
    start = time.perf_counter()
    if data is None:
        syn = SyntheticConfig(**cfg.synthetic) if cfg.data == "synthetic" else None
        data = load_data(cfg.data, cfg.path, image_size=cfg.image_size, synthetic=syn)
    data = drop_small_classes(data)
    if not 0 <= int(cfg.num_head) <= data.num_classes:  # checked before --out is created
        raise ValueError(
            f"-H {cfg.num_head}: {data.name} has {data.num_classes} identities with at least two "
            f"samples; choose -H in [0, {data.num_classes}]"
        )
    make_output_dir(cfg.out)
    runs: List[Dict[str, Any]] = []
    splits: Dict[str, Any] = {}
    projection: Dict[str, np.ndarray] = {}
    labels = {m: method_label(m, MethodConfig(leap_margin=cfg.leap_margin)) for m in cfg.methods}
    log(
        f"feature-cloud demo: data={data.name} ({data.x.shape[0]} samples, {data.num_classes} "
        f"identities), <H{cfg.num_head}, S{cfg.tail_shots}>, seeds={cfg.seeds}, "
        f"methods={cfg.methods}, epochs={cfg.epochs}, evaluated on the {cfg.eval_split} split"
    )
    for seed in cfg.seeds:
        split = long_tail_split(
            data.y,
            data.num_classes,
            int(cfg.num_head),
            int(cfg.tail_shots),  # type: ignore[arg-type]
            test_fraction=cfg.test_fraction,
            val_fraction=cfg.val_fraction,
            seed=seed,
        )
        splits[str(seed)] = dict(
            split.summary(), train_counts=split.train_counts.tolist(), head=split.head.tolist()
        )
        eval_idx = split.test if cfg.eval_split == "test" else split.val
        tx, ty = data.x[split.train], data.y[split.train]
        ex, ey = data.x[eval_idx], data.y[eval_idx]
        shown = projection_classes(split, cfg.projection_classes)
        if seed == cfg.seeds[0]:
            projection["classes"] = np.array(shown)
            projection["is_head"] = split.head.numpy()[shown]
        for name in cfg.methods:
            t0 = time.perf_counter()
            model = train_method(
                name,
                tx,
                ty,
                data.num_classes,
                split.train_counts,
                cfg,
                seed,
                desc=f"seed {seed} {name}",
            )
            train_s = time.perf_counter() - t0
            scalars, per_class, f_tr, f_ev = evaluate_method(model, tx, ty, ex, ey, split.head)
            runs.append(
                {
                    "seed": seed,
                    "method": name,
                    "metrics": scalars,
                    "per_class": per_class,
                    "train_seconds": round(train_s, 2),
                }
            )
            log(
                f"  seed {seed} {labels[name]:<28} FC acc head {100 * scalars['fc_acc_head']:5.1f} "
                f"tail {100 * scalars['fc_acc_tail']:5.1f} | rank-1 head "
                f"{100 * scalars['rank1_head']:5.1f} tail {100 * scalars['rank1_tail']:5.1f} "
                f"({train_s:.1f} s)"
            )
            if seed == cfg.seeds[0]:
                for part, f, yy in (("train", f_tr, ty), ("eval", f_ev, ey)):
                    rows = torch.isin(yy, torch.tensor(shown))
                    projection[f"{name}/{part}_features"] = f[rows].numpy().astype(np.float32)
                    projection[f"{name}/{part}_labels"] = yy[rows].numpy()
    from ..evaluate.environment import environment  # evaluate imports this module

    results = {
        "version": 1,
        # + the FTL stage-0 share the demo's methods use (MethodConfig's; no demo option)
        "config": dict(asdict(cfg), ftl_stage0_fraction=MethodConfig.ftl_stage0_fraction),
        "data": {
            "name": data.name,
            "samples": int(data.x.shape[0]),
            "num_classes": data.num_classes,
            "input_shape": list(data.x.shape[1:]),
            "class_names": data.class_names,
            "info": _jsonable(data.info),
        },
        "splits": splits,
        "class_counts": {
            "total": torch.bincount(data.y, minlength=data.num_classes).tolist(),
        },
        "methods": list(cfg.methods),
        "labels": labels,
        "runs": runs,
        # what a rerun needs (as evaluate's): the command line and the environment's versions,
        # git revision, platform, threads and numerics flags; the load average (and timings) differ
        "argv": [str(a) for a in argv],
        "environment": dict(environment("cpu"), cpu_count=os.cpu_count(), loadavg_start=_loadavg()),
    }
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["environment"]["loadavg_end"] = _loadavg()
    write_json(results, os.path.join(cfg.out, RESULTS_FILE))
    np.savez_compressed(os.path.join(cfg.out, PROJECTION_FILE), **projection)
    render_report(cfg.out, log=log)
    return results


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
