"""`profile-activations`: how sparse the activations entering each matmul are, measured.

Runs the graph on the calibration batches (an `fx.Interpreter`, so the graph is not modified) and,
for the input of every matmul-like node with a constant weight, counts per input channel the
fraction of exact zeros and of near-zeros (|x| < t for each threshold t). The channel is the
dimension the weight contracts: the last one for linear / matmul, dim 1 for convolutions.
Activation-sparsity rewrites (exact ReLU zeros, calibrated thresholds) read these numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.fx as fx

from sparsecomp.errors import PipelineError, SparsecompError
from sparsecomp.ir import check_batches_fit, flat_inputs, linear_sites
from sparsecomp.registry import Bounds, PassResult, register_pass

__all__ = ["ActivationStats", "META_KEY"]

META_KEY = "sparsecomp.activations"


@dataclass
class ActivationStats:
    """Zeros in the input of one layer over the calibration data."""

    name: str  # layer consuming the activation
    channels: int
    samples: int  # vectors seen (tokens x batches, or pixels for convs)
    zero_per_channel: torch.Tensor  # [channels] fraction of exact zeros
    near_zero_per_channel: dict[str, torch.Tensor] = field(default_factory=dict)  # threshold -> [channels]

    @property
    def zero_fraction(self) -> float:
        return float(self.zero_per_channel.mean()) if self.channels else 0.0

    @property
    def near_zero(self) -> dict[str, float]:
        return {t: float(v.mean()) for t, v in self.near_zero_per_channel.items()}

    @property
    def dead_channels(self) -> int:
        """Channels that were zero on every calibration sample."""
        return int((self.zero_per_channel >= 1.0).sum())

    def summary(self) -> str:
        near = " ".join(f"|x|<{t}:{v:.2f}" for t, v in self.near_zero.items())
        return f"zeros={self.zero_fraction:.3f} {near} dead={self.dead_channels}"

    def to_dict(self) -> dict:
        return {"name": self.name, "channels": self.channels, "samples": self.samples,
                "zero_fraction": self.zero_fraction, "near_zero": self.near_zero,
                "dead_channels": self.dead_channels}


def _parse_thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise PipelineError(f"bad thresholds '{text}'", hint='write thresholds as "0.001,0.01,0.1"') from None
    if not values or any(not (math.isfinite(v) and v > 0) for v in values):
        raise PipelineError(f"thresholds must be finite numbers > 0, got '{text}'", hint='e.g. thresholds="0.001,0.01,0.1"')
    return values


class _Recorder(fx.Interpreter):
    def __init__(self, gm, watch: dict[fx.Node, tuple[str, int]], thresholds: list[float], acc: dict):
        super().__init__(gm)
        self.watch, self.thresholds, self.acc = watch, thresholds, acc

    def run_node(self, n: fx.Node):
        if n in self.watch:
            name, channel_dim = self.watch[n]
            x = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.detach().movedim(channel_dim, -1)
                x = x.reshape(-1, x.shape[-1]).abs()
                a = self.acc.setdefault(name, {"n": 0, "zero": 0, "near": [0] * len(self.thresholds)})
                a["n"] += x.shape[0]
                a["zero"] = a["zero"] + (x == 0).sum(0)
                for i, t in enumerate(self.thresholds):
                    a["near"][i] = a["near"][i] + (x < t).sum(0)
        return super().run_node(n)


@register_pass("profile-activations", kind="analysis")
def profile_activations(gm, ctx, *, thresholds: str = "0.001,0.01,0.1", max_batches: Annotated[int, Bounds(lo=1)] = 64) -> PassResult:
    """Measure per-channel zero and near-zero fractions of every activation entering a matmul.

    Requires: calibration batches in `ctx.calibration`, each `(args, kwargs)` shaped like the
      example inputs (checked: `ir.check_batches_fit`); an ATen-level graph.
    Ensures: `node.meta["sparsecomp.activations"]` = `ActivationStats` on every matmul-like node
      with a constant weight whose input is a float tensor; `ctx.results["profile-activations"]` =
      their list. The graph itself is unchanged.
    Options:
      thresholds: near-zero thresholds t (counts |x| < t), comma-separated.
      max_batches: use at most this many calibration batches.
    """
    if not ctx.calibration:
        raise SparsecompError(
            "profile-activations needs calibration data and none was given",
            hint="pass calibration=... to sparsecomp.analyze, or --calib N on the command line",
        )
    check_batches_fit(gm, ctx.example_inputs, ctx.calibration[:max_batches])
    ts = _parse_thresholds(thresholds)
    watch = {s.node: (s.name, 1 if s.kind == "conv" else -1) for s in linear_sites(gm)}
    acc: dict = {}
    recorder = _Recorder(gm, watch, ts, acc)
    with torch.no_grad():
        for args, kwargs in ctx.calibration[:max_batches]:
            recorder.run(*flat_inputs(gm, args, kwargs))
    results = []
    for node, (name, _) in watch.items():
        if name not in acc:
            continue
        a = acc[name]
        n = max(a["n"], 1)
        stats = ActivationStats(
            name=name, channels=int(a["zero"].numel()), samples=a["n"],
            zero_per_channel=a["zero"].double() / n,
            near_zero_per_channel={f"{t:g}": c.double() / n for t, c in zip(ts, a["near"])},
        )
        node.meta[META_KEY] = stats
        results.append(stats)
    ctx.results["profile-activations"] = results
    return PassResult(False, {
        "layers": len(results),
        "batches": min(len(ctx.calibration), max_batches),
        "inputs>=50%-zero": sum(s.zero_fraction >= 0.5 for s in results),
    })
