"""`analyze-weights`: what sparsity each constant weight already has.

For every matmul-like node with a constant weight (`sparsecomp.ir.linear_sites`), measure the
weight viewed as `[out_features, in_features]`: density, all-zero rows (dead outputs) and columns
(unused inputs), block occupancy for a set of block shapes (`RxC`: R along out_features), N:M
conformance (groups of M along in_features), NaN/Inf counts, and the bytes the weight takes in
dense form and in each packed format. Rewrites read these facts from `node.meta`; the report
prints them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from sparsecomp import formats, patterns
from sparsecomp.errors import PipelineError
from sparsecomp.ir import linear_sites
from sparsecomp.registry import PassResult, register_pass

__all__ = ["WeightStats", "weight_stats", "parse_block_shapes", "parse_nm_list", "META_KEY"]

META_KEY = "sparsecomp.weights"
DEFAULT_BLOCKS = "1x4,1x8,1x16,16x1,4x4,32x32"
DEFAULT_NM = "2:4,4:8"
SELL_SLICE = 16  # slice height reported for SELL bytes (the kernels' default slice)


@dataclass
class WeightStats:
    """Sparsity facts of one weight (all fractions in [0, 1])."""

    name: str
    op: str  # linear | conv | matmul
    shape: list[int]  # [out_features, in_features] (conv: [out, in/groups * kernel])
    numel: int
    density: float
    zero_rows: int
    zero_cols: int
    nm_conformance: dict[str, float]
    block_occupancy: dict[str, float]
    bytes: dict[str, int]
    nan: int = 0
    inf: int = 0
    flags: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def best_format(self) -> tuple[str, int]:
        """Smallest format by bytes (dense included)."""
        return min(self.bytes.items(), key=lambda kv: kv[1])

    def summary(self) -> str:
        parts = [f"density={self.density:.3f}"]
        parts += [f"{k}={v:.2f}" for k, v in self.nm_conformance.items() if v == 1.0]
        occ = [f"{k}:{v:.2f}" for k, v in self.block_occupancy.items() if v < 1.0]
        if occ:
            parts.append("occ(" + ",".join(occ) + ")")
        if self.zero_rows or self.zero_cols:
            parts.append(f"zero_rows={self.zero_rows} zero_cols={self.zero_cols}")
        parts += self.flags
        return " ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d


def parse_block_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        try:
            r, c = (int(v) for v in item.lower().split("x"))
            if r < 1 or c < 1:
                raise ValueError
        except ValueError:
            raise PipelineError(f"bad block shape '{item}' in '{text}'", hint="write block shapes as RxC, e.g. \"1x4,16x1,32x32\"") from None
        out.append((r, c))
    return out


def parse_nm_list(text: str) -> list[tuple[int, int]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        p = patterns.parse_pattern(item)
        if p.kind != "nm":
            raise PipelineError(f"'{item}' is not an N:M pattern", hint='write N:M patterns as "2:4,4:8"')
        out.append((p.n, p.m))
    return out


def weight_stats(name: str, op: str, w: torch.Tensor, *, blocks: list[tuple[int, int]] | None = None,
                 nm: list[tuple[int, int]] | None = None) -> WeightStats:
    """Measure one weight, given as `[out, in]` (or a conv weight, viewed as `[out, in*k]`)."""
    blocks = parse_block_shapes(DEFAULT_BLOCKS) if blocks is None else blocks
    nm = parse_nm_list(DEFAULT_NM) if nm is None else nm
    w = w.detach()
    stored = w.reshape(w.shape[0], -1) if w.dim() != 2 else w  # bytes are priced in the stored dtype
    w2 = stored.float() if not stored.is_floating_point() or stored.dtype in (torch.float16, torch.bfloat16) else stored
    nan = int(torch.isnan(w2).sum())
    inf = int(torch.isinf(w2).sum())
    flags = []
    if nan:
        flags.append(f"NaN:{nan}")
    if inf:
        flags.append(f"Inf:{inf}")
    # Every measurement below depends only on where the nonzeros are (NaN counts as nonzero): take
    # the 1-byte mask once instead of re-reading the 4-byte weight in each (3x faster on 4096x4096).
    nz = w2 != 0
    nmc = {f"{n}:{m}": patterns.nm_conformance(nz, n, m) for n, m in nm}
    occ = {f"{r}x{c}": patterns.block_occupancy(nz, r, c) for r, c in blocks}
    sizes = {"dense": stored.numel() * stored.element_size(), "csr": formats.CSR.estimate_nbytes(stored)}
    sizes[f"sell{SELL_SLICE}"] = formats.SELL.estimate_nbytes(stored, slice_height=SELL_SLICE)
    for (r, c), key in zip(blocks, occ):
        rb, cb = -(-w2.shape[0] // r), -(-w2.shape[1] // c)
        nnzb = round(occ[key] * rb * cb)  # the occupancy just measured, not a second pass over the weight
        sizes[f"bsr{r}x{c}"] = formats.BSR.bytes_for(w2.shape, (r, c), nnzb, stored.element_size())
    for (n, m), key in zip(nm, nmc):
        if nmc[key] == 1.0:  # N:M storage exists only for conformant weights
            sizes[f"{n}:{m}"] = formats.NM.estimate_nbytes(stored, n=n, m=m)
    return WeightStats(
        name=name, op=op, shape=list(w2.shape), numel=w2.numel(), density=patterns.density(nz),
        zero_rows=patterns.zero_rows(nz), zero_cols=patterns.zero_cols(nz), nm_conformance=nmc,
        block_occupancy=occ, bytes=sizes, nan=nan, inf=inf, flags=flags,
    )


@register_pass("analyze-weights", kind="analysis")
def analyze_weights(gm, ctx, *, blocks: str = DEFAULT_BLOCKS, nm: str = DEFAULT_NM) -> PassResult:
    """Measure the sparsity of every constant weight of a matmul-like node.

    Requires: an ATen-level graph from `sparsecomp.capture` (in an onnx2torch import, only its
      nn.Linear / nn.Conv modules count); weights as `get_attr` attributes.
    Ensures: `node.meta["sparsecomp.weights"]` = `WeightStats` on every linear/conv/matmul node
      with a constant weight; `ctx.results["analyze-weights"]` = their list in graph order. The
      graph itself is unchanged.
    Options:
      blocks: block shapes RxC whose occupancy is measured (R along out_features), comma-separated.
      nm: N:M patterns whose conformance is measured (groups along in_features), comma-separated.
    """
    block_list, nm_list = parse_block_shapes(blocks), parse_nm_list(nm)
    results = []
    for site in linear_sites(gm):
        stats = weight_stats(site.name, site.kind, site.weight_2d(gm), blocks=block_list, nm=nm_list)
        site.node.meta[META_KEY] = stats
        results.append(stats)
    ctx.results["analyze-weights"] = results
    return PassResult(False, {
        "weights": len(results),
        "sparse>=50%": sum(s.density <= 0.5 for s in results),
        "nm-conformant": sum(any(v == 1.0 for v in s.nm_conformance.values()) for s in results),
        "nan/inf": sum(bool(s.nan or s.inf) for s in results),
    })
