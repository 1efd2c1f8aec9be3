"""Evaluation metrics of the demo, split into head and tail identities.

* closed-set classifier accuracy (FTL's "FC" evaluation) and nearest-class-center accuracy
  (FTL's "NN": centers of the training features as gallery),
* leave-one-out retrieval on the test set with cosine similarity: rank-1 and average precision
  per query (the re-ID metrics, LEAP Sec. 4.1),
* intra-class angular spread: per class, the mean and variance of the angle between each
  feature and the class center (the LEAP paper's head-vs-tail observation, Sec. 1),
* classifier weight norm per class (FTL Sec. 3.1, Fig. 1b).

All functions take CPU tensors and return per-sample or per-class tensors; :func:`group_mean`
reduces them over head or tail classes, :func:`aggregate` a run's metrics over its seeds.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "correct_predictions",
    "nearest_center_predictions",
    "retrieval_per_query",
    "angle_spread",
    "class_centers",
    "weight_norms",
    "group_mean",
    "head_tail",
    "cross_group_predictions",
    "verification_tar",
    "aggregate",
]


def correct_predictions(logits: Tensor, labels: Tensor) -> Tensor:
    """``(N,)`` float 0/1: whether the arg-max class of each row is its label."""
    return (logits.argmax(dim=1) == labels).float()


def cross_group_predictions(logits: Tensor, labels: Tensor, is_head_class: Tensor) -> Tensor:
    """``(N,)`` float 0/1: whether the arg-max class of each row lies in the other group than its
    label (a head-class sample classified as some tail class, or the reverse); ``is_head_class``
    ``(C,)`` bool. Where a tail gain costs head accuracy, the head samples taken by tail classes
    show it."""
    pred = logits.argmax(dim=1)
    return (is_head_class[pred] != is_head_class[labels]).float()


def verification_tar(
    features: Tensor, labels: Tensor, fars: Sequence[float], camids: Optional[Tensor] = None
) -> Dict[float, float]:
    """1:1 verification over every pair of ``features`` (cosine similarity): for each false
    accept rate ``far``, the share of same-identity pairs scoring above the threshold that
    accepts at most ``far`` of the different-identity pairs (above the
    ``floor(far * n_neg) + 1``-th highest negative score). With ``camids``, same-identity pairs
    from one camera are left out (re-ID). NaN without a positive pair, or with fewer than
    ``1 / far`` negative pairs (that false accept rate cannot be measured on them)."""
    f = F.normalize(features.double(), dim=1)
    n = f.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    sim = (f @ f.T)[i, j]  # n x n, not an (n^2 / 2, D) gather
    same = labels[i] == labels[j]
    pos = same if camids is None else same & (camids[i] != camids[j])
    neg_scores, pos_scores = sim[~same], sim[pos]
    out: Dict[float, float] = {}
    for far in fars:
        if not 0.0 < far < 1.0:
            raise ValueError(f"far must be in (0, 1), got {far}")
        accepted = math.floor(far * neg_scores.numel() + 1e-9)  # negatives the FAR allows
        if accepted < 1 or pos_scores.numel() == 0:
            out[far] = math.nan
            continue
        k = min(accepted + 1, neg_scores.numel())
        threshold = neg_scores.topk(k).values[-1]
        if accepted >= neg_scores.numel():  # every negative may pass
            threshold = neg_scores.min() - 1.0
        out[far] = float((pos_scores > threshold).double().mean())
    return out


def nearest_center_predictions(
    query: Tensor, gallery: Tensor, gallery_labels: Tensor, num_classes: int
) -> Tensor:
    """Class of the nearest (cosine) class center, centers = mean of the normalised gallery
    features of each class (FTL's NN classifier). Classes without gallery samples never win."""
    g = F.normalize(gallery, dim=1)
    sums = torch.zeros(num_classes, g.shape[1], dtype=g.dtype).index_add_(0, gallery_labels, g)
    present = torch.bincount(gallery_labels, minlength=num_classes) > 0
    sim = F.normalize(query, dim=1) @ F.normalize(sums, dim=1).T
    sim[:, ~present] = float("-inf")
    return sim.argmax(dim=1)


def retrieval_per_query(features: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Leave-one-out retrieval within ``features`` by cosine similarity.

    Each sample queries all the others (ties broken by lower index). Returns per query
    ``(rank1, average_precision, valid)``: ``rank1`` is 1 when the most similar other sample
    shares the label; AP is the mean over the relevant items of the precision at their rank;
    ``valid`` is False for queries with no other sample of their class (their rank-1 and AP are
    0 and must be left out of averages).
    """
    n = features.shape[0]
    f = F.normalize(features.double(), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(float("-inf"))
    # stable sort on the negated similarity: equal scores keep index order
    order = torch.sort(-sim, dim=1, stable=True).indices[:, : max(n - 1, 0)]
    match = (labels[order] == labels.unsqueeze(1)).double()
    positives = match.sum(dim=1)
    valid = positives > 0
    ranks = torch.arange(1, match.shape[1] + 1, dtype=torch.float64)
    precision = match.cumsum(dim=1) / ranks
    ap = (precision * match).sum(dim=1) / positives.clamp_min(1)
    rank1 = match[:, 0] if match.shape[1] else torch.zeros(n, dtype=torch.float64)
    return rank1.float() * valid, ap.float() * valid, valid


def angle_spread(
    features: Tensor, labels: Tensor, num_classes: int, centers: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Per class: mean and unbiased variance of the angle (radians) between each L2-normalised
    feature and the class center, the normalised mean of the class's normalised features
    (the quantity LEAP Eq. 3 tracks online). Classes with fewer than two samples get NaN.

    ``centers`` ``(C, D)``: measure against these instead (e.g. the training centers for test
    features: with two test images per class their own center is equidistant from both, so the
    variance around it is always 0)."""
    f = F.normalize(features.double(), dim=1)
    if centers is None:
        centers = class_centers(f, labels, num_classes)
    centers = F.normalize(centers.double(), dim=1)
    angles = torch.acos((f * centers[labels]).sum(dim=1).clamp(-1.0, 1.0))
    n = torch.bincount(labels, minlength=num_classes).double()
    s1 = torch.zeros(num_classes, dtype=f.dtype).index_add_(0, labels, angles)
    mean = s1 / n.clamp_min(1)
    dev2 = (angles - mean[labels]) ** 2
    var = torch.zeros(num_classes, dtype=f.dtype).index_add_(0, labels, dev2) / (n - 1).clamp_min(1)
    nan = torch.full_like(mean, float("nan"))
    return torch.where(n >= 2, mean, nan).float(), torch.where(n >= 2, var, nan).float()


def class_centers(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(C, D)`` sums of the L2-normalised features per class (a direction; zero if absent)."""
    f = F.normalize(features.double(), dim=1)
    return torch.zeros(num_classes, f.shape[1], dtype=f.dtype).index_add_(0, labels, f)


def weight_norms(weight: Tensor) -> Tensor:
    """L2 norm of each class weight, ``(C, D) -> (C,)``."""
    return weight.detach().float().norm(dim=1)


def group_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values`` over the entries where ``mask`` holds, ignoring NaN (NaN if none)."""
    v = values[mask.bool()].double()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")


def head_tail(values: Tensor, is_head: Tensor, valid: Tensor = None) -> Dict[str, float]:
    """``{"all", "head", "tail"}`` means of per-sample or per-class ``values``."""
    keep = torch.ones_like(is_head, dtype=torch.bool) if valid is None else valid.bool()
    return {
        "all": group_mean(values, keep),
        "head": group_mean(values, keep & is_head),
        "tail": group_mean(values, keep & ~is_head),
    }


def aggregate(results: Dict[str, Any]) -> Dict[str, Dict[str, Tuple[float, float, int]]]:
    """``{method: {metric: (mean, std, n)}}`` over seeds (sample std, ``ddof=1``; 0 for n=1)."""
    out: Dict[str, Dict[str, Tuple[float, float, int]]] = {}
    for method in results["methods"]:
        rows = [r["metrics"] for r in results["runs"] if r["method"] == method]
        if not rows:
            continue
        out[method] = {}
        for key in dict.fromkeys(k for r in rows for k in r):
            vals = np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)
            vals = vals[~np.isnan(vals)]
            n = int(vals.size)
            mean = float(vals.mean()) if n else math.nan
            std = float(vals.std(ddof=1)) if n > 1 else 0.0
            out[method][key] = (mean, std, n)
    return out
