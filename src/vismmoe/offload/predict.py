"""Lookahead expert predictors behind one protocol, and the probe that measures them.

    observe(layer, hidden, top_k_index, top_k_weights)   the router of MoE layer `layer` just ran; may queue
                                                         device work, must not synchronise
    predict(layer, depth) -> probs [E] | None            after the runtime's host sync for `layer`: probability
                                                         that each expert of the MoE layer `depth` positions
                                                         later is used by the current tokens

- `gate`: apply the routers of the next layers to this layer's MoE input (pre-gating, as AdapMoE and
  DAOP do): the residual stream changes little between adjacent layers. Where a family's routers are the top-k
  of one linear map, the routers ahead run as one matmul over their stacked weights.
- `trace`: transition tables P(expert j at layer l+d | expert i at layer l), counted offline from routing traces
  (`vismmoe calibrate`), applied to this layer's routing.
- `blend`: per layer, a mix of both weighted by how well each predicted that layer during calibration.
For many tokens (prefill) a layer-level probability is 1 - prod over tokens of (1 - p_token).
Predictors never move weights: the prefetcher (prefetch.py) decides what to copy.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .trace import RoutingTrace


def _any_token(p_tok: np.ndarray) -> np.ndarray:
    """[T, E] per-token probabilities -> [E] probability that at least one token uses the expert."""
    return 1.0 - np.exp(np.log1p(-np.clip(p_tok, 0.0, 1.0 - 1e-7)).sum(axis=0))


class _HostCopy:
    """Device tensors on their way to host memory from the moment they are made: the copy is queued right behind the
    kernels that make them, so reading them later waits for those kernels only, never for the layer's expert
    compute queued in between (the prefetcher reads predictions after that compute is queued: runtime.py)."""

    def __init__(self, *tensors: torch.Tensor):
        self.event = None
        if tensors[0].is_cuda:
            self.host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                         for t in tensors]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = list(tensors)

    def numpy(self) -> list[np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        return [t.numpy() for t in self.host]


class GatePredictor:
    name = "gate"

    def __init__(self, routers: dict[int, torch.nn.Module], moe_layers: tuple[int, ...], num_experts: int,
                 depth: int = 3, stacked: torch.Tensor | None = None, top_k: int = 0):
        self.routers = routers
        self.layers = list(moe_layers)
        self.pos = {l: i for i, l in enumerate(self.layers)}
        self.E = num_experts
        self.depth = depth
        self.stacked = stacked                  # [L * E, H] all routers' weights (family.stacked_router_weight)
        self.top_k = top_k
        self._pending: dict[int, tuple[list[int], _HostCopy]] = {}
        self._host: dict[tuple[int, int], np.ndarray] = {}

    @torch.no_grad()
    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        p = self.pos[layer]
        ahead = self.layers[p + 1: p + 1 + self.depth]
        if not ahead:
            return
        n, E = len(ahead), self.E
        if self.stacked is not None:            # one matmul and one top-k for all layers ahead (few launches)
            x = hidden.reshape(-1, self.stacked.shape[1]).to(self.stacked.dtype)
            logits = torch.nn.functional.linear(x, self.stacked[(p + 1) * E:(p + 1 + n) * E])   # [T, n*E]
            idx = logits.view(-1, n, E).topk(self.top_k, dim=-1).indices                        # [T, n, K]
            used = torch.zeros(n, E, device=x.device, dtype=torch.float32)
            used.scatter_(1, idx.permute(1, 0, 2).reshape(n, -1), 1.0)                         # [n, E]
        else:
            rows = []
            for nxt in ahead:
                _, w, idx = self.routers[nxt](hidden)                              # [T, K]
                onehot = torch.zeros(idx.shape[0], E, device=idx.device, dtype=torch.float32)
                onehot.scatter_(1, idx, 1.0)                                       # [T, E] chosen by each token
                rows.append(onehot.amax(dim=0))
            used = torch.stack(rows)                                               # [n, E] used by any token
        self._pending[layer] = (ahead, _HostCopy(used))
        self._host = {k: v for k, v in self._host.items() if k[0] != layer}

    def predict(self, layer: int, depth: int) -> np.ndarray | None:
        if layer in self._pending:
            ahead, copy = self._pending.pop(layer)
            host = copy.numpy()[0]                                                 # one copy for all depths
            for d in range(len(ahead)):
                self._host[(layer, d + 1)] = host[d]
        return self._host.get((layer, depth))


class TransitionTables:
    """P(j used at layer pos+d | i used at layer pos), per MoE layer position and depth, from routing traces."""

    def __init__(self, tables: dict[int, np.ndarray], moe_layers: tuple[int, ...], alpha: np.ndarray | None = None):
        self.tables = tables                    # depth -> [L, E, E]
        self.layers = tuple(moe_layers)
        self.alpha = alpha                      # [L] weight of the gate predictor per target layer position

    @classmethod
    def from_traces(cls, traces: list[RoutingTrace], moe_layers: tuple[int, ...], num_experts: int,
                    depth: int = 3) -> TransitionTables:
        L, E = len(moe_layers), num_experts
        co = {d: np.zeros((L, E, E)) for d in range(1, depth + 1)}
        seen = np.zeros((L, E))
        for tr in traces:
            for step in tr.steps:
                sel: list[np.ndarray | None] = []
                for layer in moe_layers:
                    idx = step["layers"].get(layer)
                    if idx is None:                     # not called in this step (ERNIE's vision banks in decode)
                        sel.append(None)
                        continue
                    oh = np.zeros((idx[0].shape[0], E))
                    np.put_along_axis(oh, idx[0].astype(np.int64), 1.0, axis=1)
                    sel.append(oh)                                                  # [T, E]
                for p in range(L):
                    if sel[p] is None:
                        continue
                    seen[p] += sel[p].sum(0)
                    for d in range(1, depth + 1):       # pairs of layers that saw the same tokens
                        if p + d < L and sel[p + d] is not None and sel[p + d].shape[0] == sel[p].shape[0]:
                            co[d][p] += sel[p].T @ sel[p + d]
        tables = {d: co[d] / np.maximum(seen[:, :, None], 1.0) for d in co}
        return cls(tables, moe_layers)

    def save(self, path: str) -> None:
        arrays = {f"d{d}": t.astype(np.float32) for d, t in self.tables.items()}
        arrays["layers"] = np.asarray(self.layers)
        if self.alpha is not None:
            arrays["alpha"] = self.alpha
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str) -> TransitionTables:
        try:
            data = np.load(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read calibration file {path} ({type(e).__name__})",
                            "make one with: vismmoe calibrate --model DIR --out FILE") from None
        fix = "give the .npz that vismmoe calibrate wrote (make one with: vismmoe calibrate --model DIR --out FILE)"
        if not isinstance(data, np.lib.npyio.NpzFile) or "layers" not in data.files:
            raise UserError(f"{path} is not a calibration file (no transition tables in it: a routing trace?)", fix)
        try:
            tables = {int(k[1:]): np.asarray(data[k], dtype=np.float32) for k in data.files if k.startswith("d")}
            alpha = np.asarray(data["alpha"], dtype=np.float32) if "alpha" in data.files else None
            layers = tuple(int(x) for x in np.asarray(data["layers"]).reshape(-1))
        except (ValueError, TypeError, OSError) as e:
            raise UserError(f"calibration file {path} is damaged ({type(e).__name__})", fix) from None
        if not tables:
            raise UserError(f"{path} holds no transition tables", fix)
        return cls(tables, layers, alpha)


class TracePredictor:
    name = "trace"

    def __init__(self, tables: TransitionTables, moe_layers: tuple[int, ...], depth: int = 3):
        if tuple(tables.layers) != tuple(moe_layers):
            raise UserError("the calibration file was made for another model (its MoE layers differ)",
                            "run vismmoe calibrate for this model")
        self.t = tables
        self.pos = {l: i for i, l in enumerate(moe_layers)}
        self.L = len(moe_layers)
        self.depth = min(depth, max(tables.tables))
        self._obs: dict[int, _HostCopy] = {}
        self._host: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        self._obs[layer] = _HostCopy(top_k_index, top_k_weights.float())
        self._host.pop(layer, None)

    def predict(self, layer: int, depth: int) -> np.ndarray | None:
        p = self.pos[layer]
        if depth > self.depth or p + depth >= self.L:
            return None
        if layer not in self._host:
            idx, w = self._obs.pop(layer).numpy()
            self._host[layer] = (idx.astype(np.int64), w)
        idx, w = self._host[layer]                                                 # [T, K]
        w = w / np.maximum(w.sum(-1, keepdims=True), 1e-9)
        rows = self.t.tables[depth][p][idx]                                         # [T, K, E]
        p_tok = np.clip((w[..., None] * rows).sum(1), 0.0, 1.0)                     # [T, E]
        return _any_token(p_tok)


class BlendPredictor:
    """Per depth and target layer: alpha * gate + (1 - alpha) * trace, alpha from calibration (0.5 without)."""

    name = "blend"

    def __init__(self, gate: GatePredictor, trace: TracePredictor):
        self.gate, self.trace = gate, trace
        alpha = trace.t.alpha
        if alpha is None:
            alpha = np.full((gate.depth, len(gate.layers)), 0.5)
        self._alpha = alpha if alpha.ndim == 2 else np.tile(alpha, (gate.depth, 1))     # [D, L]

    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        self.gate.observe(layer, hidden, top_k_index, top_k_weights)
        self.trace.observe(layer, hidden, top_k_index, top_k_weights)

    def predict(self, layer: int, depth: int) -> np.ndarray | None:
        g, t = self.gate.predict(layer, depth), self.trace.predict(layer, depth)
        if g is None or t is None:
            return g if t is None else t
        a = float(self._alpha[min(depth, len(self._alpha)) - 1, self.gate.pos[layer] + depth])
        return a * g + (1.0 - a) * t


PREDICTORS = ("none", "gate", "trace", "blend")


def gate_predictor(engine, depth: int = 3) -> GatePredictor:
    """The gate predictor over `engine`'s routers (fused where the family allows)."""
    geo, fam = engine.geometry, engine.family
    routers = {l: fam.router(engine.model, l) for l in geo.moe_layers}
    return GatePredictor(routers, geo.moe_layers, geo.num_experts, depth,
                         stacked=fam.stacked_router_weight(engine.model), top_k=geo.top_k)


def make_predictor(name: str, engine, depth: int = 3, calibration: str | None = None):
    """A predictor for `engine`'s model, or None for `none`."""
    if name == "none":
        return None
    if name not in PREDICTORS:
        raise UserError(f"unknown predictor {name!r}", f"use one of {', '.join(PREDICTORS)}")
    geo = engine.geometry
    if name in ("trace", "blend") and calibration is None:
        raise UserError(f"--prefetch {name} needs transition tables",
                        "make them with: vismmoe calibrate --model DIR --out FILE, then pass --calibration FILE")
    gate = gate_predictor(engine, depth) if name in ("gate", "blend") else None
    if name == "gate":
        return gate
    trace = TracePredictor(TransitionTables.load(calibration), geo.moe_layers, depth)
    return trace if name == "trace" else BlendPredictor(gate, trace)


class PredictorProbe:
    """Observer measuring a predictor against what routing actually did, per depth and step kind.

    Predicted set for a target layer: experts with probability >= 0.5, plus the top-k most probable (so a
    single decode token always gets k guesses). precision = |P & A| / |P|, recall = |P & A| / |A|.
    """

    def __init__(self, predictor, moe_layers: tuple[int, ...], top_k: int, depth: int = 3):
        self.pred = predictor
        self.layers = list(moe_layers)
        self.pos = {l: i for i, l in enumerate(self.layers)}
        self.k = top_k
        self.depth = depth
        self.kind = "prefill"
        self._waiting: dict[int, list[tuple[int, set[int]]]] = {}   # target layer -> [(depth, predicted set)]
        self.totals: dict[tuple[str, int], list[int]] = {}            # (kind, depth) -> [hit, predicted, actual]
        self.per_layer: dict[tuple[int, int], list[int]] = {}         # (depth, target position) -> [hit, actual]

    def begin_step(self, kind: str, *_):
        self.kind = kind if kind in ("prefill", "decode") else self.kind
        self._waiting.clear()

    def observe(self, layer, hidden, top_k_index, top_k_weights) -> None:
        actual = set(np.unique(top_k_index.cpu().numpy()).tolist())
        for d, pred in self._waiting.pop(layer, []):
            t = self.totals.setdefault((self.kind, d), [0, 0, 0])
            t[0] += len(pred & actual)
            t[1] += len(pred)
            t[2] += len(actual)
            pl = self.per_layer.setdefault((d, self.pos[layer]), [0, 0])
            pl[0] += len(pred & actual)
            pl[1] += len(actual)
        self.pred.observe(layer, hidden, top_k_index, top_k_weights)
        p = self.pos[layer]
        for d in range(1, self.depth + 1):
            if p + d >= len(self.layers):
                break
            probs = self.pred.predict(layer, d)
            if probs is None:
                continue
            top = set(np.argsort(-probs)[: self.k].tolist())
            self._waiting.setdefault(self.layers[p + d], []).append((d, top | set(np.nonzero(probs >= 0.5)[0].tolist())))

    def table(self) -> list[dict]:
        rows = []
        for (kind, d), (hit, npred, nact) in sorted(self.totals.items()):
            rows.append({"kind": kind, "depth": d, "precision": hit / max(npred, 1), "recall": hit / max(nact, 1),
                         "predicted": npred, "actual": nact})
        return rows
