"""Requests: batched rows give what they give alone (greedy and seeded sampling, eager and fast decode, down to
the smallest budget), each row stops on its own (EOS, token limit, stop string, cancel), text streams in deltas
that add up to the final text, and several images and turns tokenize as the chat template says."""

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vismmoe import load
from vismmoe.engine.request import GenerationRequest, TextStream, batch_inputs
from vismmoe.engine.sampling import SamplingParams

PROMPTS = ["What is in the picture?", "How many shapes are there?", "Describe it."]


def _req(image, prompt, **kw):
    return GenerationRequest.from_prompt(image, prompt, **kw)


def _alone(eng, image, prompt, **kw):
    r = _req(image, prompt, **kw)
    eng.generate_requests([r])
    return r


@pytest.mark.parametrize("decode", ["eager", "fast"])
def test_batched_rows_match_each_row_alone(decode, tiny_dirs, image_file):
    d = tiny_dirs["qwen3_vl_moe"]
    base = load(d)
    smallest = str(base.geometry.top_k * base.layout.nbytes)
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=3)
    for budget in ("100%", smallest):
        eng = load(d, decode=decode, expert_budget=budget)
        specs = [(image_file, PROMPTS[0], dict(max_new_tokens=7)),
                 (None, PROMPTS[1], dict(max_new_tokens=3)),
                 (image_file, PROMPTS[2], dict(max_new_tokens=6, sampling=seeded))]
        alone = [_alone(eng, im, p, **kw) for im, p, kw in specs]
        batch = [_req(im, p, **kw) for im, p, kw in specs]
        eng.generate_requests(batch)
        for a, b in zip(alone, batch):
            assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
        assert [len(b.token_ids) for b in batch] == [7, 3, 6]          # random weights: no EOS this early
        assert eng.cache.peak_resident * eng.layout.nbytes <= eng.budget_bytes


def test_greedy_request_is_generate(tiny_dirs, image_file):
    eng = load(tiny_dirs["glm4v_moe"], expert_budget="25%")
    gen = eng.generate(image_file, PROMPTS[0], max_new_tokens=6)
    r = _alone(eng, image_file, PROMPTS[0], max_new_tokens=6)
    assert (r.token_ids, r.text) == (gen.token_ids, gen.text)
    assert r.stats["prompt_tokens"] == r.prompt_tokens > 0 and r.stats["new_tokens"] == 6


def test_stop_string_cancel_and_stream(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="50%")
    full = _alone(eng, image_file, PROMPTS[0], max_new_tokens=10)
    assert len(full.text) > 4
    stop = full.text[2:4]
    deltas = []
    r = _alone(eng, image_file, PROMPTS[0], max_new_tokens=10, stop=(stop,), on_text=deltas.append)
    assert r.finish_reason == "stop" and r.text == full.text[:full.text.index(stop)].rstrip()
    assert "".join(deltas) == r.text
    streamed = []
    s = _alone(eng, image_file, PROMPTS[0], max_new_tokens=10, on_text=streamed.append)
    assert "".join(streamed) == s.text == full.text and s.finish_reason == "length"
    c = _req(image_file, PROMPTS[0], max_new_tokens=10)
    c.cancelled.set()
    eng.generate_requests([c])
    assert c.finish_reason == "cancelled" and len(c.token_ids) == 1


def test_text_stream_holds_back_what_may_change(tiny_dirs):
    tok = load(tiny_dirs["qwen3_vl_moe"]).tokenizer
    ids = tok("  alpha beta gamma", add_special_tokens=False)["input_ids"]
    ts = TextStream(tok, stop=("gam",))
    out = [ts.push(t) for t in ids]
    assert "".join(d for d, _ in out) == ts.text == "alpha beta"
    first = next(i for i, (_, stopped) in enumerate(out) if stopped)
    assert all(stopped and not d for d, stopped in out[first + 1:])      # nothing after the stop
    assert all("g" not in d for d, _ in out)            # "g" could have begun the stop string: never shown early


@pytest.fixture(scope="module")
def tokenizers(tiny_dirs):
    """The bundled model's tokenizer and every family's tiny one (each with its family's special tokens)."""
    from vismmoe.checkpoints import BUNDLED
    from transformers import AutoTokenizer
    from .conftest import FAMILIES, MORE_FAMILIES, TEXT_FAMILIES
    names = {"bundled": BUNDLED, **{f: tiny_dirs[f] for f in FAMILIES + MORE_FAMILIES + TEXT_FAMILIES}}
    return {n: AutoTokenizer.from_pretrained(d) for n, d in names.items()}


@pytest.fixture(scope="module")
def sentencepiece_style():
    """A tokenizer that decodes as SentencePiece ones do (Gemma's, ERNIE's): Metaspace with the leading space of a
    sequence dropped, and byte fallback (`<0xNN>` tokens, ordinary vocabulary as in those files, fused into
    characters run by run), trained here on a little text in several scripts."""
    import json
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    text = ["The red circle is left of the blue square.", "Wie viele Formen gibt es?", "這是什麼？ 紅色的圓",
            "naïve café, déjà vu", "emoji \U0001F642 and \U0001F680 text"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    spec = json.loads(tok.to_str())
    for i in range(256):                                # the byte tokens as plain vocabulary
        spec["model"]["vocab"].setdefault(f"<0x{i:02X}>", len(spec["model"]["vocab"]))
    t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>",
                                bos_token="<s>", eos_token="</s>")
    assert t.decode(t("x \u2603 y")["input_ids"]) == "x \u2603 y"     # the snowman through three byte tokens
    return t


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_text_with_sentencepiece_style_decoding(sentencepiece_style, data):
    """The same as below for a decoder that is not byte-level: a sequence's first space dropped, characters made of
    runs of byte tokens (random bytes give broken runs too, which the decoder replaces as a whole)."""
    tok = sentencepiece_style
    byte = st.integers(0, 255).map(lambda n: tok.convert_tokens_to_ids(f"<0x{n:02X}>"))
    ids = data.draw(st.lists(st.one_of(st.integers(0, len(tok) - 1), byte), max_size=30))
    _check_stream(tok, ids, data.draw(st.one_of(st.just(""), st.sampled_from(_pieces(tok.decode(
        ids, skip_special_tokens=True))))))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_incremental_text_is_the_whole_decode(tokenizers, data):
    """Any token ids, any tokenizer of the project, with or without a stop string: the released deltas add up to
    `text`, which is one decode of every id (special tokens skipped), cut before the first stop string, stripped."""
    name = data.draw(st.sampled_from(sorted(tokenizers)))
    tok = tokenizers[name]
    ids = data.draw(st.lists(st.integers(0, len(tok) - 1), max_size=40))
    _check_stream(tok, ids, data.draw(st.one_of(st.just(""), st.text(min_size=1, max_size=3),
                                                st.sampled_from(_pieces(tok.decode(ids, skip_special_tokens=True))))))


def test_incremental_text_edge_cases(tokenizers):
    """A stop string completed by a character still pending at the end; a stop string with trailing whitespace;
    long runs of tokens that decode to nothing."""
    tok = tokenizers["bundled"]
    _check_stream(tok, [101], "\ufffd")
    ids = tok("a b c", add_special_tokens=False)["input_ids"]
    _check_stream(tok, ids, "b ")
    special = tok.convert_tokens_to_ids(tok.all_special_tokens)[0]
    _check_stream(tok, ids[:1] + [special] * 200 + ids[1:], "")
    lone = next(i for i in range(len(tok)) if tok.decode([i]) == "\ufffd")     # a lone continuation byte
    _check_stream(tok, ids[:1] + [lone] * 200 + ids[1:], "")                    # past the window's 64 ids


def test_a_named_special_token_that_decodes_to_text_keeps_it():
    """A token named special (here the pad token) but added as an ordinary token is kept by the decode: the stream
    keeps it too."""
    from transformers import AutoTokenizer
    from vismmoe.checkpoints import BUNDLED
    tok = AutoTokenizer.from_pretrained(BUNDLED)
    tok.add_tokens(["<tool>"], special_tokens=False)
    tok.pad_token = "<tool>"
    tool = tok.convert_tokens_to_ids("<tool>")
    assert tool in tok.all_special_ids and "<tool>" in tok.decode([tool], skip_special_tokens=True)
    ids = tok("a b", add_special_tokens=False)["input_ids"]
    _check_stream(tok, ids + [tool] + ids, "")


def _pieces(text: str) -> list[str]:
    return [text[i:i + 2] for i in range(len(text))] or [""]


def _check_stream(tok, ids, stop):
    ts = TextStream(tok, stop=(stop,))
    deltas = []
    for t in ids:
        d, stopped = ts.push(t)
        deltas.append(d)
        if stopped:
            break
    if not ts.stopped:
        deltas.append(ts.close())
    raw = tok.decode(ids, skip_special_tokens=True).lstrip()       # stops are found before the end is stripped
    want = raw[:raw.find(stop)].rstrip() if stop and stop in raw else raw.rstrip()
    assert ts.stopped == bool(stop and stop in raw), (ids, stop)
    assert "".join(deltas) == ts.text == want, (ids, stop)


def test_several_images_and_turns(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"])
    fam = eng.family
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "first <|image_pad|>"}]},
            {"role": "assistant", "content": "a circle"},
            {"role": "user", "content": [{"type": "text", "text": "and this?"}, {"type": "image"}]}]
    r = GenerationRequest(messages=msgs, images=[image_file, image_file], max_new_tokens=4)
    eng.prepare_request(r)
    ids = r.inputs["input_ids"][0].tolist()
    image_id = fam.token_ids(eng.tokenizer)["image"]
    per_image = int(r.inputs["image_grid_thw"][0].prod()) // 4
    assert ids.count(image_id) == 2 * per_image          # the user's "<|image_pad|>" text stayed text
    assert r.inputs["image_grid_thw"].shape[0] == 2
    text = eng.tokenizer.decode(ids)
    assert text.index("Be brief.") < text.index("first") < text.index("a circle") < text.index("and this?")
    eng.generate_requests([r])
    assert len(r.token_ids) == 4


def test_batch_inputs_is_building_the_rows_together(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"])
    rows = [_req(image_file, PROMPTS[0]), _req(None, PROMPTS[1]), _req(image_file, PROMPTS[2])]
    for r in rows:
        eng.prepare_request(r)
    together = eng.prepare([image_file, None, image_file], [PROMPTS[0], PROMPTS[1], PROMPTS[2]])
    merged = batch_inputs([r.inputs for r in rows], eng.family.token_ids(eng.tokenizer)["pad"])
    assert together.keys() == merged.keys()
    for k in together:
        assert (together[k].cpu() == merged[k]).all(), k


def test_requests_from_threads_queue_on_the_engine(tiny_dirs, image_file):
    eng = load(tiny_dirs["qwen3_vl_moe"], expert_budget="25%")
    want = [_alone(eng, image_file, p, max_new_tokens=5).token_ids for p in PROMPTS]
    got = [None] * 3

    def run(i):
        got[i] = _alone(eng, image_file, PROMPTS[i], max_new_tokens=5).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def test_requests_prepared_in_many_threads_tokenize_alike(tiny_dirs, image_file):
    """A server prepares requests in several threads at once: each gets the tokens it gets alone (the fast
    tokenizer's split-special-tokens setting is shared state: unguarded, a placeholder is split into characters)."""
    eng = load(tiny_dirs["qwen3_vl_moe"])
    want = _req(image_file, PROMPTS[0])
    eng.prepare_request(want)
    reqs = [_req(image_file, PROMPTS[0] + " <|image_pad|>" * (i % 3)) for i in range(48)]

    def prep(r):
        eng.prepare_request(r)
        return r

    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as pool:
        done = list(pool.map(prep, reqs))
    image_id = eng.family.token_ids(eng.tokenizer)["image"]
    n_image = int((want.inputs["input_ids"] == image_id).sum())
    for r in done:
        assert int((r.inputs["input_ids"] == image_id).sum()) == n_image
    assert all(torch_equal(r.inputs["input_ids"], want.inputs["input_ids"]) for r in done[::3])


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_a_long_prompt_does_not_hold_up_other_requests(tiny_dirs, image_file, monkeypatch):
    """Short requests prepared while a huge prompt (refused once tokenized: over the context) tokenizes go
    through one after another meanwhile: tokenizing takes no lock that all requests share (as it was, each
    waited for the whole of the huge prompt's tokens)."""
    from vismmoe.errors import UserError
    eng = load(tiny_dirs["qwen3_vl_moe"])
    eng.prepare_request(_req(None, "warm"))                 # the encoders are made once, on first use
    chat_ids = eng.family.chat_ids
    entered, tokenized = threading.Event(), threading.Event()

    def watched(tokenizer, messages, n_visual):
        huge = len(messages[0]["content"][-1]["text"]) > 100_000
        if huge:
            entered.set()
        ids = chat_ids(tokenizer, messages, n_visual)
        if huge:
            tokenized.set()
        return ids

    monkeypatch.setattr(eng.family, "chat_ids", watched)
    failed = []

    def prep_huge():
        try:
            eng.prepare_request(_req(None, "describe the picture " * 100_000))
        except UserError:
            failed.append("huge")

    huge = threading.Thread(target=prep_huge)
    huge.start()
    assert entered.wait(timeout=60)
    small = 0
    while not tokenized.is_set():
        eng.prepare_request(_req(image_file, PROMPTS[0]))
        small += 1 if not tokenized.is_set() else 0
    huge.join()
    assert failed == ["huge"] and small >= 3, small


def test_message_text_tokenizes_as_the_tokenizer_does(tiny_dirs):
    """chat_ids' own encoders give transformers' tokens: template text with special tokens recognised, message
    text with them split into characters."""
    from vismmoe.families import get_family
    from vismmoe.families.base import _encoders
    from vismmoe.tools.tokenizer import build_tokenizer
    for name in ("qwen3_vl_moe", "glm4v_moe", "internvl", "gemma4", "ernie4_5_vl_moe"):
        fam = get_family(name)
        tok = build_tokenizer(fam)
        specials = " ".join(tok.all_special_tokens)
        template, literal = _encoders(tok)
        for text in ("hello world", f"a {specials} b", "\n\n  x\t", "ünïcødé 日本 🙂", fam.tokens.image * 3):
            assert template.encode_batch([text], add_special_tokens=False)[0].ids == \
                tok(text, add_special_tokens=False)["input_ids"]
            assert literal.encode_batch([text], add_special_tokens=False)[0].ids == \
                tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_a_template_that_refuses_the_messages_is_a_user_error(tiny_dirs):
    from vismmoe.errors import UserError
    eng = load(tiny_dirs["qwen3_vl_moe"])
    eng.tokenizer.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(UserError, match="roles must alternate"):
        eng.prepare_request(_req(None, "hi"))
