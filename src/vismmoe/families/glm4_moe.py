"""GLM-4.5 / GLM-4.5-Air, text only (`model_type: glm4_moe`, transformers' `Glm4MoeForCausalLM`): GLM-4.5V's decoder
(families/glm4v_moe.py) without its vision tower, with 1-D RoPE.

- Routing: GLM-4.5V's, the same transformers code: a sigmoid router with a score-correction bias and group-limited
  top-k (`n_group`, `topk_group`), weights renormalised when `norm_topk_prob` and scaled by `routed_scaling_factor`;
  not the top-k of one linear map, so the gate predictor runs each router as the model does.
- Layers: the first `first_k_dense_replace` are dense; each MoE layer has `n_shared_experts` always-resident shared
  experts (ordinary weights) beside its routed ones.
- Positions: 1-D RoPE over part of each head (`partial_rotary_factor`; families/rope1d.py); the fast decode step runs
  it. Attention has biased q/k/v projections and optional q/k norms (`use_qk_norm`).
- Checkpoints: hub files and `save_pretrained` store routed experts per expert under the model's names
  (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight [I, H]`, `up_proj`, `down_proj [H, I]`); the fused layout
  (`save_original_format=False`) is read too. The next-token-prediction layers of the hub files
  (`num_mtp_layers`) are not part of `Glm4MoeForCausalLM` and are not read.
- Prompts: GLM's chat format (`[gMASK]<sop>`, `<|user|>`, `<|assistant|>`); text only (families/text_only.py).
"""

from __future__ import annotations

from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

from .base import ExpertGeometry, Family, Tokens
from .rope1d import Rope1D
from .text_only import TextOnly

_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class Glm4MoeFamily(TextOnly, Rope1D, Family):
    model_type = "glm4_moe"
    model_class = Glm4MoeForCausalLM
    hub_experts = "per_expert"
    # the end of an answer: the text's end, and the turns that follow an assistant's (a user's, a tool result's)
    tokens = Tokens(image="", image_start="", image_end="", eos=("<|endoftext|>", "<|user|>", "<|observation|>"),
                    pad="<|endoftext|>", extra=("[gMASK]", "<sop>", "<|system|>", "<|assistant|>"))
    fallback_format = "[gMASK]<sop><|user|>\n{prompt}<|assistant|>\n"

    def config_fields(self, config) -> list:
        layers = config.num_hidden_layers
        return [("first_k_dense_replace", config.first_k_dense_replace, 0, layers if isinstance(layers, int) else None)]

    def geometry(self, config) -> ExpertGeometry:
        moe = tuple(range(config.first_k_dense_replace, config.num_hidden_layers))
        return ExpertGeometry(hidden=config.hidden_size, inter=config.moe_intermediate_size,
                              num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok, moe_layers=moe)

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Glm4MoeConfig:
        return Glm4MoeConfig(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 128),
            moe_intermediate_size=o.get("inter", 48), num_hidden_layers=o.get("layers", 4),
            num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2),
            head_dim=o.get("head_dim", 16), n_routed_experts=o.get("experts", 8),
            num_experts_per_tok=o.get("top_k", 2), n_shared_experts=1, first_k_dense_replace=o.get("first_dense", 1),
            # two expert groups of which one is chosen, weights scaled by 2.5 (a factor other than 1): both
            # routing steps run in every test of the tiny model
            n_group=o.get("n_group", 2), topk_group=o.get("topk_group", 1), norm_topk_prob=True,
            routed_scaling_factor=o.get("scaling", 2.5), use_qk_norm=o.get("qk_norm", True),
            max_position_embeddings=o.get("max_pos", 8192), attention_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            tie_word_embeddings=False, bos_token_id=None, eos_token_id=token_ids["eos"],
            pad_token_id=token_ids["pad"])
