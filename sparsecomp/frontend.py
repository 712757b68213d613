"""The frontend, capture: `nn.Module` -> ATen-level `torch.fx.GraphModule` (the one IR).

(The module is not named `capture.py` so that the public function `sparsecomp.capture` is never
shadowed by a submodule of the same name once imported.)

We use `torch.export.export(strict=False)` and `ExportedProgram.module()`: the result is a
GraphModule whose parameters and buffers are attributes (reached by `get_attr` nodes under their
qualified names, e.g. `encoder.layer.0.intermediate.dense.weight`), so passes can swap a weight for
a packed sparse tensor, and whose calling convention is the model's own (args and kwargs in,
the model's output structure out).

Dynamic dimensions. The batch dimension (dim 0 of every tensor input) and the sequence dimension
(dim 1 of integer token inputs `[B, T]` and of float `[B, T, C]` inputs) are marked
`Dim.AUTO`: export keeps them symbolic where the model allows and specialises them where it does
not. Export always specialises a dimension whose example size is 0 or 1, so such dimensions are
traced on a copy of the inputs repeated to size 2 along them; the graph is then checked against
eager on the *original* inputs, and if that trace fails we fall back to the original inputs
(static). What came out dynamic or static is recorded in `gm.meta["sparsecomp.capture"]`.

Errors. A model that cannot be captured gets one `CaptureError` line naming the module (the
innermost `nn.Module` of the model on the failing stack) or op at fault and what to try;
data-dependent control flow is named as such.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import free_symbols

from sparsecomp.errors import CaptureError
from sparsecomp.ir import compare_outputs, normalize_inputs, run_graph

__all__ = ["capture", "CaptureInfo", "grow"]


@dataclass
class CaptureInfo:
    """What capture decided; stored in `gm.meta["sparsecomp.capture"]`."""

    dynamic: dict[str, list[int]] = field(default_factory=dict)  # input name -> dynamic dims
    static_shapes: dict[str, list[int]] = field(default_factory=dict)  # input name -> example shape
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        dyn = ", ".join(f"{k}[{','.join(map(str, v))}]" for k, v in self.dynamic.items()) or "none"
        return f"dynamic dims: {dyn}"


def _candidate_dims(t: torch.Tensor, token_shapes: set[tuple[int, ...]]) -> list[int]:
    """Dims to try dynamic: batch always; sequence for token ids [B, T], tensors shaped like
    them (attention masks, any dtype) and float [B, T, C] activations."""
    if t.dim() == 0:
        return []
    dims = [0]
    if t.dim() == 3 and t.is_floating_point() or t.dim() == 2 and tuple(t.shape) in token_shapes:
        dims.append(1)
    return dims


def _token_shapes(values) -> set[tuple[int, ...]]:
    return {tuple(v.shape) for v in values if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()}


def grow(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Repeat size-1 dims to 2 so export does not 0/1-specialise them."""
    reps = [2 if (d in dims and t.shape[d] == 1) else 1 for d in range(t.dim())]
    return t.repeat(*reps) if any(r == 2 for r in reps) else t


def _dynamic_spec(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    from torch.export import Dim

    tokens = _token_shapes([*args, *kwargs.values()])

    def spec(x):
        if isinstance(x, torch.Tensor):
            dims = _candidate_dims(x, tokens)
            return {d: Dim.AUTO for d in dims} if dims else None
        return None

    return tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}


@contextlib.contextmanager
def _quiet_export():
    """torch.export logs warnings about specialised dims; we report those ourselves."""
    names = ["torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"]
    old = [logging.getLogger(n).level for n in names]
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        # Failed traces also print the partial graph to stderr; the error we raise says enough.
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for n, lvl in zip(names, old):
            logging.getLogger(n).setLevel(lvl)


def _module_at_fault(model: torch.nn.Module, err: BaseException) -> tuple[str, str] | None:
    """(qualified name and class, file:line) of the innermost module of `model` on the failing stack."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        code = frame.f_code
        obj = frame.f_locals.get(code.co_varnames[0]) if code.co_argcount else None
        # The model's own forward frames, not torch's Module.__call__ machinery around them.
        if obj is not None and id(obj) in names and frame.f_code.co_name == "forward":
            found = f"'{names[id(obj)] or '<root>'}' ({type(obj).__name__})", f"{code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return found


def _explain(model: torch.nn.Module, err: BaseException, model_name: str) -> CaptureError:
    text = f"{type(err).__name__}: {err}"
    where = _module_at_fault(model, err)
    at = f" in module {where[0]} at {where[1]}" if where else ""
    # torch.export names the user line that raised ("The following call raised this error:").
    m = re.search(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    if m:
        at += (f" `{m.group(3).strip()}`" if where else f" at {m.group(1)}:{m.group(2)} `{m.group(3).strip()}`")
    first = text.strip().splitlines()[0][:300]
    lower = text.lower()
    if any(s in lower for s in ("data-dependent", "data dependent", "guardondatadependent", "could not guard on data-dependent")):
        return CaptureError(
            f"cannot capture {model_name}: data-dependent control flow{at} (a Python branch or shape that depends on tensor values)",
            hint="rewrite the branch with torch.cond / torch.where, or make the value a constant; run with --debug for the trace",
        )
    return CaptureError(
        f"cannot capture {model_name}{at}: {first}",
        hint="check the model runs eagerly on these example inputs; unsupported ops may need a torch.library custom op; --debug shows the trace",
    )


def _export(model, args, kwargs, dynamic: bool):
    ds = _dynamic_spec(args, kwargs) if dynamic else None
    if ds is not None:
        dyn_args, dyn_kwargs = ds
        named = sum("[" not in name for name in _arg_names(model, len(args)))
        if named < len(args):  # forward(self, a, *rest): export matches the spec to that structure
            dyn_args = (*dyn_args[:named], tuple(dyn_args[named:]))
            ds = dyn_args if not kwargs else None
        else:
            ds = dyn_args if not kwargs else (dict(zip(_arg_names(model, len(args)), dyn_args)) | dyn_kwargs)
    with _quiet_export():
        return torch.export.export(model, args, kwargs=kwargs or None, dynamic_shapes=ds, strict=False)


def _arg_names(model: torch.nn.Module, n: int) -> list[str]:
    """Names of the first `n` positional inputs; those taken by `*rest` are named `rest[i]`."""
    import inspect

    sig = inspect.signature(model.forward).parameters.values()
    params = [p.name for p in sig if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][:n]
    var = next((p.name for p in sig if p.kind == p.VAR_POSITIONAL), None)
    if var is not None:
        params += [f"{var}[{i}]" for i in range(n - len(params))]
    return params


def _record(gm: fx.GraphModule, args: tuple, kwargs: dict, model: torch.nn.Module) -> CaptureInfo:
    info = CaptureInfo()
    names = _arg_names(model, len(args)) + list(kwargs)
    values = list(args) + list(kwargs.values())
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [(nm, v) for nm, v in zip(names, values) if isinstance(v, torch.Tensor)]
    for (name, value), ph in zip(tensors, placeholders):
        val = ph.meta.get("val")
        if val is None:
            continue
        # A specialised dim can still be a SymInt (with no free symbols): only symbols are dynamic.
        dyn = [d for d, s in enumerate(val.shape) if free_symbols(s)]
        if dyn:
            info.dynamic[name] = dyn
        info.static_shapes[name] = list(value.shape)
    return info


def capture(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = True, name: str | None = None) -> fx.GraphModule:
    """Trace `model` on `example_inputs` into an ATen-level GraphModule.

    `example_inputs`: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    With `dynamic`, batch and sequence dimensions stay symbolic where the model allows (see the
    module docstring); the decision is in `gm.meta["sparsecomp.capture"]` (a `CaptureInfo`).
    The graph is the model in eval mode (inference: dropout off, batch norm on its running
    statistics); a model in training mode is traced so and left in the mode it was in.
    """
    model_name = name or type(model).__name__
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"cannot capture {model_name}: expected a torch.nn.Module, got {type(model).__name__}")
    try:
        args, kwargs = normalize_inputs(example_inputs)
    except TypeError as err:
        raise CaptureError(f"cannot capture {model_name}: {err}") from None
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        more = f" (and {len(meta) - 1} more)" if len(meta) > 1 else ""
        raise CaptureError(f"cannot capture {model_name}: {meta[0]}{more} on the meta device, with no data",
                           hint="materialise the weights first (e.g. model.to_empty(device='cpu') and load a state dict)")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        gm = _capture_eval(model, args, kwargs, dynamic, model_name)
    finally:
        for m, training in modes.items():
            m.training = training
    if any(modes.values()):
        gm.meta["sparsecomp.capture"].notes.append(
            "the model was in training mode: captured in eval mode (inference: dropout off, batch norm on running statistics)")
    return gm


def _capture_eval(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool, model_name: str) -> fx.GraphModule:
    try:
        reference = run_graph(model, (args, kwargs))
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0][:300]
        where = _module_at_fault(model, err)
        raise CaptureError(
            f"{model_name} does not run eagerly on the example inputs"
            + (f" (in module {where[0]} at {where[1]})" if where else "") + f": {type(err).__name__}: {first}",
            hint="check the example inputs' shapes and dtypes",
        ) from err
    notes: list[str] = []
    ep = None
    if dynamic:
        tokens = _token_shapes([*args, *kwargs.values()])
        grown_args = tuple(grow(a, _candidate_dims(a, tokens)) if isinstance(a, torch.Tensor) else a for a in args)
        grown_kwargs = {k: grow(v, _candidate_dims(v, tokens)) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        grew = any(g is not a for g, a in zip(grown_args, args)) or any(grown_kwargs[k] is not kwargs[k] for k in kwargs)
        try:
            ep = _export(model, grown_args, grown_kwargs, dynamic=True)
            gm = ep.module()
            ok, _, _ = compare_outputs(run_graph(gm, (args, kwargs)), reference)
            if not ok:
                ep = None
                notes.append("dynamic trace disagreed with eager on the example inputs; captured static shapes")
            elif grew:
                notes.append("size-1 batch/sequence dims traced at size 2 so they stay dynamic")
        except Exception:
            # Retried below with the original inputs: the error of that attempt is the one to show.
            ep = None
        if ep is None and grew:
            try:
                ep = _export(model, args, kwargs, dynamic=True)
            except Exception:
                ep = None
    if ep is None:
        try:
            ep = _export(model, args, kwargs, dynamic=False)
        except Exception as err:
            raise _explain(model, err, model_name) from err
        if dynamic:
            notes.append("dynamic dims could not be kept; shapes are static (re-capture for another shape)")
    gm = ep.module()
    info = _record(gm, args, kwargs, model)
    info.notes = notes
    gm.meta["sparsecomp.capture"] = info
    gm.meta["sparsecomp.model_name"] = model_name
    return gm

