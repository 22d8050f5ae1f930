"""A damaged or self-contradicting checkpoint is one UserError at load, before any weight is read where the headers
tell: config.json against itself (top-k, sparse step, image token id) and against the weights (vocabulary,
layers, shapes), an index naming a tensor its shard lacks, NaN/Inf weights (sampled by default, every value with
`check_weights="full"`, not at all with "off"), special files and folders where files should be, and a chat
template that cannot render. Each used to be a traceback deep in the model code or ran silently wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from vismmoe import load
from vismmoe.errors import UserError

from .conftest import in_thread
from .test_store import _rewrite

EXPERTS = "model.language_model.layers.{}.mlp.experts"


def _copy(tiny_dirs, tmp_path, name, family="qwen3_vl_moe") -> str:
    dst = str(tmp_path / name)
    shutil.copytree(tiny_dirs[family], dst)
    return dst


def _edit_config(d: str, edit) -> str:
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)
    return d


def _text(key, value):
    return lambda cfg: cfg["text_config"].__setitem__(key, value)


CONFIG_CASES = {
    # (family, edit, what the error says)
    "top_k_above_experts": ("qwen3_vl_moe", _text("num_experts_per_tok", 9), "top-k (experts per token, of 8) is 9"),
    "top_k_zero": ("qwen3_vl_moe", _text("num_experts_per_tok", 0), "top-k (experts per token, of 8) is 0"),
    "top_k_negative": ("glm4v_moe", _text("num_experts_per_tok", -2), "top-k (experts per token, of 8) is -2"),
    "no_experts": ("qwen3_vl_moe", _text("num_local_experts", 0), "experts per layer is 0"),
    "sparse_step_zero": ("qwen3_vl_moe", _text("decoder_sparse_step", 0), "decoder_sparse_step is 0"),
    "dense_layer_out_of_range": ("qwen3_vl_moe", _text("mlp_only_layers", [7]), "mlp_only_layers[0] is 7"),
    "first_dense_negative": ("glm4v_moe", _text("first_k_dense_replace", -1), "first_k_dense_replace is -1"),
    "image_token_outside_vocab": ("qwen3_vl_moe", lambda c: c.__setitem__("image_token_id", 10_000),
                                  "image_token_id 10000 is outside the vocabulary of 400"),
    "vocab_not_the_embedding": ("qwen3_vl_moe", _text("vocab_size", 512), "says vocab_size 512, but the embedding"),
    "fewer_layers_than_weights": ("qwen3_vl_moe", _text("num_hidden_layers", 3),
                                  "says num_hidden_layers 3, but the weights hold decoder layers 0 to 3"),
    "hidden_not_the_weights": ("glm4v_moe", _text("hidden_size", 32), "but config.json gives the model"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_contradictions_are_refused_at_load(tiny_dirs, tmp_path, case):
    family, edit, needle = CONFIG_CASES[case]
    d = _edit_config(_copy(tiny_dirs, tmp_path, case, family), edit)
    with pytest.raises(UserError, match="config.json") as err:
        load(d, expert_budget="50%")
    assert needle in str(err.value), str(err.value)


def test_fewer_layers_than_weights_is_refused_before_any_weight_is_read(tiny_dirs, tmp_path, monkeypatch):
    """Found from the headers: no tensor is read."""
    from vismmoe.offload.store import CheckpointReader
    d = _edit_config(_copy(tiny_dirs, tmp_path, "layers"), _text("num_hidden_layers", 2))

    def no_reads(self, key, index=None):
        raise AssertionError(f"read {key} before the config was checked")
    monkeypatch.setattr(CheckpointReader, "_pread", no_reads)
    with pytest.raises(UserError, match="num_hidden_layers 2"):
        load(d)


def _poison(d: str, key: str, value: float, index=(0,)) -> str:
    path = os.path.join(d, "model.safetensors")
    sd = load_file(path)
    t = sd[key]
    t.view(-1)[index[0]] = value
    save_file(sd, path, metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("tier,fmt", [("host", None), ("disk", None), ("host", "bf16"), ("disk", "bf16")])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(tiny_dirs, tmp_path, tier, fmt):
    d = _poison(_copy(tiny_dirs, tmp_path, "nan"), "model.language_model.norm.weight", float("nan"), (5,))
    with pytest.raises(UserError, match=r"weight model.language_model.norm.weight in .* holds NaN \(1 of 64"):
        load(d, expert_tier=tier)
    d = _poison(_copy(tiny_dirs, tmp_path, "inf"), EXPERTS.format(2) + ".down_proj", float("inf"), (4000,))
    with pytest.raises(UserError, match=rf"{EXPERTS.format(2)} expert \d+.* holds Inf"):
        load(d, expert_tier=tier, check_weights="full", expert_format=fmt)
    with pytest.raises(UserError, match="holds Inf"):           # a tiny checkpoint: sampling reads every value
        load(d, expert_tier=tier, expert_format=fmt)
    eng = load(d, expert_tier=tier, check_weights="off", expert_format=fmt)   # loads anyway, as the error says
    assert eng.rc.check_weights == "off"


def test_sampling_scans_a_large_tensor_at_evenly_spaced_values():
    from vismmoe.engine.weights_check import FULL_BELOW, SAMPLE, FiniteCheck
    t = torch.zeros(FULL_BELOW * 4)
    step = t.numel() // SAMPLE
    t[step * 3] = float("nan")                 # on the sampled grid
    with pytest.raises(UserError, match="sampled"):
        FiniteCheck("sample", "x").tensor("w", t)
    t[step * 3] = 0.0
    t[step * 3 + 1] = float("inf")             # between samples: only the full scan sees it
    FiniteCheck("sample", "x").tensor("w", t)
    with pytest.raises(UserError, match="holds Inf"):
        FiniteCheck("full", "x").tensor("w", t)


def test_index_naming_a_tensor_its_shard_lacks_is_refused_at_load(tiny_dirs, tmp_path):
    """The index lists an expert tensor that its shard does not hold: a KeyError traceback before."""
    src = tiny_dirs["qwen3_vl_moe"]
    key = EXPERTS.format(1) + ".gate_up_proj"
    d = _rewrite(src, str(tmp_path / "idx"), lambda sd: sd, shards=2)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index) as f:
        wm = json.load(f)["weight_map"]
    shard = os.path.join(d, wm[key])
    sd = load_file(shard)
    del sd[key]
    save_file(sd, shard, metadata={"format": "pt"})
    for tier in ("host", "disk"):
        with pytest.raises(UserError, match=f"names tensor {key} in .*, but that file has no such tensor"):
            load(d, expert_tier=tier)
    # a non-expert tensor, likewise
    d2 = _rewrite(src, str(tmp_path / "idx2"), lambda sd: sd, shards=2)
    with open(os.path.join(d2, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    shard = os.path.join(d2, wm["model.language_model.norm.weight"])
    sd = load_file(shard)
    del sd["model.language_model.norm.weight"]
    save_file(sd, shard, metadata={"format": "pt"})
    with pytest.raises(UserError, match="model.language_model.norm.weight in .*, but that file has no such tensor"):
        load(d2)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_special_files_and_folders_in_a_checkpoint_are_refused(tiny_dirs, tmp_path, name):
    d = _copy(tiny_dirs, tmp_path, "dir")
    os.remove(os.path.join(d, name))
    os.mkdir(os.path.join(d, name))
    out = in_thread(lambda: load(d), timeout=60.0)
    assert isinstance(out.get("error"), UserError) and "is a directory" in str(out["error"]), out
    d = _copy(tiny_dirs, tmp_path, "fifo")
    os.remove(os.path.join(d, name))
    os.mkfifo(os.path.join(d, name))
    out = in_thread(lambda: load(d), timeout=60.0)                   # a FIFO used to block the reader for ever
    assert isinstance(out.get("error"), UserError) and "not a regular file" in str(out["error"]), out


def test_malformed_index_is_one_error(tiny_dirs, tmp_path):
    d = _rewrite(tiny_dirs["qwen3_vl_moe"], str(tmp_path / "bad"), lambda sd: sd, shards=2)
    index = os.path.join(d, "model.safetensors.index.json")
    with open(index, "wb") as f:
        f.write(b'{"weight_map": {"a": \xff}}')
    with pytest.raises(UserError, match="not valid JSON"):
        load(d)
    with open(index, "w") as f:
        json.dump({"weight_map": ["not", "a", "map"]}, f)
    with pytest.raises(UserError, match="has no weight_map"):
        load(d)


@pytest.mark.parametrize("template,needle", [
    ("{% for x in %}", "TemplateSyntaxError"),
    ("{{ raise_exception('no images here') }}", "no images here"),
])
def test_a_chat_template_that_cannot_render_is_refused_at_load(tiny_dirs, tmp_path, template, needle):
    d = _copy(tiny_dirs, tmp_path, "tpl")
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write(template)
    with pytest.raises(UserError, match="chat template cannot format a one-image question") as err:
        load(d)
    assert needle in str(err.value)


def test_a_template_refusing_some_messages_is_a_user_error_per_request(tiny_dirs, tmp_path):
    """A template that renders a question but refuses, say, a system turn: that request fails alone, as a
    UserError (a 400 on the server), not a TemplateError."""
    from vismmoe.engine.request import GenerationRequest
    d = _copy(tiny_dirs, tmp_path, "tpl2")
    path = os.path.join(d, "chat_template.jinja")
    with open(path) as f:
        template = f.read()
    with open(path, "w") as f:
        f.write("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
                + template)
    eng = load(d)
    req = GenerationRequest(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                            images=[], max_new_tokens=2)
    with pytest.raises(UserError, match="no system turns"):
        eng.prepare_request(req)
