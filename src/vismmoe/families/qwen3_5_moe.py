"""Qwen3.5-MoE (`model_type: qwen3_5_moe`), the natively multimodal Qwen MoE line: every decoder layer is MoE
(softmax top-k router, renormalised) with one shared expert behind a sigmoid gate; 3 of every 4 layers mix tokens
with Gated-DeltaNet linear attention instead of softmax attention (layer 0 has no `self_attn`); M-RoPE through
`mm_token_type_ids` with partial rotary (a quarter of each head) and no DeepStack.

What the runtime needs differs from Qwen3-VL-MoE (families/qwen3_vl_moe.py) only where said here:
- The KV cache is hybrid: `DynamicCache(config=...)` gives linear-attention layers their recurrent state and
  convolution window and full-attention layers their keys and values; the eager decode runs on it unchanged. The
  fast decode step takes both over from it (`static_cache`: static KV for full attention, a
  `step.static_cache.StaticLinearState` for each Gated-DeltaNet layer, which gets no mask: `decode_masks`).
- The shared expert (`mlp.shared_expert`, `mlp.shared_expert_gate`) is not a routed expert: it stays resident.
- Queries of the gated attention come with their output gate (`q_proj` gives 2 x head_dim per head): the
  query/key probe takes the query half.

Checkpoint layout: hub files and `save_pretrained` store routed experts per expert
(`mlp.experts.{e}.gate_proj.weight [I, H]`, `up_proj [I, H]`, `down_proj [H, I]`) under the model's names.
"""

from __future__ import annotations

import torch
from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

from .base import ExpertGeometry
from .qwen3_vl_moe import Qwen3VLMoeFamily


class Qwen3_5MoeFamily(Qwen3VLMoeFamily):
    linear_topk_routers = True      # Qwen3_5MoeTopKRouter: top-k of softmax(linear(h)) = top-k of linear(h)
    model_type = "qwen3_5_moe"
    model_class = Qwen3_5MoeForConditionalGeneration

    def config_fields(self, config) -> list:
        return []                   # every layer is an MoE layer: nothing places them

    def geometry(self, config) -> ExpertGeometry:
        tc = config.text_config
        return ExpertGeometry(hidden=tc.hidden_size, inter=tc.moe_intermediate_size, num_experts=tc.num_experts,
                              top_k=tc.num_experts_per_tok, moe_layers=tuple(range(tc.num_hidden_layers)))

    def static_cache(self, model, B: int, L: int, pos: torch.Tensor, dtype, device) -> list:
        """Static KV for the full-attention layers, the Gated-DeltaNet layers' convolution window and recurrent
        state (`step.static_cache.StaticLinearState`) for the rest."""
        from ..step.static_cache import StaticLinearState
        kv = super().static_cache(model, B, L, pos, dtype, device)
        types = self.text_config(model.config).layer_types
        return [StaticLinearState() if kind == "linear_attention" else c for c, kind in zip(kv, types)]

    def decode_masks(self, model, mask: torch.Tensor, pos: torch.Tensor) -> list:
        """No mask for the Gated-DeltaNet layers (a decode token is never padding, as transformers has it)."""
        types = self.text_config(model.config).layer_types
        return [None if kind == "linear_attention" else mask for kind in types]

    def _decoder_extras(self, enc) -> dict:
        return {}                   # no DeepStack

    @staticmethod
    def _queries(attn, x: torch.Tensor) -> torch.Tensor:
        q = attn.q_proj(x).view(x.shape[0], -1, 2 * attn.head_dim)         # [N, heads, query | output gate]
        return q[..., : attn.head_dim]

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Qwen3_5MoeConfig:
        head_dim = o.get("head_dim", 32)
        half = head_dim // 4 // 2   # partial rotary 0.25 -> rotary dim head_dim/4, split in halves for cos/sin
        section = [half - 2 * (half // 4), half // 4, half // 4]
        text = dict(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), num_hidden_layers=o.get("layers", 4),
            num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2), head_dim=head_dim,
            linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, moe_intermediate_size=o.get("inter", 48),
            shared_expert_intermediate_size=o.get("shared_inter", 48), num_experts=o.get("experts", 8),
            num_experts_per_tok=o.get("top_k", 2), max_position_embeddings=o.get("max_pos", 8192),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                             "mrope_interleaved": True, "partial_rotary_factor": 0.25},
            router_aux_loss_coef=o.get("aux_loss", 0.001), tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )
        vision = dict(
            depth=o.get("vision_depth", 2), hidden_size=o.get("vision_hidden", 32),
            intermediate_size=o.get("vision_inter", 64), num_heads=o.get("vision_heads", 2),
            out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=o.get("vision_positions", 196),
        )
        return Qwen3_5MoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False,
            image_token_id=token_ids["image"], video_token_id=token_ids.get("video", token_ids["image"] + 1),
            vision_start_token_id=token_ids["image_start"], vision_end_token_id=token_ids["image_end"],
        )
