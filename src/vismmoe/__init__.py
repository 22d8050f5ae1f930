"""vismmoe: run vision-language mixture-of-experts models with experts offloaded under a byte budget."""

from .engine import Engine, Generation, load
from .errors import UserError

__version__ = "0.1.0"
__all__ = ["Engine", "Generation", "UserError", "load", "__version__"]
