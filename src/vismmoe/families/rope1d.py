"""Positions of families with 1-D RoPE (InternVL, Gemma 4, DeepSeek-OCR-2): one rope row beside the text row.

Positions travel as `[2, B, T]`: row 0 the text position (the token's place among the unpadded tokens), row 1
the rope position the decoder's `position_ids` take. Unpruned they are equal and the rope delta is 0; after
visual-token compression (compress.prune) row 1 keeps each kept token's unpruned position, so the dropped tokens
leave gaps, and the rope delta (max kept position + 1 - kept length) lets decode continue where the full prompt
would have. This mirrors what M-RoPE families do with their three rope rows.
"""

from __future__ import annotations

import torch


class Rope1D:
    """Mixin for a `Family` whose decoder takes 1-D `position_ids [B, T]`; put it before `Family` in the bases."""

    def position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[2, B, T] -> the rope row [B, T]."""
        return positions[1]

    def rotary_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """[2, B, T] -> what the decoder's `rotary_emb` takes: the rope row [B, T]."""
        return positions[1]

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """[2, B, 1] -> what the decoder's layers take in a fast decode step: the rope row [B, 1] (as the text
        model hands its layers the `position_ids` it was given)."""
        return positions[1]

    def prefill_positions(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """([2, B, T] text and rope positions, equal; rope deltas [B, 1], zero) of a left-padded prompt."""
        mask = inputs["attention_mask"]
        text = (mask.long().cumsum(-1) - 1).clamp(min=0)                       # [B, T]
        return torch.stack([text, text]), torch.zeros(text.shape[0], 1, dtype=torch.long, device=text.device)

    def decode_positions(self, mask: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """[2, B, 1] positions of the newest token; `mask [B, L]` already includes it."""
        text = mask.long().sum(-1, keepdim=True) - 1                           # [B, 1]
        return torch.stack([text, text + deltas])
