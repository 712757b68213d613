"""The pass manager and its instruments (the base of the debugging CLI).

`PassManager(pipeline, instruments).run(gm, ctx)` runs each pipeline entry in order. Around every
pass it:
- tags the nodes the pass created with provenance (`node.meta["sparsecomp.provenance"] =
  {"pass": name, "rule": rule}`; a pass names the rule by setting `node.meta["sparsecomp.rule"]`
  on what it creates, else the rule is the pass name);
- records a `PassRecord` (wall time, whether the printed IR changed, the pass's statistics);
- calls the instruments: print before/after, after all, after change only (`PrintIR`), dump every
  stage to `DIR/NNN_<pass>.txt` whose header is a repro (`DumpIR`), per-pass timing (`Timing`),
  and verification after each pass (`VerifyEach`: outputs still match the reference on the
  example inputs; every pass that changed the graph is linted).

Mirrors MLIR's pass instrumentation (`--print-ir-after-all`, `--mlir-timing`) and TVM's
`tvm.ir.instrument`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch.fx as fx

from sparsecomp.errors import SparsecompError, VerificationError
from sparsecomp.ir import PROVENANCE, compare_outputs, fingerprint, format_graph, normalize_inputs, run_graph
from sparsecomp.pipeline import Pipeline, PipelineEntry, parse_pipeline
from sparsecomp.registry import PassInfo, PassResult

__all__ = [
    "PassContext",
    "PassRecord",
    "PassManager",
    "Instrument",
    "PrintIR",
    "DumpIR",
    "Timing",
    "VerifyEach",
]


@dataclass
class PassContext:
    """What passes may read besides the graph, and where analyses leave their results.

    `example_inputs` and every calibration batch are `(args, kwargs)` pairs (see
    `sparsecomp.ir.normalize_inputs`). `results[pass_name]` holds each analysis's summary.
    `reference` computes the outputs verification compares against (default: eager model).
    """

    example_inputs: tuple[tuple, dict] = ((), {})
    calibration: list[tuple[tuple, dict]] = field(default_factory=list)
    model_name: str = "model"
    repro: str = ""  # command line that reproduces this run (dump headers)
    results: dict[str, Any] = field(default_factory=dict)
    reference_outputs: Any = None

    @classmethod
    def create(cls, example_inputs=None, calibration=None, **kw) -> "PassContext":
        ex = normalize_inputs(example_inputs) if example_inputs is not None else ((), {})
        cal = [normalize_inputs(b) for b in (calibration or [])]
        return cls(example_inputs=ex, calibration=cal, **kw)


@dataclass
class PassRecord:
    index: int
    entry: PipelineEntry
    seconds: float
    changed: bool
    stats: dict[str, int]
    created: int  # nodes the pass created


class Instrument:
    """Hooks around passes; override what you need."""

    def before_pipeline(self, pm: "PassManager", gm: fx.GraphModule, ctx: PassContext) -> None: ...
    def before_pass(self, pm: "PassManager", index: int, entry: PipelineEntry, gm: fx.GraphModule, ctx: PassContext) -> None: ...
    def after_pass(self, pm: "PassManager", record: PassRecord, gm: fx.GraphModule, ctx: PassContext) -> None: ...
    def after_pipeline(self, pm: "PassManager", gm: fx.GraphModule, ctx: PassContext) -> None: ...


class PrintIR(Instrument):
    """Print the IR before/after chosen passes, after all, or after those that changed it."""

    def __init__(self, *, before: tuple[str, ...] = (), after: tuple[str, ...] = (), after_all: bool = False,
                 after_change: bool = False, stream: TextIO | None = None):
        self.before, self.after = set(before), set(after)
        self.after_all, self.after_change = after_all, after_change
        self.stream = stream

    def _print(self, title: str, gm: fx.GraphModule) -> None:
        out = self.stream or sys.stdout
        out.write(f"// ----- IR {title} -----\n{format_graph(gm)}\n\n")

    def before_pass(self, pm, index, entry, gm, ctx):
        if entry.name in self.before:
            self._print(f"before {entry} ({index + 1}/{len(pm.pipeline)})", gm)

    def after_pass(self, pm, record, gm, ctx):
        e = record.entry
        if self.after_all or e.name in self.after or (self.after_change and record.changed):
            self._print(f"after {e} ({record.index + 1}/{len(pm.pipeline)})" + ("" if record.changed else " [unchanged]"), gm)


class DumpIR(Instrument):
    """Write `DIR/000_input.txt` and `DIR/NNN_<pass>.txt` after each pass, each headed by a repro
    (the `NNN_*.txt` files of an earlier run in DIR are removed first)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    def _write(self, name: str, pm: "PassManager", gm: fx.GraphModule, ctx: PassContext, note: str) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        header = [f"// pipeline: {pm.pipeline}", f"// model: {ctx.model_name}", f"// stage: {note}"]
        if ctx.repro:
            header.append(f"// repro: {ctx.repro}")
        (self.dir / name).write_text("\n".join(header) + "\n" + format_graph(gm) + "\n")

    def before_pipeline(self, pm, gm, ctx):
        # stages of an earlier run in the same directory would read as this run's: removed
        for stale in self.dir.glob("[0-9][0-9][0-9]_*.txt") if self.dir.is_dir() else ():
            stale.unlink()
        self._write("000_input.txt", pm, gm, ctx, "input (before any pass)")

    def after_pass(self, pm, record, gm, ctx):
        self._write(f"{record.index + 1:03d}_{record.entry.name}.txt", pm, gm, ctx,
                    f"after {record.entry} ({record.index + 1}/{len(pm.pipeline)})")


class Timing(Instrument):
    """Collect per-pass wall time and statistics; `table()` renders them."""

    def __init__(self):
        self.records: list[PassRecord] = []

    def after_pass(self, pm, record, gm, ctx):
        self.records.append(record)

    def table(self):
        from rich.table import Table

        t = Table(title="pass timing")
        for col in ("#", "pass", "time (ms)", "changed", "created", "statistics"):
            t.add_column(col, justify="right" if col in ("#", "time (ms)", "created") else "left")
        total = 0.0
        for r in self.records:
            total += r.seconds
            stats = ", ".join(f"{k}={v}" for k, v in r.stats.items())
            t.add_row(str(r.index + 1), str(r.entry), f"{r.seconds * 1e3:.1f}", "yes" if r.changed else "no", str(r.created), stats)
        t.add_row("", "total", f"{total * 1e3:.1f}", "", "", "")
        return t


class VerifyEach(Instrument):
    """After each pass: outputs on the example inputs vs the reference (the graph itself is linted
    by the pass manager after every pass that changed it, instruments or not).

    The reference is `ctx.reference_outputs` (computed once before the pipeline from the input
    graph when not given). After a lossy pass (a sparsify pass, a lossy mode of a rewrite:
    `PipelineEntry.lossy`), which changes the function as asked, its outputs become the reference
    for the passes after it (DESIGN.md section 2), and `accepted` lists it. Raises
    `VerificationError` naming the pass and the pipeline.
    """

    def __init__(self, rtol: float = 1e-4):
        self.rtol = rtol
        self.accepted: list[str] = []  # lossy entries whose outputs became the reference

    def before_pipeline(self, pm, gm, ctx):
        if ctx.reference_outputs is None:
            ctx.reference_outputs = run_graph(gm, ctx.example_inputs)

    def after_pass(self, pm, record, gm, ctx):
        where = f"after pass '{record.entry}' ({record.index + 1}/{len(pm.pipeline)}) of pipeline '{pm.pipeline}'"
        out = run_graph(gm, ctx.example_inputs)
        if record.entry.lossy:
            ctx.reference_outputs = out
            self.accepted.append(str(record.entry))
            return
        ok, err, allowed = compare_outputs(out, ctx.reference_outputs, rtol=self.rtol)
        if not ok:
            raise VerificationError(
                f"outputs no longer match the reference {where}: max abs error {err:.3g} > allowed {allowed:.3g}",
                hint="rerun with --print-ir-after-change to see what the pass did",
            )


class PassManager:
    """Runs a pipeline over a GraphModule with instruments."""

    def __init__(self, pipeline: str | Pipeline, instruments: list[Instrument] | tuple = ()):
        self.pipeline = parse_pipeline(pipeline) if isinstance(pipeline, str) else pipeline.validate()
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> fx.GraphModule:
        ctx = ctx or PassContext()
        for ins in self.instruments:
            ins.before_pipeline(self, gm, ctx)
        for index, entry in enumerate(self.pipeline):
            for ins in self.instruments:
                ins.before_pass(self, index, entry, gm, ctx)
            record = self._run_one(index, entry, gm, ctx)
            self.records.append(record)
            for ins in self.instruments:
                ins.after_pass(self, record, gm, ctx)
        for ins in self.instruments:
            ins.after_pipeline(self, gm, ctx)
        return gm

    def _run_one(self, index: int, entry: PipelineEntry, gm: fx.GraphModule, ctx: PassContext) -> PassRecord:
        info: PassInfo = entry.info
        options = entry.options
        before_nodes = set(gm.graph.nodes)
        before_fp = fingerprint(gm)
        start = time.perf_counter()
        try:
            result = info.fn(gm, ctx, **options)
        except SparsecompError as err:
            raise type(err)(f"pass '{entry}' failed: {err.message}", hint=err.hint) from err
        seconds = time.perf_counter() - start
        if not isinstance(result, PassResult):
            result = PassResult(modified=bool(result))
        created = [n for n in gm.graph.nodes if n not in before_nodes]
        for node in created:
            rule = node.meta.pop("sparsecomp.rule", info.name)
            node.meta.setdefault(PROVENANCE, {"pass": info.name, "rule": rule})
        changed = fingerprint(gm) != before_fp
        # A pass may edit nodes in place (a new target, an erased node) and say nothing: the printed
        # IR then changed while the module's generated code did not, so it is recompiled whenever
        # either says so (else a verify would run the old code).
        if result.modified or created or changed:
            try:
                gm.graph.lint()
            except Exception as err:  # noqa: BLE001 - lint raises RuntimeError with the node at fault
                where = f"after pass '{entry}' ({index + 1}/{len(self.pipeline)}) of pipeline '{self.pipeline}'"
                raise VerificationError(f"graph lint failed {where}: {str(err).splitlines()[0]}",
                                        hint="the pass left an invalid graph; rerun with --print-ir-after "
                                             f"{entry.name} to see it") from None
            gm.recompile()
        return PassRecord(index, entry, seconds, changed, dict(result.stats), len(created))
