"""The hot path: routed experts as one grouped matmul over the device slot pool.

    # T tokens, K experts per token, S slots, H hidden, I expert intermediate, P = T*K (token, expert) pairs
    slot_idx [T, K]   slot holding each pair's expert this wave, or S when the expert is not in this wave
    pool     gate_up [S, 2I, H], down [S, H, I]

Pairs are sorted by slot, each slot's rows form one group of `grouped_mm`, and every pair's weighted output row
lands in `pairs [P, H]`; pairs outside the wave are cut off before any arithmetic and their rows keep what
earlier waves wrote. The caller reduces
`pairs.view(T, K, H).sum(1)` once, after the last wave, so the result does not depend on how the experts were
split into waves. No host synchronisation happens here (offsets come from `histc`, not `bincount`).

Training (train.py) runs `experts_on_slots` too, over a layer's own expert banks (slot = expert, one wave):
autograd flows through it to the hidden states, the routing weights and the banks.

`grouped_mm` takes at most `MAX_GROUPS` groups per call, so a call sees a window of at most that many slots
(`windows()` splits the slots a wave uses; `window_banks()` gives each window's banks and slot -> group map,
dequantized into a scratch for quantized expert formats).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


MAX_GROUPS = 1023      # torch._grouped_mm checks group_count < 1024 ("Can't process more than 1024 groups")


def windows(slots: list[int], span: int = MAX_GROUPS) -> list[tuple[int, int]]:
    """Cover the used `slots` with few [lo, hi) ranges, each at most `span` slots wide."""
    out: list[tuple[int, int]] = []
    for s in sorted(slots):
        if out and s < out[-1][0] + span:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def window_banks(layout, pool: torch.Tensor, inside: list[int], lo: int, hi: int,
                 gather_sparse: bool) -> tuple[torch.Tensor, torch.Tensor, dict[int, int]]:
    """The banks one grouped matmul sees for the used slots `inside` [lo, hi) of `pool [S, numel]` (blobs of the
    expert format `layout`) and slot -> group index.

    Dense: normally the pool slice [lo, hi) viewed as banks (no copy). With `gather_sparse` (the CPU, whose
    grouped_mm pays for every group of the window, empty ones too) a window mostly empty gathers its used slots'
    weights instead: a copy of what the matmul reads anyway. Quantized formats: the used slots' blobs are
    dequantized into a scratch in the activation dtype (moe_kernel.dequantize: Triton on CUDA)."""
    if not hasattr(layout, "views"):
        from .moe_kernel import dequantize
        sel = torch.tensor(inside, device=pool.device)
        gu, dn = dequantize(layout, pool, sel)
        return gu, dn, {s: i for i, s in enumerate(inside)}
    gate_up, down = layout.views(pool)
    if gather_sparse and hi - lo > 2 * len(inside) + 16:
        sel = torch.tensor(inside, device=gate_up.device)
        return gate_up.index_select(0, sel), down.index_select(0, sel), {s: i for i, s in enumerate(inside)}
    return gate_up[lo:hi], down[lo:hi], {s: s - lo for s in inside}


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [P, in] sorted by group, w [G, in, out], offs [G] cumulative rows -> [P, out] (rows past offs[-1] undefined)."""
    if x.device.type == "cpu" or w.dtype == torch.bfloat16:
        return F.grouped_mm(x, w, offs=offs)
    # CUDA grouped_mm takes bf16 only: loop over the non-empty groups (costs one sync; fp32/fp16 on GPU only)
    out = x.new_empty(x.shape[0], w.shape[-1])
    bounds = [0] + offs.tolist()
    for g in range(w.shape[0]):
        a, b = bounds[g], bounds[g + 1]
        if b > a:
            out[a:b] = x[a:b] @ w[g]
    return out


def experts_on_slots(module, hidden: torch.Tensor, slot_idx: torch.Tensor, weights: torch.Tensor,
                     gate_up: torch.Tensor, down: torch.Tensor, pairs: torch.Tensor | None,
                     count: int | None = None) -> torch.Tensor:
    """Compute the pairs whose expert is in this wave; returns the updated `pairs [P, H]`.

    `module` is the transformers experts module (its `_apply_gate` knows the family's gating).
    `count` is how many pairs are in this wave (the caller knows it on the host; None: all of them, the common
    case). Pairs outside the wave sort last (slot S) and are dropped before any arithmetic, so a wave or a
    hits-first part costs what its own pairs cost (computing every pair and masking cost a part 2x a whole
    wave on the CPU).
    """
    T, K = slot_idx.shape
    P = T * K
    S = gate_up.shape[0]
    whole = count is None or count >= P
    if not whole and count <= 0:
        return pairs if pairs is not None else hidden.new_zeros(P, hidden.shape[-1])
    flat = slot_idx.reshape(-1)                                   # [P]
    order, perm = torch.sort(flat, stable=True)                   # [P], [P]
    if not whole:
        order, perm = order[:count], perm[:count]                 # [C]: this wave's pairs only
    x = hidden[perm // K].to(gate_up.dtype)                       # [C, H]
    hist_in = order.float() if order.device.type == "cpu" else order.int()
    # S+1 unit-wide bins over [0, S] (the last one holds the sentinel): with S bins over [0, S-1], S == 1 would
    # give min == max, which histc reads as "use the data's range"
    counts = torch.histc(hist_in, bins=S + 1, min=0, max=S)[:S]   # [S]
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)         # [S]
    h = _grouped_mm(x, gate_up.transpose(-2, -1), offs)           # [C, 2I]
    h = module._apply_gate(h)                                     # [C, I]
    y = _grouped_mm(h, down.transpose(-2, -1), offs)              # [C, H]
    y = y * weights.reshape(-1)[perm].unsqueeze(-1).to(y.dtype)   # [C, H]
    if pairs is None:
        pairs = y.new_empty(P, y.shape[-1]) if whole else y.new_zeros(P, y.shape[-1])
    pairs[perm] = y
    return pairs
