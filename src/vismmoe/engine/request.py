"""One generation request, from what was asked to what it produced; and its text as it streams.

    GenerationRequest   messages (text and image parts) + images, sampling, token limit, stop strings, a streaming
                        callback and a cancel flag; filled in by `Engine.generate_requests`: tokens, text, finish
                        reason, token counts, timings and the offload statistics of the batch it ran in
    TextStream          token ids -> text deltas safe to show: held back while a character is incomplete, while
                        the text ends in whitespace (the final text is stripped), or while its end could begin a
                        stop string
    RequestRows         the loop's `on_step(state)` for a batch of requests: each row's token -> its request
                        (tokens, text deltas to `on_text`, stop strings, EOS, token limit, cancel, a sampling
                        error); marks the row done; rows can join and leave (continuous batching)
    batch_inputs        rows prepared one by one (B = 1 each) -> one left-padded batch

A request's state lives here, never on the engine: several requests can be in flight (queued, prepared, batched)
while the engine runs one batch at a time.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import GREEDY, Sampler, SamplingParams


@dataclass
class GenerationRequest:
    """A chat request. `messages`: [{"role": "system" | "user" | "assistant", "content": str | parts}] with parts
    {"type": "text", "text": str} or {"type": "image"}; `images`: one per image part, in order (paths, encoded
    bytes or PIL images). `on_text(delta)` is called from the engine's thread with each piece of text as it
    becomes final. `cancel()` (or setting `cancelled`) stops generating: the row stops at the next token. A row
    that fails on its own (a bad image, a prompt over the context, logits that cannot be sampled) ends with
    finish reason "error" and the exception in `error`."""

    messages: list[dict]
    images: list = field(default_factory=list)
    max_new_tokens: int = 32
    sampling: SamplingParams = GREEDY
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False                # generate exactly max_new_tokens tokens (load tests)
    on_text: Callable[[str], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"        # the finish reason a cancelled row gets ("shutdown": the server's drain)
    t_submit: float = field(default_factory=time.perf_counter)
    t_start: float | None = None            # perf_counter time the engine took it (queue time: t_start - t_submit)
    # ---- filled in by the engine -----------------------------------------------------------------------------
    inputs: dict | None = None              # prepared model inputs of this row alone (Engine.prepare_request)
    prepare_s: float = 0.0                  # seconds its preparation took (image decoding, processing, tokenizing)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None        # "stop" (EOS or a stop string), "length", `cancel_reason`, "error"
    error: Exception | None = None          # why this row failed (finish reason "error"); the others run on
    prompt_tokens: int = 0
    t_first: float | None = None            # perf_counter time of the first token
    token_times: list[float] = field(default_factory=list)     # the time of each token (the clock of t_first)
    t_end: float | None = None
    stats: dict = field(default_factory=dict)

    @classmethod
    def from_prompt(cls, image, prompt: str, **kw) -> GenerationRequest:
        """One user turn: `image` (None: text only), then `prompt`."""
        parts = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
        return cls(messages=[{"role": "user", "content": parts}], images=[image] if image is not None else [], **kw)

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this request at its next token (or before it starts); it finishes with `reason`."""
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextStream:
    """Text of a growing list of token ids, released in deltas that will never be taken back.

    `push(token) -> (delta, stopped)`: `stopped` when the text now contains a stop string (the text ends before
    it). `close() -> delta`: the rest, once no token follows. The concatenated deltas equal `text`: the decoded
    tokens (special tokens skipped), stripped, cut before the first stop string.

    Decoding is incremental, as streaming servers do it (TGI's and vLLM's detokenizers): each push decodes only the
    ids since the last complete character, with the ids of the window before them for context (a tokenizer may
    decode a sequence's first token differently, as SentencePiece drops its leading space), and appends what that
    window adds. A token that ends inside a multi-byte character adds nothing until the character completes (at most
    `WINDOW` ids wait: then what they decode to is taken as it is). So a token costs the same at the 2000th token as
    at the 2nd (a whole decode per token grew with the text: 180 us a token at 2048 tokens on the bundled
    tokenizer). `close()` (when no stop string ended the text) takes one decode of every id, which holds a partial
    character still pending, and looks for the stop strings in it again; where a tokenizer's decoding is not local
    to such windows, that whole decode is the text (what was released stays a prefix of it unless the tokenizer
    rewrote released characters; tests hold the project's byte-level BPE tokenizers and a SentencePiece-style one
    (Metaspace, byte fallback) to the equality)."""

    WINDOW = 64

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_ids: set[int] = frozenset()):
        # the ids the decode drops (skip_special_tokens) are kept out of the ids: they never hold a window open
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.skip = set(skip_ids) | _dropped_ids(tokenizer)
        self.ids: list[int] = []
        self.text = ""                  # the text so far (stripped at the start, cut at a stop string)
        self.sent = 0                   # characters of `text` released
        self.stopped = False
        self._raw = ""                  # the decoded ids up to `_read`, unstripped
        self._prefix = self._read = 0   # ids[_prefix:_read]: the window's context, already in `_raw`

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self) -> None:
        """Append what the ids since `_read` add to `_raw`, once they end on a complete character and not inside a
        run of byte-fallback tokens (`<0xNN>`: SentencePiece decodes a run as a whole, and one invalid byte in it
        turns the run's earlier characters into replacement characters too)."""
        if len(self.ids) - self._prefix <= self.WINDOW and _is_byte_token(self.tokenizer, self.ids[-1]):
            return
        before = self._decode(self.ids[self._prefix:self._read])
        now = self._decode(self.ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd") or len(self.ids) - self._prefix > self.WINDOW:
            self._raw += now[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if token not in self.skip:
            self.ids.append(token)
            self._advance()
        seen = len(self.text)
        self.text = self._raw.lstrip()
        if self._cut_at_stop(seen):
            return self.close(), True
        return self._release(self._safe_end()), False

    def _cut_at_stop(self, seen: int) -> bool:
        """Cut `text` before the first stop string that ends past its first `seen` characters (the earlier ones
        were looked at before); marks the stream stopped."""
        found = [at for s in self.stop if (at := self.text.find(s, max(0, seen - len(s) + 1))) >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
        return self.stopped

    def close(self) -> str:
        if not self.stopped:            # the whole decode: a partial character still pending, and its stop strings
            self.text = self._decode(self.ids).lstrip()
            self._cut_at_stop(0)
        self.text = self.text.rstrip()
        return self._release(len(self.text))

    def _safe_end(self) -> int:
        """How much of `text` can be shown now: not trailing whitespace (the final text is stripped), not an end
        that could begin a stop string."""
        t = self.text
        end = len(t)
        while True:
            cut = len(t[:end].rstrip())
            for s in self.stop:
                n = next((n for n in range(min(len(s) - 1, cut), 0, -1) if t[cut - n:cut] == s[:n]), 0)
                cut -= n
            if cut == end:
                return max(end, self.sent)
            end = cut

    def _release(self, end: int) -> str:
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta


def _dropped_ids(tokenizer) -> set[int]:
    """The ids `decode(skip_special_tokens=True)` drops: a fast tokenizer's added tokens flagged special (a named
    special token may be an ordinary added token, whose text is kept), else `all_special_ids`."""
    added = getattr(tokenizer, "added_tokens_decoder", None) if getattr(tokenizer, "is_fast", False) else None
    if added is not None:
        return {i for i, tok in added.items() if getattr(tok, "special", False)}
    return set(getattr(tokenizer, "all_special_ids", ()))


def _is_byte_token(tokenizer, token: int) -> bool:
    """Whether `token` is a byte-fallback token (`<0xNN>`)."""
    piece = tokenizer.convert_ids_to_tokens(token)
    return isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


class RequestRows:
    """The request side of a batch: row i of the loop's `DecodeState` is `reqs[i]`. `on_step(state)` (handed to
    `loop.run`, or called after each step by a driver of its own) gives each live row's newest token to its request
    and marks the row done once its request finished: EOS (unless `ignore_eos`), a stop string, its token limit,
    a cancel, or a sampling error of its row (`Sampler.errors`: finish reason "error"). `sampler` picks every
    row's tokens (per-row parameters and generators). `now()` is the clock of `t_first`/`t_end`.

    Rows join and leave (continuous batching): `take(keep)` keeps rows `keep` in that order, `extend(other)`
    appends another batch's rows; the sampler follows (each row keeps its own generator)."""

    def __init__(self, reqs: list[GenerationRequest], tokenizer, eos_ids: set[int], now=time.perf_counter):
        self.reqs = list(reqs)
        self.eos_ids, self.now = eos_ids, now
        self.streams = [TextStream(tokenizer, r.stop, eos_ids) for r in reqs]
        self.sampler = Sampler([r.sampling for r in reqs])

    def __len__(self) -> int:
        return len(self.reqs)

    def on_step(self, state) -> None:
        now = self.now()
        for i, (r, ts) in enumerate(zip(self.reqs, self.streams)):
            if r.finish_reason is None and i in self.sampler.errors:
                r.error, r.finish_reason, r.text, r.t_end = self.sampler.errors[i], "error", ts.text, now
            if r.finish_reason is not None:
                state.done[i] = True
                continue
            tok = state.tokens[i][-1]
            r.token_ids.append(tok)
            r.token_times.append(now)
            r.t_first = r.t_first or now
            delta, stopped = ts.push(tok)
            eos = tok in self.eos_ids and not r.ignore_eos
            if eos or stopped:
                r.finish_reason = "stop"
            elif len(r.token_ids) >= r.max_new_tokens:
                r.finish_reason = "length"
            elif r.cancelled.is_set():
                r.finish_reason = r.cancel_reason
            if r.finish_reason is not None:
                delta += ts.close()
                r.text, r.t_end = ts.text, now
            if delta and r.on_text is not None:
                r.on_text(delta)
            state.done[i] = r.finish_reason is not None

    def take(self, keep: list[int]) -> None:
        """Keep rows `keep` (indices, in their new order)."""
        self.reqs = [self.reqs[i] for i in keep]
        self.streams = [self.streams[i] for i in keep]
        self.sampler = self.sampler.take(keep)

    def extend(self, other: RequestRows) -> None:
        """Append `other`'s rows after these."""
        self.reqs += other.reqs
        self.streams += other.streams
        self.sampler = self.sampler.joined(other.sampler)


def batch_inputs(rows: list[dict], pad_id: int) -> dict:
    """Prepared one-row inputs -> one batch: the per-token tensors ([1, T] each: input_ids, attention_mask,
    mm_token_type_ids, and any a family adds) left-padded to the longest row [B, T] (input_ids with `pad_id`, the
    rest with 0); the image tensors (pixel_values, image_grid_thw, ...) concatenated in row order (rows without
    images add none). The same tensors `Family.build_chat_inputs` gives for the rows together."""
    T = max(r["input_ids"].shape[1] for r in rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {}
    for key in keys:
        have = [r[key] for r in rows if key in r]
        per_token = all(t.dim() == 2 and t.shape == r["input_ids"].shape for r in rows if key in r
                        for t in (r[key],))
        if per_token and len(have) == len(rows):
            value = pad_id if key == "input_ids" else 0
            out[key] = torch.cat([torch.nn.functional.pad(t, (T - t.shape[1], 0), value=value) for t in have])
        else:
            out[key] = torch.cat(have)
    return out
