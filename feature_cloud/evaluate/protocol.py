"""Evaluation splits with ``n`` test images per identity.

* :func:`natural_split`: the natural long tail: every identity keeps all its other images for
  training; head identities are those with more than ``T`` training images.
* :func:`hs_split`: LEAP's ``<H, S>`` (Sec. 4.1): the ``H`` largest identities keep all their
  training images (head); every other identity keeps ``S`` (all if it has fewer).
* :func:`open_split`: open set, as faces and re-ID are deployed: a share of the identities is
  held out whole and only retrieved among themselves (never classified); the others, with their
  natural long tail, train.

Closed-set splits: identities with fewer than ``n + 1`` images are left out (nothing to train on).
Test images are the same for both closed-set protocols and a seed, so settings share their test set.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..demo.protocol import LongTailSplit, rank_classes

__all__ = ["natural_split", "hs_split", "open_split"]


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
    their first ``shots`` pool images. An identity left out (``n_test`` or fewer images: no pool)
    is neither head nor tail, also where ``num_head`` reaches it (the largest identities come
    first, so it is head only when ``num_head`` exceeds the identities split): ``num_head`` of
    the result is the head identities there are."""
    if num_head < 0 or shots < 1:
        raise ValueError(f"need num_head >= 0 and shots >= 1, got H={num_head}, S={shots}")
    test, pools = _pools(labels, num_classes, n_test, seed)
    order = rank_classes(labels, num_classes)
    head = torch.zeros(num_classes, dtype=torch.bool)
    head[order[:num_head]] = True
    head &= torch.tensor([p.size > 0 for p in pools], dtype=torch.bool)
    train = [p if head[c] else p[:shots] for c, p in enumerate(pools)]
    train_a = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return _make(labels, num_classes, test, train_a, head, int(head.sum()), shots)


def open_split(
    labels: Tensor,
    num_classes: int,
    test_fraction: float = 0.5,
    threshold: int = 20,
    seed: int = 0,
    camids: Optional[Tensor] = None,
) -> LongTailSplit:
    """Open set: ``round(test_fraction * E)`` of the ``E`` identities that can be retrieved (at
    least 2 images; with ``camids``: images from at least 2 cameras) are held out whole (a seeded
    draw), every image of every other identity trains (head = more than ``threshold`` of them).
    ``label_map`` gives each training identity its class index (in identity order), -1 the held-out
    ones; ``train_counts`` and ``head`` stay per identity (0 / False for the held-out)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    y = labels.numpy()
    counts = np.bincount(y, minlength=num_classes)
    eligible = counts >= 2
    if camids is not None:
        pairs = np.unique(np.stack([y, camids.numpy().astype(np.int64)]), axis=1)
        eligible &= np.bincount(pairs[0], minlength=num_classes) >= 2  # cameras per identity
    pool = np.nonzero(eligible)[0]
    n_test = int(round(test_fraction * pool.size))
    if n_test < 2 or np.count_nonzero(counts) - n_test < 2:
        raise ValueError(
            f"open set: {pool.size} identities can be retrieved"
            + (" (images from 2 cameras)" if camids is not None else " (2 images)")
            + f"; test_fraction {test_fraction} holds out {n_test}: need at least 2 held out "
            "and at least 2 identities left to train"
        )
    held = np.sort(np.random.RandomState(seed).permutation(pool)[:n_test])
    is_test = np.zeros(num_classes, dtype=bool)
    is_test[held] = True
    test = np.nonzero(is_test[y])[0]
    train = np.nonzero(~is_test[y])[0]
    label_map = torch.full((num_classes,), -1, dtype=torch.long)
    trained = np.nonzero(~is_test & (counts > 0))[0]
    label_map[torch.as_tensor(trained)] = torch.arange(trained.size)
    train_counts = torch.bincount(labels[torch.as_tensor(train)], minlength=num_classes)
    head = train_counts > threshold
    split = _make(labels, num_classes, test, train, head, int(head.sum()), -1)
    split.label_map = label_map
    return split
