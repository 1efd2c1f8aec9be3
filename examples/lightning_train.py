"""LEAPMarginHead inside a Lightning ``LightningModule``: no adapter, Lightning's own tools.

A long-tailed set of scikit-learn's handwritten digits (classes 0-4 keep every training image,
5-9 keep five), a small MLP embedding and the head (CosFace + the full feature cloud) train with
``lightning.Trainer``; ``ModelCheckpoint`` saves the head's state (weights, statistics, step, seed)
with the model, ``Trainer.fit(ckpt_path=...)`` resumes it and ``Trainer.test`` scores the head's
eval-mode logits (its inference prototypes) per head / tail class::

    python examples/lightning_train.py --epochs 20 --out lightning_runs
    python examples/lightning_train.py --epochs 30 --out lightning_runs --resume   # 10 more

The head's step counts training forward calls (micro-batches), not Lightning's optimizer steps:
``warmup_steps`` is given in batches here (``--warmup-epochs``, five).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Dict, Iterator, List, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader, Sampler, TensorDataset

from feature_cloud import LEAPMarginHead

BATCH = 64


def long_tailed_digits(tail_samples: int, seed: int) -> Dict[str, TensorDataset]:
    """Digits split 2:1 into train / test; classes 5-9 keep ``tail_samples`` training images."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x_t = torch.tensor(x, dtype=torch.float32) / 16.0
    y_t = torch.tensor(y)
    perm = torch.randperm(len(y_t), generator=torch.Generator().manual_seed(seed))
    test, train = perm[: len(y_t) // 3], perm[len(y_t) // 3 :]
    keep = torch.cat([train[y_t[train] == c][: None if c < 5 else tail_samples] for c in range(10)])
    return {
        "train": TensorDataset(x_t[keep], y_t[keep]),
        "test": TensorDataset(x_t[test], y_t[test]),
    }


class EpochShuffle(Sampler[int]):
    """A permutation drawn from ``(seed, epoch)``: Lightning calls ``set_epoch`` before each
    epoch, a resumed run too, so it draws the batches of a run that never stopped (a
    ``shuffle=True`` loader's generator starts over at a resume)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


class LEAPDigits(L.LightningModule):
    """An MLP embedding trained by a :class:`LEAPMarginHead`; ``test`` reports accuracy of the
    head's eval-mode logits on the head (0-4) and tail (5-9) classes."""

    def __init__(self, class_counts: List[int], warmup_steps: int, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()  # load_from_checkpoint rebuilds the module from these
        self.backbone = torch.nn.Sequential(
            torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)
        )
        self.head = LEAPMarginHead(
            32,
            10,
            "cosface",
            class_counts=class_counts,
            tail_threshold=min(class_counts),
            warmup_steps=warmup_steps,
            seed=0,  # the cloud's noise stream: its position is the head's step, checkpointed
        )
        self.lr = lr

    def training_step(self, batch: List[Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = self.head(self.backbone(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: List[Tensor], batch_idx: int) -> None:
        x, y = batch
        correct = (self.head.logits(self.backbone(x)).argmax(1) == y).float()
        for name, rows in (("head_acc", y < 5), ("tail_acc", y >= 5)):
            if rows.any():
                self.log(name, correct[rows].mean(), batch_size=int(rows.sum()))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20, help="total epochs (with --resume too)")
    parser.add_argument("--tail-samples", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="lightning_runs", help="checkpoints and logs")
    parser.add_argument("--resume", action="store_true", help="continue from --out's last.ckpt")
    parser.add_argument("--precision", default="32-true", help="Lightning's, e.g. bf16-mixed")
    parser.add_argument("--warmup-epochs", type=int, default=5, help="epochs without the cloud")
    args = parser.parse_args(argv)
    L.seed_everything(args.seed, verbose=False)
    data = long_tailed_digits(args.tail_samples, args.seed)
    counts = torch.bincount(data["train"].tensors[1], minlength=10).tolist()
    batches = -(-len(data["train"]) // BATCH)
    model = LEAPDigits(counts, warmup_steps=args.warmup_epochs * batches)
    last = os.path.join(args.out, "last.ckpt")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        precision=args.precision,
        default_root_dir=args.out,
        callbacks=[ModelCheckpoint(dirpath=args.out, save_last=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    sampler = EpochShuffle(len(data["train"]), args.seed)
    train = DataLoader(data["train"], batch_size=BATCH, sampler=sampler)
    trainer.fit(model, train, ckpt_path=last if args.resume else None)
    scores = trainer.test(model, DataLoader(data["test"], batch_size=256), verbose=False)[0]
    result = {
        "head_acc": float(scores["head_acc"]),
        "tail_acc": float(scores["tail_acc"]),
        "head_step": int(model.head.step),
        "checkpoint": last,
    }
    print(
        f"head accuracy {result['head_acc']:.3f}  tail accuracy {result['tail_acc']:.3f}  "
        f"(head step {result['head_step']}, checkpoint {last})"
    )
    return result


if __name__ == "__main__":
    main()
