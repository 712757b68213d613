"""The `sparsecomp::*` sparse dialect: declaring custom ops with torch.library.

A sparse operation in a rewritten graph is a custom op in the `sparsecomp` namespace
(`torch.ops.sparsecomp.<name>`). Each is declared once, with `define_op` (or the `sparse_op`
decorator), from three things:

- a **schema**, inferred from the reference's type hints or given as text;
- a **reference** implementation in plain PyTorch: the definition of the op's semantics, the
  kernel that runs when the op is called eagerly (any device), and what verification runs a
  graph on (`run_on_reference`);
- a **fake** (meta) implementation that computes output shapes and dtypes only, so graphs holding
  the op still `torch.export` (also with a dynamic batch `Dim`), trace and print.

Fast kernels are *not* registered here: backends replace the op in their lowering (DESIGN.md,
section 1), so the reference stays the one definition.

Why `torch.library.Library("sparsecomp", "FRAGMENT")` + `define` / `impl` / `register_fake`, and
not `torch.library.custom_op`: both give the same `OpOverload` in graphs and exports, but
custom_op's Python wrapper adds ~35 us to every eager call, against ~6 us here (measured, torch 2.13,
2-core CPU), which matters if a backend keeps the dialect op in an eager graph around a kernel of
100-300 us; and re-running custom_op on an existing name silently replaces the op, which we want
to be an error. "FRAGMENT" (not "DEF") lets other modules add ops to the namespace, and schema
inference still uses the public `torch.library.infer_schema`, so the reference's signature is
the single source of the schema.

The dialect is functional and inference-only: schemas may not mutate inputs, and no autograd
formula is registered (backward through an op falls to torch's not-implemented fallback).
Custom ops cannot be unregistered; a second definition of a name raises `SparsecompError`.
Tests define throw-away ops named `_test_*`.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx

from .errors import SparsecompError

__all__ = [
    "NAMESPACE",
    "OpDef",
    "define_op",
    "sparse_op",
    "registered_ops",
    "op_def",
    "reference_impl",
    "is_sparsecomp_op",
    "run_on_reference",
]

NAMESPACE = "sparsecomp"

# Registrations on a Library are undone when the object is garbage collected: keep it alive for
# the life of the process.
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_REGISTRY: dict[str, OpDef] = {}
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class OpDef:
    """One declared sparsecomp op: its name, schema text, reference and fake implementations."""

    name: str
    schema: str
    reference: Callable[..., Any]
    fake: Callable[..., Any]
    doc: str = ""

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def packet(self) -> torch._ops.OpOverloadPacket:
        """`torch.ops.sparsecomp.<name>` (call it; `.default` is what FX graphs hold)."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name)

    @property
    def overload(self) -> torch._ops.OpOverload:
        return self.packet.default


def _split_name(name: str) -> str:
    bare = name.split("::", 1)[1] if name.startswith(f"{NAMESPACE}::") else name
    if not isinstance(bare, str) or not _NAME_RE.fullmatch(bare):
        raise SparsecompError(
            f"bad sparsecomp op name {name!r}",
            hint="use a Python identifier such as 'csr_linear' (the namespace 'sparsecomp::' is implied)",
        )
    return bare


def define_op(
    name: str,
    schema: str | None = None,
    *,
    reference: Callable[..., Any],
    fake: Callable[..., Any],
    doc: str | None = None,
) -> torch._ops.OpOverloadPacket:
    """Declare `sparsecomp::<name>` and return its op packet (`torch.ops.sparsecomp.<name>`).

    `schema` is the argument/return part, e.g. `"(Tensor x, Tensor values, int n) -> Tensor"`;
    when None it is inferred from `reference`'s type hints (torch.library.infer_schema). Schema
    argument names must equal the reference's parameter names, since graphs may pass them as
    keywords. `reference` is the plain-PyTorch semantics (registered as the kernel for every
    device); `fake` computes output metadata only (`new_empty` of the right shape and dtype).

    Raises `SparsecompError` if the name is taken (by us or any other `sparsecomp::` op), the
    schema does not parse, mutates an input, or disagrees with the reference's signature.
    """
    bare = _split_name(name)
    if bare in _REGISTRY or hasattr(getattr(torch.ops, NAMESPACE), bare):
        raise SparsecompError(
            f"sparsecomp op {NAMESPACE}::{bare} is already defined",
            hint="ops cannot be redefined or unregistered; pick another name (tests use '_test_*' names)",
        )
    if not callable(reference) or not callable(fake):
        raise SparsecompError(f"define_op({bare!r}) needs callable reference= and fake= implementations")

    if schema is None:
        try:
            schema = torch.library.infer_schema(reference, mutates_args=())
        except Exception as e:  # torch raises ValueError with a useful text on unsupported hints
            raise SparsecompError(
                f"cannot infer the schema of sparsecomp::{bare} from {reference.__qualname__}: {e}",
                hint="annotate every parameter with a torch type (Tensor, int, float, bool, list[int], ...) or pass schema=",
            ) from None
    try:
        parsed = torch._C.parse_schema(f"{NAMESPACE}::{bare}{schema}")
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "parse error"
        raise SparsecompError(
            f"bad schema for sparsecomp::{bare}: {schema!r} ({first})",
            hint="write it like '(Tensor x, Tensor values, int n=2) -> Tensor'",
        ) from None
    if parsed.is_mutable:
        raise SparsecompError(
            f"schema of sparsecomp::{bare} mutates an input: {schema!r}",
            hint="sparsecomp ops are functional: return new tensors instead of writing to inputs",
        )
    schema_args = [a.name for a in parsed.arguments]
    try:
        params = [
            p.name
            for p in inspect.signature(reference).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = schema_args  # builtins without a signature: trust the schema
    if params != schema_args:
        raise SparsecompError(
            f"schema of sparsecomp::{bare} takes ({', '.join(schema_args)}) but its reference takes ({', '.join(params)})",
            hint="use the same argument names, in the same order, in the schema and the reference",
        )

    _LIB.define(f"{bare}{schema}")
    # CompositeExplicitAutograd: one kernel for every backend, so eager calls and verification
    # work wherever the inputs live; the fake impl takes over under FakeTensorMode / export.
    _LIB.impl(bare, reference, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{bare}", fake, lib=_LIB)
    _REGISTRY[bare] = OpDef(bare, schema, reference, fake, doc if doc is not None else (inspect.getdoc(reference) or ""))
    return _REGISTRY[bare].packet


def sparse_op(
    name: str, *, fake: Callable[..., Any], schema: str | None = None
) -> Callable[[Callable[..., Any]], torch._ops.OpOverloadPacket]:
    """Decorator form of `define_op`: the decorated function is the reference.

        @sparse_op("csr_linear", fake=_csr_linear_fake)
        def csr_linear(x: Tensor, values: Tensor, ...) -> Tensor: ...

    binds `csr_linear` to `torch.ops.sparsecomp.csr_linear`.
    """

    def wrap(reference: Callable[..., Any]) -> torch._ops.OpOverloadPacket:
        return define_op(name, schema, reference=reference, fake=fake)

    return wrap


def registered_ops() -> dict[str, OpDef]:
    """The ops declared through this module, by bare name (a copy)."""
    return dict(_REGISTRY)


def _lookup_name(op: Any) -> str | None:
    """Bare sparsecomp op name of a str / OpOverload / OpOverloadPacket, or None if not ours."""
    if isinstance(op, torch._ops.OpOverload):
        qual = op._schema.name  # "sparsecomp::name"
    elif isinstance(op, torch._ops.OpOverloadPacket):
        qual = op._qualified_op_name
    elif isinstance(op, str):
        # accept "name", "sparsecomp::name", and the printed forms "sparsecomp.name(.default)"
        qual = op.removesuffix(".default")
        if qual.startswith(f"{NAMESPACE}."):
            qual = f"{NAMESPACE}::{qual[len(NAMESPACE) + 1:]}"
        if "::" not in qual:
            qual = f"{NAMESPACE}::{qual}"
    else:
        return None
    ns, _, bare = qual.partition("::")
    return bare if ns == NAMESPACE and bare in _REGISTRY else None


def is_sparsecomp_op(target: Any) -> bool:
    """True if an FX node target (OpOverload / packet) is an op declared through `define_op`."""
    return not isinstance(target, str) and _lookup_name(target) is not None


def op_def(op: str | torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> OpDef:
    """The `OpDef` of a sparsecomp op, given its name (`"x"`, `"sparsecomp::x"`) or op object."""
    bare = _lookup_name(op)
    if bare is None:
        known = ", ".join(sorted(_REGISTRY)) or "none yet"
        raise SparsecompError(f"{op!r} is not a registered sparsecomp op", hint=f"registered ops: {known}")
    return _REGISTRY[bare]


def reference_impl(op: str | torch._ops.OpOverload | torch._ops.OpOverloadPacket) -> Callable[..., Any]:
    """The plain-PyTorch reference implementation of a sparsecomp op (see `op_def`)."""
    return op_def(op).reference


class _ReferenceInterpreter(torch.fx.Interpreter):
    def call_function(self, target, args, kwargs):
        if is_sparsecomp_op(target):
            return reference_impl(target)(*args, **kwargs)
        return super().call_function(target, args, kwargs)


def run_on_reference(gm: torch.fx.GraphModule, *args: Any) -> Any:
    """Run an FX graph with every sparsecomp op replaced by its reference implementation.

    This is the verification reference once a lossy pass ran (DESIGN.md, "Verify semantics"):
    whatever kernel a backend registered or swapped in, the result here follows the
    definitions. `args` are the graph's flat placeholder values.
    """
    with torch.no_grad():
        return _ReferenceInterpreter(gm).run(*args)
