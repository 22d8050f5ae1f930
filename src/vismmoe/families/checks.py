"""A checkpoint's config.json checked against itself and against its weights' headers, before any weight is read.

Values that contradict each other or the weights used to give tracebacks deep in the model code or, worse, run
silently: a top-k of 0 ran with no expert at all; fewer decoder layers in config.json than in the weights ran the
first layers only. Each family adapter feeds the one check here with what it reads from its config (its expert
geometry, `Family.config_fields`: fields that place the MoE layers, with their legal ranges); the checks are:

- config alone (`check_config`, before the model is built): whole numbers in range (layers, vocabulary, hidden
  size, the family's layer-placing fields such as Qwen's `decoder_sparse_step`, which was divided by), at least
  one expert per layer, top-k from 1 to the expert count, at least one MoE layer, image token ids inside the
  vocabulary (for families that look them up in the embedding);
- config against the weights (`check_weights`, headers only): the embedding's rows against `vocab_size`, no
  decoder layer in the weights beyond the config's (multi-token-prediction layers the config names aside), and
  every stored tensor the model has in the shape the config gives it;
- config against the tokenizer (`check_tokenizer`): no token id the tokenizer can produce beyond the vocabulary.

Every failure is a UserError naming config.json's folder and the value.
"""

from __future__ import annotations

import re

from ..errors import UserError
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
    return geo


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
