"""HQQ-style rounding of int4 groups: half-quadratic optimisation of each group's zero point and scale, after
H. Badri and A. Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023,
https://mobiusml.github.io/hqq_blog/). No calibration data: it fits the weights alone.

The quantizer minimises sum |w - (q - z) s|^p with p < 1 (a sparsity-promoting norm: a few outlier weights may
keep a large error so that the rest fit tightly) by splitting in an error variable e and alternating:

    e <- shrink_p(w - (q - z) s, beta)          generalised soft-thresholding of the residual
    q <- clamp(round(w / s + z), 0, 15)
    z <- mean(q - (w - e) / s)                  asymmetric groups: the zero point's closed form
    s <- <w - e, q - z> / |q - z|^2             the scale's closed form (least squares given q, z, e)
    beta <- beta * kappa

with the paper's defaults (p = 0.7, beta = 10, kappa = 1.01, 20 iterations), keeping per group the iterate of
the smallest squared error (round to nearest is the start, so the result is never worse than it in that
error). The format stores an integer zero point (compressed-tensors' w4a16 layout): z is rounded at the end and
q, s refitted to it, for both symmetric (z = 8 fixed: only s moves) and asymmetric groups.

    hqq_quantize(w [R, C], group, sym) -> (q int8 [R, C] in [-8, 7], scale [R, ng] in w's dtype, zero int8 [R, ng])

in `group_quantize`'s convention (w ~ (q - zero) * scale), so the rest of the int4 format is unchanged.
"""

from __future__ import annotations

import torch

from .base import cdiv

P_NORM, BETA, KAPPA, ITERS = 0.7, 10.0, 1.01, 20


def _shrink(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal step of |x|^p: sign(x) relu(|x| - |x|^(p-1) / beta)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


def _fit(w, s, z, lo, hi):
    """q for scale s and zero z (unsigned 0..15, zero in the same units), and the squared error per group."""
    q = torch.clamp(torch.round(w / s + z), lo, hi)
    return q, ((q - z) * s - w).pow(2).sum(-1)


def hqq_quantize(w: torch.Tensor, group: int, sym: bool, iters: int = ITERS, p: float = P_NORM,
                 beta: float = BETA, kappa: float = KAPPA) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [R, C] (C a multiple of `group`) -> (q int8 [R, C] in [-8, 7], scale [R, C/group] in w's dtype,
    zero int8 [R, C/group]): w ~ (q - zero) * scale, per group of `group` columns."""
    R, C = w.shape
    ng = cdiv(C, group)
    g = w.double().reshape(R, ng, group)        # float64: a group's sums do not depend on the tensor's shape
    lo_w, hi_w = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    if sym:                                     # round to nearest's start: s = amax / 7.5, z = 8 (unsigned)
        s = torch.maximum(hi_w.abs(), lo_w.abs()) / 7.5
        z = torch.full_like(s, 8.0)
    else:                                       # s = range / 15, z = -min / s, the range widened to hold 0
        lo_w, hi_w = lo_w.clamp_max(0), hi_w.clamp_min(0)       # (compressed-tensors' rule), so z is in [0, 15]
        s = (hi_w - lo_w) / 15.0
        z = torch.round(-lo_w / torch.where(s > 0, s, torch.ones_like(s))).clamp(0.0, 15.0)
    rd = lambda v: v.to(w.dtype).double()          # noqa: E731 - a scale as it will be stored (w's dtype)
    s = rd(torch.where(s > 0, s, torch.ones_like(s)))
    q, best_err = _fit(g, s, z, 0.0, 15.0)
    best_s, best_z = s.clone(), z.clone()
    zf = z.clone()
    for _ in range(iters):
        e = _shrink(g - (q - zf) * s, beta, p)
        q = torch.clamp(torch.round(g / s + zf), 0.0, 15.0)
        if not sym:
            zf = (q - (g - e) / s).mean(-1, keepdim=True).clamp(0.0, 15.0)
        d = q - zf
        den = d.pow(2).sum(-1, keepdim=True)
        s_new = (((g - e) * d).sum(-1, keepdim=True) / den.clamp_min(1e-12))
        s = rd(torch.where((den > 0) & (s_new > 0), s_new, s))
        beta *= kappa
        zi = torch.round(zf) if not sym else zf          # the stored zero point is an integer
        qi, err = _fit(g, s, zi, 0.0, 15.0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better[..., None], s, best_s)
        best_z = torch.where(better[..., None], zi, best_z)
    q, _ = _fit(g, best_s, best_z, 0.0, 15.0)
    return (q - 8).to(torch.int8).reshape(R, C), best_s[..., 0].to(w.dtype), (best_z[..., 0] - 8).to(torch.int8)
