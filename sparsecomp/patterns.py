"""Weight patterns: one spelling, imposing them on weights, and measuring them.

A *weight pattern* says where the zeros of a weight are allowed to be. sparsecomp spells it the
same way everywhere (API, CLI, reports, JSON; DESIGN.md section 2):

    unstructured:S     any S fraction of the entries is zero              e.g. unstructured:0.9
    block:RxC:S        S fraction of the RxC tiles is entirely zero       e.g. block:16x1:0.9
    N:M                at most N nonzeros in every group of M             e.g. 2:4, 4:8

`S` is the fraction of zeros, in [0, 1).

Orientation. Every weight is seen as a 2-D matrix `[out_features, in_features]` (rows are outputs);
a convolution weight `[out, in, kh, kw]` is seen as `[out, in*kh*kw]`, the matrix its im2col
matmul multiplies by. In `RxC`, R runs along rows (out_features) and C along columns
(in_features). N:M groups are M *consecutive input columns within one row*: this is the layout
the N:M hardware and our NM format use, since a group then multiplies M consecutive entries of
the input vector.

Edges. Shapes need not be divisible by the block or by M: tiles and groups at the right/bottom
edge are zero-padded. Padding never counts as a weight (it cannot be "kept"), but it does make an
edge tile's L1 norm smaller, so edge tiles are somewhat more likely to be chosen for zeroing.

Determinism. Imposing is exact and deterministic: `unstructured:S` zeroes exactly `round(S*n)`
entries and `block:RxC:S` exactly `round(S*n_blocks)` tiles (Python's `round`, i.e. half to
even), ties broken by the lower flat index. Entries that are already zero rank as the smallest
and so count towards the quota naturally: imposing twice gives the same tensor as imposing once.

NaN. For ranking, `|NaN|` counts as `+inf`: a NaN weight is the *last* thing zeroed, never
removed silently because NaN compares false with everything. Measurements count NaN as nonzero.

All measurements are vectorised torch reductions (no Python loop over entries, rows or blocks),
so analysis can call them on every layer of a model: a 768x3072 weight takes a few ms.
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import PatternError

__all__ = [
    "WeightPattern",
    "parse_pattern",
    "impose_pattern",
    "impose",
    "imposable_layers",
    "density",
    "zero_rows",
    "zero_cols",
    "block_occupancy",
    "nm_conformance",
    "smallest_k_mask",
]

_SPELLINGS = "unstructured:S (e.g. unstructured:0.9), block:RxC:S (e.g. block:16x1:0.9), N:M (e.g. 2:4, 4:8), with S the fraction of zeros in [0, 1)"

# Layer types whose weight is a [out, in(, k...)] matrix that impose() may rewrite. Embeddings
# and norms are deliberately absent: their weights are lookup tables / scales, not matmuls.
# ConvTranspose is absent too: its weight is [in, out, ...], the opposite orientation.
_IMPOSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class WeightPattern:
    """A parsed weight pattern; `str(p)` is its canonical spelling and `parse_pattern(str(p)) == p`.

    kind:      "unstructured" | "block" | "nm"
    sparsity:  fraction of zeros in [0, 1) for unstructured/block, None for nm
    block:     (R, C) for block (R along out_features, C along in_features), else None
    n, m:      for nm (0 < n < m), else None
    """

    kind: str
    sparsity: float | None = None
    block: tuple[int, int] | None = None
    n: int | None = None
    m: int | None = None

    def __post_init__(self) -> None:
        # Validate here so that every WeightPattern, however built, prints to a spelling that
        # parses back to it.
        if self.kind in ("unstructured", "block"):
            s = self.sparsity
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0.0 <= s < 1.0):
                raise PatternError(
                    f"{self.kind} pattern needs a sparsity S in [0, 1), got {s!r}",
                    hint="S is the fraction of zeros, e.g. unstructured:0.9",
                )
            object.__setattr__(self, "sparsity", float(s))
            if self.n is not None or self.m is not None:
                raise PatternError(f"{self.kind} pattern takes no n/m, got n={self.n!r} m={self.m!r}", hint=_SPELLINGS)
            if self.kind == "unstructured":
                if self.block is not None:
                    raise PatternError(f"unstructured pattern takes no block, got {self.block!r}", hint=_SPELLINGS)
            else:
                b = tuple(self.block) if isinstance(self.block, list) else self.block
                object.__setattr__(self, "block", b)
                if (
                    not isinstance(b, tuple)
                    or len(b) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in b)
                ):
                    raise PatternError(
                        f"block pattern needs a block (R, C) of two positive ints, got {b!r}",
                        hint="e.g. block:16x1:0.9 (R along out_features, C along in_features)",
                    )
        elif self.kind == "nm":
            n, m = self.n, self.m
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not (0 < n < m):
                raise PatternError(f"N:M pattern needs integers 0 < N < M, got N={n!r} M={m!r}", hint="e.g. 2:4 or 4:8")
            if self.sparsity is not None or self.block is not None:
                raise PatternError("N:M pattern takes no sparsity or block", hint=_SPELLINGS)
        else:
            raise PatternError(
                f"unknown weight-pattern kind {self.kind!r}",
                hint="kind is one of 'unstructured', 'block', 'nm'; spellings: " + _SPELLINGS,
            )

    def __str__(self) -> str:
        # repr(float) is the shortest string that round-trips exactly, so parse(str(p)) == p.
        if self.kind == "unstructured":
            return f"unstructured:{self.sparsity!r}"
        if self.kind == "block":
            r, c = self.block  # type: ignore[misc]
            return f"block:{r}x{c}:{self.sparsity!r}"
        return f"{self.n}:{self.m}"


_INT = r"(\d+)"
_FLOAT = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_RE_UNSTRUCTURED = re.compile(rf"unstructured:{_FLOAT}", re.IGNORECASE)
_RE_BLOCK = re.compile(rf"block:{_INT}[xX]{_INT}:{_FLOAT}", re.IGNORECASE)
_RE_NM = re.compile(rf"{_INT}:{_INT}")


def parse_pattern(spec: str | WeightPattern) -> WeightPattern:
    """Parse a weight-pattern spelling (`unstructured:S`, `block:RxC:S`, `N:M`).

    A `WeightPattern` is returned unchanged, so callers can accept either. Raises `PatternError`
    naming the spec and listing the valid spellings when it is malformed or out of range.
    """
    if isinstance(spec, WeightPattern):
        return spec
    if not isinstance(spec, str):
        raise PatternError(f"weight pattern must be a string, got {type(spec).__name__}", hint=_SPELLINGS)
    text = spec.strip()
    try:
        if mt := _RE_UNSTRUCTURED.fullmatch(text):
            return WeightPattern("unstructured", sparsity=float(mt.group(1)))
        if mt := _RE_BLOCK.fullmatch(text):
            return WeightPattern("block", sparsity=float(mt.group(3)), block=(int(mt.group(1)), int(mt.group(2))))
        if mt := _RE_NM.fullmatch(text):
            return WeightPattern("nm", n=int(mt.group(1)), m=int(mt.group(2)))
    except PatternError as e:
        # Re-raise with the user's own text in the message: that is what they need to fix.
        raise PatternError(f"bad weight pattern {spec!r}: {e.message}", hint=_SPELLINGS) from None
    raise PatternError(f"bad weight pattern {spec!r}", hint=f"valid spellings: {_SPELLINGS}")


# --------------------------------------------------------------------------------------------
# 2-D view and padding helpers


def _as_2d(w: torch.Tensor, what: str = "weight") -> torch.Tensor:
    """The [out, in*k...] matrix view of a Linear/Conv weight (a view when w is contiguous)."""
    if not isinstance(w, torch.Tensor):
        raise PatternError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() < 2:
        raise PatternError(
            f"{what} must have at least 2 dims ([out, in] or a conv [out, in, k...]), got shape {tuple(w.shape)}",
            hint="weight patterns apply to Linear and Conv weights, not biases or norms",
        )
    return w.reshape(w.shape[0], -1)


def _pad2d(w: torch.Tensor, rows: int, cols: int, value: float = 0.0) -> torch.Tensor:
    """Pad a 2-D tensor at the bottom/right up to multiples of (rows, cols)."""
    o, i = w.shape
    pr, pc = (-o) % rows, (-i) % cols
    if pr == 0 and pc == 0:
        return w
    return torch.nn.functional.pad(w, (0, pc, 0, pr), value=value)


def _rank_key(w: torch.Tensor) -> torch.Tensor:
    """|w| in float32 (or float64 for float64), with |NaN| ranked as +inf."""
    a = w.abs()
    if a.dtype != torch.float64:
        a = a.float()
    return torch.nan_to_num(a, nan=math.inf)


def smallest_k_mask(key: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k smallest entries of the 1-D `key`, ties broken by lower index.

    kthvalue + cumsum over the ties is O(n) and exactly reproduces a stable sort's choice,
    without sorting millions of entries.
    """
    n = key.numel()
    if k <= 0:
        return torch.zeros_like(key, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(key, dtype=torch.bool)
    t = torch.kthvalue(key, k).values
    less = key < t
    eq = key == t
    need = k - int(less.sum())
    return less | (eq & (torch.cumsum(eq, 0) <= need))


def _check_block(r: int, c: int) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (r, c)):
        raise PatternError(f"block shape must be two positive ints, got {r!r}x{c!r}", hint="e.g. 16x1 or 4x4")


def _check_nm(n: int, m: int) -> None:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not (0 < n < m):
        raise PatternError(f"N:M needs integers 0 < N < M, got {n!r}:{m!r}", hint="e.g. 2:4 or 4:8")


# --------------------------------------------------------------------------------------------
# Imposing


def impose_pattern(weight: torch.Tensor, pattern: str | WeightPattern) -> torch.Tensor:
    """Return a copy of `weight` (same shape and dtype) with `pattern` imposed.

    - `unstructured:S` zeroes exactly `round(S*numel)` entries with the smallest |w|;
    - `block:RxC:S` zeroes exactly `round(S*n_blocks)` RxC tiles (edge tiles zero-padded) with the
      smallest L1 norm;
    - `N:M` keeps the N largest |w| in each group of M consecutive in_features entries of a row;
      a tail group shorter than M keeps min(N, its length).

    Ties go to the lower index (the entry at the lower flat index is zeroed first); |NaN| ranks
    as +inf. 4-D (and 3-D) conv weights are handled through their `[out, in*k...]` view.
    """
    p = parse_pattern(pattern)
    if weight.is_meta:
        raise PatternError("cannot impose a pattern on a meta tensor (it has no values)",
                           hint="load real weights first, e.g. model.to_empty(device='cpu') then load_state_dict")
    w2 = _as_2d(weight)
    o, i = w2.shape
    if w2.numel() == 0:
        return weight.clone()

    if p.kind == "unstructured":
        k = round(p.sparsity * w2.numel())  # type: ignore[operator]
        zero = smallest_k_mask(_rank_key(w2).reshape(-1), k).view(o, i)
    elif p.kind == "block":
        r, c = p.block  # type: ignore[misc]
        a = _pad2d(_rank_key(w2), r, c)
        rb, cb = a.shape[0] // r, a.shape[1] // c
        # sum of +inf stays +inf, so a tile holding a NaN ranks last
        norms = a.view(rb, r, cb, c).sum(dim=(1, 3))
        k = round(p.sparsity * norms.numel())  # type: ignore[operator]
        zb = smallest_k_mask(norms.reshape(-1), k).view(rb, 1, cb, 1)
        zero = zb.expand(rb, r, cb, c).reshape(rb * r, cb * c)[:o, :i]
    else:
        n, m = p.n, p.m
        # padding ranks below every real entry (|w| >= 0), so a short tail group keeps its own
        a = _pad2d(_rank_key(w2), 1, m, value=-1.0)
        g = a.shape[1] // m
        groups = a.view(o, g, m)
        # stable descending sort: among equal magnitudes the lower index is kept
        order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., :n], True)
        zero = ~keep.view(o, g * m)[:, :i]

    out = w2.masked_fill(zero, 0)
    return out.reshape(weight.shape)


def imposable_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers `impose` can touch (Linear, Conv1d, Conv2d and subclasses)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, _IMPOSABLE)]


def impose(model: nn.Module, spec: str | WeightPattern, layers: str | None = None) -> list[str]:
    """Impose a weight pattern in place on the model's Linear/Conv1d/Conv2d layers.

    `layers` is an fnmatch glob over qualified module names (`"encoder.*.fc1"`, `"*.ffn.*"`);
    None means every such layer. Embeddings and norms are never touched. Returns the qualified
    names imposed, in module order. Raises `PatternError` if the glob matches no layer, or before
    changing any weight if one of the chosen layers cannot take the pattern (a lazy or
    parametrized weight).
    """
    if not isinstance(model, nn.Module):
        raise PatternError(f"impose expects a torch.nn.Module, got {type(model).__name__}",
                           hint="for a zoo model: model, example = sparsecomp.models.get(name); then impose(model, spec)")
    if layers is not None and not isinstance(layers, str):
        raise PatternError(f"layers must be one glob string (e.g. 'encoder.*.fc1'), got {type(layers).__name__}",
                           hint="match several names with one glob: '*.fc1', 'layer.[0-3].*'")
    p = parse_pattern(spec)
    candidates = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, _IMPOSABLE)]
    if not candidates:
        raise PatternError(
            f"model {type(model).__name__} has no Linear/Conv1d/Conv2d layer to impose {p} on",
            hint="weight patterns apply to Linear and Conv1d/Conv2d weights only",
        )
    chosen = candidates if layers is None else [(n, m) for n, m in candidates if fnmatch.fnmatchcase(n, layers)]
    if not chosen:
        names = [n for n, _ in candidates]
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        raise PatternError(
            f"layer glob {layers!r} matches no Linear/Conv layer",
            hint=f"available layers: {shown}",
        )
    for name, mod in chosen:  # every layer checked before any weight changes
        if parametrize.is_parametrized(mod, "weight"):
            # mod.weight is recomputed from the parametrization's own tensors on every access:
            # writing zeros into it would not stick (and would silently impose nothing)
            raise PatternError(
                f"layer {name!r} has a parametrized weight (e.g. weight_norm): a pattern written into it would not stick",
                hint=f"remove the parametrization first: torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule({name!r}), 'weight')",
            )
        if isinstance(mod.weight, nn.parameter.UninitializedParameter):
            raise PatternError(
                f"layer {name!r} has an uninitialized (lazy) weight",
                hint="run one forward pass to materialize lazy layers before imposing a pattern",
            )
        if mod.weight.is_meta:  # no values to rank (and selecting the smallest would fail deep in torch)
            raise PatternError(
                f"layer {name or type(mod).__name__!r} has its weight on the meta device (no values)",
                hint="load real weights first, e.g. model.to_empty(device='cpu') then load_state_dict",
            )
    with torch.no_grad():
        for name, mod in chosen:
            mod.weight.copy_(impose_pattern(mod.weight, p))
    return [n for n, _ in chosen]


# --------------------------------------------------------------------------------------------
# Measurements


def density(w: torch.Tensor) -> float:
    """Fraction of nonzero entries (NaN counts as nonzero); 0.0 for an empty tensor."""
    if w.numel() == 0:
        return 0.0
    return int(torch.count_nonzero(w)) / w.numel()


def _nonzero(w2: torch.Tensor) -> torch.Tensor:
    """The nonzero mask; a bool tensor is taken as the mask itself (callers measuring one weight
    several times pass its mask once: comparing a bool tensor with 0 again is a slow path)."""
    return w2 if w2.dtype == torch.bool else w2 != 0


def zero_rows(w: torch.Tensor) -> int:
    """Number of all-zero rows (output features) of the `[out, in*k...]` view (or of a bool mask)."""
    w2 = _as_2d(w)
    return int(_nonzero(w2).any(dim=1).logical_not().sum())


def zero_cols(w: torch.Tensor) -> int:
    """Number of all-zero columns (input features, or conv `in*k` positions) of the 2-D view."""
    w2 = _as_2d(w)
    return int(_nonzero(w2).any(dim=0).logical_not().sum())


def block_occupancy(w: torch.Tensor, r: int, c: int) -> float:
    """Fraction of RxC tiles (zero-padded at the edges) that hold at least one nonzero.

    R runs along out_features (rows), C along in_features (columns). 0.0 for an empty tensor.
    """
    _check_block(r, c)
    w2 = _as_2d(w)
    if w2.numel() == 0:
        return 0.0
    nz = _pad2d(_nonzero(w2), r, c)
    rb, cb = nz.shape[0] // r, nz.shape[1] // c
    occupied = nz.view(rb, r, cb, c).any(dim=3).any(dim=1)
    return int(occupied.sum()) / occupied.numel()


def nm_conformance(w: torch.Tensor, n: int, m: int) -> float:
    """Fraction of N:M groups (M consecutive in_features entries of a row, tail zero-padded)
    holding at most N nonzeros. 1.0 means the weight packs as N:M; 1.0 for an empty tensor."""
    _check_nm(n, m)
    w2 = _as_2d(w)
    if w2.numel() == 0:
        return 1.0
    nz = _pad2d(_nonzero(w2), 1, m)
    # count in the narrowest integer that holds M (a bool sum accumulates in int64: 8x slower)
    counts = nz.view(w2.shape[0], -1, m).to(torch.uint8 if m < 256 else torch.int32).sum(dim=-1, dtype=torch.uint8 if m < 256 else torch.int32)
    return int((counts <= n).sum()) / counts.numel()
