"""Lookahead in decode: the prefill's predictors and cost model acting between two replays of the fast step.

A fast step is one graph replay over every MoE layer, so the next layers' experts cannot be copied while the step
runs; what can be copied is the NEXT step's. After a step has finished and its misses were claimed
(fast_step.FastStep._finish), with no step on the device:

    score:    the prefetches that were readable by this step (landed before its launch): used ones are hits,
              unused ones are wrong guesses and leave the cache at once (their slots are the first reused)
    measure:  the prefill's cost model (offload/prefetch.Prefetcher, its own instance and phase): L = this
              step's compute, M = copy time of the experts it did not find resident, q = the precision of
              the guesses scored above (or of a shadow guess while off) -> depth D (0: no prefetch)
    predict:  the predictor the prefill uses (gate, trace or blend, the same object) observes this step's
              routing and each MoE layer's input (recorded by the step, graphs.Bucket.route_h), layer by
              layer; MoE layer q of the next step is guessed as max over d = 1..D of predict(layer q-d, d):
              what the layers before q said about q on this token, a wider set than this token's own top-k
              (which the policy already keeps), where the next token's new experts come from
    issue:    most probable first, nearer guesses first, through cache.claim_prefetch (the policy may refuse
              a victim it expects to need sooner) and runtime.load_slots; the policy gets the guesses as hints

How wrong guesses are bounded:
  - a prefetch never changes a token: its slot enters the step's address table only once its copy has landed
    (FastStep.pending), its victim leaves the address table before the next launch, and a resident expert is
    computed with the same arithmetic as one read over the link;
  - reserved slots: at most a quarter of the slots (at least one) hold prefetched experts not used yet; a
    prefetch never evicts another guess, nor an expert the step just finished used at the target's layer, and
    evicts one it used at another layer only where every other resident is such (the smallest budgets);
  - bytes per step: what the link delivers in D step times, less this step's demand copies (at least one
    expert): a step's guesses never queue more than the link can land before the steps they are for;
  - a guess readable by a step that did not use it is evicted before the next guesses are issued (counted as
    wasted bytes), so it never displaces the working set for long;
  - the depth falls to 0 when the cost model says prefetch does not pay (few misses, or poor precision); a
    shadow guess every SHADOW_EVERY steps keeps the precision measured.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..offload.prefetch import Prefetcher

PHASE = "decode-step"           # the cost model's phase of a fast step (a "layer call" there is a whole step)


class DecodeLookahead:
    """The lookahead of one `FastStep` (see the module docstring); made by the step when its engine prefetches."""

    def __init__(self, step, prefill: Prefetcher):
        self.fs = step
        self.cache, self.runtime = step.cache, step.runtime
        self.pred = prefill.predictor
        self.model = Prefetcher(self.pred, prefill.max_depth, p_min=prefill.p_min, link_gbps=prefill.link_gbps,
                                copy_s=prefill.copy_s, adaptive=prefill.adaptive)
        self.room = max(1, self.cache.num_slots // 4)
        self.out: dict[tuple[int, int], bool] = {}      # prefetched, not used yet -> readable by the last step
        self.issued = 0                                 # prefetches issued in decode (all requests)
        self.hits = 0                                   # of them, used by a step
        self.wasted = 0                                 # of them, evicted unused
        self._for_next = 0                              # issued after the last step
        self._shadow: set | None = None                 # shadow guess for the next step (keys)
        self._steps = 0

    def after_step(self, b, fl, demand_bytes: int) -> None:
        """Step `fl` of bucket `b` finished and its misses were claimed (`demand_bytes` of copies queued):
        score the last guesses, run the cost model, guess the next step and queue its prefetches."""
        cache, nL = self.cache, len(self.fs.moe_layers)
        layers = self.fs.moe_layers
        if not cache.policy.retain:                     # load on demand keeps nothing: nothing to prefetch into
            return
        t0 = time.perf_counter()
        used = {(layers[p], int(e)) for p in range(nL) for e in np.unique(fl.idx[p])}
        hits, wrong = 0, []
        for key in list(self.out):
            if key not in cache.slot_of:                # evicted since (a demand miss took its slot)
                del self.out[key]
                continue
            readable = fl.used[self.fs.layer_pos[key[0]], key[1]] >= 0
            if key in used and readable:
                hits += 1
                del self.out[key]
            elif readable:
                wrong.append(key)
        for key in wrong:                               # a guess that missed leaves first
            del self.out[key]
            cache.evict(key)
            self.wasted += 1
        self.hits += hits
        m = self.model
        m.time_call(PHASE, max(fl.dev_s - fl.stall_s, 1e-6))
        m.note(-1, sorted(used), int(fl.missed) + hits, hits, issued=self._for_next, guessed=self._shadow)
        self._shadow = None
        self._for_next = 0
        self._steps += 1
        depth = m.choose_depth()
        shadow = depth == 0 and self._steps % m.SHADOW_EVERY == 0
        if depth == 0 and not shadow:
            return
        wanted = self._guess(b, fl, max(depth, 1))
        if shadow:
            self._shadow = {k for _, _, k in wanted if not cache.resident(k)}
            return
        self._issue(wanted, used, depth, demand_bytes)
        m.add_host_time(time.perf_counter() - t0)

    def _guess(self, b, fl, depth: int) -> list[tuple[int, float, tuple[int, int]]]:
        """(depth, -probability, key) of the next step's likely experts, nearest and most probable first."""
        layers, K = self.fs.moe_layers, self.fs.K
        nL, B = len(layers), fl.idx.shape[1] // K
        for p, layer in enumerate(layers):
            self.pred.observe(layer, b.route_h[p, :B], torch.from_numpy(fl.idx[p].reshape(B, K)),
                              torch.from_numpy(fl.w[p].reshape(B, K)))
        best: dict[tuple[int, int], tuple[int, float]] = {}
        hint = np.zeros((nL, self.fs.E))
        every = self.runtime.moe_layers             # the predictor's layers (ERNIE: vision banks too)
        for p, layer in enumerate(layers):
            i = self.runtime.layer_pos[layer]
            for d in range(1, depth + 1):
                if i + d >= len(every):
                    break
                q = self.fs.layer_pos.get(every[i + d])
                if q is None:                       # a prefill-only group: nothing of it runs in decode
                    continue
                probs = self.pred.predict(layer, d)
                if probs is None:
                    continue
                hint[q] = np.maximum(hint[q], probs)
                for e in np.nonzero(probs >= self.model.p_min)[0].tolist():
                    key = (layers[q], e)
                    cand = (d, -float(probs[e]))
                    if key not in best or cand < best[key]:
                        best[key] = cand
        for q in np.nonzero(hint.any(axis=1))[0].tolist():
            self.cache.policy.hint(layers[q], hint[q])
        return sorted((d, negp, key) for key, (d, negp) in best.items())

    def _issue(self, wanted, used: set, depth: int, demand_bytes: int) -> None:
        cache, nb = self.cache, self.cache.layout.nbytes
        budget = max(nb, self.model.allowance_bytes(nb, 1) - demand_bytes)     # link bytes in `depth` steps
        guessed = {k for _, _, k in wanted}
        protect = used | guessed
        spent = 0
        pairs = []
        for _, _, key in wanted:
            if cache.resident(key):
                continue
            if spent + nb > budget or len(self.out) >= self.room:
                break
            slot = None         # a victim outside this step's experts, else outside the target layer's
            for pinned in (protect, guessed | {k for k in used if k[0] == key[0]}):
                try:
                    slot = cache.claim_prefetch(key, pinned)
                    break
                except LookupError:
                    continue
            if slot is None:
                break
            pairs.append((key, slot))
            self.out[key] = True
            spent += nb
            self.issued += 1
            self._for_next += 1
        self.runtime.load_slots(pairs, kind="prefetch")
