"""CPU smoke tests of `vismmoe.tools.train` (micro preset) and `vismmoe.tools.evaluate`.

What they pin down: only answer + `<|im_end|>` tokens are supervised and the prompt is exactly the inference
prompt; device-side patchify equals the image processor; worker-side positions equal `prefill_positions` on the
real model; the training experts function and batched vision attention give transformers' numbers; a tiny model
overfits a fixed batch; `--resume` continues; the export loads with `vismmoe.load` and `from_pretrained` alike.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vismmoe.errors import UserError
from vismmoe.tools import train as T
from vismmoe.data import QTYPES, make_sample, warm_cache

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def micro():
    warm_cache()
    hp = T.PRESETS["micro"]
    tok = T.make_tokenizer(hp["vocab"], hp["corpus_samples"])
    cfg = T.make_config(tok, hp["model"])
    ip = T.FAMILY.tiny_image_processor(hp["image_size"])
    return SimpleNamespace(hp=hp, tok=tok, cfg=cfg, ip=ip, maker=T.BatchMaker(tok, ip, cfg, hp["image_size"]))


def _model_inputs(batch, ip):
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                pixel_values=T.patchify(batch["images"], ip), image_grid_thw=batch["image_grid_thw"])


def test_labels_prompt_pixels_positions(micro):
    samples = [make_sample("train", i) for i in range(6)]
    b = micro.maker(samples, with_prompt=True)
    eos = micro.tok.convert_tokens_to_ids("<|im_end|>")
    ref = T.FAMILY.build_inputs(micro.tok, micro.ip, [s.image for s in samples], [s.question for s in samples])
    for r, s in enumerate(samples):
        sup = (b["labels"][r] != -100).nonzero().flatten()
        n = len(sup)
        # supervised = the last n positions = answer tokens + <|im_end|>, nothing else
        assert sup.tolist() == list(range(b["labels"].shape[1] - n, b["labels"].shape[1]))
        assert b["labels"][r, -n:].tolist() == b["input_ids"][r, -n:].tolist()
        assert b["labels"][r, -1] == eos
        assert micro.tok.decode(b["labels"][r, -n:-1]) == s.answer
        # the rest is the inference prompt (left padded), exactly as build_inputs gives it
        real = b["input_ids"][r][b["attention_mask"][r].bool()][:-n]
        assert real.tolist() == ref["input_ids"][r][ref["attention_mask"][r].bool()].tolist()
        assert (b["labels"][r][b["attention_mask"][r] == 0] == -100).all()
    assert torch.equal(b["p_input_ids"], ref["input_ids"]) and torch.equal(b["p_attention_mask"],
                                                                           ref["attention_mask"])
    assert int(b["keep"]) == max((b["labels"] != -100).sum(1).tolist()) + 1
    assert [QTYPES[q] for q in b["qtype"].tolist()] == [s.qtype for s in samples]
    # pixels: device-side patchify == the saved image processor
    assert torch.allclose(T.patchify(b["images"], micro.ip), ref["pixel_values"], atol=1e-6, rtol=0)
    assert torch.equal(b["image_grid_thw"], ref["image_grid_thw"])
    # positions computed in the workers == the family's prefill_positions on the real model
    model = T.build_model(micro.cfg, 0)
    full = {k: b[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw")}
    assert torch.equal(T.FAMILY.prefill_positions(model, full)[0], b["position_ids"])
    pos, deltas = T.FAMILY.prefill_positions(model, ref)
    assert torch.equal(pos, b["p_position_ids"]) and torch.equal(deltas, b["p_deltas"])
    # an answer token's training position == the engine's decode position for it
    r = 0
    n = int((b["labels"][r] != -100).sum())
    first = b["labels"].shape[1] - n
    mask = torch.cat([b["p_attention_mask"][r:r + 1], torch.ones(1, 1, dtype=torch.long)], dim=1)
    dec = T.FAMILY.decode_positions(mask, b["p_deltas"][r:r + 1])
    assert torch.equal(dec[:, 0, 0], b["position_ids"][:, r, first])


def test_type_mix_uses_each_sample_once_and_follows_weights():
    mix = T.TypeMix(12, list(range(len(QTYPES))))
    seen = [i for _ in range(5) for i in mix.next_batch()]
    assert len(seen) == len(set(seen)) == 60
    assert sorted(seen) == list(range(60))                      # uniform mix = the split in order, balanced
    mix.weights = T.adaptive_weights({"exist": 1.0, "color": 1.0, "shape": 1.0, "count": 0.0, "position": 1.0,
                                      "ocr": 1.0})
    batch = mix.next_batch()
    kinds = [QTYPES[i % len(QTYPES)] for i in batch]
    n_count = kinds.count("count")
    assert len(batch) == 12 and n_count == 4 == max(kinds.count(q) for q in QTYPES)
    assert not set(batch) & set(seen)
    resumed = T.TypeMix(12, list(range(len(QTYPES))), mix.next, mix.weights)
    assert not set(resumed.next_batch()) & set(seen + batch)
    only = T.TypeMix(4, [1, 5])
    assert only.next_batch() == [1, 7, 5, 11]
    # the training-only `where` type: weight 3 of 9, its own index space (negative), decoded by sample_of
    where = len(QTYPES)
    aux = T.TypeMix(9, list(range(len(QTYPES))) + [where], weights=T.adaptive_weights({q: 1.0 for q in QTYPES},
                                                                                      {"where": 3.0}))
    got = aux.next_batch() + aux.next_batch()
    neg = [i for i in got if i < 0]
    assert neg == [-1, -2, -3, -4, -5, -6]
    assert [T.sample_of("train", i).qtype for i in neg] == ["where"] * 6
    assert T.sample_of("train", -2).question == make_sample("train", 1, "where").question
    assert sorted(i for i in got if i >= 0) == list(range(12))


def test_train_experts_and_batched_vision_match_transformers(micro):
    b = micro.maker([make_sample("train", i) for i in range(3)])
    model = T.build_model(micro.cfg, 0)
    inputs = _model_inputs(b, micro.ip)

    def run(impl, batched):
        model.zero_grad()
        model.set_experts_implementation(impl)
        T.batch_vision_attention(model, batched)
        out = model(**inputs, labels=b["labels"], output_router_logits=True)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l_ref, g_ref = run("eager", False)
    l_new, g_new = run(T.TRAIN_EXPERTS, True)
    assert torch.allclose(l_ref, l_new, atol=1e-5)
    assert g_ref.keys() == g_new.keys()
    for name in g_ref:
        assert torch.allclose(g_ref[name], g_new[name], atol=1e-5, rtol=1e-4), name


def test_overfits_a_fixed_batch(micro):
    b = micro.maker([make_sample("train", i) for i in range(8)])
    model = T.build_model(micro.cfg, 0)
    model.set_experts_implementation(T.TRAIN_EXPERTS)
    T.batch_vision_attention(model)
    opt = T.make_optimizer(model, 3e-3, 0.0, CPU)
    losses = []
    for step in range(40):
        for g in opt.param_groups:
            g["lr"] = T.lr_at(step, 0.0, 3e-3, 5, 0.1)
        loss, ce, aux, ok = T.forward_loss(model, b, micro.ip, CPU)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(ce))
    assert losses[-1] < 0.25 * losses[0], losses
    assert float(aux) > 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train") / "run")
    base = ["--out", out, "--preset", "micro", "--device", "cpu", "--workers", "0", "--no-progress"]
    first = T.main(base + ["--steps", "3", "--max-shard-size", "none"])
    second = T.main(base + ["--steps", "5", "--resume", "--max-shard-size", "200KB"])   # sharded export
    return SimpleNamespace(out=out, first=first, second=second)


def test_resume_continues_and_logs(trained):
    assert trained.first["steps"] == 3 and trained.second["steps"] == 5
    assert trained.second["samples_seen"] == 5 * T.PRESETS["micro"]["batch"]
    with open(os.path.join(trained.out, T.LOG_FILE)) as f:
        recs = [json.loads(line) for line in f]
    steps = [r["step"] for r in recs if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    assert [r["resume"] for r in recs if r["event"] == "start"] == [False, True]
    for r in recs:
        if r["event"] == "train":
            assert {"loss", "aux_loss", "lr", "samples_per_s"} <= r.keys()
    state = torch.load(os.path.join(trained.out, T.STATE_FILE), map_location="cpu", weights_only=False)
    assert state["info"]["step"] == 5
    with open(os.path.join(trained.out, T.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert set(summary["val"]["by_type"]) == set(QTYPES)
    assert summary["params_experts"] + summary["params_other"] == summary["params_total"]
    assert 0 < summary["checkpoint_bytes"] <= 64 * 2**20


def test_export_loads_both_ways_with_same_answers(trained):
    import vismmoe
    from transformers import AutoTokenizer, Qwen3VLMoeForConditionalGeneration

    files = os.listdir(trained.out)
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files   # stale file removed
    assert len([f for f in files if f.endswith(".safetensors")]) > 1
    with open(os.path.join(trained.out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["dtype"] == "bfloat16" and "experts_implementation" not in json.dumps(cfg)
    samples = [make_sample("val", i) for i in range(2)]
    engine = vismmoe.load(trained.out)
    gens = engine.generate_batch([s.image for s in samples], [s.question for s in samples], max_new_tokens=4)

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(trained.out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(trained.out)
    ip = T.FAMILY.load_image_processor(trained.out)
    b = T.BatchMaker(tok, ip, model.config, T.PRESETS["micro"]["image_size"])(samples, with_prompt=True)
    answers = T.greedy_answers(model, b, ip, tok, CPU)
    assert answers == [g.text.lower() for g in gens]
    # and the logits behind them agree (not only the argmax)
    inputs = engine.prepare([s.image for s in samples], [s.question for s in samples])
    with torch.no_grad():
        ref = model(input_ids=b["p_input_ids"], attention_mask=b["p_attention_mask"],
                    position_ids=b["p_position_ids"], mm_token_type_ids=b["p_mm_token_type_ids"],
                    pixel_values=T.patchify(b["images"], ip), image_grid_thw=b["image_grid_thw"]).logits
    assert torch.allclose(engine.forward_logits(inputs), ref, atol=1e-4)


def test_evaluate_returns_scores(trained):
    import vismmoe
    from vismmoe.tools.evaluate import evaluate, majority_answers

    res = evaluate(vismmoe.load(trained.out), split="test", limit=6, batch_size=3, progress=False,
                   majority_samples=60)
    for key in ("accuracy", "n", "by_type", "majority_baseline", "majority_by_type"):
        assert key in res
    assert res["n"] == 6 and set(res["by_type"]) == set(QTYPES)
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 <= res["majority_baseline"] <= 1.0
    maj = majority_answers(60)
    assert set(maj) == set(QTYPES) and maj["exist"] in ("yes", "no")


def test_lr_schedule_warms_up_holds_and_decays_to_the_deadline():
    lr = [T.lr_at(s, p, 1.0, 10, 0.05) for s, p in ((0, 0.0), (9, 0.05), (50, 0.5), (60, 0.7), (99, 1.0))]
    assert lr[0] == pytest.approx(0.1) and lr[1] == lr[2] == lr[3] == 1.0 and lr[4] == pytest.approx(0.05)
    assert T.lr_at(105, 0.5, 1.0, 10, 0.05, warm_from=100) == pytest.approx(0.6)   # re-warm after a resume


@pytest.mark.gpu
def test_cuda_step_matches_eager_and_trains(micro, tmp_path):
    """On a GPU: the bf16 grouped experts + batched vision step agrees with transformers' eager path, and the
    CLI trains and exports (a one-minute smoke before a long run)."""
    dev = torch.device("cuda")
    b = T.to_device(micro.maker([make_sample("train", i) for i in range(4)]), dev)
    model = T.build_model(micro.cfg, 0).to(dev)
    out = {}
    for impl, batched in (("eager", False), (T.TRAIN_EXPERTS, True)):
        model.zero_grad()
        model.set_experts_implementation(impl)
        T.batch_vision_attention(model, batched)
        loss, ce, aux, ok = T.forward_loss(model, b, micro.ip, dev)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        assert torch.isfinite(grads).all()
        out[impl] = (float(loss), grads)
    assert out["eager"][0] == pytest.approx(out[T.TRAIN_EXPERTS][0], rel=2e-2)
    cos = F.cosine_similarity(out["eager"][1], out[T.TRAIN_EXPERTS][1], dim=0)
    assert cos > 0.98
    summary = T.main(["--out", str(tmp_path / "run"), "--preset", "micro", "--device", "cuda", "--steps", "5",
                      "--workers", "2", "--no-progress"])
    assert summary["steps"] == 5 and summary["experts_implementation"] == T.TRAIN_EXPERTS
    assert summary["batched_vision_attention"] is True


def test_visual_dropout_hides_tokens_exactly_like_pruning(micro):
    """Training-time visual dropout (hidden from attention, full positions kept) sees what inference sees after
    `compress.prune` keeps the same tokens: the last position's logits agree."""
    from transformers import DynamicCache

    from vismmoe.engine.compress import Selection, prune
    samples = [make_sample("train", i) for i in range(3)]
    maker = T.BatchMaker(micro.tok, micro.ip, micro.cfg, micro.hp["image_size"], visual_dropout=1.0)
    p = T.FAMILY.build_inputs(micro.tok, micro.ip, [s.image for s in samples], [s.question for s in samples])
    mm = p["mm_token_type_ids"]
    thinned = maker._thin_visual(p["attention_mask"], mm, samples)
    hidden = (p["attention_mask"] == 1) & (thinned == 0)
    assert hidden.any() and not (hidden & (mm == 0)).any()              # only visual tokens are hidden
    model = T.build_model(micro.cfg, 0).eval()
    pos, _ = T.FAMILY.prefill_positions(model, p)
    with torch.no_grad():
        train_view = model(input_ids=p["input_ids"], attention_mask=thinned, position_ids=pos,
                           mm_token_type_ids=mm, pixel_values=p["pixel_values"], image_grid_thw=p["image_grid_thw"],
                           use_cache=False, logits_to_keep=1).logits
        enc = T.FAMILY.encode(model, p)
        sels = []
        for b in range(len(samples)):
            vis = torch.nonzero(enc.visual[b]).flatten()
            sels.append(Selection(torch.nonzero(thinned[b, vis] == 1).flatten()))
        pruned = T.FAMILY.decoder_forward(model, prune(enc, sels), DynamicCache(config=model.config))
    assert torch.allclose(train_view, pruned, atol=1e-4, rtol=1e-4)


def test_background_dropout_hides_only_background_tokens(micro):
    """--background-dropout: hidden tokens are all background (no object or text box touches their cell), every
    token that shows content stays visible, and some background is hidden."""
    from vismmoe.data import content_tokens, make_sample_and_scene
    pairs = [make_sample_and_scene("train", i) for i in range(6)]
    samples, scenes = [p[0] for p in pairs], [p[1] for p in pairs]
    maker = T.BatchMaker(micro.tok, micro.ip, micro.cfg, micro.hp["image_size"], background_dropout=1.0)
    p = T.FAMILY.build_inputs(micro.tok, micro.ip, [s.image for s in samples], [s.question for s in samples])
    mm = p["mm_token_type_ids"]
    thinned = maker._thin_visual(p["attention_mask"], mm, samples, scenes)
    for b, scene in enumerate(scenes):
        vis = torch.nonzero(mm[b]).flatten()
        content = torch.from_numpy(content_tokens(scene, int(round(len(vis) ** 0.5))))
        kept = thinned[b, vis] == 1
        assert kept[content].all() and not kept[~content].all()
    assert torch.equal(maker._thin_visual(p["attention_mask"], mm, samples, None), p["attention_mask"])


def test_geometry_preset_has_the_30b_routing_geometry_and_ships():
    """`--preset geometry`: Qwen3-VL-30B-A3B's routing geometry (48 MoE layers x 128 experts, top-8; 448-1024 px =
    196-1024 visual tokens) at a width whose bf16 weights stay within 60 MiB (the size the repo can ship)."""
    hp = T.PRESETS["geometry"]
    ids = {"eos": [1], "pad": 0, "image": 5, "image_start": 6, "image_end": 7, "video": 8}
    cfg = T.FAMILY.tiny_config(ids, 1024, **hp["model"])
    t = cfg.text_config
    assert (t.num_hidden_layers, t.num_experts, t.num_experts_per_tok, t.decoder_sparse_step) == (48, 128, 8, 1)
    assert not t.mlp_only_layers
    with torch.device("meta"):
        model = T.FAMILY.model_class(cfg)
    assert 2 * sum(p.numel() for p in model.parameters()) <= 60 * 2**20
    merge = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size
    assert [(s // merge) ** 2 for s in (hp["image_sizes"][0], hp["image_sizes"][-1])] == [196, 1024]
    # the vision tower is the shipped model's shape, so --init-vision can start from it
    assert {k: hp["model"][k] for k in hp["model"] if k.startswith("vision")} == \
        {k: T.PRESETS["default"]["model"][k] for k in T.PRESETS["default"]["model"] if k.startswith("vision")}


def test_batches_take_turns_over_image_sizes_token_balanced():
    assert T.batch_sizes(256, [448, 640, 832, 1024]) == {448: 256, 640: 125, 832: 74, 1024: 49}
    assert T.batch_sizes(2, [224, 1024]) == {224: 2, 1024: 1}                  # at least one sample
    mix = T.TypeMix(8, list(range(len(QTYPES))), sizes=[224, 320])
    items = [next(iter(mix)) for _ in range(4)]
    assert [s for s, _ in items] == [224, 320, 224, 320]
    assert [len(i) for _, i in items] == [8, 4, 8, 4]
    seen = [i for _, idx in items for i in idx]
    assert len(seen) == len(set(seen))                                          # no sample used twice
    one = T.TypeMix(8, list(range(len(QTYPES))), sizes=[224]).next_item()             # one size: plain indices
    assert one == T.TypeMix(8, list(range(len(QTYPES)))).next_batch()
    val = T.val_batches_indices(12, 4, list(range(len(QTYPES))), [224, 320])
    assert [s for s, _ in val] == [224, 224, 320, 320, 320] and [len(i) for _, i in val] == [4, 2, 2, 2, 2]
    assert sorted(i for _, idx in val for i in idx) == list(range(12))
    for bad in ("448,100", "448,448", "", "a,b", "4096"):
        with pytest.raises(UserError, match="--image-sizes"):
            T.parse_image_sizes(bad)


def test_a_batch_at_each_size_has_its_visual_tokens(micro):
    maker = T.BatchMaker(micro.tok, T.FAMILY.tiny_image_processor(320), micro.cfg, 224, image_sizes=[224, 320])
    stream = T.BatchStream(maker, "train")
    for size in (224, 320):
        b = stream[(size, [0, 1])]
        assert b["images"].shape[1:3] == (size, size)
        assert int(b["mm_token_type_ids"][0].sum()) == (size // 32) ** 2


def test_init_vision_copies_the_vision_tower_and_refuses_what_is_not_a_checkpoint(trained, tmp_path):
    """A model of another decoder width starts its vision tower from a checkpoint: every tensor of equal name and
    shape copied (the mergers' projections into the decoder differ and start fresh), the decoder untouched."""
    from safetensors import safe_open
    hp = T.PRESETS["micro"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(trained.out)
    wider = T.make_config(tok, {**hp["model"], "hidden": 96, "head_dim": 32})
    model = T.build_model(wider, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    copied, fresh = T.init_vision_tower(model, trained.out)
    saved = {}
    for f in os.listdir(trained.out):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(trained.out, f), framework="pt") as st:
                saved.update({k: st.get_tensor(k) for k in st.keys()})
    params = dict(model.named_parameters())
    same = [n for n in params if n.startswith("model.visual.") and n not in fresh]
    assert copied == len(same) > 0 and fresh
    assert all(".linear_fc2." in n for n in fresh)
    for n in same:
        assert torch.equal(params[n].detach(), saved[n].float())
    for n, p in params.items():
        if not n.startswith("model.visual.") or n in fresh:
            assert torch.equal(p.detach(), before[n])
    args = T.parse_args(["--out", str(tmp_path / "o"), "--init-vision", str(tmp_path)])
    with pytest.raises(UserError, match="--init-vision"):
        T.resolve_hparams(args)
    args = T.parse_args(["--out", str(tmp_path / "o"), "--init-vision", trained.out, "--init", trained.out])
    with pytest.raises(UserError, match="--init and --init-vision"):
        T.resolve_hparams(args)


def test_training_at_two_sizes_from_a_vision_tower(trained, tmp_path):
    out = str(tmp_path / "geo")
    s = T.main(["--out", out, "--preset", "micro", "--device", "cpu", "--workers", "0", "--no-progress",
                "--steps", "2", "--image-sizes", "224,320", "--init-vision", trained.out, "--photo-backgrounds", "0.5"])
    assert s["steps"] == 2 and s["samples_seen"] == 8 + 4
    assert s["hparams"]["image_sizes"] == [224, 320] and s["hparams"]["init_vision"] == trained.out
    assert s["hparams"]["photo_backgrounds"] == 0.5
    assert T.PRESETS["geometry"]["photo_backgrounds"] == 0.3 and "photo_backgrounds" not in T.PRESETS["default"]
    for bad in ("1.5", "-1", "nan"):
        with pytest.raises(UserError, match="--photo-backgrounds"):
            T.resolve_hparams(T.parse_args(["--out", out, "--photo-backgrounds", bad]))
    with open(os.path.join(out, "preprocessor_config.json")) as f:
        assert json.load(f)["size"]["longest_edge"] == 320 * 320    # the saved processor keeps 320 px images


def test_one_schedule_over_runs_in_pieces(tmp_path):
    """--schedule-minutes: the LR schedule's progress counts the training time of every run, so a run in pieces
    (--resume) decays once, at the end of the whole; without it each run's schedule ends with the run."""
    base = ["--preset", "micro", "--device", "cpu", "--workers", "0", "--no-progress", "--max-shard-size", "none"]
    own = str(tmp_path / "own")
    T.main(base + ["--out", own, "--steps", "2"])
    state = torch.load(os.path.join(own, T.STATE_FILE), map_location="cpu", weights_only=False)
    assert state["info"]["progress"] >= 0.5                          # by steps: the last step began halfway
    span = str(tmp_path / "span")
    T.main(base + ["--out", span, "--steps", "2", "--schedule-minutes", "30"])
    first = torch.load(os.path.join(span, T.STATE_FILE), map_location="cpu", weights_only=False)["info"]
    assert 0 < first["progress"] < 0.1 and first["train_s"] > 0
    T.main(base + ["--out", span, "--steps", "4", "--resume"])
    second = torch.load(os.path.join(span, T.STATE_FILE), map_location="cpu", weights_only=False)
    assert second["hparams"]["schedule_s"] == 1800.0
    assert first["progress"] < second["info"]["progress"] < 0.2
    with open(os.path.join(span, T.LOG_FILE)) as f:
        lrs = [json.loads(line)["lr"] for line in f if '"train"' in line]
    hp = T.PRESETS["micro"]
    assert lrs[-1] == pytest.approx(hp["lr"] * min(1.0, 4 / hp["warmup"]))    # the 4th step's warm-up, no decay
    for bad in ("0", "-5", "inf", "nan"):
        with pytest.raises(UserError, match="--schedule-minutes"):
            T.resolve_hparams(T.parse_args(["--out", span, "--schedule-minutes", bad]))


@pytest.mark.parametrize("argv,says", [([], "give --minutes and/or --steps"),
                                       (["--minutes", "-1"], "--minutes -1.0 is no time"),
                                       (["--steps", "0"], "--steps 0 is too small"),
                                       (["--steps", "1", "--batch", "0"], "--batch 0 is too small"),
                                       (["--steps", "1", "--qtypes", "colour"], "unknown question type colour"),
                                       (["--steps", "1", "--device", "tpu0"], "unknown device 'tpu0'"),
                                       (["--steps", "1", "--seed", str(2**64)], "is out of range"),
                                       (["--steps", "1", "--lr", "-1"], "--lr -1.0 is out of range"),
                                       (["--steps", "1", "--image-size", "100"], "--image-size 100"),
                                       (["--steps", "1", "--experts-impl", "fast"], "--experts-impl 'fast'"),
                                       (["--steps", "1", "--photo-backgrounds", "2"], "--photo-backgrounds 2.0")])
def test_bad_arguments_are_refused_before_the_out_folder_is_made(argv, says, tmp_path):
    """Each was a traceback, a run of nothing (--minutes -1, --steps 0, --batch 0 trained on), or a check after
    --out was made."""
    out = tmp_path / "run"
    with pytest.raises(UserError, match=says.replace("(", r"\(")):
        T.main(["--out", str(out), "--preset", "micro", "--workers", "0", "--no-progress", *argv])
    assert not out.exists()


def test_an_earlier_run_is_neither_replaced_nor_resumed_with_other_options(trained, tmp_path):
    """A new run into an --out holding a run replaced its state without a word; --resume kept its saved recipe
    and silently ignored --lr, --seed, --preset, ... given with it. The command line says one line, exit 2."""
    import subprocess
    import sys
    base = ["--out", trained.out, "--preset", "micro", "--device", "cpu", "--workers", "0", "--no-progress"]
    for argv, says in (([], "holds an earlier run"), (["--resume", "--lr", "0.5"], "--lr 0.5 with --resume"),
                       (["--resume", "--seed", "7"], "--seed 7 with --resume"),
                       (["--resume", "--init", trained.out], "--init sets a new run's weights"),
                       (["--resume", "--force"], "--force starts a new run")):
        with pytest.raises(UserError, match=says):
            T.main(base + ["--steps", "9", *argv])
    out = subprocess.run([sys.executable, "-m", "vismmoe.tools.train", *base, "--steps", "9"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "holds an earlier run" in out.stderr, out.stderr
    assert T.check_args(T.parse_args(base + ["--steps", "9", "--resume"]), CPU) is None   # its own recipe: fine


def test_train_geometry_script_refuses_bad_arguments_in_one_line(tmp_path):
    """scripts/train_geometry.sh: `pack` without DEST exited 1 with bash's own message; `pack` of no run left an
    empty DEST and tar's two lines; `pack` onto an earlier pack's parts mixed stale parts into the tarball; a
    PIECE_MIN that is not a number reached the trainer's usage text."""
    import subprocess
    script = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "train_geometry.sh")
    run, dest = tmp_path / "geo", tmp_path / "dest"
    env = dict(os.environ, OUT_DIR=str(run))

    def refused(args, says, **extra):
        out = subprocess.run(["bash", script, *args], capture_output=True, text=True, env={**env, **extra},
                             timeout=60)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and says in out.stderr, out.stderr
    refused(["pack"], "pack takes one folder, DEST")
    refused(["pack", str(dest)], "holds no finished piece")
    assert not dest.exists()
    run.mkdir()
    (run / "config.json").write_text("{}")
    dest.mkdir()
    (dest / "geo.tar.part-ab").write_text("stale")
    refused(["pack", str(dest)], "already holds geo.tar.part-*")
    refused(["more"], "PIECE_MIN=nine is not a number", PIECE_MIN="nine")
    refused(["bogus"], "unknown command bogus")
