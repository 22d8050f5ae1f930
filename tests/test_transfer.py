"""Copies queued together (`copy_in_many`) land exactly what one-by-one copies would, and on a GPU a run of
experts consecutive both in the store and in the slot pool becomes one copy, never a run that crosses a gap, a
buffer or a slot that must first wait for its last reader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vismmoe import load
from vismmoe.offload.store import HostStore
from vismmoe.offload.transfer import TransferEngine, copy_runs


def _setup(device: str, experts: int = 8, numel: int = 96, slots: int = 10):
    layout = SimpleNamespace(numel=numel, nbytes=numel * 2, pool_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    buffers = [torch.randn(experts, numel, generator=gen).to(torch.bfloat16) for _ in range(2)]
    if device == "cuda":
        buffers = [b.pin_memory() for b in buffers]
    store = HostStore(layout, experts, buffers)
    pool = torch.zeros(slots, numel, dtype=torch.bfloat16, device=device)
    return TransferEngine(torch.device(device), store), store, pool


def _land(device: str):
    tr, store, pool = _setup(device)
    # layer 0: experts 0,1,2 -> slots 3,4,5 (one run); 5 -> 9; 6 -> 7 (slot not next); layer 1: expert 7 -> slot 8
    items = [(0, 0, 0, 3), (0, 0, 1, 4), (0, 0, 2, 5), (0, 0, 5, 9), (0, 0, 6, 7), (1, 1, 7, 8)]
    tickets = tr.copy_in_many(pool, [(layer, lp, e, s, None) for layer, lp, e, s in items], kind="demand")
    tr.wait(0, tickets)
    if device == "cuda":
        torch.cuda.synchronize()
    for layer, lp, e, s in items:
        assert torch.equal(pool[s].cpu(), store.blob(lp, e)), (layer, e, s)
    untouched = sorted(set(range(pool.shape[0])) - {s for *_, s in items})
    assert not pool[untouched].any()
    assert tr.bytes_copied == len(items) * store.layout.nbytes
    assert [t.nbytes for t in tickets] == [store.layout.nbytes] * len(items)
    return tickets


def test_runs_join_only_consecutive_experts_into_consecutive_slots():
    first, other = object(), object()
    items = [(0, 0, 3, 7, None), (0, 0, 4, 8, None), (0, 0, 5, 9, None),   # one run
             (0, 0, 7, 10, None),                                          # expert gap
             (0, 0, 8, 12, None),                                          # slot gap
             (1, 1, 9, 13, None),                                          # another layer's buffer
             (1, 1, 10, 14, first), (1, 1, 11, 15, first),                 # the same wait: one run
             (1, 1, 12, 16, other),                                        # a new wait
             (1, 1, 13, 17, None)]                                         # held back by that wait: joins
    assert copy_runs(items) == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 8), (8, 10)]
    assert copy_runs([]) == []
    assert copy_runs([(0, 0, 1, 1, None), (0, 0, 1, 2, None)]) == [(0, 1), (1, 2)]      # the same expert twice


def test_a_batch_that_fails_leaves_none_of_its_slots_resident(tiny_dirs, image_file, monkeypatch):
    """Slots are claimed before their copies are queued: when queueing fails, none of them may later pass for a
    landed expert (a hit would read whatever the slot held before), and the engine stays usable."""
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%")
    ref = eng.generate(image_file, "What is here?", max_new_tokens=4)
    eng.cache.clear()
    tr = eng.runtime.transfer
    real = type(tr).copy_in_many

    def failing(self, pool, items, kind="demand"):
        if len(items) > 1:
            real(self, pool, items[:1], kind)           # part of the batch is already on its way
            raise OSError("copy failed")
        return real(self, pool, items, kind)

    monkeypatch.setattr(type(tr), "copy_in_many", failing)
    with pytest.raises(OSError):
        eng.generate(image_file, "What is here?", max_new_tokens=4)
    assert not eng.cache.slot_of                        # the failed layer's claims left with the error
    monkeypatch.setattr(type(tr), "copy_in_many", real)
    assert eng.generate(image_file, "What is here?", max_new_tokens=4).token_ids == ref.token_ids


def test_copies_queued_together_land_each_expert():
    tickets = _land("cpu")
    assert all(t.future is not None and t.done() for t in tickets)
    assert len({id(t.future) for t in tickets[:5]}) == 1 and tickets[5].future is not tickets[0].future  # per layer


@pytest.mark.gpu
def test_consecutive_experts_and_slots_share_one_copy_on_the_gpu():
    tickets = _land("cuda")
    events = [t.event for t in tickets]
    assert events[0] is events[1] is events[2]                     # 0,1,2 -> 3,4,5: one copy
    assert len({id(e) for e in events[2:]}) == 4                   # a gap, a slot out of order, another layer
    assert tickets[0].enq == tickets[2].enq < tickets[3].enq < tickets[4].enq < tickets[5].enq


@pytest.mark.gpu
def test_a_slot_still_read_breaks_the_run_and_waits():
    tr, store, pool = _setup("cuda")
    torch.cuda.synchronize()
    reader = torch.cuda.Event()
    torch.cuda._sleep(20_000_000)                  # compute that still reads slot 1 when the copies are queued
    pool[1].add_(1)
    reader.record()
    tickets = tr.copy_in_many(pool, [(0, 0, 0, 0, None), (0, 0, 1, 1, reader), (0, 0, 2, 2, None)])
    assert tickets[0].event is not tickets[1].event
    tr.wait(0, tickets)
    torch.cuda.synchronize()
    for e in range(3):
        assert torch.equal(pool[e].cpu(), store.blob(0, e))        # the copy into slot 1 waited for its reader
