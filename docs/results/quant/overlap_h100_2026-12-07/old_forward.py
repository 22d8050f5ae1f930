def forward(self, module, layer: int, hidden: torch.Tensor, top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor):
    """MoE layer `layer`'s experts (`module`, transformers') over hidden [T, H] with the router's top_k_index
    and top_k_weights [T, K] -> [T, H]."""
    t_start = time.perf_counter()
    idx, needed = self._route(layer, hidden, top_k_index, top_k_weights)
    if not needed:
        return torch.zeros_like(hidden)
    job, all_needed = None, needed
    if self.cpu is not None:                # cpu/hybrid.py: CPU-placed misses start on the host now
        needed, job = self.cpu.start(self, module, layer, hidden, idx, top_k_weights, needed)
    waves = self._plan(layer, needed) if needed else []
    pairs = None
    for w, wave in enumerate(waves):
        slot_of, tickets = self._make_resident(layer, wave)
        if w == 0 and len(waves) == 1 and self.prefetcher is not None:
            self.prefetcher.issue(self, layer, {(layer, e) for e in wave})   # behind this layer's own misses
        pairs = self._compute(module, hidden, idx, top_k_weights, layer, wave, slot_of, tickets, pairs)
    if not self.cache.policy.retain:
        for e in needed:
            if self.cache.resident((layer, e)):
                self.cache.evict((layer, e))
    if job is not None:
        pairs = self.cpu.finish(job, pairs, top_k_index.numel(), hidden.shape[-1], self.cache.layout.dtype)
        if self.cpu.copies_behind(idx.shape[0]):
            self._copy_behind(layer, job.experts, all_needed)
    out = self._combine(pairs, top_k_index.shape, hidden.dtype)
    if self.timeline is not None:
        if self.cuda:
            torch.cuda.synchronize(self.cache.device)
        self.timeline.add_compute(layer, t_start, time.perf_counter())
    return out

