"""Routing traces: which experts each token chose, per MoE layer and forward step, with token modality.

A `RoutingTrace` is an observer of the runtime (it sees the router's top-k output of every MoE layer). The engine
tells it where a step starts (`begin_step`: prefill or decode, and which tokens are visual). Saved as one `.npz`
file: per step and layer, `idx [T, K] int16` and `w [T, K] float16`, plus `modality [T] int8` per step
(0 text, 1 image). Affinity metrics over traces live here too as the project grows; this module never moves
weights and never changes routing.
"""

from __future__ import annotations

import json

import numpy as np
import torch


class RoutingTrace:
    def __init__(self):
        self.steps: list[dict] = []     # {"kind": str, "modality": np.ndarray, "layers": {layer: (idx, w)}}

    def begin_step(self, kind: str, modality: torch.Tensor | None, num_tokens: int | None = None) -> None:
        if modality is None:
            modality = torch.zeros(num_tokens or 0, dtype=torch.int8)
        self.steps.append({"kind": kind, "modality": modality.reshape(-1).to(torch.int8).cpu().numpy(),
                           "layers": {}})

    def observe(self, layer: int, hidden, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        if not self.steps or layer in self.steps[-1]["layers"]:   # nobody marked the step: a layer repeats
            self.begin_step("unknown", None, top_k_index.shape[0])
        self.steps[-1]["layers"][layer] = (top_k_index.to(torch.int16).cpu().numpy(),
                                           top_k_weights.float().to(torch.float16).cpu().numpy())

    def save(self, path: str) -> None:
        arrays, meta = {}, []
        for s, step in enumerate(self.steps):
            arrays[f"s{s}_modality"] = step["modality"]
            for layer, (idx, w) in step["layers"].items():
                arrays[f"s{s}_l{layer}_idx"] = idx
                arrays[f"s{s}_l{layer}_w"] = w
            meta.append({"kind": step["kind"], "layers": sorted(step["layers"])})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str) -> RoutingTrace:
        data = np.load(path)
        meta = json.loads(bytes(data["meta"]).decode())
        t = cls()
        for s, m in enumerate(meta):
            t.steps.append({"kind": m["kind"], "modality": data[f"s{s}_modality"],
                            "layers": {l: (data[f"s{s}_l{l}_idx"], data[f"s{s}_l{l}_w"]) for l in m["layers"]}})
        return t
