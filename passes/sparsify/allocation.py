"""Per-layer sparsity allocation: hand a global budget of zeros to layers, exactly.

- `uniform`: every layer gets the global sparsity (exact count per layer).
- `owl` (Yin et al. 2024, "Outlier Weighed Layerwise sparsity"): a layer's outlier ratio D is the
  fraction of its Wanda scores |w| x ||x|| above M x their mean; layers with more outliers keep
  more weights. Sparsities are spread linearly over [S - lambda, S + lambda] by D (high D -> low
  sparsity), then shifted so the weights-weighted mean is S.
- `sensitivity`: a measured sweep. For each layer, the chosen method prunes the *dense* model's
  layer at a few sparsities around S and records the relative output error on the calibration
  data; the budget then goes greedily to the layers where one more pruned weight costs the least
  error (a convex, piecewise-linear fit of each curve), within the swept range.

Every allocation ends in `exact_counts`: integer zero counts per layer that sum to exactly
round(S x total units) (units: entries, or tiles for block patterns), so the global target is
met to the weight, not just on average.
"""

from __future__ import annotations

import heapq
import math

from .masks import split_quota

__all__ = ["exact_counts", "owl_sparsities", "sensitivity_sparsities", "sweep_grid"]

MAX_SPARSITY = 0.99  # a layer is never emptied by an allocation


def exact_counts(fractions: list[float], sizes: list[int], target: float) -> list[int]:
    """Integer zero counts close to fractions[l] x sizes[l] summing to round(target x sum(sizes)).

    The difference between the rounded counts and the total is spread over layers in proportion
    to their size (largest remainder), never beyond a layer's MAX_SPARSITY or below 0.
    """
    total = round(target * sum(sizes))
    counts = [min(round(f * n), math.floor(MAX_SPARSITY * n)) for f, n in zip(fractions, sizes)]
    counts = [max(0, c) for c in counts]
    diff = total - sum(counts)
    if diff > 0:
        room = [math.floor(MAX_SPARSITY * n) - c for c, n in zip(counts, sizes)]
        extra = split_quota(diff, room)
        counts = [c + e for c, e in zip(counts, extra)]
    elif diff < 0:
        extra = split_quota(-diff, counts)
        counts = [c - e for c, e in zip(counts, extra)]
    return counts


def _rebalance(fracs: list[float], sizes: list[int], target: float) -> list[float]:
    """Shift all fractions by one constant (clipped to [0, MAX_SPARSITY]) so the weighted mean is target."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        mean = sum(min(max(f + mid, 0.0), MAX_SPARSITY) * n for f, n in zip(fracs, sizes)) / sum(sizes)
        lo, hi = (mid, hi) if mean < target else (lo, mid)
    return [min(max(f + (lo + hi) / 2, 0.0), MAX_SPARSITY) for f in fracs]


def owl_sparsities(outlier_ratios: list[float], sizes: list[int], target: float, lam: float) -> list[float]:
    """OWL: per-layer sparsity in [target - lam, target + lam], lower where outliers are more frequent."""
    lo_d, hi_d = min(outlier_ratios), max(outlier_ratios)
    if hi_d - lo_d <= 0:
        return [target] * len(sizes)
    fracs = [target + lam - 2 * lam * (d - lo_d) / (hi_d - lo_d) for d in outlier_ratios]
    return _rebalance(fracs, sizes, target)


def sweep_grid(target: float, spread: float = 0.2, step: float = 0.1) -> list[float]:
    """Sparsities swept per layer for `sensitivity`: target +- spread in steps, inside [0, 0.95]."""
    n = round(spread / step)
    grid = {round(min(max(target + j * step, 0.0), 0.95), 6) for j in range(-n, n + 1)}
    return sorted(grid)


def _convex(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    """Lower convex hull of an error curve, made non-decreasing (more zeros never cost less)."""
    pts = []
    best = -math.inf
    for x, y in zip(xs, ys):
        best = max(best, y)
        pts.append((x, best))
    hull: list[tuple[float, float]] = []
    for pt in pts:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (pt[0] - x1) >= (pt[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(pt)
    return hull


def sensitivity_sparsities(curves: list[tuple[list[float], list[float]]], sizes: list[int], target: float) -> list[float]:
    """Spend the budget where it costs least error, per the measured curves (sparsities, errors).

    Every layer starts at the lowest swept sparsity; segments of each layer's convex error curve
    are bought in order of error per pruned unit until the budget is spent (the last segment
    partly), then fractions are rebalanced to the exact weighted mean.
    """
    fracs = [xs[0] for xs, _ in curves]
    budget = target * sum(sizes) - sum(f * n for f, n in zip(fracs, sizes))
    heap = []
    hulls = [_convex(xs, ys) for xs, ys in curves]
    for li, hull in enumerate(hulls):
        if len(hull) > 1:
            (x1, y1), (x2, y2) = hull[0], hull[1]
            heapq.heappush(heap, ((y2 - y1) / ((x2 - x1) * sizes[li]), li, 1))
    while budget > 1e-9 and heap:
        _, li, j = heapq.heappop(heap)
        (x1, _), (x2, _) = hulls[li][j - 1], hulls[li][j]
        units = (x2 - x1) * sizes[li]
        if units >= budget:
            fracs[li] = x1 + budget / sizes[li]
            budget = 0.0
            break
        fracs[li] = x2
        budget -= units
        if j + 1 < len(hulls[li]):
            (a, ya), (b, yb) = hulls[li][j], hulls[li][j + 1]
            heapq.heappush(heap, ((yb - ya) / ((b - a) * sizes[li]), li, j + 1))
    return _rebalance(fracs, sizes, target)
