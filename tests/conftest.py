"""Test-suite settings: one intra-op thread.

The models in these tests are tiny; on a 2-core CI machine (or a loaded one) a second torch
thread only adds contention, and a fixed thread count keeps float reductions reproducible.
"""
import torch

torch.set_num_threads(1)
