"""Small models shared by the backends' tests (on pytest's pythonpath, like zoo_cases.py)."""

import torch
from torch import nn

from sparsecomp import patterns


def three_linears(second: str, seed: int = 0) -> nn.Sequential:
    """96 -> 160 -> 96 -> 24 with ReLUs: the first Linear 90% unstructured with an all-zero row,
    the second imposed `second` (each backend's own pattern), the third dense."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 96), nn.ReLU(), nn.Linear(96, 24)).eval()
    patterns.impose(m, "unstructured:0.9", "0")
    patterns.impose(m, second, "2")
    with torch.no_grad():
        m[0].weight[5].zero_()  # an all-zero row
    return m
