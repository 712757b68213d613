"""The ORT backend's runner: onnxruntime sessions with sparsecomp's thread setting, and `OrtModule`.

Threads. Sessions take sparsecomp's one thread setting (`sparsecomp.set_num_threads(n)` /
`SPARSECOMP_NUM_THREADS`, else torch's thread count) as their intra-op pool size. By default each
session has its own pool: onnxruntime's process-wide *global* pool cannot be an internal choice of
a library, because once it exists onnxruntime refuses every session that asks for its own threads,
which is what a user's plain `InferenceSession(path)` does (measured: it broke every other
onnxruntime user in the process). So:

- the short-lived one-layer sessions timed at compile time spin only within a run
  (`session.force_spinning_stop = 1`): their workers spin-wait between the nodes of a call, as
  the compiled model's do, and park when the call ends, so the candidates timed round-robin do not
  fight each other (DESIGN.md section 3). With spinning off altogether (how they ran before),
  lowerings of many nodes paid each node's wake-up and looked up to 20% slower than they run in
  the model (a 16x1 768 x 768 layer at 128 tokens: 380 us timed, 310 us spinning within the run);
  left spinning, sessions timed side by side starve each other (one measured 1568 against 887 us).
  The compiled model's session keeps onnxruntime's default (spinning: lower latency per call);
- `use_global_thread_pool()` opts the whole process into one shared pool (what a process with
  several models alive at once wants, e.g. `benchmarks/bench_onnx.py`); a global pool created by
  someone else is detected and used too. Its size is fixed when it is created; `pool_note()` says
  so in the report when the setting changed since.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from sparsecomp.errors import SparsecompError
from sparsecomp.threads import env_threads

__all__ = ["PROBED_FUSIONS", "OrtModule", "fusion_choice", "fusion_note", "pool_note", "session", "threads", "use_global_thread_pool"]

_POOL: dict[str, int] = {}  # {"threads": n} once sessions run on a process-wide pool (-1: size unknown)
_GLOBAL_POOL_REFUSED = "use_per_session_threads must be false when using a global thread pool"


def threads() -> int:
    """sparsecomp's one thread setting: SPARSECOMP_NUM_THREADS (`sparsecomp.threads`), else torch's intra-op threads."""
    return env_threads() or torch.get_num_threads()


def use_global_thread_pool(n: int | None = None) -> int:
    """Run every onnxruntime session of this process on one shared pool of `n` threads (default:
    sparsecomp's setting). Call it before the process's first session; onnxruntime then refuses
    sessions that ask for their own threads, including plain `InferenceSession(path)` calls."""
    from onnxruntime.capi import _pybind_state as C

    n = threads() if n is None else n
    C.set_global_thread_pool_sizes(n, 1)
    _POOL["threads"] = n
    return n


def pool_note() -> str | None:
    n = threads()
    if _POOL.get("threads", 0) > 0 and _POOL["threads"] != n:
        return (f"onnxruntime's shared thread pool was created with {_POOL['threads']} threads and cannot be resized "
                f"to the current setting ({n}) in this process")
    return None


# onnxruntime fusions that sparsecomp's sessions leave off where they measure slower on this machine
# (`fusion_choice`). SkipLayerNormFusion turns Add + LayerNormalization into com.microsoft
# SkipLayerNormalization, whose CPU kernel measured ~6x slower than the two ops it replaces in ORT
# 1.32 on an AVX-512 Xeon (218 us against 37 us at [128, 768]; 3.9 against 1.2 us at one token):
# ~4.5 ms of a 90 ms bert-base forward, dense or sparse alike.
PROBED_FUSIONS = ("SkipLayerNormFusion",)
_FUSIONS: dict[str, Any] = {}


def _residual_norm_model(rows: int = 128, hidden: int = 768, layers: int = 8):
    """`layers` x (residual Add + LayerNormalization): the pattern SkipLayerNormFusion rewrites."""
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "beta")]
    nodes, prev = [], "x"
    for k in range(layers):
        nodes.append(helper.make_node("Add", [prev, "skip"], [f"sum{k}"]))
        nodes.append(helper.make_node("LayerNormalization", [f"sum{k}", "gamma", "beta"], [f"y{k}"], axis=-1, epsilon=1e-12))
        prev = f"y{k}"
    shape = [1, rows, hidden]
    g = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("x", "skip")],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, shape)], inits)
    opsets = [helper.make_opsetid("", 17)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets)), shape


def fusion_choice() -> dict:
    """Which of `PROBED_FUSIONS` to leave off, measured once per process (~0.1 s): the probe
    model run with the fusion and without, interleaved, medians of 15 runs; a fusion is left off
    when it is 10% slower. Returns {"disabled": [names], "us": {name: (fused, unfused)}}.
    `SPARSECOMP_ORT_FUSIONS=default` keeps onnxruntime's defaults without measuring (`measure`, the
    default, measures; anything else is an error)."""
    if _FUSIONS:
        return _FUSIONS
    choice: dict[str, Any] = {"disabled": [], "us": {}}
    setting = os.environ.get("SPARSECOMP_ORT_FUSIONS", "").strip().lower()
    if setting not in ("", "measure", "default"):
        raise SparsecompError(f"SPARSECOMP_ORT_FUSIONS={os.environ['SPARSECOMP_ORT_FUSIONS']!r} is not a setting",
                              hint="'measure' (the default: leave off the fusions measured slower) or 'default' (onnxruntime's own)")
    if setting == "default":
        _FUSIONS.update(choice)
        return _FUSIONS
    import time

    model, shape = _residual_norm_model()
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal(shape, dtype=np.float32), "skip": rng.standard_normal(shape, dtype=np.float32)}
    for name in PROBED_FUSIONS:
        # timed side by side: pools that sleep between calls, so neither spins against the other
        sessions = [session(model, spinning=False, disabled_optimizers=d) for d in ([], [name])]
        times: list[list[float]] = [[], []]
        for k in range(18):
            for i, s in enumerate(sessions):
                t0 = time.perf_counter()
                s.run(None, feeds)
                if k >= 3:
                    times[i].append(time.perf_counter() - t0)
        fused, unfused = (float(np.median(t)) * 1e6 / 8 for t in times)
        choice["us"][name] = (fused, unfused)
        if fused > 1.1 * unfused:
            choice["disabled"].append(name)
    _FUSIONS.update(choice)
    return _FUSIONS


def fusion_note(model) -> str | None:
    """The report's line when a fusion is left off and the model has the pattern it rewrites."""
    choice = fusion_choice()
    if "SkipLayerNormFusion" not in choice["disabled"] or not any(n.op_type == "LayerNormalization" for n in model.graph.node):
        return None
    fused, unfused = choice["us"]["SkipLayerNormFusion"]
    return (f"onnxruntime's SkipLayerNormalization fusion is left off in sparsecomp's sessions: measured {fused:.0f} us "
            f"fused against {unfused:.0f} us unfused per residual Add + LayerNormalization of [128, 768] here; a session "
            "you open yourself keeps it unless you pass InferenceSession(..., disabled_optimizers=['SkipLayerNormFusion'])")


def session(model: Any, *, optimize: bool = True, spinning: bool | str = True, disabled_optimizers: list[str] | None = None):
    """An InferenceSession on the CPU provider (model: ModelProto, bytes or path).

    `optimize=False` is ORT_DISABLE_ALL (no constant folding, no fusions): the tests run every
    export both ways, since folding is what turns the narrow stored indices into int32 once.
    `spinning="run"` spins only within a call (sessions timed side by side), `spinning=False` never.
    Fusions measured slower here are left off (`fusion_choice`) unless `disabled_optimizers` names
    the ones to leave off (`[]`: onnxruntime's defaults, as a plain InferenceSession has them).
    """
    import onnxruntime as ort

    def options(shared: bool):
        so = ort.SessionOptions()
        if shared:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads, so.inter_op_num_threads = threads(), 1
            if spinning not in (True, False, "run"):
                raise ValueError(f"spinning={spinning!r}: True, False or 'run'")
            if spinning is False:
                so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            elif spinning == "run":
                so.add_session_config_entry("session.force_spinning_stop", "1")
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                       else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        so.log_severity_level = 3
        return so

    data = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    if isinstance(data, (str, os.PathLike)):
        data = str(data)
    disabled = disabled_optimizers if disabled_optimizers is not None else (fusion_choice()["disabled"] if optimize else [])
    kw = {"disabled_optimizers": disabled} if disabled else {}
    try:
        return ort.InferenceSession(data, options(bool(_POOL)), providers=["CPUExecutionProvider"], **kw)
    except Exception as err:
        if _POOL or _GLOBAL_POOL_REFUSED not in str(err):
            raise
    _POOL.setdefault("threads", -1)  # someone else made the process-wide pool: use it
    return ort.InferenceSession(data, options(True), providers=["CPUExecutionProvider"], **kw)


_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.int64: np.int64,
       torch.int32: np.int32, torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8}
# onnxruntime's input type strings -> the torch dtype a caller passes
_ORT_DTYPE = {"tensor(float)": torch.float32, "tensor(double)": torch.float64, "tensor(float16)": torch.float16,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
              "tensor(uint8)": torch.uint8, "tensor(int8)": torch.int8, "tensor(int16)": torch.int16,
              "tensor(bfloat16)": torch.bfloat16}
_SHAPE_HINT = "only batch/sequence dims recorded as dynamic may change; compile again with example inputs of this shape"
_MISSING = object()
_RUN_OPTIONS: list = []


def _quiet_run():
    """RunOptions that keep onnxruntime from logging a failed run to stderr (its `[E:onnxruntime:...]`
    line): the failure comes back as one SparsecompError instead."""
    if not _RUN_OPTIONS:
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.log_severity_level = 4  # fatal only
        _RUN_OPTIONS.append(ro)
    return _RUN_OPTIONS[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _spec_children(spec) -> list:
    return list(spec.children()) if hasattr(spec, "children") else list(spec.children_specs)  # torch < 2.10


OUTPUT = object()  # `OrtModule(out_constants=...)`: a graph output onnxruntime returns


class OrtModule(torch.nn.Module):
    """Runs an exported model in onnxruntime with the original model's calling convention.

    Inputs are flattened as the captured graph flattens them (`in_spec`), fed by name; outputs come
    back as torch tensors in the model's output structure (`out_spec`). `onnx_model` is the
    exported ModelProto (what `export_onnx` writes); `to_onnx(opset=..., dynamic_axes=...)`
    exports again with other settings from the same per-layer decisions.

    Calls bind as the compiled graph's signature does: the example's positional inputs by position
    or by their names, its keyword inputs by name. Every input is checked against the session's
    input metadata (CPU, dtype, rank, fixed dims, dynamic dims shared between inputs) before
    onnxruntime sees it, so a bad call is one clear SparsecompError naming the input, and
    onnxruntime never logs. `arg_names` (optional): the graph's argument names (its codegen's
    `pytree_info.orig_args`); without them the names of positional inputs are read from the
    placeholders (`input_names`), which for a plain tensor argument is its name.
    """

    def __init__(self, onnx_model, sess, *, in_spec, out_spec, input_names: list[str], label: str, exporter=None,
                 arg_names: list[str] | None = None, out_constants: list | None = None):
        super().__init__()
        self.onnx_model = onnx_model
        self._sess = [sess]  # a list: nn.Module must not try to deep-copy or register it
        self._in_spec, self._out_spec = in_spec, out_spec
        # the graph's flat outputs: OUTPUT where onnxruntime returns the next one, else the constant
        # the model returns there (None, a number), which the ONNX graph has no output for
        self._out_constants = out_constants
        self._input_names = input_names  # flattened placeholder order -> ONNX input name (or None: unused)
        self._graph_inputs = {i.name: i for i in sess.get_inputs()}
        # name -> (torch dtype or None where not one `_ORT_DTYPE` knows, dims or None), read once
        self._expects = {i.name: (_ORT_DTYPE.get(i.type), i.shape) for i in sess.get_inputs()}
        self._label = label
        self._exporter = exporter
        self._signature = self._compiled_signature(arg_names)
        # every compiled input a plain leaf (tensors, not nested): the bound call is the flat list
        self._flat_call = self._signature is not None and all(c.is_leaf() for s in _spec_children(in_spec) for c in _spec_children(s))

    @property
    def session(self):
        return self._sess[0]

    def to_onnx(self, *, opset: int | None = None, dynamic_axes: Any = "auto"):
        if self._exporter is None:
            raise SparsecompError(f"{self._label}: this module cannot export again", hint="compile the model with backend='ort'")
        return self._exporter(opset=opset, dynamic_axes=dynamic_axes)

    # -- binding a call to the compiled signature ------------------------------------------------

    def _compiled_signature(self, arg_names):
        """(positional names, keyword names) of the compiled signature, or None where `in_spec` is
        not the exported ((args...), {kwargs}) form. A positional name is None where unknown (an
        unused or nested input whose name the placeholders do not carry)."""
        spec = self._in_spec
        if spec is None or spec.type is not tuple or spec.num_children != 2:
            return None
        args_spec, kwargs_spec = _spec_children(spec)
        if args_spec.type not in (tuple, list) or kwargs_spec.type is not dict:
            return None
        keywords = [str(k) for k in kwargs_spec.context]
        n = args_spec.num_children
        if arg_names is not None and len(arg_names) >= n:
            return [str(a) for a in arg_names[:n]], keywords
        names, offset = [], 0
        for child in _spec_children(args_spec):
            leaf = child.is_leaf()
            name = self._input_names[offset] if leaf and offset < len(self._input_names) else None
            names.append(name if name not in keywords else None)
            offset += child.num_leaves
        return names, keywords

    def _form(self) -> tuple[str, str]:
        """(the compiled inputs as a list, how to call): e.g. ("a, b", "model(a, b)")."""
        positional, keywords = self._signature
        pos = [p or f"<input {i}>" for i, p in enumerate(positional)]
        listed = ", ".join(pos + [f"{k}=" for k in keywords]) or "no inputs"
        call = f"{self._label}({', '.join(pos + [f'{k}=...' for k in keywords])})"
        return listed, call

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The call as the example was given: positional inputs in order (also when passed by
        name), keyword inputs by name. Extra, missing, duplicate or unknown inputs are errors."""
        positional, keywords = self._signature
        n, total = len(positional), len(positional) + len(keywords)
        if not kwargs and not keywords and len(args) == n:  # the usual call: nothing to bind or explain
            return args, {}
        got = len(args) + len(kwargs)
        listed, call = self._form()
        hint = f"call it as {call}"
        if len(args) > n:
            if n == 0 and keywords:
                raise SparsecompError(f"{self._label} was compiled for keyword inputs ({listed}), got {len(args)} positional",
                                      hint=f"{hint}, as in the example inputs")
            where = f"{total} inputs" if not keywords else f"{n} positional input{'s' if n != 1 else ''}"
            raise SparsecompError(f"{self._label} was compiled for {where} ({listed}), got {len(args) if keywords else got}",
                                  hint=hint)
        bound = list(args) + [_MISSING] * (n - len(args))
        named = {}
        for key, value in kwargs.items():
            if key in keywords:
                named[key] = value
            elif key in positional:
                i = positional.index(key)
                if i < len(args):
                    raise SparsecompError(f"{self._label} got input {key!r} twice: by position ({i + 1}) and by name", hint=hint)
                bound[i] = value
            else:
                unknown = " (pass the inputs positionally)" if None in positional else ""
                raise SparsecompError(f"{self._label} has no input {key!r}: it was compiled for {total} input"
                                      f"{'s' if total != 1 else ''} ({listed})", hint=hint + unknown)
        missing = [positional[i] or f"<input {i}>" for i, v in enumerate(bound) if v is _MISSING]
        missing += [k for k in keywords if k not in named]
        if missing:
            raise SparsecompError(f"{self._label} was compiled for {total} input{'s' if total != 1 else ''} ({listed}), "
                                  f"got {got}: missing {', '.join(missing)}", hint=hint)
        return tuple(bound), {k: named[k] for k in keywords}

    def _flatten(self, args: tuple, kwargs: dict) -> list:
        from torch.utils._pytree import tree_flatten

        if self._in_spec is None:
            return tree_flatten((args, kwargs))[0]
        if self._signature is not None:
            args, kwargs = self._bind(args, kwargs)
            if self._flat_call:
                return [*args, *kwargs.values()]
        from torch.fx._pytree import tree_flatten_spec

        hint = "call it with the same arguments (number, names, nesting) as the example inputs"
        try:
            flat = tree_flatten_spec((args, kwargs), self._in_spec)
        except Exception as err:  # noqa: BLE001
            raise SparsecompError(f"{self._label}: inputs do not match the compiled signature ({err})", hint=hint) from None
        given = tree_flatten((args, kwargs))[0]
        if len(given) != len(flat):  # tree_flatten_spec ignores extra items of nested tuples / dicts
            raise SparsecompError(f"{self._label} was compiled for {len(flat)} input tensors (after flattening nested "
                                  f"tuples, lists and dicts), got {len(given)}", hint=hint)
        return flat

    # -- checking each input against the session's metadata --------------------------------------

    def _as_array(self, name: str, value: Any, sizes: dict) -> np.ndarray:
        expected, dims = self._expects[name]
        if not isinstance(value, torch.Tensor):
            if isinstance(value, (bool, int, float)) and expected is not None and expected in _NP:
                try:
                    t = torch.tensor(value, dtype=expected)
                except (RuntimeError, OverflowError, ValueError):  # out of the dtype's range
                    t = None
                if t is not None and (t.item() == value or (expected.is_floating_point and not isinstance(value, bool))):
                    value = t  # a Python number for a scalar input, as torch takes one (never truncated)
            if not isinstance(value, torch.Tensor):
                kind = "a tensor" if expected is None else f"a{'n' if _dtype_name(expected)[0] in 'aeiou' else ''} {_dtype_name(expected)} tensor"
                raise SparsecompError(f"{self._label}: input {name!r} is {type(value).__name__} {value!r:.40}, "
                                      f"the compiled model takes {kind}",
                                      hint="call it with the same kinds of arguments as the example inputs")
        if value.device.type != "cpu" or value.layout != torch.strided:
            want = _dtype_name(expected) if expected is not None else "tensor"
            what = "sparse" if value.layout != torch.strided else ""
            extra = " (meta tensors have no data)" if value.device.type == "meta" else ""
            raise SparsecompError(
                f"{self._label} was compiled for {want} CPU inputs: input {name!r} is {what + ' ' if what else ''}"
                f"{_dtype_name(value.dtype)} on {value.device}{extra}",
                hint="pass dense CPU tensors with data (x.cpu(), x.to_dense())")
        if expected is not None and value.dtype != expected:
            want = _dtype_name(expected)
            raise SparsecompError(
                f"{self._label} was compiled for {want} inputs: input {name!r} is {_dtype_name(value.dtype)}",
                hint=f"cast it ({name}.to(torch.{want})), or compile again with example inputs of this dtype")
        if value.dtype not in _NP:
            raise SparsecompError(f"{self._label}: input {name!r} has dtype {_dtype_name(value.dtype)}, which onnxruntime cannot take here",
                                  hint="cast it to float32 (or the example's dtype)")
        if dims is not None:
            if value.dim() != len(dims):
                raise SparsecompError(
                    f"{self._label} was compiled for other input shapes: input {name!r} has rank {value.dim()}, "
                    f"the exported model takes rank {len(dims)} {dims}", hint=_SHAPE_HINT)
            for d, (want_d, got_d) in enumerate(zip(dims, value.shape)):
                if isinstance(want_d, int) and want_d >= 0:
                    if want_d != got_d:
                        raise SparsecompError(
                            f"{self._label} was compiled for other input shapes: input {name!r} has shape {list(value.shape)}, "
                            f"the exported model takes {dims} (dim {d} is fixed at {want_d})", hint=_SHAPE_HINT)
                elif isinstance(want_d, str) and want_d:
                    # one dynamic dim named in several inputs: the export made them one size
                    seen = sizes.setdefault(want_d, (name, d, got_d))
                    if seen[2] != got_d:
                        raise SparsecompError(
                            f"{self._label} was compiled for inputs that agree on dim {want_d!r}: input {seen[0]!r} has "
                            f"{seen[2]} (dim {seen[1]}), input {name!r} has {got_d} (dim {d})",
                            hint="give these inputs the same size in that dim, as in the example inputs")
        return value.detach().contiguous().numpy()

    def feeds(self, args: tuple, kwargs: dict) -> dict[str, np.ndarray]:
        flat = self._flatten(args, kwargs)
        feeds, sizes = {}, {}
        for name, value in zip(self._input_names, flat):
            if name is None:
                continue
            feeds[name] = self._as_array(name, value, sizes)
        return feeds

    def forward(self, *args, **kwargs):
        feeds = self.feeds(args, kwargs)
        try:
            outs = self.session.run(None, feeds, _quiet_run())
        except Exception as err:  # noqa: BLE001 - what the checks above cannot see (values the graph rejects)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise SparsecompError(f"{self._label}: onnxruntime failed on these inputs: {first[:300]}", hint=_SHAPE_HINT) from None
        tensors = [torch.from_numpy(o) for o in outs]
        if self._out_spec is None:
            return tensors[0] if len(tensors) == 1 else tuple(tensors)
        from torch.utils._pytree import tree_unflatten

        if self._out_constants is not None:
            it = iter(tensors)
            tensors = [next(it) if c is OUTPUT else c for c in self._out_constants]
        return tree_unflatten(tensors, self._out_spec)
