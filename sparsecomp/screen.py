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
    screen's row is wn[r] = wh[r], or ss[r] * wq[r]. sm[r] bounds, per unit of |x|_2, the gap
    between the exact float32 pre-activation w[r] . x + b[r] and the screen's float32 sum
    wn[r] . x: the rounding of the weights, |w[r] - wn[r]|_2 (Cauchy-Schwarz), and of both K-term
    sums, gamma_K times |wn[r]|_2 and |w[r]|_2 (gamma_K = K u / (1 - K u), u = 2^-24, any
    summation order), doubled for the screen's own multiply-adds and its scaling. sb = b rounded
    up by a few ulps. A row with a weight beyond float16's range (f16) or not finite is never
    screened out: its narrow row is 0, sm 0 and sb = 3e38, a finite bound no sum can bring below
    0 (the kernels' comparisons are not trusted with inf or NaN: LLVM may compile them under
    fast-math assumptions)."""
    if kind not in ("f16", "i8"):
        raise SparsecompError(f"no screen {kind!r}", hint='"f16" or "i8"')
    w64 = w.detach().double()
    K = w.shape[1]
    u = 2.0 ** -24
    gamma = K * u / (1 - K * u)
    bad = ~torch.isfinite(w64).all(dim=1)
    if kind == "f16":
        bad |= ~torch.isfinite(w.detach().to(torch.float16)).all(dim=1)
        wn = torch.where(bad[:, None], torch.zeros_like(w64), w64).to(torch.float16)
        narrow, approx, extra = wn, wn.double(), ()
    else:
        ss = (w64.abs().amax(dim=1) / 127).where(~bad, torch.ones(()))
        ss = torch.where(ss > 0, ss, torch.ones_like(ss)).float().double()  # the float32 scale the kernel reads
        q = torch.where(bad[:, None], torch.zeros_like(w64), torch.round(w64 / ss[:, None]).clamp(-127, 127))
        narrow, approx, extra = q.to(torch.int8), q * ss[:, None], (ss.float().contiguous(),)
    w64 = torch.where(bad[:, None], torch.zeros_like(w64), w64)  # (norms of the rows never screened out: unused)
    sm = ((w64 - approx).norm(dim=1) + 2 * gamma * (approx.norm(dim=1) + w64.norm(dim=1))) * (1 + 1e-3)
    sm = torch.where(bad, torch.zeros_like(sm), sm)
    b64 = b.detach().double() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    sb = torch.where(bad, torch.full_like(b64, 3e38), b64 + b64.abs() * 8 * u)
    return (narrow.contiguous(), *extra, sb.float().contiguous(), sm.float().contiguous())
