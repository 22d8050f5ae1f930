"""DeepSeek-OCR-2 (`model_type: deepseek_ocr2`): a SAM ViT-B encoder, a small causal LM used as vision encoder
(learned queries read the SAM features), an MoE text decoder (DeepSeek-3B-MoE class) with 1-D RoPE.

Routing: softmax over the routed experts, then greedy top-k or group-limited greedy top-k (`topk_method`), weights
scaled by `routed_scaling_factor` and not renormalised; shared experts (`mlp.shared_experts`, a dense MLP of
`n_shared_experts` experts' width) are ordinary weights and stay resident; the first layers are dense
(`mlp_layer_types`). transformers fuses the routed experts into one bank per layer (`@use_experts_implementation`).

Images: `DeepseekOcr2ImageProcessorPil` (PIL) makes a global view (the image scaled and padded to a square of
`size`) and, when the image is larger than a tile, 2 to 6 local tiles of `tile_size`. The token count is fixed
by the vision tower's learned queries, not by the image: 256 for the global view, 144 for each tile, and one view
separator: an image is `<image>` x (144 x tiles + 256 + 1). The visual sequence is local tiles, global view,
separator (no grid): compression sees it as one line of tokens.

Checkpoint layout: hub files and `save_pretrained` keep the original names (`model.layers.{l}...`,
`model.sam_model...`, `model.qwen2_model...`, `model.view_seperator`) and store experts per expert; the checkpoint
reader maps the names through transformers' renamings.
"""

from __future__ import annotations

import torch
from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil

from .base import Encoded, ExpertGeometry, Family, Tokens
from .rope1d import Rope1D

BOS = "<｜begin▁of▁sentence｜>"
_TEMPLATE = (
    BOS + "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
)

GLOBAL_TOKENS, TILE_TOKENS = 256, 144       # the vision tower's learned queries: 16 x 16 global, 12 x 12 a tile


class DeepseekOcr2Family(Rope1D, Family):
    linear_topk_routers = True      # greedy: top-k of softmax(linear(h)) = top-k of linear(h) (see below)
    model_type = "deepseek_ocr2"
    model_class = DeepseekOcr2ForConditionalGeneration
    image_processor_class = DeepseekOcr2ImageProcessorPil
    tokens = Tokens(image="<image>", image_start="", image_end="", eos=("<｜end▁of▁sentence｜>",),
                    pad="<｜▁pad▁｜>", extra=(BOS,))
    fallback_format = BOS + "{image}\n{prompt}"

    def geometry(self, config) -> ExpertGeometry:
        tc = config.text_config
        moe = tuple(i for i, kind in enumerate(tc.mlp_layer_types) if kind == "sparse")
        return ExpertGeometry(hidden=tc.hidden_size, inter=tc.moe_intermediate_size, num_experts=tc.n_routed_experts,
                              top_k=tc.num_experts_per_tok, moe_layers=moe)

    def stacked_router_weight(self, model):
        """Group-limited routing is not the top-k of one linear map: the gate predictor then runs each router."""
        if model.config.text_config.topk_method != "greedy":
            return None
        return super().stacked_router_weight(model)

    # ---- inputs ----------------------------------------------------------------------------------------------
    def image_inputs(self, image_processor, images) -> tuple[dict, list[int]]:
        """Images -> (`pixel_values [B, 3, S, S]` global views, `pixel_values_local [tiles, 3, t, t]` when any image
        has tiles, `num_local_patches [B]`; visual tokens per image)."""
        vis = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        out = {k: vis[k] for k in ("pixel_values", "pixel_values_local", "num_local_patches") if k in vis}
        return out, [TILE_TOKENS * n + GLOBAL_TOKENS + 1 for n in vis["num_local_patches"].tolist()]

    def model_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}

    def encode(self, model, inputs: dict) -> Encoded:
        if "pixel_values" not in inputs:
            return self.encode_text(model, inputs)
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs.get("pixel_values_local"),
                                               inputs.get("num_local_patches"), return_dict=True).pooler_output
        vmask = ids == model.config.image_token_id                                 # [B, T]
        embeds = embeds.masked_scatter(vmask[..., None], torch.cat(list(feats), dim=0).to(embeds.dtype))
        pos, deltas = self.prefill_positions(model, inputs)
        grids = [(1, 1, int(n)) for n in vmask.sum(-1).tolist()]                   # one line of tokens per row
        return Encoded(embeds=embeds, mask=inputs["attention_mask"], visual=vmask, positions=pos, deltas=deltas,
                       deepstack=None, grids=grids)

    def random_image_processor(self, config) -> DeepseekOcr2ImageProcessorPil:
        side = config.vision_config.sam_config.image_size          # tiles are 3/4 of the global view, as 768/1024
        return DeepseekOcr2ImageProcessorPil(size={"height": side, "width": side}, tile_size=side * 3 // 4)

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> DeepseekOcr2Config:
        layers = o.get("layers", 4)
        first_dense = o.get("first_dense", 1)
        text = dict(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 128),
            num_hidden_layers=layers, num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("heads", 4),
            n_routed_experts=o.get("experts", 8), n_shared_experts=2, num_experts_per_tok=o.get("top_k", 2),
            moe_intermediate_size=o.get("inter", 48),
            mlp_layer_types=["dense"] * first_dense + ["sparse"] * (layers - first_dense),
            topk_method=o.get("topk_method", "greedy"), n_group=o.get("n_group"), topk_group=o.get("topk_group"),
            routed_scaling_factor=1.0, max_position_embeddings=o.get("max_pos", 8192),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
            bos_token_id=None, eos_token_id=token_ids["eos"], pad_token_id=token_ids["pad"],
        )
        enc_hidden = o.get("vision_hidden", 48)
        # a 256 px global view in 4 px patches gives SAM 64 x 64 patches, 16 x 16 after its two stride-2 convs: the
        # 256 queries of the global view (a 192 px tile gives 12 x 12, the tile's 144), as 1024 / 16 and 768 / 16
        # px do in the real model
        sam = dict(hidden_size=32, output_channels=32, num_hidden_layers=o.get("vision_depth", 2),
                   num_attention_heads=2, image_size=256, patch_size=4, window_size=8, global_attn_indexes=[1],
                   downsample_channels=[32, enc_hidden], use_rel_pos=False)
        encoder = dict(vocab_size=vocab_size, hidden_size=enc_hidden, intermediate_size=2 * enc_hidden,
                       num_hidden_layers=o.get("vision_depth", 2), num_attention_heads=2, num_key_value_heads=1)
        return DeepseekOcr2Config(text_config=text, vision_config=dict(sam_config=sam, encoder_config=encoder),
                                  image_token_id=token_ids["image"], tie_word_embeddings=False)

    def tiny_image_processor(self, max_side: int = 224) -> DeepseekOcr2ImageProcessorPil:
        """A 256 px global view and 192 px tiles (images larger than a tile get 2 to 6)."""
        return DeepseekOcr2ImageProcessorPil(size={"height": 256, "width": 256}, tile_size=192, crop_to_patches=True,
                                             min_patches=2, max_patches=6)

