"""Chunked prefill (`--prefill-chunk`, step/loop.py `PrefillRun`) and its interleaving with the running rows'
decode (engine/running.py): every family's prompt in chunks that split its image and chunks that do not (Gemma 4:
boundaries moved to the image's end) gives the whole prefill's first-token logits within 1e-4 (fp32) and its
greedy tokens, and the same logits bit for bit at 25% and the smallest legal budget; each chunk is a prefill step
for the routing observers; in continuous batching the running rows take one decode step between two chunks of a
newcomer, every row gives what it gives alone, a newcomer cancelled mid-prefill leaves at once and one whose chunk
raises fails alone; the expert budget holds throughout."""

from __future__ import annotations

import logging

import pytest
import torch

from vismmoe import UserError, load
from vismmoe.config import runtime_options
from vismmoe.engine.request import GenerationRequest
from vismmoe.engine.running import RunningBatch
from vismmoe.families import get_family
from vismmoe.offload.trace import RoutingTrace
from vismmoe.step.loop import PrefillRun, chunk_bounds

from .conftest import FAMILIES, MORE_FAMILIES, TEXT_FAMILIES

PROMPTS = ["What is in the picture?", "How many shapes are there?"]
NEW = 6


def _image(family, image_file):
    return image_file if get_family(family).has_vision else None


def _logits(eng, inputs, chunk):
    """(first-token logits [B, V] of `eng`'s prefill in chunks of `chunk` positions (0: whole), its bounds)."""
    with torch.inference_mode(), eng._lock:
        eng.attach()
        run = PrefillRun(eng.model, eng.family, inputs, (), None, chunk)
        while not run.run_chunk():
            pass
        return run.logits[:, -1].float(), run.bounds


def _sizes(inputs) -> tuple[int, int]:
    """Chunk sizes: one whose boundaries fall at the image's start (a chunk holding image tokens after cached
    positions) and inside it, one whose first boundary is the image's end; a prompt without an image: two sizes
    that split it."""
    vis = inputs["mm_token_type_ids"][0].nonzero().flatten().tolist()
    T = inputs["input_ids"].shape[1]
    if not vis:
        return 3, T // 2
    v0, v1 = vis[0], vis[-1]
    return (v0 if v0 >= 2 else max(2, (v1 - v0) // 3)), v1 + 1


@pytest.mark.parametrize("family", FAMILIES + MORE_FAMILIES + TEXT_FAMILIES)
def test_chunked_prefill_matches_the_whole_prefill_down_to_the_smallest_budget(family, tiny_dirs, image_file):
    d = tiny_dirs[family]
    image = _image(family, image_file)
    base = load(d)
    inputs = base.prepare([image], [PROMPTS[0]])
    whole, _ = _logits(base, inputs, 0)
    want = [base.generate(image, p, NEW).token_ids for p in PROMPTS]
    vis = inputs["mm_token_type_ids"][0].nonzero().flatten().tolist()
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for n in _sizes(inputs):
        got, bounds = _logits(base, inputs, n)
        assert len(bounds) > 2, (family, n)                             # it ran in chunks
        inside = [b for b in bounds if vis and vis[0] < b <= vis[-1]]   # boundaries that split the image
        assert bool(inside) == (bool(vis) and n < vis[-1] + 1 and base.family.prefill_chunk_splits_images), bounds
        assert (got - whole).abs().max().item() < 1e-4, (family, n)
        eng = base.fork(prefill_chunk=n, expert_budget=smallest)
        assert torch.equal(_logits(eng, inputs, n)[0], got), (family, n)     # offloading stays bit-exact
        gens = [eng.generate(image, p, NEW) for p in PROMPTS]
        assert [g.token_ids for g in gens] == want, (family, n)
        assert all(g.stats["expert_bytes_peak"] <= g.stats["expert_budget_bytes"] for g in gens)
    assert eng.cache.num_slots == eng.geometry.top_k


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe", "gemma4"])
def test_a_batch_prefills_in_chunks_as_whole(family, tiny_dirs, image_file):
    """Left-padded rows of different lengths, with and without an image, chunk over the same columns."""
    d = tiny_dirs[family]
    images, prompts = [image_file, None, image_file], [PROMPTS[0], "Tell me how many shapes there are, please.", "Hi"]
    want = [g.token_ids for g in load(d).generate_batch(images, prompts, NEW)]
    eng = load(d, prefill_chunk=5, expert_budget="25%")
    assert [g.token_ids for g in eng.generate_batch(images, prompts, NEW)] == want


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "gemma4"])
def test_a_compressed_prompt_prefills_in_chunks_as_whole(family, tiny_dirs, big_image):
    """The pruned prompt (kept visual tokens, their DeepStack rows, gaps in the rope positions) in chunks."""
    d = tiny_dirs[family]
    want = load(d, compress="affinity", keep_ratio=0.3).generate(big_image, PROMPTS[0], NEW)
    got = load(d, compress="affinity", keep_ratio=0.3, prefill_chunk=5, expert_budget="25%").generate(
        big_image, PROMPTS[0], NEW)
    assert want.stats["visual_tokens_kept"] < want.stats["visual_tokens"]
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("compress", [False, True])
def test_visual_top_k_prefills_in_chunks_as_whole(compress, tiny_dirs, big_image):
    """Each chunk's visual rows are trimmed (the chunk announces its own rows), the pruned prompt's too."""
    d = tiny_dirs["qwen3_vl_moe"]
    opts = dict(visual_top_k=1, **(dict(compress="affinity", keep_ratio=0.3) if compress else {}))
    want = load(d, **opts).generate(big_image, PROMPTS[0], NEW)
    eng = load(d, prefill_chunk=5, expert_budget="25%", **opts)
    tr = RoutingTrace()
    eng.record_trace(tr)
    got = eng.generate(big_image, PROMPTS[0], NEW)
    assert got.token_ids == want.token_ids
    chunks = [s for s in tr.steps if s["kind"] == "prefill"]
    assert len(chunks) > 2 and sum(int((s["modality"] == 1).sum()) for s in chunks) == got.stats["visual_tokens_kept"]
    for s in chunks:
        for idx, _ in s["layers"].values():
            assert all(len(set(row)) == 1 for row in idx[s["modality"] == 1].tolist())


def test_each_chunk_is_a_prefill_step_for_the_routing_observers(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"], prefill_chunk=8, expert_budget="50%")
    tr = RoutingTrace()
    eng.record_trace(tr)
    inputs = eng.prepare([image_file], [PROMPTS[0]])
    eng.generate(image_file, PROMPTS[0], 3)
    T, visual = inputs["input_ids"].shape[1], int(inputs["mm_token_type_ids"].sum())
    prefill = [s for s in tr.steps if s["kind"] == "prefill"]
    assert len(prefill) == -(-T // 8) and [len(s["modality"]) for s in prefill][:-1] == [8] * (len(prefill) - 1)
    assert sum(int(s["modality"].sum()) for s in prefill) == visual
    assert all(set(s["layers"]) == set(eng.geometry.moe_layers) for s in prefill)
    assert [s["kind"] for s in tr.steps[len(prefill):]] == ["decode"] * 2


def test_chunk_bounds_keep_images_whole_where_asked():
    visual = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    assert chunk_bounds(visual, 4) == [0, 4, 8, 12]
    assert chunk_bounds(visual, 4, split_images=False) == [0, 7, 11, 12]
    assert chunk_bounds(visual, 100) == [0, 12]


def test_a_family_that_cannot_chunk_prefills_whole_said_once(tiny_dirs, image_file, monkeypatch, caplog):
    fam = get_family("glm4v_moe")
    monkeypatch.setattr(type(fam), "prefill_chunk_blocker", "its test says so")
    monkeypatch.setattr("vismmoe.engine.core._CHUNK_REFUSED", set())
    eng = load(tiny_dirs["glm4v_moe"], prefill_chunk=4)
    with caplog.at_level(logging.WARNING, logger="vismmoe"):
        assert eng.prefill_chunk == 0 and eng.fork().prefill_chunk == 0
        gen = eng.generate(image_file, PROMPTS[0], NEW)
    said = [r.getMessage() for r in caplog.records if "prefill whole" in r.getMessage()]
    assert said == ["--prefill-chunk 4: glm4v_moe prompts prefill whole (its test says so)"]
    assert gen.token_ids == load(tiny_dirs["glm4v_moe"]).generate(image_file, PROMPTS[0], NEW).token_ids


def test_a_negative_chunk_is_refused():
    with pytest.raises(UserError, match="--prefill-chunk -1 is negative"):
        runtime_options(prefill_chunk=-1)


# ---- continuous batching --------------------------------------------------------------------------------------

def _req(image, prompt, n):
    return GenerationRequest.from_prompt(image, prompt, max_new_tokens=n)


SPECS = [(True, PROMPTS[0], 9), (False, PROMPTS[1], 3), (True, "Describe it.", 6), (False, "Is there a circle?", 1),
         (True, PROMPTS[1], 5)]


def _staggered(eng, reqs, arrive_after: list[int]) -> list[tuple[int, bool]]:
    """Request i is admitted after `arrive_after[i]` steps, once no newcomer prefills; runs until every row
    finished. Returns, before each step, (rows decoding, a newcomer prefilling)."""
    rb, steps, log, pending = RunningBatch(eng), 0, [], list(zip(arrive_after, reqs))
    while pending or len(rb):
        if pending and pending[0][0] <= steps and rb.prefilling is None:
            rb.admit(pending.pop(0)[1])
        if len(rb):
            log.append((len(rb.decoding), rb.prefilling is not None))
            rb.step()
            steps += 1
        elif pending:
            steps = max(steps, pending[0][0])
    return log


def _rows_match_alone(eng, image_file):
    reqs = {k: [_req(image_file if im else None, p, n) for im, p, n in SPECS] for k in ("alone", "batch")}
    for r in reqs["alone"]:
        eng.generate_requests([r])
    log = _staggered(eng, reqs["batch"], [0, 1, 1, 2, 4])
    for a, b in zip(reqs["alone"], reqs["batch"]):
        assert (b.token_ids, b.text, b.finish_reason) == (a.token_ids, a.text, a.finish_reason)
    assert max(n for n, _ in log) >= 2                                   # rows joined a running batch
    assert sum(1 for n, p in log if n and p) >= 4                         # ... and decoded while a newcomer prefilled
    assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes
    assert all(r.stats["new_tokens"] == len(r.token_ids) for r in reqs["batch"])


@pytest.mark.parametrize("family,decode", [("qwen3_vl_moe", "eager"), ("qwen3_vl_moe", "fast"),
                                           ("qwen3_5_moe", "eager")])
def test_rows_joining_with_chunked_prefills_match_each_row_alone(family, decode, tiny_dirs, image_file):
    base = load(tiny_dirs[family])
    for budget in ("100%", str(base.geometry.top_k * base.layout.nbytes)):
        _rows_match_alone(load(tiny_dirs[family], decode=decode, prefill_chunk=6, expert_budget=budget), image_file)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "qwen3_5_moe"])
def test_gpu_rows_joining_with_chunked_prefills_match_each_row_alone(family, tiny_dirs, image_file):
    """bf16 on the GPU, the fast step (graphs, compiled) for the running rows, newcomers' chunks between its
    replays: every row gives what it gives alone with the same chunks, at every expert resident and the smallest
    budget."""
    base = load(tiny_dirs[family], device="cuda", dtype="bfloat16")
    for budget in ("100%", str(base.geometry.top_k * base.layout.nbytes)):
        _rows_match_alone(load(tiny_dirs[family], device="cuda", dtype="bfloat16", decode="auto", prefill_chunk=6,
                               expert_budget=budget), image_file)


def test_running_rows_step_between_chunks_cancel_and_failure_leave_alone(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"], prefill_chunk=8, expert_budget="50%")
    alone = _req(None, PROMPTS[1], 20)
    eng.generate_requests([alone])
    rb = RunningBatch(eng)
    a = _req(None, PROMPTS[1], 20)
    assert rb.admit(a) == [] and rb.prefilling is a                  # a prompt over 8 positions: chunks to come
    while rb.prefilling is not None:
        assert rb.step() == []
    assert rb.decoding == [a] and len(a.token_ids) == 2                # joined; its first decode step ran at once
    b = _req(image_file, PROMPTS[0], 4)
    assert rb.admit(b) == []
    with pytest.raises(RuntimeError, match="still prefilling"):
        rb.admit(_req(None, "another", 2))
    pieces = rb.newcomer.run.pieces
    assert pieces >= 4 and rb.newcomer.run.encodes                     # the vision tower: a piece of its own
    for i in range(pieces - 1):                                        # one chunk and one decode step each
        n = len(a.token_ids)
        assert rb.step() == [] and len(a.token_ids) == n + 1 and rb.newcomer.run.done == i + 1
        assert rb.stepped == [a] and len(rb) == 2
    rb.step()                                                          # its last chunk: it joins and decodes
    assert rb.prefilling is None and rb.decoding == [a, b] and len(b.token_ids) == 2

    gone = _req(image_file, PROMPTS[1], 5)
    rb.admit(gone)
    rb.step()
    gone.cancel()
    n = len(a.token_ids)
    out = rb.step()                                                    # leaves at once, before its next chunk
    assert gone in out and gone.finish_reason == "cancelled" and gone.token_ids == [] and rb.prefilling is None
    assert gone.stats["new_tokens"] == 0 and len(a.token_ids) == n + 1

    bad = _req(image_file, "bad", 5)
    rb.admit(bad)

    def broken():
        raise RuntimeError("the chunk failed")
    rb.newcomer.run.run_chunk = broken
    out = rb.step()
    assert bad in out and isinstance(bad.error, RuntimeError)
    assert bad.finish_reason == "error" and rb.prefilling is None and a in rb.decoding
    while len(rb):
        rb.step()
    assert a.token_ids == alone.token_ids and a.text == alone.text
    assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes


def test_a_newcomer_whose_join_breaks(tiny_dirs, monkeypatch):
    """Its join fails before the running rows changed: it fails alone and they go on; after (the re-batched rows
    could not start again): the step fails as a whole, the newcomer among its rows, nothing left prefilling."""
    eng = load(tiny_dirs["qwen3_vl_moe"], prefill_chunk=8)
    rb = RunningBatch(eng)
    a, b, c = (_req(None, PROMPTS[1], 30), _req(None, "Is there a circle?", 5), _req(None, "Describe it.", 5))
    rb.admit(a)
    while rb.prefilling is not None:
        rb.step()
    rb.admit(b)
    monkeypatch.setattr("vismmoe.step.rows.concat", lambda *_: (_ for _ in ()).throw(RuntimeError("no memory")))
    while rb.prefilling is not None:
        out = rb.step()
    assert out == [b] and isinstance(b.error, RuntimeError) and rb.decoding == [a]
    monkeypatch.undo()
    n = len(a.token_ids)
    rb.step()
    assert len(a.token_ids) == n + 1
    rb.admit(c)
    monkeypatch.setattr(rb, "_restart", lambda p: (_ for _ in ()).throw(RuntimeError("no memory")))
    with pytest.raises(RuntimeError, match="no memory"):
        while True:
            rb.step()
    assert rb.prefilling is None and rb.abort() == [a, c] and len(rb) == 0
