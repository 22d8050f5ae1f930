"""A checkpoint's config.json checked against itself and against its weights' headers, before any weight is read.

Values that contradict each other or the weights used to give tracebacks deep in the model code or, worse, run
silently: a top-k of 0 ran with no expert at all; fewer decoder layers in config.json than in the weights ran the
first layers only. Each family adapter feeds the one check here with what it reads from its config (its expert
geometry, `Family.config_fields`: fields that place the MoE layers, with their legal ranges); the checks are:

- config alone (`check_config`, before the model is built): whole numbers in range (layers, vocabulary, hidden
  size, the family's layer-placing fields such as Qwen's `decoder_sparse_step`, which was divided by), at least
  one expert per layer, top-k from 1 to the expert count, at least one MoE layer, image token ids inside the
  vocabulary (for families that look them up in the embedding); then every numeric field with a known domain,
  in the config and its sub-configs (`check_domains`, one table: `DOMAINS`, `RELATIONS`): eps-like fields and
  rope_theta above 0, sizes and head/layer/expert counts at least 1, top-k at most the expert count, key/value heads
  dividing the attention heads, deepstack indexes inside the vision blocks; these ran silently wrong (a negative
  eps, an out-of-range deepstack index) or failed deep in the model code;
- config against the weights (`check_weights`, headers only): the embedding's rows against `vocab_size`, no
  decoder layer in the weights beyond the config's (multi-token-prediction layers the config names aside), and
  every stored tensor the model has in the shape the config gives it;
- config against the weights as loaded (`check_unused`, on the names `load_state_dict` did not place): no stored
  tensor the model built from config.json lacks (a vision `depth` smaller than the weights' ran with the first
  blocks only), beside multi-token-prediction layers and the tensors transformers itself drops on load;
- config against the tokenizer (`check_tokenizer`): no token id the tokenizer can produce beyond the vocabulary.

Every failure is a UserError naming config.json's folder and the value.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch

from ..errors import UserError
from ..paths import read_json
from .base import ExpertGeometry

# config.json fields of special image-related token ids, looked up in the embedding by most families
IMAGE_ID_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                   "vision_end_token_id", "image_start_token_id", "image_end_token_id")
_FIX = "restore the checkpoint's config.json (it does not match this model)"


def _whole(name: str, value, least: int, most: int | None, where: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= least and (most is None or value <= most)
    if not ok:
        rng = f"at least {least}" if most is None else f"from {least} to {most}"
        raise UserError(f"config.json in {where}: {name} is {value!r}, which must be a whole number {rng}", _FIX)


def check_config(family, config, where: str) -> ExpertGeometry:
    """The family's expert geometry of `config`, after checking the values above against each other; `where`
    names the checkpoint folder in errors."""
    tc = family.text_config(config)
    layers = getattr(tc, "num_hidden_layers", None)
    _whole("num_hidden_layers", layers, 1, None, where)
    _whole("vocab_size", getattr(tc, "vocab_size", None), 1, None, where)
    _whole("hidden_size", getattr(tc, "hidden_size", None), 1, None, where)
    for name, value, least, most in family.config_fields(config):
        _whole(name, value, least, most, where)
    try:
        geo = family.geometry(config)
    except UserError:
        raise
    except (ZeroDivisionError, TypeError, AttributeError, ValueError, IndexError, KeyError) as e:
        raise UserError(f"config.json in {where} cannot be read as a {family.model_type} model "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})", _FIX) from None
    _whole("expert intermediate size", geo.inter, 1, None, where)
    _whole("experts per layer", geo.num_experts, 1, None, where)
    _whole(f"top-k (experts per token, of {geo.num_experts})", geo.top_k, 1, geo.num_experts, where)
    if not geo.moe_layers:
        raise UserError(f"config.json in {where} places no MoE layer among its {layers} layers",
                        "vismmoe offloads routed experts; this config describes a dense model")
    if family.image_ids_embedded:
        vocab = tc.vocab_size
        for name in IMAGE_ID_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, int) and not 0 <= value < vocab:
                raise UserError(f"config.json in {where}: {name} {value} is outside the vocabulary of {vocab} "
                                "tokens", _FIX)
    written = os.path.join(where, "config.json")
    if os.path.isfile(written):         # as written (a field transformers ignores too), then as transformers reads it
        check_domains(read_json(written, f"config.json in {where}", "restore the checkpoint's config.json"), where)
    check_domains(config.to_dict(), where)
    return geo


# ---- numeric fields with a known domain ------------------------------------------------------------------------
# field name -> (kind, least): "whole" a whole number (each element of a list) >= least; "positive" a finite number
# above 0; "fraction" a number in (0, 1]. None (transformers' "derive it") passes; so does a field a config lacks.
_WHOLE_1 = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "num_heads", "head_dim", "depth", "num_experts", "num_local_experts",
            "n_routed_experts", "moe_num_experts", "num_experts_per_tok", "top_k_experts", "moe_k", "vocab_size",
            "patch_size", "spatial_merge_size", "temporal_patch_size", "temporal_merge_size", "in_channels",
            "num_channels", "out_hidden_size", "max_position_embeddings", "num_position_embeddings", "image_size",
            "n_group", "topk_group", "sliding_window", "linear_num_key_heads", "linear_num_value_heads",
            "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim", "pooling_kernel_size",
            "position_embedding_size", "mlp_dim")
_WHOLE_0 = ("n_shared_experts", "moe_num_shared_experts", "num_nextn_predict_layers", "num_kv_shared_layers",
            "shared_expert_intermediate_size", "first_k_dense_replace")
DOMAINS: dict[str, tuple[str, int]] = {**{n: ("whole", 1) for n in _WHOLE_1}, **{n: ("whole", 0) for n in _WHOLE_0},
                                       "rope_theta": ("positive", 0), "rope_local_base_freq": ("positive", 0),
                                       "routed_scaling_factor": ("positive", 0),
                                       "partial_rotary_factor": ("fraction", 0)}
_EPS = re.compile(r"(^|_)(eps|epsilon)$")      # rms_norm_eps, layer_norm_eps, norm_eps, layer_norm_epsilon, ...
# (field, the fields of the same (sub-)config that bound it, first present wins): at most that value
_EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
RELATIONS = (("num_experts_per_tok", _EXPERT_COUNTS), ("top_k_experts", _EXPERT_COUNTS),
             ("moe_k", _EXPERT_COUNTS), ("num_key_value_heads", ("num_attention_heads",)),
             ("topk_group", ("n_group",)))
_SKIP = ("quantization_config", "id2label", "label2id", "task_specific_params")   # not model geometry


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _bad(path: str, value, must: str, where: str):
    try:
        shown = json.dumps(value)           # as config.json writes it ("x", NaN, null)
    except (TypeError, ValueError):
        shown = repr(value)
    return UserError(f"config.json in {where}: {path} is {shown}, which must be {must}",
                     "correct config.json (or restore the checkpoint's own)")


def _check_field(path: str, name: str, value, where: str) -> None:
    kind, least = ("positive", 0) if _EPS.search(name) else DOMAINS[name]
    if kind == "whole":
        for i, v in enumerate(value) if isinstance(value, list) else [(None, value)]:
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= least):
                raise _bad(path if i is None else f"{path}[{i}]", v, f"a whole number at least {least}", where)
    elif kind == "positive":
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise _bad(path, value, "a number above 0", where)
    elif not (_is_number(value) and 0 < value <= 1):
        raise _bad(path, value, "a number above 0 and at most 1", where)


def _check_mrope(cfg: dict, where: str, path: str) -> None:
    """M-RoPE's `mrope_section` (rotary frequencies given to time, height, width) covers the rotary half of a
    head exactly: head_dim x partial_rotary_factor / 2 (a shorter one ran silently wrong, a longer one failed)."""
    for holder in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(holder)
        section = rope.get("mrope_section") if isinstance(rope, dict) else None
        if not isinstance(section, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in section):
            continue
        head_dim, hidden, heads = cfg.get("head_dim"), cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if not isinstance(head_dim, int):
            head_dim = hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        factor = factor if _is_number(factor) else 1.0
        if head_dim is None or not (head_dim * factor / 2).is_integer():
            continue
        want = int(head_dim * factor / 2)
        if sum(section) != want:
            raise _bad(f"{path}{holder}.mrope_section", section, f"sections that sum to {want} (half the rotary "
                       f"part of a head of {head_dim}{f' x partial_rotary_factor {factor}' if factor != 1 else ''})",
                       where)


def check_domains(cfg: dict, where: str, path: str = "") -> None:
    """Every field of `cfg` (a config's `to_dict()`, sub-configs and rope parameters nested) in its domain
    (`DOMAINS`, eps-like names) and within the fields of its own dict that bound it (`RELATIONS`, deepstack
    indexes); UserError naming the first bad field as a dotted path, its value and the allowed range."""
    for name, value in cfg.items():
        if not isinstance(name, str) or name in _SKIP:
            continue
        full = f"{path}{name}"
        if isinstance(value, dict):
            check_domains(value, where, full + ".")
        elif value is not None and (name in DOMAINS or _EPS.search(name)):
            _check_field(full, name, value, where)
    for name, bounds in RELATIONS:
        value, bound = cfg.get(name), next((b for b in bounds if _is_number(cfg.get(b))), None)
        if isinstance(value, int) and bound is not None and value > cfg[bound]:
            raise _bad(f"{path}{name}", value, f"a whole number from 1 to {path}{bound} ({cfg[bound]})", where)
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and kv > 0 and heads % kv:
        raise _bad(f"{path}num_key_value_heads", kv, f"a divisor of {path}num_attention_heads ({heads})", where)
    heads, hidden = cfg.get("num_heads"), cfg.get("hidden_size")     # vision towers: head size hidden / heads
    if isinstance(heads, int) and heads > 0 and isinstance(hidden, int) and cfg.get("head_dim") is None \
            and hidden % heads:
        raise _bad(f"{path}num_heads", heads, f"a divisor of {path}hidden_size ({hidden})", where)
    _check_mrope(cfg, where, path)
    indexes, depth = cfg.get("deepstack_visual_indexes"), cfg.get("depth")
    if isinstance(indexes, list) and isinstance(depth, int):
        for i, v in enumerate(indexes):
            if not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < depth) or v in indexes[:i]:
                raise _bad(f"{path}deepstack_visual_indexes[{i}]", v, f"a distinct vision block index from 0 to "
                           f"{depth - 1} ({path}depth is {depth})", where)


def _name_of(model, module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def check_weights(family, config, model, reader, expert_prefixes: list[str], where: str) -> None:
    """`config` (as the skeleton `model` built from it) against the stored tensors' headers (`reader`, a
    store.CheckpointReader): nothing read but headers."""
    tc = family.text_config(config)
    params = dict(model.named_parameters())
    keys = set(reader.keys())
    emb = model.get_input_embeddings()
    emb_name = next((n for n, p in params.items() if p is emb.weight), None)
    if emb_name in keys:
        rows = reader.shape(emb_name)[0]
        if rows != tc.vocab_size:
            raise UserError(f"config.json in {where} says vocab_size {tc.vocab_size}, but the embedding "
                            f"{emb_name} in the weights has {rows} rows", _FIX)
    layers_name = _name_of(model, family.decoder_layers(model))
    if layers_name:
        pattern = re.compile(re.escape(layers_name) + r"\.(\d+)\.")
        stored = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
        extra = getattr(tc, "num_nextn_predict_layers", 0) or 0      # multi-token prediction layers, unused here
        if stored and max(stored) >= tc.num_hidden_layers + extra:
            raise UserError(f"config.json in {where} says num_hidden_layers {tc.num_hidden_layers}, but the weights "
                            f"hold decoder layers 0 to {max(stored)}", _FIX)
    expert_pfx = tuple(p + "." for p in expert_prefixes)
    for key in sorted(keys):
        if key in params and not key.startswith(expert_pfx):
            shape = tuple(reader.shape(key))
            want = tuple(params[key].shape)
            if shape != want:
                raise UserError(f"weight {key} in {where} has shape {list(shape)}, but config.json gives the model "
                                f"{list(want)}", _FIX)


def check_tokenizer(family, config, tokenizer, where: str) -> None:
    """No id the tokenizer can produce lies outside the embedding (families that embed every id)."""
    vocab = family.text_config(config).vocab_size
    if family.image_ids_embedded and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer in {where} has {len(tokenizer)} tokens, more than config.json's vocab_size "
                        f"{vocab}", "restore the checkpoint's tokenizer files or config.json")


# ---- stored tensors the model does not have --------------------------------------------------------------------
# ModuleList name -> the config fields that size it (a length, or a list whose length it is), named in the error
_SIZED_BY = {"blocks": ("depth", "num_hidden_layers"), "layers": ("num_hidden_layers", "depth"),
             "layer": ("num_hidden_layers", "depth"),
             "deepstack_merger_list": ("deepstack_visual_indexes",)}


def _fields(cfg: dict, path: str = ""):
    for name, value in cfg.items():
        if isinstance(name, str) and name not in _SKIP:
            if isinstance(value, dict):
                yield from _fields(value, f"{path}{name}.")
            else:
                yield path, name, value


def _sizing_field(cfg: dict, names: tuple[str, ...], length: int, vision: bool) -> str | None:
    """The dotted path and value of the field of `cfg` (sub-configs nested) among `names` (in that order of
    preference, a vision sub-config's first where `vision`) whose value, or length, is `length`."""
    found = [(names.index(name), ("vision" in path) != vision, f"{path}{name} {value}")
             for path, name, value in _fields(cfg) if name in names and
             (value == length if isinstance(value, int) else isinstance(value, list) and len(value) == length)]
    return min(found)[2] if found else None


def check_unused(family, config, model, unexpected, where: str) -> None:
    """UserError when stored tensors (`unexpected`: names `load_state_dict` found no place for, after the
    family's renamings) are ones the model built from `config` does not have: the config describes a smaller
    model than the weights (fewer vision blocks or deepstack mergers), which otherwise ran silently on part of
    the weights. Allowed: what transformers drops on load
    (the model's `_keys_to_ignore_on_load_unexpected`, rotary `inv_freq`, `position_ids`), buffers the model
    computes itself, multi-token-prediction decoder layers."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()) | \
        {r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$"}
    ignored = re.compile("|".join(f"({p})" for p in patterns))
    buffers = {n for n, _ in model.named_buffers()}
    tc = family.text_config(config)
    layers_name = _name_of(model, family.decoder_layers(model))
    mtp = range(tc.num_hidden_layers, tc.num_hidden_layers + (getattr(tc, "num_nextn_predict_layers", 0) or 0))
    pattern = re.compile(re.escape(layers_name or "\0") + r"\.(\d+)\.")

    def allowed(key: str) -> bool:
        m = pattern.match(key)
        return key in buffers or ignored.search(key) is not None or (m is not None and int(m.group(1)) in mtp)

    extra = sorted(k for k in unexpected if not allowed(k))
    if not extra:
        return
    modules = dict(model.named_modules())
    stems, hint = [], ""
    for key in extra:                       # up to two examples, from different module lists where there are
        m = re.match(r"(.+?)\.(\d+)\.", key)
        stem = m.group(1) if m else key
        if stem not in [s for s, _ in stems]:
            stems.append((stem, key))
    examples = [k for _, k in stems[:2]]
    for stem, key in stems:
        lst = modules.get(stem)
        if isinstance(lst, torch.nn.ModuleList):
            names = _SIZED_BY.get(stem.rpartition(".")[2], ())
            field = _sizing_field(config.to_dict(), names, len(lst), "vis" in stem) if names else None
            hint = f": config.json gives {stem} {len(lst)} entries{' (' + field + ')' if field else ''}, the " \
                   "weights more"
            break
    raise UserError(f"the weights in {where} hold {len(extra)} tensors that the model built from config.json does "
                    f"not have (e.g. {', '.join(examples)}){hint}",
                    "correct config.json to match the weights (or restore the checkpoint's own)")
