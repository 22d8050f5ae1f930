"""Routed experts of a decode step, read wherever each expert lives: a device slot or page-locked host memory.

    # T tokens (a few: decode), K experts per token, P = T*K (token, expert) pairs, H hidden, I expert inter
    addr   [E] int64      where expert e's blob starts: a slot of the device pool, or its page-locked host blob
                          (device-visible through unified addressing); written by the host before each step
    topk   [T, K]         router's choice; weights [T, K]
    blob   gate_up [2I, H] then down [H, I] (store.BlobLayout), the same bytes in a slot and on the host
    ->  gate_up pass  [P, I]   silu(x @ gate^T) * (x @ up^T), one program per (pair, block of I rows)
    ->  down pass     [P, H]   (h @ down^T) * weight, one program per (pair, block of H rows)
    ->  sum over K    [T, H]

Nothing here synchronises with the host and no shape depends on the routing, so the whole step can be captured
in a CUDA graph: an expert that is not resident is read over the link by the kernel itself (the miss costs its
bytes once, on the step's critical path) and the host fills the cache after the step. A resident expert and a
host one go through the same arithmetic, so offloading never changes a result.

The step also records its routing (`route_idx`, `route_w`) for the host's cache bookkeeping after the step.

On CUDA the two passes are Triton kernels behind the custom op `vismmoe::decode_experts` (opaque to
torch.compile). `decode_experts_reference` is the plain torch version: the CPU path and the tests' reference.
"""

from __future__ import annotations

import torch

try:                                    # the GPU path; the CPU runs the torch reference
    import triton
    import triton.language as tl
except ImportError:                     # pragma: no cover - CPU installs without triton
    triton = None


def decode_experts_reference(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, blobs: torch.Tensor,
                             inter: int) -> torch.Tensor:
    """x [T, H], topk [T, K], weights [T, K], blobs [P, numel] (pair p's expert blob, p = t*K + k) -> [T, H].

    Rounds where the kernels round: gate/up outputs, the activation and its product, and the down output are in
    x's dtype; accumulation, the routing weight and the sum over K in float32."""
    T, K = topk.shape
    H = x.shape[-1]
    gu = blobs[:, : 2 * inter * H].view(-1, 2 * inter, H)                           # [P, 2I, H]
    dn = blobs[:, 2 * inter * H: 2 * inter * H + H * inter].view(-1, H, inter)     # [P, H, I]
    xp = x.repeat_interleave(K, dim=0).float()                                       # [P, H]
    g = torch.einsum("ph,pih->pi", xp, gu[:, :inter].float()).to(x.dtype)          # [P, I]
    u = torch.einsum("ph,pih->pi", xp, gu[:, inter:].float()).to(x.dtype)          # [P, I]
    h = (torch.nn.functional.silu(g.float()).to(x.dtype).float() * u.float()).to(x.dtype)
    y = torch.einsum("pi,phi->ph", h.float(), dn.float()).to(x.dtype)               # [P, H]
    y = y.float() * weights.reshape(-1, 1).float()
    return y.view(T, K, H).sum(1).to(x.dtype)


if triton is not None:
    @triton.jit
    def _gate_up_kernel(x_ptr, topk_ptr, w_ptr, addr_ptr, h_ptr, ridx_ptr, rw_ptr,
                        K: tl.constexpr, H: tl.constexpr, I: tl.constexpr,
                        BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
        p = tl.program_id(0)                        # pair t*K + k
        ib = tl.program_id(1)
        t = p // K
        e = tl.load(topk_ptr + p)
        if ib == 0:                                 # the routing, for the host's bookkeeping after the step
            tl.store(ridx_ptr + p, e.to(tl.int64))
            tl.store(rw_ptr + p, tl.load(w_ptr + p).to(tl.float32))
        base = tl.load(addr_ptr + e).to(tl.pointer_type(x_ptr.dtype.element_ty))
        rows = ib * BLOCK_I + tl.arange(0, BLOCK_I)
        rmask = rows < I
        acc_g = tl.zeros([BLOCK_I], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_I], dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):
            cols = h0 + tl.arange(0, BLOCK_H)
            cmask = cols < H
            xv = tl.load(x_ptr + t * H + cols, mask=cmask, other=0.0).to(tl.float32)
            m2 = rmask[:, None] & cmask[None, :]
            wg = tl.load(base + rows[:, None] * H + cols[None, :], mask=m2, other=0.0)
            wu = tl.load(base + (rows[:, None] + I) * H + cols[None, :], mask=m2, other=0.0)
            acc_g += tl.sum(wg.to(tl.float32) * xv[None, :], axis=1)
            acc_u += tl.sum(wu.to(tl.float32) * xv[None, :], axis=1)
        dt = x_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        tl.store(h_ptr + p * I + rows, (act * u).to(dt), mask=rmask)

    @triton.jit
    def _down_kernel(h_ptr, topk_ptr, w_ptr, addr_ptr, y_ptr,
                     H: tl.constexpr, I: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr):
        p = tl.program_id(0)
        ob = tl.program_id(1)
        e = tl.load(topk_ptr + p)
        dt = h_ptr.dtype.element_ty
        base = tl.load(addr_ptr + e).to(tl.pointer_type(dt)) + 2 * I * H
        rows = ob * BLOCK_O + tl.arange(0, BLOCK_O)
        rmask = rows < H
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < I
            hv = tl.load(h_ptr + p * I + cols, mask=cmask, other=0.0).to(tl.float32)
            wd = tl.load(base + rows[:, None] * I + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
            acc += tl.sum(wd.to(tl.float32) * hv[None, :], axis=1)
        y = acc.to(dt).to(tl.float32) * tl.load(w_ptr + p).to(tl.float32)
        tl.store(y_ptr + p * H + rows, y, mask=rmask)


# block sizes per pass; chosen on the H200 for the 30B shape (H 2048, I 768) by bench/fast_step.py's kernel sweep
GATE_UP_BLOCKS = {"BLOCK_I": 16, "BLOCK_H": 256, "num_warps": 4}
DOWN_BLOCKS = {"BLOCK_O": 32, "BLOCK_K": 256, "num_warps": 4}


def gate_up_pass(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor, h: torch.Tensor,
                 route_idx: torch.Tensor, route_w: torch.Tensor, blocks: dict | None = None) -> None:
    """h [P, I] = silu(x @ gate^T) * (x @ up^T) per pair; records the routing. x [T, H] contiguous."""
    P, inter = h.shape
    b = dict(GATE_UP_BLOCKS, **(blocks or {}))
    _gate_up_kernel[(P, triton.cdiv(inter, b["BLOCK_I"]))](
        x, topk, weights, addr, h, route_idx, route_w, K=topk.shape[-1], H=x.shape[-1], I=inter,
        BLOCK_I=b["BLOCK_I"], BLOCK_H=b["BLOCK_H"], num_warps=b["num_warps"], num_stages=b.get("num_stages", 3))


def down_pass(h: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor, y: torch.Tensor,
              blocks: dict | None = None) -> None:
    """y [P, H] (float32) = (h @ down^T) * routing weight per pair."""
    P, inter = h.shape
    H = y.shape[-1]
    b = dict(DOWN_BLOCKS, **(blocks or {}))
    _down_kernel[(P, triton.cdiv(H, b["BLOCK_O"]))](
        h, topk, weights, addr, y, H=H, I=inter, BLOCK_O=b["BLOCK_O"], BLOCK_K=b["BLOCK_K"],
        num_warps=b["num_warps"], num_stages=b.get("num_stages", 3))


def decode_experts_triton(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor,
                          route_idx: torch.Tensor, route_w: torch.Tensor, inter: int,
                          gate_up_blocks: dict | None = None, down_blocks: dict | None = None) -> torch.Tensor:
    """The two Triton passes (see the module docstring); x [T, H], addr [E] int64 -> [T, H]."""
    T, K = topk.shape
    H = x.shape[-1]
    x, topk, weights = x.contiguous(), topk.contiguous(), weights.contiguous()
    h = x.new_empty(T * K, inter)
    y = torch.empty(T * K, H, device=x.device, dtype=torch.float32)
    gate_up_pass(x, topk, weights, addr, h, route_idx, route_w, gate_up_blocks)
    down_pass(h, topk, weights, addr, y, down_blocks)
    return y.view(T, K, H).sum(1).to(x.dtype)


@torch.library.custom_op("vismmoe::decode_experts", mutates_args=("route_idx", "route_w"))
def decode_experts(x: torch.Tensor, topk: torch.Tensor, weights: torch.Tensor, addr: torch.Tensor,
                   route_idx: torch.Tensor, route_w: torch.Tensor, inter: int) -> torch.Tensor:
    """Routed experts of a few tokens read through the address table `addr`; records the routing. CUDA only."""
    return decode_experts_triton(x, topk, weights, addr, route_idx, route_w, inter)


@decode_experts.register_fake
def _(x, topk, weights, addr, route_idx, route_w, inter):
    return torch.empty_like(x)
