"""Gemma 4 with its MoE block (`model_type: gemma4`, `enable_moe_block`): every decoder layer has a dense MLP
and, beside it, routed experts on the layer itself (`layer.router`, `layer.experts`). The router reads the
pre-MLP residual (it normalises it itself: RMSNorm without scale, a learned scale, a linear map, softmax, top-k,
renormalised, then a learned per-expert scale); the experts read that residual through their own norm
(`pre_feedforward_layernorm_2`); the two outputs are normed and added. 1-D RoPE (its own per layer type),
sliding-window and full-attention layers, the last `num_kv_shared_layers` layers reuse earlier layers' keys and
values, and attention is bidirectional among an image's tokens (`mm_token_type_ids`); logits are soft-capped.

What the runtime needs beyond the base adapter:
- The router lives on the decoder layer (`Family.router`), is not the top-k of one linear map (the gate predictor
  runs each router), and reads the residual (`Family.router_input`).
- A pruned prompt runs through `Gemma4Model` (not the bare text model) so its masks are built as the model builds
  them (bidirectional over the kept image tokens, sliding windows); small Gemma 4 models add per-layer inputs
  (token identity embeddings, the image tokens' those of the pad token), which travel with each token
  (`Encoded.per_token`).
- `DynamicCache(config=...)` holds sliding-window layers and leaves the shared-KV layers out; the eager decode
  runs on it. The fast decode step's hooks: static KV of each layer's width (none for the shared-KV layers),
  window masks over it for the sliding layers, each layer's rotary and per-layer input and the shared-KV dict
  (`decode_inputs`), soft-capped logits (`decode_logits`), GELU-tanh experts (`expert_activation`).

Checkpoint layout: hub files and `save_pretrained` store each layer's experts fused under the model's names
(`layers.{l}.experts.gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`).

Prompt tokens follow Gemma 3's (`<start_of_image>`, `<image_soft_token>` x n, `<end_of_image>`, turns); a real
Gemma 4 tokenizer must name them the same for `Family.tokens` to find them.
"""

from __future__ import annotations

import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

from .base import Encoded, ExpertGeometry, Family, Tokens
from .rope1d import Rope1D

_TEMPLATE = (
    "<bos>{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image_soft_token>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma4Family(Rope1D, Family):
    linear_topk_routers = False     # the router normalises its input first: not one linear map of the residual
    image_ids_embedded = False      # multimodal token ids become the pad id before the embedding lookup
    # an image's tokens attend to each other both ways (sliding layers): a prefill chunk holds whole images
    prefill_chunk_splits_images = False
    model_type = "gemma4"
    model_class = Gemma4ForConditionalGeneration
    image_processor_class = Gemma4ImageProcessorPil
    tokens = Tokens(image="<image_soft_token>", image_start="<start_of_image>", image_end="<end_of_image>",
                    eos=("<end_of_turn>", "<eos>"), pad="<pad>", extra=("<bos>", "<start_of_turn>"))
    fallback_format = "<bos><start_of_turn>user\n{image}{prompt}<end_of_turn>\n<start_of_turn>model\n"

    def geometry(self, config) -> ExpertGeometry:
        tc = config.text_config
        if not tc.enable_moe_block:
            from ..errors import UserError
            raise UserError("this Gemma 4 checkpoint has no MoE block (enable_moe_block is false)",
                            "vismmoe runs the Gemma 4 MoE models (26B-A4B class)")
        return ExpertGeometry(hidden=tc.hidden_size, inter=tc.moe_intermediate_size, num_experts=tc.num_experts,
                              top_k=tc.top_k_experts, moe_layers=tuple(range(tc.num_hidden_layers)))

    def expert_activation(self, config) -> str:
        return str(self.text_config(config).hidden_activation)      # GELU, tanh approximation

    def moe_block(self, model, layer: int) -> torch.nn.Module:
        return self.decoder_layers(model)[layer]                 # experts and router sit on the decoder layer

    def router(self, model, layer: int) -> torch.nn.Module:
        return self.decoder_layers(model)[layer].router

    def router_input(self, model, layer: int, embeds: torch.Tensor) -> torch.Tensor:
        return embeds                                            # the pre-MLP residual, normed by the router

    def expert_prefix(self, layer: int) -> str:
        return f"model.language_model.layers.{layer}.experts"

    # ---- inputs ----------------------------------------------------------------------------------------------
    def image_placeholder(self) -> str:
        return self.tokens.image

    def expand_image(self, n_visual: int) -> str:
        return self.tokens.image_start + self.tokens.image * n_visual + self.tokens.image_end

    def image_inputs(self, image_processor, images) -> tuple[dict, list[int]]:
        """Images -> (`pixel_values [B, patches, 3 p^2]`, `image_position_ids [B, patches, 2]` (padding -1); soft
        tokens per image: patches / pooling_kernel_size^2, aspect ratio kept)."""
        vis = image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        return ({"pixel_values": vis["pixel_values"], "image_position_ids": vis["image_position_ids"]},
                vis["num_soft_tokens_per_image"].tolist())

    def synthetic_image_block(self, config, n_visual: int) -> list[int]:
        return [config.boi_token_id] + [config.image_token_id] * n_visual + [config.eoi_token_id]

    # ---- the prompt as decoder inputs (for visual-token compression) ----------------------------------------
    def encode(self, model, inputs: dict) -> Encoded:
        """As `Gemma4Model.forward` builds the decoder's inputs: image tokens embedded as the pad token, then
        replaced by the image features; per-layer inputs (when the model has them) of the pad-replaced ids."""
        ids = inputs["input_ids"]
        vmask = ids == model.config.image_token_id                                 # [B, T]
        lm = model.model.language_model
        llm_ids = torch.where(vmask, model.config.text_config.pad_token_id, ids)
        embeds = lm.embed_tokens(llm_ids)
        grids = []
        if "pixel_values" in inputs:                                               # else a prompt without images
            feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_position_ids"],
                                                   return_dict=True).pooler_output
            embeds = embeds.masked_scatter(vmask[..., None], torch.cat(list(feats)).to(embeds.dtype))
            counts = [n for n in vmask.sum(-1).tolist() if n]                      # rows with an image, in order
            for i, n in enumerate(counts):
                h, w = self._soft_grid(inputs["image_position_ids"][i],
                                       model.config.vision_config.pooling_kernel_size)
                grids.append((1, h, w) if h * w == n else (1, 1, int(n)))
        per_token = {}
        if model.config.text_config.hidden_size_per_layer_input:
            per_token["per_layer_inputs"] = lm.get_per_layer_inputs(llm_ids, None)   # [B, T, layers, P]
        pos, deltas = self.prefill_positions(model, inputs)
        return Encoded(embeds=embeds, mask=inputs["attention_mask"], visual=vmask, positions=pos, deltas=deltas,
                       deepstack=None, grids=grids, per_token=per_token)

    @staticmethod
    def _soft_grid(position_ids: torch.Tensor, kernel: int) -> tuple[int, int]:
        """(rows, columns) of an image's soft tokens, from its patches' (x, y) positions [patches, 2]."""
        real = position_ids[(position_ids >= 0).all(-1)]
        return int(real[:, 1].max()) // kernel + 1, int(real[:, 0].max()) // kernel + 1

    def decoder_forward(self, model, enc: Encoded, cache) -> torch.Tensor:
        """Through `Gemma4Model` (masks bidirectional over the kept image tokens, sliding windows), soft-capped
        logits of the last position [B, 1, V] as the model's forward gives them. A chunk after P cached positions
        (`Encoded.chunk`) hands the model the image flags of all P + T positions: its image masks look the
        flags up by absolute position (with the chunk's flags alone they would read the wrong ones)."""
        visual = enc.visual if enc.past_visual is None else torch.cat([enc.past_visual, enc.visual], dim=1)
        out = model.model(inputs_embeds=enc.embeds, attention_mask=enc.mask,
                          position_ids=self.position_ids(enc.positions), past_key_values=cache, use_cache=True,
                          mm_token_type_ids=visual.long(), per_layer_inputs=enc.per_token.get("per_layer_inputs"))
        logits = model.lm_head(out.last_hidden_state[:, -1:])
        cap = model.config.get_text_config().final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    # ---- the fast decode step (step/graphs.py) ---------------------------------------------------------------
    decode_sliding_window = True
    moe_output_additive = False         # post-feed-forward norms follow the experts' output

    def static_cache(self, model, B: int, L: int, pos: torch.Tensor, dtype, device) -> list:
        """`StaticKV [B, kv_heads, L, head_dim]` per layer that keeps keys and values, each with its own heads and
        width (the full-attention layers': `num_global_key_value_heads`, `global_head_dim`); a sliding-window
        layer keeps every column too (its mask picks the window). None for the shared-KV layers: they read the
        keys and values of the last earlier layer of their type (transformers' `shared_kv_states`)."""
        from ..step.graphs import StaticKV
        tc = self.text_config(model.config)
        out = []
        for layer in self.decoder_layers(model):
            attn = layer.self_attn
            if attn.is_kv_shared_layer:
                out.append(None)
                continue
            shape = (B, tc.per_layer_config[attn.layer_idx].num_key_value_heads, L, attn.head_dim)
            out.append(StaticKV(torch.zeros(shape, dtype=dtype, device=device),
                                torch.zeros(shape, dtype=dtype, device=device), pos))
        return out

    def decode_masks(self, model, mask: torch.Tensor, pos: torch.Tensor) -> list:
        """Full-attention layers: the step's mask [B, 1, 1, L]; sliding-window layers (shared-KV ones too): the
        same, and only the last `sliding_window` columns up to the new token's `pos` (as transformers' sliding
        mask counts cache columns, so a compressed prompt's window is its kept tokens')."""
        W = self.text_config(model.config).sliding_window
        cols = torch.arange(mask.shape[-1], device=mask.device)
        window = mask & (cols > pos - W)
        return [window if layer.self_attn.is_sliding else mask for layer in self.decoder_layers(model)]

    def decode_inputs(self, model, ids: torch.Tensor, rope_positions: torch.Tensor) -> tuple:
        """As `Gemma4Model` embeds a token (multimodal ids as the pad id) and hands its layers their inputs: the
        rotary of each layer's type, its per-layer input `[B, 1, P]` (when the model has them) and the one dict
        through which the shared-KV layers read earlier layers' keys and values."""
        lm = self.language_model(model)
        cfg, tc = model.config, self.text_config(model.config)
        mm = (ids == cfg.image_token_id) | (ids == cfg.video_token_id) | (ids == cfg.audio_token_id)
        ids = torch.where(mm, tc.pad_token_id, ids)
        h = lm.embed_tokens(ids)
        rope = {t: lm.rotary_emb(h, rope_positions, t) for t in lm.unique_layer_types}
        per_layer = None
        if tc.hidden_size_per_layer_input:
            per_layer = lm.project_per_layer_inputs(h, lm.get_per_layer_inputs(ids, None))   # [B, 1, layers, P]
        shared: dict = {}
        return h, [rope[t] for t in tc.layer_types], \
            [{"per_layer_input": per_layer[:, :, i] if per_layer is not None else None, "shared_kv_states": shared}
             for i in range(len(tc.layer_types))]

    def decode_logits(self, model, logits: torch.Tensor) -> torch.Tensor:
        cap = model.config.get_text_config().final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap is not None else logits

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> Gemma4Config:
        """At least six layers: sliding, sliding, full, ..., the last two sharing the keys and values of the last
        earlier layer of their type; a sliding window of 16 tokens (prompts are longer); per-layer inputs;
        soft-capped logits."""
        layers = max(6, o.get("layers", 6))
        types = (["sliding_attention", "sliding_attention", "full_attention"] * layers)[:layers - 1]
        types.append("full_attention")
        text = dict(
            vocab_size=vocab_size, hidden_size=o.get("hidden", 64), intermediate_size=o.get("dense_inter", 96),
            num_hidden_layers=layers, num_attention_heads=o.get("heads", 4), num_key_value_heads=o.get("kv_heads", 2),
            head_dim=o.get("head_dim", 16), global_head_dim=2 * o.get("head_dim", 16), num_global_key_value_heads=1,
            attention_k_eq_v=True, layer_types=types, sliding_window=o.get("sliding_window", 16),
            num_kv_shared_layers=o.get("kv_shared", 2), hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=vocab_size, enable_moe_block=True, num_experts=o.get("experts", 8),
            top_k_experts=o.get("top_k", 2), moe_intermediate_size=o.get("inter", 48),
            use_bidirectional_attention="vision", final_logit_softcapping=30.0,
            max_position_embeddings=o.get("max_pos", 8192), tie_word_embeddings=False,
            pad_token_id=token_ids["pad"], eos_token_id=token_ids["eos"], bos_token_id=None,
        )
        vision = dict(hidden_size=o.get("vision_hidden", 32), intermediate_size=o.get("vision_inter", 64),
                      num_hidden_layers=o.get("vision_depth", 2), num_attention_heads=2, num_key_value_heads=2,
                      head_dim=16, patch_size=8, pooling_kernel_size=3, position_embedding_size=1024)
        image = token_ids["image"]
        return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=image,
                            boi_token_id=token_ids["image_start"], eoi_token_id=token_ids["image_end"],
                            video_token_id=token_ids.get("video", image), audio_token_id=token_ids.get("audio", image),
                            tie_word_embeddings=False)

    def tiny_image_processor(self, max_side: int = 224) -> Gemma4ImageProcessorPil:
        """8 px patches pooled 3 x 3: at most 70 soft tokens an image (the smallest budget Gemma 4 offers)."""
        return Gemma4ImageProcessorPil(patch_size=8, max_soft_tokens=70, pooling_kernel_size=3)

    def random_image_processor(self, config) -> Gemma4ImageProcessorPil:
        vc = config.vision_config
        return Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                       max_soft_tokens=280)
