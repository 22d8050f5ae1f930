"""`vismmoe export-gguf`: a checkpoint as the two GGUF files llama.cpp runs (text model + vision projector).

    checkpoint dir (config.json, safetensors in any expert layout store.CheckpointReader reads, tokenizer.json,
    chat template, preprocessor_config.json)
      -> OUT/<name>-<dtype>.gguf          the text model: hyper-parameters, the vocabulary (GPT-2 style BPE), every
                                          decoder tensor, written one tensor (at most one expert bank) at a time
      -> OUT/mmproj-<name>-<dtype>.gguf   arch `clip`: vision tower and projector
      -> OUT/<name>-<type>.gguf           with --type q8_0|q4_k|q4_k_m: the text model's weight matrices quantized
                                          (gguf_quant: which tensors, which types, and how)

    qwen3_vl_moe -> arch `qwen3vlmoe` + projector `qwen3vl_merger`;  glm4v_moe -> arch `glm4moe` + projector `glm4v`

What llama.cpp expects was read from its source at commit 0c1e570 (2026-10-01; `conversion/qwen3vl.py`, `glm.py`,
`qwen.py`, `base.py`, `gguf-py` tensor names, `src/models/qwen3vlmoe.cpp`, `glm4-moe.cpp`, `tools/mtmd/clip.cpp`);
the files are written with the `gguf` package's writer. Text tensors (GGUF shapes are the reverse of the torch
shapes listed; `layers.N.` stands for `model.language_model.layers.N.`):

    embed_tokens.weight [V, H] / lm_head.weight / norm.weight   -> token_embd / output (absent when tied) / output_norm
    layers.N.input_layernorm.weight                      -> blk.N.attn_norm.weight                    (f32)
    layers.N.post_attention_layernorm.weight             -> blk.N.ffn_norm (Qwen) / blk.N.post_attention_norm (GLM)
    layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}      -> blk.N.attn_{q,k,v,output}.{weight,bias}
    layers.N.self_attn.{q,k}_norm.weight                 -> blk.N.attn_{q,k}_norm.weight              (f32)
    layers.N.mlp.gate.weight [E, H]                      -> blk.N.ffn_gate_inp.weight (router)         (f32)
    layers.N.mlp.gate.e_score_correction_bias (GLM)      -> blk.N.exp_probs_b.bias                    (f32)
    layers.N.mlp.experts (any stored layout)             -> blk.N.ffn_{gate,up}_exps [E, I, H], ffn_down_exps [E, H, I]
    layers.N.mlp.shared_experts.X_proj (GLM)             -> blk.N.ffn_X_shexp
    layers.N.mlp.X_proj, dense first layers (GLM)        -> blk.N.ffn_X

Vision tensors (`model.visual.` prefix): patch_embed.proj (Conv3d, temporal 2) -> v.patch_embd.weight and
.weight.1 (one Conv2d kernel per frame) + .bias; blocks.N.{norm1, norm2, attn.qkv, attn.proj} -> v.blk.N.{ln1,
ln2, attn_qkv, attn_out}. Qwen3-VL: pos_embed -> v.position_embd; mlp.linear_fc1/2 -> ffn_up/ffn_down;
merger.{norm, linear_fc1, linear_fc2} -> v.post_ln, mm.0, mm.2; deepstack_merger_list.J -> v.deepstack.K.{norm,
fc1, fc2} with K = deepstack_visual_indexes[J]. GLM-4V: embeddings.position_embedding -> v.position_embd;
post_conv_layernorm -> v.norm_embd; mlp.{gate,up,down}_proj -> ffn_{gate,up,down}; post_layernorm -> v.post_ln;
downsample (Conv2d 2x2) -> mm.patch_merger; merger.{proj, post_projection_norm, up_proj, gate_proj, down_proj}
-> mm.model.fc, mm.post_norm, mm.up, mm.gate, mm.down. One-dimensional tensors (norms, biases), routers and
position embeddings are f32 and convolution kernels f32 (f16 in an f16 file), as llama.cpp's converter writes them.

The vocabulary is written directly from tokenizer.json (llama.cpp's converter identifies a tokenizer by hashing
its output on a fixed text, and ours is in no table): tokens by id, padded with unused `[PADi]` entries up to the
config's vocab size; added special tokens are CONTROL tokens; merges as "a b". The pre-tokenizer name is the one
whose split regex equals the tokenizer's: byte-level with the GPT-2 regex -> `gpt-2`, Qwen2's Split regex ->
`qwen2`; anything else is a UserError. Nothing here runs a model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import gguf_quant
from ..errors import UserError
from .gguf_quant import QUANT_TYPES
from ..offload.store import CheckpointReader

DTYPES = ("bf16", "f16", "f32")
LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"

# split regexes of the pre-tokenizers we can name for llama.cpp (src/llama-vocab.cpp at LLAMA_CPP_COMMIT)
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")


@dataclass(frozen=True)
class Planned:
    """One tensor of a GGUF file: its name, torch shape (GGUF stores the reverse), output type, and how to make
    its data (called once, in file order, when the data is written)."""

    name: str
    shape: tuple[int, ...]
    qtype: object                         # gguf.GGMLQuantizationType
    make: Callable[[], torch.Tensor]


def _gguf():
    import gguf
    return gguf


def _qtypes(wtype: str):
    """(GGML type of 2-D weights, llama.cpp file type) for a --dtype, or for --type q8_0 (text model only)."""
    g = _gguf()
    Q, F = g.GGMLQuantizationType, g.LlamaFileType
    return {"bf16": (Q.BF16, F.MOSTLY_BF16), "f16": (Q.F16, F.MOSTLY_F16), "f32": (Q.F32, F.ALL_F32),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}[wtype]


def _as_array(t: torch.Tensor, qtype) -> np.ndarray:
    """`t` in the bytes of GGML type `qtype` (bf16 as its raw 16-bit patterns, rounded to nearest even; a
    block-quantized type as its blocks, gguf_quant.quantize)."""
    Q = _gguf().GGMLQuantizationType
    t = t.detach().contiguous()
    if gguf_quant.is_quantized(qtype):
        return gguf_quant.quantize(t, qtype)
    if qtype == Q.F32:
        return t.to(torch.float32).numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    raise ValueError(f"unsupported GGML type {qtype}")


def write_gguf(path: str, writer, plan: list[Planned], progress: Callable[[str], None] | None = None) -> None:
    """Write `writer`'s metadata and the tensors of `plan` to `path`, streaming: tensor infos first, then each
    tensor's data made and written in plan order, so at most one tensor (one layer's expert bank) is in memory."""
    for p in plan:
        # the element shape with the type given (a uint8 dtype would make the writer read a byte shape)
        writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), gguf_quant.nbytes(p.shape, p.qtype),
                               raw_dtype=p.qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for p in plan:
        t = p.make()
        if tuple(t.shape) != p.shape:
            raise ValueError(f"{p.name}: made shape {tuple(t.shape)}, planned {p.shape}")
        writer.write_tensor_data(_as_array(t, p.qtype))
        if progress is not None:
            progress(p.name)
    writer.close()


# ---- vocabulary ----------------------------------------------------------------------------------------------

def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`gpt-2` or `qwen2`); UserError for any other."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if byte_level and byte_level[0].get("add_prefix_space", False):
        raise UserError("the tokenizer's byte-level pre-tokenizer adds a prefix space",
                        "llama.cpp's BPE pre-tokenizers never add one; export-gguf cannot match it")
    if len(parts) == 1 and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"                                # ByteLevel's own split is GPT-2's regex
    if regexes == [_QWEN2_REGEX] and byte_level and not byte_level[0].get("use_regex", True):
        return "qwen2"
    if regexes == [_GPT2_REGEX] and byte_level and not byte_level[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp equivalent here",
                    "export-gguf names byte-level BPE tokenizers with the GPT-2 or Qwen2 split regex")


def write_vocab(writer, model_dir: str, vocab_size: int, eot: str | None = None) -> dict:
    """Tokenizer metadata of `model_dir` (tokenizer.json, tokenizer_config.json, chat template) into `writer`:
    `vocab_size` tokens (ids past the tokenizer's vocabulary are unused `[PADi]` entries); `eot` names an
    end-of-turn token, when the family has one besides eos. Returns {"tokens": count the tokenizer defines, "pre":
    pre-tokenizer name, "eos": id, "pad": id or None}."""
    g = _gguf()
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
        raise UserError(f"no tokenizer.json in {model_dir}", "export-gguf needs a fast (tokenizers) tokenizer file")
    with open(path, encoding="utf-8") as f:
        tj = json.load(f)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UserError(f"the tokenizer of {model_dir} is {model.get('type')}, not BPE",
                        "export-gguf writes byte-level BPE tokenizers only")
    pre = pre_tokenizer_name(tj)
    by_id: dict[int, str] = {i: tok for tok, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
        kinds[a["id"]] = g.TokenType.CONTROL if a.get("special") else g.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer of {model_dir} has token id {max(by_id)}, the config's vocab_size is "
                        f"{vocab_size}", "the checkpoint's tokenizer and config.json do not belong together")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in by_id:
            tokens.append(by_id[i])
            types.append(kinds.get(i, g.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(g.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    tcfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {}
    ids = {tok: i for i, tok in by_id.items()}

    def special(name: str) -> int | None:
        tok = tcfg.get(name)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return ids.get(tok) if tok else None

    eos, pad, bos = special("eos_token"), special("pad_token"), special("bos_token")
    if eos is None:
        raise UserError(f"tokenizer_config.json of {model_dir} names no eos_token", "restore the tokenizer files")
    writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eot is not None and eot in ids:
        writer.add_eot_token_id(ids[eot])
    writer.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    jinja = os.path.join(model_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            template = f.read()
    if template:
        writer.add_chat_template(template)
    return {"tokens": len(by_id), "pre": pre, "eos": eos, "pad": pad}


# ---- Qwen3-VL-MoE ----------------------------------------------------------------------------------------------

class _Source:
    """A checkpoint's tensors by name (store.CheckpointReader: positioned reads, any expert layout)."""

    def __init__(self, model_dir: str, hidden: int, inter: int):
        self.reader = CheckpointReader(model_dir, hidden, inter)

    def has(self, key: str) -> bool:
        return key in self.reader.weight_map

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.shape(key)

    def get(self, key: str) -> Callable[[], torch.Tensor]:
        return lambda: self.reader.tensor(key)


class _Experts:
    """One MoE layer's routed experts as llama.cpp's three banks (gate [E, I, H], up [E, I, H], down [E, H, I]),
    read expert by expert when the first bank is asked for and dropped after the last, so one layer at a time is in
    memory (E x 3 x I x H elements in the stored dtype)."""

    def __init__(self, reader: CheckpointReader, prefix: str, num_experts: int, inter: int):
        self.reader, self.prefix, self.E, self.I = reader, prefix, num_experts, inter
        self._banks: dict[str, torch.Tensor] = {}

    def _load(self) -> None:
        gate = up = down = None
        for e in range(self.E):
            gu, dn = self.reader.read(self.prefix, e)               # [2I, H], [H, I]: gate rows, then up rows
            if gate is None:
                H = gu.shape[1]
                gate = torch.empty(self.E, self.I, H, dtype=gu.dtype)
                up = torch.empty_like(gate)
                down = torch.empty(self.E, H, self.I, dtype=dn.dtype)
            gate[e], up[e], down[e] = gu[: self.I], gu[self.I:], dn
        self._banks = {"gate": gate, "up": up, "down": down}

    def bank(self, which: str) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            if which not in self._banks:
                self._load()
            return self._banks.pop(which)
        return make


def _plan(src: _Source, gname: str, key: str, qtype) -> Planned:
    """`key` as GGUF tensor `gname`: in `qtype` (F16 where a quantized type's block does not divide its rows,
    gguf_quant.weight_type), or f32 when one-dimensional (norms, biases, as llama.cpp's converter writes them)."""
    shape = src.shape(key)
    qtype = _gguf().GGMLQuantizationType.F32 if len(shape) <= 1 else gguf_quant.weight_type(shape, qtype)
    return Planned(gname, shape, qtype, src.get(key))


def _with_bias(src: _Source, gname: str, key: str, qtype) -> list[Planned]:
    """`key.weight` as `gname.weight`, and `key.bias` as `gname.bias` when the checkpoint has one."""
    out = [_plan(src, f"{gname}.weight", f"{key}.weight", qtype)]
    if src.has(f"{key}.bias"):
        out.append(_plan(src, f"{gname}.bias", f"{key}.bias", qtype))
    return out


def _conv_type(dtype: str):
    """llama.cpp's converter keeps convolution kernels (patch embedding, patch merger) in f32 unless the file is f16:
    ggml's convolutions take f16 or f32 kernels."""
    Q = _gguf().GGMLQuantizationType
    return Q.F16 if dtype == "f16" else Q.F32


def _patch_embed(src: _Source, key: str, dtype: str) -> list[Planned]:
    """The Conv3d patch embedding `key` [C_out, C_in, 2, p, p] as two Conv2d kernels (one per frame of the
    temporal patch, `v.patch_embd.weight` and `.weight.1`) and its bias."""
    pshape = src.shape(key + ".weight")
    if len(pshape) != 5 or pshape[2] != 2:
        raise UserError(f"{key}.weight has shape {list(pshape)}",
                        "llama.cpp's vision projectors need a temporal patch size of 2")
    kshape = (pshape[0], pshape[1], pshape[3], pshape[4])

    def frame(k: int) -> Callable[[], torch.Tensor]:
        return lambda: src.reader.tensor(key + ".weight")[:, :, k].contiguous()

    ptype = _conv_type(dtype)
    return [Planned("v.patch_embd.weight", kshape, ptype, frame(0)),
            Planned("v.patch_embd.weight.1", kshape, ptype, frame(1)),
            _plan(src, "v.patch_embd.bias", key + ".bias", ptype)]


def _preprocessor(model_dir: str) -> dict:
    pp_path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.exists(pp_path):
        raise UserError(f"no preprocessor_config.json in {model_dir}", "export-gguf needs the image processor config")
    with open(pp_path) as f:
        return json.load(f)


def _qwen3_text(model_dir: str, config, name: str, wtype: str, path: str, progress=None) -> dict:
    g = _gguf()
    from ..families import get_family
    tc = config.text_config
    wq, ftype = _qtypes(wtype)
    F32 = g.GGMLQuantizationType.F32
    geo = get_family("qwen3_vl_moe").geometry(config)
    L, E, H, I = tc.num_hidden_layers, geo.num_experts, geo.hidden, geo.inter
    if geo.moe_layers != tuple(range(L)):
        raise UserError("the checkpoint has dense decoder layers (mlp_only_layers / decoder_sparse_step)",
                        "llama.cpp's qwen3vlmoe arch expects every decoder layer to be a MoE layer")
    src = _Source(model_dir, H, I)
    if len(config.vision_config.deepstack_visual_indexes or []) >= L:
        # its graph cuts the last layer to the output rows before adding that layer's DeepStack rows: a shape error
        raise UserError(f"{L} decoder layers with {len(config.vision_config.deepstack_visual_indexes)} DeepStack "
                        "taps", "llama.cpp's qwen3vlmoe needs more decoder layers than DeepStack taps")
    head_dim = getattr(tc, "head_dim", None) or H // tc.num_attention_heads
    rope = tc.rope_parameters or {}
    deepstack = config.vision_config.deepstack_visual_indexes or []

    w = _text_writer(g, "qwen3vlmoe", name, ftype, tc, L, head_dim)
    w.add_rope_dimension_sections((list(rope.get("mrope_section", [])) + [0, 0, 0, 0])[:4])
    w.add_layer_norm_rms_eps(tc.rms_norm_eps)
    w.add_expert_count(E)
    w.add_expert_used_count(geo.top_k)
    w.add_expert_feed_forward_length(I)
    w.add_num_deepstack_layers(len(deepstack))
    vocab = write_vocab(w, model_dir, tc.vocab_size)

    pre = "model.language_model."
    plan = [_plan(src, "token_embd.weight", pre + "embed_tokens.weight", wq),
            _plan(src, "output_norm.weight", pre + "norm.weight", F32)]
    if src.has("lm_head.weight"):
        plan.append(_plan(src, "output.weight", "lm_head.weight", wq))
    for i in range(L):
        p, b = f"{pre}layers.{i}.", f"blk.{i}."
        plan += [_plan(src, b + "attn_norm.weight", p + "input_layernorm.weight", F32),
                 _plan(src, b + "attn_q.weight", p + "self_attn.q_proj.weight", wq),
                 _plan(src, b + "attn_k.weight", p + "self_attn.k_proj.weight", wq),
                 _plan(src, b + "attn_v.weight", p + "self_attn.v_proj.weight", wq),
                 _plan(src, b + "attn_output.weight", p + "self_attn.o_proj.weight", wq),
                 _plan(src, b + "attn_q_norm.weight", p + "self_attn.q_norm.weight", F32),
                 _plan(src, b + "attn_k_norm.weight", p + "self_attn.k_norm.weight", F32),
                 _plan(src, b + "ffn_norm.weight", p + "post_attention_layernorm.weight", F32),
                 _plan(src, b + "ffn_gate_inp.weight", p + "mlp.gate.weight", F32)]
        plan += _expert_plan(src, p + "mlp.experts", b, E, I, H, wq)
    write_gguf(path, w, plan, progress)
    return {"path": path, "arch": "qwen3vlmoe", "tensors": len(plan), "block_count": L, "vocab": vocab}


def _text_writer(g, arch: str, name: str, ftype, tc, L: int, head_dim: int):
    """A GGUF writer for text arch `arch` with the hyper-parameters every decoder shares (block count, widths,
    heads, head size, rope base) set from the text config `tc`."""
    w = g.GGUFWriter(None, arch)
    rope = tc.rope_parameters or {}
    w.add_type(g.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    w.add_block_count(L)
    w.add_context_length(tc.max_position_embeddings)
    w.add_embedding_length(tc.hidden_size)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_head_count(tc.num_attention_heads)
    w.add_head_count_kv(tc.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    return w


def _expert_plan(src, prefix: str, b: str, E: int, I: int, H: int, wq) -> list:
    """One layer's routed experts as llama.cpp's three stacked banks (gate, up [E, I, H]; down [E, H, I] in GGML's
    order), read expert by expert from the checkpoint's `prefix`."""
    src.reader.check_layer(prefix, E)
    ex = _Experts(src.reader, prefix, E, I)
    gu, dn = gguf_quant.weight_type((I, H), wq), gguf_quant.weight_type((H, I), wq)
    return [Planned(b + "ffn_gate_exps.weight", (E, I, H), gu, ex.bank("gate")),
            Planned(b + "ffn_up_exps.weight", (E, I, H), gu, ex.bank("up")),
            Planned(b + "ffn_down_exps.weight", (E, H, I), dn, ex.bank("down"))]


def _mmproj_setup(model_dir: str, config, dtype: str):
    """What every projector export starts from: (gguf module, vision config, text config, weight type, file type,
    F32, tensor source, image processor config)."""
    g = _gguf()
    vc, tc = config.vision_config, config.text_config
    wq, ftype = _qtypes(dtype)
    src = _Source(model_dir, tc.hidden_size, tc.moe_intermediate_size)
    return g, vc, tc, wq, ftype, g.GGMLQuantizationType.F32, src, _preprocessor(model_dir)


def _qwen3_mmproj(model_dir: str, config, name: str, dtype: str, path: str) -> dict:
    g, vc, tc, wq, ftype, F32, src, pp = _mmproj_setup(model_dir, config, dtype)
    depth, patch = vc.depth, vc.patch_size
    deepstack = list(vc.deepstack_visual_indexes or [])

    w = g.GGUFWriter(None, "clip")
    w.add_type(g.GGUFType.MMPROJ)
    w.add_name(f"mmproj-{name}")
    w.add_file_type(ftype)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(g.VisionProjectorType.QWEN3VL)
    w.add_vision_projection_dim(vc.out_hidden_size)
    w.add_vision_image_size(int(math.isqrt(vc.num_position_embeddings) * patch))
    w.add_vision_patch_size(patch)
    w.add_vision_embedding_length(vc.hidden_size)
    w.add_vision_feed_forward_length(vc.intermediate_size)
    w.add_vision_block_count(depth)
    w.add_vision_head_count(vc.num_heads)
    w.add_vision_image_mean(pp["image_mean"])
    w.add_vision_image_std(pp["image_std"])
    w.add_vision_use_gelu(True)
    w.add_vision_spatial_merge_size(vc.spatial_merge_size)
    w.add_vision_attention_layernorm_eps(tc.rms_norm_eps)
    w.add_vision_is_deepstack_layers([i in deepstack for i in range(depth)])

    pre = "model.visual."
    plan = _patch_embed(src, pre + "patch_embed.proj", dtype)
    plan.append(_plan(src, "v.position_embd.weight", pre + "pos_embed.weight", F32))
    for i in range(depth):
        for gn, hn in (("ln1", "norm1"), ("ln2", "norm2"), ("attn_qkv", "attn.qkv"), ("attn_out", "attn.proj"),
                       ("ffn_up", "mlp.linear_fc1"), ("ffn_down", "mlp.linear_fc2")):
            plan += _with_bias(src, f"v.blk.{i}.{gn}", f"{pre}blocks.{i}.{hn}", wq)
    for gn, hn in (("v.post_ln", "merger.norm"), ("mm.0", "merger.linear_fc1"), ("mm.2", "merger.linear_fc2")):
        plan += _with_bias(src, gn, pre + hn, wq)
    for j, k in enumerate(deepstack):
        for gn, hn in (("norm", "norm"), ("fc1", "linear_fc1"), ("fc2", "linear_fc2")):
            plan += _with_bias(src, f"v.deepstack.{k}.{gn}", f"{pre}deepstack_merger_list.{j}.{hn}", wq)
    write_gguf(path, w, plan)
    return {"path": path, "arch": "clip", "projector": str(g.VisionProjectorType.QWEN3VL), "tensors": len(plan)}


# ---- GLM-4.5V ----------------------------------------------------------------------------------------------------

def _glm4v_text(model_dir: str, config, name: str, wtype: str, path: str, progress=None) -> dict:
    from ..families import get_family
    g = _gguf()
    tc = config.text_config
    wq, ftype = _qtypes(wtype)
    F32 = g.GGMLQuantizationType.F32
    geo = get_family("glm4v_moe").geometry(config)
    L, E, H, I = tc.num_hidden_layers, geo.num_experts, geo.hidden, geo.inter
    dense = tc.first_k_dense_replace
    if geo.moe_layers != tuple(range(dense, L)):
        raise UserError("the checkpoint's MoE layers are not every layer after the first dense ones",
                        "llama.cpp's glm4moe arch expects that layout")
    src = _Source(model_dir, H, I)
    head_dim = getattr(tc, "head_dim", None) or H // tc.num_attention_heads
    rope = tc.rope_parameters or {}
    partial = rope.get("partial_rotary_factor", getattr(tc, "partial_rotary_factor", 0.5))

    w = _text_writer(g, "glm4moe", name, ftype, tc, L, head_dim)
    w.add_rope_dimension_count(int(head_dim * partial))
    w.add_rope_dimension_sections((list(rope.get("mrope_section", [])) + [0, 0, 0, 0])[:4])
    w.add_layer_norm_rms_eps(tc.rms_norm_eps)
    w.add_expert_count(E)
    w.add_expert_used_count(geo.top_k)
    w.add_expert_feed_forward_length(I)
    w.add_expert_shared_count(tc.n_shared_experts)
    w.add_leading_dense_block_count(dense)
    w.add_expert_gating_func(g.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(float(tc.routed_scaling_factor))
    w.add_expert_weights_norm(bool(tc.norm_topk_prob))
    w.add_expert_group_count(tc.n_group)
    w.add_expert_group_used_count(tc.topk_group)
    vocab = write_vocab(w, model_dir, tc.vocab_size, eot="<|user|>")

    pre = "model.language_model."
    plan = [_plan(src, "token_embd.weight", pre + "embed_tokens.weight", wq),
            _plan(src, "output_norm.weight", pre + "norm.weight", F32)]
    if src.has("lm_head.weight"):
        plan.append(_plan(src, "output.weight", "lm_head.weight", wq))
    for i in range(L):
        p, b = f"{pre}layers.{i}.", f"blk.{i}."
        plan += [_plan(src, b + "attn_norm.weight", p + "input_layernorm.weight", F32),
                 _plan(src, b + "post_attention_norm.weight", p + "post_attention_layernorm.weight", F32)]
        for gn, hn in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
            plan += _with_bias(src, b + gn, p + "self_attn." + hn, wq)
        for gn, hn in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
            if src.has(f"{p}self_attn.{hn}.weight"):
                plan.append(_plan(src, f"{b}{gn}.weight", f"{p}self_attn.{hn}.weight", F32))
        if i < dense:
            for gn, hn in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                plan.append(_plan(src, f"{b}{gn}.weight", f"{p}mlp.{hn}.weight", wq))
            continue
        plan += [_plan(src, b + "ffn_gate_inp.weight", p + "mlp.gate.weight", F32),
                 _plan(src, b + "exp_probs_b.bias", p + "mlp.gate.e_score_correction_bias", F32)]
        for gn, hn in (("ffn_gate_shexp", "gate_proj"), ("ffn_up_shexp", "up_proj"), ("ffn_down_shexp", "down_proj")):
            plan.append(_plan(src, f"{b}{gn}.weight", f"{p}mlp.shared_experts.{hn}.weight", wq))
        plan += _expert_plan(src, p + "mlp.experts", b, E, I, H, wq)
    write_gguf(path, w, plan, progress)
    return {"path": path, "arch": "glm4moe", "tensors": len(plan), "block_count": L, "vocab": vocab}


def _glm4v_mmproj(model_dir: str, config, name: str, dtype: str, path: str) -> dict:
    g, vc, tc, wq, ftype, F32, src, pp = _mmproj_setup(model_dir, config, dtype)
    pre = "model.visual."
    act = str(getattr(vc, "hidden_act", "silu")).lower()

    w = g.GGUFWriter(None, "clip")
    w.add_type(g.GGUFType.MMPROJ)
    w.add_name(f"mmproj-{name}")
    w.add_file_type(ftype)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(g.VisionProjectorType.GLM4V)
    w.add_vision_projection_dim(tc.hidden_size)
    w.add_vision_image_size(vc.image_size)
    w.add_vision_patch_size(vc.patch_size)
    w.add_vision_embedding_length(vc.hidden_size)
    w.add_vision_feed_forward_length(src.shape(pre + "blocks.0.mlp.up_proj.weight")[0])
    w.add_vision_block_count(vc.depth)
    w.add_vision_head_count(vc.num_heads)
    w.add_vision_image_mean(pp["image_mean"])
    w.add_vision_image_std(pp["image_std"])
    if act == "silu":
        w.add_vision_use_silu(True)
    elif act.startswith("gelu"):
        w.add_vision_use_gelu(True)
    w.add_vision_spatial_merge_size(vc.spatial_merge_size)
    w.add_vision_attention_layernorm_eps(getattr(vc, "rms_norm_eps", 1e-5))

    plan = _patch_embed(src, pre + "patch_embed.proj", dtype)
    plan += [_plan(src, "v.norm_embd.weight", pre + "post_conv_layernorm.weight", F32),
             _plan(src, "v.position_embd.weight", pre + "embeddings.position_embedding.weight", F32)]
    for i in range(vc.depth):
        for gn, hn in (("ln1", "norm1"), ("ln2", "norm2"), ("attn_qkv", "attn.qkv"), ("attn_out", "attn.proj"),
                       ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj")):
            plan += _with_bias(src, f"v.blk.{i}.{gn}", f"{pre}blocks.{i}.{hn}", wq)
    plan += _with_bias(src, "v.post_ln", pre + "post_layernorm", wq)
    plan += _with_bias(src, "mm.patch_merger", pre + "downsample", _conv_type(dtype))     # Conv2d 2x2 merge
    for gn, hn in (("mm.model.fc", "merger.proj"), ("mm.post_norm", "merger.post_projection_norm"),
                   ("mm.up", "merger.up_proj"), ("mm.gate", "merger.gate_proj"), ("mm.down", "merger.down_proj")):
        plan += _with_bias(src, gn, pre + hn, wq)
    write_gguf(path, w, plan)
    return {"path": path, "arch": "clip", "projector": str(g.VisionProjectorType.GLM4V), "tensors": len(plan)}


# ---- entry point -------------------------------------------------------------------------------------------------

WRITERS = {"qwen3_vl_moe": (_qwen3_text, _qwen3_mmproj), "glm4v_moe": (_glm4v_text, _glm4v_mmproj)}
SUPPORTED = tuple(WRITERS)


def export(model_dir: str, out_dir: str, dtype: str = "bf16", name: str | None = None, progress=None,
           quant: str | None = None, llama_quantize: str | None = None, force: bool = False) -> dict:
    """Write `<name>-<dtype>.gguf` (text) and `mmproj-<name>-<dtype>.gguf` (vision) for the checkpoint in
    `model_dir` into `out_dir` (created). `name` defaults to the directory's name. `quant` (gguf_quant.QUANT_TYPES)
    quantizes the text model's weight matrices: q8_0 writes `<name>-q8_0.gguf` instead of the --dtype text file;
    q4_k and q4_k_m write the --dtype text file and then `<name>-<quant>.gguf` from it with llama.cpp's
    llama-quantize (`llama_quantize`: its path or folder, gguf_quant.find_llama_quantize); the projector stays in
    `dtype`. Returns {"text": {...}, "mmproj": {...}, "llama_cpp_commit"} with each file's path, arch, tensor count
    and {GGML type: tensor count} ("types"); a llama-quantize export's text entry also names its "source" file.
    UserError for a family llama.cpp cannot run from what we write, a missing file, an unknown dtype or type, a
    name with a path separator, a llama-quantize that is missing, or (without `force`) a file of any of those
    names already in `out_dir`: checked before anything is written; and for a llama-quantize that fails. Each file
    is written under a temporary name and renamed when complete. `progress(tensor name)` after each text tensor."""
    from ..engine.loading import read_model_type
    from ..paths import atomic_file, output_dir
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    if quant is not None and quant not in QUANT_TYPES:
        raise UserError(f"unknown --type {quant!r}", f"use one of {', '.join(QUANT_TYPES)}")
    if llama_quantize is not None and quant not in gguf_quant.LLAMA_QUANTIZE:
        raise UserError("--llama-quantize given without --type q4_k or q4_k_m, so nothing would use it",
                        "add --type q4_k or q4_k_m, or leave --llama-quantize out")
    exe = gguf_quant.find_llama_quantize(llama_quantize) if quant in gguf_quant.LLAMA_QUANTIZE else None
    model_type = read_model_type(model_dir)
    if model_type not in SUPPORTED:
        raise UserError(f"export-gguf cannot export model type {model_type!r}",
                        f"it exports {', '.join(SUPPORTED)} checkpoints")
    from ..formats.checkpoint import stored_format
    from ..paths import read_json
    qc = read_json(os.path.join(model_dir, "config.json"), "config.json", "restore the checkpoint's config.json")
    stored = stored_format(qc) if isinstance(qc, dict) else None
    if stored is not None:
        raise UserError(f"export-gguf writes dense checkpoints; {model_dir} stores its experts as {stored}",
                        "export the dense checkpoint it was quantized from (--type q8_0 or q4_k quantizes the GGUF)")
    name = os.path.basename(os.path.normpath(model_dir)) if name is None else name    # --name '': refused, not dropped
    if not name or os.sep in name or name in (".", ".."):
        raise UserError(f"--name {name!r} is not a file name stem", "give a name without path separators")
    output_dir(out_dir, "--out", force=True, inputs={"--model": model_dir})   # any folder: only its files written
    wtype = "q8_0" if quant == "q8_0" else dtype
    paths = [os.path.join(out_dir, f"{name}-{wtype}.gguf"), os.path.join(out_dir, f"mmproj-{name}-{dtype}.gguf")]
    if exe is not None:
        paths.append(os.path.join(out_dir, f"{name}-{quant}.gguf"))
    for path in paths:
        if os.path.lexists(path) and not (force and os.path.isfile(path)):
            raise UserError(f"{path} already exists", "give another --out or --name, or add --force to replace it")
    from ..engine.loading import read_config
    config = read_config(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    write_text, write_mmproj = WRITERS[model_type]
    with atomic_file(paths[0]) as tmp:
        text = dict(write_text(model_dir, config, name, wtype, tmp, progress), path=paths[0])
    with atomic_file(paths[1]) as tmp:
        mmproj = dict(write_mmproj(model_dir, config, name, dtype, tmp), path=paths[1])
    if exe is not None:
        with atomic_file(paths[2]) as tmp:
            gguf_quant.llama_quantize(exe, text["path"], tmp, quant)
        text = dict(text, path=paths[2], source=text["path"])
    for res in (text, mmproj):
        res["types"] = gguf_quant.type_counts(res["path"])
    return {"text": text, "mmproj": mmproj, "llama_cpp_commit": LLAMA_CPP_COMMIT}
