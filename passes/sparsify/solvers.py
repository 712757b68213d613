"""The per-layer algorithms: magnitude, Wanda, SparseGPT, and the masked least-squares refinement.

Each takes one weight viewed as `[out, in]` (plus the calibration statistics of its input) and a
count of units to zero, and returns the new weight and the mask; none touches a model. Statistics
come from `engine.py`: the Hessian `H = X^T X / n` of the layer's input `X` (tokens x in), its
diagonal (Wanda's squared column norms), and, for the error-correcting variant, the cross term
`G = X^T X_dense / n` with the dense model's input to the same layer.

SparseGPT (Frantar & Alistarh 2023) follows the reference algorithm: damped Hessian, upper Cholesky
factor of its inverse, columns processed left to right in lazy blocks; each pruned weight's error
is spread over the not-yet-processed columns of its row (OBS update), the mask is chosen
adaptively per lazy block (unstructured, block) or per group of M columns (N:M) with the score
w^2 / [H^-1]_jj^2. Counts are exact: the layer's quota is split over lazy blocks by
`masks.split_quota`, each block taking at least the zeros it already holds. Singular Hessians
(dead inputs, fewer tokens than inputs) are damped, the damping grown x10 until the Cholesky
factorisation succeeds; the result is checked finite. New values are computed in float32, or in
float64 for a float64 model (`work_dtype`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from sparsecomp.patterns import WeightPattern

from .masks import select_mask, split_quota, units, zeros_in

__all__ = ["HessianError", "Prepared", "prepare_hessian", "magnitude_mask", "wanda_mask", "sparsegpt",
           "corrected_target", "masked_lstsq", "relative_error", "output_error", "work_dtype"]


class HessianError(ArithmeticError):
    """The Hessian could not be factorised even with the largest damping tried."""


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a solver computes a weight's new values in: float64 for a float64 model (its
    precision is the point of it), float32 otherwise (half-precision sums lose too much)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass
class Prepared:
    """A damped Hessian ready for SparseGPT: H + lam*I and U, the upper Cholesky factor of its inverse.

    `Lr` is the lower Cholesky factor of H with rows and columns reversed (P H P = Lr Lr^T, P the
    reversal): then H^-1 = U^T U with U = P Lr^-1 P, one factorisation and one triangular inverse
    instead of factor / invert / factor again (`torch.cholesky_inverse` in float64 took 0.7-1.8 s
    for a 384-1536 wide Hessian here, this 0.07-0.5 s, same U to 1e-15).
    """

    H: torch.Tensor  # damped, float64
    Lr: torch.Tensor  # lower Cholesky factor of P H P, float64
    U: torch.Tensor  # upper Cholesky factor of H^-1, in the weights' work dtype (`work_dtype`)
    lam: float
    notes: list[str] = field(default_factory=list)

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """H^-1 B (float64)."""
        return torch.cholesky_solve(B.double().flip(0), self.Lr).flip(0)


def prepare_hessian(H: torch.Tensor, damp: float, *, attempts: int = 6, dtype: torch.dtype = torch.float32) -> Prepared:
    """Damp `H` (mean input Hessian) until it is positive definite, and factor it.

    Dead inputs (a zero diagonal: the input was 0 on every calibration token) get the mean
    diagonal, so their weights are ranked like an average input's instead of dividing by zero.
    `dtype` is the one U is kept in: the work dtype of the weights it will update (`work_dtype`).
    """
    H = H.double().clone()
    if not torch.isfinite(H).all():
        raise HessianError("the layer's input has NaN/Inf values on the calibration data")
    d = H.diagonal()
    dead = d <= 0
    mean = float(d[~dead].mean()) if (~dead).any() else 1.0
    notes = []
    if dead.any():
        d[dead] = mean
        notes.append(f"{int(dead.sum())} inputs were zero on all calibration tokens")
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    lam = damp * mean
    for attempt in range(attempts):
        Hd = H + lam * eye
        Lr, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if int(info) == 0:
            U = torch.linalg.solve_triangular(Lr, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all() and bool((U.diagonal() > 0).all()):
                if attempt:
                    notes.append(f"Hessian damped {lam / mean:.3g} x mean diagonal (asked {damp:g}) to be positive definite")
                return Prepared(Hd, Lr, U.to(dtype), lam, notes)
        lam = max(lam, 1e-8 * mean) * 10
    raise HessianError(f"Hessian not positive definite even with damping {lam / 10 / mean:.3g} x mean diagonal")


def magnitude_mask(W: torch.Tensor, p: WeightPattern, k: int) -> torch.Tensor:
    """Zero the k smallest |w| of the layer (block: tiles by L1 norm; N:M: per group)."""
    return select_mask(W.abs(), p, k)


def wanda_mask(W: torch.Tensor, sqnorm: torch.Tensor, p: WeightPattern, k: int) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |w_ij| x ||x_j||, compared within each output row."""
    norm = sqnorm.double().clamp_min(0).sqrt()
    a = W.abs().double()
    score = a * norm[None, :]
    dead = norm == 0
    if dead.any():
        # an input that was zero on every token gives all its weights score 0: ties that the
        # index alone would break (zeroing whole leading columns). Rank them by |w| instead,
        # scaled below every live input's smallest positive score, so they still go first.
        live = score[:, ~dead]
        floor = float(live[live > 0].min()) if bool((live > 0).any()) else 1.0
        top = float(a[:, dead].max())
        score[:, dead] = a[:, dead] * (0.5 * floor / top if top > 0 else 0.0)
    # a row's own zeros stay zero: its quota is at least their number, so the layer's total stays k
    floors = (W == 0).sum(1).tolist() if p.kind == "unstructured" else None
    return select_mask(score, p, k, per_row=True, row_floors=floors)


def _lazy_block(p: WeightPattern, blocksize: int) -> int:
    """A lazy-block width that holds whole N:M groups / whole tiles."""
    unit = p.m if p.kind == "nm" else (p.block[1] if p.kind == "block" else 1)
    return max(unit, blocksize // unit * unit)


@contextmanager
def _one_thread():
    """Run the column loop on one intra-op thread: its ops are small, and waking a thread pool
    for each of them cost 5-30x the work itself here (measured on 2 shared cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def sparsegpt(W: torch.Tensor, prep: Prepared, p: WeightPattern, k: int, *, blocksize: int = 128,
              free: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT on `W` `[out, cols]` with the prepared Hessian of its `cols` inputs.

    The last `free` columns (a bias column) are never pruned but receive the OBS updates.
    Returns (new W, zero mask over the first cols - free columns); exactly `k` units are zeroed.
    Works on the transpose (one input column = one contiguous row) so every step of the column
    loop touches contiguous memory.
    """
    Wt = W.detach().t().contiguous().to(work_dtype(W))  # [cols, out]
    cols, rows = Wt.shape
    K = cols - free
    U = prep.U.to(Wt.dtype)  # (no copy when prepared for this dtype)
    bs = _lazy_block(p, blocksize)
    starts = list(range(0, K, bs))
    widths = [min(bs, K - s) for s in starts]
    sizes = [units((rows, w), p) for w in widths]
    # zero units per block before any update: what the later blocks are expected to hold (a
    # block's own count is taken again when its turn comes, after the updates of the earlier ones)
    floors = [zeros_in(Wt[s:s + w].t(), p) for s, w in zip(starts, widths)] if p.kind != "nm" else []
    left = k
    zero_t = torch.zeros(K, rows, dtype=torch.bool)
    for b, (i1, width) in enumerate(zip(starts, widths)):
        i2 = i1 + width
        W1 = Wt[i1:i2]  # a contiguous view, updated in place
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = U1.diagonal()
        z1 = zero_t[i1:i2]
        if p.kind != "nm":  # adaptive mask for this lazy block, with its exact quota
            # Units that are zero now (the layer's own zeros, untouched by the updates so far) stay
            # zero whether masked or not: each block's quota is at least its own, taken from what
            # the later blocks get, so the layer ends with exactly k (an equal share per block
            # kept a block's surplus zeros on top of k).
            quota = split_quota(left, sizes[b:], [zeros_in(W1.t(), p), *floors[b + 1:]])[0]
            left -= quota
            z1.copy_(select_mask((W1 ** 2 / (d ** 2)[:, None]).t(), p, quota).t())
        with _one_thread():
            for i in range(width):
                if p.kind == "nm" and i % p.m == 0:
                    g = W1[i:i + p.m] ** 2 / (d[i:i + p.m] ** 2)[:, None]
                    z1[i:i + p.m] = select_mask(g.t(), p).t()
                e = E1[i]
                torch.mul(W1[i], z1[i], out=e)  # the pruned part of column i ...
                e.div_(d[i])  # ... over [H^-1]_ii: the OBS error
                W1[i:].addr_(U1[i, i:], e, alpha=-1.0)  # spread it over the later columns
        Wt[i2:].addmm_(U[i1:i2, i2:].t(), E1, alpha=-1.0)
    Wt[:K].masked_fill_(zero_t, 0.0)
    return Wt.t().contiguous(), zero_t.t().contiguous()


def corrected_target(W: torch.Tensor, prep: Prepared, G: torch.Tensor) -> torch.Tensor:
    """The weight that best maps the pruned model's input onto the dense model's output.

    argmin_V ||X V^T - X_dense W^T||^2 + lam ||V - W||^2, i.e. (H + lam I) V^T = G W^T + lam W^T
    with H = X^T X / n, G = X^T X_dense / n. Equal to W when X = X_dense; the damping pulls it
    towards W (not towards 0) where the calibration data says little.
    """
    Wd = W.double()
    return prep.solve(G.double() @ Wd.t() + prep.lam * Wd.t()).t().to(work_dtype(W))


def masked_lstsq(V: torch.Tensor, T: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, iters: int,
                 tol: float = 1e-10) -> torch.Tensor:
    """Refine V towards argmin over V with V[~keep] = 0 of tr((V - T) H (V - T)^T).

    One independent least-squares problem per row (the kept inputs differ per row), solved for all
    rows at once by Jacobi-preconditioned conjugate gradient started from V (SparseGPT's answer,
    which is close but not optimal for its own mask). The mask is untouched; a row whose step
    would not be finite keeps its last iterate.
    """
    dt = work_dtype(V)
    Hf = H.to(dt)
    keepf = keep.to(dt)
    minv = (1.0 / Hf.diagonal().clamp_min(1e-12))[None, :] * keepf
    V = V.to(dt) * keepf
    R = ((T.to(dt) - V) @ Hf) * keepf
    Z = R * minv
    P = Z.clone()
    rz = (R * Z).sum(1)
    rz0 = float(rz.max())
    for it in range(iters):
        if it % 5 == 4 and float(rz.max()) <= tol * rz0:  # every row converged: stop early
            break
        AP = (P @ Hf) * keepf
        pap = (P * AP).sum(1)
        ok = pap > 1e-30
        alpha = torch.where(ok, rz / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        V = V + alpha[:, None] * P
        R = R - alpha[:, None] * AP
        Z = R * minv
        rz_new = (R * Z).sum(1)
        beta = torch.where(rz > 1e-30, rz_new / torch.where(rz > 1e-30, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        P = Z + beta[:, None] * P
        rz = rz_new
    if not torch.isfinite(V).all():
        return V.nan_to_num(0.0) * keepf  # unreachable in practice: H is damped positive definite
    return V


def relative_error(W_old: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """||X (W_new - W_old)^T||^2 / ||X W_old^T||^2 on the calibration inputs (H = X^T X / n)."""
    # float32 products (float64 for a float64 model), float64 sums: a report figure and an
    # allocation signal, not a solver input
    dt = work_dtype(W_old)
    Hf = H.to(dt)
    D = W_new.to(dt) - W_old.to(dt)
    num = float(((D @ Hf) * D).double().sum())
    den = float(((W_old.to(dt) @ Hf) * W_old.to(dt)).double().sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def output_error(W_old: torch.Tensor, W_new: torch.Tensor, xs: list[torch.Tensor]) -> float:
    """`relative_error` measured on the layer's input rows `xs` (one [tokens, in] per batch) directly.

    For the methods that need no Hessian (magnitude, Wanda): two products of the layer's size per
    batch instead of an in x in Gram matrix per input (quadratic memory in the input width).
    """
    dt = work_dtype(W_old)
    Wo = W_old.to(dt)
    D = W_new.to(dt) - Wo
    num = den = 0.0
    for x in xs:
        x = x.to(dt)
        num += float(((x @ D.t()) ** 2).double().sum())
        den += float(((x @ Wo.t()) ** 2).double().sum())
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)
