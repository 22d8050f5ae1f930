"""Registry of model families, keyed by the exact `model_type` of a checkpoint's config.json."""

from __future__ import annotations

from ..errors import UserError
from .base import Encoded, ExpertGeometry, Family, Tokens
from .glm4v_moe import Glm4vMoeFamily
from .qwen3_vl_moe import Qwen3VLMoeFamily

FAMILIES: dict[str, Family] = {f.model_type: f for f in (Qwen3VLMoeFamily(), Glm4vMoeFamily())}


def get_family(model_type: str | None) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UserError(
            f"unknown model type {model_type!r}",
            f"vismmoe supports {', '.join(sorted(FAMILIES))}; point --model at one of those checkpoints",
        ) from None


__all__ = ["FAMILIES", "Encoded", "ExpertGeometry", "Family", "Tokens", "get_family"]
