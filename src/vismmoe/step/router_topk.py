"""The fast decode step's router tail in one kernel: softmax over a token's E router logits, its top-k, then the
renormalisation or scaling of the chosen weights.

transformers' softmax top-k routers run the tail as several kernels a MoE layer (a softmax, torch's two top-k
kernels, a sum and a division: about 13 us a layer on an H100, where the layer's whole attention is about 20); at a few
rows each is launch-bound. `softmax_topk` does it in one Triton program per row: the logits in float32, their max and
sum of exponentials, then k rounds of (max, first index holding it, masked out).

    softmax_topk(logits [T, E], k, renorm, scale) -> (weights [T, k] float32, indices [T, k] int64)
        weights = softmax(logits)[indices] (/ their sum when renorm) * scale; indices by descending weight, ties to
        the lower expert id. CUDA: the kernel (a torch custom op, so torch.compile and CUDA graphs take it as it is);
        elsewhere the torch reference (`reference`), which the tests hold the kernel to under Triton's interpreter.

    ROUTERS: the transformers router classes whose forward is exactly "logits = linear(h, W) (in float32 for
    DeepSeek), softmax, top-k, then renorm or scale"; `FusedRouter(original, form_of(original))` stands in for one
    while the decode body runs (graphs.StepGraphs.active) and returns what it returns: (logits, weights in the
    original's dtype, indices).

Numerics: the same weights up to float32 rounding (the kernel's exp and sums are not torch's), and the same expert
set unless two probabilities are that close (ties go to the lower id; torch's order there is its kernel's). The
budgeted steps stay exact against the same step with every expert resident. `--fuse-kernels off` keeps
transformers' tail.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe_kernel import triton
from .standins import StandIns

MAX_K = 32          # the kernel's rounds are unrolled: one per chosen expert

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _softmax_topk_kernel(x_ptr, w_ptr, i_ptr, E: tl.constexpr, K: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_K: tl.constexpr, RENORM: tl.constexpr, scale):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK_E)
        inside = e < E
        x = tl.load(x_ptr + t * E + e, mask=inside, other=-float("inf")).to(tl.float32)
        p = tl.exp(x - tl.max(x, axis=0))
        p = tl.where(inside, p, 0.0)
        total = tl.sum(p, axis=0)
        left = tl.where(inside, p, -1.0)                    # a taken or padding expert never wins again
        k = tl.arange(0, BLOCK_K)
        wv = tl.zeros([BLOCK_K], dtype=tl.float32)          # the chosen weights and ids stay in registers
        iv = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(K):
            v = tl.max(left, axis=0)
            # the first expert holding the max (NaN logits match none: the last id, never one past the table)
            i = tl.minimum(tl.min(tl.where(left == v, e, BLOCK_E), axis=0), E - 1)
            wv = tl.where(k == j, v, wv)
            iv = tl.where(k == j, i.to(tl.int64), iv)
            left = tl.where(e == i, -1.0, left)
        if RENORM:
            wv = wv / tl.sum(wv, axis=0)                    # p / sum of the chosen p: the softmax's sum cancels
        else:
            wv = wv / total
        tl.store(w_ptr + t * K + k, wv * scale, mask=k < K)
        tl.store(i_ptr + t * K + k, iv, mask=k < K)


def reference(logits: torch.Tensor, k: int, renorm: bool, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch form of `softmax_topk` (the routers' own ops; ties as torch.topk breaks them)."""
    probs = torch.softmax(logits.float(), dim=-1)
    w, idx = torch.topk(probs, k, dim=-1)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w * scale, idx


def softmax_topk_triton(logits: torch.Tensor, k: int, renorm: bool, scale: float = 1.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax_topk` by the kernel (CUDA, or CPU tensors under Triton's interpreter); k at most `MAX_K`."""
    T, E = logits.shape
    x = logits.contiguous()
    w = torch.empty(T, k, dtype=torch.float32, device=x.device)
    idx = torch.empty(T, k, dtype=torch.int64, device=x.device)
    if T:
        _softmax_topk_kernel[(T,)](x, w, idx, E=E, K=k, BLOCK_E=triton.next_power_of_2(E),
                                   BLOCK_K=triton.next_power_of_2(k), RENORM=renorm, scale=float(scale),
                                   num_warps=1 if E <= 256 else 4)
    return w, idx


@torch.library.custom_op("vismmoe::softmax_topk", mutates_args=())
def softmax_topk(logits: torch.Tensor, k: int, renorm: bool, scale: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Module docstring. logits [T, E] (any float dtype) -> (weights [T, k] float32, indices [T, k] int64)."""
    if logits.is_cuda and triton is not None:
        return softmax_topk_triton(logits, k, renorm, scale)
    return reference(logits, k, renorm, scale)


@softmax_topk.register_fake
def _(logits, k, renorm, scale=1.0):
    T = logits.shape[0]
    return logits.new_empty(T, k, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.int64)


def _qwen(router) -> dict:
    return {"fp32": False, "renorm": bool(getattr(router, "norm_topk_prob", True)), "scale": 1.0, "weights": None}


def _deepseek(router) -> dict | None:
    if getattr(router, "topk_method", None) != "greedy":            # group-limited: not this kernel's form
        return None
    return {"fp32": True, "renorm": False, "scale": float(router.routed_scaling_factor), "weights": torch.float32}


# exact class name -> the form of its forward (a subclass may change it: exact names only)
ROUTERS = {"Qwen3VLMoeTextTopKRouter": _qwen, "Qwen3MoeTopKRouter": _qwen, "Qwen3_5MoeTopKRouter": _qwen,
           "DeepseekOcr2TextTopkRouter": _deepseek}


def form_of(router: nn.Module) -> dict | None:
    """How `router` computes its routing, when it is one of `ROUTERS` with a top-k of at most `MAX_K`; else None."""
    make = ROUTERS.get(type(router).__name__)
    if make is None or not hasattr(router, "weight") or not 0 < router.top_k <= min(MAX_K, router.weight.shape[0]):
        return None
    return make(router)


class FusedRouter(nn.Module):
    """Stands in for a router of `ROUTERS` (module docstring): the same logits, the tail in one kernel."""

    def __init__(self, original: nn.Module, form: dict):
        super().__init__()
        self.original, self.form = original, form
        self.top_k, self.hidden_dim = original.top_k, original.hidden_dim

    def forward(self, hidden_states: torch.Tensor):
        r, f = self.original, self.form
        h = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(h.float(), r.weight.float()) if f["fp32"] else F.linear(h, r.weight)
        w, idx = softmax_topk(logits, self.top_k, f["renorm"], f["scale"])
        return logits, w.to(f["weights"] or logits.dtype), idx


def router_stand_ins(model, family, layers) -> StandIns:
    """A `FusedRouter` for each MoE layer of `layers` whose router is one of `ROUTERS` (its parent: the layer's
    MoE block)."""
    entries = []
    for layer in layers:
        router, block = family.router(model, layer), family.moe_block(model, layer)
        form = form_of(router)
        name = next((n for n, m in block._modules.items() if m is router), None)
        if form is not None and name is not None:
            entries.append((block, name, router, FusedRouter(router, form)))
    return StandIns(entries)
