"""`vismmoe make-shape`: a named random-weight shape (bench/shapes.py) written as a real Hugging Face checkpoint,
so that vismmoe and another runtime (llama.cpp, through `vismmoe export-gguf`) run the very same bytes.

    shape config (num_hidden_layers overridden) -> skeleton on `meta` (parameter names and shapes, no memory)
      -> model-00001-of-N.safetensors: embeddings, lm_head, final norm, the vision tower
      -> model-0000k-of-N.safetensors: decoder layer k-2, experts in the hub layout (Qwen3-VL-MoE fused
         `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`; Qwen3-MoE per expert, `Family.hub_experts`), drawn
         and written one layer at a time
      -> model.safetensors.index.json, config.json (`architectures` set, keys named as the family's published
         files name them), tokenizer files, preprocessor_config.json (families with a vision tower), and
         vismmoe_shape.json (shape, layers, seed: marks the checkpoint as random weights)

Weights: normal(0, 0.02) for matrices and embeddings, 1 for norm weights, 0 for biases (as
bench/random_model.py draws them), drawn with a seeded generator on `device` (a GPU draws a 30B layer in
milliseconds; two CPU cores took 70 s for the 30B shape with 4 layers) and stored in `dtype`. Memory: one shard
(1.2 GB per 30B layer in bf16; the first shard, embeddings and vision tower, 2.3 GB) and a float32 scratch of its
largest tensor, never the whole model (4 GB resident for the 30B shape, any number of layers).

Tokenizer: the bundled model's byte-level BPE tokenizer with its vocabulary padded by `[PADi]` entries (unused:
no merge produces them) to the shape's vocab size (a test shape's smaller vocab grows to the tokenizer's), so every
id the random model can emit decodes in both engines.
The config's special ids (image, vision start/end, video, end of turn, pad) are set to that tokenizer's ids.
Image processor: Qwen3-VL's published values (patch 16, merge 2, 64 to 16384 visual tokens, mean/std 0.5).
Routing of random weights is meaningless; only bytes and compute are real.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..errors import UserError

SHARD = "model-{:05d}-of-{:05d}.safetensors"
SHAPE_FILE = "vismmoe_shape.json"          # provenance: which shape, layers, seed (random weights)
_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# Qwen/Qwen3-VL-30B-A3B-Instruct preprocessor_config.json (what the processor does with an image)
_PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_normalize": True,
                 "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                 "merge_size": 2, "patch_size": 16, "resample": 3, "rescale_factor": 1 / 255,
                 "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "temporal_patch_size": 2}


def _draw(shape, name: str, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """One parameter on the CPU in `dtype`: ones for norm weights, zeros for biases, else normal(0, 0.02)."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    return torch.randn(shape, generator=gen, device=device).mul_(0.02).to(dtype).cpu()


def _experts(shape: tuple[int, ...], dtype, device, gen) -> torch.Tensor:
    """A fused expert bank drawn expert by expert (bounds the float32 scratch to one expert)."""
    out = torch.empty(shape, dtype=dtype)
    for e in range(shape[0]):
        out[e] = torch.randn(shape[1:], generator=gen, device=device).mul_(0.02).to(dtype).cpu()
    return out


def _per_expert(name: str, shape: tuple[int, ...], dtype, device, gen) -> dict[str, torch.Tensor]:
    """A fused bank `{prefix}.gate_up_proj [E, 2I, H]` or `{prefix}.down_proj [E, H, I]` drawn as the Qwen3-MoE hub
    files store it: `{prefix}.{e}.gate_proj.weight [I, H]` and `up_proj [I, H]`, or `down_proj.weight [H, I]`."""
    prefix, last = name.rsplit(".", 1)
    E, rows, cols = shape
    parts = ("gate_proj", "up_proj") if last == "gate_up_proj" else ("down_proj",)
    rows //= len(parts)
    return {f"{prefix}.{e}.{p}.weight": torch.randn((rows, cols), generator=gen, device=device).mul_(0.02)
            .to(dtype).cpu() for e in range(E) for p in parts}


def _published_names(out_dir: str, names: dict[str, str]) -> None:
    """config.json with the keys transformers writes renamed to those of the family's published files."""
    if not names:
        return
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({names.get(k, k): v for k, v in cfg.items()}, f, indent=2)


def _tokenizer_files(out_dir: str, vocab_size: int) -> int:
    """The bundled tokenizer, its BPE vocabulary padded to `vocab_size` ids (at least its own size) with
    `[PADi]` entries; returns the padded size."""
    from ..checkpoints import BUNDLED
    with open(os.path.join(BUNDLED, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    used = set(tj["model"]["vocab"].values()) | {a["id"] for a in tj.get("added_tokens", [])}
    vocab_size = max(vocab_size, max(used) + 1)
    for i in range(vocab_size):
        if i not in used:
            tj["model"]["vocab"][f"[PAD{i}]"] = i
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tj, f, ensure_ascii=False)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(BUNDLED, name)):
            shutil.copy(os.path.join(BUNDLED, name), os.path.join(out_dir, name))
    return vocab_size


def make_shape(shape: str, out_dir: str, layers: int | None = None, dtype: str = "bf16", seed: int = 0,
               device: str | None = None, progress=None, force: bool = False) -> dict:
    """Write shape `shape` with `layers` decoder layers (default: the shape's) as a checkpoint in `out_dir`.
    `device`: where weights are drawn (default cuda when available, else cpu). Returns {"dir", "layers",
    "bytes", "shards"}. UserError for an unknown shape or dtype, fewer than one layer or more than the shape has,
    a --device it cannot use (cuda without a CUDA device, a name it does not know), or an existing non-empty
    `out_dir` without `force`. The checkpoint is written under a temporary name beside `out_dir` and renamed into
    place when complete (a `force`d existing folder is replaced only then). `progress()` after each shard."""
    from ..paths import atomic_dir, new_dir
    if dtype not in _DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}", f"use one of {', '.join(_DTYPES)}")
    if layers is not None and layers < 1:
        raise UserError(f"--layers {layers} is too small", "give at least 1")
    from .shapes import get_shape
    from ..families import get_family
    fam_name, config = get_shape(shape)
    have = get_family(fam_name).text_config(config).num_hidden_layers
    if layers is not None and layers > have:
        raise UserError(f"--layers {layers}: shape {shape} has {have} decoder layers", f"give at most {have}")
    if device is not None:
        from ..engine.loading import _resolve_device
        _resolve_device(device)                 # cuda without a CUDA device, or a name it does not know
    new_dir(out_dir, "--out", force)
    with atomic_dir(out_dir) as tmp:
        info = _write_shape(shape, tmp, layers, dtype, seed, device, progress)
        info["dir"] = out_dir
        with open(os.path.join(tmp, SHAPE_FILE), "w") as f:       # tells benchmarks the routing is meaningless
            json.dump(info, f, indent=1)
    return info


def _write_shape(shape: str, out_dir: str, layers: int | None, dtype: str, seed: int, device: str | None,
                 progress) -> dict:
    from transformers import AutoTokenizer

    from ..engine.loading import skeleton
    from ..families import get_family
    from .shapes import get_shape
    fam_name, config = get_shape(shape, layers)
    family = get_family(fam_name)
    tc = family.text_config(config)
    tc.vocab_size = _tokenizer_files(out_dir, tc.vocab_size)
    tok = AutoTokenizer.from_pretrained(out_dir)
    ids = family.token_ids(tok)
    if family.has_vision:
        config.image_token_id, config.video_token_id = ids["image"], tok.convert_tokens_to_ids("<|video_pad|>")
        config.vision_start_token_id, config.vision_end_token_id = ids["image_start"], ids["image_end"]
        with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
            json.dump(_PREPROCESSOR, f, indent=1)
    tc.eos_token_id, tc.pad_token_id, tc.bos_token_id = ids["eos"], ids["pad"], None
    dt = _DTYPES[dtype]
    config.dtype = dt
    config.architectures = [family.model_class.__name__]      # what other runtimes pick the model class by

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=dev).manual_seed(seed)
    model = skeleton(family, config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    del model
    config.save_pretrained(out_dir)
    _published_names(out_dir, family.hub_config_names)
    geo = family.geometry(config)
    L = tc.num_hidden_layers
    layer_pfx = [f"{family.expert_prefix(l).rsplit('.mlp.experts', 1)[0]}." for l in range(L)]
    groups: list[list[tuple[str, tuple]]] = [[] for _ in range(L + 1)]
    for n, s in params:
        k = next((i for i, p in enumerate(layer_pfx) if n.startswith(p)), None)
        groups[0 if k is None else k + 1].append((n, s))
    hub_shapes = {"gate_up_proj": lambda s: (s[0], s[2], s[1]), "down_proj": lambda s: (s[0], s[2], s[1])}

    from safetensors.torch import save_file
    weight_map, total = {}, 0
    n_shards = L + 1
    for i, group in enumerate(groups):
        tensors = {}
        for n, s in group:
            last = n.rsplit(".", 1)[-1]
            if ".mlp.experts." in n and last in hub_shapes and family.hub_experts == "per_expert":
                tensors.update(_per_expert(n, s, dt, dev, gen))
            elif ".mlp.experts." in n and last in hub_shapes:      # fused bank, stored as the hub stores it
                tensors[n] = _experts(hub_shapes[last](s), dt, dev, gen)
            else:
                tensors[n] = _draw(s, n, dt, dev, gen)
        fname = SHARD.format(i + 1, n_shards)
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
        del tensors
        if progress is not None:
            progress()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return {"dir": out_dir, "shape": shape, "layers": L, "moe_layers": len(geo.moe_layers), "bytes": total,
            "shards": n_shards, "dtype": dtype, "seed": seed, "weights": "random"}
