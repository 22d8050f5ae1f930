"""The grouped-matmul hot path against a plain per-expert torch reference, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vismmoe.step.grouped import experts_on_slots


class _Gate:
    @staticmethod
    def _apply_gate(h):
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u


def _reference(hidden, idx, w, gate_up, down):
    out = torch.zeros_like(hidden)
    for t in range(hidden.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            g, u = (gate_up[e] @ hidden[t]).chunk(2)
            out[t] += w[t, k] * (down[e] @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_wave_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    T, K, E, H, I = 13, 3, 6, 16, 8
    hidden = torch.randn(T, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    perm = torch.randperm(E, generator=g)                 # experts sit in arbitrary slots
    slots_gu, slots_dn = gate_up[perm.argsort()], down[perm.argsort()]
    # expert e is in slot perm[e]... slots_gu[perm[e]] == gate_up[e]
    assert torch.equal(slots_gu[perm[2]], gate_up[2])
    pairs = experts_on_slots(_Gate, hidden, perm[idx], w, slots_gu, slots_dn, None)
    got = pairs.view(T, K, H).sum(1)
    ref = _reference(hidden, idx, w, gate_up, down)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_waves_give_bit_identical_result():
    g = torch.Generator().manual_seed(7)
    T, K, E, H, I = 21, 2, 8, 16, 8
    hidden = torch.randn(T, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    whole = experts_on_slots(_Gate, hidden, idx, w, gate_up, down, None).view(T, K, H).sum(1)
    # three waves through 3 slots: experts {0,1,2}, {3,4,5}, {6,7}
    pairs = torch.full((T * K, H), float("nan"))
    for wave in ([0, 1, 2], [3, 4, 5], [6, 7]):
        lut = torch.full((E,), 3, dtype=torch.long)
        for s, e in enumerate(wave):
            lut[e] = s
        pad = 3 - len(wave)
        gu = torch.cat([gate_up[wave], torch.full((pad, 2 * I, H), float("nan"))])
        dn = torch.cat([down[wave], torch.full((pad, H, I), float("nan"))])
        pairs = experts_on_slots(_Gate, hidden, lut[idx], w, gu, dn, pairs, count=int((lut[idx] < 3).sum()))
    assert not torch.isnan(pairs).any()                   # every pair row written exactly by its wave
    assert torch.equal(pairs.view(T, K, H).sum(1), whole)


def test_one_slot_window_with_pairs_elsewhere():
    """A window of one slot (S == 1) while other pairs belong to other windows: only its pairs are written, and
    they equal the plain product (histc must not fold the sentinel rows into the slot's group)."""
    g = torch.Generator().manual_seed(3)
    T, K, H, I = 5, 2, 16, 8
    hidden = torch.randn(T, H, generator=g)
    slot_idx = torch.tensor([[0, 1], [1, 1], [0, 1], [1, 0], [1, 1]])   # 1 = sentinel (not in this window)
    w = torch.rand(T, K, generator=g)
    gu, dn = torch.randn(1, 2 * I, H, generator=g), torch.randn(1, H, I, generator=g)
    pairs = torch.zeros(T * K, H)
    out = experts_on_slots(_Gate, hidden, slot_idx, w, gu, dn, pairs, count=int((slot_idx < 1).sum()))
    idx0 = torch.zeros(T, K, dtype=torch.long)
    ref = _reference(hidden, idx0, w * (slot_idx == 0), gu, dn)
    assert torch.allclose(out.view(T, K, H).sum(1), ref, atol=1e-5)
    assert (out.view(T, K, H)[slot_idx == 1] == 0).all()


def test_gradients_match_reference():
    """Training runs the same grouped matmul with autograd: gradients to the hidden states, routing weights and
    banks equal those of the per-expert reference."""
    g = torch.Generator().manual_seed(11)
    T, K, E, H, I = 9, 2, 5, 16, 8
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    leaves = [torch.randn(T, H, generator=g), torch.rand(T, K, generator=g),
              torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)]
    grads = []
    for fn in (lambda h, w, gu, dn: experts_on_slots(_Gate, h, idx, w, gu, dn, None).view(T, K, H).sum(1),
               lambda h, w, gu, dn: _reference(h, idx, w, gu, dn)):
        xs = [x.clone().requires_grad_() for x in leaves]
        (fn(*xs) * torch.linspace(-1, 1, H)).sum().backward()
        grads.append([x.grad for x in xs])
    for got, ref in zip(*grads):
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_window_of_max_groups_runs_in_the_cuda_kernel():
    """CUDA's bf16 grouped_mm accepts fewer than 1024 groups: a full window (MAX_GROUPS slots) must run and
    match the per-expert reference."""
    from vismmoe.step.grouped import MAX_GROUPS
    g = torch.Generator().manual_seed(3)
    T, K, E, H, I = 600, 4, MAX_GROUPS, 64, 32
    hidden = torch.randn(T, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) / 8, torch.randn(E, H, I, generator=g) / 8
    dev = [x.cuda().bfloat16() for x in (hidden, gate_up, down)]
    pairs = experts_on_slots(_Gate, dev[0], idx.cuda(), w.cuda(), dev[1], dev[2], None)
    got = pairs.view(T, K, H).sum(1).float().cpu()
    ref = _reference(hidden[:8], idx[:8], w[:8], gate_up, down)
    assert torch.allclose(got[:8], ref, atol=0.1, rtol=0.05)


def test_sparse_window_gathers_used_slots_with_identical_results():
    """window_banks: a mostly empty window is gathered (CPU) and gives bit-identical pair rows to the slice."""
    from vismmoe.step.grouped import window_banks
    g = torch.Generator().manual_seed(5)
    T, K, S, H, I = 7, 2, 200, 16, 8
    from vismmoe.formats import DenseFormat
    fmt = DenseFormat(H, I, torch.float32)
    pool = torch.randn(S, fmt.numel, generator=g)
    hidden, w = torch.randn(T, H, generator=g), torch.rand(T, K, generator=g)
    inside = [3, 50, 120, 190]
    idx = torch.tensor(inside)[torch.randint(0, 4, (T, K), generator=g)]
    out = {}
    for gather in (False, True):
        gu, dn, local = window_banks(fmt, pool, inside, 3, 191, gather_sparse=gather)
        assert gu.shape[0] == (4 if gather else 188)
        slot_idx = torch.tensor([[local[int(s)] for s in row] for row in idx])
        out[gather] = experts_on_slots(_Gate, hidden, slot_idx, w, gu, dn, None)
    assert torch.equal(out[False], out[True])
