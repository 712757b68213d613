"""Writing sparsecomp's ONNX exports, and reading them back.

- `check_writable(path)`: the checks `export_onnx` runs before any work (missing or read-only
  directory, a directory given as the file).
- `save(model, path)`: one `.onnx` file, or, when the tensors pass the protobuf limit (2 GiB),
  `.onnx` + `<name>.onnx.data` (external data) automatically; then the full `onnx.checker` pass
  on the file.
- `is_export(model)`, `layers(model)`, `attention_sites(model)`: sparsecomp's metadata
  (`sparsecomp.layers`: per lowered layer its name, shape, kernel, input / output value names and
  which initializers hold which arrays; `sparsecomp.attention`: the self-attention sites lowered on
  transposed heads, `attention.record`).
- `stored_weights(model)`: each lowered layer's dense `[out, in]` weight rebuilt from its compact
  arrays, so `sparsecomp analyze model.onnx` reports the same density and patterns as the torch model
  (a lowered MLP gives its up / gate / down weights, under the names of its Linears).
- `dense_equivalent(model)`: the same model with every lowered layer as a plain dense
  MatMul + Add, every lowered MLP as the plain dense MLP, no neuron skipped, and every attention
  site as plain heads (what a plain export of the pruned model runs): the baseline `bench` times
  against.
- `example_feeds(model)`: random inputs shaped like the recorded example inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from sparsecomp.errors import OnnxError
from sparsecomp.paths import writable_file

from .kernels import decode_weight

__all__ = [
    "PROTOBUF_LIMIT",
    "check_writable",
    "dense_equivalent",
    "example_feeds",
    "file_bytes",
    "is_export",
    "layers",
    "save",
    "stored_weights",
]

# protobuf refuses messages of 2 GiB and more; leave room for the graph itself
PROTOBUF_LIMIT = 2**31 - 64 * 2**20


def check_writable(path) -> Path:
    """`path` as a Path, or an OnnxError (before any work) if it cannot be written."""
    return writable_file(path, "ONNX output path", error=OnnxError, example="model.onnx")


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
    for n in model.graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                total += a.t.ByteSize()
    return total


def save(model: onnx.ModelProto, path, *, check: bool = True) -> dict:
    """Write `model` to `path` (external data above the protobuf limit); returns what was written."""
    p = check_writable(path)
    data_name = p.name + ".data"
    external = _tensor_bytes(model) > PROTOBUF_LIMIT
    try:
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data rewrites the tensors it moves
            if (p.parent / data_name).exists():
                (p.parent / data_name).unlink()  # onnx appends to an existing data file
            onnx.save_model(copy, str(p), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name,
                            size_threshold=1024)
        else:
            with open(p, "wb") as f:
                f.write(model.SerializeToString())
    except OSError as err:
        raise OnnxError(f"cannot write {str(p)!r}: {err}", hint="check the disk space and permissions") from None
    if check:
        from .export import check as full_check

        full_check(model if not external else None, str(p) if external else None)
    return {"path": str(p), "external_data": str(p.parent / data_name) if external else None, "bytes": file_bytes(p)}


def file_bytes(path) -> int:
    """Bytes of an ONNX file plus its external data files."""
    p = Path(path)
    total = p.stat().st_size
    try:
        m = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001
        return total
    seen = set()
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location")
            if loc and loc not in seen:
                seen.add(loc)
                f = p.parent / loc
                if f.exists():
                    total += f.stat().st_size
    return total


def _meta(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def is_export(model: onnx.ModelProto) -> bool:
    return "sparsecomp.layers" in _meta(model)


def _records(model: onnx.ModelProto, key: str, fields: tuple[str, ...]) -> list[dict]:
    """The JSON list of records under metadata `key` ([] when absent), each with `fields`."""
    raw = _meta(model).get(key)
    if raw is None:
        return []
    try:
        data = json.loads(raw)
        assert isinstance(data, list) and all(isinstance(d, dict) and all(f in d for f in fields) for d in data)
    except (ValueError, AssertionError):
        raise OnnxError(f"the model's {key} metadata is damaged", hint="export the model again") from None
    return data


def attention_sites(model: onnx.ModelProto) -> list[dict]:
    """The attention sites lowered on transposed heads (`attention.record`), [] for none."""
    return _records(model, "sparsecomp.attention", ("prefix", "q", "k", "v", "output"))


def layers(model: onnx.ModelProto) -> list[dict]:
    return _records(model, "sparsecomp.layers", ("layer", "arrays"))


def _arrays(model: onnx.ModelProto, names) -> dict[str, np.ndarray]:
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.name in wanted}


def _is_mlp(rec: dict) -> bool:
    return rec.get("op") == "sparse_mlp"


def _part(rec: dict, role: str) -> dict:
    """A pruned MLP's projection (`role`: up, gate, down) as a sparse_linear Layout: its record in
    `parts`, and the MLP's arrays whose role starts with `<role>.`."""
    prefix = role + "."
    return {**rec["parts"][role], "arrays": {k[len(prefix):]: v for k, v in rec["arrays"].items() if k.startswith(prefix)}}


def _part_weights(rec: dict, arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """role -> ([out, in] weight, bias or None) of each projection of a pruned MLP record."""
    out = {}
    for role in rec["parts"]:
        layout = _part(rec, role)
        bias = layout["arrays"].get("bias")
        out[role] = (decode_weight(layout, arrays), arrays[bias] if bias else None)
    return out


def _mlp_array(rec: dict, role: str, arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """One of an MLP record's arrays by role: stored plainly, or (a pruned weight) as the sell
    arrays of its transpose under `<role>.*` (`mlp.MLPArrays.compact`), decoded here."""
    roles = rec["arrays"]
    if role in roles:
        return arrays[roles[role]]
    prefix = role + "."
    sub = {k[len(prefix):]: v for k, v in roles.items() if k.startswith(prefix)}
    if not sub:
        return None
    k, h, n = rec["shape"]
    shape_t = [n, h] if role == "w_down_t" else [k, h]  # the transpose's [out, in]
    return np.ascontiguousarray(decode_weight({"shape": shape_t, "family": "dense", "arrays": sub}, arrays).T)


def _mlp_weights(rec: dict, arrays: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """An MLP record's (Linear name, [out, in] weight): up, gate (gated MLPs), down."""
    names = rec.get("linears") or {}
    if rec.get("parts"):
        return [(names.get(r, f"{rec['layer']}.{r}"), w) for r, (w, _b) in _part_weights(rec, arrays).items()]
    out = [(names.get("up", f"{rec['layer']}.up"), _mlp_array(rec, "w_up", arrays))]
    gate = _mlp_array(rec, "w_gate", arrays)
    if gate is not None:
        out.append((names.get("gate", f"{rec['layer']}.gate"), gate))
    out.append((names.get("down", f"{rec['layer']}.down"), _mlp_array(rec, "w_down_t", arrays).T))
    return out


def _mlp_arrays(rec: dict, arrays: dict[str, np.ndarray]):
    from .mlp import _TENSORS, MLPArrays

    if rec.get("parts"):
        w = _part_weights(rec, arrays)
        gate = w.get("gate", (None, None))
        return MLPArrays.from_values({"activation": rec["activation"], "mode": rec["mode"], "w_up": w["up"][0],
                                      "b_up": w["up"][1], "w_gate": gate[0], "b_gate": gate[1],
                                      "w_down_t": w["down"][0].T, "b_down": w["down"][1]})
    return MLPArrays.from_values({"activation": rec["activation"], "mode": rec["mode"],
                                  **{role: _mlp_array(rec, role, arrays) for role in _TENSORS}})


def stored_weights(model: onnx.ModelProto) -> list[tuple[str, torch.Tensor, int]]:
    """(layer, dense [out, in] weight, index of the layer's first node) per lowered layer (per
    Linear of a lowered MLP); [] if none."""
    recs = layers(model)
    if not recs:
        return []
    arrays = _arrays(model, [n for r in recs for n in r["arrays"].values()])
    first = {}
    for i, node in enumerate(model.graph.node):
        if "/" in node.name:
            first.setdefault(node.name.split("/", 1)[0], i)
    out = []
    for r in recs:
        missing = [n for n in r["arrays"].values() if n not in arrays]
        if missing:
            raise OnnxError(f"layer {r['layer']}: stored arrays {missing[:3]} are missing from the model", hint="export the model again")
        at = first.get(r["layer"], len(model.graph.node))
        if _is_mlp(r):
            out += [(name, torch.from_numpy(np.require(w, requirements=["C", "W"])), at) for name, w in _mlp_weights(r, arrays)]
            continue
        w = decode_weight(r, {n: arrays[n] for n in r["arrays"].values()})
        out.append((r["layer"], torch.from_numpy(np.ascontiguousarray(w)), at))
    return out


def owns(model: onnx.ModelProto, node_name: str) -> bool:
    """True if a node belongs to one of sparsecomp's lowered layers (its name is `<layer>/<op>_<n>`)."""
    prefix = node_name.split("/", 1)[0]
    return "/" in node_name and prefix in {r["layer"] for r in layers(model)}


def dense_equivalent(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every lowered layer as MatMul(x, W^T) (+ bias), every lowered MLP as the plain
    dense MLP, every attention site on plain q / k / v: a plain dense export."""
    from . import attention
    from .kernels import Emitter
    from .mlp import plain_dense

    recs = layers(model)
    weights = {name: w for name, w, _ in stored_weights(model)}
    arrays = _arrays(model, [r["arrays"]["bias"] for r in recs if "bias" in r["arrays"]]
                     + [n for r in recs if _is_mlp(r) for n in r["arrays"].values()])
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 20)
    by_layer = {r["layer"]: r for r in recs}
    sites = {r["prefix"]: r for r in attention_sites(model)}
    g = model.graph
    nodes, inits = [], []
    done = set()
    for node in g.node:
        prefix = node.name.split("/", 1)[0] if "/" in node.name else None
        if prefix not in by_layer and prefix not in sites:
            nodes.append(node)
            continue
        if prefix in done:
            continue
        done.add(prefix)
        if prefix in sites:  # its q / k / v are plain again: the site from plain inputs
            e = Emitter(f"{prefix}.plain")
            attention.emit_plain(e, sites[prefix])
            nodes += e.nodes
            inits += e.initializers
            continue
        r = by_layer[prefix]
        if _is_mlp(r):
            e = Emitter(prefix)
            plain_dense(_mlp_arrays(r, arrays), opset).emit(e, r["input"], r["output"])
            nodes += e.nodes
            inits += e.initializers
            continue
        wt = f"{prefix}.dense_weight_t"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weights[prefix].numpy().T), wt))
        if "bias" in r["arrays"]:
            mm = f"{prefix}/dense_matmul"
            nodes.append(helper.make_node("MatMul", [r["input"], wt], [mm], name=f"{prefix}/MatMul"))
            nodes.append(helper.make_node("Add", [mm, r["arrays"]["bias"]], [r["output"]], name=f"{prefix}/Add"))
            inits.append(numpy_helper.from_array(arrays[r["arrays"]["bias"]], r["arrays"]["bias"]))
        else:
            nodes.append(helper.make_node("MatMul", [r["input"], wt], [r["output"]], name=f"{prefix}/MatMul"))
    stored = {n for r in recs for n in r["arrays"].values()}
    kept = [t for t in g.initializer if t.name not in stored]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + inits)
    used = _read_names(out.graph)
    keep = [t for t in out.graph.initializer if t.name in used or t.name in {o.name for o in out.graph.output}]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    del out.metadata_props[:]
    return out


def _read_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of `graph` reads, its subgraphs' (an If's branches) included."""
    names = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _read_names(sub)
    return names


_NP = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64, "int32": np.int32,
       "bool": np.bool_, "uint8": np.uint8, "int8": np.int8}


def example_feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for timing: from sparsecomp's recorded example inputs, else from the graph's input types
    (symbolic dims = 1, integers = 0)."""
    rng = np.random.default_rng(seed)
    graph_inputs = {i.name: i for i in model.graph.input}
    raw = _meta(model).get("sparsecomp.inputs")
    feeds = {}
    if raw:
        for rec in json.loads(raw):
            if rec["name"] not in graph_inputs:
                continue
            dt = _NP.get(rec["dtype"], np.float32)
            if np.issubdtype(dt, np.floating):
                feeds[rec["name"]] = rng.standard_normal(rec["shape"]).astype(dt)
            elif dt is np.bool_:
                feeds[rec["name"]] = np.ones(rec["shape"], dtype=dt)
            else:
                lo, hi = rec.get("min", 0), rec.get("max", 0)
                feeds[rec["name"]] = rng.integers(lo, hi + 1, size=rec["shape"]).astype(dt)
        return feeds
    for name, vi in graph_inputs.items():
        tt = vi.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in tt.shape.dim]
        dt = helper.tensor_dtype_to_np_dtype(tt.elem_type)
        feeds[name] = rng.standard_normal(shape).astype(dt) if np.issubdtype(dt, np.floating) else np.zeros(shape, dtype=dt)
    return feeds
