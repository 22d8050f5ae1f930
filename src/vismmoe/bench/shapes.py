"""Named model shapes for benchmarks with random weights (routing is meaningless; transfer and compute are real).

`qwen3-vl-30b-a3b` follows the published Qwen3-VL-30B-A3B config: 48 decoder layers, hidden 2048, 32 query /
4 KV heads of 128, 128 experts of intermediate 768 with top-8 routing, vocab 151936, a 27-layer vision tower of
width 1152 with DeepStack taps at 8/16/24. `qwen3-vl-30b-a3b-L4` keeps 4 decoder layers (quick runs).
`thin-48x128` keeps the 30B routing geometry at a tiny width (host overhead per layer, measurable on a CPU).

`qwen3-30b-a3b` is Qwen/Qwen3-30B-A3B's config.json, text only (`qwen3_moe`): 48 layers, hidden 2048, 32 query /
4 KV heads of 128, 128 experts of intermediate 768, top-8 (renormalised), vocab 151936, RoPE theta 1e6, context
40960; `qwen3-30b-a3b-L4` keeps 4 layers. `vismmoe make-shape` writes it in the hub layout (per-expert tensors) for
runtimes that load `Qwen3MoeForCausalLM` checkpoints.

One shape per further family, each the published size of one real checkpoint (its config.json):
`internvl3.5-30b-a3b` (OpenGVLab/InternVL3_5-30B-A3B-HF: the Qwen3-30B-A3B text model, 48 layers, hidden 2048,
32 query / 4 KV heads of 128, 128 experts of 768, top-8, vocab 151936; InternViT-300M, 24 layers of width 1024,
448 px tiles of 14 px patches, pixel shuffle 0.5: 256 visual tokens a tile); `qwen3.5-35b-a3b`
(Qwen/Qwen3.5-35B-A3B: 40 layers, hidden 2048, Gated-DeltaNet in 3 of every 4 layers, 16 query / 2 KV heads of
256, 256 experts of 512 plus a shared expert of 512, top-8, vocab 248320; the Qwen3-VL vision tower, 27 layers of
width 1152); `deepseek-ocr2` (deepseek-community/DeepSeek-OCR-2: the DeepSeek-3B-MoE decoder, 12 layers of
hidden 1280 with 10 heads, the first dense, 64 routed experts of 896 plus 2 shared, top-6, vocab 129280; SAM
ViT-B and a Qwen2-0.5B-sized vision encoder, 256 + 144 per tile visual tokens); `gemma4-26b-a4b`
(google/gemma-4-26B-A4B-it as its model card describes it: 30 layers, 5 sliding (1024 tokens) to 1 global, 16
query / 8 KV heads of 256, global layers 2 KV heads of 512 with keys as values, 128 experts of 704 beside a dense
MLP of 2112, top-8, vocab 262144; hidden 2816 and the ~550M vision tower's width were not checked against its
config.json); `ernie4.5-vl-28b-a3b` (baidu/ERNIE-4.5-VL-28B-A3B-PT: 28 layers of hidden 2560, 20 query / 4 KV
heads, the first dense, then per layer 64 text experts of 1536 and 64 vision experts of 512 plus 2 shared, top-6,
vocab 103424; a 32-layer vision tower of width 1280).
"""

from __future__ import annotations

from transformers import Qwen3VLMoeConfig

from ..errors import UserError


def _qwen3_vl_30b(layers: int = 48) -> Qwen3VLMoeConfig:
    text = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                         "mrope_interleaved": True},
    )
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24])
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                            vision_end_token_id=151653)


def _qwen3_30b_text(layers: int = 48) -> dict:
    """Qwen/Qwen3-30B-A3B's config.json (the text model of InternVL3.5-30B-A3B too)."""
    return dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def _qwen3_30b(layers: int = 48):
    from transformers import Qwen3MoeConfig
    return Qwen3MoeConfig(**_qwen3_30b_text(layers), bos_token_id=151643, eos_token_id=151645)


def _internvl35_30b():
    from transformers import InternVLConfig
    text = dict(model_type="qwen3_moe", **_qwen3_30b_text())
    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=448, patch_size=14, use_qk_norm=False, layer_scale_init_value=0.1, attention_bias=True,
                  norm_type="layer_norm", use_mean_pooling=True)
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=151671, image_seq_length=256,
                          downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


def _tiny() -> Qwen3VLMoeConfig:
    from ..families import get_family
    ids = {"image": 500, "image_start": 502, "image_end": 503, "pad": 1, "eos": [2], "video": 501}
    return get_family("qwen3_vl_moe").tiny_config(ids, vocab_size=512, layers=4, experts=16, top_k=4)


def _qwen35_35b():
    from transformers import Qwen3_5MoeConfig
    text = dict(
        vocab_size=248320, hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2,
        head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_num_key_heads=16, linear_num_value_heads=32, moe_intermediate_size=512,
        shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8, full_attention_interval=4,
        max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "mrope_section": [11, 11, 10],
                         "mrope_interleaved": True, "partial_rotary_factor": 0.25},
    )
    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=2048,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_id=248056, video_token_id=248057, vision_start_token_id=248053,
                            vision_end_token_id=248054)


def _deepseek_ocr2():
    from transformers import DeepseekOcr2Config
    text = dict(
        vocab_size=129280, hidden_size=1280, intermediate_size=6848, num_hidden_layers=12, num_attention_heads=10,
        num_key_value_heads=10, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        moe_intermediate_size=896, mlp_layer_types=["dense"] + ["sparse"] * 11, topk_method="greedy",
        routed_scaling_factor=1.0, max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    sam = dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, image_size=1024,
               patch_size=16, window_size=14, global_attn_indexes=[2, 5, 8, 11], downsample_channels=[512, 896])
    encoder = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)
    return DeepseekOcr2Config(text_config=text, vision_config=dict(sam_config=sam, encoder_config=encoder),
                              image_token_id=128815, tie_word_embeddings=False)


def _gemma4_26b():
    from transformers import Gemma4Config
    text = dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
        sliding_window=1024, hidden_size_per_layer_input=0, num_kv_shared_layers=0, enable_moe_block=True,
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, use_bidirectional_attention="vision",
        final_logit_softcapping=30.0, max_position_embeddings=262144, tie_word_embeddings=True,
    )
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True)


def _ernie45_vl_28b():
    from transformers import Ernie4_5_VLMoeConfig
    text = dict(
        vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
        num_key_value_heads=4, moe_intermediate_size=[1536, 512], moe_k=6, moe_num_experts=64,
        moe_num_shared_experts=2, mlp_layer_types=["dense"] + ["sparse"] * 27, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [22, 22, 20]},
    )
    vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=5120, patch_size=14,
                  spatial_merge_size=2)
    return Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=True)


def _tiny_of(family: str):
    """A tiny random shape of `family` (tests: seconds on a CPU)."""
    from ..families import get_family
    ids = {"image": 500, "image_start": 502, "image_end": 503, "pad": 1, "eos": [2], "video": 501}
    return get_family(family).tiny_config(ids, vocab_size=512, layers=4, experts=16, top_k=4)


def _thin48() -> Qwen3VLMoeConfig:
    """The 30B shape's routing geometry (48 MoE layers, 128 experts, top-8) at a tiny width: compute and copies
    are negligible, so time per token is the host's per-layer work (bookkeeping, policy, predictor, launches),
    the part that bounds batch-1 decode on a fast GPU. For measuring that overhead on a CPU."""
    from ..families import get_family
    ids = {"image": 500, "image_start": 502, "image_end": 503, "pad": 1, "eos": [2], "video": 501}
    return get_family("qwen3_vl_moe").tiny_config(ids, vocab_size=512, layers=48, experts=128, top_k=8,
                                                   hidden=64, inter=32, dense_inter=64)


SHAPES = {
    "tiny-qwen3": ("qwen3_vl_moe", _tiny),                   # for tests: seconds on a CPU
    "thin-48x128": ("qwen3_vl_moe", _thin48),                # host overhead per layer (30B routing geometry)
    "qwen3-vl-30b-a3b": ("qwen3_vl_moe", lambda: _qwen3_vl_30b(48)),
    "qwen3-vl-30b-a3b-L4": ("qwen3_vl_moe", lambda: _qwen3_vl_30b(4)),
    "qwen3-30b-a3b": ("qwen3_moe", lambda: _qwen3_30b(48)),
    "qwen3-30b-a3b-L4": ("qwen3_moe", lambda: _qwen3_30b(4)),
    "tiny-qwen3-moe": ("qwen3_moe", lambda: _tiny_of("qwen3_moe")),
    "internvl3.5-30b-a3b": ("internvl", _internvl35_30b),
    "tiny-internvl": ("internvl", lambda: _tiny_of("internvl")),
    "qwen3.5-35b-a3b": ("qwen3_5_moe", _qwen35_35b),
    "tiny-qwen3.5": ("qwen3_5_moe", lambda: _tiny_of("qwen3_5_moe")),
    "deepseek-ocr2": ("deepseek_ocr2", _deepseek_ocr2),
    "tiny-deepseek-ocr2": ("deepseek_ocr2", lambda: _tiny_of("deepseek_ocr2")),
    "gemma4-26b-a4b": ("gemma4", _gemma4_26b),
    "tiny-gemma4": ("gemma4", lambda: _tiny_of("gemma4")),
    "ernie4.5-vl-28b-a3b": ("ernie4_5_vl_moe", _ernie45_vl_28b),
    "tiny-ernie4.5-vl": ("ernie4_5_vl_moe", lambda: _tiny_of("ernie4_5_vl_moe")),
    "tiny-glm4-moe": ("glm4_moe", lambda: _tiny_of("glm4_moe")),     # no published GLM-4.5 shape: not checked here
}


def get_shape(name: str, layers: int | None = None):
    """(family name, config) of a named shape; `layers`: its first `layers` decoder layers only (the text config's
    per-layer lists, e.g. `layer_types`, `mlp_layer_types`, cut to match; more layers than the shape has: all)."""
    try:
        fam, make = SHAPES[name]
    except KeyError:
        raise UserError(f"unknown shape {name!r}", f"use one of {', '.join(sorted(SHAPES))}") from None
    config = make()
    if layers is not None:
        from ..families import get_family
        tc = get_family(fam).text_config(config)
        old = tc.num_hidden_layers
        layers = min(layers, old)
        for key, value in list(vars(tc).items()):
            if isinstance(value, list) and len(value) == old and key != "moe_intermediate_size":
                setattr(tc, key, value[:layers])
        tc.num_hidden_layers = layers
    return fam, config
