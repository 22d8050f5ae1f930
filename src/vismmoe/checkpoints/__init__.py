"""The models shipped inside the package, and which model runs when none is named.

`BUNDLED` is the trained VQA model (a Qwen3-VL-MoE-class checkpoint, `vqa-moe/`). `default_model()` returns it,
or, in a stripped install without it, a tiny random checkpoint made once in the cache folder
(`$VISMMOE_CACHE`, else `~/.cache/vismmoe`).
"""

from __future__ import annotations

import os
import tempfile


def _cache_dir() -> str:
    base = os.environ.get("VISMMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vismmoe")
    try:
        os.makedirs(base, exist_ok=True)
        return base
    except OSError:
        return tempfile.mkdtemp(prefix="vismmoe-")


BUNDLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqa-moe")
CALIBRATION_FILE = "calibration.npz"    # transition tables a checkpoint may ship for --prefetch trace / blend


def shipped_calibration(model_dir: str | None) -> str | None:
    """The transition tables checkpoint `model_dir` ships (None: the bundled model's), or None if it ships none."""
    path = os.path.join(model_dir if model_dir is not None else BUNDLED, CALIBRATION_FILE)
    return path if os.path.isfile(path) else None


def default_model() -> tuple[str, str]:
    """(checkpoint dir, routing source) of the default model: the bundled trained model when it is there."""
    if os.path.exists(os.path.join(BUNDLED, "config.json")):
        return BUNDLED, "trained (bundled Qwen3-VL-MoE-class VQA model)"
    from ..tools.tiny import make_tiny
    path = os.path.join(_cache_dir(), "tiny-qwen3_vl_moe")
    if not os.path.exists(os.path.join(path, "config.json")):
        make_tiny("qwen3_vl_moe", path, layers=4, experts=16, top_k=4, force=True)    # our own cache folder
    return path, "random weights (tiny Qwen3-VL-MoE built by make-tiny)"
