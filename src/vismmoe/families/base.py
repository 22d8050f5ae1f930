"""What the runtime needs to know about one model family, and nothing about offloading.

A `Family` maps a transformers VL-MoE class onto the runtime's vocabulary: which decoder layers are MoE layers
(or, where a layer has several banks of experts, which expert groups), where each one's router and fused experts
module live and what the router reads, how the checkpoint names and stores expert weights (and non-expert tensors
stored otherwise than the model holds them), how an (image, prompt) pair becomes model inputs (tokens, pixels,
`mm_token_type_ids` and the family's own), positions (M-RoPE here; 1-D RoPE in rope1d.py), the prompt as the
decoder's inputs for visual-token compression, and how to make a tiny random config of the family for tests.
Families whose experts use transformers' `@use_experts_implementation` need no code of ours in the forward: the
runtime registers an experts function through `ExpertsInterface`.
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from PIL import Image

from ..errors import UserError
from ..offload.store import ExpertBank

# transformers' smart_resize (the Qwen2-VL and GLM-4V image processors) refuses an image whose long side is over
# 200 times its short side; GLM's first scales a short side below one patch up to it, truncating, which can push
# a ratio just under 200 over it. Longer images are padded to this ratio, well inside.
MAX_ASPECT = 150

# Tokenizing through transformers is not thread-safe: its fast tokenizers switch `split_special_tokens` (and
# padding) on the one Rust tokenizer they wrap, so a server preparing requests in several threads would tokenize
# one request's template with another's setting (an image placeholder split into characters). `chat_ids` encodes
# with copies of the Rust tokenizer that are never reconfigured (`_encoders`), so it needs no lock and one long
# prompt never holds up the others (the Rust encoder also lets go of the GIL while it works); calls that still
# change a setting of the shared tokenizer (padding, tokenizers without a Rust backend) hold this lock.
TOKENIZER_LOCK = threading.Lock()
_ENCODERS_LOCK = threading.Lock()


def _encoders(tokenizer):
    """(template, literal): two copies of `tokenizer`'s Rust backend, made once per tokenizer and never changed
    after: `template` reads special tokens as special tokens (the chat template's text), `literal` reads them as
    plain characters (message text: `split_special_tokens=True`). None for a tokenizer without a Rust backend, or
    one whose backend does not serialise."""
    made = tokenizer.__dict__.get("_vismmoe_encoders")
    if made is None:
        with _ENCODERS_LOCK:
            made = tokenizer.__dict__.get("_vismmoe_encoders")
            if made is None:
                made = tokenizer.__dict__["_vismmoe_encoders"] = _copy_backend(tokenizer) or ()
    return made or None


def _copy_backend(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer
    try:
        with TOKENIZER_LOCK:
            text = backend.to_str()
        made = []
        for literal in (False, True):
            enc = Tokenizer.from_str(text)
            enc.no_padding()
            enc.no_truncation()
            enc.encode_special_tokens = literal
            made.append(enc)
    except Exception:               # a component the Rust tokenizer cannot serialise: tokenize under the lock
        return None
    return tuple(made)


def max_image_side(image_processor) -> int | None:
    """The largest square image (side in pixels) the processor takes without shrinking it: the square root of its
    most pixels (`size["longest_edge"]`, or `max_pixels`), rounded down; None where it states no such cap."""
    size = getattr(image_processor, "size", None) or {}
    most = size.get("longest_edge") or getattr(image_processor, "max_pixels", None)
    return math.isqrt(int(most)) if most else None


def pad_to_aspect(image: Image.Image, image_processor) -> Image.Image:
    """`image` with its short side padded (centred, in the colour the processor normalises to zero) so that
    long / short <= MAX_ASPECT; shrunk first when the padded image would exceed the processor's most pixels
    (the processor would shrink it that far anyway). Images inside the ratio come back untouched."""
    w, h = image.size
    if max(w, h) <= MAX_ASPECT * min(w, h):
        return image
    long = max(w, h)
    max_pixels = image_processor.size.get("longest_edge") or image_processor.max_pixels
    if long * math.ceil(long / MAX_ASPECT) > max_pixels:
        f = math.sqrt(max_pixels * MAX_ASPECT) / long
        w, h = max(1, round(w * f)), max(1, round(h * f))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    side = math.ceil(max(w, h) / MAX_ASPECT)
    W, H = (w, side) if w >= h else (side, h)
    fill = tuple(round(255 * m) for m in image_processor.image_mean)
    canvas = Image.new("RGB", (W, H), fill)
    canvas.paste(image.convert("RGB"), ((W - w) // 2, (H - h) // 2))
    return canvas


@dataclass(frozen=True)
class ExpertGeometry:
    """Sizes of one routed expert and of the MoE part of a model."""

    hidden: int          # H
    inter: int           # I (per expert)
    num_experts: int     # E per layer
    top_k: int           # experts per token
    moe_layers: tuple[int, ...]  # decoder layer indices that have routed experts (or, where a layer has several
    #                              banks of experts, one key per (layer, bank): ERNIE's adapter says how)
    prefill_only: tuple[int, ...] = ()   # of moe_layers: used by the prompt's tokens only (ERNIE's vision banks)

    @property
    def decode_layers(self) -> tuple[int, ...]:
        """The MoE layers (expert groups) a decode step's text token reaches: `moe_layers` without `prefill_only`,
        in the same order."""
        return tuple(l for l in self.moe_layers if l not in self.prefill_only)


@dataclass
class Encoded:
    """A prompt ready for the decoder. B rows, T positions (left padded); or a chunk of one (`chunk`)."""

    embeds: torch.Tensor                 # [B, T, H]
    mask: torch.Tensor                   # [B, T] attention mask (a chunk's: [B, P + T], its P past positions first)
    visual: torch.Tensor                 # [B, T] bool: image-token positions
    positions: torch.Tensor              # [1 + R, B, T]: text row + R rope rows (3 for M-RoPE, 1 for 1-D RoPE)
    deltas: torch.Tensor                 # [B, 1]: rope position of the next token minus its text position
    deepstack: list[torch.Tensor] | None  # per DeepStack level: [sum of visual tokens, H], rows in sequence order
    grids: list[tuple[int, int, int]]    # per row: merged (t, h, w) of its image
    # other decoder inputs that travel with each token, [B, T, ...] (Gemma 4's per-layer inputs): pruned alike
    per_token: dict[str, torch.Tensor] = field(default_factory=dict)
    past_visual: torch.Tensor | None = None     # a chunk's: [B, P] image-token flags of the P positions before it

    def chunk(self, start: int, end: int) -> Encoded:
        """Positions [start, end) as the decoder's input for a cache that holds positions [0, start): embeddings,
        positions, visual flags and `per_token` inputs sliced; the mask covers past and chunk ([B, end]); the
        DeepStack rows of the visual tokens inside the chunk, in the same (row-major) order; `past_visual` the
        visual flags of [0, start) (Gemma 4's image masks index the whole sequence). `deltas` and `grids` are the
        prompt's."""
        deepstack = None
        if self.deepstack is not None:
            B, T = self.visual.shape
            rank = self.visual.reshape(-1).long().cumsum(0).view(B, T) - 1        # each visual token's row
            rows = rank[:, start:end][self.visual[:, start:end]]
            deepstack = [d[rows.to(d.device)] for d in self.deepstack]
        return replace(self, embeds=self.embeds[:, start:end], mask=self.mask[:, :end],
                       visual=self.visual[:, start:end], past_visual=self.visual[:, :start],
                       positions=self.positions[..., start:end],
                       deepstack=deepstack, per_token={k: t[:, start:end] for k, t in self.per_token.items()})


@dataclass(frozen=True)
class Tokens:
    """Special tokens of a family's prompt format."""

    image: str           # one placeholder per visual token
    image_start: str     # "" where the family has no token around an image (DeepSeek-OCR-2)
    image_end: str
    eos: tuple[str, ...]
    pad: str
    extra: tuple[str, ...] = ()


class Family:
    """Base adapter; subclasses set the class attributes and override what differs."""

    model_type: str = ""
    model_class: Any = None
    image_processor_class: Any = None
    tokens: Tokens
    # how a prompt looks when the tokenizer ships no chat template; {image} is replaced by the image block
    fallback_format: str = "{image}{prompt}\n"
    # why the fast decode step (step_graphs.py) cannot run this family, None when it can
    fast_step_blocker: str | None = None
    # why the fast step may not serve this family on CUDA (compiled layers, CUDA graphs) though it does on the CPU
    fast_step_cuda_blocker: str | None = None
    # why a prompt of this family cannot run through the decoder in chunks (`--prefill-chunk`: step/loop.py), None
    # when it can; and whether a chunk boundary may fall inside an image (False: moved to the image's end, where
    # an image's tokens attend to each other both ways, Gemma 4)
    prefill_chunk_blocker: str | None = None
    prefill_chunk_splits_images: bool = True
    # image token ids are looked up in the text embedding (so they must lie inside the vocabulary); False where the
    # model swaps them for the pad token first (Gemma 4)
    image_ids_embedded: bool = True
    # False for a text-only family: images are refused (one line), no image processor, no visual-token compression
    has_vision: bool = True
    # how `vismmoe make-shape` writes routed experts: "fused_transposed" (Qwen3-VL-MoE hub files, `[E, H, 2I]`,
    # `[E, I, H]`) or "per_expert" (Qwen3-MoE hub files, `{prefix}.{e}.gate_proj.weight` ...)
    hub_experts: str = "fused_transposed"
    # config.json keys make-shape renames to the published files' names (transformers writes its own)
    hub_config_names: dict[str, str] = {}

    # ---- model structure -------------------------------------------------------------------------------------
    def text_config(self, config):
        return config.text_config

    def geometry(self, config) -> ExpertGeometry:
        raise NotImplementedError

    def config_fields(self, config) -> list[tuple[str, Any, int, int | None]]:
        """(name, value, least, most or None) of each config.json field that places the MoE layers, as whole numbers
        in range: families/checks.py checks them before `geometry` uses (or divides by) them."""
        return []

    def expert_activation(self, config) -> str:
        """The routed experts' gate activation, as transformers names it (`ACT2FN`): the text config's
        `hidden_act` (SiLU where it has none); the decode kernels compute those in `moe_kernel.ACTIVATIONS`."""
        return str(getattr(self.text_config(config), "hidden_act", None) or "silu")

    def language_model(self, model) -> torch.nn.Module:
        """The text decoder (`embed_tokens`, `rotary_emb`, `layers`, `norm`)."""
        return model.model.language_model

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        return self.language_model(model).layers

    def moe_block(self, model, layer: int) -> torch.nn.Module:
        """The module with `.experts` (the fused bank of routed experts) and the router (`router`)."""
        return self.decoder_layers(model)[layer].mlp

    def router(self, model, layer: int) -> torch.nn.Module:
        """Layer `layer`'s router: hidden [T, H] -> (logits or probabilities [T, E], weights [T, K], indices [T, K]),
        what the experts call receives."""
        return self.moe_block(model, layer).gate

    def router_input(self, model, layer: int, embeds: torch.Tensor) -> torch.Tensor:
        """What layer `layer`'s router reads, given a residual stream `embeds [N, H]` (router probes): the MoE block
        input, after the post-attention norm."""
        return self.decoder_layers(model)[layer].post_attention_layernorm(embeds)

    def expert_prefix(self, layer: int) -> str:
        """Name prefix of layer `layer`'s routed experts among the model's parameters (the checkpoint reader maps
        stored names onto these: `checkpoint_renamer`)."""
        return f"model.language_model.layers.{layer}.mlp.experts"

    def expert_banks(self, config) -> dict[str, ExpertBank]:
        """Expert prefix -> how that bank differs (its width, where the checkpoint keeps it) for families whose
        layers have banks of different widths; {} when every bank is the model's (`ExpertGeometry.inter`)."""
        return {}

    def convert_tensor(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """A stored non-expert tensor (already renamed) -> the model parameters it becomes; most are themselves
        (ERNIE's hub files store its routers transposed and both banks' score biases in one tensor)."""
        return [(name, tensor)]

    def checkpoint_renamer(self, model) -> Callable[[str], str]:
        """Stored checkpoint name -> the model's parameter name, by the renamings transformers applies when it
        loads this model (e.g. InternVL hub files keep `language_model.model.`); a name the model already has
        stays (some renamings would match it again). Tensor conversions (per-expert tensors fused into a bank,
        transposes) are not renamings: the checkpoint reader does those itself."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
        own = set(model.state_dict())
        banks = {n.rsplit(".", 1)[0] for n in own if n.rsplit(".", 2)[-2:-1] == ["experts"]}

        def own_expert(key: str) -> bool:
            """A per-expert tensor under one of the model's own expert modules (`...experts.E.gate_proj.weight`,
            as `vismmoe quantize` writes): the model keeps its experts fused, so the name is not in `own`, and
            renaming it again doubled a prefix (DeepSeek-OCR-2's `model.` -> `model.language_model.`)."""
            head, sep, _ = key.partition(".experts.")
            return bool(sep) and head + ".experts" in banks
        return lambda key: key if key in own or own_expert(key) else rename_source_key(key, renamings, [])[0]

    # ---- inputs ----------------------------------------------------------------------------------------------
    def check_images(self, count: int = 1) -> None:
        """UserError (one line: exit status 2, HTTP 400) when `count` > 0 images are given to a text-only family;
        called where images enter (the CLI before reading the model, the server before fetching them, and the
        family's own image inputs)."""
        if count and not self.has_vision:
            raise UserError(f"{self.model_type} is a text-only model (no vision tower) and cannot take images",
                            "ask without an image, or use a vision-language checkpoint")

    def load_image_processor(self, model_dir: str):
        return self.image_processor_class.from_pretrained(model_dir)

    def token_ids(self, tokenizer) -> dict[str, int]:
        ids = {name: tokenizer.convert_tokens_to_ids(getattr(self.tokens, name)) if getattr(self.tokens, name) else None
               for name in ("image", "image_start", "image_end", "pad")}
        ids["eos"] = [tokenizer.convert_tokens_to_ids(t) for t in self.tokens.eos]
        return ids

    def chat_text(self, tokenizer, messages: list[dict]) -> str:
        """Chat-formatted text of `messages` ({"role", "content": str or parts [{"type": "text", "text"} |
        {"type": "image"}]}) with ONE image placeholder per image part (expanded later to one token per visual
        token), ending with the assistant's turn opened. Checkpoints without a chat template take one user
        message (`fallback_format`)."""
        if getattr(tokenizer, "chat_template", None):
            from jinja2 import TemplateError
            try:
                return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as e:
                first = (str(e).splitlines() or [""])[0][:200]
                raise UserError(f"the checkpoint's chat template cannot format these messages ({type(e).__name__}: "
                                f"{first})", "send messages the template takes, or fix the template "
                                "(chat_template.jinja or tokenizer_config.json)") from None
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise UserError("this checkpoint ships no chat template, so it takes one user message",
                            "send a single user message, or add a chat template to the checkpoint")
        content = messages[0]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        images = sum(p["type"] == "image" for p in parts)
        return self.fallback_format.format(image=self.image_placeholder() * images,
                                           prompt="".join(p["text"] for p in parts if p["type"] == "text"))

    def image_placeholder(self) -> str:
        """What the fallback format puts where the image goes (holding `tokens.image` once)."""
        return self.tokens.image_start + self.tokens.image + self.tokens.image_end

    def expand_image(self, n_visual: int) -> str:
        """What the one `tokens.image` of a formatted prompt becomes for an image of `n_visual` tokens."""
        return self.tokens.image * n_visual

    def chat_ids(self, tokenizer, messages: list[dict], n_visual: list[int]) -> list[int]:
        """Token ids of the chat-formatted `messages` whose i-th image part becomes `n_visual[i]` image tokens.
        Message text is tokenized as text: a special token's string in it (an image placeholder, an end-of-turn
        marker) stays those characters and never becomes the special token. ValueError when the template does
        not place every text part once and one placeholder per image."""
        tag = uuid.uuid4().hex
        marked, texts = [], []                            # text parts replaced by markers the template places
        for m in messages:
            content = m["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            out = []
            for part in parts:
                if part["type"] == "text":
                    out.append({"type": "text", "text": f"\x00{tag}{len(texts)}\x00"})
                    texts.append(part["text"])
                else:
                    out.append({"type": "image"})
            marked.append({"role": m["role"], "content": out})
        pieces = re.split(f"\x00{tag}(\\d+)\x00", self.chat_text(tokenizer, marked))
        # pieces: template, index, template, index, ..., template
        order = [int(i) for i in pieces[1::2]]
        if sorted(order) != list(range(len(texts))):
            raise ValueError(f"chat template placed text parts {order}, expected each of {len(texts)} once")
        image_tok = self.tokens.image                     # "" for a text-only family: no placeholder to find
        templ = pieces[0::2]
        found = sum(t.count(image_tok) for t in templ) if image_tok else 0
        if found != len(n_visual):
            raise ValueError(f"chat template produced {found} image placeholders, expected {len(n_visual)}")
        counts = iter(n_visual)
        if image_tok:
            templ = [_expand(t, image_tok, counts, self.expand_image) for t in templ]

        encoders = _encoders(tokenizer)

        def ids(part: str, literal: bool = False) -> list[int]:
            if not part:
                return []
            if encoders is not None:    # encode_batch lets go of the GIL; encode does not
                return encoders[literal].encode_batch([part], add_special_tokens=False)[0].ids
            with TOKENIZER_LOCK:        # split_special_tokens is a setting of the shared tokenizer
                return tokenizer(part, add_special_tokens=False, split_special_tokens=literal)["input_ids"]

        out = ids(templ[0])
        for i, t in zip(order, templ[1:]):
            out += ids(texts[i], literal=True) + ids(t)
        return out

    def prompt_ids(self, tokenizer, prompt: str, n_visual: int | None) -> list[int]:
        """Token ids of one user turn: an image of `n_visual` visual tokens (None: no image), then `prompt`."""
        parts = ([{"type": "image"}] if n_visual is not None else []) + [{"type": "text", "text": prompt}]
        return self.chat_ids(tokenizer, [{"role": "user", "content": parts}], [] if n_visual is None else [n_visual])

    def image_inputs(self, image_processor, images: list[Image.Image]) -> tuple[dict, list[int]]:
        """Images (at least one) -> (the model's image inputs, `pixel_values` and `image_grid_thw`; the number of
        visual tokens of each image). Images too long and thin for the processor are padded (with the colour that
        normalises to zero) first."""
        vis = image_processor(images=[pad_to_aspect(im, image_processor) for im in images], return_tensors="pt")
        merge = image_processor.merge_size
        counts = (vis["image_grid_thw"].prod(-1) // (merge * merge)).tolist()
        return {"pixel_values": vis["pixel_values"], "image_grid_thw": vis["image_grid_thw"]}, counts

    def build_inputs(self, tokenizer, image_processor, images: list[Image.Image | None], prompts: list[str]) -> dict:
        """Batch of (image, prompt) pairs -> model inputs, left-padded: `build_chat_inputs` of one user turn each
        (an image, or None for a text-only prompt, then the prompt)."""
        chats = [[{"role": "user", "content": ([{"type": "image"}] if im is not None else []) +
                   [{"type": "text", "text": p}]}] for im, p in zip(images, prompts)]
        return self.build_chat_inputs(tokenizer, image_processor, chats,
                                      [[im] if im is not None else [] for im in images])

    def build_chat_inputs(self, tokenizer, image_processor, chats: list[list[dict]],
                          images: list[list[Image.Image]]) -> dict:
        """Batch of conversations (messages as in `chat_ids`; row r's image parts take `images[r]` in order) ->
        model inputs, left-padded: input_ids / attention_mask / mm_token_type_ids [B, T] (1 on image tokens), and
        when any row has an image, the family's image inputs (`image_inputs`: e.g. pixel_values and
        image_grid_thw [images, 3]) in row order."""
        present = [im for row in images for im in row]
        pixels, counts = self.image_inputs(image_processor, present) if present else ({}, [])
        counts = iter(counts)
        rows = [self.chat_ids(tokenizer, chat, [next(counts) for _ in row]) for chat, row in zip(chats, images)]
        with TOKENIZER_LOCK:
            tokenizer.padding_side = "left"
            enc = tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt")
        image_id = tokenizer.convert_tokens_to_ids(self.tokens.image) if self.tokens.image else None
        mm_types = (enc["input_ids"] == image_id).to(torch.int32) if image_id is not None else \
            torch.zeros_like(enc["input_ids"], dtype=torch.int32)   # 0 text, 1 image
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "mm_token_type_ids": mm_types}
        out.update(pixels)
        return out

    def extra_inputs(self, config, input_ids: torch.Tensor) -> dict:
        """Inputs a random-weight request needs besides ids, mask, pixels and `mm_token_type_ids`, from the config
        alone (ERNIE's `moe_mm_token_type_ids`)."""
        return {}

    def synthetic_image_block(self, config, n_visual: int) -> list[int]:
        """Token ids of one image of `n_visual` tokens in a prompt, from the config alone (random-weight engines
        have no tokenizer): the image token, between the start/end tokens where the config names them."""
        start = getattr(config, "vision_start_token_id", None) or getattr(config, "image_start_token_id", None)
        end = getattr(config, "vision_end_token_id", None) or getattr(config, "image_end_token_id", None)
        return [t for t in (start,) if t is not None] + [config.image_token_id] * n_visual + \
            [t for t in (end,) if t is not None]

    def random_image_processor(self, config):
        """The image processor a random-weight engine of `config` uses (bench/random_model.py)."""
        return self.tiny_image_processor(max_side=2048)

    def model_inputs(self, inputs: dict) -> dict:
        """The prepared inputs that the model's forward takes (every family's prepared inputs carry
        `mm_token_type_ids`, which tells the engine where visual tokens are)."""
        return inputs

    # ---- positions (M-RoPE here; families/rope1d.py for 1-D RoPE) ----------------------------------------------
    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """The decoder's `position_ids` from positions `[1 + R, B, T]` (M-RoPE models take all four rows)."""
        return positions

    def prefill_positions(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([4, B, T] text + 3D rope positions, rope deltas [B, 1]) for a prompt, as transformers computes them."""
        mask = inputs["attention_mask"]
        rope, deltas = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=mask)
        text = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return torch.cat([text[None], rope.to(text.device)], dim=0), deltas.to(text.device)

    def decode_positions(self, mask: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """[4, B, 1] positions of the newest token; `mask [B, L]` already includes it."""
        text = mask.long().sum(-1, keepdim=True) - 1                  # [B, 1]
        rope = (text + deltas)[None].expand(3, -1, -1)
        return torch.cat([text[None], rope], dim=0)

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """What the decoder's `rotary_emb` takes from positions `[1 + R, B, T]`: the three rope rows [3, B, T]."""
        return positions[1:]

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """What each decoder layer takes as `position_ids` in a fast decode step, from positions `[1 + R, B, 1]`:
        what the family's text model hands its layers (M-RoPE models: the text row [B, 1])."""
        return positions[0]

    # ---- the fast decode step (step/graphs.py) ---------------------------------------------------------------
    def static_cache(self, model, B: int, L: int, pos: torch.Tensor, dtype, device) -> list:
        """One object per decoder layer: what that layer reads and writes as its cache in a fast decode step (an
        `update(key, value, layer_idx)` for attention layers, and `load(prefill_cache_layer, fill, T)`), or None
        for a layer that keeps none (it reads another layer's; the prefill's cache has no layer for it). Default:
        `graphs.StaticKV` buffers [B, kv_heads, L, head_dim] for every layer, the new token written at `pos [1]`."""
        from ..step.graphs import StaticKV
        tc = self.text_config(model.config)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        shape = (B, tc.num_key_value_heads, L, head_dim)
        return [StaticKV(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                         pos) for _ in self.decoder_layers(model)]

    # the fast step's `decode_masks` builds this family's sliding-window masks (else a config with
    # `sliding_window` is refused: fast_step.unsupported_reason)
    decode_sliding_window: bool = False
    # the routed experts' output enters the residual stream as a plain sum (shared experts and a gate on them
    # aside), so rows computed later (the split step's CPU experts, step/split_step.py) can be added after the
    # decoder layer; False where a norm follows it (Gemma 4's post-feed-forward norms)
    moe_output_additive: bool = True

    def decoder_index(self, layer: int) -> int:
        """The decoder layer of MoE layer (expert group) `layer`; the same number unless a family numbers its
        groups otherwise (ERNIE's banks)."""
        return layer

    def decode_inputs(self, model, ids: torch.Tensor, rope_positions: torch.Tensor) -> tuple:
        """What a fast decode step feeds the decoder layers for the new tokens `ids [B, 1]`: (hidden [B, 1, H],
        per decoder layer its (cos, sin), per decoder layer a dict of further keyword arguments of the layer).
        `rope_positions`: what `rotary_positions` gave. Default: the token embedding, one rotary for every layer,
        no further arguments."""
        lm = self.language_model(model)
        h = lm.embed_tokens(ids)
        n = len(self.decoder_layers(model))
        return h, [lm.rotary_emb(h, rope_positions)] * n, [{}] * n

    def decode_logits(self, model, logits: torch.Tensor) -> torch.Tensor:
        """The logits a fast decode step samples from, given `lm_head`'s `[B, 1, V]` (Gemma 4: soft-capped)."""
        return logits

    def decode_masks(self, model, mask: torch.Tensor, pos: torch.Tensor) -> list:
        """Each decoder layer's `attention_mask` in a fast decode step, from the step's `mask [B, 1, 1, L]` (bool,
        True: attend; the new token's column `pos [1]` already on). Default: that mask for every layer."""
        return [mask] * len(self.decoder_layers(model))

    # ---- the prompt as decoder inputs (for visual-token compression) ----------------------------------------
    def encode(self, model, inputs: dict) -> Encoded:
        """Prompt -> what the decoder takes: embeddings with the image features scattered in, positions, and
        (Qwen3-VL) DeepStack features. Exactly what transformers' forward computes before the decoder. A prompt
        without images (no `pixel_values`): the token embeddings (`encode_text`)."""
        if "pixel_values" not in inputs:
            return self.encode_text(model, inputs)
        ids = inputs["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        image = torch.cat(feats.pooler_output, dim=0).to(embeds.device, embeds.dtype)
        vmask = ids == model.config.image_token_id                                 # [B, T]
        embeds = embeds.masked_scatter(vmask[..., None], image)
        deepstack = getattr(feats, "deepstack_features", None)
        pos, deltas = self.prefill_positions(model, inputs)
        merge = model.config.vision_config.spatial_merge_size
        grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inputs["image_grid_thw"].tolist()]
        return Encoded(embeds=embeds, mask=inputs["attention_mask"], visual=vmask, positions=pos, deltas=deltas,
                       deepstack=list(deepstack) if deepstack is not None else None, grids=grids)

    def encode_text(self, model, inputs: dict) -> Encoded:
        """A prompt without images as the decoder's inputs: token embeddings, positions; no visual token."""
        ids = inputs["input_ids"]
        pos, deltas = self.prefill_positions(model, inputs)
        return Encoded(embeds=model.get_input_embeddings()(ids), mask=inputs["attention_mask"],
                       visual=torch.zeros_like(ids, dtype=torch.bool), positions=pos, deltas=deltas, deepstack=None,
                       grids=[])

    def decoder_forward(self, model, enc: Encoded, cache) -> torch.Tensor:
        """Run the decoder over encoded inputs (filling `cache`); logits of the last position [B, 1, V]."""
        out = self.language_model(model)(inputs_embeds=enc.embeds, attention_mask=enc.mask,
                                         position_ids=self.position_ids(enc.positions), past_key_values=cache,
                                         use_cache=True, **self._decoder_extras(enc))
        return model.lm_head(out.last_hidden_state[:, -1:])

    def _decoder_extras(self, enc: Encoded) -> dict:
        return {}

    def router_probe(self, model, num_layers: int = 2):
        """embeds [N, H] -> the top-k experts [N, k] that the routers of the first `num_layers` MoE layers would
        pick for them (each router applied to what it reads, `router_input`; an approximation: the real router
        input also carries the attention and earlier layers' updates). Reads no expert weights."""
        probed = self.geometry(model.config).moe_layers[:num_layers]

        @torch.no_grad()
        def probe(embeds: torch.Tensor) -> list[torch.Tensor]:
            return [self.router(model, l)(self.router_input(model, l, embeds))[2] for l in probed]

        return probe

    linear_topk_routers = False     # routers pick the top-k of one linear map (softmax or not): they can be fused

    def stacked_router_weight(self, model) -> torch.Tensor | None:
        """[L * E, H]: every MoE layer's router weight in layer order, when `linear_topk_routers` (so one matmul
        scores several layers' routers at once); None otherwise."""
        if not self.linear_topk_routers:
            return None
        cached = getattr(model, "_vismmoe_stacked_routers", None)     # one copy per model, shared by forks
        if cached is None:
            geo = self.geometry(model.config)
            cached = torch.cat([self.router(model, l).weight.detach() for l in geo.moe_layers])
            model._vismmoe_stacked_routers = cached
        return cached

    def query_key(self, model):
        """(text embeds [M, H], visual embeds [N, H]) -> [N] scores: the last text token's query against each
        visual token's key at the first decoder layer with softmax attention (mean over heads, before rotary)."""
        layer = next(l for l in self.decoder_layers(model) if hasattr(l, "self_attn"))
        attn, norm = layer.self_attn, layer.input_layernorm

        @torch.no_grad()
        def scores(text: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
            hd = attn.head_dim
            q = self._queries(attn, norm(text[-1:]))                               # [1, heads, hd]
            k = attn.k_proj(norm(vis)).view(vis.shape[0], -1, hd)                  # [N, kv_heads, hd]
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)               # [N, heads, hd]
            return (q.float() * k.float()).sum(-1).mean(-1)

        return scores

    @staticmethod
    def _queries(attn, x: torch.Tensor) -> torch.Tensor:
        """[N, H] normed hidden -> [N, heads, head_dim] queries of attention module `attn`."""
        return attn.q_proj(x).view(x.shape[0], -1, attn.head_dim)

    # ---- tiny random models for tests ------------------------------------------------------------------------
    def tiny_config(self, token_ids: dict[str, int], vocab_size: int, **overrides):
        raise NotImplementedError

    def tiny_image_processor(self):
        raise NotImplementedError

    def chat_template(self) -> str:
        raise NotImplementedError


def _expand(text: str, image_tok: str, counts, expand) -> str:
    """`text` with each `image_tok` replaced by `expand(n)`, n the next of `counts`."""
    chunks = text.split(image_tok)
    return chunks[0] + "".join(expand(next(counts)) + c for c in chunks[1:])
