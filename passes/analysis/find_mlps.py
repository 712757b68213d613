"""`find-mlps`: the MLP regions that activation-sparsity rewrites act on.

Two shapes are matched, each as a small rule (tinygrad style: the rule is data, its match
function returns the region or the reason it did not match):

- `plain`:  down(act(up(x)))                      e.g. BERT, OPT, ViT FFNs
- `gated`:  down(act(gate(x)) * up(x))            e.g. LLaMA SwiGLU

where up / gate / down are Linear / matmul nodes with constant weights (`sparsecomp.ir.linear_sites`;
convolutions are not matched: sparse-mlp skips rows of a matrix) and `act` is a known activation. The activation's family decides what later rewrites may do:
`relu` family (relu, relu6, relu^2) produces exact zeros (lossless skipping), `gelu` / `silu`
only near-zeros (threshold modes, lossy).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated

import torch
import torch.fx as fx

from sparsecomp.ir import linear_sites
from sparsecomp.registry import Bounds, PassResult, register_pass

__all__ = ["MLPRegion", "activation_kind", "META_KEY"]

META_KEY = "sparsecomp.mlp"
aten = torch.ops.aten

# ATen activation op -> (kind, family)
_ACTIVATIONS = {
    aten.relu.default: ("relu", "relu"),
    aten.relu_.default: ("relu", "relu"),
    aten.relu6.default: ("relu6", "relu"),
    aten.hardtanh.default: ("relu6", "relu"),  # relu6 decomposes to hardtanh(0, 6)
    aten.gelu.default: ("gelu", "gelu"),
    aten.silu.default: ("silu", "silu"),
    aten.silu_.default: ("silu", "silu"),
}


@dataclass
class MLPRegion:
    index: int
    pattern: str  # plain | gated
    activation: str  # relu | relu6 | relu2 | gelu | gelu_tanh | silu
    family: str  # relu (exact zeros) | gelu | silu
    up: str  # layer names (qualified module names)
    down: str
    gate: str | None
    hidden: int  # number of hidden neurons
    nodes: list[str] = field(default_factory=list)  # member FX node names

    @property
    def exact_zeros(self) -> bool:
        return self.family == "relu"

    def summary(self) -> str:
        gate = f" gate={self.gate}" if self.gate else ""
        return f"mlp#{self.index} {self.pattern} {self.activation} up={self.up}{gate} down={self.down} hidden={self.hidden}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exact_zeros"] = self.exact_zeros
        return d


def activation_kind(node: fx.Node) -> tuple[str, str, fx.Node] | None:
    """(kind, family, input node) if `node` applies a known activation to one tensor."""
    if node.op != "call_function":
        return None
    t = node.target
    if t in _ACTIVATIONS:
        kind, family = _ACTIVATIONS[t]
        if t is aten.hardtanh.default and tuple(node.args[1:3]) != (0.0, 6.0):
            return None
        if t is aten.gelu.default and node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none") == "tanh":
            kind = "gelu_tanh"
        return kind, family, node.args[0]
    # relu^2 (Primer, some sparse LLMs): square / pow(.,2) / mul(r, r) of a relu
    inner = None
    if t in (aten.square.default,) or (t is aten.pow.Tensor_Scalar and node.args[1] == 2):
        inner = node.args[0]
    elif t is aten.mul.Tensor and node.args[0] is node.args[1]:
        inner = node.args[0]
    if isinstance(inner, fx.Node) and inner.op == "call_function" and inner.target in (aten.relu.default, aten.relu_.default):
        return "relu2", "relu", inner.args[0]
    return None


@register_pass("find-mlps", kind="analysis")
def find_mlps(gm, ctx, *, min_hidden: Annotated[int, Bounds(lo=0)] = 1) -> PassResult:
    """Find plain and gated MLP regions and name their activation.

    Requires: an ATen-level graph (`sparsecomp.capture`).
    Ensures: `node.meta["sparsecomp.mlp"]` = {"region": i, "role": up|gate|act|mul|down} on the
      member nodes of each region; `ctx.results["find-mlps"]` = list of `MLPRegion`. A node belongs
      to at most one region; the graph itself is unchanged.
    Options:
      min_hidden: ignore regions whose hidden size is smaller than this.
    """
    # Linear / matmul layers only: sparse-mlp's kernels skip rows of a matrix, not a convolution's channels
    sites = {s.node: s for s in linear_sites(gm) if s.kind != "conv"}
    regions: list[MLPRegion] = []
    used: set[fx.Node] = set()
    misses = {"shared-hidden": 0}  # regions rejected because the hidden tensor escapes

    def weight_rows(node):
        return sites[node].weight_2d(gm).shape[0]

    for down_node, down in sites.items():
        hidden_in = down_node.args[0]
        if not isinstance(hidden_in, fx.Node):
            continue
        members: dict[fx.Node, str] = {}
        act = activation_kind(hidden_in)
        if act is not None and act[2] in sites:  # plain: down(act(up(x)))
            kind, family, up_node = act
            gate_node = None
            members = {up_node: "up", hidden_in: "act", down_node: "down"}
            pattern = "plain"
        elif hidden_in.op == "call_function" and hidden_in.target is aten.mul.Tensor:  # gated
            a, b = hidden_in.args[:2]
            found = None
            for g_act, up_node in ((a, b), (b, a)):
                ak = activation_kind(g_act) if isinstance(g_act, fx.Node) else None
                if ak and ak[2] in sites and up_node in sites and ak[2].args[0] is up_node.args[0]:
                    found = (ak, g_act, up_node)
                    break
            if not found:
                continue
            (kind, family, gate_node), act_node, up_node = found
            members = {gate_node: "gate", act_node: "act", up_node: "up", hidden_in: "mul", down_node: "down"}
            pattern = "gated"
        else:
            continue
        # A hidden activation that feeds anything besides the region cannot be skipped safely.
        inner = [n for n, role in members.items() if role in ("act", "mul")]
        if any(u not in members for n in inner for u in n.users) or used & set(members):
            misses["shared-hidden"] += 1
            continue
        hidden = weight_rows(up_node)
        if hidden < min_hidden:
            continue
        region = MLPRegion(
            index=len(regions), pattern=pattern, activation=kind, family=family,
            up=sites[up_node].name, down=down.name,
            gate=sites[gate_node].name if gate_node is not None else None, hidden=hidden,
            nodes=[n.name for n in gm.graph.nodes if n in members],
        )
        for node, role in members.items():
            node.meta[META_KEY] = {"region": region.index, "role": role}
        used |= set(members)
        regions.append(region)
    ctx.results["find-mlps"] = regions
    return PassResult(False, {
        "plain": sum(r.pattern == "plain" for r in regions),
        "gated": sum(r.pattern == "gated" for r in regions),
        "relu-family": sum(r.exact_zeros for r in regions),
        **{f"miss:{k}": v for k, v in misses.items() if v},
    })
