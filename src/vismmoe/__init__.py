"""vismmoe: run vision-language mixture-of-experts models with experts offloaded under a byte budget.

`load` (engine/loading.py), `Engine` and `Generation` (engine/core.py) are imported on first use (it imports torch and
transformers, which the console script's `--help` and argument errors should not wait for).
"""

from .errors import UserError

__version__ = "0.1.0"
__all__ = ["Engine", "Generation", "UserError", "load", "__version__"]


def __getattr__(name: str):
    if name == "load":
        from .engine.loading import load
        return load
    if name in ("Engine", "Generation"):
        from .engine import core
        return getattr(core, name)
    raise AttributeError(f"module 'vismmoe' has no attribute {name!r}")
