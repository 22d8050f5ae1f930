"""Continuous batching on one engine: requests join a running batch between decode steps and leave it as soon as
they finish, each row with its own KV (step/rows.py), sampling, token limit and stop strings (request.py).

    RunningBatch(engine)
      admit(req)   prepare (unless prepared) and prefill `req` ALONE (B = 1, the eager prefill, its own cache);
                   its first token; unless it finished there, it joins the running rows: the batch's KV is
                   exported by its decode strategy, concatenated with the newcomer's (left-padded) and started
                   again
      step()       one decode step of every running row (the engine's strategy: eager or fast); rows that finished
                   (EOS, stop string, token limit, cancel, a sampling error) leave at once: their KV rows are
                   dropped and the batch started again without them
      abort()      every running row leaves (the step failed as a whole)
    each returns the requests that finished, with their results and statistics filled in

Each row's greedy tokens are those it gets alone: its prefill runs alone, and a decode step computes each row
from its own KV, position and mask (left padding is masked out). The expert budget is the engine's cache, shared
by every row. A request's offload statistics are the cache's counters over its lifetime in the batch (other rows'
traffic included); `batch` is the most rows it ran beside (itself included).
"""

from __future__ import annotations

import time

import torch

from ..step import loop, rows as kvrows
from ..step.decode import EagerStep
from .request import GenerationRequest, RequestRows


def blocker(engine) -> str | None:
    """Why rows of `engine`'s model cannot join and leave a running batch (None: they can): sliding-window
    attention layers (their cache keeps one window for the whole batch: step/rows.py)."""
    cfg = engine.family.text_config(engine.config)
    if getattr(cfg, "sliding_window", None) is not None or "sliding_attention" in (getattr(cfg, "layer_types", None)
                                                                                    or ()):
        return "sliding-window attention layers keep one window for the whole batch"
    return None


class RunningBatch:
    """See the module docstring. One thread drives it (a server's engine worker)."""

    def __init__(self, engine):
        self.engine = engine
        self.state: loop.DecodeState | None = None
        self.rows: RequestRows | None = None
        self.strategy = None
        self._books: dict[int, dict] = {}        # id(request) -> what its statistics need

    def __len__(self) -> int:
        return 0 if self.rows is None else len(self.rows)

    @property
    def requests(self) -> list[GenerationRequest]:
        return [] if self.rows is None else list(self.rows.reqs)

    @torch.inference_mode()
    def admit(self, req: GenerationRequest) -> list[GenerationRequest]:
        """`req` joins (see the module docstring). Returns [req] when it finished at once: its preparation failed
        (a bad image, a prompt over the context: `error`, finish reason "error"), or its first token ended it;
        else []. An exception of the prefill itself propagates (the running rows are untouched)."""
        eng = self.engine
        req.t_start = req.t_start or time.perf_counter()
        if req.inputs is None:
            try:
                eng.prepare_request(req)
            except Exception as e:
                req.error, req.finish_reason = e, "error"
                return [req]
        with eng._lock:
            t0 = eng._now()
            before = eng._snapshot()
            inputs = eng._to_device(req.inputs)
            new = RequestRows([req], eng.tokenizer, eng.eos_ids, now=eng._now)
            enc = eng.pruned_prompt(inputs) if eng.compressor is not None and len(req.images) == 1 else None
            st = eng.prefill(inputs, req.max_new_tokens, enc=enc, sampler=new.sampler,
                             strategy=EagerStep(eng.model, eng.family))
            new.on_step(st)
            visual = int(inputs["mm_token_type_ids"].sum())
            self._books[id(req)] = dict(t0=t0, before=before, t_first=st.t_first, steps=0, visual=visual,
                                        kept=int(enc.visual.sum()) if enc is not None else visual, batch=1)
            if st.done[0]:
                self._close(req)
                return [req]
            p = st.strategy.export(st)
            if self.state is None:
                self.strategy = eng.step_strategy(2)
                why = kvrows.blocker(p.cache)
                if why is not None:
                    raise RuntimeError(f"continuous batching cannot run this model: {why}")
                self.rows, self.state = new, st
                st.strategy = self.strategy
            else:
                self.strategy.finish(self.state)
                p = kvrows.concat(self.strategy.export(self.state), p)       # new tensors
                self.rows.extend(new)
                self.state.tokens += st.tokens
                self.state.done += st.done
            self._restart(p)
        return []

    @torch.inference_mode()
    def step(self) -> list[GenerationRequest]:
        """One decode step of the running rows; returns the requests that finished (they have left)."""
        if self.state is None:
            return []
        eng = self.engine
        with eng._lock:
            eng.attach()
            loop.decode_one_token(self.state)
            self.rows.on_step(self.state)
            for r in self.rows.reqs:
                self._books[id(r)]["steps"] += 1
            finished = [i for i, d in enumerate(self.state.done) if d]
            if not finished:
                return []
            out = [self.rows.reqs[i] for i in finished]
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
            for r in out:
                self._close(r)
            return out

    def abort(self) -> list[GenerationRequest]:
        """Every running row leaves, unfinished (the caller fails them); the batch is empty after."""
        out = self.requests
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
        stats = eng._request_stats(b["before"], ttft=b["t_first"] - b["t0"], decode_s=end - b["t_first"],
                                   steps=b["steps"], e2e=end - b["t0"], visual=b["visual"])
        first = req.t_first if req.t_first is not None else end
        stats.update(visual_tokens_kept=b["kept"], batch=b["batch"],
                     compress=eng.rc.compress if b["kept"] != b["visual"] else "none",
                     ttft_s=req.prepare_s + first - b["t0"], e2e_s=req.prepare_s + end - b["t0"],
                     preprocess_s=req.prepare_s, new_tokens=len(req.token_ids), prompt_tokens=req.prompt_tokens,
                     queue_s=req.t_start - req.t_submit)
        req.stats = stats
