"""The one seam between transformers' experts modules and vismmoe: a hook object per experts module, and the
experts implementation registered with transformers' `ExpertsInterface`.

    register()                  the implementation "vismmoe" known to transformers (explicit, idempotent)
    ExpertsHook(runtime, layer) what the implementation needs about one experts module: the runtime that serves
                                it, its MoE layer (transformers' experts modules know no layer index), and during a
                                fast decode step the `step.graphs.LayerExperts` it reads instead (`fast`)
    attach(module, hook)        the module runs through `hook` until `detach(module, hook)`, which leaves the
                                module as it was (a module attached to another hook since is left alone)
    hook_of(module)             the attached hook, or None

Each engine owns one hook per MoE layer (engine/core.py attaches them before every request: forks share the
model); nothing else is put on transformers' modules.
"""

from __future__ import annotations

import torch

IMPLEMENTATION = "vismmoe"
_ATTR = "_vismmoe_hook"


class ExpertsHook:
    """See the module docstring. `fast` is set by the fast step while its body runs (None otherwise)."""

    __slots__ = ("runtime", "layer", "fast")

    def __init__(self, runtime, layer: int):
        self.runtime = runtime          # offload.runtime.OffloadRuntime (anything with `forward(module, layer, ...)`)
        self.layer = layer
        self.fast = None

    def __call__(self, module, hidden_states, top_k_index, top_k_weights):
        if self.fast is not None:
            return self.fast(hidden_states, top_k_index, top_k_weights)
        return self.runtime.forward(module, self.layer, hidden_states, top_k_index, top_k_weights)


def hook_of(module: torch.nn.Module) -> ExpertsHook | None:
    return module.__dict__.get(_ATTR)


def attach(module: torch.nn.Module, hook: ExpertsHook) -> None:
    module.__dict__[_ATTR] = hook


def detach(module: torch.nn.Module, hook: ExpertsHook) -> None:
    if module.__dict__.get(_ATTR) is hook:
        del module.__dict__[_ATTR]


def _experts_forward(self, hidden_states, top_k_index, top_k_weights):
    hook = self.__dict__.get(_ATTR)
    if hook is None:
        raise RuntimeError("this experts module is not attached to a vismmoe engine (Engine.attach)")
    return hook(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Make the experts implementation "vismmoe" known to transformers (again a no-op)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not _experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, _experts_forward)
