"""Routing traces: which experts each token chose, per MoE layer and forward step, with token modality.

A `RoutingTrace` is an observer of the runtime (it sees the router's top-k output of every MoE layer). The engine
tells it where a step starts (`begin_step`: prefill or decode, and which tokens are visual). Saved as one `.npz`
file: per step and layer, `idx [T, K] int16` and `w [T, K] float16`, plus `modality [T] int8` per step
(0 text, 1 image, -1 a padding row of a batch). Affinity metrics over traces live here too as the project grows; this module never moves
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


# ---- routing metrics over one request's trace: working set, concentration, stability (visual-expert affinity) --
# Each metric is per MoE layer, then averaged over layers. `modality`: None (all tokens), 0 (text) or 1 (visual).

def _rows(trace: RoutingTrace, layer: int, modality: int | None, kinds=("prefill", "decode")):
    for step in trace.steps:
        if step["kind"] not in kinds or layer not in step["layers"]:
            continue
        idx = step["layers"][layer][0]
        mod = step["modality"]
        if len(mod) == len(idx):
            idx = idx[mod >= 0] if modality is None else idx[mod == modality]      # -1: a padding row
        elif modality is not None:
            continue
        yield idx


def layer_counts(trace: RoutingTrace, num_experts: int, modality: int | None = None,
                 kinds=("prefill", "decode")) -> dict[int, np.ndarray]:
    """{layer: [E] how many (token, top-k) assignments went to each expert}; an expert a token names twice (the
    pairs --visual-top-k dropped name its heaviest expert again) counts once."""
    layers = sorted({l for s in trace.steps for l in s["layers"]})
    out = {}
    for l in layers:
        c = np.zeros(num_experts)
        for idx in _rows(trace, l, modality, kinds):
            idx = np.sort(idx.astype(np.int64), axis=1)
            first = np.ones(idx.shape, dtype=bool)
            first[:, 1:] = idx[:, 1:] != idx[:, :-1]                              # each token's distinct experts
            c += np.bincount(idx[first], minlength=num_experts)
        out[l] = c
    return out


def routing_metrics(trace: RoutingTrace, num_experts: int, modality: int | None = None) -> dict:
    """working_set (distinct experts per layer), entropy (bits of the expert-use distribution), top10_share
    (share of assignments served by the 10% most used experts), stability (how well the best transition table
    of this request predicts each token's next-layer experts from its current ones), step_jaccard (Jaccard of
    the expert sets of consecutive decode steps at a layer)."""
    counts = layer_counts(trace, num_experts, modality)
    if not counts:
        return {"working_set": 0.0, "entropy": 0.0, "top10_share": 0.0, "stability": None, "step_jaccard": None}
    ws, ent, top = [], [], []
    n_top = max(1, int(round(0.1 * num_experts)))
    for c in counts.values():
        total = c.sum()
        if total == 0:
            continue
        ws.append(float((c > 0).sum()))
        p = c[c > 0] / total
        ent.append(float(-(p * np.log2(p)).sum()))
        top.append(float(np.sort(c)[::-1][:n_top].sum() / total))
    return {"working_set": float(np.mean(ws)) if ws else 0.0, "entropy": float(np.mean(ent)) if ent else 0.0,
            "top10_share": float(np.mean(top)) if top else 0.0,
            "stability": _stability(trace, sorted(counts), num_experts, modality),
            "step_jaccard": _step_jaccard(trace, sorted(counts), modality)}


def stability(trace: RoutingTrace, num_experts: int, modality: int | None = None) -> float | None:
    """How well the best transition table of this trace predicts each token's next-layer experts from its current
    ones (`routing_metrics`' stability alone; None without consecutive layers)."""
    return _stability(trace, sorted({l for s in trace.steps for l in s["layers"]}), num_experts, modality)


def _stability(trace, layers, E, modality) -> float | None:
    hits = total = 0
    for a, b in zip(layers, layers[1:]):
        pairs = [(x, y) for x, y in zip(_rows(trace, a, modality), _rows(trace, b, modality))
                 if len(x) == len(y) and len(x)]
        if not pairs:
            continue
        X = np.concatenate([x for x, _ in pairs]).astype(np.int64)                 # [T, k] layer a
        Y = np.concatenate([y for _, y in pairs]).astype(np.int64)                 # [T, k] layer b
        k = Y.shape[1]
        oa, ob = np.zeros((len(X), E)), np.zeros((len(Y), E))
        np.put_along_axis(oa, X, 1.0, axis=1)
        np.put_along_axis(ob, Y, 1.0, axis=1)
        table = oa.T @ ob                                                         # [E, E] co-occurrence
        pred = np.argsort(-(oa @ table), axis=1)[:, :k]                           # best guess per token
        # as many guesses as the token has distinct experts (fewer than k where --visual-top-k trimmed it)
        n = ob.sum(axis=1, keepdims=True)                                         # [T, 1]
        hits += int((np.take_along_axis(ob, pred, axis=1) * (np.arange(k) < n)).sum())
        total += int(n.sum())
    return hits / total if total else None


def _step_jaccard(trace, layers, modality) -> float | None:
    vals = []
    for l in layers:
        sets = [set(np.unique(idx).tolist()) for idx in _rows(trace, l, modality, kinds=("decode",))]
        vals += [len(a & b) / len(a | b) for a, b in zip(sets, sets[1:]) if a | b]
    return float(np.mean(vals)) if vals else None
