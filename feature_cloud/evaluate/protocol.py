"""Evaluation splits with ``n`` test images per identity.

* :func:`natural_split`: the natural long tail: every identity keeps all its other images for
  training; head identities are those with more than ``T`` training images.
* :func:`hs_split`: LEAP's ``<H, S>`` (Sec. 4.1): the ``H`` largest identities keep all their
  training images (head); every other identity keeps ``S`` (all if it has fewer).

Identities with fewer than ``n + 1`` images are left out (nothing to train on). Test images are
the same for both protocols and a seed, so settings share their test set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..demo.protocol import LongTailSplit, rank_classes

__all__ = ["natural_split", "hs_split"]


def _pools(labels: Tensor, num_classes: int, n_test: int, seed: int):
    if n_test < 1:
        raise ValueError(f"n_test must be >= 1, got {n_test}")
    rng = np.random.RandomState(seed)
    y = labels.numpy()
    test, pools = [], []
    for c in range(num_classes):
        idx = np.nonzero(y == c)[0]
        idx = idx[rng.permutation(idx.size)]
        if idx.size <= n_test:
            pools.append(np.zeros(0, dtype=np.int64))
            continue
        test.append(idx[:n_test])
        pools.append(idx[n_test:])
    return np.concatenate(test) if test else np.zeros(0, dtype=np.int64), pools


def _make(labels, num_classes, test, train, head, num_head, shots) -> LongTailSplit:
    train_t = torch.as_tensor(np.sort(train), dtype=torch.long)
    return LongTailSplit(
        train=train_t,
        val=torch.zeros(0, dtype=torch.long),
        test=torch.as_tensor(np.sort(test), dtype=torch.long),
        head=head,
        total_counts=torch.bincount(labels, minlength=num_classes),
        train_counts=torch.bincount(labels[train_t], minlength=num_classes),
        num_head=num_head,
        tail_shots=shots,
    )


def natural_split(
    labels: Tensor, num_classes: int, n_test: int = 2, threshold: int = 20, seed: int = 0
) -> LongTailSplit:
    """Natural long tail: ``n_test`` test images per identity, head = more than ``threshold``
    training images. ``tail_shots`` of the result is ``-1`` (not a fixed number)."""
    test, pools = _pools(labels, num_classes, n_test, seed)
    counts = torch.tensor([p.size for p in pools])
    head = counts > threshold
    train = np.concatenate(pools) if pools else np.zeros(0, dtype=np.int64)
    return _make(labels, num_classes, test, train, head, int(head.sum()), -1)


def hs_split(
    labels: Tensor, num_classes: int, num_head: int, shots: int, n_test: int = 2, seed: int = 0
) -> LongTailSplit:
    """LEAP's ``<H, S>``: the ``num_head`` largest identities keep their whole pool, the others
    their first ``shots`` pool images."""
    if num_head < 0 or shots < 1:
        raise ValueError(f"need num_head >= 0 and shots >= 1, got H={num_head}, S={shots}")
    test, pools = _pools(labels, num_classes, n_test, seed)
    order = rank_classes(labels, num_classes)
    head = torch.zeros(num_classes, dtype=torch.bool)
    head[order[:num_head]] = True
    train = [p if head[c] else p[:shots] for c, p in enumerate(pools)]
    train_a = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return _make(labels, num_classes, test, train_a, head, num_head, shots)
