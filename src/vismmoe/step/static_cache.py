"""Decode-step caches of layers that keep something other than keys and values: fixed buffers, updated in place,
so a captured step reads and writes the same memory every replay. The keys and values of attention layers are
`graphs.StaticKV`; which layer gets which is the family's call (`Family.static_cache`)."""

from __future__ import annotations

import torch


class StaticLinearState:
    """One linear-attention layer's state during decode (Qwen3.5's Gated-DeltaNet): the convolution window
    `conv_states[0] [B, channels, kernel]` and the recurrent state `recurrent_states[0] [B, heads, dk, dv]`, in the
    dtypes the prefill left them. Duck-types what transformers' linear attention reads of its hybrid cache
    (`has_previous_state`, `cache.layers[i]`, `record_past`, `update_recurrent_state`); the layer index is
    ignored (the object is one layer's), so one compiled layer serves every linear layer. The buffers are made
    by the first `load` (their shapes come from the prefill) and filled in place after that."""

    record_past = False

    def __init__(self):
        self.conv_states: list[torch.Tensor | None] = [None]
        self.recurrent_states: list[torch.Tensor | None] = [None]
        self.layers = self                                  # `cache.layers[layer_idx]` is this layer

    def __getitem__(self, layer_idx) -> StaticLinearState:
        return self

    def inplace_state(self) -> tuple:
        """What a step overwrites in place (graphs.Bucket.snapshot): the convolution window and recurrent state."""
        return (self.conv_states[0], self.recurrent_states[0])

    def has_previous_state(self, layer_idx=None, state_idx: int = 0) -> bool:
        return True                                         # decode always follows a prefill

    def update_recurrent_state(self, recurrent_states: torch.Tensor, layer_idx=None, state_idx: int = 0):
        self.recurrent_states[state_idx].copy_(recurrent_states)
        return self.recurrent_states[state_idx]

    def load(self, src, fill: torch.Tensor | None, T: int) -> None:
        """Take the state of the prefill's cache layer `src` (a transformers linear-attention layer); bucket row r
        gets request row `fill[r]` (None: row r). `T` (the prompt length) does not matter to a recurrent state."""
        for name in ("conv_states", "recurrent_states"):
            s = getattr(src, name)[0] if fill is None else getattr(src, name)[0][fill]
            mine = getattr(self, name)
            if mine[0] is None:
                mine[0] = torch.empty_like(s)
            mine[0].copy_(s)
