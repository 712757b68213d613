"""The public API (the face): `analyze`, `capture`, `run_pipeline`, `compile`, `sparsify`,
`export_onnx`. Entry points (or options) not built yet say so clearly rather than failing obscurely.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable

import torch

from sparsecomp.frontend import capture
from sparsecomp.errors import NotYetAvailableError, SparsecompError
from sparsecomp import callpath, omp
from sparsecomp.pass_manager import Instrument, PassContext, PassManager
from sparsecomp.ir import global_module_hooks, normalize_inputs
from sparsecomp.lowering import LOSSY_MIN_COSINE, TIR_GEMV, KernelFilter
from sparsecomp.report import CompileReport, SparsityReport
from sparsecomp.progress import progress_bar
from sparsecomp.threads import env_threads_to_torch
from sparsecomp.timing import OthersCpu

__all__ = ["analyze", "run_pipeline", "compile", "CompiledModel", "sparsify", "export_onnx", "set_num_threads", "BACKENDS"]

# Above this share of the CPUs taken by other processes while layers are timed, the report says the
# decisions measured contention (on this 2-core VM one busy core made a parallel kernel 13x slower).
BUSY_CPU_SHARE = 0.25


# Backends the compile contract names, and where each stands. A name not in this table is a typo.
BACKENDS: dict[str, str | None] = {
    "torch": None,  # available
    "ort": None,  # available: ONNX Runtime on sparsecomp's ONNX export (backends/ort)
    "tvm": "not yet available",
    "triton": "not yet available",
    "auto": "not yet available (needs at least one backend)",
}


def check_backend(backend: str) -> None:
    """A clear error for a backend name that is unknown or not built yet (compile, and the CLI
    before it loads a model)."""
    if backend not in BACKENDS:
        raise SparsecompError(f"unknown backend '{backend}'", hint=f"backends: {', '.join(BACKENDS)}")
    if BACKENDS[backend] is not None:
        available = ", ".join(b for b, why in BACKENDS.items() if why is None)
        raise NotYetAvailableError(f"backend '{backend}' is {BACKENDS[backend]}", hint=f"available backends: {available}")


def _load_passes() -> None:
    import sparsecomp.passes  # noqa: F401  (registers the built-in passes)


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        return True
    return type(model).__name__ == "ModelProto"


def _analyze_onnx(model: Any, name: str | None, blocks: str, nm: str) -> SparsityReport:
    from sparsecomp import onnx_io
    from sparsecomp.passes.analysis.analyze_weights import parse_block_shapes, parse_nm_list, weight_stats

    proto = onnx_io.load_onnx(model) if isinstance(model, (str, Path)) else model
    block_list, nm_list = parse_block_shapes(blocks), parse_nm_list(nm)
    sites = [(i, s.name, s.op.lower(), s.weight) for i, s in enumerate(onnx_io.onnx_weight_sites(proto))]
    from sparsecomp.backends.ort import files as ort_files

    note = "ONNX input: weights are read from the initializers of MatMul/Gemm/Conv nodes"
    if ort_files.is_export(proto):
        # sparsecomp's own export stores sparse layers compactly (values + narrow indices): read
        # them back from its metadata instead of the graph, in graph order among the other sites
        order = {n.name: i for i, n in enumerate(proto.graph.node)}
        sites = [(order.get(s.node_name, i), s.name, s.op.lower(), s.weight) for i, s in enumerate(onnx_io.onnx_weight_sites(proto))
                 if not ort_files.owns(proto, s.node_name)]
        stored = ort_files.stored_weights(proto)
        sites += [(first, name, "matmul", w) for name, w, first in stored]  # (lowered: no one ONNX op holds them)
        sites.sort(key=lambda t: t[0])
        note = (f"ONNX input, a sparsecomp export: the {len(stored)} lowered layers' weights are rebuilt from its compact "
                "storage (metadata `sparsecomp.layers`), the others read from MatMul/Gemm/Conv initializers")
    layers = [weight_stats(name, op, w, blocks=block_list, nm=nm_list) for _, name, op, w in sites]
    label = name or (Path(model).name if isinstance(model, (str, Path)) else proto.graph.name or "onnx model")
    return SparsityReport(
        model=label, source="onnx", pipeline="analyze-weights", layers=layers,
        notes=[f"{note}; MLP regions and activation profiles need the torch model"],
    )


def analyze(model: torch.nn.Module | str | Path, example_inputs: Any = None, calibration: Iterable | None = None, *,
            name: str | None = None, blocks: str | None = None, nm: str | None = None) -> SparsityReport:
    """Analyse the sparsity of a model's weights (and activations, with calibration data).

    `model`: an `nn.Module` (captured with `sparsecomp.capture`), an already captured GraphModule,
    or an `.onnx` file / `onnx.ModelProto` (weights read from the ONNX graph).
    `calibration`: an iterable of batches, each a tuple of positional args or a dict of keyword
    args; when given, `profile-activations` runs on them.
    `blocks` / `nm`: block shapes and N:M patterns to measure (defaults: the analysis pass's).
    """
    _load_passes()
    from sparsecomp.passes.analysis.analyze_weights import DEFAULT_BLOCKS, DEFAULT_NM

    blocks, nm = blocks or DEFAULT_BLOCKS, nm or DEFAULT_NM
    if _is_onnx(model):
        if calibration is not None:
            raise SparsecompError("calibration is not supported for ONNX input yet",
                                  hint="analyse the torch model to profile activations")
        return _analyze_onnx(model, name, blocks, nm)
    if not isinstance(model, torch.nn.Module):
        raise SparsecompError(f"analyze expects an nn.Module or an .onnx path, got {type(model).__name__}")
    label = name or type(model).__name__
    if isinstance(model, torch.fx.GraphModule) and "sparsecomp.capture" in model.meta:
        gm = model
    else:
        if example_inputs is None:
            raise SparsecompError(f"analyze({label}) needs example_inputs to capture the model")
        gm = capture(model, example_inputs, name=label)
    pipeline = f'analyze-weights{{blocks="{blocks}",nm="{nm}"}},find-mlps'
    # an empty calibration is as none: the weights' report, without activation profiles
    batches = _check_calibration(calibration, label, empty_ok=True) if calibration is not None else []
    if batches:
        pipeline += ",profile-activations"
    ctx = PassContext.create(example_inputs, batches, model_name=label)
    PassManager(pipeline).run(gm, ctx)
    info = gm.meta.get("sparsecomp.capture")
    return SparsityReport(
        model=label, source="fx", pipeline=pipeline,
        layers=ctx.results.get("analyze-weights", []), mlps=ctx.results.get("find-mlps", []),
        activations=ctx.results.get("profile-activations", []),
        capture={"dynamic": info.dynamic, "static_shapes": info.static_shapes, "notes": info.notes} if info else None,
        notes=list(info.notes) if info else [],
    )


def run_pipeline(model: torch.nn.Module, example_inputs: Any, pipeline: str, *, calibration: Iterable | None = None,
                 instruments: list[Instrument] | tuple = (), name: str | None = None, repro: str = "") -> tuple[torch.fx.GraphModule, PassContext]:
    """Capture `model` (unless already a captured GraphModule) and run `pipeline` over it."""
    _load_passes()
    label = name or type(model).__name__
    pm = PassManager(pipeline, instruments)  # parse first: a typo fails before a slow capture
    if isinstance(model, torch.fx.GraphModule) and ("sparsecomp.capture" in model.meta or example_inputs is None):
        gm = model
    else:
        gm = capture(model, example_inputs, name=label)
    ctx = PassContext.create(example_inputs, list(calibration or []), model_name=label, repro=repro)
    pm.run(gm, ctx)
    return gm, ctx


class CompiledModel(torch.nn.Module):
    """What `compile` returns: call it like the model; `report` says what was done per layer.

    `gm` is the lowered module (the lowered GraphModule for the torch backend, a module wrapping an
    ONNX Runtime session for ort). When it would not be faster end to end than the original model
    (no layer runs sparse, or measured slower on the example inputs), calls go to the original
    model instead (`runs == "eager"`), and the report says so: compiling never makes a model slower.
    `torch_threads`: where compile measured it faster, a call runs torch's own ops on that many
    threads (`torch.set_num_threads`, process-wide, restored after the call: do not share one
    process's torch between this model and other work running at the same time on other Python threads).
    That holds for calls no larger than the example the choice was measured on (its first input's
    element count, `end_to_end["torch_threads_max_numel"]`): a larger call (more rows, a longer
    sequence) keeps torch's threads, since its torch ops, such as the GEMMs of a layer that falls
    back to dense, then have work to share (the FFN of bench_mlp at 64 rows ran at 0.6x of eager
    when one thread measured at one row applied to it). Where the example has no positional
    tensor (keyword inputs), the choice applies to every call (bert-base at 90% compiled at
    sequence 128 and called at 256 measured the same on one thread as on two: 195 vs 193 ms).
    """

    def __init__(self, gm: torch.fx.GraphModule, report: CompileReport, backend: str, eager: torch.nn.Module | None = None,
                 torch_threads: int | None = None):
        super().__init__()
        self.training = False  # inference only (`train`)
        self.gm, self.report, self.backend = gm, report, backend
        self._eager = [eager]  # a list: not registered as a submodule (its weights are the user's)
        # torch's own ops (layer norm, attention, ...) on this many threads during a call, where
        # compile measured that faster (`_choose_end_to_end`); None: torch's current setting.
        e2e = report.end_to_end or {}
        self.torch_threads = torch_threads if torch_threads is not None else e2e.get("torch_threads")
        self._threads_max_numel = e2e.get("torch_threads_max_numel")  # None: every call (as while it is measured)
        # torch.export's module re-checks the inputs' pytree structure in a forward pre-hook on
        # every call (key paths, spec equality): ~70 us a call here, twice eager's whole time on a
        # small MLP, and more after a kernel has streamed the caches. Its shape guards
        # (`_guards_fn`, a node of the graph) still run on every call; the structure check runs
        # only when a call fails, to say why (`_explain_failure`).
        self._check_structure = hasattr(gm, "validate_inputs") and hasattr(gm, "_guards_fn") and hasattr(gm, "_in_spec")
        if isinstance(gm, torch.fx.GraphModule):
            callpath.bind_attribute_paths(gm)
        if self._check_structure:
            gm.validate_inputs = False
            callpath.unwrap_guards(gm)
            callpath.drop_export_hooks(gm)

    def __call__(self, *args, **kwargs):
        # nn.Module's fast path without its two frames when nothing is hooked (see `callpath`);
        # hooks, tracing and torch.compile still go through nn.Module
        if (self._forward_pre_hooks or self._forward_hooks or self._backward_hooks or self._backward_pre_hooks
                or self._compiled_call_impl is not None or global_module_hooks() or torch._C._get_tracing_state()):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    @property
    def runs(self) -> str:
        return "eager" if self._eager[0] is not None else "compiled"

    def train(self, mode: bool = True) -> "CompiledModel":
        """A compiled model is for inference: `eval()` is a no-op, `train()` an error (its weights
        are frozen constants of the graph, captured in eval mode; torch.export's module would
        raise NotImplementedError from inside)."""
        if mode:
            raise SparsecompError(f"{self.report.model} was compiled for inference: it has no training mode",
                                  hint="train the original model, then compile it again")
        self.training = False
        return self

    def forward(self, *args, **kwargs):
        if self._eager[0] is not None:
            return self._eager[0](*args, **kwargs)
        n = self.torch_threads
        if n is None or n == (before := torch.get_num_threads()) or not self._as_measured(args):
            return self._run(args, kwargs)
        torch.set_num_threads(n)  # ~1 us each way
        try:
            return self._run(args, kwargs)
        finally:
            torch.set_num_threads(before)

    def _as_measured(self, args) -> bool:
        """Whether the thread choice applies to this call: its first input no larger than the
        example's (see the class docstring)."""
        limit = self._threads_max_numel
        if limit is None or not args or not isinstance(args[0], torch.Tensor):
            return True
        return args[0].numel() <= limit

    def _run(self, args, kwargs):
        try:
            gm = self.gm
            if gm._forward_pre_hooks or gm._forward_hooks or global_module_hooks():
                return gm(*args, **kwargs)
            # nn.Module's own fast path when nothing is hooked, minus its frames: ~30 us a call
            # after a kernel has streamed the caches
            return gm.forward(*args, **kwargs)
        except AssertionError as err:  # torch.export's input guards
            if "Guard failed" not in str(err):
                raise
            self._explain_failure(args, kwargs)  # another structure, dtype or rank: says which, plainly
            raise SparsecompError(
                f"{self.report.model} was compiled for other input shapes: {err}",
                hint="only batch/sequence dims recorded as dynamic may change; compile again with example inputs of this shape",
            ) from None
        except Exception:
            self._explain_failure(args, kwargs)
            raise

    def _explain_failure(self, args, kwargs) -> None:
        """After a failed call: if the inputs' structure (number, names, nesting) is not the
        example's, raise that instead of whatever the graph tripped on."""
        if not self._check_structure:
            return
        try:
            from torch.export._unlift import _check_inputs_match
        except ImportError:  # a private helper: without it, the original error stands
            return
        try:
            _check_inputs_match(args, kwargs, self.gm._in_spec)
        except ValueError as err:
            raise SparsecompError(f"{self.report.model} was compiled for other inputs: {err}",
                                  hint="call it with the same arguments (number, names, nesting) as the example inputs") from None
        # the structure fits: then a value of another kind, dtype or rank (what the graph's shape
        # guards would trip on with an IndexError or a TypeError)
        from sparsecomp.ir import describe_graph_inputs, describe_inputs, flat_inputs

        try:
            flat = flat_inputs(self.gm, args, kwargs)
        except Exception:  # noqa: BLE001 - the original error stands
            return
        vals = [ph.meta.get("val") for ph in self.gm.graph.nodes if ph.op == "placeholder"]
        for value, val in zip(flat, vals):
            if isinstance(val, torch.Tensor) and (not isinstance(value, torch.Tensor) or value.dtype != val.dtype
                                                  or value.dim() != val.dim() or value.device.type != "cpu"):
                where = "" if not isinstance(value, torch.Tensor) or value.device.type == "cpu" else f" on {value.device}"
                raise SparsecompError(f"{self.report.model} was compiled for CPU inputs {describe_graph_inputs(self.gm)}, got "
                                      f"{describe_inputs((args, kwargs))}{where}",
                                      hint="pass CPU torch tensors with the example inputs' dtypes and ranks "
                                           "(only the batch / sequence sizes may change)") from None


def _check_options(*, kernels, max_seconds_per_layer, cache_dir) -> None:
    """compile()'s plain options, checked before any work (a wrong type would otherwise surface
    from deep inside the lowering)."""
    if kernels is not None and not isinstance(kernels, str):
        raise SparsecompError(f"kernels= takes one comma-separated string, got {type(kernels).__name__}",
                              hint='e.g. kernels="dense,tir-sell"')
    if isinstance(max_seconds_per_layer, bool) or not isinstance(max_seconds_per_layer, numbers.Real) \
            or not math.isfinite(max_seconds_per_layer) or max_seconds_per_layer <= 0:
        raise SparsecompError(f"max_seconds_per_layer must be a positive number of seconds, got {max_seconds_per_layer!r}",
                              hint="the default is 0.5; each layer's candidates are timed for at most this long")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise SparsecompError(f"cache_dir {str(cache_dir)!r} exists and is not a directory",
                              hint="give a directory (created if missing), or leave it out for $SPARSECOMP_CACHE_DIR")


KERNELS_HINT = ("name kernels as the kernel column of a report compiled without kernels= shows them, up to their '{' "
                "(e.g. dense, torch-csr, tir-sell, tir-bsr; ort: dense, ell, sell4, bsr16x1; a fused MLP's whole label "
                "also works), and include dense")


def kernel_names(spec: str) -> set[str]:
    """The names in `compile(kernels=...)` / `--kernels`: comma-separated, a comma inside braces
    belonging to the name ("dense,union-tir{rows=2,screen=i8}" is two names)."""
    return {k.strip() for k in re.split(r",(?![^{]*})", spec) if k.strip()}


def compile(model, example_inputs, backend: str = "torch", *, sparsify=None, calibration=None,  # noqa: A001
            activation_sparsity=None, tune: bool = False, pipeline: str | None = None, verify: bool = True,
            cache_dir: str | None = None, name: str | None = None, max_seconds_per_layer: float = 0.5,
            use_tir: bool = True, kernels: str | None = None) -> CompiledModel:
    """Compile `model` for `backend`; the result computes the same outputs, faster where sparsity pays.

    Stages (each a small function below): optional one-shot sparsification of a copy of the model
    (`sparsify=`, or the sparsify passes `pipeline=` starts with; lossy, only when asked) -> capture -> the pass pipeline (default: analysis,
    `sparse-linear`, and the activation-sparsity rewrite when asked) -> the backend's lowering, which
    chooses every layer's format/kernel by measuring the candidates on its real weights and input
    shape (bounded by `max_seconds_per_layer`, cached in `cache_dir`, default `$SPARSECOMP_CACHE_DIR`)
    -> verification -> the end-to-end check (calls go to the original model unless the compiled one
    is measured faster).

    Verify semantics (DESIGN.md section 2): without lossy passes the reference is eager; once a lossy
    pass was asked for, it is the rewritten graph run on the reference ops, so verify checks the
    lowering and never undoes what was asked. A model that disagrees is never returned (it falls back
    to dense and says so).
    """
    check_backend(backend)
    _check_options(kernels=kernels, max_seconds_per_layer=max_seconds_per_layer, cache_dir=cache_dir)
    env_threads_to_torch()  # (the one thread setting: DESIGN.md section 2)
    _load_passes()
    from sparsecomp.cache import DecisionCache
    from sparsecomp.ir import compare_outputs, output_cosine, run_graph

    label = name or type(model).__name__
    plan = _plan(pipeline, sparsify, activation_sparsity)  # a typo fails here, before any slow work
    batches = _check_calibration(calibration, label) if calibration is not None else None
    pruned: list[str] = []
    for cfg in plan.sparsify:
        model, what = _apply_sparsify(model, cfg, batches, label, example_inputs)
        pruned.append(what)
    pm = PassManager(plan.graph)
    example = normalize_inputs(example_inputs)
    # Compiled models are for inference; the reference and the fallback to the original model run
    # it too, so it stays in eval mode (capture alone would leave it as it was).
    was_training = isinstance(model, torch.nn.Module) and any(m.training for m in model.modules())
    if was_training:
        model.eval()
    gm = capture(model, example_inputs, name=label)
    ctx = PassContext.create(example_inputs, batches or [], model_name=label)
    pm.run(gm, ctx)
    # The reference: eager (lossless) or the rewritten graph on the reference ops (after lossy passes).
    reference = run_graph(gm, example) if plan.graph_lossy else run_graph(model, example)

    backend_mod = _backend(backend)
    cache = DecisionCache(backend, Path(cache_dir) if cache_dir else None)
    only = KernelFilter(kernel_names(kernels)) if kernels else None
    # tune: the whole kernel-variant grid, with 4x the time per layer (cached like any decision)
    extra = {"tune": True} if tune else {}
    try:
        with progress_bar(f"compiling {label}", prefix="measuring kernels: ") as update, OthersCpu() as others:
            lowered = backend_mod.lower(gm, ctx.example_inputs, cache=cache,
                                        max_seconds=max_seconds_per_layer * (4 if tune else 1),
                                        use_tir=use_tir, only=only, progress=update, **extra)
    except SparsecompError as err:
        if only is not None and not only.hits:  # no name matched any candidate: the cause is kernels= itself
            raise type(err)(f"kernels={kernels!r}: no name matched a candidate kernel ({err.message})", hint=KERNELS_HINT) from None
        raise
    report = CompileReport(label, backend, plan.text, cache=dict(cache.stats))
    report.notes.extend(lowered.notes)
    if cache.write_error:
        report.notes.append(f"the decision cache {str(cache.path)!r} could not be written ({cache.write_error}): this "
                            "compile's measurements are not kept; set SPARSECOMP_CACHE_DIR (or cache_dir=) to a writable directory")
    if only is not None and only.unmatched() and lowered.decisions:
        report.notes.append(f"kernels=: {', '.join(map(repr, only.unmatched()))} matched no candidate kernel of any layer "
                            "(a typo? names are the report's kernel labels up to their '{')")
    if was_training:
        report.notes.append("the model was in training mode: compiled in eval mode (inference: dropout off, batch norm on "
                            "running statistics), and the model compile runs (yours, or sparsify='s pruned copy) stays in it")
    measured = any(not getattr(d, "cached", True) and getattr(d, "dense_us", 0) for d in lowered.decisions)
    if measured and others.share > BUSY_CPU_SHARE:
        report.notes.append(
            f"other processes used {others.share:.0%} of the CPUs while layers were timed: the measured choices "
            "(now cached) reflect that contention and may not hold on a quiet machine; to measure again, compile "
            "with an empty cache_dir (or clear the cache) when the machine is quiet")
    report.notes.extend(f"lossy (asked for): {what}" for what in pruned)  # (the graph's lossy steps: once it is known whether they run)
    report.rows = _report_rows(ctx, lowered.decisions)
    spin = omp.spin_note()
    if spin and backend == "torch" and any(r.get("decision") == "sparse" for r in report.rows) and _tir_pool() != "openmp":
        report.notes.append(spin)  # (on torch's own threads the kernels share torch's spin: nothing to contend with)
    quality = ctx.results.get("sparse-mlp-quality")
    if quality:
        report.notes.append("activation-sparsity quality vs dense on calibration batches: "
                            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in quality.items()))
    if verify:
        out = run_graph(lowered.module, example)
        ok, err, allowed = compare_outputs(out, reference)
        report.verify = {"ok": ok, "max_abs_error": err, "allowed": allowed,
                         "reference": "rewritten graph on reference ops" if plan.graph_lossy else "eager"}
        if not ok and plan.graph_lossy:
            # With thresholds, a kernel's last-bit rounding in one layer can flip a neuron sitting at
            # its threshold in a later one, so elementwise 1e-4 is the wrong test for the whole model.
            # Every kernel was already checked against the reference op on its real input; the whole
            # model must still agree with the reference graph in direction (cosine >= 0.999).
            cos = output_cosine(out, reference)
            ok = cos >= LOSSY_MIN_COSINE
            report.verify.update(ok=ok, cosine=cos, rule=f"cosine >= {LOSSY_MIN_COSINE} (lossy modes)")
        if not ok:  # never return a model that disagrees
            return _dense_fallback(model, example_inputs, example, backend, report, plan, pruned, err, allowed,
                                   cache_dir=cache_dir, name=label, use_tir=use_tir, kernels=kernels)
    cm = _choose_end_to_end(model, lowered.module, report, backend, example,
                            "the pruned model, uncompiled" if getattr(model, PRUNED_COPY, False) else "the original model")
    # where calls go to the model itself, the graph's lossy steps do not run either
    said = "not applied (calls go to the model without it)" if cm.runs == "eager" else "lossy (asked for)"
    report.notes.extend(f"{said}: {what}" for what in plan.graph_lossy)
    return cm


def _dense_fallback(model, example_inputs, example, backend: str, report: CompileReport, plan: _Plan, pruned: list[str],
                    err: float, allowed: float, **options) -> CompiledModel:
    """compile()'s answer when the compiled model disagreed with its reference (error `err`): the
    same model compiled again with every layer dense, checked, with a report that says why.
    Sparsification (`pruned`) already happened on `model`: it is what was asked, and stays; the
    graph's lossy steps (`plan.graph_lossy`) do not run in the fallback."""
    from sparsecomp.ir import compare_outputs, run_graph

    fallback = compile(model, example_inputs, backend, pipeline="analyze-weights", verify=False, **options)
    fallback.report.rows = [dict(r, decision="dense", kernel="aten.linear" if backend == "torch" else "dense",
                                 reason=f"fallback: compiled model disagreed with the reference (error {err:.3g} > {allowed:.3g})")
                            for r in report.rows]
    fallback.report.pipeline = _Plan(plan.sparsify, "analyze-weights", []).text  # what it runs
    if fallback.runs == "compiled":  # a dense lowered graph (e.g. onnxruntime's) measured faster: checked too
        ok, err2, allowed2 = compare_outputs(run_graph(fallback, example), run_graph(model, example))
        fallback.report.verify = {"ok": ok, "max_abs_error": err2, "allowed": allowed2, "reference": "eager"}
        if not ok:
            fallback = CompiledModel(fallback.gm, fallback.report, backend, eager=model)
            fallback.report.end_to_end = {"runs": "eager", "why": "the dense lowered graph disagreed with eager too"}
            fallback.report.notes.append(f"the dense lowered graph disagreed with eager too (error {err2:.3g}): "
                                         "calls go to the model itself")
    if fallback.runs == "eager":  # the model itself: nothing to compare
        fallback.report.verify = {"ok": True, "max_abs_error": 0.0, "allowed": allowed,
                                  "reference": "eager (the fallback runs the model itself)"}
    fallback.report.notes.extend(f"lossy (asked for): {what}" for what in pruned)
    fallback.report.notes.extend(f"not applied (the fallback runs the model without it): {what}" for what in plan.graph_lossy)
    fallback.report.notes.append("verification failed with sparse kernels; every layer fell back to dense")
    return fallback


def _backend(name: str):
    """The backend package for `name` (imported on first use: `import sparsecomp` stays light)."""
    import importlib

    return importlib.import_module(f"sparsecomp.backends.{name}")


def _check_calibration(calibration, label: str, *, empty_ok: bool = False) -> list:
    """Calibration batches as a list (each a tuple of args or a dict of kwargs), or a clear error."""
    try:
        batches = list(calibration)
    except TypeError:
        raise SparsecompError(f"calibration for {label} must be an iterable of input batches, got {type(calibration).__name__}",
                              hint="pass a list of example-input tuples (or dicts of keyword inputs)") from None
    if not batches and not empty_ok:
        raise SparsecompError(f"calibration for {label} is empty", hint="pass at least one input batch")
    for i, batch in enumerate(batches):
        try:
            normalize_inputs(batch)
        except TypeError as err:
            raise SparsecompError(f"calibration batch {i} for {label} is not an input batch ({err})",
                                  hint="each batch is a tuple of the model's inputs (or a dict of keyword inputs), like example_inputs") from None
    return batches


PRUNED_COPY = "_sparsecomp_pruned_copy"  # set on compile(sparsify=...)'s pruned copy of the model


def _apply_sparsify(model, spec, batches: list | None, label: str, example_inputs=None):
    """One-shot sparsification for `compile(sparsify=spec)`: returns (a pruned copy of model, what was done).

    The user's model is never modified. `spec` is `METHOD:SPEC` (e.g. `"sparsegpt:2:4"`) or a
    `SparsifyConfig`; every method calibrates on `batches` when given (magnitude to measure its
    output error); magnitude without them captures on `example_inputs`, so it prunes the weights
    the `sparsify-magnitude` pass in the report's pipeline prunes (`x @ W` included).
    """
    import copy

    from sparsecomp.passes.sparsify import parse_sparsify_spec
    from sparsecomp.passes.sparsify.engine import sparsify_module

    cfg = parse_sparsify_spec(spec)
    if cfg.needs_calibration and not batches:
        raise SparsecompError(f"compile(sparsify='{cfg}') needs calibration data for {label}",
                              hint="pass calibration=[batch, ...] to compile (or use the magnitude method)")
    pruned = copy.deepcopy(model)
    with progress_bar(f"sparsifying {label}") as update:
        result = sparsify_module(pruned, cfg, batches or None, label=label, progress=update, example=example_inputs)
    setattr(pruned, PRUNED_COPY, True)  # (a fallback compile of this copy says what its calls go to)
    errors = [(r.error, r.name) for r in result.pruned if r.error is not None]
    what = (f"sparsify {cfg.describe()}: {len(result.pruned)} layers pruned to {result.sparsity:.1%} zeros"
            + (f", {len(result.skipped)} left dense" if result.skipped else "")
            + (f"; layer output error mean {sum(e for e, _ in errors) / len(errors):.4f}, max {max(errors)[0]:.4f} ({max(errors)[1]})"
               if errors else ""))
    return pruned, what


class _Plan:
    """What `compile` runs, from its pipeline / sparsify= / activation_sparsity= arguments.

    `sparsify`: the one-shot sparsifications applied, in order, to a copy of the model before capture
    (the sparsify= spec, or the sparsify passes a pipeline starts with: the report's pipeline text
    names them as those passes, so it is an exact repro); `graph`: the pass pipeline over the
    captured graph; `graph_lossy`: descriptions of its lossy steps (then verify's reference is the
    rewritten graph on the reference ops, DESIGN.md section 2).
    """

    def __init__(self, sparsify: list, graph, graph_lossy: list[str]):
        from sparsecomp.passes.sparsify import pass_text

        self.sparsify, self.graph, self.graph_lossy = sparsify, graph, graph_lossy
        self.text = ",".join([*(pass_text(cfg) for cfg in sparsify), str(graph)])


def _plan(pipeline: str | None, sparsify, activation_sparsity) -> _Plan:
    from sparsecomp.errors import PipelineError
    from sparsecomp.passes.sparsify import config_from_pass, parse_sparsify_spec
    from sparsecomp.pipeline import Pipeline, parse_pipeline
    from sparsecomp.registry import PassKind

    if pipeline is not None and activation_sparsity is not None:
        raise SparsecompError("compile() got both pipeline= and activation_sparsity=; give one",
                              hint='activation_sparsity= adds find-mlps,sparse-mlp{mode=...} to the default pipeline; in '
                                   'a pipeline of your own, name them, e.g. \'analyze-weights,find-mlps,sparse-mlp{mode="exact"},sparse-linear\'')
    configs = [parse_sparsify_spec(sparsify)] if sparsify is not None else []
    if pipeline is None:
        # MLP regions are fused first, so their up/down Linears are not also taken by sparse-linear.
        parsed = parse_pipeline(",".join(["analyze-weights", *_activation_passes(activation_sparsity), "sparse-linear"]))
    else:
        parsed = parse_pipeline(pipeline)
    graph = []
    for entry in parsed:
        if entry.info.kind is not PassKind.SPARSIFY:
            graph.append(entry)
            continue
        # compile prunes (a copy of) the model itself before capture, so the verify reference and the
        # fallback (the original model) carry the pruning; a sparsify pass among graph passes cannot.
        if graph:
            raise PipelineError(f"in compile's pipeline '{parsed}', sparsify pass '{entry.name}' comes after '{graph[-1].name}'",
                                hint="compile runs sparsify passes on the model before capture: put them first")
        if sparsify is not None:
            raise PipelineError(f"compile() got sparsify={sparsify!r} and sparsify pass '{entry.name}' in its pipeline",
                                hint="give the sparsification once")
        configs.append(config_from_pass(entry.name, entry.options))
    if not graph:
        raise PipelineError(f"compile's pipeline '{parsed}' has only sparsify passes",
                            hint='follow them with the graph passes, e.g. ",analyze-weights,sparse-linear"')
    lossy = [what for entry in graph if (what := _lossy_step(entry))]
    return _Plan(configs, Pipeline(tuple(graph)), lossy)


def _activation_passes(activation_sparsity) -> list[str]:
    """The passes `compile(activation_sparsity=...)` appends: `"exact"` (lossless: ReLU-family zeros),
    `"threshold:S"` / `"predictor:S"` (lossy, calibrated on `calibration=` to skip the fraction S of
    hidden neurons; see `passes/rewrite/sparse_mlp.py`)."""
    if activation_sparsity is None:
        return []
    from sparsecomp.passes.rewrite.sparse_mlp import parse_activation_sparsity

    mode, target = parse_activation_sparsity(activation_sparsity)
    if mode == "exact":
        return ["find-mlps", 'sparse-mlp{mode="exact"}']
    return ["find-mlps", f'sparse-mlp{{mode="{mode}",sparsity={target:g}}}']


def _lossy_step(entry) -> str | None:
    """What a lossy graph pass entry changes in the model's function, for the report (None: a
    lossless entry, or a sparsify pass: those compile applies to the model itself, `_Plan`)."""
    from sparsecomp.registry import PassKind

    if not entry.lossy or entry.info.kind is PassKind.SPARSIFY:
        return None
    if entry.name != "sparse-mlp":
        return f"{entry} (a lossy pass)"
    mode, target = entry.options["mode"], entry.options["sparsity"]
    return (f"activation sparsity {mode}:{target:g} (MLP hidden neurons below a per-layer threshold calibrated to "
            f"{target:.0%} sparsity are skipped{'; a low-rank predictor picks them before the up-projection' if mode == 'predictor' else ''}; "
            "per-layer MLP output cosine to dense on the calibration data is in each sparse-mlp row)")


def _report_rows(ctx: PassContext, decisions: list) -> list[dict]:
    """One row per candidate layer call: the rewrite's verdict joined with the backend's decision.

    A layer called more than once (or a weight two layers share) is one site per call, in graph
    order in both lists: the k-th call of a name joins its k-th decision and is labelled `name#k`.
    """
    from collections import defaultdict, deque

    from sparsecomp.report import describe_pattern

    stats = {s.name: s for s in ctx.results.get("analyze-weights", [])}
    by_layer: dict[str, deque] = defaultdict(deque)
    for d in decisions:
        by_layer[d.layer].append(d)
    rows = []
    for name_, _rewritten, why in ctx.results.get("sparse-linear", []):
        st = stats.get(name_)
        row = {"layer": name_, "shape": st.shape if st else None, "density": st.density if st else None,
               "pattern": describe_pattern(st)}
        d = by_layer[name_].popleft() if by_layer[name_] else None
        if d is None:
            row.update(decision="dense", kernel="aten.convolution" if st and st.op == "conv" else "aten.linear",
                       reason=f"not rewritten: {why}")
        else:  # (without analyze-weights in the pipeline, the shape and density the backend measured)
            row.update({k: v for k, v in d.to_dict().items() if k not in ("layer", "shape", "density") or row.get(k) is None})
            if not _rewritten:  # a dense layer a backend still lowered (e.g. the torch backend's one-row GEMV)
                row["reason"] = f"not rewritten: {why}; {d.reason}"
        rows.append(row)
    rows.extend(d.to_dict() for queue in by_layer.values() for d in queue)  # decisions of other rewrites (e.g. sparse-mlp)
    seen: dict[str, int] = defaultdict(int)
    for row in rows:
        seen[row["layer"]] += 1
        if seen[row["layer"]] > 1:
            row["layer"] = f"{row['layer']}#{seen[row['layer']]}"
    return rows


# A lowered graph with TIR kernels on TVM's own pool (`backends/tir/_pool.py`: only where they
# cannot run on torch's OpenMP threads) runs torch's own ops on one thread unless torch's threads
# measure this much faster end to end. TVM's workers spin (sched_yield) between kernels on the
# same cores torch's OpenMP workers need: profiled on bert-base at 90% (torch's 2 threads), an add
# took 594 us instead of 99, a GELU 1.22 ms instead of 0.33, a layer norm 485 us instead of 50,
# and the whole forward measured anywhere from 83 to 160 ms between compiles and runs, where one
# thread gave 80-85 ms every time. With the margin on the other side (one thread had to win by
# 3%), a noisy measurement kept torch's threads for bert-base at 70%, which then ran at 0.88x of
# eager. A model whose torch ops are heavy (GEMMs of layers left dense over many rows) still gets
# torch's threads: those run nearly twice as fast on two. With the kernels on torch's OpenMP
# threads there is no second pool, and the choice is the plain one below: on bert-base at 70%,
# 61.8 ms on torch's 2 threads against 67.5 ms on 1, which the 10% margin had turned into 1.
MULTI_THREAD_MARGIN = 1.10
SINGLE_THREAD_MARGIN = 1.03  # otherwise (torch CSR only, or the kernels on torch's threads): one thread must win by 3%


def _tir_pool() -> str:
    """Where the torch backend's TIR kernels run ("openmp", "tvm", "none": `backends/tir/_pool.py`)."""
    from sparsecomp.backends.torch.kernels import pool_tag

    return pool_tag()


def _choose_end_to_end(model, gm: torch.nn.Module, report: CompileReport, backend: str, example,
                       eager_name: str = "the original model") -> CompiledModel:
    """Run the lowered graph only if it is measured faster end to end than the original model
    (`eager_name`: what the report calls it; after sparsify=, the pruned copy)."""
    from sparsecomp.timing import compare

    # torch: an all-dense lowered graph only adds call overhead. ORT: its dense path (MLAS) is often
    # faster than eager torch, so it is measured like any lowered model.
    if backend == "torch" and not any(r["decision"] == "sparse" or r.get("kernel") == TIR_GEMV for r in report.rows):
        report.end_to_end = {"runs": "eager", "why": "no layer runs sparse or on a TIR kernel; the captured graph would only add call overhead"}
        report.notes.append(f"no layer runs sparse or on a TIR kernel: calls go to {eager_name}")
        return CompiledModel(gm, report, backend, eager=model)
    args, kwargs = example
    compiled = CompiledModel(gm, report, backend)  # timed as it will be called
    cands = {"eager": lambda: model(*args, **kwargs), "compiled": lambda: compiled(*args, **kwargs)}
    single = None
    if backend == "torch" and torch.get_num_threads() > 1:
        # torch's ops between TIR kernels on one thread: where the kernels run on TVM's own pool,
        # its workers and torch's then do not take turns on the same cores (opt-125m-like at one
        # token, all Linears on TIR kernels: 17.6 instead of 27.1 ms on TVM's pool).
        # Where torch still does heavy work (GEMMs over many rows, torch sparse kernels), the
        # measurement keeps its threads.
        single = CompiledModel(gm, report, backend, torch_threads=1)
        cands["compiled, torch ops on 1 thread"] = lambda: single(*args, **kwargs)
    with torch.no_grad():
        t = compare(cands, min_runs=20, max_seconds=5.0)
    eager_ms, compiled_ms = t["eager"].median * 1e3, t["compiled"].median * 1e3
    threads = None
    if single is not None:
        single_ms = t["compiled, torch ops on 1 thread"].median * 1e3
        # TIR kernels whose workers will spin beside torch's (see MULTI_THREAD_MARGIN)
        tvm_pool = any(str(r.get("kernel") or "").startswith("tir") for r in report.rows) and _tir_pool() == "tvm"
        if (compiled_ms * MULTI_THREAD_MARGIN >= single_ms) if tvm_pool else (single_ms * SINGLE_THREAD_MARGIN < compiled_ms):
            compiled_ms, threads = single_ms, 1
    report.end_to_end = {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "runs": "compiled" if compiled_ms < eager_ms else "eager"}
    if single is not None:
        report.end_to_end["torch_threads"] = threads
        if args and isinstance(args[0], torch.Tensor):
            report.end_to_end["torch_threads_max_numel"] = args[0].numel()
        report.end_to_end["compiled_torch_threads_ms"] = {str(torch.get_num_threads()): t["compiled"].median * 1e3,
                                                          "1": t["compiled, torch ops on 1 thread"].median * 1e3}
    if threads == 1 and compiled_ms < eager_ms:
        report.notes.append(f"torch's own ops run on 1 thread during a call (measured {t['compiled'].median * 1e3:.2f} ms with "
                            f"{torch.get_num_threads()}, {compiled_ms:.2f} ms with 1); the TIR kernels keep their threads")
    if compiled_ms >= eager_ms:
        report.notes.append(f"the compiled graph measured slower end to end ({compiled_ms:.2f} ms vs eager {eager_ms:.2f} ms "
                            f"on the example inputs): calls go to {eager_name}")
        return CompiledModel(gm, report, backend, eager=model)
    return CompiledModel(gm, report, backend)  # its thread choice and the call size it holds for, from the report


def sparsify(model, method: str = "magnitude", sparsity: float | None = None, pattern: str = "unstructured", calibration=None, *,
             skip=None, allocation: str | None = None, name: str | None = None, progress: bool = True,
             return_report: bool = False, **options):
    """One-shot sparsification of `model`'s Linear / matmul weights, in place; returns the model.

    `method`: magnitude | wanda | sparsegpt, or a whole spec `"sparsegpt:2:4"` (then `pattern` and
    `sparsity` are not given) or a `SparsifyConfig`. `pattern`: `unstructured`, `N:M` (`2:4`,
    `4:8`), `block:RxC`, or a full spec with its sparsity (`unstructured:0.5`, `block:16x1:0.9`);
    `sparsity` in [0, 1) (default 0.5) completes a pattern given without one. `calibration`: a list
    of input batches (like example inputs), needed by wanda, sparsegpt and the owl / sensitivity
    allocations. `skip`: layer-name globs left dense (default `DEFAULT_SKIP`: output heads; a list
    given replaces it). `allocation`: uniform (default) | owl | sensitivity (global budget exact).
    `options`: SparseGPT's `damp`, `blocksize`, `correct`, `update_bias`, `refine`; OWL's `owl_m`,
    `owl_lambda` (see `sparsecomp.passes.sparsify.SparsifyConfig`).

    The weights are written only when every layer is done (an error or Ctrl-C leaves the model
    as it was); the module keeps its type, so `model.state_dict()` is the pruned checkpoint.
    `return_report=True` returns `(model, SparsifyResult)` (per-layer sparsity, error, reasons).
    """
    from sparsecomp.passes.sparsify import SparsifyConfig, parse_sparsify_spec, resolve_pattern
    from sparsecomp.passes.sparsify.engine import sparsify_module

    label = name or type(model).__name__
    fields = dict(options)
    if allocation is not None:
        fields["allocation"] = allocation
    if skip is not None:
        fields["skip"] = skip  # SparsifyConfig checks it (a glob or a list of globs)
    whole = isinstance(method, SparsifyConfig) or (isinstance(method, str) and ":" in method)
    if whole and (sparsity is not None or pattern != "unstructured"):
        raise SparsecompError(f"sparsify({method!s}) already names its pattern; drop pattern= / sparsity=",
                              hint="either sparsify(model, 'sparsegpt:2:4', ...) or sparsify(model, 'sparsegpt', pattern='2:4', ...)")
    try:
        cfg = (parse_sparsify_spec(method, **fields) if whole
               else SparsifyConfig(method=method, pattern=resolve_pattern(pattern, sparsity), **fields))
    except TypeError as err:  # an unknown option name
        raise SparsecompError(f"sparsify: {err}", hint="options: damp, blocksize, correct, update_bias, refine, owl_m, owl_lambda") from None
    if progress is False:
        result = sparsify_module(model, cfg, calibration, label=label)
    else:
        with progress_bar(f"sparsifying {label}") as update:  # shown only when stderr is a terminal
            result = sparsify_module(model, cfg, calibration, label=label, progress=update)
    return (model, result) if return_report else model


def export_onnx(model_or_compiled, example_inputs, path, *, opset: int | None = None, dynamic_axes: Any = "auto",
                **compile_options) -> dict:
    """Write `model_or_compiled` as one standard-ONNX model for stock onnxruntime; returns
    `{"path", "bytes", "external_data", "opset", "notes"}`.

    Given an `nn.Module`, first runs exactly what `compile(model, example_inputs, backend="ort",
    **compile_options)` runs (pipeline, per-layer lowering timed in onnxruntime, verification), so
    this call alone is the deployment path. Given a `CompiledModel` from `backend="ort"`, writes
    its model without compiling again. `opset` (default 20, minimum `MIN_OPSET` = 16; an opset torch's
    exporter cannot write for this model is an error too) and
    `dynamic_axes` (`"auto"`: the batch / sequence dims capture kept dynamic; `None`: static
    shapes; or `{input name: [dims]}`) other than the defaults re-export from the same per-layer
    decisions, checked against the compiled model on the example inputs. The file carries metadata
    (sparsecomp version, pipeline, per-layer decisions and storage), passes the full
    `onnx.checker`, and moves its weights to `<path>.data` when they pass the protobuf limit.
    A missing or read-only directory, or a too-old opset, is an error before any work is done.

    The file always holds the lowered graph, with every lossy step asked for; where the compiled
    model's own calls go to the model uncompiled (measured faster in this process), its lossy
    activation sparsity does not run in those calls, but it does in the file: `notes` says so.
    """
    import json

    from sparsecomp.backends.ort import files
    from sparsecomp.backends.ort.export import check_opset, set_metadata
    from sparsecomp.errors import OnnxError

    target = files.check_writable(path)
    if opset is not None:
        check_opset(opset)
    if isinstance(model_or_compiled, CompiledModel):
        cm = model_or_compiled
        if cm.backend != "ort" or not hasattr(cm.gm, "onnx_model"):
            raise OnnxError(f"{cm.report.model} was compiled for backend '{cm.backend}', which has no ONNX model",
                            hint="pass the nn.Module itself, or compile it with backend='ort'")
    elif isinstance(model_or_compiled, torch.nn.Module):
        if "backend" in compile_options:
            raise OnnxError(f"export_onnx compiles for backend 'ort', got backend={compile_options['backend']!r}",
                            hint="leave backend= out (the other compile options are passed on)")
        cm = compile(model_or_compiled, example_inputs, backend="ort", **compile_options)
    else:
        raise OnnxError(f"export_onnx expects an nn.Module or a CompiledModel, got {type(model_or_compiled).__name__}")
    module = cm.gm
    if opset is None and dynamic_axes == "auto":
        proto = module.onnx_model
    else:
        proto = module.to_onnx(opset=opset, dynamic_axes=dynamic_axes)
        if example_inputs is not None:  # a new export: check it against the compiled model
            from sparsecomp.backends.ort.runner import session
            from sparsecomp.ir import compare_outputs, normalize_inputs

            args, kwargs = normalize_inputs(example_inputs)
            feeds = module.feeds(args, kwargs)
            try:
                out = [torch.from_numpy(o) for o in session(proto).run(None, {i.name: feeds[i.name] for i in proto.graph.input})]
            except Exception as err:  # noqa: BLE001 - e.g. static shapes of the compile's example, fed other sizes
                first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
                raise OnnxError(f"the re-export of {cm.report.model} does not run on these example inputs: {first}",
                                hint="a re-export with dynamic_axes=None fixes the shapes of the inputs the model was "
                                     "compiled with: pass those as example_inputs (or None to skip the check)") from None
            ref = _flat_outputs(module, args, kwargs)
            ok, err, allowed = compare_outputs(out, ref)
            if not ok:
                raise OnnxError(f"the re-export at opset {opset} disagrees with the compiled model (error {err:.3g} > {allowed:.3g})",
                                hint="export with the default opset / dynamic_axes")
    set_metadata(proto, {"sparsecomp.pipeline": cm.report.pipeline,
                         "sparsecomp.decisions": json.dumps(cm.report.rows, default=str)})
    info = files.save(proto, target)
    info["opset"] = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    info["notes"] = []
    if cm.runs == "eager":
        from sparsecomp.pipeline import parse_pipeline

        info["notes"] += [f"the file applies {what} (asked for); the compiled model's own calls go to the model without it"
                          for what in filter(None, map(_lossy_step, parse_pipeline(cm.report.pipeline)))]
    return info


def _flat_outputs(module, args, kwargs) -> list:
    """A module's outputs on (args, kwargs) as a flat list of tensors."""
    from torch.utils._pytree import tree_leaves

    with torch.no_grad():
        return [t for t in tree_leaves(module(*args, **kwargs)) if isinstance(t, torch.Tensor)]


def set_num_threads(n: int | None = None) -> int:
    """One thread setting for torch, TVM and ONNX Runtime; default SPARSECOMP_NUM_THREADS.

    ONNX Runtime sessions that sparsecomp opens afterwards take it as their pool size
    (`sparsecomp.backends.ort.use_global_thread_pool()` shares one pool across the process)."""
    from sparsecomp.threads import check_count, env_threads

    if n is None:
        n = env_threads() or torch.get_num_threads()
    n = check_count(n)
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)  # read by TVM's runtime when it loads
    os.environ["SPARSECOMP_NUM_THREADS"] = str(n)  # read by the ort backend's shared session pool
    from sparsecomp.backends.tir import set_pool_threads  # (TVM itself is not imported here)

    set_pool_threads(n)  # TIR kernels run on torch's OpenMP threads where they can (`_pool`)
    return n
