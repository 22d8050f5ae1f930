"""The disk tier on the fast decode step: experts a step reads that are neither in a slot nor anywhere in host
memory. Owns the step's staging blobs (experts read from the checkpoint through the store's staging ring, kept
for one token) and the addresses the step reads them at.

A step's routing is known only once it has run, so a step that routed to an expert it could not read is run
again from its snapshot (graphs.Bucket.snapshot: input token, position, mask and a recurrent layer's state; the
static KV write at that position is overwritten by the re-run) after the experts of its FIRST such MoE layer have been staged. That layer's
routing came from exact inputs, so its experts are the right ones, and in the re-run it reads them: every re-run
makes one more MoE layer exact, and a step runs at most (MoE layers with such a miss) + 1 times. The misses of
later layers seen in the same run are staged too while the staging holds fewer than one step's worth
(MoE layers x rows x top-k) of blobs: most are right guesses and save a re-run. So a token stages at most two
steps' worth (the guesses, and each layer's certain misses). An expert not staged is read
from a zero blob (a valid address; the run that read it is discarded). The last run, in which every expert read
was a slot or a staged blob, is the step: the same arithmetic as a read from a slot or a host store.

See docs/fast-step.md ("The disk tier").
"""

from __future__ import annotations

import numpy as np
import torch

from ..offload.store import _device_pointer


class DiskMisses:
    """Staging of one token's disk-only experts for `FastStep` (fast_step.py) over a `DiskStore`.

    `host_addr [moe layers, E] int64` (CUDA): the address the step reads a non-resident expert at (a staged blob,
    else the zero blob). `bank(p)` (CPU): what `LayerExperts.bank` reads for MoE layer p."""

    def __init__(self, fs):
        self.store, self.cuda = fs.store, fs.cuda
        self.transfer = fs.runtime.transfer
        self.store_pos = fs.store_pos
        self.numel, self.dtype = fs.layout.numel, fs.layout.pool_dtype
        L, E = len(fs.moe_layers), fs.E
        self.L, self.E, self.K = L, E, fs.K
        self.zero = self._empty().zero_()
        self.blobs: list[torch.Tensor] = []          # staging blobs, kept (and reused) across tokens
        self.row = np.full((L, E), -1, dtype=np.int64)   # staged blob of (p, e), else -1
        self.used = 0                                # blobs in use by this token
        self.staged_total = 0                        # experts staged since load (each read from the files once)
        self.reruns = 0                              # step runs discarded since load
        if self.cuda:
            self.zero_addr = _device_pointer(self.zero.data_ptr())
            self.host_addr = np.full((L, E), self.zero_addr, dtype=np.int64)

    def _empty(self) -> torch.Tensor:
        t = torch.empty(self.numel, dtype=self.dtype)
        return t.pin_memory() if self.cuda else t

    def begin(self) -> None:
        """A new token: nothing staged."""
        if self.used:
            self.row.fill(-1)
            if self.cuda:
                self.host_addr.fill(self.zero_addr)
            self.used = 0

    def unreadable(self, used: np.ndarray, idx: np.ndarray) -> list[tuple[int, int]]:
        """(MoE layer position, expert) the run routed to but read from neither a slot (`used [L, E]`, the slot
        map it ran with) nor a staged blob, by layer; `idx [L, B*K]` its routing."""
        out = set()
        for p in range(self.L):
            for e in np.unique(idx[p]).tolist():
                if used[p, e] < 0 and self.row[p, e] < 0:
                    out.add((p, e))
        return sorted(out)

    def stage(self, todo: list[tuple[int, int]], rows: int) -> None:
        """Stage the experts of `todo`'s first layer, and of later layers while fewer than one step's worth of
        blobs (MoE layers x `rows` x top-k) are staged. Each is read through the store's ring
        (`TransferEngine.staged`, given back at once) into a staging blob."""
        first = todo[0][0]
        cap = self.L * rows * self.K
        for p, e in todo:
            if p != first and self.used >= cap:
                break
            if self.used == len(self.blobs):
                self.blobs.append(self._empty())
            dst = self.blobs[self.used]
            src = self.transfer.staged(self.store_pos[p], e)
            try:
                dst.copy_(src)
            finally:
                self.store.release(src)
            self.row[p, e] = self.used
            if self.cuda:
                self.host_addr[p, e] = _device_pointer(dst.data_ptr())
            self.used += 1
            self.staged_total += 1

    def bank(self, p: int) -> _Bank:
        return _Bank(self, p)


class _Bank:
    """CPU: `bank[flat]` -> [P, numel], a staged expert's blob, else zeros (LayerExperts reads it for experts not
    in a slot)."""

    def __init__(self, dm: DiskMisses, p: int):
        self.dm, self.p = dm, p

    def __getitem__(self, flat: torch.Tensor) -> torch.Tensor:
        dm = self.dm
        rows = torch.from_numpy(dm.row[self.p] + 1)[flat]               # 0: the zero blob
        return torch.stack([dm.zero] + dm.blobs[:dm.used])[rows]
