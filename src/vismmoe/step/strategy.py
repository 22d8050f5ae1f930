"""The decode step as a strategy: one small interface behind which the eager step (decode.py) and the fast step
(fast_step.py) sit, chosen once per request batch (engine/core.py) and driven by the one loop (loop.py).

    start(state, prefilled, max_new_tokens)   take over the prefill's KV cache (`Prefilled`); keep whatever the
                                              strategy needs in `state.kv`
    step(state, teacher_token) -> [B] tokens  one decode step of every row: the argmax per row, or the state's
                                              sampler's pick; `teacher_token` forces the step's input token
    finish(state)                             the last step's books (a strategy may book a step while the next
                                              runs)
    export(state) -> Prefilled                after `finish`: the batch's KV, mask, deltas and next tokens, for
                                              rows to join or leave between steps (rows.py); `start` takes the
                                              re-batched one back

A new strategy is one class with these four methods; the loop, the `DecodeState` and the engine stay as they
are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass
class Prefilled:
    """What the prefill hands the decode: the KV cache (transformers' DynamicCache), attention mask [B, T], rope
    deltas [B, 1] (rope position minus text position) and each row's first token [B]."""

    cache: object
    mask: torch.Tensor
    deltas: torch.Tensor
    first: torch.Tensor


@runtime_checkable
class DecodeStrategy(Protocol):
    label: str              # what a request's stats call this step ("eager", "fast", "fast+graphs", "native")

    def start(self, state, prefilled: Prefilled, max_new_tokens: int) -> None: ...

    def step(self, state, teacher_token: int | None) -> list[int]: ...

    def finish(self, state) -> None: ...

    def export(self, state) -> Prefilled: ...
