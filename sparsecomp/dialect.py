"""The sparse dialect's ops: backend-neutral `sparsecomp::*` operations that rewrites create.

Each op is declared with `sparsecomp.ops.define_op`: a reference implementation in plain PyTorch
(its semantics; what verification runs) and a fake implementation (shapes only, so graphs holding
the op export and trace). Backends replace these ops by kernels in their lowering.

- `sparsecomp::sparse_linear(x, weight, bias)`: `F.linear(x, weight, bias)` where `weight` is a
  constant known to be sparse. Which format and kernel run it is the backend's measured decision;
  the rewrite only records the weight's analysed facts on the node
  (`node.meta["sparsecomp.weights"]`).
- `sparsecomp::sparse_mlp(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, activation, mode,
  threshold, scale, pred_a, pred_b)`: a whole MLP block, `down(act(up(x)))` or
  `down(act(gate(x)) * up(x))`, whose hidden neurons that are zero (or, in the lossy modes, below
  a calibrated threshold) are skipped. The down weight is stored transposed (`w_down_t [H, N]`:
  row j = neuron j's outgoing weights, contiguous). `mode` says which neurons count:
  `exact` (the hidden activation as is: lossless; kernels skip its exact zeros), `threshold`
  (keep `|h| * scale > threshold`), `predictor` (keep `score(u_hat) * scale > threshold`, the score
  being u_hat itself for the ReLU family and |act(u_hat)| otherwise, with
  `u_hat = (x @ pred_a.T) @ pred_b.T + bias`, a low-rank prediction of the gate's (plain: the
  up's) pre-activation, so kernels can skip the up rows of unselected neurons too).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sparsecomp.ops import define_op

__all__ = ["sparse_linear", "sparse_mlp", "MLP_ACTIVATIONS", "MLP_MODES", "predictor_score"]


def _sparse_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _sparse_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


sparse_linear = define_op(
    "sparse_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    reference=_sparse_linear_ref, fake=_sparse_linear_fake,
    doc="y = x @ weight.T + bias, with a constant weight known to be sparse (format chosen by the backend).",
)


MLP_MODES = ("exact", "threshold", "predictor")

# activation name (as `find-mlps` names it) -> plain aten implementation
MLP_ACTIVATIONS = {
    "relu": torch.relu,
    "relu6": lambda t: torch.clamp(t, 0.0, 6.0),
    "relu2": lambda t: torch.relu(t) * torch.relu(t),
    "gelu": lambda t: F.gelu(t),
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "silu": F.silu,
}


def predictor_score(u_hat: torch.Tensor, activation: str) -> torch.Tensor:
    """How active the predictor says each neuron is: its predicted pre-activation itself for the
    ReLU family (monotone in the output, and it still ranks the neurons predicted negative, so a
    threshold can select any fraction), |act(u_hat)| otherwise (GELU / SiLU outputs grow on both sides)."""
    return u_hat if activation in ("relu", "relu6", "relu2") else MLP_ACTIVATIONS[activation](u_hat).abs()


def _sparse_mlp_ref(x: torch.Tensor, w_up: torch.Tensor, b_up: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
                    b_gate: Optional[torch.Tensor], w_down_t: torch.Tensor, b_down: Optional[torch.Tensor],
                    activation: str, mode: str, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                    pred_a: Optional[torch.Tensor], pred_b: Optional[torch.Tensor]) -> torch.Tensor:
    # Plain aten ops only (linear, activation, abs, gt, mul, matmul, add), so the op decomposes to
    # standard ONNX. Backends compute the up-projection and the predictor with these same calls,
    # so their keep-masks agree with this reference bit for bit.
    act = MLP_ACTIVATIONS[activation]
    up = F.linear(x, w_up, b_up)
    h = act(up) if w_gate is None else act(F.linear(x, w_gate, b_gate)) * up
    if mode == "threshold":
        score = h.abs() if scale is None else h.abs() * scale
        h = h * (score > threshold)
    elif mode == "predictor":
        u_hat = F.linear(F.linear(x, pred_a), pred_b, b_up if w_gate is None else b_gate)
        score = predictor_score(u_hat, activation)
        score = score if scale is None else score * scale
        h = h * (score > threshold)
    y = torch.matmul(h, w_down_t)
    return y if b_down is None else y + b_down


def _sparse_mlp_fake(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, activation, mode, threshold, scale, pred_a, pred_b):
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


sparse_mlp = define_op(
    "sparse_mlp",
    "(Tensor x, Tensor w_up, Tensor? b_up, Tensor? w_gate, Tensor? b_gate, Tensor w_down_t, Tensor? b_down, "
    "str activation, str mode, Tensor? threshold, Tensor? scale, Tensor? pred_a, Tensor? pred_b) -> Tensor",
    reference=_sparse_mlp_ref, fake=_sparse_mlp_fake,
    doc="A fused MLP block whose inactive hidden neurons are skipped (mode: exact | threshold | predictor).",
)
