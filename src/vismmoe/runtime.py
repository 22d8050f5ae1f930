"""Runs a model's routed experts out of the byte-budgeted device cache. Orchestrates one MoE layer:

    router (transformers) -> top_k_index [T, K], top_k_weights [T, K]
        |  observers.observe(layer, hidden, index, weights)      trace, predictors
        v
    needed experts (one host sync) -> schedule.plan_waves(needed, resident, slots)
        |  for each wave:
        |     hits: cache.touch          misses: cache.claim (policy picks the victim) -> transfer.copy_in
        |     compute stream waits for the wave's last copy
        |     grouped matmul over the slot pool (grouped.experts_on_slots)
        v
    sum over each token's K pair rows -> hidden [T, H]
    policy.retain == False: the layer's experts leave the cache (load-on-demand baseline)

The function registered with transformers' `ExpertsInterface` finds this runtime through attributes the engine
puts on each experts module (`_vismmoe_runtime`, `_vismmoe_layer`): transformers' experts modules have no
layer index of their own.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .cache import ExpertCache
from .grouped import experts_on_slots
from .schedule import plan_waves
from .transfer import TransferEngine

IMPLEMENTATION = "vismmoe"


def _vismmoe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    return self._vismmoe_runtime.forward(self, hidden_states, top_k_index, top_k_weights)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _vismmoe_experts_forward)


class OffloadRuntime:
    def __init__(self, cache: ExpertCache, transfer: TransferEngine, moe_layers: tuple[int, ...], num_experts: int):
        self.cache = cache
        self.transfer = transfer
        self.layer_pos = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        self.observers: list = []
        self.cuda = cache.device.type == "cuda"
        # pinned expert->slot tables, one per wave in flight (a layer has at most E waves)
        self._luts = torch.empty(num_experts + 2, num_experts, dtype=torch.long, pin_memory=self.cuda)
        self._lut_i = 0

    def attach(self, experts_module: torch.nn.Module, layer: int) -> None:
        experts_module._vismmoe_runtime = self
        experts_module._vismmoe_layer = layer

    def _lut(self) -> torch.Tensor:
        self._lut_i = (self._lut_i + 1) % self._luts.shape[0]
        lut = self._luts[self._lut_i]
        lut.fill_(self.cache.num_slots)
        return lut

    def forward(self, module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # T tokens, K experts per token, H hidden
        layer = module._vismmoe_layer
        for obs in self.observers:
            obs.observe(layer, hidden, top_k_index, top_k_weights)
        cache, pos = self.cache, self.layer_pos[layer]
        needed = torch.unique(top_k_index).tolist()            # the one host sync per layer
        resident = {e for e in needed if cache.resident((layer, e))}
        waves = plan_waves(needed, resident, cache.num_slots)
        pairs = None
        for wave in waves:
            pinned = {(layer, e) for e in wave}
            lut = self._lut()                                    # [E] expert -> slot, S = not this wave
            last_copy = None
            for e in wave:
                key = (layer, e)
                if cache.resident(key):
                    slot = cache.touch(key)
                else:
                    slot = cache.claim(key, pinned)
                    done = self.transfer.copy_in(layer, pos, e, cache.pool[slot], after=cache.last_use[slot])
                    last_copy = done if done is not None else last_copy
                lut[e] = slot
            self.transfer.wait(layer, last_copy)
            slot_idx = lut.to(hidden.device, non_blocking=True)[top_k_index]       # [T, K]
            pairs = experts_on_slots(module, hidden, slot_idx, top_k_weights, cache.gate_up, cache.down,
                                     pairs, whole=len(waves) == 1)
            if self.cuda:
                used = torch.cuda.Event()
                used.record()
                for e in wave:
                    cache.last_use[cache.slot_of[(layer, e)]] = used
        if not cache.policy.retain:
            for e in needed:
                if cache.resident((layer, e)):
                    cache.evict((layer, e))
        T, K = top_k_index.shape
        return pairs.view(T, K, -1).sum(dim=1).to(hidden.dtype)   # [T, H]
