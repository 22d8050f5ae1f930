"""Rows joining and leaving a running batch between decode steps (continuous batching): the KV side.

A running batch is held as one `Prefilled` (strategy.py): a batched transformers cache, the attention mask
[B, T], rope deltas [B, 1] and each row's next input token [B]. Rows are left-padded: every row's newest
position is column T-1, a row shorter than the longest has zero keys/values and mask 0 in its first columns.

    select(p, keep)    rows `keep` of `p` (copies), then leading columns no row attends any more dropped
    concat(a, b)       `a`'s rows then `b`'s; the shorter side left-padded to the longer's T
    blocker(cache)     why a cache's layers cannot be re-batched (None: they can)

Full-attention layers (`keys`/`values` [B, H, T, D]) are padded and trimmed along T; linear-attention layers
(Qwen3.5's Gated-DeltaNet: `conv_states`, `recurrent_states` [B, ...]) carry no T and are only selected and
concatenated along B. A sliding-window layer (its cut depends on one length for the whole batch) is a blocker.
A strategy hands its batch out as a `Prefilled` (`export`) and takes the re-batched one back (`start`): the
eager step's export is its own cache (no copy); the fast step's copies its static bucket out (graphs.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .strategy import Prefilled

_STATES = ("conv_states", "recurrent_states")


def blocker(cache) -> str | None:
    """Why rows of `cache` (a transformers cache, or a fast step's export) cannot join or leave (None: they can)."""
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_sliding", False):
            return "sliding-window attention layers keep one window for the whole batch"
        if not hasattr(layer, "keys") and not any(hasattr(layer, n) for n in _STATES):
            return f"cache layer {type(layer).__name__} holds neither keys/values nor a linear-attention state"
    return None


def _kv(layer) -> bool:
    return getattr(layer, "keys", None) is not None and getattr(layer, "keys").dim() == 4


def select(p: Prefilled, keep: list[int]) -> Prefilled:
    """Rows `keep` of `p`, in that order (new tensors: `p`'s storage may be reused); columns that no kept row
    attends are dropped from the front."""
    idx = torch.tensor(keep, dtype=torch.long, device=p.mask.device)
    mask = p.mask.index_select(0, idx)
    live = mask.bool().any(0).nonzero()
    start = int(live[0]) if live.numel() else mask.shape[1]
    for layer in p.cache.layers:
        if _kv(layer):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        for name in _STATES:
            _map(layer, name, lambda s: s.index_select(0, idx))
    return Prefilled(p.cache, mask[:, start:], p.deltas.index_select(0, idx), p.first.index_select(0, idx))


def _map(layer, name: str, fn, keyed: bool = False) -> None:
    """`fn` over each state tensor of `layer.<name>` (a list, or a dict by state index, as transformers keeps
    them; None entries stay None), in place of the old ones."""
    states = getattr(layer, name, None)
    if isinstance(states, (list, dict)):
        keys = range(len(states)) if isinstance(states, list) else list(states)
        for k in keys:
            if states[k] is not None:
                states[k] = fn(states[k], k) if keyed else fn(states[k])


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pad `t` [B, H, T, D] by `n` zero columns along T."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def concat(a: Prefilled, b: Prefilled) -> Prefilled:
    """`a`'s rows then `b`'s, in `a`'s cache object (new tensors); the shorter side left-padded."""
    Ta, Tb = a.mask.shape[1], b.mask.shape[1]
    T = max(Ta, Tb)
    for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
        if _kv(la):
            la.keys = torch.cat([_pad(la.keys, T - Ta), _pad(lb.keys, T - Tb)])
            la.values = torch.cat([_pad(la.values, T - Ta), _pad(lb.values, T - Tb)])
        for name in _STATES:
            other = getattr(lb, name, None)
            _map(la, name, lambda x, key: torch.cat([x, other[key].to(x.dtype)]), keyed=True)
    mask = torch.cat([F.pad(a.mask, (T - Ta, 0)), F.pad(b.mask.to(a.mask.dtype), (T - Tb, 0))])
    return Prefilled(a.cache, mask, torch.cat([a.deltas, b.deltas.to(a.deltas.dtype)]),
                     torch.cat([a.first, b.first.to(a.first.dtype)]))
