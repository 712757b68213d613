"""Trimming the per-call path of a lowered GraphModule (the torch backend's compiled model).

At one row per call a compiled layer can take well under a millisecond, and everything Python does
around its kernels counts. It counts most where a call comes after other work has streamed the
caches (a model called now and then, or the benchmarks, which settle between calls): then every
Python-level step misses the caches. Measured on the Intel VM after the benchmarks' settle:
`torch.empty(1, 2048)` 160 us, `np.empty` 110 us, an attribute read of a tensor 20 us, against
about 1 us each back to back. These helpers remove steps that do nothing for the result; each
leaves the module as it was where it does not find what it expects.

- `unwrap_guards`: torch.export's shape guards without their dynamo wrapper.
- `drop_export_hooks`: torch.export's per-call hooks that have nothing to do.
- `bind_attribute_paths`: the graph's attribute reads (`self.decoder.layers[0].q_proj.weight`) as
  plain instance-dict lookups instead of `nn.Module.__getattr__` calls.
"""

from __future__ import annotations

import torch

__all__ = ["bind_attribute_paths", "drop_export_hooks", "unwrap_guards"]


def unwrap_guards(gm: torch.nn.Module) -> None:
    """Call torch.export's shape guards without their dynamo wrapper. The guard function itself
    (`L['x'].size()[1] == 2048`-style asserts) costs ~1 us; torch wraps it in a dynamo config patch
    (so that dynamo would trace into it when re-exporting) whose enter/exit costs ~10 us a call,
    and 80-190 us after a kernel has streamed the caches (bench_mlp's FFN). Where the wrapper is
    not the expected closure over one plain function, it is left alone."""
    import inspect

    guards = getattr(gm, "_guards_fn", None)
    fwd = getattr(guards, "forward", None)
    cells = [c.cell_contents for c in (getattr(fwd, "__closure__", None) or ())]
    raw = [c for c in cells if inspect.isfunction(c)]
    if len(raw) == 1 and len(cells) == 2 and type(cells[1 - cells.index(raw[0])]).__name__ == "DynamoConfigPatchProxy":
        guards.forward = raw[0]


def drop_export_hooks(gm: torch.nn.Module) -> None:
    """Remove torch.export's per-call hooks where they do nothing: the input-constraints pre-hook
    (off once `validate_inputs` is False) and the enter / exit pair that registers nn.Module-typed
    graph inputs with pytree, when there are none (their closure holds an empty collection). A
    module with no hooks left is called on nn.Module's fast path: ~70 us less per call after a
    kernel has streamed the caches (bench_mlp's FFN). A hook that is not one of these, or whose
    closure is not as expected, stays."""
    def removable(hook) -> bool:
        if getattr(hook, "__module__", "") != "torch.export._unlift":
            return False
        if getattr(hook, "__name__", "") == "_check_input_constraints_pre_hook":
            return getattr(gm, "validate_inputs", True) is False
        cells = [c.cell_contents for c in (getattr(hook, "__closure__", None) or ())]
        return (getattr(hook, "__name__", "") == "<lambda>" and len(cells) == 1
                and isinstance(cells[0], (set, frozenset, list, tuple, dict)) and len(cells[0]) == 0)

    for hooks in (gm._forward_pre_hooks, gm._forward_hooks):
        for key in [k for k, h in hooks.items() if removable(h)]:
            del hooks[key]
            for extra in (gm._forward_pre_hooks_with_kwargs, gm._forward_hooks_with_kwargs, gm._forward_hooks_always_called):
                extra.pop(key, None)


def bind_attribute_paths(gm: torch.fx.GraphModule) -> int:
    """Make each step of the attribute paths the graph's `get_attr` / `call_module` nodes read a
    plain entry in its owner's `__dict__` (the same object), so the generated forward finds it
    without calling `nn.Module.__getattr__` (a Python function: submodules and parameters live in
    `_modules` / `_parameters`). Returns the number of entries added.

    Why: opt-125m-like's lowered graph reads ~200 weights through 5-6 steps each: 842 `__getattr__`
    calls a forward, against 309 in the eager model.

    Only submodules and parameters are bound: `nn.Module.__setattr__` drops the instance-dict entry
    when either is assigned again (so a re-assigned parameter is still found), but not when a buffer
    is (buffers stay on `__getattr__`). A compiled model is a snapshot of its weights anyway (its
    sparse layers packed them at compile time): in-place changes are seen, new objects are not."""
    added = 0
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module") or not isinstance(node.target, str):
            continue
        owner = gm
        for atom in node.target.split("."):
            if not isinstance(owner, torch.nn.Module):
                break
            child = owner._modules.get(atom)
            if child is None:
                child = owner._parameters.get(atom)
            if child is None:  # a buffer or a plain attribute: read as before
                break
            if owner.__dict__.get(atom) is not child:
                owner.__dict__[atom] = child
                added += 1
            owner = child
    return added
