"""The lossless screen of an MLP's up-projection: bounds that prove neurons inactive from a narrow copy of the weight.

Exact (ReLU-family) sparse MLPs must find every active neuron, which reads the whole up weight in
float32. A narrow copy, float16 or int8 with one scale per row, gives each neuron's pre-activation
up to a rounding that Cauchy-Schwarz bounds per row: with wn[r] the narrow row as a float32 vector,

    |w[r] . x - wn[r] . x| <= |w[r] - wn[r]|_2 |x|_2,

so a neuron whose narrow pre-activation plus that margin (and the float32 sums' own rounding) is
still <= 0 is inactive for certain, and only the other neurons' float32 rows need reading. The
kernels that use it: `backends/tir/_mlp.py` (`_screened_up_parts`, `screen_up_mm`). In standard
ONNX (DynamicQuantizeLinear + MatMulInteger, then Gather of the candidates' float32 rows) it was
measured and not kept: onnxruntime's row Gather and the Gemm on the gathered rows cost more than
the int8 product saved (opt-125m-like's MLP shape: 477-516 us against 331-344 us for `active`).
"""

from __future__ import annotations

import torch

from sparsecomp.errors import SparsecompError

__all__ = ["screen_terms"]


def screen_terms(w: torch.Tensor, b: torch.Tensor | None, kind: str = "f16") -> tuple[torch.Tensor, ...]:
    """The screen's constants for an up (or gate) weight w [H, K] (float32) and bias b [H], in the
    kernel's argument order: (wh, sb, sm) for `kind="f16"`, (wq, ss, sb, sm) for `"i8"`.

    wh = w in float16; wq = round(w[r] / ss[r]) in int8 with ss[r] = max|w[r]| / 127, so the
    screen's row is wn[r] = wh[r], or ss[r] * wq[r]. sm[r] bounds, per unit of |x|_2 (the kernels
    compute an upper bound of it that cannot overflow or underflow), the gap between the exact
    float32 pre-activation w[r] . x + b[r] and the screen's float32 sum wn[r] . x: the rounding
    of the weights, |w[r] - wn[r]|_2 (Cauchy-Schwarz), and of both K-term sums, gamma_K times
    |wn[r]|_2 and |w[r]|_2 (gamma_K = K u / (1 - K u), u = 2^-24, any summation order), doubled
    for the screen's own multiply-adds and its scaling, with a 1e-3 slack. sb = b rounded up by
    a few ulps plus K * 2^-120, which covers the sums' products underflowing (or flushed to
    zero). Both are rounded up to float32. A row that cannot be screened rigorously (a weight not
    finite, beyond float16's range for f16, or a norm past 1e36) is never screened out: its
    narrow row is 0, sm 0 and sb = 3e38, a finite bound no sum can bring below 0 (the kernels'
    comparisons are not trusted with inf or NaN: LLVM may compile them under fast-math
    assumptions). An int8 row whose scale would be tiny (max|w| < 127 * 2^-100) is all residual:
    wq 0, ss 1.

    The constants are a snapshot: the kernels that read them must not see the weight or bias
    change after this call (a compiled model is a snapshot of its weights)."""
    if kind not in ("f16", "i8"):
        raise SparsecompError(f"no screen {kind!r}", hint='"f16" or "i8"')
    w64 = w.detach().double()
    K = w.shape[1]
    u = 2.0 ** -24
    gamma = K * u / (1 - K * u)
    bad = ~torch.isfinite(w64).all(dim=1)
    w64 = torch.where(bad[:, None], torch.zeros_like(w64), w64)
    bad |= w64.norm(dim=1) > 1e36
    if kind == "f16":
        bad |= ~torch.isfinite(w64.to(torch.float16)).all(dim=1)
        w64 = torch.where(bad[:, None], torch.zeros_like(w64), w64)
        narrow = w64.to(torch.float16)
        approx, extra = narrow.double(), ()
    else:
        w64 = torch.where(bad[:, None], torch.zeros_like(w64), w64)
        ss = w64.abs().amax(dim=1) / 127
        tiny = ss < 2.0 ** -100  # (0 included): the whole row is residual
        ss = torch.where(tiny, torch.ones_like(ss), ss).float().double()  # the float32 scale the kernel reads
        q = torch.where(tiny[:, None], torch.zeros_like(w64), torch.round(w64 / ss[:, None]).clamp(-127, 127))
        narrow, approx, extra = q.to(torch.int8), q * ss[:, None], (ss.float().contiguous(),)
    sm = ((w64 - approx).norm(dim=1) + 2 * gamma * (approx.norm(dim=1) + w64.norm(dim=1))) * (1 + 1e-3)
    sm = torch.where(bad, torch.zeros_like(sm), sm)
    b64 = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    sb = torch.where(bad, torch.full_like(b64, 3e38), b64 + b64.abs() * 8 * u + K * 2.0 ** -120)
    return (narrow.contiguous(), *extra, _up32(sb), _up32(sm))


def _up32(t: torch.Tensor) -> torch.Tensor:
    """float64 -> float32, rounded up (never below the float64 value)."""
    t32 = t.float()
    return torch.where(t32.double() < t, torch.nextafter(t32, torch.full_like(t32, float("inf"))), t32).contiguous()
