"""The one pass registry.

A pass is a plain function over a `torch.fx.GraphModule`:

    @register_pass("find-mlps", kind="analysis")
    def find_mlps(gm, ctx, *, min_hidden: int = 1) -> PassResult:
        '''One-line summary.

        Requires: ...
        Ensures: ...
        Options:
          min_hidden: ...
        '''

Its typed options are its keyword-only parameters (type from the annotation, default from the
signature), so the options a pipeline string may set, their types and defaults can never drift
from the code. The docstring must state what the pass *Requires* and *Ensures* (checked at
registration), which is what `sparsecomp passes NAME` prints.

The registry lives in the core; the built-in passes live in `sparsecomp.passes` and register
themselves when that package is imported. The core never imports a pass by symbol: lookups load
the built-in pass package by name on first use (the same plugin boundary an entry point would be).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, get_args, get_origin

from sparsecomp.errors import PipelineError, SparsecompError

__all__ = [
    "Bounds",
    "PassKind",
    "PassOption",
    "PassInfo",
    "PassResult",
    "register_pass",
    "unregister_pass",
    "get_pass",
    "all_passes",
]

# Packages whose import registers passes (built-ins; a plugin could append its own).
PASS_PACKAGES: list[str] = ["sparsecomp.passes"]

_REGISTRY: dict[str, "PassInfo"] = {}
_loaded = False
_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_OPTION_TYPES = (int, float, bool, str)


class PassKind(str, enum.Enum):
    ANALYSIS = "analysis"  # annotates node.meta / ctx.results, never changes the graph
    REWRITE = "rewrite"  # lossless graph rewrite
    SPARSIFY = "sparsify"  # lossy: creates sparsity, runs only when asked
    LOWERING = "lowering"  # backend-specific lowering


@dataclass(frozen=True)
class Bounds:
    """The range an int / float option may take, declared on the pass function's parameter as
    `typing.Annotated[int, Bounds(lo=1)]` and checked when a pipeline is parsed, so a value out of
    range is a clear error naming the pass and option before any work (not a crash or a silently
    odd result deep inside the pass). Float options are also always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself excluded
    hi_open: bool = False

    def ok(self, v) -> bool:
        return ((self.lo is None or (v > self.lo if self.lo_open else v >= self.lo))
                and (self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)))

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


@dataclass(frozen=True)
class PassOption:
    """One typed option of a pass (a keyword-only parameter of its function)."""

    name: str
    type: Any  # int | float | bool | str | Literal[...]
    default: Any
    doc: str = ""
    bounds: Bounds | None = None

    @property
    def type_name(self) -> str:
        if get_origin(self.type) is Literal:
            return "|".join(str(a) for a in get_args(self.type))
        return self.type.__name__ + (f" {self.bounds.describe()}" if self.bounds else "")

    def parse(self, raw: str, pass_name: str) -> Any:
        """Convert the option's text from a pipeline string to its typed value."""
        t = self.type
        bad = PipelineError(
            f"option '{self.name}' of pass '{pass_name}' expects {self.type_name}, got '{raw}'",
            hint=f"e.g. {pass_name}{{{self.name}={self.default!s}}}" if self.default is not None else None,
        )
        if get_origin(t) is Literal:
            choices = [str(a) for a in get_args(t)]
            if raw not in choices:
                raise bad
            return get_args(t)[choices.index(raw)]
        if t is bool:
            if raw.lower() in ("true", "1", "yes"):
                return True
            if raw.lower() in ("false", "0", "no"):
                return False
            raise bad
        if t is str:
            return raw
        try:
            value = t(raw)
        except ValueError:
            raise bad from None
        if (t is float and not math.isfinite(value)) or (self.bounds and not self.bounds.ok(value)):
            raise PipelineError(f"option '{self.name}' of pass '{pass_name}' must be "
                                f"{'a finite number' if not self.bounds else self.bounds.describe()}, got '{raw}'",
                                hint=f"e.g. {pass_name}{{{self.name}={self.default!s}}}")
        return value


@dataclass
class PassResult:
    """What a pass returns: whether it changed the graph, and match statistics for `--timing`."""

    modified: bool = False
    stats: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str
    kind: PassKind
    fn: Callable[..., PassResult | bool | None]
    options: dict[str, PassOption]
    doc: str
    module: str
    lossy: bool | Callable[[dict[str, Any]], bool] = False  # (sparsify passes always are)

    def is_lossy(self, options: dict[str, Any]) -> bool:
        """Whether the pass, run with these typed options, changes the model's function (then
        verification takes its output as the new reference: DESIGN.md section 2)."""
        if self.kind is PassKind.SPARSIFY:
            return True
        return bool(self.lossy(options)) if callable(self.lossy) else bool(self.lossy)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    def section(self, title: str) -> str:
        """Text of a docstring section such as 'Requires' or 'Ensures'."""
        return _doc_sections(self.doc).get(title, "")

    def resolve_options(self, raw: dict[str, str]) -> dict[str, Any]:
        """Typed option values for a pipeline entry: defaults overridden by `raw` text."""
        values = {name: opt.default for name, opt in self.options.items()}
        for key, text in raw.items():
            if key not in self.options:
                valid = ", ".join(f"{o.name}: {o.type_name}" for o in self.options.values()) or "none"
                raise PipelineError(
                    f"pass '{self.name}' has no option '{key}'",
                    hint=f"valid options: {valid} (see `sparsecomp passes {self.name}`)",
                )
            values[key] = self.options[key].parse(text, self.name)
        return values


def _doc_sections(doc: str) -> dict[str, str]:
    """Split a docstring into 'Title:' sections (Requires, Ensures, Options, ...)."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in inspect.cleandoc(doc or "").splitlines():
        m = re.match(r"^([A-Z][A-Za-z ]+):\s*(.*)$", line)
        if m and m.group(1) in ("Requires", "Ensures", "Options", "Rules", "Why"):
            current = m.group(1)
            sections[current] = [m.group(2)] if m.group(2) else []
        elif current is not None:
            sections[current].append(line.strip())
    return {k: "\n".join(v).strip() for k, v in sections.items()}


def _option_docs(doc: str) -> dict[str, str]:
    """Each option's text in the docstring's 'Options:' section: its `name: text` line and the
    lines indented deeper below it."""
    docs: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Options:"), None)
    if start is None:
        return docs
    name, indent = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        m = re.match(r"^(\w+):\s*(.*)$", line.strip())
        if indent is None and m:
            indent = depth
        if depth == indent and m:
            name = m.group(1)
            docs[name] = m.group(2)
        elif indent is not None and depth > indent and name is not None:
            docs[name] += " " + line.strip()
        else:  # back at the section's level or above: the next section
            break
    return docs


def register_pass(name: str, kind: str | PassKind, *, lossy: bool | Callable[[dict[str, Any]], bool] = False):
    """Decorator registering `fn(gm, ctx, *, options...)` as pass `name`. `lossy`: whether it
    changes the model's function, or a function of its typed options saying so (a rewrite with a
    lossy mode); sparsify passes are lossy whatever this says."""
    kind = PassKind(kind)

    def deco(fn):
        if not _NAME_RE.match(name):
            raise SparsecompError(f"pass name '{name}' must be kebab-case (e.g. 'sparse-linear')")
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise SparsecompError(f"pass '{name}' is registered twice ({_REGISTRY[name].module} and {fn.__module__})")
        doc = inspect.getdoc(fn) or ""
        sections = _doc_sections(doc)
        for required in ("Requires", "Ensures"):
            if required not in sections:
                raise SparsecompError(f"pass '{name}' ({fn.__module__}) must document '{required}:' in its docstring")
        hints = typing.get_type_hints(fn, include_extras=True)
        opt_docs = _option_docs(doc)
        options: dict[str, PassOption] = {}
        for p in inspect.signature(fn).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            t, bounds = hints.get(p.name, str), None
            if get_origin(t) is Annotated:
                t, *extras = get_args(t)
                bounds = next((e for e in extras if isinstance(e, Bounds)), None)
            if t not in _OPTION_TYPES and get_origin(t) is not Literal:
                raise SparsecompError(f"option '{p.name}' of pass '{name}' has unsupported type {t!r}")
            if p.default is inspect.Parameter.empty:
                raise SparsecompError(f"option '{p.name}' of pass '{name}' needs a default")
            if bounds is not None and (t not in (int, float) or not bounds.ok(p.default)):
                raise SparsecompError(f"option '{p.name}' of pass '{name}': Bounds need an int / float option whose "
                                      f"default is {bounds.describe()}")
            options[p.name] = PassOption(p.name, t, p.default, opt_docs.get(p.name, ""), bounds)
        _REGISTRY[name] = PassInfo(name, kind, fn, options, doc, fn.__module__, lossy)
        fn.pass_info = _REGISTRY[name]
        return fn

    return deco


def unregister_pass(name: str) -> None:
    """Remove pass `name` (for tests and plugins that register a pass for a while); unknown: no-op."""
    info = _REGISTRY.pop(name, None)
    if info is not None and getattr(info.fn, "pass_info", None) is info:
        del info.fn.pass_info


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for pkg in PASS_PACKAGES:
            importlib.import_module(pkg)


def get_pass(name: str) -> PassInfo:
    """The registered pass `name`; unknown names get the list of valid ones."""
    _load_builtin()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = (f"did you mean '{close[0]}'? " if close else "") + "valid passes: " + ", ".join(sorted(_REGISTRY))
        raise PipelineError(f"unknown pass '{name}'", hint=hint)
    return _REGISTRY[name]


def all_passes() -> list[PassInfo]:
    """Every registered pass, sorted by kind then name."""
    _load_builtin()
    order = list(PassKind)
    return sorted(_REGISTRY.values(), key=lambda p: (order.index(p.kind), p.name))
