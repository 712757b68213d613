"""`mlp-relu`: one OPT-style feed-forward block, 2048 -> 8192 -> ReLU -> 2048.

What it is for: the smallest model on which every sparse path matters. Both weights are big
(2 x 16.8M parameters, 128 MiB in fp32, far larger than the L3 cache), so a sparse kernel's
bandwidth savings are measurable; the ReLU between them makes fc2's input exactly sparse, which
is what activation-sparsity rewrites exploit. The shape is OPT-1.3B's FFN (d_model 2048, 4x
expansion), the common "big decoder MLP" case.

Input: `x` of shape [batch, hidden] (default [1, 2048]). Batch 1 is one decoding step, the
matrix-vector case the sparse kernels target; a [batch, seq, hidden] input works as well (all
ops act on the last dimension), the zoo just does not build one.

Output: [batch, hidden], `fc2(relu(fc1(x)))` (no residual, no LayerNorm: the block alone).

`mlp_bias` is added to fc1's bias: with the default init, fc1's pre-activations are about
N(0, 0.9^2) for N(0, 1) inputs, so `mlp_bias=-1.16` makes about 90% of the ReLU outputs zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._spec import Spec, build_initialized, token_spec_fns

__all__ = ["MLP", "ZOO"]


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, ffn)
        self.fc2 = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


def _build(cfg: dict) -> MLP:
    model = build_initialized(lambda: MLP(cfg["hidden"], cfg["ffn"]))
    with torch.no_grad():
        model.fc1.bias += cfg["mlp_bias"]
    return model


def _batch(cfg: dict, gen: torch.Generator):
    return (torch.randn(cfg["batch"], cfg["hidden"], generator=gen, dtype=torch.float32),)


_example, _calibration = token_spec_fns(_batch)

ZOO = {
    "mlp-relu": Spec(
        description="OPT-style FFN block 2048 -> 8192 -> ReLU -> 2048 (fc1, fc2 with biases)",
        defaults={"hidden": 2048, "ffn": 8192, "batch": 1, "mlp_bias": 0.0},
        build=_build,
        example=_example,
        calibration=_calibration,
        inputs="(x [batch, hidden] float32,) positional",
    ),
}
