"""Visual-token compression for the families of conftest.MORE_FAMILIES: a ratio of 1.0 is exact; pruning keeps
each kept token's unpruned rope position (1-D or M-RoPE), checked against a reference gathered by hand and decoded
through the family's text model directly; and a compressed request under the smallest budget gives the tokens of
the same pruned prompt run through transformers with every expert resident. The pruned prompt's decoder call
(`Family.decoder_forward`) is the model's own forward at a ratio of 1.0, so the hand-built reference runs the
prompt gathered by hand through it and decodes with the model's forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from vismmoe import load
from vismmoe.engine.compress import COMPRESSORS
from vismmoe.step.decode import cut_at_eos
from vismmoe.families import get_family

from .conftest import MORE_FAMILIES, prune_every_third

PROMPT = "What is in the picture?"


def _cache(model):
    return DynamicCache(config=model.config)


@torch.no_grad()
def _greedy_from(model, family, enc, n: int, eos) -> list[int]:
    """Greedy tokens of an encoded (pruned) prompt on `model`: transformers' decoder, explicit positions."""
    cache = _cache(model)
    logits = family.decoder_forward(model, enc, cache)
    toks, mask = [int(logits[0, -1].argmax())], enc.mask
    for _ in range(n - 1):
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        pos = family.position_ids(family.decode_positions(mask, enc.deltas))
        out = model(input_ids=torch.tensor([[toks[-1]]]), attention_mask=mask, past_key_values=cache,
                    position_ids=pos, use_cache=True)
        toks.append(int(out.logits[0, -1].argmax()))
    return cut_at_eos(toks, eos)


@pytest.mark.parametrize("family", MORE_FAMILIES)
@pytest.mark.parametrize("name", ["affinity", "pool", "textrel"])
def test_ratio_one_is_exact(family, name, tiny_dirs, big_image):
    eng = load(tiny_dirs[family])
    inputs = eng.prepare([big_image], [PROMPT])
    pos, _ = eng.family.prefill_positions(eng.model, inputs)
    with torch.no_grad():
        plain = eng.model(**eng.family.model_inputs(inputs), position_ids=eng.family.position_ids(pos),
                          use_cache=False, logits_to_keep=1).logits
        got = eng.family.decoder_forward(eng.model, eng.pruned_prompt(inputs, COMPRESSORS[name](), 1.0),
                                         _cache(eng.model))
    assert torch.equal(got, plain)
    ref = eng.generate(big_image, PROMPT, max_new_tokens=6).token_ids
    assert eng.fork(compress=name, keep_ratio=1.0).generate(big_image, PROMPT, max_new_tokens=6).token_ids == ref


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_pruned_positions_and_decode_match_hand_built_reference(family, tiny_dirs, big_image):
    eng = load(tiny_dirs[family])
    inputs = eng.prepare([big_image], [PROMPT])
    enc, keep, pruned, order, every3 = prune_every_third(eng, inputs)
    # --- by hand: gather embeddings, per-token inputs and the UNPRUNED rope rows of the kept order; the text row
    # renumbered; decode positions written out
    rope = enc.positions[1:, :, order]
    nxt = int(rope.max()) + 1
    hand = replace(enc, embeds=enc.embeds[:, order], mask=torch.ones(1, len(order), dtype=enc.mask.dtype),
                   visual=enc.visual[:, order], positions=torch.cat([torch.arange(len(order))[None, None], rope]),
                   deltas=torch.tensor([[nxt - len(order)]]),
                   per_token={k: t[:, order] for k, t in enc.per_token.items()},
                   deepstack=[d[keep] for d in enc.deepstack] if enc.deepstack is not None else None)
    for name in ("embeds", "mask", "visual", "positions", "deltas"):
        assert torch.equal(getattr(pruned, name), getattr(hand, name)), name
    assert pruned.per_token.keys() == hand.per_token.keys()
    assert all(torch.equal(pruned.per_token[k], hand.per_token[k]) for k in hand.per_token)
    if rope.shape[0] == 1:                  # 1-D: the prompt ends in text, so decode goes on at its length
        assert nxt == inputs["input_ids"].shape[1]
    fam = eng.family
    cache = _cache(eng.model)
    mask = hand.mask
    with torch.no_grad():
        toks = [int(fam.decoder_forward(eng.model, hand, cache)[0, -1].argmax())]
        for step in range(5):
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            p = torch.cat([torch.tensor([[[len(order) + step]]]), torch.full((rope.shape[0], 1, 1), nxt + step)])
            out = eng.model(input_ids=torch.tensor([[toks[-1]]]), attention_mask=mask, past_key_values=cache,
                            position_ids=fam.position_ids(p), use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    eng.compressor = every3
    eng.rc = eng.rc.__class__(**{**eng.rc.__dict__, "compress": "every3", "keep_ratio": 0.34})
    got = eng.generate(big_image, PROMPT, max_new_tokens=6)
    assert got.token_ids == cut_at_eos(toks, eng.eos_ids)
    assert got.stats["visual_tokens_kept"] == len(keep)


@pytest.mark.parametrize("family", MORE_FAMILIES)
@pytest.mark.parametrize("name", ["affinity", "pool", "divprune"])
def test_compressed_tokens_equal_the_pruned_prompt_without_offloading(family, name, tiny_dirs, big_image):
    d = tiny_dirs[family]
    fam = get_family(family)
    ref = fam.model_class.from_pretrained(d, experts_implementation="eager").eval()
    base = load(d)
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    eng = base.fork(expert_budget=smallest, compress=name, keep_ratio=0.33, prefetch="gate", fixed_lookahead=True)
    enc = eng.pruned_prompt(eng.prepare([big_image], [PROMPT]))
    want = _greedy_from(ref, fam, enc, 8, eng.eos_ids)
    gen = eng.generate(big_image, PROMPT, max_new_tokens=8)
    assert gen.token_ids == want
    assert 0 < gen.stats["visual_tokens_kept"] < gen.stats["visual_tokens"]
    assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"] and gen.stats["misses"] > 0


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_compressed_batch_matches_single(family, tiny_dirs, big_image, image_file):
    eng = load(tiny_dirs[family], compress="affinity", keep_ratio=0.5, expert_budget="25%")
    prompts = [PROMPT, "How many shapes are there?"]
    batch = eng.generate_batch([big_image, image_file], prompts, max_new_tokens=5)
    single = [eng.generate(img, p, max_new_tokens=5) for img, p in zip([big_image, image_file], prompts)]
    assert [b.token_ids for b in batch] == [s.token_ids for s in single]
    assert batch[0].stats["visual_tokens_kept"] < batch[0].stats["visual_tokens"]


@pytest.mark.gpu
@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_gpu_compressed_tokens_equal_across_budgets(family, tiny_dirs, big_image):
    """On the GPU (bf16): a compressed request under the smallest budget gives the tokens of the same compressed
    request with every expert resident, for the router-aware and the pooling compressor."""
    base = load(tiny_dirs[family], device="cuda", dtype="bfloat16")
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    for name in ("affinity", "pool"):
        want = base.fork(compress=name, keep_ratio=0.33).generate(big_image, PROMPT, max_new_tokens=6)
        got = base.fork(compress=name, keep_ratio=0.33, expert_budget=smallest, prefetch="gate")
        gen = got.generate(big_image, PROMPT, max_new_tokens=6)
        assert gen.token_ids == want.token_ids, (family, name)
        assert 0 < gen.stats["visual_tokens_kept"] < gen.stats["visual_tokens"]
        assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]


def test_deepseek_visual_tokens_are_fixed_per_view(tiny_dirs, big_image, image_file):
    """DeepSeek-OCR-2's visual token count is set by its learned queries: 256 for the global view and 144 a local
    tile (2 to 6 tiles for an image larger than a tile, none otherwise) plus one view separator."""
    eng = load(tiny_dirs["deepseek_ocr2"])
    small = eng.prepare([image_file], [PROMPT])
    assert int(small["mm_token_type_ids"].sum()) == 256 + 1 and int(small["num_local_patches"][0]) == 0
    big = eng.prepare([big_image], [PROMPT])
    tiles = int(big["num_local_patches"][0])
    assert 2 <= tiles <= 6 and int(big["mm_token_type_ids"].sum()) == 144 * tiles + 256 + 1
    assert tuple(big["pixel_values_local"].shape[:2]) == (tiles, 3)
