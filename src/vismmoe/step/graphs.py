"""The decode step's static side, one per model: static KV buckets, the step body, its compiled layer call and its
captured CUDA graphs, the device-side expert address table.

    bucket (B, L):  KV [B, kv_heads, L, head_dim] per decoder layer, input token, attention mask, rope deltas, rows
                    in use (`live`: the experts kernels skip the rest),
                    routing record [moe layers, B*K], each MoE layer's input [moe layers, B, H] (what the
                    decode lookahead's gate predictor reads between replays), pinned host copies of token and
                    routing
    body:           mask column on -> positions -> embed -> rotary -> every decoder layer (transformers' own
                    modules, compiled once for all layers; attention reads `StaticKV`, experts `LayerExperts`)
                    -> norm -> lm_head -> argmax into the input token -> position + 1 -> token and routing to host
    graph:          the body captured once per bucket, replayed for every token of every request

Shared by every engine (fork) over the same model, so a bench's systems capture each bucket once: nothing an
engine owns is baked into a graph. Each engine writes its own residency into the address table before a replay
(fast_step.FastStep) and runs one request at a time.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..offload.hooks import hook_of
from . import moe_kernel
from .fused_proj import stacked_of
from .router_topk import router_stand_ins

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


def register_attention() -> None:
    """Make the decode attention `ATTN` known to transformers' `AttentionInterface` (again a no-op)."""
    if ALL_ATTENTION_FUNCTIONS.get(ATTN) is not _decode_attention:
        ALL_ATTENTION_FUNCTIONS.register(ATTN, _decode_attention)


class StaticKV:
    """One decoder layer's KV cache during decode: fixed buffers `k`, `v [B, kv_heads, L, head_dim]`; the new
    token's key and value are written at `pos` ([1] long, shared by every layer). Duck-types the one method
    transformers' attention calls on a cache."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        self.k, self.v, self.pos = k, v, pos

    def inplace_state(self) -> tuple:
        """Buffers a step changes other than at column `pos`: none (a step's write at `pos` is rewritten by the
        next run of the same step)."""
        return ()

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.k.index_copy_(2, self.pos, key_states)
        self.v.index_copy_(2, self.pos, value_states)
        return self.k, self.v

    def load(self, src, fill: torch.Tensor | None, T: int) -> None:
        """The prefill's `T` positions of cache layer `src` (`keys`, `values`); bucket row r gets request row
        `fill[r]` (None: row r, the request filling the bucket). A sliding-window layer's cache keeps only its last
        n < T positions: they go to columns T-n..T-1 (the columns before are never attended: the family's window
        mask, `Family.decode_masks`)."""
        n = src.keys.shape[2]
        self.k[:, :, T - n:T].copy_(src.keys if fill is None else src.keys[fill])
        self.v[:, :, T - n:T].copy_(src.values if fill is None else src.values[fill])


class LayerExperts:
    """What one MoE layer's experts read during a fast step (the `fast` of the module's hook, offload/hooks.py).

    Every per-layer value is a tensor (a view of a shared table), never an int: torch.compile specialises on
    ints, and tensors let one compiled layer serve every layer. CUDA reads the address table `addr`; the CPU step
    reads `slots`, `pool` and `bank`, which the running engine sets (fast_step.FastStep)."""

    def __init__(self, layout, addr: torch.Tensor | None, act: str = "silu"):
        self.layout = layout                                        # the expert format of the blobs read
        self.act = act                                              # the gate's activation (moe_kernel.ACTIVATIONS)
        self.inter = layout.inter
        self.spec = layout.spec()
        self.addr = addr                                            # [E] int64 (CUDA)
        self.pool = self.slots = self.bank = None                   # CPU: [S, numel], [E] int32, [E, numel] (None:
                                                                    # misses read nothing, the split step's)
        self.route_idx = self.route_w = None                        # [B*K] views of the bucket's routing record
        self.route_h = None                                         # [B, H] view of the bucket's MoE inputs
        self.live = None                                            # [1] int32: the bucket's rows in use
        self.land = None                # CUDA: the bucket's landing state (moe_kernel.decode_experts_triton)
        self.pos = None                 # [1] int64: this MoE layer's position (the landing rule reads it)
        self.landing = None             # CPU: {"slots", "owners", "taken"}: the running step's landing candidates

    def __call__(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        self.route_h.copy_(hidden.reshape(self.route_h.shape))     # read between steps, never by the step
        if hidden.is_cuda:
            return moe_kernel.decode_experts(hidden, top_k_index, top_k_weights, self.addr, self.route_idx,
                                             self.route_w, self.live, self.land, self.pos, self.inter, self.spec,
                                             self.act)
        flat = top_k_index.reshape(-1)
        self.route_idx.copy_(flat)
        self.route_w.copy_(top_k_weights.reshape(-1).float())
        n = int(self.live)                  # rows past the live ones get zeros, as the kernels give them
        K = top_k_index.shape[-1]
        flat = flat[:n * K]
        slots = self.slots[flat].long()                                              # [P]; -1: not resident
        # a miss reads its host blob, or (the split step: `bank` None) nothing: zeros, as address 0 gives
        missing = self.bank[flat] if self.bank is not None else self.pool.new_zeros(len(flat), self.pool.shape[1])
        blobs = torch.where((slots >= 0)[:, None], self.pool[slots.clamp(min=0)], missing)
        out = self.reference(blobs, hidden, top_k_index, top_k_weights, n)
        land = self.landing
        if land is not None and land["slots"]:              # what the kernels' landing writes, on the host
            moe_kernel.land_on_host(self.pool, self.bank, flat.numpy(), lambda e: int(self.slots[e]) < 0,
                                    int(self.pos), land["slots"], land["owners"], land["taken"])
        return out


    def reference(self, blobs: torch.Tensor, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, n: int) -> torch.Tensor:
        """The CPU step's experts: the first `n` rows of hidden [B, H] through the blobs [n*K, numel] of their
        pairs (in this layer's format) -> [B, H], rows past `n` zeros (as the kernels give rows past `live`)."""
        out = torch.zeros_like(hidden)
        gate_up, down = self.layout.dequantize(blobs)                               # [P, 2I, H], [P, H, I]
        out[:n] = moe_kernel.decode_experts_reference(hidden[:n], top_k_index[:n], top_k_weights[:n], gate_up, down,
                                                      self.act)
        return out


def _layer_call(layer, hidden, mask, text_pos, kv, cos, sin, **extra):
    return layer(hidden, attention_mask=mask, position_ids=text_pos, past_key_values=kv,
                 position_embeddings=(cos, sin), **extra)


_COMPILED = None
# Shapes are static: each (batch, KV bucket) compiles once. torch's default recompile limit (8 per function) would
# run every later shape uncompiled (still exact, slower): a server meets more than 8 over its life.
RECOMPILE_LIMIT = 64


def compiled_layer_call():
    """`_layer_call` under torch.compile (inductor), one wrapper per process: every layer, engine and bucket of
    the same shapes reuses its compiled code."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo.config as dynamo
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), RECOMPILE_LIMIT))
        _COMPILED = torch.compile(_layer_call, dynamic=False)
    return _COMPILED


@dataclass
class Bucket:
    """Static buffers of one (batch, KV length) shape, and its captured graph."""

    B: int                      # rows in the graph (a power of two)
    L: int
    kv: list                    # per decoder layer: its StaticKV (or a family's own, static_cache.py)
    pos: torch.Tensor           # [1] long: column the next token is written to
    ids: torch.Tensor           # [B, 1] long: the next token (the graph writes its argmax here)
    logits: torch.Tensor        # [B, V]: the step's logits (a sampled row picks from them after the step)
    mask: torch.Tensor          # [B, L] bool: attended columns
    deltas: torch.Tensor        # [B, 1] long: rope position minus text position
    route_idx: torch.Tensor     # [moe layers, B*K] long: routing of the last step (device)
    route_w: torch.Tensor       # [moe layers, B*K] float32
    route_h: torch.Tensor       # [moe layers, B, H]: each MoE layer's input of the last step (device)
    out_host: dict = field(default_factory=dict)    # pinned host copies: ids, route_idx, route_w
    out_np: dict = field(default_factory=dict)      # numpy views of ids, route_idx, route_w (the step's books)
    live: torch.Tensor = None   # [1] int32: `rows`, on the device (the experts kernels skip rows past it)
    land: torch.Tensor = None   # [3 + 3C + B*K] int64: landing state (moe_kernel; empty: a format without landing)
    graph: object = None
    extra: torch.Tensor = None  # [B, 1, H]: the split step's rows computed between segments, added after the MoE
                                # layer they belong to (then zeroed)
    segments: list = field(default_factory=list)    # the split step's graphs, one per segment (`StepGraphs.run_split`)
    rows: int = 0               # rows of the request in it; rows rows..B-1 repeat row 0's input, do no work in
                                # the experts kernels (`live`) and their output is unused
    saved: list = None          # what a step launched ahead changes, as before it (fast_step.py `_drop`)
    _stateful: bool = None

    def _changed(self) -> list[torch.Tensor]:
        """The buffers a step changes other than the KV columns at `pos`: position, input token, mask, and every
        cache's in-place state (a recurrent layer's, `inplace_state()`)."""
        return [self.pos, self.ids, self.mask] + [t for c in self.kv if c is not None for t in c.inplace_state()]

    def snapshot(self, into: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """A copy of what a step changes (`_changed`); `restore(snap)` puts it back, so a step can be run again
        from here (warm-up before a capture, the disk tier's re-runs, a step launched ahead and dropped). The KV
        columns a step writes at `pos` need no copy: a run from the restored position writes them again. `into`:
        an earlier snapshot of this bucket, overwritten (no allocation)."""
        if into is None:
            return [t.clone() for t in self._changed()]
        for saved, t in zip(into, self._changed(), strict=True):
            saved.copy_(t)
        return into

    def stateful(self) -> bool:
        """A cache layer keeps in-place state (a recurrent layer's): a snapshot copies all of it."""
        if self._stateful is None:
            self._stateful = any(c.inplace_state() for c in self.kv if c is not None)
        return self._stateful

    def restore(self, snap: list[torch.Tensor]) -> None:
        for t, saved in zip(self._changed(), snap, strict=True):
            t.copy_(saved)


class StepGraphs:
    """See the module docstring. Get the one of an engine's model with `step_graphs(engine, compiled, fuse)`."""

    def __init__(self, engine, compiled: bool, fuse: bool = False):
        register_attention()
        self.model, self.family = engine.model, engine.family
        self.device, self.dtype = engine.device, engine.dtype
        self.cuda = self.device.type == "cuda"
        geo = engine.geometry
        self.moe_layers, self.K, self.E = geo.decode_layers, geo.top_k, geo.num_experts
        self.H = geo.hidden
        # candidate slots a step may land misses in (moe_kernel.LAND): on CUDA dense blobs only (the kernels'
        # landing writes them), on the CPU any format (a host copy of the blob: moe_kernel.land_on_host)
        self.land_slots = moe_kernel.LAND * self.K if engine.layout.spec() == "dense" or not self.cuda else 0
        nL = len(self.moe_layers)
        self.positions = torch.arange(nL, dtype=torch.long, device=self.device)
        self.addr_dev = torch.zeros((nL, self.E), dtype=torch.int64, device=self.device) if self.cuda else None
        act = self.family.expert_activation(self.model.config)
        self.experts = [LayerExperts(engine.layout, self.addr_dev[p] if self.cuda else None, act)
                        for p in range(nL)]
        for p, ex in enumerate(self.experts):
            ex.pos = self.positions[p:p + 1]
        self.compiled = compiled
        self._layer = compiled_layer_call() if compiled else _layer_call
        # fewer kernels (`fuse`): sibling projections stacked (fused_proj.py), softmax top-k routers' tails in one
        # kernel (router_topk.py); stand-ins in the body only, while `active`. On CUDA the weights are stacked even
        # unfused, before anything is captured: stacking moves them, and a graph captured before would read freed ones
        stacked = stacked_of(self.family.language_model(self.model)) if fuse or self.cuda else None
        self.stand_ins = stacked + router_stand_ins(self.model, self.family, geo.moe_layers) if fuse else None
        # the split step's segment ends: decoder layer index -> the MoE positions (expert groups) in that decoder
        # layer; None where the family's routed output is not a plain sum into the residual stream
        self.split_ends = None
        if self.family.moe_output_additive:
            self.split_ends = {}
            for p, layer in enumerate(self.moe_layers):
                self.split_ends.setdefault(self.family.decoder_index(layer), []).append(p)
        self.buckets: dict[tuple[int, int], Bucket] = {}
        self.capture_s = 0.0                    # seconds spent compiling and capturing (first step of a bucket)
        self.progress = None

    def bucket(self, B: int, need: int, capacity: int = 0) -> Bucket:
        """The bucket for `B` rows (rounded up to a power of two: a batch of 3 runs in the graph of 4, so a
        server's changing batch sizes compile and capture few shapes) and at least `need` KV positions (a
        multiple of BUCKET; made on first use).

        `capacity` (a running batch's most rows, `RunningBatch`): the bucket holds that many rows whatever `B`,
        and its KV length is the shortest this model already has at that size that fits `need`, else the next
        of BUCKET x 1, 2, 4, 8, ...: rows that join and leave keep one captured shape, and a longer batch
        captures a new one only when it outgrows every earlier one (a few times over a server's life)."""
        B = 1 << (max(B, capacity) - 1).bit_length()
        if capacity:
            fits = [L for (b, L) in self.buckets if b == B and L >= need]
            L = min(fits) if fits else BUCKET << max(0, (-(-need // BUCKET) - 1).bit_length())
        else:
            L = -(-need // BUCKET) * BUCKET
        b = self.buckets.get((B, L))
        if b is not None:
            return b
        dt, dev = self.dtype, self.device
        pos = torch.zeros(1, dtype=torch.long, device=dev)
        kv = self.family.static_cache(self.model, B, L, pos, dt, dev)
        nL = len(self.moe_layers)
        b = Bucket(B=B, L=L, kv=kv, pos=pos, ids=torch.zeros(B, 1, dtype=torch.long, device=dev),
                   logits=torch.zeros(B, self.model.lm_head.out_features, dtype=dt, device=dev),
                   mask=torch.zeros(B, L, dtype=torch.bool, device=dev),
                   deltas=torch.zeros(B, 1, dtype=torch.long, device=dev),
                   route_idx=torch.zeros(nL, B * self.K, dtype=torch.long, device=dev),
                   route_w=torch.zeros(nL, B * self.K, dtype=torch.float32, device=dev),
                   route_h=torch.zeros(nL, B, self.H, dtype=dt, device=dev),
                   extra=torch.zeros(B, 1, self.H, dtype=dt, device=dev),
                   live=torch.full((1,), B, dtype=torch.int32, device=dev),
                   land=torch.zeros(3 + 3 * self.land_slots + B * self.K if self.land_slots else 0,
                                    dtype=torch.long, device=dev))
        for name, t in (("ids", b.ids), ("route_idx", b.route_idx), ("route_w", b.route_w), ("route_h", b.route_h)):
            h = torch.empty(t.shape, dtype=t.dtype)
            b.out_host[name] = h.pin_memory() if self.cuda else h
            if name != "route_h":
                b.out_np[name] = b.out_host[name].numpy()
        self.buckets[(B, L)] = b
        return b

    def load(self, dyn_cache, mask: torch.Tensor, deltas: torch.Tensor, first: torch.Tensor, max_new: int,
             capacity: int = 0) -> Bucket:
        """A prefilled request into its bucket: KV from `dyn_cache`, attention `mask [B, T]`, rope `deltas [B, 1]`,
        the first generated token `first [B]`; room for `max_new` more tokens; `capacity` as in `bucket`."""
        B, T = mask.shape
        b = self.bucket(B, T + max_new, capacity)
        b.rows = B
        b.live.fill_(B)
        fill = None                                 # bucket row -> request row (None: the same row, no gather)
        if B < b.B:                                 # rows past the request's repeat its row 0
            fill = torch.zeros(b.B, dtype=torch.long, device=mask.device)
            fill[:B] = torch.arange(B, device=mask.device)
        for i, layer_kv in enumerate(b.kv):
            if layer_kv is not None:                # None: a layer that reads another's keys (Gemma 4's shared KV)
                layer_kv.load(dyn_cache.layers[i], fill, T)
        b.mask.zero_()
        b.mask[:, :T].copy_(mask.bool() if fill is None else mask.bool()[fill])
        b.deltas.copy_(deltas.to(b.deltas.dtype) if fill is None else deltas.to(b.deltas.dtype)[fill])
        b.pos.fill_(T)
        b.ids.copy_(first.view(B, 1) if fill is None else first.view(B, 1)[fill])
        return b

    @contextmanager
    def active(self, b: Bucket):
        """While inside, the decoder's attention runs the decode attention and the experts modules read through
        `LayerExperts` (recording into `b`); outside, the prefill's own attention and the runtime's experts."""
        cfg = self.family.text_config(self.model.config)
        saved = cfg._attn_implementation_internal
        cfg._attn_implementation_internal = ATTN
        for p, (layer, ex) in enumerate(zip(self.moe_layers, self.experts)):
            ex.route_idx, ex.route_w, ex.route_h, ex.live = b.route_idx[p], b.route_w[p], b.route_h[p], b.live
            ex.land = b.land
            hook_of(self.family.moe_block(self.model, layer).experts).fast = ex
        try:
            with self.stand_ins.swapped() if self.stand_ins is not None else nullcontext():
                yield
        finally:
            cfg._attn_implementation_internal = saved
            for layer in self.moe_layers:
                hook_of(self.family.moe_block(self.model, layer).experts).fast = None

    def run(self, b: Bucket, graphs: bool) -> None:
        """One step of bucket `b`: its graph replayed (captured on first use), or the body run eagerly. A replay
        needs no Python hooks: only a body that runs (eagerly, or to be captured) is made `active`."""
        if graphs and b.graph is not None:
            b.graph.replay()
            return
        with self.active(b):
            if graphs:
                self._capture(b)
            else:
                self._body(b)
        if graphs:
            b.graph.replay()

    def run_split(self, b: Bucket, graphs: bool, between) -> None:
        """One step of bucket `b` in segments (`_parts(split=True)`): after each MoE layer's segment the host
        waits for it and calls `between(p)` for each MoE position p it ended with (their routing and input are in
        `b.out_host`), which may put rows into `b.extra` before the next segment starts. CUDA: one graph per segment (captured on first
        use, in one memory pool); else the segments run eagerly."""
        if graphs and b.segments:
            last = len(b.segments) - 1
            stream = torch.cuda.current_stream(self.device)
            for s, (g, ps) in enumerate(b.segments):
                g.replay()
                if s < last:
                    stream.synchronize()
                    for p in ps:
                        between(p)
            return
        with self.active(b):
            if graphs:
                self._capture_split(b)
            else:
                for ps in self._parts(b, split=True):
                    if self.cuda:               # the routing's copies to the host must have landed
                        torch.cuda.current_stream(self.device).synchronize()
                    for p in ps:
                        between(p)
        if graphs:
            self.run_split(b, graphs, between)

    def _capture_split(self, b: Bucket) -> None:
        t0 = time.perf_counter()
        self._warm(b, lambda: [None for _ in self._parts(b, split=True)])
        saved = b.snapshot()
        pool = torch.cuda.graph_pool_handle()
        parts = self._parts(b, split=True)
        segments, done = [], False
        while not done:                 # one graph per segment; tensors passed between them stay alive in `parts`
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                try:
                    ps = next(parts)
                except StopIteration:
                    ps, done = (), True
            segments.append((g, ps))
        b.restore(saved)
        torch.cuda.synchronize(self.device)
        b.segments = segments
        self.capture_s += time.perf_counter() - t0
        self._say(f"split decode step captured in {time.perf_counter() - t0:.1f} s ({len(segments)} segments)")

    def _body(self, b: Bucket) -> None:
        for _ in self._parts(b, split=False):
            pass

    def _parts(self, b: Bucket, split: bool):
        """The step body. `split`: a generator that stops after each MoE layer's decoder layer (`split_ends`),
        once that layer's routing and input are on their way to the host (`out_host`), and yields the MoE
        positions of that decoder layer; when resumed, the rows the host put into `b.extra` join the residual
        stream (its routed experts' output is a plain sum into it: `Family.moe_output_additive`). Without `split`
        it never yields."""
        model, fam = self.model, self.family
        lm = fam.language_model(model)
        if self.stand_ins is not None:
            self.stand_ins.reset()          # no input left from a run before (what torch.compile's guards expect)
        b.mask.index_fill_(1, b.pos, True)
        positions = fam.decode_positions(b.mask, b.deltas)           # [1 + R, B, 1]: text row, R rope rows
        # [B, 1, H]; per layer (cos, sin) and the family's other inputs (Gemma 4: per-layer inputs, shared KV)
        h, rope, extras = fam.decode_inputs(model, b.ids, fam.rotary_positions(positions))
        masks = fam.decode_masks(model, b.mask[:, None, None, :], b.pos)     # per layer, from [B, 1, 1, L]
        layer_pos = fam.layer_position_ids(positions)                # [B, 1]
        ends = self.split_ends if split else {}
        for i, layer in enumerate(lm.layers):
            h = self._layer(layer, h, masks[i], layer_pos, b.kv[i], *rope[i], **extras[i])
            ps = ends.get(i)
            if ps:
                for p in ps:
                    for name in ("route_idx", "route_w", "route_h"):
                        b.out_host[name][p].copy_(getattr(b, name)[p], non_blocking=True)
                yield ps
                h = h + b.extra
                b.extra.zero_()
        h = lm.norm(h[:, -1:])
        logits = fam.decode_logits(model, model.lm_head(h))[:, -1]   # [B, V]
        b.logits.copy_(logits)
        b.ids.copy_(logits.argmax(-1, keepdim=True))
        b.pos.add_(1)
        for name in ("ids", "route_idx", "route_w"):
            b.out_host[name].copy_(getattr(b, name), non_blocking=True)

    def _say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    def _warm(self, b: Bucket, body) -> None:
        """Run `body` twice on a side stream before a capture (compiles on the first call, warms kernels and
        allocations), putting back what it changed (a recurrent layer's state changes in place)."""
        saved = b.snapshot()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for i in range(2):
                self._say(f"decode step: {'compiling' if i == 0 and self.compiled else 'warming up'} "
                          f"(batch {b.B}, KV {b.L})")
                body()
                b.restore(saved)
        torch.cuda.current_stream(self.device).wait_stream(s)
        torch.cuda.synchronize(self.device)

    def _capture(self, b: Bucket) -> None:
        t0 = time.perf_counter()
        self._warm(b, lambda: self._body(b))
        saved = b.snapshot()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self._body(b)
        b.restore(saved)
        torch.cuda.synchronize(self.device)
        b.graph = g
        self.capture_s += time.perf_counter() - t0
        self._say(f"decode step captured in {time.perf_counter() - t0:.1f} s")


def step_graphs(engine, compiled: bool, fuse: bool = False) -> StepGraphs:
    """The `StepGraphs` of `engine`'s model (one per model, compile and stacking setting and expert format,
    shared by its forks: a captured step reads blobs of one format)."""
    store = engine.model.__dict__.setdefault("_vismmoe_step_graphs", {})
    key = (compiled, fuse, engine.layout.spec())
    sg = store.get(key)
    if sg is None:
        sg = store[key] = StepGraphs(engine, compiled, fuse)
    return sg
