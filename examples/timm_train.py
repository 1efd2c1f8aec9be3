"""timm: train a timm backbone with ``LEAPTask`` (a ``timm.task.TrainingTask``).

Generated long-tailed colour-pattern images, no download, CPU::

    python examples/timm_train.py --model test_resnet --steps 20
"""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch

from feature_cloud.integrations.timm import LEAPTask


def pattern_images(counts: List[int], size: int, seed: int):
    """Class ``c``: its own colour in the top half, the negated colour in the bottom half, noise."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(len(counts), 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = colours[labels].expand(-1, 3, size, size).clone()
    x[:, :, size // 2 :] *= -1
    return x + 0.3 * torch.randn(x.shape, generator=g), labels


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    counts = [40 if c < args.classes // 4 else 8 for c in range(args.classes)]
    x, y = pattern_images(counts, args.image_size, seed=1)

    # the swap: ClassificationTask(timm.create_model(name, num_classes=C)) ->
    task = LEAPTask.from_timm(
        args.model,
        args.classes,
        cloud="full",
        class_counts=counts,
        margin_type="cosface",
        scale=16.0,
        margin=0.2,
        verbose=False,
    )
    optimizer = torch.optim.Adam(task.get_trainable_module().parameters(), lr=3e-3)
    task.train()
    first = last = None
    for _step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch_size,))
        result = task(x[idx], y[idx])  # {"loss", "output", "leap_loss"}
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        first = float(result["loss"].detach()) if first is None else first
        last = float(result["loss"].detach())
    task.eval()
    evaluator = task.create_evaluator()
    with torch.no_grad():
        evaluator.update(task.get_eval_model()(x), y)
    metrics = {k: float(v) for k, v in evaluator.compute().items()}
    checkpoint = (
        task.get_checkpoint_state()
    )  # {"state_dict": backbone, "task_state": {"head": ...}}
    print(
        {
            "first_loss": round(first, 3),
            "last_loss": round(last, 3),
            **{k: round(v, 2) for k, v in metrics.items()},
            "checkpoint_keys": sorted(checkpoint),
        }
    )
    return metrics


if __name__ == "__main__":
    main()
