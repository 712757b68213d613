"""What a sparsification run is asked to do: `SparsifyConfig`, its one spelling, and its errors.

Spelling (DESIGN.md section 2): `METHOD:SPEC`, where SPEC is a weight pattern (`sparsecomp.patterns`):

    magnitude:unstructured:0.5     sparsegpt:2:4     wanda:4:8     magnitude:block:16x1:0.9

Options beyond method and pattern (allocation, skip globs, SparseGPT's damping, the refinements)
are fields of `SparsifyConfig`; `str(config)` is the `METHOD:SPEC` spelling, `config.describe()`
adds every option that differs from its default, so reports and errors name exactly what ran.
"""

from __future__ import annotations

import fnmatch
import numbers
from dataclasses import dataclass, field, replace
from typing import Iterable

from sparsecomp.errors import PatternError, SparsecompError
from sparsecomp.patterns import WeightPattern, parse_pattern

__all__ = [
    "METHODS",
    "ALLOCATIONS",
    "DEFAULT_SKIP",
    "SparsifyError",
    "SparsifyConfig",
    "parse_sparsify_spec",
    "resolve_pattern",
    "skipped_by",
]

METHODS = ("magnitude", "wanda", "sparsegpt")
ALLOCATIONS = ("uniform", "owl", "sensitivity")

# Layers that are not pruned unless the caller says otherwise (`skip=` replaces this list).
# Output heads (LM heads, classifiers, pooler, ViT `head`) map features to the task's outputs: a
# small, very sensitive share of the weights that every published recipe leaves dense. Embeddings
# are not matmul sites at all; a Linear whose weight is *tied* to an embedding is skipped on top of
# these globs (see `engine.plan`).
DEFAULT_SKIP: tuple[str, ...] = ("*lm_head*", "*classifier*", "*pooler*", "head", "*.head", "*_head", "*embed*", "score", "*.score")

_OPTION_HINT = {
    "damp": "damp in [0, 1): SparseGPT's Hessian damping, a fraction of the mean diagonal (default 0.01)",
    "blocksize": "blocksize >= 1: SparseGPT's lazy-update block in columns (default 128)",
    "refine": "refine >= 0: conjugate-gradient steps after SparseGPT (default 0: off)",
    "owl_m": "owl_m > 0: OWL's outlier threshold, a multiple of the mean score (default 5)",
    "owl_lambda": "owl_lambda in [0, 0.5): OWL's spread of layer sparsities (default 0.08)",
    "correct": "correct=True or False",
    "update_bias": "update_bias=True or False",
}

_SPELLING = "METHOD:SPEC with METHOD in magnitude|wanda|sparsegpt, e.g. sparsegpt:unstructured:0.5, wanda:2:4, magnitude:block:16x1:0.9"


class SparsifyError(SparsecompError):
    """A sparsification request that cannot be carried out (bad spec, calibration, model)."""


@dataclass(frozen=True)
class SparsifyConfig:
    """One sparsification request.

    method:     magnitude | wanda | sparsegpt.
    pattern:    the weight pattern (`WeightPattern`): unstructured:S, block:RxC:S or N:M. For
                unstructured/block, S is the global target (exact per layer with `uniform`
                allocation, exact over all pruned layers otherwise).
    allocation: uniform | owl | sensitivity (per-layer sparsities; unstructured and block only).
    skip:       fnmatch globs over qualified layer names left dense (`DEFAULT_SKIP` by default).
    damp:       SparseGPT's Hessian damping, a fraction of the mean diagonal (grown x10 on failure).
    blocksize:  SparseGPT's lazy-update block (columns).
    correct:    SparseGPT targets the *dense* model's layer outputs (not the pruned model's own
                input times the dense weight), so errors from earlier layers are compensated.
    update_bias: SparseGPT treats the bias as one more (never pruned) column: it absorbs the mean
                of the error.
    refine:     after SparseGPT, this many conjugate-gradient steps of the exact masked
                least-squares problem per layer (0: off).
    owl_m, owl_lambda: OWL's outlier threshold (M x mean score) and sparsity spread (+-lambda).
    """

    method: str = "sparsegpt"
    pattern: WeightPattern = field(default_factory=lambda: WeightPattern("unstructured", sparsity=0.5))
    allocation: str = "uniform"
    skip: tuple[str, ...] = DEFAULT_SKIP
    damp: float = 0.01
    blocksize: int = 128
    correct: bool = False
    update_bias: bool = False
    refine: int = 0
    owl_m: float = 5.0
    owl_lambda: float = 0.08

    def __post_init__(self) -> None:
        if isinstance(self.method, str):  # "SparseGPT" as "SparseGPT:2:4" is (parse_sparsify_spec lowercases)
            object.__setattr__(self, "method", self.method.strip().lower())
        if self.method not in METHODS:
            raise SparsifyError(f"unknown sparsify method {self.method!r}", hint=f"methods: {', '.join(METHODS)}")
        if not isinstance(self.pattern, WeightPattern):
            object.__setattr__(self, "pattern", _pattern_or_error(self.pattern))
        if self.allocation not in ALLOCATIONS:
            raise SparsifyError(f"unknown allocation {self.allocation!r}", hint=f"allocations: {', '.join(ALLOCATIONS)}")
        if self.allocation != "uniform" and self.pattern.kind == "nm":
            raise SparsifyError(
                f"allocation {self.allocation!r} cannot apply to {self.pattern}: N:M fixes every layer's sparsity at 1-N/M",
                hint="use allocation='uniform' with N:M, or an unstructured / block pattern",
            )
        try:
            skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        except TypeError:  # not iterable (skip=3)
            skip = None
        if skip is None or not all(isinstance(s, str) and s for s in skip):
            raise SparsifyError(f"skip must be a layer-name glob or a list of them, got {self.skip!r}",
                                hint='e.g. skip=["*lm_head*", "encoder.layer.0.*"]')
        object.__setattr__(self, "skip", tuple(skip))
        # types first: a float blocksize or a string damp would fail deep inside the solver otherwise
        for name, kind in (("damp", "a number"), ("blocksize", "an integer"), ("refine", "an integer"),
                           ("owl_m", "a number"), ("owl_lambda", "a number"), ("correct", "a bool"), ("update_bias", "a bool")):
            value = getattr(self, name)
            ok = (isinstance(value, bool) if kind == "a bool" else
                  isinstance(value, numbers.Integral) and not isinstance(value, bool) if kind == "an integer" else
                  isinstance(value, numbers.Real) and not isinstance(value, bool))
            if not ok:
                raise SparsifyError(f"sparsify option {name} must be {kind}, got {value!r} ({type(value).__name__})",
                                    hint=_OPTION_HINT[name])
        if not (0.0 <= self.damp < 1.0) or self.blocksize < 1 or self.refine < 0:
            raise SparsifyError(f"bad SparseGPT options damp={self.damp} blocksize={self.blocksize} refine={self.refine}",
                                hint="damp in [0, 1) (default 0.01), blocksize >= 1 (default 128), refine >= 0")
        if self.owl_m <= 0 or not (0.0 <= self.owl_lambda < 0.5):
            raise SparsifyError(f"bad OWL options owl_m={self.owl_m} owl_lambda={self.owl_lambda}",
                                hint="owl_m > 0 (default 5), owl_lambda in [0, 0.5) (default 0.08)")

    @property
    def needs_calibration(self) -> bool:
        """Wanda, SparseGPT and the data-driven allocations read activations."""
        return self.method != "magnitude" or self.allocation != "uniform"

    def __str__(self) -> str:
        return f"{self.method}:{self.pattern}"

    def describe(self) -> str:
        """`METHOD:SPEC` plus every option that differs from its default, e.g. `sparsegpt:2:4{refine=20}`."""
        default = SparsifyConfig(self.method, self.pattern)
        opts = []
        for name in ("allocation", "damp", "blocksize", "correct", "update_bias", "refine", "owl_m", "owl_lambda", "skip"):
            value = getattr(self, name)
            if value != getattr(default, name):
                opts.append(f"{name}={','.join(value) if name == 'skip' else value}")
        return str(self) + ("{" + ",".join(opts) + "}" if opts else "")

    def with_options(self, **kw) -> "SparsifyConfig":
        return replace(self, **kw)


def _pattern_or_error(spec) -> WeightPattern:
    try:
        return parse_pattern(spec)
    except PatternError as err:
        raise SparsifyError(err.message, hint=err.hint) from None


def resolve_pattern(pattern: str | WeightPattern, sparsity: float | None) -> WeightPattern:
    """The pattern from the API's (pattern, sparsity) pair.

    `pattern` is a full spec (`unstructured:0.5`, `block:16x1:0.9`, `2:4`) or a kind without S
    (`unstructured`, `block:16x1`), which then takes `sparsity` (default 0.5). Contradictions
    (a spec's S differing from `sparsity`, a sparsity with N:M other than 1-N/M) are errors.
    """
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not (0.0 <= float(sparsity) < 1.0):
            raise SparsifyError(f"sparsity must be a fraction of zeros in [0, 1), got {sparsity!r}",
                                hint="e.g. sparsity=0.5 for half the weights zero")
    if isinstance(pattern, WeightPattern):
        p = pattern
    elif not isinstance(pattern, str):
        raise SparsifyError(f"pattern must be a string such as 'unstructured', '2:4' or 'block:16x1', got {type(pattern).__name__}")
    else:
        text = pattern.strip()
        low = text.lower()
        if low == "unstructured" or (low.startswith("block:") and low.count(":") == 1):
            text = f"{text}:{0.5 if sparsity is None else float(sparsity)!r}"
        p = _pattern_or_error(text)
    if sparsity is not None:
        if p.kind == "nm":
            if abs(float(sparsity) - (1 - p.n / p.m)) > 1e-9:
                raise SparsifyError(f"pattern {p} fixes the sparsity at {1 - p.n / p.m:g}, but sparsity={sparsity} was asked",
                                    hint="drop sparsity= with an N:M pattern")
        elif abs(float(sparsity) - p.sparsity) > 1e-12:
            raise SparsifyError(f"pattern {pattern!r} says sparsity {p.sparsity:g} but sparsity={sparsity} was asked",
                                hint="give the sparsity once: pattern='unstructured', sparsity=0.7 or pattern='unstructured:0.7'")
    return p


def parse_sparsify_spec(spec: str | SparsifyConfig, **options) -> SparsifyConfig:
    """Parse `METHOD:SPEC` (e.g. `sparsegpt:2:4`); a `SparsifyConfig` is returned unchanged.

    `options` set the other `SparsifyConfig` fields.
    """
    if isinstance(spec, SparsifyConfig):
        return replace(spec, **options) if options else spec
    if not isinstance(spec, str) or ":" not in spec:
        raise SparsifyError(f"bad sparsify spec {spec!r}", hint=_SPELLING)
    method, _, pattern = spec.strip().partition(":")
    method = method.strip().lower()
    if method not in METHODS:
        raise SparsifyError(f"bad sparsify spec {spec!r}: unknown method {method!r}", hint=_SPELLING)
    try:
        p = parse_pattern(pattern)
    except PatternError as err:
        raise SparsifyError(f"bad sparsify spec {spec!r}: {err.message}", hint=_SPELLING) from None
    return SparsifyConfig(method=method, pattern=p, **options)


def skipped_by(name: str, globs: Iterable[str]) -> str | None:
    """The first glob matching layer `name`, or None."""
    for g in globs:
        if fnmatch.fnmatchcase(name, g):
            return g
    return None
