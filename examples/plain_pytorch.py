"""LEAPMarginHead in a plain PyTorch loop on real offline data (scikit-learn's handwritten digits).

The digits are made long-tailed (classes 0-4 keep every training image, classes 5-9 keep 5), a small
MLP embeds them, and the head trains it with CosFace + the full feature cloud. Prints head/tail test
accuracy of the head's cosine classifier.

    python examples/plain_pytorch.py --epochs 30
"""

import argparse

import torch

from feature_cloud import LEAPMarginHead


def long_tailed_digits(tail_samples: int, seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    test = perm[: len(y) // 3]
    train = perm[len(y) // 3 :]
    keep = [
        i
        for c in range(10)
        for i in train[y[train] == c].tolist()[: None if c < 5 else tail_samples]
    ]
    keep = torch.tensor(keep)
    return x[keep], y[keep], x[test], y[test]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--tail-samples", type=int, default=5)
    parser.add_argument("--cloud", default="full", choices=["full", "vanilla", "none"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    x_tr, y_tr, x_te, y_te = long_tailed_digits(args.tail_samples, args.seed)
    counts = torch.bincount(y_tr, minlength=10)
    backbone = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32)
    )
    head = LEAPMarginHead(
        32,
        10,
        margin_type="cosface",
        cloud=None if args.cloud == "none" else args.cloud,
        class_counts=counts,
        tail_threshold=args.tail_samples,
        warmup_steps=5 * (len(y_tr) // 64 + 1),
    )
    opt = torch.optim.Adam(list(backbone.parameters()) + list(head.parameters()), lr=3e-3)
    for _epoch in range(args.epochs):
        for idx in torch.randperm(len(y_tr)).split(64):
            loss = head(backbone(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    backbone.eval()
    head.eval()
    with torch.no_grad():
        pred = head.logits(backbone(x_te)).argmax(1)
    correct = (pred == y_te).float()
    result = {
        "head_acc": correct[y_te < 5].mean().item(),
        "tail_acc": correct[y_te >= 5].mean().item(),
        "final_loss": loss.item(),
    }
    print(
        f"head accuracy {result['head_acc']:.3f}  tail accuracy {result['tail_acc']:.3f}  "
        f"last loss {result['final_loss']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
