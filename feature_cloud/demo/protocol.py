"""The long-tail split protocol of LEAP (Sec. 4.1, the ``<H, S>`` training sets).

Identities are ranked by their number of samples (ties: lower class index first). For every
identity a seeded permutation of its samples holds out ``test_fraction`` of them (at least one)
for testing and ``val_fraction`` for validation; the rest is the identity's *training pool*.
The top ``H`` identities keep their whole pool (head classes); every other identity keeps the
first ``S`` samples of its pool (tail classes; all of it if the pool is smaller) and its unused
pool samples join the validation split. Test images of every identity are held out, so head and
tail accuracy are measured on the same closed set of identities the classifier was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["LongTailSplit", "rank_classes", "long_tail_split"]


@dataclass
class LongTailSplit:
    """Sample indices of one ``<H, S>`` split and the per-class bookkeeping."""

    train: Tensor  # (N_train,) indices into the dataset
    val: Tensor
    test: Tensor
    head: Tensor  # (C,) bool, True for the H head identities
    total_counts: Tensor  # (C,) samples per identity in the whole dataset
    train_counts: Tensor  # (C,) K_i: training samples per identity after the cut
    num_head: int
    tail_shots: int
    # open-set splits only (``feature_cloud.evaluate.protocol.open_split``): (C,) the training
    # class index of each identity, -1 for the held-out (test) identities
    label_map: Optional[Tensor] = None

    def summary(self) -> Dict[str, int]:
        tail = ~self.head & (self.train_counts > 0)  # an identity left out is neither
        extra = {}
        if self.label_map is not None:  # open set: the held-out identities are neither
            extra["test_identities"] = int((self.label_map < 0).sum())
            tail = tail & (self.label_map >= 0)
        return {
            **extra,
            "num_classes": int(self.head.numel()),
            "head_classes": int(self.head.sum()),
            "tail_classes": int(tail.sum()),
            "train": int(self.train.numel()),
            "val": int(self.val.numel()),
            "test": int(self.test.numel()),
            "train_head": int(self.train_counts[self.head].sum()),
            "train_tail": int(self.train_counts[tail].sum()),
        }


def rank_classes(labels: Tensor, num_classes: int) -> Tensor:
    """Class indices ordered by sample count, largest first; ties by lower class index."""
    counts = torch.bincount(labels, minlength=num_classes).numpy()
    order = np.lexsort((np.arange(num_classes), -counts))
    return torch.as_tensor(order, dtype=torch.long)


def long_tail_split(
    labels: Tensor,
    num_classes: int,
    num_head: int,
    tail_shots: int,
    *,
    test_fraction: float = 0.3,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> LongTailSplit:
    """Split ``labels`` by the ``<H, S>`` protocol described in the module docstring.

    Every identity needs at least two samples (one to train on, one to test). ``seed`` fixes
    which samples go where.
    """
    if labels.dim() != 1 or labels.is_floating_point():
        raise TypeError("labels must be a 1-D integer tensor")
    if not 0 <= num_head <= num_classes:
        raise ValueError(f"num_head (H) must be in [0, {num_classes}], got {num_head}")
    if tail_shots < 1:
        raise ValueError(f"tail_shots (S) must be >= 1, got {tail_shots}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 or test_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"val_fraction must be in [0, 1) with test_fraction + val_fraction < 1, got "
            f"{val_fraction}"
        )
    labels = labels.cpu().long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in 0 .. {num_classes - 1}")
    total = torch.bincount(labels, minlength=num_classes)
    small = torch.nonzero(total < 2).flatten()
    if small.numel():
        raise ValueError(
            f"every identity needs >= 2 samples (train + test); classes {small.tolist()[:10]} "
            "have fewer (drop them first, see feature_cloud.demo.runner.drop_small_classes)"
        )
    order = rank_classes(labels, num_classes)
    head = torch.zeros(num_classes, dtype=torch.bool)
    head[order[:num_head]] = True

    rng = np.random.default_rng(seed)
    by_class = np.argsort(labels.numpy(), kind="stable")
    starts = np.concatenate([[0], np.cumsum(total.numpy())])
    train: List[np.ndarray] = []
    val: List[np.ndarray] = []
    test: List[np.ndarray] = []
    train_counts = torch.zeros(num_classes, dtype=torch.long)
    for c in range(num_classes):
        idx = rng.permutation(by_class[starts[c] : starts[c + 1]])
        n = idx.size
        n_test = max(1, int(round(test_fraction * n)))
        n_val = min(int(round(val_fraction * n)), n - n_test - 1)
        test.append(idx[:n_test])
        val.append(idx[n_test : n_test + n_val])
        pool = idx[n_test + n_val :]
        keep = pool.size if head[c] else min(tail_shots, pool.size)
        train.append(pool[:keep])
        val.append(pool[keep:])
        train_counts[c] = keep

    def cat(parts: List[np.ndarray]) -> Tensor:
        return torch.as_tensor(np.sort(np.concatenate(parts)), dtype=torch.long)

    return LongTailSplit(
        train=cat(train),
        val=cat(val),
        test=cat(test),
        head=head,
        total_counts=total,
        train_counts=train_counts,
        num_head=num_head,
        tail_shots=tail_shots,
    )
