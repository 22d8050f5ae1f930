"""Generation as a prefill and a sequence of decode steps over one batch's `DecodeState`.

    prefill(inputs | pruned prompt)  ->  DecodeState (KV cache, positions, first token per row)
    decode_one_token(state)          ->  one token per row: transformers' forward per token (eager), or one
                                         replay of the fast step (fast_step.FastStep, when given); each row's
                                         token is the argmax, or drawn by the state's `sampling.Sampler`
    finish(state)                    ->  the last step's books (the fast step books a step while the next runs)
    cut_at_eos(row, eos_ids)         ->  a row's tokens up to its first EOS

Request state lives in the `DecodeState`, never on the engine or the model, so the loop can be driven from
outside (a server interleaving requests, a benchmark) one token at a time. Positions are explicit: M-RoPE (or 1-D
RoPE) for the prompt as transformers computes them, then text position + rope delta for each new token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..engine.sampling import Sampler


@dataclass
class DecodeState:
    """One request in progress: what its next decode step needs, and what it has produced."""

    tokens: list[list[int]]                 # per row: generated tokens so far (the first comes from the prefill)
    done: list[bool]                        # per row: produced an EOS
    eos_ids: set[int]
    t_first: float                          # perf_counter time the first token was ready
    sampler: Sampler | None = None          # per-row sampling (None: greedy)
    steps: int = 0                          # decode steps taken
    steppers: tuple = ()                    # routing observers told where each step starts
    cache: DynamicCache | None = None       # eager decode: KV cache, attention mask [B, T], rope deltas [B, 1]
    mask: torch.Tensor | None = None
    deltas: torch.Tensor | None = None
    nxt: torch.Tensor | None = None         # eager decode: the last token per row [B]
    bucket: object = None                   # fast decode: the step_graphs.Bucket holding this request
    inflight: object = field(default=None, repr=False)  # fast decode: the step whose books are not settled

    @property
    def finished(self) -> bool:
        """Every row is done: it produced an EOS, or its caller marked it done (a stop string, its own token
        limit, a client gone). A done row of a batch still computes until the batch finishes; its tokens after
        that point are the caller's to ignore."""
        return all(self.done)


def prefill(model, family, inputs: dict, eos_ids: set[int], max_new_tokens: int, steppers=(), enc=None,
            decoder=None, sampler: Sampler | None = None) -> DecodeState:
    """Run the prompt (`enc`, compress.py: the pruned encoded prompt instead of the full one) and pick each row's
    first token (argmax, or `sampler`'s pick). With `decoder` (fast_step.FastStep) the KV cache moves into its
    static bucket, with room for `max_new_tokens` tokens."""
    dev = inputs["input_ids"].device
    cache = DynamicCache(config=model.config)
    if enc is None:
        for s in steppers:
            s.begin_step("prefill", inputs["mm_token_type_ids"].cpu())
        pos, deltas = family.prefill_positions(model, inputs)
        logits = model(**family.model_inputs(inputs), position_ids=family.position_ids(pos), past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits
        mask = inputs["attention_mask"]
    else:
        for s in steppers:
            s.begin_step("prefill", enc.visual[enc.mask.bool()].to(torch.int8).cpu())
        logits = family.decoder_forward(model, enc, cache)
        mask, deltas = enc.mask, enc.deltas
    nxt = _pick(logits[:, -1], sampler)                                  # [B]
    first = nxt.tolist()                                                 # (synchronises)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    state = DecodeState(tokens=[[t] for t in first], done=[t in eos_ids for t in first], eos_ids=eos_ids,
                        t_first=time.perf_counter(), sampler=sampler, steppers=tuple(steppers))
    if decoder is not None and max_new_tokens > 1:
        state.bucket = decoder.start(cache, mask, deltas, nxt, max_new_tokens)
    else:
        state.cache, state.mask, state.deltas, state.nxt = cache, mask, deltas, nxt
    return state


def _pick(logits: torch.Tensor, sampler: Sampler | None) -> torch.Tensor:
    """logits [B, V] -> [B] next tokens."""
    return logits.argmax(-1) if sampler is None else sampler.pick(logits)


def decode_one_token(model, family, state: DecodeState, teacher_token: int | None = None, decoder=None) -> list[int]:
    """One decode step for every row of `state`: the argmax token per row (or the sampler's pick).
    `teacher_token` teacher-forces the step's input token (benchmarks on random weights: routing then varies step
    to step as on real text)."""
    if state.bucket is not None:
        fl = decoder.advance(state.bucket, teacher_token, state.inflight, state.steppers)
        state.inflight = fl
        new = fl.ids
        if state.sampler is not None and not state.sampler.greedy:
            # the step wrote its argmax as the next input; a sampled row replaces it before the next launch
            b = state.bucket
            picked = state.sampler.pick(b.logits[:b.rows])
            b.ids[:b.rows].copy_(picked[:, None])
            new = picked.tolist()
    else:
        B = state.mask.shape[0]
        dev = state.mask.device
        state.mask = torch.cat([state.mask, state.mask.new_ones(B, 1)], dim=1)
        for s in state.steppers:
            s.begin_step("decode", None, B)
        step_in = state.nxt[:, None] if teacher_token is None else \
            torch.full((B, 1), teacher_token, device=dev, dtype=torch.long)
        out = model(input_ids=step_in, attention_mask=state.mask, past_key_values=state.cache, use_cache=True,
                    position_ids=family.position_ids(family.decode_positions(state.mask, state.deltas)))
        state.nxt = _pick(out.logits[:, -1], state.sampler)
        new = state.nxt.tolist()
    for r, t in enumerate(new):
        state.tokens[r].append(t)
        state.done[r] = state.done[r] or t in state.eos_ids
    state.steps += 1
    return new


def finish(state: DecodeState, decoder=None) -> None:
    """Book the last fast step (a no-op for the eager decode)."""
    if state.inflight is not None:
        decoder.settle(state.inflight, state.steppers)
        state.inflight = None


def greedy(model, family, inputs: dict, max_new_tokens: int, eos_ids: set[int], steppers=(),
           teacher_tokens: list[int] | None = None, enc=None, decoder=None):
    """Greedy decoding: (token ids [B][N], perf_counter time of the first token, decode steps). Stops when every
    row has produced an EOS (rows are cut by the caller: `cut_at_eos`) or after `max_new_tokens` tokens."""
    state = prefill(model, family, inputs, eos_ids, max_new_tokens, steppers, enc, decoder)
    while state.steps < max_new_tokens - 1 and not state.finished:
        forced = teacher_tokens[state.steps] if teacher_tokens is not None else None
        decode_one_token(model, family, state, forced, decoder)
    finish(state, decoder)
    return state.tokens, state.t_first, state.steps


def cut_at_eos(row: list[int], eos_ids, keep_eos: bool = True) -> list[int]:
    """`row` up to its first EOS token: with that EOS (`keep_eos`, the token ids a request returns) or without it
    (the text to decode). A row without an EOS is returned whole."""
    cut = next((i for i, t in enumerate(row) if t in eos_ids), None)
    if cut is None:
        return list(row)
    return list(row[: cut + 1] if keep_eos else row[:cut])
