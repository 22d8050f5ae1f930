"""Registry of model families, keyed by the exact `model_type` of a checkpoint's config.json.

Model types that are not here are refused with one line naming the supported families. Some are refused for a
reason worth saying: their MoE forward never reads transformers' experts setting (`set_experts_implementation`),
so the runtime cannot put its experts function in their place (`IGNORES_EXPERTS_SETTING`).
"""

from __future__ import annotations

from ..errors import UserError
from .base import Encoded, ExpertGeometry, Family, Tokens
from .deepseek_ocr2 import DeepseekOcr2Family
from .ernie4_5_vl_moe import Ernie4_5_VLMoeFamily
from .gemma4 import Gemma4Family
from .glm4_moe import Glm4MoeFamily
from .glm4v_moe import Glm4vMoeFamily
from .internvl import InternVLFamily
from .qwen3_5_moe import Qwen3_5MoeFamily
from .qwen3_moe import Qwen3MoeFamily
from .qwen3_vl_moe import Qwen3VLMoeFamily

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Qwen3VLMoeFamily(), Glm4vMoeFamily(), Qwen3_5MoeFamily(), InternVLFamily(), DeepseekOcr2Family(),
    Gemma4Family(), Ernie4_5_VLMoeFamily(), Qwen3MoeFamily(), Glm4MoeFamily())}

# model types whose MoE forward ignores `set_experts_implementation` (transformers 5.17): their experts run their
# own dense loop over every expert, so there is no experts call to serve from the cache (docs/families.md says what
# supporting llama4 would take)
IGNORES_EXPERTS_SETTING = {
    "llama4": "Llama 4's MoE runs every expert on every token (scores masked to the top-k) in its own forward",
    "aria": "Aria's MoE runs its own grouped GEMM over the whole expert bank",
    "step3p7": "Step-3.7's experts module has its own per-expert loop",
}


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def get_family(model_type: str | None, flag: str = "--model") -> Family:
    """The adapter of `model_type`; UserError naming the supported families otherwise (`flag`: the option the
    user should change, --model for a checkpoint, --family for make-tiny)."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        pass
    if model_type in IGNORES_EXPERTS_SETTING:
        raise UserError(
            f"model type {model_type!r} is not supported: {IGNORES_EXPERTS_SETTING[model_type]} and ignores "
            "transformers' experts setting, so its experts cannot be offloaded",
            f"vismmoe supports {supported()}") from None
    raise UserError(f"unknown model type {model_type!r}",
                    f"vismmoe supports {supported()}; " +
                    ("point --model at one of those checkpoints" if flag == "--model" else f"give {flag} one of them")
                    ) from None


__all__ = ["FAMILIES", "IGNORES_EXPERTS_SETTING", "Encoded", "ExpertGeometry", "Family", "Tokens", "get_family"]
