"""Qwen3-MoE, text only (`model_type: qwen3_moe`, `Qwen3MoeForCausalLM`: Qwen3-30B-A3B, Qwen3-235B-A22B): the
decoder the VL families are built on (InternVL3.5's text model is this one), with no vision tower.

- Routing: softmax over the experts, top-k, renormalised when `norm_topk_prob` (the published checkpoints set it):
  the top-k of one linear map, so the gate predictor scores the routers ahead in one matmul.
- Positions: 1-D RoPE (families/rope1d.py); the fast decode step runs it.
- The config is flat (no `text_config`): `text_config(config)` is the config itself; the decoder is `model.model`.
- Checkpoint layout: hub files and `save_pretrained` store routed experts per expert under the model's names
  (`model.layers.{l}.mlp.experts.{e}.gate_proj.weight [I, H]`, `up_proj [I, H]`, `down_proj [H, I]`), routers as
  `model.layers.{l}.mlp.gate.weight [E, H]`; `vismmoe make-shape` writes this layout too, so other runtimes that
  load `Qwen3MoeForCausalLM` checkpoints read the very same files.
- Prompts: Qwen3's chat template renders a message's content only when it is a string (a list of parts becomes
  ''), so text parts are joined into one string before the template runs; an image is refused with one line
  (families/text_only.py, shared with the other text-only families).

Helpers shared with InternVL (whose text model this is): `moe_geometry` and `tiny_text_config`.
"""

from __future__ import annotations

from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from .base import ExpertGeometry, Family, Tokens
from .rope1d import Rope1D
from .text_only import TextOnly

# the shape of Qwen3's own template where it matters here: content only when it is a string, ChatML turns
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set content = message['content'] %}{% else %}{% set content = '' %}"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def moe_geometry(tc) -> ExpertGeometry:
    """Expert geometry of a Qwen3-MoE text config (its `mlp_only_layers` are dense; otherwise every
    `decoder_sparse_step`-th layer is MoE)."""
    dense = set(tc.mlp_only_layers or [])
    moe = tuple(i for i in range(tc.num_hidden_layers)
                if i not in dense and tc.num_experts > 0 and (i + 1) % tc.decoder_sparse_step == 0)
    return ExpertGeometry(hidden=tc.hidden_size, inter=tc.moe_intermediate_size, num_experts=tc.num_experts,
                          top_k=tc.num_experts_per_tok, moe_layers=moe)


def tiny_text_config(token_ids: dict[str, int], vocab_size: int, **o) -> dict:
    """Keyword arguments of a tiny random `Qwen3MoeConfig` (overrides `o`: hidden, inter, layers, experts, top_k,
    heads, kv_heads, head_dim, dense_inter, dense_layers, max_pos, aux_loss, attention_bias)."""
    return dict(
        vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 128),
        moe_intermediate_size=o.get("inter", 48), num_hidden_layers=o.get("layers", 4),
        num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2),
        head_dim=o.get("head_dim", 16), num_experts=o.get("experts", 8), num_experts_per_tok=o.get("top_k", 2),
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=o.get("dense_layers", []),
        max_position_embeddings=o.get("max_pos", 8192), rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        router_aux_loss_coef=o.get("aux_loss", 0.001), tie_word_embeddings=False,
        attention_bias=o.get("attention_bias", False),
        bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
    )


class Qwen3MoeFamily(TextOnly, Rope1D, Family):
    linear_topk_routers = True      # Qwen3MoeTopKRouter: top-k of softmax(linear(h)) = top-k of linear(h)
    model_type = "qwen3_moe"
    model_class = Qwen3MoeForCausalLM
    hub_experts = "per_expert"
    hub_config_names = {"num_local_experts": "num_experts"}   # Qwen/Qwen3-30B-A3B's config.json says num_experts
    tokens = Tokens(image="", image_start="", image_end="", eos=("<|im_end|>", "<|endoftext|>"),
                    pad="<|endoftext|>", extra=("<|im_start|>",))
    fallback_format = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def geometry(self, config) -> ExpertGeometry:
        return moe_geometry(config)

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Qwen3MoeConfig:
        return Qwen3MoeConfig(**tiny_text_config(token_ids, vocab_size, **o))
