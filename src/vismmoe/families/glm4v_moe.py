"""GLM-4.5V (`model_type: glm4v_moe`): sigmoid router with score-correction bias and group-limited top-k,
dense first layers (`first_k_dense_replace`), one always-resident shared expert per MoE layer, M-RoPE with
partial rotary. The shared expert and the dense layers are ordinary weights: they stay on the device.

Checkpoint layouts of the routed experts: hub files hold one tensor per expert and projection
(`experts.{e}.gate_proj.weight [I, H]`, `up_proj [I, H]`, `down_proj [H, I]`); `save_pretrained` of a model built
in transformers 5 writes fused `experts.gate_up_proj [E, 2I, H]` and `experts.down_proj [E, H, I]`.
"""

from __future__ import annotations

from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

from .base import ExpertGeometry, Family, Tokens

_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Glm4vMoeFamily(Family):
    model_type = "glm4v_moe"
    model_class = Glm4vMoeForConditionalGeneration
    image_processor_class = Glm4vImageProcessorPil
    tokens = Tokens(
        image="<|image|>", image_start="<|begin_of_image|>", image_end="<|end_of_image|>",
        eos=("<|endoftext|>", "<|user|>"), pad="<|endoftext|>",
        extra=("[gMASK]", "<sop>", "<|assistant|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>"),
    )
    fallback_format = "[gMASK]<sop><|user|>\n{image}{prompt}<|assistant|>\n"

    def config_fields(self, config) -> list:
        tc = config.text_config
        layers = tc.num_hidden_layers
        return [("first_k_dense_replace", tc.first_k_dense_replace, 0, layers if isinstance(layers, int) else None)]

    def geometry(self, config) -> ExpertGeometry:
        tc = config.text_config
        moe = tuple(range(tc.first_k_dense_replace, tc.num_hidden_layers))
        return ExpertGeometry(hidden=tc.hidden_size, inter=tc.moe_intermediate_size, num_experts=tc.n_routed_experts,
                              top_k=tc.num_experts_per_tok, moe_layers=moe)

    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Glm4vMoeConfig:
        head_dim = o.get("head_dim", 16)
        rot = head_dim // 2 // 2      # partial rotary 0.5 -> rotary dim head_dim/2, split in halves for cos/sin
        section = [rot - 2 * (rot * 3 // 8), rot * 3 // 8, rot * 3 // 8]
        text = dict(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 128),
            moe_intermediate_size=o.get("inter", 48), num_hidden_layers=o.get("layers", 4),
            num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2), head_dim=head_dim,
            n_routed_experts=o.get("experts", 8), num_experts_per_tok=o.get("top_k", 2), n_shared_experts=1,
            first_k_dense_replace=o.get("first_dense", 1), n_group=o.get("n_group", 1),
            topk_group=o.get("topk_group", 1), norm_topk_prob=True,
            routed_scaling_factor=1.0, max_position_embeddings=o.get("max_pos", 8192), attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section,
                             "partial_rotary_factor": 0.5},
            router_aux_loss_coef=o.get("aux_loss", 0.001), tie_word_embeddings=False,
            eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )
        vision = dict(
            depth=o.get("vision_depth", 2), hidden_size=o.get("vision_hidden", 32),
            intermediate_size=o.get("vision_inter", 64), num_heads=o.get("vision_heads", 2),
            out_hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            image_size=o.get("vision_image_size", 224),
        )
        return Glm4vMoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False,
            image_token_id=token_ids["image"], video_token_id=token_ids.get("video", token_ids["image"] + 1),
            image_start_token_id=token_ids["image_start"], image_end_token_id=token_ids["image_end"],
            video_start_token_id=token_ids.get("video_start", token_ids["image_start"]),
            video_end_token_id=token_ids.get("video_end", token_ids["image_end"]),
        )

    def tiny_image_processor(self, max_side: int = 224):
        px = max_side * max_side
        return Glm4vImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                      size={"shortest_edge": 28 * 28, "longest_edge": px},
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
