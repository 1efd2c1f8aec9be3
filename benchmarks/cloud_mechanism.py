"""How much the LEAP cloud changes the loss per cloud_mode, as a function of s and C (README, "Real faces").

Trained-like logits: target angle 0.8 rad (cos 0.70), non-targets at pi/2 + N(0, 0.12) rad; cloud std 0.05.
Run: python benchmarks/cloud_mechanism.py (about 20 s on one core)."""

import argparse
import math

import torch

from feature_cloud import functional as FC

argparse.ArgumentParser(description=__doc__).parse_args()
torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
B = 512
print(
    "| s | C | sigma | CE no cloud | Δ CE paper (all C logits) | Δ CE target-only | Δ CE margin (|α|, target) | negative-mass factor paper |"
)
print("|---|---|---|---|---|---|---|---|")
for s in (16.0, 24.0, 64.0):
    for C in (10, 211, 10000):
        for sigma in (0.05,):
            y = torch.zeros(B, dtype=torch.long)
            theta = math.pi / 2 + 0.12 * torch.randn(B, C, generator=g)
            theta[:, 0] = 0.8
            cos = torch.cos(theta)
            base = FC.margin_cross_entropy(FC.margin_logits(cos, y, scale=s, margin=0.2), y)
            std = torch.full((B,), sigma)
            res = []
            for mode in ("paper", "target", "margin"):
                vals = []
                for _ in range(8):
                    if mode == "paper":
                        a = FC.angle_noise(std, C, g)
                        logits = FC.margin_logits(cos, y, scale=s, margin=0.2, alpha=a)
                    else:
                        ta = FC.target_cloud_angles(std, mode, g)
                        logits = FC.margin_logits(cos, y, scale=s, margin=0.2, target_alpha=ta)
                    vals.append(float(FC.margin_cross_entropy(logits, y)))
                res.append(sum(vals) / len(vals) - float(base))
            a = FC.angle_noise(std, C, g)
            neg = (
                torch.exp(s * torch.cos(theta + a))[:, 1:].sum(1) / torch.exp(s * cos)[:, 1:].sum(1)
            ).mean()
            print(
                f"| {s:.0f} | {C} | {sigma} | {float(base):.3f} | {res[0]:+.3f} | {res[1]:+.3f} | {res[2]:+.3f} | {float(neg):.2f} |"
            )
