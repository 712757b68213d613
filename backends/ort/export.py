"""FX graph with sparsecomp ops -> one ONNX model for stock onnxruntime.

How (why not a custom translation per layer): torch's ONNX exporter translates an op with ONE
function, but every `sparse_linear` (and `sparse_mlp`) node gets its own measured lowering and its
own arrays. So the graph is exported with each as an opaque placeholder node
`sparsecomp::SparseLinear(x, tag)` / `sparsecomp::SparseMLP(x, tag)` (`custom_translation_table`
entries), and the placeholders are then replaced in the ModelProto by the chosen candidate's
standard-ONNX nodes and initializers (`kernels.py`, `mlp.py`). This also keeps the narrow index
storage exactly as written: the exporter's optimizer constant-folds a Cast applied to an
initializer (DESIGN.md section 3), but it never sees ours. The placeholder's second input is a tiny
tag tensor holding the layer's index (`[out, 1]`; an MLP's `[1, out]` stands for its w_down_t, whose
columns give the op's output size), unique by value, so initializer de-duplication cannot confuse
two layers, and the weights are never serialised by the exporter at all; the other tensor
arguments are passed as None (the lowering adds its own). A sparse_mlp node with no placement (its
weights are not constants) is exported as its reference implementation, with a note.

Steps: (1) a shallow copy of the graph with tags instead of weights, each self-attention over
block-format projections one placeholder too (`attention.fuse_sites`); (2) `torch.export` with the
batch / sequence dims recorded dynamic at capture (size-1 dims traced at size 2, as capture does);
(3) sparsecomp ops with no ONNX lowering are decomposed into their reference implementation (a
dense fallback, reported); (4) `torch.onnx.export(..., dynamo=True)`; (5) placeholders replaced
(block layers in a row pass their activations on transposed: `chain_orientations`),
dynamic dims renamed `batch` / `sequence`, metadata attached. (The full `onnx.checker` pass runs
when the file is written, `files.save`; onnxruntime checks the model as it opens the session.)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from sparsecomp.dialect import SPARSE_LINEAR, SPARSE_MLP
from sparsecomp.errors import OnnxError
from sparsecomp.frontend import grow

from . import attention
from .kernels import MIN_OPSET, Candidate, Emitter, Orientation

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "Placement", "check_opset", "export_graph"]

DEFAULT_OPSET = 20  # what torch 2.13's exporter writes by default
LOWERED = (SPARSE_LINEAR, SPARSE_MLP)  # sparsecomp ops with an ONNX lowering here (placeholders)
DOMAIN = "sparsecomp.placeholder"
# the decision facts a `sparsecomp.layers` record keeps; an MLP's record has op="sparse_mlp", its
# shape is [in, hidden, out] and `linears` names its up / gate / down Linears
RECORD_KEYS = ("input", "output", "density", "m", "dense_us", "chosen_us", "op", "mode", "activation", "linears", "parts",
               "layout")
# Elementwise ops (one input, one output, no axis) a transposed activation may pass through between
# two chained block layers (`chain_orientations`): they give the same values in either layout.
ELEMENTWISE = frozenset({"Relu", "LeakyRelu", "Gelu", "Tanh", "Sigmoid", "Elu", "Selu", "Celu", "Softplus", "Softsign",
                         "HardSigmoid", "HardSwish", "Mish", "Erf", "Identity", "Abs", "Neg", "Exp"})


@dataclass
class Placement:
    """One sparse_linear (or sparse_mlp) node and how it is lowered."""

    node: str  # FX node name
    layer: str
    candidate: Candidate
    shape: list[int]  # [out, in]; an MLP's [in, hidden, out]
    extra: dict = field(default_factory=dict)  # decision facts for the metadata ({"op": "sparse_mlp", ...} for MLPs)

    @property
    def out_features(self) -> int:
        return self.shape[-1] if self.extra.get("op") == "sparse_mlp" else self.shape[0]


def check_opset(opset: int | None) -> int:
    opset = DEFAULT_OPSET if opset is None else opset
    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise OnnxError(f"opset must be an int, got {opset!r}", hint=f"e.g. opset={DEFAULT_OPSET}")
    if opset < MIN_OPSET:
        raise OnnxError(f"opset {opset} is too old for sparsecomp's ONNX lowering: the minimum is opset {MIN_OPSET} "
                        "(ScatterElements with reduction='add', Shape with start/end)",
                        hint=f"use opset >= {MIN_OPSET} (default {DEFAULT_OPSET})")
    if opset > newest:
        raise OnnxError(f"opset {opset} is newer than this onnx package knows ({newest})", hint=f"use opset <= {newest}")
    return opset


def _placeholder(name: str, inputs: tuple[str, ...] = ("x", "tag"), bool_inputs: tuple[str, ...] = ()):
    import onnxscript
    from onnx.defs import OpSchema

    P = OpSchema.FormalParameter
    floats = ["tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(name, DOMAIN, 1, inputs=[P(i, "B" if i in bool_inputs else "T") for i in inputs], outputs=[P("y", "T")],
                      type_constraints=[("T", floats, "")] + ([("B", ["tensor(bool)", *floats], "")] if bool_inputs else []))
    return onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), name, schema)


def _placeholder_table() -> dict:
    """The exporter's translations of the lowered ops: opaque placeholders (x, tag), and an
    attention site's (q, k, v[, mask], tag)."""
    linear, mlp = _placeholder("SparseLinear"), _placeholder("SparseMLP")
    plain = _placeholder("Attention", ("q", "k", "v", "tag"))
    masked = _placeholder("Attention", ("q", "k", "v", "mask", "tag"), bool_inputs=("mask",))

    def sparse_linear(x, weight, bias=None):  # names as the op's schema; weight is the tag here
        return linear(x, weight)

    def sparse_mlp(x, w_up, b_up=None, w_gate=None, b_gate=None, w_down_t=None, b_down=None, activation="relu",
                   mode="exact", threshold=None, scale=None, pred_a=None, pred_bt=None):  # w_down_t is the tag
        return mlp(x, w_down_t)

    def ort_attention(q, k, v, mask=None, tag=None, heads=1, scale=None):  # heads, scale: the site's record
        return plain(q, k, v, tag) if mask is None else masked(q, k, v, mask, tag)

    return {torch.ops.sparsecomp.sparse_linear.default: sparse_linear, torch.ops.sparsecomp.sparse_mlp.default: sparse_mlp,
            attention.ort_attention.default: ort_attention}


def _tagged_copy(gm: fx.GraphModule, placements: dict[str, Placement], notes: list[str]) -> tuple[fx.GraphModule, list[attention.Site]]:
    """A GraphModule sharing gm's parameters whose lowered nodes read tags instead of weights, and
    whose self-attention over block-format projections is one `ort_attention` node (`attention.py`)."""
    import copy

    from sparsecomp.ops import op_def

    with warnings.catch_warnings():
        # deep-copying the graph's pytree specs trips a deprecation inside torch itself
        # (`isinstance(treespec, LeafSpec)`, torch 2.13), printed on every ort compile otherwise
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec.*")
        new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = new.graph
    for i, node in enumerate([n for n in graph.nodes if n.op == "call_function" and str(n.target) in LOWERED]):
        p = placements.get(node.name)
        if p is None and str(node.target) == SPARSE_MLP:  # not lowered: its reference, traced to aten by export
            node.target = op_def(node.target).reference
            notes.append(f"sparsecomp.sparse_mlp (node {node.name}) has no ONNX lowering here: exported as its dense "
                         "reference decomposition")
            continue
        p = placements[node.name]  # every sparse_linear has one
        linear = str(node.target) == SPARSE_LINEAR
        attr = f"_sparsecomp_tag_{i}"
        new.register_buffer(attr, torch.full((p.out_features, 1) if linear else (1, p.out_features), float(i)))
        with graph.inserting_before(node):
            tag = graph.get_attr(attr)
        if linear:
            node.args = (node.args[0], tag, None)
        else:
            strs = dict(zip(("activation", "mode"), node.args[7:9])) | {k: v for k, v in node.kwargs.items() if k in ("activation", "mode")}
            node.args = (node.args[0], tag, None, None, None, tag, None, strs["activation"], strs["mode"], None, None, None, None)
            node.kwargs = {}
        p.extra["tag"] = i
    sites = attention.fuse_sites(new, {name: p.candidate.chains for name, p in placements.items()})
    if sites:
        notes.append(f"{len(sites)} self-attention block(s) run on transposed heads: their block-format q / k / v "
                     "projections feed the attention without Transposes")
    # the dense weights of sparse layers are no longer read (unless something else reads them)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    new.recompile()
    for key in ("_in_spec", "_out_spec"):
        if hasattr(gm, key):
            setattr(new, key, getattr(gm, key))
    new.meta.update(gm.meta)
    return new, sites


def _dynamic(gm: fx.GraphModule, args: tuple, kwargs: dict, dynamic_axes: Any) -> dict[str, list[int]]:
    """Input name -> dims to keep dynamic: capture's record ("auto"), none (None/False), or given."""
    if dynamic_axes in (None, False):
        return {}
    info = gm.meta.get("sparsecomp.capture")
    if dynamic_axes == "auto":
        return dict(info.dynamic) if info is not None else {}
    if isinstance(dynamic_axes, dict):
        bound = _bound_inputs(gm, args, kwargs)
        out = {}
        for name, dims in dynamic_axes.items():  # a list of dims, or a dict {dim: name} (names are ours)
            value = bound.get(name)
            rank = value.dim() if isinstance(value, torch.Tensor) else 0
            bad = [d for d in dims if not isinstance(d, int) or not 0 <= d < rank]
            if name in bound and bad:
                raise OnnxError(f"dynamic_axes[{name!r}] names dims {bad} of a rank-{rank} input",
                                hint=f"dims of {name!r} are 0..{rank - 1}")
            out[name] = sorted(dims)
        return out
    raise OnnxError(f"dynamic_axes must be 'auto', None or a dict {{input name: [dims]}}, got {dynamic_axes!r}")


@contextlib.contextmanager
def _quiet():
    names = ["torch.onnx", "torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes", "onnxscript"]
    old = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, lvl in zip(names, old):
            logging.getLogger(n).setLevel(lvl)


def _input_names(gm: fx.GraphModule) -> list[str]:
    import inspect

    return [p.name for p in inspect.signature(gm.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _bound_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> dict[str, Any]:
    return dict(zip(_input_names(gm), args)) | kwargs


def _export_program(gm: fx.GraphModule, args: tuple, kwargs: dict, dyn: dict[str, list[int]], label: str):
    from torch.export import Dim

    names = _input_names(gm)
    unknown = sorted(set(dyn) - set(names))
    if unknown:
        raise OnnxError(f"dynamic_axes names inputs {unknown} that {label} does not take", hint=f"its inputs: {', '.join(names)}")
    bound = _bound_inputs(gm, args, kwargs)
    grown = {k: grow(v, dyn[k]) if isinstance(v, torch.Tensor) and k in dyn else v for k, v in bound.items()}
    spec = {k: ({d: Dim.AUTO for d in dyn[k]} if k in dyn and isinstance(v, torch.Tensor) else None) for k, v in bound.items()}
    ordered = [k for k in names if k in bound]
    with _quiet():
        try:
            return torch.export.export(gm, (), {k: grown[k] for k in ordered}, dynamic_shapes={k: spec[k] for k in ordered} if dyn else None,
                                       strict=False), True
        except Exception:
            if not dyn:
                raise
        # the graph does not allow those dims dynamic (or not at size 2): export static shapes
        return torch.export.export(gm, (), {k: bound[k] for k in ordered}, strict=False), False


def _reference_decompositions(ep, notes: list[str]):
    """sparsecomp ops with no ONNX lowering here (all but `LOWERED`): export their reference
    implementation (dense), and say so. This is the spot a new op's lowering replaces."""
    from sparsecomp.ops import is_sparsecomp_op, op_def

    table = {}
    for node in ep.graph.nodes:
        if node.op == "call_function" and is_sparsecomp_op(node.target) and str(node.target) not in (*LOWERED, attention.ATTENTION):
            d = op_def(node.target)
            table[node.target] = d.reference
            notes.append(f"{d.qualname} (node {node.name}) has no ONNX lowering in the ort backend: exported as its dense "
                         "reference decomposition")
    if not table:
        return ep
    try:
        with _quiet():
            return ep.run_decompositions(table)
    except Exception as err:  # noqa: BLE001
        ops = ", ".join(sorted(str(k) for k in table))
        raise OnnxError(f"cannot export {ops}: no ONNX lowering, and its reference implementation does not decompose "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})",
                        hint="compile with backend='torch', or drop the rewrite that creates it from the pipeline") from None


def _tensor_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            for a in n.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
    return None


def _rename_dims(model: onnx.ModelProto, dyn: dict[str, list[int]]) -> None:
    """The exporter names dynamic dims s31, s81...: call them batch / sequence (by capture's rule:
    dim 0 is the batch, dim 1 the sequence) wherever they appear."""
    names: dict[str, str] = {}
    for vi in model.graph.input:
        for d, dim in enumerate(vi.type.tensor_type.shape.dim):
            if dim.dim_param and dim.dim_param not in names and d in dyn.get(vi.name, [0, 1]):
                names[dim.dim_param] = "batch" if d == 0 else "sequence" if d == 1 else f"dim{d}"
    if not names or len(set(names.values())) != len(names):
        return
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def export_graph(gm: fx.GraphModule, example: tuple[tuple, dict], placements: dict[str, Placement], *, opset: int | None,
                 dynamic_axes: Any = "auto", label: str = "model", notes: list[str] | None = None) -> tuple[onnx.ModelProto, dict]:
    """The ONNX model of `gm` with every sparse_linear / sparse_mlp lowered as `placements` say.

    Returns (model, info) with info = {"dynamic": {input name: dims kept dynamic}}.
    """
    import sparsecomp

    notes = notes if notes is not None else []
    opset = check_opset(opset)
    args, kwargs = example
    dyn = _dynamic(gm, args, kwargs, dynamic_axes)
    tagged, sites = _tagged_copy(gm, placements, notes)
    try:
        ep, kept = _export_program(tagged, args, kwargs, dyn, label)
    except OnnxError:
        raise
    except Exception as err:
        raise OnnxError(f"cannot export {label} to ONNX: torch.export failed ({type(err).__name__}: "
                        f"{str(err).strip().splitlines()[0][:300] if str(err).strip() else ''})",
                        hint="the captured graph must re-export; --debug shows the trace") from err
    if dyn and not kept:
        notes.append("the exported model has static input shapes (the graph does not allow the recorded dynamic dims)")
        dyn = {}
    ep = _reference_decompositions(ep, notes)
    table = _placeholder_table()
    try:
        with _quiet():
            prog = torch.onnx.export(ep, (), kwargs={}, dynamo=True, custom_translation_table=table, opset_version=opset,
                                     optimize=True, verbose=False)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise OnnxError(f"torch.onnx.export failed on {label} at opset {opset}: {first}",
                        hint="try the default opset; --debug shows the trace") from err
    model = prog.model_proto
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if written != opset:  # torch's exporter raises the opset when the model needs newer ops
        raise OnnxError(f"{label} cannot be written at ONNX opset {opset}: torch's exporter wrote opset {written} "
                        "(the model needs newer ops)", hint=f"ask for a newer opset (default {DEFAULT_OPSET})")
    by_tag = {p.extra["tag"]: p for p in placements.values() if "tag" in p.extra}
    site_records = _lower_placeholders(model, by_tag, sites)
    if dyn:
        _rename_dims(model, dyn)
    layers = []
    for p in sorted(by_tag.values(), key=lambda p: p.extra["tag"]):
        layers.append({"layer": p.layer, "node": p.node, "shape": p.shape, "kernel": p.candidate.label,
                       "family": p.candidate.family, "decision": p.candidate.decision, "arrays": p.extra.get("arrays", {}),
                       "block": p.extra.get("block"), "stored_bytes": p.candidate.stored_bytes,
                       **{k: v for k, v in p.extra.items() if k in RECORD_KEYS}})
    meta = {
        "sparsecomp.version": sparsecomp.__version__,
        "sparsecomp.backend": "ort",
        "sparsecomp.layers": json.dumps(layers),
        "sparsecomp.inputs": json.dumps(_input_record(args, kwargs, tagged, dyn)),
    }
    if site_records:
        meta["sparsecomp.attention"] = json.dumps(site_records)
    set_metadata(model, meta)
    model.producer_name, model.producer_version = "sparsecomp", sparsecomp.__version__
    return model, {"dynamic": dyn}


def _input_record(args, kwargs, gm, dyn) -> list[dict]:
    """Name, shape, dtype and value range of each example input (so `bench model.onnx` can make inputs)."""
    out = []
    for k, v in _bound_inputs(gm, args, kwargs).items():
        if isinstance(v, torch.Tensor):
            rec = {"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "dynamic": dyn.get(k, [])}
            if not v.is_floating_point() and v.numel():
                rec["min"], rec["max"] = int(v.min()), int(v.max())
            out.append(rec)
    return out


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    keep = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)


def _tagged(g: onnx.GraphProto, node: onnx.NodeProto, by_tag: dict):
    """What a placeholder stands for (a layer's Placement, an attention Site), by its tag: its last input."""
    tag = _tensor_value(g, node.input[-1])
    if tag is None or tag.size == 0 or int(tag.reshape(-1)[0]) not in by_tag:
        raise OnnxError(f"internal: cannot identify the sparse layer or attention of placeholder {node.name}",
                        hint="please report it (--debug shows the trace)")
    return by_tag[int(tag.reshape(-1)[0])]


def chain_orientations(g: onnx.GraphProto, placements: dict[str, Placement],
                       sites: dict[str, attention.Site] | None = None) -> tuple[set[str], set[str], set[str]]:
    """Which lowered layers pass their activation on transposed (`kernels.Orientation`).

    A layer whose kernel `chains` (block formats) and whose output reaches another such layer's
    input only through `ELEMENTWISE` ops, each tensor on the way read by exactly one node and none a
    graph output, leaves y^T for it: `Linear -> GELU -> Linear` with both Linears block-sparse keeps
    the hidden activation [hidden, M] and pays no Transpose between them. An attention site
    (`attention.py`) reads its q / k / v transposed always, and passes its context on transposed
    by the same rule as a layer.

    `placements`: placeholder output name -> its Placement; `sites`: Attention placeholder output
    name -> its Site. Returns (the outputs of the layers and sites that leave y^T, the outputs of the
    layers that read x^T, the tensors on the way whose shape the chaining changes).
    """
    sites = sites or {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    graph_outputs = {o.name for o in g.output}
    leave_t: set[str] = set()
    read_t: set[str] = set()
    changed: set[str] = set()
    for out in [o for o, p in placements.items() if p.candidate.chains] + list(sites):
        t, way = out, [out]
        while t not in graph_outputs and len(readers.get(t, [])) == 1:
            n = readers[t][0]
            if n.domain == DOMAIN:
                q = placements.get(n.output[0])
                if q is not None and q.candidate.chains and n.input[0] == t and t not in n.input[1:]:
                    leave_t.add(out)
                    read_t.add(n.output[0])
                    changed.update(way)
                break
            if n.domain not in ("", "ai.onnx") or n.op_type not in ELEMENTWISE or len(n.input) != 1 or len(n.output) != 1:
                break
            t = n.output[0]
            way.append(t)
    by_out = {n.output[0]: n for n in g.node}
    for out in sites:
        for t in by_out[out].input[:3]:  # q, k, v: fused only where their layers chain (attention.fuse_sites)
            p = placements.get(t)
            if p is None or not p.candidate.chains or len(readers.get(t, [])) != 1 or t in graph_outputs:
                raise OnnxError(f"internal: attention input {t} is not a block-format layer's own output",
                                hint="please report it (--debug shows the trace)")
            leave_t.add(t)
            changed.add(t)
    return leave_t, read_t, changed


def _static_dim(g: onnx.GraphProto, name: str | None, axis: int) -> int | None:
    """The size of `name`'s dim `axis` where the exported graph fixes it (static shapes), else None."""
    for vi in [*g.input, *g.value_info]:
        if vi.name == name and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            return dims[axis].dim_value if len(dims) > axis and dims[axis].HasField("dim_value") else None
    return None


def _lower_placeholders(model: onnx.ModelProto, by_tag: dict[int, Placement], sites: list[attention.Site] | None = None) -> list[dict]:
    """Replace the placeholders by their chosen nodes; returns the attention sites' records (`attention.record`)."""
    g = model.graph
    ours = [node for node in g.node if node.domain == DOMAIN]
    placements = {node.output[0]: _tagged(g, node, by_tag) for node in ours if node.op_type != "Attention"}
    # A module called more than once (shared weights) is lowered once per call: its later calls are
    # named `layer#2`, ... so node, initializer and metadata names stay unique (a re-export keeps them).
    calls: dict[str, int] = {}
    for p in placements.values():
        base = p.extra.setdefault("module", p.layer)
        calls[base] = calls.get(base, 0) + 1
        p.layer = base if calls[base] == 1 else f"{base}#{calls[base]}"
    sites_by_tag = {attention.TAG_BASE + i: site for i, site in enumerate(sites or [])}
    site_of = {node.output[0]: _tagged(g, node, sites_by_tag) for node in ours if node.op_type == "Attention"}
    x_of = {node.output[0]: node.input[0] for node in ours}
    leave_t, read_t, changed = chain_orientations(g, placements, site_of)
    lead_of: dict[str, str] = {}  # transposed tensor -> the tensor holding its original leading dims
    new_nodes, new_inits, dropped, site_records = [], [], set(), []
    for node in g.node:
        if node.domain != DOMAIN:
            new_nodes.append(node)
            if node.input and node.input[0] in lead_of:  # an elementwise op on the way between two block layers
                lead_of[node.output[0]] = lead_of[node.input[0]]
            continue
        if node.op_type == "Attention":
            site, y_t = site_of[node.output[0]], node.output[0] in leave_t
            dropped.add(node.input[-1])
            e = Emitter(f"{placements[node.input[0]].layer}.attention")
            lead = lead_of[node.input[0]]
            if y_t:
                lead_of[node.output[0]] = lead
            mask = node.input[3] if len(node.input) == 5 else None
            batch = _static_dim(g, x_of[node.input[0]], 0)  # the q projection's input [B, S, F]
            attention.emit(e, site, *node.input[:3], mask, node.output[0], lead=lead, y_t=y_t, batch=batch)
            site_records.append(attention.record(site, e.prefix, node.input[:3], mask, node.output[0], y_t))
            new_nodes.extend(e.nodes)
            new_inits.extend(e.initializers)
            continue
        p = placements[node.output[0]]
        dropped.add(node.input[1])
        e = Emitter(p.layer)
        x_t, y_t = node.output[0] in read_t, node.output[0] in leave_t
        if x_t or y_t:
            lead = lead_of[node.input[0]] if x_t else e.node("Shape", [node.input[0]], end=-1)
            if y_t:
                lead_of[node.output[0]] = lead
            p.candidate.emit(e, node.input[0], node.output[0], Orientation(x_t=x_t, y_t=y_t, lead=lead))
            p.extra["layout"] = {"x": "transposed" if x_t else "plain", "y": "transposed" if y_t else "plain"}
        else:
            p.candidate.emit(e, node.input[0], node.output[0])
        new_nodes.extend(e.nodes)
        new_inits.extend(e.initializers)
        p.extra["arrays"] = dict(e.arrays)
        p.extra["input"], p.extra["output"] = node.input[0], node.output[0]
        if p.candidate.block is not None:
            p.extra["block"] = list(p.candidate.block)
    # The tags were read only by the placeholders: drop them (initializers or Constant nodes).
    used = {i for n in new_nodes for i in n.input}
    gone = dropped - used
    nodes = [n for n in new_nodes if not (n.op_type == "Constant" and n.output[0] in gone)]
    inits = [t for t in g.initializer if t.name not in gone] + new_inits
    value_info = [v for v in g.value_info if v.name not in gone and v.name not in changed]  # chained: [features, M] now
    opsets = [o for o in model.opset_import if o.domain != DOMAIN]
    for field_, items in ((g.node, nodes), (g.initializer, inits), (g.value_info, value_info), (model.opset_import, opsets)):
        del field_[:]
        field_.extend(items)
    return site_records


def check(model: onnx.ModelProto, path: str | None = None) -> None:
    """Full onnx.checker pass (by path for models over the protobuf limit)."""
    try:
        onnx.checker.check_model(path if path is not None else model, full_check=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise OnnxError(f"the exported model fails onnx.checker: {first}", hint="please report it (--debug shows the trace)") from err

