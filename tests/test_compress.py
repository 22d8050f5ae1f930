"""Visual-token compression: ratio 1.0 is exact, kept indices are valid, positions and rope delta after pruning
match a reference built by hand, and every compressor runs on batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from vismmoe import load
from vismmoe.step.decode import cut_at_eos
from vismmoe.engine.compress import COMPRESSORS, VisualContext, keep_count

from .conftest import FAMILIES, prune_every_third

PROMPT = "What is in the picture?"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_ratio_one_is_exact(family, name, tiny_dirs, big_image):
    eng = load(tiny_dirs[family])
    inputs = eng.prepare([big_image], [PROMPT])
    plain = eng.model(**inputs, position_ids=eng.family.prefill_positions(eng.model, inputs)[0],
                      use_cache=False, logits_to_keep=1).logits
    enc = eng.pruned_prompt(inputs, COMPRESSORS[name](), 1.0)
    with torch.no_grad():
        got = eng.family.decoder_forward(eng.model, enc, DynamicCache(config=eng.model.config))
    assert torch.equal(got, plain)
    ref = eng.generate(big_image, PROMPT, max_new_tokens=6).token_ids
    assert eng.fork(compress=name, keep_ratio=1.0).generate(big_image, PROMPT, max_new_tokens=6).token_ids == ref


@pytest.mark.parametrize("name", sorted(COMPRESSORS))
@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.11])
def test_kept_indices_are_valid(name, ratio, tiny_dirs, big_image):
    eng = load(tiny_dirs["qwen3_vl_moe"])
    enc = eng.family.encode(eng.model, eng.prepare([big_image], [PROMPT]))
    vis = enc.embeds[0][enc.visual[0]]
    ctx = VisualContext(embeds=vis, grid=enc.grids[0], text=enc.embeds[0][~enc.visual[0]],
                        keep=keep_count(vis.shape[0], ratio), probe=eng.family.router_probe(eng.model),
                        query_key=eng.family.query_key(eng.model))
    sel = COMPRESSORS[name]().select(ctx)
    k = sel.keep
    assert k.dtype == torch.long and k.ndim == 1
    assert torch.all(k[1:] > k[:-1]) and k.min() >= 0 and k.max() < vis.shape[0]          # sorted, unique, in range
    if name == "pool":
        assert abs(len(k) - ctx.keep) <= max(2, ctx.keep // 4)
        assert sel.groups is not None and set(sel.groups.tolist()) == set(range(len(k)))
    else:
        assert len(k) == ctx.keep


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_positions_and_decode_match_hand_built_reference(family, tiny_dirs, big_image):
    eng = load(tiny_dirs[family])
    inputs = eng.prepare([big_image], [PROMPT])
    enc, keep, pruned, order, every3 = prune_every_third(eng, inputs)
    # --- hand-built reference: gather by hand, positions from the unpruned rope rows, explicit decode positions
    emb = enc.embeds[:, order]
    rope = enc.positions[1:, :, order]
    pos = torch.cat([torch.arange(len(order))[None, None], rope])
    extras = {}
    if enc.deepstack is not None:
        extras = {"visual_pos_masks": enc.visual[:, order], "deepstack_visual_embeds": [d[keep] for d in enc.deepstack]}
    assert torch.equal(pruned.positions, pos) and torch.equal(pruned.embeds, emb)
    assert int(pruned.deltas[0, 0]) == int(rope.max()) + 1 - len(order)
    lm = eng.model.model.language_model
    cache = DynamicCache(config=eng.model.config)
    with torch.no_grad():
        h = lm(inputs_embeds=emb, position_ids=pos, past_key_values=cache, use_cache=True, **extras)
        toks = [int(eng.model.lm_head(h.last_hidden_state[:, -1]).argmax(-1))]
        next_rope = int(rope.max()) + 1
        for step in range(5):
            p = torch.tensor([[[len(order) + step]], [[next_rope + step]], [[next_rope + step]], [[next_rope + step]]])
            h = lm(inputs_embeds=eng.model.get_input_embeddings()(torch.tensor([[toks[-1]]])), position_ids=p,
                   past_key_values=cache, use_cache=True)
            toks.append(int(eng.model.lm_head(h.last_hidden_state[:, -1]).argmax(-1)))
    # --- the engine's compressed generation with the same keep set
    eng.compressor = every3
    eng.rc = eng.rc.__class__(**{**eng.rc.__dict__, "compress": "every3", "keep_ratio": 0.34})
    got = eng.generate(big_image, PROMPT, max_new_tokens=6)
    assert got.token_ids == cut_at_eos(toks, eng.eos_ids)
    assert got.stats["visual_tokens_kept"] == len(keep)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_batch_matches_single(family, name, tiny_dirs, big_image, image_file):
    eng = load(tiny_dirs[family], compress=name, keep_ratio=0.5)
    prompts = [PROMPT, "How many shapes are there?"]
    batch = eng.generate_batch([big_image, image_file], prompts, max_new_tokens=5)
    single = [eng.generate(img, p, max_new_tokens=5) for img, p in zip([big_image, image_file], prompts)]
    if name == "random":                  # seeds follow the row index: row 1 alone would use seed 0
        single[1] = None
    for b, s in zip(batch, single):
        if s is not None:
            assert b.token_ids == s.token_ids
    assert batch[0].stats["visual_tokens_kept"] < batch[0].stats["visual_tokens"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", FAMILIES)
def test_gpu_compressors(family, tiny_dirs, image_file):
    """On the GPU: every compressor at ratio 1.0 gives the unpruned tokens; at 0.33 it keeps a third of the
    visual tokens under the smallest budget, alone and in a batch of two."""
    d = tiny_dirs[family]
    q = "What is in the picture?"
    base = load(d, device="cuda", dtype="bfloat16")
    want = base.generate(image_file, q, max_new_tokens=6).token_ids
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for name in COMPRESSORS:
        assert base.fork(compress=name, keep_ratio=1.0).generate(image_file, q, max_new_tokens=6).token_ids == want
        eng = base.fork(compress=name, keep_ratio=0.33, expert_budget=smallest)
        s = eng.generate(image_file, q, max_new_tokens=6).stats
        assert 0 < s["visual_tokens_kept"] < s["visual_tokens"] and s["expert_bytes_peak"] <= s["expert_budget_bytes"]
        gens = eng.generate_batch([image_file, image_file], [q, "Is there a circle?"], max_new_tokens=4)
        assert len(gens) == 2 and all(g.token_ids for g in gens)


def test_affinity_gamma_spreads_look_alike_tokens():
    """With gamma > 0, identical tokens far apart in the grid are not duplicates: among 16 identical tokens the
    picks go to the corners (without it, all tie and the first two indices are taken)."""
    from vismmoe.engine.compress import AffinityCompressor, _grid_distance
    d = _grid_distance((1, 4, 4), 16)
    assert d.shape == (16, 16) and np.allclose(d, d.T) and np.allclose(np.diag(d), 0)
    assert np.isclose(d[0, 15], 1.0) and np.isclose(d[0, 3], 2 ** -0.5)
    ctx = VisualContext(embeds=torch.ones(16, 8), grid=(1, 4, 4), text=torch.zeros(1, 8), keep=2,
                        probe=lambda x: [torch.zeros(x.shape[0], 1, dtype=torch.long)])
    first, second = AffinityCompressor(gamma=1.5).select(ctx).keep.tolist()
    assert first == 0 and second in (3, 12, 15)
    assert AffinityCompressor().select(ctx).keep.tolist() == [0, 1]


def test_farthest_first_is_max_min_diversity():
    """The shared greedy (DivPrune's selection) against a plain reference: least typical token first, then the
    token with the largest distance to its most similar kept token; `typical_cap` keeps the distance to the image
    mean as a cap (affinity's variant), which changes the picks."""
    import numpy as np

    from vismmoe.engine.compress import _farthest_first

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T

    def reference(keep, cap):
        chosen = [int(np.argmax(1.0 - sim.mean(axis=1)))]
        while len(chosen) < keep:
            best, arg = -np.inf, None
            for t in range(len(sim)):
                if t in chosen:
                    continue
                d = min(1.0 - sim[t, c] for c in chosen)
                if cap:
                    d = min(d, 1.0 - sim[t].mean())
                if d > best:
                    best, arg = d, t
            chosen.append(arg)
        return chosen

    for keep in (1, 5, 13):
        assert _farthest_first(sim, keep) == reference(keep, cap=False)
        assert _farthest_first(sim, keep, typical_cap=True) == reference(keep, cap=True)
    assert _farthest_first(sim, 13) != _farthest_first(sim, 13, typical_cap=True)
