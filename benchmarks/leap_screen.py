"""Screen LEAP cloud variants against the cloud-off head on real images, paired by seed.

The exploration behind the LEAP defaults (README, "Real faces"): the evaluation tool's own split,
backbone, optimiser and batch order (:mod:`feature_cloud.evaluate.runner`), one JSON line per run
(all metrics of :func:`feature_cloud.demo.runner.evaluate_method`), many cloud variants per seed
without re-running the baseline for each::

    python benchmarks/leap_screen.py DATA.npz --epochs 30 --seeds 0 1 --out nat.jsonl \\
        --variants base:none full_paper:full full_margin3:full:cloud_mode=margin,cloud_scale=3
    python benchmarks/leap_screen.py DATA.npz --protocol hs -S 5 ... --out s5.jsonl --variants ...
    python benchmarks/leap_screen.py --summary nat.jsonl s5.jsonl

A variant is ``name:rule[:key=value,...]``: ``rule`` ``none`` (the baseline, cloud off), ``full``
or ``vanilla``, one of the not-adopted rules of :data:`EXPERIMENTAL_RULES` (screened on real faces,
README "Real faces"; they replace the head's cloud for that variant only), or the name of an
evaluation method (e.g. ``ftl_base``, ``ftl``); the options go to
``LEAPMarginHead`` (``margin_type=arcface`` picks the margin; ``cfg.<field>`` sets an
:class:`~feature_cloud.evaluate.runner.EvalConfig` field). Variants named ``base`` or ``ftl_base``
are the baselines of ``--summary``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import statistics
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

import feature_cloud.functional as FC
import feature_cloud.heads as H
from feature_cloud.demo._progress import set_progress
from feature_cloud.demo.methods import _margin
from feature_cloud.demo.runner import evaluate_method
from feature_cloud.evaluate import methods as EM
from feature_cloud.evaluate.data import load_dataset
from feature_cloud.evaluate.runner import EvalConfig, _normalise, make_split, train_model
from feature_cloud.statistics import ClassStatistics

BASES = ("base", "ftl_base")
METRICS = (
    "fc_acc_tail",
    "fc_acc_head",
    "fcw_acc_tail",
    "fcw_acc_head",
    "nn_acc_tail",
    "nn_acc_head",
)


# ---------------------------------------------------------------- experimental (not adopted) rules
# Each is (cloud variance of a ClassStatistics, per-row target angle from (std, mode, noise), head
# logits); the variant trains a full-rule margin head (use cloud_scale=1 with the deterministic
# shifts).


def _hybrid_variance(stats: ClassStatistics) -> Tensor:
    """Tail classes (K_i <= T) the vanilla cloud (Eq. 6), head classes the full-rule one (Eq. 9)."""
    _, var, has = stats.angle_moments()
    prior = FC.unknown_variance_prior(
        stats.unknown_variance, has, stats.memory_capacity, stats.class_counts
    )
    van = FC.vanilla_cloud_variance(var, has, stats.class_counts, stats.tail_threshold, prior)
    full = FC.full_cloud_variance(var, has, stats.class_counts, prior)
    return torch.where(stats.class_counts > stats.tail_threshold, full, van)


def _mean_shift_variance(reference: str) -> Callable[[ClassStatistics], Tensor]:
    """Squared shift ``max(mu_ref - mu_i, 0)`` of the angular *mean* (not the variance):
    ``mu_ref`` the mean over head classes (tail classes only shift, ``"head"``) or the
    ``(K_i - 1)``-weighted mean over all classes (``"pooled"``)."""

    def variance(stats: ClassStatistics) -> Tensor:
        mu, _, has = stats.angle_moments()
        k = stats.class_counts
        head = k > stats.tail_threshold
        if reference == "head":
            use = head & has
            ref = (mu * use).sum() / use.sum().clamp_min(1)
            shift = torch.where(head, torch.zeros_like(mu), (ref - mu).clamp_min(0))
        else:
            w = (k.to(mu.dtype) - 1).clamp_min(0) * has
            shift = ((w * mu).sum() / w.sum().clamp_min(1e-12) - mu).clamp_min(0)
        shift = torch.where(has, shift, torch.zeros_like(shift))
        return shift * shift

    return variance


def _expected_angle(std: Tensor, mode: str, generator: Any = None, noise: Any = None) -> Tensor:
    """The margin cloud's expectation ``E|alpha| = std * sqrt(2 / pi)``: no draw."""
    return std * math.sqrt(2.0 / math.pi)


def _fixed_angle(std: Tensor, mode: str, generator: Any = None, noise: Any = None) -> Tensor:
    """The cloud ``std`` itself as a deterministic per-class angle."""
    return std


_CosineRule = Callable[[Any, Tensor, Tensor, Tensor, Tensor, Dict[str, Any]], Tensor]


def _on_cosines(rule: _CosineRule) -> Callable[..., Tensor]:
    """Head logits (the signature of :func:`feature_cloud.heads.cloud_margin_logits`) that are the
    package's until the cloud starts, then ``rule(cloud, cos, labels, std, key, margin_kwargs)``
    on the plain cosine matrix."""

    def logits(
        cloud: Any,
        embeddings: Tensor,
        weight: Tensor,
        labels: Tensor,
        draw: Tuple[Optional[Tensor], Optional[Tensor]],
        **kw: Any,
    ) -> Tensor:
        std, key = draw
        if std is None or key is None:
            return _package_logits(cloud, embeddings, weight, labels, draw, **kw)
        cos = FC.cosine_logits(*FC.common_float(embeddings, weight))
        margin = {k: kw[k] for k in ("margin_type", "scale", "margin")}
        return rule(cloud, cos, labels, std, key, margin)

    return logits


def _negative_side(with_target: bool, sign: float = -1.0) -> Callable[..., Tensor]:
    """Logits with the class's cloud on the *negative* side as well: a sample of class ``n``
    sees every other class ``j`` at the angle ``theta_nj - E|alpha_j|`` (the nearest point of a
    cloud of std ``sigma_j`` around ``W_j``, in expectation), so other classes' samples are pushed
    out of a tail class's missing spread; with ``sign=+1`` at ``theta_nj + E|alpha_j|`` instead
    (an easier negative, the direction of the logit-adjusted loss); ``with_target`` keeps the
    default target-angle cloud, else the target gets the plain margin. Runs on the reference
    pipeline (``impl="reference"``)."""

    def rule(
        cloud: Any, cos: Tensor, labels: Tensor, std: Tensor, key: Tensor, margin: Dict[str, Any]
    ) -> Tensor:
        spread = (cloud.statistics.cloud_variance().sqrt() * cloud.scale).to(cos.dtype)
        alpha = (sign * math.sqrt(2.0 / math.pi) * spread).unsqueeze(0).expand_as(cos).clone()
        target = torch.zeros_like(std)
        if with_target:
            target = FC.target_cloud_angles(std, cloud.mode, noise=cloud.row_noise(key, std))
        alpha.scatter_(1, labels.clamp_min(0).unsqueeze(1), target.to(cos.dtype).unsqueeze(1))
        return FC.margin_logits(cos, labels, alpha=alpha, **margin)

    return _on_cosines(rule)


def _logit_adjusted(tau: float) -> Callable[..., Tensor]:
    """A reference point, not a cloud: once the cloud would start, the margin logits without
    cloud plus ``tau * log(K_j / N)`` on every class ``j`` (the logit-adjusted loss of Menon et
    al.): how much a class-prior margin moves the tail at the same budget."""

    def rule(
        cloud: Any, cos: Tensor, labels: Tensor, std: Tensor, key: Tensor, margin: Dict[str, Any]
    ) -> Tensor:
        z = FC.margin_logits(cos, labels, **margin)
        k = cloud.statistics.class_counts.to(z.dtype)
        return z + tau * torch.log(k / k.sum()).unsqueeze(0)

    return _on_cosines(rule)


_package_logits = H.cloud_margin_logits
_Rule = Tuple[
    Optional[Callable[[ClassStatistics], Tensor]],
    Optional[Callable[..., Tensor]],
    Optional[Callable[..., Tensor]],
]

#: rule -> (cloud variance, target angle, head logits); ``None`` keeps the package's. A rule
#: with its own logits runs the head on the reference pipeline.
EXPERIMENTAL_RULES: Dict[str, _Rule] = {
    "expected": (None, _expected_angle, None),  # full rule, margin = E|alpha|
    "mean_head": (_mean_shift_variance("head"), _fixed_angle, None),
    "mean_pooled": (_mean_shift_variance("pooled"), _fixed_angle, None),
    "hybrid": (_hybrid_variance, None, None),
    "negative": (None, None, _negative_side(with_target=True)),  # target and negative side
    "negative_only": (None, None, _negative_side(with_target=False)),
    "negative_easy": (None, None, _negative_side(with_target=True, sign=1.0)),
    "logit_adjusted": (None, None, _logit_adjusted(1.0)),  # reference: no cloud, log prior
    "logit_adjusted_half": (None, None, _logit_adjusted(0.5)),
}


@contextlib.contextmanager
def experimental_rule(rule: str) -> Iterator[None]:
    """Replace the cloud variance / target angle / logits by ``EXPERIMENTAL_RULES[rule]`` in the block
    (a ``rule`` not in it changes nothing); the package's functions are restored on exit."""
    variance, angle, logits = EXPERIMENTAL_RULES.get(rule, (None, None, None))
    saved = ClassStatistics.cloud_variance, FC.target_cloud_angles, H.cloud_margin_logits
    try:
        if variance is not None:
            ClassStatistics.cloud_variance = variance  # type: ignore[method-assign,assignment]
        if angle is not None:
            FC.target_cloud_angles = angle  # type: ignore[assignment]
        if logits is not None:
            H.cloud_margin_logits = logits
        yield
    finally:
        ClassStatistics.cloud_variance, FC.target_cloud_angles, H.cloud_margin_logits = saved  # type: ignore[method-assign]


def _options(text: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for kv in text.split(",") if text else []:
        key, value = kv.split("=")
        try:
            out[key] = float(value) if ("." in value or "e" in value) else int(value)
        except ValueError:
            out[key] = None if value == "None" else value  # e.g. prototype_shrinkage=None
    return out


def screen(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    set_progress(False)
    size = (a.size, a.size)
    data = load_dataset(a.data, size)
    for seed in a.seeds:
        base_cfg = EvalConfig(protocol=a.protocol, shots=a.S, epochs=a.epochs)
        split = make_split(base_cfg, data, seed)
        x = _normalise(data.x, split.train)
        tx, ty, ex, ey = x[split.train], data.y[split.train], x[split.test], data.y[split.test]
        for variant in a.variants:
            name, rule, *rest = variant.split(":")
            opts = _options(rest[0] if rest else "")
            fields = {k[4:]: opts.pop(k) for k in list(opts) if k.startswith("cfg.")}
            cfg = EvalConfig(
                protocol=a.protocol, shots=a.S, epochs=a.epochs, backbone=a.backbone, **fields
            )
            if rule in EM.EVAL_METHODS:
                key = rule
            else:
                key = f"_screen_{name}"
                margin = opts.pop("margin_type", "cosface")
                head_rule = "full" if rule in EXPERIMENTAL_RULES else rule
                if EXPERIMENTAL_RULES.get(rule, (None, None, None))[2] is not None:
                    opts.setdefault("impl", "reference")
                EM.EVAL_METHODS[key] = _margin(margin, None if rule == "none" else head_rule)
            cfg.leap_options = opts
            t0 = time.time()
            try:
                with experimental_rule(rule):
                    model = train_model(
                        key, tx, ty, data.num_classes, split.train_counts, cfg, seed
                    )
                    scalars = evaluate_method(model, tx, ty, ex, ey, split.head)[0]
            finally:  # the package's registry holds its own methods only
                if key.startswith("_screen_"):
                    EM.EVAL_METHODS.pop(key, None)
            row = dict(
                setting=a.protocol if a.protocol == "natural" else f"S{a.S}",
                seed=seed,
                variant=name,
                epochs=a.epochs,
                size=a.size,
                seconds=round(time.time() - t0),
                **scalars,
            )
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def summary(files: List[str]) -> str:
    """Markdown: per setting and variant, the mean paired difference (points) to the baseline of
    the same seed, setting, epochs and size, and the per-seed tail differences."""
    rows = [json.loads(line) for f in files for line in open(f)]
    base = {
        (r["setting"], r["seed"], r["epochs"], r["size"]): r for r in rows if r["variant"] in BASES
    }
    diffs: Dict[tuple, List[List[float]]] = collections.defaultdict(list)
    for r in rows:
        b = base.get((r["setting"], r["seed"], r["epochs"], r["size"]))
        if r["variant"] in BASES or b is None:
            continue
        key = (r["setting"], r["epochs"], r["variant"])
        # FC(W): FC against the class weights (rows written before it existed: nan)
        diffs[key].append([100 * (r.get(k, math.nan) - b.get(k, math.nan)) for k in METRICS])
    lines = [
        "| setting | epochs | variant | seeds | Δ FC tail | Δ FC head | Δ FC(W) tail | Δ FC(W) head "
        "| Δ NN tail | Δ NN head | Δ FC tail per seed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(diffs):
        v = diffs[key]
        means = [statistics.mean(c) for c in zip(*v)]
        per_seed = ", ".join(f"{d[0]:+.1f}" for d in v)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {len(v)} | "
            + " | ".join(f"{m:+.1f}" for m in means)
            + f" | {per_seed} |"
        )
    return "\n".join(lines)


def main(argv: Any = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", help=".npz or image folder")
    p.add_argument("--protocol", default="natural", choices=("natural", "hs"))
    p.add_argument("-S", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--backbone", default="conv4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=[])
    p.add_argument("--out", default="screen.jsonl")
    p.add_argument("--summary", nargs="+", metavar="JSONL", help="print the paired table")
    a = p.parse_args(argv)
    if a.summary:
        print(summary(a.summary))
        return
    if not a.data or not a.variants:
        p.error("give DATA and --variants (or --summary FILES)")
    screen(a)


if __name__ == "__main__":
    main()
