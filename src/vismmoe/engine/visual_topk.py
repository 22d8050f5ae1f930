"""Fewer experts for visual tokens: each visual token of a prefill keeps only its `k` heaviest routed experts
(`--visual-top-k K`, below the model's top-k); text tokens and every decode step keep the model's routing.

This changes the model's outputs, as token pruning does (`--compress`), and is off by default. It is the
routing half of visual-expert affinity: the experts a visual token drops are its least weighted ones, so the
layer's working set (distinct experts the prefill needs) shrinks and fewer expert bytes cross the link, and the
dropped pairs are not computed. Measured on the bundled model: docs/affinity.md ("Fewer experts for visual
tokens").

    VisualTopK(k)                    a protocols.RoutingTrim (the runtime's), told where each step starts
      begin_step(kind, modality)     modality [T] of the step's rows (1 visual, 0 text, -1 padding), prefill only
      trim(index, weights)           router output [T, K] -> (index [T, K], weights [T, K], dropped [T, K] bool
                                     numpy, or None when nothing is dropped)

A dropped pair keeps a valid expert id (its token's heaviest expert, which the token already needs) and weight
0, so every routing observer (traces, predictors) sees ids within range and no new expert; the runtime skips
computing it (`dropped`). The kept weights of a visual token are scaled to the sum of all its weights, so a
softmax router's normalisation (and a sigmoid router's scale) is kept.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def check(k: int, family, top_k: int | None) -> None:
    """`--visual-top-k k` for a model of `family` routing `top_k` experts per token (None: not known yet):
    UserError on a text-only model, or at or above the model's top-k."""
    if not k:
        return
    if not family.has_vision:
        raise UserError(f"--visual-top-k trims the routing of visual tokens, and {family.model_type} is a text-only "
                        "model", "drop --visual-top-k")
    if top_k is not None and k >= top_k:
        raise UserError(f"--visual-top-k {k} is not below the model's top-k ({top_k})",
                        "drop --visual-top-k" if top_k < 2 else
                        f"give {'1' if top_k == 2 else f'1 to {top_k - 1}'}, or 0 (off)")


class VisualTopK:
    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"visual top-k must be at least 1, got {k}")
        self.k = k
        self._visual: torch.Tensor | None = None       # [T] bool of the step in progress, None: no visual row

    def begin_step(self, kind: str, modality: torch.Tensor | None, num_tokens: int | None = None) -> None:
        """A forward step starts: remember which of its rows are visual (a prefill's `modality` [T])."""
        if kind != "prefill" or modality is None:
            self._visual = None
            return
        visual = modality.reshape(-1) == 1
        self._visual = visual if bool(visual.any()) else None

    def trim(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The router's index and weights [T, K] with each visual row's lightest K - k pairs dropped."""
        visual = self._visual
        T, K = top_k_index.shape
        if visual is None or K <= self.k:
            return top_k_index, top_k_weights, None
        if visual.numel() != T:
            raise RuntimeError(f"visual top-k: the step announced {visual.numel()} rows, the layer routes {T}")
        visual = visual.to(top_k_index.device)
        w = top_k_weights.float()
        rank = torch.argsort(torch.argsort(w, dim=1, descending=True, stable=True), dim=1)    # 0 = heaviest
        dropped = visual[:, None] & (rank >= self.k)                                         # [T, K]
        first = top_k_index.gather(1, w.argmax(dim=1, keepdim=True)).expand(T, K)
        index = torch.where(dropped, first, top_k_index)
        kept = torch.where(dropped, torch.zeros_like(w), w)
        scale = torch.where(visual, w.sum(1) / kept.sum(1).clamp_min(torch.finfo(w.dtype).tiny),
                            torch.ones_like(w[:, 0]))
        weights = (kept * scale[:, None]).to(top_k_weights.dtype)
        return index, weights, dropped.cpu().numpy()
