"""ERNIE 4.5 VL MoE (`model_type: ernie4_5_vl_moe`): every MoE layer has two banks of routed experts, text and
vision, of different widths (`moe_intermediate_size = [text, vision]`), each with its own router, plus resident
shared experts; the first layers are dense. A token goes to one bank by its type: `moe_mm_token_type_ids`
(image tokens and the image start/end tokens: vision; the rest: text). Without it every token silently goes to
the text experts, so the prepared inputs always carry it. M-RoPE positions as Qwen's (`get_rope_index`).

Routing (each bank): softmax over the bank's experts, top-k chosen on the probabilities plus a score-correction
bias (`moe_statics.e_score_correction_bias`), weights the unbiased probabilities of the chosen experts,
renormalised. Not the top-k of one linear map: the gate predictor runs each router.

How the runtime sees the banks: each (layer, bank) is an expert group of its own in the runtime's key space, with
keys `(group, expert)`: group `l` is layer l's text bank, group `1000 + l` its vision bank (`bank_group`,
`group_bank`). Statistics per layer list groups. The slot pool has one slot size, the wider
(text) bank's: a vision expert sits in a slot zero-padded, which computes exactly what the narrow expert does
(formats.base.pad_experts) and moves its padded bytes. The vision groups come first in the MoE layer order, so
lookahead follows each bank's own chain of layers (a text bank predicts the next text banks, as decode needs),
and they are prefill-only (`ExpertGeometry.prefill_only`): decode tokens are text, so once the prompt is done
the vision experts leave the cache and decode has every slot for text experts. The fast decode step's address
table holds the text banks alone (`ExpertGeometry.decode_layers`), whose width is the slot's.

Checkpoint layout: hub files and `save_pretrained` keep one per-expert list of 2E experts per layer under
`model.layers.{l}.mlp.experts` (text 0..E-1, vision E..2E-1, each at its own width), the routers transposed
(`mlp.gate.weight [H, E]` text, `mlp.gate.weight_1` vision) and both banks' score biases in one tensor
(`mlp.moe_statics.e_score_correction_bias [2, E]`); transformers' own layout (`save_original_format=False`)
fuses each bank under its own name. The checkpoint reader finds each bank either way (`ExpertBank`).

Prompt tokens (`<|IMAGE_START|>`, `<|IMAGE_PLACEHOLDER|>`, `<|IMAGE_END|>`) were not checked against the real
tokenizer.
"""

from __future__ import annotations

import torch
from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration
from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import Ernie4_5_VLMoeImageProcessorPil

from ..offload.store import ExpertBank
from .base import Encoded, ExpertGeometry, Family, Tokens

BANKS = ("text", "vision")

_TEMPLATE = (
    "<|begin_of_sentence|>{% for message in messages %}"
    "{{ 'User: ' if message['role'] == 'user' else 'Assistant: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)


VISION_GROUPS = 1000         # expert group of layer l's vision bank: 1000 + l (text bank: l)


def bank_group(layer: int, bank: str) -> int:
    """The runtime's expert group of `bank` ("text" or "vision") of decoder layer `layer`."""
    return layer + (VISION_GROUPS if bank == "vision" else 0)


def group_bank(group: int) -> tuple[int, str]:
    """(decoder layer, bank) of expert group `group`."""
    return (group - VISION_GROUPS, "vision") if group >= VISION_GROUPS else (group, "text")


class Ernie4_5_VLMoeFamily(Family):
    linear_topk_routers = False     # bias-corrected selection: not the top-k of one linear map
    model_type = "ernie4_5_vl_moe"
    model_class = Ernie4_5_VLMoeForConditionalGeneration
    image_processor_class = Ernie4_5_VLMoeImageProcessorPil
    tokens = Tokens(image="<|IMAGE_PLACEHOLDER|>", image_start="<|IMAGE_START|>", image_end="<|IMAGE_END|>",
                    eos=("</s>", "<|end_of_sentence|>"), pad="<unk>", extra=("<|begin_of_sentence|>",))
    fallback_format = "<|begin_of_sentence|>User: {image}{prompt}\nAssistant: "

    def geometry(self, config) -> ExpertGeometry:
        tc = config.text_config
        sparse = [i for i, kind in enumerate(tc.mlp_layer_types) if kind == "sparse"]
        vision = tuple(bank_group(l, "vision") for l in sparse)
        return ExpertGeometry(hidden=tc.hidden_size, inter=max(tc.moe_intermediate_size),
                              num_experts=tc.moe_num_experts, top_k=tc.moe_k, moe_layers=vision + tuple(sparse),
                              prefill_only=vision)

    def _bank(self, model, group: int) -> torch.nn.Module:
        layer, bank = group_bank(group)
        return getattr(self.decoder_layers(model)[layer].mlp, f"{bank}_moe")

    def moe_block(self, model, layer: int) -> torch.nn.Module:
        return self._bank(model, layer)                 # the bank's SparseMoeBlock: `.gate`, `.experts`

    def decoder_index(self, layer: int) -> int:
        return group_bank(layer)[0]

    def router_input(self, model, layer: int, embeds: torch.Tensor) -> torch.Tensor:
        real, _ = group_bank(layer)
        return self.decoder_layers(model)[real].post_attention_layernorm(embeds)

    def expert_prefix(self, layer: int) -> str:
        real, bank = group_bank(layer)
        return f"model.language_model.layers.{real}.mlp.{bank}_moe.experts"

    def expert_banks(self, config) -> dict[str, ExpertBank]:
        tc = config.text_config
        out = {}
        for group in self.geometry(config).moe_layers:
            layer, bank = group_bank(group)
            prefix = self.expert_prefix(group)
            i = BANKS.index(bank)
            out[prefix] = ExpertBank(inter=tc.moe_intermediate_size[i],
                                     fallback=f"model.language_model.layers.{layer}.mlp.experts",
                                     offset=i * tc.moe_num_experts)
        return out

    def convert_tensor(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The hub's transposed routers and joint score bias -> each bank's router weight [E, H] and bias [1, E]."""
        if name.endswith(".mlp.gate.weight"):
            return [(name.replace(".mlp.gate.weight", ".mlp.text_moe.gate.weight"), tensor.t())]
        if name.endswith(".mlp.gate.weight_1"):
            return [(name.replace(".mlp.gate.weight_1", ".mlp.vision_moe.gate.weight"), tensor.t())]
        if name.endswith(".mlp.moe_statics.e_score_correction_bias"):
            stem = name[: -len(".mlp.moe_statics.e_score_correction_bias")]
            return [(f"{stem}.mlp.{bank}_moe.gate.moe_statics.e_score_correction_bias", tensor[i: i + 1])
                    for i, bank in enumerate(BANKS)]
        return [(name, tensor)]

    # ---- inputs ----------------------------------------------------------------------------------------------
    def build_chat_inputs(self, tokenizer, image_processor, chats, images) -> dict:
        """The base inputs plus `moe_mm_token_type_ids`: 1 on image tokens and on the image start/end tokens."""
        out = super().build_chat_inputs(tokenizer, image_processor, chats, images)
        ids = [tokenizer.convert_tokens_to_ids(t) for t in (self.tokens.image_start, self.tokens.image_end)]
        out["moe_mm_token_type_ids"] = _moe_types(out["input_ids"], out["mm_token_type_ids"], ids)
        return out

    def extra_inputs(self, config, input_ids: torch.Tensor) -> dict:
        image = (input_ids == config.image_token_id).to(torch.int32)
        return {"moe_mm_token_type_ids": _moe_types(input_ids, image,
                                                    [config.image_start_token_id, config.image_end_token_id])}

    def encode(self, model, inputs: dict) -> Encoded:
        enc = super().encode(model, inputs)
        enc.per_token["moe_mm_token_type_ids"] = inputs["moe_mm_token_type_ids"]   # pruned with the tokens
        return enc

    def _decoder_extras(self, enc) -> dict:
        return {"moe_mm_token_type_ids": enc.per_token["moe_mm_token_type_ids"]}

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Ernie4_5_VLMoeConfig:
        """Text experts three times as wide as vision experts (as ERNIE-4.5-VL-28B-A3B's 1536 and 512)."""
        layers = o.get("layers", 4)
        first_dense = o.get("first_dense", 1)
        head_dim = o.get("head_dim", 16)
        half = head_dim // 2       # M-RoPE sections [h, w, t] with h == w (ERNIE interleaves h and w)
        t = half // 4 + (half - half // 4) % 2
        text = dict(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 128),
            num_hidden_layers=layers, num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2),
            moe_intermediate_size=[o.get("inter", 48), o.get("vision_inter_moe", 16)], moe_k=o.get("top_k", 2),
            moe_num_experts=o.get("experts", 8), moe_num_shared_experts=1,
            mlp_layer_types=["dense"] * first_dense + ["sparse"] * (layers - first_dense),
            max_position_embeddings=o.get("max_pos", 8192), tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                             "mrope_section": [(half - t) // 2, (half - t) // 2, t]},
            pad_token_id=token_ids["pad"], eos_token_id=token_ids["eos"], bos_token_id=None,
        )
        vision = dict(depth=o.get("vision_depth", 2), hidden_size=o.get("vision_hidden", 32), num_heads=2,
                      intermediate_size=o.get("vision_inter", 64), patch_size=14, spatial_merge_size=2)
        image = token_ids["image"]
        return Ernie4_5_VLMoeConfig(
            text_config=text, vision_config=vision, tie_word_embeddings=False, image_token_id=image,
            image_start_token_id=token_ids["image_start"], image_end_token_id=token_ids["image_end"],
            video_token_id=token_ids.get("video", image), video_start_token_id=token_ids.get("video_start", image),
            video_end_token_id=token_ids.get("video_end", image))

    def tiny_image_processor(self, max_side: int = 224) -> Ernie4_5_VLMoeImageProcessorPil:
        return Ernie4_5_VLMoeImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_side * max_side},
                                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _moe_types(input_ids: torch.Tensor, image_types: torch.Tensor, marker_ids: list[int]) -> torch.Tensor:
    """[B, T] 1 where a token goes to the vision bank (image tokens and the image start/end markers), else 0."""
    out = image_types.clone().to(torch.int32)
    for t in marker_ids:
        out[input_ids == t] = 1
    return out
