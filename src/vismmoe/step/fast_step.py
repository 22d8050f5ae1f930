"""The decode step at the device's speed, routed experts still offloaded: one engine's side of it (residency and
books); the static buffers, compiled layers and CUDA graphs are the model's (step_graphs.py).

    prefill (runtime.py, eager: waves, hits first, prefetch)  ->  DynamicCache
        |  start(): KV copied into a static bucket [B, kv_heads, L, head_dim] per layer (L: a multiple of 256)
        v
    for each new token:
        launch:  landed copies -> slot map [moe layers, E] -> address table (a slot of this engine's pool, or the
                 expert's page-locked host blob) pushed to the device -> ONE graph replay (misses are read over
                 the link by the experts kernel itself)
        finish:  wait for the step (the one sync per token); its routing to the host; misses counted, charged to
                 the link; those that landed (below) adopted in place, the rest claimed (the policy's victim
                 leaves the slot map at once) and their copies queued on the copy stream
        settle:  while the next step runs: hits touch the policy, routing observers, stall, timeline
    A slot is read by a step only once its copy has landed.
    Ahead (`step_ahead`, greedy): once a step's misses are claimed (and the lookahead's guesses queued), the NEXT
    step is launched at once, before the caller handles the tokens (streaming, stop checks) and before the rest of
    the books (`settle`): its input (the argmax the graph wrote, or the next teacher token) is already on the
    device, and its address table is the one the next launch would push. Not where it would get landing
    candidates (after a step that missed, with landing on): a step launched ahead writes nothing into the pool.
    It is used as the next step if nothing was evicted from the cache meanwhile and its input is the one asked
    for; else (a row left or joined, a newcomer's prefill evicted, the batch ended) it is dropped: the bucket's
    position, input and mask are put back behind it on the stream, and its KV column is rewritten by the step
    that replaces it. Tokens and books are those of the step launched after the caller.
    Landing (dense experts, a policy that keeps what it loads): before each launch the step is given a few
    candidate slots (`ExpertCache.victims`: free ones, then the policy's next victims whose copies have landed);
    a miss the kernels read over the link is also written into one of them as it is read, if the candidate's
    expert belongs to an earlier MoE layer (moe_kernel, `landing_plan`: no later kernel of the step reads that
    slot). After the step the old expert leaves and the new one is adopted there with no copy: a decode miss
    crosses the link once, not twice (read by the step, then copied behind it). Misses no candidate took are
    copied as before. Nothing is held back from the cache: a candidate keeps its expert unless a miss lands.
    The disk tier (no host blob to read a miss from): a step that routed to such an expert stages it through the
    store's ring and runs again from its snapshot (fast_disk.py).

Mechanism only: which expert leaves is the policy's call, the copies are the transfer engine's, the cache's slots
and counters are the cache's. The prefill stays on the eager runtime: a cold prefill is bound by the link, not by
launches. Graphs and torch.compile are CUDA-only; the CPU runs the same step eagerly (same bookkeeping, experts
through `decode_experts_reference`), which is what CI tests, or, with `--decode native`, the same books around a
step body in C (cpu/native/decoder.py: the address table is read there, and landing is done after the step).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from dataclasses import dataclass, field

import numpy as np
import torch

from . import moe_kernel
from .decode_prefetch import DecodeLookahead
from .fast_disk import DiskMisses
from .graphs import Bucket, step_graphs
from .split_step import SplitMisses
from .strategy import Prefilled


class FastStep:
    """Decode steps of one engine (see the module docstring). `graphs`/`compiled`: CUDA only; `fuse`: sibling
    projections stacked, the router's tail in one kernel (fused_proj.py, router_topk.py)."""

    @property
    def label(self) -> str:
        """What a request's stats call this step: native (the C body), or fast with what it runs under."""
        if self.native is not None:
            return "native"
        return "fast" + ("+compiled" if self.compiled else "") + ("+graphs" if self.graphs else "")

    def __init__(self, engine, *, graphs: bool, compiled: bool, fuse: bool = False, progress=None,
                 native: bool = False):
        self.model, self.family = engine.model, engine.family
        self.cache, self.runtime = engine.cache, engine.runtime
        self.store, self.layout = engine.store, engine.layout
        self.device = engine.device
        self.cuda = self.device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.compiled = compiled
        geo = engine.geometry
        self.moe_layers = geo.decode_layers                             # a decode token's groups (ERNIE: text banks)
        self.layer_pos = {l: i for i, l in enumerate(self.moe_layers)}
        self.store_pos = [geo.moe_layers.index(l) for l in self.moe_layers]   # row of each in the expert store
        self.E, self.K = geo.num_experts, geo.top_k
        self._rows = np.arange(len(self.moe_layers), dtype=np.int64)[:, None]    # [moe layers, 1]: p
        self._rows_e = self._rows * self.E                                       # p * E: (p, e) as one key
        L = len(self.moe_layers)
        self.slot_map = np.full((L, self.E), -1, dtype=np.int32)       # slot the graph may read, else -1
        self.slot_t = torch.from_numpy(self.slot_map)                   # the CPU step reads it directly
        self._map_version = 0                                           # bumped by every write of `slot_map`
        self._native_addr = None                                        # (version, pool address, [L, E] table)
        self.pending: dict[int, tuple[int, int]] = {}                   # slot -> key: copy not landed yet
        self.sg = step_graphs(engine, compiled, fuse)                   # static buffers and graphs, per model
        self.sg.progress = progress
        # the disk tier: experts read from the files, staged per token, the step re-run (fast_disk.py)
        self.disk = DiskMisses(self) if getattr(self.store, "tier", "host") == "disk" else None
        if self.cuda:
            self.host_addr = self.disk.host_addr if self.disk is not None else \
                self.store.device_addresses()[self.store_pos]               # [L, E] int64
            self.addr_host = torch.empty((L, self.E), dtype=torch.int64).pin_memory()
            self.land_host = torch.zeros(3 + 3 * self.sg.land_slots, dtype=torch.int64).pin_memory()
        for slot, key in enumerate(self.cache.owner):
            if key is not None:
                self.on_insert(key, slot)
        self.cache.listeners.append(self)
        self.step_s: list[float] = []           # device seconds of each step (CUDA events)
        self.gap_s: list[float] = []            # host seconds from a step's end to the next launch (CUDA)
        self._synced = None
        self._clean_s: dict[int, float] = {}    # rows -> fastest recent step without misses: the stall baseline
        # landing candidates per step (module docstring): dense blobs, a retaining policy, the host tier
        self.land_slots = self.sg.land_slots if self.disk is None and getattr(self.cache.policy, "retain", True) \
            else 0
        self.landed = 0                         # misses adopted where the step wrote them (no copy)
        self.evictions = 0                      # evictions from the cache seen (a step launched ahead reads none)
        self.ahead_used = self.ahead_dropped = 0    # steps launched ahead (module docstring), used and dropped
        self._missed = True                     # the last finished step missed (landing is offered after one)
        # lookahead between replays (decode_prefetch.py) where the engine prefetches; --prefetch none: none
        pf = self.runtime.prefetcher
        self.lookahead = DecodeLookahead(self, pf) if pf is not None else None
        # --cpu-experts on|auto: steps split at each MoE layer when the rule expects misses enough (split_step.py);
        # not where a norm follows the experts' output, nor on the disk tier (no host blob to compute from)
        cpu = self.runtime.cpu
        self.split = SplitMisses(self, cpu) if cpu is not None and self.sg.split_ends is not None and \
            self.disk is None and not native else None
        # --decode native (CPU): the step body in C (cpu/native/decoder.py); it reads a miss from its host blob in
        # place, so with --cpu-experts on|auto that is the miss computed on the CPU, and no step splits
        # a step launched ahead (module docstring): possible where no host work runs between its parts (disk
        # re-runs, the native body; a split step is never launched ahead). `step_ahead` switches it: off until
        # its gain is measured on a GPU (its launch overlaps the host's work only there); tests and benches set it
        self.ahead_possible = self.disk is None and not native
        self.step_ahead = False
        self.native = None
        if native:
            from ..cpu.native.decoder import native_decoder
            self.native = native_decoder(engine)
            self.host_addr = self.store.host_addresses()[self.store_pos]     # [L, E] int64 (no disk tier here)
            if cpu is not None:                 # its misses stay on the CPU: none is written into a slot
                self.land_slots = 0

    # ---- residency (cache listener) --------------------------------------------------------------------------
    def on_insert(self, key, slot: int) -> None:
        if key[0] in self.layer_pos:                # prefill-only groups never enter the address table
            self.pending[slot] = key

    def on_evict(self, key, slot: int) -> None:
        self.evictions += 1
        self.pending.pop(slot, None)
        if key[0] in self.layer_pos:
            self.slot_map[self.layer_pos[key[0]], key[1]] = -1
            self._map_version += 1

    def _land(self) -> None:
        """Slots whose copy has arrived become readable by the next step."""
        for slot, key in list(self.pending.items()):
            t = self.cache.ticket[slot]
            if t is None or t.done():
                self.slot_map[self.layer_pos[key[0]], key[1]] = slot
                self._map_version += 1
                del self.pending[slot]

    def _push(self, split: bool = False) -> None:
        """The address table to the device: a slot, else the host blob (`split`: 0, read by no kernel)."""
        if not self.cuda:
            return
        self.addr_host.numpy()[...] = self._addresses(self.slot_map, 0 if split else self.host_addr)
        self.sg.addr_dev.copy_(self.addr_host, non_blocking=True)

    def _addresses(self, slot_map: np.ndarray, missing) -> np.ndarray:
        """[L, E] int64: where a step reads each expert: its slot of this engine's pool, else `missing` (the host
        blobs' addresses [L, E], or 0)."""
        sm = slot_map.astype(np.int64)
        return np.where(sm >= 0, self.cache.pool.data_ptr() + sm * self.layout.nbytes, missing)

    # ---- the decode strategy (strategy.py) -----------------------------------------------------------------
    def start(self, state, prefilled: Prefilled, max_new_tokens: int) -> None:
        """Take over a prefilled batch: its KV into a static bucket (graphs.StepGraphs.load; a running batch's
        `state.capacity` rows, so rows joining and leaving keep its captured graph), in `state.kv`."""
        p = prefilled
        self._missed = True                     # a decode's first steps miss what the prefill did not keep
        state.kv = _FastKV(self.sg.load(p.cache, p.mask, p.deltas, p.first, max_new_tokens, state.capacity),
                           last=state.steps + max_new_tokens - 1)

    def step(self, state, teacher_token: int | None) -> list[int]:
        """One step of the batch (`advance`), the previous step booked while it runs; a greedy batch that will
        take another step launches it ahead (module docstring) unless a row's token is an EOS."""
        kv = state.kv
        greedy = state.sampler is None or state.sampler.greedy
        s, teacher = state.steps, state.teacher
        then = None
        if greedy and s + 1 < kv.last and (teacher is None or s + 1 < len(teacher)):
            def then(ids):
                eos = any(t in state.eos_ids for r, t in enumerate(ids) if not state.done[r])
                return not eos, None if teacher is None else teacher[s + 1]
        kv.inflight = self.advance(kv.bucket, teacher_token, kv.inflight, state.steppers, then)
        if greedy:
            return kv.inflight.ids
        # the step wrote its argmax as the next input; a sampled row replaces it before the next launch
        b = kv.bucket
        picked = state.sampler.pick(b.logits[:b.rows])
        b.ids[:b.rows].copy_(picked[:, None])
        return picked.tolist()

    def finish(self, state) -> None:
        """Book the last step."""
        kv = state.kv
        if kv.inflight is not None:
            self._drop(kv.bucket, kv.inflight)
            self.settle(kv.inflight, state.steppers)
            kv.inflight = None

    def export(self, state) -> Prefilled:
        """The batch as a `Prefilled` for rows to join or leave (rows.py): views of its bucket's first `rows` rows
        and `pos` columns (`finish` first). Whoever re-batches copies them before the next `start` (which may
        load the same bucket)."""
        b = state.kv.bucket
        B, T = b.rows, int(b.pos)
        layers = []
        for kv in b.kv:
            if hasattr(kv, "k"):
                layers.append(SimpleNamespace(keys=kv.k[:B, :, :T], values=kv.v[:B, :, :T]))
            else:
                layers.append(SimpleNamespace(**{n: [x[:B] for x in getattr(kv, n)] for n in
                                                 ("conv_states", "recurrent_states")}))
        return Prefilled(SimpleNamespace(layers=layers), b.mask[:B, :T].long(), b.deltas[:B], b.ids[:B, 0])

    # ---- the step --------------------------------------------------------------------------------------------
    def advance(self, b: Bucket, teacher_token: int | None, prev: _InFlight | None, steppers=(),
                then=None) -> _InFlight:
        """Launch the next step of bucket `b` (or take the one `prev` launched ahead, if it still holds), book the
        previous step `prev` while it runs, then wait for it: the finished step (`.ids`: a token per row), whose
        books `settle` completes. `teacher_token` teacher-forces the step's input token. A step's misses are
        claimed before the next step is launched (their copies start at once, their victims leave the address
        table first). `then(ids) -> (launch?, teacher token or None)`: whether the step after this one is launched
        ahead once this one is booked (where the module docstring allows), and with which input (None: none is);
        the bucket's outputs (`logits`) are then that step's."""
        fl = self._take_ahead(b, prev, teacher_token)
        if fl is None:
            fl = self._launch(b, teacher_token)
        if prev is not None:
            self.settle(prev, steppers)
        return self._finish(b, fl, then)

    def decode(self, b: Bucket, n: int, teacher_tokens: list[int] | None = None) -> list[list[int]]:
        """`n` steps of bucket `b`, fully booked: the tokens per step ([n][B])."""
        out, fl = [], None
        for i in range(n):
            then = None if i + 1 == n else \
                lambda ids, i=i: (True, teacher_tokens[i + 1] if teacher_tokens is not None else None)
            fl = self.advance(b, teacher_tokens[i] if teacher_tokens is not None else None, fl, then=then)
            out.append(fl.ids)
        if fl is not None:
            self.settle(fl)
        return out

    def _launch_ahead(self, b: Bucket, fl: _InFlight, teacher_token: int | None) -> None:
        """The step after `fl` launched now (module docstring): `fl.ahead`, with what `_drop` puts back."""
        b.saved = b.snapshot(b.saved)
        evictions = self.evictions
        nxt = self._launch(b, teacher_token)
        nxt.teacher, nxt.evictions = teacher_token, evictions
        fl.ahead = nxt

    def _take_ahead(self, b: Bucket, prev: _InFlight | None, teacher_token: int | None) -> _InFlight | None:
        """The step `prev` launched ahead, if nothing was evicted since its launch and it has the input asked
        for; else it is dropped (None)."""
        nxt = prev.ahead if prev is not None else None
        if nxt is None:
            return None
        if nxt.evictions == self.evictions and nxt.teacher == teacher_token:
            prev.ahead = None
            self.ahead_used += 1
            return nxt
        self._drop(b, prev)
        return None

    def _drop(self, b: Bucket, prev: _InFlight) -> None:
        """The step `prev` launched ahead, if any, is not used: the bucket's position, input and mask (and any
        in-place state) as before it, in stream order behind it (no wait)."""
        if prev.ahead is not None:
            with torch.inference_mode():                # the bucket's tensors were made in it
                b.restore(b.saved)
            prev.ahead = None
            self.ahead_dropped += 1

    def _launch(self, b: Bucket, teacher_token: int | None) -> _InFlight:
        if self.disk is not None:
            self.disk.begin()                           # nothing staged: non-resident experts read the zero blob
        split = self.split is not None and self.split.wanted()
        land = self._candidates(b, split)
        self._land()
        self._push(split)
        if teacher_token is not None:
            b.ids.fill_(int(teacher_token))
        fl = _InFlight(used=self.slot_map.copy(), t0=time.perf_counter(), land=land)   # what this step reads
        if split:
            self.split.begin(fl, b)
        captured = self.sg.capture_s
        if self.disk is not None:                       # a snapshot to re-run the step from (fast_disk.py)
            fl.snap = b.snapshot()
        if self.cuda:
            fl.ev0, fl.ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            fl.ev0.record()
            self._run(b, fl, split)
            fl.ev1.record()
        elif self.native is not None:                                       # the native body (reads `fl.used`)
            self._run(b, fl, split)
        else:                                                               # the CPU step reads this engine's cache
            landing = {"slots": land[0], "owners": land[1], "taken": [False] * len(land[0])}
            for p, ex in enumerate(self.sg.experts):
                ex.pool, ex.slots, ex.landing = self.cache.pool, self.slot_t[p], landing
                ex.bank = None if split else \
                    self.disk.bank(p) if self.disk is not None else self.store.layer_blobs(self.store_pos[p])
            self._run(b, fl, split)
        fl.captured = self.sg.capture_s != captured     # this step compiled or captured graphs
        if self._synced is not None:                    # host time the device sat idle between two steps
            self.gap_s.append(time.perf_counter() - self._synced)
        return fl

    def _run(self, b: Bucket, fl: _InFlight, split: bool) -> None:
        """The step: one graph (or body), the native body (`--decode native`), or split at each MoE layer with the
        misses computed between (split_step.py)."""
        if self.native is not None:
            self._run_native(b, fl)
        elif split:
            self.sg.run_split(b, self.graphs, lambda p: self.split.between(b, fl, p))
        else:
            self.sg.run(b, self.graphs)

    def _run_native(self, b: Bucket, fl: _InFlight) -> None:
        """The native body over the slot map the step reads (`fl.used`: a slot, else the host store's blob), then
        the landing the kernels would have written (LayerExperts on the CPU: the plan is the same after the step as
        during it, since a candidate only ever holds an earlier layer's expert)."""
        key = (self._map_version, self.cache.pool.data_ptr())      # `fl.used` is the map as of this version
        if self._native_addr is None or self._native_addr[:2] != key:   # the same map: the same table (most steps)
            self._native_addr = key + (np.ascontiguousarray(self._addresses(fl.used, self.host_addr)),)
        self.native.run(b, self._native_addr[2])
        slots, owners = fl.land
        if slots:
            taken = [False] * len(slots)
            idx = b.out_np["route_idx"][:, :b.rows * self.K]
            for p in range(len(self.moe_layers)):
                moe_kernel.land_on_host(self.cache.pool, self.store.layer_blobs(self.store_pos[p]), idx[p],
                                        lambda e: fl.used[p, e] < 0, p, slots, owners, taken)

    def _candidates(self, b: Bucket, split: bool = False) -> tuple[list[int], list[int]]:
        """The next step's landing candidates (module docstring), written into `b.land`: (slots, the MoE layer
        position of each one's expert, -1 for a free slot). None after a step that missed nothing: finding
        candidates costs host time (the policy's next victims), and a step after a clean one rarely misses. None
        for a split step: its kernels read no miss."""
        cache = self.cache
        slots, owners = [], []
        if self.land_slots and self._missed and not split:
            slots = cache.victims(self.land_slots, lambda s: s not in self.pending)
            owners = [-1 if cache.owner[s] is None else self.layer_pos.get(cache.owner[s][0], -1) for s in slots]
        if self.cuda and b.land.numel():
            # written at every launch, candidates or none: the bucket is shared with this model's other engines,
            # and a step must never land into another engine's slots
            nb, pool, C = self.layout.nbytes, cache.pool.data_ptr(), self.sg.land_slots
            h = self.land_host.numpy()
            h[:] = 0
            h[1], h[2] = pool, pool + cache.num_slots * nb              # the pool's bytes: a hit's address
            h[3:3 + len(slots)] = [pool + s * nb for s in slots]
            h[3 + C:3 + C + len(slots)] = owners
            b.land[:h.size].copy_(self.land_host, non_blocking=True)     # taken flags [3+2C:3+3C]: 0
        return slots, owners

    def _adopt(self, fl: _InFlight, miss: np.ndarray) -> None:
        """The misses (`miss` [moe layers, B*K]) the step wrote into landing candidates become resident there (no
        copy); the expert each candidate held leaves first (its bytes were overwritten)."""
        cache = self.cache
        slots, owners = fl.land
        taken = [False] * len(slots)
        for p in np.flatnonzero(miss.any(1)).tolist():      # a layer without misses takes no candidate
            layer = self.moe_layers[p]
            for e, c in moe_kernel.landing_plan(fl.idx[p], lambda e: fl.used[p, e] < 0, p, owners, taken):
                slot = slots[c]
                if cache.owner[slot] is not None:
                    cache.evict(cache.owner[slot])
                if not cache.resident((layer, e)):          # else it became resident meanwhile (a prefetch)
                    cache.adopt((layer, e), slot)
                    self.landed += 1

    # ---- bookkeeping after a step ----------------------------------------------------------------------------
    def _finish(self, b: Bucket, fl: _InFlight, then=None) -> _InFlight:
        """Wait for the step; its routing to the host; its misses counted, charged to the link and claimed (the
        policy's victims leave the slot map at once, so the next step never reads a slot being refilled); then
        the next step launched ahead as `then` says (`advance`)."""
        if self.cuda:
            fl.ev1.synchronize()
            self._synced = time.perf_counter()
            fl.dev_s = fl.ev0.elapsed_time(fl.ev1) / 1e3
        else:
            fl.dev_s = time.perf_counter() - fl.t0
        real = b.rows * self.K                                  # padding rows repeat row 0: not booked
        self._routing(b, fl, real)
        if self.disk is not None:
            self._rerun_disk_misses(b, fl, real)
        miss = fl.used[self._rows, fl.idx] < 0                                      # read over the link
        # the step's distinct (layer, expert) pairs in layer then expert order, and which it read from a slot: one
        # np.unique a step, for the misses counted here and the hits `settle` books
        fl.key_p, fl.key_e = np.divmod(np.unique(fl.idx + self._rows_e), self.E)
        fl.key_read = fl.used[fl.key_p, fl.key_e] >= 0
        distinct = int(fl.key_read.size - np.count_nonzero(fl.key_read))             # distinct missed pairs
        self._missed = distinct > 0                                                 # some pair was read over the link
        if self.split is not None:
            self.split.after(fl, fl.dev_s, self._clean_s.get(b.rows), distinct, b.rows)
        cpu = self.runtime.cpu
        if self.native is not None and cpu is not None and self._missed:     # read in place: computed on the CPU
            fl.cpu_pairs = miss.copy()
            cpu.experts += distinct
            cpu.pairs += int(miss.sum())
        behind = None
        if fl.cpu_pairs is not None:                        # computed on the CPU: the step did not wait for them
            behind = miss & fl.cpu_pairs if cpu.copy_behind else None
            miss &= ~fl.cpu_pairs
        if fl.land[0] and self._missed:
            self._adopt(fl, miss)
        demand = self._claim(fl, miss) if miss.any() else 0                         # all hits: nothing to claim
        if behind is not None and behind.any():
            demand += self._claim(fl, behind, behind=True)                         # on the link too
        if self.lookahead is not None:                                              # the next step's guesses
            self.lookahead.after_step(b, fl, demand)
        # never with landing candidates (`_candidates`: after a step that missed, where landing is on), so a step
        # launched ahead writes nothing into the pool; one that would land could be dropped after writing into a
        # slot, or race a newcomer's copy into the same slot
        if then is not None and not (self._missed and self.land_slots) and self.step_ahead and \
                self.ahead_possible and not b.stateful() and \
                (self.split is None or not self.split.wanted()):
            go, teacher = then(fl.ids)
            if go:
                self._launch_ahead(b, fl, teacher)
        return fl

    def _routing(self, b: Bucket, fl: _InFlight, real: int) -> None:
        """The finished step's routing and tokens from the bucket's host copies: `fl.idx`, `fl.w` [moe layers,
        real] (the first `real` = rows x K), `fl.ids` (a token per row)."""
        nL = len(self.moe_layers)
        fl.idx = b.out_np["route_idx"].reshape(nL, -1)[:, :real].copy()
        fl.w = b.out_np["route_w"].reshape(nL, -1)[:, :real].copy()
        fl.ids = b.out_np["ids"].reshape(-1)[:b.rows].tolist()

    def _rerun_disk_misses(self, b: Bucket, fl: _InFlight, real: int) -> None:
        """Disk tier: while the step routed to an expert it could not read, stage (fast_disk.DiskMisses.stage)
        and run the step again from its snapshot; `fl` ends with the routing and tokens of the exact run."""
        t0 = time.perf_counter()
        while True:
            todo = self.disk.unreadable(fl.used, fl.idx)
            if not todo:
                if fl.reruns:                               # the step waited on the files and its own re-runs
                    fl.stall_s += time.perf_counter() - t0
                return
            self.disk.stage(todo, b.rows)
            self.disk.reruns += 1
            fl.reruns += 1
            b.restore(fl.snap)
            self._push()
            self.sg.run(b, self.graphs)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self._routing(b, fl, real)

    def _claim(self, fl: _InFlight, miss: np.ndarray, behind: bool = False) -> int:
        """The step's misses counted, charged to the link and claimed; the bytes of the copies queued.

        `behind`: misses a split step computed on the CPU, where `CpuSide.copy_behind` holds (CUDA). The step did
        not wait for them, so they are neither counted as misses nor charged to the step; they are claimed and
        copied into slots behind it (cpu/hybrid.py says why)."""
        cache, rt = self.cache, self.runtime
        nb = self.layout.nbytes
        clock = rt.transfer.clock
        ready = 0.0
        uses = None
        pairs = []                                                       # (key, slot) claimed: copied together
        for p, e in sorted({(int(p), int(fl.idx[p, j])) for p, j in zip(*np.nonzero(miss))}):
            layer = self.moe_layers[p]
            c = cache.counters.layer(layer)
            if not behind:                                               # read over the link by the step
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
                uses = {(l, int(x)) for q, l in enumerate(self.moe_layers) for x in fl.idx[q]}
                # slots a claim pinning the whole step may still take: free ones and residents the step did not
                # use. None left (a cache smaller than the step's experts): such a claim would fail after asking
                # the policy for every resident, so pin only the miss's own layer at once (the same victim)
                outside = cache.num_slots - sum(1 for k in cache.slot_of if k in uses)
            slot = None
            own = () if behind else ({(layer, int(x)) for x in fl.idx[p]},)    # behind: never a victim this step used
            for pinned in ((uses,) if outside > 0 else ()) + own:
                try:
                    slot = cache.claim(key, pinned, count_miss=False)
                    outside -= pinned is uses
                    break
                except LookupError:
                    continue
            if slot is not None:                                         # else every slot holds one this step used
                pairs.append((key, slot))
        # one visit to the copy stream for the step's misses (queueing a copy costs the host more than the copy's
        # own call: transfer.copy_in_many); a miss claimed earlier in the loop and since evicted by a later claim
        # (pinned to its own layer only, the smallest budgets) is not copied
        pairs = [(key, slot) for key, slot in pairs if cache.slot_of.get(key) == slot]
        rt.load_slots(pairs)                                             # (none: returns at once)
        queued = nb * len(pairs)                                         # (their bytes counted by the claims)
        if ready:                                                    # emulated link: the step waited for its bytes
            delay = ready - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
                rt.transfer.host_wait_s += delay
                fl.stall_s += delay
        return queued

    def settle(self, fl: _InFlight, steppers=()) -> None:
        """The rest of a finished step's books (runs while the next step computes): hits, routing observers,
        stall, timeline."""
        cache, rt = self.cache, self.runtime
        observers = [o for o in rt.observers if o is not rt.prefetcher]
        B = fl.idx.shape[1] // self.K
        for s in steppers:
            s.begin_step("decode", None, B)
        for p, layer in enumerate(self.moe_layers) if observers else ():
            for o in observers:
                o.observe(layer, None, torch.from_numpy(fl.idx[p].reshape(B, self.K)),
                          torch.from_numpy(fl.w[p].reshape(B, self.K)))
        # the distinct (layer, expert) pairs the step read from a slot, in layer then expert order (`_finish`)
        ps, es, read = fl.key_p, fl.key_e, fl.key_read
        hits = [[] for _ in self.moe_layers]    # per layer: its resident experts the step read
        layers, slot_of = self.moe_layers, cache.slot_of
        for p, e in zip(ps[read].tolist(), es[read].tolist()):
            if (layers[p], e) in slot_of:
                hits[p].append(e)
            else:                               # evicted since, by a miss of the same step (the smallest budgets)
                cache.counters.layer(layers[p]).hits += 1
        calls = list(zip(layers, hits))
        cache.policy.on_calls(calls)            # on_layer, then on_use of each hit, layer by layer
        for layer, experts in calls:
            if experts:
                cache.touch_layer(layer, experts)
        first = cache.counters.layer(self.moe_layers[0])
        if fl.stall_s:
            first.stall_s += fl.stall_s
        elif self.cuda:
            clean = self._clean_s.get(B)                             # a clean step's time grows with the rows
            if fl.missed == 0 and fl.cpu_pairs is None:
                self._clean_s[B] = fl.dev_s if clean is None else min(fl.dev_s, 1.05 * clean)
            elif clean is not None:                                  # measured: the step's time beyond a clean one
                first.stall_s += max(0.0, fl.dev_s - clean)
        self.step_s.append(fl.dev_s)
        if rt.timeline is not None:
            rt.timeline.add_compute(-1, fl.t0, fl.t0 + fl.dev_s)


@dataclass
class _FastKV:
    """A batch on the fast step: its bucket and the step whose books are not settled yet."""

    bucket: Bucket
    inflight: _InFlight | None = None
    last: int = 0                       # the batch's decode steps end before this `state.steps` (no step ahead past)


@dataclass
class _InFlight:
    """One launched decode step and, once finished, its routing and books."""

    used: np.ndarray                    # [moe layers, E] slot map the step read
    t0: float                           # host time of the launch
    ev0: object = None
    ev1: object = None
    dev_s: float = 0.0
    idx: np.ndarray | None = None       # [moe layers, B*K]
    w: np.ndarray | None = None
    ids: list = field(default_factory=list)
    missed: int = 0
    stall_s: float = 0.0
    snap: list | None = None            # disk tier: the bucket's Bucket.snapshot() before the step, to re-run it from
    land: tuple = ((), ())              # the step's landing candidates: (slots, MoE layer position of their experts)
    reruns: int = 0                     # disk tier: runs of this step discarded
    cpu_pairs: np.ndarray | None = None # a split step: [moe layers, B*K] pairs computed on the CPU (split_step.py)
    key_p: np.ndarray | None = None     # the step's distinct (MoE position, expert) pairs, in that order (_finish)
    key_e: np.ndarray | None = None
    key_read: np.ndarray | None = None  # which of them the step read from a slot
    captured: bool = False              # the step compiled or captured graphs (its time is not a step's)
    ahead: _InFlight | None = None      # the next step, launched before this one's books (`advance`)
    teacher: int | None = None          # launched ahead: its teacher-forced input (None: the argmax before it)
    evictions: int = 0                  # launched ahead: the cache's evictions at its launch (`_take_ahead`)


# the experts modules' activation classes (transformers' ACT2FN) -> moe_kernel.ACTIVATIONS' ids
_ACT_CLASSES = {"SiLU": 0, "SiLUActivation": 0, "GELUTanh": 1, "PytorchGELUTanh": 1}


def unsupported_reason(engine) -> str | None:
    """Why the fast step cannot serve this engine (None: it can)."""
    if engine.family.fast_step_blocker is not None:
        return f"{engine.family.model_type}: {engine.family.fast_step_blocker}"
    if engine.device.type == "cuda" and engine.family.fast_step_cuda_blocker is not None:
        return f"{engine.family.model_type} on CUDA: {engine.family.fast_step_cuda_blocker}"
    if getattr(engine.family.text_config(engine.config), "sliding_window", None) is not None and \
            not engine.family.decode_sliding_window:
        return "sliding-window attention: the fast step's decode attention reads the whole KV cache"
    if engine.device.type == "cuda" and moe_kernel.triton is None:
        return "triton is not installed"
    want = moe_kernel.ACTIVATIONS.get(engine.family.expert_activation(engine.config))     # what the kernels compute
    for layer in engine.geometry.moe_layers:
        ex = engine.family.moe_block(engine.model, layer).experts
        act = _ACT_CLASSES.get(type(getattr(ex, "act_fn", None)).__name__)
        if getattr(ex, "has_bias", False) or not getattr(ex, "is_concatenated", True) or act is None or act != want:
            return "the experts are not SiLU- or GELU (tanh)-gated with concatenated gate/up weights and no bias"
    return None
