"""Packed sparse weight formats: CSR, BSR (any block shape), SELL / ELL, N:M.

Every format is a small dataclass holding plain tensors, with the same face:

    F.pack(dense, **params) -> F          pack a 2-D `[out_features, in_features]` weight
    f.to_dense() -> Tensor                exact inverse: same shape, dtype and values
    f.nbytes() -> int                     bytes of all stored arrays
    F.estimate_nbytes(dense, **params)    the same number from counts, without packing
    f.shape                               the true (unpadded) `(out, in)`

`estimate_nbytes` exists so analysis can report "bytes in each format" for every layer of a
model without building every format; tests check it equals `pack(...).nbytes()`.

What is stored. An entry is stored when `dense != 0`, so NaN and inf are kept and `-0.0` is not
(it comes back as `+0.0`, which `torch.equal` treats as equal). Values keep the weight's dtype.
Packing and unpacking are vectorised torch (no Python loop over rows, blocks or entries).

Index dtypes (why narrow, and why never uint8 for indices into a dimension). Sparse kernels at
M = 1 are memory bound, and on a 90%-sparse weight the indices are as many bytes as the values,
so index width is a direct speed and size lever. The rule (`index_dtype`):

    column / block-column / row-permutation indices:  uint16 if every index fits (<= 65535),
                                                      else int32, else int64
    pointers (row_ptr, slice_ptr):                    int32 unless the count exceeds 2**31-1
    N:M metadata (position inside a group of M):      uint8 (so M <= 256)

torch 2.13 supports uint16 only for storage and conversion (no indexing, no comparisons), so
kernels and `to_dense` convert at use with `as_index(t)` (or once at lowering; torch's CSR `mv`
wants int32, see DESIGN.md section 3). uint16 is chosen over int16 because it covers
in_features up to 65536 (int16 only 32768). uint8 is *not* used for column indices even when
they would fit: torch indexing treats a uint8 tensor as a boolean mask, so a forgotten
conversion would silently compute garbage instead of failing loudly, as uint16 does.

Padding. Where a shape is not divisible by the block (BSR), the slice height (SELL) or M (N:M),
the weight is zero-padded internally; `shape` keeps the true shape and `to_dense` crops. Padding
slots hold value 0 and a valid in-range index (SELL: column 0; N:M: a position inside the
zero-padded group, which may lie past in_features in the tail group, so N:M kernels must pad the
input to a multiple of M or mask). Note that a kernel multiplying a padding 0 by an inf/NaN input
gives NaN, just as a dense matmul would.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from .errors import PatternError, SparsecompError

__all__ = [
    "CSR",
    "BSR",
    "SELL",
    "ELL",
    "NM",
    "FORMATS",
    "pack_format",
    "index_dtype",
    "pointer_dtype",
    "as_index",
]

_I32_MAX = 2**31 - 1


def index_dtype(max_value: int) -> torch.dtype:
    """Narrowest dtype for indices in [0, max_value]: uint16, else int32, else int64."""
    if max_value <= 65535:
        return torch.uint16
    if max_value <= _I32_MAX:
        return torch.int32
    return torch.int64


def pointer_dtype(max_value: int) -> torch.dtype:
    """dtype for offset arrays (row_ptr, slice_ptr) ending at max_value: int32 unless too big.

    Pointers stay signed 32-bit even when small: they are few (one per row), and int32 is what
    torch's CSR kernels and most hand-written kernels take without conversion.
    """
    return torch.int32 if max_value <= _I32_MAX else torch.int64


def as_index(t: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Convert stored (narrow) indices to a dtype torch can index with (int64 default, or int32)."""
    return t.to(dtype)


def _isize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_dense(dense: torch.Tensor, fmt: str) -> None:
    if not isinstance(dense, torch.Tensor):
        raise SparsecompError(f"{fmt}.pack needs a torch.Tensor, got {type(dense).__name__}")
    if dense.dim() != 2:
        raise SparsecompError(
            f"{fmt}.pack needs a 2-D [out_features, in_features] weight, got shape {tuple(dense.shape)}",
            hint="view a conv weight [out, in, kh, kw] as [out, in*kh*kw] with w.reshape(w.shape[0], -1)",
        )


def _check_pos_int(value: object, what: str, fmt: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SparsecompError(f"{fmt}: {what} must be a positive int, got {value!r}")
    return value


def _pad_to(dense: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom/right up to multiples of (rows, cols)."""
    pr, pc = (-dense.shape[0]) % rows, (-dense.shape[1]) % cols
    if pr == 0 and pc == 0:
        return dense
    return torch.nn.functional.pad(dense, (0, pc, 0, pr))


class _Format:
    """Shared behaviour: byte counting over the dataclass's tensor fields."""

    name: ClassVar[str]
    shape: tuple[int, int]
    values: torch.Tensor

    def arrays(self) -> dict[str, torch.Tensor]:
        """The stored arrays by field name (what a kernel or an exporter consumes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes of all stored arrays."""
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def __repr__(self) -> str:
        params = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if not isinstance(getattr(self, f.name), torch.Tensor)
        )
        arrays = ", ".join(f"{k}={tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" for k, v in self.arrays().items())
        return f"{type(self).__name__}({params}, {arrays}, nbytes={self.nbytes()})"


# ------------------------------------------------------------------------------------------------
# CSR


@dataclass(eq=False, repr=False)
class CSR(_Format):
    """Compressed sparse rows: `values[nnz]`, `col_idx[nnz]` (narrow), `row_ptr[out+1]`.

    Row r's entries are `values[row_ptr[r]:row_ptr[r+1]]`, in increasing column order.
    """

    name: ClassVar[str] = "csr"
    shape: tuple[int, int]
    values: torch.Tensor
    col_idx: torch.Tensor
    row_ptr: torch.Tensor

    @classmethod
    def pack(cls, dense: torch.Tensor) -> CSR:
        _check_dense(dense, "CSR")
        rows, cols = dense.shape
        mask = dense != 0
        # nonzero() is row-major, which is exactly CSR order
        idx = mask.nonzero()
        counts = torch.bincount(idx[:, 0], minlength=rows)
        nnz = idx.shape[0]
        row_ptr = torch.zeros(rows + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(counts, 0, out=row_ptr[1:])
        return cls(
            shape=(rows, cols),
            values=dense[mask],
            col_idx=idx[:, 1].to(index_dtype(cols - 1)),
            row_ptr=row_ptr.to(pointer_dtype(nnz)),
        )

    @staticmethod
    def estimate_nbytes(dense: torch.Tensor) -> int:
        _check_dense(dense, "CSR")
        rows, cols = dense.shape
        nnz = int(torch.count_nonzero(dense))
        return nnz * (dense.element_size() + _isize(index_dtype(cols - 1))) + (rows + 1) * _isize(pointer_dtype(nnz))

    def nnz(self) -> int:
        return self.values.numel()

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        counts = torch.diff(as_index(self.row_ptr))
        row = torch.repeat_interleave(torch.arange(rows, device=out.device), counts)
        out[row, as_index(self.col_idx)] = self.values
        return out


# ------------------------------------------------------------------------------------------------
# BSR


@dataclass(eq=False, repr=False)
class BSR(_Format):
    """Block sparse rows with any block shape `(r, c)`: r along out_features, c along in_features.

    `values` is `[nnzb, r, c]` (layout "rc", torch's order) or `[nnzb, c, r]` (layout "cr", so
    that a vector lane running along the block's rows is contiguous, as the fast TIR kernel in
    DESIGN.md wants). `col_idx[nnzb]` is the block-column index (narrow), `row_ptr[n_block_rows+1]`.
    A block is stored when any of its entries is nonzero. Shapes not divisible by the block are
    zero-padded; `shape` is the true shape.
    """

    name: ClassVar[str] = "bsr"
    shape: tuple[int, int]
    blocksize: tuple[int, int]
    layout: str
    values: torch.Tensor
    col_idx: torch.Tensor
    row_ptr: torch.Tensor

    @staticmethod
    def _check(blocksize: tuple[int, int], layout: str) -> tuple[int, int]:
        if not isinstance(blocksize, (tuple, list)) or len(blocksize) != 2:
            raise SparsecompError(f"BSR: blocksize must be (r, c), got {blocksize!r}", hint="e.g. blocksize=(16, 1)")
        r = _check_pos_int(blocksize[0], "block rows r", "BSR")
        c = _check_pos_int(blocksize[1], "block cols c", "BSR")
        if layout not in ("rc", "cr"):
            raise SparsecompError(f"BSR: layout must be 'rc' or 'cr', got {layout!r}", hint="'cr' stores each block transposed")
        return r, c

    @staticmethod
    def _grid(dense: torch.Tensor, r: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[rb, r, cb, c] view of the zero-padded weight, and its [rb, cb] block occupancy.

        Reducing over the unpermuted view keeps memory access contiguous (a permuted view made
        the occupancy reduction ~40x slower on 768x3072 with 16x1 blocks).
        """
        p = _pad_to(dense, r, c)
        rb, cb = p.shape[0] // r, p.shape[1] // c
        grid = p.view(rb, r, cb, c)
        occ = (grid != 0).any(dim=3).any(dim=1)
        return grid, occ

    @classmethod
    def pack(cls, dense: torch.Tensor, blocksize: tuple[int, int], layout: str = "rc") -> BSR:
        _check_dense(dense, "BSR")
        r, c = cls._check(blocksize, layout)
        grid, occ = cls._grid(dense, r, c)
        rb, cb = occ.shape
        idx = occ.nonzero()  # block-row-major, as BSR orders blocks
        # advanced indices on dims 0 and 2 (split by a slice) put the block dim first: [nnzb, r, c]
        values = grid[idx[:, 0], :, idx[:, 1], :]
        if layout == "cr":
            values = values.transpose(1, 2)
        nnzb = idx.shape[0]
        row_ptr = torch.zeros(rb + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(torch.bincount(idx[:, 0], minlength=rb), 0, out=row_ptr[1:])
        return cls(
            shape=tuple(dense.shape),
            blocksize=(r, c),
            layout=layout,
            values=values.contiguous(),
            col_idx=idx[:, 1].to(index_dtype(cb - 1)),
            row_ptr=row_ptr.to(pointer_dtype(nnzb)),
        )

    @staticmethod
    def estimate_nbytes(dense: torch.Tensor, blocksize: tuple[int, int], layout: str = "rc") -> int:
        _check_dense(dense, "BSR")
        r, c = BSR._check(blocksize, layout)
        _, occ = BSR._grid(dense, r, c)
        return BSR.bytes_for(tuple(dense.shape), (r, c), int(occ.sum()), dense.element_size())

    @staticmethod
    def bytes_for(shape: tuple[int, int], blocksize: tuple[int, int], nnzb: int, element_size: int) -> int:
        """Bytes of a BSR with `nnzb` stored blocks (values + narrow column indices + row pointers)."""
        r, c = blocksize
        rb, cb = -(-shape[0] // r), -(-shape[1] // c)
        return nnzb * (r * c * element_size + _isize(index_dtype(cb - 1))) + (rb + 1) * _isize(pointer_dtype(nnzb))

    def nnzb(self) -> int:
        return self.values.shape[0]

    def to_dense(self) -> torch.Tensor:
        r, c = self.blocksize
        rows, cols = self.shape
        rb, cb = -(-rows // r), -(-cols // c)
        vals = self.values if self.layout == "rc" else self.values.transpose(1, 2)
        blocks = torch.zeros((rb, cb, r, c), dtype=self.values.dtype, device=self.values.device)
        counts = torch.diff(as_index(self.row_ptr))
        brow = torch.repeat_interleave(torch.arange(rb, device=blocks.device), counts)
        blocks[brow, as_index(self.col_idx)] = vals
        return blocks.permute(0, 2, 1, 3).reshape(rb * r, cb * c)[:rows, :cols].contiguous()


# ------------------------------------------------------------------------------------------------
# SELL-C-sigma and ELL


@dataclass(eq=False, repr=False)
class SELL(_Format):
    """Sliced ELLPACK (SELL-C-sigma), the constant fan-in format.

    Rows are taken in groups ("slices") of `slice_height` C rows; each slice is padded to the
    largest nonzero count of its rows, its width w_s. Slice s occupies
    `values[slice_ptr[s]:slice_ptr[s+1]]` (length w_s * C) *column-major*: the j-th stored entry
    of the slice's i-th row sits at offset `j*C + i`, so one SIMD lane runs across C rows.
    `col_idx` has the same layout (narrow dtype); padding slots hold value 0 and column 0.

    With `sigma > 1`, rows are first sorted by decreasing nonzero count within windows of sigma
    consecutive rows (stable), so rows of similar length share a slice and less padding is
    stored; `row_perm[k]` is then the original row stored at packed position k (None when
    sigma == 1). A sigma that is a multiple of C is what helps; any positive sigma is correct.
    The last slice is padded with empty rows when out_features is not a multiple of C.
    """

    name: ClassVar[str] = "sell"
    shape: tuple[int, int]
    slice_height: int
    sigma: int
    values: torch.Tensor
    col_idx: torch.Tensor
    slice_ptr: torch.Tensor
    row_perm: torch.Tensor | None

    @staticmethod
    def _layout(mask: torch.Tensor, slice_height: int, sigma: int):
        """Row order and slice widths from the nonzero mask (shared by pack and estimate)."""
        rows = mask.shape[0]
        counts = mask.sum(dim=1)
        if sigma > 1 and rows > 1:
            # pad with -1 so padding rows sort after every real row and are easily dropped
            nw = -(-rows // sigma)
            key = torch.full((nw * sigma,), -1, dtype=counts.dtype, device=counts.device)
            key[:rows] = counts
            order = torch.sort(key.view(nw, sigma), dim=1, descending=True, stable=True).indices
            order = (order + torch.arange(nw, device=order.device).unsqueeze(1) * sigma).reshape(-1)
            perm = order[order < rows]
        else:
            perm = None
        pcounts = counts if perm is None else counts[perm]
        ns = -(-rows // slice_height)
        padded = torch.zeros(ns * slice_height, dtype=counts.dtype, device=counts.device)
        padded[:rows] = pcounts
        widths = padded.view(ns, slice_height).amax(dim=1) if ns else padded
        return perm, pcounts, widths

    @classmethod
    def _check(cls, slice_height: int, sigma: int) -> None:
        _check_pos_int(slice_height, "slice_height", cls.__name__)
        _check_pos_int(sigma, "sigma", cls.__name__)

    @classmethod
    def pack(cls, dense: torch.Tensor, slice_height: int = 16, sigma: int = 1) -> SELL:
        _check_dense(dense, cls.__name__)
        cls._check(slice_height, sigma)
        rows, cols = dense.shape
        C = slice_height
        mask = dense != 0
        perm, pcounts, widths = cls._layout(mask, C, sigma)
        pdense = dense if perm is None else dense[perm]
        pmask = mask if perm is None else mask[perm]
        slice_ptr = torch.zeros(widths.numel() + 1, dtype=torch.int64, device=dense.device)
        torch.cumsum(widths * C, 0, out=slice_ptr[1:])
        total = int(slice_ptr[-1])

        idx = pmask.nonzero()  # packed-row-major
        prow, col = idx[:, 0], idx[:, 1]
        row_start = torch.cumsum(pcounts, 0) - pcounts
        j = torch.arange(idx.shape[0], device=dense.device) - row_start[prow]  # rank within its row
        offset = slice_ptr[prow // C] + j * C + prow % C

        values = torch.zeros(total, dtype=dense.dtype, device=dense.device)
        values[offset] = pdense[pmask]
        col_idx = torch.zeros(total, dtype=torch.int64, device=dense.device)
        col_idx[offset] = col
        return cls(
            shape=(rows, cols),
            slice_height=C,
            sigma=sigma,
            values=values,
            col_idx=col_idx.to(index_dtype(cols - 1)),
            slice_ptr=slice_ptr.to(pointer_dtype(total)),
            row_perm=None if perm is None else perm.to(index_dtype(rows - 1)),
        )

    @classmethod
    def estimate_nbytes(cls, dense: torch.Tensor, slice_height: int = 16, sigma: int = 1) -> int:
        _check_dense(dense, cls.__name__)
        cls._check(slice_height, sigma)
        rows, cols = dense.shape
        perm, _, widths = cls._layout(dense != 0, slice_height, sigma)
        total = int(widths.sum()) * slice_height
        nbytes = total * (dense.element_size() + _isize(index_dtype(cols - 1)))
        nbytes += (widths.numel() + 1) * _isize(pointer_dtype(total))
        if perm is not None:
            nbytes += rows * _isize(index_dtype(rows - 1))
        return nbytes

    def slice_widths(self) -> torch.Tensor:
        """Width w_s (stored entries per row) of each slice, int64."""
        return torch.diff(as_index(self.slice_ptr)) // self.slice_height

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        C = self.slice_height
        sizes = torch.diff(as_index(self.slice_ptr))
        ns = sizes.numel()
        out = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        if self.values.numel() == 0:
            return out
        s = torch.repeat_interleave(torch.arange(ns, device=out.device), sizes)
        t = torch.arange(self.values.numel(), device=out.device) - as_index(self.slice_ptr)[s]
        prow = s * C + t % C
        # every stored real entry is nonzero (NaN included); padding slots are exactly 0
        real = self.values != 0
        row = prow[real]
        if self.row_perm is not None:
            row = as_index(self.row_perm)[row]
        out[row, as_index(self.col_idx)[real]] = self.values[real]
        return out


@dataclass(eq=False, repr=False)
class ELL(SELL):
    """ELLPACK: SELL with a single slice holding all rows (C = out_features, no sorting).

    Every row is padded to the largest row's nonzero count, `width`; `values` / `col_idx` are
    `[width * out]`, column-major; `values_2d()` gives the `[out, width]` view.
    """

    name: ClassVar[str] = "ell"

    @classmethod
    def pack(cls, dense: torch.Tensor) -> ELL:  # type: ignore[override]
        _check_dense(dense, "ELL")
        return super().pack(dense, slice_height=max(dense.shape[0], 1), sigma=1)  # type: ignore[return-value]

    @classmethod
    def estimate_nbytes(cls, dense: torch.Tensor) -> int:  # type: ignore[override]
        return super().estimate_nbytes(dense, slice_height=max(dense.shape[0], 1), sigma=1)

    @property
    def width(self) -> int:
        return self.values.numel() // max(self.shape[0], 1)

    def values_2d(self) -> torch.Tensor:
        """`[out, width]` view of the values (row i's stored entries along dim 1)."""
        return self.values.view(self.width, self.shape[0]).t()

    def col_idx_2d(self) -> torch.Tensor:
        """`[out, width]` view of the column indices (stored dtype)."""
        return self.col_idx.view(self.width, self.shape[0]).t()


# ------------------------------------------------------------------------------------------------
# N:M


@dataclass(eq=False, repr=False)
class NM(_Format):
    """N:M structured sparsity: N values kept in every group of M consecutive in_features.

    `values` is `[out, G*n]` with G = ceil(in/m) groups per row; `idx` (uint8, same shape) is
    each value's position inside its group, ascending within the group. A group with fewer than
    N nonzeros stores zeros at its lowest free positions; in a tail group shorter than M those
    may point past in_features into the zero padding (kernels pad the input to G*m).
    `pack` raises `PatternError` naming the first row/group with more than N nonzeros.
    """

    name: ClassVar[str] = "nm"
    shape: tuple[int, int]
    n: int
    m: int
    values: torch.Tensor
    idx: torch.Tensor

    @staticmethod
    def _check(n: int, m: int) -> None:
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (n, m)) or not (0 < n < m):
            raise PatternError(f"NM: needs integers 0 < n < m, got n={n!r} m={m!r}", hint="e.g. n=2, m=4")
        if m > 256:
            raise PatternError(f"NM: m={m} does not fit the uint8 position metadata", hint="use m <= 256")

    @classmethod
    def pack(cls, dense: torch.Tensor, n: int = 2, m: int = 4) -> NM:
        _check_dense(dense, "NM")
        cls._check(n, m)
        rows, cols = dense.shape
        p = _pad_to(dense, 1, m)
        g = p.shape[1] // m
        groups = p.view(rows, g, m)
        nz = groups != 0
        counts = nz.sum(dim=-1)
        bad = counts > n
        if bool(bad.any()):
            r, gi = (int(v) for v in bad.nonzero()[0])
            raise PatternError(
                f"weight is not {n}:{m}: row {r}, group {gi} (in_features {gi * m}..{min(gi * m + m, cols) - 1}) "
                f"has {int(counts[r, gi])} nonzeros, more than {n}",
                hint=f"impose the pattern first (sparsecomp.patterns.impose_pattern(w, '{n}:{m}')) or pick another format",
            )
        # nonzeros first, then the lowest zero positions; stable, so index order within each class
        pick = torch.sort(nz.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :n]
        pick = torch.sort(pick, dim=-1).values
        values = torch.gather(groups, -1, pick)
        return cls(
            shape=(rows, cols),
            n=n,
            m=m,
            values=values.reshape(rows, g * n).contiguous(),
            idx=pick.reshape(rows, g * n).to(torch.uint8),
        )

    @staticmethod
    def estimate_nbytes(dense: torch.Tensor, n: int = 2, m: int = 4) -> int:
        _check_dense(dense, "NM")
        NM._check(n, m)
        rows, cols = dense.shape
        return rows * (-(-cols // m)) * n * (dense.element_size() + 1)

    def column_indices(self) -> torch.Tensor:
        """Absolute column of every stored value, int64 `[out, G*n]` (may exceed in-1 in the tail)."""
        rows = self.shape[0]
        g = self.values.shape[1] // self.n
        base = (torch.arange(g, device=self.idx.device) * self.m).repeat_interleave(self.n)
        return as_index(self.idx) + base.expand(rows, -1)

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.shape
        g = self.values.shape[1] // self.n
        out = torch.zeros((rows, g * self.m), dtype=self.values.dtype, device=self.values.device)
        out.scatter_(1, self.column_indices(), self.values)
        return out[:, :cols].contiguous()


# ------------------------------------------------------------------------------------------------
# Registry

FORMATS: dict[str, type[_Format]] = {cls.name: cls for cls in (CSR, BSR, SELL, ELL, NM)}


def pack_format(name: str, dense: torch.Tensor, **params) -> _Format:
    """Pack `dense` in the format registered as `name` ("csr", "bsr", "sell", "ell", "nm")."""
    cls = FORMATS.get(name)
    if cls is None:
        raise SparsecompError(f"unknown sparse format {name!r}", hint=f"available formats: {', '.join(FORMATS)}")
    sig = inspect.signature(cls.pack)
    allowed = [p for p in sig.parameters if p != "dense"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise SparsecompError(
            f"format {name!r} has no parameter {', '.join(map(repr, unknown))}",
            hint=f"{name} takes: {', '.join(allowed) or 'no parameters'}",
        )
    try:
        sig.bind(dense, **params)
    except TypeError:
        missing = [p for p, v in sig.parameters.items() if p != "dense" and v.default is inspect._empty and p not in params]
        raise SparsecompError(f"format {name!r} needs parameter {', '.join(missing)}", hint=f"{name} takes: {', '.join(allowed)}") from None
    return cls.pack(dense, **params)
