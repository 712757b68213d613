"""The sparse dialect's ops: backend-neutral `sparsecomp::*` operations that rewrites create.

Each op is declared with `sparsecomp.ops.define_op`: a reference implementation in plain PyTorch
(its semantics; what verification runs) and a fake implementation (shapes only, so graphs holding
the op export and trace). Backends replace these ops by kernels in their lowering.

- `sparsecomp::sparse_linear(x, weight, bias)`: `F.linear(x, weight, bias)` where `weight` is a
  constant known to be sparse. Which format and kernel run it is the backend's measured decision;
  the rewrite only records the weight's analysed facts on the node
  (`node.meta["sparsecomp.weights"]`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sparsecomp.ops import define_op

__all__ = ["sparse_linear"]


def _sparse_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _sparse_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


sparse_linear = define_op(
    "sparse_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    reference=_sparse_linear_ref, fake=_sparse_linear_fake,
    doc="y = x @ weight.T + bias, with a constant weight known to be sparse (format chosen by the backend).",
)
