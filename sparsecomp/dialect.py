"""The sparse dialect's ops: backend-neutral `sparsecomp::*` operations that rewrites create.

Each op is declared with `sparsecomp.ops.define_op`: a reference implementation in plain PyTorch
(its semantics; what verification runs) and a fake implementation (shapes only, so graphs holding
the op export and trace). Backends replace these ops by kernels in their lowering.

- `sparsecomp::sparse_linear(x, weight, bias)`: `F.linear(x, weight, bias)` where `weight` is a
  constant known to be sparse. Which format and kernel run it is the backend's measured decision;
  the rewrite only records the weight's analysed facts on the node
  (`node.meta["sparsecomp.weights"]`).
- `sparsecomp::sparse_mlp(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, activation, mode,
  threshold, scale, pred_a, pred_bt)`: a whole MLP block, `down(act(up(x)))` or
  `down(act(gate(x)) * up(x))`, whose hidden neurons that are zero (or, in the lossy modes, below
  a calibrated threshold) are skipped. The down weight is stored transposed (`w_down_t [H, N]`:
  row j = neuron j's outgoing weights, contiguous). `mode` says which neurons count:
  `exact` (the hidden activation as is: lossless; kernels skip its exact zeros), `threshold`
  (keep `|h| * scale > threshold`), `predictor` (keep `score(u_hat) * scale > threshold`, the score
  being u_hat itself for the ReLU family and |act(u_hat)| otherwise, with
  `u_hat = (x @ pred_a.T) @ pred_bt + bias`, a low-rank prediction of the gate's (plain: the
  up's) pre-activation, so kernels can skip the up rows of unselected neurons too).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sparsecomp.ops import define_op

__all__ = ["MLP_ACTIVATIONS", "MLP_MODES", "PRUNED_DENSITY", "RELU_FAMILY", "SPARSE_LINEAR", "SPARSE_MLP", "mlp_hidden", "predictor_keep", "predictor_score", "predictor_scores", "sparse_linear", "sparse_linear_args", "sparse_mlp"]


def _sparse_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, weight, bias)


def _sparse_linear_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


sparse_linear = define_op(
    "sparse_linear", "(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
    reference=_sparse_linear_ref, fake=_sparse_linear_fake,
    doc="y = x @ weight.T + bias, with a constant weight known to be sparse (format chosen by the backend).",
)


def sparse_linear_args(gm, node) -> tuple[str, torch.Tensor, Optional[torch.Tensor]]:
    """(layer name, weight, bias or None) of a `sparse_linear` node whose weight and bias are
    module attributes (as the sparse-linear rewrite leaves them): what every backend lowers."""
    from torch import fx

    from sparsecomp.ir import get_attr_value

    layer = node.meta.get("sparsecomp.sparse_linear", {}).get("layer", node.name)
    weight = get_attr_value(gm, node.args[1].target).detach()
    bias_node = node.args[2]
    bias = get_attr_value(gm, bias_node.target).detach() if isinstance(bias_node, fx.Node) else None
    return layer, weight, bias


# The ops' FX targets as strings (`str(node.target)`): how backends find them in a graph.
SPARSE_LINEAR = "sparsecomp.sparse_linear.default"
SPARSE_MLP = "sparsecomp.sparse_mlp.default"

MLP_MODES = ("exact", "threshold", "predictor")

# Activations that are 0 exactly for every input <= 0: a neuron whose pre-activation is <= 0 is
# exactly zero (what exact mode skips), and the pre-activation itself ranks neurons (predictor).
RELU_FAMILY = ("relu", "relu6", "relu2")

# A sparse_mlp weight at most this dense counts as pruned: backends then use its weight sparsity
# too, beside the activations' (both backends measured their sparse-row kernels paying below it).
PRUNED_DENSITY = 0.7

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
    return u_hat if activation in RELU_FAMILY else MLP_ACTIVATIONS[activation](u_hat).abs()


def predictor_scores(x: torch.Tensor, pred_a: torch.Tensor, pred_bt: torch.Tensor, bias: Optional[torch.Tensor],
                     activation: str, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """How active the low-rank predictor says each neuron is: `score(u_hat) [* scale]`, with
    u_hat = (x @ pred_a.T) @ pred_bt + bias. pred_bt is stored [rank, H] (not [H, rank]): at M = 1
    torch's GEMV over the short rows of an [H, rank] matrix ran at ~10 GB/s here, over [rank, H]
    at the read bandwidth (the 8 MB predictor of a 2048 -> 8192 MLP: 850 us -> 350 us)."""
    u_hat = torch.matmul(F.linear(x, pred_a), pred_bt)
    if bias is not None:
        u_hat = u_hat + bias
    score = predictor_score(u_hat, activation)
    return score if scale is None else score * scale


def predictor_keep(x: torch.Tensor, pred_a: torch.Tensor, pred_bt: torch.Tensor, bias: Optional[torch.Tensor],
                   activation: str, threshold: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    """The predictor's keep-mask: `predictor_scores(...) > threshold`."""
    return predictor_scores(x, pred_a, pred_bt, bias, activation, scale) > threshold


def mlp_hidden(x: torch.Tensor, w_up: torch.Tensor, b_up: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
               b_gate: Optional[torch.Tensor], activation: str, mode: str, threshold: Optional[torch.Tensor],
               scale: Optional[torch.Tensor], pred_a: Optional[torch.Tensor], pred_bt: Optional[torch.Tensor]) -> torch.Tensor:
    """The hidden activation `[..., H]` with the mode's keep-mask applied: the reference's first
    half. Plain aten ops only (linear, activation, abs, gt, mul, matmul, add), so the op decomposes
    to standard ONNX. Backends that compute the keep-mask call this (or `predictor_keep`) with the
    same inputs, so their masks agree with the reference bit for bit."""
    act = MLP_ACTIVATIONS[activation]
    up = F.linear(x, w_up, b_up)
    h = act(up) if w_gate is None else act(F.linear(x, w_gate, b_gate)) * up
    if mode == "threshold":
        score = h.abs() if scale is None else h.abs() * scale
        h = h * (score > threshold)
    elif mode == "predictor":
        h = h * predictor_keep(x, pred_a, pred_bt, b_up if w_gate is None else b_gate, activation, threshold, scale)
    return h


def _sparse_mlp_ref(x: torch.Tensor, w_up: torch.Tensor, b_up: Optional[torch.Tensor], w_gate: Optional[torch.Tensor],
                    b_gate: Optional[torch.Tensor], w_down_t: torch.Tensor, b_down: Optional[torch.Tensor],
                    activation: str, mode: str, threshold: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                    pred_a: Optional[torch.Tensor], pred_bt: Optional[torch.Tensor]) -> torch.Tensor:
    h = mlp_hidden(x, w_up, b_up, w_gate, b_gate, activation, mode, threshold, scale, pred_a, pred_bt)
    y = torch.matmul(h, w_down_t)
    return y if b_down is None else y + b_down


def _sparse_mlp_fake(x, w_up, b_up, w_gate, b_gate, w_down_t, b_down, activation, mode, threshold, scale, pred_a, pred_bt):
    return x.new_empty((*x.shape[:-1], w_down_t.shape[1]))


sparse_mlp = define_op(
    "sparse_mlp",
    "(Tensor x, Tensor w_up, Tensor? b_up, Tensor? w_gate, Tensor? b_gate, Tensor w_down_t, Tensor? b_down, "
    "str activation, str mode, Tensor? threshold, Tensor? scale, Tensor? pred_a, Tensor? pred_bt) -> Tensor",
    reference=_sparse_mlp_ref, fake=_sparse_mlp_fake,
    doc="A fused MLP block whose inactive hidden neurons are skipped (mode: exact | threshold | predictor).",
)
