"""Visual-token compression: which of an image's N visual tokens the decoder sees, and the pruned prompt.

    family.encode(prompt) -> Encoded (embeddings with image features, rope positions, DeepStack features)
        per row: VisualContext(embeds [N, H], grid, text embeds, router probes) -> compressor.select -> Selection
    prune(Encoded, selections) -> Encoded with the kept tokens only:
        positions gathered from the UNPRUNED rope positions, M-RoPE or 1-D alike (each kept token keeps its place
        in the image; with 1-D RoPE the dropped tokens leave gaps in the sequence),
        text position row renumbered 0..n-1, DeepStack rows and per-token inputs (Gemma 4's per-layer inputs)
        gathered with the same mask, rope delta corrected
        (max kept position + 1 - kept length) so decode continues where the full prompt would have.

Compressors (one protocol, `select(ctx) -> Selection`; none needs attention maps, so SDPA stays on):
  random    uniform random subset (seeded)                          pool      one token per cell of a coarser grid,
  dart      drop duplicates of a few pivot tokens (DART)                      merging (averaging) the cell
  divprune  max-min diversity, farthest-point selection (DivPrune)  textrel   relevance to the instruction: the last
  affinity  ours: router probes of the first MoE layers pick tokens           prompt token's layer-0 query against
            that keep the image covered while adding few new experts          the visual keys (PyramidDrop-style)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import split_spec
from ..errors import UserError
if TYPE_CHECKING:                       # annotations only: importing families loads every model class
    from ..families.base import Encoded


@dataclass
class VisualContext:
    embeds: torch.Tensor                     # [N, H] one image's visual tokens (after the merger)
    grid: tuple[int, int, int]               # merged (t, h, w), N = t*h*w
    text: torch.Tensor                       # [M, H] the prompt's text-token embeddings (no padding)
    keep: int                                # how many to keep
    probe: Callable[[torch.Tensor], list[torch.Tensor]] | None = None   # embeds -> per probed layer idx [N, k]
    query_key: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # (text, visual) -> scores [N]
    seed: int = 0


@dataclass
class Selection:
    keep: torch.Tensor                       # [K] sorted indices into the N visual tokens
    groups: torch.Tensor | None = None       # [N] kept slot (0..K-1) each token merges into, -1 dropped


def _cos(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


@functools.lru_cache(maxsize=16)
def _grid_distance(grid: tuple[int, int, int], n: int) -> np.ndarray:
    """[N, N] distance between visual tokens' places in the (h, w) grid, 1 = the image diagonal (cached per grid:
    requests of one image size share it; read-only)."""
    _, h, w = grid
    i = np.arange(n) % (h * w)
    pos = np.stack([i // w / max(h - 1, 1), i % w / max(w - 1, 1)], 1)
    dist = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1) / 2.0)
    dist.flags.writeable = False
    return dist


class RandomCompressor:
    name = "random"

    @torch.no_grad()
    def select(self, ctx: VisualContext) -> Selection:
        g = torch.Generator().manual_seed(ctx.seed)
        return Selection(torch.randperm(ctx.embeds.shape[0], generator=g)[: ctx.keep].sort().values)


class PoolCompressor:
    """Split each frame's (h, w) grid into cells, about `keep` in all; keep each cell's centre token carrying the
    cell's mean. Frames (InternVL's tiles) never share a cell."""

    name = "pool"

    @torch.no_grad()
    def select(self, ctx: VisualContext) -> Selection:
        t, h, w = ctx.grid
        n = ctx.embeds.shape[0]
        f = (ctx.keep / n) ** 0.5
        ch, cw = max(1, min(h, round(h * f))), max(1, min(w, round(w * f)))
        rows = torch.div(torch.arange(h) * ch, h, rounding_mode="floor")          # cell row of each grid row
        cols = torch.div(torch.arange(w) * cw, w, rounding_mode="floor")
        cell = (rows[:, None] * cw + cols[None, :]).reshape(-1)                   # [h*w] cell within a frame
        cell = (torch.arange(t)[:, None] * (ch * cw) + cell[None]).reshape(-1)    # [N]
        keep = []
        for c in range(t * ch * cw):
            members = torch.nonzero(cell == c).flatten()
            keep.append(int(members[len(members) // 2]))
        keep_t = torch.tensor(sorted(keep))
        slot = {int(k): i for i, k in enumerate(keep_t.tolist())}
        groups = torch.tensor([slot[keep[int(c)]] for c in cell.tolist()])
        return Selection(keep_t, groups)


@dataclass(frozen=True)
class Knob:
    """One numeric knob of a compressor (`name:knob=value`): whole or real, finite, at least `low`."""

    whole: bool = False
    low: float = 0.0

    def parse(self, text: str) -> float | int | None:
        """The value of `text`, or None when it is not a legal value of this knob."""
        try:
            v = float(text)
        except ValueError:
            return None
        if not math.isfinite(v) or v < self.low or (self.whole and not v.is_integer()):
            return None
        return int(v) if self.whole else v

    def legal(self) -> str:
        return f"{'a whole' if self.whole else 'a finite'} number >= {self.low:g}"


class DartCompressor:
    """Pivots = the tokens of largest norm; keep the pivots and the tokens least similar to them."""

    name = "dart"
    knobs = {"pivots": Knob(whole=True, low=1)}

    def __init__(self, pivots: int = 8):
        self.pivots = int(pivots)

    @torch.no_grad()
    def select(self, ctx: VisualContext) -> Selection:
        x = _cos(ctx.embeds)
        p = max(1, min(self.pivots, ctx.keep // 4 or 1))
        piv = torch.topk(ctx.embeds.float().norm(dim=-1), p).indices
        dup = (x @ x[piv].T).max(dim=-1).values                                   # [N] duplication of a pivot
        dup[piv] = -2.0
        return Selection(torch.topk(-dup, ctx.keep).indices.sort().values)


def _farthest_first(sim: np.ndarray, keep: int, union=None, lam: float = 0.0, typical_cap: bool = False) -> list[int]:
    """Greedy max-min diversity over token similarities `sim [N, N]` (DivPrune's selection): start from the least
    typical token (farthest from the image mean), then add the token farthest (1 - its highest similarity) from
    those kept. `typical_cap` keeps each token's distance to the image mean as a cap on its score throughout, so
    tokens typical of the image (background) never look new. With `union` (a `_UnionCost`), each candidate's
    score is lowered by lam x the experts it would add to the kept set's union."""
    n = sim.shape[0]
    mind = 1.0 - sim.mean(axis=1)
    taken = np.zeros(n, dtype=bool)
    chosen: list[int] = []
    for i in range(min(keep, n)):
        score = mind - lam * union.cost if union is not None else mind.copy()
        score[taken] = -np.inf
        j = int(np.argmax(score))
        chosen.append(j)
        taken[j] = True
        if union is not None:
            union.take(j)
        mind = np.minimum(mind, 1.0 - sim[j]) if typical_cap or i > 0 else 1.0 - sim[j]
    return chosen


class _UnionCost:
    """For each candidate token, the experts it would add to the union the kept tokens need (summed over the
    probed layers, each expert weighted up to 2x when few tokens use it, normalised to [0, 1]); kept current as
    tokens are taken (a token x expert membership matrix per layer)."""

    def __init__(self, routes: list[np.ndarray]):
        n, k = routes[0].shape
        E = max(int(r.max()) for r in routes) + 1
        self.routes = routes
        self.norm = 2.0 * len(routes) * k
        rows = np.arange(n)[:, None]
        self.member, self.weight = [], []
        for r in routes:
            mem = np.zeros((n, E))
            np.add.at(mem, (rows, r), 1.0)                                      # member[t, e]: token t uses e
            freq = mem.sum(axis=0) / n                                          # share of tokens using e
            self.member.append(mem)
            self.weight.append(1.0 + (1.0 - freq / max(freq.max(), 1e-9)))      # rare experts cost up to 2x
        self.cost = sum(mem @ w for mem, w in zip(self.member, self.weight)) / self.norm
        self.covered = [np.zeros(E, dtype=bool) for _ in routes]

    def take(self, j: int) -> None:
        """Token j is kept: the experts it brings in are free for every other token from now on."""
        for l, r in enumerate(self.routes):
            new = np.unique(r[j][~self.covered[l][r[j]]])
            if new.size:
                self.covered[l][new] = True
                self.cost -= self.member[l][:, new] @ self.weight[l][new] / self.norm


class DivPruneCompressor:
    """Max-min diversity: farthest-point selection in cosine distance."""

    name = "divprune"

    @torch.no_grad()
    def select(self, ctx: VisualContext) -> Selection:
        x = _cos(ctx.embeds)
        return Selection(torch.tensor(sorted(_farthest_first((x @ x.T).cpu().numpy(), ctx.keep))))


class TextRelCompressor:
    """Keep the visual tokens the instruction's last token attends to most at the first decoder layer."""

    name = "textrel"

    @torch.no_grad()
    def select(self, ctx: VisualContext) -> Selection:
        if ctx.query_key is None:
            raise ValueError("textrel needs the family's query/key probe")
        scores = ctx.query_key(ctx.text, ctx.embeds)                              # [N]
        return Selection(torch.topk(scores.float(), ctx.keep).indices.sort().values)


class AffinityCompressor:
    """Router-aware selection (ours).

    The routers of the first MoE layers are applied to the candidate visual tokens (router weights are tiny; no
    expert is read). Greedy selection then adds, one at a time, the token with the best
        diversity (min cosine distance to the tokens kept so far: the image stays covered, duplicates go)
        - lam * cost (experts it would add to the kept set's union, each weighted up when few tokens use it)
    so tokens whose routing duplicates what is already kept come cheap and tokens that drag in rare experts
    must earn their place. lam trades working set against fidelity (0: diversity alone, DivPrune's greedy with
    each token's distance to the image mean kept as a cap, so background never looks new). gamma > 0
    subtracts gamma x (grid distance, 1 = the diagonal) from the similarity, so look-alike tokens far apart (two
    red circles) both count as new (`affinity:gamma=1.5`).
    """

    name = "affinity"
    knobs = {"lam": Knob(), "gamma": Knob()}

    def __init__(self, lam: float = 0.5, gamma: float = 0.0):
        self.lam = lam
        self.gamma = gamma

    @torch.no_grad()
    def select(self, ctx: VisualContext) -> Selection:
        if ctx.probe is None:
            raise ValueError("affinity needs router probes")
        x = _cos(ctx.embeds)
        n = x.shape[0]
        sim = (x @ x.T).cpu().numpy()
        if self.gamma:                  # look-alike tokens far apart are not duplicates (two red circles)
            sim = sim - self.gamma * _grid_distance(ctx.grid, n)
        union = _UnionCost([r.cpu().numpy() for r in ctx.probe(ctx.embeds)])     # per layer [N, k]
        chosen = _farthest_first(sim, ctx.keep, union, self.lam, typical_cap=True)
        return Selection(torch.tensor(sorted(chosen)))


COMPRESSORS: dict[str, Callable[[], object]] = {
    "random": RandomCompressor, "pool": PoolCompressor, "dart": DartCompressor, "divprune": DivPruneCompressor,
    "textrel": TextRelCompressor, "affinity": AffinityCompressor,
}


def make_compressor(spec: str):
    """`name` or `name:knob=value[,knob=value]`, e.g. `affinity:lam=2` (lam trades working set for fidelity).
    Every knob is checked against its class's `knobs` (finite, in range, whole where it counts something)."""
    name, items = split_spec(spec)
    if name not in COMPRESSORS:
        raise UserError(f"unknown compressor {name!r}", f"use one of {', '.join(sorted(COMPRESSORS))}")
    legal = getattr(COMPRESSORS[name], "knobs", {})
    kwargs = {}
    for key, value, item in items:
        if key not in legal:
            takes = "; ".join(f"{n} takes {', '.join(getattr(c, 'knobs', {}))}" for n, c in COMPRESSORS.items()
                              if getattr(c, "knobs", None))
            raise UserError(f"compressor {name!r} has no knob {key!r}", takes)
        if key in kwargs:
            raise UserError(f"compressor knob {key!r} given twice in {spec!r}", "give each knob once")
        kwargs[key] = legal[key].parse(value)
        if kwargs[key] is None:
            raise UserError(f"bad compressor knob {item!r}", f"{name}:{key} takes {legal[key].legal()}, "
                            f"e.g. {name}:{key}=2")
    return COMPRESSORS[name](**kwargs)


def keep_count(n: int, ratio: float) -> int:
    return max(1, min(n, int(round(n * ratio))))


def prune(enc: Encoded, selections: list[Selection]) -> Encoded:
    """The prompt with only each row's kept visual tokens (see the module docstring)."""
    B, T, H = enc.embeds.shape
    dev = enc.embeds.device
    rows = []
    ds_rows: list[list[torch.Tensor]] = [[] for _ in (enc.deepstack or [])]
    offset = 0
    for b in range(B):
        valid = enc.mask[b].bool()
        vis_pos = torch.nonzero(enc.visual[b]).flatten()                         # [N] positions of visual tokens
        n = vis_pos.numel()
        sel = selections[b]
        keep = sel.keep.to(dev)
        order = torch.cat([torch.nonzero(valid & ~enc.visual[b]).flatten(), vis_pos[keep]]).sort().values
        emb = enc.embeds[b, order]
        is_vis = enc.visual[b, order]
        kept_vis_rows = torch.nonzero(is_vis).flatten()                           # rows of emb that are visual
        if sel.groups is not None:                                                # merge: kept token = group mean
            emb = emb.clone()
            g = sel.groups.to(dev)
            src = enc.embeds[b, vis_pos]                                          # [N, H]
            emb[kept_vis_rows] = _group_mean(src, g, keep.numel()).to(emb.dtype)
        for i, ds in enumerate(enc.deepstack or []):
            block = ds[offset: offset + n]
            ds_rows[i].append(_group_mean(block, sel.groups.to(dev), keep.numel()).to(block.dtype)
                              if sel.groups is not None else block[keep])
        offset += n
        pos = enc.positions[1:, b, order]                                         # [R, n_b] unpruned rope rows
        rows.append((emb, is_vis, pos, {k: t[b, order] for k, t in enc.per_token.items()}))
    L = max(r[0].shape[0] for r in rows)
    embeds = enc.embeds.new_zeros(B, L, H)
    mask = enc.mask.new_zeros(B, L)
    visual = torch.zeros(B, L, dtype=torch.bool, device=dev)
    positions = enc.positions.new_zeros(enc.positions.shape[0], B, L)
    deltas = enc.deltas.clone()
    per_token = {k: t.new_zeros(B, L, *t.shape[2:]) for k, t in enc.per_token.items()}
    for b, (emb, is_vis, pos, extra) in enumerate(rows):
        n = emb.shape[0]
        embeds[b, L - n:] = emb
        for k, t in extra.items():
            per_token[k][b, L - n:] = t
        mask[b, L - n:] = 1
        visual[b, L - n:] = is_vis
        positions[0, b, L - n:] = torch.arange(n, device=dev)
        positions[1:, b, L - n:] = pos
        deltas[b, 0] = pos.max() + 1 - n
    deepstack = [torch.cat(r, dim=0) for r in ds_rows] if enc.deepstack is not None else None
    return replace(enc, embeds=embeds, mask=mask, visual=visual, positions=positions, deltas=deltas,
                   deepstack=deepstack, per_token=per_token)


def _group_mean(x: torch.Tensor, groups: torch.Tensor, k: int) -> torch.Tensor:
    """[N, H] rows averaged into k groups (groups[i] in 0..k-1, -1 dropped) -> [k, H], in float32."""
    keep = groups >= 0
    out = torch.zeros(k, x.shape[-1], device=x.device, dtype=torch.float32)
    out.index_add_(0, groups[keep], x[keep].float())
    cnt = torch.bincount(groups[keep], minlength=k).clamp(min=1).to(out.dtype)
    return out / cnt[:, None]
