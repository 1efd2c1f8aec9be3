"""pytorch-metric-learning: swap ``CosFaceLoss`` for ``LEAPLoss`` in a ``trainers.MetricLossOnly`` loop.

A long-tailed set of generated 2-D "identities" embedded by a small MLP; trains with PML's
trainer and evaluates with PML's ``GlobalEmbeddingSpaceTester`` (CPU, a few seconds; the tester
needs ``faiss``: ``pip install faiss-cpu``)::

    python examples/pml_train.py --epochs 2
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch
from pytorch_metric_learning import losses, testers, trainers
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from feature_cloud.integrations.pml import LEAPLoss


def long_tail_blobs(
    num_classes: int, head: int, tail: int, dim: int, seed: int
) -> torch.utils.data.TensorDataset:
    """``num_classes`` Gaussian blobs; the first quarter of the classes are head classes."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)) * 2.5
    counts = torch.tensor([head if c < num_classes // 4 else tail for c in range(num_classes)])
    labels = torch.arange(num_classes).repeat_interleave(counts)
    x = centers[labels] + torch.randn(len(labels), dim, generator=g)
    return torch.utils.data.TensorDataset(x, labels)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--embedding-size", type=int, default=32)
    parser.add_argument("--baseline", action="store_true", help="use PML's CosFaceLoss instead")
    args = parser.parse_args(argv)
    try:  # before training: PML's tester needs it
        import faiss  # noqa: F401
    except ImportError:
        parser.exit(
            2,
            "pml_train.py: PML's GlobalEmbeddingSpaceTester (AccuracyCalculator) needs faiss: "
            "pip install faiss-cpu\n",
        )
    torch.manual_seed(0)
    C, D = args.classes, args.embedding_size
    train = long_tail_blobs(C, head=40, tail=5, dim=16, seed=1)
    val = long_tail_blobs(C, head=10, tail=10, dim=16, seed=2)
    counts = torch.bincount(train.tensors[1], minlength=C)

    trunk = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, D))
    if args.baseline:
        loss_func = losses.CosFaceLoss(C, D, margin=0.35, scale=64)
    else:
        # the swap: same PML keywords, plus the cloud and the per-class counts
        loss_func = LEAPLoss(C, D, margin=0.35, scale=64, cloud="full", class_counts=counts)
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-3),
            "metric_loss_optimizer": torch.optim.Adam(loss_func.parameters(), lr=1e-2),
        },
        batch_size=64,
        loss_funcs={"metric_loss": loss_func},
        dataset=train,
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=args.epochs)
    tester = testers.GlobalEmbeddingSpaceTester(
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r")
        ),
    )
    accuracies = tester.test({"val": val}, args.epochs, trunk)["val"]
    print({k: round(float(v), 4) for k, v in accuracies.items() if k != "epoch"})
    return accuracies


if __name__ == "__main__":
    main()
