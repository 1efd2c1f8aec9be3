"""FTL vs the same Enc/R/FC(+Dec) model trained as long without transfer, on real faces.

Development benchmark for issue 16 (not part of ``make test``): reads ``lfw_dev_64px.npz`` from
``../shared/data`` (never copied into the repository), builds the natural long tail (``--test-per-id``
test images per identity, head = more than ``T`` training images) or an ``<H, S>`` split of it (the
same head identities keep all their training images, every tail identity keeps ``S``), and trains a
small 4-block CNN ``Enc`` + ``Dec`` + ``R`` + bias-free linear ``FC`` with FTL (Algorithm 1) and,
paired (same seed, same initial weights, same optimiser steps), without transfer.

Prints one JSON line per run with head / tail FC accuracy and nearest-neighbour accuracy.

    python benchmarks/ftl_real.py --setting natural --seed 0 --variant ftl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from feature_cloud import FeatureTransfer
from feature_cloud.ftl import AlternatingScheduler, ConvDecoder, FTLModel, make_filter

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "lfw_dev_64px.npz")


# ----------------------------------------------------------------------------------- data
def load(path: str, size: int) -> tuple[Tensor, Tensor]:
    d = np.load(path)
    x = torch.from_numpy(d["images"]).permute(0, 3, 1, 2).float() / 255.0
    if size != x.shape[-1]:
        x = F.adaptive_avg_pool2d(x, size)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x, torch.from_numpy(d["labels"]).long()


def split(
    labels: Tensor, setting: str, seed: int, test_per_id: int, threshold: int
) -> Dict[str, Tensor]:
    """Natural long tail or <H, S>: test = ``test_per_id`` random images per identity; head =
    identities with more than ``threshold`` training images in the natural split."""
    rng = np.random.default_rng(1000 + seed)
    c = int(labels.max()) + 1
    train, test = [], []
    counts = torch.zeros(c, dtype=torch.long)
    lab = labels.numpy()
    natural_counts = np.bincount(lab, minlength=c) - test_per_id
    head = torch.from_numpy(natural_counts > threshold)
    shots = None if setting == "natural" else int(setting.lstrip("S"))
    for k in range(c):
        idx = rng.permutation(np.flatnonzero(lab == k))
        test.append(idx[:test_per_id])
        pool = idx[test_per_id:]
        if shots is not None and not head[k]:
            pool = pool[:shots]
        train.append(pool)
        counts[k] = len(pool)
    return {
        "train": torch.from_numpy(np.sort(np.concatenate(train))),
        "test": torch.from_numpy(np.sort(np.concatenate(test))),
        "head": head,
        "counts": counts,
    }


# ----------------------------------------------------------------------------------- model
class Enc(nn.Module):
    """Four 3x3 conv blocks (32-64-128-256, strides 1-2-2-2), average pooling, linear + BN -> g."""

    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        w = width
        self.features = nn.Sequential(
            block(3, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 4 * w, 2),
            block(4 * w, 8 * w, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.out = nn.Sequential(nn.Linear(8 * w, dim), nn.BatchNorm1d(dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x))


def build(num_classes: int, size: int, dim: int, counts: Tensor, a: argparse.Namespace) -> FTLModel:
    ch = tuple(int(v) for v in a.dec_ch.split(","))
    decoder = (
        ConvDecoder(dim, (3, size, size), channels=ch, base=max(2, size // 4))
        if a.alpha_recon > 0
        else None
    )
    kw: Dict[str, Any] = {}
    if a.components:
        kw["num_components"] = a.components
    elif a.energy:
        kw["energy"] = a.energy
    transfer = FeatureTransfer(
        dim, num_classes, tail_threshold=a.threshold, class_counts=counts, **kw
    )
    return FTLModel(
        Enc(dim, a.width),
        nn.Linear(dim, num_classes, bias=False),
        feature_dim=dim,
        filter_net=make_filter(dim, dim, 2 * dim),
        decoder=decoder,
        alpha_recon=a.alpha_recon,
        alpha_reg=a.alpha_reg,
        transfer=transfer,
    )


# ----------------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(model: FTLModel, x: Tensor, y: Tensor, sp: Dict[str, Tensor]) -> Dict[str, float]:
    model.eval()
    f = torch.cat([model(x[i : i + 512]) for i in range(0, x.shape[0], 512)])
    tr, te = sp["train"], sp["test"]
    pred_fc = model.logits(f[te]).argmax(1)
    fn = F.normalize(f, dim=1)
    pred_nn = y[tr][(fn[te] @ fn[tr].T).argmax(1)]
    yt = y[te]
    head = sp["head"][yt]
    out = {}
    for name, pred in (("fc", pred_fc), ("nn", pred_nn)):
        ok = (pred == yt).float()
        out[f"{name}_head"] = 100 * float(ok[head].mean())
        out[f"{name}_tail"] = 100 * float(ok[~head].mean())
        out[f"{name}_all"] = 100 * float(ok.mean())
    w = model.classifier.weight.norm(dim=1)
    out["wnorm_head"] = float(w[sp["head"]].mean())
    out["wnorm_tail"] = float(w[~sp["head"]].mean())
    model.train()
    return out


# ----------------------------------------------------------------------------------- train
def run(a: argparse.Namespace) -> Dict[str, Any]:
    torch.set_num_threads(1)
    t0 = time.time()
    x, y = load(a.data, a.size)
    sp = split(y, a.setting, a.seed, a.test_per_id, a.threshold)
    tr = sp["train"]
    xtr, ytr = x[tr], y[tr]
    n, c = xtr.shape[0], int(y.max()) + 1
    counts = torch.bincount(ytr, minlength=c)
    torch.manual_seed(a.seed)
    model = build(c, a.size, a.dim, counts, a)
    if a.opt == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=a.wd
        )
    else:
        opt = torch.optim.Adam(model.parameters(), lr=a.lr, weight_decay=a.wd)
    steps_per_epoch = n // a.batch
    total = a.epochs * steps_per_epoch
    stage0 = int(round(a.warm * total)) if a.variant != "base" else total
    pairs = a.alternations
    stage_iters = max(1, (total - stage0) // (2 * pairs)) if a.variant != "base" else 1
    if a.variant != "base":
        stage0 = total - 2 * pairs * stage_iters
    gen = torch.Generator().manual_seed(a.seed)

    def aug(xb: Tensor) -> Tensor:
        m = torch.rand(xb.shape[0], generator=gen) < 0.5
        return torch.where(m[:, None, None, None], xb.flip(-1), xb)

    def lr_at(step: int, stage: int) -> float:
        if a.opt == "sgd":  # one-cycle as torch's OneCycleLR (pct_start 0.15, cosine annealing)
            up = int(0.15 * total)
            if step < up:
                base = a.lr / 25 + (a.lr - a.lr / 25) * 0.5 * (
                    1 - math.cos(math.pi * step / max(up, 1))
                )
            else:
                t = (step - up) / max(total - up, 1)
                base = a.lr / 25 / 1e4 + (a.lr - a.lr / 25 / 1e4) * 0.5 * (
                    1 + math.cos(math.pi * t)
                )
        else:
            base = a.lr * 0.5 * (1 + math.cos(math.pi * step / total))
        return base * (a.lr12 if stage in (1, 2) else 1.0)

    sched = AlternatingScheduler(
        model, stage0_iters=stage0, stage_iters=stage_iters, max_alternations=pairs, seed=a.seed
    )
    stats_log = []
    step = 0
    idx_all = torch.arange(n)
    while step < total:
        stage = sched.stage
        if sched.needs_stats:
            chunks = [idx_all[i : i + 512] for i in range(0, n, 512)]
            s = sched.update_stats([(xtr[j], ytr[j], j) for j in chunks])
            ft = model.feature_transfer
            # transfer magnitude vs tail scale (diagnostics for hypothesis "transfer magnitude")
            with torch.no_grad():
                model.eval()
                g = torch.cat([model.encode(xtr[i : i + 512]) for i in range(0, n, 512)])
                model.train()
                sched.apply()
                res = g - ft.centers[ytr]
                reg = ft.regular[ytr]
                proj = res @ ft.basis
                cen = ft.centers
                tail_c = ~ft.regular
                d_tail = torch.cdist(cen[tail_c], cen[tail_c])
                d_tail.fill_diagonal_(float("inf"))
                s.update(
                    reg_resid=float(res[reg].norm(dim=1).mean()),
                    reg_resid_proj=float(proj[reg].norm(dim=1).mean()),
                    tail_resid=float(res[~reg].norm(dim=1).mean()),
                    tail_nn_center_dist=float(d_tail.min(1).values.mean()),
                    hard_resid=float(res[ft.hard_indices].norm(dim=1).mean()),
                )
            s["step"] = step
            stats_log.append(
                {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in s.items()
                    if not isinstance(v, torch.Tensor)
                }
            )
        if stage == 1:
            hs = iter(sched.hard_sampler(a.batch)) if a.regular == "hard" else None
            ts = iter(sched.tail_sampler(a.batch))
        else:
            ds = iter(sched.data_sampler(n, a.batch))
        while True:
            for g_ in opt.param_groups:
                g_["lr"] = lr_at(step, stage)
            if stage == 1:
                bt = torch.tensor([next(ts) for _ in range(a.batch)])
                if hs is not None:
                    br = torch.tensor([next(hs) for _ in range(a.batch)])
                else:
                    regpool = torch.nonzero(model.feature_transfer.regular[ytr]).flatten()
                    br = regpool[torch.randint(regpool.numel(), (a.batch,), generator=gen)]
                loss = stage1_loss(model, sched, aug(xtr[br]), ytr[br], aug(xtr[bt]), ytr[bt], a)
            else:
                j = torch.tensor([next(ds) for _ in range(a.batch)])
                loss = model.loss(aug(xtr[j]), ytr[j])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            nxt = sched.step()
            if nxt != stage or step >= total or sched.finished:
                break
        if sched.finished:
            break
    model.set_frozen(())
    res = evaluate(model, x, y, sp)
    res.update(
        setting=a.setting,
        seed=a.seed,
        variant=a.variant,
        tag=a.tag,
        epochs=a.epochs,
        steps=step,
        stage0=stage0,
        stage_iters=stage_iters,
        secs=round(time.time() - t0, 1),
        stats=stats_log,
        n_train=n,
        head_classes=int(sp["head"].sum()),
    )
    return res


def run_method(a: argparse.Namespace) -> Dict[str, Any]:
    """The shipped FTL method (:class:`feature_cloud.demo.methods.FTLMethod`, its defaults) vs the
    same model trained by its stage-0 loss only, with an SGD one-cycle schedule and random flips
    like ``feature-cloud evaluate``."""
    from feature_cloud.demo.methods import FTLMethod, MethodConfig

    torch.set_num_threads(1)
    t0 = time.time()
    x, y = load(a.data, a.size)
    sp = split(y, a.setting, a.seed, a.test_per_id, a.threshold)
    xtr, ytr = x[sp["train"]], y[sp["train"]]
    n, c = xtr.shape[0], int(y.max()) + 1
    counts = torch.bincount(ytr, minlength=c)
    steps_per_epoch = n // a.batch
    total = a.epochs * steps_per_epoch
    cfg = MethodConfig(
        embedding_size=a.dim,
        tail_threshold=a.threshold,
        warmup_steps=int(round(total / 3)),
        ml2_alpha=a.alpha_reg,
        seed=a.seed,
    )
    if a.paper_schedule:  # the previous rule: stage 0 = the LEAP warm-up (a third), 2 alternations
        cfg.ftl_stage0_fraction, cfg.ftl_alternations = None, 2
    torch.manual_seed(a.seed)
    backbone = Enc(a.dim, a.width)
    backbone.input_shape = (3, a.size, a.size)
    method = FTLMethod(backbone, (3, a.size, a.size), c, counts, cfg)
    opt = torch.optim.SGD(
        method.parameters(), lr=a.lr, momentum=0.9, nesterov=True, weight_decay=a.wd
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=a.lr, total_steps=max(total, 2), pct_start=0.15
    )
    gen = torch.Generator().manual_seed(a.seed)
    done = [0]

    def step(loss: Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if done[0] < total:
            sched.step()
        done[0] += 1

    def augment(xb: Tensor) -> Tensor:
        m = torch.rand(xb.shape[0], generator=gen) < 0.5
        return torch.where(m[:, None, None, None], xb.flip(3), xb)

    method.train()
    if a.variant == "ftl":
        torch.manual_seed(a.seed)
        method.fit(xtr, ytr, total, a.batch, step, augment=augment)
    else:
        while done[0] < total:
            for idx in torch.randperm(n, generator=gen).split(a.batch):
                if idx.numel() < a.batch or done[0] >= total:
                    continue
                step(method.loss(augment(xtr[idx]), ytr[idx]))
    res = evaluate(method.ftl, x, y, sp)
    res.update(
        setting=a.setting,
        seed=a.seed,
        variant=a.variant,
        tag=a.tag,
        epochs=a.epochs,
        steps=done[0],
        secs=round(time.time() - t0, 1),
        stats=[],
        n_train=n,
        head_classes=int(sp["head"].sum()),
        engine="method",
        stage0_fraction=cfg.ftl_stage0_fraction,
        alternations=cfg.ftl_alternations,
    )
    return res


def stage1_loss(
    model: FTLModel,
    sched: AlternatingScheduler,
    xr: Tensor,
    yr: Tensor,
    xt: Tensor,
    yt: Tensor,
    a: argparse.Namespace,
) -> Tensor:
    with torch.no_grad():
        gr = model.encode(xr)
        gt = model.encode(xt)
    n = int(round(a.share * gr.shape[0]))
    ft = model.feature_transfer
    parts_g, parts_y = [], []
    if a.use_regular:
        parts_g.append(gr)
        parts_y.append(yr)
    parts_g.append(gt)
    parts_y.append(yt)
    if a.variant == "ftl" and n > 0:
        gx = ft.centers[yt[:n]] + a.scale * ((gr[:n] - ft.centers[yr[:n]]) @ ft.basis) @ ft.basis.T
        parts_g.append(gx)
        parts_y.append(yt[:n])
    if a.bn == "concat":
        return model.feature_loss(torch.cat(parts_g), torch.cat(parts_y))["loss"]
    if a.bn == "eval":  # R's BatchNorm uses its running statistics (from real batches) in stage 1
        model.filter.eval()
        out = model.feature_loss(torch.cat(parts_g), torch.cat(parts_y))["loss"]
        model.filter.train()
        return out
    # "real": BN batch statistics from the real rows only, applied to all rows
    g = torch.cat(parts_g)
    yy = torch.cat(parts_y)
    nreal = sum(p.shape[0] for p in parts_g[: (2 if a.use_regular else 1)])
    return model.classification_loss(_filter_real_stats(model.filter, g, nreal), yy)["loss"]


def _filter_real_stats(filt: nn.Sequential, g: Tensor, nreal: int) -> Tensor:
    h = g
    for m in filt:
        if isinstance(m, nn.BatchNorm1d):
            real = h[:nreal]
            mu, var = real.mean(0), real.var(0, unbiased=False)
            with torch.no_grad():
                mom = m.momentum or 0.1
                m.running_mean.mul_(1 - mom).add_(mom * mu)
                m.running_var.mul_(1 - mom).add_(mom * real.var(0, unbiased=True))
            h = (h - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias
        else:
            h = m(h)
    return h


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=DATA)
    p.add_argument("--setting", default="natural", help="natural | S1 | S2 | S3 | S5")
    p.add_argument(
        "--variant",
        default="ftl",
        choices=["base", "ftl", "alt"],
        help="base: stage 0 only (no transfer); ftl: Algorithm 1; alt: Algorithm 1 without the transferred batch",
    )
    p.add_argument("--tag", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--width", type=int, default=32, help="Enc width (32-64-128-256 at 32)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--opt", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--dec-ch", default="32,16", help="ConvDecoder channels")
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument(
        "--lr12", type=float, default=1.0, help="lr multiplier in stages 1-2 (paper 1e-5/2e-4=0.05)"
    )
    p.add_argument("--warm", type=float, default=1 / 3, help="stage-0 share of the steps")
    p.add_argument("--alternations", type=int, default=2)
    p.add_argument("--alpha-reg", type=float, default=0.01)
    p.add_argument("--alpha-recon", type=float, default=1.0)
    p.add_argument("--threshold", type=int, default=20)
    p.add_argument("--test-per-id", type=int, default=2)
    p.add_argument("--share", type=float, default=1.0, help="transferred rows per tail-batch row")
    p.add_argument(
        "--scale", type=float, default=1.0, help="multiplier of the transferred residual"
    )
    p.add_argument("--components", type=int, default=0)
    p.add_argument("--energy", type=float, default=0.0)
    p.add_argument("--regular", default="hard", choices=["hard", "all"])
    p.add_argument("--use-regular", type=int, default=1)
    p.add_argument("--bn", default="concat", choices=["concat", "eval", "real"])
    p.add_argument(
        "--engine",
        default="script",
        choices=["script", "method"],
        help="method: the shipped FTLMethod with its defaults (variants ftl / base only)",
    )
    p.add_argument(
        "--paper-schedule",
        action="store_true",
        help="engine=method: the previous schedule (stage 0 a third, 2 alternations)",
    )
    a = p.parse_args(argv)
    print(json.dumps(run_method(a) if a.engine == "method" else run(a)), flush=True)


if __name__ == "__main__":
    main()
