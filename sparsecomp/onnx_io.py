"""ONNX in and out of sparsecomp: load a file, find its weights, impose patterns, import to FX.

Four entry points:

- `load_onnx(path)` reads a model and its external data, and turns every way that can fail
  (missing file, a directory, not ONNX, truncated, external data missing or short) into one
  `OnnxError` line naming the file.
- `onnx_weight_sites(model)` finds the weight of every Linear/Conv layer *on the ONNX graph
  itself* (no import, so it works on any file onnxruntime runs) as `OnnxWeightSite`s: a layer
  name, the consuming node, the tensor storing the weight, and a copy of the weight in
  sparsecomp's `[out_features, in_features]` orientation. Conv weights stay `[out, in, kh, kw]`;
  `site.weight_2d` is their `[out, in*kh*kw]` view, the one `sparsecomp.patterns` measures and
  imposes on (N:M groups run along in_features of that view).
- `impose_onnx(model, spec, layers)` imposes a weight pattern on those sites, in `[out, in]`
  orientation exactly as `sparsecomp.patterns.impose` does on the nn.Module, and writes each
  weight back in the orientation and dtype its tensor is stored in: the model still runs in stock
  onnxruntime.
- `import_onnx(model_or_path)` converts to a `torch.fx.GraphModule` with onnx2torch, plus the
  converters and fixes torch 2.13's exports need.

What torch 2.13 exports (measured; the site finder is built around it)
----------------------------------------------------------------------
nn.Linear, `dynamo=True` (the default exporter, opset 20):
  - 2-D input: `Gemm(x, W[, b], transB=1)`; W is the parameter under its own name (`fc1.weight`,
    stored `[out, in]`).
  - 3-D input: `MatMul(x, Wt)` then `Add(., b)`. `Wt` is a *new* initializer (`val_12`, stored
    `[in, out]`) that the onnxscript optimizer constant-folded from `transpose(W)`; the parameter
    name survives only as metadata on its value_info: `pkg.onnxscript.optimizer.folded_from =
    "['fc1.weight']"`. With `optimize=False` it is `MatMul(x, Transpose(fc1.weight))` instead.
  - Every node carries `pkg.torch.onnx.name_scopes`, the qualified module names on the call stack
    (`['', 'encoder', ..., 'encoder.layer.0.intermediate.dense', 'linear_4']`): the last-but-one
    entry is the exact qualified name of the calling module. Node names (`node_MatMul_54`) and
    the folded initializers' names carry nothing.
  - Reshapes carry `allowzero=1`, and F.gelu becomes one fused `Gelu` op (opset 20).
  - Larger models (every zoo model of tens of MB) get their weights written to external data,
    `<file>.onnx.data` beside the file: `load_onnx` loads it and checks its size.
nn.Linear, `dynamo=False` (the legacy TorchScript exporter, opset 17):
  - with bias and 2-D input: `Gemm(x, W, b, transB=1)`, W under its parameter name;
  - without bias, or 3-D input: `MatMul(x, Wt)`, `Wt` constant-folded into an anonymous
    `onnx::MatMul_123` stored `[in, out]`; the bias is a separate `Add(b, .)` whose initializer
    keeps its name (`fc1.bias`). With `do_constant_folding=False`: `Transpose(fc1.weight)`.
  - Node names are scope paths, `/encoder/layer.0/intermediate/dense/MatMul`. A scope is the
    module's *last* name, with its container's in front for numbered children (`layer.0`; also
    `layer1/layer1.0` under a called Sequential `layer1`), and only modules whose forward ran
    appear: a grandchild called directly (HF OPT calls `self.model.decoder(...)`) shows as
    `/decoder/...`, the `model` level gone. A second call of a module gets `_1` (`/shared_1/`)
    and reads the weight through an `Identity` copy. `_legacy_path` aligns such paths with the
    module names known from named initializers (biases, norms, Gemm/Conv weights).
nn.Conv2d, both exporters: `Conv(x, W[, b])`, W under its parameter name, `[out, in, kh, kw]`.
  An eval-mode BatchNorm after it is folded in: W becomes `W * gamma / sqrt(var + eps)` per
  output channel. The legacy exporter stores it anonymously (`onnx::Conv_193`); dynamo keeps the
  name `conv1.weight` for the *folded* values and gives the node the BatchNorm's scope (`bn1`).
Copies. Both exporters merge initializers with equal values (two layers whose biases are all
zero read one tensor), so two *distinct* stored tensors with equal values are copies of one
parameter: a module called on 3-D and 2-D inputs is read as a folded `[in, out]` copy by its
MatMul and as the original by its Gemm; a tied LM head's MatMul reads a folded copy of the table
the embedding's Gather reads. Such copies make one site, and `impose_onnx` writes all of them,
as imposing on the shared torch Parameter changes every use of it.

Names. A site's `name` is the qualified PyTorch module name where it can be recovered, from the
first of: dynamo's name scope of the consumer (exact, also for a tied weight: an LM head reading
the embedding matrix is `lm_head`), unless the node came from an op folded into another one
(Conv+BatchNorm); the parameter name minus `.weight` (the initializer's name or `folded_from`);
the legacy node path aligned to known module names; the node name. All zoo models, both
exporters, get exactly their `named_modules()` names (tests/sparsecomp/test_onnx_io.py).
Weights reached through Identity / Transpose / Cast chains or held by Constant nodes count;
ConvTranspose weights (`[in, out, ...]`), constant MatMul A operands and If/Loop subgraphs do not.

import_onnx and onnx2torch 1.5.15
---------------------------------
torchvision: onnx2torch imports it at module level for its NonMaxSuppression and RoiAlign
converters, and the torchvision wheel fails to import beside torch 2.13. `_import_onnx2torch`
uses a working torchvision if one imports, and otherwise puts a stub `torchvision` in
`sys.modules` only while onnx2torch itself is being imported, then removes it: no other code
ever sees the stub. A model with NMS/RoiAlign is then refused up front with an OnnxError naming
the node, instead of converting into a module that fails at run time.

Missing converters: onnx2torch picks a converter by the op's `since_version` under the model's
opset, so opset-20 models ask for `Reshape` v19, `Cast` v19, `IsNaN` v20, which it lacks
although the older versions are the same op for our types. `_register_converters` adds, through
onnx2torch's public `add_converter`: aliases for such type-only bumps; `Gelu` 20 (`approximate`
none/tanh); the opset-18 reductions (`ReduceMean` & co., axes as an input; RMSNorm and ResNet's
global pool need it); `Split` 18 (`num_outputs`, uneven splits); `Pad` 18/19/21 (`axes` input);
`Trilu` 14 (causal masks, legacy exporter); `ScatterND` 18 and `AveragePool` 19 aliases that
refuse the new features (min/max reduction, dilations).

Wrong converters: `add_converter` refuses to replace a registered converter, so `_reroute` moves
the affected nodes of (a copy of) the model into a private domain whose converters are ours:
`Reshape` with `allowzero=1` (every dynamo export; onnx2torch raises), `Flatten` (onnx2torch's
fails for axis == rank, e.g. HF BERT's legacy mask), `CumSum` (onnx2torch defaults `reverse`
to 1: HF OPT's position ids came out reversed, a silent numerical error).

What still cannot be imported raises OnnxError naming each op type with its domain, opset and
op version and the nodes, before converting anything; a converter failing during conversion is
reported with the node it was converting. The hint: re-export with the legacy exporter, or
analyze the ONNX file directly (site finding and imposing need no import).

Import matrix: every zoo model imports from both exporters and matches onnxruntime within
1e-4 * max|output| (`_IMPORT_MATRIX` in the test). onnx2torch alone imports only mlp-relu (both),
and the legacy exports of bert-tiny, bert-base, vit-tiny and resnet18-like.
"""

from __future__ import annotations

import ast
import contextlib
import fnmatch
import importlib
import importlib.util
import keyword
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch
from onnx import helper, inliner, numpy_helper

from sparsecomp.errors import OnnxError, PatternError

__all__ = [
    "OnnxWeightSite",
    "load_onnx",
    "onnx_weight_sites",
    "impose_onnx",
    "import_onnx",
]

_LINEAR_OPS = ("MatMul", "Gemm", "Conv")
_ONNX_DOMAINS = ("", "ai.onnx")
# metadata keys written by torch's dynamo exporter / the onnxscript optimizer
_MD_SCOPES = "pkg.torch.onnx.name_scopes"
_MD_FOLDED = "pkg.onnxscript.optimizer.folded_from"


# ------------------------------------------------------------------------------------------------
# Loading


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model and its external data; every failure is one `OnnxError` naming `path`."""
    p = Path(path)
    if not p.exists():
        raise OnnxError(f"ONNX file {str(p)!r} does not exist", hint="check the path")
    if p.is_dir():
        raise OnnxError(f"ONNX path {str(p)!r} is a directory, not a file", hint="pass the .onnx file itself")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # DecodeError, OSError, ...: the file is not a (complete) ModelProto
        raise OnnxError(
            f"cannot parse {str(p)!r} as an ONNX model ({type(e).__name__}: {_first_line(e)})",
            hint="the file is not ONNX or is truncated; re-export it (torch.onnx.export)",
        ) from None
    _check_parsed(model, p)
    # External data second, so that a missing/short data file is reported as such.
    external = [t.name for t in _all_tensors(model) if _uses_external_data(t)]
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(p.parent))
        except Exception as e:
            raise OnnxError(
                f"cannot load the external weight data of {str(p)!r} ({_first_line(e)})",
                hint="external data files must sit where the model says (next to the .onnx file); "
                "copy them along with it",
            ) from None
        _check_external_sizes(model, p, external)
    return model


def _check_parsed(model: onnx.ModelProto, p: Path) -> None:
    """Protobuf parses many byte strings without complaint; reject what is no usable model."""
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise OnnxError(
            f"{str(p)!r} is not a complete ONNX model (missing "
            + ", ".join(
                w
                for w, bad in (
                    ("ir_version", model.ir_version <= 0),
                    ("graph", not model.HasField("graph")),
                    ("opset_import", not model.opset_import),
                )
                if bad
            )
            + ")",
            hint="the file is not ONNX or is truncated; re-export it",
        )
    g = model.graph
    # Order-independent on purpose: onnxruntime accepts unsorted graphs, so we do too; a node
    # reading a value that nothing defines is what a cut-off graph looks like.
    known = {v.name for v in g.input} | {t.name for t in g.initializer} | {""}
    known |= {t.values.name for t in g.sparse_initializer}
    known |= {o for node in g.node for o in node.output}
    for node in g.node:
        for name in node.input:
            if name not in known:
                raise OnnxError(
                    f"{str(p)!r} is inconsistent: node {node.name or node.op_type!r} reads {name!r}, which nothing defines",
                    hint="the file is truncated or was edited by hand; re-export it",
                )


def _check_external_sizes(model: onnx.ModelProto, p: Path, external: list[str]) -> None:
    """onnx reads a short external data file without complaint; a tensor then has too few bytes."""
    wanted = set(external)
    for t in _all_tensors(model):
        if t.name not in wanted or t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
            continue
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        except Exception:
            continue  # sub-byte or exotic types: nothing cheap to check
        need = math.prod(t.dims) * itemsize
        if len(t.raw_data) != need:
            raise OnnxError(
                f"external data of tensor {t.name!r} in {str(p)!r} is {len(t.raw_data)} bytes, expected {need}",
                hint="the external data file is truncated or belongs to another model; copy it again with the .onnx file",
            )


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t


def _uses_external_data(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _model_label(model: onnx.ModelProto) -> str:
    return f"ONNX graph {model.graph.name!r}" if model.graph.name else "ONNX model"


# ------------------------------------------------------------------------------------------------
# Tensor <-> torch


def _tensor_to_torch(t: onnx.TensorProto) -> torch.Tensor:
    if _uses_external_data(t):
        raise OnnxError(
            f"tensor {t.name!r} keeps its data in an external file that was not loaded",
            hint="read the model with sparsecomp.onnx_io.load_onnx(path), which loads external data",
        )
    try:
        arr = numpy_helper.to_array(t)
    except Exception as e:
        raise OnnxError(
            f"cannot read tensor {t.name!r} ({type(e).__name__}: {_first_line(e)})",
            hint="the model file is damaged; re-export it",
        ) from None
    if t.data_type == onnx.TensorProto.BFLOAT16:
        # numpy has no bfloat16 (onnx hands out ml_dtypes): reinterpret the 16-bit patterns in torch
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(arr, copy=True))


def _torch_to_tensor(x: torch.Tensor, like: onnx.TensorProto) -> onnx.TensorProto:
    """A TensorProto holding `x` with `like`'s name and data type (raw data, not external)."""
    if like.data_type == onnx.TensorProto.BFLOAT16:
        bits = x.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
        out = helper.make_tensor(like.name, like.data_type, list(x.shape), bits.tobytes(), raw=True)
    else:
        np_dtype = helper.tensor_dtype_to_np_dtype(like.data_type)
        out = numpy_helper.from_array(x.detach().cpu().numpy().astype(np_dtype, copy=False), like.name)
    out.doc_string = like.doc_string
    out.metadata_props.extend(like.metadata_props)
    return out


# ------------------------------------------------------------------------------------------------
# Weight sites


@dataclass
class OnnxWeightSite:
    """The weight of one Linear/Conv layer of an ONNX graph.

    name:        qualified PyTorch module name where recoverable (`encoder.layer.0.attention.self.query`),
                 else the consumer's node name
    op:          "MatMul" | "Gemm" | "Conv"
    node_name:   the first consuming node
    initializer: name of the tensor storing the weight (an initializer, or a Constant's output)
    weight:      a copy in `[out_features, in_features]` orientation (Conv: `[out, in, kh, kw]`)
    bias:        name of the bias tensor (Gemm/Conv input C/B, or the constant of the Add after a
                 MatMul), or None
    consumers:   every node that multiplies by this weight (a module called twice has two)
    """

    name: str
    op: str
    node_name: str
    initializer: str
    weight: torch.Tensor = field(repr=False)
    bias: str | None = None
    consumers: tuple[str, ...] = ()
    # Where impose_onnx writes the weight back (`_Storage`s): several when the exporter kept
    # separate copies of one parameter. Private: the protos belong to the model it came from.
    _storages: list = field(default_factory=list, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    @property
    def weight_2d(self) -> torch.Tensor:
        """The `[out, in*k...]` matrix view, the one `sparsecomp.patterns` measures and imposes on."""
        return self.weight.reshape(self.weight.shape[0], -1)


@dataclass
class _Storage:
    tensor: onnx.TensorProto  # the live proto (initializer or Constant attribute) to overwrite
    perm: tuple[int, ...]  # stored.permute(perm) == weight in [out, in] orientation
    param: str | None  # source parameter name where known


class _GraphIndex:
    """Producers, consumers, constants and exporter metadata of the top-level graph."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.graph = g
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.const: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        for node in g.node:
            for o in node.output:
                self.producer[o] = node
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
                for a in node.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        self.const[node.output[0]] = a.t
        self.value_md: dict[str, dict[str, str]] = {
            v.name: {p.key: p.value for p in v.metadata_props} for v in g.value_info if v.metadata_props
        }
        # Module paths known from tensors that carry parameter names: every prefix of
        # `a.b.c.weight` (i.e. a, a.b, a.b.c). Used to align legacy node paths.
        self.known_modules: set[tuple[str, ...]] = set()
        for name in list(self.const) + [n for md in self.value_md.values() for n in _folded_from(md)]:
            if _looks_like_param(name):
                parts = tuple(name.split("."))[:-1]
                for k in range(1, len(parts) + 1):
                    self.known_modules.add(parts[:k])

    def param_name(self, tensor_name: str) -> str | None:
        """The PyTorch parameter a stored tensor came from, where the exporter kept it."""
        folded = _folded_from(self.value_md.get(tensor_name, {}))
        if len(folded) == 1 and _looks_like_param(folded[0]):
            return folded[0]
        return tensor_name if _looks_like_param(tensor_name) else None


def _folded_from(md: dict[str, str]) -> list[str]:
    raw = md.get(_MD_FOLDED)
    if not raw:
        return []
    try:
        val = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [v for v in val if isinstance(v, str)] if isinstance(val, (list, tuple)) else []


def _looks_like_param(name: str) -> bool:
    """`encoder.layer.0.query.weight` yes; `onnx::MatMul_12`, `val_3`, `/a/b_output_0`, `12` no."""
    if not name or "::" in name or "/" in name or ":" in name:
        return False
    parts = name.split(".")
    if len(parts) < 2 or not all(parts):
        return False
    return parts[-1].isidentifier()


def _resolve_constant(index: _GraphIndex, value: str) -> tuple[str, onnx.TensorProto, tuple[int, ...], torch.dtype | None] | None:
    """Walk from a node input back through Identity/Transpose/Cast to a stored constant.

    Returns (name, stored tensor, perm, cast dtype) such that the consumer sees
    `stored.permute(perm).to(cast)`; `name` is the initializer's name or the Constant node's
    output. None if the value is not a constant (an activation, or a chain through a Reshape or
    any other op).
    """
    perms: list[list[int] | None] = []  # consumer-side first; None = reverse all dims
    cast: torch.dtype | None = None
    seen = 0
    while value not in index.const:
        node = index.producer.get(value)
        seen += 1
        if node is None or node.domain not in _ONNX_DOMAINS or seen > 16 or not node.input:
            return None
        if node.op_type == "Identity":
            pass
        elif node.op_type == "Transpose":
            attrs = {a.name: a for a in node.attribute}
            perms.append(list(attrs["perm"].ints) if "perm" in attrs else None)  # None: reverse
        elif node.op_type == "Cast":
            if cast is None:  # the cast nearest the consumer decides what it sees
                to = {a.name: a for a in node.attribute}.get("to")
                cast = _torch_dtype(to.i) if to is not None else None
        else:
            return None
        value = node.input[0]
    stored = index.const[value]
    rank = len(stored.dims)
    perm = list(range(rank))
    # Transposes apply stored-side first: compose them in reverse of how we met them.
    for p in reversed(perms):
        p = list(reversed(range(rank))) if p is None else p
        if sorted(p) != list(range(rank)):
            return None
        perm = [perm[i] for i in p]
    return value, stored, tuple(perm), cast


def _torch_dtype(onnx_type: int) -> torch.dtype | None:
    try:
        np_dtype = helper.tensor_dtype_to_np_dtype(onnx_type)
        return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype
    except Exception:
        return torch.bfloat16 if onnx_type == onnx.TensorProto.BFLOAT16 else None


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return a.i
    return default


def _matmul_bias(index: _GraphIndex, node: onnx.NodeProto, out_features: int) -> str | None:
    """The bias of a MatMul written as MatMul + Add(constant [out]) (both exporters, 3-D input)."""
    users = index.consumers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "Add" or users[0].domain not in _ONNX_DOMAINS:
        return None
    add = users[0]
    other = [i for i in add.input if i != node.output[0]]
    if len(other) != 1:
        return None
    resolved = _resolve_constant(index, other[0])
    if resolved is None:
        return None
    name, stored, _, _ = resolved
    return name if list(stored.dims) == [out_features] else None


def _scope_name(node: onnx.NodeProto) -> tuple[str | None, str]:
    """Dynamo exporter: (qualified name of the module that called this op or None at the root,
    the aten op's name)."""
    for p in node.metadata_props:
        if p.key == _MD_SCOPES:
            try:
                scopes = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None, ""
            # ['', 'encoder', ..., 'encoder.layer.0.intermediate.dense', 'linear_4']: the last
            # entry is the aten op, the one before it the innermost module.
            if not isinstance(scopes, list) or not scopes or not all(isinstance(x, str) for x in scopes):
                return None, ""
            return (scopes[-2] or None) if len(scopes) >= 2 else None, scopes[-1]
    return None, ""


# aten ops that multiply by a weight: a node made from one of these belongs to its scope's module.
# (A Conv made by folding a BatchNorm into it carries the BatchNorm's scope and op instead.)
_MATMUL_LIKE = re.compile(r"linear|matmul|mm|conv|einsum", re.IGNORECASE)


def _legacy_path(index: _GraphIndex, node: onnx.NodeProto) -> str | None:
    """Legacy exporter: `/encoder/layer.0/intermediate/dense/MatMul` -> `encoder.layer.0.intermediate.dense`.

    A legacy scope is a module's last name, with its container's name in front for numbered
    children (`layer.0`, and `layer1.0` under a called Sequential `layer1`), and modules whose
    forward did not run are missing (see the module docstring). So each scope is matched to the
    nearest known module below the current one that ends with it; once a scope is unknown (or
    ambiguous) the rest is appended as written.
    """
    name = node.name
    if not name.startswith("/"):
        return None
    scopes = [s for s in name.split("/")[1:-1] if s]
    if not scopes:
        return None
    cur: tuple[str, ...] = ()
    for i, scope in enumerate(scopes):
        comps = tuple(scope.split("."))
        cands = [
            k
            for k in index.known_modules
            if len(k) > len(cur) and k[: len(cur)] == cur and len(k) >= len(comps) and k[-len(comps) :] == comps
        ]
        if cands:
            best = min(len(k) for k in cands)
            top = [k for k in cands if len(k) == best]
            if len(top) == 1:
                cur = top[0]
                continue
        for rest in scopes[i:]:
            comps = tuple(rest.split("."))
            if len(comps) > 1 and cur and cur[-1] == comps[0]:
                comps = comps[1:]  # `layer1` then `layer1.0`: the container was called itself
            cur = cur + comps
        break
    return ".".join(cur)


def _site_name(index: _GraphIndex, node: onnx.NodeProto, param: str | None) -> str:
    param_module = param[: -len(".weight")] if param is not None and param.endswith(".weight") else None
    scope, op = _scope_name(node)
    # The scope is exact, also for a tied weight (an LM head multiplying by the embedding matrix
    # is `lm_head`, not `embed_tokens`); but when the exporter fused the op into another one
    # (Conv+BatchNorm: scope `bn1`, initializer still `conv1.weight`), the parameter name is right.
    if scope and (param_module is None or param_module == scope or _MATMUL_LIKE.search(op)):
        return scope
    if param_module:
        return param_module
    legacy = _legacy_path(index, node)
    if legacy:
        return legacy
    if param is not None:
        return param
    return node.name or f"{node.op_type}_{node.output[0]}"


def onnx_weight_sites(model: onnx.ModelProto) -> list[OnnxWeightSite]:
    """Every constant weight multiplied by a `MatMul` (input B), `Gemm` (input B) or `Conv` (W).

    One site per weight. Consumers reading the same stored tensor are one site, and so are
    stored tensors holding the same values (in either orientation): both exporters merge equal
    initializers, so two equal tensors in an exported graph are copies of one parameter -- a
    folded `[in, out]` transpose beside the original (a module called on 2-D and 3-D inputs), or
    the embedding table of an LM head tied to it. `impose_onnx` writes every copy, as
    `patterns.impose` changes the one shared Parameter in torch. Sites are in graph order of
    their first consumer.
    """
    if not isinstance(model, onnx.ModelProto):
        raise OnnxError(
            f"onnx_weight_sites needs an onnx.ModelProto, got {type(model).__name__}",
            hint="load the file first: sparsecomp.onnx_io.load_onnx(path)",
        )
    index = _GraphIndex(model)
    sites: list[OnnxWeightSite] = []
    by_storage: dict[str, OnnxWeightSite] = {}  # stored tensor's name -> site
    by_signature: dict[tuple, list[OnnxWeightSite]] = {}

    for node in model.graph.node:
        if node.op_type not in _LINEAR_OPS or node.domain not in _ONNX_DOMAINS or len(node.input) < 2:
            continue
        resolved = _resolve_constant(index, node.input[1])
        if resolved is None:
            continue
        key, stored, perm, cast = resolved
        rank = len(stored.dims)
        if node.op_type in ("MatMul", "Gemm"):
            if rank != 2:
                continue  # a batched constant operand is no Linear weight
            # Consumer sees B = stored.permute(perm); MatMul's B and Gemm's B with transB=0 are
            # [in, out], so one more transpose gives [out, in].
            trans_b = node.op_type == "Gemm" and _int_attr(node, "transB", 0) == 1
            if not trans_b:
                perm = (perm[1], perm[0])
        elif rank < 3:
            continue  # Conv weights are [out, in/groups, k...]
        if key in by_storage:
            site = by_storage[key]
            if node.name not in site.consumers:
                site.consumers = site.consumers + (node.name,)
            continue

        weight = _tensor_to_torch(stored).permute(perm).contiguous()
        if cast is not None and weight.dtype != cast:
            weight = weight.to(cast)
        param = index.param_name(key)
        storage = _Storage(tensor=stored, perm=perm, param=param)
        sig = _signature(weight)
        twin = _twin(by_signature.get(sig, []) if sig else [], weight)
        if twin is not None:
            twin._storages.append(storage)
            twin.consumers = twin.consumers + (node.name,)
            by_storage[key] = twin
            continue

        if node.op_type == "MatMul":
            bias = _matmul_bias(index, node, weight.shape[0])
        else:
            bias = None
            if len(node.input) >= 3 and node.input[2]:
                rb = _resolve_constant(index, node.input[2])
                bias = rb[0] if rb is not None else None
        site = OnnxWeightSite(
            name=_site_name(index, node, param),
            op=node.op_type,
            node_name=node.name,
            initializer=key,
            weight=weight,
            bias=bias,
            consumers=(node.name,),
            _storages=[storage],
        )
        sites.append(site)
        by_storage[key] = site
        if sig:
            by_signature.setdefault(sig, []).append(site)

    # Copies read by other ops only (the Gather of an embedding tied to an LM head).
    if by_signature:
        for key, t in index.const.items():
            if key in by_storage or len(t.dims) != 2 or math.prod(t.dims) < 2:
                continue
            if not any(math.prod(t.dims) == s[0] for s in by_signature):
                continue  # cheap: no site of that size, skip reading the tensor
            stored = _tensor_to_torch(t)
            for perm in ((0, 1), (1, 0)):
                view = stored.permute(perm)
                sig = _signature(view)
                twin = _twin(by_signature.get(sig, []) if sig else [], view)
                if twin is not None:
                    twin._storages.append(_Storage(tensor=t, perm=perm, param=index.param_name(key)))
                    by_storage[key] = twin
                    break

    _dedupe_names(sites)
    return sites


def _signature(w: torch.Tensor) -> tuple | None:
    """Orientation-free key for finding equal tensors; None for a constant tensor (all zeros, say),
    which says nothing about being a copy of another."""
    if w.numel() < 2 or not (w.is_floating_point() or w.is_complex()):
        return None
    hi, lo = w.max().item(), w.min().item()
    if hi == lo or hi != hi or lo != lo:  # constant, or NaN
        return None
    return (w.numel(), hi, lo)


def _twin(candidates: list[OnnxWeightSite], weight: torch.Tensor) -> OnnxWeightSite | None:
    for site in candidates:
        if site.weight.shape == weight.shape and torch.equal(site.weight, weight.to(site.weight.dtype)):
            return site
    return None


def _dedupe_names(sites: list[OnnxWeightSite]) -> None:
    """Names must select one layer each (impose globs): disambiguate collisions.

    A collision happens when one module multiplies by several weights of its own (a custom
    `F.linear(x, self.w1)` / `F.linear(x, self.w2)`): those sites take their parameter names.
    """
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.name] = counts.get(s.name, 0) + 1
    for s in sites:
        if counts[s.name] > 1:
            param = s._storages[0].param
            if param is not None:
                s.name = param
    seen: dict[str, int] = {}
    for s in sites:
        k = seen.get(s.name, 0)
        seen[s.name] = k + 1
        if k:
            s.name = f"{s.name}#{k}"


# ------------------------------------------------------------------------------------------------
# Imposing patterns


def impose_onnx(model: onnx.ModelProto, spec: Any, layers: str | None = None) -> list[str]:
    """Impose a weight pattern, in place, on the weight sites of `model` whose name matches `layers`.

    `spec` is a pattern spelling (`"2:4"`, `"unstructured:0.5"`, `"block:16x1:0.9"`) or a
    `WeightPattern`; `layers` an fnmatch glob over site names (None: all sites). The pattern is
    imposed in `[out, in]` orientation (N:M groups along in_features; conv weights through their
    `[out, in*kh*kw]` view), exactly as `sparsecomp.patterns.impose` does on the nn.Module, then
    written back into each stored tensor in its own orientation and dtype. Returns the names of
    the sites imposed, in graph order. Raises PatternError if the glob matches no site, OnnxError
    on a sparsecomp export (its sparse layers are stored compactly: impose before exporting).
    """
    from sparsecomp.patterns import impose_pattern, parse_pattern  # patterns is core; keep import light

    pattern = parse_pattern(spec)
    from sparsecomp.backends.ort import files as ort_files  # function level: core imports no backend at import time

    if ort_files.is_export(model):
        # its sparse layers are stored compactly (values + narrow indices, `*_live` arrays...): a
        # pattern imposed on those arrays is not the pattern on the layer's [out, in] weight
        raise OnnxError(
            f"{_model_label(model)} is a sparsecomp export: its weights are stored in compact formats",
            hint="impose on the torch model (or the plain ONNX file, e.g. from torch.onnx.export) and export again",
        )
    sites = onnx_weight_sites(model)
    if not sites:
        raise PatternError(
            f"{_model_label(model)} has no MatMul/Gemm/Conv weight to impose {pattern} on",
            hint="patterns apply to constant weights of MatMul (input B), Gemm (B) and Conv (W)",
        )
    chosen = sites if layers is None else [s for s in sites if fnmatch.fnmatchcase(s.name, layers)]
    if not chosen:
        names = [s.name for s in sites]
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise PatternError(f"layer glob {layers!r} matches no weight of the ONNX model", hint=f"available layers: {shown}")
    for site in chosen:
        w = site.weight
        new = impose_pattern(w, pattern)  # same shape and dtype; only zeroes entries
        # Back into every stored copy: undo the site's permutation, cast to the stored dtype
        # (exact: kept entries are values read from that dtype, and zeros are zeros).
        for st in site._storages:
            inv = [0] * len(st.perm)
            for i, p in enumerate(st.perm):
                inv[p] = i
            stored_view = new.permute(inv).contiguous()
            st.tensor.CopyFrom(_torch_to_tensor(stored_view, st.tensor))
        site.weight = new
    return [s.name for s in chosen]


# ------------------------------------------------------------------------------------------------
# Import to torch.fx through onnx2torch

_ONNX2TORCH: types.ModuleType | None = None
# Nodes whose onnx2torch converter is wrong for what torch exports are moved to this domain (in
# a copy of the model) and converted by our own converters; see `_reroute`.
_PRIVATE_DOMAIN = "sparsecomp_onnx2torch"  # no dots: onnx2torch puts it in module names
_REROUTE = {
    "Flatten": lambda node: True,
    "CumSum": lambda node: True,
    "Reshape": lambda node: _int_attr(node, "allowzero", 0) == 1,
}
_TORCHVISION_STUBBED = False
_NEEDS_TORCHVISION = ("NonMaxSuppression", "RoiAlign")


def _torchvision_missing(*args: Any, **kwargs: Any) -> Any:
    raise OnnxError(
        "this ONNX op needs torchvision (NonMaxSuppression/RoiAlign), which cannot be imported here",
        hint="torchvision does not import beside torch 2.13; run such models in onnxruntime instead",
    )


@contextlib.contextmanager
def _torchvision_for_onnx2torch() -> Iterator[bool]:
    """Make `import torchvision` inside onnx2torch succeed; yields True if a stub was used.

    onnx2torch's nms.py and roialign.py import torchvision at module level, although only
    those two converters use it. The torchvision wheel fails to import beside torch 2.13 (and is
    deliberately not installed), so for the duration of onnx2torch's import only we put a stub
    package whose functions raise OnnxError. The stub is removed afterwards: no other code can
    import it by accident, and onnx2torch keeps its own reference in those two modules.
    """
    real = "torchvision" in sys.modules and not getattr(sys.modules["torchvision"], "__sparsecomp_stub__", False)
    if not real and importlib.util.find_spec("torchvision") is not None:
        try:
            importlib.import_module("torchvision")
            real = True
        except Exception:  # installed but broken (the torch 2.13 case): use the stub
            for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
                del sys.modules[k]
    if real:
        yield False
        return
    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.roi_align = ops.box_convert = _torchvision_missing  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    tv.__sparsecomp_stub__ = True  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in ("torchvision", "torchvision.ops")}
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        yield True
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _import_onnx2torch() -> types.ModuleType:
    global _ONNX2TORCH, _TORCHVISION_STUBBED
    if _ONNX2TORCH is not None:
        return _ONNX2TORCH
    if importlib.util.find_spec("onnx2torch") is None:
        raise OnnxError(
            "import_onnx needs onnx2torch, which is not installed",
            hint="pip install --no-deps onnx2torch (without --no-deps it pulls a torchvision that breaks torch 2.13)",
        )
    with _torchvision_for_onnx2torch() as stubbed:
        try:
            mod = importlib.import_module("onnx2torch")
        except Exception as e:
            raise OnnxError(
                f"onnx2torch failed to import ({type(e).__name__}: {_first_line(e)})",
                hint="reinstall it with pip install --no-deps onnx2torch==1.5.15",
            ) from None
    _TORCHVISION_STUBBED = stubbed
    _register_converters()
    _ONNX2TORCH = mod
    return mod


def _register_converters() -> None:
    """Add the converters that torch 2.13's exports need and onnx2torch 1.5.15 lacks.

    Registered once per process through onnx2torch's public `add_converter`; where a later
    onnx2torch already has a converter for the same (op, version), its own is kept.
    """
    from torch import nn

    from onnx2torch.node_converters.registry import add_converter, get_converter
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.onnx_node import OnnxNode
    from onnx2torch.utils.common import (
        OnnxMapping,
        OnnxToTorchModule,
        OperationConverterResult,
        get_const_value,
        onnx_mapping_from_node,
    )

    def register(op: str, version: int, fn: Any) -> None:
        try:
            add_converter(operation_type=op, version=version)(fn)
        except ValueError:  # "already registered": onnx2torch has its own now, keep it
            pass

    def alias(op: str, new: int, old: int, check: Any = None) -> None:
        """`op` v`new` differs from v`old` only in types we do not meet (float8, int4, ...)."""
        try:
            old_conv = get_converter(operation_type=op, version=old)
        except NotImplementedError:
            return

        def conv(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
            if check is not None:
                check(node, graph)
            return old_conv(node, graph)

        register(op, new, conv)

    def const_or_none(name: str, graph: OnnxGraph) -> Any:
        if not name:
            return None
        try:
            return get_const_value(name, graph)
        except KeyError:
            return None

    def as_list(v: Any) -> list[int] | None:
        if v is None:
            return None
        if isinstance(v, torch.Tensor):
            return [int(x) for x in v.reshape(-1).tolist()]
        if isinstance(v, (list, tuple)):
            return [int(x) for x in v]
        return [int(v)]

    # --- type-only version bumps (new versions add float8/int4/bfloat16 types or similar) ---
    for op, new, old in [
        ("Cast", 19, 13), ("Cast", 21, 13),
        ("Reshape", 19, 14), ("Reshape", 21, 14),
        ("Shape", 19, 15), ("Shape", 21, 15),
        ("Constant", 19, 13), ("Constant", 21, 13),
        ("Identity", 19, 16), ("Identity", 21, 16),
        ("ConstantOfShape", 20, 9), ("ConstantOfShape", 21, 9),
        ("IsNaN", 20, 13), ("IsInf", 20, 10),
        ("Equal", 19, 13),
        ("GreaterOrEqual", 16, 12), ("LessOrEqual", 16, 12),
        ("Transpose", 21, 13), ("Flatten", 21, 13), ("Unsqueeze", 21, 13),
    ]:
        alias(op, new, old)

    def scatter_check(node: OnnxNode, graph: OnnxGraph) -> None:
        red = node.attributes.get("reduction", "none")
        if red not in ("none",):
            raise NotImplementedError(f"ScatterND with reduction={red!r} is not supported by onnx2torch")

    alias("ScatterND", 18, 16, scatter_check)

    def avgpool_check(node: OnnxNode, graph: OnnxGraph) -> None:
        if any(d != 1 for d in node.attributes.get("dilations", [])):
            raise NotImplementedError("AveragePool with dilations != 1 is not supported")

    alias("AveragePool", 19, 11, avgpool_check)

    # --- Gelu (opset 20): dynamo fuses F.gelu into one op, `approximate` = "none" | "tanh" ---
    def gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        approx = node.attributes.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise NotImplementedError(f"Gelu approximate={approx!r}")
        return OperationConverterResult(torch_module=nn.GELU(approximate=approx), onnx_mapping=onnx_mapping_from_node(node))

    register("Gelu", 20, gelu)

    # --- opset-18 reductions: `axes` moved from attribute to optional input ---
    class ReduceDynamicAxes(nn.Module, OnnxToTorchModule):
        """Reduction whose axes arrive at run time (rare: exporters pass constants)."""

        def __init__(self, op: str, keepdims: int, noop: int):
            super().__init__()
            self.op, self.keepdims, self.noop = op, keepdims, noop

        def forward(self, x: torch.Tensor, axes: torch.Tensor | None = None) -> torch.Tensor:
            ax = None if axes is None else [int(a) for a in axes.reshape(-1).tolist()]
            if not ax and self.noop:
                return x
            return OnnxReduceStaticAxes(self.op, ax or None, self.keepdims)(x)

    class Identity(nn.Module, OnnxToTorchModule):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    def reduce18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        keepdims = node.attributes.get("keepdims", 1)
        noop = node.attributes.get("noop_with_empty_axes", 0)
        inputs = node.input_values
        if len(inputs) < 2 or not inputs[1]:
            axes: list[int] | None = []
        else:
            axes = as_list(const_or_none(inputs[1], graph))
        if axes is None:  # axes computed at run time
            return OperationConverterResult(
                torch_module=ReduceDynamicAxes(node.operation_type, keepdims, noop), onnx_mapping=onnx_mapping_from_node(node)
            )
        mapping = OnnxMapping(inputs=(inputs[0],), outputs=node.output_values)
        if not axes and noop:
            return OperationConverterResult(torch_module=Identity(), onnx_mapping=mapping)
        module = OnnxReduceStaticAxes(operation_type=node.operation_type, axes=axes or None, keepdims=keepdims)
        return OperationConverterResult(torch_module=module, onnx_mapping=mapping)

    for op in (
        "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
        "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    ):
        register(op, 18, reduce18)
    register("ReduceMax", 20, reduce18)  # v20 adds bool inputs only
    register("ReduceMin", 20, reduce18)

    # --- Split 18: `num_outputs` attribute; uneven splits put the remainder in the last chunk ---
    class Split18(nn.Module, OnnxToTorchModule):
        def __init__(self, axis: int, num_outputs: int, sizes: list[int] | None):
            super().__init__()
            self.axis, self.num_outputs, self.sizes = axis, num_outputs, sizes

        def forward(self, x: torch.Tensor, split: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
            if split is not None:
                sizes: Any = [int(s) for s in split.tolist()]
            elif self.sizes is not None:
                sizes = self.sizes
            else:
                sizes = math.ceil(x.shape[self.axis] / self.num_outputs)
            return tuple(torch.split(x, sizes, dim=self.axis))

    def split18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        axis = node.attributes.get("axis", 0)
        n = len(node.output_values)
        inputs = node.input_values
        if len(inputs) >= 2 and inputs[1]:
            sizes = as_list(const_or_none(inputs[1], graph))
            if sizes is not None:
                return OperationConverterResult(
                    torch_module=Split18(axis, n, sizes), onnx_mapping=OnnxMapping(inputs=(inputs[0],), outputs=node.output_values)
                )
            return OperationConverterResult(torch_module=Split18(axis, n, None), onnx_mapping=onnx_mapping_from_node(node))
        return OperationConverterResult(
            torch_module=Split18(axis, node.attributes.get("num_outputs", n), None),
            onnx_mapping=OnnxMapping(inputs=(inputs[0],), outputs=node.output_values),
        )

    register("Split", 18, split18)

    # --- Pad 18/19/21: optional `axes` input (18), `wrap` mode (19, unsupported) ---
    _PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}

    class Pad18(nn.Module, OnnxToTorchModule):
        def __init__(self, mode: str, pads: list[int] | None, axes: list[int] | None, value: float):
            super().__init__()
            self.mode, self.pads, self.axes, self.value = mode, pads, axes, value

        def forward(self, x: torch.Tensor, pads: torch.Tensor | None = None, value: torch.Tensor | None = None) -> torch.Tensor:
            p = self.pads if pads is None else [int(v) for v in pads.reshape(-1).tolist()]
            rank = x.dim()
            axes = [a + rank if a < 0 else a for a in (self.axes if self.axes is not None else range(rank))]
            begin, end = dict(zip(axes, p[: len(axes)])), dict(zip(axes, p[len(axes) :]))
            torch_pads: list[int] = []
            for d in reversed(range(rank)):  # F.pad lists the last dim first
                torch_pads += [begin.get(d, 0), end.get(d, 0)]
            while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
                torch_pads = torch_pads[:-2]  # non-constant modes pad trailing dims only
            if self.mode != "constant":
                return torch.nn.functional.pad(x, torch_pads, mode=self.mode)
            fill = self.value if value is None else float(value.reshape(-1)[0])
            return torch.nn.functional.pad(x, torch_pads, mode="constant", value=fill)

    def pad18(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        mode = node.attributes.get("mode", "constant")
        if mode not in _PAD_MODES:
            raise NotImplementedError(f"Pad mode={mode!r}")
        ins = list(node.input_values) + [""] * (4 - len(node.input_values))
        axes = as_list(const_or_none(ins[3], graph))
        if ins[3] and axes is None:
            raise NotImplementedError("Pad with axes computed at run time")
        pads = as_list(const_or_none(ins[1], graph))
        value_c = const_or_none(ins[2], graph)
        value = float(value_c.reshape(-1)[0]) if isinstance(value_c, torch.Tensor) and value_c.numel() else 0.0
        # run-time inputs stay graph inputs of the module; "" (empty) reaches forward as None
        mapping = OnnxMapping(
            inputs=(ins[0], "" if pads is not None else ins[1], ins[2] if ins[2] and value_c is None else ""),
            outputs=node.output_values,
        )
        return OperationConverterResult(torch_module=Pad18(_PAD_MODES[mode], pads, axes, value), onnx_mapping=mapping)

    for v in (18, 19, 21):
        register("Pad", v, pad18)

    # --- private-domain replacements for onnx2torch converters that are wrong for our graphs ---
    # add_converter refuses to replace a registered converter, so `_reroute` moves the affected
    # nodes of the model being imported into _PRIVATE_DOMAIN, where these converters live.
    class Flatten(nn.Module, OnnxToTorchModule):
        """onnx2torch's Flatten fails for axis == rank (legacy BERT's mask: [B, S] axis 2 -> [B*S, 1])."""

        def __init__(self, axis: int):
            super().__init__()
            self.axis = axis

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            axis = self.axis + x.dim() if self.axis < 0 else self.axis
            return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))

    def flatten(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        return OperationConverterResult(torch_module=Flatten(node.attributes.get("axis", 1)), onnx_mapping=onnx_mapping_from_node(node))

    class Reshape(nn.Module, OnnxToTorchModule):
        """Reshape with `allowzero` (the dynamo exporter writes allowzero=1; onnx2torch rejects it)."""

        def __init__(self, shape: list[int] | None, allowzero: int):
            super().__init__()
            self.shape, self.allowzero = shape, allowzero

        def forward(self, x: torch.Tensor, shape: torch.Tensor | None = None) -> torch.Tensor:
            s = self.shape if shape is None else [int(v) for v in shape.tolist()]
            if not self.allowzero:  # 0 copies the input's dim; with allowzero=1 it is a 0-size dim
                s = [x.shape[i] if v == 0 else v for i, v in enumerate(s)]
            return torch.reshape(x, s)

    def reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        allowzero = node.attributes.get("allowzero", 0)
        shape = as_list(const_or_none(node.input_values[1], graph))
        if shape is None:
            return OperationConverterResult(torch_module=Reshape(None, allowzero), onnx_mapping=onnx_mapping_from_node(node))
        return OperationConverterResult(
            torch_module=Reshape(shape, allowzero),
            onnx_mapping=OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values),
        )

    class CumSum(nn.Module, OnnxToTorchModule):
        """onnx2torch 1.5.15 defaults `reverse` to 1 (ONNX: 0): HF OPT's position ids come out reversed."""

        def __init__(self, exclusive: int, reverse: int):
            super().__init__()
            self.exclusive, self.reverse = exclusive, reverse

        def forward(self, x: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
            dim = int(axis.reshape(-1)[0])
            if self.reverse:
                x = torch.flip(x, dims=(dim,))
            y = torch.cumsum(x, dim=dim).to(x.dtype)
            if self.exclusive:
                y = y - x
            return torch.flip(y, dims=(dim,)) if self.reverse else y

    def cumsum(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        module = CumSum(node.attributes.get("exclusive", 0), node.attributes.get("reverse", 0))
        return OperationConverterResult(torch_module=module, onnx_mapping=onnx_mapping_from_node(node))

    add_converter(operation_type="Flatten", version=1, domain=_PRIVATE_DOMAIN)(flatten)
    add_converter(operation_type="CumSum", version=1, domain=_PRIVATE_DOMAIN)(cumsum)
    add_converter(operation_type="Reshape", version=1, domain=_PRIVATE_DOMAIN)(reshape)

    # --- Trilu 14 (legacy exporter, causal masks) ---
    class Trilu(nn.Module, OnnxToTorchModule):
        def __init__(self, upper: int, k: int | None):
            super().__init__()
            self.upper, self.k = upper, k

        def forward(self, x: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
            kk = self.k if k is None else int(k.reshape(-1)[0])
            kk = kk or 0
            return torch.triu(x, kk) if self.upper else torch.tril(x, kk)

    def trilu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        upper = node.attributes.get("upper", 1)
        ins = node.input_values
        if len(ins) >= 2 and ins[1]:
            kc = as_list(const_or_none(ins[1], graph))
            if kc is None:
                return OperationConverterResult(torch_module=Trilu(upper, None), onnx_mapping=onnx_mapping_from_node(node))
            k: int | None = kc[0]
        else:
            k = 0
        return OperationConverterResult(torch_module=Trilu(upper, k), onnx_mapping=OnnxMapping(inputs=(ins[0],), outputs=node.output_values))

    register("Trilu", 14, trilu)


def _reroute(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with the nodes in `_REROUTE` moved to our private converter domain."""
    picked = [i for i, n in enumerate(model.graph.node) if n.domain in _ONNX_DOMAINS and _REROUTE.get(n.op_type, lambda n: False)(n)]
    if not picked:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i in picked:
        out.graph.node[i].domain = _PRIVATE_DOMAIN
    out.opset_import.append(helper.make_opsetid(_PRIVATE_DOMAIN, 1))
    return out


def _unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Ops onnx2torch has no converter for, as `Op (domain, opset N, since vS): node, node`."""
    from onnx import defs

    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing: dict[tuple[str, str, int], list[str]] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        version = opsets.get(domain if domain != "ai.onnx" else "", None)
        stub_blocked = _TORCHVISION_STUBBED and node.op_type in _NEEDS_TORCHVISION
        ok = False
        if version is not None and not stub_blocked:
            try:
                get_converter(operation_type=node.op_type, version=version, domain=domain)
                ok = True
            except NotImplementedError:
                ok = False
        if not ok:
            missing.setdefault((node.op_type, domain, version or -1), []).append(node.name or node.output[0])
    out = []
    for (op, domain, version), nodes in missing.items():
        try:
            since = defs.get_schema(op, max_inclusive_version=version, domain=domain).since_version
            since_s = f", op version {since}"
        except Exception:
            since_s = ""
        dom = domain or "ai.onnx"
        why = " (needs torchvision)" if _TORCHVISION_STUBBED and op in _NEEDS_TORCHVISION else ""
        shown = ", ".join(nodes[:3]) + (f" (+{len(nodes) - 3} more)" if len(nodes) > 3 else "")
        out.append(f"{op}{why} [{dom} opset {version if version >= 0 else '?'}{since_s}] at {shown}")
    return out


_IMPORT_HINT = (
    "re-export with the legacy exporter (torch.onnx.export(..., dynamo=False, opset_version=17)), "
    "or analyze the ONNX file directly (sparsecomp analyze model.onnx works on the ONNX graph, no import)"
)


def _failing_node(tb: Any) -> str | None:
    """The ONNX node onnx2torch was converting when it raised (its `convert` loop variable)."""
    node_desc = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "convert" and "onnx_node" in frame.f_locals:
            n = frame.f_locals["onnx_node"]
            try:
                node_desc = f"{n.operation_type} node {n.name or n.unique_name!r}"
            except Exception:
                pass
        tb = tb.tb_next
    return node_desc


def import_onnx(model_or_path: onnx.ModelProto | str | os.PathLike) -> torch.fx.GraphModule:
    """Convert an ONNX model to a `torch.fx.GraphModule` (nodes are onnx2torch `call_module`s).

    Placeholders keep the ONNX input names when they are Python identifiers (so the module takes
    the same keywords as the exported model), positional `input_N` otherwise. Raises OnnxError
    naming the op types, opset and nodes that cannot be converted, before converting anything.
    """
    if isinstance(model_or_path, onnx.ModelProto):
        model, label = model_or_path, _model_label(model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        model, label = load_onnx(model_or_path), repr(str(model_or_path))
    else:
        raise OnnxError(
            f"import_onnx needs an onnx.ModelProto or a path, got {type(model_or_path).__name__}",
            hint="pass the .onnx path or onnx.load(path)",
        )
    from sparsecomp.backends.ort import files as ort_files  # function level: core imports no backend at import time

    if ort_files.is_export(model):
        # already compiled: its sparse layers are Gather / MatMul decompositions over compact
        # arrays, which no pass can analyse or rewrite again
        raise OnnxError(
            f"{label} is a sparsecomp export (already compiled): there is nothing left to compile or optimise in it",
            hint="run it in onnxruntime (`sparsecomp bench FILE`, `sparsecomp analyze FILE`), or compile the torch model",
        )
    o2t = _import_onnx2torch()
    if model.functions:
        # dynamo exports may hold local functions; onnx2torch converts only plain nodes
        try:
            model = inliner.inline_local_functions(model)
        except Exception as e:
            raise OnnxError(f"cannot inline the local functions of {label} ({_first_line(e)})", hint=_IMPORT_HINT) from None
    if any(_uses_external_data(t) for t in _all_tensors(model)):
        raise OnnxError(
            f"{label} refers to external weight data that was not loaded",
            hint="pass the path, or a model read with sparsecomp.onnx_io.load_onnx(path)",
        )
    model = _reroute(model)
    bad = _unsupported_ops(model)
    if bad:
        raise OnnxError(f"cannot import {label} into torch.fx: no converter for " + "; ".join(bad), hint=_IMPORT_HINT)
    names = [v.name for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}]
    keep_names = all(n.isidentifier() and not keyword.iskeyword(n) for n in names)
    try:
        gm = o2t.convert(model, save_input_names=keep_names)
    except OnnxError:
        raise
    except Exception as e:
        where = _failing_node(e.__traceback__)
        raise OnnxError(
            f"onnx2torch failed to import {label}" + (f" at {where}" if where else "") + f": {type(e).__name__}: {_first_line(e)}",
            hint=_IMPORT_HINT,
        ) from None
    return gm

