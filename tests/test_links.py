"""Link emulation: profiles parse, the virtual clock is serial, and an emulated link really paces a run
without changing its tokens."""

from __future__ import annotations

import pytest

from vismmoe import load
from vismmoe.errors import UserError
from vismmoe.offload.links import LinkClock, get_link


def test_profiles_and_custom():
    assert not get_link("real").emulated
    assert get_link("edge").gbps == 12.0 and get_link("mobile").gbps == 3.0
    custom = get_link("GBps=8,us=20")
    assert custom.gbps == 8.0 and abs(custom.latency_s - 20e-6) < 1e-12 and "emulated" in custom.label()
    for bad in ("fast", "GBps=0", "GBps=-1", "GBps=x"):
        with pytest.raises(UserError):
            get_link(bad)


def test_clock_is_serial():
    c = LinkClock(get_link("GBps=1,us=100"))
    a = c.book(1_000_000, now=10.0)                  # 1 ms + 0.1 ms
    b = c.book(1_000_000, now=10.0)                  # queued behind the first
    assert abs(a - 10.0011) < 1e-9 and abs(b - 10.0022) < 1e-9
    late = c.book(0, now=20.0)                       # an idle link starts when asked
    assert abs(late - 20.0001) < 1e-9
    assert abs(c.busy_s - 0.0023) < 1e-9


def test_emulated_link_paces_run_and_keeps_tokens(tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    ref = load(d, expert_budget="25%").generate(image_file, "What is here?", max_new_tokens=6)
    slow = load(d, expert_budget="25%", link="GBps=0.02")        # 20 MB/s
    gen = slow.generate(image_file, "What is here?", max_new_tokens=6)
    s = gen.stats
    assert gen.token_ids == ref.token_ids
    link_time = s["bytes_moved"] / 0.02e9
    assert s["e2e_s"] >= 0.95 * link_time                        # every byte paid for at the emulated speed
    assert abs(s["link_busy_s"] - link_time) < 0.01 * link_time + 1e-3
    assert "emulated" in s["link"] and 0.0 <= s["overlap_fraction"] <= 1.0
    assert s["stall_s"] > 0.5 * link_time


def test_timeline_records_compute_and_copies(tiny_dirs, image_file, tmp_path):
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="40%", prefetch="gate", link="GBps=0.5")
    eng.record_timeline()
    gen = eng.generate(image_file, "What is here?", max_new_tokens=4)
    tl = eng.last_timeline
    layers = eng.geometry.moe_layers
    assert [l for l, _, _ in tl.compute[: len(layers)]] == list(layers)          # prefill visits every layer
    assert len(tl.compute) == len(layers) * len(gen.token_ids)
    kinds = [c[4] for c in tl.copies]
    assert kinds.count("demand") == gen.stats["misses"] and kinds.count("prefetch") == gen.stats["prefetch_issued"]
    assert all(e > s >= 0 for _, _, s, e, _ in tl.copies) and all(e > s for _, s, e in tl.compute)
    spans = sorted((s, e) for _, _, s, e, _ in tl.copies)                      # one serial link: no overlap
    assert all(b[0] >= a[1] - 1e-9 for a, b in zip(spans, spans[1:]))
    art = tl.ascii(60)
    assert art.count("\n") == 4 and "#" in art and art.startswith("vision   |") and "v" in art.splitlines()[0][10:]
    assert len(tl.vision) == 1 and tl.vision[0][1] <= tl.compute[0][1]          # the encoder before the decoder
    assert (tmp_path / "t.png").exists() is False and tl.png(str(tmp_path / "t.png"))


def test_unthrottled_skips_the_emulated_wait_and_restores_it(tiny_dirs, image_file):
    """The bench's warm-up runs on the machine's own link: nothing is booked on the emulated clock inside (so
    nothing waits for it), and the emulated profile and clock are back after."""
    slow = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%", link="GBps=0.002")     # 2 MB/s
    transfer = slow.runtime.transfer
    emulated = transfer.clock
    with transfer.unthrottled():
        assert not transfer.link.emulated
        fast = slow.generate(image_file, "What is here?", max_new_tokens=2).stats
    assert fast["link"] == "real" and emulated.busy_s == 0.0
    assert transfer.clock is emulated and "emulated" in transfer.link.label()
    slow.cache.clear()
    paced = slow.generate(image_file, "What is here?", max_new_tokens=2).stats
    link_time = paced["bytes_moved"] / 0.002e9
    assert paced["bytes_moved"] == fast["bytes_moved"] > 0
    assert abs(emulated.busy_s - link_time) < 0.01 * link_time + 1e-3 and paced["e2e_s"] >= 0.95 * link_time


def test_hits_first_splits_only_when_the_wait_is_long(tiny_dirs, image_file, monkeypatch):
    """Hits are computed while misses arrive only when the misses arrive later than one grouped call takes: on a
    very slow emulated link layer calls split in two, on the machine's own link (copies of a few KiB) they do
    not. Tokens are the same either way."""
    import vismmoe.offload.runtime as R
    calls = []
    real = R.experts_on_slots
    monkeypatch.setattr(R, "experts_on_slots", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = tiny_dirs["qwen3_vl_moe"]
    want = load(d).generate(image_file, "What is here?", max_new_tokens=4).token_ids
    split = {}
    for link in ("real", "GBps=0.0005"):
        eng = load(d, expert_budget="50%", policy="predictive", link=link)
        eng.generate(image_file, "What is here?", max_new_tokens=4)          # a warm cache: hits and misses
        calls.clear()
        gen = eng.generate(image_file, "What is here?", max_new_tokens=4)
        layer_calls = len(eng.geometry.moe_layers) * len(gen.token_ids)
        split[link] = len(calls) - layer_calls
        assert gen.token_ids == want and eng.runtime.transfer.remaining_s([]) == 0.0
    assert split["real"] == 0 < split["GBps=0.0005"]
