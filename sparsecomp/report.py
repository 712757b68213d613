"""`SparsityReport`: what analysis found, as a rich table and as JSON.

The JSON schema (`report.to_dict()`, version 1) is documented in the README ("Analysis report
schema"). The report holds the analysis results as plain objects with `to_dict()`; it does not
import the passes that made them (the core depends on nothing above it).
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

from sparsecomp.lowering import TIR_GEMV

__all__ = ["SparsityReport", "CompileReport", "describe_pattern", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1


def _measured(v) -> bool:
    """A measured time: a positive finite number (0 / None: not timed; NaN: dense left out)."""
    return isinstance(v, (int, float)) and v > 0 and math.isfinite(v)


def _finite(row: dict) -> dict:
    """A report row for JSON: NaN / inf (a time not measured) as null, so the output parses anywhere."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def _render(renderable, width: int = 220) -> str:
    """Plain text of a rich renderable (what `str(report)` prints)."""
    from rich.console import Console

    buf = io.StringIO()
    Console(width=width, file=buf, color_system=None).print(renderable)
    return buf.getvalue()


@dataclass
class SparsityReport:
    model: str
    source: str  # "fx" (captured torch model) | "onnx" (ONNX graph read directly)
    pipeline: str
    layers: list[Any] = field(default_factory=list)  # WeightStats
    mlps: list[Any] = field(default_factory=list)  # MLPRegion
    activations: list[Any] = field(default_factory=list)  # ActivationStats
    capture: dict | None = None
    notes: list[str] = field(default_factory=list)

    # --- queries -------------------------------------------------------------------------------
    def layer(self, name: str):
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer '{name}' in the report of {self.model}")

    @property
    def flagged(self) -> list[Any]:
        """Layers with NaN or Inf weights."""
        return [layer for layer in self.layers if layer.flags]

    # --- output --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        acts = {a.name: a.to_dict() for a in self.activations}
        layers = []
        for layer in self.layers:
            d = layer.to_dict()
            if layer.name in acts:
                d["activation"] = {k: v for k, v in acts[layer.name].items() if k != "name"}
            layers.append(d)
        total = sum(layer.numel for layer in self.layers)
        nonzero = sum(layer.density * layer.numel for layer in self.layers)
        return {
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "source": self.source,
            "pipeline": self.pipeline,
            "summary": {
                "layers": len(self.layers),
                "weights": total,
                "density": (nonzero / total) if total else 1.0,
                "mlps": len(self.mlps),
                "flagged": [layer.name for layer in self.flagged],
            },
            "layers": layers,
            "mlps": [m.to_dict() for m in self.mlps],
            "capture": self.capture,
            "notes": list(self.notes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False, default=str)

    def table(self):
        from rich.table import Table

        has_act = bool(self.activations)
        acts = {a.name: a for a in self.activations}
        t = Table(title=f"sparsity of {self.model} ({self.source})", title_justify="left")
        cols = ["layer", "op", "shape", "density", "zero rows/cols", "2:4", "4:8", "sparsest block", "best format", "MiB (dense → best)"]
        if has_act:
            cols.append("input zeros")
        cols.append("flags")
        for c in cols:
            t.add_column(c, justify="left" if c in ("layer", "op", "best format", "flags", "sparsest block") else "right")
        for layer in self.layers:
            occ = min(layer.block_occupancy.items(), key=lambda kv: kv[1]) if layer.block_occupancy else None
            fmt, nbytes = layer.best_format()
            row = [
                layer.name, layer.op, "x".join(map(str, layer.shape)), _pct(layer.density),
                f"{layer.zero_rows}/{layer.zero_cols}",
                f"{layer.nm_conformance.get('2:4', float('nan')):.2f}",
                f"{layer.nm_conformance.get('4:8', float('nan')):.2f}",
                f"{occ[0]}: {_pct(occ[1])}" if occ else "-", fmt,
                f"{_mib(layer.bytes['dense'])} → {_mib(nbytes)}",
            ]
            if has_act:
                a = acts.get(layer.name)
                row.append(_pct(a.zero_fraction) if a else "-")
            row.append(" ".join(layer.flags) or "")
            t.add_row(*row, style="red" if layer.flags else None)
        return t

    def mlp_table(self):
        from rich.table import Table

        t = Table(title="MLP regions", title_justify="left")
        for c in ("#", "pattern", "activation", "up", "gate", "down", "hidden", "exact zeros"):
            t.add_column(c)
        for m in self.mlps:
            t.add_row(str(m.index), m.pattern, m.activation, m.up, m.gate or "-", m.down, str(m.hidden), "yes" if m.exact_zeros else "no")
        return t

    def __rich_console__(self, console, options):
        yield self.table()
        if self.mlps:
            yield self.mlp_table()
        d = self.to_dict()["summary"]
        yield (f"{d['layers']} weights, {d['weights']:,} parameters, overall density {_pct(d['density'])}, "
               f"{d['mlps']} MLP regions" + (f", flagged: {', '.join(d['flagged'])}" if d["flagged"] else ""))
        for note in self.notes:
            yield f"note: {note}"

    def __str__(self) -> str:
        return _render(self)


def describe_pattern(stats: Any) -> str:
    """The pattern a weight shows, in the one spelling: dense | N:M | block:RxC | unstructured."""
    if stats is None:
        return "-"
    if stats.density >= 1.0:
        return "dense"
    for nm, conf in stats.nm_conformance.items():
        n, m = (int(v) for v in nm.split(":"))
        if conf == 1.0 and abs(stats.density - n / m) < 0.02:
            return nm
    # a block pattern: its blocks are (nearly) all-or-nothing, so occupancy ~ density
    best = None
    for shape, occ in stats.block_occupancy.items():
        r, c = (int(v) for v in shape.split("x"))
        if r * c > 1 and occ > 0 and stats.density / occ > 0.9 and (best is None or r * c > best[1]):
            best = (shape, r * c)
    if best:
        return f"block:{best[0]}"
    return "unstructured"


@dataclass
class CompileReport:
    """Per-layer table of a compile: pattern found, decision, kernel, measured times, reasons."""

    model: str
    backend: str
    pipeline: str
    rows: list[dict] = field(default_factory=list)
    verify: dict | None = None
    notes: list[str] = field(default_factory=list)
    cache: dict | None = None
    end_to_end: dict | None = None  # eager vs compiled on the example inputs, and which one runs

    def to_dict(self) -> dict:
        timed = [r for r in self.rows if _measured(r.get("dense_us")) and _measured(r.get("chosen_us"))]
        dense_us = sum(r["dense_us"] for r in timed)  # layers timed both ways only: a ratio of like with like
        chosen_us = sum(r["chosen_us"] for r in timed)
        return {"schema": SCHEMA_VERSION, "model": self.model, "backend": self.backend, "pipeline": self.pipeline,
                "summary": {"layers": len(self.rows), "sparse": sum(r["decision"] == "sparse" for r in self.rows),
                            "dense_on_tir_gemv": sum(r.get("kernel") == TIR_GEMV for r in self.rows),
                            "measured_dense_us": dense_us, "measured_chosen_us": chosen_us,
                            "layer_speedup": dense_us / chosen_us if chosen_us else None},
                "layers": [_finite(r) for r in self.rows], "verify": self.verify, "end_to_end": self.end_to_end, "cache": self.cache,
                "notes": self.notes}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def table(self):
        from rich.table import Table

        t = Table(title=f"{self.model}: compiled for {self.backend}", title_justify="left")
        for c in ("layer", "shape", "M", "density", "pattern", "decision", "kernel", "dense µs", "chosen µs", "speedup", "reason"):
            t.add_column(c, justify="right" if c in ("M", "density", "dense µs", "chosen µs", "speedup") else "left")
        for r in self.rows:
            dense, chosen = (v if _measured(v) else None for v in (r.get("dense_us"), r.get("chosen_us")))
            t.add_row(r["layer"], "x".join(map(str, r["shape"])) if r.get("shape") else "-", str(r.get("m", "-")),
                      _pct(r["density"]) if r.get("density") is not None else "-", r["pattern"],
                      r["decision"], r.get("kernel", "-"), f"{dense:.0f}" if dense else "-", f"{chosen:.0f}" if chosen else "-",
                      f"{dense / chosen:.2f}x" if dense and chosen else "-", r["reason"],
                      style="green" if r["decision"] == "sparse" else None)
        return t

    def __rich_console__(self, console, options):
        yield self.table()
        s = self.to_dict()["summary"]
        line = f"{s['sparse']}/{s['layers']} layers sparse"
        if s["dense_on_tir_gemv"]:
            line += f", {s['dense_on_tir_gemv']} dense one-row layers on the TIR GEMV"
        if s["layer_speedup"]:
            line += f"; measured layer time {s['measured_dense_us'] / 1e3:.2f} ms dense -> {s['measured_chosen_us'] / 1e3:.2f} ms ({s['layer_speedup']:.2f}x)"
        yield line
        e2e = self.end_to_end or {}
        if "eager_ms" in e2e:
            yield (f"end to end on the example inputs: eager {e2e['eager_ms']:.2f} ms, compiled {e2e['compiled_ms']:.2f} ms "
                   f"({e2e['eager_ms'] / e2e['compiled_ms']:.2f}x{', torch ops on 1 thread' if e2e.get('torch_threads') == 1 else ''}); "
                   f"runs: {e2e['runs']}")
        if self.verify:
            yield f"verify: {'ok' if self.verify['ok'] else 'FAILED'} (max abs error {self.verify['max_abs_error']:.3g}, allowed {self.verify['allowed']:.3g})"
        for note in self.notes:
            yield f"note: {note}"

    def __str__(self) -> str:
        return _render(self)
