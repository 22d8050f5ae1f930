"""Transformers-side systems that share a vismmoe engine's non-expert weights (same tensors, no copy).

`accelerate_model`: transformers + accelerate `dispatch_model` with each layer's fused experts offloaded to the CPU.

This is what a user gets from `from_pretrained(..., device_map=...)` with experts mapped to "cpu": accelerate's
hooks copy the whole fused bank of a layer (all E experts) from pageable host memory to the device before the
layer runs and drop it afterwards, every forward. Non-expert weights are shared with a vismmoe engine (same
tensors, no copy). Each layer gets a pageable copy of its own bank, unless the banks are too large to hold
twice in host RAM (`SHARE_ABOVE`, e.g. the 30B shape): then every layer's bank is a distinct parameter over
ONE host tensor pair (accelerate sees them as untied and copies each layer's bank separately, so the bytes moved
per layer are exactly those of an untied model, but the answers are not the model's: `model.vismmoe_exact`
says which, and the harness reports no accuracy for a shared-bank model).

`resident_model`: plain transformers with every expert on the device and its own `grouped_mm` experts kernel; the
expert banks are views into a fully preloaded vismmoe pool (slot = layer position x E + expert), so it costs no
memory. Its time is the compute-only reference for the physical bound.
"""

from __future__ import annotations

import copy

import torch
from accelerate import dispatch_model

from ..engine.core import Engine
from ..engine.loading import skeleton


def _shared_skeleton(engine: Engine) -> torch.nn.Module:
    """A second model object whose non-expert parameters ARE the engine's (expert banks left on meta)."""
    family, geo = engine.family, engine.geometry
    config = copy.deepcopy(engine.config)                     # never share the config: it holds the experts impl
    model = skeleton(family, config)
    prefixes = tuple(family.expert_prefix(l) + "." for l in geo.moe_layers)
    donor = dict(engine.model.named_parameters())
    for name, _ in list(model.named_parameters()):
        if name.startswith(prefixes):
            continue
        mod_name, _, pname = name.rpartition(".")
        model.get_submodule(mod_name)._parameters[pname] = donor[name]
    return model


def resident_model(engine: Engine, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    family, geo, cache = engine.family, engine.geometry, engine.cache
    E = geo.num_experts
    model = _shared_skeleton(engine)
    for pos, layer in enumerate(geo.moe_layers):
        assert all(cache.slot_of.get((layer, e)) == pos * E + e for e in range(E)), "pool not preloaded in order"
        ex = family.moe_block(model, layer).experts
        ex.gate_up_proj = torch.nn.Parameter(cache.gate_up[pos * E:(pos + 1) * E], requires_grad=False)
        ex.down_proj = torch.nn.Parameter(cache.down[pos * E:(pos + 1) * E], requires_grad=False)
    model.to(engine.device)                                    # buffers (rotary tables)
    model.set_experts_implementation(experts_implementation)
    return model.eval()


SHARE_ABOVE = 8 * 1024**3       # bytes of expert banks above which layers share one host bank pair


def expert_banks(engine: Engine, share: bool | None = None) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], bool]:
    """Per MoE layer a pageable, contiguous (gate_up [E, 2I, H], down [E, H, I]) pair, and whether they are the
    model's own (False: one pair repeated for every layer, see the module docstring)."""
    share = engine.store.nbytes() > SHARE_ABOVE if share is None else share
    banks = []
    for pos in range(len(engine.geometry.moe_layers)):
        if share and banks:
            banks.append(banks[0])
            continue
        gu_view, dn_view = engine.layout.views(engine.store.buffers[pos])
        banks.append((gu_view.contiguous().clone(), dn_view.contiguous().clone()))
    return banks, not share


def accelerate_model(engine: Engine, experts_implementation: str = "grouped_mm") -> torch.nn.Module:
    family, geo = engine.family, engine.geometry
    model = _shared_skeleton(engine)
    banks, exact = expert_banks(engine)
    expert_names = {family.expert_prefix(l) for l in geo.moe_layers}
    for layer, (gate_up, down) in zip(geo.moe_layers, banks):
        ex = family.moe_block(model, layer).experts
        ex.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        ex.down_proj = torch.nn.Parameter(down, requires_grad=False)
    device_map = _device_map(model, expert_names, engine.device.index or 0)
    model = dispatch_model(model, device_map=device_map, main_device=engine.device.index or 0)
    model.set_experts_implementation(experts_implementation)
    model.vismmoe_exact = exact
    return model.eval()


def _device_map(model: torch.nn.Module, expert_names: set[str], gpu: int) -> dict:
    """Coarsest map that sends every expert bank to "cpu" and everything else to the GPU."""
    out = {}

    def walk(prefix: str, module: torch.nn.Module):
        if prefix in expert_names:
            out[prefix] = "cpu"
            return
        if not any(n == prefix or n.startswith(prefix + ".") for n in expert_names) and prefix:
            out[prefix] = gpu
            return
        assert not list(module.parameters(recurse=False)), f"{prefix} owns weights beside experts"
        for name, child in module.named_children():
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out
