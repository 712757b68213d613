"""Helpers over the one IR: an ATen-level `torch.fx.GraphModule` with parameters as attributes.

- `linear_sites(gm)`: every matmul-like node with a constant weight (Linear, matmul/mm/addmm with
  a parameter, 1-D/2-D convolution), with the weight seen as 2-D `[out_features, in_features]`,
  the orientation every pattern and format uses (DESIGN.md section 2).
- `format_graph(gm)`: the printed IR, one node per line, with the `sparsecomp.*` annotations that
  analyses wrote into `node.meta`. What the CLI prints and dumps, and what "changed" means.
- `run_graph` / `compare_outputs`: run a captured graph on (args, kwargs) and compare outputs
  with the tolerance rule of lossless rewrites (max abs error <= rtol x max|reference|).
"""

from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree
from torch.nn.modules import module as _nn_module  # its global hook registries (`global_module_hooks`)

__all__ = [
    "check_batches_fit",
    "describe_graph_inputs",
    "describe_inputs",
    "META_PREFIX",
    "PROVENANCE",
    "LinearSite",
    "linear_sites",
    "layer_name",
    "get_attr_value",
    "format_graph",
    "fingerprint",
    "normalize_inputs",
    "run_graph",
    "flat_inputs",
    "global_module_hooks",
    "plain_call_convention",
    "compare_outputs",
    "output_cosine",
    "record_inputs",
]

META_PREFIX = "sparsecomp."
PROVENANCE = "sparsecomp.provenance"  # {"pass": name, "rule": rule} on nodes a pass created

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_CONV = {aten.conv1d.default, aten.conv2d.default, aten.convolution.default}
_MATMUL = {aten.matmul.default, aten.mm.default}
_TRANSPOSES = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default}


@dataclass
class LinearSite:
    """A matmul-like node whose weight is a constant attribute of the module."""

    node: fx.Node
    kind: str  # "linear" | "conv" | "matmul"
    name: str  # qualified module name, e.g. "encoder.layer.0.intermediate.dense"
    weight_target: str  # attribute path of the stored weight, e.g. "...dense.weight"
    transposed: bool  # stored weight is [in, out] (matmul x @ W): view it transposed
    bias_target: str | None = None

    def weight(self, gm: torch.nn.Module) -> torch.Tensor:
        """The stored weight, as stored (conv: [out, in/groups, *k])."""
        return get_attr_value(gm, self.weight_target)

    def weight_2d(self, gm: torch.nn.Module) -> torch.Tensor:
        """The weight viewed as [out_features, in_features] (conv: [out, in/groups * prod(k)])."""
        w = self.weight(gm).detach()
        if self.transposed:
            w = w.t()
        return w.reshape(w.shape[0], -1)


def get_attr_value(gm: torch.nn.Module, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(gm)


def _const_weight(gm: fx.GraphModule, arg: Any) -> tuple[str, bool] | None:
    """(attribute target, transposed?) if `arg` is a get_attr, or a transpose of one."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        return arg.target, False
    if arg.op == "call_function" and arg.target in _TRANSPOSES and isinstance(arg.args[0], fx.Node):
        src = arg.args[0]
        if src.op == "get_attr" and get_attr_value(gm, src.target).dim() == 2:
            return src.target, True
    return None


def layer_name(target: str) -> str:
    """A weight's layer name: its module's qualified name for `<module>.weight`, else the path."""
    return target[: -len(".weight")] if target.endswith(".weight") else target


def linear_sites(gm: fx.GraphModule) -> list[LinearSite]:
    """Every matmul-like node with a constant weight, in graph order."""
    sites: list[LinearSite] = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _LINEAR | _CONV:
            w = _const_weight(gm, node.args[1])
            if w is None or w[1]:
                continue
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            bias_t = bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
            kind = "linear" if node.target in _LINEAR else "conv"
            sites.append(LinearSite(node, kind, layer_name(w[0]), w[0], False, bias_t))
        elif node.op == "call_function" and node.target in _MATMUL:
            w = _const_weight(gm, node.args[1])
            if w is None or get_attr_value(gm, w[0]).dim() != 2:
                continue
            # x @ W stores W as [in, out]; x @ W.t() (a Linear spelled by hand) stores [out, in].
            sites.append(LinearSite(node, "matmul", layer_name(w[0]), w[0], not w[1]))
        elif node.op == "call_function" and node.target is aten.addmm.default:
            w = _const_weight(gm, node.args[2])
            if w is None:
                continue
            b = node.args[0]
            bias_t = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
            sites.append(LinearSite(node, "matmul", layer_name(w[0]), w[0], not w[1], bias_t))
        elif node.op == "call_module":
            # Graphs imported from ONNX (onnx2torch) keep nn.Linear / nn.Conv as modules.
            mod = modules.get(node.target)
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)):
                kind = "linear" if isinstance(mod, torch.nn.Linear) else "conv"
                bias_t = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
                sites.append(LinearSite(node, kind, node.target, f"{node.target}.weight", False, bias_t))
    return sites


# ---------------------------------------------------------------------------------------------
# Printing


def _short_target(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_function":
        name = getattr(t, "__name__", str(t))
        if isinstance(t, torch._ops.OpOverload):
            ns = t.namespace
            name = f"{ns}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
        return name
    return str(t)


def _fmt_val(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dt = str(val.dtype).replace("torch.", "")
        dt = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "int64": "i64", "int32": "i32", "bool": "i1"}.get(dt, dt)
        return f"{dt}[{', '.join(str(s) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_fmt_val(v) for v in val) + ")"
    return ""


def _fmt_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return "%" + a.name
    if isinstance(a, (tuple, list)):
        inner = ", ".join(_fmt_arg(x) for x in a)
        return f"[{inner}]"
    if isinstance(a, torch.dtype):
        return str(a).replace("torch.", "")
    return repr(a)


def _fmt_meta(value: Any) -> str:
    if hasattr(value, "summary"):
        return value.summary()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_fmt_meta(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, torch.Tensor):
        return _fmt_val(value)
    text = str(value)
    return text if len(text) < 80 else text[:77] + "..."


def format_graph(gm: fx.GraphModule, *, annotations: bool = True) -> str:
    """The printed IR: one line per node, `sparsecomp.*` annotations after `#`."""
    lines = []
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lines.append("graph(" + ", ".join(f"%{n.name}: {_fmt_val(n.meta.get('val'))}" for n in inputs) + ") {")
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            lines.append(f"  return {_fmt_arg(node.args[0])}")
            continue
        if node.op == "get_attr":
            rhs = f"get_attr {node.target}"
        else:
            args = [_fmt_arg(a) for a in node.args] + [f"{k}={_fmt_arg(v)}" for k, v in node.kwargs.items()]
            rhs = f"{_short_target(node)}({', '.join(args)})"
        val = _fmt_val(node.meta.get("val"))
        line = f"  %{node.name} = {rhs}" + (f" : {val}" if val else "")
        if annotations:
            notes = [f"{k[len(META_PREFIX):]}({_fmt_meta(v).strip('{}')})" for k, v in node.meta.items() if k.startswith(META_PREFIX)]
            if notes:
                line += "  # " + "; ".join(notes)
        lines.append(line)
    lines.append("}")
    return "\n".join(lines)


def fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the printed IR (structure and annotations): equal fingerprints = unchanged IR."""
    return hashlib.sha1(format_graph(gm).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Running and comparing


def normalize_inputs(inputs: Any) -> tuple[tuple, dict]:
    """Example inputs / calibration batches -> (args, kwargs).

    A tensor is one positional arg; a tuple or list holds positional args; a dict holds keyword
    args; an explicit `(args_tuple, kwargs_dict)` pair is taken as is.
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        if len(inputs) == 2 and isinstance(inputs[0], tuple) and isinstance(inputs[1], dict):
            return tuple(inputs[0]), dict(inputs[1])
        return tuple(inputs), {}
    raise TypeError(
        f"example inputs must be a tensor, a tuple/list of positional inputs or a dict of keyword "
        f"inputs, got {type(inputs).__name__}"
    )


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The graph's placeholder values for a call `gm(*args, **kwargs)` (exported calling convention)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(args) + list(kwargs.values())
    from torch.fx._pytree import tree_flatten_spec

    return tree_flatten_spec((args, kwargs), spec)

def describe_inputs(batch: tuple[tuple, dict]) -> str:
    """`(float32[4, 64], mask=int64[4, 8])`: an `(args, kwargs)` batch as errors show it."""
    args, kwargs = batch

    def one(v):
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).replace('torch.', '')}[{', '.join(map(str, v.shape))}]"
        return type(v).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def describe_graph_inputs(gm: fx.GraphModule) -> str:
    """`(float32[s0, 16])`: a captured graph's own inputs, as `describe_inputs` shows a batch."""
    vals = [ph.meta.get("val") for ph in gm.graph.nodes if ph.op == "placeholder"]
    return "(" + ", ".join(f"{str(v.dtype).replace('torch.', '')}[{', '.join(map(str, v.shape))}]"
                           if isinstance(v, torch.Tensor) else "?" for v in vals) + ")"


def check_batches_fit(gm: fx.GraphModule, example: tuple[tuple, dict], batches: list[tuple[tuple, dict]],
                      what: str = "calibration batch") -> None:
    """Every batch (`(args, kwargs)`) has the example inputs' structure, dtypes and ranks, and the
    same size on every dimension the capture recorded as static; else a `SparsecompError` naming
    the batch, what it holds and what was expected (not an assertion from deep inside the graph's
    guards)."""
    from sparsecomp.errors import SparsecompError

    ex_args, ex_kwargs = example
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # no example (a GraphModule captured earlier): the graph's own inputs are the reference
    have_example = bool(ex_args or ex_kwargs)
    expected = describe_inputs(example) if have_example else describe_graph_inputs(gm)
    for i, batch in enumerate(batches):
        args, kwargs = batch
        bad = have_example and (len(args) != len(ex_args) or set(kwargs) != set(ex_kwargs))
        if not bad:
            try:
                flat = flat_inputs(gm, args, kwargs)
            except Exception:  # noqa: BLE001 - pytree spec mismatch: the structure differs
                flat, bad = [], True
            for value, ph in zip(flat, placeholders):
                val = ph.meta.get("val")
                if not isinstance(val, torch.Tensor):
                    continue
                if not isinstance(value, torch.Tensor) or value.dtype != val.dtype or value.dim() != val.dim():
                    bad = True
                    break
                if any(isinstance(d, int) and d != s for d, s in zip(val.shape, value.shape)):
                    bad = True
                    break
        if bad:
            raise SparsecompError(
                f"{what} {i} does not fit the model's inputs: got {describe_inputs(batch)}, "
                f"expected inputs like {expected}",
                hint="each batch must have the example inputs' structure, dtypes and ranks "
                     "(only dimensions captured as dynamic, such as the batch, may differ)")


def _children(spec) -> list:
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)  # torch < 2.10


def global_module_hooks() -> bool:
    """Whether a hook is registered for every nn.Module (`register_module_forward_hook` & co.):
    callers that skip nn.Module's call machinery for speed must not skip those."""
    m = _nn_module
    return bool(m._global_forward_pre_hooks or m._global_forward_hooks or m._global_backward_pre_hooks
                or m._global_backward_hooks)


def plain_call_convention(gm: fx.GraphModule) -> bool:
    """Where an exported graph takes only positional tensors and returns one tensor (or a flat
    tuple of them), generate its forward without pytree flatten / unflatten (in place; returns
    whether it did). Those two calls cost ~20 us per call hot, over 100 us after a kernel has
    streamed the caches: a visible share of a one-token MLP call. The signature keeps the
    original argument names; anything richer (keyword inputs, dicts, model-output classes) keeps
    the exported convention."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return False
    in_spec, out_spec = info.in_spec, info.out_spec
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if in_spec.type is not tuple or in_spec.num_children != 2:
        return False
    args_spec, kwargs_spec = _children(in_spec)
    if args_spec.type is not tuple or kwargs_spec.type is not dict or kwargs_spec.num_children != 0:
        return False
    if not all(c.is_leaf() for c in _children(args_spec)) or len(placeholders) != args_spec.num_children:
        return False
    if [n.name for n in placeholders] != list(info.orig_args):
        return False  # callers may pass the arguments by these names
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = output.args[0]
    if out_spec is None or not isinstance(results, (tuple, list)):
        return False
    if out_spec.is_leaf() and len(results) == 1:
        output.args = (results[0],)
    elif not (out_spec.type is tuple and all(c.is_leaf() for c in _children(out_spec)) and len(results) == out_spec.num_children):
        return False
    gm.graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    return True


def run_graph(module: torch.nn.Module, inputs: Any) -> Any:
    args, kwargs = normalize_inputs(inputs)
    with torch.no_grad():
        return module(*args, **kwargs)


def _leaves(out: Any) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):  # HF ModelOutput
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def output_cosine(actual: Any, reference: Any) -> float:
    """The smallest cosine similarity between corresponding output tensors (flattened); 0.0 when
    the structures or shapes differ or a value is not finite."""
    a_leaves, r_leaves = _leaves(actual), _leaves(reference)
    if len(a_leaves) != len(r_leaves):
        return 0.0
    worst = 1.0
    for a, r in zip(a_leaves, r_leaves):
        if a.shape != r.shape:
            return 0.0
        a, r = a.detach().double().flatten(), r.detach().double().flatten()
        if not (torch.isfinite(a).all() and torch.isfinite(r).all()):
            return 0.0
        if a.numel() and (a.norm() > 0 or r.norm() > 0):
            worst = min(worst, float(torch.nn.functional.cosine_similarity(a, r, dim=0)))
    return worst


def compare_outputs(actual: Any, reference: Any, *, rtol: float = 1e-4) -> tuple[bool, float, float]:
    """(ok, max abs error, allowed) with allowed = rtol x max|reference| per output tensor.

    NaN must appear in the same places in both; shapes must agree.
    """
    a_leaves, r_leaves = _leaves(actual), _leaves(reference)
    if len(a_leaves) != len(r_leaves):
        return False, float("inf"), 0.0
    worst, allowed_at_worst, ok = 0.0, 0.0, True
    for a, r in zip(a_leaves, r_leaves):
        if a.shape != r.shape:
            return False, float("inf"), 0.0
        a, r = a.detach().double(), r.detach().double()
        if not torch.equal(torch.isnan(a), torch.isnan(r)):
            return False, float("nan"), 0.0
        inf = torch.isinf(r)
        if not torch.equal(a[inf], r[inf]):  # +-inf exactly where the reference has it
            return False, float("inf"), 0.0
        finite = torch.isfinite(r)
        if not torch.isfinite(a[finite]).all():
            return False, float("inf"), 0.0
        if finite.any():
            err = (a[finite] - r[finite]).abs().max().item()
            allowed = rtol * max(r[finite].abs().max().item(), 1e-30)
            if err > allowed:
                ok = False
            if err >= worst:
                worst, allowed_at_worst = err, allowed
    return ok, worst, allowed_at_worst


class _InputRecorder(fx.Interpreter):
    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes, self.inputs = set(nodes), {}

    def run_node(self, n):
        if n in self.nodes:
            self.inputs[n] = self.env[n.args[0]].detach().clone()
        return super().run_node(n)


def record_inputs(gm: fx.GraphModule, nodes: list[fx.Node], example: tuple[tuple, dict]) -> dict[fx.Node, torch.Tensor]:
    """The first input of each of `nodes` on the example inputs (one Interpreter run), so a backend
    times and checks its candidates on a layer's real input."""
    rec = _InputRecorder(gm, nodes)
    with torch.no_grad():
        rec.run(*flat_inputs(gm, *example))
    return rec.inputs
