"""`torch.compile(model, backend="sparsecomp")`: sparsecomp as a registered torch.compile backend.

Registered through the `torch_dynamo_backends` entry point (pyproject), so the name resolves as
soon as sparsecomp is installed; `import sparsecomp` is not needed.

Why this is more than a call to `sparsecomp.compile`: since torch 2.5, dynamo hands a backend its
graph with the module's parameters lifted to graph *inputs* (placeholders), not constants. Our
passes need constant weights to find sparsity. So each placeholder whose example value is an
`nn.Parameter` or a registered buffer is frozen back into a module attribute (`_FrozenGraph`), the
result is compiled with `sparsecomp.compile` (capture, passes, measured lowering, verify), and the
returned callable drops those inputs again.

Freezing is for inference: the weights are read once. If a frozen tensor is later changed in
place (its version counter moves, e.g. an optimizer step) or replaced, the next call notices and
compiles again, so a stale weight is never used silently. Symbolic sizes that dynamo adds as inputs after a shape change are recomputed from the
tensors they measure, so the capture keeps those dims dynamic; any other non-tensor input makes
the graph run as dynamo gave it (no sparse rewrite), and the reason is logged.

Options: `torch.compile(model, backend="sparsecomp", options={...})` forwards `options` as keyword
arguments of `sparsecomp.compile` (e.g. `{"max_seconds_per_layer": 0.2, "kernels": "dense,tir-sell"}`);
`mode="max-autotune"` means `tune=True`. One graph keeps a compiled model per set of frozen
weights (dynamo shares a graph between instances of a module class). Called with weights that
require grad while grad is enabled (training), it warns once: frozen weights get no gradients.
"""

from __future__ import annotations

import logging
import warnings

import torch

from sparsecomp.errors import SparsecompError

__all__ = ["backend"]

log = logging.getLogger("sparsecomp.dynamo")

_ALLOWED_OPTIONS = {"backend", "sparsify", "calibration", "activation_sparsity", "pipeline", "verify", "cache_dir",
                    "max_seconds_per_layer", "use_tir", "kernels", "name", "tune"}
# torch.compile's `mode`: the autotuning modes ask for sparsecomp's `tune=True`; the others change nothing here
_TUNE_MODES = {"max-autotune", "max-autotune-no-cudagraphs"}
_MODES = {None, "default", "reduce-overhead", *_TUNE_MODES}
MAX_COMPILED = 8  # compiled weight sets one graph keeps (instances sharing the graph; weights that changed)


def _frozen_positions(gm: torch.fx.GraphModule, example_inputs: list) -> list[int]:
    """Inputs that are the module's parameters or buffers (dynamo marks them static inputs)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        static = node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None
        if isinstance(value, torch.Tensor) and (static or isinstance(value, torch.nn.Parameter)):
            out.append(i)
    return out


def _size_sources(gm: torch.fx.GraphModule, example_inputs: list) -> dict[int, tuple[int, int]] | None:
    """For each symbolic-size input (dynamo adds them after a shape change): the (input, dim) it
    equals, so it can be recomputed from the tensors; None if one cannot be traced to a tensor dim."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dims: dict[str, tuple[int, int]] = {}
    for i, node in enumerate(placeholders):
        ev = node.meta.get("example_value")
        if isinstance(ev, torch.Tensor):
            for d, size in enumerate(ev.shape):
                dims.setdefault(str(size), (i, d))
    out = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor):
            continue
        key = str(node.meta.get("example_value"))
        if not isinstance(value, (int, torch.SymInt)) or key not in dims:
            return None
        out[i] = dims[key]
    return out


class _FrozenGraph(torch.nn.Module):
    """dynamo's graph with its parameter inputs turned back into attributes (constants to capture)
    and its symbolic-size inputs recomputed from the tensors' shapes (so the capture keeps them dynamic)."""

    def __init__(self, gm: torch.fx.GraphModule, positions: list[int], tensors: list[torch.Tensor], arity: int,
                 sizes: dict[int, tuple[int, int]]):
        super().__init__()
        self.gm, self.positions, self.arity, self.sizes = gm, positions, arity, sizes
        for i, t in zip(positions, tensors):
            self.register_buffer(f"w{i}", t.detach(), persistent=False)

    def forward(self, *user_inputs):
        full: list = [None] * self.arity
        it = iter(user_inputs)
        for i in range(self.arity):
            if i in self.positions:
                full[i] = getattr(self, f"w{i}")
            elif i not in self.sizes:
                full[i] = next(it)
        for i, (src, dim) in self.sizes.items():
            full[i] = full[src].shape[dim]
        return self.gm(*full)


class _Runner:
    """The callable dynamo gets back. It compiles on its first call (torch.export must not run while
    dynamo is still building this frame's guards: the nested trace corrupts them), and later checks
    that the frozen weights are unchanged before running the compiled graph."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: list, options: dict):
        self.gm, self.options = gm, options
        self.positions = _frozen_positions(gm, example_inputs)
        self.sizes = _size_sources(gm, example_inputs) or {}
        self.user_positions = [i for i in range(len(example_inputs)) if i not in self.positions and i not in self.sizes]
        # One compiled model per set of frozen weights: dynamo reuses one graph for every instance of
        # a module class (their weights are its inputs), so two blocks would otherwise recompile on
        # every call, alternately. Oldest first; a weight changed in place makes a new set.
        self.compiled: dict[tuple, object] = {}
        self.warned_grad = False

    def _signature(self, inputs) -> tuple:
        return tuple((inputs[i].data_ptr(), inputs[i]._version) for i in self.positions)

    def _compile(self, inputs, signature: tuple):
        from sparsecomp.api import compile as sc_compile

        frozen = _FrozenGraph(self.gm, self.positions, [inputs[i] for i in self.positions], len(inputs), self.sizes)
        user = tuple(inputs[i] for i in self.user_positions)
        opts = {"name": "torch.compile graph", **self.options}
        compiled = sc_compile(frozen, user, **opts)
        if len(self.compiled) >= MAX_COMPILED:
            self.compiled.pop(next(iter(self.compiled)))
        self.compiled[signature] = compiled
        rows = compiled.report.rows
        log.info("sparsecomp: %d of %d layers sparse, runs %s", sum(r.get("decision") == "sparse" for r in rows),
                 len(rows), compiled.runs)
        return compiled

    @torch._dynamo.disable  # our own code (capture, measurement, kernels) is not for dynamo to trace
    def __call__(self, *inputs):
        if not self.warned_grad and torch.is_grad_enabled() and any(inputs[i].requires_grad for i in self.positions):
            self.warned_grad = True  # (once: inference code that forgot no_grad() would hear it on every call)
            warnings.warn("torch.compile(backend='sparsecomp') is for inference: the model's weights are frozen into the "
                          "compiled graph and get no gradients (call it under torch.no_grad() / torch.inference_mode(); "
                          "to train, use another backend)", stacklevel=2)
        signature = self._signature(inputs)
        compiled = self.compiled.get(signature)
        if compiled is None:
            if self.compiled:
                log.info("sparsecomp: frozen weights this graph has not seen (another instance, or changed); compiling")
            compiled = self._compile(inputs, signature)
        return compiled(*(inputs[i] for i in self.user_positions))


def backend(gm: torch.fx.GraphModule, example_inputs: list, options: dict | None = None, **kwargs):
    """The `torch_dynamo_backends` entry point: returns a callable with `gm.forward`'s signature."""
    mode = kwargs.pop("mode", None)
    if mode not in _MODES:
        raise SparsecompError(f"unknown torch.compile mode {mode!r} for backend 'sparsecomp'",
                              hint=f"modes: {', '.join(sorted(m for m in _MODES if m))} (max-autotune: sparsecomp's tune=True)")
    options = dict(options or {}, **kwargs)
    if mode in _TUNE_MODES:
        options.setdefault("tune", True)
    unknown = set(options) - _ALLOWED_OPTIONS
    if unknown:
        raise SparsecompError(f"unknown torch.compile option(s) for backend 'sparsecomp': {', '.join(sorted(unknown))}",
                              hint=f"options are keyword arguments of sparsecomp.compile: {', '.join(sorted(_ALLOWED_OPTIONS))}")
    if not _frozen_positions(gm, example_inputs):
        return gm.forward  # no weights in this graph (e.g. a graph break between layers): nothing to rewrite
    if _size_sources(gm, example_inputs) is None:
        log.info("sparsecomp: graph has a non-tensor input that is not a tensor's size; running it without sparse rewrites")
        return gm.forward
    return _Runner(gm, list(example_inputs), options)
