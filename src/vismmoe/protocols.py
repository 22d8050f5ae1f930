"""The contracts between the runtime and its pluggable parts, declared in one place.

    EvictionPolicy   policies.py     which resident expert leaves (the cache never branches on a policy's name)
    Predictor        predict.py      which experts the next layers will want (lookahead for prefetch)
    Compressor       compress.py     which visual tokens to keep
    RoutingObserver  trace, predictors, prefetcher: sees every MoE layer call's routing
    StepObserver     a RoutingObserver that is also told where each forward step starts (prefill or decode)
    RoutingTrim      visual_topk.py  drops routed pairs before a layer call (a rule that changes the model's outputs)

Implementations do not inherit from these; they match them structurally, and tests check each registered one
with `isinstance` (the protocols are runtime-checkable). Keys are `(layer, expert)` pairs.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

Key = tuple[int, int]   # (layer, expert)


@runtime_checkable
class EvictionPolicy(Protocol):
    retain: bool        # False: keep nothing between layer calls (load on demand)

    def on_layer(self, layer: int) -> None:
        """A layer call begins (cycle-aware policies track where in the layer cycle they are)."""

    def on_use(self, key: Key) -> None:
        """A resident expert was used (a hit, or a miss right after its insertion)."""

    def on_calls(self, calls: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Several layer calls in order, [(layer, experts used)]: on_layer, then on_use of each, per call (a decode
        step's books tell a policy in one go; policies.py's base class does it one by one)."""

    def on_insert(self, key: Key) -> None:
        """An expert became resident."""

    def on_evict(self, key: Key) -> None:
        """An expert left the cache."""

    def choose_victim(self, pinned: Container[Key]) -> Key:
        """The resident expert to evict, never one in `pinned`; LookupError when every resident one is pinned."""

    def hint(self, layer: int, probs: np.ndarray) -> None:
        """A predictor's probabilities [E] for `layer`'s next call (ignored by policies that do not plan)."""

    def admit(self, victim: Key, key: Key) -> bool:
        """Whether a prefetch of `key` may displace `victim` (False: the victim is needed sooner)."""


@runtime_checkable
class RoutingObserver(Protocol):
    def observe(self, layer: int, hidden: torch.Tensor | None, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> None:
        """One MoE layer call's router output: top_k_index [T, K], top_k_weights [T, K]; `hidden` [T, H] is the
        router's input where the layer ran eagerly, None in a captured decode step."""


@runtime_checkable
class StepObserver(RoutingObserver, Protocol):
    def begin_step(self, kind: str, modality: torch.Tensor | None, num_tokens: int | None = None) -> None:
        """A forward step starts: kind prefill or decode, `modality` [T] (0 text, 1 image) when known."""


@runtime_checkable
class Predictor(RoutingObserver, Protocol):
    def predict(self, layer: int, depth: int) -> np.ndarray | None:
        """Probabilities [E] that each expert of the MoE layer `depth` layers after `layer` is used by its next
        call (None: nothing to say yet)."""


@runtime_checkable
class Compressor(Protocol):
    def select(self, ctx) -> object:
        """compress.VisualContext -> compress.Selection: which of the N visual tokens to keep (ctx.keep of them)."""


@runtime_checkable
class RoutingTrim(Protocol):
    def begin_step(self, kind: str, modality: torch.Tensor | None, num_tokens: int | None = None) -> None:
        """A forward step starts: kind prefill or decode, `modality` [T] of its rows (1 image, 0 text, -1 padding)."""

    def trim(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """A layer call's router output [T, K] -> (index, weights [T, K], dropped [T, K] bool or None): dropped pairs
        keep an expert id the token already needs and weight 0, and are not computed."""
