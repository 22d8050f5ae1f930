"""`vismmoe make-tiny`: a tiny random checkpoint of a family, saved exactly as a real one is.

`save_pretrained` of the transformers model class, a locally trained byte-level BPE tokenizer with the family's
special tokens and chat template, and a PIL image processor config (families with a vision tower). Loads with
plain `from_pretrained` and with `vismmoe.load`. Used by tests (no downloads) and by the demo until a trained
default model exists.
"""

from __future__ import annotations

import torch

from ..families import get_family
from ..paths import atomic_dir, new_dir
from .tokenizer import build_tokenizer


def make_tiny(family_name: str, out_dir: str, seed: int = 0, dtype: torch.dtype = torch.float32,
              max_side: int = 224, force: bool = False, **overrides) -> str:
    """Write a tiny random checkpoint of `family_name` to `out_dir` and return it. The folder is written under a
    temporary name beside `out_dir` and renamed into place when complete; an existing non-empty `out_dir` is a
    UserError unless `force`, which replaces it then (paths.new_dir)."""
    family = get_family(family_name, flag="--family")
    new_dir(out_dir, "--out", force)
    tok = build_tokenizer(family, vocab_size=overrides.pop("vocab", 400))
    ids = family.token_ids(tok)
    config = family.tiny_config(ids, vocab_size=len(tok), **overrides)
    torch.manual_seed(seed)
    model = family.model_class(config).to(dtype)
    _spread_router(family, model, seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if family.has_vision:
            family.tiny_image_processor(max_side).save_pretrained(tmp)
    return out_dir


@torch.no_grad()
def _spread_router(family, model, seed: int) -> None:
    """transformers initialises router weights to zeros (every token would pick experts 0..k-1). Random small
    weights make tokens route to different experts, as in a real model, so offloading gets exercised; routers
    with a score-correction bias (bias-corrected selection: GLM, ERNIE) get a random one, so the bias moves the
    choice as it does in a trained model."""
    g = torch.Generator().manual_seed(seed + 1)
    for layer in family.geometry(model.config).moe_layers:
        router = family.router(model, layer)
        weight = router.weight if isinstance(getattr(router, "weight", None), torch.Tensor) else router.proj.weight
        weight.copy_(torch.randn(weight.shape, generator=g) * 0.5)
        for name, t in list(router.named_parameters()) + list(router.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
