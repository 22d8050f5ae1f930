"""`python -m vismmoe.tools.train`: train a small Qwen3-VL-MoE from scratch on the synthetic VQA scenes.

This module owns the training recipe and nothing about serving it:

* presets (`default`: the shipped model, `geometry`: Qwen3-VL-30B-A3B's routing geometry at a tiny width,
  `micro`: CPU tests) -> tokenizer (byte-level BPE trained on the
  question/answer text of the train split) -> `Qwen3VLMoeFamily().tiny_config(...)` -> a
  `Qwen3VLMoeForConditionalGeneration` with fp32 master weights;
* the data pipeline: DataLoader workers render `make_sample("train", i)` for a unique, ever-growing index range,
  tokenize through the family's `build_inputs` (the exact inference prompt), append answer + `<|im_end|>` as the
  only supervised tokens, and compute the M-RoPE position ids with the family's `prefill_positions`. Pixels leave
  the workers as uint8 images (an fp32 patch tensor would be 8x larger: 1.2 GB per 256-image batch); the same
  rescale/normalize/patchify as the saved image processor runs on the device (`patchify`, tested equal);
* the step: bf16 autocast on CUDA, transformers' router aux loss (`output_router_logits=True`), AdamW with
  warmup-stable-decay (the decay lands on the wall-clock deadline), gradient clipping; routed experts run as
  grouped matmuls in bf16 through an experts function registered here (`vismmoe_train`: the runtime's
  `grouped.experts_on_slots` over the layer's own banks, with autograd), vision attention as one
  batched SDPA call per layer instead of one per image (`batch_vision_attention`, numerically the same);
* time budget, tqdm progress, JSON-lines log, resumable state, greedy val accuracy (the engine's loop,
  `decode.greedy`, on the model being trained), and the final bf16
  `save_pretrained` checkpoint (+ tokenizer + image processor) that `vismmoe.load` and `from_pretrained` read.

The test split is never read here; periodic accuracy uses the "val" split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import types
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402
from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as _qmod  # noqa: E402

from ..data import (
    AUX_QTYPES,
    QTYPES,
    answer_vocabulary,
    content_tokens,
    fork_pool,
    make_sample,
    # noqa: E402
                   make_sample_and_scene,
    warm_cache,
)
from ..errors import UserError  # noqa: E402
from ..step.decode import cut_at_eos  # noqa: E402
from ..step.loop import greedy  # noqa: E402
from ..families.qwen3_vl_moe import Qwen3VLMoeFamily  # noqa: E402
from ..step.grouped import experts_on_slots  # noqa: E402
from .tokenizer import build_tokenizer  # noqa: E402

FAMILY = Qwen3VLMoeFamily()
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "train_summary.json"
TRAIN_EXPERTS = "vismmoe_train"
ALL_TYPES = QTYPES + AUX_QTYPES     # type ids: scored types first, then the training-only (auxiliary) ones

# --------------------------------------------------------------------------------------------------------------
# Presets

PRESETS: dict[str, dict] = {
    # 8 MoE layers x 32 experts (top-4), experts ~85 % of the weights, ~59 MB in bf16.
    "default": dict(
        model=dict(hidden=256, dense_inter=512, inter=128, layers=8, heads=4, kv_heads=2, head_dim=64,
                   experts=32, top_k=4, vision_depth=4, vision_hidden=128, vision_inter=512, vision_heads=2,
                   vision_positions=784, deepstack=[1, 2], aux_loss=0.01, max_pos=2048),
        # the BPE trainer runs out of merges at ~520 tokens: every answer word is one token
        image_size=448, vocab=1024, corpus_samples=2400, batch=256, lr=2e-3, min_lr_ratio=0.05, warmup=100,
        decay_frac=0.3, weight_decay=0.05, clip=1.0, val_samples=600, eval_every_s=60.0, ckpt_every_s=150.0,
        log_every=10, eval_batch=200,
    ),
    # Qwen3-VL-30B-A3B's routing geometry at a tiny width: 48 MoE layers x 128 experts, top-8, and its vision
    # tower's token counts (448-1024 px: 196-1024 visual tokens a request). Hidden 64, expert inter 20 (top-8 gives
    # 160 active: 2.5x the hidden size; the 30B model's 6144 for 2048 is 3x). 27.2 M params, 52 MiB in bf16.
    # The vision tower is the default preset's (so `--init-vision` can start from the shipped model's); batches
    # hold about the same number of visual tokens at every size (`batch` is the count at the first size).
    "geometry": dict(
        model=dict(hidden=64, dense_inter=128, inter=20, layers=48, heads=4, kv_heads=2, head_dim=32,
                   experts=128, top_k=8, vision_depth=4, vision_hidden=128, vision_inter=512, vision_heads=2,
                   vision_positions=784, deepstack=[1, 2], aux_loss=0.01, max_pos=4096),
        image_size=448, image_sizes=[448, 640, 832, 1024], photo_backgrounds=0.3, vocab=1024, corpus_samples=2400,
        batch=256, lr=2e-3, min_lr_ratio=0.05, warmup=100, decay_frac=0.3, weight_decay=0.05, clip=1.0,
        val_samples=600, eval_every_s=90.0, ckpt_every_s=150.0, log_every=10, eval_batch=100,
    ),
    # CPU tests: seconds per dozens of steps.
    "micro": dict(
        model=dict(hidden=64, dense_inter=128, inter=32, layers=2, heads=2, kv_heads=1, head_dim=32,
                   experts=4, top_k=2, vision_depth=1, vision_hidden=32, vision_inter=64, vision_heads=1,
                   vision_positions=196, deepstack=[0], aux_loss=0.01, max_pos=1024),
        image_size=224, vocab=600, corpus_samples=120, batch=8, lr=3e-3, min_lr_ratio=0.1, warmup=5,
        weight_decay=0.0, clip=1.0, val_samples=12, eval_every_s=1e9, ckpt_every_s=1e9, log_every=1,
        eval_batch=12,
    ),
    # CPU learning check (a few minutes on 2 cores): hidden 128, 4 layers, 8 experts, 224 px.
    "small": dict(
        model=dict(hidden=128, dense_inter=256, inter=64, layers=4, heads=4, kv_heads=2, head_dim=32,
                   experts=8, top_k=2, vision_depth=2, vision_hidden=64, vision_inter=256, vision_heads=2,
                   vision_positions=196, deepstack=[0], aux_loss=0.01, max_pos=1024),
        image_size=224, vocab=512, corpus_samples=600, batch=32, lr=2e-3, min_lr_ratio=0.05, warmup=30,
        weight_decay=0.05, clip=1.0, val_samples=240, eval_every_s=60.0, ckpt_every_s=1e9, log_every=5,
        eval_batch=60,
    ),
}


def _process_start() -> float:
    """Wall-clock time this process started (so --minutes counts interpreter start-up and imports too)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        start = btime + ticks / os.sysconf("SC_CLK_TCK")
        return start if 0 <= time.time() - start < 3600 else time.time()
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


# --------------------------------------------------------------------------------------------------------------
# Tokenizer, config, model


def corpus_texts(n: int, workers: int = 0) -> list[str]:
    """Questions and answers of the first n train samples, plus every answer word (so each is one token)."""
    idx = list(range(n))
    if workers > 1 and n >= 200:
        with fork_pool(workers) as pool:
            qa = pool.map(_question_answer, idx, chunksize=max(1, n // (4 * workers)))
    else:
        qa = [_question_answer(i) for i in idx]
    texts = [t for pair in qa for t in pair]
    texts += answer_vocabulary() * 20 + ["user", "assistant"] * 20
    return texts


def _question_answer(i: int) -> tuple[str, str]:
    s = make_sample("train", i)
    return s.question, s.answer


def make_tokenizer(vocab: int, corpus_samples: int, workers: int = 0):
    tok = build_tokenizer(FAMILY, corpus_texts(corpus_samples, workers), vocab_size=vocab)
    multi = [a for a in answer_vocabulary() if len(tok(a, add_special_tokens=False)["input_ids"]) != 1]
    if multi:
        print(f"note: {len(multi)} answers are several tokens: {multi[:5]}", file=sys.stderr)
    return tok


def make_config(tokenizer, model_overrides: dict):
    return FAMILY.tiny_config(FAMILY.token_ids(tokenizer), vocab_size=len(tokenizer), **model_overrides)


def param_split(model) -> dict:
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    total = sum(p.numel() for p in model.parameters())
    return {"params_total": total, "params_experts": experts, "params_other": total - experts,
            "bf16_bytes": 2 * total, "bf16_expert_bytes": 2 * experts, "expert_share": experts / max(1, total)}


def _compute_dtype(x: torch.Tensor, param: torch.Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return param.dtype


def train_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """Routed experts as the runtime's grouped matmul (`grouped.experts_on_slots`, with the layer's own expert
    banks as the slot pool: slot = expert), differentiable, no host sync.

    The fp32 master expert weights are cast to the autocast dtype first (`torch.nn.functional.grouped_mm` is not
    autocast-aware and takes bf16 only on CUDA); the cast is part of the graph, so gradients reach the masters.
    """
    T, H = hidden_states.shape
    K = top_k_index.shape[-1]
    w_up, w_down = self.gate_up_proj, self.down_proj                  # [E, 2I, H], [E, H, I]
    dt = _compute_dtype(hidden_states, w_up)
    if w_up.dtype != dt:
        w_up, w_down = w_up.to(dt), w_down.to(dt)
    pairs = experts_on_slots(self, hidden_states, top_k_index, top_k_weights, w_up, w_down, None)   # [T*K, H]
    return pairs.view(T, K, H).sum(dim=1).to(hidden_states.dtype)


ALL_EXPERTS_FUNCTIONS.register(TRAIN_EXPERTS, train_experts_forward)


def _batched_vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None,
                                      **kwargs):
    """Qwen3-VL vision attention for a batch of equal-size images: one SDPA call instead of one per image."""
    seq = hidden_states.shape[0]
    n = cu_seqlens.numel() - 1
    L = seq // max(n, 1)
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = _qmod.apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.reshape(n, L, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))   # [n, heads, L, d]
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scaling)
    return self.proj(out.transpose(1, 2).reshape(seq, -1))


def batch_vision_attention(model, enable: bool = True) -> None:
    """Switch the vision tower of this model instance to one batched SDPA per layer (all images must have the
    same patch count, as in our pipeline). Weights and results are unchanged; only the kernel launches differ."""
    for blk in model.model.visual.blocks:
        if enable:
            blk.attn.forward = types.MethodType(_batched_vision_attention_forward, blk.attn)
        elif "forward" in vars(blk.attn):
            del blk.attn.forward


def init_vision_tower(model, checkpoint: str) -> tuple[int, list[str]]:
    """Copy a saved checkpoint's vision-tower tensors (`model.visual.*`) into `model` where name and shape match.
    Returns (tensors copied, names left as initialised): the mergers' last projections differ when the decoder's
    hidden size does. Raises UserError (one line) when the checkpoint has no vision tower this model can use."""
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(checkpoint) if f.endswith(".safetensors"))
    own = {n: p for n, p in model.named_parameters() if n.startswith("model.visual.")}
    copied, fresh = 0, set(own)
    with torch.no_grad():
        for f in files:
            with safe_open(os.path.join(checkpoint, f), framework="pt") as st:
                for name in st.keys():
                    if name in own and tuple(st.get_slice(name).get_shape()) == tuple(own[name].shape):
                        own[name].copy_(st.get_tensor(name).to(own[name].dtype))
                        fresh.discard(name)
                        copied += 1
    if not copied:
        raise UserError(f"--init-vision {checkpoint}: no vision-tower tensor of this model's shapes there",
                        "give a checkpoint of this model family, e.g. the shipped model")
    return copied, sorted(fresh)


def build_model(config, seed: int):
    torch.manual_seed(seed)
    return FAMILY.model_class(config)


# --------------------------------------------------------------------------------------------------------------
# Pixels: uint8 images in the workers, the image processor's arithmetic on the device


class Uint8Images:
    """Stands in for the image processor inside `build_inputs`: returns the images as uint8 [B, S, S, 3] and
    the grid the real processor would give (S must be a multiple of patch * merge, so it resizes nothing)."""

    def __init__(self, image_processor, size: int):
        self.merge_size = image_processor.merge_size
        self.patch_size = image_processor.patch_size
        self.size = size
        if size % (self.patch_size * self.merge_size):
            raise ValueError(f"image size {size} is not a multiple of {self.patch_size * self.merge_size}")

    def __call__(self, images, return_tensors="pt"):
        S = self.size
        out = torch.empty((len(images), S, S, 3), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            out.share_memory_()        # filled in place: the worker sends it without another 150 MB copy
        dst = out.numpy()
        for i, im in enumerate(images):
            im = im.convert("RGB")
            if im.size != (S, S):
                im = im.resize((S, S), 3)                 # bicubic, as the processor resizes
            dst[i] = np.asarray(im, dtype=np.uint8)
        g = S // self.patch_size
        return {"pixel_values": out, "image_grid_thw": torch.tensor([[1, g, g]] * len(images), dtype=torch.long)}


def patchify(images: torch.Tensor, image_processor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> pixel_values [B*gh*gw, 3*T*P*P], exactly what `image_processor(images)` returns."""
    B, Hh, Ww, C = images.shape
    P, M, T = image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size
    mean = torch.tensor(image_processor.image_mean, device=images.device, dtype=torch.float32).view(1, C, 1, 1)
    std = torch.tensor(image_processor.image_std, device=images.device, dtype=torch.float32).view(1, C, 1, 1)
    x = images.permute(0, 3, 1, 2).to(torch.float32) * float(np.float32(image_processor.rescale_factor))
    x = (x - mean) / std
    gh, gw = Hh // P, Ww // P
    x = x.reshape(B, C, gh // M, M, P, gw // M, M, P).permute(0, 2, 5, 3, 6, 1, 4, 7)
    x = x.unsqueeze(6).expand(B, gh // M, gw // M, M, M, C, T, P, P)
    return x.reshape(B * gh * gw, C * T * P * P).to(dtype)


# --------------------------------------------------------------------------------------------------------------
# Batches


class _RopeOnly:
    """Just enough of a `Qwen3VLMoeModel` to run its weight-free `get_rope_index` on the CPU in data workers."""

    get_rope_index = _qmod.Qwen3VLMoeModel.get_rope_index
    get_vision_position_ids = _qmod.Qwen3VLMoeModel.get_vision_position_ids

    def __init__(self, config):
        self.config = config


def rope_helper(config):
    """An object that `family.prefill_positions(helper, inputs)` accepts in place of the model."""
    return types.SimpleNamespace(model=_RopeOnly(config))


class TypeMix:
    """Which train samples each batch holds: per-type quotas from `weights` (largest remainder), and the j-th
    sample of type t is index 6j + t (`QTYPES[index % 6]` is its type), so no sample is ever used twice. An
    auxiliary type a (id 6 + a) has a seed space of its own: its j-th sample travels as index -(len(AUX) j + a) - 1.

    Iterated by the DataLoader in the main process, so changing `weights` (adaptive mix: more of the types the
    last val eval found weak) steers the batches requested from then on."""

    def __init__(self, batch_size: int, types: list[int], next_j: list[int] | None = None,
                 weights: list[float] | None = None, sizes: list[int] | None = None):
        self.B = batch_size
        self.types = list(types)
        n = len(ALL_TYPES)
        self.next = (list(next_j) + [0] * n)[:n] if next_j else [0] * n
        self.weights = (list(weights) + [1.0] * n)[:n] if weights else [1.0] * n
        self.sizes = list(sizes) if sizes and len(sizes) > 1 else None
        self.per_size = batch_sizes(batch_size, self.sizes) if self.sizes else {}
        self.k = 0                   # batches handed out: the k-th is at image size sizes[k % len(sizes)]

    def quotas(self, batch: int | None = None) -> dict[int, int]:
        B = self.B if batch is None else batch
        w = [max(self.weights[t], 1e-6) for t in self.types]
        raw = [B * x / sum(w) for x in w]
        q = [int(r) for r in raw]
        for i in sorted(range(len(raw)), key=lambda i: (q[i] - raw[i], i))[: B - sum(q)]:
            q[i] += 1
        return dict(zip(self.types, q))

    def next_item(self) -> list[int] | tuple[int, list[int]]:
        """The next batch: its sample indices, or (image size, indices) when the recipe has several sizes."""
        if not self.sizes:
            return self.next_batch()
        size = self.sizes[self.k % len(self.sizes)]
        self.k += 1
        return size, self.next_batch(self.per_size[size])

    def next_batch(self, batch: int | None = None) -> list[int]:
        idx = []
        for t, n in self.quotas(batch).items():
            j = self.next[t]
            if t < len(QTYPES):
                idx += [len(QTYPES) * (j + i) + t for i in range(n)]
            else:
                a = t - len(QTYPES)
                idx += [-(len(AUX_QTYPES) * (j + i) + a) - 1 for i in range(n)]
            self.next[t] = j + n
        return idx

    def __iter__(self):
        while True:
            yield self.next_item()


def batch_sizes(batch: int, sizes: list[int]) -> dict[int, int]:
    """Samples per batch at each image size: `batch` at the first size, and at the others as many as hold about
    the same number of visual tokens (tokens grow with the square of the side), at least one."""
    s0 = sizes[0]
    return {s: max(1, round(batch * s0 * s0 / (s * s))) for s in sizes}


def adaptive_weights(by_type: dict[str, float], aux: dict[str, float] | None = None) -> list[float]:
    """Sampling weight per type from val accuracy: 1 at 100 %, 3 at 0 % (so at most 3:1 between types);
    auxiliary types keep the fixed weights `aux` gives them (0 when absent)."""
    aux = aux or {}
    return [1.0 + 2.0 * (1.0 - by_type.get(q, 0.0)) for q in QTYPES] + [aux.get(q, 0.0) for q in AUX_QTYPES]


def sample_and_scene_of(split: str, index: int, photos: float = 0.0):
    """A `TypeMix` index -> (sample, scene) (negative indices are auxiliary types' samples); `photos`: the share
    of photograph backgrounds (`data.make_sample_and_scene`)."""
    if index >= 0:
        return make_sample_and_scene(split, index, photos=photos)
    k = -index - 1
    return make_sample_and_scene(split, k // len(AUX_QTYPES), AUX_QTYPES[k % len(AUX_QTYPES)], photos=photos)


def sample_of(split: str, index: int, photos: float = 0.0):
    return sample_and_scene_of(split, index, photos)[0]


def val_batches_indices(n: int, batch: int, types: list[int], sizes: list[int] | None = None) -> list:
    """The first n val samples of the given types (all types: the first n, type-balanced), in batches; with
    several image sizes, each size gets an equal share of them, as (size, indices) in token-balanced batches."""
    idx = [k for k in range(n * len(QTYPES)) if k % len(QTYPES) in types][:n]
    if not sizes or len(sizes) <= 1:
        return [idx[i:i + batch] for i in range(0, len(idx), batch)]
    out, per = [], batch_sizes(batch, sizes)
    for j, size in enumerate(sizes):
        part = idx[j::len(sizes)]
        out += [(size, part[i:i + per[size]]) for i in range(0, len(part), per[size])]
    return out


class BatchMaker:
    """Turns samples into model batches: the inference prompt via `build_inputs`, then answer + eos appended."""

    def __init__(self, tokenizer, image_processor, config, image_size: int, visual_dropout: float = 0.0,
                 background_dropout: float = 0.0, image_sizes: list[int] | None = None):
        self.visual_dropout = visual_dropout     # share of samples whose visual tokens are randomly thinned
        self.background_dropout = background_dropout    # share whose background-only tokens are thinned
        self.tok = tokenizer
        self.images = Uint8Images(image_processor, image_size)
        self.images_at = {s: Uint8Images(image_processor, s) for s in (image_sizes or [])}   # by side, px
        self.rope = rope_helper(config)
        ids = FAMILY.token_ids(tokenizer)
        self.eos = ids["eos"][0]                     # <|im_end|>, what the chat template closes a turn with
        self.pad = ids["pad"]
        self.image_id = ids["image"]
        self._answer_ids: dict[str, list[int]] = {}

    def _thin_visual(self, mask: torch.Tensor, mm: torch.Tensor, samples, scenes=None) -> torch.Tensor:
        """Visual-token dropout: for a `visual_dropout` share of rows, hide a random 10-85% of the visual tokens
        from attention; for a further `background_dropout` share, hide a random 10-95% of the tokens that show
        only background (scene geometry: `content_tokens`), so the share of object tokens carries no meaning
        (a compressor that keeps objects and drops background must not make the model over-count). Positions
        stay those of the full prompt, exactly as `compress.prune` gathers them, so the model learns to answer
        from pruned prompts (a hidden token is never attended to: the same as removed)."""
        g = torch.Generator().manual_seed(int(samples[0].index) * 7919 + len(samples))
        mask = mask.clone()
        for b in range(mask.shape[0]):
            r = float(torch.rand((), generator=g))
            vis = torch.nonzero(mm[b]).flatten()
            if r < self.visual_dropout:
                drop = int(len(vis) * (0.10 + 0.75 * float(torch.rand((), generator=g))))
                mask[b, vis[torch.randperm(len(vis), generator=g)[:drop]]] = 0
            elif r < self.visual_dropout + self.background_dropout and scenes is not None:
                cells = int(round(len(vis) ** 0.5))
                bg = vis[torch.from_numpy(~content_tokens(scenes[b], cells))]
                drop = int(len(bg) * (0.10 + 0.85 * float(torch.rand((), generator=g))))
                mask[b, bg[torch.randperm(len(bg), generator=g)[:drop]]] = 0
        return mask

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answer_ids:
            self._answer_ids[answer] = self.tok(answer, add_special_tokens=False)["input_ids"]
        return self._answer_ids[answer]

    def __call__(self, samples, with_prompt: bool = False, scenes=None, size: int | None = None) -> dict:
        """The model batch of these samples, their images at `size` px (one of `image_sizes`; None: `image_size`)."""
        prompts = [s.question for s in samples]
        images = self.images if size is None else self.images_at[size]
        p = FAMILY.build_inputs(self.tok, images, [s.image for s in samples], prompts)
        rows, sup = [], []
        for ids, mask, s in zip(p["input_ids"], p["attention_mask"], samples):
            prompt = ids[mask.bool()].tolist()
            target = self.answer_ids(s.answer) + [self.eos]
            rows.append(prompt + target)
            sup.append(len(target))
        L = max(len(r) for r in rows)
        B = len(rows)
        input_ids = torch.full((B, L), self.pad, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for b, (r, n) in enumerate(zip(rows, sup)):
            input_ids[b, L - len(r):] = torch.tensor(r)
            attention_mask[b, L - len(r):] = 1
            labels[b, L - n:] = input_ids[b, L - n:]
        mm = (input_ids == self.image_id).to(torch.int32)
        full = {"input_ids": input_ids, "attention_mask": attention_mask, "mm_token_type_ids": mm,
                "image_grid_thw": p["image_grid_thw"]}
        pos, _ = FAMILY.prefill_positions(self.rope, full)
        if (self.visual_dropout > 0 or self.background_dropout > 0) and not with_prompt:
            attention_mask = self._thin_visual(attention_mask, mm, samples, scenes)
        out = {
            "images": p["pixel_values"], "image_grid_thw": p["image_grid_thw"], "input_ids": input_ids,
            "attention_mask": attention_mask, "mm_token_type_ids": mm, "position_ids": pos, "labels": labels,
            "keep": torch.tensor(max(sup) + 1), "qtype": torch.tensor([ALL_TYPES.index(s.qtype) for s in samples]),
        }
        if with_prompt:
            ppos, deltas = FAMILY.prefill_positions(self.rope, p)
            out.update({"p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"],
                        "p_mm_token_type_ids": p["mm_token_type_ids"], "p_position_ids": ppos, "p_deltas": deltas,
                        "answers": [s.answer for s in samples]})
        return out


class BatchStream(torch.utils.data.Dataset):
    """Item = a list of sample indices of one split -> one model batch (built in the DataLoader worker)."""

    def __init__(self, maker: BatchMaker, split: str, with_prompt: bool = False, photos: float = 0.0):
        self.maker, self.split, self.with_prompt, self.photos = maker, split, with_prompt, photos

    def __getitem__(self, item: list[int] | tuple[int, list[int]]) -> dict:
        """`item`: sample indices, or (image size, indices) (`TypeMix.next_item`, `val_batches_indices`)."""
        size, indices = item if isinstance(item, tuple) else (None, item)
        pairs = [sample_and_scene_of(self.split, i, self.photos) for i in indices]
        return self.maker([p[0] for p in pairs], with_prompt=self.with_prompt, scenes=[p[1] for p in pairs],
                          size=size)


def make_loader(stream: BatchStream, batches, workers: int, pin: bool, prefetch: int = 2):
    """`batches`: an iterable of index lists (a `TypeMix` for training, a list for val)."""
    kw = {}
    if workers > 0:
        kw = dict(num_workers=workers, prefetch_factor=prefetch, persistent_workers=False,
                  multiprocessing_context="forkserver")   # fork aborts in a process that compiled kernels
    return torch.utils.data.DataLoader(stream, batch_size=None, sampler=batches, pin_memory=pin, **kw)


_HOST_KEYS = ("keep", "qtype")      # read on the host: copying them to the device would cost a sync to read back


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) and k not in _HOST_KEYS else v)
            for k, v in batch.items()}


def fit_workers(workers: int, prefetch: int, batch_bytes: int, shm_dir: str = "/dev/shm") -> tuple[int, int]:
    """Workers hand batches over through shared memory: cap workers x prefetch batches to what /dev/shm holds."""
    import shutil
    try:
        free = shutil.disk_usage(shm_dir).free
    except OSError:
        return workers, prefetch
    while workers > 0 and workers * prefetch * batch_bytes * 1.5 > free:
        if prefetch > 1:
            prefetch -= 1
        else:
            workers -= 1
    return workers, prefetch


# --------------------------------------------------------------------------------------------------------------
# Step and evaluation


def autocast_ctx(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def forward_loss(model, batch: dict, image_processor, device: torch.device):
    """(loss incl. aux, ce, aux, per-row exact match [B] bool) of one batch already on `device`."""
    K = int(batch["keep"])
    labels = batch["labels"][:, -K:]
    with autocast_ctx(device):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                    pixel_values=patchify(batch["images"], image_processor), image_grid_thw=batch["image_grid_thw"],
                    labels=labels, logits_to_keep=K, output_router_logits=True, use_cache=False)
    coef = model.config.text_config.router_aux_loss_coef
    aux = out.aux_loss.detach().float()
    ce = out.loss.detach().float() - coef * aux
    pred = out.logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    ok = ((pred == tgt) | (tgt == -100)).all(dim=1)
    return out.loss, ce, aux, ok


@torch.no_grad()
def greedy_answers(model, batch: dict, image_processor, tokenizer, device: torch.device,
                   max_new_tokens: int = 4) -> list[str]:
    """Greedy decode with a KV cache from the prompt-only part of a val batch: the engine's own loop
    (`decode.greedy` on the plain model), so val accuracy is measured as the engine generates."""
    eos = {i for i in FAMILY.token_ids(tokenizer)["eos"] if i is not None and i >= 0}
    inputs = {"input_ids": batch["p_input_ids"], "attention_mask": batch["p_attention_mask"],
              "mm_token_type_ids": batch["p_mm_token_type_ids"],
              "pixel_values": patchify(batch["images"], image_processor), "image_grid_thw": batch["image_grid_thw"]}
    with autocast_ctx(device):
        rows, _, _ = greedy(model, FAMILY, inputs, max_new_tokens, eos)
    return [tokenizer.decode(cut_at_eos(row, eos, keep_eos=False), skip_special_tokens=True).strip().lower()
            for row in rows]


def evaluate_val(model, val_batches: list[dict], image_processor, tokenizer, device: torch.device) -> dict:
    was_training = model.training
    model.eval()
    right = {q: 0 for q in QTYPES}
    seen = {q: 0 for q in QTYPES}
    try:
        for cpu_batch in val_batches:
            batch = to_device(cpu_batch, device)
            preds = greedy_answers(model, batch, image_processor, tokenizer, device)
            for pred, ans, qt in zip(preds, cpu_batch["answers"], cpu_batch["qtype"].tolist()):
                q = QTYPES[qt]
                seen[q] += 1
                right[q] += int(pred == ans.strip().lower())
    finally:
        model.train(was_training)
    n = sum(seen.values())
    by_type = {q: right[q] / seen[q] for q in QTYPES if seen[q]}
    return {"accuracy": sum(right.values()) / max(1, n), "n": n, "by_type": by_type,
            "min_type_accuracy": min(by_type.values()) if by_type else 0.0}


@torch.no_grad()
def routing_stats(model, batch: dict, image_processor, device: torch.device) -> dict:
    """How the routers spread the real (non-padding) tokens of one val batch over the experts, per MoE layer.

    `load_max_over_mean`: 1.0 = perfectly balanced top-k load. `token_entropy`: mean entropy of each token's
    router distribution over log(E); 1.0 = uniform (no specialisation), lower = tokens prefer few experts.
    """
    was_training = model.training
    model.eval()
    try:
        with autocast_ctx(device):
            out = model(input_ids=batch["p_input_ids"], attention_mask=batch["p_attention_mask"],
                        position_ids=batch["p_position_ids"], mm_token_type_ids=batch["p_mm_token_type_ids"],
                        pixel_values=patchify(batch["images"], image_processor),
                        image_grid_thw=batch["image_grid_thw"], output_router_logits=True, use_cache=False,
                        logits_to_keep=1)
    finally:
        model.train(was_training)
    tc = model.config.text_config
    E, k = tc.num_experts, tc.num_experts_per_tok
    real = batch["p_attention_mask"].reshape(-1).bool()
    layers = []
    for logits in out.router_logits:
        probs = logits.float().softmax(-1)[real]
        load = torch.bincount(probs.topk(k, dim=-1).indices.reshape(-1), minlength=E).float()
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(E)
        layers.append({"load_max_over_mean": float(load.max() / load.mean()),
                       "load_min_over_mean": float(load.min() / load.mean()), "token_entropy": float(ent)})
    mean = {key: sum(layer[key] for layer in layers) / len(layers) for key in layers[0]} if layers else {}
    return {"mean": mean, "layers": layers}


# --------------------------------------------------------------------------------------------------------------
# Schedule, optimizer, state


def lr_at(step: int, progress: float, base: float, warmup: int, min_ratio: float, decay_frac: float = 0.3,
          warm_from: int = 0) -> float:
    """Warmup-stable-decay: linear warmup over `warmup` steps (from step `warm_from`), the peak LR until
    `1 - decay_frac` of the schedule, then a cosine down to `min_ratio * base` at progress 1.

    Progress is wall-clock (or step) based, so the decay lands on the deadline; a long stable phase keeps the
    LR high through the late, sudden drop in loss when the model starts using the image."""
    warm = min(1.0, (step - warm_from + 1) / max(1, warmup))
    p = min(1.0, max(0.0, progress))
    d = max(0.0, (p - (1.0 - decay_frac)) / decay_frac) if decay_frac > 0 else 0.0
    return base * warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * d)))


def make_optimizer(model, lr: float, weight_decay: float, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "norm" in name or "embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **kw)


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_state(out_dir: str, model, optimizer, info: dict) -> None:
    path = os.path.join(out_dir, STATE_FILE)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": _rng_state(), **info},
               path + ".tmp")
    os.replace(path + ".tmp", path)


def export_checkpoint(out_dir: str, model, tokenizer, image_processor, max_shard_size: str | None = None) -> int:
    """Final bf16 `save_pretrained` + tokenizer + image processor; returns the safetensors bytes written.

    `max_shard_size` (e.g. "15MB") splits the weights into shards + `model.safetensors.index.json`, which
    `from_pretrained` and `vismmoe.load` both read; weight files of an earlier export are removed first."""
    for f in os.listdir(out_dir):
        if f.startswith("model") and (f.endswith(".safetensors") or f.endswith(".safetensors.index.json")):
            os.remove(os.path.join(out_dir, f))
    model.to(torch.bfloat16)
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(out_dir)
    image_processor.save_pretrained(out_dir)
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir) if f.endswith(".safetensors"))


# --------------------------------------------------------------------------------------------------------------
# Main loop


@dataclass
class RunInfo:
    step: int = 0
    samples: int = 0                 # train samples consumed
    type_next: list | None = None    # TypeMix counters: next unused j per question type (index 6j + t)
    type_weights: list | None = None  # TypeMix weights in force
    progress: float = 0.0            # schedule progress in [0, 1]
    train_s: float = 0.0             # seconds spent in the training loop, over all runs


def _state_info(info: RunInfo, running_s: float, hp: dict, config, mix: TypeMix) -> dict:
    info.type_next, info.type_weights = list(mix.next), list(mix.weights)
    d = dict(vars(info))
    d["train_s"] += running_s
    return {"info": d, "hparams": hp, "config": config.to_dict()}


def _jsonl(path: str, obj: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def _default_workers(device: torch.device) -> int:
    n = os.cpu_count() or 1
    return max(0, min(14, n - 2)) if device.type == "cuda" else max(0, min(4, n - 1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m vismmoe.tools.train", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (checkpoint, logs, resumable state)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget incl. start-up and final save")
    p.add_argument("--schedule-minutes", type=float, default=None, metavar="M",
                   help="the LR schedule spans M minutes of training over this run and its --resume runs (default: "
                        "each run's schedule ends with it); lets a long run go in pieces, e.g. --minutes 9 three times")
    p.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps (total)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/train_state.pt (its recipe, new samples; after a finished schedule "
                        "the LR warms up again, stays at the peak and decays at the end)")
    p.add_argument("--visual-dropout", type=float, default=0.0, metavar="P",
                   help="share of training samples whose visual tokens are randomly thinned (robustness to pruning)")
    p.add_argument("--init", default=None, metavar="DIR",
                   help="start from a saved checkpoint's weights and tokenizer (fresh optimizer and schedule)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--aux-loss", type=float, default=None, help="router_aux_loss_coef")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's square image size")
    p.add_argument("--image-sizes", default=None, metavar="PX,PX",
                   help="train at several square image sizes, batch k at the k-th in turn, batches token-balanced "
                        "(--batch is the count at the first size); overrides the preset's, e.g. 448,1024")
    p.add_argument("--photo-backgrounds", type=float, default=None, metavar="P",
                   help="share of samples (train and val) on a crop of a bundled photograph instead of a synthetic "
                        "background (default: the preset's; 0.3 for geometry, else 0)")
    p.add_argument("--init-vision", default=None, metavar="DIR",
                   help="start the vision tower (every tensor whose name and shape match) and take the tokenizer "
                        "from a saved checkpoint, e.g. the shipped model; the decoder starts fresh")
    p.add_argument("--val-samples", type=int, default=None)
    p.add_argument("--eval-every", type=float, default=None, help="seconds between val evaluations")
    p.add_argument("--qtypes", default=None, help="comma-separated question types to train on (experiments)")
    p.add_argument("--background-dropout", type=float, default=0.0, metavar="P",
                   help="share of samples with a random 10-95%% of their background-only visual tokens hidden "
                        "(after --visual-dropout's share): robustness to compressors that keep objects")
    p.add_argument("--aux-where", type=float, default=None, metavar="W",
                   help="sampling weight of the training-only 'where' questions (an object's side of the image centre),"
                        " a curriculum for relative position; scored types weigh 1-3 each (default 0: off)")
    p.add_argument("--mix", default=None, choices=["adaptive", "uniform"],
                   help="question-type mix of the batches (default adaptive: weak types get up to 3x more)")
    p.add_argument("--experts-impl", default=TRAIN_EXPERTS, help=f"{TRAIN_EXPERTS} (default) | eager")
    p.add_argument("--no-batched-vision", action="store_true", help="keep transformers' per-image vision SDPA")
    p.add_argument("--max-shard-size", default="15MB",
                   help="split the exported weights into shards of at most this size (default 15MB, so each "
                        "file stays under a 16 MiB transfer limit); 'none' writes one model.safetensors")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--force", action="store_true",
                   help="start a new run in an --out that holds an earlier run (its state, log and checkpoint are "
                        "replaced; default: refused, --resume continues it)")
    return p.parse_args(argv)


# the recipe options a resumed run keeps from its saved state: flag -> where the state's recipe holds the value
_RECIPE = {"preset": ("preset",), "seed": ("seed",), "lr": ("lr",), "warmup": ("warmup",),
           "visual_dropout": ("visual_dropout",), "background_dropout": ("background_dropout",), "mix": ("mix",),
           "image_size": ("image_size",), "val_samples": ("val_samples",), "eval_every": ("eval_every_s",),
           "aux_loss": ("model", "aux_loss"), "photo_backgrounds": ("photo_backgrounds",),
           "init_vision": ("init_vision",), "aux_where": ("aux", "where")}


def _device(name: str | None) -> torch.device:
    """--device: cpu or cuda[:N] (default cuda when there is one); a UserError for anything else."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from ..engine.loading import _resolve_device
    return _resolve_device(name)


def check_args(args, device: torch.device) -> None:
    """UserError, before anything is read or written, for a value the run would crash on or silently ignore: no
    budget (or one of no time or no step), a batch, worker count, learning rate, warm-up, size or seed out of
    range, an unknown question type or experts implementation, an --out that is a file or holds an earlier run
    (a new run replaced its state; --force to do so), --init with --resume, and with --resume a recipe option that
    differs from the run's own (the saved recipe was kept, the option ignored)."""
    from ..cli.args import at_least, seed_in_range
    if args.steps is None and args.minutes is None:
        raise UserError("no budget given", "give --minutes and/or --steps")
    if args.minutes is not None and not 0 < args.minutes < math.inf:
        raise UserError(f"--minutes {args.minutes} is no time to train", "give the minutes, more than 0")
    for flag, value, least in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--workers", args.workers, 0),
                               ("--warmup", args.warmup, 0), ("--val-samples", args.val_samples, 1)):
        at_least(value, least, flag)
    seed_in_range(args.seed)
    for flag, value in (("--lr", args.lr), ("--eval-every", args.eval_every)):
        if value is not None and not 0 < value < math.inf:
            raise UserError(f"{flag} {value} is out of range", "give a positive number")
    if args.aux_loss is not None and not 0 <= args.aux_loss < math.inf:
        raise UserError(f"--aux-loss {args.aux_loss} is out of range", "give a coefficient >= 0")
    if args.aux_where is not None and not 0 <= args.aux_where < math.inf:
        raise UserError(f"--aux-where {args.aux_where} is out of range", "give a sampling weight >= 0")
    if args.image_size is not None and not _image_side(args.image_size):
        raise UserError(f"--image-size {args.image_size} is not an image side",
                        "give a square side in px, a multiple of 32 from 64 to 2048 (e.g. 448)")
    if args.image_sizes is not None:
        parse_image_sizes(args.image_sizes)
    if args.qtypes is not None:
        bad = [q for q in args.qtypes.split(",") if q not in QTYPES]
        if bad or not args.qtypes:
            raise UserError(f"--qtypes {args.qtypes!r}: unknown question type {', '.join(bad) or '(none)'}",
                            f"give some of {', '.join(QTYPES)}")
    if args.experts_impl not in (TRAIN_EXPERTS, "eager"):
        raise UserError(f"--experts-impl {args.experts_impl!r} is unknown", f"give {TRAIN_EXPERTS} or eager")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is an existing file, not a folder", "give a new or empty folder")
    for flag, path in (("--init", args.init), ("--init-vision", args.init_vision)):
        if path is not None and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{flag} {path}: not a checkpoint folder (no config.json)",
                            "give a saved checkpoint's folder, e.g. the shipped model's")
    state = os.path.join(args.out, STATE_FILE)
    if not args.resume:
        if os.path.exists(state) and not args.force:
            raise UserError(f"--out {args.out} holds an earlier run ({STATE_FILE}), which a new run would replace",
                            "add --resume to continue it, another --out, or --force to start over")
        resolve_hparams(args)                   # the recipe's own checks, before --out is made
        return
    if args.force:
        raise UserError("--force starts a new run, and --resume continues one", "give one of them")
    if args.init is not None:
        raise UserError("--init sets a new run's weights, and --resume continues a run with its own",
                        "drop --init")
    if not os.path.exists(state):
        raise UserError(f"--resume: no {state}", "start the run without --resume, or give its --out")
    saved = torch.load(state, map_location="cpu", weights_only=False)["hparams"]
    defaults = vars(parse_args(["--out", args.out]))
    for name, where in _RECIPE.items():
        given = getattr(args, name)
        if given == defaults[name]:
            continue
        have = saved
        for key in where:
            have = have.get(key) if isinstance(have, dict) else None
        if given != have:
            raise UserError(f"--{name.replace('_', '-')} {given} with --resume: the run keeps its own recipe "
                            f"({have})", f"drop --{name.replace('_', '-')}, or start a new run")
    if args.qtypes is not None and [QTYPES.index(q) for q in args.qtypes.split(",")] != saved.get("qtypes"):
        raise UserError("--qtypes with --resume: the run keeps its own recipe", "drop --qtypes, or start a new run")
    if args.image_sizes is not None and parse_image_sizes(args.image_sizes) != saved.get("image_sizes"):
        raise UserError("--image-sizes with --resume: the run keeps its own recipe",
                        "drop --image-sizes, or start a new run")


def _image_side(px: int) -> bool:
    """A square side the recipe takes: a multiple of 32 px (patch 16 x merge 2) from 64 to 2048."""
    return px % 32 == 0 and 64 <= px <= 2048


def parse_image_sizes(text: str) -> list[int]:
    """`--image-sizes` "448,1024" -> [448, 1024]; each a multiple of 32 px (patch 16 x merge 2), 64-2048, distinct;
    anything else is a UserError."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or len(set(sizes)) != len(sizes) or not all(map(_image_side, sizes)):
        raise UserError(f"--image-sizes {text!r} is not a list of image sides", "give distinct square sides in px, "
                        "each a multiple of 32 from 64 to 2048, comma-separated (e.g. 448,1024)")
    return sizes


def schedule_seconds(minutes: float) -> float:
    """`--schedule-minutes` in seconds; not a positive number: a UserError."""
    if not minutes > 0 or math.isinf(minutes):
        raise UserError(f"--schedule-minutes {minutes} is no length",
                        "give the schedule's length in minutes, more than 0")
    return 60.0 * minutes


def resolve_hparams(args) -> dict:
    """The preset with the command line's overrides applied (a fresh run; a resumed run keeps its own)."""
    preset = PRESETS[args.preset]
    hp = {k: v for k, v in preset.items() if k != "model"}
    hp["model"] = dict(preset["model"])
    for key, val in (("batch", args.batch), ("lr", args.lr), ("warmup", args.warmup),
                     ("image_size", args.image_size), ("val_samples", args.val_samples),
                     ("eval_every_s", args.eval_every)):
        if val is not None:
            hp[key] = val
    if args.aux_loss is not None:
        hp["model"]["aux_loss"] = args.aux_loss
    if args.image_size is not None:
        hp["model"]["vision_positions"] = (args.image_size // 16) ** 2
        hp.pop("image_sizes", None)
    if args.image_sizes is not None:
        hp["image_sizes"] = parse_image_sizes(args.image_sizes)
    if args.photo_backgrounds is not None:
        if not 0.0 <= args.photo_backgrounds <= 1.0:
            raise UserError(f"--photo-backgrounds {args.photo_backgrounds} is not a share", "give a share of the "
                            "samples, from 0 to 1")
        hp["photo_backgrounds"] = args.photo_backgrounds
    if hp.get("image_sizes"):
        hp["image_size"] = hp["image_sizes"][0]
    if args.init and args.init_vision:
        raise UserError("--init and --init-vision both set the starting weights", "give one (--init takes every "
                        "weight, --init-vision the vision tower's)")
    if args.init_vision and not (os.path.isdir(args.init_vision) and any(
            f.endswith(".safetensors") for f in os.listdir(args.init_vision))):
        raise UserError(f"--init-vision {args.init_vision}: not a checkpoint folder with .safetensors files",
                        "give a saved checkpoint's folder, e.g. the shipped model's")
    hp["init_vision"] = args.init_vision
    if args.schedule_minutes is not None:
        hp["schedule_s"] = schedule_seconds(args.schedule_minutes)
    hp["qtypes"] = [QTYPES.index(q) for q in args.qtypes.split(",")] if args.qtypes else None
    hp["mix"] = args.mix or hp.get("mix", "adaptive")
    hp["seed"] = args.seed
    hp["preset"] = args.preset
    hp["visual_dropout"] = args.visual_dropout
    hp["background_dropout"] = args.background_dropout
    if min(args.visual_dropout, args.background_dropout) < 0 or args.visual_dropout + args.background_dropout > 1:
        raise UserError("--visual-dropout and --background-dropout are shares of the samples",
                        "give each >= 0, with a sum <= 1")
    hp["aux"] = {"where": args.aux_where} if args.aux_where else {}
    return hp


# --- set-up steps of `main` ---


def _configure_device(device: torch.device) -> None:
    """CUDA math settings of the run (nothing on the CPU)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")      # TF32 for whatever runs outside bf16 autocast
        torch.backends.cudnn.benchmark = True           # the patch-embedding Conv3d sees one shape all run


def _resume_or_start(args, log_path: str, state_path: str) -> tuple[dict | None, dict]:
    """(saved state or None, the run's recipe): `--resume` reads OUT/train_state.pt and keeps its recipe (only
    --batch may change); a fresh run resolves the preset and removes an earlier run's log."""
    if args.resume:
        if not os.path.exists(state_path):
            raise UserError(f"--resume: no {state_path}", "start the run without --resume, or give its --out")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        hp = state["hparams"]
        if args.batch is not None:
            hp["batch"] = args.batch
        if args.schedule_minutes is not None:
            hp["schedule_s"] = schedule_seconds(args.schedule_minutes)
        return state, hp
    hp = resolve_hparams(args)
    if os.path.exists(log_path):
        os.remove(log_path)
    return None, hp


def _question_types(hp: dict) -> list[int]:
    """Type ids the batches hold: the recipe's scored types (all by default), then the auxiliary types it weighs."""
    types = list(hp["qtypes"]) if hp.get("qtypes") else list(range(len(QTYPES)))
    aux_w = hp.get("aux", {})
    return types + [len(QTYPES) + a for a, q in enumerate(AUX_QTYPES) if aux_w.get(q)]


def _tokenizer_and_config(args, hp: dict, state: dict | None, workers: int):
    """(tokenizer, model config): a resumed run's own, an `--init` checkpoint's, or new ones from the recipe
    (the tokenizer is trained on the train split's text). A new run saves its tokenizer to OUT."""
    from transformers import AutoTokenizer, Qwen3VLMoeConfig
    if state is not None:
        return AutoTokenizer.from_pretrained(args.out), Qwen3VLMoeConfig.from_dict(state["config"])
    if args.init:
        tokenizer = AutoTokenizer.from_pretrained(args.init)
        config = Qwen3VLMoeConfig.from_pretrained(args.init)
    elif args.init_vision:
        tokenizer = AutoTokenizer.from_pretrained(args.init_vision)
        config = make_config(tokenizer, hp["model"])
    else:
        tokenizer = make_tokenizer(hp["vocab"], hp["corpus_samples"], workers)
        config = make_config(tokenizer, hp["model"])
    tokenizer.save_pretrained(args.out)
    return tokenizer, config


def _data(hp: dict, info: RunInfo, maker: BatchMaker, workers: int, device: torch.device):
    """(val batches, the train `TypeMix`, the train batch iterator, workers): the val set is made once; the train
    DataLoader's workers start here, before the device is touched. Fewer workers (or less prefetch) when /dev/shm
    cannot hold their batches."""
    types = _question_types(hp)
    aux_w = hp.get("aux", {})
    val_idx = val_batches_indices(hp["val_samples"], hp["eval_batch"], types, hp.get("image_sizes"))
    photos = hp.get("photo_backgrounds", 0.0)
    val_batches = list(make_loader(BatchStream(maker, "val", with_prompt=True, photos=photos), val_idx,
                                   min(workers, len(val_idx)), pin=False))
    mix = TypeMix(hp["batch"], types, info.type_next,
                  info.type_weights or adaptive_weights({q: 1.0 for q in QTYPES}, aux_w), hp.get("image_sizes"))
    prefetch = 2
    if workers > 0:
        fit = fit_workers(workers, prefetch, hp["batch"] * hp["image_size"] ** 2 * 3)
        if fit != (workers, prefetch):
            print(f"warning: /dev/shm is small: {fit[0]} workers x prefetch {fit[1]} (asked {workers} x "
                  f"{prefetch}); 0 workers = data made in the main process, much slower", file=sys.stderr)
            workers, prefetch = fit
    train_iter = iter(make_loader(BatchStream(maker, "train", photos=photos), mix, workers, pin=device.type == "cuda",
                                  prefetch=prefetch))
    return val_batches, mix, train_iter, workers


def _model_and_optimizer(args, hp: dict, config, state: dict | None, device: torch.device):
    """(model in train mode on `device` with the chosen experts and vision kernels, AdamW, parameter sizes):
    weights and optimizer state (and the RNGs) from a resumed run, weights from `--init`, or fresh ones."""
    model = build_model(config, hp["seed"])
    if state is not None:
        model.load_state_dict(state["model"])
    elif args.init:
        from transformers import Qwen3VLMoeForConditionalGeneration
        init = Qwen3VLMoeForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        model.load_state_dict(init.state_dict())
        del init
    elif args.init_vision:
        copied, skipped = init_vision_tower(model, args.init_vision)
        print(f"vision tower from {args.init_vision}: {copied} tensors copied, {len(skipped)} started fresh "
              f"(shape differs: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''})", flush=True)
    sizes = param_split(model)
    model.to(device)
    model.train()
    model.set_experts_implementation(args.experts_impl)
    batch_vision_attention(model, not args.no_batched_vision)
    optimizer = make_optimizer(model, hp["lr"], hp["weight_decay"], device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
    else:
        torch.manual_seed(hp["seed"])
    return model, optimizer, sizes


@dataclass
class Job:
    """One training run's parts, built by `main`'s set-up steps and shared by its loop and its final step."""

    args: argparse.Namespace
    hp: dict
    device: torch.device
    t_start: float                   # when the --minutes budget began
    deadline: float | None           # when the run must have ended (None: --steps only)
    info: RunInfo
    tokenizer: object
    config: object
    image_processor: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    mix: TypeMix
    sizes: dict                      # parameter counts and bytes (`param_split`)
    workers: int
    experts_impl: str                # what the model runs now (a failing first step falls back to eager)
    batched_vision: bool

    def log(self, rec: dict) -> None:
        _jsonl(os.path.join(self.args.out, LOG_FILE), rec)


def _announce(job: Job) -> None:
    """The start line on stdout and the `start` event in the log."""
    s = job.sizes
    print(f"model: {s['params_total'] / 1e6:.2f} M params = experts {s['params_experts'] / 1e6:.2f} M "
          f"({100 * s['expert_share']:.1f} %) + other {s['params_other'] / 1e6:.2f} M; "
          f"bf16 {s['bf16_bytes'] / 2**20:.1f} MiB; vocab {len(job.tokenizer)}; device {job.device}; "
          f"batch {job.hp['batch']}; workers {job.workers}; start-up {time.time() - job.t_start:.1f} s", flush=True)
    job.log({"event": "start", "resume": job.args.resume, "step": job.info.step, "hparams": job.hp, **s,
             "device": str(job.device), "workers": job.workers, "startup_s": time.time() - job.t_start})


# --- the loop's steps ---


@dataclass
class _Clock:
    """The loop's schedule: where this run's LR schedule starts, when training must stop (leaving time for the
    final eval), and when the next eval and checkpoint are due."""

    t_loop: float
    start_step: int
    start_progress: float
    warm_from: int                   # the step the LR warm-up starts from
    train_end: float | None
    next_eval: float
    next_ckpt: float
    last_eval_s: float = 0.0         # the last eval's seconds: the final eval is expected to take as long


def _start_clock(job: Job) -> _Clock:
    """The clock at the loop's start; a resumed run whose schedule had finished warms up again and decays anew."""
    start_progress, warm_from = job.info.progress, 0
    if start_progress >= 0.99 and job.hp.get("schedule_s"):
        print("note: the schedule (--schedule-minutes) has ended: the LR stays at its floor; resume with a longer "
              "--schedule-minutes to raise it", file=sys.stderr)
    elif start_progress >= 0.99:
        start_progress, warm_from = 0.5, job.info.step
        print("note: resuming a finished schedule; the LR warms up to its peak again and decays at the end",
              file=sys.stderr)
    t_loop = time.time()
    reserve = 20.0 if job.device.type == "cuda" else 5.0       # final eval estimate is added after each eval
    return _Clock(t_loop=t_loop, start_step=job.info.step, start_progress=start_progress, warm_from=warm_from,
                  train_end=None if job.deadline is None else job.deadline - reserve,
                  next_eval=t_loop + job.hp["eval_every_s"], next_ckpt=t_loop + job.hp["ckpt_every_s"])


def _should_stop(job: Job, clock: _Clock, now: float) -> bool:
    """--steps reached, or too little time left before the deadline for another step and the final eval."""
    if job.args.steps is not None and job.info.step >= job.args.steps:
        return True
    return clock.train_end is not None and now >= clock.train_end - clock.last_eval_s


def _set_lr(job: Job, clock: _Clock, now: float) -> float:
    """Advance the schedule's progress (by time or by steps, whichever is further) and set this step's LR."""
    info, hp, steps = job.info, job.hp, job.args.steps
    frac_t = 0.0 if clock.train_end is None else (now - clock.t_loop) / max(
        1e-6, clock.train_end - clock.last_eval_s - clock.t_loop)
    frac_s = 0.0 if steps is None else (info.step - clock.start_step) / max(1, steps - clock.start_step)
    if hp.get("schedule_s"):        # one schedule over several runs: the training seconds of all of them so far
        info.progress = min(1.0, (info.train_s + now - clock.t_loop) / hp["schedule_s"])
    else:
        info.progress = clock.start_progress + (1 - clock.start_progress) * min(1.0, max(frac_t, frac_s))
    lr = lr_at(info.step, info.progress, hp["lr"], hp["warmup"], hp["min_lr_ratio"], hp.get("decay_frac", 0.3),
               clock.warm_from)
    for g in job.optimizer.param_groups:
        g["lr"] = lr
    return lr


def _fall_back(job: Job, e: Exception) -> bool:
    """Switch off the first fast kernel still in use (the experts function, then batched vision attention),
    saying why; False when both are off already."""
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if job.experts_impl != "eager":
        print(f"warning: experts '{job.experts_impl}' failed ({why}); using eager", file=sys.stderr)
        job.experts_impl = "eager"
        job.model.set_experts_implementation("eager")
        return True
    if job.batched_vision:
        print(f"warning: batched vision attention failed ({why}); per image", file=sys.stderr)
        job.batched_vision = False
        batch_vision_attention(job.model, False)
        return True
    return False


def _forward_backward(job: Job, batch: dict, first: bool):
    """(ce, aux, per-row exact match) of one batch, gradients computed. On the run's `first` step a kernel that
    fails falls back (`_fall_back`) and the step is tried again; later failures, and running out of memory, raise."""
    while True:
        try:
            job.optimizer.zero_grad(set_to_none=True)
            loss, ce, aux, ok = forward_loss(job.model, batch, job.image_processor, job.device)
            loss.backward()
            return ce, aux, ok
        except (RuntimeError, NotImplementedError) as e:
            if not first or isinstance(e, torch.cuda.OutOfMemoryError) or not _fall_back(job, e):
                raise


class _Window:
    """Sums over the steps since the last `train` log line (losses stay on the device: no sync per step)."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.aux = torch.zeros((), device=device)
        self.ok = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        for acc in (self.loss, self.aux, self.ok):
            acc.zero_()
        self.steps, self.data_wait, self.t0, self.samples = 0, 0.0, time.time(), 0

    def add(self, ce, aux, ok, samples: int) -> None:
        self.loss += ce
        self.aux += aux
        self.ok += ok.float().mean()
        self.steps += 1
        self.samples += samples


def _log_window(job: Job, window: _Window, bar, gnorm, lr: float) -> None:
    """Write one `train` record (means over the window), show it on the progress bar, start a new window."""
    dt = time.time() - window.t0
    n = window.steps
    rec = {"event": "train", "step": job.info.step, "samples": job.info.samples,
           "loss": float(window.loss) / n, "aux_loss": float(window.aux) / n,
           "aux_balance": float(window.aux) / n / job.config.text_config.num_experts_per_tok,
           "train_acc": float(window.ok) / n, "grad_norm": float(gnorm), "lr": lr,
           "samples_per_s": window.samples / max(dt, 1e-9), "data_wait_frac": window.data_wait / max(dt, 1e-9),
           "progress": job.info.progress, "elapsed_s": time.time() - job.t_start}
    job.log(rec)
    bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['train_acc']:.2f}",
                    sps=f"{rec['samples_per_s']:.0f}", lr=f"{lr:.1e}", refresh=False)
    window.reset()


def _periodic_eval(job: Job, clock: _Clock, val_batches: list[dict], bar, window: _Window) -> None:
    """Val accuracy (logged and shown); the adaptive mix re-weighs the question types from it. Its time is not
    counted as training time."""
    te = time.time()
    val = evaluate_val(job.model, val_batches, job.image_processor, job.tokenizer, job.device)
    clock.last_eval_s = time.time() - te
    if job.hp.get("mix", "adaptive") == "adaptive":
        job.mix.weights = adaptive_weights(val["by_type"], job.hp.get("aux", {}))
    job.log({"event": "val", "step": job.info.step, "samples": job.info.samples, **val,
             "eval_s": clock.last_eval_s, "mix_weights": dict(zip(ALL_TYPES, job.mix.weights)),
             "elapsed_s": time.time() - job.t_start})
    bar.write(f"step {job.info.step}: val acc {val['accuracy']:.3f} "
              + " ".join(f"{q}={a:.2f}" for q, a in val["by_type"].items()))
    clock.next_eval = time.time() + job.hp["eval_every_s"]
    window.t0 += clock.last_eval_s


def _periodic_checkpoint(job: Job, clock: _Clock, window: _Window) -> None:
    """Save the resumable state; its time is not counted as training time."""
    tc = time.time()
    save_state(job.args.out, job.model, job.optimizer,
               _state_info(job.info, time.time() - clock.t_loop, job.hp, job.config, job.mix))
    clock.next_ckpt = time.time() + job.hp["ckpt_every_s"]
    window.t0 += time.time() - tc


def _train_loop(job: Job, train_iter, val_batches: list[dict]) -> _Clock:
    """Optimizer steps until `_should_stop`, with log lines every `log_every` steps and val evals and checkpoints
    on their wall-clock periods. Returns the loop's clock (its start time and first step)."""
    from tqdm import tqdm
    clock = _start_clock(job)
    info = job.info
    bar = tqdm(total=job.args.steps, initial=info.step, disable=job.args.no_progress, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 15.0, desc="train")
    window = _Window(job.device)
    while True:
        now = time.time()
        if _should_stop(job, clock, now):
            break
        lr = _set_lr(job, clock, now)
        t0 = time.time()
        cpu_batch = next(train_iter)
        window.data_wait += time.time() - t0
        batch = to_device(cpu_batch, job.device)
        ce, aux, ok = _forward_backward(job, batch, first=info.step == clock.start_step)
        gnorm = torch.nn.utils.clip_grad_norm_(job.model.parameters(), job.hp["clip"])
        job.optimizer.step()
        n = len(cpu_batch["qtype"])          # --image-sizes: fewer samples in a batch of larger images
        info.step += 1
        info.samples += n
        window.add(ce, aux, ok, n)
        bar.update(1)
        if info.step % job.hp["log_every"] == 0 or info.step == job.args.steps:
            _log_window(job, window, bar, gnorm, lr)
        if time.time() >= clock.next_eval:
            _periodic_eval(job, clock, val_batches, bar, window)
        if time.time() >= clock.next_ckpt:
            _periodic_checkpoint(job, clock, window)
    bar.close()
    return clock


def _finish(job: Job, val_batches: list[dict], loop_s: float, start_step: int) -> dict:
    """Final val, resumable state, routing statistics, the bf16 checkpoint and the summary (OUT/train_summary.json)."""
    info, args, B = job.info, job.args, job.hp["batch"]
    val = evaluate_val(job.model, val_batches, job.image_processor, job.tokenizer, job.device)
    job.log({"event": "val", "step": info.step, "samples": info.samples, **val, "final": True,
             "elapsed_s": time.time() - job.t_start})
    save_state(args.out, job.model, job.optimizer, _state_info(info, 0.0, job.hp, job.config, job.mix))
    routing = routing_stats(job.model, to_device(val_batches[0], job.device), job.image_processor, job.device)
    shard = None if str(args.max_shard_size).lower() in ("none", "0", "") else args.max_shard_size
    ckpt_bytes = export_checkpoint(args.out, job.model, job.tokenizer, job.image_processor, shard)
    summary = {**job.sizes, "checkpoint_bytes": ckpt_bytes, "steps": info.step, "samples_seen": info.samples,
               "batch": B, "loop_s": loop_s, "train_s_total": info.train_s, "wall_s": time.time() - job.t_start,
               "samples_per_s": (info.step - start_step) * B / max(loop_s, 1e-9), "device": str(job.device),
               "experts_implementation": job.experts_impl, "batched_vision_attention": job.batched_vision,
               "workers": job.workers, "val": val, "routing": routing, "hparams": job.hp}
    with open(os.path.join(args.out, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"done: {info.step} steps, {info.samples} samples, {summary['wall_s']:.0f} s wall; val acc "
          f"{val['accuracy']:.3f} (" + ", ".join(f"{q} {a:.2f}" for q, a in val["by_type"].items()) + f"); "
          f"checkpoint {ckpt_bytes / 2**20:.1f} MiB in {args.out}", flush=True)
    return summary


def main(argv=None, t_start: float | None = None) -> dict:
    """Run (or resume) one training job; returns the summary also written to OUT/train_summary.json.

    `t_start` is when the --minutes budget began (the command line passes the process start time).

        arguments -> recipe (resumed or new) -> tokenizer, config -> data (val set, train workers) -> model,
        optimizer -> loop (steps, logs, evals, checkpoints) -> final val, state, bf16 checkpoint, summary
    """
    t_start = time.time() if t_start is None else t_start
    args = parse_args(argv)
    device = _device(args.device)
    deadline = t_start + args.minutes * 60 if args.minutes else None
    check_args(args, device)
    os.makedirs(args.out, exist_ok=True)
    workers = _default_workers(device) if args.workers is None else args.workers
    _configure_device(device)
    state, hp = _resume_or_start(args, os.path.join(args.out, LOG_FILE), os.path.join(args.out, STATE_FILE))
    warm_cache()                    # data first: the DataLoader workers fork before the device is touched
    tokenizer, config = _tokenizer_and_config(args, hp, state, workers)
    image_processor = FAMILY.tiny_image_processor(max(hp.get("image_sizes") or [hp["image_size"]]))
    maker = BatchMaker(tokenizer, image_processor, config, hp["image_size"], hp.get("visual_dropout", 0.0),
                       hp.get("background_dropout", 0.0), hp.get("image_sizes"))
    info = RunInfo(**state["info"]) if state is not None else RunInfo()
    val_batches, mix, train_iter, workers = _data(hp, info, maker, workers, device)
    model, optimizer, sizes = _model_and_optimizer(args, hp, config, state, device)
    del state
    job = Job(args=args, hp=hp, device=device, t_start=t_start, deadline=deadline, info=info, tokenizer=tokenizer,
              config=config, image_processor=image_processor, model=model, optimizer=optimizer, mix=mix,
              sizes=sizes, workers=workers, experts_impl=args.experts_impl,
              batched_vision=not args.no_batched_vision)
    _announce(job)
    clock = _train_loop(job, train_iter, val_batches)
    del train_iter                  # the workers end before the final eval (their shutdown counts as loop time)
    loop_s = time.time() - clock.t_loop
    info.train_s += loop_s
    return _finish(job, val_batches, loop_s, clock.start_step)


if __name__ == "__main__":
    try:
        main(t_start=_process_start())
    except UserError as e:
        print(f"vismmoe: error: {e}", file=sys.stderr)
        sys.exit(2)
