"""The text-only families (`qwen3_moe`, Qwen3-30B-A3B class; `glm4_moe`, GLM-4.5-Air class: conftest.TEXT_FAMILIES)
beyond the exactness suite (tests/test_family_exactness.py runs them on text prompts): the fast decode step gives transformers' tokens at every budget and policy; chats
(system turn, history, text parts) are formatted as Qwen3's template formats strings and answered as transformers
answers them; images are refused in one line by the engine, the CLI (before the model is read) and the server
(HTTP 400, before the image is fetched); `--compress` is refused; make-tiny and make-shape write the hub layout
(per-expert tensors) that transformers' `Qwen3MoeForCausalLM` loads; `bench --shape` takes prompt lengths;
quantized (fp8, int4) checkpoints of it offload exactly."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors import safe_open

from vismmoe import UserError, load
from vismmoe.cli.app import main
from vismmoe.step.decode import cut_at_eos
from vismmoe.families import get_family
from vismmoe.engine.request import GenerationRequest

from .conftest import TEXT_FAMILIES

FAMILY = "qwen3_moe"                # the tests that are Qwen3's alone (its sliding window, shapes, bench)
PROMPT = "What is in the picture?"
NEW = 10
CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What color is the circle?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": [{"type": "text", "text": "And the "}, {"type": "text", "text": "square?"}]}]


def _strings(messages: list[dict]) -> list[dict]:
    """The messages with text parts joined into string contents (what Qwen3's template renders)."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             "".join(p["text"] for p in m["content"])} for m in messages]


def _reference(d: str, inputs: dict, eos_ids, pad_id: int) -> list[int]:
    with open(f"{d}/config.json") as f:
        model_class = get_family(json.load(f)["model_type"]).model_class
    ref = model_class.from_pretrained(d, experts_implementation="eager").eval()
    with torch.no_grad():
        gen = ref.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           max_new_tokens=NEW, do_sample=False, eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    return cut_at_eos(gen[0, inputs["input_ids"].shape[1]:].tolist(), eos_ids)


@pytest.fixture(scope="module")
def tiny(tiny_dirs) -> str:
    return tiny_dirs[FAMILY]


@pytest.fixture(scope="module", params=TEXT_FAMILIES)
def text_tiny(request, tiny_dirs) -> str:
    """Each text-only family's tiny checkpoint in turn."""
    return tiny_dirs[request.param]


def test_fast_step_matches_transformers(text_tiny):
    """The fast step (its CPU form: same bookkeeping, experts from slots or host blobs) at 100%, 25% and top-k
    slots, every policy: transformers' greedy tokens; a batch of two and teacher forcing equal the eager step."""
    eager = load(text_tiny, decode="eager")
    want = _reference(text_tiny, eager.prepare([None], [PROMPT]), eager.eos_ids, eager.tokenizer.pad_token_id)
    for budget in ("100%", "25%", str(eager.geometry.top_k * eager.layout.nbytes)):
        base = load(text_tiny, expert_budget=budget, decode="fast")
        for policy in ("lru", "lfu", "lfru", "predictive", "none"):
            eng = base.fork(policy=policy, prefetch="gate")
            gen = eng.generate(None, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want, (budget, policy)
            assert eng.fast_step() is not None and len(eng.fast_step().step_s) == len(want) - 1
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
    assert eng.cache.num_slots == eng.geometry.top_k and eng.cache.counters.total().misses > eng.cache.num_slots
    fast = load(text_tiny, decode="fast", expert_budget="25%")
    prompts = [PROMPT, "How many shapes are there in it?"]
    assert [g.token_ids for g in fast.generate_batch([None, None], prompts, NEW)] == \
        [g.token_ids for g in eager.generate_batch([None, None], prompts, NEW)]
    inputs = fast.prepare([None], [PROMPT])
    forced = list(range(100, 100 + NEW))
    assert fast.generate_ids(inputs, NEW, forced)[0] == eager.generate_ids(inputs, NEW, forced)[0]


def test_sliding_window_checkpoints_decode_on_the_eager_step(tiny, tmp_path):
    """A checkpoint with `use_sliding_window` (a window shorter than the prompt): the fast step, whose decode
    attention reads the whole KV cache, is refused in one line; the eager step gives transformers' tokens."""
    import shutil
    d = tmp_path / "sw"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, use_sliding_window=True, sliding_window=4)))
    with pytest.raises(UserError, match="sliding-window"):
        load(str(d), decode="fast").generate(None, PROMPT, max_new_tokens=3)
    eng = load(str(d), expert_budget="25%")
    inputs = eng.prepare([None], [PROMPT])
    assert inputs["input_ids"].shape[1] > 4
    want = _reference(str(d), inputs, eng.eos_ids, eng.tokenizer.pad_token_id)
    assert eng.generate(None, PROMPT, max_new_tokens=NEW).token_ids == want and eng.fast_step() is None
    assert want != _reference(tiny, inputs, eng.eos_ids, eng.tokenizer.pad_token_id)    # the window matters


def test_chat_is_formatted_and_answered_as_transformers_does(text_tiny):
    """Text parts are joined (the template, like Qwen3's, renders only string contents): the prompt is the
    template's own tokens for the string messages, and the answer is transformers' greedy answer."""
    eng = load(text_tiny, expert_budget="25%")
    req = GenerationRequest(messages=CHAT, max_new_tokens=NEW)
    eng.prepare_request(req)
    text = eng.tokenizer.apply_chat_template(_strings(CHAT), add_generation_prompt=True, tokenize=False)
    want_ids = eng.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    assert "square?" in text and req.inputs["input_ids"].tolist() == want_ids["input_ids"].tolist()
    assert not req.inputs["mm_token_type_ids"].any()
    eng.generate_requests([req])
    assert req.token_ids == _reference(text_tiny, want_ids, eng.eos_ids, eng.tokenizer.pad_token_id)


def test_images_are_refused_by_the_engine(text_tiny, image_file):
    eng = load(text_tiny)
    for call in (lambda: eng.generate(image_file, PROMPT),
                 lambda: eng.prepare_request(GenerationRequest.from_prompt(image_file, PROMPT)),
                 lambda: eng.prepare_request(GenerationRequest(
                     messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                     images=[]))):
        with pytest.raises(UserError, match="text-only model") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="text-only model"):
        load(text_tiny, compress="affinity", keep_ratio=0.5)


def test_cli_refuses_an_image_before_reading_the_model(text_tiny, image_file, capsys, monkeypatch):
    import vismmoe.engine.loading as engine_mod

    def no_load(*a, **k):
        raise AssertionError("the model was read")

    monkeypatch.setattr(engine_mod, "load", no_load)
    code = main(["generate", "--model", text_tiny, "--image", image_file, "--prompt", PROMPT])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "text-only model" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(["generate", "--model", text_tiny, "--prompt", PROMPT, "--max-new-tokens", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]["visual_tokens"] == 0
    assert main(["generate", "--model", text_tiny, "--prompt", PROMPT, "--compress", "affinity",
                 "--keep-ratio", "0.5"]) == 2
    assert "text-only model" in capsys.readouterr().err


def test_server_chats_and_refuses_images(text_tiny):
    from .test_serve import Server
    eng = load(text_tiny, expert_budget="25%")
    srv = Server(eng, max_batch=2)
    try:
        r = srv.post({"model": "vqa-moe", "messages": CHAT, "max_tokens": NEW, "temperature": 0})
        assert r.status_code == 200, r.text
        req = GenerationRequest(messages=CHAT, max_new_tokens=NEW)
        eng.generate_requests([req])
        assert r.json()["choices"][0]["message"]["content"] == req.text
        # a remote URL (not allowed by default): refused for being an image, not for where it is
        bad = {"model": "vqa-moe", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}},
            {"type": "text", "text": PROMPT}]}]}
        r = srv.post(bad)
        assert r.status_code == 400 and "text-only model" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == "messages.0.content.0.image_url.url", r.text
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    finally:
        srv.close()


def test_make_tiny_writes_the_hub_layout(text_tiny):
    l = load(text_tiny).geometry.moe_layers[0]                  # GLM's first layer is dense
    with safe_open(f"{text_tiny}/model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice(f"model.layers.{l}.mlp.experts.7.gate_proj.weight").get_shape() == [48, 64]
        assert f.get_slice(f"model.layers.{l}.mlp.experts.7.down_proj.weight").get_shape() == [64, 48]
        assert f.get_slice(f"model.layers.{l}.mlp.gate.weight").get_shape() == [8, 64]
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys)
    import os
    assert not os.path.exists(f"{text_tiny}/preprocessor_config.json")


def test_make_shape_writes_what_transformers_loads(tmp_path, capsys):
    """make-shape of the text shape: per-expert tensors, `architectures`, the published `num_experts`; transformers'
    `Qwen3MoeForCausalLM` loads it, and vismmoe (float32, 25%) gives its greedy tokens."""
    out = tmp_path / "s"
    assert main(["make-shape", "--shape", "tiny-qwen3-moe", "--layers", "2", "--out", str(out), "--device", "cpu"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 16
    assert "num_local_experts" not in cfg and not (out / "preprocessor_config.json").exists()
    names = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.15.up_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    eng = load(str(out), dtype="float32", expert_budget="25%")
    inputs = eng.prepare([None], [PROMPT])
    ref = get_family(FAMILY).model_class.from_pretrained(str(out), dtype=torch.float32,
                                                         experts_implementation="eager").eval()
    with torch.no_grad():
        gen = ref.generate(**eng.family.model_inputs(inputs), max_new_tokens=NEW, do_sample=False,
                           eos_token_id=sorted(eng.eos_ids), pad_token_id=eng.tokenizer.pad_token_id)
    want = cut_at_eos(gen[0, inputs["input_ids"].shape[1]:].tolist(), eng.eos_ids)
    assert eng.generate(None, PROMPT, max_new_tokens=NEW).token_ids == want


def test_bench_shape_takes_prompt_lengths(tmp_path, capsys):
    code = main(["bench", "--shape", "tiny-qwen3-moe", "--prompt-tokens", "12,20", "--max-new-tokens", "3",
                 "--link", "edge", "--budgets", "25%", "--reps", "1", "--systems", "ondemand,vismmoe",
                 "--out", str(tmp_path), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and len(res["rows"]) == 2 and "prompts of 12,20 tokens" in res["title"]
    assert {r["compress"] for r in res["rows"]} == {"none@1"}        # no visual tokens to compress
    for argv, needle in ((["--image-sides", "64"], "takes no --image-sides"),
                         (["--prompt-tokens", "0"], "bad --prompt-tokens")):
        assert main(["bench", "--shape", "tiny-qwen3-moe", *argv, "--out", str(tmp_path)]) == 2
        assert needle in capsys.readouterr().err
    assert main(["bench", "--shape", "tiny-qwen3", "--prompt-tokens", "64", "--out", str(tmp_path)]) == 2
    assert "--prompt-tokens is for text-only shapes" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["fp8", "int4:group=16,sym=0"])
def test_quantized_text_checkpoints(spec, text_tiny, tmp_path):
    """`vismmoe quantize` of the hub layout loads into the blobs of a load-time quantization, and quantized
    experts offload exactly down to top-k slots (fast step included)."""
    from vismmoe.tools.quantize import quantize_checkpoint
    d = str(tmp_path / "q")
    quantize_checkpoint(text_tiny, spec, d)
    at_load, from_file = load(text_tiny, expert_format=spec), load(d)
    assert from_file.layout.spec() == at_load.layout.spec()
    assert all(torch.equal(a, b) for a, b in zip(at_load.store.buffers, from_file.store.buffers))
    want = from_file.generate(None, PROMPT, max_new_tokens=NEW).token_ids
    least = str(from_file.geometry.top_k * from_file.layout.nbytes)
    for opts in (dict(policy="predictive", prefetch="gate"), dict(decode="fast")):
        assert load(d, expert_budget=least, **opts).generate(None, PROMPT, max_new_tokens=NEW).token_ids == want


@pytest.mark.gpu
def test_gpu_fast_step_exact_across_budgets_and_graphs(text_tiny):
    """bf16 on the GPU, a text prompt: the captured, compiled fast step gives the tokens of itself with every
    expert resident at every budget and policy; graph replay gives the tokens of the same step run eagerly."""
    base = load(text_tiny, device="cuda", dtype="bfloat16", decode="fast")
    base.runtime.preload([(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)])
    want = base.generate(None, PROMPT, max_new_tokens=NEW).token_ids
    fs = base.fast_step()
    assert fs.graphs and fs.compiled and any(b.graph is not None for b in fs.sg.buckets.values())
    plain = load(text_tiny, device="cuda", dtype="bfloat16", decode="fast", compile=False)
    plain.runtime.preload([(l, e) for l in base.geometry.moe_layers for e in range(base.geometry.num_experts)])
    plain.fast_step().graphs = False
    eager_tokens = plain.generate(None, PROMPT, max_new_tokens=NEW).token_ids
    plain.fast_step().graphs = True
    assert plain.generate(None, PROMPT, max_new_tokens=NEW).token_ids == eager_tokens
    for budget in ("25%", str(base.geometry.top_k * base.layout.nbytes)):
        for policy in ("lru", "predictive", "none"):
            eng = base.fork(expert_budget=budget, policy=policy, prefetch="gate")
            gen = eng.generate(None, PROMPT, max_new_tokens=NEW)
            assert gen.token_ids == want, (budget, policy)
            assert gen.stats["expert_bytes_peak"] <= gen.stats["expert_budget_bytes"]
