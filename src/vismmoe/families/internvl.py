"""InternVL with a Qwen3-MoE text model (`model_type: internvl`, InternVL3.5-30B-A3B class): an InternViT vision
tower over 448 px tiles of the image (plus a thumbnail), pixel shuffle (each 2x2 block of patches becomes one
visual token), an MLP projector, and a Qwen3-MoE decoder with a softmax top-k router and 1-D RoPE positions.

The experts setting reaches the text submodel (`set_experts_implementation` on the InternVL model sets it for
`model.language_model`), so the runtime serves `model.language_model.layers[l].mlp.experts` like Qwen3-VL-MoE's.
InternVL wrapping a dense text model (Qwen2, Qwen3, Llama) has no routed experts: refused with one line.

Checkpoint layout: the hub files (`-HF` conversions) and `save_pretrained` in transformers 5 both keep the legacy
names (`language_model.model.layers.{l}...`, `language_model.lm_head`, `vision_tower...`) and store routed experts
per expert (`mlp.experts.{e}.gate_proj.weight [I, H]`, `up_proj [I, H]`, `down_proj [H, I]`); the checkpoint
reader maps the names through transformers' own renamings (`Family.checkpoint_renamer`).

Images: `GotOcr2ImageProcessorPil` (PIL, no torchvision) crops an image into up to `max_patches` tiles of the
vision tower's size in the aspect ratio closest to the image's, plus a thumbnail; every tile gives
`(image_size / patch_size * downsample_ratio)^2` visual tokens. A prompt holds `<img>`, one `<IMG_CONTEXT>` per
visual token, `</img>`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import AutoConfig, InternVLConfig, InternVLForConditionalGeneration
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from ..errors import UserError
from .base import Encoded, ExpertGeometry, Family, Tokens
from .qwen3_moe import moe_geometry, tiny_text_config
from .rope1d import Rope1D

_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class TileProcessor:
    """InternVL's image processor and how many visual tokens one of its tiles becomes (a property of the model's
    vision config, not of the processor's)."""

    processor: GotOcr2ImageProcessorPil
    tokens_per_tile: int

    def __call__(self, images, **kw):
        return self.processor(images=images, **kw)

    def save_pretrained(self, out_dir: str) -> None:
        self.processor.save_pretrained(out_dir)


def tokens_per_tile(config: InternVLConfig) -> int:
    vc = config.vision_config
    side = vc.image_size[0] // vc.patch_size[0]
    return int(side * config.downsample_ratio) ** 2


class InternVLFamily(Rope1D, Family):
    linear_topk_routers = True      # Qwen3MoeTopKRouter: top-k of softmax(linear(h)) = top-k of linear(h)
    model_type = "internvl"
    model_class = InternVLForConditionalGeneration
    image_processor_class = GotOcr2ImageProcessorPil
    tokens = Tokens(
        image="<IMG_CONTEXT>", image_start="<img>", image_end="</img>",
        eos=("<|im_end|>", "<|endoftext|>"), pad="<|endoftext|>", extra=("<|im_start|>",),
    )
    fallback_format = "<|im_start|>user\n{image}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"

    def config_fields(self, config) -> list:
        tc = config.text_config
        if getattr(tc, "decoder_sparse_step", None) is None:        # not a qwen3_moe text model: geometry says so
            return []
        layers = tc.num_hidden_layers
        return [("text_config.decoder_sparse_step", tc.decoder_sparse_step, 1, None)] + \
            [(f"text_config.mlp_only_layers[{i}]", v, 0, layers - 1 if isinstance(layers, int) else None)
             for i, v in enumerate(tc.mlp_only_layers or [])]

    def geometry(self, config) -> ExpertGeometry:
        tc = config.text_config
        if tc.model_type != "qwen3_moe":
            raise UserError(f"this InternVL checkpoint's text model is {tc.model_type!r}, which has no routed "
                            "experts", "vismmoe runs InternVL with a qwen3_moe text model (InternVL3.5-30B-A3B class)")
        return moe_geometry(tc)

    # ---- inputs ----------------------------------------------------------------------------------------------
    def load_image_processor(self, model_dir: str) -> TileProcessor:
        return TileProcessor(GotOcr2ImageProcessorPil.from_pretrained(model_dir),
                             tokens_per_tile(AutoConfig.from_pretrained(model_dir)))

    def image_placeholder(self) -> str:
        return self.tokens.image            # the chat template's `<IMG_CONTEXT>`, wrapped when expanded

    def expand_image(self, n_visual: int) -> str:
        return self.tokens.image_start + self.tokens.image * n_visual + self.tokens.image_end

    def image_inputs(self, image_processor: TileProcessor, images) -> tuple[dict, list[int]]:
        """Images -> (`pixel_values [tiles, 3, S, S]` of every image in order; visual tokens per image)."""
        vis = image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        return ({"pixel_values": vis["pixel_values"]},
                [n * image_processor.tokens_per_tile for n in vis["num_patches"].tolist()])

    def random_image_processor(self, config) -> TileProcessor:
        side = config.vision_config.image_size[0]
        return TileProcessor(self.tiny_image_processor(max_side=4 * side, tile=side), tokens_per_tile(config))

    def model_inputs(self, inputs: dict) -> dict:
        return {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}

    # ---- the prompt as decoder inputs (for visual-token compression) ----------------------------------------
    def encode(self, model, inputs: dict) -> Encoded:
        if "pixel_values" not in inputs:
            return self.encode_text(model, inputs)
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True).pooler_output
        vmask = ids == model.config.image_token_id                                 # [B, T]
        embeds = embeds.masked_scatter(vmask[..., None], feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        pos, deltas = self.prefill_positions(model, inputs)
        per = feats.shape[1]                                                       # tokens per tile
        side = int(round(per ** 0.5))
        grids = [(int(n) // per, side, side) for n in vmask.sum(-1).tolist()]     # (tiles, h, w) per row
        return Encoded(embeds=embeds, mask=inputs["attention_mask"], visual=vmask, positions=pos, deltas=deltas,
                       deepstack=None, grids=grids)

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def chat_template(self) -> str:
        return _TEMPLATE

    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **o) -> InternVLConfig:
        text = dict(model_type="qwen3_moe", **tiny_text_config(token_ids, vocab_size, **o))
        tile = o.get("tile", 56)
        vision = dict(hidden_size=o.get("vision_hidden", 32), num_hidden_layers=o.get("vision_depth", 2),
                      num_attention_heads=o.get("vision_heads", 2), intermediate_size=o.get("vision_inter", 64),
                      image_size=tile, patch_size=14)
        return InternVLConfig(text_config=text, vision_config=vision, image_token_id=token_ids["image"],
                              image_seq_length=(tile // 14 // 2) ** 2, downsample_ratio=0.5,
                              tie_word_embeddings=False)

    def tiny_image_processor(self, max_side: int = 224, tile: int = 56) -> GotOcr2ImageProcessorPil:
        """Tiles of `tile` px, at most (max_side / tile)^2 of them (and at most 12, as InternVL's) plus a thumbnail."""
        return GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True, min_patches=1,
                                        max_patches=max(1, min(12, (max_side // tile) ** 2)),
                                        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
