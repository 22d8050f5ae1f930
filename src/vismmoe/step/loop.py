"""The one generation loop: prefill -> decode one token -> ... -> finish, over one batch's `DecodeState`.

    prefill(model, family, inputs, strategy, ...)  ->  DecodeState (first token per row; the strategy holds the KV)
    PrefillRun(model, family, inputs, ..., chunk)  ->  the same, one piece at a time (`--prefill-chunk`: the
                                                       encoding, then chunks of the prompt's positions over one
                                                       cache), so a caller can run other work between two pieces
                                                       (engine/running.py)
    decode_one_token(state, teacher_token)         ->  one token per row (the state's strategy: strategy.py)
    finish(state)                                  ->  the last step's books
    run(state, max_new_tokens, ...)                ->  decode steps until every row is done or the token limit
    greedy(model, family, inputs, ...)             ->  the whole loop on the eager step (training, baselines)

Request state lives in the `DecodeState`, never on the engine or the model, so the loop can be driven from
outside (a server interleaving requests, a benchmark) one token at a time. The loop knows nothing of chat
templates, stop strings or text: a caller's `on_step(state)` marks rows done (engine/request.py does that).
Positions are explicit: M-RoPE (or 1-D RoPE) for the prompt as transformers computes them, then text position +
rope delta for each new token (the family adapter's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..engine.sampling import Sampler
from .strategy import DecodeStrategy, Prefilled


@dataclass
class DecodeState:
    """One batch in progress: what its next decode step needs, and what it has produced."""

    tokens: list[list[int]]                 # per row: generated tokens so far (the first comes from the prefill)
    done: list[bool]                        # per row: produced an EOS, or marked done by the caller
    eos_ids: set[int]
    t_first: float                          # perf_counter time the first token was ready
    strategy: DecodeStrategy | None = None  # the decode step (strategy.py), chosen once for the batch
    sampler: Sampler | None = None          # per-row sampling (None: greedy)
    steps: int = 0                          # decode steps taken
    steppers: tuple = ()                    # routing observers told where each step starts
    kv: object = field(default=None, repr=False)    # the strategy's own handle (KV cache, static bucket, ...)
    capacity: int = 0                       # rows the batch may grow to while it runs (a running batch's most,
                                            # engine/running.py; 0: its own): the fast step keeps one shape for them
    teacher: list[int] | None = None        # teacher-forced input of each decode step (`run`), where known ahead

    @property
    def finished(self) -> bool:
        """Every row is done: it produced an EOS, or its caller marked it done (a stop string, its own token
        limit, a client gone). A done row of a batch still computes until the batch finishes; its tokens after
        that point are the caller's to ignore."""
        return all(self.done)


def pick(logits: torch.Tensor, sampler: Sampler | None) -> torch.Tensor:
    """logits [B, V] -> [B] next tokens: the argmax, or the sampler's pick."""
    return logits.argmax(-1) if sampler is None else sampler.pick(logits)


def chunk_bounds(visual: torch.Tensor, chunk: int, split_images: bool = True) -> list[int]:
    """[0, b1, ..., T]: where the chunks of a prompt of T positions (`visual [B, T]` bool) start and end, `chunk`
    positions each (the last one shorter); with `split_images` False a boundary that would fall inside a run of
    visual tokens (of any row) moves to the end of that run, so such a chunk is longer."""
    T = visual.shape[1]
    inside = (visual[:, 1:] & visual[:, :-1]).any(0).tolist()           # [T - 1]: a boundary at p + 1 splits
    bounds = [0]
    while bounds[-1] < T:
        b = min(bounds[-1] + chunk, T)
        while not split_images and b < T and inside[b - 1]:
            b += 1
        bounds.append(b)
    return bounds


def visual_rows(visual: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """A prefill step's modality in the layout its MoE layers route, as step observers are told it: visual and live
    (not padding) [B, T] -> [B * T] int8: 1 visual, 0 text, -1 padding."""
    rows = visual.to(torch.int8).clone()
    rows[~live.bool()] = -1
    return rows.reshape(-1)


class PrefillRun:
    """One batch's prompt on its way through the decoder, over one KV cache: whole (one piece, as transformers'
    forward runs it) or in chunks of positions (`--prefill-chunk`: the prompt encoded once, vision tower
    included, as a piece of its own, then `Family.decoder_forward` over each chunk: `Encoded.chunk`).

        PrefillRun(model, family, inputs, steppers, enc, chunk)   nothing runs yet
        run_chunk() -> bool       the next piece: the encoding (chunked, unless `enc` was given), or a chunk: the
                                  routing observers told a prefill step starts (its tokens' modality), the
                                  decoder over its positions; True once the prompt is done
        finish(strategy, ...)     -> DecodeState: each row's first token, the KV handed to the decode strategy

    Chunking is numerically equivalent to the whole prefill, not bit-exact: the attention and the experts run
    over fewer rows at a time, which changes summation orders (the tests hold fp32 logits within 1e-4)."""

    def __init__(self, model, family, inputs: dict, steppers=(), enc=None, chunk: int = 0):
        self.model, self.family, self.inputs, self.steppers = model, family, inputs, tuple(steppers)
        self.cache = DynamicCache(config=model.config)
        visual = enc.visual if enc is not None else inputs["mm_token_type_ids"].bool()       # [B, T]
        T = visual.shape[1]
        self.chunked = chunk > 0 and T > chunk and family.prefill_chunk_blocker is None
        self.enc = enc
        self.bounds = chunk_bounds(visual, chunk, family.prefill_chunk_splits_images) if self.chunked else [0, T]
        self.encodes = self.chunked and enc is None     # its first piece encodes the prompt
        self.done = 0                   # pieces run
        self.deltas = None              # rope deltas [B, 1] of an unencoded prompt (set by its one piece)
        self.logits: torch.Tensor | None = None     # [B, 1, V] of the prompt's last position, once done

    @property
    def pieces(self) -> int:
        """How many pieces the prompt runs in: its chunks, and the encoding when it is one."""
        return len(self.bounds) - 1 + self.encodes

    @property
    def finished(self) -> bool:
        return self.done == self.pieces

    def run_chunk(self) -> bool:
        """Run the next piece; True once the whole prompt has run (RuntimeError after that)."""
        if self.finished:
            raise RuntimeError("this prompt has run: nothing is left to prefill")
        model, family = self.model, self.family
        if self.encodes and self.done == 0:
            self.enc = family.encode(model, self.inputs)
            self.done = 1
            return False
        i = self.done - self.encodes
        start, end = self.bounds[i], self.bounds[i + 1]
        if self.enc is None:
            inputs = self.inputs
            rows = visual_rows(inputs["mm_token_type_ids"].cpu(), inputs["attention_mask"].cpu())
            for s in self.steppers:
                s.begin_step("prefill", rows)
            pos, self.deltas = family.prefill_positions(model, inputs)
            logits = model(**family.model_inputs(inputs), position_ids=family.position_ids(pos),
                           past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        else:
            part = self.enc.chunk(start, end) if self.chunked else self.enc
            rows = visual_rows(part.visual.cpu(), part.mask[:, start:end].cpu())
            for s in self.steppers:
                s.begin_step("prefill", rows)
            logits = family.decoder_forward(model, part, self.cache)
        self.done += 1
        if self.finished:
            self.logits = logits
        return self.finished

    def finish(self, strategy: DecodeStrategy, eos_ids: set[int], max_new_tokens: int,
               sampler: Sampler | None = None) -> DecodeState:
        """After the last piece: pick each row's first token (argmax, or `sampler`'s pick) and hand the KV cache to
        `strategy` (room for `max_new_tokens`)."""
        dev = self.logits.device
        nxt = pick(self.logits[:, -1], sampler)                          # [B]
        first = nxt.tolist()                                             # (synchronises)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        mask, deltas = (self.enc.mask, self.enc.deltas) if self.enc is not None else \
            (self.inputs["attention_mask"], self.deltas)
        state = DecodeState(tokens=[[t] for t in first], done=[t in eos_ids for t in first], eos_ids=eos_ids,
                            t_first=time.perf_counter(), strategy=strategy, sampler=sampler, steppers=self.steppers)
        strategy.start(state, Prefilled(self.cache, mask, deltas, nxt), max_new_tokens)
        return state


def prefill(model, family, inputs: dict, strategy: DecodeStrategy, eos_ids: set[int], max_new_tokens: int,
            steppers=(), enc=None, sampler: Sampler | None = None, chunk: int = 0) -> DecodeState:
    """Run the prompt (`enc`, compress.py: the pruned encoded prompt instead of the full one), whole or in chunks
    of `chunk` positions (`PrefillRun`), pick each row's first token (argmax, or `sampler`'s pick) and hand the KV
    cache to `strategy` (room for `max_new_tokens`)."""
    run = PrefillRun(model, family, inputs, steppers, enc, chunk)
    while not run.run_chunk():
        pass
    return run.finish(strategy, eos_ids, max_new_tokens, sampler)


def decode_one_token(state: DecodeState, teacher_token: int | None = None) -> list[int]:
    """One decode step for every row of `state`: a token per row. `teacher_token` teacher-forces the step's input
    token (benchmarks on random weights: routing then varies step to step as on real text)."""
    new = state.strategy.step(state, teacher_token)
    for r, t in enumerate(new):
        state.tokens[r].append(t)
        state.done[r] = state.done[r] or t in state.eos_ids
    state.steps += 1
    return new


def finish(state: DecodeState) -> None:
    """The last step's books."""
    state.strategy.finish(state)


def run(state: DecodeState, max_new_tokens: int, teacher_tokens: list[int] | None = None, on_step=None
        ) -> DecodeState:
    """Decode steps until every row is done or `max_new_tokens` tokens, then `finish`. `on_step(state)` is called
    after the prefill and after each step (it may mark rows done)."""
    if on_step is not None:
        on_step(state)
    state.teacher = teacher_tokens
    while state.steps < max_new_tokens - 1 and not state.finished:
        decode_one_token(state, teacher_tokens[state.steps] if teacher_tokens is not None else None)
        if on_step is not None:
            on_step(state)
    finish(state)
    return state


def greedy(model, family, inputs: dict, max_new_tokens: int, eos_ids: set[int], steppers=(),
           teacher_tokens: list[int] | None = None, enc=None, strategy: DecodeStrategy | None = None):
    """Greedy decoding (default: the eager step): (token ids [B][N], perf_counter time of the first token, decode
    steps). Stops when every row has produced an EOS (rows are cut by the caller: `decode.cut_at_eos`) or after
    `max_new_tokens` tokens."""
    if strategy is None:
        from .decode import EagerStep
        strategy = EagerStep(model, family)
    state = prefill(model, family, inputs, strategy, eos_ids, max_new_tokens, steppers, enc)
    run(state, max_new_tokens, teacher_tokens)
    return state.tokens, state.t_first, state.steps
