"""Engines over random weights for shapes too large to write as checkpoints (a 30B model is 60 GB of experts).

Non-expert weights are drawn on the device (normal, std 0.02; norms 1, biases 0); experts are drawn on the device
layer by layer and copied into the host store's pinned buffers. Inputs are synthetic token ids around a real
processed image (for a text-only family: random text ids alone). Nothing here is used by `vismmoe.load`;
benchmarks say "random weights" wherever they use it.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..config import RuntimeConfig
from ..engine.core import Engine, _device_bytes, resolve_budget, skeleton, strip_experts
from ..families import get_family
from ..formats import make_format
from ..offload.store import HostStore, pin_inplace


@torch.no_grad()
def _materialize_random(model: torch.nn.Module, skip: tuple[str, ...], device, dtype, gen: torch.Generator):
    for name, p in list(model.named_parameters()):
        if p.device.type != "meta" or name.startswith(skip):
            continue
        mod_name, _, pname = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        if pname == "bias":
            t = torch.zeros(p.shape, device=device, dtype=dtype)
        elif "norm" in name and p.dim() == 1:
            t = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            t = torch.randn(p.shape, device=device, dtype=torch.float32, generator=gen).mul_(0.02).to(dtype)
        mod._parameters[pname] = torch.nn.Parameter(t, requires_grad=False)


@torch.no_grad()
def random_host_store(layout, num_layers: int, num_experts: int, device, pin: bool, seed: int,
                      progress=None) -> HostStore:
    """Experts drawn normal (std 0.02) on `device`, 16 at a time, in the expert format `layout` (a quantized
    format rounds the drawn dense weights to nearest), into host buffers."""
    gen = torch.Generator(device=device).manual_seed(seed)
    H, I = layout.hidden, layout.inter
    buffers = []
    for _ in range(num_layers):
        buf = torch.empty(num_experts, layout.numel, dtype=layout.pool_dtype)
        if pin:
            buf = pin_inplace(buf)
        for e0 in range(0, num_experts, 16):             # 16 experts at a time bounds the device scratch
            e1 = min(num_experts, e0 + 16)
            if layout.name == "dense":
                chunk = torch.randn(e1 - e0, layout.numel, device=device, dtype=torch.float32, generator=gen)
                buf[e0:e1].copy_(chunk.mul_(0.02).to(layout.dtype))
                continue
            gu = torch.randn(e1 - e0, 2 * I, H, device=device, dtype=torch.float32, generator=gen).mul_(0.02)
            dn = torch.randn(e1 - e0, H, I, device=device, dtype=torch.float32, generator=gen).mul_(0.02)
            out = torch.empty(e1 - e0, layout.numel, dtype=layout.pool_dtype, device=device)
            buf[e0:e1].copy_(layout.quantize(gu.to(layout.dtype), dn.to(layout.dtype), out))
        buffers.append(buf)
        if progress is not None:
            progress()
    return HostStore(layout, num_experts, buffers)


def random_engine(family_name: str, config, *, device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
                  expert_budget: str = "25%", policy: str = "lru", seed: int = 0, progress=None,
                  decode: str = "auto", compile: bool | None = None, expert_format: str = "dense",
                  cpu_experts: str = "off") -> Engine:
    family = get_family(family_name)
    dev = torch.device(device)
    geo = family.geometry(config)
    layout = make_format(expert_format, geo.hidden, geo.inter, dtype)
    model = skeleton(family, config)
    prefixes = tuple(family.expert_prefix(l) + "." for l in geo.moe_layers)
    gen = torch.Generator(device=dev).manual_seed(seed)
    _materialize_random(model, prefixes, dev, dtype, gen)
    strip_experts(model, family, geo, dtype, dev)
    nonexpert = _device_bytes(model)
    store = random_host_store(layout, len(geo.moe_layers), geo.num_experts, dev, pin=dev.type == "cuda",
                              seed=seed + 1, progress=progress)
    rc = RuntimeConfig(device=device, dtype=str(dtype).replace("torch.", ""), expert_budget=expert_budget,
                       policy=policy, decode=decode, compile=compile, cpu_experts=cpu_experts,
                       expert_format=None if expert_format == "dense" else expert_format)
    budget = resolve_budget(rc, layout, geo, nonexpert, config, dev)
    improc = family.random_image_processor(config)
    return Engine(model_dir=None, family=family, config=config, model=model, tokenizer=None,
                  image_processor=improc, store=store, device=dev, dtype=dtype, geometry=geo, layout=layout,
                  nonexpert_bytes=nonexpert, budget_bytes=budget, rc=rc)


def synthetic_inputs(engine: Engine, side: int, text_tokens: int = 24, seed: int = 0) -> dict:
    """One request: `text_tokens` random text ids around a side x side random image, as the processor shapes it."""
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(side, side, 3, generator=g) * 255).to(torch.uint8).numpy()
    image_inputs, (n_img,) = engine.family.image_inputs(engine.image_processor, [Image.fromarray(pixels)])
    cfg = engine.config
    block = torch.tensor(engine.family.synthetic_image_block(cfg, n_img))
    vocab = engine.family.text_config(cfg).vocab_size
    high = min(100000, vocab)
    text = torch.randint(min(1000, high // 4), high, (text_tokens,), generator=g)
    special = torch.tensor([cfg.image_token_id, getattr(cfg, "video_token_id", cfg.image_token_id), *block.unique()])
    text[torch.isin(text, special)] = min(1000, high // 4)
    h = text_tokens // 2
    ids = torch.cat([text[:h], block, text[h:]])[None]
    image_inputs["pixel_values"] = image_inputs["pixel_values"].to(engine.dtype)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **image_inputs,
              "mm_token_type_ids": (ids == cfg.image_token_id).to(torch.int32), **engine.family.extra_inputs(cfg, ids)}
    return {k: v.to(engine.device) for k, v in inputs.items()}


def synthetic_text_inputs(engine: Engine, tokens: int, seed: int = 0) -> dict:
    """One text-only request (text-only families): `tokens` random ids drawn as `synthetic_inputs` draws its text
    (ids from min(1000, V / 4) up, below 100000; the config's special ids avoided)."""
    g = torch.Generator().manual_seed(seed)
    tc = engine.family.text_config(engine.config)
    high = min(100000, tc.vocab_size)
    low = min(1000, high // 4)
    ids = torch.randint(low, high, (1, tokens), generator=g)
    eos = tc.eos_token_id if isinstance(tc.eos_token_id, list) else [tc.eos_token_id]
    special = torch.tensor([t for t in (*eos, tc.pad_token_id, tc.bos_token_id) if t is not None] or [-1])
    ids[torch.isin(ids, special)] = low
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int32),
              **engine.family.extra_inputs(engine.config, ids)}
    return {k: v.to(engine.device) for k, v in inputs.items()}
