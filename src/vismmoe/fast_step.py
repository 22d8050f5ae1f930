"""The decode step at the device's speed, routed experts still offloaded: static KV cache, compiled decoder layers,
one CUDA graph per step, experts read through a device-side address table.

    prefill (runtime.py, eager: waves, hits first, prefetch)  ->  DynamicCache
        |  start(): KV copied into a static bucket [B, kv_heads, L, head_dim] per layer (L: a multiple of BUCKET)
        v
    for each new token:
        host:   landed copies -> slot map [moe layers, E]  ->  address table (slot in the pool, or the expert's
                page-locked host blob) pushed to the device
        device: ONE graph replay: embed -> rotary -> layers (transformers' own modules; attention reads the static
                KV through `StaticKV`, experts through moe_kernel.decode_experts: misses read over the link by the
                kernel) -> norm -> lm_head -> argmax; routing and the token copied to pinned host memory
        host:   wait for the step (one sync per token), then the cache bookkeeping of its routing: hits touch the
                policy, misses claim a slot (the policy's victim) and copy in on the copy stream, overlapping the
                next replay; a slot is used by the graph only once its copy has landed

Mechanism only: which expert leaves is the policy's call, the copies are the transfer engine's, the cache's slots
and counters are the cache's. The prefill stays on the eager runtime: a cold prefill is bound by the link, not by
launches. Graphs and torch.compile are CUDA-only; the CPU runs the same step eagerly (same bookkeeping, experts
through `decode_experts_reference`), which is what CI tests.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AttentionInterface

from . import moe_kernel

BUCKET = 256                # static KV length is rounded up to a multiple of this: one graph serves many requests
ATTN = "vismmoe_decode"     # the attention implementation the decode step runs under


def _decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of a few new tokens over the static KV (GQA without repeating K/V): query [B, h, T, d],
    key/value [B, kv, L, d], attention_mask [B, 1, T, L] bool (True: attend) -> ([B, T, h, d], None)."""
    B, h, T, d = query.shape
    kv = key.shape[1]
    q = query.reshape(B, kv, (h // kv) * T, d)                                  # groups of heads share K/V
    scores = torch.matmul(q, key.transpose(-1, -2)).float() * scaling         # [B, kv, g*T, L]
    scores = scores.view(B, kv, h // kv, T, -1)
    scores = scores.masked_fill(~attention_mask[:, :, None], float("-inf"))    # mask [B, 1, 1, T, L]
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(B, kv, (h // kv) * T, -1)
    out = torch.matmul(probs, value).view(B, h, T, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN, _decode_attention)


class StaticKV:
    """One decoder layer's KV cache during decode: fixed buffers `k`, `v [B, kv_heads, L, head_dim]`; the new
    token's key and value are written at `pos` ([1] long, shared by every layer). Duck-types the one method
    transformers' attention calls on a cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        self.k, self.v, self.pos = k, v, pos

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.k.index_copy_(2, self.pos, key_states)
        self.v.index_copy_(2, self.pos, value_states)
        return self.k, self.v


class LayerExperts:
    """What one MoE layer's experts read during a fast step (set on the experts module as `_vismmoe_fast`).

    Every per-layer value is a tensor (views of the step's tables), never an int: torch.compile specialises on
    ints, and tensors let one compiled layer serve every layer."""

    def __init__(self, step: FastStep, pos: int):
        self.inter = step.layout.inter
        self.pool = step.cache.pool                                 # [S, numel]
        self.slots = step.slot_t[pos]                               # [E] int32, -1: not resident (CPU path)
        self.bank = step.store.layer_blobs(pos)                     # [E, numel] host blobs (CPU path)
        self.addr = step.addr_dev[pos] if step.cuda else None       # [E] int64 (CUDA path)
        self.route_idx = self.route_w = None                        # [B*K] views of the bucket's routing record

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if hidden.is_cuda:
            return moe_kernel.decode_experts(hidden, top_k_index, top_k_weights, self.addr, self.route_idx,
                                             self.route_w, self.inter)
        flat = top_k_index.reshape(-1)
        self.route_idx.copy_(flat)
        self.route_w.copy_(top_k_weights.reshape(-1).float())
        slots = self.slots[flat].long()                                              # [P]; -1: not resident
        blobs = torch.where((slots >= 0)[:, None], self.pool[slots.clamp(min=0)], self.bank[flat])
        return moe_kernel.decode_experts_reference(hidden, top_k_index, top_k_weights, blobs, self.inter)


def _layer_call(layer, hidden, mask, text_pos, kv, cos, sin):
    return layer(hidden, attention_mask=mask, position_ids=text_pos, past_key_values=kv,
                 position_embeddings=(cos, sin))


_COMPILED = None


def compiled_layer_call():
    """`_layer_call` under torch.compile (inductor), one wrapper per process: every layer, engine and bucket of
    the same shapes reuses its compiled code."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_layer_call, dynamic=False)
    return _COMPILED


@dataclass
class Bucket:
    """Static buffers of one (batch, KV length) shape, and its captured graph."""

    B: int
    L: int
    kv: list[StaticKV]
    pos: torch.Tensor           # [1] long: column the next token is written to
    ids: torch.Tensor           # [B, 1] long: the next token (the graph writes its argmax here)
    mask: torch.Tensor          # [B, L] bool: attended columns
    deltas: torch.Tensor        # [B, 1] long: rope position minus text position
    route_idx: torch.Tensor     # [moe layers, B*K] long: routing of the last step (device)
    route_w: torch.Tensor       # [moe layers, B*K] float32
    out_host: dict = field(default_factory=dict)    # pinned host copies: ids, route_idx, route_w
    graph: object = None


class FastStep:
    """Decode steps of one engine (see the module docstring). `graphs`/`compiled`: CUDA only."""

    def __init__(self, engine, *, graphs: bool, compiled: bool, progress=None):
        self.eng = engine
        self.model, self.family = engine.model, engine.family
        self.cache, self.runtime = engine.cache, engine.runtime
        self.store, self.layout = engine.store, engine.layout
        self.device = engine.device
        self.cuda = self.device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.compiled = compiled
        self.progress = progress
        geo = engine.geometry
        self.moe_layers = geo.moe_layers
        self.layer_pos = {l: i for i, l in enumerate(geo.moe_layers)}
        self.E, self.K = geo.num_experts, geo.top_k
        L = len(geo.moe_layers)
        self.slot_map = np.full((L, self.E), -1, dtype=np.int32)       # slot the graph may read, else -1
        self.slot_t = torch.from_numpy(self.slot_map)                   # the CPU step reads it directly
        self.pending: dict[int, tuple[int, int]] = {}                   # slot -> key: copy not landed yet
        if self.cuda:
            self.host_addr = self.store.device_addresses()              # [L, E] int64
            self.addr_host = torch.empty((L, self.E), dtype=torch.int64).pin_memory()
            self.addr_dev = torch.empty((L, self.E), dtype=torch.int64, device=self.device)
        for slot, key in enumerate(self.cache.owner):
            if key is not None:
                self.on_insert(key, slot)
        self.cache.listeners.append(self)
        self.experts = [LayerExperts(self, p) for p in range(L)]
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.bucket: Bucket | None = None
        self._layer = compiled_layer_call() if compiled else _layer_call
        self.capture_s = 0.0                    # seconds spent compiling and capturing (first step of a bucket)
        self.step_s: list[float] = []           # device seconds of each step (CUDA events)
        self._clean_s = None                    # fastest recent step without misses: the stall baseline

    # ---- residency (cache listener) --------------------------------------------------------------------------
    def on_insert(self, key, slot: int) -> None:
        self.pending[slot] = key

    def on_evict(self, key, slot: int) -> None:
        self.pending.pop(slot, None)
        self.slot_map[self.layer_pos[key[0]], key[1]] = -1

    def _land(self) -> None:
        """Slots whose copy has arrived become readable by the next step."""
        for slot, key in list(self.pending.items()):
            t = self.cache.ticket[slot]
            if t is None or t.done():
                self.slot_map[self.layer_pos[key[0]], key[1]] = slot
                del self.pending[slot]

    def _push(self) -> None:
        if not self.cuda:
            return
        nb = self.layout.nbytes
        pool = self.cache.pool.data_ptr()
        sm = self.slot_map.astype(np.int64)
        self.addr_host.numpy()[...] = np.where(sm >= 0, pool + sm * nb, self.host_addr)
        self.addr_dev.copy_(self.addr_host, non_blocking=True)

    def detach(self) -> None:
        if self in self.cache.listeners:
            self.cache.listeners.remove(self)

    # ---- buckets ---------------------------------------------------------------------------------------------
    def _bucket(self, B: int, need: int) -> Bucket:
        L = -(-need // BUCKET) * BUCKET
        key = (B, L)
        b = self.buckets.get(key)
        if b is not None:
            return b
        tc = self.family.text_config(self.model.config)
        layers = self.family.decoder_layers(self.model)
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        dt, dev = self.eng.dtype, self.device
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        kv = [StaticKV(torch.zeros(B, tc.num_key_value_heads, L, head_dim, dtype=dt, device=dev),
                       torch.zeros(B, tc.num_key_value_heads, L, head_dim, dtype=dt, device=dev), pos)
              for _ in layers]
        nL = len(self.moe_layers)
        b = Bucket(B=B, L=L, kv=kv, pos=pos, ids=torch.zeros(B, 1, dtype=torch.long, device=dev),
                   mask=torch.zeros(B, L, dtype=torch.bool, device=dev),
                   deltas=torch.zeros(B, 1, dtype=torch.long, device=dev),
                   route_idx=torch.zeros(nL, B * self.K, dtype=torch.long, device=dev),
                   route_w=torch.zeros(nL, B * self.K, dtype=torch.float32, device=dev))
        pin = self.cuda
        for name, t in (("ids", b.ids), ("route_idx", b.route_idx), ("route_w", b.route_w)):
            h = torch.empty(t.shape, dtype=t.dtype)
            b.out_host[name] = h.pin_memory() if pin else h
        self.buckets[key] = b
        return b

    def start(self, dyn_cache, mask: torch.Tensor, deltas: torch.Tensor, first: torch.Tensor, max_new: int) -> Bucket:
        """Take over a prefilled request: KV from `dyn_cache`, attention `mask [B, T]`, rope `deltas [B, 1]`,
        the first generated token `first [B]`; room for `max_new` more tokens."""
        B, T = mask.shape
        b = self._bucket(B, T + max_new)
        for i, layer_kv in enumerate(b.kv):
            src = dyn_cache.layers[i]
            layer_kv.k[:, :, :T].copy_(src.keys)
            layer_kv.v[:, :, :T].copy_(src.values)
        b.mask.zero_()
        b.mask[:, :T].copy_(mask.bool())
        b.deltas.copy_(deltas.to(b.deltas.dtype))
        b.pos.fill_(T)
        b.ids.copy_(first.view(B, 1))
        for p, ex in enumerate(self.experts):
            ex.route_idx, ex.route_w = b.route_idx[p], b.route_w[p]
        self.bucket = b
        return b

    # ---- the step --------------------------------------------------------------------------------------------
    def _body(self, b: Bucket) -> None:
        model, fam = self.model, self.family
        lm = fam.language_model(model)
        b.mask.index_fill_(1, b.pos, True)
        positions = fam.decode_positions(b.mask, b.deltas)           # [4, B, 1]: text row, 3 rope rows
        h = lm.embed_tokens(b.ids)                                   # [B, 1, H]
        cos, sin = lm.rotary_emb(h, positions[1:])
        m4 = b.mask[:, None, None, :]                                # [B, 1, 1, L]
        for i, layer in enumerate(lm.layers):
            h = self._layer(layer, h, m4, positions[0], b.kv[i], cos, sin)
        h = lm.norm(h[:, -1:])
        b.ids.copy_(model.lm_head(h)[:, -1].argmax(-1, keepdim=True))
        b.pos.add_(1)
        for name in ("ids", "route_idx", "route_w"):
            b.out_host[name].copy_(getattr(b, name), non_blocking=True)

    def _run(self, b: Bucket) -> None:
        if not self.graphs:
            self._body(b)
            return
        if b.graph is None:
            self._capture(b)
        b.graph.replay()

    def _capture(self, b: Bucket) -> None:
        t0 = time.perf_counter()
        saved = (b.pos.clone(), b.mask.clone(), b.ids.clone())
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for i in range(2):                  # compiles (first call) and warms kernels/allocations
                if self.progress:
                    self.progress(f"decode step: {'compiling' if i == 0 and self.compiled else 'warming up'} "
                                  f"(batch {b.B}, KV {b.L})")
                self._body(b)
                b.pos.copy_(saved[0]); b.mask.copy_(saved[1]); b.ids.copy_(saved[2])
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body(b)
        b.pos.copy_(saved[0]); b.mask.copy_(saved[1]); b.ids.copy_(saved[2])
        torch.cuda.synchronize(self.device)
        b.graph = g
        self.capture_s += time.perf_counter() - t0
        if self.progress:
            self.progress(f"decode step captured in {time.perf_counter() - t0:.1f} s")

    def decode(self, b: Bucket, n: int, eos_ids: set[int], feed: list[int] | None = None, steppers=(),
               done: list[bool] | None = None) -> list[list[int]]:
        """Up to `n` decode steps for every row of `b`: the argmax tokens per step ([steps][B] host ints); stops
        once every row has produced an EOS. `feed` teacher-forces each step's input token (benchmarks on random
        weights). Pipelined: a step's misses are claimed before the next step is launched (so their copies start
        at once), its hits, routing observers and statistics are booked while the next step runs."""
        done = list(done or [False] * b.B)
        out, rec = [], None
        for i in range(n):
            if eos_ids and all(done):
                break
            fl = self._launch(b, feed[i] if feed is not None else None)
            if rec is not None:
                self._settle(rec, steppers)
            rec = self._finish(b, fl)
            out.append(rec.ids)
            done = [d or t in eos_ids for d, t in zip(done, rec.ids)]
        if rec is not None:
            self._settle(rec, steppers)
        return out

    def step(self, b: Bucket, feed: int | None = None) -> list[int]:
        """One decode step, booked completely: the argmax token per row."""
        return self.decode(b, 1, set(), [feed] if feed is not None else None)[0]

    def _launch(self, b: Bucket, feed: int | None) -> _InFlight:
        self._land()
        self._push()
        if feed is not None:
            b.ids.fill_(int(feed))
        fl = _InFlight(used=self.slot_map.copy(), t0=time.perf_counter())   # what this step reads
        with _attention(self):
            if self.cuda:
                fl.ev0, fl.ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                fl.ev0.record()
                self._run(b)
                fl.ev1.record()
            else:
                self._run(b)
        return fl

    # ---- bookkeeping after a step ----------------------------------------------------------------------------
    def _finish(self, b: Bucket, fl: _InFlight) -> _InFlight:
        """Wait for the step; its routing to the host; its misses counted, charged to the link and claimed (the
        policy's victims leave the slot map at once, so the next step never reads a slot being refilled)."""
        if self.cuda:
            fl.ev1.synchronize()
            fl.dev_s = fl.ev0.elapsed_time(fl.ev1) / 1e3
        else:
            fl.dev_s = time.perf_counter() - fl.t0
        nL = len(self.moe_layers)
        fl.idx = b.out_host["route_idx"].numpy().reshape(nL, b.B, self.K).copy()
        fl.w = b.out_host["route_w"].numpy().reshape(nL, b.B, self.K).copy()
        fl.ids = b.out_host["ids"].view(-1).tolist()
        cache, rt = self.cache, self.runtime
        nb = self.layout.nbytes
        clock = rt.transfer.clock
        ready = 0.0
        srt = np.sort(fl.idx.reshape(nL, -1), axis=1)                    # [nL, B*K]
        first = np.ones(srt.shape, dtype=bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]                          # each expert once per layer
        fl.needed = [srt[p][first[p]].tolist() for p in range(nL)]
        miss = first & (np.take_along_axis(fl.used, srt, axis=1) < 0)    # read over the link by the kernel
        uses = None
        for p, j in zip(*np.nonzero(miss)):
            layer, e = self.moe_layers[p], int(srt[p, j])
            c = cache.counters.layer(layer)
            fl.missed += 1
            c.misses += 1
            c.bytes_moved += nb
            ready = max(ready, clock.book(nb, now=fl.t0))
            key = (layer, e)
            if cache.resident(key):                                      # its copy was still on the way
                cache.touch(key, hit=False)
                continue
            if not cache.policy.retain:                                  # load on demand: nothing is kept
                continue
            if uses is None:
                uses = {(l, x) for q, l in enumerate(self.moe_layers) for x in fl.needed[q]}
            slot = None
            for pinned in (uses, {(layer, x) for x in fl.needed[p]}):
                try:
                    slot = cache.claim(key, pinned, count_miss=False)
                    break
                except LookupError:
                    continue
            if slot is not None:                                         # else every slot holds one this step used
                cache.ticket[slot] = rt.transfer.copy_in(layer, int(p), e, cache.pool[slot])
        if ready:                                                    # emulated link: the step waited for its bytes
            delay = ready - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
                rt.transfer.host_wait_s += delay
                fl.stall_s = delay
        return fl

    def _settle(self, fl: _InFlight, steppers=()) -> None:
        """The rest of a finished step's books (runs while the next step computes): hits, routing observers,
        stall, timeline."""
        cache, rt = self.cache, self.runtime
        observers = [o for o in rt.observers if o is not rt.prefetcher]
        for s in steppers:
            s.begin_step("decode", None, fl.idx.shape[1])
        for p, layer in enumerate(self.moe_layers):
            for o in observers:
                o.observe(layer, None, torch.from_numpy(fl.idx[p]), torch.from_numpy(fl.w[p]))
            cache.policy.on_layer(layer)
            c = cache.counters.layer(layer)
            for e in fl.needed[p]:
                if fl.used[p, e] < 0:
                    continue
                key = (layer, e)
                if cache.resident(key):
                    cache.touch(key)
                else:                           # evicted since, by a miss of the same step (the smallest budgets)
                    c.hits += 1
        first = cache.counters.layer(self.moe_layers[0])
        if fl.stall_s:
            first.stall_s += fl.stall_s
        elif self.cuda:
            if fl.missed == 0:
                self._clean_s = fl.dev_s if self._clean_s is None else min(fl.dev_s, 1.05 * self._clean_s)
            elif self._clean_s is not None:                          # measured: the step's time beyond a clean one
                first.stall_s += max(0.0, fl.dev_s - self._clean_s)
        self.step_s.append(fl.dev_s)
        if rt.timeline is not None:
            rt.timeline.add_compute(-1, fl.t0, fl.t0 + fl.dev_s)


@dataclass
class _InFlight:
    """One launched decode step and, once finished, its routing and books."""

    used: np.ndarray                    # [moe layers, E] slot map the step read
    t0: float                           # host time of the launch
    ev0: object = None
    ev1: object = None
    dev_s: float = 0.0
    idx: np.ndarray | None = None       # [moe layers, B, K]
    w: np.ndarray | None = None
    ids: list = field(default_factory=list)
    needed: list = field(default_factory=list)
    missed: int = 0
    stall_s: float = 0.0


class _attention:
    """While inside, the decoder's attention runs the decode attention and the experts modules read through the
    fast step; outside, the prefill's own attention and the runtime's experts path are back."""

    def __init__(self, step: FastStep):
        self.step = step
        self.cfg = step.family.text_config(step.model.config)

    def __enter__(self):
        self.saved = self.cfg._attn_implementation_internal
        self.cfg._attn_implementation_internal = ATTN
        for layer, ex in zip(self.step.moe_layers, self.step.experts):
            self.step.family.moe_block(self.step.model, layer).experts._vismmoe_fast = ex

    def __exit__(self, *exc):
        self.cfg._attn_implementation_internal = self.saved
        for layer in self.step.moe_layers:
            self.step.family.moe_block(self.step.model, layer).experts._vismmoe_fast = None


def unsupported_reason(engine) -> str | None:
    """Why the fast step cannot serve this engine (None: it can)."""
    if getattr(engine.store, "tier", "host") != "host":
        return "the disk tier has no host copy of every expert to read misses from"
    if engine.device.type == "cuda" and moe_kernel.triton is None:
        return "triton is not installed"
    for layer in engine.geometry.moe_layers:
        ex = engine.family.moe_block(engine.model, layer).experts
        act = getattr(ex, "act_fn", None)
        if getattr(ex, "has_bias", False) or not getattr(ex, "is_concatenated", True) or \
                type(act).__name__ not in ("SiLU", "SiLUActivation"):
            return "the experts are not SiLU-gated with concatenated gate/up weights and no bias"
    return None
