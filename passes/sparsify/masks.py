"""Choosing which weights to zero, from a score per weight, with exact counts.

Every method reduces to "zero the entries (or RxC tiles, or per-group entries) with the smallest
score" under a pattern; only the score differs (|w| for magnitude, |w| x ||x_j|| for Wanda,
w^2 / [H^-1]_jj^2 for SparseGPT). Counts are exact: a layer asked for k zeros gets k zeros, the
quota split across rows or column blocks by largest remainder (`split_quota`), each part at least
the zeros its rows / block already hold (those stay zero whatever the mask says), so a global
budget handed out by an allocation adds up to the entry; a layer already holding more than k
zeros keeps them (the report notes it). Ties go to the lower index (stable sorts), the
same rule `sparsecomp.patterns.impose_pattern` follows, so magnitude here and `impose` agree.
A NaN score ranks as +inf: a weight we cannot rank is never silently removed.
"""

from __future__ import annotations

import math

import torch

from sparsecomp.patterns import WeightPattern, smallest_k_mask

__all__ = ["units", "zero_units", "zeros_in", "split_quota", "select_mask", "check_divides"]


def units(shape: tuple[int, int], p: WeightPattern) -> int:
    """How many prunable units a `[out, in]` weight has: entries, or RxC tiles for block patterns."""
    o, i = shape
    if p.kind == "block":
        r, c = p.block
        return (o // r) * (i // c)
    return o * i


def zero_units(shape: tuple[int, int], p: WeightPattern, sparsity: float | None = None) -> int:
    """Units to zero for `sparsity` (default: the pattern's own); N:M: (M-N)/M of the entries."""
    if p.kind == "nm":
        return shape[0] * shape[1] // p.m * (p.m - p.n)
    s = p.sparsity if sparsity is None else sparsity
    return round(s * units(shape, p))


def check_divides(shape: tuple[int, int], p: WeightPattern) -> str | None:
    """Why `p` cannot be laid on a `[out, in]` weight without padding, or None when it can.

    Kernels for N:M and blocks need whole groups and tiles; a padded edge group would not be a
    valid N:M group, so such layers are skipped with this reason rather than half-patterned.
    """
    o, i = shape
    if p.kind == "nm" and i % p.m:
        return f"{p} needs in_features divisible by {p.m}, got {i}"
    if p.kind == "block":
        r, c = p.block
        if o % r or i % c:
            return f"block {r}x{c} needs out_features divisible by {r} and in_features by {c}, got {o}x{i}"
    return None


def zeros_in(W: torch.Tensor, p: WeightPattern) -> int:
    """How many units of a `[out, in]` weight are zero already: entries, or whole RxC tiles."""
    z = W == 0
    if p.kind == "block":
        r, c = p.block
        o, i = z.shape
        z = z[: o // r * r, : i // c * c].reshape(o // r, r, i // c, c).all(dim=3).all(dim=1)
    return int(z.sum())


def split_quota(total: int, sizes: list[int], floors: list[int] | None = None) -> list[int]:
    """Split `total` over chunks proportionally to `sizes` (largest remainder, ties to the first).

    The parts sum to `total` exactly and never exceed their chunk's size. With `floors`, part j is
    at least floors[j] (units already zero there, which stay zero whatever the mask says): chunks
    whose floor exceeds their proportional share get exactly their floor, the others share the
    rest by size (water filling). When the floors alone exceed `total`, the parts are the floors.
    """
    if floors is not None:
        floors = [min(max(f, 0), s) for f, s in zip(floors, sizes)]
        if sum(floors) >= total:
            return floors
        fixed: set[int] = set()
        while True:  # grows `fixed` monotonically: at most len(sizes) rounds
            free = [j for j in range(len(sizes)) if j not in fixed]
            rest = total - sum(floors[j] for j in fixed)
            n = sum(sizes[j] for j in free)
            more = {j for j in free if n and floors[j] * n > rest * sizes[j]}
            if not more:
                break
            fixed |= more
        parts = split_quota(rest, [sizes[j] for j in free])
        out = list(floors)
        for j, part in zip(free, parts):
            out[j] = part  # >= floors[j]: floors[j] <= rest * size / n and is an integer
        return out
    n = sum(sizes)
    if n == 0 or total <= 0:
        return [0] * len(sizes)
    total = min(total, n)
    exact = [total * s / n for s in sizes]
    parts = [math.floor(e) for e in exact]
    rest = total - sum(parts)
    order = sorted(range(len(sizes)), key=lambda j: (-(exact[j] - parts[j]), j))
    for j in order:
        if rest == 0:
            break
        if parts[j] < sizes[j]:
            parts[j] += 1
            rest -= 1
    return parts


def _key(score: torch.Tensor) -> torch.Tensor:
    s = score.double() if score.dtype == torch.float64 else score.float()
    return torch.nan_to_num(s, nan=math.inf)


def _rowwise(key: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Zero the quotas[r] smallest entries of each row r."""
    order = torch.sort(key, dim=1, stable=True).indices
    ranks_zero = torch.arange(key.shape[1], device=key.device)[None, :] < quotas[:, None]
    zero = torch.zeros_like(key, dtype=torch.bool)
    zero.scatter_(1, order, ranks_zero)
    return zero


def select_mask(score: torch.Tensor, p: WeightPattern, k: int | None = None, *, per_row: bool = False,
                row_floors: list[int] | None = None) -> torch.Tensor:
    """Boolean `[out, in]` mask of the weights to zero.

    unstructured: the k smallest scores of the layer, or with `per_row` the quota of each output
      row (k split evenly over rows; Wanda's comparison group; a row gets at least its
      `row_floors` entry, the zeros it already holds, so that the layer's total stays k);
    block RxC: the k tiles with the smallest summed score (shape must be divisible, see
      `check_divides`);
    N:M: in every group of M consecutive inputs of a row, the M-N smallest (k is implied).
    `k` defaults to the pattern's own count (`zero_units`).
    """
    key = _key(score)
    o, i = key.shape
    if k is None:
        k = zero_units((o, i), p)
    if p.kind == "nm":
        groups = key.view(o, i // p.m, p.m)
        order = torch.sort(groups, dim=-1, stable=True).indices
        zero = torch.zeros_like(groups, dtype=torch.bool)
        zero.scatter_(-1, order[..., : p.m - p.n], True)
        return zero.view(o, i)
    if p.kind == "block":
        r, c = p.block
        tiles = key.view(o // r, r, i // c, c).sum(dim=(1, 3))
        zt = smallest_k_mask(tiles.reshape(-1), k).view(o // r, 1, i // c, 1)
        return zt.expand(o // r, r, i // c, c).reshape(o, i)
    if per_row:
        quotas = torch.tensor(split_quota(k, [i] * o, row_floors), dtype=torch.long, device=key.device)
        return _rowwise(key, quotas)
    return smallest_k_mask(key.reshape(-1), k).view(o, i)
