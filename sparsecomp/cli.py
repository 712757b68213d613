"""The `sparsecomp` command line (typer + rich), mirroring `mlir-opt` for pass debugging.

    sparsecomp analyze MODEL [--calib N] [--json]
    sparsecomp opt MODEL --pipeline P [--print-ir-after-all] [--print-ir-after PASS]
                   [--print-ir-after-change] [--print-ir-before PASS] [--dump-dir D]
                   [--verify-each] [--timing]
    sparsecomp passes [NAME]
    sparsecomp demo

MODEL is `zoo:NAME`, `path/file.py:factory` or `file.onnx`; every command taking MODEL also takes
`--impose SPEC [--layers GLOB]` and `--weights FILE.pt`. Errors are one line plus a hint and a
non-zero exit; `--debug` (anywhere on the line) shows the trace instead.
"""

from __future__ import annotations

import shlex
import sys
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from sparsecomp.errors import NotYetAvailableError, SparsecompError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="sparsecomp: a sparsity-aware compiler for PyTorch models. Errors are one line plus a hint; add --debug anywhere for the trace.")
out = Console(soft_wrap=False, width=220)
err = Console(stderr=True, soft_wrap=True)

ModelArg = typer.Argument(..., metavar="MODEL", help="zoo:NAME | path/file.py:factory | file.onnx")
ImposeOpt = typer.Option(None, "--impose", metavar="SPEC", help="impose a weight pattern first: unstructured:S | block:RxC:S | N:M")
LayersOpt = typer.Option(None, "--layers", metavar="GLOB", help="only layers whose qualified name matches (with --impose)")
WeightsOpt = typer.Option(None, "--weights", metavar="FILE.pt", help="load a state dict first (e.g. from `sparsify`)")


def _load(model: str, impose, layers, weights):
    from sparsecomp.loader import load_model

    with err.status(f"loading {model}"):
        return load_model(model, impose=impose, layers=layers, weights=weights)


@app.command()
def analyze(
    model: str = ModelArg,
    calib: int = typer.Option(0, "--calib", metavar="N", help="profile activations on N calibration batches"),
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
    calib: int = typer.Option(0, "--calib", metavar="N", help="N calibration batches (for profile-activations)"),
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
        get_pass(name)
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
    if verify_each:
        instruments.append(VerifyEach())
    repro = "sparsecomp " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["opt"] else ""
    if loaded.is_onnx:
        from sparsecomp import onnx_io

        with err.status(f"importing {loaded.name} into torch.fx (onnx2torch)"):
            gm = onnx_io.import_onnx(loaded.onnx)
        example = loaded.example_inputs
    else:
        gm, example = loaded.model, loaded.example_inputs
    calibration = loaded.calibration(calib) if calib else None
    gm, ctx = api.run_pipeline(gm, example, str(parsed), calibration=calibration, instruments=instruments,
                               name=loaded.name, repro=repro)
    if timer:
        out.print(timer.table())
    if dump_dir:
        err.print(f"wrote {len(parsed) + 1} stages to {dump_dir}/")


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

    dense = _load(model, None, None, None)
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
    with err.status("compiling the sparse model (measuring kernels per layer)"):
        cm = sparsecomp.compile(sparse.model, sparse.example_inputs, backend="torch", name=dense.name)
    out.print(cm.report)  # ends with eager vs compiled end to end, measured on the example inputs


def _compile_loaded(loaded, backend: str, kernels: Optional[str], max_seconds: float):
    import sparsecomp

    if loaded.is_onnx:
        raise SparsecompError(f"compiling an ONNX file for backend '{backend}' is not supported yet",
                              hint="compile the torch model (zoo:NAME or file.py:factory)")
    return sparsecomp.compile(loaded.model, loaded.example_inputs, backend=backend, name=loaded.name,
                              kernels=kernels, max_seconds_per_layer=max_seconds)


@app.command("compile")
def compile_cmd(
    model: str = ModelArg,
    backend: str = typer.Option("torch", "--backend", "-b", help="torch | ort | tvm | triton | auto"),
    kernels: Optional[str] = typer.Option(None, "--kernels", metavar="LIST", help='restrict candidates, e.g. "dense,tir-sell"'),
    max_seconds: float = typer.Option(0.5, "--max-seconds", help="time budget to measure each layer's candidates"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Compile MODEL for a backend and print the per-layer report (decision, kernel, measured times)."""
    loaded = _load(model, impose, layers, weights)
    cm = _compile_loaded(loaded, backend, kernels, max_seconds)
    if json_out:
        print(cm.report.to_json())
    else:
        out.print(cm.report)


@app.command()
def bench(
    model: str = ModelArg,
    backend: str = typer.Option("torch", "--backend", "-b"),
    runs: int = typer.Option(20, "--runs", help="timed runs per variant (median reported), after warm-up"),
    kernels: Optional[str] = typer.Option(None, "--kernels", metavar="LIST"),
    json_out: bool = typer.Option(False, "--json"),
    impose: Optional[str] = ImposeOpt,
    layers: Optional[str] = LayersOpt,
    weights: Optional[str] = WeightsOpt,
):
    """Time eager vs compiled side by side (interleaved, medians), on the example inputs."""
    import json

    from sparsecomp.ir import normalize_inputs
    from sparsecomp.timing import compare

    loaded = _load(model, impose, layers, weights)
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


def _not_yet_command(name: str, issue: str, help_text: str):
    def command(args: List[str] = typer.Argument(None, hidden=True)):
        raise NotYetAvailableError(f"`sparsecomp {name}` is not yet available (arrives with issue {issue})",
                                   hint="available now: analyze, opt, passes, compile, bench, demo")

    command.__doc__ = f"{help_text} (not yet available: issue {issue})"
    app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(command)


_not_yet_command("sparsify", "#6", "Create sparsity (magnitude, Wanda, SparseGPT) and save the weights.")
_not_yet_command("tune", "#3", "Search kernel schedules for MODEL and fill the cache.")


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app, turning errors into one line + hint unless --debug is given."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        app(args=argv, prog_name="sparsecomp", standalone_mode=False)
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
    except Exception as e:  # click usage errors and anything unexpected
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return e.exit_code
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        err.print(Text.assemble(("error: ", "bold red"), f"internal error: {type(e).__name__}: {first}"))
        err.print(Text.assemble(("hint: ", "bold"), "rerun with --debug for the trace, and please report it"))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
