"""Sizing of the device's expert budget: how many bytes the slot pool gets, from --expert-budget (bytes or a share
of all experts) or --device-memory (what the non-expert weights and the KV/activation reserve leave).

    resolve_budget(rc, layout, geometry, nonexpert, config, device) -> expert bytes (UserError below one top-k)
    estimate_reserve(config, geometry, max_seq, dtype, device)      -> KV cache + peak activations, in bytes
"""

from __future__ import annotations

import torch

from ..config import RuntimeConfig, format_size, parse_size
from ..errors import UserError


def resolve_budget(rc: RuntimeConfig, layout, geo, nonexpert: int, config, dev) -> int:
    """Expert bytes from --expert-budget (bytes or % of all experts, as stored in the run's expert format
    `layout`) or --device-memory; checks the minimum."""
    all_bytes = len(geo.moe_layers) * geo.num_experts * layout.nbytes
    least = geo.top_k * layout.nbytes
    if rc.expert_budget is not None:
        budget = parse_size(rc.expert_budget, total=all_bytes, what="expert budget")
    elif rc.device_memory is not None:
        total = parse_size(rc.device_memory, what="device memory")
        res = parse_size(rc.reserve, what="reserve") if rc.reserve else \
            estimate_reserve(config, geo, rc.max_seq, layout.dtype, dev)       # activations: compute dtype
        budget = total - nonexpert - res
        if budget < least:
            raise UserError(
                f"--device-memory {rc.device_memory} is too small: non-expert weights {format_size(nonexpert)} + "
                f"reserve {format_size(res)} + {geo.top_k} experts do not fit",
                f"give at least {format_size(nonexpert + res + least)}")
    else:
        budget = all_bytes
    if rc.device_profile:                   # the profile's memory caps the budget (profiles/memory.py)
        from ..profiles.memory import cap_budget
        budget = cap_budget(rc, budget, all_bytes, layout, geo, nonexpert, config, dev)
    if budget // layout.nbytes < geo.top_k:
        raise UserError(
            f"expert budget {format_size(budget)} holds {budget // layout.nbytes} experts of "
            f"{format_size(layout.nbytes)}; one layer's top-k needs {geo.top_k}",
            f"give at least --expert-budget {format_size(least)} ({least} bytes)")
    return int(budget)


def estimate_reserve(config, geometry, max_seq: int, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes a request needs on the device besides weights: KV cache + peak activations (an estimate).

    KV: 2 x layers x kv_heads x head_dim x max_seq. Activations: the MoE layer's pair buffers
    (max_seq x top_k x (3H + 3I)), attention projections, the vision tower's largest block, and logits of one
    position. A fixed margin covers library workspaces on CUDA. Override with --reserve when you know better.
    """
    tc, vc = getattr(config, "text_config", config), getattr(config, "vision_config", None)   # text-only: no vc
    b = torch.empty((), dtype=dtype).element_size()
    layers = _attention_layers(tc)                                  # [(kv_heads, head_dim)] per decoder layer
    kv = 2 * sum(kv_heads * hd for kv_heads, hd in layers) * max_seq * b
    H, I, K = geometry.hidden, geometry.inter, geometry.top_k
    moe = max_seq * K * (3 * H + 3 * I) * b * 2
    dense = max_seq * (4 * H + 2 * getattr(tc, "intermediate_size", 4 * H)) * b
    attn = max(max_seq * (tc.num_attention_heads + 2 * kv_heads) * hd * b * 2 for kv_heads, hd in layers)
    vision = 0
    if vc is not None:
        patches = max_seq * getattr(vc, "spatial_merge_size", 2) ** 2
        v_hidden, v_inter = _vision_width(vc)
        vision = patches * (4 * v_hidden + 2 * v_inter) * b * 2
    logits = tc.vocab_size * 4 * 4
    margin = 256 * 1024**2 if device.type == "cuda" else 16 * 1024**2
    return int(kv + max(moe, dense, attn, vision) + logits + margin)


def _attention_layers(tc) -> list[tuple[int, int]]:
    """(KV heads, head dim) of each decoder layer: the config's, or each layer's where they vary (Gemma 4's global
    layers are wider; its config refuses the global attribute then)."""
    try:
        hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        return [(tc.num_key_value_heads, hd)] * tc.num_hidden_layers
    except RuntimeError:
        per = tc.per_layer_config
        return [(per[i].num_key_value_heads, per[i].head_dim) for i in range(tc.num_hidden_layers)]


def _vision_width(vc) -> tuple[int, int]:
    """(hidden, intermediate) of the vision tower's widest part (DeepSeek-OCR-2's has two encoders)."""
    parts = [vc] + [getattr(vc, n) for n in ("sam_config", "encoder_config") if getattr(vc, n, None) is not None]
    widths = [(p.hidden_size, getattr(p, "intermediate_size", None) or getattr(p, "mlp_dim", None)
               or 4 * p.hidden_size) for p in parts if getattr(p, "hidden_size", None)]
    return max(widths)
