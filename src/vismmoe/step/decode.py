"""The eager decode step (a strategy of strategy.py): transformers' forward per token over the prefill's
DynamicCache, with explicit positions (the family adapter's text position + rope delta); and `cut_at_eos`.

    EagerStep.start   keeps the KV cache, attention mask [B, T], rope deltas [B, 1] and last token [B]
    EagerStep.step    mask column on -> routing observers told a decode step starts -> forward of one token per
                      row (the experts through the offload runtime) -> argmax or the sampler's pick
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .loop import pick
from .strategy import Prefilled


@dataclass
class _EagerKV:
    cache: object                   # transformers' DynamicCache
    mask: torch.Tensor              # [B, T]
    deltas: torch.Tensor            # [B, 1]
    nxt: torch.Tensor               # [B]: the last token per row


class EagerStep:
    """One decode step through transformers' forward (see the module docstring)."""

    label = "eager"

    def __init__(self, model, family):
        self.model, self.family = model, family

    def start(self, state, prefilled: Prefilled, max_new_tokens: int) -> None:
        state.kv = _EagerKV(prefilled.cache, prefilled.mask, prefilled.deltas, prefilled.first)

    def step(self, state, teacher_token: int | None) -> list[int]:
        kv = state.kv
        B = kv.mask.shape[0]
        dev = kv.mask.device
        kv.mask = torch.cat([kv.mask, kv.mask.new_ones(B, 1)], dim=1)
        for s in state.steppers:
            s.begin_step("decode", None, B)
        step_in = kv.nxt[:, None] if teacher_token is None else \
            torch.full((B, 1), teacher_token, device=dev, dtype=torch.long)
        fam = self.family
        out = self.model(input_ids=step_in, attention_mask=kv.mask, past_key_values=kv.cache, use_cache=True,
                         position_ids=fam.position_ids(fam.decode_positions(kv.mask, kv.deltas)))
        kv.nxt = pick(out.logits[:, -1], state.sampler)
        return kv.nxt.tolist()

    def finish(self, state) -> None:
        pass

    def export(self, state) -> Prefilled:
        """The batch as a `Prefilled` (its own cache, mask, deltas and next tokens: no copy), for rows to join or
        leave (rows.py) before `start` takes it back."""
        kv = state.kv
        return Prefilled(kv.cache, kv.mask, kv.deltas, kv.nxt)


def cut_at_eos(row: list[int], eos_ids, keep_eos: bool = True) -> list[int]:
    """`row` up to its first EOS token: with that EOS (`keep_eos`, the token ids a request returns) or without it
    (the text to decode). A row without an EOS is returned whole."""
    cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
    if cut is None:
        return list(row)
    return list(row[: cut + 1] if keep_eos else row[:cut])
