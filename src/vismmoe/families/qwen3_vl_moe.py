"""Qwen3-VL-MoE (`model_type: qwen3_vl_moe`): softmax top-k router, every layer MoE unless listed dense,
DeepStack visual features injected into the first decoder layers, M-RoPE positions.

Checkpoint layouts of the routed experts: hub files hold fused `experts.gate_up_proj [E, H, 2I]` and
`experts.down_proj [E, I, H]`; `save_pretrained` of a model built in transformers 5 writes `[E, 2I, H]` and
`[E, H, I]`. The store tells them apart by shape.
"""

from __future__ import annotations

from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from .base import ExpertGeometry, Family, Tokens
from .qwen3_moe import moe_geometry

_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Qwen3VLMoeFamily(Family):
    linear_topk_routers = True      # Qwen3VLMoeTextTopKRouter: top-k of softmax(linear(h)) = top-k of linear(h)
    model_type = "qwen3_vl_moe"
    model_class = Qwen3VLMoeForConditionalGeneration
    image_processor_class = Qwen2VLImageProcessorPil
    tokens = Tokens(
        image="<|image_pad|>", image_start="<|vision_start|>", image_end="<|vision_end|>",
        eos=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>",
        extra=("<|im_start|>", "<|video_pad|>"),
    )
    fallback_format = "<|im_start|>user\n{image}{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def config_fields(self, config) -> list:
        tc = config.text_config
        layers = tc.num_hidden_layers
        return [("decoder_sparse_step", tc.decoder_sparse_step, 1, None)] + \
            [(f"mlp_only_layers[{i}]", v, 0, layers - 1 if isinstance(layers, int) else None)
             for i, v in enumerate(tc.mlp_only_layers or [])]

    def geometry(self, config) -> ExpertGeometry:
        return moe_geometry(config.text_config)          # the Qwen3-MoE decoder's rule

    def _decoder_extras(self, enc) -> dict:
        if enc.deepstack is None:
            return {}
        return {"visual_pos_masks": enc.visual, "deepstack_visual_embeds": enc.deepstack}

    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Qwen3VLMoeConfig:
        head_dim = o.get("head_dim", 16)
        quarter = head_dim // 2
        section = [quarter - 2 * (quarter * 3 // 8), quarter * 3 // 8, quarter * 3 // 8]
        text = dict(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 128),
            moe_intermediate_size=o.get("inter", 48), num_hidden_layers=o.get("layers", 4),
            num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2), head_dim=head_dim,
            num_experts=o.get("experts", 8), num_experts_per_tok=o.get("top_k", 2), decoder_sparse_step=1,
            mlp_only_layers=o.get("dense_layers", []), max_position_embeddings=o.get("max_pos", 8192),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                             "mrope_interleaved": True},
            router_aux_loss_coef=o.get("aux_loss", 0.001), tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )
        vdepth = o.get("vision_depth", 2)
        vision = dict(
            depth=vdepth, hidden_size=o.get("vision_hidden", 32), intermediate_size=o.get("vision_inter", 64),
            num_heads=o.get("vision_heads", 2), out_hidden_size=text["hidden_size"], patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=o.get("vision_positions", 196),
            deepstack_visual_indexes=o.get("deepstack", list(range(min(vdepth, 2)))),
        )
        return Qwen3VLMoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False,
            image_token_id=token_ids["image"], video_token_id=token_ids.get("video", token_ids["image"] + 1),
            vision_start_token_id=token_ids["image_start"], vision_end_token_id=token_ids["image_end"],
        )

    def tiny_image_processor(self, max_side: int = 224):
        px = max_side * max_side
        return Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                        min_pixels=32 * 32, max_pixels=px,
                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
