"""Continuous batching on one engine: requests join a running batch between decode steps and leave it as soon as
they finish, each row with its own KV (step/rows.py), sampling, token limit and stop strings (request.py). A
newcomer's prompt runs ALONE (B = 1, the eager prefill, its own cache), whole or, with `--prefill-chunk N`, in
chunks of N positions between the running rows' decode steps.

    RunningBatch(engine)
      admit(req)   prepare (unless prepared) and start `req`'s prefill: a prompt of at most N positions (or any,
                   chunking off) runs at once; a longer one runs in the following steps, one piece a step: its
                   encoding (the vision tower), then its chunks. One newcomer prefills at a time (`prefilling`).
                   Once its prompt is done: its first token; unless it finished there, it joins the running rows:
                   the batch's KV is exported by its decode strategy, concatenated with the newcomer's
                   (left-padded) and started again
      step()       one piece of the newcomer still prefilling (if any: when it was its last, the newcomer joins as
                   above), then one decode step of every running row (the engine's strategy: eager or fast); rows
                   that finished (EOS, stop string, token limit, cancel, a sampling error) leave at once: their KV
                   rows are dropped and the batch started again without them. A newcomer cancelled while it
                   prefills leaves at once (its chunks stop); one whose chunk raises leaves with that error (finish
                   reason "error"), the running rows untouched
      abort()      every running row leaves (their decode step failed as a whole); a newcomer prefilling stays
    each returns the requests that finished, with their results and statistics filled in

On the fast step a running batch given its `capacity` (the server's max batch) keeps one static bucket of that
many rows (step/graphs.py `StepGraphs.bucket`): joins and leaves re-load the KV into the same captured graph, the
rows past the running ones do no work in the experts kernels (their dense layers still run), and only a batch
longer than every earlier one captures a new KV length (twice the last). So a decode step's result for a row never
depends on how many rows run beside it: on a GPU, where bf16 GEMM kernels are chosen by row count, that is what
keeps each row's decode tokens those it gets alone in this bucket. Without it each (rows, length) met mid-run
compiled and captured a graph of its own.

The running rows wait one piece per step while a newcomer prefills, not its whole prompt: their inter-token
latency is bounded by one piece (a chunk, or the vision tower) and one decode step (docs/serving.md measures it).

Each row's greedy tokens are those it gets alone (with the same `--prefill-chunk`): its prefill runs alone or
left-padded beside other newcomers (`admit_group`), and a decode step computes each row from its own KV, position
and mask (left padding is masked out). That is exact on the CPU (the tests hold it). On a GPU a prefill of several
rows and a bucket of several rows run bf16 GEMMs chosen by their row count, so a row's tokens can part from those
of a lone request after some tokens where two logits nearly tie (docs/serving.md measures it). The expert budget
is the engine's cache, shared by every row. A request's offload statistics are the cache's counters over its
lifetime in the batch (other rows' traffic included); `batch` is the most rows it ran beside (itself included).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..step import loop, rows as kvrows
from ..step.decode import EagerStep
from .request import GenerationRequest, RequestRows, batch_inputs

log = logging.getLogger("vismmoe")


def blocker(engine) -> str | None:
    """Why rows of `engine`'s model cannot join and leave a running batch (None: they can): sliding-window
    attention layers (their cache keeps one window for the whole batch: step/rows.py)."""
    cfg = engine.family.text_config(engine.config)
    if getattr(cfg, "sliding_window", None) is not None or "sliding_attention" in (getattr(cfg, "layer_types", None)
                                                                                    or ()):
        return "sliding-window attention layers keep one window for the whole batch"
    return None


@dataclass
class _Newcomer:
    """A request whose prompt runs (chunk by chunk) before it joins."""

    req: GenerationRequest
    rows: RequestRows               # its row, to join the running rows' once its first token is out
    run: loop.PrefillRun


class RunningBatch:
    """See the module docstring. One thread drives it (a server's engine worker)."""

    def __init__(self, engine, capacity: int = 0):
        self.engine = engine
        self.capacity = capacity        # the most rows it will run (a server's max batch; 0: unknown): the fast
                                        # step keeps one captured shape of that many rows while rows come and go
        self.state: loop.DecodeState | None = None
        self.rows: RequestRows | None = None
        self.strategy = None
        self.newcomer: _Newcomer | None = None
        self.stepped: list[GenerationRequest] = []   # the rows of the last decode step
        self._books: dict[int, dict] = {}        # id(request) -> what its statistics need

    def __len__(self) -> int:
        """Rows running, the newcomer prefilling included."""
        return len(self.decoding) + (self.newcomer is not None)

    @property
    def decoding(self) -> list[GenerationRequest]:
        """The running rows (they take the decode steps)."""
        return [] if self.rows is None else list(self.rows.reqs)

    @property
    def prefilling(self) -> GenerationRequest | None:
        """The newcomer whose prompt still runs (None: `admit` may take the next)."""
        return None if self.newcomer is None else self.newcomer.req

    @property
    def requests(self) -> list[GenerationRequest]:
        """Every request in the batch: the running rows, then the newcomer prefilling."""
        return self.decoding + ([self.newcomer.req] if self.newcomer is not None else [])

    @torch.inference_mode()
    def admit(self, req: GenerationRequest) -> list[GenerationRequest]:
        """`req` starts (see the module docstring). Returns [req] when it finished at once: its preparation failed
        (a bad image, a prompt over the context: `error`, finish reason "error"), or its prompt ran whole and its
        first token ended it; else []. An exception of its whole prefill propagates (the running rows are
        untouched). RuntimeError while another newcomer prefills (`prefilling`)."""
        if self.newcomer is not None:
            raise RuntimeError("a newcomer is still prefilling: admit the next one once it joined (`prefilling`)")
        eng = self.engine
        if not self._prepared(req):
            return [req]
        with eng._lock:
            t0 = eng._now()
            before = eng._snapshot()
            inputs = eng._to_device(req.inputs)
            new = RequestRows([req], eng.tokenizer, eng.eos_ids, now=eng._now)
            enc = eng.pruned_prompt(inputs) if eng.compressor is not None and len(req.images) == 1 else None
            run = eng.start_prefill(inputs, enc)
            visual = int(inputs["mm_token_type_ids"].sum())
            self._books[id(req)] = dict(t0=t0, before=before, t_first=None, steps=0, visual=visual,
                                        kept=int(enc.visual.sum()) if enc is not None else visual, batch=1)
            self.newcomer = _Newcomer(req, new, run)
            if run.pieces > 1:
                return []                                   # its pieces run in the next steps
            try:
                run.run_chunk()
                st = eng.finish_prefill(run, req.max_new_tokens, new.sampler, EagerStep(eng.model, eng.family))
                return self._join(st)
            except BaseException:
                if not self._joined(req):
                    self.newcomer = None
                    self._books.pop(id(req), None)
                raise

    @torch.inference_mode()
    def admit_group(self, reqs: list[GenerationRequest]) -> list[GenerationRequest]:
        """Several newcomers at once, their whole prompts in ONE batched prefill (left-padded, as static batching
        prefills): under an expert budget a prefill is mostly copying the experts its tokens route to, and a
        batch copies the experts its rows share once, not once per request. Then they join together. Returns the
        requests that finished at once (a preparation that failed, a first token that ended it, or a request that
        failed alone). Each row's tokens are those it gets alone, as in a static batch (its own mask, positions and
        KV). When the batched prefill raises, each request is admitted alone (`admit`), so one bad request fails
        only itself. Needs no newcomer prefilling and prompts `--prefill-chunk` does not split (RuntimeError);
        a mix the compressor would treat apart (rows without exactly one image) is admitted one by one."""
        if self.newcomer is not None:
            raise RuntimeError("a newcomer is still prefilling: admit the next ones once it joined (`prefilling`)")
        eng = self.engine
        ready = [r for r in reqs if self._prepared(r)]
        out = [r for r in reqs if r.error is not None]
        chunk = eng.prefill_chunk
        if chunk and any(int(r.inputs["input_ids"].shape[-1]) > chunk for r in ready):
            raise RuntimeError("admit_group takes whole prompts: admit a prompt --prefill-chunk splits with admit")
        if len(ready) < 2 or (eng.compressor is not None and not all(len(r.images) == 1 for r in ready)):
            return out + self._admit_each(ready)
        pad = eng.family.token_ids(eng.tokenizer)["pad"]
        with eng._lock:
            t0 = eng._now()
            before = eng._snapshot()
            try:
                inputs = eng._to_device(batch_inputs([r.inputs for r in ready], pad))
                new = RequestRows(ready, eng.tokenizer, eng.eos_ids, now=eng._now)
                enc = eng.pruned_prompt(inputs) if eng.compressor is not None else None
                run = eng.start_prefill(inputs, enc)
                while not run.run_chunk():
                    pass
                st = eng.finish_prefill(run, max(r.max_new_tokens for r in ready), new.sampler,
                                        EagerStep(eng.model, eng.family))
            except Exception:
                log.exception("batched prefill of %d newcomers failed: admitting each alone", len(ready))
                return out + self._admit_each(ready)
            visual = inputs["mm_token_type_ids"].sum(1).tolist()
            kept = enc.visual.sum(1).tolist() if enc is not None else visual
            for r, v, k in zip(ready, visual, kept):
                self._books[id(r)] = dict(t0=t0, before=before, t_first=None, steps=0, visual=int(v), kept=int(k),
                                          batch=1)
            return out + self._join_rows(new, st)

    def _prepared(self, req: GenerationRequest) -> bool:
        """`req` started and prepared (images, tokens) unless it was; False when that failed (its `error` set,
        finish reason "error")."""
        req.t_start = req.t_start or time.perf_counter()
        if req.inputs is None:
            try:
                self.engine.prepare_request(req)
            except Exception as e:
                req.error, req.finish_reason = e, "error"
                return False
        return True

    def _admit_each(self, reqs: list[GenerationRequest]) -> list[GenerationRequest]:
        """`admit` each in turn (whole prompts: each joins before the next); one that raises finishes alone
        with its error."""
        out = []
        for r in reqs:
            try:
                out += self.admit(r)
            except Exception as e:
                log.exception("prefill of a request failed")
                r.error, r.finish_reason = e, r.finish_reason or "error"
                out.append(r)
        return out

    @torch.inference_mode()
    def step(self) -> list[GenerationRequest]:
        """One piece of the newcomer prefilling (if any), then one decode step of the running rows; returns the
        requests that finished (they have left). An exception of the decode step propagates (`abort`)."""
        out = self._prefill_step() if self.newcomer is not None else []
        self.stepped = []
        if self.state is None:
            return out
        eng = self.engine
        with eng._lock:
            eng.attach()
            self.stepped = list(self.rows.reqs)
            loop.decode_one_token(self.state)
            self.rows.on_step(self.state)
            for r in self.rows.reqs:
                self._books[id(r)]["steps"] += 1
            finished = [i for i, d in enumerate(self.state.done) if d]
            if not finished:
                return out
            out += [self.rows.reqs[i] for i in finished]
            keep = [i for i, d in enumerate(self.state.done) if not d]
            self.strategy.finish(self.state)
            if keep:
                p = kvrows.select(self.strategy.export(self.state), keep)
                self.rows.take(keep)
                self.state.tokens = [self.state.tokens[i] for i in keep]
                self.state.done = [False] * len(keep)
                self._restart(p)
            else:
                self.state = self.rows = None
            for r in out[len(out) - len(finished):]:
                self._close(r)
            return out

    def _prefill_step(self) -> list[GenerationRequest]:
        """The newcomer's next piece; it leaves when it was cancelled (before the piece) or its piece raised, and
        joins (or finishes at its first token) after its last one."""
        nc, eng = self.newcomer, self.engine
        req = nc.req
        if req.cancelled.is_set():
            self.newcomer = None
            req.finish_reason, req.t_end = req.cancel_reason, eng._now()
            self._close(req)
            return [req]
        with eng._lock:
            try:
                eng.attach()
                if not nc.run.run_chunk():
                    return []
                st = eng.finish_prefill(nc.run, req.max_new_tokens, nc.rows.sampler, EagerStep(eng.model, eng.family))
                return self._join(st)
            except Exception as e:          # a bug or a device failure in its prefill: this request fails alone
                if self._joined(req):       # unless it broke while joining the running rows: the step fails
                    raise
                log.exception("prefill of a request failed")
                self.newcomer = None
                req.error, req.finish_reason, req.t_end = e, "error", eng._now()
                self._close(req)
                return [req]

    def _joined(self, req: GenerationRequest) -> bool:
        return self.rows is not None and any(r is req for r in self.rows.reqs)

    def _join(self, st: loop.DecodeState) -> list[GenerationRequest]:
        """The newcomer's prompt is done (`st`: its first token): it finishes there, or joins the running rows."""
        nc = self.newcomer
        self.newcomer = None
        return self._join_rows(nc.rows, st)

    def _join_rows(self, new: RequestRows, st: loop.DecodeState) -> list[GenerationRequest]:
        """Newcomers whose prompts are done (`st`: their first tokens, one row each of `new`): those their first
        token ended finish there, the rest join the running rows. Returns the finished ones."""
        eng = self.engine
        new.on_step(st)
        for r in new.reqs:
            self._books[id(r)]["t_first"] = st.t_first
        out = [r for r, d in zip(new.reqs, st.done) if d]
        keep = [i for i, d in enumerate(st.done) if not d]
        if keep:
            p = st.strategy.export(st)
            if out:                                                     # rows that finished at once leave
                p = kvrows.select(p, keep)
                new.take(keep)
                st.tokens = [st.tokens[i] for i in keep]
                st.done = [False] * len(keep)
            if self.state is None:
                self.strategy = eng.step_strategy(2)
                why = kvrows.blocker(p.cache)
                if why is not None:
                    raise RuntimeError(f"continuous batching cannot run this model: {why}")
                self.rows, self.state = new, st
                st.strategy = self.strategy
                st.capacity = self.capacity
            else:
                self.strategy.finish(self.state)
                p = kvrows.concat(self.strategy.export(self.state), p)       # new tensors
                self.rows.extend(new)
                self.state.tokens += st.tokens
                self.state.done += st.done
            self._restart(p)
        for r in out:
            self._close(r)
        return out

    def abort(self) -> list[GenerationRequest]:
        """Every running row leaves, unfinished (the caller fails them; their decode step failed as a whole); a
        newcomer prefilling stays. The batch has no running rows after."""
        out = self.decoding
        self.state = self.rows = None
        for r in out:
            self._books.pop(id(r), None)
        return out

    def _restart(self, p) -> None:
        """The re-batched rows `p` back into the strategy, with room for the longest remaining row."""
        st = self.state
        st.sampler = self.rows.sampler
        room = max(r.max_new_tokens - len(r.token_ids) for r in self.rows.reqs) + 1
        self.strategy.start(st, p, room)
        n = len(self.rows)
        for r in self.rows.reqs:
            b = self._books[id(r)]
            b["batch"] = max(b["batch"], n)

    def _close(self, req: GenerationRequest) -> None:
        """A finished request's statistics."""
        eng = self.engine
        b = self._books.pop(id(req))
        end = req.t_end if req.t_end is not None else eng._now()
        t_first = b["t_first"] if b["t_first"] is not None else end       # None: it left before its first token
        stats = eng._request_stats(b["before"], ttft=t_first - b["t0"], decode_s=end - t_first,
                                   steps=b["steps"], e2e=end - b["t0"], visual=b["visual"])
        first = req.t_first if req.t_first is not None else end
        stats.update(visual_tokens_kept=b["kept"], batch=b["batch"],
                     compress=eng.rc.compress if b["kept"] != b["visual"] else "none",
                     ttft_s=req.prepare_s + first - b["t0"], e2e_s=req.prepare_s + end - b["t0"],
                     preprocess_s=req.prepare_s, new_tokens=len(req.token_ids), prompt_tokens=req.prompt_tokens,
                     queue_s=req.t_start - req.t_submit)
        req.stats = stats
